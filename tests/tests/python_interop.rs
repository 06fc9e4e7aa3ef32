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
    assert!(line.starts_with("2 64 (64, 32) uint8 (64, 2) float16"), "{line}");
}

/// The documented grouped layout, undone by an independent reader (numpy), gives the row-major planes of the
/// same model written with grouping off.
#[test]
fn python_reads_rows_stored_in_groups_of_16() {
    let (model, tok) = stories260k();
    let imported = sprig_import::import(&model, Some(&tok), QuantChoice::Q4, &mut |_, _| {}).unwrap();
    let grouped = std::env::temp_dir().join(format!("sprig-py-g-{}.safetensors", std::process::id()));
    imported.writer.write(&grouped).unwrap();
    // The same matrices written row-major (only they: numpy compares planes).
    let file = sprig_format::ModelFile::open(&grouped).unwrap();
    let mut plain_writer = sprig_format::ContainerWriter::new(&file.config, file.tokenizer_json.clone(), None);
    plain_writer.set_group_rows(false);
    for name in file.tensor_names().map(str::to_string).collect::<Vec<_>>() {
        if let sprig_format::WeightView::Quant(q) = file.weight(&name).unwrap() {
            plain_writer.add_quant_as_is(&name, &q.to_owned_row_major());
        }
    }
    let plain = std::env::temp_dir().join(format!("sprig-py-p-{}.safetensors", std::process::id()));
    plain_writer.write(&plain).unwrap();
    let script = r#"
import sys, json
import numpy as np
from safetensors import safe_open
g, p = safe_open(sys.argv[1], "np"), safe_open(sys.argv[2], "np")
index = json.loads(g.metadata()["sprig.tensors"])
checked = 0
for name, e in index.items():
    if e.get("layout") != "rows16":
        continue
    for plane, unit in ((".qs", 4), (".scale", 2), (".min", 2)):
        if name + plane not in g.keys():
            continue
        a = g.get_tensor(name + plane)
        rows = a.shape[0]
        b = a.reshape(rows, -1).view(np.uint8).reshape(rows, -1)
        n = rows // 16 * 16
        per_row = b.shape[1] // unit
        # Grouped: per group, unit i of row r at 16 * i + r.
        head = b[:n].reshape(rows // 16, per_row, 16, unit).transpose(0, 2, 1, 3).reshape(n, -1)
        want = p.get_tensor(name + plane).reshape(rows, -1).view(np.uint8).reshape(rows, -1)
        assert (head == want[:n]).all() and (b[n:] == want[n:]).all(), name + plane
        checked += 1
print(checked)
"#;
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&grouped)
        .arg(&plain)
        .output()
        .expect("python3 runs");
    let _ = (std::fs::remove_file(&grouped), std::fs::remove_file(&plain));
    assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
    let checked: usize = String::from_utf8(out.stdout).unwrap().trim().parse().unwrap();
    assert!(checked >= 10, "only {checked} grouped planes checked");
}
