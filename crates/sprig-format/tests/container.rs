//! Round trip, zero-copy, alignment and every bad-input case of the container.

use half::f16;
use sprig_format::testutil::tiny_config;
use sprig_format::{ContainerWriter, FormatError, ModelFile, WeightView};
use sprig_quant::quantize::quantize;
use sprig_quant::Scheme;

fn sample() -> Vec<u8> {
    sample_writer().to_bytes()
}

fn sample_writer() -> ContainerWriter {
    sample_writer_grouped(true)
}

fn sample_writer_grouped(group_rows: bool) -> ContainerWriter {
    let cfg = tiny_config();
    let mut w = ContainerWriter::new(&cfg, "{\"kind\":\"test\"}".into(), Some("{{ messages }}".into()));
    w.set_group_rows(group_rows);
    let emb: Vec<f32> = (0..32 * 64).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
    w.add_quant("token_embd.weight", &quantize(&emb, 32, 64, Scheme::Q4));
    w.add_quant("blk.0.ffn_up.weight", &quantize(&emb[..3 * 64], 3, 64, Scheme::Q4A));
    w.add_quant("blk.0.ffn_down.weight", &quantize(&emb[..2 * 50], 2, 50, Scheme::Q8));
    w.add_f32("output_norm.weight", &[63], &vec![1.0; 63]);
    w.add_f16("blk.0.attn_norm.weight", &[64], &[f16::ONE; 64]);
    w
}

#[test]
fn writer_opens_in_memory_byte_for_byte_like_the_serialised_file() {
    let f = sample_writer().into_model_file().unwrap();
    assert_eq!(f.mapping(), &sample()[..]);
}

#[test]
fn round_trip_aligned_zero_copy() {
    let bytes = sample();
    let f = ModelFile::from_bytes(&bytes).unwrap();
    assert_eq!(f.config, tiny_config());
    assert_eq!(f.chat_template.as_deref(), Some("{{ messages }}"));
    let map = f.mapping().as_ptr_range();
    for name in f.tensor_names().map(String::from).collect::<Vec<_>>() {
        let v = f.weight(&name).unwrap();
        let p = v.data_ptr();
        assert!(map.contains(&p), "{name} not inside the mapping");
        assert_eq!((p as usize - map.start as usize) % 64, 0, "{name} not aligned");
        if let WeightView::Quant(q) = v {
            assert_eq!((q.scales().as_ptr() as usize - map.start as usize) % 64, 0);
        }
    }
    let q = f.weight("blk.0.ffn_down.weight").unwrap();
    assert_eq!((q.rows(), q.cols()), (2, 50));
    assert!(f.bits_per_weight() > 4.0);
}

fn open_err(bytes: &[u8]) -> String {
    match ModelFile::from_bytes(bytes) {
        Ok(_) => panic!("corrupt file opened"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn truncated_anywhere_is_an_error() {
    let bytes = sample();
    for cut in (0..bytes.len()).step_by(7).chain([bytes.len() - 1]) {
        let _ = open_err(&bytes[..cut]);
    }
}

/// Rewrites the JSON header (keeping the data) so tests can make it lie.
fn with_header(bytes: &[u8], edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut h: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut h);
    let mut hs = serde_json::to_vec(&h).unwrap();
    // Offsets are relative to the data, so the header may grow; by whole 64-byte steps, keeping the data as
    // aligned in the file as it was.
    let mut len = n;
    while len < hs.len() {
        len += 64;
    }
    hs.resize(len, b' ');
    let mut out = (len as u64).to_le_bytes().to_vec();
    out.extend(hs);
    out.extend(&bytes[8 + n..]);
    out
}

#[test]
fn header_lies_about_offsets() {
    let b = with_header(&sample(), |h| h["output_norm.weight"]["data_offsets"][1] = 999_999_999u64.into());
    let e = open_err(&b);
    assert!(e.contains("safetensors"), "{e}");
}

#[test]
fn header_lies_about_shape() {
    let b = with_header(&sample(), |h| h["output_norm.weight"]["shape"] = serde_json::json!([62]));
    open_err(&b);
    // Consistent for safetensors but not with the sprig index: the planes disagree with the logical shape.
    let b = with_header(&sample(), |h| {
        let idx = h["__metadata__"]["sprig.tensors"].as_str().unwrap().replace("[3,64]", "[4,64]");
        h["__metadata__"]["sprig.tensors"] = idx.into();
    });
    let e = open_err(&b);
    assert!(e.contains("blk.0.ffn_up.weight"), "{e}");
}

#[test]
fn header_lies_about_dtype() {
    let b = with_header(&sample(), |h| h["blk.0.ffn_up.weight.scale"]["dtype"] = "BF16".into());
    let e = open_err(&b);
    assert!(e.contains("blk.0.ffn_up.weight.scale"), "{e}");
}

#[test]
fn overflowing_dims() {
    let b = with_header(&sample(), |h| h["output_norm.weight"]["shape"] = serde_json::json!([u64::MAX, 4]));
    open_err(&b);
    let b = with_header(&sample(), |h| {
        let idx = h["__metadata__"]["sprig.tensors"].as_str().unwrap().replace("[63]", "[18446744073709551615]");
        h["__metadata__"]["sprig.tensors"] = idx.into();
    });
    let e = open_err(&b);
    assert!(e.contains("output_norm.weight"), "{e}");
    let b = with_header(&sample(), |h| {
        let cfg = h["__metadata__"]["sprig.config"].as_str().unwrap().replace("\"dim\":64", "\"dim\":99999999999");
        h["__metadata__"]["sprig.config"] = cfg.into();
    });
    let e = open_err(&b);
    assert!(e.contains("config.dim"), "{e}");
}

#[test]
fn bad_utf8_in_metadata() {
    let mut b = sample();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let hdr = String::from_utf8(b[8..8 + n].to_vec()).unwrap();
    let pos = hdr.find("{{ messages }}").unwrap();
    b[8 + pos + 3] = 0xff;
    open_err(&b);
}

#[test]
fn non_finite_scales() {
    let bytes = sample();
    let f = ModelFile::from_bytes(&bytes).unwrap();
    let WeightView::Quant(q) = f.weight("token_embd.weight").unwrap() else { panic!() };
    let off = q.scales().as_ptr() as usize - f.mapping().as_ptr() as usize;
    for bad in [f16::NAN, f16::INFINITY, f16::NEG_INFINITY] {
        let mut b = bytes.clone();
        b[off + 10..off + 12].copy_from_slice(&bad.to_le_bytes());
        let e = open_err(&b);
        assert!(e.contains("token_embd.weight") && e.contains("non-finite"), "{e}");
    }
}

#[test]
fn missing_metadata_and_wrong_version() {
    let e = open_err(&with_header(&sample(), |h| {
        h["__metadata__"].as_object_mut().unwrap().remove("sprig.config");
    }));
    assert!(e.contains("sprig.config"), "{e}");
    let e = open_err(&with_header(&sample(), |h| h["__metadata__"]["sprig.format_version"] = "99".into()));
    assert!(e.contains("version 99"), "{e}");
    let e = open_err(&with_header(&sample(), |h| h["__metadata__"]["sprig.config"] = "{not json".into()));
    assert!(e.contains("sprig.config"), "{e}");
}

#[test]
fn garbage_and_empty() {
    open_err(&[]);
    open_err(&[0xff; 64]);
    open_err(&u64::MAX.to_le_bytes());
    assert!(matches!(ModelFile::open(std::path::Path::new("/nonexistent/x.safetensors")), Err(FormatError::Io { .. })));
}

/// Matrices of 16 rows or more are written with their rows in groups of 16 and read back to the same values;
/// smaller ones and version-1 (row-major) files read as before; an unknown layout name is an error.
#[test]
fn rows_in_groups_of_16_round_trip_and_bad_layouts_are_errors() {
    use sprig_quant::scheme::RowLayout;
    let bytes = sample();
    let f = ModelFile::from_bytes(&bytes).unwrap();
    let emb = f.weight("token_embd.weight").unwrap();
    let WeightView::Quant(q) = emb else { panic!("quantized") };
    assert_eq!(q.layout(), RowLayout::Grouped);
    let source: Vec<f32> = (0..32 * 64).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
    assert_eq!(q.dequantize(), quantize(&source, 32, 64, Scheme::Q4).view().dequantize());
    let WeightView::Quant(small) = f.weight("blk.0.ffn_up.weight").unwrap() else { panic!("quantized") };
    assert_eq!(small.layout(), RowLayout::RowMajor);
    // The same file with grouping off, labelled version 1, reads the same values.
    let mut w = sample_writer_grouped(false);
    w.set_metadata("sprig.format_version", "1".into());
    let v1 = w.to_bytes();
    let old = ModelFile::from_bytes(&v1).unwrap();
    assert_eq!(old.weight("token_embd.weight").unwrap().to_f32(), emb.to_f32());
    let e = open_err(&with_header(&bytes, |h| {
        let index = h["__metadata__"]["sprig.tensors"].as_str().unwrap().replace("rows16", "rows8");
        h["__metadata__"]["sprig.tensors"] = index.into();
    }));
    assert!(e.contains("token_embd.weight") && e.contains("rows8"), "{e}");
}
