//! A chat turn under escalation for `sprig run` and `sprig chat`: the local model answers through its session,
//! the teacher when the policy and the signal say so ([`sprig_engine::escalate`]); every decision is logged on
//! stderr with its signal.

use anyhow::Result;
use sprig_backend::Backend;
use sprig_engine::escalate::{self, AnsweredBy, Escalation, EscalationReport};
use sprig_engine::generate::GenerationStats;
use sprig_engine::{run_batch, BatchRequest, ChatMessage, SamplingParams, Session};
use sprig_remote::Endpoint;

/// Answers the last turn of `messages` on `session` (the teacher's reply, when it answers, recorded in the
/// session's conversation). Returns the student's last generation, if it ran, and the report.
pub fn answer_turn<B: Backend>(
    session: &mut Session<B>,
    escalation: &Escalation,
    teacher: &Endpoint,
    messages: &[ChatMessage],
    params: &SamplingParams,
    max_new: usize,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<(Option<GenerationStats>, EscalationReport)> {
    let mut run_student = |prompt,
                           p: &SamplingParams,
                           text: &mut dyn FnMut(&str) -> bool,
                           lp: &mut dyn FnMut(&sprig_engine::TokenLogprob)| {
        let request = BatchRequest {
            session: &mut *session,
            prompt,
            params: p.clone(),
            max_new,
            on_text: Box::new(text),
            on_logprob: Some(Box::new(lp)),
        };
        run_batch(vec![request]).pop().expect("one result per request")
    };
    let turn = escalate::answer(escalation, Some(teacher), messages, params, max_new, &mut run_student, on_text)?;
    if turn.report.answered_by == AnsweredBy::Teacher {
        session.record_reply(messages, &turn.text);
    }
    log(&turn.report, escalation, teacher);
    Ok((turn.stats, turn.report))
}

/// One line on stderr per decision.
pub fn log(r: &EscalationReport, e: &Escalation, teacher: &Endpoint) {
    eprintln!("sprig: {}", r.line(e, teacher.base()));
}
