//! llama2.c checkpoints: the legacy (v0) header and the v1 "ak42" header, shared or separate classifier, with
//! the run.c `tokenizer.bin`.

use std::path::Path;

use sprig_format::config::{Activation, AttentionKind, ModelConfig, RopeLayout, MAX_DIM, MAX_LAYERS, MAX_VOCAB};
use sprig_format::ContainerWriter;
use sprig_tokenizer::{token_type, SpecialTokens, TokenizerSpec};

use crate::sink::Sink;
use crate::{invalid, io_err, ImportOptions, Imported, Progress, Result};

const MAGIC_V1: u32 = 0x616b_3432; // "ak42"

struct Header {
    dim: usize,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    vocab: usize,
    seq_len: usize,
    shared: bool,
    v1: bool,
    data_offset: usize,
}

fn read_i32(b: &[u8], off: usize) -> Result<i32> {
    b.get(off..off + 4)
        .map(|s| i32::from_le_bytes(s.try_into().unwrap()))
        .ok_or_else(|| invalid(format!("llama2.c checkpoint: truncated header at byte {off}")))
}

fn parse_header(b: &[u8]) -> Result<Header> {
    let v1 = b.len() >= 4 && u32::from_le_bytes(b[..4].try_into().unwrap()) == MAGIC_V1;
    let base = if v1 {
        let version = read_i32(b, 4)?;
        if version != 1 {
            return Err(invalid(format!(
                "llama2.c checkpoint: version {version} is not supported (only 1 and legacy)"
            )));
        }
        8
    } else {
        0
    };
    let mut p = [0i32; 7];
    for (i, v) in p.iter_mut().enumerate() {
        *v = read_i32(b, base + 4 * i)?;
    }
    let names = ["dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"];
    let limits = [MAX_DIM, MAX_DIM, MAX_LAYERS, MAX_DIM, MAX_DIM, MAX_VOCAB, 1 << 22];
    let (shared, vocab_raw) = if v1 {
        let s = *b.get(base + 28).ok_or_else(|| invalid("llama2.c checkpoint: truncated header"))?;
        (s != 0, p[5])
    } else {
        (p[5] > 0, p[5].saturating_abs())
    };
    p[5] = vocab_raw;
    for i in 0..7 {
        if p[i] <= 0 || p[i] as usize > limits[i] {
            return Err(invalid(format!("llama2.c checkpoint: header field {} = {} is out of range", names[i], p[i])));
        }
    }
    let [dim, hidden, layers, heads, kv_heads, vocab, seq_len] = p.map(|v| v as usize);
    if dim % heads != 0 || heads % kv_heads != 0 {
        return Err(invalid(format!(
            "llama2.c checkpoint: dim {dim}, n_heads {heads}, n_kv_heads {kv_heads} are inconsistent"
        )));
    }
    Ok(Header {
        dim,
        hidden,
        layers,
        heads,
        kv_heads,
        vocab,
        seq_len,
        shared,
        v1,
        data_offset: if v1 { 256 } else { 28 },
    })
}

/// Reads the run.c tokenizer format: `max_len: i32`, then per token `score: f32, len: i32, bytes`.
pub fn read_tokenizer_bin(bytes: &[u8], vocab: usize) -> Result<TokenizerSpec> {
    let mut off = 4;
    let (mut tokens, mut scores, mut types) =
        (Vec::with_capacity(vocab), Vec::with_capacity(vocab), Vec::with_capacity(vocab));
    if bytes.len() < 4 {
        return Err(invalid("tokenizer.bin: truncated"));
    }
    for i in 0..vocab {
        let hdr = bytes
            .get(off..off + 8)
            .ok_or_else(|| invalid(format!("tokenizer.bin: truncated at token {i} (the model has {vocab} tokens)")))?;
        let score = f32::from_le_bytes(hdr[..4].try_into().unwrap());
        let len = i32::from_le_bytes(hdr[4..].try_into().unwrap());
        if !(0..=4096).contains(&len) {
            return Err(invalid(format!("tokenizer.bin: token {i} has length {len}")));
        }
        off += 8;
        let raw = bytes
            .get(off..off + len as usize)
            .ok_or_else(|| invalid(format!("tokenizer.bin: truncated in token {i}")))?;
        off += len as usize;
        let text = String::from_utf8(raw.to_vec())
            .map_err(|_| invalid(format!("tokenizer.bin: token {i} is not valid UTF-8")))?;
        if !score.is_finite() {
            return Err(invalid(format!("tokenizer.bin: token {i} has a non-finite score")));
        }
        let ty = match i {
            0 => token_type::UNKNOWN,
            1 | 2 => token_type::CONTROL,
            _ if text.len() == 6 && text.starts_with("<0x") && text.ends_with('>') => token_type::BYTE,
            _ => token_type::NORMAL,
        };
        // run.c's export writes SentencePiece's `▁` as a plain space.
        tokens.push(text.replace(' ', "▁"));
        scores.push(score);
        types.push(ty);
    }
    Ok(TokenizerSpec::SentencePiece {
        tokens,
        scores,
        token_types: types,
        // run.c stops generation when the model emits BOS (a new story) and at EOS.
        special: SpecialTokens { bos: Some(1), eos: Some(2), add_bos: true, stop: vec![1, 2] },
        add_space_prefix: true,
    })
}

/// A run.c `tokenizer.bin` or a SentencePiece `tokenizer.model` (told apart by content).
pub fn read_tokenizer(bytes: &[u8], vocab: usize) -> Result<TokenizerSpec> {
    // A tokenizer.model starts with field 1 (pieces), wire type 2: byte 0x0a. A tokenizer.bin starts with a small
    // little-endian max token length, whose first byte is never 0x0a for real vocabularies... but may be, so try
    // the protobuf only when the run.c parse fails.
    match read_tokenizer_bin(bytes, vocab) {
        Ok(spec) => Ok(spec),
        Err(bin_err) if bytes.first() == Some(&0x0a) => {
            let spec = crate::sentencepiece::parse(bytes).map_err(|_| bin_err)?;
            if let TokenizerSpec::SentencePiece { tokens, .. } = &spec {
                if tokens.len() != vocab {
                    return Err(invalid(format!(
                        "tokenizer.model has {} pieces but the model's vocabulary is {vocab}",
                        tokens.len()
                    )));
                }
            }
            Ok(spec)
        }
        Err(e) => Err(e),
    }
}

pub fn import(model: &Path, tokenizer: &Path, opts: &ImportOptions, progress: Progress) -> Result<Imported> {
    let bytes = std::fs::read(model).map_err(io_err(model))?;
    let tok_bytes = std::fs::read(tokenizer).map_err(io_err(tokenizer))?;
    import_bytes(&bytes, &tok_bytes, opts, progress)
}

pub fn import_bytes(bytes: &[u8], tok_bytes: &[u8], opts: &ImportOptions, progress: Progress) -> Result<Imported> {
    let h = parse_header(bytes)?;
    let head = h.dim / h.heads;
    let kv_dim = h.kv_heads * head;
    let (d, l, hd, v) = (h.dim, h.layers, h.hidden, h.vocab);
    // (name pattern, rows, cols) in the file's order; `{}` is the layer.
    let per_layer = |n: &str, r, c| (n.to_string(), r, c, true);
    let global = |n: &str, r, c| (n.to_string(), r, c, false);
    let mut order = if h.v1 {
        vec![
            per_layer("attn_norm", 1, d),
            per_layer("ffn_norm", 1, d),
            global("output_norm", 1, d),
            global("token_embd", v, d),
            per_layer("attn_q", d, d),
            per_layer("attn_k", kv_dim, d),
            per_layer("attn_v", kv_dim, d),
            per_layer("attn_output", d, d),
            per_layer("ffn_gate", hd, d),
            per_layer("ffn_down", d, hd),
            per_layer("ffn_up", hd, d),
        ]
    } else {
        vec![
            global("token_embd", v, d),
            per_layer("attn_norm", 1, d),
            per_layer("attn_q", d, d),
            per_layer("attn_k", kv_dim, d),
            per_layer("attn_v", kv_dim, d),
            per_layer("attn_output", d, d),
            per_layer("ffn_norm", 1, d),
            per_layer("ffn_gate", hd, d),
            per_layer("ffn_down", d, hd),
            per_layer("ffn_up", hd, d),
            global("output_norm", 1, d),
            // run.c's precomputed RoPE tables, skipped.
            global("freq_cis", 1, h.seq_len * head),
        ]
    };
    if !h.shared {
        order.push(global("output", v, d));
    }
    let total_floats: usize = order.iter().map(|(_, r, c, pl)| r * c * if *pl { l } else { 1 }).sum();
    let need = h.data_offset + total_floats * 4;
    if bytes.len() < need {
        return Err(invalid(format!("llama2.c checkpoint: {} bytes, but its header implies {need}", bytes.len())));
    }
    let config = ModelConfig {
        arch: sprig_format::Arch::Llama,
        dim: d,
        n_layers: l,
        n_heads: h.heads,
        n_kv_heads: h.kv_heads,
        head_dim: head,
        hidden_dim: hd,
        vocab_size: v,
        max_seq_len: h.seq_len,
        norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_theta_local: None,
        rope_scaling: None,
        rope_layout: RopeLayout::Adjacent,
        activation: Activation::Silu,
        tied_embeddings: h.shared,
        embedding_scale: None,
        legacy_norm_add_one: false,
        attention: vec![AttentionKind::Global; l],
        moe: None,
        attn_scale: None,
        final_logit_softcap: None,
        mtp: None,
    };
    config.validate()?;
    let spec = read_tokenizer(tok_bytes, v)?;
    let tok_json = serde_json::to_string(&spec).expect("spec serialises");
    let mut sink = Sink {
        writer: ContainerWriter::new(&config, tok_json, None),
        quant: opts.quant,
        losses: vec![],
        importance: opts.importance,
    };
    let floats: &[u8] = &bytes[h.data_offset..need];
    let mut off = 0usize;
    let n_items: usize = order.iter().map(|o| if o.3 { l } else { 1 }).sum();
    let mut done = 0;
    let mut buf: Vec<f32> = Vec::new();
    for (name, rows, cols, per_layer) in &order {
        for layer in 0..if *per_layer { l } else { 1 } {
            let n = rows * cols;
            buf.clear();
            buf.extend(
                floats[off * 4..(off + n) * 4].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())),
            );
            off += n;
            if buf.iter().any(|x| !x.is_finite()) {
                return Err(invalid(format!(
                    "llama2.c checkpoint: tensor {name} (layer {layer}) holds NaN or infinity"
                )));
            }
            let full = if *per_layer { format!("blk.{layer}.{name}.weight") } else { format!("{name}.weight") };
            if name != "freq_cis" {
                let shape: Vec<usize> = if *rows == 1 { vec![*cols] } else { vec![*rows, *cols] };
                sink.add_f32(&full, &shape, &buf);
            }
            done += 1;
            progress(done, n_items);
        }
    }
    Ok(Imported { writer: sink.writer, losses: sink.losses })
}
