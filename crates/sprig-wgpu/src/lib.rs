//! The GPU backend: sprig's op set as cubecl kernels on burn-wgpu's runtime (Vulkan, Metal, DX12, WebGPU).
//!
//! The model code is the same as on the CPU (`sprig-models` over [`Backend`]); this crate only provides the
//! ops. Weights are uploaded once at load, still packed (int4/int8 codes + widened scales), and split into
//! chunks of rows when a plane is larger than the device's largest storage-buffer binding. Activations and
//! the KV cache live on the GPU; the only per-token transfers are the token ids up and the logits down.
//!
//! burn-wgpu is used without burn's fusion and autotune: every op here is one hand-written kernel, so those
//! would only add build time.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod kernels;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use burn_wgpu::{graphics::AutoGraphicsApi, RuntimeOptions, WgpuDevice, WgpuRuntime};
use cubecl::prelude::*;
use cubecl::server::Handle;
use cubecl_runtime::runtime::Runtime;
use sprig_backend::{
    ensure_shape, Activation, AttentionParams, Backend, BackendError, ExpertWeights, KvLayout, MoeParams, MoeUsage,
    Result, RopeLayout, RopeParams, RouterScoring, Unary,
};
use sprig_format::{ModelFile, WeightView};
use sprig_quant::scheme::RowLayout;
use sprig_quant::Scheme;

use kernels::*;

pub use sprig_backend::AdapterInfo;

/// Lists the adapters wgpu can reach (empty when there is no GPU and no software Vulkan driver).
pub fn adapters() -> Vec<AdapterInfo> {
    use burn_wgpu::wgpu;
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let list = cubecl::future::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
    list.into_iter()
        .map(|a| {
            let i = a.get_info();
            AdapterInfo {
                name: i.name,
                backend: format!("{:?}", i.backend),
                device_type: format!("{:?}", i.device_type),
                driver: format!("{} {}", i.driver, i.driver_info).trim().to_string(),
            }
        })
        .collect()
}

/// Options of [`WgpuBackend::new`].
#[derive(Clone, Debug, Default)]
pub struct WgpuOptions {
    /// Largest buffer one weight chunk may use, in bytes; `None` = the device's storage-binding limit.
    /// Tests set it small to exercise the splitting on small models.
    pub max_chunk_bytes: Option<usize>,
}

/// The default adapter, initialised once per process (wgpu/cubecl register a device once).
fn default_device() -> Result<(WgpuDevice, String, bool)> {
    static DEVICE: OnceLock<std::result::Result<(WgpuDevice, String, bool), String>> = OnceLock::new();
    DEVICE
        .get_or_init(|| {
            let device = WgpuDevice::default();
            let setup = burn_wgpu::try_init_setup::<AutoGraphicsApi>(&device, RuntimeOptions::default())
                .map_err(|e| format!("no usable GPU adapter (wgpu: {e})"))?;
            let info = setup.adapter.get_info();
            let software = info.device_type == burn_wgpu::wgpu::DeviceType::Cpu;
            Ok((device, format!("{} ({:?}, {:?})", info.name, info.backend, info.device_type), software))
        })
        .clone()
        .map_err(BackendError::DeviceUnavailable)
}

pub struct WgpuBackend {
    client: Client,
    adapter: String,
    software: bool,
    /// The device's largest storage buffer, in bytes.
    max_buffer_bytes: usize,
    max_chunk_bytes: usize,
    /// Bound in place of the planes a kernel variant does not read.
    dummy_f32: Handle,
    dummy_u32: Handle,
    /// cos/sin tables per (frequencies, attention factor), grown to the largest position seen.
    rope_tables: Mutex<HashMap<(usize, u32), RopeTable>>,
    /// Device-to-host reads so far (tests check that a forward pass makes none).
    host_reads: AtomicU64,
}

struct RopeTable {
    /// The frequencies the table was made from, held so their address (the key) is never reused meanwhile.
    _freqs: Arc<[f32]>,
    positions: usize,
    cos: Handle,
    sin: Handle,
}

/// An f32 `[rows, cols]` activation on the device: the first `rows * cols` elements of its buffer. The
/// buffer only grows, so a state that alternates prefill and decode shapes stops allocating.
pub struct GpuTensor {
    handle: Option<Handle>,
    rows: usize,
    cols: usize,
    /// Elements the buffer holds.
    capacity: usize,
}

impl GpuTensor {
    fn h(&self) -> Handle {
        self.handle.clone().expect("tensor used before it was written")
    }
    fn len(&self) -> usize {
        self.rows * self.cols
    }
}

/// How a weight is stored on the device.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    F32,
    Quant(Scheme),
}

/// Rows `row0 .. row0 + rows` of a weight, each plane its own buffer.
struct Chunk {
    row0: usize,
    rows: usize,
    /// f32 weights (Kind::F32) or the code plane as u32 words.
    data: Handle,
    scales: Option<Handle>,
    mins: Option<Handle>,
}

pub struct GpuWeight {
    rows: usize,
    cols: usize,
    kind: Kind,
    chunks: Vec<Chunk>,
    /// Bytes as stored in the file (for MoE byte accounting).
    file_bytes: usize,
}

impl GpuWeight {
    fn kernel_kind(&self) -> (u32, bool) {
        match self.kind {
            Kind::F32 => (KIND_F32, false),
            Kind::Quant(s) => (if s.is_int4() { KIND_Q4 } else { KIND_Q8 }, s.has_min()),
        }
    }
}

/// One MoE layer's state for one sequence, all on the device.
pub struct GpuMoeState {
    n_experts: usize,
    /// `[2 * n_experts]` u32: tokens routed to each expert, then the forward passes in which each expert ran.
    counters: Handle,
    /// File bytes of one expert's three matrices.
    expert_bytes: u64,
    /// Router scratch, grown to the largest batch: probabilities `[T, E]`, chosen experts and their weights
    /// `[T, top_k]`.
    scores: Option<(Handle, usize)>,
    idx: Option<(Handle, usize)>,
    wts: Option<(Handle, usize)>,
    /// Gate, up, GLU and down outputs of the gathered experts `[T * top_k, ...]`.
    hidden: [GpuTensor; 4],
}

/// Per layer: K and V rings of `cap` entries of `kv_dim` floats.
pub struct GpuKvCache {
    layers: Vec<GpuKvLayer>,
    kv_dim: usize,
    head_dim: usize,
}

/// One layer's ring of `cap` positions: keys and values as f32, or (`scales` present) as int8 codes packed
/// four per u32 word with one f32 scale per position and KV head.
#[derive(Clone)]
struct GpuKvLayer {
    k: Handle,
    v: Handle,
    cap: usize,
    scales: Option<(Handle, Handle)>,
}

fn elementwise(n: usize) -> (CubeCount, CubeDim) {
    grid(n.div_ceil(ELEMWISE_THREADS), CubeDim::new_1d(ELEMWISE_THREADS as u32))
}

/// `cubes` cubes as a 2-D grid (one axis holds at most 65535); kernels linearise it back.
fn grid(cubes: usize, dim: CubeDim) -> (CubeCount, CubeDim) {
    let cubes = cubes.max(1);
    let x = cubes.min(65535);
    let y = cubes.div_ceil(x);
    (CubeCount::Static(x as u32, y as u32, 1), dim)
}

/// Kernel buffer argument over a whole handle of `len` elements.
fn arg(h: &Handle, len: usize) -> BufferArg {
    // SAFETY: every handle passed here was allocated with at least `len` elements of the kernel's element
    // type (tensors are allocated exactly, weights from their plane sizes, dummies with 4 elements that the
    // kernel variant binding them never reads).
    unsafe { BufferArg::from_raw_parts(h.clone(), len.max(1)) }
}

impl WgpuBackend {
    /// Opens the default adapter (the first GPU, else a software Vulkan device such as lavapipe).
    pub fn new(opts: WgpuOptions) -> Result<Self> {
        let (device, adapter, software) = default_device()?;
        let client = <WgpuRuntime as Runtime>::client(&device);
        let limit = client.properties().memory.max_page_size as usize;
        let max_chunk_bytes = opts.max_chunk_bytes.unwrap_or(limit).min(limit).max(64);
        let dummy_f32 = client.create_from_slice(bytemuck::cast_slice(&[0f32; 4]));
        let dummy_u32 = client.create_from_slice(bytemuck::cast_slice(&[0u32; 4]));
        Ok(WgpuBackend {
            client,
            adapter,
            software,
            max_buffer_bytes: limit,
            max_chunk_bytes,
            dummy_f32,
            dummy_u32,
            rope_tables: Mutex::new(HashMap::new()),
            host_reads: AtomicU64::new(0),
        })
    }

    /// Memory a KV cache may take: the host's (integrated and software GPUs share it; wgpu does not report a
    /// discrete GPU's own).
    fn memory_limit(&self) -> Option<u64> {
        sprig_backend::physical_memory()
    }

    /// Whether the adapter is a CPU-emulated one (lavapipe, SwiftShader): correct, not fast.
    pub fn is_software(&self) -> bool {
        self.software
    }

    /// The adapter in use, e.g. "llvmpipe (LLVM 15.0.6, 256 bits) (Vulkan, Cpu)".
    pub fn adapter(&self) -> &str {
        &self.adapter
    }

    fn alloc(&self, t: &mut GpuTensor, rows: usize, cols: usize) {
        if t.handle.is_none() || t.capacity < rows * cols {
            t.capacity = (rows * cols).max(1);
            t.handle = Some(self.client.empty(4 * t.capacity));
        }
        t.rows = rows;
        t.cols = cols;
    }

    /// A scratch buffer of at least `len` u32/f32 elements, reallocated only to grow.
    fn scratch(&self, buf: &mut Option<(Handle, usize)>, len: usize) -> Handle {
        match buf {
            Some((h, cap)) if *cap >= len => h.clone(),
            _ => {
                let h = self.client.empty(4 * len.max(1));
                *buf = Some((h.clone(), len.max(1)));
                h
            }
        }
    }

    /// Device-to-host reads made so far (logits, downloads, MoE counters).
    pub fn host_reads(&self) -> u64 {
        self.host_reads.load(Ordering::Relaxed)
    }

    /// Reads a buffer back and hands its bytes to `f` (no copy beyond the transfer).
    fn read<R>(&self, h: Handle, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
        self.host_reads.fetch_add(1, Ordering::Relaxed);
        // A kernel that failed earlier (compile, binding, device fault) is reported by the read of its results.
        let bytes = self
            .client
            .read_one(h)
            .map_err(|e| BackendError::DeviceFailed { op: "read", message: format!("{e:?}") })?;
        Ok(f(&bytes))
    }

    /// Writes rows `t.saturating_sub(cap)..t` of `k`/`v` (`[t, kvd]`, positions `pos0..`) into a layer's ring
    /// (only the last `cap` survive), quantized for an int8 cache.
    #[allow(clippy::too_many_arguments)]
    fn kv_append(&self, layer: &GpuKvLayer, k: &Handle, v: &Handle, t: usize, pos0: usize, kvd: usize, hd: usize) {
        let cap = layer.cap;
        let first = t.saturating_sub(cap);
        match &layer.scales {
            None => {
                let (count, dim) = elementwise((t - first) * kvd);
                kv_append_kernel::launch(
                    &self.client,
                    count,
                    dim,
                    arg(k, t * kvd),
                    arg(v, t * kvd),
                    arg(&layer.k, cap * kvd),
                    arg(&layer.v, cap * kvd),
                    first,
                    t,
                    kvd,
                    pos0,
                    cap,
                );
            }
            Some((ks, vs)) => {
                let heads = kvd / hd;
                let words = (cap * kvd).div_ceil(4);
                let (count, dim) = elementwise((t - first) * heads);
                kv_append_q8_kernel::launch(
                    &self.client,
                    count,
                    dim,
                    arg(k, t * kvd),
                    arg(v, t * kvd),
                    arg(&layer.k, words),
                    arg(&layer.v, words),
                    arg(ks, cap * heads),
                    arg(vs, cap * heads),
                    arg(&self.dummy_f32, 4),
                    first,
                    t,
                    heads,
                    pos0,
                    cap,
                    hd,
                );
            }
        }
    }

    /// A device copy of `data` (a one-element zero buffer for empty data: bindings cannot be empty).
    fn upload_slice<T: bytemuck::Pod>(&self, data: &[T]) -> Handle {
        if data.is_empty() {
            return self.client.create_from_slice(&[0u8; 4]);
        }
        self.client.create_from_slice(bytemuck::cast_slice(data))
    }

    /// The weight planes of one chunk as kernel arguments: (wf, qs, scales, mins).
    fn planes(&self, w: &GpuWeight, c: &Chunk) -> (BufferArg, BufferArg, BufferArg, BufferArg) {
        let nb = w.cols.div_ceil(32);
        match w.kind {
            Kind::F32 => (
                arg(&c.data, c.rows * w.cols),
                arg(&self.dummy_u32, 4),
                arg(&self.dummy_f32, 4),
                arg(&self.dummy_f32, 4),
            ),
            Kind::Quant(s) => {
                let words = c.rows * nb * s.qs_bytes_per_block() / 4;
                let sc = c.scales.as_ref().expect("scales");
                let mn = c.mins.as_ref().unwrap_or(&self.dummy_f32);
                let mins_len = if c.mins.is_some() { c.rows * nb } else { 4 };
                (arg(&self.dummy_f32, 4), arg(&c.data, words), arg(sc, c.rows * nb), arg(mn, mins_len))
            }
        }
    }

    fn rope_table(&self, p: &RopeParams, positions: usize) -> (Handle, Handle, usize) {
        // Keyed by the frequencies' allocation (a model shares one per attention kind across its layers), without
        // hashing or copying them per call.
        let key = (Arc::as_ptr(&p.inv_freq) as *const f32 as usize, p.attention_factor.to_bits());
        let mut tables = self.rope_tables.lock().unwrap_or_else(|e| e.into_inner());
        let half = p.head_dim / 2;
        if let Some(t) = tables.get(&key) {
            if t.positions >= positions {
                return (t.cos.clone(), t.sin.clone(), t.positions * half);
            }
        }
        let n = positions.next_power_of_two().max(256);
        let (mut cos, mut sin) = (Vec::with_capacity(n * half), Vec::with_capacity(n * half));
        for pos in 0..n {
            // The CPU backend's f32 formula, so both backends rotate by the same angles.
            let pos = pos as f32;
            let af = p.attention_factor;
            for &freq in p.inv_freq.iter().take(half) {
                let (s, c) = (pos * freq).sin_cos();
                let (s, c) = if af == 1.0 { (s, c) } else { (s * af, c * af) };
                cos.push(c);
                sin.push(s);
            }
        }
        let t = RopeTable {
            _freqs: p.inv_freq.clone(),
            positions: n,
            cos: self.upload_slice(&cos),
            sin: self.upload_slice(&sin),
        };
        let r = (t.cos.clone(), t.sin.clone(), n * half);
        tables.insert(key, t);
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn gathered_linear(
        &self,
        x: &GpuTensor,
        idx: &Handle,
        w: &GpuWeight,
        n_experts: usize,
        vtokens: usize,
        x_div: usize,
        out: &mut GpuTensor,
    ) {
        let expert_rows = w.rows / n_experts;
        self.alloc(out, vtokens, expert_rows);
        let (kind, has_min) = w.kernel_kind();
        for c in &w.chunks {
            let (wf, qs, sc, mn) = self.planes(w, c);
            moe_linear_kernel::launch(
                &self.client,
                CubeCount::Static(expert_rows.div_ceil(ROWS_PER_CUBE) as u32, vtokens as u32, 1),
                CubeDim::new_2d(LANES as u32, ROWS_PER_CUBE as u32),
                arg(&x.h(), x.len()),
                arg(idx, vtokens),
                wf,
                qs,
                sc,
                mn,
                arg(&out.h(), out.len()),
                vtokens,
                x_div,
                w.cols,
                expert_rows,
                c.rows,
                c.row0,
                kind,
                has_min,
            );
        }
    }
}

/// Tokens per cube of the prefill GEMM (each dequantized weight block is reused this many times).
const PREFILL_TILE: usize = 8;

impl Backend for WgpuBackend {
    type Tensor = GpuTensor;
    type Weight = GpuWeight;
    type KvCache = GpuKvCache;
    type MoeState = GpuMoeState;

    fn name(&self) -> String {
        format!("wgpu: {}", self.adapter)
    }

    fn load_weight(&self, file: &Arc<ModelFile>, name: &str) -> Result<GpuWeight> {
        let v = file.weight(name).map_err(BackendError::from)?;
        // The shaders read row-major planes: rows stored in groups of 16 go up reordered (the upload is a copy).
        let row_major;
        let v = match v {
            WeightView::Quant(q) if q.layout() != RowLayout::RowMajor => {
                row_major = q.to_owned_row_major();
                WeightView::Quant(row_major.view())
            }
            other => other,
        };
        let (rows, cols) = (v.rows(), v.cols());
        let file_bytes = v.bytes();
        let nb = cols.div_ceil(32);
        let (kind, row_bytes) = match &v {
            WeightView::Quant(q) => {
                // Q6K goes up widened to int8 (below).
                let up = if q.scheme() == Scheme::Q6K { Scheme::Q8 } else { q.scheme() };
                (Kind::Quant(up), nb * up.qs_bytes_per_block())
            }
            _ => (Kind::F32, 4 * cols),
        };
        if rows == 0 || cols == 0 {
            return Err(BackendError::Shape { op: "load_weight", detail: format!("{name}: empty weight ({rows}x{cols})") });
        }
        let per_chunk = (self.max_chunk_bytes / row_bytes).max(1);
        let mut chunks = Vec::new();
        let mut row0 = 0;
        while row0 < rows {
            let n = per_chunk.min(rows - row0);
            let part = v.rows_range(row0, row0 + n);
            // Q6K's scales per 16 weights have no shader yet: its rows go up as int8 (absmax per 32, the
            // precision GGUF Q6_K files had on every backend before the CPU ran them natively).
            let widened;
            let part = match part {
                WeightView::Quant(q) if q.scheme() == Scheme::Q6K => {
                    widened = sprig_quant::quantize::quantize_absmax_q8(&q.dequantize(), q.rows(), q.cols());
                    WeightView::Quant(widened.view())
                }
                other => other,
            };
            let chunk = match part {
                WeightView::Quant(q) => {
                    if q.qs().len() % 4 != 0 {
                        return Err(BackendError::Shape {
                            op: "load_weight",
                            detail: format!("{name}: code plane of {} bytes is not whole words", q.qs().len()),
                        });
                    }
                    let words: Vec<u32> =
                        q.qs().chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
                    let (scales, mins) = if q.scheme() == Scheme::Q4K {
                        // Per-superblock scales: each block's product unpacked here (exact in f32), so the
                        // shader sees Q4A's per-block scale and min.
                        let nb = q.nb();
                        let (mut d, mut m) = (vec![0.0f32; q.rows() * nb], vec![0.0f32; q.rows() * nb]);
                        for r in 0..q.rows() {
                            q.row_block_scales(r, &mut d[r * nb..(r + 1) * nb], &mut m[r * nb..(r + 1) * nb]);
                        }
                        (d, Some(m))
                    } else {
                        let scales: Vec<f32> = q.scales().iter().map(|s| s.to_f32()).collect();
                        (scales, q.mins().map(|m| m.iter().map(|s| s.to_f32()).collect::<Vec<_>>()))
                    };
                    let mins = mins.map(|m| self.upload_slice(&m));
                    Chunk {
                        row0,
                        rows: n,
                        data: self.upload_slice(&words),
                        scales: Some(self.upload_slice(&scales)),
                        mins,
                    }
                }
                other => Chunk { row0, rows: n, data: self.upload_slice(&other.to_f32()), scales: None, mins: None },
            };
            chunks.push(chunk);
            row0 += n;
        }
        Ok(GpuWeight { rows, cols, kind, chunks, file_bytes })
    }

    fn weight_shape(&self, w: &GpuWeight) -> (usize, usize) {
        (w.rows, w.cols)
    }

    fn tensor(&self) -> GpuTensor {
        GpuTensor { handle: None, rows: 0, cols: 0, capacity: 0 }
    }
    fn shape(&self, t: &GpuTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }
    fn upload(&self, data: &[f32], rows: usize, cols: usize, t: &mut GpuTensor) -> Result<()> {
        ensure_shape!(data.len() == rows * cols, "upload", "{} values for a {rows}x{cols} tensor", data.len());
        t.handle = Some(self.upload_slice(data));
        t.rows = rows;
        t.cols = cols;
        t.capacity = data.len().max(1);
        Ok(())
    }
    fn download(&self, t: &GpuTensor, out: &mut Vec<f32>) -> Result<()> {
        out.clear();
        if t.len() == 0 {
            return Ok(());
        }
        self.read(t.h(), |bytes| out.extend_from_slice(&bytemuck::cast_slice::<u8, f32>(bytes)[..t.len()]))
    }
    fn rows(&self, x: &GpuTensor, start: usize, n: usize, out: &mut GpuTensor) -> Result<()> {
        ensure_shape!(start + n <= x.rows, "rows", "rows {start}..{} of {}", start + n, x.rows);
        self.alloc(out, n, x.cols);
        let len = n * x.cols;
        let (count, dim) = elementwise(len);
        copy_kernel::launch(&self.client, count, dim, arg(&x.h(), x.len()), arg(&out.h(), len), start * x.cols, 0, len);
        Ok(())
    }

    fn set_rows(&self, dst: &mut GpuTensor, start: usize, src: &GpuTensor) -> Result<()> {
        let (n, c) = (src.rows, src.cols);
        ensure_shape!(c == dst.cols && start + n <= dst.rows, "set_rows", "{n}x{c} at row {start} of {}x{}", dst.rows, dst.cols);
        let len = n * c;
        let (count, dim) = elementwise(len);
        copy_kernel::launch(&self.client, count, dim, arg(&src.h(), src.len()), arg(&dst.h(), dst.len()), 0, start * c, len);
        Ok(())
    }

    fn embed(&self, table: &GpuWeight, tokens: &[u32], scale: f32, out: &mut GpuTensor) -> Result<()> {
        let cols = table.cols;
        self.alloc(out, tokens.len(), cols);
        let ids = self.upload_slice(tokens);
        let (kind, has_min) = table.kernel_kind();
        let len = tokens.len() * cols;
        for c in &table.chunks {
            let (wf, qs, sc, mn) = self.planes(table, c);
            let (count, dim) = elementwise(len);
            embed_kernel::launch(
                &self.client,
                count,
                dim,
                arg(&ids, tokens.len()),
                wf,
                qs,
                sc,
                mn,
                arg(&out.h(), len),
                tokens.len(),
                cols,
                c.rows,
                c.row0,
                scale,
                kind,
                has_min,
            );
        }
        Ok(())
    }

    fn rms_norm(&self, x: &GpuTensor, w: &GpuWeight, eps: f32, out: &mut GpuTensor) -> Result<()> {
        let g = w.cols;
        ensure_shape!(g > 0 && x.cols % g == 0, "rms_norm", "width {} is not a multiple of {g}", x.cols);
        ensure_shape!(w.kind == Kind::F32, "rms_norm", "norm weights must be float");
        self.alloc(out, x.rows, x.cols);
        let groups = x.len() / g;
        let (count, dim) = grid(groups, CubeDim::new_1d(REDUCE_THREADS as u32));
        rms_norm_kernel::launch(
            &self.client,
            count,
            dim,
            arg(&x.h(), x.len()),
            arg(&w.chunks[0].data, g),
            arg(&out.h(), out.len()),
            groups,
            g,
            eps,
        );
        Ok(())
    }

    fn linear(&self, x: &GpuTensor, w: &GpuWeight, bias: Option<&GpuWeight>, out: &mut GpuTensor) -> Result<()> {
        ensure_shape!(x.cols == w.cols, "linear", "input width {} vs weight {}x{}", x.cols, w.rows, w.cols);
        let t = x.rows;
        self.alloc(out, t, w.rows);
        let (kind, has_min) = w.kernel_kind();
        let tile = if t == 1 { 1 } else { PREFILL_TILE };
        let bias_arg = || match bias {
            Some(b) => arg(&b.chunks[0].data, b.cols),
            None => arg(&self.dummy_f32, 4),
        };
        for c in &w.chunks {
            let (wf, qs, sc, mn) = self.planes(w, c);
            linear_kernel::launch(
                &self.client,
                CubeCount::Static(c.rows.div_ceil(ROWS_PER_CUBE) as u32, t.div_ceil(tile) as u32, 1),
                CubeDim::new_2d(LANES as u32, ROWS_PER_CUBE as u32),
                arg(&x.h(), x.len()),
                wf,
                qs,
                sc,
                mn,
                bias_arg(),
                arg(&out.h(), out.len()),
                t,
                w.cols,
                c.rows,
                c.row0,
                w.rows,
                kind,
                has_min,
                bias.is_some(),
                tile,
            );
        }
        Ok(())
    }

    fn rope(&self, x: &mut GpuTensor, pos0: usize, p: &RopeParams) -> Result<()> {
        ensure_shape!(x.cols == p.n_heads * p.head_dim, "rope", "width {} for {} heads", x.cols, p.n_heads);
        let (cos, sin, len) = self.rope_table(p, pos0 + x.rows);
        let n = x.rows * p.n_heads * (p.head_dim / 2);
        let (count, dim) = elementwise(n);
        rope_kernel::launch(
            &self.client,
            count,
            dim,
            arg(&x.h(), x.len()),
            arg(&cos, len),
            arg(&sin, len),
            x.rows,
            p.n_heads,
            p.head_dim,
            pos0,
            p.layout == RopeLayout::Adjacent,
        );
        Ok(())
    }

    fn attention(
        &self,
        q: &GpuTensor,
        k: &GpuTensor,
        v: &GpuTensor,
        cache: &mut GpuKvCache,
        layer: usize,
        pos0: usize,
        p: &AttentionParams,
        out: &mut GpuTensor,
    ) -> Result<()> {
        let t = q.rows;
        let hd = p.head_dim;
        let (qd, kvd) = (p.n_heads * hd, p.n_kv_heads * hd);
        ensure_shape!(
            (q.cols, k.cols, v.cols, cache.kv_dim) == (qd, kvd, kvd, kvd),
            "attention",
            "widths q {} k {} v {} cache {} for {qd}/{kvd}",
            q.cols,
            k.cols,
            v.cols,
            cache.kv_dim
        );
        ensure_shape!(layer < cache.layers.len(), "attention", "layer {layer} of a {}-layer cache", cache.layers.len());
        let GpuKvLayer { k: kc, v: vc, cap, scales } = cache.layers[layer].clone();
        ensure_shape!(hd == cache.head_dim, "attention", "heads of {hd} in a cache of heads of {}", cache.head_dim);
        self.alloc(out, t, qd);
        // An int8 cache: the batch's own keys and values are attended as the cache will hold them.
        let (kh, vh) = match &scales {
            None => (k.h(), v.h()),
            Some(_) => {
                let round = |x: &GpuTensor| {
                    let r = self.client.empty(4 * x.len().max(1));
                    let heads = x.len() / hd;
                    let (count, dim) = elementwise(heads);
                    kv_round_trip_kernel::launch(
                        &self.client,
                        count,
                        dim,
                        arg(&x.h(), x.len()),
                        arg(&r, x.len()),
                        arg(&self.dummy_u32, 4),
                        arg(&self.dummy_f32, 4),
                        heads,
                        hd,
                    );
                    r
                };
                (round(k), round(v))
            }
        };
        let (count, dim) = grid(t * p.n_heads, CubeDim::new_1d(REDUCE_THREADS as u32));
        let words = (cap * kvd).div_ceil(4);
        let d32 = |h: &Handle, len: usize| if scales.is_some() { arg(&self.dummy_f32, 4) } else { arg(h, len) };
        let (kq, vq, ks, vs) = match &scales {
            Some((ks, vs)) => (arg(&kc, words), arg(&vc, words), arg(ks, cap * p.n_kv_heads), arg(vs, cap * p.n_kv_heads)),
            None => (arg(&self.dummy_u32, 4), arg(&self.dummy_u32, 4), arg(&self.dummy_f32, 4), arg(&self.dummy_f32, 4)),
        };
        attention_kernel::launch(
            &self.client,
            count,
            dim,
            arg(&q.h(), q.len()),
            arg(&kh, k.len()),
            arg(&vh, v.len()),
            d32(&kc, cap * kvd),
            d32(&vc, cap * kvd),
            kq,
            vq,
            ks,
            vs,
            arg(&out.h(), out.len()),
            t,
            p.n_heads,
            p.n_kv_heads,
            pos0,
            cap,
            p.window.unwrap_or(0),
            p.scale,
            hd,
            scales.is_some(),
        );
        // Only the last `cap` new entries survive in the ring.
        self.kv_append(&cache.layers[layer], &k.h(), &v.h(), t, pos0, kvd, hd);
        Ok(())
    }

    /// Fused (one kernel instead of the default's three).
    fn glu(&self, gate: &GpuTensor, up: &GpuTensor, act: Activation, out: &mut GpuTensor) -> Result<()> {
        ensure_shape!((gate.rows, gate.cols) == (up.rows, up.cols), "glu", "gate and up differ in shape");
        self.alloc(out, gate.rows, gate.cols);
        let n = gate.len();
        let (count, dim) = elementwise(n);
        glu_kernel::launch(
            &self.client,
            count,
            dim,
            arg(&gate.h(), n),
            arg(&up.h(), n),
            arg(&out.h(), n),
            n,
            act == Activation::GeluTanh,
        );
        Ok(())
    }

    fn add(&self, x: &mut GpuTensor, y: &GpuTensor) -> Result<()> {
        ensure_shape!((x.rows, x.cols) == (y.rows, y.cols), "add", "{}x{} + {}x{}", x.rows, x.cols, y.rows, y.cols);
        let n = x.len();
        let (count, dim) = elementwise(n);
        add_kernel::launch(&self.client, count, dim, arg(&x.h(), n), arg(&y.h(), n), n);
        Ok(())
    }

    fn mul(&self, x: &mut GpuTensor, y: &GpuTensor) -> Result<()> {
        let (r, c) = (x.rows, x.cols);
        ensure_shape!(y.rows == r && (y.cols == c || y.cols == 1), "mul", "{r}x{c} * {}x{}", y.rows, y.cols);
        let n = x.len();
        let (count, dim) = elementwise(n);
        mul_kernel::launch(&self.client, count, dim, arg(&x.h(), n), arg(&y.h(), y.len()), n, c.max(1), y.cols);
        Ok(())
    }

    fn map(&self, x: &mut GpuTensor, f: Unary) -> Result<()> {
        let (op, s) = match f {
            Unary::Scale(s) => (0, s),
            Unary::Tanh => (1, 0.0),
            Unary::Sigmoid => (2, 0.0),
            Unary::Act(Activation::Silu) => (3, 0.0),
            Unary::Act(Activation::GeluTanh) => (4, 0.0),
        };
        let n = x.len();
        let (count, dim) = elementwise(n);
        map_kernel::launch(&self.client, count, dim, arg(&x.h(), n), n, s, op);
        Ok(())
    }

    /// Routing, the gathered expert GLU, the weighted combine and the usage counters all run on the device:
    /// no host round trip, and no allocation once the state has seen the largest batch.
    fn moe(
        &self,
        x: &GpuTensor,
        router_logits: &GpuTensor,
        experts: &ExpertWeights<'_, GpuWeight>,
        p: &MoeParams,
        out: &mut GpuTensor,
        st: &mut GpuMoeState,
    ) -> Result<()> {
        let (t, d) = (x.rows, x.cols);
        let (ne, k) = (p.n_experts, p.top_k.min(p.n_experts));
        ensure_shape!((router_logits.rows, router_logits.cols) == (t, ne), "moe", "router logits for {ne} experts");
        ensure_shape!(st.n_experts == ne, "moe", "a state made for {} experts", st.n_experts);
        let scores = self.scratch(&mut st.scores, t * ne);
        let idx = self.scratch(&mut st.idx, t * k);
        let wts = self.scratch(&mut st.wts, t * k);
        let (count, dim) = elementwise(t);
        moe_route_kernel::launch(
            &self.client,
            count,
            dim,
            arg(&router_logits.h(), t * ne),
            arg(&scores, t * ne),
            arg(&idx, t * k),
            arg(&wts, t * k),
            t,
            ne,
            k,
            p.routed_scale,
            p.scoring == RouterScoring::Sigmoid,
            p.norm_topk,
        );
        let (count, dim) = elementwise(ne);
        moe_count_kernel::launch(&self.client, count, dim, arg(&idx, t * k), arg(&st.counters, 2 * ne), t * k, ne);
        let [g, u, h, y] = &mut st.hidden;
        self.gathered_linear(x, &idx, experts.gate, ne, t * k, k, g);
        self.gathered_linear(x, &idx, experts.up, ne, t * k, k, u);
        self.glu(g, u, p.activation, h)?;
        self.gathered_linear(h, &idx, experts.down, ne, t * k, 1, y);
        self.alloc(out, t, d);
        let (count, dim) = elementwise(t * d);
        moe_combine_kernel::launch(
            &self.client,
            count,
            dim,
            arg(&y.h(), y.len()),
            arg(&wts, t * k),
            arg(&out.h(), t * d),
            t,
            d,
            k,
        );
        st.expert_bytes = sprig_backend::moe::expert_bytes(
            experts.gate.file_bytes,
            experts.up.file_bytes,
            experts.down.file_bytes,
            ne,
        );
        Ok(())
    }

    fn moe_state(&self, p: &MoeParams) -> Result<GpuMoeState> {
        Ok(GpuMoeState {
            n_experts: p.n_experts,
            counters: self.upload_slice(&vec![0u32; 2 * p.n_experts]),
            expert_bytes: 0,
            scores: None,
            idx: None,
            wts: None,
            hidden: std::array::from_fn(|_| self.tensor()),
        })
    }

    fn moe_usage(&self, st: &GpuMoeState) -> Result<MoeUsage> {
        let ne = st.n_experts;
        self.read(st.counters.clone(), |bytes| {
            let counts: &[u32] = bytemuck::cast_slice(bytes);
            let runs: u64 = counts[ne..2 * ne].iter().map(|&r| r as u64).sum();
            MoeUsage { tokens: counts[..ne].iter().map(|&c| c as u64).collect(), bytes_read: runs * st.expert_bytes }
        })
    }

    fn kv_read(
        &self,
        cache: &GpuKvCache,
        layer: usize,
        positions: std::ops::Range<usize>,
        k: &mut Vec<f32>,
        v: &mut Vec<f32>,
    ) -> Result<()> {
        ensure_shape!(layer < cache.layers.len(), "kv_read", "layer {layer} of a {}-layer cache", cache.layers.len());
        let GpuKvLayer { k: kc, v: vc, cap, scales } = cache.layers[layer].clone();
        let (kvd, hd) = (cache.kv_dim, cache.head_dim);
        ensure_shape!(positions.len() <= cap, "kv_read", "{} positions of a {cap}-slot layer", positions.len());
        match scales {
            None => {
                for (buf, out) in [(kc, k), (vc, v)] {
                    out.clear();
                    self.read(buf, |bytes| {
                        let all: &[f32] = bytemuck::cast_slice(bytes);
                        for p in positions.clone() {
                            let slot = p % cap;
                            out.extend_from_slice(&all[slot * kvd..(slot + 1) * kvd]);
                        }
                    })?;
                }
            }
            Some((ks, vs)) => {
                let heads = kvd / hd;
                for ((buf, sc), out) in [((kc, ks), k), ((vc, vs), v)] {
                    out.clear();
                    let scale: Vec<f32> = self.read(sc, |b| bytemuck::cast_slice::<u8, f32>(b).to_vec())?;
                    self.read(buf, |bytes| {
                        // Words hold four codes, little-endian: the bytes are the codes in order.
                        for p in positions.clone() {
                            let slot = p % cap;
                            let codes = &bytes[slot * kvd..(slot + 1) * kvd];
                            out.extend(codes.iter().enumerate().map(|(i, &c)| c as i8 as f32 * scale[slot * heads + i / hd]));
                        }
                    })?;
                }
            }
        }
        Ok(())
    }

    fn kv_write(&self, cache: &mut GpuKvCache, layer: usize, pos0: usize, k: &[f32], v: &[f32]) -> Result<()> {
        ensure_shape!(layer < cache.layers.len(), "kv_write", "layer {layer} of a {}-layer cache", cache.layers.len());
        let (kvd, hd) = (cache.kv_dim.max(1), cache.head_dim);
        let n = sprig_backend::kv_write_positions(k, v, kvd, cache.layers[layer].cap)?;
        if n == 0 {
            return Ok(());
        }
        // The rows go up once, then into their ring slots by the kernel decode appends with.
        let (ku, vu) = (self.upload_slice(k), self.upload_slice(v));
        self.kv_append(&cache.layers[layer], &ku, &vu, n, pos0, kvd, hd);
        Ok(())
    }

    fn kv_cache(&self, layout: &KvLayout) -> Result<GpuKvCache> {
        layout.check_fits(self.memory_limit())?;
        for l in 0..layout.windows.len() {
            let bytes = 4 * layout.layer_capacity(l).max(1) * layout.kv_dim.max(1);
            if bytes > self.max_buffer_bytes {
                return Err(BackendError::OutOfMemory {
                    what: format!(
                        "one layer's buffer of a KV cache of {} tokens (the device's largest buffer; use a smaller \
                         context)",
                        layout.max_context
                    ),
                    needed: bytes as u64,
                    available: self.max_buffer_bytes as u64,
                });
            }
        }
        let q8 = layout.dtype == sprig_backend::KvDtype::Q8;
        ensure_shape!(
            layout.head_dim > 0 && layout.kv_dim.is_multiple_of(layout.head_dim) && (!q8 || layout.head_dim.is_multiple_of(4)),
            "kv_cache",
            "kv_dim {} in heads of {} (an int8 cache packs heads of a multiple of 4)",
            layout.kv_dim,
            layout.head_dim
        );
        let heads = layout.kv_dim / layout.head_dim;
        let layers = (0..layout.windows.len())
            .map(|l| {
                let cap = layout.layer_capacity(l).max(1);
                let elems = cap * layout.kv_dim.max(1);
                if q8 {
                    let bytes = 4 * elems.div_ceil(4);
                    let scales = (self.client.empty(4 * cap * heads), self.client.empty(4 * cap * heads));
                    GpuKvLayer { k: self.client.empty(bytes), v: self.client.empty(bytes), cap, scales: Some(scales) }
                } else {
                    GpuKvLayer { k: self.client.empty(4 * elems), v: self.client.empty(4 * elems), cap, scales: None }
                }
            })
            .collect();
        Ok(GpuKvCache { layers, kv_dim: layout.kv_dim, head_dim: layout.head_dim })
    }
}
