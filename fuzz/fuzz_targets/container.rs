#![no_main]
//! Opening arbitrary bytes as a native model file, then touching every tensor view.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = sprig_format::ModelFile::from_bytes(data) {
        let names: Vec<String> = f.tensor_names().map(String::from).collect();
        for n in names {
            if let Ok(w) = f.weight(&n) {
                if w.rows() * w.cols() < 1 << 16 {
                    let _ = w.to_f32();
                }
            }
        }
        let _ = sprig_tokenizer::Tokenizer::from_json(&f.tokenizer_json);
    }
});
