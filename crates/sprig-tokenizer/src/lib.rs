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
pub struct Tokenizer {
    inner: Inner,
    special: SpecialTokens,
    /// Bytes each token decodes to (empty for control tokens).
    token_bytes: Vec<Vec<u8>>,
    /// Strip one leading space from the first decoded text (SentencePiece's space prefix).
    strip_leading_space: bool,
    /// `▁` in decoded text means a space (SentencePiece-style vocabularies), also when byte fallback spelled it.
    space_marker: bool,
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
                let t = hf::HfTokenizer::from_json(tokenizer_json)?;
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
        for id in special.bos.iter().chain(&special.eos).chain(&special.stop) {
            if *id >= n {
                return Err(TokenizerError::Spec(format!("special token id {id} outside vocabulary of {n}")));
            }
        }
        Ok(Tokenizer { inner, special, token_bytes, strip_leading_space: strip, space_marker })
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

    /// Encodes `text`; special-token strings in it (e.g. `<|im_start|>`) become their ids. Prepends BOS when
    /// `add_bos` and the model has one.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if add_bos {
            if let Some(b) = self.special.bos {
                ids.push(b);
            }
        }
        match &self.inner {
            Inner::Spm(t) => ids.extend(t.encode(text)),
            Inner::Hf(t) => ids.extend(t.encode(text)?),
        }
        Ok(ids)
    }

    /// Encodes a prompt the way the model expects (BOS if the model adds one).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        self.encode(text, self.special.add_bos)
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
            s.push_str(&d.push(id)?);
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
pub struct StreamDecoder<'t> {
    tok: &'t Tokenizer,
    pending: Vec<u8>,
    at_start: bool,
}

impl<'t> StreamDecoder<'t> {
    pub fn new(tok: &'t Tokenizer) -> Self {
        StreamDecoder { tok, pending: Vec::new(), at_start: true }
    }

    /// Feeds one token; returns the text that became complete (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        let bytes = self.tok.token_bytes(id)?;
        if bytes.is_empty() {
            return Ok(String::new());
        }
        self.pending.extend_from_slice(bytes);
        let text = self.take_complete();
        Ok(self.finish_text(text))
    }

    /// Space markers become spaces; the very first space of the output is dropped when the vocabulary
    /// prefixes text with one.
    fn finish_text(&mut self, mut text: String) -> String {
        if self.tok.space_marker && text.contains('▁') {
            text = text.replace('▁', " ");
        }
        if self.at_start && !text.is_empty() {
            self.at_start = false;
            if self.tok.strip_leading_space && text.starts_with(' ') {
                text.remove(0);
            }
        }
        text
    }

    fn take_complete(&mut self) -> String {
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap());
                    match e.error_len() {
                        // Incomplete character at the end: keep it for the next token.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Flushes what is left (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        self.finish_text(s)
    }
}
