//! AVX-512 VNNI kernels on 512-bit registers: one `vpdpbusd` multiplies four int4 blocks' halves (or two int8
//! blocks' halves) at once, and a tile of up to 4 weight rows × 4 tokens shares every unpacked weight vector
//! and every activation load (prefill is a blocked GEMM; decode is the 4 × 1 tile).
//!
//! The activations are first packed into *quads* ([`pack`]): per token, per group of four blocks, the low
//! halves (codes 0..16) of the four blocks, then their high halves (16..32), then each block's scale repeated
//! over the four 32-bit lanes its products land in. That is the order in which the int4 planes unpack (low
//! nibbles are codes 0..16 of a block, high nibbles 16..32), so an int4 group needs no shuffle; int8 groups
//! are permuted into it with one `vpermt2q` per half. Per-block scales are then applied as whole vectors
//! (`int32 → f32`, × weight scale × activation scale), and the `w = d·q + m` offsets of every scheme as one
//! extra vector FMA per 16 blocks against the activation block sums.

// Register tiles are indexed by row and token on purpose: the loops unroll into straight-line code.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::cell::RefCell;

use crate::activation::QuantizedActivations;
use crate::scheme::{QMatrix, Scheme, BLOCK, K4_SUB_BYTES, SUPER};

/// Blocks per group: one 64-byte code vector holds one half of each of four blocks.
const GROUP: usize = 4;
/// Bytes of one token's group in the packed activations: low halves, high halves, 16 f32 scales.
pub const GROUP_BYTES: usize = 192;
/// Tokens per register tile (rows per tile is 4): tiles only serve products over fewer tokens than a panel
/// takes.
const TILE_TOKENS: usize = 4;

pub fn available() -> bool {
    super::x86::has_avx2()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

/// Packs `x` into the quad layout (`rows * ceil(nb/4) * GROUP_BYTES` bytes; blocks past `nb` are zero).
pub fn pack(x: &QuantizedActivations, out: &mut Vec<u8>) {
    let nb = x.nb();
    let ng = nb.div_ceil(GROUP);
    out.clear();
    out.resize(x.rows * ng * GROUP_BYTES, 0);
    for t in 0..x.rows {
        let (qs, d) = (x.row_qs(t), x.row_d(t));
        for b in 0..nb {
            let (g, c) = (b / GROUP, b % GROUP);
            let dst = &mut out[(t * ng + g) * GROUP_BYTES..(t * ng + g + 1) * GROUP_BYTES];
            let src: &[u8] = bytemuck::cast_slice(&qs[b * BLOCK..(b + 1) * BLOCK]);
            dst[16 * c..16 * c + 16].copy_from_slice(&src[..16]);
            dst[64 + 16 * c..64 + 16 * c + 16].copy_from_slice(&src[16..]);
            for lane in 0..4 {
                let at = 128 + 4 * (4 * c + lane);
                dst[at..at + 4].copy_from_slice(&d[b].to_le_bytes());
            }
        }
    }
}

thread_local! {
    /// Packed activations for callers that did not pack them in advance.
    static PACKED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Whether products over `tokens` activation rows use the packed quads (the tile kernel) rather than panels.
pub fn uses_quads(tokens: usize) -> bool {
    tokens < PANEL_MIN_TOKENS
}

/// `out[t * ldo + r] = W[r] · x[t]`: panels for prefill, tiles on packed quads (packed here unless
/// [`super::prepare`] packed them) for decode.
///
/// # Safety
/// [`available`] must be true; `out` must be valid for writes at `t * ldo + r` for every `t < x.rows`,
/// `r < w.rows`, with no other thread touching those elements; `w.cols == x.cols`; the planes of `w` must
/// match its shape (as [`QMatrix::validate`] checks).
pub unsafe fn gemm(w: &QMatrix, x: &QuantizedActivations, out: *mut f32, ldo: usize) {
    if !uses_quads(x.rows) {
        // SAFETY: forwarded from our caller.
        return unsafe { gemm_panels(w, x, out, ldo) };
    }
    match x.packed_for(super::Isa::Avx512Vnni) {
        // SAFETY: forwarded from our caller; the packed buffer belongs to `x`.
        Some(quads) => unsafe { gemm_packed(w, x, quads, out, ldo) },
        None => PACKED.with(|cell| {
            let mut buf = cell.borrow_mut();
            pack(x, &mut buf);
            // SAFETY: forwarded from our caller; `buf` was packed from `x` just above.
            unsafe { gemm_packed(w, x, &buf, out, ldo) }
        }),
    }
}

/// How a scheme's codes unpack: each kind compiles its own tiles, so no scheme test is left in their loops.
const PLAIN4: u8 = 0;
const INT8: u8 = 1;
const K4: u8 = 2;
const K6: u8 = 3;

/// # Safety
/// As [`gemm`], and `quads` is `x` packed by [`pack`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn gemm_packed(w: &QMatrix, x: &QuantizedActivations, quads: &[u8], out: *mut f32, ldo: usize) {
    assert_eq!(quads.len(), x.rows * w.nb().div_ceil(GROUP) * GROUP_BYTES, "packed activations size");
    // SAFETY: forwarded from our caller (all four calls).
    unsafe {
        match w.scheme {
            Scheme::Q4 | Scheme::Q4A => tiles::<PLAIN4>(w, x, quads, out, ldo),
            Scheme::Q8 | Scheme::Q8A => tiles::<INT8>(w, x, quads, out, ldo),
            Scheme::Q4K => tiles::<K4>(w, x, quads, out, ldo),
            Scheme::Q6K => tiles::<K6>(w, x, quads, out, ldo),
        }
    }
}

/// [`gemm_packed`] for one kind of code.
///
/// # Safety
/// As [`gemm_packed`], and `K` is `w.scheme`'s kind.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tiles<const K: u8>(w: &QMatrix, x: &QuantizedActivations, quads: &[u8], out: *mut f32, ldo: usize) {
    // 4-row register tiles over up to TILE_TOKENS tokens each, the token tiles of even size (5 tokens: 3 + 2,
    // not 4 + 1): a tile's every extra token costs less than unpacking the rows again.
    let tiles_per_row = x.rows.div_ceil(TILE_TOKENS);
    let ahead = prefetch_ahead(w.nb() * w.scheme.qs_bytes_per_block());
    let mut r0 = 0;
    while r0 < w.rows {
        let nr = (w.rows - r0).min(4);
        let mut t0 = 0;
        for i in 0..tiles_per_row {
            let nt = (x.rows - t0).div_ceil(tiles_per_row - i);
            let tile = Tile { w, x, quads, r0, t0, out, ldo, ahead };
            macro_rules! dispatch {
                ($(($r:literal, $t:literal))*) => {
                    match (nr, nt) {
                        $(($r, $t) => {
                            // SAFETY: the tile lies inside the matrix and the token range; the rest is forwarded.
                            unsafe { tile.run::<$r, $t, K>() }
                        })*
                        _ => unreachable!("tiles are 1..=4 rows by 1..=4 tokens"),
                    }
                };
            }
            dispatch!((4, 4)(4, 3)(4, 2)(4, 1)(3, 4)(3, 3)(3, 2)(3, 1)(2, 4)(2, 3)(2, 2)(2, 1)(1, 4)(1, 3)(1, 2)(1, 1));
            t0 += nt;
        }
        r0 += nr;
    }
}

/// One R-row × T-token block of the output.
#[derive(Clone, Copy)]
struct Tile<'a> {
    w: &'a QMatrix<'a>,
    x: &'a QuantizedActivations,
    quads: &'a [u8],
    r0: usize,
    t0: usize,
    out: *mut f32,
    ldo: usize,
    /// Bytes ahead of a row's current group that it prefetches ([`prefetch_ahead`]).
    ahead: usize,
}

/// One group of a row, unpacked for `vpdpbusd`: codes 0..16 and 16..32 of its four blocks as unsigned bytes,
/// and their scales spread over the lanes the products land in (`hi_scale`: q6k's high halves; else unused).
#[derive(Clone, Copy)]
struct Unpacked {
    lo: __m512i,
    hi: __m512i,
    lo_scale: __m512,
    hi_scale: __m512,
}

/// One token's group of packed activations (`neg_*`: −32·Σx of each half, for q6k).
#[derive(Clone, Copy)]
struct TokenGroup {
    lo: __m512i,
    hi: __m512i,
    scale: __m512,
    neg_lo: __m512i,
    neg_hi: __m512i,
}

impl Tile<'_> {
    /// A chunk's scales for row `r0 + r` (16 blocks from `k`, `nbk` of them real): the per-block scales of
    /// the low halves and (q6k) high halves, and the offset term `w = d·q + m` adds per block (`None` for q6k,
    /// whose −32 is taken back in integer arithmetic).
    ///
    /// # Safety
    /// AVX-512 VNNI available; `r0 + r < w.rows`, `k + nbk <= nb`, `nbk <= 16`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn chunk_scales<const K: u8>(&self, r: usize, k: usize, nbk: usize) -> (__m512, __m512, Option<__m512>) {
        // SAFETY: forwarded from our caller.
        let (a, b) = unsafe { row_chunk_scales(self.w, self.r0 + r, k, nbk) };
        match K {
            K6 => (a, b, None),
            K4 => (a, a, Some(b)),
            _ => {
                let offset = match self.w.scheme {
                    Scheme::Q4 => -8.0,
                    Scheme::Q4A => 0.0,
                    // int8 codes are made unsigned by flipping the top bit (q + 128); the offset takes it back.
                    _ => -128.0,
                };
                (a, a, Some(_mm512_add_ps(_mm512_mul_ps(a, _mm512_set1_ps(offset)), b)))
            }
        }
    }

    /// Row `r0 + r`'s group `g` (the `j`-th of its chunk, `nbg` real blocks), given the chunk's scales.
    ///
    /// # Safety
    /// AVX-512 VNNI available; `r0 + r < w.rows`, `g < ceil(nb / 4)`, `nbg` the blocks of group `g`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn unpack<const K: u8>(
        &self,
        r: usize,
        g: usize,
        j: usize,
        nbg: usize,
        scales: (__m512, __m512),
    ) -> Unpacked {
        let w = self.w;
        let nb = w.nb();
        let k6 = K == K6;
        let lane = 4 * j as i32;
        let idx = _mm512_set_epi32(
            lane + 3,
            lane + 3,
            lane + 3,
            lane + 3,
            lane + 2,
            lane + 2,
            lane + 2,
            lane + 2,
            lane + 1,
            lane + 1,
            lane + 1,
            lane + 1,
            lane,
            lane,
            lane,
            lane,
        );
        let lo_scale = _mm512_permutexvar_ps(idx, scales.0);
        let hi_scale = if k6 { _mm512_permutexvar_ps(idx, scales.1) } else { lo_scale };
        let low4 = _mm512_set1_epi8(0x0f);
        // Decode streams 4 rows × (codes, scales) at once, more streams than the hardware prefetchers follow
        // well: ask for each row's codes `ahead` bytes on (a hint: never faults).
        let row = w.qs.as_ptr().wrapping_add((self.r0 + r) * nb * w.scheme.qs_bytes_per_block());
        let per_group = match K {
            K6 => 64,
            INT8 => GROUP * BLOCK,
            _ => GROUP * BLOCK / 2,
        };
        _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(g * per_group + self.ahead).cast());
        let (lo, hi) = if k6 {
            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(nb * 16 + g * 32 + self.ahead).cast());
            // SAFETY: masked loads touch only blocks g*4..g*4+nbg of this row: their low 4 bits (16 bytes
            // each, from the row's start) and high 2 bits (8 bytes each, after nb*16).
            let (v, h) = unsafe {
                (
                    _mm512_maskz_loadu_epi8(byte_mask(16 * nbg), row.add(g * 64).cast()),
                    _mm512_maskz_loadu_epi8(byte_mask(8 * nbg), row.add(nb * 16 + g * 32).cast()),
                )
            };
            // The high bits: each block's 8 bytes in both quadwords of its 128-bit lane, moved to bits 4..6 of
            // the code bytes of weights 0..8 / 8..16 (low halves) and 16..24 / 24..32 (high halves).
            let top2 = _mm512_set1_epi8(0x30);
            let h = _mm512_permutexvar_epi64(_mm512_set_epi64(3, 3, 2, 2, 1, 1, 0, 0), h);
            let hlo = _mm512_and_si512(_mm512_sllv_epi64(h, _mm512_set_epi64(2, 4, 2, 4, 2, 4, 2, 4)), top2);
            let hhi = _mm512_and_si512(_mm512_srlv_epi64(h, _mm512_set_epi64(2, 0, 2, 0, 2, 0, 2, 0)), top2);
            (
                _mm512_or_si512(_mm512_and_si512(v, low4), hlo),
                _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v, 4), low4), hhi),
            )
        } else if K == INT8 {
            let base = row.wrapping_add(g * 128);
            let bytes = 32 * nbg;
            let (ma, mb) = (byte_mask(bytes.min(64)), byte_mask(bytes.saturating_sub(64)));
            // SAFETY: masked loads touch only this row's blocks g*4..g*4+nbg.
            let (a, b) =
                unsafe { (_mm512_maskz_loadu_epi8(ma, base.cast()), _mm512_maskz_loadu_epi8(mb, base.add(64).cast())) };
            // 128-bit lanes (0, 2) of `a` and (0, 2) of `b` are the low halves of the 4 blocks; the top bit's
            // flip makes the codes unsigned.
            let flip = _mm512_set1_epi8(-128);
            (
                _mm512_xor_si512(_mm512_permutex2var_epi64(a, _mm512_set_epi64(13, 12, 9, 8, 5, 4, 1, 0), b), flip),
                _mm512_xor_si512(_mm512_permutex2var_epi64(a, _mm512_set_epi64(15, 14, 11, 10, 7, 6, 3, 2), b), flip),
            )
        } else {
            // SAFETY: the masked load touches only this row's blocks g*4..g*4+nbg.
            let v = unsafe { _mm512_maskz_loadu_epi8(byte_mask(16 * nbg), row.add(g * 64).cast()) };
            (_mm512_and_si512(v, low4), _mm512_and_si512(_mm512_srli_epi16(v, 4), low4))
        };
        Unpacked { lo, hi, lo_scale, hi_scale }
    }

    /// Token `t0 + t`'s group `g` of the packed activations.
    ///
    /// # Safety
    /// AVX-512 VNNI available; `t0 + t < x.rows`, `g < ceil(nb / 4)`; `quads` is `x` packed.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn token_group<const K: u8>(&self, t: usize, g: usize) -> TokenGroup {
        let ng = self.w.nb().div_ceil(GROUP);
        let xp = self.quads.as_ptr().wrapping_add(((self.t0 + t) * ng + g) * GROUP_BYTES);
        // SAFETY: group g of token t0+t lies inside `quads` (size asserted by the caller).
        let (lo, hi, scale) = unsafe {
            (_mm512_loadu_si512(xp.cast()), _mm512_loadu_si512(xp.add(64).cast()), _mm512_loadu_ps(xp.add(128).cast()))
        };
        let (mut neg_lo, mut neg_hi) = (_mm512_setzero_si512(), _mm512_setzero_si512());
        if K == K6 {
            // Each half's sums start at −32·Σx, so they come out as Σ(q − 32)·x.
            let (zero, c32) = (_mm512_setzero_si512(), _mm512_set1_epi8(32));
            neg_lo = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, c32, lo));
            neg_hi = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, c32, hi));
        }
        TokenGroup { lo, hi, scale, neg_lo, neg_hi }
    }

    /// `acc + W·x` over one group: the integer dot products, each block's sum × its weight scale × its
    /// activation scale.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    fn group_product<const K: u8>(wg: &Unpacked, x: &TokenGroup, acc: __m512) -> __m512 {
        if K == K6 {
            let sl = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(x.neg_lo, wg.lo, x.lo));
            let sh = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(x.neg_hi, wg.hi, x.hi));
            let acc = _mm512_fmadd_ps(sl, _mm512_mul_ps(wg.lo_scale, x.scale), acc);
            return _mm512_fmadd_ps(sh, _mm512_mul_ps(wg.hi_scale, x.scale), acc);
        }
        let s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wg.lo, x.lo);
        let s = _mm512_dpbusd_epi32(s, wg.hi, x.hi);
        _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(wg.lo_scale, x.scale), acc)
    }

    /// Adds a chunk's offset term (`m · Σx` per block) of row `r0 + r` for token `t0 + t`.
    ///
    /// # Safety
    /// AVX-512 available; `t0 + t < x.rows`, `k + nbk <= nb`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn offset_term(&self, t: usize, k: usize, nbk: usize, m: __m512, acc: __m512) -> __m512 {
        let m16: __mmask16 = if nbk == 16 { !0 } else { (1u16 << nbk) - 1 };
        // SAFETY: the sums of token t0+t hold nb floats; the mask stops at nb.
        let xs = unsafe { _mm512_maskz_loadu_ps(m16, self.x.row_sum(self.t0 + t).as_ptr().add(k)) };
        _mm512_fmadd_ps(m, xs, acc)
    }

    /// Writes the finished sums of the tile's rows × tokens.
    ///
    /// # Safety
    /// `out` as for [`gemm`]; `r0 + acc.len() <= w.rows`, `t0 + nt <= x.rows`, `nt <= N`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn store<const N: usize>(&self, acc: &[[__m512; N]], nt: usize) {
        for (r, row) in acc.iter().enumerate() {
            for (t, sum) in row.iter().take(nt).enumerate() {
                // SAFETY: (t0+t, r0+r) is inside the output the caller handed us, and ours alone.
                unsafe { *self.out.add((self.t0 + t) * self.ldo + self.r0 + r) = _mm512_reduce_add_ps(*sum) };
            }
        }
    }

    /// An R-row × T-token register tile.
    ///
    /// # Safety
    /// AVX-512 VNNI must be available; `r0 + R <= rows`, `t0 + T <= x.rows`; `out` as for [`gemm`].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn run<const R: usize, const T: usize, const K: u8>(self) {
        let nb = self.w.nb();
        let zero = Unpacked {
            lo: _mm512_setzero_si512(),
            hi: _mm512_setzero_si512(),
            lo_scale: _mm512_setzero_ps(),
            hi_scale: _mm512_setzero_ps(),
        };
        let mut acc = [[_mm512_setzero_ps(); T]; R];
        let mut k = 0;
        while k < nb {
            // One chunk of 16 blocks: scales for every row, the offset term, then its (up to) four groups.
            let nbk = (nb - k).min(16);
            let mut scales = [(_mm512_setzero_ps(), _mm512_setzero_ps()); R];
            for r in 0..R {
                // SAFETY: row r0+r and blocks k..k+nbk are inside the matrix.
                let (lo, hi, m) = unsafe { self.chunk_scales::<K>(r, k, nbk) };
                scales[r] = (lo, hi);
                if let Some(m) = m {
                    for t in 0..T {
                        // SAFETY: token t0+t is inside x.
                        acc[r][t] = unsafe { self.offset_term(t, k, nbk, m, acc[r][t]) };
                    }
                }
            }
            let mut j = 0;
            while j * GROUP < nbk {
                let g = k / GROUP + j;
                let nbg = (nb - g * GROUP).min(GROUP);
                let mut wg = [zero; R];
                for r in 0..R {
                    // SAFETY: row r0+r's group g is inside the matrix.
                    wg[r] = unsafe { self.unpack::<K>(r, g, j, nbg, scales[r]) };
                }
                for t in 0..T {
                    // SAFETY: token t0+t's group g is inside the packed activations.
                    let xg = unsafe { self.token_group::<K>(t, g) };
                    for r in 0..R {
                        acc[r][t] = Self::group_product::<K>(&wg[r], &xg, acc[r][t]);
                    }
                }
                j += 1;
            }
            k += nbk;
        }
        // SAFETY: forwarded from our caller.
        unsafe { self.store(&acc, T) };
    }
}

/// The stored scales of blocks `k..k+nbk` (`nbk <= 16`) of row `row`, one per lane (lanes past `nbk` finite):
/// for q4k the block scales and effective mins (`d·sc`, `−dmin·m`), for q6k the scales of the low and high
/// halves, for the others the f16 scales and mins (zero without a min plane).
///
/// # Safety
/// AVX-512 BW/VL available; `row < w.rows`, `k + nbk <= nb`; the planes of `w` match its shape.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn row_chunk_scales(w: &QMatrix, row: usize, k: usize, nbk: usize) -> (__m512, __m512) {
    let nb = w.nb();
    let scales: *const u16 = w.scales.as_ptr().cast();
    let mins: *const u16 = w.mins.map_or(std::ptr::null(), |m| m.as_ptr().cast());
    let sub: *const u8 = w.sub.map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: (every arm) blocks k..k+nbk of the row (and their superblocks) lie inside the scale, min and sub
    // planes, present where the scheme has them (validated); the masked loads stop at block k+nbk.
    unsafe {
        match w.scheme {
            Scheme::Q4K => k4_chunk_scales(scales, mins, sub, row * w.scheme.scales_per_row(nb) + k / SUPER, nbk),
            Scheme::Q6K => k6_chunk_scales(scales, sub, row, nb, k, nbk),
            _ => {
                let m16: __mmask16 = if nbk == 16 { !0 } else { (1u16 << nbk) - 1 };
                let at = row * nb + k;
                let d = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m16, scales.add(at).cast()));
                let m = if mins.is_null() {
                    _mm512_setzero_ps()
                } else {
                    _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m16, mins.add(at).cast()))
                };
                (d, m)
            }
        }
    }
}

/// Where each 6-bit value of a [`Scheme::Q4K`] chunk (two superblocks' `sub` bytes, 24 bytes as 12 words)
/// lies: for 32-bit lane `i` (block `i` of the chunk), the two words that hold its bits and its shift in them;
/// `MIN` picks the sub-mins (48 bits after the sub-scales).
const fn k4_lanes<const MIN: bool>() -> ([u16; 32], [u32; 16]) {
    let (mut words, mut shifts) = ([0u16; 32], [0u32; 16]);
    let mut i = 0;
    while i < 16 {
        let bit = 96 * (i / SUPER) + 6 * (i % SUPER) + if MIN { 48 } else { 0 };
        words[2 * i] = (bit / 16) as u16;
        words[2 * i + 1] = (bit / 16 + 1) as u16;
        shifts[i] = (bit % 16) as u32;
        i += 1;
    }
    (words, shifts)
}
const K4_SC: ([u16; 32], [u32; 16]) = k4_lanes::<false>();
const K4_MIN: ([u16; 32], [u32; 16]) = k4_lanes::<true>();

/// Block scales and effective mins (`d·sc[j]`, `−dmin·m[j]`) of the (up to) 16 blocks of a [`Scheme::Q4K`]
/// chunk starting at flat superblock `s0`, unpacked in registers; lanes past `nbk` blocks hold finite values.
///
/// # Safety
/// AVX-512 BW/VL available; superblocks `s0..s0 + ceil(nbk/8)` lie inside the `scales`, `mins` and `sub`
/// planes (`sub`: 12 bytes each).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn k4_chunk_scales(
    scales: *const u16,
    mins: *const u16,
    sub: *const u8,
    s0: usize,
    nbk: usize,
) -> (__m512, __m512) {
    let nsb = nbk.div_ceil(SUPER);
    let m2: __mmask8 = if nsb >= 2 { 0b11 } else { 0b01 };
    // SAFETY: (for all three loads) the masks stop at the chunk's superblocks, inside the planes.
    let (d2, dm2, bytes) = unsafe {
        (
            _mm_cvtph_ps(_mm_maskz_loadu_epi16(m2, scales.add(s0).cast())),
            _mm_cvtph_ps(_mm_maskz_loadu_epi16(m2, mins.add(s0).cast())),
            _mm512_maskz_loadu_epi8(byte_mask(K4_SUB_BYTES * nsb), sub.add(s0 * K4_SUB_BYTES).cast()),
        )
    };
    // Lanes 0..8 take superblock 0's scale, 8..16 superblock 1's.
    let halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    let d = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(d2));
    let dm = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(dm2));
    let six = _mm512_set1_epi32(63);
    let unpack = |(words, shifts): &([u16; 32], [u32; 16])| {
        // SAFETY: both tables are 64 bytes.
        let (idx, sh) =
            unsafe { (_mm512_loadu_si512(words.as_ptr().cast()), _mm512_loadu_si512(shifts.as_ptr().cast())) };
        _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(_mm512_permutexvar_epi16(idx, bytes), sh), six))
    };
    (_mm512_mul_ps(d, unpack(&K4_SC)), _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(dm, unpack(&K4_MIN))))
}

/// Scales of the low and high halves (`d·sc`) of the (up to) 16 blocks of a [`Scheme::Q6K`] chunk: blocks
/// `k..k+nbk` of row `row`; lanes past `nbk` are zero.
///
/// # Safety
/// AVX-512 BW/VL available; the blocks and their superblocks lie inside the `scales` and `sub` planes of a
/// matrix with `nb` blocks per row.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn k6_chunk_scales(
    scales: *const u16,
    sub: *const u8,
    row: usize,
    nb: usize,
    k: usize,
    nbk: usize,
) -> (__m512, __m512) {
    let nsr = nb.div_ceil(SUPER);
    let m2: __mmask8 = if nbk > SUPER { 0b11 } else { 0b01 };
    let m32: __mmask32 = if nbk >= 16 { !0 } else { (1u32 << (2 * nbk)) - 1 };
    // SAFETY: the masks stop at the chunk's superblocks and blocks, inside the planes.
    let (d2, sc) = unsafe {
        (
            _mm_cvtph_ps(_mm_maskz_loadu_epi16(m2, scales.add(row * nsr + k / SUPER).cast())),
            _mm256_maskz_loadu_epi8(m32, sub.add((row * nb + k) * 2).cast()),
        )
    };
    let halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    let d = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(d2));
    // Each block's two int8 scales as one 32-bit lane of two i16: the low one sign-extended, the high one.
    let pairs = _mm512_cvtepi8_epi16(sc);
    let lo = _mm512_srai_epi32(_mm512_slli_epi32(pairs, 16), 16);
    let hi = _mm512_srai_epi32(pairs, 16);
    (_mm512_mul_ps(d, _mm512_cvtepi32_ps(lo)), _mm512_mul_ps(d, _mm512_cvtepi32_ps(hi)))
}

#[inline]
fn byte_mask(bytes: usize) -> __mmask64 {
    if bytes >= 64 {
        !0
    } else {
        (1u64 << bytes) - 1
    }
}

/// About how far ahead (bytes) of the tiles' combined stream to prefetch: a memory latency at one core's
/// bandwidth, with margin. Measured on SmolLM2's 576-wide int4 rows (one thread, 600 MB of weights): 10.9 GB/s
/// at ~1 KiB ahead, 13.0 at 4 KiB, no better further; the 1536- and 8960-wide rows of Qwen 1.5B and int8 rows
/// gain nothing past one tile (Xeon, session 16).
const PREFETCH: usize = 4096;

/// How far each row of a 4-row tile prefetches ahead of itself: a whole number of tiles (the tile's rows are
/// one contiguous stretch of the code plane read as four streams, so the bytes `PREFETCH` ahead of the
/// combined stream are the same position in the rows of a later tile), at least one.
fn prefetch_ahead(row_bytes: usize) -> usize {
    let tile = 4 * row_bytes;
    tile * ((PREFETCH + tile / 2) / tile).max(1)
}

/// How the unsigned codes of the panels and grouped kernels take their offset back: `(−offset, has_min)`, a
/// block's integer sum starting at `−offset·Σx` (int4 8, int8 128 after flipping the sign bit; q6k 32 per half,
/// see `PanelRun::tokens`), or, for the schemes with a min plane, through the min term.
fn unsigned_offsets(scheme: Scheme) -> (i32, bool) {
    match scheme {
        Scheme::Q4 => (-8, false),
        Scheme::Q4A | Scheme::Q4K => (0, true),
        Scheme::Q8 => (-128, false),
        Scheme::Q8A => (-128, true),
        Scheme::Q6K => (-32, false),
    }
}

/// Tokens from which a product runs on row panels (below: 4-row tiles of up to 4 tokens on quads). Building a
/// panel costs about as much as running a few tokens through it; from about a dozen tokens the panels' cheaper
/// per-token work pays for it (1536 x 1536, one thread, panels / tiles at 12 tokens: q4a 1.02, q8 1.03, q4k
/// 0.92, q6k 0.84; at 8 tokens 1.01-1.31; at 4, 1.5-2.1).
const PANEL_MIN_TOKENS: usize = 12;
/// Rows per panel: one 32-bit lane of a register each.
const PANEL_ROWS: usize = 16;
/// Registers per block of a panel: 8 code vectors (codes 4q..4q+4 of each of the 16 rows, one row per 32-bit
/// lane), the 16 rows' scales, their mins.
const PANEL_BLOCK: usize = 10;

thread_local! {
    /// One panel of weights, rebuilt for every 16 rows (it stays in L1 while every token streams past it).
    static PANEL: RefCell<Vec<__m512i>> = const { RefCell::new(Vec::new()) };
}

/// Prefill GEMM: each 16-row panel of `w` is transposed once into `PANEL` (one row per 32-bit lane, codes
/// unpacked to bytes, unsigned), then every token multiplies it with the token's 4 codes broadcast per
/// `vpdpbusd`: a register accumulates a whole block for 16 rows at once, and the scales cost one conversion
/// and one FMA per block and token for all 16 rows. The unsigned-code offset (8 for int4, 128 for int8) is
/// taken back in integer arithmetic by starting each block's sum at `-offset · sum(x codes)`.
///
/// # Safety
/// As [`gemm`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn gemm_panels(w: &QMatrix, x: &QuantizedActivations, out: *mut f32, ldo: usize) {
    let nb = w.nb();
    let qrow = nb * w.scheme.qs_bytes_per_block();
    assert!(qrow.checked_mul(PANEL_ROWS).is_some_and(|v| v < i32::MAX as usize), "row too long for gather offsets");
    let (neg_offset, has_min) = unsigned_offsets(w.scheme);
    PANEL.with(|cell| {
        let mut panel = cell.borrow_mut();
        let mut r0 = 0;
        while r0 < w.rows {
            let nr = (w.rows - r0).min(PANEL_ROWS);
            let rmask: __mmask16 = if nr == PANEL_ROWS { !0 } else { (1u16 << nr) - 1 };
            // SAFETY: rows r0..r0+nr exist; AVX-512 is enabled in this function.
            unsafe { build_panel(w, r0, nr, rmask, &mut panel) };
            let k6 = w.scheme == Scheme::Q6K;
            let p = PanelRun { x, panel: &panel, nb, neg_offset, has_min, k6, out, ldo, r0, rmask };
            let mut t0 = 0;
            while t0 < x.rows {
                let left = x.rows - t0;
                let t = match left {
                    8.. => 8,
                    4..=7 => 4,
                    2..=3 => 2,
                    _ => 1,
                };
                // SAFETY: tokens t0..t0+t exist (t <= left); the output contract is forwarded from our caller.
                let done = unsafe {
                    match t {
                        8 => p.tokens::<8>(t0),
                        4 => p.tokens::<4>(t0),
                        2 => p.tokens::<2>(t0),
                        _ => p.tokens::<1>(t0),
                    }
                };
                t0 += done;
            }
            r0 += nr;
        }
    });
}

/// Transposes rows `r0..r0+nr` of `w` into the panel layout (rows past `nr` are zero).
///
/// # Safety
/// AVX-512 must be available; `r0 + nr <= w.rows`; `rmask` has the low `nr` bits set.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn build_panel(w: &QMatrix, r0: usize, nr: usize, rmask: __mmask16, panel: &mut Vec<__m512i>) {
    let nb = w.nb();
    let qrow = nb * w.scheme.qs_bytes_per_block();
    panel.clear();
    panel.resize(nb * PANEL_BLOCK, _mm512_setzero_si512());
    let base: *const u8 = w.qs.as_ptr().wrapping_add(r0 * qrow);
    let lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    let row_offsets = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(qrow as i32));
    let low4 = _mm512_set1_epi8(0x0f);
    let flip = _mm512_set1_epi8(-128);
    let int4 = w.scheme.is_int4();
    let (mut d, mut m) = ([0.0f32; PANEL_ROWS], [0.0f32; PANEL_ROWS]);
    for b in 0..nb {
        let p = &mut panel[b * PANEL_BLOCK..(b + 1) * PANEL_BLOCK];
        if w.scheme == Scheme::Q6K {
            // Low 4 bits as int4 (from the row's start), high 2 bits from the row's second part: 4 bytes of a
            // block's 8 hold bits of codes i, i+8, i+16, i+24 for i in 0..4 (first 4) or 4..8 (last 4).
            let high = |half: usize| {
                let idx = _mm512_add_epi32(row_offsets, _mm512_set1_epi32((nb * 16 + b * 8 + 4 * half) as i32));
                // SAFETY: lane r (< nr) reads 4 bytes of block b's high bits in row r0+r; masked lanes read nothing.
                unsafe { _mm512_mask_i32gather_epi32::<1>(_mm512_setzero_si512(), rmask, idx, base.cast()) }
            };
            let h = [high(0), high(1)];
            let three = _mm512_set1_epi8(3);
            for q in 0..4 {
                let idx = _mm512_add_epi32(row_offsets, _mm512_set1_epi32((b * 16 + 4 * q) as i32));
                // SAFETY: lane r (< nr) reads 4 bytes of block b's low bits in row r0+r; masked lanes read nothing.
                let g = unsafe { _mm512_mask_i32gather_epi32::<1>(_mm512_setzero_si512(), rmask, idx, base.cast()) };
                // Codes 4q..4q+4 (high bits at 2·(q/2) in bytes 4·(q%2)..) and 16+4q.. (at 4 + 2·(q/2)).
                let bits = |shift: u32| {
                    let v = _mm512_and_si512(_mm512_srlv_epi32(h[q % 2], _mm512_set1_epi32(shift as i32)), three);
                    _mm512_slli_epi32(v, 4)
                };
                p[q] = _mm512_or_si512(_mm512_and_si512(g, low4), bits(2 * (q as u32 / 2)));
                p[4 + q] =
                    _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(g, 4), low4), bits(4 + 2 * (q as u32 / 2)));
            }
        } else if int4 {
            for q in 0..4 {
                let idx = _mm512_add_epi32(row_offsets, _mm512_set1_epi32((b * 16 + 4 * q) as i32));
                // SAFETY: lane r (< nr) reads 4 bytes of block b of row r0+r; masked-off lanes read nothing.
                let g = unsafe { _mm512_mask_i32gather_epi32::<1>(_mm512_setzero_si512(), rmask, idx, base.cast()) };
                p[q] = _mm512_and_si512(g, low4);
                p[4 + q] = _mm512_and_si512(_mm512_srli_epi32(g, 4), low4);
            }
        } else {
            for (q, slot) in p[..8].iter_mut().enumerate() {
                let idx = _mm512_add_epi32(row_offsets, _mm512_set1_epi32((b * 32 + 4 * q) as i32));
                // SAFETY: as above, 4 bytes of block b of row r0+r.
                let g = unsafe { _mm512_mask_i32gather_epi32::<1>(_mm512_setzero_si512(), rmask, idx, base.cast()) };
                *slot = _mm512_xor_si512(g, flip);
            }
        }
    }
    {
        // The block scales (and mins), a row and 16 blocks at a time, the K-quants' unpacked from their sub-scales
        // in registers as the tiles do: block by block through `QMatrix::block_scale`, building a q4k panel took
        // ~4x as long (1536 x 1536: 743 us for a 4-token product, 187 us now).
        let slots: *mut f32 = panel.as_mut_ptr().cast();
        let mut k = 0;
        while k < nb {
            let nbk = (nb - k).min(16);
            for r in 0..nr {
                // SAFETY: row r0+r exists and blocks k..k+nbk lie inside it.
                let (a, b) = unsafe { row_chunk_scales(w, r0 + r, k, nbk) };
                // SAFETY: both arrays hold 16 floats.
                unsafe {
                    _mm512_storeu_ps(d.as_mut_ptr(), a);
                    _mm512_storeu_ps(m.as_mut_ptr(), b);
                }
                for i in 0..nbk {
                    let at = ((k + i) * PANEL_BLOCK + 8) * PANEL_ROWS + r;
                    // SAFETY: block k+i < nb, so slots 8 and 9 of its panel entry (16 floats each) are inside the
                    // panel, sized `nb * PANEL_BLOCK` vectors above; lane r < 16.
                    unsafe {
                        *slots.add(at) = d[i];
                        *slots.add(at + PANEL_ROWS) = m[i];
                    }
                }
            }
            k += nbk;
        }
    }
}

/// The tokens' side of a panel product.
struct PanelRun<'a> {
    x: &'a QuantizedActivations,
    panel: &'a [__m512i],
    nb: usize,
    neg_offset: i32,
    has_min: bool,
    /// Q6K: codes 0..16 and 16..32 of a block have scales of their own (the panel's scale and min slots).
    k6: bool,
    out: *mut f32,
    ldo: usize,
    r0: usize,
    rmask: __mmask16,
}

impl PanelRun<'_> {
    /// Tokens `t0..t0+T` against the panel; returns `T`.
    ///
    /// # Safety
    /// AVX-512 VNNI available; `t0 + T <= x.rows`; the output contract of [`gemm`].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn tokens<const T: usize>(&self, t0: usize) -> usize {
        let (x, nb) = (self.x, self.nb);
        let xq: *const u8 = x.qs.as_ptr().cast();
        let mut acc = [_mm512_setzero_ps(); T];
        for b in 0..nb {
            let p = &self.panel[b * PANEL_BLOCK..(b + 1) * PANEL_BLOCK];
            if self.k6 {
                // SAFETY: as below, for the two halves of block b.
                unsafe { self.k6_block::<T>(t0, b, p, &mut acc) };
                continue;
            }
            let mut sums = [_mm512_setzero_si512(); T];
            for (t, s) in sums.iter_mut().enumerate() {
                *s = _mm512_set1_epi32(self.neg_offset * x.isum[(t0 + t) * nb + b]);
            }
            for (q, &wv) in p[..8].iter().enumerate() {
                for (t, s) in sums.iter_mut().enumerate() {
                    // SAFETY: codes 4q..4q+4 of block b of token t0+t lie inside `x.qs` (nb*32 per token).
                    let xv = unsafe { (xq.add(((t0 + t) * nb + b) * 32 + 4 * q) as *const i32).read_unaligned() };
                    *s = _mm512_dpbusd_epi32(*s, wv, _mm512_set1_epi32(xv));
                }
            }
            let dw = _mm512_castsi512_ps(p[8]);
            for t in 0..T {
                let scale = _mm512_mul_ps(dw, _mm512_set1_ps(x.d[(t0 + t) * nb + b]));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[t]), scale, acc[t]);
            }
            if self.has_min {
                let m = _mm512_castsi512_ps(p[9]);
                for (t, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(m, _mm512_set1_ps(x.sum[(t0 + t) * nb + b]), *a);
                }
            }
        }
        for (t, a) in acc.iter().enumerate() {
            // SAFETY: the caller owns output elements (t0+t)*ldo + r0 + r for the rows r the mask selects.
            unsafe { _mm512_mask_storeu_ps(self.out.add((t0 + t) * self.ldo + self.r0), self.rmask, *a) };
        }
        T
    }
}

impl PanelRun<'_> {
    /// Block `b` of a Q6K panel against tokens `t0..t0+T`: each half's sums start at −32 times the half's
    /// activation code sum and take their own scale (the panel's scale slot for codes 0..16, min slot for
    /// 16..32).
    ///
    /// # Safety
    /// AVX-512 VNNI available; `t0 + T <= x.rows`; `b < nb`; `p` is block b of the panel.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn k6_block<const T: usize>(&self, t0: usize, b: usize, p: &[__m512i], acc: &mut [__m512; T]) {
        let (x, nb) = (self.x, self.nb);
        let xq: *const u8 = x.qs.as_ptr().cast();
        let mut lo = [_mm512_setzero_si512(); T];
        let mut hi = [_mm512_setzero_si512(); T];
        for t in 0..T {
            let i = (t0 + t) * nb + b;
            let low: i32 = x.qs[i * 32..i * 32 + 16].iter().map(|&v| v as i32).sum();
            lo[t] = _mm512_set1_epi32(self.neg_offset * low);
            hi[t] = _mm512_set1_epi32(self.neg_offset * (x.isum[i] - low));
        }
        for (q, &wv) in p[..8].iter().enumerate() {
            let sums = if q < 4 { &mut lo } else { &mut hi };
            for (t, s) in sums.iter_mut().enumerate() {
                // SAFETY: codes 4q..4q+4 of block b of token t0+t lie inside `x.qs` (nb*32 per token).
                let xv = unsafe { (xq.add(((t0 + t) * nb + b) * 32 + 4 * q) as *const i32).read_unaligned() };
                *s = _mm512_dpbusd_epi32(*s, wv, _mm512_set1_epi32(xv));
            }
        }
        let (dl, dh) = (_mm512_castsi512_ps(p[8]), _mm512_castsi512_ps(p[9]));
        for t in 0..T {
            let dx = _mm512_set1_ps(x.d[(t0 + t) * nb + b]);
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo[t]), _mm512_mul_ps(dl, dx), acc[t]);
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi[t]), _mm512_mul_ps(dh, dx), acc[t]);
        }
    }
}

/// Products over a matrix whose rows are all stored in groups of 16 ([`crate::scheme::RowLayout::Grouped`]):
/// the panel computation read straight from the planes, with nothing built. A block of a group is 4 (int4),
/// 6 (q6k) or 8 (int8) vectors of codes, 16 rows' same 4 bytes per vector, one row per 32-bit lane; each is
/// unpacked once per block of up to 8 tokens, and each token adds it with one `vpdpbusd` against its 4 codes
/// broadcast, so a 16-row block costs 8 `vpdpbusd` per token and one scale conversion and FMA per token for
/// all 16 rows. The 16 rows' scales of a block are one contiguous vector too.
///
/// # Safety
/// As [`gemm`], and `w.grouped_rows() == w.rows`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn gemm_grouped(w: &QMatrix, x: &QuantizedActivations, out: *mut f32, ldo: usize) {
    assert_eq!(w.grouped_rows(), w.rows, "gemm_grouped: rows outside groups");
    // SAFETY: forwarded from our caller (all four calls).
    unsafe {
        match w.scheme {
            Scheme::Q4 | Scheme::Q4A => grouped::<PLAIN4>(w, x, out, ldo),
            Scheme::Q8 | Scheme::Q8A => grouped::<INT8>(w, x, out, ldo),
            Scheme::Q4K => grouped::<K4>(w, x, out, ldo),
            Scheme::Q6K => grouped::<K6>(w, x, out, ldo),
        }
    }
}

/// [`gemm_grouped`] for one kind of code.
///
/// # Safety
/// As [`gemm_grouped`], and `K` is `w.scheme`'s kind.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn grouped<const K: u8>(w: &QMatrix, x: &QuantizedActivations, out: *mut f32, ldo: usize) {
    super::with_low_sums(w, x, |low| {
        let (neg_offset, has_min) = unsigned_offsets(w.scheme);
        // q6k holds two sums per token: at most 4 tokens at a time keep them all in registers. Every pass
        // unpacks the group's codes again, so the tokens go in as few passes as the registers allow, of even
        // size (3 tokens: one pass of 3, not 2 + 1; 10: 5 + 5).
        let most = if K == K6 { 4 } else { 8 };
        let passes = x.rows.div_ceil(most);
        for g in 0..w.rows / PANEL_ROWS {
            let run = GroupRun { w, x, low, g, neg_offset, has_min, out, ldo };
            let mut t0 = 0;
            for p in 0..passes {
                let t = (x.rows - t0).div_ceil(passes - p);
                // SAFETY: tokens t0..t0+t exist; group g lies inside the matrix; forwarded from our caller.
                unsafe {
                    match t {
                        8 => run.tokens::<8, K>(t0),
                        7 => run.tokens::<7, K>(t0),
                        6 => run.tokens::<6, K>(t0),
                        5 => run.tokens::<5, K>(t0),
                        4 => run.tokens::<4, K>(t0),
                        3 => run.tokens::<3, K>(t0),
                        2 => run.tokens::<2, K>(t0),
                        _ => run.tokens::<1, K>(t0),
                    }
                }
                t0 += t;
            }
        }
    });
}

/// One group of 16 rows of a grouped matrix against the tokens.
struct GroupRun<'a> {
    w: &'a QMatrix<'a>,
    x: &'a QuantizedActivations,
    /// q6k: activation code sums of each block's first half, per token.
    low: &'a [i32],
    g: usize,
    neg_offset: i32,
    has_min: bool,
    out: *mut f32,
    ldo: usize,
}

impl GroupRun<'_> {
    /// Tokens `t0..t0+T` against the group.
    ///
    /// # Safety
    /// AVX-512 VNNI available; `t0 + T <= x.rows`; group `g` lies inside the grouped matrix `w`; `K` is its
    /// scheme's kind; the output contract of [`gemm`].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn tokens<const T: usize, const K: u8>(&self, t0: usize) {
        let (w, x, g) = (self.w, self.x, self.g);
        let nb = w.nb();
        let nsb = nb.div_ceil(SUPER);
        // Units (4 bytes) per row of the code plane; a group's unit i is 16 rows' 4 bytes, 64 bytes.
        let per_row = nb * w.scheme.qs_bytes_per_block() / 4;
        let codes: *const __m512i = w.qs.as_ptr().wrapping_add(g * PANEL_ROWS * per_row * 4).cast();
        let scales: *const u16 = w.scales.as_ptr().cast();
        let mins: *const u16 = w.mins.map_or(std::ptr::null(), |m| m.as_ptr().cast());
        let sub: *const u8 = w.sub.map_or(std::ptr::null(), |s| s.as_ptr());
        let xq: *const u8 = x.qs.as_ptr().cast();
        let (low4, flip, three) = (_mm512_set1_epi8(0x0f), _mm512_set1_epi8(-128), _mm512_set1_epi8(3));
        let six = _mm512_set1_epi32(63);
        let mut acc = [_mm512_setzero_ps(); T];
        // q4k: the current superblock's scales, min scales and 96 bits of sub-scales per row.
        let (mut kd, mut kdm, mut kw) = (_mm512_setzero_ps(), _mm512_setzero_ps(), [_mm512_setzero_si512(); 3]);
        // Units (64 bytes of a group) per block in the main code stream (q6k: its low bits; the high bits follow
        // at nb*4 + 2b).
        let upb = match K {
            INT8 => 8,
            _ => 4,
        };
        for b in 0..nb {
            // A memory latency ahead in the group's code stream (the prefetch of an address past the plane is a
            // hint and never faults).
            for q in 0..upb {
                _mm_prefetch::<_MM_HINT_T0>(codes.wrapping_add(b * upb + q).cast::<i8>().wrapping_add(PREFETCH));
            }
            if K == K6 {
                _mm_prefetch::<_MM_HINT_T0>(codes.wrapping_add(nb * 4 + b * 2).cast::<i8>().wrapping_add(PREFETCH));
            }
            // The 16 rows' codes of block b, unsigned, slot s holding codes 4s..4s+4.
            let mut cv = [_mm512_setzero_si512(); 8];
            // SAFETY: (all loads of this block) group g's units of block b lie inside the code plane; its scale
            // entries (16 per block or superblock of the group) inside the scale, min and sub planes, which are
            // present where the scheme has them (validated).
            unsafe {
                match K {
                    PLAIN4 | K4 => {
                        for q in 0..4 {
                            let v = _mm512_loadu_si512(codes.add(b * 4 + q).cast());
                            cv[q] = _mm512_and_si512(v, low4);
                            cv[4 + q] = _mm512_and_si512(_mm512_srli_epi32(v, 4), low4);
                        }
                    }
                    INT8 => {
                        for q in 0..8 {
                            cv[q] = _mm512_xor_si512(_mm512_loadu_si512(codes.add(b * 8 + q).cast()), flip);
                        }
                    }
                    _ => {
                        // Low 4 bits as int4; the high 2 bits at nb*4 + 2b + half: byte i of a block's 8 holds
                        // bits of codes i, i+8, i+16, i+24 (half 0: i < 4).
                        let h = [
                            _mm512_loadu_si512(codes.add(nb * 4 + b * 2).cast()),
                            _mm512_loadu_si512(codes.add(nb * 4 + b * 2 + 1).cast()),
                        ];
                        for q in 0..4 {
                            let v = _mm512_loadu_si512(codes.add(b * 4 + q).cast());
                            let bits = |shift: i32| {
                                let hb = _mm512_and_si512(_mm512_srlv_epi32(h[q % 2], _mm512_set1_epi32(shift)), three);
                                _mm512_slli_epi32(hb, 4)
                            };
                            cv[q] = _mm512_or_si512(_mm512_and_si512(v, low4), bits(2 * (q as i32 / 2)));
                            cv[4 + q] = _mm512_or_si512(
                                _mm512_and_si512(_mm512_srli_epi32(v, 4), low4),
                                bits(4 + 2 * (q as i32 / 2)),
                            );
                        }
                    }
                }
            }
            // The 16 rows' scales of block b (q6k: of its two halves) and effective mins.
            // SAFETY: as above.
            let (d0, d1) = unsafe {
                match K {
                    K4 => {
                        let s = b / SUPER;
                        if b % SUPER == 0 {
                            let at = (g * nsb + s) * PANEL_ROWS;
                            kd = _mm512_cvtph_ps(_mm256_loadu_si256(scales.add(at).cast()));
                            kdm = _mm512_cvtph_ps(_mm256_loadu_si256(mins.add(at).cast()));
                            for (u, word) in kw.iter_mut().enumerate() {
                                *word = _mm512_loadu_si512(sub.add(((g * nsb + s) * 3 + u) * 64).cast());
                            }
                        }
                        // 6-bit field f of the 96 bits: sc[j] at f = j, m[j] at f = 8 + j.
                        let field = |f: usize| {
                            let (word, shift) = ((6 * f) / 32, (6 * f % 32) as i32);
                            let lo = _mm512_srlv_epi32(kw[word], _mm512_set1_epi32(shift));
                            // A count of 32 shifts everything out: fields inside one word take nothing here.
                            let hi = if word + 1 < 3 {
                                _mm512_sllv_epi32(kw[word + 1], _mm512_set1_epi32(32 - shift))
                            } else {
                                _mm512_setzero_si512()
                            };
                            _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_or_si512(lo, hi), six))
                        };
                        let j = b % SUPER;
                        (
                            _mm512_mul_ps(kd, field(j)),
                            _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(kdm, field(8 + j))),
                        )
                    }
                    K6 => {
                        let d =
                            _mm512_cvtph_ps(_mm256_loadu_si256(scales.add((g * nsb + b / SUPER) * PANEL_ROWS).cast()));
                        // Each row's two int8 sub-scales as one 16-bit unit, sign-extended to 32 bits.
                        let pairs = _mm512_cvtepi16_epi32(_mm256_loadu_si256(sub.add((g * nb + b) * 32).cast()));
                        let lo = _mm512_srai_epi32(_mm512_slli_epi32(pairs, 24), 24);
                        let hi = _mm512_srai_epi32(pairs, 8);
                        (_mm512_mul_ps(d, _mm512_cvtepi32_ps(lo)), _mm512_mul_ps(d, _mm512_cvtepi32_ps(hi)))
                    }
                    _ => {
                        let at = (g * nb + b) * PANEL_ROWS;
                        let d = _mm512_cvtph_ps(_mm256_loadu_si256(scales.add(at).cast()));
                        let m = if self.has_min {
                            _mm512_cvtph_ps(_mm256_loadu_si256(mins.add(at).cast()))
                        } else {
                            _mm512_setzero_ps()
                        };
                        (d, m)
                    }
                }
            };
            if K == K6 {
                let mut lo = [_mm512_setzero_si512(); T];
                let mut hi = [_mm512_setzero_si512(); T];
                for t in 0..T {
                    let i = (t0 + t) * nb + b;
                    lo[t] = _mm512_set1_epi32(self.neg_offset * self.low[i]);
                    hi[t] = _mm512_set1_epi32(self.neg_offset * (x.isum[i] - self.low[i]));
                }
                for (q, &wv) in cv.iter().enumerate() {
                    let sums = if q < 4 { &mut lo } else { &mut hi };
                    for (t, s) in sums.iter_mut().enumerate() {
                        // SAFETY: codes 4q..4q+4 of block b of token t0+t lie inside `x.qs` (nb*32 per token).
                        let xv = unsafe { (xq.add(((t0 + t) * nb + b) * 32 + 4 * q) as *const i32).read_unaligned() };
                        *s = _mm512_dpbusd_epi32(*s, wv, _mm512_set1_epi32(xv));
                    }
                }
                for t in 0..T {
                    let dx = _mm512_set1_ps(x.d[(t0 + t) * nb + b]);
                    acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo[t]), _mm512_mul_ps(d0, dx), acc[t]);
                    acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi[t]), _mm512_mul_ps(d1, dx), acc[t]);
                }
                continue;
            }
            let mut sums = [_mm512_setzero_si512(); T];
            // Unsigned codes with no min (q4: −8, int8: −128) start at −offset·Σx; q4a/q4k take their offset
            // through the min term instead, so their sums start at zero (no per-token broadcast).
            if K == INT8 || (K == PLAIN4 && !self.has_min) {
                for (t, s) in sums.iter_mut().enumerate() {
                    *s = _mm512_set1_epi32(self.neg_offset * x.isum[(t0 + t) * nb + b]);
                }
            }
            for (q, &wv) in cv.iter().enumerate() {
                for (t, s) in sums.iter_mut().enumerate() {
                    // SAFETY: codes 4q..4q+4 of block b of token t0+t lie inside `x.qs` (nb*32 per token).
                    let xv = unsafe { (xq.add(((t0 + t) * nb + b) * 32 + 4 * q) as *const i32).read_unaligned() };
                    *s = _mm512_dpbusd_epi32(*s, wv, _mm512_set1_epi32(xv));
                }
            }
            for t in 0..T {
                let scale = _mm512_mul_ps(d0, _mm512_set1_ps(x.d[(t0 + t) * nb + b]));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[t]), scale, acc[t]);
                if self.has_min {
                    acc[t] = _mm512_fmadd_ps(d1, _mm512_set1_ps(x.sum[(t0 + t) * nb + b]), acc[t]);
                }
            }
        }
        for (t, a) in acc.iter().enumerate() {
            // SAFETY: the caller owns output elements (t0+t)*ldo + 16g + r, r < 16.
            unsafe { _mm512_storeu_ps(self.out.add((t0 + t) * self.ldo + g * PANEL_ROWS), *a) };
        }
    }
}

/// [`crate::activation::quantize_row`] with 512-bit registers, bit for bit.
///
/// # Safety
/// [`available`] must be true; the slices have the sizes `quantize_row` expects (`qs`: 32 per block).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn quantize_row(row: &[f32], qs: &mut [i8], d: &mut [f32], sum: &mut [f32], isum: &mut [i32]) {
    let cols = row.len();
    assert!(qs.len() >= d.len() * BLOCK && sum.len() >= d.len() && isum.len() >= d.len() && cols <= d.len() * BLOCK);
    for b in 0..d.len() {
        let n = (cols - b * BLOCK).min(BLOCK);
        let (m0, m1): (__mmask16, __mmask16) =
            ((((1u32 << n.min(16)) - 1) as u16), (((1u32 << n.saturating_sub(16)) - 1) as u16));
        let src = row.as_ptr().wrapping_add(b * BLOCK);
        // SAFETY: the masks stop at the row's end.
        let (v0, v1) = unsafe { (_mm512_maskz_loadu_ps(m0, src), _mm512_maskz_loadu_ps(m1, src.add(16))) };
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        let db = amax / 127.0;
        let id = if db > 0.0 { 1.0 / db } else { 0.0 };
        let idv = _mm512_set1_ps(id);
        // Round half to even: the default MXCSR mode of the conversion.
        let (q0, q1) = (_mm512_cvtps_epi32(_mm512_mul_ps(v0, idv)), _mm512_cvtps_epi32(_mm512_mul_ps(v1, idv)));
        let s = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        let dst = qs.as_mut_ptr().wrapping_add(b * BLOCK);
        // SAFETY: 32 codes per block fit in `qs` (asserted above).
        unsafe {
            _mm_storeu_si128(dst.cast(), _mm512_cvtsepi32_epi8(q0));
            _mm_storeu_si128(dst.add(16).cast(), _mm512_cvtsepi32_epi8(q1));
        }
        d[b] = db;
        sum[b] = db * s as f32;
        isum[b] = s;
    }
}
