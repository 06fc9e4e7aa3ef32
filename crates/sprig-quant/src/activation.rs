//! Activations quantized per row to int8 on the fly, in blocks of 32 aligned with the weight blocks, so the
//! kernels' inner loop is an integer dot product.

use crate::scheme::{blocks_per_row, BLOCK};

/// `rows` activation vectors of `cols` features, each split in blocks of 32 (last block zero-padded).
/// Buffers are reused across calls: [`QuantizedActivations::quantize`] only allocates when it must grow.
#[derive(Clone, Debug, Default)]
pub struct QuantizedActivations {
    pub rows: usize,
    pub cols: usize,
    /// `rows * nb * 32` int8 codes.
    pub qs: Vec<i8>,
    /// Per-block scale `d` (`x ≈ d * q`).
    pub d: Vec<f32>,
    /// Per-block `d * sum(q)`, the term an asymmetric weight's min multiplies.
    pub sum: Vec<f32>,
}

impl QuantizedActivations {
    pub fn nb(&self) -> usize {
        blocks_per_row(self.cols)
    }

    /// Quantizes `x` (`rows * cols` f32, row-major) into `self`.
    pub fn quantize(&mut self, x: &[f32], rows: usize, cols: usize) {
        assert_eq!(x.len(), rows * cols, "activation size");
        let nb = blocks_per_row(cols);
        self.rows = rows;
        self.cols = cols;
        self.qs.resize(rows * nb * BLOCK, 0);
        self.d.resize(rows * nb, 0.0);
        self.sum.resize(rows * nb, 0.0);
        for r in 0..rows {
            let row = &x[r * cols..(r + 1) * cols];
            for b in 0..nb {
                let src = &row[b * BLOCK..((b + 1) * BLOCK).min(cols)];
                let dst = &mut self.qs[(r * nb + b) * BLOCK..(r * nb + b + 1) * BLOCK];
                let amax = src.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                let mut isum = 0i32;
                for (j, q) in dst.iter_mut().enumerate() {
                    let v = src.get(j).copied().unwrap_or(0.0);
                    *q = (v * id).round() as i8;
                    isum += *q as i32;
                }
                self.d[r * nb + b] = d;
                self.sum[r * nb + b] = d * isum as f32;
            }
        }
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
}
