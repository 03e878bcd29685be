//! `comet-bench`: the comet-rs benchmark binary. See the crate documentation.

use clap::{Parser, Subcommand};
use comet_bench::{probe, report};
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
    /// Gather rank reports: print the table, write <date>-<gpu>x<n>.json and .svg.
    Report {
        /// Directory for the results JSON and SVG.
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
        /// Only print the table; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Rank report files (schema comet-bench/rank/1), baselines included.
        #[arg(required = true)]
        reports: Vec<PathBuf>,
    },
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
        Cmd::Report {
            out,
            dry_run,
            reports,
        } => {
            let mut ranks = Vec::new();
            for p in reports {
                let r = report::read_rank(&p)?;
                ranks.push((p, r));
            }
            let results = report::gather(ranks, &report::today())?;
            println!("{}", report::table(&results));
            if !dry_run {
                let (json, svg) = report::write(&results, &out)?;
                println!("wrote {} and {}", json.display(), svg.display());
            }
        }
    }
    Ok(())
}
