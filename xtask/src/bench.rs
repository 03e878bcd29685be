//! `cargo xtask bench`: build `comet-bench`, find the GPUs, launch one process per GPU,
//! gather the ranks' reports into one table, a results JSON and an SVG chart
//! (`comet-bench report`). With no CUDA device, or while comet-bench has no GPU path, it
//! says so plainly and runs the CPU reference on small presets instead.

use crate::launch::{self, LaunchSpec};
use crate::util::{cargo, display_cmd, run_status, run_stdout, workspace_root};
use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Tokens per rank for the CPU fallback when `--tokens` is not given.
pub const CPU_TOKENS: usize = 256;
/// Factor by which the CPU fallback divides a preset's hidden and ffn sizes.
pub const CPU_SHRINK: usize = 16;
/// Preset the CPU fallback runs when `--presets` is not given.
pub const CPU_PRESET: &str = "mixtral";
/// Simulated ranks of the expert-parallel reference the CPU fallback checks against.
pub const CPU_WORLD: usize = 2;

/// Arguments of `cargo xtask bench`.
#[derive(clap::Args, Debug, Default)]
pub struct BenchArgs {
    /// Number of GPUs (one rank each); default: every CUDA device found. 0 runs the CPU path.
    #[arg(long)]
    pub gpus: Option<usize>,
    /// Model presets, comma separated (mixtral, qwen2-moe, phi3.5-moe, deepseek-v3);
    /// default: all four on GPUs, mixtral on the CPU path.
    #[arg(long, value_delimiter = ',')]
    pub presets: Vec<String>,
    /// Tokens per rank, comma separated (default: comet-bench's, 8192; CPU path: 256).
    #[arg(long, value_delimiter = ',')]
    pub tokens: Vec<usize>,
    /// Strategies, comma separated (sequential, pipelined, comet); default: comet-bench's.
    #[arg(long, value_delimiter = ',')]
    pub strategies: Vec<String>,
    /// Timed iterations per case (default: comet-bench's).
    #[arg(long)]
    pub iters: Option<usize>,
    /// Time forward + backward instead of forward only.
    #[arg(long)]
    pub backward: bool,
    /// Directory for the results JSON and SVG (default: bench/results in the workspace).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Use this comet-bench executable instead of building one (as `.gpu/run.sh bench` does).
    #[arg(long)]
    pub bin: Option<PathBuf>,
    /// Directory for each rank's JSON and log (default: a new one under the temp dir).
    #[arg(long)]
    pub scratch: Option<PathBuf>,
    /// More inputs for the table: rank reports, or PyTorch records (bench/INTEROP.md §8).
    #[arg(long)]
    pub extra: Vec<PathBuf>,
    /// Time limit for the whole GPU run, in seconds.
    #[arg(long, default_value_t = 3600)]
    pub timeout_s: u64,
    /// Also run the PyTorch + NCCL expert-parallel layer (`bench/torch_reference.py bench`
    /// through `torch.distributed.run`, bench/INTEROP.md §8) for the same presets and tokens
    /// and put its rows in the table.
    #[arg(long)]
    pub torch: bool,
    /// Python with torch for --torch (default: /opt/torch/.venv/bin/python3 if present,
    /// else python3).
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// The script for --torch (default: bench/torch_reference.py under the current
    /// directory, else under the workspace).
    #[arg(long)]
    pub torch_script: Option<PathBuf>,
}

/// The presets of a GPU run when `--presets` is not given (comet-bench's default).
pub const GPU_PRESETS: [&str; 4] = [
    "mixtral-8x7b",
    "qwen2-moe-2.7b",
    "phi-3.5-moe",
    "deepseek-v3",
];
/// Tokens per rank of a GPU run when `--tokens` is not given (comet-bench's default).
pub const GPU_TOKENS: usize = 8192;

/// The `torch.distributed.run` command lines of `--torch`: one per preset × tokens, each
/// writing `<scratch>/torch-<preset>-m<tokens>.json` (returned beside the command).
pub fn torch_commands(
    args: &BenchArgs,
    world: usize,
    scratch: &Path,
    python: &Path,
    script: &Path,
) -> Vec<(Command, PathBuf)> {
    let presets: Vec<String> = if args.presets.is_empty() {
        GPU_PRESETS.iter().map(|p| p.to_string()).collect()
    } else {
        args.presets.clone()
    };
    let tokens = if args.tokens.is_empty() {
        vec![GPU_TOKENS]
    } else {
        args.tokens.clone()
    };
    let mut out = Vec::new();
    for p in &presets {
        for &t in &tokens {
            let json = scratch.join(format!("torch-{p}-m{t}.json"));
            let mut cmd = Command::new(python);
            cmd.args([
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
            ])
            .arg(world.to_string())
            .arg(script)
            .args(["bench", "--preset", p, "--tokens", &t.to_string()]);
            if args.backward {
                cmd.arg("--backward");
            }
            if let Some(n) = args.iters {
                cmd.args(["--iters", &n.to_string()]);
            }
            cmd.arg("--json").arg(&json);
            cmd.envs(launch::SAFE_ENV.iter().copied());
            out.push((cmd, json));
        }
    }
    out
}

/// The Python interpreter and script `--torch` uses.
fn torch_tools(args: &BenchArgs) -> (PathBuf, PathBuf) {
    let python = args.python.clone().unwrap_or_else(|| {
        let venv = PathBuf::from("/opt/torch/.venv/bin/python3");
        if venv.is_file() {
            venv
        } else {
            PathBuf::from("python3")
        }
    });
    let script = args.torch_script.clone().unwrap_or_else(|| {
        let here = PathBuf::from("bench/torch_reference.py");
        if here.is_file() {
            here
        } else {
            workspace_root().join("bench").join("torch_reference.py")
        }
    });
    (python, script)
}

/// Runs `--torch`'s commands; a failing one is reported and left out of the table.
fn run_torch(args: &BenchArgs, world: usize, scratch: &Path) -> Vec<PathBuf> {
    let (python, script) = torch_tools(args);
    let mut done = Vec::new();
    for (mut cmd, json) in torch_commands(args, world, scratch, &python, &script) {
        match run_status(&mut cmd) {
            Ok(()) if json.is_file() => done.push(json),
            Ok(()) => eprintln!(
                "warning: {} was not written; PyTorch row left out",
                json.display()
            ),
            Err(e) => eprintln!("warning: the PyTorch bench failed, its row is left out: {e:#}"),
        }
    }
    done
}

/// What `comet-bench devices --json` prints.
#[derive(Debug, Deserialize, PartialEq)]
pub struct Devices {
    /// Whether the CUDA driver library could be loaded.
    pub driver_found: bool,
    /// Why no device is usable, if so.
    #[serde(default)]
    pub error: Option<String>,
    /// The CUDA devices, in ordinal order.
    #[serde(default)]
    pub devices: Vec<Device>,
    /// Whether this comet-bench build can run the layer benchmark on GPUs (`run`).
    #[serde(default)]
    pub gpu_bench: bool,
}

/// One CUDA device as `comet-bench devices --json` reports it.
#[derive(Debug, Deserialize, PartialEq)]
pub struct Device {
    /// Device ordinal.
    pub ordinal: usize,
    /// Device name, e.g. "NVIDIA H200".
    pub name: String,
}

/// The path `cargo xtask bench` takes.
#[derive(Debug, PartialEq)]
pub enum Plan {
    /// Run the CPU reference; the string says why in plain words.
    Cpu(String),
    /// Launch this many ranks, one per GPU.
    Gpu(usize),
}

/// Decide between the GPU and the CPU path.
pub fn plan(devices: &Devices, gpus: Option<usize>) -> Result<Plan> {
    let found = devices.devices.len();
    if gpus == Some(0) {
        return Ok(Plan::Cpu("--gpus 0 asks for the CPU path".into()));
    }
    if found == 0 {
        let why = match (&devices.error, devices.driver_found) {
            (Some(e), _) => e.clone(),
            (None, false) => "no CUDA driver found".into(),
            (None, true) => "the CUDA driver reports 0 devices".into(),
        };
        return Ok(Plan::Cpu(format!("no CUDA device found: {why}")));
    }
    let want = gpus.unwrap_or(found);
    if want > found {
        bail!("--gpus {want} asks for more GPUs than the {found} CUDA device(s) found");
    }
    if !devices.gpu_bench {
        let names: Vec<&str> = devices.devices.iter().map(|d| d.name.as_str()).collect();
        return Ok(Plan::Cpu(format!(
            "found {found} CUDA device(s) ({}), but this comet-bench has no GPU benchmark \
             path yet (the MoE layer is in progress)",
            names.join(", ")
        )));
    }
    Ok(Plan::Gpu(want))
}

/// Run `cargo xtask bench`.
pub fn run(args: &BenchArgs) -> Result<()> {
    let bin = match &args.bin {
        Some(b) => b.clone(),
        None => build_comet_bench()?,
    };
    let devices = probe(&bin)?;
    match plan(&devices, args.gpus)? {
        Plan::Cpu(why) => run_cpu(&bin, args, &why),
        Plan::Gpu(world) => run_gpu(&bin, args, world),
    }
}

/// `cargo build --release -p comet-bench --bin comet-bench`, returning the executable.
fn build_comet_bench() -> Result<PathBuf> {
    let out = run_stdout(cargo().args([
        "build",
        "--release",
        "-p",
        "comet-bench",
        "--bin",
        "comet-bench",
        "--message-format=json-render-diagnostics",
    ]))?;
    crate::bundle::artifacts(&out)?
        .into_iter()
        .find(|a| a.target_name == "comet-bench" && a.kind == "bin")
        .map(|a| a.executable)
        .context("cargo built comet-bench but reported no executable")
}

fn probe(bin: &Path) -> Result<Devices> {
    let mut cmd = Command::new(bin);
    cmd.args(["devices", "--json"]);
    let text = run_stdout(&mut cmd)?;
    serde_json::from_str(&text)
        .with_context(|| format!("cannot parse `{}` output: {text}", display_cmd(&cmd)))
}

fn run_cpu(bin: &Path, args: &BenchArgs, why: &str) -> Result<()> {
    println!("comet-rs bench: {why}.");
    println!(
        "No GPU benchmark runs here: running the CPU reference (f32, comet_core::reference) \
         on a small preset instead, hidden and ffn divided by {CPU_SHRINK}, and checking the \
         expert-parallel reference over {CPU_WORLD} simulated ranks against it."
    );
    if !args.strategies.is_empty() {
        println!("(--strategies only apply to the GPU path; ignored here)");
    }
    let presets = if args.presets.is_empty() {
        vec![CPU_PRESET.to_string()]
    } else {
        args.presets.clone()
    };
    let tokens = if args.tokens.is_empty() {
        vec![CPU_TOKENS]
    } else {
        args.tokens.clone()
    };
    for preset in &presets {
        for &t in &tokens {
            let mut cmd = Command::new(bin);
            cmd.args(["cpu-reference", "--preset", preset])
                .args(["--tokens", &t.to_string()])
                .args(["--shrink", &CPU_SHRINK.to_string()]);
            if t >= CPU_WORLD {
                cmd.args(["--world", &CPU_WORLD.to_string()]);
            }
            run_status(&mut cmd)?;
        }
    }
    Ok(())
}

/// The `comet-bench run` arguments for the ranks (before the per-rank `--json PATH`).
pub fn run_args(args: &BenchArgs) -> Vec<OsString> {
    let mut v: Vec<OsString> = vec!["run".into()];
    let join = |xs: &[String]| xs.join(",");
    if !args.presets.is_empty() {
        v.extend(["--presets".into(), join(&args.presets).into()]);
    }
    if !args.tokens.is_empty() {
        let t: Vec<String> = args.tokens.iter().map(|t| t.to_string()).collect();
        v.extend(["--tokens".into(), join(&t).into()]);
    }
    if !args.strategies.is_empty() {
        v.extend(["--strategies".into(), join(&args.strategies).into()]);
    }
    if let Some(n) = args.iters {
        v.extend(["--iters".into(), n.to_string().into()]);
    }
    if args.backward {
        v.push("--backward".into());
    }
    v
}

fn run_gpu(bin: &Path, args: &BenchArgs, world: usize) -> Result<()> {
    let scratch = args
        .scratch
        .clone()
        .unwrap_or_else(|| launch::default_scratch(&std::env::temp_dir()));
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| workspace_root().join("bench").join("results"));
    println!(
        "comet-rs bench: {world} rank(s), one per GPU; rank reports and logs in {}",
        scratch.display()
    );
    let spec = LaunchSpec {
        program: bin.to_path_buf(),
        args: run_args(args),
        world,
        scratch,
        timeout: Duration::from_secs(args.timeout_s),
        progress: std::io::stderr().is_terminal(),
    };
    let scratch_dir = spec.scratch.clone();
    let mut reports = launch::launch(&spec)?;
    if args.torch {
        reports.extend(run_torch(args, world, &scratch_dir));
    }
    reports.extend(args.extra.iter().cloned());
    let mut cmd = Command::new(bin);
    cmd.arg("report").arg("--out").arg(&out).args(&reports);
    run_status(&mut cmd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::testdir::{TestDir, script};

    /// A stand-in comet-bench with 2 GPUs and a GPU path: `devices`, `run` and `report` log
    /// their arguments; `run` writes a rank report named by `--json`.
    const FAKE_BENCH: &str = r#"#!/usr/bin/env bash
log="$(dirname "$0")/calls.log"
echo "$* | RANK=${RANK:-} WORLD_SIZE=${WORLD_SIZE:-}" >> "$log"
case "$1" in
  devices) echo '{"driver_found": true, "devices": [{"ordinal": 0, "name": "NVIDIA H200"}, {"ordinal": 1, "name": "NVIDIA H200"}], "gpu_bench": true}' ;;
  run) while [ $# -gt 0 ]; do [ "$1" = --json ] && json="$2"; shift; done
       echo "{\"rank\": $RANK}" > "$json" ;;
  report) echo "table" ;;
  *) exit 9 ;;
esac
"#;

    #[test]
    fn the_gpu_path_launches_every_rank_then_reports() {
        let dir = TestDir::new("bench-gpu");
        let bin = dir.path().join("comet-bench");
        script(&bin, FAKE_BENCH);
        let extra = dir.path().join("torch.json");
        std::fs::write(&extra, "{}").unwrap();
        let args = BenchArgs {
            bin: Some(bin),
            presets: vec!["mixtral".into()],
            out: Some(dir.path().join("results")),
            scratch: Some(dir.path().join("scratch")),
            extra: vec![extra.clone()],
            timeout_s: 60,
            ..Default::default()
        };
        run(&args).unwrap();
        let calls = std::fs::read_to_string(dir.path().join("calls.log")).unwrap();
        let lines: Vec<&str> = calls.lines().collect();
        assert_eq!(lines.len(), 4, "{calls}");
        assert!(lines[0].starts_with("devices --json"), "{calls}");
        let mut runs: Vec<&str> = lines[1..3].to_vec();
        runs.sort();
        assert!(
            runs[0].starts_with("run --presets mixtral --json ")
                && runs[0].ends_with("RANK=0 WORLD_SIZE=2"),
            "{calls}"
        );
        assert!(runs[1].ends_with("RANK=1 WORLD_SIZE=2"), "{calls}");
        let report = lines[3];
        assert!(report.starts_with("report --out "), "{report}");
        assert!(
            report.contains("rank0.json") && report.contains("rank1.json"),
            "{report}"
        );
        assert!(report.contains(extra.to_str().unwrap()), "{report}");
    }

    fn devices(n: usize, gpu_bench: bool) -> Devices {
        Devices {
            driver_found: true,
            error: None,
            devices: (0..n)
                .map(|i| Device {
                    ordinal: i,
                    name: "NVIDIA H200".into(),
                })
                .collect(),
            gpu_bench,
        }
    }

    #[test]
    fn no_driver_means_the_cpu_path_with_the_reason() {
        let d: Devices = serde_json::from_str(r#"{"driver_found": false, "devices": []}"#).unwrap();
        match plan(&d, None).unwrap() {
            Plan::Cpu(why) => assert!(why.contains("no CUDA driver found"), "{why}"),
            p => panic!("{p:?}"),
        }
        match plan(&d, Some(2)).unwrap() {
            Plan::Cpu(why) => assert!(why.contains("no CUDA device"), "{why}"),
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn gpus_are_used_only_when_comet_bench_has_a_gpu_path() {
        assert_eq!(plan(&devices(2, true), None).unwrap(), Plan::Gpu(2));
        assert_eq!(plan(&devices(2, true), Some(1)).unwrap(), Plan::Gpu(1));
        assert!(matches!(
            plan(&devices(2, true), Some(0)).unwrap(),
            Plan::Cpu(_)
        ));
        match plan(&devices(2, false), None).unwrap() {
            Plan::Cpu(why) => assert!(why.contains("no GPU benchmark path yet"), "{why}"),
            p => panic!("{p:?}"),
        }
        let err = plan(&devices(2, true), Some(4)).unwrap_err().to_string();
        assert!(
            err.contains("--gpus 4") && err.contains("2 CUDA device"),
            "{err}"
        );
    }

    #[test]
    fn torch_commands_cover_presets_and_tokens() {
        let args = BenchArgs {
            presets: vec!["mixtral".into(), "qwen2-moe".into()],
            tokens: vec![4096, 8192],
            backward: true,
            iters: Some(25),
            ..Default::default()
        };
        let cmds = torch_commands(
            &args,
            2,
            Path::new("/s"),
            Path::new("/py"),
            Path::new("t.py"),
        );
        assert_eq!(cmds.len(), 4);
        let (cmd, json) = &cmds[1];
        assert_eq!(json, &PathBuf::from("/s/torch-mixtral-m8192.json"));
        assert_eq!(cmd.get_program(), "/py");
        let a: Vec<String> = cmd
            .get_args()
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            a,
            [
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                "2",
                "t.py",
                "bench",
                "--preset",
                "mixtral",
                "--tokens",
                "8192",
                "--backward",
                "--iters",
                "25",
                "--json",
                "/s/torch-mixtral-m8192.json"
            ]
        );
        let nvls = cmd
            .get_envs()
            .find(|(k, _)| *k == "NCCL_NVLS_ENABLE")
            .and_then(|(_, v)| v);
        assert_eq!(nvls, Some(std::ffi::OsStr::new("0")));
        // Defaults: comet-bench's four presets at 8192 tokens.
        let cmds = torch_commands(
            &BenchArgs::default(),
            2,
            Path::new("/s"),
            Path::new("/py"),
            Path::new("t.py"),
        );
        let jsons: Vec<_> = cmds.iter().map(|(_, j)| j.clone()).collect();
        assert_eq!(jsons.len(), 4);
        assert_eq!(jsons[3], PathBuf::from("/s/torch-deepseek-v3-m8192.json"));
    }

    #[test]
    fn run_args_pass_only_what_was_given() {
        assert_eq!(run_args(&BenchArgs::default()), vec![OsString::from("run")]);
        let args = BenchArgs {
            presets: vec!["mixtral".into(), "deepseek-v3".into()],
            tokens: vec![4096, 8192],
            strategies: vec!["sequential".into()],
            iters: Some(20),
            backward: true,
            ..Default::default()
        };
        let got: Vec<String> = run_args(&args)
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        assert_eq!(
            got,
            [
                "run",
                "--presets",
                "mixtral,deepseek-v3",
                "--tokens",
                "4096,8192",
                "--strategies",
                "sequential",
                "--iters",
                "20",
                "--backward"
            ]
        );
    }
}
