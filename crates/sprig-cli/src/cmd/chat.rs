//! `sprig chat`: a conversation through the model's chat template.

use std::io::{BufRead, IsTerminal, Write};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use sprig_backend::Backend;
use sprig_engine::{with_engine, ChatMessage, Engine, Sampler, Session};

use crate::args::{ContextPolicyArg, EscalateArgs, ModelArgs, SamplingArgs, ToolArgs};

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// System prompt (default: the template's own).
    #[arg(long)]
    system: Option<String>,
    /// Most tokens per reply.
    #[arg(short = 'n', long = "n-predict", default_value_t = 512)]
    n: usize,
    /// Continue the conversation saved in FILE (if it exists) and save it there after every turn.
    #[arg(long, value_name = "FILE")]
    session: Option<std::path::PathBuf>,
    /// When a turn would overflow the context: truncate-middle keeps the system prompt, drops the oldest
    /// turns and runs the rest again; shift rotates the kept keys instead (cheaper, approximate); error stops.
    #[arg(long, value_enum, default_value = "truncate-middle")]
    context_policy: ContextPolicyArg,
    /// After each reply, print the turn's prompt tokens run and cached (own cache / prefix cache), tokens
    /// dropped by the context policy, speeds, and the prefix cache's totals.
    #[arg(long)]
    stats: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// With --tools, each reply's calls are printed after it (`tool_calls: [...]`, OpenAI's shape); a line
    /// `/tool NAME: RESULT` answers a call with the tool's result, and the assistant's turn continues.
    #[command(flatten)]
    tools: ToolArgs,
    /// With --escalate-to, each turn the local model is unsure of goes to the teacher (one line on stderr per
    /// decision).
    #[command(flatten)]
    escalate: EscalateArgs,
}

pub fn run(a: ChatArgs) -> Result<()> {
    let e = a.model.engine()?;
    with_engine!(&e, |e| chat_on(e.clone(), &a))
}

fn chat_on<B: Backend>(e: Arc<Engine<B>>, a: &ChatArgs) -> Result<()> {
    if e.template.is_none() {
        bail!("{} carries no chat template; use `sprig run`", a.model.model().display());
    }
    let params = a.sampling.params()?;
    Sampler::new(params.clone())?;
    // A bad constraint or tool list is an error now, not at the first turn.
    if let Some(c) = &params.constraint {
        e.guide(c)?;
    }
    let tools = a.tools.tools()?;
    if let Some(t) = tools.as_ref().and_then(|t| t.constraint(e.tool_format())) {
        e.guide(&t)?;
    }
    let escalation = a.escalate.escalation()?;
    if escalation.is_some() && (tools.is_some() || params.constraint.is_some()) {
        bail!("--escalate-to answers plain chat turns: not with tools or a constraint");
    }
    let mut messages: Vec<ChatMessage> = a.system.iter().map(|s| ChatMessage::new("system", s)).collect();
    let interactive = std::io::stdin().is_terminal();
    let mut session = Session::new(e.clone(), a.model.load.ctx_size)?;
    session.set_context_policy(a.context_policy.0, 0);
    if let Some(path) = a.session.as_ref().filter(|p| p.exists()) {
        let t0 = std::time::Instant::now();
        match session.load(path) {
            Ok(()) => {
                messages = session.messages().to_vec();
                eprintln!(
                    "sprig: restored {} tokens, {} messages from {} in {:.0} ms",
                    session.tokens().len(),
                    messages.len(),
                    path.display(),
                    t0.elapsed().as_secs_f64() * 1e3
                );
            }
            Err(err) => eprintln!("sprig: {err}; starting a new conversation"),
        }
    }
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
        match line.strip_prefix("/tool ").and_then(|r| r.split_once(':')) {
            Some((name, result)) if tools.is_some() => {
                let mut m = ChatMessage::new("tool", result.trim());
                m.name = Some(name.trim().to_string());
                messages.push(m);
            }
            _ => messages.push(ChatMessage::new("user", &line)),
        }
        let mut out = std::io::stdout().lock();
        let t0 = std::time::Instant::now();
        let mut first: Option<f64> = None;
        let mut show = |s: &str| {
            if !s.is_empty() && first.is_none() {
                first = Some(t0.elapsed().as_secs_f64());
            }
            let _ = out.write_all(s.as_bytes());
            let _ = out.flush();
            true
        };
        let r = match &escalation {
            None => session.chat_with_tools(&messages, tools.as_ref(), &params, a.n, show)?,
            Some((esc, teacher)) => {
                match super::escalation::answer_turn(&mut session, esc, teacher, &messages, &params, a.n, &mut show)? {
                    (Some(stats), _) => stats,
                    // The teacher answered without the local model running: nothing of its own to report.
                    (None, _) => {
                        writeln!(out)?;
                        messages = session.messages().to_vec();
                        if let Some(path) = &a.session {
                            session.save(path).with_context(|| format!("saving the session to {}", path.display()))?;
                        }
                        continue;
                    }
                }
            }
        };
        writeln!(out)?;
        if tools.is_some() {
            let calls: Vec<serde_json::Value> = r.tool_calls.iter().map(|c| c.to_openai()).collect();
            writeln!(out, "tool_calls: {}", serde_json::Value::from(calls))?;
        }
        if r.stop == sprig_engine::generate::StopReason::ConstraintUnsatisfied {
            eprintln!("sprig: the reply stopped before it matched the constraint (raise -n): it is incomplete");
        }
        if a.stats {
            let all = r.cached_tokens + r.prompt_tokens;
            let pc = e.prefix_cache.stats();
            eprintln!(
                "sprig: prompt {all} tokens: {} run, {} cached ({} from the prefix cache), hit {:.1} %; {} dropped by \
                 the context policy; first token {:.0} ms; {} generated at {:.1} tok/s; prefix cache: {} blocks, \
                 {:.1} MiB, hit {:.1} % over {} requests",
                r.prompt_tokens,
                r.cached_tokens,
                r.prefix_cache_tokens,
                100.0 * r.cached_tokens as f64 / all.max(1) as f64,
                r.context_dropped,
                first.unwrap_or(0.0) * 1e3,
                r.generated.len(),
                r.decode_tok_s(),
                pc.blocks,
                pc.bytes as f64 / (1 << 20) as f64,
                100.0 * pc.hit_rate(),
                pc.requests
            );
        }
        messages = session.messages().to_vec();
        if let Some(path) = &a.session {
            session.save(path).with_context(|| format!("saving the session to {}", path.display()))?;
        }
    }
    Ok(())
}

