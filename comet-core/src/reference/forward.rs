//! Single-rank reference forward.

use ndarray::{Array2, ArrayView2, Axis};

use crate::config::MoeConfig;
use crate::error::{Error, Result};
use crate::real::Real;
use crate::reference::ffn::expert_forward;
use crate::reference::weights::MoeWeights;
use crate::routing::{TopK, check_ids, router_logits, top_k};

/// Result of [`forward`]: the output and what [`crate::reference::backward`] needs.
///
/// The per-slot caches are indexed by slot `t·k + j` (token `t`, top-k position `j`).
#[derive(Debug, Clone, PartialEq)]
pub struct Forward<T> {
    /// `[M, H]`: `y[t] = Σ_j weights[t, j] · o[t·k + j]`.
    pub y: Array2<T>,
    /// The router's decision (ids, weights, probabilities).
    pub routing: TopK<T>,
    /// `[M·k, n0]`: GEMM0 output `x[t] · w0[e]ᵀ` of each slot.
    pub h: Array2<T>,
    /// `[M·k, F]`: activation of each slot.
    pub a: Array2<T>,
    /// `[M·k, H]`: expert output `a · w1[e]ᵀ` of each slot (before the routing weight).
    pub o: Array2<T>,
}

pub(crate) fn check_tokens<T>(
    cfg: &MoeConfig,
    what: &'static str,
    x: ArrayView2<T>,
    rows: usize,
) -> Result<()> {
    if x.dim() != (rows, cfg.hidden()) {
        return Err(Error::ShapeMismatch {
            what,
            expected: vec![rows, cfg.hidden()],
            got: x.shape().to_vec(),
        });
    }
    Ok(())
}

/// Checks a routing decision for `m` tokens against `cfg`.
pub(crate) fn check_routing<T: Real>(
    cfg: &MoeConfig,
    r: &TopK<T>,
    m: usize,
    rank: usize,
) -> Result<()> {
    let (k, e) = (cfg.top_k(), cfg.experts());
    for (what, expected, got) in [
        ("routing ids [tokens, top_k]", [m, k], r.ids.dim()),
        ("routing weights [tokens, top_k]", [m, k], r.weights.dim()),
        ("routing probs [tokens, experts]", [m, e], r.probs.dim()),
    ] {
        if got != (expected[0], expected[1]) {
            return Err(Error::ShapeMismatch {
                what,
                expected: expected.to_vec(),
                got: vec![got.0, got.1],
            });
        }
    }
    check_ids(r.ids.view(), e, rank)
}

/// The single-rank reference MoE forward (ARCHITECTURE.md, "Layer").
///
/// `logits = `[`router_logits`]`(x, wr)`, `routing = `[`top_k`]`(logits, k, renormalize)`,
/// then for every slot `(t, j)` with expert `e = ids[t, j]`: `h = x[t] · w0[e]ᵀ`,
/// `a = act(h)`, `o = a · w1[e]ᵀ`, and `y[t] = Σ_{j=0..k} weights[t, j] · o_j` in slot order.
/// Dot products and the combine sum accumulate in f64 and are rounded once to `T`; the
/// activation is computed in f64 from the rounded `h`. With `T = f64` everything (routing
/// included) is f64, which the gradient checks need; with `T = f32` routing is exactly
/// [`top_k`] on f32 logits, as on the GPU.
///
/// # Errors
/// [`Error::ShapeMismatch`] for weights not of `cfg`'s shapes or `x` not `[M, H]`;
/// [`Error::NonFiniteLogit`] from the router.
pub fn forward<T: Real>(
    cfg: &MoeConfig,
    w: &MoeWeights<T>,
    x: ArrayView2<T>,
) -> Result<Forward<T>> {
    let _span =
        tracing::info_span!("reference_forward", tokens = x.nrows(), dtype = T::NAME).entered();
    w.check(cfg)?;
    check_tokens(cfg, "x [tokens, hidden]", x, x.nrows())?;
    let routing = {
        let _s = tracing::info_span!("router").entered();
        let logits = router_logits(x, w.wr.view())?;
        top_k(logits.view(), cfg.top_k(), cfg.renormalize())?
    };
    forward_unchecked(cfg, w, x, routing)
}

/// [`forward`] with a given routing decision instead of the router's (e.g. the GPU's ids
/// and weights, so a near-tie the two break differently cannot fail a comparison).
/// [`crate::reference::backward`] then differentiates through `routing.probs` as if the
/// weights came from them.
///
/// # Errors
/// As [`forward`], plus [`Error::ShapeMismatch`] for a routing of the wrong shape and
/// [`Error::ExpertIdOutOfRange`] / [`Error::DuplicateExpert`] for invalid ids.
pub fn forward_routed<T: Real>(
    cfg: &MoeConfig,
    w: &MoeWeights<T>,
    x: ArrayView2<T>,
    routing: TopK<T>,
) -> Result<Forward<T>> {
    let _span = tracing::info_span!(
        "reference_forward_routed",
        tokens = x.nrows(),
        dtype = T::NAME
    )
    .entered();
    w.check(cfg)?;
    check_tokens(cfg, "x [tokens, hidden]", x, x.nrows())?;
    check_routing(cfg, &routing, x.nrows(), 0)?;
    forward_unchecked(cfg, w, x, routing)
}

/// Slots `(t, j)` of each expert, tokens ascending.
pub(crate) fn slots_by_expert(ids: ArrayView2<u32>, experts: usize) -> Vec<Vec<(usize, usize)>> {
    let mut by = vec![Vec::new(); experts];
    for (t, row) in ids.rows().into_iter().enumerate() {
        for (j, &e) in row.iter().enumerate() {
            by[e as usize].push((t, j));
        }
    }
    by
}

/// `y[t] = Σ_j weights[t, j] · rows[slot(t, j)]`, f64 accumulation in slot order.
pub(crate) fn weighted_sum<'a, T: Real>(
    weights: ArrayView2<T>,
    hidden: usize,
    mut row_of: impl FnMut(usize, usize) -> ndarray::ArrayView1<'a, T>,
) -> Array2<T> {
    let (m, k) = weights.dim();
    let mut y = Array2::from_elem((m, hidden), T::ZERO);
    let mut acc = vec![0.0f64; hidden];
    for t in 0..m {
        acc.iter_mut().for_each(|v| *v = 0.0);
        for j in 0..k {
            let wt = weights[[t, j]].to_f64();
            for (a, &o) in acc.iter_mut().zip(row_of(t, j).iter()) {
                *a += wt * o.to_f64();
            }
        }
        for (yv, &a) in y.row_mut(t).iter_mut().zip(&acc) {
            *yv = T::from_f64(a);
        }
    }
    y
}

fn forward_unchecked<T: Real>(
    cfg: &MoeConfig,
    w: &MoeWeights<T>,
    x: ArrayView2<T>,
    routing: TopK<T>,
) -> Result<Forward<T>> {
    let (m, k, hid) = (x.nrows(), cfg.top_k(), cfg.hidden());
    let mut h = Array2::from_elem((m * k, cfg.n0()), T::ZERO);
    let mut a = Array2::from_elem((m * k, cfg.ffn()), T::ZERO);
    let mut o = Array2::from_elem((m * k, hid), T::ZERO);
    {
        let _s = tracing::info_span!("experts").entered();
        for (e, slots) in slots_by_expert(routing.ids.view(), cfg.experts())
            .iter()
            .enumerate()
        {
            if slots.is_empty() {
                continue;
            }
            let tokens: Vec<usize> = slots.iter().map(|&(t, _)| t).collect();
            let xe = x.select(Axis(0), &tokens);
            let (he, ae, oe) = expert_forward(
                cfg.activation(),
                xe.view(),
                w.w0.index_axis(Axis(0), e),
                w.w1.index_axis(Axis(0), e),
            );
            for (r, &(t, j)) in slots.iter().enumerate() {
                let slot = t * k + j;
                h.row_mut(slot).assign(&he.row(r));
                a.row_mut(slot).assign(&ae.row(r));
                o.row_mut(slot).assign(&oe.row(r));
            }
        }
    }
    let y = {
        let _s = tracing::info_span!("combine").entered();
        weighted_sum(routing.weights.view(), hid, |t, j| o.row(t * k + j))
    };
    Ok(Forward {
        y,
        routing,
        h,
        a,
        o,
    })
}
