//! x86-64 AVX2 kernel (`vpmaddubsw` + `vpmaddwd`); the AVX-512 VNNI one is in `avx512.rs`.
//!
//! Both multiply unsigned weight codes by signed activation codes. int4 codes are already unsigned (0..15);
//! int8 weights use the sign trick `|w| * (x * sign(w))`, valid because activation codes lie in -127..=127.

use std::arch::x86_64::*;

use crate::activation::QuantizedActivations;
use crate::scheme::QMatrix;

pub fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn f16_to_f32(bits: u16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn mul_sum_avx2(w: __m256i, x: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1))
}

/// Generates one GEMM per ISA so that the block loop is compiled (and inlined) with that ISA's features.
macro_rules! x86_gemm {
    ($name:ident, $feat:literal, $mul_sum:ident) => {
        /// # Safety
        /// The CPU must support the enabled features; `out` must be valid for writes at
        /// `t * ldo + r` for every `t < x.rows`, `r < w.rows`; `w.cols == x.cols`; the planes of `w` must match
        /// its shape (as [`QMatrix::validate`] checks).
        #[target_feature(enable = $feat)]
        pub unsafe fn $name(w: &QMatrix, x: &QuantizedActivations, out: *mut f32, ldo: usize) {
            let nb = w.nb();
            let int4 = w.scheme.is_int4();
            let scales: &[u16] = bytemuck::cast_slice(w.scales);
            let mins: Option<&[u16]> = w.mins.map(|m| bytemuck::cast_slice(m));
            let sym4 = w.scheme == crate::Scheme::Q4;
            let mask = _mm_set1_epi8(0x0f);
            for r in 0..w.rows {
                for t in 0..x.rows {
                    let xq = x.row_qs(t).as_ptr();
                    let (xd, xs) = (x.row_d(t), x.row_sum(t));
                    let mut acc = _mm256_setzero_ps();
                    let mut macc = 0.0f32;
                    for b in 0..nb {
                        let i = r * nb + b;
                        // SAFETY: `xq` holds nb*32 codes for this token (QuantizedActivations invariant).
                        let xv = unsafe { _mm256_loadu_si256(xq.add(b * 32) as *const __m256i) };
                        let p = if int4 {
                            // SAFETY: int4 qs has nb*16 bytes per row (validated layout), i < rows*nb.
                            let raw = unsafe { _mm_loadu_si128(w.qs.as_ptr().add(i * 16) as *const __m128i) };
                            let lo = _mm_and_si128(raw, mask);
                            let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
                            $mul_sum(_mm256_set_m128i(hi, lo), xv)
                        } else {
                            // SAFETY: int8 qs has nb*32 bytes per row (validated layout), i < rows*nb.
                            let wv = unsafe { _mm256_loadu_si256(w.qs.as_ptr().add(i * 32) as *const __m256i) };
                            $mul_sum(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv))
                        };
                        let d = f16_to_f32(scales[i]);
                        acc = _mm256_fmadd_ps(_mm256_set1_ps(d * xd[b]), _mm256_cvtepi32_ps(p), acc);
                        let m = if sym4 { -8.0 * d } else { mins.map_or(0.0, |m| f16_to_f32(m[i])) };
                        macc += m * xs[b];
                    }
                    // SAFETY: the caller guarantees `out` is writable at t*ldo + r.
                    unsafe { *out.add(t * ldo + r) = hsum(acc) + macc };
                }
            }
        }
    };
}

x86_gemm!(gemm_avx2, "avx2,fma,f16c", mul_sum_avx2);
