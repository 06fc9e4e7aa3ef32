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
    /// The model's fingerprint (saved sessions name it), computed on first use.
    fingerprint: std::sync::OnceLock<String>,
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
    /// The generated text reached one of the request's stop strings.
    StopString,
}

#[derive(Clone, Debug)]
pub struct GenerationStats {
    /// Prompt tokens run into the state (fewer than given when the request was cancelled during prefill).
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
        Ok(Engine { model, tokenizer, template, fingerprint: Default::default() })
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
        let t = self
            .template
            .as_ref()
            .ok_or(EngineError::NoChatTemplate)?;
        t.tokens(&self.tokenizer, messages)
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
        // The decoder sees the prompt either way: the generated text continues it (no leading space dropped as
        // if it started the output).
        for &t in prompt {
            piece.clear();
            dec.push_into(t, &mut piece)?;
            if echo_prompt && Some(t) != bos && !piece.is_empty() && !cancelled {
                cancelled = !on_text(&piece);
            }
        }
        let t0 = Instant::now();
        let mut processed = 0;
        for chunk in prompt.chunks(PREFILL_CHUNK) {
            if cancelled || !on_text("") {
                cancelled = true;
                break;
            }
            self.model.forward(state, chunk, Logits::Last)?;
            chunk.iter().for_each(|&t| sampler.accept(t));
            processed += chunk.len();
        }
        let prefill_secs = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let mut logits = Vec::new();
        let mut generated = Vec::with_capacity(max_new.min(state.max_context.saturating_sub(state.pos) + 1));
        let mut stop = if cancelled { StopReason::Cancelled } else { StopReason::Length };
        let stop_strings = sampler.params().stop.clone();
        let mut stops = StopStrings::new(&stop_strings);
        let mut shown = String::with_capacity(piece.capacity());
        while !cancelled && generated.len() < max_new {
            self.model.read_logits(state, &mut logits)?;
            let next = sampler.sample(&logits)?;
            if self.tokenizer.is_stop(next) {
                stop = StopReason::StopToken;
                break;
            }
            generated.push(next);
            piece.clear();
            dec.push_into(next, &mut piece)?;
            shown.clear();
            let hit = stops.push(&piece, &mut shown);
            if !on_text(&shown) {
                stop = StopReason::Cancelled;
                break;
            }
            if hit {
                stop = StopReason::StopString;
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
            sampler.accept(next);
        }
        if stop != StopReason::StopString && stop != StopReason::Cancelled {
            // What was held back as a possible stop string's start, and the decoder's last bytes.
            let mut tail = stops.finish();
            tail.push_str(&dec.finish());
            if !tail.is_empty() {
                on_text(&tail);
            }
        }
        Ok(GenerationStats {
            prompt_tokens: processed,
            generated,
            prefill_secs,
            decode_secs: t1.elapsed().as_secs_f64(),
            stop,
        })
    }
}

/// Finds stop strings in streamed text, across piece boundaries: text that could still be the start of a
/// stop string is held back until it is known not to be one.
struct StopStrings<'a> {
    stops: &'a [String],
    held: String,
}

impl<'a> StopStrings<'a> {
    fn new(stops: &'a [String]) -> Self {
        StopStrings { stops, held: String::with_capacity(stops.iter().map(|s| 2 * s.len()).max().unwrap_or(0)) }
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

#[cfg(test)]
mod tests {
    use super::StopStrings;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopStrings::new(&stops);
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

/// Loading parses the tokenizer and the model's metadata through many short-lived allocations; glibc keeps the
/// pages they freed inside its heap (resident, counted against the app) unless asked to hand them back.
fn release_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only returns free memory of the allocator to the OS; no live allocation is touched.
    unsafe {
        libc::malloc_trim(0);
    }
}
