//! x86-64 AVX2 kernel (`vpmaddubsw` + `vpmaddwd`, for CPUs without VNNI); the AVX-512 VNNI one is in
//! `avx512.rs`.
//!
//! Register tiles of up to 4 weight rows × 2 tokens: each block's unpacked weights are reused by every token of
//! the tile and each activation load by every row, and row blocks of [`super::ROW_BLOCK`] rows stay in L1 while
//! all token tiles stream past them (prefill is a blocked GEMM; decode is the 4 × 1 tile). Weight scales are
//! converted once per row block ([`PaddedScales`]), their products with the activation scales formed 8 blocks
//! at a time, and the `w = d·q + m` offsets (int4's −8, the asymmetric mins) enter as one vector FMA per 8
//! blocks against the activation block sums. int4 runs two blocks per step against activations packed in block
//! pairs ([`pack_pairs`]).
//!
//! Both operands of `vpmaddubsw` are bytes, the first unsigned: int4 codes already are (0..15); int8 weights
//! use the sign trick `|w| · (x · sign(w))`, exact because activation codes lie in −127..=127 (a pair of
//! products stays inside i16).

// Register tiles are indexed by row and token on purpose: the loops unroll into straight-line code.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use std::cell::RefCell;

use super::{Isa, PaddedScales};
use crate::activation::QuantizedActivations;
use crate::scheme::{QMatrix, Scheme};

/// Blocks whose scales are converted together (one `__m256` of f32).
const CHUNK: usize = 8;
/// Largest register tile: rows × tokens.
const TILE_ROWS: usize = 4;
const TILE_TOKENS: usize = 2;

pub fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// f16 → f32 for a whole slice, 8 at a time with `vcvtph2ps`.
#[target_feature(enable = "avx2,fma,f16c")]
fn convert_f16(src: &[half::f16], dst: &mut [f32]) {
    let mut i = 0;
    while i + CHUNK <= src.len() {
        // SAFETY: 8 values exist at i in both slices (loop condition; dst is at least as long as src).
        unsafe {
            let v = _mm256_cvtph_ps(_mm_loadu_si128(src[i..i + CHUNK].as_ptr().cast()));
            _mm256_storeu_ps(dst[i..i + CHUNK].as_mut_ptr(), v);
        }
        i += CHUNK;
    }
    for (d, s) in dst[i..src.len()].iter_mut().zip(&src[i..]) {
        // One value through the same instruction (`half`'s portable conversion costs more).
        *d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(s.to_bits() as i32)));
    }
}

thread_local! {
    /// Packed activations for callers that did not pack them in advance.
    static PAIRS: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Packs `x` in pairs of blocks, 64 bytes each: codes 0..16 of both blocks, then codes 16..32 of both (the
/// order in which two contiguous int4 blocks unpack); a row's odd last block is paired with zeros.
pub fn pack_pairs(x: &QuantizedActivations, out: &mut Vec<u8>) {
    let nb = x.nb();
    let np = nb.div_ceil(2);
    out.clear();
    out.resize(x.rows * np * 64, 0);
    for t in 0..x.rows {
        let qs: &[u8] = bytemuck::cast_slice(x.row_qs(t));
        for b in 0..nb {
            let dst = &mut out[(t * np + b / 2) * 64..][..64];
            let h = 16 * (b % 2);
            dst[h..h + 16].copy_from_slice(&qs[b * 32..b * 32 + 16]);
            dst[32 + h..32 + h + 16].copy_from_slice(&qs[b * 32 + 16..b * 32 + 32]);
        }
    }
}

/// `out[t * ldo + r] = W[r] · x[t]` in register tiles; int4 products read the activations packed in block pairs
/// (packed here unless [`super::prepare`] packed them).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `out` must be valid for writes at `t * ldo + r` for every
/// `t < x.rows`, `r < w.rows`, with no other thread touching those elements; `w.cols == x.cols`; the planes of
/// `w` must match its shape (as [`QMatrix::validate`] checks).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gemm_avx2(w: &QMatrix, x: &QuantizedActivations, out: *mut f32, ldo: usize) {
    match x.packed_for(Isa::Avx2) {
        // SAFETY: forwarded from our caller; `prepare` packed these pairs from `x`.
        Some(pairs) => unsafe { gemm_tiles(w, x, pairs, out, ldo) },
        None if w.scheme.is_int4() => PAIRS.with(|cell| {
            let mut buf = cell.borrow_mut();
            pack_pairs(x, &mut buf);
            // SAFETY: forwarded from our caller; `buf` was packed from `x` just above.
            unsafe { gemm_tiles(w, x, &buf, out, ldo) }
        }),
        // SAFETY: forwarded from our caller; int8 products read no pairs.
        None => unsafe { gemm_tiles(w, x, &[], out, ldo) },
    }
}

/// # Safety
/// As [`gemm_avx2`], and for int4 `pairs` is `x` packed by [`pack_pairs`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemm_tiles(w: &QMatrix, x: &QuantizedActivations, pairs: &[u8], out: *mut f32, ldo: usize) {
    let convert = |s: &[half::f16], d: &mut [f32]| convert_f16(s, d);
    PaddedScales::walk(w, x, CHUNK, TILE_ROWS, TILE_TOKENS, convert, |scales, r0, nr, t0, nt| {
        let tile = Tile { w, x, scales, pairs, r0, t0, out, ldo };
        // SAFETY: AVX2 is available (our contract); the tile lies inside the matrix, the token range and the
        // current row block (`walk`); the output contract is forwarded from our caller.
        unsafe { dispatch_tile!(Tile::run, tile, nr, nt, w.scheme.is_int4()) }
    });
}

/// One R-row × T-token block of the output.
#[derive(Clone, Copy)]
struct Tile<'a> {
    w: &'a QMatrix<'a>,
    x: &'a QuantizedActivations,
    scales: &'a PaddedScales,
    /// The activations packed by [`pack_pairs`] (int4 products only).
    pairs: &'a [u8],
    r0: usize,
    t0: usize,
    out: *mut f32,
    ldo: usize,
}

impl Tile<'_> {
    /// # Safety
    /// AVX2/FMA/F16C available; `r0 + R <= w.rows` inside the row block `scales` holds, `t0 + T <= x.rows`;
    /// `out` as for [`gemm_avx2`].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run<const R: usize, const T: usize, const INT8: bool>(self) {
        let Tile { w, x, scales, pairs, r0, t0, out, ldo } = self;
        let nb = w.nb();
        let qs_block = w.scheme.qs_bytes_per_block();
        let has_offset = !matches!(w.scheme, Scheme::Q8 | Scheme::Q6K);
        let k6 = w.scheme == Scheme::Q6K;
        let xq: *const i8 = x.qs.as_ptr();
        let low4x = _mm256_set1_epi8(0x0f);
        let ones = _mm256_set1_epi16(1);
        let wrow: [_; R] = std::array::from_fn(|r| scales.w_row(r0 + r));
        let xrow: [_; T] = std::array::from_fn(|t| scales.x_row(t0 + t));
        let mut acc = [[_mm256_setzero_ps(); T]; R];
        let mut k = 0;
        while k < nb {
            let nbk = (nb - k).min(CHUNK);
            // This chunk's products of weight and activation scales per (row, token), kept in memory so that
            // each block broadcasts its own from there (a load, not an ALU operation), and its offset term.
            let mut scale = [[[0.0f32; CHUNK]; T]; R];
            let mut dx = [_mm256_setzero_ps(); T];
            for t in 0..T {
                // SAFETY: padded rows hold a multiple of 8 floats, so 8 exist at k (k < nb, k % 8 == 0).
                dx[t] = unsafe { _mm256_loadu_ps(xrow[t].0.as_ptr().add(k)) };
            }
            for r in 0..R {
                // SAFETY: as above, in the row's padded weight scales.
                let d = unsafe { _mm256_loadu_ps(wrow[r].0.as_ptr().add(k)) };
                for t in 0..T {
                    // SAFETY: `scale[r][t]` holds 8 floats.
                    unsafe { _mm256_storeu_ps(scale[r][t].as_mut_ptr(), _mm256_mul_ps(d, dx[t])) };
                }
                if has_offset {
                    // SAFETY: as above, in the padded mins and block sums.
                    let m = unsafe { _mm256_loadu_ps(wrow[r].1.as_ptr().add(k)) };
                    for t in 0..T {
                        // SAFETY: as above.
                        let xs = unsafe { _mm256_loadu_ps(xrow[t].1.as_ptr().add(k)) };
                        acc[r][t] = _mm256_fmadd_ps(m, xs, acc[r][t]);
                    }
                }
            }
            if k6 {
                // Q6K: codes 0..63 unpacked to bytes in weight order; the −32 is taken back per pair of products
                // (`vpmaddubsw` of 32 against x, once per token and block), and `vpmaddwd` applies each half's
                // int8 scale while widening.
                let low4 = _mm_set1_epi8(0x0f);
                let three = _mm256_set1_epi8(3);
                let spread = _mm256_setr_epi64x(0, 2, 4, 6);
                let c32 = _mm256_set1_epi8(32);
                for j in 0..nbk {
                    let b = k + j;
                    let mut wu = [_mm256_setzero_si256(); R];
                    let mut sc = [_mm256_setzero_si256(); R];
                    for r in 0..R {
                        let row = w.qs.as_ptr().wrapping_add((r0 + r) * nb * qs_block);
                        // SAFETY: Q6K rows hold nb*16 low-bit bytes then nb*8 high-bit bytes (validated
                        // layout); block b's 16 and 8 of them.
                        let (v, h) = unsafe {
                            (
                                _mm_loadu_si128(row.add(b * 16).cast()),
                                row.add(nb * 16 + b * 8).cast::<i64>().read_unaligned(),
                            )
                        };
                        let low = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), low4), _mm_and_si128(v, low4));
                        // Quadword q of the broadcast holds codes 8q..8q+8's top bits at 2q: moved to bits 4..6.
                        let high = _mm256_and_si256(_mm256_srlv_epi64(_mm256_set1_epi64x(h), spread), three);
                        wu[r] = _mm256_or_si256(low, _mm256_slli_epi16(high, 4));
                        let (lo, hi) = w.q6k_sub(r0 + r, b);
                        sc[r] = _mm256_set_m128i(_mm_set1_epi16(hi as i16), _mm_set1_epi16(lo as i16));
                    }
                    for t in 0..T {
                        let i = (t0 + t) * nb + b;
                        // SAFETY: token t0+t has nb*32 codes (QuantizedActivations invariant); block b of them.
                        let xv = unsafe { _mm256_loadu_si256(xq.add(i * 32).cast()) };
                        let x32 = _mm256_maddubs_epi16(c32, xv);
                        for r in 0..R {
                            // Pairs of products of at most 63 · 127 (no saturation), less 32 · (x + x').
                            let p16 = _mm256_sub_epi16(_mm256_maddubs_epi16(wu[r], xv), x32);
                            let p = _mm256_madd_epi16(p16, sc[r]);
                            let s = _mm256_broadcast_ss(&scale[r][t][j]);
                            acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, acc[r][t]);
                        }
                    }
                }
            } else if INT8 {
                for j in 0..nbk {
                    let b = k + j;
                    // Row r's block b: `wu` the unsigned operand |w|, `ws` the signs to move onto x.
                    let mut wu = [_mm256_setzero_si256(); R];
                    let mut ws = [_mm256_setzero_si256(); R];
                    for r in 0..R {
                        let at = ((r0 + r) * nb + b) * qs_block;
                        // SAFETY: int8 rows hold nb*32 code bytes (validated layout); block b of row r0+r.
                        let v = unsafe { _mm256_loadu_si256(w.qs.as_ptr().add(at).cast()) };
                        wu[r] = _mm256_sign_epi8(v, v);
                        ws[r] = v;
                    }
                    for t in 0..T {
                        let i = (t0 + t) * nb + b;
                        // SAFETY: token t0+t has nb*32 codes (QuantizedActivations invariant); block b of them.
                        let xv = unsafe { _mm256_loadu_si256(xq.add(i * 32).cast()) };
                        for r in 0..R {
                            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(wu[r], _mm256_sign_epi8(xv, ws[r])), ones);
                            let s = _mm256_broadcast_ss(&scale[r][t][j]);
                            acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, acc[r][t]);
                        }
                    }
                }
            } else {
                // int4, two blocks per step: their 32 code bytes are contiguous, so one load and one unpack give
                // the low-nibble codes (0..16) of both in `lo` and the high ones (16..32) in `hi`, against
                // activations packed the same way ([`pack_pairs`]); the two blocks' i16 products are summed
                // before one widening, conversion and FMA (each 32-bit lane holds one block's partial sum).
                // Per pair, its two blocks' scale products, each over the four lanes its sums land in.
                let mut pair_scale = [[[_mm256_setzero_ps(); CHUNK / 2]; T]; R];
                for r in 0..R {
                    for t in 0..T {
                        // SAFETY: `scale[r][t]` holds 8 floats.
                        let sc = unsafe { _mm256_loadu_ps(scale[r][t].as_ptr()) };
                        for q in 0..CHUNK / 2 {
                            let (a, b) = (2 * q as i32, 2 * q as i32 + 1);
                            let idx = _mm256_setr_epi32(a, a, a, a, b, b, b, b);
                            pair_scale[r][t][q] = _mm256_permutevar8x32_ps(sc, idx);
                        }
                    }
                }
                let np = nb.div_ceil(2);
                let mut j = 0;
                while j < nbk {
                    let b = k + j;
                    let mut lo = [_mm256_setzero_si256(); R];
                    let mut hi = [_mm256_setzero_si256(); R];
                    for r in 0..R {
                        let p = w.qs.as_ptr().wrapping_add(((r0 + r) * nb + b) * 16);
                        // SAFETY: int4 rows hold nb*16 code bytes (validated layout): blocks b and b+1 of row
                        // r0+r when b+1 < nb (chunks hold an even number of blocks but for the row's last),
                        // else block b alone with the upper half zero.
                        let v = unsafe {
                            if j + 1 < nbk {
                                _mm256_loadu_si256(p.cast())
                            } else {
                                _mm256_zextsi128_si256(_mm_loadu_si128(p.cast()))
                            }
                        };
                        lo[r] = _mm256_and_si256(v, low4x);
                        hi[r] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4x);
                    }
                    for t in 0..T {
                        let xp = pairs.as_ptr().wrapping_add(((t0 + t) * np + b / 2) * 64);
                        // SAFETY: pair b/2 of token t0+t lies inside `pairs` (packed for every token and pair).
                        let (xlo, xhi) =
                            unsafe { (_mm256_loadu_si256(xp.cast()), _mm256_loadu_si256(xp.add(32).cast())) };
                        for r in 0..R {
                            // Each i16 lane sums 4 products of at most 15 · 127: no saturation.
                            let s16 =
                                _mm256_add_epi16(_mm256_maddubs_epi16(lo[r], xlo), _mm256_maddubs_epi16(hi[r], xhi));
                            let p = _mm256_madd_epi16(s16, ones);
                            acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), pair_scale[r][t][j / 2], acc[r][t]);
                        }
                    }
                    j += 2;
                }
            }
            k += nbk;
        }
        for r in 0..R {
            for t in 0..T {
                // SAFETY: (t0+t, r0+r) is inside the output our caller handed us, and ours alone.
                unsafe { *out.add((t0 + t) * ldo + r0 + r) = hsum(acc[r][t]) };
            }
        }
    }
}

/// Products over a matrix whose rows are all stored in groups of 16 ([`crate::scheme::RowLayout::Grouped`]),
/// read straight from the planes: per half group (8 rows, one per 32-bit lane of a 256-bit register) and block,
/// each 4 bytes of codes meet a token's 4 codes broadcast (`vpmaddubsw`, then `vpmaddwd`), so 8 rows' sums
/// build up with no horizontal adds, and the 8 rows' scales are one vector.
///
/// # Safety
/// As [`gemm_avx2`], and `w.grouped_rows() == w.rows`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gemm_grouped(w: &QMatrix, x: &QuantizedActivations, out: *mut f32, ldo: usize) {
    assert_eq!(w.grouped_rows(), w.rows, "gemm_grouped: rows outside groups");
    super::with_low_sums(w, x, |low| {
        for g in 0..w.rows / GROUP_ROWS {
            for half in 0..2 {
                let run = HalfGroup { w, x, low, g, half, out, ldo };
                let mut t0 = 0;
                while t0 < x.rows {
                    let t = (x.rows - t0).min(4);
                    // SAFETY: tokens t0..t0+t exist; the half group lies inside the matrix; forwarded from our caller.
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

/// Rows per group of the grouped layout.
const GROUP_ROWS: usize = crate::scheme::ROW_GROUP;

/// Eight rows (half `half` of group `g`) of a grouped matrix against the tokens.
struct HalfGroup<'a> {
    w: &'a QMatrix<'a>,
    x: &'a QuantizedActivations,
    low: &'a [i32],
    g: usize,
    half: usize,
    out: *mut f32,
    ldo: usize,
}

impl HalfGroup<'_> {
    /// # Safety
    /// AVX2/FMA/F16C available; `t0 + T <= x.rows`; group `g` lies inside the grouped matrix `w`; the output
    /// contract of [`gemm_avx2`].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tokens<const T: usize>(&self, t0: usize) {
        let (w, x, g, half) = (self.w, self.x, self.g, self.half);
        let nb = w.nb();
        let nsb = nb.div_ceil(crate::scheme::SUPER);
        let per_row = nb * w.scheme.qs_bytes_per_block() / 4;
        // Unit i of the group: 64 bytes, this half's 8 rows the 32 at `8 * half` units of 4 bytes.
        let codes: *const u8 = w.qs.as_ptr().wrapping_add((g * GROUP_ROWS * per_row) * 4 + 32 * half);
        let unit = |i: usize| codes.wrapping_add(64 * i) as *const __m256i;
        let scales: *const u16 = w.scales.as_ptr().cast();
        let mins: *const u16 = w.mins.map_or(std::ptr::null(), |m| m.as_ptr().cast());
        let sub: *const u8 = w.sub.map_or(std::ptr::null(), |s| s.as_ptr());
        let xq: *const u8 = x.qs.as_ptr().cast();
        let xv = |t: usize, b: usize, q: usize| {
            // SAFETY: codes 4q..4q+4 of block b of token t0+t lie inside `x.qs` (nb*32 per token).
            _mm256_set1_epi32(unsafe { (xq.add(((t0 + t) * nb + b) * 32 + 4 * q) as *const i32).read_unaligned() })
        };
        let (low4, ones, six, three) =
            (_mm256_set1_epi8(0x0f), _mm256_set1_epi16(1), _mm256_set1_epi32(63), _mm256_set1_epi8(3));
        // Scale entries of this half: 8 f16 of a group's 16 per block (or superblock).
        let f16x8 = |p: *const u16, entry: usize| {
            // SAFETY: entry `entry` of the group lies inside the plane (16 values per entry).
            _mm256_cvtph_ps(unsafe { _mm_loadu_si128(p.add(entry * GROUP_ROWS + 8 * half).cast()) })
        };
        let mut acc = [_mm256_setzero_ps(); T];
        for b in 0..nb {
            let i = |t: usize| (t0 + t) * nb + b;
            // Integer sums per token: (low half, high half) for q6k, else one.
            let mut lo = [_mm256_setzero_si256(); T];
            let mut hi = [_mm256_setzero_si256(); T];
            // SAFETY: (all code loads) group g's units of block b lie inside the code plane.
            unsafe {
                match w.scheme {
                    Scheme::Q4 | Scheme::Q4A | Scheme::Q4K => {
                        // int4: 8 products of ≤ 2·15·127 per i16 lane sum to < 2^15, one `vpmaddwd` per token.
                        let mut s16 = [_mm256_setzero_si256(); T];
                        for q in 0..4 {
                            let v = _mm256_loadu_si256(unit(b * 4 + q));
                            let (c0, c1) = (_mm256_and_si256(v, low4), _mm256_and_si256(_mm256_srli_epi16(v, 4), low4));
                            for t in 0..T {
                                let p = _mm256_add_epi16(
                                    _mm256_maddubs_epi16(c0, xv(t, b, q)),
                                    _mm256_maddubs_epi16(c1, xv(t, b, 4 + q)),
                                );
                                s16[t] = _mm256_add_epi16(s16[t], p);
                            }
                        }
                        for t in 0..T {
                            lo[t] = _mm256_madd_epi16(s16[t], ones);
                        }
                    }
                    Scheme::Q8 | Scheme::Q8A => {
                        // Signed codes: |w| · (x · sign(w)), each pair of products inside i16.
                        for q in 0..8 {
                            let v = _mm256_loadu_si256(unit(b * 8 + q));
                            let a = _mm256_sign_epi8(v, v);
                            for t in 0..T {
                                let p = _mm256_maddubs_epi16(a, _mm256_sign_epi8(xv(t, b, q), v));
                                lo[t] = _mm256_add_epi32(lo[t], _mm256_madd_epi16(p, ones));
                            }
                        }
                    }
                    Scheme::Q6K => {
                        let h =
                            [_mm256_loadu_si256(unit(nb * 4 + b * 2)), _mm256_loadu_si256(unit(nb * 4 + b * 2 + 1))];
                        for q in 0..4 {
                            let v = _mm256_loadu_si256(unit(b * 4 + q));
                            let bits = |shift: i32| {
                                let hb = _mm256_and_si256(_mm256_srlv_epi32(h[q % 2], _mm256_set1_epi32(shift)), three);
                                _mm256_slli_epi32(hb, 4)
                            };
                            let c0 = _mm256_or_si256(_mm256_and_si256(v, low4), bits(2 * (q as i32 / 2)));
                            let c1 = _mm256_or_si256(
                                _mm256_and_si256(_mm256_srli_epi16(v, 4), low4),
                                bits(4 + 2 * (q as i32 / 2)),
                            );
                            for t in 0..T {
                                let (p0, p1) =
                                    (_mm256_maddubs_epi16(c0, xv(t, b, q)), _mm256_maddubs_epi16(c1, xv(t, b, 4 + q)));
                                lo[t] = _mm256_add_epi32(lo[t], _mm256_madd_epi16(p0, ones));
                                hi[t] = _mm256_add_epi32(hi[t], _mm256_madd_epi16(p1, ones));
                            }
                        }
                    }
                }
            }
            // Unsigned codes' offset (int4 −8, q6k −32) taken back against the activation code sums.
            let neg_offset = match w.scheme {
                Scheme::Q4 => -8,
                Scheme::Q6K => -32,
                _ => 0,
            };
            // SAFETY: (all scale loads) the entries of block b (or its superblock) of group g lie inside the
            // scale, min and sub planes, present where the scheme has them (validated).
            let (d0, d1) = unsafe {
                match w.scheme {
                    Scheme::Q4K => {
                        let s = g * nsb + b / crate::scheme::SUPER;
                        let (kd, kdm) = (f16x8(scales, s), f16x8(mins, s));
                        let kw: [__m256i; 3] =
                            std::array::from_fn(|u| _mm256_loadu_si256(sub.add((s * 3 + u) * 64 + 32 * half).cast()));
                        let field = |f: usize| {
                            let (word, shift) = ((6 * f) / 32, (6 * f % 32) as i32);
                            let lo = _mm256_srlv_epi32(kw[word], _mm256_set1_epi32(shift));
                            // A count of 32 shifts everything out: fields inside one word take nothing here.
                            let hi = if word + 1 < 3 {
                                _mm256_sllv_epi32(kw[word + 1], _mm256_set1_epi32(32 - shift))
                            } else {
                                _mm256_setzero_si256()
                            };
                            _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_or_si256(lo, hi), six))
                        };
                        let j = b % crate::scheme::SUPER;
                        (
                            _mm256_mul_ps(kd, field(j)),
                            _mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(kdm, field(8 + j))),
                        )
                    }
                    Scheme::Q6K => {
                        let d = f16x8(scales, g * nsb + b / crate::scheme::SUPER);
                        let pairs =
                            _mm256_cvtepi16_epi32(_mm_loadu_si128(sub.add((g * nb + b) * 32 + 16 * half).cast()));
                        let lo = _mm256_srai_epi32(_mm256_slli_epi32(pairs, 24), 24);
                        let hi = _mm256_srai_epi32(pairs, 8);
                        (_mm256_mul_ps(d, _mm256_cvtepi32_ps(lo)), _mm256_mul_ps(d, _mm256_cvtepi32_ps(hi)))
                    }
                    _ => {
                        let d = f16x8(scales, g * nb + b);
                        let m = if mins.is_null() { _mm256_setzero_ps() } else { f16x8(mins, g * nb + b) };
                        (d, m)
                    }
                }
            };
            for t in 0..T {
                let dx = _mm256_set1_ps(x.d[i(t)]);
                if w.scheme == Scheme::Q6K {
                    let l = self.low[i(t)];
                    let sl = _mm256_add_epi32(lo[t], _mm256_set1_epi32(neg_offset * l));
                    let sh = _mm256_add_epi32(hi[t], _mm256_set1_epi32(neg_offset * (x.isum[i(t)] - l)));
                    acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sl), _mm256_mul_ps(d0, dx), acc[t]);
                    acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sh), _mm256_mul_ps(d1, dx), acc[t]);
                    continue;
                }
                let s = if neg_offset == 0 {
                    lo[t]
                } else {
                    _mm256_add_epi32(lo[t], _mm256_set1_epi32(neg_offset * x.isum[i(t)]))
                };
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(d0, dx), acc[t]);
                if w.mins.is_some() {
                    acc[t] = _mm256_fmadd_ps(d1, _mm256_set1_ps(x.sum[i(t)]), acc[t]);
                }
            }
        }
        for (t, a) in acc.iter().enumerate() {
            // SAFETY: the caller owns output elements (t0+t)*ldo + 16g + 8·half + r, r < 8.
            unsafe { _mm256_storeu_ps(self.out.add((t0 + t) * self.ldo + g * GROUP_ROWS + 8 * half), *a) };
        }
    }
}
