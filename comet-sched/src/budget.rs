//! The communication-block budget: how many of the persistent kernel's blocks move data.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::layer0::Layer0Schedule;
use crate::layer1::{Layer1Schedule, ReducePlan};
use crate::model::CostModel;
use crate::sim::{Layer0Work, Layer1Work, SimReport, simulate_layer0, simulate_layer1};

/// The best `n_comm` found and what was tried.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    /// The chosen number of communication blocks (0 = copy engine).
    pub n_comm: usize,
    /// Its simulation.
    pub report: SimReport,
    /// `(n_comm, total µs)` of every candidate, in the order tried.
    pub tried: Vec<(usize, f64)>,
}

/// The candidates [`choose_n_comm_layer0`] and [`choose_n_comm_layer1`] try: 0 (copy engine)
/// and `1 ..= min(sms / 2, 64)`.
pub fn default_candidates(model: &CostModel) -> Vec<usize> {
    (0..=(model.sms / 2).min(64)).collect()
}

/// Simulates every candidate with `simulate` and keeps the fastest (ties: fewer blocks,
/// which leaves more SMs to the GEMM for the same predicted time).
///
/// # Errors
/// [`Error::ZeroSize`] if there is no candidate; [`Error::NCommTooLarge`] for a candidate
/// that leaves no GEMM block; the simulator's errors.
pub fn choose_n_comm(
    model: &CostModel,
    candidates: impl IntoIterator<Item = usize>,
    mut simulate: impl FnMut(usize) -> Result<SimReport>,
) -> Result<Choice> {
    let _span = tracing::debug_span!("choose_n_comm").entered();
    let mut best: Option<SimReport> = None;
    let mut tried = Vec::new();
    for n in candidates {
        model.check_n_comm(n)?;
        let r = simulate(n)?;
        tried.push((n, r.total_us));
        let better = best.as_ref().is_none_or(|b| {
            r.total_us < b.total_us || (r.total_us == b.total_us && r.n_comm < b.n_comm)
        });
        if better {
            best = Some(r);
        }
    }
    let report = best.ok_or(Error::ZeroSize {
        name: "n_comm candidates",
    })?;
    Ok(Choice {
        n_comm: report.n_comm,
        report,
        tried,
    })
}

/// The best `n_comm` for layer 0 by simulation over [`default_candidates`].
///
/// # Errors
/// As [`choose_n_comm`].
pub fn choose_n_comm_layer0(
    s: &Layer0Schedule,
    work: &Layer0Work,
    model: &CostModel,
) -> Result<Choice> {
    choose_n_comm(model, default_candidates(model), |n| {
        simulate_layer0(s, work, n, model)
    })
}

/// The best `n_comm` for layer 1 by simulation over [`default_candidates`].
///
/// # Errors
/// As [`choose_n_comm`].
pub fn choose_n_comm_layer1(
    s: &Layer1Schedule,
    reduce: &ReducePlan,
    work: &Layer1Work,
    model: &CostModel,
) -> Result<Choice> {
    choose_n_comm(model, default_candidates(model), |n| {
        simulate_layer1(s, reduce, work, n, model)
    })
}
