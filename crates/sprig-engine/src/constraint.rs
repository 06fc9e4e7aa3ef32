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
    pub fn guide(&self, c: &Constraint, ahead: bool) -> Result<Guide> {
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
        Ok(Guide::new(matcher, c.kind(), ahead))
    }
}

/// What a request's constraint did and cost.
#[derive(Clone, Copy, Debug, Default)]
pub struct ConstraintStats {
    /// Of the generated tokens, those the constraint forced (fed without sampling, several per forward pass).
    pub forced_tokens: u64,
    /// Sampled tokens the constraint rejected (each needs a full mask and a second pass of the sampler).
    pub rejected: u64,
    /// Full masks computed: for rejected tokens, or ahead of the sampler while the forward pass ran.
    pub masks: u64,
    /// Of `masks`, those computed ahead (when recent tokens were often rejected; some go unused).
    pub masks_ahead: u64,
    /// Time the generation spent in the constraint: checking, masking, advancing, forcing, waiting for a mask
    /// computed ahead.
    pub secs: f64,
    /// Time a helper thread spent computing masks ahead, beside the forward pass.
    pub ahead_secs: f64,
}

/// One generation's constraint state: which tokens may come next, advanced by each token generated.
///
/// The sampler first checks the token it drew without the constraint and builds the full mask only when that
/// token is rejected (the fast path: a check costs microseconds, a mask over 151k tokens far more). When
/// rejections are frequent, the next mask is computed on a helper thread while the forward pass runs
/// ([`Guide::prefetch`]), so it is ready when the sampler needs it.
pub struct Guide {
    matcher: Slot,
    kind: &'static str,
    /// Masks may be computed ahead.
    ahead: bool,
    /// The next position's mask, computed ahead (consumed or dropped by the next check, commit or mask).
    ready: Option<SimpleVob>,
    /// Recent share of sampled tokens the constraint rejected (an exponential average): prefetch when high.
    rejecting: f32,
    helper: Option<Helper>,
    /// What it did and cost so far.
    pub stats: ConstraintStats,
}

/// Where the matcher is: here, or on the helper thread computing the next mask.
enum Slot {
    Here(Box<Matcher>),
    Away,
    /// The helper thread is gone (a panic in llguidance): the generation fails with an error.
    Lost,
}

/// A thread that computes masks ahead: it receives the matcher and sends it back with the mask.
struct Helper {
    to: std::sync::mpsc::Sender<Box<Matcher>>,
    from: std::sync::mpsc::Receiver<(Box<Matcher>, std::result::Result<SimpleVob, String>, f64)>,
}

impl Helper {
    fn spawn() -> std::io::Result<Helper> {
        let (to, jobs) = std::sync::mpsc::channel::<Box<Matcher>>();
        let (done, from) = std::sync::mpsc::channel();
        std::thread::Builder::new().name("sprig-mask".into()).spawn(move || {
            // Ends when the guide (the sender) is dropped.
            for mut m in jobs {
                let t0 = std::time::Instant::now();
                let mask = m.compute_mask().map_err(|e| e.to_string());
                if done.send((m, mask, t0.elapsed().as_secs_f64())).is_err() {
                    break;
                }
            }
        })?;
        Ok(Helper { to, from })
    }
}

/// Prefetch once this share of recent sampled tokens was rejected (each rejection needs the mask anyway).
const PREFETCH_ABOVE: f32 = 0.25;

impl Guide {
    fn new(matcher: Matcher, kind: &'static str, ahead: bool) -> Guide {
        Guide {
            matcher: Slot::Here(Box::new(matcher)),
            kind,
            ahead,
            ready: None,
            rejecting: 0.0,
            helper: None,
            stats: ConstraintStats::default(),
        }
    }

    fn failed(&self, e: impl std::fmt::Display) -> EngineError {
        EngineError::Constraint { kind: self.kind, detail: format!("while generating: {e}") }
    }

    /// The matcher, back from the helper thread if it is computing a mask (which then waits in `ready`).
    fn matcher(&mut self) -> Result<&mut Matcher> {
        if let Slot::Away = self.matcher {
            let t0 = std::time::Instant::now();
            let back = self.helper.as_ref().and_then(|h| h.from.recv().ok());
            self.stats.secs += t0.elapsed().as_secs_f64();
            self.matcher = match back {
                Some((m, mask, secs)) => {
                    self.stats.ahead_secs += secs;
                    // A failed mask is left for the sampler's own `mask` call to report.
                    self.ready = mask.ok();
                    Slot::Here(m)
                }
                None => Slot::Lost,
            };
        }
        match &mut self.matcher {
            Slot::Here(m) => Ok(m),
            _ => Err(EngineError::Constraint { kind: self.kind, detail: "while generating: the mask thread failed".into() }),
        }
    }

    /// Starts computing the next position's mask on the helper thread, when recent tokens were often rejected
    /// (the caller runs the forward pass meanwhile). The next check, mask or commit waits for it.
    pub fn prefetch(&mut self) {
        let Slot::Here(m) = &self.matcher else { return };
        if !self.ahead || self.rejecting < PREFETCH_ABOVE || self.ready.is_some() || m.is_stopped() {
            return;
        }
        if self.helper.is_none() {
            // No thread to be had: the mask is computed when needed, as without prefetch.
            self.helper = Helper::spawn().ok();
        }
        let Some(h) = &self.helper else { return };
        let Slot::Here(m) = std::mem::replace(&mut self.matcher, Slot::Away) else { unreachable!() };
        if let Err(std::sync::mpsc::SendError(m)) = h.to.send(m) {
            self.matcher = Slot::Here(m);
            self.helper = None;
            return;
        }
        self.stats.masks += 1;
        self.stats.masks_ahead += 1;
    }

    /// Runs `f` on the matcher (back from the helper thread first), its time counted as the constraint's and
    /// its error as a constraint error.
    fn timed<R>(&mut self, f: impl FnOnce(&mut Matcher) -> std::result::Result<R, String>) -> Result<R> {
        let m = self.matcher()?;
        let t0 = std::time::Instant::now();
        let r = f(m);
        self.stats.secs += t0.elapsed().as_secs_f64();
        r.map_err(|e| self.failed(e))
    }

    /// May `token` come next?
    pub fn allows(&mut self, token: u32) -> Result<bool> {
        self.matcher()?;
        let ok = if let Some(mask) = &self.ready {
            mask.is_allowed(token)
        } else {
            self.timed(|m| m.validate_tokens(&[token]).map_err(|e| e.to_string()))? == 1
        };
        self.rejecting = 0.8 * self.rejecting + if ok { 0.0 } else { 0.2 };
        self.stats.rejected += u64::from(!ok);
        Ok(ok)
    }

    /// How many of `drafts` are worth verifying from here: those the constraint accepts in a row, up to (not
    /// including) the first after which it would force tokens or end — plain decoding feeds forced tokens
    /// without sampling, so drafts past that point would not be the tokens it produces. Leaves the constraint
    /// where it was.
    pub fn draftable(&mut self, drafts: &[u32]) -> Result<usize> {
        self.timed(|m| {
            let (mut consumed, mut n, mut err) = (0, 0, None);
            for &t in drafts {
                match m.validate_tokens(&[t]) {
                    Ok(1) => {}
                    Ok(_) => break,
                    Err(e) => {
                        err = Some(e.to_string());
                        break;
                    }
                }
                if let Err(e) = m.consume_token(t) {
                    err = Some(e.to_string());
                    break;
                }
                consumed += 1;
                if m.is_stopped() || !m.compute_ff_tokens().is_empty() {
                    break;
                }
                n += 1;
            }
            if let Err(e) = m.rollback(consumed) {
                err.get_or_insert(e.to_string());
            }
            err.map_or(Ok(n), Err)
        })
    }

    /// Every token that may come next.
    pub fn mask(&mut self) -> Result<SimpleVob> {
        self.matcher()?;
        let m = match self.ready.take() {
            Some(m) => m,
            None => {
                self.stats.masks += 1;
                self.timed(|m| m.compute_mask().map_err(|e| e.to_string()))?
            }
        };
        if m.is_zero() {
            return Err(self.failed("no token can continue the output"));
        }
        Ok(m)
    }

    /// Advances past `token` (generated, so allowed).
    pub fn commit(&mut self, token: u32) -> Result<()> {
        self.matcher()?;
        self.ready = None;
        self.timed(|m| m.consume_token(token).map_err(|e| e.to_string()))
    }

    /// Tokens the constraint forces next (at most `max`), already committed: they are fed without sampling.
    pub fn forced(&mut self, max: usize, out: &mut Vec<u32>) -> Result<()> {
        if max == 0 || self.matcher()?.is_stopped() {
            return Ok(());
        }
        let ff = self.timed(|m| {
            let mut ff = m.compute_ff_tokens();
            if let Some(e) = m.get_error() {
                return Err(e);
            }
            ff.truncate(max);
            m.consume_tokens(&ff).map_err(|e| e.to_string())?;
            Ok(ff)
        })?;
        if !ff.is_empty() {
            self.ready = None;
        }
        self.stats.forced_tokens += ff.len() as u64;
        out.extend_from_slice(&ff);
        Ok(())
    }

    /// The output is complete: nothing but the end of the sequence may follow.
    pub fn finished(&mut self) -> bool {
        self.matcher().is_ok_and(|m| m.is_stopped() && !m.is_error())
    }

    /// The output so far is a complete instance (it may end here).
    pub fn satisfied(&mut self) -> bool {
        self.matcher().is_ok_and(|m| m.is_stopped() || m.is_accepting().unwrap_or(false))
    }
}
