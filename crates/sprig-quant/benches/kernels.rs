//! Kernel throughput per instruction set and weight scheme: decode GEMV, a 4-token product (a speculative
//! verification pass, four sessions stepping together) and a 128-token prefill GEMM at a
//! SmolLM2 shape (K = 576) and a Qwen2.5-1.5B one (K = 1536, whole K-quant superblocks).
//! `cargo bench -p sprig-quant --bench kernels`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use sprig_quant::kernels::{gemm, Isa};
use sprig_quant::quantize::quantize;
use sprig_quant::{QuantizedActivations, Scheme};

fn bench(c: &mut Criterion) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for (rows, cols) in [(1536, 576), (1536, 1536)] {
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
        for scheme in [Scheme::Q4, Scheme::Q4A, Scheme::Q4K, Scheme::Q6K, Scheme::Q8] {
            let q = quantize(&w, rows, cols, scheme);
            for tokens in [1usize, 4, 128] {
                let x: Vec<f32> = (0..tokens * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let mut xq = QuantizedActivations::default();
                xq.quantize(&x, tokens, cols);
                let mut out = vec![0.0f32; tokens * rows];
                let mut g = c.benchmark_group(format!("{}_{rows}x{cols}_t{tokens}", scheme.name()));
                g.throughput(Throughput::Elements((rows * cols * tokens) as u64));
                for isa in Isa::available() {
                    g.bench_function(isa.name(), |b| b.iter(|| gemm(isa, &q.view(), &xq, &mut out, rows)));
                }
                g.finish();
            }
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
