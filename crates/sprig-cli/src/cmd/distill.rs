//! `sprig distill eval`: the distillation gap on the student's own outputs. The student answers each prompt
//! with its sampling settings; a local teacher of the same tokenizer scores every generated token
//! (KL(teacher‖student) of the full distributions, the teacher's NLL of the student's token, greedy agreement).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use sprig_engine::distill::PromptScore;
use sprig_engine::with_engine;

use crate::args::{LoadArgs, SamplingArgs};

#[derive(Subcommand)]
pub enum DistillCommand {
    /// The student answers each prompt; the teacher scores every token it generated.
    Eval(EvalArgs),
}

#[derive(Args)]
pub struct EvalArgs {
    /// The student: the model that answers (a known name or a path).
    #[arg(long)]
    student: PathBuf,
    /// The teacher: a model of the same tokenizer that scores the answers (a known name or a path).
    #[arg(long)]
    teacher: PathBuf,
    /// Prompts, one JSON object per line with a `prompt` string (a user turn when the student has a chat
    /// template, raw text otherwise).
    #[arg(short = 'f', long)]
    file: PathBuf,
    /// Most tokens per answer.
    #[arg(short = 'n', long, default_value_t = 128)]
    max_tokens: usize,
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

fn prompts(path: &std::path::Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
        match v.get("prompt").and_then(Value::as_str) {
            Some(p) => out.push(p.to_string()),
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
    let student = a.load.engine(&a.student)?;
    let teacher = a.load.engine(&a.teacher)?;
    let mut scores: Vec<PromptScore> = Vec::new();
    if !a.jsonl {
        println!("{:>4} {:>7} {:>10} {:>12} {:>9}  reply", "#", "tokens", "mean KL", "teacher NLL", "agree %");
    }
    for (i, p) in prompts.iter().enumerate() {
        let s = with_engine!(&student, |s| with_engine!(&teacher, |t| sprig_engine::distill::score_reply(
            s, &**t, p, &params, a.max_tokens
        )))
        .with_context(|| format!("prompt {}", i + 1))?;
        if a.jsonl {
            println!(
                "{}",
                json!({
                    "prompt": p, "reply": s.text, "prompt_tokens": s.prompt.len(), "tokens": s.tokens.len(),
                    "mean_kl": s.mean_kl(), "teacher_nll": s.teacher_nll(), "greedy_agreement": s.greedy_agreement(),
                    "per_token_kl": s.tokens.iter().map(|t| t.kl).collect::<Vec<_>>(),
                })
            );
        } else {
            let reply: String = s.text.chars().take(48).map(|c| if c.is_control() { ' ' } else { c }).collect();
            println!(
                "{:>4} {:>7} {:>10.4} {:>12.4} {:>8.1}%  {reply}",
                i + 1,
                s.tokens.len(),
                s.mean_kl(),
                s.teacher_nll(),
                100.0 * s.greedy_agreement()
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
    if a.jsonl {
        println!(
            "{}",
            json!({
                "summary": {
                    "prompts": scores.len(), "tokens": all.len(), "mean_kl": mean_kl, "teacher_nll": nll,
                    "student_nll": student_nll, "greedy_agreement": agree,
                    "kl_histogram": labels.iter().zip(hist).map(|(l, c)| json!({"nats": l, "tokens": c})).collect::<Vec<_>>(),
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
    }
    Ok(())
}
