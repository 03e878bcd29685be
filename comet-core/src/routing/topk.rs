//! Router logits and softmax top-k.

use ndarray::{Array2, ArrayView1, ArrayView2, ArrayViewMut1};

use crate::error::{Error, Result};
use crate::real::Real;

/// The router's decision for `M` tokens, `E` experts and top-`k`.
///
/// `T` is `f32` for everything compared against the GPU (the default) and `f64` in the
/// gradient checks.
#[derive(Debug, Clone, PartialEq)]
pub struct TopK<T = f32> {
    /// `[M, k]`: chosen experts per token, slot 0 the most probable (ties: lower id first).
    /// The ids of one token are distinct.
    pub ids: Array2<u32>,
    /// `[M, k]`: combine weight of each slot: `probs[t, ids[t, j]]`, or that divided by
    /// the sum over the token's k slots when renormalising.
    pub weights: Array2<T>,
    /// `[M, E]`: softmax of the logits over all experts.
    pub probs: Array2<T>,
}

impl<T: Real> TopK<T> {
    /// Number of tokens `M`.
    pub fn tokens(&self) -> usize {
        self.ids.nrows()
    }

    /// Experts per token `k`.
    pub fn top_k(&self) -> usize {
        self.ids.ncols()
    }
}

/// Router logits `x · wrᵀ`: `x` `[M, H]`, `wr` `[E, H]` → `[M, E]`.
///
/// Definition: `logits[t, e] = round_T(Σ_{h = 0..H} x[t, h] · wr[e, h])`, products and sum
/// in f64 in ascending `h`, rounded once to `T`. (The GPU router accumulates in f32, so its
/// logits differ by rounding; compare them with a tolerance.)
///
/// # Errors
/// [`Error::ShapeMismatch`] if the hidden sizes differ.
pub fn router_logits<T: Real>(x: ArrayView2<T>, wr: ArrayView2<T>) -> Result<Array2<T>> {
    if x.ncols() != wr.ncols() {
        return Err(Error::ShapeMismatch {
            what: "router weight wr [experts, hidden] (hidden must match x [tokens, hidden])",
            expected: vec![wr.nrows(), x.ncols()],
            got: vec![wr.nrows(), wr.ncols()],
        });
    }
    let _span =
        tracing::debug_span!("router_logits", tokens = x.nrows(), experts = wr.nrows()).entered();
    let wr64 = wr.mapv(T::to_f64);
    let mut out = Array2::from_elem((x.nrows(), wr.nrows()), T::ZERO);
    for (xt, mut ot) in x.rows().into_iter().zip(out.rows_mut()) {
        let xt64: Vec<f64> = xt.iter().map(|v| v.to_f64()).collect();
        for (we, o) in wr64.rows().into_iter().zip(ot.iter_mut()) {
            let mut acc = 0.0f64;
            for (a, b) in xt64.iter().zip(we.iter()) {
                acc += a * b;
            }
            *o = T::from_f64(acc);
        }
    }
    Ok(out)
}

/// Softmax of one token's logits into `out`, in `T` arithmetic.
///
/// Definition (all operations in `T`): `m = max_e l[e]`; `z[e] = exp(l[e] − m)`;
/// `s = z[0] + z[1] + … + z[E−1]` summed left to right; `p[e] = z[e] / s`.
///
/// # Errors
/// [`Error::NonFiniteLogit`] (reported as token 0; [`top_k`] reports the real token) and
/// [`Error::ShapeMismatch`] if `out` has another length.
pub fn softmax_row<T: Real>(logits: ArrayView1<T>, mut out: ArrayViewMut1<T>) -> Result<()> {
    softmax_into(0, logits, &mut out)
}

fn softmax_into<T: Real>(token: usize, l: ArrayView1<T>, out: &mut ArrayViewMut1<T>) -> Result<()> {
    if out.len() != l.len() {
        return Err(Error::ShapeMismatch {
            what: "softmax output (must match the logits)",
            expected: vec![l.len()],
            got: vec![out.len()],
        });
    }
    let mut m: Option<T> = None;
    for (e, &v) in l.iter().enumerate() {
        if !v.is_finite() {
            return Err(Error::NonFiniteLogit {
                token,
                expert: e,
                value: v.to_f64(),
            });
        }
        m = match m {
            Some(mm) if mm >= v => Some(mm),
            _ => Some(v),
        };
    }
    let Some(m) = m else { return Ok(()) };
    let mut s = T::ZERO;
    for (o, &v) in out.iter_mut().zip(l.iter()) {
        let z = (v - m).exp();
        *o = z;
        s += z;
    }
    for o in out.iter_mut() {
        *o = *o / s;
    }
    Ok(())
}

/// Softmax over experts, then top-k, then (optionally) renormalisation, per token.
///
/// Definition, per token `t` (all arithmetic in `T`):
/// 1. `p = softmax(logits[t])` exactly as [`softmax_row`].
/// 2. Slot `j = 0..k` holds the expert with the `j`-th largest `p`; equal `p` are ordered by
///    lower expert id first. Equivalently: sort expert ids by the key `(−p[e], e)` and take
///    the first `k`. (So ties go to the lower id, and the slots are in descending `p`.)
/// 3. `weights[t, j] = p[ids[t, j]]`, or with `renormalize`:
///    `S = p[ids[t,0]] + … + p[ids[t,k−1]]` summed in slot order, then
///    `weights[t, j] = p[ids[t, j]] / S`.
///
/// # Errors
/// [`Error::ZeroSize`] for zero experts (logit columns), [`Error::TopKZero`],
/// [`Error::TopKExceedsExperts`], [`Error::ExceedsIndexType`] if expert ids do not fit
/// `u32`, and [`Error::NonFiniteLogit`] naming the token and expert of a NaN/∞ logit.
pub fn top_k<T: Real>(logits: ArrayView2<T>, k: usize, renormalize: bool) -> Result<TopK<T>> {
    let (m, e) = logits.dim();
    if e == 0 {
        return Err(Error::ZeroSize { name: "experts" });
    }
    if k == 0 {
        return Err(Error::TopKZero);
    }
    if k > e {
        return Err(Error::TopKExceedsExperts {
            top_k: k,
            experts: e,
        });
    }
    if u32::try_from(e).is_err() {
        return Err(Error::ExceedsIndexType {
            what: "router logits [tokens, experts] (expert ids are u32)",
            elements: e as u128,
            limit: u64::from(u32::MAX),
        });
    }
    let _span = tracing::debug_span!("top_k", tokens = m, experts = e, k).entered();
    let mut probs = Array2::from_elem((m, e), T::ZERO);
    let mut ids = Array2::<u32>::zeros((m, k));
    let mut weights = Array2::from_elem((m, k), T::ZERO);
    let mut taken = vec![false; e];
    for t in 0..m {
        let mut p = probs.row_mut(t);
        softmax_into(t, logits.row(t), &mut p)?;
        taken.iter_mut().for_each(|v| *v = false);
        for j in 0..k {
            // Largest p among the untaken experts; a later id replaces the best only if strictly
            // larger, so ties keep the lower id (p is never NaN: the logits are finite).
            let mut best: Option<usize> = None;
            for (i, &pi) in p.iter().enumerate() {
                if taken[i] {
                    continue;
                }
                match best {
                    Some(b) if pi <= p[b] => {}
                    _ => best = Some(i),
                }
            }
            // k <= e guarantees an untaken expert exists.
            let Some(b) = best else { break };
            taken[b] = true;
            // b < e <= u32::MAX + 1 was checked above.
            ids[[t, j]] = b as u32;
            weights[[t, j]] = p[b];
        }
        if renormalize {
            let mut s = T::ZERO;
            for j in 0..k {
                s += weights[[t, j]];
            }
            for j in 0..k {
                weights[[t, j]] = weights[[t, j]] / s;
            }
        }
    }
    Ok(TopK {
        ids,
        weights,
        probs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn logits_are_x_times_wr_transposed() {
        let x = array![[1.0f64, 2.0], [0.5, -1.0], [0.0, 0.0]];
        let wr = array![[1.0f64, 0.0], [0.0, 1.0], [1.0, 1.0]];
        let l = router_logits(x.view(), wr.view()).unwrap();
        assert_eq!(
            l,
            array![[1.0, 2.0, 3.0], [0.5, -1.0, -0.5], [0.0, 0.0, 0.0]]
        );
        let bad = array![[1.0f64, 0.0, 0.0]];
        assert!(matches!(
            router_logits(x.view(), bad.view()),
            Err(Error::ShapeMismatch { .. })
        ));
    }

    #[test]
    fn f32_logits_round_the_f64_sum_once() {
        // 1 + 2^-30 - 1 in f32 accumulation loses the small term; f64 keeps it.
        let x = array![[1.0f32, 2f32.powi(-30), -1.0]];
        let wr = array![[1.0f32, 1.0, 1.0]];
        let l = router_logits(x.view(), wr.view()).unwrap();
        assert_eq!(l[[0, 0]], 2f32.powi(-30));
    }

    #[test]
    fn top_k_orders_by_probability_and_breaks_ties_to_lower_id() {
        let l = array![[0.0f32, 3.0, 1.0, 3.0, -2.0], [1.0, 1.0, 1.0, 1.0, 1.0]];
        let r = top_k(l.view(), 3, false).unwrap();
        assert_eq!(r.ids, array![[1u32, 3, 2], [0, 1, 2]]);
        for t in 0..2 {
            let s: f32 = r.probs.row(t).sum();
            assert!((s - 1.0).abs() < 1e-6);
            for j in 0..3 {
                assert_eq!(r.weights[[t, j]], r.probs[[t, r.ids[[t, j]] as usize]]);
            }
        }
        assert_eq!(r.weights[[1, 0]], 0.2);
    }

    #[test]
    fn softmax_matches_its_definition_exactly() {
        let l = array![[0.3f32, -1.25, 2.0, 0.7]];
        let r = top_k(l.view(), 1, false).unwrap();
        let m = 2.0f32;
        let z: Vec<f32> = l.row(0).iter().map(|v| (v - m).exp()).collect();
        let s = z[0] + z[1] + z[2] + z[3];
        for (e, ze) in z.iter().enumerate() {
            assert_eq!(r.probs[[0, e]], ze / s);
        }
        let mut out = ndarray::Array1::zeros(4);
        softmax_row(l.row(0), out.view_mut()).unwrap();
        assert_eq!(out, r.probs.row(0));
    }

    #[test]
    fn renormalised_weights_sum_to_one() {
        let l = array![[0.1f64, 0.4, -0.3, 2.0, 0.0, 1.5]];
        let r = top_k(l.view(), 3, true).unwrap();
        assert_eq!(r.ids, array![[3u32, 5, 1]]);
        let ps: Vec<f64> = (0..3)
            .map(|j| r.probs[[0, r.ids[[0, j]] as usize]])
            .collect();
        let s = ps[0] + ps[1] + ps[2];
        for (j, pj) in ps.iter().enumerate() {
            assert_eq!(r.weights[[0, j]], pj / s);
        }
        assert!((r.weights.sum() - 1.0).abs() < 1e-15);
    }

    #[test]
    fn top_k_rejects_bad_input_with_named_values() {
        let l = array![[0.0f32, 1.0], [f32::NAN, 0.0]];
        assert_eq!(top_k(l.view(), 0, false), Err(Error::TopKZero));
        assert_eq!(
            top_k(l.view(), 3, false),
            Err(Error::TopKExceedsExperts {
                top_k: 3,
                experts: 2
            })
        );
        let e = top_k(l.view(), 1, false).unwrap_err();
        assert!(
            matches!(e, Error::NonFiniteLogit { token: 1, expert: 0, value } if value.is_nan()),
            "{e}"
        );
        let inf = array![[0.0f32, f32::NEG_INFINITY]];
        assert!(matches!(
            top_k(inf.view(), 1, false),
            Err(Error::NonFiniteLogit {
                token: 0,
                expert: 1,
                ..
            })
        ));
        let none = Array2::<f32>::zeros((3, 0));
        assert_eq!(
            top_k(none.view(), 1, false),
            Err(Error::ZeroSize { name: "experts" })
        );
    }

    #[test]
    fn zero_tokens_give_empty_results() {
        let l = Array2::<f32>::zeros((0, 4));
        let r = top_k(l.view(), 2, true).unwrap();
        assert_eq!(r.ids.dim(), (0, 2));
        assert_eq!(r.probs.dim(), (0, 4));
        assert_eq!((r.tokens(), r.top_k()), (0, 2));
    }

    #[test]
    fn large_logit_gaps_underflow_to_zero_probability_without_nan() {
        let l = array![[0.0f32, -200.0, -300.0]];
        let r = top_k(l.view(), 3, true).unwrap();
        assert_eq!(r.ids, array![[0u32, 1, 2]]);
        assert_eq!(r.probs[[0, 0]], 1.0);
        assert_eq!(r.probs[[0, 2]], 0.0);
        assert!(r.weights.iter().all(|w| w.is_finite()));
    }
}
