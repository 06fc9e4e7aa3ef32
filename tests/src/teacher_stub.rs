//! A stub OpenAI-compatible teacher for the tests of escalation and remote scoring (127.0.0.1, an ephemeral
//! port; its threads end with the test process): streamed chat answers that succeed or fail in the ways a
//! real endpoint can, and `/v1/completions` echo scoring with log-probabilities a test supplies.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use sprig_engine::TokenLogprob;
use sprig_remote::Endpoint;

/// How the stub answers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// A streamed chat answer, then `[DONE]`.
    Answer,
    /// HTTP 500 in OpenAI's error shape.
    ServerError,
    /// 200 with events that are not JSON.
    Malformed,
    /// Nothing for 5 s.
    Slow,
    /// Two pieces, then the connection closes without `[DONE]`.
    BrokenStream,
}

pub const TEACHER_TEXT: [&str; 3] = ["Hello", " from the", " teacher."];

/// Scores a sequence: the log-probability entry of each token after the first, with the top `k`.
pub type Scorer = dyn Fn(&[u32], usize) -> Vec<TokenLogprob> + Send + Sync;

pub struct Stub {
    port: u16,
    mode: Arc<Mutex<Mode>>,
    /// Requests served so far.
    pub requests: Arc<AtomicUsize>,
    /// The last request body.
    pub last: Arc<Mutex<Value>>,
}

impl Stub {
    /// Serves chat answers as its mode says (at first [`Mode::Answer`]) and scores sequences with `scorer`.
    pub fn start(scorer: Option<Arc<Scorer>>) -> Stub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(Mutex::new(Mode::Answer));
        let requests = Arc::new(AtomicUsize::new(0));
        let last = Arc::new(Mutex::new(Value::Null));
        let (m, r, l) = (mode.clone(), requests.clone(), last.clone());
        // The thread ends with the test process (it only ever waits on this listener).
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (m, r, l, t) = (m.clone(), r.clone(), l.clone(), scorer.clone());
                std::thread::spawn(move || serve(conn, *m.lock().unwrap(), &r, &l, t.as_deref()));
            }
        });
        Stub { port, mode, requests, last }
    }
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    pub fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }
    pub fn endpoint(&self, timeout: Duration) -> Endpoint {
        let mut e = Endpoint::new(&self.url(), "stub-teacher").unwrap();
        e.timeout = timeout;
        e
    }
}

fn serve(mut conn: TcpStream, mode: Mode, requests: &AtomicUsize, last: &Mutex<Value>, scorer: Option<&Scorer>) {
    requests.fetch_add(1, Ordering::SeqCst);
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut len = 0;
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).unwrap();
        if h == "\r\n" || h.is_empty() {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; len];
    reader.read_exact(&mut body).unwrap();
    let req: Value = serde_json::from_slice(&body).unwrap();
    *last.lock().unwrap() = req.clone();
    let head =
        |status: &str, ctype: &str| format!("HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nConnection: close\r\n\r\n");
    if path == "/v1/completions" {
        // Scoring: the teacher's log-probabilities of the given ids, keyed `token_id:N`.
        let ids: Vec<u32> = req["prompt"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let k = req["logprobs"].as_u64().unwrap() as usize;
        assert_eq!((req["echo"].as_bool(), req["max_tokens"].as_u64()), (Some(true), Some(0)));
        assert_eq!(req["return_tokens_as_token_ids"].as_bool(), Some(true));
        let entries = scorer.expect("a scorer for /v1/completions")(&ids, k);
        let mut lps = vec![Value::Null];
        let mut tops = vec![Value::Null];
        for e in &entries {
            lps.push(json!(e.logprob));
            tops.push(Value::Object(e.top.iter().map(|&(t, l)| (format!("token_id:{t}"), json!(l))).collect()));
        }
        let tokens: Vec<String> = ids.iter().map(|t| format!("token_id:{t}")).collect();
        let reply = json!({"choices": [{"text": "", "index": 0, "finish_reason": "length",
            "logprobs": {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops}}]});
        let _ = write!(conn, "{}{}", head("200 OK", "application/json"), reply);
        return;
    }
    assert_eq!(path, "/v1/chat/completions");
    assert_eq!(req["stream"].as_bool(), Some(true));
    let chunk = |t: &str| format!("data: {}\n\n", json!({"choices": [{"index": 0, "delta": {"content": t}}]}));
    match mode {
        Mode::Answer => {
            let _ = write!(conn, "{}", head("200 OK", "text/event-stream"));
            for t in TEACHER_TEXT {
                let _ = write!(conn, "{}", chunk(t));
                let _ = conn.flush();
            }
            let _ = write!(conn, "data: [DONE]\n\n");
        }
        Mode::ServerError => {
            let err = json!({"error": {"message": "the teacher is overloaded", "type": "server_error"}});
            let _ = write!(conn, "{}{}", head("500 Internal Server Error", "application/json"), err);
        }
        Mode::Malformed => {
            let _ = write!(conn, "{}data: {{not json\n\n", head("200 OK", "text/event-stream"));
        }
        Mode::Slow => {
            std::thread::sleep(Duration::from_secs(5));
            let _ = write!(conn, "{}", head("200 OK", "text/event-stream"));
        }
        Mode::BrokenStream => {
            let _ = write!(conn, "{}{}{}", head("200 OK", "text/event-stream"), chunk("Partial"), chunk(" answer"));
        }
    }
}
