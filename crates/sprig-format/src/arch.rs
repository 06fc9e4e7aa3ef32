//! The rule book: every architecture family sprig runs, and everything that sets one apart, in one table.
//!
//! Both importers (GGUF and Hugging Face), the synthetic generator, the CLI and the decoder read these rules;
//! none of them spells a family's name in a condition. A family whose differences fit existing flags is one
//! entry in [`RULES`] (plus its tests). Constant transforms a family applies to its weights (Gemma's RMSNorm
//! `1 + w`) are folded into the weights at import, so the model code never sees them.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::config::{Activation, AttentionKind};

/// An architecture family. Serialised (in a native file's config) as its GGUF name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Llama (llama2.c, SmolLM2, Mistral; with experts: Mixtral).
    Llama,
    Qwen2,
    Qwen3,
    Gemma3,
    Qwen2Moe,
    Qwen3Moe,
    Olmoe,
}

/// Where a family's attention applies RMSNorm to Q and K.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// One `[head_dim]` weight per projection, applied to each head (Qwen3, Gemma 3).
    PerHead,
    /// One weight over the whole projection, `[n_heads * head_dim]` / `[n_kv_heads * head_dim]` (OLMoE).
    Whole,
}

/// What sets a family apart. Defaults that a file may override say which file format's reference
/// implementation they come from (llama.cpp for GGUF, transformers for Hugging Face).
#[derive(Clone, Copy, Debug)]
pub struct ArchRules {
    pub arch: Arch,
    /// `general.architecture` of GGUF files, and the name everywhere else (CLI, native config).
    pub name: &'static str,
    /// Hugging Face `config.json` `model_type`s of the family; the first is the one the generator writes.
    pub hf_model_types: &'static [&'static str],
    /// The `model_type` of the family's Mixture-of-Experts variant when it has its own (Mixtral).
    pub hf_moe_model_type: Option<&'static str>,
    /// Routed experts in (some) FFN layers.
    pub moe: bool,
    /// Biases on the Q, K and V projections.
    pub qkv_bias: bool,
    /// The shared expert's output is scaled by `sigmoid(x · ffn_gate_inp_shexp)` (Qwen-MoE).
    pub shared_expert_gate: bool,
    pub qk_norm: QkNorm,
    /// RMSNorm after attention and after the FFN too (Gemma's four norms per layer): HF
    /// `post_attention_layernorm` is then a post-norm, not the FFN's pre-norm.
    pub post_norms: bool,
    pub activation: Activation,
    /// Embeddings multiplied by `sqrt(dim)`.
    pub embedding_scale_sqrt_dim: bool,
    /// HF checkpoints store RMSNorm weights as `w` applied as `1 + w`; the importer stores `1 + w`
    /// (GGUF converters already do).
    pub hf_norm_plus_one: bool,
    /// GGUF Q/K rows are permuted for adjacent-pair RoPE (llama.cpp's converter does this for `llama` only);
    /// every other case uses rotate-half pairs.
    pub gguf_qk_permuted: bool,
    /// `Some(n)`: every n-th layer is global and the others sliding-window, unless the file lists its own
    /// per-layer pattern (HF `layer_types`, GGUF `sliding_window_pattern`).
    pub sliding_every: Option<usize>,
    /// RoPE base of the sliding-window layers when the file gives none (`None`: the global base).
    pub local_rope_theta: Option<f32>,
    /// HF `tie_word_embeddings` when the config omits it.
    pub hf_tied_default: bool,
    /// Renormalise the top-k routing weights when a GGUF file does not say (llama.cpp's per-arch default).
    pub gguf_norm_topk: bool,
    /// The same for an HF config without `norm_topk_prob` (transformers' default; Mixtral always does).
    pub hf_norm_topk: bool,
    /// Chat template for files that carry none (llama.cpp likewise falls back to a built-in one).
    pub builtin_template: Option<&'static str>,
}

const BASE: ArchRules = ArchRules {
    arch: Arch::Llama,
    name: "llama",
    hf_model_types: &["llama", "mistral"],
    hf_moe_model_type: None,
    moe: false,
    qkv_bias: false,
    shared_expert_gate: false,
    qk_norm: QkNorm::None,
    post_norms: false,
    activation: Activation::Silu,
    embedding_scale_sqrt_dim: false,
    hf_norm_plus_one: false,
    gguf_qk_permuted: false,
    sliding_every: None,
    local_rope_theta: None,
    hf_tied_default: false,
    gguf_norm_topk: false,
    hf_norm_topk: false,
    builtin_template: None,
};

/// The table. Each entry states only where it differs from [`BASE`].
pub const RULES: [ArchRules; 7] = [
    ArchRules {
        hf_moe_model_type: Some("mixtral"),
        gguf_qk_permuted: true,
        gguf_norm_topk: true,
        hf_norm_topk: true,
        ..BASE
    },
    ArchRules { arch: Arch::Qwen2, name: "qwen2", hf_model_types: &["qwen2"], qkv_bias: true, ..BASE },
    ArchRules { arch: Arch::Qwen3, name: "qwen3", hf_model_types: &["qwen3"], qk_norm: QkNorm::PerHead, ..BASE },
    ArchRules {
        arch: Arch::Gemma3,
        name: "gemma3",
        hf_model_types: &["gemma3_text", "gemma3"],
        qk_norm: QkNorm::PerHead,
        post_norms: true,
        activation: Activation::GeluTanh,
        embedding_scale_sqrt_dim: true,
        hf_norm_plus_one: true,
        sliding_every: Some(6),
        local_rope_theta: Some(10000.0),
        hf_tied_default: true,
        builtin_template: Some(GEMMA_TEMPLATE),
        ..BASE
    },
    ArchRules {
        arch: Arch::Qwen2Moe,
        name: "qwen2moe",
        hf_model_types: &["qwen2_moe"],
        moe: true,
        qkv_bias: true,
        shared_expert_gate: true,
        ..BASE
    },
    ArchRules {
        arch: Arch::Qwen3Moe,
        name: "qwen3moe",
        hf_model_types: &["qwen3_moe"],
        moe: true,
        qk_norm: QkNorm::PerHead,
        gguf_norm_topk: true,
        ..BASE
    },
    ArchRules {
        arch: Arch::Olmoe,
        name: "olmoe",
        hf_model_types: &["olmoe"],
        moe: true,
        qk_norm: QkNorm::Whole,
        ..BASE
    },
];

/// Gemma's turn format, for Gemma files that carry no template: a system message is folded into the first
/// user turn, the assistant's role is `model`.
const GEMMA_TEMPLATE: &str = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\n\n' %}{% set msgs = messages[1:] %}{% else %}{% set prefix = '' %}{% set msgs = messages %}{% endif %}{% for m in msgs %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') + (m['content'] | trim) + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}";

/// End-of-turn markers that chat templates emit: generation stops at them even when a file names no EOT id.
pub const END_OF_TURN_TOKENS: [&str; 4] = ["<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|endoftext|>"];

impl Arch {
    pub const ALL: [Arch; 7] = [
        Arch::Llama,
        Arch::Qwen2,
        Arch::Qwen3,
        Arch::Gemma3,
        Arch::Qwen2Moe,
        Arch::Qwen3Moe,
        Arch::Olmoe,
    ];

    pub fn rules(self) -> &'static ArchRules {
        let r = &RULES[self as usize];
        debug_assert_eq!(r.arch, self, "RULES is in Arch order");
        r
    }

    pub fn name(self) -> &'static str {
        self.rules().name
    }

    /// The family of a GGUF `general.architecture`.
    pub fn from_gguf(name: &str) -> Option<Arch> {
        RULES.iter().find(|r| r.name == name).map(|r| r.arch)
    }

    /// The family of a Hugging Face `model_type`.
    pub fn from_hf_model_type(model_type: &str) -> Option<Arch> {
        RULES
            .iter()
            .find(|r| r.hf_model_types.contains(&model_type) || r.hf_moe_model_type == Some(model_type))
            .map(|r| r.arch)
    }

    /// "llama, qwen2, ..." for error messages.
    pub fn list() -> String {
        RULES.iter().map(|r| r.name).collect::<Vec<_>>().join(", ")
    }

    /// Every HF `model_type` the importer accepts, for error messages.
    pub fn hf_list() -> String {
        RULES
            .iter()
            .flat_map(|r| r.hf_model_types.iter().chain(r.hf_moe_model_type.iter()))
            .copied()
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Arch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Arch::from_gguf(s).ok_or_else(|| format!("unknown architecture `{s}` (known: {})", Arch::list()))
    }
}

/// Per-layer attention kinds when every `every`-th layer (1-based) is global and the others attend to a
/// window of `window` positions.
pub fn sliding_every(n_layers: usize, window: usize, every: usize) -> Vec<AttentionKind> {
    let every = every.max(1);
    (0..n_layers)
        .map(|i| if (i + 1) % every == 0 { AttentionKind::Global } else { AttentionKind::Sliding { window } })
        .collect()
}

/// A Hugging Face tensor name → the native (GGUF) name, per the family's rules; `None` when it has none.
pub fn hf_tensor_name(hf: &str, arch: Arch) -> Option<String> {
    let n = hf.strip_prefix("model.language_model.").map(|s| format!("model.{s}")).unwrap_or_else(|| hf.to_string());
    match n.as_str() {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = n.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let post_norms = arch.rules().post_norms;
    let mapped = match tail {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.q_norm.weight" => "attn_q_norm.weight",
        "self_attn.k_norm.weight" => "attn_k_norm.weight",
        "post_attention_layernorm.weight" if post_norms => "post_attention_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "pre_feedforward_layernorm.weight" => "ffn_norm.weight",
        "post_feedforward_layernorm.weight" => "post_ffw_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        "mlp.gate.weight" | "block_sparse_moe.gate.weight" => "ffn_gate_inp.weight",
        "mlp.shared_expert.gate_proj.weight" => "ffn_gate_shexp.weight",
        "mlp.shared_expert.up_proj.weight" => "ffn_up_shexp.weight",
        "mlp.shared_expert.down_proj.weight" => "ffn_down_shexp.weight",
        "mlp.shared_expert_gate.weight" => "ffn_gate_inp_shexp.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{mapped}"))
}

/// An HF per-expert tensor (`mlp.experts.E.gate_proj`, Mixtral's `block_sparse_moe.experts.E.w1`) → the native
/// stacked tensor it belongs to and the expert index.
pub fn hf_expert_tensor_name(hf: &str) -> Option<(String, usize)> {
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let tail = tail.strip_prefix("mlp.experts.").or_else(|| tail.strip_prefix("block_sparse_moe.experts."))?;
    let (expert, proj) = tail.split_once('.')?;
    let stacked = match proj {
        "gate_proj.weight" | "w1.weight" => "ffn_gate_exps.weight",
        "up_proj.weight" | "w3.weight" => "ffn_up_exps.weight",
        "down_proj.weight" | "w2.weight" => "ffn_down_exps.weight",
        _ => return None,
    };
    Some((format!("blk.{layer}.{stacked}"), expert.parse().ok()?))
}

/// Native names of the RMSNorm weights (the ones a `1 + w` family stores shifted).
pub fn is_norm_weight(native: &str) -> bool {
    native.ends_with("norm.weight")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_in_enum_order_and_names_round_trip() {
        for a in Arch::ALL {
            assert_eq!(a.rules().arch, a);
            assert_eq!(Arch::from_gguf(a.name()), Some(a));
            assert_eq!(a.name().parse::<Arch>(), Ok(a));
            assert_eq!(serde_json::to_string(&a).unwrap(), format!("\"{}\"", a.name()));
            for mt in a.rules().hf_model_types {
                assert_eq!(Arch::from_hf_model_type(mt), Some(a));
            }
        }
        assert_eq!(Arch::from_hf_model_type("mixtral"), Some(Arch::Llama));
        assert!("gpt2".parse::<Arch>().unwrap_err().contains("olmoe"));
    }

    #[test]
    fn sliding_pattern_and_names() {
        let k = sliding_every(7, 4, 3);
        assert_eq!(k.iter().filter(|a| **a == AttentionKind::Global).count(), 2);
        assert_eq!(k[2], AttentionKind::Global);
        assert_eq!(k[0], AttentionKind::Sliding { window: 4 });
        let pan = "model.layers.3.post_attention_layernorm.weight";
        assert_eq!(hf_tensor_name(pan, Arch::Gemma3).unwrap(), "blk.3.post_attention_norm.weight");
        assert_eq!(hf_tensor_name(pan, Arch::Qwen2).unwrap(), "blk.3.ffn_norm.weight");
        assert_eq!(
            hf_expert_tensor_name("model.layers.1.block_sparse_moe.experts.5.w2.weight").unwrap(),
            ("blk.1.ffn_down_exps.weight".into(), 5)
        );
    }
}
