//! # comet-layer
//!
//! The expert-parallel MoE layer users embed in a trainer: [`MoeLayer`], forward and
//! backward of one rank, called once per rank from one process per GPU (torchrun-style,
//! [`comet_comm::Communicator::from_env`]) or from one process driving several GPUs
//! ([`comet_comm::run_local`]) — the same API either way.
//!
//! A layer is built from a [`comet_core::MoeConfig`], a [`comet_core::ParallelConfig`]
//! (pure expert parallelism: `ep = world`, `tp = 1`), this rank's communicator,
//! [`LayerOptions`] (strategy, `max_tokens` capacity, training, GEMM engine) and initial
//! [`Weights`] (host f32 arrays of this rank's experts, or a seeded device fill). It owns the
//! router weight, its `L = E / W` experts, their f32 gradients and every buffer a call needs,
//! allocated once for the worst case (no allocation per call).
//!
//! ```no_run
//! use comet_comm::{LocalOptions, run_local};
//! use comet_core::{ParallelConfig, Preset};
//! use comet_kernels::{DeviceTensor, buffer::DType};
//! use comet_layer::{LayerOptions, MoeLayer, Strategy, Weights};
//!
//! let out = run_local(2, &LocalOptions::default(), |comm| {
//!     let cfg = Preset::Mixtral8x7B.config().with_renormalize(true);
//!     let par = ParallelConfig::expert_parallel(2).expect("2 ranks");
//!     let opts = LayerOptions::new(Strategy::Pipelined { chunks: 4 }, 4096);
//!     let mut layer = MoeLayer::new(comm, cfg, par, opts, Weights::Random { seed: 1 })
//!         .map_err(|e| comet_comm::Error::RankFailed { rank: 0, message: e.to_string() })?;
//!     let gpu = layer.gpu().clone();
//!     let x = DeviceTensor::zeros(&gpu, DType::BF16, &[4096, 4096]).expect("x");
//!     let y = layer.forward(&x).expect("forward");
//!     let dx = layer.backward(&y).expect("backward");
//!     let (dwr, dw0, dw1) = layer.grads_to_host().expect("grads");
//!     Ok((dx.shape().to_vec(), dwr.len() + dw0.len() + dw1.len()))
//! });
//! ```
//!
//! ## One call
//! 1. **Routing** (compute stream): router logits (GEMM, f32), softmax + top-k (+
//!    renormalisation), per-chunk expert counts into a small header that all ranks
//!    all-gather — the one host synchronisation of a forward, as in Megatron: the NCCL
//!    baselines need the counts on the host for their split sizes. A rank whose input is
//!    invalid reports it in its header, so every rank fails the call together. Then the
//!    device routing plan of each chunk (comet-core's receive and send layouts).
//! 2. **Dispatch**: rows permuted into the send layout, NCCL all-to-all-v of the rows and of
//!    their receive-row indices, permute into the receive layout (each expert's rows
//!    contiguous, ARCHITECTURE.md).
//! 3. **Experts**: grouped GEMM0 with the activation, grouped GEMM1, on the Hopper engine
//!    where it applies, else `mma.sync` ([`GemmEngine`]).
//! 4. **Combine**: rows gathered back, reverse all-to-all-v, weighted sum in slot order.
//!
//! Backward is the mirror image: `⟨dy, o⟩` for the routing-weight gradient and the
//! weighted `dy` rows dispatched, expert backward (dgrad through `w1`, `dW1`, activation
//! backward, `dW0`, dgrad through `w0`), the `dx` rows combined back, then the router
//! backward (`dlogits`, `dx += dlogits · wr`, `dWr += dlogitsᵀ · x`). Wherever the Hopper
//! engine runs the other expert GEMMs, the expert weight gradients run on its f32
//! accumulate store and a training forward's GEMM0 on its fused pre-activation store
//! ([`LayerOptions::sm90_training_stores`], on by default: faster than `mma.sync` on every
//! preset on H200); `COMET_SM90_STORES=0` or `.sm90_training_stores(false)` keeps the weight
//! gradients on `mma.sync` (f32 accumulate).
//!
//! Gradients accumulate over backward calls until [`MoeLayer::zero_grad`], which is lazy
//! (O(1), no memset): the next backward's first write of each gradient overwrites it (no
//! read of the old values: on DeepSeek-V3 that saves a ~30 GB memset and a ~30 GB read per
//! rank and step) and its later writes add to it; readers zero a gradient no backward has
//! written since.
//!
//! [`Strategy::Sequential`] runs all of it on one stream; [`Strategy::Pipelined`] splits the
//! tokens into chunks and overlaps chunk `i`'s experts (compute stream) with chunk `i + 1`'s
//! dispatch and chunk `i − 1`'s combine (communication stream), with events between them.
//! `tracing` spans: `moe_forward` / `moe_backward` per call, `routing`, `dispatch`,
//! `experts`, `combine`, `bwd_dispatch`, `bwd_experts`, `bwd_combine`, `bwd_router` per
//! phase. [`MoeLayer::set_phase_timing`] records CUDA events per phase.
//!
//! Tests: CPU unit tests of the exchange planning (against comet-core's routing plan, with
//! the whole index pipeline simulated on the host) and of the options; GPU tests
//! (`tests/gpu.rs`, `#[ignore]`d) against comet-core's EP reference in both process models.

#![warn(missing_docs)]

mod backward;
mod buffers;
pub mod error;
mod forward;
mod gemm;
mod grads;
mod layer;
pub mod options;
pub mod plan;
mod timing;

pub use error::{Error, Result};
pub use layer::{MoeLayer, Weights};
pub use options::{DEFAULT_CHUNKS, GemmEngine, LayerOptions, SUGGESTED_GEMM_SM_RESERVE, Strategy};
