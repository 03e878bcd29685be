//! # comet-bench
//!
//! The benchmark side of comet-rs: the `comet-bench` binary, its model-preset handling,
//! and the reports (table, JSON, SVG chart) that `cargo xtask bench` prints and commits
//! under `bench/results/`.
//!
//! What works now (no GPU needed):
//! - [`probe`]: whether a CUDA driver and devices are present, without panicking when
//!   `libcuda` is missing (`comet-bench devices`).
//! - [`cpu`]: the CPU reference MoE layer of `comet_core::reference` on a preset (optionally
//!   shrunk) with seeded random inputs, timed, with a norm and checksum of `y`, optionally
//!   checked against the expert-parallel reference (`comet-bench cpu-reference`).
//! - [`report`]: the rank-report schema the GPU benchmark will write, and gathering rank
//!   reports into one table, results JSON and SVG chart (`comet-bench report`).
//!
//! Not yet: the GPU benchmark itself (`comet-bench run`, one process per GPU, the
//! Sequential / Pipelined / Comet strategies of `comet-layer`) and `comet-bench check`
//! (`.npy` interop with PyTorch). [`probe::GPU_BENCH`] says whether this build has the GPU
//! path; until it does, `cargo xtask bench` runs the CPU reference and says so.

//!
//! # Contract for the GPU `run` subcommand (for whoever adds it)
//!
//! `cargo xtask bench` starts one process per GPU as
//! `comet-bench run [--presets a,b] [--tokens n,m] [--strategies s,t] [--iters N] [--backward]
//! --json PATH`, passing only the options the user gave, with the torchrun variables
//! (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`) and
//! multicast off. Each rank uses GPU `LOCAL_RANK`, writes a [`report::RankReport`] to `PATH`
//! and exits 0; rank 0 may print `COMET_PROGRESS <done> <total> <label>` lines for the
//! progress bar. xtask then runs `comet-bench report --out DIR <rank files> <extras>`. Set
//! [`probe::GPU_BENCH`] to `true` when `run` exists, so xtask stops falling back to the CPU.

#![warn(missing_docs)]

pub mod cpu;
mod error;
pub mod probe;
pub mod report;

pub use error::{Error, Result};
