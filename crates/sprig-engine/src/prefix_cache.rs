//! The prefix cache shared by every session of an [`Engine`](crate::Engine): K/V of token blocks, keyed by
//! the whole prefix up to them, so a request whose prompt starts like an earlier one (a system prompt, tool
//! definitions, the earlier turns of a conversation) restores those blocks instead of running them again —
//! across sessions, restarts of a session, and edited turns alike.
//!
//! A block is [`BLOCK_TOKENS`] tokens at a block-aligned position. Its key hashes its parent's key with its
//! own tokens (a chain, like vLLM's prefix hashing); a lookup walks the chain from the first block and checks
//! each block's tokens, so a hash collision cannot hand back another prefix's K/V. Blocks hold their K/V as
//! host copies (`Arc`-shared: a restore in progress keeps what it reads alive); restoring copies them into the
//! session's KV cache, whose layout (transposed key blocks on the CPU, device buffers on a GPU) is not one
//! blocks could share. Under the byte budget the least recently used block without children goes first, so a
//! chain shrinks from its end and never loses its start.
//!
//! Sliding-window layers (Gemma 3's local layers) keep only what resuming needs: a session resumed at a block
//! boundary `P` needs those layers' last `window` positions before `P`, so every block keeps its last
//! `min(BLOCK_TOKENS, window)` positions of them (all of them when the window is at least a block) and global
//! layers keep all. A restore writes the global layers' whole prefix and each sliding layer's last window.
//! Blocks of an int8 KV cache are kept as its int8 codes and scales.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use sprig_backend::{Backend, KvDtype, KvLayout};
use sprig_models::State;

use crate::Result;

/// Tokens per cached block: small enough that a request loses little to the partial block at its end,
/// large enough that the bookkeeping stays negligible.
pub const BLOCK_TOKENS: usize = 16;

/// Default byte budget of an engine's prefix cache.
pub const DEFAULT_BUDGET_BYTES: usize = 256 << 20;

/// K and V of one block: per layer, `[n, kv_dim]` each, the block's last `n` positions (see the module doc).
pub struct BlockKv {
    layers: Vec<(Rows, Rows)>,
}

impl BlockKv {
    fn bytes(&self) -> usize {
        self.layers.iter().map(|(k, v)| k.bytes() + v.bytes()).sum()
    }
}

/// Rows of keys or values as the session's cache stores them: f32, or int8 codes with a scale per head (a
/// quarter of the bytes; quantizing an int8 cache's dequantized rows gives its codes back).
enum Rows {
    F32(Vec<f32>),
    Q8 { codes: Vec<i8>, scales: Vec<f32>, head_dim: usize },
}

impl Rows {
    fn new(x: &[f32], layout: &KvLayout) -> Self {
        match layout.dtype {
            KvDtype::F32 => Rows::F32(x.to_vec()),
            KvDtype::Q8 => {
                let (codes, scales) = sprig_backend::quantize_kv(x, layout.head_dim);
                Rows::Q8 { codes, scales, head_dim: layout.head_dim }
            }
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Rows::F32(x) => 4 * x.len(),
            Rows::Q8 { codes, scales, .. } => codes.len() + 4 * scales.len(),
        }
    }

    /// The values from element `from` on.
    fn values(&self, from: usize) -> std::borrow::Cow<'_, [f32]> {
        match self {
            Rows::F32(x) => std::borrow::Cow::Borrowed(&x[from..]),
            Rows::Q8 { codes, scales, head_dim } => {
                std::borrow::Cow::Owned(sprig_backend::dequantize_kv(codes, scales, *head_dim, from).collect())
            }
        }
    }
}

struct Block {
    parent: u64,
    tokens: [u32; BLOCK_TOKENS],
    kv: Arc<BlockKv>,
    bytes: usize,
    /// Last use (a logical clock): eviction takes the smallest among blocks without children.
    used: u64,
    children: u32,
}

/// What the cache holds and what it saved, over the engine's life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// Requests run through sessions.
    pub requests: u64,
    /// Their prompt tokens, cached or run.
    pub prompt_tokens: u64,
    /// Prompt tokens not run: reused from the session's own KV cache or restored from this cache.
    pub cached_tokens: u64,
    /// Of those, restored from this (shared) cache.
    pub shared_tokens: u64,
    pub blocks: usize,
    pub bytes: usize,
    pub budget: usize,
    pub evicted_blocks: u64,
}

impl PrefixCacheStats {
    /// Cached / prompt tokens (0 before any request).
    pub fn hit_rate(&self) -> f64 {
        self.cached_tokens as f64 / self.prompt_tokens.max(1) as f64
    }
}

pub struct PrefixCache {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    blocks: HashMap<u64, Block>,
    bytes: usize,
    budget: usize,
    clock: u64,
    stats: PrefixCacheStats,
}

/// The key of the chain's start.
const ROOT: u64 = 0x5350_5249_4750_4643;

fn block_key(parent: u64, tokens: &[u32]) -> u64 {
    // SipHash with fixed keys: stable for the life of the process, which is all a key must be.
    let mut h = std::hash::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

impl PrefixCache {
    pub fn new(budget_bytes: usize) -> Self {
        PrefixCache { inner: Mutex::new(Inner { budget: budget_bytes, ..Default::default() }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The map is consistent between statements: a panic elsewhere while holding it leaves nothing half done.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn enabled(&self) -> bool {
        self.lock().budget > 0
    }

    /// Sets the byte budget, evicting down to it (0 turns the cache off and empties it).
    pub fn set_budget(&self, bytes: usize) {
        let mut g = self.lock();
        g.budget = bytes;
        g.evict_to(bytes);
    }

    /// Evicts until at most `bytes` are held (the budget stays): the memory budget's first give.
    pub fn shrink_to(&self, bytes: usize) {
        self.lock().evict_to(bytes);
    }

    pub fn stats(&self) -> PrefixCacheStats {
        let g = self.lock();
        PrefixCacheStats { blocks: g.blocks.len(), bytes: g.bytes, budget: g.budget, ..g.stats }
    }

    /// Counts one request: `prompt` tokens of which `cached` were not run, `shared` of them from this cache.
    pub fn record(&self, prompt: usize, cached: usize, shared: usize) {
        let mut g = self.lock();
        g.stats.requests += 1;
        g.stats.prompt_tokens += prompt as u64;
        g.stats.cached_tokens += cached as u64;
        g.stats.shared_tokens += shared as u64;
    }

    /// Keys of the leading full blocks of `tokens` that the cache holds.
    fn chain(g: &Inner, tokens: &[u32]) -> Vec<u64> {
        let mut keys = Vec::new();
        let mut parent = ROOT;
        for block in tokens.chunks_exact(BLOCK_TOKENS) {
            let key = block_key(parent, block);
            match g.blocks.get(&key) {
                Some(b) if b.parent == parent && b.tokens[..] == *block => keys.push(key),
                _ => break,
            }
            parent = key;
        }
        keys
    }

    /// How many leading full blocks of `tokens` are cached (nothing is marked used).
    pub fn cached_blocks(&self, tokens: &[u32]) -> usize {
        Self::chain(&self.lock(), tokens).len()
    }

    /// The K/V of the leading full blocks of `tokens` the cache holds, marked used.
    fn lookup(&self, tokens: &[u32]) -> Vec<Arc<BlockKv>> {
        let mut g = self.lock();
        let keys = Self::chain(&g, tokens);
        // The chain's end gets the oldest mark so that, among equally recent chains, eviction trims ends.
        g.clock += 1;
        let base = g.clock;
        g.clock += keys.len() as u64;
        keys.iter()
            .enumerate()
            .map(|(i, k)| {
                let b = g.blocks.get_mut(k).expect("in the chain");
                b.used = base + (keys.len() - i) as u64;
                b.kv.clone()
            })
            .collect()
    }

    /// Adds blocks `first..first + kvs.len()` of `tokens` (each needs its parent cached, which holds when
    /// `first` is at most [`PrefixCache::cached_blocks`]), then evicts down to the budget.
    fn insert(&self, tokens: &[u32], first: usize, kvs: Vec<BlockKv>) {
        let mut g = self.lock();
        if g.budget == 0 {
            return;
        }
        let keys = Self::chain(&g, &tokens[..first * BLOCK_TOKENS]);
        if keys.len() < first {
            return; // the parent went meanwhile
        }
        let mut parent = keys.last().copied().unwrap_or(ROOT);
        for (i, kv) in kvs.into_iter().enumerate() {
            let n = first + i;
            let block: [u32; BLOCK_TOKENS] =
                tokens[n * BLOCK_TOKENS..(n + 1) * BLOCK_TOKENS].try_into().expect("a full block");
            let key = block_key(parent, &block);
            g.clock += 1;
            let used = g.clock;
            if let Some(b) = g.blocks.get_mut(&key) {
                b.used = used;
            } else {
                if let Some(p) = g.blocks.get_mut(&parent) {
                    p.children += 1;
                }
                let bytes = kv.bytes() + std::mem::size_of::<Block>();
                g.bytes += bytes;
                g.blocks.insert(key, Block { parent, tokens: block, kv: Arc::new(kv), bytes, used, children: 0 });
            }
            parent = key;
        }
        let budget = g.budget;
        g.evict_to(budget);
    }
}

impl Inner {
    fn evict_to(&mut self, bytes: usize) {
        while self.bytes > bytes {
            let Some((&key, _)) = self.blocks.iter().filter(|(_, b)| b.children == 0).min_by_key(|(_, b)| b.used) else {
                break;
            };
            let b = self.blocks.remove(&key).expect("found above");
            self.bytes -= b.bytes;
            self.stats.evicted_blocks += 1;
            if let Some(p) = self.blocks.get_mut(&b.parent) {
                p.children -= 1;
            }
        }
    }
}

/// Positions of a block a layer keeps: all of them on a global layer, the last `window` on a sliding one.
fn kept(layout: &KvLayout, layer: usize) -> usize {
    BLOCK_TOKENS.min(layout.layer_capacity(layer))
}

/// Whether the kept positions of the block ending at `end` can still be read from a state at `pos`: each
/// layer holds its last `capacity` positions.
fn readable(layout: &KvLayout, end: usize, pos: usize) -> bool {
    end <= pos && (0..layout.windows.len()).all(|l| end - kept(layout, l) + layout.layer_capacity(l) >= pos)
}

/// The longest prefill chunk that leaves every block completed in it readable at the chunk's end (see
/// [`readable`]): any length on a model of global layers, one block short of the smallest window otherwise.
pub fn chunk_limit(layout: &KvLayout, max_chunk: usize) -> usize {
    let smallest = (0..layout.windows.len())
        .filter(|&l| layout.windows[l].is_some())
        .map(|l| layout.layer_capacity(l))
        .min();
    match smallest {
        None => max_chunk,
        Some(w) => (w.saturating_sub(BLOCK_TOKENS) / BLOCK_TOKENS * BLOCK_TOKENS).clamp(BLOCK_TOKENS, max_chunk.max(BLOCK_TOKENS)),
    }
}

/// The end of the next prefill chunk from `pos`: at most `limit` tokens, ending on a block boundary when it
/// does not end the prompt (`end`), so every block it completes can be cached.
pub fn chunk_end(pos: usize, end: usize, limit: usize) -> usize {
    let aligned = (pos + limit) / BLOCK_TOKENS * BLOCK_TOKENS;
    end.min(if aligned > pos { aligned } else { pos + limit })
}

impl PrefixCache {
    /// Caches the blocks of `tokens` (what `state` holds, `tokens.len() == state.pos`) that are not cached yet
    /// and can still be read from the state: all new ones after a prefill chunk limited by [`chunk_limit`];
    /// after decoding, those within reach of every sliding window.
    pub fn insert_from<B: Backend>(&self, b: &B, state: &State<B>, layout: &KvLayout, tokens: &[u32]) -> Result<()> {
        let pos = state.pos;
        debug_assert_eq!(tokens.len(), pos);
        let first = self.cached_blocks(tokens);
        let n = (first..pos / BLOCK_TOKENS).take_while(|&i| readable(layout, (i + 1) * BLOCK_TOKENS, pos)).count();
        if n == 0 || !self.enabled() {
            return Ok(());
        }
        let mut kvs: Vec<BlockKv> = (0..n).map(|_| BlockKv { layers: Vec::with_capacity(layout.windows.len()) }).collect();
        let (mut k, mut v) = (Vec::new(), Vec::new());
        let kvd = layout.kv_dim;
        for l in 0..layout.windows.len() {
            let keep = kept(layout, l);
            if keep == BLOCK_TOKENS {
                // One read for all the new blocks of this layer.
                let start = first * BLOCK_TOKENS;
                b.kv_read(state.kv_cache(), l, start..start + n * BLOCK_TOKENS, &mut k, &mut v)?;
                for (i, kv) in kvs.iter_mut().enumerate() {
                    let r = i * BLOCK_TOKENS * kvd..(i + 1) * BLOCK_TOKENS * kvd;
                    kv.layers.push((Rows::new(&k[r.clone()], layout), Rows::new(&v[r], layout)));
                }
            } else {
                for (i, kv) in kvs.iter_mut().enumerate() {
                    let end = (first + i + 1) * BLOCK_TOKENS;
                    b.kv_read(state.kv_cache(), l, end - keep..end, &mut k, &mut v)?;
                    kv.layers.push((Rows::new(&k, layout), Rows::new(&v, layout)));
                }
            }
        }
        self.insert(tokens, first, kvs);
        Ok(())
    }

    /// Restores into `state` the longest cached block prefix of `tokens`, if it covers more than `at_least`
    /// tokens: returns the tokens restored (`state.pos`), or 0 when the state was left alone.
    pub fn restore_into<B: Backend>(
        &self,
        b: &B,
        state: &mut State<B>,
        layout: &KvLayout,
        tokens: &[u32],
        at_least: usize,
    ) -> Result<usize> {
        let usable = &tokens[..tokens.len().min(state.max_context)];
        if !self.enabled() || self.cached_blocks(usable) * BLOCK_TOKENS <= at_least {
            return Ok(0);
        }
        let chain = self.lookup(usable);
        let p = chain.len() * BLOCK_TOKENS;
        state.pos = 0;
        for l in 0..layout.windows.len() {
            let (keep, from) = (kept(layout, l), p.saturating_sub(layout.layer_capacity(l)));
            for (i, kv) in chain.iter().enumerate() {
                let end = (i + 1) * BLOCK_TOKENS;
                if end <= from {
                    continue;
                }
                // The block holds positions end-keep..end; the layer needs from..p.
                let skip = from.saturating_sub(end - keep);
                let (k, v) = &kv.layers[l];
                let kvd = layout.kv_dim;
                b.kv_write(state.kv_cache_mut(), l, end - keep + skip, &k.values(skip * kvd), &v.values(skip * kvd))?;
            }
        }
        state.pos = p;
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(bytes_per: usize) -> BlockKv {
        BlockKv { layers: vec![(Rows::F32(vec![0.0; bytes_per / 8]), Rows::F32(vec![0.0; bytes_per / 8]))] }
    }

    #[test]
    fn chains_are_found_by_whole_prefix_and_evicted_from_their_ends() {
        let block_bytes = 1024 + std::mem::size_of::<Block>();
        let c = PrefixCache::new(3 * block_bytes);
        let a: Vec<u32> = (0..64).collect();
        c.insert(&a, 0, vec![kv(1024), kv(1024)]);
        assert_eq!(c.cached_blocks(&a), 2);
        // The same second block after another first block is another prefix.
        let mut b = a.clone();
        b[0] = 99;
        assert_eq!(c.cached_blocks(&b), 0);
        // A block is only added after its parent.
        c.insert(&b, 1, vec![kv(1024)]);
        assert_eq!(c.stats().blocks, 2);
        // Over budget: the least recent childless block goes, so chains lose their ends first.
        c.insert(&a, 2, vec![kv(1024), kv(1024)]);
        assert_eq!(c.stats().blocks, 3);
        assert_eq!(c.cached_blocks(&a), 3);
        assert_eq!(c.stats().evicted_blocks, 1);
        c.lookup(&b); // nothing of b: no mark
        c.insert(&b, 0, vec![kv(1024)]);
        // b's first block evicted a's last (the least recent childless one).
        assert_eq!((c.cached_blocks(&a), c.cached_blocks(&b)), (2, 1));
        c.set_budget(0);
        assert_eq!((c.stats().blocks, c.stats().bytes), (0, 0));
    }

    #[test]
    fn chunks_end_on_block_boundaries_within_the_window() {
        let layout = |w: Option<usize>| KvLayout { kv_dim: 4, windows: vec![None, w], max_context: 4096, head_dim: 4, dtype: Default::default() };
        assert_eq!(chunk_limit(&layout(None), 512), 512);
        assert_eq!(chunk_limit(&layout(Some(512)), 512), 496);
        assert_eq!(chunk_limit(&layout(Some(8)), 512), BLOCK_TOKENS);
        assert_eq!(chunk_end(5, 1000, 512), 512);
        assert_eq!(chunk_end(512, 600, 512), 600);
        assert_eq!(chunk_end(0, 1000, 16), 16);
        // Every block a chunk completes can be read at its end.
        for w in [8, 16, 24, 40, 100, 512] {
            let l = layout(Some(w));
            let limit = chunk_limit(&l, 512);
            for start in 0..100 {
                let end = chunk_end(start, 10_000, limit);
                for e in (start + 1..=end).filter(|e| e % BLOCK_TOKENS == 0) {
                    assert!(readable(&l, e, end), "window {w}: block ending {e} after chunk {start}..{end}");
                }
            }
        }
    }
}
