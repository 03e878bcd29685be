//! `comet-bench run`: the MoE layer benchmark on GPUs, one rank per GPU, in either process
//! model (`--local-gpus N`: one process, a thread per GPU; otherwise the torchrun
//! environment, one process per GPU, as `cargo xtask bench` launches it).
//!
//! Per rank: the dense bf16 GEMM rate (cuBLAS `n³`, the compute floor), then for every
//! shape × tokens × strategy:
//! - **forward**: an inference layer (`training = false`), `--warmup` untimed calls, then
//!   `--iters` timed calls (a barrier before each so the ranks start together; CUDA events
//!   on the layer's compute stream around the call); the median is reported;
//! - **forward + backward** (`--backward`): a training layer, the same with
//!   `MoeLayer::zero_grad`, forward then backward per timed iteration, as a training step
//!   runs them (the timed region includes `zero_grad`: it is O(1), no memset; each
//!   backward then overwrites the weight gradients with its first write instead of reading
//!   and adding to them);
//! - `--sm90-stores off` (or `off,on`): the forward + backward case again with
//!   `LayerOptions::sm90_training_stores` off (the weight gradients on `mma.sync`), labelled
//!   `+mma-wgrad` (no forward-only case: an inference layer has no training stores; needs
//!   `--backward`). The unlabelled cases are the layer's default, stores on;
//! - **phases**: a separate phase-timed pass of `--iters` calls with per-phase CUDA events
//!   (`MoeLayer::set_phase_timing`), the same steps (with `zero_grad` in forward +
//!   backward), the median per phase reported. With the pipelined
//!   strategy the per-chunk intervals of a phase are summed on the stream they run on, so
//!   overlapping phases add up to more than the layer time.
//!
//! Inputs rotate over `--pool` distinct tensors (filled on the device) so L2 does not
//! flatter; weights are seeded device fills. `flops` is this rank's expert-GEMM work
//! (`2 · received rows · H · (n0 + F)`, three times that with backward); `comm_bytes` the
//! rows it sent to other ranks (dispatch and combine; backward moves the same again) times
//! the row size. Each rank writes a report of `report.rs`'s rank schema.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use comet_comm::{Communicator, EnvOptions, LocalOptions, run_local};
use comet_core::{Activation, MoeConfig, ParallelConfig, Preset};
use comet_kernels::buffer::DType;
use comet_kernels::{DeviceTensor, init};
use comet_layer::{DEFAULT_CHUNKS, GemmEngine, LayerOptions, MoeLayer, Strategy, Weights};

use crate::dense::{dense_gemm_tflops, median};
use crate::report::{CaseResult, RANK_SCHEMA, RankReport};
use crate::{Error, Result};

/// What `comet-bench run` measures (the command line, parsed).
#[derive(Debug, Clone, PartialEq)]
pub struct RunRequest {
    /// Presets (any name `Preset` parses) or `custom` (then `shape` must be given).
    pub presets: Vec<String>,
    /// Shape overrides: hidden, ffn, experts, top-k (all four for `custom`).
    pub hidden: Option<usize>,
    /// See `hidden`.
    pub ffn: Option<usize>,
    /// See `hidden`.
    pub experts: Option<usize>,
    /// See `hidden`.
    pub top_k: Option<usize>,
    /// Activation override (`swiglu`, `gelu`).
    pub activation: Option<String>,
    /// Renormalisation override.
    pub renormalize: Option<bool>,
    /// Tokens per rank.
    pub tokens: Vec<usize>,
    /// Strategies (`sequential`, `pipelined`, `pipelined:N`).
    pub strategies: Vec<String>,
    /// Timed iterations.
    pub iters: usize,
    /// Untimed iterations first.
    pub warmup: usize,
    /// Distinct input tensors rotated over.
    pub pool: usize,
    /// Also time forward + backward.
    pub backward: bool,
    /// Run the phase-timed pass.
    pub phases: bool,
    /// GEMM engine (`auto`, `mma`, `sm90`).
    pub engine: String,
    /// SMs the pipelined strategies' expert GEMMs leave free, one case per value
    /// (`LayerOptions::gemm_sm_reserve`; `[0]` = every SM, as before; Sequential runs once).
    pub gemm_sm_reserve: Vec<usize>,
    /// `LayerOptions::sm90_training_stores` values, one case per value (`on`/`off`, `1`/`0`;
    /// `["on"]` = the layer's default). Off is labelled `+mma-wgrad` and needs `backward`.
    pub sm90_stores: Vec<String>,
    /// Dense GEMM size.
    pub dense_n: usize,
    /// Seed of weights and inputs.
    pub seed: u64,
    /// Ranks as threads of this process (`None`: the torchrun environment, or 1 GPU).
    pub local_gpus: Option<usize>,
    /// Rank report path.
    pub json: Option<PathBuf>,
}

impl Default for RunRequest {
    fn default() -> Self {
        RunRequest {
            presets: Preset::all().iter().map(|p| p.name().to_string()).collect(),
            hidden: None,
            ffn: None,
            experts: None,
            top_k: None,
            activation: None,
            renormalize: None,
            tokens: vec![8192],
            strategies: vec!["sequential".into(), format!("pipelined:{DEFAULT_CHUNKS}")],
            iters: 20,
            warmup: 5,
            pool: 4,
            backward: false,
            phases: true,
            engine: "auto".into(),
            gemm_sm_reserve: vec![0],
            sm90_stores: vec!["on".into()],
            dense_n: 8192,
            seed: 0,
            local_gpus: None,
            json: None,
        }
    }
}

/// One layer shape to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    /// Report label: the canonical preset name, or `custom-H-F-E-k`.
    pub label: String,
    /// The layer.
    pub cfg: MoeConfig,
}

/// The validated plan of a run (what every rank does).
#[derive(Debug, Clone, PartialEq)]
pub struct RunPlan {
    /// Shapes.
    pub shapes: Vec<Shape>,
    /// Tokens per rank.
    pub tokens: Vec<usize>,
    /// Strategies.
    pub strategies: Vec<Strategy>,
    /// GEMM engine.
    pub engine: GemmEngine,
    /// The (strategy, GEMM SM reserve, Hopper training stores) cases timed per shape and
    /// token count, in order.
    pub variants: Vec<(Strategy, usize, bool)>,
    /// The request.
    pub req: RunRequest,
}

fn arg(what: &'static str, value: impl ToString, rule: impl Into<String>) -> Error {
    Error::Arg {
        what,
        value: value.to_string(),
        rule: rule.into(),
    }
}

/// The report label of a strategy: `sequential`, `pipelined` (with the default chunk
/// count), `pipelined:N` otherwise.
pub fn strategy_label(s: Strategy) -> String {
    match s {
        Strategy::Pipelined { chunks } if chunks != DEFAULT_CHUNKS => format!("pipelined:{chunks}"),
        _ => s.name().to_string(),
    }
}

/// The report label of a strategy whose expert GEMMs leave `reserve` SMs free, with the
/// Hopper engine's training stores on (the layer's default, no suffix) or off:
/// [`strategy_label`], with `+r<reserve>` when `reserve > 0` and [`MMA_WGRAD_SUFFIX`] when
/// the stores are off (e.g. `pipelined+r16`, `sequential+mma-wgrad`,
/// `pipelined+r16+mma-wgrad`).
pub fn variant_label(s: Strategy, reserve: usize, sm90_stores: bool) -> String {
    let mut label = strategy_label(s);
    if reserve > 0 {
        label += &format!("+r{reserve}");
    }
    if !sm90_stores {
        label += MMA_WGRAD_SUFFIX;
    }
    label
}

/// The label suffix of a case with `LayerOptions::sm90_training_stores` off (the expert
/// weight gradients on `mma.sync`).
pub const MMA_WGRAD_SUFFIX: &str = "+mma-wgrad";

/// The label suffix that reports written before the stores became the default gave their
/// stores-on cases (their unlabelled cases had the stores off); the report still compares
/// such cases with their own `sequential+s90`.
pub const LEGACY_STORES_SUFFIX: &str = "+s90";

fn shape_of(req: &RunRequest, name: &str) -> Result<Shape> {
    let (base, label) = if name.eq_ignore_ascii_case("custom") {
        let (Some(h), Some(f), Some(e), Some(k)) = (req.hidden, req.ffn, req.experts, req.top_k)
        else {
            return Err(arg(
                "--presets",
                name,
                "custom needs --hidden, --ffn, --experts and --top-k",
            ));
        };
        (
            MoeConfig::new(h, f, e, k)?.with_renormalize(true),
            format!("custom-{h}-{f}-{e}-{k}"),
        )
    } else {
        let p: Preset = name.parse()?;
        let c = p.config();
        let overridden = req.hidden.is_some()
            || req.ffn.is_some()
            || req.experts.is_some()
            || req.top_k.is_some();
        let cfg = MoeConfig::new(
            req.hidden.unwrap_or(c.hidden()),
            req.ffn.unwrap_or(c.ffn()),
            req.experts.unwrap_or(c.experts()),
            req.top_k.unwrap_or(c.top_k()),
        )?
        .with_activation(c.activation())
        .with_renormalize(c.renormalize());
        let label = if overridden {
            format!(
                "{}-{}-{}-{}-{}",
                p.name(),
                cfg.hidden(),
                cfg.ffn(),
                cfg.experts(),
                cfg.top_k()
            )
        } else {
            p.name().to_string()
        };
        (cfg, label)
    };
    let mut cfg = base;
    if let Some(a) = &req.activation {
        cfg = cfg.with_activation(a.parse::<Activation>()?);
    }
    if let Some(r) = req.renormalize {
        cfg = cfg.with_renormalize(r);
    }
    Ok(Shape { label, cfg })
}

/// Validates a request (no GPU needed).
pub fn plan(req: &RunRequest) -> Result<RunPlan> {
    if req.presets.is_empty() {
        return Err(arg("--presets", "(none)", "at least one preset"));
    }
    let shapes = req
        .presets
        .iter()
        .map(|p| shape_of(req, p))
        .collect::<Result<Vec<_>>>()?;
    if req.tokens.is_empty() || req.tokens.contains(&0) {
        return Err(arg(
            "--tokens",
            format!("{:?}", req.tokens),
            "each at least 1",
        ));
    }
    let strategies = req
        .strategies
        .iter()
        .map(|s| s.parse::<Strategy>())
        .collect::<std::result::Result<Vec<_>, _>>()?;
    if strategies.is_empty() {
        return Err(arg("--strategies", "(none)", "at least one strategy"));
    }
    for s in &strategies {
        if let Some(&t) = req.tokens.iter().find(|&&t| t < s.chunks()) {
            return Err(arg(
                "--strategies",
                s,
                format!(
                    "needs at least {} tokens per rank, --tokens has {t}",
                    s.chunks()
                ),
            ));
        }
    }
    if req.iters == 0 {
        return Err(arg(
            "--iters",
            0,
            "at least 1 (20 or more for the reported median)",
        ));
    }
    if req.pool == 0 {
        return Err(arg("--pool", 0, "at least 1 input tensor"));
    }
    if req.local_gpus == Some(0) {
        return Err(arg("--local-gpus", 0, "at least 1"));
    }
    let engine: GemmEngine = req.engine.parse()?;
    if req.gemm_sm_reserve.is_empty() {
        return Err(arg(
            "--gemm-sm-reserve",
            "(none)",
            "at least one value (0 = every SM)",
        ));
    }
    if req.sm90_stores.is_empty() {
        return Err(arg("--sm90-stores", "(none)", "at least one of off, on"));
    }
    let mut stores = Vec::new();
    for v in &req.sm90_stores {
        let on = LayerOptions::parse_sm90_stores(v)
            .map_err(|_| arg("--sm90-stores", v, "off or on (0 or 1), comma separated"))?;
        if !stores.contains(&on) {
            stores.push(on);
        }
    }
    if stores.contains(&false) && !req.backward {
        return Err(arg(
            "--sm90-stores",
            req.sm90_stores.join(","),
            "off (weight gradients on mma.sync, +mma-wgrad cases) changes only training layers: \
             add --backward, or leave the flag at its default (on)",
        ));
    }
    let mut variants = Vec::new();
    for &s in &strategies {
        let reserves: &[usize] = match s {
            Strategy::Sequential => &[0],
            Strategy::Pipelined { .. } => &req.gemm_sm_reserve,
        };
        for &r in reserves {
            for &st in &stores {
                if !variants.contains(&(s, r, st)) {
                    variants.push((s, r, st));
                }
            }
        }
    }
    Ok(RunPlan {
        shapes,
        tokens: req.tokens.clone(),
        strategies,
        engine,
        variants,
        req: req.clone(),
    })
}

/// Where rank `rank`'s report goes: `path` itself for one rank, else `<stem>.rank<R>.json`
/// beside it (the local-GPUs model writes every rank's report).
pub fn rank_path(path: &Path, rank: usize, world: usize) -> PathBuf {
    if world == 1 {
        return path.to_path_buf();
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "rank".into());
    path.with_file_name(format!("{stem}.rank{rank}.json"))
}

/// Runs the benchmark (see the module docs) and writes the rank report(s).
pub fn run(req: &RunRequest) -> Result<Vec<RankReport>> {
    let plan = plan(req)?;
    let found = crate::probe::probe().devices.len();
    let torchrun = std::env::var_os("RANK").is_some() && std::env::var_os("WORLD_SIZE").is_some();
    let reports = if torchrun && req.local_gpus.is_none() {
        let comm = Communicator::from_env(&EnvOptions {
            timeout: Duration::from_secs(300),
            device: None,
        })?;
        vec![rank_main(&comm, &plan)?]
    } else {
        let n = req.local_gpus.unwrap_or(1);
        if n > found {
            return Err(Error::Gpus {
                needed: n,
                found,
                why: "--local-gpus".into(),
            });
        }
        let opts = LocalOptions {
            devices: None,
            timeout: Duration::from_secs(300),
        };
        run_local(n, &opts, |comm| {
            rank_main(&comm, &plan).map_err(|e| comet_comm::Error::RankFailed {
                rank: comm.rank(),
                message: e.to_string(),
            })
        })?
    };
    if let Some(path) = &req.json {
        for r in &reports {
            let p = rank_path(path, r.rank, reports.len());
            write_json(&p, r)?;
        }
    }
    Ok(reports)
}

fn write_json(path: &Path, r: &RankReport) -> Result<()> {
    let text = serde_json::to_string_pretty(r).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    std::fs::write(path, text + "\n").map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Device-filled input tensors `[tokens, H]` (standard deviation 1), `n` of them.
fn inputs(
    layer: &MoeLayer<&Communicator>,
    tokens: usize,
    n: usize,
    seed: u64,
) -> Result<Vec<DeviceTensor>> {
    let gpu = layer.gpu();
    (0..n)
        .map(|i| {
            let mut t =
                DeviceTensor::alloc(gpu, layer.dtype(), &[tokens, layer.config().hidden()])?;
            init::fill_uniform(gpu, &mut t, seed.wrapping_add(i as u64), 1.0)?;
            Ok(t)
        })
        .collect()
}

/// One rank's whole benchmark.
pub fn rank_main(comm: &Communicator, plan: &RunPlan) -> Result<RankReport> {
    let req = &plan.req;
    let rank = comm.rank();
    let world = comm.world_size();
    let par = ParallelConfig::expert_parallel(world)?;
    let probe_gpu = comet_kernels::Gpu::from_stream(comm.context().new_stream()?)?;
    let gpu_name = probe_gpu.name()?;
    let dense = dense_gemm_tflops(&probe_gpu, req.dense_n, 5, 20)?;
    drop(probe_gpu);
    let say = |s: String| {
        if rank == 0 {
            println!("{s}");
        }
    };
    say(format!(
        "comet-bench run: {world} rank(s), {gpu_name}, dense bf16 GEMM {}³: {dense:.0} TFLOP/s (rank 0), engine {}",
        req.dense_n, plan.engine
    ));
    let total = plan.shapes.len() * plan.tokens.len() * plan.variants.len();
    let mut done = 0;
    let mut cases = Vec::new();
    for shape in &plan.shapes {
        for &tokens in &plan.tokens {
            for &(strategy, reserve, sm90_stores) in &plan.variants {
                let v = Variant {
                    strategy,
                    reserve,
                    sm90_stores,
                };
                let label = format!("{} {} {tokens}", shape.label, v.label());
                let seed = req.seed ^ (0x51ed_0000 + done as u64);
                // The training stores change training layers only: a stores-off variant
                // (+mma-wgrad) has no forward-only case (it would time the same inference
                // layer as the default, stores-on variant again).
                if sm90_stores {
                    let fwd = time_case(comm, plan, shape, par, tokens, v, false, seed)
                        .map_err(|e| annotate(e, &label, "forward"))?;
                    say(describe(&fwd));
                    cases.push(fwd);
                }
                if req.backward {
                    let bwd = time_case(comm, plan, shape, par, tokens, v, true, seed)
                        .map_err(|e| annotate(e, &label, "forward + backward"))?;
                    say(describe(&bwd));
                    cases.push(bwd);
                }
                done += 1;
                if rank == 0 {
                    println!("COMET_PROGRESS {done} {total} {label}");
                }
            }
        }
    }
    Ok(RankReport {
        schema: RANK_SCHEMA.to_string(),
        rank,
        world_size: world,
        gpu_name,
        dense_gemm_tflops: Some(dense),
        git_commit: std::env::var("COMET_GIT_COMMIT")
            .ok()
            .filter(|s| !s.is_empty()),
        cases,
    })
}

fn annotate(e: Error, label: &str, what: &str) -> Error {
    Error::Arg {
        what: "case",
        value: format!("{label} ({what})"),
        rule: e.to_string(),
    }
}

fn describe(c: &CaseResult) -> String {
    let phases: Vec<String> = c
        .phases_ms
        .iter()
        .map(|(k, v)| format!("{k} {v:.3}"))
        .collect();
    let tf = c
        .flops
        .map(|f| format!(", {:.0} TFLOP/s (rank 0)", f / (c.median_ms * 1e-3) / 1e12))
        .unwrap_or_default();
    format!(
        "  {} / {} / {} tokens / {}: {:.3} ms{tf}; phases (ms): {}",
        c.preset,
        c.strategy,
        c.tokens_per_rank,
        if c.backward { "fwd+bwd" } else { "fwd" },
        c.median_ms,
        phases.join(", ")
    )
}

/// A strategy, the SMs its expert GEMMs leave free and whether the Hopper engine's training
/// stores are on.
#[derive(Debug, Clone, Copy)]
struct Variant {
    strategy: Strategy,
    reserve: usize,
    sm90_stores: bool,
}

impl Variant {
    fn label(&self) -> String {
        variant_label(self.strategy, self.reserve, self.sm90_stores)
    }
}

/// Times one case on this rank (see the module docs).
#[allow(clippy::too_many_arguments)]
fn time_case(
    comm: &Communicator,
    plan: &RunPlan,
    shape: &Shape,
    par: ParallelConfig,
    tokens: usize,
    variant: Variant,
    backward: bool,
    seed: u64,
) -> Result<CaseResult> {
    let req = &plan.req;
    let strategy = variant.strategy;
    let backward_label = if backward { "fwd+bwd" } else { "fwd" };
    let opts = LayerOptions::new(strategy, tokens)
        .engine(plan.engine)
        .training(backward)
        .gemm_sm_reserve(variant.reserve)
        .sm90_training_stores(variant.sm90_stores);
    let mut layer = MoeLayer::new(comm, shape.cfg, par, opts, Weights::Random { seed })?;
    let rank_seed = seed ^ ((comm.rank() as u64 + 1) << 40);
    let xs = inputs(&layer, tokens, req.pool, rank_seed)?;
    let dys = if backward {
        inputs(&layer, tokens, req.pool, rank_seed ^ 0xd1d1)?
    } else {
        Vec::new()
    };
    let gpu = layer.gpu().clone();
    let mut y = DeviceTensor::alloc(&gpu, layer.dtype(), &[tokens, shape.cfg.hidden()])?;
    let mut dx = DeviceTensor::alloc(&gpu, layer.dtype(), &[tokens, shape.cfg.hidden()])?;
    // One step: a training step's zero_grad (O(1)), forward, backward.
    let mut step = |layer: &mut MoeLayer<&Communicator>, i: usize| -> Result<()> {
        let k = i % xs.len();
        if backward {
            layer.zero_grad()?;
        }
        layer.forward_into(&xs[k], &mut y)?;
        if backward {
            layer.backward_into(&dys[k], &mut dx)?;
        }
        Ok(())
    };
    for i in 0..req.warmup {
        step(&mut layer, i)?;
    }
    layer.synchronize()?;
    let (start, end) = (gpu.timing_event()?, gpu.timing_event()?);
    let mut ms = Vec::with_capacity(req.iters);
    for i in 0..req.iters {
        comm.barrier()?;
        start.record(gpu.stream())?;
        step(&mut layer, req.warmup + i)?;
        end.record(gpu.stream())?;
        layer.synchronize()?;
        ms.push(f64::from(start.elapsed_ms(&end)?));
    }
    let mut phases_ms = BTreeMap::new();
    if req.phases {
        layer.set_phase_timing(true);
        let mut per: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for i in 0..req.iters {
            comm.barrier()?;
            step(&mut layer, i)?;
            for (k, v) in layer.take_phase_times()? {
                per.entry(k).or_default().push(v);
            }
        }
        layer.set_phase_timing(false);
        for (k, v) in per {
            if let Some(m) = median(&v) {
                phases_ms.insert(k, m);
            }
        }
    }
    if comm.rank() == 0 {
        let stores = if !backward {
            ""
        } else if !variant.sm90_stores {
            ", weight gradients on mma.sync (--sm90-stores off)"
        } else if layer.used_hopper_stores() {
            ", training stores on the Hopper engine"
        } else {
            ", training stores on mma.sync (the Hopper engine did not take them)"
        };
        println!(
            "  {} / {} / {backward_label}: expert GEMMs on the {} engine{stores}",
            shape.label,
            variant.label(),
            if layer.used_hopper_engine() {
                "Hopper (sm90)"
            } else {
                "mma.sync"
            }
        );
    }
    let cfg = &shape.cfg;
    let rows = layer.last_received_rows().unwrap_or(0) as f64;
    let fwd_flops = 2.0 * rows * cfg.hidden() as f64 * (cfg.n0() + cfg.ffn()) as f64;
    let row_bytes = (cfg.hidden() * DType::from(cfg.dtype()).size()) as f64;
    let remote = layer.last_remote_rows().unwrap_or(0) as f64 * row_bytes;
    let factor = if backward { 3.0 } else { 1.0 };
    Ok(CaseResult {
        preset: shape.label.clone(),
        strategy: variant.label(),
        tokens_per_rank: tokens,
        dtype: cfg.dtype().name().to_string(),
        backward,
        iterations: req.iters,
        median_ms: median(&ms).unwrap_or(f64::NAN),
        phases_ms,
        flops: Some(fwd_flops * factor),
        comm_bytes: Some(remote * if backward { 2.0 } else { 1.0 }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_issue_5_matrix() {
        let p = plan(&RunRequest::default()).unwrap();
        let labels: Vec<&str> = p.shapes.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "mixtral-8x7b",
                "qwen2-moe-2.7b",
                "phi-3.5-moe",
                "deepseek-v3"
            ]
        );
        assert_eq!(p.tokens, vec![8192]);
        assert_eq!(
            p.strategies,
            vec![Strategy::Sequential, Strategy::Pipelined { chunks: 4 }]
        );
        assert_eq!(p.engine, GemmEngine::Auto);
        assert!(p.shapes[0].cfg.renormalize() && !p.shapes[1].cfg.renormalize());
        assert_eq!(
            p.variants,
            vec![
                (Strategy::Sequential, 0, true),
                (Strategy::Pipelined { chunks: 4 }, 0, true)
            ],
            "no GEMM SM reserve and the Hopper training stores (the layer's default)"
        );
        let labels: Vec<String> = p
            .variants
            .iter()
            .map(|&(s, r, st)| variant_label(s, r, st))
            .collect();
        assert_eq!(
            labels,
            ["sequential", "pipelined"],
            "the default is unlabelled"
        );
    }

    #[test]
    fn sm_reserve_sweep_multiplies_the_pipelined_cases_only() {
        let p = plan(&RunRequest {
            strategies: vec!["sequential".into(), "pipelined:2".into()],
            gemm_sm_reserve: vec![0, 8, 16, 8],
            ..Default::default()
        })
        .unwrap();
        let pipe = Strategy::Pipelined { chunks: 2 };
        assert_eq!(
            p.variants,
            vec![
                (Strategy::Sequential, 0, true),
                (pipe, 0, true),
                (pipe, 8, true),
                (pipe, 16, true)
            ]
        );
        let labels: Vec<String> = p
            .variants
            .iter()
            .map(|&(s, r, st)| variant_label(s, r, st))
            .collect();
        assert_eq!(
            labels,
            [
                "sequential",
                "pipelined:2",
                "pipelined:2+r8",
                "pipelined:2+r16"
            ]
        );
        let e = plan(&RunRequest {
            gemm_sm_reserve: vec![],
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("--gemm-sm-reserve"), "{e}");
    }

    #[test]
    fn sm90_stores_sweep_doubles_every_case_and_labels_the_mma_wgrad_ones() {
        let p = plan(&RunRequest {
            strategies: vec!["sequential".into(), "pipelined:2".into()],
            gemm_sm_reserve: vec![0, 16],
            sm90_stores: vec!["off".into(), "on".into(), "1".into()],
            backward: true,
            ..Default::default()
        })
        .unwrap();
        let pipe = Strategy::Pipelined { chunks: 2 };
        let seq = Strategy::Sequential;
        assert_eq!(
            p.variants,
            vec![
                (seq, 0, false),
                (seq, 0, true),
                (pipe, 0, false),
                (pipe, 0, true),
                (pipe, 16, false),
                (pipe, 16, true)
            ]
        );
        let labels: Vec<String> = p
            .variants
            .iter()
            .map(|&(s, r, st)| variant_label(s, r, st))
            .collect();
        assert_eq!(
            labels,
            [
                "sequential+mma-wgrad",
                "sequential",
                "pipelined:2+mma-wgrad",
                "pipelined:2",
                "pipelined:2+r16+mma-wgrad",
                "pipelined:2+r16"
            ]
        );
        let off_only = plan(&RunRequest {
            sm90_stores: vec!["0".into()],
            backward: true,
            ..Default::default()
        })
        .unwrap();
        assert!(
            off_only.variants.iter().all(|v| !v.2),
            "{:?}",
            off_only.variants
        );
        assert_eq!(off_only.variants.len(), 2);
        for bad in [vec!["maybe".to_string()], vec![]] {
            let e = plan(&RunRequest {
                sm90_stores: bad.clone(),
                backward: true,
                ..Default::default()
            })
            .unwrap_err()
            .to_string();
            assert!(e.contains("--sm90-stores"), "{bad:?}: {e}");
            if let Some(v) = bad.first() {
                assert!(e.contains(v.as_str()), "{e}");
            }
        }
        // Forward-only runs have no training layer: off (alone or beside on) is refused,
        // on (the default) is accepted.
        for off in [vec!["off".to_string(), "on".to_string()], vec!["0".into()]] {
            let e = plan(&RunRequest {
                sm90_stores: off.clone(),
                ..Default::default()
            })
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("--backward") && e.contains(&off.join(",")) && e.contains("mma.sync"),
                "{e}"
            );
        }
        let fwd = plan(&RunRequest {
            sm90_stores: vec!["on".into()],
            ..Default::default()
        })
        .unwrap();
        assert!(fwd.variants.iter().all(|v| v.2), "{:?}", fwd.variants);
    }

    #[test]
    fn custom_shapes_and_overrides() {
        let req = RunRequest {
            presets: vec!["custom".into(), "mixtral".into()],
            hidden: Some(1024),
            ffn: Some(512),
            experts: Some(16),
            top_k: Some(4),
            activation: Some("gelu".into()),
            renormalize: Some(false),
            ..Default::default()
        };
        let p = plan(&req).unwrap();
        assert_eq!(p.shapes[0].label, "custom-1024-512-16-4");
        assert_eq!(p.shapes[1].label, "mixtral-8x7b-1024-512-16-4");
        for s in &p.shapes {
            assert_eq!(s.cfg.activation(), Activation::Gelu);
            assert!(!s.cfg.renormalize());
            assert_eq!((s.cfg.hidden(), s.cfg.top_k()), (1024, 4));
        }
        let e = plan(&RunRequest {
            presets: vec!["custom".into()],
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("custom needs --hidden"), "{e}");
    }

    #[test]
    fn bad_requests_name_the_value() {
        let bad = |r: RunRequest| plan(&r).unwrap_err().to_string();
        let e = bad(RunRequest {
            presets: vec!["llama".into()],
            ..Default::default()
        });
        assert!(e.contains("llama"), "{e}");
        let e = bad(RunRequest {
            tokens: vec![8, 0],
            ..Default::default()
        });
        assert!(e.contains("--tokens") && e.contains("[8, 0]"), "{e}");
        let e = bad(RunRequest {
            strategies: vec!["comet".into()],
            ..Default::default()
        });
        assert!(e.contains("comet"), "{e}");
        let e = bad(RunRequest {
            tokens: vec![3],
            strategies: vec!["pipelined:4".into()],
            ..Default::default()
        });
        assert!(e.contains("at least 4 tokens"), "{e}");
        let e = bad(RunRequest {
            iters: 0,
            ..Default::default()
        });
        assert!(e.contains("--iters"), "{e}");
        let e = bad(RunRequest {
            engine: "cutlass".into(),
            ..Default::default()
        });
        assert!(e.contains("cutlass"), "{e}");
        let e = bad(RunRequest {
            local_gpus: Some(0),
            ..Default::default()
        });
        assert!(e.contains("--local-gpus"), "{e}");
        let e = bad(RunRequest {
            presets: vec!["mixtral".into()],
            top_k: Some(9),
            ..Default::default()
        });
        assert!(e.contains("top_k = 9"), "{e}");
    }

    #[test]
    fn labels_and_rank_paths() {
        assert_eq!(strategy_label(Strategy::Sequential), "sequential");
        assert_eq!(
            strategy_label(Strategy::Pipelined { chunks: 4 }),
            "pipelined"
        );
        assert_eq!(
            strategy_label(Strategy::Pipelined { chunks: 2 }),
            "pipelined:2"
        );
        let p = Path::new("/tmp/x/run.json");
        assert_eq!(rank_path(p, 0, 1), PathBuf::from("/tmp/x/run.json"));
        assert_eq!(rank_path(p, 1, 2), PathBuf::from("/tmp/x/run.rank1.json"));
    }
}
