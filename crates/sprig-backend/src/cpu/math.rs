//! Scalar f32 helpers of the CPU backend (the compiler vectorises these loops).

use std::cell::RefCell;

use crate::{Activation, RopeLayout, RopeParams};

thread_local! {
    /// Per-worker attention score buffer, reused across tokens.
    pub static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent accumulators so the loop vectorises without -ffast-math.
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[inline]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
}

pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, add_one: bool, out: &mut [f32]) {
    let ss: f32 = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ss + eps).sqrt();
    let off = if add_one { 1.0 } else { 0.0 };
    for ((o, v), w) in out.iter_mut().zip(x).zip(w) {
        *o = v * inv * (w + off);
    }
}

/// Rotates one row (all heads) at position `pos` (already divided by the scaling factor).
pub fn rope_row(row: &mut [f32], pos: f32, p: &RopeParams) {
    let hd = p.head_dim;
    let half = hd / 2;
    for i in 0..half {
        // Same f32 formula as llama2.c's run.c, so f32 models reproduce its output exactly.
        let freq = 1.0f32 / p.theta.powf((2 * i) as f32 / hd as f32);
        let (s, c) = (pos * freq).sin_cos();
        for h in 0..p.n_heads {
            let base = h * hd;
            let (a, b) = match p.layout {
                RopeLayout::Adjacent => (base + 2 * i, base + 2 * i + 1),
                RopeLayout::Half => (base + i, base + i + half),
            };
            let (x0, x1) = (row[a], row[b]);
            row[a] = x0 * c - x1 * s;
            row[b] = x0 * s + x1 * c;
        }
    }
}

#[inline]
pub fn activation(x: f32, act: Activation) -> f32 {
    match act {
        Activation::Silu => x / (1.0 + (-x).exp()),
        Activation::GeluTanh => {
            const C: f32 = 0.797_884_6; // sqrt(2/pi)
            0.5 * x * (1.0 + (C * (x + 0.044715 * x * x * x)).tanh())
        }
    }
}
