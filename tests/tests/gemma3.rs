//! Gemma 3 270M Q4_K_M (registry `gemma3-270m`): a distilled model with 5:1 sliding-window/global attention.

use sprig_engine::eval::perplexity;
use sprig_import::QuantChoice;
use sprig_tests::*;

/// llama.cpp 0c1e570 (built as for the SmolLM2 figure) on the same GGUF and text:
///   llama-perplexity -m gemma-3-270m-q4_k_m.gguf -f tests/data/apache-2.0.txt --ctx-size 256 -t 2
///   => Final estimate: PPL = 8.5524 +/- 0.68593
const LLAMA_CPP_PPL: f64 = 8.5524;

#[test]
fn gemma3_imports_and_perplexity_within_one_percent_of_llama_cpp() {
    let f = open(&registry_model("gemma3-270m"), None, QuantChoice::Keep);
    let c = &f.config;
    assert_eq!((c.arch.as_str(), c.n_layers, c.vocab_size, c.head_dim), ("gemma3", 18, 262144, 256));
    let globals: Vec<usize> = (0..c.n_layers).filter(|&i| c.attention[i] == sprig_format::AttentionKind::Global).collect();
    assert_eq!(globals, [5, 11, 17]);
    assert!(f.chat_template.is_some(), "Gemma falls back to its built-in turn template");
    let e = cpu_engine(f, 2);
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/data/apache-2.0.txt")).unwrap();
    let r = perplexity::<_, sprig_backend::cpu::CpuBackend>(&e, None, &text, 256, None, |_, _, _| {}).unwrap();
    let rel = (r.perplexity - LLAMA_CPP_PPL).abs() / LLAMA_CPP_PPL;
    assert!(rel < 0.01, "sprig PPL {} vs llama.cpp {LLAMA_CPP_PPL}", r.perplexity);
}
