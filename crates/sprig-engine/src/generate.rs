//! Prefill + decode loop with streaming output.

use std::sync::Arc;
use std::time::Instant;

use sprig_backend::Backend;
use sprig_format::ModelFile;
use sprig_models::{Logits, Model, State};
use sprig_tokenizer::{StreamDecoder, Tokenizer};

use crate::chat::{ChatMessage, ChatTemplate};
use crate::sampler::Sampler;
use crate::{EngineError, Result};

/// Longest prompt slice run through the model in one batched forward pass.
pub const PREFILL_CHUNK: usize = 512;

/// A model with its tokenizer and chat template.
pub struct Engine<B: Backend> {
    pub model: Model<B>,
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced a stop token (EOS / end of turn).
    StopToken,
    /// `max_new` tokens were generated.
    Length,
    /// The callback asked to stop.
    Cancelled,
    /// The context is full.
    ContextFull,
}

#[derive(Clone, Debug)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated: Vec<u32>,
    pub prefill_secs: f64,
    pub decode_secs: f64,
    pub stop: StopReason,
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
        let tokenizer = Tokenizer::from_json(&file.tokenizer_json)?;
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
        Ok(Engine { model, tokenizer, template })
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
        let t = self
            .template
            .as_ref()
            .ok_or(EngineError::NoChatTemplate)?;
        t.tokens(&self.tokenizer, messages)
    }

    /// Runs `prompt` from `state.pos`, then samples up to `max_new` tokens. `on_text` receives the decoded
    /// prompt (when `echo_prompt`) and each completed piece of generated text; returning false stops.
    pub fn generate(
        &self,
        state: &mut State<B>,
        prompt: &[u32],
        max_new: usize,
        sampler: &mut Sampler,
        echo_prompt: bool,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<GenerationStats> {
        // Checked once, here, before anything runs: a prompt that cannot fit leaves the state untouched.
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if state.pos + prompt.len() > state.max_context {
            return Err(sprig_models::ModelError::ContextOverflow {
                pos: state.pos,
                new: prompt.len(),
                ctx: state.max_context,
            }
            .into());
        }
        let mut dec = StreamDecoder::new(&self.tokenizer);
        let bos = self.tokenizer.bos();
        let mut cancelled = false;
        // One text buffer for every piece: decode allocates nothing per token once it has grown.
        let mut piece = String::with_capacity(self.tokenizer.max_piece_bytes());
        for &t in prompt {
            piece.clear();
            dec.push_into(t, &mut piece)?;
            if echo_prompt && Some(t) != bos && !piece.is_empty() && !cancelled {
                cancelled = !on_text(&piece);
            }
        }
        let t0 = Instant::now();
        for chunk in prompt.chunks(PREFILL_CHUNK) {
            self.model.forward(state, chunk, Logits::Last)?;
        }
        let prefill_secs = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let mut logits = Vec::new();
        let mut generated = Vec::with_capacity(max_new.min(state.max_context.saturating_sub(state.pos) + 1));
        let mut stop = StopReason::Length;
        if cancelled {
            stop = StopReason::Cancelled;
        }
        while !cancelled && generated.len() < max_new {
            self.model.read_logits(state, &mut logits)?;
            let next = sampler.sample(&logits);
            if self.tokenizer.is_stop(next) {
                stop = StopReason::StopToken;
                break;
            }
            generated.push(next);
            piece.clear();
            dec.push_into(next, &mut piece)?;
            if !piece.is_empty() && !on_text(&piece) {
                stop = StopReason::Cancelled;
                break;
            }
            if generated.len() == max_new {
                break;
            }
            if state.pos >= state.max_context {
                stop = StopReason::ContextFull;
                break;
            }
            self.model.forward(state, &[next], Logits::Last)?;
        }
        let tail = dec.finish();
        if !tail.is_empty() {
            on_text(&tail);
        }
        Ok(GenerationStats {
            prompt_tokens: prompt.len(),
            generated,
            prefill_secs,
            decode_secs: t1.elapsed().as_secs_f64(),
            stop,
        })
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
