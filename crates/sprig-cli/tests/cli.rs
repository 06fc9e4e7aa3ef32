//! The `sprig` binary: commands, streaming output, exit codes and one-line errors.

use std::io::Write;
use std::process::Stdio;

mod common;
use common::*;

#[test]
fn run_convert_inspect_and_errors() {
    let (m, t) = (fixture("stories260K/stories260K.bin"), fixture("stories260K/tok512.bin"));
    let (m, t) = (m.to_str().unwrap(), t.to_str().unwrap());
    let golden = std::fs::read_to_string(fixture("stories260K/golden_once_upon_a_time_steps256.txt")).unwrap();
    let (out, err) = run_ok(&["run", "-m", m, "--tokenizer", t, "-p", "Once upon a time", "-n", "252", "-t", "1"]);
    assert_eq!(out, golden);
    assert!(err.contains("tok/s"));

    let dir = std::env::temp_dir().join(format!("sprig-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let native = dir.join("s.safetensors");
    let (_, err) = run_ok(&["convert", m, "--tokenizer", t, "-o", native.to_str().unwrap(), "--quant", "q8"]);
    assert!(err.contains("bits per weight"), "{err}");
    let (out, _) = run_ok(&["inspect", native.to_str().unwrap(), "--kv", "512", "--memory"]);
    assert!(out.contains("KV cache (f32)") && out.contains("available now"), "{out}");
    assert!(out.contains("architecture: llama") && out.contains("blk.0.attn_q.weight") && out.contains("q8"), "{out}");
    // stories260K's 64-row matrices are stored in groups of 16 rows.
    assert!(out.lines().any(|l| l.starts_with("blk.0.attn_q.weight") && l.ends_with("rows16")), "{out}");
    let (out, _) =
        run_ok(&["bench", "-m", native.to_str().unwrap(), "-p", "8", "-n", "8", "-r", "1", "-t", "1", "--json"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    for k in ["pp_tok_s", "tg_tok_s", "peak_rss_bytes", "threads", "model"] {
        assert!(!v[k].is_null(), "bench --json lacks {k}: {out}");
    }

    // Errors: missing file, missing tokenizer, bad sampling, bad quant, corrupt file, bad UTF-8 text.
    run_err(&["run", "-m", "/nonexistent/model.gguf", "-p", "x"]);
    assert!(run_err(&["run", "-m", m, "-p", "x"]).contains("--tokenizer"));
    assert!(run_err(&["run", "-m", m, "--tokenizer", t, "-p", "x", "--temp", "-1"]).contains("temperature"));
    assert!(run_err(&["run", "-m", m, "--tokenizer", t, "-p", "x", "--top-p", "2"]).contains("top_p"));
    assert!(run_err(&["run", "-m", m, "--tokenizer", t, "-p", "x", "--min-p", "1"]).contains("min_p"));
    // A memory budget the model does not fit: refused before loading, with the breakdown.
    let e = run_err(&["run", "-m", m, "--tokenizer", t, "-p", "x", "--memory-budget", "0"]);
    assert!(e.contains("budget") && e.contains("KV cache"), "{e}");
    assert!(run_err(&["run", "-m", m, "--tokenizer", t, "-p", "x", "--logit-bias", "5"]).contains("TOKEN=BIAS"));
    // --stop ends the text before the stop string (the prompt is echoed, then the continuation).
    let (full, _) = run_ok(&["run", "-m", m, "--tokenizer", t, "-p", "Once upon a time", "-n", "40"]);
    let cont = full.trim_end().strip_prefix("Once upon a time").unwrap().to_string();
    let stop = &cont[10..14];
    let (cut, _) = run_ok(&["run", "-m", m, "--tokenizer", t, "-p", "Once upon a time", "-n", "40", "--stop", stop]);
    assert_eq!(cut.trim_end(), format!("Once upon a time{}", &cont[..cont.find(stop).unwrap()]).trim_end());
    assert!(run_err(&["convert", m, "--tokenizer", t, "-o", "/tmp/x.safetensors", "--quant", "q3"]).contains("q3"));
    let corrupt = dir.join("corrupt.safetensors");
    let bytes = std::fs::read(&native).unwrap();
    std::fs::write(&corrupt, &bytes[..bytes.len() / 2]).unwrap();
    run_err(&["run", "-m", corrupt.to_str().unwrap(), "-p", "x"]);
    let bad_text = dir.join("bad.txt");
    std::fs::write(&bad_text, [0x66, 0xff, 0xfe]).unwrap();
    assert!(run_err(&["eval", "perplexity", "-m", native.to_str().unwrap(), "-f", bad_text.to_str().unwrap()])
        .contains("UTF-8"));
    // Context overflow is reported, not a crash.
    let (_, err) = run_ok(&["run", "-m", native.to_str().unwrap(), "-p", "Once upon a time", "-n", "50", "-c", "8"]);
    assert!(err.contains("context"), "{err}");
    // A context larger than the machine, zero chunks, a vanishing temperature: one-line errors or greedy, never
    // an abort, NaN or an overflow.
    let n = native.to_str().unwrap();
    assert!(run_err(&["run", "-m", n, "-p", "Once", "-c", "4000000000000"]).contains("KV cache"));
    let text = dir.join("text.txt");
    std::fs::write(&text, "Once upon a time there was a little girl. ".repeat(40)).unwrap();
    let e = run_err(&["eval", "perplexity", "-m", n, "-f", text.to_str().unwrap(), "--ctx", "16", "--chunks", "0"]);
    assert!(e.contains("--chunks"), "{e}");
    let (tiny, _) = run_ok(&["run", "-m", n, "-p", "Once upon a time", "-n", "20", "--temp", "1e-39"]);
    let (greedy, _) = run_ok(&["run", "-m", n, "-p", "Once upon a time", "-n", "20", "--temp", "0"]);
    assert_eq!(tiny, greedy, "a temperature below 1e-6 samples greedily");
    // Special-token strings in a raw prompt are text unless --special asks for them.
    let (plain, _) = run_ok(&["run", "-m", n, "-p", "<s>Once", "-n", "1"]);
    assert!(plain.starts_with("<s>Once"), "{plain}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn speculative_flags_keep_the_golden_text() {
    let (m, t) = (fixture("stories260K/stories260K.bin"), fixture("stories260K/tok512.bin"));
    let (m, t) = (m.to_str().unwrap(), t.to_str().unwrap());
    let golden = std::fs::read_to_string(fixture("stories260K/golden_once_upon_a_time_steps256.txt")).unwrap();
    let base = ["run", "-m", m, "--tokenizer", t, "-p", "Once upon a time", "-n", "252", "-t", "1", "--spec", "on"];
    let (out, err) = run_ok(&[&base[..], &["--lookup"]].concat());
    assert_eq!(out, golden);
    assert!(err.contains("speculative:") && err.contains("tokens per pass"), "{err}");
    // The model drafting for itself: every draft accepted, the same text.
    let (out, err) = run_ok(&[&base[..], &["--draft", m, "--draft-max", "5"]].concat());
    assert_eq!(out, golden);
    assert!(err.contains("(100 %)"), "{err}");
    assert!(run_err(&[&base[..], &["--draft", m, "--lookup"]].concat()).contains("--lookup"));
    // stories260K has no MTP head: one line saying so.
    let e = run_err(&[&base[..], &["--mtp"]].concat());
    assert!(e.contains("no multi-token-prediction head"), "{e}");

    // A generated model whose MTP head mirrors it (`sprig gen --mtp mirror`): the same text as plain
    // decoding, the head's drafts accepted.
    let dir = std::env::temp_dir().join(format!("sprig-cli-mtp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let g = dir.join("mtp.gguf");
    let g = g.to_str().unwrap();
    run_ok(&["gen", "--arch", "llama", "--format", "gguf", "--layers", "1", "--mtp", "mirror", "-o", g]);
    let e = run_err(&["gen", "--arch", "llama", "--format", "hf", "--mtp", "random", "-o", g]);
    assert!(e.contains("GGUF"), "{e}");
    let base = ["run", "-m", g, "-p", "the cat", "-n", "40", "-t", "1", "--temp", "0"];
    let (plain, _) = run_ok(&base);
    let (out, err) = run_ok(&[&base[..], &["--mtp", "--spec", "on"]].concat());
    assert_eq!(out, plain);
    assert!(err.contains("speculative:") && !err.contains(" 0 accepted"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn chat_reads_turns_from_a_pipe() {
    let dir = std::env::temp_dir().join(format!("sprig-cli-chat-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    run_ok(&["gen", "--arch", "qwen2", "--format", "hf", "-o", dir.to_str().unwrap()]);
    let mut child = sprig()
        .args(["chat", "-m", dir.to_str().unwrap(), "-n", "5", "-t", "1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"the cat\nthe dog\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Two turns, two replies (one line each).
    assert_eq!(String::from_utf8_lossy(&out.stdout).matches('\n').count(), 2);
    // A model without BOS cannot start from an empty prompt: a clear error.
    assert!(run_err(&["run", "-m", dir.to_str().unwrap(), "-p", ""]).contains("empty prompt"));
    // --session: the second invocation restores the first one's conversation and continues it; a damaged
    // file is reported and the chat starts over.
    let session = dir.join("chat.session");
    let chat = |input: &[u8]| {
        let mut child = sprig()
            .args(["chat", "-m", dir.to_str().unwrap(), "-n", "5", "-t", "1", "--session", session.to_str().unwrap()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    chat(b"the cat\n");
    let err = chat(b"the dog\n");
    assert!(err.contains("restored") && err.contains("2 messages"), "{err}");
    std::fs::write(&session, b"garbage").unwrap();
    let err = chat(b"the dog\n");
    assert!(err.contains("not a sprig session") && err.contains("starting a new conversation"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn generated_moe_model_runs_with_expert_stats() {
    let path = std::env::temp_dir().join(format!("sprig-cli-moe-{}.gguf", std::process::id()));
    let p = path.to_str().unwrap();
    run_ok(&[
        "gen",
        "--arch",
        "qwen2moe",
        "--format",
        "gguf",
        "-o",
        p,
        "--layers",
        "3",
        "--experts",
        "8",
        "--top-k",
        "2",
        "--expert-hidden",
        "32",
        "--shared-hidden",
        "48",
        "--dense-layers",
        "1",
    ]);
    let (out, err) = run_ok(&["run", "-m", p, "-p", "the cat", "-n", "6", "--stats", "-t", "1"]);
    assert!(!out.is_empty());
    // One line per MoE layer (layers 1 and 2), none for the dense layer 0.
    assert!(err.contains("expert usage") && err.contains("layer   1:") && err.contains("layer   2:"), "{err}");
    assert!(!err.contains("layer   0:") && err.contains("/8 experts used"), "{err}");
    let (out, _) = run_ok(&["inspect", p]);
    assert!(out.contains("ffn_gate_exps") && out.contains("n_experts"), "{out}");
    let (_, err) = run_ok(&["run", "-m", p, "-p", "x", "-n", "1", "--stats"]);
    assert!(err.contains("layer   2:"));
    // bench counts the experts the router chose (not all of them) and reports the model's peak RSS, taken
    // before its 512 MiB bandwidth probe.
    let (out, _) = run_ok(&["bench", "-m", p, "-p", "8", "-n", "16", "-r", "1", "-t", "1", "--bandwidth", "--json"]);
    let j: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let (bpt, rss) = (j["weight_bytes_per_token"].as_f64().unwrap(), j["peak_rss_bytes"].as_f64().unwrap());
    // The GGUF holds f32 weights, run as they are: its size is every weight once.
    let all = std::fs::metadata(p).unwrap().len();
    assert!(bpt < 0.8 * all as f64, "{bpt} bytes per token of {all}: experts counted whole");
    assert!(rss < 256e6, "peak RSS {rss} includes the bandwidth probe");
    assert!(run_err(&["gen", "--arch", "olmoe", "--format", "gguf", "-o", p]).contains("--experts"));
    assert!(run_err(&["gen", "--arch", "olmoe", "-o", p, "--experts", "4", "--top-k", "5"]).contains("--top-k"));
    // --arch lists the rule book's families.
    let e = run_err(&["gen", "--arch", "gpt2", "-o", p]);
    assert!(e.contains("llama, qwen2, qwen3, gemma3, qwen2moe, qwen3moe, olmoe"), "{e}");
    // Any family generates and runs, Gemma 3 with its own sliding pattern.
    run_ok(&["gen", "--arch", "gemma3", "--layers", "6", "--format", "gguf", "-o", p]);
    let (out, _) = run_ok(&["inspect", p]);
    assert!(out.contains("architecture: gemma3") && out.contains("\"kind\":\"sliding\""), "{out}");
    run_ok(&["run", "-m", p, "-p", "the", "-n", "4"]);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn device_flag_and_devices_command() {
    let (m, t) = (fixture("stories260K/stories260K.bin"), fixture("stories260K/tok512.bin"));
    let (m, t) = (m.to_str().unwrap(), t.to_str().unwrap());
    let e = run_err(&["run", "-m", m, "--tokenizer", t, "-p", "Once", "--device", "tpu"]);
    assert!(e.contains("'tpu'") && e.contains("possible values: cpu, gpu, auto"), "{e}");
    let (out, _) = run_ok(&["devices"]);
    assert!(out.starts_with("cpu: "), "{out}");
    if cfg!(not(feature = "wgpu")) {
        let e = run_err(&["run", "-m", m, "--tokenizer", t, "-p", "Once", "--device", "gpu"]);
        assert!(e.contains("no GPU backend"), "{e}");
        assert!(out.contains("no GPU backend"), "{out}");
        // auto falls back to the CPU and says so.
        let (out, err) =
            run_ok(&["run", "-m", m, "--tokenizer", t, "-p", "Once upon a time", "-n", "8", "--device", "auto"]);
        assert!(err.contains("using the CPU") && !out.is_empty(), "{err}");
    }
}

#[test]
fn kernels_are_measured_cached_and_reported() {
    let dir = std::env::temp_dir().join(format!("sprig-cli-kernels-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let model = dir.join("m.gguf");
    let m = model.to_str().unwrap();
    run_ok(&["gen", "--arch", "llama", "--format", "gguf", "-o", m, "--dim", "128", "--hidden", "256"]);
    let with_cache = |args: &[&str]| {
        let out = sprig().args(args).env("SPRIG_CACHE", &dir).env_remove("SPRIG_CPU").output().unwrap();
        let (so, se) =
            (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
        assert!(out.status.success(), "sprig {args:?}: {se}");
        (so, se)
    };
    // First load: measured (and cached); second: read back from the cache.
    let (_, err) = with_cache(&["run", "-m", m, "--quant", "q4", "-p", "the cat", "-n", "2", "-t", "2", "-v"]);
    assert!(err.contains("CPU kernels: measured now") && err.contains("pick: decode"), "{err}");
    let cached: Vec<_> = std::fs::read_dir(dir.join("kernels")).unwrap().collect();
    assert_eq!(cached.len(), 1, "one cache entry");
    let (_, err) = with_cache(&["run", "-m", m, "--quant", "q4", "-p", "the cat", "-n", "2", "-t", "2", "-v"]);
    assert!(err.contains("measured earlier on this machine"), "{err}");
    // A corrupt entry is ignored (measured again and rewritten), never trusted.
    let entry = cached[0].as_ref().unwrap().path();
    std::fs::write(&entry, "{not json").unwrap();
    let (_, err) = with_cache(&["run", "-m", m, "--quant", "q4", "-p", "the cat", "-n", "2", "-t", "2", "-v"]);
    assert!(err.contains("unreadable") && err.contains("CPU kernels: measured now"), "{err}");
    // bench --kernels prints every candidate (decode with 1 and 2 threads, prefill) and the pick.
    let (out, _) =
        with_cache(&["bench", "-m", m, "--quant", "q4", "-p", "4", "-n", "4", "-r", "1", "-t", "2", "--kernels"]);
    assert!(
        out.contains("decode  scalar   1 thread") && out.contains("prefill scalar") && out.contains("pick:"),
        "{out}"
    );
    // SPRIG_CPU forces one kernel, nothing measured.
    let out = sprig()
        .args(["run", "-m", m, "--quant", "q4", "-p", "x", "-n", "1", "-v"])
        .env("SPRIG_CACHE", &dir)
        .env("SPRIG_CPU", "scalar")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("forced by SPRIG_CPU=scalar"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn constraint_and_tool_flags() {
    let dir = std::env::temp_dir().join(format!("sprig-cli-constrained-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    run_ok(&["gen", "--arch", "qwen2", "--format", "hf", "-o", dir.to_str().unwrap()]);
    let m = dir.to_str().unwrap();
    // A regex: the generated text after the echoed prompt is one of its matches.
    let (out, _) = run_ok(&["run", "-m", m, "-p", "the cat", "-n", "8", "-t", "1", "--regex", "(yes|no)"]);
    let reply = out.strip_prefix("the cat").unwrap_or_else(|| panic!("{out}"));
    assert!(reply == "yes\n" || reply == "no\n", "{out:?}");
    // Bad constraints and tools: one-line errors before anything is generated.
    let bad_schema = dir.join("bad.json");
    std::fs::write(&bad_schema, r#"{"type": 3}"#).unwrap();
    let err = run_err(&["run", "-m", m, "-p", "x", "--json-schema", bad_schema.to_str().unwrap()]);
    assert!(err.contains("invalid json_schema constraint"), "{err}");
    assert!(run_err(&["run", "-m", m, "-p", "x", "--json-schema", "/nonexistent.json"]).contains("reading"));
    // Two constraints, a tool choice without tools: refused by the argument parser (its usage message).
    for args in [&["--regex", "a", "--json"][..], &["--tool-choice", "required"][..]] {
        let out = sprig().args(["run", "-m", m, "-p", "x"]).args(args).output().unwrap();
        assert!(!out.status.success() && !String::from_utf8_lossy(&out.stderr).contains("panicked"), "{args:?}");
    }
    let bad_tools = dir.join("tools.json");
    std::fs::write(&bad_tools, "{}").unwrap();
    let err = run_err(&["run", "-m", m, "-p", "x", "--tools", bad_tools.to_str().unwrap()]);
    assert!(err.contains("tools must be an array"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
