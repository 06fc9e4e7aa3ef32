//! Helpers shared by the C and JVM tests.

use std::path::{Path, PathBuf};

/// `target/<profile>`, where cargo puts libsprig.so (this test binary lives in its `deps/`).
pub fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    assert!(dir.join("libsprig.so").exists(), "{} has no libsprig.so (cargo builds it with the crate)", dir.display());
    dir
}

pub fn shared_models() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models")
}

/// A small synthetic model with a ChatML template, as a GGUF file.
pub fn chat_model(dir: &Path) -> PathBuf {
    let p = dir.join("chat.gguf");
    sprig_import::synth::write_gguf(&sprig_import::synth::SynthSpec::tiny("qwen2"), &p).unwrap();
    p
}
