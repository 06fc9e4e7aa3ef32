//! `sprig bench --structured FILE` (what a JSON-schema constraint costs in decode speed),
//! `sprig bench --tools FILE` (how often a model calls the right tool with the right arguments, constrained or
//! not) and `sprig bench --spec-prompts FILE` (speculative decoding against plain decoding).

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use sprig_backend::Backend;
use sprig_engine::{ChatMessage, Constraint, Engine, SamplingParams, Session, ToolChoice, Tools};

fn read_json(path: &std::path::Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// For each schema of the fixture (`schemas`, `prompts`; tests/data/structured/schemas.json): `prompts` chat
/// replies each free and constrained (greedy, up to `gen` tokens), the output tokens per second of decode of
/// each, their ratio, and what the constraint did (forced tokens, rejected samples, its own time).
pub fn schema_overhead<B: Backend>(e: &Arc<Engine<B>>, path: &std::path::Path, prompts: usize, gen: usize, json_out: bool) -> Result<()> {
    let data = read_json(path)?;
    let (Some(schemas), Some(all_prompts)) = (data["schemas"].as_object(), data["prompts"].as_array()) else {
        bail!("{}: expected `schemas` (an object) and `prompts` (an array)", path.display());
    };
    let prompts: Vec<&str> = all_prompts.iter().filter_map(Value::as_str).take(prompts.max(1)).collect();
    let mut rows = Vec::new();
    let (mut all_free, mut all_con) = ((0usize, 0.0f64), (0usize, 0.0f64));
    for (name, schema) in schemas {
        let (mut free, mut con) = ((0usize, 0.0f64), (0usize, 0.0f64));
        let (mut forced, mut masks, mut guide_secs) = (0u64, 0u64, 0.0f64);
        for p in &prompts {
            let msgs = [ChatMessage::new("user", &format!("{p} Reply with JSON only."))];
            for constrained in [false, true] {
                let params = SamplingParams {
                    constraint: constrained.then(|| Constraint::JsonSchema(schema.to_string())),
                    ..Default::default()
                };
                // A fresh session each time: both runs prefill the same prompt and decode from the same state.
                let mut s = Session::new(e.clone(), 2048)?;
                let r = s.chat(&msgs, &params, gen, |_| true)?;
                // The first token comes from the prefill; decode time covers the rest.
                let n = r.generated.len().saturating_sub(1);
                let acc = if constrained { &mut con } else { &mut free };
                acc.0 += n;
                acc.1 += r.decode_secs;
                if let Some(c) = r.constraint {
                    forced += c.forced_tokens;
                    masks += c.masks;
                    guide_secs += c.secs;
                }
            }
        }
        let (tf, tc) = (free.0 as f64 / free.1.max(1e-9), con.0 as f64 / con.1.max(1e-9));
        let sampled = (con.0 as u64 + prompts.len() as u64).saturating_sub(forced);
        rows.push(json!({
            "schema": name, "free_tok_s": tf, "constrained_tok_s": tc, "ratio": tc / tf,
            "constrained_tokens": con.0, "forced_share": forced as f64 / con.0.max(1) as f64,
            "masks_per_sampled_token": masks as f64 / sampled.max(1) as f64,
            "constraint_share_of_decode": guide_secs / con.1.max(1e-9),
        }));
        all_free = (all_free.0 + free.0, all_free.1 + free.1);
        all_con = (all_con.0 + con.0, all_con.1 + con.1);
    }
    let (tf, tc) = (all_free.0 as f64 / all_free.1.max(1e-9), all_con.0 as f64 / all_con.1.max(1e-9));
    if json_out {
        println!("{}", json!({"vocab": e.model.config.vocab_size, "schemas": rows, "free_tok_s": tf, "constrained_tok_s": tc, "ratio": tc / tf}));
        return Ok(());
    }
    println!(
        "{:<10} {:>10} {:>14} {:>7} {:>9} {:>14} {:>12}",
        "schema", "free tok/s", "schema tok/s", "ratio", "forced %", "masks/sampled", "constraint %"
    );
    for r in &rows {
        println!(
            "{:<10} {:>10.1} {:>14.1} {:>6.2}x {:>8.1}% {:>14.3} {:>11.1}%",
            r["schema"].as_str().unwrap_or(""),
            r["free_tok_s"].as_f64().unwrap_or(0.0),
            r["constrained_tok_s"].as_f64().unwrap_or(0.0),
            r["ratio"].as_f64().unwrap_or(0.0),
            100.0 * r["forced_share"].as_f64().unwrap_or(0.0),
            r["masks_per_sampled_token"].as_f64().unwrap_or(0.0),
            100.0 * r["constraint_share_of_decode"].as_f64().unwrap_or(0.0),
        );
    }
    println!("all        {tf:>10.1} {tc:>14.1} {:>6.2}x   (vocabulary {})", tc / tf, e.model.config.vocab_size);
    Ok(())
}

/// Is `actual` (a call's arguments) what `want` asks: every wanted argument present, strings containing the
/// wanted text (case-insensitive), numbers and booleans equal.
fn arguments_match(want: &Value, actual: &Value) -> bool {
    let Some(want) = want.as_object() else { return false };
    want.iter().all(|(k, w)| match (w, actual.get(k)) {
        (Value::String(w), Some(Value::String(a))) => a.to_lowercase().contains(&w.to_lowercase()),
        (Value::Number(w), Some(Value::Number(a))) => w.as_f64() == a.as_f64(),
        (w, Some(a)) => w == a,
        (_, None) => false,
    })
}

/// Each request of the fixture (`system`, `requests` of `prompt`, `tool`, `arguments`;
/// tests/data/tools/car-requests.json) as one chat turn offering `tools`, greedy, free and constrained: the
/// share of replies calling exactly the expected tool with the expected arguments (`choice`: auto or required).
pub fn tool_accuracy<B: Backend>(
    e: &Arc<Engine<B>>,
    fixture: &std::path::Path,
    tools_path: &std::path::Path,
    choice: &str,
    json_out: bool,
) -> Result<()> {
    let data = read_json(fixture)?;
    let tools_json = std::fs::read_to_string(tools_path).with_context(|| format!("reading {}", tools_path.display()))?;
    let Some(requests) = data["requests"].as_array() else { bail!("{}: expected `requests`", fixture.display()) };
    let system = data["system"].as_str().unwrap_or("");
    let mut out = Vec::new();
    for constrain in [false, true] {
        let tools = Tools::from_json(&tools_json, ToolChoice::parse(choice), constrain)?;
        let (mut right, mut called, mut tokens, mut secs) = (0, 0, 0, 0.0);
        let mut misses = Vec::new();
        for r in requests {
            let (prompt, want_tool) = (r["prompt"].as_str().unwrap_or(""), r["tool"].as_str().unwrap_or(""));
            let mut msgs = Vec::new();
            if !system.is_empty() {
                msgs.push(ChatMessage::new("system", system));
            }
            msgs.push(ChatMessage::new("user", prompt));
            let mut s = Session::new(e.clone(), 4096)?;
            let mut text = String::new();
            let st = s.chat_with_tools(&msgs, Some(&tools), &SamplingParams::default(), 128, |t| {
                text.push_str(t);
                true
            })?;
            tokens += st.generated.len();
            secs += st.prefill_secs + st.decode_secs;
            called += usize::from(!st.tool_calls.is_empty());
            let ok = st.tool_calls.len() == 1 && st.tool_calls[0].name == want_tool && {
                let args: Value = serde_json::from_str(&st.tool_calls[0].arguments).unwrap_or(Value::Null);
                arguments_match(&r["arguments"], &args)
            };
            right += usize::from(ok);
            if !ok {
                misses.push(json!({"prompt": prompt, "reply": text}));
            }
        }
        let n = requests.len().max(1);
        out.push(json!({
            "constrained": constrain, "requests": requests.len(), "correct": right, "correct_share": right as f64 / n as f64,
            "called_share": called as f64 / n as f64, "tokens": tokens, "secs": secs, "misses": misses,
        }));
    }
    if json_out {
        println!("{}", Value::from(out));
        return Ok(());
    }
    for o in &out {
        println!(
            "{:<13} correct tool + arguments {:>2}/{} ({:.0} %), replies with a call {:.0} %, {} tokens in {:.1} s",
            if o["constrained"] == true { "constrained" } else { "unconstrained" },
            o["correct"],
            o["requests"],
            100.0 * o["correct_share"].as_f64().unwrap_or(0.0),
            100.0 * o["called_share"].as_f64().unwrap_or(0.0),
            o["tokens"],
            o["secs"].as_f64().unwrap_or(0.0)
        );
        for m in o["misses"].as_array().into_iter().flatten() {
            println!("    miss: {} -> {}", m["prompt"], m["reply"].as_str().unwrap_or("").replace('\n', " "));
        }
    }
    Ok(())
}

/// Each prompt of the fixture (a JSON array of raw prompts) decoded greedily, `gen` tokens, plainly and with the
/// speculation of `spec` (one speculation for all prompts, as a session keeps it: `auto` may switch it off),
/// alternating; decode tokens/s of each, their ratio, the acceptance, and whether the outputs are identical
/// (they must be).
pub fn speculative<B: Backend>(
    e: &Arc<Engine<B>>,
    path: &std::path::Path,
    spec: &crate::args::SpecArgs,
    load: &crate::args::LoadArgs,
    gen: usize,
    json_out: bool,
) -> Result<()> {
    let data = read_json(path)?;
    let prompts: Vec<&str> = data.as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    if prompts.is_empty() {
        bail!("{}: expected a JSON array of prompt strings", path.display());
    }
    let Some(mut speculation) = spec.speculation(e, load, 0)? else { bail!("--spec-prompts needs --draft MODEL or --lookup (and --spec auto or on)") };
    let params = SamplingParams::default();
    let (mut plain, mut fast, mut same) = ((0usize, 0.0f64), (0usize, 0.0f64), 0usize);
    let before = speculation.stats();
    for p in &prompts {
        let prompt = e.tokenizer.encode_parts(&[(p, false)], e.tokenizer.special().add_bos)?;
        let mut outs = Vec::new();
        for with_spec in [false, true] {
            let mut st = e.model.new_state(0)?;
            let mut sampler = sprig_engine::Sampler::new(params.clone())?;
            let s = if with_spec { Some(&mut speculation) } else { None };
            let r = e.generate_speculative(&mut st, &prompt, gen, &mut sampler, false, s, |_| true)?;
            let acc = if with_spec { &mut fast } else { &mut plain };
            acc.0 += r.generated.len().saturating_sub(1);
            acc.1 += r.decode_secs;
            outs.push(r.generated);
        }
        same += usize::from(outs[0] == outs[1]);
    }
    let s = speculation.stats();
    let (drafted, accepted) = (s.drafted - before.drafted, s.accepted - before.accepted);
    let tps = |x: (usize, f64)| x.0 as f64 / x.1.max(1e-9);
    let ratio = tps(fast) / tps(plain).max(1e-9);
    if json_out {
        println!(
            "{}",
            json!({"prompts": prompts.len(), "drafter": speculation.drafter_name(), "plain_tok_s": tps(plain), "spec_tok_s": tps(fast),
                   "ratio": ratio, "drafted": drafted, "accepted": accepted, "tokens_per_pass": s.tokens_per_pass(), "identical": same,
                   "switched_off": s.switched_off})
        );
    } else {
        println!(
            "{} prompts, {gen} tokens each, {}: plain {:.1} tok/s, speculative {:.1} tok/s ({ratio:.2}x); {drafted} drafted, {accepted} accepted ({:.0} %), {:.2} tokens per pass{}; greedy outputs identical: {same}/{}",
            prompts.len(),
            speculation.drafter_name(),
            tps(plain),
            tps(fast),
            100.0 * accepted as f64 / drafted.max(1) as f64,
            s.tokens_per_pass(),
            if s.switched_off { "; auto switched it off (slower than plain here)" } else { "" },
            prompts.len()
        );
    }
    if same != prompts.len() {
        bail!("speculative output differed from plain decoding on {} prompts", prompts.len() - same);
    }
    Ok(())
}
