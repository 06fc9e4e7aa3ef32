//! Importers: each reads a foreign checkpoint and fills a [`ContainerWriter`] with the native config, tensors
//! (named as in GGUF: `token_embd.weight`, `blk.N.attn_q.weight`, ...), tokenizer and chat template.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod gguf;
pub mod hf;
pub mod llama2c;
pub mod sentencepiece;
mod sink;
pub mod synth;

use std::path::Path;

pub use sink::{Importance, QuantChoice, TensorLoss};
use sprig_format::ContainerWriter;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Tokenizer(#[from] sprig_tokenizer::TokenizerError),
    #[error(transparent)]
    Format(#[from] sprig_format::FormatError),
}

pub fn invalid(msg: impl Into<String>) -> ImportError {
    ImportError::Invalid(msg.into())
}

pub(crate) fn io_err(path: &Path) -> impl Fn(std::io::Error) -> ImportError + '_ {
    move |e| ImportError::Io { path: path.display().to_string(), source: e }
}

pub type Result<T> = std::result::Result<T, ImportError>;

/// Revision of what conversion produces from the same source and precision; part of every cache key of
/// converted files, so a cache made by an older converter is converted again (2: GGUF Q4_K and Q6_K kept as
/// the native `q4k` / `q6k`, no longer widened; 3: rows in groups of 16).
pub const CONVERTER_REVISION: u32 = 3;

/// What an importer produced, plus what it had to approximate.
pub struct Imported {
    pub writer: ContainerWriter,
    /// Tensors that did not map onto a native scheme exactly, with their error.
    pub losses: Vec<TensorLoss>,
}

/// How to import.
#[derive(Clone, Copy)]
pub struct ImportOptions<'a> {
    pub quant: QuantChoice,
    /// Calibration statistics steering the quantizer (see `sprig convert --calibrate`).
    pub importance: Option<&'a Importance>,
}

impl ImportOptions<'_> {
    pub fn quant(quant: QuantChoice) -> Self {
        ImportOptions { quant, importance: None }
    }
}

/// Progress callback: `(tensors done, tensors total)`.
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize);

/// Which importer a path needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    Native,
    Gguf,
    Llama2c,
    HfDir,
}

/// Guesses the source kind from the path and the file's first bytes.
pub fn detect(path: &Path) -> Result<SourceKind> {
    if path.is_dir() {
        return Ok(SourceKind::HfDir);
    }
    let mut head = [0u8; 16];
    let n = {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(io_err(path))?;
        f.read(&mut head).map_err(io_err(path))?
    };
    if n >= 4 && &head[..4] == b"GGUF" {
        return Ok(SourceKind::Gguf);
    }
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    match ext {
        "safetensors" => Ok(SourceKind::Native),
        "bin" => Ok(SourceKind::Llama2c),
        "gguf" => Err(invalid(format!("{}: has a .gguf name but no GGUF magic", path.display()))),
        _ => Err(invalid(format!(
            "{}: unknown model format (expected a native .safetensors, a .gguf, a llama2.c .bin or a Hugging Face directory)",
            path.display()
        ))),
    }
}

/// Imports any supported source (not a native file).
pub fn import(path: &Path, tokenizer: Option<&Path>, quant: QuantChoice, progress: Progress) -> Result<Imported> {
    import_with(path, tokenizer, &ImportOptions::quant(quant), progress)
}

pub fn import_with(
    path: &Path,
    tokenizer: Option<&Path>,
    opts: &ImportOptions,
    progress: Progress,
) -> Result<Imported> {
    match detect(path)? {
        SourceKind::Gguf => gguf::import(path, opts, progress),
        SourceKind::Llama2c => {
            let tok = tokenizer
                .ok_or_else(|| invalid("a llama2.c checkpoint needs its tokenizer: pass --tokenizer tokenizer.bin"))?;
            llama2c::import(path, tok, opts, progress)
        }
        SourceKind::HfDir => hf::import(path, opts, progress),
        SourceKind::Native => Err(invalid(format!("{} is already a native sprig model", path.display()))),
    }
}
