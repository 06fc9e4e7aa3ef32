//! Hugging Face directories: `config.json`, `*.safetensors` (f32/f16/bf16, sharded), `tokenizer.json`,
//! `tokenizer_config.json` (chat template, special tokens).
use std::path::Path;
use crate::{sink::QuantChoice, Imported, Progress, Result, invalid};
pub fn import(path: &Path, _q: QuantChoice, _p: Progress) -> Result<Imported> { Err(invalid(format!("{}: HF import not yet built", path.display()))) }
