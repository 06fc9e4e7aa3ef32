//! The engine: opens a model from any supported file, pairs it with its tokenizer and chat template, samples,
//! streams generated text, and evaluates (perplexity, teacher/student KL).
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod calibrate;
pub mod chat;
pub mod constraint;
pub mod device;
pub mod distill;
pub mod escalate;
pub mod eval;
pub mod generate;
#[cfg(not(feature = "wgpu"))]
mod gpu_stub;
pub mod kernel_cache;
pub mod load;
pub mod memory;
pub mod prefix_cache;
pub mod registry;
pub mod sampler;
pub mod session;
pub mod session_file;
pub mod speculative;
pub mod tools;
mod together;

pub use chat::{ChatMessage, ChatTemplate};
pub use constraint::Constraint;
pub use device::{generate_together, AnyEngine, AnySession, DeviceChoice};
pub use generate::{Engine, GenerationStats};
pub use load::{open_model_file, LoadOptions};
pub use sampler::{Sampler, SamplingParams, TokenLogprob};
pub use prefix_cache::PrefixCacheStats;
pub use tools::{Tool, ToolCall, ToolChoice, ToolFormat, Tools};
pub use session::{run_batch, BatchRequest, ContextPolicy, ContinuousBatch, Finished, Prompt, Request, Session};

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
    #[error("invalid sampling parameter {param}: {detail}")]
    Sampling { param: &'static str, detail: String },
    /// A constraint (JSON Schema, regex, grammar) or tool definitions that cannot be used, or a constraint that
    /// failed while generating.
    #[error("invalid {kind} constraint: {detail}")]
    Constraint { kind: &'static str, detail: String },
    /// Tool definitions or a tool choice that cannot be used.
    #[error("tools: {0}")]
    Tools(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("the model produced a non-finite logit ({value} for token {index}); no token can be sampled")]
    BadLogits { index: usize, value: f32 },
    #[error("this model carries no chat template")]
    NoChatTemplate,
    #[error("empty prompt: nothing to condition on")]
    EmptyPrompt,
    #[error("the tokenizer has {tokenizer} tokens but the model's vocabulary is {model}")]
    VocabularyMismatch { tokenizer: usize, model: usize },
    #[error("{}: {source}", path.display())]
    Io { path: std::path::PathBuf, source: std::io::Error },
    /// Fetching or verifying a registry model failed (pip, a wheel, a checksum, an unknown name).
    #[error("model registry: {0}")]
    Registry(String),
    /// What a model and its session need does not fit the caller's memory budget or the memory available.
    #[error("memory: {0}")]
    MemoryBudget(String),
    /// A saved session that cannot be restored here: another model or layout, a damaged or truncated file.
    #[error("session file: {0}")]
    SessionFile(String),
    /// Evaluation settings that cannot work (no chunk to score, a context too small for the text).
    #[error("evaluation: {0}")]
    Eval(String),
}

impl EngineError {
    /// The context overflowed (from any layer).
    pub fn is_context_overflow(&self) -> bool {
        matches!(self, EngineError::Model(sprig_models::ModelError::ContextOverflow { .. }))
    }
    /// The device failed or is missing, wherever it surfaced.
    pub fn device_error(&self) -> Option<&sprig_backend::BackendError> {
        use sprig_backend::BackendError as B;
        let b = match self {
            EngineError::Backend(b) | EngineError::Model(sprig_models::ModelError::Backend(b)) => b,
            _ => return None,
        };
        matches!(b, B::DeviceUnavailable(_) | B::DeviceFailed { .. } | B::OutOfMemory { .. }).then_some(b)
    }
}

/// `map_err` for an I/O error on `path`, keeping the source error.
pub(crate) fn io_error(path: &std::path::Path) -> impl Fn(std::io::Error) -> EngineError + '_ {
    move |source| EngineError::Io { path: path.to_path_buf(), source }
}

pub type Result<T> = std::result::Result<T, EngineError>;
