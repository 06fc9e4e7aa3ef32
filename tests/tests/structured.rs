//! Constrained decoding end to end. Every output under a JSON-schema constraint is checked with the
//! `jsonschema` crate (an implementation independent of llguidance, which enforces the constraint): 50 prompts
//! × 5 schemas (tests/data/structured/schemas.json) on SmolLM2-135M and on Qwen2.5-Coder-0.5B, half greedy and
//! half sampled. Also: regex and Lark constraints, bad constraints refused before any token, a token budget too
//! small for the schema, cancellation and the prefix cache under a constraint, and tool calls on Qwen.

use std::sync::Arc;

use serde_json::Value;
use sprig_backend::cpu::CpuBackend;
use sprig_engine::generate::StopReason;
use sprig_engine::{
    run_batch, BatchRequest, ChatMessage, Constraint, Engine, EngineError, Prompt, SamplingParams, Session, ToolChoice, Tools,
};
use sprig_import::QuantChoice;
use sprig_tests::*;

fn engine(name: &str) -> Arc<Engine<CpuBackend>> {
    Arc::new(cpu_engine(open(&registry_model(name), None, QuantChoice::Keep), 2))
}

fn fixture() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("structured/schemas.json")).unwrap()).unwrap()
}

/// Greedy for even prompts; sampled (temperature, top-p, a repetition penalty, a seed) for odd ones.
fn params(i: usize, constraint: Constraint) -> SamplingParams {
    let mut p = SamplingParams { constraint: Some(constraint), ..Default::default() };
    if i % 2 == 1 {
        p = SamplingParams { temperature: 0.8, top_p: 0.9, repeat_penalty: 1.1, seed: i as u64, ..p };
    }
    p
}

/// Runs every prompt under every schema (8 sessions batched at a time) and validates each output.
fn all_outputs_validate(name: &str) {
    let e = engine(name);
    let data = fixture();
    let prompts: Vec<&str> = data["prompts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    assert_eq!(prompts.len(), 50);
    let (mut outputs, mut tokens) = (0, 0);
    let t0 = std::time::Instant::now();
    for (schema_name, schema) in data["schemas"].as_object().unwrap() {
        let validator = jsonschema::validator_for(schema).unwrap();
        for (c, chunk) in prompts.chunks(8).enumerate() {
            let mut sessions: Vec<Session<CpuBackend>> = chunk.iter().map(|_| Session::new(e.clone(), 1024).unwrap()).collect();
            let mut texts = vec![String::new(); chunk.len()];
            let requests = sessions
                .iter_mut()
                .zip(texts.iter_mut())
                .zip(chunk)
                .enumerate()
                .map(|(j, ((s, text), p))| BatchRequest {
                    session: s,
                    prompt: Prompt::Chat(vec![ChatMessage::new("user", &format!("{p} Reply with JSON only."))]),
                    params: params(c * 8 + j, Constraint::JsonSchema(schema.to_string())),
                    max_new: 256,
                    on_text: Box::new(move |t: &str| {
                        text.push_str(t);
                        true
                    }),
                    on_logprob: None,
                })
                .collect();
            let results = run_batch(requests);
            for ((r, text), p) in results.into_iter().zip(&texts).zip(chunk) {
                let r = r.unwrap_or_else(|err| panic!("{name} {schema_name} {p:?}: {err}"));
                assert_eq!(r.stop, StopReason::StopToken, "{name} {schema_name} {p:?}: ended before completing: {text}");
                let v: Value = serde_json::from_str(text).unwrap_or_else(|err| panic!("{name} {schema_name}: {err}: {text}"));
                let errors: Vec<String> = validator.iter_errors(&v).map(|e| e.to_string()).collect();
                assert!(errors.is_empty(), "{name} {schema_name} {p:?}: {text} is invalid: {errors:?}");
                outputs += 1;
                tokens += r.generated.len();
            }
        }
    }
    assert_eq!(outputs, 250);
    eprintln!("{name}: 250/250 outputs valid, {tokens} tokens in {:.1} s", t0.elapsed().as_secs_f64());
}

#[test]
fn json_schema_outputs_validate_on_smollm2() {
    all_outputs_validate("smollm2-135m-instruct");
}

#[test]
fn json_schema_outputs_validate_on_qwen_0_5b() {
    all_outputs_validate("qwen2.5-coder-0.5b-instruct");
}

/// One chat turn on a fresh session: the text and the stats.
fn ask(e: &Arc<Engine<CpuBackend>>, prompt: &str, p: &SamplingParams, max_new: usize) -> (String, sprig_engine::Result<sprig_engine::GenerationStats>) {
    let mut s = Session::new(e.clone(), 1024).unwrap();
    let mut text = String::new();
    let r = s.chat(&[ChatMessage::new("user", prompt)], p, max_new, |t| {
        text.push_str(t);
        true
    });
    (text, r)
}

/// Masks computed ahead (on a helper thread while the forward pass runs, once sampled tokens are often
/// rejected) change nothing in the output, greedy or sampled, and are used: the enum schema rejects about half
/// of SmolLM2's first choices.
#[test]
fn masks_computed_ahead_give_the_same_output() {
    let e = engine("smollm2-135m-instruct");
    let data = fixture();
    let schema = data["schemas"]["enums"].to_string();
    let validator = jsonschema::validator_for(&data["schemas"]["enums"]).unwrap();
    let prompts: Vec<&str> = data["prompts"].as_array().unwrap().iter().take(6).map(|p| p.as_str().unwrap()).collect();
    let (mut ahead, mut rejected) = (0, 0);
    for (i, prompt) in prompts.iter().enumerate() {
        let p = params(i, Constraint::JsonSchema(schema.clone()));
        let mut texts = Vec::new();
        for on in [false, true] {
            e.masks_ahead.store(on, std::sync::atomic::Ordering::Relaxed);
            // Both runs prefill the whole prompt (a prefix-cache hit prefills its tail in other chunks, which can
            // move a sampled token at a near tie).
            e.prefix_cache.shrink_to(0);
            let (text, r) = ask(&e, &format!("{prompt} Reply with JSON only."), &p, 96);
            let c = r.unwrap().constraint.unwrap();
            if on {
                ahead += c.masks_ahead;
                rejected += c.rejected;
            } else {
                assert_eq!(c.masks_ahead, 0);
            }
            texts.push(text);
        }
        assert_eq!(texts[0], texts[1], "prompt {i}");
        assert!(validator.is_valid(&serde_json::from_str(&texts[1]).unwrap()), "{}", texts[1]);
    }
    assert!(rejected > 0 && ahead > 0, "rejected {rejected}, masks computed ahead {ahead}");
}

/// Speculative decoding under a constraint: drafts are cut to what the schema accepts and checked against
/// the constrained chain, so greedy replies are those of plain constrained decoding (with the model drafting
/// for itself, where every draft the schema allows is accepted, and with prompt lookup), and sampled replies
/// validate.
#[test]
fn constrained_requests_speculate_with_the_same_greedy_output() {
    use sprig_engine::speculative::{DraftModel, Drafter, PromptLookup, SpecMode, Speculation};
    let e = engine("smollm2-135m-instruct");
    let data = fixture();
    let prompts: Vec<&str> = data["prompts"].as_array().unwrap().iter().take(3).map(|p| p.as_str().unwrap()).collect();
    let (mut drafted, mut accepted) = (0, 0);
    for name in ["nested", "enums"] {
        let schema = Constraint::JsonSchema(data["schemas"][name].to_string());
        let validator = jsonschema::validator_for(&data["schemas"][name]).unwrap();
        for (i, prompt) in prompts.iter().enumerate() {
            let msgs = [ChatMessage::new("user", &format!("{prompt} Reply with JSON only."))];
            let run = |spec: Option<Box<dyn Drafter>>, p: &SamplingParams| {
                // Every run prefills the whole prompt (see `masks_computed_ahead_give_the_same_output`).
                e.prefix_cache.shrink_to(0);
                let mut s = Session::new(e.clone(), 1024).unwrap();
                s.set_speculation(spec.map(|d| Speculation::new(d, SpecMode::On, 6)));
                let mut text = String::new();
                let r = s
                    .chat(&msgs, p, 128, |t| {
                        text.push_str(t);
                        true
                    })
                    .unwrap();
                (text, r)
            };
            let greedy = params(0, schema.clone());
            let (plain, _) = run(None, &greedy);
            let own: Box<dyn Drafter> = Box::new(DraftModel::new(e.clone(), &e, 0).unwrap());
            for (j, drafter) in [own, Box::new(PromptLookup::default()) as Box<dyn Drafter>].into_iter().enumerate() {
                let (text, r) = run(Some(drafter), &greedy);
                assert_eq!(text, plain, "{name}, prompt {i}, drafter {j}");
                let st = r.speculation.unwrap();
                (drafted, accepted) = (drafted + st.drafted, accepted + st.accepted);
            }
            let (text, _) = run(Some(Box::new(PromptLookup::default())), &params(2 * i + 1, schema.clone()));
            assert!(validator.is_valid(&serde_json::from_str(&text).unwrap()), "{name}, sampled: {text}");
        }
    }
    assert!(drafted > 0 && accepted > 0, "drafted {drafted}, accepted {accepted}");
    // A reply whose last token (the full stop that ends the regex) is sampled after accepted drafts: the
    // drafter never proposes it (no draft may end the constraint), the verification pass samples it.
    let sentence = SamplingParams { constraint: Some(Constraint::Regex("[A-Za-z ,']{1,300}\\.".into())), ..Default::default() };
    let prompt = "Write one sentence about the sea.";
    e.prefix_cache.shrink_to(0);
    let (plain, _) = ask(&e, prompt, &sentence, 96);
    let mut s = Session::new(e.clone(), 1024).unwrap();
    s.set_speculation(Some(Speculation::new(Box::new(DraftModel::new(e.clone(), &e, 0).unwrap()), SpecMode::On, 6)));
    let mut text = String::new();
    e.prefix_cache.shrink_to(0);
    let r = s
        .chat(&[ChatMessage::new("user", prompt)], &sentence, 96, |t| {
            text.push_str(t);
            true
        })
        .unwrap();
    assert!(plain.ends_with('.'), "{plain}");
    assert!(r.speculation.unwrap().accepted > 0);
    assert_eq!(text, plain);
}

#[test]
fn regex_grammar_bad_input_budget_cancellation_and_prefix_cache() {
    let e = engine("smollm2-135m-instruct");
    // A regex: the whole output matches it.
    let phone = SamplingParams { constraint: Some(Constraint::Regex(r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}".into())), ..Default::default() };
    let (text, r) = ask(&e, "What is the phone number of the town hall?", &phone, 40);
    assert_eq!(r.unwrap().stop, StopReason::StopToken);
    let b = text.as_bytes();
    assert_eq!(b.len(), 14, "{text}");
    assert!(b[0] == b'(' && b[4] == b')' && b[5] == b' ' && b[9] == b'-', "{text}");
    assert!([1, 2, 3, 6, 7, 8, 10, 11, 12, 13].iter().all(|&i| b[i].is_ascii_digit()), "{text}");

    // A Lark grammar.
    let lark = "start: answer \" because \" REASON\nanswer: \"yes\" | \"no\"\nREASON: /[a-z ]{1,30}/\n";
    let yes_no = SamplingParams { constraint: Some(Constraint::Lark(lark.into())), ..Default::default() };
    let (text, r) = ask(&e, "Is the sky blue?", &yes_no, 40);
    assert_eq!(r.unwrap().stop, StopReason::StopToken);
    let (answer, reason) = text.split_once(" because ").unwrap_or_else(|| panic!("{text}"));
    assert!(answer == "yes" || answer == "no", "{text}");
    assert!((1..=30).contains(&reason.len()) && reason.bytes().all(|c| c.is_ascii_lowercase() || c == b' '), "{text}");

    // Bad constraints: an error before any token, the text callback never called.
    for (c, why) in [
        (Constraint::JsonSchema("{\"type\": \"object\",".into()), "not valid JSON"),
        (Constraint::JsonSchema("[1, 2]".into()), "a schema is a JSON object"),
        (Constraint::JsonSchema(r#"{"type": "object", "properties": {"a": {"$ref": "https://example.com/s.json"}}}"#.into()), ""),
        (Constraint::JsonSchema(r#"{"type": "strng"}"#.into()), ""),
        (Constraint::Regex("(unclosed".into()), ""),
        (Constraint::Lark("start: undefined_rule\n".into()), ""),
    ] {
        let p = SamplingParams { constraint: Some(c.clone()), ..Default::default() };
        let (text, r) = ask(&e, "Hello", &p, 20);
        match r {
            Err(EngineError::Constraint { kind, detail }) => {
                assert_eq!(kind, c.kind());
                assert!(detail.contains(why), "{c:?}: {detail}");
                eprintln!("{c:?} -> {detail}");
            }
            other => panic!("{c:?}: {other:?}"),
        }
        assert!(text.is_empty(), "{c:?}: text before the error: {text}");
    }

    // A budget too small for the schema: a distinct stop reason, not an output that looks complete.
    let data = fixture();
    let nested = Constraint::JsonSchema(data["schemas"]["nested"].to_string());
    let (text, r) = ask(&e, "Describe a bakery.", &params(0, nested.clone()), 6);
    assert_eq!(r.unwrap().stop, StopReason::ConstraintUnsatisfied, "{text}");
    assert!(serde_json::from_str::<Value>(&text).is_err(), "{text}");

    // Cancelled after a few pieces: Cancelled; the session then answers the same request completely, and a
    // fresh session answers it the same way from the prefix cache.
    let mut s = Session::new(e.clone(), 1024).unwrap();
    let msgs = [ChatMessage::new("system", &"You write JSON for a city guide. ".repeat(8)), ChatMessage::new("user", "Describe a bakery.")];
    let mut pieces = 0;
    let r = s.chat(&msgs, &params(0, nested.clone()), 256, |t| {
        pieces += usize::from(!t.is_empty());
        pieces < 3
    });
    assert_eq!(r.unwrap().stop, StopReason::Cancelled);
    let run = |s: &mut Session<CpuBackend>| {
        let mut text = String::new();
        let r = s.chat(&msgs, &params(0, nested.clone()), 256, |t| {
            text.push_str(t);
            true
        });
        (text, r.unwrap())
    };
    s.reset().unwrap();
    let (first, r1) = run(&mut s);
    assert_eq!(r1.stop, StopReason::StopToken);
    let validator = jsonschema::validator_for(&data["schemas"]["nested"]).unwrap();
    assert!(validator.is_valid(&serde_json::from_str(&first).unwrap()), "{first}");
    let (second, r2) = run(&mut Session::new(e.clone(), 1024).unwrap());
    assert!(r2.prefix_cache_tokens >= 64, "the system prompt's blocks come from the prefix cache: {}", r2.prefix_cache_tokens);
    assert_eq!(first, second);
}

#[test]
fn tool_calls_on_qwen_are_parsed_constrained_and_continue_with_results() {
    let e = engine("qwen2.5-coder-0.5b-instruct");
    let tools_json = std::fs::read_to_string(fixtures().join("tools/car-tools.json")).unwrap();
    let tools: Value = serde_json::from_str(&tools_json).unwrap();
    let schema_of = |name: &str| {
        tools.as_array().unwrap().iter().find(|t| t["function"]["name"] == name).unwrap()["function"]["parameters"].clone()
    };
    let mut s = Session::new(e.clone(), 2048).unwrap();
    let mut msgs = vec![ChatMessage::new("user", "Open the passenger window halfway.")];
    let greedy = SamplingParams::default();
    for choice in [ToolChoice::Required, ToolChoice::Function("set_window".into())] {
        let t = Tools::from_json(&tools_json, choice.clone(), true).unwrap();
        let r = s.chat_with_tools(&msgs, Some(&t), &greedy, 128, |_| true).unwrap();
        assert_eq!(r.stop, StopReason::StopToken, "{choice:?}");
        assert_eq!(r.tool_calls.len(), 1, "{choice:?}: {:?}", r.tool_calls);
        let call = &r.tool_calls[0];
        let args: Value = serde_json::from_str(&call.arguments).unwrap();
        let schema = schema_of(&call.name);
        assert!(jsonschema::validator_for(&schema).unwrap().is_valid(&args), "{choice:?}: {call:?}");
        if choice != ToolChoice::Required {
            assert_eq!(call.name, "set_window");
        }
    }
    // The session recorded the call; a tool result continues the turn and the model answers in text.
    let recorded = s.messages().last().unwrap().clone();
    assert_eq!((recorded.role.as_str(), recorded.tool_calls.len()), ("assistant", 1));
    msgs.push(recorded);
    let mut result = ChatMessage::new("tool", "{\"ok\": true, \"window\": \"passenger\", \"position\": \"half\"}");
    result.name = Some("set_window".into());
    msgs.push(result);
    let t = Tools::from_json(&tools_json, ToolChoice::None, true).unwrap();
    let mut text = String::new();
    let r = s
        .chat_with_tools(&msgs, Some(&t), &greedy, 64, |p| {
            text.push_str(p);
            true
        })
        .unwrap();
    assert!(r.tool_calls.is_empty());
    assert!(!text.trim().is_empty() && !text.contains("<tool_call>"), "{text}");
    assert!(r.cached_tokens > 500, "the turn continues the cached conversation: {} cached", r.cached_tokens);
    // Tools and a response constraint together are refused before anything runs.
    let t = Tools::from_json(&tools_json, ToolChoice::Required, true).unwrap();
    let both = SamplingParams { constraint: Some(Constraint::JsonObject), ..Default::default() };
    assert!(matches!(s.chat_with_tools(&msgs, Some(&t), &both, 16, |_| true), Err(EngineError::Tools(_))));
}
