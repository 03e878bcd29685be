//! # comet-sched
//!
//! The scheduling half of comet-rs's fine-grained overlap, kept free of CUDA so it can be
//! tested exhaustively on the CPU and reused by any executor. **Nothing is implemented yet:
//! this crate currently has no public items.** What it will own (DESIGN.md):
//!
//! - **Shared-tensor dependency analysis.** The buffer between a communication op and a
//!   GEMM is cut along the dimension its consumer keeps independent: layer 0 (dispatch →
//!   GEMM0) along rows, whose receive layout is the routing plan's (local expert, then source
//!   rank in rotated order starting at the receiving rank, `comet_core::routing`); layer 1
//!   (GEMM1 → top-k reduce → combine) along hidden columns. For every GEMM tile: which
//!   (source rank, expert) segments, hence which flags, it needs.
//! - **Tile schedules.** Layer 0: tiles whose rows are all local first, then tiles in the
//!   order their source ranks' data arrives. Layer 1: column-group-major, so all experts
//!   finish column group `s` before `s + 1` and the reduce/combine of `s` overlaps the
//!   GEMM of `s + 1`. Schedules are plain data (tile order, flag sets, counters) that the
//!   fused kernels in comet-kernels/comet-layer consume.
//! - **Communication-block budget and tuner.** How many of the persistent kernel's thread
//!   blocks move data (`n_comm`, 0 meaning the copy engine), per (GPU, world, shape, token
//!   bucket, dtype); measured by a tuner, persisted as a JSON table, seeded by a cost model.
//! - **Host executor and simulator.** A host executor that runs a schedule with W simulated
//!   ranks in threads, rows that have not arrived poisoned with NaN, so a missing dependency
//!   shows as a wrong result; and a simulator of a schedule's timeline under the cost model.
//!
//! Invariants its tests will check: every receive row covered exactly once, local-first
//! order, every tile's flags cover its rows, column groups complete in order.
