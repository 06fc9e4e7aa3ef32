//! Evaluation: perplexity following llama.cpp's `llama-perplexity` protocol, and teacher/student fidelity.
//!
//! Protocol: the whole text is tokenized once (BOS first if the model adds one) and cut into
//! `n = len / ctx` chunks of `ctx` tokens; each chunk's first token is replaced by BOS when the model adds one;
//! every chunk is run from an empty cache, and positions `ctx/2 .. ctx-1` are scored (each predicts the next
//! token), so every scored token has at least `ctx/2` tokens of context.

use sprig_backend::Backend;
use sprig_models::Logits;

use crate::generate::Engine;
use crate::{EngineError, Result};

#[derive(Clone, Debug, Default)]
pub struct PerplexityReport {
    pub chunks: usize,
    pub ctx: usize,
    pub scored_tokens: usize,
    pub perplexity: f64,
    /// Standard error of the mean NLL, propagated to PPL (as llama.cpp prints).
    pub perplexity_err: f64,
    /// With a teacher: mean KL(teacher || student) in nats per scored token.
    pub mean_kl: Option<f64>,
    /// With a teacher: fraction of scored positions where both argmaxes agree.
    pub top1_agreement: Option<f64>,
}

/// `x` (logits) → log-probabilities in f64.
pub(crate) fn log_softmax(x: &[f32], out: &mut Vec<f64>) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
    out.clear();
    out.extend(x.iter().map(|&v| v as f64 - lse));
}

/// Perplexity of `text` under `student`; with `teacher`, also KL(teacher‖student) and top-1 agreement.
pub fn perplexity<B: Backend, T: Backend>(
    student: &Engine<B>,
    teacher: Option<&Engine<T>>,
    text: &str,
    ctx: usize,
    max_chunks: Option<usize>,
    mut progress: impl FnMut(usize, usize, f64),
) -> Result<PerplexityReport> {
    if max_chunks == Some(0) {
        return Err(EngineError::Eval("--chunks 0: at least one chunk must be scored".into()));
    }
    if ctx < 4 {
        return Err(EngineError::Eval(format!("--ctx {ctx} is too small (at least 4)")));
    }
    let tok = &student.tokenizer;
    let tokens = tok.encode_prompt(text)?;
    if tokens.len() < 2 * ctx {
        return Err(EngineError::Eval(format!(
            "the text has {} tokens; perplexity with --ctx {ctx} needs at least {}",
            tokens.len(),
            2 * ctx
        )));
    }
    if let Some(t) = teacher {
        let tt = t.tokenizer.encode_prompt(text)?;
        if tt != tokens {
            return Err(EngineError::Eval(
                "teacher and student tokenize the text differently; KL needs a shared vocabulary".into(),
            ));
        }
    }
    let mut n_chunks = tokens.len() / ctx;
    if let Some(m) = max_chunks {
        n_chunks = n_chunks.min(m);
    }
    let first = ctx / 2;
    let vocab = student.model.config.vocab_size;
    let (mut nll, mut nll2, mut count) = (0.0f64, 0.0f64, 0usize);
    let (mut kl, mut agree) = (0.0f64, 0usize);
    let (mut ls, mut lt) = (Vec::new(), Vec::new());
    let (mut logits, mut tlogits) = (Vec::new(), Vec::new());
    for c in 0..n_chunks {
        let mut chunk = tokens[c * ctx..(c + 1) * ctx].to_vec();
        if let (true, Some(bos)) = (tok.special().add_bos, tok.bos()) {
            chunk[0] = bos;
        }
        let mut st = student.model.new_state(ctx)?;
        student.model.forward(&mut st, &chunk, Logits::All)?;
        student.model.read_logits(&st, &mut logits)?;
        if let Some(t) = teacher {
            let mut ts = t.model.new_state(ctx)?;
            t.model.forward(&mut ts, &chunk, Logits::All)?;
            t.model.read_logits(&ts, &mut tlogits)?;
        }
        for j in first..ctx - 1 {
            let row = &logits[j * vocab..(j + 1) * vocab];
            log_softmax(row, &mut ls);
            let target = chunk[j + 1] as usize;
            let l = -ls[target];
            nll += l;
            nll2 += l * l;
            count += 1;
            if let Some(t) = teacher {
                let tv = t.model.config.vocab_size;
                let trow = &tlogits[j * tv..(j + 1) * tv];
                log_softmax(trow, &mut lt);
                let n = tv.min(vocab);
                kl += (0..n).map(|i| lt[i].exp() * (lt[i] - ls[i])).sum::<f64>();
                if crate::sampler::argmax(trow) == crate::sampler::argmax(row) {
                    agree += 1;
                }
            }
        }
        progress(c + 1, n_chunks, (nll / count as f64).exp());
    }
    let mean = nll / count as f64;
    let var = (nll2 / count as f64 - mean * mean).max(0.0);
    let err = (var / (count as f64 - 1.0).max(1.0)).sqrt();
    Ok(PerplexityReport {
        chunks: n_chunks,
        ctx,
        scored_tokens: count,
        perplexity: mean.exp(),
        perplexity_err: mean.exp() * err,
        mean_kl: teacher.map(|_| kl / count as f64),
        top1_agreement: teacher.map(|_| agree as f64 / count as f64),
    })
}

/// Tokens run per forward pass when scoring a whole sequence (the logits of every position of a chunk are
/// held at once: `chunk × vocabulary` floats).
const SCORE_CHUNK: usize = 64;

impl<B: Backend> Engine<B> {
    /// The model's log-probability of each token of `tokens` from the second on (given those before it), with
    /// the `k` most likely tokens at each position: what an OpenAI-compatible server returns for `echo` with
    /// `logprobs` (a teacher scoring a student's sequence). Runs from an empty state, in chunks.
    pub fn prompt_logprobs(&self, tokens: &[u32], k: usize) -> Result<Vec<crate::TokenLogprob>> {
        let v = self.model.config.vocab_size;
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= v) {
            return Err(EngineError::Eval(format!("token {bad} is past the vocabulary ({v} tokens)")));
        }
        let mut out = Vec::with_capacity(tokens.len().saturating_sub(1));
        if tokens.len() < 2 {
            return Ok(out);
        }
        let run = &tokens[..tokens.len() - 1];
        let mut st = self.model.new_state(run.len())?;
        let mut logits = Vec::new();
        for (c, chunk) in run.chunks(SCORE_CHUNK).enumerate() {
            self.model.forward(&mut st, chunk, Logits::All)?;
            self.model.read_logits(&st, &mut logits)?;
            for (i, row) in logits.chunks_exact(v).enumerate() {
                let next = tokens[c * SCORE_CHUNK + i + 1];
                out.push(crate::TokenLogprob::from_logits(row, next, k));
            }
        }
        Ok(out)
    }
}
