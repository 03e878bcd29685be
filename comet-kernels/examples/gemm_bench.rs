//! Grouped-GEMM benchmark: the four presets' expert GEMMs at `--tokens` tokens × top-k rows
//! spread over the experts by a random router, for every tile shape of the mma.sync engine
//! (`--engine mma`, the default) or every configuration of the Hopper engine
//! (`--engine hopper`: `Sm90Config::ALL` with and without L2 hints, `*` marking
//! `Sm90Config::choose`'s), beside cuBLAS dense at the same FLOPs (same M, N, K as one dense
//! GEMM, same output dtype; `beta = 1` when the grouped GEMM accumulates), in one run.
//!
//! GEMMs (`--gemms`): `fwd0` (x·W0ᵀ + SwiGLU), `fwd1` (a·W1ᵀ), `dgrad1` (dO·W1), `wgrad1`
//! (dOᵀ·a per expert, bf16 out), and the layer's weight gradients in f32: `wgrad1.f32`
//! (overwrite), `wgrad1.acc` and `wgrad0.acc` (`dW += …`, what the backward runs: dW1 =
//! dOᵀ·a `[E, H, F]`, dW0 = dhᵀ·x `[E, 2F, H]`).
//!
//! CUDA events around each launch, warm-up, median of `--iters` (≥ 20) timed runs, activation
//! inputs rotated among several copies so L2 does not flatter (the weights exceed L2 anyway).
//! Prints a table and writes JSON (commit, GPU, date, every measurement) to `--out`.
//!
//! ```text
//! cargo run --release -p comet-kernels --example gemm_bench -- --out bench.json --commit $(git rev-parse --short HEAD)
//! gemm_bench --engine hopper --gemms wgrad1.acc,wgrad0.acc --out hopper-wgrad.json
//! gemm_bench --engine mma --tiles 128x256w8s3,128x128w4s3 --gemms wgrad1.acc,wgrad0.acc
//! ```

use std::ffi::c_void;
use std::path::PathBuf;

use clap::Parser;
use comet_core::Preset;
use comet_kernels::Gpu;
use comet_kernels::buffer::{DType, DeviceTensor};
use comet_kernels::gemm::{self, Epilogue, GemmArgs, GemmDesc, GemmKind, Meta, TileShape};
use comet_kernels::init::fill_uniform;
use comet_kernels::sm90::{self, Sm90Config, Sm90Gemm, Sm90Store};
use comet_kernels::{router, routing::RoutingPlan, rows};
use cudarc::cublas::{CudaBlas, sys as cublas_sys};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

#[derive(Parser, Debug)]
#[command(about = "Grouped GEMM (mma.sync or Hopper engine) vs cuBLAS dense bf16")]
struct Args {
    /// JSON output path.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Commit id recorded in the JSON.
    #[arg(long, default_value = "unknown")]
    commit: String,
    /// Date recorded in the JSON (e.g. `date -u +%FT%TZ`).
    #[arg(long, default_value = "")]
    date: String,
    /// Tokens per call (rows = tokens × top-k).
    #[arg(long, default_value_t = 8192)]
    tokens: usize,
    /// Timed iterations per measurement (median reported).
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Warm-up iterations.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Presets (comma separated names) or `all`.
    #[arg(long, default_value = "all")]
    presets: String,
    /// Tile shapes (comma separated names from TileShape::ALL) or `all`.
    #[arg(long, default_value = "all")]
    tiles: String,
    /// GEMMs: fwd0 (x·W0ᵀ + SwiGLU), fwd1 (a·W1ᵀ), dgrad1 (dO·W1), wgrad1 (dOᵀ·a per expert),
    /// wgrad1.f32 (f32 out), wgrad1.acc / wgrad0.acc (f32 accumulate: dW1, dW0).
    #[arg(long, default_value = "fwd0,fwd1,dgrad1,wgrad1")]
    gemms: String,
    /// Engine: mma (the portable engine's tile shapes, --tiles) or hopper (the sm90 engine's
    /// configurations; sm_90 only).
    #[arg(long, default_value = "mma")]
    engine: String,
}

/// One benchmarked GEMM of a preset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Fwd0,
    Fwd1,
    Dgrad1,
    /// dW1 in bf16 (overwrite).
    Wgrad1,
    /// dW1 in f32 (overwrite).
    Wgrad1F32,
    /// dW1 += in f32.
    Wgrad1Acc,
    /// dW0 += in f32.
    Wgrad0Acc,
}

impl Which {
    fn parse(s: &str) -> Res<Which> {
        Ok(match s {
            "fwd0" => Which::Fwd0,
            "fwd1" => Which::Fwd1,
            "dgrad1" => Which::Dgrad1,
            "wgrad1" => Which::Wgrad1,
            "wgrad1.f32" => Which::Wgrad1F32,
            "wgrad1.acc" => Which::Wgrad1Acc,
            "wgrad0.acc" => Which::Wgrad0Acc,
            other => return Err(format!("unknown GEMM {other}").into()),
        })
    }
    fn kind(self) -> GemmKind {
        match self {
            Which::Fwd0 | Which::Fwd1 => GemmKind::Forward,
            Which::Dgrad1 => GemmKind::Dgrad,
            _ => GemmKind::Wgrad,
        }
    }
    fn epilogue(self) -> Epilogue {
        if self == Which::Fwd0 {
            Epilogue::SwiGlu
        } else {
            Epilogue::None
        }
    }
    fn f32_out(self) -> bool {
        matches!(self, Which::Wgrad1F32 | Which::Wgrad1Acc | Which::Wgrad0Acc)
    }
    fn accumulate(self) -> bool {
        matches!(self, Which::Wgrad1Acc | Which::Wgrad0Acc)
    }
}

/// One timed measurement: median milliseconds of `iters` event-timed runs.
fn time_ms(
    gpu: &Gpu,
    warmup: usize,
    iters: usize,
    mut run: impl FnMut(usize) -> Res<()>,
) -> Res<f64> {
    for i in 0..warmup {
        run(i)?;
    }
    let mut evs = Vec::with_capacity(iters);
    for i in 0..iters {
        let (a, b) = (gpu.timing_event()?, gpu.timing_event()?);
        a.record(gpu.stream())?;
        run(i)?;
        b.record(gpu.stream())?;
        evs.push((a, b));
    }
    gpu.synchronize()?;
    let mut ms: Vec<f64> = evs
        .iter()
        .map(|(a, b)| a.elapsed_ms(b).map(f64::from))
        .collect::<Result<_, _>>()?;
    ms.sort_by(|a, b| a.total_cmp(b));
    Ok(ms[ms.len() / 2])
}

/// cuBLAS `C[m, n] = A[m, k] · B[n, k]ᵀ` (row-major, bf16 in/out, fp32 compute).
fn cublas_tn(blas: &CudaBlas, m: usize, n: usize, k: usize, a: u64, b: u64, c: u64) -> Res<()> {
    cublas_tn_out(blas, m, n, k, a, b, c, false, false)
}

/// [`cublas_tn`] with an f32 C (`c_f32`) and `C += A·Bᵀ` (`accumulate`: beta = 1).
#[allow(clippy::too_many_arguments)]
fn cublas_tn_out(
    blas: &CudaBlas,
    m: usize,
    n: usize,
    k: usize,
    a: u64,
    b: u64,
    c: u64,
    c_f32: bool,
    accumulate: bool,
) -> Res<()> {
    let alpha = 1.0f32;
    let beta = if accumulate { 1.0f32 } else { 0.0 };
    let c_type = if c_f32 {
        cublas_sys::cudaDataType_t::CUDA_R_32F
    } else {
        cublas_sys::cudaDataType_t::CUDA_R_16BF
    };
    // SAFETY: a, b, c are device allocations holding at least m·k, n·k bf16 and m·n elements
    // of C's type (checked by the callers); the handle's stream is the benchmark stream.
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *blas.handle(),
            cublas_sys::cublasOperation_t::CUBLAS_OP_T,
            cublas_sys::cublasOperation_t::CUBLAS_OP_N,
            n as i32,
            m as i32,
            k as i32,
            &alpha as *const f32 as *const c_void,
            b as *const c_void,
            cublas_sys::cudaDataType_t::CUDA_R_16BF,
            k as i32,
            a as *const c_void,
            cublas_sys::cudaDataType_t::CUDA_R_16BF,
            k as i32,
            &beta as *const f32 as *const c_void,
            c as *mut c_void,
            c_type,
            n as i32,
            cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )?;
    }
    Ok(())
}

fn filled(gpu: &Gpu, dtype: DType, shape: &[usize], seed: u64, std: f64) -> Res<DeviceTensor> {
    let mut t = DeviceTensor::alloc(gpu, dtype, shape)?;
    fill_uniform(gpu, &mut t, seed, std)?;
    Ok(t)
}

fn main() -> Res<()> {
    let args = Args::parse();
    if args.iters < 20 {
        return Err(format!("--iters {} < 20 (the project's benchmark rule)", args.iters).into());
    }
    let hopper = match args.engine.as_str() {
        "mma" => false,
        "hopper" | "sm90" => true,
        other => return Err(format!("--engine {other}: expected mma or hopper").into()),
    };
    let gemms: Vec<(&str, Which)> = args
        .gemms
        .split(',')
        .map(|g| Which::parse(g).map(|w| (g, w)))
        .collect::<Res<_>>()?;
    let gpu = Gpu::new(0)?;
    if hopper && gpu.arch() != comet_kernels::cache::Arch::SM90 {
        return Err(format!("--engine hopper needs an sm_90 GPU, not {:?}", gpu.arch()).into());
    }
    let gpu_name = gpu.name()?;
    let blas = CudaBlas::new(gpu.stream().clone())?;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64;
    let l2_bytes = 60usize << 20;
    eprintln!("GPU: {gpu_name}, {} SMs, seed {seed}", gpu.sm_count());

    // Dense ceiling: cuBLAS bf16 8192³, rotated inputs.
    let d = 8192usize;
    let da: Vec<DeviceTensor> = (0..3)
        .map(|i| filled(&gpu, DType::BF16, &[d, d], seed + 100 + i, 1.0))
        .collect::<Res<_>>()?;
    let db = filled(&gpu, DType::BF16, &[d, d], seed + 200, 1.0)?;
    let dc = DeviceTensor::alloc(&gpu, DType::BF16, &[d, d])?;
    let ms = time_ms(&gpu, args.warmup, args.iters, |i| {
        cublas_tn(
            &blas,
            d,
            d,
            d,
            da[i % 3].device_ptr(),
            db.device_ptr(),
            dc.device_ptr(),
        )
    })?;
    let dense_tflops = 2.0 * (d as f64).powi(3) / (ms * 1e-3) / 1e12;
    eprintln!("cuBLAS dense bf16 8192^3: {ms:.3} ms, {dense_tflops:.0} TFLOP/s");
    drop((da, db, dc));

    let presets: Vec<Preset> = if args.presets == "all" {
        Preset::all().to_vec()
    } else {
        args.presets
            .split(',')
            .map(|s| s.parse::<Preset>().map_err(|e| format!("{e}")))
            .collect::<Result<_, _>>()?
    };
    let tiles: Vec<(&str, TileShape)> = if args.tiles == "all" {
        TileShape::ALL.to_vec()
    } else {
        let want: Vec<&str> = args.tiles.split(',').collect();
        TileShape::ALL
            .iter()
            .copied()
            .filter(|(n, _)| want.contains(n))
            .collect()
    };
    // Hopper configurations: every named one, with and without L2 hints.
    let sm90_configs: Vec<(String, Sm90Config)> = Sm90Config::ALL
        .iter()
        .flat_map(|&(n, c)| {
            [
                (n.to_string(), c),
                (format!("{n}+hint"), Sm90Config { l2_hint: true, ..c }),
            ]
        })
        .collect();
    let mut rows_json: Vec<Value> = Vec::new();
    let mut aux_json: Vec<Value> = Vec::new();
    let mut table: Vec<String> = Vec::new();
    let mut reports: Vec<Value> = Vec::new();

    for preset in presets {
        let cfg = preset.config();
        let (h, f, e, k) = (cfg.hidden(), cfg.ffn(), cfg.experts(), cfg.top_k());
        let rows = args.tokens * k;
        // A random router: i.i.d. logits, so each token's k distinct experts are uniform.
        let mut rng = StdRng::seed_from_u64(seed ^ (h * 31 + e) as u64);
        let mut counts = vec![0usize; e];
        for _ in 0..args.tokens {
            let mut chosen: Vec<usize> = Vec::with_capacity(k);
            while chosen.len() < k {
                let c = rng.random_range(0..e);
                if !chosen.contains(&c) {
                    chosen.push(c);
                }
            }
            for c in chosen {
                counts[c] += 1;
            }
        }
        let mut offsets = vec![0i32];
        for &c in &counts {
            offsets.push(offsets.last().copied().unwrap_or(0) + c as i32);
        }
        let off = DeviceTensor::from_host(&gpu, &[e + 1], &offsets)?;
        let rot = |bytes: usize| (4 * l2_bytes).div_ceil(bytes.max(1)).clamp(2, 8);
        let x_rot = rot(rows * h * 2);
        let a_rot = rot(rows * f * 2);
        let xs: Vec<DeviceTensor> = (0..x_rot)
            .map(|i| filled(&gpu, DType::BF16, &[rows, h], seed + 10 + i as u64, 1.0))
            .collect::<Res<_>>()?;
        let acts: Vec<DeviceTensor> = (0..a_rot)
            .map(|i| filled(&gpu, DType::BF16, &[rows, f], seed + 20 + i as u64, 1.0))
            .collect::<Res<_>>()?;
        let w0 = filled(
            &gpu,
            DType::BF16,
            &[e, 2 * f, h],
            seed + 1,
            1.0 / (h as f64).sqrt(),
        )?;
        let w1 = filled(
            &gpu,
            DType::BF16,
            &[e, h, f],
            seed + 2,
            1.0 / (f as f64).sqrt(),
        )?;
        let mut out_f = DeviceTensor::alloc(&gpu, DType::BF16, &[rows, f])?;
        let mut out_h = DeviceTensor::alloc(&gpu, DType::BF16, &[rows, h])?;
        let mut dw1 = DeviceTensor::alloc(&gpu, DType::BF16, &[e, h, f])?;
        let wants = |w: Which| gemms.iter().any(|&(_, g)| g == w);
        // f32 weight gradients (zeroed once: accumulation keeps them finite) and dh rows.
        let f32_buf = |w: Which, shape: &[usize]| -> Res<DeviceTensor> {
            if wants(w) {
                Ok(DeviceTensor::zeros(&gpu, DType::F32, shape)?)
            } else {
                Ok(DeviceTensor::alloc(&gpu, DType::F32, &[1])?)
            }
        };
        let mut dw1_f32 = if wants(Which::Wgrad1F32) || wants(Which::Wgrad1Acc) {
            DeviceTensor::zeros(&gpu, DType::F32, &[e, h, f])?
        } else {
            DeviceTensor::alloc(&gpu, DType::F32, &[1])?
        };
        let mut dw0_f32 = f32_buf(Which::Wgrad0Acc, &[e, 2 * f, h])?;
        let dh = if wants(Which::Wgrad0Acc) {
            filled(&gpu, DType::BF16, &[rows, 2 * f], seed + 30, 1.0)?
        } else {
            DeviceTensor::alloc(&gpu, DType::BF16, &[1])?
        };
        eprintln!(
            "{}: rows {rows}, experts {e}, rows/expert min {} max {}, rotation x{x_rot}/a{a_rot}",
            preset.name(),
            counts.iter().min().unwrap_or(&0),
            counts.iter().max().unwrap_or(&0)
        );

        for &(g, which) in &gemms {
            // (dense m, n, k) at the same FLOPs, and the grouped launch.
            let (dm, dn, dk) = match which {
                Which::Fwd0 => (rows, 2 * f, h),
                Which::Fwd1 => (rows, h, f),
                Which::Dgrad1 => (rows, f, h),
                Which::Wgrad1 | Which::Wgrad1F32 | Which::Wgrad1Acc => (h, f, rows),
                Which::Wgrad0Acc => (2 * f, h, rows),
            };
            let flops = 2.0 * dm as f64 * dn as f64 * dk as f64;
            // cuBLAS dense, operands carved from buffers of at least the needed sizes.
            let (da_ptrs, db_ptr, dc_ptr): (Vec<u64>, u64, u64) = match which {
                Which::Fwd0 => (
                    xs.iter().map(|t| t.device_ptr()).collect(),
                    w0.device_ptr(),
                    out_f.device_ptr(),
                ),
                Which::Fwd1 => (
                    acts.iter().map(|t| t.device_ptr()).collect(),
                    w1.device_ptr(),
                    out_h.device_ptr(),
                ),
                Which::Dgrad1 => (
                    xs.iter().map(|t| t.device_ptr()).collect(),
                    w1.device_ptr(),
                    out_f.device_ptr(),
                ),
                Which::Wgrad1 => (
                    xs.iter().map(|t| t.device_ptr()).collect(),
                    acts[0].device_ptr(),
                    dw1.device_ptr(),
                ),
                Which::Wgrad1F32 | Which::Wgrad1Acc => (
                    xs.iter().map(|t| t.device_ptr()).collect(),
                    acts[0].device_ptr(),
                    dw1_f32.device_ptr(),
                ),
                Which::Wgrad0Acc => (
                    vec![dh.device_ptr()],
                    xs[0].device_ptr(),
                    dw0_f32.device_ptr(),
                ),
            };
            let cublas_ms = time_ms(&gpu, args.warmup, args.iters, |i| {
                cublas_tn_out(
                    &blas,
                    dm,
                    dn,
                    dk,
                    da_ptrs[i % da_ptrs.len()],
                    db_ptr,
                    dc_ptr,
                    which.f32_out(),
                    which.accumulate(),
                )
            })?;
            let cublas_tflops = flops / (cublas_ms * 1e-3) / 1e12;
            let (kind, epi) = (which.kind(), which.epilogue());
            // The variants: tile shapes (mma) or Hopper configurations valid for this GEMM.
            let variants: Vec<(String, Option<TileShape>, Option<Sm90Config>)> = if hopper {
                let store = Sm90Store {
                    f32_out: which.f32_out(),
                    accumulate: which.accumulate(),
                    aux: false,
                };
                let chosen = Sm90Config::choose_for(kind, epi, e, rows, store);
                sm90_configs
                    .iter()
                    .filter(|(_, c)| {
                        c.validate(kind, epi).is_ok() && c.validate_store(kind, epi, store).is_ok()
                    })
                    .map(|(n, c)| {
                        let mark = if *c == chosen { "*" } else { "" };
                        (format!("{n}{mark}"), None, Some(*c))
                    })
                    .collect()
            } else {
                tiles
                    .iter()
                    .map(|&(n, t)| (n.to_string(), Some(t), None))
                    .collect()
            };
            let mut best: Option<(String, f64)> = None;
            for (tname, tile, config) in &variants {
                let tname = tname.as_str();
                let run = |i: usize,
                           out_f: &mut DeviceTensor,
                           out_h: &mut DeviceTensor,
                           dw1: &mut DeviceTensor,
                           dw1_f32: &mut DeviceTensor,
                           dw0_f32: &mut DeviceTensor|
                 -> Res<()> {
                    let (a, b, c): (&DeviceTensor, &DeviceTensor, &mut DeviceTensor) = match which {
                        Which::Fwd0 => (&xs[i % x_rot], &w0, out_f),
                        Which::Fwd1 => (&acts[i % a_rot], &w1, out_h),
                        Which::Dgrad1 => (&xs[i % x_rot], &w1, out_f),
                        Which::Wgrad1 => (&xs[i % x_rot], &acts[i % a_rot], dw1),
                        Which::Wgrad1F32 | Which::Wgrad1Acc => {
                            (&xs[i % x_rot], &acts[i % a_rot], dw1_f32)
                        }
                        Which::Wgrad0Acc => (&dh, &xs[i % x_rot], dw0_f32),
                    };
                    if let Some(cfg) = config {
                        let g = match kind {
                            GemmKind::Forward => Sm90Gemm::forward(a, b, &off, c),
                            GemmKind::Dgrad => Sm90Gemm::dgrad(a, b, &off, c),
                            GemmKind::Wgrad => Sm90Gemm::wgrad(a, b, &off, c),
                        };
                        sm90::grouped_gemm(
                            &gpu,
                            g.epilogue(epi).accumulate(which.accumulate()).config(*cfg),
                        )?;
                    } else {
                        let ga = match kind {
                            GemmKind::Forward => GemmArgs::forward(a, b, Some(&off), c),
                            GemmKind::Dgrad => GemmArgs::dgrad(a, b, Some(&off), c),
                            GemmKind::Wgrad => GemmArgs::wgrad(a, b, Some(&off), c),
                        };
                        let ga = ga.epilogue(epi).accumulate(which.accumulate());
                        let ga = match tile {
                            Some(t) => ga.tile(*t),
                            None => ga,
                        };
                        gemm::grouped_gemm(&gpu, ga)?;
                    }
                    Ok(())
                };
                let ms = time_ms(&gpu, args.warmup, args.iters, |i| {
                    run(
                        i,
                        &mut out_f,
                        &mut out_h,
                        &mut dw1,
                        &mut dw1_f32,
                        &mut dw0_f32,
                    )
                })?;
                let tflops = flops / (ms * 1e-3) / 1e12;
                let (a_shape, b_shape, c_shape) = match which {
                    Which::Fwd0 => (vec![rows, h], vec![e, 2 * f, h], vec![rows, f]),
                    Which::Fwd1 => (vec![rows, f], vec![e, h, f], vec![rows, h]),
                    Which::Dgrad1 => (vec![rows, h], vec![e, h, f], vec![rows, f]),
                    Which::Wgrad0Acc => (vec![rows, 2 * f], vec![rows, h], vec![e, 2 * f, h]),
                    _ => (vec![rows, h], vec![rows, f], vec![e, h, f]),
                };
                let out_dtype = if which.f32_out() {
                    DType::F32
                } else {
                    DType::BF16
                };
                // Registers and spills: the mma.sync kernel's from the driver; the Hopper
                // kernel is checked at build time (ptxas / cuobjdump), reported as null.
                let rep = match tile {
                    Some(t) => Some(gemm::kernel_report(
                        &gpu,
                        &GemmDesc {
                            kind,
                            a: Meta::new(DType::BF16, &a_shape),
                            b: Meta::new(DType::BF16, &b_shape),
                            offsets: Some(Meta::new(DType::I32, &[e + 1])),
                            c: Meta::new(out_dtype, &c_shape),
                            epilogue: epi,
                            aux: None,
                            row_scale: None,
                            tile_list_len: None,
                            tile: *t,
                        },
                    )?),
                    None => None,
                };
                let (regs, spill, bps) = match rep {
                    Some(r) => (
                        json!(r.registers),
                        json!(r.local_bytes),
                        json!(r.blocks_per_sm),
                    ),
                    None => (Value::Null, Value::Null, json!(1)),
                };
                if let Some(r) = rep {
                    reports.push(json!({"gemm": g, "tile": tname, "registers": r.registers, "local_bytes": r.local_bytes, "blocks_per_sm": r.blocks_per_sm, "smem_bytes": r.smem_bytes}));
                }
                rows_json.push(json!({
                    "preset": preset.name(), "gemm": g, "engine": args.engine, "tile": tname, "rows": rows, "experts": e,
                    "out_dtype": out_dtype.name(), "accumulate": which.accumulate(),
                    "dense_mnk": [dm, dn, dk], "flops": flops, "ms": ms, "tflops": tflops,
                    "cublas_ms": cublas_ms, "cublas_tflops": cublas_tflops, "ratio_to_cublas": tflops / cublas_tflops,
                    "registers": regs, "spill_bytes": spill, "blocks_per_sm": bps,
                }));
                eprintln!(
                    "  {g:10} {tname:16} {ms:8.3} ms {tflops:6.0} TFLOP/s  (cuBLAS {cublas_tflops:4.0}, {:.0}%)  regs {regs} spill {spill}",
                    100.0 * tflops / cublas_tflops,
                );
                if best.as_ref().is_none_or(|(_, b)| tflops > *b) {
                    best = Some((tname.to_string(), tflops));
                }
            }
            if let Some((bt, bf)) = best {
                table.push(format!(
                    "| {:14} | {:10} | {:>6} | {:>5}x{:<5} | {:16} | {:7.0} | {:7.0} | {:5.0}% |",
                    preset.name(),
                    g,
                    rows,
                    dn,
                    dk,
                    bt,
                    bf,
                    cublas_tflops,
                    100.0 * bf / cublas_tflops
                ));
            }
        }
        // The other kernels of a single-GPU forward at this size (router, plan, dispatch,
        // combine), for the layer's phase budget.
        {
            let m = args.tokens;
            let x = filled(&gpu, DType::BF16, &[m, h], seed + 40, 1.0)?;
            let wr = filled(
                &gpu,
                DType::BF16,
                &[e, h],
                seed + 41,
                4.0 / (h as f64).sqrt(),
            )?;
            let mut logits = DeviceTensor::alloc(&gpu, DType::F32, &[m, e])?;
            let mut probs = DeviceTensor::alloc(&gpu, DType::F32, &[m, e])?;
            let mut ids = DeviceTensor::alloc(&gpu, DType::I32, &[m, k])?;
            let mut wts = DeviceTensor::alloc(&gpu, DType::F32, &[m, k])?;
            let mut plan = RoutingPlan::new(&gpu, m, k, e, 1, 0)?;
            let mut xr = DeviceTensor::alloc(&gpu, DType::BF16, &[rows, h])?;
            let mut y = DeviceTensor::alloc(&gpu, DType::BF16, &[m, h])?;
            let t_logits = time_ms(&gpu, args.warmup, args.iters, |_| {
                Ok(router::router_logits(&gpu, &x, &wr, &mut logits)?)
            })?;
            let t_topk = time_ms(&gpu, args.warmup, args.iters, |_| {
                Ok(router::softmax_topk(
                    &gpu,
                    &logits,
                    k,
                    cfg.renormalize(),
                    Some(&mut probs),
                    &mut ids,
                    &mut wts,
                )?)
            })?;
            let t_plan = time_ms(&gpu, args.warmup, args.iters, |_| {
                Ok(plan.build_local(&gpu, &ids)?)
            })?;
            let t_perm = time_ms(&gpu, args.warmup, args.iters, |_| {
                Ok(rows::permute_rows(
                    &gpu,
                    &x,
                    &plan.scatter_row,
                    None,
                    &mut xr,
                )?)
            })?;
            let t_comb = time_ms(&gpu, args.warmup, args.iters, |_| {
                Ok(rows::combine_rows(
                    &gpu,
                    &xr,
                    &plan.scatter_row,
                    Some(&wts),
                    &mut y,
                )?)
            })?;
            let gbs = |bytes: f64, ms: f64| bytes / (ms * 1e-3) / 1e9;
            let bytes_perm = 2.0 * (m * h + rows * h) as f64;
            eprintln!(
                "  router logits {t_logits:.3} ms, softmax+top-k {t_topk:.3} ms, plan {t_plan:.3} ms, permute {t_perm:.3} ms ({:.0} GB/s), combine {t_comb:.3} ms ({:.0} GB/s)",
                gbs(bytes_perm, t_perm),
                gbs(bytes_perm, t_comb)
            );
            aux_json.push(json!({
                "preset": preset.name(), "tokens": m, "router_logits_ms": t_logits, "softmax_topk_ms": t_topk,
                "routing_plan_ms": t_plan, "permute_ms": t_perm, "permute_gbs": gbs(bytes_perm, t_perm),
                "combine_ms": t_comb, "combine_gbs": gbs(bytes_perm, t_comb),
            }));
        }
        gpu.synchronize()?;
    }

    println!(
        "\nGrouped GEMM ({} engine, best variant) vs cuBLAS dense at equal FLOPs, {} tokens, median of {}",
        args.engine, args.tokens, args.iters
    );
    println!("cuBLAS dense 8192^3: {dense_tflops:.0} TFLOP/s on {gpu_name}");
    println!(
        "| preset         | gemm       |   rows |     N x K     | variant          | TFLOP/s | cuBLAS  | ratio  |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for line in &table {
        println!("{line}");
    }
    let doc = json!({
        "bench": format!("comet-kernels gemm_bench ({} engine)", args.engine),
        "engine": args.engine,
        "commit": args.commit,
        "date": args.date,
        "gpu": gpu_name,
        "sm_count": gpu.sm_count(),
        "tokens": args.tokens,
        "iters": args.iters,
        "warmup": args.warmup,
        "seed": seed,
        "cublas_dense_8192_tflops": dense_tflops,
        "results": rows_json,
        "other_kernels": aux_json,
        "kernels": reports,
        "table": table,
    });
    if let Some(p) = args.out {
        std::fs::write(&p, serde_json::to_string_pretty(&doc)?)?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}
