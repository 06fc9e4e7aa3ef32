//! Tokenizers against the ids independent implementations produce.

use sprig_import::{llama2c, sentencepiece};
use sprig_tests::*;
use sprig_tokenizer::{StreamDecoder, Tokenizer};

fn llama2_from(file: &str) -> Tokenizer {
    let bytes = std::fs::read(fixtures().join("llama2-tokenizer").join(file)).unwrap();
    let spec = if file.ends_with(".model") {
        sentencepiece::parse(&bytes).unwrap()
    } else {
        llama2c::read_tokenizer(&bytes, 32000).unwrap()
    };
    Tokenizer::from_spec(&spec).unwrap()
}

#[test]
fn llama2_tokenizer_bin_and_model_encode_once_upon_a_time() {
    // Reference ids from tests/data/README.md (SentencePiece / llama2.c).
    for file in ["tokenizer.bin", "tokenizer.model"] {
        let t = llama2_from(file);
        assert_eq!(t.encode_prompt("Once upon a time").unwrap(), [1, 9038, 2501, 263, 931], "{file}");
        // Round trip, including characters that only byte fallback can spell.
        let text = "Hello wörld, 1234 — 🙂 ok";
        let ids = t.encode(text, false).unwrap();
        assert_eq!(t.decode(&ids).unwrap(), text, "{file}");
    }
}

#[test]
fn byte_fallback_character_split_across_tokens_streams_whole() {
    let t = llama2_from("tokenizer.model");
    let ids = t.encode("a🙂b", false).unwrap();
    // 🙂 is not a Llama 2 piece: it becomes its four UTF-8 bytes as <0xXX> tokens.
    assert!(ids.len() >= 6, "{ids:?}");
    let mut d = StreamDecoder::new(&t);
    let pieces: Vec<String> = ids.iter().map(|&i| d.push(i).unwrap()).collect();
    assert_eq!(pieces.concat(), "a🙂b");
    assert!(pieces.iter().all(|p| p.chars().all(|c| c != '\u{FFFD}')), "{pieces:?}");
    // The three leading bytes of the emoji produce no text; the fourth completes it.
    assert_eq!(pieces.iter().filter(|p| p.is_empty()).count(), 3, "{pieces:?}");
}

#[test]
fn smollm2_chatml_prompt_matches_llama_cpp() {
    // Produced by llama.cpp 0c1e570 (llama-cpp-python 0.3.36's vendor/llama.cpp), on the registry's
    // SmolLM2-135M-Instruct.Q4_1.gguf:
    //   llama-tokenize -m SmolLM2-135M-Instruct.Q4_1.gguf -p "$P" --ids --log-disable
    // with P the prompt below (bash $'...' quoting).
    let prompt = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France? Answer in one word. 1234 café 🙂<|im_end|>\n<|im_start|>assistant\n";
    let llama_cpp = [
        1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2,
        198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 19842, 281, 582, 2229, 30, 216, 33, 34, 35, 36, 37366,
        47526, 2, 198, 1, 520, 9531, 198,
    ];
    let f = open(&registry_model("smollm2-135m-instruct"), None, sprig_import::QuantChoice::Keep);
    let t = Tokenizer::from_json(&f.tokenizer_json).unwrap();
    // llama-tokenize parses special tokens in its prompt: the opt-in here.
    let ids = t.encode_special(prompt, t.special().add_bos).unwrap();
    assert_eq!(ids, llama_cpp);
    // Streaming the ids gives the text back, minus the control tokens.
    let text = t.decode(&ids).unwrap();
    assert!(text.contains("What is the capital of France? Answer in one word. 1234 café 🙂"), "{text}");
    assert!(!text.contains("<|im_start|>"));
}

/// The fast `tokenizer.json` reader (one typed pass, used at every start) against the `tokenizers` crate's own:
/// the same bytes for every token, the same added tokens and flags, the same ids for varied text. On the
/// registry's byte-level vocabularies (SmolLM2's, Qwen2.5's 151k) and on generated ones (an HF directory's
/// file and one converted from GGUF).
#[test]
fn fast_tokenizer_json_reader_matches_the_tokenizers_crate() {
    use sprig_tokenizer::hf::HfTokenizer;
    use sprig_tokenizer::TokenizerSpec;
    let hf_json = |file: &std::path::Path| -> String {
        let f = open(file, None, sprig_import::QuantChoice::Keep);
        match serde_json::from_str::<TokenizerSpec>(&f.tokenizer_json).unwrap() {
            TokenizerSpec::HuggingFace { tokenizer_json, .. } => tokenizer_json,
            _ => panic!("{} has no HF tokenizer", file.display()),
        }
    };
    let dir = std::env::temp_dir().join(format!("sprig-fast-tok-{}", std::process::id()));
    let synth = sprig_import::synth::SynthSpec::tiny(sprig_import::synth::Arch::Qwen2);
    sprig_import::synth::write_hf_dir(&synth, &dir, sprig_import::synth::HfDtype::F32, 1).unwrap();
    let gguf = dir.join("m.gguf");
    sprig_import::synth::write_gguf(&synth, &gguf).unwrap();
    let cases = [
        ("smollm2", hf_json(&registry_model("smollm2-135m-instruct"))),
        ("qwen2.5-coder-0.5b", hf_json(&registry_model("qwen2.5-coder-0.5b-instruct"))),
        ("generated HF directory", std::fs::read_to_string(dir.join("tokenizer.json")).unwrap()),
        ("generated GGUF", hf_json(&gguf)),
    ];
    let texts = [
        "Hello, world! 1234567 — naïve café 🙂 ok",
        "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n\t  trailing   ",
        "<|im_start|>user\nthe cat<|im_end|> <|endoftext|>",
        "日本語のテキストと中文 and ΑΒΓ, \u{0}\u{7f} control",
        "",
    ];
    for (what, json) in cases {
        let mut fast = HfTokenizer::from_json_fast(&json).unwrap_or_else(|| panic!("{what}: the fast reader declined"));
        let mut slow = HfTokenizer::from_json_generic(&json).unwrap();
        assert_eq!(fast.is_byte_level(), slow.is_byte_level(), "{what}");
        assert_eq!(fast.strips_leading_space(), slow.strips_leading_space(), "{what}");
        let sorted = |t: &HfTokenizer| {
            let mut a = t.added_tokens().to_vec();
            a.sort();
            a
        };
        assert_eq!(sorted(&fast), sorted(&slow), "{what}: added tokens");
        let (fb, sb) = (fast.all_token_bytes(), slow.all_token_bytes());
        assert_eq!(fb.len(), sb.len(), "{what}: vocabulary size");
        if let Some(i) = (0..fb.len()).find(|&i| fb[i] != sb[i]) {
            panic!("{what}: token {i} decodes to {:?} vs {:?}", fb[i], sb[i]);
        }
        for text in texts {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            fast.encode(text, &mut a).unwrap();
            slow.encode(text, &mut b).unwrap();
            assert_eq!(a, b, "{what}: {text:?}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
