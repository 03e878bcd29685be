use super::*;
use crate::budget::{choose_n_comm, choose_n_comm_layer0, choose_n_comm_layer1};
use crate::counts::Counts;
use crate::layer0::{Chunking, Layer0Options};
use crate::layer1::{CombineLayout, Layer1Options};
use crate::testutil::{Problem, Skew, plan_of, random_ids};
use crate::tile::{NOrder, TileShape};

const H: usize = 4096;
const F: usize = 14336;

fn model() -> CostModel {
    CostModel::h200()
}

/// Rank 0 of 2 receives `rows` rows from rank 1 only (nothing local).
fn remote_only(rows: usize, chunking: Chunking) -> Layer0Schedule {
    let counts = Counts::new(2, 2, vec![0, 0, rows, 0]).unwrap();
    let o = Layer0Options {
        tile: TileShape::new(128, 128, F).unwrap(),
        chunking,
        n_order: NOrder::Together,
    };
    Layer0Schedule::from_counts(&counts, 0, o).unwrap()
}

const WORK0: Layer0Work = Layer0Work {
    hidden: H,
    acc_factor: 2,
    elem_bytes: 2,
};

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs()
}

#[test]
fn copies_follow_the_per_block_rate_then_the_link() {
    let m = model();
    let s = remote_only(8192, Chunking::Rows(128));
    let bytes = 8192.0 * (H * 2) as f64;
    let one = simulate_layer0(&s, &WORK0, 1, &m).unwrap();
    assert!(
        close(one.comm_end_us - m.launch_us, bytes / 21e3, 1e-6),
        "{one:?}"
    );
    assert_eq!(one.remote_bytes, bytes);
    let many = simulate_layer0(&s, &WORK0, 32, &m).unwrap();
    // 64 chunks on 32 blocks: two full waves at the link rate.
    assert!(
        close(many.comm_end_us - m.launch_us, bytes / 360e3, 1e-6),
        "{many:?}"
    );
    // The copy engine: one copy after another, a latency each.
    let ce = simulate_layer0(&s, &WORK0, 0, &m).unwrap();
    let want = 64.0 * m.copy_engine_latency_us + bytes / 390e3;
    assert!(close(ce.comm_end_us - m.launch_us, want, 1e-6), "{ce:?}");
    // One flag per segment: one block copies everything whatever n_comm.
    let seg = remote_only(8192, Chunking::Segment);
    let r = simulate_layer0(&seg, &WORK0, 32, &m).unwrap();
    assert!(close(r.comm_end_us, one.comm_end_us, 1e-9));
}

#[test]
fn tiles_wait_for_their_flags() {
    let m = model();
    let s = remote_only(8192, Chunking::Rows(128));
    let r = simulate_layer0(&s, &WORK0, 16, &m).unwrap();
    assert!(r.gemm_stall_us > 0.0);
    assert!(r.total_us >= r.gemm_only_us);
    assert!(r.total_us >= r.comm_end_us && r.total_us >= r.gemm_end_us);
    // With the GEMM free of waits (an infinitely fast link) the stall vanishes.
    let fast = CostModel {
        copy_gbps_per_block: 1e9,
        link_gbps: 1e12,
        flag_latency_us: 0.0,
        ..m
    };
    let r = simulate_layer0(&s, &WORK0, 16, &fast).unwrap();
    assert!(r.gemm_stall_us < 1e-3, "{r:?}");
}

/// Mixtral-like rank of 4: 1024 rows per (source, expert), 2 local experts.
fn balanced(d: usize) -> (Counts, Layer0Schedule) {
    let counts = Counts::new(4, 8, vec![1024; 32]).unwrap();
    let o = Layer0Options {
        tile: TileShape::new(128, 128, F).unwrap(),
        chunking: Chunking::Rows(128),
        n_order: NOrder::Together,
    };
    let s = Layer0Schedule::from_counts(&counts, d, o).unwrap();
    (counts, s)
}

#[test]
fn local_first_beats_remote_first() {
    let m = model();
    let (_, s) = balanced(1);
    let mut rev = s.clone();
    rev.tiles.reverse();
    for n in [0, 8, 24] {
        let good = simulate_layer0(&s, &WORK0, n, &m).unwrap();
        let bad = simulate_layer0(&rev, &WORK0, n, &m).unwrap();
        assert!(
            good.total_us < bad.total_us && good.gemm_stall_us < bad.gemm_stall_us,
            "n_comm {n}: schedule {good:?} vs reversed {bad:?}"
        );
    }
}

/// The fused layer overlaps: faster than GEMM then communication, never faster than either.
#[test]
fn fused_layers_overlap_but_respect_both_floors() {
    let m = model();
    let no_gemm = CostModel {
        gemm_tflops: 1e9,
        ..m
    };
    let (_, s0) = balanced(2);
    for n in [0, 16, 64] {
        let fused = simulate_layer0(&s0, &WORK0, n, &m).unwrap();
        let comm = simulate_layer0(&s0, &WORK0, n, &no_gemm)
            .unwrap()
            .comm_end_us
            - m.launch_us;
        let gemm = fused.gemm_only_us - m.launch_us;
        assert!(fused.total_us >= m.launch_us + gemm.max(comm) - 1e-6);
        // Taking blocks from the GEMM costs it time in proportion.
        let blocks = if n == 0 { m.sms } else { m.sms - n };
        assert!(fused.gemm_end_us - m.launch_us >= gemm * m.sms as f64 / blocks as f64 * 0.98);
    }
    // At the chosen budget the layer beats GEMM-then-communication.
    let c = choose_n_comm_layer0(&s0, &WORK0, &m).unwrap();
    let comm = simulate_layer0(&s0, &WORK0, c.n_comm, &no_gemm)
        .unwrap()
        .comm_end_us
        - m.launch_us;
    assert!(c.report.total_us < c.report.gemm_only_us + comm, "{c:?}");
    // Layer 1 on a real routing plan of 4 ranks.
    let p = Problem {
        world: 4,
        experts: 8,
        top_k: 2,
        tokens: vec![2048; 4],
        skew: Skew::Uniform,
    };
    let plan = plan_of(&random_ids(&p, 1), 8);
    let (layouts, reduce) = ReducePlan::all(&plan).unwrap();
    let o1 = Layer1Options::new(TileShape::new(128, 256, H).unwrap());
    let s1 = Layer1Schedule::from_plan(&plan, 0, o1).unwrap();
    assert_eq!(s1.groups.len(), 8);
    let work = Layer1Work {
        ffn: F,
        elem_bytes: 2,
        owner_rows: layouts[0].rows(),
        tokens: 2048,
    };
    for n in [0, 16] {
        let fused = simulate_layer1(&s1, &reduce[0], &work, n, &m).unwrap();
        let comm = simulate_layer1(&s1, &reduce[0], &work, n, &no_gemm)
            .unwrap()
            .comm_end_us
            - m.launch_us;
        let gemm = fused.gemm_only_us - m.launch_us;
        assert!(fused.total_us >= m.launch_us + gemm.max(comm) - 1e-6);
        // Every remote item crosses the link once per column: items × H × 2 bytes.
        assert_eq!(
            fused.remote_bytes,
            (reduce[0].remote_items() * H * 2) as f64
        );
        assert!(
            fused.comm_end_us > fused.gemm_end_us,
            "the last group's reduce trails the GEMM"
        );
    }
    let c = choose_n_comm_layer1(&s1, &reduce[0], &work, &m).unwrap();
    let min = c.tried.iter().map(|t| t.1).fold(f64::INFINITY, f64::min);
    assert_eq!(c.report.total_us, min);
    let comm = simulate_layer1(&s1, &reduce[0], &work, c.n_comm, &no_gemm)
        .unwrap()
        .comm_end_us
        - m.launch_us;
    assert!(c.report.total_us < c.report.gemm_only_us + comm, "{c:?}");
    let _ = CombineLayout::max_rows(1, 1, 1);
}

#[test]
fn chooser_keeps_the_fastest_and_prefers_fewer_blocks() {
    let m = model();
    let fake = |n: usize, t: f64| SimReport {
        n_comm: n,
        total_us: t,
        gemm_end_us: t,
        comm_end_us: t,
        gemm_only_us: t,
        gemm_stall_us: 0.0,
        remote_bytes: 0.0,
        local_bytes: 0.0,
    };
    // U-shaped with a flat bottom at 20..=24.
    let c = choose_n_comm(&m, 0..40, |n| Ok(fake(n, (n as f64 - 22.0).abs().max(2.0)))).unwrap();
    assert_eq!(c.n_comm, 20);
    assert_eq!(c.tried.len(), 40);
    assert!(matches!(
        choose_n_comm(&m, [1, 132], |n| Ok(fake(n, 1.0))),
        Err(Error::NCommTooLarge { n_comm: 132, .. })
    ));
    assert!(matches!(
        choose_n_comm(&m, [], |n| Ok(fake(n, 1.0))),
        Err(Error::ZeroSize { .. })
    ));
    // On a real schedule: the choice is the minimum of what was tried.
    let (_, s) = balanced(0);
    let c = choose_n_comm_layer0(&s, &WORK0, &m).unwrap();
    assert_eq!(c.tried.len(), 65);
    let min = c.tried.iter().map(|t| t.1).fold(f64::INFINITY, f64::min);
    assert_eq!(c.report.total_us, min);
}

#[test]
fn bad_simulations_are_errors() {
    let m = model();
    let s = remote_only(10, Chunking::Segment);
    assert!(matches!(
        simulate_layer0(&s, &WORK0, 132, &m),
        Err(Error::NCommTooLarge {
            n_comm: 132,
            sms: 132
        })
    ));
    assert!(matches!(
        simulate_layer0(
            &s,
            &Layer0Work {
                elem_bytes: 0,
                ..WORK0
            },
            1,
            &m
        ),
        Err(Error::ZeroSize { .. })
    ));
    let plan = plan_of(&[ndarray::array![[0u32], [1]], ndarray::array![[1u32]]], 2);
    let (_, reduce) = ReducePlan::all(&plan).unwrap();
    let s1 = Layer1Schedule::from_plan(
        &plan,
        0,
        Layer1Options::new(TileShape::new(4, 4, 8).unwrap()),
    )
    .unwrap();
    let work = Layer1Work {
        ffn: 8,
        elem_bytes: 2,
        owner_rows: 2,
        tokens: 2,
    };
    assert!(matches!(
        simulate_layer1(&s1, &reduce[1], &work, 1, &m),
        Err(Error::Mismatch {
            expected: 0,
            got: 1,
            ..
        })
    ));
    simulate_layer1(&s1, &reduce[0], &work, 1, &m).unwrap();
}

/// Chunks release the first rows of a big segment early: less GEMM stall than one flag per
/// segment, whatever the number of communication blocks.
#[test]
fn chunks_release_big_segments_early() {
    let m = model();
    let counts = Counts::new(4, 8, vec![1024; 32]).unwrap();
    let sched = |chunking| {
        let o = Layer0Options {
            tile: TileShape::new(128, 128, F).unwrap(),
            chunking,
            n_order: NOrder::Together,
        };
        Layer0Schedule::from_counts(&counts, 3, o).unwrap()
    };
    let (seg, rows) = (sched(Chunking::Segment), sched(Chunking::Rows(128)));
    for n in [0, 4, 16] {
        let a = simulate_layer0(&seg, &WORK0, n, &m).unwrap();
        let b = simulate_layer0(&rows, &WORK0, n, &m).unwrap();
        assert!(
            b.gemm_stall_us < a.gemm_stall_us,
            "n_comm {n}: {b:?} vs {a:?}"
        );
        assert!(b.total_us <= a.total_us, "n_comm {n}");
    }
}
