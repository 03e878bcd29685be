//! Shared helpers of the GPU tests: the two process models, the CPU expert-parallel
//! reference of a case, and the comparison of one rank's layer against it.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use comet_comm::launch::{self, RankLaunch};
use comet_comm::{Communicator, EnvOptions, LocalOptions, ProcessModel, run_local};
use comet_core::numeric::{count_non_finite, random_normal, rel_l2, round_bf16};
use comet_core::reference::{EpForward, EpGrads, MoeWeights, ep_backward, ep_forward};
use comet_core::{Activation, MoeConfig, ParallelConfig, Preset};
use comet_kernels::DeviceTensor;
use comet_kernels::forward::{download_f32, upload_f32};
use comet_layer::{GemmEngine, LayerOptions, MoeLayer, Strategy, Weights};
use ndarray::{Array2, s};

/// bf16 tolerance of DESIGN.md.
pub const TOL: f64 = 1e-2;
const WORKER_VAR: &str = "COMET_LAYER_TEST_WORKER";

pub type Body = fn(&Communicator) -> Result<(), String>;

/// Runs `body` on `world` GPUs in one process, one thread per rank.
pub fn in_threads(world: usize, body: Body) {
    let opts = LocalOptions {
        devices: None,
        timeout: Duration::from_secs(60),
    };
    let t0 = Instant::now();
    let out = run_local(world, &opts, |comm| {
        assert_eq!(comm.process_model(), ProcessModel::ThreadPerRank);
        body(&comm).map_err(|e| comet_comm::Error::RankFailed {
            rank: comm.rank(),
            message: e,
        })
    });
    eprintln!(
        "thread-per-rank run on {world} GPU(s) done in {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    if let Err(e) = out {
        panic!("thread-per-rank run failed: {e}");
    }
}

/// Runs `body` in `world` processes: this test binary again, filtered to `test_name`, with
/// the torchrun variables set; in the child it bootstraps from the environment.
pub fn in_processes(test_name: &str, world: usize, body: Body) {
    if launch::is_worker(WORKER_VAR) {
        let opts = EnvOptions {
            timeout: Duration::from_secs(60),
            device: None,
        };
        let run = launch::run_worker(&opts, |comm| {
            assert_eq!(comm.process_model(), ProcessModel::ProcessPerRank);
            body(comm)
        });
        if let Err(e) = run {
            panic!("worker failed: {e}");
        }
        return;
    }
    let outcome = RankLaunch::for_test(test_name, world)
        .unwrap()
        .env(WORKER_VAR, "1")
        .time_limit(Duration::from_secs(150))
        .run()
        .unwrap();
    // Keep the workers' case lines in this test's output.
    for r in &outcome.ranks {
        for line in r.stdout.lines().filter(|l| l.starts_with("case ")) {
            eprintln!("[rank {}] {line}", r.rank);
        }
    }
    eprintln!(
        "{test_name}: {world} process(es) done in {:.2} s",
        outcome.elapsed.as_secs_f64()
    );
    let failures = outcome.failures();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// How the test steers the routing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Route {
    /// Random tokens and router.
    Random,
    /// Every slot to rank 0's experts (the other ranks' experts are empty).
    OneRank,
    /// Only even experts are chosen (odd experts are empty).
    EvenExperts,
    /// The first `n` tokens of every rank are zero (all logits tie: experts 0..k by the tie
    /// rule).
    ZeroTokens(usize),
}

/// One comparison case.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub cfg: MoeConfig,
    /// Tokens of each rank (its length is the world size).
    pub tokens: Vec<usize>,
    pub route: Route,
    pub seed: u64,
}

impl Case {
    pub fn new(name: &str, cfg: MoeConfig, tokens: &[usize], route: Route, seed: u64) -> Self {
        Case {
            name: name.to_string(),
            cfg,
            tokens: tokens.to_vec(),
            route,
            seed,
        }
    }
    pub fn world(&self) -> usize {
        self.tokens.len()
    }
    pub fn max_tokens(&self) -> usize {
        self.tokens.iter().copied().max().unwrap_or(1)
    }
}

/// A preset with hidden and ffn divided by `shrink` (experts, top-k, activation and
/// renormalisation kept).
pub fn shrunk(p: Preset, shrink: usize) -> MoeConfig {
    let c = p.config();
    MoeConfig::new(
        c.hidden() / shrink,
        c.ffn() / shrink,
        c.experts(),
        c.top_k(),
    )
    .unwrap()
    .with_activation(c.activation())
    .with_renormalize(c.renormalize())
}

/// The four presets at 1/16 of their hidden and ffn sizes (so the f64 CPU reference stays
/// quick): Mixtral 256/896, Qwen2-MoE 128/88, Phi-3.5-MoE 256/400, DeepSeek-V3 448/128.
pub fn presets_shrunk() -> Vec<(&'static str, MoeConfig)> {
    Preset::all()
        .iter()
        .map(|p| (p.name(), shrunk(*p, 16)))
        .collect()
}

fn round(a: &mut Array2<f32>) {
    a.mapv_inplace(round_bf16);
}

/// The reference of a case: bf16-exact f32 inputs and weights, the EP forward and backward.
pub struct Reference {
    pub par: ParallelConfig,
    pub w: MoeWeights<f32>,
    pub xs: Vec<Array2<f32>>,
    pub dys: Vec<Array2<f32>>,
    pub fwd: EpForward<f32>,
    pub grads: EpGrads<f32>,
}

pub fn reference(c: &Case) -> Reference {
    let (h, e, k, world) = (c.cfg.hidden(), c.cfg.experts(), c.cfg.top_k(), c.world());
    let par = ParallelConfig::expert_parallel(world).unwrap();
    let mut w = MoeWeights::<f32>::random(&c.cfg, c.seed).rounded(comet_core::DType::BF16);
    // A unit direction u for the steered routes: projected out of tokens and router rows;
    // tokens get +3u, chosen experts' router rows +3u, the others -3u, so chosen logits are
    // 9 above the remaining O(1) part and the others 9 below.
    let mut u = random_normal(h, c.seed + 7);
    let n = u.iter().map(|v| v * v).sum::<f32>().sqrt();
    u.mapv_inplace(|v| v / n);
    let set = |mut row: ndarray::ArrayViewMut1<f32>, along: f32| {
        let d: f32 = row.iter().zip(u.iter()).map(|(a, b)| a * b).sum();
        row.zip_mut_with(&u, |a, b| *a += (along - d) * b);
    };
    let steered = matches!(c.route, Route::OneRank | Route::EvenExperts);
    if steered {
        let l = e / world;
        for ex in 0..e {
            let chosen = match c.route {
                Route::OneRank => ex < l,
                _ => ex % 2 == 0,
            };
            set(w.wr.row_mut(ex), if chosen { 3.0 } else { -3.0 });
        }
        round(&mut w.wr);
    }
    let zero_rows = match c.route {
        Route::ZeroTokens(n) => n,
        _ => 0,
    };
    // Token rows, redrawn while the top k + 1 logits of a row are closer than 1e-3 to each
    // other: the GPU's f32 logits (another summation order) must not reorder them, so ids and
    // slot order compare exactly. Zero rows tie exactly on both sides (the tie rule).
    let mut xs = Vec::with_capacity(world);
    for (r, &m) in c.tokens.iter().enumerate() {
        let mut x = Array2::<f32>::zeros((m, h));
        for t in zero_rows.min(m)..m {
            for attempt in 0u64.. {
                let seed = c.seed + 10 + r as u64 + 7919 * (t as u64 + 1) + 104_729 * attempt;
                let mut row = random_normal(h, seed);
                if steered {
                    set(row.view_mut(), 3.0);
                }
                row.mapv_inplace(round_bf16);
                let mut logits: Vec<f64> =
                    w.wr.outer_iter()
                        .map(|wr| wr.iter().zip(&row).map(|(a, b)| f64::from(a * b)).sum())
                        .collect();
                logits.sort_by(|a, b| b.total_cmp(a));
                let gap = logits[..(k + 1).min(e)]
                    .windows(2)
                    .map(|p| p[0] - p[1])
                    .fold(f64::INFINITY, f64::min);
                if gap > 1e-3 {
                    x.row_mut(t).assign(&row);
                    break;
                }
            }
        }
        xs.push(x);
    }
    let dys: Vec<Array2<f32>> = c
        .tokens
        .iter()
        .enumerate()
        .map(|(r, &m)| {
            let mut d = random_normal((m, h), c.seed + 100 + r as u64);
            round(&mut d);
            d
        })
        .collect();
    let fwd = ep_forward(&c.cfg, &par, &w, &xs).unwrap();
    let grads = ep_backward(&c.cfg, &par, &w, &xs, &fwd, &dys).unwrap();
    Reference {
        par,
        w,
        xs,
        dys,
        fwd,
        grads,
    }
}

/// `got` against `want`: no NaN/Inf, relative L2 error ≤ tol (an all-zero reference needs
/// an all-zero result).
pub fn close(what: &str, got: &[f32], want: &[f32], tol: f64) -> Result<f64, String> {
    let bad = count_non_finite(got);
    if bad > 0 {
        return Err(format!("{what}: {bad} NaN/Inf of {}", got.len()));
    }
    if got.len() != want.len() {
        return Err(format!(
            "{what}: {} values, expected {}",
            got.len(),
            want.len()
        ));
    }
    let e = rel_l2(got, want);
    if e.is_nan() || e > tol {
        return Err(format!("{what}: relative L2 error {e:.3e} > {tol:.0e}"));
    }
    Ok(e)
}

fn flat(a: &Array2<f32>) -> Vec<f32> {
    a.iter().copied().collect()
}

/// A bf16 device tensor of a host array, through the layer's stream.
pub fn upload<C: std::borrow::Borrow<Communicator>>(
    layer: &MoeLayer<C>,
    a: &Array2<f32>,
) -> DeviceTensor {
    upload_f32(
        layer.gpu(),
        layer.dtype(),
        &[a.nrows(), a.ncols()],
        &flat(a),
    )
    .unwrap()
}

/// A NaN-filled `[rows, H]` output tensor.
pub fn poisoned<C: std::borrow::Borrow<Communicator>>(
    layer: &MoeLayer<C>,
    rows: usize,
) -> DeviceTensor {
    let mut t =
        DeviceTensor::alloc(layer.gpu(), layer.dtype(), &[rows, layer.config().hidden()]).unwrap();
    t.poison(layer.gpu()).unwrap();
    t
}

/// Builds this rank's layer for `c` with the reference weights.
pub fn build<'a>(
    comm: &'a Communicator,
    c: &Case,
    r: &Reference,
    strategy: Strategy,
    engine: GemmEngine,
    max_tokens: usize,
) -> Result<MoeLayer<&'a Communicator>, String> {
    build_opts(
        comm,
        c,
        r,
        LayerOptions::new(strategy, max_tokens).engine(engine),
    )
}

/// [`build`] with explicit options.
pub fn build_opts<'a>(
    comm: &'a Communicator,
    c: &Case,
    r: &Reference,
    opts: LayerOptions,
) -> Result<MoeLayer<&'a Communicator>, String> {
    let lw = r.w.local(comm.rank(), &r.par).map_err(|e| e.to_string())?;
    let (wr, w0, w1): (Vec<f32>, Vec<f32>, Vec<f32>) = (
        lw.wr.iter().copied().collect(),
        lw.w0.iter().copied().collect(),
        lw.w1.iter().copied().collect(),
    );
    MoeLayer::new(
        comm,
        c.cfg,
        r.par,
        opts,
        Weights::Host {
            wr: &wr,
            w0: &w0,
            w1: &w1,
        },
    )
    .map_err(|e| format!("building the layer: {e}"))
}

/// Forward and backward of one rank against the reference: routing ids exactly; y, dx,
/// dW0, dW1 and the all-reduced router gradient within [`TOL`]; `times` passes after one
/// `zero_grad` (gradients accumulate: after n backward calls they are n times the
/// reference). The workspace is poisoned before each pass, and with it the gradients while
/// they are logically zero (before the first pass), so the first backward must overwrite
/// them (lazy `zero_grad`) and a rank whose experts receive no rows must read back zeros.
pub fn check_rank<C: std::borrow::Borrow<Communicator>>(
    layer: &mut MoeLayer<C>,
    c: &Case,
    r: &Reference,
    times: usize,
) -> Result<String, String> {
    let rank = layer.rank();
    let err = |e: comet_layer::Error| format!("{e}");
    let x = upload(layer, &r.xs[rank]);
    let dy = upload(layer, &r.dys[rank]);
    let m = r.xs[rank].nrows();
    layer.zero_grad().map_err(err)?;
    let mut summary = Vec::new();
    for pass in 0..times {
        layer.poison_workspace().map_err(err)?;
        let mut y = poisoned(layer, m);
        layer.forward_into(&x, &mut y).map_err(err)?;
        let (ids, _) = layer.routing_to_host().map_err(err)?;
        let want_ids = &r.fwd.ranks[rank].routing.ids;
        let differ = ids
            .chunks(c.cfg.top_k())
            .zip(want_ids.outer_iter())
            .filter(|(a, b)| a.iter().zip(b.iter()).any(|(x, y)| *x as u32 != *y))
            .count();
        if differ > 0 {
            return Err(format!(
                "routing differs from the reference on {differ} of {m} tokens (near-ties?)"
            ));
        }
        layer.check_device_status().map_err(err)?;
        check_stores_ran(layer, "forward")?;
        let yv = download_f32(layer.gpu(), &y).map_err(|e| e.to_string())?;
        let ey = close("y", &yv, &flat(&r.fwd.ranks[rank].y), TOL)?;
        let mut dx = poisoned(layer, m);
        layer.backward_into(&dy, &mut dx).map_err(err)?;
        check_stores_ran(layer, "backward")?;
        let dxv = download_f32(layer.gpu(), &dx).map_err(|e| e.to_string())?;
        let edx = close("dx", &dxv, &flat(&r.grads.ranks[rank].dx), TOL)?;
        if pass == 0 {
            summary.push(format!("y {ey:.1e} dx {edx:.1e}"));
        }
    }
    summary.push(check_grads(layer, r, times)?);
    Ok(summary.join(", "))
}

/// The layer's gradients against `times` times the reference's (this rank's experts; the
/// router gradient all-reduced first, a collective): dW0, dW1, dWr within [`TOL`], no NaN.
pub fn check_grads<C: std::borrow::Borrow<Communicator>>(
    layer: &mut MoeLayer<C>,
    r: &Reference,
    times: usize,
) -> Result<String, String> {
    let err = |e: comet_layer::Error| format!("{e}");
    let (rank, l) = (layer.rank(), layer.local_experts());
    layer.all_reduce_router_grad().map_err(err)?;
    let (dwr, dw0, dw1) = layer.grads_to_host().map_err(err)?;
    let n = times as f32;
    let scaled = |v: ndarray::ArrayViewD<f32>| -> Vec<f32> { v.iter().map(|x| x * n).collect() };
    let e0 = rank * l;
    let want_dw0 = scaled(r.grads.dw0.slice(s![e0..e0 + l, .., ..]).into_dyn());
    let want_dw1 = scaled(r.grads.dw1.slice(s![e0..e0 + l, .., ..]).into_dyn());
    let want_dwr = scaled(r.grads.dwr.view().into_dyn());
    let a = close("dW0", &dw0, &want_dw0, TOL)?;
    let b = close("dW1", &dw1, &want_dw1, TOL)?;
    let g = close("dWr (summed over ranks)", &dwr, &want_dwr, TOL)?;
    Ok(format!("dW0 {a:.1e} dW1 {b:.1e} dWr {g:.1e}"))
}

/// Whether the layer's last call ran the Hopper engine's training stores exactly when it
/// should: `LayerOptions::sm90_training_stores` on (the default, unless `COMET_SM90_STORES=0`),
/// the Hopper engine chosen (`auto` on sm_90 — every shape of these tests fits it, see
/// comet-layer's `the_hopper_engine_takes_the_sm90_stores_training_gemms` — or `sm90`) and
/// rows received. So a test with the stores on cannot pass on a silent fallback to
/// `mma.sync`, and a test with the option off (`mma_wgrad`) never runs them.
pub fn check_stores_ran<C: std::borrow::Borrow<Communicator>>(
    layer: &MoeLayer<C>,
    call: &str,
) -> Result<(), String> {
    let o = layer.options();
    let hopper = match o.engine {
        GemmEngine::MmaSync => false,
        GemmEngine::Auto => layer.gpu().arch() == comet_kernels::cache::Arch::SM90,
        GemmEngine::Sm90 => true,
    };
    let rows = layer.last_received_rows().unwrap_or(0) > 0;
    let want = o.sm90_training_stores && o.training && hopper && rows;
    let got = layer.used_hopper_stores();
    if got != want {
        return Err(format!(
            "{call}: Hopper training stores ran: {got}, expected {want} (option {}, engine {}, \
             rows received: {rows})",
            o.sm90_training_stores, o.engine
        ));
    }
    Ok(())
}

/// Runs every (case, strategy, engine) on this rank, printing one line per run; the first
/// failure is the error.
pub fn run_cases(
    comm: &Communicator,
    cases: &[Case],
    strategies: &[Strategy],
    engines: &[GemmEngine],
) -> Result<(), String> {
    run_cases_with(comm, cases, strategies, engines, |o| o)
}

/// [`run_cases`] with the layer options adjusted by `adjust` (e.g. the Hopper training
/// stores off or explicitly on); the case lines name the stores when off and the SM
/// reserve when set.
pub fn run_cases_with(
    comm: &Communicator,
    cases: &[Case],
    strategies: &[Strategy],
    engines: &[GemmEngine],
    adjust: impl Fn(LayerOptions) -> LayerOptions,
) -> Result<(), String> {
    for c in cases {
        if c.world() != comm.world_size() {
            return Err(format!("case {} is for {} ranks", c.name, c.world()));
        }
        let t0 = Instant::now();
        let r = reference(c);
        let t_ref = t0.elapsed().as_secs_f64();
        for &s in strategies {
            if s.chunks() > c.tokens.iter().copied().min().unwrap_or(0) {
                continue;
            }
            for &engine in engines {
                let t1 = Instant::now();
                let opts = adjust(LayerOptions::new(s, c.max_tokens()).engine(engine));
                let extra = match (opts.sm90_training_stores, opts.gemm_sm_reserve) {
                    (true, 0) => String::new(),
                    (st, r) => format!(" (sm90 stores {st}, reserve {r})"),
                };
                let mut layer = build_opts(comm, c, &r, opts)?;
                let line = check_rank(&mut layer, c, &r, 1)
                    .map_err(|e| format!("case {} / {s} / {engine}{extra}: {e}", c.name))?;
                println!(
                    "case {} / {s} / {engine}{extra} rank {}: {line} (hopper: {}, stores: {}, ref {t_ref:.1} s, run {:.1} s)",
                    c.name,
                    comm.rank(),
                    layer.used_hopper_engine(),
                    layer.used_hopper_stores(),
                    t1.elapsed().as_secs_f64()
                );
            }
        }
    }
    Ok(())
}

/// A custom small layer.
pub fn custom(h: usize, f: usize, e: usize, k: usize, act: Activation, renorm: bool) -> MoeConfig {
    MoeConfig::new(h, f, e, k)
        .unwrap()
        .with_activation(act)
        .with_renormalize(renorm)
}
