//! Prefill + decode loop with streaming output.

use std::sync::Arc;
use std::time::Instant;

use sprig_backend::Backend;
use sprig_format::ModelFile;
use sprig_models::{Logits, Model, State};
use sprig_tokenizer::{StreamDecoder, Tokenizer};

use crate::chat::{ChatMessage, ChatTemplate};
pub use crate::constraint::ConstraintStats;
use crate::constraint::{Constraint, Grammars, Guide};
use crate::tools::{ToolCall, ToolFormat, Tools};
use crate::prefix_cache::{self, PrefixCache};
use crate::sampler::{Sampler, TokenLogprob};
use crate::speculative::{SpecStats, Speculation, TargetState};
use crate::{EngineError, Result};

/// Longest prompt slice run through the model in one batched forward pass.
pub const PREFILL_CHUNK: usize = 512;

/// A model with its tokenizer and chat template.
pub struct Engine<B: Backend> {
    pub model: Model<B>,
    pub tokenizer: Arc<Tokenizer>,
    pub template: Option<ChatTemplate>,
    /// K/V of prompt blocks shared by every session of this engine.
    pub prefix_cache: PrefixCache,
    /// The model's fingerprint (saved sessions name it), computed on first use.
    fingerprint: std::sync::OnceLock<String>,
    /// The tokenizer as constrained decoding sees it, built on the first constrained request.
    grammars: std::sync::OnceLock<std::result::Result<Grammars, String>>,
    /// Constrained requests compute the next mask on a helper thread while the forward pass runs, when their
    /// sampled tokens are often rejected (see [`Guide::prefetch`]). On by default; off to measure what it saves.
    pub masks_ahead: std::sync::atomic::AtomicBool,
    /// The batch thread of [`Engine::generate_together`].
    pub(crate) together: crate::together::Queue<B>,
}

/// Frees room in a full context while decoding: drops tokens from what the state holds (and from the
/// tokens, `held`), returning how many (0: none can go, generation stops with [`StopReason::ContextFull`]).
pub(crate) type MakeRoom<'a, B> = dyn FnMut(&Engine<B>, &mut State<B>, &mut Vec<u32>) -> Result<usize> + 'a;

/// What a session adds to a generation.
pub(crate) struct SessionRun<'a, 'b, B: Backend> {
    /// The tokens the state holds (`state.pos` of them); what runs is appended, and completed blocks go
    /// into the prefix cache.
    pub held: &'a mut Vec<u32>,
    pub make_room: &'a mut MakeRoom<'b, B>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum StopReason {
    /// The model produced a stop token (EOS / end of turn).
    #[default]
    StopToken,
    /// `max_new` tokens were generated.
    Length,
    /// The callback asked to stop.
    Cancelled,
    /// The context is full.
    ContextFull,
    /// The generated text reached one of the request's stop strings.
    StopString,
    /// Generation ended (length, context, stop string) before the output was a complete instance of the
    /// request's constraint: the text is not valid output.
    ConstraintUnsatisfied,
}

/// `Default`: nothing ran (a turn answered elsewhere, by escalation's teacher).
#[derive(Clone, Debug, Default)]
pub struct GenerationStats {
    /// Prompt tokens run into the state (fewer than given when the request was cancelled during prefill).
    pub prompt_tokens: usize,
    pub generated: Vec<u32>,
    /// Of `generated`, the leading tokens run into the state (all of them after a stop token; otherwise
    /// usually all but the last).
    pub fed: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
    pub stop: StopReason,
    /// Prompt tokens not run because their K/V was cached: the session's own, or blocks of the engine's
    /// prefix cache. The request's prompt was `cached_tokens + prompt_tokens` tokens (unless cancelled).
    pub cached_tokens: usize,
    /// Of `cached_tokens`, those restored from the prefix cache shared by the engine's sessions.
    pub prefix_cache_tokens: usize,
    /// Tokens the context policy dropped from the conversation to make room during this request.
    pub context_dropped: usize,
    /// A chat request with tools: the calls its reply made (empty: a text reply).
    pub tool_calls: Vec<ToolCall>,
    /// Under a constraint: what it cost (see [`ConstraintStats`]).
    pub constraint: Option<ConstraintStats>,
    /// With [`crate::SamplingParams::top_logprobs`]: one entry per generated token, in order.
    pub logprobs: Vec<TokenLogprob>,
    /// With speculative decoding: what it did in this generation.
    pub speculation: Option<SpecStats>,
    /// Decode steps this generation ran in one forward pass with other sessions' (batched decoding).
    pub batched_steps: usize,
}

impl GenerationStats {
    pub fn prefill_tok_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_secs.max(1e-9)
    }
    pub fn decode_tok_s(&self) -> f64 {
        // The first generated token comes from the prefill's logits.
        self.generated.len().saturating_sub(1) as f64 / self.decode_secs.max(1e-9)
    }
}

impl<B: Backend> Engine<B> {
    pub fn new(backend: Arc<B>, file: Arc<ModelFile>) -> Result<Self> {
        let tokenizer = Arc::new(Tokenizer::from_json(&file.tokenizer_json)?);
        if tokenizer.vocab_size() > file.config.vocab_size {
            return Err(EngineError::VocabularyMismatch {
                tokenizer: tokenizer.vocab_size(),
                model: file.config.vocab_size,
            });
        }
        let template = match &file.chat_template {
            Some(src) => {
                let text = |id: Option<u32>| id.and_then(|i| tokenizer.token_text(i)).unwrap_or_default();
                let sp = tokenizer.special();
                Some(ChatTemplate::new(src, &text(sp.bos), &text(sp.eos))?)
            }
            None => None,
        };
        let model = Model::load(backend, file)?;
        release_freed_heap();
        let prefix_cache = PrefixCache::new(prefix_cache::DEFAULT_BUDGET_BYTES);
        Ok(Engine {
            model,
            tokenizer,
            template,
            prefix_cache,
            fingerprint: Default::default(),
            grammars: Default::default(),
            masks_ahead: true.into(),
            together: Default::default(),
        })
    }

    /// Compiles `c` for one generation. An invalid or unsupported constraint is an error here, before anything
    /// runs; surfaces call this to check a request up front.
    pub fn guide(&self, c: &Constraint) -> Result<Guide> {
        let grammars = self
            .grammars
            .get_or_init(|| Grammars::new(self.tokenizer.clone(), self.model.config.vocab_size).map_err(|e| e.to_string()));
        match grammars {
            Ok(g) => g.guide(c, self.masks_ahead.load(std::sync::atomic::Ordering::Relaxed)),
            Err(detail) => Err(EngineError::Constraint { kind: "tokenizer", detail: detail.clone() }),
        }
    }

    /// What identifies this model's weights (see [`crate::session_file::model_fingerprint`]).
    pub fn fingerprint(&self) -> &str {
        self.fingerprint.get_or_init(|| crate::session_file::model_fingerprint(&self.model.file))
    }

    /// Renders a conversation with the model's template and opens the assistant's turn.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String> {
        let t = self
            .template
            .as_ref()
            .ok_or(EngineError::NoChatTemplate)?;
        t.render(messages, true)
    }

    /// Tokens of a conversation rendered with the model's template (assistant turn opened): special-token
    /// strings the template writes become their ids, message content is plain text (a user who types
    /// `<|im_end|>` cannot close the turn), and BOS is prepended when the model adds one and the template did
    /// not write it.
    pub fn chat_tokens(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        self.chat_tokens_with_tools(messages, None)
    }

    /// [`Engine::chat_tokens`] with tools offered to the model, shown as its template's convention says (see
    /// [`crate::tools`]).
    pub fn chat_tokens_with_tools(&self, messages: &[ChatMessage], tools: Option<&Tools>) -> Result<Vec<u32>> {
        let t = self
            .template
            .as_ref()
            .ok_or(EngineError::NoChatTemplate)?;
        let tool_turns = messages.iter().any(|m| m.role == "tool" || !m.tool_calls.is_empty());
        match (t.tool_format, tools) {
            (ToolFormat::Tagged, Some(tools)) => t.tokens(&self.tokenizer, messages, Some(&tools.openai())),
            (ToolFormat::Json, _) if tools.is_some() || tool_turns => {
                t.tokens(&self.tokenizer, &crate::tools::json_messages(messages, tools), None)
            }
            _ => t.tokens(&self.tokenizer, messages, None),
        }
    }

    /// How this model is shown tools and calls them (its template's convention; JSON without a template).
    pub fn tool_format(&self) -> ToolFormat {
        self.template.as_ref().map_or(ToolFormat::Json, |t| t.tool_format)
    }

    /// Runs `prompt` from `state.pos`, then samples up to `max_new` tokens. `on_text` receives the decoded
    /// prompt (when `echo_prompt`) and each completed piece of generated text, held back while it could still
    /// become one of the sampler's stop strings; returning false stops. It is also called with an empty piece
    /// between prefill chunks and after tokens that produce no text, so a cancellation is seen there too.
    ///
    /// The state then holds exactly the tokens that were run: the prompt tokens processed
    /// ([`GenerationStats::prompt_tokens`], all of them unless cancelled during prefill) and every generated
    /// token but the last. Every token run is also shown to `sampler` (its penalties' window).
    pub fn generate(
        &self,
        state: &mut State<B>,
        prompt: &[u32],
        max_new: usize,
        sampler: &mut Sampler,
        echo_prompt: bool,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<GenerationStats> {
        self.generate_speculative(state, prompt, max_new, sampler, echo_prompt, None, on_text)
    }

    /// [`Engine::generate`] with speculative decoding (`spec`; `None`: plain decoding).
    #[allow(clippy::too_many_arguments)]
    pub fn generate_speculative(
        &self,
        state: &mut State<B>,
        prompt: &[u32],
        max_new: usize,
        sampler: &mut Sampler,
        echo_prompt: bool,
        spec: Option<&mut Speculation>,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<GenerationStats> {
        let item = BatchItem { state, run: None, prompt, max_new, sampler, echo_prompt, on_text: &mut on_text, on_logprob: None, spec };
        self.generate_batch(vec![item]).pop().expect("one result per item")
    }

    /// Runs several generations together (each on its own state): one prefill chunk of one of them at a time,
    /// interleaved with decode steps in which every generation past its prompt advances by a token and those
    /// tokens form one batch ([`Model::forward_batch`]: the weights are read once per step for all of them).
    /// Each item behaves as [`Engine::generate`] alone would; with a session (`run`), prefill chunks end on
    /// block boundaries, completed blocks go into the prefix cache, and a full context asks `run.make_room`.
    pub(crate) fn generate_batch(&self, items: Vec<BatchItem<'_, '_, B>>) -> Vec<Result<GenerationStats>> {
        let mut r = Runner::new(self);
        items.into_iter().for_each(|it| r.add(it));
        while r.step() {}
        r.gens.into_iter().map(|g| g.finish(self).1).collect()
    }
}

/// Generations running together (see [`Engine::generate_batch`]); more may join between steps, and those that
/// have ended may leave (a continuous batch, [`crate::session::ContinuousBatch`]).
pub(crate) struct Runner<'t, B: Backend, I: Item<B>> {
    e: &'t Engine<B>,
    gens: Vec<Gen<'t, B, I>>,
    batch: Option<sprig_models::Batch<B>>,
    batch_logits: Vec<f32>,
    step: Vec<usize>,
    tokens: Vec<u32>,
    /// Round-robin over prefilling generations.
    next_prefill: usize,
}

impl<'t, B: Backend, I: Item<B>> Runner<'t, B, I> {
    pub(crate) fn new(e: &'t Engine<B>) -> Self {
        Runner { e, gens: Vec::new(), batch: None, batch_logits: Vec::new(), step: Vec::new(), tokens: Vec::new(), next_prefill: 0 }
    }

    /// Starts a generation; it joins the next step.
    pub(crate) fn add(&mut self, item: I) {
        self.gens.push(Gen::start(self.e, item));
    }

    pub(crate) fn len(&self) -> usize {
        self.gens.len()
    }

    /// Takes the generations that have ended, in order, with their results.
    pub(crate) fn take_finished(&mut self) -> Vec<(I, Result<GenerationStats>)> {
        let mut done = Vec::new();
        let mut i = 0;
        while i < self.gens.len() {
            if self.gens[i].live() {
                i += 1;
            } else {
                done.push(self.gens.remove(i).finish(self.e));
            }
        }
        done
    }

    /// One round: a prefill chunk of one generation still reading its prompt, then a decode step of every
    /// generation past its prompt. False when nothing was left to run.
    pub(crate) fn step(&mut self) -> bool {
        let e = self.e;
        let gens = &mut self.gens;
        let n = gens.len();
        let decoding = gens.iter().any(|g| g.live() && g.prefilled());
        let start = self.next_prefill.min(n);
        let prefilling = (start..n).chain(0..start).find(|&i| gens[i].live() && !gens[i].prefilled());
        if let Some(i) = prefilling {
            self.next_prefill = i + 1;
            // While others decode, a long prompt goes in shorter chunks so that they do not stall.
            let max = if decoding { INTERLEAVED_PREFILL_CHUNK } else { PREFILL_CHUNK };
            gens[i].prefill_chunk(e, max);
        }
        // Every generation past its prompt samples its next token; those that go on are fed as one batch.
        let (step, tokens) = (&mut self.step, &mut self.tokens);
        step.clear();
        tokens.clear();
        let mut forced_run = false;
        for (i, g) in gens.iter_mut().enumerate() {
            if !(g.live() && g.prefilled()) {
                continue;
            }
            let logits = g.batch_row.take().map(|r| &self.batch_logits[r * g.vocab..(r + 1) * g.vocab]);
            if let Some(next) = g.sample(e, logits) {
                if g.forced.is_empty() {
                    step.push(i);
                    tokens.push(next);
                } else {
                    // Tokens a constraint forces after it: one forward pass of them all, outside the batch
                    // (they end `generated`, after `next`).
                    let run = &g.generated[g.generated.len() - 1 - g.forced.len()..];
                    let r = e.model.forward(g.item.parts().state, run, Logits::Last);
                    g.fed(r.map_err(Into::into), None);
                    forced_run = true;
                }
            }
        }
        match step.len() {
            0 => return prefilling.is_some() || forced_run,
            // One sequence: its own forward pass (no batch bookkeeping, nothing allocated per token), or a
            // speculative one checking drafted tokens after it.
            1 => {
                let g = &mut gens[step[0]];
                if !g.speculate(e, tokens[0]) {
                    let t0 = Instant::now();
                    let r = e.model.forward(g.item.parts().state, tokens, Logits::Last);
                    g.fed(r.map_err(Into::into), None);
                    if let Some(spec) = g.item.parts().spec {
                        spec.record_plain(t0.elapsed(), &mut g.spec_stats);
                    }
                }
            }
            _ => {
                let batch_logits = &mut self.batch_logits;
                let r = match self.batch.as_mut() {
                    Some(b) => Ok(b),
                    None => e.model.new_batch().map(|b| self.batch.insert(b)),
                }
                .and_then(|b| {
                    // `step` is in increasing order: the states of its generations, in its order.
                    let mut states: Vec<&mut State<B>> = gens
                        .iter_mut()
                        .enumerate()
                        .filter(|(i, _)| step.binary_search(i).is_ok())
                        .map(|(_, g)| g.item.parts().state)
                        .collect();
                    e.model.forward_batch(b, &mut states, tokens)?;
                    e.model.read_batch_logits(b, batch_logits)
                });
                match r {
                    Ok(()) => {
                        for (row, &i) in step.iter().enumerate() {
                            gens[i].batched_steps += 1;
                            gens[i].fed(Ok(()), Some(row));
                        }
                    }
                    // The batch's states are in an unknown state: every generation in it fails, each with
                    // the error's text (one error value cannot be handed to all of them).
                    Err(err) => {
                        let message = err.to_string();
                        for &i in step.iter() {
                            let failed = sprig_backend::BackendError::DeviceFailed { op: "forward_batch", message: message.clone() };
                            gens[i].fed(Err(sprig_models::ModelError::Backend(failed).into()), None);
                        }
                    }
                }
            }
        }
        true
    }
}

/// Longest prompt chunk a generation runs while others decode (each chunk delays their next token).
pub const INTERLEAVED_PREFILL_CHUNK: usize = 128;

/// One generation of [`Engine::generate_batch`].
pub(crate) struct BatchItem<'a, 'b, B: Backend> {
    pub state: &'a mut State<B>,
    pub run: Option<SessionRun<'a, 'b, B>>,
    pub prompt: &'a [u32],
    pub max_new: usize,
    pub sampler: &'a mut Sampler,
    pub echo_prompt: bool,
    pub on_text: &'a mut dyn FnMut(&str) -> bool,
    /// With `top_logprobs`: each generated token's entry, before its text goes to `on_text`.
    pub on_logprob: Option<&'a mut dyn FnMut(&TokenLogprob)>,
    /// Speculative decoding, when this generation runs alone (never in a batch of several).
    pub spec: Option<&'a mut Speculation>,
}

/// What a generation runs on, lent out for each use: a [`BatchItem`] of borrowed parts, or a request that
/// owns its session (a continuous batch's, which outlives no borrow).
pub(crate) trait Item<B: Backend> {
    fn parts(&mut self) -> BatchItem<'_, '_, B>;
}

impl<B: Backend> Item<B> for BatchItem<'_, '_, B> {
    fn parts(&mut self) -> BatchItem<'_, '_, B> {
        BatchItem {
            state: &mut *self.state,
            run: self.run.as_mut().map(|r| SessionRun { held: &mut *r.held, make_room: &mut *r.make_room }),
            prompt: self.prompt,
            max_new: self.max_new,
            sampler: &mut *self.sampler,
            echo_prompt: self.echo_prompt,
            on_text: &mut *self.on_text,
            on_logprob: self.on_logprob.as_mut().map(|f| &mut **f as &mut dyn FnMut(&TokenLogprob)),
            spec: self.spec.as_deref_mut(),
        }
    }
}

/// A generation in progress.
pub(crate) struct Gen<'t, B: Backend, I: Item<B>> {
    item: I,
    dec: StreamDecoder<'t>,
    /// One text buffer for every piece: decode allocates nothing per token once it has grown.
    piece: String,
    shown: String,
    stops: StopStrings,
    logits: Vec<f32>,
    vocab: usize,
    layout: sprig_backend::KvLayout,
    caching: bool,
    chunk_limit: usize,
    prompt_len: usize,
    processed: usize,
    generated: Vec<u32>,
    /// Generated tokens run into the state.
    fed: usize,
    /// Tokens a constraint forced after this step's sampled token (also in `generated`): fed with it.
    forced: Vec<u32>,
    /// Why it ended (`None` while it runs).
    stop: Option<StopReason>,
    logprobs: Vec<TokenLogprob>,
    /// A token the last speculative pass chose (with its log-probability entry) but did not run: the next
    /// step's token, instead of a sample.
    pending: Option<(u32, Option<TokenLogprob>)>,
    /// A speculative pass's tokens (`next`, then the drafts), and the sequence shown to the drafter when no
    /// session holds it: buffers kept from pass to pass.
    drafts: Vec<u32>,
    history: Vec<u32>,
    spec_stats: SpecStats,
    /// Decode steps run in a batch with other generations.
    batched_steps: usize,
    error: Option<EngineError>,
    /// Row of the batch's logits holding this generation's next-token logits (else its state's).
    batch_row: Option<usize>,
    context_dropped: usize,
    t0: Instant,
    prefill_secs: f64,
    t1: Option<Instant>,
    backend: std::marker::PhantomData<B>,
}

/// Records the first error of a generation.
fn fail(slot: &mut Option<EngineError>, e: EngineError) {
    if slot.is_none() {
        *slot = Some(e);
    }
}

impl<'t, B: Backend, I: Item<B>> Gen<'t, B, I> {
    fn start(e: &'t Engine<B>, mut item: I) -> Self {
        let it = item.parts();
        let layout = e.model.state_kv_layout(it.state);
        let caching = it.run.is_some() && e.prefix_cache.enabled();
        let chunk_limit = if caching { prefix_cache::chunk_limit(&layout, PREFILL_CHUNK) } else { PREFILL_CHUNK };
        let stops = StopStrings::new(it.sampler.params().stop.clone());
        let (pos, ctx, n) = (it.state.pos, it.state.max_context, it.prompt.len());
        let generated = Vec::with_capacity(it.max_new.min(ctx.saturating_sub(pos) + 1));
        let mut g = Gen {
            dec: StreamDecoder::new(&e.tokenizer),
            piece: String::with_capacity(e.tokenizer.max_piece_bytes()),
            shown: String::new(),
            stops,
            logits: Vec::new(),
            vocab: e.model.config.vocab_size,
            layout,
            caching,
            chunk_limit,
            prompt_len: n,
            processed: 0,
            generated,
            fed: 0,
            forced: Vec::new(),
            stop: None,
            logprobs: Vec::new(),
            pending: None,
            drafts: Vec::new(),
            history: Vec::new(),
            spec_stats: SpecStats::default(),
            batched_steps: 0,
            error: None,
            batch_row: None,
            context_dropped: 0,
            t0: Instant::now(),
            prefill_secs: 0.0,
            t1: None,
            backend: std::marker::PhantomData,
            item,
        };
        g.shown.reserve(g.piece.capacity());
        // A drafter that reads the model's state (an MTP head) needs it kept from the prompt on; once `auto`
        // has switched speculation off, the head's cache is dropped (it costs a block per token).
        let it = g.item.parts();
        if let Some(spec) = it.spec.filter(|s| s.needs_target_state()) {
            if spec.stats().switched_off {
                e.model.disable_mtp(it.state);
            } else if let Err(err) = e.model.enable_mtp(it.state) {
                fail(&mut g.error, err.into());
            }
        }
        // Checked once, here, before anything runs: a prompt that cannot fit leaves the state untouched.
        if n == 0 {
            fail(&mut g.error, EngineError::EmptyPrompt);
        } else if pos + n > ctx {
            fail(&mut g.error, sprig_models::ModelError::ContextOverflow { pos, new: n, ctx }.into());
        }
        // The request's constraint, compiled now: a bad one fails before anything runs.
        let it = g.item.parts();
        if let Some(c) = it.sampler.params().constraint.clone() {
            match e.guide(&c) {
                Ok(guide) => it.sampler.constrain(guide),
                Err(err) => fail(&mut g.error, err),
            }
        }
        if g.error.is_some() {
            return g;
        }
        // The decoder sees the prompt either way: the generated text continues it (no leading space dropped as
        // if it started the output).
        let bos = e.tokenizer.bos();
        let it = g.item.parts();
        for &t in it.prompt {
            g.piece.clear();
            if let Err(err) = g.dec.push_into(t, &mut g.piece) {
                fail(&mut g.error, err.into());
                return g;
            }
            if it.echo_prompt && Some(t) != bos && !g.piece.is_empty() && g.stop.is_none() && !(it.on_text)(&g.piece) {
                g.stop = Some(StopReason::Cancelled);
            }
        }
        g.t0 = Instant::now();
        g
    }

    fn live(&self) -> bool {
        self.stop.is_none() && self.error.is_none()
    }

    fn prefilled(&self) -> bool {
        self.processed == self.prompt_len
    }

    /// Runs the next chunk of the prompt (at most `max` tokens), after asking `on_text` whether to go on.
    fn prefill_chunk(&mut self, e: &Engine<B>, max: usize) {
        let it = self.item.parts();
        if !(it.on_text)("") {
            self.stop = Some(StopReason::Cancelled);
            return;
        }
        let state = it.state;
        let left = it.prompt.len() - self.processed;
        let limit = self.chunk_limit.min(max);
        let n = if self.caching { prefix_cache::chunk_end(state.pos, state.pos + left, limit) - state.pos } else { limit.min(left) };
        let chunk = &it.prompt[self.processed..self.processed + n];
        if let Err(err) = e.model.forward(state, chunk, Logits::Last) {
            return fail(&mut self.error, err.into());
        }
        chunk.iter().for_each(|&t| it.sampler.accept(t));
        self.processed += n;
        if let Some(r) = it.run {
            r.held.extend_from_slice(chunk);
            if self.caching {
                if let Err(err) = e.prefix_cache.insert_from(&*e.model.backend, state, &self.layout, r.held) {
                    return fail(&mut self.error, err);
                }
            }
        }
        if self.prefilled() {
            self.prefill_secs = self.t0.elapsed().as_secs_f64();
            self.t1 = Some(Instant::now());
        }
    }

    /// Samples the next token from `logits` (a batch's row) or the state's, shows its text; returns it when it
    /// is to be fed (the generation goes on), after freeing room in a full context.
    fn sample(&mut self, e: &Engine<B>, logits: Option<&[f32]>) -> Option<u32> {
        let it = self.item.parts();
        // A token chosen by the last speculative pass is already committed to the constraint (it may be the one
        // that completes it): it is shown first.
        if self.pending.is_none() && it.sampler.guide().is_some_and(|g| g.finished()) {
            // The constrained output is complete (its last tokens are in the state): only the end may follow.
            self.stop = Some(StopReason::StopToken);
            return None;
        }
        let (next, entry) = match self.pending.take() {
            Some(p) => p,
            None => {
                let logits = match logits {
                    Some(l) => l,
                    None => {
                        if let Err(err) = e.model.read_logits(it.state, &mut self.logits) {
                            fail(&mut self.error, err.into());
                            return None;
                        }
                        &self.logits[..]
                    }
                };
                let next = match it.sampler.sample(logits) {
                    Ok(t) => t,
                    Err(err) => {
                        fail(&mut self.error, err);
                        return None;
                    }
                };
                (next, it.sampler.params().top_logprobs.map(|n| TokenLogprob::from_logits(logits, next, n)))
            }
        };
        if e.tokenizer.is_stop(next) {
            self.stop = Some(StopReason::StopToken);
            return None;
        }
        if !self.emit(next, entry) {
            return None;
        }
        let it = self.item.parts();
        let state = it.state;
        if state.pos >= state.max_context {
            let freed = match it.run {
                Some(r) => match (r.make_room)(e, state, r.held) {
                    Ok(n) => n,
                    Err(err) => {
                        fail(&mut self.error, err);
                        return None;
                    }
                },
                None => 0,
            };
            if freed == 0 || state.pos >= state.max_context {
                self.stop = Some(StopReason::ContextFull);
                return None;
            }
            self.context_dropped += freed;
        }
        // What the constraint forces next is fed with this token, without sampling: as many as fit in the
        // context, and one fewer than the length left (the length stop comes from a sampled token).
        let (pos, ctx) = (state.pos, state.max_context);
        let max = (ctx - pos - 1).min((it.max_new - self.generated.len()).saturating_sub(1));
        if let Some(g) = it.sampler.guide() {
            let mut forced = std::mem::take(&mut self.forced);
            if let Err(err) = g.forced(max, &mut forced) {
                fail(&mut self.error, err);
                return None;
            }
            for &t in &forced {
                if !self.emit(t, None) {
                    return None;
                }
            }
            self.forced = forced;
            // The next position's mask, computed beside the forward pass that comes next (when the sampler is
            // likely to need it).
            if let Some(g) = self.item.parts().sampler.guide() {
                g.prefetch();
            }
        }
        Some(next)
    }

    /// Runs `next` (sampled, shown) with tokens a drafter proposes after it in one pass, keeps the drafts the
    /// sampler agrees with ([`Sampler::verify`]) and rolls the state back past the rest; the token the sampler
    /// chose instead (or after them all) is the next step's. False when this step does not speculate (no
    /// speculation, a constraint, no room, no draft): the caller runs `next` alone.
    fn speculate(&mut self, e: &Engine<B>, next: u32) -> bool {
        let mut it = self.item.parts();
        let Some(spec) = it.spec else { return false };
        if !spec.wanted() || !self.forced.is_empty() {
            return false;
        }
        let (pos, ctx) = (it.state.pos, it.state.max_context);
        // Room for the drafts and the token after them, in the context and in the length.
        let room = (ctx - pos).saturating_sub(2).min(it.max_new.saturating_sub(self.generated.len() + 1));
        let k = spec.draft_len().min(room);
        if k == 0 {
            return false;
        }
        let t0 = Instant::now();
        // The pass's tokens, in buffers kept from pass to pass: `next`, then the drafts.
        let mut run = std::mem::take(&mut self.drafts);
        run.clear();
        run.push(next);
        // The drafter sees the whole sequence, `next` included: a session's tokens (with `next` for the
        // call), else the prompt and the reply so far.
        let mut target = TargetState { engine: e, state: &mut *it.state };
        let drafted = match it.run.as_mut() {
            Some(r) => {
                r.held.push(next);
                let d = spec.draft(&mut target, r.held, k, &mut run);
                r.held.pop();
                d
            }
            None => {
                let history = &mut self.history;
                history.clear();
                history.extend_from_slice(&it.prompt[..self.processed]);
                history.extend_from_slice(&self.generated[..self.fed]);
                history.push(next);
                spec.draft(&mut target, history, k, &mut run)
            }
        };
        // A drafter that fails (out of memory, say) only costs the speed-up.
        run.truncate(if drafted.is_ok() { 1 + k } else { 1 });
        // Under a constraint, only the drafts plain decoding could sample are worth checking.
        if let (Some(g), true) = (it.sampler.guide(), run.len() > 1) {
            match g.draftable(&run[1..]) {
                Ok(n) => run.truncate(1 + n),
                Err(err) => {
                    fail(&mut self.error, err);
                    self.drafts = run;
                    return true;
                }
            }
        }
        if run.len() == 1 {
            self.drafts = run;
            return false;
        }
        let drafting = t0.elapsed();
        let t0 = Instant::now();
        let n = run.len() - 1;
        let checkpoint = match e.model.ring_checkpoint(it.state, run.len()) {
            Ok(c) => c,
            Err(err) => {
                fail(&mut self.error, err.into());
                return true;
            }
        };
        if let Err(err) = e.model.forward(it.state, &run, Logits::All).and_then(|()| e.model.read_logits(it.state, &mut self.logits)) {
            fail(&mut self.error, err.into());
            return true;
        }
        // `next` is in the state now.
        it.sampler.accept(next);
        if let Some(r) = it.run {
            r.held.push(next);
        }
        self.fed += 1;
        let v = self.vocab;
        let (mut accepted, mut chosen) = (0, None);
        for (i, &d) in run[1..].iter().enumerate() {
            let it = self.item.parts();
            let row = &self.logits[i * v..(i + 1) * v];
            let (t, ok) = match it.sampler.verify(row, d) {
                Ok(x) => x,
                Err(err) => {
                    fail(&mut self.error, err);
                    break;
                }
            };
            let entry = it.sampler.params().top_logprobs.map(|n| TokenLogprob::from_logits(row, t, n));
            if !ok {
                chosen = Some((t, entry));
                break;
            }
            if e.tokenizer.is_stop(t) {
                self.stop = Some(StopReason::StopToken);
                break;
            }
            // Shown (and counted) like a sampled token; run already.
            if !self.emit(t, entry) {
                break;
            }
            let it = self.item.parts();
            it.sampler.accept(t);
            if let Some(r) = it.run {
                r.held.push(t);
            }
            self.fed += 1;
            accepted += 1;
        }
        if self.live() && chosen.is_none() && accepted == n {
            // Every draft accepted: the logits after the last one give one more token.
            let it = self.item.parts();
            let row = &self.logits[n * v..(n + 1) * v];
            match it.sampler.sample(row) {
                Ok(t) => chosen = Some((t, it.sampler.params().top_logprobs.map(|k| TokenLogprob::from_logits(row, t, k)))),
                Err(err) => fail(&mut self.error, err),
            }
        }
        let it = self.item.parts();
        if let Err(err) = e.model.rollback(it.state, pos + 1 + accepted, &checkpoint) {
            fail(&mut self.error, err.into());
        }
        let live = self.stop.is_none() && self.error.is_none();
        self.pending = if live { chosen } else { None };
        let tokens = accepted + usize::from(self.pending.is_some());
        if let Some(spec) = it.spec {
            spec.record_pass(drafting, t0.elapsed(), n, accepted, tokens, &mut self.spec_stats);
        }
        self.drafts = run;
        true
    }

    /// Adds a generated token: its text goes out (held back while it could start a stop string); false when
    /// the generation ends with it (a stop string, a cancellation, the length).
    fn emit(&mut self, t: u32, logprob: Option<TokenLogprob>) -> bool {
        let it = self.item.parts();
        self.generated.push(t);
        if it.sampler.params().top_logprobs.is_some() {
            // A forced token comes without an entry (see `TokenLogprob`).
            let entry = logprob.unwrap_or_else(|| TokenLogprob::forced(t));
            if let Some(cb) = it.on_logprob {
                cb(&entry);
            }
            self.logprobs.push(entry);
        }
        self.piece.clear();
        if let Err(err) = self.dec.push_into(t, &mut self.piece) {
            fail(&mut self.error, err.into());
            return false;
        }
        self.shown.clear();
        let hit = self.stops.push(&self.piece, &mut self.shown);
        if !(it.on_text)(&self.shown) {
            self.stop = Some(StopReason::Cancelled);
            return false;
        }
        if hit {
            self.stop = Some(StopReason::StopString);
            return false;
        }
        if self.generated.len() >= it.max_new {
            self.stop = Some(StopReason::Length);
            return false;
        }
        true
    }

    /// The sampled token and those forced after it were run (`r`): the last one's logits are in the state, or
    /// row `row` of the batch's.
    fn fed(&mut self, r: Result<()>, row: Option<usize>) {
        match r {
            Ok(()) => {
                let it = self.item.parts();
                let n = 1 + self.forced.len();
                let mut run = it.run;
                for &t in &self.generated[self.generated.len() - n..] {
                    it.sampler.accept(t);
                    if let Some(r) = run.as_mut() {
                        r.held.push(t);
                    }
                }
                self.fed += n;
                self.forced.clear();
                self.batch_row = row;
            }
            Err(err) => fail(&mut self.error, err),
        }
    }

    /// The generation's end: what was held back goes out, the reply's blocks go into the prefix cache. Returns
    /// the item with the result.
    fn finish(mut self, e: &Engine<B>) -> (I, Result<GenerationStats>) {
        let r = self.stats(e);
        (self.item, r)
    }

    fn stats(&mut self, e: &Engine<B>) -> Result<GenerationStats> {
        if let Some(err) = self.error.take() {
            return Err(err);
        }
        let it = self.item.parts();
        let mut stop = self.stop.unwrap_or(StopReason::Length);
        let unfinished = matches!(stop, StopReason::Length | StopReason::ContextFull | StopReason::StopString);
        if unfinished && it.sampler.guide().is_some_and(|g| !g.satisfied()) {
            stop = StopReason::ConstraintUnsatisfied;
        }
        if stop != StopReason::StopString && stop != StopReason::Cancelled {
            // What was held back as a possible stop string's start, and the decoder's last bytes.
            let mut tail = self.stops.finish();
            tail.push_str(&self.dec.finish());
            if !tail.is_empty() {
                (it.on_text)(&tail);
            }
        }
        if let (Some(r), true) = (it.run, self.caching) {
            // Blocks the reply completed: the next turn's prompt starts with them.
            e.prefix_cache.insert_from(&*e.model.backend, it.state, &self.layout, r.held)?;
        }
        let prefill_secs = if self.t1.is_some() { self.prefill_secs } else { self.t0.elapsed().as_secs_f64() };
        Ok(GenerationStats {
            prompt_tokens: self.processed,
            generated: std::mem::take(&mut self.generated),
            fed: self.fed,
            prefill_secs,
            decode_secs: self.t1.map_or(0.0, |t| t.elapsed().as_secs_f64()),
            stop,
            cached_tokens: 0,
            prefix_cache_tokens: 0,
            context_dropped: self.context_dropped,
            tool_calls: Vec::new(),
            constraint: it.sampler.guide().map(|g| g.stats),
            logprobs: std::mem::take(&mut self.logprobs),
            speculation: it.spec.is_some().then_some(self.spec_stats),
            batched_steps: self.batched_steps,
        })
    }
}

/// Finds stop strings in streamed text, across piece boundaries: text that could still be the start of a
/// stop string is held back until it is known not to be one.
struct StopStrings {
    stops: Vec<String>,
    held: String,
}

impl StopStrings {
    fn new(stops: Vec<String>) -> Self {
        let held = String::with_capacity(stops.iter().map(|s| 2 * s.len()).max().unwrap_or(0));
        StopStrings { stops, held }
    }

    /// Adds `piece`; appends to `out` the text that can be shown now. True when a stop string was reached
    /// (`out` then ends just before it; the rest is dropped).
    fn push(&mut self, piece: &str, out: &mut String) -> bool {
        if self.stops.is_empty() {
            out.push_str(piece);
            return false;
        }
        self.held.push_str(piece);
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            out.push_str(&self.held[..at]);
            self.held.clear();
            return true;
        }
        // Keep the longest tail of the held text that is a proper prefix of some stop string.
        let keep_from = (0..self.held.len())
            .filter(|&i| self.held.is_char_boundary(i))
            .find(|&i| self.stops.iter().any(|s| s.starts_with(&self.held[i..])))
            .unwrap_or(self.held.len());
        out.push_str(&self.held[..keep_from]);
        self.held.drain(..keep_from);
        false
    }

    /// The text still held back (generation ended without reaching a stop string).
    fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Loading parses the tokenizer and the model's metadata through many short-lived allocations; glibc keeps the
/// pages they freed inside its heap (resident, counted against the app) unless asked to hand them back.
fn release_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only returns free memory of the allocator to the OS; no live allocation is touched.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::StopStrings;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopStrings::new(stops);
        let mut shown = String::new();
        for p in pieces {
            let mut out = String::new();
            let hit = m.push(p, &mut out);
            shown.push_str(&out);
            if hit {
                return (shown, true);
            }
        }
        shown.push_str(&m.finish());
        (shown, false)
    }

    #[test]
    fn stop_strings_across_pieces() {
        assert_eq!(run(&["END"], &["the E", "N", "D and more"]), ("the ".into(), true));
        assert_eq!(run(&["END"], &["the E", "Nx"]), ("the ENx".into(), false));
        assert_eq!(run(&["\n\n", "ab"], &["x\n", "a", "b"]), ("x\n".into(), true));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        // Multi-byte text is held and released on char boundaries.
        assert_eq!(run(&["é!"], &["caf", "é", "?"]), ("café?".into(), false));
        assert_eq!(run(&["é!"], &["caf", "é", "!"]), ("caf".into(), true));
    }
}
