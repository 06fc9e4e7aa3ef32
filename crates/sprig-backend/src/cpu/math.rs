//! f32 helpers of the CPU backend, written as plain loops the compiler vectorises. The hot ones are compiled
//! twice, for the baseline target and with AVX-512, and pick one at run time (same operations, same bits).

use std::cell::RefCell;

use crate::Activation;

/// Per-worker attention buffers, reused across calls: the batch's new keys transposed, scores.
#[derive(Default)]
pub struct AttentionScratch {
    pub new_keys_t: Vec<f32>,
    pub scores: Vec<f32>,
}

thread_local! {
    pub static SCRATCH: RefCell<AttentionScratch> = RefCell::default();
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

/// Defines `$name` from a loop body, plus an AVX-512 copy of the same body chosen at run time on x86-64.
macro_rules! multiversion {
    ($(#[$m:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[inline]
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn wide($($arg: $ty),*) $(-> $ret)? $body
                if has_avx512() {
                    // SAFETY: AVX-512F presence checked just above.
                    return unsafe { wide($($arg),*) };
                }
            }
            $body
        }
    };
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma"))
}

multiversion! {
    /// `y += a * x`.
    pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
        for (y, x) in y.iter_mut().zip(x) {
            *y += a * x;
        }
    }
}

/// Width of the register-resident accumulators of [`attention_scores`] and [`weighted_rows`] (four 512-bit
/// registers).
const LANES: usize = 64;

/// `out[i] = scale * sum_d q[d] * keys_t[d * stride + i]` for keys of any element type (f32, or int8 codes
/// whose scales the caller applies): the body of [`attention_scores`] and [`attention_scores_i8`].
#[inline(always)]
fn scores_of<K: Copy + Into<f32>>(q: &[f32], keys_t: &[K], stride: usize, scale: f32, out: &mut [f32]) {
    let m = out.len();
    let full = m - m % LANES;
    for c in (0..full).step_by(LANES) {
        let mut acc = [0.0f32; LANES];
        for (d, &qv) in q.iter().enumerate() {
            let qv = qv * scale;
            let row: &[K; LANES] = keys_t[d * stride + c..d * stride + c + LANES].try_into().unwrap();
            for i in 0..LANES {
                acc[i] += qv * row[i].into();
            }
        }
        out[c..c + LANES].copy_from_slice(&acc);
    }
    let tail = &mut out[full..];
    tail.fill(0.0);
    for (d, &qv) in q.iter().enumerate() {
        let qv = qv * scale;
        for (o, &k) in tail.iter_mut().zip(&keys_t[d * stride + full..]) {
            *o += qv * k.into();
        }
    }
}

/// `out += sum_j w[j] * rows[j * stride ..][..out.len()]` for rows of any element type: the body of
/// [`weighted_rows`] and [`weighted_rows_i8`].
#[inline(always)]
fn weighted_of<V: Copy + Into<f32>>(w: &[f32], rows: &[V], stride: usize, out: &mut [f32]) {
    let width = out.len();
    let full = width - width % LANES;
    for c in (0..full).step_by(LANES) {
        let mut acc: [f32; LANES] = out[c..c + LANES].try_into().unwrap();
        for (j, &wj) in w.iter().enumerate() {
            let row: &[V; LANES] = rows[j * stride + c..j * stride + c + LANES].try_into().unwrap();
            for i in 0..LANES {
                acc[i] += wj * row[i].into();
            }
        }
        out[c..c + LANES].copy_from_slice(&acc);
    }
    let tail = &mut out[full..];
    for (j, &wj) in w.iter().enumerate() {
        for (o, &v) in tail.iter_mut().zip(&rows[j * stride + full..j * stride + width]) {
            *o += wj * v.into();
        }
    }
}

multiversion! {
    /// `out[i] = scale * sum_d q[d] * keys_t[d * stride + i]` for `i < out.len()`: one query's scores against
    /// keys stored transposed (row `d` holds dimension `d` of every key), accumulated in registers 64 keys at
    /// a time. Same operation order as `axpy` over `d`, so the same bits.
    pub fn attention_scores(q: &[f32], keys_t: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
        scores_of(q, keys_t, stride, scale, out)
    }
}

multiversion! {
    /// [`attention_scores`] over int8 keys (each position's scale is applied by the caller).
    pub fn attention_scores_i8(q: &[f32], keys_t: &[i8], stride: usize, scale: f32, out: &mut [f32]) {
        scores_of(q, keys_t, stride, scale, out)
    }
}

multiversion! {
    /// [`weighted_rows`] over int8 rows (each row's scale folded into `w` by the caller).
    pub fn weighted_rows_i8(w: &[f32], rows: &[i8], stride: usize, out: &mut [f32]) {
        weighted_of(w, rows, stride, out)
    }
}

multiversion! {
    /// `out += sum_j w[j] * rows[j * stride ..][..out.len()]`, 64 columns at a time in registers.
    pub fn weighted_rows(w: &[f32], rows: &[f32], stride: usize, out: &mut [f32]) {
        weighted_of(w, rows, stride, out)
    }
}

/// `e^x` in branch-free f32 arithmetic that vectorises (range reduction by `ln 2`, degree-6 polynomial,
/// exponent by bit arithmetic); within 2 ulp of `f32::exp` on [-87, 88]; inputs are clamped to [-88, 88.5] (so e^-inf gives ~6e-39, not 0).
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    let x = x.clamp(-88.0, 88.5);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    // ln 2 split in two so that x - n ln 2 is exact enough.
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0 + r * (0.5 + r * (0.166_666_67 + r * (0.041_666_668 + r * (0.008_333_452 + r * 0.001_388_893)))));
    // 2^n, split in two factors so n = -127..128 stays representable.
    let n = n as i32;
    let (n1, n2) = (n / 2, n - n / 2);
    p * f32::from_bits(((n1 + 127) as u32) << 23) * f32::from_bits(((n2 + 127) as u32) << 23)
}

multiversion! {
    pub fn softmax(x: &mut [f32]) {
        let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for v in x.iter_mut() {
            *v = exp_approx(*v - max);
        }
        for v in x.iter() {
            sum += *v;
        }
        let inv = 1.0 / sum;
        x.iter_mut().for_each(|v| *v *= inv);
    }
}

multiversion! {
    /// `out = act(gate) * up`, elementwise.
    pub fn glu(gate: &[f32], up: &[f32], act: Activation, out: &mut [f32]) {
        match act {
            Activation::Silu => {
                for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
                    *o = *g / (1.0 + exp_approx(-*g)) * u;
                }
            }
            Activation::GeluTanh => {
                for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
                    *o = activation(*g, act) * u;
                }
            }
        }
    }
}

pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ss: f32 = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ss + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(x).zip(w) {
        *o = v * inv * w;
    }
}

#[inline]
pub fn activation(x: f32, act: Activation) -> f32 {
    crate::Unary::Act(act).apply(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_approx_is_within_a_few_ulp() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp_approx(x), x.exp());
            assert!((got - want).abs() <= 4e-7 * want, "exp({x}) = {got}, expected {want}");
            x += 0.0137;
        }
        assert_eq!(exp_approx(0.0), 1.0);
        assert!(exp_approx(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn register_blocked_attention_helpers_match_naive_loops() {
        let f = |i: usize| ((i * 7919 % 1000) as f32 / 500.0) - 1.0;
        for (n, hd) in [(1, 64), (63, 64), (64, 48), (130, 80), (200, 256)] {
            let q: Vec<f32> = (0..hd).map(f).collect();
            let keys_t: Vec<f32> = (0..hd * n).map(|i| f(i + 3)).collect();
            let mut scores = vec![0.0; n];
            attention_scores(&q, &keys_t, n, 0.125, &mut scores);
            for (j, s) in scores.iter().enumerate() {
                let want: f32 = (0..hd).map(|d| q[d] * 0.125 * keys_t[d * n + j]).sum();
                assert!((s - want).abs() <= 1e-4, "score {j}: {s} vs {want}");
            }
            let rows: Vec<f32> = (0..n * hd).map(|i| f(i + 11)).collect();
            let mut out = vec![0.0; hd];
            weighted_rows(&scores, &rows, hd, &mut out);
            for (c, o) in out.iter().enumerate() {
                let want: f32 = (0..n).map(|j| scores[j] * rows[j * hd + c]).sum();
                assert!((o - want).abs() <= 1e-3 * (1.0 + want.abs()), "column {c}: {o} vs {want}");
            }
        }
    }

    #[test]
    fn softmax_and_glu_match_the_direct_formulas() {
        let mut v: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 9.0).collect();
        let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let total: f32 = v.iter().map(|x| (x - max).exp()).sum();
        let want: Vec<f32> = v.iter().map(|x| (x - max).exp() / total).collect();
        softmax(&mut v);
        for (a, b) in v.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-6, "{a} vs {b}");
        }
        let g: Vec<f32> = (0..37).map(|i| i as f32 * 0.5 - 9.0).collect();
        let mut out = vec![0.0; 37];
        glu(&g, &g, Activation::Silu, &mut out);
        for ((o, x), _) in out.iter().zip(&g).zip(0..) {
            let want = x / (1.0 + (-x).exp()) * x;
            assert!((o - want).abs() <= 1e-5 * (1.0 + want.abs()), "{o} vs {want}");
        }
    }
}
