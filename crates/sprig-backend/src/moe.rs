//! Mixture-of-Experts routing shared by backends: the router's scores, top-k selection and weighting.

use sprig_format::config::{Activation, RouterScoring};

/// One MoE FFN layer's routing and expert geometry.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MoeParams {
    pub n_experts: usize,
    pub top_k: usize,
    /// Hidden size of one expert.
    pub expert_hidden: usize,
    pub scoring: RouterScoring,
    /// Renormalise the selected experts' weights to sum to 1.
    pub norm_topk: bool,
    /// Multiplies the final routing weights (1 = none).
    pub routed_scale: f32,
    pub activation: Activation,
}

/// Stacked expert weights: `gate`/`up` are `[n_experts * expert_hidden, dim]`, `down` is `[n_experts * dim,
/// expert_hidden]`; expert e owns the e-th contiguous block of rows of each, so it can be read alone.
pub struct ExpertWeights<'a, W> {
    pub gate: &'a W,
    pub up: &'a W,
    pub down: &'a W,
}

/// What one MoE layer did, accumulated over forward passes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MoeUsage {
    /// Tokens routed to each expert.
    pub tokens: Vec<u64>,
    /// Expert weight bytes handed to the kernels (an expert used by several tokens of one batch counts once).
    pub bytes_read: u64,
}

impl MoeUsage {
    pub fn new(n_experts: usize) -> Self {
        MoeUsage { tokens: vec![0; n_experts], bytes_read: 0 }
    }
    /// Counts one run of expert `e` over `tokens` tokens, reading `bytes` of weights.
    pub fn record(&mut self, e: usize, tokens: usize, bytes: u64) {
        if self.tokens.len() <= e {
            self.tokens.resize(e + 1, 0);
        }
        self.tokens[e] += tokens as u64;
        self.bytes_read += bytes;
    }
}

/// Weight bytes one expert's run reads: its share of the three stacked projections (`*_bytes` = each stacked
/// tensor's stored bytes). The one rule every backend's `bytes_read` follows.
pub fn expert_bytes(gate_bytes: usize, up_bytes: usize, down_bytes: usize, n_experts: usize) -> u64 {
    (gate_bytes + up_bytes + down_bytes) as u64 / n_experts.max(1) as u64
}

/// The experts one token goes to and their weights, strongest first. `scores` is scratch.
///
/// Softmax scoring: probabilities over all experts, the top-k kept (renormalised if `norm_topk` — the same as
/// Mixtral's softmax over the top-k logits). Sigmoid scoring (DeepSeek-V3 style): independent sigmoids, the
/// top-k kept, optionally renormalised. Ties go to the lower expert index.
pub fn route(logits: &[f32], p: &MoeParams, scores: &mut Vec<f32>, out: &mut Vec<(usize, f32)>) {
    assert_eq!(logits.len(), p.n_experts, "router logits: width");
    scores.clear();
    match p.scoring {
        RouterScoring::Softmax => {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            scores.extend(logits.iter().map(|&l| (l - max).exp()));
            let sum: f32 = scores.iter().sum();
            scores.iter_mut().for_each(|s| *s /= sum);
        }
        RouterScoring::Sigmoid => scores.extend(logits.iter().map(|&l| 1.0 / (1.0 + (-l).exp()))),
    }
    out.clear();
    out.extend(scores.iter().copied().enumerate());
    // Partial selection then a sort of the k winners: O(E + k log k). NaN scores (a broken model) sort last.
    let key = |a: &(usize, f32), b: &(usize, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let k = p.top_k.min(out.len());
    if k < out.len() {
        out.select_nth_unstable_by(k - 1, key);
        out.truncate(k);
    }
    out.sort_by(key);
    if p.norm_topk {
        let sum: f32 = out.iter().map(|e| e.1).sum();
        if sum > 0.0 {
            out.iter_mut().for_each(|e| e.1 /= sum);
        }
    }
    if p.routed_scale != 1.0 {
        out.iter_mut().for_each(|e| e.1 *= p.routed_scale);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(scoring: RouterScoring, top_k: usize, norm: bool) -> MoeParams {
        MoeParams {
            n_experts: 4,
            top_k,
            expert_hidden: 8,
            scoring,
            norm_topk: norm,
            routed_scale: 1.0,
            activation: Activation::Silu,
        }
    }

    #[test]
    fn softmax_top2_with_and_without_renormalisation() {
        let logits = [1.0f32, 3.0, 2.0, -1.0];
        let (mut s, mut r) = (vec![], vec![]);
        route(&logits, &params(RouterScoring::Softmax, 2, false), &mut s, &mut r);
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        assert_eq!(r.iter().map(|e| e.0).collect::<Vec<_>>(), [1, 2]);
        assert!((r[0].1 - 3f32.exp() / z).abs() < 1e-6 && (r[1].1 - 2f32.exp() / z).abs() < 1e-6);
        route(&logits, &params(RouterScoring::Softmax, 2, true), &mut s, &mut r);
        // Renormalised top-2 softmax = softmax over the two logits (Mixtral).
        let z2 = 3f32.exp() + 2f32.exp();
        assert!((r[0].1 - 3f32.exp() / z2).abs() < 1e-6 && (r[1].1 - 2f32.exp() / z2).abs() < 1e-6);
    }

    #[test]
    fn sigmoid_scoring_ties_and_scale() {
        let (mut s, mut r) = (vec![], vec![]);
        let mut p = params(RouterScoring::Sigmoid, 3, false);
        p.routed_scale = 2.0;
        route(&[0.0, 0.0, 5.0, 0.0], &p, &mut s, &mut r);
        // Ties among the zeros go to the lowest indices.
        assert_eq!(r.iter().map(|e| e.0).collect::<Vec<_>>(), [2, 0, 1]);
        assert!((r[1].1 - 1.0).abs() < 1e-6, "sigmoid(0) * 2 = 1");
        // All experts, uniform logits: softmax weights 1/E each, exactly.
        route(&[0.0; 4], &params(RouterScoring::Softmax, 4, true), &mut s, &mut r);
        assert!(r.iter().all(|e| e.1 == 0.25));
    }
}
