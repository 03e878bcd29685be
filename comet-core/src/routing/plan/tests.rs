use super::*;
use ndarray::{Array2, array};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};

fn plan_of(ids: &[Array2<u32>], experts: usize) -> Result<RoutingPlan> {
    let views: Vec<_> = ids.iter().map(|a| a.view()).collect();
    RoutingPlan::new(&views, experts, ids.len())
}

#[test]
fn hand_computed_example() {
    // W = 2, E = 4 (L = 2), k = 2.
    let ids = vec![array![[0u32, 2], [1, 0], [3, 2]], array![[2u32, 3], [0, 1]]];
    let p = plan_of(&ids, 4).unwrap();
    assert_eq!(
        (p.world(), p.experts(), p.local_experts(), p.top_k()),
        (2, 4, 2, 2)
    );
    assert_eq!(p.counts(), array![[2usize, 1, 2, 1], [1, 1, 1, 1]]);
    // Rank 0: e0 from s0 (t0, t1), e0 from s1 (t1), e1 from s0 (t1), e1 from s1 (t1).
    assert_eq!(p.segment_offsets(0), &[0, 2, 3, 4, 5]);
    assert_eq!(
        p.sources(0),
        &[(0, 0, 0), (0, 1, 1), (1, 1, 0), (0, 1, 0), (1, 1, 1)]
    );
    // Rank 1 starts with its own rows: e2 from s1 (t0), e2 from s0 (t0, t2), e3 s1, e3 s0.
    assert_eq!(p.segment_offsets(1), &[0, 1, 3, 4, 5]);
    assert_eq!(
        p.sources(1),
        &[(1, 0, 0), (0, 0, 1), (0, 2, 1), (1, 0, 1), (0, 2, 0)]
    );
    assert_eq!(p.dest(0, 0, 1), (1, 1));
    assert_eq!(p.dest(0, 2, 0), (1, 4));
    assert_eq!(p.dest(1, 1, 1), (0, 4));
    assert_eq!(p.expert_rows(1, 1), 3..5);
    assert_eq!(p.segment(1, 0, 0), 1..3);
    assert_eq!(p.segment(1, 0, 1), 0..1);
    // Send layout of rank 0: e0 [t0 t1], e1 [t1], e2 [t0 t2], e3 [t2].
    assert_eq!(p.send_row(0, 1, 1), 1);
    assert_eq!(p.send_row(0, 1, 0), 2);
    assert_eq!(p.send_row(0, 2, 0), 5);
    assert_eq!(p.send_rows_to(0, 0), 0..3);
    assert_eq!(p.send_rows_to(0, 1), 3..6);
    assert_eq!(p.recv_rows_from(1, 0), 3);
    assert_eq!(p.scatter_rows(1), &[0, 3, 2, 4]);
    assert_eq!(p.expert_count(0), 3);
    assert_eq!(p.recv_rows(0), 5);
    assert_eq!(RoutingPlan::max_recv_rows(&[3, 2], 2, 2), 10);
}

/// How the random ids are drawn.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// Uniform distinct experts per token.
    Uniform,
    /// Every token picks the same k experts (one expert gets all tokens; the rest are empty).
    AllToOne,
    /// Only a random subset of experts (at least k) is ever used.
    Sparse,
    /// All tokens routed to experts of rank 0 (worst case for one receiver).
    OneRank,
}

fn random_ids(
    rng: &mut StdRng,
    m: usize,
    k: usize,
    experts: usize,
    local: usize,
    mode: Mode,
) -> Array2<u32> {
    let mut pool: Vec<u32> = (0..experts as u32).collect();
    let fixed: Vec<u32> = {
        let mut v = pool.clone();
        v.shuffle(rng);
        v.truncate(k);
        v
    };
    let subset: Vec<u32> = {
        let mut v = pool.clone();
        v.shuffle(rng);
        let n = rng.random_range(k..=experts);
        v.truncate(n);
        v
    };
    let mut a = Array2::<u32>::zeros((m, k));
    for t in 0..m {
        let choice: Vec<u32> = match mode {
            Mode::Uniform => {
                pool.shuffle(rng);
                pool[..k].to_vec()
            }
            Mode::AllToOne => fixed.clone(),
            Mode::Sparse => {
                let mut v = subset.clone();
                v.shuffle(rng);
                v.truncate(k);
                v
            }
            Mode::OneRank => {
                // k <= local is required by the caller for this mode.
                let mut v: Vec<u32> = (0..local as u32).collect();
                v.shuffle(rng);
                v.truncate(k);
                v
            }
        };
        for (j, &e) in choice.iter().enumerate() {
            a[[t, j]] = e;
        }
    }
    a
}

/// Checks every documented invariant of the plan against brute force.
fn check_invariants(p: &RoutingPlan, ids: &[Array2<u32>]) {
    let (w, e, l, k) = (p.world(), p.experts(), p.local_experts(), p.top_k());
    assert_eq!(w * l, e);
    // Counts add up.
    let mut total = 0;
    for (s, a) in ids.iter().enumerate() {
        assert_eq!(p.tokens(s), a.nrows());
        let mut c = vec![0usize; e];
        a.iter().for_each(|&id| c[id as usize] += 1);
        for (x, &want) in c.iter().enumerate() {
            assert_eq!(p.count(s, x), want);
        }
        assert_eq!(c.iter().sum::<usize>(), a.nrows() * k);
        total += a.nrows() * k;
    }
    assert_eq!((0..w).map(|d| p.recv_rows(d)).sum::<usize>(), total);
    assert_eq!((0..e).map(|x| p.expert_count(x)).sum::<usize>(), total);
    let tokens: Vec<usize> = ids.iter().map(|a| a.nrows()).collect();
    let bound = RoutingPlan::max_recv_rows(&tokens, k, l);
    for d in 0..w {
        let rows = p.recv_rows(d);
        assert!(rows <= bound, "rank {d}: {rows} > bound {bound}");
        assert_eq!(p.sources(d).len(), rows);
        assert_eq!(p.segment_offsets(d).len(), l * w + 1);
        // Experts contiguous, in order, covering 0..rows.
        let mut at = 0;
        for le in 0..l {
            let r = p.expert_rows(d, le);
            assert_eq!(r.start, at);
            assert_eq!(
                r.len(),
                (0..w).map(|s| p.count(s, d * l + le)).sum::<usize>()
            );
            // Segments in rotated source order starting at d.
            let mut seg_at = r.start;
            for i in 0..w {
                let s = (d + i) % w;
                let seg = p.segment(d, le, s);
                assert_eq!(seg.start, seg_at, "rank {d} expert {le} source {s}");
                assert_eq!(seg.len(), p.count(s, d * l + le));
                let mut last_t = None;
                for row in seg.clone() {
                    let (ss, t, j) = p.source(d, row);
                    assert_eq!(ss, s);
                    assert_eq!(ids[s][[t, j]] as usize, d * l + le);
                    // Tokens strictly ascending within a segment.
                    assert!(last_t.is_none_or(|lt| lt < t));
                    last_t = Some(t);
                }
                seg_at = seg.end;
            }
            assert_eq!(seg_at, r.end);
            at = r.end;
        }
        assert_eq!(at, rows);
        // Receive counts per source agree with the send blocks.
        for s in 0..w {
            assert_eq!(p.recv_rows_from(d, s), p.send_rows_to(s, d).len());
        }
    }
    // Every slot lands in exactly one receive row; round trips; send layout consistent.
    let mut seen: Vec<Vec<bool>> = (0..w).map(|d| vec![false; p.recv_rows(d)]).collect();
    for (s, a) in ids.iter().enumerate() {
        let mut send_seen = vec![false; a.nrows() * k];
        for t in 0..a.nrows() {
            for j in 0..k {
                let x = a[[t, j]] as usize;
                let (d, row) = p.dest(s, t, j);
                assert_eq!(d, x / l);
                assert!(p.segment(d, x % l, s).contains(&row));
                assert!(!seen[d][row], "row {row} of rank {d} hit twice");
                seen[d][row] = true;
                assert_eq!(p.source(d, row), (s, t, j));
                assert_eq!(p.scatter_rows(s)[t * k + j], row);
                let sr = p.send_row(s, t, j);
                assert!(!send_seen[sr]);
                send_seen[sr] = true;
                let block = p.send_rows_to(s, d);
                assert!(block.contains(&sr));
                // The block to d is segments (0, s), (1, s), ... of d, in order.
                let before: usize = (0..x % l).map(|le| p.count(s, d * l + le)).sum();
                let seg = p.segment(d, x % l, s);
                assert_eq!(sr - block.start, before + (row - seg.start));
            }
        }
        assert!(send_seen.iter().all(|&b| b));
        // Blocks partition the send layout in destination order.
        let mut at = 0;
        for d in 0..w {
            let b = p.send_rows_to(s, d);
            assert_eq!(b.start, at);
            at = b.end;
        }
        assert_eq!(at, a.nrows() * k);
    }
    assert!(
        seen.iter().flatten().all(|&b| b),
        "a receive row was never written"
    );
}

#[test]
fn randomized_plan_invariants() {
    let mut rng = StdRng::seed_from_u64(0xC0FFEE);
    let modes = [Mode::Uniform, Mode::AllToOne, Mode::Sparse, Mode::OneRank];
    let mut cases = 0;
    for case in 0..400 {
        let w = rng.random_range(1..=8usize);
        let l = rng.random_range(1..=(256 / w).min(32));
        let e = w * l;
        let mode = modes[case % modes.len()];
        let kmax = match mode {
            Mode::OneRank => l.min(8),
            _ => e.min(8),
        };
        let k = rng.random_range(1..=kmax);
        let ids: Vec<Array2<u32>> = (0..w)
            .map(|_| {
                // Some ranks have no tokens at all.
                let m = if rng.random_bool(0.15) {
                    0
                } else {
                    rng.random_range(1..=48)
                };
                random_ids(&mut rng, m, k, e, l, mode)
            })
            .collect();
        let p = plan_of(&ids, e).unwrap();
        check_invariants(&p, &ids);
        match mode {
            Mode::AllToOne => {
                // Each rank sends all its tokens to the same k experts (drawn per rank).
                for (s, a) in ids.iter().enumerate() {
                    let busy: Vec<usize> = (0..e).filter(|&x| p.count(s, x) > 0).collect();
                    assert_eq!(busy.len(), if a.nrows() > 0 { k } else { 0 });
                    assert!(busy.iter().all(|&x| p.count(s, x) == a.nrows()));
                }
            }
            Mode::OneRank => {
                let tokens: Vec<usize> = ids.iter().map(|a| a.nrows()).collect();
                assert_eq!(p.recv_rows(0), RoutingPlan::max_recv_rows(&tokens, k, l));
                assert!((1..w).all(|d| p.recv_rows(d) == 0));
            }
            _ => {}
        }
        cases += 1;
    }
    assert_eq!(cases, 400);
}

#[test]
fn extremes_of_the_ranges() {
    let mut rng = StdRng::seed_from_u64(7);
    // world 8, 256 experts, k 8; world 1 (everything local); one expert.
    for (w, e, k) in [(8, 256, 8), (1, 256, 8), (1, 1, 1), (8, 8, 8), (2, 2, 1)] {
        let ids: Vec<_> = (0..w)
            .map(|_| random_ids(&mut rng, 40, k, e, e / w, Mode::Uniform))
            .collect();
        let p = plan_of(&ids, e).unwrap();
        check_invariants(&p, &ids);
    }
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        #[test]
        fn plan_invariants_hold(w in 1usize..=8, l in 1usize..=4, k_seed in 0usize..8,
                                ms in proptest::collection::vec(0usize..20, 8), seed in any::<u64>()) {
            let e = w * l;
            let k = 1 + k_seed % e.min(8);
            let mut rng = StdRng::seed_from_u64(seed);
            let ids: Vec<_> = (0..w).map(|s| random_ids(&mut rng, ms[s], k, e, l, Mode::Uniform)).collect();
            let p = plan_of(&ids, e).unwrap();
            check_invariants(&p, &ids);
        }
    }
}

#[test]
fn rejects_bad_input_naming_the_value() {
    let ok = array![[0u32, 1]];
    let v = ok.view();
    assert_eq!(
        RoutingPlan::new(&[v], 4, 0),
        Err(Error::ZeroSize { name: "world" })
    );
    assert_eq!(
        RoutingPlan::new(&[v], 0, 1),
        Err(Error::ZeroSize { name: "experts" })
    );
    assert_eq!(
        RoutingPlan::new(&[v], 4, 2),
        Err(Error::LengthMismatch {
            what: "routing ids (one [tokens, top_k] array per rank)",
            expected: 2,
            got: 1
        })
    );
    assert_eq!(
        RoutingPlan::new(&[v, v, v], 4, 3),
        Err(Error::ExpertsNotDivisible { experts: 4, ep: 3 })
    );
    let out = array![[0u32, 1], [4, 0]];
    assert_eq!(
        RoutingPlan::new(&[out.view()], 4, 1),
        Err(Error::ExpertIdOutOfRange {
            rank: 0,
            token: 1,
            slot: 0,
            id: 4,
            experts: 4
        })
    );
    let dup = array![[0u32, 1, 2], [3, 1, 3]];
    assert_eq!(
        RoutingPlan::new(&[ok.view(), dup.view()], 4, 2).unwrap_err(),
        Error::ShapeMismatch {
            what: "routing ids of a rank (every rank must use the same top_k)",
            expected: vec![2, 2],
            got: vec![2, 3]
        }
    );
    assert_eq!(
        RoutingPlan::new(&[dup.view()], 4, 1),
        Err(Error::DuplicateExpert {
            rank: 0,
            token: 1,
            id: 3,
            first: 0,
            second: 2
        })
    );
    let none = Array2::<u32>::zeros((3, 0));
    assert_eq!(RoutingPlan::new(&[none.view()], 4, 1), Err(Error::TopKZero));
    let wide = Array2::<u32>::zeros((0, 5));
    assert_eq!(
        RoutingPlan::new(&[wide.view()], 4, 1),
        Err(Error::TopKExceedsExperts {
            top_k: 5,
            experts: 4
        })
    );
    let msg = RoutingPlan::new(&[out.view()], 4, 1)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("expert id 4") && msg.contains("0..4"), "{msg}");
}

#[test]
fn empty_ranks_and_no_tokens() {
    let empty = Array2::<u32>::zeros((0, 2));
    let p = plan_of(&[empty.clone(), empty], 4).unwrap();
    assert_eq!(p.recv_rows(0), 0);
    assert_eq!(p.recv_rows(1), 0);
    assert_eq!(p.expert_rows(1, 1), 0..0);
    assert_eq!(p.send_rows_to(0, 1), 0..0);
    assert_eq!(RoutingPlan::max_recv_rows(&[0, 0], 2, 2), 0);
    assert_eq!(
        RoutingPlan::max_recv_rows(&[usize::MAX, 1], 2, 2),
        usize::MAX
    );
    assert_eq!(RoutingPlan::max_recv_rows(&[10, 5], 8, 2), 30);
}
