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

/// Sources at least this big are converted once and the native file is cached (see [`converted_cache_path`]);
/// smaller ones convert in milliseconds and are converted in memory each time.
pub const CACHE_CONVERTED_FROM: u64 = 32 << 20;

/// Opens `path`: a native `.safetensors` is memory-mapped; a `.gguf`, llama2.c `.bin` or HF directory is
/// converted first — in memory, or, for a source file of at least [`CACHE_CONVERTED_FROM`] bytes, once into the
/// cache directory, so that later starts only map the converted file (`SPRIG_NO_CONVERT_CACHE=1` turns that
/// off; a cache that cannot be written falls back to converting in memory).
pub fn open_model_file(path: &Path, opts: &LoadOptions) -> Result<Arc<ModelFile>> {
    if !path.exists() {
        return Err(crate::EngineError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        });
    }
    match sprig_import::detect(path)? {
        SourceKind::Native => Ok(Arc::new(ModelFile::open(path)?)),
        _ => {
            let cached = converted_cache_path(path, opts, &crate::registry::cache_dir());
            if let Some(c) = &cached {
                match ModelFile::open(c) {
                    Ok(f) => return Ok(Arc::new(f)),
                    // Missing, or damaged (never trusted): converted again below.
                    Err(_) => {
                        let _ = std::fs::remove_file(c);
                    }
                }
            }
            let imported = sprig_import::import(path, opts.tokenizer.as_deref(), opts.quant, &mut |_, _| {})?;
            if let Some(c) = cached {
                // Written aside and renamed: a concurrent start never maps half a file.
                static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let tmp = c.with_extension(format!("partial.{}.{n}", std::process::id()));
                let written = std::fs::create_dir_all(c.parent().expect("in a directory"))
                    .and_then(|_| imported.writer.write(&tmp).map_err(std::io::Error::other))
                    .and_then(|_| std::fs::rename(&tmp, &c));
                if written.is_ok() {
                    if let Ok(f) = ModelFile::open(&c) {
                        return Ok(Arc::new(f));
                    }
                }
                let _ = std::fs::remove_file(&tmp);
            }
            Ok(Arc::new(imported.writer.into_model_file()?))
        }
    }
}

/// Where the converted form of `path` (with `opts`) is cached under `cache`: keyed by sprig's version and
/// converter revision, the source's size, modification time and a hash of its first MiB (the GGUF header and
/// metadata), the tokenizer file likewise, and the precision. `None` for directories, small files, or with `SPRIG_NO_CONVERT_CACHE=1`.
pub fn converted_cache_path(path: &Path, opts: &LoadOptions, cache: &Path) -> Option<PathBuf> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    if std::env::var("SPRIG_NO_CONVERT_CACHE").is_ok_and(|v| !v.is_empty() && v != "0") {
        return None;
    }
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() || meta.len() < CACHE_CONVERTED_FROM {
        return None;
    }
    let stamp = |p: &Path| -> Option<String> {
        let m = std::fs::metadata(p).ok()?;
        let t = m.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?;
        let mut head = Vec::new();
        std::fs::File::open(p).ok()?.take(1 << 20).read_to_end(&mut head).ok()?;
        Some(format!("{} {} {}", m.len(), t.as_nanos(), hex::encode(Sha256::digest(&head))))
    };
    let tokenizer = match &opts.tokenizer {
        Some(t) => stamp(t)?,
        None => String::new(),
    };
    let key = format!(
        "sprig {} r{}; source {}; tokenizer {tokenizer}; quant {:?}",
        env!("CARGO_PKG_VERSION"),
        sprig_import::CONVERTER_REVISION,
        stamp(path)?,
        opts.quant
    );
    let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let h = hex::encode(Sha256::digest(key.as_bytes()));
    Some(cache.join("converted").join(format!("{name}-{}.safetensors", &h[..16])))
}
