//! `sprig distill` and escalation through the CLI and the server, on synthetic models (a student and a teacher
//! of one vocabulary, and a model of another): bad input gets one clear line; a teacher behind `sprig serve`
//! scores as the same teacher loaded locally does (within what top-k leaves out); traces are complete JSON
//! lines and a cut-short run resumes; `sprig serve --escalate-to` answers with the teacher's words, or its own
//! when the teacher is gone.

use std::path::{Path, PathBuf};

use serde_json::Value;

mod common;
use common::*;

/// Student (seed 3) and teacher (seed 5) of one vocabulary, and a model of another vocabulary.
fn models(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use sprig_import::synth::{write_gguf, Arch, SynthSpec};
    std::fs::create_dir_all(dir).unwrap();
    let spec = |seed| SynthSpec { seed, context: 512, ..SynthSpec::tiny(Arch::Qwen2) };
    let (s, t, o) = (dir.join("student.gguf"), dir.join("teacher.gguf"), dir.join("other.gguf"));
    write_gguf(&spec(3), &s).unwrap();
    write_gguf(&spec(5), &t).unwrap();
    write_gguf(&SynthSpec { vocab: Some(300), ..spec(7) }, &o).unwrap();
    (s, t, o)
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("sprig-distill-cli-{name}-{}", std::process::id()))
}

fn write(path: &Path, text: &str) -> String {
    std::fs::write(path, text).unwrap();
    path.display().to_string()
}

fn jsonl(text: &str) -> Vec<Value> {
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect()
}

fn post(addr: &str, path: &str, body: &[u8]) -> (u16, String) {
    http(addr, "POST", path, &[("Content-Type", "application/json")], body)
}

fn get(addr: &str, path: &str) -> (u16, String) {
    http(addr, "GET", path, &[], b"")
}

/// Sampled at length: the random models rarely end a reply early.
const SAMPLING: [&str; 4] = ["--temp", "0.9", "--seed", "11"];

#[test]
fn distill_eval_refuses_bad_input() {
    let dir = tmp("bad");
    let (s, t, o) = models(&dir);
    let (s, t, o) = (s.to_str().unwrap(), t.to_str().unwrap(), o.to_str().unwrap());
    let good = write(&dir.join("good.jsonl"), "{\"prompt\": \"abc\"}\n");
    let eval = |teacher: &[&str], file: &str| {
        let mut a = vec!["distill", "eval", "--student", s, "-f", file, "-n", "4"];
        a.extend_from_slice(teacher);
        run_err(&a)
    };
    for (text, want) in [
        ("{\"prompt\": \"abc\"}\nnot json\n", "good.jsonl:2: not JSON"),
        ("", "no prompts"),
        ("\n\n", "no prompts"),
        ("{\"text\": \"abc\"}\n", "expected an object with a `prompt` string"),
        ("{\"prompt\": 3}\n", "expected an object with a `prompt` string"),
        ("{\"prompt\": \"  \"}\n", "the prompt is empty"),
        ("{\"prompt\": \"a\", \"id\": [1]}\n", "`id` must be a string or a number"),
    ] {
        let f = write(&dir.join("good.jsonl"), text);
        let e = eval(&["--teacher", t], &f);
        assert!(e.contains(want), "{text:?}: {e}");
    }
    let good = write(Path::new(&good), "{\"prompt\": \"abc\"}\n");
    let e = eval(&["--teacher", o], &good);
    assert!(e.contains("vocabulary differs"), "{e}");
    let e = eval(&["--teacher", t, "--thresholds=-1"], &good);
    assert!(e.contains("--thresholds"), "{e}");
    let e = eval(&["--teacher", "/nonexistent/teacher.gguf"], &good);
    assert!(e.contains("teacher.gguf"), "{e}");
    let e = eval(&["--teacher", t], &dir.join("missing.jsonl").display().to_string());
    assert!(e.contains("missing.jsonl"), "{e}");
    // A teacher endpoint nobody serves, one of another protocol, and a top-k of 0.
    let e = eval(&["--teacher-url", "http://127.0.0.1:1", "--teacher-timeout", "2"], &good);
    assert!(e.contains("offline"), "{e}");
    let e = eval(&["--teacher-url", "ftp://teacher"], &good);
    assert!(e.contains("http://"), "{e}");
    let e = eval(&["--teacher-url", "http://127.0.0.1:1", "--teacher-top-k", "0"], &good);
    assert!(e.contains("--teacher-top-k"), "{e}");
    // Both teachers, or none.
    let e = run_err(&["distill", "eval", "--student", s, "-f", &good, "--teacher", t, "--teacher-url", "http://x"]);
    assert!(e.contains("cannot be used with"), "{e}");
    let e = run_err(&["distill", "eval", "--student", s, "-f", &good]);
    assert!(e.contains("--teacher"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_teacher_behind_sprig_serve_scores_as_the_local_teacher() {
    let dir = tmp("remote");
    let (s, t, _) = models(&dir);
    let (s, t) = (s.to_str().unwrap(), t.to_str().unwrap());
    let prompts =
        write(&dir.join("p.jsonl"), "{\"prompt\": \"the cat\"}\n{\"prompt\": \"on a mat\", \"id\": \"two\"}\n");
    let server = Server::start(&["-m", t, "-t", "1"]);
    let root = format!("http://{}", server.addr);
    let common = ["distill", "eval", "--student", s, "-f", &prompts, "-n", "12", "--jsonl", "-t", "1"];
    let with = |teacher: &[&str]| {
        let mut a: Vec<&str> = common.to_vec();
        a.extend_from_slice(teacher);
        a.extend_from_slice(&SAMPLING);
        jsonl(&run_ok(&a).0)
    };
    let local = with(&["--teacher", t]);
    let remote = with(&["--teacher-url", &root, "--teacher-model", "teacher", "--teacher-top-k", "20"]);
    assert_eq!(local.len(), 3, "two prompts and the summary");
    for (l, r) in local[..2].iter().zip(&remote[..2]) {
        assert_eq!(l["reply"], r["reply"], "the student's replies are the same");
        assert_eq!(l["tokens"], r["tokens"]);
        let f = |v: &Value, k: &str| v[k].as_f64().unwrap();
        assert!((f(l, "teacher_nll") - f(r, "teacher_nll")).abs() < 1e-4, "{l} vs {r}");
        assert!((f(l, "greedy_agreement") - f(r, "greedy_agreement")).abs() < 1e-9, "{l} vs {r}");
        // Top 20 of the teacher with the rest as one bucket: never more than the full KL.
        for (a, b) in l["per_token_kl"].as_array().unwrap().iter().zip(r["per_token_kl"].as_array().unwrap()) {
            assert!(b.as_f64().unwrap() <= a.as_f64().unwrap() + 1e-5, "{b} above the full KL {a}");
        }
        assert!(f(r, "mean_kl") > 0.0);
    }
    assert_eq!(local[1]["id"], "two");
    let curve = local[2]["summary"]["escalation_curve"].as_array().unwrap();
    assert_eq!(curve.len(), 3);
    // A higher threshold never escalates more turns.
    let shares: Vec<f64> = curve.iter().map(|c| c["escalated"].as_f64().unwrap()).collect();
    assert!(shares.windows(2).all(|w| w[0] >= w[1]), "{shares:?}");
    // The server refuses what a teacher must not be asked: a token past its vocabulary, streaming a score.
    let (code, body) = post(
        &server.addr,
        "/v1/completions",
        br#"{"model": "teacher", "prompt": [1, 999999], "max_tokens": 0, "echo": true, "logprobs": 2}"#,
    );
    assert!(code == 400 && body.contains("past the vocabulary"), "{code} {body}");
    let (code, body) = post(
        &server.addr,
        "/v1/completions",
        br#"{"model": "teacher", "prompt": [1, 2], "max_tokens": 3, "echo": true, "logprobs": 2}"#,
    );
    assert!(code == 400 && body.contains("max_tokens"), "{code} {body}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn collect_writes_whole_trace_lines_and_resumes() {
    let dir = tmp("collect");
    let (s, t, _) = models(&dir);
    let (s, t) = (s.to_str().unwrap(), t.to_str().unwrap());
    let prompts = dir.join("p.jsonl");
    write(&prompts, "{\"prompt\": \"the cat\"}\n{\"prompt\": \"a dog\"}\n");
    let out = dir.join("traces.jsonl");
    let (p, o) = (prompts.to_str().unwrap(), out.to_str().unwrap());
    let args = [
        "distill",
        "collect",
        "--student",
        s,
        "--teacher",
        t,
        "-f",
        p,
        "-o",
        o,
        "--samples",
        "2",
        "--logprobs",
        "5",
        "-n",
        "8",
        "-t",
        "1",
    ];
    let collect = || {
        let mut a = args.to_vec();
        a.extend_from_slice(&SAMPLING);
        run_ok(&a)
    };
    collect();
    let first = std::fs::read_to_string(&out).unwrap();
    let lines = jsonl(&first);
    assert_eq!(lines.len(), 4);
    let ids: Vec<&str> = lines.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["1#0", "1#1", "2#0", "2#1"]);
    for l in &lines {
        let n = l["completion_token_ids"].as_array().unwrap().len();
        assert!(n > 0);
        for k in ["student_logprobs", "teacher_logprobs", "student_top_logprobs", "teacher_top_logprobs"] {
            assert_eq!(l[k].as_array().unwrap().len(), n, "{k}");
        }
        for top in l["teacher_top_logprobs"].as_array().unwrap() {
            let lps: Vec<f64> = top.as_array().unwrap().iter().map(|e| e[1].as_f64().unwrap()).collect();
            assert!(lps.len() == 5 && lps.windows(2).all(|w| w[0] >= w[1]) && lps[0] <= 0.0, "{top}");
        }
        assert_eq!(l["meta"]["student"]["sha256"].as_str().unwrap().len(), 64);
        assert_eq!(l["meta"]["top_k"], 5);
    }
    // Two samples of one prompt are drawn with different seeds.
    assert_ne!(lines[0]["meta"]["sampling"]["seed"], lines[1]["meta"]["sampling"]["seed"]);
    // A crash mid-line, then a new prompt: the cut line goes, only what is missing is collected.
    std::fs::write(&out, format!("{first}{{\"id\": \"2#")).unwrap();
    write(&prompts, "{\"prompt\": \"the cat\"}\n{\"prompt\": \"a dog\"}\n{\"prompt\": \"x\", \"id\": \"new\"}\n");
    let (_, log) = collect();
    assert!(log.contains("removing a last line cut short") && log.contains("4 traces"), "{log}");
    let second = std::fs::read_to_string(&out).unwrap();
    assert!(second.starts_with(&first), "earlier traces are kept as they were");
    let ids: Vec<String> = jsonl(&second).iter().map(|l| l["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids, ["1#0", "1#1", "2#0", "2#1", "new#0", "new#1"]);
    // Run again: nothing left to do, nothing written.
    collect();
    assert_eq!(std::fs::read_to_string(&out).unwrap(), second);
    // An output file that is not a traces file is refused, not appended to.
    for (text, want) in [("not json\n", "not JSON"), ("{\"prompt\": \"x\"}\n", "without an `id`")] {
        let other = dir.join("other.jsonl");
        std::fs::write(&other, text).unwrap();
        let mut a = args.to_vec();
        a[9] = other.to_str().unwrap();
        let e = run_err(&a);
        assert!(e.contains(want), "{e}");
        assert_eq!(std::fs::read_to_string(&other).unwrap(), text);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn serve_escalates_to_a_teacher_and_falls_back_when_it_is_gone() {
    let dir = tmp("serve");
    let (s, t, _) = models(&dir);
    let (s, t) = (s.to_str().unwrap(), t.to_str().unwrap());
    let teacher = Server::start(&["-m", t, "-t", "1"]);
    let ask = br#"{"model": "student", "messages": [{"role": "user", "content": "the cat"}], "max_tokens": 12, "temperature": 0}"#;
    let teacher_ask = String::from_utf8_lossy(ask).replace("\"student\"", "\"teacher\"");
    let (code, body) = post(&teacher.addr, "/v1/chat/completions", teacher_ask.as_bytes());
    assert_eq!(code, 200, "{body}");
    let teachers: Value = serde_json::from_str(&body).unwrap();
    let teachers = teachers["choices"][0]["message"]["content"].as_str().unwrap().to_string();

    let url = format!("http://{}", teacher.addr);
    let student = Server::start(&["-m", s, "-t", "1", "--escalate-to", &url, "--escalate-policy", "always"]);
    let (code, body) = post(&student.addr, "/v1/chat/completions", ask);
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"].as_str().unwrap(), teachers, "the teacher's answer");
    // Streamed: the same words, piece by piece.
    let streamed = String::from_utf8_lossy(ask).replace("\"temperature\": 0", "\"temperature\": 0, \"stream\": true");
    let (code, body) = post(&student.addr, "/v1/chat/completions", streamed.as_bytes());
    assert_eq!(code, 200);
    let text: String = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| v["choices"][0]["delta"]["content"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, teachers);

    // The teacher gone: the student answers as it does without escalation, and says so in its metrics.
    let alone = Server::start(&["-m", s, "-t", "1"]);
    let (_, body) = post(&alone.addr, "/v1/chat/completions", ask);
    let own: Value = serde_json::from_str(&body).unwrap();
    drop(teacher);
    let orphan = Server::start(&[
        "-m",
        s,
        "-t",
        "1",
        "--escalate-to",
        &url,
        "--escalate-policy",
        "always",
        "--escalate-timeout",
        "2",
    ]);
    let (code, body) = post(&orphan.addr, "/v1/chat/completions", ask);
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], own["choices"][0]["message"]["content"]);
    let (_, metrics) = get(&orphan.addr, "/metrics");
    assert!(metrics.contains(r#"sprig_escalated_requests_total{model="student",outcome="fallback"} 1"#), "{metrics}");
    // Threshold 0: every turn escalates (the signal is above 0 for a random model), nobody answers, the student does.
    let eager = Server::start(&[
        "-m",
        s,
        "-t",
        "1",
        "--escalate-to",
        &url,
        "--escalate-threshold",
        "0",
        "--escalate-window",
        "4",
        "--escalate-timeout",
        "2",
    ]);
    let (code, body) = post(&eager.addr, "/v1/chat/completions", ask);
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let got = v["choices"][0]["message"]["content"].as_str().unwrap();
    let mine = own["choices"][0]["message"]["content"].as_str().unwrap();
    let start: String = got.chars().take(2).collect();
    assert!(!got.is_empty() && mine.starts_with(&start), "{got:?} vs {mine:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
