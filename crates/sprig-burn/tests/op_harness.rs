//! Every op of the CPU backend against the burn reference, under each instruction set this CPU has.

use sprig_backend::cpu::CpuBackend;
use sprig_backend::harness::check_backend;
use sprig_burn::BurnBackend;
use sprig_quant::kernels::Isa;

#[test]
fn cpu_backend_matches_reference_on_every_op() {
    let reference = BurnBackend::new();
    for isa in Isa::available() {
        for threads in [1, 2] {
            let cpu = CpuBackend::new(threads).unwrap().with_isa(isa);
            let fails = check_backend(&cpu, &reference);
            assert!(fails.is_empty(), "{isa:?}, {threads} threads:\n{}", fails.join("\n"));
        }
    }
}
