//! Grouped-GEMM benchmark: the four presets' expert GEMMs at `--tokens` tokens × top-k rows
//! spread over the experts by a random router, for every tile shape of the mma.sync engine,
//! beside cuBLAS dense bf16 at the same FLOPs (same M, N, K as one dense GEMM), in one run.
//!
//! CUDA events around each launch, warm-up, median of `--iters` (≥ 20) timed runs, activation
//! inputs rotated among several copies so L2 does not flatter (the weights exceed L2 anyway).
//! Prints a table and writes JSON (commit, GPU, date, every measurement) to `--out`.
//!
//! ```text
//! cargo run --release -p comet-kernels --example gemm_bench -- --out bench.json --commit $(git rev-parse --short HEAD)
//! ```

use std::ffi::c_void;
use std::path::PathBuf;

use clap::Parser;
use comet_core::Preset;
use comet_kernels::Gpu;
use comet_kernels::buffer::{DType, DeviceTensor};
use comet_kernels::gemm::{self, Epilogue, GemmArgs, GemmDesc, GemmKind, Meta, TileShape};
use comet_kernels::init::fill_uniform;
use comet_kernels::{router, routing::RoutingPlan, rows};
use cudarc::cublas::{CudaBlas, sys as cublas_sys};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

#[derive(Parser, Debug)]
#[command(about = "Grouped GEMM (mma.sync tile engine) vs cuBLAS dense bf16")]
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
    /// GEMMs: fwd0 (x·W0ᵀ + SwiGLU), fwd1 (a·W1ᵀ), dgrad1 (dO·W1), wgrad1 (dOᵀ·a per expert).
    #[arg(long, default_value = "fwd0,fwd1,dgrad1,wgrad1")]
    gemms: String,
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
    let (alpha, beta) = (1.0f32, 0.0f32);
    // SAFETY: a, b, c are device allocations holding at least m·k, n·k and m·n bf16 elements
    // (checked by the callers); the handle's stream is the benchmark stream.
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
            cublas_sys::cudaDataType_t::CUDA_R_16BF,
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
    let gpu = Gpu::new(0)?;
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
    let gemms: Vec<&str> = args.gemms.split(',').collect();
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
        eprintln!(
            "{}: rows {rows}, experts {e}, rows/expert min {} max {}, rotation x{x_rot}/a{a_rot}",
            preset.name(),
            counts.iter().min().unwrap_or(&0),
            counts.iter().max().unwrap_or(&0)
        );

        for &g in &gemms {
            // (dense m, n, k) at the same FLOPs, and the grouped launch.
            let (dm, dn, dk) = match g {
                "fwd0" => (rows, 2 * f, h),
                "fwd1" | "dgrad1" => (
                    rows,
                    if g == "fwd1" { h } else { f },
                    if g == "fwd1" { f } else { h },
                ),
                "wgrad1" => (h, f, rows),
                other => return Err(format!("unknown GEMM {other}").into()),
            };
            let flops = 2.0 * dm as f64 * dn as f64 * dk as f64;
            // cuBLAS dense, operands carved from buffers of at least the needed sizes.
            let (da_ptrs, db_ptr, dc_ptr): (Vec<u64>, u64, u64) = match g {
                "fwd0" => (
                    xs.iter().map(|t| t.device_ptr()).collect(),
                    w0.device_ptr(),
                    out_f.device_ptr(),
                ),
                "fwd1" => (
                    acts.iter().map(|t| t.device_ptr()).collect(),
                    w1.device_ptr(),
                    out_h.device_ptr(),
                ),
                "dgrad1" => (
                    xs.iter().map(|t| t.device_ptr()).collect(),
                    w1.device_ptr(),
                    out_f.device_ptr(),
                ),
                _ => (
                    xs.iter().map(|t| t.device_ptr()).collect(),
                    acts[0].device_ptr(),
                    dw1.device_ptr(),
                ),
            };
            let cublas_ms = time_ms(&gpu, args.warmup, args.iters, |i| {
                cublas_tn(
                    &blas,
                    dm,
                    dn,
                    dk,
                    da_ptrs[i % da_ptrs.len()],
                    db_ptr,
                    dc_ptr,
                )
            })?;
            let cublas_tflops = flops / (cublas_ms * 1e-3) / 1e12;
            let mut best: Option<(String, f64)> = None;
            for &(tname, tile) in &tiles {
                let ms = match g {
                    "fwd0" => time_ms(&gpu, args.warmup, args.iters, |i| {
                        Ok(gemm::grouped_gemm(
                            &gpu,
                            GemmArgs::forward(&xs[i % x_rot], &w0, Some(&off), &mut out_f)
                                .epilogue(Epilogue::SwiGlu)
                                .tile(tile),
                        )?)
                    })?,
                    "fwd1" => time_ms(&gpu, args.warmup, args.iters, |i| {
                        Ok(gemm::grouped_gemm(
                            &gpu,
                            GemmArgs::forward(&acts[i % a_rot], &w1, Some(&off), &mut out_h)
                                .tile(tile),
                        )?)
                    })?,
                    "dgrad1" => time_ms(&gpu, args.warmup, args.iters, |i| {
                        Ok(gemm::grouped_gemm(
                            &gpu,
                            GemmArgs::dgrad(&xs[i % x_rot], &w1, Some(&off), &mut out_f).tile(tile),
                        )?)
                    })?,
                    _ => time_ms(&gpu, args.warmup, args.iters, |i| {
                        Ok(gemm::grouped_gemm(
                            &gpu,
                            GemmArgs::wgrad(&xs[i % x_rot], &acts[i % a_rot], Some(&off), &mut dw1)
                                .tile(tile),
                        )?)
                    })?,
                };
                let tflops = flops / (ms * 1e-3) / 1e12;
                let (kind, epi, a_shape, b_shape, c_shape) = match g {
                    "fwd0" => (
                        GemmKind::Forward,
                        Epilogue::SwiGlu,
                        vec![rows, h],
                        vec![e, 2 * f, h],
                        vec![rows, f],
                    ),
                    "fwd1" => (
                        GemmKind::Forward,
                        Epilogue::None,
                        vec![rows, f],
                        vec![e, h, f],
                        vec![rows, h],
                    ),
                    "dgrad1" => (
                        GemmKind::Dgrad,
                        Epilogue::None,
                        vec![rows, h],
                        vec![e, h, f],
                        vec![rows, f],
                    ),
                    _ => (
                        GemmKind::Wgrad,
                        Epilogue::None,
                        vec![rows, h],
                        vec![rows, f],
                        vec![e, h, f],
                    ),
                };
                let desc = GemmDesc {
                    kind,
                    a: Meta::new(DType::BF16, &a_shape),
                    b: Meta::new(DType::BF16, &b_shape),
                    offsets: Some(Meta::new(DType::I32, &[e + 1])),
                    c: Meta::new(DType::BF16, &c_shape),
                    epilogue: epi,
                    aux: None,
                    row_scale: None,
                    tile_list_len: None,
                    tile,
                };
                let rep = gemm::kernel_report(&gpu, &desc)?;
                reports.push(json!({"gemm": g, "tile": tname, "registers": rep.registers, "local_bytes": rep.local_bytes, "blocks_per_sm": rep.blocks_per_sm, "smem_bytes": rep.smem_bytes}));
                rows_json.push(json!({
                    "preset": preset.name(), "gemm": g, "tile": tname, "rows": rows, "experts": e,
                    "dense_mnk": [dm, dn, dk], "flops": flops, "ms": ms, "tflops": tflops,
                    "cublas_ms": cublas_ms, "cublas_tflops": cublas_tflops, "ratio_to_cublas": tflops / cublas_tflops,
                    "registers": rep.registers, "spill_bytes": rep.local_bytes, "blocks_per_sm": rep.blocks_per_sm,
                }));
                eprintln!(
                    "  {g:7} {tname:12} {ms:8.3} ms {tflops:6.0} TFLOP/s  (cuBLAS {cublas_tflops:4.0}, {:.0}%)  regs {} spill {} blocks/SM {}",
                    100.0 * tflops / cublas_tflops,
                    rep.registers,
                    rep.local_bytes,
                    rep.blocks_per_sm
                );
                if best.as_ref().is_none_or(|(_, b)| tflops > *b) {
                    best = Some((tname.to_string(), tflops));
                }
            }
            if let Some((bt, bf)) = best {
                table.push(format!(
                    "| {:14} | {:6} | {:>6} | {:>5}x{:<5} | {:12} | {:7.0} | {:7.0} | {:5.0}% |",
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
        "\nGrouped GEMM (best tile) vs cuBLAS dense bf16 at equal FLOPs, {} tokens, median of {}",
        args.tokens, args.iters
    );
    println!("cuBLAS dense 8192^3: {dense_tflops:.0} TFLOP/s on {gpu_name}");
    println!(
        "| preset         | gemm   |   rows |     N x K     | tile         | TFLOP/s | cuBLAS  | ratio  |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for line in &table {
        println!("{line}");
    }
    let doc = json!({
        "bench": "comet-kernels gemm_bench (mma.sync tile engine)",
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
