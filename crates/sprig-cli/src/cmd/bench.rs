//! `sprig bench`: prompt processing and generation throughput in the style of llama-bench, peak RSS, and the
//! fraction of the memory-bandwidth roofline decode reaches.

use std::time::Instant;

use anyhow::Result;
use clap::Args;
use sprig_backend::Backend;
use sprig_engine::{with_engine, Engine};
use sprig_models::Logits;

use crate::args::{LoadArgs, ModelArgs};

#[derive(Args)]
pub struct BenchArgs {
    /// The model (as for `run`; omit it with --bandwidth to only measure the machine), threads, device.
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt tokens to process in one batch.
    #[arg(short = 'p', long = "n-prompt", default_value_t = 128)]
    prompt: usize,
    /// Tokens to generate one at a time.
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    gen: usize,
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
    #[arg(long)]
    json: bool,
    /// Instead: run an agent trace (a JSON file: `system`, `sessions` of user turns, e.g.
    /// tests/data/agent-trace.json) through the prefix cache, every request a fresh session; report per turn
    /// the hit rate and the time to first token with and without the cache (-n: tokens per reply).
    #[arg(long, value_name = "FILE")]
    agent_trace: Option<std::path::PathBuf>,
    /// Instead: decode throughput of concurrent sessions stepping as one batch, for each count given
    /// (e.g. 1,2,4,8): aggregate tokens/s over -n tokens per session, median of -r runs.
    #[arg(long, value_name = "N,N,...", value_delimiter = ',')]
    sessions: Vec<usize>,
    /// Instead: decode speed with a JSON-schema constraint vs without, per schema of FILE (`schemas` and
    /// `prompts`, e.g. tests/data/structured/schemas.json): -r prompts each, -n tokens per reply.
    #[arg(long, value_name = "FILE")]
    structured: Option<std::path::PathBuf>,
    /// Instead: speculative decoding against plain decoding over the prompts of FILE (a JSON array of raw
    /// prompts, e.g. tests/data/spec/code-completion.json), with --draft, --lookup or --mtp: greedy, -n tokens each;
    /// decode tokens/s of both, acceptance, and whether the outputs are identical.
    #[arg(long, value_name = "FILE")]
    spec_prompts: Option<std::path::PathBuf>,
    #[command(flatten)]
    spec: crate::args::SpecArgs,
    /// Instead: tool-calling accuracy over the requests of FILE (e.g. tests/data/tools/car-requests.json),
    /// constrained and unconstrained, offering the tools of --tool-defs.
    #[arg(long, value_name = "FILE", requires = "tool_defs")]
    tools: Option<std::path::PathBuf>,
    /// The tools (OpenAI's JSON array) for --tools.
    #[arg(long, value_name = "FILE.json")]
    tool_defs: Option<std::path::PathBuf>,
    /// The tool choice of every --tools request: auto, required (a call, any tool).
    #[arg(long, default_value = "auto", requires = "tools")]
    tool_choice: String,
}


pub fn run(a: BenchArgs) -> Result<()> {
    let threads = a.model.threads();
    if a.model.model.is_none() && a.bandwidth {
        bandwidth_only(threads, a.json);
        return Ok(());
    }
    if a.kernels {
        // Measured afresh (the cache is rewritten), then the model runs with the pick.
        let file = a.model.open()?;
        for line in sprig_engine::device::remeasure_kernels(&file, threads, &mut |s| eprintln!("sprig: {s}"))? {
            println!("{line}");
        }
    }
    let e = ModelArgs { load: LoadArgs { threads, ..a.model.load.clone() }, ..a.model.clone() }.engine()?;
    if let Some(path) = &a.agent_trace {
        let o = super::agent_trace::TraceOptions { path: path.clone(), ctx: a.model.load.ctx_size, reply: a.gen, json: a.json };
        return with_engine!(&e, |e| super::agent_trace::run(e, &o));
    }
    if let Some(path) = &a.spec_prompts {
        let load = LoadArgs { threads, ..a.model.load.clone() };
        return with_engine!(&e, |e| super::structured_bench::speculative(e, path, &a.spec, &load, a.gen, a.json));
    }
    if let Some(path) = &a.structured {
        return with_engine!(&e, |e| super::structured_bench::schema_overhead(e, path, a.reps, a.gen, a.json));
    }
    if let (Some(fixture), Some(defs)) = (&a.tools, &a.tool_defs) {
        return with_engine!(&e, |e| super::structured_bench::tool_accuracy(e, fixture, defs, &a.tool_choice, a.json));
    }
    if !a.sessions.is_empty() {
        return with_engine!(&e, |e| super::agent_trace::batched_scaling(e, &a.sessions, a.gen, a.reps, a.json));
    }
    let model = a.model.model();
    let name = model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let o = BenchOptions {
        prompt: a.prompt,
        gen: a.gen,
        reps: a.reps,
        bandwidth: a.bandwidth,
        json: a.json,
        model_name: name,
        threads,
    };
    with_engine!(&e, |e| bench(&**e, &o))
}

pub struct BenchOptions {
    pub prompt: usize,
    pub gen: usize,
    pub reps: usize,
    pub bandwidth: bool,
    pub json: bool,
    pub model_name: String,
    /// CPU threads (reported; the GPU backend ignores them).
    pub threads: usize,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

/// Peak resident set size of this process (Linux `VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Read bandwidth in bytes/s: `threads` workers each sum their share of a 512 MiB buffer, best of 5.
pub fn measure_bandwidth(threads: usize) -> f64 {
    let n = 512 << 20;
    let buf: Vec<u64> = (0..n / 8).map(|i| i as u64).collect();
    let chunk = buf.len().div_ceil(threads);
    let mut best = 0.0f64;
    for _ in 0..5 {
        let t0 = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let hs: Vec<_> =
                buf.chunks(chunk).map(|c| s.spawn(move || c.iter().fold(0u64, |a, &x| a.wrapping_add(x)))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).fold(0u64, u64::wrapping_add)
        });
        std::hint::black_box(total);
        best = best.max(n as f64 / t0.elapsed().as_secs_f64());
    }
    best
}

/// Weight bytes one decode step reads: every matrix except the embedding table (one row of it), plus the
/// output projection, which is the embedding table again when tied. Stacked MoE experts count with the share
/// the router sent tokens to: `routed_expert_bytes` measured over the timed decode when given, else
/// `top_k / n_experts` of them.
fn bytes_per_token<B: Backend>(e: &Engine<B>, routed_expert_bytes: Option<f64>) -> f64 {
    let f = &e.model.file;
    let mut bytes = 0usize;
    let mut experts = 0usize;
    for (name, entry) in f.entries() {
        if name.contains("_exps.") {
            experts += entry.bytes();
        } else if name == "token_embd.weight" {
            let rows = entry.shape()[0].max(1);
            bytes += entry.bytes() / rows;
            if f.config.tied_embeddings {
                bytes += entry.bytes();
            }
        } else {
            bytes += entry.bytes();
        }
    }
    let routed = routed_expert_bytes.unwrap_or_else(|| match &f.config.moe {
        Some(m) => experts as f64 * m.top_k as f64 / m.n_experts as f64,
        None => 0.0,
    });
    bytes as f64 + routed
}

pub fn bench<B: Backend>(e: &Engine<B>, o: &BenchOptions) -> Result<()> {
    let vocab = e.model.config.vocab_size as u32;
    // Deterministic pseudo-random tokens, as llama-bench uses random tokens.
    let tokens: Vec<u32> =
        (0..o.prompt.max(o.gen).max(1) as u32).map(|i| (i.wrapping_mul(2654435761) >> 7) % vocab).collect();
    let ctx = o.prompt + o.gen + 1;
    // Warm-up: page the weights in and spin the pool up. Its state is dropped before the timed runs, so the
    // peak RSS counts one KV cache, as a real generation holds.
    {
        let mut st = e.model.new_state(ctx)?;
        e.model.forward(&mut st, &tokens[..o.prompt.clamp(1, 8)], Logits::Last)?;
    }
    let (mut pp, mut tg) = (Vec::new(), Vec::new());
    // Every timed forward pass ends with the logits on the host, as sampling needs them (and a GPU backend
    // runs asynchronously until then).
    let mut logits = Vec::new();
    // Expert bytes the router made each decoded token read (MoE models), from the last timed decode.
    let mut routed = None;
    for _ in 0..o.reps.max(1) {
        if o.prompt > 0 {
            let mut st = e.model.new_state(ctx)?;
            let t0 = Instant::now();
            e.model.forward(&mut st, &tokens[..o.prompt], Logits::Last)?;
            e.model.read_logits(&st, &mut logits)?;
            pp.push(o.prompt as f64 / t0.elapsed().as_secs_f64());
        }
        if o.gen > 0 {
            let mut st = e.model.new_state(ctx)?;
            let t0 = Instant::now();
            for &t in &tokens[..o.gen] {
                e.model.forward(&mut st, &[t], Logits::Last)?;
                e.model.read_logits(&st, &mut logits)?;
            }
            tg.push(o.gen as f64 / t0.elapsed().as_secs_f64());
            let usage = e.model.moe_usage(&st)?;
            let read: u64 = usage.iter().flatten().map(|u| u.bytes_read).sum();
            if usage.iter().any(|u| u.is_some()) {
                routed = Some(read as f64 / o.gen as f64);
            }
        }
    }
    let best = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let (pp_best, tg_best) = (best(&pp), best(&tg));
    let (pp_med, tg_med) = (median(&mut pp), median(&mut tg));
    let threads = o.threads;
    // Peak RSS of the model's own runs, read before the bandwidth probe allocates its 512 MiB.
    let rss = peak_rss_bytes();
    let bw = o.bandwidth.then(|| measure_bandwidth(threads));
    let bpt = bytes_per_token(e, routed);
    let roofline = bw.map(|b| bpt * tg_med / b);
    if o.json {
        println!(
            "{}",
            serde_json::json!({
                "model": o.model_name, "backend": e.model.backend.name(), "threads": threads,
                "n_prompt": o.prompt, "n_gen": o.gen, "reps": o.reps,
                "pp_tok_s": pp_med, "pp_tok_s_best": pp_best, "tg_tok_s": tg_med, "tg_tok_s_best": tg_best,
                "peak_rss_bytes": rss, "weight_bytes_per_token": bpt,
                "bandwidth_bytes_s": bw, "roofline_fraction": roofline,
            })
        );
    } else {
        println!("| model | backend | threads | test | t/s (median) | t/s (best) |");
        println!("|---|---|---|---|---|---|");
        let backend = e.model.backend.name();
        for (test, n, med, best) in [("pp", o.prompt, pp_med, pp_best), ("tg", o.gen, tg_med, tg_best)] {
            if n > 0 {
                println!("| {} | {backend} | {threads} | {test}{n} | {med:.2} | {best:.2} |", o.model_name);
            }
        }
        if let Some(r) = rss {
            println!("\npeak RSS: {:.1} MB", r as f64 / 1e6);
        }
        println!("weights read per decoded token: {:.1} MB", bpt / 1e6);
        if let (Some(b), Some(r)) = (bw, roofline) {
            println!(
                "read bandwidth ({threads} threads): {:.1} GB/s; decode reaches {:.0} % of that roofline",
                b / 1e9,
                r * 100.0
            );
        }
    }
    Ok(())
}

/// `sprig bench --bandwidth` without a model.
pub fn bandwidth_only(threads: usize, json: bool) {
    let b = measure_bandwidth(threads);
    if json {
        println!("{}", serde_json::json!({ "threads": threads, "bandwidth_bytes_s": b }));
    } else {
        println!("read bandwidth ({threads} threads): {:.1} GB/s", b / 1e9);
    }
}
