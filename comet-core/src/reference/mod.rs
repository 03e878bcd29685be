//! The CPU reference MoE layer: forward, backward, and an expert-parallel simulation.
//!
//! Generic over [`Real`] (`f32` to compare against the GPU, `f64` for finite-difference
//! gradient checks). Tensors are stored in `T`; every dot product and sum accumulates in f64
//! and is rounded once to `T`.
//!
//! **Routing precision.** The router runs in `T`: logits are the f64 dot product rounded to
//! `T`, and softmax/top-k use `T` arithmetic ([`crate::routing::top_k`]). With `T = f32`
//! this is exactly the GPU's definition. With `T = f64` the whole layer, routing included,
//! is f64 — needed for the gradient checks — so on inputs with near-ties an f64 reference
//! may pick different experts than an f32 one. For GPU comparisons on such inputs use
//! [`forward_routed`] with the GPU's routing.

mod backward;
mod ep;
mod ffn;
mod forward;
mod weights;

#[cfg(test)]
mod tests;

pub use crate::real::Real;
pub use backward::{Grads, backward};
pub use ep::{
    EpForward, EpGrads, RankForward, RankGrads, combine, dispatch, ep_backward, ep_forward,
    exchange, send_buffers,
};
pub use ffn::{activate, activate_backward, expert_forward, gelu, gelu_grad, silu, silu_grad};
pub use forward::{Forward, forward, forward_routed};
pub use weights::MoeWeights;
