//! The session engine's request semantics: stop strings across token boundaries, cancellation during prefill
//! leaving a state the next call continues from, penalties over the conversation.

use std::sync::Arc;

use sprig_engine::generate::{StopReason, PREFILL_CHUNK};
use sprig_engine::{ChatMessage, ContextPolicy, SamplingParams, Session};
use sprig_import::QuantChoice;
use sprig_tests::*;

fn greedy() -> SamplingParams {
    SamplingParams { temperature: 0.0, ..Default::default() }
}

#[test]
fn stop_string_across_a_token_boundary() {
    let (model, tok) = stories260k();
    let e = Arc::new(cpu_engine(open(&model, Some(tok), QuantChoice::Keep), 2));
    let mut s = Session::new(e.clone(), 0).unwrap();
    let mut pieces = Vec::new();
    s.generate("Once upon a time", false, &greedy(), 60, |p| {
        if !p.is_empty() {
            pieces.push(p.to_string());
        }
        true
    })
    .unwrap();
    // A stop string made of the end of one piece and the start of the next.
    let i = (10..pieces.len() - 1).find(|&i| pieces[i].len() >= 2 && pieces[i + 1].len() >= 2).expect("two pieces");
    let (a, b) = (&pieces[i], &pieces[i + 1]);
    let stop = format!("{}{}", &a[a.len() - 2..], &b[..2]);
    let all: String = pieces.concat();
    let want = &all[..all.find(&stop).unwrap()];
    s.reset().unwrap();
    let mut got = String::new();
    let params = SamplingParams { stop: vec!["never seen".into(), stop.clone()], ..greedy() };
    let r = s
        .generate("Once upon a time", false, &params, 60, |p| {
            got.push_str(p);
            true
        })
        .unwrap();
    assert_eq!(r.stop, StopReason::StopString, "stop `{stop}`");
    assert_eq!(got, want, "stop `{stop}`");
    // A stop string that never comes changes nothing, the held-back text included.
    s.reset().unwrap();
    let mut again = String::new();
    let never = SamplingParams { stop: vec![format!("{stop}~")], ..greedy() };
    s.generate("Once upon a time", false, &never, 60, |p| {
        again.push_str(p);
        true
    })
    .unwrap();
    assert_eq!(again, all);
}

#[test]
fn cancel_during_prefill_then_chat_equals_a_fresh_run() {
    let e = Arc::new(cpu_engine(open(&registry_model("smollm2-135m-instruct"), None, QuantChoice::Keep), 2));
    // A user turn long enough for two prefill chunks.
    let long: String = (0..140).map(|i| format!("item {i}, ")).collect();
    let turns = vec![ChatMessage::new("user", &format!("Here is a list: {long} What is the first item?"))];
    let prompt = e.chat_tokens(&turns).unwrap();
    assert!(prompt.len() > PREFILL_CHUNK + 16, "{} tokens", prompt.len());

    let mut cancelled = Session::new(e.clone(), 2048).unwrap();
    let mut polls = 0;
    let r = cancelled
        .chat(&turns, &greedy(), 8, |p| {
            polls += 1;
            // The first poll comes before the first chunk, the second after it: cancel there.
            !(p.is_empty() && polls == 2)
        })
        .unwrap();
    assert_eq!((r.stop, r.prompt_tokens, r.generated.len()), (StopReason::Cancelled, PREFILL_CHUNK, 0));
    assert_eq!(cancelled.tokens(), &prompt[..PREFILL_CHUNK], "the session holds exactly the processed tokens");
    assert_eq!(cancelled.state.pos, PREFILL_CHUNK);

    let run = |s: &mut Session<_>| {
        let mut text = String::new();
        let r = s
            .chat(&turns, &greedy(), 12, |p| {
                text.push_str(p);
                true
            })
            .unwrap();
        (text, r)
    };
    let (resumed, r1) = run(&mut cancelled);
    assert_eq!(r1.prompt_tokens, prompt.len() - PREFILL_CHUNK, "only the rest of the prompt ran");
    let mut fresh = Session::new(e.clone(), 2048).unwrap();
    let (want, _) = run(&mut fresh);
    assert_eq!(resumed, want);
    assert_eq!(cancelled.tokens(), fresh.tokens());
}

#[test]
fn penalties_see_the_conversation() {
    // A strong frequency penalty on a story that repeats itself greedily changes the continuation, and it
    // counts the earlier turn: a second request continuing the same session differs from one without the
    // penalty window.
    let (model, tok) = stories260k();
    let e = Arc::new(cpu_engine(open(&model, Some(tok), QuantChoice::Keep), 2));
    let text = |params: &SamplingParams| {
        let mut s = Session::new(e.clone(), 0).unwrap();
        let mut out = String::new();
        s.generate("Once upon a time", false, params, 80, |p| {
            out.push_str(p);
            true
        })
        .unwrap();
        out
    };
    let plain = text(&greedy());
    let penalised = text(&SamplingParams { frequency_penalty: 2.0, presence_penalty: 1.0, ..greedy() });
    assert_ne!(plain, penalised);
    // A window of 0 turns the penalties off.
    assert_eq!(text(&SamplingParams { frequency_penalty: 2.0, penalty_last_n: 0, ..greedy() }), plain);
}

fn tmp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("sprig-session-{}-{name}", std::process::id()))
}

#[test]
fn saved_session_continues_exactly_and_bad_files_are_refused() {
    let e = Arc::new(cpu_engine(open(&registry_model("smollm2-135m-instruct"), None, QuantChoice::Keep), 2));
    // The restored session must continue bit for bit: its turn runs the same chunks as the original's, not
    // blocks of the original's turn from the prefix cache (equal only to rounding: other kernel shapes).
    e.prefix_cache.set_budget(0);
    // Sampling, so the restored random stream matters too.
    let params = SamplingParams { temperature: 0.8, seed: 4, ..Default::default() };
    let turn = |s: &mut Session<_>, messages: &[ChatMessage]| {
        let mut text = String::new();
        s.chat(messages, &params, 24, |p| {
            text.push_str(p);
            true
        })
        .unwrap();
        text
    };
    let mut a = Session::new(e.clone(), 1024).unwrap();
    turn(&mut a, &[ChatMessage::new("user", "Name three colours.")]);
    let path = tmp("a.session");
    a.save(&path).unwrap();
    let mut second: Vec<ChatMessage> = a.messages().to_vec();
    second.push(ChatMessage::new("user", "And three animals?"));
    let want = turn(&mut a, &second);

    let mut b = Session::new(e.clone(), 1024).unwrap();
    b.load(&path).unwrap();
    assert_eq!(b.messages(), &second[..second.len() - 1]);
    let got = turn(&mut b, &second);
    assert_eq!(got, want, "the restored session continues as the original did");
    assert_eq!(a.tokens(), b.tokens());

    // Damaged, truncated, another model's, longer than the context: refused, and the session is left fresh.
    let bytes = std::fs::read(&path).unwrap();
    let mut flipped = bytes.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 1;
    let bad = tmp("bad.session");
    let (model, tok) = stories260k();
    let other = Arc::new(cpu_engine(open(&model, Some(tok), QuantChoice::Keep), 2));
    let mut o = Session::new(other, 0).unwrap();
    o.generate("Once upon a time", false, &greedy(), 8, |_| true).unwrap();
    let other_path = tmp("other.session");
    o.save(&other_path).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("a flipped bit", flipped, "checksum"),
        ("a truncated file", bytes[..bytes.len() - 100].to_vec(), "checksum"),
        ("another model's", std::fs::read(&other_path).unwrap(), "another model"),
        ("not a session", b"GGUF and more bytes than that".repeat(4), "not a sprig session"),
    ];
    for (what, data, msg) in cases {
        std::fs::write(&bad, data).unwrap();
        let mut s = Session::new(e.clone(), 1024).unwrap();
        turn(&mut s, &[ChatMessage::new("user", "Hi")]);
        let err = s.load(&bad).unwrap_err().to_string();
        assert!(err.contains(msg), "{what}: {err}");
        assert_eq!((s.state.pos, s.tokens().len(), s.messages().len()), (0, 0, 0), "{what}: not left fresh");
    }
    let mut small = Session::new(e.clone(), 16).unwrap();
    let err = small.load(&path).unwrap_err().to_string();
    assert!(err.contains("context"), "{err}");
    for p in [path, bad, other_path] {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn sliding_window_session_restores_its_rings() {
    // A Gemma 3-shaped model (five sliding layers of window 8 per global one): the saved rings hold only the
    // window, and the restored session continues exactly.
    use sprig_import::synth::{write_gguf, Arch, SynthSpec};
    let spec = SynthSpec { n_layers: 6, ..SynthSpec::tiny(Arch::Gemma3) };
    let gguf = tmp("gemma.gguf");
    write_gguf(&spec, &gguf).unwrap();
    let e = Arc::new(cpu_engine(open(&gguf, None, QuantChoice::Keep), 2));
    assert!(e.model.config.attention.iter().any(|a| *a != sprig_format::AttentionKind::Global));
    let p = SamplingParams { temperature: 0.9, seed: 2, ..Default::default() };
    let run = |s: &mut Session<_>, text: &str| {
        let mut out = Vec::new();
        s.generate(text, false, &p, 20, |_| true).map(|r| out.extend(r.generated)).unwrap();
        out
    };
    let mut a = Session::new(e.clone(), 128).unwrap();
    run(&mut a, "the cat sat on the mat and then the cat sat again");
    let path = tmp("gemma.session");
    a.save(&path).unwrap();
    let want = run(&mut a, " then");
    let mut b = Session::new(e.clone(), 128).unwrap();
    b.load(&path).unwrap();
    assert_eq!(run(&mut b, " then"), want);
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(gguf);
}

/// The logits of the prompt's last token after `text` (one token generated: it is sampled, never fed).
fn prompt_logits<B: sprig_backend::Backend>(
    s: &mut Session<B>,
    text: &str,
) -> (Vec<f32>, sprig_engine::GenerationStats) {
    let r = s.generate(text, false, &greedy(), 1, |_| true).unwrap();
    let mut logits = Vec::new();
    s.engine.model.read_logits(&s.state, &mut logits).unwrap();
    (logits, r)
}

/// A Gemma 3-shaped synthetic model (sliding layers of `window` per global one) as a GGUF file.
fn synthetic_gemma(window: usize, name: &str) -> std::path::PathBuf {
    use sprig_import::synth::{write_gguf, Arch, SynthSpec};
    let spec = SynthSpec { n_layers: 6, sliding: Some((window, 6)), ..SynthSpec::tiny(Arch::Gemma3) };
    let gguf = tmp(name);
    write_gguf(&spec, &gguf).unwrap();
    gguf
}

#[test]
fn prefix_cache_is_shared_by_sessions_and_changes_nothing() {
    // A model of global layers, and sliding-window ones whose window is below and above a block: a second
    // session whose prompt starts like the first one's restores those blocks, and its logits are those of an
    // engine without a prefix cache.
    let story: String = (0..18).map(|i| format!("the cat number {i} sat on the mat. ")).collect();
    let (model, tok) = stories260k();
    let sources: Vec<(std::path::PathBuf, Option<std::path::PathBuf>)> = vec![
        (model, Some(tok)),
        (synthetic_gemma(8, "prefix-w8.gguf"), None),
        (synthetic_gemma(40, "prefix-w40.gguf"), None),
    ];
    for (path, tok) in &sources {
        let file = open(path, tok.clone(), QuantChoice::Keep);
        let cached = Arc::new(cpu_engine(file.clone(), 2));
        let plain = Arc::new(cpu_engine(file, 2));
        plain.prefix_cache.set_budget(0);
        let mut a = Session::new(cached.clone(), 512).unwrap();
        let (_, first) = prompt_logits(&mut a, &story);
        assert_eq!((first.cached_tokens, first.prefix_cache_tokens, first.context_dropped), (0, 0, 0));
        let longer = format!("{story} and then the dog");
        let mut b = Session::new(cached.clone(), 512).unwrap();
        let (got, r) = prompt_logits(&mut b, &longer);
        let mut c = Session::new(plain.clone(), 512).unwrap();
        let (want, r_plain) = prompt_logits(&mut c, &longer);
        let whole = r_plain.prompt_tokens;
        assert_eq!((r_plain.cached_tokens, r.cached_tokens + r.prompt_tokens), (0, whole));
        assert!(r.prefix_cache_tokens >= whole - 2 * 16 - 8, "{path:?}: {} of {whole} from the cache", r.prefix_cache_tokens);
        assert_eq!(r.prefix_cache_tokens % 16, 0);
        let err = rel_err(&got, &want);
        assert!(err < 1e-4, "{path:?}: logits differ by {err} with the prefix cache");
        let st = cached.prefix_cache.stats();
        assert_eq!((st.requests, st.shared_tokens), (2, r.prefix_cache_tokens as u64));
        assert!(st.blocks > 0 && st.bytes > 0);
        // Without room for one block the cache holds nothing, and sessions still run.
        cached.prefix_cache.set_budget(1);
        assert_eq!(cached.prefix_cache.stats().blocks, 0);
        let mut d = Session::new(cached.clone(), 512).unwrap();
        let (again, r) = prompt_logits(&mut d, &longer);
        assert_eq!(r.prefix_cache_tokens, 0);
        assert!(rel_err(&again, &want) < 1e-4);
    }
    for (p, _) in &sources[1..] {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn chat_sessions_share_the_system_prompt() {
    let e = Arc::new(cpu_engine(open(&registry_model("smollm2-135m-instruct"), None, QuantChoice::Keep), 2));
    let system = ChatMessage::new("system", &"You answer questions about the weather in one short sentence. ".repeat(6));
    let ask = |q: &str| {
        let mut s = Session::new(e.clone(), 1024).unwrap();
        s.chat(&[system.clone(), ChatMessage::new("user", q)], &greedy(), 4, |_| true).unwrap()
    };
    let first = ask("Is it raining?");
    let second = ask("Will it snow tomorrow?");
    let system_tokens = e.chat_tokens(std::slice::from_ref(&system)).unwrap().len();
    assert_eq!(first.prefix_cache_tokens, 0);
    assert!(second.prefix_cache_tokens + 16 >= system_tokens - 8, "{} of ~{system_tokens}", second.prefix_cache_tokens);
}

/// A chat of `turns` short turns under `policy` in a context of `ctx`; returns the session and the tokens
/// the policy dropped.
fn long_chat(e: &Arc<sprig_engine::Engine<sprig_backend::cpu::CpuBackend>>, policy: ContextPolicy, ctx: usize) -> (Session<sprig_backend::cpu::CpuBackend>, usize, usize) {
    let mut s = Session::new(e.clone(), ctx).unwrap();
    s.set_context_policy(policy, 0);
    let mut messages = vec![ChatMessage::new("system", "You are a terse assistant.")];
    let (mut dropped, mut turn) = (0, 0);
    // Until the whole conversation is five times the context.
    while e.chat_tokens(&messages).unwrap().len() < 5 * ctx {
        messages.push(ChatMessage::new("user", &format!("Question {turn}: name an animal and a colour.")));
        let r = s.chat(&messages, &greedy(), 24, |_| true).unwrap_or_else(|err| panic!("{policy:?} turn {turn}: {err}"));
        dropped += r.context_dropped;
        assert!(s.state.pos <= ctx);
        messages = s.messages().to_vec();
        turn += 1;
    }
    (s, dropped, turn)
}

#[test]
fn a_conversation_five_times_the_context_never_overflows() {
    use sprig_models::Logits;
    let e = Arc::new(cpu_engine(open(&registry_model("smollm2-135m-instruct"), None, QuantChoice::Keep), 2));
    let ctx = 192;
    let layout = e.model.kv_layout(ctx);
    let fresh = |tokens: &[u32]| {
        let mut st = e.model.new_state(ctx).unwrap();
        e.model.forward(&mut st, tokens, Logits::Last).unwrap();
        st
    };

    // Truncating runs the kept tokens again: the state is a fresh run of what it holds.
    let (s, dropped, turns) = long_chat(&e, ContextPolicy::TruncateMiddle, ctx);
    assert!(dropped > 4 * ctx, "{dropped} tokens dropped over {turns} turns");
    let system = e.chat_tokens(&[ChatMessage::new("system", "You are a terse assistant.")]).unwrap();
    assert_eq!(s.tokens()[..system.len() - 8], system[..system.len() - 8], "the system prompt is kept");
    let st = fresh(s.tokens());
    // The noise between a state built by decoding and one built by a single prefill, without any drop.
    let mut long = Session::new(e.clone(), 2048).unwrap();
    let mut m = vec![ChatMessage::new("system", "You are a terse assistant.")];
    for turn in 0..3 {
        m.push(ChatMessage::new("user", &format!("Question {turn}: name an animal and a colour.")));
        long.chat(&m, &greedy(), 24, |_| true).unwrap();
        m = long.messages().to_vec();
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    e.model.read_logits(&long.state, &mut a).unwrap();
    let mut st0 = e.model.new_state(2048).unwrap();
    e.model.forward(&mut st0, long.tokens(), Logits::Last).unwrap();
    e.model.read_logits(&st0, &mut b).unwrap();
    let noise = rel_err(&a, &b);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    e.model.read_logits(&s.state, &mut a).unwrap();
    e.model.read_logits(&st, &mut b).unwrap();
    // (Decoded tokens go through the one-row kernels, a prefill through the batched ones: ~2 % apart here.)
    let err = rel_err(&a, &b);
    assert!(err < 2.0 * noise.max(1e-3), "truncated state vs fresh run: {err} (without any drop: {noise})");

    // Shifting rotates the kept keys: the first layer's (which depend on the token and position only) are
    // those of a fresh run of what the state holds; values are moved as they were.
    let (s, dropped, _) = long_chat(&e, ContextPolicy::Shift, ctx);
    assert!(dropped > 4 * ctx);
    let st = fresh(s.tokens());
    let b_ = &*e.model.backend;
    use sprig_backend::Backend;
    let ((mut k1, mut v1), (mut k2, mut v2)) = ((Vec::new(), Vec::new()), (Vec::new(), Vec::new()));
    b_.kv_read(s.state.kv_cache(), 0, 0..s.state.pos, &mut k1, &mut v1).unwrap();
    b_.kv_read(st.kv_cache(), 0, 0..st.pos, &mut k2, &mut v2).unwrap();
    assert!(rel_err(&k1, &k2) < 1e-4, "shifted keys vs fresh: {}", rel_err(&k1, &k2));
    assert!(rel_err(&v1, &v2) < 1e-5);
    assert_eq!(layout.kv_dim * s.state.pos, k1.len());

    // The error policy ends it: the prompt is refused, or the reply stops at the full context.
    let mut s = Session::new(e.clone(), ctx).unwrap();
    s.set_context_policy(ContextPolicy::Error, 0);
    let mut messages = vec![ChatMessage::new("system", "You are a terse assistant.")];
    let ended = (0..40).any(|turn| {
        messages.push(ChatMessage::new("user", &format!("Question {turn}: name an animal and a colour.")));
        match s.chat(&messages, &greedy(), 24, |_| true) {
            Err(err) => err.is_context_overflow(),
            Ok(r) => {
                messages = s.messages().to_vec();
                r.stop == StopReason::ContextFull
            }
        }
    });
    assert!(ended);
}

#[test]
fn sliding_window_generation_runs_past_the_context() {
    for window in [8, 40] {
        let gguf = synthetic_gemma(window, &format!("policy-w{window}.gguf"));
        let e = Arc::new(cpu_engine(open(&gguf, None, QuantChoice::Keep), 2));
        for policy in [ContextPolicy::TruncateMiddle, ContextPolicy::Shift] {
            let mut s = Session::new(e.clone(), 64).unwrap();
            s.set_context_policy(policy, 4);
            // Stop tokens banned: the story must run on.
            let stops = (0..e.model.config.vocab_size as u32).filter(|&t| e.tokenizer.is_stop(t));
            let logit_bias = stops.map(|t| (t, -1e9)).collect();
            let p = SamplingParams { temperature: 0.9, seed: 1, logit_bias, ..Default::default() };
            let r = s.generate("the cat sat on the mat", false, &p, 5 * 64, |_| true).unwrap();
            assert_eq!(r.generated.len(), 5 * 64, "{policy:?} window {window}: {:?}", r.stop);
            assert!(r.context_dropped >= 4 * 64 - 32, "{policy:?}: {}", r.context_dropped);
            assert_eq!(s.tokens().len(), s.state.pos);
        }
        let _ = std::fs::remove_file(gguf);
    }
}

#[test]
fn batched_sessions_answer_as_each_alone() {
    use sprig_engine::{run_batch, BatchRequest, Prompt};
    // Different prompt lengths (so prefill interleaves with decoding) and lengths of reply; greedy.
    let (model, tok) = stories260k();
    let e = Arc::new(cpu_engine(open(&model, Some(tok), QuantChoice::Keep), 2));
    let prompts = ["Once upon a time", "The dog ran to the park and saw a big red ball. It", "Lily", "Tom had a toy"];
    let alone: Vec<String> = prompts
        .iter()
        .map(|p| {
            let mut s = Session::new(e.clone(), 0).unwrap();
            let mut out = String::new();
            s.generate(p, false, &greedy(), 40, |t| {
                out.push_str(t);
                true
            })
            .unwrap();
            out
        })
        .collect();
    let mut sessions: Vec<Session<_>> = prompts.iter().map(|_| Session::new(e.clone(), 0).unwrap()).collect();
    let mut outs: Vec<String> = prompts.iter().map(|_| String::new()).collect();
    let requests: Vec<BatchRequest<'_, _>> = sessions
        .iter_mut()
        .zip(outs.iter_mut())
        .zip(prompts)
        .map(|((s, out), p)| BatchRequest {
            session: s,
            prompt: Prompt::Text { text: p.to_string(), parse_special: false },
            params: greedy(),
            max_new: 40,
            on_text: Box::new(move |t: &str| {
                out.push_str(t);
                true
            }),
            on_logprob: None,
        })
        .collect();
    let results = run_batch(requests);
    for (r, p) in results.iter().zip(prompts) {
        let r = r.as_ref().unwrap();
        assert_eq!(r.prompt_tokens + r.cached_tokens, e.tokenizer.encode_parts(&[(p, false)], true).unwrap().len());
    }
    assert_eq!(outs, alone);
    // The sessions continue as sessions: a second (single) request on each goes on from the batch's state.
    for (s, out) in sessions.iter_mut().zip(&outs) {
        assert_eq!(s.tokens().len(), s.state.pos);
        assert!(!out.is_empty());
    }
}

#[test]
fn continuous_batch_requests_join_mid_run_and_answer_as_each_alone() {
    use std::cell::RefCell;
    use std::rc::Rc;
    use sprig_engine::{ContinuousBatch, Prompt, Request};
    let (model, tok) = stories260k();
    let e = Arc::new(cpu_engine(open(&model, Some(tok), QuantChoice::Keep), 2));
    let prompts = ["Once upon a time", "The dog ran to the park and saw a big red ball. It", "Lily", "Tom had a toy", "Sam"];
    let lens = [40, 12, 30, 25, 8];
    let alone: Vec<String> = prompts
        .iter()
        .zip(lens)
        .map(|(p, n)| {
            let mut s = Session::new(e.clone(), 0).unwrap();
            let mut out = String::new();
            s.generate(p, false, &greedy(), n, |t| {
                out.push_str(t);
                true
            })
            .unwrap();
            out
        })
        .collect();
    let outs: Vec<Rc<RefCell<String>>> = prompts.iter().map(|_| Rc::default()).collect();
    let request = |i: usize| {
        let out = outs[i].clone();
        Request {
            prompt: Prompt::Text { text: prompts[i].to_string(), parse_special: false },
            params: greedy(),
            max_new: lens[i],
            on_text: Box::new(move |t: &str| {
                out.borrow_mut().push_str(t);
                true
            }),
            on_logprob: None,
        }
    };
    let mut batch = ContinuousBatch::new(&e);
    // Two start; the others join one by one while those decode; each leaves as soon as it ends.
    for i in 0..2 {
        assert!(batch.add(Session::new(e.clone(), 0).unwrap(), request(i), i).is_ok());
    }
    let (mut next, mut ended, mut steps, mut left_early) = (2, Vec::new(), 0, false);
    while !batch.is_empty() || next < prompts.len() {
        if steps % 5 == 4 && next < prompts.len() {
            assert!(batch.add(Session::new(e.clone(), 0).unwrap(), request(next), next).is_ok());
            next += 1;
        }
        for f in batch.step() {
            let r = f.result.unwrap();
            assert_eq!(f.session.tokens().len(), f.session.state.pos);
            left_early |= !batch.is_empty() || next < prompts.len();
            ended.push((f.tag, r.generated.len()));
        }
        steps += 1;
    }
    let got: Vec<String> = outs.iter().map(|o| o.borrow().clone()).collect();
    assert_eq!(got, alone);
    assert!(left_early, "a request left while others still ran");
    // The short reply (request 1) ended before the long first one.
    let pos = |i: usize| ended.iter().position(|&(t, _)| t == i).unwrap();
    assert!(pos(1) < pos(0), "{ended:?}");
    // A refused request comes back at once with its session.
    let bad = Request { params: SamplingParams { temperature: -1.0, ..greedy() }, ..request(0) };
    let f = batch.add(Session::new(e.clone(), 0).unwrap(), bad, 9).unwrap_err();
    assert!(f.result.unwrap_err().to_string().contains("temperature") && f.tag == 9);
}

#[test]
fn int8_kv_session_saves_its_codes_and_continues_exactly() {
    use sprig_backend::KvDtype;
    let e = Arc::new(cpu_engine(open(&registry_model("smollm2-135m-instruct"), None, QuantChoice::Keep), 2));
    e.prefix_cache.set_budget(0);
    let turn = |s: &mut Session<_>, text: &str| {
        let mut out = String::new();
        s.generate(text, false, &greedy(), 16, |p| {
            out.push_str(p);
            true
        })
        .unwrap();
        out
    };
    let story = "Once upon a time, in a small town by the sea, there lived an old fisherman who";
    let mut sizes = Vec::new();
    for kv in KvDtype::ALL {
        e.model.set_kv_dtype(kv);
        let mut a = Session::new(e.clone(), 512).unwrap();
        turn(&mut a, story);
        let path = tmp(&format!("{}.session", kv.name()));
        a.save(&path).unwrap();
        sizes.push(std::fs::metadata(&path).unwrap().len());
        let want = turn(&mut a, " Then");
        let mut b = Session::new(e.clone(), 512).unwrap();
        b.load(&path).unwrap();
        assert_eq!(turn(&mut b, " Then"), want, "{kv:?}: the restored session continues as the original");
        // A session storing the other type refuses the file.
        e.model.set_kv_dtype(if kv == KvDtype::F32 { KvDtype::Q8 } else { KvDtype::F32 });
        let mut other = Session::new(e.clone(), 512).unwrap();
        let err = other.load(&path).unwrap_err().to_string();
        assert!(err.contains("KV layout"), "{err}");
        let _ = std::fs::remove_file(path);
    }
    // The int8 file holds codes and scales: well under half the f32 one.
    assert!(sizes[1] * 2 < sizes[0], "{sizes:?}");
}

#[test]
fn a_trimmed_session_continues_from_the_prefix_cache() {
    // stories260K's f32 weights: a forward pass gives the same bits whatever its chunking, so the trimmed
    // session (its blocks restored from the prefix cache) must continue exactly as the untrimmed one.
    let (model, tok) = stories260k();
    let e = Arc::new(cpu_engine(open(&model, Some(tok), QuantChoice::Keep), 2));
    let run = |s: &mut Session<_>, text: &str| {
        let mut out = String::new();
        let r = s
            .generate(text, false, &greedy(), 30, |p| {
                out.push_str(p);
                true
            })
            .unwrap();
        (out, r)
    };
    let mut a = Session::new(e.clone(), 0).unwrap();
    let mut b = Session::new(e.clone(), 0).unwrap();
    for s in [&mut a, &mut b] {
        run(s, "Once upon a time, there was a little girl named Lily. She loved to play outside.");
    }
    let held = a.tokens().to_vec();
    let freed = a.trim().unwrap();
    assert!(freed > 0 && a.state.pos == 0);
    assert_eq!(a.tokens(), &held[..], "the conversation is kept");
    assert!(a.save(&tmp("trimmed.session")).is_err(), "nothing to save until the next request");
    let (got, r) = run(&mut a, " One day");
    let (want, _) = run(&mut b, " One day");
    assert_eq!(got, want);
    assert!(r.prefix_cache_tokens >= held.len() / 16 * 16 - 16, "{} of {} restored", r.prefix_cache_tokens, held.len());
    assert_eq!(a.tokens(), b.tokens());
}

#[test]
fn int8_kv_prefix_cache_keeps_the_codes() {
    use sprig_backend::KvDtype;
    let (model, tok) = stories260k();
    let file = open(&model, Some(tok), QuantChoice::Keep);
    let story: String = (0..12).map(|i| format!("the cat number {i} sat on the mat. ")).collect();
    let longer = format!("{story} and then the dog");
    let mut bytes = Vec::new();
    for kv in KvDtype::ALL {
        let cached = Arc::new(cpu_engine(file.clone(), 2));
        let plain = Arc::new(cpu_engine(file.clone(), 2));
        plain.prefix_cache.set_budget(0);
        for e in [&cached, &plain] {
            e.model.set_kv_dtype(kv);
        }
        prompt_logits(&mut Session::new(cached.clone(), 512).unwrap(), &story);
        let (got, r) = prompt_logits(&mut Session::new(cached.clone(), 512).unwrap(), &longer);
        let (want, _) = prompt_logits(&mut Session::new(plain.clone(), 512).unwrap(), &longer);
        assert!(r.prefix_cache_tokens >= 16, "{kv:?}: {} restored", r.prefix_cache_tokens);
        assert!(rel_err(&got, &want) < 1e-4, "{kv:?}: {}", rel_err(&got, &want));
        bytes.push(cached.prefix_cache.stats().bytes);
    }
    // The int8 blocks hold codes and scales.
    assert!(bytes[1] * 2 < bytes[0], "{bytes:?}");
}
