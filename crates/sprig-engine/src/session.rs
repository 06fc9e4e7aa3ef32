//! A conversation with a model: one KV cache that carries over between calls. Sessions of one [`Engine`]
//! share its weights. Chat turns reuse the cached prefix when the new rendered conversation extends it.

use std::sync::Arc;

use sprig_backend::Backend;
use sprig_models::State;

use crate::chat::ChatMessage;
use crate::generate::{Engine, GenerationStats};
use crate::sampler::{Sampler, SamplingParams};
use crate::{EngineError, Result};

pub struct Session<B: Backend> {
    pub engine: Arc<Engine<B>>,
    pub state: State<B>,
    /// Tokens whose K/V the state holds, in order (`cached.len() == state.pos`).
    cached: Vec<u32>,
    max_context: usize,
}

impl<B: Backend> Session<B> {
    /// `max_context = 0`: the model's trained context. Fails when its KV cache cannot be allocated.
    pub fn new(engine: Arc<Engine<B>>, max_context: usize) -> Result<Self> {
        let state = engine.model.new_state(max_context)?;
        Ok(Session { engine, state, cached: Vec::new(), max_context })
    }

    /// Forgets the conversation.
    pub fn reset(&mut self) -> Result<()> {
        self.cached.clear();
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
        let mut sampler = Sampler::new(params.clone())?;
        let tok = &self.engine.tokenizer;
        let tokens = tok.encode_parts(&[(text, parse_special)], self.state.pos == 0 && tok.special().add_bos)?;
        self.run(&tokens, &mut sampler, max_new, on_text)
    }

    /// Renders the whole conversation with the model's chat template and answers its last turn. When the
    /// rendered prompt extends what the cache holds (the previous turns and reply), only the new part is run.
    pub fn chat(
        &mut self,
        messages: &[ChatMessage],
        params: &SamplingParams,
        max_new: usize,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<GenerationStats> {
        let mut sampler = Sampler::new(params.clone())?;
        let tokens = self.engine.chat_tokens(messages)?;
        let n = self.cached.len();
        let reuse = n < tokens.len() && tokens[..n] == self.cached[..];
        if !reuse {
            self.reset()?;
        }
        let start = self.cached.len();
        self.run(&tokens[start..], &mut sampler, max_new, on_text)
    }

    /// Runs `new` tokens after the cached ones and generates.
    fn run(
        &mut self,
        new: &[u32],
        sampler: &mut Sampler,
        max_new: usize,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<GenerationStats> {
        let stats = self.engine.generate(&mut self.state, new, max_new, sampler, false, on_text);
        match &stats {
            Ok(s) => {
                // The cache holds the prompt and the generated tokens fed back (the last one may be unfed).
                self.cached.extend_from_slice(new);
                self.cached.extend(&s.generated);
                self.cached.truncate(self.state.pos);
            }
            // Refused before anything ran (empty, or longer than the context left): the cache is as it was.
            Err(e) if e.is_context_overflow() || matches!(e, EngineError::EmptyPrompt) => {}
            // A failed forward pass leaves the cache in an unknown state: start over next time.
            Err(_) => self.reset()?,
        }
        stats
    }
}
