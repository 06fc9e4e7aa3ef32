//! The native container opens in Python's `safetensors` package (an independent reader).

use sprig_import::QuantChoice;
use sprig_tests::*;

#[test]
fn python_safetensors_lists_and_reads_native_tensors() {
    let (model, tok) = stories260k();
    let imported = sprig_import::import(&model, Some(&tok), QuantChoice::Q4, &mut |_, _| {}).unwrap();
    let path = std::env::temp_dir().join(format!("sprig-py-{}.safetensors", std::process::id()));
    imported.writer.write(&path).unwrap();
    let script = r#"
import sys, json
from safetensors import safe_open
f = safe_open(sys.argv[1], "np")
meta = f.metadata()
cfg = json.loads(meta["sprig.config"])
q = f.get_tensor("blk.0.attn_q.weight.qs")
s = f.get_tensor("blk.0.attn_q.weight.scale")
print(meta["sprig.format_version"], cfg["dim"], q.shape, q.dtype, s.shape, s.dtype, len(list(f.keys())))
"#;
    let out = std::process::Command::new("python3").arg("-c").arg(script).arg(&path).output().expect("python3 runs");
    let _ = std::fs::remove_file(&path);
    assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
    let line = String::from_utf8(out.stdout).unwrap();
    // dim 64 -> two int4 blocks of 16 bytes per row; one f16 scale per block.
    assert!(line.starts_with("1 64 (64, 32) uint8 (64, 2) float16"), "{line}");
}
