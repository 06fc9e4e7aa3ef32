#![no_main]
//! GGUF parsing and import of arbitrary bytes: errors are fine, panics and UB are not.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(g) = sprig_import::gguf::GgufFile::from_bytes(data.to_vec()) {
        let _ = sprig_import::gguf::import_file(&g, &sprig_import::ImportOptions::quant(sprig_import::QuantChoice::Keep), &mut |_, _| {});
    }
});
