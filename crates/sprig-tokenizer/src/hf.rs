//! Hugging Face `tokenizers` backed tokenizer: HF `tokenizer.json` files as they are, and GGUF `gpt2`-style
//! BPE vocabularies converted into one ([`from_gguf_bpe`]).

use std::collections::HashMap;

use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::{token_type, Result, TokenizerError};

pub struct HfTokenizer {
    tok: tokenizers::Tokenizer,
    byte_level: bool,
    strip_space: bool,
    /// Every added token by its literal string: (text, id, special).
    added: Vec<(String, u32, bool)>,
}

fn err(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Spec(e.to_string())
}

impl HfTokenizer {
    pub fn from_json(json: &str) -> Result<Self> {
        let tok: tokenizers::Tokenizer = json.parse().map_err(err)?;
        // Only the decoder is read back: parsing the whole file into a `Value` would build a second copy of
        // the vocabulary and merges (megabytes the allocator keeps after they are freed).
        // (A present `"decoder": null` reads as `Some(Null)`, "null"; a missing one as `None`, "".)
        #[derive(serde::Deserialize)]
        struct DecoderOnly {
            #[serde(default, deserialize_with = "present")]
            decoder: Option<serde_json::Value>,
        }
        fn present<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<serde_json::Value>, D::Error> {
            serde::Deserialize::deserialize(d).map(Some)
        }
        let probe: DecoderOnly = serde_json::from_str(json).map_err(err)?;
        let dec = probe.decoder.map(|d| d.to_string()).unwrap_or_default();
        let byte_level = dec.contains("\"ByteLevel\"") || (dec.is_empty() && json.contains("\"ByteLevel\""));
        let strip_space = !byte_level && (dec.contains("\"Strip\"") || dec.contains("\"Metaspace\""));
        let added = tok.get_added_tokens_decoder().into_iter().map(|(id, t)| (t.content, id, t.special)).collect();
        Ok(HfTokenizer { tok, byte_level, strip_space, added })
    }

    pub fn is_byte_level(&self) -> bool {
        self.byte_level
    }

    pub fn strips_leading_space(&self) -> bool {
        self.strip_space
    }

    /// Encodes `text` with the normalizer, pre-tokenizer and model only (added tokens are matched by the
    /// caller, [`crate::Tokenizer`], which decides which of them plain text may produce).
    pub fn encode(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        use tokenizers::{Model, Normalizer, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
        let e = |e: tokenizers::Error| TokenizerError::Encode(e.to_string());
        let mut pre = PreTokenizedString::from(text);
        if let Some(n) = self.tok.get_normalizer() {
            pre.normalize(|s| n.normalize(s)).map_err(e)?;
        }
        if let Some(p) = self.tok.get_pre_tokenizer() {
            p.pre_tokenize(&mut pre).map_err(e)?;
        }
        let model = self.tok.get_model();
        pre.tokenize(|s| model.tokenize(s.get())).map_err(e)?;
        for (_, _, toks) in pre.get_splits(OffsetReferential::Original, OffsetType::Byte) {
            out.extend(toks.iter().flatten().map(|t| t.id));
        }
        Ok(())
    }

    /// Added tokens by literal string (for splitting text that may spell them).
    pub fn added_tokens(&self) -> &[(String, u32, bool)] {
        &self.added
    }

    pub fn token_text(&self, id: u32) -> Option<String> {
        self.tok.id_to_token(id)
    }

    pub fn all_token_bytes(&self) -> Vec<Vec<u8>> {
        let n = self.tok.get_vocab_size(true);
        // `get_added_tokens_decoder` returns a copy of the map: taken once, not once per token.
        let added = self.tok.get_added_tokens_decoder();
        let specials: std::collections::HashSet<u32> = added.iter().filter(|(_, t)| t.special).map(|(id, _)| *id).collect();
        // GPT-2's byte characters are all below U+0200: a table, not a map (151,936 tokens on a Qwen vocabulary).
        let mut unicode_to_byte = [None::<u8>; 0x200];
        for (b, c) in bytes_to_unicode() {
            unicode_to_byte[c as usize] = Some(b);
        }
        (0..n as u32)
            .map(|id| {
                if specials.contains(&id) {
                    return Vec::new();
                }
                let Some(piece) = self.tok.id_to_token(id) else { return Vec::new() };
                if self.byte_level {
                    // Added non-special tokens are stored as plain text, not byte-level encoded.
                    if added.contains_key(&id) {
                        return piece.into_bytes();
                    }
                    piece.chars().map(|c| unicode_to_byte.get(c as usize).copied().flatten().unwrap_or(b'?')).collect()
                } else if let Some(b) = piece
                    .strip_prefix("<0x")
                    .and_then(|h| h.strip_suffix('>'))
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    vec![b]
                } else {
                    piece.replace('▁', " ").into_bytes()
                }
            })
            .collect()
    }
}

/// GPT-2's reversible byte → printable-character map used by byte-level BPE vocabularies.
pub fn bytes_to_unicode() -> Vec<(u8, char)> {
    let mut out = Vec::with_capacity(256);
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        if printable {
            out.push((b, b as char));
        } else {
            out.push((b, char::from_u32(256 + n).unwrap()));
            n += 1;
        }
    }
    out
}

/// The GPT-2 pre-tokenization regex.
const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama 3 / many newer BPE vocabularies (GGUF pre `llama-bpe`).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2 (GGUF pre `qwen2`).
const QWEN2_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    let split = |re: &str| -> Result<PreTokenizerWrapper> {
        Ok(Split::new(SplitPattern::Regex(re.into()), SplitDelimiterBehavior::Isolated, false).map_err(err)?.into())
    };
    let byte_level_plain: PreTokenizerWrapper = ByteLevel::new(false, false, false).into();
    Ok(match pre {
        // GPT-2 regex applied by ByteLevel itself.
        "gpt2" | "default" | "gpt-2" => ByteLevel::new(false, false, true).into(),
        // SmolLM: every digit on its own, then the GPT-2 regex.
        "smollm" => Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, false, true).into()]).into(),
        "llama-bpe" | "llama3" => Sequence::new(vec![split(LLAMA3_REGEX)?, byte_level_plain]).into(),
        "qwen2" => Sequence::new(vec![split(QWEN2_REGEX)?, byte_level_plain]).into(),
        other => {
            let _ = GPT2_REGEX;
            return Err(TokenizerError::Spec(format!("unsupported BPE pre-tokenizer `{other}`")));
        }
    })
}

/// Builds a HF tokenizer JSON from a GGUF `gpt2`-model vocabulary.
pub fn from_gguf_bpe(tokens: &[String], merges: &[String], types: &[u8], pre: &str) -> Result<String> {
    let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    if vocab.len() != tokens.len() {
        let mut seen = HashMap::new();
        for (i, t) in tokens.iter().enumerate() {
            if let Some(j) = seen.insert(t, i) {
                return Err(err(format!("BPE vocabulary lists token `{t}` twice (ids {j} and {i})")));
            }
        }
    }
    let merges: Vec<(String, String)> = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| err(format!("bad merge `{m}`")))
        })
        .collect::<Result<_>>()?;
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).ignore_merges(false).build().map_err(err)?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(pre_tokenizer(pre)?));
    tok.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
    let specials: Vec<AddedToken> = tokens
        .iter()
        .zip(types)
        .filter(|(_, &t)| t == token_type::CONTROL || t == token_type::USER_DEFINED)
        .map(|(s, &t)| AddedToken::from(s.clone(), t == token_type::CONTROL))
        .collect();
    tok.add_special_tokens(&specials);
    tok.to_string(false).map_err(err)
}
