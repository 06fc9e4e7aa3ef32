//! Every op of the GPU backend against the burn reference backend (the shared harness: odd shapes, ragged
//! int4 groups, GQA, sliding windows with ring wrap-around, MoE routing). On a machine without a GPU this runs
//! on Mesa's lavapipe (software Vulkan): correctness only, never timings.

use sprig_backend::harness::check_backend;
use sprig_burn::BurnBackend;
use sprig_wgpu::{WgpuBackend, WgpuOptions};

fn gpu(opts: WgpuOptions) -> WgpuBackend {
    WgpuBackend::new(opts).unwrap_or_else(|e| {
        panic!("no wgpu adapter: {e} (install mesa-vulkan-drivers for the software one; `sprig devices` lists them)")
    })
}

#[test]
fn every_op_matches_the_reference() {
    let fails = check_backend(&gpu(WgpuOptions::default()), &BurnBackend::new());
    assert!(fails.is_empty(), "{}", fails.join("\n"));
}

/// Weights larger than a storage-buffer binding are split into row chunks; a tiny chunk limit makes every
/// harness weight span several chunks (down to one row each), so linear, embed and the gathered MoE
/// linears are checked across chunk boundaries.
#[test]
fn every_op_matches_the_reference_with_weights_split_into_chunks() {
    for bytes in [64usize, 200, 1000] {
        let fails = check_backend(&gpu(WgpuOptions { max_chunk_bytes: Some(bytes) }), &BurnBackend::new());
        assert!(fails.is_empty(), "chunks of {bytes} bytes:\n{}", fails.join("\n"));
    }
}

#[test]
fn adapters_are_listed() {
    let list = sprig_wgpu::adapters();
    assert!(!list.is_empty(), "no adapters, yet the backend opened one");
    let b = gpu(WgpuOptions::default());
    assert!(list.iter().any(|a| b.adapter().starts_with(&a.name)), "{} not in {list:?}", b.adapter());
}
