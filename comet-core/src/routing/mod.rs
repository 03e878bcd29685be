//! Routing: router logits, softmax top-k, and the [`RoutingPlan`] that says where every
//! (token, slot) goes.
//!
//! **These functions are the definitions the GPU kernels must reproduce bit for bit.** The
//! integer results — top-k ids and their slot order, per-expert counts, segment offsets, the
//! scatter index and the combine mapping — are exact functions of their inputs and every GPU
//! path must produce identical values. The floating-point results are defined as the exact
//! sequence of IEEE operations documented on each function; a GPU reproduces them exactly
//! where it performs the same operations, except that `exp` may differ from the host libm
//! in the last place (CUDA's `expf` is not correctly rounded), so GPU tests compare
//! probabilities and weights with a tolerance and ids exactly on inputs without near-ties.

mod plan;
mod topk;

pub use plan::RoutingPlan;
pub(crate) use plan::check_ids;
pub use topk::{TopK, router_logits, softmax_row, top_k};
