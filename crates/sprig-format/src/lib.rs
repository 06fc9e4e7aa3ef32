//! The native model file.
//!
//! One `.safetensors` file that the Python `safetensors` package can open. Everything a runtime needs is in
//! it: weights (float tensors as themselves; quantized ones as `NAME.qs` / `NAME.scale` / `NAME.min` planes, see
//! [`sprig_quant::scheme`]), and in the metadata the format version, the architecture config (JSON), the
//! tokenizer (JSON) and the chat template.
//!
//! Every tensor starts on a 64-byte boundary of the file (the header is space-padded and gaps are filled with
//! `__pad.N` u8 tensors, because safetensors forbids holes), so the CPU backend uses the weights in place from
//! the memory map.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod arch;
pub mod config;
pub mod container;
#[doc(hidden)]
pub mod testutil;

pub use arch::{Arch, ArchRules, QkNorm};
pub use config::{Activation, AttentionKind, ModelConfig, MoeConfig, RopeLayout, RouterScoring};
pub use container::{ContainerWriter, FloatDType, ModelFile, TensorEntry, WeightView, FORMAT_VERSION};

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("not a valid safetensors file: {0}")]
    SafeTensors(String),
    #[error("metadata field `{field}`: {msg}")]
    Metadata { field: String, msg: String },
    #[error("tensor `{tensor}`: {msg}")]
    Tensor { tensor: String, msg: String },
    #[error("unsupported format version {0} (this build reads versions 1 to {FORMAT_VERSION})")]
    Version(String),
}

impl FormatError {
    pub fn tensor(tensor: &str, msg: impl Into<String>) -> Self {
        FormatError::Tensor { tensor: tensor.to_string(), msg: msg.into() }
    }
    pub fn meta(field: &str, msg: impl Into<String>) -> Self {
        FormatError::Metadata { field: field.to_string(), msg: msg.into() }
    }
}

pub type Result<T, E = FormatError> = std::result::Result<T, E>;
