//! `sprig run`: generate from a prompt.

use std::io::Write;

use anyhow::Result;
use clap::Args;
use sprig_backend::Backend;
use sprig_engine::generate::{GenerationStats, StopReason};
use sprig_engine::{with_engine, ChatMessage, Engine, Sampler, Session};
use sprig_format::ModelFile;

use crate::args::{spec_line, EscalateArgs, ModelArgs, SamplingArgs, SpecArgs, ToolArgs};

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
    /// With --tools, the prompt is one user turn through the chat template and the reply's tool calls are
    /// printed after it as a JSON array (`tool_calls: [...]`).
    #[command(flatten)]
    tools: ToolArgs,
    #[command(flatten)]
    spec: SpecArgs,
    /// With --escalate-to, the prompt is one user turn through the chat template, answered locally or by the
    /// teacher as the escalation policy decides.
    #[command(flatten)]
    escalate: EscalateArgs,
}

pub fn run(a: RunArgs) -> Result<()> {
    let e = a.model.engine()?;
    with_engine!(&e, |e| run_on(e.clone(), &a))
}

fn run_on<B: Backend>(e: std::sync::Arc<Engine<B>>, a: &RunArgs) -> Result<()> {
    let params = a.sampling.params()?;
    if let Some((escalation, teacher)) = a.escalate.escalation()? {
        if a.tools.tools()?.is_some() || params.constraint.is_some() {
            anyhow::bail!("--escalate-to answers plain chat turns: not with tools or a constraint");
        }
        if e.template.is_none() {
            anyhow::bail!("--escalate-to sends a chat turn: this model carries no chat template");
        }
        let mut session = Session::new(e.clone(), a.model.load.ctx_size)?;
        let mut out = std::io::stdout().lock();
        let msgs = [ChatMessage::new("user", &a.prompt)];
        let (stats, _) = super::escalation::answer_turn(&mut session, &escalation, &teacher, &msgs, &params, a.n, &mut |s| {
            let _ = out.write_all(s.as_bytes());
            let _ = out.flush();
            true
        })?;
        writeln!(out)?;
        if let Some(stats) = stats {
            report(&e, &stats, session.state.max_context);
        }
        return Ok(());
    }
    if let Some(tools) = a.tools.tools()? {
        // One user turn offering the tools; the reply streams, then its calls.
        let mut session = Session::new(e.clone(), a.model.load.ctx_size)?;
        session.set_speculation(a.spec.speculation(&e, &a.model.load, a.model.load.ctx_size)?);
        let mut out = std::io::stdout().lock();
        let msgs = [ChatMessage::new("user", &a.prompt)];
        let stats = session.chat_with_tools(&msgs, Some(&tools), &params, a.n, |s| {
            let _ = out.write_all(s.as_bytes());
            let _ = out.flush();
            true
        })?;
        writeln!(out)?;
        let calls: Vec<serde_json::Value> = stats.tool_calls.iter().map(|c| c.to_openai()).collect();
        writeln!(out, "tool_calls: {}", serde_json::Value::from(calls))?;
        report(&e, &stats, session.state.max_context);
        return Ok(());
    }
    let mut sampler = Sampler::new(params)?;
    let add_bos = e.tokenizer.special().add_bos;
    let prompt = e.tokenizer.encode_parts(&[(&a.prompt, a.special)], add_bos)?;
    let mut st = e.model.new_state(a.model.load.ctx_size)?;
    let mut spec = a.spec.speculation(&e, &a.model.load, a.model.load.ctx_size)?;
    let mut out = std::io::stdout().lock();
    let stats = e.generate_speculative(&mut st, &prompt, a.n, &mut sampler, true, spec.as_mut(), |s| {
        let _ = out.write_all(s.as_bytes());
        let _ = out.flush();
        true
    })?;
    writeln!(out)?;
    report(&e, &stats, st.max_context);
    if a.stats {
        print_expert_stats(&e.model.file, &e.model.moe_usage(&st)?, st.pos);
    }
    Ok(())
}

/// The speeds on stderr, and why generation stopped when that is not the model's choice or the length.
fn report<B: Backend>(e: &Engine<B>, stats: &GenerationStats, ctx: usize) {
    match stats.stop {
        StopReason::ContextFull => eprintln!("sprig: stopped: the context of {ctx} tokens is full (raise it with -c)"),
        StopReason::ConstraintUnsatisfied => eprintln!(
            "sprig: stopped before the output matched the constraint (raise -n): the output above is incomplete"
        ),
        _ => {}
    }
    eprintln!(
        "sprig: {} prompt tokens at {:.1} tok/s, {} generated at {:.1} tok/s ({})",
        stats.prompt_tokens,
        stats.prefill_tok_s(),
        stats.generated.len(),
        stats.decode_tok_s(),
        e.model.backend.name()
    );
    if let Some(s) = &stats.speculation {
        eprintln!("sprig: {}", spec_line(s));
    }
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

