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
//! `Q4K` carries GGUF `Q4_K` without loss at its 4.5 bits per weight: `qs` as Q4A, and the block scales as
//! Q4_K stores them, multiples of a per-superblock ([`SUPER`] = 8 blocks, 256 weights) f16 super-scale:
//!
//! | plane   | dtype | shape            | content                                                         |
//! |---------|-------|------------------|-----------------------------------------------------------------|
//! | `scale` | f16   | `[rows, nsb]`    | `d`, one per superblock (`nsb = ceil(nb/8)`)                     |
//! | `min`   | f16   | `[rows, nsb]`    | `dmin`, one per superblock                                       |
//! | `sub`   | u8    | `[rows, nsb*12]` | 6-bit `sc[j]`, then 6-bit `m[j]`, j = 0..8, as one little-endian bit string: value i at bits 6i..6i+6 |
//!
//! Block `j` of a superblock decodes as `w = (d·sc[j])·q − dmin·m[j]`; both products are exact in f32.
//!
//! `Q6K` carries GGUF `Q6_K` without loss at its 6.5625 bits per weight: 6-bit codes with a signed 8-bit scale
//! per 16 weights (each block's two halves) under an f16 super-scale per superblock, `w = (d·sc[h])·(q − 32)`:
//!
//! | plane   | dtype | shape           | content                                                          |
//! |---------|-------|-----------------|------------------------------------------------------------------|
//! | `qs`    | u8    | `[rows, nb*24]` | per row: the low 4 bits of every block as the int4 plane (`nb*16` bytes), then the high 2 bits (`nb*8` bytes; byte `i` of a block holds weights `i`, `i+8`, `i+16`, `i+24` at bits 0, 2, 4, 6) |
//! | `scale` | f16   | `[rows, nsb]`   | `d`, one per superblock                                           |
//! | `sub`   | i8    | `[rows, nb*2]`  | `sc` of each block's weights 0..16, then of 16..32                |
//!
//! **Rows in groups of 16** ([`RowLayout::Grouped`], what `sprig convert` writes): the first `16·⌊rows/16⌋`
//! rows of every plane are stored in groups of [`ROW_GROUP`] = 16 rows, each group's units interleaved row
//! fastest — unit `i` of row `r` at unit index `16·per_row·⌊r/16⌋ + 16·i + r mod 16` — and the remaining
//! `rows mod 16` rows row-major after them. A unit is 4 bytes of `qs` (and of the Q4K `sub` plane), one f16 of
//! `scale` / `min`, the two sub-scales of a block for Q6K. The planes keep their sizes; a kernel then loads one
//! vector of 16 rows' codes (or scales) of the same block at once, so one token's product over 16 rows needs
//! no horizontal sums and a few-token product reuses every unpacked code across its tokens, read straight
//! from the mapped file.
//!
//! The kernels treat every scheme as `w = d * q + m` with `m = -8 d` for Q4 and `m = 0` for Q8, so one
//! integer dot product `sum(q_w * q_x)` per block plus a precomputed activation block sum covers all four.

use half::f16;

/// Weights per quantization group, along the input dimension.
pub const BLOCK: usize = 32;
/// Blocks per superblock of the K-quant scheme ([`Scheme::Q4K`]).
pub const SUPER: usize = 8;
/// Bytes of packed 6-bit sub-scales and sub-mins per [`Scheme::Q4K`] superblock.
pub const K4_SUB_BYTES: usize = 12;
/// Rows per group of the [`RowLayout::Grouped`] layout: one per 32-bit lane of a 512-bit register.
pub const ROW_GROUP: usize = 16;

/// How the rows of a quantized matrix's planes are ordered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RowLayout {
    /// Each plane row-major.
    #[default]
    RowMajor,
    /// Groups of [`ROW_GROUP`] rows with their units interleaved, the last `rows mod 16` rows row-major (see the
    /// module docs).
    Grouped,
}

impl RowLayout {
    pub fn name(self) -> &'static str {
        match self {
            RowLayout::RowMajor => "rows",
            RowLayout::Grouped => "rows16",
        }
    }
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "rows" => Some(RowLayout::RowMajor),
            "rows16" => Some(RowLayout::Grouped),
            _ => None,
        }
    }
}

/// Which plane a unit index is for: its unit size in bytes for `scheme`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plane {
    Qs,
    /// `scale` and `min`.
    Scale,
    Sub,
}

impl Plane {
    /// Bytes per interleaved unit of this plane.
    pub fn unit_bytes(self, scheme: Scheme) -> usize {
        match (self, scheme) {
            (Plane::Qs, _) => 4,
            (Plane::Scale, _) => 2,
            (Plane::Sub, Scheme::Q6K) => 2,
            (Plane::Sub, _) => 4,
        }
    }
}

/// Reorders a plane of `rows` equal rows between [`RowLayout::RowMajor`] and [`RowLayout::Grouped`] with
/// units of `unit` elements (`to_grouped`: row-major in, grouped out) into `out` (reused: no allocation once
/// grown).
pub fn regroup_into<T: Copy>(plane: &[T], rows: usize, unit: usize, to_grouped: bool, out: &mut Vec<T>) {
    out.clear();
    out.extend_from_slice(plane);
    if rows == 0 {
        return;
    }
    let row_len = plane.len() / rows;
    assert!(row_len * rows == plane.len() && row_len.is_multiple_of(unit), "plane rows are whole units");
    let per_row = row_len / unit;
    for g in 0..rows / ROW_GROUP {
        let base = g * ROW_GROUP * row_len;
        for r in 0..ROW_GROUP {
            for i in 0..per_row {
                let plain = base + r * row_len + i * unit;
                let grouped = base + (i * ROW_GROUP + r) * unit;
                let (from, to) = if to_grouped { (plain, grouped) } else { (grouped, plain) };
                out[to..to + unit].copy_from_slice(&plane[from..from + unit]);
            }
        }
    }
}

/// [`regroup_into`] into a new plane.
pub fn regroup_plane<T: Copy>(plane: &[T], rows: usize, unit: usize, to_grouped: bool) -> Vec<T> {
    let mut out = Vec::new();
    regroup_into(plane, rows, unit, to_grouped, &mut out);
    out
}

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
    /// int4 asymmetric with 6-bit block scales and mins under f16 superblock scales (carries GGUF Q4_K exactly).
    Q4K,
    /// 6-bit codes with int8 scales per 16 weights under f16 superblock scales (carries GGUF Q6_K exactly).
    Q6K,
}

impl Scheme {
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Q4 => "q4",
            Scheme::Q4A => "q4a",
            Scheme::Q8 => "q8",
            Scheme::Q8A => "q8a",
            Scheme::Q4K => "q4k",
            Scheme::Q6K => "q6k",
        }
    }
    pub fn from_name(s: &str) -> Option<Self> {
        Some(match s {
            "q4" => Scheme::Q4,
            "q4a" => Scheme::Q4A,
            "q8" => Scheme::Q8,
            "q8a" => Scheme::Q8A,
            "q4k" => Scheme::Q4K,
            "q6k" => Scheme::Q6K,
            _ => return None,
        })
    }
    /// Bytes of `qs` per block.
    pub fn qs_bytes_per_block(self) -> usize {
        match self {
            Scheme::Q4 | Scheme::Q4A | Scheme::Q4K => BLOCK / 2,
            Scheme::Q8 | Scheme::Q8A => BLOCK,
            Scheme::Q6K => 24,
        }
    }
    pub fn has_min(self) -> bool {
        matches!(self, Scheme::Q4A | Scheme::Q8A | Scheme::Q4K)
    }
    pub fn is_int4(self) -> bool {
        matches!(self, Scheme::Q4 | Scheme::Q4A | Scheme::Q4K)
    }
    /// Entries per row of the `scale` (and `min`) plane for `nb` blocks per row: one per block, or one per
    /// superblock for [`Scheme::Q4K`].
    pub fn scales_per_row(self, nb: usize) -> usize {
        match self {
            Scheme::Q4K | Scheme::Q6K => nb.div_ceil(SUPER),
            _ => nb,
        }
    }
    /// Bytes per row of the `sub` plane (sub-scales of the K-quant schemes; none for the others).
    pub fn sub_bytes_per_row(self, nb: usize) -> usize {
        match self {
            Scheme::Q4K => nb.div_ceil(SUPER) * K4_SUB_BYTES,
            Scheme::Q6K => nb * 2,
            _ => 0,
        }
    }
    /// Whether the code plane holds signed bytes (int8 schemes) rather than packed unsigned codes.
    pub fn signed_codes(self) -> bool {
        matches!(self, Scheme::Q8 | Scheme::Q8A)
    }
    /// Storage bits per weight (for a K that is a multiple of the superblock).
    pub fn bits_per_weight(self) -> f64 {
        let nb = SUPER;
        let scale_planes = if self.has_min() { 2 } else { 1 };
        let bytes =
            nb * self.qs_bytes_per_block() + 2 * scale_planes * self.scales_per_row(nb) + self.sub_bytes_per_row(nb);
        bytes as f64 * 8.0 / (nb * BLOCK) as f64
    }
}

/// Sub-scale `sc[j]` and sub-min `m[j]` (j < 8) of one [`Scheme::Q4K`] superblock's packed `sub` bytes.
#[inline]
pub fn k4_sub(sub: &[u8], j: usize) -> (u8, u8) {
    let bits = u128::from_le_bytes(std::array::from_fn(|i| sub.get(i).copied().unwrap_or(0)));
    let at = |i: usize| ((bits >> (6 * i)) & 63) as u8;
    (at(j), at(SUPER + j))
}

/// Packs one block's 6-bit codes (0..63) into [`Scheme::Q6K`]'s row planes: `low` (16 bytes, the int4 layout)
/// and `high` (8 bytes: byte `i` holds the top two bits of codes `i`, `i+8`, `i+16`, `i+24`).
pub fn q6k_pack_block(codes: &[u8; BLOCK], low: &mut [u8], high: &mut [u8]) {
    for j in 0..BLOCK / 2 {
        low[j] = (codes[j] & 0x0f) | (codes[j + BLOCK / 2] & 0x0f) << 4;
    }
    for (i, h) in high[..8].iter_mut().enumerate() {
        *h = (0..4).fold(0, |acc, k| acc | ((codes[i + 8 * k] >> 4) & 3) << (2 * k));
    }
}

/// Packs one superblock's 6-bit sub-scales and sub-mins (each < 64) into its [`K4_SUB_BYTES`] `sub` bytes.
pub fn k4_pack_sub(sc: &[u8; SUPER], m: &[u8; SUPER]) -> [u8; K4_SUB_BYTES] {
    let mut bits = 0u128;
    for j in 0..SUPER {
        debug_assert!(sc[j] < 64 && m[j] < 64, "6-bit sub-scales");
        bits |= ((sc[j] & 63) as u128) << (6 * j) | ((m[j] & 63) as u128) << (6 * (SUPER + j));
    }
    bits.to_le_bytes()[..K4_SUB_BYTES].try_into().unwrap()
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
    /// Packed sub-scales ([`Scheme::Q4K`] only).
    pub(crate) sub: Option<&'a [u8]>,
    pub(crate) layout: RowLayout,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LayoutError {
    #[error("plane `{plane}` has {got} elements, expected {expected} for a {rows}x{cols} {scheme} matrix")]
    PlaneSize { plane: &'static str, got: usize, expected: usize, rows: usize, cols: usize, scheme: &'static str },
    #[error("scheme {0} needs a `min` plane")]
    MissingMin(&'static str),
    #[error("scheme {0} takes no `min` plane")]
    UnexpectedMin(&'static str),
    #[error("scheme {0} needs a `sub` plane")]
    MissingSub(&'static str),
    #[error("scheme {0} takes no `sub` plane")]
    UnexpectedSub(&'static str),
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
        sub: Option<&'a [u8]>,
    ) -> Result<Self, LayoutError> {
        let m = QMatrix { scheme, rows, cols, qs, scales, mins, sub, layout: RowLayout::RowMajor };
        m.check_planes()?;
        Ok(m)
    }

    /// The same planes read in `layout` (sizes do not depend on it).
    pub fn with_layout(self, layout: RowLayout) -> Self {
        QMatrix { layout, ..self }
    }

    pub fn layout(&self) -> RowLayout {
        self.layout
    }

    /// Rows stored in interleaved groups (`16·⌊rows/16⌋` in the grouped layout, else none).
    pub fn grouped_rows(&self) -> usize {
        match self.layout {
            RowLayout::Grouped => self.rows / ROW_GROUP * ROW_GROUP,
            RowLayout::RowMajor => 0,
        }
    }

    /// Index, in units, of unit `i` of row `r` in a plane of `per_row` units per row.
    #[inline]
    pub fn unit_index(&self, r: usize, i: usize, per_row: usize) -> usize {
        if r < self.grouped_rows() {
            (r / ROW_GROUP * per_row + i) * ROW_GROUP + r % ROW_GROUP
        } else {
            r * per_row + i
        }
    }

    /// The row and unit that unit index `i` holds in a plane of `per_row` units per row (inverse of
    /// [`QMatrix::unit_index`]).
    pub fn unit_position(&self, i: usize, per_row: usize) -> (usize, usize) {
        let grouped = self.grouped_rows() * per_row;
        if i < grouped {
            let (g, within) = (i / (ROW_GROUP * per_row), i % (ROW_GROUP * per_row));
            (g * ROW_GROUP + within % ROW_GROUP, within / ROW_GROUP)
        } else {
            (i / per_row, i % per_row)
        }
    }

    /// Byte `j` of row `r`'s code plane (as it would lie in a row-major plane).
    #[inline]
    pub fn qs_byte(&self, r: usize, j: usize) -> u8 {
        let per_row = self.nb() * self.scheme.qs_bytes_per_block() / 4;
        self.qs[self.unit_index(r, j / 4, per_row) * 4 + j % 4]
    }

    /// Row `r`'s 12 packed sub-scale bytes of superblock `s` ([`Scheme::Q4K`]).
    #[inline]
    fn k4_sub_bytes(&self, r: usize, s: usize) -> [u8; K4_SUB_BYTES] {
        let sub = self.sub.expect("validated: q4k has a sub plane");
        let per_row = self.scheme.sub_bytes_per_row(self.nb()) / 4;
        std::array::from_fn(|k| sub[self.unit_index(r, s * 3 + k / 4, per_row) * 4 + k % 4])
    }

    /// A row-major copy of these planes.
    pub fn to_owned_row_major(&self) -> QMatrixOwned {
        let mut o = QMatrixOwned {
            scheme: Some(self.scheme),
            rows: self.rows,
            cols: self.cols,
            qs: self.qs.to_vec(),
            scales: self.scales.to_vec(),
            mins: self.mins.map(|m| m.to_vec()),
            sub: self.sub.map(|s| s.to_vec()),
            layout: self.layout,
        };
        o.set_layout(RowLayout::RowMajor);
        o
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
    /// One f16 scale per block: `rows * nb` (per superblock for [`Scheme::Q4K`]: `rows * nsb`).
    pub fn scales(&self) -> &'a [f16] {
        self.scales
    }
    /// One f16 min per block (asymmetric schemes; per superblock for [`Scheme::Q4K`]).
    pub fn mins(&self) -> Option<&'a [f16]> {
        self.mins
    }
    /// Packed sub-scales ([`Scheme::Q4K`]): `rows * nsb * 12` bytes.
    pub fn sub(&self) -> Option<&'a [u8]> {
        self.sub
    }
    /// Bytes of every plane together (what one pass over the matrix reads).
    pub fn bytes(&self) -> usize {
        self.qs.len() + 2 * (self.scales.len() + self.mins.map_or(0, |m| m.len())) + self.sub.map_or(0, |s| s.len())
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
        let nsc = self.rows.checked_mul(self.scheme.scales_per_row(nb));
        check("scale", self.scales.len(), nsc)?;
        match (self.scheme.has_min(), self.mins) {
            (true, None) => return Err(LayoutError::MissingMin(s)),
            (false, Some(_)) => return Err(LayoutError::UnexpectedMin(s)),
            (true, Some(m)) => check("min", m.len(), nsc)?,
            _ => {}
        }
        match (self.scheme.sub_bytes_per_row(nb) > 0, self.sub) {
            (true, None) => Err(LayoutError::MissingSub(s)),
            (false, Some(_)) => Err(LayoutError::UnexpectedSub(s)),
            (true, Some(b)) => check("sub", b.len(), self.rows.checked_mul(self.scheme.sub_bytes_per_row(nb))),
            _ => Ok(()),
        }
    }

    /// Checks that the planes have exactly the sizes the shape implies and that every scale/min is finite.
    pub fn validate(&self) -> Result<(), LayoutError> {
        self.check_planes()?;
        let nb = self.nb();
        // Index i of a scale plane: row and first block it scales.
        let per_row = self.scheme.scales_per_row(nb).max(1);
        let per_entry = if matches!(self.scheme, Scheme::Q4K | Scheme::Q6K) { SUPER } else { 1 };
        let bad = |i: usize| {
            let (row, unit) = self.unit_position(i, per_row);
            LayoutError::NonFinite { row, block: unit * per_entry }
        };
        if let Some(i) = self.scales.iter().position(|d| !d.is_finite()) {
            return Err(bad(i));
        }
        if let Some(i) = self.mins.and_then(|m| m.iter().position(|d| !d.is_finite())) {
            return Err(bad(i));
        }
        Ok(())
    }

    /// Rows `start..end` (panics when out of range, like slicing). In the grouped layout a range must not cut
    /// a group: `start` a multiple of 16 (or inside the row-major tail), `end` a multiple of 16 or `rows`.
    pub fn rows_range(&self, start: usize, end: usize) -> QMatrix<'a> {
        assert!(start <= end && end <= self.rows, "rows {start}..{end} of {}", self.rows);
        let g = self.grouped_rows();
        let layout = if start >= g {
            RowLayout::RowMajor
        } else {
            assert!(
                start.is_multiple_of(ROW_GROUP) && (end.is_multiple_of(ROW_GROUP) || end == self.rows),
                "rows {start}..{end} cut a group of {ROW_GROUP} interleaved rows"
            );
            self.layout
        };
        let nb = self.nb();
        let qb = nb * self.scheme.qs_bytes_per_block();
        let ns = self.scheme.scales_per_row(nb);
        let nsub = self.scheme.sub_bytes_per_row(nb);
        QMatrix {
            scheme: self.scheme,
            rows: end - start,
            cols: self.cols,
            qs: &self.qs[start * qb..end * qb],
            scales: &self.scales[start * ns..end * ns],
            mins: self.mins.map(|m| &m[start * ns..end * ns]),
            sub: self.sub.map(|b| &b[start * nsub..end * nsub]),
            layout,
        }
    }

    /// Scale `d` and effective min `m` of block `b` of row `r` in the `w = d*q + m` form the kernels use
    /// (int4's −8 folded into `m`). For [`Scheme::Q6K`] `d` is the superblock's scale, by which the block's
    /// integer sum with its sub-scales applied (`sc[0]·Σ₀..₁₆ + sc[1]·Σ₁₆..₃₂` of `(q − 32)·x`) is multiplied.
    #[inline]
    pub fn block_scale(&self, r: usize, b: usize) -> (f32, f32) {
        let nb = self.nb();
        let i = self.unit_index(r, b, nb);
        match self.scheme {
            Scheme::Q4 => {
                let d = self.scales[i].to_f32();
                (d, -8.0 * d)
            }
            Scheme::Q8 => (self.scales[i].to_f32(), 0.0),
            Scheme::Q4A | Scheme::Q8A => (self.scales[i].to_f32(), self.mins.map_or(0.0, |m| m[i].to_f32())),
            Scheme::Q4K => {
                let s = self.unit_index(r, b / SUPER, self.scheme.scales_per_row(nb));
                let (sc, m) = k4_sub(&self.k4_sub_bytes(r, b / SUPER), b % SUPER);
                let dmin = self.mins.expect("validated: q4k has a min plane")[s].to_f32();
                (self.scales[s].to_f32() * sc as f32, -(dmin * m as f32))
            }
            Scheme::Q6K => (self.scales[self.unit_index(r, b / SUPER, self.scheme.scales_per_row(nb))].to_f32(), 0.0),
        }
    }

    /// [`Scheme::Q6K`]: the signed sub-scales of block `b` of row `r`'s weights 0..16 and 16..32.
    #[inline]
    pub fn q6k_sub(&self, r: usize, b: usize) -> (i8, i8) {
        let sub = self.sub.expect("validated: q6k has a sub plane");
        let i = self.unit_index(r, b, self.nb()) * 2;
        (sub[i] as i8, sub[i + 1] as i8)
    }

    /// [`Scheme::Q6K`]: the scales of block `b` of row `r`'s two halves (`d·sc`, exact in f32).
    #[inline]
    pub fn q6k_half_scales(&self, r: usize, b: usize) -> (f32, f32) {
        let (d, _) = self.block_scale(r, b);
        let (lo, hi) = self.q6k_sub(r, b);
        (d * lo as f32, d * hi as f32)
    }

    /// Every block's `(d, m)` of row `r` (as [`QMatrix::block_scale`]) into `d[..nb]` and `m[..nb]`, each
    /// superblock's sub-scales unpacked once.
    pub fn row_block_scales(&self, r: usize, d: &mut [f32], m: &mut [f32]) {
        let nb = self.nb();
        let (d, m) = (&mut d[..nb], &mut m[..nb]);
        if self.scheme != Scheme::Q4K {
            // (For Q6K the superblock scale, as `block_scale`.)
            for b in 0..nb {
                (d[b], m[b]) = self.block_scale(r, b);
            }
            return;
        }
        let ns = self.scheme.scales_per_row(nb);
        let mins = self.mins.expect("validated: q4k has a min plane");
        for s in 0..ns {
            let i = self.unit_index(r, s, ns);
            let sub = self.k4_sub_bytes(r, s);
            let bits = u128::from_le_bytes(std::array::from_fn(|k| if k < K4_SUB_BYTES { sub[k] } else { 0 }));
            let (ds, dm) = (self.scales[i].to_f32(), mins[i].to_f32());
            for j in 0..SUPER.min(nb - s * SUPER) {
                d[s * SUPER + j] = ds * ((bits >> (6 * j)) & 63) as f32;
                m[s * SUPER + j] = -(dm * ((bits >> (6 * (SUPER + j))) & 63) as f32);
            }
        }
    }

    /// Unsigned/signed integer code of weight `k` in row `r` as used by `w = d*q + m`.
    #[inline]
    pub fn code(&self, r: usize, k: usize) -> i32 {
        let nb = self.nb();
        let (b, j) = (k / BLOCK, k % BLOCK);
        match self.scheme {
            Scheme::Q4 | Scheme::Q4A | Scheme::Q4K => {
                let byte = self.qs_byte(r, b * 16 + j % 16);
                (if j < 16 { byte & 0x0f } else { byte >> 4 }) as i32
            }
            Scheme::Q8 | Scheme::Q8A => self.qs_byte(r, b * 32 + j) as i8 as i32,
            Scheme::Q6K => {
                let low = self.qs_byte(r, b * 16 + j % 16);
                let low = if j < 16 { low & 0x0f } else { low >> 4 };
                let high = (self.qs_byte(r, nb * 16 + b * 8 + j % 8) >> (2 * (j / 8))) & 3;
                (low | high << 4) as i32 - 32
            }
        }
    }

    /// Dequantizes row `r` into `out` (`out.len() == cols`).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let nb = self.nb();
        for b in 0..nb {
            let (d, m) = self.block_scale(r, b);
            let halves = if self.scheme == Scheme::Q6K { self.q6k_half_scales(r, b) } else { (d, d) };
            for k in b * BLOCK..((b + 1) * BLOCK).min(self.cols) {
                let d = if k % BLOCK < BLOCK / 2 { halves.0 } else { halves.1 };
                out[k] = d * self.code(r, k) as f32 + m;
            }
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
    pub sub: Option<Vec<u8>>,
    pub layout: RowLayout,
}

impl QMatrixOwned {
    pub fn new(scheme: Scheme, rows: usize, cols: usize) -> Self {
        let nb = blocks_per_row(cols);
        let ns = rows * scheme.scales_per_row(nb);
        let nsub = rows * scheme.sub_bytes_per_row(nb);
        QMatrixOwned {
            scheme: Some(scheme),
            rows,
            cols,
            qs: vec![0; rows * nb * scheme.qs_bytes_per_block()],
            scales: vec![f16::ZERO; ns],
            mins: scheme.has_min().then(|| vec![f16::ZERO; ns]),
            sub: (nsub > 0).then(|| vec![0; nsub]),
            layout: RowLayout::RowMajor,
        }
    }

    /// Reorders every plane into `layout` (a no-op when already in it).
    pub fn set_layout(&mut self, layout: RowLayout) {
        if layout == self.layout {
            return;
        }
        let scheme = self.scheme.expect("scheme set");
        let to_grouped = layout == RowLayout::Grouped;
        let rows = self.rows;
        self.qs = regroup_plane(&self.qs, rows, Plane::Qs.unit_bytes(scheme), to_grouped);
        self.scales = regroup_plane(&self.scales, rows, 1, to_grouped);
        self.mins = self.mins.as_deref().map(|m| regroup_plane(m, rows, 1, to_grouped));
        self.sub = self.sub.as_deref().map(|s| regroup_plane(s, rows, Plane::Sub.unit_bytes(scheme), to_grouped));
        self.layout = layout;
    }

    pub fn view(&self) -> QMatrix<'_> {
        QMatrix {
            scheme: self.scheme.expect("scheme set"),
            rows: self.rows,
            cols: self.cols,
            qs: &self.qs,
            scales: &self.scales,
            mins: self.mins.as_deref(),
            sub: self.sub.as_deref(),
            layout: self.layout,
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
        assert!(QMatrix::new(Scheme::Q4, rows, cols, &qs, &sc, None, None).is_ok());
        // One byte, one scale short, a min plane too short or missing, or an absurd shape: errors, so no kernel
        // ever loads past a plane.
        assert!(QMatrix::new(Scheme::Q4, rows, cols, &qs[1..], &sc, None, None).is_err());
        assert!(QMatrix::new(Scheme::Q4, rows, cols, &qs, &sc[1..], None, None).is_err());
        assert!(QMatrix::new(Scheme::Q4A, rows, cols, &qs, &sc, None, None).is_err());
        assert!(QMatrix::new(Scheme::Q4A, rows, cols, &qs, &sc, Some(&sc[2..]), None).is_err());
        assert!(QMatrix::new(Scheme::Q4, rows + 1, cols, &qs, &sc, None, None).is_err());
        assert!(QMatrix::new(Scheme::Q8, usize::MAX / 2, cols, &qs, &sc, None, None).is_err());
        assert!(QMatrix::new(Scheme::Q4, rows, cols, &qs, &sc, Some(&sc), None).is_err());
        // Q4K: scales and mins per superblock (3 blocks → 1 superblock per row), a sub plane of 12 bytes per.
        let (ksc, sub) = (vec![f16::ONE; rows], vec![0u8; rows * K4_SUB_BYTES]);
        assert!(QMatrix::new(Scheme::Q4K, rows, cols, &qs, &ksc, Some(&ksc), Some(&sub)).is_ok());
        assert!(QMatrix::new(Scheme::Q4K, rows, cols, &qs, &ksc, Some(&ksc), None).is_err());
        assert!(QMatrix::new(Scheme::Q4K, rows, cols, &qs, &ksc, Some(&ksc), Some(&sub[1..])).is_err());
        assert!(QMatrix::new(Scheme::Q4K, rows, cols, &qs, &sc, Some(&sc), Some(&sub)).is_err());
        assert!(QMatrix::new(Scheme::Q4A, rows, cols, &qs, &sc, Some(&sc), Some(&sub)).is_err());
    }

    /// Unit positions invert unit indices in both layouts, and a non-finite scale is reported at its row and
    /// block whichever layout holds it.
    #[test]
    fn grouped_units_map_back_to_their_rows() {
        let (rows, cols) = (37, 96);
        let mut m = crate::quantize::quantize(&vec![0.25f32; rows * cols], rows, cols, Scheme::Q4);
        m.scales[20 * 3 + 2] = f16::NAN; // row 20, block 2 (row-major)
        for layout in [RowLayout::RowMajor, RowLayout::Grouped] {
            let mut c = m.clone();
            c.set_layout(layout);
            let v = c.view();
            for r in 0..rows {
                for i in 0..3 {
                    assert_eq!(v.unit_position(v.unit_index(r, i, 3), 3), (r, i), "{layout:?}");
                }
            }
            assert_eq!(v.validate(), Err(LayoutError::NonFinite { row: 20, block: 2 }), "{layout:?}");
        }
    }

    #[test]
    fn k4_sub_scales_round_trip() {
        let sc: [u8; SUPER] = std::array::from_fn(|j| (j * 9 + 5) as u8 % 64);
        let m: [u8; SUPER] = std::array::from_fn(|j| 63 - (j * 7) as u8);
        let packed = k4_pack_sub(&sc, &m);
        for j in 0..SUPER {
            assert_eq!(k4_sub(&packed, j), (sc[j], m[j]));
        }
        assert_eq!(Scheme::Q4K.bits_per_weight(), 4.5);
    }
}
