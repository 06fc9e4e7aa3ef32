//! Token sampling: greedy, temperature, top-k, top-p, seeded.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{EngineError, Result};

/// Temperatures below this sample greedily.
pub const GREEDY_BELOW: f32 = 1e-6;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy; below [`GREEDY_BELOW`] also greedy (dividing by it would overflow the logits).
    pub temperature: f32,
    /// 0 = no top-k cut.
    pub top_k: usize,
    /// 1.0 = no nucleus cut.
    pub top_p: f32,
    pub seed: u64,
}

/// The defaults every surface uses (the CLI's flags, `sprig_sampling_params_default` in C, Kotlin's
/// `SamplingParams()` through JNI): greedy, so the same prompt gives the same answer until a caller asks for
/// sampling; top-k/top-p as llama.cpp's for when it does.
impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_k: 40, top_p: 0.95, seed: 0 }
    }
}

/// Most tokens one generation makes unless the caller says (C/JNI `max_tokens`, the CLI's `-n` of `run`).
pub const DEFAULT_MAX_TOKENS: usize = 256;

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(EngineError::Sampling {
                param: "temperature",
                detail: format!("must be a finite number >= 0, got {}", self.temperature),
            });
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(EngineError::Sampling { param: "top_p", detail: format!("must be in (0, 1], got {}", self.top_p) });
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// (logit, id) scratch reused across tokens.
    cand: Vec<(f32, u32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        Ok(Sampler { rng: StdRng::seed_from_u64(params.seed), params, cand: Vec::new() })
    }

    /// Picks the next token from `logits`.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature < GREEDY_BELOW {
            return argmax(logits);
        }
        let t = self.params.temperature;
        self.cand.clear();
        self.cand.extend(logits.iter().enumerate().map(|(i, &l)| (l / t, i as u32)));
        let k = if self.params.top_k == 0 { self.cand.len() } else { self.params.top_k.min(self.cand.len()) };
        if k < self.cand.len() {
            self.cand.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
            self.cand.truncate(k);
        }
        self.cand.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
        let max = self.cand[0].0;
        let mut sum = 0.0f32;
        for c in self.cand.iter_mut() {
            c.0 = (c.0 - max).exp();
            sum += c.0;
        }
        // Nucleus: the smallest prefix whose probability reaches top_p.
        let mut keep = self.cand.len();
        if self.params.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, c) in self.cand.iter().enumerate() {
                acc += c.0 / sum;
                if acc >= self.params.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        let total: f32 = self.cand[..keep].iter().map(|c| c.0).sum();
        let mut r = self.rng.gen::<f32>() * total;
        for c in &self.cand[..keep] {
            r -= c.0;
            if r <= 0.0 {
                return c.1;
            }
        }
        self.cand[keep - 1].1
    }
}

/// Index of the largest logit (first on ties, as llama2.c).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exact distribution the sampler should draw from: softmax(logits / t), cut to the top k, then to the
    /// smallest prefix reaching p, renormalised (computed here directly, in f64).
    fn expected(logits: &[f32], t: f64, k: usize, p: f64) -> Vec<f64> {
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let max = logits[order[0]] as f64;
        let w: Vec<f64> = logits.iter().map(|&l| ((l as f64 - max) / t).exp()).collect();
        let keep_k = if k == 0 { logits.len() } else { k };
        let kept: Vec<usize> = order[..keep_k].to_vec();
        let z: f64 = kept.iter().map(|&i| w[i]).sum();
        let (mut acc, mut n) = (0.0, kept.len());
        for (j, &i) in kept.iter().enumerate() {
            acc += w[i] / z;
            if acc >= p {
                n = j + 1;
                break;
            }
        }
        let z2: f64 = kept[..n].iter().map(|&i| w[i]).sum();
        let mut out = vec![0.0; logits.len()];
        for &i in &kept[..n] {
            out[i] = w[i] / z2;
        }
        out
    }

    /// Pearson's chi-square of `draws` samples against `probs`; tokens of probability 0 must never be drawn.
    fn chi_square(params: SamplingParams, logits: &[f32], probs: &[f64], draws: usize) -> (f64, usize) {
        let mut s = Sampler::new(params).unwrap();
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..draws {
            counts[s.sample(logits) as usize] += 1;
        }
        let mut chi = 0.0;
        let mut dof = 0usize;
        for (i, &p) in probs.iter().enumerate() {
            if p == 0.0 {
                assert_eq!(counts[i], 0, "token {i} has probability 0 but was drawn {} times", counts[i]);
                continue;
            }
            let e = p * draws as f64;
            chi += (counts[i] as f64 - e).powi(2) / e;
            dof += 1;
        }
        (chi, dof.saturating_sub(1))
    }

    #[test]
    fn sampled_frequencies_follow_the_exact_distribution() {
        let logits = [2.0f32, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0];
        // (temperature, top-k, top-p): plain softmax at two temperatures, top-k > 1 alone, top-p cutting a real
        // tail alone, and the chain of both.
        for (t, k, p) in [(1.0, 0, 1.0), (0.5, 0, 1.0), (2.0, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.8), (0.7, 5, 0.9)] {
            let probs = expected(&logits, t as f64, k, p as f64);
            let params = SamplingParams { temperature: t, top_k: k, top_p: p, seed: 7 };
            let (chi, dof) = chi_square(params, &logits, &probs, 20_000);
            // 99.9th percentile of chi-square for dof ≤ 7 is ≤ 24.3.
            assert!(chi < 24.3, "t={t} k={k} p={p}: chi-square {chi:.1} with {dof} degrees of freedom");
        }
    }

    #[test]
    fn the_frequency_check_catches_a_wrong_distribution() {
        // The same check against a distribution the sampler does not follow (temperature 1 drawn, 0.5 expected)
        // must fail: the test above can fail.
        let logits = [2.0f32, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0];
        let probs = expected(&logits, 0.5, 0, 1.0);
        let (chi, _) =
            chi_square(SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 7 }, &logits, &probs, 20_000);
        assert!(chi > 100.0, "chi-square {chi}");
    }

    #[test]
    fn tiny_temperature_is_greedy() {
        let logits = [0.5f32, 3.0, 2.9, -1.0];
        let mut s = Sampler::new(SamplingParams { temperature: 1e-39, top_k: 0, top_p: 1.0, seed: 1 }).unwrap();
        assert!((0..100).all(|_| s.sample(&logits) == 1));
    }

    #[test]
    fn greedy_and_bad_params() {
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0]), 1);
        for bad in [
            SamplingParams { temperature: -1.0, ..Default::default() },
            SamplingParams { temperature: f32::NAN, ..Default::default() },
            SamplingParams { top_p: 0.0, ..Default::default() },
            SamplingParams { top_p: 1.5, ..Default::default() },
        ] {
            assert!(Sampler::new(bad).is_err());
        }
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_is_reproducible() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 7919) % 101) as f32 / 10.0).collect();
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_k: 1, top_p: 1.0, seed: 3 }).unwrap();
        assert_eq!(s.sample(&logits), argmax(&logits));
        let p = SamplingParams { temperature: 0.8, top_k: 50, top_p: 0.9, seed: 42 };
        let (mut a, mut b) = (Sampler::new(p.clone()).unwrap(), Sampler::new(p).unwrap());
        let xa: Vec<u32> = (0..20).map(|_| a.sample(&logits)).collect();
        let xb: Vec<u32> = (0..20).map(|_| b.sample(&logits)).collect();
        assert_eq!(xa, xb);
        // top-p 0.9 of a peaked distribution only ever yields the few top tokens.
        let mut peaked = vec![0.0f32; 100];
        peaked[7] = 20.0;
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_k: 0, top_p: 0.9, seed: 1 }).unwrap();
        assert!((0..50).all(|_| s.sample(&peaked) == 7));
    }
}
