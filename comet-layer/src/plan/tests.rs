//! The exchange plan against comet-core's routing plan, and the whole index pipeline of the
//! NCCL baselines (send-layout permute, scatter of receive rows, all-to-all-v into staging,
//! permute into the receive layout, gather back, all-to-all-v back, combine) simulated on
//! the host with W ranks: every row must reach the expert its slot names, in comet-core's
//! receive layout, and come back to its slot.

#![allow(clippy::needless_range_loop)] // rank-indexed simulation reads clearer with indices

use super::*;
use comet_core::routing::RoutingPlan;
use ndarray::Array2;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// Distinct random ids per token (`[tokens, k]`), optionally restricted to `allowed`.
fn random_ids(rng: &mut StdRng, tokens: usize, k: usize, allowed: &[usize]) -> Vec<i32> {
    let mut out = Vec::with_capacity(tokens * k);
    for _ in 0..tokens {
        let mut pool = allowed.to_vec();
        for _ in 0..k {
            let i = rng.random_range(0..pool.len());
            out.push(pool.swap_remove(i) as i32);
        }
    }
    out
}

struct Case {
    world: usize,
    experts: usize,
    k: usize,
    chunks: usize,
    max_tokens: usize,
    tokens: Vec<usize>,
    ids: Vec<Vec<i32>>,
}

fn case(rng: &mut StdRng, world: usize, experts: usize, k: usize, chunks: usize) -> Case {
    let max_tokens = rng.random_range(chunks.max(1)..=chunks.max(1) * 7 + 5);
    let tokens: Vec<usize> = (0..world)
        .map(|_| rng.random_range(chunks..=max_tokens))
        .collect();
    let all: Vec<usize> = (0..experts).collect();
    let ids = tokens
        .iter()
        .map(|&m| random_ids(rng, m, k, &all))
        .collect();
    Case {
        world,
        experts,
        k,
        chunks,
        max_tokens,
        tokens,
        ids,
    }
}

fn layout(c: &Case, rank: usize) -> Layout {
    Layout::new(c.world, rank, c.experts, c.k, c.chunks, c.max_tokens).unwrap()
}

fn gathered(c: &Case) -> Vec<i32> {
    let l = layout(c, 0);
    (0..c.world)
        .flat_map(|s| header(&l, &c.ids[s], c.tokens[s], 0))
        .collect()
}

/// Rows are tagged (source rank, token, expert); -1 marks a row nobody wrote.
type Row = (i64, i64, i64);
const UNSET: Row = (-1, -1, -1);

/// Checks the plans of every rank against comet-core and simulates the data movement.
fn check_case(c: &Case) {
    let g = gathered(c);
    let plans: Vec<CallPlan> = (0..c.world)
        .map(|d| plan_call(&layout(c, d), &g).unwrap())
        .collect();
    let lay = layout(c, 0);
    let l = lay.local_experts();
    for ch in 0..c.chunks {
        // comet-core's plan of this chunk.
        let chunk_ids: Vec<Array2<u32>> = (0..c.world)
            .map(|s| {
                let r = lay.chunk_tokens(c.tokens[s], ch);
                let v: Vec<u32> = c.ids[s][r.start * c.k..r.end * c.k]
                    .iter()
                    .map(|&i| i as u32)
                    .collect();
                Array2::from_shape_vec((r.len(), c.k), v).unwrap()
            })
            .collect();
        let views: Vec<_> = chunk_ids.iter().map(|a| a.view()).collect();
        let core = RoutingPlan::new(&views, c.experts, c.world).unwrap();
        for d in 0..c.world {
            let x = &plans[d].chunks[ch];
            assert_eq!(x.tokens, lay.chunk_tokens(c.tokens[d], ch));
            assert_eq!(x.send_total(), x.tokens.len() * c.k);
            assert_eq!(x.recv_total, core.recv_rows(d));
            assert!(x.recv_total <= lay.recv_capacity());
            assert!(x.send_total() <= lay.send_capacity());
            for p in 0..c.world {
                assert_eq!(x.send_rows[p], core.send_rows_to(d, p).len());
                assert_eq!(x.send_offsets[p], core.send_rows_to(d, p).start);
                assert_eq!(x.recv_rows[p], core.recv_rows_from(d, p));
            }
        }

        // Dispatch: send buffers and their receive-row tags (the scatter kernel).
        let mut send: Vec<Vec<Row>> = Vec::new();
        let mut sidx: Vec<Vec<i64>> = Vec::new();
        for s in 0..c.world {
            let n = chunk_ids[s].nrows() * c.k;
            let (mut buf, mut idx) = (vec![UNSET; n], vec![-1i64; n]);
            for t in 0..chunk_ids[s].nrows() {
                for j in 0..c.k {
                    let r = core.send_row(s, t, j);
                    buf[r] = (s as i64, t as i64, -1);
                    idx[r] = core.dest(s, t, j).1 as i64;
                }
            }
            assert!(buf.iter().all(|r| *r != UNSET), "send rows covered once");
            send.push(buf);
            sidx.push(idx);
        }
        // All-to-all-v into staging, then the permute into the receive layout.
        let mut stage: Vec<Vec<Row>> = Vec::new();
        let mut ridx: Vec<Vec<i64>> = Vec::new();
        for d in 0..c.world {
            let x = &plans[d].chunks[ch];
            let (mut st, mut ri) = (vec![UNSET; x.recv_total], vec![-1i64; x.recv_total]);
            for s in 0..c.world {
                let xs = &plans[s].chunks[ch];
                assert_eq!(xs.send_rows[d], x.recv_rows[s], "counts agree pairwise");
                for i in 0..x.recv_rows[s] {
                    st[x.recv_offsets[s] + i] = send[s][xs.send_offsets[d] + i];
                    ri[x.recv_offsets[s] + i] = sidx[s][xs.send_offsets[d] + i];
                }
            }
            stage.push(st);
            ridx.push(ri);
        }
        let mut outs: Vec<Vec<Row>> = Vec::new();
        for d in 0..c.world {
            let n = plans[d].chunks[ch].recv_total;
            let mut recv = vec![UNSET; n];
            for (i, &r) in ridx[d].iter().enumerate() {
                assert!(recv[r as usize] == UNSET, "receive row written twice");
                recv[r as usize] = stage[d][i];
            }
            for (row, v) in recv.iter().enumerate() {
                let (s, t, _) = core.source(d, row);
                assert_eq!((v.0, v.1), (s as i64, t as i64), "rank {d} row {row}");
            }
            // "Experts": tag each row with the expert whose rows hold it.
            for le in 0..l {
                for row in core.expert_rows(d, le) {
                    recv[row].2 = (d * l + le) as i64;
                }
            }
            outs.push(recv);
        }
        // Gather back to staging order, all-to-all-v back, combine.
        for s in 0..c.world {
            let xs = &plans[s].chunks[ch];
            let mut back = vec![UNSET; xs.send_total()];
            for d in 0..c.world {
                let x = &plans[d].chunks[ch];
                for i in 0..xs.send_rows[d] {
                    let staged = outs[d][ridx[d][x.recv_offsets[s] + i] as usize];
                    back[xs.send_offsets[d] + i] = staged;
                }
            }
            for t in 0..chunk_ids[s].nrows() {
                for j in 0..c.k {
                    let got = back[core.send_row(s, t, j)];
                    let want = (s as i64, t as i64, i64::from(chunk_ids[s][[t, j]]));
                    assert_eq!(got, want, "slot ({s}, {t}, {j}) of chunk {ch}");
                }
            }
        }
    }
}

#[test]
fn exchange_matches_comet_core_and_rows_round_trip() {
    let mut rng = StdRng::seed_from_u64(7);
    for world in 1..=4 {
        for (experts_per_rank, k) in [(1, 1), (2, 2), (4, 2), (3, 3), (8, 8), (2, 4)] {
            let experts = experts_per_rank * world;
            if k > experts {
                continue;
            }
            for chunks in [1, 2, 3] {
                check_case(&case(&mut rng, world, experts, k, chunks));
            }
        }
    }
}

#[test]
fn all_tokens_to_one_rank_and_empty_experts() {
    let mut rng = StdRng::seed_from_u64(11);
    // Every slot to rank 0's experts: rank 1 receives nothing.
    let (world, experts, k) = (2, 8, 2);
    let tokens = vec![9, 6];
    let ids: Vec<Vec<i32>> = tokens
        .iter()
        .map(|&m| random_ids(&mut rng, m, k, &[0, 1, 2, 3]))
        .collect();
    let c = Case {
        world,
        experts,
        k,
        chunks: 2,
        max_tokens: 12,
        tokens,
        ids,
    };
    check_case(&c);
    let g = gathered(&c);
    let p1 = plan_call(&layout(&c, 1), &g).unwrap();
    assert!(p1.chunks.iter().all(|x| x.recv_total == 0));
    // Rank 1 sends its 6·k slots away and gets nothing to send back.
    assert_eq!(p1.remote_rows(1), 6 * k);
    // Only even experts: odd experts are empty.
    let ids: Vec<Vec<i32>> = c
        .tokens
        .iter()
        .map(|&m| random_ids(&mut rng, m, k, &[0, 2, 4, 6]))
        .collect();
    check_case(&Case { ids, ..c });
}

#[test]
fn tokens_not_equal_across_ranks_and_one_token_chunks() {
    let mut rng = StdRng::seed_from_u64(3);
    let all: Vec<usize> = (0..16).collect();
    let tokens = vec![5, 1, 3, 4];
    let ids = tokens
        .iter()
        .map(|&m| random_ids(&mut rng, m, 2, &all))
        .collect();
    check_case(&Case {
        world: 4,
        experts: 16,
        k: 2,
        chunks: 1,
        max_tokens: 5,
        tokens,
        ids,
    });
}

#[test]
fn remote_rows_count_both_directions() {
    let mut rng = StdRng::seed_from_u64(5);
    let c = case(&mut rng, 3, 6, 2, 2);
    let g = gathered(&c);
    for d in 0..3 {
        let p = plan_call(&layout(&c, d), &g).unwrap();
        let sent: usize = p.chunks.iter().map(|x| x.remote_send_rows(d)).sum();
        let recv: usize = p.chunks.iter().map(|x| x.remote_recv_rows(d)).sum();
        assert_eq!(p.remote_rows(d), sent + recv);
        let own: usize = p.chunks.iter().map(|x| x.send_rows[d]).sum();
        assert_eq!(sent + own, c.tokens[d] * c.k);
    }
}

#[test]
fn a_rejecting_rank_is_named_to_every_rank() {
    let mut rng = StdRng::seed_from_u64(9);
    let c = case(&mut rng, 3, 6, 2, 1);
    let lay = layout(&c, 0);
    let mut g = gathered(&c);
    let hl = lay.header_len();
    // Rank 2 says its input was bad.
    g[2 * hl + lay.chunks * c.experts + 1] = Reject::BadInput as i32;
    for d in 0..3 {
        let e = plan_call(&layout(&c, d), &g).unwrap_err();
        assert!(
            matches!(&e, Error::PeerRejected { rank: 2, reason } if reason.contains("dtype or shape")),
            "{e}"
        );
    }
    assert!(Reject::describe(1, 99).contains("99 tokens exceed"));
    assert!(Reject::describe(2, 3).contains("more chunks than its 3 tokens"));
    assert!(Reject::describe(42, 0).contains("unknown status 42"));
    assert!(Reject::describe(Reject::Device as i32, 8).contains("routing kernels failed"));
}

#[test]
fn inconsistent_headers_are_errors_not_panics() {
    let mut rng = StdRng::seed_from_u64(13);
    let c = case(&mut rng, 2, 4, 2, 2);
    let lay = layout(&c, 0);
    let g = gathered(&c);
    // Wrong length.
    let e = plan_call(&lay, &g[1..]).unwrap_err();
    assert!(matches!(e, Error::Counts { .. }), "{e}");
    // A count that does not add up to tokens·k.
    let mut bad = g.clone();
    bad[0] += 1;
    let e = plan_call(&lay, &bad).unwrap_err();
    assert!(
        e.to_string().contains("slots counted in chunk 0 of rank 0"),
        "{e}"
    );
    // Tokens above the capacity.
    let mut bad = g.clone();
    bad[lay.chunks * c.experts] = (c.max_tokens + 1) as i32;
    let e = plan_call(&lay, &bad).unwrap_err();
    assert!(e.to_string().contains("tokens of rank 0"), "{e}");
    // Negative tokens.
    let mut bad = g;
    bad[lay.chunks * c.experts] = -3;
    assert!(matches!(plan_call(&lay, &bad), Err(Error::Counts { .. })));
}

#[test]
fn layout_capacities_and_rules() {
    let l = Layout::new(2, 1, 8, 2, 3, 100).unwrap();
    assert_eq!(l.local_experts(), 4);
    assert_eq!(l.chunk_capacity(), 34);
    assert_eq!(l.send_capacity(), 68);
    assert_eq!(l.recv_capacity(), 2 * 34 * 2);
    assert_eq!(l.header_len(), 3 * 8 + 2);
    // k > L: a token sends at most L rows to one rank.
    let l = Layout::new(4, 0, 8, 4, 1, 10).unwrap();
    assert_eq!(l.recv_capacity(), 4 * 10 * 2);
    assert!(matches!(
        Layout::new(3, 0, 8, 2, 1, 4),
        Err(Error::Core(comet_core::Error::ExpertsNotDivisible { .. }))
    ));
    assert!(matches!(
        Layout::new(2, 2, 8, 2, 1, 4),
        Err(Error::Core(comet_core::Error::RankOutOfRange { .. }))
    ));
    assert!(matches!(
        Layout::new(2, 0, 8, 2, 0, 4),
        Err(Error::ZeroChunks)
    ));
    assert!(matches!(
        Layout::new(2, 0, 8, 2, 5, 4),
        Err(Error::TooManyChunks {
            chunks: 5,
            tokens: 4
        })
    ));
    let l = Layout::new(2, 0, 8, 2, 4, 64).unwrap();
    assert!(matches!(l.check_tokens(0), Err(Error::ZeroTokens { .. })));
    assert!(matches!(
        l.check_tokens(65),
        Err(Error::TooManyTokens {
            tokens: 65,
            max_tokens: 64
        })
    ));
    assert!(matches!(
        l.check_tokens(3),
        Err(Error::TooManyChunks {
            chunks: 4,
            tokens: 3
        })
    ));
    l.check_tokens(4).unwrap();
    assert_eq!(Reject::of(&Error::ZeroChunks), Reject::BadInput);
    assert_eq!(
        Reject::of(&l.check_tokens(65).unwrap_err()),
        Reject::TooManyTokens
    );
}

#[test]
fn header_mirrors_the_kernel_definition() {
    let l = Layout::new(1, 0, 4, 2, 2, 10).unwrap();
    // 5 tokens: chunk 0 = tokens 0..2, chunk 1 = 2..5.
    let ids = [0, 1, 1, 2, 3, 0, 3, 2, 9, -1];
    let h = header(&l, &ids, 5, 0);
    assert_eq!(&h[..4], &[1, 2, 1, 0]);
    assert_eq!(&h[4..8], &[1, 0, 1, 2], "out-of-range ids are not counted");
    assert_eq!(&h[8..], &[5, 0]);
}
