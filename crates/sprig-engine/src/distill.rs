//! The cloud-teacher ↔ edge-student bridge, device side: how far a student is from its teacher on what the
//! student itself writes (on-policy). The student answers a prompt with its own sampling settings; the teacher
//! then scores every token the student generated with its full next-token distribution: KL(teacher‖student),
//! the teacher's NLL of the student's token, and whether both models' greedy picks agree there.
//!
//! The teacher is a local engine of the same tokenizer ([`score_reply`]: full distributions) or anything that
//! returns its top-k log-probabilities per position, such as a remote endpoint ([`score_reply_with`],
//! `sprig-remote`). With top-k only, KL is that of the two distributions coarsened to the teacher's known
//! tokens (its top k and the sampled token) plus one bucket holding the rest of each distribution's mass:
//! exact when k covers the vocabulary, otherwise a lower bound of the full KL (coarsening never increases KL).

use std::sync::Arc;

use sprig_backend::Backend;
use sprig_models::Logits;

use crate::eval::log_softmax;
use crate::generate::Engine;
use crate::sampler::{argmax, SamplingParams, TokenLogprob};
use crate::session::Session;
use crate::{ChatMessage, EngineError, Result};

/// One generated token, scored.
#[derive(Clone, Debug)]
pub struct TokenScore {
    pub token: u32,
    /// KL(teacher‖student) of the two next-token distributions at its position, in nats.
    pub kl: f64,
    /// −log p_teacher(token).
    pub teacher_nll: f64,
    /// −log p_student(token).
    pub student_nll: f64,
    /// Entropy of the student's distribution there (nats): escalation's signal ([`crate::escalate`]).
    pub student_entropy: f64,
    /// The teacher's and the student's most likely tokens there are the same.
    pub greedy_agree: bool,
    /// With a top-k request: the student's k most likely tokens there (token, log-probability), best first.
    pub student_top: Vec<(u32, f32)>,
    /// With a top-k request: the teacher's.
    pub teacher_top: Vec<(u32, f32)>,
}

/// A teacher's view of one position of a sequence: the log-probability of the token there and its most
/// likely tokens (best first).
#[derive(Clone, Debug, PartialEq)]
pub struct TeacherPosition {
    pub logprob: f64,
    pub top: Vec<(u32, f64)>,
}

/// One prompt's reply by the student, scored by the teacher.
#[derive(Clone, Debug)]
pub struct PromptScore {
    /// The student's reply.
    pub text: String,
    /// The prompt as the student ran it (chat template applied).
    pub prompt: Vec<u32>,
    /// Every token of the reply (an end-of-sequence token that ended it is not scored).
    pub tokens: Vec<TokenScore>,
}

impl PromptScore {
    fn mean(&self, f: impl Fn(&TokenScore) -> f64) -> f64 {
        self.tokens.iter().map(f).sum::<f64>() / self.tokens.len().max(1) as f64
    }
    pub fn mean_kl(&self) -> f64 {
        self.mean(|t| t.kl)
    }
    pub fn teacher_nll(&self) -> f64 {
        self.mean(|t| t.teacher_nll)
    }
    pub fn greedy_agreement(&self) -> f64 {
        self.mean(|t| f64::from(u8::from(t.greedy_agree)))
    }
    /// Escalation's signal for this reply: the student's mean entropy over its first `window` tokens.
    pub fn signal(&self, window: usize) -> f64 {
        let n = self.tokens.len().min(window);
        self.tokens[..n].iter().map(|t| t.student_entropy).sum::<f64>() / n.max(1) as f64
    }
}

/// The student's reply to `prompt` (as a user turn with its chat template, or raw text when it has none):
/// its text, the whole sequence (prompt then reply) and where the reply starts in it.
fn student_reply<B: Backend>(
    student: &Arc<Engine<B>>,
    prompt: &str,
    params: &SamplingParams,
    max_new: usize,
) -> Result<(String, Vec<u32>, usize)> {
    let mut session = Session::new(student.clone(), 0)?;
    let mut text = String::new();
    let collect = |t: &str| {
        text.push_str(t);
        true
    };
    let stats = match student.template {
        Some(_) => session.chat(&[ChatMessage::new("user", prompt)], params, max_new, collect)?,
        None => session.generate(prompt, false, params, max_new, collect)?,
    };
    // The whole sequence: what the session ran, then the generated tokens it did not run yet.
    let mut seq = session.tokens().to_vec();
    seq.extend_from_slice(&stats.generated[stats.fed..]);
    let first = seq.len() - stats.generated.len();
    if first == 0 {
        return Err(EngineError::EmptyPrompt);
    }
    Ok((text, seq, first))
}

/// Entropy (nats) of a log-softmax row.
fn entropy(row: &[f64]) -> f64 {
    -row.iter().map(|&l| if l.is_finite() { l.exp() * l } else { 0.0 }).sum::<f64>()
}

/// The `k` most likely tokens of a step's logits with their log-probabilities, best first (as `logprobs` reports
/// them); nothing for `k` = 0.
fn top_of(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    if k == 0 {
        return Vec::new();
    }
    TokenLogprob::from_logits(logits, 0, k).top
}

/// The student answers `prompt` (as a user turn with its chat template, or as raw text when it has none) with
/// `params`, up to `max_new` tokens; the teacher scores each generated token with its full distribution.
/// With `top_k` > 0 each token also carries both models' `top_k` most likely tokens. Refuses a teacher of
/// another vocabulary.
pub fn score_reply<B: Backend, T: Backend>(
    student: &Arc<Engine<B>>,
    teacher: &Engine<T>,
    prompt: &str,
    params: &SamplingParams,
    max_new: usize,
    top_k: usize,
) -> Result<PromptScore> {
    if !student.tokenizer.same_vocabulary(&teacher.tokenizer) {
        return Err(EngineError::Eval(
            "the teacher's vocabulary differs from the student's; token-level scores need the same tokenizer".into(),
        ));
    }
    let (text, seq, first) = student_reply(student, prompt, params, max_new)?;
    let mut tokens = Vec::with_capacity(seq.len() - first);
    if seq.len() > first {
        // Both models over the sequence but its last token; row j predicts token j + 1.
        let run = &seq[..seq.len() - 1];
        let (ls, lt) = (all_logits(student, run)?, all_logits(teacher, run)?);
        let v = student.model.config.vocab_size;
        let (mut ps, mut pt) = (Vec::new(), Vec::new());
        for j in first - 1..seq.len() - 1 {
            let (srow, trow) = (&ls[j * v..(j + 1) * v], &lt[j * v..(j + 1) * v]);
            log_softmax(srow, &mut ps);
            log_softmax(trow, &mut pt);
            let token = seq[j + 1];
            tokens.push(TokenScore {
                token,
                kl: (0..v).map(|i| pt[i].exp() * (pt[i] - ps[i])).sum::<f64>().max(0.0),
                teacher_nll: -pt[token as usize],
                student_nll: -ps[token as usize],
                student_entropy: entropy(&ps),
                greedy_agree: argmax(srow) == argmax(trow),
                student_top: top_of(srow, top_k),
                teacher_top: top_of(trow, top_k),
            });
        }
    }
    Ok(PromptScore { text, prompt: seq[..first].to_vec(), tokens })
}

/// [`score_reply`] with a teacher known only through its top-k log-probabilities per position (a remote
/// endpoint): `teacher` gets the whole sequence and returns one [`TeacherPosition`] per position from the
/// second on. KL as the module says; the teacher's greedy token is its top one.
pub fn score_reply_with<B: Backend>(
    student: &Arc<Engine<B>>,
    teacher: &mut dyn FnMut(&[u32]) -> Result<Vec<TeacherPosition>>,
    prompt: &str,
    params: &SamplingParams,
    max_new: usize,
    top_k: usize,
) -> Result<PromptScore> {
    let (text, seq, first) = student_reply(student, prompt, params, max_new)?;
    let mut tokens = Vec::with_capacity(seq.len() - first);
    if seq.len() > first {
        let positions = teacher(&seq)?;
        if positions.len() != seq.len() - 1 {
            return Err(EngineError::Eval(format!(
                "the teacher scored {} positions of a sequence of {}",
                positions.len(),
                seq.len()
            )));
        }
        let ls = all_logits(student, &seq[..seq.len() - 1])?;
        let v = student.model.config.vocab_size;
        let mut ps = Vec::new();
        for j in first - 1..seq.len() - 1 {
            let srow = &ls[j * v..(j + 1) * v];
            log_softmax(srow, &mut ps);
            let token = seq[j + 1];
            let t = &positions[j];
            let Some(&(teacher_best, _)) = t.top.first() else {
                return Err(EngineError::Eval(format!("the teacher gave no top log-probabilities at position {}", j + 1)));
            };
            if let Some(&(bad, _)) = t.top.iter().find(|&&(id, _)| id as usize >= v) {
                return Err(EngineError::Eval(format!("the teacher named token {bad}, past the student's vocabulary of {v}")));
            }
            tokens.push(TokenScore {
                token,
                kl: kl_top_k(&ps, t, token),
                teacher_nll: -t.logprob,
                student_nll: -ps[token as usize],
                student_entropy: entropy(&ps),
                greedy_agree: argmax(srow) == teacher_best,
                student_top: top_of(srow, top_k),
                teacher_top: t.top.iter().take(top_k).map(|&(i, l)| (i, l as f32)).collect(),
            });
        }
    }
    Ok(PromptScore { text, prompt: seq[..first].to_vec(), tokens })
}

/// Teacher mass left outside its reported tokens below which there is no tail bucket: the rounding of a
/// server's f32 log-probabilities summed over a large top-k.
const TAIL_EPS: f64 = 1e-4;

/// KL(teacher‖student) over the teacher's known tokens (its top list and the sampled token) plus one bucket
/// for the rest of each distribution; `student` is a full log-softmax row.
pub fn kl_top_k(student: &[f64], teacher: &TeacherPosition, token: u32) -> f64 {
    let mut known: Vec<(u32, f64)> = teacher.top.clone();
    if !known.iter().any(|&(i, _)| i == token) {
        known.push((token, teacher.logprob));
    }
    let (mut kl, mut mass_t, mut mass_s) = (0.0, 0.0, 0.0);
    for &(i, lt) in &known {
        let ls = student[i as usize];
        let pt = lt.exp();
        kl += pt * (lt - ls);
        mass_t += pt;
        mass_s += ls.exp();
    }
    let (rest_t, rest_s) = ((1.0 - mass_t).max(0.0), (1.0 - mass_s).max(1e-300));
    // A rest below what f32 log-probabilities resolve (or none: every token known) is rounding, not mass.
    if known.len() < student.len() && rest_t > TAIL_EPS {
        kl += rest_t * (rest_t / rest_s).ln();
    }
    kl.max(0.0)
}

/// Logits of every position of `tokens`, from an empty state.
fn all_logits<B: Backend>(e: &Engine<B>, tokens: &[u32]) -> Result<Vec<f32>> {
    let mut st = e.model.new_state(tokens.len())?;
    e.model.forward(&mut st, tokens, Logits::All)?;
    let mut out = Vec::new();
    e.model.read_logits(&st, &mut out)?;
    Ok(out)
}
