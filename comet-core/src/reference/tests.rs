//! Tests of the reference: against naive loops, finite differences (f64), f32 vs f64, and
//! the expert-parallel simulation against the single-rank layer.

use ndarray::{Array2, Axis, concatenate, s};

use super::*;
use crate::config::{MoeConfig, ParallelConfig};
use crate::dtype::Activation;
use crate::error::Error;
use crate::numeric::{random_array, random_normal_f64, rel_l2};
use crate::routing::{RoutingPlan, TopK, router_logits, top_k};

fn cfg(h: usize, f: usize, e: usize, k: usize, act: Activation, renorm: bool) -> MoeConfig {
    MoeConfig::new(h, f, e, k)
        .unwrap()
        .with_activation(act)
        .with_renormalize(renorm)
}

fn flat(a: &Array2<f64>) -> Vec<f64> {
    a.iter().copied().collect()
}

/// Every combination of activation and renormalisation.
fn variants() -> Vec<(Activation, bool)> {
    Activation::ALL
        .iter()
        .flat_map(|&a| [(a, false), (a, true)])
        .collect()
}

#[test]
fn forward_matches_naive_loops() {
    for (act, renorm) in variants() {
        let c = cfg(7, 5, 6, 3, act, renorm);
        let w = MoeWeights::<f64>::random(&c, 21);
        let x = random_normal_f64((9, 7), 22);
        let fwd = forward(&c, &w, x.view()).unwrap();
        // Routing is exactly the routing module's definition.
        let logits = router_logits(x.view(), w.wr.view()).unwrap();
        assert_eq!(fwd.routing, top_k(logits.view(), 3, renorm).unwrap());
        let f = c.ffn();
        for t in 0..9 {
            let mut y = [0.0f64; 7];
            for j in 0..3 {
                let e = fwd.routing.ids[[t, j]] as usize;
                let h: Vec<f64> = (0..c.n0())
                    .map(|r| (0..7).map(|i| x[[t, i]] * w.w0[[e, r, i]]).sum())
                    .collect();
                let a: Vec<f64> = match act {
                    Activation::SwiGlu => (0..f).map(|i| silu(h[i]) * h[f + i]).collect(),
                    Activation::Gelu => h.iter().map(|&v| gelu(v)).collect(),
                };
                for (hh, yv) in y.iter_mut().enumerate() {
                    let o: f64 = (0..f).map(|i| a[i] * w.w1[[e, hh, i]]).sum();
                    assert!((o - fwd.o[[t * 3 + j, hh]]).abs() < 1e-13);
                    *yv += fwd.routing.weights[[t, j]] * o;
                }
            }
            for (hh, yv) in y.iter().enumerate() {
                assert!((yv - fwd.y[[t, hh]]).abs() < 1e-13, "{act} t{t} h{hh}");
            }
        }
    }
}

#[test]
fn forward_routed_with_the_routers_decision_equals_forward() {
    let c = cfg(8, 6, 4, 2, Activation::SwiGlu, true);
    let w = MoeWeights::<f32>::random(&c, 1);
    let x = crate::numeric::random_normal((10, 8), 2);
    let fwd = forward(&c, &w, x.view()).unwrap();
    let again = forward_routed(&c, &w, x.view(), fwd.routing.clone()).unwrap();
    assert_eq!(again, fwd);
    // A different (valid) routing changes the output.
    let mut other = fwd.routing.clone();
    other
        .ids
        .column_mut(0)
        .iter_mut()
        .for_each(|e| *e = (*e + 1) % 4);
    other
        .ids
        .column_mut(1)
        .iter_mut()
        .for_each(|e| *e = (*e + 1) % 4);
    let changed = forward_routed(&c, &w, x.view(), other).unwrap();
    assert!(rel_l2(changed.y.as_slice().unwrap(), fwd.y.as_slice().unwrap()) > 1e-3);
}

#[test]
fn f32_reference_tracks_f64() {
    for (act, renorm) in variants() {
        let c = cfg(32, 24, 8, 2, act, renorm);
        let w64 = MoeWeights::<f64>::random(&c, 5);
        let w32 = MoeWeights::<f32>::random(&c, 5);
        let x64: Array2<f64> = random_array((40, 32), 1.0, 6);
        let x32 = x64.mapv(|v| v as f32);
        let f64r = forward(&c, &w64, x64.view()).unwrap();
        let f32r = forward(&c, &w32, x32.view()).unwrap();
        assert_eq!(
            f32r.routing.ids, f64r.routing.ids,
            "seeds chosen without near-ties"
        );
        let e = rel_l2(f32r.y.as_slice().unwrap(), f64r.y.as_slice().unwrap());
        assert!(e < 1e-5, "{act} {renorm}: {e}");
        assert!(e > 0.0, "f32 must actually round");
        let dy: Array2<f64> = random_array((40, 32), 1.0, 7);
        let g64 = backward(&c, &w64, x64.view(), &f64r, dy.view()).unwrap();
        let g32 = backward(&c, &w32, x32.view(), &f32r, dy.mapv(|v| v as f32).view()).unwrap();
        for (name, a, b) in [
            (
                "dx",
                g32.dx.iter().copied().collect::<Vec<f32>>(),
                flat(&g64.dx),
            ),
            ("dwr", g32.dwr.iter().copied().collect(), flat(&g64.dwr)),
        ] {
            let e = rel_l2(&a, &b);
            assert!(e < 1e-4, "{name}: {e}");
        }
        let e = rel_l2(g32.dw0.as_slice().unwrap(), g64.dw0.as_slice().unwrap());
        assert!(e < 1e-5, "dw0 {e}");
    }
}

/// Smallest gap, over tokens, between the k-th and (k+1)-th largest probability.
fn routing_margin(r: &TopK<f64>, k: usize) -> f64 {
    let mut m = f64::INFINITY;
    for p in r.probs.rows() {
        let mut v: Vec<f64> = p.to_vec();
        v.sort_by(|a, b| b.total_cmp(a));
        if k < v.len() {
            m = m.min(v[k - 1] - v[k]);
        }
    }
    m
}

#[derive(Clone, Copy, Debug)]
enum Param {
    X,
    Wr,
    W0,
    W1,
}

fn param<'a>(p: Param, w: &'a mut MoeWeights<f64>, x: &'a mut Array2<f64>) -> &'a mut [f64] {
    match p {
        Param::X => x.as_slice_mut().unwrap(),
        Param::Wr => w.wr.as_slice_mut().unwrap(),
        Param::W0 => w.w0.as_slice_mut().unwrap(),
        Param::W1 => w.w1.as_slice_mut().unwrap(),
    }
}

/// Central finite differences of `L = Σ y ⊙ g` against `backward`, all four gradients.
fn gradient_check(c: &MoeConfig, m: usize, seed: u64) {
    // Pick a deterministic seed whose routing has a clear margin, so that ±eps never flips
    // the top-k choice (asserted again for every perturbation below).
    let (mut w, mut x, base) = (0..200u64)
        .map(|i| {
            let w = MoeWeights::<f64>::random(c, seed + 10 * i);
            let x = random_normal_f64((m, c.hidden()), seed + 10 * i + 7);
            let f = forward(c, &w, x.view()).unwrap();
            (w, x, f)
        })
        .find(|(_, _, f)| routing_margin(&f.routing, c.top_k()) > 1e-3)
        .expect("a seed with a routing margin");
    let g = random_normal_f64((m, c.hidden()), seed + 3);
    let grads = backward(c, &w, x.view(), &base, g.view()).unwrap();
    let loss = |w: &MoeWeights<f64>, x: &Array2<f64>| {
        let f = forward(c, w, x.view()).unwrap();
        assert_eq!(
            f.routing.ids, base.routing.ids,
            "a perturbation flipped the top-k choice"
        );
        (&f.y * &g).sum()
    };
    let eps = 1e-6;
    for (p, analytic) in [
        (Param::X, flat(&grads.dx)),
        (Param::Wr, flat(&grads.dwr)),
        (Param::W0, grads.dw0.iter().copied().collect()),
        (Param::W1, grads.dw1.iter().copied().collect()),
    ] {
        let n = param(p, &mut w, &mut x).len();
        let mut fd = Vec::with_capacity(n);
        for i in 0..n {
            let v0 = param(p, &mut w, &mut x)[i];
            param(p, &mut w, &mut x)[i] = v0 + eps;
            let lp = loss(&w, &x);
            param(p, &mut w, &mut x)[i] = v0 - eps;
            let lm = loss(&w, &x);
            param(p, &mut w, &mut x)[i] = v0;
            fd.push((lp - lm) / (2.0 * eps));
        }
        let norm = analytic.iter().map(|v| v * v).sum::<f64>().sqrt();
        assert!(norm > 1e-3, "{p:?}: gradient is trivially small ({norm})");
        let err = rel_l2(&fd, &analytic);
        eprintln!(
            "GRADCHECK {p:?} {} renorm={} k={}: {err:e}",
            c.activation(),
            c.renormalize(),
            c.top_k()
        );
        assert!(
            err < 1e-6,
            "{:?} {} renorm={} k={}: relative error {err:e}",
            p,
            c.activation(),
            c.renormalize(),
            c.top_k()
        );
    }
}

#[test]
fn gradients_match_finite_differences() {
    for (i, (act, renorm)) in variants().into_iter().enumerate() {
        gradient_check(&cfg(6, 4, 5, 2, act, renorm), 7, 100 + i as u64);
    }
    // k = 3 and a single expert per token.
    gradient_check(&cfg(5, 3, 4, 3, Activation::SwiGlu, true), 6, 300);
    gradient_check(&cfg(5, 3, 4, 1, Activation::Gelu, false), 6, 400);
}

/// Runs the EP reference and the single-rank reference on the same tokens and compares.
fn ep_matches_single(c: &MoeConfig, world: usize, tokens: &[usize], zero_router: bool, seed: u64) {
    let par = ParallelConfig::expert_parallel(world).unwrap();
    let mut w = MoeWeights::<f64>::random(c, seed);
    if zero_router {
        // All logits equal: every token picks experts 0..k (ties to the lower id), so those
        // experts get every token and all others are empty.
        w.wr.fill(0.0);
    }
    let xs: Vec<Array2<f64>> = tokens
        .iter()
        .enumerate()
        .map(|(s, &m)| random_normal_f64((m, c.hidden()), seed + 1 + s as u64))
        .collect();
    let dys: Vec<Array2<f64>> = tokens
        .iter()
        .enumerate()
        .map(|(s, &m)| random_normal_f64((m, c.hidden()), seed + 100 + s as u64))
        .collect();
    let cat = |v: &[Array2<f64>]| {
        let views: Vec<_> = v.iter().map(|a| a.view()).collect();
        concatenate(Axis(0), &views).unwrap()
    };
    let (x, dy) = (cat(&xs), cat(&dys));
    let single = forward(c, &w, x.view()).unwrap();
    let sg = backward(c, &w, x.view(), &single, dy.view()).unwrap();
    let ep = ep_forward(c, &par, &w, &xs).unwrap();
    let eg = ep_backward(c, &par, &w, &xs, &ep, &dys).unwrap();
    let tol = 1e-12;
    let close = |what: &str, a: &[f64], b: &[f64]| {
        let e = rel_l2(a, b);
        assert!(e < tol, "{what} (world {world}): {e:e}");
    };
    let mut at = 0;
    for (s, &m) in tokens.iter().enumerate() {
        let r = at..at + m;
        let rank = &ep.ranks[s];
        assert_eq!(
            rank.routing.ids,
            single.routing.ids.slice(s![r.clone(), ..])
        );
        close(
            "y",
            &flat(&rank.y),
            &flat(&single.y.slice(s![r.clone(), ..]).to_owned()),
        );
        let gr = &eg.ranks[s];
        close(
            "dx",
            &flat(&gr.dx),
            &flat(&sg.dx.slice(s![r.clone(), ..]).to_owned()),
        );
        close(
            "dlogits",
            &flat(&gr.dlogits),
            &flat(&sg.dlogits.slice(s![r.clone(), ..]).to_owned()),
        );
        // Intermediates in the receive layout are the single-rank slot rows, permuted.
        for (row, &(src, t, j)) in ep.plan.sources(s).iter().enumerate() {
            let slot = (t + tokens[..src].iter().sum::<usize>()) * c.top_k() + j;
            assert_eq!(rank.recv.row(row), x.row(slot / c.top_k()));
            let e = (rank.o.row(row).to_owned() - single.o.row(slot)).mapv(f64::abs);
            assert!(e.iter().all(|&v| v < 1e-12));
        }
        at += m;
    }
    close("dwr", &flat(&eg.dwr), &flat(&sg.dwr));
    close(
        "dw0",
        eg.dw0.as_slice().unwrap(),
        sg.dw0.as_slice().unwrap(),
    );
    close(
        "dw1",
        eg.dw1.as_slice().unwrap(),
        sg.dw1.as_slice().unwrap(),
    );
    if zero_router {
        let busy = (0..c.experts())
            .filter(|&e| ep.plan.expert_count(e) > 0)
            .count();
        assert_eq!(busy, if at > 0 { c.top_k() } else { 0 });
    }
}

#[test]
fn ep_reference_equals_single_rank() {
    let mut seed = 1000;
    for (act, renorm) in variants() {
        let c = cfg(12, 8, 8, 2, act, renorm);
        for (world, tokens) in [
            (1, vec![13]),
            (2, vec![9, 4]),
            (4, vec![5, 0, 7, 3]),
            (8, vec![2, 3, 0, 4, 1, 6, 2, 5]),
        ] {
            ep_matches_single(&c, world, &tokens, false, seed);
            seed += 1;
        }
    }
    // k = 3 over 16 experts; everything routed to the first experts (most are empty).
    let c = cfg(10, 6, 16, 3, Activation::SwiGlu, true);
    ep_matches_single(&c, 4, &[6, 5, 0, 8], false, 77);
    ep_matches_single(&c, 4, &[6, 5, 0, 8], true, 78);
    ep_matches_single(&c, 8, &[3, 3, 3, 3, 3, 3, 3, 3], true, 79);
}

#[test]
fn dispatch_matches_the_scatter_index_and_combine_weights_rows() {
    let ids = [
        ndarray::array![[0u32, 3], [2, 1], [3, 0]],
        ndarray::array![[1u32, 2]],
    ];
    let views: Vec<_> = ids.iter().map(|a| a.view()).collect();
    let plan = RoutingPlan::new(&views, 4, 2).unwrap();
    let xs: Vec<Array2<f64>> = vec![random_normal_f64((3, 5), 1), random_normal_f64((1, 5), 2)];
    let xv: Vec<_> = xs.iter().map(|a| a.view()).collect();
    let recv = dispatch(&plan, &xv).unwrap();
    let mut direct: Vec<Array2<f64>> = (0..2)
        .map(|d| Array2::from_elem((plan.recv_rows(d), 5), f64::NAN))
        .collect();
    for (s, a) in ids.iter().enumerate() {
        for t in 0..a.nrows() {
            for j in 0..2 {
                let (d, row) = plan.dest(s, t, j);
                direct[d].row_mut(row).assign(&xs[s].row(t));
            }
        }
    }
    assert_eq!(recv, direct);
    // Combine with unit weights returns k·x; with (1, 0) weights returns x.
    let rv: Vec<_> = recv.iter().map(|a| a.view()).collect();
    let ones: Vec<Array2<f64>> = vec![Array2::ones((3, 2)), Array2::ones((1, 2))];
    let ov: Vec<_> = ones.iter().map(|a| a.view()).collect();
    let back = combine(&plan, &ov, &rv).unwrap();
    assert_eq!(back[0], &xs[0] * 2.0);
    assert_eq!(back[1], &xs[1] * 2.0);
    // Error paths name the problem.
    assert!(matches!(
        dispatch(&plan, &xv[..1]),
        Err(Error::LengthMismatch { .. })
    ));
    let short = random_normal_f64((2, 5), 3);
    assert!(matches!(
        dispatch(&plan, &[short.view(), xv[1]]),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        combine(&plan, &ov, &rv[..1]),
        Err(Error::LengthMismatch { .. })
    ));
}

#[test]
fn bad_inputs_are_errors() {
    let c = cfg(8, 6, 4, 2, Activation::SwiGlu, false);
    let w = MoeWeights::<f64>::random(&c, 1);
    let x = random_normal_f64((5, 8), 2);
    let narrow = random_normal_f64((5, 7), 2);
    assert!(matches!(
        forward(&c, &w, narrow.view()),
        Err(Error::ShapeMismatch { what, .. }) if what.starts_with("x ")
    ));
    let g = c.with_activation(Activation::Gelu);
    assert!(matches!(
        forward(&g, &w, x.view()),
        Err(Error::ShapeMismatch { .. })
    ));
    let fwd = forward(&c, &w, x.view()).unwrap();
    let dy = random_normal_f64((4, 8), 3);
    assert!(matches!(
        backward(&c, &w, x.view(), &fwd, dy.view()),
        Err(Error::ShapeMismatch { what, .. }) if what.starts_with("dy")
    ));
    let mut bad = fwd.routing.clone();
    bad.ids[[1, 1]] = 9;
    assert_eq!(
        forward_routed(&c, &w, x.view(), bad).unwrap_err(),
        Error::ExpertIdOutOfRange {
            rank: 0,
            token: 1,
            slot: 1,
            id: 9,
            experts: 4
        }
    );
    let mut nan = x.clone();
    nan[[2, 0]] = f64::NAN;
    assert!(matches!(
        forward(&c, &w, nan.view()),
        Err(Error::NonFiniteLogit { token: 2, .. })
    ));
    let xs = vec![x.clone(), x.clone()];
    let tp = ParallelConfig::new(2, 1, 2).unwrap();
    assert_eq!(
        ep_forward(&c, &tp, &w, &xs).unwrap_err(),
        Error::TensorParallelUnsupported {
            what: "the expert-parallel reference",
            tp: 2
        }
    );
    let ep4 = ParallelConfig::expert_parallel(4).unwrap();
    assert!(matches!(
        ep_forward(&c, &ep4, &w, &xs),
        Err(Error::LengthMismatch {
            expected: 4,
            got: 2,
            ..
        })
    ));
    let ep3 = ParallelConfig::expert_parallel(3).unwrap();
    assert_eq!(
        ep_forward(&c, &ep3, &w, &xs).unwrap_err(),
        Error::ExpertsNotDivisible { experts: 4, ep: 3 }
    );
    let ep2 = ParallelConfig::expert_parallel(2).unwrap();
    let f2 = ep_forward(&c, &ep2, &w, &xs).unwrap();
    assert!(matches!(
        ep_backward(&c, &ep2, &w, &xs, &f2, &xs[..1]),
        Err(Error::LengthMismatch { .. })
    ));
}

#[test]
fn zero_tokens_run_cleanly() {
    let c = cfg(8, 6, 4, 2, Activation::Gelu, true);
    let w = MoeWeights::<f32>::random(&c, 1);
    let x = Array2::<f32>::zeros((0, 8));
    let f = forward(&c, &w, x.view()).unwrap();
    assert_eq!(f.y.dim(), (0, 8));
    let g = backward(&c, &w, x.view(), &f, x.view()).unwrap();
    assert!(g.dw0.iter().all(|&v| v == 0.0));
    assert_eq!(g.dwr.dim(), (4, 8));
}
