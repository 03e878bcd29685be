//! The grouped GEMM over experts: typed launcher of the tile engine (`cuda/tile_engine.cuh`).
//!
//! Rows per group (expert) are read from device offsets, so no host synchronisation is needed:
//! the grid is persistent (sized for the device, never for the data) and each block walks the
//! tile schedule computed on the device. Three operand layouts cover forward and backward:
//!
//! | kind | computes | A | B | C |
//! | --- | --- | --- | --- | --- |
//! | [`GemmKind::Forward`] | `C = A · W_gᵀ` | rows `[cap, K]` | `[G, N, K]` | `[cap, N']` |
//! | [`GemmKind::Dgrad`] | `C = A · W_g` | rows `[cap, N]` | `[G, N, K]` | `[cap, K]` |
//! | [`GemmKind::Wgrad`] | `C_g = A_gᵀ · B_g` | rows `[cap, N]` | rows `[cap, K]` | `[G, N, K]` |
//!
//! where group `g` owns rows `offsets[g]..offsets[g+1]` and `N' = N/2` with the SwiGLU
//! epilogue (gate rows `0..N/2`, up rows `N/2..N` of each weight), `N` otherwise. The forward
//! epilogue can fuse SwiGLU or GeLU(erf), store the pre-activation, scale rows and accumulate.

use cudarc::driver::CudaFunction;

use crate::buffer::{DType, DeviceTensor};
use crate::cache::{Arch, Defines};
use crate::device::Gpu;
use crate::error::{Error, Result};
pub use crate::operands::Meta;
use crate::operands::{
    EngineRules, check_epilogue, check_row_scale, check_shapes, expect_dtype, expect_rank,
    fits_i32, groups_from_offsets,
};
use crate::{sm90, sources};

/// Most groups (experts) one launch handles (size of the device-side tile prefix).
pub const MAX_GROUPS: usize = 1024;

/// Operand layouts of the grouped GEMM (see the module table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GemmKind {
    /// `C[rows, N'] = A[rows, K] · W_g[N, K]ᵀ`.
    Forward,
    /// `C[rows, K] = A[rows, N] · W_g[N, K]`.
    Dgrad,
    /// `C_g[N, K] = Σ_{r in g} A[r, N]ᵀ B[r, K]`.
    Wgrad,
}

/// Which tile engine runs a grouped GEMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Engine {
    /// The Hopper engine (TMA + wgmma, [`crate::sm90`]) where the device is sm_90 and the
    /// problem is one it supports (no pre-activation store, no accumulate, no explicit tile
    /// shape or tile list, output dtype = input dtype, expert offsets given); the portable
    /// `mma.sync` engine otherwise.
    #[default]
    Auto,
    /// Always the portable `mma.sync` engine (any sm_80+ device, every option).
    Portable,
    /// Always the Hopper engine, with every option it implements: f32 C,
    /// [`GemmArgs::accumulate`] (f32 C only), [`GemmArgs::aux`] (forward with SwiGLU or GeLU,
    /// 16-bit C), row scale, [`GemmArgs::max_blocks`]. Never falls back: an error on a device
    /// other than sm_90, without expert offsets, with an explicit [`TileShape`] or
    /// [`TileList`] (use [`sm90::Sm90Gemm`] for its own tile orders), or for a problem the
    /// engine does not take (the error of [`sm90::plan`] says why). [`Engine::Auto`] keeps
    /// f32 and accumulating GEMMs on the portable engine until this path is measured.
    Hopper,
}

/// What the epilogue applies to the fp32 accumulators before the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Epilogue {
    /// Store as is.
    #[default]
    None,
    /// `silu(gate) ⊙ up`, pairing weight rows `c` and `N/2 + c` (forward only).
    SwiGlu,
    /// `gelu_erf(h)` (forward only).
    Gelu,
}

impl Epilogue {
    fn code(self) -> u32 {
        match self {
            Epilogue::None => 0,
            Epilogue::SwiGlu => 1,
            Epilogue::Gelu => 2,
        }
    }
}

/// Tile shape and pipeline depth of one engine specialisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TileShape {
    /// Rows of C per tile.
    pub bm: u32,
    /// Columns of C per tile (before SwiGLU halves them).
    pub bn: u32,
    /// Reduction depth per pipeline stage.
    pub bk: u32,
    /// Warps along M.
    pub warps_m: u32,
    /// Warps along N.
    pub warps_n: u32,
    /// Pipeline stages.
    pub stages: u32,
    /// `__launch_bounds__` minimum blocks per SM (caps registers).
    pub min_blocks: u32,
}

impl TileShape {
    /// 128x128x64, 4 warps (64x64 warp tiles), 3 stages, 2 blocks/SM.
    pub const T128X128: TileShape = TileShape {
        bm: 128,
        bn: 128,
        bk: 64,
        warps_m: 2,
        warps_n: 2,
        stages: 3,
        min_blocks: 2,
    };
    /// 128x256x64, 8 warps (64x64 warp tiles), 3 stages, 1 block/SM.
    pub const T128X256: TileShape = TileShape {
        bm: 128,
        bn: 256,
        bk: 64,
        warps_m: 2,
        warps_n: 4,
        stages: 3,
        min_blocks: 1,
    };
    /// 128x128x64, 8 warps (64x32 warp tiles), 4 stages, 1 block/SM.
    pub const T128X128_W8: TileShape = TileShape {
        bm: 128,
        bn: 128,
        bk: 64,
        warps_m: 2,
        warps_n: 4,
        stages: 4,
        min_blocks: 1,
    };
    /// 64x128x64, 4 warps (32x64 warp tiles), 4 stages, 2 blocks/SM (small groups).
    pub const T64X128: TileShape = TileShape {
        bm: 64,
        bn: 128,
        bk: 64,
        warps_m: 2,
        warps_n: 2,
        stages: 4,
        min_blocks: 2,
    };

    /// 128x256x64, 8 warps (64x64 warp tiles), 4 stages, 1 block/SM.
    pub const T128X256_S4: TileShape = TileShape {
        bm: 128,
        bn: 256,
        bk: 64,
        warps_m: 2,
        warps_n: 4,
        stages: 4,
        min_blocks: 1,
    };
    /// 256x128x64, 8 warps (64x64 warp tiles), 3 stages, 1 block/SM.
    pub const T256X128: TileShape = TileShape {
        bm: 256,
        bn: 128,
        bk: 64,
        warps_m: 4,
        warps_n: 2,
        stages: 3,
        min_blocks: 1,
    };

    /// The named shapes, for benchmarks and tests.
    pub const ALL: [(&'static str, TileShape); 6] = [
        ("128x128w4s3", TileShape::T128X128),
        ("128x256w8s3", TileShape::T128X256),
        ("128x128w8s4", TileShape::T128X128_W8),
        ("64x128w4s4", TileShape::T64X128),
        ("128x256w8s4", TileShape::T128X256_S4),
        ("256x128w8s3", TileShape::T256X128),
    ];

    /// Threads per block.
    pub fn threads(&self) -> u32 {
        self.warps_m * self.warps_n * 32
    }

    /// Dynamic shared memory: the larger of the operand pipeline and the fp32 epilogue staging
    /// (the kernel statically checks this equals its own requirement).
    pub fn smem_bytes(&self) -> u32 {
        let pipe = self.stages * (self.bm * self.bk + self.bn * self.bk) * 2;
        let epi = self.bm * (self.bn + 8) * 4;
        pipe.max(epi)
    }

    /// Checks the shape is one the engine can instantiate.
    pub fn validate(&self, kind: GemmKind) -> Result<()> {
        let bad = |why: String| Err(Error::Invalid(format!("tile shape {self:?}: {why}")));
        if self.warps_m == 0 || self.warps_n == 0 || self.threads() > 1024 {
            return bad("1 to 32 warps".into());
        }
        let (wtm, wtn) = (self.bm / self.warps_m, self.bn / self.warps_n);
        if self.bm % self.warps_m != 0
            || self.bn % self.warps_n != 0
            || wtm % 16 != 0
            || wtn % 16 != 0
        {
            return bad("warp tiles must be multiples of 16x16".into());
        }
        if self.bk % 64 != 0 {
            return bad("bk must be a multiple of 64 (swizzled 128-byte rows)".into());
        }
        if self.stages < 2 {
            return bad("at least 2 stages".into());
        }
        let mn_major_a = kind == GemmKind::Wgrad;
        let mn_major_b = kind != GemmKind::Forward;
        if (mn_major_a && self.bm % 64 != 0) || (mn_major_b && self.bn % 64 != 0) {
            return bad("M/N-major operands need bm/bn multiples of 64".into());
        }
        let chunks = |rows: u32, cols: u32| rows * cols / 8;
        let t = self.threads();
        if chunks(self.bm, self.bk) % t != 0 || chunks(self.bn, self.bk) % t != 0 {
            return bad("tile loads must divide evenly among the threads".into());
        }
        Ok(())
    }

    /// The default shape for a problem with `out_cols` output columns (before SwiGLU halves
    /// them) on a device allowing `smem_optin` bytes of shared memory per block.
    ///
    /// From the H200 run of `gemm_bench` (bench/results/2026-11-29-gemm-h200.json): 128x256
    /// tiles were fastest on 13 of the 16 preset GEMMs (Mixtral/Phi/DeepSeek, 276-373
    /// TFLOP/s); for outputs narrower than 2048 columns (Qwen2-MoE's dgrad/wgrad) 128x128 tiles
    /// with 2 blocks per SM won. Devices without room for 128x256 (sm_86/89: 99 KB) get 128x128.
    pub fn choose(
        _kind: GemmKind,
        _epilogue: Epilogue,
        out_cols: usize,
        smem_optin: u32,
    ) -> TileShape {
        let big = TileShape::T128X256;
        if out_cols >= 2048 && big.smem_bytes() <= smem_optin {
            big
        } else {
            TileShape::T128X128
        }
    }
}

/// An explicit device-resident tile order: `tiles` i32 `[n, 4]` of (group, m_tile, n_tile, 0)
/// and `count` i32 `[1]` (entries used, ≤ n). Entries outside the problem are skipped.
#[derive(Debug, Clone, Copy)]
pub struct TileList<'a> {
    /// The tiles.
    pub tiles: &'a DeviceTensor,
    /// Number of valid entries.
    pub count: &'a DeviceTensor,
}

/// Operand descriptions of one grouped GEMM (validated by [`plan`]).
#[derive(Debug, Clone)]
pub struct GemmDesc {
    /// Operand layouts.
    pub kind: GemmKind,
    /// A.
    pub a: Meta,
    /// B (weights for Forward/Dgrad, the second row operand for Wgrad).
    pub b: Meta,
    /// Group offsets (i32 `[G+1]`), or `None` for one group over all rows.
    pub offsets: Option<Meta>,
    /// C.
    pub c: Meta,
    /// Epilogue.
    pub epilogue: Epilogue,
    /// Pre-activation output.
    pub aux: Option<Meta>,
    /// Row scale (f32 `[cap]`).
    pub row_scale: Option<Meta>,
    /// Explicit tile list entries (rows of the `[n, 4]` list).
    pub tile_list_len: Option<usize>,
    /// Tile shape.
    pub tile: TileShape,
}

/// A validated launch description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GemmPlan {
    /// Groups.
    pub groups: usize,
    /// Row capacity of the row operands.
    pub rows_cap: usize,
    /// Output rows per group (Wgrad) — `N`.
    pub m: usize,
    /// Output columns before the activation.
    pub n: usize,
    /// Reduction length (Forward/Dgrad).
    pub k: usize,
    /// Leading dimensions.
    pub lda: usize,
    /// Leading dimension of B.
    pub ldb: usize,
    /// Leading dimension of C.
    pub ldc: usize,
    /// Leading dimension of aux.
    pub ldaux: usize,
    /// Elements between groups' B.
    pub b_group_stride: usize,
    /// Elements between groups' C.
    pub c_group_stride: usize,
    /// Upper bound on tiles (grid never exceeds it).
    pub max_tiles: usize,
    /// NVRTC specialisation.
    pub defines: Defines,
}

/// Validates shapes, dtypes and alignment of a grouped GEMM and derives its launch plan.
pub fn plan(d: &GemmDesc) -> Result<GemmPlan> {
    d.tile.validate(d.kind)?;
    let elem = d.a.dtype;
    expect_dtype("A", &d.a, &[DType::BF16, DType::F16])?;
    expect_dtype("B", &d.b, &[elem])?;
    expect_dtype("C", &d.c, &[elem, DType::F32])?;
    expect_rank("A", &d.a, 2)?;
    expect_rank("C", &d.c, if d.kind == GemmKind::Wgrad { 3 } else { 2 })?;
    let rows_cap = d.a.shape[0];
    let groups = match &d.offsets {
        Some(o) => groups_from_offsets(o)?,
        None => 1,
    };
    if groups > MAX_GROUPS {
        return Err(Error::limit(
            "groups (experts)",
            groups,
            MAX_GROUPS.to_string(),
        ));
    }
    check_epilogue(d.kind, d.epilogue)?;
    if d.kind == GemmKind::Wgrad && d.row_scale.is_some() {
        return Err(Error::Invalid(
            "row scaling applies to grouped-M GEMMs, not Wgrad".into(),
        ));
    }
    let rules = EngineRules {
        ungrouped_weights: true,
        why: "16-byte cp.async rows",
    };
    let dims = check_shapes(d.kind, d.epilogue, &d.a, &d.b, &d.c, groups, rules)?;
    let out_cols = dims.out_cols;
    let (m, n, k, lda, ldb, b_group_stride, c_group_stride) = match d.kind {
        GemmKind::Forward => (0, dims.n, dims.k, dims.k, dims.k, dims.n * dims.k, 0),
        GemmKind::Dgrad => (0, dims.k, dims.n, dims.n, dims.k, dims.n * dims.k, 0),
        GemmKind::Wgrad => (dims.n, dims.k, 0, dims.n, dims.k, 0, dims.n * dims.k),
    };
    let ldaux = match &d.aux {
        Some(aux) => {
            if d.kind != GemmKind::Forward {
                return Err(Error::Invalid(
                    "the pre-activation output exists for the forward GEMM only".into(),
                ));
            }
            expect_dtype("aux (pre-activation)", aux, &[elem])?;
            if aux.shape != [rows_cap, n] {
                return Err(Error::shape(
                    "aux (pre-activation)",
                    &aux.shape,
                    format!("[{rows_cap}, {n}]"),
                ));
            }
            n
        }
        None => 0,
    };
    if let Some(s) = &d.row_scale {
        check_row_scale(s, rows_cap)?;
    }
    for (what, v) in [("rows", rows_cap), ("N", n), ("K", k), ("M", m)] {
        fits_i32(what, v)?;
    }
    let t = &d.tile;
    let (bm, bn) = (t.bm as usize, t.bn as usize);
    let n_tiles = if d.epilogue == Epilogue::SwiGlu {
        (n / 2).div_ceil(bn / 2)
    } else {
        n.div_ceil(bn)
    };
    let mut max_tiles = if d.kind == GemmKind::Wgrad {
        groups * m.div_ceil(bm) * n_tiles
    } else {
        (rows_cap / bm + groups) * n_tiles
    };
    if let Some(len) = d.tile_list_len {
        max_tiles = len;
    }
    fits_i32("tiles", max_tiles)?;
    let mut defines = Defines::new();
    let mut def = |k: &str, v: u32| {
        defines.insert(k.to_string(), v.to_string());
    };
    def("GEMM_BM", t.bm);
    def("GEMM_BN", t.bn);
    def("GEMM_BK", t.bk);
    def("GEMM_WM", t.warps_m);
    def("GEMM_WN", t.warps_n);
    def("GEMM_STAGES", t.stages);
    def("GEMM_MIN_BLOCKS", t.min_blocks);
    def("GEMM_SMEM_BYTES", t.smem_bytes());
    def("GEMM_A_LAYOUT", u32::from(d.kind == GemmKind::Wgrad));
    def("GEMM_B_LAYOUT", u32::from(d.kind != GemmKind::Forward));
    def("GEMM_GROUPED_K", u32::from(d.kind == GemmKind::Wgrad));
    def("GEMM_EPI", d.epilogue.code());
    def("GEMM_OUT_F32", u32::from(d.c.dtype == DType::F32));
    if elem == DType::F16 {
        defines.insert("COMET_F16".to_string(), String::new());
    }
    Ok(GemmPlan {
        groups,
        rows_cap,
        m,
        n,
        k,
        lda,
        ldb,
        ldc: if d.kind == GemmKind::Wgrad {
            n
        } else {
            out_cols
        },
        ldaux,
        b_group_stride,
        c_group_stride,
        max_tiles,
        defines,
    })
}

/// Kernel parameters; mirror of `comet::GemmParams` (all fields 8 bytes wide).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct GemmParams {
    a: u64,
    b: u64,
    c: u64,
    aux: u64,
    row_scale: u64,
    offsets: u64,
    tile_list: u64,
    tile_count: u64,
    lda: i64,
    ldb: i64,
    ldc: i64,
    ldaux: i64,
    b_group_stride: i64,
    c_group_stride: i64,
    groups: i64,
    rows_cap: i64,
    m: i64,
    n: i64,
    k: i64,
    accumulate: i64,
    vec_store: i64,
    tile_list_len: i64,
}

/// Arguments of one grouped GEMM launch. Build with [`GemmArgs::forward`],
/// [`GemmArgs::dgrad`] or [`GemmArgs::wgrad`], refine with the builder methods, run with
/// [`grouped_gemm`].
#[derive(Debug)]
pub struct GemmArgs<'a> {
    kind: GemmKind,
    a: &'a DeviceTensor,
    b: &'a DeviceTensor,
    offsets: Option<&'a DeviceTensor>,
    c: &'a mut DeviceTensor,
    epilogue: Epilogue,
    aux: Option<&'a mut DeviceTensor>,
    row_scale: Option<&'a DeviceTensor>,
    accumulate: bool,
    tile: Option<TileShape>,
    tile_list: Option<TileList<'a>>,
    engine: Engine,
    max_blocks: Option<usize>,
}

impl<'a> GemmArgs<'a> {
    fn new(
        kind: GemmKind,
        a: &'a DeviceTensor,
        b: &'a DeviceTensor,
        offsets: Option<&'a DeviceTensor>,
        c: &'a mut DeviceTensor,
    ) -> Self {
        GemmArgs {
            kind,
            a,
            b,
            offsets,
            c,
            epilogue: Epilogue::None,
            aux: None,
            row_scale: None,
            accumulate: false,
            tile: None,
            tile_list: None,
            engine: Engine::Auto,
            max_blocks: None,
        }
    }
    /// `c[rows, N'] = x_rows[rows, K] · w[g][N, K]ᵀ` for the rows of each group.
    pub fn forward(
        x_rows: &'a DeviceTensor,
        w: &'a DeviceTensor,
        offsets: Option<&'a DeviceTensor>,
        c: &'a mut DeviceTensor,
    ) -> Self {
        Self::new(GemmKind::Forward, x_rows, w, offsets, c)
    }
    /// `c[rows, K] = dy_rows[rows, N] · w[g][N, K]`.
    pub fn dgrad(
        dy_rows: &'a DeviceTensor,
        w: &'a DeviceTensor,
        offsets: Option<&'a DeviceTensor>,
        c: &'a mut DeviceTensor,
    ) -> Self {
        Self::new(GemmKind::Dgrad, dy_rows, w, offsets, c)
    }
    /// `dw[g][N, K] = Σ_{rows r of g} dy_rows[r, N]ᵀ x_rows[r, K]`.
    pub fn wgrad(
        dy_rows: &'a DeviceTensor,
        x_rows: &'a DeviceTensor,
        offsets: Option<&'a DeviceTensor>,
        dw: &'a mut DeviceTensor,
    ) -> Self {
        Self::new(GemmKind::Wgrad, dy_rows, x_rows, offsets, dw)
    }
    /// Fused activation (forward).
    pub fn epilogue(mut self, e: Epilogue) -> Self {
        self.epilogue = e;
        self
    }
    /// Also store the pre-activation `[rows, N]` (forward).
    pub fn aux(mut self, aux: &'a mut DeviceTensor) -> Self {
        self.aux = Some(aux);
        self
    }
    /// Multiply output row `r` by `scale[r]` (f32 `[rows]`).
    pub fn row_scale(mut self, scale: &'a DeviceTensor) -> Self {
        self.row_scale = Some(scale);
        self
    }
    /// Add into C instead of overwriting it.
    pub fn accumulate(mut self, on: bool) -> Self {
        self.accumulate = on;
        self
    }
    /// Use this tile shape instead of the default.
    pub fn tile(mut self, t: TileShape) -> Self {
        self.tile = Some(t);
        self
    }
    /// Run the tiles in this device-resident order.
    pub fn tile_list(mut self, list: TileList<'a>) -> Self {
        self.tile_list = Some(list);
        self
    }
    /// Choose the tile engine (default [`Engine::Auto`]).
    pub fn engine(mut self, engine: Engine) -> Self {
        self.engine = engine;
        self
    }
    /// Launch at most `n` blocks (default: every block that fits on the device). The grid
    /// is persistent, so fewer blocks compute the same tiles (bit for bit) more slowly, and
    /// leave SMs to kernels on other streams (e.g. NCCL's). `n = 0` is an error. On the
    /// Hopper engine the cap is applied by [`sm90::Sm90Gemm::within_ctas`]: whole clusters
    /// within `n`, or single CTAs when `n` is below one cluster.
    pub fn max_blocks(mut self, n: usize) -> Self {
        self.max_blocks = Some(n);
        self
    }

    /// The Hopper form of this GEMM, where [`Engine::Auto`] may hand it to [`crate::sm90`]:
    /// only options that engine implements, and expert offsets present.
    fn hopper_form(&self) -> bool {
        self.engine == Engine::Auto
            && self.offsets.is_some()
            && self.aux.is_none()
            && !self.accumulate
            && self.tile.is_none()
            && self.tile_list.is_none()
            && self.c.dtype() == self.a.dtype()
    }

    fn desc(&self, smem_optin: u32) -> GemmDesc {
        let out_cols = self.c.shape().last().copied().unwrap_or(0);
        let out_cols = if self.epilogue == Epilogue::SwiGlu {
            2 * out_cols
        } else {
            out_cols
        };
        GemmDesc {
            kind: self.kind,
            a: Meta::of(self.a),
            b: Meta::of(self.b),
            offsets: self.offsets.map(Meta::of),
            c: Meta::of(self.c),
            epilogue: self.epilogue,
            aux: self.aux.as_deref().map(Meta::of),
            row_scale: self.row_scale.map(Meta::of),
            tile_list_len: self
                .tile_list
                .map(|l| l.tiles.shape().first().copied().unwrap_or(0)),
            tile: self.tile.unwrap_or_else(|| {
                TileShape::choose(self.kind, self.epilogue, out_cols, smem_optin)
            }),
        }
    }
}

fn aligned16(ptr: u64, ld_elems: usize, elem_size: usize) -> bool {
    ptr % 16 == 0 && (ld_elems * elem_size) % 16 == 0
}

/// The grouped GEMM program (specialise it with a [`GemmPlan`]'s defines).
pub fn program() -> crate::cache::Program {
    sources::program("gemm.cu", sources::GEMM_CU)
}

/// Kernel name inside [`program`].
pub const KERNEL_NAME: &str = "comet_grouped_gemm";

/// The compiled kernel for a plan.
fn kernel(gpu: &Gpu, plan: &GemmPlan) -> Result<CudaFunction> {
    gpu.function(&program(), &plan.defines, KERNEL_NAME)
}

/// A block cap is at least 1.
fn check_max_blocks(cap: Option<usize>) -> Result<()> {
    if cap == Some(0) {
        return Err(Error::limit("max_blocks (blocks of the grid)", 0, ">= 1"));
    }
    Ok(())
}

/// Runs a grouped GEMM on `gpu`'s stream (asynchronous; no host synchronisation).
pub fn grouped_gemm(gpu: &Gpu, args: GemmArgs<'_>) -> Result<()> {
    check_max_blocks(args.max_blocks)?;
    if args.engine == Engine::Hopper {
        return hopper(gpu, args);
    }
    if gpu.arch() == Arch::SM90 && args.hopper_form() {
        if let Some(offsets) = args.offsets {
            let ops = HopperOperands {
                kind: args.kind,
                a: args.a,
                b: args.b,
                offsets,
                epilogue: args.epilogue,
                row_scale: args.row_scale,
                max_blocks: args.max_blocks,
            };
            if sm90::supports(&ops.gemm(&mut *args.c).desc(), gpu.smem_optin() as usize) {
                return sm90::grouped_gemm(gpu, ops.gemm(args.c));
            }
        }
    }
    portable(gpu, args)
}

/// What [`Engine::Hopper`] refuses before looking at the operands.
fn check_hopper_options(tile: bool, tile_list: bool, offsets: bool) -> Result<()> {
    if tile {
        return Err(Error::Invalid(
            "Engine::Hopper takes no TileShape (the mma.sync engine's tiles; the sm90 engine \
             picks an Sm90Config)"
                .into(),
        ));
    }
    if tile_list {
        return Err(Error::Invalid(
            "Engine::Hopper takes no TileList (use sm90::Sm90Gemm::tile_order with canonical \
             tile ids)"
                .into(),
        ));
    }
    if !offsets {
        return Err(Error::Invalid(
            "Engine::Hopper needs expert offsets (the sm90 engine reads each expert's rows \
             from them)"
                .into(),
        ));
    }
    Ok(())
}

/// Runs a grouped GEMM on the Hopper engine with every option it implements
/// ([`Engine::Hopper`]); errors instead of falling back.
fn hopper(gpu: &Gpu, args: GemmArgs<'_>) -> Result<()> {
    check_hopper_options(
        args.tile.is_some(),
        args.tile_list.is_some(),
        args.offsets.is_some(),
    )?;
    let Some(offsets) = args.offsets else {
        return Err(Error::Invalid("Engine::Hopper needs expert offsets".into()));
    };
    let g = match args.kind {
        GemmKind::Forward => sm90::Sm90Gemm::forward(args.a, args.b, offsets, args.c),
        GemmKind::Dgrad => sm90::Sm90Gemm::dgrad(args.a, args.b, offsets, args.c),
        GemmKind::Wgrad => sm90::Sm90Gemm::wgrad(args.a, args.b, offsets, args.c),
    }
    .epilogue(args.epilogue)
    .accumulate(args.accumulate);
    let g = match args.row_scale {
        Some(s) => g.row_scale(s),
        None => g,
    };
    let g = match args.aux {
        Some(aux) => g.aux(aux),
        None => g,
    };
    let g = match args.max_blocks {
        Some(cap) => g.within_ctas(cap),
        None => g,
    };
    sm90::grouped_gemm(gpu, g)
}

/// The operands of a GEMM that [`Engine::Auto`] hands to the Hopper engine.
struct HopperOperands<'b> {
    kind: GemmKind,
    a: &'b DeviceTensor,
    b: &'b DeviceTensor,
    offsets: &'b DeviceTensor,
    epilogue: Epilogue,
    row_scale: Option<&'b DeviceTensor>,
    max_blocks: Option<usize>,
}

impl<'b> HopperOperands<'b> {
    /// The Hopper engine's form of these operands writing into `c`.
    fn gemm<'c>(&self, c: &'c mut DeviceTensor) -> sm90::Sm90Gemm<'c>
    where
        'b: 'c,
    {
        let g = match self.kind {
            GemmKind::Forward => sm90::Sm90Gemm::forward(self.a, self.b, self.offsets, c),
            GemmKind::Dgrad => sm90::Sm90Gemm::dgrad(self.a, self.b, self.offsets, c),
            GemmKind::Wgrad => sm90::Sm90Gemm::wgrad(self.a, self.b, self.offsets, c),
        }
        .epilogue(self.epilogue);
        let g = match self.row_scale {
            Some(scale) => g.row_scale(scale),
            None => g,
        };
        match self.max_blocks {
            Some(cap) => g.within_ctas(cap),
            None => g,
        }
    }
}

/// Runs a grouped GEMM on the portable `mma.sync` engine.
fn portable(gpu: &Gpu, args: GemmArgs<'_>) -> Result<()> {
    let desc = args.desc(gpu.smem_optin());
    let plan = plan(&desc)?;
    for (what, t) in [
        ("A", Some(args.a)),
        ("B", Some(args.b)),
        ("offsets", args.offsets),
        ("row_scale", args.row_scale),
    ] {
        if let Some(t) = t {
            t.check_device(gpu, what)?;
        }
    }
    args.c.check_device(gpu, "C")?;
    if let Some(aux) = args.aux.as_deref() {
        aux.check_device(gpu, "aux")?;
    }
    if let Some(l) = &args.tile_list {
        let tl = Meta::of(l.tiles);
        if tl.dtype != DType::I32 || tl.shape.len() != 2 || tl.shape[1] != 4 {
            return Err(Error::shape("tile list", &tl.shape, "i32 [n, 4]"));
        }
        if l.count.dtype() != DType::I32 || l.count.numel() != 1 {
            return Err(Error::shape("tile count", l.count.shape(), "i32 [1]"));
        }
        l.tiles.check_device(gpu, "tile list")?;
        l.count.check_device(gpu, "tile count")?;
    }
    let tile = desc.tile;
    let out_size = args.c.dtype().size();
    let mut vec_store = aligned16(args.c.device_ptr(), plan.ldc, out_size);
    if let Some(aux) = args.aux.as_deref() {
        vec_store &= aligned16(aux.device_ptr(), plan.ldaux, 2);
        if desc.epilogue == Epilogue::SwiGlu {
            vec_store &= (plan.n / 2) % 8 == 0;
        }
    }
    let params = GemmParams {
        a: args.a.device_ptr(),
        b: args.b.device_ptr(),
        c: args.c.device_ptr(),
        aux: args.aux.as_deref().map_or(0, |t| t.device_ptr()),
        row_scale: args.row_scale.map_or(0, |t| t.device_ptr()),
        offsets: args.offsets.map_or(0, |t| t.device_ptr()),
        tile_list: args.tile_list.map_or(0, |l| l.tiles.device_ptr()),
        tile_count: args.tile_list.map_or(0, |l| l.count.device_ptr()),
        lda: plan.lda as i64,
        ldb: plan.ldb as i64,
        ldc: plan.ldc as i64,
        ldaux: plan.ldaux as i64,
        b_group_stride: plan.b_group_stride as i64,
        c_group_stride: plan.c_group_stride as i64,
        groups: plan.groups as i64,
        rows_cap: plan.rows_cap as i64,
        m: plan.m as i64,
        n: plan.n as i64,
        k: plan.k as i64,
        accumulate: i64::from(args.accumulate),
        vec_store: i64::from(vec_store),
        tile_list_len: desc.tile_list_len.unwrap_or(0) as i64,
    };
    let f = kernel(gpu, &plan)?;
    let smem = tile.smem_bytes();
    if smem > gpu.smem_optin() {
        return Err(Error::limit(
            "GEMM shared memory bytes",
            smem as usize,
            format!("{} on this device", gpu.smem_optin()),
        ));
    }
    if smem > 48 * 1024 {
        f.set_attribute(
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )?;
    }
    let per_sm =
        f.occupancy_max_active_blocks_per_multiprocessor(tile.threads(), smem as usize, None)?;
    if per_sm == 0 {
        return Err(Error::Invalid(format!(
            "tile shape {tile:?} cannot be resident on this device"
        )));
    }
    let grid = (gpu.sm_count() as usize * per_sm as usize)
        .min(plan.max_tiles)
        .min(args.max_blocks.unwrap_or(usize::MAX));
    let _span = tracing::trace_span!("grouped_gemm", kind = ?desc.kind, groups = plan.groups, n = plan.n, grid).entered();
    // SAFETY: `GemmParams` mirrors the kernel's parameter struct field by field; `plan`
    // checked every operand's dtype and shape against the sizes the kernel uses, and the kernel
    // clamps device offsets to `rows_cap`, so all accesses stay inside the tensors.
    unsafe { gpu.launch(&f, grid as u32, tile.threads(), smem, &params) }
}

/// Registers, local memory and occupancy of the kernel a GEMM would use (for reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelReport {
    /// Registers per thread.
    pub registers: i32,
    /// Local (spill) memory per thread, bytes.
    pub local_bytes: i32,
    /// Blocks resident per SM.
    pub blocks_per_sm: u32,
    /// Dynamic shared memory per block, bytes.
    pub smem_bytes: u32,
}

/// Compiles (if needed) the kernel for `desc` and reports its resources.
pub fn kernel_report(gpu: &Gpu, desc: &GemmDesc) -> Result<KernelReport> {
    let plan = plan(desc)?;
    let f = kernel(gpu, &plan)?;
    let smem = desc.tile.smem_bytes();
    if smem > 48 * 1024 && smem <= gpu.smem_optin() {
        f.set_attribute(
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )?;
    }
    let per_sm =
        f.occupancy_max_active_blocks_per_multiprocessor(desc.tile.threads(), smem as usize, None)?;
    Ok(KernelReport {
        registers: f.num_regs()?,
        local_bytes: f.local_size_bytes()?,
        blocks_per_sm: per_sm,
        smem_bytes: smem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fwd(a: &[usize], b: &[usize], c: &[usize], g: usize) -> GemmDesc {
        GemmDesc {
            kind: GemmKind::Forward,
            a: Meta::new(DType::BF16, a),
            b: Meta::new(DType::BF16, b),
            offsets: Some(Meta::new(DType::I32, &[g + 1])),
            c: Meta::new(DType::BF16, c),
            epilogue: Epilogue::None,
            aux: None,
            row_scale: None,
            tile_list_len: None,
            tile: TileShape::T128X128,
        }
    }

    #[test]
    fn smem_formula_matches_engine() {
        // pipe = stages * (bm + bn) * bk * 2; staging = bm * (bn + 8) * 4
        assert_eq!(TileShape::T128X128.smem_bytes(), 98304);
        assert_eq!(TileShape::T128X256.smem_bytes(), 147456);
        assert_eq!(TileShape::T128X128_W8.smem_bytes(), 131072);
        assert_eq!(TileShape::T64X128.smem_bytes(), 98304);
        assert_eq!(TileShape::T128X256_S4.smem_bytes(), 196608);
        assert_eq!(TileShape::T256X128.smem_bytes(), 147456);
        for (_, t) in TileShape::ALL {
            for k in [GemmKind::Forward, GemmKind::Dgrad, GemmKind::Wgrad] {
                t.validate(k).unwrap();
            }
            assert!(t.smem_bytes() <= 227 * 1024);
        }
    }

    #[test]
    fn default_tile_follows_the_h200_measurements() {
        let h200 = 227 * 1024;
        assert_eq!(
            TileShape::choose(GemmKind::Forward, Epilogue::SwiGlu, 28672, h200),
            TileShape::T128X256
        );
        assert_eq!(
            TileShape::choose(GemmKind::Dgrad, Epilogue::None, 1408, h200),
            TileShape::T128X128
        );
        assert_eq!(
            TileShape::choose(GemmKind::Wgrad, Epilogue::None, 2048, h200),
            TileShape::T128X256
        );
        // sm_86/89 allow 99 KB per block: the 144 KB shape does not fit.
        assert_eq!(
            TileShape::choose(GemmKind::Forward, Epilogue::None, 4096, 99 * 1024),
            TileShape::T128X128
        );
    }

    #[test]
    fn bad_tile_shapes_are_rejected() {
        let mut t = TileShape::T128X128;
        t.bk = 32;
        assert!(t.validate(GemmKind::Forward).is_err());
        let mut t = TileShape::T128X128;
        t.warps_n = 3;
        assert!(t.validate(GemmKind::Forward).is_err());
        let mut t = TileShape::T128X128;
        t.stages = 1;
        assert!(t.validate(GemmKind::Forward).is_err());
    }

    #[test]
    fn forward_plan() {
        let p = plan(&fwd(&[1000, 1408], &[8, 2816, 1408], &[1000, 2816], 8)).unwrap();
        assert_eq!(
            (p.groups, p.rows_cap, p.n, p.k, p.lda, p.ldb, p.ldc),
            (8, 1000, 2816, 1408, 1408, 1408, 2816)
        );
        assert_eq!(p.b_group_stride, 2816 * 1408);
        assert_eq!(p.max_tiles, (1000 / 128 + 8) * 22);
        assert_eq!(p.defines["GEMM_A_LAYOUT"], "0");
        assert_eq!(p.defines["GEMM_B_LAYOUT"], "0");
        assert_eq!(p.defines["GEMM_OUT_F32"], "0");
        assert!(!p.defines.contains_key("COMET_F16"));
    }

    #[test]
    fn swiglu_halves_the_output() {
        let mut d = fwd(&[64, 512], &[4, 2 * 1408, 512], &[64, 1408], 4);
        d.epilogue = Epilogue::SwiGlu;
        d.aux = Some(Meta::new(DType::BF16, &[64, 2816]));
        let p = plan(&d).unwrap();
        assert_eq!((p.n, p.ldc, p.ldaux), (2816, 1408, 2816));
        assert_eq!(p.defines["GEMM_EPI"], "1");
        d.c = Meta::new(DType::BF16, &[64, 2816]);
        assert!(matches!(plan(&d), Err(Error::Shape { .. })));
    }

    #[test]
    fn dgrad_and_wgrad_plans() {
        let mut d = fwd(&[300, 2048], &[16, 2048, 4096], &[300, 4096], 16);
        d.kind = GemmKind::Dgrad;
        let p = plan(&d).unwrap();
        assert_eq!(
            (p.n, p.k, p.lda, p.ldb, p.ldc),
            (4096, 2048, 2048, 4096, 4096)
        );
        assert_eq!(p.defines["GEMM_B_LAYOUT"], "1");
        let w = GemmDesc {
            kind: GemmKind::Wgrad,
            a: Meta::new(DType::BF16, &[300, 2048]),
            b: Meta::new(DType::BF16, &[300, 4096]),
            offsets: Some(Meta::new(DType::I32, &[17])),
            c: Meta::new(DType::F32, &[16, 2048, 4096]),
            epilogue: Epilogue::None,
            aux: None,
            row_scale: None,
            tile_list_len: None,
            tile: TileShape::T128X128,
        };
        let p = plan(&w).unwrap();
        assert_eq!(
            (p.m, p.n, p.lda, p.ldb, p.ldc, p.c_group_stride),
            (2048, 4096, 2048, 4096, 4096, 2048 * 4096)
        );
        assert_eq!(p.defines["GEMM_GROUPED_K"], "1");
        assert_eq!(p.defines["GEMM_OUT_F32"], "1");
        assert_eq!(p.max_tiles, 16 * 16 * 32);
    }

    #[test]
    fn error_paths_name_the_value() {
        // K not a multiple of 8.
        let e = plan(&fwd(&[10, 100], &[2, 64, 100], &[10, 64], 2)).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Alignment {
                    value: 100,
                    multiple: 8,
                    ..
                }
            ),
            "{e}"
        );
        // Group count mismatch.
        let e = plan(&fwd(&[10, 64], &[3, 64, 64], &[10, 64], 2)).unwrap_err();
        assert!(e.to_string().contains("2 groups"), "{e}");
        // Too many groups.
        let e = plan(&fwd(&[10, 64], &[2000, 64, 64], &[10, 64], 2000)).unwrap_err();
        assert!(matches!(e, Error::Limit { value: 2000, .. }), "{e}");
        // Mixed dtypes.
        let mut d = fwd(&[10, 64], &[2, 64, 64], &[10, 64], 2);
        d.b.dtype = DType::F16;
        assert!(matches!(plan(&d), Err(Error::DType { .. })));
        // Wrong A width.
        let e = plan(&fwd(&[10, 72], &[2, 64, 64], &[10, 64], 2)).unwrap_err();
        assert!(matches!(e, Error::Shape { .. }), "{e}");
        // Activation on a backward GEMM.
        let mut d = fwd(&[10, 64], &[2, 64, 64], &[10, 64], 2);
        d.kind = GemmKind::Dgrad;
        d.epilogue = Epilogue::Gelu;
        assert!(matches!(plan(&d), Err(Error::Invalid(_))));
        // Row scale of the wrong length.
        let mut d = fwd(&[10, 64], &[2, 64, 64], &[10, 64], 2);
        d.row_scale = Some(Meta::new(DType::F32, &[9]));
        assert!(matches!(plan(&d), Err(Error::Shape { .. })));
        // Offsets must be i32.
        let mut d = fwd(&[10, 64], &[2, 64, 64], &[10, 64], 2);
        d.offsets = Some(Meta::new(DType::U32, &[3]));
        assert!(matches!(plan(&d), Err(Error::DType { .. })));
    }

    #[test]
    fn single_group_router_shape() {
        // Router logits: x [M, H] · wr [E, H]ᵀ -> f32 [M, E] with no offsets.
        let d = GemmDesc {
            kind: GemmKind::Forward,
            a: Meta::new(DType::BF16, &[8192, 7168]),
            b: Meta::new(DType::BF16, &[256, 7168]),
            offsets: None,
            c: Meta::new(DType::F32, &[8192, 256]),
            epilogue: Epilogue::None,
            aux: None,
            row_scale: None,
            tile_list_len: None,
            tile: TileShape::T128X128,
        };
        let p = plan(&d).unwrap();
        assert_eq!(
            (p.groups, p.n, p.k, p.b_group_stride),
            (1, 256, 7168, 256 * 7168)
        );
    }

    #[test]
    fn explicit_hopper_engine_refuses_what_it_lacks() {
        check_hopper_options(false, false, true).unwrap();
        for (tile, list, offsets, word) in [
            (true, false, true, "TileShape"),
            (false, true, true, "TileList"),
            (false, false, false, "offsets"),
        ] {
            let e = check_hopper_options(tile, list, offsets).unwrap_err();
            assert!(matches!(e, Error::Invalid(_)), "{e}");
            assert!(e.to_string().contains(word), "{e}");
        }
        assert_eq!(Engine::default(), Engine::Auto);
    }

    #[test]
    fn block_caps_are_validated() {
        let e = check_max_blocks(Some(0)).unwrap_err();
        assert!(matches!(e, Error::Limit { value: 0, .. }), "{e}");
        assert!(e.to_string().contains("max_blocks"), "{e}");
        check_max_blocks(Some(1)).unwrap();
        check_max_blocks(None).unwrap();
    }

    #[test]
    fn params_layout_is_all_8_byte_fields() {
        assert_eq!(std::mem::size_of::<GemmParams>(), 22 * 8);
        assert_eq!(std::mem::align_of::<GemmParams>(), 8);
    }
}
