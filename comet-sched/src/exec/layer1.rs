//! Layer 1 on the host: GEMM1 by column groups, top-k reduce, partial sums to the token
//! owners, fixed-order final sum.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use comet_core::RoutingPlan;
use ndarray::{Array2, Array3};

use crate::error::{Error, Result};
use crate::exec::sync::{Gate, SharedBuf, Waits};
use crate::exec::{ExecOptions, Interleaving, Job, run_threads};
use crate::layer1::{CombineLayout, Layer1Schedule, ReducePlan};

/// What layer 1 reads.
#[derive(Debug, Clone, Copy)]
pub struct Layer1Inputs<'a> {
    /// The routing plan of all ranks.
    pub plan: &'a RoutingPlan,
    /// Per rank: layer 0's activation `[recv_rows, F]`.
    pub a: &'a [Array2<f32>],
    /// Per rank: its local experts' `w1`, `[L, H, F]`.
    pub w1: &'a [Array3<f32>],
    /// Per rank (as token owner): routing weights `[M, k]`.
    pub weights: &'a [Array2<f32>],
    /// Per rank: its combine layout as token owner.
    pub layouts: &'a [CombineLayout],
    /// Per rank: its reduce plan.
    pub reduce: &'a [ReducePlan],
}

/// What layer 1 leaves on each rank.
#[derive(Debug, Clone, PartialEq)]
pub struct Layer1Output {
    /// Per rank: GEMM1's output `[recv_rows, H]`.
    pub o: Vec<Array2<f32>>,
    /// Per rank: the combine buffer `[combine rows, H]` (partials from every rank).
    pub combine: Vec<Array2<f32>>,
    /// Per rank: the layer output `[M, H]`.
    pub y: Vec<Array2<f32>>,
}

fn check_inputs(inp: &Layer1Inputs, schedules: &[Layer1Schedule]) -> Result<(usize, usize)> {
    let plan = inp.plan;
    let w = plan.world();
    for (what, got) in [
        ("layer-1 schedules (one per rank)", schedules.len()),
        ("activations (one per rank)", inp.a.len()),
        ("local w1 (one per rank)", inp.w1.len()),
        ("routing weights (one per rank)", inp.weights.len()),
        ("combine layouts (one per rank)", inp.layouts.len()),
        ("reduce plans (one per rank)", inp.reduce.len()),
    ] {
        if got != w {
            return Err(Error::Mismatch {
                what,
                expected: w,
                got,
            });
        }
    }
    let (hidden, ffn) = (inp.w1[0].dim().1, inp.w1[0].dim().2);
    let first = &schedules[0];
    for (d, s) in schedules.iter().enumerate() {
        s.check_indices()?;
        let same_groups = s.groups.len() == first.groups.len()
            && s.groups
                .iter()
                .zip(&first.groups)
                .all(|(x, y)| x.cols == y.cols);
        for (what, expected, got) in [
            ("schedule rank", d, s.rank),
            ("schedule local experts", plan.local_experts(), s.local),
            ("schedule rows", plan.recv_rows(d), s.recv_rows()),
            (
                "GEMM1 tile columns n (= hidden)",
                hidden,
                s.options.tile.n(),
            ),
            (
                "column groups equal to rank 0's (1 = yes)",
                1,
                same_groups as usize,
            ),
            ("activation rows", plan.recv_rows(d), inp.a[d].nrows()),
            ("activation columns (ffn)", ffn, inp.a[d].ncols()),
            ("w1 experts", plan.local_experts(), inp.w1[d].dim().0),
            ("w1 rows (hidden)", hidden, inp.w1[d].dim().1),
            ("w1 columns (ffn)", ffn, inp.w1[d].dim().2),
            (
                "routing weight rows (tokens)",
                plan.tokens(d),
                inp.weights[d].nrows(),
            ),
            (
                "routing weight columns (top_k)",
                plan.top_k(),
                inp.weights[d].ncols(),
            ),
            ("combine layout owner", d, inp.layouts[d].owner),
            (
                "combine layout tokens + 1",
                plan.tokens(d) + 1,
                inp.layouts[d].offsets.len(),
            ),
            ("reduce plan rank", d, inp.reduce[d].rank),
        ] {
            if expected != got {
                return Err(Error::Mismatch {
                    what,
                    expected,
                    got,
                });
            }
        }
        for (k, it) in inp.reduce[d].items.iter().enumerate() {
            let rows = inp.layouts.get(it.owner).map_or(0, |l| l.rows());
            let bad = it.owner >= w
                || it.combine_row >= rows
                || it.token >= plan.tokens(it.owner)
                || it
                    .slots
                    .iter()
                    .any(|sr| sr.row >= plan.recv_rows(d) || sr.slot >= plan.top_k());
            if bad {
                return Err(Error::OutOfRange {
                    what: format!("reduce item {k} of rank {d} (owner, token, rows or slots)"),
                    index: it.combine_row,
                    len: rows,
                });
            }
        }
    }
    Ok((hidden, ffn))
}

struct RankState {
    o: SharedBuf,
    combine: SharedBuf,
    y: SharedBuf,
    /// Completion counter per column group.
    counters: Vec<AtomicUsize>,
    /// Per group: copy threads of this rank done with it.
    sent_threads: Vec<AtomicUsize>,
    /// As token owner, per group, per sending rank: its partials have landed.
    arrived: Vec<Vec<AtomicBool>>,
    gate: Gate,
}

/// Runs layer 1 on `W` simulated ranks following `schedules[d]`:
/// - GEMM thread `b` runs tiles `b, b + n_gemm, …` (column-group-major order), computing
///   `o[rows, cols] = a[rows] · w1[l]ᵀ` and then incrementing its group's counter
///   (release; in [`Interleaving::Lazy`] mode one tile at a time, once the copy threads
///   have settled);
/// - copy thread `c` takes, group by group, every `n_comm`-th reduce item once the group's
///   counter reaches its target (acquire), sums `w[t, j] · o[row_j, cols]` over the token's
///   slots here in slot order (f64, rounded to f32) and writes the partial into the owner's
///   combine buffer; the last copy thread of the rank to finish a group tells every owner;
/// - one combine thread per owner waits, group by group, until every rank has delivered,
///   then sums each token's combine rows in their fixed order (ranks ascending) into `y`.
///
/// `o`, the combine buffers and `y` start as NaN.
///
/// # Errors
/// [`Error::Mismatch`] / [`Error::OutOfRange`] for inputs that do not fit the plan;
/// [`Error::Timeout`]; [`Error::ThreadPanicked`].
pub fn run_layer1(
    inp: &Layer1Inputs,
    schedules: &[Layer1Schedule],
    opts: &ExecOptions,
) -> Result<Layer1Output> {
    opts.validate()?;
    let (hidden, ffn) = check_inputs(inp, schedules)?;
    let _span = tracing::info_span!("exec_layer1", world = inp.plan.world()).entered();
    let w = inp.plan.world();
    let n_groups = schedules[0].groups.len();
    let waits = Waits::new(opts.timeout);
    let lazy = opts.interleaving == Interleaving::Lazy;
    let ranks: Vec<RankState> = (0..w)
        .map(|d| RankState {
            o: SharedBuf::nan(inp.plan.recv_rows(d), hidden),
            combine: SharedBuf::nan(inp.layouts[d].rows(), hidden),
            y: SharedBuf::nan(inp.plan.tokens(d), hidden),
            counters: (0..n_groups).map(|_| AtomicUsize::new(0)).collect(),
            sent_threads: (0..n_groups).map(|_| AtomicUsize::new(0)).collect(),
            arrived: (0..n_groups)
                .map(|_| (0..w).map(|_| AtomicBool::new(false)).collect())
                .collect(),
            gate: Gate::new(opts.n_comm, lazy),
        })
        .collect();

    let mut jobs: Vec<Job<'_>> = Vec::new();
    let (waits, ranks) = (&waits, &ranks);
    for (d, s) in schedules.iter().enumerate() {
        for b in 0..opts.n_gemm {
            let n_gemm = opts.n_gemm;
            jobs.push(Box::new(move || {
                gemm_block(inp, s, &ranks[d], waits, (d, b, n_gemm), ffn)
            }));
        }
        for c in 0..opts.n_comm {
            let n_comm = opts.n_comm;
            jobs.push(Box::new(move || {
                comm_block(inp, s, ranks, waits, (d, c, n_comm))
            }));
        }
        jobs.push(Box::new(move || owner_block(inp, s, &ranks[d], waits, d)));
    }
    run_threads(waits, jobs)?;

    Ok(Layer1Output {
        o: ranks.iter().map(|r| r.o.to_array()).collect(),
        combine: ranks.iter().map(|r| r.combine.to_array()).collect(),
        y: ranks.iter().map(|r| r.y.to_array()).collect(),
    })
}

fn gemm_block(
    inp: &Layer1Inputs,
    s: &Layer1Schedule,
    st: &RankState,
    waits: &Waits,
    (d, b, n_gemm): (usize, usize, usize),
    ffn: usize,
) -> Result<()> {
    let what = || format!("rank {d} GEMM1 thread {b}: waiting for the copy threads to settle");
    let mut arow = vec![0f64; ffn];
    for k in (b..s.tiles.len()).step_by(n_gemm) {
        let t = &s.tiles[k];
        st.gate.step(waits, &what, |_| {
            let w1 = inp.w1[d].index_axis(ndarray::Axis(0), t.expert);
            for r in t.rows.clone() {
                for (v, &x) in arow.iter_mut().zip(inp.a[d].row(r)) {
                    *v = x as f64;
                }
                for col in s.options.tile.cols(t.n_tile) {
                    let dot: f64 = w1
                        .row(col)
                        .iter()
                        .zip(&arow)
                        .map(|(&wv, &av)| wv as f64 * av)
                        .sum();
                    st.o.set(r, col, dot as f32);
                }
            }
            st.counters[t.group].fetch_add(1, Ordering::Release);
        })?;
    }
    Ok(())
}

fn comm_block(
    inp: &Layer1Inputs,
    s: &Layer1Schedule,
    ranks: &[RankState],
    waits: &Waits,
    (d, c, n_comm): (usize, usize, usize),
) -> Result<()> {
    let st = &ranks[d];
    let items = &inp.reduce[d].items;
    for (g, group) in s.groups.iter().enumerate() {
        let what = || {
            format!(
                "rank {d} reduce thread {c}: group {g} counter {} of {}",
                st.counters[g].load(Ordering::Relaxed),
                group.target
            )
        };
        st.gate.wait(waits, c, &|| g as u64, &what, || {
            st.counters[g].load(Ordering::Acquire) >= group.target
        })?;
        for it in items.iter().skip(c).step_by(n_comm) {
            let owner = &ranks[it.owner];
            let wts = inp.weights[it.owner].row(it.token);
            for col in group.cols.clone() {
                let sum: f64 = it
                    .slots
                    .iter()
                    .map(|sr| wts[sr.slot] as f64 * st.o.get(sr.row, col) as f64)
                    .sum();
                owner.combine.set(it.combine_row, col, sum as f32);
            }
        }
        // The last copy thread of this rank to finish group g tells every owner (its
        // acquire-release increment orders the other threads' writes before the stores).
        if st.sent_threads[g].fetch_add(1, Ordering::AcqRel) + 1 == n_comm {
            for r in ranks {
                r.arrived[g][d].store(true, Ordering::Release);
            }
        }
    }
    st.gate.finish(c);
    Ok(())
}

fn owner_block(
    inp: &Layer1Inputs,
    s: &Layer1Schedule,
    st: &RankState,
    waits: &Waits,
    o: usize,
) -> Result<()> {
    let layout = &inp.layouts[o];
    for (g, group) in s.groups.iter().enumerate() {
        let what = || {
            let missing: Vec<usize> = (0..st.arrived[g].len())
                .filter(|&d| !st.arrived[g][d].load(Ordering::Relaxed))
                .collect();
            format!("owner {o}: group {g} waiting for partials of ranks {missing:?}")
        };
        // Downstream of every rank's reduce threads: a later deadline, so that a stalled
        // group reports where it stalled.
        waits.until_after(waits.downstream_grace(), &what, || {
            st.arrived[g].iter().all(|a| a.load(Ordering::Acquire))
        })?;
        for t in 0..layout.offsets.len() - 1 {
            let rows = layout.offsets[t]..layout.offsets[t + 1];
            for col in group.cols.clone() {
                let sum: f64 = rows.clone().map(|r| st.combine.get(r, col) as f64).sum();
                st.y.set(t, col, sum as f32);
            }
        }
    }
    Ok(())
}
