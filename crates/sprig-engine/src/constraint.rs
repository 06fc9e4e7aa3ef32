//! Constrained decoding: the output must match a JSON Schema, a regular expression or a Lark grammar, enforced
//! token by token with llguidance. The engine's tokenizer is handed to llguidance once (a trie of every token's
//! bytes, control tokens marked as special) and each request compiles its constraint into a [`Guide`], which the
//! sampler consults after its other logit processing (see [`crate::sampler`]).

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use sprig_tokenizer::Tokenizer;

use crate::{EngineError, Result};

/// What the generated text must be.
#[derive(Clone, Debug, PartialEq)]
pub enum Constraint {
    /// An instance of this JSON Schema (its JSON text).
    JsonSchema(String),
    /// A match of this regular expression (the whole output).
    Regex(String),
    /// A sentence of this grammar, in llguidance's Lark dialect (`%json {…}` embeds a schema).
    Lark(String),
    /// Any JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    JsonObject,
}

impl Constraint {
    /// The name surfaces use for this kind of constraint.
    pub fn kind(&self) -> &'static str {
        match self {
            Constraint::JsonSchema(_) => "json_schema",
            Constraint::Regex(_) => "regex",
            Constraint::Lark(_) => "grammar",
            Constraint::JsonObject => "json_object",
        }
    }

    fn grammar(&self) -> Result<TopLevelGrammar> {
        Ok(match self {
            Constraint::JsonSchema(text) => {
                let schema: serde_json::Value = serde_json::from_str(text)
                    .map_err(|e| bad(self, format!("the schema is not valid JSON: {e}")))?;
                if !(schema.is_object() || schema.is_boolean()) {
                    return Err(bad(self, "a schema is a JSON object (or true/false)".into()));
                }
                TopLevelGrammar::from_json_schema(with_layout(schema))
            }
            Constraint::Regex(r) => TopLevelGrammar::from_regex(r),
            Constraint::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
            Constraint::JsonObject => TopLevelGrammar::from_json_schema(with_layout(serde_json::json!({"type": "object"}))),
        })
    }
}

/// The JSON layout a constrained output uses unless the schema says (`x-guidance`): one line, `", "` between
/// items and `": "` after keys (as Python's `json.dumps`, which models saw most). Fixed separators, not free
/// whitespace: a small model cannot wander into whitespace until its token budget runs out, and the
/// separators are forced tokens, fed without sampling.
pub fn with_layout(mut schema: serde_json::Value) -> serde_json::Value {
    if let Some(o) = schema.as_object_mut() {
        o.entry("x-guidance").or_insert_with(|| {
            serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
        });
    }
    schema
}

fn bad(c: &Constraint, detail: String) -> EngineError {
    EngineError::Constraint { kind: c.kind(), detail }
}

/// Longest constraint text accepted (a schema, a regex, a grammar): larger ones are an error before compiling.
pub const MAX_CONSTRAINT_BYTES: usize = 1 << 20;

/// sprig's tokenizer seen by llguidance: every token's bytes, control tokens as `\xFF` + their text.
struct TokenizerView {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for TokenizerView {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        // Forced text is tokenized as the model would have written it: the tokenizer's own segmentation,
        // continuing a sequence (no BOS, no space prefix). Bytes that are not UTF-8 go greedily by the trie.
        match std::str::from_utf8(s).ok().and_then(|t| self.tokenizer.encode_continuation(t).ok()) {
            Some(ids) => ids,
            None => self.trie.greedy_tokenize(s),
        }
    }
}

/// Compiles constraints for one model: built once per engine (the trie of a 151k vocabulary takes ~0.1 s).
pub struct Grammars {
    factory: ParserFactory,
}

impl Grammars {
    /// `vocab` is the model's vocabulary (the logits' length; ids past the tokenizer's are never allowed).
    pub fn new(tokenizer: Arc<Tokenizer>, vocab: usize) -> Result<Self> {
        let unusable = |detail: String| EngineError::Constraint { kind: "tokenizer", detail };
        let sp = tokenizer.special();
        let mut ends: Vec<u32> = sp.stop.iter().chain(&sp.eos).copied().filter(|&t| (t as usize) < vocab).collect();
        ends.sort_unstable();
        ends.dedup();
        if ends.is_empty() {
            return Err(unusable("the model has no end-of-sequence token: a constrained output could not end".into()));
        }
        let words: Vec<Vec<u8>> = (0..vocab as u32)
            .map(|id| match tokenizer.token_bytes(id) {
                Ok(b) if !b.is_empty() => b.to_vec(),
                Ok(_) => match tokenizer.token_text(id) {
                    Some(text) if !text.is_empty() => {
                        let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                        w.extend_from_slice(text.as_bytes());
                        w
                    }
                    _ => Vec::new(),
                },
                // Past the tokenizer's vocabulary (padding rows of the embedding): never produced.
                Err(_) => Vec::new(),
            })
            .collect();
        let info = TokRxInfo::new(vocab as u32, ends[0]);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&ends);
        let env: llguidance::toktrie::TokEnv = Arc::new(TokenizerView { trie, tokenizer });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| unusable(e.to_string()))?;
        // Errors come back as values; nothing is printed.
        factory.set_stderr_log_level(0);
        Ok(Grammars { factory })
    }

    /// A fresh guide for one generation; an invalid or unsupported constraint is an error here, before any
    /// token is generated.
    pub fn guide(&self, c: &Constraint) -> Result<Guide> {
        let len = match c {
            Constraint::JsonSchema(s) | Constraint::Regex(s) | Constraint::Lark(s) => s.len(),
            Constraint::JsonObject => 0,
        };
        if len > MAX_CONSTRAINT_BYTES {
            return Err(bad(c, format!("{len} bytes (at most {MAX_CONSTRAINT_BYTES})")));
        }
        let parser = self.factory.create_parser(c.grammar()?).map_err(|e| bad(c, e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(bad(c, e));
        }
        Ok(Guide { matcher, kind: c.kind(), masks: 0, forced_tokens: 0, secs: 0.0 })
    }
}

/// One generation's constraint state: which tokens may come next, advanced by each token generated.
pub struct Guide {
    matcher: Matcher,
    kind: &'static str,
    /// Full token masks computed (each for a sampled token the constraint rejected).
    pub masks: u64,
    /// Tokens the constraint forced (fed without sampling).
    pub forced_tokens: u64,
    /// Time spent checking, masking, advancing and forcing: the constraint's cost.
    pub secs: f64,
}

impl Guide {
    fn failed(&self, e: impl std::fmt::Display) -> EngineError {
        EngineError::Constraint { kind: self.kind, detail: format!("while generating: {e}") }
    }

    /// May `token` come next?
    pub fn allows(&mut self, token: u32) -> Result<bool> {
        let t0 = std::time::Instant::now();
        let n = self.matcher.validate_tokens(&[token]).map_err(|e| self.failed(e));
        self.secs += t0.elapsed().as_secs_f64();
        Ok(n? == 1)
    }

    /// Every token that may come next.
    pub fn mask(&mut self) -> Result<SimpleVob> {
        self.masks += 1;
        let t0 = std::time::Instant::now();
        let m = self.matcher.compute_mask().map_err(|e| self.failed(e));
        self.secs += t0.elapsed().as_secs_f64();
        let m = m?;
        if m.is_zero() {
            return Err(self.failed("no token can continue the output"));
        }
        Ok(m)
    }

    /// Advances past `token` (generated, so allowed).
    pub fn commit(&mut self, token: u32) -> Result<()> {
        let t0 = std::time::Instant::now();
        let r = self.matcher.consume_token(token).map_err(|e| self.failed(e));
        self.secs += t0.elapsed().as_secs_f64();
        r
    }

    /// Tokens the constraint forces next (at most `max`), already committed: they are fed without sampling.
    pub fn forced(&mut self, max: usize, out: &mut Vec<u32>) -> Result<()> {
        if max == 0 || self.matcher.is_stopped() {
            return Ok(());
        }
        let t0 = std::time::Instant::now();
        let mut ff = self.matcher.compute_ff_tokens();
        let r = match self.matcher.get_error() {
            Some(e) => Err(self.failed(e)),
            None => {
                ff.truncate(max);
                self.matcher.consume_tokens(&ff).map_err(|e| self.failed(e))
            }
        };
        self.secs += t0.elapsed().as_secs_f64();
        r?;
        self.forced_tokens += ff.len() as u64;
        out.extend_from_slice(&ff);
        Ok(())
    }

    /// The output is complete: nothing but the end of the sequence may follow.
    pub fn finished(&self) -> bool {
        self.matcher.is_stopped() && !self.matcher.is_error()
    }

    /// The output so far is a complete instance (it may end here).
    pub fn satisfied(&mut self) -> bool {
        self.matcher.is_stopped() || self.matcher.is_accepting().unwrap_or(false)
    }
}
