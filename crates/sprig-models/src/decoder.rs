//! The decoder-only transformer, llama2.c style: config, weights and run state as plain structs and one
//! readable forward pass. Family differences are config flags, not copies of the model.

use std::sync::Arc;

use sprig_backend::{Activation, AttentionParams, Backend, ExpertWeights, KvDtype, KvLayout, MoeParams, MoeUsage, RopeParams};
use sprig_format::{AttentionKind, ModelConfig, ModelFile, QkNorm};

use crate::{ModelError, Result};

struct Layer<B: Backend> {
    attn_norm: B::Weight,
    wq: B::Weight,
    wk: B::Weight,
    wv: B::Weight,
    wo: B::Weight,
    /// Qwen2-style QKV biases.
    bias: Option<[B::Weight; 3]>,
    /// RMSNorm of Q and K (per head or over the projection, as the family's rules say).
    qk_norm: Option<[B::Weight; 2]>,
    post_attn_norm: Option<B::Weight>,
    ffn_norm: B::Weight,
    ffn: Ffn<B>,
    post_ffn_norm: Option<B::Weight>,
    attn: AttentionParams,
    rope: RopeParams,
}

/// A GLU feed-forward network: `down(act(gate x) * up x)`.
struct Glu<B: Backend> {
    gate: B::Weight,
    up: B::Weight,
    down: B::Weight,
}

impl<B: Backend> Glu<B> {
    /// `out = down(act(gate · x) * (up · x))`; `scratch` receives gate, up and the hidden activations.
    fn run(
        &self,
        b: &B,
        act: Activation,
        x: &B::Tensor,
        scratch: [&mut B::Tensor; 3],
        out: &mut B::Tensor,
    ) -> sprig_backend::Result<()> {
        let [gate, up, hid] = scratch;
        b.linear_many(x, &[(&self.gate, None), (&self.up, None)], &mut [&mut *gate, &mut *up])?;
        b.glu(gate, up, act, hid)?;
        b.linear(hid, &self.down, None, out)
    }
}

/// The FFN of one layer: dense, or a Mixture-of-Experts.
enum Ffn<B: Backend> {
    Dense(Glu<B>),
    Moe {
        /// `[n_experts, dim]`: router logits = x · routerᵀ.
        router: B::Weight,
        /// Stacked experts (see [`ExpertWeights`]).
        gate: B::Weight,
        up: B::Weight,
        down: B::Weight,
        /// Always-applied shared expert (Qwen-MoE / DeepSeek), optionally gated by sigmoid(x · gate_inp).
        shared: Option<(Glu<B>, Option<B::Weight>)>,
        params: MoeParams,
    },
}

/// A multi-token-prediction head ([`sprig_format::MtpConfig`]): from the model's hidden state at position `p`
/// (after the final norm) and the embedding of the token at `p + 1`, one block with its own KV cache predicts
/// the token at `p + 2`. Drafting chains it: its own normalised output stands in for the next hidden state.
struct MtpHead<B: Backend> {
    /// `[1, dim]` norms of the token's embedding and of the hidden state.
    enorm: B::Weight,
    hnorm: B::Weight,
    /// `[dim, dim]` each: the two column halves of `eh_proj`, applied to the normalised embedding and hidden
    /// state and summed (= `eh_proj · [enorm(e); hnorm(h)]`).
    eh_embd: B::Weight,
    eh_hidden: B::Weight,
    block: Layer<B>,
    /// `[1, dim]` norm before the output projection.
    head_norm: B::Weight,
    /// `[vocab, dim]` own output projection and embedding table, when the file has them (else the model's).
    head: Option<B::Weight>,
    embd: Option<B::Weight>,
}

/// `x += norm(y)` with a post-norm (Gemma), else `x += y`; `scratch` holds the normalised `y`.
fn residual<B: Backend>(
    b: &B,
    x: &mut B::Tensor,
    y: &B::Tensor,
    post_norm: Option<&B::Weight>,
    eps: f32,
    scratch: &mut B::Tensor,
) -> sprig_backend::Result<()> {
    match post_norm {
        Some(n) => {
            b.rms_norm(y, n, eps, scratch)?;
            b.add(x, scratch)
        }
        None => b.add(x, y),
    }
}

/// Loaded weights of one model on one backend.
pub struct Model<B: Backend> {
    pub config: ModelConfig,
    pub file: Arc<ModelFile>,
    pub backend: Arc<B>,
    embd: B::Weight,
    /// `None` when the output projection is tied to the embedding table.
    output: Option<B::Weight>,
    output_norm: B::Weight,
    layers: Vec<Layer<B>>,
    /// The file's first MTP head, if it has one.
    mtp: Option<MtpHead<B>>,
    /// How states made from now on store keys and values (int8 when set: [`Model::set_kv_dtype`]).
    kv_q8: std::sync::atomic::AtomicBool,
}

/// Sees each linear layer's input: the names of the weights that read it, and the activations.
pub type LinearInputObserver<'a> = dyn FnMut(&[&str], &[f32]) + 'a;

/// Shows a layer's linear inputs to a [`LinearInputObserver`]: the tensor, the layer, the weights' names.
type ShowInput<'a, B> = dyn FnMut(&B, &<B as Backend>::Tensor, usize, &[&str]) -> Result<()> + 'a;

/// Which positions' logits a forward pass produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token (generation).
    Last,
    /// Every token (perplexity, KL evaluation, speculative verification).
    All,
}

/// Activation buffers of a forward pass, reused from pass to pass (they only grow). `T` is the number of rows
/// of the pass: a sequence's tokens (1 when decoding), or one token per sequence of a batch.
pub struct Scratch<B: Backend> {
    /// Residual stream `[T, dim]`.
    x: B::Tensor,
    /// Normalised residual `[T, dim]` (the input of the next linears).
    xn: B::Tensor,
    /// Queries `[T, n_heads * head_dim]`.
    q: B::Tensor,
    /// New keys `[T, n_kv_heads * head_dim]`.
    k: B::Tensor,
    /// New values `[T, n_kv_heads * head_dim]`.
    v: B::Tensor,
    /// Attention output `[T, n_heads * head_dim]` (also scratch for the QK norms).
    att: B::Tensor,
    /// One sequence's rows of q, k, v and its attention output, when a batch holds several sequences.
    seq_q: B::Tensor,
    seq_k: B::Tensor,
    seq_v: B::Tensor,
    seq_att: B::Tensor,
    /// Output of a block's last projection `[T, dim]`.
    proj: B::Tensor,
    /// FFN gate projection `[T, hidden]`.
    gate: B::Tensor,
    /// FFN up projection `[T, hidden]`.
    up: B::Tensor,
    /// FFN hidden activations `act(gate) * up`, `[T, hidden]`.
    hid: B::Tensor,
    /// MoE router logits `[T, n_experts]` (also the shared-expert gate `[T, 1]`).
    router: B::Tensor,
    /// Shared-expert output `[T, dim]`.
    shared: B::Tensor,
    /// The last row of `x`, `[1, dim]` (logits of the last token only).
    last: B::Tensor,
    /// Every row of `x` after the final norm, `[T, dim]` (kept for an MTP head; an MTP pass's last row).
    hidden: B::Tensor,
    /// Logits of the last forward pass: `[1 or T, vocab]`.
    logits: B::Tensor,
}

impl<B: Backend> Scratch<B> {
    fn new(b: &B) -> Self {
        Scratch {
            x: b.tensor(),
            xn: b.tensor(),
            q: b.tensor(),
            k: b.tensor(),
            v: b.tensor(),
            att: b.tensor(),
            seq_q: b.tensor(),
            seq_k: b.tensor(),
            seq_v: b.tensor(),
            seq_att: b.tensor(),
            proj: b.tensor(),
            gate: b.tensor(),
            up: b.tensor(),
            hid: b.tensor(),
            router: b.tensor(),
            shared: b.tensor(),
            last: b.tensor(),
            hidden: b.tensor(),
            logits: b.tensor(),
        }
    }
}

/// Per-sequence run state (llama2.c's `RunState`): position, KV cache and its activation buffers.
/// Ring entries a speculative pass will overwrite (see [`Model::ring_checkpoint`]).
pub struct RingCheckpoint {
    pos: usize,
    kv_dim: usize,
    saved: Vec<SavedRows>,
}

/// Keys and values of positions `first ..` of one layer, `[positions, kv_dim]` each.
struct SavedRows {
    layer: usize,
    first: usize,
    k: Vec<f32>,
    v: Vec<f32>,
}

pub struct State<B: Backend> {
    /// Positions already in the KV cache (the next token's position).
    pub pos: usize,
    /// Positions the KV cache can hold.
    pub max_context: usize,
    /// Per layer: keys and values, `[capacity, kv_dim]` each (a ring of `window` entries on sliding layers).
    kv: B::KvCache,
    /// How `kv` stores them.
    kv_dtype: KvDtype,
    s: Scratch<B>,
    /// Per layer (`None` for dense layers): the MoE layer's counters and scratch, accumulated over this
    /// sequence's forward passes (read them with [`Model::moe_usage`]).
    moe: Vec<Option<B::MoeState>>,
    /// The MTP head's state, once [`Model::enable_mtp`] made it: every forward pass then also runs the head
    /// over the pass's hidden states, so that it can draft after the pass.
    mtp: Option<MtpState<B>>,
    /// Position of the first token of the last forward pass (row 0 of `s.hidden`).
    pass_start: usize,
}

/// An MTP head's cache beside a sequence's: slot `j` holds the head's keys and values for the model's hidden
/// state at position `offset + j` with the token after it. It starts where the sequence was when the head last
/// lost track (enabled late, a restored session, a context shift): drafts are then worse, never wrong.
struct MtpState<B: Backend> {
    kv: B::KvCache,
    /// Slots in `kv` (the head's next position).
    pos: usize,
    max_context: usize,
    /// The sequence position of slot 0.
    offset: usize,
    /// Sequence position of `pending_h`: the last hidden state, whose next token comes with the next pass.
    pending: Option<usize>,
    /// `[1, dim]`
    pending_h: B::Tensor,
    /// The hidden states of the head's pass `[rows, dim]`, and a scratch copy.
    h_in: B::Tensor,
    h_tmp: B::Tensor,
    s: Scratch<B>,
    /// The head's MoE state (when its FFN is MoE).
    moe: Option<B::MoeState>,
    logits: Vec<f32>,
}

/// Buffers of batched decode steps ([`Model::forward_batch`]): one token of each of several sequences per
/// pass, so the weights are read once for all of them.
pub struct Batch<B: Backend> {
    s: Scratch<B>,
    /// The MoE layers' counters of the batch's passes (not attributed to its sequences).
    moe: Vec<Option<B::MoeState>>,
}

/// One sequence of a forward pass: its KV cache and position, and how many of the pass's rows are its tokens.
struct Seq<'a, B: Backend> {
    kv: &'a mut B::KvCache,
    pos: &'a mut usize,
    max_context: usize,
    rows: usize,
}

impl<B: Backend> State<B> {
    /// The KV cache (saving a session).
    pub fn kv_cache(&self) -> &B::KvCache {
        &self.kv
    }
    /// How the KV cache stores keys and values.
    pub fn kv_dtype(&self) -> KvDtype {
        self.kv_dtype
    }
    /// The KV cache, to restore a saved one into a fresh state (then set `pos`).
    pub fn kv_cache_mut(&mut self) -> &mut B::KvCache {
        &mut self.kv
    }
}

impl<B: Backend> Model<B> {
    pub fn load(backend: Arc<B>, file: Arc<ModelFile>) -> Result<Self> {
        let c = file.config.clone();
        let b = &*backend;
        let load = |name: &str, rows: usize, cols: usize| -> Result<B::Weight> {
            let w = b.load_weight(&file, name)?;
            let got = b.weight_shape(&w);
            if got != (rows, cols) {
                return Err(ModelError::Shape { tensor: name.into(), got, expected: (rows, cols) });
            }
            Ok(w)
        };
        let opt = |name: &str, rows: usize, cols: usize| -> Result<Option<B::Weight>> {
            if file.contains(name) {
                load(name, rows, cols).map(Some)
            } else {
                Ok(None)
            }
        };
        let (d, hd, qd, kvd) = (c.dim, c.head_dim, c.q_dim(), c.kv_dim());
        let embd = load("token_embd.weight", c.vocab_size, d)?;
        let output = if c.tied_embeddings { None } else { Some(load("output.weight", c.vocab_size, d)?) };
        let output_norm = load("output_norm.weight", 1, d)?;
        let mut layers = Vec::with_capacity(c.n_layers);
        // One set of RoPE frequencies per attention kind, shared by its layers (and by a GPU backend's tables).
        // Long-context scaling applies to global layers (Gemma 3's local layers keep their own base).
        let rope_global = RopeParams::new(0, hd, c.rope_theta, c.rope_scaling.as_ref(), c.rope_layout);
        let rope_local = RopeParams::new(0, hd, c.rope_theta_local.unwrap_or(c.rope_theta), None, c.rope_layout);
        // Layer `i` (the MTP head's block is layer `n_layers`), with an MoE FFN or a dense one.
        let load_layer = |i: usize, moe_ffn: bool, kind: AttentionKind| -> Result<Layer<B>> {
            let n = |s: &str| format!("blk.{i}.{s}");
            let bias = match opt(&n("attn_q.bias"), 1, qd)? {
                Some(bq) => Some([bq, load(&n("attn_k.bias"), 1, kvd)?, load(&n("attn_v.bias"), 1, kvd)?]),
                None => None,
            };
            // QK norm where the family has one: per head, or over the whole projection.
            let (qn, kn) = (n("attn_q_norm.weight"), n("attn_k_norm.weight"));
            let qk_norm = match c.arch.rules().qk_norm {
                QkNorm::None => None,
                QkNorm::PerHead => Some([load(&qn, 1, hd)?, load(&kn, 1, hd)?]),
                QkNorm::Whole => Some([load(&qn, 1, qd)?, load(&kn, 1, kvd)?]),
            };
            let glu = |prefix: &str, suffix: &str, hidden: usize| -> Result<Glu<B>> {
                Ok(Glu {
                    gate: load(&n(&format!("{prefix}_gate{suffix}.weight")), hidden, d)?,
                    up: load(&n(&format!("{prefix}_up{suffix}.weight")), hidden, d)?,
                    down: load(&n(&format!("{prefix}_down{suffix}.weight")), d, hidden)?,
                })
            };
            let ffn = match &c.moe {
                Some(m) if moe_ffn => {
                    let (ne, eh) = (m.n_experts, m.expert_hidden_dim);
                    let shared = match m.shared_expert_hidden_dim {
                        Some(sh) => Some((glu("ffn", "_shexp", sh)?, opt(&n("ffn_gate_inp_shexp.weight"), 1, d)?)),
                        None => None,
                    };
                    Ffn::Moe {
                        router: load(&n("ffn_gate_inp.weight"), ne, d)?,
                        gate: load(&n("ffn_gate_exps.weight"), ne * eh, d)?,
                        up: load(&n("ffn_up_exps.weight"), ne * eh, d)?,
                        down: load(&n("ffn_down_exps.weight"), ne * d, eh)?,
                        shared,
                        params: MoeParams {
                            n_experts: ne,
                            top_k: m.top_k,
                            expert_hidden: eh,
                            scoring: m.scoring,
                            norm_topk: m.norm_topk,
                            routed_scale: m.routed_scale.unwrap_or(1.0),
                            activation: c.activation,
                        },
                    }
                }
                _ => Ffn::Dense(glu("ffn", "", c.hidden_dim)?),
            };
            let (window, rope) = match kind {
                AttentionKind::Global => (None, &rope_global),
                AttentionKind::Sliding { window } => (Some(window), &rope_local),
            };
            Ok(Layer {
                attn_norm: load(&n("attn_norm.weight"), 1, d)?,
                wq: load(&n("attn_q.weight"), qd, d)?,
                wk: load(&n("attn_k.weight"), kvd, d)?,
                wv: load(&n("attn_v.weight"), kvd, d)?,
                wo: load(&n("attn_output.weight"), d, qd)?,
                bias,
                qk_norm,
                post_attn_norm: opt(&n("post_attention_norm.weight"), 1, d)?,
                ffn_norm: load(&n("ffn_norm.weight"), 1, d)?,
                ffn,
                post_ffn_norm: opt(&n("post_ffw_norm.weight"), 1, d)?,
                attn: AttentionParams {
                    n_heads: c.n_heads,
                    n_kv_heads: c.n_kv_heads,
                    head_dim: hd,
                    scale: c.attn_scale(),
                    window,
                },
                rope: rope.clone(),
            })
        };
        for i in 0..c.n_layers {
            let moe_ffn = c.moe.as_ref().is_some_and(|m| m.moe_layers[i]);
            layers.push(load_layer(i, moe_ffn, c.attention[i])?);
        }
        let mtp = match &c.mtp {
            None => None,
            Some(m) => {
                let l = c.n_layers;
                let n = |s: &str| format!("blk.{l}.nextn.{s}");
                Some(MtpHead {
                    enorm: load(&n("enorm.weight"), 1, d)?,
                    hnorm: load(&n("hnorm.weight"), 1, d)?,
                    eh_embd: load(&n("eh_proj_embd.weight"), d, d)?,
                    eh_hidden: load(&n("eh_proj_hidden.weight"), d, d)?,
                    block: load_layer(l, m.moe, AttentionKind::Global)?,
                    head_norm: load(&n("shared_head_norm.weight"), 1, d)?,
                    head: opt(&n("shared_head_head.weight"), c.vocab_size, d)?,
                    embd: opt(&n("embed_tokens.weight"), c.vocab_size, d)?,
                })
            }
        };
        Ok(Model { config: c, file, backend, embd, output, output_norm, layers, mtp, kv_q8: Default::default() })
    }

    /// A fresh sequence state holding up to `max_context` positions (0 = the model's trained context). Fails
    /// when its KV cache cannot be allocated.
    pub fn new_state(&self, max_context: usize) -> Result<State<B>> {
        let ctx = if max_context == 0 { self.config.max_seq_len } else { max_context };
        let b = &*self.backend;
        let layout = self.kv_layout(ctx);
        Ok(State {
            pos: 0,
            max_context: ctx,
            kv: b.kv_cache(&layout)?,
            kv_dtype: layout.dtype,
            s: Scratch::new(b),
            moe: self.moe_states()?,
            mtp: None,
            pass_start: 0,
        })
    }

    /// Whether the model has an MTP head to draft with.
    pub fn has_mtp(&self) -> bool {
        self.mtp.is_some()
    }

    /// Gives `st` the MTP head's state (its own KV cache of `st`'s context; nothing when it has one): from
    /// the next forward pass on, [`Model::mtp_draft`] can draft. Fails on a model without an MTP head.
    pub fn enable_mtp(&self, st: &mut State<B>) -> Result<()> {
        let head = self.mtp.as_ref().ok_or(ModelError::NoMtpHead)?;
        if st.mtp.is_some() {
            return Ok(());
        }
        let b = &*self.backend;
        let layout = KvLayout { windows: vec![None], ..self.state_kv_layout(st) };
        let moe = match &head.block.ffn {
            Ffn::Moe { params, .. } => Some(b.moe_state(params)?),
            Ffn::Dense(_) => None,
        };
        st.mtp = Some(MtpState {
            kv: b.kv_cache(&layout)?,
            pos: 0,
            max_context: st.max_context,
            offset: st.pos,
            pending: None,
            pending_h: b.tensor(),
            h_in: b.tensor(),
            h_tmp: b.tensor(),
            s: Scratch::new(b),
            moe,
            logits: Vec::new(),
        });
        Ok(())
    }

    /// Drops `st`'s MTP head state (its forward passes stop feeding the head).
    pub fn disable_mtp(&self, st: &mut State<B>) {
        st.mtp = None;
    }

    /// Buffers for [`Model::forward_batch`].
    pub fn new_batch(&self) -> Result<Batch<B>> {
        Ok(Batch { s: Scratch::new(&*self.backend), moe: self.moe_states()? })
    }

    fn moe_states(&self) -> Result<Vec<Option<B::MoeState>>> {
        let b = &*self.backend;
        self.layers
            .iter()
            .map(|l| match &l.ffn {
                Ffn::Moe { params, .. } => b.moe_state(params).map(Some),
                Ffn::Dense(_) => Ok(None),
            })
            .collect::<std::result::Result<_, _>>()
            .map_err(Into::into)
    }

    /// The KV cache of a state of `ctx` positions (0: the trained context), as states made now store it.
    pub fn kv_layout(&self, ctx: usize) -> KvLayout {
        let ctx = if ctx == 0 { self.config.max_seq_len } else { ctx };
        KvLayout::for_model(&self.config, ctx).with_dtype(self.kv_dtype())
    }

    /// The KV cache layout of `st`: its context, and the KV type it was made with.
    pub fn state_kv_layout(&self, st: &State<B>) -> KvLayout {
        self.kv_layout(st.max_context).with_dtype(st.kv_dtype)
    }

    /// How states made from now on store keys and values (states already made keep theirs).
    pub fn set_kv_dtype(&self, dtype: KvDtype) {
        self.kv_q8.store(dtype == KvDtype::Q8, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn kv_dtype(&self) -> KvDtype {
        if self.kv_q8.load(std::sync::atomic::Ordering::Relaxed) {
            KvDtype::Q8
        } else {
            KvDtype::F32
        }
    }

    /// Drops positions `keep .. keep + drop` from what `st` holds, as llama.cpp's context shift does: later
    /// positions move down by `drop`, their keys rotated back by `drop` positions (RoPE rotations compose),
    /// values as they are. Those keys and values were computed with the dropped tokens in view, so what
    /// follows is an approximation of a run without them (cheap: no token runs again). Fails, leaving `st`
    /// as it was, when a sliding-window layer would need a kept position its ring no longer holds.
    pub fn shift_kv(&self, st: &mut State<B>, keep: usize, drop: usize) -> Result<()> {
        let (pos, b) = (st.pos, &*self.backend);
        if drop == 0 || keep + drop > pos {
            return Err(ModelError::ContextOverflow { pos, new: 0, ctx: keep + drop });
        }
        let layout = self.state_kv_layout(st);
        let to = pos - drop;
        // New positions each layer holds afterwards: all up to `to` (global) or its last window.
        let from = |l: usize| to.saturating_sub(layout.layer_capacity(l));
        for l in 0..self.layers.len() {
            let (lo, cap) = (from(l), layout.layer_capacity(l));
            // Kept positions below `keep` stay where they are; on a ring they must still be there.
            if lo < keep.min(to) && lo < pos.saturating_sub(cap) {
                return Err(ModelError::ShiftUnavailable { layer: l, position: lo });
            }
        }
        let (mut k, mut v) = (Vec::new(), Vec::new());
        for (l, layer) in self.layers.iter().enumerate() {
            let lo = from(l).max(keep);
            if lo >= to {
                continue;
            }
            b.kv_read(&st.kv, l, lo + drop..pos, &mut k, &mut v)?;
            let back = RopeParams { n_heads: self.config.n_kv_heads, attention_factor: 1.0, ..layer.rope.clone() };
            for row in k.chunks_exact_mut(layout.kv_dim) {
                back.rotate(row, -(drop as f32));
            }
            // At most `capacity` consecutive positions: their slots differ from those of the kept ones below
            // `keep`, which stay untouched.
            b.kv_write(&mut st.kv, l, lo, &k, &v)?;
        }
        st.pos = to;
        // The MTP head's cache no longer matches the positions: it restarts with the next pass.
        if let Some(m) = st.mtp.as_mut() {
            m.pending = None;
        }
        Ok(())
    }

    /// Saves what a forward pass of `n` tokens from `st.pos` will overwrite in sliding-window rings (the
    /// positions that fall out of a window), so that [`Model::rollback`] can undo that pass exactly. Global
    /// layers keep every position: nothing to save.
    pub fn ring_checkpoint(&self, st: &State<B>, n: usize) -> Result<RingCheckpoint> {
        let layout = self.state_kv_layout(st);
        let mut saved = Vec::new();
        for l in 0..self.layers.len() {
            let cap = layout.layer_capacity(l);
            // Writing position p + i overwrites position p + i - cap.
            let (lo, hi) = (st.pos.saturating_sub(cap), (st.pos + n).saturating_sub(cap).min(st.pos));
            if layout.windows[l].is_none() || lo >= hi {
                continue;
            }
            let (mut k, mut v) = (Vec::new(), Vec::new());
            self.backend.kv_read(&st.kv, l, lo..hi, &mut k, &mut v)?;
            saved.push(SavedRows { layer: l, first: lo, k, v });
        }
        Ok(RingCheckpoint { pos: st.pos, kv_dim: layout.kv_dim, saved })
    }

    /// Takes `st` back to `to` positions after a pass that began at `cp`'s (speculative decoding rejecting
    /// drafted tokens): what rings lost to the discarded positions is written back.
    pub fn rollback(&self, st: &mut State<B>, to: usize, cp: &RingCheckpoint) -> Result<()> {
        if to < cp.pos || to > st.pos {
            return Err(ModelError::ContextOverflow { pos: st.pos, new: 0, ctx: to });
        }
        let layout = self.state_kv_layout(st);
        for r in &cp.saved {
            // Position x's slot holds x + cap now; it goes back to x when x + cap was discarded (>= to).
            let first = r.first.max(to.saturating_sub(layout.layer_capacity(r.layer)));
            let off = (first - r.first) * cp.kv_dim;
            if off < r.k.len() {
                self.backend.kv_write(&mut st.kv, r.layer, first, &r.k[off..], &r.v[off..])?;
            }
        }
        st.pos = to;
        // The MTP head keeps what it took of the kept positions; the last kept hidden state is pending again.
        if let Some(m) = st.mtp.as_mut() {
            match to.checked_sub(1) {
                Some(last) if last >= st.pass_start && last >= m.offset => {
                    self.backend.rows(&st.s.hidden, last - st.pass_start, 1, &mut m.pending_h)?;
                    m.pending = Some(last);
                    m.pos = last - m.offset;
                }
                _ => m.pending = None,
            }
        }
        Ok(())
    }

    /// Runs `tokens` (positions `st.pos ..`) through the model, all at once (batched prefill) or one at a time
    /// (decode); leaves logits in `st.logits`.
    pub fn forward(&self, st: &mut State<B>, tokens: &[u32], mode: Logits) -> Result<()> {
        self.backend.run(|| self.forward_observed(st, tokens, mode, None))
    }

    /// [`Model::forward`] that also shows `observe` every linear layer's input (for calibration): the names
    /// of the weights that read it and the activations, `[tokens, features]` row-major on the host.
    pub fn forward_observed(
        &self,
        st: &mut State<B>,
        tokens: &[u32],
        mode: Logits,
        observe: Option<&mut LinearInputObserver>,
    ) -> Result<()> {
        let State { pos, max_context, kv, s, moe, mtp, pass_start, .. } = st;
        let a = *pos;
        let mut seqs = [Seq { kv, pos, max_context: *max_context, rows: tokens.len() }];
        self.forward_seqs(s, moe, &mut seqs, tokens, mode, mtp.is_some(), observe)?;
        *pass_start = a;
        match mtp {
            Some(m) => self.mtp_catch_up(m, &s.hidden, 0, a, tokens),
            None => Ok(()),
        }
    }

    /// One decode step of several sequences at once: `tokens[i]` continues `states[i]`. The linear layers run
    /// on all rows together (the weights are read once per step, not once per sequence); attention runs per
    /// sequence over its own KV cache. Row `i` of the batch's logits ([`Model::read_batch_logits`]) is
    /// sequence `i`'s.
    pub fn forward_batch(&self, batch: &mut Batch<B>, states: &mut [&mut State<B>], tokens: &[u32]) -> Result<()> {
        if states.len() != tokens.len() {
            return Err(ModelError::Backend(sprig_backend::BackendError::Shape {
                op: "forward_batch",
                detail: format!("{} tokens for {} sequences", tokens.len(), states.len()),
            }));
        }
        let keep_hidden = states.iter().any(|st| st.mtp.is_some());
        let Batch { s, moe } = batch;
        self.backend.run(|| {
            let mut seqs: Vec<Seq<'_, B>> = states
                .iter_mut()
                .map(|st| Seq { kv: &mut st.kv, pos: &mut st.pos, max_context: st.max_context, rows: 1 })
                .collect();
            self.forward_seqs(s, moe, &mut seqs, tokens, Logits::All, keep_hidden, None)?;
            drop(seqs);
            // Each sequence's MTP head takes its row (its hidden state for the pass is row i).
            for (i, st) in states.iter_mut().enumerate() {
                // Its hidden state is in the batch's buffers, not the state's: nothing to roll back to.
                st.pass_start = usize::MAX;
                if let Some(m) = st.mtp.as_mut() {
                    self.mtp_catch_up(m, &s.hidden, i, st.pos - 1, &tokens[i..i + 1])?;
                }
            }
            Ok(())
        })
    }

    /// Copies the logits of the batch's last step to the host, `[sequences, vocab]`.
    pub fn read_batch_logits(&self, batch: &Batch<B>, out: &mut Vec<f32>) -> Result<()> {
        Ok(self.backend.download(&batch.s.logits, out)?)
    }

    /// The forward pass of `seqs`, whose tokens are consecutive rows of `tokens`; with `keep_hidden`, every
    /// row's final-norm output stays in `st.hidden` (for MTP heads).
    #[allow(clippy::too_many_arguments)]
    fn forward_seqs(
        &self,
        st: &mut Scratch<B>,
        moe: &mut [Option<B::MoeState>],
        seqs: &mut [Seq<'_, B>],
        tokens: &[u32],
        mode: Logits,
        keep_hidden: bool,
        mut observe: Option<&mut LinearInputObserver>,
    ) -> Result<()> {
        let mut host = Vec::new();
        let mut show = |b: &B, t: &B::Tensor, li: usize, names: &[&str]| -> Result<()> {
            if let Some(f) = observe.as_mut() {
                b.download(t, &mut host)?;
                let full: Vec<String> = names.iter().map(|n| format!("blk.{li}.{n}.weight")).collect();
                let refs: Vec<&str> = full.iter().map(|s| s.as_str()).collect();
                f(&refs, &host);
            }
            Ok(())
        };
        let c = &self.config;
        let b = &*self.backend;
        if tokens.is_empty() {
            return Err(ModelError::NoTokens);
        }
        if seqs.iter().map(|q| q.rows).sum::<usize>() != tokens.len() {
            return Err(ModelError::NoTokens);
        }
        for q in seqs.iter() {
            if *q.pos + q.rows > q.max_context {
                return Err(ModelError::ContextOverflow { pos: *q.pos, new: q.rows, ctx: q.max_context });
            }
        }
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(ModelError::BadToken { id, vocab: c.vocab_size });
        }
        let eps = c.norm_eps;
        b.embed(&self.embd, tokens, c.embedding_scale.unwrap_or(1.0), &mut st.x)?;
        for (li, l) in self.layers.iter().enumerate() {
            self.block(l, li, li, st, moe[li].as_mut(), seqs, tokens.len(), &mut show)?;
        }
        for q in seqs.iter_mut() {
            *q.pos += q.rows;
        }
        // The output head's input: the final norm of the rows it needs, or of every row when an MTP head
        // keeps them (then the head reads them from there).
        let head_in = match (keep_hidden, mode) {
            (true, _) => {
                b.rms_norm(&st.x, &self.output_norm, eps, &mut st.hidden)?;
                match mode {
                    Logits::Last => {
                        b.rows(&st.hidden, tokens.len() - 1, 1, &mut st.last)?;
                        &st.last
                    }
                    Logits::All => &st.hidden,
                }
            }
            (false, Logits::Last) => {
                b.rows(&st.x, tokens.len() - 1, 1, &mut st.last)?;
                b.rms_norm(&st.last, &self.output_norm, eps, &mut st.xn)?;
                &st.xn
            }
            (false, Logits::All) => {
                b.rms_norm(&st.x, &self.output_norm, eps, &mut st.xn)?;
                &st.xn
            }
        };
        b.linear(head_in, self.output.as_ref().unwrap_or(&self.embd), None, &mut st.logits)?;
        if let Some(cap) = c.final_logit_softcap {
            b.softcap(&mut st.logits, cap)?;
        }
        Ok(())
    }

    /// One transformer block over `st.x` (`rows` rows of `seqs`): layer `l` (named `blk.{li}` to `show`),
    /// attending over layer `kv_layer` of each sequence's cache. Positions are not advanced.
    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        l: &Layer<B>,
        li: usize,
        kv_layer: usize,
        st: &mut Scratch<B>,
        moe: Option<&mut B::MoeState>,
        seqs: &mut [Seq<'_, B>],
        rows: usize,
        show: &mut ShowInput<'_, B>,
    ) -> Result<()> {
        let c = &self.config;
        let b = &*self.backend;
        let eps = c.norm_eps;
        // Attention block.
        b.rms_norm(&st.x, &l.attn_norm, eps, &mut st.xn)?;
        show(b, &st.xn, li, &["attn_q", "attn_k", "attn_v"])?;
        let bias = |i: usize| l.bias.as_ref().map(|x| &x[i]);
        b.linear_many(
            &st.xn,
            &[(&l.wq, bias(0)), (&l.wk, bias(1)), (&l.wv, bias(2))],
            &mut [&mut st.q, &mut st.k, &mut st.v],
        )?;
        if let Some([qn, kn]) = &l.qk_norm {
            b.rms_norm(&st.q, qn, eps, &mut st.att)?;
            std::mem::swap(&mut st.q, &mut st.att);
            b.rms_norm(&st.k, kn, eps, &mut st.att)?;
            std::mem::swap(&mut st.k, &mut st.att);
        }
        let (rope_q, rope_k) =
            (RopeParams { n_heads: c.n_heads, ..l.rope.clone() }, RopeParams { n_heads: c.n_kv_heads, ..l.rope.clone() });
        if let [q] = seqs {
            b.rope(&mut st.q, *q.pos, &rope_q)?;
            b.rope(&mut st.k, *q.pos, &rope_k)?;
            b.attention(&st.q, &st.k, &st.v, q.kv, kv_layer, *q.pos, &l.attn, &mut st.att)?;
        } else {
            // Each sequence's rows at its own positions over its own cache, written back into the batch.
            b.rows(&st.q, 0, rows, &mut st.att)?;
            let mut row = 0;
            for q in seqs.iter_mut() {
                b.rows(&st.q, row, q.rows, &mut st.seq_q)?;
                b.rows(&st.k, row, q.rows, &mut st.seq_k)?;
                b.rows(&st.v, row, q.rows, &mut st.seq_v)?;
                b.rope(&mut st.seq_q, *q.pos, &rope_q)?;
                b.rope(&mut st.seq_k, *q.pos, &rope_k)?;
                b.attention(&st.seq_q, &st.seq_k, &st.seq_v, q.kv, kv_layer, *q.pos, &l.attn, &mut st.seq_att)?;
                b.set_rows(&mut st.att, row, &st.seq_att)?;
                row += q.rows;
            }
        }
        show(b, &st.att, li, &["attn_output"])?;
        b.linear(&st.att, &l.wo, None, &mut st.proj)?;
        residual(b, &mut st.x, &st.proj, l.post_attn_norm.as_ref(), eps, &mut st.xn)?;
        // Feed-forward block.
        b.rms_norm(&st.x, &l.ffn_norm, eps, &mut st.xn)?;
        match &l.ffn {
            Ffn::Dense(f) => {
                show(b, &st.xn, li, &["ffn_gate", "ffn_up"])?;
                f.run(b, c.activation, &st.xn, [&mut st.gate, &mut st.up, &mut st.hid], &mut st.proj)?;
                show(b, &st.hid, li, &["ffn_down"])?;
            }
            Ffn::Moe { router, gate, up, down, shared, params } => {
                show(b, &st.xn, li, &["ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps"])?;
                b.linear(&st.xn, router, None, &mut st.router)?;
                let experts = ExpertWeights { gate, up, down };
                let moe_state = moe.ok_or(ModelError::ForeignState { layer: li })?;
                b.moe(&st.xn, &st.router, &experts, params, &mut st.proj, moe_state)?;
                if let Some((f, gate_inp)) = shared {
                    show(b, &st.xn, li, &["ffn_gate_shexp", "ffn_up_shexp"])?;
                    f.run(b, c.activation, &st.xn, [&mut st.gate, &mut st.up, &mut st.hid], &mut st.shared)?;
                    show(b, &st.hid, li, &["ffn_down_shexp"])?;
                    if let Some(g) = gate_inp {
                        b.linear(&st.xn, g, None, &mut st.router)?;
                        b.sigmoid_gate(&mut st.shared, &mut st.router)?;
                    }
                    b.add(&mut st.proj, &st.shared)?;
                }
            }
        }
        Ok(residual(b, &mut st.x, &st.proj, l.post_ffn_norm.as_ref(), eps, &mut st.xn)?)
    }

    /// Runs the MTP head over `m.h_in` (hidden states, `[tokens, dim]`) and `tokens` (each the token after
    /// its hidden state's position) from slot `m.pos`; with `logits`, leaves the last row's normalised output
    /// in `m.s.hidden` and its logits in `m.logits`.
    fn mtp_forward(&self, head: &MtpHead<B>, m: &mut MtpState<B>, tokens: &[u32], logits: bool) -> Result<()> {
        let c = &self.config;
        let b = &*self.backend;
        let eps = c.norm_eps;
        let n = tokens.len();
        if m.pos + n > m.max_context {
            return Err(ModelError::ContextOverflow { pos: m.pos, new: n, ctx: m.max_context });
        }
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(ModelError::BadToken { id, vocab: c.vocab_size });
        }
        let s = &mut m.s;
        // x = eh_proj · [enorm(embed(t)); hnorm(h)], as two halves.
        b.embed(head.embd.as_ref().unwrap_or(&self.embd), tokens, c.embedding_scale.unwrap_or(1.0), &mut s.att)?;
        b.rms_norm(&s.att, &head.enorm, eps, &mut s.xn)?;
        b.linear(&s.xn, &head.eh_embd, None, &mut s.x)?;
        b.rms_norm(&m.h_in, &head.hnorm, eps, &mut s.xn)?;
        b.linear(&s.xn, &head.eh_hidden, None, &mut s.proj)?;
        b.add(&mut s.x, &s.proj)?;
        let mut seqs = [Seq { kv: &mut m.kv, pos: &mut m.pos, max_context: m.max_context, rows: n }];
        let mut no_show = |_: &B, _: &B::Tensor, _: usize, _: &[&str]| -> Result<()> { Ok(()) };
        self.block(&head.block, c.n_layers, 0, s, m.moe.as_mut(), &mut seqs, n, &mut no_show)?;
        m.pos += n;
        if logits {
            b.rows(&s.x, n - 1, 1, &mut s.last)?;
            b.rms_norm(&s.last, &head.head_norm, eps, &mut s.hidden)?;
            let out = head.head.as_ref().or(self.output.as_ref()).unwrap_or(&self.embd);
            b.linear(&s.hidden, out, None, &mut s.logits)?;
            if let Some(cap) = c.final_logit_softcap {
                b.softcap(&mut s.logits, cap)?;
            }
            b.download(&s.logits, &mut m.logits)?;
        }
        Ok(())
    }

    /// After a pass of `tokens` from sequence position `a` whose hidden states are rows `row0 ..` of
    /// `hidden`: the head's cache takes every hidden state whose next token is now known (the one pending
    /// from the pass before, when it is `a - 1`'s, and all of this pass's but the last, which becomes pending).
    fn mtp_catch_up(&self, m: &mut MtpState<B>, hidden: &B::Tensor, row0: usize, a: usize, tokens: &[u32]) -> Result<()> {
        let Some(head) = self.mtp.as_ref() else { return Ok(()) };
        let b = &*self.backend;
        let n = tokens.len();
        let cont = a > 0 && m.pending == Some(a - 1);
        let run = if cont {
            m.pos = a - 1 - m.offset;
            // [pending; hidden rows of this pass but the last]: a decode step's is the pending row alone.
            if n == 1 {
                std::mem::swap(&mut m.h_in, &mut m.pending_h);
            } else {
                b.rows(hidden, row0, n, &mut m.h_in)?;
                b.rows(hidden, row0, n - 1, &mut m.h_tmp)?;
                b.set_rows(&mut m.h_in, 1, &m.h_tmp)?;
                b.set_rows(&mut m.h_in, 0, &m.pending_h)?;
            }
            tokens
        } else {
            // Lost track (or the start): the head's cache restarts at this pass.
            m.offset = a;
            m.pos = 0;
            if n > 1 {
                b.rows(hidden, row0, n - 1, &mut m.h_in)?;
            }
            &tokens[1..]
        };
        b.rows(hidden, row0 + n - 1, 1, &mut m.pending_h)?;
        m.pending = None;
        if !run.is_empty() {
            self.mtp_forward(head, m, run, false)?;
        }
        m.pending = Some(a + n - 1);
        Ok(())
    }

    /// Up to `k` greedy drafts from `st`'s MTP head for the tokens after `next` (the token about to run at
    /// `st.pos`), appended to `out`: none while the head has not seen the hidden state before `next` (it was
    /// just enabled, or lost track). Fails on a state without the head ([`Model::enable_mtp`]).
    pub fn mtp_draft(&self, st: &mut State<B>, next: u32, k: usize, out: &mut Vec<u32>) -> Result<()> {
        let head = self.mtp.as_ref().ok_or(ModelError::NoMtpHead)?;
        let m = st.mtp.as_mut().ok_or(ModelError::NoMtpHead)?;
        if st.pos == 0 || m.pending != Some(st.pos - 1) {
            return Ok(());
        }
        let b = &*self.backend;
        self.backend.run(|| {
            m.pos = st.pos - 1 - m.offset;
            b.rows(&m.pending_h, 0, 1, &mut m.h_in)?;
            let mut t = next;
            for _ in 0..k.min(m.max_context.saturating_sub(m.pos)) {
                self.mtp_forward(head, m, &[t], true)?;
                t = crate::argmax(&m.logits);
                out.push(t);
                // Chained: the head's normalised output stands in for the model's next hidden state.
                std::mem::swap(&mut m.h_in, &mut m.s.hidden);
            }
            Ok(())
        })
    }

    /// Per layer (`None` for dense layers): tokens routed to each expert and expert bytes read over the
    /// sequence's forward passes so far. On a GPU this reads the device's counters back: call it for stats,
    /// not per token.
    pub fn moe_usage(&self, st: &State<B>) -> Result<Vec<Option<MoeUsage>>> {
        st.moe.iter().map(|s| s.as_ref().map(|s| self.backend.moe_usage(s)).transpose().map_err(Into::into)).collect()
    }

    /// Copies the last forward pass's logits to the host (an error when the device is lost).
    pub fn read_logits(&self, st: &State<B>, out: &mut Vec<f32>) -> Result<()> {
        Ok(self.backend.download(&st.s.logits, out)?)
    }
}
