//! stories260K against llama2.c's own output.
//!
//! `golden_once_upon_a_time_steps256.txt` was produced by llama2.c `run.c` (commit 350e04fe), built with
//! `gcc -Ofast -march=native -fopenmp run.c -lm` and run as
//! `./run stories260K.bin -z tok512.bin -t 0.0 -n 256 -i "Once upon a time"` (see tests/data/README.md).
//! run.c prints the prompt (without BOS) and stops after 256 positions, i.e. 256 - 4 = 252 generated tokens,
//! then a newline.

use sprig_import::QuantChoice;
use sprig_tests::*;

#[test]
fn stories260k_greedy_matches_llama2c_on_both_headers() {
    let (model, tok) = stories260k();
    let golden = std::fs::read_to_string(fixtures().join("stories260K/golden_once_upon_a_time_steps256.txt")).unwrap();
    for file in [model.clone(), model.with_file_name("stories260K.v1.bin")] {
        for threads in [1, 2] {
            let e = cpu_engine(open(&file, Some(tok.clone()), QuantChoice::Keep), threads);
            assert_eq!(stories260k_greedy_text(&e), golden, "{} with {threads} threads", file.display());
        }
    }
}

#[test]
fn stories260k_reference_backend_matches_llama2c() {
    let (model, tok) = stories260k();
    let golden = std::fs::read_to_string(fixtures().join("stories260K/golden_once_upon_a_time_steps256.txt")).unwrap();
    let e = reference_engine(open(&model, Some(tok), QuantChoice::Keep));
    assert_eq!(stories260k_greedy_text(&e), golden);
}

/// llama2.c files with a separate classifier (legacy: negative vocab size; v1: shared flag 0) and `wcls` appended.
/// With `wcls` equal to the embedding the model is unchanged, so the golden text must come out again.
#[test]
fn stories260k_unshared_classifier_variants() {
    let (model, tok) = stories260k();
    let golden = std::fs::read_to_string(fixtures().join("stories260K/golden_once_upon_a_time_steps256.txt")).unwrap();
    let (dim, vocab) = (64usize, 512usize);
    let legacy = std::fs::read(&model).unwrap();
    let emb = legacy[28..28 + vocab * dim * 4].to_vec();
    let mut unshared = legacy.clone();
    unshared[20..24].copy_from_slice(&(-(vocab as i32)).to_le_bytes());
    unshared.extend(&emb);
    let mut v1 = std::fs::read(model.with_file_name("stories260K.v1.bin")).unwrap();
    v1[8 + 28] = 0; // shared_classifier flag
    v1.extend(&emb);
    for (name, bytes) in [("legacy", unshared), ("v1", v1)] {
        let path = std::env::temp_dir().join(format!("sprig-unshared-{name}-{}.bin", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        let f = open(&path, Some(tok.clone()), QuantChoice::Keep);
        assert!(!f.config.tied_embeddings && f.contains("output.weight"), "{name}");
        assert_eq!(stories260k_greedy_text(&cpu_engine(f, 2)), golden, "{name}");
        let _ = std::fs::remove_file(&path);
    }
}
