//! GPU tests of the router, routing plan, row movement and activation kernels against
//! comet-core's definitions on fresh random inputs, outputs poisoned before each run.

#![allow(clippy::too_many_arguments, clippy::needless_range_loop)]

mod common;

use comet_core::Activation as CoreAct;
use comet_core::routing::{RoutingPlan as CorePlan, router_logits, top_k};
use comet_kernels::DeviceTensor;
use comet_kernels::activation::{Activation, activation_backward, activation_forward};
use comet_kernels::buffer::DType;
use comet_kernels::router::{router_backward, router_logits as gpu_logits, softmax_topk};
use comet_kernels::routing::RoutingPlan;
use comet_kernels::rows::{combine_rows, gather_rows, permute_rows, row_dots};
use common::*;
use ndarray::Array2;

fn to_f32_arr(v: &[f32], r: usize, c: usize) -> Array2<f32> {
    Array2::from_shape_vec((r, c), v.to_vec()).unwrap()
}

/// Tokens whose top-(k+1) probabilities contain a near-tie the GPU may break differently.
fn near_tie(p: &[f32], k: usize) -> bool {
    let mut s: Vec<f32> = p.to_vec();
    s.sort_by(|a, b| b.partial_cmp(a).unwrap());
    let upto = (k + 1).min(s.len());
    (1..upto).any(|i| (s[i - 1] - s[i]).abs() <= 1e-5 * s[i - 1].abs().max(1e-30))
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn router_logits_softmax_topk() {
    let gpu = gpu();
    let cases = [
        (8usize, 2usize, true, 4096usize),
        (16, 2, true, 1408),
        (64, 4, false, 2048),
        (256, 8, true, 7168),
        (256, 1, false, 512),
        (40, 5, true, 256),
        (1024, 3, true, 128),
        (7, 7, false, 64),
    ];
    for (e, k, renorm, h) in cases {
        let tag = format!("router E={e} k={k} renorm={renorm} H={h}");
        let seed = fresh_seed(&tag);
        let m = 301;
        let x = random_vec(m * h, 1.0, DType::BF16, seed);
        let wr = random_vec(e * h, 1.0 / (h as f32).sqrt(), DType::BF16, seed + 1);
        let x_d = upload(&gpu, DType::BF16, &[m, h], &x);
        let wr_d = upload(&gpu, DType::BF16, &[e, h], &wr);
        let mut logits_d = poisoned(&gpu, DType::F32, &[m, e]);
        gpu_logits(&gpu, &x_d, &wr_d, &mut logits_d).unwrap();
        let logits = download(&gpu, &logits_d);
        let want =
            router_logits(to_f32_arr(&x, m, h).view(), to_f32_arr(&wr, e, h).view()).unwrap();
        let want64: Vec<f64> = want.iter().map(|&v| f64::from(v)).collect();
        check_close(&format!("{tag}: logits"), &logits, &want64, 1e-4);

        let mut probs_d = poisoned(&gpu, DType::F32, &[m, e]);
        let mut ids_d = poisoned(&gpu, DType::I32, &[m, k]);
        let mut w_d = poisoned(&gpu, DType::F32, &[m, k]);
        softmax_topk(
            &gpu,
            &logits_d,
            k,
            renorm,
            Some(&mut probs_d),
            &mut ids_d,
            &mut w_d,
        )
        .unwrap();
        let (probs, ids, w) = (
            download(&gpu, &probs_d),
            ids_d.to_host::<i32>(&gpu).unwrap(),
            download(&gpu, &w_d),
        );
        // CPU definition on the GPU's logits.
        let cpu = top_k(to_f32_arr(&logits, m, e).view(), k, renorm).unwrap();
        let cpu_p: Vec<f64> = cpu.probs.iter().map(|&v| f64::from(v)).collect();
        check_close(&format!("{tag}: probs"), &probs, &cpu_p, 1e-5);
        let mut ties = 0;
        let (mut gw, mut cw) = (Vec::new(), Vec::new());
        for t in 0..m {
            let row = &cpu.probs.as_slice().unwrap()[t * e..(t + 1) * e];
            if near_tie(row, k) {
                ties += 1;
                continue;
            }
            for j in 0..k {
                assert_eq!(
                    ids[t * k + j] as u32,
                    cpu.ids[[t, j]],
                    "{tag}: token {t} slot {j}"
                );
                gw.push(w[t * k + j]);
                cw.push(f64::from(cpu.weights[[t, j]]));
            }
        }
        assert!(ties * 50 <= m, "{tag}: {ties} near-tie tokens of {m}");
        check_close(&format!("{tag}: weights"), &gw, &cw, 1e-5);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn router_backward_matches_formula() {
    let gpu = gpu();
    for (e, k, renorm) in [
        (8usize, 2usize, true),
        (64, 4, false),
        (256, 8, true),
        (48, 6, false),
    ] {
        let tag = format!("router backward E={e} k={k} renorm={renorm}");
        let seed = fresh_seed(&tag);
        let m = 129;
        let logits = random_vec(m * e, 2.0, DType::F32, seed);
        let cpu = top_k(to_f32_arr(&logits, m, e).view(), k, renorm).unwrap();
        let probs: Vec<f32> = cpu.probs.iter().copied().collect();
        let ids: Vec<i32> = cpu.ids.iter().map(|&v| v as i32).collect();
        let dw = random_vec(m * k, 1.0, DType::F32, seed + 1);
        let p_d = upload(&gpu, DType::F32, &[m, e], &probs);
        let ids_d = upload_i32(&gpu, &[m, k], &ids);
        let dw_d = upload(&gpu, DType::F32, &[m, k], &dw);
        let mut dl_d = poisoned(&gpu, DType::F32, &[m, e]);
        let mut dl16_d = poisoned(&gpu, DType::BF16, &[m, e]);
        router_backward(
            &gpu,
            &p_d,
            &ids_d,
            &dw_d,
            renorm,
            &mut dl_d,
            Some(&mut dl16_d),
        )
        .unwrap();
        let mut want = vec![0f64; m * e];
        for t in 0..m {
            let p = |i: usize| f64::from(probs[t * e + i]);
            let mut dp = vec![0f64; e];
            let s: f64 = (0..k).map(|j| p(ids[t * k + j] as usize)).sum();
            let dot: f64 = (0..k)
                .map(|j| f64::from(dw[t * k + j]) * p(ids[t * k + j] as usize))
                .sum();
            for j in 0..k {
                let g = f64::from(dw[t * k + j]);
                dp[ids[t * k + j] as usize] += if renorm { g / s - dot / (s * s) } else { g };
            }
            let inner: f64 = (0..e).map(|i| dp[i] * p(i)).sum();
            for i in 0..e {
                want[t * e + i] = p(i) * (dp[i] - inner);
            }
        }
        check_close(
            &format!("{tag}: dlogits"),
            &download(&gpu, &dl_d),
            &want,
            1e-5,
        );
        check_close(
            &format!("{tag}: dlogits bf16"),
            &download(&gpu, &dl16_d),
            &want,
            1e-2,
        );
    }
}

fn ids_array(ids: &[i32], m: usize, k: usize) -> Array2<u32> {
    Array2::from_shape_fn((m, k), |(t, j)| ids[t * k + j] as u32)
}

/// Builds every rank's plan on the GPU and compares it with comet-core's.
fn check_plan(world: usize, e: usize, k: usize, tokens: &[usize], all_ids: &[Vec<i32>], tag: &str) {
    let gpu = gpu();
    let core = CorePlan::new(
        &all_ids
            .iter()
            .zip(tokens)
            .map(|(v, &m)| ids_array(v, m, k))
            .collect::<Vec<_>>()
            .iter()
            .map(|a| a.view())
            .collect::<Vec<_>>(),
        e,
        world,
    )
    .unwrap();
    // Counts on the GPU for every rank, gathered into [W, E].
    let mut counts_all = Vec::new();
    let mut ids_dev = Vec::new();
    for (s, &m) in tokens.iter().enumerate() {
        let ids_d = upload_i32(&gpu, &[m, k], &all_ids[s]);
        let mut plan = RoutingPlan::new(&gpu, m, k, e, world, s).unwrap();
        plan.counts.poison(&gpu).unwrap();
        plan.count(&gpu, &ids_d).unwrap();
        let c = plan.counts.to_host::<i32>(&gpu).unwrap();
        for (i, &v) in c.iter().enumerate() {
            assert_eq!(
                v as usize,
                core.count(s, i),
                "{tag}: count(rank {s}, expert {i})"
            );
        }
        counts_all.extend(c);
        ids_dev.push(ids_d);
    }
    let counts_d = upload_i32(&gpu, &[world, e], &counts_all);
    let l = e / world;
    for (d, &m) in tokens.iter().enumerate() {
        let mut plan = RoutingPlan::new(&gpu, m, k, e, world, d).unwrap();
        for t in [
            &mut plan.expert_offsets,
            &mut plan.seg_offsets,
            &mut plan.send_offsets,
            &mut plan.send_rank_counts,
            &mut plan.recv_rank_counts,
            &mut plan.scatter_rank,
            &mut plan.scatter_row,
            &mut plan.send_row,
            &mut plan.status,
        ] {
            t.poison(&gpu).unwrap();
        }
        plan.count(&gpu, &ids_dev[d]).unwrap();
        plan.build(&gpu, &counts_d, &ids_dev[d]).unwrap();
        let h = |t: &DeviceTensor| t.to_host::<i32>(&gpu).unwrap();
        assert_eq!(h(&plan.status), vec![0, 0], "{tag}: status rank {d}");
        let eo = h(&plan.expert_offsets);
        for li in 0..l {
            assert_eq!(
                eo[li] as usize,
                core.expert_rows(d, li).start,
                "{tag}: expert_offsets[{li}] rank {d}"
            );
        }
        assert_eq!(
            eo[l] as usize,
            core.recv_rows(d),
            "{tag}: recv rows rank {d}"
        );
        let so: Vec<usize> = h(&plan.seg_offsets).iter().map(|&v| v as usize).collect();
        assert_eq!(
            so,
            core.segment_offsets(d),
            "{tag}: segment offsets rank {d}"
        );
        let send = h(&plan.send_offsets);
        let mut run = 0;
        for ex in 0..e {
            assert_eq!(
                send[ex] as usize, run,
                "{tag}: send offset of expert {ex} rank {d}"
            );
            run += core.count(d, ex);
        }
        assert_eq!(send[e] as usize, run);
        let (src, rcv) = (h(&plan.send_rank_counts), h(&plan.recv_rank_counts));
        for r in 0..world {
            assert_eq!(
                src[r] as usize,
                core.send_rows_to(d, r).len(),
                "{tag}: rows {d} -> {r}"
            );
            assert_eq!(
                rcv[r] as usize,
                core.recv_rows_from(d, r),
                "{tag}: rows {r} -> {d}"
            );
        }
        let (sr, srow, send_row) = (
            h(&plan.scatter_rank),
            h(&plan.scatter_row),
            h(&plan.send_row),
        );
        for t in 0..m {
            for j in 0..k {
                let (dr, row) = core.dest(d, t, j);
                assert_eq!(
                    (sr[t * k + j] as usize, srow[t * k + j] as usize),
                    (dr, row),
                    "{tag}: dest of slot ({t},{j}) on rank {d}"
                );
                assert_eq!(
                    send_row[t * k + j] as usize,
                    core.send_row(d, t, j),
                    "{tag}: send row of ({t},{j}) rank {d}"
                );
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn routing_plan_matches_core() {
    for (world, e, k, per_rank) in [
        (1usize, 8usize, 2usize, 1000usize),
        (1, 256, 8, 2500),
        (2, 64, 4, 700),
        (2, 256, 8, 300),
        (4, 16, 2, 123),
        (1, 1024, 3, 50),
        (8, 8, 8, 40),
    ] {
        let tag = format!("plan W={world} E={e} k={k}");
        let seed = fresh_seed(&tag);
        let tokens: Vec<usize> = (0..world).map(|s| per_rank + 17 * s).collect();
        let all: Vec<Vec<i32>> = tokens
            .iter()
            .enumerate()
            .map(|(s, &m)| random_ids(m, k, e, seed + s as u64))
            .collect();
        check_plan(world, e, k, &tokens, &all, &tag);
    }
    // Every token to the same experts (all other experts empty), and a rank with no tokens.
    let (world, e, k) = (2usize, 16usize, 2usize);
    let tokens = vec![500usize, 0];
    let all = vec![
        (0..500).flat_map(|_| [5, 11]).collect::<Vec<i32>>(),
        Vec::new(),
    ];
    check_plan(world, e, k, &tokens, &all, "plan skewed");
    let tokens = vec![3000usize];
    let all = vec![vec![0i32; 3000]];
    check_plan(1, 8, 1, &tokens, &all, "plan all to expert 0");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn routing_plan_reports_bad_ids() {
    let gpu = gpu();
    let (m, k, e) = (100usize, 2usize, 8usize);
    let mut ids = random_ids(m, k, e, fresh_seed("bad ids"));
    ids[37] = 8; // out of range
    ids[90] = -3;
    let ids_d = upload_i32(&gpu, &[m, k], &ids);
    let mut plan = RoutingPlan::new(&gpu, m, k, e, 1, 0).unwrap();
    plan.build_local(&gpu, &ids_d).unwrap();
    let status = plan.status.to_host::<i32>(&gpu).unwrap();
    assert_eq!(status[0], 2, "count kernel status");
    assert!(status[1] >= 2, "plan kernel status {status:?}");
    let rows = plan.scatter_row.to_host::<i32>(&gpu).unwrap();
    assert_eq!((rows[37], rows[90]), (-1, -1));
    // A counts matrix that disagrees with the ids is reported too.
    let mut plan = RoutingPlan::new(&gpu, m, k, e, 1, 0).unwrap();
    let good = random_ids(m, k, e, 5);
    let ids_d = upload_i32(&gpu, &[m, k], &good);
    let counts_d = upload_i32(&gpu, &[1, e], &[25; 8]);
    plan.build(&gpu, &counts_d, &ids_d).unwrap();
    assert!(
        plan.status.to_host::<i32>(&gpu).unwrap()[1] > 0,
        "inconsistent counts must be reported"
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn permute_gather_combine_dots() {
    let gpu = gpu();
    for (dtype, h, m, k) in [
        (DType::BF16, 7168usize, 37usize, 8usize),
        (DType::BF16, 1408, 300, 2),
        (DType::F16, 2560, 65, 4),
        (DType::BF16, 8, 10, 1),
    ] {
        let tag = format!("rows {dtype} H={h} M={m} k={k}");
        let seed = fresh_seed(&tag);
        let rows = m * k + 9; // spare rows nothing writes
        let x = random_vec(m * h, 1.0, dtype, seed);
        // A random permutation of slots onto the first m*k rows, one slot marked invalid.
        let mut perm: Vec<i32> = (0..(m * k) as i32).collect();
        let mut rng_state = seed;
        for i in (1..perm.len()).rev() {
            rng_state = rng_state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            perm.swap(i, (rng_state >> 33) as usize % (i + 1));
        }
        perm[m * k / 2] = -1;
        let scale = random_vec(m * k, 1.0, DType::F32, seed + 1);
        let x_d = upload(&gpu, dtype, &[m, h], &x);
        let idx_d = upload_i32(&gpu, &[m, k], &perm);
        let sc_d = upload(&gpu, DType::F32, &[m, k], &scale);
        for scaled in [false, true] {
            let mut dst_d = poisoned(&gpu, dtype, &[rows, h]);
            permute_rows(&gpu, &x_d, &idx_d, scaled.then_some(&sc_d), &mut dst_d).unwrap();
            let dst = download(&gpu, &dst_d);
            let mut got = Vec::new();
            let mut want = Vec::new();
            for t in 0..m {
                for j in 0..k {
                    let r = perm[t * k + j];
                    if r < 0 {
                        continue;
                    }
                    let s = if scaled {
                        f64::from(scale[t * k + j])
                    } else {
                        1.0
                    };
                    got.extend_from_slice(&dst[r as usize * h..(r as usize + 1) * h]);
                    want.extend(x[t * h..(t + 1) * h].iter().map(|&v| f64::from(v) * s));
                }
            }
            check_close(
                &format!("{tag}: permute scaled={scaled}"),
                &got,
                &want,
                if scaled { 1e-2 } else { 0.0 },
            );
            // The spare rows (no slot maps to them) stay poisoned.
            check_untouched(&format!("{tag}: permute spare rows"), &dst[m * k * h..]);
        }
        // Gather back: out[i] = src[perm[i]].
        let src = random_vec(rows * h, 1.0, dtype, seed + 2);
        let src_d = upload(&gpu, dtype, &[rows, h], &src);
        let mut g_d = poisoned(&gpu, dtype, &[m * k, h]);
        gather_rows(&gpu, &src_d, &idx_d, &mut g_d).unwrap();
        let g = download(&gpu, &g_d);
        for i in 0..m * k {
            let row = &g[i * h..(i + 1) * h];
            if perm[i] < 0 {
                check_untouched(&format!("{tag}: gather invalid slot"), row);
            } else {
                let r = perm[i] as usize;
                assert_eq!(row, &src[r * h..(r + 1) * h], "{tag}: gather row {i}");
            }
        }
        // Combine with and without weights, and per-slot dot products.
        for weighted in [true, false] {
            let mut y_d = poisoned(&gpu, dtype, &[m, h]);
            combine_rows(&gpu, &src_d, &idx_d, weighted.then_some(&sc_d), &mut y_d).unwrap();
            let y = download(&gpu, &y_d);
            let mut want = vec![0f64; m * h];
            for t in 0..m {
                for j in 0..k {
                    let r = perm[t * k + j];
                    if r < 0 {
                        continue;
                    }
                    let w = if weighted {
                        f64::from(scale[t * k + j])
                    } else {
                        1.0
                    };
                    for c in 0..h {
                        want[t * h + c] += w * f64::from(src[r as usize * h + c]);
                    }
                }
            }
            check_close(
                &format!("{tag}: combine weighted={weighted}"),
                &y,
                &want,
                1e-2,
            );
        }
        let mut dots_d = poisoned(&gpu, DType::F32, &[m, k]);
        row_dots(&gpu, &x_d, &src_d, &idx_d, &mut dots_d).unwrap();
        let dots = download(&gpu, &dots_d);
        let mut want = vec![0f64; m * k];
        for t in 0..m {
            for j in 0..k {
                let r = perm[t * k + j];
                if r >= 0 {
                    want[t * k + j] = (0..h)
                        .map(|c| f64::from(x[t * h + c]) * f64::from(src[r as usize * h + c]))
                        .sum();
                }
            }
        }
        check_close(&format!("{tag}: row dots"), &dots, &want, 1e-5);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn activations_forward_backward() {
    let gpu = gpu();
    for (act, core_act, dtype, f) in [
        (Activation::SwiGlu, CoreAct::SwiGlu, DType::BF16, 1408usize),
        (Activation::Gelu, CoreAct::Gelu, DType::BF16, 2560),
        (Activation::SwiGlu, CoreAct::SwiGlu, DType::F16, 64),
        (Activation::Gelu, CoreAct::Gelu, DType::F16, 6400),
    ] {
        let tag = format!("activation {act:?} {dtype} F={f}");
        let seed = fresh_seed(&tag);
        let (cap, rows) = (300usize, 211usize);
        let width = if act == Activation::SwiGlu { 2 * f } else { f };
        let h = random_vec(cap * width, 2.0, dtype, seed);
        let da = random_vec(cap * f, 1.0, dtype, seed + 1);
        let h_d = upload(&gpu, dtype, &[cap, width], &h);
        let da_d = upload(&gpu, dtype, &[cap, f], &da);
        let rows_d = upload_i32(&gpu, &[1], &[rows as i32]);
        let mut a_d = poisoned(&gpu, dtype, &[cap, f]);
        let mut dh_d = poisoned(&gpu, dtype, &[cap, width]);
        activation_forward(&gpu, act, &h_d, &mut a_d, Some(&rows_d)).unwrap();
        activation_backward(&gpu, act, &h_d, &da_d, &mut dh_d, Some(&rows_d)).unwrap();
        let (a, dh) = (download(&gpu, &a_d), download(&gpu, &dh_d));
        let h64 = Array2::from_shape_fn((rows, width), |(r, c)| f64::from(h[r * width + c]));
        let da64 = Array2::from_shape_fn((rows, f), |(r, c)| f64::from(da[r * f + c]));
        let want_a = comet_core::reference::activate(core_act, h64.view());
        let want_dh = comet_core::reference::activate_backward(core_act, h64.view(), da64.view());
        check_close(
            &format!("{tag}: forward"),
            &a[..rows * f],
            want_a.as_slice().unwrap(),
            1e-2,
        );
        check_close(
            &format!("{tag}: backward"),
            &dh[..rows * width],
            want_dh.as_slice().unwrap(),
            1e-2,
        );
        check_untouched(
            &format!("{tag}: forward rows past the count"),
            &a[rows * f..],
        );
        check_untouched(
            &format!("{tag}: backward rows past the count"),
            &dh[rows * width..],
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn random_fill_matches_host() {
    let gpu = gpu();
    let seed = fresh_seed("fill");
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        let mut t = DeviceTensor::alloc(&gpu, dtype, &[1000, 33]).unwrap();
        comet_kernels::init::fill_uniform(&gpu, &mut t, seed, 0.5).unwrap();
        let got = download(&gpu, &t);
        for (i, &g) in got.iter().enumerate() {
            let want = round(
                dtype,
                comet_kernels::init::uniform_value(seed, i as u64, 0.5),
            );
            assert_eq!(g.to_bits(), want.to_bits(), "{dtype} element {i}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn kernel_cache_is_thread_safe() {
    // Eight threads fetch kernels of several programs at once (memory cache only), launch
    // them, and all results are right.
    let gpu = gpu();
    let cache = std::sync::Arc::new(comet_kernels::KernelCache::new(None));
    let g = gpu.clone().with_cache(cache.clone());
    let seed = fresh_seed("threads");
    std::thread::scope(|s| {
        for i in 0..8u64 {
            let g = g.clone();
            s.spawn(move || {
                let stream = g.context().new_stream().unwrap();
                let g = g.with_stream(stream).unwrap();
                let dtype = if i % 2 == 0 { DType::BF16 } else { DType::F32 };
                let mut t = DeviceTensor::alloc(&g, dtype, &[257, 16]).unwrap();
                comet_kernels::init::fill_uniform(&g, &mut t, seed + i, 1.0).unwrap();
                let got = download(&g, &t);
                for (j, &v) in got.iter().enumerate() {
                    assert_eq!(
                        v.to_bits(),
                        round(
                            dtype,
                            comet_kernels::init::uniform_value(seed + i, j as u64, 1.0)
                        )
                        .to_bits()
                    );
                }
                // A second program through the same cache.
                let idx = upload_i32(&g, &[257], &(0..257).rev().collect::<Vec<i32>>());
                let src = upload(
                    &g,
                    DType::BF16,
                    &[257, 8],
                    &random_vec(257 * 8, 1.0, DType::BF16, seed + 100 + i),
                );
                let mut dst = poisoned(&g, DType::BF16, &[257, 8]);
                gather_rows(&g, &src, &idx, &mut dst).unwrap();
                let (s8, d8) = (download(&g, &src), download(&g, &dst));
                for r in 0..257 {
                    assert_eq!(&d8[r * 8..r * 8 + 8], &s8[(256 - r) * 8..(256 - r) * 8 + 8]);
                }
            });
        }
    });
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn raw_buffers_round_trip_and_wrap() {
    // cuMemAlloc-backed tensors (what peers touch): transfers, kernels, and from_raw.
    let gpu = gpu();
    let seed = fresh_seed("raw");
    let v = random_vec(4096, 1.0, DType::BF16, seed);
    let mut t = DeviceTensor::alloc_raw(&gpu, DType::BF16, &[64, 64]).unwrap();
    assert!(t.is_raw() && t.raw_buffer().is_some());
    t.poison(&gpu).unwrap();
    assert!(
        download(&gpu, &t).iter().all(|x| x.is_nan()),
        "poison fills NaN"
    );
    t.copy_from_host(
        &gpu,
        &v.iter()
            .map(|&x| half::bf16::from_f32(x))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    assert_eq!(download(&gpu, &t), v);
    assert_eq!(
        t.to_host_range::<half::bf16>(&gpu, 100, 3)
            .unwrap()
            .iter()
            .map(|x| x.to_f32())
            .collect::<Vec<_>>(),
        v[100..103].to_vec()
    );
    let raw = comet_kernels::RawDeviceBuffer::new(gpu.context(), 64 * 64 * 2 + 10).unwrap();
    let mut w = DeviceTensor::from_raw(raw, DType::BF16, &[64, 64]).unwrap();
    w.copy_from(&gpu, &t).unwrap();
    assert_eq!(download(&gpu, &w), v);
    // Wrong-type and wrong-length transfers are errors, not panics.
    assert!(matches!(
        w.to_host::<f32>(&gpu),
        Err(comet_kernels::Error::DType { .. })
    ));
    assert!(matches!(
        w.copy_from_host(&gpu, &[half::bf16::ZERO; 3]),
        Err(comet_kernels::Error::HostLength { got: 3, .. })
    ));
    let small = comet_kernels::RawDeviceBuffer::new(gpu.context(), 16).unwrap();
    assert!(matches!(
        DeviceTensor::from_raw(small, DType::F32, &[5]),
        Err(comet_kernels::Error::Limit { .. })
    ));
}
