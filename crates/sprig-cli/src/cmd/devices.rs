//! `sprig devices`: the CPU and the GPU adapters models can run on.

use anyhow::Result;
use sprig_engine::device;

pub fn run() -> Result<()> {
    let cpu = device::cpu_info();
    println!(
        "cpu: {}, {} physical cores, kernels: {} ({})",
        cpu.model,
        cpu.physical_cores,
        cpu.isas.join(", "),
        match cpu.forced {
            Some(f) => format!("forced by SPRIG_CPU={f}"),
            None => "chosen per model by measurement at first load".into(),
        }
    );
    if !device::GPU_BACKEND {
        println!("gpu: this build has no GPU backend (rebuild with `--features wgpu`)");
        return Ok(());
    }
    let adapters = device::gpu_adapters();
    if adapters.is_empty() {
        println!("gpu: no adapter found (no GPU driver; `apt-get install mesa-vulkan-drivers` adds lavapipe)");
    }
    for (i, a) in adapters.iter().enumerate() {
        println!("gpu {i}: {} ({}, {}; driver {})", a.name, a.backend, a.device_type, a.driver);
    }
    Ok(())
}
