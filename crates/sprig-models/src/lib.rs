//! The model, written once against [`sprig_backend::Backend`].
//!
//! [`decoder`] is the one decoder-only transformer every family runs on; what sets a family apart is a flag of
//! its config or a rule of the rule book ([`sprig_format::arch`]), never a copy of the model:
//! - `llama`: Llama, llama2.c checkpoints, SmolLM2, Mistral; with experts, Mixtral.
//! - `qwen2`: QKV biases (Qwen2.5, Qwen2.5-Coder).
//! - `qwen3`: per-head QK norm.
//! - `gemma3`: per-head QK norm, GeGLU, embeddings scaled by sqrt(dim), pre- and post-norms, sliding-window
//!   layers with their own RoPE base, final logit soft-capping.
//! - `qwen2moe`: routed experts plus a sigmoid-gated shared expert, QKV biases.
//! - `qwen3moe`: routed experts, per-head QK norm.
//! - `olmoe`: routed experts, QK norm over the whole projection.
#![forbid(unsafe_code)]

pub mod decoder;

pub use decoder::{Batch, Logits, Model, RingCheckpoint, State};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Backend(#[from] sprig_backend::BackendError),
    #[error("tensor `{tensor}` has shape {got:?}, the config implies {expected:?}")]
    Shape { tensor: String, got: (usize, usize), expected: (usize, usize) },
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    BadToken { id: u32, vocab: usize },
    #[error("context overflow: {pos} tokens cached + {new} new exceeds the context length {ctx}")]
    ContextOverflow { pos: usize, new: usize, ctx: usize },
    #[error("a forward pass needs at least one token")]
    NoTokens,
    /// A context shift would need positions a sliding-window layer no longer holds.
    #[error("cannot shift the context: layer {layer} no longer holds position {position}")]
    ShiftUnavailable { layer: usize, position: usize },
    #[error("layer {layer}: the state was made for another model")]
    ForeignState { layer: usize },
    #[error("this model has no multi-token-prediction (MTP) head: its file has no `nextn` layers")]
    NoMtpHead,
}

pub type Result<T> = std::result::Result<T, ModelError>;

/// Index of the largest logit (first on ties, as llama2.c).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

