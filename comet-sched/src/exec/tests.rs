use super::*;
use crate::layer0::Chunking;
use crate::layer1::CombineLayout;
use crate::testutil::{Problem, Skew, plan_of, random_ids};
use crate::tile::{NOrder, TileShape};
use comet_core::numeric::{count_non_finite, random_normal, rel_l2};
use comet_core::reference::{self as reference, ep_forward};
use comet_core::{Activation, MoeConfig};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

fn flat(a: &[Array2<f32>]) -> Vec<f32> {
    a.iter().flat_map(|x| x.iter().copied()).collect()
}

/// Random schedule and thread parameters for `cfg`.
fn random_options(rng: &mut StdRng, cfg: &MoeConfig, interleaving: Interleaving) -> ForwardOptions {
    let bn0 = rng.random_range(1..=cfg.ffn());
    let bn1 = rng.random_range(1..=cfg.hidden());
    let chunking = match rng.random_range(0..3) {
        0 => Chunking::Segment,
        _ => Chunking::Rows(rng.random_range(1..6)),
    };
    let n_order = |rng: &mut StdRng| match rng.random_range(0..2) {
        0 => NOrder::Together,
        _ => NOrder::Interleaved {
            band: rng.random_range(1..4),
        },
    };
    ForwardOptions {
        layer0: Layer0Options {
            tile: TileShape::new(rng.random_range(1..9), bn0, cfg.ffn()).unwrap(),
            chunking,
            n_order: n_order(rng),
        },
        layer1: Layer1Options {
            tile: TileShape::new(rng.random_range(1..9), bn1, cfg.hidden()).unwrap(),
            group_width: match rng.random_range(0..2) {
                0 => None,
                _ => Some(bn1 * rng.random_range(1..3)),
            },
            n_order: n_order(rng),
        },
        exec: ExecOptions {
            n_comm: rng.random_range(1..4),
            n_gemm: rng.random_range(1..4),
            interleaving,
            timeout: Duration::from_secs(30),
        },
    }
}

fn random_cfg(rng: &mut StdRng, experts: usize, top_k: usize) -> MoeConfig {
    let act = if rng.random_range(0..2) == 0 {
        Activation::SwiGlu
    } else {
        Activation::Gelu
    };
    MoeConfig::new(
        rng.random_range(4..13),
        rng.random_range(2..9),
        experts,
        top_k,
    )
    .unwrap()
    .with_activation(act)
    .with_renormalize(rng.random_range(0..2) == 0)
}

/// Random routing (ids of a [`Skew`], positive weights) and tokens.
fn routed_problem(p: &Problem, cfg: &MoeConfig, seed: u64) -> (Vec<Array2<f32>>, Vec<TopK<f32>>) {
    let ids = random_ids(p, seed);
    let mut rng = StdRng::seed_from_u64(seed ^ 77);
    let xs: Vec<_> = p
        .tokens
        .iter()
        .enumerate()
        .map(|(s, &m)| random_normal((m, cfg.hidden()), seed * 31 + s as u64))
        .collect();
    let routing = ids
        .into_iter()
        .map(|ids| {
            let m = ids.nrows();
            TopK {
                weights: Array2::from_shape_fn((m, p.top_k), |_| rng.random_range(0.05f32..1.0)),
                probs: Array2::zeros((m, p.experts)),
                ids,
            }
        })
        .collect();
    (xs, routing)
}

/// The executor's y equals the reference on random problems: 1–4 ranks, up to 16 experts,
/// top-k up to 4, empty experts and ranks without tokens, everything routed to one rank;
/// every schedule parameter and thread count varied; both interleavings.
#[test]
fn executor_matches_reference_on_random_routings() {
    for seed in 0..40u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let world = rng.random_range(1..=4);
        let local = rng.random_range(1..=16 / world);
        let experts = world * local;
        let skew = match seed % 4 {
            0 => Skew::AllToRank(rng.random_range(0..world)),
            1 if experts >= 2 => Skew::EvenOnly,
            _ => Skew::Uniform,
        };
        let pool = match skew {
            Skew::Uniform => experts,
            Skew::AllToRank(_) => local,
            Skew::EvenOnly => experts.div_ceil(2),
        };
        let top_k = rng.random_range(1..=pool.min(4));
        let tokens: Vec<usize> = (0..world)
            .map(|_| {
                if rng.random_range(0..5) == 0 {
                    0
                } else {
                    rng.random_range(1..24)
                }
            })
            .collect();
        let p = Problem {
            world,
            experts,
            top_k,
            tokens,
            skew,
        };
        let cfg = random_cfg(&mut rng, experts, top_k);
        let w = MoeWeights::<f32>::random(&cfg, seed + 1000);
        let (xs, routing) = routed_problem(&p, &cfg, seed);
        let inter = if seed % 2 == 0 {
            Interleaving::Free
        } else {
            Interleaving::Lazy
        };
        let opts = random_options(&mut rng, &cfg, inter);
        let got = forward_routed(&cfg, &w, &xs, routing.clone(), &opts)
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        for s in 0..world {
            let want = reference::forward_routed(&cfg, &w, xs[s].view(), routing[s].clone())
                .unwrap()
                .y;
            let y = got.y[s].as_slice().unwrap();
            assert_eq!(
                count_non_finite(y),
                0,
                "seed {seed} rank {s}: NaN in y ({opts:?})"
            );
            let err = rel_l2(y, want.as_slice().unwrap());
            assert!(err <= 1e-5, "seed {seed} rank {s}: rel L2 {err} ({opts:?})");
        }
        for d in 0..world {
            got.layer0[d].check().unwrap();
            got.layer1[d].check().unwrap();
        }
    }
}

/// Routed by the router: every intermediate (receive buffer, activation, GEMM1 output) and
/// the output equal `comet_core::reference::ep_forward`'s.
#[test]
fn executor_matches_ep_forward_through_every_buffer() {
    for (seed, world, experts, k) in [
        (1u64, 2usize, 4usize, 2usize),
        (2, 4, 16, 4),
        (3, 3, 3, 1),
        (4, 1, 5, 3),
    ] {
        let mut rng = StdRng::seed_from_u64(seed);
        let cfg = random_cfg(&mut rng, experts, k);
        let w = MoeWeights::<f32>::random(&cfg, seed);
        let xs: Vec<_> = (0..world)
            .map(|s| random_normal((rng.random_range(0..30), cfg.hidden()), seed * 7 + s as u64))
            .collect();
        let par = ParallelConfig::expert_parallel(world).unwrap();
        let want = ep_forward(&cfg, &par, &w, &xs).unwrap();
        for inter in [Interleaving::Free, Interleaving::Lazy] {
            let opts = random_options(&mut rng, &cfg, inter);
            let got = forward(&cfg, &w, &xs, &opts).unwrap();
            assert_eq!(got.plan, want.plan);
            for (d, r) in want.ranks.iter().enumerate() {
                assert_eq!(got.recv[d], r.recv, "receive buffer of rank {d}");
                for (what, g, e, tol) in [
                    ("a", &got.a[d], &r.a, 1e-6),
                    ("o", &got.o[d], &r.o, 1e-6),
                    ("y", &got.y[d], &r.y, 1e-5),
                ] {
                    let (g, e) = (g.as_slice().unwrap(), e.as_slice().unwrap());
                    assert_eq!(count_non_finite(g), 0, "{what} of rank {d}");
                    assert!(rel_l2(g, e) <= tol, "{what} of rank {d}: {}", rel_l2(g, e));
                }
            }
        }
    }
}

/// Schedules, inputs and outputs of a fixed 3-rank problem for the broken-schedule tests.
struct Fixture {
    cfg: MoeConfig,
    plan: RoutingPlan,
    routing: Vec<TopK<f32>>,
    xs: Vec<Array2<f32>>,
    sends: Vec<Array2<f32>>,
    w0: Vec<ndarray::Array3<f32>>,
    w1: Vec<ndarray::Array3<f32>>,
    l0: Vec<Layer0Schedule>,
    l1: Vec<Layer1Schedule>,
    w: MoeWeights<f32>,
}

fn fixture() -> Fixture {
    let p = Problem {
        world: 3,
        experts: 6,
        top_k: 2,
        tokens: vec![13, 9, 17],
        skew: Skew::Uniform,
    };
    let cfg = MoeConfig::new(8, 6, 6, 2).unwrap();
    let w = MoeWeights::<f32>::random(&cfg, 5);
    let (xs, routing) = routed_problem(&p, &cfg, 11);
    let ids: Vec<_> = routing.iter().map(|r| r.ids.clone()).collect();
    let plan = plan_of(&ids, 6);
    let views: Vec<_> = xs.iter().map(|x| x.view()).collect();
    let sends = send_buffers(&plan, &views).unwrap();
    let par = ParallelConfig::expert_parallel(3).unwrap();
    let locals: Vec<_> = (0..3).map(|d| w.local(d, &par).unwrap()).collect();
    let o0 = Layer0Options {
        tile: TileShape::new(4, 3, 6).unwrap(),
        chunking: Chunking::Rows(3),
        n_order: NOrder::Together,
    };
    let o1 = Layer1Options {
        tile: TileShape::new(4, 2, 8).unwrap(),
        group_width: Some(2),
        n_order: NOrder::Together,
    };
    Fixture {
        l0: (0..3)
            .map(|d| Layer0Schedule::from_plan(&plan, d, o0).unwrap())
            .collect(),
        l1: (0..3)
            .map(|d| Layer1Schedule::from_plan(&plan, d, o1).unwrap())
            .collect(),
        w0: locals.iter().map(|l| l.w0.clone()).collect(),
        w1: locals.iter().map(|l| l.w1.clone()).collect(),
        cfg,
        plan,
        routing,
        xs,
        sends,
        w,
    }
}

fn lazy(timeout_ms: u64) -> ExecOptions {
    ExecOptions {
        n_comm: 2,
        n_gemm: 2,
        interleaving: Interleaving::Lazy,
        timeout: Duration::from_millis(timeout_ms),
    }
}

impl Fixture {
    fn layer0(&self, l0: &[Layer0Schedule], opts: &ExecOptions) -> Result<Layer0Output> {
        run_layer0(
            &Layer0Inputs {
                plan: &self.plan,
                sends: &self.sends,
                w0: &self.w0,
                activation: self.cfg.activation(),
            },
            l0,
            opts,
        )
    }

    fn layer1(
        &self,
        a: &[Array2<f32>],
        l1: &[Layer1Schedule],
        opts: &ExecOptions,
    ) -> Result<Layer1Output> {
        let (layouts, reduce) = ReducePlan::all(&self.plan).unwrap();
        let weights: Vec<_> = self.routing.iter().map(|r| r.weights.clone()).collect();
        run_layer1(
            &Layer1Inputs {
                plan: &self.plan,
                a,
                w1: &self.w1,
                weights: &weights,
                layouts: &layouts,
                reduce: &reduce,
            },
            l1,
            opts,
        )
    }

    fn reference_y(&self) -> Vec<Array2<f32>> {
        (0..3)
            .map(|s| {
                reference::forward_routed(
                    &self.cfg,
                    &self.w,
                    self.xs[s].view(),
                    self.routing[s].clone(),
                )
                .unwrap()
                .y
            })
            .collect()
    }
}

#[test]
fn intact_fixture_runs_clean_in_both_modes() {
    let f = fixture();
    for inter in [Interleaving::Free, Interleaving::Lazy] {
        let opts = ExecOptions {
            interleaving: inter,
            ..lazy(20_000)
        };
        let l0 = f.layer0(&f.l0, &opts).unwrap();
        let l1 = f.layer1(&l0.a, &f.l1, &opts).unwrap();
        let y = flat(&l1.y);
        assert_eq!(count_non_finite(&y), 0);
        assert!(rel_l2(&y, &flat(&f.reference_y())) <= 1e-5);
        // Every combine row written exactly by its sender (no NaN left).
        assert_eq!(count_non_finite(&flat(&l1.combine)), 0);
    }
}

/// A schedule with one flag dropped from one m-tile's tiles (a flag that feeds only that
/// m-tile) reads unarrived rows: NaN in the activation of exactly those rows, and in y.
#[test]
fn a_dropped_flag_is_caught() {
    let f = fixture();
    let mut caught = 0;
    for d in 0..3 {
        let s = &f.l0[d];
        // Every flag that feeds a single m-tile, one at a time.
        for flag in 0..s.flags.len() as u32 {
            let feeds = s.flag_tiles(flag);
            if feeds.len() != 1 {
                continue;
            }
            let mt = &s.m_tiles[feeds.start];
            let mut broken = f.l0.clone();
            for t in broken[d].tiles.iter_mut() {
                if t.expert == mt.expert && t.m_tile == mt.m_tile {
                    t.flags.retain(|&x| x != flag);
                }
            }
            assert!(broken[d].check().is_err(), "check() sees the dropped flag");
            let l0 = f.layer0(&broken, &lazy(20_000)).unwrap();
            // The chunk's rows of the activation are NaN, every other row is finite.
            let rows = &s.flags[flag as usize].rows;
            for r in 0..l0.a[d].nrows() {
                let nan = l0.a[d].row(r).iter().any(|v| v.is_nan());
                assert_eq!(nan, rows.contains(&r), "rank {d} flag {flag} row {r}");
            }
            let l1 = f.layer1(&l0.a, &f.l1, &lazy(20_000)).unwrap();
            assert!(count_non_finite(&flat(&l1.y)) > 0, "NaN reaches y");
            caught += 1;
        }
    }
    assert!(
        caught >= 3,
        "only {caught} single-m-tile flags in the fixture"
    );
}

/// A column group released one tile early is reduced before its last tile: NaN in y.
#[test]
fn an_early_group_release_is_caught() {
    let f = fixture();
    let l0 = f.layer0(&f.l0, &lazy(20_000)).unwrap();
    for d in 0..3 {
        for g in 0..f.l1[d].groups.len() {
            if f.l1[d].groups[g].target == 0 {
                continue;
            }
            let mut broken = f.l1.clone();
            broken[d].groups[g].target -= 1;
            assert!(broken[d].check().is_err());
            let l1 = f.layer1(&l0.a, &broken, &lazy(20_000)).unwrap();
            let y = flat(&l1.y);
            assert!(
                count_non_finite(&y) > 0,
                "rank {d} group {g}: early release not seen"
            );
        }
    }
    // A tile counted in the wrong group: group 0 never completes, and the wait for it
    // times out into an error naming the counter.
    let mut broken = f.l1.clone();
    let k = broken[0].tiles.iter().position(|t| t.group == 0).unwrap();
    broken[0].tiles[k].group = 1;
    let target = broken[0].groups[0].target;
    match f.layer1(&l0.a, &broken, &lazy(300)) {
        Err(Error::Timeout { what, .. }) => {
            assert!(
                what.contains("rank 0 reduce thread")
                    && what.contains(&format!("group 0 counter {} of {target}", target - 1)),
                "{what}"
            );
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
}

/// A flag nobody releases makes the waiting tile time out into an error naming it.
#[test]
fn a_flag_never_released_times_out() {
    let f = fixture();
    let mut broken = f.l0.clone();
    let missing = broken[1].copy_order.pop().unwrap();
    for inter in [Interleaving::Free, Interleaving::Lazy] {
        let opts = ExecOptions {
            interleaving: inter,
            ..lazy(300)
        };
        match f.layer0(&broken, &opts) {
            Err(Error::Timeout { what, waited_ms }) => {
                assert!(what.contains(&format!("flag Some({missing})")), "{what}");
                assert!(what.contains("rank 1"), "{what}");
                assert_eq!(waited_ms, 300);
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
    }
}

#[test]
fn inputs_that_do_not_fit_are_errors() {
    let f = fixture();
    assert!(matches!(
        f.layer0(&f.l0[..2], &lazy(1000)),
        Err(Error::Mismatch {
            expected: 3,
            got: 2,
            ..
        })
    ));
    let bad = ExecOptions {
        n_comm: 0,
        ..lazy(1000)
    };
    assert!(matches!(
        f.layer0(&f.l0, &bad),
        Err(Error::ZeroSize { name: "n_comm" })
    ));
    let mut broken = f.l0.clone();
    broken[0].tiles[0].flags.push(9999);
    assert!(matches!(
        f.layer0(&broken, &lazy(1000)),
        Err(Error::OutOfRange { index: 9999, .. })
    ));
    // Schedules built for another ffn.
    let mut other = f.l0.clone();
    other[2].options.tile = TileShape::new(4, 3, 5).unwrap();
    assert!(matches!(
        f.layer0(&other, &lazy(1000)),
        Err(Error::Mismatch {
            expected: 6,
            got: 5,
            ..
        })
    ));
    // Layer 1 with ranks' column groups differing.
    let l0 = f.layer0(&f.l0, &lazy(20_000)).unwrap();
    let mut l1 = f.l1.clone();
    l1[1] = Layer1Schedule::from_plan(
        &f.plan,
        1,
        Layer1Options {
            group_width: Some(4),
            ..l1[1].options
        },
    )
    .unwrap();
    assert!(matches!(
        f.layer1(&l0.a, &l1, &lazy(1000)),
        Err(Error::Mismatch { .. })
    ));
    let _ = CombineLayout::max_rows(1, 1, 1);
}
