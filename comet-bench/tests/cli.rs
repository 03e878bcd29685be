//! The `comet-bench` command line as `cargo xtask bench` uses it.

use std::path::PathBuf;
use std::process::Command;

/// The binary cargo built beside this test, or `COMET_BENCH_BIN` (set by the GPU bundle's
/// run.sh, where the build machine's path does not exist).
fn bench() -> Command {
    let bin = std::env::var_os("COMET_BENCH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_comet-bench")));
    Command::new(bin)
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("comet-bench-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `devices --json` always succeeds and prints what xtask parses; with no device it says why.
#[test]
fn devices_json_is_what_xtask_reads() {
    let out = bench().args(["devices", "--json"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["driver_found"].is_boolean());
    assert!(v["gpu_bench"].is_boolean());
    let devices = v["devices"].as_array().unwrap();
    if devices.is_empty() {
        assert!(v["error"].as_str().unwrap().contains("CUDA"), "{v}");
    }
    let text = bench().arg("devices").output().unwrap();
    assert!(text.status.success());
    let s = String::from_utf8_lossy(&text.stdout);
    assert!(s.contains("CUDA"), "{s}");
}

#[test]
fn cpu_reference_prints_what_it_ran_and_writes_json() {
    let dir = tmp("cpu");
    let json = dir.join("run.json");
    let out = bench()
        .args(["cpu-reference", "--preset", "phi3.5-moe", "--tokens", "16"])
        .args(["--shrink", "64", "--world", "2", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{s}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        s.contains(
            "phi-3.5-moe with hidden and ffn divided by 64: hidden 64, ffn 100, 16 experts, top-2"
        ),
        "{s}"
    );
    assert!(s.contains("tokens 16"), "{s}");
    assert!(
        s.contains("||y||_2 = ") && s.contains("non-finite 0"),
        "{s}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["tokens"], 16);
    assert!(v["ep"]["rel_l2"].as_f64().unwrap() < 1e-6, "{v}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_arguments_fail_with_a_clear_message() {
    let out = bench()
        .args(["cpu-reference", "--preset", "mixtral", "--shrink", "3"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("shrink factor 3"), "{e}");
    let out = bench()
        .args(["report", "--dry-run", "/nonexistent/rank0.json"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/rank0.json"));
}

/// Two rank reports → table on stdout, results JSON and SVG in --out.
#[test]
fn report_gathers_rank_files() {
    let dir = tmp("report");
    for rank in 0..2 {
        let case = |strategy: &str, ms: f64| {
            serde_json::json!({
                "preset": "qwen2-moe-2.7b", "strategy": strategy, "tokens_per_rank": 8192,
                "dtype": "bf16", "backward": false, "iterations": 20, "median_ms": ms + rank as f64,
            })
        };
        let r = serde_json::json!({
            "schema": "comet-bench/rank/1", "rank": rank, "world_size": 2,
            "gpu_name": "NVIDIA H200", "cases": [case("sequential", 2.0), case("pipelined", 1.5)],
        });
        std::fs::write(dir.join(format!("rank{rank}.json")), r.to_string()).unwrap();
    }
    let out_dir = dir.join("results");
    let out = bench()
        .arg("report")
        .arg("--out")
        .arg(&out_dir)
        .arg(dir.join("rank0.json"))
        .arg(dir.join("rank1.json"))
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{s}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The slower rank's time (rank 1: +1 ms) is the layer time.
    let row = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or("")
            .to_string()
    };
    assert!(row("| sequential |").ends_with("3.000 ms |"), "{s}");
    assert!(row("| pipelined  |").ends_with("2.500 ms |"), "{s}");
    let files: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files.len(), 2, "{files:?}");
    assert!(
        files.iter().any(|f| f.ends_with("-h200x2.json")),
        "{files:?}"
    );
    assert!(
        files.iter().any(|f| f.ends_with("-h200x2.svg")),
        "{files:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
