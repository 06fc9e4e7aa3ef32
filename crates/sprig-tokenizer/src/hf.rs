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
    /// Every token's bytes, when the fast reader computed them from the vocabulary it read (taken by
    /// [`HfTokenizer::all_token_bytes`]).
    token_bytes: Option<Vec<Vec<u8>>>,
}

fn err(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Spec(e.to_string())
}

impl HfTokenizer {
    /// A `tokenizer.json`: a BPE model's read in one typed pass ([`fast`]), anything else (or anything that
    /// pass does not take exactly) by the `tokenizers` crate's own reader.
    pub fn from_json(json: &str) -> Result<Self> {
        // The `tokenizers` crate panics on some malformed parts (its decoder reader `expect`s): a corrupt file
        // is an error here, not a panic.
        std::panic::catch_unwind(|| match fast::read(json) {
            Some(t) => Ok(t),
            None => Self::from_json_generic(json),
        })
        .unwrap_or_else(|p| {
            let why = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
            Err(err(format!("malformed tokenizer.json: {}", why.unwrap_or_default())))
        })
    }

    /// The fast reader alone (`None` where it declines): for tests comparing it with the generic one.
    #[doc(hidden)]
    pub fn from_json_fast(json: &str) -> Option<Self> {
        fast::read(json)
    }

    /// The `tokenizers` crate's reader (its BPE path buffers the whole vocabulary and merges twice: about
    /// half a second for a 151k-token Qwen vocabulary on a 2-core Xeon).
    #[doc(hidden)]
    pub fn from_json_generic(json: &str) -> Result<Self> {
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
        Ok(HfTokenizer { tok, byte_level, strip_space, added, token_bytes: None })
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

    /// Bytes each token decodes to (control tokens: none). Computed once: a second call recomputes them
    /// from the `tokenizers` model.
    pub fn all_token_bytes(&mut self) -> Vec<Vec<u8>> {
        if let Some(b) = self.token_bytes.take() {
            return b;
        }
        let n = self.tok.get_vocab_size(true);
        // `get_added_tokens_decoder` returns a copy of the map: taken once, not once per token.
        let added = self.tok.get_added_tokens_decoder();
        let specials: std::collections::HashSet<u32> = added.iter().filter(|(_, t)| t.special).map(|(id, _)| *id).collect();
        let table = unicode_to_byte();
        (0..n as u32)
            .map(|id| {
                if specials.contains(&id) {
                    return Vec::new();
                }
                let Some(piece) = self.tok.id_to_token(id) else { return Vec::new() };
                // Added non-special tokens are stored as plain text, not byte-level encoded.
                if self.byte_level && added.contains_key(&id) {
                    return piece.into_bytes();
                }
                piece_bytes(&piece, self.byte_level, &table)
            })
            .collect()
    }
}

/// GPT-2's byte characters are all below U+0200: a table from character to byte, not a map (151,936 tokens
/// on a Qwen vocabulary).
fn unicode_to_byte() -> [Option<u8>; 0x200] {
    let mut table = [None::<u8>; 0x200];
    for (b, c) in bytes_to_unicode() {
        table[c as usize] = Some(b);
    }
    table
}

/// The bytes a vocabulary piece decodes to: byte-level characters mapped back to bytes, else `<0xXX>` pieces
/// as that byte and `▁` as a space.
fn piece_bytes(piece: &str, byte_level: bool, table: &[Option<u8>; 0x200]) -> Vec<u8> {
    if byte_level {
        piece.chars().map(|c| table.get(c as usize).copied().flatten().unwrap_or(b'?')).collect()
    } else if let Some(b) =
        piece.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')).and_then(|h| u8::from_str_radix(h, 16).ok())
    {
        vec![b]
    } else {
        piece.replace('▁', " ").into_bytes()
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

/// A BPE `tokenizer.json` read in one typed pass: the vocabulary and merges straight into the BPE builder, the
/// small parts (normalizer, pre-tokenizer, post-processor, decoder) each by the `tokenizers` crate from their
/// raw JSON, the added tokens added as its reader adds them. Every token's bytes come from the vocabulary read
/// here (no per-id lookups). `None` (the generic reader then runs) for another model type, truncation or
/// padding settings, a malformed merge, or added tokens that would not get the ids the file gives them.
mod fast {
    use serde::de::{Deserializer, SeqAccess, Visitor};
    use serde::Deserialize;
    use serde_json::value::RawValue;
    use tokenizers::models::bpe::{Vocab, BPE};
    use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper};

    use super::{piece_bytes, unicode_to_byte, HfTokenizer};

    #[derive(Deserialize)]
    struct File<'a> {
        #[serde(default)]
        version: Option<String>,
        #[serde(borrow, default)]
        truncation: Option<&'a RawValue>,
        #[serde(borrow, default)]
        padding: Option<&'a RawValue>,
        #[serde(default)]
        added_tokens: Vec<Added>,
        #[serde(borrow, default)]
        normalizer: Option<&'a RawValue>,
        #[serde(borrow, default)]
        pre_tokenizer: Option<&'a RawValue>,
        #[serde(borrow, default)]
        post_processor: Option<&'a RawValue>,
        #[serde(borrow, default)]
        decoder: Option<&'a RawValue>,
        model: Model,
    }

    #[derive(Deserialize)]
    struct Added {
        id: u32,
        content: String,
        #[serde(default)]
        single_word: bool,
        #[serde(default)]
        lstrip: bool,
        #[serde(default)]
        rstrip: bool,
        #[serde(default = "yes")]
        normalized: bool,
        #[serde(default)]
        special: bool,
    }

    fn yes() -> bool {
        true
    }

    #[derive(Deserialize)]
    struct Model {
        #[serde(rename = "type", default)]
        kind: Option<String>,
        #[serde(default)]
        dropout: Option<f32>,
        #[serde(default)]
        unk_token: Option<String>,
        #[serde(default)]
        continuing_subword_prefix: Option<String>,
        #[serde(default)]
        end_of_word_suffix: Option<String>,
        #[serde(default)]
        fuse_unk: Option<bool>,
        #[serde(default)]
        byte_fallback: Option<bool>,
        #[serde(default)]
        ignore_merges: Option<bool>,
        vocab: Vocab,
        merges: Merges,
    }

    /// Merges as `"a b"` strings or `["a", "b"]` pairs; `None` for a string without exactly one space.
    struct Merges(Option<Vec<(String, String)>>);

    impl<'de> Deserialize<'de> for Merges {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Seq;
            impl<'de> Visitor<'de> for Seq {
                type Value = Merges;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a list of merges")
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Merges, A::Error> {
                    let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                    let mut ok = true;
                    while let Some(m) = seq.next_element::<Merge>()? {
                        match m.0 {
                            Some(pair) => out.push(pair),
                            None => ok = false,
                        }
                    }
                    Ok(Merges(ok.then_some(out)))
                }
            }
            d.deserialize_seq(Seq)
        }
    }

    struct Merge(Option<(String, String)>);

    impl<'de> Deserialize<'de> for Merge {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct One;
            impl<'de> Visitor<'de> for One {
                type Value = Merge;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a merge")
                }
                fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Merge, E> {
                    // As the `tokenizers` reader: exactly two parts.
                    let mut parts = s.split(' ');
                    Ok(Merge(match (parts.next(), parts.next(), parts.next()) {
                        (Some(a), Some(b), None) => Some((a.to_string(), b.to_string())),
                        _ => None,
                    }))
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Merge, A::Error> {
                    let a: Option<String> = seq.next_element()?;
                    let b: Option<String> = seq.next_element()?;
                    let extra: Option<serde::de::IgnoredAny> = seq.next_element()?;
                    Ok(Merge(match (a, b, extra) {
                        (Some(a), Some(b), None) => Some((a, b)),
                        _ => None,
                    }))
                }
            }
            d.deserialize_any(One)
        }
    }

    fn part<T: serde::de::DeserializeOwned>(raw: Option<&RawValue>) -> Option<Option<T>> {
        match raw {
            None => Some(None),
            Some(r) => serde_json::from_str(r.get()).ok().map(Some),
        }
    }

    pub(super) fn read(json: &str) -> Option<HfTokenizer> {
        let f: File = serde_json::from_str(json).ok()?;
        if f.version.as_deref().is_some_and(|v| v != "1.0")
            || f.truncation.is_some()
            || f.padding.is_some()
            || f.model.kind.as_deref().is_some_and(|k| k != "BPE")
        {
            return None;
        }
        let m = f.model;
        let merges = m.merges.0?;
        let decoder = f.decoder.map(|d| d.get()).unwrap_or("");
        let byte_level = decoder.contains("\"ByteLevel\"") || (f.decoder.is_none() && json.contains("\"ByteLevel\""));
        let strip_space = !byte_level && (decoder.contains("\"Strip\"") || decoder.contains("\"Metaspace\""));
        // Every token's bytes from the vocabulary as read, before the builder takes it.
        let n = m.vocab.values().chain(f.added_tokens.iter().map(|a| &a.id)).max().map_or(0, |&id| id as usize + 1);
        // Ids are dense in any real vocabulary; sparse ones (a hostile file's id 4e9) go to the generic reader,
        // which sizes by count, rather than allocating by the largest id.
        if n > m.vocab.len() + f.added_tokens.len() {
            return None;
        }
        let mut bytes = vec![Vec::new(); n];
        let table = unicode_to_byte();
        for (piece, &id) in &m.vocab {
            bytes[id as usize] = piece_bytes(piece, byte_level, &table);
        }
        for a in &f.added_tokens {
            // Added tokens are plain text; control tokens decode to nothing.
            bytes[a.id as usize] = if a.special { Vec::new() } else { a.content.clone().into_bytes() };
        }
        let mut b = BPE::builder().vocab_and_merges(m.vocab, merges);
        if let Some(x) = m.dropout {
            b = b.dropout(x);
        }
        if let Some(x) = m.unk_token {
            b = b.unk_token(x);
        }
        if let Some(x) = m.continuing_subword_prefix {
            b = b.continuing_subword_prefix(x);
        }
        if let Some(x) = m.end_of_word_suffix {
            b = b.end_of_word_suffix(x);
        }
        if let Some(x) = m.fuse_unk {
            b = b.fuse_unk(x);
        }
        if let Some(x) = m.byte_fallback {
            b = b.byte_fallback(x);
        }
        if let Some(x) = m.ignore_merges {
            b = b.ignore_merges(x);
        }
        let mut tok = tokenizers::Tokenizer::new(b.build().ok()?);
        tok.with_normalizer(part::<NormalizerWrapper>(f.normalizer)?);
        tok.with_pre_tokenizer(part::<PreTokenizerWrapper>(f.pre_tokenizer)?);
        tok.with_post_processor(part::<PostProcessorWrapper>(f.post_processor)?);
        tok.with_decoder(part::<DecoderWrapper>(f.decoder)?);
        let added: Vec<AddedToken> = f
            .added_tokens
            .iter()
            .map(|a| {
                AddedToken::from(a.content.clone(), a.special)
                    .single_word(a.single_word)
                    .lstrip(a.lstrip)
                    .rstrip(a.rstrip)
                    .normalized(a.normalized)
            })
            .collect();
        tok.add_tokens(&added);
        if f.added_tokens.iter().any(|a| tok.token_to_id(&a.content) != Some(a.id)) || tok.get_vocab_size(true) != n {
            return None;
        }
        let added = f.added_tokens.into_iter().map(|a| (a.content, a.id, a.special)).collect();
        Some(HfTokenizer { tok, byte_level, strip_space, added, token_bytes: Some(bytes) })
    }
}
