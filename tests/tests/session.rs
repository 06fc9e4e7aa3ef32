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
