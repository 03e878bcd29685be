//! `cargo xtask`: automation for comet-rs (orchestration only, no GPU code).
//!
//! - `cargo xtask ci`: the CI sequence (`cargo fmt --all -- --check`, clippy with
//!   `-D warnings`, `cargo test --workspace`), the same one `.ci/run` runs.
//! - `cargo xtask bench`: builds `comet-bench`, finds the CUDA devices and launches one
//!   process per GPU with the torchrun environment, gathers the ranks' JSON into one table,
//!   a results JSON and an SVG chart. With no CUDA device (or no GPU path yet) it says so
//!   and runs the CPU reference on a small preset.
//! - `cargo xtask gpu-bundle`: release test executables, `comet-bench`, benchmark examples
//!   and this launcher, stripped, in `.gpu/` with a `run.sh` for a GPU host.

mod bench;
mod bundle;
mod ci;
mod launch;
mod util;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "cargo xtask",
    about = "comet-rs automation: ci | bench | gpu-bundle"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the CI sequence: fmt check, clippy -D warnings, cargo test --workspace.
    Ci(ci::CiArgs),
    /// Build and run the MoE layer benchmark on the local GPUs (CPU reference without one).
    Bench(bench::BenchArgs),
    /// Bundle release test executables and benchmarks with a run.sh for a GPU host.
    GpuBundle(bundle::BundleArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Ci(args) => ci::run(&args),
        Cmd::Bench(args) => bench::run(&args),
        Cmd::GpuBundle(args) => bundle::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
