//! RoPE scaling (linear, llama3, YaRN) against an independent numpy computation of the published formulas
//! (transformers' `_compute_llama3_parameters` / `_compute_yarn_parameters`, rewritten here from the formulas,
//! not from sprig's code), and the importers' handling of each type.

use sprig_format::config::RopeScaling;
use sprig_import::hf::rope_scaling_from_hf;

/// Independent reference: HF transformers' RoPE init functions as numpy formulas.
const NUMPY: &str = r#"
import json, math, sys
import numpy as np

def base(theta, dim):
    return 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))

def llama3(theta, dim, c):
    inv = base(theta, dim)
    factor, lo, hi, old = c["factor"], c["low_freq_factor"], c["high_freq_factor"], c["original_max_position_embeddings"]
    low_wl, high_wl = old / lo, old / hi
    wl = 2 * math.pi / inv
    out = np.where(wl > low_wl, inv / factor, inv)
    smooth = (old / wl - lo) / (hi - lo)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wl < high_wl) & ~(wl > low_wl)
    return np.where(medium, smoothed, out), 1.0

def mscale(s, m=1.0):
    return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

def yarn(theta, dim, c, max_pos):
    factor = c["factor"]
    old = c.get("original_max_position_embeddings", max_pos)
    af = c.get("attention_factor")
    if af is None:
        if c.get("mscale") and c.get("mscale_all_dim"):
            af = mscale(factor, c["mscale"]) / mscale(factor, c["mscale_all_dim"])
        else:
            af = mscale(factor)
    bf, bs = c.get("beta_fast", 32), c.get("beta_slow", 1)
    cd = lambda r: (dim * math.log(old / (r * 2 * math.pi))) / (2 * math.log(theta))
    lo, hi = cd(bf), cd(bs)
    if c.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - lo) / (hi - lo), 0, 1)
    pos = theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    extra_factor = 1 - ramp
    inv = (1 / (factor * pos)) * (1 - extra_factor) + (1 / pos) * extra_factor
    return inv, af

cases = json.loads(sys.argv[1])
out = []
for theta, dim, c, max_pos in cases:
    t = c.get("rope_type")
    if t == "linear":
        inv, af = base(theta, dim) / c["factor"], 1.0
    elif t == "llama3":
        inv, af = llama3(theta, dim, c)
    else:
        inv, af = yarn(theta, dim, c, max_pos)
    out.append({"inv": inv.tolist(), "af": af})
print(json.dumps(out))
"#;

#[test]
fn frequencies_match_numpy_for_every_scaling_type() {
    let cases = serde_json::json!([
        [500000.0, 128, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}, 131072],
        [500000.0, 64, {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}, 131072],
        [1000000.0, 128, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, 131072],
        [10000.0, 64, {"rope_type": "yarn", "factor": 16.0, "beta_fast": 16.0, "beta_slow": 2.0}, 4096],
        [10000.0, 64, {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.707,
                       "original_max_position_embeddings": 4096, "truncate": false}, 163840],
        [10000.0, 96, {"rope_type": "linear", "factor": 2.5}, 4096],
    ]);
    let out =
        std::process::Command::new("python3").arg("-c").arg(NUMPY).arg(cases.to_string()).output().expect("python3");
    assert!(out.status.success(), "numpy reference failed: {}", String::from_utf8_lossy(&out.stderr));
    let expected: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for (case, exp) in cases.as_array().unwrap().iter().zip(expected.as_array().unwrap()) {
        let (theta, dim, max_pos) =
            (case[0].as_f64().unwrap() as f32, case[1].as_u64().unwrap() as usize, case[3].as_u64().unwrap() as usize);
        let scaling = rope_scaling_from_hf(Some(&case[2]), max_pos).unwrap().expect("a scaling");
        let f = RopeScaling::frequencies(theta, dim, Some(&scaling));
        let inv: Vec<f64> = exp["inv"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(f.inv_freq.len(), inv.len(), "{case}");
        for (i, (&got, &want)) in f.inv_freq.iter().zip(&inv).enumerate() {
            let rel = (got as f64 - want).abs() / want.abs();
            assert!(rel < 2e-6, "{case}: inv_freq[{i}] = {got}, numpy {want} (rel {rel:.2e})");
        }
        let af = exp["af"].as_f64().unwrap();
        assert!(
            (f.attention_factor as f64 - af).abs() < 1e-6,
            "{case}: attention factor {} vs {af}",
            f.attention_factor
        );
        // The scaled frequencies differ from plain RoPE: a file that asks for scaling is not run without it.
        let plain = RopeScaling::frequencies(theta, dim, None);
        assert_ne!(plain.inv_freq, f.inv_freq, "{case}");
    }
}

#[test]
fn unknown_scaling_types_are_errors() {
    for ty in ["dynamic", "longrope", "su", "mrope-x"] {
        let v = serde_json::json!({"rope_type": ty, "factor": 2.0});
        let err = rope_scaling_from_hf(Some(&v), 4096).unwrap_err().to_string();
        assert!(err.contains("not supported") && err.contains(ty), "{err}");
    }
    assert!(rope_scaling_from_hf(Some(&serde_json::json!({"rope_type": "default"})), 4096).unwrap().is_none());
    assert!(rope_scaling_from_hf(Some(&serde_json::json!({"rope_type": "llama3", "factor": 8.0})), 4096).is_err());
}
