//! Memory budget: what a model and its sessions need in memory, checked before anything is loaded or
//! allocated, so the app gets a clear error instead of the system's low-memory killer.

use sprig_backend::{KvDtype, KvLayout};
use sprig_format::ModelFile;

use crate::generate::PREFILL_CHUNK;
use crate::{EngineError, Result};

/// Bytes a model needs resident, by part (`sprig inspect --memory`).
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryNeed {
    /// The weights as stored (mapped from the file; every page is read by a forward pass).
    pub weights: u64,
    /// One session's KV cache at the context it is opened with; with an MTP head in the file, also the head's
    /// own cache (one more global layer), which a session drafting with it keeps.
    pub kv_cache: u64,
    /// One session's activation buffers at the largest prefill chunk (and its logits); with an MTP head, the
    /// head's too.
    pub scratch: u64,
}

impl MemoryNeed {
    pub fn total(&self) -> u64 {
        self.weights + self.kv_cache + self.scratch
    }

    /// What `file` needs with one session of `context` tokens (0 = the model's trained context) whose KV
    /// cache stores `kv`.
    pub fn of(file: &ModelFile, context: usize, kv: KvDtype) -> Self {
        let c = &file.config;
        let ctx = if context == 0 { c.max_seq_len } else { context };
        let layout = KvLayout::for_model(c, ctx).with_dtype(kv);
        let heads = u64::from(c.mtp.is_some());
        let mtp_kv = layout.bytes_per_position().saturating_mul(ctx as u64).saturating_mul(heads);
        let kv_cache = layout.total_bytes().map_or(u64::MAX, |b| b.saturating_add(mtp_kv));
        let hidden = c.moe.as_ref().map_or(c.hidden_dim, |m| m.expert_hidden_dim.max(c.hidden_dim));
        let t = PREFILL_CHUNK.min(ctx) as u64;
        // Per token of a chunk: the residual stream and its normalised copy, Q/K/V and the attention output,
        // gate/up/hidden, the projection; plus the logits of the last token (all f32).
        let per_token = 4 * (3 * c.dim + c.q_dim() * 2 + 2 * c.kv_dim() + 3 * hidden) as u64;
        let scratch = (1 + heads) * (t * per_token + 4 * c.vocab_size as u64);
        MemoryNeed { weights: file.file_bytes() as u64, kv_cache, scratch }
    }
}

/// The prefix cache's byte budget: `wanted`, shrunk to what `budget` leaves after `need` (the cache gives
/// way first: the weights and a session's KV cache must fit, cached prefixes only may).
pub fn prefix_cache_budget(wanted: u64, need: &MemoryNeed, budget: Option<u64>) -> u64 {
    match budget {
        Some(b) => wanted.min(b.saturating_sub(need.total())),
        None => wanted,
    }
}

/// `MemAvailable` of this machine in bytes (Linux and Android), `None` where unknown.
pub fn available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Fails when `need` exceeds the caller's budget or the memory the system has available now.
pub fn check(need: &MemoryNeed, budget: Option<u64>, what: &str) -> Result<()> {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let detail = || {
        format!(
            "weights {:.1} MiB + KV cache {:.1} MiB + scratch {:.1} MiB = {:.1} MiB",
            mib(need.weights),
            mib(need.kv_cache),
            mib(need.scratch),
            mib(need.total())
        )
    };
    if let Some(b) = budget {
        if need.total() > b {
            return Err(EngineError::MemoryBudget(format!(
                "{what} needs {}, more than the budget of {:.1} MiB (use a smaller context or model)",
                detail(),
                mib(b)
            )));
        }
    }
    if let Some(a) = available() {
        if need.total() > a {
            return Err(EngineError::MemoryBudget(format!(
                "{what} needs {}, more than the {:.1} MiB this system has available now",
                detail(),
                mib(a)
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sprig_format::testutil::tiny_config;
    use sprig_format::ContainerWriter;

    #[test]
    fn the_need_adds_up_and_a_budget_below_it_is_refused() {
        let c = tiny_config();
        let mut w = ContainerWriter::new(&c, "{}".into(), None);
        w.add_f32("x", &[4], &[0.0; 4]);
        let file = ModelFile::from_bytes(&w.to_bytes()).unwrap();
        let need = MemoryNeed::of(&file, 100, KvDtype::F32);
        assert_eq!(need.kv_cache, KvLayout::for_model(&c, 100).total_bytes().unwrap());
        assert_eq!(need.weights, file.file_bytes() as u64);
        assert_eq!(need.total(), need.weights + need.kv_cache + need.scratch);
        // 0 = the trained context.
        assert_eq!(MemoryNeed::of(&file, 0, KvDtype::F32).kv_cache, KvLayout::for_model(&c, c.max_seq_len).total_bytes().unwrap());
        let e = check(&need, Some(need.total() - 1), "it").unwrap_err().to_string();
        assert!(e.contains("budget") && e.contains("KV cache"), "{e}");
        check(&need, Some(need.total()), "it").unwrap();
    }

    /// A model with an MTP head: a session drafting with it keeps the head's KV cache (one global layer at
    /// the session's context) and its buffers, so the budget counts them.
    #[test]
    fn an_mtp_heads_cache_is_counted() {
        let plain = tiny_config();
        let mut c = plain.clone();
        c.mtp = Some(sprig_format::config::MtpConfig { layers: 1, moe: false });
        let file = |c: &sprig_format::ModelConfig| {
            let mut w = ContainerWriter::new(c, "{}".into(), None);
            w.add_f32("x", &[4], &[0.0; 4]);
            ModelFile::from_bytes(&w.to_bytes()).unwrap()
        };
        for kv in [KvDtype::F32, KvDtype::Q8] {
            let (without, with) = (MemoryNeed::of(&file(&plain), 100, kv), MemoryNeed::of(&file(&c), 100, kv));
            let layer = KvLayout::for_model(&c, 100).with_dtype(kv).bytes_per_position() * 100;
            assert_eq!(with.kv_cache, without.kv_cache + layer, "{kv:?}");
            assert!(with.scratch > without.scratch);
        }
    }
}
