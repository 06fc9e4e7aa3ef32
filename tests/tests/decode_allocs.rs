//! "Decode allocates nothing per token", checked: a counting global allocator around the engine's generation
//! loop (forward pass, logits, sampler, streaming text) on the CPU backend, for int4, int8 and f16 weights.
//! (Checked to fail before the fix: `StreamDecoder::push` returned a new `String` per token, f16 linears
//! allocated a row of scratch per call, attention's score buffer regrew as the context filled.)
//! One test in this binary, so no other test allocates while it counts.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use sprig_engine::{Sampler, SamplingParams};
use sprig_import::QuantChoice;
use sprig_tests::*;

struct Counting;
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call forwards to the system allocator unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(p, l, new) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn decode_allocates_nothing_per_token() {
    let (model, tok) = stories260k();
    for quant in [QuantChoice::Q4, QuantChoice::Q8, QuantChoice::F16] {
        let e = cpu_engine(open(&model, Some(tok.clone()), quant), 2);
        let prompt = e.tokenizer.encode_prompt("Once upon a time").unwrap();
        // Allocations between the first and the last streamed piece of a generation of `n` tokens: every decode
        // step in between (forward pass, logits to the host, sampling, text) but not the prefill, whose
        // per-thread kernel scratch grows on whichever pool thread first runs a panel.
        let decode_allocations = |n: usize, temperature: f32| {
            let mut st = e.model.new_state(0).unwrap();
            // The whole chain: penalties over a window, a bias, and a stop string that never comes (its matcher
            // holds and releases text every token).
            let params = SamplingParams {
                temperature,
                seed: 1,
                repeat_penalty: 1.1,
                frequency_penalty: 0.1,
                presence_penalty: 0.1,
                min_p: 0.01,
                typical_p: 0.99,
                logit_bias: vec![(5, 0.5)],
                stop: vec!["zzqzz".into(), "the zebra queen".into()],
                ..Default::default()
            };
            let mut s = Sampler::new(params).unwrap();
            let (mut first, mut last, mut pieces) = (None, 0, 0);
            let stats = e
                .generate(&mut st, &prompt, n, &mut s, false, |piece| {
                    if piece.is_empty() {
                        return true; // a poll (between prefill chunks, or a token with no text yet)
                    }
                    let now = ALLOCATIONS.load(Ordering::SeqCst);
                    first.get_or_insert(now);
                    last = now;
                    pieces += 1;
                    true
                })
                .unwrap();
            assert!(stats.generated.len() >= n.min(72), "{quant:?}: stopped after {} tokens", stats.generated.len());
            // Streamed piece by piece (text that may start a stop string is held back and merged).
            assert!(pieces >= n - n / 8, "{quant:?}: {pieces} pieces streamed");
            last - first.unwrap()
        };
        for temperature in [0.0, 0.8] {
            // A first run warms what is set up once per process (pool threads' scratch, lazy statics).
            decode_allocations(8, temperature);
            // sprig's own code allocates nothing per token. What remains is rayon's: entering the CPU pool from
            // the generating thread (once per forward pass) pushes a job on crossbeam's injector queue, which
            // allocates a new block every 63 pushes. So 192 decode steps may see ~3 allocations; a per-token
            // allocation would show 64 or more (every run decodes at least 64 tokens).
            let n = decode_allocations(8 + 192, temperature);
            assert!(n <= 8, "{quant:?} t={temperature}: {n} allocations while decoding up to 192 tokens");
        }
    }
}
