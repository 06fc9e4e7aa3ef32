//! A device's way to its cloud teacher: an OpenAI-compatible endpoint (vLLM or SGLang in production,
//! `sprig serve` or a test's stub here).
//!
//! Two uses, each with what it needs from the server:
//! - **Escalation** ([`Endpoint`] as a [`Teacher`]): `POST /v1/chat/completions` with `stream: true`
//!   (server-sent events, `choices[0].delta.content`, ending with `data: [DONE]`).
//! - **Scoring a student's tokens** ([`Endpoint::score`]): `POST /v1/completions` with the sequence as token
//!   ids (`prompt: [ids]`), `echo: true`, `max_tokens: 0`, `logprobs: k` and vLLM's
//!   `return_tokens_as_token_ids: true`, so that every position's log-probability and top-k alternatives come
//!   back keyed by token id (`"token_id:N"`), not by text that would have to be tokenized again. vLLM supports
//!   all of it (its `--max-logprobs` bounds k, 20 by default); so does `sprig serve`.
//!
//! Every failure is a [`RemoteError`] that says what happened (offline, timeout, status, malformed reply);
//! nothing here retries or waits longer than the endpoint's timeout.

use std::io::{BufRead, BufReader};
use std::time::Duration;

use serde_json::{json, Value};
use sprig_engine::escalate::{Teacher, TeacherError};
use sprig_engine::{ChatMessage, SamplingParams};

/// What went wrong talking to the endpoint.
#[derive(Debug, Clone, PartialEq)]
pub enum RemoteError {
    /// No connection: refused, unreachable, name not found.
    Offline(String),
    /// No (complete) answer within the endpoint's timeout.
    Timeout,
    /// An HTTP error status, with the server's message when it sent one.
    Status(u16, String),
    /// A reply that is not what the protocol says (not JSON, missing fields, a stream that broke off).
    Malformed(String),
    /// A bad argument on this side (an invalid URL).
    Invalid(String),
}

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RemoteError::Offline(m) => write!(f, "offline: {m}"),
            RemoteError::Timeout => write!(f, "timed out"),
            RemoteError::Status(s, m) => write!(f, "HTTP {s}: {m}"),
            RemoteError::Malformed(m) => write!(f, "malformed reply: {m}"),
            RemoteError::Invalid(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for RemoteError {}

/// An OpenAI-compatible endpoint.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// Up to and including `/v1`, no trailing slash.
    base: String,
    /// `model` of every request (servers serving one model accept any).
    pub model: String,
    /// Sent as `Authorization: Bearer …`.
    pub api_key: Option<String>,
    /// Longest a request may take, connection to last byte.
    pub timeout: Duration,
}

/// Longest a request may take unless the caller says.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// One position of a scored sequence: the teacher's log-probability of the token there, and its most likely
/// tokens there (most likely first).
pub use sprig_engine::distill::TeacherPosition as ScoredPosition;

impl Endpoint {
    /// `url` is the server's root (`http://host:port`) or its `/v1`.
    pub fn new(url: &str, model: &str) -> Result<Self, RemoteError> {
        let url = url.trim_end_matches('/');
        let scheme_ok = url.starts_with("http://") || (url.starts_with("https://") && cfg!(feature = "tls"));
        if !scheme_ok {
            return Err(RemoteError::Invalid(if url.starts_with("https://") {
                format!("{url}: this build speaks plain http only (build sprig-remote with the `tls` feature)")
            } else {
                format!("{url}: expected an http:// or https:// URL")
            }));
        }
        let base = if url.ends_with("/v1") { url.to_string() } else { format!("{url}/v1") };
        Ok(Endpoint { base, model: model.to_string(), api_key: None, timeout: DEFAULT_TIMEOUT })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn agent(&self) -> ureq::Agent {
        ureq::Agent::config_builder().timeout_global(Some(self.timeout)).http_status_as_error(false).build().into()
    }

    /// POSTs `body` to `path`; the response when its status is 2xx.
    fn post(&self, path: &str, body: &Value) -> Result<ureq::http::Response<ureq::Body>, RemoteError> {
        let mut req = self.agent().post(format!("{}{path}", self.base)).header("Content-Type", "application/json");
        if let Some(k) = &self.api_key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        let mut resp = req.send(body.to_string()).map_err(transport)?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            let text = resp.body_mut().read_to_string().unwrap_or_default();
            // OpenAI's error shape when the server used it, else the start of whatever it sent.
            let msg = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or_else(|| text.chars().take(200).collect());
            return Err(RemoteError::Status(status, msg));
        }
        Ok(resp)
    }

    /// The teacher's log-probabilities of `tokens` (a whole sequence, as token ids): one entry per position
    /// from the second on (position j predicts `tokens[j]`), with its `k` most likely tokens.
    pub fn score(&self, tokens: &[u32], k: usize) -> Result<Vec<ScoredPosition>, RemoteError> {
        if tokens.len() < 2 {
            return Err(RemoteError::Invalid("scoring needs at least two tokens".into()));
        }
        let body = json!({
            "model": self.model, "prompt": tokens, "max_tokens": 0, "echo": true, "logprobs": k,
            "temperature": 0.0, "return_tokens_as_token_ids": true,
        });
        let mut resp = self.post("/completions", &body)?;
        let text = resp.body_mut().read_to_string().map_err(transport)?;
        let v: Value = serde_json::from_str(&text).map_err(|e| RemoteError::Malformed(format!("not JSON: {e}")))?;
        parse_scores(&v, tokens, k)
    }

    /// Streams the endpoint's answer to the conversation's last turn into `on_text` (false from it stops
    /// reading, which is not an error).
    pub fn chat_stream(
        &self,
        messages: &[ChatMessage],
        params: &SamplingParams,
        max_tokens: usize,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<(), RemoteError> {
        let msgs: Vec<Value> = messages.iter().map(message_json).collect();
        let mut body = json!({
            "model": self.model, "messages": msgs, "stream": true, "max_tokens": max_tokens,
            "temperature": params.temperature, "top_p": params.top_p,
            // OpenAI's seed is an int64; sprig's is any u64 (a random one when the request gave none).
            "seed": params.seed & i64::MAX as u64,
        });
        if !params.stop.is_empty() {
            body["stop"] = json!(params.stop);
        }
        let resp = self.post("/chat/completions", &body)?;
        let reader = BufReader::new(resp.into_body().into_reader());
        for line in reader.lines() {
            let line = line.map_err(|e| transport(ureq::Error::Io(e)))?;
            let Some(data) = line.strip_prefix("data:") else { continue };
            let data = data.trim();
            if data == "[DONE]" {
                return Ok(());
            }
            let v: Value =
                serde_json::from_str(data).map_err(|e| RemoteError::Malformed(format!("event not JSON: {e}")))?;
            if let Some(m) = v["error"]["message"].as_str() {
                return Err(RemoteError::Malformed(format!("error in the stream: {m}")));
            }
            let Some(choice) = v["choices"].get(0) else {
                // A usage-only chunk has no choices.
                if v["choices"].is_array() {
                    continue;
                }
                return Err(RemoteError::Malformed("an event without `choices`".into()));
            };
            if let Some(t) = choice["delta"]["content"].as_str() {
                if !t.is_empty() && !on_text(t) {
                    return Ok(());
                }
            }
        }
        Err(RemoteError::Malformed("the stream ended without `data: [DONE]`".into()))
    }
}

/// An escalation to the endpoint at `url` from the settings every surface takes (the CLI's flags, the C and
/// JNI structs): `policy` by name (never, threshold, always), `window` tokens, `timeout` for an answer.
pub fn escalation(
    url: &str,
    model: &str,
    api_key: Option<String>,
    policy: &str,
    threshold: f32,
    window: usize,
    timeout: Duration,
) -> Result<(sprig_engine::escalate::Escalation, Endpoint), String> {
    let policy = sprig_engine::escalate::EscalationPolicy::parse(policy, threshold).map_err(|e| e.to_string())?;
    if window == 0 || timeout.is_zero() {
        return Err("the escalation's window and timeout must be at least 1".into());
    }
    let mut ep = Endpoint::new(url, model).map_err(|e| format!("escalation url: {e}"))?;
    ep.api_key = api_key;
    ep.timeout = timeout;
    Ok((sprig_engine::escalate::Escalation { policy, window }, ep))
}

impl Teacher for Endpoint {
    fn answer(
        &self,
        messages: &[ChatMessage],
        params: &SamplingParams,
        max_tokens: usize,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<(), TeacherError> {
        self.chat_stream(messages, params, max_tokens, on_text).map_err(|e| TeacherError(format!("{}: {e}", self.base)))
    }
}

fn message_json(m: &ChatMessage) -> Value {
    let mut v = json!({"role": m.role, "content": m.content});
    if !m.tool_calls.is_empty() {
        v["tool_calls"] = m
            .tool_calls
            .iter()
            .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
            .collect();
    }
    if let Some(id) = &m.tool_call_id {
        v["tool_call_id"] = json!(id);
    }
    if let Some(n) = &m.name {
        v["name"] = json!(n);
    }
    v
}

fn transport(e: ureq::Error) -> RemoteError {
    match e {
        ureq::Error::Timeout(_) => RemoteError::Timeout,
        ureq::Error::Io(io) if matches!(io.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock) => {
            RemoteError::Timeout
        }
        ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => RemoteError::Offline(e.to_string()),
        ureq::Error::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::NotConnected
            ) =>
        {
            RemoteError::Offline(io.to_string())
        }
        ureq::Error::BadUri(m) => RemoteError::Invalid(format!("bad URL: {m}")),
        other => RemoteError::Malformed(other.to_string()),
    }
}

/// `"token_id:N"` → N.
fn token_id(key: &str) -> Result<u32, RemoteError> {
    key.strip_prefix("token_id:").and_then(|n| n.parse().ok()).ok_or_else(|| {
        RemoteError::Malformed(format!(
            "token `{key}` is not `token_id:N`: the server must honour `return_tokens_as_token_ids` (vLLM does)"
        ))
    })
}

/// A `/v1/completions` echo reply's `choices[0].logprobs`, checked against the sequence asked about.
fn parse_scores(v: &Value, tokens: &[u32], k: usize) -> Result<Vec<ScoredPosition>, RemoteError> {
    let bad = |m: &str| RemoteError::Malformed(m.to_string());
    let lp = &v["choices"][0]["logprobs"];
    let (Some(echoed), Some(lps), Some(tops)) =
        (lp["tokens"].as_array(), lp["token_logprobs"].as_array(), lp["top_logprobs"].as_array())
    else {
        return Err(bad(
            "no `choices[0].logprobs` with `tokens`, `token_logprobs` and `top_logprobs` (is `echo` supported?)",
        ));
    };
    // The echo may be followed by generated tokens (a server that generates at least one).
    if echoed.len() < tokens.len() || lps.len() < tokens.len() || tops.len() < tokens.len() {
        return Err(bad(&format!(
            "{} positions echoed for a sequence of {}",
            echoed.len().min(lps.len()),
            tokens.len()
        )));
    }
    let mut out = Vec::with_capacity(tokens.len() - 1);
    for j in 0..tokens.len() {
        let id = token_id(echoed[j].as_str().ok_or_else(|| bad("a token that is not a string"))?)?;
        if id != tokens[j] {
            return Err(bad(&format!("position {j} echoed token {id}, the sequence has {}", tokens[j])));
        }
        if j == 0 {
            continue; // nothing predicts the first token
        }
        let logprob = lps[j].as_f64().ok_or_else(|| bad(&format!("position {j}: no log-probability")))?;
        let mut top = Vec::new();
        if let Some(map) = tops[j].as_object() {
            for (key, l) in map {
                let l =
                    l.as_f64().ok_or_else(|| bad(&format!("position {j}: a log-probability that is not a number")))?;
                top.push((token_id(key)?, l));
            }
        }
        if top.is_empty() && k > 0 {
            return Err(bad(&format!("position {j}: no top log-probabilities")));
        }
        if logprob > 1e-4 || top.iter().any(|&(_, l)| !(l <= 1e-4)) {
            return Err(bad(&format!("position {j}: a log-probability above 0")));
        }
        top.sort_by(|a, b| b.1.total_cmp(&a.1));
        out.push(ScoredPosition { logprob, top });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_normalised_and_checked() {
        assert_eq!(Endpoint::new("http://127.0.0.1:8080", "m").unwrap().base(), "http://127.0.0.1:8080/v1");
        assert_eq!(Endpoint::new("http://h:1/v1/", "m").unwrap().base(), "http://h:1/v1");
        assert!(matches!(Endpoint::new("ftp://h", "m"), Err(RemoteError::Invalid(_))));
    }

    #[test]
    fn echo_replies_are_checked() {
        let reply = |toks: Value, lps: Value, tops: Value| json!({"choices": [{"logprobs": {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops}}]});
        let ok = reply(
            json!(["token_id:5", "token_id:7"]),
            json!([null, -0.5]),
            json!([null, {"token_id:7": -0.5, "token_id:2": -1.5}]),
        );
        let s = parse_scores(&ok, &[5, 7], 2).unwrap();
        assert_eq!(s, vec![ScoredPosition { logprob: -0.5, top: vec![(7, -0.5), (2, -1.5)] }]);
        // Another sequence than asked, text keys, a positive log-probability, a missing object: all refused.
        assert!(parse_scores(&ok, &[5, 8], 2).is_err());
        let text_keys = reply(json!(["a", "b"]), json!([null, -0.5]), json!([null, {"b": -0.5}]));
        assert!(
            matches!(parse_scores(&text_keys, &[5, 7], 1), Err(RemoteError::Malformed(m)) if m.contains("return_tokens_as_token_ids"))
        );
        let positive =
            reply(json!(["token_id:5", "token_id:7"]), json!([null, 0.5]), json!([null, {"token_id:7": 0.5}]));
        assert!(parse_scores(&positive, &[5, 7], 1).is_err());
        assert!(parse_scores(&json!({"choices": []}), &[5, 7], 1).is_err());
        let short = reply(json!(["token_id:5"]), json!([null]), json!([null]));
        assert!(parse_scores(&short, &[5, 7], 1).is_err());
    }
}
