//! Expert-parallel reference: the layer over `W` simulated ranks, rows moved with the
//! [`RoutingPlan`].

use ndarray::{Array2, Array3, ArrayView2, Axis, s};

use crate::config::{MoeConfig, ParallelConfig};
use crate::error::{Error, Result};
use crate::real::Real;
use crate::reference::backward::{dot_f64, router_backward};
use crate::reference::ffn::{expert_backward, expert_forward, matmul_nn, matmul_tn};
use crate::reference::forward::{check_tokens, weighted_sum};
use crate::reference::weights::MoeWeights;
use crate::routing::{RoutingPlan, TopK, router_logits, top_k};

fn check_world<A>(plan: &RoutingPlan, what: &'static str, v: &[A]) -> Result<()> {
    if v.len() != plan.world() {
        return Err(Error::LengthMismatch {
            what,
            expected: plan.world(),
            got: v.len(),
        });
    }
    Ok(())
}

fn check_rows<T>(what: &'static str, a: ArrayView2<T>, rows: usize, cols: usize) -> Result<()> {
    if a.dim() != (rows, cols) {
        return Err(Error::ShapeMismatch {
            what,
            expected: vec![rows, cols],
            got: a.shape().to_vec(),
        });
    }
    Ok(())
}

/// Packs each rank's token rows into its send layout (`[M_s·k, H]`, row
/// [`RoutingPlan::send_row`]`(s, t, j)` = `xs[s][t]`), as the NCCL baselines do.
///
/// # Errors
/// [`Error::LengthMismatch`] unless one array per rank; [`Error::ShapeMismatch`] if
/// `xs[s]` does not have `M_s` rows or the ranks' widths differ.
pub fn send_buffers<T: Real>(plan: &RoutingPlan, xs: &[ArrayView2<T>]) -> Result<Vec<Array2<T>>> {
    check_world(plan, "token arrays (one per rank)", xs)?;
    let width = xs.first().map_or(0, |x| x.ncols());
    let k = plan.top_k();
    let mut out = Vec::with_capacity(xs.len());
    for (s, x) in xs.iter().enumerate() {
        check_rows("tokens of a rank [M_s, width]", *x, plan.tokens(s), width)?;
        let mut buf = Array2::from_elem((plan.tokens(s) * k, width), T::ZERO);
        for t in 0..plan.tokens(s) {
            for j in 0..k {
                buf.row_mut(plan.send_row(s, t, j)).assign(&x.row(t));
            }
        }
        out.push(buf);
    }
    Ok(out)
}

/// The all-to-all plus permutation of the baselines: rank `d` receives block
/// [`RoutingPlan::send_rows_to`]`(s, d)` of every `s`'s send buffer and places its part for
/// local expert `l` at [`RoutingPlan::segment`]`(d, l, s)`, giving `d`'s receive layout.
///
/// # Errors
/// [`Error::LengthMismatch`] / [`Error::ShapeMismatch`] if `sends` are not the plan's send
/// layouts (`[M_s·k, width]`).
pub fn exchange<T: Real>(plan: &RoutingPlan, sends: &[Array2<T>]) -> Result<Vec<Array2<T>>> {
    check_world(plan, "send buffers (one per rank)", sends)?;
    let width = sends.first().map_or(0, |b| b.ncols());
    for (s, b) in sends.iter().enumerate() {
        check_rows(
            "send buffer [M_s*top_k, width]",
            b.view(),
            plan.tokens(s) * plan.top_k(),
            width,
        )?;
    }
    let (w, l) = (plan.world(), plan.local_experts());
    let mut out = Vec::with_capacity(w);
    for d in 0..w {
        let mut recv = Array2::from_elem((plan.recv_rows(d), width), T::ZERO);
        for (s, b) in sends.iter().enumerate() {
            let mut at = plan.send_rows_to(s, d).start;
            for le in 0..l {
                let seg = plan.segment(d, le, s);
                let n = seg.len();
                recv.slice_mut(s![seg, ..])
                    .assign(&b.slice(s![at..at + n, ..]));
                at += n;
            }
        }
        out.push(recv);
    }
    Ok(out)
}

/// Dispatch: every rank's rows into every rank's receive layout (the layer-0 shared tensor):
/// receive row [`RoutingPlan::dest`]`(s, t, j)` of its rank holds `xs[s][t]`. Computed as
/// [`exchange`]`(`[`send_buffers`]`)`; the Comet path writes the same rows directly through
/// the scatter index.
///
/// # Errors
/// As [`send_buffers`].
pub fn dispatch<T: Real>(plan: &RoutingPlan, xs: &[ArrayView2<T>]) -> Result<Vec<Array2<T>>> {
    let _s = tracing::info_span!("dispatch").entered();
    exchange(plan, &send_buffers(plan, xs)?)
}

/// Combine: `y_s[t] = Σ_{j = 0..k} weights[s][t, j] · outs[d][row]` with
/// `(d, row) = `[`RoutingPlan::dest`]`(s, t, j)`, summed in slot order in f64, rounded once.
///
/// # Errors
/// [`Error::LengthMismatch`] / [`Error::ShapeMismatch`] if `weights[s]` is not `[M_s, k]`
/// or `outs[d]` not `[recv_rows(d), width]`.
pub fn combine<T: Real>(
    plan: &RoutingPlan,
    weights: &[ArrayView2<T>],
    outs: &[ArrayView2<T>],
) -> Result<Vec<Array2<T>>> {
    let _s = tracing::info_span!("combine").entered();
    check_world(plan, "routing weights (one per rank)", weights)?;
    check_world(plan, "expert outputs (one per rank)", outs)?;
    let width = outs.first().map_or(0, |o| o.ncols());
    for (d, o) in outs.iter().enumerate() {
        check_rows(
            "expert output [recv_rows, width]",
            *o,
            plan.recv_rows(d),
            width,
        )?;
    }
    let mut ys = Vec::with_capacity(plan.world());
    for (s, wt) in weights.iter().enumerate() {
        check_rows(
            "routing weights [M_s, top_k]",
            *wt,
            plan.tokens(s),
            plan.top_k(),
        )?;
        ys.push(weighted_sum(*wt, width, |t, j| {
            let (d, row) = plan.dest(s, t, j);
            outs[d].row(row)
        }));
    }
    Ok(ys)
}

/// One simulated rank's forward state.
#[derive(Debug, Clone, PartialEq)]
pub struct RankForward<T> {
    /// `[M_s, H]`: this rank's output.
    pub y: Array2<T>,
    /// Routing of this rank's tokens.
    pub routing: TopK<T>,
    /// `[recv_rows, H]`: the receive layout (layer-0 shared tensor) of this rank.
    pub recv: Array2<T>,
    /// `[recv_rows, n0]`: GEMM0 output, receive layout.
    pub h: Array2<T>,
    /// `[recv_rows, F]`: activation (layer-1 GEMM input), receive layout.
    pub a: Array2<T>,
    /// `[recv_rows, H]`: GEMM1 output (layer-1 shared tensor), receive layout.
    pub o: Array2<T>,
}

/// Result of [`ep_forward`].
#[derive(Debug, Clone, PartialEq)]
pub struct EpForward<T> {
    /// The routing plan of all ranks' tokens.
    pub plan: RoutingPlan,
    /// Per rank, in rank order.
    pub ranks: Vec<RankForward<T>>,
}

/// The expert-parallel reference forward over `W = par.world()` simulated ranks (pure
/// expert parallelism, `tp = 1`), rank `s` holding tokens `xs[s]` and only its local
/// weights ([`MoeWeights::local`]):
/// 1. each rank routes its tokens ([`router_logits`], [`top_k`]);
/// 2. [`RoutingPlan::new`] on all ranks' ids; [`dispatch`] moves rows into each rank's
///    receive layout;
/// 3. each rank runs its local experts on their contiguous rows
///    ([`RoutingPlan::expert_rows`]);
/// 4. [`combine`] brings the outputs back to the token owners.
///
/// Equals [`crate::reference::forward`] on the concatenated tokens (up to f64 summation
/// order; the tests check it).
///
/// # Errors
/// [`Error::TensorParallelUnsupported`] for `tp > 1`; [`Error::ExpertsNotDivisible`];
/// [`Error::LengthMismatch`] unless `xs.len() == world`; [`Error::ShapeMismatch`] for
/// weights or tokens of the wrong shape.
pub fn ep_forward<T: Real>(
    cfg: &MoeConfig,
    par: &ParallelConfig,
    w: &MoeWeights<T>,
    xs: &[Array2<T>],
) -> Result<EpForward<T>> {
    let _span = tracing::info_span!("ep_forward", world = par.world(), dtype = T::NAME).entered();
    if par.tp() != 1 {
        return Err(Error::TensorParallelUnsupported {
            what: "the expert-parallel reference",
            tp: par.tp(),
        });
    }
    par.validate_for(cfg)?;
    w.check(cfg)?;
    let world = par.world();
    if xs.len() != world {
        return Err(Error::LengthMismatch {
            what: "token arrays xs (one per rank)",
            expected: world,
            got: xs.len(),
        });
    }
    let mut routings = Vec::with_capacity(world);
    {
        let _s = tracing::info_span!("router").entered();
        for x in xs {
            check_tokens(cfg, "x of a rank [tokens, hidden]", x.view(), x.nrows())?;
            let logits = router_logits(x.view(), w.wr.view())?;
            routings.push(top_k(logits.view(), cfg.top_k(), cfg.renormalize())?);
        }
    }
    let ids: Vec<_> = routings.iter().map(|r| r.ids.view()).collect();
    let plan = RoutingPlan::new(&ids, cfg.experts(), world)?;
    let views: Vec<_> = xs.iter().map(|x| x.view()).collect();
    let recvs = dispatch(&plan, &views)?;

    let l = plan.local_experts();
    let mut outs = Vec::with_capacity(world);
    {
        let _s = tracing::info_span!("experts").entered();
        for (d, recv) in recvs.iter().enumerate() {
            let lw = w.local(d, par)?;
            let rows = plan.recv_rows(d);
            let mut h = Array2::from_elem((rows, cfg.n0()), T::ZERO);
            let mut a = Array2::from_elem((rows, cfg.ffn()), T::ZERO);
            let mut o = Array2::from_elem((rows, cfg.hidden()), T::ZERO);
            for le in 0..l {
                let r = plan.expert_rows(d, le);
                if r.is_empty() {
                    continue;
                }
                let (he, ae, oe) = expert_forward(
                    cfg.activation(),
                    recv.slice(s![r.clone(), ..]),
                    lw.w0.index_axis(Axis(0), le),
                    lw.w1.index_axis(Axis(0), le),
                );
                h.slice_mut(s![r.clone(), ..]).assign(&he);
                a.slice_mut(s![r.clone(), ..]).assign(&ae);
                o.slice_mut(s![r, ..]).assign(&oe);
            }
            outs.push((h, a, o));
        }
    }
    let wv: Vec<_> = routings.iter().map(|r| r.weights.view()).collect();
    let ov: Vec<_> = outs.iter().map(|(_, _, o)| o.view()).collect();
    let ys = combine(&plan, &wv, &ov)?;
    let ranks = ys
        .into_iter()
        .zip(routings)
        .zip(recvs)
        .zip(outs)
        .map(|(((y, routing), recv), (h, a, o))| RankForward {
            y,
            routing,
            recv,
            h,
            a,
            o,
        })
        .collect();
    Ok(EpForward { plan, ranks })
}

/// One simulated rank's backward state.
#[derive(Debug, Clone, PartialEq)]
pub struct RankGrads<T> {
    /// `[M_s, H]`: gradient of this rank's tokens.
    pub dx: Array2<T>,
    /// `[M_s, E]`: gradient of this rank's router logits.
    pub dlogits: Array2<T>,
    /// `[recv_rows, H]`: `weights[t, j] · dy_s[t]` dispatched to the receive layout (the
    /// gradient of GEMM1's output).
    pub d_out: Array2<T>,
    /// `[recv_rows, F]`: gradient of the activation, receive layout.
    pub da: Array2<T>,
    /// `[recv_rows, n0]`: gradient of GEMM0's output, receive layout.
    pub dh: Array2<T>,
    /// `[recv_rows, H]`: `dh · w0[e]` per row, receive layout (combined back into `dx`).
    pub dx_rows: Array2<T>,
}

/// Result of [`ep_backward`].
#[derive(Debug, Clone, PartialEq)]
pub struct EpGrads<T> {
    /// Per rank, in rank order.
    pub ranks: Vec<RankGrads<T>>,
    /// `[E, H]`: router weight gradient summed over ranks in rank order.
    pub dwr: Array2<T>,
    /// `[E, n0, H]`: each expert's gradient, computed on its owning rank.
    pub dw0: Array3<T>,
    /// `[E, H, F]`: each expert's gradient, computed on its owning rank.
    pub dw1: Array3<T>,
}

/// The expert-parallel reference backward of [`ep_forward`] for upstream gradients `dys`
/// (`dys[s]` `[M_s, H]`): per slot `dw = ⟨dy_s[t], o⟩`; `weights · dy` rows dispatched to the
/// experts' ranks; expert backward on each rank's contiguous rows; `dx_rows` combined back
/// (unweighted, slot order); router backward per rank; `dwr` summed in rank order.
///
/// Equals [`crate::reference::backward`] on the concatenated tokens (tests check it).
///
/// # Errors
/// As [`ep_forward`], plus [`Error::ShapeMismatch`] / [`Error::LengthMismatch`] if `fwd` or
/// `dys` do not match `xs`.
pub fn ep_backward<T: Real>(
    cfg: &MoeConfig,
    par: &ParallelConfig,
    w: &MoeWeights<T>,
    xs: &[Array2<T>],
    fwd: &EpForward<T>,
    dys: &[Array2<T>],
) -> Result<EpGrads<T>> {
    let _span = tracing::info_span!("ep_backward", world = par.world(), dtype = T::NAME).entered();
    if par.tp() != 1 {
        return Err(Error::TensorParallelUnsupported {
            what: "the expert-parallel reference",
            tp: par.tp(),
        });
    }
    par.validate_for(cfg)?;
    w.check(cfg)?;
    let plan = &fwd.plan;
    if plan.world() != par.world() || plan.experts() != cfg.experts() || plan.top_k() != cfg.top_k()
    {
        return Err(Error::ShapeMismatch {
            what: "forward plan [world, experts, top_k] (must match par and cfg)",
            expected: vec![par.world(), cfg.experts(), cfg.top_k()],
            got: vec![plan.world(), plan.experts(), plan.top_k()],
        });
    }
    check_world(plan, "token arrays xs (one per rank)", xs)?;
    check_world(plan, "upstream gradients dys (one per rank)", dys)?;
    check_world(plan, "forward rank states", &fwd.ranks)?;
    let (k, hid, l) = (cfg.top_k(), cfg.hidden(), plan.local_experts());
    for (s, ((x, dy), rf)) in xs.iter().zip(dys).zip(&fwd.ranks).enumerate() {
        check_tokens(cfg, "x of a rank [M_s, hidden]", x.view(), plan.tokens(s))?;
        check_tokens(cfg, "dy of a rank [M_s, hidden]", dy.view(), plan.tokens(s))?;
        let rows = plan.recv_rows(s);
        check_rows("forward h [recv_rows, n0]", rf.h.view(), rows, cfg.n0())?;
        check_rows("forward a [recv_rows, ffn]", rf.a.view(), rows, cfg.ffn())?;
        check_rows("forward o [recv_rows, hidden]", rf.o.view(), rows, hid)?;
        check_rows(
            "forward recv [recv_rows, hidden]",
            rf.recv.view(),
            rows,
            hid,
        )?;
        check_rows(
            "forward weights [M_s, top_k]",
            rf.routing.weights.view(),
            plan.tokens(s),
            k,
        )?;
        check_rows(
            "forward probs [M_s, experts]",
            rf.routing.probs.view(),
            plan.tokens(s),
            cfg.experts(),
        )?;
    }

    // Slot-weight gradients and the weighted upstream rows, in the receive layout.
    let mut dws = Vec::with_capacity(plan.world());
    let mut d_outs: Vec<Array2<T>> = (0..plan.world())
        .map(|d| Array2::from_elem((plan.recv_rows(d), hid), T::ZERO))
        .collect();
    {
        let _s = tracing::info_span!("dispatch_dy").entered();
        for (s, dy) in dys.iter().enumerate() {
            let wts = &fwd.ranks[s].routing.weights;
            let mut dw = Array2::<f64>::zeros((plan.tokens(s), k));
            for t in 0..plan.tokens(s) {
                for j in 0..k {
                    let (d, row) = plan.dest(s, t, j);
                    dw[[t, j]] = dot_f64(dy.row(t), fwd.ranks[d].o.row(row));
                    let wt = wts[[t, j]].to_f64();
                    for (o, &g) in d_outs[d].row_mut(row).iter_mut().zip(dy.row(t)) {
                        *o = T::from_f64(wt * g.to_f64());
                    }
                }
            }
            dws.push(dw);
        }
    }

    let mut dw0 = Array3::from_elem(w.w0.dim(), T::ZERO);
    let mut dw1 = Array3::from_elem(w.w1.dim(), T::ZERO);
    let mut per_rank = Vec::with_capacity(plan.world());
    {
        let _s = tracing::info_span!("experts").entered();
        for (d, d_out) in d_outs.into_iter().enumerate() {
            let lw = w.local(d, par)?;
            let rf = &fwd.ranks[d];
            let rows = plan.recv_rows(d);
            let mut da = Array2::from_elem((rows, cfg.ffn()), T::ZERO);
            let mut dh = Array2::from_elem((rows, cfg.n0()), T::ZERO);
            let mut dx_rows = Array2::from_elem((rows, hid), T::ZERO);
            for le in 0..l {
                let r = plan.expert_rows(d, le);
                if r.is_empty() {
                    continue;
                }
                let g = expert_backward(
                    cfg.activation(),
                    rf.recv.slice(s![r.clone(), ..]),
                    rf.h.slice(s![r.clone(), ..]),
                    rf.a.slice(s![r.clone(), ..]),
                    d_out.slice(s![r.clone(), ..]),
                    lw.w0.index_axis(Axis(0), le),
                    lw.w1.index_axis(Axis(0), le),
                );
                let e = d * l + le;
                dw0.index_axis_mut(Axis(0), e).assign(&g.dw0);
                dw1.index_axis_mut(Axis(0), e).assign(&g.dw1);
                da.slice_mut(s![r.clone(), ..]).assign(&g.da);
                dh.slice_mut(s![r.clone(), ..]).assign(&g.dh);
                dx_rows.slice_mut(s![r, ..]).assign(&g.dx);
            }
            per_rank.push((d_out, da, dh, dx_rows));
        }
    }

    let _s = tracing::info_span!("combine_dx_and_router").entered();
    let ones: Vec<Array2<T>> = (0..plan.world())
        .map(|s| Array2::from_elem((plan.tokens(s), k), T::ONE))
        .collect();
    let ov: Vec<_> = ones.iter().map(|a| a.view()).collect();
    let dxv: Vec<_> = per_rank.iter().map(|(_, _, _, dx)| dx.view()).collect();
    let dx_experts = combine(plan, &ov, &dxv)?;
    let wr64 = w.wr.mapv(T::to_f64);
    let mut dwr = Array2::<f64>::zeros(w.wr.dim());
    let mut ranks = Vec::with_capacity(plan.world());
    for (s, ((dxe, dw), (d_out, da, dh, dx_rows))) in
        dx_experts.into_iter().zip(&dws).zip(per_rank).enumerate()
    {
        let dl = router_backward(cfg.renormalize(), &fwd.ranks[s].routing, dw);
        dwr += &matmul_tn(dl.view(), xs[s].mapv(T::to_f64).view());
        let dx = dxe.mapv(T::to_f64) + matmul_nn(dl.view(), wr64.view());
        ranks.push(RankGrads {
            dx: dx.mapv(T::from_f64),
            dlogits: dl.mapv(T::from_f64),
            d_out,
            da,
            dh,
            dx_rows,
        });
    }
    Ok(EpGrads {
        ranks,
        dwr: dwr.mapv(T::from_f64),
        dw0,
        dw1,
    })
}
