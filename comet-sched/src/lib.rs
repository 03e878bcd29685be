//! # comet-sched
//!
//! The scheduling half of comet-rs's fine-grained overlap (COMET), free of CUDA so it is
//! tested exhaustively on the CPU and reused by any executor. Everything below works and
//! is tested in CI; the fused GPU kernels that consume it are not written yet.
//!
//! - **Shared-tensor dependency analysis and tile schedules** — plain data, pure functions
//!   of the routing counts ([`Counts`]), the rank and the tile shape, so a device kernel can
//!   compute them without a host synchronisation (each module documents its algorithm step
//!   by step):
//!   - [`layer0`] (dispatch → GEMM0, cut along rows): flags per `(source, expert)` segment
//!     or per chunk of `C` rows with their source rows, the copy (arrival) order, every
//!     m-tile's needed flags, and the tile order — all-local tiles first, then by the last
//!     source in arrival order (`d+1, d+2, …`), fewest sources first, n-tiles together or
//!     interleaved.
//!   - [`layer1`] (GEMM1 → top-k reduce → combine, cut along columns): column groups
//!     (default `⌈N/8⌉` rounded to `BN`), column-group-major tile order, per-group
//!     completion-counter targets, and the reduce/send work ([`layer1::ReducePlan`]) into
//!     the token owner's combine buffer ([`layer1::CombineLayout`]), summed there in a fixed
//!     rank order.
//!   - [`tile`]: tile geometry and the Hopper engine's canonical tile ids
//!     ([`tile::CanonicalTiles`], transcribed from `comet-kernels/cuda/sm90/scheduler.cuh`
//!     and pinned by tests), so a schedule becomes the engine's `order` input.
//! - **Budget and simulator**: a [`model::CostModel`] (H200 rates measured in this project),
//!   a discrete-event simulator of one fused layer with `n_comm` communication blocks
//!   ([`sim`]), [`budget::choose_n_comm`] by simulation, and a JSON
//!   [`tuning::TuningTable`] keyed by (GPU, world, shape, token bucket, dtype) that falls
//!   back to the model.
//! - **Host executor** ([`exec`]): `W` simulated ranks in threads run a schedule the way the
//!   fused kernels will (copy and GEMM threads meeting only through release/acquire flags
//!   and counters) on NaN-poisoned buffers; its output equals `comet_core::reference`, and a
//!   schedule with a dropped flag or an early group release is caught deterministically.
//!
//! Every schedule has a `check()` that verifies its invariants: every receive row covered by
//! exactly one m-tile and every tile present once, local-first / arrival order, every tile's
//! flags exactly the chunks overlapping its rows, column groups complete in order with the
//! right counter targets.
//!
//! ```
//! use comet_core::RoutingPlan;
//! use comet_sched::layer0::{Chunking, Layer0Options, Layer0Schedule};
//! use comet_sched::layer1::{Layer1Options, Layer1Schedule};
//! use comet_sched::tile::{NOrder, TileShape};
//! use ndarray::array;
//!
//! # fn main() -> comet_sched::Result<()> {
//! // Two ranks, one expert each, top-1: rank 0 gets 3 of its own rows and 2 of rank 1's.
//! let ids = [array![[0u32], [0], [1], [0]], array![[0u32], [1], [0]]];
//! let views: Vec<_> = ids.iter().map(|a| a.view()).collect();
//! let plan = RoutingPlan::new(&views, 2, 2)?;
//! let opts = Layer0Options {
//!     tile: TileShape::new(2, 4, 8)?, // BM 2, BN 4, N (= ffn) 8
//!     chunking: Chunking::Segment,
//!     n_order: NOrder::Together,
//! };
//! let s = Layer0Schedule::from_plan(&plan, 0, opts)?;
//! s.check()?;
//! // Local rows [0, 2) first, then the remote-only tile, then the mixed one.
//! let m: Vec<_> = s.tiles.iter().map(|t| t.m_tile).collect();
//! assert_eq!(m, [0, 0, 2, 2, 1, 1]);
//! assert_eq!(s.tiles[4].flags, [0, 1]);
//! // The engine's order input (raster band 16), padded with -1.
//! assert_eq!(s.engine_order(16, 8)?.len(), 8);
//!
//! let l1 = Layer1Schedule::from_plan(&plan, 0, Layer1Options::new(TileShape::new(2, 4, 16)?))?;
//! l1.check()?;
//! assert_eq!(l1.groups.len(), 4); // 16 columns, groups of ⌈16/8⌉ → 4 (rounded to BN)
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod budget;
pub mod counts;
mod error;
pub mod exec;
pub mod layer0;
pub mod layer1;
pub mod model;
pub mod sim;
pub mod tile;
pub mod tuning;

#[cfg(test)]
pub(crate) mod testutil;

pub use counts::Counts;
pub use error::{Error, Result};
