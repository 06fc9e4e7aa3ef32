//! Quantized matrix products `out[t, r] = sum_k W[r, k] * x[t, k]` on int8-quantized activations.
//!
//! One entry point, [`gemm`], serves decode (one token: a GEMV) and prefill (many tokens: each weight row is
//! loaded once and reused against every token while it sits in L1). The instruction set is picked at runtime
//! ([`Isa::detect`]); `SPRIG_CPU=scalar|avx2|avx512|neon|dotprod|i8mm` forces one, and tests check each against
//! [`scalar`].

/// Calls `$tile::<R, T, INT8>($arg)` for a runtime tile of `$nr` ≤ 4 rows × `$nt` ≤ 2 tokens and the weight
/// scheme (`$int4`): the register tiles of the AVX2 and NEON kernels are compiled once per size.
#[allow(unused_macros)] // Used by the x86 and aarch64 kernels only.
macro_rules! dispatch_tile {
    ($($tile:ident)::+, $arg:expr, $nr:expr, $nt:expr, $int4:expr) => {
        match ($nr, $nt, $int4) {
            (4, 2, true) => $($tile)::+::<4, 2, false>($arg),
            (4, 1, true) => $($tile)::+::<4, 1, false>($arg),
            (3, 2, true) => $($tile)::+::<3, 2, false>($arg),
            (3, 1, true) => $($tile)::+::<3, 1, false>($arg),
            (2, 2, true) => $($tile)::+::<2, 2, false>($arg),
            (2, 1, true) => $($tile)::+::<2, 1, false>($arg),
            (1, 2, true) => $($tile)::+::<1, 2, false>($arg),
            (1, 1, true) => $($tile)::+::<1, 1, false>($arg),
            (4, 2, false) => $($tile)::+::<4, 2, true>($arg),
            (4, 1, false) => $($tile)::+::<4, 1, true>($arg),
            (3, 2, false) => $($tile)::+::<3, 2, true>($arg),
            (3, 1, false) => $($tile)::+::<3, 1, true>($arg),
            (2, 2, false) => $($tile)::+::<2, 2, true>($arg),
            (2, 1, false) => $($tile)::+::<2, 1, true>($arg),
            (1, 2, false) => $($tile)::+::<1, 2, true>($arg),
            (1, 1, false) => $($tile)::+::<1, 1, true>($arg),
            _ => unreachable!("tiles are 1..=4 rows by 1..=2 tokens"),
        }
    };
}

#[cfg(target_arch = "x86_64")]
pub mod avx512;
#[cfg(target_arch = "aarch64")]
pub mod neon;
pub mod scalar;
#[cfg(target_arch = "x86_64")]
pub mod x86;

use std::cell::RefCell;

use crate::activation::QuantizedActivations;
use crate::scheme::{regroup_into, Plane, QMatrix, QMatrixOwned, RowLayout, ROW_GROUP};

thread_local! {
    /// One group of 16 rows in row-major order, for the kernels that have no grouped form.
    static GROUP_SCRATCH: RefCell<QMatrixOwned> = RefCell::new(QMatrixOwned::default());
    /// Per token and block, the sum of the activation codes 0..16 (q6k's halves have scales of their own).
    static LOW_SUMS: RefCell<Vec<i32>> = const { RefCell::new(Vec::new()) };
}

/// Calls `f` with every token's per-block sums of activation codes 0..16 (`x.rows * nb`, token-major) when `w` is
/// [`crate::Scheme::Q6K`], else with nothing: the grouped kernels take each half block's offset back with them.
/// No allocation once grown (decode runs it per product).
#[allow(dead_code)] // Used by the x86 and aarch64 kernels only.
pub(crate) fn with_low_sums<R>(w: &QMatrix, x: &QuantizedActivations, f: impl FnOnce(&[i32]) -> R) -> R {
    LOW_SUMS.with(|cell| {
        let mut low = cell.borrow_mut();
        low.clear();
        if w.scheme == crate::Scheme::Q6K {
            for t in 0..x.rows {
                let qs = x.row_qs(t);
                low.extend((0..x.nb()).map(|b| qs[b * 32..b * 32 + 16].iter().map(|&v| v as i32).sum::<i32>()));
            }
        }
        f(&low)
    })
}

/// Copies one grouped group of [`ROW_GROUP`] rows into `out` in row-major order (no allocation once grown).
fn ungroup(w: &QMatrix, out: &mut QMatrixOwned) {
    debug_assert_eq!((w.rows, w.grouped_rows()), (ROW_GROUP, ROW_GROUP));
    out.scheme = Some(w.scheme);
    (out.rows, out.cols, out.layout) = (w.rows, w.cols, RowLayout::RowMajor);
    let copy = |src, dst, unit| regroup_into(src, ROW_GROUP, unit, false, dst);
    copy(w.qs, &mut out.qs, Plane::Qs.unit_bytes(w.scheme));
    regroup_into(w.scales, ROW_GROUP, 1, false, &mut out.scales);
    match w.mins {
        Some(m) => regroup_into(m, ROW_GROUP, 1, false, out.mins.get_or_insert_with(Vec::new)),
        None => out.mins = None,
    }
    match w.sub {
        Some(s) => copy(s, out.sub.get_or_insert_with(Vec::new), Plane::Sub.unit_bytes(w.scheme)),
        None => out.sub = None,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    /// AVX2 + FMA + F16C: `vpmaddubsw` integer dot products.
    Avx2,
    /// AVX-512 VNNI on 512-bit registers: `vpdpbusd`, 4-row × 4-token tiles on repacked activations.
    Avx512Vnni,
    /// aarch64 baseline NEON: `smull` + `sadalp`.
    Neon,
    /// aarch64 with the dot-product extension: `sdot`.
    NeonDot,
    /// aarch64 with the int8 matrix-multiply extension (and `sdot`): `smmla` 2 × 2 tiles for prefill.
    NeonI8mm,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512",
            Isa::Neon => "neon",
            Isa::NeonDot => "dotprod",
            Isa::NeonI8mm => "i8mm",
        }
    }

    /// Every ISA this CPU can run, best last.
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if x86::has_avx2() {
                v.push(Isa::Avx2);
            }
            if avx512::available() {
                v.push(Isa::Avx512Vnni);
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            // NEON is part of the aarch64 baseline.
            v.push(Isa::Neon);
            if neon::has_dotprod() {
                v.push(Isa::NeonDot);
            }
            if neon::has_i8mm() {
                v.push(Isa::NeonI8mm);
            }
        }
        v
    }

    /// The best available ISA, or the one `SPRIG_CPU` names (an unknown or unavailable name is an error).
    pub fn detect() -> Result<Isa, String> {
        let avail = Self::available();
        match std::env::var("SPRIG_CPU") {
            Ok(name) if !name.is_empty() => avail.iter().copied().find(|i| i.name() == name).ok_or_else(|| {
                format!(
                    "SPRIG_CPU={name}: not available on this CPU (available: {})",
                    avail.iter().map(|i| i.name()).collect::<Vec<_>>().join(", ")
                )
            }),
            _ => Ok(*avail.last().unwrap()),
        }
    }
}

/// Rows whose weights stay in L1 while every token tile of a product streams past them: the cache blocking
/// of the tiled kernels (16 rows of 1536 int4 inputs are 14 KiB).
pub(crate) const ROW_BLOCK: usize = 16;

/// Per-block scales of a product in f32, each row padded with zeros to a multiple of a kernel's vector width,
/// so the tiled kernels load whole vectors of them with no partial tail: the activations' scales and block sums
/// once per product, the weights' scales and effective mins (`w = d·q + m`, int4's −8 folded in) once per row
/// block. One per thread, reused (no allocation once grown).
#[allow(dead_code)] // Used by the x86 and aarch64 kernels only.
#[derive(Default)]
pub(crate) struct PaddedScales {
    /// Blocks per padded row.
    stride: usize,
    x_d: Vec<f32>,
    x_sum: Vec<f32>,
    w_d: Vec<f32>,
    w_min: Vec<f32>,
    /// First row of the current row block.
    w_row0: usize,
}

thread_local! {
    static PADDED_SCALES: RefCell<PaddedScales> = RefCell::new(PaddedScales::default());
}

#[allow(dead_code)] // Used by the x86 and aarch64 kernels only.
impl PaddedScales {
    /// Walks the product `w · x` in register tiles of up to `tile_rows` × `tile_tokens`, calling
    /// `tile(scales, r0, nr, t0, nt)` for each with this thread's padded scales (vectors of `width`): row blocks
    /// of [`ROW_BLOCK`] outermost (their scales converted by `convert` first), then token tiles, then the row
    /// tiles of the block, so a block's weights are read from memory once and from L1 for every further token
    /// tile.
    pub fn walk(
        w: &QMatrix,
        x: &QuantizedActivations,
        width: usize,
        tile_rows: usize,
        tile_tokens: usize,
        convert: impl Fn(&[half::f16], &mut [f32]),
        mut tile: impl FnMut(&PaddedScales, usize, usize, usize, usize),
    ) {
        PADDED_SCALES.with(|cell| {
            let mut scales = cell.borrow_mut();
            scales.start(w, x, width);
            let mut rb = 0;
            while rb < w.rows {
                let re = (rb + ROW_BLOCK).min(w.rows);
                scales.row_block(w, rb, re, &convert);
                let mut t0 = 0;
                while t0 < x.rows {
                    let nt = (x.rows - t0).min(tile_tokens);
                    let mut r0 = rb;
                    while r0 < re {
                        let nr = (re - r0).min(tile_rows);
                        tile(&scales, r0, nr, t0, nt);
                        r0 += nr;
                    }
                    t0 += nt;
                }
                rb = re;
            }
        });
    }

    /// Sizes the buffers and copies the activation scales.
    fn start(&mut self, w: &QMatrix, x: &QuantizedActivations, width: usize) {
        let nb = x.nb();
        self.stride = nb.next_multiple_of(width);
        for (dst, src) in [(&mut self.x_d, &x.d), (&mut self.x_sum, &x.sum)] {
            dst.clear();
            dst.resize(x.rows * self.stride, 0.0);
            for t in 0..x.rows {
                dst[t * self.stride..t * self.stride + nb].copy_from_slice(&src[t * nb..(t + 1) * nb]);
            }
        }
        let n = ROW_BLOCK.min(w.rows) * self.stride;
        self.w_d.resize(n, 0.0);
        self.w_min.resize(n, 0.0);
    }

    /// Converts the scales of rows `start..end` (at most [`ROW_BLOCK`]) with `convert(f16 in, f32 out)`.
    fn row_block(&mut self, w: &QMatrix, start: usize, end: usize, convert: &impl Fn(&[half::f16], &mut [f32])) {
        let (nb, stride) = (w.nb(), self.stride);
        self.w_row0 = start;
        for r in start..end {
            let row = (r - start) * stride..(r - start) * stride + nb;
            if matches!(w.scheme, crate::Scheme::Q4K | crate::Scheme::Q6K) {
                // Q4K: products of 6-bit sub-scales with the superblock's f16 scales, exact in f32. Q6K: the
                // superblock's scale (its int8 sub-scales are applied to the integer sums by the kernels).
                w.row_block_scales(r, &mut self.w_d[row.clone()], &mut self.w_min[row]);
                continue;
            }
            convert(&w.scales[r * nb..(r + 1) * nb], &mut self.w_d[row.clone()]);
            match (w.scheme, w.mins) {
                (_, Some(m)) => convert(&m[r * nb..(r + 1) * nb], &mut self.w_min[row]),
                (crate::Scheme::Q4, None) => {
                    for (m, &d) in self.w_min[row.clone()].iter_mut().zip(&self.w_d[row]) {
                        *m = -8.0 * d;
                    }
                }
                _ => self.w_min[row].fill(0.0),
            }
        }
    }

    /// Row `r`'s (absolute index) padded weight scales and mins.
    #[inline]
    pub fn w_row(&self, r: usize) -> (&[f32], &[f32]) {
        let at = (r - self.w_row0) * self.stride;
        (&self.w_d[at..at + self.stride], &self.w_min[at..at + self.stride])
    }

    /// Token `t`'s padded activation scales and block sums.
    #[inline]
    pub fn x_row(&self, t: usize) -> (&[f32], &[f32]) {
        let at = t * self.stride;
        (&self.x_d[at..at + self.stride], &self.x_sum[at..at + self.stride])
    }
}

/// Quantizes one activation row: `(row, codes, scales, scaled sums, code sums)`.
pub type QuantizeRowFn = fn(&[f32], &mut [i8], &mut [f32], &mut [f32], &mut [i32]);

/// The fastest bit-exact implementation of [`crate::activation::quantize_row`] on this CPU.
pub fn quantize_row_fn() -> QuantizeRowFn {
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        return |row, qs, d, sum, isum| {
            // SAFETY: AVX-512 availability checked when this function pointer was chosen.
            unsafe { avx512::quantize_row(row, qs, d, sum, isum) }
        };
    }
    crate::activation::quantize_row
}

/// Repacks `x` once for `isa`'s kernel, so that every matrix product reading it (and every thread) shares one
/// packing instead of making its own. Optional: kernels pack on the fly when it was not done.
pub fn prepare(isa: Isa, x: &mut QuantizedActivations) {
    if x.packed_for == Some(isa) {
        return;
    }
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut buf = std::mem::take(&mut x.packed);
    let packed = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni if avx512::uses_quads(x.rows) => {
            avx512::pack(x, &mut buf);
            true
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            x86::pack_pairs(x, &mut buf);
            true
        }
        _ => false,
    };
    x.packed = buf;
    x.packed_for = packed.then_some(isa);
}

/// `out[t * ldo + r] = W[r] · x[t]` for every row `r < w.rows` and token `t < x.rows`.
///
/// Panics if the shapes disagree or `out` is too short (callers validate shapes at load time).
pub fn gemm(isa: Isa, w: &QMatrix, x: &QuantizedActivations, out: &mut [f32], ldo: usize) {
    assert_eq!(w.cols, x.cols, "gemm: weight has {} inputs, activation {}", w.cols, x.cols);
    assert!(ldo >= w.rows, "gemm: ldo");
    if x.rows == 0 || w.rows == 0 {
        return;
    }
    assert!(out.len() >= (x.rows - 1) * ldo + w.rows, "gemm: output too short");
    // SAFETY: `out` is exclusively borrowed and long enough for every (t, r) written (checked above).
    unsafe { gemm_strided(isa, w, x, out.as_mut_ptr(), ldo) }
}

/// [`gemm`] into a strided output that other threads also write (different columns of the same rows), so no
/// `&mut` slice of it may exist.
///
/// # Safety
/// `out` must be valid for writes at `t * ldo + r` for every `t < x.rows`, `r < w.rows`, and no other thread
/// may access those elements during the call; `w.cols == x.cols`; the planes of `w` match its shape.
pub unsafe fn gemm_strided(isa: Isa, w: &QMatrix, x: &QuantizedActivations, out: *mut f32, ldo: usize) {
    assert_eq!(w.cols, x.cols, "gemm: weight has {} inputs, activation {}", w.cols, x.cols);
    let grouped = w.grouped_rows();
    if grouped > 0 && isa != Isa::Scalar {
        if grouped < w.rows {
            // SAFETY: the row-major tail's outputs are columns grouped.. of the same rows (our caller's).
            unsafe { gemm_strided(isa, &w.rows_range(grouped, w.rows), x, out.add(grouped), ldo) };
        }
        let groups = w.rows_range(0, grouped);
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx512Vnni {
            assert!(avx512::available(), "AVX-512 VNNI not available");
            // SAFETY: AVX-512 presence checked just above; output contract forwarded from our caller.
            return unsafe { avx512::gemm_grouped(&groups, x, out, ldo) };
        }
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx2 {
            assert!(x86::has_avx2(), "AVX2 not available");
            // SAFETY: AVX2/FMA/F16C presence checked just above; output contract forwarded from our caller.
            return unsafe { x86::gemm_grouped(&groups, x, out, ldo) };
        }
        #[cfg(target_arch = "aarch64")]
        if matches!(isa, Isa::NeonDot | Isa::NeonI8mm) {
            assert!(neon::has_dotprod(), "the dot-product extension is not available");
            // SAFETY: dotprod presence checked just above; output contract forwarded from our caller.
            return unsafe { neon::gemm_grouped(&groups, x, out, ldo) };
        }
        // Kernels without a grouped form run each group from a row-major copy made in L1.
        return GROUP_SCRATCH.with(|cell| {
            let mut scratch = cell.borrow_mut();
            for g in 0..grouped / ROW_GROUP {
                let r0 = g * ROW_GROUP;
                ungroup(&groups.rows_range(r0, r0 + ROW_GROUP), &mut scratch);
                // SAFETY: the group's outputs are columns r0..r0+16 of our caller's rows.
                unsafe { gemm_strided(isa, &scratch.view(), x, out.add(r0), ldo) };
            }
        });
    }
    match isa {
        Isa::Scalar => {
            for r in 0..w.rows {
                for t in 0..x.rows {
                    // SAFETY: the caller guarantees (t, r) is writable and ours alone.
                    unsafe { *out.add(t * ldo + r) = scalar::dot_row(w, r, x, t) };
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            assert!(x86::has_avx2(), "AVX2 not available");
            // SAFETY: AVX2/FMA/F16C presence checked just above; output contract forwarded from our caller.
            unsafe { x86::gemm_avx2(w, x, out, ldo) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => {
            assert!(avx512::available(), "AVX-512 VNNI not available");
            // SAFETY: AVX-512 VNNI/BW/VL presence checked just above; output contract forwarded from our caller.
            unsafe { avx512::gemm(w, x, out, ldo) }
        }
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => {
            // SAFETY: NEON is baseline on aarch64; output contract forwarded from our caller.
            unsafe { neon::gemm_neon(w, x, out, ldo) }
        }
        #[cfg(target_arch = "aarch64")]
        Isa::NeonDot => {
            assert!(neon::has_dotprod(), "the dot-product extension is not available");
            // SAFETY: dotprod presence checked just above; output contract forwarded from our caller.
            unsafe { neon::gemm_dotprod(w, x, out, ldo) }
        }
        #[cfg(target_arch = "aarch64")]
        Isa::NeonI8mm => {
            assert!(neon::has_i8mm(), "the int8 matrix-multiply extension is not available");
            // SAFETY: i8mm (and dotprod) presence checked just above; output contract forwarded from our caller.
            unsafe { neon::gemm_i8mm(w, x, out, ldo) }
        }
        #[allow(unreachable_patterns)]
        other => panic!("{} kernels are not compiled for this architecture", other.name()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quantize::quantize;
    use crate::scheme::Scheme;
    use rand::{Rng, SeedableRng};

    /// `SPRIG_EXPECT_ISA=neon,dotprod` (set by scripts/test.sh for the qemu run) makes sure the kernels the run
    /// is meant to check were really detected, so a detection failure cannot silently test only scalar.
    #[test]
    fn expected_instruction_sets_are_detected() {
        let avail = Isa::available();
        for name in std::env::var("SPRIG_EXPECT_ISA").unwrap_or_default().split(',').filter(|s| !s.is_empty()) {
            assert!(avail.iter().any(|i| i.name() == name), "{name} not detected; available: {avail:?}");
        }
    }

    /// The safe entry point refuses mismatched shapes and short outputs (a panic, never a read or write past a
    /// buffer): the planes themselves are sized by construction (`QMatrix::new`, `QuantizedActivations`).
    #[test]
    fn safe_gemm_checks_every_length() {
        let w = quantize(&vec![0.5f32; 8 * 64], 8, 64, Scheme::Q4);
        let mut x = QuantizedActivations::default();
        x.quantize(&[1.0; 3 * 64], 3, 64);
        let isa = Isa::detect().unwrap_or(Isa::Scalar);
        let mut out = vec![0.0; 3 * 8];
        gemm(isa, &w.view(), &x, &mut out, 8);
        let run = |f: Box<dyn FnOnce() + std::panic::UnwindSafe>| std::panic::catch_unwind(f).is_err();
        let (wv, xc) = (w.clone(), x.clone());
        assert!(run(Box::new(move || gemm(isa, &wv.view(), &xc, &mut vec![0.0; 3 * 8 - 1], 8))), "short output");
        let (wv, xc) = (w.clone(), x.clone());
        assert!(run(Box::new(move || gemm(isa, &wv.view(), &xc, &mut vec![0.0; 3 * 8], 7))), "ldo < rows");
        let mut other = QuantizedActivations::default();
        other.quantize(&[1.0; 3 * 32], 3, 32);
        let wv = w.clone();
        assert!(run(Box::new(move || gemm(isa, &wv.view(), &other, &mut vec![0.0; 3 * 8], 8))), "inputs differ");
    }

    #[test]
    fn simd_activation_quantization_is_bit_exact() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for cols in [1usize, 7, 16, 31, 32, 33, 100, 172, 576] {
            let nb = cols.div_ceil(32);
            // Exact ties (k + 0.5 after scaling) are included: both paths must round them to even.
            let mut row: Vec<f32> = (0..cols).map(|_| rng.gen_range(-3.0..3.0)).collect();
            row[0] = 127.0;
            if cols > 2 {
                row[1] = 2.5;
                row[2] = -0.5;
            }
            let run = |f: QuantizeRowFn| {
                let (mut qs, mut d, mut sum, mut isum) =
                    (vec![0i8; nb * 32], vec![0.0; nb], vec![0.0; nb], vec![0; nb]);
                f(&row, &mut qs, &mut d, &mut sum, &mut isum);
                (qs, d, sum, isum)
            };
            let portable = run(crate::activation::quantize_row);
            if cols > 2 {
                assert_eq!((portable.0[1], portable.0[2]), (2, 0), "ties round to even");
            }
            assert_eq!(run(quantize_row_fn()), portable, "cols {cols}");
        }
    }

    #[test]
    fn every_isa_matches_scalar_on_odd_shapes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        // Odd row/token counts exercise every tile size; K spans ragged blocks, partial groups of 4 blocks and
        // partial chunks of 16 (nb = 17, 19, 32).
        let shapes = [
            (1, 32, 1),
            (3, 31, 2),
            (17, 172, 5),
            (64, 576, 1),
            (5, 100, 9),
            (2, 33, 3),
            (7, 530, 6),
            (6, 600, 4),
            (9, 1024, 7),
            (37, 96, 11),
            // Prefill-sized: the AVX-512 panels (16 rows, from 16 tokens), a partial panel and a ragged chunk.
            (33, 600, 17),
            (16, 256, 16),
            // The AVX-512 panels from 12 tokens (13, 15: a partial block of tokens after the 8s).
            (6, 288, 13),
            (5, 520, 15),
            // Grouped rows: whole groups only, a group and a tail, token counts around the grouped kernel's 8s.
            (48, 520, 3),
            (32, 288, 9),
            (16, 1024, 2),
            (35, 64, 8),
        ];
        for &(rows, cols, toks) in &shapes {
            let w: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let x: Vec<f32> = (0..toks * cols).map(|_| rng.gen_range(-2.0..2.0)).collect();
            let mut xq = QuantizedActivations::default();
            xq.quantize(&x, toks, cols);
            for (scheme, layout) in [Scheme::Q4, Scheme::Q4A, Scheme::Q4K, Scheme::Q6K, Scheme::Q8, Scheme::Q8A]
                .into_iter()
                .flat_map(|s| [(s, RowLayout::RowMajor), (s, RowLayout::Grouped)])
            {
                let mut q = quantize(&w, rows, cols, scheme);
                let plain = q.clone();
                q.set_layout(layout);
                assert_eq!(q.view().dequantize(), plain.view().dequantize(), "{scheme:?}: regrouped planes");
                let scheme = (scheme, layout);
                let ldo = rows + 3;
                let mut reference = vec![0.0; toks * ldo];
                gemm(Isa::Scalar, &plain.view(), &xq, &mut reference, ldo);
                // The scalar kernel itself against plain f32 math on the dequantized operands.
                let wd = q.view().dequantize();
                for t in 0..toks {
                    for r in 0..rows {
                        let mut exact = 0.0f64;
                        for k in 0..cols {
                            let nb = xq.nb();
                            let b = t * nb + k / 32;
                            let xv = xq.d[b] * xq.qs[t * nb * 32 + k] as f32;
                            exact += wd[r * cols + k] as f64 * xv as f64;
                        }
                        let got = reference[t * ldo + r] as f64;
                        assert!(
                            (got - exact).abs() <= 1e-3 * (1.0 + exact.abs()),
                            "{scheme:?} scalar {got} vs {exact}"
                        );
                    }
                }
                for isa in Isa::available() {
                    let mut out = vec![0.0; toks * ldo];
                    gemm(isa, &q.view(), &xq, &mut out, ldo);
                    // Activations packed in advance (the CPU backend's path) give the same result.
                    let mut prepared = xq.clone();
                    prepare(isa, &mut prepared);
                    let mut out2 = vec![0.0; toks * ldo];
                    gemm(isa, &q.view(), &prepared, &mut out2, ldo);
                    assert_eq!(out, out2, "{isa:?} {scheme:?}: prepared activations");
                    for (a, b) in out.iter().zip(&reference) {
                        assert!(
                            (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                            "{isa:?} {scheme:?} {rows}x{cols}x{toks}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
}
