//! Opening a model from a native file (memory-mapped) or from any importable source (converted in memory).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sprig_format::ModelFile;
use sprig_import::{QuantChoice, SourceKind};

use crate::Result;

#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Tokenizer for llama2.c checkpoints.
    pub tokenizer: Option<PathBuf>,
    /// Precision when converting a non-native source on the fly.
    pub quant: QuantChoice,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { tokenizer: None, quant: QuantChoice::Keep }
    }
}

/// Opens `path`: a native `.safetensors` is memory-mapped; a `.gguf`, llama2.c `.bin` or HF directory is
/// converted in memory first.
pub fn open_model_file(path: &Path, opts: &LoadOptions) -> Result<Arc<ModelFile>> {
    if !path.exists() {
        return Err(crate::EngineError::Invalid(format!("{}: no such file or directory", path.display())));
    }
    match sprig_import::detect(path)? {
        SourceKind::Native => Ok(Arc::new(ModelFile::open(path)?)),
        _ => {
            let imported = sprig_import::import(path, opts.tokenizer.as_deref(), opts.quant, &mut |_, _| {})?;
            Ok(Arc::new(imported.writer.into_model_file()?))
        }
    }
}
