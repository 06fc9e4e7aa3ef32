//! `sprig serve`: an OpenAI-compatible HTTP server on the session engine, so that clients written against the
//! OpenAI API (the official SDKs, agent frameworks, curl) use a local model unchanged.
//!
//! Endpoints: `POST /v1/chat/completions` and `POST /v1/completions` (streamed as server-sent events or not),
//! `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus). Each model has a worker thread that runs the
//! requests waiting for it as one batch ([`worker`]); the HTTP side (axum on a small tokio runtime) checks a
//! request completely (its JSON, its parameters, its length against the context, its constraint) before it
//! queues, so that what can be refused gets its 4xx before anything runs. A client that disconnects cancels its
//! generation at its next token. Nothing a request names is read from or written to disk.

mod error;
mod metrics;
mod openai;
mod worker;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use rand::distributions::{Alphanumeric, DistString};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sprig_engine::generate::StopReason;
use sprig_engine::{with_engine, AnyEngine, GenerationStats, Prompt, SamplingParams, TokenLogprob, ToolChoice, ToolFormat, Tools};
use subtle::ConstantTimeEq;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use error::ApiError;
use metrics::{Metrics, ModelMetrics};
use worker::{Event, Job, Refused};

/// How the server listens and what it allows.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub host: IpAddr,
    /// 0: any free port (the bound address goes to `on_listening`).
    pub port: u16,
    /// Required as `Authorization: Bearer KEY` on every endpoint but `/health`.
    pub api_key: Option<String>,
    /// Requests of one model generating together (one batch).
    pub max_concurrent: usize,
    /// Requests of one model waiting beyond those; more get a 503.
    pub max_queue: usize,
    pub max_body_bytes: usize,
    /// The largest `max_tokens` a request may ask for (and what it gets when it asks for none, if the context
    /// leaves that much).
    pub max_tokens: usize,
    /// Each session's context (0: the model's).
    pub context: usize,
    /// Chat requests without tools or a response format escalate to this teacher as the policy says.
    pub escalation: Option<(sprig_engine::escalate::Escalation, Arc<sprig_remote::Endpoint>)>,
}

/// Makes a session's speculative decoding (each pooled session gets its own: a draft model keeps a KV cache
/// per session).
pub type SpeculationFactory = Arc<dyn Fn() -> sprig_engine::Result<sprig_engine::speculative::Speculation> + Send + Sync>;

/// A model to serve under `name` (what requests put in `model`).
pub struct ServedModel {
    pub name: String,
    pub engine: AnyEngine,
    /// Speculative decoding for requests that decode alone.
    pub speculation: Option<SpeculationFactory>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

struct Model {
    name: String,
    engine: AnyEngine,
    /// Tokens a request's prompt and reply may take together.
    context: usize,
    vocab: usize,
    created: u64,
    worker: worker::Handle,
    metrics: Arc<ModelMetrics>,
}

struct AppState {
    models: Vec<Model>,
    /// SHA-256 of the API key: compared in constant time, and without revealing its length.
    key: Option<[u8; 32]>,
    config: ServerConfig,
    metrics: Metrics,
}

/// Runs the server until SIGINT or SIGTERM. `on_listening` gets the bound address once it accepts connections.
pub fn serve(config: ServerConfig, models: Vec<ServedModel>, on_listening: impl FnOnce(SocketAddr) + Send + 'static) -> Result<(), ServeError> {
    if models.is_empty() {
        return Err(ServeError::Config("no model to serve".into()));
    }
    if config.max_concurrent == 0 || config.max_tokens == 0 {
        return Err(ServeError::Config("--max-concurrent and --max-tokens must be at least 1".into()));
    }
    let mut metrics = Metrics::new();
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut served = Vec::new();
    for m in models {
        if served.iter().any(|s: &Model| s.name == m.name) {
            return Err(ServeError::Config(format!("two models are named {:?}; each needs a name of its own", m.name)));
        }
        let mm = Arc::new(metrics.add_model(&m.name));
        let wc = || worker::WorkerConfig {
            max_concurrent: config.max_concurrent,
            max_queue: config.max_queue,
            context: config.context,
            speculation: m.speculation.clone(),
        };
        let worker = with_engine!(&m.engine, |e| worker::spawn(&m.name, e.clone(), wc(), mm.clone()))?;
        let trained = m.engine.context_length();
        let context = if config.context == 0 { trained } else { config.context.min(trained) };
        let vocab = with_engine!(&m.engine, |e| e.model.config.vocab_size);
        served.push(Model { name: m.name, engine: m.engine, context, vocab, created, worker, metrics: mm });
    }
    let key = config.api_key.as_ref().map(|k| Sha256::digest(k.as_bytes()).into());
    let addr = SocketAddr::new(config.host, config.port);
    let state = Arc::new(AppState { models: served, key, config, metrics });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("sprig-http").enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| ServeError::Bind { addr, source })?;
        on_listening(listener.local_addr()?);
        axum::serve(listener, router(state)).with_graceful_shutdown(shutdown()).await?;
        Ok(())
    })
}

async fn shutdown() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.max_body_bytes;
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*id}", get(get_model))
        .route("/health", get(|| async { json_response(json!({"status": "ok"})) }))
        .route("/metrics", get(metrics_text))
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error", "method not allowed on this endpoint")
        })
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Every request: the API key (all but `/health`), then the request counted by route and status.
async fn guard(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let route = match path {
        "/v1/chat/completions" | "/v1/completions" | "/v1/models" | "/health" | "/metrics" => path.to_string(),
        p if p.starts_with("/v1/models/") => "/v1/models/{id}".into(),
        _ => "other".into(),
    };
    let response = if route != "/health" && !authorized(&st, req.headers()) {
        ApiError::unauthorized().into_response()
    } else {
        next.run(req).await
    };
    st.metrics.request(&route, response.status().as_u16());
    response
}

fn authorized(st: &AppState, headers: &HeaderMap) -> bool {
    let Some(key) = &st.key else { return true };
    let given = headers.get(header::AUTHORIZATION).and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    let Some(given) = given else { return false };
    let digest: [u8; 32] = Sha256::digest(given).into();
    digest.ct_eq(key).into()
}

async fn metrics_text(State(st): State<Arc<AppState>>) -> Response {
    for m in &st.models {
        m.metrics.prefix_cache_bytes.set(m.engine.prefix_cache_stats().bytes as i64);
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], st.metrics.text()).into_response()
}

fn json_response(v: Value) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

fn model_json(m: &Model) -> Value {
    json!({"id": m.name, "object": "model", "created": m.created, "owned_by": "sprig", "context_length": m.context})
}

async fn list_models(State(st): State<Arc<AppState>>) -> Response {
    json_response(json!({"object": "list", "data": st.models.iter().map(model_json).collect::<Vec<_>>()}))
}

async fn get_model(State(st): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    match st.model(&id) {
        Ok(i) => json_response(model_json(&st.models[i])),
        Err(e) => e.into_response(),
    }
}

impl AppState {
    fn model(&self, name: &str) -> Result<usize, ApiError> {
        self.models.iter().position(|m| m.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.models.iter().map(|m| m.name.as_str()).collect();
            ApiError { param: Some("model".into()), ..ApiError::not_found(format!("The model `{name}` does not exist (this server has: {})", names.join(", "))) }
                .with_code("model_not_found")
        })
    }
}

fn body(b: Result<Bytes, BytesRejection>, limit: usize) -> Result<Bytes, ApiError> {
    b.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", format!("the request body is larger than {limit} bytes"))
        } else {
            ApiError::invalid(format!("cannot read the request body: {r}"))
        }
    })
}

fn random_id(prefix: &str) -> String {
    format!("{prefix}{}", Alphanumeric.sample_string(&mut rand::thread_rng(), 24))
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// What a checked request becomes, whichever endpoint it came from.
struct Ready {
    model: usize,
    prompt: Prompt,
    params: SamplingParams,
    max_new: usize,
    tokens: Vec<u32>,
}

impl AppState {
    /// The tokens a reply may take: `requested` (at most the server's ceiling, fitting the context with the
    /// prompt) or, when not given, what the context leaves up to the ceiling.
    fn reply_budget(&self, m: &Model, prompt: usize, requested: Option<u64>, what: &str) -> Result<usize, ApiError> {
        if requested == Some(0) {
            return Err(ApiError::param("max_tokens", "max_tokens must be at least 1"));
        }
        let ceiling = self.config.max_tokens;
        if let Some(r) = requested.filter(|&r| r > ceiling as u64) {
            return Err(ApiError::param("max_tokens", format!("max_tokens is too large: {r}. This server allows at most {ceiling}.")));
        }
        let ctx = m.context;
        if prompt >= ctx {
            return Err(ApiError::param(what, format!(
                "This model's maximum context length is {ctx} tokens. However, your {what} resulted in {prompt} tokens. Please reduce the length of the {what}."
            ))
            .with_code("context_length_exceeded"));
        }
        match requested {
            Some(r) if prompt + r as usize > ctx => Err(ApiError::param("max_tokens", format!(
                "This model's maximum context length is {ctx} tokens. However, you requested {} tokens ({prompt} in the {what}, {r} in the completion). Please reduce the length of the {what} or completion.",
                prompt + r as usize
            ))
            .with_code("context_length_exceeded")),
            Some(r) => Ok(r as usize),
            None => Ok(ceiling.min(ctx - prompt)),
        }
    }

    /// Queues a checked request; its events come back on the returned channel.
    fn submit(&self, r: Ready) -> Result<mpsc::UnboundedReceiver<Event>, ApiError> {
        self.queue(r, None)
    }

    /// Queues a prompt to score (its top-k from the request's `top_logprobs`); one [`Event::Scored`] comes back.
    fn submit_scoring(&self, r: Ready) -> Result<mpsc::UnboundedReceiver<Event>, ApiError> {
        let k = r.params.top_logprobs.unwrap_or(0);
        self.queue(r, Some(k))
    }

    fn queue(&self, r: Ready, score: Option<usize>) -> Result<mpsc::UnboundedReceiver<Event>, ApiError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let job = Job { prompt: r.prompt, params: r.params, max_new: r.max_new, tokens: r.tokens, score, events: tx, queued: Instant::now() };
        match self.models[r.model].worker.submit(job) {
            Ok(()) => Ok(rx),
            Err(Refused::Busy) => Err(ApiError::busy()),
            Err(Refused::Stopped) => Err(ApiError::internal("this model's worker has stopped; restart the server")),
        }
    }
}

/// Compiles the request's constraint (its own, or its tools'), so that a bad schema is a 400 before queueing.
fn check_constraint(engine: &AnyEngine, params: &SamplingParams, tools: Option<&Tools>) -> Result<(), ApiError> {
    let format = with_engine!(engine, |e| e.tool_format());
    let tools_constraint = tools.and_then(|t| t.constraint(format));
    if tools_constraint.is_some() && params.constraint.is_some() {
        return Err(ApiError::param("response_format", "response_format cannot be combined with tools (unless tool_choice is \"none\")"));
    }
    if let Some(c) = tools_constraint.as_ref().or(params.constraint.as_ref()) {
        with_engine!(engine, |e| e.guide(c).map(drop))?;
    }
    Ok(())
}

/// Runs `f` off the async threads (tokenizing a long prompt or compiling a schema takes a while).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::internal(format!("request preparation failed: {e}")))?
}

async fn chat(State(st): State<Arc<AppState>>, b: Result<Bytes, BytesRejection>) -> Response {
    chat_inner(st, b).await.unwrap_or_else(IntoResponse::into_response)
}

async fn chat_inner(st: Arc<AppState>, b: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let b = body(b, st.config.max_body_bytes)?;
    let req: openai::ChatRequest = openai::parse(&b, openai::CHAT_FIELDS)?;
    let model = st.model(&req.common.model)?;
    let mut params = req.common.sampling(st.models[model].vocab)?;
    match (req.logprobs, req.top_logprobs) {
        (Some(true), n) => params.top_logprobs = Some(n.unwrap_or(0) as usize),
        (_, Some(_)) => return Err(ApiError::param("top_logprobs", "top_logprobs requires logprobs = true")),
        _ => {}
    }
    params.validate()?;
    params.constraint = openai::response_format(req.response_format)?;
    let tools = openai::tools(req.tools, req.tool_choice, req.parallel_tool_calls)?;
    let messages = openai::messages(req.messages)?;
    let requested = req.max_completion_tokens.or(req.common.max_tokens);
    let (stream, usage) = (req.common.stream(), req.common.include_usage());
    let st2 = st.clone();
    let ready = blocking(move || {
        let m = &st2.models[model];
        check_constraint(&m.engine, &params, tools.as_ref())?;
        let tokens = with_engine!(&m.engine, |e| e.chat_tokens_with_tools(&messages, tools.as_ref()))?;
        let max_new = st2.reply_budget(m, tokens.len(), requested, "messages")?;
        let prompt = match tools {
            Some(t) => Prompt::ChatWithTools(messages, t),
            None => Prompt::Chat(messages),
        };
        Ok(Ready { model, prompt, params, max_new, tokens })
    })
    .await?;
    let calls = match &ready.prompt {
        Prompt::ChatWithTools(_, t) if t.choice != ToolChoice::None => Some(with_engine!(&st.models[model].engine, |e| e.tool_format())),
        _ => None,
    };
    let logprobs = ready.params.top_logprobs.is_some();
    let rx = match (&st.config.escalation, &ready.prompt) {
        (Some((esc, teacher)), Prompt::Chat(_)) if ready.params.constraint.is_none() => {
            escalating(st.clone(), ready, *esc, teacher.clone())?
        }
        _ => st.submit(ready)?,
    };
    let reply = Reply { st, model, id: random_id("chatcmpl-"), created: now(), logprobs, calls };
    if stream {
        Ok(reply.chat_stream(rx, usage))
    } else {
        reply.chat_once(rx).await
    }
}

async fn completions(State(st): State<Arc<AppState>>, b: Result<Bytes, BytesRejection>) -> Response {
    completions_inner(st, b).await.unwrap_or_else(IntoResponse::into_response)
}

async fn completions_inner(st: Arc<AppState>, b: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let b = body(b, st.config.max_body_bytes)?;
    let req: openai::CompletionRequest = openai::parse(&b, openai::COMPLETION_FIELDS)?;
    let model = st.model(&req.common.model)?;
    let mut params = req.common.sampling(st.models[model].vocab)?;
    if req.suffix.is_some() {
        return Err(ApiError::param("suffix", "suffix (fill-in-the-middle) is not supported"));
    }
    if req.best_of.is_some_and(|b| b != 1) {
        return Err(ApiError::param("best_of", "only best_of = 1 is supported"));
    }
    if let Some(n) = req.logprobs {
        let most = sprig_engine::sampler::MAX_TOP_LOGPROBS;
        if n as usize > most {
            return Err(ApiError::param("logprobs", format!("logprobs must be in [0, {most}], got {n}")));
        }
        params.top_logprobs = Some(n as usize);
    }
    let echo = req.echo.unwrap_or(false);
    let as_ids = req.return_tokens_as_token_ids.unwrap_or(false);
    if echo && req.logprobs.is_some() {
        // Scoring a given sequence (a student's tokens scored by this server as teacher).
        if req.common.max_tokens != Some(0) {
            return Err(ApiError::param("max_tokens", "echo with logprobs scores the prompt: set max_tokens to 0"));
        }
        if req.common.stream() {
            return Err(ApiError::param("stream", "echo with logprobs (scoring) is not streamed"));
        }
        return score_prompt(st, model, req.prompt.input()?, req.logprobs.unwrap_or(0) as usize, as_ids).await;
    }
    let text = match req.prompt.input()? {
        openai::PromptInput::Text(t) => t,
        openai::PromptInput::Tokens(t) => {
            let v = st.models[model].vocab;
            if let Some(bad) = t.iter().find(|&&id| id as usize >= v) {
                return Err(ApiError::param("prompt", format!("token id {bad} is past the vocabulary ({v} tokens)")));
            }
            with_engine!(&st.models[model].engine, |e| e.tokenizer.decode(&t))
                .map_err(|e| ApiError::param("prompt", format!("token ids that are not text: {e}")))?
        }
    };
    let (stream, usage) = (req.common.stream(), req.common.include_usage());
    let requested = Some(req.common.max_tokens.unwrap_or(16));
    let st2 = st.clone();
    let prompt_text = text.clone();
    let ready = blocking(move || {
        let m = &st2.models[model];
        check_constraint(&m.engine, &params, None)?;
        // The caller wrote the whole prompt: special-token strings in it are control tokens (as llama.cpp's
        // server reads them), and BOS is added where the model wants one.
        let tokens = with_engine!(&m.engine, |e| e.tokenizer.encode_parts(&[(&text, true)], e.tokenizer.special().add_bos))
            .map_err(sprig_engine::EngineError::from)?;
        if tokens.is_empty() {
            return Err(ApiError::param("prompt", "the prompt is empty"));
        }
        let max_new = st2.reply_budget(m, tokens.len(), requested, "prompt")?;
        Ok(Ready { model, prompt: Prompt::Text { text, parse_special: true }, params, max_new, tokens })
    })
    .await?;
    let logprobs = ready.params.top_logprobs.is_some();
    let rx = st.submit(ready)?;
    let reply = Reply { st, model, id: random_id("cmpl-"), created: now(), logprobs, calls: None };
    let echoed = if echo { prompt_text } else { String::new() };
    if stream {
        Ok(reply.completion_stream(rx, usage, echoed))
    } else {
        reply.completion_once(rx, echoed).await
    }
}

/// A chat request under escalation: the events its reply is made of, as a plain request's would be.
/// [`sprig_engine::escalate::answer`] decides, off the async threads (the teacher's client blocks): the local
/// model runs as an ordinary request of the model's worker, its text going out as the escalation lets it; a turn
/// handed over is the teacher's text. Each decision is logged on stderr and counted in the metrics.
fn escalating(
    st: Arc<AppState>,
    ready: Ready,
    esc: sprig_engine::escalate::Escalation,
    teacher: Arc<sprig_remote::Endpoint>,
) -> Result<mpsc::UnboundedReceiver<Event>, ApiError> {
    use sprig_engine::escalate::{self, AnsweredBy, EscalationPolicy};
    use sprig_engine::generate::StopReason;
    use sprig_engine::EngineError;
    let Prompt::Chat(messages) = ready.prompt.clone() else { return st.submit(ready) };
    if esc.policy == EscalationPolicy::Never {
        return st.submit(ready);
    }
    let (model, asked_logprobs) = (ready.model, ready.params.top_logprobs);
    let (params, max_new, tokens) = (ready.params.clone(), ready.max_new, ready.tokens.clone());
    // The local model's first request is queued now, so that a full queue is a 503 as for any request (the
    // parameters `answer` runs it with: its log-probabilities carry the signal).
    let mut first = match esc.policy {
        EscalationPolicy::Threshold(_) => {
            let p = SamplingParams { top_logprobs: Some(asked_logprobs.unwrap_or(0)), ..ready.params.clone() };
            Some(st.submit(Ready { params: p, ..ready })?)
        }
        _ => None,
    };
    let (out, out_rx) = mpsc::unbounded_channel();
    tokio::task::spawn_blocking(move || {
        // Entries of the tokens whose text has not gone out (sent only when the client asked for them).
        let pending = std::cell::RefCell::new(Vec::new());
        let mut run_student = |prompt, p: &SamplingParams, text: &mut dyn FnMut(&str) -> bool, lp: &mut dyn FnMut(&TokenLogprob)| {
            let mut rx = match first.take() {
                Some(rx) => rx,
                None => st
                    .submit(Ready { model, prompt, params: p.clone(), max_new, tokens: tokens.clone() })
                    .map_err(|e| EngineError::Eval(e.message))?,
            };
            while let Some(ev) = rx.blocking_recv() {
                match ev {
                    Event::Text(t, l) => {
                        l.iter().for_each(&mut *lp);
                        if asked_logprobs.is_some() {
                            pending.borrow_mut().extend(l);
                        }
                        if out.is_closed() || !text(&t) {
                            // Handed over, or the client has gone: dropping the channel stops the request, and
                            // what it held back is not shown.
                            pending.borrow_mut().clear();
                            return Ok(GenerationStats { stop: StopReason::Cancelled, ..GenerationStats::default() });
                        }
                    }
                    Event::Done(r) => return r,
                    Event::Scored(_) => {}
                }
            }
            Err(EngineError::Eval("the model's worker stopped during the request".into()))
        };
        let mut show = |t: &str| {
            let l = std::mem::take(&mut *pending.borrow_mut());
            if t.is_empty() && l.is_empty() {
                return !out.is_closed();
            }
            out.send(Event::Text(t.to_string(), l)).is_ok()
        };
        let turn = escalate::answer(&esc, Some(&*teacher), &messages, &params, max_new, &mut run_student, &mut show);
        let m = &st.models[model];
        let done = turn.map(|turn| {
            eprintln!("sprig serve: {}: {}", m.name, turn.report.line(&esc, teacher.base()));
            let outcome = match turn.report.answered_by {
                AnsweredBy::Teacher => Some("teacher"),
                AnsweredBy::StudentAfterTeacherFailed => Some("fallback"),
                AnsweredBy::Student => None,
            };
            if let Some(o) = outcome {
                m.metrics.escalated.get_or_create(&vec![("outcome".into(), o.into())]).inc();
            }
            match turn.report.answered_by {
                // The teacher's reply, counted in this model's tokens for the usage.
                AnsweredBy::Teacher => {
                    let generated =
                        with_engine!(&m.engine, |e| e.tokenizer.encode_parts(&[(&turn.text, false)], false)).unwrap_or_default();
                    GenerationStats { prompt_tokens: tokens.len(), generated, ..GenerationStats::default() }
                }
                _ => turn.stats.unwrap_or_default(),
            }
        });
        let _ = out.send(Event::Done(done));
    });
    Ok(out_rx)
}

/// `echo` with `logprobs` and `max_tokens` 0: the model's log-probability of every token of the prompt after
/// the first, with the `k` most likely tokens at each position (what a teacher returns to `sprig distill`).
async fn score_prompt(st: Arc<AppState>, model: usize, prompt: openai::PromptInput, k: usize, as_ids: bool) -> Result<Response, ApiError> {
    let st2 = st.clone();
    let ready = blocking(move || {
        let m = &st2.models[model];
        let tokens = match prompt {
            openai::PromptInput::Tokens(t) => {
                if let Some(bad) = t.iter().find(|&&id| id as usize >= m.vocab) {
                    return Err(ApiError::param("prompt", format!("token id {bad} is past the vocabulary ({} tokens)", m.vocab)));
                }
                t
            }
            openai::PromptInput::Text(text) => with_engine!(&m.engine, |e| e.tokenizer.encode_parts(&[(&text, true)], e.tokenizer.special().add_bos))
                .map_err(sprig_engine::EngineError::from)?,
        };
        if tokens.is_empty() {
            return Err(ApiError::param("prompt", "the prompt is empty"));
        }
        if tokens.len() > m.context {
            return Err(ApiError::param("prompt", format!(
                "This model's maximum context length is {} tokens. However, your prompt resulted in {} tokens. Please reduce the length of the prompt.",
                m.context,
                tokens.len()
            ))
            .with_code("context_length_exceeded"));
        }
        let params = SamplingParams { top_logprobs: Some(k), ..SamplingParams::default() };
        Ok(Ready { model, prompt: Prompt::Text { text: String::new(), parse_special: false }, params, max_new: 0, tokens })
    })
    .await?;
    let tokens = ready.tokens.clone();
    let mut rx = st.submit_scoring(ready)?;
    let entries = match rx.recv().await {
        Some(Event::Scored(Ok(e))) => e,
        Some(Event::Scored(Err(e))) => return Err(e.into()),
        _ => return Err(ApiError::internal("the model's worker stopped while scoring")),
    };
    let reply = Reply { st, model, id: random_id("cmpl-"), created: now(), logprobs: true, calls: None };
    let tok = reply.tokenizer();
    let text = tok.decode(&tokens).unwrap_or_default();
    let lp = openai::scored_prompt_logprobs(&tok, &tokens, &entries, as_ids);
    let mut body = reply.completion_body(&text, Some(lp), Some("length"));
    body["usage"] = json!({"prompt_tokens": tokens.len(), "completion_tokens": 0, "total_tokens": tokens.len()});
    Ok(json_response(body))
}

/// A request's answer in the making.
struct Reply {
    st: Arc<AppState>,
    model: usize,
    id: String,
    created: u64,
    logprobs: bool,
    /// Chat with tools that may be called: the model's tool format (calls are parsed out of the reply).
    calls: Option<ToolFormat>,
}

fn finish_reason(stop: StopReason) -> &'static str {
    match stop {
        StopReason::StopToken | StopReason::StopString | StopReason::Cancelled => "stop",
        StopReason::Length | StopReason::ContextFull | StopReason::ConstraintUnsatisfied => "length",
    }
}

fn usage(s: &GenerationStats) -> Value {
    let prompt = s.prompt_tokens + s.cached_tokens;
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": s.generated.len(),
        "total_tokens": prompt + s.generated.len(),
        "prompt_tokens_details": {"cached_tokens": s.cached_tokens},
    })
}

/// Server-sent events of a streamed response: each `data:` line as it comes, then `[DONE]`.
type SseSender = mpsc::Sender<Result<SseEvent, Infallible>>;

fn sse_response(rx: mpsc::Receiver<Result<SseEvent, Infallible>>) -> Response {
    Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default()).into_response()
}

/// Sends one event; false when the client has gone (the caller stops, dropping the generation's receiver,
/// which cancels it).
async fn send(tx: &SseSender, data: &Value) -> bool {
    tx.send(Ok(SseEvent::default().data(data.to_string()))).await.is_ok()
}

async fn send_done(tx: &SseSender) {
    let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
}

/// Whether a tool reply is a call: the constrained grammar starts every call with `<`, `{` or a backtick, and no
/// text reply with one of them. `None` until a non-blank character has come.
fn starts_call(text: &str) -> Option<bool> {
    text.trim_start().chars().next().map(|c| matches!(c, '<' | '{' | '`'))
}

impl Reply {
    fn tokenizer(&self) -> Arc<sprig_tokenizer::Tokenizer> {
        with_engine!(&self.st.models[self.model].engine, |e| e.tokenizer.clone())
    }

    fn name(&self) -> &str {
        &self.st.models[self.model].name
    }

    /// The reply's content and calls (ids unique across replies, as OpenAI's are).
    fn split_calls(&self, text: &str) -> (Option<String>, Vec<Value>) {
        let Some(format) = self.calls else { return (Some(text.to_string()), Vec::new()) };
        let (content, calls) = sprig_engine::tools::parse_calls(text, format);
        let calls: Vec<Value> = calls
            .into_iter()
            .map(|c| json!({"id": random_id("call_"), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
            .collect();
        let content = if calls.is_empty() || !content.trim().is_empty() { Some(content) } else { None };
        (content, calls)
    }

    async fn collect(rx: &mut mpsc::UnboundedReceiver<Event>) -> Result<(String, Vec<TokenLogprob>, GenerationStats), ApiError> {
        let (mut text, mut lps) = (String::new(), Vec::new());
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Text(t, l) => {
                    text.push_str(&t);
                    lps.extend(l);
                }
                Event::Done(r) => return Ok((text, lps, r?)),
                Event::Scored(_) => break,
            }
        }
        Err(ApiError::internal("the model's worker stopped during the request"))
    }

    async fn chat_once(self, mut rx: mpsc::UnboundedReceiver<Event>) -> Result<Response, ApiError> {
        let (text, lps, stats) = Self::collect(&mut rx).await?;
        let (content, calls) = self.split_calls(&text);
        let mut message = json!({"role": "assistant", "content": content, "refusal": null});
        let mut reason = finish_reason(stats.stop);
        if !calls.is_empty() {
            message["tool_calls"] = Value::Array(calls);
            reason = "tool_calls";
        }
        let logprobs = self.logprobs.then(|| json!({"content": openai::chat_logprobs(&self.tokenizer(), &lps), "refusal": null}));
        let body = json!({
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.name(),
            "system_fingerprint": null,
            "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": reason}],
            "usage": usage(&stats),
        });
        Ok(json_response(body))
    }

    fn chunk(&self, delta: Value, logprobs: Option<Value>, reason: Option<&str>, with_usage: bool) -> Value {
        let mut c = json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.name(),
            "system_fingerprint": null,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs.map(|l| json!({"content": l, "refusal": null})), "finish_reason": reason}],
        });
        if with_usage {
            c["usage"] = Value::Null;
        }
        c
    }

    fn chat_stream(self, mut rx: mpsc::UnboundedReceiver<Event>, include_usage: bool) -> Response {
        let (tx, out) = mpsc::channel(64);
        tokio::spawn(async move {
            let tok = self.tokenizer();
            let lp = |l: &[TokenLogprob]| self.logprobs.then(|| openai::chat_logprobs(&tok, l));
            if !send(&tx, &self.chunk(json!({"role": "assistant", "content": ""}), None, None, include_usage)).await {
                return;
            }
            // With tools: text is held until it shows whether the reply is a call (then all of it is, sent as
            // `tool_calls` at the end) or text (streamed from then on).
            let (mut held, mut held_lps, mut is_call) = (String::new(), Vec::new(), self.calls.map(|_| None::<bool>));
            while let Some(ev) = rx.recv().await {
                match ev {
                    Event::Text(t, l) => {
                        if let Some(decided) = is_call.as_mut() {
                            if *decided != Some(false) {
                                held.push_str(&t);
                                held_lps.extend(l);
                                *decided = starts_call(&held);
                                if *decided != Some(false) {
                                    continue;
                                }
                                // Text after all: what was held goes now.
                                let c = self.chunk(json!({"content": std::mem::take(&mut held)}), lp(&std::mem::take(&mut held_lps)), None, include_usage);
                                if !send(&tx, &c).await {
                                    return;
                                }
                                continue;
                            }
                        }
                        if !send(&tx, &self.chunk(json!({"content": t}), lp(&l), None, include_usage)).await {
                            return;
                        }
                    }
                    Event::Done(Err(e)) => {
                        let _ = send(&tx, &ApiError::from(e).body()).await;
                        return send_done(&tx).await;
                    }
                    Event::Scored(_) => return,
                    Event::Done(Ok(stats)) => {
                        let mut reason = finish_reason(stats.stop);
                        if !held.is_empty() || !held_lps.is_empty() {
                            let (content, calls) = self.split_calls(&held);
                            let mut delta = json!({});
                            if let Some(c) = content.filter(|c| !c.is_empty()) {
                                delta["content"] = json!(c);
                            }
                            if !calls.is_empty() {
                                reason = "tool_calls";
                                let indexed: Vec<Value> = calls
                                    .into_iter()
                                    .enumerate()
                                    .map(|(i, mut c)| {
                                        c["index"] = json!(i);
                                        c
                                    })
                                    .collect();
                                delta["tool_calls"] = Value::Array(indexed);
                            }
                            if !send(&tx, &self.chunk(delta, lp(&held_lps), None, include_usage)).await {
                                return;
                            }
                        }
                        if !send(&tx, &self.chunk(json!({}), None, Some(reason), include_usage)).await {
                            return;
                        }
                        if include_usage {
                            let u = json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.name(),
                                "system_fingerprint": null, "choices": [], "usage": usage(&stats)});
                            if !send(&tx, &u).await {
                                return;
                            }
                        }
                        return send_done(&tx).await;
                    }
                }
            }
            let _ = send(&tx, &ApiError::internal("the model's worker stopped during the request").body()).await;
        });
        sse_response(out)
    }

    fn completion_body(&self, text: &str, logprobs: Option<Value>, reason: Option<&str>) -> Value {
        json!({
            "id": self.id, "object": "text_completion", "created": self.created, "model": self.name(),
            "system_fingerprint": null,
            "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": reason}],
        })
    }

    async fn completion_once(self, mut rx: mpsc::UnboundedReceiver<Event>, echo: String) -> Result<Response, ApiError> {
        let (text, lps, stats) = Self::collect(&mut rx).await?;
        let lp = self.logprobs.then(|| openai::completion_logprobs(&self.tokenizer(), &lps, 0));
        let mut body = self.completion_body(&(echo + &text), lp, Some(finish_reason(stats.stop)));
        body["usage"] = usage(&stats);
        Ok(json_response(body))
    }

    fn completion_stream(self, mut rx: mpsc::UnboundedReceiver<Event>, include_usage: bool, echo: String) -> Response {
        let (tx, out) = mpsc::channel(64);
        tokio::spawn(async move {
            let tok = self.tokenizer();
            let with_usage = |mut v: Value| {
                if include_usage {
                    v["usage"] = Value::Null;
                }
                v
            };
            if !echo.is_empty() && !send(&tx, &with_usage(self.completion_body(&echo, None, None))).await {
                return;
            }
            let mut offset = 0;
            while let Some(ev) = rx.recv().await {
                match ev {
                    Event::Text(t, l) => {
                        let lp = self.logprobs.then(|| openai::completion_logprobs(&tok, &l, offset));
                        offset += t.len();
                        if !send(&tx, &with_usage(self.completion_body(&t, lp, None))).await {
                            return;
                        }
                    }
                    Event::Done(Err(e)) => {
                        let _ = send(&tx, &ApiError::from(e).body()).await;
                        return send_done(&tx).await;
                    }
                    Event::Scored(_) => return,
                    Event::Done(Ok(stats)) => {
                        if !send(&tx, &with_usage(self.completion_body("", None, Some(finish_reason(stats.stop))))).await {
                            return;
                        }
                        if include_usage {
                            let mut u = json!({"id": self.id, "object": "text_completion", "created": self.created, "model": self.name(), "choices": []});
                            u["usage"] = usage(&stats);
                            if !send(&tx, &u).await {
                                return;
                            }
                        }
                        return send_done(&tx).await;
                    }
                }
            }
            let _ = send(&tx, &ApiError::internal("the model's worker stopped during the request").body()).await;
        });
        sse_response(out)
    }
}
