//! `comet-bench`: the comet-rs benchmark binary. See the crate documentation.

use clap::{Parser, Subcommand};
use comet_bench::{cpu, probe, report};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "comet-bench", version, about = "comet-rs MoE layer benchmark")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Report whether a CUDA driver and devices are present.
    Devices {
        /// Print JSON (what `cargo xtask bench` reads) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run the CPU reference MoE forward on a preset with seeded random inputs.
    CpuReference(CpuArgs),
    /// Gather rank reports: print the table, write <date>-<gpu>x<n>.json and .svg.
    Report {
        /// Directory for the results JSON and SVG.
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
        /// Only print the table; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Rank reports (schema comet-bench/rank/1) and PyTorch records (bench/INTEROP.md §8).
        #[arg(required = true)]
        reports: Vec<PathBuf>,
    },
}

#[derive(clap::Args, Debug)]
struct CpuArgs {
    /// Model preset: mixtral, qwen2-moe, phi3.5-moe, deepseek-v3 (or their full names).
    #[arg(long, default_value = "mixtral")]
    preset: String,
    /// Tokens.
    #[arg(long, default_value_t = 256)]
    tokens: usize,
    /// Divide the preset's hidden and ffn sizes by this factor (experts and top-k stay).
    #[arg(long, default_value_t = 1)]
    shrink: usize,
    /// Also run the expert-parallel reference over this many simulated ranks and compare.
    #[arg(long)]
    world: Option<usize>,
    /// Seed of the random weights and tokens.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the summary as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("comet-bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> comet_bench::Result<()> {
    match cli.cmd {
        Cmd::Devices { json } => {
            let r = probe::probe();
            if json {
                let text =
                    serde_json::to_string(&r).map_err(|source| comet_bench::Error::Json {
                        path: "<stdout>".into(),
                        source,
                    })?;
                println!("{text}");
            } else {
                println!("{}", probe::describe(&r));
            }
        }
        Cmd::CpuReference(a) => {
            let run = cpu::run(&cpu::CpuRequest {
                preset: a.preset,
                tokens: a.tokens,
                shrink: a.shrink,
                world: a.world,
                seed: a.seed,
            })?;
            println!("{}", run.describe());
            if let Some(path) = a.json {
                let text = serde_json::to_string_pretty(&run).map_err(|source| {
                    comet_bench::Error::Json {
                        path: path.clone(),
                        source,
                    }
                })?;
                std::fs::write(&path, text + "\n")
                    .map_err(|source| comet_bench::Error::Io { path, source })?;
            }
        }
        Cmd::Report {
            out,
            dry_run,
            reports,
        } => {
            let mut inputs = Vec::new();
            for p in reports {
                let i = report::read_input(&p)?;
                inputs.push((p, i));
            }
            let results = report::gather_inputs(inputs, &report::today())?;
            println!("{}", report::table(&results));
            if !dry_run {
                let (json, svg) = report::write(&results, &out)?;
                println!("wrote {} and {}", json.display(), svg.display());
            }
        }
    }
    Ok(())
}
