//! OpenAI's request bodies, read strictly (an unknown field, a wrong type, a value out of OpenAI's range: a
//! 400 naming it), and what they become for the engine.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::{json, Value};
use sprig_engine::{ChatMessage, Constraint, SamplingParams, TokenLogprob, ToolCall, ToolChoice, Tools};

use crate::error::ApiError;

/// `stop`: one string or several.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// OpenAI allows at most 4 stop strings.
const MAX_STOP: usize = 4;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
    /// Accepted and ignored (usage chunks are never obfuscated here).
    #[serde(default)]
    #[serde(rename = "include_obfuscation")]
    _include_obfuscation: Option<bool>,
}

/// What both endpoints share: sampling, length, streaming. Besides OpenAI's fields, `top_k`, `min_p` and
/// `repeat_penalty` are accepted as vLLM and llama.cpp's servers accept them.
#[derive(Deserialize, Default)]
pub struct Common {
    pub model: String,
    #[serde(default)]
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logit_bias: Option<HashMap<String, f32>>,
    pub n: Option<u32>,
    /// Accepted and ignored: an end-user id for the operator's logs.
    #[serde(rename = "user")]
    _user: Option<String>,
    pub top_k: Option<u32>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
}

/// Top-level fields are checked against [`CHAT_FIELDS`] by [`parse`] (serde cannot deny unknown fields
/// through `flatten`).
#[derive(Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<InMessage>,
    pub max_completion_tokens: Option<u64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u32>,
    pub response_format: Option<ResponseFormat>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    /// false: at most one call per reply.
    pub parallel_tool_calls: Option<bool>,
    /// Accepted and ignored: nothing is stored.
    #[serde(rename = "store")]
    _store: Option<bool>,
    #[serde(rename = "metadata")]
    _metadata: Option<Value>,
    #[serde(rename = "service_tier")]
    _service_tier: Option<String>,
    #[serde(flatten)]
    pub common: Common,
}

#[derive(Deserialize)]
pub struct CompletionRequest {
    pub prompt: PromptField,
    /// Legacy completions: the number of alternatives to report per token (0..=5).
    pub logprobs: Option<u32>,
    pub echo: Option<bool>,
    /// vLLM's extension: tokens in `logprobs` are named `token_id:N` instead of by their text.
    pub return_tokens_as_token_ids: Option<bool>,
    pub suffix: Option<String>,
    pub best_of: Option<u32>,
    #[serde(flatten)]
    pub common: Common,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    One(String),
    Many(Vec<String>),
    /// The prompt as token ids (as OpenAI's API and vLLM take it).
    Tokens(Vec<u32>),
}

/// A completion request's prompt: text, or token ids.
pub enum PromptInput {
    Text(String),
    Tokens(Vec<u32>),
}

impl PromptField {
    pub fn input(self) -> Result<PromptInput, ApiError> {
        match self {
            PromptField::One(s) => Ok(PromptInput::Text(s)),
            PromptField::Many(mut v) if v.len() == 1 => Ok(PromptInput::Text(v.remove(0))),
            PromptField::Many(_) => Err(ApiError::param("prompt", "one prompt per request (a list must hold exactly one string)")),
            PromptField::Tokens(t) if t.is_empty() => Err(ApiError::param("prompt", "the prompt is empty")),
            PromptField::Tokens(t) => Ok(PromptInput::Tokens(t)),
        }
    }
}

/// A message as OpenAI's clients send it. Fields a client echoes back from a response (`refusal`,
/// `annotations`, `audio`) are accepted and ignored.
#[derive(Deserialize)]
pub struct InMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    pub name: Option<String>,
    pub tool_calls: Option<Vec<InToolCall>>,
    pub tool_call_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Deserialize)]
pub struct InToolCall {
    pub id: String,
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    pub function: InFunction,
}

#[derive(Deserialize)]
pub struct InFunction {
    pub name: String,
    pub arguments: String,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaFormat },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonSchemaFormat {
    pub name: String,
    #[serde(rename = "description")]
    _description: Option<String>,
    pub schema: Option<Value>,
    /// Output always follows the schema here, strict or not.
    #[serde(rename = "strict")]
    _strict: Option<bool>,
}

const COMMON_FIELDS: &[&str] = &[
    "model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "stop", "seed", "presence_penalty",
    "frequency_penalty", "logit_bias", "n", "user", "top_k", "min_p", "repeat_penalty",
];
pub const CHAT_FIELDS: &[&str] = &[
    "messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format", "tools", "tool_choice",
    "parallel_tool_calls", "store", "metadata", "service_tier",
];
pub const COMPLETION_FIELDS: &[&str] = &["prompt", "logprobs", "echo", "suffix", "best_of", "return_tokens_as_token_ids"];

/// Parses a request body: a 400 that says what is wrong (not UTF-8, not JSON, not an object, a field this
/// endpoint does not know, a wrong type).
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8], fields: &[&str]) -> Result<T, ApiError> {
    if let Err(e) = std::str::from_utf8(body) {
        return Err(ApiError::invalid(format!("the request body is not valid UTF-8 ({e})")));
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("the request body is not valid JSON: {e}")))?;
    let Some(obj) = v.as_object() else { return Err(ApiError::invalid("the request body must be a JSON object")) };
    if let Some(k) = obj.keys().find(|k| !fields.contains(&k.as_str()) && !COMMON_FIELDS.contains(&k.as_str())) {
        return Err(ApiError::param(k, format!("Unrecognized request argument supplied: {k}")));
    }
    serde_json::from_value(v).map_err(|e| ApiError::invalid(format!("invalid request: {e}")))
}

fn in_range(param: &str, v: Option<f32>, lo: f32, hi: f32) -> Result<(), ApiError> {
    match v {
        Some(x) if !(x.is_finite() && x >= lo && x <= hi) => Err(ApiError::param(param, format!("{param} must be in [{lo}, {hi}], got {x}"))),
        _ => Ok(()),
    }
}

impl Common {
    pub fn stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options.as_ref().is_some_and(|o| o.include_usage)
    }

    /// Sampling parameters with OpenAI's defaults (temperature 1, top_p 1, no top-k; a random seed unless
    /// one is given), checked against OpenAI's ranges.
    pub fn sampling(&self, vocab: usize) -> Result<SamplingParams, ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::param("n", "only n = 1 is supported"));
        }
        if self.stream_options.is_some() && !self.stream() {
            return Err(ApiError::param("stream_options", "stream_options is only allowed with stream = true"));
        }
        in_range("temperature", self.temperature, 0.0, 2.0)?;
        in_range("top_p", self.top_p, 0.0, 1.0)?;
        in_range("presence_penalty", self.presence_penalty, -2.0, 2.0)?;
        in_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)?;
        in_range("min_p", self.min_p, 0.0, 0.999)?;
        if self.top_p == Some(0.0) {
            return Err(ApiError::param("top_p", "top_p must be greater than 0"));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > MAX_STOP {
            return Err(ApiError::param("stop", format!("at most {MAX_STOP} stop sequences, got {}", stop.len())));
        }
        let mut logit_bias = Vec::new();
        for (k, &b) in self.logit_bias.iter().flatten() {
            let id: u32 = k.parse().map_err(|_| ApiError::param("logit_bias", format!("logit_bias key {k:?} is not a token id")))?;
            if id as usize >= vocab {
                return Err(ApiError::param("logit_bias", format!("token id {id} is outside the vocabulary of {vocab}")));
            }
            if !(b.is_finite() && (-100.0..=100.0).contains(&b)) {
                return Err(ApiError::param("logit_bias", format!("bias {b} for token {id}: must be in [-100, 100]")));
            }
            logit_bias.push((id, b));
        }
        logit_bias.sort_by_key(|&(id, _)| id);
        let d = SamplingParams::default();
        let p = SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_k: self.top_k.unwrap_or(0) as usize,
            top_p: self.top_p.unwrap_or(1.0),
            min_p: self.min_p.unwrap_or(0.0),
            repeat_penalty: self.repeat_penalty.unwrap_or(1.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            logit_bias,
            stop,
            seed: self.seed.map_or_else(rand::random, |s| s as u64),
            ..d
        };
        p.validate()?;
        Ok(p)
    }
}

/// Text of a message's content (parts joined); `None` content is empty.
fn content_text(c: Option<Content>, index: usize) -> Result<String, ApiError> {
    match c {
        None => Ok(String::new()),
        Some(Content::Text(s)) => Ok(s),
        Some(Content::Parts(parts)) => {
            let mut out = String::new();
            for p in parts {
                match (p.kind.as_str(), p.text) {
                    ("text", Some(t)) => out.push_str(&t),
                    (kind, _) => {
                        return Err(ApiError::param(
                            &format!("messages[{index}].content"),
                            format!("content part of type {kind:?}: only text parts are supported"),
                        ))
                    }
                }
            }
            Ok(out)
        }
    }
}

/// The conversation for the engine: roles checked, `developer` read as `system`, tool results named after the
/// call they answer.
pub fn messages(input: Vec<InMessage>) -> Result<Vec<ChatMessage>, ApiError> {
    if input.is_empty() {
        return Err(ApiError::param("messages", "messages must not be empty"));
    }
    let mut out: Vec<ChatMessage> = Vec::with_capacity(input.len());
    for (i, m) in input.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            r @ ("user" | "assistant" | "tool") => r,
            r => return Err(ApiError::param(&format!("messages[{i}].role"), format!("unknown role {r:?} (system, developer, user, assistant, tool)"))),
        };
        let content = content_text(m.content, i)?;
        let mut msg = ChatMessage { name: m.name, ..ChatMessage::new(role, &content) };
        if let Some(calls) = m.tool_calls {
            if role != "assistant" {
                return Err(ApiError::param(&format!("messages[{i}].tool_calls"), "only assistant messages carry tool_calls"));
            }
            for c in calls {
                if c.kind.as_deref().is_some_and(|k| k != "function") {
                    return Err(ApiError::param(&format!("messages[{i}].tool_calls"), "only function tool calls are supported"));
                }
                msg.tool_calls.push(ToolCall { id: c.id, name: c.function.name, arguments: c.function.arguments });
            }
        }
        if role == "tool" {
            let id = m.tool_call_id.ok_or_else(|| ApiError::param(&format!("messages[{i}].tool_call_id"), "a tool message needs the tool_call_id it answers"))?;
            // The call it answers: its name, which templates show.
            let call = out.iter().rev().flat_map(|p| &p.tool_calls).find(|c| c.id == id);
            let Some(call) = call else {
                return Err(ApiError::param(&format!("messages[{i}].tool_call_id"), format!("no earlier assistant tool call has id {id:?}")));
            };
            msg.name = Some(call.name.clone());
            msg.tool_call_id = Some(id);
        }
        out.push(msg);
    }
    Ok(out)
}

/// The request's tools, constrained to the calls' grammar unless `tool_choice` is `none`.
pub fn tools(tools: Option<Value>, choice: Option<Value>, parallel: Option<bool>) -> Result<Option<Tools>, ApiError> {
    let Some(tools) = tools else {
        if choice.is_some() {
            return Err(ApiError::param("tool_choice", "tool_choice is only allowed when tools are given"));
        }
        return Ok(None);
    };
    let choice = match &choice {
        None => ToolChoice::Auto,
        Some(Value::String(s)) if matches!(s.as_str(), "auto" | "none" | "required") => ToolChoice::parse(s),
        Some(v) => match v.pointer("/function/name").and_then(Value::as_str) {
            Some(name) if v.get("type").and_then(Value::as_str) == Some("function") => ToolChoice::Function(name.into()),
            _ => return Err(ApiError::param("tool_choice", "tool_choice must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}")),
        },
    };
    let tools = Tools::from_value(&tools, choice, true).map_err(|e| ApiError::param("tools", e.to_string()))?;
    Ok(Some(Tools { parallel: parallel.unwrap_or(true), ..tools }))
}

/// `response_format` as a constraint.
pub fn response_format(f: Option<ResponseFormat>) -> Result<Option<Constraint>, ApiError> {
    Ok(match f {
        None | Some(ResponseFormat::Text) => None,
        Some(ResponseFormat::JsonObject) => Some(Constraint::JsonObject),
        Some(ResponseFormat::JsonSchema { json_schema }) => {
            let schema = json_schema.schema.unwrap_or_else(|| json!({}));
            if !schema.is_object() {
                return Err(ApiError::param("response_format", format!("json_schema {:?}: schema must be a JSON object", json_schema.name)));
            }
            Some(Constraint::JsonSchema(schema.to_string()))
        }
    })
}

/// A token's text and bytes as OpenAI shows them.
fn token_fields(tokenizer: &sprig_tokenizer::Tokenizer, id: u32) -> (String, Vec<u8>) {
    let bytes = tokenizer.token_bytes(id).map(<[u8]>::to_vec).unwrap_or_default();
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

/// Chat's `logprobs.content` entries.
pub fn chat_logprobs(tokenizer: &sprig_tokenizer::Tokenizer, entries: &[TokenLogprob]) -> Value {
    let entry = |id: u32, lp: f32| {
        let (token, bytes) = token_fields(tokenizer, id);
        json!({"token": token, "logprob": lp, "bytes": bytes})
    };
    Value::Array(
        entries
            .iter()
            .map(|e| {
                let mut v = entry(e.token, e.logprob);
                v["top_logprobs"] = e.top.iter().map(|&(t, lp)| entry(t, lp)).collect();
                v
            })
            .collect(),
    )
}

/// Legacy completions' `logprobs` object for a scored prompt (`echo` with `max_tokens` 0): every token of
/// the prompt, the first without a log-probability (nothing predicts it), named by text or as `token_id:N`.
pub fn scored_prompt_logprobs(tokenizer: &sprig_tokenizer::Tokenizer, tokens: &[u32], entries: &[TokenLogprob], as_ids: bool) -> Value {
    let name = |id: u32| if as_ids { format!("token_id:{id}") } else { token_fields(tokenizer, id).0 };
    let (mut names, mut lps, mut tops, mut offsets) = (vec![], vec![Value::Null], vec![Value::Null], vec![]);
    let mut at = 0;
    for &t in tokens {
        names.push(name(t));
        offsets.push(at);
        at += tokenizer.token_bytes(t).map_or(0, <[u8]>::len);
    }
    for e in entries {
        lps.push(json!(e.logprob));
        let top: serde_json::Map<String, Value> = e.top.iter().map(|&(id, lp)| (name(id), json!(lp))).collect();
        tops.push(Value::Object(top));
    }
    json!({"tokens": names, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

/// Legacy completions' `logprobs` object (`text_offset` counts bytes from the start of the returned text).
pub fn completion_logprobs(tokenizer: &sprig_tokenizer::Tokenizer, entries: &[TokenLogprob], offset: usize) -> Value {
    let (mut tokens, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    let mut at = offset;
    for e in entries {
        let (t, bytes) = token_fields(tokenizer, e.token);
        offsets.push(at);
        at += bytes.len();
        tokens.push(t);
        lps.push(e.logprob);
        let top: serde_json::Map<String, Value> = e.top.iter().map(|&(id, lp)| (token_fields(tokenizer, id).0, json!(lp))).collect();
        tops.push(Value::Object(top));
    }
    json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}
