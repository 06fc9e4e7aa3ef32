//! Helpers shared by the C and JVM tests.

use std::path::{Path, PathBuf};

/// A directory holding a freshly built `libsprig.so` (and `libsprig.a`). `cargo test` builds this crate only as
/// an rlib for its tests, so the cdylib is built here with cargo itself, into a target directory of its own
/// (the outer `cargo test` holds the lock of the main one while tests run); incremental after the first time.
pub fn lib_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        // target/<profile>/deps/<test> -> target/ffi-host
        let target = exe.parent().unwrap().parent().unwrap().parent().unwrap().join("ffi-host");
        let out = std::process::Command::new(env!("CARGO"))
            .args(["build", "--locked", "-p", "sprig-ffi", "--lib", "--target-dir"])
            .arg(&target)
            .current_dir(std::env::var("CARGO_MANIFEST_DIR").expect("run by cargo"))
            .output()
            .expect("running cargo");
        assert!(out.status.success(), "building libsprig failed:\n{}", String::from_utf8_lossy(&out.stderr));
        let dir = target.join("debug");
        assert!(dir.join("libsprig.so").exists(), "{} has no libsprig.so", dir.display());
        dir
    })
    .clone()
}

pub fn fixtures() -> PathBuf {
    PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("run by cargo")).join("../../tests/data")
}

/// A small synthetic model with a ChatML template and a (random) MTP head, as a GGUF file.
pub fn chat_model(dir: &Path) -> PathBuf {
    use sprig_import::synth::{Arch, SynthMtp, SynthSpec};
    let p = dir.join("chat.gguf");
    // A context of 1024: a tools prompt in this byte-level vocabulary takes ~300 tokens.
    let spec = SynthSpec { context: 1024, mtp: Some(SynthMtp::Random), ..SynthSpec::tiny(Arch::Qwen2) };
    sprig_import::synth::write_gguf(&spec, &p).unwrap();
    p
}
