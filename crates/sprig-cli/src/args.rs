//! What several commands share: the command list, the model and sampling argument groups, the value enums
//! (each a thin wrapper over the engine's own type and names, so the CLI keeps no second copy of them), and
//! opening a model.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::builder::PossibleValue;
use clap::{Args, Parser, Subcommand, ValueEnum};
use sprig_backend::KvDtype;
use sprig_engine::{open_model_file, registry, AnyEngine, Constraint, ContextPolicy, DeviceChoice, LoadOptions, SamplingParams};
use sprig_format::{Arch, ModelFile};
use sprig_import::QuantChoice;

use crate::cmd;

#[derive(Parser)]
#[command(name = "sprig", version, about = "Run small distilled language models fast and offline")]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Generate text from a prompt, streaming it to stdout.
    Run(cmd::run::RunArgs),
    /// Chat interactively (or with turns piped on stdin) using the model's chat template.
    Chat(cmd::chat::ChatArgs),
    /// Convert a llama2.c .bin, a .gguf or a Hugging Face directory into a native .safetensors model.
    Convert(cmd::convert::ConvertArgs),
    /// Show a model's architecture, tensors and metadata.
    Inspect(cmd::inspect::InspectArgs),
    /// Evaluate a model.
    #[command(subcommand)]
    Eval(cmd::eval::EvalCommand),
    /// The teacher/student bridge: how far a student is from its teacher on its own answers.
    #[command(subcommand)]
    Distill(cmd::distill::DistillCommand),
    /// Fetch a known model (see `sprig models`), verify its sha256, convert and cache it; prints its path.
    Pull { name: Option<String> },
    /// List the known models.
    Models,
    /// Measure prompt processing and generation speed (llama-bench style), peak RSS and the bandwidth roofline.
    Bench(cmd::bench::BenchArgs),
    /// Write a small synthetic checkpoint (random weights) as a Hugging Face directory or a GGUF file.
    Gen(cmd::gen::GenArgs),
    /// List the devices models can run on: the CPU and the GPU adapters the GPU backend reaches.
    Devices,
    /// Serve models over an OpenAI-compatible HTTP API (chat and text completions, streaming, tools, JSON
    /// output, metrics).
    #[cfg(feature = "server")]
    Serve(cmd::serve::ServeArgs),
}

pub fn dispatch(cli: Cli) -> Result<()> {
    match cli.cmd {
        Command::Run(a) => cmd::run::run(a),
        Command::Chat(a) => cmd::chat::run(a),
        Command::Convert(a) => cmd::convert::run(a),
        Command::Inspect(a) => cmd::inspect::run(a),
        Command::Eval(cmd::eval::EvalCommand::Perplexity(a)) => cmd::eval::perplexity(a),
        Command::Distill(cmd::distill::DistillCommand::Eval(a)) => cmd::distill::eval(a),
        Command::Distill(cmd::distill::DistillCommand::Collect(a)) => cmd::distill::collect(a),
        Command::Pull { name } => cmd::registry::pull(name),
        Command::Models => cmd::registry::models(),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Gen(a) => cmd::gen::run(a),
        Command::Devices => cmd::devices::run(),
        #[cfg(feature = "server")]
        Command::Serve(a) => cmd::serve::run(a),
    }
}

/// A clap value enum over a type that lists its values and names them.
macro_rules! value_enum {
    ($wrapper:ident, $inner:ty, $all:expr, $name:expr) => {
        #[derive(Clone, Copy, Debug)]
        pub struct $wrapper(pub $inner);
        impl ValueEnum for $wrapper {
            fn value_variants<'a>() -> &'a [Self] {
                static ALL: std::sync::OnceLock<Vec<$wrapper>> = std::sync::OnceLock::new();
                ALL.get_or_init(|| $all.into_iter().map($wrapper).collect())
            }
            fn to_possible_value(&self) -> Option<PossibleValue> {
                let name: fn(&$inner) -> &'static str = $name;
                Some(PossibleValue::new(name(&self.0)))
            }
        }
    };
}

value_enum!(DeviceArg, DeviceChoice, DeviceChoice::ALL, |d| d.name());
value_enum!(QuantArg, QuantChoice, QuantChoice::ALL, |q| q.name());
value_enum!(ArchArg, Arch, Arch::ALL, |a| a.name());
value_enum!(ContextPolicyArg, ContextPolicy, ContextPolicy::ALL, |p| p.name());
value_enum!(KvArg, KvDtype, KvDtype::ALL, |d| d.name());
// `convert --quant`: `auto` (None) or a choice.
value_enum!(ConvertQuantArg, Option<QuantChoice>, std::iter::once(None).chain(QuantChoice::ALL.map(Some)), |q| {
    match q {
        None => "auto",
        Some(q) => q.name(),
    }
});

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Model: a known model name (see `sprig models`), a native .safetensors, .gguf, llama2.c .bin, or a
    /// Hugging Face directory [default: the registry's default model].
    #[arg(short = 'm', long = "model")]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub load: LoadArgs,
}

/// How a model is loaded and run, whichever model it is (`sprig serve` takes several with one set).
#[derive(Args, Clone)]
pub struct LoadArgs {
    /// Tokenizer for llama2.c checkpoints (tokenizer.bin).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// CPU threads (default: physical cores).
    #[arg(short = 't', long, default_value_t = 0)]
    pub threads: usize,
    /// auto: a hardware GPU when present and the build has the GPU backend, else the CPU.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Context length (default: the model's).
    #[arg(short = 'c', long = "ctx-size", default_value_t = 0)]
    pub ctx_size: usize,
    /// Precision for sources converted on the fly.
    #[arg(long, value_enum, default_value = "keep")]
    pub quant: QuantArg,
    /// Say how the model was set up: the CPU kernels picked per shape class and why.
    #[arg(short = 'v', long)]
    pub verbose: bool,
    /// MiB the model and one session may use (weights + KV cache + scratch), checked before loading; the
    /// memory the system has available is checked either way.
    #[arg(long, value_name = "MB")]
    pub memory_budget: Option<u64>,
    /// MiB of K/V of prompt blocks shared by the model's sessions, so a prompt starting like an earlier one
    /// runs only the rest (0 = off); shrunk to what --memory-budget leaves.
    #[arg(long, value_name = "MB", default_value_t = (sprig_engine::prefix_cache::DEFAULT_BUDGET_BYTES >> 20) as u64)]
    pub prefix_cache: u64,
    /// KV cache storage: f32, or q8 (int8 with a scale per position and KV head: ~1/4 of the bytes).
    #[arg(long, value_enum, default_value = "f32")]
    pub kv: KvArg,
}

impl ModelArgs {
    /// The model path or name given, or the registry's default.
    pub fn model(&self) -> PathBuf {
        self.model.clone().unwrap_or_else(|| PathBuf::from(registry::default_model().name))
    }
    pub fn threads(&self) -> usize {
        self.load.threads()
    }

    pub fn open(&self) -> Result<Arc<ModelFile>> {
        self.load.open(&self.model())
    }

    pub fn engine(&self) -> Result<AnyEngine> {
        self.load.engine(&self.model())
    }
}

impl LoadArgs {
    pub fn threads(&self) -> usize {
        if self.threads == 0 {
            sprig_engine::device::default_threads()
        } else {
            self.threads
        }
    }

    /// Opens `model` (a registry name or a path).
    pub fn open(&self, model: &std::path::Path) -> Result<Arc<ModelFile>> {
        let opts = LoadOptions { tokenizer: self.tokenizer.clone(), quant: self.quant.0 };
        let path = registry::resolve(model, &mut |s| eprintln!("sprig: {s}"))?;
        open_model_file(&path, &opts).with_context(|| format!("loading {}", model.display()))
    }

    /// The engine of `model` on the chosen device, its memory checked and its caches set up.
    pub fn engine(&self, model: &std::path::Path) -> Result<AnyEngine> {
        let file = self.open(model)?;
        let need = sprig_engine::memory::MemoryNeed::of(&file, self.ctx_size, self.kv.0);
        sprig_engine::memory::check(&need, self.memory_budget.map(|m| m << 20), "the model with one session")?;
        let budget = self.memory_budget.map(|m| m << 20);
        let e = AnyEngine::new(file, self.device.0, self.threads, &mut |s| eprintln!("sprig: {s}"))?;
        e.set_kv_dtype(self.kv.0);
        e.set_prefix_cache_budget(sprig_engine::memory::prefix_cache_budget(self.prefix_cache << 20, &need, budget) as usize);
        if self.verbose {
            for line in e.describe() {
                eprintln!("sprig: {line}");
            }
        }
        Ok(e)
    }
}

/// Sampling flags; their defaults are the engine's ([`SamplingParams::default`]). The chain: logit bias →
/// penalties → temperature → top-k → typical-p → top-p → min-p.
#[derive(Args)]
pub struct SamplingArgs {
    /// Temperature; 0 = greedy [default: the engine's].
    #[arg(long = "temp", allow_negative_numbers = true)]
    pub temp: Option<f32>,
    #[arg(long = "top-k")]
    pub top_k: Option<usize>,
    #[arg(long = "top-p", allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    /// Drop tokens less likely than this × the most likely one (0 = off).
    #[arg(long = "min-p", allow_negative_numbers = true)]
    pub min_p: Option<f32>,
    /// Locally typical sampling's mass (1 = off).
    #[arg(long = "typical-p", allow_negative_numbers = true)]
    pub typical_p: Option<f32>,
    /// Repetition penalty over the last --repeat-last-n tokens (1 = off).
    #[arg(long = "repeat-penalty", allow_negative_numbers = true)]
    pub repeat_penalty: Option<f32>,
    #[arg(long = "presence-penalty", allow_negative_numbers = true)]
    pub presence_penalty: Option<f32>,
    #[arg(long = "frequency-penalty", allow_negative_numbers = true)]
    pub frequency_penalty: Option<f32>,
    /// Tokens the penalties look back over.
    #[arg(long = "repeat-last-n")]
    pub penalty_last_n: Option<usize>,
    /// TOKEN=BIAS added to a token's logit (repeatable; BIAS may be -inf to ban the token).
    #[arg(long = "logit-bias", value_parser = parse_bias, allow_negative_numbers = true)]
    pub logit_bias: Vec<(u32, f32)>,
    /// Stop when the generated text contains this (repeatable; not printed).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Constrain the output to an instance of the JSON Schema in FILE.
    #[arg(long, value_name = "FILE", group = "constraint")]
    pub json_schema: Option<std::path::PathBuf>,
    /// Constrain the output to any JSON object.
    #[arg(long, group = "constraint")]
    pub json: bool,
    /// Constrain the output to match this regular expression (Rust regex syntax, the whole output).
    #[arg(long, value_name = "REGEX", group = "constraint")]
    pub regex: Option<String>,
    /// Constrain the output to the Lark grammar in FILE (llguidance's dialect; `%json {…}` embeds a schema).
    #[arg(long, value_name = "FILE.lark", group = "constraint")]
    pub grammar: Option<std::path::PathBuf>,
}

/// `--spec`: when speculative decoding runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SpecArg {
    /// While it is faster than plain decoding (measured; switched off for the session otherwise).
    Auto,
    /// Always.
    On,
    /// Never (ignore --draft, --lookup and --mtp).
    Off,
}

/// Speculative decoding flags: a drafter proposes tokens, the model checks them in one pass (exact: greedy
/// output is unchanged, sampled output keeps its distribution).
#[derive(Args, Clone)]
pub struct SpecArgs {
    /// Draft with this smaller model of the same tokenizer (a known name or a path), e.g.
    /// qwen2.5-coder-0.5b-instruct for qwen2.5-coder-1.5b-instruct.
    #[arg(long, value_name = "MODEL")]
    pub draft: Option<PathBuf>,
    /// Draft by prompt lookup: what followed the latest earlier occurrence of the last few tokens.
    #[arg(long, conflicts_with = "draft")]
    pub lookup: bool,
    /// Draft with the model's own multi-token-prediction head (GGUF `nextn` layers, as DeepSeek-V3 and
    /// GLM-4.5 ship them).
    #[arg(long, conflicts_with_all = ["draft", "lookup"])]
    pub mtp: bool,
    #[arg(long, value_enum, default_value = "auto")]
    pub spec: SpecArg,
    /// Most tokens drafted per pass (the length adapts to the acceptance).
    #[arg(long, default_value_t = 8)]
    pub draft_max: usize,
}

impl SpecArgs {
    /// The speculation these flags ask for, drafting for `target` (`None`: plain decoding). A draft model is
    /// loaded with `load`'s settings and a context of `ctx`.
    pub fn speculation<B: sprig_backend::Backend>(
        &self,
        target: &sprig_engine::Engine<B>,
        load: &LoadArgs,
        ctx: usize,
    ) -> Result<Option<sprig_engine::speculative::Speculation>> {
        use sprig_engine::speculative::{DraftModel, Drafter, MtpHead, PromptLookup, SpecMode, Speculation};
        let mode = match self.spec {
            SpecArg::Off => return Ok(None),
            SpecArg::On => SpecMode::On,
            SpecArg::Auto => SpecMode::Auto,
        };
        if self.mtp {
            check_mtp(target.model.has_mtp())?;
        }
        let drafter: Box<dyn Drafter> = match (&self.draft, self.lookup) {
            _ if self.mtp => Box::new(MtpHead),
            (Some(path), _) => {
                let d = load.engine(path)?;
                sprig_engine::with_engine!(&d, |d| Box::new(DraftModel::new(d.clone(), target, ctx)?) as Box<dyn Drafter>)
            }
            (None, true) => Box::new(PromptLookup::default()),
            (None, false) => return Ok(None),
        };
        Ok(Some(Speculation::new(drafter, mode, self.draft_max)))
    }
}

/// `--mtp` on a model without an MTP head: one line saying so.
pub fn check_mtp(has: bool) -> Result<()> {
    if !has {
        anyhow::bail!("--mtp: this model has no multi-token-prediction head (its file has no `nextn` layers); use --draft MODEL or --lookup");
    }
    Ok(())
}

/// One line of what speculative decoding did.
pub fn spec_line(s: &sprig_engine::speculative::SpecStats) -> String {
    format!(
        "speculative: {} drafted, {} accepted ({:.0} %), {:.2} tokens per pass of {:.1} ms (drafting included; a plain step {}){}",
        s.drafted,
        s.accepted,
        100.0 * s.acceptance(),
        s.tokens_per_pass(),
        1e3 * s.spec_secs / s.passes.max(1) as f64,
        if s.plain_tokens > 0 { format!("{:.1} ms", 1e3 * s.plain_secs / s.plain_tokens as f64) } else { "not measured".into() },
        if s.switched_off { "; switched off: slower than plain decoding here" } else { "" }
    )
}

/// Tool-calling flags (chat templates show the tools; replies are parsed into calls).
#[derive(Args)]
pub struct ToolArgs {
    /// Tools the model may call: a JSON array in OpenAI's `tools` shape.
    #[arg(long, value_name = "FILE.json")]
    pub tools: Option<std::path::PathBuf>,
    /// auto, none, required, or a tool's name.
    #[arg(long, default_value = "auto", requires = "tools")]
    pub tool_choice: String,
    /// Do not constrain the reply to the tools' grammar (only parse what the model writes).
    #[arg(long, requires = "tools")]
    pub unconstrained_tools: bool,
}

impl ToolArgs {
    pub fn tools(&self) -> Result<Option<sprig_engine::Tools>> {
        let Some(path) = &self.tools else { return Ok(None) };
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let choice = sprig_engine::ToolChoice::parse(&self.tool_choice);
        Ok(Some(sprig_engine::Tools::from_json(&text, choice, !self.unconstrained_tools)?))
    }
}

fn parse_bias(s: &str) -> std::result::Result<(u32, f32), String> {
    let (t, b) = s.split_once('=').ok_or("expected TOKEN=BIAS, e.g. 42=-inf")?;
    let t = t.trim().parse::<u32>().map_err(|e| format!("token `{t}`: {e}"))?;
    let b = b.trim().parse::<f32>().map_err(|e| format!("bias `{b}`: {e}"))?;
    Ok((t, b))
}

impl SamplingArgs {
    /// The parameters, with the constraint's file read (not compiled: the engine checks it before generating).
    pub fn params(&self) -> Result<SamplingParams> {
        let d = SamplingParams::default();
        let read = |p: &std::path::Path| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
        let constraint = if let Some(p) = &self.json_schema {
            Some(Constraint::JsonSchema(read(p)?))
        } else if let Some(p) = &self.grammar {
            Some(Constraint::Lark(read(p)?))
        } else if let Some(r) = &self.regex {
            Some(Constraint::Regex(r.clone()))
        } else {
            self.json.then_some(Constraint::JsonObject)
        };
        Ok(SamplingParams {
            temperature: self.temp.unwrap_or(d.temperature),
            top_k: self.top_k.unwrap_or(d.top_k),
            top_p: self.top_p.unwrap_or(d.top_p),
            min_p: self.min_p.unwrap_or(d.min_p),
            typical_p: self.typical_p.unwrap_or(d.typical_p),
            repeat_penalty: self.repeat_penalty.unwrap_or(d.repeat_penalty),
            presence_penalty: self.presence_penalty.unwrap_or(d.presence_penalty),
            frequency_penalty: self.frequency_penalty.unwrap_or(d.frequency_penalty),
            penalty_last_n: self.penalty_last_n.unwrap_or(d.penalty_last_n),
            logit_bias: self.logit_bias.clone(),
            stop: self.stop.clone(),
            seed: self.seed.unwrap_or(d.seed),
            constraint,
            top_logprobs: None,
        })
    }
}

/// Escalation flags: hand the turns the model is unsure of to a teacher behind an OpenAI-compatible endpoint.
#[derive(Args, Clone)]
pub struct EscalateArgs {
    /// The teacher's endpoint (`http://host:port`): turns go there as the policy says, answered through
    /// `/v1/chat/completions` (streamed). Unreachable, slow, failing or malformed: the local model answers.
    #[arg(long, value_name = "URL")]
    pub escalate_to: Option<String>,
    /// `model` of the requests to the teacher.
    #[arg(long, default_value = "teacher")]
    pub escalate_model: String,
    /// Bearer token for the teacher (or SPRIG_ESCALATE_KEY).
    #[arg(long)]
    pub escalate_key: Option<String>,
    /// never, threshold (the local model's mean entropy over its first reply tokens above --escalate-threshold)
    /// or always.
    #[arg(long, default_value = "threshold")]
    pub escalate_policy: String,
    /// Mean entropy (nats) above which a turn escalates.
    #[arg(long, default_value_t = sprig_engine::escalate::DEFAULT_THRESHOLD)]
    pub escalate_threshold: f32,
    /// Reply tokens whose mean entropy is the signal (held back until it is known).
    #[arg(long, default_value_t = sprig_engine::escalate::DEFAULT_WINDOW)]
    pub escalate_window: usize,
    /// Seconds a teacher's answer may take before the local model answers instead.
    #[arg(long, default_value_t = 30)]
    pub escalate_timeout: u64,
}

impl EscalateArgs {
    /// The escalation and its teacher, when --escalate-to is given.
    pub fn escalation(&self) -> Result<Option<(sprig_engine::escalate::Escalation, sprig_remote::Endpoint)>> {
        let Some(url) = &self.escalate_to else { return Ok(None) };
        let key = self.escalate_key.clone().or_else(|| std::env::var("SPRIG_ESCALATE_KEY").ok().filter(|k| !k.is_empty()));
        let timeout = std::time::Duration::from_secs(self.escalate_timeout);
        let (e, ep) = sprig_remote::escalation(url, &self.escalate_model, key, &self.escalate_policy, self.escalate_threshold, self.escalate_window, timeout)
            .map_err(|e| anyhow::anyhow!("--escalate-*: {e}"))?;
        Ok(Some((e, ep)))
    }
}
