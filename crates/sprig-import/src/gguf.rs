//! GGUF v2/v3: a bounds-checked parser and the importer for every family of the rule book
//! ([`sprig_format::arch`]), MoE tensor layouts included.

use std::collections::BTreeMap;
use std::path::Path;

use memmap2::Mmap;
use sprig_format::arch::{self, Arch, ArchRules};
use sprig_format::config::{AttentionKind, ModelConfig, MoeConfig, MtpConfig, RopeLayout, RopeScaling, RouterScoring};
use sprig_format::ContainerWriter;
use sprig_quant::ggml::GgmlType;
use sprig_tokenizer::{hf as hftok, token_type, SpecialTokens, TokenizerSpec};

use crate::sink::Sink;
use crate::{invalid, io_err, ImportOptions, Imported, Progress, Result};

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U64(v) => Some(v),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F64(v) => Some(v),
            Value::U64(v) => Some(v as f64),
            Value::I64(v) => Some(v as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: `dims[0]` is the fastest-varying (columns).
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute byte range in the file.
    pub range: (usize, usize),
}

impl TensorInfo {
    /// Row-major shape, slowest first (`[rows, cols]` for a matrix).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

pub struct GgufFile {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    data: GgufBytes,
}

enum GgufBytes {
    Map(Mmap),
    Vec(Vec<u8>),
}

impl std::ops::Deref for GgufBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            GgufBytes::Map(m) => m,
            GgufBytes::Vec(v) => v,
        }
    }
}

struct Reader<'a> {
    b: &'a [u8],
    off: usize,
}

const MAX_COUNT: u64 = 1 << 24;

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.off.checked_add(n).filter(|&e| e <= self.b.len());
        let end = end.ok_or_else(|| invalid(format!("GGUF: truncated while reading {what} at byte {}", self.off)))?;
        let s = &self.b[self.off..end];
        self.off = end;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        if n > (self.b.len() - self.off) as u64 {
            return Err(invalid(format!("GGUF: {what}: string length {n} runs past the end of the file")));
        }
        let raw = self.take(n as usize, what)?;
        String::from_utf8(raw.to_vec()).map_err(|_| invalid(format!("GGUF: {what}: invalid UTF-8")))
    }
    fn value(&mut self, ty: u32, what: &str, depth: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U64(self.take(1, what)?[0] as u64),
            1 => Value::I64(self.take(1, what)?[0] as i8 as i64),
            2 => Value::U64(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap()) as u64),
            3 => Value::I64(i16::from_le_bytes(self.take(2, what)?.try_into().unwrap()) as i64),
            4 => Value::U64(self.u32(what)? as u64),
            5 => Value::I64(self.u32(what)? as i32 as i64),
            6 => Value::F64(f32::from_le_bytes(self.take(4, what)?.try_into().unwrap()) as f64),
            7 => match self.take(1, what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(invalid(format!("GGUF: {what}: bool byte {b}"))),
            },
            8 => Value::Str(self.string(what)?),
            9 => {
                if depth > 2 {
                    return Err(invalid(format!("GGUF: {what}: arrays nested too deeply")));
                }
                let ity = self.u32(what)?;
                let n = self.u64(what)?;
                // Every element takes at least one byte: a count beyond the remaining bytes is a lie.
                if n > MAX_COUNT || n > (self.b.len() - self.off) as u64 {
                    return Err(invalid(format!("GGUF: {what}: array of {n} elements is larger than the file")));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(ity, what, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(self.u64(what)? as i64),
            12 => Value::F64(f64::from_le_bytes(self.take(8, what)?.try_into().unwrap())),
            t => return Err(invalid(format!("GGUF: {what}: unknown value type {t}"))),
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let f = std::fs::File::open(path).map_err(io_err(path))?;
        // SAFETY: read-only mapping; the GGUF file is assumed not to change while it is being imported.
        let map = unsafe { Mmap::map(&f) }.map_err(io_err(path))?;
        Self::parse(GgufBytes::Map(map))
    }

    pub fn from_bytes(b: Vec<u8>) -> Result<Self> {
        Self::parse(GgufBytes::Vec(b))
    }

    fn parse(data: GgufBytes) -> Result<Self> {
        let b: &[u8] = &data;
        let mut r = Reader { b, off: 0 };
        if r.take(4, "magic")? != b"GGUF" {
            return Err(invalid("GGUF: bad magic (not a GGUF file)"));
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(invalid(format!("GGUF: version {version} is not supported (2 and 3 are)")));
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;
        if n_tensors > MAX_COUNT || n_kv > MAX_COUNT {
            return Err(invalid(format!("GGUF: implausible counts ({n_tensors} tensors, {n_kv} metadata entries)")));
        }
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = r.string(&format!("metadata key #{i}"))?;
            let ty = r.u32(&key)?;
            let v = r.value(ty, &key, 0)?;
            metadata.insert(key, v);
        }
        let mut raw = Vec::new();
        for i in 0..n_tensors {
            let name = r.string(&format!("tensor name #{i}"))?;
            let nd = r.u32(&name)?;
            if nd == 0 || nd > 4 {
                return Err(invalid(format!("GGUF: tensor `{name}`: {nd} dimensions")));
            }
            let dims = (0..nd).map(|_| r.u64(&name)).collect::<Result<Vec<_>>>()?;
            let tid = r.u32(&name)?;
            let ty = GgmlType::from_id(tid)
                .ok_or_else(|| invalid(format!("GGUF: tensor `{name}`: unsupported type id {tid}")))?;
            let off = r.u64(&name)?;
            raw.push((name, dims, ty, off));
        }
        let align = metadata.get("general.alignment").and_then(|v| v.as_u64()).unwrap_or(32);
        if align == 0 || align > 1 << 16 || !align.is_power_of_two() {
            return Err(invalid(format!("GGUF: general.alignment {align} is invalid")));
        }
        let data_start = (r.off as u64).next_multiple_of(align);
        let mut tensors = Vec::with_capacity(raw.len());
        for (name, dims, ty, off) in raw {
            let numel = dims.iter().try_fold(1u64, |a, &d| if d == 0 { None } else { a.checked_mul(d) });
            let numel =
                numel.ok_or_else(|| invalid(format!("GGUF: tensor `{name}`: dims {dims:?} are zero or overflow")))?;
            if dims[0] % ty.block_elems() as u64 != 0 {
                return Err(invalid(format!(
                    "GGUF: tensor `{name}`: row length {} is not a multiple of the {} block",
                    dims[0],
                    ty.name()
                )));
            }
            let bytes = ty.bytes_for(numel).ok_or_else(|| invalid(format!("GGUF: tensor `{name}`: size overflows")))?;
            let start = data_start.checked_add(off);
            let end = start.and_then(|s| s.checked_add(bytes)).filter(|&e| e <= b.len() as u64);
            let end = end.ok_or_else(|| {
                invalid(format!("GGUF: tensor `{name}`: data (offset {off}, {bytes} bytes) lies outside the file"))
            })?;
            tensors.push(TensorInfo { name, dims, ty, range: ((end - bytes) as usize, end as usize) });
        }
        Ok(GgufFile { version, metadata, tensors, data })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        &self.data[t.range.0..t.range.1]
    }
    /// Tells the kernel a converted tensor's pages are not needed any more, so that converting a file does not
    /// hold the source and the converted copy in memory at once. A later read still sees the file's bytes.
    pub fn release(&self, t: &TensorInfo) {
        if let GgufBytes::Map(m) = &self.data {
            // Only whole pages strictly inside the tensor: neighbours' bytes stay resident.
            let page = 4096;
            let (start, end) = (t.range.0.next_multiple_of(page), t.range.1 / page * page);
            if end > start {
                // SAFETY: the map is a read-only shared file mapping, so dropping its pages loses nothing: they
                // are read back from the file if touched again. No slice of it is mutated.
                let _ = unsafe { m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
            }
        }
    }
    fn req_u(&self, key: &str) -> Result<usize> {
        self.get(key)
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .ok_or_else(|| invalid(format!("GGUF: missing or non-integer `{key}`")))
    }
    fn opt_f(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(|v| v.as_f64())
    }
    fn strings(&self, key: &str) -> Result<Vec<String>> {
        let a =
            self.get(key).and_then(|v| v.as_array()).ok_or_else(|| invalid(format!("GGUF: missing array `{key}`")))?;
        a.iter()
            .map(|v| v.as_str().map(String::from).ok_or_else(|| invalid(format!("GGUF: `{key}` holds a non-string"))))
            .collect()
    }
}

/// RoPE scaling from GGUF metadata, mapped onto transformers' types: `linear`, `yarn` (llama.cpp's keys; its
/// `attn_factor` multiplies YaRN's default attention factor) and Llama 3.x, which llama.cpp's converter stores
/// as per-frequency divisors in `rope_freqs.weight`. Any other type is an error, never a silent plain RoPE.
fn rope_scaling_from_gguf(g: &GgufFile, k: &dyn Fn(&str) -> String, ctx_len: usize) -> Result<Option<RopeScaling>> {
    let factor = g.opt_f(&k("rope.scaling.factor")).map(|f| f as f32);
    let scaling = match g.get(&k("rope.scaling.type")).map(|v| v.as_str()) {
        None | Some(Some("none")) => None,
        Some(Some("linear")) => factor.filter(|&f| f != 1.0).map(|factor| RopeScaling::Linear { factor }),
        Some(Some("yarn")) => {
            let factor = factor.ok_or_else(|| invalid("GGUF: yarn RoPE scaling without rope.scaling.factor"))?;
            let original = g
                .get(&k("rope.scaling.original_context_length"))
                .and_then(|v| v.as_u64())
                .map_or(ctx_len, |v| v as usize);
            let attn = g.opt_f(&k("rope.scaling.attn_factor")).unwrap_or(1.0) as f32;
            Some(RopeScaling::Yarn {
                factor,
                original_context: original,
                beta_fast: g.opt_f(&k("rope.scaling.yarn_beta_fast")).unwrap_or(32.0) as f32,
                beta_slow: g.opt_f(&k("rope.scaling.yarn_beta_slow")).unwrap_or(1.0) as f32,
                attention_factor: attn * sprig_format::config::yarn_mscale(factor, 1.0),
                truncate: true,
            })
        }
        Some(Some(other)) => {
            return Err(invalid(format!(
                "GGUF: RoPE scaling type `{other}` is not supported (none, linear, yarn, llama3 via rope_freqs)"
            )))
        }
        Some(None) => return Err(invalid("GGUF: rope.scaling.type is not a string")),
    };
    if let Some(t) = g.tensor("rope_freqs.weight") {
        if scaling.is_some() {
            return Err(invalid("GGUF: rope_freqs.weight together with another RoPE scaling type"));
        }
        if t.ty != GgmlType::F32 {
            return Err(invalid(format!("GGUF: rope_freqs.weight is {}, expected F32", t.ty.name())));
        }
        let factors: Vec<f32> =
            g.tensor_data(t).chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        return Ok(Some(RopeScaling::FreqFactors { factors }));
    }
    Ok(scaling)
}

/// The per-layer attention kinds: every layer global unless the file has a sliding window; then the file's
/// `sliding_window_pattern` (a period, or one bool per layer, true = sliding) or else the family's rule.
fn attention_from_gguf(
    g: &GgufFile,
    k: &dyn Fn(&str) -> String,
    rules: &ArchRules,
    n_layers: usize,
    blocks: usize,
) -> Result<Vec<AttentionKind>> {
    let Some(window) = g.get(&k("attention.sliding_window")).and_then(|v| v.as_u64()).map(|v| v as usize) else {
        if rules.sliding_every.is_some() {
            return Err(invalid(format!("GGUF: `{}` is required for {}", k("attention.sliding_window"), rules.name)));
        }
        return Ok(vec![AttentionKind::Global; n_layers]);
    };
    let key = k("attention.sliding_window_pattern");
    match g.get(&key) {
        Some(v) => match (v.as_array(), v.as_u64()) {
            // One entry per block, MTP layers included, or per layer.
            (Some(a), _) if a.len() != n_layers && a.len() != blocks => {
                Err(invalid(format!("GGUF: `{key}` has {} entries for {n_layers} layers", a.len())))
            }
            (Some(a), _) => a[..n_layers]
                .iter()
                .map(|v| match v.as_bool() {
                    Some(true) => Ok(AttentionKind::Sliding { window }),
                    Some(false) => Ok(AttentionKind::Global),
                    None => Err(invalid(format!("GGUF: `{key}` entries must be bools"))),
                })
                .collect(),
            (None, Some(every)) if every > 0 => Ok(arch::sliding_every(n_layers, window, every as usize)),
            _ => Err(invalid(format!("GGUF: `{key}` must be a period > 0 or one bool per layer"))),
        },
        // No pattern: the family's rule; a family without one ignores the window (as llama.cpp does).
        None => Ok(match rules.sliding_every {
            Some(every) => arch::sliding_every(n_layers, window, every),
            None => vec![AttentionKind::Global; n_layers],
        }),
    }
}

/// Builds the native config from GGUF metadata.
pub fn config_from_gguf(g: &GgufFile) -> Result<ModelConfig> {
    let name = g
        .get("general.architecture")
        .and_then(|v| v.as_str())
        .ok_or_else(|| invalid("GGUF: missing general.architecture"))?;
    let arch = Arch::from_gguf(name).ok_or_else(|| {
        invalid(format!("GGUF: architecture `{name}` is not supported (supported: {})", Arch::list()))
    })?;
    let rules = arch.rules();
    let k = |s: &str| format!("{name}.{s}");
    let dim = g.req_u(&k("embedding_length"))?;
    // MTP ("nextn") layers are counted in block_count and come last (llama.cpp's GLM-4.5 / DeepSeek layout).
    let blocks = g.req_u(&k("block_count"))?;
    let nextn = g.get(&k("nextn_predict_layers")).and_then(|v| v.as_u64()).unwrap_or(0) as usize;
    if nextn >= blocks {
        return Err(invalid(format!("GGUF: `{}` = {nextn} leaves no layers of {blocks} blocks", k("nextn_predict_layers"))));
    }
    let n_layers = blocks - nextn;
    let n_heads = g.req_u(&k("attention.head_count"))?;
    let n_kv_heads =
        g.get(&k("attention.head_count_kv")).and_then(|v| v.as_u64()).map(|v| v as usize).unwrap_or(n_heads);
    let head_dim =
        g.get(&k("attention.key_length")).and_then(|v| v.as_u64()).map(|v| v as usize).unwrap_or(dim / n_heads.max(1));
    let hidden_dim = g.get(&k("feed_forward_length")).and_then(|v| v.as_u64()).map(|v| v as usize).unwrap_or(0);
    let tokens = g.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()).map(|a| a.len());
    let vocab_size = g.get(&k("vocab_size")).and_then(|v| v.as_u64()).map(|v| v as usize).or(tokens).unwrap_or(0);
    let attention = attention_from_gguf(g, &k, rules, n_layers, blocks)?;
    let moe = match g.get(&k("expert_count")).and_then(|v| v.as_u64()) {
        Some(n) if n > 0 => {
            let top_k = g.req_u(&k("expert_used_count"))?;
            let expert_hidden_dim = g
                .get(&k("expert_feed_forward_length"))
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .unwrap_or(hidden_dim);
            let shared = g.get(&k("expert_shared_feed_forward_length")).and_then(|v| v.as_u64()).map(|v| v as usize);
            let leading_dense = g.get(&k("leading_dense_block_count")).and_then(|v| v.as_u64()).unwrap_or(0) as usize;
            let scoring = match g.get(&k("expert_gating_func")).and_then(|v| v.as_u64()) {
                Some(2) => RouterScoring::Sigmoid,
                _ => RouterScoring::Softmax,
            };
            // The key wins when present; else llama.cpp's per-family default.
            let norm_topk = g.get(&k("expert_weights_norm")).and_then(|v| v.as_bool()).unwrap_or(rules.gguf_norm_topk);
            let has_shared = g.tensor("blk.0.ffn_up_shexp.weight").is_some() || shared.is_some();
            let shared_dim = if has_shared {
                Some(
                    shared
                        .or_else(|| g.tensor("blk.0.ffn_up_shexp.weight").map(|t| t.dims[1] as usize))
                        .unwrap_or(expert_hidden_dim),
                )
            } else {
                None
            };
            Some(MoeConfig {
                n_experts: n as usize,
                top_k,
                expert_hidden_dim,
                scoring,
                norm_topk,
                shared_expert_hidden_dim: shared_dim,
                moe_layers: (0..n_layers)
                    .map(|i| i >= leading_dense && g.tensor(&format!("blk.{i}.ffn_gate_inp.weight")).is_some())
                    .collect(),
                routed_scale: g.opt_f(&k("expert_weights_scale")).map(|v| v as f32).filter(|&v| v != 0.0),
            })
        }
        _ => None,
    };
    let eps = g.opt_f(&k("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5) as f32;
    let rope_theta = g.opt_f(&k("rope.freq_base")).unwrap_or(10000.0) as f32;
    let ctx_len = g.get(&k("context_length")).and_then(|v| v.as_u64()).unwrap_or(2048) as usize;
    let rope_scaling = rope_scaling_from_gguf(g, &k, ctx_len)?;
    let local_theta = g.opt_f(&k("rope.freq_base_swa")).map(|v| v as f32).or(rules.local_rope_theta);
    let cfg = ModelConfig {
        arch,
        dim,
        n_layers,
        n_heads,
        n_kv_heads,
        head_dim,
        hidden_dim,
        vocab_size,
        max_seq_len: ctx_len,
        norm_eps: eps,
        rope_theta,
        rope_theta_local: if attention.iter().any(|a| *a != AttentionKind::Global) { local_theta } else { None },
        rope_scaling,
        rope_layout: if rules.gguf_qk_permuted { RopeLayout::Adjacent } else { RopeLayout::Half },
        activation: rules.activation,
        tied_embeddings: g.tensor("output.weight").is_none(),
        embedding_scale: rules.embedding_scale_sqrt_dim.then(|| (dim as f32).sqrt()),
        // GGUF converters already store `1 + w` norms folded.
        legacy_norm_add_one: false,
        attention,
        moe,
        attn_scale: None,
        final_logit_softcap: g.opt_f(&k("final_logit_softcapping")).map(|v| v as f32),
        mtp: (nextn > 0).then(|| MtpConfig {
            layers: nextn,
            moe: g.tensor(&format!("blk.{n_layers}.ffn_gate_inp.weight")).is_some(),
        }),
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Builds the tokenizer spec from the `tokenizer.ggml.*` keys.
pub fn tokenizer_from_gguf(g: &GgufFile) -> Result<TokenizerSpec> {
    let model = g
        .get("tokenizer.ggml.model")
        .and_then(|v| v.as_str())
        .ok_or_else(|| invalid("GGUF: missing tokenizer.ggml.model"))?;
    let tokens = g.strings("tokenizer.ggml.tokens")?;
    let n = tokens.len();
    let types: Vec<u8> = match g.get("tokenizer.ggml.token_type").and_then(|v| v.as_array()) {
        Some(a) if a.len() == n => a.iter().map(|v| v.as_f64().unwrap_or(1.0) as u8).collect(),
        Some(a) => return Err(invalid(format!("GGUF: {} token types for {n} tokens", a.len()))),
        None => vec![token_type::NORMAL; n],
    };
    let id = |key: &str| -> Result<Option<u32>> {
        match g.get(key).and_then(|v| v.as_u64()) {
            Some(v) if v as usize >= n => Err(invalid(format!("GGUF: `{key}` = {v} is outside the vocabulary of {n}"))),
            v => Ok(v.map(|v| v as u32)),
        }
    };
    let bos = id("tokenizer.ggml.bos_token_id")?;
    let eos = id("tokenizer.ggml.eos_token_id")?;
    let mut stop: Vec<u32> = eos.into_iter().collect();
    for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
        stop.extend(id(key)?);
    }
    // End-of-turn markers that chat templates emit even when the file names no EOT id.
    for (i, t) in tokens.iter().enumerate() {
        if arch::END_OF_TURN_TOKENS.contains(&t.as_str()) && !stop.contains(&(i as u32))
        {
            stop.push(i as u32);
        }
    }
    let default_add_bos = model == "llama";
    let add_bos =
        g.get("tokenizer.ggml.add_bos_token").and_then(|v| v.as_bool()).unwrap_or(default_add_bos) && bos.is_some();
    let special = SpecialTokens { bos, eos, add_bos, stop };
    match model {
        "llama" => {
            let scores: Vec<f32> = match g.get("tokenizer.ggml.scores").and_then(|v| v.as_array()) {
                Some(a) if a.len() == n => a.iter().map(|v| v.as_f64().unwrap_or(0.0) as f32).collect(),
                _ => return Err(invalid("GGUF: SentencePiece vocabulary without one score per token")),
            };
            let add_space_prefix = g.get("tokenizer.ggml.add_space_prefix").and_then(|v| v.as_bool()).unwrap_or(true);
            Ok(TokenizerSpec::SentencePiece { tokens, scores, token_types: types, special, add_space_prefix })
        }
        "gpt2" => {
            let merges = g.strings("tokenizer.ggml.merges")?;
            let pre = g.get("tokenizer.ggml.pre").and_then(|v| v.as_str()).unwrap_or("default");
            let json = hftok::from_gguf_bpe(&tokens, &merges, &types, pre)?;
            Ok(TokenizerSpec::HuggingFace { tokenizer_json: json, special })
        }
        other => Err(invalid(format!("GGUF: tokenizer model `{other}` is not supported (llama, gpt2 are)"))),
    }
}

/// An MTP head's `eh_proj` (`[dim, 2 dim]`: the normalised token embedding's columns, then the hidden
/// state's) stored as its two halves, so the head adds two products instead of concatenating its inputs.
fn split_eh_proj(sink: &mut Sink, prefix: &str, ty: GgmlType, shape: &[usize], data: &[u8], dim: usize) -> Result<()> {
    if shape != [dim, 2 * dim] {
        return Err(invalid(format!("GGUF: `{prefix}.nextn.eh_proj.weight` is {shape:?}, expected [{dim}, {}]", 2 * dim)));
    }
    let mut f = vec![0.0; 2 * dim * dim];
    sprig_quant::ggml::dequantize(ty, data, &mut f);
    for (half, part) in ["embd", "hidden"].into_iter().enumerate() {
        let cols: Vec<f32> = f.chunks_exact(2 * dim).flat_map(|row| &row[half * dim..(half + 1) * dim]).copied().collect();
        sink.add_f32(&format!("{prefix}.nextn.eh_proj_{part}.weight"), &[dim, dim], &cols);
    }
    Ok(())
}

pub fn import(path: &Path, opts: &ImportOptions, progress: Progress) -> Result<Imported> {
    let g = GgufFile::open(path)?;
    import_file(&g, opts, progress)
}

pub fn import_file(g: &GgufFile, opts: &ImportOptions, progress: Progress) -> Result<Imported> {
    let config = config_from_gguf(g)?;
    let spec = tokenizer_from_gguf(g)?;
    let template = g
        .get("tokenizer.chat_template")
        .and_then(|v| v.as_str())
        .map(String::from)
        .or_else(|| config.arch.rules().builtin_template.map(String::from));
    let mut writer = ContainerWriter::new(&config, serde_json::to_string(&spec).unwrap(), template);
    if let Some(name) = g.get("general.name").and_then(|v| v.as_str()) {
        writer.set_metadata("general.name", name.to_string());
    }
    let mut sink = Sink { writer, quant: opts.quant, losses: vec![], importance: opts.importance };
    let total = g.tensors.len();
    for (i, t) in g.tensors.iter().enumerate() {
        // RoPE frequency factors went into the config (`RopeScaling::FreqFactors`).
        if t.name == "rope_freqs.weight" {
            continue;
        }
        // Stacked expert tensors [E, rows, cols] are stored as one [E*rows, cols] matrix: experts stay int4 and
        // expert e's rows are a contiguous slice.
        let mut shape = t.shape();
        if shape.len() == 3 {
            shape = vec![shape[0] * shape[1], shape[2]];
        }
        if shape.len() > 3 {
            return Err(invalid(format!("GGUF: tensor `{}` has {} dims", t.name, shape.len())));
        }
        match t.name.strip_suffix(".nextn.eh_proj.weight") {
            Some(prefix) => split_eh_proj(&mut sink, prefix, t.ty, &shape, g.tensor_data(t), config.dim)?,
            None => sink.add_ggml(&t.name, t.ty, &shape, g.tensor_data(t)),
        }
        g.release(t);
        progress(i + 1, total);
    }
    Ok(Imported { writer: sink.writer, losses: sink.losses })
}
