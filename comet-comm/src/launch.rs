//! One process per rank on this host, torchrun-style: what the multi-process tests (and
//! tools) use to run a program, usually the test binary itself, as `W` ranks that bootstrap
//! with [`Communicator::from_env`].
//!
//! [`RankLaunch`] starts the processes with `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `LOCAL_WORLD_SIZE`, `MASTER_ADDR=127.0.0.1` and a `MASTER_PORT` that was free a moment
//! before (plus any variables added), collects their output, kills them all at a time limit,
//! and reports each rank's exit status and output. A rank counts as successful when it exits
//! 0 and printed [`worker_ok_line`], which [`run_worker`] prints after its body returned
//! `Ok`. Plain Rust: nothing here loads CUDA or NCCL (only [`run_worker`] bootstraps).
//!
//! ```no_run
//! # fn body(_: &comet_comm::Communicator) -> comet_comm::Result<()> { Ok(()) }
//! use comet_comm::launch::{self, RankLaunch};
//! const WORKER: &str = "MY_TEST_WORKER";
//! if launch::is_worker(WORKER) {
//!     launch::run_worker(&comet_comm::EnvOptions::default(), body).unwrap();
//! } else {
//!     let outcome = RankLaunch::for_test("my_test", 2).unwrap().env(WORKER, "1").run().unwrap();
//!     assert!(outcome.failures().is_empty(), "{}", outcome.failures().join("\n"));
//! }
//! ```

use std::ffi::OsString;
use std::fmt::Display;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::comm::{Communicator, EnvOptions};
use crate::env;
use crate::error::{Error, Result};

/// Default wall-clock limit of a launch.
pub const DEFAULT_LIMIT: Duration = Duration::from_secs(240);
/// How often the launcher polls its children.
const POLL: Duration = Duration::from_millis(20);

/// The line a worker prints on stdout once its body succeeded.
pub fn worker_ok_line(rank: usize) -> String {
    format!("COMET-WORKER-OK rank={rank}")
}

/// libtest arguments that run exactly the test `test_name` of a test binary, ignored or not,
/// with its output shown, on one thread.
pub fn test_filter_args(test_name: &str) -> Vec<String> {
    [
        test_name,
        "--exact",
        "--include-ignored",
        "--nocapture",
        "--test-threads=1",
    ]
    .map(String::from)
    .to_vec()
}

/// Whether this process was started as a worker: the variable `var` is set.
pub fn is_worker(var: &str) -> bool {
    std::env::var_os(var).is_some()
}

/// The worker side: bootstraps from the torchrun environment ([`Communicator::from_env`]),
/// runs `body` and, when it succeeds, prints [`worker_ok_line`] on stdout. Returns the rank;
/// a failing body becomes [`Error::RankFailed`].
pub fn run_worker<E: Display>(
    opts: &EnvOptions,
    body: impl FnOnce(&Communicator) -> std::result::Result<(), E>,
) -> Result<usize> {
    let comm = Communicator::from_env(opts)?;
    let rank = comm.rank();
    body(&comm).map_err(|e| Error::RankFailed {
        rank,
        message: e.to_string(),
    })?;
    println!("{}", worker_ok_line(rank));
    Ok(rank)
}

/// A launch of `world` processes of one program on this host.
#[derive(Debug, Clone)]
pub struct RankLaunch {
    program: PathBuf,
    args: Vec<OsString>,
    world: usize,
    env: Vec<(OsString, OsString)>,
    limit: Duration,
}

impl RankLaunch {
    /// `world` processes of `program`, with no arguments, within [`DEFAULT_LIMIT`].
    pub fn new(program: impl Into<PathBuf>, world: usize) -> Self {
        RankLaunch {
            program: program.into(),
            args: Vec::new(),
            world,
            env: Vec::new(),
            limit: DEFAULT_LIMIT,
        }
    }

    /// `world` processes of the running test binary, each running only `test_name`
    /// ([`test_filter_args`]).
    pub fn for_test(test_name: &str, world: usize) -> Result<Self> {
        let exe = std::env::current_exe().map_err(|e| Error::io("finding the test binary", e))?;
        Ok(Self::new(exe, world).args(test_filter_args(test_name)))
    }

    /// Adds arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets a variable in every rank (on top of the inherited environment and the torchrun
    /// variables, which it cannot override).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Kills all ranks once `limit` has passed since they started.
    pub fn time_limit(mut self, limit: Duration) -> Self {
        self.limit = limit;
        self
    }

    /// The torchrun variables of `rank` with rendezvous port `port`.
    pub fn rank_env(&self, rank: usize, port: u16) -> [(&'static str, String); 6] {
        [
            (env::RANK, rank.to_string()),
            (env::WORLD_SIZE, self.world.to_string()),
            (env::LOCAL_RANK, rank.to_string()),
            (env::LOCAL_WORLD_SIZE, self.world.to_string()),
            (env::MASTER_ADDR, "127.0.0.1".to_string()),
            (env::MASTER_PORT, port.to_string()),
        ]
    }

    /// Starts the ranks, waits for all of them (killing them all at the time limit) and
    /// returns what each did. Fails only when a process cannot be started or waited for.
    pub fn run(&self) -> Result<LaunchOutcome> {
        if self.world == 0 {
            return Err(Error::invalid("world", 0, "at least 1 rank"));
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| Error::io("finding a free port on 127.0.0.1", e))?
            .port();
        let mut children: Vec<Child> = Vec::with_capacity(self.world);
        for rank in 0..self.world {
            let started = Command::new(&self.program)
                .args(&self.args)
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .envs(self.rank_env(rank, port))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn();
            match started {
                Ok(c) => children.push(c),
                Err(e) => {
                    kill_all(&mut children);
                    return Err(Error::io(
                        format!("starting rank {rank} ({})", self.program.display()),
                        e,
                    ));
                }
            }
        }
        // Drain every pipe on its own thread so that a chatty child cannot block.
        let drains: Vec<(JoinHandle<String>, JoinHandle<String>)> = children
            .iter_mut()
            .map(|c| (drain(c.stdout.take()), drain(c.stderr.take())))
            .collect();
        let t0 = Instant::now();
        let mut status: Vec<Option<ExitStatus>> = vec![None; self.world];
        let mut killed = false;
        while status.iter().any(Option::is_none) {
            for (r, c) in children.iter_mut().enumerate() {
                if status[r].is_none() {
                    match c.try_wait() {
                        Ok(s) => status[r] = s,
                        Err(e) => {
                            kill_all(&mut children);
                            return Err(Error::io(format!("waiting for rank {r}"), e));
                        }
                    }
                }
            }
            if !killed && t0.elapsed() > self.limit {
                kill_all(&mut children);
                killed = true;
            }
            std::thread::sleep(POLL);
        }
        let elapsed = t0.elapsed();
        let ranks = drains
            .into_iter()
            .zip(status)
            .enumerate()
            .map(|(rank, ((out, err), status))| RankOutput {
                rank,
                status,
                stdout: out.join().unwrap_or_default(),
                stderr: err.join().unwrap_or_default(),
            })
            .collect();
        Ok(LaunchOutcome {
            ranks,
            killed,
            limit: self.limit,
            elapsed,
        })
    }
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut p) = pipe {
            // A read error only shortens the collected output.
            let _ = p.read_to_string(&mut s);
        }
        s
    })
}

fn kill_all(children: &mut [Child]) {
    for c in children.iter_mut() {
        // An already-exited child cannot be killed; that is fine.
        let _ = c.kill();
    }
}

/// What one rank's process did.
#[derive(Debug, Clone)]
pub struct RankOutput {
    /// The rank.
    pub rank: usize,
    /// Its exit status.
    pub status: Option<ExitStatus>,
    /// Everything it wrote on stdout.
    pub stdout: String,
    /// Everything it wrote on stderr.
    pub stderr: String,
}

impl RankOutput {
    /// Exited 0 and printed [`worker_ok_line`].
    pub fn succeeded(&self) -> bool {
        self.status.is_some_and(|s| s.success()) && self.stdout.contains(&worker_ok_line(self.rank))
    }
}

/// The result of [`RankLaunch::run`].
#[derive(Debug, Clone)]
pub struct LaunchOutcome {
    /// Every rank, in rank order.
    pub ranks: Vec<RankOutput>,
    /// Whether the ranks were killed at the time limit.
    pub killed: bool,
    /// The time limit.
    pub limit: Duration,
    /// Time from the start of the ranks to the exit of the last.
    pub elapsed: Duration,
}

impl LaunchOutcome {
    /// One report per rank that failed (or every rank when they were killed), with its exit
    /// status and output; empty when all succeeded.
    pub fn failures(&self) -> Vec<String> {
        self.ranks
            .iter()
            .filter(|r| self.killed || !r.succeeded())
            .map(|r| {
                format!(
                    "rank {} ({:?}, killed at the {:?} limit: {}):\n--- stdout\n{}\n--- stderr\n{}",
                    r.rank, r.status, self.limit, self.killed, r.stdout, r.stderr
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_filter_selects_one_test() {
        assert_eq!(
            test_filter_args("procs_x"),
            vec![
                "procs_x",
                "--exact",
                "--include-ignored",
                "--nocapture",
                "--test-threads=1"
            ]
        );
        assert_eq!(worker_ok_line(3), "COMET-WORKER-OK rank=3");
    }

    #[test]
    fn rank_env_is_what_dist_env_reads() {
        let l = RankLaunch::new("/bin/true", 4);
        let vars = l.rank_env(2, 29500);
        let d = crate::DistEnv::from_lookup(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| Ok(v.clone()))
        })
        .unwrap();
        assert_eq!((d.rank, d.world_size, d.local_rank), (2, 4, 2));
        assert_eq!((d.local_world_size, d.master_port), (4, 29500));
        assert_eq!(d.master_addr, "127.0.0.1");
    }

    /// Runs `sh` as the ranks: each prints its variables and the OK line when told to.
    #[test]
    fn ranks_get_their_environment_and_output_is_collected() {
        let script = r#"echo "r=$RANK w=$WORLD_SIZE l=$LOCAL_RANK x=$EXTRA"; echo err >&2; [ "$RANK" = "$OK_RANK" ] && echo "COMET-WORKER-OK rank=$RANK"; exit 0"#;
        let out = RankLaunch::new("/bin/sh", 3)
            .args(["-c", script])
            .env("EXTRA", "yes")
            .env("OK_RANK", "1")
            .run()
            .unwrap();
        assert!(!out.killed);
        assert_eq!(out.ranks.len(), 3);
        for r in &out.ranks {
            assert!(
                r.stdout
                    .starts_with(&format!("r={} w=3 l={} x=yes", r.rank, r.rank)),
                "{r:?}"
            );
            assert_eq!(r.stderr.trim(), "err");
            assert!(r.status.is_some_and(|s| s.success()));
            assert_eq!(r.succeeded(), r.rank == 1, "{r:?}");
        }
        let f = out.failures();
        assert_eq!(f.len(), 2);
        assert!(
            f[0].starts_with("rank 0 ") && f[1].starts_with("rank 2 "),
            "{f:?}"
        );
    }

    #[test]
    fn a_failing_rank_is_reported_with_its_output() {
        let script = r#"if [ "$RANK" = 0 ]; then echo "COMET-WORKER-OK rank=0"; else echo boom >&2; exit 3; fi"#;
        let out = RankLaunch::new("/bin/sh", 2)
            .args(["-c", script])
            .run()
            .unwrap();
        assert!(out.ranks[0].succeeded());
        assert!(!out.ranks[1].succeeded());
        assert_eq!(out.ranks[1].status.and_then(|s| s.code()), Some(3));
        let f = out.failures();
        assert_eq!(f.len(), 1);
        assert!(
            f[0].contains("boom") && f[0].starts_with("rank 1 "),
            "{f:?}"
        );
    }

    #[test]
    fn ranks_are_killed_at_the_time_limit() {
        let t0 = Instant::now();
        let out = RankLaunch::new("/bin/sh", 2)
            .args(["-c", "echo COMET-WORKER-OK rank=$RANK; exec sleep 30"])
            .time_limit(Duration::from_millis(300))
            .run()
            .unwrap();
        assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
        assert!(out.killed);
        assert!(out.ranks.iter().all(|r| !r.succeeded()));
        // Killed ranks count as failed even if they printed the OK line.
        assert_eq!(out.failures().len(), 2);
        assert!(out.failures()[0].contains("killed at the 300ms limit: true"));
    }

    #[test]
    fn bad_launches_are_errors() {
        let e = RankLaunch::new("/bin/true", 0).run().unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument { name: "world", .. }),
            "{e}"
        );
        let e = RankLaunch::new("/nonexistent/comet-program", 2)
            .run()
            .unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
        assert!(e.to_string().contains("rank 0"), "{e}");
    }
}
