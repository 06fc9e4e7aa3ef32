//! Mixture-of-Experts on generated checkpoints: a dense model split into experts equals the dense model,
//! every MoE family (GGUF and HF layouts) agrees with the reference backend, and experts no token was routed to
//! are never read (their pages are made unreadable and the run still succeeds, bit for bit).

use std::path::PathBuf;
use std::sync::Arc;

use sprig_backend::Backend;
use sprig_format::{ModelFile, TensorEntry};
use sprig_import::synth::{Arch, write_gguf, write_hf_dir, HfDtype, SynthMoe, SynthSpec};
use sprig_import::QuantChoice;
use sprig_models::Logits;
use sprig_tests::*;

fn tmp(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("sprig-moe-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    let _ = std::fs::remove_file(&p);
    p
}

const TOKENS: [u32; 9] = [3, 200, 17, 99, 256, 261, 40, 40, 7];
const DECODE: [u32; 2] = [5, 77];

/// Logits of a prefill of `TOKENS` then two decode steps, concatenated; and the state's expert usage.
fn run<B: Backend>(e: &sprig_engine::Engine<B>) -> (Vec<f32>, Vec<Option<sprig_backend::MoeUsage>>) {
    let (all, st) = prefill_then_decode(e, &TOKENS, &DECODE);
    (all, e.model.moe_usage(&st).unwrap())
}

#[test]
fn dense_ffn_split_into_experts_all_selected_with_weight_one_gives_the_dense_logits() {
    // Mixtral-style GGUF (stacked 3-D expert tensors) and a Qwen3-MoE HF directory (per-expert tensors).
    for (arch, gguf) in [(Arch::Llama, true), (Arch::Qwen3Moe, false)] {
        let dense = SynthSpec { n_layers: 3, ..SynthSpec::tiny(arch) };
        let split = SynthSpec { moe: Some(SynthMoe::split_of_dense(4, dense.hidden_dim)), ..dense.clone() };
        let (pd, pm) = (tmp(&format!("dense-{arch}")), tmp(&format!("split-{arch}")));
        if gguf {
            write_gguf(&dense, &pd).unwrap();
            write_gguf(&split, &pm).unwrap();
        } else {
            write_hf_dir(&dense, &pd, HfDtype::F32, 1).unwrap();
            write_hf_dir(&split, &pm, HfDtype::F32, 2).unwrap();
        }
        let (fd, fm) = (open(&pd, None, QuantChoice::Keep), open(&pm, None, QuantChoice::Keep));
        let m = fm.config.moe.as_ref().expect("MoE config");
        assert_eq!((m.n_experts, m.top_k, m.expert_hidden_dim), (4, 4, 24));
        assert!(fd.config.moe.is_none() && m.moe_layers.iter().all(|&x| x));
        let (want, _) = run(&cpu_engine(fd, 2));
        let (got, usage) = run(&cpu_engine(fm.clone(), 2));
        // Same sums in a different order: float rounding only.
        assert!(rel_err(&got, &want) < 1e-5, "{arch}: split vs dense: {}", rel_err(&got, &want));
        let (reference, _) = run(&reference_engine(fm));
        assert!(rel_err(&reference, &want) < 1e-4, "{arch}: reference split vs dense");
        // Every token went to every expert.
        let n = (TOKENS.len() + DECODE.len()) as u64;
        assert!(usage.iter().all(|u| u.as_ref().unwrap().tokens == vec![n; 4]));
        let _ = std::fs::remove_dir_all(&pd).or_else(|_| std::fs::remove_file(&pd));
        let _ = std::fs::remove_dir_all(&pm).or_else(|_| std::fs::remove_file(&pm));
    }
}

#[test]
fn moe_families_match_the_reference_and_gguf_equals_hf() {
    let mut sigmoid = SynthSpec::tiny_moe(Arch::Qwen3Moe);
    let m = sigmoid.moe.as_mut().unwrap();
    (m.sigmoid, m.routed_scale, m.top_k) = (true, Some(2.5), 3);
    let cases = [
        ("mixtral", SynthSpec::tiny_moe(Arch::Llama)),
        ("qwen2moe", SynthSpec::tiny_moe(Arch::Qwen2Moe)),
        ("qwen3moe", SynthSpec::tiny_moe(Arch::Qwen3Moe)),
        ("olmoe", SynthSpec::tiny_moe(Arch::Olmoe)),
        ("sigmoid", sigmoid),
    ];
    for (what, spec) in cases {
        let (dir, gguf) = (tmp(&format!("{what}-hf")), tmp(&format!("{what}.gguf")));
        write_hf_dir(&spec, &dir, HfDtype::F32, 3).unwrap();
        write_gguf(&spec, &gguf).unwrap();
        let hf_file = open(&dir, None, QuantChoice::Keep);
        let gguf_file = open(&gguf, None, QuantChoice::Keep);
        let sm = spec.moe.as_ref().unwrap();
        for f in [&hf_file, &gguf_file] {
            let m = f.config.moe.as_ref().unwrap_or_else(|| panic!("{what}: no MoE config"));
            assert_eq!((m.n_experts, m.top_k, m.norm_topk), (sm.n_experts, sm.top_k, sm.norm_topk), "{what}");
            assert_eq!(m.moe_layers, [false, true, true], "{what}");
            assert_eq!(m.shared_expert_hidden_dim, sm.shared_hidden, "{what}");
            assert_eq!(m.routed_scale, sm.routed_scale, "{what}");
            assert_eq!(f.contains("blk.1.ffn_gate_inp_shexp.weight"), spec.arch.rules().shared_expert_gate, "{what}");
            // Experts stacked as [E * rows, cols].
            assert_eq!(f.entry("blk.1.ffn_down_exps.weight").unwrap().shape(), [8 * 64, sm.expert_hidden]);
        }
        let (hf, hf_usage) = run(&cpu_engine(hf_file.clone(), 2));
        let (from_gguf, _) = run(&cpu_engine(gguf_file, 1));
        let (reference, ref_usage) = run(&reference_engine(hf_file));
        assert!(rel_err(&from_gguf, &hf) < 1e-5, "{what}: GGUF vs HF: {}", rel_err(&from_gguf, &hf));
        assert!(rel_err(&hf, &reference) < 1e-4, "{what}: CPU vs reference: {}", rel_err(&hf, &reference));
        // Both backends routed the same tokens to the same experts; each token to top_k of them.
        assert_eq!(
            hf_usage.iter().map(|u| u.as_ref().map(|u| &u.tokens)).collect::<Vec<_>>(),
            ref_usage.iter().map(|u| u.as_ref().map(|u| &u.tokens)).collect::<Vec<_>>(),
            "{what}"
        );
        let n = (TOKENS.len() + DECODE.len()) * sm.top_k;
        assert!(hf_usage[0].is_none());
        assert!(hf_usage[1..].iter().all(|u| u.as_ref().unwrap().tokens.iter().sum::<u64>() == n as u64));

        // int4 experts (the router stays f32): close to the f32 model.
        let q4 = open(&dir, None, QuantChoice::Q4);
        assert_eq!(q4.entry("blk.1.ffn_gate_exps.weight").unwrap().type_name(), "q4", "{what}");
        assert_eq!(q4.entry("blk.1.ffn_gate_inp.weight").unwrap().type_name(), "f32", "{what}");
        let (lq, _) = run(&cpu_engine(q4, 2));
        assert!(lq.iter().all(|v| v.is_finite()) && rel_err(&lq, &hf) < 0.3, "{what} q4: {}", rel_err(&lq, &hf));
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_file(&gguf);
    }
}

/// Byte ranges (absolute offsets in the mapping) of expert `e` in each plane of a stacked quantized tensor.
fn expert_ranges(entry: &TensorEntry, n_experts: usize, e: usize) -> Vec<(usize, usize)> {
    let TensorEntry::Quant { qs, scale, min, .. } = entry else { panic!("expected an int4 tensor") };
    let mut planes = vec![*qs, *scale];
    planes.extend(*min);
    planes
        .into_iter()
        .map(|(a, b)| {
            let per = (b - a) / n_experts;
            (a + e * per, a + (e + 1) * per)
        })
        .collect()
}

/// Sets the protection of every whole page inside `range` of the mapping; returns how many pages.
fn protect(file: &ModelFile, range: (usize, usize), prot: libc::c_int) -> usize {
    let page = 4096;
    let base = file.mapping().as_ptr() as usize;
    let (lo, hi) = ((base + range.0).next_multiple_of(page), (base + range.1) / page * page);
    if hi <= lo {
        return 0;
    }
    // SAFETY: [lo, hi) lies inside the file's live mapping; only its protection changes, and it is restored
    // before the mapping is dropped.
    let rc = unsafe { libc::mprotect(lo as *mut libc::c_void, hi - lo, prot) };
    assert_eq!(rc, 0, "mprotect: {}", std::io::Error::last_os_error());
    (hi - lo) / page
}

#[test]
fn experts_no_token_was_routed_to_are_never_read() {
    // 16 int4 experts of 256 x 128 (several pages each), top-2: 11 positions leave experts unused in each layer.
    let mut moe = SynthMoe::new(16, 2, 256);
    moe.norm_topk = true;
    let spec =
        SynthSpec { dim: 128, n_heads: 4, n_kv_heads: 2, n_layers: 2, moe: Some(moe), ..SynthSpec::tiny(Arch::Qwen3Moe) };
    let path = tmp("pages.gguf");
    write_gguf(&spec, &path).unwrap();
    let file: Arc<ModelFile> = open(&path, None, QuantChoice::Q4);
    let engine = cpu_engine(file.clone(), 2);
    let (want, usage) = run(&engine);

    // The counters: every token's experts counted; a decode step reads exactly top_k experts' bytes, and a
    // prefill reads each expert it uses once (tokens grouped by expert), not once per token.
    let per_expert: usize = ["gate", "up", "down"]
        .iter()
        .map(|p| file.entry(&format!("blk.0.ffn_{p}_exps.weight")).unwrap().bytes() / 16)
        .sum();
    let mut st = engine.model.new_state(64).unwrap();
    engine.model.forward(&mut st, &TOKENS, Logits::Last).unwrap();
    let u = engine.model.moe_usage(&st).unwrap()[0].clone().unwrap();
    let used = u.tokens.iter().filter(|&&t| t > 0).count();
    assert_eq!(u.tokens.iter().sum::<u64>(), 2 * TOKENS.len() as u64);
    assert_eq!(u.bytes_read, (used * per_expert) as u64, "prefill reads each used expert once");
    engine.model.forward(&mut st, &[DECODE[0]], Logits::Last).unwrap();
    let after = engine.model.moe_usage(&st).unwrap()[0].clone().unwrap();
    assert_eq!(after.bytes_read - u.bytes_read, 2 * per_expert as u64);

    // Make the unused experts' pages unreadable: any read of them would kill this process (SIGSEGV).
    let mut protected = Vec::new();
    for (layer, u) in usage.iter().enumerate() {
        let u = u.as_ref().unwrap();
        let unused: Vec<usize> = (0..16).filter(|&e| u.tokens[e] == 0).collect();
        assert!(!unused.is_empty() && unused.len() < 16, "layer {layer}: usage {:?}", u.tokens);
        for p in ["gate", "up", "down"] {
            let entry = file.entry(&format!("blk.{layer}.ffn_{p}_exps.weight")).unwrap();
            for &e in &unused {
                protected.extend(expert_ranges(entry, 16, e));
            }
        }
    }
    let pages: usize = protected.iter().map(|&r| protect(&file, r, libc::PROT_NONE)).sum();
    assert!(pages >= 20, "only {pages} pages protected");
    let (got, again) = run(&engine);
    for &r in &protected {
        protect(&file, r, libc::PROT_READ);
    }
    assert_eq!(got, want, "same routing, same bits");
    assert_eq!(again, usage);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn inconsistent_moe_checkpoints_are_rejected_with_clear_errors() {
    let spec = SynthSpec::tiny_moe(Arch::Qwen3Moe);
    let dir = tmp("bad-hf");
    write_hf_dir(&spec, &dir, HfDtype::F32, 1).unwrap();
    let cfg_path = dir.join("config.json");
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let err_with = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut c = cfg.clone();
        edit(&mut c);
        std::fs::write(&cfg_path, serde_json::to_string(&c).unwrap()).unwrap();
        let opts = sprig_engine::LoadOptions { tokenizer: None, quant: QuantChoice::Keep };
        sprig_engine::open_model_file(&dir, &opts).map(|_| ()).unwrap_err().to_string()
    };
    // Fewer experts in the config than tensors in the checkpoint; more (one missing); top-k > experts.
    assert!(err_with(&|c| c["num_experts"] = 4.into()).contains("expert 4"), "num_experts 4");
    assert!(err_with(&|c| c["num_experts"] = 9.into()).contains("expert 8 is missing"));
    assert!(err_with(&|c| c["num_experts_per_tok"] = 9.into()).contains("top_k"));
    assert!(err_with(&|c| c["scoring_func"] = "relu".into()).contains("scoring_func"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Corrupted MoE GGUFs through the whole pipeline (import, load, a forward pass): errors, never a panic.
#[test]
fn mutated_moe_files_fail_cleanly_end_to_end() {
    use rand::{Rng, SeedableRng};
    let spec = SynthSpec { dim: 32, hidden_dim: 40, ..SynthSpec::tiny_moe(Arch::Qwen2Moe) };
    let bytes = sprig_import::synth::gguf_bytes(&spec).unwrap();
    let path = tmp("mutated.gguf");
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let (mut loaded, mut ran) = (0, 0);
    for _ in 0..400 {
        let mut m = bytes.clone();
        for _ in 0..rng.gen_range(1..6) {
            let i = rng.gen_range(0..m.len().min(8192));
            m[i] = rng.gen();
        }
        std::fs::write(&path, &m).unwrap();
        let opts = sprig_engine::LoadOptions { tokenizer: None, quant: QuantChoice::Keep };
        let Ok(file) = sprig_engine::open_model_file(&path, &opts) else { continue };
        loaded += 1;
        let Ok(engine) =
            sprig_engine::Engine::new(std::sync::Arc::new(sprig_backend::cpu::CpuBackend::new(1).unwrap()), file)
        else {
            continue;
        };
        let mut st = engine.model.new_state(16).unwrap();
        if engine.model.forward(&mut st, &[1, 2, 3], Logits::Last).is_ok() {
            ran += 1;
        }
    }
    eprintln!("{loaded} of 400 mutated files imported, {ran} ran a forward pass");
    assert!(ran > 0, "no mutated file got as far as a forward pass: the test exercises nothing past import");
    let _ = std::fs::remove_file(&path);
}
