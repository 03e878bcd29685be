//! The Hopper (sm_90a) tile engine of the grouped GEMM.
//!
//! Device code: `cuda/sm90/*.cuh` (compiles with nvcc and NVRTC). A producer warp issues TMA
//! loads (128-byte swizzle, zero fill past the tensors) into a multi-stage shared-memory ring
//! completed on mbarriers; two consumer warpgroups issue `wgmma` (m64n256k16 / m64n128k16,
//! bf16/f16 → f32) with 232 registers each after `setmaxnreg`; the epilogue applies
//! SwiGLU/GeLU and a row scale and writes bf16/f16 with masked 16-byte stores, so rows past an
//! expert's end are never written. Opt-in store variants ([`Sm90Store`]): f32 output (masked
//! 8-byte stores straight from the accumulators), `C += result` in f32 (gradient
//! accumulation; a tile with an empty reduction leaves C as it was), and the pre-activation
//! of a fused SwiGLU/GeLU stored beside the output. The grid can be capped
//! ([`Sm90Gemm::max_ctas`], [`Sm90Gemm::within_ctas`]) to leave SMs to other streams. A persistent tile scheduler walks (expert, m-tile, n-tile)
//! from the device-resident expert offsets (no host synchronisation), in a raster order that
//! keeps weight and activation tiles in L2, or in an order supplied as data; its producer
//! can wait on a per-tile condition before loading (the fused kernels' hook). With 2-CTA
//! clusters, pairs of m-tiles that share a weight tile load half of it each and multicast it.
//! Tiles have 128 rows, or 256 ([`Sm90Config::bm`], cooperative 256x128 only: each consumer
//! warpgroup then owns two m64 blocks, and an expert of up to 256 rows reads each weight
//! tile once); [`Sm90Config::choose`] keeps 128-row tiles.
//!
//! Forward and dgrad GEMMs can run swap-AB ([`Sm90Config::swap`], [`Sm90Config::SWAP_256H`]):
//! the weights are `wgmma`'s A (128 weight rows per tile) and the tokens its B, split per
//! expert into chunks of at most 256 rows ([`swap_chunk_rows`]), each tile issuing `wgmma`
//! with N = its chunk rounded up to 16. An expert then pads to 16 rows instead of 128; the
//! epilogue transposes through shared memory. [`Sm90Config::choose`] picks it at
//! [`SWAP_MIN_ROWS`] to [`SWAP_MAX_ROWS`] rows per expert over at most [`SWAP_MAX_GROUPS`]
//! experts. With [`Sm90Config::swap_n`] = 272 ([`Sm90Config::SWAP_272H`]) a chunk holds up
//! to 272 rows (a second `wgmma` of N = 16 covers rows 256..271), so an expert of up to 272
//! rows reads each weight tile once; `choose` picks it above [`SWAP_MAX_ROWS`] and up to
//! [`SWAP_WIDE_MAX_ROWS`] rows per expert (DeepSeek-V3 at 8192 tokens: +7–18%), and for
//! dgrad up to [`SWAP_WIDE_DGRAD_MAX_ROWS`].
//! Its canonical tile ids are (expert, chunk, weight tile),
//! not those of `comet-sched`'s orders.
//!
//! Weight gradients can run the TMA-store epilogue ([`Sm90Config::tma_store`],
//! [`Sm90Config::WGRAD_TS`]; cooperative or ping-pong). Each consumer warpgroup stages its
//! rows in shared memory and the TMA unit stores them, or for an f32 accumulate adds them in
//! L2, through a map over C that clips each expert's rows. The warpgroup then starts its next
//! tile while the store drains.
//! [`Sm90Config::choose_for`] picks it for weight gradients, except for an accumulating one at
//! ≤ 384 rows per expert, which runs faster from registers.
//!
//! Layouts are those of [`crate::gemm`]: forward `A[rows, K] · W_g[N, K]ᵀ`, dgrad
//! `A[rows, N] · W_g[N, K]` (N-major B through wgmma's transpose bit) and wgrad
//! `Σ_r A[r, N]ᵀ B[r, K]` per expert (K-grouped: an expert's last k-block issues only the
//! k16 steps that hold its rows, and the rows from its end to the next multiple of 16 are
//! zeroed in shared memory). Use [`grouped_gemm`] on compute capability 9.0; [`supports`] says whether a
//! problem fits this engine (else the portable `mma.sync` engine of [`crate::gemm`] runs it).

mod config;
mod launch;
mod tma;

pub use config::{
    BK, BM, SWAP_BOX_ROWS, SWAP_MAX_GROUPS, SWAP_MAX_ROWS, SWAP_MIN_ROWS, SWAP_TAIL_BOX_ROWS,
    SWAP_WIDE_DGRAD_MAX_ROWS, SWAP_WIDE_MAX_ROWS, Schedule, Sm90Config, Sm90Store, THREADS,
    swap_chunk_rows, swap_chunks,
};
pub use launch::{
    DeviceErrorCode, GROUPED_GEMM_SM90_CU, KERNEL_NAME, SM90_HEADERS, Sm90Desc, Sm90Gemm, Sm90Plan,
    grouped_gemm, headers, plan, program, supports,
};
pub use tma::{TileMap, TmaDescriptor};

#[cfg(test)]
mod tests;
