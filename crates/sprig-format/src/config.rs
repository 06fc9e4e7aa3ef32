//! Architecture config: a plain struct (llama2.c style), serialised as JSON into the file's metadata.

use serde::{Deserialize, Serialize};

pub use crate::arch::Arch;
use crate::FormatError;

/// Which elements RoPE rotates together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RopeLayout {
    /// Pairs `(2i, 2i+1)`: llama2.c and GGUF `llama` (whose Q/K rows are permuted for it).
    Adjacent,
    /// Pairs `(i, i + d/2)`: Hugging Face "rotate half", GGUF NeoX-style archs (qwen2, gemma3, ...).
    Half,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// SwiGLU: `silu(gate) * up`.
    Silu,
    /// GeGLU with tanh-approximated GELU (Gemma).
    GeluTanh,
}

/// How a long-context model rescales its RoPE frequencies, as Hugging Face transformers defines each type
/// (`rope_scaling.rope_type`); GGUF files map onto the same types.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum RopeScaling {
    /// Positions divided by `factor` (every frequency divided by it).
    Linear { factor: f32 },
    /// Llama 3.x: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 { factor: f32, low_freq_factor: f32, high_freq_factor: f32, original_context: usize },
    /// YaRN: frequencies blended between interpolated and extrapolated by a linear ramp over the dimensions
    /// whose rotation counts lie between `beta_slow` and `beta_fast`; cos/sin scaled by `attention_factor`.
    Yarn {
        factor: f32,
        original_context: usize,
        beta_fast: f32,
        beta_slow: f32,
        attention_factor: f32,
        /// Round the ramp's ends outward to whole dimensions (transformers' default).
        truncate: bool,
    },
    /// Per-frequency divisors given by the file itself (GGUF `rope_freqs.weight`, which llama.cpp's converter
    /// writes for Llama 3.x): frequency `i` is divided by `factors[i]`.
    FreqFactors { factors: Vec<f32> },
}

/// RoPE's per-pair inverse frequencies and the factor cos/sin are multiplied by.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeFrequencies {
    /// `head_dim / 2` inverse frequencies: pair `i` of a head rotates by `pos * inv_freq[i]`.
    pub inv_freq: Vec<f32>,
    /// Multiplies cos and sin (YaRN's attention factor; 1 otherwise).
    pub attention_factor: f32,
}

/// The YaRN attention factor for a scale (transformers' `get_mscale`).
pub fn yarn_mscale(scale: f32, mscale: f32) -> f32 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

impl RopeScaling {
    /// Inverse frequencies of a head of `head_dim` with base `theta`, scaled by `scaling`.
    pub fn frequencies(theta: f32, head_dim: usize, scaling: Option<&RopeScaling>) -> RopeFrequencies {
        let half = head_dim / 2;
        // f32, as llama2.c's run.c computes it, so unscaled f32 models reproduce its output exactly.
        let base: Vec<f32> = (0..half).map(|i| 1.0f32 / theta.powf((2 * i) as f32 / head_dim as f32)).collect();
        let mut attention_factor = 1.0;
        let inv_freq = match scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
            Some(RopeScaling::FreqFactors { factors }) => base.iter().zip(factors).map(|(f, d)| f / d).collect(),
            Some(&RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_context }) => {
                let old = original_context as f64;
                let (low_wl, high_wl) = (old / low_freq_factor as f64, old / high_freq_factor as f64);
                base.iter()
                    .map(|&f| {
                        let f = f as f64;
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let out = if wavelen < high_wl {
                            f
                        } else if wavelen > low_wl {
                            f / factor as f64
                        } else {
                            let smooth = (old / wavelen - low_freq_factor as f64)
                                / (high_freq_factor as f64 - low_freq_factor as f64);
                            (1.0 - smooth) * f / factor as f64 + smooth * f
                        };
                        out as f32
                    })
                    .collect()
            }
            Some(&RopeScaling::Yarn {
                factor,
                original_context,
                beta_fast,
                beta_slow,
                attention_factor: af,
                truncate,
            }) => {
                attention_factor = af;
                let (dim, base_f) = (head_dim as f64, theta as f64);
                let correction_dim = |rotations: f64| {
                    dim * (original_context as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln()
                        / (2.0 * base_f.ln())
                };
                let (mut low, mut high) = (correction_dim(beta_fast as f64), correction_dim(beta_slow as f64));
                if truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
                if low == high {
                    high += 0.001;
                }
                (0..half)
                    .map(|i| {
                        let pos_freq = base_f.powf((2 * i) as f64 / dim);
                        let (extra, inter) = (1.0 / pos_freq, 1.0 / (factor as f64 * pos_freq));
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let extra_factor = 1.0 - ramp;
                        (inter * (1.0 - extra_factor) + extra * extra_factor) as f32
                    })
                    .collect()
            }
        };
        RopeFrequencies { inv_freq, attention_factor }
    }

    /// Rejects parameters that would give non-finite or meaningless frequencies.
    pub fn validate(&self, head_dim: usize) -> Result<(), String> {
        let pos = |name: &str, v: f32| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!("{name} = {v} must be a finite number > 0"))
            }
        };
        match self {
            RopeScaling::Linear { factor } => pos("factor", *factor),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_context } => {
                pos("factor", *factor)?;
                pos("low_freq_factor", *low_freq_factor)?;
                pos("high_freq_factor", *high_freq_factor)?;
                if high_freq_factor <= low_freq_factor || *original_context == 0 {
                    return Err("llama3: needs high_freq_factor > low_freq_factor and an original context".into());
                }
                Ok(())
            }
            RopeScaling::Yarn { factor, original_context, beta_fast, beta_slow, attention_factor, .. } => {
                pos("factor", *factor)?;
                pos("beta_fast", *beta_fast)?;
                pos("beta_slow", *beta_slow)?;
                pos("attention_factor", *attention_factor)?;
                if *original_context == 0 {
                    return Err("yarn: needs an original context length".into());
                }
                Ok(())
            }
            RopeScaling::FreqFactors { factors } => {
                if factors.len() != head_dim / 2 {
                    return Err(format!("{} frequency factors for a head of {head_dim}", factors.len()));
                }
                factors.iter().try_for_each(|&f| pos("frequency factor", f))
            }
        }
    }
}

/// Attention kind of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum AttentionKind {
    Global,
    /// Attends to the last `window` positions (itself included); its KV cache is a ring of `window` entries.
    Sliding {
        window: usize,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouterScoring {
    Softmax,
    Sigmoid,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MoeConfig {
    pub n_experts: usize,
    pub top_k: usize,
    /// Hidden size of one routed expert.
    pub expert_hidden_dim: usize,
    pub scoring: RouterScoring,
    /// Renormalise the top-k weights to sum to 1.
    pub norm_topk: bool,
    /// Hidden size of the always-applied shared expert, if any.
    pub shared_expert_hidden_dim: Option<usize>,
    /// Per layer: true = MoE FFN, false = dense FFN.
    pub moe_layers: Vec<bool>,
    /// Routing weights are multiplied by this after selection/renormalisation (DeepSeek's
    /// `routed_scaling_factor`, GGUF `expert_weights_scale`); `None` = 1.
    #[serde(default)]
    pub routed_scale: Option<f32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Architecture family; what sets it apart is in its [`crate::arch::ArchRules`].
    pub arch: Arch,
    pub dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Dense FFN hidden size.
    pub hidden_dim: usize,
    pub vocab_size: usize,
    /// Longest context the model was trained for.
    pub max_seq_len: usize,
    pub norm_eps: f32,
    pub rope_theta: f32,
    /// RoPE base for sliding-window layers when it differs (Gemma 3).
    #[serde(default)]
    pub rope_theta_local: Option<f32>,
    /// RoPE frequency scaling of global layers (`None`: plain RoPE). See [`RopeScaling`].
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    pub rope_layout: RopeLayout,
    pub activation: Activation,
    pub tied_embeddings: bool,
    /// Multiply embeddings by this (Gemma: sqrt(dim)).
    #[serde(default)]
    pub embedding_scale: Option<f32>,
    /// Files written before Gemma's `1 + w` norms were folded into the weights at import said `true` here;
    /// such a file is refused (convert it again) rather than run with the wrong norms.
    #[serde(default, rename = "norm_add_one", skip_serializing)]
    pub legacy_norm_add_one: bool,
    /// Per-layer attention kind; length n_layers.
    pub attention: Vec<AttentionKind>,
    #[serde(default)]
    pub moe: Option<MoeConfig>,
    /// Attention logit scale; default 1/sqrt(head_dim).
    #[serde(default)]
    pub attn_scale: Option<f32>,
    /// Gemma-style final logit soft-capping.
    #[serde(default)]
    pub final_logit_softcap: Option<f32>,
    /// Multi-token-prediction heads stored after the layers (`None`: none).
    #[serde(default)]
    pub mtp: Option<MtpConfig>,
}

/// Multi-token prediction (DeepSeek-V3 / GLM-4.5 "nextn" layers, as llama.cpp names them): a block that
/// predicts the token after next from the model's hidden state at a position and the embedding of the token
/// that follows it. Head `j` is stored as layer `n_layers + j` (`blk.{n_layers + j}.*`) with
/// `nextn.enorm`, `nextn.hnorm`, `nextn.eh_proj_embd` / `nextn.eh_proj_hidden` (the two column halves of
/// GGUF's `nextn.eh_proj`), `nextn.shared_head_norm` and optionally its own `nextn.shared_head_head` and
/// `nextn.embed_tokens` (else the model's). Its attention is global and has a KV cache of its own.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MtpConfig {
    /// Heads in the file (GGUF `nextn_predict_layers`); sprig drafts with the first, chaining it.
    pub layers: usize,
    /// The heads' FFN is a Mixture-of-Experts of the model's MoE shape (else dense, `hidden_dim`).
    pub moe: bool,
}

/// Most MTP heads a file may declare.
pub const MAX_MTP_LAYERS: usize = 16;

/// Largest dimension accepted from a file: guards allocations against hostile headers.
pub const MAX_DIM: usize = 1 << 20;
pub const MAX_LAYERS: usize = 1024;
pub const MAX_VOCAB: usize = 1 << 22;
pub const MAX_CONTEXT: usize = 1 << 22;

impl ModelConfig {
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
    pub fn attn_scale(&self) -> f32 {
        self.attn_scale.unwrap_or(1.0 / (self.head_dim as f32).sqrt())
    }

    /// Rejects configs that are inconsistent or large enough to be hostile.
    pub fn validate(&self) -> Result<(), FormatError> {
        let bad = |f: &str, m: String| Err(FormatError::meta(&format!("config.{f}"), m));
        if self.legacy_norm_add_one {
            return bad(
                "norm_add_one",
                "written by an older sprig that applied Gemma's norms as 1 + w at run time; convert the source again"
                    .into(),
            );
        }
        for (name, v, max) in [
            ("dim", self.dim, MAX_DIM),
            ("n_layers", self.n_layers, MAX_LAYERS),
            ("n_heads", self.n_heads, MAX_DIM),
            ("n_kv_heads", self.n_kv_heads, MAX_DIM),
            ("head_dim", self.head_dim, MAX_DIM),
            ("hidden_dim", self.hidden_dim, MAX_DIM),
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            ("max_seq_len", self.max_seq_len, MAX_CONTEXT),
        ] {
            if v == 0 || v > max {
                return bad(name, format!("{v} is out of range 1..={max}"));
            }
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad("n_kv_heads", format!("{} does not divide n_heads {}", self.n_kv_heads, self.n_heads));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad("head_dim", format!("{} is odd; RoPE needs pairs", self.head_dim));
        }
        if self.attention.len() != self.n_layers {
            return bad("attention", format!("{} entries for {} layers", self.attention.len(), self.n_layers));
        }
        for (i, a) in self.attention.iter().enumerate() {
            if let AttentionKind::Sliding { window } = a {
                if *window == 0 || *window > MAX_CONTEXT {
                    return bad("attention", format!("layer {i}: window {window} out of range"));
                }
            }
        }
        if !(self.norm_eps.is_finite() && self.norm_eps >= 0.0) {
            return bad("norm_eps", format!("{}", self.norm_eps));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad("rope_theta", format!("{}", self.rope_theta));
        }
        if let Some(r) = &self.rope_scaling {
            r.validate(self.head_dim).or_else(|m| bad("rope_scaling", m))?;
        }
        if let Some(m) = &self.moe {
            if m.n_experts == 0 || m.n_experts > 4096 || m.top_k == 0 || m.top_k > m.n_experts {
                return bad("moe", format!("n_experts {} top_k {}", m.n_experts, m.top_k));
            }
            if m.expert_hidden_dim == 0 || m.expert_hidden_dim > MAX_DIM {
                return bad("moe.expert_hidden_dim", format!("{}", m.expert_hidden_dim));
            }
            if m.shared_expert_hidden_dim.is_some_and(|h| h == 0 || h > MAX_DIM) {
                return bad("moe.shared_expert_hidden_dim", format!("{:?}", m.shared_expert_hidden_dim));
            }
            if m.routed_scale.is_some_and(|s| !s.is_finite()) {
                return bad("moe.routed_scale", format!("{:?}", m.routed_scale));
            }
            if m.moe_layers.len() != self.n_layers {
                return bad("moe.moe_layers", format!("{} entries for {} layers", m.moe_layers.len(), self.n_layers));
            }
        }
        if let Some(m) = &self.mtp {
            if m.layers == 0 || m.layers > MAX_MTP_LAYERS {
                return bad("mtp.layers", format!("{} is out of range 1..={MAX_MTP_LAYERS}", m.layers));
            }
            if m.moe && self.moe.is_none() {
                return bad("mtp.moe", "an MoE head in a model without MoE settings".into());
            }
        }
        Ok(())
    }
}
