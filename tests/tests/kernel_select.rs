//! Kernels chosen by measurement (crates/sprig-backend/src/cpu/select.rs): every candidate is timed, a candidate
//! slowed down by a hook is avoided, and every plan the selector can pick computes the same logits.

use std::sync::Arc;
use std::time::Duration;

use sprig_backend::cpu::select::{Candidate, KernelPlan, KernelSelection, PlanSource};
use sprig_backend::cpu::CpuBackend;
use sprig_engine::Engine;
use sprig_import::synth::{Arch, write_gguf, SynthSpec};
use sprig_import::QuantChoice;
use sprig_quant::kernels::Isa;
use sprig_tests::*;

/// A small int4 model; `name` keeps the tests' files apart (they run in parallel, and a GGUF rewritten while
/// another test maps it would fault).
fn model(name: &str) -> Arc<sprig_format::ModelFile> {
    let path = std::env::temp_dir().join(format!("sprig-kselect-{name}-{}.gguf", std::process::id()));
    let spec = SynthSpec { dim: 128, hidden_dim: 256, n_layers: 2, ..SynthSpec::tiny(Arch::Llama) };
    write_gguf(&spec, &path).unwrap();
    let f = open(&path, None, QuantChoice::Q4);
    let _ = std::fs::remove_file(&path);
    f
}

#[test]
fn the_selector_avoids_a_slowed_candidate() {
    let file = model("slowed");
    let mut b = CpuBackend::new(2).unwrap();
    let first = b.measure_kernels(&file, &|_| {}).clone();
    assert!(matches!(first.source, PlanSource::Measured(d) if d < Duration::from_millis(1000)), "{:?}", first.source);
    let avail = Isa::available();
    // Every ISA with 1 and 2 threads for decode, every ISA for prefill.
    assert_eq!(first.timings.len(), 3 * avail.len(), "{:?}", first.timings);
    assert!(first.timings.iter().all(|t| t.seconds > 0.0 && t.passes >= 1));

    // Slow down exactly what won: the selector must pick something else in both classes.
    let (dw, pw) = (first.plan, first.plan);
    let slow = move |c: &Candidate| {
        let won = if c.prefill { c.isa == pw.prefill } else { c.isa == dw.decode && c.threads == dw.decode_threads };
        if won {
            std::thread::sleep(Duration::from_millis(30));
        }
    };
    let second = b.measure_kernels(&file, &slow).clone();
    assert!(
        second.plan.decode != first.plan.decode || second.plan.decode_threads != first.plan.decode_threads,
        "decode: {:?} again",
        second.plan
    );
    if avail.len() > 1 {
        assert_ne!(second.plan.prefill, first.plan.prefill, "prefill: {:?} again", second.plan);
    }
    assert_eq!(b.plan(), second.plan, "the backend runs what was picked");
}

#[test]
fn every_plan_computes_the_same_logits() {
    let file = model("plans");
    let tokens = [3u32, 200, 17, 99, 256, 261, 40];
    let logits = |plan: KernelPlan| -> Vec<f32> {
        let mut b = CpuBackend::new(2).unwrap();
        let sel = KernelSelection { plan, source: PlanSource::Default, timings: Vec::new(), probe: String::new() };
        b.use_kernels(sel).unwrap();
        let e = Engine::new(Arc::new(b), file.clone()).unwrap();
        prefill_then_decode(&e, &tokens, &[5, 77]).0
    };
    for &isa in &Isa::available() {
        let parallel = logits(KernelPlan::uniform(isa, 2));
        // Decode on the calling thread alone computes exactly what the pool computes.
        let serial = logits(KernelPlan { decode: isa, decode_threads: 1, prefill: isa });
        assert_eq!(serial, parallel, "{isa:?}: one decode thread vs two");
        // Decode and prefill on different ISAs agree with the scalar reference within int8 rounding.
        let mixed = logits(KernelPlan { decode: Isa::Scalar, decode_threads: 1, prefill: isa });
        assert!(rel_err(&mixed, &parallel) < 1e-3, "{isa:?}: mixed plan {}", rel_err(&mixed, &parallel));
    }
    // A plan for another thread count is refused.
    let mut b = CpuBackend::new(2).unwrap();
    let plan = KernelPlan { decode: Isa::Scalar, decode_threads: 3, prefill: Isa::Scalar };
    let sel = KernelSelection { plan, source: PlanSource::Default, timings: Vec::new(), probe: String::new() };
    assert!(b.use_kernels(sel).is_err());
}
