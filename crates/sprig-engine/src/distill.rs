//! The cloud-teacher ↔ edge-student bridge, device side: how far a student is from its teacher on what the
//! student itself writes (on-policy). The student answers a prompt with its own sampling settings; the teacher
//! then scores every token the student generated with its full next-token distribution: KL(teacher‖student),
//! the teacher's NLL of the student's token, and whether both models' greedy picks agree there.

use std::sync::Arc;

use sprig_backend::Backend;
use sprig_models::Logits;

use crate::eval::log_softmax;
use crate::generate::Engine;
use crate::sampler::{argmax, SamplingParams};
use crate::session::Session;
use crate::{ChatMessage, EngineError, Result};

/// One generated token, scored.
#[derive(Clone, Copy, Debug)]
pub struct TokenScore {
    pub token: u32,
    /// KL(teacher‖student) of the two next-token distributions at its position, in nats.
    pub kl: f64,
    /// −log p_teacher(token).
    pub teacher_nll: f64,
    /// −log p_student(token).
    pub student_nll: f64,
    /// The teacher's and the student's most likely tokens there are the same.
    pub greedy_agree: bool,
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
}

/// The student answers `prompt` (as a user turn with its chat template, or as raw text when it has none) with
/// `params`, up to `max_new` tokens; the teacher scores each generated token. Refuses a teacher of another
/// vocabulary.
pub fn score_reply<B: Backend, T: Backend>(
    student: &Arc<Engine<B>>,
    teacher: &Engine<T>,
    prompt: &str,
    params: &SamplingParams,
    max_new: usize,
) -> Result<PromptScore> {
    if !student.tokenizer.same_vocabulary(&teacher.tokenizer) {
        return Err(EngineError::Eval(
            "the teacher's vocabulary differs from the student's; token-level scores need the same tokenizer".into(),
        ));
    }
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
    drop(session);
    if first == 0 {
        return Err(EngineError::EmptyPrompt);
    }
    let mut tokens = Vec::with_capacity(stats.generated.len());
    if !stats.generated.is_empty() {
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
                greedy_agree: argmax(srow) == argmax(trow),
            });
        }
    }
    Ok(PromptScore { text, prompt: seq[..first].to_vec(), tokens })
}

/// Logits of every position of `tokens`, from an empty state.
fn all_logits<B: Backend>(e: &Engine<B>, tokens: &[u32]) -> Result<Vec<f32>> {
    let mut st = e.model.new_state(tokens.len())?;
    e.model.forward(&mut st, tokens, Logits::All)?;
    let mut out = Vec::new();
    e.model.read_logits(&st, &mut out)?;
    Ok(out)
}
