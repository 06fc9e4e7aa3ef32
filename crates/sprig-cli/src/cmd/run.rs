//! `sprig run`: generate from a prompt.

use std::io::Write;

use anyhow::Result;
use clap::Args;
use sprig_backend::Backend;
use sprig_engine::{with_engine, Engine, Sampler};
use sprig_format::ModelFile;

use crate::args::{ModelArgs, SamplingArgs};

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt text.
    #[arg(short = 'p', long)]
    prompt: String,
    /// Tokens to generate.
    #[arg(short = 'n', long = "n-predict", default_value_t = 128)]
    n: usize,
    /// After generating, print expert usage per MoE layer (tokens per expert, expert bytes read).
    #[arg(long)]
    stats: bool,
    /// Parse special-token strings in the prompt (e.g. `<|im_start|>`) as control tokens; by default the
    /// prompt is plain text.
    #[arg(long)]
    special: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
}

pub fn run(a: RunArgs) -> Result<()> {
    let e = a.model.engine()?;
    with_engine!(&e, |e| run_on(&**e, &a))
}

fn run_on<B: Backend>(e: &Engine<B>, a: &RunArgs) -> Result<()> {
    let mut sampler = Sampler::new(a.sampling.params())?;
    let add_bos = e.tokenizer.special().add_bos;
    let prompt = e.tokenizer.encode_parts(&[(&a.prompt, a.special)], add_bos)?;
    let mut st = e.model.new_state(a.model.ctx_size)?;
    let mut out = std::io::stdout().lock();
    let stats = e.generate(&mut st, &prompt, a.n, &mut sampler, true, |s| {
        let _ = out.write_all(s.as_bytes());
        let _ = out.flush();
        true
    })?;
    writeln!(out)?;
    if stats.stop == sprig_engine::generate::StopReason::ContextFull {
        eprintln!("sprig: stopped: the context of {} tokens is full (raise it with -c)", st.max_context);
    }
    eprintln!(
        "sprig: {} prompt tokens at {:.1} tok/s, {} generated at {:.1} tok/s ({})",
        stats.prompt_tokens,
        stats.prefill_tok_s(),
        stats.generated.len(),
        stats.decode_tok_s(),
        e.model.backend.name()
    );
    if a.stats {
        print_expert_stats(&e.model.file, &e.model.moe_usage(&st)?, st.pos);
    }
    Ok(())
}

/// Per MoE layer: how many tokens each expert took and how many expert weight bytes were read per token.
fn print_expert_stats(file: &ModelFile, usage: &[Option<sprig_backend::MoeUsage>], positions: usize) {
    if usage.iter().all(|u| u.is_none()) {
        eprintln!("sprig: stats: the model has no Mixture-of-Experts layers");
        return;
    }
    eprintln!("sprig: expert usage over {positions} positions (tokens routed to each expert; expert bytes read):");
    for (layer, u) in usage.iter().enumerate() {
        let Some(u) = u else { continue };
        let all: usize = ["gate", "up", "down"]
            .iter()
            .filter_map(|p| file.entry(&format!("blk.{layer}.ffn_{p}_exps.weight")))
            .map(|e| e.bytes())
            .sum();
        let used = u.tokens.iter().filter(|&&t| t > 0).count();
        let per_token = u.bytes_read as f64 / positions.max(1) as f64;
        eprintln!(
            "  layer {layer:>3}: {used}/{} experts used, tokens {:?}; read {:.1} KiB/token of {:.1} KiB ({:.1} %)",
            u.tokens.len(),
            u.tokens,
            per_token / 1024.0,
            all as f64 / 1024.0,
            100.0 * per_token / all.max(1) as f64
        );
    }
}

