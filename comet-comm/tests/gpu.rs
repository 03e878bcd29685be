//! GPU tests of comet-comm on 2 GPUs, each body in both process models:
//! `threads_*` (one process, one thread per rank) and `procs_*` (this test binary spawned
//! twice with the torchrun environment, one process per GPU).
//!
//! Run on a GPU host with `--include-ignored --test-threads=1`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use comet_comm::kernels::RowCopy;
use comet_comm::launch::{self, RankLaunch};
use comet_comm::signal::{ErrorWord, SignalPad};
use comet_comm::sources;
use comet_comm::{
    A2avConfig, AllToAllV, CommKernels, Communicator, DeviceBuffer, EnvOptions, Error,
    LocalOptions, P2pOp, PeerPath, ProcessModel, ReduceOp, Result, SymmetricBuffer, run_local,
};
use comet_kernels::{Defines, KernelCache};
use cudarc::driver::{CudaStream, LaunchConfig, PushKernelArg};
use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};

const WORLD: usize = 2;
const WORKER_VAR: &str = "COMET_COMM_TEST_WORKER";
const SELFTEST: &str = include_str!("../cuda/selftest.cu");

type Body = fn(&Communicator) -> Result<()>;

// ---------------------------------------------------------------- harness

fn in_threads(body: Body) {
    let opts = LocalOptions {
        devices: None,
        timeout: Duration::from_secs(60),
    };
    let t0 = Instant::now();
    let out = run_local(WORLD, &opts, |comm| body(&comm));
    eprintln!(
        "thread-per-rank run done in {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    if let Err(e) = out {
        panic!("thread-per-rank run failed: {e}");
    }
}

/// Runs `body` in two processes: this test binary again, filtered to `test_name`, with the
/// torchrun variables set. In the child (WORKER_VAR set) it bootstraps from the environment.
fn in_processes(test_name: &str, body: Body) {
    if launch::is_worker(WORKER_VAR) {
        let opts = EnvOptions {
            timeout: Duration::from_secs(60),
            device: None,
        };
        let run = launch::run_worker(&opts, |comm| {
            assert_eq!(comm.process_model(), ProcessModel::ProcessPerRank);
            body(comm)
        });
        if let Err(e) = run {
            panic!("worker failed: {e}");
        }
        return;
    }
    let outcome = RankLaunch::for_test(test_name, WORLD)
        .unwrap()
        .env(WORKER_VAR, "1")
        .time_limit(Duration::from_secs(240))
        .run()
        .unwrap();
    eprintln!(
        "{test_name}: both ranks done in {:.2} s",
        outcome.elapsed.as_secs_f64()
    );
    let failures = outcome.failures();
    if !failures.is_empty() {
        panic!("{}", failures.join("\n"));
    }
}

// ---------------------------------------------------------------- helpers

/// Every rank draws a fresh seed; all ranks learn all seeds (to rebuild each other's data).
fn seeds(comm: &Communicator) -> Result<Vec<u64>> {
    let mine: u64 = rand::rng().random();
    let all = comm.all_gather_bytes(&mine.to_le_bytes())?;
    Ok(all
        .iter()
        .map(|b| u64::from_le_bytes(b[..8].try_into().unwrap()))
        .collect())
}

fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; n];
    rng.fill_bytes(&mut v);
    v
}

fn ensure(cond: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(Error::Protocol(format!("check failed: {}", msg())))
    }
}

fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or((a.len() != b.len()).then_some(a.len().min(b.len())))
}

fn kernels(comm: &Communicator) -> Result<Arc<CommKernels>> {
    CommKernels::load(comm.context())
}

// ---------------------------------------------------------------- bodies

/// NCCL collectives through the communicator: all-reduce, all-gather, all-to-all, grouped
/// send/recv, barrier. Outputs poisoned first; inputs fresh random.
fn body_collectives(comm: &Communicator) -> Result<()> {
    let s = comm.stream();
    let (rank, world) = (comm.rank(), comm.world_size());
    let seeds = seeds(comm)?;
    let n = 4099usize;
    let data = |r: usize| -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seeds[r]);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    };
    // all-reduce (sum), into a separate poisoned buffer
    let send = DeviceBuffer::from_slice(s, &data(rank))?;
    let recv = DeviceBuffer::new(comm.context(), n * 4)?;
    recv.fill_bytes(s, 0xFF)?;
    comm.all_reduce::<f32>(&send, &recv, n, ReduceOp::Sum)?;
    comm.synchronize()?;
    let got: Vec<f32> = recv.download(s, 0, n)?;
    let all: Vec<Vec<f32>> = (0..world).map(data).collect();
    for i in 0..n {
        let want: f32 = all.iter().map(|v| v[i]).sum();
        ensure(
            got[i].is_finite() && (got[i] - want).abs() <= 1e-5 * (1.0 + want.abs()),
            || format!("all_reduce[{i}] = {} want {want}", got[i]),
        )?;
    }
    // all-gather (u32)
    let words: Vec<u32> = bytemuck::cast_slice::<f32, u32>(&data(rank)).to_vec();
    let send = DeviceBuffer::from_slice(s, &words)?;
    let recv = DeviceBuffer::new(comm.context(), n * 4 * world)?;
    recv.fill_bytes(s, 0xFF)?;
    comm.all_gather::<u32>(&send, &recv, n)?;
    comm.synchronize()?;
    let got: Vec<u32> = recv.download(s, 0, n * world)?;
    for (r, d) in all.iter().enumerate() {
        ensure(
            &got[r * n..(r + 1) * n] == bytemuck::cast_slice::<f32, u32>(d),
            || format!("all_gather block {r}"),
        )?;
    }
    // equal all-to-all: block d of rank r's send goes to rank d's block r
    let per = 1000usize;
    let mk = |r: usize| -> Vec<u32> {
        let mut rng = StdRng::seed_from_u64(seeds[r] ^ 0xA2A);
        (0..per * world).map(|_| rng.random()).collect()
    };
    let send = DeviceBuffer::from_slice(s, &mk(rank))?;
    let recv = DeviceBuffer::new(comm.context(), per * world * 4)?;
    recv.fill_bytes(s, 0xFF)?;
    comm.all_to_all::<u32>(&send, &recv, per)?;
    comm.synchronize()?;
    let got: Vec<u32> = recv.download(s, 0, per * world)?;
    for src in 0..world {
        let theirs = mk(src);
        ensure(
            got[src * per..(src + 1) * per] == theirs[rank * per..(rank + 1) * per],
            || format!("all_to_all block from {src}"),
        )?;
    }
    // grouped send/recv around a ring
    let next = (rank + 1) % world;
    let prev = (rank + world - 1) % world;
    let bytes = 12345usize;
    let send = DeviceBuffer::from_slice(s, &random_bytes(seeds[rank] ^ 0x5E, bytes))?;
    let recv = DeviceBuffer::new(comm.context(), bytes + 64)?;
    recv.fill_bytes(s, 0xFF)?;
    comm.group_p2p(&[
        P2pOp::Send {
            buf: &send,
            offset: 0,
            bytes,
            peer: next,
        },
        P2pOp::Recv {
            buf: &recv,
            offset: 64,
            bytes,
            peer: prev,
        },
    ])?;
    comm.synchronize()?;
    let got: Vec<u8> = recv.download(s, 64, bytes)?;
    ensure(got == random_bytes(seeds[prev] ^ 0x5E, bytes), || {
        "ring send/recv".into()
    })?;
    // bad arguments are errors, not crashes
    ensure(
        matches!(
            comm.all_reduce::<f32>(&send, &recv, 1 << 20, ReduceOp::Sum),
            Err(Error::InvalidArgument { .. })
        ),
        || "oversized all_reduce accepted".into(),
    )?;
    ensure(
        matches!(
            comm.group_p2p(&[P2pOp::Send {
                buf: &send,
                offset: 0,
                bytes: 16,
                peer: world
            }]),
            Err(Error::InvalidArgument { .. })
        ),
        || "peer out of range accepted".into(),
    )?;
    // symmetric buffers of different sizes are refused on every rank
    match SymmetricBuffer::new(comm, 4096 + 256 * rank) {
        Err(Error::SymmetricMismatch { .. }) => {}
        other => {
            return Err(Error::Protocol(format!(
                "expected SymmetricMismatch, got {:?}",
                other.map(|_| ())
            )));
        }
    }
    comm.barrier()
}

/// Peer reads and writes of symmetric buffers: push (NVLink stores) into the next rank's
/// region and pull (NVLink loads) from the previous rank's, contiguous and strided.
fn body_peer_rw(comm: &Communicator) -> Result<()> {
    let s = comm.stream();
    let (rank, world) = (comm.rank(), comm.world_size());
    let k = kernels(comm)?;
    let seeds = seeds(comm)?;
    let region = 8 << 20; // bytes per rank
    let sym = SymmetricBuffer::new(comm, region)?;
    let want_path = match comm.process_model() {
        ProcessModel::ThreadPerRank => PeerPath::PeerAccess,
        ProcessModel::ProcessPerRank => PeerPath::Ipc,
    };
    for (r, p) in sym.paths().iter().enumerate() {
        let ok = if r == rank {
            *p == PeerPath::Local
        } else {
            *p == want_path
        };
        ensure(ok, || format!("path to rank {r} is {p:?}"))?;
    }
    ensure(sym.unreachable_peers().is_empty(), || {
        format!("unreachable peers {:?}", sym.unreachable_peers())
    })?;
    let next = (rank + 1) % world;
    let prev = (rank + world - 1) % world;
    // copy specs, known to every rank (derived from rank 0's seed): (contiguous, strided)
    let spec = |r: usize| -> (RowCopy, RowCopy) {
        let mut rng = StdRng::seed_from_u64(seeds[0] ^ (r as u64 * 7919));
        let row_bytes = 16 * rng.random_range(1..=256usize);
        let rows = rng.random_range(1..=((region / 2 - 1024) / row_bytes).min(3000));
        let contiguous = RowCopy::contiguous(
            rows,
            row_bytes,
            16 * rng.random_range(0..64usize),
            16 * rng.random_range(0..64usize),
        );
        let rows2 = rng.random_range(1..=300usize);
        let strided = RowCopy {
            rows: rows2,
            row_bytes,
            src_offset: 16 * rng.random_range(0..16usize),
            src_stride: row_bytes + 16 * rng.random_range(0..8usize),
            dst_offset: region / 2 + 16 * rng.random_range(0..16usize),
            dst_stride: row_bytes + 16 * rng.random_range(1..8usize),
        };
        (contiguous, strided)
    };
    let src_len = region;
    let src_data = |r: usize| random_bytes(seeds[r] ^ 0x9A5, src_len);
    let src = DeviceBuffer::from_slice(s, &src_data(rank))?;
    // push: my rows into next's region (which it poisoned)
    sym.local().fill_bytes(s, 0xFF)?;
    comm.synchronize()?;
    comm.barrier()?;
    let (c1, c2) = spec(rank);
    k.push_rows(s, &src, &sym, next, &c1, None)?;
    k.push_rows(s, &src, &sym, next, &c2, Some(7))?;
    comm.synchronize()?;
    comm.barrier()?;
    let mine: Vec<u8> = sym.local().download(s, 0, region)?;
    let theirs = src_data(prev);
    let (p1, p2) = spec(prev);
    let mut expect = vec![0xFFu8; region];
    for c in [p1, p2] {
        for row in 0..c.rows {
            let so = c.src_offset + row * c.src_stride;
            let d = c.dst_offset + row * c.dst_stride;
            expect[d..d + c.row_bytes].copy_from_slice(&theirs[so..so + c.row_bytes]);
        }
    }
    ensure(mine == expect, || {
        format!(
            "pushed region differs at byte {:?}",
            first_diff(&mine, &expect)
        )
    })?;
    // pull: every rank fills its region with a pattern; pull prev's into a poisoned buffer
    let pattern = |r: usize| random_bytes(seeds[r] ^ 0x9011, region);
    sym.local().upload(s, 0, &pattern(rank))?;
    comm.barrier()?;
    let dst = DeviceBuffer::new(comm.context(), region)?;
    dst.fill_bytes(s, 0xFF)?;
    let whole = RowCopy::contiguous(region / 4096, 4096, 0, 0);
    k.pull_rows(s, &sym, prev, &dst, &whole, None)?;
    let strided = RowCopy {
        rows: 100,
        row_bytes: 1024,
        src_offset: 4096,
        src_stride: 4096,
        dst_offset: region - 100 * 2048,
        dst_stride: 2048,
    };
    k.pull_rows(s, &sym, prev, &dst, &strided, Some(3))?;
    comm.synchronize()?;
    let got: Vec<u8> = dst.download(s, 0, region)?;
    let mut expect = pattern(prev);
    for row in 0..strided.rows {
        let so = strided.src_offset + row * strided.src_stride;
        let d = strided.dst_offset + row * strided.dst_stride;
        let p = pattern(prev);
        expect[d..d + 1024].copy_from_slice(&p[so..so + 1024]);
    }
    ensure(got == expect, || {
        format!(
            "pulled data differs at byte {:?}",
            first_diff(&got, &expect)
        )
    })?;
    // misuse is an error
    let bad = RowCopy::contiguous(10, 24, 0, 0);
    ensure(
        matches!(
            k.push_rows(s, &src, &sym, next, &bad, None),
            Err(Error::InvalidArgument {
                name: "row_bytes",
                ..
            })
        ),
        || "24-byte rows accepted".into(),
    )?;
    let oob = RowCopy::contiguous(2, 16, region - 16, 0);
    ensure(
        matches!(
            k.pull_rows(s, &sym, prev, &dst, &oob, None),
            Err(Error::InvalidArgument { .. })
        ),
        || "out-of-bounds pull accepted".into(),
    )?;
    sym.free(comm)
}

/// Signal ordering under stress: 3 launches × 5000 epochs of ring-buffer ping-pong in both
/// directions at once, crossing the u64 wrap; data checked after every acquire.
fn body_signal_stress(comm: &Communicator) -> Result<()> {
    let s = comm.stream();
    let rank = comm.rank();
    let peer = rank ^ 1;
    if comm.world_size() != 2 {
        return Err(Error::Protocol(format!(
            "this test needs 2 ranks, not {}",
            comm.world_size()
        )));
    }
    let (slots, slot_words) = (4u32, 4096u32);
    let (launches, per_launch) = (3u64, 5000u32);
    let base = u64::MAX - 7000; // epochs cross 2^64 during the second launch
    let ring = SymmetricBuffer::new(comm, (slots * slot_words * 4) as usize)?;
    ring.local().fill_bytes(s, 0xFF)?;
    let pad = SignalPad::new(comm, slots as usize + 1, base)?;
    let err = ErrorWord::new(s)?;
    let mism = DeviceBuffer::new(comm.context(), 32)?;
    mism.fill_bytes(s, 0)?;
    let f = KernelCache::global().function(
        comm.context(),
        &sources::program("comet_comm_selftest.cu", SELFTEST),
        &Defines::new(),
        "comet_test_signal_stress",
    )?;
    comm.synchronize()?;
    comm.barrier()?;
    let peer_ring = ring.peer_ptr_or_err(peer)?;
    let my_ring = ring.local_ptr();
    let peer_pad = pad.peer_ptr(peer, 0)?;
    let my_pad = pad.local_ptr(0)?;
    let timeout_ns: u64 = 5_000_000_000;
    let (r32, p32) = (rank as u32, peer as u32);
    let (e_ptr, m_ptr) = (err.ptr(), mism.ptr());
    let t0 = Instant::now();
    for l in 0..launches {
        let first = base.wrapping_add(1 + l * per_launch as u64);
        let mut b = s.launch_builder(&f);
        b.arg(&peer_ring)
            .arg(&my_ring)
            .arg(&peer_pad)
            .arg(&my_pad)
            .arg(&slots)
            .arg(&slot_words)
            .arg(&first)
            .arg(&per_launch)
            .arg(&r32)
            .arg(&p32)
            .arg(&timeout_ns)
            .arg(&e_ptr)
            .arg(&m_ptr);
        // SAFETY: arguments match comet_test_signal_stress; all addresses are mapped.
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (2, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        }?;
    }
    comm.synchronize()?;
    let secs = t0.elapsed().as_secs_f64();
    err.take(s)?;
    let m: Vec<u32> = mism.download(s, 0, 5)?;
    ensure(m[0] == 0, || {
        format!(
            "{} mismatches; first at epoch(lo) {} word {}: got {:#x} want {:#x}",
            m[0], m[1], m[2], m[3], m[4]
        )
    })?;
    let last = base.wrapping_add(launches * per_launch as u64);
    ensure(last < base, || "the epochs did not wrap".into())?;
    // The peer's consumer acknowledges our last epochs after our kernel may have ended:
    // the barrier orders after both ranks' kernels.
    comm.barrier()?;
    let words = pad.read_local(s)?;
    ensure(words[slots as usize] == last, || {
        format!("ack word {} want {last}", words[slots as usize])
    })?;
    for sl in 0..slots as u64 {
        // the last epoch that used slot `sl`
        let e = (0..slots as u64)
            .map(|d| last.wrapping_sub(d))
            .find(|e| e % slots as u64 == sl)
            .unwrap();
        ensure(words[sl as usize] == e, || {
            format!("slot {sl} word {} want {e}", words[sl as usize])
        })?;
    }
    eprintln!(
        "rank {rank}: {} epochs of {} KiB ping-pong in {secs:.3} s ({:.2} us/epoch)",
        launches * per_launch as u64,
        slot_words * 4 / 1024,
        secs * 1e6 / (launches * per_launch as u64) as f64
    );
    comm.barrier()?;
    ring.free(comm)?;
    Ok(())
}

/// The device all-to-all-v against NCCL's grouped send/recv on random counts (zeros, all to
/// one rank, self only, random), crossing the epoch wrap; then a capacity overflow (an
/// error on every rank) and recovery.
fn body_a2av_vs_nccl(comm: &Communicator) -> Result<()> {
    let s = comm.stream();
    let (rank, world) = (comm.rank(), comm.world_size());
    let k = kernels(comm)?;
    let seeds = seeds(comm)?;
    let mut rng0 = StdRng::seed_from_u64(seeds[0]);
    let row_bytes = 16 * rng0.random_range(1..=160usize);
    let max_pair = 1500usize;
    let send_cap = max_pair * world;
    let recv_cap = max_pair * world;
    // fewer iterations under compute-sanitizer (COMET_COMM_TEST_ITERS)
    let iters: usize = std::env::var("COMET_COMM_TEST_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(14)
        .max(4);
    let mut cfg = A2avConfig::new(row_bytes, send_cap, recv_cap);
    cfg.epoch_base = u64::MAX - 5;
    // longer device waits under compute-sanitizer (fewer iterations requested)
    cfg.timeout = Duration::from_secs(if iters < 14 { 30 } else { 5 });
    let mut a2a = AllToAllV::new(comm, k.clone(), cfg)?;
    let send = DeviceBuffer::new(comm.context(), send_cap * row_bytes)?;
    let counts_dev = DeviceBuffer::new(comm.context(), 4 * world)?;
    let nccl_recv = DeviceBuffer::new(comm.context(), recv_cap * row_bytes)?;
    for it in 0..iters {
        // counts[src][dst], identical on all ranks
        let mut rng = StdRng::seed_from_u64(seeds[0] ^ ((it as u64 + 1) * 0x51ED));
        let counts: Vec<Vec<usize>> = (0..world)
            .map(|src| {
                (0..world)
                    .map(|dst| match it {
                        0 => 0,
                        1 => {
                            if dst == 0 {
                                max_pair
                            } else {
                                0
                            }
                        }
                        2 => {
                            if dst == src {
                                777.min(max_pair)
                            } else {
                                0
                            }
                        }
                        _ => {
                            if rng.random_bool(0.25) {
                                0
                            } else {
                                rng.random_range(1..=max_pair)
                            }
                        }
                    })
                    .collect()
            })
            .collect();
        let mine = &counts[rank];
        let n_send: usize = mine.iter().sum();
        let data = random_bytes(rand::rng().random(), n_send * row_bytes);
        if !data.is_empty() {
            send.upload(s, 0, &data)?;
        }
        let c32: Vec<u32> = mine.iter().map(|&c| c as u32).collect();
        counts_dev.upload(s, 0, &c32)?;
        a2a.recv_buffer().local().fill_bytes(s, 0xFF)?;
        nccl_recv.fill_bytes(s, 0xFF)?;
        a2a.launch(s, &send, &counts_dev)?;
        // NCCL reference
        let recv_counts: Vec<usize> = (0..world).map(|src| counts[src][rank]).collect();
        let excl = |v: &[usize]| -> Vec<usize> {
            v.iter()
                .scan(0, |acc, &c| {
                    let o = *acc;
                    *acc += c;
                    Some(o)
                })
                .collect()
        };
        let sc: Vec<usize> = mine.iter().map(|c| c * row_bytes).collect();
        let rc: Vec<usize> = recv_counts.iter().map(|c| c * row_bytes).collect();
        comm.all_to_all_v::<u8>(&send, &sc, &excl(&sc), &nccl_recv, &rc, &excl(&rc))?;
        a2a.finish(s)?;
        comm.synchronize()?;
        let total: usize = recv_counts.iter().sum();
        let got: Vec<u8> = a2a
            .recv_buffer()
            .local()
            .download(s, 0, total * row_bytes)?;
        let want: Vec<u8> = nccl_recv.download(s, 0, total * row_bytes)?;
        ensure(got == want, || {
            format!(
                "iteration {it}: a2av differs from NCCL at byte {:?} (row {} bytes)",
                first_diff(&got, &want),
                row_bytes
            )
        })?;
        let (lc, lo) = a2a.read_recv_layout(s)?;
        let want_off = excl(&recv_counts);
        ensure(
            lc.iter()
                .map(|&c| c as usize)
                .eq(recv_counts.iter().copied()),
            || format!("iteration {it}: layout counts {lc:?} want {recv_counts:?}"),
        )?;
        ensure(
            lo[..world]
                .iter()
                .map(|&c| c as usize)
                .eq(want_off.iter().copied())
                && lo[world] as usize == total,
            || format!("iteration {it}: layout offsets {lo:?}"),
        )?;
        comm.barrier()?;
    }
    ensure(a2a.epoch() < 100 || iters < 6, || {
        format!("epochs did not wrap: {}", a2a.epoch())
    })?;
    // capacity overflow: rank 0 asks to send more rows than any rank may receive
    let mut over = vec![0u32; world];
    if rank == 0 {
        over[1 % world] = (recv_cap + 1) as u32;
    }
    counts_dev.upload(s, 0, &over)?;
    a2a.launch(s, &send, &counts_dev)?;
    match a2a.finish(s) {
        Err(Error::CapacityExceeded {
            rank: r,
            requested,
            capacity,
            ..
        }) => ensure(
            r == rank && capacity == recv_cap as u64 && requested > capacity,
            || format!("overflow reported as rank {r}, {requested} > {capacity}"),
        )?,
        other => {
            return Err(Error::Protocol(format!(
                "expected CapacityExceeded, got {other:?}"
            )));
        }
    }
    // recovery: a normal call works afterwards
    let ones = vec![1u32; world];
    counts_dev.upload(s, 0, &ones)?;
    let data = random_bytes(seeds[rank] ^ 0xEC, world * row_bytes);
    send.upload(s, 0, &data)?;
    a2a.launch(s, &send, &counts_dev)?;
    a2a.finish(s)?;
    comm.barrier()?;
    let got: Vec<u8> = a2a
        .recv_buffer()
        .local()
        .download(s, 0, world * row_bytes)?;
    for src in 0..world {
        let theirs = random_bytes(seeds[src] ^ 0xEC, world * row_bytes);
        ensure(
            got[src * row_bytes..(src + 1) * row_bytes]
                == theirs[rank * row_bytes..(rank + 1) * row_bytes],
            || format!("recovery row from {src}"),
        )?;
    }
    comm.barrier()
}

/// A peer that never signals: the bounded device wait ends and the host gets an error
/// naming this rank, the peer and the signal, in bounded time; the all-to-all-v likewise.
fn body_timeout(comm: &Communicator) -> Result<()> {
    let s = comm.stream();
    let (rank, world) = (comm.rank(), comm.world_size());
    let peer = (rank + 1) % world;
    let k = kernels(comm)?;
    let pad = SignalPad::new(comm, 4, 100)?;
    let err = ErrorWord::new(s)?;
    // Nobody sets signal 2: both ranks wait for it and time out.
    let t0 = Instant::now();
    k.signal_wait(
        s,
        &pad,
        2,
        1,
        101,
        Duration::from_millis(200),
        &err,
        rank,
        Some(peer),
    )?;
    comm.synchronize()?;
    let took = t0.elapsed();
    match err.take(s) {
        Err(Error::SignalTimeout {
            rank: r,
            peer: p,
            signal: 2,
            expected: 101,
            seen: 100,
        }) if r == rank && p == Some(peer) => {}
        other => {
            return Err(Error::Protocol(format!(
                "expected SignalTimeout, got {other:?}"
            )));
        }
    }
    ensure(
        took >= Duration::from_millis(190) && took < Duration::from_secs(5),
        || format!("wait took {took:?}"),
    )?;
    let msg = Error::SignalTimeout {
        rank,
        peer: Some(peer),
        signal: 2,
        expected: 101,
        seen: 100,
    }
    .to_string();
    ensure(
        msg.contains(&format!("rank {rank}")) && msg.contains("signal 2"),
        || msg.clone(),
    )?;
    // The word was cleared by take(); a signal that does come passes.
    comm.barrier()?;
    k.signal_set(s, &pad, peer, 3, 101)?;
    k.signal_wait(
        s,
        &pad,
        3,
        1,
        101,
        Duration::from_secs(5),
        &err,
        rank,
        Some((rank + world - 1) % world),
    )?;
    comm.synchronize()?;
    err.take(s)?;
    comm.barrier()?;
    // The all-to-all-v with a rank that never joins: the other rank's call fails in time.
    let mut cfg = A2avConfig::new(64, 16, 16 * world);
    cfg.timeout = Duration::from_millis(300);
    let mut a2a = AllToAllV::new(comm, k.clone(), cfg)?;
    if rank == 1 {
        let send = DeviceBuffer::new(comm.context(), 64 * 16)?;
        let counts = DeviceBuffer::from_slice(s, &vec![1u32; world])?;
        let t0 = Instant::now();
        a2a.launch(s, &send, &counts)?;
        match a2a.finish(s) {
            Err(Error::SignalTimeout {
                rank: 1,
                peer: Some(0),
                signal: 0,
                ..
            }) => {}
            other => {
                return Err(Error::Protocol(format!(
                    "expected SignalTimeout from rank 0's counts, got {other:?}"
                )));
            }
        }
        ensure(t0.elapsed() < Duration::from_secs(5), || {
            format!("a2av timeout took {:?}", t0.elapsed())
        })?;
    }
    comm.barrier()?;
    drop(a2a);
    comm.barrier()
}

// ---------------------------------------------------------------- tests

macro_rules! both_models {
    ($($body:ident => $threads:ident, $procs:ident;)*) => {$(
        #[test]
        #[ignore = "needs a CUDA GPU"]
        fn $threads() {
            in_threads($body);
        }

        #[test]
        #[ignore = "needs a CUDA GPU"]
        fn $procs() {
            in_processes(stringify!($procs), $body);
        }
    )*};
}

both_models! {
    body_collectives => threads_collectives, procs_collectives;
    body_peer_rw => threads_peer_rw, procs_peer_rw;
    body_signal_stress => threads_signal_stress, procs_signal_stress;
    body_a2av_vs_nccl => threads_a2av_vs_nccl, procs_a2av_vs_nccl;
    body_timeout => threads_timeout, procs_timeout;
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn local_launch_errors_and_single_rank_world() {
    let n = comet_comm::memory::device_count().unwrap();
    match run_local(n + 1, &LocalOptions::default(), |_| Ok(())) {
        Err(Error::NotEnoughDevices { needed, found }) => assert_eq!((needed, found), (n + 1, n)),
        other => panic!("expected NotEnoughDevices, got {:?}", other.map(|_| ())),
    }
    let opts = LocalOptions {
        devices: Some(vec![0]),
        ..Default::default()
    };
    assert!(matches!(
        run_local(2, &opts, |_| Ok(())),
        Err(Error::InvalidArgument { .. })
    ));
    let out = run_local(1, &LocalOptions::default(), |comm| {
        comm.barrier()?;
        let s: &Arc<CudaStream> = comm.stream();
        let b = DeviceBuffer::from_slice(s, &[3.5f32, -1.0])?;
        comm.all_reduce::<f32>(&b, &b, 2, ReduceOp::Max)?;
        comm.synchronize()?;
        b.download::<f32>(s, 0, 2)
    })
    .unwrap();
    assert_eq!(out, vec![vec![3.5f32, -1.0]]);
}
