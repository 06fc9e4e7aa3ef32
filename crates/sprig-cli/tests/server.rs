//! `sprig serve` as clients see it: the official `openai` Python package against it, raw HTTP with bad input,
//! several models, and a bounded soak with clients that hang up mid-stream. Servers bind to 127.0.0.1 on a
//! port the system picks and are killed when their test ends (also when it fails).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

mod common;
use common::*;

const MODEL: &str = "smollm2-135m-instruct";
const KEY: &str = "test-key-7f3a";
/// The SDK the tests run, pinned (with what it installs: its pydantic, and httpx2 for the soak's client).
const OPENAI_PACKAGE: &str = "openai==3.51.0";

fn auth() -> (&'static str, String) {
    ("Authorization", format!("Bearer {KEY}"))
}

fn post(addr: &str, path: &str, body: &[u8]) -> (u16, String) {
    let (k, v) = auth();
    http(addr, "POST", path, &[(k, &v), ("Content-Type", "application/json")], body)
}

/// Asserts an OpenAI-shaped error with `status`; returns the error object.
fn api_error(r: (u16, String), status: u16) -> serde_json::Value {
    assert_eq!(r.0, status, "{}", r.1);
    let v: serde_json::Value = serde_json::from_str(&r.1).unwrap_or_else(|e| panic!("{e}: {}", r.1));
    let e = v["error"].clone();
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()) && e["type"].is_string(), "{v}");
    e
}

/// A venv with the `openai` package, made once per cache (under a lock: the tests of this file run in
/// parallel).
fn python() -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let cache = std::env::var_os("SPRIG_CACHE").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").expect("HOME or SPRIG_CACHE")).join(".cache/sprig")
    });
    let venv = cache.join("venvs").join(OPENAI_PACKAGE.replace("==", "-"));
    let py = venv.join("bin/python");
    if py.exists() {
        return py;
    }
    let tmp = cache.join("venvs").join(format!(".tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let ok = Command::new("python3").args(["-m", "venv"]).arg(&tmp).status().is_ok_and(|s| s.success());
    assert!(ok, "python3 -m venv failed (Debian/Ubuntu: apt-get install python3-venv)");
    let ok = Command::new(tmp.join("bin/python"))
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", OPENAI_PACKAGE])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "pip install {OPENAI_PACKAGE} failed");
    std::fs::rename(&tmp, &venv).unwrap();
    py
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/server").join(name)
}

#[test]
fn the_openai_python_sdk_works_unchanged() {
    let py = python();
    // With speculative decoding (prompt lookup, always on): requests that decode alone speculate, and every
    // answer must be as without it (greedy repeatability, streaming equal to the whole, logprobs per token).
    let server = Server::start(&["-m", MODEL, "--api-key", KEY, "-t", "2", "--lookup", "--spec", "on"]);
    let out = Command::new(py).arg(script("openai_client.py")).args([&server.url(), KEY, MODEL]).output().unwrap();
    let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && so.contains("all ok"), "{so}\n{se}");
    let (_, metrics) = http(&server.addr, "GET", "/metrics", &[("Authorization", &auth().1)], b"");
    let drafted = metrics
        .lines()
        .find(|l| l.starts_with("sprig_drafted_tokens_total"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
    assert!(drafted.is_some_and(|d| d > 0.0), "no speculation ran: {metrics}");
}

#[test]
fn bad_requests_get_the_right_4xx_and_the_server_keeps_serving() {
    let dir = std::env::temp_dir().join(format!("sprig-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A second model: a small synthetic one.
    let tiny = dir.join("tiny.gguf");
    run_ok(&["gen", "--arch", "qwen2", "--format", "gguf", "-o", tiny.to_str().unwrap()]);
    let s = Server::start(&["-m", MODEL, "-m", tiny.to_str().unwrap(), "--api-key", KEY, "--ctx-size", "256", "--max-tokens", "64"]);
    let a = &s.addr;
    let chat = |extra: &str| format!(r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"Hi"}}],"max_tokens":4{extra}}}"#);

    // Health needs no key; everything else does, and a wrong key is as good as none.
    assert_eq!(http(a, "GET", "/health", &[], b"").0, 200);
    let e = api_error(http(a, "GET", "/v1/models", &[], b""), 401);
    assert_eq!(e["code"], "invalid_api_key");
    api_error(http(a, "GET", "/v1/models", &[("Authorization", "Bearer wrong")], b""), 401);
    api_error(http(a, "POST", "/v1/chat/completions", &[("Authorization", KEY)], chat("").as_bytes()), 401);
    api_error(http(a, "GET", "/metrics", &[], b""), 401);

    // Both models listed; `model` picks one; an unknown one is a 404.
    let (k, key) = auth();
    let (st, body) = http(a, "GET", "/v1/models", &[(k, &key)], b"");
    assert_eq!(st, 200);
    let ids: Vec<String> = serde_json::from_str::<serde_json::Value>(&body).unwrap()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, [MODEL, "tiny"]);
    let (st, body) = post(a, "/v1/completions", br#"{"model":"tiny","prompt":"abc","max_tokens":3,"temperature":0}"#);
    assert_eq!(st, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["model"], "tiny");
    assert!(v["usage"]["completion_tokens"].as_u64() <= Some(3) && v["usage"]["prompt_tokens"].as_u64() > Some(0), "{v}");
    let (st, body) = post(a, "/v1/chat/completions", br#"{"model":"tiny","messages":[{"role":"user","content":"x"}],"max_tokens":2}"#);
    assert_eq!(st, 200, "{body}");
    assert!(body.contains(r#""model":"tiny""#), "{body}");
    let e = api_error(post(a, "/v1/chat/completions", chat("").replace(MODEL, "gpt-4o").as_bytes()), 404);
    assert_eq!(e["code"], "model_not_found");

    // Malformed JSON, not an object, wrong types, unknown fields, invalid UTF-8.
    api_error(post(a, "/v1/chat/completions", br#"{"model": "#), 400);
    api_error(post(a, "/v1/chat/completions", b"[1, 2]"), 400);
    api_error(post(a, "/v1/chat/completions", br#"{"model":"x","messages":"hi"}"#), 400);
    api_error(post(a, "/v1/chat/completions", chat(r#","temperature":"hot""#).as_bytes()), 400);
    api_error(post(a, "/v1/chat/completions", chat(r#","max_tokens":-1"#).replace(r#""max_tokens":4,"#, "").as_bytes()), 400);
    let e = api_error(post(a, "/v1/chat/completions", chat(r#","frobnicate":1"#).as_bytes()), 400);
    assert_eq!(e["param"], "frobnicate");
    let mut bad_utf8 = chat("").into_bytes();
    let at = bad_utf8.windows(2).position(|w| w == b"Hi").unwrap();
    bad_utf8[at] = 0xff;
    let e = api_error(post(a, "/v1/chat/completions", &bad_utf8), 400);
    assert!(e["message"].as_str().unwrap().contains("UTF-8"), "{e}");
    // Out-of-range and unsupported parameters name the parameter.
    for (extra, param) in [
        (r#","temperature":3"#, "temperature"),
        (r#","top_p":0"#, "top_p"),
        (r#","n":2"#, "n"),
        (r#","logit_bias":{"999999999":1}"#, "logit_bias"),
        (r#","top_logprobs":3"#, "top_logprobs"),
        (r#","stop":["a","b","c","d","e"]"#, "stop"),
        (r#","tool_choice":"auto""#, "tool_choice"),
        (r#","tools":[{"type":"function","function":{"name":"bad name!"}}]"#, "tools"),
    ] {
        let e = api_error(post(a, "/v1/chat/completions", chat(extra).as_bytes()), 400);
        assert_eq!(e["param"], param, "{extra}: {e}");
    }
    let e = api_error(post(a, "/v1/chat/completions", br#"{"model":"x","messages":[{"role":"wizard","content":"x"}]}"#), 404);
    assert_eq!(e["code"], "model_not_found", "the model is looked up before the messages");
    let e = api_error(post(a, "/v1/chat/completions", chat("").replace("user", "wizard").as_bytes()), 400);
    assert_eq!(e["param"], "messages[0].role");
    // Limits: max_tokens above the server's ceiling, a prompt longer than the context, a huge body.
    let e = api_error(post(a, "/v1/chat/completions", chat("").replace(r#""max_tokens":4"#, r#""max_tokens":65"#).as_bytes()), 400);
    assert!(e["message"].as_str().unwrap().contains("at most 64"), "{e}");
    let long = chat("").replace("Hi", &"word ".repeat(400));
    let e = api_error(post(a, "/v1/chat/completions", long.as_bytes()), 400);
    assert_eq!(e["code"], "context_length_exceeded", "{e}");
    assert!(e["message"].as_str().unwrap().contains("maximum context length is 256 tokens"), "{e}");
    let huge = chat("").replace("Hi", &"x".repeat(2 << 20));
    api_error(post(a, "/v1/chat/completions", huge.as_bytes()), 413);
    // Wrong method, unknown path.
    api_error(http(a, "GET", "/v1/chat/completions", &[(k, &key)], b""), 405);
    api_error(http(a, "GET", "/v1/nothing", &[(k, &key)], b""), 404);

    // A client that hangs up on a non-streamed request cancels it (the soak test covers streamed ones).
    {
        let mut c = TcpStream::connect(a).unwrap();
        // The end-of-turn and end-of-text tokens banned: it would run to the server's ceiling of 64 tokens.
        let body = chat("").replace(r#""max_tokens":4"#, r#""max_tokens":64,"logit_bias":{"0":-100,"2":-100}"#);
        let req = format!("POST /v1/chat/completions HTTP/1.1\r\nHost: {a}\r\nAuthorization: {key}\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        c.write_all(req.as_bytes()).unwrap();
        // Hang up once it is generating.
        let generating = (0..300).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            http(a, "GET", "/metrics", &[(k, &key)], b"").1.contains(r#"sprig_active_requests{model="smollm2-135m-instruct"} 1"#)
        });
        if !generating {
            let mut out = String::new();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = c.read_to_string(&mut out);
            panic!("the request never started: {out}");
        }
    }
    let cancelled = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        let (_, m) = http(a, "GET", "/metrics", &[(k, &key)], b"");
        m.contains(r#"sprig_cancelled_requests_total{model="smollm2-135m-instruct"} 1"#)
            && m.contains(r#"sprig_active_requests{model="smollm2-135m-instruct"} 0"#)
    });
    assert!(cancelled, "the hung-up request was not cancelled: {}", http(a, "GET", "/metrics", &[(k, &key)], b"").1);

    // Still serving, and the refusals were counted.
    let (st, body) = post(a, "/v1/chat/completions", chat(r#","temperature":0"#).as_bytes());
    assert_eq!(st, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["choices"][0]["message"]["content"].is_string() && v["usage"]["prompt_tokens"].as_u64() > Some(0), "{v}");
    let (st, metrics) = http(a, "GET", "/metrics", &[(k, &key)], b"");
    assert_eq!(st, 200);
    for want in [
        r#"sprig_http_requests_total{route="/v1/chat/completions",code="400"}"#,
        r#"sprig_http_requests_total{route="/v1/chat/completions",code="413"}"#,
        r#"sprig_http_requests_total{route="/v1/models",code="401"}"#,
        r#"sprig_generated_tokens_total{model="smollm2-135m-instruct"}"#,
        r#"sprig_time_to_first_token_seconds_count{model="smollm2-135m-instruct"}"#,
        r#"sprig_active_requests{model="smollm2-135m-instruct"} 0"#,
    ] {
        assert!(metrics.contains(want), "no {want} in\n{metrics}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// 1,000 requests, 16 at a time, a tenth of them streamed and dropped mid-stream (see tests/server/soak.py).
/// The prefix cache's budget is small so that it is full (evicting) well before the first 100 requests end:
/// memory that grows after that is a leak, not the cache filling up.
#[test]
fn soak_with_clients_hanging_up() {
    let py = python();
    let s = Server::start(&["-m", MODEL, "--api-key", KEY, "-t", "2", "--prefix-cache", "16", "--max-concurrent", "16"]);
    let out = Command::new(py).arg(script("soak.py")).args([&s.url(), KEY, MODEL, &s.rss_pid(), "1000", "16"]).output().unwrap();
    let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{so}");
    assert!(out.status.success(), "{so}\n{se}");
}

#[test]
fn serve_drafts_with_a_models_mtp_head() {
    // A model without a head: a start-up error (after the model's load line), before listening.
    let out = sprig().args(["serve", "-m", MODEL, "--mtp"]).output().unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(1) && e.contains("error: --mtp: this model has no multi-token-prediction head"), "{e}");
    // A generated model whose head mirrors it: the same greedy completion with and without it, drafts accepted.
    let dir = std::env::temp_dir().join(format!("sprig-serve-mtp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let g = dir.join("mtp.gguf");
    let g = g.to_str().unwrap();
    run_ok(&["gen", "--arch", "llama", "--format", "gguf", "--layers", "1", "--mtp", "mirror", "-o", g]);
    let body = r#"{"model":"mtp","prompt":"the cat sat","max_tokens":32,"temperature":0}"#;
    let complete = |args: &[&str]| {
        let s = Server::start(&[&["-m", g, "--api-key", KEY, "-t", "1"], args].concat());
        let (k, key) = auth();
        let (st, out) = http(&s.addr, "POST", "/v1/completions", &[(k, &key)], body.as_bytes());
        assert_eq!(st, 200, "{out}");
        let text = serde_json::from_str::<serde_json::Value>(&out).unwrap()["choices"][0]["text"].as_str().unwrap().to_string();
        let (_, metrics) = http(&s.addr, "GET", "/metrics", &[(k, &key)], b"");
        let counter = |name: &str| {
            metrics.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).unwrap_or(0.0)
        };
        (text, counter("sprig_drafted_tokens_total"), counter("sprig_accepted_tokens_total"))
    };
    let (plain, _, _) = complete(&[]);
    let (text, drafted, accepted) = complete(&["--mtp", "--spec", "on"]);
    assert_eq!(text, plain);
    assert!(drafted > 0.0 && accepted > 0.0, "drafted {drafted}, accepted {accepted}");
    let _ = std::fs::remove_dir_all(&dir);
}
