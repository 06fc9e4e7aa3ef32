//! Kernels chosen by measurement: each instruction set this CPU runs is timed on the model's own matrices,
//! separately for decode (one token: a memory-bound GEMV, also with one thread against the whole pool) and for
//! prefill (a batch of tokens: compute-bound), and the fastest of each class is used. An ISA's name says what
//! it can do, not what it does on a given core: on one 2-core AMD EPYC the AVX-512 decode ran at half the
//! AVX2 speed.

use std::time::{Duration, Instant};

use sprig_format::{ModelFile, WeightView};
use sprig_quant::kernels::Isa;
use sprig_quant::QMatrix;

use super::{CpuBackend, CpuTensor};
use crate::Backend;

/// The kernels the CPU backend runs, per shape class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelPlan {
    /// One token (decode): the GEMV's instruction set.
    pub decode: Isa,
    /// Threads a decode GEMV uses: 1 (on the calling thread) or the whole pool.
    pub decode_threads: usize,
    /// Several tokens (prefill): the GEMM's instruction set (always the whole pool).
    pub prefill: Isa,
}

impl KernelPlan {
    /// The same ISA everywhere, on every thread.
    pub fn uniform(isa: Isa, threads: usize) -> Self {
        KernelPlan { decode: isa, decode_threads: threads, prefill: isa }
    }
}

/// One candidate of one shape class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub prefill: bool,
    pub isa: Isa,
    pub threads: usize,
}

/// A candidate's measured time: the best of its passes over the probe, in seconds.
#[derive(Clone, Debug, PartialEq)]
pub struct Timing {
    pub candidate: Candidate,
    pub seconds: f64,
    pub passes: usize,
}

/// How the plan in use was decided.
#[derive(Clone, Debug, PartialEq)]
pub enum PlanSource {
    /// Nothing measured yet: the best ISA by name, every thread.
    Default,
    /// `SPRIG_CPU` named an instruction set.
    Forced(String),
    /// Measured now, over the given wall time.
    Measured(Duration),
    /// Read from a cache of an earlier measurement (a path or other description).
    Cached(String),
}

/// What [`CpuBackend::measure_kernels`] found.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelSelection {
    pub plan: KernelPlan,
    pub source: PlanSource,
    /// Every candidate's timing (empty unless measured).
    pub timings: Vec<Timing>,
    /// The probe: weight bytes one decode pass reads, and (rows, cols) of the prefill matrices.
    pub probe: String,
}

/// Total time the measurement may take.
pub const BUDGET: Duration = Duration::from_millis(300);
/// Most rounds of [`fastest`] (small models finish them well inside the budget).
const MAX_ROUNDS: usize = 12;
/// Tokens of the prefill probe.
const PREFILL_TOKENS: usize = 16;
/// Weight bytes a decode probe pass reads: past the last-level cache of most machines, so decode is timed as
/// the memory-bound stream it is (a pass over a small matrix held in L2 would favour compute-heavy kernels).
const DECODE_PROBE_BYTES: usize = 48 << 20;

/// Times each candidate by `run` (one pass each, round-robin so a noisy moment hits all alike), keeping the
/// best pass per candidate, and returns the fastest. After the first round, candidates slower than twice the
/// best are dropped; rounds continue while `budget` allows, at most [`MAX_ROUNDS`] (one always runs).
pub fn fastest<C: Copy + PartialEq>(
    candidates: &[C],
    budget: Duration,
    mut run: impl FnMut(C),
) -> (C, Vec<(C, f64, usize)>) {
    assert!(!candidates.is_empty(), "no candidate kernels");
    let start = Instant::now();
    let mut best: Vec<(C, f64, usize)> = candidates.iter().map(|&c| (c, f64::INFINITY, 0)).collect();
    let mut live: Vec<usize> = (0..candidates.len()).collect();
    loop {
        for &i in &live {
            let t0 = Instant::now();
            run(best[i].0);
            let s = t0.elapsed().as_secs_f64();
            best[i].1 = best[i].1.min(s);
            best[i].2 += 1;
        }
        let top = live.iter().map(|&i| best[i].1).fold(f64::INFINITY, f64::min);
        live.retain(|&i| best[i].1 <= 2.0 * top);
        // Stop when another round of the candidates still in the race would likely overrun the budget (the
        // first round, with the slow candidates, says little about the next: on a 2-core Xeon it left the
        // remaining ones one pass each, and a noisy pass picked one decode thread where two were 1.5x faster).
        let next_round: f64 = live.iter().map(|&i| best[i].1).sum();
        let rounds = best.iter().map(|b| b.2).max().unwrap_or(0);
        if live.len() <= 1 || rounds >= MAX_ROUNDS || start.elapsed().as_secs_f64() + next_round > budget.as_secs_f64() {
            break;
        }
    }
    let winner = best.iter().min_by(|a, b| a.1.total_cmp(&b.1)).expect("candidates").0;
    (winner, best)
}

/// The quantized linear weights of the model's layers (stacked experts excluded: decode reads one expert's
/// rows of those, not the stack).
fn layer_matrices(file: &ModelFile) -> Vec<(usize, QMatrix<'_>)> {
    let mut out = Vec::new();
    for name in file.tensor_names() {
        let Some(rest) = name.strip_prefix("blk.") else { continue };
        let Some((layer, _)) = rest.split_once('.') else { continue };
        let Ok(layer) = layer.parse::<usize>() else { continue };
        if name.contains("_exps") || !name.ends_with(".weight") {
            continue;
        }
        if let Ok(WeightView::Quant(q)) = file.weight(name) {
            if q.rows() > 1 {
                out.push((layer, q));
            }
        }
    }
    out.sort_by_key(|(l, _)| *l);
    out
}

/// What a measurement depends on besides the machine: the distinct (rows, cols, scheme) of the layer matrices.
pub fn shape_key(file: &ModelFile) -> String {
    let mut shapes: Vec<String> =
        layer_matrices(file).iter().map(|(_, q)| format!("{}x{}:{}", q.rows(), q.cols(), q.scheme().name())).collect();
    shapes.sort();
    shapes.dedup();
    shapes.join(",")
}

impl CpuBackend {
    /// The plan in use and how it was decided.
    pub fn kernel_selection(&self) -> &KernelSelection {
        &self.selection
    }

    /// Uses `sel` (e.g. read back from a cache). Its ISAs must run on this CPU and its decode threads be 1 or
    /// the pool's; otherwise nothing changes and an error says why.
    pub fn use_kernels(&mut self, sel: KernelSelection) -> Result<(), String> {
        let avail = Isa::available();
        let p = sel.plan;
        if !avail.contains(&p.decode) || !avail.contains(&p.prefill) {
            return Err(format!("plan {p:?} names an instruction set this CPU lacks"));
        }
        if p.decode_threads != 1 && p.decode_threads != self.threads {
            return Err(format!("plan {p:?} is for another thread count (the pool has {})", self.threads));
        }
        self.selection = sel;
        Ok(())
    }

    /// Times every candidate kernel on `file`'s matrices (within [`BUDGET`]) and uses the fastest per shape
    /// class. `hook` runs inside each timed pass after the kernels (tests slow a candidate down with it).
    /// Models without quantized layer matrices keep the current plan.
    pub fn measure_kernels(&mut self, file: &ModelFile, hook: &dyn Fn(&Candidate)) -> &KernelSelection {
        let mats = layer_matrices(file);
        if mats.is_empty() {
            return &self.selection;
        }
        let t0 = Instant::now();
        // Decode probe: whole layers until DECODE_PROBE_BYTES; prefill probe: the first layer's matrices.
        let mut decode_set: Vec<QMatrix> = Vec::new();
        let (mut bytes, mut last_layer) = (0, mats[0].0);
        for (l, q) in &mats {
            if bytes >= DECODE_PROBE_BYTES && *l != last_layer {
                break;
            }
            bytes += q.bytes();
            last_layer = *l;
            decode_set.push(*q);
        }
        let prefill_set: Vec<QMatrix> = mats.iter().filter(|(l, _)| *l == mats[0].0).map(|(_, q)| *q).collect();
        let probe = format!(
            "decode: {} matrices, {:.1} MiB; prefill: {PREFILL_TOKENS} tokens x {:?}",
            decode_set.len(),
            bytes as f64 / (1 << 20) as f64,
            prefill_set.iter().map(|q| (q.rows(), q.cols())).collect::<Vec<_>>()
        );
        // One input per (tokens, width), deterministic values in [-1, 1).
        let inputs = |set: &[QMatrix], t: usize| -> Vec<(usize, CpuTensor)> {
            let mut v: Vec<(usize, CpuTensor)> = Vec::new();
            for q in set {
                if !v.iter().any(|(c, _)| *c == q.cols()) {
                    let data: Vec<f32> = (0..t * q.cols()).map(|i| (i * 7919 % 1000) as f32 / 500.0 - 1.0).collect();
                    let mut x = CpuTensor::default();
                    x.reshape(t, q.cols()).copy_from_slice(&data);
                    v.push((q.cols(), x));
                }
            }
            v
        };
        let (mut decode_x, mut prefill_x) = (inputs(&decode_set, 1), inputs(&prefill_set, PREFILL_TOKENS));
        let mut out = self.tensor();
        // Inside the pool, as a forward pass runs (entering it per product would time the handoff instead).
        let pass = |plan: KernelPlan, set: &[QMatrix], xs: &mut [(usize, CpuTensor)], out: &mut CpuTensor| {
            let this = &*self;
            this.pool.install(move || {
                for q in set {
                    let x = &xs.iter().find(|(c, _)| *c == q.cols()).expect("an input per width").1;
                    this.quant_linears_with(plan, x, &[*q], &mut [&mut *out]);
                }
            })
        };
        let avail = Isa::available();
        let best_named = *avail.last().expect("scalar at least");
        // The probe's pages, faulted in before any timing (the first candidate must not pay for them).
        pass(KernelPlan::uniform(best_named, self.threads), &decode_set, &mut decode_x, &mut out);

        let mut decode_candidates = Vec::new();
        for &isa in &avail {
            decode_candidates.push(Candidate { prefill: false, isa, threads: self.threads });
            if self.threads > 1 {
                decode_candidates.push(Candidate { prefill: false, isa, threads: 1 });
            }
        }
        let (dwin, dtimes) = fastest(&decode_candidates, BUDGET.saturating_sub(t0.elapsed()) * 2 / 3, |c| {
            let plan = KernelPlan { decode: c.isa, decode_threads: c.threads, prefill: best_named };
            pass(plan, &decode_set, &mut decode_x, &mut out);
            hook(&c);
        });
        let prefill_candidates: Vec<Candidate> =
            avail.iter().map(|&isa| Candidate { prefill: true, isa, threads: self.threads }).collect();
        let (pwin, ptimes) = fastest(&prefill_candidates, BUDGET.saturating_sub(t0.elapsed()), |c| {
            pass(KernelPlan::uniform(c.isa, self.threads), &prefill_set, &mut prefill_x, &mut out);
            hook(&c);
        });
        let plan = KernelPlan { decode: dwin.isa, decode_threads: dwin.threads, prefill: pwin.isa };
        let timings = dtimes
            .into_iter()
            .chain(ptimes)
            .map(|(candidate, seconds, passes)| Timing { candidate, seconds, passes })
            .collect();
        self.selection = KernelSelection { plan, source: PlanSource::Measured(t0.elapsed()), timings, probe };
        &self.selection
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fastest_avoids_a_slowed_candidate() {
        // Three equal candidates, one made slow: it is never picked, and is dropped after the first round.
        let (win, times) = fastest(&[0, 1, 2], Duration::from_millis(60), |c| {
            std::thread::sleep(Duration::from_millis(if c == 1 { 8 } else { 1 }));
        });
        assert_ne!(win, 1);
        let slow = times.iter().find(|t| t.0 == 1).unwrap();
        assert_eq!(slow.2, 1, "the slow candidate ran after the first round: {times:?}");
        assert!(times.iter().all(|t| t.2 >= 1));
    }
}
