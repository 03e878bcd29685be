//! Random routings for the tests of every module.

use comet_core::RoutingPlan;
use ndarray::Array2;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};

/// How the random ids are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Skew {
    /// Any k distinct experts.
    Uniform,
    /// Only the experts of this rank (needs k <= L).
    AllToRank(usize),
    /// Only even experts (every odd expert empty; needs k <= ceil(E / 2)).
    EvenOnly,
}

/// A random routing problem: `(world, experts, k, tokens per rank, skew)`.
#[derive(Debug, Clone)]
pub(crate) struct Problem {
    pub world: usize,
    pub experts: usize,
    pub top_k: usize,
    pub tokens: Vec<usize>,
    pub skew: Skew,
}

/// Ids `[M_s, k]` per rank, seeded.
pub(crate) fn random_ids(p: &Problem, seed: u64) -> Vec<Array2<u32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let l = p.experts / p.world;
    let pool: Vec<u32> = match p.skew {
        Skew::Uniform => (0..p.experts as u32).collect(),
        Skew::AllToRank(r) => ((r * l) as u32..((r + 1) * l) as u32).collect(),
        Skew::EvenOnly => (0..p.experts as u32).filter(|e| e % 2 == 0).collect(),
    };
    assert!(
        p.top_k <= pool.len(),
        "k = {} > pool {}",
        p.top_k,
        pool.len()
    );
    p.tokens
        .iter()
        .map(|&m| {
            let mut a = Array2::<u32>::zeros((m, p.top_k));
            for t in 0..m {
                let mut v = pool.clone();
                v.shuffle(&mut rng);
                for j in 0..p.top_k {
                    a[[t, j]] = v[j];
                }
            }
            a
        })
        .collect()
}

/// The routing plan of `ids`.
pub(crate) fn plan_of(ids: &[Array2<u32>], experts: usize) -> RoutingPlan {
    let views: Vec<_> = ids.iter().map(|a| a.view()).collect();
    RoutingPlan::new(&views, experts, ids.len()).expect("valid ids")
}

/// A random problem of at most `max_world` ranks, 16 experts, k 4, `max_tokens` per rank.
pub(crate) fn random_problem(seed: u64, max_world: usize, max_tokens: usize) -> Problem {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let world = rng.random_range(1..=max_world);
    let local = rng.random_range(1..=16 / world.max(1)).max(1);
    let experts = world * local;
    let skew = match rng.random_range(0..4) {
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
    let tokens = (0..world)
        .map(|_| {
            if rng.random_range(0..6) == 0 {
                0
            } else {
                rng.random_range(1..=max_tokens)
            }
        })
        .collect();
    Problem {
        world,
        experts,
        top_k,
        tokens,
        skew,
    }
}
