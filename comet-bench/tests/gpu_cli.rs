//! `comet-bench run` and `check` from the command line: argument errors are clear; without a
//! GPU they say so (no panic); on a GPU host a tiny run writes a valid rank report.

use std::path::PathBuf;
use std::process::Command;

fn bench() -> Command {
    let bin = std::env::var_os("COMET_BENCH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_comet-bench")));
    let mut c = Command::new(bin);
    // A launcher's torchrun variables must not leak into the single-process runs below.
    for v in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"] {
        c.env_remove(v);
    }
    c
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("comet-bench-gpucli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn has_gpu() -> bool {
    let out = bench().args(["devices", "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    !v["devices"].as_array().unwrap().is_empty()
}

#[test]
fn run_arguments_are_checked_before_any_gpu_work() {
    for (args, needle) in [
        (vec!["--tokens", "0"], "--tokens"),
        (vec!["--strategies", "comet"], "comet"),
        (vec!["--presets", "llama"], "llama"),
        (
            vec!["--tokens", "2", "--strategies", "pipelined:4"],
            "at least 4 tokens",
        ),
        (vec!["--engine", "cutlass"], "cutlass"),
        (vec!["--presets", "custom"], "custom needs --hidden"),
    ] {
        let out = bench().arg("run").args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(e.contains(needle), "{args:?}: {e}");
        assert!(!e.contains("panicked"), "{args:?}: {e}");
    }
}

#[test]
fn check_arguments_are_checked() {
    let dir = tmp("check-args");
    let out = bench()
        .args(["check", "--inputs"])
        .arg(dir.join("missing"))
        .arg("--out")
        .arg(dir.join("out"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("config.json"), "{e}");
    let out = bench()
        .args([
            "check",
            "--inputs",
            ".",
            "--out",
            ".",
            "--strategy",
            "pipelined:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("chunks = 0"), "{e}");
}

/// No GPU: a clear error. GPU host: a tiny custom layer on one GPU writes a rank report with
/// both strategies, forward and forward + backward, phases and the dense rate.
#[test]
fn run_on_one_gpu_or_says_there_is_none() {
    let dir = tmp("run");
    let json = dir.join("rank.json");
    let out = bench()
        .args([
            "run",
            "--presets",
            "custom",
            "--hidden",
            "256",
            "--ffn",
            "128",
        ])
        .args([
            "--experts",
            "8",
            "--top-k",
            "2",
            "--tokens",
            "96",
            "--iters",
            "3",
        ])
        .args([
            "--warmup",
            "1",
            "--dense-n",
            "512",
            "--backward",
            "--local-gpus",
            "1",
        ])
        .args(["--strategies", "sequential,pipelined:2", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    if !has_gpu() {
        assert!(!out.status.success(), "{so}");
        assert!(se.contains("CUDA device(s) needed"), "{se}");
        assert!(!se.contains("panicked"), "{se}");
        return;
    }
    assert!(out.status.success(), "{so}\n{se}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["schema"], "comet-bench/rank/1");
    assert!(v["dense_gemm_tflops"].as_f64().unwrap() > 0.0, "{v}");
    let cases = v["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4, "{v}");
    for c in cases {
        assert!(c["median_ms"].as_f64().unwrap() > 0.0, "{c}");
        assert!(c["flops"].as_f64().unwrap() > 0.0, "{c}");
        let phases = c["phases_ms"].as_object().unwrap();
        for p in ["routing", "dispatch", "experts", "combine"] {
            assert!(phases.contains_key(p), "{c}");
        }
        if c["backward"].as_bool().unwrap() {
            assert!(phases.contains_key("bwd_experts"), "{c}");
        }
    }
    assert!(so.contains("COMET_PROGRESS 2 2"), "{so}");
}
