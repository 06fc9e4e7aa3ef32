//! A conversation with a model: one KV cache that carries over between calls. Sessions of one [`Engine`]
//! share its weights. Chat turns reuse the cached prefix when the new rendered conversation extends it.

use std::sync::Arc;

use sprig_backend::Backend;
use sprig_models::State;

use crate::chat::ChatMessage;
use crate::generate::{Engine, GenerationStats};
use crate::sampler::{Sampler, SamplingParams};
use rand::rngs::StdRng;
use rand::SeedableRng;
use crate::{EngineError, Result};

pub struct Session<B: Backend> {
    pub engine: Arc<Engine<B>>,
    pub state: State<B>,
    /// Tokens whose K/V the state holds, in order (`cached.len() == state.pos`).
    cached: Vec<u32>,
    max_context: usize,
    /// The session's random stream and the seed it started from: it carries on from request to request (a
    /// second turn with the same seed does not replay the first one's draws) until a request gives another seed.
    rng: Option<(u64, StdRng)>,
}

impl<B: Backend> Session<B> {
    /// `max_context = 0`: the model's trained context. Fails when its KV cache cannot be allocated.
    pub fn new(engine: Arc<Engine<B>>, max_context: usize) -> Result<Self> {
        let state = engine.model.new_state(max_context)?;
        Ok(Session { engine, state, cached: Vec::new(), max_context, rng: None })
    }

    /// Forgets the conversation.
    pub fn reset(&mut self) -> Result<()> {
        self.cached.clear();
        self.rng = None;
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
        let tok = &self.engine.tokenizer;
        let tokens = tok.encode_parts(&[(text, parse_special)], self.state.pos == 0 && tok.special().add_bos)?;
        self.run(&tokens, params, max_new, on_text)
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
        params.validate()?;
        let tokens = self.engine.chat_tokens(messages)?;
        let n = self.cached.len();
        let reuse = n < tokens.len() && tokens[..n] == self.cached[..];
        if !reuse {
            self.reset()?;
        }
        let start = self.cached.len();
        self.run(&tokens[start..], params, max_new, on_text)
    }

    /// Tokens the session's KV cache holds, in order.
    pub fn tokens(&self) -> &[u32] {
        &self.cached
    }

    /// Runs `new` tokens after the cached ones and generates. Afterwards the cache holds exactly what was run
    /// (a cancelled prefill included), so the next call continues from there.
    fn run(
        &mut self,
        new: &[u32],
        params: &SamplingParams,
        max_new: usize,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<GenerationStats> {
        let rng = session_rng(self.rng.take(), params.seed);
        let mut sampler = Sampler::with_rng(params.clone(), rng)?;
        // The penalties' window starts with the conversation so far.
        let held = self.cached.len();
        self.cached[held.saturating_sub(params.penalty_last_n)..].iter().for_each(|&t| sampler.accept(t));
        let stats = self.engine.generate(&mut self.state, new, max_new, &mut sampler, false, on_text);
        self.rng = Some((params.seed, sampler.into_rng()));
        match &stats {
            Ok(s) => {
                // The prompt tokens run and the generated tokens fed back (the last one may be unfed).
                self.cached.extend_from_slice(&new[..s.prompt_tokens]);
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

/// The stream a request draws from: the session's, carried on, unless the request gives another seed.
fn session_rng(stored: Option<(u64, StdRng)>, seed: u64) -> StdRng {
    match stored {
        Some((s, rng)) if s == seed => rng,
        _ => StdRng::seed_from_u64(seed),
    }
}

#[cfg(test)]
mod tests {
    use rand::Rng;

    use super::*;

    #[test]
    fn the_random_stream_carries_on_across_requests() {
        let mut first = session_rng(None, 9);
        let a: Vec<u32> = (0..4).map(|_| first.gen()).collect();
        // The next request with the same seed continues the stream instead of replaying it...
        let mut second = session_rng(Some((9, first)), 9);
        let b: Vec<u32> = (0..4).map(|_| second.gen()).collect();
        assert_ne!(a, b);
        let mut both = StdRng::seed_from_u64(9);
        let ab: Vec<u32> = (0..8).map(|_| both.gen()).collect();
        assert_eq!(ab, [a.clone(), b].concat());
        // ...and another seed starts a fresh one.
        let mut other = session_rng(Some((9, second)), 9 + 1);
        let mut fresh = StdRng::seed_from_u64(10);
        assert_eq!(other.gen::<u64>(), fresh.gen::<u64>());
    }
}
