//! `sprig distill`: the device side of distillation.
//! - `eval`: the distillation gap on the student's own outputs. The student answers each prompt with its
//!   sampling settings; the teacher — a local model of the same tokenizer (full distributions) or an
//!   OpenAI-compatible endpoint (top-k log-probabilities, see `sprig-remote`) — scores every generated token:
//!   KL(teacher‖student), the teacher's NLL of the student's token, greedy agreement; and the escalation curve
//!   (what share of turns a threshold on the student's own uncertainty hands to the teacher, and how far the
//!   answers then are from the teacher's).
//! - `collect`: on-policy traces for a trainer, one JSON line per sampled answer (fields in the README).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use sprig_engine::distill::{score_reply, score_reply_with, PromptScore};
use sprig_engine::{with_engine, AnyEngine, EngineError, SamplingParams};
use sprig_remote::Endpoint;

use crate::args::{LoadArgs, SamplingArgs};

#[derive(Subcommand)]
pub enum DistillCommand {
    /// The student answers each prompt; the teacher scores every token it generated.
    Eval(EvalArgs),
    /// On-policy traces: the student's sampled answers with both models' top-k log-probabilities, as JSON lines.
    Collect(CollectArgs),
}

/// Who scores the student's tokens.
#[derive(Args)]
pub struct TeacherArgs {
    /// The teacher as a local model of the same tokenizer (a known name or a path): full distributions.
    #[arg(long, conflicts_with = "teacher_url", required_unless_present = "teacher_url")]
    teacher: Option<PathBuf>,
    /// The teacher behind an OpenAI-compatible endpoint (`http://host:port`): its top-k log-probabilities
    /// through `/v1/completions` with `echo`, token-id prompts and `return_tokens_as_token_ids` (vLLM, `sprig serve`).
    #[arg(long)]
    teacher_url: Option<String>,
    /// `model` of the requests to the endpoint.
    #[arg(long, default_value = "teacher")]
    teacher_model: String,
    /// Bearer token for the endpoint (or SPRIG_TEACHER_KEY).
    #[arg(long)]
    teacher_key: Option<String>,
    /// Alternatives per position asked of the endpoint (vLLM allows 20 unless started with more).
    #[arg(long, default_value_t = 20)]
    teacher_top_k: usize,
    /// Seconds one request to the endpoint may take.
    #[arg(long, default_value_t = 120)]
    teacher_timeout: u64,
}

enum Scorer {
    Local(AnyEngine),
    Remote(Endpoint, usize),
}

impl TeacherArgs {
    fn scorer(&self, load: &LoadArgs) -> Result<Scorer> {
        match (&self.teacher, &self.teacher_url) {
            (Some(path), _) => Ok(Scorer::Local(load.engine(path)?)),
            (None, Some(url)) => {
                if self.teacher_top_k == 0 {
                    bail!("--teacher-top-k must be at least 1 (the teacher's greedy token is its top one)");
                }
                let mut ep = Endpoint::new(url, &self.teacher_model)?;
                ep.api_key = self
                    .teacher_key
                    .clone()
                    .or_else(|| std::env::var("SPRIG_TEACHER_KEY").ok().filter(|k| !k.is_empty()));
                ep.timeout = Duration::from_secs(self.teacher_timeout.max(1));
                Ok(Scorer::Remote(ep, self.teacher_top_k))
            }
            (None, None) => bail!("give the teacher: --teacher MODEL or --teacher-url URL"),
        }
    }

    /// What the traces say of the teacher.
    fn describe(&self) -> Result<Value> {
        match (&self.teacher, &self.teacher_url) {
            (Some(path), _) => model_meta(path),
            (_, Some(url)) => Ok(json!({"url": url, "model": self.teacher_model})),
            _ => Ok(Value::Null),
        }
    }
}

/// The student's reply to one prompt, scored.
fn score(
    student: &AnyEngine,
    teacher: &Scorer,
    prompt: &str,
    params: &SamplingParams,
    max_new: usize,
    top_k: usize,
) -> Result<PromptScore> {
    Ok(match teacher {
        Scorer::Local(t) => {
            with_engine!(student, |s| with_engine!(t, |t| score_reply(s, &**t, prompt, params, max_new, top_k)))?
        }
        Scorer::Remote(ep, k) => with_engine!(student, |s| score_reply_with(
            s,
            &mut |seq| ep.score(seq, *k).map_err(|e| EngineError::Eval(format!("teacher at {}: {e}", ep.base()))),
            prompt,
            params,
            max_new,
            top_k,
        ))?,
    })
}

#[derive(Args)]
pub struct EvalArgs {
    /// The student: the model that answers (a known name or a path).
    #[arg(long)]
    student: PathBuf,
    #[command(flatten)]
    teacher: TeacherArgs,
    /// Prompts, one JSON object per line with a `prompt` string (a user turn when the student has a chat
    /// template, raw text otherwise).
    #[arg(short = 'f', long)]
    file: PathBuf,
    /// Most tokens per answer.
    #[arg(short = 'n', long, default_value_t = 128)]
    max_tokens: usize,
    /// Reply tokens whose mean student entropy is escalation's signal.
    #[arg(long, default_value_t = sprig_engine::escalate::DEFAULT_WINDOW)]
    window: usize,
    /// Thresholds (nats) of the escalation curve.
    #[arg(long, value_delimiter = ',', default_values_t = [0.5, 1.0, 1.5])]
    thresholds: Vec<f64>,
    #[command(flatten)]
    load: LoadArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// JSON Lines instead of the table: one object per prompt, then the summary. (`--json` is the sampling
    /// flag that constrains the answers to JSON.)
    #[arg(long)]
    jsonl: bool,
}

/// Upper edges of the per-token KL histogram's bins (nats); the last bin is everything above.
const KL_BINS: [f64; 6] = [0.001, 0.01, 0.1, 0.5, 1.0, 2.0];

/// One prompt of a prompts file: its id (the line's `id`, else its line number) and text.
struct PromptLine {
    id: String,
    prompt: String,
}

fn prompts(path: &Path) -> Result<Vec<PromptLine>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
        let id = match &v["id"] {
            Value::Null => (i + 1).to_string(),
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            _ => bail!("{}:{}: `id` must be a string or a number", path.display(), i + 1),
        };
        match v.get("prompt").and_then(Value::as_str) {
            Some(p) if !p.trim().is_empty() => out.push(PromptLine { id, prompt: p.to_string() }),
            Some(_) => bail!("{}:{}: the prompt is empty", path.display(), i + 1),
            None => bail!("{}:{}: expected an object with a `prompt` string", path.display(), i + 1),
        }
    }
    if out.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(out)
}

pub fn eval(a: EvalArgs) -> Result<()> {
    let prompts = prompts(&a.file)?;
    let params = a.sampling.params()?;
    if a.thresholds.iter().any(|t| !t.is_finite() || *t < 0.0) {
        bail!("--thresholds: entropies in nats, finite and ≥ 0");
    }
    let student = a.load.engine(&a.student)?;
    let teacher = a.teacher.scorer(&a.load)?;
    let mut scores: Vec<PromptScore> = Vec::new();
    if !a.jsonl {
        println!(
            "{:>4} {:>7} {:>10} {:>12} {:>9} {:>8}  reply",
            "#", "tokens", "mean KL", "teacher NLL", "agree %", "signal"
        );
    }
    for (i, p) in prompts.iter().enumerate() {
        let s = score(&student, &teacher, &p.prompt, &params, a.max_tokens, 0)
            .with_context(|| format!("prompt {}", p.id))?;
        if a.jsonl {
            println!(
                "{}",
                json!({
                    "id": p.id, "prompt": p.prompt, "reply": s.text, "prompt_tokens": s.prompt.len(), "tokens": s.tokens.len(),
                    "mean_kl": s.mean_kl(), "teacher_nll": s.teacher_nll(), "greedy_agreement": s.greedy_agreement(),
                    "signal": s.signal(a.window), "per_token_kl": s.tokens.iter().map(|t| t.kl).collect::<Vec<_>>(),
                })
            );
        } else {
            let reply: String = s.text.chars().take(48).map(|c| if c.is_control() { ' ' } else { c }).collect();
            println!(
                "{:>4} {:>7} {:>10.4} {:>12.4} {:>8.1}% {:>8.3}  {reply}",
                i + 1,
                s.tokens.len(),
                s.mean_kl(),
                s.teacher_nll(),
                100.0 * s.greedy_agreement(),
                s.signal(a.window)
            );
        }
        scores.push(s);
    }
    // Overall: per token (every scored token weighs the same), and the histogram of per-token KL.
    let all: Vec<_> = scores.iter().flat_map(|s| &s.tokens).collect();
    let n = all.len().max(1) as f64;
    let mean_kl = all.iter().map(|t| t.kl).sum::<f64>() / n;
    let nll = all.iter().map(|t| t.teacher_nll).sum::<f64>() / n;
    let student_nll = all.iter().map(|t| t.student_nll).sum::<f64>() / n;
    let agree = all.iter().filter(|t| t.greedy_agree).count() as f64 / n;
    let mut hist = [0usize; KL_BINS.len() + 1];
    for t in &all {
        hist[KL_BINS.iter().position(|&edge| t.kl < edge).unwrap_or(KL_BINS.len())] += 1;
    }
    let labels: Vec<String> = (0..hist.len())
        .map(|b| match b {
            0 => format!("<{}", KL_BINS[0]),
            b if b == KL_BINS.len() => format!(">={}", KL_BINS[b - 1]),
            b => format!("{}-{}", KL_BINS[b - 1], KL_BINS[b]),
        })
        .collect();
    let curve: Vec<Value> = a.thresholds.iter().map(|&t| escalation_point(&scores, a.window, t)).collect();
    if a.jsonl {
        println!(
            "{}",
            json!({
                "summary": {
                    "prompts": scores.len(), "tokens": all.len(), "mean_kl": mean_kl, "teacher_nll": nll,
                    "student_nll": student_nll, "greedy_agreement": agree,
                    "kl_histogram": labels.iter().zip(hist).map(|(l, c)| json!({"nats": l, "tokens": c})).collect::<Vec<_>>(),
                    "escalation_window": a.window, "escalation_curve": curve,
                }
            })
        );
    } else {
        println!(
            "all  {:>7} {mean_kl:>10.4} {nll:>12.4} {:>8.1}%  ({} prompts; student NLL of its own tokens {student_nll:.4})",
            all.len(),
            100.0 * agree,
            scores.len()
        );
        println!("per-token KL(teacher||student), nats:");
        for (l, c) in labels.iter().zip(hist) {
            println!("  {l:>9}: {c:>6} ({:.1} %)", 100.0 * c as f64 / n);
        }
        println!("escalation curve (signal: the student's mean entropy over its first {} reply tokens):", a.window);
        println!(
            "  {:>9} {:>11} {:>26} {:>22}",
            "threshold", "escalated", "agreement with teacher", "mean KL of answers"
        );
        for c in &curve {
            println!(
                "  {:>9.3} {:>10.1}% {:>25.1}% {:>22.4}",
                c["threshold"].as_f64().unwrap_or(0.0),
                100.0 * c["escalated"].as_f64().unwrap_or(0.0),
                100.0 * c["agreement"].as_f64().unwrap_or(0.0),
                c["mean_kl"].as_f64().unwrap_or(0.0)
            );
        }
    }
    Ok(())
}

/// One point of the escalation curve: the turns whose signal is above `threshold` go to the teacher (their
/// answers are the teacher's own: agreement 1, KL 0); the others keep the student's answer with its greedy
/// agreement and KL. Per turn, every turn weighing the same.
fn escalation_point(scores: &[PromptScore], window: usize, threshold: f64) -> Value {
    let n = scores.len().max(1) as f64;
    let up: Vec<bool> = scores.iter().map(|s| !s.tokens.is_empty() && s.signal(window) > threshold).collect();
    let escalated = up.iter().filter(|&&u| u).count() as f64 / n;
    let agreement = scores.iter().zip(&up).map(|(s, &u)| if u { 1.0 } else { s.greedy_agreement() }).sum::<f64>() / n;
    let kl = scores.iter().zip(&up).map(|(s, &u)| if u { 0.0 } else { s.mean_kl() }).sum::<f64>() / n;
    json!({"threshold": threshold, "escalated": escalated, "agreement": agreement, "mean_kl": kl})
}

#[derive(Args)]
pub struct CollectArgs {
    /// The student: the model whose samples are collected.
    #[arg(long)]
    student: PathBuf,
    #[command(flatten)]
    teacher: TeacherArgs,
    /// Prompts, one JSON object per line with a `prompt` string and optionally an `id`.
    #[arg(short = 'f', long)]
    file: PathBuf,
    /// The traces (JSON Lines). An existing file is continued: prompts it has are skipped, a last line cut
    /// short by a crash is removed.
    #[arg(short = 'o', long)]
    out: PathBuf,
    /// Samples per prompt (sample i is drawn with seed + i).
    #[arg(long, default_value_t = 1)]
    samples: usize,
    /// Alternatives per position in the traces (top log-probabilities), for both models.
    #[arg(long, default_value_t = 20)]
    logprobs: usize,
    /// Most tokens per answer.
    #[arg(short = 'n', long, default_value_t = 128)]
    max_tokens: usize,
    #[command(flatten)]
    load: LoadArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
}

/// A model file's name and SHA-256, for the traces' metadata.
fn model_meta(model: &Path) -> Result<Value> {
    use sha2::Digest;
    let path = sprig_engine::registry::resolve(model, &mut |s| eprintln!("sprig: {s}"))?;
    let mut f = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("hashing {}", path.display()))?;
    Ok(json!({"model": model.display().to_string(), "sha256": hex::encode(h.finalize())}))
}

/// Makes `path` whole for appending: a last line without its newline (a write a crash cut short) is removed.
/// Returns the ids of the traces it holds.
fn resume(path: &Path) -> Result<std::collections::HashSet<String>> {
    let mut done = std::collections::HashSet::new();
    let Ok(f) = std::fs::OpenOptions::new().read(true).write(true).open(path) else { return Ok(done) };
    let mut whole = 0u64;
    let mut reader = std::io::BufReader::new(&f);
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 || !line.ends_with('\n') {
            break;
        }
        let v: Value = serde_json::from_str(&line)
            .with_context(|| format!("{}: a line that is not JSON (not a traces file?)", path.display()))?;
        let Some(id) = v["id"].as_str() else {
            bail!("{}: a line without an `id` (not a traces file?)", path.display())
        };
        done.insert(id.to_string());
        whole += n as u64;
    }
    if f.metadata()?.len() > whole {
        eprintln!("sprig: {}: removing a last line cut short", path.display());
        f.set_len(whole)?;
    }
    Ok(done)
}

fn logprob_list(top: &[(u32, f32)]) -> Value {
    top.iter().map(|&(t, l)| json!([t, l])).collect()
}

pub fn collect(a: CollectArgs) -> Result<()> {
    let prompts = prompts(&a.file)?;
    let base = a.sampling.params()?;
    if a.samples == 0 || a.logprobs == 0 {
        bail!("--samples and --logprobs must be at least 1");
    }
    let done = resume(&a.out)?;
    let todo: Vec<(String, &PromptLine, usize)> = prompts
        .iter()
        .flat_map(|p| (0..a.samples).map(move |i| (format!("{}#{i}", p.id), p, i)))
        .filter(|(id, _, _)| !done.contains(id))
        .collect();
    eprintln!("sprig: {} traces in {}, {} to collect", done.len(), a.out.display(), todo.len());
    if todo.is_empty() {
        return Ok(());
    }
    let student = a.load.engine(&a.student)?;
    let teacher = a.teacher.scorer(&a.load)?;
    let meta_student = model_meta(&a.student)?;
    let meta_teacher = a.teacher.describe()?;
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&a.out)
        .with_context(|| format!("opening {}", a.out.display()))?;
    for (id, p, i) in todo {
        let params = SamplingParams { seed: base.seed.wrapping_add(i as u64), ..base.clone() };
        let s = score(&student, &teacher, &p.prompt, &params, a.max_tokens, a.logprobs)
            .with_context(|| format!("prompt {}", p.id))?;
        let record = json!({
            "id": id,
            "prompt": p.prompt,
            "prompt_token_ids": s.prompt,
            "completion": s.text,
            "completion_token_ids": s.tokens.iter().map(|t| t.token).collect::<Vec<_>>(),
            "student_logprobs": s.tokens.iter().map(|t| -t.student_nll).collect::<Vec<_>>(),
            "teacher_logprobs": s.tokens.iter().map(|t| -t.teacher_nll).collect::<Vec<_>>(),
            "student_top_logprobs": s.tokens.iter().map(|t| logprob_list(&t.student_top)).collect::<Vec<_>>(),
            "teacher_top_logprobs": s.tokens.iter().map(|t| logprob_list(&t.teacher_top)).collect::<Vec<_>>(),
            "meta": {
                "student": meta_student, "teacher": meta_teacher, "top_k": a.logprobs, "sample": i,
                "sampling": {
                    "temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p,
                    "min_p": params.min_p, "seed": params.seed, "max_tokens": a.max_tokens,
                },
                "sprig": env!("CARGO_PKG_VERSION"),
            },
        });
        // One write per line, then to the disk: a crash leaves at most a cut last line, removed on resume.
        let mut line = record.to_string();
        line.push('\n');
        out.write_all(line.as_bytes()).with_context(|| format!("writing {}", a.out.display()))?;
        out.sync_data()?;
    }
    Ok(())
}
