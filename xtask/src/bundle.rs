//! `cargo xtask gpu-bundle`: everything a GPU host needs to test and benchmark comet-rs,
//! with no Rust toolchain there.
//!
//! Layout of the bundle (default `.gpu/`, git-ignored):
//!
//! ```text
//! run.sh              test | sanitize | bench | all | env   (xtask/assets/run.sh)
//! MANIFEST.json       commit, build time, every file with its size
//! gpu-tests.txt       test binaries whose package uses CUDA (run under compute-sanitizer)
//! tests/<package>.<kind>.<target>   release test executables (unit, integration)
//! bin/comet-bench     the benchmark binary
//! bin/xtask           this launcher (run.sh bench uses `xtask bench --bin bin/comet-bench`)
//! examples/<name>     benchmark examples (examples named *_bench)
//! ```

use crate::util::{cargo, mib, run_stdout, unix_now, workspace_root};
use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The runner script copied into the bundle.
pub const RUN_SH: &str = include_str!("../assets/run.sh");

/// Marker file that makes a directory ours to replace.
const MARKER: &str = ".comet-bundle";

/// Arguments of `cargo xtask gpu-bundle`.
#[derive(clap::Args, Debug)]
pub struct BundleArgs {
    /// Bundle directory (replaced if it holds an earlier bundle).
    #[arg(long, default_value = ".gpu")]
    pub out: PathBuf,
    /// Packages whose tests are left out (repeatable); xtask's own tests need no GPU.
    #[arg(long, default_value = "xtask")]
    pub exclude: Vec<String>,
}

/// One executable cargo reported building.
#[derive(Debug, Clone, PartialEq)]
pub struct Artifact {
    /// Package name.
    pub package: String,
    /// Target name (crate name for libs, file stem for tests/examples).
    pub target_name: String,
    /// First target kind: lib, bin, test, example, bench, ...
    pub kind: String,
    /// Whether this is a test harness build.
    pub test: bool,
    /// The executable.
    pub executable: PathBuf,
}

#[derive(Deserialize)]
struct Message {
    reason: String,
    #[serde(default)]
    package_id: String,
    #[serde(default)]
    manifest_path: Option<PathBuf>,
    target: Option<Target>,
    profile: Option<Profile>,
    executable: Option<PathBuf>,
}

#[derive(Deserialize)]
struct Target {
    name: String,
    kind: Vec<String>,
}

#[derive(Deserialize)]
struct Profile {
    test: bool,
}

/// Package name from a cargo package id, in either the old (`name 0.1.0 (path+file://..)`)
/// or the new (`path+file:///dir/name#0.1.0`, `path+file:///dir#name@0.1.0`) form.
fn package_name(id: &str, manifest: Option<&Path>) -> String {
    if let Some((url, frag)) = id.split_once('#') {
        if let Some((name, _ver)) = frag.split_once('@') {
            return name.to_string();
        }
        if let Some(last) = url.trim_end_matches('/').rsplit('/').next() {
            return last.to_string();
        }
    } else if let Some(first) = id.split_whitespace().next() {
        if id.contains(' ') {
            return first.to_string();
        }
    }
    manifest
        .and_then(|m| m.parent())
        .and_then(|d| d.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| id.to_string())
}

/// The executables in cargo's `--message-format=json` output.
pub fn artifacts(json_lines: &str) -> Result<Vec<Artifact>> {
    let mut out = Vec::new();
    for line in json_lines.lines().filter(|l| l.starts_with('{')) {
        let msg: Message =
            serde_json::from_str(line).with_context(|| format!("bad cargo message: {line}"))?;
        if msg.reason != "compiler-artifact" {
            continue;
        }
        let (Some(target), Some(exe)) = (msg.target, msg.executable) else {
            continue;
        };
        out.push(Artifact {
            package: package_name(&msg.package_id, msg.manifest_path.as_deref()),
            target_name: target.name,
            kind: target.kind.first().cloned().unwrap_or_default(),
            test: msg.profile.map(|p| p.test).unwrap_or(false),
            executable: exe,
        });
    }
    Ok(out)
}

#[derive(Deserialize)]
struct Metadata {
    packages: Vec<MetaPackage>,
    workspace_members: Vec<String>,
}

#[derive(Deserialize)]
struct MetaPackage {
    id: String,
    name: String,
    targets: Vec<Target>,
    #[serde(default)]
    dependencies: Vec<MetaDep>,
}

#[derive(Deserialize)]
struct MetaDep {
    name: String,
}

/// What the bundle needs from `cargo metadata`.
#[derive(Debug, Default, PartialEq)]
pub struct WorkspaceInfo {
    /// Workspace packages that depend on `cudarc`, directly or through other workspace
    /// packages, with any dependency kind (their test binaries touch GPUs).
    pub gpu_packages: BTreeSet<String>,
    /// Benchmark examples: (package, example) for examples named `*_bench`.
    pub bench_examples: Vec<(String, String)>,
}

/// Read `cargo metadata --no-deps --format-version 1` output.
pub fn workspace_info(metadata_json: &str) -> Result<WorkspaceInfo> {
    let meta: Metadata = serde_json::from_str(metadata_json).context("bad cargo metadata")?;
    let members: Vec<&MetaPackage> = meta
        .packages
        .iter()
        .filter(|p| meta.workspace_members.contains(&p.id))
        .collect();
    let by_name: BTreeMap<&str, &MetaPackage> =
        members.iter().map(|p| (p.name.as_str(), *p)).collect();
    let mut info = WorkspaceInfo::default();
    for pkg in &members {
        // Depth-first search for cudarc through workspace packages.
        let mut seen = BTreeSet::new();
        let mut stack = vec![pkg.name.as_str()];
        while let Some(name) = stack.pop() {
            if !seen.insert(name) {
                continue;
            }
            let Some(p) = by_name.get(name) else { continue };
            if p.dependencies.iter().any(|d| d.name == "cudarc") {
                info.gpu_packages.insert(pkg.name.clone());
                break;
            }
            stack.extend(p.dependencies.iter().map(|d| d.name.as_str()));
        }
        for t in &pkg.targets {
            if t.kind.iter().any(|k| k == "example") && t.name.ends_with("_bench") {
                info.bench_examples.push((pkg.name.clone(), t.name.clone()));
            }
        }
    }
    Ok(info)
}

/// File name of a test executable in the bundle.
pub fn test_file_name(a: &Artifact) -> String {
    format!("{}.{}.{}", a.package, a.kind, a.target_name)
}

/// Run `cargo xtask gpu-bundle`.
pub fn run(args: &BundleArgs) -> Result<()> {
    let root = workspace_root();
    let out = if args.out.is_absolute() {
        args.out.clone()
    } else {
        root.join(&args.out)
    };
    prepare_dir(&out)?;

    let info = workspace_info(&run_stdout(cargo().args([
        "metadata",
        "--no-deps",
        "--format-version",
        "1",
    ]))?)?;

    // 1. Release test executables (GPU tests are #[ignore]d; run.sh passes --include-ignored).
    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--release", "--no-run"]);
    for p in &args.exclude {
        cmd.args(["--exclude", p]);
    }
    cmd.arg("--message-format=json-render-diagnostics");
    let tests: Vec<Artifact> = artifacts(&run_stdout(&mut cmd)?)?
        .into_iter()
        .filter(|a| a.test)
        .collect();
    if tests.is_empty() {
        bail!("cargo built no test executables");
    }

    // 2. comet-bench and the launcher.
    let bins: Vec<Artifact> = artifacts(&run_stdout(cargo().args([
        "build",
        "--release",
        "-p",
        "comet-bench",
        "--bin",
        "comet-bench",
        "-p",
        "xtask",
        "--bin",
        "xtask",
        "--message-format=json-render-diagnostics",
    ]))?)?
    .into_iter()
    .filter(|a| a.kind == "bin")
    .collect();

    // 3. Benchmark examples.
    let mut examples = Vec::new();
    for (pkg, ex) in &info.bench_examples {
        let built = artifacts(&run_stdout(cargo().args([
            "build",
            "--release",
            "-p",
            pkg,
            "--example",
            ex,
            "--message-format=json-render-diagnostics",
        ]))?)?;
        examples.extend(built.into_iter().filter(|a| a.kind == "example"));
    }

    // 4. Copy, strip, write run.sh and the manifest.
    let mut files: Vec<(String, u64)> = Vec::new();
    let mut gpu_tests = Vec::new();
    for a in &tests {
        let name = test_file_name(a);
        if info.gpu_packages.contains(&a.package) {
            gpu_tests.push(name.clone());
        }
        files.push(copy_exe(&a.executable, &out, &format!("tests/{name}"))?);
    }
    for a in &bins {
        files.push(copy_exe(
            &a.executable,
            &out,
            &format!("bin/{}", a.target_name),
        )?);
    }
    for a in &examples {
        files.push(copy_exe(
            &a.executable,
            &out,
            &format!("examples/{}", a.target_name),
        )?);
    }
    write_file(&out.join("run.sh"), RUN_SH, true)?;
    write_file(
        &out.join("gpu-tests.txt"),
        &(gpu_tests.join("\n") + "\n"),
        false,
    )?;
    let total: u64 = files.iter().map(|(_, s)| s).sum::<u64>() + RUN_SH.len() as u64;
    let manifest = serde_json::json!({
        "commit": git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into()),
        "dirty": git(&["status", "--porcelain"]).map(|s| !s.is_empty()),
        "built_utc": unix_now(),
        "total_bytes": total,
        "gpu_packages": info.gpu_packages,
        "files": files.iter().map(|(p, s)| serde_json::json!({"path": p, "bytes": s})).collect::<Vec<_>>(),
    });
    write_file(
        &out.join("MANIFEST.json"),
        &serde_json::to_string_pretty(&manifest)?,
        false,
    )?;

    println!("\nGPU bundle in {}:", out.display());
    for (p, s) in &files {
        println!("  {:>10}  {p}", mib(*s));
    }
    println!(
        "  {} test binaries ({} use CUDA), {} bin, {} examples; total {}",
        tests.len(),
        gpu_tests.len(),
        bins.len(),
        examples.len(),
        mib(total)
    );
    println!(
        "Run on the GPU host: bash {}/run.sh all --out DIR   (or test | sanitize | bench | env)",
        args.out.display()
    );
    Ok(())
}

/// Make `dir` an empty bundle directory: create it, or clear it if it holds an earlier
/// bundle; refuse to clear anything else.
fn prepare_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        let empty = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .next()
            .is_none();
        if !empty && !dir.join(MARKER).exists() {
            bail!(
                "{} exists and is not a comet-rs GPU bundle (no {MARKER}); refusing to replace it",
                dir.display()
            );
        }
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    write_file(&dir.join(MARKER), "comet-rs GPU bundle\n", false)
}

fn write_file(path: &Path, text: &str, executable: bool) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    if executable {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

/// Copy an executable into the bundle and strip it; returns (relative path, size).
fn copy_exe(src: &Path, out: &Path, rel: &str) -> Result<(String, u64)> {
    let dst = out.join(rel);
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::copy(src, &dst)
        .with_context(|| format!("cannot copy {} to {}", src.display(), dst.display()))?;
    // Release builds are already stripped of symbols (workspace profile); this also drops
    // what is left (e.g. debug sections of prebuilt std objects). Not fatal if absent.
    match Command::new("strip").arg("--strip-all").arg(&dst).status() {
        Ok(s) if s.success() => {}
        Ok(s) => eprintln!("warning: strip {} failed ({s})", dst.display()),
        Err(_) => eprintln!(
            "warning: no `strip` on PATH; {} left as built",
            dst.display()
        ),
    }
    let size = std::fs::metadata(&dst)?.len();
    Ok((rel.to_string(), size))
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(workspace_root())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::testdir::{TestDir, script};

    const CARGO_JSON: &str = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/comet-core#0.1.0","manifest_path":"/w/comet-core/Cargo.toml","target":{"kind":["lib"],"crate_types":["lib"],"name":"comet_core","src_path":"/w/comet-core/src/lib.rs","edition":"2024","doctest":true,"test":true},"profile":{"opt_level":"3","debuginfo":0,"debug_assertions":false,"overflow_checks":false,"test":true},"features":[],"filenames":["/w/target/release/deps/comet_core-1"],"executable":"/w/target/release/deps/comet_core-1","fresh":false}
{"reason":"compiler-artifact","package_id":"path+file:///w/comet-core#0.1.0","manifest_path":"/w/comet-core/Cargo.toml","target":{"kind":["lib"],"crate_types":["lib"],"name":"comet_core","src_path":"/w/comet-core/src/lib.rs","edition":"2024","doctest":true,"test":true},"profile":{"opt_level":"3","debuginfo":0,"debug_assertions":false,"overflow_checks":false,"test":false},"features":[],"filenames":["/w/target/release/deps/libcomet_core-2.rlib"],"executable":null,"fresh":false}
{"reason":"compiler-artifact","package_id":"path+file:///w/kernels#comet-kernels@0.1.0","manifest_path":"/w/kernels/Cargo.toml","target":{"kind":["test"],"crate_types":["bin"],"name":"gemm","src_path":"/w/kernels/tests/gemm.rs","edition":"2024","doctest":false,"test":true},"profile":{"opt_level":"3","debuginfo":0,"debug_assertions":false,"overflow_checks":false,"test":true},"features":[],"filenames":["/w/target/release/deps/gemm-3"],"executable":"/w/target/release/deps/gemm-3","fresh":true}
{"reason":"compiler-message","package_id":"x","message":{}}
{"reason":"build-finished","success":true}
"#;

    #[test]
    fn test_executables_are_found_in_cargo_json() {
        let a = artifacts(CARGO_JSON).unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].package, "comet-core");
        assert_eq!(a[0].kind, "lib");
        assert!(a[0].test);
        assert_eq!(test_file_name(&a[0]), "comet-core.lib.comet_core");
        assert_eq!(a[1].package, "comet-kernels");
        assert_eq!(test_file_name(&a[1]), "comet-kernels.test.gemm");
        assert_eq!(
            a[1].executable,
            PathBuf::from("/w/target/release/deps/gemm-3")
        );
        assert!(artifacts("{not json").is_err());
    }

    #[test]
    fn package_names_from_both_id_forms() {
        assert_eq!(
            package_name("comet-core 0.1.0 (path+file:///w/comet-core)", None),
            "comet-core"
        );
        assert_eq!(
            package_name("path+file:///w/comet-core#0.1.0", None),
            "comet-core"
        );
        assert_eq!(
            package_name("path+file:///w/x#comet-bench@0.1.0", None),
            "comet-bench"
        );
    }

    #[test]
    fn gpu_packages_and_bench_examples_from_metadata() {
        let meta = r#"{
          "packages": [
            {"id": "core", "name": "comet-core", "targets": [{"name": "comet_core", "kind": ["lib"]}],
             "dependencies": [{"name": "half"}]},
            {"id": "kern", "name": "comet-kernels", "targets": [
                {"name": "comet_kernels", "kind": ["lib"]},
                {"name": "gemm_bench", "kind": ["example"]},
                {"name": "demo", "kind": ["example"]}],
             "dependencies": [{"name": "comet-core"}, {"name": "cudarc"}]},
            {"id": "layer", "name": "comet-layer", "targets": [{"name": "comet_layer", "kind": ["lib"]}],
             "dependencies": [{"name": "comet-kernels"}]}
          ],
          "workspace_members": ["core", "kern", "layer"]
        }"#;
        let info = workspace_info(meta).unwrap();
        let gpu: Vec<&str> = info.gpu_packages.iter().map(String::as_str).collect();
        assert_eq!(gpu, ["comet-kernels", "comet-layer"]);
        assert_eq!(
            info.bench_examples,
            [("comet-kernels".to_string(), "gemm_bench".to_string())]
        );
    }

    #[test]
    fn the_real_workspace_metadata_marks_core_and_sched_cpu_only() {
        let out = cargo()
            .args(["metadata", "--no-deps", "--format-version", "1"])
            .output()
            .unwrap();
        assert!(out.status.success());
        let info = workspace_info(&String::from_utf8(out.stdout).unwrap()).unwrap();
        assert!(info.gpu_packages.contains("comet-kernels"));
        assert!(!info.gpu_packages.contains("comet-core"));
        assert!(!info.gpu_packages.contains("comet-sched"));
        assert!(!info.gpu_packages.contains("xtask"));
    }

    #[test]
    fn prepare_dir_replaces_only_bundles() {
        let dir = TestDir::new("bundle-dir");
        let b = dir.path().join("b");
        prepare_dir(&b).unwrap();
        std::fs::write(b.join("old"), "x").unwrap();
        prepare_dir(&b).unwrap();
        assert!(!b.join("old").exists());
        assert!(b.join(MARKER).exists());
        let other = dir.path().join("other");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("precious"), "x").unwrap();
        let err = prepare_dir(&other).unwrap_err().to_string();
        assert!(err.contains("refusing"), "{err}");
        assert!(other.join("precious").exists());
    }

    /// A fake bundle: two libtest-like test binaries (one fails), run.sh from the assets.
    fn fake_bundle(dir: &Path) {
        std::fs::create_dir_all(dir.join("tests")).unwrap();
        write_file(&dir.join("run.sh"), RUN_SH, true).unwrap();
        script(
            &dir.join("tests/comet-core.lib.comet_core"),
            "#!/usr/bin/env bash\necho \"args: $*\"\necho \"env: $NCCL_NVLS_ENABLE $NVSHMEM_DISABLE_NVLS $TORCH_SYMM_MEM_DISABLE_MULTICAST $COMET_CACHE_DIR\"\necho 'test result: ok. 5 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out'\n",
        );
        script(
            &dir.join("tests/comet-kernels.test.gemm"),
            "#!/usr/bin/env bash\necho 'test gemm_bf16 ... FAILED'\necho 'test result: FAILED. 3 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out'\nexit 101\n",
        );
        std::fs::write(dir.join("gpu-tests.txt"), "comet-kernels.test.gemm\n").unwrap();
    }

    fn run_sh(bundle: &Path, args: &[&str]) -> (i32, String) {
        run_sh_path(bundle, args, "/usr/bin:/bin")
    }

    fn run_sh_path(bundle: &Path, args: &[&str], path: &str) -> (i32, String) {
        let out = Command::new("bash")
            .arg(bundle.join("run.sh"))
            .args(args)
            .env_remove("OUT")
            .env_remove("CUDA_HOME")
            .env("PATH", path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code().unwrap_or(-1), text)
    }

    #[test]
    fn run_sh_runs_every_test_binary_and_fails_if_one_fails() {
        let dir = TestDir::new("runsh-test");
        let bundle = dir.path().join("bundle");
        fake_bundle(&bundle);
        let out = dir.path().join("out");
        let (rc, text) = run_sh(
            &bundle,
            &["test", "my_filter", "--out", out.to_str().unwrap()],
        );
        assert_eq!(rc, 1, "{text}");
        let summary = std::fs::read_to_string(out.join("summary.txt")).unwrap();
        assert!(summary.contains("2 step(s), 1 failed"), "{summary}");
        assert!(summary.contains("5 passed, 0 failed"), "{summary}");
        assert!(summary.contains("3 passed, 1 failed"), "{summary}");
        let log =
            std::fs::read_to_string(out.join("logs/test-comet-core.lib.comet_core.log")).unwrap();
        assert!(
            log.contains("args: --include-ignored --test-threads=1 my_filter"),
            "{log}"
        );
        assert!(log.contains("env: 0 1 1 "), "{log}");
        // The summary table comes last.
        assert!(text.trim_end().ends_with("1 failed"), "{text}");
        // --only picks binaries by name.
        let out2 = dir.path().join("out2");
        let (rc, text) = run_sh(
            &bundle,
            &[
                "test",
                "--only",
                "comet-core",
                "--out",
                out2.to_str().unwrap(),
            ],
        );
        assert_eq!(rc, 0, "{text}");
        assert!(text.contains("1 step(s), 0 failed"), "{text}");
    }

    #[test]
    fn run_sh_sanitize_without_compute_sanitizer_fails_plainly() {
        let dir = TestDir::new("runsh-san");
        let bundle = dir.path().join("bundle");
        fake_bundle(&bundle);
        let out = dir.path().join("out");
        let (rc, text) = run_sh(&bundle, &["sanitize", "--out", out.to_str().unwrap()]);
        // This machine has no compute-sanitizer on the restricted PATH... unless a CUDA
        // toolkit sits at a standard place: then the GPU test binary runs under it and fails.
        assert_eq!(rc, 1, "{text}");
        assert!(
            text.contains("compute-sanitizer not found")
                || text.contains("memcheck comet-kernels.test.gemm"),
            "{text}"
        );
        assert!(
            !text.contains("memcheck comet-core"),
            "CPU-only binary sanitized: {text}"
        );
    }

    #[test]
    fn run_sh_sanitizes_only_gpu_binaries_with_memcheck_and_racecheck() {
        let dir = TestDir::new("runsh-san2");
        let bundle = dir.path().join("bundle");
        fake_bundle(&bundle);
        // A stand-in compute-sanitizer: records its tool, runs the program, reports no error.
        let tools = dir.path().join("tools");
        std::fs::create_dir_all(&tools).unwrap();
        script(
            &tools.join("compute-sanitizer"),
            "#!/usr/bin/env bash\necho \"sanitizer $2\"\nshift 6\n\"$@\"\nrc=$?\necho '========= ERROR SUMMARY: 0 errors'\nexit $rc\n",
        );
        let out = dir.path().join("out");
        let path = format!("{}:/usr/bin:/bin", tools.display());
        let (rc, text) = run_sh_path(
            &bundle,
            &["sanitize", "--out", out.to_str().unwrap()],
            &path,
        );
        // The fake GPU test binary fails, so the step fails; both tools ran on it, only on it.
        assert_eq!(rc, 1, "{text}");
        let mem =
            std::fs::read_to_string(out.join("logs/memcheck-comet-kernels.test.gemm.log")).unwrap();
        assert!(
            mem.contains("sanitizer memcheck") && mem.contains("test result: FAILED"),
            "{mem}"
        );
        let race = std::fs::read_to_string(out.join("logs/racecheck-comet-kernels.test.gemm.log"))
            .unwrap();
        assert!(race.contains("sanitizer racecheck"), "{race}");
        assert!(
            !out.join("logs/memcheck-comet-core.lib.comet_core.log")
                .exists()
        );
        assert!(text.contains("2 step(s), 2 failed"), "{text}");
    }

    #[test]
    fn run_sh_packs_logs_and_rejects_unknown_commands() {
        let dir = TestDir::new("runsh-pack");
        let bundle = dir.path().join("bundle");
        fake_bundle(&bundle);
        let out = dir.path().join("out");
        let (rc, text) = run_sh(
            &bundle,
            &[
                "test",
                "--only",
                "core",
                "--pack",
                "--out",
                out.to_str().unwrap(),
            ],
        );
        assert_eq!(rc, 0, "{text}");
        assert!(out.join("logs.tar.gz").is_file());
        assert!(out.join("summary.txt").is_file());
        assert!(!out.join("logs").exists());
        let (rc, _) = run_sh(&bundle, &["frobnicate"]);
        assert_eq!(rc, 2);
    }
}
