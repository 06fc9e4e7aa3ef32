//! Default implementations of the composite ops of [`Backend`], built from its primitives. Backends call
//! them through the trait's default methods; the harness calls them directly to check a backend's override
//! against them.

use crate::{ensure_shape, Activation, Backend, Result, Unary};

/// One [`Backend::linear`] per weight.
pub fn linear_many<B: Backend + ?Sized>(
    b: &B,
    x: &B::Tensor,
    ws: &[(&B::Weight, Option<&B::Weight>)],
    outs: &mut [&mut B::Tensor],
) -> Result<()> {
    ensure_shape!(ws.len() == outs.len(), "linear_many", "{} weights for {} outputs", ws.len(), outs.len());
    for ((w, bias), o) in ws.iter().zip(outs.iter_mut()) {
        b.linear(x, w, *bias, o)?;
    }
    Ok(())
}

/// `out = act(gate) * up`: a copy, the activation, a product.
pub fn glu<B: Backend + ?Sized>(
    b: &B,
    gate: &B::Tensor,
    up: &B::Tensor,
    act: Activation,
    out: &mut B::Tensor,
) -> Result<()> {
    let (t, _) = b.shape(gate);
    b.rows(gate, 0, t, out)?;
    b.map(out, Unary::Act(act))?;
    b.mul(out, up)
}

/// `x = cap * tanh(x / cap)`.
pub fn softcap<B: Backend + ?Sized>(b: &B, x: &mut B::Tensor, cap: f32) -> Result<()> {
    b.map(x, Unary::Scale(1.0 / cap))?;
    b.map(x, Unary::Tanh)?;
    b.map(x, Unary::Scale(cap))
}

/// `x[t, :] *= sigmoid(g[t, 0])`.
pub fn sigmoid_gate<B: Backend + ?Sized>(b: &B, x: &mut B::Tensor, g: &mut B::Tensor) -> Result<()> {
    b.map(g, Unary::Sigmoid)?;
    b.mul(x, g)
}
