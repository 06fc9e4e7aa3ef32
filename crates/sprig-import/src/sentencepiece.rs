//! SentencePiece `tokenizer.model` files (protobuf `ModelProto`), read with prost message definitions of the
//! fields sprig needs (field numbers from sentencepiece_model.proto).

use prost::Message;
use sprig_tokenizer::{token_type, SpecialTokens, TokenizerSpec};

use crate::{invalid, Result};

#[derive(Clone, PartialEq, Message)]
struct ModelProto {
    #[prost(message, repeated, tag = "1")]
    pieces: Vec<SentencePiece>,
    #[prost(message, optional, tag = "2")]
    trainer_spec: Option<TrainerSpec>,
    #[prost(message, optional, tag = "3")]
    normalizer_spec: Option<NormalizerSpec>,
}

#[derive(Clone, PartialEq, Message)]
struct SentencePiece {
    #[prost(string, optional, tag = "1")]
    piece: Option<String>,
    #[prost(float, optional, tag = "2")]
    score: Option<f32>,
    /// NORMAL=1, UNKNOWN=2, CONTROL=3, USER_DEFINED=4, BYTE=6, UNUSED=5.
    #[prost(int32, optional, tag = "3")]
    r#type: Option<i32>,
}

#[derive(Clone, PartialEq, Message)]
struct TrainerSpec {
    /// UNIGRAM=1, BPE=2, WORD=3, CHAR=4.
    #[prost(int32, optional, tag = "3")]
    model_type: Option<i32>,
    #[prost(int32, optional, tag = "40")]
    unk_id: Option<i32>,
    #[prost(int32, optional, tag = "41")]
    bos_id: Option<i32>,
    #[prost(int32, optional, tag = "42")]
    eos_id: Option<i32>,
}

#[derive(Clone, PartialEq, Message)]
struct NormalizerSpec {
    #[prost(bool, optional, tag = "3")]
    add_dummy_prefix: Option<bool>,
}

/// Parses a SentencePiece BPE model into the tokenizer spec sprig stores.
pub fn parse(bytes: &[u8]) -> Result<TokenizerSpec> {
    let m =
        ModelProto::decode(bytes).map_err(|e| invalid(format!("tokenizer.model: not a SentencePiece model: {e}")))?;
    if m.pieces.is_empty() {
        return Err(invalid("tokenizer.model: no pieces"));
    }
    let ts = m.trainer_spec.unwrap_or_default();
    if ts.model_type.unwrap_or(1) != 2 {
        return Err(invalid("tokenizer.model: only BPE SentencePiece models are supported (this one is not BPE)"));
    }
    let n = m.pieces.len() as i32;
    let id = |v: Option<i32>, default: i32| -> Option<u32> {
        let v = v.unwrap_or(default);
        (0..n).contains(&v).then_some(v as u32)
    };
    let (bos, eos) = (id(ts.bos_id, 1), id(ts.eos_id, 2));
    let mut tokens = Vec::with_capacity(m.pieces.len());
    let mut scores = Vec::with_capacity(m.pieces.len());
    let mut types = Vec::with_capacity(m.pieces.len());
    for (i, p) in m.pieces.into_iter().enumerate() {
        let score = p.score.unwrap_or(0.0);
        if !score.is_finite() {
            return Err(invalid(format!("tokenizer.model: piece {i} has a non-finite score")));
        }
        tokens.push(p.piece.unwrap_or_default());
        scores.push(score);
        types.push(match p.r#type.unwrap_or(1) {
            t @ 1..=6 => t as u8,
            _ => token_type::NORMAL,
        });
    }
    Ok(TokenizerSpec::SentencePiece {
        tokens,
        scores,
        token_types: types,
        special: SpecialTokens { bos, eos, add_bos: bos.is_some(), stop: eos.into_iter().collect() },
        add_space_prefix: m.normalizer_spec.and_then(|n| n.add_dummy_prefix).unwrap_or(true),
    })
}
