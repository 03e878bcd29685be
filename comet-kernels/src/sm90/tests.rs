//! GPU tests of the Hopper engine (each against an f64 CPU reference on fresh random inputs,
//! output poisoned with NaN first, guard rows past the experts checked untouched) and an NVRTC
//! compile test of every specialisation.

use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::*;
use crate::buffer::{DType, DeviceTensor};
use crate::cache::{Arch, KernelCache};
use crate::device::Gpu;
use crate::gemm::{Epilogue, GemmKind};

/// One test problem.
#[derive(Clone)]
struct Case {
    kind: GemmKind,
    epilogue: Epilogue,
    counts: Vec<usize>,
    /// forward: N (accumulator columns; 2F with SwiGLU); dgrad: N (reduction);
    /// wgrad: N (rows of each expert's output)
    n: usize,
    /// forward: K (reduction); dgrad/wgrad: K (output columns)
    k: usize,
    scale: bool,
    reversed: bool,
    f16: bool,
    config: Sm90Config,
    /// Cap on the grid's CTAs.
    max_ctas: Option<u32>,
}

impl Case {
    fn fwd(counts: &[usize], n: usize, k: usize) -> Self {
        Case {
            kind: GemmKind::Forward,
            epilogue: Epilogue::None,
            counts: counts.to_vec(),
            n,
            k,
            scale: false,
            reversed: false,
            f16: false,
            config: Sm90Config::COOP_256,
            max_ctas: None,
        }
    }
    fn with(mut self, f: impl FnOnce(&mut Case)) -> Self {
        f(&mut self);
        self
    }
    fn rows(&self) -> usize {
        self.counts.iter().sum()
    }
    fn n_out(&self) -> usize {
        match (self.kind, self.epilogue) {
            (GemmKind::Forward, Epilogue::SwiGlu) => self.n / 2,
            (GemmKind::Forward, _) => self.n,
            _ => self.k,
        }
    }
}

fn round(v: f32, f16_: bool) -> f32 {
    if f16_ {
        f16::from_f32(v).to_f32()
    } else {
        bf16::from_f32(v).to_f32()
    }
}

fn upload(gpu: &Gpu, shape: &[usize], v: &[f32], f16_: bool) -> DeviceTensor {
    if f16_ {
        let h: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
        DeviceTensor::from_host(gpu, shape, &h).expect("upload")
    } else {
        let h: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
        DeviceTensor::from_host(gpu, shape, &h).expect("upload")
    }
}

fn download(gpu: &Gpu, t: &DeviceTensor, f16_: bool) -> (Vec<f32>, Vec<u16>) {
    if f16_ {
        let h: Vec<f16> = t.to_host(gpu).expect("download");
        (
            h.iter().map(|x| x.to_f32()).collect(),
            h.iter().map(|x| x.to_bits()).collect(),
        )
    } else {
        let h: Vec<bf16> = t.to_host(gpu).expect("download");
        (
            h.iter().map(|x| x.to_f32()).collect(),
            h.iter().map(|x| x.to_bits()).collect(),
        )
    }
}

fn random(rng: &mut StdRng, n: usize, scale: f32, f16_: bool) -> Vec<f32> {
    (0..n)
        .map(|_| round(rng.random_range(-1.0f32..1.0) * scale, f16_))
        .collect()
}

/// Canonical tile count of a routing (see scheduler.cuh).
fn tile_count(c: &Case) -> usize {
    let n_tiles = c.n_out().div_ceil(c.config.out_bn(c.epilogue) as usize);
    let bm = BM as usize;
    match c.kind {
        GemmKind::Wgrad => c.counts.len() * c.n.div_ceil(bm) * n_tiles,
        _ => c.counts.iter().map(|r| r.div_ceil(bm)).sum::<usize>() * n_tiles,
    }
}

/// Runs `c` on the GPU and checks it against an f64 reference; returns the relative L2 error.
fn check(gpu: &Gpu, c: &Case, seed: u64) -> f64 {
    run_checked(gpu, c, seed).0
}

/// [`check`], also returning the bits of the whole output (guard rows included).
fn run_checked(gpu: &Gpu, c: &Case, seed: u64) -> (f64, Vec<u16>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let g = c.counts.len();
    let rows = c.rows();
    let cap = rows + 64; // guard rows that must stay poisoned
    let (n, k) = (c.n, c.k);
    let a_cols = if c.kind == GemmKind::Forward { k } else { n };
    let a = random(&mut rng, cap * a_cols, 1.0, c.f16);
    let red = match c.kind {
        GemmKind::Forward => k,
        GemmKind::Dgrad => n,
        GemmKind::Wgrad => 1,
    };
    let b_len = if c.kind == GemmKind::Wgrad {
        cap * k
    } else {
        g * n * k
    };
    let b = random(&mut rng, b_len, 1.0 / (red as f32).sqrt(), c.f16);
    let scale: Vec<f32> = (0..cap).map(|_| rng.random_range(0.5f32..1.0)).collect();
    let mut offs = vec![0i32; g + 1];
    for e in 0..g {
        offs[e + 1] = offs[e] + c.counts[e] as i32;
    }

    // f64 reference of the valid output region
    let n_out = c.n_out();
    let out_rows = if c.kind == GemmKind::Wgrad {
        g * n
    } else {
        rows
    };
    let mut want = vec![0f64; out_rows * n_out];
    for e in 0..g {
        let (r0, r1) = (offs[e] as usize, offs[e + 1] as usize);
        match c.kind {
            GemmKind::Forward => {
                for r in r0..r1 {
                    let x = &a[r * k..(r + 1) * k];
                    let dot = |j: usize| -> f64 {
                        let w = &b[(e * n + j) * k..(e * n + j + 1) * k];
                        x.iter().zip(w).map(|(&p, &q)| p as f64 * q as f64).sum()
                    };
                    for j in 0..n_out {
                        let mut v = match c.epilogue {
                            Epilogue::SwiGlu => {
                                comet_core::reference::silu(dot(j)) * dot(n_out + j)
                            }
                            Epilogue::Gelu => comet_core::reference::gelu(dot(j)),
                            Epilogue::None => dot(j),
                        };
                        if c.scale {
                            v *= scale[r] as f64;
                        }
                        want[r * n_out + j] = v;
                    }
                }
            }
            GemmKind::Dgrad => {
                for r in r0..r1 {
                    for j in 0..k {
                        let mut v = 0f64;
                        for i in 0..n {
                            v += a[r * n + i] as f64 * b[(e * n + i) * k + j] as f64;
                        }
                        if c.scale {
                            v *= scale[r] as f64;
                        }
                        want[r * k + j] = v;
                    }
                }
            }
            GemmKind::Wgrad => {
                for i in 0..n {
                    for j in 0..k {
                        let mut v = 0f64;
                        for r in r0..r1 {
                            v += a[r * n + i] as f64 * b[r * k + j] as f64;
                        }
                        want[(e * n + i) * k + j] = v;
                    }
                }
            }
        }
    }

    let da = upload(gpu, &[cap, a_cols], &a, c.f16);
    let db = if c.kind == GemmKind::Wgrad {
        upload(gpu, &[cap, k], &b, c.f16)
    } else {
        upload(gpu, &[g, n, k], &b, c.f16)
    };
    let doffs = DeviceTensor::from_host(gpu, &[g + 1], &offs).expect("offsets");
    let dscale = DeviceTensor::from_host(gpu, &[cap], &scale).expect("scale");
    let dtype = if c.f16 { DType::F16 } else { DType::BF16 };
    let c_shape = if c.kind == GemmKind::Wgrad {
        vec![g, n, k]
    } else {
        vec![cap, n_out]
    };
    let mut dc = DeviceTensor::alloc(gpu, dtype, &c_shape).expect("C");
    dc.poison(gpu).expect("poison");
    let mut flag = DeviceTensor::zeros(gpu, DType::I32, &[1]).expect("flag");
    let dorder = if c.reversed {
        let desc_probe = Sm90Desc {
            kind: c.kind,
            a: crate::gemm::Meta::new(dtype, &[cap, a_cols]),
            b: crate::gemm::Meta::of(&db),
            offsets: crate::gemm::Meta::new(DType::I32, &[g + 1]),
            c: crate::gemm::Meta::new(dtype, &c_shape),
            epilogue: c.epilogue,
            row_scale: None,
            tile_order: None,
            error_flag: None,
            config: c.config,
            max_ctas: None,
        };
        let max_tiles = plan(&desc_probe, gpu.smem_optin() as usize)
            .expect("plan")
            .max_tiles;
        let total = tile_count(c);
        let order: Vec<i32> = (0..max_tiles)
            .map(|i| {
                if i < total {
                    (total - 1 - i) as i32
                } else {
                    -1
                }
            })
            .collect();
        Some(DeviceTensor::from_host(gpu, &[max_tiles], &order).expect("order"))
    } else {
        None
    };
    {
        let mut op = match c.kind {
            GemmKind::Forward => Sm90Gemm::forward(&da, &db, &doffs, &mut dc),
            GemmKind::Dgrad => Sm90Gemm::dgrad(&da, &db, &doffs, &mut dc),
            GemmKind::Wgrad => Sm90Gemm::wgrad(&da, &db, &doffs, &mut dc),
        }
        .epilogue(c.epilogue)
        .config(c.config)
        .error_flag(&mut flag);
        if c.scale {
            op = op.row_scale(&dscale);
        }
        if let Some(o) = &dorder {
            op = op.tile_order(o);
        }
        if let Some(n) = c.max_ctas {
            op = op.max_ctas(n);
        }
        grouped_gemm(gpu, op).expect("launch");
    }
    gpu.synchronize().expect("kernel");
    let f: Vec<i32> = flag.to_host(gpu).expect("flag");
    assert_eq!(f[0], 0, "device error flag");
    let (got, bits) = download(gpu, &dc, c.f16);
    let valid = out_rows * n_out;
    let nan = got[..valid].iter().filter(|v| !v.is_finite()).count();
    assert_eq!(nan, 0, "{nan} unwritten or non-finite outputs");
    if c.kind != GemmKind::Wgrad {
        assert!(
            bits[valid..].iter().all(|&b| b == 0xFFFF),
            "rows past the last expert were written"
        );
    }
    let got64: Vec<f64> = got[..valid].iter().map(|&v| v as f64).collect();
    let err = comet_core::numeric::rel_l2(&got64, &want);
    assert!(err <= 1e-2, "relative L2 error {err:.3e} > 1e-2");
    (err, bits)
}

fn gpu() -> Gpu {
    Gpu::new(0).expect("a CUDA GPU")
}

fn hopper(gpu: &Gpu) -> bool {
    if gpu.arch() != Arch::SM90 {
        eprintln!("skipping: not a Hopper GPU ({:?})", gpu.arch());
        return false;
    }
    true
}

const RAGGED: [usize; 5] = [0, 1, 130, 64, 257];

#[test]
#[ignore = "needs a CUDA GPU"]
fn forward_every_config() {
    let gpu = gpu();
    if !hopper(&gpu) {
        return;
    }
    let hinted = [
        (
            "c2coop256+hint",
            Sm90Config {
                l2_hint: true,
                ..Sm90Config::COOP_256_C2
            },
        ),
        (
            "coop256+hint",
            Sm90Config {
                l2_hint: true,
                ..Sm90Config::COOP_256
            },
        ),
    ];
    for (i, (name, cfg)) in Sm90Config::ALL.iter().chain(hinted.iter()).enumerate() {
        let c = Case::fwd(&RAGGED, 520, 1000).with(|c| c.config = *cfg);
        let e = check(&gpu, &c, 100 + i as u64);
        eprintln!("forward {name}: rel L2 {e:.2e}");
    }
    let w = Case::fwd(&[0, 3, 200, 129, 0], 200, 264).with(|c| {
        c.kind = GemmKind::Wgrad;
        c.config = Sm90Config {
            l2_hint: true,
            ..Sm90Config::COOP_256
        };
    });
    check(&gpu, &w, 99);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn forward_swiglu_gelu_scale_f16() {
    let gpu = gpu();
    if !hopper(&gpu) {
        return;
    }
    for cfg in [
        Sm90Config::COOP_256_C2,
        Sm90Config::COOP_256,
        Sm90Config::PINGPONG_128,
    ] {
        let swiglu = Case::fwd(&[100, 0, 200, 129], 400, 320).with(|c| {
            c.epilogue = Epilogue::SwiGlu;
            c.scale = true;
            c.config = cfg;
        });
        check(&gpu, &swiglu, 7);
        let gelu = Case::fwd(&[129, 0, 70], 320, 448).with(|c| {
            c.epilogue = Epilogue::Gelu;
            c.config = cfg;
        });
        check(&gpu, &gelu, 8);
    }
    let f16c = Case::fwd(&RAGGED, 264, 512).with(|c| {
        c.f16 = true;
        c.config = Sm90Config::COOP_256_C2;
    });
    check(&gpu, &f16c, 9);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn dgrad_and_wgrad() {
    let gpu = gpu();
    if !hopper(&gpu) {
        return;
    }
    for cfg in [
        Sm90Config::COOP_256_C2,
        Sm90Config::COOP_256,
        Sm90Config::PINGPONG_128,
    ] {
        let d = Case::fwd(&RAGGED, 1000, 264).with(|c| {
            c.kind = GemmKind::Dgrad;
            c.config = cfg;
        });
        check(&gpu, &d, 11);
    }
    for cfg in [Sm90Config::COOP_256, Sm90Config::PINGPONG_128] {
        // an expert with no rows must get an all-zero weight gradient
        let w = Case::fwd(&[0, 3, 200, 129, 0], 200, 264).with(|c| {
            c.kind = GemmKind::Wgrad;
            c.config = cfg;
        });
        check(&gpu, &w, 12);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn tile_order_as_data_and_many_experts() {
    let gpu = gpu();
    if !hopper(&gpu) {
        return;
    }
    for (kind, cfg) in [
        (GemmKind::Forward, Sm90Config::COOP_256_C2),
        (GemmKind::Dgrad, Sm90Config::COOP_256),
        (GemmKind::Wgrad, Sm90Config::PINGPONG_128),
    ] {
        let c = Case::fwd(&[65, 0, 300, 1], 264, 392).with(|c| {
            c.kind = kind;
            c.reversed = true;
            c.config = cfg;
        });
        check(&gpu, &c, 21);
    }
    let mut rng = StdRng::seed_from_u64(5);
    let counts: Vec<usize> = (0..256).map(|_| rng.random_range(0..40)).collect();
    check(
        &gpu,
        &Case::fwd(&counts, 256, 256).with(|c| c.config = Sm90Config::COOP_256_C2),
        22,
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn bad_offsets_are_clamped_and_reported() {
    let gpu = gpu();
    if !hopper(&gpu) {
        return;
    }
    let (cap, k, n) = (200usize, 64usize, 128usize);
    let a = DeviceTensor::zeros(&gpu, DType::BF16, &[cap, k]).expect("a");
    let w = DeviceTensor::zeros(&gpu, DType::BF16, &[2, n, k]).expect("w");
    let offs = DeviceTensor::from_host(&gpu, &[3], &[0i32, 150, 100_000]).expect("offsets");
    let mut c = DeviceTensor::zeros(&gpu, DType::BF16, &[cap, n]).expect("c");
    let mut flag = DeviceTensor::zeros(&gpu, DType::I32, &[1]).expect("flag");
    grouped_gemm(
        &gpu,
        Sm90Gemm::forward(&a, &w, &offs, &mut c)
            .config(Sm90Config::COOP_256_C2)
            .error_flag(&mut flag),
    )
    .expect("launch");
    gpu.synchronize()
        .expect("no out-of-bounds access (run under compute-sanitizer)");
    let f: Vec<i32> = flag.to_host(&gpu).expect("flag");
    assert_eq!(
        DeviceErrorCode::from_flag(f[0]),
        Some(Ok(DeviceErrorCode::BadOffsets))
    );
}

/// A grid capped below the SM count (fewer CTAs than tiles, so each CTA walks several) gives
/// the same output bit for bit as the uncapped grid: every tile's reduction runs in the same
/// order whichever CTA takes it. Covers single CTAs, 2-CTA clusters (caps of whole
/// clusters), ping-pong and wgrad, and `within_ctas` (odd caps, a cap below one cluster).
#[test]
#[ignore = "needs a CUDA GPU"]
fn capped_grid_matches_the_full_grid() {
    let gpu = gpu();
    if !hopper(&gpu) {
        return;
    }
    let cases = [
        (GemmKind::Forward, Sm90Config::COOP_256_C2, vec![2, 6, 40]),
        (GemmKind::Forward, Sm90Config::PINGPONG_128, vec![1, 3, 17]),
        (GemmKind::Dgrad, Sm90Config::COOP_256_C2, vec![2, 10]),
        (GemmKind::Wgrad, Sm90Config::COOP_256, vec![1, 5]),
    ];
    for (i, (kind, cfg, caps)) in cases.into_iter().enumerate() {
        let base = Case::fwd(&RAGGED, 520, 1000).with(|c| {
            c.kind = kind;
            c.config = cfg;
        });
        let seed = 300 + i as u64;
        let (_, full) = run_checked(&gpu, &base, seed);
        for cap in caps {
            let capped = base.clone().with(|c| c.max_ctas = Some(cap));
            let (err, bits) = run_checked(&gpu, &capped, seed);
            assert!(
                bits == full,
                "{kind:?} {cfg:?} max_ctas {cap}: output differs from the full grid"
            );
            eprintln!(
                "{kind:?} cluster {} max_ctas {cap}: identical (rel L2 {err:.2e})",
                cfg.cluster
            );
        }
    }
    // within_ctas: an odd cap on a clustered config (rounded down), a cap below one cluster
    // (single CTAs); the result is again identical to the full grid.
    let base = Case::fwd(&RAGGED, 264, 512).with(|c| c.config = Sm90Config::COOP_256_C2);
    let (_, full) = run_checked(&gpu, &base, 310);
    let rows: usize = base.rows() + 64;
    for cap in [3usize, 1] {
        let probe = Sm90Gemm::forward(
            &DeviceTensor::zeros(&gpu, DType::BF16, &[rows, 512]).expect("a"),
            &DeviceTensor::zeros(&gpu, DType::BF16, &[RAGGED.len(), 264, 512]).expect("w"),
            &DeviceTensor::zeros(&gpu, DType::I32, &[RAGGED.len() + 1]).expect("offsets"),
            &mut DeviceTensor::zeros(&gpu, DType::BF16, &[rows, 264]).expect("c"),
        )
        .config(Sm90Config::COOP_256_C2)
        .within_ctas(cap)
        .desc();
        let capped = base.clone().with(|c| {
            c.config = probe.config;
            c.max_ctas = probe.max_ctas;
        });
        let (_, bits) = run_checked(&gpu, &capped, 310);
        assert!(bits == full, "within_ctas({cap}): output differs");
    }
}

/// Compiles every specialisation the launcher can ask for (NVRTC only, no GPU): checks the
/// macros, the shared-memory mirror (`static_assert`) and the parameter-block layout.
#[test]
#[ignore = "needs NVRTC and the CUDA headers"]
fn nvrtc_compiles_every_specialisation() {
    let cache = KernelCache::new(None);
    let mut n = 0;
    for (name, cfg) in Sm90Config::ALL {
        for kind in [GemmKind::Forward, GemmKind::Dgrad, GemmKind::Wgrad] {
            for epi in [Epilogue::None, Epilogue::SwiGlu, Epilogue::Gelu] {
                if cfg.validate(kind, epi).is_err() {
                    continue;
                }
                let d = cfg.defines(kind, epi, false, false);
                cache
                    .cubin(&program(), &d, Arch::SM90)
                    .unwrap_or_else(|e| panic!("{name} {kind:?} {epi:?}: {e}"));
                n += 1;
            }
        }
    }
    let d = Sm90Config::COOP_256_C2.defines(GemmKind::Forward, Epilogue::None, true, true);
    cache.cubin(&program(), &d, Arch::SM90).expect("f16");
    let hinted = Sm90Config {
        l2_hint: true,
        ..Sm90Config::COOP_256_C2
    };
    let d = hinted.defines(GemmKind::Dgrad, Epilogue::None, false, false);
    cache.cubin(&program(), &d, Arch::SM90).expect("l2 hint");
    assert_eq!(
        n, 19,
        "specialisations: 4 configs x 5 (kind, epilogue) minus clustered wgrad"
    );
    // A wrong shared-memory mirror must fail to compile.
    let mut d = Sm90Config::COOP_256.defines(GemmKind::Forward, Epilogue::None, false, false);
    d.insert("SM90_SMEM_ONE_EXPERT".into(), "1".into());
    assert!(cache.cubin(&program(), &d, Arch::SM90).is_err());
}
