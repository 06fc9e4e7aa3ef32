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
    // Decode (tokens, seconds): free, constrained with masks computed only when needed, constrained with
    // masks computed ahead beside the forward pass (the default).
    let mut all = [(0usize, 0.0f64); 3];
    let ahead = |on: bool| e.masks_ahead.store(on, std::sync::atomic::Ordering::Relaxed);
    for (name, schema) in schemas {
        let mut runs = [(0usize, 0.0f64); 3];
        let (mut forced, mut rejected, mut guide_secs, mut ahead_masks, mut ahead_secs, mut ahead_guide_secs) =
            (0u64, 0u64, 0.0f64, 0u64, 0.0f64, 0.0f64);
        for p in &prompts {
            let msgs = [ChatMessage::new("user", &format!("{p} Reply with JSON only."))];
            for (run, acc) in runs.iter_mut().enumerate() {
                ahead(run == 2);
                let params = SamplingParams {
                    constraint: (run > 0).then(|| Constraint::JsonSchema(schema.to_string())),
                    ..Default::default()
                };
                // A fresh session each time: every run prefills the same prompt and decodes from the same state.
                let mut s = Session::new(e.clone(), 2048)?;
                let r = s.chat(&msgs, &params, gen, |_| true)?;
                // The first token comes from the prefill; decode time covers the rest.
                acc.0 += r.generated.len().saturating_sub(1);
                acc.1 += r.decode_secs;
                match (run, r.constraint) {
                    (1, Some(c)) => {
                        forced += c.forced_tokens;
                        rejected += c.rejected;
                        guide_secs += c.secs;
                    }
                    (2, Some(c)) => {
                        ahead_masks += c.masks_ahead;
                        ahead_secs += c.ahead_secs;
                        ahead_guide_secs += c.secs;
                    }
                    _ => {}
                }
            }
        }
        ahead(true);
        let tok_s = |r: (usize, f64)| r.0 as f64 / r.1.max(1e-9);
        let (tf, tc, ta) = (tok_s(runs[0]), tok_s(runs[1]), tok_s(runs[2]));
        let con = runs[1];
        let sampled = (con.0 as u64 + prompts.len() as u64).saturating_sub(forced);
        rows.push(json!({
            "schema": name, "free_tok_s": tf, "constrained_tok_s": tc, "ratio": tc / tf,
            "constrained_tokens": con.0, "forced_share": forced as f64 / con.0.max(1) as f64,
            "rejected_per_sampled_token": rejected as f64 / sampled.max(1) as f64,
            "constraint_share_of_decode": guide_secs / con.1.max(1e-9),
            "masks_ahead": {
                "tok_s": ta, "ratio": ta / tf, "masks_computed_ahead": ahead_masks,
                "constraint_share_of_decode": ahead_guide_secs / runs[2].1.max(1e-9),
                "ahead_share_of_decode": ahead_secs / runs[2].1.max(1e-9),
            },
        }));
        for (a, r) in all.iter_mut().zip(runs) {
            *a = (a.0 + r.0, a.1 + r.1);
        }
    }
    let tok_s = |r: (usize, f64)| r.0 as f64 / r.1.max(1e-9);
    let (tf, tc, ta) = (tok_s(all[0]), tok_s(all[1]), tok_s(all[2]));
    if json_out {
        println!(
            "{}",
            json!({"vocab": e.model.config.vocab_size, "schemas": rows, "free_tok_s": tf, "constrained_tok_s": tc,
                   "ratio": tc / tf, "masks_ahead_tok_s": ta, "masks_ahead_ratio": ta / tf})
        );
        return Ok(());
    }
    println!(
        "{:<10} {:>10} {:>12} {:>7} {:>9} {:>14} {:>12} | {:>12} {:>7} {:>6} {:>12} {:>8}",
        "schema", "free tok/s", "schema tok/s", "ratio", "forced %", "reject/sampled", "constraint %",
        "ahead tok/s", "ratio", "masks", "constraint %", "ahead %"
    );
    for r in &rows {
        let f = |v: &Value| v.as_f64().unwrap_or(0.0);
        let a = &r["masks_ahead"];
        println!(
            "{:<10} {:>10.1} {:>12.1} {:>6.2}x {:>8.1}% {:>14.3} {:>11.1}% | {:>12.1} {:>6.2}x {:>6} {:>11.1}% {:>7.1}%",
            r["schema"].as_str().unwrap_or(""),
            f(&r["free_tok_s"]),
            f(&r["constrained_tok_s"]),
            f(&r["ratio"]),
            100.0 * f(&r["forced_share"]),
            f(&r["rejected_per_sampled_token"]),
            100.0 * f(&r["constraint_share_of_decode"]),
            f(&a["tok_s"]),
            f(&a["ratio"]),
            a["masks_computed_ahead"].as_u64().unwrap_or(0),
            100.0 * f(&a["constraint_share_of_decode"]),
            100.0 * f(&a["ahead_share_of_decode"]),
        );
    }
    println!(
        "all        {tf:>10.1} {tc:>12.1} {:>6.2}x {:>55} {ta:>12.1} {:>6.2}x   (vocabulary {})",
        tc / tf,
        "",
        ta / tf,
        e.model.config.vocab_size
    );
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
    let Some(mut speculation) = spec.speculation(e, load, 0)? else { bail!("--spec-prompts needs --draft MODEL, --lookup or --mtp (and --spec auto or on)") };
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
    if let (false, Some((plain, rows))) = (json_out, speculation.pass_costs()) {
        let shown: Vec<String> = rows.iter().map(|(r, x)| format!("{r} rows {x:.2}")).collect();
        println!("cost model: plain step {:.1} ms; verification pass, in plain steps: {}", plain * 1e3, shown.join(", "));
    }
    if same != prompts.len() {
        bail!("speculative output differed from plain decoding on {} prompts", prompts.len() - same);
    }
    Ok(())
}
