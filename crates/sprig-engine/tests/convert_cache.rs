//! `open_model_file` on a large non-native source converts it once into the cache directory and maps the
//! converted file afterwards; a changed source converts again; a damaged cached file is never trusted. (Its
//! own test binary: it sets SPRIG_CACHE for the process.)

use std::path::PathBuf;

use sprig_engine::load::{converted_cache_path, open_model_file, LoadOptions, CACHE_CONVERTED_FROM};
use sprig_import::synth::{Arch, write_gguf, SynthSpec};

fn converted(cache: &std::path::Path) -> Vec<PathBuf> {
    match std::fs::read_dir(cache.join("converted")) {
        Ok(d) => d.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn large_sources_are_converted_once_and_cached() {
    let dir = std::env::temp_dir().join(format!("sprig-convert-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cache = dir.join("cache");
    std::env::set_var("SPRIG_CACHE", &cache);
    std::env::remove_var("SPRIG_NO_CONVERT_CACHE");
    let opts = LoadOptions::default();

    // Small sources are converted in memory every time.
    let small = dir.join("small.gguf");
    write_gguf(&SynthSpec::tiny(Arch::Llama), &small).unwrap();
    assert!(std::fs::metadata(&small).unwrap().len() < CACHE_CONVERTED_FROM);
    open_model_file(&small, &opts).unwrap();
    assert!(converted(&cache).is_empty());

    // A large one (f32 weights, ~70 MB) is converted once.
    let big = dir.join("big.gguf");
    let spec = SynthSpec { dim: 512, hidden_dim: 1536, n_layers: 4, vocab: Some(4000), ..SynthSpec::tiny(Arch::Llama) };
    write_gguf(&spec, &big).unwrap();
    assert!(std::fs::metadata(&big).unwrap().len() >= CACHE_CONVERTED_FROM);
    let first = open_model_file(&big, &opts).unwrap();
    let files = converted(&cache);
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(Some(files[0].clone()), converted_cache_path(&big, &opts, &cache));
    let stamp = std::fs::metadata(&files[0]).unwrap().modified().unwrap();
    let second = open_model_file(&big, &opts).unwrap();
    assert_eq!(std::fs::metadata(&files[0]).unwrap().modified().unwrap(), stamp, "converted again");
    assert_eq!(first.config, second.config);
    assert_eq!(first.tensor_names().count(), second.tensor_names().count());

    // Another precision is another entry.
    let q4 = LoadOptions { quant: sprig_import::QuantChoice::Q4, ..LoadOptions::default() };
    open_model_file(&big, &q4).unwrap();
    assert_eq!(converted(&cache).len(), 2);

    // A damaged cached file is replaced, not mapped.
    std::fs::write(&files[0], b"not a model").unwrap();
    let again = open_model_file(&big, &opts).unwrap();
    assert_eq!(again.config, first.config);
    assert!(std::fs::metadata(&files[0]).unwrap().len() > 1000, "the damaged entry was not rebuilt");

    // A changed source (new contents, new mtime) gets a new entry.
    std::thread::sleep(std::time::Duration::from_millis(20));
    write_gguf(&SynthSpec { seed: 7, ..spec }, &big).unwrap();
    let key = converted_cache_path(&big, &opts, &cache).unwrap();
    assert_ne!(key, files[0]);
    open_model_file(&big, &opts).unwrap();
    assert!(key.exists());

    // Turned off: nothing new is written.
    std::env::set_var("SPRIG_NO_CONVERT_CACHE", "1");
    assert_eq!(converted_cache_path(&big, &opts, &cache), None);
    let _ = std::fs::remove_dir_all(&dir);
}
