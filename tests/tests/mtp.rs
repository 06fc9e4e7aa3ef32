//! Multi-token-prediction heads (GGUF `nextn` layers): imported from the file, drafting from the model's own
//! hidden states, exact (greedy output is plain decoding's token for token; sampled output keeps the
//! distribution), and wired right: a head built to predict what its model would (`SynthMtp::Mirror`) has most
//! of its drafts accepted, where a wrong position, token or cache would have them rejected.

use std::sync::Arc;

use sprig_backend::cpu::CpuBackend;
use sprig_engine::speculative::{MtpHead, SpecMode, SpecStats, Speculation};
use sprig_engine::{ChatMessage, Engine, Sampler, SamplingParams, Session};
use sprig_import::synth::{gguf_writer, write_gguf, Arch, SynthMtp, SynthSpec};
use sprig_import::QuantChoice;
use sprig_tests::*;

fn tmp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("sprig-mtp-{}-{name}", std::process::id()))
}

fn synthetic(spec: &SynthSpec, name: &str, quant: QuantChoice) -> Arc<Engine<CpuBackend>> {
    let path = tmp(name);
    write_gguf(spec, &path).unwrap();
    let e = Arc::new(cpu_engine(open(&path, None, quant), 2));
    let _ = std::fs::remove_file(path);
    e
}

fn mirror() -> SynthSpec {
    SynthSpec { n_layers: 1, mtp: Some(SynthMtp::Mirror), ..SynthSpec::tiny(Arch::Llama) }
}

const PROMPTS: [&str; 3] = ["the cat sat on the mat", "in the beginning", "aaaa bbbb the the then"];

/// Greedy generations with the MTP head drafting equal plain ones; the speculation's figures over them.
fn check_greedy(e: &Engine<CpuBackend>, what: &str, n: usize) -> SpecStats {
    let greedy = no_stops(e, SamplingParams::default());
    let mut total = SpecStats::default();
    for p in PROMPTS {
        let prompt = e.tokenizer.encode(p, true).unwrap();
        let plain = generate(e, &prompt, n, &greedy, None);
        let mut spec = Speculation::new(Box::new(MtpHead), SpecMode::On, 4);
        let got = generate(e, &prompt, n, &greedy, Some(&mut spec));
        assert_eq!(got, plain, "{what}: {p:?}");
        let s = spec.stats();
        assert!(s.passes > 0 && s.drafted > 0, "{what}: the head drafted: {s:?}");
        total.drafted += s.drafted;
        total.accepted += s.accepted;
        total.passes += s.passes;
    }
    total
}

#[test]
fn mtp_drafts_are_exact_and_a_mirror_head_is_mostly_right() {
    let m = synthetic(&mirror(), "mirror.gguf", QuantChoice::Keep);
    assert!(m.model.has_mtp());
    let s = check_greedy(&m, "mirror head", 96);
    // The mirror head misses only the model's first position in its attention: it agrees most of the time.
    assert!(s.acceptance() > 0.9, "mirror head acceptance {:.2}: {s:?}", s.acceptance());
    // The same model with a random head: exact still, and its drafts mostly wrong (the mirror's acceptance
    // comes from the head's wiring, not from the model repeating itself).
    let random = SynthSpec { mtp: Some(SynthMtp::Random), ..mirror() };
    let r = check_greedy(&synthetic(&random, "random.gguf", QuantChoice::Keep), "random head", 96);
    eprintln!("acceptance: mirror head {:.3} ({s:?}), random head {:.3} ({r:?})", s.acceptance(), r.acceptance());
    assert!(r.acceptance() < s.acceptance() / 2.0, "random {:.2} vs mirror {:.2}", r.acceptance(), s.acceptance());

    // Heads on deeper, hybrid and MoE models, quantized too: exact whatever the head proposes (sliding-window
    // rings wrap within the generation and are rolled back).
    let gemma =
        SynthSpec { n_layers: 4, sliding: Some((8, 2)), mtp: Some(SynthMtp::Random), ..SynthSpec::tiny(Arch::Gemma3) };
    check_greedy(&synthetic(&gemma, "gemma.gguf", QuantChoice::Keep), "gemma3 sliding window", 48);
    let moe = SynthSpec { mtp: Some(SynthMtp::Random), ..SynthSpec::tiny_moe(Arch::Qwen2Moe) };
    let moe = synthetic(&moe, "moe.gguf", QuantChoice::Q4);
    assert!(moe.model.config.mtp.as_ref().unwrap().moe, "the MoE model's head is MoE");
    check_greedy(&moe, "qwen2moe int4", 48);
}

/// A session of context `ctx` (`policy` when the conversation outgrows it) through `turns`, greedy, each reply
/// fed back: the replies, and the speculation's figures when `spec` drafts.
fn chat_turns(
    m: &Arc<Engine<CpuBackend>>,
    ctx: usize,
    policy: sprig_engine::ContextPolicy,
    turns: &[&str],
    max_new: usize,
    spec: Option<Speculation>,
) -> (Vec<String>, Option<SpecStats>) {
    let params = no_stops(m, SamplingParams::default());
    let mut s = Session::new(m.clone(), ctx).unwrap();
    s.set_context_policy(policy, 0);
    s.set_speculation(spec);
    let mut msgs = Vec::new();
    let mut replies = Vec::new();
    for t in turns {
        msgs.push(ChatMessage::new("user", t));
        let mut out = String::new();
        s.chat(&msgs, &params, max_new, |p| {
            out.push_str(p);
            true
        })
        .unwrap();
        msgs.push(ChatMessage::new("assistant", &out));
        replies.push(out);
    }
    (replies, s.speculation().map(|x| x.stats()))
}

#[test]
fn a_session_with_an_mtp_head_keeps_its_replies_across_turns() {
    let m = synthetic(&mirror(), "session.gguf", QuantChoice::Keep);
    let turns = ["the cat", "then the mat", "again"];
    let run = |spec| chat_turns(&m, 256, Default::default(), &turns, 24, spec);
    let (plain, _) = run(None);
    let (spec, stats) = run(Some(Speculation::new(Box::new(MtpHead), SpecMode::On, 4)));
    assert_eq!(spec, plain);
    let stats = stats.unwrap();
    assert!(stats.accepted > 0 && stats.passes > 0, "{stats:?}");
}

#[test]
fn sampled_mtp_speculation_keeps_the_distribution() {
    // As speculative.rs's test: 27 three-token continuations from the top 3, their exact probabilities from
    // the model's logits, 4,000 runs with the mirror head drafting (accepted and rejected) vs them.
    let t = synthetic(&SynthSpec { seed: 5, ..mirror() }, "sampled.gguf", QuantChoice::Keep);
    let mut spec = Speculation::new(Box::new(MtpHead), SpecMode::On, 2);
    check_sampled_speculation(&*t, "the cat", &mut spec);
    let s = spec.stats();
    assert!(s.accepted > 0 && s.accepted < s.drafted, "drafts both accepted and rejected: {s:?}");
}

#[test]
fn mtp_bad_input_is_a_clear_error() {
    // Drafting with an MTP head on a model without one.
    let plain = synthetic(&SynthSpec::tiny(Arch::Llama), "plain.gguf", QuantChoice::Keep);
    assert!(!plain.model.has_mtp());
    let mut st = plain.model.new_state(0).unwrap();
    let err = plain.model.enable_mtp(&mut st).unwrap_err().to_string();
    assert!(err.contains("no multi-token-prediction"), "{err}");
    let mut spec = Speculation::new(Box::new(MtpHead), SpecMode::On, 4);
    let mut sampler = Sampler::new(SamplingParams::default()).unwrap();
    let prompt = plain.tokenizer.encode("the cat", true).unwrap();
    let err =
        plain.generate_speculative(&mut st, &prompt, 8, &mut sampler, false, Some(&mut spec), |_| true).unwrap_err();
    assert!(err.to_string().contains("MTP"), "{err}");
    assert_eq!(st.pos, 0, "nothing ran");

    // Files: more nextn layers than blocks; a declared head whose tensors are missing; a malformed eh_proj.
    let import = |g: sprig_import::synth::GgufWriter, name: &str| {
        let path = tmp(name);
        g.write(&path).unwrap();
        let r = sprig_engine::open_model_file(&path, &Default::default())
            .and_then(|f| Engine::new(Arc::new(CpuBackend::new(1).unwrap()), f))
            .map(|_| ());
        let _ = std::fs::remove_file(path);
        r.unwrap_err().to_string()
    };
    let mut g = gguf_writer(&SynthSpec::tiny(Arch::Llama)).unwrap();
    g.u32("llama.nextn_predict_layers", 2);
    let err = import(g, "too-many.gguf");
    assert!(err.contains("nextn_predict_layers") && err.contains("leaves no layers"), "{err}");
    // block_count 2 with one nextn layer: layer 1 is read as the head, which has no nextn tensors.
    let mut g = gguf_writer(&SynthSpec::tiny(Arch::Llama)).unwrap();
    g.u32("llama.nextn_predict_layers", 1);
    let err = import(g, "missing.gguf");
    assert!(err.contains("blk.1.nextn.enorm.weight"), "{err}");
    let mut g = gguf_writer(&SynthSpec { mtp: Some(SynthMtp::Random), ..SynthSpec::tiny(Arch::Llama) }).unwrap();
    assert!(g.remove_tensor("blk.2.nextn.eh_proj.weight"));
    g.tensor_f32("blk.2.nextn.eh_proj.weight", &[64, 64], &vec![0.0; 64 * 64]);
    let err = import(g, "eh-proj.gguf");
    assert!(err.contains("eh_proj"), "{err}");
}

#[test]
fn constrained_chat_with_an_mtp_head_is_plain_constrained_decoding() {
    use sprig_engine::Constraint;
    // Drafts are cut to what the constraint allows before the verification pass; the second session starts
    // from the model's prefix cache, where the head's cache restarts.
    let m = synthetic(&mirror(), "constrained.gguf", QuantChoice::Keep);
    let p = SamplingParams { constraint: Some(Constraint::Regex("[^\\n<]{1,80}\\n".into())), ..Default::default() };
    let run = |spec: Option<Speculation>| {
        let mut s = Session::new(m.clone(), 256).unwrap();
        s.set_speculation(spec);
        let mut text = String::new();
        let r = s
            .chat(&[ChatMessage::new("user", "the cat")], &p, 48, |t| {
                text.push_str(t);
                true
            })
            .unwrap();
        (text, r)
    };
    let (plain, _) = run(None);
    let (text, r) = run(Some(Speculation::new(Box::new(MtpHead), SpecMode::On, 4)));
    assert_eq!(text, plain);
    let st = r.speculation.unwrap();
    assert!(st.drafted > 0 && st.accepted > 0, "{st:?}");
}

#[test]
fn an_mtp_head_follows_context_shifts_and_truncation() {
    use sprig_engine::ContextPolicy;
    // A conversation several times the context: each policy's replies with the head drafting equal those
    // without it (the head's cache restarts where the model's positions move).
    let m = synthetic(&mirror(), "shift.gguf", QuantChoice::Keep);
    let turns = ["the cat sat", "on the mat", "then", "the end", "again the cat", "in the"];
    for policy in [ContextPolicy::TruncateMiddle, ContextPolicy::Shift] {
        let run = |spec| chat_turns(&m, 96, policy, &turns, 20, spec);
        let (plain, _) = run(None);
        let (spec, stats) = run(Some(Speculation::new(Box::new(MtpHead), SpecMode::On, 4)));
        assert_eq!(spec, plain, "{policy:?}");
        let stats = stats.unwrap();
        assert!(stats.accepted > 0, "{policy:?}: {stats:?}");
    }
}
