//! GPU tests of the grouped GEMM (tile engine): every operand layout, epilogue and tile shape
//! against f64 host references on fresh random inputs, outputs poisoned before each run.

#![allow(clippy::too_many_arguments, clippy::needless_range_loop)]

mod common;

use comet_kernels::DeviceTensor;
use comet_kernels::buffer::DType;
use comet_kernels::gemm::{Engine, Epilogue, GemmArgs, TileList, TileShape, grouped_gemm};
use common::*;
use ndarray::s;

const TOL: f64 = 1e-2;

#[derive(Clone, Copy)]
struct FwdOpts {
    epi: Epilogue,
    aux: bool,
    row_scale: bool,
    accumulate: bool,
    f32_out: bool,
    tile: Option<TileShape>,
    pad_rows: usize,
    engine: Engine,
}

impl Default for FwdOpts {
    fn default() -> Self {
        FwdOpts {
            epi: Epilogue::None,
            aux: false,
            row_scale: false,
            accumulate: false,
            f32_out: false,
            tile: None,
            pad_rows: 5,
            engine: Engine::Auto,
        }
    }
}

/// Forward grouped GEMM `C = A · W_gᵀ` with `counts[g]` rows per group; rows past the last
/// offset (padding) must stay untouched.
fn check_forward(dtype: DType, counts: &[usize], n: usize, k: usize, o: FwdOpts, tag: &str) {
    let gpu = gpu();
    let seed = fresh_seed(tag);
    let g = counts.len();
    let rows: usize = counts.iter().sum();
    let cap = rows + o.pad_rows;
    let a = random_vec(cap * k, 1.0, dtype, seed);
    let w = random_vec(g * n * k, 1.0 / (k as f32).sqrt(), dtype, seed + 1);
    let out_cols = if o.epi == Epilogue::SwiGlu { n / 2 } else { n };
    let out_dtype = if o.f32_out { DType::F32 } else { dtype };
    let scale: Vec<f32> = random_vec(cap, 1.0, DType::F32, seed + 2);
    let c0: Vec<f32> = random_vec(cap * out_cols, 1.0, out_dtype, seed + 3);

    let a_d = upload(&gpu, dtype, &[cap, k], &a);
    let w_d = upload(&gpu, dtype, &[g, n, k], &w);
    let off_d = upload_i32(&gpu, &[g + 1], &offsets_of(counts));
    let scale_d = upload(&gpu, DType::F32, &[cap], &scale);
    let mut c_d = if o.accumulate {
        upload(&gpu, out_dtype, &[cap, out_cols], &c0)
    } else {
        poisoned(&gpu, out_dtype, &[cap, out_cols])
    };
    let mut aux_d = poisoned(&gpu, dtype, &[cap, n]);
    {
        let mut args = GemmArgs::forward(&a_d, &w_d, Some(&off_d), &mut c_d)
            .epilogue(o.epi)
            .accumulate(o.accumulate)
            .engine(o.engine);
        if o.aux {
            args = args.aux(&mut aux_d);
        }
        if o.row_scale {
            args = args.row_scale(&scale_d);
        }
        if let Some(t) = o.tile {
            args = args.tile(t);
        }
        grouped_gemm(&gpu, args).expect("grouped_gemm forward");
    }
    let c = download(&gpu, &c_d);
    let aux = download(&gpu, &aux_d);

    // Reference.
    let a64 = arr(&a, cap, k);
    let mut want_c = Vec::with_capacity(rows * out_cols);
    let mut want_h = Vec::with_capacity(rows * n);
    let mut r0 = 0;
    for (gi, &cnt) in counts.iter().enumerate() {
        let wg = arr(&w[gi * n * k..(gi + 1) * n * k], n, k);
        let h = matmul_nt(a64.slice(s![r0..r0 + cnt, ..]), wg.view());
        for r in 0..cnt {
            let row = r0 + r;
            for c in 0..n {
                want_h.push(h[[r, c]]);
            }
            for c in 0..out_cols {
                let mut v = match o.epi {
                    Epilogue::None => h[[r, c]],
                    Epilogue::Gelu => comet_core::reference::gelu(h[[r, c]]),
                    Epilogue::SwiGlu => silu(h[[r, c]]) * h[[r, n / 2 + c]],
                };
                if o.row_scale {
                    v *= f64::from(scale[row]);
                }
                if o.accumulate {
                    v += f64::from(c0[row * out_cols + c]);
                }
                want_c.push(v);
            }
        }
        r0 += cnt;
    }
    check_close(&format!("{tag}: C"), &c[..rows * out_cols], &want_c, TOL);
    if o.accumulate {
        // Padding rows keep their initial values.
        assert_eq!(
            &c[rows * out_cols..],
            &c0[rows * out_cols..],
            "{tag}: padding rows changed"
        );
    } else {
        check_untouched(&format!("{tag}: C padding rows"), &c[rows * out_cols..]);
    }
    if o.aux {
        check_close(
            &format!("{tag}: pre-activation"),
            &aux[..rows * n],
            &want_h,
            TOL,
        );
        check_untouched(&format!("{tag}: aux padding rows"), &aux[rows * n..]);
    } else {
        check_untouched(&format!("{tag}: aux not requested"), &aux);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn forward_edge_rows_and_sizes() {
    // Empty experts, 1 row, rows around the tile size, K and N not multiples of 64.
    let counts = [0, 1, 127, 128, 129, 0, 300, 5];
    check_forward(
        DType::BF16,
        &counts,
        1408,
        2560,
        FwdOpts::default(),
        "fwd 1408x2560",
    );
    check_forward(
        DType::BF16,
        &[33, 0, 190],
        2560,
        1408,
        FwdOpts::default(),
        "fwd 2560x1408",
    );
    check_forward(
        DType::BF16,
        &[70, 200],
        6400,
        7168,
        FwdOpts {
            pad_rows: 0,
            ..Default::default()
        },
        "fwd 6400x7168",
    );
    check_forward(
        DType::BF16,
        &[0, 0, 150],
        7168,
        6400,
        FwdOpts::default(),
        "fwd 7168x6400",
    );
    check_forward(
        DType::BF16,
        &[17, 9],
        72,
        8,
        FwdOpts::default(),
        "fwd tiny N=72 K=8",
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn forward_epilogues() {
    let counts = [100, 0, 257, 3];
    let swiglu = FwdOpts {
        epi: Epilogue::SwiGlu,
        aux: true,
        ..Default::default()
    };
    check_forward(
        DType::BF16,
        &counts,
        2 * 1408,
        2048,
        swiglu,
        "swiglu F=1408 +aux",
    );
    check_forward(
        DType::BF16,
        &counts,
        2 * 2560,
        1408,
        FwdOpts {
            row_scale: true,
            ..swiglu
        },
        "swiglu F=2560 +aux +scale",
    );
    check_forward(
        DType::BF16,
        &counts,
        2 * 100,
        512,
        FwdOpts {
            epi: Epilogue::SwiGlu,
            ..Default::default()
        },
        "swiglu F=100 (scalar tail)",
    );
    let gelu = FwdOpts {
        epi: Epilogue::Gelu,
        aux: true,
        ..Default::default()
    };
    check_forward(DType::BF16, &counts, 6400, 1024, gelu, "gelu N=6400 +aux");
    check_forward(
        DType::BF16,
        &counts,
        1408,
        512,
        FwdOpts {
            row_scale: true,
            accumulate: true,
            ..Default::default()
        },
        "scale+accumulate",
    );
    check_forward(
        DType::BF16,
        &counts,
        100,
        512,
        FwdOpts {
            f32_out: true,
            accumulate: true,
            ..Default::default()
        },
        "f32 out, N=100 accumulate",
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn forward_every_tile_shape() {
    let counts = [1, 200, 0, 450, 64];
    for (name, t) in TileShape::ALL {
        check_forward(
            DType::BF16,
            &counts,
            2 * 1408,
            2048,
            FwdOpts {
                epi: Epilogue::SwiGlu,
                tile: Some(t),
                ..Default::default()
            },
            &format!("tile {name} swiglu"),
        );
        check_forward(
            DType::BF16,
            &counts,
            2048,
            1408,
            FwdOpts {
                tile: Some(t),
                ..Default::default()
            },
            &format!("tile {name} plain"),
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn forward_f16() {
    check_forward(
        DType::F16,
        &[10, 300, 0, 77],
        2 * 640,
        1408,
        FwdOpts {
            epi: Epilogue::SwiGlu,
            aux: true,
            ..Default::default()
        },
        "f16 swiglu",
    );
    check_forward(
        DType::F16,
        &[129, 5],
        2560,
        512,
        FwdOpts {
            epi: Epilogue::Gelu,
            ..Default::default()
        },
        "f16 gelu",
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn forward_all_rows_one_group_of_256() {
    let mut counts = vec![0usize; 256];
    counts[137] = 600;
    check_forward(
        DType::BF16,
        &counts,
        2 * 128,
        1408,
        FwdOpts {
            epi: Epilogue::SwiGlu,
            ..Default::default()
        },
        "256 groups, one full",
    );
    let seed = fresh_seed("256 random groups");
    let ids = random_ids(300, 1, 256, seed);
    let mut counts = vec![0usize; 256];
    for &e in &ids {
        counts[e as usize] += 1;
    }
    check_forward(
        DType::BF16,
        &counts,
        512,
        1408,
        FwdOpts::default(),
        "256 random groups",
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn forward_single_group_without_offsets() {
    // The router's form: x [M, H] · wr [E, H]ᵀ -> f32 logits, one group, no offsets tensor.
    let gpu = gpu();
    let seed = fresh_seed("no offsets");
    let (m, e, h) = (333, 256, 1408);
    let x = random_vec(m * h, 1.0, DType::BF16, seed);
    let w = random_vec(e * h, 0.05, DType::BF16, seed + 1);
    let x_d = upload(&gpu, DType::BF16, &[m, h], &x);
    let w_d = upload(&gpu, DType::BF16, &[e, h], &w);
    let mut c_d = poisoned(&gpu, DType::F32, &[m, e]);
    grouped_gemm(&gpu, GemmArgs::forward(&x_d, &w_d, None, &mut c_d)).unwrap();
    let want = matmul_nt(arr(&x, m, h).view(), arr(&w, e, h).view());
    check_close(
        "router-shaped GEMM",
        &download(&gpu, &c_d),
        want.as_slice().unwrap(),
        1e-5,
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn forward_explicit_tile_list() {
    // A reversed tile order with one bogus entry gives the same result as the default order.
    let gpu = gpu();
    let seed = fresh_seed("tile list");
    let counts = [130usize, 0, 64];
    let (n, k) = (384, 512);
    let rows: usize = counts.iter().sum();
    let a = random_vec(rows * k, 1.0, DType::BF16, seed);
    let w = random_vec(3 * n * k, 0.05, DType::BF16, seed + 1);
    let a_d = upload(&gpu, DType::BF16, &[rows, k], &a);
    let w_d = upload(&gpu, DType::BF16, &[3, n, k], &w);
    let off_d = upload_i32(&gpu, &[4], &offsets_of(&counts));
    let t = TileShape::T128X128;
    let mut tiles: Vec<i32> = Vec::new();
    for nt in 0..3 {
        for mt in 0..2 {
            tiles.extend([0, mt, nt, 0]);
        }
        tiles.extend([2, 0, nt, 0]);
    }
    tiles.extend([1, 0, 0, 0]); // group 1 has no rows: skipped
    tiles.extend([9, 0, 0, 0]); // no such group: skipped
    let n_tiles = tiles.len() / 4;
    let mut rev: Vec<i32> = Vec::new();
    for i in (0..n_tiles).rev() {
        rev.extend_from_slice(&tiles[i * 4..i * 4 + 4]);
    }
    let list_d = upload_i32(&gpu, &[n_tiles, 4], &rev);
    let count_d = upload_i32(&gpu, &[1], &[n_tiles as i32]);
    let mut c_d = poisoned(&gpu, DType::BF16, &[rows, n]);
    grouped_gemm(
        &gpu,
        GemmArgs::forward(&a_d, &w_d, Some(&off_d), &mut c_d)
            .tile(t)
            .tile_list(TileList {
                tiles: &list_d,
                count: &count_d,
            }),
    )
    .unwrap();
    let c = download(&gpu, &c_d);
    let a64 = arr(&a, rows, k);
    let mut want = Vec::new();
    let mut r0 = 0;
    for (g, &cnt) in counts.iter().enumerate() {
        let h = matmul_nt(
            a64.slice(s![r0..r0 + cnt, ..]),
            arr(&w[g * n * k..(g + 1) * n * k], n, k).view(),
        );
        want.extend(h.iter().copied());
        r0 += cnt;
    }
    check_close("tile list", &c, &want, TOL);
}

/// Dgrad: `C[rows, K] = A[rows, N] · W_g[N, K]`.
fn check_dgrad(
    dtype: DType,
    counts: &[usize],
    n: usize,
    k: usize,
    scale: bool,
    accumulate: bool,
    tile: Option<TileShape>,
    tag: &str,
) {
    let gpu = gpu();
    let seed = fresh_seed(tag);
    let g = counts.len();
    let rows: usize = counts.iter().sum();
    let cap = rows + 3;
    let a = random_vec(cap * n, 1.0, dtype, seed);
    let w = random_vec(g * n * k, 1.0 / (n as f32).sqrt(), dtype, seed + 1);
    let sc = random_vec(cap, 1.0, DType::F32, seed + 2);
    let c0 = random_vec(cap * k, 1.0, dtype, seed + 3);
    let a_d = upload(&gpu, dtype, &[cap, n], &a);
    let w_d = upload(&gpu, dtype, &[g, n, k], &w);
    let off_d = upload_i32(&gpu, &[g + 1], &offsets_of(counts));
    let sc_d = upload(&gpu, DType::F32, &[cap], &sc);
    let mut c_d = if accumulate {
        upload(&gpu, dtype, &[cap, k], &c0)
    } else {
        poisoned(&gpu, dtype, &[cap, k])
    };
    let mut args = GemmArgs::dgrad(&a_d, &w_d, Some(&off_d), &mut c_d).accumulate(accumulate);
    if scale {
        args = args.row_scale(&sc_d);
    }
    if let Some(t) = tile {
        args = args.tile(t);
    }
    grouped_gemm(&gpu, args).expect("dgrad");
    let c = download(&gpu, &c_d);
    let a64 = arr(&a, cap, n);
    let mut want = Vec::new();
    let mut r0 = 0;
    for (gi, &cnt) in counts.iter().enumerate() {
        let wg = arr(&w[gi * n * k..(gi + 1) * n * k], n, k);
        let d = a64.slice(s![r0..r0 + cnt, ..]).dot(&wg);
        for r in 0..cnt {
            for c in 0..k {
                let mut v = d[[r, c]];
                if scale {
                    v *= f64::from(sc[r0 + r]);
                }
                if accumulate {
                    v += f64::from(c0[(r0 + r) * k + c]);
                }
                want.push(v);
            }
        }
        r0 += cnt;
    }
    check_close(&format!("{tag}: dgrad"), &c[..rows * k], &want, TOL);
    if !accumulate {
        check_untouched(&format!("{tag}: dgrad padding"), &c[rows * k..]);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn dgrad_layouts() {
    check_dgrad(
        DType::BF16,
        &[0, 1, 127, 129, 300],
        2816,
        2048,
        false,
        false,
        None,
        "dgrad N=2816 K=2048",
    );
    check_dgrad(
        DType::BF16,
        &[64, 0, 200],
        1408,
        7168,
        true,
        false,
        None,
        "dgrad N=1408 K=7168 +scale",
    );
    check_dgrad(
        DType::BF16,
        &[50, 50],
        6400,
        2560,
        false,
        true,
        None,
        "dgrad accumulate",
    );
    check_dgrad(
        DType::F16,
        &[77, 3],
        640,
        1408,
        false,
        false,
        None,
        "dgrad f16",
    );
    for (name, t) in TileShape::ALL {
        check_dgrad(
            DType::BF16,
            &[100, 0, 257],
            1024,
            1408,
            false,
            false,
            Some(t),
            &format!("dgrad tile {name}"),
        );
    }
}

/// Wgrad: `dW_g[N, K] = Σ_{r in g} A[r, N]ᵀ B[r, K]`.
fn check_wgrad(
    dtype: DType,
    out: DType,
    counts: &[usize],
    n: usize,
    k: usize,
    accumulate: bool,
    tile: Option<TileShape>,
    tag: &str,
) {
    check_wgrad_on(
        Engine::Auto,
        dtype,
        out,
        counts,
        n,
        k,
        accumulate,
        tile,
        tag,
    );
}

/// [`check_wgrad`] on a chosen engine.
fn check_wgrad_on(
    engine: Engine,
    dtype: DType,
    out: DType,
    counts: &[usize],
    n: usize,
    k: usize,
    accumulate: bool,
    tile: Option<TileShape>,
    tag: &str,
) {
    let gpu = gpu();
    let seed = fresh_seed(tag);
    let g = counts.len();
    let rows: usize = counts.iter().sum();
    let cap = rows + 7;
    let a = random_vec(cap * n, 1.0, dtype, seed);
    let b = random_vec(cap * k, 1.0, dtype, seed + 1);
    let c0 = random_vec(g * n * k, 1.0, out, seed + 2);
    let a_d = upload(&gpu, dtype, &[cap, n], &a);
    let b_d = upload(&gpu, dtype, &[cap, k], &b);
    let off_d = upload_i32(&gpu, &[g + 1], &offsets_of(counts));
    let mut c_d = if accumulate {
        upload(&gpu, out, &[g, n, k], &c0)
    } else {
        poisoned(&gpu, out, &[g, n, k])
    };
    let mut args = GemmArgs::wgrad(&a_d, &b_d, Some(&off_d), &mut c_d)
        .accumulate(accumulate)
        .engine(engine);
    if let Some(t) = tile {
        args = args.tile(t);
    }
    grouped_gemm(&gpu, args).expect("wgrad");
    let c = download(&gpu, &c_d);
    let (a64, b64) = (arr(&a, cap, n), arr(&b, cap, k));
    let mut want = Vec::with_capacity(g * n * k);
    let mut r0 = 0;
    for (gi, &cnt) in counts.iter().enumerate() {
        let d = a64
            .slice(s![r0..r0 + cnt, ..])
            .t()
            .dot(&b64.slice(s![r0..r0 + cnt, ..]));
        for i in 0..n {
            for j in 0..k {
                let mut v = d[[i, j]];
                if accumulate {
                    v += f64::from(c0[gi * n * k + i * k + j]);
                }
                want.push(v);
            }
        }
        r0 += cnt;
    }
    check_close(&format!("{tag}: wgrad"), &c, &want, TOL);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn wgrad_layouts() {
    check_wgrad(
        DType::BF16,
        DType::F32,
        &[0, 1, 63, 64, 65, 300],
        512,
        1408,
        false,
        None,
        "wgrad f32 out, empty group",
    );
    check_wgrad(
        DType::BF16,
        DType::BF16,
        &[129, 0, 40],
        1408,
        2560,
        false,
        None,
        "wgrad bf16 out",
    );
    check_wgrad(
        DType::BF16,
        DType::F32,
        &[90, 200],
        2048,
        7168,
        true,
        None,
        "wgrad accumulate",
    );
    check_wgrad(
        DType::F16,
        DType::F32,
        &[33, 2],
        6400,
        512,
        false,
        None,
        "wgrad f16",
    );
    for (name, t) in TileShape::ALL {
        check_wgrad(
            DType::BF16,
            DType::F32,
            &[100, 0, 257],
            1024,
            640,
            false,
            Some(t),
            &format!("wgrad tile {name}"),
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn bad_device_offsets_stay_in_bounds() {
    // Offsets beyond the row capacity are clamped on the device: no fault, valid rows right.
    let gpu = gpu();
    let seed = fresh_seed("bad offsets");
    let (cap, n, k) = (100usize, 128, 64);
    let a = random_vec(cap * k, 1.0, DType::BF16, seed);
    let w = random_vec(2 * n * k, 0.1, DType::BF16, seed + 1);
    let a_d = upload(&gpu, DType::BF16, &[cap, k], &a);
    let w_d = upload(&gpu, DType::BF16, &[2, n, k], &w);
    let off_d = upload_i32(&gpu, &[3], &[0, 60, 100_000]);
    let mut c_d = poisoned(&gpu, DType::BF16, &[cap, n]);
    grouped_gemm(&gpu, GemmArgs::forward(&a_d, &w_d, Some(&off_d), &mut c_d)).unwrap();
    let c = download(&gpu, &c_d);
    let a64 = arr(&a, cap, k);
    let mut want = matmul_nt(a64.slice(s![0..60, ..]), arr(&w[..n * k], n, k).view())
        .into_raw_vec_and_offset()
        .0;
    want.extend(
        matmul_nt(a64.slice(s![60..100, ..]), arr(&w[n * k..], n, k).view())
            .iter()
            .copied(),
    );
    check_close("clamped offsets", &c, &want, TOL);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn shape_errors_before_launch() {
    let gpu = gpu();
    let a = DeviceTensor::alloc(&gpu, DType::BF16, &[10, 100]).unwrap();
    let w = DeviceTensor::alloc(&gpu, DType::BF16, &[2, 64, 100]).unwrap();
    let off = DeviceTensor::alloc(&gpu, DType::I32, &[3]).unwrap();
    let mut c = DeviceTensor::alloc(&gpu, DType::BF16, &[10, 64]).unwrap();
    let err = grouped_gemm(&gpu, GemmArgs::forward(&a, &w, Some(&off), &mut c)).unwrap_err();
    assert!(
        matches!(err, comet_kernels::Error::Alignment { value: 100, .. }),
        "{err}"
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn small_layouts_for_sanitizers() {
    // Tiny problems of every layout and tile shape (quick under compute-sanitizer memcheck and
    // racecheck): partial tiles everywhere, an empty group, K = 72 and N = 136 (not multiples
    // of 64).
    for (name, t) in TileShape::ALL {
        let swiglu = FwdOpts {
            epi: Epilogue::SwiGlu,
            aux: true,
            row_scale: true,
            tile: Some(t),
            ..Default::default()
        };
        check_forward(
            DType::BF16,
            &[0, 3, 130],
            2 * 72,
            72,
            swiglu,
            &format!("small fwd swiglu {name}"),
        );
        check_forward(
            DType::BF16,
            &[9, 0],
            136,
            72,
            FwdOpts {
                f32_out: true,
                accumulate: true,
                tile: Some(t),
                ..Default::default()
            },
            &format!("small fwd f32 {name}"),
        );
        check_dgrad(
            DType::BF16,
            &[5, 0, 70],
            72,
            136,
            true,
            false,
            Some(t),
            &format!("small dgrad {name}"),
        );
        check_wgrad(
            DType::BF16,
            DType::F32,
            &[0, 40, 67],
            64,
            72,
            false,
            Some(t),
            &format!("small wgrad {name}"),
        );
    }
}

/// A grid capped at `max_blocks` blocks computes the same output, bit for bit, as the full
/// grid (the schedule is persistent: fewer blocks walk more tiles each, every tile reduces in
/// the same order), on the portable engine and on `Engine::Auto` (the Hopper engine on
/// sm_90, through `within_ctas`: odd caps and caps below one cluster); `max_blocks(0)` is an
/// error before any launch. The uncapped forward is also checked against an f64 reference.
#[test]
#[ignore = "needs a CUDA GPU"]
fn capped_grid_matches_the_full_grid() {
    use comet_kernels::gemm::Engine;
    let gpu = gpu();
    let seed = fresh_seed("capped grid");
    let counts = [0usize, 1, 130, 64, 257, 40];
    let (g, rows) = (counts.len(), counts.iter().sum::<usize>());
    let cap = rows + 9;
    let (n, k) = (264usize, 200usize);
    let a = random_vec(cap * k, 1.0, DType::BF16, seed);
    let w = random_vec(g * n * k, 1.0 / (k as f32).sqrt(), DType::BF16, seed + 1);
    let dy = random_vec(cap * n, 1.0, DType::BF16, seed + 2);
    let c0 = random_vec(g * n * k, 1.0, DType::F32, seed + 3);
    let a_d = upload(&gpu, DType::BF16, &[cap, k], &a);
    let w_d = upload(&gpu, DType::BF16, &[g, n, k], &w);
    let dy_d = upload(&gpu, DType::BF16, &[cap, n], &dy);
    let off_d = upload_i32(&gpu, &[g + 1], &offsets_of(&counts));
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();

    // Output bits of one GEMM: 0 = forward, 1 = dgrad, 2 = wgrad (f32, accumulate).
    let run = |which: usize, engine: Engine, max_blocks: Option<usize>| -> Vec<f32> {
        let mut c_d = match which {
            0 => poisoned(&gpu, DType::BF16, &[cap, n]),
            1 => poisoned(&gpu, DType::BF16, &[cap, k]),
            _ => upload(&gpu, DType::F32, &[g, n, k], &c0),
        };
        let args = match which {
            0 => GemmArgs::forward(&a_d, &w_d, Some(&off_d), &mut c_d),
            1 => GemmArgs::dgrad(&dy_d, &w_d, Some(&off_d), &mut c_d),
            _ => GemmArgs::wgrad(&dy_d, &a_d, Some(&off_d), &mut c_d).accumulate(true),
        }
        .engine(engine);
        let args = match max_blocks {
            Some(m) => args.max_blocks(m),
            None => args,
        };
        grouped_gemm(&gpu, args).expect("grouped_gemm");
        download(&gpu, &c_d)
    };

    for engine in [Engine::Portable, Engine::Auto] {
        for which in 0..3 {
            let full = run(which, engine, None);
            let valid = if which == 2 {
                g * n * k
            } else {
                rows * full.len() / cap
            };
            assert!(
                full[..valid].iter().all(|v| v.is_finite()),
                "{engine:?} GEMM {which}: non-finite output of the full grid"
            );
            if which == 0 {
                let a64 = arr(&a, cap, k);
                let mut want = Vec::with_capacity(rows * n);
                let mut r0 = 0;
                for (gi, &cnt) in counts.iter().enumerate() {
                    let wg = arr(&w[gi * n * k..(gi + 1) * n * k], n, k);
                    want.extend(matmul_nt(a64.slice(s![r0..r0 + cnt, ..]), wg.view()).iter());
                    r0 += cnt;
                }
                check_close("capped grid: full-grid forward", &full[..valid], &want, TOL);
            }
            for m in [1usize, 2, 3, 13] {
                let capped = run(which, engine, Some(m));
                assert!(
                    bits(&capped) == bits(&full),
                    "{engine:?} GEMM {which}: max_blocks {m} differs from the full grid"
                );
            }
        }
    }
    let mut c_d = poisoned(&gpu, DType::BF16, &[cap, n]);
    let err = grouped_gemm(
        &gpu,
        GemmArgs::forward(&a_d, &w_d, Some(&off_d), &mut c_d).max_blocks(0),
    )
    .unwrap_err();
    assert!(
        matches!(err, comet_kernels::Error::Limit { value: 0, .. }),
        "{err}"
    );
}

/// `Engine::Hopper`: the Hopper engine with the options `Engine::Auto` keeps on the portable
/// engine (f32 wgrad with and without accumulation, f32 forward accumulate, the fused
/// SwiGLU/GeLU with its pre-activation output, row scale, a block cap), each against the f64
/// reference; and its refusals (explicit tile shape, no offsets, accumulation into bf16, a
/// non-sm_90 device) are errors, never a silent fallback.
#[test]
#[ignore = "needs a CUDA GPU"]
fn explicit_hopper_engine() {
    let gpu = gpu();
    let hop = Engine::Hopper;
    let (a_d, w_d) = (
        upload(&gpu, DType::BF16, &[40, 64], &vec![0.5; 40 * 64]),
        upload(&gpu, DType::BF16, &[2, 64, 64], &vec![0.5; 2 * 64 * 64]),
    );
    let off_d = upload_i32(&gpu, &[3], &[0, 10, 40]);
    let mut c_d = poisoned(&gpu, DType::BF16, &[40, 64]);
    if gpu.arch() != comet_kernels::cache::Arch::SM90 {
        let e = grouped_gemm(
            &gpu,
            GemmArgs::forward(&a_d, &w_d, Some(&off_d), &mut c_d).engine(hop),
        )
        .unwrap_err();
        assert!(e.to_string().contains("compute capability"), "{e}");
        eprintln!("not sm_90: only the refusal is checked");
        return;
    }
    for (what, err) in [
        (
            "tile shape",
            grouped_gemm(
                &gpu,
                GemmArgs::forward(&a_d, &w_d, Some(&off_d), &mut c_d)
                    .tile(TileShape::T128X128)
                    .engine(hop),
            ),
        ),
        (
            "no offsets",
            grouped_gemm(
                &gpu,
                GemmArgs::forward(&a_d, &w_d, None, &mut c_d).engine(hop),
            ),
        ),
        (
            "bf16 accumulate",
            grouped_gemm(
                &gpu,
                GemmArgs::forward(&a_d, &w_d, Some(&off_d), &mut c_d)
                    .accumulate(true)
                    .engine(hop),
            ),
        ),
    ] {
        let e = err.expect_err(what);
        assert!(
            matches!(
                e,
                comet_kernels::Error::Invalid(_) | comet_kernels::Error::DType { .. }
            ),
            "{what}: {e}"
        );
    }
    check_untouched("refused launches", &download(&gpu, &c_d));

    for (acc, tag) in [(false, "hopper wgrad f32"), (true, "hopper wgrad f32 +=")] {
        check_wgrad_on(
            hop,
            DType::BF16,
            DType::F32,
            &[0, 40, 67, 200, 0],
            136,
            264,
            acc,
            None,
            tag,
        );
    }
    check_wgrad_on(
        hop,
        DType::F16,
        DType::F32,
        &[64, 0, 129],
        64,
        72,
        true,
        None,
        "hopper wgrad f16 in, f32 +=",
    );
    let f32_acc = FwdOpts {
        f32_out: true,
        accumulate: true,
        row_scale: true,
        engine: hop,
        ..Default::default()
    };
    check_forward(
        DType::BF16,
        &[0, 3, 130, 64],
        264,
        200,
        f32_acc,
        "hopper fwd f32 +=",
    );
    for epi in [Epilogue::SwiGlu, Epilogue::Gelu] {
        let o = FwdOpts {
            epi,
            aux: true,
            row_scale: true,
            engine: hop,
            ..Default::default()
        };
        check_forward(
            DType::BF16,
            &[0, 3, 130, 64],
            2 * 136,
            200,
            o,
            &format!("hopper fwd {epi:?} + pre-activation"),
        );
    }
    // A block cap through Engine::Hopper (within_ctas: 3 -> one 2-CTA cluster).
    let mut capped = poisoned(&gpu, DType::F32, &[2, 64, 64]);
    let mut full = poisoned(&gpu, DType::F32, &[2, 64, 64]);
    let b_d = upload(
        &gpu,
        DType::BF16,
        &[40, 64],
        &random_vec(40 * 64, 1.0, DType::BF16, 7),
    );
    for (c, cap) in [(&mut capped, Some(3)), (&mut full, None)] {
        let args = GemmArgs::wgrad(&a_d, &b_d, Some(&off_d), c).engine(hop);
        let args = match cap {
            Some(m) => args.max_blocks(m),
            None => args,
        };
        grouped_gemm(&gpu, args).expect("hopper wgrad");
    }
    let (x, y) = (download(&gpu, &capped), download(&gpu, &full));
    assert!(x.iter().all(|v| v.is_finite()));
    assert!(
        x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
        "capped Hopper wgrad differs from the full grid"
    );
}
