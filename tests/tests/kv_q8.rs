//! The int8 KV cache (`--kv q8`): perplexity within 0.5 % of the f32 cache on long-context text (ctx 2048) for
//! SmolLM2 (global attention) and Gemma 3 (5:1 sliding/global), at a quarter of the bytes.

use sprig_backend::KvDtype;
use sprig_import::QuantChoice;
use sprig_tests::*;

fn gpl_perplexity(e: &sprig_engine::Engine<sprig_backend::cpu::CpuBackend>) -> f64 {
    let text = std::fs::read_to_string(fixtures().join("gpl-3.0.txt")).unwrap();
    let r = sprig_engine::eval::perplexity::<_, sprig_backend::cpu::CpuBackend>(e, None, &text, 2048, Some(2), |_, _, _| {});
    r.unwrap().perplexity
}

#[test]
fn int8_kv_perplexity_within_half_a_percent_of_f32() {
    for name in ["smollm2-135m-instruct", "gemma3-270m"] {
        let e = cpu_engine(open(&registry_model(name), None, QuantChoice::Keep), 2);
        let f32_ppl = gpl_perplexity(&e);
        e.model.set_kv_dtype(KvDtype::Q8);
        assert_eq!(e.model.new_state(64).unwrap().kv_dtype(), KvDtype::Q8);
        let q8_ppl = gpl_perplexity(&e);
        let change = q8_ppl / f32_ppl - 1.0;
        eprintln!("{name}: f32 KV {f32_ppl:.4}, int8 KV {q8_ppl:.4} ({:+.2} %)", 100.0 * change);
        assert!(change.abs() < 0.005, "{name}: int8 KV perplexity {q8_ppl} vs f32 {f32_ppl}");
        let layout = e.model.kv_layout(2048);
        let (q8, f32) = (layout.total_bytes().unwrap(), layout.with_dtype(KvDtype::F32).total_bytes().unwrap());
        assert!(q8 * 3 < f32, "{name}: {q8} bytes vs {f32}");
    }
}
