//! aarch64 kernels: baseline NEON (`smull` + `sadalp`, every ARMv8 core) and the ARMv8.2 dot-product
//! extension (`sdot`, four int8 products summed per 32-bit lane; Cortex-A55/A75 and later, all current phone and
//! car SoCs). Weight codes (int4: 0..15, int8: -127..127) and activation codes (-127..127) are both signed
//! 8-bit here, so no sign trick is needed.

use std::arch::aarch64::*;

use crate::activation::QuantizedActivations;
use crate::scheme::QMatrix;

pub fn has_dotprod() -> bool {
    std::arch::is_aarch64_feature_detected!("dotprod")
}

/// `sum(a[i] * b[i])` of 16 int8 lanes, accumulated into four int32 lanes (baseline NEON).
#[inline]
#[target_feature(enable = "neon")]
fn dot_neon(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
    let hi = vmull_high_s8(a, b);
    vpadalq_s16(vpadalq_s16(acc, lo), hi)
}

/// The same with `sdot` (the intrinsic is not yet stable in Rust, so it is written as one instruction).
#[inline]
#[target_feature(enable = "neon,dotprod")]
fn dot_sdot(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: `sdot` only reads the two source registers and updates `acc`; the dotprod feature is enabled for
    // this function, so callers have checked the CPU supports it.
    unsafe {
        std::arch::asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack)
        );
    }
    acc
}

/// Generates one GEMM per feature set so the block loop is compiled and inlined with it.
macro_rules! neon_gemm {
    ($name:ident, $feat:literal, $dot:ident) => {
        /// # Safety
        /// The CPU must support the enabled features; `out` must be valid for writes at `t * ldo + r` for every
        /// `t < x.rows`, `r < w.rows`; `w.cols == x.cols`; the planes of `w` must match its shape (as
        /// [`QMatrix::validate`] checks).
        #[target_feature(enable = $feat)]
        pub unsafe fn $name(w: &QMatrix, x: &QuantizedActivations, out: *mut f32, ldo: usize) {
            let nb = w.nb();
            let int4 = w.scheme.is_int4();
            let sym4 = w.scheme == crate::Scheme::Q4;
            let mask = vdupq_n_u8(0x0f);
            for r in 0..w.rows {
                for t in 0..x.rows {
                    let xq = x.row_qs(t).as_ptr();
                    let (xd, xs) = (x.row_d(t), x.row_sum(t));
                    let (mut acc, mut macc) = (0.0f32, 0.0f32);
                    for b in 0..nb {
                        let i = r * nb + b;
                        // SAFETY: `xq` holds nb*32 codes for this token (QuantizedActivations invariant).
                        let (x0, x1) = unsafe { (vld1q_s8(xq.add(b * 32)), vld1q_s8(xq.add(b * 32 + 16))) };
                        let zero = vdupq_n_s32(0);
                        let p = if int4 {
                            // SAFETY: int4 qs has nb*16 bytes per row (validated layout), i < rows*nb.
                            let raw = unsafe { vld1q_u8(w.qs.as_ptr().add(i * 16)) };
                            let lo = vreinterpretq_s8_u8(vandq_u8(raw, mask));
                            let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(raw));
                            $dot($dot(zero, lo, x0), hi, x1)
                        } else {
                            // SAFETY: int8 qs has nb*32 bytes per row (validated layout), i < rows*nb.
                            let (w0, w1) = unsafe {
                                let p = w.qs.as_ptr().add(i * 32) as *const i8;
                                (vld1q_s8(p), vld1q_s8(p.add(16)))
                            };
                            $dot($dot(zero, w0, x0), w1, x1)
                        };
                        let d = w.scales[i].to_f32();
                        acc += d * xd[b] * vaddvq_s32(p) as f32;
                        let m = if sym4 { -8.0 * d } else { w.mins.map_or(0.0, |m| m[i].to_f32()) };
                        macc += m * xs[b];
                    }
                    // SAFETY: the caller guarantees `out` is writable at t*ldo + r.
                    unsafe { *out.add(t * ldo + r) = acc + macc };
                }
            }
        }
    };
}

neon_gemm!(gemm_neon, "neon", dot_neon);
neon_gemm!(gemm_dotprod, "neon,dotprod", dot_sdot);
