//! The quantizer's quality bar: KL(f32 ‖ int4) of sprig's calibrated int4 is at most that of GGUF's
//! reference Q4_0 algorithm (absmax, what llama.cpp's `llama-quantize ... Q4_0` runs without an imatrix).
//!
//! stories260K cannot be quantized by llama.cpp itself (its hidden size 172 is not a multiple of 32), so the
//! Q4_0 side is sprig's bit-exact port of that algorithm (`--quant q4-absmax`). The SmolLM2 figures against a
//! real llama.cpp Q4_0 file are in BENCHMARKS.md (they need llama.cpp, which CI does not build).

use std::sync::Arc;

use sprig_engine::calibrate::calibrate;
use sprig_engine::eval::perplexity;
use sprig_format::ModelFile;
use sprig_import::{ImportOptions, QuantChoice};
use sprig_tests::*;

fn data(name: &str) -> String {
    std::fs::read_to_string(format!("{}/data/{name}", std::env::var("CARGO_MANIFEST_DIR").expect("run by cargo")))
        .unwrap()
}

#[test]
fn calibrated_int4_beats_q4_0_on_kl_stories260k() {
    let (model, tok) = stories260k();
    let teacher = cpu_engine(open(&model, Some(tok.clone()), QuantChoice::Keep), 2);
    // Calibrate on one text (GPL-3.0), evaluate on another (Apache-2.0).
    let importance = calibrate(&teacher, &data("gpl-3.0.txt"), 256, 16).unwrap();
    assert!(importance.contains_key("blk.0.attn_q.weight") && importance.contains_key("blk.4.ffn_down.weight"));
    let build = |quant, imp| {
        let opts = ImportOptions { quant, importance: imp };
        let w = sprig_import::import_with(&model, Some(&tok), &opts, &mut |_, _| {}).unwrap().writer;
        cpu_engine(Arc::new(ModelFile::from_bytes(&w.to_bytes()).unwrap()), 2)
    };
    let eval = |student: &sprig_engine::Engine<_>| {
        perplexity(student, Some(&teacher), &data("apache-2.0.txt"), 256, None, |_, _, _| {}).unwrap().mean_kl.unwrap()
    };
    let kl_q4_0 = eval(&build(QuantChoice::Q4Absmax, None));
    let kl_sprig = eval(&build(QuantChoice::Q4, Some(&importance)));
    eprintln!("KL(f32 || int4): sprig calibrated {kl_sprig:.4}, Q4_0 reference {kl_q4_0:.4}");
    assert!(kl_sprig <= kl_q4_0, "sprig int4 KL {kl_sprig} > Q4_0's {kl_q4_0}");
}
