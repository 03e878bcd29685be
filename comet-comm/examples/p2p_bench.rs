//! Peer bandwidth microbenchmark: comet-comm's push/pull kernels and device all-to-all-v
//! against the copy engine (cuMemcpyPeerAsync, cuMemcpyDtoDAsync on a peer address) and
//! NCCL's all-to-all, 1 MiB .. 1 GiB, on 2 GPUs of one process (one thread per rank).
//!
//! `bytes` is what one rank sends to its peer; GB/s = bytes / time (10^9 B/s), time = the
//! slower rank's median over `--iters` samples (CUDA events, after warm-up; each sample
//! repeats small transfers to at least 64 MiB). `bidir`: both ranks send at once (what an
//! all-to-all does); `unidir`: only rank 0 sends.
//!
//! `cargo run --release --example p2p_bench -- --out bench.json`

use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use clap::Parser;
use comet_comm::kernels::RowCopy;
use comet_comm::{
    A2avConfig, AllToAllV, CommKernels, Communicator, DeviceBuffer, LocalOptions, Result,
    SymmetricBuffer, run_local,
};
use cudarc::driver::{CudaContext, CudaStream, sys};
use rand::{Rng, SeedableRng};
use serde::Serialize;

#[derive(Parser, Debug, Clone)]
#[command(about = "comet-comm peer bandwidth: push/pull kernels vs copy engine vs NCCL")]
struct Args {
    /// Smallest transfer per rank, MiB (power of two steps up to --max-mib).
    #[arg(long, default_value_t = 1)]
    min_mib: usize,
    /// Largest transfer per rank, MiB.
    #[arg(long, default_value_t = 1024)]
    max_mib: usize,
    /// Timed samples per point (median reported).
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Warm-up samples per point.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Grid sizes for the push/pull sweep at 256 MiB and up (full grid always measured).
    #[arg(long, value_delimiter = ',', default_value = "16,32,66,132,264")]
    sweep_blocks: Vec<u32>,
    /// Commit hash to record.
    #[arg(long, default_value = "unknown")]
    commit: String,
    /// JSON output path.
    #[arg(long, default_value = "p2p_bench.json")]
    out: String,
}

#[derive(Serialize, Clone, Debug)]
struct Point {
    method: String,
    mode: String,
    bytes: usize,
    blocks: Option<u32>,
    median_ms: f64,
    gbps: f64,
    per_rank_median_ms: Vec<f64>,
}

#[derive(Serialize, Debug)]
struct Summary {
    bytes: usize,
    mode: String,
    copy_engine_gbps: f64,
    push_gbps: f64,
    pull_gbps: f64,
    push_ratio: f64,
    pull_ratio: f64,
    nccl_all_to_all_gbps: Option<f64>,
    a2av_gbps: Option<f64>,
}

#[derive(Serialize, Debug)]
struct Report {
    what: String,
    commit: String,
    date_unix: u64,
    gpu: String,
    world: usize,
    nccl_version: i32,
    nccl_native_all_to_all: bool,
    sm_count: u32,
    full_copy_blocks: u32,
    iters: usize,
    warmup: usize,
    local_dtod_gbps: f64,
    points: Vec<Point>,
    summary: Vec<Summary>,
    target: String,
    target_met: bool,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Shared between the rank threads: a host barrier and the per-rank medians of a point.
struct Shared {
    barrier: Barrier,
    medians: Mutex<Vec<Vec<f64>>>,
    points: Mutex<Vec<Point>>,
}

struct Rank<'a> {
    comm: &'a Communicator,
    shared: &'a Shared,
    args: &'a Args,
    stream: Arc<CudaStream>,
}

impl Rank<'_> {
    /// Times `op` (called `reps` times per sample) on this rank; every rank must call it.
    fn time<F>(
        &self,
        method: &str,
        mode: &str,
        bytes: usize,
        blocks: Option<u32>,
        active: bool,
        mut op: F,
    ) -> Result<()>
    where
        F: FnMut() -> Result<()>,
    {
        let reps = if bytes >= (64 << 20) {
            1
        } else {
            ((64 << 20) / bytes).clamp(1, 64)
        };
        let ctx = self.comm.context();
        let start = ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        let end = ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        let mut samples = Vec::with_capacity(self.args.iters);
        for i in 0..self.args.warmup + self.args.iters {
            self.shared.barrier.wait();
            start.record(&self.stream)?;
            if active {
                for _ in 0..reps {
                    op()?;
                }
            }
            end.record(&self.stream)?;
            self.comm.wait(&self.stream, "a benchmark sample")?;
            if i >= self.args.warmup {
                samples.push(start.elapsed_ms(&end)? as f64 / reps as f64);
            }
        }
        let m = median(&mut samples);
        self.shared.barrier.wait();
        self.shared.medians.lock().unwrap()[self.comm.rank()].push(m);
        self.shared.barrier.wait();
        if self.comm.rank() == 0 {
            let mut med = self.shared.medians.lock().unwrap();
            let per_rank: Vec<f64> = med
                .iter_mut()
                .map(|v| v.pop().unwrap_or(f64::NAN))
                .collect();
            let active_ms: Vec<f64> = if mode == "unidir" {
                vec![per_rank[0]]
            } else {
                per_rank.clone()
            };
            let worst = active_ms.iter().cloned().fold(0.0, f64::max);
            let p = Point {
                method: method.into(),
                mode: mode.into(),
                bytes,
                blocks,
                median_ms: worst,
                gbps: bytes as f64 / (worst * 1e-3) / 1e9,
                per_rank_median_ms: per_rank,
            };
            eprintln!(
                "{:>10} {:>6} {:>11} B blocks {:>5} {:>9.4} ms {:>8.1} GB/s",
                p.method,
                p.mode,
                p.bytes,
                blocks.map_or("-".to_string(), |b| b.to_string()),
                p.median_ms,
                p.gbps
            );
            self.shared.points.lock().unwrap().push(p);
        }
        self.shared.barrier.wait();
        Ok(())
    }
}

fn dtod(dst: u64, src: u64, bytes: usize, s: &CudaStream) -> Result<()> {
    // SAFETY: both ranges are live allocations (local or peer-mapped) of >= bytes.
    let r = unsafe { sys::cuMemcpyDtoDAsync_v2(dst, src, bytes, s.cu_stream()) };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(comet_comm::Error::Cuda {
            op: "cuMemcpyDtoDAsync_v2",
            source: cudarc::driver::DriverError(r),
        });
    }
    Ok(())
}

fn rank_main(comm: Communicator, shared: &Shared, args: &Args) -> Result<()> {
    let rank = comm.rank();
    let world = comm.world_size();
    let peer = (rank + 1) % world;
    let stream = comm.stream().clone();
    let k = CommKernels::load(comm.context())?;
    let max = args.max_mib << 20;
    let sizes: Vec<usize> = std::iter::successors(Some(args.min_mib << 20), |&b| {
        (b * 2 <= max).then_some(b * 2)
    })
    .collect();
    // Buffers: random data (never zeros), peer-visible regions from cuMemAlloc.
    let src = DeviceBuffer::new(comm.context(), max)?;
    let chunk = 64 << 20;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xC0FFEE ^ rank as u64);
    let mut host = vec![0u8; chunk.min(max)];
    rng.fill_bytes(&mut host);
    src.upload(&stream, 0, &host)?;
    let mut off = host.len();
    while off < max {
        let n = host.len().min(max - off);
        dtod(src.ptr() + off as u64, src.ptr(), n, &stream)?;
        off += n;
    }
    let dst = DeviceBuffer::new(comm.context(), max)?;
    dst.fill_bytes(&stream, 0xFF)?;
    let sym = SymmetricBuffer::new(&comm, max)?;
    sym.local().fill_bytes(&stream, 0xFF)?;
    comm.synchronize()?;
    let peer_ptr = sym.peer_ptr_or_err(peer)?;
    // The peer's primary context, for cuMemcpyPeerAsync.
    let peer_ctx = CudaContext::new(peer)?;
    comm.context().bind_to_thread()?;
    let r = Rank {
        comm: &comm,
        shared,
        args,
        stream: stream.clone(),
    };

    // Local device-to-device copy as a reference ceiling (bytes read + written).
    r.time("local_dtod", "local", max / 2, None, true, || {
        dtod(dst.ptr(), src.ptr(), max / 2, &stream)
    })?;

    for &bytes in &sizes {
        for mode in ["bidir", "unidir"] {
            let active = mode == "bidir" || rank == 0;
            r.time("ce_peer", mode, bytes, None, active, || {
                // SAFETY: src is local, the peer region is peer-mapped; both >= bytes.
                let res = unsafe {
                    sys::cuMemcpyPeerAsync(
                        peer_ptr,
                        peer_ctx.cu_ctx(),
                        src.ptr(),
                        comm.context().cu_ctx(),
                        bytes,
                        stream.cu_stream(),
                    )
                };
                if res != sys::CUresult::CUDA_SUCCESS {
                    return Err(comet_comm::Error::Cuda {
                        op: "cuMemcpyPeerAsync",
                        source: cudarc::driver::DriverError(res),
                    });
                }
                Ok(())
            })?;
            r.time("ce_dtod", mode, bytes, None, active, || {
                dtod(peer_ptr, src.ptr(), bytes, &stream)
            })?;
            let rc = RowCopy::contiguous(bytes / 4096, 4096, 0, 0);
            r.time("push", mode, bytes, None, active, || {
                k.push_rows(&stream, &src, &sym, peer, &rc, None)
            })?;
            r.time("pull", mode, bytes, None, active, || {
                k.pull_rows(&stream, &sym, peer, &dst, &rc, None)
            })?;
            if bytes >= (256 << 20) {
                for &b in &args.sweep_blocks {
                    r.time("push", mode, bytes, Some(b), active, || {
                        k.push_rows(&stream, &src, &sym, peer, &rc, Some(b))
                    })?;
                    r.time("pull", mode, bytes, Some(b), active, || {
                        k.pull_rows(&stream, &sym, peer, &dst, &rc, Some(b))
                    })?;
                }
            }
        }
    }
    // Check that the last push landed: the peer's region starts with our random bytes.
    comm.synchronize()?;
    let rc = RowCopy::contiguous(max / 4096, 4096, 0, 0);
    k.push_rows(&stream, &src, &sym, peer, &rc, None)?;
    comm.synchronize()?;
    comm.barrier()?;
    let head: Vec<u8> = sym.local().download(&stream, 0, 1 << 20)?;
    let mut prng = rand::rngs::StdRng::seed_from_u64(0xC0FFEE ^ peer as u64);
    let mut expect = vec![0u8; 1 << 20];
    prng.fill_bytes(&mut expect);
    if head != expect {
        return Err(comet_comm::Error::Protocol(format!(
            "rank {rank}: pushed data did not arrive intact"
        )));
    }
    drop(sym);
    drop(dst);
    drop(src);

    // NCCL all-to-all and the device all-to-all-v: `bytes` to the peer (and `bytes` to self).
    let send = DeviceBuffer::new(comm.context(), 2 * max)?;
    let mut o = 0;
    while o < 2 * max {
        let n = host.len().min(2 * max - o);
        host.rotate_left(1);
        send.upload(&stream, o, &host[..n])?;
        o += n;
    }
    let recv = DeviceBuffer::new(comm.context(), 2 * max)?;
    let row = 4096usize;
    let mut a2a = AllToAllV::new(
        &comm,
        k.clone(),
        A2avConfig {
            timeout: Duration::from_secs(10),
            ..A2avConfig::new(row, 2 * max / row, 2 * max / row)
        },
    )?;
    let counts_buf = DeviceBuffer::new(comm.context(), 4 * world)?;
    for &bytes in &sizes {
        r.time("nccl_a2a", "bidir", bytes, None, true, || {
            // SAFETY: send/recv hold 2 * max >= world * bytes bytes.
            unsafe { comm.all_to_all_raw(send.ptr(), recv.ptr(), bytes, &stream) }
        })?;
        let counts = vec![(bytes / row) as u32; world];
        counts_buf.upload(&stream, 0, &counts)?;
        r.time("a2av", "bidir", bytes, None, true, || {
            a2a.launch(&stream, &send, &counts_buf)
        })?;
        a2a.finish(&stream)?;
    }
    comm.barrier()
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if args.min_mib == 0
        || args.max_mib < args.min_mib
        || !args.min_mib.is_power_of_two()
        || !args.max_mib.is_power_of_two()
    {
        return Err("--min-mib and --max-mib must be powers of two with min <= max".into());
    }
    let world = 2;
    let shared = Shared {
        barrier: Barrier::new(world),
        medians: Mutex::new(vec![Vec::new(); world]),
        points: Mutex::new(Vec::new()),
    };
    let opts = LocalOptions {
        devices: None,
        timeout: Duration::from_secs(120),
    };
    let info = run_local(world, &opts, |comm| {
        let gpu = comm.context().name()?;
        let k = CommKernels::load(comm.context())?;
        let meta = (gpu, k.sm_count(), k.max_copy_blocks());
        rank_main(comm, &shared, &args)?;
        Ok(meta)
    })?;
    let (gpu, sm_count, full_blocks) = info[0].clone();
    let points = shared.points.into_inner().unwrap();
    let find = |m: &str, mode: &str, bytes: usize| {
        points
            .iter()
            .find(|p| p.method == m && p.mode == mode && p.bytes == bytes && p.blocks.is_none())
            .map(|p| p.gbps)
    };
    let mut summary = Vec::new();
    let mut met = true;
    let sizes: Vec<usize> = {
        let mut v: Vec<usize> = points
            .iter()
            .filter(|p| p.method == "push")
            .map(|p| p.bytes)
            .collect();
        v.dedup();
        v
    };
    for &bytes in &sizes {
        for mode in ["bidir", "unidir"] {
            let ce = find("ce_peer", mode, bytes)
                .unwrap_or(0.0)
                .max(find("ce_dtod", mode, bytes).unwrap_or(0.0));
            let push = find("push", mode, bytes).unwrap_or(0.0);
            let pull = find("pull", mode, bytes).unwrap_or(0.0);
            let s = Summary {
                bytes,
                mode: mode.into(),
                copy_engine_gbps: ce,
                push_gbps: push,
                pull_gbps: pull,
                push_ratio: push / ce,
                pull_ratio: pull / ce,
                nccl_all_to_all_gbps: if mode == "bidir" {
                    find("nccl_a2a", mode, bytes)
                } else {
                    None
                },
                a2av_gbps: if mode == "bidir" {
                    find("a2av", mode, bytes)
                } else {
                    None
                },
            };
            if bytes >= (256 << 20) && (s.push_ratio < 0.8 || s.pull_ratio < 0.8) {
                met = false;
            }
            summary.push(s);
        }
    }
    let local = points
        .iter()
        .find(|p| p.method == "local_dtod")
        .map_or(0.0, |p| 2.0 * p.gbps);
    let report = Report {
        what: "comet-comm p2p_bench: GB/s = bytes sent by one rank to its peer / slower rank's median time".into(),
        commit: args.commit.clone(),
        date_unix: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        gpu,
        world,
        nccl_version: comet_comm::comm::nccl_version()?,
        nccl_native_all_to_all: Communicator::has_native_all_to_all(),
        sm_count,
        full_copy_blocks: full_blocks,
        iters: args.iters,
        warmup: args.warmup,
        local_dtod_gbps: local,
        points,
        summary,
        target: "push and pull >= 80% of the copy engine's peer bandwidth (max of cuMemcpyPeerAsync, cuMemcpyDtoDAsync) at >= 256 MiB, both modes".into(),
        target_met: met,
    };
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)?;
    println!(
        "{:>11} {:>6} {:>9} {:>9} {:>9} {:>6} {:>6} {:>9} {:>9}",
        "bytes", "mode", "CE GB/s", "push", "pull", "push%", "pull%", "NCCL a2a", "a2av"
    );
    for s in &report.summary {
        println!(
            "{:>11} {:>6} {:>9.1} {:>9.1} {:>9.1} {:>5.0}% {:>5.0}% {:>9} {:>9}",
            s.bytes,
            s.mode,
            s.copy_engine_gbps,
            s.push_gbps,
            s.pull_gbps,
            100.0 * s.push_ratio,
            100.0 * s.pull_ratio,
            s.nccl_all_to_all_gbps
                .map_or("-".into(), |v| format!("{v:.1}")),
            s.a2av_gbps.map_or("-".into(), |v| format!("{v:.1}"))
        );
    }
    println!(
        "local DtoD {:.0} GB/s (read+write); target met: {}",
        report.local_dtod_gbps, report.target_met
    );
    Ok(())
}
