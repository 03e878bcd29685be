//! A discrete-event simulator of one fused layer on one rank under a [`CostModel`].
//!
//! The persistent kernel has `sms` blocks: `n_comm` communication blocks and
//! `sms − n_comm` GEMM blocks (`n_comm = 0`: the copy engine moves the data and every SM
//! computes).
//! - **Copies** (layer 0: the schedule's chunks in arrival order; layer 1: per column group
//!   and owner, the partial sums, then the owner's final sum of the group) are taken by the
//!   next free communication block. Copies in flight share bandwidth: each remote copy
//!   moves `min(per_block, link / active_remote)`, each local one
//!   `min(local_per_block, hbm / active_local)`; the simulation advances from one copy
//!   completion to the next (rates change only there). The copy engine instead runs the
//!   copies one after another at its own rate plus a fixed latency each.
//! - **GEMM blocks** take slots `b, b + G, b + 2G, …` of the tile order (the engine's static
//!   persistent assignment) and run each tile for the FLOP time of a full tile; a layer-0
//!   tile first waits for its flags (release time + flag latency), so a block stalls on a
//!   tile whose data has not arrived even if later tiles could run.
//!
//! Both layers assume the ranks are symmetric (the other ranks pull, push and reduce at the
//! same pace as this one), and ignore contention between copies and GEMM for HBM.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::layer0::Layer0Schedule;
use crate::layer1::{Layer1Schedule, ReducePlan};
use crate::model::CostModel;

/// The sizes layer 0's simulation needs besides the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer0Work {
    /// Reduction length of GEMM0 (`H`); also the row width of the copies.
    pub hidden: usize,
    /// Accumulator columns per output column (2 for SwiGLU, whose tile computes gate and
    /// up columns; 1 for GeLU).
    pub acc_factor: usize,
    /// Bytes per element (2 for bf16).
    pub elem_bytes: usize,
}

/// The sizes layer 1's simulation needs besides the schedule and reduce plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer1Work {
    /// Reduction length of GEMM1 (`F`).
    pub ffn: usize,
    /// Bytes per element of the partial sums and output.
    pub elem_bytes: usize,
    /// Rows of this rank's combine buffer (as token owner).
    pub owner_rows: usize,
    /// Tokens of this rank (rows of `y`).
    pub tokens: usize,
}

/// What a simulation predicts (times in µs from the launch).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimReport {
    /// Communication blocks simulated.
    pub n_comm: usize,
    /// The layer's time: launch plus the later of GEMM and communication.
    pub total_us: f64,
    /// When the last GEMM tile finished.
    pub gemm_end_us: f64,
    /// When the last copy finished.
    pub comm_end_us: f64,
    /// The GEMM alone on every SM with nothing to wait for (launch included): the floor.
    pub gemm_only_us: f64,
    /// Sum over GEMM blocks of time spent waiting for flags.
    pub gemm_stall_us: f64,
    /// Bytes moved over NVLink by this rank.
    pub remote_bytes: f64,
    /// Bytes copied locally.
    pub local_bytes: f64,
}

/// One copy: bytes, remote or local, earliest start, and the earlier copies
/// (`after..index`) that must have finished before it starts.
#[derive(Debug, Clone, Copy)]
struct Copy {
    bytes: f64,
    remote: bool,
    ready_us: f64,
    after: usize,
}

/// Runs copies in queue order on `n_comm` blocks (or the copy engine for 0); returns each
/// copy's completion time. A block takes the next copy when free, waiting for its
/// `ready_us` (head of line: copies start in queue order).
fn run_copies(copies: &[Copy], n_comm: usize, model: &CostModel, t0: f64) -> Vec<f64> {
    let mut done = vec![t0; copies.len()];
    if n_comm == 0 {
        let mut t = t0;
        for (k, c) in copies.iter().enumerate() {
            if c.bytes <= 0.0 {
                done[k] = t.max(c.ready_us);
                continue;
            }
            let rate = if c.remote {
                model.copy_engine_gbps
            } else {
                model.hbm_gbps
            } * 1e3;
            t = t.max(c.ready_us) + model.copy_engine_latency_us + c.bytes / rate;
            done[k] = t;
        }
        return done;
    }
    // (copy index, remaining bytes)
    let mut active: Vec<(usize, f64)> = Vec::with_capacity(n_comm);
    let mut finished = vec![false; copies.len()];
    let mut next = 0usize;
    let mut t = t0;
    loop {
        // Start copies on free blocks (in order; one not yet startable holds the queue).
        let deps_done =
            |k: usize, finished: &[bool]| finished[copies[k].after.min(k)..k].iter().all(|&f| f);
        while active.len() < n_comm
            && next < copies.len()
            && copies[next].ready_us <= t
            && deps_done(next, &finished)
        {
            if copies[next].bytes <= 0.0 {
                done[next] = t;
                finished[next] = true;
            } else {
                active.push((next, copies[next].bytes));
            }
            next += 1;
        }
        if active.is_empty() {
            if next >= copies.len() {
                break;
            }
            // Nothing in flight, so every earlier copy is finished: only the ready time
            // can hold the next one.
            t = t.max(copies[next].ready_us);
            continue;
        }
        let n_remote = active.iter().filter(|(k, _)| copies[*k].remote).count();
        let n_local = active.len() - n_remote;
        let rate = |k: usize| {
            if copies[k].remote {
                model.remote_rate(n_remote)
            } else {
                model.local_rate(n_local)
            }
        };
        let mut dt = active
            .iter()
            .map(|&(k, rem)| rem / rate(k))
            .fold(f64::INFINITY, f64::min);
        // A copy that becomes ready may start on a free block before the next completion.
        if active.len() < n_comm && next < copies.len() && deps_done(next, &finished) {
            dt = dt.min((copies[next].ready_us - t).max(0.0));
        }
        t += dt;
        let rates: Vec<f64> = active.iter().map(|&(k, _)| rate(k)).collect();
        for ((k, rem), r) in active.iter_mut().zip(rates) {
            *rem -= r * dt;
            if *rem <= 1e-9 * copies[*k].bytes.max(1.0) {
                done[*k] = t;
                finished[*k] = true;
            }
        }
        active.retain(|&(k, rem)| rem > 1e-9 * copies[k].bytes.max(1.0));
    }
    done
}

/// GEMM blocks over `tiles` (ready time, duration) with the static slot assignment;
/// returns (end, total stall).
fn run_gemm(tiles: &[(f64, f64)], blocks: usize, t0: f64) -> (f64, f64) {
    let mut end = t0;
    let mut stall = 0.0;
    for b in 0..blocks.max(1) {
        let mut t = t0;
        for &(ready, dur) in tiles.iter().skip(b).step_by(blocks.max(1)) {
            if ready > t {
                stall += ready - t;
                t = ready;
            }
            t += dur;
        }
        end = end.max(t);
    }
    (end, stall)
}

fn check(model: &CostModel, n_comm: usize, elem_bytes: usize) -> Result<()> {
    model.validate()?;
    model.check_n_comm(n_comm)?;
    if elem_bytes == 0 {
        return Err(Error::ZeroSize { name: "elem_bytes" });
    }
    Ok(())
}

/// Simulates layer 0 of rank `s.rank` with `n_comm` communication blocks.
///
/// # Errors
/// The model's errors ([`CostModel::validate`], [`Error::NCommTooLarge`]);
/// [`Error::ZeroSize`] for 0 element bytes, hidden or accumulator factor.
pub fn simulate_layer0(
    s: &Layer0Schedule,
    work: &Layer0Work,
    n_comm: usize,
    model: &CostModel,
) -> Result<SimReport> {
    check(model, n_comm, work.elem_bytes)?;
    if work.hidden == 0 || work.acc_factor == 0 {
        return Err(Error::ZeroSize {
            name: "hidden / acc_factor",
        });
    }
    s.check_indices()?;
    let t0 = model.launch_us;
    let row_bytes = (work.hidden * work.elem_bytes) as f64;
    let copies: Vec<Copy> = s
        .copy_order
        .iter()
        .map(|&f| {
            let c = &s.flags[f as usize];
            Copy {
                bytes: c.rows.len() as f64 * row_bytes,
                remote: c.source != s.rank,
                ready_us: t0,
                after: usize::MAX,
            }
        })
        .collect();
    let done = run_copies(&copies, n_comm, model, t0);
    let mut release = vec![t0; s.flags.len()];
    for (&f, &t) in s.copy_order.iter().zip(&done) {
        release[f as usize] = t + model.flag_latency_us;
    }
    let tile = s.options.tile;
    let tile_us = model.tile_us(
        2.0 * tile.bm() as f64 * (tile.bn() * work.acc_factor) as f64 * work.hidden as f64,
    );
    let tiles: Vec<(f64, f64)> = s
        .tiles
        .iter()
        .map(|t| {
            let ready = t
                .flags
                .iter()
                .map(|&f| release[f as usize])
                .fold(t0, f64::max);
            (ready, tile_us)
        })
        .collect();
    let blocks = if n_comm == 0 {
        model.sms
    } else {
        model.sms - n_comm
    };
    let (gemm_end, stall) = run_gemm(&tiles, blocks, t0);
    let free: Vec<(f64, f64)> = tiles.iter().map(|&(_, d)| (t0, d)).collect();
    let (gemm_only, _) = run_gemm(&free, model.sms, t0);
    let comm_end = done.iter().copied().fold(t0, f64::max);
    Ok(SimReport {
        n_comm,
        total_us: gemm_end.max(comm_end),
        gemm_end_us: gemm_end,
        comm_end_us: comm_end,
        gemm_only_us: gemm_only,
        gemm_stall_us: stall,
        remote_bytes: copies.iter().filter(|c| c.remote).map(|c| c.bytes).sum(),
        local_bytes: copies.iter().filter(|c| !c.remote).map(|c| c.bytes).sum(),
    })
}

/// Simulates layer 1 of rank `s.rank` with `n_comm` communication blocks: GEMM1 in the
/// schedule's order, then per column group (once its tiles are done) one copy per owner
/// of that owner's partial sums, then the owner's final sum of the group (a local copy of
/// `owner_rows + tokens` rows of the group's width, assuming the other ranks deliver
/// their partials as fast as this one). The reads of GEMM1's rows are pipelined with the
/// writes and not charged. `n_comm = 0`: the copy engine cannot reduce, so the reduce runs
/// as a second kernel on every SM after the GEMM (the unfused baseline).
///
/// # Errors
/// As [`simulate_layer0`]; [`Error::Mismatch`] if the reduce plan is another rank's.
pub fn simulate_layer1(
    s: &Layer1Schedule,
    reduce: &ReducePlan,
    work: &Layer1Work,
    n_comm: usize,
    model: &CostModel,
) -> Result<SimReport> {
    check(model, n_comm, work.elem_bytes)?;
    if work.ffn == 0 {
        return Err(Error::ZeroSize { name: "ffn" });
    }
    if reduce.rank != s.rank {
        return Err(Error::Mismatch {
            what: "reduce plan rank (must be the schedule's)",
            expected: s.rank,
            got: reduce.rank,
        });
    }
    s.check_indices()?;
    let t0 = model.launch_us;
    let tile = s.options.tile;
    let tile_us = model.tile_us(2.0 * tile.bm() as f64 * tile.bn() as f64 * work.ffn as f64);
    let blocks = if n_comm == 0 {
        model.sms
    } else {
        model.sms - n_comm
    };
    // Tile end times under the static assignment (no waits in layer 1's GEMM).
    let mut end = vec![t0; s.tiles.len()];
    for b in 0..blocks {
        let mut t = t0;
        for k in (b..s.tiles.len()).step_by(blocks) {
            t += tile_us;
            end[k] = t;
        }
    }
    let gemm_end = end.iter().copied().fold(t0, f64::max);
    let free: Vec<(f64, f64)> = s.tiles.iter().map(|_| (t0, tile_us)).collect();
    let (gemm_only, _) = run_gemm(&free, model.sms, t0);

    // Items per owner (the same for every group).
    let world = reduce.items.iter().map(|i| i.owner + 1).max().unwrap_or(0);
    let mut per_owner = vec![0usize; world.max(s.rank + 1)];
    for it in &reduce.items {
        per_owner[it.owner] += 1;
    }
    let owners: Vec<usize> = (0..per_owner.len())
        .map(|i| (s.rank + i) % per_owner.len())
        .collect();
    let mut copies: Vec<Copy> = Vec::new();
    for grp in &s.groups {
        let ready = grp.slots.clone().map(|k| end[k]).fold(t0, f64::max) + model.flag_latency_us;
        let width = (grp.cols.len() * work.elem_bytes) as f64;
        let first = copies.len();
        for &o in &owners {
            if per_owner[o] > 0 {
                copies.push(Copy {
                    bytes: per_owner[o] as f64 * width,
                    remote: o != s.rank,
                    ready_us: ready,
                    after: usize::MAX,
                });
            }
        }
        // The owner's sum of the group starts once the group's partials are in (this
        // rank's sends stand for every rank's).
        copies.push(Copy {
            bytes: (work.owner_rows + work.tokens) as f64 * width,
            remote: false,
            ready_us: ready,
            after: first,
        });
    }
    let done = if n_comm == 0 {
        // The copy engine cannot reduce: without communication blocks the reduce runs as a
        // second kernel on every SM once the GEMM is done (no overlap).
        let after = gemm_end + model.launch_us;
        for c in &mut copies {
            c.ready_us = c.ready_us.max(after);
        }
        run_copies(&copies, model.sms, model, after)
    } else {
        run_copies(&copies, n_comm, model, t0)
    };
    let comm_end = done.iter().copied().fold(t0, f64::max);
    Ok(SimReport {
        n_comm,
        total_us: gemm_end.max(comm_end),
        gemm_end_us: gemm_end,
        comm_end_us: comm_end,
        gemm_only_us: gemm_only,
        gemm_stall_us: 0.0,
        remote_bytes: copies.iter().filter(|c| c.remote).map(|c| c.bytes).sum(),
        local_bytes: copies.iter().filter(|c| !c.remote).map(|c| c.bytes).sum(),
    })
}

#[cfg(test)]
mod tests;
