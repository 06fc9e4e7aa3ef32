//! Opening a 100 MB model maps it: the weights are used in place, and the open allocates < 5 MB of heap.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use half::f16;
use sprig_format::testutil::tiny_config;
use sprig_format::{ContainerWriter, ModelFile, WeightView};
use sprig_quant::scheme::QMatrixOwned;
use sprig_quant::Scheme;

/// Counts every byte the test process allocates.
struct Counting;
static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only adds a counter.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(l.size(), Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn open_100mb_model_is_zero_copy() {
    let path = std::env::temp_dir().join(format!("sprig-zero-copy-{}.safetensors", std::process::id()));
    {
        let mut w = ContainerWriter::new(&tiny_config(), "{}".into(), None);
        // 64 int4 matrices of 2048 x 1536: 64 * 2048 * 48 blocks * 18 bytes ≈ 113 MB.
        let mut m = QMatrixOwned::new(Scheme::Q4, 2048, 1536);
        for (i, b) in m.qs.iter_mut().enumerate() {
            *b = (i * 131 % 251) as u8;
        }
        m.scales.iter_mut().for_each(|s| *s = f16::from_f32(0.01));
        for i in 0..64 {
            w.add_quant(&format!("blk.{i}.ffn_up.weight"), &m);
        }
        w.write(&path).unwrap();
    }
    let size = std::fs::metadata(&path).unwrap().len();
    assert!(size > 100_000_000, "{size}");

    let before = ALLOCATED.load(Ordering::Relaxed);
    let f = ModelFile::open(&path).unwrap();
    let allocated = ALLOCATED.load(Ordering::Relaxed) - before;
    assert!(allocated < 5_000_000, "opening allocated {allocated} bytes");

    let map = f.mapping().as_ptr_range();
    for i in 0..64 {
        let WeightView::Quant(q) = f.weight(&format!("blk.{i}.ffn_up.weight")).unwrap() else { panic!() };
        assert!(map.contains(&q.qs().as_ptr()) && map.contains(&q.scales().as_ptr().cast()));
        assert!(map.contains(&q.qs().as_ptr().wrapping_add(q.qs().len() - 1)));
    }
    drop(f);
    let _ = std::fs::remove_file(&path);
}
