//! f32 → native int4/int8 with a per-group scale search that minimises squared error.
//!
//! Plain absmax (`d = max|x| / 8`, what GGUF's reference Q4_0 quantizer does) wastes a code level on the one
//! extreme value. For each group we instead try a fan of candidate scales around absmax, re-fit the scale by
//! least squares for the codes each candidate produces, round it to f16, and keep the one with the smallest
//! reconstruction error (the same idea as ggml's `make_qx_quants`/`make_qkx2_quants`, written from the math).

use half::f16;
use rayon::prelude::*;

use crate::scheme::{blocks_per_row, k4_pack_sub, q6k_pack_block, QMatrixOwned, Scheme, BLOCK, K4_SUB_BYTES, SUPER};

/// Quantizes a row-major `rows x cols` f32 matrix.
pub fn quantize(x: &[f32], rows: usize, cols: usize, scheme: Scheme) -> QMatrixOwned {
    quantize_with_importance(x, rows, cols, scheme, None)
}

/// Quantizes with per-input-feature importance (the mean square of the activations each column multiplies,
/// measured on calibration text): a weight's rounding error moves the output by `error * activation`, so the
/// search minimises `sum importance[k] * (sigma² + x²) * error²` (the `sigma² + x²` term keeps large weights
/// precise where activations are unknown or flat).
pub fn quantize_with_importance(
    x: &[f32],
    rows: usize,
    cols: usize,
    scheme: Scheme,
    importance: Option<&[f32]>,
) -> QMatrixOwned {
    assert_eq!(x.len(), rows * cols, "matrix size");
    if let Some(imp) = importance {
        assert_eq!(imp.len(), cols, "importance length");
    }
    match scheme {
        Scheme::Q4K => return quantize_q4k(x, rows, cols),
        Scheme::Q6K => return quantize_q6k(x, rows, cols),
        _ => {}
    }
    let mut out = QMatrixOwned::new(scheme, rows, cols);
    let nb = blocks_per_row(cols);
    let qpb = scheme.qs_bytes_per_block();
    if rows == 0 || nb == 0 {
        return out;
    }
    // Rows are independent: quantized in parallel on every core (the search dominates a conversion's time).
    let mut no_mins = Vec::new();
    let mins: &mut [f16] = match out.mins.as_mut() {
        Some(m) => m,
        None => {
            no_mins.resize(rows * nb, f16::ZERO);
            &mut no_mins
        }
    };
    out.qs
        .par_chunks_mut(nb * qpb)
        .zip(out.scales.par_chunks_mut(nb))
        .zip(mins.par_chunks_mut(nb))
        .enumerate()
        .for_each(|(r, ((qs_row, scales), mins))| {
            let row = &x[r * cols..(r + 1) * cols];
            let sigma2 = row.iter().map(|v| v * v).sum::<f32>() / cols as f32;
            for b in 0..nb {
                let (group, real) = padded_block(row, b);
                let mut weights = [0.0f32; BLOCK];
                for (j, w) in weights.iter_mut().enumerate().take(real) {
                    let v = group[j];
                    *w = match importance {
                        Some(imp) => imp[b * BLOCK + j] * (sigma2 + v * v).sqrt(),
                        None => v * v,
                    };
                }
                if weights.iter().sum::<f32>() <= 0.0 {
                    // Dead inputs (importance 0 everywhere in this group): fall back to the x² weighting.
                    weights = group.map(|v| v * v);
                }
                let qs = &mut qs_row[b * qpb..(b + 1) * qpb];
                match scheme {
                    Scheme::Q4 => {
                        let (d, codes) = search_symmetric_weighted(&group, &weights, 8);
                        scales[b] = d;
                        pack_q4(&codes.map(|c| (c + 8) as u8), qs);
                    }
                    Scheme::Q8 => {
                        let (d, codes) = search_symmetric_weighted(&group, &weights, 127);
                        scales[b] = d;
                        for (o, c) in qs.iter_mut().zip(codes) {
                            *o = c as i8 as u8;
                        }
                    }
                    Scheme::Q4A => {
                        let (d, m, codes) = search_asymmetric(&group, 15);
                        scales[b] = d;
                        mins[b] = m;
                        pack_q4(&codes.map(|c| c as u8), qs);
                    }
                    Scheme::Q4K | Scheme::Q6K => unreachable!("quantized by quantize_q4k / quantize_q6k"),
                    Scheme::Q8A => {
                        let (d, m, codes) = search_asymmetric(&group, 255);
                        // int8 codes are signed: shift the range down by 128 and fold it into the min.
                        scales[b] = d;
                        mins[b] = f16::from_f32(m.to_f32() + 128.0 * d.to_f32());
                        for (o, c) in qs.iter_mut().zip(codes) {
                            *o = (c - 128) as i8 as u8;
                        }
                    }
                }
            }
        });
    out
}

/// Block `b` of `row`, zero-padded past the row's end, and how many of its values are real.
fn padded_block(row: &[f32], b: usize) -> ([f32; BLOCK], usize) {
    let src = &row[b * BLOCK..((b + 1) * BLOCK).min(row.len())];
    let mut g = [0.0f32; BLOCK];
    g[..src.len()].copy_from_slice(src);
    (g, src.len())
}

/// [`Scheme::Q4K`]: each block's asymmetric int4 fit (as Q4A), its scale and min then expressed as 6-bit
/// multiples of the superblock's f16 super-scale and super-min (Q4_K's grid: mins at or below zero), and the
/// codes re-fitted to the rounded block scales.
fn quantize_q4k(x: &[f32], rows: usize, cols: usize) -> QMatrixOwned {
    assert_eq!(x.len(), rows * cols, "matrix size");
    let mut out = QMatrixOwned::new(Scheme::Q4K, rows, cols);
    let nb = blocks_per_row(cols);
    let ns = Scheme::Q4K.scales_per_row(nb);
    if rows == 0 || nb == 0 {
        return out;
    }
    let (mins, sub) = (out.mins.as_mut().expect("q4k mins"), out.sub.as_mut().expect("q4k sub"));
    out.qs
        .par_chunks_mut(nb * 16)
        .zip(out.scales.par_chunks_mut(ns))
        .zip(mins.par_chunks_mut(ns))
        .zip(sub.par_chunks_mut(ns * K4_SUB_BYTES))
        .enumerate()
        .for_each(|(r, (((qs, scales), mins), sub))| {
            let row = &x[r * cols..(r + 1) * cols];
            for s in 0..ns {
                let groups: Vec<[f32; BLOCK]> =
                    (s * SUPER..((s + 1) * SUPER).min(nb)).map(|b| padded_block(row, b).0).collect();
                let fits: Vec<(f32, f32)> = groups
                    .iter()
                    .map(|g| {
                        let (d, m, _) = search_asymmetric(g, 15);
                        (d.to_f32(), (-m.to_f32()).max(0.0))
                    })
                    .collect();
                let d = super_scale(fits.iter().fold(0.0f32, |a, f| a.max(f.0)), 63);
                let dmin = super_scale(fits.iter().fold(0.0f32, |a, f| a.max(f.1)), 63);
                let mult =
                    |v: f32, of: f16| if of.to_f32() > 0.0 { (v / of.to_f32()).round().min(63.0) as u8 } else { 0 };
                let (mut sc, mut mn) = ([0u8; SUPER], [0u8; SUPER]);
                for (j, (g, f)) in groups.iter().zip(&fits).enumerate() {
                    (sc[j], mn[j]) = (mult(f.0, d), mult(f.1, dmin));
                    let (db, mb) = (d.to_f32() * sc[j] as f32, dmin.to_f32() * mn[j] as f32);
                    let id = if db > 0.0 { 1.0 / db } else { 0.0 };
                    let codes = g.map(|v| ((v + mb) * id).round().clamp(0.0, 15.0) as u8);
                    let b = s * SUPER + j;
                    pack_q4(&codes, &mut qs[b * 16..(b + 1) * 16]);
                }
                scales[s] = d;
                mins[s] = dmin;
                sub[s * K4_SUB_BYTES..(s + 1) * K4_SUB_BYTES].copy_from_slice(&k4_pack_sub(&sc, &mn));
            }
        });
    out
}

/// [`Scheme::Q6K`] (Q6_K's grid): per 16 weights a signed scale `max|x| / 31`, expressed as an int8 multiple
/// of the superblock's f16 super-scale; codes `round(x / scale) + 32` clamped to 0..63.
fn quantize_q6k(x: &[f32], rows: usize, cols: usize) -> QMatrixOwned {
    assert_eq!(x.len(), rows * cols, "matrix size");
    let mut out = QMatrixOwned::new(Scheme::Q6K, rows, cols);
    let nb = blocks_per_row(cols);
    let ns = Scheme::Q6K.scales_per_row(nb);
    if rows == 0 || nb == 0 {
        return out;
    }
    let sub = out.sub.as_mut().expect("q6k sub");
    out.qs
        .par_chunks_mut(nb * 24)
        .zip(out.scales.par_chunks_mut(ns))
        .zip(sub.par_chunks_mut(nb * 2))
        .enumerate()
        .for_each(|(r, ((qs, scales), sub))| {
            let row = &x[r * cols..(r + 1) * cols];
            let at = |k: usize| if k < cols { row[k] } else { 0.0 };
            let (low, high) = qs.split_at_mut(nb * 16);
            for s in 0..ns {
                let blocks = s * SUPER..((s + 1) * SUPER).min(nb);
                let half_scale = |h: usize| (0..16).fold(0.0f32, |m, k| m.max(at(h * 16 + k).abs())) / 31.0;
                let halves: Vec<f32> = (2 * blocks.start..2 * blocks.end).map(half_scale).collect();
                let top = halves.iter().fold(0.0f32, |m, &v| m.max(v));
                let d = super_scale(top, 127);
                scales[s] = d;
                for b in blocks {
                    let mut codes = [0u8; BLOCK];
                    for h in 0..2 {
                        let sc = if d.to_f32() > 0.0 {
                            (halves[2 * (b - s * SUPER) + h] / d.to_f32()).round().min(127.0)
                        } else {
                            0.0
                        };
                        sub[2 * b + h] = sc as i8 as u8;
                        let step = d.to_f32() * sc;
                        let id = if step > 0.0 { 1.0 / step } else { 0.0 };
                        for k in 0..16 {
                            let v = at(b * BLOCK + h * 16 + k);
                            codes[h * 16 + k] = ((v * id).round() + 32.0).clamp(0.0, 63.0) as u8;
                        }
                    }
                    q6k_pack_block(&codes, &mut low[b * 16..(b + 1) * 16], &mut high[b * 8..(b + 1) * 8]);
                }
            }
        });
    out
}

/// The smallest f16 `d` with `d · steps >= top`: a K-quant super-scale under which every sub-scale up to `top`
/// is a multiple of at most `steps`.
fn super_scale(top: f32, steps: u16) -> f16 {
    let d = f16::from_f32(top / steps as f32);
    if d.to_f32() * (steps as f32) < top {
        f16::from_bits(d.to_bits() + 1)
    } else {
        d
    }
}

/// Packs 32 codes 0..15 into 16 bytes: byte j = code j | code j+16 << 4.
pub fn pack_q4(codes: &[u8; BLOCK], out: &mut [u8]) {
    for j in 0..BLOCK / 2 {
        out[j] = (codes[j] & 0x0f) | (codes[j + BLOCK / 2] << 4);
    }
}

fn sse_sym(x: &[f32; BLOCK], w: &[f32; BLOCK], d: f32, codes: &[i32; BLOCK]) -> f32 {
    x.iter().zip(codes).zip(w).map(|((v, &q), w)| w * (v - d * q as f32).powi(2)).sum()
}

fn codes_sym(x: &[f32; BLOCK], id: f32, nmax: i32) -> [i32; BLOCK] {
    // Codes span [-nmax, nmax-1] for int4 (so -8..7) and [-127, 127] for int8.
    let hi = if nmax == 8 { 7 } else { nmax };
    x.map(|v| ((v * id).round() as i32).clamp(-nmax, hi))
}

/// Returns the f16 scale and codes (in `[-nmax, nmax)`) minimising the group's squared error weighted by `x²`
/// (large weights dominate a layer's output, so their error costs more).
pub fn search_symmetric(x: &[f32; BLOCK], nmax: i32) -> (f16, [i32; BLOCK]) {
    search_symmetric_weighted(x, &x.map(|v| v * v), nmax)
}

/// [`search_symmetric`] with explicit per-weight error weights.
pub fn search_symmetric_weighted(x: &[f32; BLOCK], wt: &[f32; BLOCK], nmax: i32) -> (f16, [i32; BLOCK]) {
    let (mut amax, mut vmax) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            vmax = v;
        }
    }
    if amax == 0.0 {
        return (f16::ZERO, [0; BLOCK]);
    }
    let mut best = (f16::ZERO, [0i32; BLOCK], f32::INFINITY);
    let n = nmax as f32;
    // Candidates: the extreme value mapped to -n (GGUF style) or to n-1, and a fan of 0.1-step shrinks.
    for step in -10..=10 {
        for target in [-n, n - 1.0] {
            let t = target + step as f32 * 0.1 * target.signum();
            if t.abs() < 1.0 {
                continue;
            }
            let id = t / vmax;
            let codes = codes_sym(x, id, nmax);
            // Weighted least-squares scale for these codes.
            let (mut sxq, mut sqq) = (0.0f32, 0.0f32);
            for ((v, &q), &w) in x.iter().zip(&codes).zip(wt) {
                sxq += w * v * q as f32;
                sqq += w * (q * q) as f32;
            }
            if sqq == 0.0 {
                continue;
            }
            let d = f16::from_f32(sxq / sqq);
            let err = sse_sym(x, wt, d.to_f32(), &codes);
            if err < best.2 {
                best = (d, codes, err);
            }
        }
    }
    (best.0, best.1)
}

/// Returns f16 scale `d`, f16 min `m` and codes in `0..=nmax` minimising `sum (d*q + m - x)^2`.
pub fn search_asymmetric(x: &[f32; BLOCK], nmax: i32) -> (f16, f16, [i32; BLOCK]) {
    let lo = x.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if hi - lo <= 0.0 {
        return (f16::ZERO, f16::from_f32(lo), [0; BLOCK]);
    }
    let n = nmax as f32;
    let mut best = (f16::ZERO, f16::from_f32(lo), [0i32; BLOCK], f32::INFINITY);
    for step in -10..=10 {
        let iscale = (n + step as f32 * 0.1) / (hi - lo);
        if iscale <= 0.0 {
            continue;
        }
        let codes = x.map(|v| ((v - lo) * iscale).round().clamp(0.0, n) as i32);
        // Least squares for (d, m): [sqq sq; sq N] [d m]^T = [sxq sx]^T.
        let (mut sq, mut sqq, mut sx, mut sxq) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
        for (v, &q) in x.iter().zip(&codes) {
            let (v, q) = (*v as f64, q as f64);
            sq += q;
            sqq += q * q;
            sx += v;
            sxq += v * q;
        }
        let nn = BLOCK as f64;
        let det = sqq * nn - sq * sq;
        if det.abs() < 1e-12 {
            continue;
        }
        let d = f16::from_f32(((sxq * nn - sq * sx) / det) as f32);
        // Re-fit the min for the rounded scale so f16 rounding of d is compensated.
        let m = f16::from_f32(((sx - d.to_f64() * sq) / nn) as f32);
        let (df, mf) = (d.to_f32(), m.to_f32());
        let err: f32 = x.iter().zip(&codes).map(|(v, &q)| (df * q as f32 + mf - v).powi(2)).sum();
        if err < best.3 {
            best = (d, m, codes, err);
        }
    }
    (best.0, best.1, best.2)
}

/// GGUF-reference-style Q4_0 (`d = max / -8`, no search), kept to measure what the search buys.
/// int8 with the plain absmax scale (`d = max|x| / 127`, no search), rows on every core: for widening a
/// finer-grained source (GGUF Q6_K) to int8, where 255 levels leave nothing for a search to win but time.
pub fn quantize_absmax_q8(x: &[f32], rows: usize, cols: usize) -> QMatrixOwned {
    assert_eq!(x.len(), rows * cols, "matrix size");
    let mut out = QMatrixOwned::new(Scheme::Q8, rows, cols);
    let nb = blocks_per_row(cols);
    if rows == 0 || nb == 0 {
        return out;
    }
    out.qs.par_chunks_mut(nb * BLOCK).zip(out.scales.par_chunks_mut(nb)).enumerate().for_each(|(r, (qs, scales))| {
        let row = &x[r * cols..(r + 1) * cols];
        for b in 0..nb {
            let src = &row[b * BLOCK..((b + 1) * BLOCK).min(cols)];
            let amax = src.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let d = f16::from_f32(amax / 127.0);
            let id = if d.to_f32() != 0.0 { 1.0 / d.to_f32() } else { 0.0 };
            scales[b] = d;
            for (o, &v) in qs[b * BLOCK..].iter_mut().zip(src) {
                *o = (v * id).round().clamp(-127.0, 127.0) as i8 as u8;
            }
        }
    });
    out
}

pub fn quantize_absmax_q4(x: &[f32], rows: usize, cols: usize) -> QMatrixOwned {
    let mut out = QMatrixOwned::new(Scheme::Q4, rows, cols);
    let nb = blocks_per_row(cols);
    for r in 0..rows {
        for b in 0..nb {
            let mut g = [0.0f32; BLOCK];
            let src = &x[r * cols + b * BLOCK..r * cols + ((b + 1) * BLOCK).min(cols)];
            g[..src.len()].copy_from_slice(src);
            let vmax = g.iter().copied().fold(0.0f32, |m, v| if v.abs() > m.abs() { v } else { m });
            let d = vmax / -8.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let codes = g.map(|v| ((v * id + 8.5) as i32).min(15) as u8);
            let i = r * nb + b;
            out.scales[i] = f16::from_f32(d);
            pack_q4(&codes, &mut out.qs[i * 16..(i + 1) * 16]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rms_err(a: &[f32], b: &[f32]) -> f64 {
        (a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>() / a.len() as f64).sqrt()
    }

    fn gaussian(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let (u, v): (f32, f32) = (rng.gen_range(1e-7..1.0), rng.gen());
                (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
            })
            .collect()
    }

    #[test]
    fn search_beats_absmax_q4() {
        let (rows, cols) = (64, 300); // ragged last group
        let x = gaussian(rows * cols, 1);
        let searched = quantize(&x, rows, cols, Scheme::Q4).view().dequantize();
        let absmax = quantize_absmax_q4(&x, rows, cols).view().dequantize();
        // The search minimises the x²-weighted error; it must beat absmax there, and not lose on plain RMS.
        let weighted = |q: &[f32]| x.iter().zip(q).map(|(a, b)| (a * a * (a - b) * (a - b)) as f64).sum::<f64>();
        let (w1, w2) = (weighted(&searched), weighted(&absmax));
        assert!(w1 < w2 * 0.9, "weighted: search {w1} vs absmax {w2}");
        let (e1, e2) = (rms_err(&x, &searched), rms_err(&x, &absmax));
        assert!(e1 < e2, "rms: search {e1} vs absmax {e2}");
    }

    #[test]
    fn all_schemes_roundtrip_within_their_precision() {
        let (rows, cols) = (8, 70);
        let x = gaussian(rows * cols, 2);
        for (scheme, tol) in [
            (Scheme::Q4, 0.12),
            (Scheme::Q4A, 0.12),
            (Scheme::Q4K, 0.13),
            (Scheme::Q6K, 0.04),
            (Scheme::Q8, 0.01),
            (Scheme::Q8A, 0.01),
        ] {
            let q = quantize(&x, rows, cols, scheme);
            q.view().validate().unwrap();
            let e = rms_err(&x, &q.view().dequantize());
            assert!(e < tol, "{scheme:?}: rms err {e}");
        }
    }

    #[test]
    fn zero_and_constant_groups() {
        let x = vec![0.0f32; 64];
        let q = quantize(&x, 2, 32, Scheme::Q4);
        assert!(q.view().dequantize().iter().all(|&v| v == 0.0));
        let x = vec![0.5f32; 32];
        let q = quantize(&x, 1, 32, Scheme::Q4A);
        assert!(q.view().dequantize().iter().all(|&v| (v - 0.5).abs() < 1e-3));
    }
}
