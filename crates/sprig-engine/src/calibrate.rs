//! Calibration for activation-aware quantization: run the unquantized model over text and record, for every
//! linear layer, the mean square of each input feature.

use std::collections::HashMap;

use sprig_backend::Backend;
use sprig_import::Importance;
use sprig_models::Logits;

use crate::generate::Engine;
use crate::{EngineError, Result};

/// Mean squared activation per input feature of every linear weight, over up to `max_chunks` chunks of
/// `ctx` tokens of `text`.
pub fn calibrate<B: Backend>(e: &Engine<B>, text: &str, ctx: usize, max_chunks: usize) -> Result<Importance> {
    let tokens = e.tokenizer.encode_prompt(text)?;
    if tokens.len() < 2 {
        return Err(EngineError::Eval("calibration text is empty".into()));
    }
    let mut sums: HashMap<String, (Vec<f64>, usize)> = HashMap::new();
    for chunk in tokens.chunks(ctx.max(1)).take(max_chunks.max(1)) {
        let mut st = e.model.new_state(ctx.max(chunk.len()))?;
        let mut observe = |names: &[&str], data: &[f32]| {
            let cols = data.len() / chunk.len();
            for n in names {
                let (acc, count) = sums.entry(n.to_string()).or_insert_with(|| (vec![0.0; cols], 0));
                for (i, v) in data.iter().enumerate() {
                    acc[i % cols] += (*v as f64) * (*v as f64);
                }
                *count += chunk.len();
            }
        };
        e.model.forward_observed(&mut st, chunk, Logits::Last, Some(&mut observe))?;
    }
    Ok(sums.into_iter().map(|(k, (acc, n))| (k, acc.into_iter().map(|s| (s / n as f64) as f32).collect())).collect())
}
