//! Layer 0 on the host: dispatch by chunk copies + GEMM0 (+ activation) by tiles.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use comet_core::reference::{gelu, silu};
use comet_core::{Activation, RoutingPlan};
use ndarray::{Array2, Array3};

use crate::error::{Error, Result};
use crate::exec::sync::{Gate, SharedBuf, Waits};
use crate::exec::{ExecOptions, Interleaving, Job, run_threads};
use crate::layer0::Layer0Schedule;

/// What layer 0 reads: the plan, every rank's send buffer and local `w0`.
#[derive(Debug, Clone, Copy)]
pub struct Layer0Inputs<'a> {
    /// The routing plan of all ranks.
    pub plan: &'a RoutingPlan,
    /// Per rank: its send layout `[M_s·k, H]` (`comet_core::reference::send_buffers`).
    pub sends: &'a [Array2<f32>],
    /// Per rank: its local experts' `w0`, `[L, n0, H]`.
    pub w0: &'a [Array3<f32>],
    /// The activation of GEMM0's epilogue.
    pub activation: Activation,
}

/// What layer 0 leaves on each rank.
#[derive(Debug, Clone, PartialEq)]
pub struct Layer0Output {
    /// Per rank: the receive buffer `[recv_rows, H]` after every copy.
    pub recv: Vec<Array2<f32>>,
    /// Per rank: the activation `[recv_rows, F]` (GEMM0 + epilogue).
    pub a: Vec<Array2<f32>>,
}

fn check_inputs(inp: &Layer0Inputs, schedules: &[Layer0Schedule]) -> Result<(usize, usize)> {
    let plan = inp.plan;
    let w = plan.world();
    for (what, got) in [
        ("layer-0 schedules (one per rank)", schedules.len()),
        ("send buffers (one per rank)", inp.sends.len()),
        ("local w0 (one per rank)", inp.w0.len()),
    ] {
        if got != w {
            return Err(Error::Mismatch {
                what,
                expected: w,
                got,
            });
        }
    }
    let hidden = inp.sends.first().map_or(0, |s| s.ncols());
    let (l, n0) = (plan.local_experts(), inp.w0[0].dim().1);
    let f = n0 / inp.activation.n0_factor();
    for (d, s) in schedules.iter().enumerate() {
        s.check_indices()?;
        for (what, expected, got) in [
            ("schedule rank", d, s.rank),
            ("schedule world", w, s.world),
            ("schedule local experts", l, s.local),
            ("schedule receive rows", plan.recv_rows(d), s.recv_rows()),
            ("GEMM0 tile columns n (= ffn)", f, s.options.tile.n()),
            (
                "send buffer rows (tokens * top_k)",
                plan.tokens(d) * plan.top_k(),
                inp.sends[d].nrows(),
            ),
            ("send buffer columns (hidden)", hidden, inp.sends[d].ncols()),
            ("w0 experts", l, inp.w0[d].dim().0),
            (
                "w0 rows (n0 = activation factor * ffn)",
                f * inp.activation.n0_factor(),
                n0,
            ),
            ("w0 rows (n0)", n0, inp.w0[d].dim().1),
            ("w0 columns (hidden)", hidden, inp.w0[d].dim().2),
        ] {
            if expected != got {
                return Err(Error::Mismatch {
                    what,
                    expected,
                    got,
                });
            }
        }
        for (k, c) in s.flags.iter().enumerate() {
            if c.source >= w || c.src_rows.end > inp.sends[c.source].nrows() {
                return Err(Error::OutOfRange {
                    what: format!("source rows of flag {k} on rank {d}"),
                    index: c.src_rows.end.saturating_sub(1),
                    len: inp.sends.get(c.source).map_or(0, |b| b.nrows()),
                });
            }
        }
    }
    Ok((hidden, f))
}

/// Runs layer 0 on `W` simulated ranks, each with `opts.n_comm` copy threads and
/// `opts.n_gemm` GEMM threads, following `schedules[d]`:
/// - copy threads move chunks (in the schedule's copy order; in
///   [`Interleaving::Lazy`] mode one at a time, on demand) from the source ranks' send
///   buffers into the receive buffer, then release the chunk's flag (release store);
/// - GEMM thread `b` runs tiles `b, b + n_gemm, …` of the order (the engine's static
///   persistent assignment), each after acquiring its flags, computing
///   `a[rows, cols] = act(recv[rows] · w0[l]ᵀ)` (f64 dot products rounded to f32, the
///   activation in f64 from the rounded values, as the reference).
///
/// The receive buffers and outputs start as NaN, so rows a tile reads before they arrive,
/// and outputs no tile writes, show up as NaN.
///
/// # Errors
/// [`Error::Mismatch`] / [`Error::OutOfRange`] for inputs or schedules that do not fit the
/// plan; [`Error::Timeout`] if a tile waits longer than `opts.timeout` (a flag nobody
/// releases); [`Error::ThreadPanicked`].
pub fn run_layer0(
    inp: &Layer0Inputs,
    schedules: &[Layer0Schedule],
    opts: &ExecOptions,
) -> Result<Layer0Output> {
    opts.validate()?;
    let (hidden, f) = check_inputs(inp, schedules)?;
    let _span = tracing::info_span!("exec_layer0", world = inp.plan.world()).entered();
    let waits = Waits::new(opts.timeout);
    let lazy = opts.interleaving == Interleaving::Lazy;
    let ranks: Vec<RankState> = schedules
        .iter()
        .map(|s| RankState {
            recv: SharedBuf::nan(s.recv_rows(), hidden),
            a: SharedBuf::nan(s.recv_rows(), f),
            released: (0..s.flags.len()).map(|_| AtomicBool::new(false)).collect(),
            claimed: (0..s.flags.len()).map(|_| AtomicBool::new(false)).collect(),
            copyable: {
                let mut c = vec![false; s.flags.len()];
                for &f in &s.copy_order {
                    c[f as usize] = true;
                }
                c
            },
            next_copy: AtomicUsize::new(0),
            gate: Gate::new(opts.n_gemm, lazy),
        })
        .collect();

    let mut jobs: Vec<Job<'_>> = Vec::new();
    for (d, (s, st)) in schedules.iter().zip(&ranks).enumerate() {
        let w = &waits;
        for c in 0..opts.n_comm {
            jobs.push(Box::new(move || comm_block(inp, s, st, w, d, c)));
        }
        for b in 0..opts.n_gemm {
            let n_gemm = opts.n_gemm;
            jobs.push(Box::new(move || {
                gemm_block(inp, s, st, w, (d, b, n_gemm), (hidden, f))
            }));
        }
    }
    run_threads(&waits, jobs)?;

    Ok(Layer0Output {
        recv: ranks.iter().map(|r| r.recv.to_array()).collect(),
        a: ranks.iter().map(|r| r.a.to_array()).collect(),
    })
}

struct RankState {
    recv: SharedBuf,
    a: SharedBuf,
    released: Vec<AtomicBool>,
    /// Lazy mode: chunks already taken by a copy thread.
    claimed: Vec<AtomicBool>,
    /// Flags in the copy order (the only ones this rank's copy threads move).
    copyable: Vec<bool>,
    /// Free mode: next position in the copy order.
    next_copy: AtomicUsize,
    gate: Gate,
}

/// Copies chunk `f` into the receive buffer, then releases its flag.
fn copy_chunk(inp: &Layer0Inputs, s: &Layer0Schedule, st: &RankState, f: usize) {
    let c = &s.flags[f];
    let src = &inp.sends[c.source];
    for (dst, sr) in c.rows.clone().zip(c.src_rows.clone()) {
        for (col, &v) in src.row(sr).iter().enumerate() {
            st.recv.set(dst, col, v);
        }
    }
    st.released[f].store(true, Ordering::Release);
}

fn comm_block(
    inp: &Layer0Inputs,
    s: &Layer0Schedule,
    st: &RankState,
    waits: &Waits,
    d: usize,
    c: usize,
) -> Result<()> {
    let what = || format!("rank {d} copy thread {c}: waiting for the GEMM threads to settle");
    loop {
        // Lazy: serve the smallest flag a blocked tile waits for, else the next chunk in
        // arrival order nobody has taken. Free: the next chunk in arrival order.
        let more = st.gate.step(waits, &what, |wants| {
            let pick = if st.gate.is_lazy() {
                let wanted = wants
                    .iter()
                    .filter(|&&f| (f as usize) < s.flags.len())
                    .map(|&f| f as usize)
                    .filter(|&f| st.copyable[f] && !st.claimed[f].load(Ordering::Relaxed))
                    .min();
                wanted.or_else(|| {
                    s.copy_order
                        .iter()
                        .map(|&f| f as usize)
                        .find(|&f| !st.claimed[f].load(Ordering::Relaxed))
                })
            } else {
                let k = st.next_copy.fetch_add(1, Ordering::Relaxed);
                s.copy_order.get(k).map(|&f| f as usize)
            };
            match pick {
                Some(f) => {
                    st.claimed[f].store(true, Ordering::Relaxed);
                    copy_chunk(inp, s, st, f);
                    true
                }
                None => false,
            }
        })?;
        if !more {
            return Ok(());
        }
    }
}

fn gemm_block(
    inp: &Layer0Inputs,
    s: &Layer0Schedule,
    st: &RankState,
    waits: &Waits,
    (d, b, n_gemm): (usize, usize, usize),
    (hidden, f): (usize, usize),
) -> Result<()> {
    let tile = s.options.tile;
    let mut x = vec![0f32; hidden];
    for k in (b..s.tiles.len()).step_by(n_gemm) {
        let t = &s.tiles[k];
        let first_missing = || {
            t.flags
                .iter()
                .find(|&&fl| !st.released[fl as usize].load(Ordering::Acquire))
                .copied()
        };
        let what = || {
            format!(
                "rank {d} GEMM thread {b}: tile {k} (expert {}, m {}, n {}) waiting for flag {:?}",
                t.expert,
                t.m_tile,
                t.n_tile,
                first_missing()
            )
        };
        let want = || first_missing().map_or(u64::MAX, u64::from);
        st.gate
            .wait(waits, b, &want, &what, || first_missing().is_none())?;
        let w0 = inp.w0[d].index_axis(ndarray::Axis(0), t.expert);
        for r in t.rows.clone() {
            for (col, v) in x.iter_mut().enumerate() {
                *v = st.recv.get(r, col);
            }
            // f64 dot products rounded to f32 (h), the activation in f64 from h.
            let h = |wrow: usize| -> f64 {
                w0.row(wrow)
                    .iter()
                    .zip(&x)
                    .map(|(&wv, &xv)| wv as f64 * xv as f64)
                    .sum::<f64>() as f32 as f64
            };
            for col in tile.cols(t.n_tile) {
                let v = match inp.activation {
                    Activation::SwiGlu => silu(h(col)) * h(f + col),
                    Activation::Gelu => gelu(h(col)),
                };
                st.a.set(r, col, v as f32);
            }
        }
    }
    st.gate.finish(b);
    Ok(())
}
