//! Validation, TMA encoding and launch of the Hopper grouped GEMM.

use std::ffi::c_void;

use cudarc::driver::{DriverError, sys};

use super::config::{
    BK, BM, SWAP_BOX_ROWS, SWAP_TAIL_BOX_ROWS, Schedule, Sm90Config, Sm90Store, THREADS,
};
use super::tma::{TileMap, TmaDescriptor};
use crate::buffer::{DType, DeviceTensor};
use crate::cache::{Arch, Defines, Program};
use crate::device::Gpu;
use crate::error::{Error, Result};
use crate::gemm::{Epilogue, GemmKind};
use crate::operands::{
    EngineRules, Meta, check_epilogue, check_row_scale, check_shapes, expect_dtype, fits_i32,
    groups_from_offsets, multiple_of_8,
};

/// Kernel name in [`program`].
pub const KERNEL_NAME: &str = "comet_sm90_grouped_gemm";

/// Error codes the kernel writes to the error flag (first one wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceErrorCode {
    /// A per-tile wait hook gave up (fused kernels).
    HookTimeout = 1,
    /// Expert offsets decrease or leave `[0, rows]` (they were clamped).
    BadOffsets = 2,
    /// A cluster kernel was launched without its cluster dimension.
    BadLaunch = 4,
}

impl DeviceErrorCode {
    /// The code's meaning, for a flag value read back from the device (`None` for 0).
    pub fn from_flag(v: i32) -> Option<std::result::Result<Self, i32>> {
        match v {
            0 => None,
            1 => Some(Ok(Self::HookTimeout)),
            2 => Some(Ok(Self::BadOffsets)),
            4 => Some(Ok(Self::BadLaunch)),
            x => Some(Err(x)),
        }
    }
}

/// Parameter block of the kernel: mirror of `comet_sm90::GroupedGemmArgs`
/// (`cuda/sm90/config.cuh`, which `static_assert`s the same size).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct KernelArgs {
    a: TmaDescriptor,
    b: TmaDescriptor,
    c: TmaDescriptor,
    out: u64,
    expert_offsets: u64,
    row_scale: u64,
    tile_order: u64,
    error_flag: u64,
    num_experts: i32,
    n_out: i32,
    ldo: i32,
    k: i32,
    m_out: i32,
    rows_cap: i32,
    aux: u64,
    ldaux: i32,
    reserved0: i32,
}

/// Mirror of `comet_sm90::NoWait` (the plain GEMM's per-tile hook).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct NoWaitArgs {
    unused: i32,
}

/// Operand descriptions of one Hopper grouped GEMM (validated by [`plan`]).
#[derive(Debug, Clone)]
pub struct Sm90Desc {
    /// Operand layouts (as in [`crate::gemm`]).
    pub kind: GemmKind,
    /// A: rows `[cap, K]` (forward) or `[cap, N]` (dgrad, wgrad).
    pub a: Meta,
    /// B: weights `[G, N, K]` (forward, dgrad) or rows `[cap, K]` (wgrad).
    pub b: Meta,
    /// Expert row offsets, i32 `[G + 1]` (device-resident: read by the kernel).
    pub offsets: Meta,
    /// C: `[cap, N']` (forward; N' = N/2 with SwiGLU), `[cap, K]` (dgrad), `[G, N, K]` (wgrad);
    /// A's dtype, or f32.
    pub c: Meta,
    /// `C += result` instead of `C = result` (f32 C only).
    pub accumulate: bool,
    /// Pre-activation output `[cap, N]` in A's dtype (forward with SwiGLU or GeLU, 16-bit C).
    pub aux: Option<Meta>,
    /// Fused activation (forward only).
    pub epilogue: Epilogue,
    /// Optional per-row scale, f32 `[cap]` (forward, dgrad).
    pub row_scale: Option<Meta>,
    /// Optional tile order, i32 `[n]` of canonical tile ids, `n >= Sm90Plan::max_tiles`.
    pub tile_order: Option<Meta>,
    /// Optional error flag, i32 `[1]`.
    pub error_flag: Option<Meta>,
    /// Engine configuration.
    pub config: Sm90Config,
    /// Most CTAs the persistent grid may have (`None`: one per SM, or as many clusters as
    /// are resident). At least 1 and a multiple of the cluster size; a smaller grid leaves
    /// SMs free for kernels on other streams (e.g. NCCL's), at the cost of GEMM throughput.
    pub max_ctas: Option<u32>,
}

/// A validated launch: sizes, tensor-map shapes and the NVRTC specialisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sm90Plan {
    /// Experts.
    pub groups: usize,
    /// Rows of the row operands.
    pub rows_cap: usize,
    /// Output columns.
    pub n_out: usize,
    /// Output row stride (elements).
    pub ldo: usize,
    /// Reduction length (forward, dgrad).
    pub k: usize,
    /// Output rows per expert (wgrad).
    pub m_out: usize,
    /// Upper bound on the tiles of any routing (length a tile order must have).
    pub max_tiles: usize,
    /// Dynamic shared memory per block.
    pub smem_bytes: usize,
    /// Row stride of the pre-activation output (elements; 0 without it).
    pub ldaux: usize,
    /// What the epilogue stores.
    pub store: Sm90Store,
    /// Tensor map of A (address added at launch).
    pub a_map: TileMap,
    /// Tensor map of B.
    pub b_map: TileMap,
    /// Tensor map of C for the TMA-store epilogue ([`Sm90Config::tma_store`]): C viewed as
    /// `[groups][m_out][ldo]`, dims `{n_out, m_out, groups}`, boxes of 128 bytes x 64 rows
    /// (rows clip at each expert's `m_out`, columns at `n_out`); `None` otherwise.
    pub c_map: Option<TileMap>,
    /// Swap-AB with 272-row chunks ([`Sm90Config::swap_n`]): the token map again with boxes
    /// of [`SWAP_TAIL_BOX_ROWS`] rows (tokens 256..271 of a chunk), passed as the kernel's
    /// third map; `None` otherwise.
    pub a_tail_map: Option<TileMap>,
    /// NVRTC specialisation.
    pub defines: Defines,
}

/// Validates a Hopper grouped GEMM against the engine's limits and derives its plan.
/// `smem_optin` is the device's opt-in shared memory per block.
pub fn plan(d: &Sm90Desc, smem_optin: usize) -> Result<Sm90Plan> {
    d.config.validate(d.kind, d.epilogue)?;
    let elem = d.a.dtype;
    expect_dtype("A", &d.a, &[DType::BF16, DType::F16])?;
    expect_dtype("B", &d.b, &[elem])?;
    expect_dtype(
        "C (the sm90 engine stores A's dtype or f32)",
        &d.c,
        &[elem, DType::F32],
    )?;
    let f32_out = d.c.dtype == DType::F32;
    if d.accumulate && !f32_out {
        return Err(Error::DType {
            what: "C of an accumulating GEMM (the sm90 engine adds in f32 only)".into(),
            got: d.c.dtype.to_string(),
            expected: "f32".into(),
        });
    }
    let groups = groups_from_offsets(&d.offsets)?;
    let rules = EngineRules {
        ungrouped_weights: false,
        why: "TMA row strides are 16-byte multiples",
    };
    let dims = check_shapes(d.kind, d.epilogue, &d.a, &d.b, &d.c, groups, rules)?;
    let rows_cap = dims.rows_cap;
    let esize = elem.size() as u64;
    // Token boxes: 128 rows (a tile of `bm` rows loads `bm / 128`), or swap-AB's chunks of
    // SWAP_BOX_ROWS.
    let token_box = if d.config.swap { SWAP_BOX_ROWS } else { BM };
    let (k, n_out, m_out, a_map, b_map);
    match d.kind {
        GemmKind::Forward => {
            let (bn, bk) = (dims.n, dims.k);
            let parts = if d.epilogue == Epilogue::SwiGlu { 2 } else { 1 };
            let nh = (bn / parts) as u64;
            k = bk;
            n_out = dims.out_cols;
            m_out = 0;
            a_map = TileMap {
                dims: vec![bk as u64, rows_cap as u64],
                strides: vec![bk as u64 * esize],
                box_dims: vec![BK, token_box],
            };
            // Weight boxes: half an n-tile; swap-AB 128 weight rows, or with SwiGLU one box
            // of 8 groups of {8 gate rows, the same 8 up rows} through a 5D view
            // {K, 8, part, F / 8, expert} (F = n_out is a multiple of 8, checked below).
            b_map = if d.config.swap && parts == 2 {
                TileMap {
                    dims: vec![bk as u64, 8, 2, nh / 8, groups as u64],
                    strides: vec![
                        bk as u64 * esize,
                        nh * bk as u64 * esize,
                        8 * bk as u64 * esize,
                        2 * nh * bk as u64 * esize,
                    ],
                    box_dims: vec![BK, 8, 2, 8, 1],
                }
            } else {
                TileMap {
                    dims: vec![bk as u64, nh, parts as u64, groups as u64],
                    strides: vec![
                        bk as u64 * esize,
                        nh * bk as u64 * esize,
                        parts as u64 * nh * bk as u64 * esize,
                    ],
                    box_dims: vec![BK, if d.config.swap { 128 } else { d.config.bn / 2 }, 1, 1],
                }
            };
        }
        GemmKind::Dgrad => {
            let (bn, bk) = (dims.n, dims.k);
            k = bn;
            n_out = dims.out_cols;
            m_out = 0;
            a_map = TileMap {
                dims: vec![bn as u64, rows_cap as u64],
                strides: vec![bn as u64 * esize],
                box_dims: vec![BK, token_box],
            };
            b_map = TileMap {
                dims: vec![bk as u64, bn as u64, groups as u64],
                strides: vec![bk as u64 * esize, (bn * bk) as u64 * esize],
                box_dims: vec![64, 64, 1],
            };
        }
        GemmKind::Wgrad => {
            let (wn, wk) = (dims.n, dims.k);
            fits_i32("groups x N (weight-gradient rows)", groups * wn)?;
            k = 0;
            n_out = dims.out_cols;
            m_out = wn;
            // Boxes of 64 x 64: a tile loads `bm / 64` of A and `bn / 64` of B per stage.
            a_map = TileMap {
                dims: vec![wn as u64, rows_cap as u64],
                strides: vec![wn as u64 * esize],
                box_dims: vec![64, 64],
            };
            b_map = TileMap {
                dims: vec![wk as u64, rows_cap as u64],
                strides: vec![wk as u64 * esize],
                box_dims: vec![64, 64],
            };
        }
    }
    check_epilogue(d.kind, d.epilogue)?;
    let ldaux = match &d.aux {
        Some(aux) => {
            if d.kind != GemmKind::Forward || d.epilogue == Epilogue::None {
                return Err(Error::Invalid(
                    "the pre-activation output exists for a forward GEMM with an activation".into(),
                ));
            }
            if f32_out {
                return Err(Error::DType {
                    what: "C of a GEMM with a pre-activation output (sm90 engine)".into(),
                    got: d.c.dtype.to_string(),
                    expected: elem.to_string(),
                });
            }
            expect_dtype("aux (pre-activation)", aux, &[elem])?;
            if aux.shape != [rows_cap, dims.n] {
                return Err(Error::shape(
                    "aux (pre-activation)",
                    &aux.shape,
                    format!("[{rows_cap}, {}]", dims.n),
                ));
            }
            dims.n
        }
        None => 0,
    };
    let store = Sm90Store {
        f32_out,
        accumulate: d.accumulate,
        aux: d.aux.is_some(),
    };
    d.config.validate_store(d.kind, d.epilogue, store)?;
    multiple_of_8(
        "output columns (row stride of C)",
        n_out,
        "16-byte vector stores",
    )?;
    if let Some(s) = &d.row_scale {
        if d.kind == GemmKind::Wgrad {
            return Err(Error::Invalid(
                "row scaling applies to forward/dgrad, not wgrad".into(),
            ));
        }
        check_row_scale(s, rows_cap)?;
    }
    if let Some(f) = &d.error_flag {
        expect_dtype("error flag", f, &[DType::I32])?;
        if f.shape.iter().product::<usize>() != 1 {
            return Err(Error::shape("error flag", &f.shape, "i32 [1]"));
        }
    }
    for (what, v) in [("rows", rows_cap), ("output columns", n_out), ("K", k)] {
        fits_i32(what, v)?;
    }
    // Canonical tiles (scheduler.cuh): m-tiles of `bm` rows per expert (forward/dgrad: at most
    // one partial tile per expert; wgrad: `ceil(m_out / bm)`), times the n-tiles. Swap-AB
    // chunks: at most ceil(rows / 256) per expert (swap_chunks), so at most
    // rows_cap / 256 + groups in all.
    let n_tiles = n_out.div_ceil(d.config.out_bn(d.epilogue) as usize);
    let bm = d.config.bm as usize;
    let max_tiles = if d.kind == GemmKind::Wgrad {
        groups * m_out.div_ceil(bm) * n_tiles
    } else if d.config.swap {
        (rows_cap / 256 + groups) * n_tiles
    } else {
        (rows_cap / bm + groups) * n_tiles
    };
    fits_i32("tiles", max_tiles)?;
    if let Some(o) = &d.tile_order {
        expect_dtype("tile order", o, &[DType::I32])?;
        if o.shape.len() != 1 || o.shape[0] < max_tiles {
            return Err(Error::shape(
                "tile order",
                &o.shape,
                format!("i32 [n] with n >= {max_tiles} (the most tiles any routing can have)"),
            ));
        }
    }
    if let Some(cap) = d.max_ctas {
        check_max_ctas(cap, d.config.cluster)?;
    }
    let smem_bytes = d.config.smem_bytes(groups);
    if smem_bytes > smem_optin {
        return Err(Error::limit(
            format!("groups (experts): shared memory of {smem_bytes} bytes"),
            groups,
            format!("{smem_optin} bytes per block on this device"),
        ));
    }
    // The TMA-store epilogue's map over C (weight gradients: `validate` refused the rest).
    let c_map = d.config.tma_store.then(|| {
        let esize_c = d.c.dtype.size() as u64;
        TileMap {
            dims: vec![n_out as u64, m_out as u64, groups as u64],
            strides: vec![n_out as u64 * esize_c, (m_out * n_out) as u64 * esize_c],
            box_dims: vec![(128 / esize_c) as u32, 64, 1],
        }
    });
    let a_tail_map = (d.config.swap && d.config.swap_n > 256).then(|| TileMap {
        box_dims: vec![BK, SWAP_TAIL_BOX_ROWS],
        ..a_map.clone()
    });
    let f16 = elem == DType::F16;
    Ok(Sm90Plan {
        groups,
        rows_cap,
        n_out,
        ldo: n_out,
        k,
        m_out,
        max_tiles,
        smem_bytes,
        ldaux,
        store,
        a_map,
        b_map,
        c_map,
        a_tail_map,
        defines: d.config.defines_store(d.kind, d.epilogue, f16, store),
    })
}

/// A CTA cap is at least 1 and a whole number of clusters.
fn check_max_ctas(cap: u32, cluster: u32) -> Result<()> {
    if cap == 0 {
        return Err(Error::limit("max_ctas (CTAs of the grid)", 0, ">= 1"));
    }
    if cap % cluster != 0 {
        return Err(Error::Alignment {
            what: "max_ctas (CTAs of the grid)".into(),
            value: cap as usize,
            multiple: cluster as usize,
            why: "the grid holds whole clusters",
        });
    }
    Ok(())
}

/// Whether the Hopper engine can run this GEMM on a device with `smem_optin` bytes of
/// shared memory per block (if not, use the portable `mma.sync` engine).
pub fn supports(d: &Sm90Desc, smem_optin: usize) -> bool {
    plan(d, smem_optin).is_ok()
}

/// The headers of the engine, by include name (`sm90/<file>.cuh`), plus this crate's.
pub fn headers() -> Vec<(
    std::borrow::Cow<'static, str>,
    std::borrow::Cow<'static, str>,
)> {
    let mut h = crate::sources::headers();
    for (name, src) in SM90_HEADERS {
        h.push(((*name).into(), (*src).into()));
    }
    h
}

/// The embedded engine headers (include names and sources).
pub const SM90_HEADERS: &[(&str, &str)] = &[
    ("sm90/ptx.cuh", include_str!("../../cuda/sm90/ptx.cuh")),
    ("sm90/wgmma.cuh", include_str!("../../cuda/sm90/wgmma.cuh")),
    (
        "sm90/config.cuh",
        include_str!("../../cuda/sm90/config.cuh"),
    ),
    (
        "sm90/scheduler.cuh",
        include_str!("../../cuda/sm90/scheduler.cuh"),
    ),
    (
        "sm90/mainloop.cuh",
        include_str!("../../cuda/sm90/mainloop.cuh"),
    ),
    (
        "sm90/epilogue.cuh",
        include_str!("../../cuda/sm90/epilogue.cuh"),
    ),
    (
        "sm90/grouped_gemm.cuh",
        include_str!("../../cuda/sm90/grouped_gemm.cuh"),
    ),
];

/// The NVRTC entry point of the plain grouped GEMM.
pub const GROUPED_GEMM_SM90_CU: &str = include_str!("../../cuda/sm90/grouped_gemm_sm90.cu");

/// The grouped GEMM program (specialise it with an [`Sm90Plan`]'s defines).
pub fn program() -> Program {
    Program {
        name: "sm90/grouped_gemm_sm90.cu".into(),
        source: GROUPED_GEMM_SM90_CU.into(),
        headers: headers(),
    }
}

/// Arguments of one Hopper grouped GEMM. Build with [`Sm90Gemm::forward`],
/// [`Sm90Gemm::dgrad`] or [`Sm90Gemm::wgrad`], refine, run with [`grouped_gemm`].
#[derive(Debug)]
pub struct Sm90Gemm<'a> {
    kind: GemmKind,
    a: &'a DeviceTensor,
    b: &'a DeviceTensor,
    offsets: &'a DeviceTensor,
    c: &'a mut DeviceTensor,
    epilogue: Epilogue,
    accumulate: bool,
    aux: Option<&'a mut DeviceTensor>,
    row_scale: Option<&'a DeviceTensor>,
    tile_order: Option<&'a DeviceTensor>,
    error_flag: Option<&'a mut DeviceTensor>,
    config: Option<Sm90Config>,
    max_ctas: Option<u32>,
}

impl<'a> Sm90Gemm<'a> {
    fn new(
        kind: GemmKind,
        a: &'a DeviceTensor,
        b: &'a DeviceTensor,
        offsets: &'a DeviceTensor,
        c: &'a mut DeviceTensor,
    ) -> Self {
        Sm90Gemm {
            kind,
            a,
            b,
            offsets,
            c,
            epilogue: Epilogue::None,
            accumulate: false,
            aux: None,
            row_scale: None,
            tile_order: None,
            error_flag: None,
            config: None,
            max_ctas: None,
        }
    }
    /// `c[rows, N'] = x_rows[rows, K] · w[g][N, K]ᵀ` for the rows of each expert `g`.
    pub fn forward(
        x_rows: &'a DeviceTensor,
        w: &'a DeviceTensor,
        offsets: &'a DeviceTensor,
        c: &'a mut DeviceTensor,
    ) -> Self {
        Self::new(GemmKind::Forward, x_rows, w, offsets, c)
    }
    /// `c[rows, K] = dy_rows[rows, N] · w[g][N, K]`.
    pub fn dgrad(
        dy_rows: &'a DeviceTensor,
        w: &'a DeviceTensor,
        offsets: &'a DeviceTensor,
        c: &'a mut DeviceTensor,
    ) -> Self {
        Self::new(GemmKind::Dgrad, dy_rows, w, offsets, c)
    }
    /// `dw[g][N, K] = Σ_{rows r of g} dy_rows[r, N]ᵀ x_rows[r, K]`.
    pub fn wgrad(
        dy_rows: &'a DeviceTensor,
        x_rows: &'a DeviceTensor,
        offsets: &'a DeviceTensor,
        dw: &'a mut DeviceTensor,
    ) -> Self {
        Self::new(GemmKind::Wgrad, dy_rows, x_rows, offsets, dw)
    }
    /// Fused activation (forward).
    pub fn epilogue(mut self, e: Epilogue) -> Self {
        self.epilogue = e;
        self
    }
    /// Add into C (`C += A·B`, e.g. gradient accumulation across calls) instead of
    /// overwriting it; C must be f32. A tile whose reduction is empty (wgrad: an expert
    /// without rows) leaves its part of C as it was. With a [`Sm90Gemm::tile_order`], each
    /// tile id must appear once (a repeated id would add its tile twice).
    pub fn accumulate(mut self, on: bool) -> Self {
        self.accumulate = on;
        self
    }
    /// Also store the pre-activation `[rows, N]` (A's dtype) of a forward GEMM with SwiGLU
    /// (gate columns `0..N/2`, up `N/2..N`) or GeLU, before the row scale; C stays 16-bit.
    pub fn aux(mut self, aux: &'a mut DeviceTensor) -> Self {
        self.aux = Some(aux);
        self
    }
    /// Multiply output row `r` by `scale[r]` (f32 `[rows]`; forward, dgrad).
    pub fn row_scale(mut self, scale: &'a DeviceTensor) -> Self {
        self.row_scale = Some(scale);
        self
    }
    /// Run tiles in this device-resident order (i32 canonical tile ids; see
    /// `cuda/sm90/scheduler.cuh`; ids outside the routing's tiles are skipped).
    pub fn tile_order(mut self, order: &'a DeviceTensor) -> Self {
        self.tile_order = Some(order);
        self
    }
    /// Device i32 flag that receives the first [`DeviceErrorCode`] (zero it beforehand).
    pub fn error_flag(mut self, flag: &'a mut DeviceTensor) -> Self {
        self.error_flag = Some(flag);
        self
    }
    /// Use this configuration instead of [`Sm90Config::choose`]'s.
    pub fn config(mut self, c: Sm90Config) -> Self {
        self.config = Some(c);
        self
    }
    /// Launch at most `n` CTAs (default: one per SM, or every resident cluster). [`plan`]
    /// rejects 0 and a count that is not a multiple of the cluster size; see
    /// [`Sm90Gemm::within_ctas`] for a cap that adapts to the configuration.
    pub fn max_ctas(mut self, n: u32) -> Self {
        self.max_ctas = Some(n);
        self
    }
    /// Launch at most `cap` CTAs whatever the configuration: the largest whole number of
    /// clusters within `cap`, or, when `cap` is below one cluster, the same configuration on
    /// single CTAs (`cluster = 1`) with `cap` CTAs. `cap = 0` is kept as is ([`plan`] rejects
    /// it). For callers that think in SMs (leave `SMs − cap` free for other streams).
    pub fn within_ctas(self, cap: usize) -> Self {
        let config = self.chosen_config();
        let cap = u32::try_from(cap).unwrap_or(u32::MAX);
        let (config, n) = ctas_within(config, cap);
        self.config(config).max_ctas(n)
    }

    /// The configuration this GEMM runs with (explicit or [`Sm90Config::choose_for`]'s).
    fn chosen_config(&self) -> Sm90Config {
        let groups = self
            .offsets
            .shape()
            .first()
            .map_or(0, |n| n.saturating_sub(1));
        let rows = self.a.shape().first().copied().unwrap_or(0);
        let store = Sm90Store {
            f32_out: self.c.dtype() == DType::F32,
            accumulate: self.accumulate,
            aux: self.aux.is_some(),
        };
        self.config.unwrap_or_else(|| {
            Sm90Config::choose_for(self.kind, self.epilogue, groups, rows, store)
        })
    }

    /// The operand description (what [`plan`] validates).
    pub fn desc(&self) -> Sm90Desc {
        Sm90Desc {
            kind: self.kind,
            a: Meta::of(self.a),
            b: Meta::of(self.b),
            offsets: Meta::of(self.offsets),
            c: Meta::of(self.c),
            accumulate: self.accumulate,
            aux: self.aux.as_deref().map(Meta::of),
            epilogue: self.epilogue,
            row_scale: self.row_scale.map(Meta::of),
            tile_order: self.tile_order.map(Meta::of),
            error_flag: self.error_flag.as_deref().map(Meta::of),
            config: self.chosen_config(),
            max_ctas: self.max_ctas,
        }
    }
}

/// The configuration and CTA count of a grid capped at `cap` CTAs (see
/// [`Sm90Gemm::within_ctas`]).
fn ctas_within(config: Sm90Config, cap: u32) -> (Sm90Config, u32) {
    let cluster = config.cluster.max(1);
    if cap == 0 || cap >= cluster {
        (config, cap - cap % cluster)
    } else {
        (
            Sm90Config {
                cluster: 1,
                ..config
            },
            cap,
        )
    }
}

fn driver(r: sys::CUresult) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(Error::Driver(DriverError(r)))
    }
}

/// Runs a Hopper grouped GEMM on `gpu`'s stream (asynchronous; no host synchronisation:
/// the grid is persistent and the kernel reads the expert offsets on the device).
pub fn grouped_gemm(gpu: &Gpu, g: Sm90Gemm<'_>) -> Result<()> {
    if gpu.arch() != Arch::SM90 {
        return Err(Error::Invalid(format!(
            "the sm90 engine needs compute capability 9.0 (wgmma, TMA); device {} is {}.{}",
            gpu.ordinal(),
            gpu.arch().major,
            gpu.arch().minor
        )));
    }
    let desc = g.desc();
    let plan = plan(&desc, gpu.smem_optin() as usize)?;
    for (what, t) in [
        ("A", Some(g.a)),
        ("B", Some(g.b)),
        ("offsets", Some(g.offsets)),
        ("row_scale", g.row_scale),
        ("tile order", g.tile_order),
    ] {
        if let Some(t) = t {
            t.check_device(gpu, what)?;
        }
    }
    g.c.check_device(gpu, "C")?;
    if let Some(f) = g.error_flag.as_deref() {
        f.check_device(gpu, "error flag")?;
    }
    if let Some(aux) = g.aux.as_deref() {
        aux.check_device(gpu, "aux")?;
    }
    for (what, ptr) in [
        ("C device address", Some(g.c.device_ptr())),
        (
            "aux device address",
            g.aux.as_deref().map(|t| t.device_ptr()),
        ),
    ] {
        if let Some(ptr) = ptr.filter(|p| p % 16 != 0) {
            return Err(Error::Alignment {
                what: what.into(),
                value: ptr as usize,
                multiple: 16,
                why: "16-byte vector stores",
            });
        }
    }
    let elem = g.a.dtype();
    let args = KernelArgs {
        a: plan.a_map.encode("A", elem, g.a.device_ptr())?,
        b: plan.b_map.encode("B", elem, g.b.device_ptr())?,
        c: match (&plan.c_map, &plan.a_tail_map) {
            (Some(m), _) => m.encode("C", g.c.dtype(), g.c.device_ptr())?,
            (None, Some(m)) => m.encode("A (272-row chunk tails)", elem, g.a.device_ptr())?,
            (None, None) => TmaDescriptor::unused(),
        },
        out: g.c.device_ptr(),
        expert_offsets: g.offsets.device_ptr(),
        row_scale: g.row_scale.map_or(0, |t| t.device_ptr()),
        tile_order: g.tile_order.map_or(0, |t| t.device_ptr()),
        error_flag: g.error_flag.as_deref().map_or(0, |t| t.device_ptr()),
        num_experts: plan.groups as i32,
        n_out: plan.n_out as i32,
        ldo: plan.ldo as i32,
        k: plan.k as i32,
        m_out: plan.m_out as i32,
        rows_cap: plan.rows_cap as i32,
        aux: g.aux.as_deref().map_or(0, |t| t.device_ptr()),
        ldaux: plan.ldaux as i32,
        reserved0: 0,
    };
    let hook = NoWaitArgs { unused: 0 };
    let f = gpu.function(&program(), &plan.defines, KERNEL_NAME)?;
    gpu.context().bind_to_thread()?;
    f.set_attribute(
        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        plan.smem_bytes as i32,
    )?;
    let cluster = desc.config.cluster;
    // SAFETY: plain-old-data union; every field of the attribute value is valid zeroed.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
    attr.value.clusterDim = sys::CUlaunchAttributeValue_union__bindgen_ty_1 {
        x: cluster,
        y: 1,
        z: 1,
    };
    let mut cfg = sys::CUlaunchConfig {
        gridDimX: gpu.sm_count(),
        gridDimY: 1,
        gridDimZ: 1,
        blockDimX: THREADS,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: plan.smem_bytes as u32,
        hStream: gpu.stream().cu_stream(),
        attrs: &mut attr,
        numAttrs: 1,
    };
    // Persistent grid: one CTA per SM, or as many 2-CTA clusters as can be resident, capped
    // by `max_ctas`.
    if cluster > 1 {
        let mut clusters: i32 = 0;
        // SAFETY: `cfg` and its attribute outlive the call; `f` is a loaded function.
        driver(unsafe { sys::cuOccupancyMaxActiveClusters(&mut clusters, f.cu_function(), &cfg) })?;
        if clusters < 1 {
            return Err(Error::Invalid(format!(
                "no {cluster}-CTA cluster of {} bytes of shared memory fits this device",
                plan.smem_bytes
            )));
        }
        cfg.gridDimX = clusters as u32 * cluster;
    }
    if let Some(cap) = desc.max_ctas {
        // A multiple of the cluster size (checked by `plan`): the grid stays whole clusters.
        cfg.gridDimX = cfg.gridDimX.min(cap);
    }
    let _span = tracing::trace_span!(
        "sm90_grouped_gemm",
        kind = ?desc.kind,
        groups = plan.groups,
        n = plan.n_out,
        grid = cfg.gridDimX,
        cluster,
        bm = desc.config.bm,
        pingpong = desc.config.schedule == Schedule::PingPong,
        f32_out = plan.store.f32_out,
        accumulate = plan.store.accumulate,
        aux = plan.store.aux
    )
    .entered();
    let mut params: [*mut c_void; 2] = [
        &args as *const KernelArgs as *mut c_void,
        &hook as *const NoWaitArgs as *mut c_void,
    ];
    // SAFETY: `KernelArgs`/`NoWaitArgs` mirror the kernel's two parameters (layout asserted
    // by tests here and `static_assert`s in the CUDA headers); `plan` checked every operand's
    // dtype, shape and stride against what the tensor maps and stores use; the kernel clamps
    // device offsets to `rows_cap`, so no access leaves the tensors. The driver copies the
    // parameters during the call.
    driver(unsafe {
        sys::cuLaunchKernelEx(
            &cfg,
            f.cu_function(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fwd(a: &[usize], b: &[usize], c: &[usize], g: usize) -> Sm90Desc {
        Sm90Desc {
            kind: GemmKind::Forward,
            a: Meta::new(DType::BF16, a),
            b: Meta::new(DType::BF16, b),
            offsets: Meta::new(DType::I32, &[g + 1]),
            c: Meta::new(DType::BF16, c),
            accumulate: false,
            aux: None,
            epilogue: Epilogue::None,
            row_scale: None,
            tile_order: None,
            error_flag: None,
            config: Sm90Config::COOP_256,
            max_ctas: None,
        }
    }
    /// A weight-gradient desc: `dy [rows, m]`, `x [rows, n]` into `c [g, m, n]` of `c_dtype`.
    fn wgrad(
        rows: usize,
        m: usize,
        n: usize,
        g: usize,
        c_dtype: DType,
        accumulate: bool,
    ) -> Sm90Desc {
        Sm90Desc {
            kind: GemmKind::Wgrad,
            a: Meta::new(DType::BF16, &[rows, m]),
            b: Meta::new(DType::BF16, &[rows, n]),
            c: Meta::new(c_dtype, &[g, m, n]),
            accumulate,
            ..fwd(&[rows, m], &[g, n, m], &[rows, n], g)
        }
    }
    const OPTIN: usize = 232_448;

    #[test]
    fn kernel_args_layout() {
        use std::mem::{align_of, offset_of, size_of};
        // The offsets config.cuh lists beside its static_assert on the size.
        assert_eq!(size_of::<KernelArgs>(), 512);
        assert_eq!(align_of::<KernelArgs>(), 128);
        assert_eq!(offset_of!(KernelArgs, b), 128);
        assert_eq!(offset_of!(KernelArgs, c), 256);
        assert_eq!(offset_of!(KernelArgs, out), 384);
        assert_eq!(offset_of!(KernelArgs, expert_offsets), 392);
        assert_eq!(offset_of!(KernelArgs, row_scale), 400);
        assert_eq!(offset_of!(KernelArgs, tile_order), 408);
        assert_eq!(offset_of!(KernelArgs, error_flag), 416);
        assert_eq!(offset_of!(KernelArgs, num_experts), 424);
        assert_eq!(offset_of!(KernelArgs, n_out), 428);
        assert_eq!(offset_of!(KernelArgs, ldo), 432);
        assert_eq!(offset_of!(KernelArgs, k), 436);
        assert_eq!(offset_of!(KernelArgs, m_out), 440);
        assert_eq!(offset_of!(KernelArgs, rows_cap), 444);
        assert_eq!(offset_of!(KernelArgs, aux), 448);
        assert_eq!(offset_of!(KernelArgs, ldaux), 456);
        assert_eq!(size_of::<NoWaitArgs>(), 4);
    }

    #[test]
    fn forward_plan_maps() {
        let p = plan(
            &fwd(&[16384, 4096], &[8, 28672, 4096], &[16384, 28672], 8),
            OPTIN,
        )
        .unwrap();
        assert_eq!(
            (p.groups, p.rows_cap, p.n_out, p.k),
            (8, 16384, 28672, 4096)
        );
        assert_eq!(p.a_map.dims, vec![4096, 16384]);
        assert_eq!(p.b_map.dims, vec![4096, 28672, 1, 8]);
        assert_eq!(p.b_map.box_dims, vec![64, 128, 1, 1]);
        assert_eq!(p.max_tiles, (16384 / 128 + 8) * 112);
        let mut d = fwd(&[100, 512], &[3, 400, 512], &[100, 200], 3);
        d.epilogue = Epilogue::SwiGlu;
        let p = plan(&d, OPTIN).unwrap();
        assert_eq!(p.n_out, 200);
        assert_eq!(p.b_map.dims, vec![512, 200, 2, 3]);
        assert_eq!(p.b_map.strides, vec![1024, 200 * 1024, 400 * 1024]);
        assert_eq!(p.defines["SM90_EPI"], "1");
    }

    #[test]
    fn swap_ab_plans() {
        // Forward: tokens in boxes of 32 rows, 128 weight rows per box; at most
        // rows_cap / 256 + groups chunks, 128 output columns per tile.
        let mut d = fwd(&[4096, 7168], &[256, 4096, 7168], &[4096, 4096], 256);
        d.config = Sm90Config::SWAP_256H;
        let p = plan(&d, OPTIN).unwrap();
        assert_eq!(p.a_map.box_dims, vec![64, 32]);
        assert_eq!(p.b_map.box_dims, vec![64, 128, 1, 1]);
        assert_eq!(p.max_tiles, (4096 / 256 + 256) * (4096 / 128));
        assert_eq!(p.defines["SM90_SWAP"], "1");
        // SwiGLU: one box of 8 groups of {8 gate rows, the same 8 up rows} through the 5D
        // view {K, 8, part, F / 8, expert}; 64 output columns per tile.
        d.epilogue = Epilogue::SwiGlu;
        d.c = Meta::new(DType::BF16, &[4096, 2048]);
        let p = plan(&d, OPTIN).unwrap();
        assert_eq!(p.b_map.dims, vec![7168, 8, 2, 256, 256]);
        assert_eq!(
            p.b_map.strides,
            vec![7168 * 2, 2048 * 7168 * 2, 8 * 7168 * 2, 2 * 2048 * 7168 * 2]
        );
        assert_eq!(p.b_map.box_dims, vec![64, 8, 2, 8, 1]);
        assert_eq!(p.max_tiles, (4096 / 256 + 256) * (2048 / 64));
        // 272-row chunks add the token map with 16-row boxes (rows 256..271).
        d.config = Sm90Config::SWAP_272H;
        let p = plan(&d, OPTIN).unwrap();
        let tail = p.a_tail_map.expect("a tail map");
        assert_eq!((tail.dims, tail.box_dims), (p.a_map.dims, vec![64, 16]));
        assert_eq!(
            plan(
                &fwd(&[4096, 7168], &[256, 4096, 7168], &[4096, 4096], 256),
                OPTIN
            )
            .unwrap()
            .a_tail_map,
            None
        );
        // Dgrad: the same token boxes, weights in 64 x 64 boxes as without swap-AB.
        let mut d = fwd(&[300, 2048], &[16, 2048, 4096], &[300, 4096], 16);
        d.kind = GemmKind::Dgrad;
        d.config = Sm90Config::SWAP_256H;
        let p = plan(&d, OPTIN).unwrap();
        assert_eq!(p.a_map.box_dims, vec![64, 32]);
        assert_eq!(p.b_map.box_dims, vec![64, 64, 1]);
        // An f32 C is refused with the reason.
        d.c = Meta::new(DType::F32, &[300, 4096]);
        let msg = plan(&d, OPTIN).unwrap_err().to_string();
        assert!(msg.contains("swap-AB stores a 16-bit C"), "{msg}");
    }

    #[test]
    fn dgrad_and_wgrad_plans() {
        let mut d = fwd(&[300, 2048], &[16, 2048, 4096], &[300, 4096], 16);
        d.kind = GemmKind::Dgrad;
        let p = plan(&d, OPTIN).unwrap();
        assert_eq!((p.n_out, p.k), (4096, 2048));
        assert_eq!(p.b_map.dims, vec![4096, 2048, 16]);
        let w = Sm90Desc {
            config: Sm90Config::COOP_256,
            ..wgrad(300, 2048, 4096, 16, DType::BF16, false)
        };
        let p = plan(&w, OPTIN).unwrap();
        assert_eq!((p.m_out, p.n_out), (2048, 4096));
        assert_eq!(p.max_tiles, 16 * 16 * 16);
        assert_eq!(p.c_map, None, "stores from registers: no map over C");
        let mut w2 = w.clone();
        w2.config = Sm90Config::COOP_256_C2;
        assert!(matches!(plan(&w2, OPTIN), Err(Error::Invalid(_))));
        // The TMA-store epilogue: C viewed as [groups][m_out][n_out], 128-byte boxes of 64 rows
        // (64 bf16 or 32 f32 columns); rows clip at m_out, columns at n_out.
        let mut ts = w.clone();
        ts.config = Sm90Config::WGRAD_TS;
        let c = plan(&ts, OPTIN).unwrap().c_map.expect("a map over C");
        assert_eq!(c.dims, vec![4096, 2048, 16]);
        assert_eq!(c.strides, vec![4096 * 2, 2048 * 4096 * 2]);
        assert_eq!(c.box_dims, vec![64, 64, 1]);
        ts.c = Meta::new(DType::F32, &[16, 2048, 4096]);
        ts.accumulate = true;
        let p = plan(&ts, OPTIN).unwrap();
        let c = p.c_map.expect("a map over C");
        assert_eq!(c.strides, vec![4096 * 4, 2048 * 4096 * 4]);
        assert_eq!(c.box_dims, vec![32, 64, 1]);
        assert_eq!(p.defines["SM90_TSTORE"], "1");
        c.check("C", DType::F32, 0).unwrap();
        // Forward is refused (the map could not stop at an expert's last row).
        let mut f = fwd(&[300, 2048], &[16, 2048, 4096], &[300, 2048], 16);
        f.config = Sm90Config::WGRAD_TS;
        assert!(matches!(plan(&f, OPTIN), Err(Error::Invalid(_))));
    }

    #[test]
    fn tall_tile_plans() {
        // Forward, 256-row tiles: A still loads in boxes of 128 rows (two per tile); at most
        // rows_cap / 256 full m-tiles plus one partial per expert; n-tiles of 128 columns.
        let mut d = fwd(&[16384, 4096], &[8, 28672, 4096], &[16384, 28672], 8);
        d.config = Sm90Config::TALL_256;
        let p = plan(&d, OPTIN).unwrap();
        assert_eq!(p.a_map.box_dims, vec![64, 128]);
        assert_eq!(p.b_map.box_dims, vec![64, 64, 1, 1]);
        assert_eq!(p.max_tiles, (16384 / 256 + 8) * (28672 / 128));
        assert_eq!(p.defines["SM90_BM"], "256");
        assert_eq!(p.smem_bytes, Sm90Config::TALL_256.smem_bytes(8));
        // SwiGLU: 64 output columns per tile; ragged rows (300 = one full tile + a partial).
        let mut d = fwd(&[300, 512], &[3, 400, 512], &[300, 200], 3);
        d.epilogue = Epilogue::SwiGlu;
        d.config = Sm90Config::TALL_256_C2;
        let p = plan(&d, OPTIN).unwrap();
        assert_eq!(p.max_tiles, (300 / 256 + 3) * 200usize.div_ceil(64));
        // A tile order one id short of the worst case is rejected.
        d.tile_order = Some(Meta::new(DType::I32, &[p.max_tiles - 1]));
        let e = plan(&d, OPTIN).unwrap_err();
        assert!(
            e.to_string().contains(&format!(">= {}", p.max_tiles)),
            "{e}"
        );
        // Dgrad: same A boxes, 2 x 64 columns of B per tile.
        let mut d = fwd(&[300, 2048], &[16, 2048, 4096], &[300, 4096], 16);
        d.kind = GemmKind::Dgrad;
        d.config = Sm90Config::TALL_256;
        let p = plan(&d, OPTIN).unwrap();
        assert_eq!(p.a_map.box_dims, vec![64, 128]);
        assert_eq!(p.max_tiles, (300 / 256 + 16) * (4096 / 128));
        // Wgrad: A boxes of 64 x 64 (four per 256-row tile), ceil(m_out / 256) m-tiles.
        let w = Sm90Desc {
            config: Sm90Config::TALL_256,
            ..wgrad(300, 2000, 4096, 16, DType::F32, true)
        };
        let p = plan(&w, OPTIN).unwrap();
        assert_eq!(p.a_map.box_dims, vec![64, 64]);
        assert_eq!(p.max_tiles, 16 * 2000usize.div_ceil(256) * (4096 / 128));
        assert_eq!(p.defines["SM90_BM"], "256");
        let mut w2 = w.clone();
        w2.config = Sm90Config::TALL_256_C2;
        assert!(matches!(plan(&w2, OPTIN), Err(Error::Invalid(_))));
        // 256-row tiles on the ping-pong schedule are rejected by plan too.
        let mut bad = w.clone();
        bad.config = Sm90Config {
            bm: 256,
            ..Sm90Config::PINGPONG_128
        };
        let e = plan(&bad, OPTIN).unwrap_err();
        assert!(e.to_string().contains("cooperative"), "{e}");
    }

    #[test]
    fn errors_name_the_value_and_the_limit() {
        // K = 1001 is not a multiple of 8 (TMA row stride).
        let e = plan(&fwd(&[10, 1001], &[2, 64, 1001], &[10, 64], 2), OPTIN).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Alignment {
                    value: 1001,
                    multiple: 8,
                    ..
                }
            ),
            "{e}"
        );
        // Output columns not a multiple of 8 (vector stores): fall back to mma.sync.
        let e = plan(&fwd(&[10, 64], &[2, 196, 64], &[10, 196], 2), OPTIN).unwrap_err();
        assert!(matches!(e, Error::Alignment { value: 196, .. }), "{e}");
        // Too many experts for the scheduler's shared memory.
        let e = plan(&fwd(&[10, 64], &[4096, 64, 64], &[10, 64], 4096), OPTIN).unwrap_err();
        assert!(matches!(e, Error::Limit { value: 4096, .. }), "{e}");
        assert!(e.to_string().contains("232448"), "{e}");
        // Output dtypes: A's or f32; accumulation in f32 only.
        let mut d = fwd(&[10, 64], &[2, 64, 64], &[10, 64], 2);
        d.c.dtype = DType::F16;
        assert!(matches!(plan(&d, OPTIN), Err(Error::DType { .. })));
        d.c.dtype = DType::BF16;
        d.accumulate = true;
        let e = plan(&d, OPTIN).unwrap_err();
        assert!(matches!(e, Error::DType { .. }), "{e}");
        assert!(e.to_string().contains("accumulating"), "{e}");
        // A tile order too short for the worst-case routing.
        let mut d = fwd(&[256, 64], &[2, 256, 64], &[256, 256], 2);
        d.tile_order = Some(Meta::new(DType::I32, &[3]));
        let e = plan(&d, OPTIN).unwrap_err();
        assert!(e.to_string().contains(">= 4"), "{e}");
        // Activation on a backward GEMM.
        let mut d = fwd(&[10, 64], &[2, 64, 64], &[10, 64], 2);
        d.kind = GemmKind::Dgrad;
        d.epilogue = Epilogue::Gelu;
        assert!(plan(&d, OPTIN).is_err());
        // Wrong group count.
        let e = plan(&fwd(&[10, 64], &[3, 64, 64], &[10, 64], 2), OPTIN).unwrap_err();
        assert!(e.to_string().contains("2 groups"), "{e}");
        assert!(!supports(
            &fwd(&[10, 64], &[3, 64, 64], &[10, 64], 2),
            OPTIN
        ));
        assert!(supports(&fwd(&[10, 64], &[2, 64, 64], &[10, 64], 2), OPTIN));
    }

    #[test]
    fn f32_accumulate_and_aux_stores() {
        // wgrad in f32 with accumulation (the backward's weight gradients).
        let w = Sm90Desc {
            config: Sm90Config::choose(GemmKind::Wgrad, Epilogue::None, 16, 300),
            ..wgrad(300, 2048, 4096, 16, DType::F32, true)
        };
        let p = plan(&w, OPTIN).unwrap();
        assert_eq!(
            p.store,
            Sm90Store {
                f32_out: true,
                accumulate: true,
                aux: false
            }
        );
        assert_eq!(
            (
                p.defines["SM90_OUT_F32"].as_str(),
                p.defines["SM90_ACCUM"].as_str()
            ),
            ("1", "1")
        );
        assert_eq!(p.defines["SM90_OUT_F16"], "0");
        assert_eq!(
            p.smem_bytes,
            Sm90Config::WGRAD_TS.smem_bytes(16),
            "the store variant needs no shared memory beyond its configuration's"
        );
        // f32 forward and dgrad, with and without accumulation.
        for kind in [GemmKind::Forward, GemmKind::Dgrad] {
            for acc in [false, true] {
                let mut d = fwd(&[300, 2048], &[16, 2048, 2048], &[300, 2048], 16);
                d.kind = kind;
                d.c.dtype = DType::F32;
                d.accumulate = acc;
                let p = plan(&d, OPTIN).unwrap();
                assert!(p.store.f32_out && p.store.accumulate == acc);
            }
        }
        // The default store keeps the default kernel's macros.
        let p = plan(&fwd(&[10, 64], &[2, 64, 64], &[10, 64], 2), OPTIN).unwrap();
        assert_eq!(p.store, Sm90Store::default());
        assert!(!p.defines.contains_key("SM90_OUT_F32") && !p.defines.contains_key("SM90_AUX"));
        // Pre-activation output: [rows, N] of A's dtype, forward with an activation only.
        let mut s = fwd(&[100, 512], &[3, 400, 512], &[100, 200], 3);
        s.epilogue = Epilogue::SwiGlu;
        s.aux = Some(Meta::new(DType::BF16, &[100, 400]));
        let p = plan(&s, OPTIN).unwrap();
        assert_eq!((p.ldaux, p.store.aux), (400, true));
        assert_eq!(p.defines["SM90_AUX"], "1");
        let mut bad = s.clone();
        bad.aux = Some(Meta::new(DType::BF16, &[100, 200]));
        let e = plan(&bad, OPTIN).unwrap_err();
        assert!(e.to_string().contains("[100, 400]"), "{e}");
        let mut bad = s.clone();
        bad.aux = Some(Meta::new(DType::F16, &[100, 400]));
        assert!(matches!(plan(&bad, OPTIN), Err(Error::DType { .. })));
        let mut bad = s.clone();
        bad.epilogue = Epilogue::None;
        bad.c = Meta::new(DType::BF16, &[100, 400]);
        assert!(matches!(plan(&bad, OPTIN), Err(Error::Invalid(_))));
        let mut bad = s.clone();
        bad.c.dtype = DType::F32;
        assert!(matches!(plan(&bad, OPTIN), Err(Error::DType { .. })));
        let mut g = fwd(&[100, 512], &[3, 400, 512], &[100, 400], 3);
        g.epilogue = Epilogue::Gelu;
        g.aux = Some(Meta::new(DType::BF16, &[100, 400]));
        assert_eq!(plan(&g, OPTIN).unwrap().ldaux, 400);
    }

    #[test]
    fn cta_caps_are_validated() {
        let mut d = fwd(&[10, 64], &[2, 64, 64], &[10, 64], 2);
        d.max_ctas = Some(0);
        let e = plan(&d, OPTIN).unwrap_err();
        assert!(matches!(e, Error::Limit { value: 0, .. }), "{e}");
        d.max_ctas = Some(1);
        plan(&d, OPTIN).unwrap();
        d.config = Sm90Config::COOP_256_C2;
        let e = plan(&d, OPTIN).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Alignment {
                    value: 1,
                    multiple: 2,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("max_ctas"), "{e}");
        d.max_ctas = Some(116);
        plan(&d, OPTIN).unwrap();
        // A cap in SMs: whole clusters within it, or single CTAs below one cluster.
        let c2 = Sm90Config::COOP_256_C2;
        assert_eq!(ctas_within(c2, 132), (c2, 132));
        assert_eq!(ctas_within(c2, 117), (c2, 116));
        let (c, n) = ctas_within(c2, 1);
        assert_eq!((c.cluster, c.l2_hint, c.bn, n), (1, c2.l2_hint, c2.bn, 1));
        assert_eq!(ctas_within(c2, 0), (c2, 0));
        let c1 = Sm90Config::PINGPONG_128;
        assert_eq!(ctas_within(c1, 7), (c1, 7));
        for cap in 0..300u32 {
            for cfg in [c1, c2] {
                let (c, n) = ctas_within(cfg, cap);
                assert!(n <= cap);
                assert_eq!(n == 0, cap == 0);
                if n > 0 {
                    check_max_ctas(n, c.cluster).unwrap();
                }
            }
        }
    }

    #[test]
    fn device_error_codes() {
        assert_eq!(DeviceErrorCode::from_flag(0), None);
        assert_eq!(
            DeviceErrorCode::from_flag(2),
            Some(Ok(DeviceErrorCode::BadOffsets))
        );
        assert_eq!(DeviceErrorCode::from_flag(9), Some(Err(9)));
    }
}
