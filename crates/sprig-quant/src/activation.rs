//! Activations quantized per row to int8 on the fly, in blocks of 32 aligned with the weight blocks, so the
//! kernels' inner loop is an integer dot product.

use crate::kernels::Isa;
use crate::scheme::{blocks_per_row, BLOCK};

/// `rows` activation vectors of `cols` features, each split in blocks of 32 (last block zero-padded).
/// Buffers are reused across calls: [`QuantizedActivations::quantize`] only allocates when it must grow.
#[derive(Clone, Debug, Default)]
///
/// The fields are private: [`QuantizedActivations::quantize`] keeps every plane exactly as long as `rows` and
/// `cols` imply, which the SIMD kernels' unchecked loads rely on.
pub struct QuantizedActivations {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    /// `rows * nb * 32` int8 codes.
    pub(crate) qs: Vec<i8>,
    /// Per-block scale `d` (`x ≈ d * q`).
    pub(crate) d: Vec<f32>,
    /// Per-block `d * sum(q)`, the term an asymmetric weight's min multiplies.
    pub(crate) sum: Vec<f32>,
    /// Per-block `sum(q)`, exact (kernels that offset codes correct for it in integer arithmetic).
    pub(crate) isum: Vec<i32>,
    /// The same codes repacked for a kernel that wants its own order (see [`crate::kernels::prepare`]).
    pub(crate) packed: Vec<u8>,
    /// The kernel `packed` was made for; quantizing again resets it.
    pub(crate) packed_for: Option<Isa>,
}

impl QuantizedActivations {
    /// Activation vectors (tokens).
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Features per vector.
    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn nb(&self) -> usize {
        blocks_per_row(self.cols)
    }

    /// Quantizes `x` (`rows * cols` f32, row-major) into `self`; rows are split across the current rayon pool
    /// when there are enough of them (prefill), and use AVX-512 when the CPU has it (bit-identical results).
    pub fn quantize(&mut self, x: &[f32], rows: usize, cols: usize) {
        use rayon::prelude::*;
        assert_eq!(x.len(), rows * cols, "activation size");
        let nb = blocks_per_row(cols);
        self.rows = rows;
        self.cols = cols;
        self.packed_for = None;
        self.qs.resize(rows * nb * BLOCK, 0);
        self.d.resize(rows * nb, 0.0);
        self.sum.resize(rows * nb, 0.0);
        self.isum.resize(rows * nb, 0);
        if rows == 0 || cols == 0 {
            return;
        }
        let simd = crate::kernels::quantize_row_fn();
        let job = |(((row, qs), d), (sum, isum)): RowJob<'_>| simd(row, qs, d, sum, isum);
        let parts = x
            .chunks_exact(cols)
            .zip(self.qs.chunks_exact_mut(nb * BLOCK))
            .zip(self.d.chunks_exact_mut(nb))
            .zip(self.sum.chunks_exact_mut(nb).zip(self.isum.chunks_exact_mut(nb)));
        if rows >= 8 && rayon::current_num_threads() > 1 {
            parts.par_bridge().for_each(job);
        } else {
            parts.for_each(job);
        }
    }

    /// The packing of these activations for `isa`'s kernel, if [`crate::kernels::prepare`] made one.
    pub fn packed_for(&self, isa: Isa) -> Option<&[u8]> {
        (self.packed_for == Some(isa)).then_some(&self.packed[..])
    }

    pub fn row_qs(&self, r: usize) -> &[i8] {
        let n = self.nb() * BLOCK;
        &self.qs[r * n..(r + 1) * n]
    }
    pub fn row_d(&self, r: usize) -> &[f32] {
        let nb = self.nb();
        &self.d[r * nb..(r + 1) * nb]
    }
    pub fn row_sum(&self, r: usize) -> &[f32] {
        let nb = self.nb();
        &self.sum[r * nb..(r + 1) * nb]
    }
    pub fn row_isum(&self, r: usize) -> &[i32] {
        let nb = self.nb();
        &self.isum[r * nb..(r + 1) * nb]
    }
}

/// One row's input and output slices, as zipped by [`QuantizedActivations::quantize`].
type RowJob<'a> = (((&'a [f32], &'a mut [i8]), &'a mut [f32]), (&'a mut [f32], &'a mut [i32]));

/// Portable quantization of one row: per block `d = amax / 127`, codes rounded half to even (as the SIMD
/// conversions do, so every path gives the same bits).
pub fn quantize_row(row: &[f32], qs: &mut [i8], d: &mut [f32], sum: &mut [f32], isum: &mut [i32]) {
    let cols = row.len();
    for b in 0..d.len() {
        let src = &row[b * BLOCK..((b + 1) * BLOCK).min(cols)];
        let dst = &mut qs[b * BLOCK..(b + 1) * BLOCK];
        let amax = src.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let db = amax / 127.0;
        let id = if db > 0.0 { 1.0 / db } else { 0.0 };
        let mut s = 0i32;
        for (j, q) in dst.iter_mut().enumerate() {
            let v = src.get(j).copied().unwrap_or(0.0);
            *q = (v * id).round_ties_even() as i8;
            s += *q as i32;
        }
        d[b] = db;
        sum[b] = db * s as f32;
        isum[b] = s;
    }
}
