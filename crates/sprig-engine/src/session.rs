//! A conversation with a model: one KV cache that carries over between calls. Sessions of one [`Engine`]
//! share its weights. Chat turns reuse the cached prefix when the new rendered conversation extends it.

use std::sync::Arc;

use sprig_backend::Backend;
use sprig_models::State;

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

use crate::chat::ChatMessage;
use crate::generate::{Engine, GenerationStats, StopReason};
use crate::sampler::{Sampler, SamplingParams};
use crate::session_file::{self, Header};
use crate::{EngineError, Result};

pub struct Session<B: Backend> {
    pub engine: Arc<Engine<B>>,
    pub state: State<B>,
    /// Tokens whose K/V the state holds, in order (`cached.len() == state.pos`).
    cached: Vec<u32>,
    max_context: usize,
    /// The session's random stream, the seed it started from and the words drawn from it: it carries on from
    /// request to request (a second turn with the same seed does not replay the first one's draws) until a
    /// request gives another seed.
    rng: Option<Stream>,
    /// The conversation of the last chat call, its reply appended (saved with the session).
    messages: Vec<ChatMessage>,
}

struct Stream {
    seed: u64,
    rng: StdRng,
    draws: u64,
}

impl<B: Backend> Session<B> {
    /// `max_context = 0`: the model's trained context. Fails when its KV cache cannot be allocated.
    pub fn new(engine: Arc<Engine<B>>, max_context: usize) -> Result<Self> {
        let state = engine.model.new_state(max_context)?;
        Ok(Session { engine, state, cached: Vec::new(), max_context, rng: None, messages: Vec::new() })
    }

    /// Forgets the conversation.
    pub fn reset(&mut self) -> Result<()> {
        self.cached.clear();
        self.rng = None;
        self.messages.clear();
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
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<GenerationStats> {
        params.validate()?;
        let tokens = self.engine.chat_tokens(messages)?;
        let n = self.cached.len();
        let reuse = n < tokens.len() && tokens[..n] == self.cached[..];
        if !reuse {
            self.reset()?;
        }
        let start = self.cached.len();
        let mut reply = String::new();
        let stats = self.run(&tokens[start..], params, max_new, |t| {
            reply.push_str(t);
            on_text(t)
        })?;
        self.messages = messages.to_vec();
        if stats.prompt_tokens == tokens.len() - start && stats.stop != StopReason::Cancelled {
            self.messages.push(ChatMessage::new("assistant", reply.trim()));
        }
        Ok(stats)
    }

    /// The conversation of the last chat call with its reply (restored with a saved session), to continue it.
    pub fn messages(&self) -> &[ChatMessage] {
        &self.messages
    }

    /// Saves the session (KV cache, tokens, chat messages, random stream) to `path`, replacing it atomically.
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        let layout = self.engine.model.kv_layout(self.state.max_context);
        let pos = self.state.pos;
        let header = Header {
            model: self.engine.fingerprint().to_string(),
            kv_dim: layout.kv_dim,
            windows: layout.windows.clone(),
            tokens: pos,
            first: (0..layout.windows.len()).map(|l| pos.saturating_sub(layout.layer_capacity(l))).collect(),
            kv_dtype: "f32".into(),
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
        if h.kv_dim != layout.kv_dim || h.windows != layout.windows || h.kv_dtype != "f32" {
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
        let (rng, drawn) = session_rng(self.rng.take(), params.seed);
        let mut sampler = Sampler::with_rng(params.clone(), rng)?;
        // The penalties' window starts with the conversation so far.
        let held = self.cached.len();
        self.cached[held.saturating_sub(params.penalty_last_n)..].iter().for_each(|&t| sampler.accept(t));
        let stats = self.engine.generate(&mut self.state, new, max_new, &mut sampler, false, on_text);
        let draws = drawn + sampler.draws();
        self.rng = Some(Stream { seed: params.seed, rng: sampler.into_rng(), draws });
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
