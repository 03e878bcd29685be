//! Single-rank reference backward.

use ndarray::{Array2, Array3, ArrayView2, Axis};

use crate::config::MoeConfig;
use crate::error::{Error, Result};
use crate::real::Real;
use crate::reference::ffn::{expert_backward, matmul_nn, matmul_tn};
use crate::reference::forward::{Forward, check_routing, check_tokens, slots_by_expert};
use crate::reference::weights::MoeWeights;
use crate::routing::TopK;

/// Gradients of a loss with respect to the layer's input and weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Grads<T> {
    /// `[M, H]`: through the experts and through the router.
    pub dx: Array2<T>,
    /// `[E, H]`: router weight gradient `dlogitsᵀ · x`.
    pub dwr: Array2<T>,
    /// `[E, n0, H]`.
    pub dw0: Array3<T>,
    /// `[E, H, F]`.
    pub dw1: Array3<T>,
    /// `[M, E]`: gradient of the router logits (what a GPU router backward must produce).
    pub dlogits: Array2<T>,
}

/// `dlogits` (f64) from the slot-weight gradients `dw[t, j]` (f64), through the optional
/// renormalisation and the softmax (ARCHITECTURE.md, "Backward"):
/// renormalised `dp[e_j] = (dw_j − Σ_i dw_i · w_i) / S` with `S = Σ_i p[e_i]`, else
/// `dp[e_j] = dw_j`; `dp = 0` for unselected experts; `dlogits = p ⊙ (dp − ⟨dp, p⟩)`.
pub(crate) fn router_backward<T: Real>(
    renormalize: bool,
    r: &TopK<T>,
    dw: &Array2<f64>,
) -> Array2<f64> {
    let (m, k) = r.ids.dim();
    let e = r.probs.ncols();
    let mut dl = Array2::<f64>::zeros((m, e));
    let mut dp = vec![0.0f64; e];
    for t in 0..m {
        dp.iter_mut().for_each(|v| *v = 0.0);
        let p = r.probs.row(t);
        if renormalize {
            let s: f64 = (0..k).map(|j| p[r.ids[[t, j]] as usize].to_f64()).sum();
            let dot: f64 = (0..k)
                .map(|j| dw[[t, j]] * r.weights[[t, j]].to_f64())
                .sum();
            for j in 0..k {
                dp[r.ids[[t, j]] as usize] = (dw[[t, j]] - dot) / s;
            }
        } else {
            for j in 0..k {
                dp[r.ids[[t, j]] as usize] = dw[[t, j]];
            }
        }
        let inner: f64 = dp.iter().zip(p.iter()).map(|(d, pv)| d * pv.to_f64()).sum();
        for (x, (d, pv)) in dl.row_mut(t).iter_mut().zip(dp.iter().zip(p.iter())) {
            *x = pv.to_f64() * (d - inner);
        }
    }
    dl
}

/// `⟨a, b⟩` of two rows in f64.
pub(crate) fn dot_f64<T: Real>(a: ndarray::ArrayView1<T>, b: ndarray::ArrayView1<T>) -> f64 {
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| x.to_f64() * y.to_f64())
        .sum()
}

/// The single-rank reference backward of [`crate::reference::forward`] (or
/// [`crate::reference::forward_routed`]) for the upstream gradient `dy` `[M, H]`.
///
/// The top-k choice is piecewise constant, so the gradient is that of the layer with the
/// forward's ids held fixed. Per slot: `dw[t, j] = ⟨dy[t], o_j⟩`, `d_o = weights[t, j] · dy[t]`;
/// per expert (rows in token order): `da = d_o · w1[e]`, `dh = act'(h) ⊙ da`,
/// `dx_rows = dh · w0[e]`, `dw0[e] = dhᵀ · x_rows`, `dw1[e] = d_oᵀ · a`; the router as in
/// ARCHITECTURE.md: `dlogits`, `dwr = dlogitsᵀ · x`, `dx = Σ_j dx_rows + dlogits · wr`.
/// Accumulation in f64, one rounding to `T` per stored tensor.
///
/// # Errors
/// [`Error::ShapeMismatch`] if `w`, `x`, `dy` or `fwd` do not match `cfg` and each other.
pub fn backward<T: Real>(
    cfg: &MoeConfig,
    w: &MoeWeights<T>,
    x: ArrayView2<T>,
    fwd: &Forward<T>,
    dy: ArrayView2<T>,
) -> Result<Grads<T>> {
    let _span =
        tracing::info_span!("reference_backward", tokens = x.nrows(), dtype = T::NAME).entered();
    let (m, k, hid) = (x.nrows(), cfg.top_k(), cfg.hidden());
    w.check(cfg)?;
    check_tokens(cfg, "x [tokens, hidden]", x, m)?;
    check_tokens(cfg, "dy [tokens, hidden] (must match x)", dy, m)?;
    check_routing(cfg, &fwd.routing, m, 0)?;
    for (what, a, cols) in [
        ("forward cache h [tokens*top_k, n0]", &fwd.h, cfg.n0()),
        ("forward cache a [tokens*top_k, ffn]", &fwd.a, cfg.ffn()),
        ("forward cache o [tokens*top_k, hidden]", &fwd.o, hid),
    ] {
        if a.dim() != (m * k, cols) {
            return Err(Error::ShapeMismatch {
                what,
                expected: vec![m * k, cols],
                got: a.shape().to_vec(),
            });
        }
    }
    let r = &fwd.routing;

    // Slot weights' gradient and the weighted upstream rows.
    let mut dw = Array2::<f64>::zeros((m, k));
    let mut d_o = Array2::from_elem((m * k, hid), T::ZERO);
    for t in 0..m {
        for j in 0..k {
            let slot = t * k + j;
            dw[[t, j]] = dot_f64(dy.row(t), fwd.o.row(slot));
            let wt = r.weights[[t, j]].to_f64();
            for (d, &g) in d_o.row_mut(slot).iter_mut().zip(dy.row(t)) {
                *d = T::from_f64(wt * g.to_f64());
            }
        }
    }

    let mut dx = Array2::<f64>::zeros((m, hid));
    let mut dw0 = Array3::from_elem(w.w0.dim(), T::ZERO);
    let mut dw1 = Array3::from_elem(w.w1.dim(), T::ZERO);
    {
        let _s = tracing::info_span!("experts").entered();
        for (e, slots) in slots_by_expert(r.ids.view(), cfg.experts())
            .iter()
            .enumerate()
        {
            if slots.is_empty() {
                continue;
            }
            let tokens: Vec<usize> = slots.iter().map(|&(t, _)| t).collect();
            let rows: Vec<usize> = slots.iter().map(|&(t, j)| t * k + j).collect();
            let g = expert_backward(
                cfg.activation(),
                x.select(Axis(0), &tokens).view(),
                fwd.h.select(Axis(0), &rows).view(),
                fwd.a.select(Axis(0), &rows).view(),
                d_o.select(Axis(0), &rows).view(),
                w.w0.index_axis(Axis(0), e),
                w.w1.index_axis(Axis(0), e),
            );
            dw0.index_axis_mut(Axis(0), e).assign(&g.dw0);
            dw1.index_axis_mut(Axis(0), e).assign(&g.dw1);
            for (r_i, &t) in tokens.iter().enumerate() {
                for (acc, v) in dx.row_mut(t).iter_mut().zip(g.dx.row(r_i)) {
                    *acc += v.to_f64();
                }
            }
        }
    }

    let _s = tracing::info_span!("router_backward").entered();
    let dl = router_backward(cfg.renormalize(), r, &dw);
    let x64 = x.mapv(T::to_f64);
    let dwr = matmul_tn(dl.view(), x64.view()).mapv(T::from_f64);
    dx += &matmul_nn(dl.view(), w.wr.mapv(T::to_f64).view());
    Ok(Grads {
        dx: dx.mapv(T::from_f64),
        dwr,
        dw0,
        dw1,
        dlogits: dl.mapv(T::from_f64),
    })
}
