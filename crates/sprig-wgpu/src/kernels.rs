//! The cubecl kernels of the GPU backend, one per backend op (plus the MoE router and KV append).
//!
//! Conventions: activations are f32 row-major `[rows, cols]`; a 1-D job index is linearised from a 2-D cube
//! grid (`job_index`) because one grid axis holds at most 65535 cubes. Quantized weights stay packed as in the
//! model file: `qs` is the file's code plane read as little-endian u32 words (int4: 4 words per 32-weight
//! block, byte `j` = weights `j` (low nibble) and `j+16` (high); int8: 8 words per block, one signed byte per
//! weight), `scales`/`mins` are the f16 planes widened to f32 at upload (WGSL has no portable f16 storage).

use cubecl::prelude::*;

/// Weight storage kinds (comptime: one compiled kernel per kind).
pub const KIND_F32: u32 = 0;
pub const KIND_Q4: u32 = 1;
pub const KIND_Q8: u32 = 2;

/// Threads per row and rows per cube of the linear kernels.
pub const LANES: usize = 32;
pub const ROWS_PER_CUBE: usize = 8;
/// Threads per cube of the reduction kernels (norm, attention).
pub const REDUCE_THREADS: usize = 64;
/// Threads per cube of the element-wise kernels.
pub const ELEMWISE_THREADS: usize = 256;

#[cube]
fn cube_index() -> usize {
    CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize
}

#[cube]
fn job_index(#[comptime] threads: usize) -> usize {
    cube_index() * threads + UNIT_POS as usize
}

/// One dequantized weight.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_one(
    wf: &[f32],
    qs: &[u32],
    scales: &[f32],
    mins: &[f32],
    row: usize,
    c: usize,
    cols: usize,
    #[comptime] kind: u32,
    #[comptime] has_min: bool,
) -> f32 {
    let nb = cols.div_ceil(32);
    let mut v = 0.0f32;
    if comptime![kind == KIND_F32] {
        v += wf[row * cols + c];
    } else {
        let b = c / 32;
        let j = c % 32;
        let d = scales[row * nb + b];
        let mut m = 0.0f32;
        if comptime![has_min] {
            m = mins[row * nb + b];
        } else if comptime![kind == KIND_Q4] {
            m = d * -8.0f32;
        }
        if comptime![kind == KIND_Q4] {
            let byte_i = j % 16;
            let word = qs[(row * nb + b) * 4 + byte_i / 4];
            let byte = (word >> (8 * (byte_i % 4)) as u32) & 255u32;
            let mut q = byte & 15u32;
            if j >= 16 {
                q = byte >> 4u32;
            }
            v += d * f32::cast_from(q) + m;
        } else {
            let word = qs[(row * nb + b) * 8 + j / 4];
            let byte = (word >> (8 * (j % 4)) as u32) & 255u32;
            let mut q = f32::cast_from(byte);
            if byte >= 128u32 {
                q -= 256.0f32;
            }
            v += d * q + m;
        }
    }
    v
}

/// `out[t, row0 + r] = x[t, :] · W[r, :] (+ bias)` for the `chunk_rows` rows of one weight chunk.
///
/// A cube is `LANES x ROWS_PER_CUBE` threads: each row of the cube takes one weight row, its lanes stride over
/// the row's blocks, dequantize each block once into registers and dot it with `tile` tokens (decode: tile 1,
/// a GEMV; prefill: a tile of tokens reusing every dequantized block — the GEMM), then the lanes reduce
/// through shared memory.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn linear_kernel(
    x: &[f32],
    wf: &[f32],
    qs: &[u32],
    scales: &[f32],
    mins: &[f32],
    bias: &[f32],
    out: &mut [f32],
    tokens: usize,
    cols: usize,
    chunk_rows: usize,
    row0: usize,
    out_cols: usize,
    #[comptime] kind: u32,
    #[comptime] has_min: bool,
    #[comptime] has_bias: bool,
    #[comptime] tile: usize,
) {
    let lane = UNIT_POS_X as usize;
    let ly = UNIT_POS_Y as usize;
    let r = CUBE_POS_X as usize * ROWS_PER_CUBE + ly;
    let t0 = CUBE_POS_Y as usize * tile;
    let nb = cols.div_ceil(32);
    let mut acc = Array::<f32>::new(tile);
    for t in 0..tile {
        acc[t] = 0.0f32;
    }
    if r < chunk_rows {
        let mut b = lane;
        while b < nb {
            let kb = b * 32;
            let mut n = cols - kb;
            if n > 32 {
                n = 32;
            }
            for j in 0..n {
                let w = load_one(wf, qs, scales, mins, r, kb + j, cols, kind, has_min);
                for t in 0..tile {
                    let tt = t0 + t;
                    if tt < tokens {
                        acc[t] += w * x[tt * cols + kb + j];
                    }
                }
            }
            b += LANES;
        }
    }
    let mut sm = Shared::<[f32]>::new_slice(comptime![LANES * ROWS_PER_CUBE]);
    for t in 0..tile {
        sm[ly * LANES + lane] = acc[t];
        sync_cube();
        // Lane 0 sums the row's partials (cheap next to the row's weight reads).
        let tt = t0 + t;
        if lane == 0 && r < chunk_rows && tt < tokens {
            let mut v = 0.0f32;
            for i in 0..LANES {
                v += sm[ly * LANES + i];
            }
            if comptime![has_bias] {
                v += bias[row0 + r];
            }
            out[tt * out_cols + row0 + r] = v;
        }
        sync_cube();
    }
}

/// The gathered linear of MoE experts: virtual token `vt` (= token × slot) reads input row `vt / x_div` and
/// the rows of expert `idx[vt]` (`expert_rows` rows each, stacked); `out [vt, expert_rows]`. Launched once
/// per weight chunk; each output is written by the chunk holding its weight row. Only selected experts' rows
/// are read.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn moe_linear_kernel(
    x: &[f32],
    idx: &[u32],
    wf: &[f32],
    qs: &[u32],
    scales: &[f32],
    mins: &[f32],
    out: &mut [f32],
    vtokens: usize,
    x_div: usize,
    cols: usize,
    expert_rows: usize,
    chunk_rows: usize,
    row0: usize,
    #[comptime] kind: u32,
    #[comptime] has_min: bool,
) {
    let lane = UNIT_POS_X as usize;
    let ly = UNIT_POS_Y as usize;
    let r = CUBE_POS_X as usize * ROWS_PER_CUBE + ly;
    let vt = CUBE_POS_Y as usize;
    let nb = cols.div_ceil(32);
    let mut acc = 0.0f32;
    let mut mine = false;
    if r < expert_rows && vt < vtokens {
        let global = idx[vt] as usize * expert_rows + r;
        if global >= row0 && global < row0 + chunk_rows {
            mine = true;
            let local = global - row0;
            let xr = vt / x_div;
            let mut b = lane;
            while b < nb {
                let kb = b * 32;
                let mut n = cols - kb;
                if n > 32 {
                    n = 32;
                }
                let xo = xr * cols + kb;
                for j in 0..n {
                    acc += load_one(wf, qs, scales, mins, local, kb + j, cols, kind, has_min) * x[xo + j];
                }
                b += LANES;
            }
        }
    }
    let mut sm = Shared::<[f32]>::new_slice(comptime![LANES * ROWS_PER_CUBE]);
    sm[ly * LANES + lane] = acc;
    sync_cube();
    if lane == 0 && mine {
        let mut v = 0.0f32;
        for i in 0..LANES {
            v += sm[ly * LANES + i];
        }
        out[vt * expert_rows + r] = v;
    }
}

/// Router: per token, softmax or sigmoid scores, top-k (ties to the lower index, NaN last), optional
/// renormalisation and scale — the same rules as `sprig_backend::moe::route`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
// `x != x` is the NaN test inside a cube kernel.
#[allow(clippy::eq_op)]
pub fn moe_route_kernel(
    logits: &[f32],
    scores: &mut [f32],
    idx: &mut [u32],
    wts: &mut [f32],
    tokens: usize,
    n_experts: usize,
    top_k: usize,
    routed_scale: f32,
    #[comptime] sigmoid: bool,
    #[comptime] norm_topk: bool,
) {
    let t = job_index(ELEMWISE_THREADS);
    if t < tokens {
        let base = t * n_experts;
        if comptime![sigmoid] {
            for e in 0..n_experts {
                scores[base + e] = 1.0f32 / (1.0f32 + (-logits[base + e]).exp());
            }
        } else {
            let mut mx = logits[base];
            for e in 1..n_experts {
                let l = logits[base + e];
                if l > mx {
                    mx = l;
                }
            }
            let mut sum = 0.0f32;
            for e in 0..n_experts {
                let v = (logits[base + e] - mx).exp();
                scores[base + e] = v;
                sum += v;
            }
            for e in 0..n_experts {
                scores[base + e] = scores[base + e] / sum;
            }
        }
        let mut total = 0.0f32;
        for s in 0..top_k {
            let mut best = n_experts;
            let mut best_s = 0.0f32;
            for e in 0..n_experts {
                let mut taken = false;
                for p in 0..s {
                    if idx[t * top_k + p] as usize == e {
                        taken = true;
                    }
                }
                if !taken {
                    let v = scores[base + e];
                    // `best_s != best_s`: the current best is NaN, so anything replaces it.
                    if best == n_experts || v > best_s || best_s != best_s {
                        best = e;
                        best_s = v;
                    }
                }
            }
            idx[t * top_k + s] = best as u32;
            wts[t * top_k + s] = best_s;
            total += best_s;
        }
        for s in 0..top_k {
            let mut w = wts[t * top_k + s];
            if comptime![norm_topk] {
                if total > 0.0f32 {
                    w = w / total;
                }
            }
            wts[t * top_k + s] = w * routed_scale;
        }
    }
}

/// `out[t, :] = Σ_s wts[t, s] * y[t * top_k + s, :]`.
/// One MoE layer's usage counters, one thread per expert `e`: `counts[e]` += the tokens routed to it in this
/// pass, `counts[n_experts + e]` += 1 when it ran at all. u32 counters: 4 billion tokens per expert.
#[cube(launch)]
pub fn moe_count_kernel(idx: &[u32], counts: &mut [u32], routed: usize, n_experts: usize) {
    let e = job_index(ELEMWISE_THREADS);
    if e < n_experts {
        let mut c = 0u32;
        for i in 0..routed {
            if idx[i] as usize == e {
                c += 1u32;
            }
        }
        counts[e] += c;
        if c > 0u32 {
            counts[n_experts + e] += 1u32;
        }
    }
}

#[cube(launch)]
pub fn moe_combine_kernel(y: &[f32], wts: &[f32], out: &mut [f32], tokens: usize, dim: usize, top_k: usize) {
    let i = job_index(ELEMWISE_THREADS);
    if i < tokens * dim {
        let t = i / dim;
        let c = i % dim;
        let mut acc = 0.0f32;
        for s in 0..top_k {
            acc += wts[t * top_k + s] * y[(t * top_k + s) * dim + c];
        }
        out[i] = acc;
    }
}

/// `out[t, c] = table[ids[t], c] * scale` for the tokens whose row lies in this chunk.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn embed_kernel(
    ids: &[u32],
    wf: &[f32],
    qs: &[u32],
    scales: &[f32],
    mins: &[f32],
    out: &mut [f32],
    tokens: usize,
    cols: usize,
    chunk_rows: usize,
    row0: usize,
    scale: f32,
    #[comptime] kind: u32,
    #[comptime] has_min: bool,
) {
    let i = job_index(ELEMWISE_THREADS);
    if i < tokens * cols {
        let t = i / cols;
        let c = i % cols;
        let row = ids[t] as usize;
        if row >= row0 && row < row0 + chunk_rows {
            out[i] = load_one(wf, qs, scales, mins, row - row0, c, cols, kind, has_min) * scale;
        }
    }
}

/// RMSNorm of each group of `g` elements (a row, or a head of a row): one cube per group.
#[cube(launch)]
pub fn rms_norm_kernel(x: &[f32], w: &[f32], out: &mut [f32], groups: usize, g: usize, eps: f32) {
    let grp = cube_index();
    let lane = UNIT_POS as usize;
    let mut sm = Shared::<[f32]>::new_slice(REDUCE_THREADS);
    let base = grp * g;
    let mut s = 0.0f32;
    if grp < groups {
        let mut c = lane;
        while c < g {
            let v = x[base + c];
            s += v * v;
            c += REDUCE_THREADS;
        }
    }
    sm[lane] = s;
    sync_cube();
    if lane == 0 {
        let mut total = 0.0f32;
        for i in 0..REDUCE_THREADS {
            total += sm[i];
        }
        sm[0] = total;
    }
    sync_cube();
    if grp < groups {
        let inv = 1.0f32 / (sm[0] / f32::cast_from(g) + eps).sqrt();
        let mut c = lane;
        while c < g {
            out[base + c] = x[base + c] * inv * w[c];
            c += REDUCE_THREADS;
        }
    }
}

/// Rotates pairs in place with a precomputed `[position, half]` cos/sin table.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn rope_kernel(
    x: &mut [f32],
    cos: &[f32],
    sin: &[f32],
    tokens: usize,
    heads: usize,
    hd: usize,
    pos0: usize,
    #[comptime] adjacent: bool,
) {
    let half = hd / 2;
    let i = job_index(ELEMWISE_THREADS);
    if i < tokens * heads * half {
        let t = i / (heads * half);
        let h = (i / half) % heads;
        let p = i % half;
        let base = t * heads * hd + h * hd;
        let mut a = base + p;
        let mut b = base + p + half;
        if comptime![adjacent] {
            a = base + 2 * p;
            b = base + 2 * p + 1;
        }
        let c = cos[(pos0 + t) * half + p];
        let s = sin[(pos0 + t) * half + p];
        let x0 = x[a];
        let x1 = x[b];
        x[a] = x0 * c - x1 * s;
        x[b] = x0 * s + x1 * c;
    }
}

/// Causal (optionally sliding-window) attention of T new queries over the cached keys and the new keys:
/// one cube per (token, head), keys in chunks of `REDUCE_THREADS` with an online softmax (flash-attention
/// style: no score buffer the size of the context). Keys at positions `< pos0` come from the layer's ring
/// (`slot = pos % cap`), newer ones straight from `k`/`v`, so a prefill longer than the window is exact.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn attention_kernel(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    kc: &[f32],
    vc: &[f32],
    kq: &[u32],
    vq: &[u32],
    ks: &[f32],
    vs: &[f32],
    out: &mut [f32],
    tokens: usize,
    heads: usize,
    kv_heads: usize,
    pos0: usize,
    cap: usize,
    window: usize,
    scale: f32,
    #[comptime] hd: usize,
    #[comptime] q8: bool,
) {
    let job = cube_index();
    let lane = UNIT_POS as usize;
    let t = job / heads;
    let h = job % heads;
    let valid_job = t < tokens;
    let pos = pos0 + t;
    let mut lo = 0usize;
    if window > 0 && pos + 1 > window {
        lo = pos + 1 - window;
    }
    let kvd = kv_heads * hd;
    let kvh = h / (heads / kv_heads);
    let qo = t * heads * hd + h * hd;
    let dpt = comptime![hd.div_ceil(REDUCE_THREADS)];
    let mut acc = Array::<f32>::new(dpt);
    for i in 0..dpt {
        acc[i] = 0.0f32;
    }
    let mut m = f32::new(-3.0e38f32);
    let mut l = 0.0f32;
    let mut sm = Shared::<[f32]>::new_slice(REDUCE_THREADS);
    let mut ok = Shared::<[u32]>::new_slice(REDUCE_THREADS);
    // Every cube runs the same number of chunks (sync_cube needs uniform control flow within the cube).
    let mut start = lo;
    let end = pos + 1;
    while start < end {
        let j = start + lane;
        let mut s = 0.0f32;
        let mut good = 0u32;
        if valid_job && j < end {
            good = 1u32;
            if j < pos0 {
                let ko = (j % cap) * kvd + kvh * hd;
                let so = (j % cap) * kv_heads + kvh;
                for d in 0..hd {
                    s += q[qo + d] * cached(kc, kq, ks, ko + d, so, q8);
                }
            } else {
                let ko = (j - pos0) * kvd + kvh * hd;
                for d in 0..hd {
                    s += q[qo + d] * k[ko + d];
                }
            }
            s *= scale;
        }
        sm[lane] = s;
        ok[lane] = good;
        sync_cube();
        let mut cm = m;
        for i in 0..REDUCE_THREADS {
            if ok[i] == 1u32 && sm[i] > cm {
                cm = sm[i];
            }
        }
        let corr = (m - cm).exp();
        l *= corr;
        for i in 0..dpt {
            acc[i] = acc[i] * corr;
        }
        for i in 0..REDUCE_THREADS {
            if ok[i] == 1u32 {
                let p = (sm[i] - cm).exp();
                l += p;
                let jj = start + i;
                for di in 0..dpt {
                    let d = di * REDUCE_THREADS + lane;
                    if d < hd {
                        if jj < pos0 {
                            let so = (jj % cap) * kv_heads + kvh;
                            acc[di] += p * cached(vc, vq, vs, (jj % cap) * kvd + kvh * hd + d, so, q8);
                        } else {
                            acc[di] += p * v[(jj - pos0) * kvd + kvh * hd + d];
                        }
                    }
                }
            }
        }
        m = cm;
        sync_cube();
        start += REDUCE_THREADS;
    }
    if valid_job {
        for di in 0..dpt {
            let d = di * REDUCE_THREADS + lane;
            if d < hd {
                out[qo + d] = acc[di] / l;
            }
        }
    }
}

/// Element `e` of a layer's cached keys or values: f32, or an int8 code (byte `e % 4` of word `e / 4`) times
/// the scale of its position and head (`scales[at]`).
#[cube]
fn cached(c: &[f32], cq: &[u32], scales: &[f32], e: usize, at: usize, #[comptime] q8: bool) -> f32 {
    let mut x = 0.0f32;
    if comptime![q8] {
        let byte = (cq[e / 4] >> (8 * (e % 4)) as u32) & 255u32;
        let mut c8 = f32::cast_from(byte);
        if byte >= 128u32 {
            c8 -= 256.0f32;
        }
        x += c8 * scales[at];
    } else {
        x += c[e];
    }
    x
}

/// Quantizes `hd` values of `x` from `src` to int8 codes (absmax / 127 scale, rounding to nearest even) packed
/// four per word from word `dst / 4`, the scale at `scales[at]`; with `back`, writes the dequantized values to
/// `rounded` (from `src`) instead.
#[cube]
#[allow(clippy::too_many_arguments)]
fn quantize_head(
    x: &[f32],
    codes: &mut [u32],
    scales: &mut [f32],
    rounded: &mut [f32],
    src: usize,
    dst: usize,
    at: usize,
    #[comptime] hd: usize,
    #[comptime] back: bool,
) {
    let mut amax = 0.0f32;
    for d in 0..hd {
        let a = x[src + d].abs();
        if a > amax {
            amax = a;
        }
    }
    let dq = amax / 127.0f32;
    let mut inv = 0.0f32;
    if dq > 0.0f32 {
        inv = 1.0f32 / dq;
    }
    if !comptime![back] {
        scales[at] = dq;
    }
    for w in 0..comptime![hd / 4] {
        let mut word = 0u32;
        for b in 0..4usize {
            let c = f32::round(x[src + 4 * w + b] * inv).clamp(-127.0f32, 127.0f32);
            if comptime![back] {
                rounded[src + 4 * w + b] = c * dq;
            } else {
                let bits = u32::cast_from(i32::cast_from(c)) & 255u32;
                word |= bits << (8 * b) as u32;
            }
        }
        if !comptime![back] {
            codes[dst / 4 + w] = word;
        }
    }
}

/// Appends new K/V rows `first..tokens` to an int8 ring: one job per (token, KV head).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn kv_append_q8_kernel(
    k: &[f32],
    v: &[f32],
    kq: &mut [u32],
    vq: &mut [u32],
    ks: &mut [f32],
    vs: &mut [f32],
    unused: &mut [f32],
    first: usize,
    tokens: usize,
    kv_heads: usize,
    pos0: usize,
    cap: usize,
    #[comptime] hd: usize,
) {
    let i = job_index(ELEMWISE_THREADS);
    if i < (tokens - first) * kv_heads {
        let t = first + i / kv_heads;
        let h = i % kv_heads;
        let slot = (pos0 + t) % cap;
        let kvd = kv_heads * hd;
        quantize_head(k, kq, ks, unused, t * kvd + h * hd, slot * kvd + h * hd, slot * kv_heads + h, hd, false);
        quantize_head(v, vq, vs, unused, t * kvd + h * hd, slot * kvd + h * hd, slot * kv_heads + h, hd, false);
    }
}

/// `out = x` as an int8 cache holds it (each head quantized and dequantized): one job per (row, head).
#[cube(launch)]
pub fn kv_round_trip_kernel(x: &[f32], out: &mut [f32], unused_q: &mut [u32], unused_s: &mut [f32], heads: usize, #[comptime] hd: usize) {
    let i = job_index(ELEMWISE_THREADS);
    if i < heads {
        quantize_head(x, unused_q, unused_s, out, i * hd, 0, 0, hd, true);
    }
}

/// Appends new K/V rows `first..tokens` to a layer's ring (`slot = (pos0 + t) % cap`).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn kv_append_kernel(
    k: &[f32],
    v: &[f32],
    kc: &mut [f32],
    vc: &mut [f32],
    first: usize,
    tokens: usize,
    kvd: usize,
    pos0: usize,
    cap: usize,
) {
    let i = job_index(ELEMWISE_THREADS);
    let n = (tokens - first) * kvd;
    if i < n {
        let t = first + i / kvd;
        let c = i % kvd;
        let slot = (pos0 + t) % cap;
        kc[slot * kvd + c] = k[t * kvd + c];
        vc[slot * kvd + c] = v[t * kvd + c];
    }
}

#[cube]
fn activate(x: f32, #[comptime] gelu: bool) -> f32 {
    let mut y = 0.0f32;
    if comptime![gelu] {
        let c = 0.797_884_6f32;
        y += 0.5f32 * x * (1.0f32 + (c * (x + 0.044715f32 * x * x * x)).tanh());
    } else {
        y += x / (1.0f32 + (-x).exp());
    }
    y
}

#[cube(launch)]
pub fn glu_kernel(gate: &[f32], up: &[f32], out: &mut [f32], n: usize, #[comptime] gelu: bool) {
    let i = job_index(ELEMWISE_THREADS);
    if i < n {
        out[i] = activate(gate[i], gelu) * up[i];
    }
}

/// `x += y`.
#[cube(launch)]
pub fn add_kernel(x: &mut [f32], y: &[f32], n: usize) {
    let i = job_index(ELEMWISE_THREADS);
    if i < n {
        x[i] += y[i];
    }
}

/// `x *= y`, `y` of `x`'s shape (`ycols = cols`) or one factor per row (`ycols = 1`).
#[cube(launch)]
pub fn mul_kernel(x: &mut [f32], y: &[f32], n: usize, cols: usize, ycols: usize) {
    let i = job_index(ELEMWISE_THREADS);
    if i < n {
        let mut j = i;
        if ycols == 1 {
            j = i / cols;
        }
        x[i] *= y[j];
    }
}

/// `x = f(x)`; `op` as [`sprig_backend::Unary`]: 0 scale by `s`, 1 tanh, 2 sigmoid, 3 SiLU, 4 GELU (tanh).
#[cube(launch)]
pub fn map_kernel(x: &mut [f32], n: usize, s: f32, #[comptime] op: u32) {
    let i = job_index(ELEMWISE_THREADS);
    if i < n {
        let v = x[i];
        let mut y = 0.0f32;
        if comptime![op == 0] {
            y += v * s;
        } else if comptime![op == 1] {
            y += v.tanh();
        } else if comptime![op == 2] {
            y += 1.0f32 / (1.0f32 + (-v).exp());
        } else {
            y += activate(v, comptime![op == 4]);
        }
        x[i] = y;
    }
}

/// `out[to + i] = x[from + i]` (a block of rows).
#[cube(launch)]
pub fn copy_kernel(x: &[f32], out: &mut [f32], from: usize, to: usize, n: usize) {
    let i = job_index(ELEMWISE_THREADS);
    if i < n {
        out[to + i] = x[from + i];
    }
}
