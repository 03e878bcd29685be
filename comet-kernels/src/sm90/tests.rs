//! GPU tests of the Hopper engine (each against an f64 CPU reference on fresh random inputs,
//! output poisoned with NaN first, guard rows past the experts checked untouched) and an NVRTC
//! compile test of every specialisation.

use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::*;
use crate::buffer::{DType, DeviceTensor};
use crate::cache::{Arch, Defines, KernelCache};
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
    /// f32 C.
    out_f32: bool,
    /// `C += result` (C starts from random finite values, kept for the reference).
    accumulate: bool,
    /// Also store the pre-activation (checked against the reference too).
    aux: bool,
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
            out_f32: false,
            accumulate: false,
            aux: false,
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
    let bm = c.config.bm as usize;
    match c.kind {
        GemmKind::Wgrad => c.counts.len() * c.n.div_ceil(bm) * n_tiles,
        _ => c.counts.iter().map(|&r| c.config.m_tiles(r)).sum::<usize>() * n_tiles,
    }
}

/// Runs `c` on the GPU and checks it against an f64 reference; returns the relative L2 error.
fn check(gpu: &Gpu, c: &Case, seed: u64) -> f64 {
    run_checked(gpu, c, seed).0
}

/// The reference of one case: the valid output region (`want`, in f64; with accumulation it
/// includes C's initial values) and, for the pre-activation store, the `[rows, N]` values.
struct Want {
    out: Vec<f64>,
    aux: Vec<f64>,
}

#[allow(clippy::too_many_arguments)]
fn reference(c: &Case, offs: &[i32], a: &[f32], b: &[f32], scale: &[f32], c0: &[f32]) -> Want {
    let g = c.counts.len();
    let rows = c.rows();
    let (n, k, n_out) = (c.n, c.k, c.n_out());
    let out_rows = if c.kind == GemmKind::Wgrad {
        g * n
    } else {
        rows
    };
    let mut out = vec![0f64; out_rows * n_out];
    let mut aux = if c.aux {
        vec![0f64; rows * n]
    } else {
        Vec::new()
    };
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
                    if c.aux {
                        for j in 0..n {
                            aux[r * n + j] = dot(j);
                        }
                    }
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
                        out[r * n_out + j] = v;
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
                        out[r * k + j] = v;
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
                        out[(e * n + i) * k + j] = v;
                    }
                }
            }
        }
    }
    if c.accumulate {
        for (o, &i) in out.iter_mut().zip(c0) {
            *o += i as f64;
        }
    }
    Want { out, aux }
}

/// Bits of a downloaded output (16-bit values zero-extended), and its values.
fn download_any(gpu: &Gpu, t: &DeviceTensor) -> (Vec<f32>, Vec<u32>) {
    match t.dtype() {
        DType::F32 => {
            let h: Vec<f32> = t.to_host(gpu).expect("download");
            let bits = h.iter().map(|x| x.to_bits()).collect();
            (h, bits)
        }
        dt => {
            let (v, b) = download(gpu, t, dt == DType::F16);
            (v, b.into_iter().map(u32::from).collect())
        }
    }
}

/// [`check`], also returning the bits of the whole output (guard rows included).
fn run_checked(gpu: &Gpu, c: &Case, seed: u64) -> (f64, Vec<u32>) {
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
    let n_out = c.n_out();
    let c_shape = if c.kind == GemmKind::Wgrad {
        vec![g, n, k]
    } else {
        vec![cap, n_out]
    };
    let c_len: usize = c_shape.iter().product();
    // Initial C of an accumulating run: finite random values (guard rows included).
    let c0: Vec<f32> = (0..c_len).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    let want = reference(c, &offs, &a, &b, &scale, &c0);

    let da = upload(gpu, &[cap, a_cols], &a, c.f16);
    let db = if c.kind == GemmKind::Wgrad {
        upload(gpu, &[cap, k], &b, c.f16)
    } else {
        upload(gpu, &[g, n, k], &b, c.f16)
    };
    let doffs = DeviceTensor::from_host(gpu, &[g + 1], &offs).expect("offsets");
    let dscale = DeviceTensor::from_host(gpu, &[cap], &scale).expect("scale");
    let dtype = if c.f16 { DType::F16 } else { DType::BF16 };
    let c_dtype = if c.out_f32 { DType::F32 } else { dtype };
    let mut dc = if c.accumulate {
        DeviceTensor::from_host(gpu, &c_shape, &c0).expect("C")
    } else {
        let mut t = DeviceTensor::alloc(gpu, c_dtype, &c_shape).expect("C");
        t.poison(gpu).expect("poison");
        t
    };
    let mut daux = DeviceTensor::alloc(gpu, dtype, &[cap, n]).expect("aux");
    daux.poison(gpu).expect("poison");
    let mut flag = DeviceTensor::zeros(gpu, DType::I32, &[1]).expect("flag");
    let dorder = if c.reversed {
        let desc_probe = Sm90Desc {
            kind: c.kind,
            a: crate::gemm::Meta::new(dtype, &[cap, a_cols]),
            b: crate::gemm::Meta::of(&db),
            offsets: crate::gemm::Meta::new(DType::I32, &[g + 1]),
            c: crate::gemm::Meta::new(c_dtype, &c_shape),
            accumulate: c.accumulate,
            aux: None,
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
        .accumulate(c.accumulate)
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
        if c.aux {
            op = op.aux(&mut daux);
        }
        grouped_gemm(gpu, op).expect("launch");
    }
    gpu.synchronize().expect("kernel");
    let f: Vec<i32> = flag.to_host(gpu).expect("flag");
    assert_eq!(f[0], 0, "device error flag");
    let (got, bits) = download_any(gpu, &dc);
    let valid = want.out.len();
    let nan = got[..valid].iter().filter(|v| !v.is_finite()).count();
    assert_eq!(nan, 0, "{nan} unwritten or non-finite outputs");
    if c.kind != GemmKind::Wgrad {
        let untouched = if c.accumulate {
            bits[valid..]
                .iter()
                .zip(&c0[valid..])
                .all(|(&b, i)| b == i.to_bits())
        } else {
            let poison = if c.out_f32 { u32::MAX } else { 0xFFFF };
            bits[valid..].iter().all(|&b| b == poison)
        };
        assert!(untouched, "rows past the last expert were written");
    }
    if c.kind == GemmKind::Wgrad && c.accumulate {
        // Experts without rows: their gradient stays bit for bit.
        for e in (0..g).filter(|&e| c.counts[e] == 0) {
            let r = e * n * k..(e + 1) * n * k;
            assert!(
                bits[r.clone()]
                    .iter()
                    .zip(&c0[r])
                    .all(|(&b, i)| b == i.to_bits()),
                "expert {e} has no rows but its accumulated gradient changed"
            );
        }
    }
    let got64: Vec<f64> = got[..valid].iter().map(|&v| v as f64).collect();
    let err = comet_core::numeric::rel_l2(&got64, &want.out);
    assert!(err <= 1e-2, "relative L2 error {err:.3e} > 1e-2");
    if c.aux {
        let (h, hbits) = download(gpu, &daux, c.f16);
        let hv = rows * n;
        assert!(
            h[..hv].iter().all(|v| v.is_finite()),
            "unwritten or non-finite pre-activation"
        );
        assert!(
            hbits[hv..].iter().all(|&b| b == 0xFFFF),
            "pre-activation rows past the last expert were written"
        );
        let h64: Vec<f64> = h[..hv].iter().map(|&v| v as f64).collect();
        let e = comet_core::numeric::rel_l2(&h64, &want.aux);
        assert!(e <= 1e-2, "pre-activation relative L2 error {e:.3e} > 1e-2");
    }
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

/// The configurations the forward and dgrad tests run: clustered and single-CTA,
/// cooperative and ping-pong, 128- and 256-row tiles.
const FORWARD_AND_DGRAD_CONFIGS: [Sm90Config; 5] = [
    Sm90Config::COOP_256_C2,
    Sm90Config::COOP_256,
    Sm90Config::PINGPONG_128,
    Sm90Config::TALL_256,
    Sm90Config::TALL_256_C2,
];

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
        if cfg.tma_store {
            continue; // weight gradients only (dgrad_and_wgrad, wgrad_f32_and_accumulate)
        }
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
    for cfg in FORWARD_AND_DGRAD_CONFIGS {
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
    for cfg in FORWARD_AND_DGRAD_CONFIGS {
        let d = Case::fwd(&RAGGED, 1000, 264).with(|c| {
            c.kind = GemmKind::Dgrad;
            c.config = cfg;
        });
        check(&gpu, &d, 11);
    }
    for cfg in [
        Sm90Config::COOP_256,
        Sm90Config::PINGPONG_128,
        Sm90Config::TALL_256,
        Sm90Config::WGRAD_TS,
    ] {
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

/// Wgrad with f32 output, overwriting and accumulating (`dW += Aᵀ·B`, the backward's
/// gradient accumulation): experts with no rows (zeros written; with accumulation their
/// gradient stays bit for bit), ragged rows, reductions (rows) that are not multiples of 64
/// (tail k-blocks of every k16 step count),
/// every wgrad configuration, L2 hints, f16 inputs, a reversed tile order and a capped grid.
#[test]
#[ignore = "needs a CUDA GPU"]
fn wgrad_f32_and_accumulate() {
    let gpu = gpu();
    if !hopper(&gpu) {
        return;
    }
    let hinted = Sm90Config {
        l2_hint: true,
        ..Sm90Config::COOP_256
    };
    let configs = [
        ("coop256+hint", hinted),
        ("coop256x4", Sm90Config::COOP_256),
        ("pp128x6", Sm90Config::PINGPONG_128),
        ("coop128x6", Sm90Config::COOP_128),
        ("t256x4", Sm90Config::TALL_256),
        ("ts256h", Sm90Config::WGRAD_TS),
        (
            "tspp128",
            Sm90Config {
                tma_store: true,
                ..Sm90Config::PINGPONG_128
            },
        ),
    ];
    let mut seed = 400;
    for (name, cfg) in configs {
        for accumulate in [false, true] {
            // the last: tail k-blocks of 1, 3, 1, 3 and 4 k16 steps, with and without rows
            // to clear (16, 48, 80, 100, 127 rows)
            for counts in [
                &[0usize, 3, 200, 129, 0][..],
                &[64, 1, 0, 191][..],
                &[16, 48, 80, 100, 127][..],
            ] {
                let c = Case::fwd(counts, 200, 264).with(|c| {
                    c.kind = GemmKind::Wgrad;
                    c.config = cfg;
                    c.out_f32 = true;
                    c.accumulate = accumulate;
                });
                seed += 1;
                let e = check(&gpu, &c, seed);
                eprintln!("wgrad f32 {name} accumulate {accumulate} {counts:?}: rel L2 {e:.2e}");
            }
        }
    }
    for (what, c) in [
        (
            "f16",
            Case::fwd(&[0, 77, 130], 136, 392).with(|c| c.f16 = true),
        ),
        (
            "reversed",
            Case::fwd(&[65, 0, 300, 1], 264, 392).with(|c| c.reversed = true),
        ),
        (
            "3 CTAs",
            Case::fwd(&RAGGED, 264, 200).with(|c| c.max_ctas = Some(3)),
        ),
    ] {
        let c = c.with(|c| {
            c.kind = GemmKind::Wgrad;
            c.config = hinted;
            c.out_f32 = true;
            c.accumulate = true;
        });
        seed += 1;
        let e = check(&gpu, &c, seed);
        eprintln!("wgrad f32 accumulate {what}: rel L2 {e:.2e}");
    }
}

/// Forward (plain, SwiGLU, GeLU, row scale) and dgrad with f32 output, overwriting and
/// accumulating, on clustered, cooperative and ping-pong configurations.
#[test]
#[ignore = "needs a CUDA GPU"]
fn forward_and_dgrad_f32_and_accumulate() {
    let gpu = gpu();
    if !hopper(&gpu) {
        return;
    }
    let mut seed = 500;
    for cfg in FORWARD_AND_DGRAD_CONFIGS {
        for accumulate in [false, true] {
            let cases = [
                Case::fwd(&RAGGED, 520, 1000),
                Case::fwd(&[100, 0, 200, 129], 400, 320).with(|c| {
                    c.epilogue = Epilogue::SwiGlu;
                    c.scale = true;
                }),
                Case::fwd(&[129, 0, 70], 320, 448).with(|c| c.epilogue = Epilogue::Gelu),
                Case::fwd(&RAGGED, 1000, 264).with(|c| {
                    c.kind = GemmKind::Dgrad;
                    c.scale = true;
                }),
            ];
            for c in cases {
                let c = c.with(|c| {
                    c.config = cfg;
                    c.out_f32 = true;
                    c.accumulate = accumulate;
                });
                seed += 1;
                let e = check(&gpu, &c, seed);
                eprintln!(
                    "{:?} {:?} f32 accumulate {accumulate} bm {} cluster {} pp {}: rel L2 {e:.2e}",
                    c.kind,
                    c.epilogue,
                    cfg.bm,
                    cfg.cluster,
                    cfg.schedule == Schedule::PingPong
                );
            }
        }
    }
}

/// 256-row tiles (`Sm90Config::TALL_256`, clustered `TALL_256_C2`): experts of exactly 256
/// and 257 rows (one full tile; one full tile plus a one-row tile), 255, 513, one row and
/// none, on forward (plain, SwiGLU with row scale, GeLU), dgrad and wgrad (output rows per
/// expert 256 and 264: one full m-tile, and one plus an 8-row tile), 16-bit and f32 C,
/// overwriting and accumulating, f16 inputs, a reversed tile order and a capped grid whose
/// output must equal the full grid's bit for bit.
#[test]
#[ignore = "needs a CUDA GPU"]
fn tall_tiles_edge_rows() {
    let gpu = gpu();
    if !hopper(&gpu) {
        return;
    }
    const EDGES: [usize; 7] = [256, 257, 0, 255, 1, 513, 0];
    let mut seed = 700;
    for (name, cfg) in [
        ("t256x4", Sm90Config::TALL_256),
        ("c2t256", Sm90Config::TALL_256_C2),
        (
            "c2t256+hint",
            Sm90Config {
                l2_hint: true,
                ..Sm90Config::TALL_256_C2
            },
        ),
    ] {
        let mut cases = vec![
            Case::fwd(&EDGES, 264, 392),
            Case::fwd(&EDGES, 400, 328).with(|c| {
                c.epilogue = Epilogue::SwiGlu;
                c.scale = true;
            }),
            Case::fwd(&EDGES, 256, 200).with(|c| c.epilogue = Epilogue::Gelu),
            Case::fwd(&EDGES, 328, 264).with(|c| {
                c.kind = GemmKind::Dgrad;
                c.scale = true;
            }),
            Case::fwd(&[256], 128, 64),
            Case::fwd(&[257], 128, 64).with(|c| c.kind = GemmKind::Dgrad),
        ];
        if cfg.cluster == 1 {
            for n in [256, 264] {
                cases.push(Case::fwd(&EDGES, n, 136).with(|c| c.kind = GemmKind::Wgrad));
            }
        }
        for base in cases {
            let variants = [
                base.clone(),
                base.clone().with(|c| c.out_f32 = true),
                base.clone().with(|c| {
                    c.out_f32 = true;
                    c.accumulate = true;
                }),
            ];
            for c in variants {
                let c = c.with(|c| c.config = cfg);
                seed += 1;
                let e = check(&gpu, &c, seed);
                eprintln!(
                    "{name} {:?} {:?} {:?} n {} k {} f32 {} accumulate {}: rel L2 {e:.2e}",
                    c.kind, c.epilogue, c.counts, c.n, c.k, c.out_f32, c.accumulate
                );
            }
        }
    }
    // f16 inputs, a reversed tile order (ids from plan's max_tiles for 256-row tiles).
    for kind in [GemmKind::Forward, GemmKind::Dgrad, GemmKind::Wgrad] {
        for c in [
            Case::fwd(&EDGES, 264, 136).with(|c| c.f16 = true),
            Case::fwd(&EDGES, 264, 136).with(|c| c.reversed = true),
        ] {
            let c = c.with(|c| {
                c.kind = kind;
                c.config = Sm90Config::TALL_256;
            });
            seed += 1;
            let e = check(&gpu, &c, seed);
            eprintln!(
                "t256x4 {kind:?} f16 {} reversed {}: rel L2 {e:.2e}",
                c.f16, c.reversed
            );
        }
    }
    // A capped grid (CTAs walk several 256-row tiles) matches the full grid bit for bit.
    for (kind, cfg, cap) in [
        (GemmKind::Forward, Sm90Config::TALL_256_C2, 2),
        (GemmKind::Dgrad, Sm90Config::TALL_256, 3),
        (GemmKind::Wgrad, Sm90Config::TALL_256, 5),
    ] {
        let base = Case::fwd(&EDGES, 520, 264).with(|c| {
            c.kind = kind;
            c.config = cfg;
        });
        seed += 1;
        capped_grid_matches(&gpu, &base, cap, seed);
    }
}

/// Runs `base` on the full grid and on at most `cap` CTAs (each CTA then walks several
/// tiles) and asserts that both outputs are equal bit for bit.
fn capped_grid_matches(gpu: &Gpu, base: &Case, cap: u32, seed: u64) {
    let (_, full) = run_checked(gpu, base, seed);
    let (_, bits) = run_checked(gpu, &base.clone().with(|c| c.max_ctas = Some(cap)), seed);
    assert!(
        bits == full,
        "{:?} {:?} max_ctas {cap}: output differs",
        base.kind,
        base.config
    );
}

/// Swap-AB (`Sm90Config::SWAP_256H`, without the L2 hint, and `SWAP_272H`): experts of 0, 1,
/// 15, 16, 17, 130, 256, 257, 270, 272, 273, 300, 546 and 1000 rows (one to four token
/// chunks, chunks rounded up to 16 for wgmma's N; with 272-row chunks 257..272 rows are one
/// chunk of two wgmma), K not a multiple of 64, output columns past the last full weight tile, on
/// forward (plain, SwiGLU with row scale, GeLU; with and without the pre-activation store),
/// dgrad with row scale, f16 inputs, a reversed tile order, and a capped grid whose output
/// must equal the full grid's bit for bit.
#[test]
#[ignore = "needs a CUDA GPU"]
fn swap_ab_edge_rows() {
    let gpu = gpu();
    if !hopper(&gpu) {
        return;
    }
    const EDGES: [usize; 15] = [
        0, 1, 15, 16, 17, 130, 256, 257, 270, 272, 273, 300, 546, 1000, 0,
    ];
    let mut seed = 1200;
    let plain = Sm90Config {
        l2_hint: false,
        ..Sm90Config::SWAP_256H
    };
    for (name, cfg) in [
        ("swap256h", Sm90Config::SWAP_256H),
        ("swap256", plain),
        ("swap272h", Sm90Config::SWAP_272H),
    ] {
        let mut cases = vec![
            Case::fwd(&EDGES, 200, 520),
            Case::fwd(&EDGES, 400, 328).with(|c| {
                c.epilogue = Epilogue::SwiGlu;
                c.scale = true;
            }),
            Case::fwd(&EDGES, 264, 200).with(|c| c.epilogue = Epilogue::Gelu),
            Case::fwd(&EDGES, 328, 264).with(|c| {
                c.kind = GemmKind::Dgrad;
                c.scale = true;
            }),
            Case::fwd(&EDGES, 264, 136).with(|c| {
                c.kind = GemmKind::Dgrad;
                c.f16 = true;
            }),
            Case::fwd(&EDGES, 136, 264).with(|c| c.f16 = true),
            Case::fwd(&EDGES, 264, 136).with(|c| c.reversed = true),
            Case::fwd(&EDGES, 264, 136).with(|c| {
                c.kind = GemmKind::Dgrad;
                c.reversed = true;
            }),
        ];
        for epi in [Epilogue::SwiGlu, Epilogue::Gelu] {
            cases.push(Case::fwd(&EDGES, 272, 200).with(|c| {
                c.epilogue = epi;
                c.scale = true;
                c.aux = true;
            }));
        }
        for c in cases {
            let c = c.with(|c| c.config = cfg);
            seed += 1;
            let e = check(&gpu, &c, seed);
            eprintln!(
                "{name} {:?} {:?} n {} k {} scale {} f16 {} reversed {} aux {}: rel L2 {e:.2e}",
                c.kind, c.epilogue, c.n, c.k, c.scale, c.f16, c.reversed, c.aux
            );
        }
    }
    for kind in [GemmKind::Forward, GemmKind::Dgrad] {
        for config in [Sm90Config::SWAP_256H, Sm90Config::SWAP_272H] {
            let base = Case::fwd(&EDGES, 520, 264).with(|c| {
                c.kind = kind;
                c.config = config;
            });
            seed += 1;
            capped_grid_matches(&gpu, &base, 3, seed);
        }
    }
}

/// The pre-activation store of the fused SwiGLU / GeLU epilogue: `h` (gate columns then up
/// columns) and the activated output both against the reference, guard rows of both
/// untouched, every configuration, row scale (applied to the output only), f16.
#[test]
#[ignore = "needs a CUDA GPU"]
fn forward_preactivation_store() {
    let gpu = gpu();
    if !hopper(&gpu) {
        return;
    }
    let mut seed = 600;
    for (name, cfg) in Sm90Config::ALL.into_iter().filter(|(_, c)| !c.tma_store) {
        for epi in [Epilogue::SwiGlu, Epilogue::Gelu] {
            let c = Case::fwd(&RAGGED, 400, 328).with(|c| {
                c.epilogue = epi;
                c.config = cfg;
                c.scale = true;
                c.aux = true;
            });
            seed += 1;
            let e = check(&gpu, &c, seed);
            eprintln!("{epi:?} + pre-activation {name}: rel L2 {e:.2e}");
        }
    }
    let c = Case::fwd(&[0, 300, 17], 2 * 136, 256).with(|c| {
        c.epilogue = Epilogue::SwiGlu;
        c.config = Sm90Config {
            l2_hint: true,
            ..Sm90Config::COOP_256_C2
        };
        c.f16 = true;
        c.aux = true;
    });
    check(&gpu, &c, 650);
}

/// Rows per local expert of a random top-k router: `tokens` tokens on each of 2 ranks, the
/// experts of rank 0 (the first `E / 2`).
fn local_counts(rng: &mut StdRng, experts: usize, top_k: usize, tokens: usize) -> Vec<usize> {
    let l = experts / 2;
    let mut counts = vec![0usize; l];
    for _ in 0..2 * tokens {
        let mut chosen: Vec<usize> = Vec::with_capacity(top_k);
        while chosen.len() < top_k {
            let e = rng.random_range(0..experts);
            if !chosen.contains(&e) {
                chosen.push(e);
            }
        }
        for e in chosen.into_iter().filter(|&e| e < l) {
            counts[e] += 1;
        }
    }
    counts
}

/// The four presets' weight-gradient GEMMs at full width (H, F, 2F, E/2 local experts of 2
/// ranks) with reduced tokens, f32 output: `dW1 [L, H, F] = dyᵀ·a` and
/// `dW0 [L, 2F, H] = dhᵀ·x` per expert. Operands are device fills (`init::fill_uniform`,
/// host mirror `uniform_value`); the outputs are checked against an f64 reference on sampled
/// entries of every checked expert, scanned in full for non-finite values, and an
/// accumulating run on a copy must give exactly twice the output (bit for bit: same
/// reduction order, `x + x` is exact). DeepSeek-V3 (128 local experts, 15 GB of f32 dW0)
/// checks every 4th expert and every expert without rows.
#[test]
#[ignore = "needs a CUDA GPU"]
fn wgrad_f32_preset_shapes() {
    use crate::init::{fill_uniform, uniform_value};
    use comet_core::Preset;
    let gpu = gpu();
    if !hopper(&gpu) {
        return;
    }
    let seed0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    eprintln!("seed {seed0}");
    let mut rng = StdRng::seed_from_u64(seed0);
    let tokens = 1024;
    for preset in Preset::all() {
        let cfg = preset.config();
        let (h, f, e, k) = (cfg.hidden(), cfg.ffn(), cfg.experts(), cfg.top_k());
        let counts = local_counts(&mut rng, e, k, tokens);
        let l = counts.len();
        let rows: usize = counts.iter().sum();
        let cap = rows + 5;
        let offs: Vec<i32> = std::iter::once(0)
            .chain(counts.iter().scan(0i32, |acc, &c| {
                *acc += c as i32;
                Some(*acc)
            }))
            .collect();
        let doffs = DeviceTensor::from_host(&gpu, &[l + 1], &offs).expect("offsets");
        let stride = if l > 32 { 4 } else { 1 };
        // (name, N = rows of each gradient = A's columns, K = B's columns)
        for (name, n, kk) in [("wgrad1", h, f), ("wgrad0", 2 * f, h)] {
            let t0 = std::time::Instant::now();
            let (sa, sb) = (rng.random::<u64>(), rng.random::<u64>());
            let mut da = DeviceTensor::alloc(&gpu, DType::BF16, &[cap, n]).expect("A");
            let mut db = DeviceTensor::alloc(&gpu, DType::BF16, &[cap, kk]).expect("B");
            fill_uniform(&gpu, &mut da, sa, 1.0).expect("fill A");
            fill_uniform(&gpu, &mut db, sb, 1.0).expect("fill B");
            let host = |seed: u64, i: usize| bf16::from_f32(uniform_value(seed, i as u64, 1.0));
            let mut c1 = DeviceTensor::alloc(&gpu, DType::F32, &[l, n, kk]).expect("C");
            c1.poison(&gpu).expect("poison");
            let mut flag = DeviceTensor::zeros(&gpu, DType::I32, &[1]).expect("flag");
            grouped_gemm(
                &gpu,
                Sm90Gemm::wgrad(&da, &db, &doffs, &mut c1).error_flag(&mut flag),
            )
            .expect("wgrad f32");
            let mut c2 = DeviceTensor::alloc(&gpu, DType::F32, &[l, n, kk]).expect("C copy");
            c2.copy_from(&gpu, &c1).expect("copy");
            grouped_gemm(
                &gpu,
                Sm90Gemm::wgrad(&da, &db, &doffs, &mut c2)
                    .accumulate(true)
                    .error_flag(&mut flag),
            )
            .expect("wgrad f32 accumulate");
            gpu.synchronize().expect("kernels");
            let fl: Vec<i32> = flag.to_host(&gpu).expect("flag");
            assert_eq!(fl[0], 0, "device error flag");
            let (mut got, mut want) = (Vec::new(), Vec::new());
            let mut checked = 0;
            for ex in (0..l).filter(|&x| x % stride == 0 || counts[x] == 0) {
                let len = n * kk;
                let v1: Vec<f32> = c1.to_host_range(&gpu, ex * len, len).expect("dl");
                let v2: Vec<f32> = c2.to_host_range(&gpu, ex * len, len).expect("dl");
                let bad = v1.iter().filter(|x| !x.is_finite()).count();
                assert_eq!(
                    bad,
                    0,
                    "{} {name} expert {ex}: {bad} non-finite",
                    preset.name()
                );
                let diff = v1
                    .iter()
                    .zip(&v2)
                    .filter(|(x, y)| (2.0 * **x).to_bits() != y.to_bits())
                    .count();
                assert_eq!(
                    diff,
                    0,
                    "{} {name} expert {ex}: accumulate != 2 x overwrite at {diff} entries",
                    preset.name()
                );
                let (r0, r1) = (offs[ex] as usize, offs[ex + 1] as usize);
                for _ in 0..512 {
                    let (i, j) = (rng.random_range(0..n), rng.random_range(0..kk));
                    let mut v = 0f64;
                    for r in r0..r1 {
                        v += f64::from(host(sa, r * n + i).to_f32())
                            * f64::from(host(sb, r * kk + j).to_f32());
                    }
                    want.push(v);
                    got.push(f64::from(v1[i * kk + j]));
                }
                if counts[ex] == 0 {
                    assert!(v1.iter().all(|&x| x == 0.0), "empty expert {ex}: not zero");
                }
                checked += 1;
            }
            let err = comet_core::numeric::rel_l2(&got, &want);
            eprintln!(
                "{} {name}: [{l}, {n}, {kk}] f32, {rows} rows, {checked} experts checked, sampled rel L2 {err:.2e}, {:.1} s",
                preset.name(),
                t0.elapsed().as_secs_f64()
            );
            assert!(err <= 1e-2, "{} {name}: rel L2 {err:.3e}", preset.name());
        }
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
        n, 37,
        "specialisations: 6 configs x 5 (kind, epilogue) minus clustered wgrad, plus the \
         TMA-store epilogue's wgrad, plus two swap-AB configs' forward (3 epilogues) and dgrad"
    );
    // Store variants: f32 (+ accumulate) for every valid (config, kind, epilogue), the
    // pre-activation store for the activations; f16 inputs and L2 hints once each.
    let mut m = 0;
    for (name, cfg) in Sm90Config::ALL {
        for kind in [GemmKind::Forward, GemmKind::Dgrad, GemmKind::Wgrad] {
            for epi in [Epilogue::None, Epilogue::SwiGlu, Epilogue::Gelu] {
                if cfg.validate(kind, epi).is_err() {
                    continue;
                }
                for store in [
                    Sm90Store {
                        f32_out: true,
                        ..Default::default()
                    },
                    Sm90Store {
                        f32_out: true,
                        accumulate: true,
                        aux: false,
                    },
                    Sm90Store {
                        aux: true,
                        ..Default::default()
                    },
                ] {
                    if cfg.validate_store(kind, epi, store).is_err() {
                        continue;
                    }
                    let d = cfg.defines_store(kind, epi, false, store);
                    cache
                        .cubin(&program(), &d, Arch::SM90)
                        .unwrap_or_else(|e| panic!("{name} {kind:?} {epi:?} {store:?}: {e}"));
                    m += 1;
                }
            }
        }
    }
    assert_eq!(
        m,
        29 * 2 + 16,
        "f32 and f32+accumulate everywhere but swap-AB, aux with activations"
    );
    let acc = Sm90Store {
        f32_out: true,
        accumulate: true,
        aux: false,
    };
    let d = hinted.defines_store(GemmKind::Forward, Epilogue::None, true, acc);
    cache
        .cubin(&program(), &d, Arch::SM90)
        .expect("f16 f32-out");
    let wg = Sm90Config {
        l2_hint: true,
        ..Sm90Config::COOP_256
    };
    let d = wg.defines_store(GemmKind::Wgrad, Epilogue::None, false, acc);
    cache
        .cubin(&program(), &d, Arch::SM90)
        .expect("wgrad default");
    // These must fail to compile, with `why` in the error.
    let refused = |d: &Defines, why: &str| {
        let e = cache
            .cubin(&program(), d, Arch::SM90)
            .unwrap_err()
            .to_string();
        assert!(e.contains(why), "{e}");
    };
    const SMEM_MISMATCH: &str = "Rust smem formula out of sync";
    // A wrong shared-memory mirror.
    let mut d = Sm90Config::COOP_256.defines(GemmKind::Forward, Epilogue::None, false, false);
    d.insert("SM90_SMEM_ONE_EXPERT".into(), "1".into());
    refused(&d, SMEM_MISMATCH);
    // SM90_SWAP_N reaches the Config: without it the 272-row token stages do not match.
    let mut d = Sm90Config::SWAP_272H.defines(GemmKind::Forward, Epilogue::None, false, false);
    assert_eq!(d.remove("SM90_SWAP_N").as_deref(), Some("272"));
    refused(&d, SMEM_MISMATCH);
    // SM90_BM reaches the Config: without it a 256x128 tile's smem mirror does not match
    // (128 x 128 tiles need less), and 256-row ping-pong tiles are rejected by config.cuh.
    let mut d = Sm90Config::TALL_256.defines(GemmKind::Forward, Epilogue::None, false, false);
    assert_eq!(d.remove("SM90_BM").as_deref(), Some("256"));
    refused(&d, SMEM_MISMATCH);
    let pp = Sm90Config {
        bm: 256,
        ..Sm90Config::PINGPONG_128
    };
    refused(
        &pp.defines(GemmKind::Forward, Epilogue::None, false, false),
        "BM is 128, or 256 with the cooperative schedule",
    );
}
