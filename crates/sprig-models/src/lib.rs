//! Model families, each written once against [`sprig_backend::Backend`].
//!
//! - [`decoder`]: the decoder-only transformer family: Llama (llama2.c, SmolLM2), Qwen2 (QKV bias), Gemma 3
//!   (QK-norm, GeGLU, embedding scaling, pre/post norms, local/global RoPE bases, sliding-window layers).

pub mod decoder;

pub use decoder::{Logits, Model, State};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Backend(#[from] sprig_backend::BackendError),
    #[error(transparent)]
    Format(#[from] sprig_format::FormatError),
    #[error("tensor `{tensor}` has shape {got:?}, the config implies {expected:?}")]
    Shape { tensor: String, got: (usize, usize), expected: (usize, usize) },
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    BadToken { id: u32, vocab: usize },
    #[error("context overflow: {pos} tokens cached + {new} new exceeds the context length {ctx}")]
    ContextOverflow { pos: usize, new: usize, ctx: usize },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, ModelError>;
