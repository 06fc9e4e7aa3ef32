//! The CPU kernels measured at a model's first load on a machine ([`CpuBackend::measure_kernels`]), cached
//! under the cache directory so later loads skip the measurement. The cache entry is keyed by the CPU model,
//! the instruction sets it runs, the pool's thread count, sprig's version and the model's matrix shapes; an
//! entry that does not parse, names another key or a plan this CPU cannot run is ignored and measured again.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sprig_backend::cpu::select::{shape_key, KernelPlan, KernelSelection, PlanSource};
use sprig_backend::cpu::CpuBackend;
use sprig_format::ModelFile;
use sprig_quant::kernels::Isa;

#[derive(Serialize, Deserialize)]
struct Entry {
    key: String,
    decode: String,
    decode_threads: usize,
    prefill: String,
    /// For people reading the file: each candidate's best pass in microseconds.
    timings: Vec<String>,
}

/// The CPU's model name as the OS reports it (x86: `model name`; arm64: implementer and part).
pub fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |k: &str| {
        info.lines()
            .find(|l| l.split(':').next().is_some_and(|n| n.trim() == k))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    match field("model name") {
        Some(m) => m,
        None => format!(
            "{} implementer {} part {}",
            std::env::consts::ARCH,
            field("CPU implementer").unwrap_or_default(),
            field("CPU part").unwrap_or_default()
        ),
    }
}

fn key(b: &CpuBackend, file: &ModelFile) -> String {
    let isas: Vec<&str> = Isa::available().iter().map(|i| i.name()).collect();
    format!(
        "sprig {}; cpu {}; isa {}; threads {}; shapes {}",
        env!("CARGO_PKG_VERSION"),
        cpu_model(),
        isas.join(","),
        b.threads(),
        shape_key(file)
    )
}

fn isa(name: &str) -> Option<Isa> {
    Isa::available().into_iter().find(|i| i.name() == name)
}

/// The cache file for `key` under `dir`.
fn path_for(dir: &Path, key: &str) -> PathBuf {
    let h = hex::encode(Sha256::digest(key.as_bytes()));
    dir.join("kernels").join(format!("{}.json", &h[..16]))
}

/// Picks `b`'s kernels for `file`: nothing when `SPRIG_CPU` forces an ISA; the cached plan when one matches;
/// else a measurement (≤ 300 ms), then cached. `fresh` measures even when a cache entry exists. `log` gets a
/// line about a cache entry that was ignored or could not be written.
pub fn choose(b: &mut CpuBackend, file: &ModelFile, cache: Option<&Path>, fresh: bool, log: &mut dyn FnMut(&str)) {
    if matches!(b.kernel_selection().source, PlanSource::Forced(_)) {
        return;
    }
    let key = key(b, file);
    let path = cache.map(|d| path_for(d, &key));
    if let (Some(p), false) = (&path, fresh) {
        if let Ok(text) = std::fs::read_to_string(p) {
            match read(&text, &key) {
                Some(plan) => {
                    let sel = KernelSelection {
                        plan,
                        source: PlanSource::Cached(p.display().to_string()),
                        timings: Vec::new(),
                        probe: String::new(),
                    };
                    match b.use_kernels(sel) {
                        Ok(()) => return,
                        Err(e) => log(&format!("kernel cache {}: {e}; measuring again", p.display())),
                    }
                }
                None => log(&format!("kernel cache {}: unreadable or for another key; measuring again", p.display())),
            }
        }
    }
    let sel = b.measure_kernels(file, &|_| {}).clone();
    if !matches!(sel.source, PlanSource::Measured(_)) {
        return;
    }
    if let Some(p) = path {
        if let Err(e) = write(&p, &key, &sel) {
            log(&format!("kernel cache {}: not written ({e})", p.display()));
        }
    }
}

/// Human-readable lines: how the plan was decided, each candidate's timing, the pick.
pub fn describe(sel: &KernelSelection) -> Vec<String> {
    let p = sel.plan;
    let mut lines = vec![match &sel.source {
        PlanSource::Default => "CPU kernels: the best instruction set by name (nothing measured)".to_string(),
        PlanSource::Forced(n) => format!("CPU kernels: forced by SPRIG_CPU={n}"),
        PlanSource::Cached(path) => format!("CPU kernels: measured earlier on this machine (cache {path})"),
        PlanSource::Measured(d) => {
            format!("CPU kernels: measured now in {:.0} ms on {} ({})", d.as_secs_f64() * 1e3, cpu_model(), sel.probe)
        }
    }];
    for t in &sel.timings {
        let c = t.candidate;
        lines.push(format!(
            "  {:<7} {:<8} {} thread{:<2} {:>10.1} us per pass (best of {})",
            if c.prefill { "prefill" } else { "decode" },
            c.isa.name(),
            c.threads,
            if c.threads == 1 { "" } else { "s" },
            t.seconds * 1e6,
            t.passes
        ));
    }
    lines.push(format!(
        "  pick: decode {} on {} thread{}, prefill {}",
        p.decode.name(),
        p.decode_threads,
        if p.decode_threads == 1 { "" } else { "s" },
        p.prefill.name()
    ));
    lines
}

fn read(text: &str, key: &str) -> Option<KernelPlan> {
    let e: Entry = serde_json::from_str(text).ok()?;
    if e.key != key {
        return None;
    }
    Some(KernelPlan { decode: isa(&e.decode)?, decode_threads: e.decode_threads, prefill: isa(&e.prefill)? })
}

fn write(path: &Path, key: &str, sel: &KernelSelection) -> std::io::Result<()> {
    let p = sel.plan;
    let entry = Entry {
        key: key.to_string(),
        decode: p.decode.name().into(),
        decode_threads: p.decode_threads,
        prefill: p.prefill.name().into(),
        timings: sel
            .timings
            .iter()
            .map(|t| {
                let c = t.candidate;
                let class = if c.prefill { "prefill" } else { "decode" };
                format!("{class} {} x{}: {:.1} us", c.isa.name(), c.threads, t.seconds * 1e6)
            })
            .collect(),
    };
    std::fs::create_dir_all(path.parent().expect("a file in a directory"))?;
    // Written aside and renamed: a reader never sees half a file.
    let tmp = path.with_extension(format!("json.{}", std::process::id()));
    std::fs::write(&tmp, serde_json::to_string_pretty(&entry).expect("serializable"))?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_bad_ones_are_ignored() {
        let best = *Isa::available().last().unwrap();
        let plan = KernelPlan { decode: Isa::Scalar, decode_threads: 1, prefill: best };
        let sel = KernelSelection { plan, source: PlanSource::Default, timings: Vec::new(), probe: String::new() };
        let dir = std::env::temp_dir().join(format!("sprig-kcache-{}", std::process::id()));
        let p = path_for(&dir, "k1");
        write(&p, "k1", &sel).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(read(&text, "k1"), Some(plan));
        assert_eq!(read(&text, "k2"), None, "another key");
        assert_eq!(read(&text[..text.len() / 2], "k1"), None, "truncated");
        assert_eq!(read(&text.replace(best.name(), "avx9000"), "k1"), None, "an unknown ISA");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
