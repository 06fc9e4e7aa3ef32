//! GGUF/ggml tensor block types: sizes, decoding to f32, and conversion to the native schemes.
//!
//! Q4_0, Q4_1, Q8_0, Q5_0 (→ int8) and Q5_1 (→ int8 with min) map bit-exactly onto native planes.
//! Q4_K maps bit-exactly onto the native `Q4K` (its codes reordered into the int4 plane, its 6-bit sub-scales
//! repacked). Q5_K has the same 32-weight sub-blocks: it maps onto Q8A with the products of its 6-bit scales and
//! f16 super-scales rounded to f16 (tiny, reported loss).
//! Q6_K maps bit-exactly onto the native `Q6K` (6-bit codes, an int8 scale per 16 weights).

use half::{bf16, f16};

use crate::quantize::pack_q4;
use crate::scheme::{k4_pack_sub, q6k_pack_block, QMatrixOwned, Scheme, BLOCK, K4_SUB_BYTES, SUPER};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl GgmlType {
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
        }
    }
    /// Elements per block.
    pub fn block_elems(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => 32,
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => 256,
        }
    }
    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4K => 144,
            GgmlType::Q5K => 176,
            GgmlType::Q6K => 210,
        }
    }
    /// Bytes for `n` elements, or None if `n` is not a whole number of blocks or overflows.
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let be = self.block_elems() as u64;
        if !n.is_multiple_of(be) {
            return None;
        }
        (n / be).checked_mul(self.block_bytes() as u64)
    }
}

fn h(b: &[u8], o: usize) -> f32 {
    f16::from_le_bytes([b[o], b[o + 1]]).to_f32()
}

fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// For the K-quants with 32-sub-blocks: calls `f(sub_block, d, m, codes)` with `w = d*code - m`.
fn for_k_subblocks(ty: GgmlType, blk: &[u8], mut f: impl FnMut(usize, f32, f32, &[u8; 32])) {
    let (d, dmin) = (h(blk, 0), h(blk, 2));
    let sc = &blk[4..16];
    match ty {
        GgmlType::Q4K => {
            let qs = &blk[16..144];
            for c in 0..4 {
                let q = &qs[c * 32..c * 32 + 32];
                for half in 0..2 {
                    let (s, m) = scale_min_k4(c * 2 + half, sc);
                    let codes: [u8; 32] = std::array::from_fn(|l| if half == 0 { q[l] & 0xf } else { q[l] >> 4 });
                    f(c * 2 + half, d * s as f32, dmin * m as f32, &codes);
                }
            }
        }
        GgmlType::Q5K => {
            let (qh, qs) = (&blk[16..48], &blk[48..176]);
            for c in 0..4 {
                let q = &qs[c * 32..c * 32 + 32];
                for half in 0..2 {
                    let (s, m) = scale_min_k4(c * 2 + half, sc);
                    let bit = 1u8 << (c * 2 + half);
                    let codes: [u8; 32] = std::array::from_fn(|l| {
                        let lo = if half == 0 { q[l] & 0xf } else { q[l] >> 4 };
                        lo + if qh[l] & bit != 0 { 16 } else { 0 }
                    });
                    f(c * 2 + half, d * s as f32, dmin * m as f32, &codes);
                }
            }
        }
        _ => unreachable!("not a 32-sub-block K-quant"),
    }
}

/// Decodes `n` elements of type `ty` from `data` (which must hold exactly `ty.bytes_for(n)` bytes).
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) {
    let n = out.len();
    assert_eq!(Some(data.len() as u64), ty.bytes_for(n as u64), "dequantize: size");
    let bb = ty.block_bytes();
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(data.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(data.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(data.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
            for (blk, y) in data.chunks_exact(bb).zip(out.chunks_exact_mut(32)) {
                let (d, m, codes) = legacy_block(ty, blk);
                for (o, &q) in y.iter_mut().zip(&codes) {
                    *o = d * q as f32 + m;
                }
            }
        }
        GgmlType::Q4K | GgmlType::Q5K => {
            for (blk, y) in data.chunks_exact(bb).zip(out.chunks_exact_mut(256)) {
                for_k_subblocks(ty, blk, |sb, d, m, codes| {
                    for l in 0..32 {
                        y[sb * 32 + l] = d * codes[l] as f32 - m;
                    }
                });
            }
        }
        GgmlType::Q6K => {
            for (blk, y) in data.chunks_exact(bb).zip(out.chunks_exact_mut(256)) {
                let (ql, qh, sc, d) = (&blk[0..128], &blk[128..192], &blk[192..208], h(blk, 208));
                for n in 0..2 {
                    let (ql, qh, sc, y) = (&ql[n * 64..], &qh[n * 32..], &sc[n * 8..], &mut y[n * 128..]);
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xf) | (qh[l] & 3) << 4) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xf) | ((qh[l] >> 2) & 3) << 4) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4) as i32 - 32;
                        let s = |k: usize| d * sc[is + k] as i8 as f32;
                        y[l] = s(0) * q1 as f32;
                        y[l + 32] = s(2) * q2 as f32;
                        y[l + 64] = s(4) * q3 as f32;
                        y[l + 96] = s(6) * q4 as f32;
                    }
                }
            }
        }
    }
}

/// `(d, m, codes)` of a 32-element legacy block with `w = d*code + m`.
fn legacy_block(ty: GgmlType, blk: &[u8]) -> (f32, f32, [i32; 32]) {
    let d = h(blk, 0);
    match ty {
        GgmlType::Q4_0 => {
            let qs = &blk[2..18];
            (
                d,
                0.0,
                std::array::from_fn(|j| if j < 16 { (qs[j] & 0xf) as i32 - 8 } else { (qs[j - 16] >> 4) as i32 - 8 }),
            )
        }
        GgmlType::Q4_1 => {
            let qs = &blk[4..20];
            (
                d,
                h(blk, 2),
                std::array::from_fn(|j| if j < 16 { (qs[j] & 0xf) as i32 } else { (qs[j - 16] >> 4) as i32 }),
            )
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let off = if ty == GgmlType::Q5_0 { 2 } else { 4 };
            let qh = u32::from_le_bytes(blk[off..off + 4].try_into().unwrap());
            let qs = &blk[off + 4..off + 20];
            let bias = if ty == GgmlType::Q5_0 { 16 } else { 0 };
            let m = if ty == GgmlType::Q5_1 { h(blk, 2) } else { 0.0 };
            (
                d,
                m,
                std::array::from_fn(|j| {
                    let lo = if j < 16 { qs[j] & 0xf } else { qs[j - 16] >> 4 } as u32;
                    ((lo | ((qh >> j) & 1) << 4) as i32) - bias
                }),
            )
        }
        GgmlType::Q8_0 => (d, 0.0, std::array::from_fn(|j| blk[2 + j] as i8 as i32)),
        _ => unreachable!(),
    }
}

/// Result of mapping a GGUF tensor onto a native scheme.
pub struct NativeMapping {
    pub matrix: QMatrixOwned,
    /// `None` when bit-exact; otherwise the relative RMS error of the native weights against the GGUF ones.
    pub rel_rms_error: Option<f64>,
}

/// Maps a quantized GGUF matrix (`rows x cols`, row-major, cols along the block axis) onto a native scheme.
/// Returns None for float types (the caller keeps or quantizes those).
pub fn to_native(ty: GgmlType, data: &[u8], rows: usize, cols: usize) -> Option<NativeMapping> {
    let bb = ty.block_bytes();
    let row_bytes = (cols / ty.block_elems()) * bb;
    assert_eq!(data.len(), rows * row_bytes, "to_native: size");
    let scheme = match ty {
        GgmlType::Q4_0 => Scheme::Q4,
        GgmlType::Q4_1 => Scheme::Q4A,
        GgmlType::Q4K => return Some(NativeMapping { matrix: q4k_to_native(data, rows, cols), rel_rms_error: None }),
        GgmlType::Q6K => return Some(NativeMapping { matrix: q6k_to_native(data, rows, cols), rel_rms_error: None }),
        GgmlType::Q8_0 | GgmlType::Q5_0 => Scheme::Q8,
        GgmlType::Q5_1 | GgmlType::Q5K => Scheme::Q8A,
        _ => return None,
    };
    let mut m = QMatrixOwned::new(scheme, rows, cols);
    let qpb = scheme.qs_bytes_per_block();
    let mut put = |i: usize, d: f32, mn: f32, codes: &[i32; 32]| {
        m.scales[i] = f16::from_f32(d);
        if let Some(mins) = m.mins.as_mut() {
            mins[i] = f16::from_f32(mn);
        }
        let qs = &mut m.qs[i * qpb..(i + 1) * qpb];
        if scheme.is_int4() {
            let c: [u8; 32] = codes.map(|c| (if scheme == Scheme::Q4 { c + 8 } else { c }) as u8);
            pack_q4(&c, qs);
        } else {
            for (o, &c) in qs.iter_mut().zip(codes) {
                *o = c as i8 as u8;
            }
        }
    };
    let mut i = 0;
    for blk in data.chunks_exact(bb) {
        match ty {
            GgmlType::Q5K => for_k_subblocks(ty, blk, |sb, d, mn, codes| {
                put(i + sb, d, -mn, &codes.map(|c| c as i32));
            }),
            _ => {
                let (d, mn, codes) = legacy_block(ty, blk);
                put(i, d, mn, &codes);
            }
        }
        i += ty.block_elems() / BLOCK;
    }
    let rel_rms_error = match ty {
        GgmlType::Q5K => {
            let mut err = RmsError::default();
            for r0 in (0..rows).step_by(CHUNK_ROWS) {
                let n = CHUNK_ROWS.min(rows - r0);
                let mut f = vec![0.0; n * cols];
                dequantize(ty, &data[r0 * row_bytes..(r0 + n) * row_bytes], &mut f);
                err.add(&f, &m.view().rows_range(r0, r0 + n).dequantize());
            }
            Some(err.value())
        }
        _ => None,
    };
    Some(NativeMapping { matrix: m, rel_rms_error })
}

/// GGUF Q4_K rows (`cols` a multiple of 256) as a native [`Scheme::Q4K`] matrix, bit for bit: each superblock's
/// f16 `d`/`dmin` into the scale/min planes, its 6-bit sub-scales repacked into the `sub` plane, its codes (a
/// 64-weight chunk per 32 bytes: sub-block 2c in the low nibbles, 2c+1 in the high) into the int4 plane.
fn q4k_to_native(data: &[u8], rows: usize, cols: usize) -> QMatrixOwned {
    let mut m = QMatrixOwned::new(Scheme::Q4K, rows, cols);
    let mins = m.mins.as_mut().expect("q4k has mins");
    let sub = m.sub.as_mut().expect("q4k has a sub plane");
    for (s, blk) in data.chunks_exact(GgmlType::Q4K.block_bytes()).enumerate() {
        m.scales[s] = f16::from_le_bytes([blk[0], blk[1]]);
        mins[s] = f16::from_le_bytes([blk[2], blk[3]]);
        let (mut sc, mut mn) = ([0u8; SUPER], [0u8; SUPER]);
        for j in 0..SUPER {
            (sc[j], mn[j]) = scale_min_k4(j, &blk[4..16]);
        }
        sub[s * K4_SUB_BYTES..(s + 1) * K4_SUB_BYTES].copy_from_slice(&k4_pack_sub(&sc, &mn));
        let qs = &blk[16..144];
        for j in 0..SUPER {
            let q = &qs[(j / 2) * 32..(j / 2) * 32 + 32];
            let codes: [u8; 32] = std::array::from_fn(|l| if j % 2 == 0 { q[l] & 0xf } else { q[l] >> 4 });
            let b = s * SUPER + j;
            pack_q4(&codes, &mut m.qs[b * 16..(b + 1) * 16]);
        }
    }
    m
}

/// GGUF Q6_K rows (`cols` a multiple of 256) as a native [`Scheme::Q6K`] matrix, bit for bit: each superblock's
/// f16 `d` into the scale plane, its 16 int8 scales into the `sub` plane, its 6-bit codes (GGUF: low 4 bits in
/// `ql`, high 2 in `qh`, interleaved over 128-weight halves) repacked per 32-weight block.
fn q6k_to_native(data: &[u8], rows: usize, cols: usize) -> QMatrixOwned {
    let mut m = QMatrixOwned::new(Scheme::Q6K, rows, cols);
    let nb = cols / BLOCK;
    let ns = nb / SUPER;
    let sub = m.sub.as_mut().expect("q6k has a sub plane");
    for (i, blk) in data.chunks_exact(GgmlType::Q6K.block_bytes()).enumerate() {
        let (r, s) = (i / ns, i % ns);
        let (ql, qh, sc) = (&blk[0..128], &blk[128..192], &blk[192..208]);
        m.scales[i] = f16::from_le_bytes([blk[208], blk[209]]);
        // Code of weight `l` (0..256) of the superblock, as `dequantize` reads it.
        let code = |l: usize| {
            let (n, l) = (l / 128, l % 128);
            let (ql, qh) = (&ql[n * 64..], &qh[n * 32..]);
            let (quarter, l) = (l / 32, l % 32);
            let low = match quarter {
                0 => ql[l] & 0xf,
                1 => ql[l + 32] & 0xf,
                2 => ql[l] >> 4,
                _ => ql[l + 32] >> 4,
            };
            low | ((qh[l] >> (2 * quarter)) & 3) << 4
        };
        let row = &mut m.qs[r * nb * 24..(r + 1) * nb * 24];
        let (low, high) = row.split_at_mut(nb * 16);
        for j in 0..SUPER {
            let b = s * SUPER + j;
            let codes: [u8; BLOCK] = std::array::from_fn(|k| code(j * BLOCK + k));
            q6k_pack_block(&codes, &mut low[b * 16..(b + 1) * 16], &mut high[b * 8..(b + 1) * 8]);
        }
        // GGUF's scale `is` covers weights 16·is..16·is+16: block j's halves are scales 2j and 2j+1.
        sub[(r * nb + s * SUPER) * 2..(r * nb + (s + 1) * SUPER) * 2].copy_from_slice(sc);
    }
    m
}

/// Rows converted at a time when a block type must go through f32.
const CHUNK_ROWS: usize = 1024;

/// [`rel_rms`] accumulated over slices.
#[derive(Default)]
struct RmsError {
    num: f64,
    den: f64,
}

impl RmsError {
    fn add(&mut self, reference: &[f32], approx: &[f32]) {
        self.num += reference.iter().zip(approx).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>();
        self.den += reference.iter().map(|a| (*a as f64).powi(2)).sum::<f64>();
    }
    fn value(&self) -> f64 {
        if self.den == 0.0 {
            self.num.sqrt()
        } else {
            (self.num / self.den).sqrt()
        }
    }
}

pub fn rel_rms(reference: &[f32], approx: &[f32]) -> f64 {
    let num: f64 = reference.iter().zip(approx).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let den: f64 = reference.iter().map(|a| (*a as f64).powi(2)).sum();
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random_blocks(ty: GgmlType, nblocks: usize, seed: u64) -> Vec<u8> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut v: Vec<u8> = (0..nblocks * ty.block_bytes()).map(|_| rng.gen()).collect();
        // Overwrite the f16 scales with sane finite values.
        for b in v.chunks_exact_mut(ty.block_bytes()) {
            let offs: &[usize] = match ty {
                GgmlType::Q6K => &[208],
                GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
                _ => &[0],
            };
            for &o in offs {
                b[o..o + 2].copy_from_slice(&f16::from_f32(rng.gen_range(0.001..0.05)).to_le_bytes());
            }
        }
        v
    }

    #[test]
    fn legacy_types_map_exactly() {
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0] {
            let (rows, cols) = (3, 64);
            let data = random_blocks(ty, rows * cols / 32, 3);
            let mut f = vec![0.0; rows * cols];
            dequantize(ty, &data, &mut f);
            let m = to_native(ty, &data, rows, cols).unwrap();
            assert!(m.rel_rms_error.is_none());
            assert_eq!(m.matrix.view().dequantize(), f, "{ty:?}");
        }
    }

    #[test]
    fn q4_k_and_q6_k_map_exactly_at_their_size() {
        for (ty, scheme, seed) in [(GgmlType::Q4K, Scheme::Q4K, 5), (GgmlType::Q6K, Scheme::Q6K, 6)] {
            let (rows, cols) = (3, 768);
            let data = random_blocks(ty, rows * cols / 256, seed);
            let mut f = vec![0.0; rows * cols];
            dequantize(ty, &data, &mut f);
            let m = to_native(ty, &data, rows, cols).unwrap();
            assert!(m.rel_rms_error.is_none());
            assert_eq!(m.matrix.scheme, Some(scheme));
            assert_eq!(m.matrix.view().bytes(), data.len(), "{ty:?}: bits per weight as the source's");
            assert_eq!(m.matrix.view().dequantize(), f, "{ty:?}");
        }
    }

    #[test]
    fn k_quants_map_with_small_reported_loss() {
        for ty in [GgmlType::Q5K] {
            let (rows, cols) = (2, 512);
            let data = random_blocks(ty, rows * cols / 256, 4);
            let m = to_native(ty, &data, rows, cols).unwrap();
            let e = m.rel_rms_error.unwrap();
            assert!(e < 0.01, "{ty:?}: {e}");
        }
    }

    #[test]
    fn q4_0_known_block() {
        // d = 0.5, codes 0..15 ascending in low nibbles, 15..0 in high nibbles.
        let mut blk = f16::from_f32(0.5).to_le_bytes().to_vec();
        blk.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut f = vec![0.0; 32];
        dequantize(GgmlType::Q4_0, &blk, &mut f);
        assert_eq!(f[0], -4.0);
        assert_eq!(f[15], 3.5);
        assert_eq!(f[16], 3.5);
        assert_eq!(f[31], -4.0);
    }
}
