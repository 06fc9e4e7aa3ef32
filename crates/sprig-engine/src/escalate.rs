//! Escalation: the student answers on the device, and a turn it is unsure of goes to a teacher (a bigger model
//! behind an OpenAI-compatible endpoint, see `sprig-remote`) when one can be reached.
//!
//! The signal is the student's own: the mean entropy of its next-token distribution over the first `window`
//! tokens of its reply (nats; 0 = certain). Under [`EscalationPolicy::Threshold`] those first tokens are held
//! back; a mean above the threshold cancels the student and asks the teacher, whose answer streams through the
//! same callback. Otherwise the held text goes out and the student goes on. A teacher that cannot answer
//! (offline, timeout, an error status, a malformed reply) never loses the turn: the student answers — going on
//! from its held start, or from where the teacher's stream broke off — and the reason is reported.
//!
//! Sessions stay transport-agnostic: the student runs through a caller's function (a session, a batch thread)
//! and the teacher is a [`Teacher`].

use crate::generate::{GenerationStats, StopReason};
use crate::sampler::{SamplingParams, TokenLogprob};
use crate::session::Prompt;
use crate::{ChatMessage, EngineError, Result};

/// When a turn goes to the teacher.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum EscalationPolicy {
    /// The student answers every turn (the signal is still measured and reported).
    Never,
    /// The teacher answers when the student's mean entropy over the window exceeds this many nats.
    Threshold(f32),
    /// The teacher answers every turn it can; the student only when the teacher cannot.
    Always,
}

impl EscalationPolicy {
    /// `never`, `always`, or `threshold` with its value.
    pub fn parse(name: &str, threshold: f32) -> Result<Self> {
        match name {
            "never" => Ok(EscalationPolicy::Never),
            "always" => Ok(EscalationPolicy::Always),
            "threshold" if threshold.is_finite() && threshold >= 0.0 => Ok(EscalationPolicy::Threshold(threshold)),
            "threshold" => {
                Err(EngineError::Eval(format!("escalation threshold {threshold}: must be a finite entropy ≥ 0 (nats)")))
            }
            other => {
                Err(EngineError::Eval(format!("escalation policy `{other}`: expected never, threshold or always")))
            }
        }
    }
}

/// How a student escalates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Escalation {
    pub policy: EscalationPolicy,
    /// Reply tokens whose mean entropy is the signal (and that are held back until it is known).
    pub window: usize,
}

/// Tokens of the signal's window unless a caller says.
pub const DEFAULT_WINDOW: usize = 16;

/// Mean entropy (nats) above which the CLI escalates unless told: calibrated on tests/data/distill/prompts.jsonl
/// with Qwen2.5-Coder-0.5B as student and 1.5B as teacher (BENCHMARKS.md, "escalation curve").
pub const DEFAULT_THRESHOLD: f32 = 1.0;

impl Default for Escalation {
    fn default() -> Self {
        Escalation { policy: EscalationPolicy::Threshold(DEFAULT_THRESHOLD), window: DEFAULT_WINDOW }
    }
}

/// Why a teacher gave no (complete) answer.
#[derive(Clone, Debug, PartialEq)]
pub struct TeacherError(pub String);

impl std::fmt::Display for TeacherError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A model that answers the turns a student hands over.
pub trait Teacher: Send + Sync {
    /// Answers the conversation's last turn, each piece of text to `on_text` as it comes (false from it: stop,
    /// which is not an error). An error after some text went out leaves that text as the start of the reply.
    fn answer(
        &self,
        messages: &[ChatMessage],
        params: &SamplingParams,
        max_tokens: usize,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> std::result::Result<(), TeacherError>;
}

/// Who answered a turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnsweredBy {
    Student,
    Teacher,
    /// The turn was escalated, the teacher could not answer (see [`EscalationReport::reason`]): the student did.
    StudentAfterTeacherFailed,
}

impl AnsweredBy {
    pub fn name(self) -> &'static str {
        match self {
            AnsweredBy::Student => "student",
            AnsweredBy::Teacher => "teacher",
            AnsweredBy::StudentAfterTeacherFailed => "student-after-teacher-failed",
        }
    }
}

/// What escalation decided for one turn, and on what.
#[derive(Clone, Debug, PartialEq)]
pub struct EscalationReport {
    pub answered_by: AnsweredBy,
    /// The student's mean entropy over the first tokens of its reply (nats); `None` when it did not run first.
    pub signal: Option<f32>,
    /// Tokens the signal is the mean of (fewer than the window when the reply was shorter).
    pub signal_tokens: usize,
    /// The turn went to the teacher (decided by the policy and the signal).
    pub escalated: bool,
    /// Why the teacher's answer did not stand (offline, timeout, status, malformed reply).
    pub reason: Option<String>,
}

impl EscalationReport {
    /// The decision as one log line: the policy, the signal, who answered and why (`teacher`: its URL).
    pub fn line(&self, escalation: &Escalation, teacher: &str) -> String {
        let policy = match escalation.policy {
            EscalationPolicy::Never => "never".to_string(),
            EscalationPolicy::Always => "always".to_string(),
            EscalationPolicy::Threshold(t) => format!("threshold {t}"),
        };
        let signal = match self.signal {
            Some(s) => format!("signal {s:.3} nats over {} tokens", self.signal_tokens),
            None => "no signal (the local model did not run first)".into(),
        };
        let outcome = match (self.answered_by, &self.reason) {
            (AnsweredBy::Teacher, _) => format!("escalated: {teacher} answered"),
            (AnsweredBy::StudentAfterTeacherFailed, Some(why)) => {
                format!("escalated, but the teacher failed ({why}): the local model answered")
            }
            _ => "kept: the local model answered".to_string(),
        };
        format!("escalation ({policy}): {signal}; {outcome}")
    }
}

/// One answered turn.
pub struct Turn {
    /// The reply as the user saw it.
    pub text: String,
    /// The student's last generation (`None` when the teacher answered without the student running).
    pub stats: Option<GenerationStats>,
    pub report: EscalationReport,
}

/// Runs the student on a prompt: each text piece to the first callback (false stops it), each token's
/// entry to the second (the request asks for log-probabilities).
pub type RunStudent<'a> = dyn FnMut(
        Prompt,
        &SamplingParams,
        &mut dyn FnMut(&str) -> bool,
        &mut dyn FnMut(&TokenLogprob),
    ) -> Result<GenerationStats>
    + 'a;

/// Answers the conversation's last turn under `escalation`: the student through `run_student`, the teacher
/// when the policy and the signal say so and one is given. Text goes to `on_text` (false from it stops the
/// turn, escalation included).
pub fn answer(
    escalation: &Escalation,
    teacher: Option<&dyn Teacher>,
    messages: &[ChatMessage],
    params: &SamplingParams,
    max_new: usize,
    run_student: &mut RunStudent<'_>,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Turn> {
    let mut text = String::new();
    let mut report = EscalationReport {
        answered_by: AnsweredBy::Student,
        signal: None,
        signal_tokens: 0,
        escalated: false,
        reason: None,
    };
    let mut emit = |t: &str, text: &mut String| {
        text.push_str(t);
        on_text(t)
    };
    let policy = if teacher.is_some() { escalation.policy } else { EscalationPolicy::Never };
    // The student's entries carry the signal; asking for them changes no sampling.
    let student_params = SamplingParams { top_logprobs: Some(params.top_logprobs.unwrap_or(0)), ..params.clone() };

    if policy == EscalationPolicy::Always {
        let teacher = teacher.expect("a policy other than never has a teacher");
        report.escalated = true;
        let mut stopped = false;
        match teacher.answer(messages, params, max_new, &mut |t| {
            let go = emit(t, &mut text);
            stopped |= !go;
            go
        }) {
            Ok(()) => {
                report.answered_by = AnsweredBy::Teacher;
                return Ok(Turn { text, stats: None, report });
            }
            Err(_) if stopped => {
                report.answered_by = AnsweredBy::Teacher;
                return Ok(Turn { text, stats: None, report });
            }
            Err(e) => {
                report.answered_by = AnsweredBy::StudentAfterTeacherFailed;
                report.reason = Some(e.0);
                let prompt = continuing(messages, &text);
                let signal = Signal::new(escalation.window);
                let stats = run_student(prompt, &student_params, &mut |t| emit(t, &mut text), &mut |e| signal.add(e))?;
                report.signal = (signal.tokens() > 0).then(|| signal.mean());
                report.signal_tokens = signal.tokens();
                return Ok(Turn { text, stats: Some(stats), report });
            }
        }
    }

    // The student first. Under a threshold its first `window` tokens are held back until the signal is known.
    let threshold = match policy {
        EscalationPolicy::Threshold(t) => Some(t),
        _ => None,
    };
    let signal = Signal::new(escalation.window);
    let mut held = String::new();
    // None: undecided (holding back); Some(false): the student keeps the turn; Some(true): escalate.
    let mut decided: Option<bool> = if threshold.is_none() { Some(false) } else { None };
    let mut user_stopped = false;
    let stats = run_student(
        Prompt::Chat(messages.to_vec()),
        &student_params,
        &mut |t| {
            if decided == Some(true) {
                return false;
            }
            // Polls (empty pieces) reach the caller at once: it may want to stop.
            if decided == Some(false) || t.is_empty() {
                let go = emit(t, &mut text);
                user_stopped |= !go;
                return go;
            }
            held.push_str(t);
            if signal.tokens() < escalation.window {
                return true;
            }
            if threshold.is_some_and(|th| signal.mean() > th) {
                decided = Some(true);
                return false;
            }
            decided = Some(false);
            let go = emit(&std::mem::take(&mut held), &mut text);
            user_stopped |= !go;
            go
        },
        &mut |e| signal.add(e),
    )?;
    let (sum, n) = (signal.mean() * signal.tokens() as f32, signal.tokens());
    report.signal = (n > 0).then(|| sum / n as f32);
    report.signal_tokens = n;
    // Stopped by the caller (its callback, or a cancel flag the student's runner watches), not by escalation:
    // the turn ends here, with what was held shown.
    if user_stopped || (stats.stop == StopReason::Cancelled && decided != Some(true)) {
        if !user_stopped && !held.is_empty() {
            emit(&held, &mut text);
        }
        return Ok(Turn { text, stats: Some(stats), report });
    }
    // A reply shorter than the window ends undecided: decide on what there is.
    let escalate = match decided {
        Some(d) => d,
        None => threshold.is_some_and(|th| n > 0 && sum / n as f32 > th),
    };
    if !escalate {
        if !held.is_empty() {
            emit(&held, &mut text);
        }
        return Ok(Turn { text, stats: Some(stats), report });
    }
    report.escalated = true;
    let teacher = teacher.expect("a threshold policy has a teacher");
    let mut stopped = false;
    let asked = teacher.answer(messages, params, max_new, &mut |t| {
        let go = emit(t, &mut text);
        stopped |= !go;
        go
    });
    match asked {
        Ok(()) => {
            report.answered_by = AnsweredBy::Teacher;
            Ok(Turn { text, stats: Some(stats), report })
        }
        Err(_) if stopped => {
            report.answered_by = AnsweredBy::Teacher;
            Ok(Turn { text, stats: Some(stats), report })
        }
        Err(e) => {
            report.answered_by = AnsweredBy::StudentAfterTeacherFailed;
            report.reason = Some(e.0);
            if text.is_empty() && stats.stop != StopReason::Cancelled {
                // The student had finished its (short) reply: it stands as it was.
                emit(&held, &mut text);
                return Ok(Turn { text, stats: Some(stats), report });
            }
            // The student goes on: from its held start when the teacher sent nothing, else from the teacher's.
            let start = if text.is_empty() {
                if !emit(&held, &mut text) {
                    return Ok(Turn { text, stats: Some(stats), report });
                }
                text.clone()
            } else {
                text.clone()
            };
            let stats = run_student(continuing(messages, &start), params, &mut |t| emit(t, &mut text), &mut |_| {})?;
            Ok(Turn { text, stats: Some(stats), report })
        }
    }
}

/// The conversation with its reply begun by `start` (a plain chat when nothing was said yet).
fn continuing(messages: &[ChatMessage], start: &str) -> Prompt {
    if start.is_empty() {
        Prompt::Chat(messages.to_vec())
    } else {
        Prompt::ChatContinuing(messages.to_vec(), start.to_string())
    }
}

/// The mean entropy of a reply's first tokens (shared by the text and log-probability callbacks).
struct Signal {
    window: usize,
    sum_n: std::cell::Cell<(f32, usize)>,
}

impl Signal {
    fn new(window: usize) -> Self {
        Signal { window, sum_n: std::cell::Cell::new((0.0, 0)) }
    }
    fn add(&self, e: &TokenLogprob) {
        let (s, n) = self.sum_n.get();
        if n < self.window {
            self.sum_n.set((s + e.entropy, n + 1));
        }
    }
    fn tokens(&self) -> usize {
        self.sum_n.get().1
    }
    fn mean(&self) -> f32 {
        let (s, n) = self.sum_n.get();
        if n == 0 {
            0.0
        } else {
            s / n as f32
        }
    }
}
