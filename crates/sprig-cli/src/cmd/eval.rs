//! `sprig eval perplexity`: llama.cpp's perplexity protocol, optionally KL against a teacher.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use sprig_engine::with_engine;

use crate::args::ModelArgs;

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Perplexity on a text file (llama.cpp llama-perplexity protocol), optionally KL against a teacher.
    Perplexity(PerplexityArgs),
}

#[derive(Args)]
pub struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Text file.
    #[arg(short = 'f', long)]
    file: PathBuf,
    #[arg(long, default_value_t = 256)]
    ctx: usize,
    /// Stop after this many chunks.
    #[arg(long)]
    chunks: Option<usize>,
    /// Teacher model for KL(teacher‖student) and top-1 agreement.
    #[arg(long)]
    teacher: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

pub fn perplexity(a: PerplexityArgs) -> Result<()> {
    let text = std::fs::read(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let text = String::from_utf8(text).with_context(|| format!("{} is not valid UTF-8", a.file.display()))?;
    let student = a.model.engine()?;
    let teacher = match &a.teacher {
        Some(t) => Some(ModelArgs { model: Some(t.clone()), ..a.model.clone() }.engine()?),
        None => None,
    };
    let progress = |i, n, ppl: f64| {
        if !a.json {
            eprintln!("[{i}/{n}] running PPL = {ppl:.4}");
        }
    };
    let r = with_engine!(&student, |s| match &teacher {
        None => sprig_engine::eval::perplexity::<_, sprig_backend::cpu::CpuBackend>(
            &**s, None, &text, a.ctx, a.chunks, progress
        ),
        Some(t) =>
            with_engine!(t, |t| sprig_engine::eval::perplexity(&**s, Some(&**t), &text, a.ctx, a.chunks, progress)),
    })?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "perplexity": r.perplexity, "perplexity_err": r.perplexity_err, "chunks": r.chunks, "ctx": r.ctx,
                "scored_tokens": r.scored_tokens, "mean_kl": r.mean_kl, "top1_agreement": r.top1_agreement,
            })
        );
    } else {
        println!(
            "Final estimate: PPL = {:.4} +/- {:.5} ({} chunks of {}, {} scored tokens)",
            r.perplexity, r.perplexity_err, r.chunks, r.ctx, r.scored_tokens
        );
        if let (Some(kl), Some(ag)) = (r.mean_kl, r.top1_agreement) {
            println!(
                "Teacher fidelity: mean KL(teacher||student) = {kl:.6} nats/token, top-1 agreement = {:.2} %",
                ag * 100.0
            );
        }
    }
    Ok(())
}
