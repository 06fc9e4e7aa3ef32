//! Generated checkpoints (Llama- and Qwen2-style, as Hugging Face directories and GGUF files): every import
//! path gives the same model, and the CPU backend agrees with the reference backend on them.

use std::path::PathBuf;

use sprig_engine::ChatMessage;
use sprig_import::synth::{Arch, write_gguf, write_hf_dir, HfDtype, SynthSpec};
use sprig_import::QuantChoice;
use sprig_models::Logits;
use sprig_tests::*;

fn tmp(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("sprig-synth-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    p
}

/// Logits of a prefill of `tokens` then two decode steps, concatenated.
fn run<B: sprig_backend::Backend>(e: &sprig_engine::Engine<B>, tokens: &[u32]) -> Vec<f32> {
    prefill_then_decode(e, tokens, &[5, 77]).0
}

const TOKENS: [u32; 9] = [3, 200, 17, 99, 256, 261, 40, 40, 7];

#[test]
fn hf_and_gguf_imports_agree_and_cpu_matches_reference() {
    // Every dense family of the rule book (the MoE ones: tests/tests/moe.rs).
    for arch in Arch::ALL.into_iter().filter(|a| !a.rules().moe) {
        let spec = SynthSpec::tiny(arch);
        let dir = tmp(&format!("{arch}-hf"));
        write_hf_dir(&spec, &dir, HfDtype::F32, 1).unwrap();
        let gguf = tmp(&format!("{arch}.gguf"));
        write_gguf(&spec, &gguf).unwrap();

        let hf_file = open(&dir, None, QuantChoice::Keep);
        assert_eq!(hf_file.config.arch, arch);
        assert_eq!(hf_file.contains("blk.0.attn_q.bias"), arch.rules().qkv_bias);
        let gguf_file = open(&gguf, None, QuantChoice::Keep);
        // Both importers read the same layer pattern (Gemma 3: from its rule, five sliding layers per global).
        assert_eq!(gguf_file.config.attention, hf_file.config.attention, "{arch}");
        assert_eq!(
            hf_file.config.attention.iter().any(|a| *a != sprig_format::AttentionKind::Global),
            arch.rules().sliding_every.is_some(),
            "{arch}"
        );
        let hf = cpu_engine(hf_file.clone(), 2);
        let from_gguf = cpu_engine(gguf_file, 2);
        let reference = reference_engine(hf_file);

        let (a, b, r) = (run(&hf, &TOKENS), run(&from_gguf, &TOKENS), run(&reference, &TOKENS));
        // HF (rotate-half, unpermuted) and GGUF (llama: permuted for adjacent pairs) are the same model.
        assert!(rel_err(&b, &a) < 1e-5, "{arch}: GGUF vs HF import: {}", rel_err(&b, &a));
        // f32 weights: the CPU backend runs f32 math, so it tracks the reference closely.
        assert!(rel_err(&a, &r) < 1e-4, "{arch}: CPU vs reference: {}", rel_err(&a, &r));

        // Tokenizer and chat template carried over from tokenizer.json / tokenizer_config.json.
        let text = hf.render_chat(&[ChatMessage::new("user", "the cat")]).unwrap();
        assert_eq!(text, "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n");
        let ids = hf.chat_tokens(&[ChatMessage::new("user", "the cat")]).unwrap();
        assert_eq!(ids, hf.tokenizer.encode_special(&text, false).unwrap());
        assert_eq!(hf.tokenizer.decode(&ids).unwrap(), "user\nthe cat\nassistant\n");
        assert_eq!(from_gguf.chat_tokens(&[ChatMessage::new("user", "the cat")]).unwrap(), ids);
        // Plain text never yields the added tokens, in the HF tokenizer or the one built from GGUF.
        for e in [&hf, &from_gguf] {
            let plain = e.tokenizer.encode(&text, false).unwrap();
            assert!(plain.len() > ids.len() && e.tokenizer.decode(&plain).unwrap() == text, "{arch}");
        }
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_file(&gguf);
    }
}

#[test]
fn sharded_bf16_and_quantized_imports_stay_close() {
    let spec = SynthSpec { tied: true, ..SynthSpec::tiny(Arch::Qwen2) };
    let (f32_dir, bf16_dir) = (tmp("q-f32"), tmp("q-bf16"));
    write_hf_dir(&spec, &f32_dir, HfDtype::F32, 1).unwrap();
    write_hf_dir(&spec, &bf16_dir, HfDtype::BF16, 3).unwrap();
    let base = run(&cpu_engine(open(&f32_dir, None, QuantChoice::Keep), 1), &TOKENS);
    let bf16 = open(&bf16_dir, None, QuantChoice::Keep);
    assert!(bf16.config.tied_embeddings && !bf16.contains("output.weight"));
    let e = rel_err(&run(&cpu_engine(bf16, 1), &TOKENS), &base);
    assert!(e < 0.02, "bf16 shards: {e}");
    for (q, tol) in
        [(QuantChoice::F16, 0.005), (QuantChoice::Q8, 0.03), (QuantChoice::Q4, 0.25), (QuantChoice::Q4A, 0.25)]
    {
        let e = rel_err(&run(&cpu_engine(open(&f32_dir, None, q), 2), &TOKENS), &base);
        assert!(e < tol, "{q:?}: {e}");
    }
    let _ = std::fs::remove_dir_all(&f32_dir);
    let _ = std::fs::remove_dir_all(&bf16_dir);
}

#[test]
fn sliding_window_generation_past_the_window_matches_reference() {
    // Window 8 on two of every three layers; 40 decode steps run the rings around several times.
    let spec = SynthSpec { n_layers: 3, sliding: Some((8, 3)), ..SynthSpec::tiny(Arch::Llama) };
    let dir = tmp("sliding");
    write_hf_dir(&spec, &dir, HfDtype::F32, 1).unwrap();
    let f = open(&dir, None, QuantChoice::Keep);
    assert_eq!(
        f.config.attention,
        [
            sprig_format::AttentionKind::Sliding { window: 8 },
            sprig_format::AttentionKind::Sliding { window: 8 },
            sprig_format::AttentionKind::Global
        ]
    );
    let (cpu, reference) = (cpu_engine(f.clone(), 2), reference_engine(f));
    let (mut sc, mut sr) = (cpu.model.new_state(64).unwrap(), reference.model.new_state(64).unwrap());
    let (mut lc, mut lr) = (Vec::new(), Vec::new());
    // A 12-token prefill (longer than the window) then greedy decode.
    let mut next: Vec<u32> = (0..12).map(|i| (i * 19 % 250) as u32).collect();
    for step in 0..40 {
        cpu.model.forward(&mut sc, &next, Logits::Last).unwrap();
        reference.model.forward(&mut sr, &next, Logits::Last).unwrap();
        cpu.model.read_logits(&sc, &mut lc).unwrap();
        reference.model.read_logits(&sr, &mut lr).unwrap();
        assert!(rel_err(&lc, &lr) < 1e-4, "step {step} (position {}): {}", sc.pos, rel_err(&lc, &lr));
        next = vec![argmax(&lr) as u32];
    }
    // The sliding layers' caches hold 8 entries; only the global layer grows with the context.
    let kv = cpu.model.kv_layout(8192).bytes_per_layer(8192);
    assert_eq!(kv[0], 2 * 4 * 32 * 8);
    assert_eq!(kv[2], 2 * 4 * 32 * 8192);
    let _ = std::fs::remove_dir_all(&dir);
}

/// HF directories as transformers reads them: `chat_template.jinja` wins over the template in
/// tokenizer_config.json, and BOS follows the tokenizer's post-processor when the config does not say.
#[test]
fn hf_import_reads_chat_template_jinja_and_post_processor_bos() {
    let dir = tmp("hf-template");
    write_hf_dir(&SynthSpec::tiny(Arch::Qwen2), &dir, HfDtype::F32, 1).unwrap();
    let jinja = "{% for m in messages %}<|im_start|>[{{ m.role }}] {{ m.content }}<|im_end|>{% endfor %}";
    std::fs::write(dir.join("chat_template.jinja"), jinja).unwrap();
    let tj_path = dir.join("tokenizer.json");
    let mut tj: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&tj_path).unwrap()).unwrap();
    let start = tj["added_tokens"].as_array().unwrap().iter().find(|t| t["content"] == "<|im_start|>").unwrap()["id"]
        .as_u64()
        .unwrap();
    tj["post_processor"] = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [start], "tokens": ["<|im_start|>"]}}
    });
    std::fs::write(&tj_path, tj.to_string()).unwrap();
    // The config names no BOS and does not set add_bos_token: the post-processor decides.
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"eos_token": "<|im_end|>", "chat_template": "unused"}"#)
        .unwrap();
    let f = open(&dir, None, QuantChoice::Keep);
    assert_eq!(f.chat_template.as_deref(), Some(jinja));
    let tok = sprig_tokenizer::Tokenizer::from_json(&f.tokenizer_json).unwrap();
    assert_eq!((tok.special().add_bos, tok.bos()), (true, Some(start as u32)));
    // An explicit add_bos_token: false still wins, as in transformers.
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"eos_token": "<|im_end|>", "add_bos_token": false}"#)
        .unwrap();
    let f = open(&dir, None, QuantChoice::Keep);
    assert!(!sprig_tokenizer::Tokenizer::from_json(&f.tokenizer_json).unwrap().special().add_bos);
    let _ = std::fs::remove_dir_all(&dir);
}
