//! `sprig` built with the GPU backend (`--features wgpu`): `devices`, and `--device gpu` on the commands
//! that run a model. Without a GPU this runs on Mesa's lavapipe (correctness only).
#![cfg(feature = "wgpu")]

mod common;
use common::*;

#[test]
fn devices_lists_an_adapter() {
    let (out, _) = run_ok(&["devices"]);
    assert!(out.starts_with("cpu: "), "{out}");
    assert!(out.contains("gpu 0: "), "no adapter listed: {out}");
}

#[test]
fn run_bench_and_perplexity_on_the_gpu() {
    let (m, t) = (fixture("stories260K/stories260K.bin"), fixture("stories260K/tok512.bin"));
    let (m, t) = (m.to_str().unwrap(), t.to_str().unwrap());
    let golden = std::fs::read_to_string(fixture("stories260K/golden_once_upon_a_time_steps256.txt")).unwrap();
    let (out, err) =
        run_ok(&["run", "-m", m, "--tokenizer", t, "-p", "Once upon a time", "-n", "252", "--device", "gpu"]);
    assert_eq!(out, golden);
    assert!(err.contains("wgpu: "), "backend not named: {err}");
    // auto never picks a software adapter (lavapipe would be slower than the CPU backend).
    let (_, err) = run_ok(&["run", "-m", m, "--tokenizer", t, "-p", "Once", "-n", "4", "--device", "auto"]);
    assert!(err.contains("wgpu: ") || err.contains("using the CPU"), "{err}");
    let (json, _) =
        run_ok(&["bench", "-m", m, "--tokenizer", t, "-p", "16", "-n", "8", "-r", "1", "--json", "--device", "gpu"]);
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert!(v["backend"].as_str().unwrap().starts_with("wgpu"), "{v}");
    assert!(v["tg_tok_s"].as_f64().unwrap() > 0.0 && v["pp_tok_s"].as_f64().unwrap() > 0.0, "{v}");
    let text = std::env::temp_dir().join(format!("sprig-gpu-ppl-{}.txt", std::process::id()));
    std::fs::write(&text, golden.repeat(2)).unwrap();
    let ppl = |device: &str| -> f64 {
        let (out, _) = run_ok(&[
            "eval",
            "perplexity",
            "-m",
            m,
            "--tokenizer",
            t,
            "-f",
            text.to_str().unwrap(),
            "--ctx",
            "64",
            "--json",
            "--device",
            device,
        ]);
        serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()["perplexity"].as_f64().unwrap()
    };
    let (cpu, gpu) = (ppl("cpu"), ppl("gpu"));
    assert!((cpu - gpu).abs() / cpu < 1e-4, "perplexity cpu {cpu} vs gpu {gpu}");
    let _ = std::fs::remove_file(&text);
}
