//! Saved sessions: a session's KV cache, token history, chat messages and random stream in one file, so a
//! reopened app continues a conversation without running it again.
//!
//! Layout (little-endian): `SPRIGSES` · format version u32 · header length u32 · header (JSON: the model's
//! fingerprint, the KV layout, the positions each layer holds, the seed and draws of the random stream, the
//! chat messages) · tokens u32 × n · per layer its keys then its values, f32 `[held, kv_dim]` each (an int8
//! cache: its codes `[held, kv_dim]` i8 then its scales `[held, kv_heads]` f32, each) · SHA-256 of everything
//! before it. A file of another model or layout, a truncated or altered one, is refused with an error
//! before anything is written into the session.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sprig_backend::Backend;
use sprig_format::ModelFile;

use crate::chat::ChatMessage;
use crate::{EngineError, Result};

const MAGIC: &[u8; 8] = b"SPRIGSES";
/// Bumped when the layout changes; other versions are refused.
pub const SESSION_FORMAT_VERSION: u32 = 1;
/// Largest header accepted (a hostile length must not allocate).
const MAX_HEADER: usize = 64 << 20;

#[derive(Serialize, Deserialize, Debug, PartialEq)]
pub(crate) struct Header {
    /// [`model_fingerprint`] of the model the cache was computed with.
    pub model: String,
    pub kv_dim: usize,
    pub windows: Vec<Option<usize>>,
    /// Tokens the session holds (its position).
    pub tokens: usize,
    /// Per layer: the first position stored (the layer holds `first..tokens`).
    pub first: Vec<usize>,
    pub kv_dtype: String,
    /// Values per KV head (the group an int8 cache scales together).
    #[serde(default)]
    pub head_dim: usize,
    /// The random stream: its seed and how many words were drawn from it.
    pub rng: Option<(u64, u64)>,
    pub messages: Vec<ChatMessage>,
}

/// What a saved session carries besides its header's checks.
pub(crate) struct Saved {
    pub header: Header,
    pub tokens: Vec<u32>,
    /// Per layer: keys and values of positions `first..tokens`.
    pub kv: Vec<(Vec<f32>, Vec<f32>)>,
}

fn invalid(path: &Path, why: impl std::fmt::Display) -> EngineError {
    EngineError::SessionFile(format!("{}: {why}", path.display()))
}

/// Identifies a model's weights, cheaply: its config, tokenizer, template and metadata, every tensor's name,
/// type and shape, and the first and last rows of every tensor (dequantized), hashed.
pub fn model_fingerprint(file: &ModelFile) -> String {
    let mut h = Sha256::new();
    h.update(serde_json::to_vec(&file.config).unwrap_or_default());
    h.update(file.tokenizer_json.as_bytes());
    h.update(file.chat_template.as_deref().unwrap_or("").as_bytes());
    for (k, v) in &file.metadata {
        h.update(k.as_bytes());
        h.update(v.as_bytes());
    }
    for (name, e) in file.entries() {
        h.update(name.as_bytes());
        h.update(e.type_name().as_bytes());
        h.update(format!("{:?}", e.shape()).as_bytes());
        let v = file.view(e);
        let rows = v.rows();
        let mut row = vec![0.0f32; v.cols()];
        for r in [0, rows.saturating_sub(1)] {
            if r < rows {
                v.row_to_f32(r, &mut row);
                for x in &row {
                    h.update(x.to_le_bytes());
                }
            }
        }
    }
    hex::encode(h.finalize())
}

pub(crate) fn write<B: Backend>(
    path: &Path,
    header: &Header,
    tokens: &[u32],
    backend: &B,
    cache: &B::KvCache,
) -> Result<()> {
    let json = serde_json::to_vec(header).map_err(|e| invalid(path, e))?;
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend(SESSION_FORMAT_VERSION.to_le_bytes());
    out.extend((json.len() as u32).to_le_bytes());
    out.extend(&json);
    out.extend(tokens.iter().flat_map(|t| t.to_le_bytes()));
    let (mut k, mut v) = (Vec::new(), Vec::new());
    let q8 = header.kv_dtype == sprig_backend::KvDtype::Q8.name();
    for (layer, &first) in header.first.iter().enumerate() {
        backend.kv_read(cache, layer, first..header.tokens, &mut k, &mut v)?;
        if q8 {
            // The cache's own codes and scales: quantizing its dequantized values gives them back.
            for x in [&k, &v] {
                let (codes, scales) = sprig_backend::quantize_kv(x, header.head_dim);
                out.extend(codes.iter().map(|&c| c as u8));
                out.extend(scales.iter().flat_map(|s| s.to_le_bytes()));
            }
        } else {
            out.extend(k.iter().chain(&v).flat_map(|x| x.to_le_bytes()));
        }
    }
    let digest = Sha256::digest(&out);
    out.extend_from_slice(&digest);
    // Written beside the target and renamed: a crash mid-write leaves the previous file whole.
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, &out).map_err(crate::io_error(&tmp))?;
    std::fs::rename(&tmp, path).map_err(crate::io_error(path))
}

pub(crate) fn read(path: &Path) -> Result<Saved> {
    let bytes = std::fs::read(path).map_err(crate::io_error(path))?;
    if bytes.len() < 16 + 32 || &bytes[..8] != MAGIC {
        return Err(invalid(path, "not a sprig session file"));
    }
    let (body, digest) = bytes.split_at(bytes.len() - 32);
    if Sha256::digest(body).as_slice() != digest {
        return Err(invalid(path, "checksum mismatch: the file is truncated or damaged"));
    }
    let version = u32::from_le_bytes(body[8..12].try_into().expect("4 bytes"));
    if version != SESSION_FORMAT_VERSION {
        return Err(invalid(path, format!("format version {version} (this build reads {SESSION_FORMAT_VERSION})")));
    }
    let n = u32::from_le_bytes(body[12..16].try_into().expect("4 bytes")) as usize;
    if n > MAX_HEADER || 16 + n > body.len() {
        return Err(invalid(path, format!("header of {n} bytes")));
    }
    let header: Header = serde_json::from_slice(&body[16..16 + n]).map_err(|e| invalid(path, e))?;
    if header.first.len() != header.windows.len() || header.first.iter().any(|&f| f > header.tokens) {
        return Err(invalid(path, "layer table does not match the layout"));
    }
    let q8 = header.kv_dtype == sprig_backend::KvDtype::Q8.name();
    let hd = header.head_dim;
    if q8 && (hd == 0 || !header.kv_dim.is_multiple_of(hd)) {
        return Err(invalid(path, format!("int8 cache of kv_dim {} in heads of {hd}", header.kv_dim)));
    }
    let mut rest = &body[16 + n..];
    // The next `count` items of `size` bytes, or an error naming what was cut off.
    let mut take = |count: usize, size: usize, what: &str| -> Result<&[u8]> {
        let b = count.checked_mul(size).filter(|&b| b <= rest.len()).ok_or_else(|| invalid(path, format!("truncated {what}")))?;
        let (w, r) = rest.split_at(b);
        rest = r;
        Ok(w)
    };
    let le = |w: &[u8]| [w[0], w[1], w[2], w[3]];
    let tokens: Vec<u32> = take(header.tokens, 4, "tokens")?.chunks_exact(4).map(|w| u32::from_le_bytes(le(w))).collect();
    let mut kv = Vec::with_capacity(header.first.len());
    for &first in &header.first {
        let count = (header.tokens - first).checked_mul(header.kv_dim).ok_or_else(|| invalid(path, "KV size"))?;
        let mut part = |what: &str| -> Result<Vec<f32>> {
            if q8 {
                let codes: Vec<i8> = take(count, 1, what)?.iter().map(|&c| c as i8).collect();
                let scales: Vec<f32> =
                    take(count / hd, 4, what)?.chunks_exact(4).map(|w| f32::from_le_bytes(le(w))).collect();
                Ok(sprig_backend::dequantize_kv(&codes, &scales, hd, 0).collect())
            } else {
                Ok(take(count, 4, what)?.chunks_exact(4).map(|w| f32::from_le_bytes(le(w))).collect())
            }
        };
        let k = part("keys")?;
        let v = part("values")?;
        kv.push((k, v));
    }
    if !rest.is_empty() {
        return Err(invalid(path, format!("{} unexpected bytes after the KV cache", rest.len())));
    }
    Ok(Saved { header, tokens, kv })
}
