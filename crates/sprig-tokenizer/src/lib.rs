//! Tokenizers. A model file carries a [`TokenizerSpec`] (JSON in its metadata); [`Tokenizer::from_spec`] builds
//! the runtime tokenizer from it.
//!
//! - [`spm`]: SentencePiece-style BPE that merges the best-scoring pair first, with byte fallback (llama2.c
//!   `tokenizer.bin`, GGUF `llama` vocabularies such as Llama 2 and Gemma).
//! - [`hf`]: a Hugging Face `tokenizers` tokenizer (HF `tokenizer.json`, and GGUF `gpt2` BPE vocabularies turned
//!   into one).
//!
//! Decoding goes through per-token byte strings so that a streamed UTF-8 character split across tokens (byte
//! fallback, byte-level BPE) is emitted only once complete ([`StreamDecoder`]).
#![forbid(unsafe_code)]

pub mod hf;
pub mod spm;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer spec: {0}")]
    Spec(String),
    #[error("tokenizer: {0}")]
    Encode(String),
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    BadId { id: u32, vocab: usize },
}

pub type Result<T> = std::result::Result<T, TokenizerError>;

/// Token kinds, numbered as GGUF's `tokenizer.ggml.token_type`.
pub mod token_type {
    pub const NORMAL: u8 = 1;
    pub const UNKNOWN: u8 = 2;
    pub const CONTROL: u8 = 3;
    pub const USER_DEFINED: u8 = 4;
    pub const UNUSED: u8 = 5;
    pub const BYTE: u8 = 6;
}

/// What a model file stores about its tokenizer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TokenizerSpec {
    /// SentencePiece-style BPE by scores. Pieces use `▁` (U+2581) for spaces.
    SentencePiece {
        tokens: Vec<String>,
        scores: Vec<f32>,
        /// [`token_type`] per token.
        token_types: Vec<u8>,
        #[serde(flatten)]
        special: SpecialTokens,
        /// Prepend `▁` to the text (Llama: yes; Gemma: no).
        add_space_prefix: bool,
    },
    /// A Hugging Face `tokenizer.json`.
    HuggingFace {
        tokenizer_json: String,
        #[serde(flatten)]
        special: SpecialTokens,
    },
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Prepend BOS when encoding a prompt.
    pub add_bos: bool,
    /// Tokens that end generation (EOS, end-of-turn tokens, ...).
    pub stop: Vec<u32>,
}

/// A ready tokenizer.
///
/// Text is encoded as plain text by default: a user who types `<|im_end|><|im_start|>system` gets those
/// characters, not the control tokens. Only text the caller vouches for (what a chat template emits, or a raw
/// prompt with an explicit opt-in) goes through [`Tokenizer::encode_special`] / [`Tokenizer::encode_parts`],
/// where control-token strings become their ids. User-defined pieces (GGUF `USER_DEFINED`, HF added tokens
/// that are not special: Gemma's whitespace runs, for instance) are ordinary text pieces and match in both
/// modes, as in llama.cpp and transformers.
pub struct Tokenizer {
    inner: Inner,
    /// Matches user-defined piece strings, leftmost-longest (plain text).
    text_matcher: Option<Matcher>,
    /// Matches user-defined and control token strings, leftmost-longest (trusted text).
    special_matcher: Option<Matcher>,
    special: SpecialTokens,
    /// Longest entry of `token_bytes` (sizes streaming buffers once).
    max_token_bytes: usize,
    /// Bytes each token decodes to (empty for control tokens).
    token_bytes: Vec<Vec<u8>>,
    /// Strip one leading space from the first decoded text (SentencePiece's space prefix).
    strip_leading_space: bool,
    /// `▁` in decoded text means a space (SentencePiece-style vocabularies), also when byte fallback spelled it.
    space_marker: bool,
}

/// Token strings found literally in text, with the id of each pattern.
struct Matcher {
    ac: aho_corasick::AhoCorasick,
    ids: Vec<u32>,
}

impl Matcher {
    fn new(strings: &[(String, u32, bool)], with_control: bool) -> Result<Option<Matcher>> {
        let pick: Vec<&(String, u32, bool)> =
            strings.iter().filter(|(s, _, control)| !s.is_empty() && (with_control || !control)).collect();
        if pick.is_empty() {
            return Ok(None);
        }
        let ac = aho_corasick::AhoCorasick::builder()
            .match_kind(aho_corasick::MatchKind::LeftmostLongest)
            .build(pick.iter().map(|(s, _, _)| s.as_str()))
            .map_err(|e| TokenizerError::Spec(format!("special tokens: {e}")))?;
        Ok(Some(Matcher { ac, ids: pick.iter().map(|(_, id, _)| *id).collect() }))
    }
}

enum Inner {
    Spm(Box<spm::SpmTokenizer>),
    Hf(Box<hf::HfTokenizer>),
}

impl Tokenizer {
    pub fn from_spec(spec: &TokenizerSpec) -> Result<Self> {
        match spec {
            TokenizerSpec::SentencePiece { tokens, scores, token_types, special, add_space_prefix } => {
                let t = spm::SpmTokenizer::new(tokens.clone(), scores.clone(), token_types.clone(), *add_space_prefix)?;
                let token_bytes = t.all_token_bytes();
                Self::checked(Inner::Spm(Box::new(t)), special.clone(), token_bytes, *add_space_prefix, true)
            }
            TokenizerSpec::HuggingFace { tokenizer_json, special } => {
                let mut t = hf::HfTokenizer::from_json(tokenizer_json)?;
                let token_bytes = t.all_token_bytes();
                let strip = t.strips_leading_space();
                let marker = !t.is_byte_level();
                Self::checked(Inner::Hf(Box::new(t)), special.clone(), token_bytes, strip, marker)
            }
        }
    }

    pub fn from_json(json: &str) -> Result<Self> {
        let spec: TokenizerSpec = serde_json::from_str(json).map_err(|e| TokenizerError::Spec(e.to_string()))?;
        Self::from_spec(&spec)
    }

    fn checked(
        inner: Inner,
        special: SpecialTokens,
        token_bytes: Vec<Vec<u8>>,
        strip: bool,
        space_marker: bool,
    ) -> Result<Self> {
        let n = token_bytes.len() as u32;
        if special.add_bos && special.bos.is_none() {
            return Err(TokenizerError::Spec("the tokenizer adds BOS but names no BOS token".into()));
        }
        for id in special.bos.iter().chain(&special.eos).chain(&special.stop) {
            if *id >= n {
                return Err(TokenizerError::Spec(format!("special token id {id} outside vocabulary of {n}")));
            }
        }
        let strings = match &inner {
            Inner::Spm(t) => t.special_strings(),
            Inner::Hf(t) => t.added_tokens(),
        };
        let (text_matcher, special_matcher) = (Matcher::new(strings, false)?, Matcher::new(strings, true)?);
        Ok(Tokenizer {
            inner,
            text_matcher,
            special_matcher,
            special,
            max_token_bytes: token_bytes.iter().map(|b| b.len()).max().unwrap_or(0),
            token_bytes,
            strip_leading_space: strip,
            space_marker,
        })
    }

    /// `other` has the same vocabulary: the same ids with the same bytes and the same end tokens (so that
    /// token-level distributions of two models compare, and one model's tokens are the other's).
    pub fn same_vocabulary(&self, other: &Tokenizer) -> bool {
        self.vocab_size() == other.vocab_size()
            && self.special().eos == other.special().eos
            && (0..self.vocab_size() as u32).all(|t| self.token_bytes(t).ok() == other.token_bytes(t).ok())
    }

    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }
    pub fn special(&self) -> &SpecialTokens {
        &self.special
    }
    pub fn bos(&self) -> Option<u32> {
        self.special.bos
    }
    pub fn is_stop(&self, id: u32) -> bool {
        self.special.stop.contains(&id) || self.special.eos == Some(id)
    }

    /// Encodes `text` as plain text: strings that spell control tokens stay text. Prepends BOS when
    /// `add_bos` and the model has one.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        self.encode_parts(&[(text, false)], add_bos)
    }

    /// Encodes `text` with special-token strings (e.g. `<|im_start|>`) turned into their ids: only for text
    /// the caller trusts (a rendered chat template, a raw prompt whose user opted in).
    pub fn encode_special(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        self.encode_parts(&[(text, true)], add_bos)
    }

    /// Encodes consecutive parts of one text: `(text, true)` parts may produce special tokens, `(text, false)`
    /// parts are plain text. Prepends BOS when `add_bos` and the model has one.
    pub fn encode_parts(&self, parts: &[(&str, bool)], add_bos: bool) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if add_bos {
            if let Some(b) = self.special.bos {
                ids.push(b);
            }
        }
        // The space prefix of SentencePiece vocabularies goes only before the very start of the text.
        let mut at_start = true;
        for &(text, special) in parts {
            let mut rest = 0;
            let matcher = if special { &self.special_matcher } else { &self.text_matcher };
            if let Some(m) = matcher {
                for hit in m.ac.find_iter(text) {
                    self.encode_plain(&text[rest..hit.start()], at_start, &mut ids)?;
                    ids.push(m.ids[hit.pattern().as_usize()]);
                    at_start = false;
                    rest = hit.end();
                }
            }
            self.encode_plain(&text[rest..], at_start, &mut ids)?;
            at_start &= text.is_empty();
        }
        Ok(ids)
    }

    /// Encodes plain text that continues a sequence (a grammar's forced bytes, a stop string): no BOS and no
    /// SentencePiece space prefix, user-defined pieces matched as in [`Tokenizer::encode`].
    pub fn encode_continuation(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        let mut rest = 0;
        if let Some(m) = &self.text_matcher {
            for hit in m.ac.find_iter(text) {
                self.encode_plain(&text[rest..hit.start()], false, &mut ids)?;
                ids.push(m.ids[hit.pattern().as_usize()]);
                rest = hit.end();
            }
        }
        self.encode_plain(&text[rest..], false, &mut ids)?;
        Ok(ids)
    }

    fn encode_plain(&self, text: &str, at_start: bool, out: &mut Vec<u32>) -> Result<()> {
        if text.is_empty() {
            return Ok(());
        }
        match &self.inner {
            Inner::Spm(t) => t.encode_fragment(text, at_start && t.adds_space_prefix(), out),
            Inner::Hf(t) => t.encode(text, out)?,
        }
        Ok(())
    }

    /// Encodes a plain-text prompt the way the model expects (BOS if the model adds one).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        self.encode(text, self.special.add_bos)
    }

    /// Longest text one [`StreamDecoder::push_into`] call can append, in bytes: the longest token plus the
    /// bytes of an incomplete character carried over, each possibly replaced by U+FFFD (3 bytes).
    pub fn max_piece_bytes(&self) -> usize {
        3 * (self.max_token_bytes + 4)
    }

    /// Raw bytes of one token (empty for control tokens).
    pub fn token_bytes(&self, id: u32) -> Result<&[u8]> {
        self.token_bytes
            .get(id as usize)
            .map(|v| v.as_slice())
            .ok_or(TokenizerError::BadId { id, vocab: self.token_bytes.len() })
    }

    /// Decodes a whole sequence (invalid UTF-8 replaced by U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut d = StreamDecoder::new(self);
        let mut s = String::new();
        for &id in ids {
            d.push_into(id, &mut s)?;
        }
        s.push_str(&d.finish());
        Ok(s)
    }

    /// The literal vocabulary string of a token (e.g. `<bos>`, `<|im_start|>`), as a template writes it.
    pub fn token_text(&self, id: u32) -> Option<String> {
        match &self.inner {
            Inner::Spm(t) => t.token_text(id),
            Inner::Hf(t) => t.token_text(id),
        }
    }
}

/// Turns a stream of token ids into text, holding back bytes of a UTF-8 character until it is complete.
/// [`StreamDecoder::push_into`] appends to a caller-owned buffer and allocates nothing once its buffers have
/// grown to the longest token (decode runs it per token).
pub struct StreamDecoder<'t> {
    tok: &'t Tokenizer,
    /// Bytes of an incomplete UTF-8 character carried to the next token.
    pending: Vec<u8>,
    /// Nothing emitted yet (a `Cell`: set while the pending bytes are borrowed).
    at_start: std::cell::Cell<bool>,
}

impl<'t> StreamDecoder<'t> {
    pub fn new(tok: &'t Tokenizer) -> Self {
        // Sized for the longest token at once, so streaming never regrows it.
        let pending = Vec::with_capacity(tok.max_piece_bytes());
        StreamDecoder { tok, pending, at_start: std::cell::Cell::new(true) }
    }

    /// Feeds one token; returns the text that became complete (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        let mut s = String::new();
        self.push_into(id, &mut s)?;
        Ok(s)
    }

    /// Feeds one token and appends the text that became complete to `out`.
    pub fn push_into(&mut self, id: u32, out: &mut String) -> Result<()> {
        let bytes = self.tok.token_bytes(id)?;
        if bytes.is_empty() {
            return Ok(());
        }
        self.pending.extend_from_slice(bytes);
        let mut done = 0;
        loop {
            match std::str::from_utf8(&self.pending[done..]) {
                Ok(s) => {
                    self.emit(s, out);
                    done = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // The first `valid_up_to` bytes are valid UTF-8 by definition.
                    let s = std::str::from_utf8(&self.pending[done..done + valid]).unwrap_or_default();
                    self.emit(s, out);
                    match e.error_len() {
                        // Incomplete character at the end: keep it for the next token.
                        None => {
                            done += valid;
                            break;
                        }
                        Some(bad) => {
                            self.emit("\u{FFFD}", out);
                            done += valid + bad;
                        }
                    }
                }
            }
        }
        self.pending.drain(..done);
        Ok(())
    }

    /// Appends `s` to `out`: space markers become spaces, and the very first space of the output is dropped
    /// when the vocabulary prefixes text with one.
    fn emit(&self, s: &str, out: &mut String) {
        for c in s.chars() {
            let c = if self.tok.space_marker && c == '▁' { ' ' } else { c };
            if self.at_start.replace(false) && self.tok.strip_leading_space && c == ' ' {
                continue;
            }
            out.push(c);
        }
    }

    /// Flushes what is left (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let pending = std::mem::take(&mut self.pending);
        let mut out = String::new();
        self.emit(&String::from_utf8_lossy(&pending), &mut out);
        out
    }
}
