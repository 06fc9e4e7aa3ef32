//! The f32 reference backend on burn.
//!
//! Built on `burn-flex` (burn's pure-Rust CPU backend) rather than `burn-ndarray`: burn 0.22 deprecates ndarray
//! in favour of flex, and flex ran the same per-op workloads ~8x faster here (see `../shared/notes`), which keeps
//! whole-model reference runs in tests short. It is a *reference*: weights are dequantized to f32 once, every
//! op is plain tensor math (matmul, softmax, masks), the KV cache keeps the full history and sliding windows are a
//! mask — deliberately a different implementation from the CPU backend's rings, fused loops and int8 kernels.
#![forbid(unsafe_code)]

use std::sync::Arc;

use burn::tensor::activation::{gelu_approximate, sigmoid, silu, softmax};
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use sprig_backend::{
    ensure_shape, Activation, AttentionParams, Backend, BackendError, ExpertWeights, KvLayout, MoeParams, MoeUsage,
    Result, RopeLayout, RopeParams, Unary,
};
use sprig_format::ModelFile;

pub struct BurnBackend {
    device: Device,
}

impl BurnBackend {
    pub fn new() -> Self {
        BurnBackend { device: Device::flex() }
    }
    fn t2(&self, data: Vec<f32>, rows: usize, cols: usize) -> Tensor<2> {
        Tensor::<2>::from_data(TensorData::new(data, [rows, cols]), &self.device)
    }
}

impl Default for BurnBackend {
    fn default() -> Self {
        Self::new()
    }
}

/// A weight as an f32 matrix `[rows, cols]` (vectors are `[1, n]`).
pub struct BurnWeight {
    w: Tensor<2>,
    rows: usize,
    cols: usize,
}

/// Full K/V history per layer (`[positions, kv_dim]`).
pub struct BurnKvCache {
    k: Vec<Option<Tensor<2>>>,
    v: Vec<Option<Tensor<2>>>,
    kv_dim: usize,
    /// An int8 cache: its head size (keys and values are held as the int8 codes times their scales).
    q8_head: Option<usize>,
}

impl BurnKvCache {
    /// `x` as this cache holds it.
    fn stored(&self, x: &Tensor<2>) -> Tensor<2> {
        match self.q8_head {
            None => x.clone(),
            Some(hd) => {
                let [rows, cols] = x.dims();
                let mut data = to_vec(x);
                sprig_backend::round_trip_kv_q8(&mut data, hd);
                Tensor::<2>::from_data(TensorData::new(data, [rows, cols]), &x.device())
            }
        }
    }
}

fn activate<const D: usize>(x: Tensor<D>, act: Activation) -> Tensor<D> {
    match act {
        Activation::Silu => silu(x),
        Activation::GeluTanh => gelu_approximate(x),
    }
}

fn to_vec(t: &Tensor<2>) -> Vec<f32> {
    t.to_data().try_to_vec::<f32>().expect("f32 tensor")
}

impl Backend for BurnBackend {
    type Tensor = Tensor<2>;
    type Weight = BurnWeight;
    type KvCache = BurnKvCache;
    type MoeState = MoeUsage;

    fn name(&self) -> String {
        "reference (burn-flex, f32)".into()
    }

    fn load_weight(&self, file: &Arc<ModelFile>, name: &str) -> Result<BurnWeight> {
        let v = file.weight(name).map_err(BackendError::from)?;
        let (rows, cols) = (v.rows(), v.cols());
        Ok(BurnWeight { w: self.t2(v.to_f32(), rows, cols), rows, cols })
    }
    fn weight_shape(&self, w: &BurnWeight) -> (usize, usize) {
        (w.rows, w.cols)
    }

    fn tensor(&self) -> Tensor<2> {
        Tensor::<2>::zeros([1, 1], &self.device)
    }
    fn shape(&self, t: &Tensor<2>) -> (usize, usize) {
        let [r, c] = t.dims();
        (r, c)
    }
    fn upload(&self, data: &[f32], rows: usize, cols: usize, t: &mut Tensor<2>) -> Result<()> {
        ensure_shape!(data.len() == rows * cols, "upload", "{} values for a {rows}x{cols} tensor", data.len());
        *t = self.t2(data.to_vec(), rows, cols);
        Ok(())
    }
    fn download(&self, t: &Tensor<2>, out: &mut Vec<f32>) -> Result<()> {
        *out = to_vec(t);
        Ok(())
    }
    fn rows(&self, x: &Tensor<2>, start: usize, n: usize, out: &mut Tensor<2>) -> Result<()> {
        ensure_shape!(start + n <= x.dims()[0], "rows", "rows {start}..{} of {}", start + n, x.dims()[0]);
        *out = x.clone().narrow(0, start, n);
        Ok(())
    }

    fn set_rows(&self, dst: &mut Tensor<2>, start: usize, src: &Tensor<2>) -> Result<()> {
        let ([n, c], [rows, cols]) = (src.dims(), dst.dims());
        ensure_shape!(c == cols && start + n <= rows, "set_rows", "{n}x{c} at row {start} of {rows}x{cols}");
        *dst = dst.clone().slice_assign([start..start + n, 0..c], src.clone());
        Ok(())
    }

    fn embed(&self, table: &BurnWeight, tokens: &[u32], scale: f32, out: &mut Tensor<2>) -> Result<()> {
        let ids = Tensor::<1, Int>::from_data(
            TensorData::new(tokens.iter().map(|&t| t as i64).collect::<Vec<_>>(), [tokens.len()]),
            &self.device,
        );
        *out = table.w.clone().select(0, ids) * scale;
        Ok(())
    }

    fn rms_norm(&self, x: &Tensor<2>, w: &BurnWeight, eps: f32, out: &mut Tensor<2>) -> Result<()> {
        let [t, c] = x.dims();
        let g = w.cols;
        ensure_shape!(g > 0 && c % g == 0, "rms_norm", "width {c} is not a multiple of {g}");
        let xg = x.clone().reshape([t * c / g, g]);
        let inv = (xg.clone().powf_scalar(2.0).mean_dim(1) + eps).sqrt().recip();
        *out = (xg * inv * w.w.clone()).reshape([t, c]);
        Ok(())
    }

    fn linear(&self, x: &Tensor<2>, w: &BurnWeight, bias: Option<&BurnWeight>, out: &mut Tensor<2>) -> Result<()> {
        ensure_shape!(x.dims()[1] == w.cols, "linear", "input width {} vs weight {}x{}", x.dims()[1], w.rows, w.cols);
        let y = x.clone().matmul(w.w.clone().transpose());
        *out = match bias {
            Some(b) => y + b.w.clone(),
            None => y,
        };
        Ok(())
    }

    fn rope(&self, x: &mut Tensor<2>, pos0: usize, p: &RopeParams) -> Result<()> {
        let [t, c] = x.dims();
        let (h, hd) = (p.n_heads, p.head_dim);
        ensure_shape!(c == h * hd, "rope", "width {c} for {h} heads of {hd}");
        let half = hd / 2;
        let (mut cos, mut sin) = (Vec::with_capacity(t * half), Vec::with_capacity(t * half));
        let af = p.attention_factor as f64;
        for ti in 0..t {
            let pos = (pos0 + ti) as f64;
            for &freq in p.inv_freq.iter().take(half) {
                let freq = freq as f64;
                cos.push(((pos * freq).cos() * af) as f32);
                sin.push(((pos * freq).sin() * af) as f32);
            }
        }
        let cos = self.t2(cos, t, half).reshape([t, 1, half, 1]);
        let sin = self.t2(sin, t, half).reshape([t, 1, half, 1]);
        // View each head as pairs: adjacent (x[2i], x[2i+1]) or halves (x[i], x[i+half]).
        let pairs: Tensor<4> = match p.layout {
            RopeLayout::Adjacent => x.clone().reshape([t, h, half, 2]),
            RopeLayout::Half => x.clone().reshape([t, h, 2, half]).swap_dims(2, 3),
        };
        let x0 = pairs.clone().narrow(3, 0, 1);
        let x1 = pairs.narrow(3, 1, 1);
        let r0 = x0.clone() * cos.clone() - x1.clone() * sin.clone();
        let r1 = x0 * sin + x1 * cos;
        let rot = Tensor::cat(vec![r0, r1], 3);
        *x = match p.layout {
            RopeLayout::Adjacent => rot.reshape([t, h * hd]),
            RopeLayout::Half => rot.swap_dims(2, 3).reshape([t, h * hd]),
        };
        Ok(())
    }

    fn attention(
        &self,
        q: &Tensor<2>,
        k: &Tensor<2>,
        v: &Tensor<2>,
        cache: &mut BurnKvCache,
        layer: usize,
        pos0: usize,
        p: &AttentionParams,
        out: &mut Tensor<2>,
    ) -> Result<()> {
        let [t, _] = q.dims();
        let (h, g, hd) = (p.n_heads, p.n_kv_heads, p.head_dim);
        let (k, v) = (&cache.stored(k), &cache.stored(v));
        let k_all = match cache.k[layer].take() {
            Some(old) => Tensor::cat(vec![old, k.clone()], 0),
            None => k.clone(),
        };
        let v_all = match cache.v[layer].take() {
            Some(old) => Tensor::cat(vec![old, v.clone()], 0),
            None => v.clone(),
        };
        let s = k_all.dims()[0];
        ensure_shape!(s == pos0 + t, "attention", "the cache holds {} positions, expected {pos0}", s - t);
        let expand = |x: &Tensor<2>| -> Tensor<3> {
            x.clone().reshape([s, g, 1, hd]).repeat_dim(2, h / g).reshape([s, h, hd]).swap_dims(0, 1)
        };
        let (kh, vh) = (expand(&k_all), expand(&v_all));
        let qh: Tensor<3> = q.clone().reshape([t, h, hd]).swap_dims(0, 1);
        let scores = qh.matmul(kh.swap_dims(1, 2)) * p.scale;
        let mut mask = Vec::with_capacity(t * s);
        for i in 0..t {
            let pos = pos0 + i;
            for j in 0..s {
                let visible = j <= pos && p.window.is_none_or(|w| j + w > pos);
                mask.push(!visible);
            }
        }
        let mask = Tensor::<2, Bool>::from_data(TensorData::new(mask, [t, s]), &self.device)
            .reshape([1, t, s])
            .repeat_dim(0, h);
        let probs = softmax(scores.mask_fill(mask, f32::NEG_INFINITY), 2);
        *out = probs.matmul(vh).swap_dims(0, 1).reshape([t, h * hd]);
        cache.k[layer] = Some(k_all);
        cache.v[layer] = Some(v_all);
        Ok(())
    }

    fn add(&self, x: &mut Tensor<2>, y: &Tensor<2>) -> Result<()> {
        ensure_shape!(x.dims() == y.dims(), "add", "{:?} + {:?}", x.dims(), y.dims());
        *x = x.clone() + y.clone();
        Ok(())
    }

    fn mul(&self, x: &mut Tensor<2>, y: &Tensor<2>) -> Result<()> {
        let ([r, c], [yr, yc]) = (x.dims(), y.dims());
        ensure_shape!(yr == r && (yc == c || yc == 1), "mul", "{r}x{c} * {yr}x{yc}");
        // Broadcasting a [T, 1] factor over each row.
        *x = x.clone() * y.clone();
        Ok(())
    }

    fn map(&self, x: &mut Tensor<2>, f: Unary) -> Result<()> {
        *x = match f {
            Unary::Scale(s) => x.clone() * s,
            Unary::Tanh => x.clone().tanh(),
            Unary::Sigmoid => sigmoid(x.clone()),
            Unary::Act(act) => activate(x.clone(), act),
        };
        Ok(())
    }

    /// Dense on purpose: every expert runs on every token and the routing weights (zero for experts a token did
    /// not select) mix them — a different computation from the CPU backend's grouped, selected-only one. The
    /// routing itself is the shared rule, `moe::route`.
    fn moe(
        &self,
        x: &Tensor<2>,
        router_logits: &Tensor<2>,
        experts: &ExpertWeights<'_, BurnWeight>,
        p: &MoeParams,
        out: &mut Tensor<2>,
        usage: &mut MoeUsage,
    ) -> Result<()> {
        let [t, d] = x.dims();
        let (ne, h) = (p.n_experts, p.expert_hidden);
        ensure_shape!(router_logits.dims() == [t, ne], "moe", "router logits {:?} for {ne} experts", router_logits.dims());
        // Routing by the one shared rule (`moe::route`), as a dense [T, E] weight matrix.
        let logits = to_vec(router_logits);
        let (mut scores, mut selected) = (Vec::new(), Vec::new());
        let mut dense = vec![0.0f32; t * ne];
        usage.tokens.resize(ne, 0);
        for ti in 0..t {
            sprig_backend::moe::route(&logits[ti * ne..(ti + 1) * ne], p, &mut scores, &mut selected);
            for &(e, w) in &selected {
                dense[ti * ne + e] = w;
                usage.tokens[e] += 1;
            }
        }
        let weights = self.t2(dense, t, ne);
        let g = x.clone().matmul(experts.gate.w.clone().transpose()).reshape([t, ne, h]);
        let u = x.clone().matmul(experts.up.w.clone().transpose()).reshape([t, ne, h]);
        let a: Tensor<3> = activate(g, p.activation) * u;
        let down: Tensor<3> = experts.down.w.clone().reshape([ne, d, h]);
        // [E, T, H] x [E, H, D] -> [E, T, D] -> [T, E, D]
        let y = a.swap_dims(0, 1).matmul(down.swap_dims(1, 2)).swap_dims(0, 1);
        *out = (y * weights.reshape([t, ne, 1])).sum_dim(1).reshape([t, d]);
        // Dense: every expert's f32 weights are read.
        let per_expert = sprig_backend::moe::expert_bytes(4 * ne * h * d, 4 * ne * h * d, 4 * ne * d * h, ne);
        usage.bytes_read += ne as u64 * per_expert;
        Ok(())
    }

    fn moe_state(&self, p: &MoeParams) -> Result<MoeUsage> {
        Ok(MoeUsage::new(p.n_experts))
    }

    fn moe_usage(&self, state: &MoeUsage) -> Result<MoeUsage> {
        Ok(state.clone())
    }

    /// Positions are history rows here (the reference keeps every position).
    fn kv_read(
        &self,
        cache: &BurnKvCache,
        layer: usize,
        positions: std::ops::Range<usize>,
        k: &mut Vec<f32>,
        v: &mut Vec<f32>,
    ) -> Result<()> {
        ensure_shape!(layer < cache.k.len(), "kv_read", "layer {layer} of a {}-layer cache", cache.k.len());
        let (Some(kc), Some(vc)) = (&cache.k[layer], &cache.v[layer]) else {
            ensure_shape!(positions.is_empty(), "kv_read", "positions {positions:?} of an empty layer");
            k.clear();
            v.clear();
            return Ok(());
        };
        let held = kc.dims()[0];
        ensure_shape!(positions.end <= held, "kv_read", "positions {positions:?} of {held}");
        *k = to_vec(&kc.clone().narrow(0, positions.start, positions.len()));
        *v = to_vec(&vc.clone().narrow(0, positions.start, positions.len()));
        Ok(())
    }

    /// Positions before `pos0` this layer never saw (a restored sliding-window layer keeps only its window)
    /// are zeros: the window's mask keeps them out of every score.
    fn kv_write(&self, cache: &mut BurnKvCache, layer: usize, pos0: usize, k: &[f32], v: &[f32]) -> Result<()> {
        ensure_shape!(layer < cache.k.len(), "kv_write", "layer {layer} of a {}-layer cache", cache.k.len());
        sprig_backend::kv_write_positions(k, v, cache.kv_dim, usize::MAX)?;
        let cols = cache.kv_dim.max(1);
        let (mut k, mut v) = (k.to_vec(), v.to_vec());
        if let Some(hd) = cache.q8_head {
            sprig_backend::round_trip_kv_q8(&mut k, hd);
            sprig_backend::round_trip_kv_q8(&mut v, hd);
        }
        for (slot, data) in [(&mut cache.k[layer], &k[..]), (&mut cache.v[layer], &v[..])] {
            let held = slot.as_ref().map_or(0, |t| t.dims()[0]);
            ensure_shape!(held <= pos0, "kv_write", "position {pos0} is already held ({held})");
            let mut parts: Vec<Tensor<2>> = slot.take().into_iter().collect();
            if pos0 > held {
                parts.push(Tensor::<2>::zeros([pos0 - held, cols], &self.device));
            }
            parts.push(self.t2(data.to_vec(), data.len() / cols, cols));
            *slot = Some(Tensor::cat(parts, 0));
        }
        Ok(())
    }

    fn kv_cache(&self, layout: &KvLayout) -> Result<BurnKvCache> {
        layout.check_fits(sprig_backend::physical_memory())?;
        let n = layout.windows.len();
        let q8_head = (layout.dtype == sprig_backend::KvDtype::Q8).then_some(layout.head_dim);
        Ok(BurnKvCache {
            k: (0..n).map(|_| None).collect(),
            v: (0..n).map(|_| None).collect(),
            kv_dim: layout.kv_dim,
            q8_head,
        })
    }
}
