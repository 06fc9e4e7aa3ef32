//! Writing and memory-mapped reading of the native container.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use half::{bf16, f16};
use memmap2::{Mmap, MmapMut};
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use sprig_quant::scheme::{blocks_per_row, QMatrixOwned, RowLayout, ROW_GROUP};
use sprig_quant::{QMatrix, Scheme};

use crate::config::{ModelConfig, MAX_DIM};
use crate::{FormatError, Result};

/// Bumped whenever the layout or the meaning of a metadata field changes. 2: quantized tensors may store their
/// rows in groups of 16 (`"layout": "rows16"` in the index); version-1 files (all row-major) still open.
pub const FORMAT_VERSION: &str = "2";
/// Older versions this reader still opens.
const READS_VERSIONS: [&str; 2] = ["1", FORMAT_VERSION];
/// Every tensor's data starts at a multiple of this many bytes from the start of the file.
pub const ALIGN: usize = 64;

pub const META_VERSION: &str = "sprig.format_version";
pub const META_CONFIG: &str = "sprig.config";
pub const META_TOKENIZER: &str = "sprig.tokenizer";
pub const META_CHAT_TEMPLATE: &str = "sprig.chat_template";
pub const META_TENSORS: &str = "sprig.tensors";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FloatDType {
    F32,
    F16,
    BF16,
}

impl FloatDType {
    fn size(self) -> usize {
        match self {
            FloatDType::F32 => 4,
            _ => 2,
        }
    }
    fn st(self) -> Dtype {
        match self {
            FloatDType::F32 => Dtype::F32,
            FloatDType::F16 => Dtype::F16,
            FloatDType::BF16 => Dtype::BF16,
        }
    }
}

/// One logical tensor as listed in the `sprig.tensors` metadata index.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct IndexEntry {
    /// "f32" | "f16" | "bf16" | a [`Scheme`] name.
    #[serde(rename = "type")]
    ty: String,
    shape: Vec<usize>,
    /// Quantized tensors: [`RowLayout`] name; absent = row-major.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    layout: Option<String>,
}

/// Where a logical tensor's bytes lie in the file (byte ranges are absolute offsets into the mapping).
#[derive(Clone, Debug)]
pub enum TensorEntry {
    Float {
        dtype: FloatDType,
        shape: Vec<usize>,
        range: (usize, usize),
    },
    Quant {
        scheme: Scheme,
        rows: usize,
        cols: usize,
        qs: (usize, usize),
        scale: (usize, usize),
        min: Option<(usize, usize)>,
        sub: Option<(usize, usize)>,
        layout: RowLayout,
    },
}

impl TensorEntry {
    pub fn shape(&self) -> Vec<usize> {
        match self {
            TensorEntry::Float { shape, .. } => shape.clone(),
            TensorEntry::Quant { rows, cols, .. } => vec![*rows, *cols],
        }
    }
    pub fn type_name(&self) -> &'static str {
        match self {
            TensorEntry::Float { dtype: FloatDType::F32, .. } => "f32",
            TensorEntry::Float { dtype: FloatDType::F16, .. } => "f16",
            TensorEntry::Float { dtype: FloatDType::BF16, .. } => "bf16",
            TensorEntry::Quant { scheme, .. } => scheme.name(),
        }
    }
    /// How a quantized tensor's rows are stored (`None` for float tensors).
    pub fn layout(&self) -> Option<RowLayout> {
        match self {
            TensorEntry::Float { .. } => None,
            TensorEntry::Quant { layout, .. } => Some(*layout),
        }
    }
    /// Bytes this tensor occupies in the file.
    pub fn bytes(&self) -> usize {
        match self {
            TensorEntry::Float { range, .. } => range.1 - range.0,
            TensorEntry::Quant { qs, scale, min, sub, .. } => {
                (qs.1 - qs.0) + (scale.1 - scale.0) + min.map_or(0, |m| m.1 - m.0) + sub.map_or(0, |b| b.1 - b.0)
            }
        }
    }
    pub fn numel(&self) -> usize {
        self.shape().iter().product()
    }
}

/// A borrowed view of one weight tensor, pointing into the mapping.
#[derive(Clone, Copy, Debug)]
pub enum WeightView<'a> {
    F32 { data: &'a [f32], rows: usize, cols: usize },
    F16 { data: &'a [f16], rows: usize, cols: usize },
    BF16 { data: &'a [bf16], rows: usize, cols: usize },
    Quant(QMatrix<'a>),
}

impl<'a> WeightView<'a> {
    pub fn rows(&self) -> usize {
        match self {
            WeightView::F32 { rows, .. } | WeightView::F16 { rows, .. } | WeightView::BF16 { rows, .. } => *rows,
            WeightView::Quant(q) => q.rows(),
        }
    }
    pub fn cols(&self) -> usize {
        match self {
            WeightView::F32 { cols, .. } | WeightView::F16 { cols, .. } | WeightView::BF16 { cols, .. } => *cols,
            WeightView::Quant(q) => q.cols(),
        }
    }
    /// Dequantizes row `r` into `out`.
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        let c = self.cols();
        match self {
            WeightView::F32 { data, .. } => out.copy_from_slice(&data[r * c..(r + 1) * c]),
            WeightView::F16 { data, .. } => {
                for (o, v) in out.iter_mut().zip(&data[r * c..(r + 1) * c]) {
                    *o = v.to_f32();
                }
            }
            WeightView::BF16 { data, .. } => {
                for (o, v) in out.iter_mut().zip(&data[r * c..(r + 1) * c]) {
                    *o = v.to_f32();
                }
            }
            WeightView::Quant(q) => q.dequantize_row(r, out),
        }
    }
    pub fn to_f32(&self) -> Vec<f32> {
        let (r, c) = (self.rows(), self.cols());
        let mut out = vec![0.0; r * c];
        for i in 0..r {
            self.row_to_f32(i, &mut out[i * c..(i + 1) * c]);
        }
        out
    }
    /// Rows `start..end` as a view of their own (an expert's block of a stacked tensor).
    pub fn rows_range(&self, start: usize, end: usize) -> WeightView<'a> {
        assert!(start <= end && end <= self.rows(), "rows {start}..{end} of {}", self.rows());
        let c = self.cols();
        let rows = end - start;
        match *self {
            WeightView::F32 { data, .. } => WeightView::F32 { data: &data[start * c..end * c], rows, cols: c },
            WeightView::F16 { data, .. } => WeightView::F16 { data: &data[start * c..end * c], rows, cols: c },
            WeightView::BF16 { data, .. } => WeightView::BF16 { data: &data[start * c..end * c], rows, cols: c },
            WeightView::Quant(q) => WeightView::Quant(q.rows_range(start, end)),
        }
    }
    /// Bytes of weight data this view covers.
    pub fn bytes(&self) -> usize {
        match self {
            WeightView::F32 { data, .. } => data.len() * 4,
            WeightView::F16 { data, .. } => data.len() * 2,
            WeightView::BF16 { data, .. } => data.len() * 2,
            WeightView::Quant(q) => q.bytes(),
        }
    }
    /// Pointer to the first byte of the weight data (used by zero-copy tests).
    pub fn data_ptr(&self) -> *const u8 {
        match self {
            WeightView::F32 { data, .. } => data.as_ptr() as *const u8,
            WeightView::F16 { data, .. } => data.as_ptr() as *const u8,
            WeightView::BF16 { data, .. } => data.as_ptr() as *const u8,
            WeightView::Quant(q) => q.qs().as_ptr(),
        }
    }
}

/// Builds a container in memory and writes it out.
pub struct ContainerWriter {
    metadata: BTreeMap<String, String>,
    index: BTreeMap<String, IndexEntry>,
    physical: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
    /// Store quantized matrices' rows in groups of 16.
    group_rows: bool,
    /// Routed experts per MoE layer (0 for dense models): stacked expert tensors are grouped only per expert.
    experts: usize,
}

impl ContainerWriter {
    pub fn new(config: &ModelConfig, tokenizer_json: String, chat_template: Option<String>) -> Self {
        let mut metadata = BTreeMap::new();
        metadata.insert(META_VERSION.into(), FORMAT_VERSION.into());
        metadata.insert(META_CONFIG.into(), serde_json::to_string(config).expect("config serialises"));
        metadata.insert(META_TOKENIZER.into(), tokenizer_json);
        if let Some(t) = chat_template {
            metadata.insert(META_CHAT_TEMPLATE.into(), t);
        }
        let experts = config.moe.as_ref().map_or(0, |m| m.n_experts);
        ContainerWriter { metadata, index: BTreeMap::new(), physical: Vec::new(), group_rows: true, experts }
    }

    pub fn set_metadata(&mut self, key: &str, value: String) {
        self.metadata.insert(key.to_string(), value);
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn add_f32(&mut self, name: &str, shape: &[usize], data: &[f32]) {
        self.add_float(name, FloatDType::F32, shape, bytemuck::cast_slice(data).to_vec());
    }
    pub fn add_f16(&mut self, name: &str, shape: &[usize], data: &[f16]) {
        self.add_float(name, FloatDType::F16, shape, bytemuck::cast_slice(data).to_vec());
    }
    pub fn add_bf16(&mut self, name: &str, shape: &[usize], data: &[bf16]) {
        self.add_float(name, FloatDType::BF16, shape, bytemuck::cast_slice(data).to_vec());
    }

    fn add_float(&mut self, name: &str, dtype: FloatDType, shape: &[usize], bytes: Vec<u8>) {
        assert_eq!(bytes.len(), shape.iter().product::<usize>() * dtype.size(), "{name}: size");
        let ty = match dtype {
            FloatDType::F32 => "f32",
            FloatDType::F16 => "f16",
            FloatDType::BF16 => "bf16",
        };
        self.index.insert(name.into(), IndexEntry { ty: ty.into(), shape: shape.to_vec(), layout: None });
        self.physical.push((name.into(), dtype.st(), shape.to_vec(), bytes));
    }

    /// Adds a quantized matrix, its rows in groups of 16 ([`RowLayout::Grouped`], what the CPU kernels read
    /// fastest) unless it has fewer than 16 rows, or it stacks MoE experts (`*exps*`) whose row count is not a
    /// multiple of 16 (each expert is read as rows of its own).
    pub fn add_quant(&mut self, name: &str, m: &QMatrixOwned) {
        let layout = self.layout_for(name, m.rows);
        let regrouped;
        let m = if m.layout == layout {
            m
        } else {
            let mut c = m.clone();
            c.set_layout(layout);
            regrouped = c;
            &regrouped
        };
        self.add_quant_as_is(name, m)
    }

    /// The layout [`ContainerWriter::add_quant`] stores a matrix of `rows` rows named `name` in.
    fn layout_for(&self, name: &str, rows: usize) -> RowLayout {
        if !self.group_rows || rows < ROW_GROUP {
            return RowLayout::RowMajor;
        }
        if name.contains("exps") {
            // Without the config's expert count the experts' boundaries are unknown: row-major.
            let experts = self.experts;
            if experts == 0 || !rows.is_multiple_of(experts) || !(rows / experts).is_multiple_of(ROW_GROUP) {
                return RowLayout::RowMajor;
            }
        }
        RowLayout::Grouped
    }

    /// Whether [`ContainerWriter::add_quant`] groups rows (on by default; off writes every matrix row-major,
    /// as version-1 files were).
    pub fn set_group_rows(&mut self, on: bool) {
        self.group_rows = on;
    }

    /// Adds a quantized matrix in the layout it is in.
    pub fn add_quant_as_is(&mut self, name: &str, m: &QMatrixOwned) {
        let scheme = m.scheme.expect("scheme");
        let nb = blocks_per_row(m.cols);
        let layout = (m.layout != RowLayout::RowMajor).then(|| m.layout.name().to_string());
        self.index.insert(name.into(), IndexEntry { ty: scheme.name().into(), shape: vec![m.rows, m.cols], layout });
        let qdt = if scheme.signed_codes() { Dtype::I8 } else { Dtype::U8 };
        let qcols = nb * scheme.qs_bytes_per_block();
        self.physical.push((format!("{name}.qs"), qdt, vec![m.rows, qcols], m.qs.clone()));
        let ns = scheme.scales_per_row(nb);
        self.physical.push((
            format!("{name}.scale"),
            Dtype::F16,
            vec![m.rows, ns],
            bytemuck::cast_slice(&m.scales).to_vec(),
        ));
        if let Some(mins) = &m.mins {
            self.physical.push((
                format!("{name}.min"),
                Dtype::F16,
                vec![m.rows, ns],
                bytemuck::cast_slice(mins).to_vec(),
            ));
        }
        if let Some(sub) = &m.sub {
            let shape = vec![m.rows, scheme.sub_bytes_per_row(nb)];
            let dt = if scheme == Scheme::Q6K { Dtype::I8 } else { Dtype::U8 };
            self.physical.push((format!("{name}.sub"), dt, shape, sub.clone()));
        }
    }

    /// Serialises the whole file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out).expect("writing to a Vec cannot fail");
        out
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let io = |e| FormatError::Io { path: path.display().to_string(), source: e };
        // Beside the destination under a name of this process's own, then renamed over it (atomic).
        let tmp = path.with_extension(format!("safetensors.{}.partial", std::process::id()));
        let f = std::fs::File::create(&tmp).map_err(io)?;
        let mut w = std::io::BufWriter::new(f);
        self.write_to(&mut w).map_err(io)?;
        w.into_inner().map_err(|e| io(e.into_error()))?.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    fn write_to(&self, w: &mut impl Write) -> std::io::Result<()> {
        let (h, layout) = self.header();
        w.write_all(&(h.len() as u64).to_le_bytes())?;
        w.write_all(&h)?;
        let zeros = [0u8; ALIGN];
        for ((pad, _), (_, _, _, bytes)) in layout.iter().zip(&self.physical) {
            w.write_all(&zeros[..*pad])?;
            w.write_all(bytes)?;
        }
        Ok(())
    }

    /// The serialised header (padded so the data starts 64-byte aligned) and each tensor's (padding, length).
    fn header(&self) -> (Vec<u8>, Vec<(usize, usize)>) {
        let mut meta = self.metadata.clone();
        meta.insert(META_TENSORS.into(), serde_json::to_string(&self.index).expect("index serialises"));
        // Lay out tensors with padding tensors so each one starts 64-byte aligned relative to the data start;
        // the header is then padded so the data start itself is 64-byte aligned in the file.
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::to_value(&meta).unwrap());
        let mut layout: Vec<(usize, usize)> = Vec::new(); // (padding before, len)
        let mut off = 0usize;
        let mut pads = 0usize;
        for (name, dtype, shape, bytes) in &self.physical {
            let pad = off.next_multiple_of(ALIGN) - off;
            if pad > 0 {
                header.insert(
                    format!("__pad.{pads}"),
                    serde_json::json!({"dtype": "U8", "shape": [pad], "data_offsets": [off, off + pad]}),
                );
                pads += 1;
                off += pad;
            }
            header.insert(name.clone(), serde_json::json!({"dtype": dtype_name(*dtype), "shape": shape, "data_offsets": [off, off + bytes.len()]}));
            layout.push((pad, bytes.len()));
            off += bytes.len();
        }
        let mut h = serde_json::to_string(&header).unwrap().into_bytes();
        let total = (8 + h.len()).next_multiple_of(ALIGN);
        h.resize(total - 8, b' ');
        (h, layout)
    }

    /// Opens what was written as a model file in memory, moving each tensor into one anonymous mapping and
    /// freeing it at once: the peak is about one copy of the model, not the two or three that serialising
    /// to a buffer and then mapping it would hold.
    pub fn into_model_file(mut self) -> Result<ModelFile> {
        let io = |e| FormatError::Io { path: "<memory>".into(), source: e };
        let (h, layout) = self.header();
        let total = 8 + h.len() + layout.iter().map(|(pad, len)| pad + len).sum::<usize>();
        let mut m = MmapMut::map_anon(total).map_err(io)?;
        m[..8].copy_from_slice(&(h.len() as u64).to_le_bytes());
        m[8..8 + h.len()].copy_from_slice(&h);
        let mut off = 8 + h.len();
        for ((pad, len), (_, _, _, bytes)) in layout.into_iter().zip(std::mem::take(&mut self.physical)) {
            off += pad; // anonymous memory is already zero
            m[off..off + len].copy_from_slice(&bytes);
            off += len;
        }
        ModelFile::from_map(m.make_read_only().map_err(io)?)
    }
}

fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::U8 => "U8",
        Dtype::I8 => "I8",
        Dtype::F16 => "F16",
        Dtype::BF16 => "BF16",
        Dtype::F32 => "F32",
        _ => unreachable!("writer only emits these"),
    }
}

/// An opened model file. Weights stay in the memory map; views borrow from it.
pub struct ModelFile {
    map: Arc<Mmap>,
    pub config: ModelConfig,
    /// The tokenizer, as JSON (parsed by `sprig-tokenizer`).
    pub tokenizer_json: String,
    pub chat_template: Option<String>,
    pub metadata: BTreeMap<String, String>,
    entries: BTreeMap<String, TensorEntry>,
}

impl std::fmt::Debug for ModelFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelFile").field("arch", &self.config.arch).field("tensors", &self.entries.len()).finish()
    }
}

impl ModelFile {
    pub fn open(path: &Path) -> Result<Self> {
        let io = |e| FormatError::Io { path: path.display().to_string(), source: e };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the mapping is read-only; like every mmap-based loader we assume the file is not truncated or
        // rewritten by another process while mapped (writers replace files by rename, never in place).
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::from_map(map)
    }

    /// Opens a container held in memory (e.g. converted on the fly): copied once into an anonymous mapping so
    /// alignment and the zero-copy view code are the same as for a file.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let io = |e| FormatError::Io { path: "<memory>".into(), source: e };
        let mut m = MmapMut::map_anon(bytes.len().max(1)).map_err(io)?;
        m[..bytes.len()].copy_from_slice(bytes);
        let map = m.make_read_only().map_err(io)?;
        if bytes.len() < map.len() {
            // Anonymous maps are at least one byte; an empty input must still fail as empty.
            return Err(FormatError::SafeTensors("file is empty".into()));
        }
        Self::from_map(map)
    }

    fn from_map(map: Mmap) -> Result<Self> {
        let (header_len, st_meta) =
            SafeTensors::read_metadata(&map).map_err(|e| FormatError::SafeTensors(e.to_string()))?;
        let data_start = 8 + header_len;
        let metadata: BTreeMap<String, String> =
            st_meta.metadata().clone().map(|m| m.into_iter().collect()).unwrap_or_default();
        let get = |k: &str| metadata.get(k).ok_or_else(|| FormatError::meta(k, "missing (not a sprig model file?)"));
        let version = get(META_VERSION)?;
        if !READS_VERSIONS.contains(&version.as_str()) {
            return Err(FormatError::Version(version.clone()));
        }
        let config: ModelConfig =
            serde_json::from_str(get(META_CONFIG)?).map_err(|e| FormatError::meta(META_CONFIG, e.to_string()))?;
        config.validate()?;
        let tokenizer_json = get(META_TOKENIZER)?.clone();
        let chat_template = metadata.get(META_CHAT_TEMPLATE).cloned();
        let index: BTreeMap<String, IndexEntry> =
            serde_json::from_str(get(META_TENSORS)?).map_err(|e| FormatError::meta(META_TENSORS, e.to_string()))?;

        let physical = st_meta.tensors();
        let plane = |name: &str, want: &[Dtype], shape: &[usize]| -> Result<(usize, usize)> {
            let info =
                physical.get(name).ok_or_else(|| FormatError::tensor(name, "listed in the index but missing"))?;
            if !want.contains(&info.dtype) {
                return Err(FormatError::tensor(name, format!("dtype {:?}, expected {:?}", info.dtype, want)));
            }
            if info.shape != shape {
                return Err(FormatError::tensor(name, format!("shape {:?}, expected {:?}", info.shape, shape)));
            }
            let (s, e) = info.data_offsets;
            let (s, e) = (data_start + s, data_start + e);
            if s % ALIGN != 0 {
                return Err(FormatError::tensor(name, format!("data at byte {s} is not {ALIGN}-byte aligned")));
            }
            if e > map.len() || s > e {
                return Err(FormatError::tensor(name, "data lies outside the file"));
            }
            Ok((s, e))
        };
        let mut entries = BTreeMap::new();
        for (name, ie) in &index {
            if ie.shape.is_empty() || ie.shape.len() > 4 || ie.shape.iter().any(|&d| d == 0 || d > MAX_DIM * 64) {
                return Err(FormatError::tensor(name, format!("implausible shape {:?}", ie.shape)));
            }
            let entry = match ie.ty.as_str() {
                "f32" | "f16" | "bf16" => {
                    let dtype = match ie.ty.as_str() {
                        "f32" => FloatDType::F32,
                        "f16" => FloatDType::F16,
                        _ => FloatDType::BF16,
                    };
                    let range = plane(name, &[dtype.st()], &ie.shape)?;
                    TensorEntry::Float { dtype, shape: ie.shape.clone(), range }
                }
                other => {
                    let scheme = Scheme::from_name(other)
                        .ok_or_else(|| FormatError::tensor(name, format!("unknown tensor type `{other}`")))?;
                    let [rows, cols] = ie.shape[..] else {
                        return Err(FormatError::tensor(
                            name,
                            format!("quantized tensor must be 2-D, got {:?}", ie.shape),
                        ));
                    };
                    let nb = blocks_per_row(cols);
                    let qdt = if scheme.signed_codes() { Dtype::I8 } else { Dtype::U8 };
                    let qs = plane(&format!("{name}.qs"), &[qdt], &[rows, nb * scheme.qs_bytes_per_block()])?;
                    let ns = scheme.scales_per_row(nb);
                    let scale = plane(&format!("{name}.scale"), &[Dtype::F16], &[rows, ns])?;
                    let min = if scheme.has_min() {
                        Some(plane(&format!("{name}.min"), &[Dtype::F16], &[rows, ns])?)
                    } else {
                        None
                    };
                    let nsub = scheme.sub_bytes_per_row(nb);
                    let sub = if nsub > 0 {
                        let dt = if scheme == Scheme::Q6K { Dtype::I8 } else { Dtype::U8 };
                        Some(plane(&format!("{name}.sub"), &[dt], &[rows, nsub])?)
                    } else {
                        None
                    };
                    let layout = match &ie.layout {
                        None => RowLayout::RowMajor,
                        Some(l) => RowLayout::from_name(l)
                            .ok_or_else(|| FormatError::tensor(name, format!("unknown row layout `{l}`")))?,
                    };
                    TensorEntry::Quant { scheme, rows, cols, qs, scale, min, sub, layout }
                }
            };
            entries.insert(name.clone(), entry);
        }
        let file = ModelFile { map: Arc::new(map), config, tokenizer_json, chat_template, metadata, entries };
        for name in file.entries.keys() {
            if let WeightView::Quant(q) = file.weight(name)? {
                q.validate().map_err(|e| FormatError::tensor(name, e.to_string()))?;
            }
        }
        Ok(file)
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(|s| s.as_str())
    }
    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.entries.get(name)
    }
    pub fn entries(&self) -> impl Iterator<Item = (&str, &TensorEntry)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
    /// The whole mapping (for tests that check weights lie inside it).
    pub fn mapping(&self) -> &[u8] {
        &self.map
    }
    pub fn file_bytes(&self) -> usize {
        self.map.len()
    }

    fn bytes(&self, r: (usize, usize)) -> &[u8] {
        &self.map[r.0..r.1]
    }

    /// A view of tensor `name`; 1-D float tensors are returned as one row.
    pub fn weight(&self, name: &str) -> Result<WeightView<'_>> {
        let e = self.entries.get(name).ok_or_else(|| FormatError::tensor(name, "missing from the model file"))?;
        Ok(self.view(e))
    }

    /// A view of an entry of this file (no name lookup: for hot paths that keep the entry).
    pub fn view(&self, e: &TensorEntry) -> WeightView<'_> {
        match e {
            TensorEntry::Float { dtype, shape, range } => {
                let cols = *shape.last().unwrap();
                let rows = shape.iter().product::<usize>() / cols;
                let b = self.bytes(*range);
                // Alignment was checked at open, so these casts cannot fail.
                match dtype {
                    FloatDType::F32 => WeightView::F32 { data: bytemuck::cast_slice(b), rows, cols },
                    FloatDType::F16 => WeightView::F16 { data: bytemuck::cast_slice(b), rows, cols },
                    FloatDType::BF16 => WeightView::BF16 { data: bytemuck::cast_slice(b), rows, cols },
                }
            }
            TensorEntry::Quant { scheme, rows, cols, qs, scale, min, sub, layout } => WeightView::Quant(
                QMatrix::new(
                    *scheme,
                    *rows,
                    *cols,
                    self.bytes(*qs),
                    bytemuck::cast_slice(self.bytes(*scale)),
                    min.map(|m| bytemuck::cast_slice(self.bytes(m))),
                    sub.map(|b| self.bytes(b)),
                )
                // Plane sizes were checked against the shape when the file was opened.
                .expect("plane sizes checked at open")
                .with_layout(*layout),
            ),
        }
    }

    /// Total bits per weight over every weight tensor.
    pub fn bits_per_weight(&self) -> f64 {
        let (bytes, n) = self.entries.values().fold((0usize, 0usize), |(b, n), e| (b + e.bytes(), n + e.numel()));
        bytes as f64 * 8.0 / n.max(1) as f64
    }
}
