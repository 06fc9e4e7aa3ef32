//! The backend seam (in the spirit of ggml's backend interface): a small set of ops that a backend must
//! provide. Model code is written once against [`Backend`]; the CPU backend ([`cpu`]), the burn reference
//! backend (`sprig-burn`) and the GPU backend implement it, and the harness (feature `harness`) checks every
//! op of a backend against another on random inputs.
//!
//! Ops come in two layers (as burn's backend traits): *primitives* every backend implements (embed, rms_norm,
//! linear, rope, attention, moe, add, mul, map, rows, ...), and *composite* ops ([`Backend::glu`],
//! [`Backend::softcap`], [`Backend::sigmoid_gate`]) whose default implementations in [`composite`] are built
//! from the primitives. A backend overrides a composite only for speed; the harness checks every override
//! against the default. So a new composite op is a trait method + its default + a harness line, and a new
//! primitive is a trait method + one implementation per backend + a harness line.
//!
//! Ops write into caller-owned output tensors so a decode loop reuses its buffers (no allocation per token).
//! A tensor is a row-major `[rows, cols]` f32 matrix: one row per token. Every op returns a `Result`: a device
//! that fails (a GPU submit or read, an allocation) is an error value, never a panic; so is a shape mismatch.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod composite;
pub mod cpu;
#[cfg(feature = "harness")]
pub mod harness;
pub mod moe;

use std::sync::Arc;

pub use moe::{ExpertWeights, MoeParams, MoeUsage};
pub use sprig_format::config::{Activation, RopeLayout, RopeScaling, RouterScoring};
use sprig_format::{ModelConfig, ModelFile};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Format(#[from] sprig_format::FormatError),
    /// An op got operands whose shapes do not fit together (a model file whose tensors disagree with its
    /// config, or a bug in the calling code).
    #[error("{op}: {detail}")]
    Shape { op: &'static str, detail: String },
    /// No device of the requested kind: the build has no GPU backend or the machine no usable adapter. A
    /// caller can fall back to the CPU.
    #[error("no usable device: {0}")]
    DeviceUnavailable(String),
    /// The device failed while running `op` (lost, out of memory, a kernel it could not run). The state
    /// the op wrote is unknown: start the sequence again, or reload on another device.
    #[error("the device failed in {op}: {message}")]
    DeviceFailed { op: &'static str, message: String },
    #[error("{what} needs {needed} bytes, more than the {available} bytes available")]
    OutOfMemory { what: String, needed: u64, available: u64 },
}

/// Returns a [`BackendError::Shape`] from the enclosing op unless `cond` holds.
#[macro_export]
macro_rules! ensure_shape {
    ($cond:expr, $op:literal, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::BackendError::Shape { op: $op, detail: format!($($fmt)+) });
        }
    };
}

/// An element-wise function of [`Backend::map`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Unary {
    /// `x * s`.
    Scale(f32),
    Tanh,
    /// `1 / (1 + e^-x)`.
    Sigmoid,
    /// A GLU activation (SiLU, tanh-approximated GELU).
    Act(Activation),
}

impl Unary {
    /// The function on one value: the definition every backend's `map` is checked against.
    #[inline]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Unary::Scale(s) => x * s,
            Unary::Tanh => x.tanh(),
            Unary::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            Unary::Act(Activation::Silu) => x / (1.0 + (-x).exp()),
            Unary::Act(Activation::GeluTanh) => {
                const C: f32 = 0.797_884_6; // sqrt(2/pi)
                0.5 * x * (1.0 + (C * (x + 0.044715 * x * x * x)).tanh())
            }
        }
    }
}

/// One GPU adapter as a GPU backend reports it (`sprig devices`).
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterInfo {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
}

/// Physical memory of this machine in bytes (`MemTotal`; Linux and Android), `None` where unknown.
pub fn physical_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

pub type Result<T> = std::result::Result<T, BackendError>;

/// Per-layer attention geometry handed to [`Backend::attention`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionParams {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// `Some(w)`: a query at position p sees keys at positions `p-w+1 ..= p` only.
    pub window: Option<usize>,
}

/// RoPE parameters of one layer.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeParams {
    pub n_heads: usize,
    pub head_dim: usize,
    /// `head_dim / 2` inverse frequencies, scaling applied: pair `i` rotates by `pos * inv_freq[i]`
    /// (computed once by [`RopeScaling::frequencies`], shared by every backend).
    pub inv_freq: Arc<[f32]>,
    /// Multiplies cos and sin (YaRN's attention factor; 1 otherwise).
    pub attention_factor: f32,
    pub layout: RopeLayout,
}

impl RopeParams {
    pub fn new(n_heads: usize, head_dim: usize, theta: f32, scaling: Option<&RopeScaling>, layout: RopeLayout) -> Self {
        let f = RopeScaling::frequencies(theta, head_dim, scaling);
        RopeParams { n_heads, head_dim, inv_freq: f.inv_freq.into(), attention_factor: f.attention_factor, layout }
    }

    /// Rotates one row (all `n_heads` heads) to position `pos`, cos and sin times the attention factor: the
    /// definition every backend's `rope` is checked against. A negative `pos` rotates back (a context shift).
    pub fn rotate(&self, row: &mut [f32], pos: f32) {
        let hd = self.head_dim;
        let half = hd / 2;
        let af = self.attention_factor;
        for (i, &freq) in self.inv_freq.iter().enumerate().take(half) {
            let (s, c) = (pos * freq).sin_cos();
            let (s, c) = if af == 1.0 { (s, c) } else { (s * af, c * af) };
            for h in 0..self.n_heads {
                let base = h * hd;
                let (a, b) = match self.layout {
                    RopeLayout::Adjacent => (base + 2 * i, base + 2 * i + 1),
                    RopeLayout::Half => (base + i, base + i + half),
                };
                let (x0, x1) = (row[a], row[b]);
                row[a] = x0 * c - x1 * s;
                row[b] = x0 * s + x1 * c;
            }
        }
    }
}

/// How a KV cache stores keys and values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvDtype {
    #[default]
    F32,
    /// int8 codes with one f32 scale per position and KV head (its absmax / 127): ~1/4 of the f32 bytes.
    Q8,
}

impl KvDtype {
    pub const ALL: [KvDtype; 2] = [KvDtype::F32, KvDtype::Q8];
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::Q8 => "q8",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == s)
    }
}

/// Quantizes one head's keys or values to int8 codes with one scale (absmax / 127, rounding to nearest even,
/// as WGSL's `round` does):
/// the definition every backend's int8 KV cache is checked against. Returns the scale.
pub fn quantize_kv_head(x: &[f32], codes: &mut [i8]) -> f32 {
    let (d, inv) = kv_head_scale(x);
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = kv_code(v, inv);
    }
    d
}

/// One head's scale (absmax / 127) and its inverse (0 for an all-zero head).
fn kv_head_scale(x: &[f32]) -> (f32, f32) {
    let d = x.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
    (d, if d > 0.0 { 1.0 / d } else { 0.0 })
}

fn kv_code(v: f32, inv: f32) -> i8 {
    (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8
}

/// Rows of keys or values (heads of `head_dim`) as an int8 cache stores them: codes, and a scale per head.
pub fn quantize_kv(x: &[f32], head_dim: usize) -> (Vec<i8>, Vec<f32>) {
    let hd = head_dim.max(1);
    let mut codes = vec![0i8; x.len()];
    let scales = x.chunks(hd).zip(codes.chunks_mut(hd)).map(|(h, c)| quantize_kv_head(h, c)).collect();
    (codes, scales)
}

/// The values of [`quantize_kv`]'s codes from element `from` on.
pub fn dequantize_kv<'a>(codes: &'a [i8], scales: &'a [f32], head_dim: usize, from: usize) -> impl Iterator<Item = f32> + 'a {
    let hd = head_dim.max(1);
    (from..codes.len()).map(move |i| codes[i] as f32 * scales[i / hd])
}

/// `x` as an int8 KV cache holds it: each `head_dim` group quantized and dequantized, in place (the same
/// values as [`quantize_kv`] then [`dequantize_kv`], without their buffers: the CPU backend runs it per layer
/// per token).
pub fn round_trip_kv_q8(x: &mut [f32], head_dim: usize) {
    for h in x.chunks_mut(head_dim.max(1)) {
        let (d, inv) = kv_head_scale(h);
        h.iter_mut().for_each(|v| *v = kv_code(*v, inv) as f32 * d);
    }
}

/// [`Backend::kv_write`]'s rows checked: how many positions `k` and `v` hold (rows of `kv_dim` each), at
/// most `cap` (the layer's slots).
pub fn kv_write_positions(k: &[f32], v: &[f32], kv_dim: usize, cap: usize) -> Result<usize> {
    let kvd = kv_dim.max(1);
    let n = k.len() / kvd;
    ensure_shape!(k.len() == n * kvd && v.len() == k.len(), "kv_write", "{} keys, {} values in rows of {kvd}", k.len(), v.len());
    ensure_shape!(n <= cap, "kv_write", "{n} positions into a {cap}-slot layer");
    Ok(n)
}

/// Shape of the KV cache a model needs.
#[derive(Clone, Debug, PartialEq)]
pub struct KvLayout {
    pub kv_dim: usize,
    /// Per layer: `None` = global (grows to the context), `Some(w)` = sliding window ring of `w` entries.
    pub windows: Vec<Option<usize>>,
    pub max_context: usize,
    /// Keys and values of one KV head (the group an int8 cache scales together).
    pub head_dim: usize,
    pub dtype: KvDtype,
}

impl KvLayout {
    pub fn for_model(cfg: &ModelConfig, max_context: usize) -> Self {
        KvLayout {
            head_dim: cfg.head_dim,
            dtype: KvDtype::F32,
            kv_dim: cfg.kv_dim(),
            windows: cfg
                .attention
                .iter()
                .map(|a| match a {
                    sprig_format::AttentionKind::Global => None,
                    sprig_format::AttentionKind::Sliding { window } => Some(*window),
                })
                .collect(),
            max_context,
        }
    }
    /// Entries a layer keeps: its window or the whole context.
    pub fn layer_capacity(&self, layer: usize) -> usize {
        self.windows[layer].map_or(self.max_context, |w| w.min(self.max_context))
    }
    /// The same layout with keys and values stored as `dtype`.
    pub fn with_dtype(self, dtype: KvDtype) -> Self {
        KvLayout { dtype, ..self }
    }
    /// Bytes of K and V of one position of one layer.
    pub fn bytes_per_position(&self) -> u64 {
        let heads = (self.kv_dim / self.head_dim.max(1)) as u64;
        match self.dtype {
            KvDtype::F32 => 8 * self.kv_dim as u64,
            KvDtype::Q8 => 2 * (self.kv_dim as u64 + 4 * heads),
        }
    }
    /// Bytes of K and V for the whole context, all layers (`None` on overflow).
    pub fn total_bytes(&self) -> Option<u64> {
        (0..self.windows.len()).try_fold(0u64, |acc, l| {
            let per = (self.layer_capacity(l) as u64).checked_mul(self.bytes_per_position())?;
            acc.checked_add(per)
        })
    }

    /// Fails when the KV cache of this layout cannot fit in `available` bytes.
    pub fn check_fits(&self, available: Option<u64>) -> Result<()> {
        let what = format!("a KV cache of {} tokens", self.max_context);
        let needed = self.total_bytes().ok_or_else(|| BackendError::OutOfMemory {
            what: what.clone(),
            needed: u64::MAX,
            available: available.unwrap_or(0),
        })?;
        match available {
            Some(a) if needed > a => Err(BackendError::OutOfMemory { what, needed, available: a }),
            _ => Ok(()),
        }
    }

    /// Bytes of K and V at `ctx` tokens, per layer.
    pub fn bytes_per_layer(&self, ctx: usize) -> Vec<usize> {
        let per = self.bytes_per_position() as usize;
        (0..self.windows.len()).map(|l| per * self.windows[l].map_or(ctx, |w| w.min(ctx))).collect()
    }
}

/// The op set. All tensors are f32 `[rows, cols]`; weights are whatever the backend keeps resident.
pub trait Backend: Send + Sync + 'static {
    type Tensor: Send;
    type Weight: Send + Sync;
    type KvCache: Send;
    /// One MoE layer's state for one sequence: its usage counters (tokens per expert, expert bytes read) and
    /// whatever scratch the backend keeps between calls. Host memory on the CPU; on a GPU the counters stay on
    /// the device, so counting costs no transfer and only [`Backend::moe_usage`] reads them back.
    type MoeState: Send;

    fn name(&self) -> String;

    /// Runs a whole forward pass "on" the backend. The CPU backend enters its thread pool once here, so the
    /// per-op parallel loops inside are plain fork/joins on pool threads instead of a cross-thread handoff per
    /// op (which cost more than the small decode matmuls themselves).
    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        f()
    }

    /// Makes tensor `name` of the model file resident (CPU: a view into the mmap; GPU: an upload).
    fn load_weight(&self, file: &Arc<ModelFile>, name: &str) -> Result<Self::Weight>;
    /// `[rows, cols]` of a weight (vectors are `[1, n]`).
    fn weight_shape(&self, w: &Self::Weight) -> (usize, usize);

    fn tensor(&self) -> Self::Tensor;
    fn shape(&self, t: &Self::Tensor) -> (usize, usize);

    // ---- primitives: every backend implements these ----

    /// Sets `t` to the given host data.
    fn upload(&self, data: &[f32], rows: usize, cols: usize, t: &mut Self::Tensor) -> Result<()>;
    /// Copies `t` to the host (`out.len() == rows * cols`).
    fn download(&self, t: &Self::Tensor, out: &mut Vec<f32>) -> Result<()>;
    /// `out = x[start..start+n, :]`.
    fn rows(&self, x: &Self::Tensor, start: usize, n: usize, out: &mut Self::Tensor) -> Result<()>;
    /// `dst[start..start+n, :] = src` (`src [n, cols]`, `dst` already at least `start + n` rows of `cols`): a
    /// batch's rows computed one sequence at a time written back.
    fn set_rows(&self, dst: &mut Self::Tensor, start: usize, src: &Self::Tensor) -> Result<()>;
    /// `out[i] = table[tokens[i]] * scale` (rows dequantized from the weight's format).
    fn embed(&self, table: &Self::Weight, tokens: &[u32], scale: f32, out: &mut Self::Tensor) -> Result<()>;
    /// RMSNorm over each contiguous group of `w.len()` elements of every row (`cols` must be a multiple, so a
    /// `[tokens, heads*head_dim]` tensor with a `[head_dim]` weight normalises each head).
    fn rms_norm(&self, x: &Self::Tensor, w: &Self::Weight, eps: f32, out: &mut Self::Tensor) -> Result<()>;
    /// `out = x · Wᵀ (+ bias)`: `x [T, in]`, `W [out, in]`.
    fn linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        bias: Option<&Self::Weight>,
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// Rotates `x [T, n_heads*head_dim]` in place; row t is at position `pos0 + t`.
    fn rope(&self, x: &mut Self::Tensor, pos0: usize, p: &RopeParams) -> Result<()>;
    /// Causal attention of the T new queries (positions `pos0..pos0+T`) over the cached keys of this layer and
    /// the T new keys, then appends the new K/V to the cache. `q [T, n_heads*hd]`, `k`/`v [T, n_kv*hd]`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        cache: &mut Self::KvCache,
        layer: usize,
        pos0: usize,
        p: &AttentionParams,
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// `x += y`.
    fn add(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<()>;
    /// `x *= y` element-wise; `y` is `x`'s shape, or `[T, 1]` (one factor per row).
    fn mul(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<()>;
    /// `x = f(x)` element-wise.
    fn map(&self, x: &mut Self::Tensor, f: Unary) -> Result<()>;

    /// Routed experts of one MoE FFN layer: each token of `x [T, dim]` goes to the `top_k` experts its row of
    /// `router_logits [T, n_experts]` selects (see [`moe::route`]); `out [T, dim]` is the routing-weighted sum
    /// of those experts' GLU FFNs. Only the selected experts' weights may be read; backends that can, group
    /// the batch's tokens by expert. `state` (from [`Backend::moe_state`]) accumulates tokens per expert and
    /// weight bytes read (see [`moe::expert_bytes`]).
    #[allow(clippy::too_many_arguments)]
    fn moe(
        &self,
        x: &Self::Tensor,
        router_logits: &Self::Tensor,
        experts: &ExpertWeights<'_, Self::Weight>,
        p: &MoeParams,
        out: &mut Self::Tensor,
        state: &mut Self::MoeState,
    ) -> Result<()>;

    /// A fresh MoE layer state with zeroed counters.
    fn moe_state(&self, p: &MoeParams) -> Result<Self::MoeState>;

    /// What the layer's experts did so far (on a GPU, a device-to-host read: call it when stats are wanted,
    /// not per token).
    fn moe_usage(&self, state: &Self::MoeState) -> Result<MoeUsage>;

    /// A fresh, empty KV cache; an error when it cannot be allocated (a context larger than the memory).
    fn kv_cache(&self, layout: &KvLayout) -> Result<Self::KvCache>;
    /// Copies the keys and values of `positions` of `layer` to the host, `[n, kv_dim]` row-major each (saving a
    /// session). Only positions the layer still holds can be read: the last `layer_capacity` before the
    /// sequence's current position.
    fn kv_read(
        &self,
        cache: &Self::KvCache,
        layer: usize,
        positions: std::ops::Range<usize>,
        k: &mut Vec<f32>,
        v: &mut Vec<f32>,
    ) -> Result<()>;
    /// Writes keys and values `[n, kv_dim]` of positions `pos0..pos0 + n` into `layer` (restoring a session
    /// into a fresh cache, positions in increasing order).
    fn kv_write(&self, cache: &mut Self::KvCache, layer: usize, pos0: usize, k: &[f32], v: &[f32]) -> Result<()>;

    // ---- composite ops: defaults from the primitives (see [`composite`]); override only for speed ----

    /// Several linears reading the same input (Q/K/V, gate/up): `outs[i] = x · W_iᵀ (+ b_i)`. Backends may run
    /// them as one parallel pass instead of one per matrix.
    fn linear_many(
        &self,
        x: &Self::Tensor,
        ws: &[(&Self::Weight, Option<&Self::Weight>)],
        outs: &mut [&mut Self::Tensor],
    ) -> Result<()> {
        composite::linear_many(self, x, ws, outs)
    }
    /// `out = act(gate) * up`.
    fn glu(&self, gate: &Self::Tensor, up: &Self::Tensor, act: Activation, out: &mut Self::Tensor) -> Result<()> {
        composite::glu(self, gate, up, act, out)
    }
    /// `x = cap * tanh(x / cap)`.
    fn softcap(&self, x: &mut Self::Tensor, cap: f32) -> Result<()> {
        composite::softcap(self, x, cap)
    }
    /// `x[t, :] *= sigmoid(g[t, 0])` (`g` is `[T, 1]`, overwritten): Qwen-MoE's gate on the shared expert.
    fn sigmoid_gate(&self, x: &mut Self::Tensor, g: &mut Self::Tensor) -> Result<()> {
        composite::sigmoid_gate(self, x, g)
    }
}
