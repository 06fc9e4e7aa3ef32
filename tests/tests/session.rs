//! The session engine's request semantics: stop strings across token boundaries, cancellation during prefill
//! leaving a state the next call continues from, penalties over the conversation.

use std::sync::Arc;

use sprig_engine::generate::{StopReason, PREFILL_CHUNK};
use sprig_engine::{ChatMessage, SamplingParams, Session};
use sprig_import::QuantChoice;
use sprig_tests::*;

fn greedy() -> SamplingParams {
    SamplingParams { temperature: 0.0, ..Default::default() }
}

#[test]
fn stop_string_across_a_token_boundary() {
    let (model, tok) = stories260k();
    let e = Arc::new(cpu_engine(open(&model, Some(tok), QuantChoice::Keep), 2));
    let mut s = Session::new(e.clone(), 0).unwrap();
    let mut pieces = Vec::new();
    s.generate("Once upon a time", false, &greedy(), 60, |p| {
        if !p.is_empty() {
            pieces.push(p.to_string());
        }
        true
    })
    .unwrap();
    // A stop string made of the end of one piece and the start of the next.
    let i = (10..pieces.len() - 1).find(|&i| pieces[i].len() >= 2 && pieces[i + 1].len() >= 2).expect("two pieces");
    let (a, b) = (&pieces[i], &pieces[i + 1]);
    let stop = format!("{}{}", &a[a.len() - 2..], &b[..2]);
    let all: String = pieces.concat();
    let want = &all[..all.find(&stop).unwrap()];
    s.reset().unwrap();
    let mut got = String::new();
    let params = SamplingParams { stop: vec!["never seen".into(), stop.clone()], ..greedy() };
    let r = s
        .generate("Once upon a time", false, &params, 60, |p| {
            got.push_str(p);
            true
        })
        .unwrap();
    assert_eq!(r.stop, StopReason::StopString, "stop `{stop}`");
    assert_eq!(got, want, "stop `{stop}`");
    // A stop string that never comes changes nothing, the held-back text included.
    s.reset().unwrap();
    let mut again = String::new();
    let never = SamplingParams { stop: vec![format!("{stop}~")], ..greedy() };
    s.generate("Once upon a time", false, &never, 60, |p| {
        again.push_str(p);
        true
    })
    .unwrap();
    assert_eq!(again, all);
}

#[test]
fn cancel_during_prefill_then_chat_equals_a_fresh_run() {
    let e = Arc::new(cpu_engine(open(&registry_model("smollm2-135m-instruct"), None, QuantChoice::Keep), 2));
    // A user turn long enough for two prefill chunks.
    let long: String = (0..140).map(|i| format!("item {i}, ")).collect();
    let turns = vec![ChatMessage::new("user", &format!("Here is a list: {long} What is the first item?"))];
    let prompt = e.chat_tokens(&turns).unwrap();
    assert!(prompt.len() > PREFILL_CHUNK + 16, "{} tokens", prompt.len());

    let mut cancelled = Session::new(e.clone(), 2048).unwrap();
    let mut polls = 0;
    let r = cancelled
        .chat(&turns, &greedy(), 8, |p| {
            polls += 1;
            // The first poll comes before the first chunk, the second after it: cancel there.
            !(p.is_empty() && polls == 2)
        })
        .unwrap();
    assert_eq!((r.stop, r.prompt_tokens, r.generated.len()), (StopReason::Cancelled, PREFILL_CHUNK, 0));
    assert_eq!(cancelled.tokens(), &prompt[..PREFILL_CHUNK], "the session holds exactly the processed tokens");
    assert_eq!(cancelled.state.pos, PREFILL_CHUNK);

    let run = |s: &mut Session<_>| {
        let mut text = String::new();
        let r = s
            .chat(&turns, &greedy(), 12, |p| {
                text.push_str(p);
                true
            })
            .unwrap();
        (text, r)
    };
    let (resumed, r1) = run(&mut cancelled);
    assert_eq!(r1.prompt_tokens, prompt.len() - PREFILL_CHUNK, "only the rest of the prompt ran");
    let mut fresh = Session::new(e.clone(), 2048).unwrap();
    let (want, _) = run(&mut fresh);
    assert_eq!(resumed, want);
    assert_eq!(cancelled.tokens(), fresh.tokens());
}

#[test]
fn penalties_see_the_conversation() {
    // A strong frequency penalty on a story that repeats itself greedily changes the continuation, and it
    // counts the earlier turn: a second request continuing the same session differs from one without the
    // penalty window.
    let (model, tok) = stories260k();
    let e = Arc::new(cpu_engine(open(&model, Some(tok), QuantChoice::Keep), 2));
    let text = |params: &SamplingParams| {
        let mut s = Session::new(e.clone(), 0).unwrap();
        let mut out = String::new();
        s.generate("Once upon a time", false, params, 80, |p| {
            out.push_str(p);
            true
        })
        .unwrap();
        out
    };
    let plain = text(&greedy());
    let penalised = text(&SamplingParams { frequency_penalty: 2.0, presence_penalty: 1.0, ..greedy() });
    assert_ne!(plain, penalised);
    // A window of 0 turns the penalties off.
    assert_eq!(text(&SamplingParams { frequency_penalty: 2.0, penalty_last_n: 0, ..greedy() }), plain);
}

fn tmp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("sprig-session-{}-{name}", std::process::id()))
}

#[test]
fn saved_session_continues_exactly_and_bad_files_are_refused() {
    let e = Arc::new(cpu_engine(open(&registry_model("smollm2-135m-instruct"), None, QuantChoice::Keep), 2));
    // Sampling, so the restored random stream matters too.
    let params = SamplingParams { temperature: 0.8, seed: 4, ..Default::default() };
    let turn = |s: &mut Session<_>, messages: &[ChatMessage]| {
        let mut text = String::new();
        s.chat(messages, &params, 24, |p| {
            text.push_str(p);
            true
        })
        .unwrap();
        text
    };
    let mut a = Session::new(e.clone(), 1024).unwrap();
    turn(&mut a, &[ChatMessage::new("user", "Name three colours.")]);
    let path = tmp("a.session");
    a.save(&path).unwrap();
    let mut second: Vec<ChatMessage> = a.messages().to_vec();
    second.push(ChatMessage::new("user", "And three animals?"));
    let want = turn(&mut a, &second);

    let mut b = Session::new(e.clone(), 1024).unwrap();
    b.load(&path).unwrap();
    assert_eq!(b.messages(), &second[..second.len() - 1]);
    let got = turn(&mut b, &second);
    assert_eq!(got, want, "the restored session continues as the original did");
    assert_eq!(a.tokens(), b.tokens());

    // Damaged, truncated, another model's, longer than the context: refused, and the session is left fresh.
    let bytes = std::fs::read(&path).unwrap();
    let mut flipped = bytes.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 1;
    let bad = tmp("bad.session");
    let (model, tok) = stories260k();
    let other = Arc::new(cpu_engine(open(&model, Some(tok), QuantChoice::Keep), 2));
    let mut o = Session::new(other, 0).unwrap();
    o.generate("Once upon a time", false, &greedy(), 8, |_| true).unwrap();
    let other_path = tmp("other.session");
    o.save(&other_path).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("a flipped bit", flipped, "checksum"),
        ("a truncated file", bytes[..bytes.len() - 100].to_vec(), "checksum"),
        ("another model's", std::fs::read(&other_path).unwrap(), "another model"),
        ("not a session", b"GGUF and more bytes than that".repeat(4), "not a sprig session"),
    ];
    for (what, data, msg) in cases {
        std::fs::write(&bad, data).unwrap();
        let mut s = Session::new(e.clone(), 1024).unwrap();
        turn(&mut s, &[ChatMessage::new("user", "Hi")]);
        let err = s.load(&bad).unwrap_err().to_string();
        assert!(err.contains(msg), "{what}: {err}");
        assert_eq!((s.state.pos, s.tokens().len(), s.messages().len()), (0, 0, 0), "{what}: not left fresh");
    }
    let mut small = Session::new(e.clone(), 16).unwrap();
    let err = small.load(&path).unwrap_err().to_string();
    assert!(err.contains("context"), "{err}");
    for p in [path, bad, other_path] {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn sliding_window_session_restores_its_rings() {
    // A Gemma 3-shaped model (five sliding layers of window 8 per global one): the saved rings hold only the
    // window, and the restored session continues exactly.
    use sprig_import::synth::{write_gguf, Arch, SynthSpec};
    let spec = SynthSpec { n_layers: 6, ..SynthSpec::tiny(Arch::Gemma3) };
    let gguf = tmp("gemma.gguf");
    write_gguf(&spec, &gguf).unwrap();
    let e = Arc::new(cpu_engine(open(&gguf, None, QuantChoice::Keep), 2));
    assert!(e.model.config.attention.iter().any(|a| *a != sprig_format::AttentionKind::Global));
    let p = SamplingParams { temperature: 0.9, seed: 2, ..Default::default() };
    let run = |s: &mut Session<_>, text: &str| {
        let mut out = Vec::new();
        s.generate(text, false, &p, 20, |_| true).map(|r| out.extend(r.generated)).unwrap();
        out
    };
    let mut a = Session::new(e.clone(), 128).unwrap();
    run(&mut a, "the cat sat on the mat and then the cat sat again");
    let path = tmp("gemma.session");
    a.save(&path).unwrap();
    let want = run(&mut a, " then");
    let mut b = Session::new(e.clone(), 128).unwrap();
    b.load(&path).unwrap();
    assert_eq!(run(&mut b, " then"), want);
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(gguf);
}
