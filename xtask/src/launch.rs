//! Multi-process launcher: one process per GPU with the torchrun environment
//! (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`).
//!
//! Protocol with the launched program (implemented by `comet-bench run`):
//! - it is started as `<program> <args..> --json <scratch>/rank<R>.json` and writes its
//!   rank report there before exiting 0;
//! - a stdout line `COMET_PROGRESS <done> <total> [label]` (from rank 0) moves the progress
//!   bar; every other line is echoed as `[rank R] ...` and kept in `<scratch>/rank<R>.log`.
//!
//! When one rank fails (or the time limit passes) the others are killed, and the error
//! names the rank, its exit status and the tail of its log.

use crate::util::tail_lines;
use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The environment every launched rank gets on top of the torchrun variables (GPU-HOSTS.md:
/// NVLink multicast must stay off on the shared hosts).
pub const SAFE_ENV: &[(&str, &str)] = &[
    ("NCCL_NVLS_ENABLE", "0"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
];

/// What to launch.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// The program each rank runs.
    pub program: PathBuf,
    /// Arguments before the per-rank `--json PATH`.
    pub args: Vec<OsString>,
    /// Number of ranks (processes), one per local GPU.
    pub world: usize,
    /// Directory for `rank<R>.json` and `rank<R>.log`.
    pub scratch: PathBuf,
    /// Wall-clock limit for the whole launch.
    pub timeout: Duration,
    /// Whether to draw a progress bar (off in tests and when stderr is not a terminal).
    pub progress: bool,
}

/// The torchrun-style environment of one rank on a single host.
pub fn rank_env(rank: usize, world: usize, port: u16) -> Vec<(String, String)> {
    let mut env = vec![
        ("RANK".to_string(), rank.to_string()),
        ("WORLD_SIZE".to_string(), world.to_string()),
        ("LOCAL_RANK".to_string(), rank.to_string()),
        ("LOCAL_WORLD_SIZE".to_string(), world.to_string()),
        ("MASTER_ADDR".to_string(), "127.0.0.1".to_string()),
        ("MASTER_PORT".to_string(), port.to_string()),
    ];
    env.extend(SAFE_ENV.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

/// A TCP port that was free a moment ago on 127.0.0.1 (for `MASTER_PORT`).
pub fn free_port() -> Result<u16> {
    let listener =
        std::net::TcpListener::bind(("127.0.0.1", 0)).context("no free TCP port on 127.0.0.1")?;
    Ok(listener.local_addr()?.port())
}

/// A parsed `COMET_PROGRESS done total label` line.
pub fn parse_progress(line: &str) -> Option<(u64, u64, String)> {
    let rest = line.strip_prefix("COMET_PROGRESS ")?;
    let mut it = rest.splitn(3, ' ');
    let done = it.next()?.parse().ok()?;
    let total = it.next()?.parse().ok()?;
    let label = it.next().unwrap_or("").to_string();
    Some((done, total, label))
}

enum Event {
    Line { rank: usize, line: String },
}

/// Launch all ranks, wait for them, and return the paths of their JSON reports (rank order).
pub fn launch(spec: &LaunchSpec) -> Result<Vec<PathBuf>> {
    if spec.world == 0 {
        bail!("cannot launch 0 ranks");
    }
    std::fs::create_dir_all(&spec.scratch)
        .with_context(|| format!("cannot create {}", spec.scratch.display()))?;
    let port = free_port()?;
    let json_paths: Vec<PathBuf> = (0..spec.world)
        .map(|r| spec.scratch.join(format!("rank{r}.json")))
        .collect();
    let log_paths: Vec<PathBuf> = (0..spec.world)
        .map(|r| spec.scratch.join(format!("rank{r}.log")))
        .collect();
    for p in &json_paths {
        // A stale report from an earlier run must not pass for this run's.
        if p.exists() {
            std::fs::remove_file(p).with_context(|| format!("cannot remove {}", p.display()))?;
        }
    }

    let bar = if spec.progress {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    } else {
        ProgressBar::hidden()
    };

    let (tx, rx) = mpsc::channel::<Event>();
    let mut children: Vec<Option<Child>> = Vec::new();
    let mut logs = Vec::new();
    let mut readers: Vec<std::thread::JoinHandle<()>> = Vec::new();
    for rank in 0..spec.world {
        let mut cmd = Command::new(&spec.program);
        cmd.args(&spec.args)
            .arg("--json")
            .arg(&json_paths[rank])
            .envs(rank_env(rank, spec.world, port))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Each rank leads its own process group, so a kill reaches whatever it started.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(err) => {
                kill_all(&mut children);
                return Err(err).with_context(|| {
                    format!("cannot start rank {rank}: {}", spec.program.display())
                });
            }
        };
        logs.push(
            std::fs::File::create(&log_paths[rank])
                .with_context(|| format!("cannot create {}", log_paths[rank].display()))?,
        );
        if let Some(out) = child.stdout.take() {
            readers.push(spawn_reader(rank, out, tx.clone()));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(spawn_reader(rank, err, tx.clone()));
        }
        children.push(Some(child));
    }
    drop(tx);

    let start = Instant::now();
    let mut failure: Option<String> = None;
    let mut exited = 0;
    while exited < spec.world {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Event::Line { rank, line }) => {
                let _ = writeln!(logs[rank], "{line}");
                match parse_progress(&line) {
                    Some((done, total, label)) if rank == 0 => {
                        bar.set_length(total);
                        bar.set_position(done);
                        bar.set_message(label);
                    }
                    Some(_) => {}
                    None => bar.println(format!("[rank {rank}] {line}")),
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        for (rank, slot) in children.iter_mut().enumerate() {
            let Some(child) = slot.as_mut() else {
                continue;
            };
            if let Some(status) = child.try_wait()? {
                *slot = None;
                exited += 1;
                if !status.success() && failure.is_none() {
                    failure = Some(format!("rank {rank} exited with {status}"));
                }
            }
        }
        if failure.is_none() && start.elapsed() > spec.timeout {
            failure = Some(format!(
                "time limit of {} s passed with {} of {} ranks still running",
                spec.timeout.as_secs(),
                spec.world - exited,
                spec.world
            ));
        }
        if failure.is_some() {
            kill_all(&mut children);
            break;
        }
    }
    // Drain what the readers still hold so the logs are complete; the readers end when
    // the last writer of each pipe is gone (bounded wait: a stray grandchild may hold one).
    drop(readers);
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(Event::Line { rank, line }) => {
                let _ = writeln!(logs[rank], "{line}");
            }
            Err(_) => break,
        }
    }
    bar.finish_and_clear();

    if let Some(why) = failure {
        let mut msg = format!("launch of {} failed: {why}", spec.program.display());
        for (rank, log) in log_paths.iter().enumerate() {
            let tail = tail_lines(log, 15);
            if !tail.is_empty() {
                msg.push_str(&format!(
                    "\n--- rank {rank} log ({}), last lines:\n{tail}",
                    log.display()
                ));
            }
        }
        bail!(msg);
    }
    for (rank, p) in json_paths.iter().enumerate() {
        if !p.is_file() {
            bail!(
                "rank {rank} exited 0 but wrote no report at {} (log: {})",
                p.display(),
                log_paths[rank].display()
            );
        }
    }
    Ok(json_paths)
}

fn spawn_reader(
    rank: usize,
    stream: impl std::io::Read + Send + 'static,
    tx: mpsc::Sender<Event>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send(Event::Line { rank, line }).is_err() {
                break;
            }
        }
    })
}

/// Kill every rank still running (its process group, which it leads, then the rank itself
/// by handle) and reap it.
fn kill_all(children: &mut [Option<Child>]) {
    for child in children.iter_mut().flatten() {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = child.kill();
        let _ = child.wait();
    }
    for c in children.iter_mut() {
        *c = None;
    }
}

/// Where the scratch directory for one launch goes by default.
pub fn default_scratch(base: &Path) -> PathBuf {
    base.join(format!(
        "comet-bench-run-{}-{}",
        crate::util::unix_now(),
        std::process::id()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::testdir::{TestDir, script};

    /// A stand-in for `comet-bench run`: writes its environment as the rank report.
    const FAKE_RANK: &str = r#"#!/usr/bin/env bash
set -eu
json=""
while [ $# -gt 0 ]; do
  case "$1" in --json) json="$2"; shift 2;; *) shift;; esac
done
echo "COMET_PROGRESS 1 2 warm-up"
echo "hello from $RANK"
echo "COMET_PROGRESS 2 2 done"
printf '{"rank":%s,"world_size":%s,"local_rank":%s,"local_world_size":%s,"master":"%s:%s","nvls":"%s"}\n' \
  "$RANK" "$WORLD_SIZE" "$LOCAL_RANK" "$LOCAL_WORLD_SIZE" "$MASTER_ADDR" "$MASTER_PORT" "$NCCL_NVLS_ENABLE" > "$json"
"#;

    fn spec(dir: &TestDir, program: PathBuf, world: usize, timeout_s: u64) -> LaunchSpec {
        LaunchSpec {
            program,
            args: vec!["run".into(), "--preset".into(), "mixtral".into()],
            world,
            scratch: dir.path().join("scratch"),
            timeout: Duration::from_secs(timeout_s),
            progress: false,
        }
    }

    #[test]
    fn every_rank_gets_the_torchrun_environment() {
        let dir = TestDir::new("launch-ok");
        let prog = dir.path().join("fake-bench");
        script(&prog, FAKE_RANK);
        let paths = launch(&spec(&dir, prog, 3, 60)).unwrap();
        assert_eq!(paths.len(), 3);
        let mut master = None;
        for (r, p) in paths.iter().enumerate() {
            let v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
            assert_eq!(v["rank"], r);
            assert_eq!(v["local_rank"], r);
            assert_eq!(v["world_size"], 3);
            assert_eq!(v["local_world_size"], 3);
            assert_eq!(v["nvls"], "0");
            let m = v["master"].as_str().unwrap().to_string();
            assert!(m.starts_with("127.0.0.1:"));
            // All ranks must agree on the rendezvous address.
            assert_eq!(master.get_or_insert(m.clone()), &m);
            let log = std::fs::read_to_string(p.with_extension("log")).unwrap();
            assert!(log.contains(&format!("hello from {r}")), "{log}");
        }
    }

    #[test]
    fn a_failing_rank_stops_the_others_and_is_named() {
        let dir = TestDir::new("launch-fail");
        let prog = dir.path().join("fake-bench");
        script(
            &prog,
            "#!/usr/bin/env bash\nif [ \"$RANK\" = 1 ]; then echo 'boom: bad shape' >&2; exit 3; fi\nsleep 30\n",
        );
        let start = Instant::now();
        let err = launch(&spec(&dir, prog, 2, 60)).unwrap_err().to_string();
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "ranks not killed"
        );
        assert!(err.contains("rank 1 exited"), "{err}");
        assert!(err.contains("boom: bad shape"), "{err}");
    }

    #[test]
    fn the_time_limit_kills_hung_ranks() {
        let dir = TestDir::new("launch-timeout");
        let prog = dir.path().join("fake-bench");
        script(&prog, "#!/usr/bin/env bash\nsleep 30\n");
        let start = Instant::now();
        let err = launch(&spec(&dir, prog, 2, 1)).unwrap_err().to_string();
        assert!(start.elapsed() < Duration::from_secs(20));
        assert!(err.contains("time limit of 1 s"), "{err}");
    }

    #[test]
    fn a_rank_without_a_report_is_an_error() {
        let dir = TestDir::new("launch-noreport");
        let prog = dir.path().join("fake-bench");
        script(&prog, "#!/usr/bin/env bash\nexit 0\n");
        let err = launch(&spec(&dir, prog, 1, 60)).unwrap_err().to_string();
        assert!(err.contains("rank 0 exited 0 but wrote no report"), "{err}");
    }

    #[test]
    fn progress_lines_parse() {
        assert_eq!(
            parse_progress("COMET_PROGRESS 3 10 mixtral sequential"),
            Some((3, 10, "mixtral sequential".to_string()))
        );
        assert_eq!(
            parse_progress("COMET_PROGRESS 3 10"),
            Some((3, 10, String::new()))
        );
        assert_eq!(parse_progress("COMET_PROGRESS x 10"), None);
        assert_eq!(parse_progress("progress 3 10"), None);
    }

    #[test]
    fn rank_env_is_torchrun_compatible() {
        let env = rank_env(1, 2, 29500);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("RANK"), Some("1"));
        assert_eq!(get("WORLD_SIZE"), Some("2"));
        assert_eq!(get("LOCAL_RANK"), Some("1"));
        assert_eq!(get("LOCAL_WORLD_SIZE"), Some("2"));
        assert_eq!(get("MASTER_ADDR"), Some("127.0.0.1"));
        assert_eq!(get("MASTER_PORT"), Some("29500"));
        assert_eq!(get("NVSHMEM_DISABLE_NVLS"), Some("1"));
        assert_eq!(get("TORCH_SYMM_MEM_DISABLE_MULTICAST"), Some("1"));
    }
}
