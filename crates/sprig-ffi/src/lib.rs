//! sprig's C ABI. The header `include/sprig.h` is generated from this file by cbindgen (a test fails when it
//! is stale; `SPRIG_BLESS=1 cargo test -p sprig-ffi --test header` rewrites it).
//!
//! Conventions:
//! - Every function returns a `SprigStatus`; on failure `sprig_last_error()` gives the message (thread-local:
//!   the last failure on the calling thread). No panic crosses the boundary: it becomes `SPRIG_STATUS_INTERNAL`.
//! - `SprigModel*` / `SprigSession*` are opaque handles, never dereferenced: null, freed or made-up handles
//!   give `SPRIG_STATUS_INVALID_HANDLE`, including a second free.
//! - Strings are NUL-terminated UTF-8; invalid UTF-8 gives `SPRIG_STATUS_INVALID_ARGUMENT`.
//!
//! Thread safety: every function may be called from any thread. A model may be shared by sessions on many
//! threads. One session runs one generation at a time (a concurrent call gets `SPRIG_STATUS_BUSY`);
//! `sprig_session_cancel` may be called from any thread while it runs.
#![deny(clippy::undocumented_unsafe_blocks)]

mod core;
mod jni;

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};

pub use crate::core::SprigStatus;
use crate::core::{FfiError, FfiResult, Input, LoadRequest, Outcome, Sampling};
use sprig_engine::Constraint;

/// Bumped when a function signature or struct layout changes incompatibly.
pub const SPRIG_ABI_VERSION: u32 = 9;

/// Run on the CPU.
pub const SPRIG_DEVICE_CPU: u32 = 0;
/// Run on the GPU (wgpu); `SPRIG_STATUS_DEVICE` when the build or the machine has none.
pub const SPRIG_DEVICE_GPU: u32 = 1;
/// The GPU when there is one, else the CPU.
pub const SPRIG_DEVICE_AUTO: u32 = 2;

/// The model produced a stop token (end of sequence / end of turn).
pub const SPRIG_STOP_TOKEN: u32 = 0;
/// `max_tokens` were generated.
pub const SPRIG_STOP_LENGTH: u32 = 1;
/// `sprig_session_cancel` was called, or the callback returned false.
pub const SPRIG_STOP_CANCELLED: u32 = 2;
/// The session's context is full.
pub const SPRIG_STOP_CONTEXT_FULL: u32 = 3;
/// The generated text reached one of `SprigSamplingParams.stop` (not included in the streamed text).
pub const SPRIG_STOP_STRING: u32 = 4;
/// Generation ended (length, context, stop string) before the output matched the request's constraint: the
/// text is incomplete, not valid output.
pub const SPRIG_STOP_CONSTRAINT_UNSATISFIED: u32 = 5;

/// `SprigSamplingParams.constraint_kind`: free text.
pub const SPRIG_CONSTRAINT_NONE: u32 = 0;
/// `constraint` is a JSON Schema; the output is an instance of it.
pub const SPRIG_CONSTRAINT_JSON_SCHEMA: u32 = 1;
/// `constraint` is a regular expression the whole output matches.
pub const SPRIG_CONSTRAINT_REGEX: u32 = 2;
/// `constraint` is a Lark grammar (llguidance's dialect).
pub const SPRIG_CONSTRAINT_GRAMMAR: u32 = 3;
/// Any JSON object (`constraint` unused).
pub const SPRIG_CONSTRAINT_JSON_OBJECT: u32 = 4;

/// Context policy (`SprigModelOptions.context_policy`): keep the system prompt, drop the oldest turns and run
/// the kept tail again (exact).
pub const SPRIG_CONTEXT_TRUNCATE_MIDDLE: u32 = 0;
/// The same drop, the kept keys rotated to their new positions instead (llama.cpp's context shift: cheap,
/// approximate).
pub const SPRIG_CONTEXT_SHIFT: u32 = 1;
/// No dropping: `SPRIG_STATUS_CONTEXT_FULL` for a prompt that does not fit, `SPRIG_STOP_CONTEXT_FULL` while
/// generating.
pub const SPRIG_CONTEXT_ERROR: u32 = 2;

/// KV cache storage (`SprigModelOptions.kv_type`): f32.
pub const SPRIG_KV_F32: u32 = 0;
/// int8 codes with a scale per position and KV head: about a quarter of the f32 bytes.
pub const SPRIG_KV_Q8: u32 = 1;

/// `sprig_session_set_speculation`: no speculative decoding.
pub const SPRIG_SPEC_OFF: u32 = 0;
/// Draft by prompt lookup (what followed the latest earlier occurrence of the last few tokens).
pub const SPRIG_SPEC_LOOKUP: u32 = 1;
/// Draft with a smaller loaded model of the same tokenizer.
pub const SPRIG_SPEC_DRAFT_MODEL: u32 = 2;
/// Draft with the model's own multi-token-prediction head (a file with GGUF `nextn` layers).
pub const SPRIG_SPEC_MTP: u32 = 3;
/// Speculate while it is faster than plain decoding (measured; switched off for the session otherwise).
pub const SPRIG_SPEC_MODE_AUTO: u32 = 0;
/// Always speculate.
pub const SPRIG_SPEC_MODE_ON: u32 = 1;

/// `SprigEscalation.policy`: the local model answers every turn (the signal is still measured).
pub const SPRIG_ESCALATE_NEVER: u32 = 0;
/// The teacher answers when the local model's mean entropy over its first reply tokens exceeds `threshold`.
pub const SPRIG_ESCALATE_THRESHOLD: u32 = 1;
/// The teacher answers every turn it can.
pub const SPRIG_ESCALATE_ALWAYS: u32 = 2;

/// `SprigGenerateResult.answered_by`: the local model.
pub const SPRIG_ANSWERED_LOCAL: u32 = 0;
/// The teacher (escalated; its text came through the callback).
pub const SPRIG_ANSWERED_TEACHER: u32 = 1;
/// Escalated, but the teacher could not answer (`sprig_session_escalation_reason` says why): the local model did.
pub const SPRIG_ANSWERED_LOCAL_AFTER_TEACHER_FAILED: u32 = 2;

/// Where a session's chats escalate: a teacher behind an OpenAI-compatible endpoint, answering through
/// `/v1/chat/completions` (streamed). Offline, slow (`timeout_ms`), failing or malformed: the local model
/// answers and the reason is kept. Plain `http://` unless the library was built with the `tls` feature.
#[repr(C)]
pub struct SprigEscalation {
    /// `http://host:port` (or its `/v1`). NUL-terminated UTF-8.
    pub url: *const c_char,
    /// `model` of the requests; NULL: "teacher".
    pub model: *const c_char,
    /// Sent as `Authorization: Bearer …`; NULL: none.
    pub api_key: *const c_char,
    /// `SPRIG_ESCALATE_*`.
    pub policy: u32,
    /// Mean entropy (nats) above which a turn escalates (`SPRIG_ESCALATE_THRESHOLD`).
    pub threshold: f32,
    /// Reply tokens whose mean entropy is the signal (held back until it is known), ≥ 1.
    pub window: u32,
    /// Longest a teacher's answer may take, in milliseconds (≥ 1).
    pub timeout_ms: u32,
}

/// What a session's speculative decoding did so far.
#[repr(C)]
#[derive(Default)]
pub struct SprigSpecStats {
    /// Tokens drafted and checked by the model.
    pub drafted: u64,
    /// Of those, accepted.
    pub accepted: u64,
    /// Verification passes.
    pub passes: u64,
    /// Tokens the passes produced (accepted drafts + one of the model's own each).
    pub pass_tokens: u64,
    /// 1 when `SPRIG_SPEC_MODE_AUTO` found speculation slower and switched it off.
    pub switched_off: u32,
}

/// A loaded model (opaque).
pub struct SprigModel {
    _private: [u8; 0],
}

/// A conversation with a model: its own KV cache, sharing the model's weights (opaque).
pub struct SprigSession {
    _private: [u8; 0],
}

/// Options of `sprig_model_load`; start from `sprig_model_options_default()`.
#[repr(C)]
pub struct SprigModelOptions {
    /// Tokenizer file for llama2.c checkpoints (`tokenizer.bin` / `tokenizer.model`); NULL otherwise.
    pub tokenizer_path: *const c_char,
    /// Worker threads; 0 = one per physical core.
    pub threads: u32,
    /// `SPRIG_DEVICE_*`.
    pub device: u32,
    /// Tokens each session can hold; 0 = the model's trained context.
    pub context_length: u32,
    /// MiB the model and its sessions may use (weights + KV caches + prefix cache + scratch); 0 = no budget.
    /// Checked before loading with one session (`SPRIG_STATUS_OUT_OF_MEMORY` when it does not fit; the memory
    /// the system has available is checked either way), then kept as sessions are made and run: the prefix
    /// cache, then the longest-idle sessions (trimmed as by `sprig_session_trim`) give way, and a new session or
    /// request that still does not fit is `SPRIG_STATUS_OUT_OF_MEMORY`.
    pub memory_budget_mb: u32,
    /// MiB of K/V of prompt blocks shared by the model's sessions (a request starting like an earlier one
    /// runs only the rest); 0 = off. Shrunk to what `memory_budget_mb` leaves. Default 256.
    pub prefix_cache_mb: u32,
    /// `SPRIG_CONTEXT_*`: what sessions do when a request would overflow their context.
    pub context_policy: u32,
    /// `SPRIG_KV_*`: how sessions store their KV cache.
    pub kv_type: u32,
}

/// What a model's prefix cache holds and saved (`sprig_model_prefix_cache_stats`).
#[repr(C)]
#[derive(Default)]
pub struct SprigPrefixCacheStats {
    /// Requests run by the model's sessions.
    pub requests: u64,
    /// Their prompt tokens, cached or run.
    pub prompt_tokens: u64,
    /// Prompt tokens not run: from the session's own cache or the prefix cache.
    pub cached_tokens: u64,
    /// Of those, from the prefix cache shared by the sessions.
    pub shared_tokens: u64,
    pub blocks: u64,
    pub bytes: u64,
    pub budget_bytes: u64,
    pub evicted_blocks: u64,
}

/// Sampling of `sprig_session_generate` / `sprig_session_chat`; start from `sprig_sampling_params_default()`.
#[repr(C)]
pub struct SprigSamplingParams {
    /// 0 = greedy; must be ≥ 0.
    pub temperature: f32,
    /// 0 = no top-k cut.
    pub top_k: u32,
    /// In (0, 1]; 1 = no nucleus cut.
    pub top_p: f32,
    /// In [0, 1): drops tokens less likely than `min_p` × the most likely one; 0 = off.
    pub min_p: f32,
    /// In (0, 1]: locally typical sampling's mass; 1 = off.
    pub typical_p: f32,
    /// > 0: divides positive (multiplies negative) logits of tokens in the last `penalty_last_n`; 1 = off.
    pub repeat_penalty: f32,
    /// Subtracted once from the logit of each token in the window; 0 = off.
    pub presence_penalty: f32,
    /// Subtracted per occurrence in the window; 0 = off.
    pub frequency_penalty: f32,
    /// Tokens (prompt and generated) the penalties look back over; 0 = none.
    pub penalty_last_n: u32,
    /// `n_logit_bias` entries added to logits before sampling (NULL when 0); -INFINITY bans a token.
    pub logit_bias: *const SprigLogitBias,
    pub n_logit_bias: usize,
    /// `n_stop` NUL-terminated UTF-8 strings (NULL when 0): generation stops when the text contains one.
    pub stop: *const *const c_char,
    pub n_stop: usize,
    /// The session's random stream starts from this seed and carries on over its requests until another
    /// seed is given.
    pub seed: u64,
    /// Most tokens to generate.
    pub max_tokens: u32,
    /// `sprig_session_generate` only: special-token strings in the prompt (`<|im_start|>`) become control
    /// tokens. Default false: the prompt is plain text. Chat message content is always plain text; only the
    /// chat template writes control tokens.
    pub parse_special: bool,
    /// `SPRIG_CONSTRAINT_*`: what the output must match. An invalid or unsupported constraint is
    /// `SPRIG_STATUS_INVALID_ARGUMENT` before any token is generated.
    pub constraint_kind: u32,
    /// The schema, regex or grammar text (NULL for NONE and JSON_OBJECT).
    pub constraint: *const c_char,
    /// `sprig_session_chat` only (`sprig_session_generate` refuses it): tools the model may call, a JSON array in
    /// OpenAI's `tools` shape (NULL: none).
    /// The reply's calls are counted in `SprigGenerateResult.tool_calls`; `sprig_session_tool_calls` gives them.
    pub tools_json: *const c_char,
    /// "auto" (also when NULL), "none", "required", or the name of the one tool to call.
    pub tool_choice: *const c_char,
    /// Hold tool calls to the tools' parameter schemas (default true); false only parses what the model wrote.
    pub constrain_tools: bool,
}

/// A bias on one token's logit.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SprigLogitBias {
    pub token: u32,
    pub bias: f32,
}

/// One chat turn.
#[repr(C)]
pub struct SprigChatMessage {
    /// "system", "user" or "assistant".
    pub role: *const c_char,
    pub content: *const c_char,
}

/// What a generation did.
#[repr(C)]
#[derive(Default)]
pub struct SprigGenerateResult {
    /// `SPRIG_STOP_*`.
    pub stop_reason: u32,
    pub prompt_tokens: u32,
    pub generated_tokens: u32,
    pub prefill_tokens_per_second: f64,
    pub decode_tokens_per_second: f64,
    /// Prompt tokens not run because their K/V was cached (`prompt_tokens` counts those that ran).
    pub cached_tokens: u32,
    /// Of `cached_tokens`, those from the prefix cache shared by the model's sessions.
    pub prefix_cache_tokens: u32,
    /// Tokens the context policy dropped to make room during this call.
    pub context_dropped_tokens: u32,
    /// Tool calls in the reply (a chat with `tools_json`); `sprig_session_tool_calls` gives them.
    pub tool_calls: u32,
    /// Decode steps this request ran in one batch with other sessions of the model generating at the same
    /// time (their tokens went through the weights together).
    pub batched_steps: u32,
    /// `SPRIG_ANSWERED_*`: who answered a chat under escalation (always `SPRIG_ANSWERED_LOCAL` without).
    pub answered_by: u32,
    /// Escalation's signal for the turn: the local model's mean entropy over its first reply tokens (nats);
    /// NaN when it did not run first or the session does not escalate.
    pub escalation_signal: f32,
}

/// Receives each piece of generated text (`len` bytes of UTF-8, NUL-terminated, valid during the call only).
/// Return false to stop generating. Called on the thread that called generate/chat.
pub type SprigTokenCallback =
    Option<unsafe extern "C" fn(text: *const c_char, len: usize, user_data: *mut c_void) -> bool>;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn fail(e: FfiError) -> SprigStatus {
    let msg = CString::new(e.message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|l| *l.borrow_mut() = msg);
    e.status
}

/// Runs an API call: its error (or a caught panic) becomes the status and the thread's last error.
fn call(f: impl FnOnce() -> FfiResult<()>) -> SprigStatus {
    match core::guard(f) {
        Ok(()) => SprigStatus::Ok,
        Err(e) => fail(e),
    }
}

/// # Safety
/// `p` is null or a NUL-terminated string that stays valid for the call.
unsafe fn str_arg<'a>(p: *const c_char, what: &str) -> FfiResult<&'a str> {
    if p.is_null() {
        return Err(FfiError::arg(format!("{what} is NULL")));
    }
    // SAFETY: non-null and NUL-terminated per this function's contract.
    unsafe { CStr::from_ptr(p) }.to_str().map_err(|e| FfiError::arg(format!("{what} is not valid UTF-8: {e}")))
}

fn handle_id<T>(p: *const T, what: &str) -> FfiResult<u64> {
    if p.is_null() {
        return Err(FfiError::new(SprigStatus::InvalidHandle, format!("{what} handle is NULL")));
    }
    Ok(p as usize as u64)
}

/// The library version, e.g. "0.1.0" (static storage). Thread safety: any thread.
#[no_mangle]
pub extern "C" fn sprig_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// `SPRIG_ABI_VERSION` of the library actually loaded (compare with the header's). Thread safety: any thread.
#[no_mangle]
pub extern "C" fn sprig_abi_version() -> u32 {
    SPRIG_ABI_VERSION
}

/// The message of the last failed call on this thread ("" if none). Valid until the next failing call on
/// this thread. Thread safety: per thread by design.
#[no_mangle]
pub extern "C" fn sprig_last_error() -> *const c_char {
    LAST_ERROR.with(|l| l.borrow().as_ptr())
}

#[no_mangle]
pub extern "C" fn sprig_model_options_default() -> SprigModelOptions {
    SprigModelOptions {
        tokenizer_path: std::ptr::null(),
        threads: 0,
        device: SPRIG_DEVICE_CPU,
        context_length: 0,
        memory_budget_mb: 0,
        prefix_cache_mb: (sprig_engine::prefix_cache::DEFAULT_BUDGET_BYTES >> 20) as u32,
        context_policy: SPRIG_CONTEXT_TRUNCATE_MIDDLE,
        kv_type: SPRIG_KV_F32,
    }
}

/// The engine's defaults (the same as the CLI's and Kotlin's): greedy, top-k 40, top-p 0.95, penalties off
/// over a window of 64, no bias, no stop strings, seed 0, 256 tokens.
#[no_mangle]
pub extern "C" fn sprig_sampling_params_default() -> SprigSamplingParams {
    let d = sprig_engine::SamplingParams::default();
    SprigSamplingParams {
        temperature: d.temperature,
        top_k: d.top_k as u32,
        top_p: d.top_p,
        min_p: d.min_p,
        typical_p: d.typical_p,
        repeat_penalty: d.repeat_penalty,
        presence_penalty: d.presence_penalty,
        frequency_penalty: d.frequency_penalty,
        penalty_last_n: d.penalty_last_n as u32,
        logit_bias: std::ptr::null(),
        n_logit_bias: 0,
        stop: std::ptr::null(),
        n_stop: 0,
        seed: d.seed,
        max_tokens: sprig_engine::sampler::DEFAULT_MAX_TOKENS as u32,
        parse_special: false,
        constraint_kind: SPRIG_CONSTRAINT_NONE,
        constraint: std::ptr::null(),
        tools_json: std::ptr::null(),
        tool_choice: std::ptr::null(),
        constrain_tools: true,
    }
}

/// Loads a model: a native `.safetensors`, a `.gguf`, a llama2.c `.bin` (with `tokenizer_path`) or a Hugging
/// Face directory. `options` may be NULL (defaults). On success `*out_model` is the new handle.
/// Thread safety: any thread; loads may run concurrently.
///
/// # Safety
/// `path` and the strings in `options` are NULL or NUL-terminated; `options` is NULL or points to a
/// `SprigModelOptions`; `out_model` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sprig_model_load(
    path: *const c_char,
    options: *const SprigModelOptions,
    out_model: *mut *mut SprigModel,
) -> SprigStatus {
    call(|| {
        if out_model.is_null() {
            return Err(FfiError::arg("out_model is NULL"));
        }
        // SAFETY: caller contract: `path` is NULL or a NUL-terminated string.
        let path = unsafe { str_arg(path, "path") }?;
        let defaults = sprig_model_options_default();
        // SAFETY: caller contract: `options` is NULL or points to a valid SprigModelOptions.
        let o = if options.is_null() { &defaults } else { unsafe { &*options } };
        let tokenizer = if o.tokenizer_path.is_null() {
            None
        } else {
            // SAFETY: non-null, NUL-terminated per the caller contract.
            Some(unsafe { str_arg(o.tokenizer_path, "tokenizer_path") }?)
        };
        let device = core::device_from_code(o.device)?;
        let req = LoadRequest {
            path,
            tokenizer,
            threads: o.threads,
            device,
            context_length: o.context_length,
            memory_budget_mb: o.memory_budget_mb,
            prefix_cache_mb: o.prefix_cache_mb,
            context_policy: core::context_policy_from_code(o.context_policy)?,
            kv_dtype: match o.kv_type {
                SPRIG_KV_F32 => sprig_backend::KvDtype::F32,
                SPRIG_KV_Q8 => sprig_backend::KvDtype::Q8,
                other => return Err(FfiError::arg(format!("kv_type {other} is not one of SPRIG_KV_*"))),
            },
        };
        let id = core::load_model(&req)?;
        // SAFETY: `out_model` is non-null and writable per the caller contract.
        unsafe { *out_model = id as usize as *mut SprigModel };
        Ok(())
    })
}

/// Frees a model handle. Sessions still open keep the weights alive until they are freed.
/// Thread safety: any thread; the handle is invalid for every thread afterwards.
#[no_mangle]
pub extern "C" fn sprig_model_free(model: *mut SprigModel) -> SprigStatus {
    call(|| core::free_model(handle_id(model, "model")?))
}

/// Tokens a session of this model holds (the context length chosen at load). Thread safety: any thread.
///
/// # Safety
/// `out_tokens` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sprig_model_context_length(model: *const SprigModel, out_tokens: *mut u32) -> SprigStatus {
    call(|| {
        let m = core::model(handle_id(model, "model")?)?;
        if out_tokens.is_null() {
            return Err(FfiError::arg("out_tokens is NULL"));
        }
        // SAFETY: non-null and writable per the caller contract.
        unsafe { *out_tokens = m.context_length as u32 };
        Ok(())
    })
}

/// The device the model runs on: `SPRIG_DEVICE_CPU` or `SPRIG_DEVICE_GPU` (what `SPRIG_DEVICE_AUTO` chose).
/// Thread safety: any thread.
///
/// # Safety
/// `out_device` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sprig_model_device(model: *const SprigModel, out_device: *mut u32) -> SprigStatus {
    call(|| {
        let d = core::device_code(core::model_device(handle_id(model, "model")?)?);
        if out_device.is_null() {
            return Err(FfiError::arg("out_device is NULL"));
        }
        // SAFETY: non-null and writable per the caller contract.
        unsafe { *out_device = d };
        Ok(())
    })
}

/// What the model's prefix cache holds (blocks, bytes, budget) and saved (prompt tokens cached / run over
/// every request of its sessions). Thread safety: any thread.
///
/// # Safety
/// `out_stats` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sprig_model_prefix_cache_stats(
    model: *const SprigModel,
    out_stats: *mut SprigPrefixCacheStats,
) -> SprigStatus {
    call(|| {
        let s = core::prefix_cache_stats(handle_id(model, "model")?)?;
        if out_stats.is_null() {
            return Err(FfiError::arg("out_stats is NULL"));
        }
        // SAFETY: non-null and writable per the caller contract.
        unsafe {
            *out_stats = SprigPrefixCacheStats {
                requests: s.requests,
                prompt_tokens: s.prompt_tokens,
                cached_tokens: s.cached_tokens,
                shared_tokens: s.shared_tokens,
                blocks: s.blocks as u64,
                bytes: s.bytes as u64,
                budget_bytes: s.budget as u64,
                evicted_blocks: s.evicted_blocks,
            }
        };
        Ok(())
    })
}

/// Creates a session (an empty conversation) on a model. Thread safety: any thread; sessions of one model
/// may generate concurrently on different threads.
///
/// # Safety
/// `out_session` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sprig_session_new(
    model: *const SprigModel,
    out_session: *mut *mut SprigSession,
) -> SprigStatus {
    call(|| {
        let id = handle_id(model, "model")?;
        if out_session.is_null() {
            return Err(FfiError::arg("out_session is NULL"));
        }
        let s = core::new_session(id)?;
        // SAFETY: non-null and writable per the caller contract.
        unsafe { *out_session = s as usize as *mut SprigSession };
        Ok(())
    })
}

/// Frees a session. If it is generating on another thread, that generation is cancelled and the memory is
/// released when it returns. Thread safety: any thread.
#[no_mangle]
pub extern "C" fn sprig_session_free(session: *mut SprigSession) -> SprigStatus {
    call(|| core::free_session(handle_id(session, "session")?))
}

/// Forgets the conversation (empties the KV cache). Thread safety: any thread; `SPRIG_STATUS_BUSY` while the
/// session generates.
#[no_mangle]
pub extern "C" fn sprig_session_reset(session: *mut SprigSession) -> SprigStatus {
    call(|| core::reset(handle_id(session, "session")?))
}

/// Saves the session (its KV cache, tokens and random stream) to `path`, replacing that file atomically.
/// `SPRIG_STATUS_BUSY` while it generates. Thread safety: any thread.
///
/// # Safety
/// `path` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn sprig_session_save(session: *mut SprigSession, path: *const c_char) -> SprigStatus {
    call(|| {
        let id = handle_id(session, "session")?;
        // SAFETY: caller contract.
        let path = unsafe { str_arg(path, "path") }?;
        core::save_session(id, path)
    })
}

/// Replaces the session with the one saved at `path`, so the next call continues that conversation without
/// running it again. A file of another model, a truncated or damaged one → `SPRIG_STATUS_LOAD_FAILED` and
/// the session is left empty (never half restored). Thread safety: any thread.
///
/// # Safety
/// `path` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn sprig_session_load(session: *mut SprigSession, path: *const c_char) -> SprigStatus {
    call(|| {
        let id = handle_id(session, "session")?;
        // SAFETY: caller contract.
        let path = unsafe { str_arg(path, "path") }?;
        core::load_session(id, path)
    })
}

/// Lets the session's KV cache go while keeping its conversation (for an idle session when memory tightens,
/// e.g. from Android's `onTrimMemory`): its blocks go into the model's prefix cache first, so its next call
/// restores them from there (or runs them again if they were evicted). `out_bytes` (NULL or writable) receives
/// the KV bytes it held. `SPRIG_STATUS_BUSY` while it generates. Thread safety: any thread.
///
/// # Safety
/// `out_bytes` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sprig_session_trim(session: *mut SprigSession, out_bytes: *mut u64) -> SprigStatus {
    call(|| {
        let freed = core::trim_session(handle_id(session, "session")?)?;
        if !out_bytes.is_null() {
            // SAFETY: non-null and writable per the caller contract.
            unsafe { *out_bytes = freed };
        }
        Ok(())
    })
}

/// Evicts the model's prefix cache down to `bytes` (its budget stays): the first thing to give back when
/// memory tightens. Thread safety: any thread.
#[no_mangle]
pub extern "C" fn sprig_model_shrink_prefix_cache(model: *const SprigModel, bytes: u64) -> SprigStatus {
    call(|| core::shrink_prefix_cache(handle_id(model, "model")?, bytes))
}

/// Speculative decoding for the session's generations from the next one on (exact: greedy output is
/// unchanged, sampled output keeps its distribution): `drafter` is `SPRIG_SPEC_OFF`, `SPRIG_SPEC_LOOKUP`,
/// `SPRIG_SPEC_DRAFT_MODEL` with `draft_model` a loaded model of the same tokenizer (else
/// `SPRIG_STATUS_INVALID_ARGUMENT`; the session keeps its own KV cache of it) or `SPRIG_SPEC_MTP` (the
/// session's model must have an MTP head, else `SPRIG_STATUS_INVALID_ARGUMENT`); `mode` `SPRIG_SPEC_MODE_AUTO` or
/// `SPRIG_SPEC_MODE_ON`; `max_draft` (1..=32) the most tokens drafted per pass. Constrained generations do not
/// speculate. `SPRIG_STATUS_BUSY` while the session generates. Thread safety: any thread.
#[no_mangle]
pub extern "C" fn sprig_session_set_speculation(
    session: *mut SprigSession,
    drafter: u32,
    draft_model: *const SprigModel,
    mode: u32,
    max_draft: u32,
) -> SprigStatus {
    call(|| {
        let id = handle_id(session, "session")?;
        let draft = if draft_model.is_null() { None } else { Some(handle_id(draft_model, "draft_model")?) };
        core::set_speculation(id, drafter, draft, mode, max_draft)
    })
}

/// The session's speculative decoding figures so far into `out` (zeros when it does not speculate).
/// `SPRIG_STATUS_BUSY` while it generates. Thread safety: any thread.
///
/// # Safety
/// `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sprig_session_speculation_stats(session: *mut SprigSession, out: *mut SprigSpecStats) -> SprigStatus {
    call(|| {
        let s = core::speculation_stats(handle_id(session, "session")?)?;
        if out.is_null() {
            return Err(FfiError::arg("out is NULL"));
        }
        let st = SprigSpecStats {
            drafted: s.drafted,
            accepted: s.accepted,
            passes: s.passes,
            pass_tokens: s.spec_tokens,
            switched_off: u32::from(s.switched_off),
        };
        // SAFETY: non-null and writable per the caller contract.
        unsafe { out.write(st) };
        Ok(())
    })
}

/// Asks the generation running on `session` to stop before its next token (it returns `SPRIG_STATUS_OK` with
/// `SPRIG_STOP_CANCELLED`). Safe from any thread; no effect on a later generation.
#[no_mangle]
pub extern "C" fn sprig_session_cancel(session: *mut SprigSession) -> SprigStatus {
    call(|| core::cancel(handle_id(session, "session")?))
}

/// The tool calls of the session's last chat reply, as a JSON array in OpenAI's shape
/// (`[{"id", "type": "function", "function": {"name", "arguments"}}]`, `arguments` a JSON string), written to
/// `buf` (`cap` bytes, NUL-terminated) when it fits. `*out_len` (when not NULL) receives the length without
/// the NUL; a `buf` too small gives `SPRIG_STATUS_INVALID_ARGUMENT` with `*out_len` set, so the caller can
/// retry with `*out_len + 1` bytes. `buf` may be NULL with `cap` 0 to ask the length.
///
/// # Safety
/// `buf` is NULL or writable for `cap` bytes; `out_len` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sprig_session_tool_calls(
    session: *mut SprigSession,
    buf: *mut c_char,
    cap: usize,
    out_len: *mut usize,
) -> SprigStatus {
    call(|| {
        let json = core::last_tool_calls(handle_id(session, "session")?)?;
        // SAFETY: caller contract on `buf`, `cap` and `out_len`.
        unsafe { write_text(&json, buf, cap, out_len, "the tool calls") }
    })
}

/// Writes `text` to `buf` as `sprig_session_tool_calls` documents (length to `out_len`, NUL-terminated when
/// it fits, `buf` NULL with `cap` 0 to ask the length).
///
/// # Safety
/// `buf` is NULL or writable for `cap` bytes; `out_len` is NULL or writable.
unsafe fn write_text(text: &str, buf: *mut c_char, cap: usize, out_len: *mut usize, what: &str) -> FfiResult<()> {
    if !out_len.is_null() {
        // SAFETY: non-null and writable per the caller contract.
        unsafe { *out_len = text.len() };
    }
    if buf.is_null() && cap == 0 {
        return Ok(());
    }
    if buf.is_null() || cap < text.len() + 1 {
        return Err(FfiError::arg(format!("buf holds {cap} bytes; {what} need {}", text.len() + 1)));
    }
    // SAFETY: `buf` is writable for `cap` ≥ len + 1 bytes (checked above, caller contract); the source is a
    // distinct Rust allocation.
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr(), buf.cast::<u8>(), text.len());
        *buf.add(text.len()) = 0;
    }
    Ok(())
}

/// Escalation off, and the defaults of the rest: threshold policy at 1.0 nats over 16 tokens, 30 s timeout.
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn sprig_escalation_default() -> SprigEscalation {
    SprigEscalation {
        url: std::ptr::null(),
        model: std::ptr::null(),
        api_key: std::ptr::null(),
        policy: SPRIG_ESCALATE_THRESHOLD,
        threshold: sprig_engine::escalate::DEFAULT_THRESHOLD,
        window: sprig_engine::escalate::DEFAULT_WINDOW as u32,
        timeout_ms: 30_000,
    }
}

/// Makes `session`'s chats escalate as `escalation` says (NULL, or a NULL `url`: no escalation). Raw-text
/// generations, chats with tools and constrained chats are never escalated. A bad URL, policy, threshold,
/// window or timeout is `SPRIG_STATUS_INVALID_ARGUMENT`. Thread safety: any thread; takes effect at the
/// session's next chat.
///
/// # Safety
/// `escalation` is NULL or valid, its strings NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn sprig_session_set_escalation(session: *mut SprigSession, escalation: *const SprigEscalation) -> SprigStatus {
    call(|| {
        let id = handle_id(session, "session")?;
        // SAFETY: caller contract: NULL or valid.
        let Some(e) = (unsafe { escalation.as_ref() }) else { return core::set_escalation(id, None) };
        if e.url.is_null() {
            return core::set_escalation(id, None);
        }
        // SAFETY: caller contract: each string is NULL or NUL-terminated.
        let url = unsafe { str_arg(e.url, "escalation.url") }?;
        // SAFETY: as above.
        let model = if e.model.is_null() { "teacher" } else { unsafe { str_arg(e.model, "escalation.model") }? };
        // SAFETY: as above.
        let key = if e.api_key.is_null() { None } else { Some(unsafe { str_arg(e.api_key, "escalation.api_key") }?.to_string()) };
        let name = match e.policy {
            SPRIG_ESCALATE_NEVER => "never",
            SPRIG_ESCALATE_THRESHOLD => "threshold",
            SPRIG_ESCALATE_ALWAYS => "always",
            p => return Err(FfiError::arg(format!("escalation.policy {p} is not a SPRIG_ESCALATE_* value"))),
        };
        let esc = core::escalation(url, model, key, name, e.threshold, i64::from(e.window), i64::from(e.timeout_ms))?;
        core::set_escalation(id, Some(esc))
    })
}

/// Why the session's last escalated chat fell back to the local model (offline, timed out, an HTTP status, a
/// malformed reply), or "" when it did not; written as `sprig_session_tool_calls` writes its JSON.
///
/// # Safety
/// `buf` is NULL or writable for `cap` bytes; `out_len` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sprig_session_escalation_reason(
    session: *mut SprigSession,
    buf: *mut c_char,
    cap: usize,
    out_len: *mut usize,
) -> SprigStatus {
    call(|| {
        let reason = core::escalation_reason(handle_id(session, "session")?)?;
        // SAFETY: caller contract on `buf`, `cap` and `out_len`.
        unsafe { write_text(&reason, buf, cap, out_len, "the reason") }
    })
}

/// # Safety
/// `params` is NULL or points to a SprigSamplingParams whose arrays hold their counts of valid entries.
unsafe fn sampling(params: *const SprigSamplingParams) -> FfiResult<Sampling> {
    let d = sprig_sampling_params_default();
    // SAFETY: caller contract.
    let p = if params.is_null() { &d } else { unsafe { &*params } };
    let array = |ptr: *const u8, n: usize, what: &str| -> FfiResult<()> {
        if n > 0 && ptr.is_null() {
            return Err(FfiError::arg(format!("{what} is NULL with a count of {n}")));
        }
        if n > 1 << 16 {
            return Err(FfiError::arg(format!("{n} {what} entries is implausible")));
        }
        Ok(())
    };
    array(p.logit_bias.cast(), p.n_logit_bias, "logit_bias")?;
    array(p.stop.cast(), p.n_stop, "stop")?;
    let logit_bias = if p.n_logit_bias == 0 {
        Vec::new()
    } else {
        // SAFETY: non-null and `n_logit_bias` entries long per the caller contract.
        unsafe { std::slice::from_raw_parts(p.logit_bias, p.n_logit_bias) }.iter().map(|b| (b.token, b.bias)).collect()
    };
    let mut stop = Vec::with_capacity(p.n_stop);
    for i in 0..p.n_stop {
        // SAFETY: `stop` is non-null and `n_stop` entries long (checked above, caller contract).
        let s = unsafe { *p.stop.add(i) };
        // SAFETY: each entry is NULL or NUL-terminated per the caller contract.
        stop.push(unsafe { str_arg(s, &format!("stop[{i}]")) }?.to_string());
    }
    let params = sprig_engine::SamplingParams {
        temperature: p.temperature,
        top_k: p.top_k as usize,
        top_p: p.top_p,
        min_p: p.min_p,
        typical_p: p.typical_p,
        repeat_penalty: p.repeat_penalty,
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        penalty_last_n: p.penalty_last_n as usize,
        logit_bias,
        stop,
        seed: p.seed,
        constraint: None,
        top_logprobs: None,
    };
    // SAFETY: caller contract: each string is NULL or NUL-terminated.
    let text = |ptr: *const c_char, what: &str| unsafe { str_arg(ptr, what) }.map(str::to_string);
    let params = sprig_engine::SamplingParams {
        constraint: match p.constraint_kind {
            SPRIG_CONSTRAINT_NONE => None,
            SPRIG_CONSTRAINT_JSON_SCHEMA => Some(Constraint::JsonSchema(text(p.constraint, "constraint (a JSON Schema)")?)),
            SPRIG_CONSTRAINT_REGEX => Some(Constraint::Regex(text(p.constraint, "constraint (a regex)")?)),
            SPRIG_CONSTRAINT_GRAMMAR => Some(Constraint::Lark(text(p.constraint, "constraint (a grammar)")?)),
            SPRIG_CONSTRAINT_JSON_OBJECT => Some(Constraint::JsonObject),
            k => return Err(FfiError::arg(format!("constraint_kind {k} is not a SPRIG_CONSTRAINT_* value"))),
        },
        ..params
    };
    let tools = if p.tools_json.is_null() {
        None
    } else {
        let choice = if p.tool_choice.is_null() { "auto".to_string() } else { text(p.tool_choice, "tool_choice")? };
        Some(core::tools(&text(p.tools_json, "tools_json")?, &choice, p.constrain_tools)?)
    };
    Ok(Sampling { params, max_tokens: p.max_tokens, parse_special: p.parse_special, tools })
}

/// # Safety
/// `callback` is NULL or a function valid for the call; `user_data` is whatever it expects; `out` is NULL or
/// writable.
unsafe fn run_generation<'a>(
    session: *mut SprigSession,
    input: impl FnOnce() -> FfiResult<Input<'a>>,
    params: *const SprigSamplingParams,
    callback: SprigTokenCallback,
    user_data: *mut c_void,
    out: *mut SprigGenerateResult,
) -> SprigStatus {
    call(|| {
        let id = handle_id(session, "session")?;
        let input = input()?;
        // SAFETY: caller contract on `params`.
        let params = unsafe { sampling(params) }?;
        let mut buf = Vec::new();
        let r: Outcome = core::generate(id, input, &params, |text| match callback {
            None => true,
            Some(cb) => {
                buf.clear();
                buf.extend_from_slice(text.as_bytes());
                buf.push(0);
                // SAFETY: the callback is valid for this call (caller contract); the text is NUL-terminated and
                // lives until the callback returns.
                unsafe { cb(buf.as_ptr().cast(), text.len(), user_data) }
            }
        })?;
        if !out.is_null() {
            // SAFETY: non-null and writable per the caller contract.
            unsafe {
                *out = SprigGenerateResult {
                    stop_reason: core::stop_reason(r.stop).0,
                    prompt_tokens: r.prompt_tokens,
                    generated_tokens: r.generated_tokens,
                    prefill_tokens_per_second: r.prefill_tok_s,
                    decode_tokens_per_second: r.decode_tok_s,
                    cached_tokens: r.cached_tokens,
                    prefix_cache_tokens: r.prefix_cache_tokens,
                    context_dropped_tokens: r.context_dropped,
                    tool_calls: r.tool_calls.len() as u32,
                    batched_steps: r.batched_steps,
                    answered_by: match r.answered_by {
                        sprig_engine::escalate::AnsweredBy::Student => SPRIG_ANSWERED_LOCAL,
                        sprig_engine::escalate::AnsweredBy::Teacher => SPRIG_ANSWERED_TEACHER,
                        sprig_engine::escalate::AnsweredBy::StudentAfterTeacherFailed => SPRIG_ANSWERED_LOCAL_AFTER_TEACHER_FAILED,
                    },
                    escalation_signal: r.escalation_signal.unwrap_or(f32::NAN),
                }
            };
        }
        Ok(())
    })
}

/// Continues the session's context with raw `prompt` text and generates, streaming text to `callback`.
/// `params` may be NULL (defaults), `callback` may be NULL, `out_result` may be NULL.
/// Thread safety: any thread; one generation per session at a time (`SPRIG_STATUS_BUSY` otherwise). Sessions
/// of one model generating at the same time from different threads decode as one batch (the model's batch
/// thread runs them; `callback` still runs on the calling thread, and stopping through it ends the request
/// within a token).
///
/// # Safety
/// `prompt` is NULL or NUL-terminated; `params` is NULL or valid; `callback` is NULL or valid for the call;
/// `out_result` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sprig_session_generate(
    session: *mut SprigSession,
    prompt: *const c_char,
    params: *const SprigSamplingParams,
    callback: SprigTokenCallback,
    user_data: *mut c_void,
    out_result: *mut SprigGenerateResult,
) -> SprigStatus {
    // SAFETY: caller contract on `prompt` (the borrowed text is used during this call only).
    let input = || Ok(Input::Text(unsafe { str_arg(prompt, "prompt") }?));
    // SAFETY: caller contract on params, callback, user_data and out_result.
    unsafe { run_generation(session, input, params, callback, user_data, out_result) }
}

/// Answers the last turn of `messages` (`n_messages` turns) with the model's chat template. When the
/// conversation extends the previous call's (same earlier turns plus the reply), only the new turns are run.
/// Thread safety: as `sprig_session_generate`.
///
/// # Safety
/// `messages` points to `n_messages` valid SprigChatMessage (or is NULL with 0); the rest as for
/// `sprig_session_generate`.
#[no_mangle]
pub unsafe extern "C" fn sprig_session_chat(
    session: *mut SprigSession,
    messages: *const SprigChatMessage,
    n_messages: usize,
    params: *const SprigSamplingParams,
    callback: SprigTokenCallback,
    user_data: *mut c_void,
    out_result: *mut SprigGenerateResult,
) -> SprigStatus {
    let input = || {
        if n_messages == 0 || messages.is_null() {
            return Err(FfiError::arg("messages is NULL or empty"));
        }
        if n_messages > 1 << 20 {
            return Err(FfiError::arg(format!("n_messages = {n_messages} is implausible")));
        }
        // SAFETY: caller contract: `messages` points to `n_messages` entries.
        let ms = unsafe { std::slice::from_raw_parts(messages, n_messages) };
        let mut out = Vec::with_capacity(n_messages);
        for (i, m) in ms.iter().enumerate() {
            // SAFETY: caller contract: each string is NULL or NUL-terminated.
            let role = unsafe { str_arg(m.role, &format!("messages[{i}].role")) }?;
            // SAFETY: as above.
            let content = unsafe { str_arg(m.content, &format!("messages[{i}].content")) }?;
            out.push(sprig_engine::ChatMessage::new(role, content));
        }
        Ok(Input::Chat(out))
    };
    // SAFETY: caller contract on params, callback, user_data and out_result.
    unsafe { run_generation(session, input, params, callback, user_data, out_result) }
}
