//! `sprig bench --agent-trace FILE`: an assistant's traffic through the prefix cache. Sessions of a trace
//! (one system prompt with tool definitions, several users' turns) are interleaved turn by turn; every
//! request is a fresh session, as a stateless server sees it, so what is not run again comes from the prefix
//! cache shared by the engine's sessions. Reports per turn the hit rate and the time to first token, and the
//! same prompts' time to first token with the cache off.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use sprig_backend::Backend;
use sprig_engine::{ChatMessage, Engine, SamplingParams, Session};

/// A trace file: the system prompt and, per session, its user turns.
#[derive(serde::Deserialize)]
struct Trace {
    system: String,
    sessions: Vec<Vec<String>>,
}

pub struct TraceOptions {
    pub path: std::path::PathBuf,
    pub ctx: usize,
    /// Tokens per reply.
    pub reply: usize,
    pub json: bool,
}

struct Request {
    turn: usize,
    session: usize,
    prompt: usize,
    cached: usize,
    ttft_ms: f64,
}

/// Runs `messages` as a fresh session's request: (time to first token in ms, the session after it).
fn ask<B: Backend>(
    e: &Arc<Engine<B>>,
    ctx: usize,
    messages: &[ChatMessage],
    max_new: usize,
) -> Result<(f64, Session<B>, sprig_engine::GenerationStats)> {
    let mut s = Session::new(e.clone(), ctx)?;
    let params = SamplingParams { temperature: 0.0, ..Default::default() };
    let t0 = Instant::now();
    let mut first = None;
    let r = s.chat(messages, &params, max_new, |t| {
        if !t.is_empty() && first.is_none() {
            first = Some(t0.elapsed().as_secs_f64() * 1e3);
        }
        true
    })?;
    Ok((first.unwrap_or(t0.elapsed().as_secs_f64() * 1e3), s, r))
}

pub fn run<B: Backend>(e: &Arc<Engine<B>>, o: &TraceOptions) -> Result<()> {
    let text = std::fs::read_to_string(&o.path).with_context(|| format!("reading {}", o.path.display()))?;
    let trace: Trace = serde_json::from_str(&text).with_context(|| format!("parsing {}", o.path.display()))?;
    let turns = trace.sessions.iter().map(|s| s.len()).max().unwrap_or(0);
    let system = ChatMessage::new("system", &trace.system);
    // The system part of a rendering (templates that fold it into the first user turn included).
    let probe = |u: &str| e.chat_tokens(&[system.clone(), ChatMessage::new("user", u)]);
    let system_tokens = probe("a")?.iter().zip(&probe("b")?).take_while(|(a, b)| a == b).count();
    let mut histories: Vec<Vec<ChatMessage>> = trace.sessions.iter().map(|_| vec![system.clone()]).collect();
    // The prompts as asked, to run again without the cache.
    let mut asked: Vec<Vec<Vec<ChatMessage>>> = trace.sessions.iter().map(|_| Vec::new()).collect();
    let mut rows = Vec::new();
    for turn in 0..turns {
        for (si, session) in trace.sessions.iter().enumerate() {
            let Some(user) = session.get(turn) else { continue };
            let mut messages = histories[si].clone();
            messages.push(ChatMessage::new("user", user));
            let (ttft_ms, s, r) = ask(e, o.ctx, &messages, o.reply)?;
            rows.push(Request {
                turn,
                session: si,
                prompt: r.cached_tokens + r.prompt_tokens,
                cached: r.prefix_cache_tokens,
                ttft_ms,
            });
            asked[si].push(messages);
            histories[si] = s.messages().to_vec();
        }
    }
    let stats = e.prefix_cache.stats();
    // The same prompts without the cache: every session's turns 1, 5, 10, 15 and the last.
    let budget = stats.budget;
    e.prefix_cache.set_budget(0);
    let mut cold = Vec::new();
    for turn in [0, 4, 9, 14, turns.saturating_sub(1)] {
        if turn >= turns || cold.iter().any(|(t, _)| *t == turn) {
            continue;
        }
        let mut ms = Vec::new();
        for a in &asked {
            if let Some(m) = a.get(turn) {
                ms.push(ask(e, o.ctx, m, 1)?.0);
            }
        }
        cold.push((turn, ms.iter().sum::<f64>() / ms.len().max(1) as f64));
    }
    e.prefix_cache.set_budget(budget);

    let prompt: usize = rows.iter().map(|r| r.prompt).sum();
    let cached: usize = rows.iter().map(|r| r.cached).sum();
    let per_turn = |t: usize| {
        let rs: Vec<&Request> = rows.iter().filter(|r| r.turn == t).collect();
        let n = rs.len().max(1) as f64;
        let hit = rs.iter().map(|r| r.cached as f64 / r.prompt.max(1) as f64).sum::<f64>() / n;
        let ttft = rs.iter().map(|r| r.ttft_ms).sum::<f64>() / n;
        let prompt = rs.iter().map(|r| r.prompt).sum::<usize>() as f64 / n;
        (hit, ttft, prompt)
    };
    if o.json {
        let turns_json: Vec<_> = (0..turns)
            .map(|t| {
                let (hit, ttft, prompt) = per_turn(t);
                let cold_ms = cold.iter().find(|(ct, _)| *ct == t).map(|c| c.1);
                serde_json::json!({"turn": t + 1, "prompt_tokens": prompt, "hit_rate": hit, "ttft_ms": ttft, "ttft_ms_without_cache": cold_ms})
            })
            .collect();
        let requests: Vec<_> = rows
            .iter()
            .map(|r| serde_json::json!({"turn": r.turn + 1, "session": r.session, "prompt_tokens": r.prompt, "prefix_cache_tokens": r.cached, "ttft_ms": r.ttft_ms}))
            .collect();
        let out = serde_json::json!({
            "system_tokens": system_tokens,
            "requests": rows.len(),
            "hit_rate": cached as f64 / prompt.max(1) as f64,
            "prefix_cache": {"blocks": stats.blocks, "bytes": stats.bytes, "evicted_blocks": stats.evicted_blocks},
            "turns": turns_json,
            "request_rows": requests,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "agent trace {}: {} sessions × {turns} turns, system prompt {system_tokens} tokens, {} tokens per reply, \
         every request a fresh session",
        o.path.display(),
        trace.sessions.len(),
        o.reply
    );
    println!("| turn | prompt tokens (mean) | prefix-cache hit | TTFT with cache | TTFT without | ratio |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for t in 0..turns {
        let (hit, ttft, prompt) = per_turn(t);
        let (without, ratio) = match cold.iter().find(|(ct, _)| *ct == t) {
            Some((_, c)) => (format!("{c:.0} ms"), format!("{:.1}×", c / ttft.max(1e-9))),
            None => (String::new(), String::new()),
        };
        println!("| {} | {prompt:.0} | {:.1} % | {ttft:.0} ms | {without} | {ratio} |", t + 1, 100.0 * hit);
    }
    println!(
        "overall: {} of {prompt} prompt tokens from the prefix cache ({:.1} %); cache {} blocks, {:.1} MiB, {} evicted",
        cached,
        100.0 * cached as f64 / prompt.max(1) as f64,
        stats.blocks,
        stats.bytes as f64 / (1 << 20) as f64,
        stats.evicted_blocks
    );
    Ok(())
}

/// `sprig bench --sessions 1,2,4,8`: aggregate decode tokens/s of `n` sessions stepping together (each with
/// its own short prompt already in its cache), `gen` tokens each, stop tokens banned so every session runs
/// the whole length; the median of `reps` runs per count, and the ratio to one session.
pub fn batched_scaling<B: Backend>(e: &Arc<Engine<B>>, counts: &[usize], gen: usize, reps: usize, json: bool) -> Result<()> {
    use sprig_engine::{run_batch, BatchRequest, Prompt};
    let stops = (0..e.model.config.vocab_size as u32).filter(|&t| e.tokenizer.is_stop(t));
    let params = SamplingParams { temperature: 0.0, logit_bias: stops.map(|t| (t, f32::NEG_INFINITY)).collect(), ..Default::default() };
    let starts = ["Once upon a time", "The weather today", "In a small village", "Write a function that", "My favourite", "The car stopped", "Here is a list of", "Dear team,"];
    let mut rows = Vec::new();
    for &n in counts {
        let mut runs = Vec::new();
        for _ in 0..reps.max(1) {
            let mut sessions = (0..n)
                .map(|i| -> Result<Session<B>> {
                    let mut s = Session::new(e.clone(), 0)?;
                    s.generate(starts[i % starts.len()], false, &params, 1, |_| true)?;
                    Ok(s)
                })
                .collect::<Result<Vec<_>>>()?;
            let requests: Vec<BatchRequest<'_, B>> = sessions
                .iter_mut()
                .map(|s| BatchRequest {
                    session: s,
                    prompt: Prompt::Text { text: " and".into(), parse_special: false },
                    params: params.clone(),
                    max_new: gen,
                    on_text: Box::new(|_: &str| true),
                    on_logprob: None,
                })
                .collect();
            let t0 = Instant::now();
            let results = run_batch(requests);
            let secs = t0.elapsed().as_secs_f64();
            let mut tokens = 0;
            for r in results {
                tokens += r?.generated.len();
            }
            runs.push(tokens as f64 / secs);
        }
        runs.sort_by(|a, b| a.total_cmp(b));
        rows.push((n, runs[runs.len() / 2]));
    }
    let one = rows.iter().find(|r| r.0 == 1).map(|r| r.1);
    if json {
        let v: Vec<_> = rows
            .iter()
            .map(|(n, t)| serde_json::json!({"sessions": n, "tokens_per_second": t, "vs_one": one.map(|o| t / o)}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("| sessions | aggregate decode tok/s | vs 1 session |");
    println!("|---:|---:|---:|");
    for (n, t) in &rows {
        let ratio = one.map_or(String::new(), |o| format!("{:.2}×", t / o));
        println!("| {n} | {t:.1} | {ratio} |");
    }
    Ok(())
}
