//! The on-policy distillation gap (`sprig_engine::distill`): the student answers, the teacher scores every
//! generated token. Checked against itself (KL 0) and, for a teacher that differs (the int4 copy of a synthetic
//! model), against numpy computing each token's KL from both models' logits independently.

use std::sync::Arc;

use sprig_engine::distill::score_reply;
use sprig_engine::SamplingParams;
use sprig_import::synth::{write_gguf, Arch, SynthSpec};
use sprig_import::QuantChoice;
use sprig_models::Logits;
use sprig_tests::*;

/// Logits of every position of `tokens` (row-major, vocabulary wide).
fn logits<B: sprig_backend::Backend>(e: &sprig_engine::Engine<B>, tokens: &[u32]) -> Vec<f32> {
    let mut st = e.model.new_state(tokens.len()).unwrap();
    e.model.forward(&mut st, tokens, Logits::All).unwrap();
    let mut out = Vec::new();
    e.model.read_logits(&st, &mut out).unwrap();
    out
}

#[test]
fn on_policy_kl_is_zero_against_itself_and_matches_numpy() {
    let path = std::env::temp_dir().join(format!("sprig-distill-{}.gguf", std::process::id()));
    write_gguf(&SynthSpec { seed: 3, ..SynthSpec::tiny(Arch::Llama) }, &path).unwrap();
    let student = Arc::new(cpu_engine(open(&path, None, QuantChoice::Keep), 2));
    let teacher = Arc::new(cpu_engine(open(&path, None, QuantChoice::Q4), 1));
    let _ = std::fs::remove_file(&path);
    // Sampled, stop tokens banned so that the random model answers at length.
    let stops = (0..student.model.config.vocab_size as u32).filter(|&t| student.tokenizer.is_stop(t));
    let params = SamplingParams {
        temperature: 0.9,
        seed: 11,
        logit_bias: stops.map(|t| (t, f32::NEG_INFINITY)).collect(),
        ..Default::default()
    };

    let same = score_reply(&student, &*student, "abc", &params, 24, 0).unwrap();
    assert_eq!(same.tokens.len(), 24);
    for t in &same.tokens {
        assert!(t.kl.abs() < 1e-9 && t.greedy_agree && t.teacher_nll == t.student_nll, "{t:?}");
    }

    let r = score_reply(&student, &*teacher, "abc", &params, 24, 0).unwrap();
    assert_eq!(r.tokens.len(), 24);
    assert!(r.mean_kl() > 0.0);
    // The same sequence through both models, the generated tokens' rows handed to numpy.
    let seq: Vec<u32> = r.prompt.iter().copied().chain(r.tokens.iter().map(|t| t.token)).collect();
    let run = &seq[..seq.len() - 1];
    let v = student.model.config.vocab_size;
    let rows = |l: Vec<f32>| l[(r.prompt.len() - 1) * v..].to_vec();
    let (ls, lt) = (rows(logits(&student, run)), rows(logits(&teacher, run)));
    let dir = std::env::temp_dir().join(format!("sprig-distill-np-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bytes = |x: &[f32]| x.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
    std::fs::write(dir.join("s.f32"), bytes(&ls)).unwrap();
    std::fs::write(dir.join("t.f32"), bytes(&lt)).unwrap();
    let tokens: Vec<String> = r.tokens.iter().map(|t| t.token.to_string()).collect();
    let script = r#"
import sys, numpy as np
d, v, toks = sys.argv[1], int(sys.argv[2]), [int(t) for t in sys.argv[3].split(",")]
s = np.fromfile(d + "/s.f32", dtype="<f4").astype(np.float64).reshape(-1, v)
t = np.fromfile(d + "/t.f32", dtype="<f4").astype(np.float64).reshape(-1, v)
def logsoftmax(x):
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))
ls, lt = logsoftmax(s), logsoftmax(t)
kl = (np.exp(lt) * (lt - ls)).sum(axis=1)
nll = -lt[np.arange(len(toks)), toks]
for a, b in zip(kl, nll):
    print(repr(float(a)), repr(float(b)))
"#;
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&dir)
        .arg(v.to_string())
        .arg(tokens.join(","))
        .output()
        .expect("python3 runs");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<(f64, f64)> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (a, b) = l.split_once(' ').unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        })
        .collect();
    assert_eq!(lines.len(), r.tokens.len());
    for (t, (kl, nll)) in r.tokens.iter().zip(lines) {
        assert!((t.kl - kl).abs() <= 1e-9 + 1e-6 * kl.abs(), "KL {} vs numpy {kl}", t.kl);
        assert!((t.teacher_nll - nll).abs() <= 1e-6 * (1.0 + nll.abs()), "NLL {} vs numpy {nll}", t.teacher_nll);
    }
}
