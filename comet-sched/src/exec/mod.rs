//! The host executor: a schedule run by `W` simulated ranks in threads, f32 data, every
//! buffer a consumer reads poisoned with NaN beforehand.
//!
//! It runs the fused layers the way the GPU kernels will — copy ("comm") threads and GEMM
//! threads of one rank meet only through flags and counters (release/acquire atomics) — so a
//! schedule whose flags do not cover a tile's rows, or whose counters release a column group
//! too early, produces NaN or a wrong `y`. [`Interleaving::Lazy`] makes that deterministic:
//! producers hold every step back until the consumers have done all that their declared
//! dependencies allow (and layer 0's copies are made on demand), so a missing dependency is
//! always exercised. [`forward`] runs both layers and is compared with
//! `comet_core::reference` in the tests.

mod layer0;
mod layer1;
mod sync;

use std::time::Duration;

use comet_core::reference::{MoeWeights, send_buffers};
use comet_core::routing::{router_logits, top_k};
use comet_core::{MoeConfig, ParallelConfig, RoutingPlan, TopK};
use ndarray::Array2;

use crate::error::{Error, Result};
use crate::layer0::{Layer0Options, Layer0Schedule};
use crate::layer1::{Layer1Options, Layer1Schedule, ReducePlan};

pub use layer0::{Layer0Inputs, Layer0Output, run_layer0};
pub use layer1::{Layer1Inputs, Layer1Output, run_layer1};

use sync::Waits;

/// How the threads of a rank are interleaved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Interleaving {
    /// Threads race freely; only flags and counters order them (as on a GPU).
    Free,
    /// Producers step one at a time, each step only once every consumer is blocked or done;
    /// layer 0 copies the chunk a blocked tile asks for first. A schedule missing a
    /// dependency then fails deterministically.
    Lazy,
}

/// Threads and limits of a host execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecOptions {
    /// Copy/reduce threads per rank (the comm blocks), at least 1.
    pub n_comm: usize,
    /// GEMM threads per rank (the GEMM blocks), at least 1.
    pub n_gemm: usize,
    /// Thread interleaving.
    pub interleaving: Interleaving,
    /// Longest a thread may wait for anything before the run fails with
    /// [`Error::Timeout`].
    pub timeout: Duration,
}

impl Default for ExecOptions {
    fn default() -> Self {
        ExecOptions {
            n_comm: 2,
            n_gemm: 3,
            interleaving: Interleaving::Free,
            timeout: Duration::from_secs(20),
        }
    }
}

impl ExecOptions {
    /// Checks the thread counts.
    ///
    /// # Errors
    /// [`Error::ZeroSize`] for no copy or no GEMM thread; [`Error::TooLarge`] above 64
    /// threads of one kind per rank.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [("n_comm", self.n_comm), ("n_gemm", self.n_gemm)] {
            if v == 0 {
                return Err(Error::ZeroSize { name });
            }
            if v > 64 {
                return Err(Error::TooLarge {
                    what: "host executor threads of one kind per rank",
                    value: v as u128,
                    limit: 64,
                });
            }
        }
        Ok(())
    }
}

/// One thread's work.
pub(crate) type Job<'a> = Box<dyn FnOnce() -> Result<()> + Send + 'a>;

/// Runs every job on its own scoped thread. The first job to fail makes every other wait
/// give up, and its error (not the give-ups it caused) is returned.
pub(crate) fn run_threads(waits: &Waits, jobs: Vec<Job<'_>>) -> Result<()> {
    let first: std::sync::Mutex<Option<Error>> = std::sync::Mutex::new(None);
    std::thread::scope(|scope| {
        let handles: Vec<_> = jobs
            .into_iter()
            .map(|job| {
                let first = &first;
                scope.spawn(move || {
                    if let Err(e) = job() {
                        if let Ok(mut f) = first.lock() {
                            if f.is_none() {
                                *f = Some(e);
                            }
                        }
                        waits.abort();
                    }
                })
            })
            .collect();
        let mut panicked = None;
        for h in handles {
            if let Err(p) = h.join() {
                waits.abort();
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                panicked.get_or_insert(msg);
            }
        }
        if let Some(msg) = panicked {
            return Err(Error::ThreadPanicked(msg));
        }
        Ok(())
    })?;
    match first.into_inner() {
        Ok(Some(e)) => Err(e),
        Ok(None) => Ok(()),
        Err(_) => Err(Error::ThreadPanicked("error slot poisoned".into())),
    }
}

/// Schedules and threads of a host forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardOptions {
    /// Layer-0 schedule parameters (tile `n` = ffn).
    pub layer0: Layer0Options,
    /// Layer-1 schedule parameters (tile `n` = hidden).
    pub layer1: Layer1Options,
    /// Threads and limits.
    pub exec: ExecOptions,
}

/// Everything a host forward pass produced, per rank.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecForward {
    /// The routing plan.
    pub plan: RoutingPlan,
    /// The routing of each rank's tokens.
    pub routing: Vec<TopK<f32>>,
    /// Layer-0 schedules.
    pub layer0: Vec<Layer0Schedule>,
    /// Layer-1 schedules.
    pub layer1: Vec<Layer1Schedule>,
    /// Receive buffers `[recv_rows, H]`.
    pub recv: Vec<Array2<f32>>,
    /// Activations `[recv_rows, F]`.
    pub a: Vec<Array2<f32>>,
    /// GEMM1 outputs `[recv_rows, H]`.
    pub o: Vec<Array2<f32>>,
    /// Layer outputs `[M_s, H]`.
    pub y: Vec<Array2<f32>>,
}

/// The expert-parallel forward of `cfg` on `xs.len()` simulated ranks (rank `s` holds
/// tokens `xs[s]` and the local experts of [`MoeWeights::local`]), routed by the router:
/// routing, plan, schedules ([`Layer0Schedule::from_plan`], [`Layer1Schedule::from_plan`]),
/// then [`run_layer0`] and [`run_layer1`].
///
/// # Errors
/// The routing's and the schedules' errors; those of [`run_layer0`] / [`run_layer1`].
pub fn forward(
    cfg: &MoeConfig,
    w: &MoeWeights<f32>,
    xs: &[Array2<f32>],
    opts: &ForwardOptions,
) -> Result<ExecForward> {
    let routing = xs
        .iter()
        .map(|x| {
            let logits = router_logits(x.view(), w.wr.view())?;
            Ok(top_k(logits.view(), cfg.top_k(), cfg.renormalize())?)
        })
        .collect::<Result<Vec<_>>>()?;
    forward_routed(cfg, w, xs, routing, opts)
}

/// [`forward`] with a given routing per rank (ids and weights; `probs` are not used).
///
/// # Errors
/// As [`forward`].
pub fn forward_routed(
    cfg: &MoeConfig,
    w: &MoeWeights<f32>,
    xs: &[Array2<f32>],
    routing: Vec<TopK<f32>>,
    opts: &ForwardOptions,
) -> Result<ExecForward> {
    let _span = tracing::info_span!("exec_forward", world = xs.len()).entered();
    let world = xs.len();
    let par = ParallelConfig::expert_parallel(world)?;
    par.validate_for(cfg)?;
    w.check(cfg)?;
    if routing.len() != world {
        return Err(Error::Mismatch {
            what: "routings (one per rank)",
            expected: world,
            got: routing.len(),
        });
    }
    let ids: Vec<_> = routing.iter().map(|r| r.ids.view()).collect();
    let plan = RoutingPlan::new(&ids, cfg.experts(), world)?;
    let views: Vec<_> = xs.iter().map(|x| x.view()).collect();
    let sends = send_buffers(&plan, &views)?;
    let locals = (0..world)
        .map(|d| w.local(d, &par))
        .collect::<comet_core::Result<Vec<_>>>()?;
    let layer0 = (0..world)
        .map(|d| Layer0Schedule::from_plan(&plan, d, opts.layer0))
        .collect::<Result<Vec<_>>>()?;
    let layer1 = (0..world)
        .map(|d| Layer1Schedule::from_plan(&plan, d, opts.layer1))
        .collect::<Result<Vec<_>>>()?;
    let w0: Vec<_> = locals.iter().map(|l| l.w0.clone()).collect();
    let w1: Vec<_> = locals.iter().map(|l| l.w1.clone()).collect();
    let l0 = run_layer0(
        &Layer0Inputs {
            plan: &plan,
            sends: &sends,
            w0: &w0,
            activation: cfg.activation(),
        },
        &layer0,
        &opts.exec,
    )?;
    let (layouts, reduce) = ReducePlan::all(&plan)?;
    let weights: Vec<_> = routing.iter().map(|r| r.weights.clone()).collect();
    let l1 = run_layer1(
        &Layer1Inputs {
            plan: &plan,
            a: &l0.a,
            w1: &w1,
            weights: &weights,
            layouts: &layouts,
            reduce: &reduce,
        },
        &layer1,
        &opts.exec,
    )?;
    Ok(ExecForward {
        plan,
        routing,
        layer0,
        layer1,
        recv: l0.recv,
        a: l0.a,
        o: l1.o,
        y: l1.y,
    })
}

#[cfg(test)]
mod tests;
