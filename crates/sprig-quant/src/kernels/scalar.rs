//! Portable reference kernel: exact integer block sums, f32 accumulation. Every SIMD kernel is tested
//! against this one.

use crate::activation::QuantizedActivations;
use crate::scheme::{QMatrix, Scheme, BLOCK};

pub fn dot_row(w: &QMatrix, r: usize, x: &QuantizedActivations, t: usize) -> f32 {
    let nb = w.nb();
    let xq = x.row_qs(t);
    let (xd, xs) = (x.row_d(t), x.row_sum(t));
    let mut acc = 0.0f32;
    for b in 0..nb {
        let xb = &xq[b * BLOCK..(b + 1) * BLOCK];
        if w.scheme == Scheme::Q6K {
            // Two halves with scales of their own: `(d·sc)·Σ(q − 32)·x` each.
            let (lo, hi) = w.q6k_half_scales(r, b);
            let half =
                |h: usize| -> i32 { (0..16).map(|j| w.code(r, b * BLOCK + 16 * h + j) * xb[16 * h + j] as i32).sum() };
            acc += xd[b] * (lo * half(0) as f32 + hi * half(1) as f32);
            continue;
        }
        // Bytes through `qs_byte`, which reads either row layout.
        let isum: i32 = if w.scheme.is_int4() {
            let q = |j| w.qs_byte(r, b * 16 + j);
            (0..16).map(|j| (q(j) & 0x0f) as i32 * xb[j] as i32 + (q(j) >> 4) as i32 * xb[j + 16] as i32).sum()
        } else {
            (0..32).map(|j| w.qs_byte(r, b * 32 + j) as i8 as i32 * xb[j] as i32).sum()
        };
        let (d, m) = w.block_scale(r, b);
        acc += d * xd[b] * isum as f32 + m * xs[b];
    }
    acc
}
