//! # comet-layer
//!
//! The expert-parallel MoE layer users embed in a trainer. **Nothing is implemented yet:
//! this crate currently has no public items.** What it will own (DESIGN.md):
//!
//! - **`MoeLayer`**, built from a `comet_core::MoeConfig`, a `comet_core::ParallelConfig` and
//!   a communicator from comet-comm; it owns the router weight and this rank's experts'
//!   weights (loadable from host arrays). `forward(x)` returns `y` and keeps what backward
//!   needs; `backward(dy)` returns `dx` and accumulates the expert and router gradients.
//!   Called once per rank, from one process per GPU (torchrun-style) or one process driving
//!   several GPUs. Bad input (shape, dtype, rank mismatch) is an error, never a panic.
//! - **Strategies**, chosen at construction, behind the same API and tests:
//!   - `Sequential`: device routing plan, NCCL all-to-all-v, permute, grouped GEMM,
//!     activation, grouped GEMM, all-to-all-v back, combine (the Megatron-style baseline);
//!   - `Pipelined { chunks }`: chunk `i`'s all-to-all overlaps chunk `i − 1`'s expert GEMMs
//!     on a second stream (the Tutel/FasterMoE-style coarse-grained baseline);
//!   - `Comet`: one persistent kernel per layer with thread blocks specialised into GEMM and
//!     communication blocks, tiles rescheduled by comet-sched, flags and counters in
//!     symmetric memory with epochs, no host synchronisation inside the layer.
//! - **Backward** as the mirror image: layer 1's backward overlaps like layer 0 and layer 0's
//!   like layer 1; the router gradient goes through the softmax and top-k.
//!
//! Every path is tested against `comet_core::reference` on fresh random inputs with outputs
//! poisoned before the run (bf16 relative L2 error ≤ 1e-2, no NaN); GPU tests are
//! `#[ignore = "needs a CUDA GPU"]` and run on a GPU host through `cargo xtask gpu-bundle`.
