//! aarch64 kernels: baseline NEON (`smull` + `sadalp`, every ARMv8 core), the ARMv8.2 dot-product extension
//! (`sdot`, four int8 products summed per 32-bit lane; Cortex-A55/A75 and later, all current phone and car
//! SoCs) and the int8 matrix-multiply extension (`smmla`, a 2 × 8 by 8 × 2 int8 product per instruction;
//! Cortex-A510/A710/X2 and later, Apple M2+, Neoverse V1/N2).
//!
//! Weight codes (int4: 0..15, int8: −127..127) and activation codes (−127..127) are both signed 8-bit here, so
//! no sign trick is needed; int4's −8 and the asymmetric mins enter through the activation block sums.
//!
//! The products are register tiles, walked by [`PaddedScales::walk`] so that a row block's weights stay in L1
//! while every token tile streams past them (prefill is a blocked GEMM, decode the 4-row × 1-token tile):
//! `sdot`/`smull` tiles of up to 4 rows × 2 tokens, each unpacked weight block reused by every token and each
//! activation block by every row; `smmla` tiles of 2 row pairs × 2 token pairs, whose instructions produce a
//! 2 × 2 block of dot products each (rows and tokens interleaved 8 codes at a time with `zip1`/`zip2`).

// Register tiles are indexed by row and token on purpose: the loops unroll into straight-line code.
#![allow(clippy::needless_range_loop)]

use std::arch::aarch64::*;

use super::PaddedScales;
use crate::activation::QuantizedActivations;
use crate::scheme::{QMatrix, Scheme};

/// Blocks whose scales are handled together (one `float32x4_t`).
const CHUNK: usize = 4;

pub fn has_dotprod() -> bool {
    std::arch::is_aarch64_feature_detected!("dotprod")
}

pub fn has_i8mm() -> bool {
    has_dotprod() && std::arch::is_aarch64_feature_detected!("i8mm")
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

/// `acc[2i + j] += a[8i..8i+8] · b[8j..8j+8]` (`smmla`; its intrinsic is not yet stable either).
#[inline]
#[target_feature(enable = "neon,dotprod,i8mm")]
fn mmla(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: `smmla` only reads the two source registers and updates `acc`; the i8mm feature is enabled for
    // this function, so callers have checked the CPU supports it.
    unsafe {
        std::arch::asm!(
            "smmla {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack)
        );
    }
    acc
}

/// f16 → f32 for a whole slice, 4 at a time with `fcvtl` (baseline ARMv8; the `float16x4_t` intrinsics are not
/// yet stable).
#[target_feature(enable = "neon")]
fn convert_f16(src: &[half::f16], dst: &mut [f32]) {
    let mut i = 0;
    while i + CHUNK <= src.len() {
        // SAFETY: 4 values exist at i in both slices (loop condition; dst is at least as long as src).
        let h = unsafe { vld1_u16(src[i..i + CHUNK].as_ptr().cast()) };
        let f: float32x4_t;
        // SAFETY: `fcvtl` widens the four halves of one register into another; no memory is touched.
        unsafe {
            std::arch::asm!("fcvtl {f:v}.4s, {h:v}.4h", f = out(vreg) f, h = in(vreg) h,
                options(pure, nomem, nostack));
        }
        // SAFETY: as above.
        unsafe { vst1q_f32(dst[i..i + CHUNK].as_mut_ptr(), f) };
        i += CHUNK;
    }
    for (d, s) in dst[i..src.len()].iter_mut().zip(&src[i..]) {
        *d = s.to_f32();
    }
}

/// Block `b` of row `r` as two registers: codes 0..16 and 16..32.
///
/// # Safety
/// `r < w.rows`, `b < w.nb()`, the planes of `w` match its shape.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn weight_block<const INT8: bool>(w: &QMatrix, r: usize, b: usize) -> (int8x16_t, int8x16_t) {
    let at = (r * w.nb() + b) * w.scheme.qs_bytes_per_block();
    let p = w.qs.as_ptr().wrapping_add(at);
    if INT8 {
        // SAFETY: int8 rows hold nb*32 code bytes (caller's contract); block b of row r.
        unsafe { (vld1q_s8(p.cast()), vld1q_s8(p.add(16).cast())) }
    } else {
        // SAFETY: int4 rows hold nb*16 code bytes (caller's contract); block b of row r.
        let raw = unsafe { vld1q_u8(p) };
        (vreinterpretq_s8_u8(vandq_u8(raw, vdupq_n_u8(0x0f))), vreinterpretq_s8_u8(vshrq_n_u8::<4>(raw)))
    }
}

/// [`Scheme::Q6K`] block `b` of row `r` as two registers of signed codes `q − 32`: codes 0..16 and 16..32.
///
/// # Safety
/// `w` is Q6K, `r < w.rows`, `b < w.nb()`, the planes of `w` match its shape.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn weight_block_q6k(w: &QMatrix, r: usize, b: usize) -> (int8x16_t, int8x16_t) {
    let nb = w.nb();
    let row = w.qs.as_ptr().wrapping_add(r * nb * 24);
    // SAFETY: Q6K rows hold nb*16 low-bit bytes then nb*8 high-bit bytes (caller's contract); block b's.
    let (raw, h) = unsafe { (vld1q_u8(row.add(b * 16)), vld1_u8(row.add(nb * 16 + b * 8))) };
    let three = vdup_n_u8(3);
    // Byte i of `h` holds the top bits of codes i, i+8, i+16, i+24 at bits 0, 2, 4, 6.
    let top = |s0: uint8x8_t, s1: uint8x8_t| vshlq_n_u8::<4>(vcombine_u8(vand_u8(s0, three), vand_u8(s1, three)));
    let lo_top = top(h, vshr_n_u8::<2>(h));
    let hi_top = top(vshr_n_u8::<4>(h), vshr_n_u8::<6>(h));
    let lo = vorrq_u8(vandq_u8(raw, vdupq_n_u8(0x0f)), lo_top);
    let hi = vorrq_u8(vshrq_n_u8::<4>(raw), hi_top);
    let c32 = vdupq_n_s8(32);
    (vsubq_s8(vreinterpretq_s8_u8(lo), c32), vsubq_s8(vreinterpretq_s8_u8(hi), c32))
}

/// Block `b` of token `t`'s activation codes as two registers.
///
/// # Safety
/// `t < x.rows`, `b < x.nb()`.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn act_block(x: &QuantizedActivations, t: usize, b: usize) -> (int8x16_t, int8x16_t) {
    let p = x.qs.as_ptr().wrapping_add((t * x.nb() + b) * 32);
    // SAFETY: token t holds nb*32 codes (QuantizedActivations invariant); block b of them.
    unsafe { (vld1q_s8(p), vld1q_s8(p.add(16))) }
}

/// Generates the `sdot`/`smull` tiled GEMM for one feature set, so the block loop is compiled and inlined
/// with it.
macro_rules! neon_gemm {
    ($name:ident, $tile:ident, $feat:literal, $dot:ident) => {
        /// `out[t * ldo + r] = W[r] · x[t]` in register tiles of up to 4 rows × 2 tokens.
        ///
        /// # Safety
        /// The CPU must support the enabled features; `out` must be valid for writes at `t * ldo + r` for every
        /// `t < x.rows`, `r < w.rows`, with no other thread touching them; `w.cols == x.cols`; the planes of `w`
        /// must match its shape (as [`QMatrix::validate`] checks).
        #[target_feature(enable = $feat)]
        pub unsafe fn $name(w: &QMatrix, x: &QuantizedActivations, out: *mut f32, ldo: usize) {
            let convert = |s: &[half::f16], d: &mut [f32]| convert_f16(s, d);
            PaddedScales::walk(w, x, CHUNK, 4, 2, convert, |scales, r0, nr, t0, nt| {
                let tile = Tile { w, x, scales, r0, t0, out, ldo };
                // SAFETY: the features are available (our contract); the tile lies inside the matrix, the token
                // range and the current row block (`walk`); the output contract is forwarded from our caller.
                unsafe { dispatch_tile!($tile, tile, nr, nt, w.scheme.is_int4()) }
            });
        }

        /// One R-row × T-token block of the output.
        ///
        /// # Safety
        /// The features are available; `r0 + R <= w.rows` inside the row block `scales` holds,
        /// `t0 + T <= x.rows`; `out` as for the GEMM.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn $tile<const R: usize, const T: usize, const INT8: bool>(tile: Tile) {
            let Tile { w, x, scales, r0, t0, out, ldo } = tile;
            let nb = w.nb();
            let has_offset = !matches!(w.scheme, Scheme::Q8 | Scheme::Q6K);
            let k6 = w.scheme == Scheme::Q6K;
            let wrow: [_; R] = std::array::from_fn(|r| scales.w_row(r0 + r));
            let xrow: [_; T] = std::array::from_fn(|t| scales.x_row(t0 + t));
            let mut acc = [[vdupq_n_f32(0.0); T]; R];
            let mut k = 0;
            while k < nb {
                let nbk = (nb - k).min(CHUNK);
                // This chunk's products of weight and activation scales per (row, token), and its offset term.
                let mut scale = [[vdupq_n_f32(0.0); T]; R];
                for r in 0..R {
                    // SAFETY (all four loads): padded rows hold a multiple of 4 floats, so 4 exist at k.
                    let d = unsafe { vld1q_f32(wrow[r].0.as_ptr().add(k)) };
                    let m = unsafe { vld1q_f32(wrow[r].1.as_ptr().add(k)) };
                    for t in 0..T {
                        // SAFETY: as above, in the token's padded scales.
                        scale[r][t] = vmulq_f32(d, unsafe { vld1q_f32(xrow[t].0.as_ptr().add(k)) });
                        if has_offset {
                            // SAFETY: as above, in the token's padded block sums.
                            acc[r][t] = vfmaq_f32(acc[r][t], m, unsafe { vld1q_f32(xrow[t].1.as_ptr().add(k)) });
                        }
                    }
                }
                if k6 {
                    // Q6K: signed codes, each half's integer sum times its int8 scale (the superblock's scale is
                    // in `scale`).
                    for j in 0..nbk {
                        let b = k + j;
                        // SAFETY: rows r0..r0+R and block b exist (our contract); the matrix is Q6K.
                        let wv: [_; R] = std::array::from_fn(|r| unsafe { weight_block_q6k(w, r0 + r, b) });
                        let sc: [_; R] = std::array::from_fn(|r| w.q6k_sub(r0 + r, b));
                        for t in 0..T {
                            // SAFETY: token t0+t and block b exist (our contract).
                            let (x0, x1) = unsafe { act_block(x, t0 + t, b) };
                            for r in 0..R {
                                let lo = vmulq_n_s32($dot(vdupq_n_s32(0), wv[r].0, x0), sc[r].0 as i32);
                                let p = vmlaq_n_s32(lo, $dot(vdupq_n_s32(0), wv[r].1, x1), sc[r].1 as i32);
                                acc[r][t] = vfmaq_n_f32(acc[r][t], vcvtq_f32_s32(p), lane(scale[r][t], j));
                            }
                        }
                    }
                    k += nbk;
                    continue;
                }
                for j in 0..nbk {
                    let b = k + j;
                    // SAFETY: rows r0..r0+R and block b exist (our contract).
                    let wv: [_; R] = std::array::from_fn(|r| unsafe { weight_block::<INT8>(w, r0 + r, b) });
                    for t in 0..T {
                        // SAFETY: token t0+t and block b exist (our contract).
                        let (x0, x1) = unsafe { act_block(x, t0 + t, b) };
                        for r in 0..R {
                            let p = $dot($dot(vdupq_n_s32(0), wv[r].0, x0), wv[r].1, x1);
                            let s = lane(scale[r][t], j);
                            acc[r][t] = vfmaq_n_f32(acc[r][t], vcvtq_f32_s32(p), s);
                        }
                    }
                }
                k += nbk;
            }
            for r in 0..R {
                for t in 0..T {
                    // SAFETY: (t0+t, r0+r) is inside the output our caller handed us, and ours alone.
                    unsafe { *out.add((t0 + t) * ldo + r0 + r) = vaddvq_f32(acc[r][t]) };
                }
            }
        }
    };
}

/// Lane `j` (< 4) of `v`.
#[inline(always)]
fn lane(v: float32x4_t, j: usize) -> f32 {
    // SAFETY: float32x4_t is four f32 in memory order; j < 4 is checked by the index.
    (unsafe { std::mem::transmute::<float32x4_t, [f32; 4]>(v) })[j]
}

/// One register tile of the output and what it reads.
#[derive(Clone, Copy)]
struct Tile<'a> {
    w: &'a QMatrix<'a>,
    x: &'a QuantizedActivations,
    scales: &'a PaddedScales,
    r0: usize,
    t0: usize,
    out: *mut f32,
    ldo: usize,
}

neon_gemm!(gemm_neon, tile_neon, "neon", dot_neon);
neon_gemm!(gemm_dotprod, tile_dotprod, "neon,dotprod", dot_sdot);

/// `out[t * ldo + r] = W[r] · x[t]` with `smmla`: tiles of 2 row pairs × 2 token pairs; a GEMV (one token)
/// goes to the `sdot` kernel, as half of every `smmla` would be wasted on it, and so does Q6K (whose scales
/// per 16 codes split each `smmla` block's sums: not written yet).
///
/// # Safety
/// As [`gemm_dotprod`], and the CPU must support i8mm.
#[target_feature(enable = "neon,dotprod,i8mm")]
pub unsafe fn gemm_i8mm(w: &QMatrix, x: &QuantizedActivations, out: *mut f32, ldo: usize) {
    if x.rows < 2 || w.scheme == Scheme::Q6K {
        // SAFETY: forwarded; i8mm implies dotprod here (`has_i8mm` checks both).
        return unsafe { gemm_dotprod(w, x, out, ldo) };
    }
    let convert = |s: &[half::f16], d: &mut [f32]| convert_f16(s, d);
    PaddedScales::walk(w, x, CHUNK, 4, 4, convert, |scales, r0, nr, t0, nt| {
        let tile = Tile { w, x, scales, r0, t0, out, ldo };
        // SAFETY: i8mm available (our contract); the tile lies inside the matrix, the tokens and the row block;
        // the output contract is forwarded.
        unsafe {
            if w.scheme.is_int4() {
                tile_i8mm::<false>(tile, nr, nt)
            } else {
                tile_i8mm::<true>(tile, nr, nt)
            }
        }
    });
}

/// Rows `r0..r0+nr` × tokens `t0..t0+nt` (each ≤ 4) as 2 × 2 pairs; a missing row or token of a pair repeats
/// its partner and its results are not stored.
///
/// # Safety
/// As for the `sdot` tiles, with `1 <= nr, nt <= 4`.
#[inline]
#[target_feature(enable = "neon,dotprod,i8mm")]
unsafe fn tile_i8mm<const INT8: bool>(tile: Tile, nr: usize, nt: usize) {
    let Tile { w, x, scales, r0, t0, out, ldo } = tile;
    let nb = w.nb();
    let has_offset = w.scheme != Scheme::Q8;
    // Row (token) `i` of the tile, clamped to the last real one.
    let row = |i: usize| r0 + i.min(nr - 1);
    let tok = |i: usize| t0 + i.min(nt - 1);
    let wrow: [_; 4] = std::array::from_fn(|i| scales.w_row(row(i)));
    let xrow: [_; 4] = std::array::from_fn(|i| scales.x_row(tok(i)));
    // acc[p][q] lanes: (row 2p, token 2q), (2p, 2q+1), (2p+1, 2q), (2p+1, 2q+1).
    let mut acc = [[vdupq_n_f32(0.0); 2]; 2];
    let mut k = 0;
    while k < nb {
        let nbk = (nb - k).min(CHUNK);
        // Per pair of pairs, the four products of scales for each block j of the chunk, laid out as `vld4q`
        // de-interleaves them: scale[p][q].j = [d(2p)·dx(2q), d(2p)·dx(2q+1), d(2p+1)·dx(2q), d(2p+1)·dx(2q+1)].
        let mut scale = [[float32x4x4_t(vdupq_n_f32(0.0), vdupq_n_f32(0.0), vdupq_n_f32(0.0), vdupq_n_f32(0.0)); 2]; 2];
        // SAFETY (every vld1q_f32 below): padded rows hold a multiple of 4 floats, so 4 exist at k.
        let ld = |s: &[f32]| unsafe { vld1q_f32(s.as_ptr().add(k)) };
        for p in 0..2 {
            let (da, db) = (ld(wrow[2 * p].0), ld(wrow[2 * p + 1].0));
            let (ma, mb) = (ld(wrow[2 * p].1), ld(wrow[2 * p + 1].1));
            for q in 0..2 {
                let (xa, xb) = (ld(xrow[2 * q].0), ld(xrow[2 * q + 1].0));
                let prods = [vmulq_f32(da, xa), vmulq_f32(da, xb), vmulq_f32(db, xa), vmulq_f32(db, xb)];
                // SAFETY: `prods` is 16 contiguous floats.
                scale[p][q] = unsafe { vld4q_f32(prods.as_ptr().cast()) };
                if has_offset {
                    let (sa, sb) = (ld(xrow[2 * q].1), ld(xrow[2 * q + 1].1));
                    let o = vpaddq_f32(
                        vpaddq_f32(vmulq_f32(ma, sa), vmulq_f32(ma, sb)),
                        vpaddq_f32(vmulq_f32(mb, sa), vmulq_f32(mb, sb)),
                    );
                    acc[p][q] = vaddq_f32(acc[p][q], o);
                }
            }
        }
        for j in 0..nbk {
            let b = k + j;
            // Two rows (tokens) interleaved 8 codes at a time: the four 2 × 8 operands of one block.
            let zip = |a: (int8x16_t, int8x16_t), c: (int8x16_t, int8x16_t)| {
                let (a0, a1) = (vreinterpretq_s64_s8(a.0), vreinterpretq_s64_s8(a.1));
                let (c0, c1) = (vreinterpretq_s64_s8(c.0), vreinterpretq_s64_s8(c.1));
                [vzip1q_s64(a0, c0), vzip2q_s64(a0, c0), vzip1q_s64(a1, c1), vzip2q_s64(a1, c1)]
                    .map(|v| vreinterpretq_s8_s64(v))
            };
            // SAFETY: rows and tokens are clamped into the tile; block b exists.
            let wz: [_; 2] = std::array::from_fn(|p| unsafe {
                zip(weight_block::<INT8>(w, row(2 * p), b), weight_block::<INT8>(w, row(2 * p + 1), b))
            });
            // SAFETY: as above.
            let xz: [_; 2] =
                std::array::from_fn(|q| unsafe { zip(act_block(x, tok(2 * q), b), act_block(x, tok(2 * q + 1), b)) });
            for p in 0..2 {
                for q in 0..2 {
                    let mut s = vdupq_n_s32(0);
                    for h in 0..4 {
                        s = mmla(s, wz[p][h], xz[q][h]);
                    }
                    let sc = [scale[p][q].0, scale[p][q].1, scale[p][q].2, scale[p][q].3][j];
                    acc[p][q] = vfmaq_f32(acc[p][q], vcvtq_f32_s32(s), sc);
                }
            }
        }
        k += nbk;
    }
    for p in 0..2 {
        for q in 0..2 {
            for (l, v) in [(0, 0), (0, 1), (1, 0), (1, 1)].into_iter().zip(0..) {
                let (ri, ti) = (2 * p + l.0, 2 * q + l.1);
                if ri < nr && ti < nt {
                    // SAFETY: (t0+ti, r0+ri) is inside the output our caller handed us, and ours alone.
                    unsafe { *out.add((t0 + ti) * ldo + r0 + ri) = lane(acc[p][q], v) };
                }
            }
        }
    }
}

/// `acc += a · b.4b[LANE]`: `sdot` by element, every 32-bit lane of `a` (4 codes of one row) against the same 4
/// codes of `b` (the intrinsic is not yet stable, so it is written as one instruction).
#[inline]
#[target_feature(enable = "neon,dotprod")]
fn sdot_lane<const LANE: i32>(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: `sdot` only reads the two source registers and updates `acc`; the dotprod feature is enabled for
    // this function, so callers have checked the CPU supports it.
    unsafe {
        std::arch::asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.4b[{lane}]",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            lane = const LANE,
            options(pure, nomem, nostack)
        );
    }
    acc
}

/// [`sdot_lane`] with a lane known after unrolling.
#[inline(always)]
fn sdot_at(acc: int32x4_t, a: int8x16_t, b: int8x16_t, lane: usize) -> int32x4_t {
    // SAFETY: only reached from the grouped kernel, compiled with dotprod enabled and called on CPUs that have it.
    unsafe {
        match lane {
            0 => sdot_lane::<0>(acc, a, b),
            1 => sdot_lane::<1>(acc, a, b),
            2 => sdot_lane::<2>(acc, a, b),
            _ => sdot_lane::<3>(acc, a, b),
        }
    }
}

/// Four f16 (at `p`) as f32, with `fcvtl`.
///
/// # Safety
/// Four values are readable at `p`.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn f16x4(p: *const u16) -> float32x4_t {
    // SAFETY: our caller's contract.
    let h = unsafe { vld1_u16(p) };
    let f: float32x4_t;
    // SAFETY: `fcvtl` widens the four halves of one register into another; no memory is touched.
    unsafe {
        std::arch::asm!("fcvtl {f:v}.4s, {h:v}.4h", f = out(vreg) f, h = in(vreg) h, options(pure, nomem, nostack));
    }
    f
}

/// Products over a matrix whose rows are all stored in groups of 16 ([`crate::scheme::RowLayout::Grouped`]),
/// read straight from the planes with `sdot` by element: per quarter group (4 rows, one per 32-bit lane) and
/// block, each 16-byte vector holds the same 4 codes of the 4 rows and meets a token's 4 codes selected by lane,
/// so the 4 rows' sums need no horizontal adds and the 4 rows' scales are one vector.
///
/// # Safety
/// The CPU must support dotprod; the contract of [`gemm_dotprod`]; `w.grouped_rows() == w.rows`.
#[target_feature(enable = "neon,dotprod")]
pub unsafe fn gemm_grouped(w: &QMatrix, x: &QuantizedActivations, out: *mut f32, ldo: usize) {
    assert_eq!(w.grouped_rows(), w.rows, "gemm_grouped: rows outside groups");
    super::with_low_sums(w, x, |low| {
        for g in 0..w.rows / crate::scheme::ROW_GROUP {
            for quarter in 0..4 {
                let run = QuarterGroup { w, x, low, g, quarter, out, ldo };
                let mut t0 = 0;
                while t0 < x.rows {
                    let t = (x.rows - t0).min(4);
                    // SAFETY: tokens t0..t0+t exist; the quarter group lies inside the matrix; forwarded from our caller.
                    unsafe {
                        match t {
                            4 => run.tokens::<4>(t0),
                            3 => run.tokens::<3>(t0),
                            2 => run.tokens::<2>(t0),
                            _ => run.tokens::<1>(t0),
                        }
                    }
                    t0 += t;
                }
            }
        }
    })
}

/// Four rows (quarter `quarter` of group `g`) of a grouped matrix against the tokens.
struct QuarterGroup<'a> {
    w: &'a QMatrix<'a>,
    x: &'a QuantizedActivations,
    low: &'a [i32],
    g: usize,
    quarter: usize,
    out: *mut f32,
    ldo: usize,
}

impl QuarterGroup<'_> {
    /// # Safety
    /// dotprod available; `t0 + T <= x.rows`; group `g` lies inside the grouped matrix `w`; the output contract
    /// of [`gemm_dotprod`].
    #[inline]
    #[target_feature(enable = "neon,dotprod")]
    unsafe fn tokens<const T: usize>(&self, t0: usize) {
        let (w, x, g, quarter) = (self.w, self.x, self.g, self.quarter);
        let nb = w.nb();
        let nsb = nb.div_ceil(crate::scheme::SUPER);
        let rg = crate::scheme::ROW_GROUP;
        let per_row = nb * w.scheme.qs_bytes_per_block() / 4;
        // Unit i of the group: 64 bytes, this quarter's 4 rows the 16 at `16 * quarter`.
        let codes: *const u8 = w.qs.as_ptr().wrapping_add(g * rg * per_row * 4 + 16 * quarter);
        let unit = |i: usize| codes.wrapping_add(64 * i);
        let scales: *const u16 = w.scales.as_ptr().cast();
        let mins: *const u16 = w.mins.map_or(std::ptr::null(), |m| m.as_ptr().cast());
        let sub: *const u8 = w.sub.map_or(std::ptr::null(), |s| s.as_ptr());
        // Scale entries of this quarter: 4 of a group's 16 per block (or superblock).
        // SAFETY: entry `entry` of group g lies inside the plane (16 values per entry).
        let f16s = |p: *const u16, entry: usize| unsafe { f16x4(p.add(entry * rg + 4 * quarter)) };
        let neg_offset = match w.scheme {
            Scheme::Q4 => -8,
            Scheme::Q6K => -32,
            _ => 0,
        };
        let (low4, three) = (vdupq_n_u8(0x0f), vdupq_n_u8(3));
        let mut acc = [vdupq_n_f32(0.0); T];
        for b in 0..nb {
            let i = |t: usize| (t0 + t) * nb + b;
            // SAFETY: token t0+t and block b exist (our contract).
            let xs: [_; T] = std::array::from_fn(|t| unsafe { act_block(x, t0 + t, b) });
            let mut lo = [vdupq_n_s32(0); T];
            let mut hi = [vdupq_n_s32(0); T];
            // SAFETY: (all code loads) group g's units of block b lie inside the code plane.
            unsafe {
                match w.scheme {
                    Scheme::Q4 | Scheme::Q4A | Scheme::Q4K => {
                        for q in 0..4 {
                            let v = vld1q_u8(unit(b * 4 + q));
                            let c0 = vreinterpretq_s8_u8(vandq_u8(v, low4));
                            let c1 = vreinterpretq_s8_u8(vshrq_n_u8::<4>(v));
                            for t in 0..T {
                                lo[t] = sdot_at(sdot_at(lo[t], c0, xs[t].0, q), c1, xs[t].1, q);
                            }
                        }
                    }
                    Scheme::Q8 | Scheme::Q8A => {
                        for q in 0..8 {
                            let c = vld1q_s8(unit(b * 8 + q).cast());
                            for t in 0..T {
                                let xv = if q < 4 { xs[t].0 } else { xs[t].1 };
                                lo[t] = sdot_at(lo[t], c, xv, q % 4);
                            }
                        }
                    }
                    Scheme::Q6K => {
                        let h = [vld1q_u8(unit(nb * 4 + b * 2)), vld1q_u8(unit(nb * 4 + b * 2 + 1))];
                        for q in 0..4 {
                            let v = vld1q_u8(unit(b * 4 + q));
                            // Codes 4q.. take their top bits at 2·(q/2) of unit q%2's bytes, codes 16+4q.. at 4 + 2·(q/2).
                            let top =
                                |shift: i8| vshlq_n_u8::<4>(vandq_u8(vshlq_u8(h[q % 2], vdupq_n_s8(-shift)), three));
                            let s = 2 * (q as i8 / 2);
                            let c0 = vreinterpretq_s8_u8(vorrq_u8(vandq_u8(v, low4), top(s)));
                            let c1 = vreinterpretq_s8_u8(vorrq_u8(vshrq_n_u8::<4>(v), top(4 + s)));
                            for t in 0..T {
                                lo[t] = sdot_at(lo[t], c0, xs[t].0, q);
                                hi[t] = sdot_at(hi[t], c1, xs[t].1, q);
                            }
                        }
                    }
                }
            }
            // SAFETY: (all scale loads) the entries of block b (or its superblock) of group g lie inside the
            // scale, min and sub planes, present where the scheme has them (validated).
            let (d0, d1) = unsafe {
                match w.scheme {
                    Scheme::Q4K => {
                        let s = g * nsb + b / crate::scheme::SUPER;
                        let (kd, kdm) = (f16s(scales, s), f16s(mins, s));
                        let kw: [uint32x4_t; 3] =
                            std::array::from_fn(|u| vld1q_u32(sub.add((s * 3 + u) * 64 + 16 * quarter).cast()));
                        let field = |f: usize| {
                            let (word, shift) = ((6 * f) / 32, (6 * f % 32) as i32);
                            let lo = vshlq_u32(kw[word], vdupq_n_s32(-shift));
                            // A shift by 32 clears the lane: fields inside one word take nothing here.
                            let hi = if word + 1 < 3 {
                                vshlq_u32(kw[word + 1], vdupq_n_s32(32 - shift))
                            } else {
                                vdupq_n_u32(0)
                            };
                            vcvtq_f32_u32(vandq_u32(vorrq_u32(lo, hi), vdupq_n_u32(63)))
                        };
                        let j = b % crate::scheme::SUPER;
                        (vmulq_f32(kd, field(j)), vnegq_f32(vmulq_f32(kdm, field(8 + j))))
                    }
                    Scheme::Q6K => {
                        let d = f16s(scales, g * nsb + b / crate::scheme::SUPER);
                        let pairs = vmovl_s16(vld1_s16(sub.add((g * nb + b) * 32 + 8 * quarter).cast()));
                        let lo = vshrq_n_s32::<24>(vshlq_n_s32::<24>(pairs));
                        let hi = vshrq_n_s32::<8>(pairs);
                        (vmulq_f32(d, vcvtq_f32_s32(lo)), vmulq_f32(d, vcvtq_f32_s32(hi)))
                    }
                    _ => {
                        let d = f16s(scales, g * nb + b);
                        let m = if mins.is_null() { vdupq_n_f32(0.0) } else { f16s(mins, g * nb + b) };
                        (d, m)
                    }
                }
            };
            for t in 0..T {
                let dx = x.d[i(t)];
                if w.scheme == Scheme::Q6K {
                    let l = self.low[i(t)];
                    let sl = vaddq_s32(lo[t], vdupq_n_s32(neg_offset * l));
                    let sh = vaddq_s32(hi[t], vdupq_n_s32(neg_offset * (x.isum[i(t)] - l)));
                    acc[t] = vfmaq_f32(acc[t], vcvtq_f32_s32(sl), vmulq_n_f32(d0, dx));
                    acc[t] = vfmaq_f32(acc[t], vcvtq_f32_s32(sh), vmulq_n_f32(d1, dx));
                    continue;
                }
                let s = if neg_offset == 0 { lo[t] } else { vaddq_s32(lo[t], vdupq_n_s32(neg_offset * x.isum[i(t)])) };
                acc[t] = vfmaq_f32(acc[t], vcvtq_f32_s32(s), vmulq_n_f32(d0, dx));
                if w.mins.is_some() {
                    acc[t] = vfmaq_n_f32(acc[t], d1, x.sum[i(t)]);
                }
            }
        }
        for (t, a) in acc.iter().enumerate() {
            // SAFETY: the caller owns output elements (t0+t)*ldo + 16g + 4·quarter + r, r < 4.
            unsafe { vst1q_f32(self.out.add((t0 + t) * self.ldo + g * rg + 4 * quarter), *a) };
        }
    }
}
