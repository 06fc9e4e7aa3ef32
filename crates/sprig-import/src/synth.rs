//! Synthetic checkpoint generator: small random models written in the *foreign* formats (Hugging Face
//! directories, GGUF), so the importers and model code can be tested on architectures and edge cases no
//! downloadable model covers. Same seed → same weights in every format.

use std::io::Write;
use std::path::Path;

use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use sprig_format::arch::{self, ArchRules, QkNorm};
pub use sprig_format::arch::Arch;
use sprig_tokenizer::hf::{bytes_to_unicode, from_gguf_bpe};
use sprig_tokenizer::token_type;

use crate::{invalid, io_err, Result};

#[derive(Clone, Debug)]
pub struct SynthSpec {
    /// Any family of the rule book; its rules decide the tensors written (QKV bias, QK norm, post-norms,
    /// `1 + w` norms in HF files, a gated shared expert, ...). `Llama` with `moe` is Mixtral.
    pub arch: Arch,
    pub dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub hidden_dim: usize,
    pub tied: bool,
    pub seed: u64,
    /// `Some((window, pattern))`: every layer but each `pattern`-th is a sliding-window layer (HF `layer_types`,
    /// GGUF `sliding_window` + `sliding_window_pattern`). A family with a sliding rule (Gemma 3) gets a window
    /// of [`DEFAULT_WINDOW`] with its own pattern when this is `None`.
    pub sliding: Option<(usize, usize)>,
    pub moe: Option<SynthMoe>,
    /// Vocabulary size; `None` = the generator's natural 267 tokens. Larger sizes pad with filler tokens that
    /// the merges never produce (a stories110M-shaped model has 32000).
    pub vocab: Option<usize>,
    /// Trained context length written to the file.
    pub context: usize,
    /// A multi-token-prediction head after the layers (GGUF only: `nextn_predict_layers` = 1).
    pub mtp: Option<SynthMtp>,
}

/// The MTP head the generator writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynthMtp {
    /// A block of random weights (its drafts are mostly rejected: exactness tests).
    Random,
    /// A head that predicts what the model itself would (for a one-layer model): its block is a copy of
    /// layer 0, `eh_proj` passes the token's embedding through and ignores the hidden state, the norms are the
    /// model's, and the embedding rows are scaled to RMS 1 (so `enorm` changes nothing). Its draft for
    /// position `p + 2` is then the model's own prediction from the tokens after position 0 — most are
    /// accepted, and a wrong position, token or cache shows as rejections.
    Mirror,
}

/// Mixture-of-Experts FFNs for the generator.
#[derive(Clone, Debug)]
pub struct SynthMoe {
    pub n_experts: usize,
    pub top_k: usize,
    pub expert_hidden: usize,
    /// Hidden size of a shared expert (qwen2moe adds a sigmoid gate on it).
    pub shared_hidden: Option<usize>,
    pub sigmoid: bool,
    pub norm_topk: bool,
    pub routed_scale: Option<f32>,
    /// The first layers keep a dense FFN.
    pub leading_dense: usize,
    /// The experts are the layer's dense FFN cut into `n_experts` slices of its hidden units and the router is
    /// all zeros; with `top_k = n_experts`, renormalisation and `routed_scale = n_experts`, every expert gets
    /// weight exactly 1 and the model equals the dense one (`moe = None`, same seed).
    pub split_dense: bool,
}

impl SynthMoe {
    pub fn new(n_experts: usize, top_k: usize, expert_hidden: usize) -> Self {
        SynthMoe {
            n_experts,
            top_k,
            expert_hidden,
            shared_hidden: None,
            sigmoid: false,
            norm_topk: true,
            routed_scale: None,
            leading_dense: 0,
            split_dense: false,
        }
    }
    /// The exact dense split described at [`SynthMoe::split_dense`].
    pub fn split_of_dense(n_experts: usize, dense_hidden: usize) -> Self {
        SynthMoe {
            routed_scale: Some(n_experts as f32),
            split_dense: true,
            ..SynthMoe::new(n_experts, n_experts, dense_hidden / n_experts)
        }
    }
}

/// The window of a family whose rules make it hybrid, when the spec gives none.
pub const DEFAULT_WINDOW: usize = 8;

impl SynthSpec {
    pub fn tiny(arch: Arch) -> Self {
        SynthSpec {
            arch,
            dim: 64,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            hidden_dim: 96,
            tied: false,
            seed: 1,
            sliding: None,
            moe: None,
            vocab: None,
            context: 256,
            mtp: None,
        }
    }
    /// A small MoE model (8 experts, top-2, a dense first layer) of `arch`'s MoE form: its own for the MoE
    /// families, Mixtral for Llama. A family with a shared-expert gate gets a shared expert; renormalisation
    /// follows the family's default.
    pub fn tiny_moe(arch: Arch) -> Self {
        let r = arch.rules();
        let mut m = SynthMoe::new(8, 2, 32);
        m.leading_dense = 1;
        m.norm_topk = r.gguf_norm_topk;
        if r.shared_expert_gate {
            m.shared_hidden = Some(48);
        }
        // A dense family's MoE form (Mixtral) has experts of the model's intermediate size.
        let hidden_dim = if r.moe { 96 } else { m.expert_hidden };
        SynthSpec { n_layers: 3, hidden_dim, moe: Some(m), ..SynthSpec::tiny(arch) }
    }
    fn rules(&self) -> &'static ArchRules {
        self.arch.rules()
    }
    fn hf_model_type(&self) -> &'static str {
        let r = self.rules();
        match (r.hf_moe_model_type, &self.moe) {
            (Some(t), Some(_)) => t,
            _ => r.hf_model_types[0],
        }
    }
    fn head_dim(&self) -> usize {
        self.dim / self.n_heads
    }
    fn rope_theta(&self) -> f64 {
        // Two bases, so a mix-up of them shows.
        if self.arch == Arch::Llama {
            10_000.0
        } else {
            1_000_000.0
        }
    }
    /// The sliding-window layout actually written: the spec's, or the family's rule.
    fn sliding(&self) -> Option<(usize, usize)> {
        self.sliding.or(self.rules().sliding_every.map(|every| (DEFAULT_WINDOW, every)))
    }
}

/// A small byte-level BPE vocabulary: 256 byte tokens, a few merges, ChatML specials.
pub struct SynthVocab {
    pub tokens: Vec<String>,
    pub merges: Vec<String>,
    pub types: Vec<u8>,
}

pub fn synth_vocab(size: Option<usize>) -> SynthVocab {
    let byte_chars: Vec<char> = bytes_to_unicode().into_iter().map(|(_, c)| c).collect();
    let mut tokens: Vec<String> = byte_chars.iter().map(|c| c.to_string()).collect();
    let mut merges = Vec::new();
    for (a, b) in [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("o", "n"), ("e", "r"), ("Ġ", "s")]
    {
        merges.push(format!("{a} {b}"));
        tokens.push(format!("{a}{b}"));
    }
    let natural = tokens.len() + 3;
    for i in 0..size.unwrap_or(natural).saturating_sub(natural) {
        tokens.push(format!("<fill{i}>"));
    }
    let mut types = vec![token_type::NORMAL; tokens.len()];
    for s in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] {
        tokens.push(s.into());
        types.push(token_type::CONTROL);
    }
    SynthVocab { tokens, merges, types }
}

const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Weights in HF layout (`[out, in]`, rotate-half Q/K), by HF name.
pub fn synth_weights(s: &SynthSpec, vocab: usize) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = StdRng::seed_from_u64(s.seed);
    let mut out = Vec::new();
    let mat = |out: &mut Vec<_>, name: String, rows: usize, cols: usize, scale: f32, rng: &mut StdRng| {
        let v: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-scale..scale)).collect();
        out.push((name, vec![rows, cols], v));
    };
    let (d, hd, kvd) = (s.dim, s.head_dim(), s.n_kv_heads * s.head_dim());
    mat(&mut out, "model.embed_tokens.weight".into(), vocab, d, 1.0, &mut rng);
    for l in 0..s.n_layers {
        let p = format!("model.layers.{l}");
        let ws = 1.0 / (d as f32).sqrt();
        mat(&mut out, format!("{p}.self_attn.q_proj.weight"), s.n_heads * hd, d, ws, &mut rng);
        mat(&mut out, format!("{p}.self_attn.k_proj.weight"), kvd, d, ws, &mut rng);
        mat(&mut out, format!("{p}.self_attn.v_proj.weight"), kvd, d, ws, &mut rng);
        mat(&mut out, format!("{p}.self_attn.o_proj.weight"), d, s.n_heads * hd, ws, &mut rng);
        let first_ffn = out.len();
        mat(&mut out, format!("{p}.mlp.gate_proj.weight"), s.hidden_dim, d, ws, &mut rng);
        mat(&mut out, format!("{p}.mlp.up_proj.weight"), s.hidden_dim, d, ws, &mut rng);
        mat(
            &mut out,
            format!("{p}.mlp.down_proj.weight"),
            d,
            s.hidden_dim,
            1.0 / (s.hidden_dim as f32).sqrt(),
            &mut rng,
        );
        if let Some(m) = s.moe.as_ref().filter(|m| l >= m.leading_dense) {
            let dense: Vec<_> = out.drain(first_ffn..).collect();
            moe_weights(s, m, &p, dense, &mut out, &mut rng);
        }
        let qk_lens = match s.rules().qk_norm {
            QkNorm::None => None,
            QkNorm::PerHead => Some([hd, hd]),
            QkNorm::Whole => Some([s.n_heads * hd, kvd]),
        };
        if let Some(lens) = qk_lens {
            for (n, len) in ["q_norm", "k_norm"].into_iter().zip(lens) {
                let v: Vec<f32> = (0..len).map(|_| 1.0 + rng.gen_range(-0.3..0.3)).collect();
                out.push((format!("{p}.self_attn.{n}.weight"), vec![len], v));
            }
        }
        if s.rules().qkv_bias {
            for (n, len) in [("q_proj", s.n_heads * hd), ("k_proj", kvd), ("v_proj", kvd)] {
                let v: Vec<f32> = (0..len).map(|_| rng.gen_range(-0.5..0.5)).collect();
                out.push((format!("{p}.self_attn.{n}.bias"), vec![len], v));
            }
        }
        let norms: &[&str] = if s.rules().post_norms {
            &["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"]
        } else {
            &["input_layernorm", "post_attention_layernorm"]
        };
        for n in norms {
            let v: Vec<f32> = (0..d).map(|_| 1.0 + rng.gen_range(-0.2..0.2)).collect();
            out.push((format!("{p}.{n}.weight"), vec![d], v));
        }
    }
    let v: Vec<f32> = (0..d).map(|_| 1.0 + rng.gen_range(-0.2..0.2)).collect();
    out.push(("model.norm.weight".into(), vec![d], v));
    if !s.tied {
        mat(&mut out, "lm_head.weight".into(), vocab, d, 1.0 / (d as f32).sqrt(), &mut rng);
    }
    out
}

/// A layer's MoE tensors (HF names of the spec's family) in place of its dense FFN `[gate, up, down]`.
fn moe_weights(
    s: &SynthSpec,
    m: &SynthMoe,
    p: &str,
    dense: Vec<(String, Vec<usize>, Vec<f32>)>,
    out: &mut Vec<(String, Vec<usize>, Vec<f32>)>,
    rng: &mut StdRng,
) {
    let d = s.dim;
    let (eh, ne) = (m.expert_hidden, m.n_experts);
    let mixtral = s.hf_model_type() == "mixtral";
    let (block, names) =
        if mixtral { ("block_sparse_moe", ["w1", "w3", "w2"]) } else { ("mlp", ["gate_proj", "up_proj", "down_proj"]) };
    let router = if m.split_dense {
        vec![0.0; ne * d]
    } else {
        (0..ne * d).map(|_| rng.gen_range(-1.0..1.0) * 3.0 / (d as f32).sqrt()).collect()
    };
    out.push((format!("{p}.{block}.gate.weight"), vec![ne, d], router));
    for e in 0..ne {
        let (gate, up, down): (Vec<f32>, Vec<f32>, Vec<f32>) = if m.split_dense {
            assert_eq!(eh * ne, s.hidden_dim, "split_dense: experts must tile the dense hidden size");
            let rows = |w: &[f32]| w[e * eh * d..(e + 1) * eh * d].to_vec();
            let h = s.hidden_dim;
            let cols: Vec<f32> =
                (0..d).flat_map(|r| dense[2].2[r * h + e * eh..r * h + (e + 1) * eh].to_vec()).collect();
            (rows(&dense[0].2), rows(&dense[1].2), cols)
        } else {
            let ws = 1.0 / (d as f32).sqrt();
            let mut r = |n: usize, sc: f32| (0..n).map(|_| rng.gen_range(-sc..sc)).collect::<Vec<f32>>();
            (r(eh * d, ws), r(eh * d, ws), r(d * eh, 1.0 / (eh as f32).sqrt()))
        };
        let name = |i: usize| format!("{p}.{block}.experts.{e}.{}.weight", names[i]);
        out.push((name(0), vec![eh, d], gate));
        out.push((name(1), vec![eh, d], up));
        out.push((name(2), vec![d, eh], down));
    }
    if let Some(sh) = m.shared_hidden {
        let ws = 1.0 / (d as f32).sqrt();
        let mut r = |n: usize, sc: f32| (0..n).map(|_| rng.gen_range(-sc..sc)).collect::<Vec<f32>>();
        let (g, u, dn) = (r(sh * d, ws), r(sh * d, ws), r(d * sh, 1.0 / (sh as f32).sqrt()));
        out.push((format!("{p}.mlp.shared_expert.gate_proj.weight"), vec![sh, d], g));
        out.push((format!("{p}.mlp.shared_expert.up_proj.weight"), vec![sh, d], u));
        out.push((format!("{p}.mlp.shared_expert.down_proj.weight"), vec![d, sh], dn));
        if s.rules().shared_expert_gate {
            out.push((format!("{p}.mlp.shared_expert_gate.weight"), vec![1, d], r(d, 3.0 * ws)));
        }
    }
}

/// The MTP head's tensors as layer `n_layers`: its block with HF names (mapped and stacked on writing like
/// the layers'), its own tensors with their GGUF names.
fn mtp_weights(s: &SynthSpec, kind: SynthMtp, trunk: &[(String, Vec<usize>, Vec<f32>)], vocab: usize) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let (d, l) = (s.dim, s.n_layers);
    // The block: layer 0 of the model (mirror) or of a one-layer model of another seed, MoE when the model is.
    let block: Vec<_> = match kind {
        SynthMtp::Mirror => trunk.iter().filter(|t| t.0.starts_with("model.layers.0.")).cloned().collect(),
        SynthMtp::Random => {
            let moe = s.moe.clone().map(|m| SynthMoe { leading_dense: 0, ..m });
            let one = SynthSpec { n_layers: 1, seed: s.seed ^ 0x6d7470, moe, mtp: None, ..s.clone() };
            synth_weights(&one, vocab).into_iter().filter(|t| t.0.starts_with("model.layers.0.")).collect()
        }
    };
    let mut out: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for (name, shape, w) in block {
        out.push((name.replacen("model.layers.0.", &format!("model.layers.{l}."), 1), shape, w));
    }
    let norm = |seed: u64| -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..d).map(|_| 1.0 + rng.gen_range(-0.2..0.2)).collect()
    };
    let output_norm = trunk.iter().find(|t| t.0 == "model.norm.weight").expect("norm").2.clone();
    let (enorm, hnorm, eh, head_norm) = match kind {
        SynthMtp::Mirror => {
            let eh: Vec<f32> = (0..d * 2 * d).map(|i| if i % (2 * d) == i / (2 * d) { 1.0 } else { 0.0 }).collect();
            (vec![1.0; d], vec![1.0; d], eh, output_norm)
        }
        SynthMtp::Random => {
            let mut rng = StdRng::seed_from_u64(s.seed ^ 0xe4);
            let ws = 1.0 / (2.0 * d as f32).sqrt();
            let eh = (0..d * 2 * d).map(|_| rng.gen_range(-ws..ws)).collect();
            (norm(s.seed ^ 1), norm(s.seed ^ 2), eh, norm(s.seed ^ 3))
        }
    };
    let p = format!("blk.{l}.nextn");
    out.push((format!("{p}.enorm.weight"), vec![d], enorm));
    out.push((format!("{p}.hnorm.weight"), vec![d], hnorm));
    out.push((format!("{p}.eh_proj.weight"), vec![d, 2 * d], eh));
    out.push((format!("{p}.shared_head_norm.weight"), vec![d], head_norm));
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HfDtype {
    F32,
    F16,
    BF16,
}

/// Writes an HF directory; `shards > 1` splits the weights over several safetensors files.
pub fn write_hf_dir(s: &SynthSpec, dir: &Path, dtype: HfDtype, shards: usize) -> Result<()> {
    if s.mtp.is_some() {
        return Err(invalid("the generator writes MTP heads to GGUF files only"));
    }
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let v = synth_vocab(s.vocab);
    let mut config = json!({
        "model_type": s.hf_model_type(), "architectures": ["ForCausalLM"],
        "hidden_size": s.dim, "num_hidden_layers": s.n_layers, "num_attention_heads": s.n_heads,
        "num_key_value_heads": s.n_kv_heads, "intermediate_size": s.hidden_dim, "vocab_size": v.tokens.len(),
        "max_position_embeddings": s.context, "rms_norm_eps": 1e-6, "rope_theta": s.rope_theta(),
        "tie_word_embeddings": s.tied, "torch_dtype": "float32",
    });
    if let Some((window, pattern)) = s.sliding() {
        let types: Vec<&str> = (0..s.n_layers)
            .map(|i| if (i + 1) % pattern == 0 { "full_attention" } else { "sliding_attention" })
            .collect();
        config["layer_types"] = json!(types);
        config["sliding_window"] = json!(window);
    }
    if let Some(m) = &s.moe {
        let key = if s.hf_model_type() == "mixtral" { "num_local_experts" } else { "num_experts" };
        config[key] = json!(m.n_experts);
        config["num_experts_per_tok"] = json!(m.top_k);
        config["norm_topk_prob"] = json!(m.norm_topk);
        config["first_k_dense_replace"] = json!(m.leading_dense);
        if s.hf_model_type() == "mixtral" {
            assert_eq!(m.expert_hidden, s.hidden_dim, "Mixtral's experts have the model's intermediate_size");
        } else {
            config["moe_intermediate_size"] = json!(m.expert_hidden);
        }
        if let Some(sh) = m.shared_hidden {
            config["shared_expert_intermediate_size"] = json!(sh);
        }
        if m.sigmoid {
            config["scoring_func"] = json!("sigmoid");
        }
        if let Some(r) = m.routed_scale {
            config["routed_scaling_factor"] = json!(r);
        }
    }
    config["torch_dtype"] = json!(match dtype {
        HfDtype::F32 => "float32",
        HfDtype::F16 => "float16",
        HfDtype::BF16 => "bfloat16",
    });
    let write = |name: &str, text: String| -> Result<()> {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(io_err(&p))
    };
    write("config.json", serde_json::to_string_pretty(&config).unwrap())?;
    write("tokenizer.json", from_gguf_bpe(&v.tokens, &v.merges, &v.types, "gpt2")?)?;
    write(
        "tokenizer_config.json",
        serde_json::to_string_pretty(&json!({
            "bos_token": null, "eos_token": "<|im_end|>", "add_bos_token": false, "chat_template": CHATML,
        }))
        .unwrap(),
    )?;
    let mut weights = synth_weights(s, v.tokens.len());
    if s.rules().hf_norm_plus_one {
        // The family's HF checkpoints store norm weights as w, applied as 1 + w.
        for (name, _, w) in &mut weights {
            if arch::hf_tensor_name(name, s.arch).is_some_and(|n| arch::is_norm_weight(&n)) {
                w.iter_mut().for_each(|x| *x -= 1.0);
            }
        }
    }
    let per = weights.len().div_ceil(shards.max(1));
    for (i, chunk) in weights.chunks(per).enumerate() {
        let data: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = chunk
            .iter()
            .map(|(n, shape, v)| {
                let (dt, bytes) = match dtype {
                    HfDtype::F32 => (safetensors::Dtype::F32, bytemuck::cast_slice(v).to_vec()),
                    HfDtype::F16 => {
                        (safetensors::Dtype::F16, v.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect())
                    }
                    HfDtype::BF16 => {
                        (safetensors::Dtype::BF16, v.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect())
                    }
                };
                (n.clone(), dt, shape.clone(), bytes)
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = data
            .iter()
            .map(|(n, dt, shape, b)| (n.clone(), safetensors::tensor::TensorView::new(*dt, shape.clone(), b).unwrap()))
            .collect();
        let name = if shards > 1 {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, shards)
        } else {
            "model.safetensors".into()
        };
        let p = dir.join(name);
        safetensors::serialize_to_file(views, None, &p).map_err(|e| invalid(format!("{}: {e}", p.display())))?;
    }
    Ok(())
}

/// HF → GGUF `llama` Q/K row order (rotate-half pairs become adjacent pairs), as llama.cpp's converter does.
pub fn permute_qk(w: &[f32], n_heads: usize, cols: usize) -> Vec<f32> {
    let rows = w.len() / cols;
    let hd = rows / n_heads;
    let mut out = vec![0.0; w.len()];
    for h in 0..n_heads {
        for i in 0..hd / 2 {
            for (j, src) in [i, i + hd / 2].into_iter().enumerate() {
                let dst_row = h * hd + 2 * i + j;
                let src_row = h * hd + src;
                out[dst_row * cols..(dst_row + 1) * cols].copy_from_slice(&w[src_row * cols..(src_row + 1) * cols]);
            }
        }
    }
    out
}

/// Minimal GGUF v3 writer for the generator (f32 tensors and the metadata the importer reads).
pub struct GgufWriter {
    kv: Vec<u8>,
    n_kv: u64,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    pub fn new() -> Self {
        GgufWriter { kv: Vec::new(), n_kv: 0, tensors: Vec::new() }
    }
    fn key(&mut self, k: &str, ty: u32) {
        self.kv.extend((k.len() as u64).to_le_bytes());
        self.kv.extend(k.as_bytes());
        self.kv.extend(ty.to_le_bytes());
        self.n_kv += 1;
    }
    pub fn u32(&mut self, k: &str, v: u32) {
        self.key(k, 4);
        self.kv.extend(v.to_le_bytes());
    }
    pub fn f32(&mut self, k: &str, v: f32) {
        self.key(k, 6);
        self.kv.extend(v.to_le_bytes());
    }
    pub fn bool(&mut self, k: &str, v: bool) {
        self.key(k, 7);
        self.kv.push(v as u8);
    }
    pub fn str(&mut self, k: &str, v: &str) {
        self.key(k, 8);
        self.kv.extend((v.len() as u64).to_le_bytes());
        self.kv.extend(v.as_bytes());
    }
    pub fn strs(&mut self, k: &str, v: &[String]) {
        self.key(k, 9);
        self.kv.extend(8u32.to_le_bytes());
        self.kv.extend((v.len() as u64).to_le_bytes());
        for s in v {
            self.kv.extend((s.len() as u64).to_le_bytes());
            self.kv.extend(s.as_bytes());
        }
    }
    pub fn i32s(&mut self, k: &str, v: &[i32]) {
        self.key(k, 9);
        self.kv.extend(5u32.to_le_bytes());
        self.kv.extend((v.len() as u64).to_le_bytes());
        for x in v {
            self.kv.extend(x.to_le_bytes());
        }
    }
    pub fn bools(&mut self, k: &str, v: &[bool]) {
        self.key(k, 9);
        self.kv.extend(7u32.to_le_bytes());
        self.kv.extend((v.len() as u64).to_le_bytes());
        self.kv.extend(v.iter().map(|&b| b as u8));
    }
    /// A tensor in row-major `shape` (slowest first), stored as ggml type `ty` with the given raw bytes.
    pub fn tensor(&mut self, name: &str, shape: &[usize], ty: u32, bytes: Vec<u8>) {
        let dims = shape.iter().rev().map(|&d| d as u64).collect();
        self.tensors.push((name.into(), dims, ty, bytes));
    }
    /// Drops a tensor already added (tests that replace one with a malformed one).
    pub fn remove_tensor(&mut self, name: &str) -> bool {
        let before = self.tensors.len();
        self.tensors.retain(|t| t.0 != name);
        self.tensors.len() < before
    }
    pub fn tensor_f32(&mut self, name: &str, shape: &[usize], v: &[f32]) {
        self.tensor(name, shape, 0, bytemuck::cast_slice(v).to_vec());
    }
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(b"GGUF");
        b.extend(3u32.to_le_bytes());
        b.extend((self.tensors.len() as u64).to_le_bytes());
        b.extend(self.n_kv.to_le_bytes());
        b.extend(&self.kv);
        let mut off = 0u64;
        for (name, dims, ty, bytes) in &self.tensors {
            b.extend((name.len() as u64).to_le_bytes());
            b.extend(name.as_bytes());
            b.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(ty.to_le_bytes());
            b.extend(off.to_le_bytes());
            off += (bytes.len() as u64).next_multiple_of(32);
        }
        b.resize(b.len().next_multiple_of(32), 0);
        for (_, _, _, bytes) in &self.tensors {
            b.extend(bytes);
            b.resize(b.len().next_multiple_of(32), 0);
        }
        b
    }
    pub fn write(&self, path: &Path) -> Result<()> {
        let mut f = std::fs::File::create(path).map_err(io_err(path))?;
        f.write_all(&self.to_bytes()).map_err(io_err(path))
    }
}

/// The same model as [`write_hf_dir`] as a GGUF file (Q/K rows permuted where the family's GGUF files are).
pub fn write_gguf(s: &SynthSpec, path: &Path) -> Result<()> {
    gguf_writer(s)?.write(path)
}

/// [`write_gguf`]'s bytes, in memory.
pub fn gguf_bytes(s: &SynthSpec) -> Result<Vec<u8>> {
    Ok(gguf_writer(s)?.to_bytes())
}

/// [`write_gguf`]'s writer, for tests that add keys before writing.
pub fn gguf_writer(s: &SynthSpec) -> Result<GgufWriter> {
    let v = synth_vocab(s.vocab);
    let mut g = GgufWriter::new();
    let a = s.arch.name();
    let rules = s.rules();
    g.str("general.architecture", a);
    g.str("general.name", &format!("sprig synthetic {a}"));
    g.u32(&format!("{a}.embedding_length"), s.dim as u32);
    // An MTP head is one more block, the last (llama.cpp's `nextn` layout).
    g.u32(&format!("{a}.block_count"), (s.n_layers + usize::from(s.mtp.is_some())) as u32);
    g.u32(&format!("{a}.attention.head_count"), s.n_heads as u32);
    g.u32(&format!("{a}.attention.head_count_kv"), s.n_kv_heads as u32);
    g.u32(&format!("{a}.feed_forward_length"), s.hidden_dim as u32);
    g.u32(&format!("{a}.context_length"), s.context as u32);
    g.f32(&format!("{a}.attention.layer_norm_rms_epsilon"), 1e-6);
    g.f32(&format!("{a}.rope.freq_base"), s.rope_theta() as f32);
    if let Some((window, every)) = s.sliding() {
        g.u32(&format!("{a}.attention.sliding_window"), window as u32);
        // The period only when it is not the family's own (as llama.cpp's converters write it).
        if rules.sliding_every != Some(every) {
            g.u32(&format!("{a}.attention.sliding_window_pattern"), every as u32);
        }
    }
    if s.mtp.is_some() {
        g.u32(&format!("{a}.nextn_predict_layers"), 1);
    }
    g.str("tokenizer.ggml.model", "gpt2");
    g.str("tokenizer.ggml.pre", "gpt-2");
    g.strs("tokenizer.ggml.tokens", &v.tokens);
    g.strs("tokenizer.ggml.merges", &v.merges);
    g.i32s("tokenizer.ggml.token_type", &v.types.iter().map(|&t| t as i32).collect::<Vec<_>>());
    g.u32("tokenizer.ggml.eos_token_id", (v.tokens.len() - 1) as u32);
    g.bool("tokenizer.ggml.add_bos_token", false);
    g.str("tokenizer.chat_template", CHATML);
    if let Some(m) = &s.moe {
        g.u32(&format!("{a}.expert_count"), m.n_experts as u32);
        g.u32(&format!("{a}.expert_used_count"), m.top_k as u32);
        g.u32(&format!("{a}.expert_feed_forward_length"), m.expert_hidden as u32);
        g.u32(&format!("{a}.leading_dense_block_count"), m.leading_dense as u32);
        g.bool(&format!("{a}.expert_weights_norm"), m.norm_topk);
        g.u32(&format!("{a}.expert_gating_func"), if m.sigmoid { 2 } else { 1 });
        if let Some(sh) = m.shared_hidden {
            g.u32(&format!("{a}.expert_shared_feed_forward_length"), sh as u32);
        }
        if let Some(r) = m.routed_scale {
            g.f32(&format!("{a}.expert_weights_scale"), r);
        }
    }
    // Per-expert tensors are stacked into GGUF's 3-D [experts, rows, cols] tensors.
    let mut stacks: std::collections::BTreeMap<String, (Vec<usize>, Vec<Vec<f32>>)> = Default::default();
    let mut trunk = synth_weights(s, v.tokens.len());
    if s.mtp == Some(SynthMtp::Mirror) {
        if s.n_layers != 1 || s.moe.is_some() {
            return Err(invalid("a mirror MTP head needs a one-layer dense model"));
        }
        let embd = &mut trunk.iter_mut().find(|t| t.0 == "model.embed_tokens.weight").expect("embedding").2;
        for row in embd.chunks_exact_mut(s.dim) {
            let rms = (row.iter().map(|x| x * x).sum::<f32>() / s.dim as f32).sqrt();
            row.iter_mut().for_each(|x| *x /= rms);
        }
    }
    let mtp = match s.mtp {
        None => Vec::new(),
        Some(kind) => mtp_weights(s, kind, &trunk, v.tokens.len()),
    };
    for (name, shape, w) in trunk.into_iter().chain(mtp) {
        if let Some((stacked, _)) = arch::hf_expert_tensor_name(&name) {
            let entry = stacks.entry(stacked).or_insert_with(|| (shape.clone(), Vec::new()));
            entry.1.push(w);
            continue;
        }
        // MTP tensors come with their GGUF names.
        let native = if name.starts_with("blk.") { name.clone() } else { arch::hf_tensor_name(&name, s.arch).expect("synthetic names map") };
        // GGUF keeps the shared-expert gate as a vector.
        let shape = if native.ends_with("ffn_gate_inp_shexp.weight") { vec![shape[1]] } else { shape };
        let w = if rules.gguf_qk_permuted && native.ends_with("attn_q.weight") {
            permute_qk(&w, s.n_heads, shape[1])
        } else if rules.gguf_qk_permuted && native.ends_with("attn_k.weight") {
            permute_qk(&w, s.n_kv_heads, shape[1])
        } else {
            w
        };
        g.tensor_f32(&native, &shape, &w);
    }
    for (name, (shape, experts)) in stacks {
        let all: Vec<f32> = experts.concat();
        g.tensor_f32(&name, &[experts.len(), shape[0], shape[1]], &all);
    }
    Ok(g)
}
