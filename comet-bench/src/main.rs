//! `comet-bench`: the comet-rs benchmark binary. See the crate documentation.

use clap::{Parser, Subcommand};
use comet_bench::{check, cpu, probe, report, run};
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
    /// The MoE layer benchmark on GPUs (one rank per GPU; torchrun environment or --local-gpus).
    Run(Box<RunArgs>),
    /// Run an interop input directory (bench/INTEROP.md) forward + backward on the GPUs.
    Check(CheckArgs),
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
struct RunArgs {
    /// Presets, comma separated (mixtral, qwen2-moe, phi3.5-moe, deepseek-v3, or custom).
    #[arg(
        long,
        alias = "preset",
        value_delimiter = ',',
        default_value = "mixtral-8x7b,qwen2-moe-2.7b,phi-3.5-moe,deepseek-v3"
    )]
    presets: Vec<String>,
    /// Hidden size (custom shape, or an override of the presets').
    #[arg(long)]
    hidden: Option<usize>,
    /// FFN size (custom shape, or an override).
    #[arg(long)]
    ffn: Option<usize>,
    /// Experts (custom shape, or an override).
    #[arg(long)]
    experts: Option<usize>,
    /// Experts per token (custom shape, or an override).
    #[arg(long)]
    top_k: Option<usize>,
    /// Activation override: swiglu or gelu.
    #[arg(long)]
    activation: Option<String>,
    /// Top-k renormalisation override (true or false).
    #[arg(long)]
    renormalize: Option<bool>,
    /// Tokens per rank, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "8192")]
    tokens: Vec<usize>,
    /// Strategies, comma separated: sequential, pipelined (4 chunks), pipelined:N.
    #[arg(
        long,
        alias = "strategy",
        value_delimiter = ',',
        default_value = "sequential,pipelined:4"
    )]
    strategies: Vec<String>,
    /// Timed iterations (the median is reported; use 20 or more).
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Untimed iterations first.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Distinct input tensors the iterations rotate over.
    #[arg(long, default_value_t = 4)]
    pool: usize,
    /// Also time forward + backward (a second case per strategy): each timed step is
    /// zero_grad (O(1), lazy: the backward overwrites the gradients) + forward + backward.
    #[arg(long)]
    backward: bool,
    /// Skip the phase-timed pass.
    #[arg(long)]
    no_phases: bool,
    /// GEMM engine: auto (Hopper engine where it applies), mma or sm90.
    #[arg(long, default_value = "auto")]
    engine: String,
    /// SMs the pipelined strategies' expert GEMMs leave free for the communication stream,
    /// comma separated to sweep (one case each, labelled pipelined+rN); 0 = every SM.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    gemm_sm_reserve: Vec<usize>,
    /// The Hopper engine's training stores (LayerOptions::sm90_training_stores: expert weight
    /// gradients on its f32 accumulate store) in the forward + backward cases: on (the
    /// default, as the layer; a bare flag = on) or off (weight gradients on mma.sync; needs
    /// --backward), comma separated to time both, e.g. off,on, one case each. Off cases are
    /// labelled +mma-wgrad (e.g. sequential+mma-wgrad, pipelined+r16+mma-wgrad); on cases
    /// have no suffix.
    #[arg(
        long,
        value_delimiter = ',',
        num_args = 0..=1,
        default_value = "on",
        default_missing_value = "on"
    )]
    sm90_stores: Vec<String>,
    /// Size n of the dense n³ bf16 GEMM measured for the compute floor.
    #[arg(long, default_value_t = 8192)]
    dense_n: usize,
    /// Seed of weights and inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Run N ranks as threads of this process (else: the torchrun environment, or 1 GPU).
    #[arg(long)]
    local_gpus: Option<usize>,
    /// Write the rank report here (with --local-gpus N > 1: <stem>.rank<R>.json each).
    #[arg(long)]
    json: Option<PathBuf>,
    /// With --local-gpus: also gather the reports into bench results (JSON + SVG) here.
    #[arg(long)]
    report_out: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct CheckArgs {
    /// Input directory (config.json, x, wr, w0, w1, dy .npy).
    #[arg(long)]
    inputs: PathBuf,
    /// Output directory (topk_ids, y, dx, dwr, dw0, dw1, topk_weights .npy, meta.json).
    #[arg(long)]
    out: PathBuf,
    /// Strategy of the layer.
    #[arg(long, default_value = "sequential")]
    strategy: String,
    /// GEMM engine: auto, mma or sm90.
    #[arg(long, default_value = "auto")]
    engine: String,
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
        Cmd::Run(a) => {
            let req = run::RunRequest {
                presets: a.presets,
                hidden: a.hidden,
                ffn: a.ffn,
                experts: a.experts,
                top_k: a.top_k,
                activation: a.activation,
                renormalize: a.renormalize,
                tokens: a.tokens,
                strategies: a.strategies,
                iters: a.iters,
                warmup: a.warmup,
                pool: a.pool,
                backward: a.backward,
                phases: !a.no_phases,
                engine: a.engine,
                gemm_sm_reserve: a.gemm_sm_reserve,
                sm90_stores: a.sm90_stores,
                dense_n: a.dense_n,
                seed: a.seed,
                local_gpus: a.local_gpus,
                json: a.json,
            };
            let reports = run::run(&req)?;
            if reports.len() > 1 || a.report_out.is_some() {
                let inputs = reports
                    .into_iter()
                    .map(|r| (PathBuf::from(format!("rank{}", r.rank)), r))
                    .collect();
                let results = report::gather(inputs, &report::today())?;
                println!("{}", report::table(&results));
                if let Some(out) = a.report_out {
                    let (json, svg) = report::write(&results, &out)?;
                    println!("wrote {} and {}", json.display(), svg.display());
                }
            }
        }
        Cmd::Check(a) => {
            let opts = check::CheckOptions {
                strategy: a.strategy.parse().map_err(comet_bench::Error::Layer)?,
                engine: a.engine.parse().map_err(comet_bench::Error::Layer)?,
            };
            let files = check::check(&a.inputs, &a.out, &opts)?;
            println!(
                "comet-bench check: wrote {} files to {}",
                files.len(),
                a.out.display()
            );
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

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str]) -> RunArgs {
        let argv = ["comet-bench", "run"].iter().chain(args).copied();
        match Cli::try_parse_from(argv).unwrap().cmd {
            Cmd::Run(a) => *a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn sm90_stores_flag_forms() {
        assert_eq!(run_args(&[]).sm90_stores, ["on"]);
        assert_eq!(
            run_args(&["--sm90-stores", "off", "--backward"]).sm90_stores,
            ["off"]
        );
        assert_eq!(run_args(&["--sm90-stores"]).sm90_stores, ["on"]);
        assert_eq!(
            run_args(&["--sm90-stores", "--backward"]).sm90_stores,
            ["on"]
        );
        assert!(run_args(&["--sm90-stores", "--backward"]).backward);
        assert_eq!(
            run_args(&["--sm90-stores", "off,on"]).sm90_stores,
            ["off", "on"]
        );
        assert_eq!(run_args(&["--sm90-stores=1"]).sm90_stores, ["1"]);
        assert_eq!(
            run_args(&["--gemm-sm-reserve", "0,16"]).gemm_sm_reserve,
            [0, 16]
        );
    }
}
