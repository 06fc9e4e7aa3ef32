//! Checks every op of one backend against another (normally the burn reference) on random inputs, odd sizes
//! included. Used by the test suites of every backend.

use std::sync::Arc;

use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sprig_format::testutil::tiny_config;
use sprig_format::{ContainerWriter, ModelFile};
use sprig_quant::quantize::quantize;
use sprig_quant::Scheme;

use crate::{
    composite, Activation, AttentionParams, Backend, ExpertWeights, KvLayout, MoeParams, MoeUsage, RopeLayout,
    RopeParams, RopeScaling, Unary,
};
use sprig_format::config::RouterScoring;

/// Weight kinds every backend must accept, with the largest error (relative to the largest reference output)
/// a backend may add to an embedding lookup (exact dequantization, but for the GPU's Q6K: it goes up widened
/// to int8, half a step of 1/127 of a block's largest weight) and to a product with quantized activations.
const WEIGHTS: &[(&str, f32, f32)] = &[
    ("f32", 1e-6, 1e-4),
    ("f16", 1e-6, 1e-3),
    ("q4", 1e-6, 2e-2),
    ("q4a", 1e-6, 2e-2),
    ("q4k", 1e-6, 2e-2),
    ("q6k", 5e-3, 2e-2),
    ("q8", 1e-6, 2e-2),
];

/// Odd shapes on purpose: K = 100 has a ragged last int4 group, rows not a multiple of the kernels' tiles.
const ROWS: usize = 37;
const COLS: usize = 100;
const EXPERTS: usize = 5;
/// Not a multiple of 32: the down projection's rows have a ragged last group.
const EXPERT_HIDDEN: usize = 40;

fn random(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
}

/// A model file holding one `ROWS x COLS` matrix per weight kind, vectors and a bias.
pub fn op_test_file() -> Arc<ModelFile> {
    let mut rng = StdRng::seed_from_u64(11);
    let mut w = ContainerWriter::new(&tiny_config(), "{}".into(), None);
    let m = random(&mut rng, ROWS * COLS, 1.0);
    w.add_f32("w.f32", &[ROWS, COLS], &m);
    w.add_f16("w.f16", &[ROWS, COLS], &m.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>());
    w.add_quant("w.q4", &quantize(&m, ROWS, COLS, Scheme::Q4));
    w.add_quant("w.q4a", &quantize(&m, ROWS, COLS, Scheme::Q4A));
    w.add_quant("w.q8", &quantize(&m, ROWS, COLS, Scheme::Q8));
    w.add_quant("w.q4k", &quantize(&m, ROWS, COLS, Scheme::Q4K));
    w.add_quant("w.q6k", &quantize(&m, ROWS, COLS, Scheme::Q6K));
    w.add_f32("bias", &[ROWS], &random(&mut rng, ROWS, 0.5));
    w.add_f32("norm.full", &[COLS], &random(&mut rng, COLS, 1.0));
    w.add_f32("norm.head", &[10], &random(&mut rng, 10, 1.0));
    // Stacked experts: EXPERTS x (EXPERT_HIDDEN x COLS) gate/up, EXPERTS x (COLS x EXPERT_HIDDEN) down.
    for (proj, rows, cols) in [
        ("gate", EXPERTS * EXPERT_HIDDEN, COLS),
        ("up", EXPERTS * EXPERT_HIDDEN, COLS),
        ("down", EXPERTS * COLS, EXPERT_HIDDEN),
    ] {
        let m = random(&mut rng, rows * cols, 1.0 / (cols as f32).sqrt());
        w.add_f32(&format!("exps.{proj}.f32"), &[rows, cols], &m);
        w.add_quant(&format!("exps.{proj}.q4"), &quantize(&m, rows, cols, Scheme::Q4));
        w.add_quant(&format!("exps.{proj}.q8"), &quantize(&m, rows, cols, Scheme::Q8));
    }
    Arc::new(ModelFile::from_bytes(&w.to_bytes()).expect("op test file"))
}

/// Largest `|a - r|` relative to `max |r|` (plus a small absolute floor).
fn rel_err(a: &[f32], r: &[f32]) -> f32 {
    assert_eq!(a.len(), r.len(), "output lengths differ");
    let scale = r.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    a.iter().zip(r).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max) / scale
}

/// Runs every op on both backends and returns one line per failure (empty = all ops agree).
pub fn check_backend<A: Backend, R: Backend>(a: &A, r: &R) -> Vec<String> {
    let mut fails = Vec::new();
    let file = op_test_file();
    let mut rng = StdRng::seed_from_u64(5);
    let mut check = |what: String, got: Vec<f32>, want: Vec<f32>, tol: f32| {
        let e = rel_err(&got, &want);
        if !e.is_finite() || e > tol {
            fails.push(format!("{what}: relative error {e:.3e} > {tol:.1e}"));
        }
    };
    macro_rules! pair {
        ($data:expr, $rows:expr, $cols:expr) => {{
            let (mut ta, mut tr) = (a.tensor(), r.tensor());
            a.upload(&$data, $rows, $cols, &mut ta).unwrap();
            r.upload(&$data, $rows, $cols, &mut tr).unwrap();
            (ta, tr)
        }};
    }
    let dl = |t: &A::Tensor| {
        let mut v = Vec::new();
        a.download(t, &mut v).unwrap();
        v
    };
    let dlr = |t: &R::Tensor| {
        let mut v = Vec::new();
        r.download(t, &mut v).unwrap();
        v
    };

    for &(kind, embed_tol, tol) in WEIGHTS {
        let name = format!("w.{kind}");
        let (wa, wr) = (a.load_weight(&file, &name).unwrap(), r.load_weight(&file, &name).unwrap());
        assert_eq!(a.weight_shape(&wa), (ROWS, COLS));
        // Embedding lookup: dequantization on both sides.
        let ids = [0u32, 36, 5, 5, 17];
        let (mut oa, mut or) = (a.tensor(), r.tensor());
        a.embed(&wa, &ids, 1.5, &mut oa).unwrap();
        r.embed(&wr, &ids, 1.5, &mut or).unwrap();
        check(format!("embed {kind}"), dl(&oa), dlr(&or), embed_tol);
        for t in [1usize, 3, 17] {
            let x = random(&mut rng, t * COLS, 2.0);
            let (xa, xr) = pair!(x, t, COLS);
            for with_bias in [false, true] {
                let (ba, br) = (a.load_weight(&file, "bias").unwrap(), r.load_weight(&file, "bias").unwrap());
                let (mut oa, mut or) = (a.tensor(), r.tensor());
                a.linear(&xa, &wa, with_bias.then_some(&ba), &mut oa).unwrap();
                r.linear(&xr, &wr, with_bias.then_some(&br), &mut or).unwrap();
                assert_eq!(a.shape(&oa), (t, ROWS));
                check(format!("linear {kind} T={t} bias={with_bias}"), dl(&oa), dlr(&or), tol);
            }
        }
    }

    // Several linears on one input in one pass (Q/K/V style), with and without bias, mixed weight kinds.
    for t in [1usize, 6] {
        let x = random(&mut rng, t * COLS, 2.0);
        let (xa, xr) = pair!(x, t, COLS);
        let names = ["w.q4", "w.q6k", "w.q4k"];
        let wa: Vec<A::Weight> = names.iter().map(|n| a.load_weight(&file, n).unwrap()).collect();
        let (ba, br) = (a.load_weight(&file, "bias").unwrap(), r.load_weight(&file, "bias").unwrap());
        let (mut o0, mut o1, mut o2) = (a.tensor(), a.tensor(), a.tensor());
        a.linear_many(
            &xa,
            &[(&wa[0], Some(&ba)), (&wa[1], None), (&wa[2], Some(&ba))],
            &mut [&mut o0, &mut o1, &mut o2],
        )
        .unwrap();
        for (i, (name, o)) in names.iter().zip([&o0, &o1, &o2]).enumerate() {
            // The same math as one linear at a time on this backend (same kernels: equal up to rounding order)...
            let mut one = a.tensor();
            a.linear(&xa, &wa[i], (i != 1).then_some(&ba), &mut one).unwrap();
            check(format!("linear_many {name} T={t} vs linear"), dl(o), dl(&one), 1e-6);
            // ...and close to the reference.
            let wr = r.load_weight(&file, name).unwrap();
            let mut or = r.tensor();
            r.linear(&xr, &wr, (i != 1).then_some(&br), &mut or).unwrap();
            check(format!("linear_many {name} T={t}"), dl(o), dlr(&or), 2e-2);
        }
    }

    // RMSNorm over whole rows and per head; a few rows (decode-like) and enough rows for a backend to split
    // them across threads (prefill-like).
    for wname in ["norm.full", "norm.head"] {
        for n in [3, 11] {
            let x = random(&mut rng, n * COLS, 3.0);
            let (xa, xr) = pair!(x, n, COLS);
            let (wa, wr) = (a.load_weight(&file, wname).unwrap(), r.load_weight(&file, wname).unwrap());
            let (mut oa, mut or) = (a.tensor(), r.tensor());
            a.rms_norm(&xa, &wa, 1e-5, &mut oa).unwrap();
            r.rms_norm(&xr, &wr, 1e-5, &mut or).unwrap();
            check(format!("rms_norm {wname} rows={n}"), dl(&oa), dlr(&or), 1e-5);
        }
    }

    // RoPE: both layouts, an offset start, a large theta, and every scaling type.
    let yarn = RopeScaling::Yarn {
        factor: 4.0,
        original_context: 64,
        beta_fast: 32.0,
        beta_slow: 1.0,
        attention_factor: 1.1386,
        truncate: true,
    };
    let llama3 = RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_context: 64 };
    let linear = RopeScaling::Linear { factor: 8.0 };
    for layout in [RopeLayout::Adjacent, RopeLayout::Half] {
        for (pos0, scale, theta) in [
            (0usize, None, 10000.0f32),
            (37, None, 1e6),
            (500, Some(&linear), 10000.0),
            (300, Some(&yarn), 1e4),
            (90, Some(&llama3), 5e5),
        ] {
            let p = RopeParams::new(3, 10, theta, scale, layout);
            for n in [4, 11] {
                let x = random(&mut rng, n * 30, 1.0);
                let (mut xa, mut xr) = pair!(x, n, 30);
                a.rope(&mut xa, pos0, &p).unwrap();
                r.rope(&mut xr, pos0, &p).unwrap();
                check(format!("rope {layout:?} pos0={pos0} scaling={scale:?} rows={n}"), dl(&xa), dlr(&xr), 1e-4);
            }
        }
    }

    // Attention: GQA (4 query heads on 2 KV heads), odd head size, global and a window smaller than the
    // sequence; a prefill of 7 then 6 single-token steps, so cache reads and ring wrap-around are exercised.
    // Then long batches after a cached prefix: several query tiles (≥ 32 new tokens) reading keys from the
    // cache across 64-slot key blocks, with a global layer and a ring that wraps mid-batch.
    let short: &[usize] = &[7, 1, 1, 1, 1, 1, 1, 3];
    let long: &[usize] = &[40, 1, 50, 1, 1, 40];
    let cases = [(None, short, 32), (Some(4usize), short, 32), (Some(1), short, 32), (None, long, 200), (Some(70), long, 200)];
    for (dtype, (window, steps, ctx)) in crate::KvDtype::ALL.into_iter().flat_map(|d| cases.map(|c| (d, c))) {
        let p = AttentionParams { n_heads: 4, n_kv_heads: 2, head_dim: 8, scale: 0.4, window };
        let layout = KvLayout { kv_dim: 16, windows: vec![None, window], max_context: ctx, head_dim: 8, dtype };
        let (mut ca, mut cr) = (a.kv_cache(&layout).unwrap(), r.kv_cache(&layout).unwrap());
        let mut pos = 0;
        for &t in steps {
            let q = random(&mut rng, t * 32, 1.0);
            let k = random(&mut rng, t * 16, 1.0);
            let v = random(&mut rng, t * 16, 1.0);
            let (qa, qr) = pair!(q, t, 32);
            let (ka, kr) = pair!(k, t, 16);
            let (va, vr) = pair!(v, t, 16);
            let (mut oa, mut or) = (a.tensor(), r.tensor());
            a.attention(&qa, &ka, &va, &mut ca, 1, pos, &p, &mut oa).unwrap();
            r.attention(&qr, &kr, &vr, &mut cr, 1, pos, &p, &mut or).unwrap();
            check(format!("attention {dtype:?} window={window:?} pos={pos} T={t}"), dl(&oa), dlr(&or), 1e-5);
            pos += t;
        }
        // What the layer holds, read back (a saved session), equals the reference's; written into a fresh
        // cache (a restored one), the next step attends exactly as the original does.
        let held = pos - pos.saturating_sub(layout.layer_capacity(1));
        let (mut ka, mut va, mut kr, mut vr) = (vec![], vec![], vec![], vec![]);
        a.kv_read(&ca, 1, pos - held..pos, &mut ka, &mut va).unwrap();
        r.kv_read(&cr, 1, pos - held..pos, &mut kr, &mut vr).unwrap();
        check(format!("kv_read {dtype:?} window={window:?} keys"), ka.clone(), kr, 1e-6);
        check(format!("kv_read {dtype:?} window={window:?} values"), va.clone(), vr, 1e-6);
        let mut restored = a.kv_cache(&layout).unwrap();
        a.kv_write(&mut restored, 1, pos - held, &ka, &va).unwrap();
        let (q, k, v) = (random(&mut rng, 2 * 32, 1.0), random(&mut rng, 2 * 16, 1.0), random(&mut rng, 2 * 16, 1.0));
        let (qa, qr) = pair!(q, 2, 32);
        let (ka2, kr2) = pair!(k, 2, 16);
        let (va2, vr2) = pair!(v, 2, 16);
        let (mut oa, mut or) = (a.tensor(), r.tensor());
        a.attention(&qa, &ka2, &va2, &mut restored, 1, pos, &p, &mut oa).unwrap();
        r.attention(&qr, &kr2, &vr2, &mut cr, 1, pos, &p, &mut or).unwrap();
        check(format!("attention after kv_write {dtype:?} window={window:?} pos={pos}"), dl(&oa), dlr(&or), 1e-5);
    }
    // An int8 cache really holds int8: the same steps attend differently from f32, within its rounding.
    let p = AttentionParams { n_heads: 4, n_kv_heads: 2, head_dim: 8, scale: 0.4, window: None };
    let (q, k, v) = (random(&mut rng, 9 * 32, 1.0), random(&mut rng, 9 * 16, 1.0), random(&mut rng, 9 * 16, 1.0));
    let mut outs = Vec::new();
    for dtype in crate::KvDtype::ALL {
        let layout = KvLayout { kv_dim: 16, windows: vec![None], max_context: 16, head_dim: 8, dtype };
        let mut cache = a.kv_cache(&layout).unwrap();
        let mut o = a.tensor();
        // 8 tokens at once, then one more reading them from the cache.
        for (t0, n) in [(0, 8), (8, 1)] {
            let (mut qa, mut ka, mut va) = (a.tensor(), a.tensor(), a.tensor());
            a.upload(&q[t0 * 32..(t0 + n) * 32], n, 32, &mut qa).unwrap();
            a.upload(&k[t0 * 16..(t0 + n) * 16], n, 16, &mut ka).unwrap();
            a.upload(&v[t0 * 16..(t0 + n) * 16], n, 16, &mut va).unwrap();
            a.attention(&qa, &ka, &va, &mut cache, 0, t0, &p, &mut o).unwrap();
        }
        outs.push(dl(&o));
    }
    let e = rel_err(&outs[1], &outs[0]);
    check(format!("int8 KV vs f32 differ by {e:.1e}: more than nothing, less than 2e-2"), vec![f32::from(e > 1e-6 && e < 2e-2)], vec![1.0], 0.0);

    // Element-wise ops, on enough rows for a backend to split them across threads, then on a few (whose sums
    // the remaining ops continue from).
    let mut few = None;
    for n in [11, 5] {
        let g = random(&mut rng, n * 33, 4.0);
        let u = random(&mut rng, n * 33, 2.0);
        for act in [Activation::Silu, Activation::GeluTanh] {
            let ((ga, gr), (ua, ur)) = (pair!(g, n, 33), pair!(u, n, 33));
            let (mut oa, mut or) = (a.tensor(), r.tensor());
            a.glu(&ga, &ua, act, &mut oa).unwrap();
            r.glu(&gr, &ur, act, &mut or).unwrap();
            check(format!("glu {act:?} rows={n}"), dl(&oa), dlr(&or), 1e-5);
        }
        for f in [
            Unary::Scale(-0.7),
            Unary::Tanh,
            Unary::Sigmoid,
            Unary::Act(Activation::Silu),
            Unary::Act(Activation::GeluTanh),
        ] {
            let (mut xa, mut xr) = pair!(g, n, 33);
            a.map(&mut xa, f).unwrap();
            r.map(&mut xr, f).unwrap();
            let want: Vec<f32> = g.iter().map(|&v| f.apply(v)).collect();
            check(format!("map {f:?} rows={n}"), dl(&xa), want, 1e-6);
            check(format!("map {f:?} rows={n} vs reference"), dl(&xa), dlr(&xr), 1e-6);
        }
        let per_row = random(&mut rng, n, 2.0);
        for (y, cols) in [(&u, 33), (&per_row, 1)] {
            let ((mut xa, mut xr), (ya, yr)) = (pair!(g, n, 33), pair!(y, n, cols));
            a.mul(&mut xa, &ya).unwrap();
            r.mul(&mut xr, &yr).unwrap();
            let want: Vec<f32> = g.iter().enumerate().map(|(i, v)| v * y[if cols == 1 { i / 33 } else { i }]).collect();
            check(format!("mul [{n},{cols}]"), dl(&xa), want, 1e-6);
            check(format!("mul [{n},{cols}] vs reference"), dl(&xa), dlr(&xr), 1e-6);
        }
        let ((mut xa, mut xr), (ya, yr)) = (pair!(g, n, 33), pair!(u, n, 33));
        a.add(&mut xa, &ya).unwrap();
        r.add(&mut xr, &yr).unwrap();
        check(format!("add rows={n}"), dl(&xa), dlr(&xr), 1e-6);
        few = Some((u, xa, xr));
    }
    let (u, mut xa, mut xr) = few.expect("the loop ran");
    a.softcap(&mut xa, 3.0).unwrap();
    r.softcap(&mut xr, 3.0).unwrap();
    check("softcap".into(), dl(&xa), dlr(&xr), 1e-5);
    let (mut oa, mut or) = (a.tensor(), r.tensor());
    a.rows(&xa, 2, 2, &mut oa).unwrap();
    r.rows(&xr, 2, 2, &mut or).unwrap();
    check("rows".into(), dl(&oa), dlr(&or), 1e-6);
    // Rows written back into a batch: rows 2..4 of `xa` replaced by its rows 0..2.
    let (mut sa, mut sr) = (a.tensor(), r.tensor());
    a.rows(&xa, 0, 2, &mut sa).unwrap();
    r.rows(&xr, 0, 2, &mut sr).unwrap();
    a.set_rows(&mut xa, 2, &sa).unwrap();
    r.set_rows(&mut xr, 2, &sr).unwrap();
    let (got, want) = (dl(&xa), dlr(&xr));
    check("set_rows".into(), got.clone(), want, 1e-6);
    check("set_rows moved rows".into(), got[2 * 33..4 * 33].to_vec(), got[..2 * 33].to_vec(), 0.0);
    assert!(a.set_rows(&mut xa, 4, &sa).is_err(), "set_rows past the end must be refused");
    let gate = random(&mut rng, 5, 3.0);
    let ((mut xa, mut xr), (mut ga, mut gr)) = (pair!(u, 5, 33), pair!(gate, 5, 1));
    a.sigmoid_gate(&mut xa, &mut ga).unwrap();
    r.sigmoid_gate(&mut xr, &mut gr).unwrap();
    check("sigmoid_gate".into(), dl(&xa), dlr(&xr), 1e-6);
    let composite_fails = check_composites(a);

    let mut routing_fails = Vec::new();
    // MoE: softmax and sigmoid routers, top-k below and equal to E, renormalised or not, a routed scale;
    // one token (decode) and a batch (prefill, several tokens per expert).
    for (kind, tol) in [("f32", 1e-4), ("q4", 2e-2), ("q8", 2e-2)] {
        let wa: Vec<A::Weight> =
            ["gate", "up", "down"].iter().map(|p| a.load_weight(&file, &format!("exps.{p}.{kind}")).unwrap()).collect();
        let wr: Vec<R::Weight> =
            ["gate", "up", "down"].iter().map(|p| r.load_weight(&file, &format!("exps.{p}.{kind}")).unwrap()).collect();
        let ea = ExpertWeights { gate: &wa[0], up: &wa[1], down: &wa[2] };
        let er = ExpertWeights { gate: &wr[0], up: &wr[1], down: &wr[2] };
        for (scoring, top_k, norm_topk, routed_scale, act) in [
            (RouterScoring::Softmax, 2, true, 1.0, Activation::Silu),
            (RouterScoring::Softmax, 2, false, 1.0, Activation::GeluTanh),
            (RouterScoring::Sigmoid, 3, false, 2.5, Activation::Silu),
            (RouterScoring::Softmax, EXPERTS, true, 1.0, Activation::Silu),
        ] {
            let p = MoeParams {
                n_experts: EXPERTS,
                top_k,
                expert_hidden: EXPERT_HIDDEN,
                scoring,
                norm_topk,
                routed_scale,
                activation: act,
            };
            // One state over both batches: the counters must accumulate across calls.
            let (mut sa, mut sr) = (a.moe_state(&p).expect("moe state"), r.moe_state(&p).expect("moe state"));
            for t in [1usize, 9] {
                let x = random(&mut rng, t * COLS, 2.0);
                let logits = random(&mut rng, t * EXPERTS, 3.0);
                let ((xa, xr), (la, lr)) = (pair!(x, t, COLS), pair!(logits, t, EXPERTS));
                let (mut oa, mut or) = (a.tensor(), r.tensor());
                a.moe(&xa, &la, &ea, &p, &mut oa, &mut sa).unwrap();
                r.moe(&xr, &lr, &er, &p, &mut or, &mut sr).unwrap();
                let (ua, ur): (MoeUsage, MoeUsage) =
                    (a.moe_usage(&sa).expect("moe usage"), r.moe_usage(&sr).expect("moe usage"));
                let what = format!("moe {kind} {scoring:?} top{top_k} norm={norm_topk} T={t}");
                assert_eq!(a.shape(&oa), (t, COLS), "{what}");
                check(what.clone(), dl(&oa), dlr(&or), tol);
                if ua.tokens != ur.tokens {
                    routing_fails
                        .push(format!("{what}: tokens per expert {:?} vs reference {:?}", ua.tokens, ur.tokens));
                }
            }
        }
    }
    fails.extend(routing_fails);
    fails.extend(composite_fails);
    fails
}

/// Each composite op of `b` (its override, if any) against the default built from `b`'s own primitives.
pub fn check_composites<B: Backend>(b: &B) -> Vec<String> {
    let mut fails = Vec::new();
    let mut rng = StdRng::seed_from_u64(17);
    let up = |data: &[f32], rows, cols| {
        let mut t = b.tensor();
        b.upload(data, rows, cols, &mut t).unwrap();
        t
    };
    let dl = |t: &B::Tensor| {
        let mut v = Vec::new();
        b.download(t, &mut v).unwrap();
        v
    };
    let mut check = |what: &str, got: Vec<f32>, want: Vec<f32>| {
        let e = rel_err(&got, &want);
        if !e.is_finite() || e > 1e-5 {
            fails.push(format!("{what}: override vs default: relative error {e:.3e}"));
        }
    };
    for n in [1, 11] {
        let (g, u) = (random(&mut rng, n * 40, 4.0), random(&mut rng, n * 40, 2.0));
        for act in [Activation::Silu, Activation::GeluTanh] {
            let (mut o1, mut o2) = (b.tensor(), b.tensor());
            b.glu(&up(&g, n, 40), &up(&u, n, 40), act, &mut o1).unwrap();
            composite::glu(b, &up(&g, n, 40), &up(&u, n, 40), act, &mut o2).unwrap();
            check(&format!("glu {act:?} rows={n}"), dl(&o1), dl(&o2));
        }
        let (mut x1, mut x2) = (up(&g, n, 40), up(&g, n, 40));
        b.softcap(&mut x1, 3.0).unwrap();
        composite::softcap(b, &mut x2, 3.0).unwrap();
        check(&format!("softcap rows={n}"), dl(&x1), dl(&x2));
        let gate = random(&mut rng, n, 3.0);
        let (mut x1, mut x2, mut g1, mut g2) = (up(&u, n, 40), up(&u, n, 40), up(&gate, n, 1), up(&gate, n, 1));
        b.sigmoid_gate(&mut x1, &mut g1).unwrap();
        composite::sigmoid_gate(b, &mut x2, &mut g2).unwrap();
        check(&format!("sigmoid_gate rows={n}"), dl(&x1), dl(&x2));
    }
    fails
}
