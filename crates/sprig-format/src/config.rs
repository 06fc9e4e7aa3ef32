//! Architecture config: a plain struct (llama2.c style), serialised as JSON into the file's metadata.

use serde::{Deserialize, Serialize};

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
    /// Architecture family, e.g. "llama", "qwen2", "gemma3".
    pub arch: String,
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
    /// Linear RoPE position scaling factor (positions are divided by it) for global layers.
    #[serde(default)]
    pub rope_scale: Option<f32>,
    pub rope_layout: RopeLayout,
    pub activation: Activation,
    pub tied_embeddings: bool,
    /// Multiply embeddings by this (Gemma: sqrt(dim)).
    #[serde(default)]
    pub embedding_scale: Option<f32>,
    /// RMSNorm weights are stored as `w` but applied as `1 + w` (Gemma).
    #[serde(default)]
    pub norm_add_one: bool,
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
}

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
        Ok(())
    }
}
