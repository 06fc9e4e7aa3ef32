//! The CPU backend: quantized weights are used in place from the memory map, activations are quantized to int8
//! per row on the fly (once per tensor, shared by every linear that reads it), and rows of each matrix product are
//! split across a persistent thread pool.

mod math;
pub mod select;

use std::cell::{Cell, RefCell};
use std::sync::Arc;

use rayon::prelude::*;
use sprig_format::{ModelFile, TensorEntry, WeightView};
use sprig_quant::kernels::{self, Isa};
use sprig_quant::{QMatrix, QuantizedActivations};

use crate::moe::{self, ExpertWeights, MoeParams, MoeUsage};
use crate::{ensure_shape, Activation, AttentionParams, Backend, BackendError, KvDtype, KvLayout, Result, RopeParams, Unary};
use select::{KernelPlan, KernelSelection, PlanSource};

pub struct CpuBackend {
    pool: rayon::ThreadPool,
    threads: usize,
    /// The kernels per shape class and how they were chosen (see [`select`]).
    selection: KernelSelection,
}

impl CpuBackend {
    /// `threads = 0` means one per physical core. The kernels are the best ISA by name (or `SPRIG_CPU`'s)
    /// until [`CpuBackend::measure_kernels`] or [`CpuBackend::use_kernels`] picks them per shape class.
    pub fn new(threads: usize) -> Result<Self> {
        let isa = Isa::detect().map_err(BackendError::DeviceUnavailable)?;
        let threads = if threads == 0 { physical_cores() } else { threads };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("sprig-cpu-{i}"))
            .build()
            .map_err(|e| BackendError::DeviceUnavailable(format!("no CPU thread pool: {e}")))?;
        let plan = KernelPlan::uniform(isa, threads);
        let source = match std::env::var("SPRIG_CPU") {
            Ok(name) if !name.is_empty() => PlanSource::Forced(name),
            _ => PlanSource::Default,
        };
        let selection = KernelSelection { plan, source, timings: Vec::new(), probe: String::new() };
        Ok(CpuBackend { pool, threads, selection })
    }
    /// Every shape class on `isa` (tests check each ISA this way).
    pub fn with_isa(mut self, isa: Isa) -> Self {
        self.selection = KernelSelection {
            plan: KernelPlan::uniform(isa, self.threads),
            source: PlanSource::Forced(isa.name().into()),
            timings: Vec::new(),
            probe: String::new(),
        };
        self
    }
    /// The kernels per shape class.
    pub fn plan(&self) -> KernelPlan {
        self.selection.plan
    }
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// `out = x · Wᵀ` for any weight view (a whole matrix or an expert's rows of a stacked one).
    fn linear_view(&self, x: &CpuTensor, view: WeightView<'_>, out: &mut CpuTensor) {
        let (t, k) = (x.rows, x.cols);
        assert_eq!(k, view.cols(), "linear: input has {k} features, weight expects {}", view.cols());
        match view {
            WeightView::Quant(q) => self.quant_linears(x, &[q], &mut [out]),
            _ => {
                let n = view.rows();
                out.reshape(t, n);
                let ptr = OutPtr(out.data.as_mut_ptr());
                let chunk = self.row_chunk(n);
                let xd = &x.data[..];
                self.pool.install(|| {
                    (0..n.div_ceil(chunk)).into_par_iter().for_each(|c| {
                        let (r0, r1) = (c * chunk, ((c + 1) * chunk).min(n));
                        // Scratch for non-f32 rows only (f32 weights are read in place): one per pool thread,
                        // grown once, so decode allocates nothing per token.
                        ROW_SCRATCH.with_borrow_mut(|row| {
                            if !matches!(view, WeightView::F32 { .. }) && row.len() < k {
                                row.resize(k, 0.0);
                            }
                            for r in r0..r1 {
                                let wr: &[f32] = match view {
                                    WeightView::F32 { data, .. } => &data[r * k..(r + 1) * k],
                                    _ => {
                                        view.row_to_f32(r, &mut row[..k]);
                                        &row[..k]
                                    }
                                };
                                for ti in 0..t {
                                    let v = math::dot(wr, &xd[ti * k..(ti + 1) * k]);
                                    // SAFETY: element (ti, r) belongs to this worker's row range only.
                                    unsafe { *ptr.get().add(ti * n + r) = v };
                                }
                            }
                        });
                    })
                });
            }
        }
    }
}

thread_local! {
    /// A dequantized weight row of an f16/bf16 linear (per pool thread).
    static ROW_SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl CpuBackend {
    /// Rows per parallel job: enough jobs to balance the pool, each a multiple of 16 rows to keep kernels'
    /// tiles (4 rows) and panels (16 rows) whole.
    fn row_chunk(&self, n: usize) -> usize {
        (n.div_ceil(self.threads * 4)).next_multiple_of(16).max(16)
    }

    /// `outs[i] = x · W_iᵀ` for up to [`MAX_PASS`] quantized matrices, as one parallel pass over every matrix's
    /// row chunks (one fork/join for all of them); `x` is quantized once. Allocation-free: it runs per token.
    fn quant_linears(&self, x: &CpuTensor, ws: &[QMatrix<'_>], outs: &mut [&mut CpuTensor]) {
        self.quant_linears_with(self.selection.plan, x, ws, outs)
    }

    /// [`CpuBackend::quant_linears`] with the kernels of `plan`: one token runs the decode ISA, on the calling
    /// thread alone when the plan says one thread; more tokens run the prefill ISA on the whole pool.
    fn quant_linears_with(&self, plan: KernelPlan, x: &CpuTensor, ws: &[QMatrix<'_>], outs: &mut [&mut CpuTensor]) {
        assert!(ws.len() == outs.len() && ws.len() <= MAX_PASS, "linear: {} weights, {} outputs", ws.len(), outs.len());
        let t = x.rows;
        let mut ptrs = [OutPtr(std::ptr::null_mut()); MAX_PASS];
        // Job j belongs to matrix m when first[m] <= j < first[m + 1].
        let mut first = [0usize; MAX_PASS + 1];
        for (m, (q, o)) in ws.iter().zip(outs.iter_mut()).enumerate() {
            assert_eq!(x.cols, q.cols(), "linear: input has {} features, weight expects {}", x.cols, q.cols());
            o.reshape(t, q.rows());
            ptrs[m] = OutPtr(o.data.as_mut_ptr());
            first[m + 1] = first[m] + q.rows().div_ceil(self.row_chunk(q.rows()));
        }
        let (isa, serial) = if t == 1 { (plan.decode, plan.decode_threads == 1) } else { (plan.prefill, false) };
        let xq = x.quantized(isa);
        let xq = &*xq;
        let run = |j: usize| {
            let m = (0..ws.len()).find(|&m| j < first[m + 1]).expect("job index in range");
            let (q, chunk) = (&ws[m], self.row_chunk(ws[m].rows()));
            let r0 = (j - first[m]) * chunk;
            let r1 = (r0 + chunk).min(q.rows());
            // SAFETY: output m holds t*rows floats; this job writes only its columns r0..r1 of each of the t rows
            // (element t*rows + r0 + r), which no other job touches; no slice of the output is alive.
            unsafe { kernels::gemm_strided(isa, &q.rows_range(r0, r1), xq, ptrs[m].get().add(r0), q.rows()) };
        };
        if serial {
            (0..first[ws.len()]).for_each(run);
        } else {
            self.pool.install(|| (0..first[ws.len()]).into_par_iter().for_each(run));
        }
    }
}

/// Most matrices one [`CpuBackend::quant_linears`] pass takes (Q/K/V is three).
const MAX_PASS: usize = 4;
/// Fewest rows (tokens) per job of the element-wise ops (norm, RoPE, GLU, residual add): rayon splits only
/// lengths of at least two jobs, so prefill spreads them over the pool (they would otherwise leave the other
/// threads idle) while decode's one row runs inline on the calling thread, with no fork.
const ROWS_PER_JOB: usize = 4;

/// `x[t, :] += b` for every row.
fn add_bias(x: &mut CpuTensor, b: &CpuWeight) {
    let b = b.vector();
    let n = b.len();
    for row in x.mutate().chunks_exact_mut(n) {
        row.iter_mut().zip(b.iter()).for_each(|(o, b)| *o += b);
    }
}

/// Reused buffers of the MoE op: routing, then one expert's gathered tokens and intermediate activations.
#[derive(Default)]
struct MoeScratch {
    scores: Vec<f32>,
    selected: Vec<(usize, f32)>,
    /// Per expert: (token, weight) pairs routed to it.
    groups: Vec<Vec<(usize, f32)>>,
    x: CpuTensor,
    gate: CpuTensor,
    up: CpuTensor,
    hidden: CpuTensor,
    y: CpuTensor,
}

thread_local! {
    static MOE_SCRATCH: RefCell<MoeScratch> = RefCell::default();
}

/// Physical cores (hyper-threads share the SIMD units that bound these kernels).
pub fn physical_cores() -> usize {
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut cores = std::collections::HashSet::new();
    if let Ok(s) = std::fs::read_to_string("/proc/cpuinfo") {
        let (mut phys, mut core) = (None, None);
        for line in s.lines() {
            if let Some(v) = line.strip_prefix("physical id") {
                phys = Some(v.trim_start_matches([' ', '\t', ':']).to_string());
            } else if let Some(v) = line.strip_prefix("core id") {
                core = Some(v.trim_start_matches([' ', '\t', ':']).to_string());
            } else if line.is_empty() {
                if let (Some(p), Some(c)) = (phys.take(), core.take()) {
                    cores.insert((p, c));
                }
            }
        }
    }
    if cores.is_empty() {
        logical
    } else {
        cores.len().min(logical)
    }
}

/// Row-major f32 activations, plus a cached int8 quantization of them for the linear kernels.
#[derive(Default)]
pub struct CpuTensor {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
    quant: RefCell<QuantizedActivations>,
    quant_valid: Cell<bool>,
}

impl CpuTensor {
    /// Resizes (reusing capacity) and invalidates the cached quantization; returns the data to overwrite.
    fn reshape(&mut self, rows: usize, cols: usize) -> &mut [f32] {
        self.rows = rows;
        self.cols = cols;
        self.data.resize(rows * cols, 0.0);
        self.quant_valid.set(false);
        &mut self.data
    }
    fn mutate(&mut self) -> &mut [f32] {
        self.quant_valid.set(false);
        &mut self.data
    }
    fn quantized(&self, isa: Isa) -> std::cell::Ref<'_, QuantizedActivations> {
        if !self.quant_valid.get() {
            self.quant.borrow_mut().quantize(&self.data, self.rows, self.cols);
            self.quant_valid.set(true);
        }
        // Kernel-specific packing once here, not once per matrix and thread (again only if another ISA reads
        // the same activations; a no-op for ISAs that read them as they are).
        kernels::prepare(isa, &mut self.quant.borrow_mut());
        self.quant.borrow()
    }
}

/// A weight: the model file (kept alive) and where the tensor lies in it.
pub struct CpuWeight {
    file: Arc<ModelFile>,
    entry: TensorEntry,
    rows: usize,
    cols: usize,
}

impl CpuWeight {
    pub fn view(&self) -> WeightView<'_> {
        self.file.view(&self.entry)
    }
    fn vector(&self) -> std::borrow::Cow<'_, [f32]> {
        match self.view() {
            WeightView::F32 { data, .. } => std::borrow::Cow::Borrowed(data),
            v => std::borrow::Cow::Owned(v.to_f32()),
        }
    }
}

/// Per layer K and V rings: slot of position p is `p % capacity`. Values are rows (`slot * kv_dim + i`); keys
/// are stored transposed in blocks of [`KEY_BLOCK`] slots (`((slot / 64) * kv_dim + i) * 64 + slot % 64`), so
/// attention reads a run of keys dimension by dimension straight from the cache, and appending a position
/// only touches the block it falls in (untouched context stays unbacked by memory).
pub struct CpuKvCache {
    /// Per layer: keys in blocks of `KEY_BLOCK` slots, each block transposed (`[dim][slot]`), and values
    /// `[slot, kv_dim]`.
    layers: Vec<KvStore>,
    /// Per layer: slots (its window, or the whole context).
    caps: Vec<usize>,
    kv_dim: usize,
    head_dim: usize,
    /// An int8 cache: the batch's keys and values as the cache will hold them, in buffers kept across forward
    /// passes (decode allocates nothing per layer).
    rounded_k: Vec<f32>,
    rounded_v: Vec<f32>,
}

/// One layer's keys and values as stored.
enum KvStore {
    F32 { k: Vec<f32>, v: Vec<f32> },
    /// int8 codes in the same layouts, and per slot one scale per KV head (`[slot, kv_heads]`).
    Q8 { k: Vec<i8>, v: Vec<i8>, k_scale: Vec<f32>, v_scale: Vec<f32> },
}

/// Index of dimension `i` of `slot` in the transposed key blocks.
#[inline]
fn key_index(slot: usize, i: usize, kvd: usize) -> usize {
    (slot / KEY_BLOCK) * kvd * KEY_BLOCK + i * KEY_BLOCK + slot % KEY_BLOCK
}

impl KvStore {
    /// Stores position rows `k`/`v` (`[kv_dim]` each) in `slot`.
    fn put(&mut self, slot: usize, k: &[f32], v: &[f32], head_dim: usize) {
        let kvd = k.len();
        match self {
            KvStore::F32 { k: kc, v: vc } => {
                for (i, &x) in k.iter().enumerate() {
                    kc[key_index(slot, i, kvd)] = x;
                }
                vc[slot * kvd..(slot + 1) * kvd].copy_from_slice(v);
            }
            KvStore::Q8 { k: kc, v: vc, k_scale, v_scale } => {
                let heads = kvd / head_dim;
                let mut codes = [0i8; MAX_HEAD_DIM];
                for h in 0..heads {
                    let r = h * head_dim..(h + 1) * head_dim;
                    k_scale[slot * heads + h] = crate::quantize_kv_head(&k[r.clone()], &mut codes[..head_dim]);
                    for (j, &c) in codes[..head_dim].iter().enumerate() {
                        kc[key_index(slot, r.start + j, kvd)] = c;
                    }
                    v_scale[slot * heads + h] = crate::quantize_kv_head(&v[r.clone()], &mut vc[slot * kvd + r.start..slot * kvd + r.end]);
                }
            }
        }
    }

    /// Appends the keys and values of `slot` (dequantized) to `k` and `v`.
    fn get(&self, slot: usize, kvd: usize, head_dim: usize, k: &mut Vec<f32>, v: &mut Vec<f32>) {
        match self {
            KvStore::F32 { k: kc, v: vc } => {
                k.extend((0..kvd).map(|i| kc[key_index(slot, i, kvd)]));
                v.extend_from_slice(&vc[slot * kvd..(slot + 1) * kvd]);
            }
            KvStore::Q8 { k: kc, v: vc, k_scale, v_scale } => {
                let heads = kvd / head_dim;
                k.extend((0..kvd).map(|i| kc[key_index(slot, i, kvd)] as f32 * k_scale[slot * heads + i / head_dim]));
                v.extend((0..kvd).map(|i| vc[slot * kvd + i] as f32 * v_scale[slot * heads + i / head_dim]));
            }
        }
    }
}

impl CpuKvCache {
    fn slots(&self, layer: usize) -> Result<usize> {
        ensure_shape!(layer < self.caps.len(), "kv", "layer {layer} of a {}-layer cache", self.caps.len());
        Ok(self.caps[layer])
    }
}

/// Raw output pointer shared by workers that write disjoint elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: workers write disjoint rows/columns of the same buffer; the buffer outlives the parallel scope.
unsafe impl Send for OutPtr {}
// SAFETY: as above: no two workers touch the same element.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Method access makes closures capture the whole (Send) wrapper, not its raw-pointer field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Weight = CpuWeight;
    type KvCache = CpuKvCache;
    type MoeState = MoeUsage;

    fn name(&self) -> String {
        let p = self.selection.plan;
        if p.decode == p.prefill && p.decode_threads == self.threads {
            format!("cpu ({}, {} threads)", p.decode.name(), self.threads)
        } else {
            format!(
                "cpu (decode {} on {} thread{}, prefill {}; {} threads)",
                p.decode.name(),
                p.decode_threads,
                if p.decode_threads == 1 { "" } else { "s" },
                p.prefill.name(),
                self.threads
            )
        }
    }

    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    fn load_weight(&self, file: &Arc<ModelFile>, name: &str) -> Result<CpuWeight> {
        let entry = file
            .entry(name)
            .ok_or_else(|| sprig_format::FormatError::tensor(name, "missing from the model file"))?
            .clone();
        let v = file.view(&entry);
        Ok(CpuWeight { rows: v.rows(), cols: v.cols(), file: file.clone(), entry })
    }
    fn weight_shape(&self, w: &CpuWeight) -> (usize, usize) {
        (w.rows, w.cols)
    }

    fn tensor(&self) -> CpuTensor {
        CpuTensor::default()
    }
    fn shape(&self, t: &CpuTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }
    fn upload(&self, data: &[f32], rows: usize, cols: usize, t: &mut CpuTensor) -> Result<()> {
        ensure_shape!(data.len() == rows * cols, "upload", "{} values for a {rows}x{cols} tensor", data.len());
        t.reshape(rows, cols).copy_from_slice(data);
        Ok(())
    }
    fn download(&self, t: &CpuTensor, out: &mut Vec<f32>) -> Result<()> {
        out.clear();
        out.extend_from_slice(&t.data);
        Ok(())
    }
    fn rows(&self, x: &CpuTensor, start: usize, n: usize, out: &mut CpuTensor) -> Result<()> {
        ensure_shape!(start + n <= x.rows, "rows", "rows {start}..{} of {}", start + n, x.rows);
        let c = x.cols;
        out.reshape(n, c).copy_from_slice(&x.data[start * c..(start + n) * c]);
        Ok(())
    }

    fn set_rows(&self, dst: &mut CpuTensor, start: usize, src: &CpuTensor) -> Result<()> {
        let (n, c) = (src.rows, src.cols);
        ensure_shape!(c == dst.cols && start + n <= dst.rows, "set_rows", "{n}x{c} at row {start} of {}x{}", dst.rows, dst.cols);
        dst.mutate()[start * c..(start + n) * c].copy_from_slice(&src.data[..n * c]);
        Ok(())
    }

    fn embed(&self, table: &CpuWeight, tokens: &[u32], scale: f32, out: &mut CpuTensor) -> Result<()> {
        let v = table.view();
        let c = table.cols;
        let o = out.reshape(tokens.len(), c);
        for (i, &t) in tokens.iter().enumerate() {
            let row = &mut o[i * c..(i + 1) * c];
            v.row_to_f32(t as usize, row);
            if scale != 1.0 {
                row.iter_mut().for_each(|x| *x *= scale);
            }
        }
        Ok(())
    }

    fn rms_norm(&self, x: &CpuTensor, w: &CpuWeight, eps: f32, out: &mut CpuTensor) -> Result<()> {
        let w = w.vector();
        let (rows, cols) = (x.rows, x.cols);
        // Normalised groups are `w.len()` wide: whole rows, or each head of a row (per-head norms).
        let n = w.len().max(1);
        ensure_shape!(cols.is_multiple_of(n), "rms_norm", "width {cols} is not a multiple of the weight's {n}");
        let o = out.reshape(rows, cols);
        x.data
            .par_chunks_exact(n)
            .zip(o.par_chunks_exact_mut(n))
            .with_min_len(ROWS_PER_JOB * (cols / n).max(1))
            .for_each(|(src, dst)| math::rms_norm(src, &w, eps, dst));
        Ok(())
    }

    fn linear(&self, x: &CpuTensor, w: &CpuWeight, bias: Option<&CpuWeight>, out: &mut CpuTensor) -> Result<()> {
        ensure_shape!(x.cols == w.cols, "linear", "input width {} vs weight {}x{}", x.cols, w.rows, w.cols);
        self.linear_view(x, w.view(), out);
        if let Some(b) = bias {
            add_bias(out, b);
        }
        Ok(())
    }

    fn linear_many(
        &self,
        x: &CpuTensor,
        ws: &[(&CpuWeight, Option<&CpuWeight>)],
        outs: &mut [&mut CpuTensor],
    ) -> Result<()> {
        let views = ws.iter().map(|(w, _)| w.view());
        let all_quant = ws.len() <= MAX_PASS && views.clone().all(|v| matches!(v, WeightView::Quant(_)));
        let widths_match = ws.iter().all(|(w, _)| w.cols == x.cols);
        if ws.is_empty() || !all_quant || !widths_match || ws.len() != outs.len() {
            return crate::composite::linear_many(self, x, ws, outs);
        }
        let mut qs = [None; MAX_PASS];
        for (slot, v) in qs.iter_mut().zip(views) {
            *slot = match v {
                WeightView::Quant(q) => Some(q),
                _ => None,
            };
        }
        let qs = qs.map(|q| q.unwrap_or_else(|| qs[0].expect("at least one weight")));
        self.quant_linears(x, &qs[..ws.len()], outs);
        for ((_, b), o) in ws.iter().zip(outs.iter_mut()) {
            if let Some(b) = b {
                add_bias(o, b);
            }
        }
        Ok(())
    }

    fn rope(&self, x: &mut CpuTensor, pos0: usize, p: &RopeParams) -> Result<()> {
        let cols = x.cols;
        ensure_shape!(cols == p.n_heads * p.head_dim, "rope", "width {cols} for {} heads of {}", p.n_heads, p.head_dim);
        ensure_shape!(p.inv_freq.len() == p.head_dim / 2, "rope", "{} frequencies", p.inv_freq.len());
        x.mutate()
            .par_chunks_exact_mut(cols.max(1))
            .enumerate()
            .with_min_len(ROWS_PER_JOB)
            .for_each(|(t, row)| p.rotate(row, (pos0 + t) as f32));
        Ok(())
    }

    fn attention(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        cache: &mut CpuKvCache,
        layer: usize,
        pos0: usize,
        p: &AttentionParams,
        out: &mut CpuTensor,
    ) -> Result<()> {
        let t = q.rows;
        let hd = p.head_dim;
        let (qd, kvd) = (p.n_heads * hd, p.n_kv_heads * hd);
        ensure_shape!(
            (q.cols, k.cols, v.cols) == (qd, kvd, kvd),
            "attention",
            "widths q {} k {} v {} for {qd}/{kvd}",
            q.cols,
            k.cols,
            v.cols
        );
        ensure_shape!(layer < cache.layers.len(), "attention", "layer {layer} of a {}-layer cache", cache.layers.len());
        let cap = cache.caps[layer];
        out.reshape(t, qd);
        let ptr = OutPtr(out.data.as_mut_ptr());
        let group = p.n_heads / p.n_kv_heads;
        let (q, k, v) = (&q.data[..], &k.data[..], &v.data[..]);
        let CpuKvCache { layers, rounded_k, rounded_v, .. } = cache;
        // An int8 cache: the batch's own keys and values are attended as the cache will hold them.
        let (k, v) = match &layers[layer] {
            KvStore::F32 { .. } => (k, v),
            KvStore::Q8 { .. } => {
                for (buf, x) in [(&mut *rounded_k, k), (&mut *rounded_v, v)] {
                    buf.clear();
                    buf.extend_from_slice(x);
                    crate::round_trip_kv_q8(buf, hd);
                }
                (&rounded_k[..], &rounded_v[..])
            }
        };
        let store = &layers[layer];
        // First key position query `ti` sees (causal, and within its window).
        let first_key = |ti: usize| p.window.map_or(0, |w| (pos0 + ti + 1).saturating_sub(w.min(cap)));
        // Batched: one job per (KV head, tile of queries). Cached keys and values are read in place; only the
        // batch's new keys are transposed (once per job). Every query of the tile and of the KV head's group
        // then computes its scores as vector AXPYs over keys (no horizontal sums) and its output as AXPYs over
        // value rows.
        let tile = if t >= 32 { 16 } else { t.max(1) };
        let tiles = t.div_ceil(tile);
        self.pool.install(|| {
            (0..p.n_kv_heads * tiles).into_par_iter().for_each(|job| {
                let (g, tt) = (job / tiles, job % tiles);
                let (t0, t1) = (tt * tile, ((tt + 1) * tile).min(t));
                let lo = first_key(t0);
                math::SCRATCH.with(|s| {
                    let mut s = s.borrow_mut();
                    let math::AttentionScratch { new_keys_t, scores } = &mut *s;
                    new_keys_t.resize(hd * t1, 0.0);
                    for (j, key) in k.chunks_exact(kvd).take(t1).enumerate() {
                        for (d, &kv) in key[g * hd..(g + 1) * hd].iter().enumerate() {
                            new_keys_t[d * t1 + j] = kv;
                        }
                    }
                    // Sized for the whole cache at once, so decode does not regrow it as the context fills.
                    let need = pos0 + t1 - lo;
                    if scores.capacity() < need {
                        scores.reserve_exact((cap + t1).max(need) - scores.len());
                    }
                    scores.resize(need, 0.0);
                    let runs = KvRuns { store, k: new_keys_t, v, pos0, cap, kvd, hd, g, new: t1 };
                    for ti in t0..t1 {
                        // This query's keys: first visible .. its own position.
                        let (a, b) = (first_key(ti), pos0 + ti + 1);
                        for h in g * group..(g + 1) * group {
                            let qh = &q[ti * qd + h * hd..ti * qd + (h + 1) * hd];
                            for r in runs.between(a, b) {
                                r.scores(qh, p.scale, &mut scores[r.start - lo..r.end - lo]);
                            }
                            math::softmax(&mut scores[a - lo..b - lo]);
                            // SAFETY: job (g, tile) owns output elements ti*qd + h*hd .. +hd of its queries and
                            // of the heads of group g exclusively.
                            let o = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(ti * qd + h * hd), hd) };
                            o.fill(0.0);
                            for r in runs.between(a, b) {
                                r.weighted_values(&scores[r.start - lo..r.end - lo], kvd, o);
                            }
                        }
                    }
                });
            })
        });
        // Only the last `cap` new positions survive in a ring; write those.
        let store = &mut layers[layer];
        for ti in t.saturating_sub(cap)..t {
            store.put((pos0 + ti) % cap, &k[ti * kvd..(ti + 1) * kvd], &v[ti * kvd..(ti + 1) * kvd], hd);
        }
        Ok(())
    }

    /// Fused (one pass, no copy): the decode hot path.
    fn glu(&self, gate: &CpuTensor, up: &CpuTensor, act: Activation, out: &mut CpuTensor) -> Result<()> {
        let (r, c) = (gate.rows, gate.cols);
        ensure_shape!((up.rows, up.cols) == (r, c), "glu", "up {}x{} vs gate {r}x{c}", up.rows, up.cols);
        out.reshape(r, c)
            .par_chunks_mut(c.max(1))
            .zip(gate.data.par_chunks(c.max(1)))
            .zip(up.data.par_chunks(c.max(1)))
            .with_min_len(ROWS_PER_JOB)
            .for_each(|((o, g), u)| math::glu(g, u, act, o));
        Ok(())
    }

    fn add(&self, x: &mut CpuTensor, y: &CpuTensor) -> Result<()> {
        ensure_shape!((x.rows, x.cols) == (y.rows, y.cols), "add", "{}x{} + {}x{}", x.rows, x.cols, y.rows, y.cols);
        let c = x.cols.max(1);
        x.mutate()
            .par_chunks_mut(c)
            .zip(y.data.par_chunks(c))
            .with_min_len(ROWS_PER_JOB)
            .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
        Ok(())
    }

    fn mul(&self, x: &mut CpuTensor, y: &CpuTensor) -> Result<()> {
        let (r, c) = (x.rows, x.cols);
        ensure_shape!(y.rows == r && (y.cols == c || y.cols == 1), "mul", "{r}x{c} * {}x{}", y.rows, y.cols);
        let yc = y.cols.max(1);
        x.mutate()
            .par_chunks_mut(c.max(1))
            .zip(y.data.par_chunks(yc))
            .with_min_len(ROWS_PER_JOB)
            .for_each(|(a, b)| match b {
                [s] => a.iter_mut().for_each(|v| *v *= s),
                _ => a.iter_mut().zip(b).for_each(|(v, s)| *v *= s),
            });
        Ok(())
    }

    fn map(&self, x: &mut CpuTensor, f: Unary) -> Result<()> {
        let c = x.cols.max(1);
        x.mutate()
            .par_chunks_mut(c)
            .with_min_len(ROWS_PER_JOB)
            .for_each(|row| row.iter_mut().for_each(|v| *v = f.apply(*v)));
        Ok(())
    }

    fn moe(
        &self,
        x: &CpuTensor,
        router_logits: &CpuTensor,
        experts: &ExpertWeights<'_, CpuWeight>,
        p: &MoeParams,
        out: &mut CpuTensor,
        usage: &mut MoeUsage,
    ) -> Result<()> {
        let (t, d) = (x.rows, x.cols);
        let (ne, h) = (p.n_experts, p.expert_hidden);
        let shape = |w: &CpuWeight| (w.rows, w.cols);
        ensure_shape!((router_logits.rows, router_logits.cols) == (t, ne), "moe", "router logits for {ne} experts");
        ensure_shape!(
            shape(experts.gate) == (ne * h, d) && shape(experts.up) == (ne * h, d) && shape(experts.down) == (ne * d, h),
            "moe",
            "stacked experts {:?} {:?} {:?} for {ne} experts of {h} on {d}",
            shape(experts.gate),
            shape(experts.up),
            shape(experts.down)
        );
        let (gv, uv, dv) = (experts.gate.view(), experts.up.view(), experts.down.view());
        // An expert is a row range of its stacked tensor: rows stored in groups of 16 must not straddle two.
        for (v, per) in [(&gv, h), (&uv, h), (&dv, d)] {
            if let WeightView::Quant(q) = v {
                ensure_shape!(
                    q.grouped_rows() == 0 || per % sprig_quant::scheme::ROW_GROUP == 0,
                    "moe",
                    "experts of {per} rows stored in groups of 16 rows"
                );
            }
        }
        let per_expert = moe::expert_bytes(gv.bytes(), uv.bytes(), dv.bytes(), ne);
        usage.tokens.resize(ne, 0);
        let mut run = |s: &mut MoeScratch| {
            s.groups.resize_with(ne, Vec::new);
            s.groups.iter_mut().for_each(|g| g.clear());
            for ti in 0..t {
                moe::route(&router_logits.data[ti * ne..(ti + 1) * ne], p, &mut s.scores, &mut s.selected);
                for &(e, w) in &s.selected {
                    s.groups[e].push((ti, w));
                }
            }
            let o = out.reshape(t, d);
            o.fill(0.0);
            // One expert at a time over all the tokens routed to it: its weights are read once per batch, and
            // the experts nobody chose are never touched.
            for e in 0..ne {
                let group = &s.groups[e];
                if group.is_empty() {
                    continue;
                }
                let xe = s.x.reshape(group.len(), d);
                for (i, &(ti, _)) in group.iter().enumerate() {
                    xe[i * d..(i + 1) * d].copy_from_slice(&x.data[ti * d..(ti + 1) * d]);
                }
                let (ge, ue, de) = (
                    gv.rows_range(e * h, (e + 1) * h),
                    uv.rows_range(e * h, (e + 1) * h),
                    dv.rows_range(e * d, (e + 1) * d),
                );
                self.linear_view(&s.x, ge, &mut s.gate);
                self.linear_view(&s.x, ue, &mut s.up);
                self.glu(&s.gate, &s.up, p.activation, &mut s.hidden)?;
                self.linear_view(&s.hidden, de, &mut s.y);
                for (i, &(ti, w)) in group.iter().enumerate() {
                    math::axpy(w, &s.y.data[i * d..(i + 1) * d], &mut o[ti * d..(ti + 1) * d]);
                }
                usage.record(e, group.len(), per_expert);
            }
            Ok(())
        };
        // A nested forward on the same thread (work stealing while this one waits) gets fresh buffers.
        MOE_SCRATCH.with(|cell| match cell.try_borrow_mut() {
            Ok(mut s) => run(&mut s),
            Err(_) => run(&mut MoeScratch::default()),
        })
    }

    fn moe_state(&self, p: &MoeParams) -> Result<MoeUsage> {
        Ok(MoeUsage::new(p.n_experts))
    }

    fn moe_usage(&self, state: &MoeUsage) -> Result<MoeUsage> {
        Ok(state.clone())
    }

    fn kv_cache(&self, layout: &KvLayout) -> Result<CpuKvCache> {
        // Checked before allocating: a context larger than the machine would abort in the allocator.
        layout.check_fits(crate::physical_memory())?;
        let caps: Vec<usize> = (0..layout.windows.len()).map(|l| layout.layer_capacity(l)).collect();
        // Zeroed allocations are lazily backed by the OS: untouched context costs no resident memory.
        ensure_shape!(
            layout.head_dim > 0 && layout.head_dim <= MAX_HEAD_DIM && layout.kv_dim.is_multiple_of(layout.head_dim),
            "kv_cache",
            "kv_dim {} in heads of {}",
            layout.kv_dim,
            layout.head_dim
        );
        let heads = layout.kv_dim / layout.head_dim;
        let layers = caps
            .iter()
            .map(|&c| {
                let (keys, values) = (c.next_multiple_of(KEY_BLOCK) * layout.kv_dim, c * layout.kv_dim);
                match layout.dtype {
                    KvDtype::F32 => KvStore::F32 { k: vec![0.0; keys], v: vec![0.0; values] },
                    KvDtype::Q8 => KvStore::Q8 {
                        k: vec![0; keys],
                        v: vec![0; values],
                        k_scale: vec![0.0; c * heads],
                        v_scale: vec![0.0; c * heads],
                    },
                }
            })
            .collect();
        Ok(CpuKvCache {
            layers,
            caps,
            kv_dim: layout.kv_dim,
            head_dim: layout.head_dim,
            rounded_k: Vec::new(),
            rounded_v: Vec::new(),
        })
    }

    fn kv_read(
        &self,
        cache: &CpuKvCache,
        layer: usize,
        positions: std::ops::Range<usize>,
        k: &mut Vec<f32>,
        v: &mut Vec<f32>,
    ) -> Result<()> {
        let (cap, kvd) = (cache.slots(layer)?, cache.kv_dim);
        ensure_shape!(positions.len() <= cap, "kv_read", "{} positions of a {cap}-slot layer", positions.len());
        k.clear();
        v.clear();
        for p in positions {
            cache.layers[layer].get(p % cap, kvd, cache.head_dim, k, v);
        }
        Ok(())
    }

    fn kv_write(&self, cache: &mut CpuKvCache, layer: usize, pos0: usize, k: &[f32], v: &[f32]) -> Result<()> {
        let (cap, kvd) = (cache.slots(layer)?, cache.kv_dim);
        let n = crate::kv_write_positions(k, v, kvd, cap)?;
        let hd = cache.head_dim;
        for t in 0..n {
            cache.layers[layer].put((pos0 + t) % cap, &k[t * kvd..(t + 1) * kvd], &v[t * kvd..(t + 1) * kvd], hd);
        }
        Ok(())
    }
}

/// Largest head an int8 KV cache quantizes (on the stack).
const MAX_HEAD_DIM: usize = 512;

/// Slots per transposed key block of the KV cache (one register-accumulated chunk of attention scores).
const KEY_BLOCK: usize = 64;

/// Where one KV head's keys and values live for an attention call: the cache's rings (positions before
/// `pos0`) and this batch's `new` positions (keys transposed into a scratch of stride `new`, values rows of
/// the batch).
struct KvRuns<'a> {
    store: &'a KvStore,
    k: &'a [f32],
    v: &'a [f32],
    pos0: usize,
    cap: usize,
    kvd: usize,
    hd: usize,
    /// The KV head.
    g: usize,
    new: usize,
}

/// Positions `start..end` whose keys are at `keys[d * key_stride + (p - start)]` for dimension `d` of the head
/// and whose values are rows `values[(p - start) * kv_dim..]`; an int8 run also has the scales of its slots
/// (`scales[(p - start) * kv_heads]`).
struct KvRun<'a> {
    start: usize,
    end: usize,
    data: RunData<'a>,
}

enum RunData<'a> {
    F32 { keys: &'a [f32], key_stride: usize, values: &'a [f32] },
    Q8 { keys: &'a [i8], values: &'a [i8], k_scale: &'a [f32], v_scale: &'a [f32], heads: usize },
}

impl KvRun<'_> {
    /// Scores of `q` against this run's keys into `out` (one per position).
    fn scores(&self, q: &[f32], scale: f32, out: &mut [f32]) {
        match self.data {
            RunData::F32 { keys, key_stride, .. } => math::attention_scores(q, keys, key_stride, scale, out),
            RunData::Q8 { keys, k_scale, heads, .. } => {
                math::attention_scores_i8(q, keys, KEY_BLOCK, scale, out);
                for (j, o) in out.iter_mut().enumerate() {
                    *o *= k_scale[j * heads];
                }
            }
        }
    }

    /// `out += Σ w[j] · value[j]` over this run's positions.
    fn weighted_values(&self, w: &[f32], kvd: usize, out: &mut [f32]) {
        match self.data {
            RunData::F32 { values, .. } => math::weighted_rows(w, values, kvd, out),
            RunData::Q8 { values, v_scale, heads, .. } => {
                // Runs are at most one key block long.
                let mut ws = [0.0f32; KEY_BLOCK];
                for (j, (o, &wj)) in ws.iter_mut().zip(w).enumerate() {
                    *o = wj * v_scale[j * heads];
                }
                math::weighted_rows_i8(&ws[..w.len()], values, kvd, out);
            }
        }
    }
}

impl<'a> KvRuns<'a> {
    /// Positions `a..b` as runs: cached ones split where a key block ends or the ring wraps, new ones as one.
    fn between(&self, a: usize, b: usize) -> impl Iterator<Item = KvRun<'a>> + '_ {
        let mut p = a;
        let off = self.g * self.hd;
        std::iter::from_fn(move || {
            if p >= b {
                return None;
            }
            let start = p;
            let data = if p < self.pos0 {
                let slot = p % self.cap;
                let len = (KEY_BLOCK - slot % KEY_BLOCK).min(self.cap - slot).min(self.pos0.min(b) - p);
                let key0 = ((slot / KEY_BLOCK) * self.kvd + off) * KEY_BLOCK + slot % KEY_BLOCK;
                p += len;
                match self.store {
                    KvStore::F32 { k, v } => {
                        RunData::F32 { keys: &k[key0..], key_stride: KEY_BLOCK, values: &v[slot * self.kvd + off..] }
                    }
                    KvStore::Q8 { k, v, k_scale, v_scale } => {
                        let heads = self.kvd / self.hd;
                        RunData::Q8 {
                            keys: &k[key0..],
                            values: &v[slot * self.kvd + off..],
                            k_scale: &k_scale[slot * heads + self.g..],
                            v_scale: &v_scale[slot * heads + self.g..],
                            heads,
                        }
                    }
                }
            } else {
                let j = p - self.pos0;
                p = b;
                RunData::F32 { keys: &self.k[j..], key_stride: self.new, values: &self.v[j * self.kvd + off..] }
            };
            Some(KvRun { start, end: p, data })
        })
    }
}
