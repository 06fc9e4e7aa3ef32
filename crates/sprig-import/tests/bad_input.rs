//! Every importer turns corrupt input into a clear error (never a panic), and a mutation fuzzer hammers the
//! parsers with truncated and bit-flipped versions of valid files.

use std::path::PathBuf;

use rand::{Rng, SeedableRng};
use sprig_import::gguf::GgufFile;
use sprig_import::synth::{gguf_bytes, gguf_writer, write_hf_dir, Arch, GgufWriter, HfDtype, SynthSpec};
use sprig_import::{llama2c, ImportOptions, QuantChoice};

fn fixture(p: &str) -> PathBuf {
    PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("run by cargo")).join("../../tests/data").join(p)
}

fn synth_gguf() -> Vec<u8> {
    gguf_bytes(&SynthSpec { dim: 32, hidden_dim: 40, ..SynthSpec::tiny(Arch::Llama) }).unwrap()
}

fn gguf_err(b: Vec<u8>) -> String {
    match GgufFile::from_bytes(b)
        .and_then(|g| sprig_import::gguf::import_file(&g, &ImportOptions::quant(QuantChoice::Keep), &mut |_, _| {}))
    {
        Ok(_) => panic!("corrupt GGUF imported"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn gguf_truncated_anywhere() {
    let b = synth_gguf();
    for cut in (0..b.len()).step_by(97).chain([b.len() - 1]) {
        gguf_err(b[..cut].to_vec());
    }
}

#[test]
fn gguf_lies() {
    let b = synth_gguf();
    // Bad magic / version.
    let mut m = b.clone();
    m[0] = b'X';
    assert!(gguf_err(m).contains("magic"));
    let mut m = b.clone();
    m[4] = 9;
    assert!(gguf_err(m).contains("version 9"));
    // Tensor count far beyond the file.
    let mut m = b.clone();
    m[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(gguf_err(m).contains("implausible"));
    // A string length that runs past the end (the first key's length field).
    let mut m = b.clone();
    m[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(gguf_err(m).contains("past the end"));
    // Hand-built files: a tensor whose data lies outside the file, dims that overflow, an unknown type, an array
    // larger than the file, invalid UTF-8 in a key.
    let mut g = GgufWriter::new();
    g.str("general.architecture", "llama");
    g.tensor("t", &[4, 32], 0, vec![0; 16]); // claims 4*32 f32 but holds 16 bytes
    let e = gguf_err(g.to_bytes());
    assert!(e.contains("`t`") && e.contains("outside the file"), "{e}");
    let mut g = GgufWriter::new();
    g.tensor("huge", &[1 << 40, 1 << 40], 0, vec![]);
    assert!(gguf_err(g.to_bytes()).contains("`huge`"));
    let mut g = GgufWriter::new();
    g.tensor("odd", &[2, 32], 99, vec![0; 64]);
    assert!(gguf_err(g.to_bytes()).contains("unsupported type id 99"));
    let mut g = GgufWriter::new();
    g.tensor("ragged", &[2, 33], 2, vec![0; 64]);
    assert!(gguf_err(g.to_bytes()).contains("not a multiple"));
    let mut bad = GgufWriter::new();
    bad.str("k\u{7f}", "v");
    let mut bytes = bad.to_bytes();
    let pos = bytes.windows(2).position(|w| w == [b'k', 0x7f]).unwrap();
    bytes[pos + 1] = 0xff;
    assert!(gguf_err(bytes).contains("UTF-8"));
}

#[test]
fn gguf_sliding_window_pattern_is_read_or_refused() {
    // tiny(Llama): two layers, no window of its own; the test adds the window and a pattern.
    let spec = SynthSpec { dim: 32, hidden_dim: 40, ..SynthSpec::tiny(Arch::Llama) };
    let with = |add: &dyn Fn(&mut GgufWriter)| {
        let mut g = gguf_writer(&spec).unwrap();
        g.u32("llama.attention.sliding_window", 4);
        add(&mut g);
        g.to_bytes()
    };
    let key = "llama.attention.sliding_window_pattern";
    assert!(gguf_err(with(&|g| g.bools(key, &[true]))).contains("1 entries for 2 layers"));
    assert!(gguf_err(with(&|g| g.i32s(key, &[1, 0]))).contains("must be bools"));
    assert!(gguf_err(with(&|g| g.u32(key, 0))).contains("period > 0"));
    assert!(gguf_err(with(&|g| g.str(key, "every other"))).contains("period > 0"));
    // Read when valid: per-layer bools, true = sliding.
    let g = GgufFile::from_bytes(with(&|g| g.bools(key, &[true, false]))).unwrap();
    let c = sprig_import::gguf::config_from_gguf(&g).unwrap();
    assert_eq!(c.attention, [sprig_format::AttentionKind::Sliding { window: 4 }, sprig_format::AttentionKind::Global]);
    // A family whose rule needs a window (Gemma 3) refuses a file without one.
    let mut g = GgufWriter::new();
    g.str("general.architecture", "gemma3");
    for (k, v) in [("embedding_length", 32), ("block_count", 2), ("attention.head_count", 4)] {
        g.u32(&format!("gemma3.{k}"), v);
    }
    assert!(gguf_err(g.to_bytes()).contains("`gemma3.attention.sliding_window` is required"));
}

#[test]
fn gguf_missing_metadata_names_the_key() {
    let mut g = GgufWriter::new();
    g.str("general.architecture", "llama");
    assert!(gguf_err(g.to_bytes()).contains("llama.embedding_length"));
    let mut g = GgufWriter::new();
    g.str("general.architecture", "mamba");
    assert!(gguf_err(g.to_bytes()).contains("`mamba` is not supported"));
}

#[test]
fn llama2c_bad_inputs() {
    let model = std::fs::read(fixture("stories260K/stories260K.bin")).unwrap();
    let tok = std::fs::read(fixture("stories260K/tok512.bin")).unwrap();
    let imp = |m: &[u8], t: &[u8]| {
        llama2c::import_bytes(m, t, &ImportOptions::quant(QuantChoice::Keep), &mut |_, _| {})
            .err()
            .map(|e| e.to_string())
    };
    assert!(imp(&model, &tok).is_none(), "the real file imports");
    for cut in [0, 10, 27, 28, 1000, model.len() - 1] {
        assert!(imp(&model[..cut], &tok).is_some(), "truncated at {cut}");
    }
    for cut in [0, 3, 100, tok.len() - 1] {
        let e = imp(&model, &tok[..cut]).expect("truncated tokenizer");
        assert!(e.contains("tokenizer"), "{e}");
    }
    let mut m = model.clone();
    m[0..4].copy_from_slice(&(-5i32).to_le_bytes());
    assert!(imp(&m, &tok).unwrap().contains("dim"));
    let mut m = model.clone();
    m[8..12].copy_from_slice(&i32::MAX.to_le_bytes()); // n_layers
    assert!(imp(&m, &tok).unwrap().contains("n_layers"));
    let mut m = model.clone();
    m[100..104].copy_from_slice(&f32::NAN.to_le_bytes());
    assert!(imp(&m, &tok).unwrap().contains("NaN"));
    // A tokenizer piece that is not UTF-8.
    let mut t = tok.clone();
    t[4 + 8] = 0xff;
    assert!(imp(&model, &t).unwrap().contains("UTF-8"));
}

#[test]
fn hf_bad_inputs() {
    let dir = std::env::temp_dir().join(format!("sprig-bad-hf-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    write_hf_dir(&SynthSpec::tiny(Arch::Llama), &dir, HfDtype::F32, 1).unwrap();
    let imp = || {
        sprig_import::hf::import(&dir, &ImportOptions::quant(QuantChoice::Keep), &mut |_, _| {})
            .err()
            .map(|e| e.to_string())
    };
    assert!(imp().is_none());
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(dir.join("config.json"), cfg.replace("\"hidden_size\"", "\"hidden_sizzle\"")).unwrap();
    assert!(imp().unwrap().contains("hidden_size"));
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    assert!(imp().unwrap().contains("config.json"));
    // layer_types that do not cover the layers (tiny: two).
    let odd = cfg.replacen('{', r#"{"layer_types": ["sliding_attention"], "sliding_window": 4, "#, 1);
    std::fs::write(dir.join("config.json"), odd).unwrap();
    assert!(imp().unwrap().contains("1 layer_types for 2 layers"));
    std::fs::write(dir.join("config.json"), &cfg).unwrap();
    let w = std::fs::read(dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &w[..w.len() / 2]).unwrap();
    assert!(imp().unwrap().contains("model.safetensors"));
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert!(imp().unwrap().contains("no *.safetensors"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Random truncations and byte flips of valid files: every outcome is Ok or Err, never a panic.
#[test]
fn mutation_fuzz_parsers() {
    let gguf = synth_gguf();
    let moe = gguf_bytes(&SynthSpec { dim: 32, hidden_dim: 40, ..SynthSpec::tiny_moe(Arch::Qwen2Moe) }).unwrap();
    let mtp = gguf_bytes(&SynthSpec { mtp: Some(sprig_import::synth::SynthMtp::Random), ..SynthSpec::tiny(Arch::Llama) }).unwrap();
    let dir = std::env::temp_dir().join(format!("sprig-mutate-tok-{}", std::process::id()));
    sprig_import::synth::write_hf_dir(&SynthSpec::tiny(Arch::Qwen2), &dir, sprig_import::synth::HfDtype::F32, 1).unwrap();
    let tok_json = std::fs::read(dir.join("tokenizer.json")).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let model = std::fs::read(fixture("stories260K/stories260K.bin")).unwrap();
    let tok = std::fs::read(fixture("stories260K/tok512.bin")).unwrap();
    let imported = llama2c::import_bytes(&model, &tok, &ImportOptions::quant(QuantChoice::Q4), &mut |_, _| {}).unwrap();
    let native = imported.writer.to_bytes();
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    let mutate = |b: &[u8], rng: &mut rand::rngs::StdRng| -> Vec<u8> {
        let mut m = b.to_vec();
        // Mostly hit the headers, where the structure is.
        for _ in 0..rng.gen_range(1..8) {
            let hi = if rng.gen_bool(0.8) { m.len().min(4096) } else { m.len() };
            let i = rng.gen_range(0..hi);
            m[i] = rng.gen();
        }
        if rng.gen_bool(0.3) {
            m.truncate(rng.gen_range(0..m.len()));
        }
        m
    };
    for _ in 0..300 {
        let g = mutate(&gguf, &mut rng);
        if let Ok(f) = GgufFile::from_bytes(g) {
            let _ = sprig_import::gguf::import_file(&f, &ImportOptions::quant(QuantChoice::Keep), &mut |_, _| {});
        }
        if let Ok(f) = GgufFile::from_bytes(mutate(&moe, &mut rng)) {
            let _ = sprig_import::gguf::import_file(&f, &ImportOptions::quant(QuantChoice::Q4), &mut |_, _| {});
        }
        let n = mutate(&native, &mut rng);
        let _ = sprig_format::ModelFile::from_bytes(&n);
        let t = mutate(&tok, &mut rng);
        let _ = llama2c::import_bytes(&model, &t, &ImportOptions::quant(QuantChoice::Keep), &mut |_, _| {});
        if let Ok(f) = GgufFile::from_bytes(mutate(&mtp, &mut rng)) {
            let _ = sprig_import::gguf::import_file(&f, &ImportOptions::quant(QuantChoice::Keep), &mut |_, _| {});
        }
        // tokenizer.json: the fast reader, and the generic one it falls back to.
        let j = String::from_utf8_lossy(&mutate(&tok_json, &mut rng)).into_owned();
        let _ = sprig_tokenizer::hf::HfTokenizer::from_json(&j);
    }
}
