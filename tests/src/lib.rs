//! Shared fixtures of the end-to-end tests: paths of the committed fixtures (tests/data) and the registry models (pulled into
//! the cache on first use, like `sprig pull`).
#![forbid(unsafe_code)]

pub mod teacher_stub;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use sprig_backend::cpu::CpuBackend;
use sprig_burn::BurnBackend;
use sprig_engine::{open_model_file, registry, Engine, LoadOptions};
use sprig_format::ModelFile;
use sprig_import::QuantChoice;

/// The committed test fixtures (`tests/data`, see its README for provenance). The directory is read when the
/// test runs, not when it is compiled: a test binary that cargo reuses from another clone through a shared
/// target directory (as `.ci/run` does) must still read this checkout.
pub fn fixtures() -> PathBuf {
    PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("run by cargo")).join("data")
}

/// The perplexity of `e` on `tests/data/apache-2.0.txt` in 256-token chunks: the protocol of
/// `llama-perplexity -f tests/data/apache-2.0.txt --ctx-size 256`, against which the real models are compared.
pub fn apache_perplexity(e: &Engine<CpuBackend>) -> sprig_engine::eval::PerplexityReport {
    let text = std::fs::read_to_string(fixtures().join("apache-2.0.txt")).unwrap();
    sprig_engine::eval::perplexity::<_, CpuBackend>(e, None, &text, 256, None, |_, _, _| {}).unwrap()
}

pub fn stories260k() -> (PathBuf, PathBuf) {
    let d = fixtures().join("stories260K");
    (d.join("stories260K.bin"), d.join("tok512.bin"))
}

static PULL: Mutex<()> = Mutex::new(());

/// The native file of a registry model, fetched and converted on first use.
pub fn registry_model(name: &str) -> PathBuf {
    let _g = PULL.lock().unwrap_or_else(|e| e.into_inner());
    let e = registry::find(name).expect("known model");
    registry::pull(&e, &mut |s| eprintln!("{s}")).unwrap_or_else(|err| panic!("pulling {name}: {err}"))
}

/// The GGUF source of a registry model.
pub fn registry_source(name: &str) -> PathBuf {
    let _g = PULL.lock().unwrap_or_else(|e| e.into_inner());
    let e = registry::find(name).expect("known model");
    registry::fetch_source(&e, &mut |s| eprintln!("{s}")).unwrap_or_else(|err| panic!("fetching {name}: {err}"))
}

pub fn open(path: &std::path::Path, tokenizer: Option<PathBuf>, quant: QuantChoice) -> Arc<ModelFile> {
    open_model_file(path, &LoadOptions { tokenizer, quant }).unwrap()
}

pub fn cpu_engine(file: Arc<ModelFile>, threads: usize) -> Engine<CpuBackend> {
    Engine::new(Arc::new(CpuBackend::new(threads).unwrap()), file).unwrap()
}

pub fn reference_engine(file: Arc<ModelFile>) -> Engine<BurnBackend> {
    Engine::new(Arc::new(BurnBackend::new()), file).unwrap()
}

/// Logits of a prefill of `prompt` (every position) then one decode step per token of `decode`, concatenated,
/// and the sequence's state (a context of 64).
pub fn prefill_then_decode<B: sprig_backend::Backend>(
    e: &Engine<B>,
    prompt: &[u32],
    decode: &[u32],
) -> (Vec<f32>, sprig_models::State<B>) {
    let mut st = e.model.new_state(64).unwrap();
    let (mut all, mut l) = (Vec::new(), Vec::new());
    e.model.forward(&mut st, prompt, sprig_models::Logits::All).unwrap();
    e.model.read_logits(&st, &mut l).unwrap();
    all.extend(&l);
    for &t in decode {
        e.model.forward(&mut st, &[t], sprig_models::Logits::Last).unwrap();
        e.model.read_logits(&st, &mut l).unwrap();
        all.extend(&l);
    }
    (all, st)
}

/// Largest |a-b| relative to max |b|.
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max) / scale
}

pub fn argmax(x: &[f32]) -> usize {
    sprig_engine::sampler::argmax(x) as usize
}

/// stories260K's greedy continuation of "Once upon a time" to 256 positions, as llama2.c `run.c` prints it
/// (`golden_once_upon_a_time_steps256.txt`: no BOS, a final newline).
pub fn stories260k_greedy_text<B: sprig_backend::Backend>(e: &Engine<B>) -> String {
    let prompt = e.tokenizer.encode_prompt("Once upon a time").unwrap();
    assert_eq!(prompt, [1, 403, 407, 261, 378]);
    let mut st = e.model.new_state(0).unwrap();
    let mut s =
        sprig_engine::Sampler::new(sprig_engine::SamplingParams { temperature: 0.0, ..Default::default() }).unwrap();
    let mut text = String::new();
    e.generate(&mut st, &prompt, 256 - (prompt.len() - 1), &mut s, true, |t| {
        text.push_str(t);
        true
    })
    .unwrap();
    text + "\n"
}

/// `n` tokens generated after `prompt` on a fresh state with `p`, speculating with `spec` when given.
pub fn generate<B: sprig_backend::Backend>(
    e: &Engine<B>,
    prompt: &[u32],
    n: usize,
    p: &sprig_engine::SamplingParams,
    spec: Option<&mut sprig_engine::speculative::Speculation>,
) -> Vec<u32> {
    let mut st = e.model.new_state(0).unwrap();
    let mut sampler = sprig_engine::Sampler::new(p.clone()).unwrap();
    e.generate_speculative(&mut st, prompt, n, &mut sampler, false, spec, |_| true).unwrap().generated
}

/// Speculative sampling keeps the distribution: 4,000 runs of 3 tokens after `prompt` (top 3 at temperature 1,
/// stop tokens banned) drafting with `spec`, their 27 paths' frequencies against the exact probabilities from
/// the model's own logits (chi-square with 26 degrees of freedom, below its 99.9th percentile 54.05).
pub fn check_sampled_speculation<B: sprig_backend::Backend>(
    e: &Engine<B>,
    prompt: &str,
    spec: &mut sprig_engine::speculative::Speculation,
) {
    let params = no_stops(e, sprig_engine::SamplingParams { temperature: 1.0, top_k: 3, top_p: 1.0, ..Default::default() });
    let prompt = e.tokenizer.encode(prompt, true).unwrap();
    let banned: Vec<u32> = params.logit_bias.iter().map(|b| b.0).collect();
    let next = |ctx: &[u32]| -> Vec<(u32, f64)> {
        let mut st = e.model.new_state(0).unwrap();
        e.model.forward(&mut st, ctx, sprig_models::Logits::Last).unwrap();
        let mut l = Vec::new();
        e.model.read_logits(&st, &mut l).unwrap();
        let mut c: Vec<(u32, f32)> =
            l.iter().enumerate().map(|(i, &x)| (i as u32, x)).filter(|(i, _)| !banned.contains(i)).collect();
        c.sort_by(|a, b| b.1.total_cmp(&a.1));
        c.truncate(3);
        let z: f64 = c.iter().map(|x| (x.1 as f64).exp()).sum();
        c.iter().map(|&(i, x)| (i, (x as f64).exp() / z)).collect()
    };
    let mut exact: Vec<(Vec<u32>, f64)> = Vec::new();
    for (a, pa) in next(&prompt) {
        for (b, pb) in next(&[&prompt[..], &[a]].concat()) {
            for (c, pc) in next(&[&prompt[..], &[a, b]].concat()) {
                exact.push((vec![a, b, c], pa * pb * pc));
            }
        }
    }
    let n = 4000;
    let mut counts = vec![0usize; exact.len()];
    for seed in 0..n {
        let got = generate(e, &prompt, 3, &sprig_engine::SamplingParams { seed, ..params.clone() }, Some(&mut *spec));
        let i = exact.iter().position(|(s, _)| *s == got).unwrap_or_else(|| panic!("{got:?} is not a top-3 path"));
        counts[i] += 1;
    }
    let n = n as f64;
    let chi: f64 = exact.iter().zip(&counts).map(|((_, p), &c)| (c as f64 - p * n).powi(2) / (p * n)).sum();
    assert!(chi < 54.05, "chi-square {chi:.1}: {counts:?}");
}

/// `p` with the model's stop tokens banned, so that random models run to the length.
pub fn no_stops<B: sprig_backend::Backend>(e: &Engine<B>, p: sprig_engine::SamplingParams) -> sprig_engine::SamplingParams {
    let stops = (0..e.model.config.vocab_size as u32).filter(|&t| e.tokenizer.is_stop(t));
    sprig_engine::SamplingParams { logit_bias: stops.map(|t| (t, f32::NEG_INFINITY)).collect(), ..p }
}
