//! The cloud-teacher side of the bridge against a stub OpenAI-compatible server (127.0.0.1, an ephemeral
//! port, stopped with the test): a remote teacher's scores equal the local computation, escalation streams the
//! teacher's answer, and an offline / slow / failing / malformed / broken teacher leaves the turn to the student
//! with the reason recorded — never lost, never hung.

use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use sprig_backend::cpu::CpuBackend;
use sprig_engine::distill::{kl_top_k, score_reply, score_reply_with, TeacherPosition};
use sprig_engine::escalate::{self, AnsweredBy, Escalation, EscalationPolicy, Turn};
use sprig_engine::{run_batch, BatchRequest, ChatMessage, Engine, EngineError, SamplingParams, Session, TokenLogprob};
use sprig_import::synth::{write_gguf, Arch, SynthSpec};
use sprig_import::QuantChoice;
use sprig_remote::{Endpoint, RemoteError};
use sprig_tests::teacher_stub::{Mode, Stub, TEACHER_TEXT};
use sprig_tests::*;

fn synth_engine(seed: u64, quant: QuantChoice) -> Arc<Engine<CpuBackend>> {
    // Tests run at once: each file its own name.
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let path = std::env::temp_dir().join(format!("sprig-escalation-{}-{seed}-{n}.gguf", std::process::id()));
    write_gguf(&SynthSpec { seed, ..SynthSpec::tiny(Arch::Llama) }, &path).unwrap();
    let e = Arc::new(cpu_engine(open(&path, None, quant), 1));
    let _ = std::fs::remove_file(&path);
    e
}

/// Sampled, stop tokens banned: the random model answers at length.
fn long_answers(e: &Engine<CpuBackend>, seed: u64) -> SamplingParams {
    let stops = (0..e.model.config.vocab_size as u32).filter(|&t| e.tokenizer.is_stop(t));
    SamplingParams {
        temperature: 0.9,
        seed,
        logit_bias: stops.map(|t| (t, f32::NEG_INFINITY)).collect(),
        ..Default::default()
    }
}

#[test]
fn remote_teacher_scores_equal_the_local_computation() {
    let student = synth_engine(3, QuantChoice::Keep);
    let teacher = synth_engine(5, QuantChoice::Keep);
    let t = teacher.clone();
    let stub = Stub::start(Some(Arc::new(move |ids: &[u32], k: usize| t.prompt_logprobs(ids, k).unwrap())));
    let ep = stub.endpoint(Duration::from_secs(30));
    let v = student.model.config.vocab_size;
    let params = long_answers(&student, 7);
    let local = score_reply(&student, &*teacher, "abc", &params, 20, 0).unwrap();
    let mut full = |seq: &[u32]| ep.score(seq, v).map_err(|e| EngineError::Eval(e.to_string()));
    let remote = score_reply_with(&student, &mut full, "abc", &params, 20, 0).unwrap();
    assert_eq!(remote.tokens.len(), 20);
    assert!(local.mean_kl() > 0.0);
    // The whole vocabulary as "top k": the same figures as with both models here.
    for (l, r) in local.tokens.iter().zip(&remote.tokens) {
        assert_eq!(l.token, r.token);
        assert!((l.kl - r.kl).abs() <= 1e-4 * (1.0 + l.kl), "KL {} local vs {} remote", l.kl, r.kl);
        assert!((l.teacher_nll - r.teacher_nll).abs() <= 1e-4 * (1.0 + l.teacher_nll));
        assert_eq!(l.greedy_agree, r.greedy_agree);
    }
    // Top 5: the tail folded into one bucket — a lower bound of the full KL, equal to the bucketed KL of the
    // teacher's full distribution.
    let mut top5 = |seq: &[u32]| ep.score(seq, 5).map_err(|e| EngineError::Eval(e.to_string()));
    let coarse = score_reply_with(&student, &mut top5, "abc", &params, 20, 0).unwrap();
    let seq: Vec<u32> = local.prompt.iter().copied().chain(local.tokens.iter().map(|t| t.token)).collect();
    let tfull = teacher.prompt_logprobs(&seq, v).unwrap();
    let sfull = student.prompt_logprobs(&seq, v).unwrap();
    for (j, (c, l)) in coarse.tokens.iter().zip(&local.tokens).enumerate() {
        assert!(c.kl <= l.kl + 1e-6, "top-5 KL {} above the full KL {}", c.kl, l.kl);
        assert!((c.teacher_nll - l.teacher_nll).abs() <= 1e-4 * (1.0 + l.teacher_nll));
        // The bucketed KL by hand: the teacher's top 5 (and the token), the rest as one outcome.
        let pos = local.prompt.len() - 1 + j;
        let t = &tfull[pos];
        let mut srow = vec![f64::NEG_INFINITY; v];
        for &(id, lp) in &sfull[pos].top {
            srow[id as usize] = lp as f64;
        }
        let tp = TeacherPosition {
            logprob: t.logprob as f64,
            top: t.top[..5].iter().map(|&(i, l)| (i, l as f64)).collect(),
        };
        let expect = kl_top_k(&srow, &tp, c.token);
        assert!((c.kl - expect).abs() <= 1e-4 * (1.0 + expect), "top-5 KL {} vs {expect}", c.kl);
    }
    // The stub saw the protocol the module documents (checked in `serve`); a sequence of one token is refused here.
    assert!(matches!(ep.score(&[1], 5), Err(RemoteError::Invalid(_))));
}

/// One chat turn under `escalation` on a fresh session, as `sprig run` does it. The text pieces as shown.
fn turn(
    student: &Arc<Engine<CpuBackend>>,
    escalation: Escalation,
    teacher: Option<&Endpoint>,
    params: &SamplingParams,
) -> (Turn, Vec<String>, Session<CpuBackend>) {
    student.prefix_cache.shrink_to(0);
    let mut session = Session::new(student.clone(), 0).unwrap();
    let messages = [ChatMessage::new("user", "hi")];
    let mut shown = Vec::new();
    let mut run_student =
        |prompt, p: &SamplingParams, text: &mut dyn FnMut(&str) -> bool, lp: &mut dyn FnMut(&TokenLogprob)| {
            let r = BatchRequest {
                session: &mut session,
                prompt,
                params: p.clone(),
                max_new: 40,
                on_text: Box::new(text),
                on_logprob: Some(Box::new(lp)),
            };
            run_batch(vec![r]).pop().unwrap()
        };
    let t = escalate::answer(
        &escalation,
        teacher.map(|t| t as &dyn escalate::Teacher),
        &messages,
        params,
        40,
        &mut run_student,
        &mut |s| {
            if !s.is_empty() {
                shown.push(s.to_string());
            }
            true
        },
    )
    .unwrap();
    if t.report.answered_by == AnsweredBy::Teacher {
        session.record_reply(&messages, &t.text);
    }
    (t, shown, session)
}

#[test]
fn escalation_streams_the_teacher_or_falls_back_to_the_student() {
    let student = synth_engine(3, QuantChoice::Keep);
    let stub = Stub::start(None);
    let params = long_answers(&student, 9);
    let window = 6;
    let esc = |policy| Escalation { policy, window };

    // The student alone (no teacher, or a threshold it never reaches): its own answer, the teacher not asked.
    let (alone, _, _) = turn(&student, esc(EscalationPolicy::Never), None, &params);
    assert_eq!(alone.report.answered_by, AnsweredBy::Student);
    assert!(!alone.text.is_empty());
    let signal = alone.report.signal.expect("the signal is measured");
    assert!(signal > 0.0 && alone.report.signal_tokens == window);
    let ep = stub.endpoint(Duration::from_secs(10));
    let (kept, shown, _) = turn(&student, esc(EscalationPolicy::Threshold(signal + 1.0)), Some(&ep), &params);
    assert_eq!((kept.report.answered_by, kept.report.escalated), (AnsweredBy::Student, false));
    assert_eq!(kept.text, alone.text, "holding the first tokens back changes nothing of the answer");
    assert_eq!(shown.concat(), kept.text);
    assert_eq!(kept.report.signal, alone.report.signal);
    assert_eq!(stub.requests.load(Ordering::SeqCst), 0);

    // Above the threshold: the student stops after the window, the teacher's answer streams (and only it).
    let (up, shown, session) = turn(&student, esc(EscalationPolicy::Threshold(signal - 0.01)), Some(&ep), &params);
    assert_eq!((up.report.answered_by, up.report.escalated), (AnsweredBy::Teacher, true));
    assert_eq!(up.text, TEACHER_TEXT.concat());
    assert_eq!(shown, TEACHER_TEXT);
    assert_eq!(session.messages().last().unwrap().content, TEACHER_TEXT.concat());
    let asked = stub.last.lock().unwrap().clone();
    assert_eq!(asked["messages"], json!([{"role": "user", "content": "hi"}]));
    assert_eq!(asked["model"], "stub-teacher");
    // Always: the teacher without the student running first.
    let (always, _, _) = turn(&student, esc(EscalationPolicy::Always), Some(&ep), &params);
    assert_eq!((always.report.answered_by, always.report.signal), (AnsweredBy::Teacher, None));
    assert!(always.stats.is_none() && always.text == TEACHER_TEXT.concat());

    // The teacher failing in every way: the student answers, the reason says why, nothing hangs.
    let held_text = {
        let n = student.tokenizer.decode(&alone.stats.as_ref().unwrap().generated[..window]).unwrap();
        n.chars().count()
    };
    for (mode, why) in [
        (Mode::ServerError, "HTTP 500: the teacher is overloaded"),
        (Mode::Malformed, "malformed reply"),
        (Mode::Slow, "timed out"),
    ] {
        stub.set(mode);
        let ep = stub.endpoint(Duration::from_millis(1500));
        let t0 = Instant::now();
        let (t, _, _) = turn(&student, esc(EscalationPolicy::Threshold(signal - 0.01)), Some(&ep), &params);
        assert!(t0.elapsed() < Duration::from_secs(4), "{mode:?}: {:?}", t0.elapsed());
        assert_eq!(
            (t.report.answered_by, t.report.escalated),
            (AnsweredBy::StudentAfterTeacherFailed, true),
            "{mode:?}"
        );
        let reason = t.report.reason.clone().unwrap();
        assert!(reason.contains(why), "{mode:?}: {reason}");
        // The student's held start, then its continuation: the turn is whole.
        let same = t.text.chars().zip(alone.text.chars()).take_while(|(a, b)| a == b).count();
        assert!(same >= held_text, "{mode:?}: {:?} vs {:?}", t.text, alone.text);
        assert!(t.stats.as_ref().unwrap().stop != sprig_engine::generate::StopReason::Cancelled);
    }
    // Offline: a port nothing listens on.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut off = Endpoint::new(&format!("http://127.0.0.1:{}", closed.local_addr().unwrap().port()), "m").unwrap();
    drop(closed);
    off.timeout = Duration::from_secs(2);
    let (t, _, _) = turn(&student, esc(EscalationPolicy::Always), Some(&off), &params);
    assert_eq!(t.report.answered_by, AnsweredBy::StudentAfterTeacherFailed);
    assert!(t.report.reason.as_deref().unwrap().contains("offline"), "{:?}", t.report.reason);
    assert_eq!(t.text, alone.text, "with nothing from the teacher the student answers as it would alone");
    // A stream that broke off: the student goes on from the teacher's words.
    stub.set(Mode::BrokenStream);
    let (t, shown, session) = turn(&student, esc(EscalationPolicy::Always), Some(&ep), &params);
    assert_eq!(t.report.answered_by, AnsweredBy::StudentAfterTeacherFailed);
    assert!(t.report.reason.as_deref().unwrap().contains("without `data: [DONE]`"), "{:?}", t.report.reason);
    assert!(t.text.starts_with("Partial answer") && t.text.len() > "Partial answer".len(), "{:?}", t.text);
    assert_eq!(shown[..2], ["Partial", " answer"]);
    assert_eq!(session.messages().last().unwrap().content, t.text.trim());
}
