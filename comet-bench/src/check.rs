//! `comet-bench check --inputs DIR --out DIR2`: the Rust side of bench/INTEROP.md. Reads and
//! validates `config.json` and the five `.npy` inputs, runs `world` ranks (one GPU each, a
//! thread per rank in this process), forward then backward with each rank's rows of `x` and
//! `dy` and its experts, and writes §2's outputs (`topk_ids`, `y`, `dx`, `dwr` summed over
//! ranks in rank order, `dw0`, `dw1`, `topk_weights`, `meta.json`) for
//! `bench/torch_reference.py compare`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use comet_comm::{LocalOptions, run_local};
use comet_core::{Activation, MoeConfig, ParallelConfig};
use comet_kernels::forward::{download_f32, upload_f32};
use comet_layer::{GemmEngine, LayerOptions, MoeLayer, Strategy, Weights};
use ndarray::{Array2, Array3, ArrayD, IxDyn, s};
use serde_json::Value;

use crate::{Error, Result};

/// What `check` reads from `config.json` (bench/INTEROP.md §1; other keys are ignored).
#[derive(Debug, Clone, PartialEq)]
pub struct InteropConfig {
    /// `H`.
    pub hidden: usize,
    /// `F`.
    pub ffn: usize,
    /// `E`.
    pub experts: usize,
    /// `k`.
    pub top_k: usize,
    /// SwiGLU or GeLU.
    pub activation: Activation,
    /// Top-k renormalisation.
    pub renormalize: bool,
    /// `W`.
    pub world: usize,
    /// `M`, equal on every rank.
    pub tokens_per_rank: usize,
}

fn interop(path: &Path, message: impl Into<String>) -> Error {
    Error::Interop {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

impl InteropConfig {
    /// Parses and validates `config.json`'s text (`path` names it in errors).
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let int = |key: &str| -> Result<usize> {
            let x = v
                .get(key)
                .ok_or_else(|| interop(path, format!("required key {key:?} is missing")))?;
            x.as_u64()
                .filter(|n| *n >= 1)
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| interop(path, format!("{key} = {x}: must be an integer >= 1")))
        };
        let text_key = |key: &str| -> Result<&str> {
            let x = v
                .get(key)
                .ok_or_else(|| interop(path, format!("required key {key:?} is missing")))?;
            x.as_str()
                .ok_or_else(|| interop(path, format!("{key} = {x}: must be a string")))
        };
        let (hidden, ffn, experts, top_k) =
            (int("hidden")?, int("ffn")?, int("experts")?, int("top_k")?);
        let (world, tokens_per_rank) = (int("world")?, int("tokens_per_rank")?);
        let activation = match text_key("activation")? {
            "swiglu" => Activation::SwiGlu,
            "gelu" => Activation::Gelu,
            other => {
                return Err(interop(
                    path,
                    format!("activation = {other:?}: must be \"swiglu\" or \"gelu\""),
                ));
            }
        };
        let renormalize = match v.get("renormalize") {
            Some(Value::Bool(b)) => *b,
            Some(x) => return Err(interop(path, format!("renormalize = {x}: must be a bool"))),
            None => return Err(interop(path, "required key \"renormalize\" is missing")),
        };
        let dtype = text_key("dtype")?;
        if dtype != "bf16" {
            return Err(interop(
                path,
                format!("dtype = {dtype:?}: only \"bf16\" is defined (format version 1)"),
            ));
        }
        if top_k > experts {
            return Err(interop(
                path,
                format!("top_k = {top_k} exceeds experts = {experts}"),
            ));
        }
        if experts % world != 0 {
            return Err(interop(
                path,
                format!("experts = {experts} is not divisible by world = {world}"),
            ));
        }
        Ok(InteropConfig {
            hidden,
            ffn,
            experts,
            top_k,
            activation,
            renormalize,
            world,
            tokens_per_rank,
        })
    }

    /// The layer.
    pub fn layer(&self) -> Result<MoeConfig> {
        Ok(
            MoeConfig::new(self.hidden, self.ffn, self.experts, self.top_k)?
                .with_activation(self.activation)
                .with_renormalize(self.renormalize),
        )
    }
}

/// The five inputs of an interop directory.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// The config.
    pub config: InteropConfig,
    /// `[W·M, H]`.
    pub x: Array2<f32>,
    /// `[E, H]`.
    pub wr: Array2<f32>,
    /// `[E, N0, H]`.
    pub w0: Array3<f32>,
    /// `[E, H, F]`.
    pub w1: Array3<f32>,
    /// `[W·M, H]`.
    pub dy: Array2<f32>,
}

fn read2(path: &Path) -> Result<Array2<f32>> {
    ndarray_npy::read_npy(path)
        .map_err(|e| interop(path, format!("cannot read as f32 2-D .npy: {e}")))
}

fn read3(path: &Path) -> Result<Array3<f32>> {
    ndarray_npy::read_npy(path)
        .map_err(|e| interop(path, format!("cannot read as f32 3-D .npy: {e}")))
}

fn expect_shape(path: &Path, got: &[usize], want: &[usize]) -> Result<()> {
    if got != want {
        return Err(interop(
            path,
            format!("shape {got:?} disagrees with config.json, which gives {want:?}"),
        ));
    }
    Ok(())
}

fn finite_bf16(path: &Path, v: impl Iterator<Item = f32>) -> Result<()> {
    let (mut non_finite, mut not_bf16) = (0usize, 0usize);
    for x in v {
        if !x.is_finite() {
            non_finite += 1;
        } else if x.to_bits() & 0xffff != 0 {
            not_bf16 += 1;
        }
    }
    if non_finite + not_bf16 > 0 {
        return Err(interop(
            path,
            format!(
                "{non_finite} non-finite and {not_bf16} not bf16-representable values (every input must be a finite bf16 value)"
            ),
        ));
    }
    Ok(())
}

/// Reads and validates an input directory (INTEROP.md §1).
pub fn read_inputs(dir: &Path) -> Result<Inputs> {
    let cpath = dir.join("config.json");
    let text = std::fs::read_to_string(&cpath).map_err(|source| Error::Io {
        path: cpath.clone(),
        source,
    })?;
    let config = InteropConfig::parse(&cpath, &text)?;
    let cfg = config.layer()?;
    let rows = config.world * config.tokens_per_rank;
    let (h, e, n0, f) = (cfg.hidden(), cfg.experts(), cfg.n0(), cfg.ffn());
    let p = |n: &str| dir.join(n);
    let x = read2(&p("x.npy"))?;
    expect_shape(&p("x.npy"), x.shape(), &[rows, h])?;
    let wr = read2(&p("wr.npy"))?;
    expect_shape(&p("wr.npy"), wr.shape(), &[e, h])?;
    let w0 = read3(&p("w0.npy"))?;
    expect_shape(&p("w0.npy"), w0.shape(), &[e, n0, h])?;
    let w1 = read3(&p("w1.npy"))?;
    expect_shape(&p("w1.npy"), w1.shape(), &[e, h, f])?;
    let dy = read2(&p("dy.npy"))?;
    expect_shape(&p("dy.npy"), dy.shape(), &[rows, h])?;
    finite_bf16(&p("x.npy"), x.iter().copied())?;
    finite_bf16(&p("wr.npy"), wr.iter().copied())?;
    finite_bf16(&p("w0.npy"), w0.iter().copied())?;
    finite_bf16(&p("w1.npy"), w1.iter().copied())?;
    finite_bf16(&p("dy.npy"), dy.iter().copied())?;
    Ok(Inputs {
        config,
        x,
        wr,
        w0,
        w1,
        dy,
    })
}

/// One rank's results.
#[derive(Debug, Clone, PartialEq)]
pub struct RankOutput {
    /// `[M, k]` routed expert ids.
    pub ids: Vec<i32>,
    /// `[M, k]` routing weights.
    pub weights: Vec<f32>,
    /// `[M, H]`.
    pub y: Vec<f32>,
    /// `[M, H]`.
    pub dx: Vec<f32>,
    /// `[E, H]` this rank's router-weight gradient.
    pub dwr: Vec<f32>,
    /// `[L, n0, H]`.
    pub dw0: Vec<f32>,
    /// `[L, H, F]`.
    pub dw1: Vec<f32>,
}

/// Options of a check run.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// Strategy of the layer.
    pub strategy: Strategy,
    /// GEMM engine.
    pub engine: GemmEngine,
}

/// Runs the layer on `world` local GPUs (a thread per rank) and returns each rank's output.
pub fn run_ranks(inp: &Inputs, opts: &CheckOptions) -> Result<Vec<RankOutput>> {
    let c = &inp.config;
    let found = crate::probe::probe().devices.len();
    if found < c.world {
        return Err(Error::Gpus {
            needed: c.world,
            found,
            why: format!("world = {} in config.json, one GPU per rank", c.world),
        });
    }
    let cfg = c.layer()?;
    let par = ParallelConfig::expert_parallel(c.world)?;
    let m = c.tokens_per_rank;
    let l = c.experts / c.world;
    let local = LocalOptions {
        devices: None,
        timeout: Duration::from_secs(300),
    };
    let out = run_local(c.world, &local, |comm| {
        let r = comm.rank();
        let fail = |e: String| comet_comm::Error::RankFailed {
            rank: r,
            message: e,
        };
        let body = || -> Result<RankOutput> {
            let wr: Vec<f32> = inp.wr.iter().copied().collect();
            let w0: Vec<f32> = inp
                .w0
                .slice(s![r * l..(r + 1) * l, .., ..])
                .iter()
                .copied()
                .collect();
            let w1: Vec<f32> = inp
                .w1
                .slice(s![r * l..(r + 1) * l, .., ..])
                .iter()
                .copied()
                .collect();
            let opts = LayerOptions::new(opts.strategy, m).engine(opts.engine);
            let mut layer = MoeLayer::new(
                &comm,
                cfg,
                par,
                opts,
                Weights::Host {
                    wr: &wr,
                    w0: &w0,
                    w1: &w1,
                },
            )?;
            drop((wr, w0, w1));
            let gpu = layer.gpu().clone();
            let rows = |a: &Array2<f32>| -> Vec<f32> {
                a.slice(s![r * m..(r + 1) * m, ..])
                    .iter()
                    .copied()
                    .collect()
            };
            let x = upload_f32(&gpu, layer.dtype(), &[m, c.hidden], &rows(&inp.x))?;
            let dy = upload_f32(&gpu, layer.dtype(), &[m, c.hidden], &rows(&inp.dy))?;
            let mut y = comet_kernels::DeviceTensor::alloc(&gpu, layer.dtype(), &[m, c.hidden])?;
            let mut dx = comet_kernels::DeviceTensor::alloc(&gpu, layer.dtype(), &[m, c.hidden])?;
            y.poison(&gpu)?;
            dx.poison(&gpu)?;
            layer.poison_workspace()?;
            layer.forward_into(&x, &mut y)?;
            let (ids, weights) = layer.routing_to_host()?;
            layer.backward_into(&dy, &mut dx)?;
            layer.synchronize()?;
            let (dwr, dw0, dw1) = layer.grads_to_host()?;
            Ok(RankOutput {
                ids,
                weights,
                y: download_f32(&gpu, &y)?,
                dx: download_f32(&gpu, &dx)?,
                dwr,
                dw0,
                dw1,
            })
        };
        body().map_err(|e| fail(e.to_string()))
    })?;
    Ok(out)
}

fn write(path: &Path, a: &ArrayD<f32>) -> Result<()> {
    ndarray_npy::write_npy(path, a).map_err(|e| interop(path, format!("cannot write: {e}")))
}

/// Writes INTEROP.md §2's files for the ranks' outputs into `out`.
pub fn write_outputs(
    out: &Path,
    c: &InteropConfig,
    ranks: &[RankOutput],
    meta: &Value,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out).map_err(|source| Error::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let cfg = c.layer()?;
    let (w, m, k, h, e, f, n0) = (
        c.world,
        c.tokens_per_rank,
        c.top_k,
        c.hidden,
        c.experts,
        c.ffn,
        cfg.n0(),
    );
    let l = e / w;
    if ranks.len() != w {
        return Err(interop(
            out,
            format!("{} rank outputs for world = {w}", ranks.len()),
        ));
    }
    let cat = |f: &dyn Fn(&RankOutput) -> &Vec<f32>| -> Vec<f32> {
        ranks.iter().flat_map(|r| f(r).iter().copied()).collect()
    };
    let shaped = |v: Vec<f32>, shape: &[usize], what: &str| -> Result<ArrayD<f32>> {
        ArrayD::from_shape_vec(IxDyn(shape), v)
            .map_err(|e| interop(out, format!("{what}: rank outputs of the wrong size: {e}")))
    };
    let mut dwr = vec![0f32; e * h];
    for r in ranks {
        if r.dwr.len() != dwr.len() {
            return Err(interop(out, "dwr: a rank's gradient has the wrong size"));
        }
        for (a, b) in dwr.iter_mut().zip(&r.dwr) {
            *a += b;
        }
    }
    let ids: Vec<i32> = ranks.iter().flat_map(|r| r.ids.iter().copied()).collect();
    let ids = ndarray::Array2::from_shape_vec((w * m, k), ids)
        .map_err(|e| interop(out, format!("topk_ids: {e}")))?;
    let mut written = Vec::new();
    let ids_path = out.join("topk_ids.npy");
    ndarray_npy::write_npy(&ids_path, &ids)
        .map_err(|e| interop(&ids_path, format!("cannot write: {e}")))?;
    written.push(ids_path);
    let files: Vec<(&str, ArrayD<f32>)> = vec![
        ("y.npy", shaped(cat(&|r| &r.y), &[w * m, h], "y")?),
        ("dx.npy", shaped(cat(&|r| &r.dx), &[w * m, h], "dx")?),
        ("dwr.npy", shaped(dwr, &[e, h], "dwr")?),
        ("dw0.npy", shaped(cat(&|r| &r.dw0), &[w * l, n0, h], "dw0")?),
        ("dw1.npy", shaped(cat(&|r| &r.dw1), &[w * l, h, f], "dw1")?),
        (
            "topk_weights.npy",
            shaped(cat(&|r| &r.weights), &[w * m, k], "topk_weights")?,
        ),
    ];
    for (name, a) in &files {
        let p = out.join(name);
        write(&p, a)?;
        written.push(p);
    }
    let mp = out.join("meta.json");
    let text = serde_json::to_string_pretty(meta).map_err(|source| Error::Json {
        path: mp.clone(),
        source,
    })?;
    std::fs::write(&mp, text + "\n").map_err(|source| Error::Io {
        path: mp.clone(),
        source,
    })?;
    written.push(mp);
    Ok(written)
}

/// `comet-bench check`: read, run, write. Returns the files written.
pub fn check(inputs: &Path, out: &Path, opts: &CheckOptions) -> Result<Vec<PathBuf>> {
    let inp = read_inputs(inputs)?;
    let ranks = run_ranks(&inp, opts)?;
    let meta = serde_json::json!({
        "impl": "comet-rs",
        "dtype": "bf16",
        "device": crate::probe::probe().devices.first().map(|d| d.name.clone()),
        "strategy": opts.strategy.to_string(),
        "engine": opts.engine.name(),
        "world": inp.config.world,
        "tokens_per_rank": inp.config.tokens_per_rank,
    });
    write_outputs(out, &inp.config, &ranks, &meta)
}

#[cfg(test)]
mod tests;
