//! Native quantized-weight layout.
//!
//! A quantized matrix `W[rows, cols]` (rows = output features, cols = input features `K`) is split along `K`
//! into groups of [`BLOCK`] = 32 weights. `K` need not be a multiple of 32: the last group of each row is
//! zero-padded ("ragged"), so a row always holds `nb = ceil(K/32)` blocks.
//!
//! It is stored as up to three planes, each row-major and each its own tensor in the container, so the
//! SIMD kernels make aligned 16/32-byte loads and the scales are plain f16 arrays any tool can read:
//!
//! | plane   | dtype | shape           | content                                                          |
//! |---------|-------|-----------------|------------------------------------------------------------------|
//! | `qs`    | u8    | `[rows, nb*16]` | int4: byte `j` of a block holds weight `j` (low nibble) and `j+16` (high nibble), unsigned 0..15 |
//! |         | i8    | `[rows, nb*32]` | int8: one signed byte per weight                                  |
//! | `scale` | f16   | `[rows, nb]`    | `d`, one per block                                                |
//! | `min`   | f16   | `[rows, nb]`    | asymmetric schemes only: `m`, one per block                       |
//!
//! Decoding: `Q4` (symmetric) `w = d * (q - 8)`; `Q4A` (asymmetric) `w = d * q + m`; `Q8` `w = d * q`;
//! `Q8A` `w = d * q + m`. These are bit-exact with GGUF `Q4_0`, `Q4_1`, `Q8_0` (and carry `Q5_0`, `Q5_1`
//! without loss in the int8 forms), so those import with no requantization.
//!
//! Bits per weight: Q4 4.5, Q4A 5.0, Q8 8.5, Q8A 9.0.
//!
//! The kernels treat every scheme as `w = d * q + m` with `m = -8 d` for Q4 and `m = 0` for Q8, so one
//! integer dot product `sum(q_w * q_x)` per block plus a precomputed activation block sum covers all four.

use half::f16;

/// Weights per quantization group, along the input dimension.
pub const BLOCK: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// int4 symmetric, f16 scale.
    Q4,
    /// int4 asymmetric, f16 scale and f16 min.
    Q4A,
    /// int8 symmetric, f16 scale.
    Q8,
    /// int8 with an f16 min (carries GGUF Q5_1 exactly).
    Q8A,
}

impl Scheme {
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Q4 => "q4",
            Scheme::Q4A => "q4a",
            Scheme::Q8 => "q8",
            Scheme::Q8A => "q8a",
        }
    }
    pub fn from_name(s: &str) -> Option<Self> {
        Some(match s {
            "q4" => Scheme::Q4,
            "q4a" => Scheme::Q4A,
            "q8" => Scheme::Q8,
            "q8a" => Scheme::Q8A,
            _ => return None,
        })
    }
    /// Bytes of `qs` per block.
    pub fn qs_bytes_per_block(self) -> usize {
        match self {
            Scheme::Q4 | Scheme::Q4A => BLOCK / 2,
            Scheme::Q8 | Scheme::Q8A => BLOCK,
        }
    }
    pub fn has_min(self) -> bool {
        matches!(self, Scheme::Q4A | Scheme::Q8A)
    }
    pub fn is_int4(self) -> bool {
        matches!(self, Scheme::Q4 | Scheme::Q4A)
    }
    /// Storage bits per weight (for a K that is a multiple of the block).
    pub fn bits_per_weight(self) -> f64 {
        let bytes = self.qs_bytes_per_block() + 2 + if self.has_min() { 2 } else { 0 };
        bytes as f64 * 8.0 / BLOCK as f64
    }
}

/// Number of blocks per row for `cols` input features.
pub fn blocks_per_row(cols: usize) -> usize {
    cols.div_ceil(BLOCK)
}

/// A borrowed quantized matrix (usually pointing into the memory-mapped model file).
///
/// The fields are private so that every `QMatrix` has planes of exactly the sizes its shape implies (checked by
/// [`QMatrix::new`]): the SIMD kernels rely on that for their unchecked loads.
#[derive(Clone, Copy, Debug)]
pub struct QMatrix<'a> {
    pub(crate) scheme: Scheme,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) qs: &'a [u8],
    pub(crate) scales: &'a [f16],
    pub(crate) mins: Option<&'a [f16]>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LayoutError {
    #[error("plane `{plane}` has {got} elements, expected {expected} for a {rows}x{cols} {scheme} matrix")]
    PlaneSize { plane: &'static str, got: usize, expected: usize, rows: usize, cols: usize, scheme: &'static str },
    #[error("scheme {0} needs a `min` plane")]
    MissingMin(&'static str),
    #[error("scheme {0} takes no `min` plane")]
    UnexpectedMin(&'static str),
    #[error("non-finite scale or min in block {block} of row {row}")]
    NonFinite { row: usize, block: usize },
}

impl<'a> QMatrix<'a> {
    /// A matrix over the given planes; an error unless each plane has exactly the size the shape implies and
    /// the scheme's min plane is present or absent as it must be.
    pub fn new(
        scheme: Scheme,
        rows: usize,
        cols: usize,
        qs: &'a [u8],
        scales: &'a [f16],
        mins: Option<&'a [f16]>,
    ) -> Result<Self, LayoutError> {
        let m = QMatrix { scheme, rows, cols, qs, scales, mins };
        m.check_planes()?;
        Ok(m)
    }

    pub fn scheme(&self) -> Scheme {
        self.scheme
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Codes: `rows * nb * scheme.qs_bytes_per_block()` bytes.
    pub fn qs(&self) -> &'a [u8] {
        self.qs
    }
    /// One f16 scale per block: `rows * nb`.
    pub fn scales(&self) -> &'a [f16] {
        self.scales
    }
    /// One f16 min per block (asymmetric schemes).
    pub fn mins(&self) -> Option<&'a [f16]> {
        self.mins
    }

    pub fn nb(&self) -> usize {
        blocks_per_row(self.cols)
    }

    fn check_planes(&self) -> Result<(), LayoutError> {
        let nb = self.nb();
        let s = self.scheme.name();
        let size = |n: usize| n.checked_mul(nb).and_then(|v| v.checked_mul(self.scheme.qs_bytes_per_block()));
        let check = |plane, got, expected: Option<usize>| match expected {
            Some(e) if e == got => Ok(()),
            e => Err(LayoutError::PlaneSize {
                plane,
                got,
                expected: e.unwrap_or(usize::MAX),
                rows: self.rows,
                cols: self.cols,
                scheme: s,
            }),
        };
        check("qs", self.qs.len(), size(self.rows))?;
        check("scale", self.scales.len(), self.rows.checked_mul(nb))?;
        match (self.scheme.has_min(), self.mins) {
            (true, None) => Err(LayoutError::MissingMin(s)),
            (false, Some(_)) => Err(LayoutError::UnexpectedMin(s)),
            (true, Some(m)) => check("min", m.len(), self.rows.checked_mul(nb)),
            _ => Ok(()),
        }
    }

    /// Checks that the planes have exactly the sizes the shape implies and that every scale/min is finite.
    pub fn validate(&self) -> Result<(), LayoutError> {
        self.check_planes()?;
        let nb = self.nb();
        let bad = |i: usize| LayoutError::NonFinite { row: i / nb.max(1), block: i % nb.max(1) };
        if let Some(i) = self.scales.iter().position(|d| !d.is_finite()) {
            return Err(bad(i));
        }
        if let Some(i) = self.mins.and_then(|m| m.iter().position(|d| !d.is_finite())) {
            return Err(bad(i));
        }
        Ok(())
    }

    /// Row `r` as a borrowed single-row matrix.
    pub fn row(&self, r: usize) -> QMatrix<'a> {
        self.rows_range(r, r + 1)
    }

    /// Rows `start..end` (panics when out of range, like slicing).
    pub fn rows_range(&self, start: usize, end: usize) -> QMatrix<'a> {
        assert!(start <= end && end <= self.rows, "rows {start}..{end} of {}", self.rows);
        let nb = self.nb();
        let qb = nb * self.scheme.qs_bytes_per_block();
        QMatrix {
            scheme: self.scheme,
            rows: end - start,
            cols: self.cols,
            qs: &self.qs[start * qb..end * qb],
            scales: &self.scales[start * nb..end * nb],
            mins: self.mins.map(|m| &m[start * nb..end * nb]),
        }
    }

    /// Effective min of block `i` (flat index) in the `w = d*q + m` form the kernels use.
    #[inline]
    pub fn eff_min(&self, i: usize) -> f32 {
        match self.scheme {
            Scheme::Q4 => -8.0 * self.scales[i].to_f32(),
            Scheme::Q8 => 0.0,
            Scheme::Q4A | Scheme::Q8A => self.mins.map_or(0.0, |m| m[i].to_f32()),
        }
    }

    /// Unsigned/signed integer code of weight `k` in row `r` as used by `w = d*q + m`.
    #[inline]
    pub fn code(&self, r: usize, k: usize) -> i32 {
        let nb = self.nb();
        let (b, j) = (k / BLOCK, k % BLOCK);
        match self.scheme {
            Scheme::Q4 | Scheme::Q4A => {
                let byte = self.qs[(r * nb + b) * 16 + (j % 16)];
                (if j < 16 { byte & 0x0f } else { byte >> 4 }) as i32
            }
            Scheme::Q8 | Scheme::Q8A => self.qs[(r * nb + b) * 32 + j] as i8 as i32,
        }
    }

    /// Dequantizes row `r` into `out` (`out.len() == cols`).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let nb = self.nb();
        for (k, o) in out.iter_mut().enumerate().take(self.cols) {
            let i = r * nb + k / BLOCK;
            *o = self.scales[i].to_f32() * self.code(r, k) as f32 + self.eff_min(i);
        }
    }

    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        for r in 0..self.rows {
            self.dequantize_row(r, &mut out[r * self.cols..(r + 1) * self.cols]);
        }
        out
    }
}

/// Owned planes of a quantized matrix (what the quantizer and importers produce).
#[derive(Clone, Debug, Default)]
pub struct QMatrixOwned {
    pub scheme: Option<Scheme>,
    pub rows: usize,
    pub cols: usize,
    pub qs: Vec<u8>,
    pub scales: Vec<f16>,
    pub mins: Option<Vec<f16>>,
}

impl QMatrixOwned {
    pub fn new(scheme: Scheme, rows: usize, cols: usize) -> Self {
        let nb = blocks_per_row(cols);
        QMatrixOwned {
            scheme: Some(scheme),
            rows,
            cols,
            qs: vec![0; rows * nb * scheme.qs_bytes_per_block()],
            scales: vec![f16::ZERO; rows * nb],
            mins: scheme.has_min().then(|| vec![f16::ZERO; rows * nb]),
        }
    }
    pub fn view(&self) -> QMatrix<'_> {
        QMatrix {
            scheme: self.scheme.expect("scheme set"),
            rows: self.rows,
            cols: self.cols,
            qs: &self.qs,
            scales: &self.scales,
            mins: self.mins.as_deref(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrices_only_exist_with_planes_their_shape_implies() {
        let (rows, cols) = (4, 70); // 3 blocks per row, the last one ragged
        let nb = blocks_per_row(cols);
        let qs = vec![0u8; rows * nb * 16];
        let sc = vec![f16::ONE; rows * nb];
        assert!(QMatrix::new(Scheme::Q4, rows, cols, &qs, &sc, None).is_ok());
        // One byte, one scale short, a min plane too short or missing, or an absurd shape: errors, so no kernel
        // ever loads past a plane.
        assert!(QMatrix::new(Scheme::Q4, rows, cols, &qs[1..], &sc, None).is_err());
        assert!(QMatrix::new(Scheme::Q4, rows, cols, &qs, &sc[1..], None).is_err());
        assert!(QMatrix::new(Scheme::Q4A, rows, cols, &qs, &sc, None).is_err());
        assert!(QMatrix::new(Scheme::Q4A, rows, cols, &qs, &sc, Some(&sc[2..])).is_err());
        assert!(QMatrix::new(Scheme::Q4, rows + 1, cols, &qs, &sc, None).is_err());
        assert!(QMatrix::new(Scheme::Q8, usize::MAX / 2, cols, &qs, &sc, None).is_err());
        assert!(QMatrix::new(Scheme::Q4, rows, cols, &qs, &sc, Some(&sc)).is_err());
    }
}
