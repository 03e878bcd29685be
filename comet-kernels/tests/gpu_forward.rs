//! GPU tests of the single-GPU MoE forward against comet-core's reference forward, for the
//! four presets (reduced token counts) and edge cases. Weights and inputs are fresh random
//! fills; the output and every workspace buffer are poisoned before each run.

#![allow(clippy::needless_range_loop)]

mod common;

use comet_core::reference::{MoeWeights, forward_routed};
use comet_core::routing::{TopK, router_logits, top_k};
use comet_core::{Activation, MoeConfig, Preset};
use comet_kernels::Gpu;
use comet_kernels::buffer::{DType, DeviceTensor};
use comet_kernels::forward::MoeForward;
use comet_kernels::init::fill_uniform;
use common::*;
use ndarray::{Array2, Array3};

/// Downloads rows `[e * per, (e + 1) * per)` of the stacked weight for each expert in `ex`, as
/// f32, converting in parallel.
fn experts_to_host(gpu: &Gpu, w: &DeviceTensor, ex: &[usize], per: usize) -> Vec<f32> {
    let mut out = vec![0f32; ex.len() * per];
    for (i, &e) in ex.iter().enumerate() {
        let dst = &mut out[i * per..(i + 1) * per];
        match w.dtype() {
            DType::BF16 => {
                let raw = w.to_host_range::<half::bf16>(gpu, e * per, per).unwrap();
                par_convert(&raw, dst, |v| v.to_f32());
            }
            DType::F16 => {
                let raw = w.to_host_range::<half::f16>(gpu, e * per, per).unwrap();
                par_convert(&raw, dst, |v| v.to_f32());
            }
            other => panic!("unexpected weight dtype {other}"),
        }
    }
    out
}

fn par_convert<T: Copy + Sync>(src: &[T], dst: &mut [f32], f: impl Fn(T) -> f32 + Sync) {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(4)
        .min(32);
    let chunk = src.len().div_ceil(threads).max(1 << 16);
    std::thread::scope(|s| {
        for (sc, dc) in src.chunks(chunk).zip(dst.chunks_mut(chunk)) {
            let f = &f;
            s.spawn(move || {
                for (d, &v) in dc.iter_mut().zip(sc) {
                    *d = f(v);
                }
            });
        }
    });
}

enum Routing {
    /// The layer's own router (checked against the CPU router on the GPU's logits).
    Router,
    /// Given ids (the weights are random, positive).
    Given(Vec<i32>),
}

/// A layer with fresh random device weights (router weights scaled up so routing is skewed
/// and near-ties are rare).
fn build_layer(gpu: &Gpu, cfg: MoeConfig, tag: &str) -> MoeForward {
    let seed = fresh_seed(&format!("{tag} weights"));
    let (h, f, e, n0) = (cfg.hidden(), cfg.ffn(), cfg.experts(), cfg.n0());
    let elem = DType::from(cfg.dtype());
    let mut wr = DeviceTensor::alloc(gpu, elem, &[e, h]).unwrap();
    let mut w0 = DeviceTensor::alloc(gpu, elem, &[e, n0, h]).unwrap();
    let mut w1 = DeviceTensor::alloc(gpu, elem, &[e, h, f]).unwrap();
    let sh = 1.0 / (h as f64).sqrt();
    fill_uniform(gpu, &mut wr, seed, 4.0 * sh).unwrap();
    fill_uniform(gpu, &mut w0, seed + 1, sh).unwrap();
    fill_uniform(gpu, &mut w1, seed + 2, 1.0 / (f as f64).sqrt()).unwrap();
    MoeForward::from_device(&cfg, wr, w0, w1).unwrap()
}

/// Runs the GPU forward and compares with comet-core's `forward_routed` on the experts used.
fn check_layer(cfg: MoeConfig, m: usize, routing: Routing, tag: &str) {
    let gpu = gpu();
    let mut layer = build_layer(&gpu, cfg, tag);
    check_with_layer(&gpu, &mut layer, m, routing, tag);
}

fn check_with_layer(gpu: &Gpu, layer: &mut MoeForward, m: usize, routing: Routing, tag: &str) {
    let gpu = gpu.clone();
    let cfg = *layer.config();
    let seed = fresh_seed(tag);
    let (h, f, e, k, n0) = (
        cfg.hidden(),
        cfg.ffn(),
        cfg.experts(),
        cfg.top_k(),
        cfg.n0(),
    );
    let elem = DType::from(cfg.dtype());
    let started = std::time::Instant::now();
    let mut x = DeviceTensor::alloc(&gpu, elem, &[m, h]).unwrap();
    fill_uniform(&gpu, &mut x, seed + 3, 1.0).unwrap();
    layer.poison_workspace(&gpu, m).unwrap();
    let mut y_d = poisoned(&gpu, elem, &[m, h]);
    let (ids, weights): (Vec<i32>, Vec<f32>) = match routing {
        Routing::Router => {
            layer.forward_into(&gpu, &x, &mut y_d).unwrap();
            let (ids, w, _probs) = layer.routing_to_host(&gpu).unwrap();
            // Router: logits against the CPU, ids/weights against the CPU top-k of the GPU logits.
            let logits = layer.logits_to_host(&gpu).unwrap();
            let xs = download(&gpu, &x);
            let wr_h = download(&gpu, layer.weights().0);
            let want = router_logits(
                Array2::from_shape_vec((m, h), xs).unwrap().view(),
                Array2::from_shape_vec((e, h), wr_h).unwrap().view(),
            )
            .unwrap();
            check_close(
                &format!("{tag}: logits"),
                &logits,
                &want.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(),
                1e-4,
            );
            let cpu = top_k(
                Array2::from_shape_vec((m, e), logits).unwrap().view(),
                k,
                cfg.renormalize(),
            )
            .unwrap();
            for t in 0..m {
                for j in 0..k {
                    // The CPU top-k runs on the GPU's own logits: ids agree unless expf's last
                    // bit splits a near-tie, which the weights comparison would then show.
                    if ids[t * k + j] as u32 != cpu.ids[[t, j]] {
                        let pa = cpu.probs[[t, ids[t * k + j] as usize]];
                        let pb = cpu.probs[[t, cpu.ids[[t, j]] as usize]];
                        assert!(
                            (pa - pb).abs() <= 1e-6 * pb.abs(),
                            "{tag}: token {t} slot {j}: GPU expert {} (p {pa}) vs CPU {} (p {pb})",
                            ids[t * k + j],
                            cpu.ids[[t, j]]
                        );
                    }
                }
            }
            check_close(
                &format!("{tag}: routing weights"),
                &w,
                &cpu.weights
                    .iter()
                    .map(|&v| f64::from(v))
                    .collect::<Vec<_>>(),
                1e-5,
            );
            (ids, w)
        }
        Routing::Given(ids) => {
            let w = random_vec(m * k, 0.3, DType::F32, seed + 4)
                .iter()
                .map(|v| v.abs() + 0.05)
                .collect::<Vec<f32>>();
            let ids_d = upload_i32(&gpu, &[m, k], &ids);
            let w_d = upload(&gpu, DType::F32, &[m, k], &w);
            layer
                .forward_routed_into(&gpu, &x, &ids_d, &w_d, &mut y_d)
                .unwrap();
            (ids, w)
        }
    };
    assert_eq!(
        layer.plan_status(&gpu).unwrap(),
        vec![0, 0],
        "{tag}: routing plan status"
    );
    let y = download(&gpu, &y_d);
    let gpu_done = started.elapsed();

    // Reference on the experts that were used (comet-core's forward_routed).
    let mut used: Vec<usize> = ids.iter().map(|&v| v as usize).collect();
    used.sort_unstable();
    used.dedup();
    let remap = |e: usize| used.binary_search(&e).unwrap() as u32;
    let (_, w0_d, w1_d) = layer.weights();
    let w0h = experts_to_host(&gpu, w0_d, &used, n0 * h);
    let w1h = experts_to_host(&gpu, w1_d, &used, h * f);
    let eu = used.len();
    let sub = MoeConfig::new(h, f, eu, k)
        .unwrap()
        .with_activation(cfg.activation())
        .with_renormalize(cfg.renormalize());
    let weights_ref = MoeWeights::<f32> {
        wr: Array2::zeros((eu, h)),
        w0: Array3::from_shape_vec((eu, n0, h), w0h).unwrap(),
        w1: Array3::from_shape_vec((eu, h, f), w1h).unwrap(),
    };
    let routing = TopK {
        ids: Array2::from_shape_fn((m, k), |(t, j)| remap(ids[t * k + j] as usize)),
        weights: Array2::from_shape_fn((m, k), |(t, j)| weights[t * k + j]),
        probs: Array2::zeros((m, eu)),
    };
    let xs = download(&gpu, &x);
    let reference = forward_routed(
        &sub,
        &weights_ref,
        Array2::from_shape_vec((m, h), xs).unwrap().view(),
        routing,
    )
    .unwrap();
    let want: Vec<f64> = reference.y.iter().map(|&v| f64::from(v)).collect();
    eprintln!(
        "[time] {tag}: gpu+router checks {:.1}s, reference {:.1}s, {eu} experts used",
        gpu_done.as_secs_f64(),
        (started.elapsed() - gpu_done).as_secs_f64()
    );
    check_close(&format!("{tag}: y"), &y, &want, 1e-2);
    if let Some(h_d) = layer.preactivation() {
        // Kept pre-activation, in receive (expert-sorted) order: row scatter_row[t·k + j] holds
        // the reference's slot (t, j).
        let hv = download(&gpu, h_d);
        let scatter = layer
            .plan()
            .unwrap()
            .scatter_row
            .to_host::<i32>(&gpu)
            .unwrap();
        let mut got = Vec::with_capacity(m * k * n0);
        for slot in 0..m * k {
            let r = scatter[slot] as usize;
            got.extend_from_slice(&hv[r * n0..(r + 1) * n0]);
        }
        let want_h: Vec<f64> = reference.h.iter().map(|&v| f64::from(v)).collect();
        check_close(
            &format!("{tag}: kept pre-activation h"),
            &got,
            &want_h,
            1e-2,
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn preset_mixtral() {
    check_layer(
        Preset::Mixtral8x7B.config(),
        64,
        Routing::Router,
        "mixtral-8x7b, 64 tokens",
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn preset_qwen2_moe() {
    check_layer(
        Preset::Qwen2Moe2_7B.config(),
        200,
        Routing::Router,
        "qwen2-moe-2.7b, 200 tokens",
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn preset_phi35_moe() {
    check_layer(
        Preset::Phi35Moe.config(),
        64,
        Routing::Router,
        "phi-3.5-moe, 64 tokens",
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn preset_deepseek_v3() {
    check_layer(
        Preset::DeepSeekV3.config(),
        8,
        Routing::Router,
        "deepseek-v3, 8 tokens",
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn top_k_1_to_8_with_256_experts() {
    for k in 1..=8 {
        let cfg = MoeConfig::new(256, 128, 256, k)
            .unwrap()
            .with_renormalize(k % 2 == 0);
        check_layer(cfg, 77, Routing::Router, &format!("E=256 k={k}"));
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn all_tokens_to_one_expert() {
    let cfg = MoeConfig::new(1408, 512, 8, 1).unwrap();
    check_layer(
        cfg,
        300,
        Routing::Given(vec![3; 300]),
        "all tokens to expert 3 (k=1)",
    );
    let cfg = MoeConfig::new(2560, 1408, 16, 2).unwrap();
    let ids: Vec<i32> = (0..259).flat_map(|_| [11, 2]).collect();
    check_layer(
        cfg,
        259,
        Routing::Given(ids),
        "all tokens to experts 11 and 2 (k=2)",
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gelu_f16_and_wide_shapes() {
    let cfg = MoeConfig::new(2560, 1408, 16, 2)
        .unwrap()
        .with_activation(Activation::Gelu)
        .with_dtype(comet_core::DType::F16)
        .with_renormalize(true);
    let gpu = gpu();
    let mut layer = build_layer(&gpu, cfg, "gelu f16").keep_preactivation(true);
    check_with_layer(
        &gpu,
        &mut layer,
        130,
        Routing::Router,
        "gelu f16 H=2560 F=1408 (+kept h)",
    );
    let cfg = MoeConfig::new(1408, 2560, 8, 2)
        .unwrap()
        .with_activation(Activation::Gelu);
    check_layer(cfg, 45, Routing::Router, "gelu bf16 H=1408 F=2560");
    let cfg = MoeConfig::new(6400, 7168, 4, 2)
        .unwrap()
        .with_renormalize(true);
    check_layer(cfg, 21, Routing::Router, "swiglu H=6400 F=7168");
    let cfg = MoeConfig::new(7168, 6400, 4, 3).unwrap();
    check_layer(cfg, 19, Routing::Router, "swiglu H=7168 F=6400 k=3");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn repeated_calls_and_token_count_changes() {
    // One layer, several calls: the workspace is rebuilt when the token count changes.
    let gpu = gpu();
    let cfg = MoeConfig::new(512, 256, 16, 4)
        .unwrap()
        .with_renormalize(true);
    let mut layer = build_layer(&gpu, cfg, "reuse").keep_preactivation(true);
    for m in [100usize, 1, 257, 100] {
        check_with_layer(
            &gpu,
            &mut layer,
            m,
            Routing::Router,
            &format!("E=16 k=4, {m} tokens"),
        );
    }
}
