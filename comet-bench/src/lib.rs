//! # comet-bench
//!
//! The benchmark side of comet-rs: the `comet-bench` binary, its model-preset handling,
//! and the reports (table, JSON, SVG chart) that `cargo xtask bench` prints and commits
//! under `bench/results/`.
//!
//! - [`probe`]: whether a CUDA driver and devices are present, without panicking when
//!   `libcuda` is missing (`comet-bench devices`).
//! - [`cpu`]: the CPU reference MoE layer of `comet_core::reference` on a preset (optionally
//!   shrunk) with seeded random inputs, timed, with a norm and checksum of `y`, optionally
//!   checked against the expert-parallel reference (`comet-bench cpu-reference`).
//! - [`run`]: the GPU benchmark of comet-layer's strategies, one rank per GPU in either
//!   process model, with the dense GEMM rate of [`dense`] for the compute floor
//!   (`comet-bench run`, what `cargo xtask bench` launches).
//! - [`check`]: bench/INTEROP.md's `.npy` interop with PyTorch (`comet-bench check`).
//! - [`report`]: the rank-report schema, and gathering rank reports into one table, results
//!   JSON and SVG chart (`comet-bench report`).

#![warn(missing_docs)]

pub mod check;
pub mod cpu;
pub mod dense;
mod error;
pub mod probe;
pub mod report;
pub mod run;

pub use error::{Error, Result};
