//! A conversation with a model: one KV cache that carries over between calls. Sessions of one [`Engine`]
//! share its weights. Chat turns reuse the cached prefix when the new rendered conversation extends it.

use std::sync::Arc;

use sprig_backend::Backend;
use sprig_models::State;

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

use crate::chat::ChatMessage;
use crate::generate::{BatchItem, Engine, GenerationStats, Item, MakeRoom, Runner, SessionRun, StopReason};
use crate::sampler::{Sampler, SamplingParams, TokenLogprob};
use crate::session_file::{self, Header};
use crate::speculative::Speculation;
use crate::tools::{Tool, ToolChoice, Tools};
use crate::{EngineError, Result};

pub struct Session<B: Backend> {
    pub engine: Arc<Engine<B>>,
    pub state: State<B>,
    /// Tokens whose K/V the state holds, in order (`cached.len() == state.pos`).
    cached: Vec<u32>,
    /// The conversation's tokens as given, before the context policy dropped any (equal to `cached` until
    /// it does): a chat that continues it maps onto what the state holds.
    logical: Vec<u32>,
    max_context: usize,
    /// The session's random stream, the seed it started from and the words drawn from it: it carries on from
    /// request to request (a second turn with the same seed does not replay the first one's draws) until a
    /// request gives another seed.
    rng: Option<Stream>,
    /// The conversation of the last chat call, its reply appended (saved with the session).
    messages: Vec<ChatMessage>,
    policy: ContextPolicy,
    /// Raw prompts: tokens at the start the context policy never drops (BOS is always kept).
    keep: usize,
    /// Chat: the system messages and tools last seen and the tokens they pin at the start.
    pinned: Option<(PinKey, usize)>,
    /// After [`Session::trim`]: the tokens the state held before its KV cache was let go.
    trimmed: Option<Vec<u32>>,
    /// Speculative decoding of this session's requests (when each runs alone).
    spec: Option<Speculation>,
}

/// What a session does when a request would not fit its context.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ContextPolicy {
    /// Keep the pinned start (the system prompt, or `keep` tokens), drop the oldest tokens after it (half of
    /// what follows, at least what the request needs) and run the kept tail again: exact for the shortened
    /// conversation; the pinned start comes from the session's cache or the prefix cache.
    #[default]
    TruncateMiddle,
    /// The same drop, but the kept tail's cached keys are rotated to their new positions instead of being
    /// run again (llama.cpp's context shift): cheap, approximate (the kept K/V saw the dropped tokens).
    /// Falls back to truncating when a sliding-window layer no longer holds what it would need.
    Shift,
    /// Fail with a context-overflow error (the prompt) or stop with `ContextFull` (generation).
    Error,
}

impl ContextPolicy {
    pub const ALL: [ContextPolicy; 3] = [ContextPolicy::TruncateMiddle, ContextPolicy::Shift, ContextPolicy::Error];
    pub fn name(self) -> &'static str {
        match self {
            ContextPolicy::TruncateMiddle => "truncate-middle",
            ContextPolicy::Shift => "shift",
            ContextPolicy::Error => "error",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == s)
    }
}

type PinKey = (Vec<ChatMessage>, Option<Vec<Tool>>);

struct Stream {
    seed: u64,
    rng: StdRng,
    draws: u64,
}

impl<B: Backend> Session<B> {
    /// The context it was made with (0: the model's trained context).
    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// `max_context = 0`: the model's trained context. Fails when its KV cache cannot be allocated.
    pub fn new(engine: Arc<Engine<B>>, max_context: usize) -> Result<Self> {
        let state = engine.model.new_state(max_context)?;
        Ok(Session {
            engine,
            state,
            cached: Vec::new(),
            logical: Vec::new(),
            max_context,
            rng: None,
            messages: Vec::new(),
            policy: ContextPolicy::default(),
            keep: 0,
            pinned: None,
            trimmed: None,
            spec: None,
        })
    }

    /// Speculative decoding for this session's requests from now on (`None`: off). Requests run in a batch of
    /// several never speculate.
    pub fn set_speculation(&mut self, spec: Option<Speculation>) {
        self.spec = spec;
    }

    /// The session's speculative decoding and its figures so far.
    pub fn speculation(&self) -> Option<&Speculation> {
        self.spec.as_ref()
    }

    /// What to do when a request would overflow the context; `keep`: tokens at the start of a raw
    /// conversation never dropped (a chat pins its system messages).
    pub fn set_context_policy(&mut self, policy: ContextPolicy, keep: usize) {
        self.policy = policy;
        self.keep = keep;
    }

    /// Starts an independent conversation that may still reuse the KV cache: the conversation so far, its
    /// messages and random stream are forgotten (the next request's seed draws afresh), while what the cache
    /// holds is reused as far as the next prompt starts like it. A server's requests are independent like this.
    pub fn start_over(&mut self) {
        self.logical.clear();
        self.rng = None;
        self.messages.clear();
    }

    /// Forgets the conversation.
    pub fn reset(&mut self) -> Result<()> {
        self.cached.clear();
        self.logical.clear();
        self.rng = None;
        self.messages.clear();
        self.pinned = None;
        self.trimmed = None;
        // A fresh state: the MoE layers' usage counters start again too.
        self.state = self.engine.model.new_state(self.max_context)?;
        Ok(())
    }

    /// Continues the context with raw `text` (the tokenizer's BOS rule applies only at position 0), then
    /// generates up to `max_new` tokens. The text is plain text unless `parse_special`, when special-token
    /// strings in it (`<|im_start|>`) become control tokens: only for prompts the caller wrote itself.
    pub fn generate(
        &mut self,
        text: &str,
        parse_special: bool,
        params: &SamplingParams,
        max_new: usize,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<GenerationStats> {
        params.validate()?;
        let (full, pinned) = self.conversation(Ask::Text { text, parse_special })?;
        self.request(full, pinned, params, max_new, on_text)
    }

    /// Renders the whole conversation with the model's chat template and answers its last turn. What the
    /// session's cache or the engine's prefix cache holds of the rendered prompt is not run again; a
    /// conversation longer than the context is shortened by the context policy (the system messages stay).
    pub fn chat(
        &mut self,
        messages: &[ChatMessage],
        params: &SamplingParams,
        max_new: usize,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<GenerationStats> {
        self.chat_with_tools(messages, None, params, max_new, on_text)
    }

    /// [`Session::chat`] offering `tools`: the reply's calls come back in [`GenerationStats::tool_calls`]
    /// (the streamed text still shows them as the model wrote them). With `tools.constrain`, the reply is held
    /// to the choice's grammar; a request that also has its own constraint is an error.
    pub fn chat_with_tools(
        &mut self,
        messages: &[ChatMessage],
        tools: Option<&Tools>,
        params: &SamplingParams,
        max_new: usize,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<GenerationStats> {
        params.validate()?;
        let constrained = tool_params(&self.engine, tools, params)?;
        let params = constrained.as_ref().unwrap_or(params);
        let (full, pinned) = self.conversation(Ask::Chat(messages, tools))?;
        let mut reply = String::new();
        let mut stats = self.request(full, pinned, params, max_new, |t| {
            reply.push_str(t);
            on_text(t)
        })?;
        let answer = answer(&self.engine, tools, &reply, &mut stats);
        self.record_chat(messages, &stats, answer);
        Ok(stats)
    }

    /// The conversation's tokens for a request (a raw prompt continues what the session ran; a chat is
    /// rendered whole) and how many at its start the context policy keeps.
    fn conversation(&mut self, ask: Ask<'_>) -> Result<(Vec<u32>, usize)> {
        match ask {
            Ask::Chat(messages, tools) => {
                let full = self.engine.chat_tokens_with_tools(messages, tools)?;
                let pinned = self.pinned_tokens(messages, tools, &full)?;
                Ok((full, pinned))
            }
            Ask::ChatContinuing(messages, start) => {
                let mut full = self.engine.chat_tokens(messages)?;
                full.extend(self.engine.tokenizer.encode_parts(&[(start, false)], false)?);
                let pinned = self.pinned_tokens(messages, None, &full)?;
                Ok((full, pinned))
            }
            Ask::Text { text, parse_special } => {
                let tok = &self.engine.tokenizer;
                let add_bos = self.logical.is_empty() && tok.special().add_bos;
                let tokens = tok.encode_parts(&[(text, parse_special)], add_bos)?;
                if tokens.is_empty() {
                    return Err(EngineError::EmptyPrompt);
                }
                let bos = usize::from(tok.special().add_bos);
                Ok(([&self.logical[..], &tokens].concat(), self.keep + bos))
            }
        }
    }

    /// After a chat request: the conversation it answered, and its reply unless cancelled.
    fn record_chat(&mut self, messages: &[ChatMessage], stats: &GenerationStats, reply: ChatMessage) {
        self.messages = messages.to_vec();
        if stats.stop != StopReason::Cancelled {
            self.messages.push(reply);
        }
    }

    /// Tokens the leading system messages of a chat take at the start of its rendering (the template's
    /// first turn header included): what the context policy keeps.
    fn pinned_tokens(&mut self, messages: &[ChatMessage], tools: Option<&Tools>, full: &[u32]) -> Result<usize> {
        let system = &messages[..messages.iter().take_while(|m| m.role == "system").count()];
        let tool_list = tools.map(|t| &t.tools[..]);
        // Compared in place: nothing is copied on a hit (every turn of a conversation).
        if let Some(((m, t), n)) = &self.pinned {
            if m[..] == *system && t.as_deref() == tool_list {
                return Ok(*n);
            }
        }
        // Rendered with a stand-in user turn instead of the real ones: the common start is the system part
        // (with the tools, which templates show there).
        let probe = [system, &[ChatMessage::new("user", "\u{1}")]].concat();
        let other = self.engine.chat_tokens_with_tools(&probe, tools)?;
        let n = full.iter().zip(&other).take_while(|(a, b)| a == b).count();
        let key = (system.to_vec(), tool_list.map(<[Tool]>::to_vec));
        self.pinned = Some((key, n));
        Ok(n)
    }

    /// Runs the conversation `full` (its last part new): maps it onto what the state holds when it continues
    /// the session's conversation, applies the context policy when it would not fit, reuses the longest
    /// cached prefix (the session's own, or the prefix cache's), runs the rest and generates.
    fn request(
        &mut self,
        full: Vec<u32>,
        pinned: usize,
        params: &SamplingParams,
        max_new: usize,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<GenerationStats> {
        let mut p = self.prepare(full, pinned, params, max_new)?;
        let mut room = room_maker::<B>(self.policy, pinned);
        let engine = self.engine.clone();
        let item = BatchItem {
            state: &mut self.state,
            run: Some(SessionRun { held: &mut self.cached, make_room: &mut room }),
            prompt: &p.target[p.start..],
            max_new,
            sampler: &mut p.sampler,
            echo_prompt: false,
            on_text: &mut on_text,
            on_logprob: None,
            spec: self.spec.as_mut(),
        };
        let stats = engine.generate_batch(vec![item]).pop().expect("one result per item");
        self.finish(p, stats)
    }

    /// Everything of a request before it runs: the policy applied, the cached start reused, the sampler set up.
    fn prepare(&mut self, full: Vec<u32>, pinned: usize, params: &SamplingParams, max_new: usize) -> Result<Prepared> {
        let ctx = self.state.max_context;
        // Continuing a conversation the policy has shortened: the new part goes after what is held.
        let held = self.trimmed.as_deref().unwrap_or(&self.cached);
        let mut target = if !self.logical.is_empty() && self.logical.len() < full.len() && full.starts_with(&self.logical) {
            [held, &full[self.logical.len()..]].concat()
        } else {
            full.clone()
        };
        // A trimmed session holds nothing: what it held comes back from the prefix cache, or runs again.
        if self.trimmed.take().is_some() {
            self.cached.clear();
            self.state.pos = 0;
        }
        if target.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let mut dropped = 0;
        let reserve = max_new.min(ctx / 4).max(1);
        if target.len() + reserve > ctx && self.policy != ContextPolicy::Error {
            let pinned = pinned.min(target.len() - 1);
            if pinned + 1 + reserve > ctx {
                return Err(sprig_models::ModelError::ContextOverflow { pos: pinned, new: reserve + 1, ctx }.into());
            }
            // Half of what follows the pinned start, or what the request needs if more.
            let need = target.len() + reserve - ctx;
            dropped = need.max((target.len() - pinned) / 2).min(target.len() - pinned - 1);
            self.drop_tokens(&mut target, pinned, dropped)?;
        }
        let (start, shared) = self.reuse(&target)?;
        self.logical = full;
        let (rng, drawn) = session_rng(self.rng.take(), params.seed);
        let mut sampler = Sampler::with_rng(params.clone(), rng)?;
        // The penalties' window starts with the conversation so far.
        self.cached[start.saturating_sub(params.penalty_last_n)..].iter().for_each(|&t| sampler.accept(t));
        Ok(Prepared { target, start, shared, dropped, sampler, drawn, seed: params.seed })
    }

    /// Everything of a request after it ran: the random stream kept, the conversation's tokens and counters.
    fn finish(&mut self, p: Prepared, stats: Result<GenerationStats>) -> Result<GenerationStats> {
        let draws = p.drawn + p.sampler.draws();
        self.rng = Some(Stream { seed: p.seed, rng: p.sampler.into_rng(), draws });
        match stats {
            Ok(mut s) => {
                if s.prompt_tokens == p.target.len() - p.start && s.context_dropped == 0 {
                    // The conversation is what was asked plus the reply's tokens fed back.
                    self.logical.extend_from_slice(&s.generated[..s.fed]);
                } else {
                    // Cancelled during prefill, or shortened while decoding: what is held is the conversation.
                    self.logical = self.cached.clone();
                }
                s.cached_tokens = p.start;
                s.prefix_cache_tokens = p.shared;
                s.context_dropped += p.dropped;
                self.engine.prefix_cache.record(p.target.len(), p.start, p.shared);
                Ok(s)
            }
            // Refused before anything ran (empty, or longer than the context left): the cache is as it was.
            Err(e) if e.is_context_overflow() || matches!(e, EngineError::EmptyPrompt) => {
                self.logical = self.cached.clone();
                Err(e)
            }
            // A failed forward pass leaves the cache in an unknown state: start over next time.
            Err(e) => {
                self.reset()?;
                Err(e)
            }
        }
    }

    /// Drops `d` tokens after the first `keep` of `target` under the policy: shifting moves the cached K/V
    /// (when `target` continues what is held), truncating leaves it to [`Session::reuse`] to run the kept tail
    /// again.
    fn drop_tokens(&mut self, target: &mut Vec<u32>, keep: usize, d: usize) -> Result<()> {
        let held = self.cached.len();
        if self.policy == ContextPolicy::Shift && held > keep && target.starts_with(&self.cached) {
            let d_held = d.min(held - keep);
            match self.engine.model.shift_kv(&mut self.state, keep, d_held) {
                Ok(()) => {
                    self.cached.drain(keep..keep + d_held);
                }
                Err(sprig_models::ModelError::ShiftUnavailable { .. }) => {}
                Err(e) => {
                    self.reset()?;
                    return Err(e.into());
                }
            }
        }
        target.drain(keep..keep + d);
        Ok(())
    }

    /// [`Session::finish`], then for a chat the reply recorded (its tool calls parsed, also into the result).
    fn conclude(&mut self, p: Prepared, prompt: &Prompt, reply: &str, stats: Result<GenerationStats>) -> Result<GenerationStats> {
        let mut stats = self.finish(p, stats);
        let chat = match prompt {
            Prompt::Chat(m) => Some((m, None, "")),
            Prompt::ChatWithTools(m, t) => Some((m, Some(t), "")),
            Prompt::ChatContinuing(m, start) => Some((m, None, start.as_str())),
            Prompt::Text { .. } => None,
        };
        if let (Ok(st), Some((m, tools, start))) = (&mut stats, chat) {
            let engine = self.engine.clone();
            let answer = answer(&engine, tools, &[start, reply].concat(), st);
            self.record_chat(m, st, answer);
        }
        stats
    }

    /// See [`resume`].
    fn reuse(&mut self, target: &[u32]) -> Result<(usize, usize)> {
        resume(&self.engine, &mut self.state, &mut self.cached, target)
    }

    /// Records `reply` as the answer to `messages` (the conversation a save keeps and [`Session::messages`]
    /// shows), for a turn answered elsewhere (escalation's teacher). The next chat renders the conversation
    /// whole, so what the session's cache held of another reply is simply not reused.
    pub fn record_reply(&mut self, messages: &[ChatMessage], reply: &str) {
        self.messages = messages.to_vec();
        self.messages.push(ChatMessage::new("assistant", reply.trim()));
    }

    /// The conversation of the last chat call with its reply (restored with a saved session), to continue it.
    pub fn messages(&self) -> &[ChatMessage] {
        &self.messages
    }

    /// Saves the session (KV cache, tokens, chat messages, random stream) to `path`, replacing it atomically.
    /// A trimmed session has no KV cache to save until its next request.
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        if self.trimmed.is_some() {
            return Err(EngineError::SessionFile(format!(
                "{}: the session was trimmed; it holds its cache again after its next request",
                path.display()
            )));
        }
        let layout = self.engine.model.state_kv_layout(&self.state);
        let pos = self.state.pos;
        let header = Header {
            model: self.engine.fingerprint().to_string(),
            kv_dim: layout.kv_dim,
            windows: layout.windows.clone(),
            tokens: pos,
            first: (0..layout.windows.len()).map(|l| pos.saturating_sub(layout.layer_capacity(l))).collect(),
            kv_dtype: self.state.kv_dtype().name().into(),
            head_dim: layout.head_dim,
            rng: self.rng.as_ref().map(|s| (s.seed, s.draws)),
            messages: self.messages.clone(),
        };
        session_file::write(path, &header, &self.cached, &*self.engine.model.backend, self.state.kv_cache())
    }

    /// Replaces the session with the one saved at `path`. A file of another model or KV layout, one longer
    /// than this session's context, a truncated or damaged one: an error, and the session is left fresh
    /// (never half restored).
    pub fn load(&mut self, path: &std::path::Path) -> Result<()> {
        let r = self.restore(path);
        if r.is_err() {
            self.reset()?;
        }
        r
    }

    fn restore(&mut self, path: &std::path::Path) -> Result<()> {
        let saved = session_file::read(path)?;
        let h = &saved.header;
        let bad = |why: String| Err(EngineError::SessionFile(format!("{}: {why}", path.display())));
        if h.model != self.engine.fingerprint() {
            return bad("saved with another model".into());
        }
        let layout = self.engine.model.kv_layout(self.state.max_context);
        let q8 = self.state.kv_dtype() == sprig_backend::KvDtype::Q8;
        if h.kv_dim != layout.kv_dim
            || h.windows != layout.windows
            || h.kv_dtype != self.state.kv_dtype().name()
            || (q8 && h.head_dim != layout.head_dim)
        {
            return bad("its KV layout differs from this model's".into());
        }
        if h.tokens > self.state.max_context {
            return bad(format!("{} tokens, more than this session's context of {}", h.tokens, self.state.max_context));
        }
        let want: Vec<usize> = (0..layout.windows.len()).map(|l| h.tokens.saturating_sub(layout.layer_capacity(l))).collect();
        if h.first != want || saved.tokens.len() != h.tokens {
            return bad("it holds other positions than a session of this context would".into());
        }
        self.reset()?;
        let b = &*self.engine.model.backend;
        for (layer, ((k, v), &first)) in saved.kv.iter().zip(&h.first).enumerate() {
            b.kv_write(self.state.kv_cache_mut(), layer, first, k, v)?;
        }
        self.state.pos = h.tokens;
        self.cached = saved.tokens;
        self.logical = self.cached.clone();
        self.rng = h.rng.map(|(seed, draws)| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..draws).for_each(|_| {
                rng.next_u32();
            });
            Stream { seed, rng, draws }
        });
        self.messages = saved.header.messages;
        Ok(())
    }

    /// Tokens the session's KV cache holds, in order (before a [`Session::trim`], what it held).
    pub fn tokens(&self) -> &[u32] {
        self.trimmed.as_deref().unwrap_or(&self.cached)
    }

    /// Bytes of KV cache the session's tokens occupy (the pages a forward pass has touched; 0 once trimmed).
    pub fn kv_resident_bytes(&self) -> u64 {
        let layout = self.engine.model.state_kv_layout(&self.state);
        (0..layout.windows.len()).map(|l| self.state.pos.min(layout.layer_capacity(l)) as u64).sum::<u64>() * layout.bytes_per_position()
    }

    /// Lets the KV cache go while keeping the conversation, for an idle session when memory tightens (an
    /// app's `onTrimMemory`): its blocks go into the prefix cache first (as far as its budget allows), so the
    /// next request restores them from there, or runs them again if they were evicted meanwhile. Returns the
    /// KV bytes the session held.
    pub fn trim(&mut self) -> Result<u64> {
        if self.trimmed.is_some() || self.cached.is_empty() {
            return Ok(0);
        }
        let e = &self.engine;
        let layout = e.model.state_kv_layout(&self.state);
        e.prefix_cache.insert_from(&*e.model.backend, &self.state, &layout, &self.cached)?;
        let held = self.kv_resident_bytes();
        self.trimmed = Some(std::mem::take(&mut self.cached));
        // A fresh state: the old cache's pages go back to the system, the new one's are touched only when used.
        self.state = e.model.new_state(self.max_context)?;
        Ok(held)
    }
}

/// A tool request's parameters: `params` with the tools' constraint, when they constrain the reply (`None`:
/// `params` as they are). A request with a constraint of its own cannot also constrain tool calls.
fn tool_params<B: Backend>(e: &Engine<B>, tools: Option<&Tools>, params: &SamplingParams) -> Result<Option<SamplingParams>> {
    let Some(c) = tools.and_then(|t| t.constraint(e.tool_format())) else { return Ok(None) };
    if params.constraint.is_some() {
        return Err(EngineError::Tools(
            "a request with its own constraint (JSON Schema, regex, grammar) cannot also constrain tool calls; use tool_choice \"none\" or an unconstrained tool request".into(),
        ));
    }
    Ok(Some(SamplingParams { constraint: Some(c), ..params.clone() }))
}

/// The assistant message a chat reply makes; with tools, the calls parsed out of it (also into `stats`).
fn answer<B: Backend>(e: &Engine<B>, tools: Option<&Tools>, reply: &str, stats: &mut GenerationStats) -> ChatMessage {
    let answer = ChatMessage::new("assistant", reply.trim());
    if !tools.is_some_and(|t| t.choice != ToolChoice::None) {
        return answer;
    }
    let (content, calls) = crate::tools::parse_calls(reply, e.tool_format());
    stats.tool_calls = calls.clone();
    ChatMessage { content, tool_calls: calls, ..answer }
}

/// What one session of [`run_batch`] is asked.
#[derive(Clone, Debug)]
pub enum Prompt {
    /// A conversation, as [`Session::chat`] takes it.
    Chat(Vec<ChatMessage>),
    /// A conversation offered tools, as [`Session::chat_with_tools`] takes it.
    ChatWithTools(Vec<ChatMessage>, Tools),
    /// Raw text continuing the context, as [`Session::generate`] takes it.
    Text { text: String, parse_special: bool },
    /// A conversation whose reply has begun with the given text: the model writes on after it (the reply
    /// recorded is that start and what follows; only what follows is streamed). Escalation's fallback when a
    /// teacher's answer broke off midway ([`crate::escalate`]).
    ChatContinuing(Vec<ChatMessage>, String),
}

/// A request's text callback.
pub type OnText<'a> = dyn FnMut(&str) -> bool + 'a;

/// A request's log-probability callback.
pub type OnLogprob<'a> = dyn FnMut(&TokenLogprob) + 'a;

/// A request's prompt, borrowed.
#[derive(Clone, Copy)]
enum Ask<'a> {
    Chat(&'a [ChatMessage], Option<&'a Tools>),
    ChatContinuing(&'a [ChatMessage], &'a str),
    Text { text: &'a str, parse_special: bool },
}

impl Prompt {
    fn as_ask(&self) -> Ask<'_> {
        match self {
            Prompt::Chat(m) => Ask::Chat(m, None),
            Prompt::ChatWithTools(m, t) => Ask::Chat(m, Some(t)),
            Prompt::Text { text, parse_special } => Ask::Text { text, parse_special: *parse_special },
            Prompt::ChatContinuing(m, start) => Ask::ChatContinuing(m, start),
        }
    }
}

/// One request of [`run_batch`].
pub struct BatchRequest<'a, B: Backend> {
    pub session: &'a mut Session<B>,
    pub prompt: Prompt,
    pub params: SamplingParams,
    pub max_new: usize,
    /// As [`Session::chat`]'s: each piece of text, and an empty piece to poll; false stops this request.
    pub on_text: Box<dyn FnMut(&str) -> bool + 'a>,
    /// With `params.top_logprobs`: each generated token's entry as it comes, before its text (the entries
    /// are also in the result).
    pub on_logprob: Option<Box<OnLogprob<'a>>>,
}

/// Runs requests of several sessions of one engine together, each answered as its session alone would
/// answer it: their prompts are prefilled one chunk at a time, interleaved with decode steps in which every
/// session past its prompt advances by one token and those tokens go through the model as one batch (the
/// weights are read once per step for all of them). One result per request, in order; a request on a
/// session of another engine than the first is refused.
pub fn run_batch<B: Backend>(requests: Vec<BatchRequest<'_, B>>) -> Vec<Result<GenerationStats>> {
    let Some(engine) = requests.first().map(|r| r.session.engine.clone()) else { return Vec::new() };
    let (mut sessions, mut asks, mut on_texts, mut on_logprobs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in requests {
        sessions.push(r.session);
        asks.push((r.prompt, r.params, r.max_new));
        on_texts.push(r.on_text);
        on_logprobs.push(r.on_logprob);
    }
    // Each request's conversation and pinned start, then the session's preparation.
    let mut prepared: Vec<Result<(Prepared, usize)>> = sessions
        .iter_mut()
        .zip(&asks)
        .map(|(s, (prompt, params, max_new))| {
            if !Arc::ptr_eq(&s.engine, &engine) {
                return Err(EngineError::Eval("a batch runs sessions of one model only".into()));
            }
            params.validate()?;
            let constrained = match prompt {
                Prompt::ChatWithTools(_, t) => tool_params(&engine, Some(t), params)?,
                _ => None,
            };
            let params = constrained.as_ref().unwrap_or(params);
            let (full, pinned) = s.conversation(prompt.as_ask())?;
            Ok((s.prepare(full, pinned, params, *max_new)?, pinned))
        })
        .collect();
    let mut replies: Vec<String> = asks.iter().map(|_| String::new()).collect();
    let mut rooms: Vec<_> = sessions
        .iter()
        .zip(&prepared)
        .map(|(s, p)| room_maker::<B>(s.policy, p.as_ref().map_or(0, |p| p.1)))
        .collect();
    let mut callbacks: Vec<Box<OnText<'_>>> = on_texts
        .iter_mut()
        .zip(replies.iter_mut())
        .map(|(cb, reply)| {
            Box::new(move |t: &str| {
                reply.push_str(t);
                cb(t)
            }) as Box<OnText<'_>>
        })
        .collect();
    let mut items = Vec::new();
    for (((((s, p), room), cb), (_, _, max_new)), lp) in sessions
        .iter_mut()
        .zip(prepared.iter_mut())
        .zip(rooms.iter_mut())
        .zip(callbacks.iter_mut())
        .zip(&asks)
        .zip(on_logprobs.iter_mut())
    {
        let Ok((p, _)) = p else { continue };
        let s = &mut **s;
        items.push(BatchItem {
            state: &mut s.state,
            run: Some(SessionRun { held: &mut s.cached, make_room: room }),
            prompt: &p.target[p.start..],
            max_new: *max_new,
            sampler: &mut p.sampler,
            echo_prompt: false,
            on_text: &mut **cb,
            on_logprob: lp.as_mut().map(|f| &mut **f as &mut dyn FnMut(&TokenLogprob)),
            // Batched decode reads the weights once for all sequences already: no speculation.
            spec: None,
        });
    }
    let mut ran = engine.generate_batch(items).into_iter();
    drop(callbacks);
    let mut results = Vec::with_capacity(sessions.len());
    for (((s, p), reply), (prompt, _, _)) in sessions.iter_mut().zip(prepared).zip(replies).zip(&asks) {
        let result = match p {
            Err(e) => Err(e),
            Ok((p, _)) => {
                let stats = ran.next().expect("one result per item");
                s.conclude(p, prompt, &reply, stats)
            }
        };
        results.push(result);
    }
    results
}

/// A request of a [`ContinuousBatch`]: what [`BatchRequest`] says, owned.
pub struct Request {
    pub prompt: Prompt,
    pub params: SamplingParams,
    pub max_new: usize,
    /// Each piece of text, and an empty piece to poll; false stops the request.
    pub on_text: Box<OnText<'static>>,
    /// With `params.top_logprobs`: each generated token's entry as it comes, before its text.
    pub on_logprob: Option<Box<OnLogprob<'static>>>,
}

/// A request that has left a [`ContinuousBatch`]: its session back, the caller's tag, its result.
pub struct Finished<B: Backend, T> {
    pub session: Session<B>,
    pub tag: T,
    pub result: Result<GenerationStats>,
}

/// Requests of several sessions of one engine running together as [`run_batch`] runs them, except that a
/// request may join between two steps and leaves as soon as it ends (continuous batching, as servers do): a
/// new request's prompt is prefilled in chunks interleaved with the others' decode steps, so that it waits
/// for no one's reply to end. Each session is owned by the batch while its request runs. A session with
/// speculative decoding speculates in the steps where its request is the only one decoding.
pub struct ContinuousBatch<'e, B: Backend, T> {
    engine: &'e Arc<Engine<B>>,
    runner: Runner<'e, B, Slot<B, T>>,
}

impl<'e, B: Backend, T> ContinuousBatch<'e, B, T> {
    pub fn new(engine: &'e Arc<Engine<B>>) -> Self {
        ContinuousBatch { engine, runner: Runner::new(engine) }
    }

    /// Requests running (or ended and not yet returned by [`ContinuousBatch::step`]).
    pub fn len(&self) -> usize {
        self.runner.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Prepares `r` on `session` (as [`Session::chat`] or [`Session::generate`] would) and lets it join at the
    /// next step. A request refused before it runs (a bad parameter, a prompt too long, a session of another
    /// engine) comes back at once with its error.
    pub fn add(&mut self, mut session: Session<B>, r: Request, tag: T) -> std::result::Result<(), Box<Finished<B, T>>> {
        let prepared = (|| {
            if !Arc::ptr_eq(&session.engine, self.engine) {
                return Err(EngineError::Eval("a batch runs sessions of one model only".into()));
            }
            r.params.validate()?;
            let constrained = match &r.prompt {
                Prompt::ChatWithTools(_, t) => tool_params(self.engine, Some(t), &r.params)?,
                _ => None,
            };
            let params = constrained.as_ref().unwrap_or(&r.params);
            let (full, pinned) = session.conversation(r.prompt.as_ask())?;
            Ok((session.prepare(full, pinned, params, r.max_new)?, pinned))
        })();
        let (p, pinned) = match prepared {
            Ok(x) => x,
            Err(e) => return Err(Box::new(Finished { session, tag, result: Err(e) })),
        };
        let reply = std::rc::Rc::new(std::cell::RefCell::new(String::new()));
        let (shown, mut cb) = (reply.clone(), r.on_text);
        let slot = Slot {
            room: Box::new(room_maker::<B>(session.policy, pinned)),
            session,
            p,
            on_text: Box::new(move |t: &str| {
                shown.borrow_mut().push_str(t);
                cb(t)
            }),
            on_logprob: r.on_logprob,
            reply,
            max_new: r.max_new,
            prompt: r.prompt,
            tag,
        };
        self.runner.add(slot);
        Ok(())
    }

    /// Runs one step (a prefill chunk of a request still reading its prompt, a decode step of the others) and
    /// returns the requests that have ended, their sessions holding their conversations.
    pub fn step(&mut self) -> Vec<Finished<B, T>> {
        self.runner.step();
        self.runner
            .take_finished()
            .into_iter()
            .map(|(slot, stats)| {
                let Slot { mut session, p, reply, prompt, tag, .. } = slot;
                let result = session.conclude(p, &prompt, &reply.borrow(), stats);
                Finished { session, tag, result }
            })
            .collect()
    }
}

/// A request of a [`ContinuousBatch`] with its session, while it runs.
struct Slot<B: Backend, T> {
    session: Session<B>,
    p: Prepared,
    room: Box<MakeRoom<'static, B>>,
    on_text: Box<OnText<'static>>,
    on_logprob: Option<Box<OnLogprob<'static>>>,
    /// The text shown so far (a chat's reply is recorded from it).
    reply: std::rc::Rc<std::cell::RefCell<String>>,
    max_new: usize,
    prompt: Prompt,
    tag: T,
}

impl<B: Backend, T> Item<B> for Slot<B, T> {
    fn parts(&mut self) -> BatchItem<'_, '_, B> {
        BatchItem {
            state: &mut self.session.state,
            run: Some(SessionRun { held: &mut self.session.cached, make_room: &mut *self.room }),
            prompt: &self.p.target[self.p.start..],
            max_new: self.max_new,
            sampler: &mut self.p.sampler,
            echo_prompt: false,
            on_text: &mut *self.on_text,
            on_logprob: self.on_logprob.as_mut().map(|f| &mut **f as &mut dyn FnMut(&TokenLogprob)),
            // The session's speculation runs while this request decodes alone (a batch step of several
            // sequences reads the weights once for all of them instead).
            spec: self.session.spec.as_mut(),
        }
    }
}

/// A request between [`Session::prepare`] and [`Session::finish`].
struct Prepared {
    /// What the state is to hold before generating (the conversation after the context policy).
    target: Vec<u32>,
    /// Tokens of `target` already held (reused) and, of those, restored from the prefix cache.
    start: usize,
    shared: usize,
    /// Tokens the policy dropped before running.
    dropped: usize,
    sampler: Sampler,
    drawn: u64,
    seed: u64,
}

/// What a session does with a full context while decoding (see [`make_room`]).
fn room_maker<B: Backend>(
    policy: ContextPolicy,
    pinned: usize,
) -> impl FnMut(&Engine<B>, &mut State<B>, &mut Vec<u32>) -> Result<usize> {
    move |e: &Engine<B>, st: &mut State<B>, held: &mut Vec<u32>| -> Result<usize> {
        if policy == ContextPolicy::Error {
            return Ok(0);
        }
        let keep = pinned.min(held.len().saturating_sub(1));
        let d = (held.len() - keep) / 2;
        make_room(e, policy, st, held, keep, d).map(|_| d)
    }
}

/// Drops `d` tokens after the first `keep` of what `state` holds (`held`) while decoding: shifted, or (also
/// when a shift cannot be done) truncated and the kept tail run again, from the prefix cache's blocks of the
/// kept start where it has them.
fn make_room<B: Backend>(
    e: &Engine<B>,
    policy: ContextPolicy,
    state: &mut State<B>,
    held: &mut Vec<u32>,
    keep: usize,
    d: usize,
) -> Result<()> {
    if policy == ContextPolicy::Shift {
        match e.model.shift_kv(state, keep, d) {
            Ok(()) => {
                held.drain(keep..keep + d);
                return Ok(());
            }
            Err(sprig_models::ModelError::ShiftUnavailable { .. }) => {}
            Err(err) => return Err(err.into()),
        }
    }
    let target = [&held[..keep], &held[keep + d..]].concat();
    let (from, _) = resume(e, state, held, &target)?;
    for chunk in target[from..].chunks(crate::generate::PREFILL_CHUNK) {
        e.model.forward(state, chunk, sprig_models::Logits::Last)?;
    }
    *held = target;
    Ok(())
}

/// Makes `state` (holding `held`) hold the longest reusable start of `target`, at most all but its last
/// token: what it holds already (any common start on a model of global layers; on one with sliding-window
/// layers only all of it, their rings having overwritten earlier positions) or the prefix cache's blocks, when
/// those cover more. `held` follows. Returns the tokens held and how many came from the prefix cache.
fn resume<B: Backend>(e: &Engine<B>, state: &mut State<B>, held: &mut Vec<u32>, target: &[u32]) -> Result<(usize, usize)> {
    let max = target.len().saturating_sub(1);
    let common = held.iter().zip(target).take_while(|(a, b)| a == b).count().min(max);
    let sliding = e.model.config.attention.iter().any(|a| *a != sprig_format::AttentionKind::Global);
    let own = if common == held.len() || !sliding { common } else { 0 };
    held.truncate(own);
    state.pos = own;
    let layout = e.model.state_kv_layout(state);
    let restored = e.prefix_cache.restore_into(&*e.model.backend, state, &layout, &target[..max], own)?;
    if restored > 0 {
        *held = target[..restored].to_vec();
        return Ok((restored, restored));
    }
    Ok((own, 0))
}

/// The stream a request draws from and the words already drawn from it: the session's, carried on, unless
/// the request gives another seed.
fn session_rng(stored: Option<Stream>, seed: u64) -> (StdRng, u64) {
    match stored {
        Some(s) if s.seed == seed => (s.rng, s.draws),
        _ => (StdRng::seed_from_u64(seed), 0),
    }
}

#[cfg(test)]
mod tests {
    use rand::Rng;

    use super::*;

    #[test]
    fn the_random_stream_carries_on_across_requests() {
        let (mut first, _) = session_rng(None, 9);
        let a: Vec<u32> = (0..4).map(|_| first.gen()).collect();
        // The next request with the same seed continues the stream instead of replaying it...
        let (mut second, drawn) = session_rng(Some(Stream { seed: 9, rng: first, draws: 4 }), 9);
        assert_eq!(drawn, 4);
        let b: Vec<u32> = (0..4).map(|_| second.gen()).collect();
        assert_ne!(a, b);
        let mut both = StdRng::seed_from_u64(9);
        let ab: Vec<u32> = (0..8).map(|_| both.gen()).collect();
        assert_eq!(ab, [a.clone(), b].concat());
        // ...and another seed starts a fresh one.
        let (mut other, drawn) = session_rng(Some(Stream { seed: 9, rng: second, draws: 8 }), 9 + 1);
        assert_eq!(drawn, 0);
        let mut fresh = StdRng::seed_from_u64(10);
        assert_eq!(other.gen::<u64>(), fresh.gen::<u64>());
    }
}
