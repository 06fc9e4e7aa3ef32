//! Speculative decoding is exact: greedy output is plain decoding's token for token (with drafts accepted and
//! rejected, on global and sliding-window models whose rings must be rolled back), and sampled output keeps
//! the sampler's distribution (frequencies of whole continuations against their exact probabilities).

use std::sync::Arc;

use sprig_backend::cpu::CpuBackend;
use sprig_engine::speculative::{DraftModel, Drafter, PromptLookup, SpecMode, Speculation};
use sprig_engine::{Engine, SamplingParams, Session};
use sprig_import::synth::{write_gguf, Arch, SynthSpec};
use sprig_import::QuantChoice;
use sprig_tests::*;

fn tmp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("sprig-spec-{}-{name}", std::process::id()))
}

fn synthetic(spec: SynthSpec, name: &str) -> Arc<Engine<CpuBackend>> {
    synthetic_pair(spec, name).0
}

/// A synthetic model as written (f32) and re-quantized to int4 (a draft that mostly agrees with it).
fn synthetic_pair(spec: SynthSpec, name: &str) -> (Arc<Engine<CpuBackend>>, Arc<Engine<CpuBackend>>) {
    let path = tmp(name);
    write_gguf(&spec, &path).unwrap();
    let e = Arc::new(cpu_engine(open(&path, None, QuantChoice::Keep), 2));
    let q = Arc::new(cpu_engine(open(&path, None, QuantChoice::Q4), 1));
    let _ = std::fs::remove_file(path);
    (e, q)
}

#[test]
fn greedy_speculation_is_plain_decoding_token_for_token() {
    let (model, tok) = stories260k();
    let target = Arc::new(cpu_engine(open(&model, Some(tok.clone()), QuantChoice::Keep), 2));
    // A draft of the same model at int4: mostly agrees, sometimes not.
    let draft = Arc::new(cpu_engine(open(&model, Some(tok), QuantChoice::Q4), 1));
    // Sliding-window models (window 8: rings wrap within the prompt) and a different one as the draft.
    let gemma = |seed| SynthSpec { n_layers: 6, sliding: Some((8, 3)), seed, ..SynthSpec::tiny(Arch::Gemma3) };
    let (g_target, g_draft) = (synthetic(gemma(1), "g1.gguf"), synthetic(gemma(2), "g2.gguf"));
    type Cpu = Arc<Engine<CpuBackend>>;
    let cases: Vec<(&str, Cpu, Cpu)> = vec![
        ("stories260K", target.clone(), draft),
        ("stories260K drafting for itself", target.clone(), target.clone()),
        ("sliding window", g_target.clone(), g_draft),
        ("sliding window drafting for itself", g_target.clone(), g_target),
    ];
    let prompts = ["Once upon a time", "The dog ran to the park and saw a big red ball. The dog ran to the park and", "Lily and Tom"];
    for (what, t, d) in cases {
        let greedy = no_stops(&t, SamplingParams::default());
        for p in prompts {
            let prompt = t.tokenizer.encode(p, true).unwrap();
            let plain = generate(&t, &prompt, 80, &greedy, None);
            let drafters: Vec<Box<dyn Drafter>> =
                vec![Box::new(DraftModel::new(d.clone(), &*t, 0).unwrap()), Box::new(PromptLookup::default())];
            for drafter in drafters {
                let name = drafter.name();
                let mut spec = Speculation::new(drafter, SpecMode::On, 6);
                let got = generate(&t, &prompt, 80, &greedy, Some(&mut spec));
                assert_eq!(got, plain, "{what}, {name}, {p:?}");
                let s = spec.stats();
                if name.starts_with("draft") {
                    assert!(s.passes > 0 && s.drafted > 0, "{what}: {s:?}");
                    if what.ends_with("itself") {
                        assert_eq!(s.accepted, s.drafted, "{what}: a model drafting for itself is always right");
                    }
                }
            }
        }
    }
}

#[test]
fn sessions_speculate_across_turns_with_the_same_replies() {
    let e = Arc::new(cpu_engine(open(&registry_model("smollm2-135m-instruct"), None, QuantChoice::Keep), 2));
    let turns = ["Repeat after me: the quick brown fox jumps over the lazy dog.", "Again, twice."];
    let run = |spec: Option<Speculation>| {
        let mut s = Session::new(e.clone(), 1024).unwrap();
        s.set_speculation(spec);
        let mut msgs = Vec::new();
        let mut replies = Vec::new();
        for t in turns {
            msgs.push(sprig_engine::ChatMessage::new("user", t));
            let mut out = String::new();
            let r = s
                .chat(&msgs, &SamplingParams::default(), 48, |p| {
                    out.push_str(p);
                    true
                })
                .unwrap();
            assert_eq!(r.speculation.is_some(), s.speculation().is_some());
            msgs.push(sprig_engine::ChatMessage::new("assistant", &out));
            replies.push(out);
        }
        (replies, s.speculation().map(|x| x.stats()))
    };
    let (plain, _) = run(None);
    let (spec, stats) = run(Some(Speculation::new(Box::new(PromptLookup::default()), SpecMode::On, 8)));
    assert_eq!(spec, plain);
    let stats = stats.unwrap();
    assert!(stats.accepted > 0, "repeating the prompt, lookup drafts are accepted: {stats:?}");
}

#[test]
fn sampled_speculation_keeps_the_distribution() {
    // Three tokens from the top 3 at each step: 27 continuations whose exact probabilities come from the
    // model's logits; 4,000 speculative runs (its int4 copy drafting greedily, so drafts are accepted and
    // rejected) must match them (chi-square, 26 degrees of freedom).
    let (t, d) = synthetic_pair(SynthSpec { seed: 5, ..SynthSpec::tiny(Arch::Llama) }, "l5.gguf");
    let mut spec = Speculation::new(Box::new(DraftModel::new(d, &*t, 0).unwrap()), SpecMode::On, 2);
    check_sampled_speculation(&*t, "abc", &mut spec);
    let s = spec.stats();
    assert!(s.accepted > 0 && s.accepted < s.drafted, "drafts both accepted and rejected: {s:?}");
}

#[test]
fn a_draft_model_with_another_tokenizer_is_refused() {
    let target = synthetic(SynthSpec::tiny(Arch::Qwen2), "tok-a.gguf");
    // Same architecture and shapes, a vocabulary of another size: drafts would be other tokens.
    let other = synthetic(SynthSpec { vocab: Some(300), ..SynthSpec::tiny(Arch::Qwen2) }, "tok-b.gguf");
    assert_ne!(target.tokenizer.vocab_size(), other.tokenizer.vocab_size());
    match sprig_engine::speculative::DraftModel::new(other.clone(), &target, 0) {
        Err(e) => assert!(e.to_string().contains("tokenizer differs"), "{e}"),
        Ok(_) => panic!("a draft model with another vocabulary was accepted"),
    }
    // Its own tokenizer (the same model) is accepted.
    assert!(sprig_engine::speculative::DraftModel::new(target.clone(), &target, 0).is_ok());
}
