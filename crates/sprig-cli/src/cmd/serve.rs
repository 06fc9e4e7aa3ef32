//! `sprig serve`: the OpenAI-compatible HTTP server (crate sprig-server) on one or more models.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use sprig_engine::registry;
use sprig_server::{ServedModel, ServerConfig};

use crate::args::{EscalateArgs, LoadArgs, SpecArgs};

#[derive(Args)]
pub struct ServeArgs {
    /// A model to serve: a known model name, a model file or Hugging Face directory, or a directory of model
    /// files (.safetensors, .gguf: each one served). Repeat for several; requests pick one by `model`, which
    /// is the known name or the file's stem [default: the registry's default model].
    #[arg(short = 'm', long = "model")]
    pub models: Vec<PathBuf>,
    /// Address to listen on. The default accepts connections from this machine only.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port (0: any free one; the address is printed once listening).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health [default: $SPRIG_API_KEY].
    #[arg(long)]
    pub api_key: Option<String>,
    /// Requests of one model generating together (one batch); more wait in the queue.
    #[arg(long, default_value_t = 16)]
    pub max_concurrent: usize,
    /// Requests of one model waiting for a place; more are refused with 503.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Largest request body in bytes (413 above).
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Largest `max_tokens` a request may ask for, and the reply budget of one that does not say.
    #[arg(long, default_value_t = 4096)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub load: LoadArgs,
    /// Speculative decoding for requests that decode alone (a batch of several never speculates).
    #[command(flatten)]
    pub spec: SpecArgs,
    /// With --escalate-to, chat requests (without tools or a response format) that the model is unsure of are
    /// answered by the teacher; one line on stderr per decision, `sprig_escalated_requests` in /metrics.
    #[command(flatten)]
    pub escalate: EscalateArgs,
}

pub fn run(a: ServeArgs) -> Result<()> {
    let api_key = a.api_key.clone().or_else(|| std::env::var("SPRIG_API_KEY").ok()).filter(|k| !k.is_empty());
    if !a.host.is_loopback() && api_key.is_none() {
        eprintln!("sprig serve: warning: listening on {} without --api-key: anyone who can reach it may use it", a.host);
    }
    let given = if a.models.is_empty() { vec![PathBuf::from(registry::default_model().name)] } else { a.models.clone() };
    let mut models = Vec::new();
    for (name, path) in expand(&given)? {
        let engine = a.load.engine(&path)?;
        eprintln!("sprig serve: model {name:?} from {} on {}", path.display(), engine.backend_name());
        let speculation = speculation_factory(&a, &engine)?;
        models.push(ServedModel { name, engine, speculation });
    }
    let config = ServerConfig {
        host: a.host,
        port: a.port,
        api_key,
        max_concurrent: a.max_concurrent,
        max_queue: a.max_queue,
        max_body_bytes: a.max_body_bytes,
        max_tokens: a.max_tokens,
        context: a.load.ctx_size,
        escalation: a.escalate.escalation()?.map(|(e, ep)| (e, std::sync::Arc::new(ep))),
    };
    let names: Vec<String> = models.iter().map(|m| m.name.clone()).collect();
    sprig_server::serve(config, models, move |addr| {
        eprintln!("sprig serve: listening on http://{addr} (models: {})", names.join(", "));
    })?;
    Ok(())
}

/// Each model given as (name, what to load): a directory of model files becomes each file in it.
fn expand(given: &[PathBuf]) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for p in given {
        if p.is_dir() && !p.join("config.json").exists() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.is_file() && f.extension().is_some_and(|x| x == "safetensors" || x == "gguf"))
                .collect();
            files.sort();
            if files.is_empty() {
                bail!("{}: no .safetensors or .gguf model files in this directory", p.display());
            }
            out.extend(files.into_iter().map(|f| (name_of(&f), f)));
        } else {
            out.push((name_of(p), p.clone()));
        }
    }
    Ok(out)
}

/// A known model's name as given; a file's stem; a directory's name.
fn name_of(p: &Path) -> String {
    if !p.exists() {
        return p.to_string_lossy().into_owned();
    }
    let n = if p.is_dir() { p.file_name() } else { p.file_stem() };
    n.map_or_else(|| p.to_string_lossy().into_owned(), |s| s.to_string_lossy().into_owned())
}

/// What makes each session's speculation, when asked for: the draft model is loaded once (and its tokenizer
/// checked against the target's) and shared; each session gets its own drafter state.
fn speculation_factory(a: &ServeArgs, target: &sprig_engine::AnyEngine) -> Result<Option<sprig_server::SpeculationFactory>> {
    use sprig_engine::speculative::{DraftModel, MtpHead, PromptLookup, SpecMode, Speculation};
    let mode = match a.spec.spec {
        crate::args::SpecArg::Off => return Ok(None),
        crate::args::SpecArg::On => SpecMode::On,
        crate::args::SpecArg::Auto => SpecMode::Auto,
    };
    let max = a.spec.draft_max;
    let ctx = a.load.ctx_size;
    if a.spec.lookup {
        return Ok(Some(std::sync::Arc::new(move || Ok(Speculation::new(Box::new(PromptLookup::default()), mode, max)))));
    }
    if a.spec.mtp {
        crate::args::check_mtp(sprig_engine::with_engine!(target, |t| t.model.has_mtp()))?;
        return Ok(Some(std::sync::Arc::new(move || Ok(Speculation::new(Box::new(MtpHead), mode, max)))));
    }
    let Some(path) = &a.spec.draft else { return Ok(None) };
    let draft = a.load.engine(path)?;
    sprig_engine::with_engine!(target, |t| sprig_engine::with_engine!(&draft, |d| {
        // Checked now: a draft of another tokenizer is a start-up error, not a per-request one.
        DraftModel::new(d.clone(), t, ctx)?;
        let (d, t) = (d.clone(), t.clone());
        Ok(Some(std::sync::Arc::new(move || Ok(Speculation::new(Box::new(DraftModel::new(d.clone(), &*t, ctx)?), mode, max)))
            as sprig_server::SpeculationFactory))
    }))
}
