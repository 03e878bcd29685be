use super::*;
use crate::testutil::{Problem, Skew, plan_of, random_ids, random_problem};
use ndarray::array;
use proptest::prelude::*;

fn opts(bm: usize, bn: usize, n: usize, g: Option<usize>, n_order: NOrder) -> Layer1Options {
    Layer1Options {
        tile: TileShape::new(bm, bn, n).unwrap(),
        group_width: g,
        n_order,
    }
}

#[test]
fn default_group_width_is_an_eighth_rounded_to_bn() {
    assert_eq!(default_group_width(4096, 128), 512);
    assert_eq!(default_group_width(2048, 256), 256);
    assert_eq!(default_group_width(7168, 256), 1024);
    assert_eq!(default_group_width(100, 128), 128);
    assert_eq!(default_group_width(8, 1), 1);
    for (n, bn) in [(4096usize, 128usize), (7168, 256), (1000, 64), (5, 2)] {
        let g = default_group_width(n, bn);
        assert_eq!(g % bn, 0);
        assert!(
            n.div_ceil(g) <= 8,
            "n {n} bn {bn}: {} groups",
            n.div_ceil(g)
        );
    }
}

/// One rank, one expert of 3 rows, BM 2, BN 2, N 5 (n-tiles of 2, 2, 1 columns), G 2: three
/// groups, each with both m-tiles before the next group.
#[test]
fn hand_worked_column_groups() {
    let plan = plan_of(&[array![[0u32], [0], [0]]], 1);
    let s = Layer1Schedule::from_plan(&plan, 0, opts(2, 2, 5, Some(2), NOrder::Together)).unwrap();
    let got: Vec<_> = s
        .tiles
        .iter()
        .map(|t| (t.m_tile, t.n_tile, t.group))
        .collect();
    assert_eq!(
        got,
        vec![
            (0, 0, 0),
            (1, 0, 0),
            (0, 1, 1),
            (1, 1, 1),
            (0, 2, 2),
            (1, 2, 2)
        ]
    );
    let cols: Vec<_> = s
        .groups
        .iter()
        .map(|g| (g.cols.clone(), g.target))
        .collect();
    assert_eq!(cols, vec![(0..2, 2), (2..4, 2), (4..5, 2)]);
    s.check().unwrap();
}

#[test]
fn schedules_hold_their_invariants() {
    for seed in 0..60u64 {
        let p = random_problem(seed, 5, 40);
        let plan = plan_of(&random_ids(&p, seed), p.experts);
        for d in 0..p.world {
            for (g, order) in [
                (None, NOrder::Together),
                (Some(2), NOrder::Interleaved { band: 2 }),
                (Some(6), NOrder::Together),
            ] {
                let o = opts(1 + seed as usize % 5, 2, 11, g, order);
                let s = Layer1Schedule::from_plan(&plan, d, o).unwrap();
                s.check()
                    .unwrap_or_else(|e| panic!("seed {seed} rank {d}: {e}"));
                assert_eq!(s.recv_rows(), plan.recv_rows(d));
                for l in 0..s.local {
                    assert_eq!(
                        s.expert_offsets[l]..s.expert_offsets[l + 1],
                        plan.expert_rows(d, l)
                    );
                }
                assert_eq!(s, Layer1Schedule::from_plan(&plan, d, o).unwrap());
                let c = s.canonical(16).unwrap();
                for (t, &id) in s
                    .tiles
                    .iter()
                    .zip(&s.engine_order(16, s.tiles.len()).unwrap())
                {
                    assert_eq!(c.decode(id as i64), Some((t.expert, t.m_tile, t.n_tile)));
                }
            }
        }
    }
}

#[test]
fn check_catches_broken_groups() {
    let p = Problem {
        world: 2,
        experts: 4,
        top_k: 2,
        tokens: vec![9, 12],
        skew: Skew::Uniform,
    };
    let plan = plan_of(&random_ids(&p, 3), 4);
    let good =
        Layer1Schedule::from_plan(&plan, 0, opts(4, 2, 8, Some(2), NOrder::Together)).unwrap();
    good.check().unwrap();
    let mut s = good.clone();
    s.groups[0].target -= 1;
    assert!(matches!(s.check(), Err(Error::Invariant(m)) if m.contains("target")));
    let mut s = good.clone();
    let last = s.tiles.len() - 1;
    s.tiles.swap(0, last);
    assert!(s.check().is_err());
    let mut s = good;
    s.tiles[0].group = 1;
    assert!(s.check().is_err());
}

#[test]
fn bad_group_widths_are_errors() {
    let plan = plan_of(&[array![[0u32]]], 1);
    assert!(matches!(
        Layer1Schedule::from_plan(&plan, 0, opts(4, 4, 16, Some(6), NOrder::Together)),
        Err(Error::NotMultiple {
            value: 6,
            multiple_of: 4,
            ..
        })
    ));
    assert!(matches!(
        Layer1Schedule::from_plan(&plan, 0, opts(4, 4, 16, Some(0), NOrder::Together)),
        Err(Error::ZeroSize { .. })
    ));
    assert!(matches!(
        Layer1Schedule::from_plan(&plan, 3, opts(4, 4, 16, None, NOrder::Together)),
        Err(Error::RankOutOfRange { rank: 3, .. })
    ));
}

/// Every receive row is reduced exactly once, by the rank that holds it, into the combine
/// row of its (owner, token, rank) pair; every combine row is written by exactly one item.
#[test]
fn reduce_plans_cover_rows_and_combine_rows_once() {
    for seed in 0..60u64 {
        let p = random_problem(seed, 5, 30);
        let plan = plan_of(&random_ids(&p, seed), p.experts);
        let (layouts, plans) = ReducePlan::all(&plan).unwrap();
        let mut written: Vec<Vec<u32>> = layouts.iter().map(|c| vec![0; c.rows()]).collect();
        for (d, rp) in plans.iter().enumerate() {
            let mut seen = vec![0u32; plan.recv_rows(d)];
            let mut prev: Option<(usize, usize)> = None;
            for it in &rp.items {
                let key = ((it.owner + p.world - d) % p.world, it.token);
                assert!(prev.is_none_or(|q| q < key), "items in owner/token order");
                prev = Some(key);
                assert!(it.slots.windows(2).all(|s| s[0].slot < s[1].slot));
                for sr in &it.slots {
                    seen[sr.row] += 1;
                    assert_eq!(plan.source(d, sr.row), (it.owner, it.token, sr.slot));
                }
                assert_eq!(layouts[it.owner].row(it.token, d), Some(it.combine_row));
                assert_eq!(layouts[it.owner].senders[it.combine_row], d);
                written[it.owner][it.combine_row] += 1;
            }
            assert!(seen.iter().all(|&c| c == 1), "seed {seed} rank {d}");
        }
        for (o, w) in written.iter().enumerate() {
            assert!(w.iter().all(|&c| c == 1), "seed {seed} owner {o}");
            let bound = CombineLayout::max_rows(plan.tokens(o), p.top_k, p.world);
            assert!(layouts[o].rows() <= bound);
            for t in 0..plan.tokens(o) {
                let r = layouts[o].offsets[t]..layouts[o].offsets[t + 1];
                assert!(!r.is_empty() && layouts[o].senders[r].windows(2).all(|x| x[0] < x[1]));
            }
        }
    }
}

#[test]
fn combine_layout_errors_and_lookups() {
    let plan = plan_of(&[array![[0u32, 3], [1, 2]], array![[2u32, 3]]], 4);
    let c = CombineLayout::new(&plan, 0).unwrap();
    // Token 0: experts 0 (rank 0) and 3 (rank 1); token 1: experts 1, 2 → ranks 0, 1.
    assert_eq!(c.senders, vec![0, 1, 0, 1]);
    assert_eq!(c.row(1, 1), Some(3));
    assert_eq!(c.row(2, 0), None);
    let c1 = CombineLayout::new(&plan, 1).unwrap();
    assert_eq!(c1.senders, vec![1]);
    assert_eq!(c1.row(0, 0), None);
    assert!(matches!(
        CombineLayout::new(&plan, 2),
        Err(Error::RankOutOfRange { rank: 2, world: 2 })
    ));
    assert!(matches!(
        ReducePlan::new(&plan, 0, &[c]),
        Err(Error::Mismatch {
            expected: 2,
            got: 1,
            ..
        })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn layer1_invariants_for_arbitrary_counts(
        world in 1usize..5,
        local in 1usize..4,
        seed in any::<u64>(),
        bm in 1usize..9,
        bn in 1usize..5,
        n in 1usize..30,
        per in 0usize..4,
        band in 0usize..3,
    ) {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let experts = world * local;
        let data: Vec<usize> = (0..world * experts).map(|_| rng.random_range(0..25)).collect();
        let counts = Counts::new(world, experts, data).unwrap();
        let o = opts(
            bm,
            bn,
            n,
            if per == 0 { None } else { Some(per * bn) },
            if band == 0 { NOrder::Together } else { NOrder::Interleaved { band } },
        );
        for d in 0..world {
            let s = Layer1Schedule::from_counts(&counts, d, o).unwrap();
            prop_assert!(s.check().is_ok(), "{:?}", s.check());
            // Groups complete in order: the last slot of group s precedes every slot of s + 1.
            for g in s.groups.windows(2) {
                prop_assert!(g[0].slots.end <= g[1].slots.start);
            }
        }
    }
}
