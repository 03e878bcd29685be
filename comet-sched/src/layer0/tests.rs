use super::*;
use crate::testutil::{Problem, Skew, plan_of, random_ids, random_problem};
use ndarray::array;
use proptest::prelude::*;

fn opts(bm: usize, bn: usize, n: usize, chunking: Chunking, n_order: NOrder) -> Layer0Options {
    Layer0Options {
        tile: TileShape::new(bm, bn, n).unwrap(),
        chunking,
        n_order,
    }
}

const CHUNKINGS: [Chunking; 4] = [
    Chunking::Segment,
    Chunking::Rows(1),
    Chunking::Rows(3),
    Chunking::Rows(8),
];
const ORDERS: [NOrder; 3] = [
    NOrder::Together,
    NOrder::Interleaved { band: 1 },
    NOrder::Interleaved { band: 3 },
];

/// W = 2, E = 2 (one expert per rank), BM = 2. Rank 0 receives 3 rows of its own and 2 of
/// rank 1: rows [0 1 2 | 3 4]. m-tiles: [0, 2) local only, [2, 4) local + remote, [4, 5)
/// remote only. Local first; then the remote-only tile (1 source) before the mixed one (2).
#[test]
fn hand_worked_example() {
    let ids = vec![array![[0u32], [0], [1], [0]], array![[0u32], [1], [0]]];
    let plan = plan_of(&ids, 2);
    let o = opts(2, 4, 8, Chunking::Segment, NOrder::Together);
    let s = Layer0Schedule::from_plan(&plan, 0, o).unwrap();
    assert_eq!(s.seg_offsets, vec![0, 3, 5]);
    assert_eq!(s.flags.len(), 2);
    assert_eq!(s.flags[0].rows, 0..3);
    assert_eq!(s.flags[1].rows, 3..5);
    assert_eq!(s.flags[1].source, 1);
    // Rank 1's send layout: expert 0 first (tokens 0, 2), so rows 0..2.
    assert_eq!(s.flags[1].src_rows, 0..2);
    let order: Vec<_> = s
        .tiles
        .iter()
        .map(|t| (t.m_tile, t.n_tile, t.flags.clone()))
        .collect();
    assert_eq!(
        order,
        vec![
            (0, 0, vec![0]),
            (0, 1, vec![0]),
            (2, 0, vec![1]),
            (2, 1, vec![1]),
            (1, 0, vec![0, 1]),
            (1, 1, vec![0, 1]),
        ]
    );
    s.check().unwrap();
    // Rows of 2: the remote segment is one chunk, the local one two.
    let c = Layer0Schedule::from_plan(
        &plan,
        0,
        Layer0Options {
            chunking: Chunking::Rows(2),
            ..o
        },
    )
    .unwrap();
    assert_eq!(
        c.flags.iter().map(|f| f.rows.clone()).collect::<Vec<_>>(),
        vec![0..2, 2..3, 3..5]
    );
    assert_eq!(c.m_tiles[1].flags, vec![1, 2]);
    assert_eq!(c.flag_tiles(1), 1..2);
    assert_eq!(c.flag_tiles(2), 1..3);
    c.check().unwrap();
}

/// The counts-only schedule agrees with a row-by-row analysis through the plan's combine
/// mapping: chunk rows hold the source rank's send rows, and each tile's sources and
/// flags are what its rows say.
#[test]
fn schedule_matches_row_level_analysis_of_the_plan() {
    for seed in 0..60u64 {
        let p = random_problem(seed, 5, 40);
        let plan = plan_of(&random_ids(&p, seed), p.experts);
        for d in 0..p.world {
            for (ci, &chunking) in CHUNKINGS.iter().enumerate() {
                let o = opts(1 + (seed as usize + ci) % 7, 3, 7, chunking, ORDERS[ci % 3]);
                let s = Layer0Schedule::from_plan(&plan, d, o).unwrap();
                assert_eq!(s.seg_offsets, plan.segment_offsets(d));
                assert_eq!(s.recv_rows(), plan.recv_rows(d));
                // Row → flag, through the chunks.
                let mut flag_of = vec![u32::MAX; s.recv_rows()];
                for (f, c) in s.flags.iter().enumerate() {
                    for (k, r) in c.rows.clone().enumerate() {
                        let (src, t, j) = plan.source(d, r);
                        assert_eq!(src, c.source, "seed {seed} rank {d} row {r}");
                        assert_eq!(plan.ids(src)[[t, j]] as usize, d * s.local + c.expert);
                        assert_eq!(plan.send_row(src, t, j), c.src_rows.start + k);
                        flag_of[r] = f as u32;
                    }
                }
                for t in &s.m_tiles {
                    let mut want: Vec<u32> = t.rows.clone().map(|r| flag_of[r]).collect();
                    want.dedup();
                    assert_eq!(t.flags, want, "seed {seed} rank {d} m-tile {t:?}");
                    let mut srcs: Vec<usize> =
                        t.rows.clone().map(|r| plan.source(d, r).0).collect();
                    srcs.dedup();
                    assert_eq!(t.sources, srcs.len());
                    let last = (plan.source(d, t.rows.end - 1).0 + p.world - d) % p.world;
                    assert_eq!(t.last_source, last);
                }
                s.check()
                    .unwrap_or_else(|e| panic!("seed {seed} rank {d} {chunking:?}: {e}"));
            }
        }
    }
}

#[test]
fn fan_in_equals_fan_out() {
    for seed in 0..30u64 {
        let p = random_problem(seed, 4, 50);
        let plan = plan_of(&random_ids(&p, seed), p.experts);
        for &chunking in &CHUNKINGS {
            let s = Layer0Schedule::from_plan(&plan, 0, opts(4, 2, 4, chunking, NOrder::Together))
                .unwrap();
            let mut fanin = vec![0usize; s.m_tiles.len()];
            for f in 0..s.flags.len() as u32 {
                for t in s.flag_tiles(f) {
                    assert!(s.m_tiles[t].flags.contains(&f), "flag {f} tile {t}");
                    fanin[t] += 1;
                }
            }
            for (t, m) in s.m_tiles.iter().enumerate() {
                assert_eq!(fanin[t], m.flags.len(), "m-tile {t}");
            }
        }
    }
}

#[test]
fn engine_order_decodes_to_the_schedule() {
    for seed in 0..20u64 {
        let p = random_problem(seed, 4, 60);
        let plan = plan_of(&random_ids(&p, seed), p.experts);
        let s = Layer0Schedule::from_plan(
            &plan,
            p.world - 1,
            opts(4, 2, 5, Chunking::Rows(3), NOrder::Interleaved { band: 2 }),
        )
        .unwrap();
        for band in [1, 2, 16] {
            let c = s.canonical(band).unwrap();
            let order = s.engine_order(band, s.tiles.len() + 3).unwrap();
            assert_eq!(order[s.tiles.len()..], [-1, -1, -1]);
            for (t, &id) in s.tiles.iter().zip(&order) {
                assert_eq!(c.decode(id as i64), Some((t.expert, t.m_tile, t.n_tile)));
            }
        }
    }
}

#[test]
fn local_only_and_all_remote_extremes() {
    // One rank: every tile is local, the order is the canonical (l, m) order.
    let p = Problem {
        world: 1,
        experts: 3,
        top_k: 2,
        tokens: vec![20],
        skew: Skew::Uniform,
    };
    let plan = plan_of(&random_ids(&p, 1), 3);
    let s = Layer0Schedule::from_plan(&plan, 0, opts(4, 1, 1, Chunking::Segment, NOrder::Together))
        .unwrap();
    let lm: Vec<_> = s.tiles.iter().map(|t| (t.expert, t.m_tile)).collect();
    let mut sorted = lm.clone();
    sorted.sort();
    assert_eq!(lm, sorted);
    assert!(s.m_tiles.iter().all(|t| t.last_source == 0));
    // Everything to rank 1 of 3: rank 0 and 2 receive nothing, rank 1's local rows first.
    let p = Problem {
        world: 3,
        experts: 6,
        top_k: 2,
        tokens: vec![9, 5, 7],
        skew: Skew::AllToRank(1),
    };
    let plan = plan_of(&random_ids(&p, 2), 6);
    for d in [0, 2] {
        let s =
            Layer0Schedule::from_plan(&plan, d, opts(4, 1, 1, Chunking::Rows(2), NOrder::Together))
                .unwrap();
        assert!(s.tiles.is_empty() && s.flags.is_empty());
        s.check().unwrap();
    }
    let s = Layer0Schedule::from_plan(&plan, 1, opts(4, 1, 1, Chunking::Rows(2), NOrder::Together))
        .unwrap();
    assert_eq!(s.recv_rows(), 21 * 2);
    s.check().unwrap();
    let first_remote = s
        .tiles
        .iter()
        .position(|t| s.m_tiles[s.m_tile_base[t.expert] + t.m_tile].last_source > 0);
    assert!(
        first_remote.is_some_and(|i| i > 0),
        "local tiles come first"
    );
}

#[test]
fn check_catches_broken_schedules() {
    let p = Problem {
        world: 3,
        experts: 6,
        top_k: 2,
        tokens: vec![11, 13, 7],
        skew: Skew::Uniform,
    };
    let plan = plan_of(&random_ids(&p, 9), 6);
    let good =
        Layer0Schedule::from_plan(&plan, 1, opts(4, 2, 4, Chunking::Rows(3), NOrder::Together))
            .unwrap();
    good.check().unwrap();

    // A dropped flag.
    let mut s = good.clone();
    let k = s
        .tiles
        .iter()
        .position(|t| t.flags.len() > 1)
        .expect("a multi-flag tile");
    s.tiles[k].flags.pop();
    assert!(matches!(s.check(), Err(Error::Invariant(m)) if m.contains("flags")));

    // A remote tile moved to the front.
    let mut s = good.clone();
    let k = s
        .tiles
        .iter()
        .position(|t| s.m_tiles[s.m_tile_base[t.expert] + t.m_tile].last_source > 0)
        .expect("a remote tile");
    let t = s.tiles.remove(k);
    s.tiles.insert(0, t);
    assert!(matches!(s.check(), Err(Error::Invariant(m)) if m.contains("readiness")));

    // A tile twice, one missing.
    let mut s = good.clone();
    s.tiles[1] = s.tiles[0].clone();
    assert!(s.check().is_err());

    // A flag pointing nowhere is an index error, found without the coverage analysis.
    let mut s = good.clone();
    s.tiles[0].flags.push(10_000);
    assert!(matches!(
        s.check_indices(),
        Err(Error::OutOfRange { index: 10_000, .. })
    ));

    // Copy order out of arrival order.
    let mut s = good;
    let n = s.copy_order.len();
    s.copy_order.swap(0, n - 1);
    assert!(s.check().is_err());
}

#[test]
fn bad_parameters_are_errors() {
    let plan = plan_of(&[array![[0u32]]], 1);
    let o = opts(4, 4, 4, Chunking::Segment, NOrder::Together);
    assert!(matches!(
        Layer0Schedule::from_plan(&plan, 1, o),
        Err(Error::RankOutOfRange { rank: 1, world: 1 })
    ));
    assert!(matches!(
        Layer0Schedule::from_plan(
            &plan,
            0,
            Layer0Options {
                chunking: Chunking::Rows(0),
                ..o
            }
        ),
        Err(Error::ZeroSize { name: "chunk rows" })
    ));
    assert!(matches!(
        Layer0Schedule::from_plan(
            &plan,
            0,
            Layer0Options {
                n_order: NOrder::Interleaved { band: 0 },
                ..o
            }
        ),
        Err(Error::ZeroSize { .. })
    ));
}

#[test]
fn max_flags_bounds_every_schedule() {
    for seed in 0..30u64 {
        let p = random_problem(seed, 5, 30);
        let plan = plan_of(&random_ids(&p, seed), p.experts);
        let bound_rows = RoutingPlan::max_recv_rows(&p.tokens, p.top_k, p.experts / p.world);
        for d in 0..p.world {
            for &c in &CHUNKINGS {
                let s = Layer0Schedule::from_plan(&plan, d, opts(2, 1, 1, c, NOrder::Together))
                    .unwrap();
                assert!(s.flags.len() <= max_flags(c, bound_rows, p.world, p.experts / p.world));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Invariants on arbitrary counts matrices, and determinism.
    #[test]
    fn invariants_hold_for_arbitrary_counts(
        world in 1usize..5,
        local in 1usize..4,
        seed in any::<u64>(),
        bm in 1usize..9,
        bn in 1usize..5,
        n in 1usize..12,
        chunk in 0usize..6,
        band in 0usize..4,
        d_pick in any::<usize>(),
    ) {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let experts = world * local;
        let data: Vec<usize> = (0..world * experts)
            .map(|_| if rng.random_range(0..3) == 0 { 0 } else { rng.random_range(0..20) })
            .collect();
        let counts = Counts::new(world, experts, data).unwrap();
        let d = d_pick % world;
        let o = opts(
            bm,
            bn,
            n,
            if chunk == 0 { Chunking::Segment } else { Chunking::Rows(chunk) },
            if band == 0 { NOrder::Together } else { NOrder::Interleaved { band } },
        );
        let s = Layer0Schedule::from_counts(&counts, d, o).unwrap();
        prop_assert!(s.check().is_ok(), "{:?}", s.check());
        prop_assert_eq!(&s, &Layer0Schedule::from_counts(&counts, d, o).unwrap());
        let tiles: usize = s.m_tiles_per_expert().iter().sum::<usize>() * o.tile.n_tiles();
        prop_assert_eq!(s.tiles.len(), tiles);
    }
}
