//! `sprig gen`: a small synthetic checkpoint of any family of the rule book.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use sprig_import::synth::{write_gguf, write_hf_dir, HfDtype, SynthMoe, SynthMtp, SynthSpec};

use crate::args::ArchArg;

/// The multi-token-prediction head written after the layers (see `SynthMtp`).
#[derive(Clone, Copy, ValueEnum)]
pub enum MtpArg {
    /// Random weights.
    Random,
    /// A copy of a one-layer model's own layer: it drafts what the model would predict.
    Mirror,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Hf,
    Gguf,
}

#[derive(Args)]
pub struct GenArgs {
    /// Family (with --experts: its MoE form; llama with --experts is Mixtral-style).
    #[arg(long, value_enum, default_value = "llama")]
    arch: ArchArg,
    #[arg(long, value_enum, default_value = "hf")]
    format: Format,
    #[arg(short = 'o', long)]
    output: PathBuf,
    #[arg(long, default_value_t = 64)]
    dim: usize,
    #[arg(long, default_value_t = 2)]
    layers: usize,
    #[arg(long, default_value_t = 4)]
    heads: usize,
    #[arg(long, default_value_t = 2)]
    kv_heads: usize,
    #[arg(long, default_value_t = 96)]
    hidden: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Mixture-of-Experts FFNs with this many experts (required for the MoE families).
    #[arg(long)]
    experts: Option<usize>,
    /// Experts used per token.
    #[arg(long, default_value_t = 2)]
    top_k: usize,
    /// Hidden size of one expert (default: --hidden).
    #[arg(long)]
    expert_hidden: Option<usize>,
    /// Hidden size of an always-applied shared expert.
    #[arg(long)]
    shared_hidden: Option<usize>,
    /// Layers at the start that keep a dense FFN.
    #[arg(long, default_value_t = 0)]
    dense_layers: usize,
    /// Sliding-window attention: WINDOW:PATTERN (every PATTERN-th layer global).
    #[arg(long)]
    sliding: Option<String>,
    /// Vocabulary size (padded with filler tokens; at least the generator's 267).
    #[arg(long)]
    vocab: Option<usize>,
    /// A multi-token-prediction head (GGUF `nextn` tensors; --format gguf).
    #[arg(long, value_enum)]
    mtp: Option<MtpArg>,
}

pub fn run(a: GenArgs) -> Result<()> {
    let arch = a.arch.0;
    let rules = arch.rules();
    if rules.moe && a.experts.is_none() {
        bail!("--arch {arch} needs --experts");
    }
    let moe = match a.experts {
        Some(n) => {
            if n == 0 || a.top_k == 0 || a.top_k > n {
                bail!("--top-k must be in 1..=--experts");
            }
            let eh = a.expert_hidden.unwrap_or(a.hidden);
            // A dense family's MoE form (Mixtral) has experts of the model's intermediate size.
            if !rules.moe && eh != a.hidden {
                bail!("{arch} experts (Mixtral-style) have --hidden units; drop --expert-hidden");
            }
            if a.shared_hidden.is_some() && !rules.moe {
                bail!("--shared-hidden needs an MoE family");
            }
            let mut m = SynthMoe::new(n, a.top_k, eh);
            m.shared_hidden = a.shared_hidden;
            m.leading_dense = a.dense_layers;
            Some(m)
        }
        None => None,
    };
    let sliding = match &a.sliding {
        Some(s) => {
            let parsed = s.split_once(':').and_then(|(w, p)| Some((w.parse().ok()?, p.parse().ok()?)));
            match parsed {
                Some((w, p)) if w > 0 && p > 0 => Some((w, p)),
                _ => bail!("--sliding takes WINDOW:PATTERN, e.g. 512:6"),
            }
        }
        None => None,
    };
    if a.vocab.is_some_and(|v| !(267..=1 << 20).contains(&v)) {
        bail!("--vocab must be in 267..=1048576");
    }
    let spec = SynthSpec {
        arch,
        dim: a.dim,
        n_layers: a.layers,
        n_heads: a.heads,
        n_kv_heads: a.kv_heads,
        hidden_dim: a.hidden,
        tied: false,
        seed: a.seed,
        sliding,
        moe,
        vocab: a.vocab,
        context: 256,
        mtp: a.mtp.map(|m| match m {
            MtpArg::Random => SynthMtp::Random,
            MtpArg::Mirror => SynthMtp::Mirror,
        }),
    };
    if spec.n_heads == 0
        || !spec.dim.is_multiple_of(spec.n_heads)
        || spec.n_kv_heads == 0
        || !spec.n_heads.is_multiple_of(spec.n_kv_heads)
    {
        bail!("--dim must be a multiple of --heads, and --heads a multiple of --kv-heads");
    }
    match a.format {
        Format::Hf => write_hf_dir(&spec, &a.output, HfDtype::F32, 1)?,
        Format::Gguf => write_gguf(&spec, &a.output)?,
    }
    eprintln!("sprig: wrote {}", a.output.display());
    Ok(())
}
