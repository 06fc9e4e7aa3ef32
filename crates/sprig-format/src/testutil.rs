//! A tiny valid config/container for tests (also used by other crates' tests).

use crate::config::{Activation, AttentionKind, ModelConfig, RopeLayout};

pub fn tiny_config() -> ModelConfig {
    ModelConfig {
        arch: crate::Arch::Llama,
        dim: 64,
        n_layers: 1,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 16,
        hidden_dim: 96,
        vocab_size: 32,
        max_seq_len: 128,
        norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_theta_local: None,
        rope_scaling: None,
        rope_layout: RopeLayout::Adjacent,
        activation: Activation::Silu,
        tied_embeddings: true,
        embedding_scale: None,
        legacy_norm_add_one: false,
        attention: vec![AttentionKind::Global],
        moe: None,
        attn_scale: None,
        final_logit_softcap: None,
        mtp: None,
    }
}
