//! Speculative decoding: a cheap drafter proposes the next few tokens, the model scores them all in one
//! forward pass (the prefill path: its weights read once for all of them) and keeps the longest prefix its own
//! sampling agrees with, plus one token of its own. Exact: greedy output is token for token plain decoding's,
//! sampled output has the same distribution ([`crate::Sampler::verify`]). Rejected positions are rolled back,
//! ring caches of sliding-window layers included ([`sprig_models::Model::rollback`]).
//!
//! Drafters: [`PromptLookup`] (n-grams of the context itself: code edits, RAG and tool output repeat it) and
//! [`DraftModel`] (a small model with the same tokenizer, keeping its own KV cache, resynchronised after
//! rejections). The draft length adapts to the acceptance; in `auto` mode speculation switches itself off for
//! the session when it decodes slower than plain decoding did.

use std::sync::Arc;
use std::time::Duration;

use sprig_backend::Backend;
use sprig_models::{Logits, State};

use crate::generate::Engine;
use crate::sampler::argmax;
use crate::{EngineError, Result};

/// Proposes tokens to follow a context.
pub trait Drafter: Send {
    /// Appends to `out` up to `k` tokens likely to follow `history` (every token of the sequence so far).
    fn draft(&mut self, history: &[u32], k: usize, out: &mut Vec<u32>) -> Result<()>;
    fn name(&self) -> String;
    /// [`Drafter::draft`] with the model being drafted for at hand (an MTP head reads its state); by default
    /// the model is not needed.
    fn draft_for(&mut self, _target: &mut dyn Target, history: &[u32], k: usize, out: &mut Vec<u32>) -> Result<()> {
        self.draft(history, k, out)
    }
    /// Whether the model's sequence state must carry what [`Drafter::draft_for`] reads (an MTP head's cache,
    /// enabled before the prompt runs).
    fn needs_target_state(&self) -> bool {
        false
    }
    /// Time the drafter spent since the last call catching up on a new stretch of context (a draft model
    /// reading a new prompt or turn), which the draft length and `auto`'s judgement leave out: a one-off per
    /// turn, not a cost of each pass.
    fn take_one_off(&mut self) -> Duration {
        Duration::ZERO
    }
}

/// The model being drafted for, as a drafter sees it: its sequence state after the last pass.
pub trait Target {
    /// Up to `k` drafts of the model's MTP head after `next`, the token about to run (see
    /// [`sprig_models::Model::mtp_draft`]), ending before a stop token.
    fn mtp_draft(&mut self, next: u32, k: usize, out: &mut Vec<u32>) -> Result<()>;
}

/// Drafting with the model's own multi-token-prediction head (GGUF `nextn` layers; DeepSeek-V3 and GLM-4.5
/// ship them): no second model, one extra block per drafted token, a cache fed with the hidden states of the
/// model's own passes.
#[derive(Clone, Debug, Default)]
pub struct MtpHead;

impl Drafter for MtpHead {
    fn draft(&mut self, _history: &[u32], _k: usize, _out: &mut Vec<u32>) -> Result<()> {
        Err(EngineError::Eval("an MTP head drafts from the model's own state (Drafter::draft_for)".into()))
    }

    fn draft_for(&mut self, target: &mut dyn Target, history: &[u32], k: usize, out: &mut Vec<u32>) -> Result<()> {
        match history.last() {
            Some(&next) => target.mtp_draft(next, k, out),
            None => Ok(()),
        }
    }

    fn needs_target_state(&self) -> bool {
        true
    }

    fn name(&self) -> String {
        "MTP head".into()
    }
}

/// A model and one of its sequence states, as the [`Target`] of a drafter.
pub(crate) struct TargetState<'a, B: Backend> {
    pub engine: &'a Engine<B>,
    pub state: &'a mut State<B>,
}

impl<B: Backend> Target for TargetState<'_, B> {
    fn mtp_draft(&mut self, next: u32, k: usize, out: &mut Vec<u32>) -> Result<()> {
        let start = out.len();
        self.engine.model.mtp_draft(self.state, next, k, out)?;
        if let Some(stop) = out[start..].iter().position(|&t| self.engine.tokenizer.is_stop(t)) {
            out.truncate(start + stop);
        }
        Ok(())
    }
}

/// Prompt-lookup drafting: finds the most recent earlier occurrence of the context's last n tokens (longest n
/// first) and proposes what followed it.
#[derive(Clone, Debug)]
pub struct PromptLookup {
    pub min_ngram: usize,
    pub max_ngram: usize,
}

impl Default for PromptLookup {
    fn default() -> Self {
        PromptLookup { min_ngram: 2, max_ngram: 4 }
    }
}

impl Drafter for PromptLookup {
    fn draft(&mut self, history: &[u32], k: usize, out: &mut Vec<u32>) -> Result<()> {
        let len = history.len();
        for n in (self.min_ngram.max(1)..=self.max_ngram).rev() {
            if len <= n {
                continue;
            }
            let tail = &history[len - n..];
            // The latest earlier match whose continuation is not the tail itself.
            if let Some(j) = (0..len - n).rev().find(|&j| &history[j..j + n] == tail) {
                let from = j + n;
                out.extend_from_slice(&history[from..(from + k).min(len)]);
                if !out.is_empty() {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn name(&self) -> String {
        format!("prompt lookup ({}..{}-grams)", self.min_ngram, self.max_ngram)
    }
}

/// A small model with the target's tokenizer, drafting greedily. It keeps its own KV cache: each call runs
/// only what it has not seen (after a rejection, from where the contexts part).
pub struct DraftModel<B: Backend> {
    engine: Arc<Engine<B>>,
    state: State<B>,
    /// Tokens `state` holds.
    held: Vec<u32>,
    logits: Vec<f32>,
    sliding: bool,
    /// See [`Drafter::take_one_off`].
    one_off: Duration,
}

/// Most context tokens a draft model catches up on as part of a pass (after one, the correction and the last
/// accepted draft); more is a new prompt or turn.
const PASS_CATCH_UP: usize = 2;

impl<B: Backend> DraftModel<B> {
    /// A drafter for `target` on `draft`'s weights, with a context of `ctx` (0: the draft model's). Refuses a
    /// model whose tokenizer is not the target's.
    pub fn new<T: Backend>(draft: Arc<Engine<B>>, target: &Engine<T>, ctx: usize) -> Result<Self> {
        if !draft.tokenizer.same_vocabulary(&target.tokenizer) {
            return Err(EngineError::Eval("the draft model's tokenizer differs from the target's; speculative decoding needs the same vocabulary".into()));
        }
        let state = draft.model.new_state(ctx)?;
        let sliding = draft.model.config.attention.iter().any(|k| *k != sprig_format::AttentionKind::Global);
        Ok(DraftModel { engine: draft, state, held: Vec::new(), logits: Vec::new(), sliding, one_off: Duration::ZERO })
    }
}

impl<B: Backend> Drafter for DraftModel<B> {
    fn draft(&mut self, history: &[u32], k: usize, out: &mut Vec<u32>) -> Result<()> {
        let m = &self.engine.model;
        // Reuse what the draft's cache holds of `history` (all of it but the last token, whose logits are
        // needed); a sliding-window draft model keeps its cache only when nothing was rejected.
        let mut common = self.held.iter().zip(history).take_while(|(a, b)| a == b).count().min(history.len().saturating_sub(1));
        if self.sliding && common < self.held.len() {
            common = 0;
        }
        if history.len() + k > self.state.max_context {
            // Out of the draft's context: no draft (the target goes on alone).
            return Ok(());
        }
        // Everything held still stands: what follows is new context (a prompt, a turn), not a pass's rejection
        // (nor a sliding-window draft's re-read after one, which recurs).
        let resumed = common == self.held.len();
        self.held.truncate(common);
        self.state.pos = common;
        let t0 = std::time::Instant::now();
        for chunk in history[common..].chunks(crate::generate::PREFILL_CHUNK) {
            m.forward(&mut self.state, chunk, Logits::Last)?;
        }
        if resumed && history.len() - common > PASS_CATCH_UP {
            self.one_off += t0.elapsed();
        }
        self.held.extend_from_slice(&history[common..]);
        for i in 0..k {
            m.read_logits(&self.state, &mut self.logits)?;
            let t = argmax(&self.logits);
            if self.engine.tokenizer.is_stop(t) {
                break;
            }
            out.push(t);
            if i + 1 < k {
                m.forward(&mut self.state, &[t], Logits::Last)?;
                self.held.push(t);
            }
        }
        Ok(())
    }

    fn name(&self) -> String {
        format!("draft model ({} layers)", self.engine.model.config.n_layers)
    }

    fn take_one_off(&mut self) -> Duration {
        std::mem::take(&mut self.one_off)
    }
}

/// When to speculate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpecMode {
    /// Always (for measurements and tests).
    On,
    /// While it pays: switched off for the session when speculative steps decode slower than plain ones.
    Auto,
}

/// What speculation did (one generation's, or a session's so far).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SpecStats {
    /// Tokens proposed by the drafter and checked by the model.
    pub drafted: u64,
    /// Of those, accepted.
    pub accepted: u64,
    /// Verification passes of the model.
    pub passes: u64,
    /// Tokens the speculative passes produced (accepted drafts + the model's own token each) and their time.
    pub spec_tokens: u64,
    pub spec_secs: f64,
    /// Plain decode steps measured (the baseline `auto` compares against) and their time.
    pub plain_tokens: u64,
    pub plain_secs: f64,
    /// `auto` found speculation slower and switched it off.
    pub switched_off: bool,
}

impl SpecStats {
    pub fn acceptance(&self) -> f64 {
        self.accepted as f64 / self.drafted.max(1) as f64
    }
    /// Tokens per verification pass (the speed-up's upper bound, before the drafter's cost).
    pub fn tokens_per_pass(&self) -> f64 {
        self.spec_tokens as f64 / self.passes.max(1) as f64
    }
    fn add(&mut self, o: &SpecStats) {
        self.drafted += o.drafted;
        self.accepted += o.accepted;
        self.passes += o.passes;
        self.spec_tokens += o.spec_tokens;
        self.spec_secs += o.spec_secs;
        self.plain_tokens += o.plain_tokens;
        self.plain_secs += o.plain_secs;
    }
}

/// Plain steps `auto` measures before it speculates, and passes after which it judges.
const PROBE_PLAIN: u64 = 4;
const JUDGE_AFTER: u64 = 8;

/// A session's speculative decoding: its drafter, the adaptive draft length and what it measured.
pub struct Speculation {
    drafter: Box<dyn Drafter>,
    mode: SpecMode,
    k: usize,
    max_k: usize,
    stats: SpecStats,
    /// The cost model the draft length is chosen by (see [`Speculation::choose_len`]).
    cost: CostModel,
}

/// Most tokens a pass may draft.
const MAX_DRAFT: usize = 32;

/// What speculation costs and earns here, measured as it runs: a drafted token is accepted with probability
/// `alpha` (successes / trials), a verification pass of `r` rows takes what passes of `r` rows took
/// (`verify[r]`), or where none ran yet `plain + extra_row · (r - 1)` (a plain step plus what each further row
/// added on average), and drafting takes `draft` per token. Per row count because a pass's cost is a step
/// function of it: the CPU kernels take a few rows in one register tile (4 on AVX-512) at about one step's
/// cost on a memory-bound model, and one more row starts another tile.
#[derive(Clone, Copy, Debug)]
struct CostModel {
    trials: f64,
    successes: f64,
    plain: Option<f64>,
    extra_row: Option<f64>,
    verify: [Option<f64>; MAX_DRAFT + 2],
    draft: Option<f64>,
}

impl Default for CostModel {
    fn default() -> Self {
        CostModel { trials: 0.0, successes: 0.0, plain: None, extra_row: None, verify: [None; MAX_DRAFT + 2], draft: None }
    }
}

/// Weight of a new measurement in the running averages.
const EWMA: f64 = 0.2;

fn ewma(old: Option<f64>, new: f64) -> Option<f64> {
    Some(old.map_or(new, |o| o + EWMA * (new - o)))
}

impl CostModel {
    /// The draft length up to `max` with the most tokens per second: a pass drafting `k` yields
    /// `1 + alpha + ... + alpha^k` tokens on average. `None` until the costs are known.
    fn best_len(&self, max: usize) -> Option<usize> {
        let (plain, extra, draft) = (self.plain?, self.extra_row?, self.draft?);
        // A prior of one success in two trials until drafts have been checked.
        let alpha = ((self.successes + 1.0) / (self.trials + 2.0)).min(0.99);
        (1..=max)
            .map(|k| {
                let tokens = (1.0 - alpha.powi(k as i32 + 1)) / (1.0 - alpha);
                let verify = self.verify[k + 1].unwrap_or(plain + extra * k as f64);
                (k, tokens / (verify + draft * k as f64))
            })
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(k, _)| k)
    }
}

impl Speculation {
    /// `max_draft`: most tokens drafted per pass (the length adapts between 1 and it).
    pub fn new(drafter: Box<dyn Drafter>, mode: SpecMode, max_draft: usize) -> Self {
        let max_k = max_draft.clamp(1, MAX_DRAFT);
        // First passes draft 3: with the token they follow, 4 rows — one AVX-512 tile, so a pass costs about a
        // step where the model is memory-bound; 4 drafts would start a second tile before anything is measured.
        Speculation { drafter, mode, k: max_k.min(3), max_k, stats: SpecStats::default(), cost: CostModel::default() }
    }

    /// The session's figures so far.
    pub fn stats(&self) -> SpecStats {
        self.stats
    }

    /// What the cost model measured: a plain step's time and, per row count with passes seen, a verification
    /// pass's time in plain steps (running averages, seconds and ratios).
    pub fn pass_costs(&self) -> Option<(f64, Vec<(usize, f64)>)> {
        let plain = self.cost.plain?;
        let rows = self.cost.verify.iter().enumerate().filter_map(|(r, v)| v.map(|v| (r, v / plain))).collect();
        Some((plain, rows))
    }

    pub fn drafter_name(&self) -> String {
        self.drafter.name()
    }

    /// Whether the next step should speculate: `auto` first measures a few plain steps, and stops for good
    /// when speculating was slower.
    pub(crate) fn wanted(&self) -> bool {
        match self.mode {
            SpecMode::On => true,
            SpecMode::Auto => !self.stats.switched_off && self.stats.plain_tokens >= PROBE_PLAIN,
        }
    }

    /// Draft length for the next pass.
    pub(crate) fn draft_len(&self) -> usize {
        self.k
    }

    pub(crate) fn draft(&mut self, target: &mut dyn Target, history: &[u32], k: usize, out: &mut Vec<u32>) -> Result<()> {
        self.drafter.draft_for(target, history, k, out)
    }

    /// Whether the drafter reads the model's sequence state ([`Drafter::needs_target_state`]).
    pub fn needs_target_state(&self) -> bool {
        self.drafter.needs_target_state()
    }

    /// A plain decode step took `t`.
    pub(crate) fn record_plain(&mut self, t: Duration, gen: &mut SpecStats) {
        let s = SpecStats { plain_tokens: 1, plain_secs: t.as_secs_f64(), ..Default::default() };
        self.stats.add(&s);
        gen.add(&s);
        self.cost.plain = ewma(self.cost.plain, t.as_secs_f64());
    }

    /// A pass drafted `drafted` tokens in `drafting` (less the drafter's one-off catch-up), checked them in `verifying` (`drafted + 1` rows), accepted
    /// `accepted` and produced `tokens`: the cost model learns, the draft length follows it (before the costs
    /// are known: longer when all were accepted, shorter when under half were), and `auto` judges the speed.
    pub(crate) fn record_pass(
        &mut self,
        drafting: Duration,
        verifying: Duration,
        drafted: usize,
        accepted: usize,
        tokens: usize,
        gen: &mut SpecStats,
    ) {
        let drafting = drafting.saturating_sub(self.drafter.take_one_off());
        let s = SpecStats {
            drafted: drafted as u64,
            accepted: accepted as u64,
            passes: 1,
            spec_tokens: tokens as u64,
            spec_secs: (drafting + verifying).as_secs_f64(),
            ..Default::default()
        };
        self.stats.add(&s);
        gen.add(&s);
        let c = &mut self.cost;
        // Trials: every accepted draft, and the one rejected (if any).
        c.trials += (accepted + usize::from(accepted < drafted)) as f64;
        c.successes += accepted as f64;
        c.draft = ewma(c.draft, drafting.as_secs_f64() / drafted.max(1) as f64);
        if let Some(plain) = c.plain {
            c.extra_row = ewma(c.extra_row, ((verifying.as_secs_f64() - plain) / drafted.max(1) as f64).max(0.0));
        }
        if let Some(v) = c.verify.get_mut(drafted + 1) {
            *v = ewma(*v, verifying.as_secs_f64());
        }
        self.k = match c.best_len(self.max_k) {
            Some(k) => k,
            None if accepted == drafted => (self.k + 1).min(self.max_k),
            None if accepted * 2 < drafted => (self.k - 1).max(1),
            None => self.k,
        };
        let st = &mut self.stats;
        if self.mode == SpecMode::Auto && st.passes >= JUDGE_AFTER && st.plain_tokens > 0 {
            let spec = st.spec_tokens as f64 / st.spec_secs.max(1e-9);
            let plain = st.plain_tokens as f64 / st.plain_secs.max(1e-9);
            if spec < plain {
                st.switched_off = true;
                gen.switched_off = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pass's cost as a step function of its rows (4 rows cost one step, 5 to 8 two): the model picks the
    /// length it measured to pay best, not what a straight line through the average would say.
    #[test]
    fn draft_length_follows_measured_pass_costs() {
        let step = 0.1;
        let mut c = CostModel { plain: Some(step), draft: Some(0.0), trials: 100.0, successes: 60.0, ..Default::default() };
        // Only 8-row passes seen: the average extra cost per row is a seventh of a step.
        c.extra_row = Some(step / 7.0);
        c.verify[8] = Some(2.0 * step);
        let blind = c.best_len(8).unwrap();
        for rows in 2..=8 {
            c.verify[rows] = Some(if rows <= 4 { step } else { 2.0 * step });
        }
        // 60 % acceptance, free drafts: 3 drafted in one step's pass yields ~2.2 tokens per step; 7 in two
        // steps' yields ~1.2 per step.
        assert_eq!(c.best_len(8), Some(3));
        assert_ne!(blind, 3, "the linear estimate alone should not have found it (test premise)");
    }
}
