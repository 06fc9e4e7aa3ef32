//! The engine: opens a model from any supported file, pairs it with its tokenizer and chat template, samples,
//! streams generated text, and evaluates (perplexity, teacher/student KL).

pub mod calibrate;
pub mod chat;
pub mod device;
pub mod eval;
pub mod generate;
pub mod kernel_cache;
pub mod load;
pub mod registry;
pub mod sampler;
pub mod session;

pub use chat::{ChatMessage, ChatTemplate};
pub use device::{AnyEngine, AnySession, DeviceChoice};
pub use generate::{Engine, GenerationStats};
pub use load::{open_model_file, LoadOptions};
pub use sampler::{Sampler, SamplingParams};
pub use session::Session;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] sprig_models::ModelError),
    #[error(transparent)]
    Format(#[from] sprig_format::FormatError),
    #[error(transparent)]
    Import(#[from] sprig_import::ImportError),
    #[error(transparent)]
    Tokenizer(#[from] sprig_tokenizer::TokenizerError),
    #[error(transparent)]
    Backend(#[from] sprig_backend::BackendError),
    #[error("invalid sampling parameter: {0}")]
    Sampling(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, EngineError>;
