//! What the C ABI and the JNI layer share: handle registries, errors, and the operations themselves in safe
//! Rust. Handles are registry ids, never pointers to Rust objects, so a null, stale, freed or made-up handle is
//! a lookup miss (an error code), not undefined behaviour; ids are never reused.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, TryLockError};

use sprig_engine::generate::StopReason;
use sprig_engine::{
    AnyEngine, AnySession, ChatMessage, ContextPolicy, DeviceChoice, EngineError, GenerationStats, LoadOptions,
    PrefixCacheStats, Prompt, SamplingParams, ToolChoice, Tools,
};
use sprig_engine::escalate::{self, AnsweredBy, Escalation};
use sprig_import::QuantChoice;
use sprig_remote::Endpoint;

use crate::{
    SPRIG_DEVICE_AUTO, SPRIG_DEVICE_CPU, SPRIG_DEVICE_GPU, SPRIG_STOP_CANCELLED, SPRIG_STOP_CONSTRAINT_UNSATISFIED,
    SPRIG_STOP_CONTEXT_FULL, SPRIG_STOP_LENGTH, SPRIG_STOP_STRING, SPRIG_STOP_TOKEN,
};

/// Status codes (`SprigStatus` in C; the same numbers in `SprigException.code` on the JVM).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SprigStatus {
    Ok = 0,
    /// A null or malformed argument: a null pointer, invalid UTF-8, a bad sampling parameter, an empty prompt.
    InvalidArgument = 1,
    /// A null, unknown or already freed model/session handle.
    InvalidHandle = 2,
    /// The model could not be opened: missing file, unsupported or corrupt format.
    LoadFailed = 3,
    /// The prompt does not fit in the session's context.
    ContextFull = 4,
    /// Another generation is running on this session.
    Busy = 5,
    /// The requested device is not available, or it failed while running (lost, out of its memory).
    Device = 6,
    /// A bug in sprig (a caught panic, or an internal inconsistency); the message says where.
    Internal = 7,
    /// The model or the session's KV cache does not fit in memory: use a smaller context or model.
    OutOfMemory = 8,
}

impl SprigStatus {
    /// The name Kotlin's `SprigStatus` enum uses for it.
    pub fn name(self) -> &'static str {
        match self {
            SprigStatus::Ok => "OK",
            SprigStatus::InvalidArgument => "INVALID_ARGUMENT",
            SprigStatus::InvalidHandle => "INVALID_HANDLE",
            SprigStatus::LoadFailed => "LOAD_FAILED",
            SprigStatus::ContextFull => "CONTEXT_FULL",
            SprigStatus::Busy => "BUSY",
            SprigStatus::Device => "DEVICE",
            SprigStatus::Internal => "INTERNAL",
            SprigStatus::OutOfMemory => "OUT_OF_MEMORY",
        }
    }
}

#[derive(Debug)]
pub struct FfiError {
    pub status: SprigStatus,
    pub message: String,
}

impl FfiError {
    pub fn new(status: SprigStatus, message: impl Into<String>) -> Self {
        FfiError { status, message: message.into() }
    }
    pub fn arg(message: impl Into<String>) -> Self {
        Self::new(SprigStatus::InvalidArgument, message)
    }
}

pub type FfiResult<T> = Result<T, FfiError>;

/// The status of an engine error: what the caller can do about it.
fn engine_error(e: EngineError, loading: bool) -> FfiError {
    use sprig_backend::BackendError as B;
    use sprig_models::ModelError as M;
    let status = match &e {
        _ if e.is_context_overflow() => SprigStatus::ContextFull,
        EngineError::MemoryBudget(_) => SprigStatus::OutOfMemory,
        _ => match e.device_error() {
            Some(B::OutOfMemory { .. }) => SprigStatus::OutOfMemory,
            Some(_) => SprigStatus::Device,
            // What the caller passed: the prompt, the sampling, a chat without a template, a bad token.
            None => match &e {
                EngineError::Sampling { .. }
                | EngineError::EmptyPrompt
                | EngineError::NoChatTemplate
                | EngineError::Template(_)
                | EngineError::Constraint { .. }
                | EngineError::Tools(_)
                | EngineError::Tokenizer(_)
                | EngineError::Model(M::BadToken { .. }) => SprigStatus::InvalidArgument,
                _ if loading => SprigStatus::LoadFailed,
                // Anything else while running (a shape mismatch, a state from another model) is sprig's bug.
                _ => SprigStatus::Internal,
            },
        },
    };
    FfiError::new(status, e.to_string())
}

pub struct LoadRequest<'a> {
    pub path: &'a str,
    pub tokenizer: Option<&'a str>,
    pub threads: u32,
    pub device: DeviceChoice,
    pub context_length: u32,
    /// MiB the model and its sessions may use (0 = no budget; the available memory is checked either way).
    pub memory_budget_mb: u32,
    /// MiB of the prefix cache shared by the model's sessions (0 = off); shrunk to what the budget leaves.
    pub prefix_cache_mb: u32,
    /// What the model's sessions do when a request would overflow their context.
    pub context_policy: ContextPolicy,
    pub kv_dtype: sprig_backend::KvDtype,
}

/// The C numbers of the context policies (`SPRIG_CONTEXT_*`).
pub fn context_policy_from_code(c: u32) -> FfiResult<ContextPolicy> {
    match c {
        crate::SPRIG_CONTEXT_TRUNCATE_MIDDLE => Ok(ContextPolicy::TruncateMiddle),
        crate::SPRIG_CONTEXT_SHIFT => Ok(ContextPolicy::Shift),
        crate::SPRIG_CONTEXT_ERROR => Ok(ContextPolicy::Error),
        other => Err(FfiError::arg(format!("context policy {other} is not one of SPRIG_CONTEXT_*"))),
    }
}

/// A C device number.
pub fn device_from_code(d: u32) -> FfiResult<DeviceChoice> {
    match d {
        SPRIG_DEVICE_CPU => Ok(DeviceChoice::Cpu),
        SPRIG_DEVICE_AUTO => Ok(DeviceChoice::Auto),
        SPRIG_DEVICE_GPU => Ok(DeviceChoice::Gpu),
        d => Err(FfiError::arg(format!("device {d} is not one of CPU (0), GPU (1), AUTO (2)"))),
    }
}

pub struct ModelHandle {
    pub engine: AnyEngine,
    pub context_length: usize,
    /// Given to each new session.
    pub context_policy: ContextPolicy,
    /// The caller's memory budget in bytes, kept by [`fit`] as sessions are made and run.
    budget: Option<u64>,
    /// The weights, one session's whole KV cache and the scratch (what the load was checked against).
    need: sprig_engine::memory::MemoryNeed,
}

/// What the model's prefix cache holds and saved.
pub fn prefix_cache_stats(id: u64) -> FfiResult<PrefixCacheStats> {
    Ok(model(id)?.engine.prefix_cache_stats())
}

pub struct SessionHandle {
    /// Empty only while a generation runs (the session is then on its model's batch thread).
    session: Mutex<Option<AnySession>>,
    /// The model's handle (its sessions share its memory budget).
    model: u64,
    /// When it last generated, on a counter shared by all sessions: the budget trims the longest idle first.
    last_used: AtomicU64,
    /// Set by `cancel` and `free`; shared with the batch thread running the session's request.
    cancel: Arc<AtomicBool>,
    /// The tool calls of the last chat reply, as OpenAI's JSON array.
    tool_calls: Mutex<String>,
    /// Chats hand the turns the model is unsure of to this teacher (see `set_escalation`).
    escalation: Mutex<Option<(Escalation, Arc<Endpoint>)>>,
    /// Why the last escalated turn's teacher did not answer (empty: it did, or nothing was escalated).
    escalation_reason: Mutex<String>,
}

struct Registry<T> {
    next: AtomicU64,
    map: Mutex<Option<HashMap<u64, Arc<T>>>>,
}

impl<T> Registry<T> {
    const fn new() -> Self {
        Registry { next: AtomicU64::new(1), map: Mutex::new(None) }
    }
    fn with<R>(&self, f: impl FnOnce(&mut HashMap<u64, Arc<T>>) -> R) -> R {
        // A panic never happens while the lock is held (plain map operations), but stay usable if it did.
        let mut g = self.map.lock().unwrap_or_else(|e| e.into_inner());
        f(g.get_or_insert_with(HashMap::new))
    }
    fn insert(&self, v: T) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.with(|m| m.insert(id, Arc::new(v)));
        id
    }
    fn get(&self, id: u64, what: &str) -> FfiResult<Arc<T>> {
        self.with(|m| m.get(&id).cloned())
            .ok_or_else(|| FfiError::new(SprigStatus::InvalidHandle, format!("invalid or already freed {what} handle")))
    }
    fn remove(&self, id: u64, what: &str) -> FfiResult<Arc<T>> {
        self.with(|m| m.remove(&id))
            .ok_or_else(|| FfiError::new(SprigStatus::InvalidHandle, format!("invalid or already freed {what} handle")))
    }
}

static MODELS: Registry<ModelHandle> = Registry::new();
static SESSIONS: Registry<SessionHandle> = Registry::new();

pub fn load_model(r: &LoadRequest) -> FfiResult<u64> {
    if r.path.is_empty() {
        return Err(FfiError::arg("model path is empty"));
    }
    let device = r.device;
    if r.threads > 1024 {
        return Err(FfiError::arg(format!("threads = {} is out of range (0 = one per core)", r.threads)));
    }
    let opts = LoadOptions { tokenizer: r.tokenizer.map(Into::into), quant: QuantChoice::Keep };
    let file = sprig_engine::open_model_file(std::path::Path::new(r.path), &opts).map_err(|e| engine_error(e, true))?;
    let trained = file.config.max_seq_len;
    let ctx = if r.context_length == 0 { trained } else { r.context_length as usize };
    if ctx > trained {
        return Err(FfiError::arg(format!("context length {ctx} exceeds the model's trained context of {trained}")));
    }
    let budget = (r.memory_budget_mb > 0).then(|| r.memory_budget_mb as u64 * (1 << 20));
    let need = sprig_engine::memory::MemoryNeed::of(&file, ctx, r.kv_dtype);
    sprig_engine::memory::check(&need, budget, "the model with one session").map_err(|e| engine_error(e, true))?;
    // Auto's fallback to the CPU is not an error; hosts see the device in use with sprig_model_device.
    let engine = AnyEngine::new(file, device, r.threads as usize, &mut |_| {}).map_err(|e| engine_error(e, true))?;
    engine.set_kv_dtype(r.kv_dtype);
    let prefix = sprig_engine::memory::prefix_cache_budget(r.prefix_cache_mb as u64 * (1 << 20), &need, budget);
    engine.set_prefix_cache_budget(prefix as usize);
    Ok(MODELS.insert(ModelHandle { engine, context_length: ctx, context_policy: r.context_policy, budget, need }))
}

pub fn model(id: u64) -> FfiResult<Arc<ModelHandle>> {
    MODELS.get(id, "model")
}

/// Where the model runs (what `AUTO` resolved to): CPU or GPU.
pub fn model_device(id: u64) -> FfiResult<DeviceChoice> {
    Ok(model(id)?.engine.device())
}

/// The device numbers of the C API.
pub fn device_code(d: DeviceChoice) -> u32 {
    match d {
        DeviceChoice::Cpu => SPRIG_DEVICE_CPU,
        DeviceChoice::Gpu => SPRIG_DEVICE_GPU,
        DeviceChoice::Auto => SPRIG_DEVICE_AUTO,
    }
}

/// Sessions created from the model keep its weights alive until they are freed too.
pub fn free_model(id: u64) -> FfiResult<()> {
    MODELS.remove(id, "model").map(drop)
}

pub fn new_session(model_id: u64) -> FfiResult<u64> {
    let m = model(model_id)?;
    fit(model_id, &m, None)?;
    let mut session = m.engine.new_session(m.context_length).map_err(|e| engine_error(e, false))?;
    session.set_context_policy(m.context_policy, 0);
    Ok(SESSIONS.insert(SessionHandle {
        session: Mutex::new(Some(session)),
        model: model_id,
        last_used: AtomicU64::new(TICK.fetch_add(1, Ordering::Relaxed)),
        cancel: Arc::new(AtomicBool::new(false)),
        tool_calls: Mutex::new("[]".into()),
        escalation: Mutex::new(None),
        escalation_reason: Mutex::new(String::new()),
    }))
}

/// Orders sessions by use (see `SessionHandle::last_used`).
static TICK: AtomicU64 = AtomicU64::new(0);

/// Keeps model `model_id`'s memory budget as a session is made (`active` = None) or starts a request: the
/// weights, the scratch and that session's whole KV cache, plus what the model's other sessions hold (an idle
/// one its touched KV pages, one generating its whole cache) and the prefix cache, must fit. What gives way, in
/// order: the prefix cache, then idle sessions, longest idle first (trimmed: their KV cache goes, their
/// conversation stays and continues exactly, see `Session::trim`). Fails with `OUT_OF_MEMORY` when even that
/// is not enough.
fn fit(model_id: u64, m: &ModelHandle, active: Option<u64>) -> FfiResult<()> {
    let Some(budget) = m.budget else { return Ok(()) };
    let others: Vec<Arc<SessionHandle>> =
        SESSIONS.with(|map| map.iter().filter(|(id, s)| s.model == model_id && Some(**id) != active).map(|(_, s)| s.clone()).collect());
    let (mut held, mut idle) = (0u64, Vec::new());
    for s in others {
        let resident = match s.session.try_lock() {
            Ok(g) => g.as_ref().map(|x| x.kv_resident_bytes()),
            Err(_) => None,
        };
        match resident {
            Some(r) => {
                held += r;
                if r > 0 {
                    idle.push((s.last_used.load(Ordering::Relaxed), r, s));
                }
            }
            // Generating (or lost by a failure): it may fill its whole cache.
            None => held += m.need.kv_cache,
        }
    }
    let fixed = m.need.total();
    let over = |held: u64| -> u64 {
        let prefix = m.engine.prefix_cache_stats().bytes as u64;
        (fixed + held + prefix).saturating_sub(budget)
    };
    // The prefix cache first, as far as it can go.
    let shrink = |over: u64| {
        let prefix = m.engine.prefix_cache_stats().bytes as u64;
        m.engine.shrink_prefix_cache(prefix.saturating_sub(over) as usize);
    };
    shrink(over(held));
    idle.sort_by_key(|x| x.0);
    for (_, resident, s) in idle {
        if over(held) == 0 {
            break;
        }
        // A session that started generating meanwhile is left alone.
        let Ok(mut g) = s.session.try_lock() else { continue };
        let Some(x) = g.as_mut() else { continue };
        x.trim().map_err(|e| engine_error(e, false))?;
        held -= resident;
        // Its blocks went into the prefix cache, which gives way again.
        shrink(over(held));
    }
    let left = over(held);
    if left > 0 {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        return Err(FfiError::new(
            SprigStatus::OutOfMemory,
            format!(
                "the model's sessions need {:.1} MiB more than the memory budget of {:.1} MiB (sessions generating now cannot give way; free a session or use a smaller context)",
                mib(left),
                mib(budget)
            ),
        ));
    }
    Ok(())
}

/// Freeing a session while it generates on another thread cancels that generation; its memory goes when it
/// returns.
pub fn free_session(id: u64) -> FfiResult<()> {
    let s = SESSIONS.remove(id, "session")?;
    s.cancel.store(true, Ordering::SeqCst);
    Ok(())
}

pub fn cancel(id: u64) -> FfiResult<()> {
    SESSIONS.get(id, "session")?.cancel.store(true, Ordering::SeqCst);
    Ok(())
}

/// A session, locked for one call.
struct Locked<'a>(std::sync::MutexGuard<'a, Option<AnySession>>);

impl std::ops::Deref for Locked<'_> {
    type Target = AnySession;
    fn deref(&self) -> &AnySession {
        // `lock` hands out only a filled slot, and `generate` fills it again before it returns.
        self.0.as_ref().expect("a locked session is in its slot")
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut AnySession {
        self.0.as_mut().expect("a locked session is in its slot")
    }
}

fn lock(s: &SessionHandle) -> FfiResult<Locked<'_>> {
    let g = match s.session.try_lock() {
        Ok(g) => g,
        Err(TryLockError::WouldBlock) => {
            return Err(FfiError::new(SprigStatus::Busy, "another generation is running on this session"))
        }
        // A previous call panicked mid-generation: the state is unknown, start the conversation over.
        Err(TryLockError::Poisoned(p)) => {
            let mut g = p.into_inner();
            if let Some(s) = g.as_mut() {
                s.reset().map_err(|e| engine_error(e, false))?;
            }
            g
        }
    };
    match g.is_some() {
        true => Ok(Locked(g)),
        false => Err(FfiError::new(SprigStatus::Internal, "the session was lost by a failed generation; free it")),
    }
}

pub fn reset(id: u64) -> FfiResult<()> {
    let s = SESSIONS.get(id, "session")?;
    let r = lock(&s)?.reset().map_err(|e| engine_error(e, false));
    r
}

/// Lets session `id`'s KV cache go, keeping the conversation (see `Session::trim`); the bytes it held.
pub fn trim_session(id: u64) -> FfiResult<u64> {
    let s = SESSIONS.get(id, "session")?;
    let r = lock(&s)?.trim().map_err(|e| engine_error(e, false));
    r
}

/// Evicts model `id`'s prefix cache down to `bytes`.
pub fn shrink_prefix_cache(id: u64, bytes: u64) -> FfiResult<()> {
    model(id)?.engine.shrink_prefix_cache(usize::try_from(bytes).unwrap_or(usize::MAX));
    Ok(())
}

/// Saves session `id` to `path` (KV cache, tokens, random stream).
pub fn save_session(id: u64, path: &str) -> FfiResult<()> {
    let s = SESSIONS.get(id, "session")?;
    let r = lock(&s)?.save(std::path::Path::new(path)).map_err(|e| engine_error(e, true));
    r
}

/// Replaces session `id` with the one saved at `path`; on failure the session is left fresh.
pub fn load_session(id: u64, path: &str) -> FfiResult<()> {
    let s = SESSIONS.get(id, "session")?;
    let r = lock(&s)?.load(std::path::Path::new(path)).map_err(|e| engine_error(e, true));
    r
}

/// Speculative decoding for session `id` from its next generation on: drafter 0 = off, 1 = prompt lookup, 2 =
/// the model `draft_model` (same tokenizer), 3 = the model's MTP head; mode 0 = auto, 1 = always; `max_draft`
/// 1..=32.
pub fn set_speculation(id: u64, drafter: u32, draft_model: Option<u64>, mode: u32, max_draft: u32) -> FfiResult<()> {
    use sprig_engine::speculative::{MtpHead, PromptLookup, SpecMode, Speculation};
    let mode = match mode {
        0 => SpecMode::Auto,
        1 => SpecMode::On,
        m => return Err(FfiError::arg(format!("speculation mode {m} is not a SPRIG_SPEC_MODE_* value"))),
    };
    if !(1..=32).contains(&max_draft) {
        return Err(FfiError::arg(format!("max_draft {max_draft} is not in 1..=32")));
    }
    let s = SESSIONS.get(id, "session")?;
    let mut session = lock(&s)?;
    let spec = match (drafter, draft_model) {
        (0, _) => None,
        (1, _) => Some(Box::new(PromptLookup::default()) as Box<dyn sprig_engine::speculative::Drafter>),
        (2, Some(m)) => {
            let draft = model(m)?;
            Some(draft.engine.drafter_for(&session.engine(), draft.context_length).map_err(|e| engine_error(e, false))?)
        }
        (2, None) => return Err(FfiError::arg("SPRIG_SPEC_DRAFT_MODEL needs a draft model")),
        (3, _) if !session.engine().has_mtp() => {
            return Err(FfiError::arg("SPRIG_SPEC_MTP: the session's model has no multi-token-prediction head"))
        }
        (3, _) => Some(Box::new(MtpHead) as Box<dyn sprig_engine::speculative::Drafter>),
        (d, _) => return Err(FfiError::arg(format!("drafter {d} is not a SPRIG_SPEC_* value"))),
    };
    session.set_speculation(spec.map(|d| Speculation::new(d, mode, max_draft as usize)));
    Ok(())
}

/// Session `id`'s speculative decoding figures (zeros when it does not speculate).
pub fn speculation_stats(id: u64) -> FfiResult<sprig_engine::speculative::SpecStats> {
    let s = SESSIONS.get(id, "session")?;
    let stats = lock(&s)?.speculation_stats().unwrap_or_default();
    Ok(stats)
}

/// What a generation did (`SprigGenerateResult` in C).
#[derive(Clone, Debug)]
pub struct Outcome {
    pub stop: StopReason,
    pub prompt_tokens: u32,
    pub generated_tokens: u32,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    pub cached_tokens: u32,
    pub prefix_cache_tokens: u32,
    pub context_dropped: u32,
    /// The reply's tool calls (a chat with tools).
    pub tool_calls: Vec<sprig_engine::ToolCall>,
    /// Decode steps run in one batch with other sessions' requests.
    pub batched_steps: u32,
    /// Who answered (always the local model without escalation).
    pub answered_by: AnsweredBy,
    /// Escalation's signal for this turn (mean entropy, nats) when the local model ran first.
    pub escalation_signal: Option<f32>,
}

/// Tool calls as OpenAI's JSON array (`arguments` a JSON string).
pub fn tool_calls_json(calls: &[sprig_engine::ToolCall]) -> String {
    serde_json::Value::from(calls.iter().map(|c| c.to_openai()).collect::<Vec<_>>()).to_string()
}

/// The C number and the Kotlin `StopReason` name of a stop reason.
pub fn stop_reason(s: StopReason) -> (u32, &'static str) {
    match s {
        StopReason::StopToken => (SPRIG_STOP_TOKEN, "STOP_TOKEN"),
        StopReason::Length => (SPRIG_STOP_LENGTH, "LENGTH"),
        StopReason::Cancelled => (SPRIG_STOP_CANCELLED, "CANCELLED"),
        StopReason::ContextFull => (SPRIG_STOP_CONTEXT_FULL, "CONTEXT_FULL"),
        StopReason::StopString => (SPRIG_STOP_STRING, "STOP_STRING"),
        StopReason::ConstraintUnsatisfied => (SPRIG_STOP_CONSTRAINT_UNSATISFIED, "CONSTRAINT_UNSATISFIED"),
    }
}

fn outcome(s: &GenerationStats) -> Outcome {
    Outcome {
        stop: s.stop,
        prompt_tokens: s.prompt_tokens as u32,
        generated_tokens: s.generated.len() as u32,
        prefill_tok_s: s.prefill_tok_s(),
        decode_tok_s: s.decode_tok_s(),
        cached_tokens: s.cached_tokens as u32,
        prefix_cache_tokens: s.prefix_cache_tokens as u32,
        context_dropped: s.context_dropped as u32,
        tool_calls: s.tool_calls.clone(),
        batched_steps: s.batched_steps as u32,
        answered_by: AnsweredBy::Student,
        escalation_signal: None,
    }
}

/// A request's tools from the C/JNI strings: a clear error for anything but OpenAI's `tools` array.
pub fn tools(json: &str, choice: &str, constrain: bool) -> FfiResult<Tools> {
    Tools::from_json(json, ToolChoice::parse(choice), constrain).map_err(|e| engine_error(e, false))
}

/// The tool calls of session `id`'s last chat reply (OpenAI's JSON array).
pub fn last_tool_calls(id: u64) -> FfiResult<String> {
    let s = SESSIONS.get(id, "session")?;
    let calls = s.tool_calls.lock().map(|c| c.clone()).unwrap_or_else(|p| p.into_inner().clone());
    Ok(calls)
}

/// One request's sampling, as the C ABI and JNI hand it over.
pub struct Sampling {
    pub params: SamplingParams,
    pub max_tokens: u32,
    /// Raw prompts only: special-token strings in the text become control tokens.
    pub parse_special: bool,
    /// Chats only: tools offered to the model.
    pub tools: Option<Tools>,
}

pub enum Input<'a> {
    Text(&'a str),
    Chat(Vec<ChatMessage>),
}

/// Runs one generation on session `id`; `on_text` gets each piece of text and returns false to stop.
/// Cancellation (another thread calling [`cancel`]) is checked between prefill chunks and before each new
/// token; afterwards the session holds exactly the tokens that were run, and the next call continues from there.
pub fn generate(id: u64, input: Input, p: &Sampling, on_text: impl FnMut(&str) -> bool) -> FfiResult<Outcome> {
    let handle = SESSIONS.get(id, "session")?;
    let mut session = lock(&handle)?;
    handle.last_used.store(TICK.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
    // A freed model's sessions keep its weights but no longer its budget.
    if let Ok(m) = model(handle.model) {
        fit(handle.model, &m, Some(id))?;
    }
    handle.cancel.store(false, Ordering::SeqCst);
    let prompt = match input {
        Input::Text(_) if p.tools.is_some() => return Err(FfiError::arg("tools are offered in a chat; use chat")),
        Input::Text(t) => Prompt::Text { text: t.to_string(), parse_special: p.parse_special },
        Input::Chat(_) if !session.has_chat_template() => {
            return Err(FfiError::arg("this model carries no chat template; use generate"))
        }
        Input::Chat(m) => match &p.tools {
            Some(t) => Prompt::ChatWithTools(m, t.clone()),
            None => Prompt::Chat(m),
        },
    };
    if let Ok(mut r) = handle.escalation_reason.lock() {
        r.clear();
    }
    let escalation = handle.escalation.lock().ok().and_then(|g| g.clone());
    if let (Prompt::Chat(messages), Some((esc, teacher))) = (&prompt, escalation) {
        if p.params.constraint.is_none() {
            return escalated(&handle, &mut session.0, messages.clone(), p, &esc, &teacher, on_text);
        }
    }
    // Through the model's batch thread: sessions of one model generating at the same time (from the host's
    // threads or coroutines) decode as one batch. `on_text` runs here, on the calling thread.
    let stats = sprig_engine::generate_together(&mut session.0, prompt, p.params.clone(), p.max_tokens as usize, handle.cancel.clone(), on_text, None)
        .map_err(|e| engine_error(e, false))?;
    let out = outcome(&stats);
    if let Ok(mut c) = handle.tool_calls.lock() {
        *c = tool_calls_json(&out.tool_calls);
    }
    Ok(out)
}

/// A chat turn under the session's escalation: the local model first (through the batch thread, as any
/// request), the teacher when the policy and the signal say so; `sprig_session_cancel` stops either.
fn escalated(
    handle: &SessionHandle,
    slot: &mut Option<AnySession>,
    messages: Vec<ChatMessage>,
    p: &Sampling,
    esc: &Escalation,
    teacher: &Endpoint,
    mut on_text: impl FnMut(&str) -> bool,
) -> FfiResult<Outcome> {
    let max = p.max_tokens as usize;
    let cancel = handle.cancel.clone();
    let mut run_student = |prompt, params: &SamplingParams, text: &mut dyn FnMut(&str) -> bool, lp: &mut dyn FnMut(&sprig_engine::TokenLogprob)| {
        sprig_engine::generate_together(slot, prompt, params.clone(), max, cancel.clone(), text, Some(lp))
    };
    let mut shown = |t: &str| !handle.cancel.load(Ordering::SeqCst) && on_text(t);
    let turn = escalate::answer(esc, Some(teacher), &messages, &p.params, max, &mut run_student, &mut shown)
        .map_err(|e| engine_error(e, false))?;
    if let Ok(mut r) = handle.escalation_reason.lock() {
        *r = turn.report.reason.clone().unwrap_or_default();
    }
    if let Ok(mut c) = handle.tool_calls.lock() {
        *c = "[]".into();
    }
    // Nothing ran locally when the teacher answered at once: zeros.
    let mut out = outcome(turn.stats.as_ref().unwrap_or(&GenerationStats::default()));
    if turn.report.answered_by == AnsweredBy::Teacher {
        // The teacher's reply is the conversation's; the local model's stopped start is not.
        if let Some(s) = slot.as_mut() {
            s.record_reply(&messages, &turn.text);
        }
        out.stop = if handle.cancel.load(Ordering::SeqCst) { StopReason::Cancelled } else { StopReason::StopToken };
    }
    out.answered_by = turn.report.answered_by;
    out.escalation_signal = turn.report.signal;
    Ok(out)
}

/// An escalation from the C/JNI settings (`policy` by name: never, threshold, always), checked.
pub fn escalation(
    url: &str,
    model: &str,
    api_key: Option<String>,
    policy: &str,
    threshold: f32,
    window: i64,
    timeout_ms: i64,
) -> FfiResult<(Escalation, Endpoint)> {
    let (window, timeout) = (window.max(0) as usize, std::time::Duration::from_millis(timeout_ms.max(0) as u64));
    sprig_remote::escalation(url, model, api_key, policy, threshold, window, timeout).map_err(FfiError::arg)
}

/// Sets (or, with `None`, removes) the teacher that session `id`'s chats escalate to.
pub fn set_escalation(id: u64, escalation: Option<(Escalation, Endpoint)>) -> FfiResult<()> {
    let h = SESSIONS.get(id, "session")?;
    let mut g = h.escalation.lock().map_err(|_| FfiError::new(SprigStatus::Internal, "the session's lock is poisoned"))?;
    *g = escalation.map(|(e, ep)| (e, Arc::new(ep)));
    Ok(())
}

/// Why session `id`'s last escalated turn fell back to the local model ("" when it did not).
pub fn escalation_reason(id: u64) -> FfiResult<String> {
    let h = SESSIONS.get(id, "session")?;
    let r = h.escalation_reason.lock().map(|r| r.clone()).unwrap_or_default();
    Ok(r)
}

/// Runs `f`, turning a panic into an `Internal` error so none crosses the boundary.
pub fn guard<T>(f: impl FnOnce() -> FfiResult<T>) -> FfiResult<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(FfiError::new(SprigStatus::Internal, format!("internal error: {msg}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sprig_backend::BackendError;
    use sprig_models::ModelError;

    #[test]
    fn statuses_say_what_the_caller_can_do() {
        let device_failed = || BackendError::DeviceFailed { op: "read", message: "lost".into() };
        let oom = || BackendError::OutOfMemory { what: "a KV cache".into(), needed: 2, available: 1 };
        let cases: Vec<(EngineError, bool, SprigStatus)> = vec![
            // A GPU failure, wherever it surfaced, while running or loading.
            (EngineError::Backend(device_failed()), false, SprigStatus::Device),
            (EngineError::Model(ModelError::Backend(device_failed())), false, SprigStatus::Device),
            (EngineError::Backend(BackendError::DeviceUnavailable("none".into())), true, SprigStatus::Device),
            (EngineError::Model(ModelError::Backend(oom())), false, SprigStatus::OutOfMemory),
            (EngineError::Model(ModelError::ContextOverflow { pos: 1, new: 2, ctx: 2 }), false, SprigStatus::ContextFull),
            (EngineError::EmptyPrompt, false, SprigStatus::InvalidArgument),
            (EngineError::NoChatTemplate, false, SprigStatus::InvalidArgument),
            (EngineError::Sampling { param: "top_p", detail: "2".into() }, false, SprigStatus::InvalidArgument),
            // A corrupt file is a load failure; the same inconsistency while running is sprig's bug.
            (EngineError::Model(ModelError::NoTokens), true, SprigStatus::LoadFailed),
            (EngineError::Model(ModelError::ForeignState { layer: 0 }), false, SprigStatus::Internal),
        ];
        for (e, loading, want) in cases {
            let what = e.to_string();
            assert_eq!(engine_error(e, loading).status, want, "{what} (loading: {loading})");
        }
        // Kotlin resolves statuses by these names (android/.../Sprig.kt `SprigStatus`, the same order).
        let kotlin = include_str!("../../../android/sprig/src/main/kotlin/dev/sprig/Sprig.kt");
        let line = kotlin.lines().find(|l| l.starts_with("enum class SprigStatus")).expect("SprigStatus enum");
        let all = [
            SprigStatus::Ok,
            SprigStatus::InvalidArgument,
            SprigStatus::InvalidHandle,
            SprigStatus::LoadFailed,
            SprigStatus::ContextFull,
            SprigStatus::Busy,
            SprigStatus::Device,
            SprigStatus::Internal,
            SprigStatus::OutOfMemory,
        ];
        let names: Vec<&str> = all.iter().map(|s| s.name()).collect();
        assert!(line.contains(&names.join(", ")), "{line} vs {names:?}");
    }
}
