use rand::{Rng, SeedableRng};
use sprig_quant::kernels::{gemm, Isa};
use sprig_quant::quantize::quantize;
use sprig_quant::scheme::RowLayout;
use sprig_quant::{QuantizedActivations, Scheme};
// args: iters schemes tokens rows cols [mats]
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let iters: usize = a[1].parse().unwrap();
    let rows: usize = a[4].parse().unwrap();
    let cols: usize = a[5].parse().unwrap();
    let mats: usize = a.get(6).map_or(1, |v| v.parse().unwrap());
    let isa = Isa::detect().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let w: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
    for name in a[2].split(',') {
        let scheme = Scheme::from_name(name).unwrap();
        let plain: Vec<_> = (0..mats).map(|_| quantize(&w, rows, cols, scheme)).collect();
        let grouped: Vec<_> = plain
            .iter()
            .map(|p| {
                let mut g = p.clone();
                g.set_layout(RowLayout::Grouped);
                g
            })
            .collect();
        for tokens in a[3].split(',').map(|t| t.parse::<usize>().unwrap()) {
            let x: Vec<f32> = (0..tokens * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let mut xq = QuantizedActivations::default();
            xq.quantize(&x, tokens, cols);
            sprig_quant::kernels::prepare(isa, &mut xq);
            let mut out = vec![0.0f32; tokens * rows];
            let (mut bp, mut bg) = (f64::MAX, f64::MAX);
            let mut ratios = vec![];
            for _round in 0..21 {
                let t = std::time::Instant::now();
                for i in 0..iters {
                    gemm(isa, &plain[i % mats].view(), &xq, &mut out, rows)
                }
                let o = t.elapsed().as_secs_f64() * 1e6 / iters as f64;
                bp = bp.min(o);
                let t = std::time::Instant::now();
                for i in 0..iters {
                    gemm(isa, &grouped[i % mats].view(), &xq, &mut out, rows)
                }
                let n = t.elapsed().as_secs_f64() * 1e6 / iters as f64;
                ratios.push(n / o);
                bg = bg.min(n);
            }
            ratios.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let gb = plain[0].view().bytes() as f64 / 1e3;
            println!("{name} {rows}x{cols} t{tokens}: rows {bp:.1} us ({:.1} GB/s), grouped {bg:.1} us ({:.1} GB/s), best g/r {:.2} median-round {:.2}", gb/bp, gb/bg, bg / bp, ratios[10]);
        }
    }
}
