use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use sprig_backend::Backend;
use sprig_engine::{
    open_model_file, registry, with_engine, AnyEngine, ChatMessage, DeviceChoice, Engine, LoadOptions, Sampler,
    SamplingParams, Session,
};
use sprig_format::ModelFile;
use sprig_import::QuantChoice;

#[derive(Parser)]
#[command(name = "sprig", version, about = "Run small distilled language models fast and offline")]
pub struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streaming it to stdout.
    Run(RunArgs),
    /// Chat interactively (or with turns piped on stdin) using the model's chat template.
    Chat(ChatArgs),
    /// Convert a llama2.c .bin, a .gguf or a Hugging Face directory into a native .safetensors model.
    Convert(ConvertArgs),
    /// Show a model's architecture, tensors and metadata.
    Inspect(InspectArgs),
    /// Evaluate a model.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Fetch a known model (see `sprig models`), verify its sha256, convert and cache it; prints its path.
    Pull { name: Option<String> },
    /// List the known models.
    Models,
    /// Measure prompt processing and generation speed (llama-bench style), peak RSS and the bandwidth roofline.
    Bench(BenchArgs),
    /// Write a small synthetic checkpoint (random weights) as a Hugging Face directory or a GGUF file.
    Gen(GenArgs),
    /// List the devices models can run on: the CPU and the GPU adapters the GPU backend reaches.
    Devices,
}

#[derive(Args)]
struct BenchArgs {
    /// Model (as for `run`); omit with --bandwidth to only measure the machine.
    #[arg(short = 'm', long = "model")]
    model: Option<PathBuf>,
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Prompt tokens to process in one batch.
    #[arg(short = 'p', long = "n-prompt", default_value_t = 128)]
    prompt: usize,
    /// Tokens to generate one at a time.
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    gen: usize,
    #[arg(short = 't', long, default_value_t = 0)]
    threads: usize,
    /// cpu | gpu | auto (auto: a hardware GPU when present and the build has the GPU backend, else the CPU).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Repetitions.
    #[arg(short = 'r', long = "repetitions", default_value_t = 5)]
    reps: usize,
    /// First time every candidate CPU kernel on this model (decode and prefill, 1 and all threads), print the
    /// timings and the pick, and refresh the cached pick.
    #[arg(long)]
    kernels: bool,
    /// Also measure read bandwidth and report the fraction of the roofline decode reaches.
    #[arg(long)]
    bandwidth: bool,
    /// Precision for sources converted on the fly (keep|q4|q4a|q8|f16).
    #[arg(long, default_value = "keep")]
    quant: String,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct GenArgs {
    /// llama | qwen2 | qwen2moe | qwen3moe | olmoe (llama with --experts: Mixtral-style)
    #[arg(long, default_value = "llama")]
    arch: String,
    /// hf | gguf
    #[arg(long, default_value = "hf")]
    format: String,
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
    /// Mixture-of-Experts FFNs with this many experts (required for the MoE archs).
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
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// Model: a known model name (see `sprig models`), a native .safetensors, .gguf, llama2.c .bin, or a
    /// Hugging Face directory.
    #[arg(short = 'm', long = "model", default_value = "smollm2-135m-instruct")]
    model: PathBuf,
    /// Tokenizer for llama2.c checkpoints (tokenizer.bin).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// CPU threads (default: physical cores).
    #[arg(short = 't', long, default_value_t = 0)]
    threads: usize,
    /// cpu | gpu | auto (auto: a hardware GPU when present and the build has the GPU backend, else the CPU).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Context length (default: the model's).
    #[arg(short = 'c', long = "ctx-size", default_value_t = 0)]
    ctx_size: usize,
    /// Precision for sources converted on the fly (keep|q4|q4a|q8|f16).
    #[arg(long, default_value = "keep")]
    quant: String,
    /// Say how the model was set up: the CPU kernels picked per shape class and why.
    #[arg(short = 'v', long)]
    verbose: bool,
}

#[derive(Args)]
struct SamplingArgs {
    /// Temperature; 0 = greedy.
    #[arg(long = "temp", default_value_t = 0.0, allow_negative_numbers = true)]
    temp: f32,
    #[arg(long = "top-k", default_value_t = 40)]
    top_k: usize,
    #[arg(long = "top-p", default_value_t = 0.95, allow_negative_numbers = true)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl SamplingArgs {
    fn params(&self) -> SamplingParams {
        SamplingParams { temperature: self.temp, top_k: self.top_k, top_p: self.top_p, seed: self.seed }
    }
}

#[derive(Args)]
struct RunArgs {
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

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// System prompt (default: the template's own).
    #[arg(long)]
    system: Option<String>,
    /// Most tokens per reply.
    #[arg(short = 'n', long = "n-predict", default_value_t = 512)]
    n: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args)]
struct ConvertArgs {
    /// Source: llama2.c .bin, .gguf, or Hugging Face directory.
    input: PathBuf,
    #[arg(short = 'o', long)]
    output: PathBuf,
    /// auto | keep | q4 | q4a | q8 | f16 | q4-absmax. auto: a quantized GGUF keeps its precision (re-quantizing
    /// it is an explicit choice); float sources (HF, llama2.c, f32/f16 GGUF) become q4.
    #[arg(long, default_value = "auto")]
    quant: String,
    /// llama2.c tokenizer.bin.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Calibration text: run the unquantized model over it and weight the quantizer's error by each input
    /// feature's activation energy (activation-aware quantization).
    #[arg(long)]
    calibrate: Option<PathBuf>,
    /// Chunks of 256 tokens of the calibration text to use.
    #[arg(long, default_value_t = 16)]
    calibrate_chunks: usize,
    /// Device the calibration runs on: cpu | gpu | auto.
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
struct InspectArgs {
    file: PathBuf,
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Also print KV-cache bytes per layer kind at this context length.
    #[arg(long)]
    kv: Option<usize>,
}

#[derive(Subcommand)]
enum EvalCommand {
    /// Perplexity on a text file (llama.cpp llama-perplexity protocol), optionally KL against a teacher.
    Perplexity(PerplexityArgs),
}

#[derive(Args)]
struct PerplexityArgs {
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

pub fn dispatch(cli: Cli) -> Result<()> {
    match cli.cmd {
        Command::Run(a) => run(a),
        Command::Chat(a) => chat(a),
        Command::Convert(a) => convert(a),
        Command::Inspect(a) => inspect(a),
        Command::Eval(EvalCommand::Perplexity(a)) => perplexity(a),
        Command::Pull { name } => {
            let e = match name {
                Some(n) => registry::find(&n).with_context(|| format!("unknown model `{n}` (see `sprig models`)"))?,
                None => registry::default_model(),
            };
            let p = registry::pull(&e, &mut |s| eprintln!("sprig: {s}"))?;
            println!("{}", p.display());
            Ok(())
        }
        Command::Bench(a) => {
            let threads = if a.threads == 0 { sprig_backend::cpu::physical_cores() } else { a.threads };
            let Some(model) = a.model.clone() else {
                if a.bandwidth {
                    crate::bench::bandwidth_only(threads, a.json);
                    return Ok(());
                }
                bail!("bench needs -m MODEL (or --bandwidth alone)");
            };
            let m = ModelArgs {
                model: model.clone(),
                tokenizer: a.tokenizer.clone(),
                threads,
                device: a.device.clone(),
                ctx_size: 0,
                quant: a.quant.clone(),
                verbose: false,
            };
            if a.kernels {
                // Measured afresh (the cache is rewritten), then the model runs with the pick.
                let file = open(&m)?;
                let mut b = sprig_backend::cpu::CpuBackend::new(threads)?;
                let cache = sprig_engine::registry::cache_dir();
                sprig_engine::kernel_cache::choose(&mut b, &file, Some(&cache), true, &mut |s| eprintln!("sprig: {s}"));
                for line in sprig_engine::kernel_cache::describe(b.kernel_selection()) {
                    println!("{line}");
                }
            }
            let e = engine(&m)?;
            let name = model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let o = crate::bench::BenchOptions {
                prompt: a.prompt,
                gen: a.gen,
                reps: a.reps,
                bandwidth: a.bandwidth,
                json: a.json,
                model_name: name,
                threads,
            };
            with_engine!(&e, |e| crate::bench::run(&**e, &o))
        }
        Command::Devices => {
            let isas: Vec<&str> = sprig_quant::kernels::Isa::available().iter().map(|i| i.name()).collect();
            let forced = std::env::var("SPRIG_CPU").ok().filter(|s| !s.is_empty());
            println!(
                "cpu: {}, {} physical cores, kernels: {} ({})",
                sprig_engine::kernel_cache::cpu_model(),
                sprig_backend::cpu::physical_cores(),
                isas.join(", "),
                match forced {
                    Some(f) => format!("forced by SPRIG_CPU={f}"),
                    None => "chosen per model by measurement at first load".into(),
                }
            );
            if !sprig_engine::device::GPU_BACKEND {
                println!("gpu: this build has no GPU backend (rebuild with `--features wgpu`)");
                return Ok(());
            }
            let adapters = sprig_engine::device::gpu_adapters();
            if adapters.is_empty() {
                println!("gpu: no adapter found (no GPU driver; `apt-get install mesa-vulkan-drivers` adds lavapipe)");
            }
            for (i, a) in adapters.iter().enumerate() {
                println!("gpu {i}: {} ({}, {}; driver {})", a.name, a.backend, a.device_type, a.driver);
            }
            Ok(())
        }
        Command::Gen(a) => {
            use sprig_import::synth::{write_gguf, write_hf_dir, HfDtype, SynthMoe, SynthSpec};
            let moe_arch = ["qwen2moe", "qwen3moe", "olmoe"].contains(&a.arch.as_str());
            if !["llama", "qwen2"].contains(&a.arch.as_str()) && !moe_arch {
                bail!("--arch must be llama, qwen2, qwen2moe, qwen3moe or olmoe");
            }
            if moe_arch && a.experts.is_none() {
                bail!("--arch {} needs --experts", a.arch);
            }
            let moe = match a.experts {
                Some(n) => {
                    if n == 0 || a.top_k == 0 || a.top_k > n {
                        bail!("--top-k must be in 1..=--experts");
                    }
                    let eh = a.expert_hidden.unwrap_or(a.hidden);
                    if a.arch == "llama" && eh != a.hidden {
                        bail!("Mixtral-style (llama) experts have --hidden units; drop --expert-hidden");
                    }
                    if a.shared_hidden.is_some() && a.arch == "llama" {
                        bail!("--shared-hidden needs a Qwen-MoE / OLMoE arch");
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
            let spec = SynthSpec {
                arch: a.arch,
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
            };
            if a.vocab.is_some_and(|v| !(267..=1 << 20).contains(&v)) {
                bail!("--vocab must be in 267..=1048576");
            }
            if spec.n_heads == 0
                || !spec.dim.is_multiple_of(spec.n_heads)
                || spec.n_kv_heads == 0
                || !spec.n_heads.is_multiple_of(spec.n_kv_heads)
            {
                bail!("--dim must be a multiple of --heads, and --heads a multiple of --kv-heads");
            }
            match a.format.as_str() {
                "hf" => write_hf_dir(&spec, &a.output, HfDtype::F32, 1)?,
                "gguf" => write_gguf(&spec, &a.output)?,
                f => bail!("--format must be hf or gguf, not `{f}`"),
            }
            eprintln!("sprig: wrote {}", a.output.display());
            Ok(())
        }
        Command::Models => {
            for e in registry::entries() {
                let d = if e.default { " (default)" } else { "" };
                println!(
                    "{}{d}\n  {}\n  licence: {}; source: PyPI {}; sha256 {}",
                    e.name,
                    e.description,
                    e.licence,
                    e.pypi.join(" + "),
                    e.sha256
                );
            }
            Ok(())
        }
    }
}

fn parse_quant(s: &str) -> Result<QuantChoice> {
    QuantChoice::parse(s).with_context(|| format!("unknown --quant `{s}` (keep, q4, q4a, q8, f16)"))
}

fn open(m: &ModelArgs) -> Result<Arc<ModelFile>> {
    let opts = LoadOptions { tokenizer: m.tokenizer.clone(), quant: parse_quant(&m.quant)? };
    let path = registry::resolve(&m.model, &mut |s| eprintln!("sprig: {s}"))?;
    open_model_file(&path, &opts).with_context(|| format!("loading {}", m.model.display()))
}

fn parse_device(s: &str) -> Result<DeviceChoice> {
    DeviceChoice::parse(s).with_context(|| format!("unknown --device `{s}` (cpu, gpu, auto)"))
}

fn engine(m: &ModelArgs) -> Result<AnyEngine> {
    let device = parse_device(&m.device)?;
    let file = open(m)?;
    let e = AnyEngine::new(file, device, m.threads, &mut |s| eprintln!("sprig: {s}"))?;
    if m.verbose {
        match &e {
            AnyEngine::Cpu(c) => {
                for line in sprig_engine::kernel_cache::describe(c.model.backend.kernel_selection()) {
                    eprintln!("sprig: {line}");
                }
            }
            #[allow(unreachable_patterns)]
            _ => eprintln!("sprig: {}", e.backend_name()),
        }
    }
    Ok(e)
}

fn run(a: RunArgs) -> Result<()> {
    let e = engine(&a.model)?;
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

fn chat(a: ChatArgs) -> Result<()> {
    let e = engine(&a.model)?;
    with_engine!(&e, |e| chat_on(e.clone(), &a))
}

fn chat_on<B: Backend>(e: Arc<Engine<B>>, a: &ChatArgs) -> Result<()> {
    if e.template.is_none() {
        bail!("{} carries no chat template; use `sprig run`", a.model.model.display());
    }
    let params = a.sampling.params();
    Sampler::new(params.clone())?;
    let mut messages: Vec<ChatMessage> = a.system.iter().map(|s| ChatMessage::new("system", s)).collect();
    let interactive = std::io::stdin().is_terminal();
    let mut session = Session::new(e, a.model.ctx_size)?;
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            eprint!("> ");
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("reading stdin (is it valid UTF-8?)")?;
        if line.trim().is_empty() {
            continue;
        }
        messages.push(ChatMessage::new("user", &line));
        let mut reply = String::new();
        let mut out = std::io::stdout().lock();
        session.chat(&messages, &params, a.n, |s| {
            reply.push_str(s);
            let _ = out.write_all(s.as_bytes());
            let _ = out.flush();
            true
        })?;
        writeln!(out)?;
        messages.push(ChatMessage::new("assistant", reply.trim()));
    }
    Ok(())
}

/// `--quant auto` of convert: keep a GGUF whose weights are already quantized, else q4.
fn auto_quant(input: &std::path::Path) -> QuantChoice {
    use sprig_quant::ggml::GgmlType;
    let quantized = input.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        && sprig_import::gguf::GgufFile::open(input)
            .is_ok_and(|g| g.tensors.iter().any(|t| !matches!(t.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)));
    if quantized {
        QuantChoice::Keep
    } else {
        QuantChoice::Q4
    }
}

fn convert(a: ConvertArgs) -> Result<()> {
    let quant = if a.quant == "auto" { auto_quant(&a.input) } else { parse_quant(&a.quant)? };
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} tensors").unwrap().progress_chars("=> "),
    );
    let importance = match &a.calibrate {
        Some(text_path) => {
            let text =
                std::fs::read_to_string(text_path).with_context(|| format!("reading {}", text_path.display()))?;
            eprintln!("sprig: calibrating on {}", text_path.display());
            let reference = sprig_import::import(&a.input, a.tokenizer.as_deref(), QuantChoice::Keep, &mut |_, _| {})?;
            let file = Arc::new(ModelFile::from_bytes(&reference.writer.to_bytes())?);
            let e = AnyEngine::new(file, parse_device(&a.device)?, 0, &mut |s| eprintln!("sprig: {s}"))?;
            Some(with_engine!(&e, |e| sprig_engine::calibrate::calibrate(&**e, &text, 256, a.calibrate_chunks))?)
        }
        None => None,
    };
    bar.set_message(format!("converting {}", a.input.display()));
    let opts = sprig_import::ImportOptions { quant, importance: importance.as_ref() };
    let imported = sprig_import::import_with(&a.input, a.tokenizer.as_deref(), &opts, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })
    .with_context(|| format!("converting {}", a.input.display()))?;
    bar.finish_and_clear();
    for l in &imported.losses {
        eprintln!("sprig: {} {} -> {}: relative RMS error {:.2e}", l.name, l.from, l.to, l.rel_rms_error);
    }
    if !imported.losses.is_empty() {
        let worst = imported.losses.iter().map(|l| l.rel_rms_error).fold(0.0, f64::max);
        eprintln!(
            "sprig: {} tensors were not carried over exactly (worst relative RMS error {:.2e})",
            imported.losses.len(),
            worst
        );
    }
    imported.writer.write(&a.output)?;
    // Re-open to validate what was written.
    let f = ModelFile::open(&a.output)?;
    eprintln!(
        "sprig: wrote {} ({:.1} MB, {:.2} bits per weight)",
        a.output.display(),
        f.file_bytes() as f64 / 1e6,
        f.bits_per_weight()
    );
    Ok(())
}

fn inspect(a: InspectArgs) -> Result<()> {
    let path = registry::resolve(&a.file, &mut |s| eprintln!("sprig: {s}"))?;
    let f = open_model_file(&path, &LoadOptions { tokenizer: a.tokenizer.clone(), quant: QuantChoice::Keep })?;
    let c = &f.config;
    println!("architecture: {}", c.arch);
    println!("config: {}", serde_json::to_string(c)?);
    println!("file bytes: {}", f.file_bytes());
    println!("bits per weight: {:.3}", f.bits_per_weight());
    println!("\n{:<40} {:>6} {:>16} {:>12}", "tensor", "type", "shape", "bytes");
    let mut total = 0;
    for (name, e) in f.entries() {
        println!("{:<40} {:>6} {:>16} {:>12}", name, e.type_name(), format!("{:?}", e.shape()), e.bytes());
        total += e.bytes();
    }
    println!("{:<40} {:>6} {:>16} {:>12}", "total", "", "", total);
    println!("\nmetadata:");
    for (k, v) in &f.metadata {
        let shown: String = if v.len() > 120 {
            format!("{}... ({} bytes)", &v[..v.floor_char_boundary(120)], v.len())
        } else {
            v.clone()
        };
        println!("  {k}: {}", shown.replace('\n', "\\n"));
    }
    if let Some(ctx) = a.kv {
        let layout = sprig_backend::KvLayout::for_model(c, ctx);
        let per = layout.bytes_per_layer(ctx);
        let global_all = 2 * 4 * layout.kv_dim * ctx * c.n_layers;
        println!("\nKV cache at {ctx} tokens (f32):");
        let (mut g, mut s, mut ng, mut ns) = (0, 0, 0, 0);
        for (l, b) in per.iter().enumerate() {
            if layout.windows[l].is_some() {
                s += b;
                ns += 1
            } else {
                g += b;
                ng += 1
            }
        }
        println!("  global layers: {ng}, {g} bytes");
        println!("  sliding-window layers: {ns}, {s} bytes");
        println!(
            "  total: {} bytes ({:.3} of an all-global model's {global_all})",
            g + s,
            (g + s) as f64 / global_all as f64
        );
    }
    Ok(())
}

fn perplexity(a: PerplexityArgs) -> Result<()> {
    let text = std::fs::read(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let text = String::from_utf8(text).with_context(|| format!("{} is not valid UTF-8", a.file.display()))?;
    let student = engine(&a.model)?;
    let teacher = match &a.teacher {
        Some(t) => Some(engine(&ModelArgs { model: t.clone(), ..a.model.clone() })?),
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
