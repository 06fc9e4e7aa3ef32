//! Hugging Face directories: `config.json`, `*.safetensors` (f32/f16/bf16, sharded), `tokenizer.json`,
//! `tokenizer_config.json` (chat template, special tokens).

use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use sprig_format::arch::{self, Arch, ArchRules};
use sprig_format::config::{yarn_mscale, AttentionKind, ModelConfig, MoeConfig, RopeLayout, RopeScaling, RouterScoring};
use sprig_format::ContainerWriter;
use sprig_quant::ggml::GgmlType;
use sprig_tokenizer::{SpecialTokens, TokenizerSpec};

use crate::sink::Sink;
use crate::{invalid, io_err, ImportOptions, Imported, Progress, Result};

fn read_json(path: &Path) -> Result<Value> {
    let s = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&s).map_err(|e| invalid(format!("{}: {e}", path.display())))
}

fn get_usize(c: &Value, key: &str) -> Option<usize> {
    c.get(key).and_then(|v| v.as_u64()).map(|v| v as usize)
}

/// The native config from an HF `config.json`.
pub fn config_from_hf(c: &Value) -> Result<ModelConfig> {
    let mt = c.get("model_type").and_then(|v| v.as_str()).unwrap_or("llama");
    let arch = Arch::from_hf_model_type(mt).ok_or_else(|| {
        invalid(format!("config.json: model_type `{mt}` is not supported ({})", Arch::hf_list()))
    })?;
    let rules = arch.rules();
    // Gemma 3 multimodal configs nest the language model.
    let c = c.get("text_config").unwrap_or(c);
    let req = |k: &str| get_usize(c, k).ok_or_else(|| invalid(format!("config.json: missing integer `{k}`")));
    let dim = req("hidden_size")?;
    let n_layers = req("num_hidden_layers")?;
    let n_heads = req("num_attention_heads")?;
    let n_kv_heads = get_usize(c, "num_key_value_heads").unwrap_or(n_heads);
    let head_dim = get_usize(c, "head_dim").unwrap_or(dim / n_heads.max(1));
    // Per-layer kinds: the file's `layer_types`, else its `sliding_window_pattern`, else the family's rule.
    let mut attention = vec![AttentionKind::Global; n_layers];
    if let Some(types) = c.get("layer_types").and_then(|v| v.as_array()) {
        if types.len() != n_layers {
            return Err(invalid(format!("config.json: {} layer_types for {n_layers} layers", types.len())));
        }
        let w = req("sliding_window")?;
        for (i, t) in types.iter().enumerate() {
            if t.as_str() == Some("sliding_attention") {
                attention[i] = AttentionKind::Sliding { window: w };
            }
        }
    } else if let Some(every) = get_usize(c, "sliding_window_pattern").or(rules.sliding_every) {
        attention = arch::sliding_every(n_layers, req("sliding_window")?, every);
    }
    let max_pos = get_usize(c, "max_position_embeddings").unwrap_or(2048);
    let rope_scaling = rope_scaling_from_hf(c.get("rope_scaling"), max_pos)?;
    let f = |k: &str, d: f64| c.get(k).and_then(|v| v.as_f64()).unwrap_or(d);
    let sliding = attention.iter().any(|a| *a != AttentionKind::Global);
    let cfg = ModelConfig {
        arch,
        dim,
        n_layers,
        n_heads,
        n_kv_heads,
        head_dim,
        hidden_dim: req("intermediate_size")?,
        vocab_size: req("vocab_size")?,
        max_seq_len: get_usize(c, "max_position_embeddings").unwrap_or(2048),
        norm_eps: f("rms_norm_eps", 1e-6) as f32,
        rope_theta: f("rope_theta", 10000.0) as f32,
        rope_theta_local: c
            .get("rope_local_base_freq")
            .and_then(|v| v.as_f64())
            .map(|v| v as f32)
            .or(rules.local_rope_theta)
            .filter(|_| sliding),
        rope_scaling,
        rope_layout: RopeLayout::Half,
        activation: rules.activation,
        tied_embeddings: c.get("tie_word_embeddings").and_then(|v| v.as_bool()).unwrap_or(rules.hf_tied_default),
        embedding_scale: rules.embedding_scale_sqrt_dim.then(|| (dim as f32).sqrt()),
        // `1 + w` norms are folded into the weights by `import`.
        legacy_norm_add_one: false,
        attention,
        moe: moe_from_hf(c, rules, n_layers)?,
        attn_scale: c.get("query_pre_attn_scalar").and_then(|v| v.as_f64()).map(|s| (1.0 / s.sqrt()) as f32),
        final_logit_softcap: c.get("final_logit_softcapping").and_then(|v| v.as_f64()).map(|v| v as f32),
        mtp: None,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// MoE keys of Mixtral (`num_local_experts`), Qwen2/3-MoE and OLMoE (`num_experts`), with DeepSeek's
/// `scoring_func` / `routed_scaling_factor` / `first_k_dense_replace` where present.
fn moe_from_hf(c: &Value, rules: &ArchRules, n_layers: usize) -> Result<Option<MoeConfig>> {
    let Some(n_experts) = get_usize(c, "num_local_experts").or(get_usize(c, "num_experts")).filter(|&n| n > 0) else {
        return Ok(None);
    };
    let req = |k: &str| get_usize(c, k).ok_or_else(|| invalid(format!("config.json: missing integer `{k}`")));
    let top_k = req("num_experts_per_tok")?;
    let expert_hidden_dim = match get_usize(c, "moe_intermediate_size") {
        Some(h) => h,
        None => req("intermediate_size")?,
    };
    let scoring = match c.get("scoring_func").and_then(|v| v.as_str()) {
        None | Some("softmax") => RouterScoring::Softmax,
        Some("sigmoid") => RouterScoring::Sigmoid,
        Some(other) => return Err(invalid(format!("config.json: scoring_func `{other}` is not supported"))),
    };
    // Mixtral's softmax over the top-k logits is a renormalised top-k softmax (its rule says so).
    let norm_topk = c.get("norm_topk_prob").and_then(|v| v.as_bool()).unwrap_or(rules.hf_norm_topk);
    let step = get_usize(c, "decoder_sparse_step").unwrap_or(1).max(1);
    let dense_only: Vec<usize> = c
        .get("mlp_only_layers")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|v| v.as_u64()).map(|v| v as usize).collect())
        .unwrap_or_default();
    let first_dense = get_usize(c, "first_k_dense_replace").unwrap_or(0);
    Ok(Some(MoeConfig {
        n_experts,
        top_k,
        expert_hidden_dim,
        scoring,
        norm_topk,
        shared_expert_hidden_dim: get_usize(c, "shared_expert_intermediate_size").filter(|&h| h > 0),
        moe_layers: (0..n_layers)
            .map(|i| i >= first_dense && !dense_only.contains(&i) && (i + 1) % step == 0)
            .collect(),
        routed_scale: c.get("routed_scaling_factor").and_then(|v| v.as_f64()).map(|v| v as f32),
    }))
}

/// A tensor's ggml type and shape, or why it cannot be imported.
fn checked(name: &str, t: &safetensors::tensor::TensorView<'_>) -> Result<(GgmlType, Vec<usize>)> {
    let ty = match t.dtype() {
        Dtype::F32 => GgmlType::F32,
        Dtype::F16 => GgmlType::F16,
        Dtype::BF16 => GgmlType::BF16,
        d => return Err(invalid(format!("tensor `{name}` has dtype {d:?} (f32, f16, bf16 are supported)"))),
    };
    let shape = t.shape().to_vec();
    if shape.is_empty() || shape.len() > 2 {
        return Err(invalid(format!("tensor `{name}` has shape {shape:?}")));
    }
    Ok((ty, shape))
}

fn shards(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    v.sort();
    if v.is_empty() {
        return Err(invalid(format!("{}: no *.safetensors weights", dir.display())));
    }
    Ok(v)
}

fn tokenizer_spec(dir: &Path) -> Result<(TokenizerSpec, Option<String>)> {
    let tj_path = dir.join("tokenizer.json");
    let tj = std::fs::read_to_string(&tj_path).map_err(io_err(&tj_path))?;
    let tok: Value = serde_json::from_str(&tj).map_err(|e| invalid(format!("{}: {e}", tj_path.display())))?;
    let cfg_path = dir.join("tokenizer_config.json");
    let tc = if cfg_path.exists() { read_json(&cfg_path)? } else { Value::Null };
    let id_of = |content: &str| -> Option<u32> {
        let added = tok.get("added_tokens").and_then(|a| a.as_array());
        added
            .and_then(|a| a.iter().find(|t| t.get("content").and_then(|c| c.as_str()) == Some(content)))
            .and_then(|t| t.get("id"))
            .and_then(|i| i.as_u64())
            .map(|i| i as u32)
            .or_else(|| {
                tok.pointer("/model/vocab").and_then(|v| v.get(content)).and_then(|i| i.as_u64()).map(|i| i as u32)
            })
    };
    let tok_str = |k: &str| -> Option<String> {
        match tc.get(k)? {
            Value::String(s) => Some(s.clone()),
            Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
            _ => None,
        }
    };
    // BOS as transformers adds it: `add_bos_token` when the config says, else whatever the tokenizer's
    // post-processor template puts in front of a single sequence (Gemma, Llama 3: `<bos>` / `<|begin_of_text|>`;
    // Qwen2: nothing).
    let post_bos = post_processor_bos(&tok);
    let bos = tok_str("bos_token").and_then(|s| id_of(&s)).or_else(|| post_bos.as_deref().and_then(id_of));
    let eos = tok_str("eos_token").and_then(|s| id_of(&s));
    let add_bos = tc.get("add_bos_token").and_then(|v| v.as_bool()).unwrap_or(post_bos.is_some()) && bos.is_some();
    let mut stop: Vec<u32> = eos.into_iter().collect();
    for t in arch::END_OF_TURN_TOKENS {
        if let Some(i) = id_of(t) {
            if !stop.contains(&i) {
                stop.push(i);
            }
        }
    }
    // transformers reads `chat_template.jinja` first, then `tokenizer_config.json` (a string, or a list of
    // named templates of which `default` is the chat one).
    let jinja = dir.join("chat_template.jinja");
    let template = if jinja.exists() {
        Some(std::fs::read_to_string(&jinja).map_err(io_err(&jinja))?)
    } else {
        match tc.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(String::from),
            _ => None,
        }
    };
    Ok((
        TokenizerSpec::HuggingFace { tokenizer_json: tj, special: SpecialTokens { bos, eos, add_bos, stop } },
        template,
    ))
}

/// The special token a tokenizer.json post-processor prepends to a single sequence, if any (a
/// `TemplateProcessing`, alone or inside a `Sequence`).
fn post_processor_bos(tok: &Value) -> Option<String> {
    let pp = tok.get("post_processor")?;
    let templates: Vec<&Value> = match pp.get("type").and_then(|t| t.as_str()) {
        Some("TemplateProcessing") => vec![pp],
        Some("Sequence") => pp.get("processors")?.as_array()?.iter().collect(),
        _ => return None,
    };
    templates
        .into_iter()
        .filter(|p| p.get("type").and_then(|t| t.as_str()) == Some("TemplateProcessing"))
        .find_map(|p| p.get("single")?.as_array()?.first()?.pointer("/SpecialToken/id")?.as_str().map(String::from))
}

pub fn import(dir: &Path, opts: &ImportOptions, progress: Progress) -> Result<Imported> {
    let config = config_from_hf(&read_json(&dir.join("config.json"))?)?;
    let (spec, template) = tokenizer_spec(dir)?;
    let rules = config.arch.rules();
    let mut sink = Sink {
        writer: ContainerWriter::new(&config, serde_json::to_string(&spec).unwrap(), template),
        quant: opts.quant,
        losses: vec![],
        importance: opts.importance,
    };
    let files = shards(dir)?;
    let mut maps = Vec::with_capacity(files.len());
    for path in &files {
        let f = std::fs::File::open(path).map_err(io_err(path))?;
        // SAFETY: read-only mapping of a checkpoint that is not modified while it is imported.
        maps.push(unsafe { Mmap::map(&f) }.map_err(io_err(path))?);
    }
    let mut tensors = Vec::with_capacity(files.len());
    for (path, map) in files.iter().zip(&maps) {
        tensors.push(SafeTensors::deserialize(map).map_err(|e| invalid(format!("{}: {e}", path.display())))?);
    }
    let n_experts = config.moe.as_ref().map_or(0, |m| m.n_experts);
    // Per stacked expert tensor: each expert's (shard, HF name); experts may be spread over shards.
    let mut stacks: std::collections::BTreeMap<String, Vec<Option<(usize, String)>>> = Default::default();
    let total: usize = tensors.iter().map(|st| st.len()).sum();
    let mut done = 0;
    for (si, st) in tensors.iter().enumerate() {
        let path = &files[si];
        let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
        names.sort();
        for name in names {
            if let Some((stacked, e)) = arch::hf_expert_tensor_name(&name) {
                if e >= n_experts {
                    return Err(invalid(format!(
                        "tensor `{name}`: expert {e} but config.json has {n_experts} experts"
                    )));
                }
                let slots = stacks.entry(stacked).or_insert_with(|| vec![None; n_experts]);
                if slots[e].replace((si, name.clone())).is_some() {
                    return Err(invalid(format!("tensor `{name}` appears twice")));
                }
                continue;
            }
            let t = st.tensor(&name).map_err(|e| invalid(format!("{}: {name}: {e}", path.display())))?;
            let Some(native) = arch::hf_tensor_name(&name, config.arch) else {
                if name.contains("rotary_emb") {
                    continue;
                }
                return Err(invalid(format!("{}: tensor `{name}` has no native mapping", path.display())));
            };
            if sink.writer.contains(&native) {
                return Err(invalid(format!("tensor `{name}` appears twice")));
            }
            let (ty, shape) = checked(&name, &t)?;
            if rules.hf_norm_plus_one && arch::is_norm_weight(&native) {
                // Stored as w, applied as 1 + w: fold the constant into the weight.
                let mut f = vec![0.0; shape.iter().product()];
                sprig_quant::ggml::dequantize(ty, t.data(), &mut f);
                f.iter_mut().for_each(|w| *w += 1.0);
                sink.add_f32(&native, &shape, &f);
            } else {
                sink.add_ggml(&native, ty, &shape, t.data());
            }
            done += 1;
            progress(done, total);
        }
    }
    // Experts of one projection are stacked into one [E * rows, cols] matrix (the GGUF layout).
    for (stacked, slots) in stacks {
        let mut bytes = Vec::new();
        let mut first: Option<(GgmlType, Vec<usize>)> = None;
        for (e, slot) in slots.iter().enumerate() {
            let (si, name) = slot.as_ref().ok_or_else(|| invalid(format!("`{stacked}`: expert {e} is missing")))?;
            let t = tensors[*si].tensor(name).map_err(|err| invalid(format!("{name}: {err}")))?;
            let (ty, shape) = checked(name, &t)?;
            if shape.len() != 2 || first.as_ref().is_some_and(|f| *f != (ty, shape.clone())) {
                return Err(invalid(format!("tensor `{name}`: {ty:?} {shape:?} differs from expert 0 or is not 2-D")));
            }
            first.get_or_insert((ty, shape));
            bytes.extend_from_slice(t.data());
            done += 1;
            progress(done, total);
        }
        let (ty, shape) = first.expect("at least one expert");
        sink.add_ggml(&stacked, ty, &[shape[0] * n_experts, shape[1]], &bytes);
    }
    Ok(Imported { writer: sink.writer, losses: sink.losses })
}

/// `rope_scaling` of a transformers config: `linear`, `llama3` and `yarn` with transformers' defaults; any
/// other type is an error (running it as plain RoPE would put every long-context position in the wrong place).
pub fn rope_scaling_from_hf(v: Option<&serde_json::Value>, max_pos: usize) -> Result<Option<RopeScaling>> {
    let Some(v) = v.filter(|v| !v.is_null()) else { return Ok(None) };
    let ty = v.get("rope_type").or(v.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
    let num = |k: &str| v.get(k).and_then(|x| x.as_f64());
    let need = |k: &str| num(k).ok_or_else(|| invalid(format!("config.json: rope_scaling ({ty}) needs `{k}`")));
    let original = v.get("original_max_position_embeddings").and_then(|x| x.as_u64()).map(|x| x as usize);
    Ok(match ty {
        "default" => None,
        "linear" => Some(RopeScaling::Linear { factor: need("factor")? as f32 }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: need("factor")? as f32,
            low_freq_factor: need("low_freq_factor")? as f32,
            high_freq_factor: need("high_freq_factor")? as f32,
            original_context: original
                .ok_or_else(|| invalid("config.json: llama3 rope_scaling needs original_max_position_embeddings"))?,
        }),
        "yarn" => {
            let factor = need("factor")? as f32;
            let attention_factor = match (num("attention_factor"), num("mscale"), num("mscale_all_dim")) {
                (Some(a), _, _) => a as f32,
                (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                    yarn_mscale(factor, m as f32) / yarn_mscale(factor, all as f32)
                }
                _ => yarn_mscale(factor, 1.0),
            };
            Some(RopeScaling::Yarn {
                factor,
                original_context: original.unwrap_or(max_pos),
                beta_fast: num("beta_fast").unwrap_or(32.0) as f32,
                beta_slow: num("beta_slow").unwrap_or(1.0) as f32,
                attention_factor,
                truncate: v.get("truncate").and_then(|x| x.as_bool()).unwrap_or(true),
            })
        }
        other => {
            return Err(invalid(format!(
                "config.json: RoPE scaling type `{other}` is not supported (default, linear, llama3, yarn)"
            )))
        }
    })
}
