//! Token sampling, as a chain (HF transformers' order: the temperature first, then the filters): logit bias →
//! repetition/presence/frequency penalties over a window of recent tokens → temperature → top-k → typical-p
//! → top-p → min-p → a seeded draw. Temperatures below [`GREEDY_BELOW`] take the best token after bias and
//! penalties. Non-finite logits are an error, never a random token.
//!
//! A constrained request ([`SamplingParams::constraint`]) masks the tokens its constraint forbids after bias and
//! penalties, before the temperature and the filters. The mask is built only when needed: the chain first runs
//! unmasked and the token it picks is checked against the constraint; only a rejected token costs a full mask
//! (for a 151k vocabulary, far more than one check) and a second run of the chain over the allowed tokens. Greedy
//! decoding picks the same token either way; with sampling this is the draw llama.cpp makes (an allowed token
//! keeps its unmasked chance, a rejected draw is redrawn among the allowed ones).

use std::collections::VecDeque;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::constraint::{Constraint, Guide};
use crate::{EngineError, Result};
use llguidance::toktrie::SimpleVob;

/// Temperatures below this sample greedily.
pub const GREEDY_BELOW: f32 = 1e-6;

/// Most stop strings one request may give, and the longest one in bytes.
pub const MAX_STOP_STRINGS: usize = 16;
pub const MAX_STOP_BYTES: usize = 256;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy; below [`GREEDY_BELOW`] also greedy (dividing by it would overflow the logits).
    pub temperature: f32,
    /// 0 = no top-k cut.
    pub top_k: usize,
    /// 1.0 = no nucleus cut.
    pub top_p: f32,
    /// Drops tokens less likely than `min_p` × the most likely one's probability; 0 = off.
    pub min_p: f32,
    /// Locally typical sampling: keeps the tokens whose surprise is closest to the entropy, up to this mass;
    /// 1 = off.
    pub typical_p: f32,
    /// Divides a positive logit (multiplies a negative one) of every token seen in the window; 1 = off.
    pub repeat_penalty: f32,
    /// Subtracted once from the logit of every token seen in the window; 0 = off.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it appears in the window; 0 = off.
    pub frequency_penalty: f32,
    /// How many of the most recent tokens (prompt and generated) the penalties look at; 0 = none.
    pub penalty_last_n: usize,
    /// Added to these tokens' logits before anything else (`f32::NEG_INFINITY` bans a token).
    pub logit_bias: Vec<(u32, f32)>,
    /// Generation stops when the generated text contains one of these (found across token boundaries); the
    /// stop string and anything after it are not returned.
    pub stop: Vec<String>,
    pub seed: u64,
    /// What the output must match (JSON Schema, regex, grammar); `None` = free text.
    pub constraint: Option<Constraint>,
    /// `Some(n)`: report each generated token's log-probability and the `n` most likely alternatives
    /// ([`TokenLogprob`]; n ≤ [`MAX_TOP_LOGPROBS`]). Reporting only: sampling is the same either way.
    pub top_logprobs: Option<usize>,
}

/// Most alternatives a token's log-probability report lists (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// A generated token's log-probability under the model: the log-softmax of its logits as the model gave them
/// (before logit bias, penalties, temperature and constraint, as vLLM reports by default), with the most
/// likely tokens at that step. A token a constraint forced without sampling has no logits of its own: its
/// `logprob` is 0 (the constraint left no alternative) and `top` is empty.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    /// (token, log-probability), most likely first.
    pub top: Vec<(u32, f32)>,
    /// Entropy of the step's whole next-token distribution, in nats: how unsure the model was there (the
    /// confidence signal of escalation, [`crate::escalate`]). 0 for a forced token.
    pub entropy: f32,
}

impl TokenLogprob {
    /// `token`'s entry from its step's `logits`, with the `n` best alternatives.
    pub fn from_logits(logits: &[f32], token: u32, n: usize) -> Self {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // One pass for both: Z = Σ e^(l−max) and Σ e^(l−max)·(l−max); H = ln Z − that / Z.
        let (z, zl) = logits.iter().fold((0f32, 0f32), |(z, zl), &l| {
            let d = l - max;
            let e = d.exp();
            (z + e, if e > 0.0 { zl + e * d } else { zl })
        });
        let log_z = max + z.ln();
        let entropy = (z.ln() - zl / z).max(0.0);
        let lp = |t: u32| logits.get(t as usize).map_or(f32::NEG_INFINITY, |&l| l - log_z);
        let mut top: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
        if n > 0 {
            // One pass keeping the n best (n ≤ 20: insertion into a short sorted list).
            for (i, &l) in logits.iter().enumerate() {
                if top.len() == n && l <= top[n - 1].1 {
                    continue;
                }
                let at = top.partition_point(|&(_, b)| b >= l);
                top.insert(at, (i as u32, l));
                top.truncate(n);
            }
            top.iter_mut().for_each(|e| e.1 -= log_z);
        }
        TokenLogprob { token, logprob: lp(token), top, entropy }
    }

    /// A forced token's entry (see the type's note).
    pub fn forced(token: u32) -> Self {
        TokenLogprob { token, logprob: 0.0, top: Vec::new(), entropy: 0.0 }
    }
}

/// The defaults every surface uses (the CLI's flags, `sprig_sampling_params_default` in C, Kotlin's
/// `SamplingParams()` through JNI): greedy, so the same prompt gives the same answer until a caller asks for
/// sampling; top-k/top-p and the penalty window as llama.cpp's for when it does; every other filter off.
impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.0,
            typical_p: 1.0,
            repeat_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            penalty_last_n: 64,
            logit_bias: Vec::new(),
            stop: Vec::new(),
            seed: 0,
            constraint: None,
            top_logprobs: None,
        }
    }
}

/// Most tokens one generation makes unless the caller says (C/JNI `max_tokens`, the CLI's `-n` of `run`).
pub const DEFAULT_MAX_TOKENS: usize = 256;

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        let bad = |param: &'static str, detail: String| Err(EngineError::Sampling { param, detail });
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad("temperature", format!("must be a finite number >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("must be in (0, 1], got {}", self.top_p));
        }
        if !(self.min_p >= 0.0 && self.min_p < 1.0) {
            return bad("min_p", format!("must be in [0, 1), got {}", self.min_p));
        }
        if !(self.typical_p > 0.0 && self.typical_p <= 1.0) {
            return bad("typical_p", format!("must be in (0, 1], got {}", self.typical_p));
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            return bad("repeat_penalty", format!("must be a finite number > 0, got {}", self.repeat_penalty));
        }
        for (name, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)]
        {
            if !v.is_finite() {
                return bad(name, format!("must be finite, got {v}"));
            }
        }
        if self.penalty_last_n > 1 << 20 {
            return bad("penalty_last_n", format!("{} is implausibly large", self.penalty_last_n));
        }
        if let Some((t, b)) = self.logit_bias.iter().find(|(_, b)| b.is_nan() || *b == f32::INFINITY) {
            return bad("logit_bias", format!("token {t}: bias {b} (finite, or -inf to ban the token)"));
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return bad("stop", format!("{} stop strings (at most {MAX_STOP_STRINGS})", self.stop.len()));
        }
        if let Some(s) = self.stop.iter().find(|s| s.is_empty() || s.len() > MAX_STOP_BYTES) {
            return bad("stop", format!("stop string of {} bytes (1..={MAX_STOP_BYTES})", s.len()));
        }
        if let Some(n) = self.top_logprobs.filter(|&n| n > MAX_TOP_LOGPROBS) {
            return bad("top_logprobs", format!("{n} alternatives (at most {MAX_TOP_LOGPROBS})"));
        }
        Ok(())
    }

    fn penalties_on(&self) -> bool {
        self.penalty_last_n > 0
            && (self.repeat_penalty != 1.0 || self.presence_penalty != 0.0 || self.frequency_penalty != 0.0)
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// (logit or probability, id) scratch reused across tokens.
    cand: Vec<(f32, u32)>,
    /// The last `penalty_last_n` tokens seen, oldest first, and how often each token id occurs among them.
    recent: VecDeque<u32>,
    counts: Vec<u32>,
    /// Words drawn from `rng` (one per sampled token; a saved session replays them).
    draws: u64,
    /// The request's constraint, compiled (the engine attaches it when the generation starts).
    guide: Option<Guide>,
}

impl Sampler {
    /// A sampler with its own random stream, seeded by `params.seed`.
    pub fn new(params: SamplingParams) -> Result<Self> {
        let rng = StdRng::seed_from_u64(params.seed);
        Self::with_rng(params, rng)
    }

    /// A sampler drawing from `rng` (a session's stream, which carries on across its requests).
    pub fn with_rng(params: SamplingParams, rng: StdRng) -> Result<Self> {
        params.validate()?;
        let window = if params.penalties_on() { params.penalty_last_n } else { 0 };
        Ok(Sampler {
            params,
            rng,
            cand: Vec::new(),
            recent: VecDeque::with_capacity(window),
            counts: Vec::new(),
            draws: 0,
            guide: None,
        })
    }

    /// The random stream, to hand back to the session.
    pub fn into_rng(self) -> StdRng {
        self.rng
    }

    /// Words drawn from the random stream so far.
    pub fn draws(&self) -> u64 {
        self.draws
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Constrains what follows to `guide` (a fresh one per generation).
    pub fn constrain(&mut self, guide: Guide) {
        self.guide = Some(guide);
    }

    /// The constraint in force, if any.
    pub fn guide(&mut self) -> Option<&mut Guide> {
        self.guide.as_mut()
    }

    /// Records a token of the sequence (prompt or generated) for the penalties' window.
    pub fn accept(&mut self, token: u32) {
        if !self.params.penalties_on() {
            return;
        }
        let t = token as usize;
        if self.counts.len() <= t {
            self.counts.resize(t + 1, 0);
        }
        if self.recent.len() == self.params.penalty_last_n {
            if let Some(old) = self.recent.pop_front() {
                self.counts[old as usize] -= 1;
            }
        }
        self.recent.push_back(token);
        self.counts[t] += 1;
    }

    /// Picks the next token from `logits` (under a constraint: an allowed one, committed to the constraint).
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if let Some(i) = logits.iter().position(|l| !l.is_finite()) {
            return Err(EngineError::BadLogits { index: i, value: logits[i] });
        }
        let Some(mut guide) = self.guide.take() else { return self.draw(logits, None) };
        let r = self.draw(logits, None).and_then(|t| match guide.allows(t)? {
            true => Ok(t),
            false => {
                let mask = guide.mask()?;
                self.draw(logits, Some(&mask))
            }
        });
        let r = r.and_then(|t| guide.commit(t).map(|()| t));
        self.guide = Some(guide);
        r
    }

    /// Speculative verification of `draft`, a token a drafter proposed after the tokens seen so far, against
    /// `logits` (the model's at that position). Drafts here are deterministic (the drafter's distribution is
    /// a point mass), so the rule of speculative sampling (Leviathan et al. 2023) becomes: accept the draft
    /// with the chain's probability of it, otherwise draw from the chain's distribution without it — together
    /// exactly the chain's distribution. Greedy: the chain's pick, accepted when it is the draft. Returns the
    /// token and whether it is the draft.
    ///
    /// Under a constraint (the draft already validated against it): the chain is the constrained one — greedy
    /// checks its pick first and masks only when the constraint rejects it, as [`Sampler::sample`] does, so
    /// the tokens are those of plain decoding; sampled, the full mask gives the constrained distribution. The
    /// returned token is committed to the constraint.
    pub fn verify(&mut self, logits: &[f32], draft: u32) -> Result<(u32, bool)> {
        if let Some(i) = logits.iter().position(|l| !l.is_finite()) {
            return Err(EngineError::BadLogits { index: i, value: logits[i] });
        }
        let Some(mut guide) = self.guide.take() else { return self.verify_with(logits, draft, None) };
        let r = (|| {
            let (t, ok) = match self.chain(logits, None)? {
                Some(t) if guide.allows(t)? => (t, t == draft),
                Some(_) => {
                    let mask = guide.mask()?;
                    let t = self.draw(logits, Some(&mask))?;
                    (t, t == draft)
                }
                None => {
                    let mask = guide.mask()?;
                    self.verify_with(logits, draft, Some(&mask))?
                }
            };
            guide.commit(t)?;
            Ok((t, ok))
        })();
        self.guide = Some(guide);
        r
    }

    /// [`Sampler::verify`] over the chain with the tokens `mask` forbids removed.
    fn verify_with(&mut self, logits: &[f32], draft: u32, mask: Option<&SimpleVob>) -> Result<(u32, bool)> {
        if let Some(t) = self.chain(logits, mask)? {
            return Ok((t, t == draft));
        }
        let total: f32 = self.cand.iter().map(|c| c.0).sum();
        let p_draft = self.cand.iter().find(|c| c.1 == draft).map_or(0.0, |c| c.0) / total;
        self.draws += 1;
        if self.rng.gen::<f32>() < p_draft {
            return Ok((draft, true));
        }
        self.cand.retain(|c| c.1 != draft);
        if self.cand.is_empty() {
            return Ok((draft, true));
        }
        Ok((self.pick(), false))
    }

    /// A draw from the chain over `logits`, with the tokens `mask` forbids removed after bias and penalties.
    fn draw(&mut self, logits: &[f32], mask: Option<&SimpleVob>) -> Result<u32> {
        match self.chain(logits, mask)? {
            Some(t) => Ok(t),
            None => Ok(self.pick()),
        }
    }

    /// One draw from the candidates the chain left (unnormalised weights, largest first).
    fn pick(&mut self) -> u32 {
        let total: f32 = self.cand.iter().map(|c| c.0).sum();
        // One u32 word per draw (rand 0.8's f32), counted so a saved session can replay the stream.
        let mut r = self.rng.gen::<f32>() * total;
        self.draws += 1;
        for c in &self.cand {
            r -= c.0;
            if r <= 0.0 {
                return c.1;
            }
        }
        self.cand[self.cand.len() - 1].1
    }

    /// The chain up to the draw: the token when it is decided without one (greedy), else `None` with the
    /// candidates and their unnormalised probabilities in `self.cand`, largest first.
    fn chain(&mut self, logits: &[f32], mask: Option<&SimpleVob>) -> Result<Option<u32>> {
        let p = &self.params;
        if p.temperature < GREEDY_BELOW && p.logit_bias.is_empty() && !p.penalties_on() && mask.is_none() {
            // Nothing changes the logits: the best one, without copying them.
            return Ok(Some(argmax(logits)));
        }
        self.cand.clear();
        self.cand.extend(logits.iter().enumerate().map(|(i, &l)| (l, i as u32)));
        for &(t, b) in &p.logit_bias {
            let c = self.cand.get_mut(t as usize).ok_or_else(|| EngineError::Sampling {
                param: "logit_bias",
                detail: format!("token {t} is outside the vocabulary of {}", logits.len()),
            })?;
            c.0 += b;
        }
        if p.penalties_on() {
            if self.counts.len() < logits.len() {
                // Once: sized to the vocabulary, so decode never grows it.
                self.counts.resize(logits.len(), 0);
            }
            for &t in &self.recent {
                let n = self.counts[t as usize];
                let c = &mut self.cand[t as usize];
                // Each distinct token once: the first time its count is still unapplied.
                if c.1 == t {
                    c.0 = if c.0 > 0.0 { c.0 / p.repeat_penalty } else { c.0 * p.repeat_penalty };
                    c.0 -= n as f32 * p.frequency_penalty + p.presence_penalty;
                    c.1 = u32::MAX; // marked: penalised
                }
            }
            // Unmark: only the window's tokens were touched.
            for &t in &self.recent {
                self.cand[t as usize].1 = t;
            }
        }
        if let Some(m) = mask {
            for c in self.cand.iter_mut() {
                if !((c.1 as usize) < m.len() && m.is_allowed(c.1)) {
                    c.0 = f32::NEG_INFINITY;
                }
            }
        }
        if p.temperature < GREEDY_BELOW {
            return Ok(Some(best(&self.cand)));
        }
        let t = p.temperature;
        self.cand.iter_mut().for_each(|c| c.0 /= t);
        self.cand.retain(|c| c.0 != f32::NEG_INFINITY);
        if self.cand.is_empty() {
            return Err(EngineError::Sampling { param: "logit_bias", detail: "every token is banned".into() });
        }
        let k = if p.top_k == 0 { self.cand.len() } else { p.top_k.min(self.cand.len()) };
        if k < self.cand.len() {
            self.cand.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
            self.cand.truncate(k);
        }
        self.cand.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
        // Probabilities (unnormalised until each filter needs them), largest first.
        let max = self.cand[0].0;
        self.cand.iter_mut().for_each(|c| c.0 = (c.0 - max).exp());
        if p.typical_p < 1.0 {
            typical(&mut self.cand, p.typical_p);
        }
        if p.top_p < 1.0 {
            let sum: f32 = self.cand.iter().map(|c| c.0).sum();
            let mut acc = 0.0;
            let mut keep = self.cand.len();
            for (i, c) in self.cand.iter().enumerate() {
                acc += c.0 / sum;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            self.cand.truncate(keep);
        }
        if p.min_p > 0.0 {
            let floor = self.cand[0].0 * p.min_p;
            self.cand.retain(|c| c.0 >= floor);
        }
        Ok(None)
    }
}

/// Locally typical sampling (Meister et al.): keeps the tokens whose surprise `-ln p` is closest to the
/// entropy, in that order, until their mass reaches `mass`; leaves them sorted by probability again.
fn typical(cand: &mut Vec<(f32, u32)>, mass: f32) {
    let sum: f32 = cand.iter().map(|c| c.0).sum();
    let entropy: f32 = cand.iter().map(|c| c.0 / sum).filter(|&q| q > 0.0).map(|q| -q * q.ln()).sum();
    let shift = |c: &(f32, u32)| (-(c.0 / sum).ln() - entropy).abs();
    cand.sort_unstable_by(|a, b| shift(a).total_cmp(&shift(b)));
    let mut acc = 0.0;
    let mut keep = cand.len();
    for (i, c) in cand.iter().enumerate() {
        acc += c.0 / sum;
        if acc >= mass {
            keep = i + 1;
            break;
        }
    }
    cand.truncate(keep);
    cand.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
}

/// The best candidate (first on ties, as llama2.c).
fn best(cand: &[(f32, u32)]) -> u32 {
    let mut b = 0;
    for (i, c) in cand.iter().enumerate() {
        if c.0 > cand[b].0 {
            b = i;
        }
    }
    cand[b].1
}

pub use sprig_models::argmax;

#[cfg(test)]
mod tests {
    use super::*;

    /// The exact distribution the chain should draw from, computed directly in f64 from its definition: bias,
    /// penalties over `history`, softmax(logits / t), top-k, typical-p, top-p, min-p, renormalised.
    fn expected(logits: &[f32], p: &SamplingParams, history: &[u32]) -> Vec<f64> {
        let mut l: Vec<f64> = logits.iter().map(|&x| x as f64).collect();
        for &(t, b) in &p.logit_bias {
            l[t as usize] += b as f64;
        }
        let window = &history[history.len().saturating_sub(p.penalty_last_n)..];
        for (i, li) in l.iter_mut().enumerate() {
            let n = window.iter().filter(|&&t| t as usize == i).count();
            if n > 0 {
                let r = p.repeat_penalty as f64;
                *li = if *li > 0.0 { *li / r } else { *li * r };
                *li -= n as f64 * p.frequency_penalty as f64 + p.presence_penalty as f64;
            }
        }
        let t = p.temperature as f64;
        let mut order: Vec<usize> = (0..l.len()).filter(|&i| l[i].is_finite()).collect();
        order.sort_by(|&a, &b| l[b].total_cmp(&l[a]));
        if p.top_k > 0 {
            order.truncate(p.top_k);
        }
        let prob = |set: &[usize]| -> Vec<f64> {
            let w: Vec<f64> = set.iter().map(|&i| (l[i] / t).exp()).collect();
            let z: f64 = w.iter().sum();
            w.iter().map(|x| x / z).collect()
        };
        let cut = |set: &[usize], q: &[f64], mass: f64| -> Vec<usize> {
            let mut acc = 0.0;
            for (j, x) in q.iter().enumerate() {
                acc += x;
                if acc >= mass {
                    return set[..=j].to_vec();
                }
            }
            set.to_vec()
        };
        if p.typical_p < 1.0 {
            let q = prob(&order);
            let h: f64 = q.iter().map(|x| -x * x.ln()).sum();
            let mut by: Vec<(usize, f64)> = order.iter().copied().zip(q.iter().copied()).collect();
            by.sort_by(|a, b| (-a.1.ln() - h).abs().total_cmp(&(-b.1.ln() - h).abs()));
            let (set, qs): (Vec<usize>, Vec<f64>) = by.into_iter().unzip();
            order = cut(&set, &qs, p.typical_p as f64);
            order.sort_by(|&a, &b| l[b].total_cmp(&l[a]));
        }
        if p.top_p < 1.0 {
            let q = prob(&order);
            order = cut(&order, &q, p.top_p as f64);
        }
        if p.min_p > 0.0 {
            let q = prob(&order);
            let top = q[0];
            order = order.iter().zip(&q).filter(|(_, &x)| x >= top * p.min_p as f64).map(|(&i, _)| i).collect();
        }
        let q = prob(&order);
        let mut out = vec![0.0; l.len()];
        for (&i, &x) in order.iter().zip(&q) {
            out[i] = x;
        }
        out
    }

    /// Pearson's chi-square of `draws` samples against `probs`; tokens of probability 0 must never be drawn.
    fn chi_square(params: SamplingParams, logits: &[f32], history: &[u32], probs: &[f64], draws: usize) -> f64 {
        let mut s = Sampler::new(params).unwrap();
        history.iter().for_each(|&t| s.accept(t));
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..draws {
            counts[s.sample(logits).unwrap() as usize] += 1;
        }
        let mut chi = 0.0;
        for (i, &p) in probs.iter().enumerate() {
            if p == 0.0 {
                assert_eq!(counts[i], 0, "token {i} has probability 0 but was drawn {} times", counts[i]);
                continue;
            }
            let e = p * draws as f64;
            chi += (counts[i] as f64 - e).powi(2) / e;
        }
        chi
    }

    const LOGITS: [f32; 8] = [2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0];

    fn sampling(temperature: f32) -> SamplingParams {
        SamplingParams { temperature, top_k: 0, top_p: 1.0, seed: 7, ..Default::default() }
    }

    #[test]
    fn sampled_frequencies_follow_the_exact_distribution() {
        let base = sampling(1.0);
        let history = [1u32, 1, 3, 0, 6];
        let cases: Vec<(&str, SamplingParams)> = vec![
            ("softmax", base.clone()),
            ("t=0.5", sampling(0.5)),
            ("t=2", sampling(2.0)),
            ("top-k 3", SamplingParams { top_k: 3, ..base.clone() }),
            ("top-p 0.8", SamplingParams { top_p: 0.8, ..base.clone() }),
            ("min-p 0.2", SamplingParams { min_p: 0.2, ..base.clone() }),
            ("typical 0.7", SamplingParams { typical_p: 0.7, ..base.clone() }),
            ("repeat 1.5", SamplingParams { repeat_penalty: 1.5, ..base.clone() }),
            ("presence+frequency", SamplingParams { presence_penalty: 0.4, frequency_penalty: 0.3, ..base.clone() }),
            ("window 2", SamplingParams { repeat_penalty: 2.0, penalty_last_n: 2, ..base.clone() }),
            ("logit bias", SamplingParams { logit_bias: vec![(7, 4.0), (0, f32::NEG_INFINITY)], ..base.clone() }),
            (
                "chain",
                SamplingParams {
                    temperature: 0.7,
                    top_k: 6,
                    typical_p: 0.95,
                    top_p: 0.9,
                    min_p: 0.05,
                    repeat_penalty: 1.3,
                    frequency_penalty: 0.1,
                    logit_bias: vec![(5, 1.0)],
                    ..base.clone()
                },
            ),
        ];
        for (what, p) in cases {
            let probs = expected(&LOGITS, &p, &history);
            let chi = chi_square(p, &LOGITS, &history, &probs, 20_000);
            // 99.9th percentile of chi-square with ≤ 7 degrees of freedom is ≤ 24.3.
            assert!(chi < 24.3, "{what}: chi-square {chi:.1}");
        }
    }

    #[test]
    fn speculative_verification_keeps_the_exact_distribution() {
        // Whatever the draft (likely, unlikely, filtered out by top-k), accept-or-resample gives the chain's
        // distribution, and the draft is accepted as often as the chain would pick it.
        let base = sampling(1.0);
        for p in [base.clone(), SamplingParams { temperature: 0.7, top_k: 4, repeat_penalty: 1.3, ..base.clone() }] {
            let history = [1u32, 3];
            let probs = expected(&LOGITS, &p, &history);
            for draft in [0u32, 3, 7] {
                let mut s = Sampler::new(p.clone()).unwrap();
                history.iter().for_each(|&t| s.accept(t));
                let (n, mut counts, mut accepted) = (20_000, vec![0usize; LOGITS.len()], 0);
                for _ in 0..n {
                    let (t, ok) = s.verify(&LOGITS, draft).unwrap();
                    assert_eq!(ok, t == draft);
                    counts[t as usize] += 1;
                    accepted += usize::from(ok);
                }
                let mut chi = 0.0;
                for (i, &q) in probs.iter().enumerate() {
                    if q == 0.0 {
                        assert_eq!(counts[i], 0, "{p:?} draft {draft}: token {i} drawn with probability 0");
                        continue;
                    }
                    chi += (counts[i] as f64 - q * n as f64).powi(2) / (q * n as f64);
                }
                assert!(chi < 24.3, "{p:?} draft {draft}: chi-square {chi:.1}");
                assert_eq!(accepted, counts[draft as usize]);
            }
        }
        // Greedy: the chain's pick, accepted only when it is the draft.
        let mut g = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(g.verify(&LOGITS, 0).unwrap(), (0, true));
        assert_eq!(g.verify(&LOGITS, 2).unwrap(), (0, false));
    }

    #[test]
    fn the_frequency_check_catches_a_wrong_distribution() {
        // The check against a distribution the sampler does not follow must fail: the test above can fail.
        let probs = expected(&LOGITS, &sampling(0.5), &[]);
        assert!(chi_square(sampling(1.0), &LOGITS, &[], &probs, 20_000) > 100.0);
        // A penalty the expectation knows of but the sampler is not told about.
        let with = SamplingParams { repeat_penalty: 3.0, ..sampling(1.0) };
        let probs = expected(&LOGITS, &with, &[0, 0, 1]);
        assert!(chi_square(sampling(1.0), &LOGITS, &[0, 0, 1], &probs, 20_000) > 100.0);
    }

    #[test]
    fn tiny_temperature_is_greedy_after_bias_and_penalties() {
        let logits = [0.5f32, 3.0, 2.9, -1.0];
        let mut s = Sampler::new(SamplingParams { temperature: 1e-39, ..sampling(1.0) }).unwrap();
        assert!((0..100).all(|_| s.sample(&logits).unwrap() == 1));
        let mut s = Sampler::new(SamplingParams { repeat_penalty: 2.0, ..SamplingParams::default() }).unwrap();
        s.accept(1);
        assert_eq!(s.sample(&logits).unwrap(), 2, "3.0 / 2 < 2.9");
        let mut s = Sampler::new(SamplingParams { logit_bias: vec![(3, 10.0)], ..Default::default() }).unwrap();
        assert_eq!(s.sample(&logits).unwrap(), 3);
    }

    #[test]
    fn token_logprobs_are_the_log_softmax_with_the_best_alternatives() {
        let logits = [1.0f32, 3.0, -2.0, 3.0, 0.5];
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        let lp = |i: usize| ((logits[i] as f64).exp() / z).ln() as f32;
        let e = TokenLogprob::from_logits(&logits, 4, 3);
        assert!((e.logprob - lp(4)).abs() < 1e-5);
        // Most likely first; ties keep the lower id first.
        let ids: Vec<u32> = e.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 3, 0]);
        for &(i, l) in &e.top {
            assert!((l - lp(i as usize)).abs() < 1e-5);
        }
        let entropy: f64 = (0..logits.len()).map(|i| -(lp(i) as f64).exp() * lp(i) as f64).sum();
        assert!((e.entropy as f64 - entropy).abs() < 1e-5, "{} vs {entropy}", e.entropy);
        // A certain step (one token takes all the mass) has entropy 0.
        assert!(TokenLogprob::from_logits(&[0.0, f32::NEG_INFINITY, 90.0], 2, 1).entropy.abs() < 1e-6);
        assert!(TokenLogprob::from_logits(&logits, 1, 0).top.is_empty());
        // More alternatives than tokens: all of them.
        assert_eq!(TokenLogprob::from_logits(&logits, 0, 20).top.len(), 5);
    }

    #[test]
    fn greedy_and_bad_params() {
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0]).unwrap(), 1);
        let d = SamplingParams::default;
        for bad in [
            SamplingParams { temperature: -1.0, ..d() },
            SamplingParams { temperature: f32::NAN, ..d() },
            SamplingParams { top_p: 0.0, ..d() },
            SamplingParams { top_p: 1.5, ..d() },
            SamplingParams { min_p: 1.0, ..d() },
            SamplingParams { min_p: -0.1, ..d() },
            SamplingParams { typical_p: 0.0, ..d() },
            SamplingParams { repeat_penalty: 0.0, ..d() },
            SamplingParams { presence_penalty: f32::INFINITY, ..d() },
            SamplingParams { logit_bias: vec![(1, f32::NAN)], ..d() },
            SamplingParams { stop: vec![String::new()], ..d() },
            SamplingParams { stop: vec!["x".repeat(300)], ..d() },
            SamplingParams { top_logprobs: Some(21), ..d() },
        ] {
            assert!(Sampler::new(bad.clone()).is_err(), "{bad:?}");
        }
        // A bias on a token outside the vocabulary, or non-finite logits: an error, not a random token.
        let mut s = Sampler::new(SamplingParams { logit_bias: vec![(9, 1.0)], ..d() }).unwrap();
        assert!(s.sample(&[0.0; 4]).is_err());
        let mut s = Sampler::new(sampling(1.0)).unwrap();
        for x in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            assert!(matches!(s.sample(&[0.0, x, 1.0]), Err(EngineError::BadLogits { index: 1, .. })));
        }
        let mut s = Sampler::new(SamplingParams { logit_bias: vec![(0, f32::NEG_INFINITY)], ..sampling(1.0) }).unwrap();
        assert!(s.sample(&[1.0]).is_err(), "every token banned");
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_is_reproducible() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 7919) % 101) as f32 / 10.0).collect();
        let mut s = Sampler::new(SamplingParams { top_k: 1, ..sampling(1.0) }).unwrap();
        assert_eq!(s.sample(&logits).unwrap(), argmax(&logits));
        let p = SamplingParams { temperature: 0.8, top_k: 50, top_p: 0.9, seed: 42, ..Default::default() };
        let (mut a, mut b) = (Sampler::new(p.clone()).unwrap(), Sampler::new(p).unwrap());
        let xa: Vec<u32> = (0..20).map(|_| a.sample(&logits).unwrap()).collect();
        let xb: Vec<u32> = (0..20).map(|_| b.sample(&logits).unwrap()).collect();
        assert_eq!(xa, xb);
        // top-p 0.9 of a peaked distribution only ever yields the top token.
        let mut peaked = vec![0.0f32; 100];
        peaked[7] = 20.0;
        let mut s = Sampler::new(SamplingParams { top_p: 0.9, ..sampling(1.0) }).unwrap();
        assert!((0..50).all(|_| s.sample(&peaked).unwrap() == 7));
    }
}
