#![no_main]
//! llama2.c checkpoints: the first bytes are the model, the rest its tokenizer.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.len().min(64);
    let (model, tok) = data.split_at(split);
    let _ = sprig_import::llama2c::import_bytes(model, tok, &sprig_import::ImportOptions::quant(sprig_import::QuantChoice::Keep), &mut |_, _| {});
    let _ = sprig_import::llama2c::read_tokenizer(data, 300);
    let _ = sprig_import::sentencepiece::parse(data);
});
