//! Tile configurations of the Hopper engine (mirror of `comet_sm90::Config`).

use crate::cache::Defines;
use crate::error::{Error, Result};
use crate::gemm::{Epilogue, GemmKind};

/// How the two consumer warpgroups share the work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Schedule {
    /// Both warpgroups work on every tile, half its rows each: 64 rows of a 128-row tile
    /// (tiles up to 128x256), or 128 rows (two m64 blocks) of a 256-row tile (256x128).
    Cooperative,
    /// Each warpgroup owns alternate 128-row tiles; one's epilogue overlaps the other's
    /// mainloop (tiles 128x128).
    PingPong,
}

/// What the epilogue stores besides the (activated, scaled) output in the input's dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Sm90Store {
    /// C is f32 (stored straight from the accumulators with 8-byte vector stores).
    pub f32_out: bool,
    /// `C += result` (f32 C only); a tile whose reduction is empty (wgrad: an expert with
    /// no rows) leaves C untouched.
    pub accumulate: bool,
    /// Also store the pre-activation (forward with SwiGLU or GeLU, 16-bit C).
    pub aux: bool,
}

impl Sm90Store {
    /// Checks the combination against the engine's compile-time rules (`config.cuh`).
    pub fn validate(&self, kind: GemmKind, epilogue: Epilogue) -> Result<()> {
        let bad = |why: &str| Err(Error::Invalid(format!("sm90 store {self:?}: {why}")));
        if self.accumulate && !self.f32_out {
            return bad("accumulation needs an f32 C");
        }
        if self.aux && (kind != GemmKind::Forward || epilogue == Epilogue::None) {
            return bad("the pre-activation store needs a forward GEMM with an activation");
        }
        if self.aux && self.f32_out {
            return bad("the pre-activation store needs a 16-bit C");
        }
        Ok(())
    }
}

/// One specialisation of the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sm90Config {
    /// Rows per tile: 128, or 256 (cooperative schedule with `bn = 128` only: each consumer
    /// warpgroup owns 128 rows, two m64 wgmma blocks, so an expert of up to 256 rows is one
    /// m-tile and each weight tile is read once for it). A ring stage holds `bm x 64`
    /// elements of A; the forward/dgrad producer issues `bm / 128` TMA boxes of 128 rows.
    pub bm: u32,
    /// Accumulator columns per tile: 128 or 256.
    pub bn: u32,
    /// Consumer schedule.
    pub schedule: Schedule,
    /// Shared-memory ring depth.
    pub stages: u32,
    /// CTAs per cluster: 1, or 2 (pairs share weight tiles through TMA multicast).
    pub cluster: u32,
    /// m-tiles per raster band.
    pub band: u32,
    /// L2 eviction hints: activations `evict_last` (re-read across n-tiles), weights
    /// `evict_first` (streamed).
    pub l2_hint: bool,
    /// Weight gradients only (single CTA, `bm = 128`, cooperative or ping-pong): the
    /// epilogue stages each warpgroup's rows in shared memory and the TMA unit stores them
    /// (an f32 accumulate is a reduce-add in L2), so the consumers start the next tile's
    /// mainloop while the store drains. The staging takes 64 KiB, or 32 KiB (in more passes)
    /// where the ring leaves no room for that.
    pub tma_store: bool,
    /// Swap-AB (forward and dgrad; cooperative 128x256, single CTA, 16-bit C): the weights
    /// are wgmma's A, 128 weight rows per tile, and the tokens its B, so an expert's tokens
    /// split into chunks of at most [`Sm90Config::swap_n`] rows ([`swap_chunk_rows`]) and
    /// each tile runs wgmma with N = its chunk rounded up to 16 instead of padding the
    /// expert to 128-row tiles. The epilogue transposes through shared memory
    /// (`stmatrix .trans`). A tile has 128 output columns (SwiGLU: 64, gate and up rows
    /// loaded interleaved by 8 in one box of a 5D view of the weights).
    pub swap: bool,
    /// The largest swap-AB token chunk: 256, or 272 (swap-AB only): an expert of up to 272
    /// rows is then one chunk, so each of its weight tiles is read once (wgmma N = 256 plus
    /// a second N = 16 wgmma on the same weight rows). Its ring stages hold 272 token rows
    /// and the launcher adds a token map with 16-row boxes for rows 256..271.
    pub swap_n: u32,
}

/// Swap-AB token chunk of an expert with `rows > 0` rows: at most `max_n` (256 or 272:
/// [`Sm90Config::swap_n`]), a multiple of 16, as near-equal as that allows (`max_n` 256:
/// 257 rows are 144 + 113, 546 are 192 + 192 + 162; `max_n` 272: 270 rows are one chunk).
/// Mirror of `swap_chunk_rows` in `cuda/sm90/scheduler.cuh`.
pub fn swap_chunk_rows(rows: usize, max_n: usize) -> usize {
    let n0 = rows.div_ceil(max_n).max(1);
    (rows.div_ceil(n0).div_ceil(16) * 16).min(max_n)
}

/// Swap-AB token chunks of an expert with `rows` rows (0 for none), chunks of at most
/// `max_n` rows.
pub fn swap_chunks(rows: usize, max_n: usize) -> usize {
    if rows == 0 {
        0
    } else {
        rows.div_ceil(swap_chunk_rows(rows, max_n))
    }
}

/// Rows per expert (on average) from which [`Sm90Config::choose`] picks swap-AB. Below it the
/// GEMMs stream their weights from DRAM whatever the tile (each weight byte feeds fewer than
/// 2 x 96 FLOPs), and swap-AB measured 1–6% slower at 64 rows per expert.
pub const SWAP_MIN_ROWS: usize = 96;
/// Rows per expert (on average) up to which [`Sm90Config::choose`] picks swap-AB.
pub const SWAP_MAX_ROWS: usize = 160;
/// Most experts for which [`Sm90Config::choose`] picks swap-AB: through the Rust launcher,
/// DeepSeek-V3's 256 experts at 128 rows each lost 4–8% with it (Qwen2-MoE's 60 and
/// Phi-3.5-MoE's 16 gained 9–12%); why is open (bench/hopper-dev/NOTES.md, session 3).
pub const SWAP_MAX_GROUPS: usize = 128;
/// Token rows per TMA box of a swap-AB tile's B operand (`Config::SWAP_BOX_ROWS`): rows
/// 0..255 of a chunk; with `swap_n = 272` rows 256..271 are one box of [`SWAP_TAIL_BOX_ROWS`].
pub const SWAP_BOX_ROWS: u32 = 32;
/// Token rows of the box that loads rows 256..271 of a 272-row swap-AB chunk.
pub const SWAP_TAIL_BOX_ROWS: u32 = 16;
/// Average rows per expert up to which [`Sm90Config::choose`] picks
/// [`Sm90Config::SWAP_272H`] (above [`SWAP_MAX_ROWS`]).
pub const SWAP_WIDE_MAX_ROWS: usize = 272;
/// Average rows per expert up to which [`Sm90Config::choose`] picks
/// [`Sm90Config::SWAP_272H`] for dgrad (two chunks of at most 272 rows per expert).
pub const SWAP_WIDE_DGRAD_MAX_ROWS: usize = 2 * 272;

/// Rows of a forward/dgrad A tensor-map box (two m64 wgmma blocks); also the rows per tile
/// of every named configuration but [`Sm90Config::TALL_256`] and
/// [`Sm90Config::TALL_256_C2`] (a tile has [`Sm90Config::bm`] rows: `bm / BM` boxes).
pub const BM: u32 = 128;
/// Reduction depth per stage (one 128-byte swizzled row of 16-bit elements).
pub const BK: u32 = 64;
/// Threads per block: a producer warpgroup and two consumer warpgroups.
pub const THREADS: u32 = 384;

impl Sm90Config {
    /// 128x256 cooperative, 4 stages.
    pub const COOP_256: Sm90Config = Sm90Config {
        bm: 128,
        bn: 256,
        schedule: Schedule::Cooperative,
        stages: 4,
        cluster: 1,
        band: 16,
        l2_hint: false,
        tma_store: false,
        swap: false,
        swap_n: 256,
    };
    /// 128x256 cooperative, 4 stages, 2-CTA clusters with weight-tile multicast.
    pub const COOP_256_C2: Sm90Config = Sm90Config {
        cluster: 2,
        ..Sm90Config::COOP_256
    };
    /// 128x128 ping-pong, 6 stages.
    pub const PINGPONG_128: Sm90Config = Sm90Config {
        bm: 128,
        bn: 128,
        schedule: Schedule::PingPong,
        stages: 6,
        cluster: 1,
        band: 16,
        l2_hint: false,
        tma_store: false,
        swap: false,
        swap_n: 256,
    };
    /// 128x128 cooperative, 6 stages.
    pub const COOP_128: Sm90Config = Sm90Config {
        bm: 128,
        bn: 128,
        schedule: Schedule::Cooperative,
        stages: 6,
        cluster: 1,
        band: 16,
        l2_hint: false,
        tma_store: false,
        swap: false,
        swap_n: 256,
    };
    /// 256x128 cooperative, 4 stages: each consumer warpgroup owns 128 rows (two m64
    /// blocks); an expert of up to 256 rows is a single m-tile.
    pub const TALL_256: Sm90Config = Sm90Config {
        bm: 256,
        bn: 128,
        ..Sm90Config::COOP_256
    };
    /// 256x128 cooperative, 4 stages, 2-CTA clusters with weight-tile multicast.
    pub const TALL_256_C2: Sm90Config = Sm90Config {
        cluster: 2,
        ..Sm90Config::TALL_256
    };

    /// 128x256 cooperative, 3 stages, TMA-store epilogue, L2 hints: weight gradients.
    pub const WGRAD_TS: Sm90Config = Sm90Config {
        stages: 3,
        l2_hint: true,
        tma_store: true,
        ..Sm90Config::COOP_256
    };

    /// Swap-AB 128x256 cooperative, 4 stages, L2 hints: forward and dgrad at few rows per
    /// expert (see [`Sm90Config::choose`]).
    pub const SWAP_256H: Sm90Config = Sm90Config {
        l2_hint: true,
        swap: true,
        ..Sm90Config::COOP_256
    };

    /// Swap-AB with token chunks of up to 272 rows ([`Sm90Config::swap_n`]), L2 hints:
    /// forward and dgrad at about 256 rows per expert (see [`Sm90Config::choose`]).
    pub const SWAP_272H: Sm90Config = Sm90Config {
        swap_n: 272,
        ..Sm90Config::SWAP_256H
    };

    /// The named configurations (benchmarks, tests; `ts256h` is for weight gradients only,
    /// `swap256h` and `swap272h` for forward and dgrad only).
    pub const ALL: [(&'static str, Sm90Config); 9] = [
        ("coop256x4", Sm90Config::COOP_256),
        ("c2coop256", Sm90Config::COOP_256_C2),
        ("pp128x6", Sm90Config::PINGPONG_128),
        ("coop128x6", Sm90Config::COOP_128),
        ("t256x4", Sm90Config::TALL_256),
        ("c2t256", Sm90Config::TALL_256_C2),
        ("ts256h", Sm90Config::WGRAD_TS),
        ("swap256h", Sm90Config::SWAP_256H),
        ("swap272h", Sm90Config::SWAP_272H),
    ];

    /// Output columns per tile (SwiGLU pairs gate and up columns: half the accumulators;
    /// swap-AB: 128 weight rows, SwiGLU 64).
    pub fn out_bn(&self, epilogue: Epilogue) -> u32 {
        match (self.swap, epilogue == Epilogue::SwiGlu) {
            (true, true) => 64,
            (true, false) => 128,
            (false, true) => self.bn / 2,
            (false, false) => self.bn,
        }
    }

    /// Row tiles of an expert with `rows` rows (forward/dgrad): `ceil(rows / bm)`, or its
    /// swap-AB token chunks. The scheduler's canonical order has these times the n-tiles.
    pub fn m_tiles(&self, rows: usize) -> usize {
        if self.swap {
            swap_chunks(rows, self.swap_n as usize)
        } else {
            rows.div_ceil(self.bm as usize)
        }
    }

    /// Dynamic shared memory for `experts` experts; must equal `Config::smem_bytes` (the NVRTC
    /// entry point `static_assert`s it): 1 KiB alignment slack, the ring, two staging
    /// tiles (64x72 16-bit, or the TMA-store epilogue's), 16 bytes of barriers per stage, 8
    /// bytes per expert + 8. A stage holds `bm x 64` elements of A and `bn x 64` of B
    /// (swap-AB: `swap_n x 64` token elements).
    pub fn smem_bytes(&self, experts: usize) -> usize {
        let b_rows = if self.swap { self.swap_n } else { self.bn };
        let ring = self.stages as usize * (self.bm as usize + b_rows as usize) * BK as usize * 2;
        // Two staging tiles (one per consumer warpgroup): 64x72 16-bit, or for the TMA-store
        // epilogue 32 KiB each, or 16 KiB where the ring leaves no room for that: config.cuh's
        // TS_WG_BYTES (4 KiB kept for barriers and the scheduler, 1 KiB alignment slack, out
        // of the 227 KiB a block can opt in to on sm_90).
        const SMEM_OPTIN: usize = 232_448;
        let staging = if self.tma_store {
            if ring + 2 * 32768 + 4096 <= SMEM_OPTIN - 1024 {
                2 * 32768
            } else {
                2 * 16384
            }
        } else {
            2 * 64 * (64 + 8) * 2
        };
        1024 + ring + staging + 16 * self.stages as usize + 8 * (experts + 1)
    }

    /// Checks the configuration against the engine's compile-time rules for `kind`.
    pub fn validate(&self, kind: GemmKind, epilogue: Epilogue) -> Result<()> {
        let bad = |why: &str| Err(Error::Invalid(format!("sm90 config {self:?}: {why}")));
        if self.bm != 128 && self.bm != 256 {
            return bad("bm (rows per tile) must be 128 or 256");
        }
        if self.bn != 128 && self.bn != 256 {
            return bad("bn must be 128 or 256");
        }
        if self.tma_store && (kind != GemmKind::Wgrad || self.cluster != 1 || self.bm != 128) {
            return bad(
                "the TMA-store epilogue is for weight gradients with one CTA per cluster and \
                 bm = 128",
            );
        }
        if self.swap
            && (kind == GemmKind::Wgrad
                || self.schedule != Schedule::Cooperative
                || self.bm != 128
                || self.bn != 256
                || self.cluster != 1
                || self.tma_store)
        {
            return bad(
                "swap-AB is for forward/dgrad with the cooperative schedule, bm = 128, \
                 bn = 256 and one CTA per cluster",
            );
        }
        match (self.swap, self.swap_n) {
            (_, 256) | (true, 272) => {}
            (true, _) => return bad("swap_n (largest swap-AB token chunk) must be 256 or 272"),
            (false, _) => return bad("swap_n must be 256 without swap-AB"),
        }
        if self.bm == 256 && (self.schedule != Schedule::Cooperative || self.bn != 128) {
            return bad(
                "bm = 256 needs the cooperative schedule and bn = 128 (each consumer warpgroup \
                 holds two m64 blocks of accumulators: registers)",
            );
        }
        if self.schedule == Schedule::PingPong && self.bn != 128 {
            return bad("ping-pong keeps 128 rows per warpgroup: bn must be 128");
        }
        if self.out_bn(epilogue) % 64 != 0 {
            return bad("output columns per tile must be a multiple of 64");
        }
        if !(2..=16).contains(&self.stages) {
            return bad("2 to 16 stages");
        }
        if self.band == 0 {
            return bad("band must be at least 1");
        }
        match self.cluster {
            1 => {}
            2 if self.schedule == Schedule::Cooperative && kind != GemmKind::Wgrad => {}
            2 => return bad("2-CTA clusters: cooperative forward/dgrad only"),
            _ => return bad("cluster must be 1 or 2"),
        }
        if epilogue != Epilogue::None && kind != GemmKind::Forward {
            return bad("activations are forward-only");
        }
        Ok(())
    }

    /// Checks `store` for this configuration: [`Sm90Store::validate`], and swap-AB stores
    /// 16-bit only (its epilogue transposes 16-bit values through shared memory).
    pub fn validate_store(
        &self,
        kind: GemmKind,
        epilogue: Epilogue,
        store: Sm90Store,
    ) -> Result<()> {
        store.validate(kind, epilogue)?;
        if self.swap && store.f32_out {
            return Err(Error::Invalid(format!(
                "sm90 store {store:?}: swap-AB stores a 16-bit C only"
            )));
        }
        Ok(())
    }

    /// NVRTC specialisation macros for a GEMM storing with `store` (its 16-bit output, if
    /// any, is the input's dtype). The default store sets exactly the macros of
    /// [`Sm90Config::defines`]; the others add `SM90_OUT_F32`, `SM90_ACCUM`, `SM90_AUX`.
    pub fn defines_store(
        &self,
        kind: GemmKind,
        epilogue: Epilogue,
        f16_in: bool,
        store: Sm90Store,
    ) -> Defines {
        let mut d = self.defines(kind, epilogue, f16_in, f16_in && !store.f32_out);
        for (k, on) in [
            ("SM90_OUT_F32", store.f32_out),
            ("SM90_ACCUM", store.accumulate),
            ("SM90_AUX", store.aux),
        ] {
            if on {
                d.insert(k.to_string(), "1".to_string());
            }
        }
        d
    }

    /// NVRTC specialisation macros (see `cuda/sm90/grouped_gemm_sm90.cu`). `SM90_BM` is set
    /// only for 256-row tiles (absent means 128), so 128-row configurations keep their
    /// macros, cache keys and kernels.
    pub fn defines(
        &self,
        kind: GemmKind,
        epilogue: Epilogue,
        f16_in: bool,
        f16_out: bool,
    ) -> Defines {
        let mode = match kind {
            GemmKind::Forward => 0,
            GemmKind::Dgrad => 1,
            GemmKind::Wgrad => 2,
        };
        let epi = match epilogue {
            Epilogue::None => 0,
            Epilogue::SwiGlu => 1,
            Epilogue::Gelu => 2,
        };
        let mut d = Defines::new();
        let mut put = |k: &str, v: usize| {
            d.insert(k.to_string(), v.to_string());
        };
        put("SM90_MODE", mode);
        put("SM90_BN", self.bn as usize);
        put(
            "SM90_PINGPONG",
            usize::from(self.schedule == Schedule::PingPong),
        );
        put("SM90_STAGES", self.stages as usize);
        put("SM90_EPI", epi);
        put("SM90_IN_F16", usize::from(f16_in));
        put("SM90_OUT_F16", usize::from(f16_out));
        put("SM90_BAND", self.band as usize);
        put("SM90_CLUSTER", self.cluster as usize);
        put("SM90_L2HINT", usize::from(self.l2_hint));
        if self.bm != 128 {
            put("SM90_BM", self.bm as usize);
        }
        if self.tma_store {
            put("SM90_TSTORE", 1);
        }
        if self.swap {
            put("SM90_SWAP", 1);
        }
        if self.swap_n != 256 {
            put("SM90_SWAP_N", self.swap_n as usize);
        }
        put("SM90_SMEM_ONE_EXPERT", self.smem_bytes(1));
        d
    }

    /// The configuration for a problem with `rows` row-operand rows over `groups` experts,
    /// from the H200 measurements in `bench/results/2026-11-29-hopper-gemm-h200.json`:
    /// forward/dgrad on 2-CTA clusters (best or within 6% of the best variant on all 20
    /// preset forward/dgrad GEMMs), with L2 eviction hints when an expert averages at most 384
    /// rows (weights streamed: +2–6% at 256 rows/expert, up to −14% at 1024); wgrad on single
    /// CTAs with hints and the TMA-store epilogue ([`Sm90Config::WGRAD_TS`]: best on 6 of the
    /// 8 preset weight gradients in bf16, +6% Mixtral wgrad0, +10% DeepSeek-V3, −6% Phi-3.5
    /// wgrad0; `bench/results/2026-11-29-s2-hopper-wgrad-tmastore-h200.json`).
    ///
    /// From [`SWAP_MIN_ROWS`] to [`SWAP_MAX_ROWS`] rows per expert, over at most
    /// [`SWAP_MAX_GROUPS`] experts, forward and dgrad GEMMs without SwiGLU run swap-AB
    /// ([`Sm90Config::SWAP_256H`]; 16-bit C only: [`Sm90Config::choose_for`] knows the
    /// store). At about 128 rows per expert it was 9–12% faster through this launcher on
    /// Qwen2-MoE and Phi-3.5-MoE (gemm_bench) and 2–21% in the nvcc harness on all four
    /// presets, but 4–8% slower through this launcher on DeepSeek-V3; at 64 rows per expert
    /// (DRAM-bound) it was 1–6% slower on three of four DeepSeek-V3 GEMMs. SwiGLU stays on
    /// clusters: swap-AB lost 3–12% there (`bench/results/2026-11-29-s3-*`,
    /// `bench/hopper-dev/NOTES.md` session 3).
    ///
    /// Above [`SWAP_MAX_ROWS`] and up to [`SWAP_WIDE_MAX_ROWS`] rows per expert, forward and
    /// dgrad GEMMs (SwiGLU too) run swap-AB with chunks of up to 272 rows
    /// ([`Sm90Config::SWAP_272H`]): at 256 rows per expert most experts are then one chunk
    /// and read each weight tile once, where 128-row tiles pad a third of an expert over 256
    /// rows. On DeepSeek-V3 at 8192 tokens it was 10–18% faster than the clusters on all
    /// five GEMMs in the harness and 7–14% through this launcher (`gemm_bench`). Dgrad GEMMs
    /// keep it up to [`SWAP_WIDE_DGRAD_MAX_ROWS`] rows per expert (two chunks): Qwen2-MoE's
    /// dgrad at 512 rows per expert ran 2–11% faster than on the clusters in three runs
    /// (`bench/results/2026-11-30-s5-*`); its forward GEMMs did not gain consistently.
    pub fn choose(kind: GemmKind, epilogue: Epilogue, groups: usize, rows: usize) -> Self {
        let per_expert = rows / groups.max(1);
        match kind {
            GemmKind::Forward | GemmKind::Dgrad
                if (SWAP_MIN_ROWS..=SWAP_MAX_ROWS).contains(&per_expert)
                    && groups <= SWAP_MAX_GROUPS
                    && epilogue != Epilogue::SwiGlu =>
            {
                Sm90Config::SWAP_256H
            }
            GemmKind::Forward | GemmKind::Dgrad
                if per_expert > SWAP_MAX_ROWS && per_expert <= SWAP_WIDE_MAX_ROWS =>
            {
                Sm90Config::SWAP_272H
            }
            GemmKind::Dgrad
                if per_expert > SWAP_WIDE_MAX_ROWS && per_expert <= SWAP_WIDE_DGRAD_MAX_ROWS =>
            {
                Sm90Config::SWAP_272H
            }
            GemmKind::Forward | GemmKind::Dgrad => Sm90Config::clustered(per_expert),
            GemmKind::Wgrad => Sm90Config::WGRAD_TS,
        }
    }

    /// Forward/dgrad on 2-CTA clusters, with L2 hints when an expert averages at most 384
    /// rows (its weights are streamed).
    fn clustered(per_expert: usize) -> Self {
        Sm90Config {
            l2_hint: per_expert <= 384,
            ..Sm90Config::COOP_256_C2
        }
    }

    /// [`Sm90Config::choose`] knowing what the GEMM stores: a weight gradient that
    /// accumulates into f32 at ≤ 384 rows per expert runs from registers
    /// ([`Sm90Config::COOP_256`]); that is 8–14% faster than the TMA reduce-add on DeepSeek-V3
    /// (wgrad1.acc 164 against 144 TFLOP/s, wgrad0.acc 155 against 142). A first backward
    /// overwrites instead and keeps the TMA store, which is 8% faster there (270 against 249).
    /// Measured in `bench/results/2026-11-29-s2-hopper-wgrad-final-h200.json`. An f32 C
    /// of a forward/dgrad GEMM never runs swap-AB (its epilogue stores 16-bit only).
    pub fn choose_for(
        kind: GemmKind,
        epilogue: Epilogue,
        groups: usize,
        rows: usize,
        store: Sm90Store,
    ) -> Self {
        let per_expert = rows / groups.max(1);
        if kind == GemmKind::Wgrad && store.accumulate && per_expert <= 384 {
            return Sm90Config::COOP_256;
        }
        let c = Sm90Config::choose(kind, epilogue, groups, rows);
        if c.swap && store.f32_out {
            return Sm90Config::clustered(per_expert);
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smem_formula() {
        // Hand-checked against config.cuh: 1024 + 4 * 48 KiB + 18432 + 64 + 16 for one expert.
        assert_eq!(Sm90Config::COOP_256.smem_bytes(1), 216_144);
        assert_eq!(
            Sm90Config::PINGPONG_128.smem_bytes(1),
            1024 + 6 * 32768 + 18432 + 96 + 16
        );
        // 256 experts still fit the 227 KiB a block can opt in to on H100/H200.
        for (_, c) in Sm90Config::ALL {
            assert!(c.smem_bytes(256) <= 232_448, "{c:?}");
        }
        assert!(Sm90Config::COOP_256.smem_bytes(4096) > 232_448);
    }

    #[test]
    fn named_configs_are_valid_where_they_apply() {
        for (name, c) in Sm90Config::ALL {
            for kind in [GemmKind::Forward, GemmKind::Dgrad] {
                // The TMA-store epilogue is for weight gradients only.
                assert_eq!(
                    c.validate(kind, Epilogue::None).is_ok(),
                    !c.tma_store,
                    "{name}"
                );
            }
            // Weight gradients: single CTAs, not swap-AB (its tokens are wgmma's N).
            let w = c.validate(GemmKind::Wgrad, Epilogue::None);
            assert_eq!(w.is_ok(), c.cluster == 1 && !c.swap, "{name}");
            let swiglu = c.validate(GemmKind::Forward, Epilogue::SwiGlu);
            assert_eq!(
                swiglu.is_ok(),
                !c.tma_store,
                "SwiGLU halves bn to a multiple of 64"
            );
        }
    }

    #[test]
    fn accumulating_small_expert_weight_gradients_store_from_registers() {
        let acc = Sm90Store {
            f32_out: true,
            accumulate: true,
            aux: false,
        };
        let overwrite = Sm90Store {
            accumulate: false,
            ..acc
        };
        let w = GemmKind::Wgrad;
        let none = Epilogue::None;
        // DeepSeek-V3 (256 rows per expert): accumulate from registers, overwrite by TMA.
        assert_eq!(
            Sm90Config::choose_for(w, none, 256, 65536, acc),
            Sm90Config::COOP_256
        );
        assert_eq!(
            Sm90Config::choose_for(w, none, 256, 65536, overwrite),
            Sm90Config::WGRAD_TS
        );
        // Qwen2-MoE (512) and Mixtral (2048): the TMA store either way.
        for (groups, rows) in [(64, 32768), (8, 16384)] {
            assert_eq!(
                Sm90Config::choose_for(w, none, groups, rows, acc),
                Sm90Config::WGRAD_TS
            );
        }
        // Other kinds follow `choose` with a 16-bit C; an f32 C leaves swap-AB (16-bit
        // stores only) for the clusters.
        assert_eq!(
            Sm90Config::choose_for(GemmKind::Forward, none, 256, 65536, Sm90Store::default()),
            Sm90Config::choose(GemmKind::Forward, none, 256, 65536)
        );
        let f32_fwd = Sm90Config::choose_for(GemmKind::Forward, none, 256, 65536, acc);
        assert_eq!((f32_fwd.swap, f32_fwd.cluster), (false, 2));
    }

    #[test]
    fn tma_store_is_for_weight_gradients() {
        let ts = Sm90Config::WGRAD_TS;
        ts.validate(GemmKind::Wgrad, Epilogue::None).unwrap();
        let msg = ts
            .validate(GemmKind::Forward, Epilogue::None)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("TMA-store epilogue"), "{msg}");
        for bad in [
            Sm90Config {
                cluster: 2,
                ..Sm90Config::WGRAD_TS
            },
            Sm90Config {
                bm: 256,
                bn: 128,
                ..Sm90Config::WGRAD_TS
            },
        ] {
            assert!(
                bad.validate(GemmKind::Wgrad, Epilogue::None).is_err(),
                "{bad:?}"
            );
        }
        // 3 stages of 48 KiB + 64 KiB of staging + 16 x 3 barrier bytes + 1 KiB slack + 16:
        // 256 experts still fit the 227 KiB a block can opt in to.
        assert_eq!(ts.smem_bytes(1), 1024 + 3 * 49152 + 65536 + 48 + 16);
        assert!(ts.smem_bytes(256) <= 232_448);
        // Ping-pong with 6 stages of 32 KiB leaves room for 16 KiB of staging per warpgroup.
        let pp = Sm90Config {
            tma_store: true,
            ..Sm90Config::PINGPONG_128
        };
        pp.validate(GemmKind::Wgrad, Epilogue::None).unwrap();
        assert_eq!(pp.smem_bytes(1), 1024 + 6 * 32768 + 2 * 16384 + 96 + 16);
        let d = ts.defines(GemmKind::Wgrad, Epilogue::None, false, false);
        assert_eq!(d["SM90_TSTORE"], "1");
        assert_eq!(d["SM90_STAGES"], "3");
        // The other configurations keep exactly their macros.
        for (name, c) in Sm90Config::ALL {
            if !c.tma_store {
                let d = c.defines(GemmKind::Wgrad, Epilogue::None, false, false);
                assert!(!d.contains_key("SM90_TSTORE"), "{name}");
            }
        }
        assert_eq!(
            Sm90Config::choose(GemmKind::Wgrad, Epilogue::None, 8, 16384),
            Sm90Config::WGRAD_TS
        );
    }

    #[test]
    fn invalid_configs_are_rejected() {
        let mut c = Sm90Config::PINGPONG_128;
        c.bn = 256;
        assert!(c.validate(GemmKind::Forward, Epilogue::None).is_err());
        let mut c = Sm90Config::COOP_256;
        c.bn = 192;
        assert!(c.validate(GemmKind::Forward, Epilogue::None).is_err());
        let mut c = Sm90Config::COOP_256;
        c.cluster = 4;
        assert!(c.validate(GemmKind::Forward, Epilogue::None).is_err());
        let mut c = Sm90Config::COOP_256;
        c.stages = 1;
        assert!(c.validate(GemmKind::Forward, Epilogue::None).is_err());
        assert!(
            Sm90Config::COOP_256
                .validate(GemmKind::Dgrad, Epilogue::Gelu)
                .is_err()
        );
    }

    #[test]
    fn defines_cover_every_macro() {
        let d = Sm90Config::COOP_256_C2.defines(GemmKind::Dgrad, Epilogue::None, false, false);
        for k in [
            "SM90_MODE",
            "SM90_BN",
            "SM90_PINGPONG",
            "SM90_STAGES",
            "SM90_EPI",
            "SM90_IN_F16",
            "SM90_OUT_F16",
            "SM90_BAND",
            "SM90_CLUSTER",
            "SM90_L2HINT",
            "SM90_SMEM_ONE_EXPERT",
        ] {
            assert!(d.contains_key(k), "{k}");
        }
        assert_eq!(d["SM90_MODE"], "1");
        assert_eq!(d["SM90_CLUSTER"], "2");
        assert_eq!(d["SM90_SMEM_ONE_EXPERT"], "216144");
    }

    #[test]
    fn store_variants() {
        let plain = Sm90Store::default();
        let f32_acc = Sm90Store {
            f32_out: true,
            accumulate: true,
            aux: false,
        };
        let aux = Sm90Store { aux: true, ..plain };
        for kind in [GemmKind::Forward, GemmKind::Dgrad, GemmKind::Wgrad] {
            plain.validate(kind, Epilogue::None).unwrap();
            f32_acc.validate(kind, Epilogue::None).unwrap();
            assert!(aux.validate(kind, Epilogue::None).is_err());
        }
        aux.validate(GemmKind::Forward, Epilogue::SwiGlu).unwrap();
        aux.validate(GemmKind::Forward, Epilogue::Gelu).unwrap();
        let acc16 = Sm90Store {
            accumulate: true,
            ..plain
        };
        assert!(acc16.validate(GemmKind::Wgrad, Epilogue::None).is_err());
        let aux32 = Sm90Store {
            f32_out: true,
            aux: true,
            accumulate: false,
        };
        assert!(aux32.validate(GemmKind::Forward, Epilogue::SwiGlu).is_err());
        // The default store adds no macro: the default kernels keep their NVRTC options.
        let c = Sm90Config::COOP_256;
        for f16 in [false, true] {
            assert_eq!(
                c.defines_store(GemmKind::Wgrad, Epilogue::None, f16, plain),
                c.defines(GemmKind::Wgrad, Epilogue::None, f16, f16)
            );
        }
        let d = c.defines_store(GemmKind::Wgrad, Epilogue::None, true, f32_acc);
        assert_eq!(
            (
                d["SM90_OUT_F16"].as_str(),
                d["SM90_IN_F16"].as_str(),
                d["SM90_OUT_F32"].as_str(),
                d["SM90_ACCUM"].as_str()
            ),
            ("0", "1", "1", "1")
        );
        assert!(!d.contains_key("SM90_AUX"));
        let d = c.defines_store(GemmKind::Forward, Epilogue::SwiGlu, false, aux);
        assert_eq!(d["SM90_AUX"], "1");
        assert!(!d.contains_key("SM90_OUT_F32"));
    }

    #[test]
    fn swap_chunks_cover_every_expert() {
        assert_eq!((swap_chunk_rows(257, 256), swap_chunks(257, 256)), (144, 2));
        assert_eq!((swap_chunk_rows(546, 256), swap_chunks(546, 256)), (192, 3));
        assert_eq!(
            (swap_chunk_rows(1000, 256), swap_chunks(1000, 256)),
            (256, 4)
        );
        assert_eq!((swap_chunk_rows(1, 256), swap_chunks(1, 256)), (16, 1));
        assert_eq!(swap_chunks(0, 256), 0);
        // 272-row chunks: one chunk up to 272 rows, then two
        assert_eq!((swap_chunk_rows(257, 272), swap_chunks(257, 272)), (272, 1));
        assert_eq!((swap_chunk_rows(272, 272), swap_chunks(272, 272)), (272, 1));
        assert_eq!((swap_chunk_rows(273, 272), swap_chunks(273, 272)), (144, 2));
        assert_eq!((swap_chunk_rows(530, 272), swap_chunks(530, 272)), (272, 2));
        assert_eq!(swap_chunks(0, 272), 0);
        for max_n in [256, 272] {
            for r in 1..=6000 {
                let (cs, n) = (swap_chunk_rows(r, max_n), swap_chunks(r, max_n));
                assert!(
                    cs % 16 == 0 && (16..=max_n).contains(&cs),
                    "{r}: chunk {cs}"
                );
                // every chunk holds rows; together they hold all of them
                assert!((n - 1) * cs < r && n * cs >= r, "{r}: {n} x {cs}");
                // no more chunks than 256-row tiles (the plan's tile bound relies on it)
                assert!(n <= r.div_ceil(256), "{r}: {n} chunks");
            }
        }
    }

    #[test]
    fn swap_ab_is_chosen_for_few_rows_per_expert() {
        let (f, d, w) = (GemmKind::Forward, GemmKind::Dgrad, GemmKind::Wgrad);
        let none = Epilogue::None;
        for kind in [f, d] {
            // Qwen2-MoE at 2048 tokens (60 experts, 136 rows each) and Phi-3.5-MoE at 1024
            // (16, 128): swap-AB; at 273 and 512 rows per expert only dgrad.
            assert_eq!(
                Sm90Config::choose(kind, none, 60, 8192),
                Sm90Config::SWAP_256H
            );
            assert_eq!(
                Sm90Config::choose(kind, none, 16, 2048),
                Sm90Config::SWAP_256H
            );
            for (groups, rows) in [(60, 16384), (64, 32768)] {
                let c = Sm90Config::choose(kind, none, groups, rows);
                assert_eq!(c.swap, kind == d, "{kind:?} {groups} {rows}");
            }
            // Over 544 rows per expert (three chunks): the clusters.
            assert!(!Sm90Config::choose(kind, none, 64, 65536).swap);
            // DeepSeek-V3 at 4096 tokens: 128 rows over 256 experts, measured slower.
            assert!(!Sm90Config::choose(kind, none, 256, 32768).swap);
            // DeepSeek-V3 at 8192 tokens (256 rows per expert, SwiGLU too): 272-row chunks.
            for epi in [none, Epilogue::SwiGlu] {
                assert_eq!(
                    Sm90Config::choose(kind, epi, 256, 65536),
                    Sm90Config::SWAP_272H
                );
            }
        }
        assert!(Sm90Config::choose(f, Epilogue::Gelu, 64, 8192).swap);
        // 64 rows per expert (DRAM-bound) and tiny batches: the clusters.
        for rows in [4096, 64] {
            assert!(!Sm90Config::choose(f, none, 64, rows).swap, "{rows}");
        }
        assert!(!Sm90Config::choose(f, Epilogue::SwiGlu, 64, 8192).swap);
        assert!(!Sm90Config::choose(w, none, 64, 8192).swap);
        // An f32 C stays on clusters (swap-AB stores 16-bit only).
        let f32_out = Sm90Store {
            f32_out: true,
            ..Default::default()
        };
        let c = Sm90Config::choose_for(f, none, 64, 8192, f32_out);
        assert!(!c.swap);
        c.validate_store(f, none, f32_out).unwrap();
        assert!(Sm90Config::choose_for(f, none, 64, 8192, Sm90Store::default()).swap);
    }

    #[test]
    fn swap_ab_rules() {
        let s = Sm90Config::SWAP_256H;
        for epi in [Epilogue::None, Epilogue::SwiGlu, Epilogue::Gelu] {
            s.validate(GemmKind::Forward, epi).unwrap();
        }
        s.validate(GemmKind::Dgrad, Epilogue::None).unwrap();
        assert_eq!(
            (s.out_bn(Epilogue::None), s.out_bn(Epilogue::SwiGlu)),
            (128, 64)
        );
        assert_eq!((s.m_tiles(257), Sm90Config::COOP_256.m_tiles(257)), (2, 3));
        assert_eq!(Sm90Config::SWAP_272H.m_tiles(257), 1);
        // 272-row chunks: swap-AB only, and 256 or 272
        let w = Sm90Config::SWAP_272H;
        w.validate(GemmKind::Dgrad, Epilogue::None).unwrap();
        for bad in [
            Sm90Config { swap_n: 288, ..w },
            Sm90Config { swap: false, ..w },
        ] {
            let msg = bad
                .validate(GemmKind::Forward, Epilogue::None)
                .unwrap_err()
                .to_string();
            assert!(msg.contains("swap_n"), "{msg}");
        }
        let msg = s
            .validate(GemmKind::Wgrad, Epilogue::None)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("swap-AB"), "{msg}");
        for bad in [
            Sm90Config { cluster: 2, ..s },
            Sm90Config { bn: 128, ..s },
            Sm90Config {
                schedule: Schedule::PingPong,
                bn: 128,
                ..s
            },
            Sm90Config {
                bm: 256,
                bn: 128,
                ..s
            },
        ] {
            assert!(
                bad.validate(GemmKind::Forward, Epilogue::None).is_err(),
                "{bad:?}"
            );
        }
        let f32_out = Sm90Store {
            f32_out: true,
            ..Default::default()
        };
        let msg = s
            .validate_store(GemmKind::Forward, Epilogue::None, f32_out)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("16-bit"), "{msg}");
        let d = s.defines(GemmKind::Dgrad, Epilogue::None, false, false);
        assert_eq!(
            (d["SM90_SWAP"].as_str(), d["SM90_L2HINT"].as_str()),
            ("1", "1")
        );
        assert!(
            !Sm90Config::COOP_256
                .defines(GemmKind::Forward, Epilogue::None, false, false)
                .contains_key("SM90_SWAP")
        );
    }

    #[test]
    fn choice_is_valid_for_its_problem() {
        for kind in [GemmKind::Forward, GemmKind::Dgrad, GemmKind::Wgrad] {
            for (groups, rows) in [(8, 16384), (64, 32768), (16, 16384), (256, 65536), (1, 7)] {
                let c = Sm90Config::choose(kind, Epilogue::None, groups, rows);
                c.validate(kind, Epilogue::None).unwrap();
            }
        }
        // Measured choices: Mixtral-like (2048 rows/expert) no hints, DeepSeek-like (256) hints.
        let mixtral = Sm90Config::choose(GemmKind::Forward, Epilogue::SwiGlu, 8, 16384);
        assert_eq!((mixtral.cluster, mixtral.l2_hint), (2, false));
        let deepseek = Sm90Config::choose(GemmKind::Dgrad, Epilogue::None, 256, 65536);
        assert_eq!(deepseek, Sm90Config::SWAP_272H);
        let wgrad = Sm90Config::choose(GemmKind::Wgrad, Epilogue::None, 8, 16384);
        assert_eq!((wgrad.cluster, wgrad.l2_hint), (1, true));
        // The defaults keep 128-row tiles (256-row tiles are opt-in).
        for c in [mixtral, deepseek, wgrad] {
            assert_eq!((c.bm, c.bn), (128, 256));
        }
    }

    #[test]
    fn tall_tiles_validate() {
        for c in [Sm90Config::TALL_256, Sm90Config::TALL_256_C2] {
            assert_eq!((c.bm, c.bn, c.stages), (256, 128, 4));
            assert_eq!(c.schedule, Schedule::Cooperative);
            for epi in [Epilogue::None, Epilogue::SwiGlu, Epilogue::Gelu] {
                c.validate(GemmKind::Forward, epi).unwrap();
            }
            c.validate(GemmKind::Dgrad, Epilogue::None).unwrap();
        }
        Sm90Config::TALL_256
            .validate(GemmKind::Wgrad, Epilogue::None)
            .unwrap();
        assert!(
            Sm90Config::TALL_256_C2
                .validate(GemmKind::Wgrad, Epilogue::None)
                .is_err()
        );
        let names: Vec<&str> = Sm90Config::ALL.iter().map(|(n, _)| *n).collect();
        assert!(
            names.contains(&"t256x4") && names.contains(&"c2t256"),
            "{names:?}"
        );
        // Every other named configuration keeps 128-row tiles.
        for (name, c) in Sm90Config::ALL {
            assert_eq!(c.bm == 256, name.contains("t256"), "{name}");
        }
        let err = |c: Sm90Config| {
            c.validate(GemmKind::Forward, Epilogue::None)
                .unwrap_err()
                .to_string()
        };
        for bm in [0, 64, 192, 512] {
            let e = err(Sm90Config {
                bm,
                ..Sm90Config::COOP_128
            });
            assert!(e.contains("bm (rows per tile) must be 128 or 256"), "{e}");
            assert!(e.contains(&format!("bm: {bm}")), "{e}");
        }
        let e = err(Sm90Config {
            bm: 256,
            ..Sm90Config::PINGPONG_128
        });
        assert!(e.contains("bm = 256 needs the cooperative schedule"), "{e}");
        let e = err(Sm90Config {
            bm: 256,
            ..Sm90Config::COOP_256
        });
        assert!(e.contains("bn = 128"), "{e}");
    }

    #[test]
    fn tall_tiles_smem_and_defines() {
        // config.cuh: A stage 256 x 64 x 2 = 32 KiB, B stage 16 KiB, 4 stages = 192 KiB,
        // + 1024 + 18432 staging + 64 barriers + 16 (one expert): the same as 128x256.
        assert_eq!(
            Sm90Config::TALL_256.smem_bytes(1),
            1024 + 4 * (32768 + 16384) + 18432 + 64 + 16
        );
        let c = Sm90Config {
            stages: 3,
            ..Sm90Config::TALL_256
        };
        assert_eq!(c.smem_bytes(8), 1024 + 3 * 49152 + 18432 + 48 + 8 * 9);
        let d = Sm90Config::TALL_256.defines(GemmKind::Forward, Epilogue::SwiGlu, false, false);
        assert_eq!(d["SM90_BM"], "256");
        assert_eq!(d["SM90_BN"], "128");
        assert_eq!(d["SM90_SMEM_ONE_EXPERT"], "216144");
        let acc = Sm90Store {
            f32_out: true,
            accumulate: true,
            aux: false,
        };
        let d = Sm90Config::TALL_256_C2.defines_store(GemmKind::Dgrad, Epilogue::None, true, acc);
        assert_eq!(
            (d["SM90_BM"].as_str(), d["SM90_CLUSTER"].as_str()),
            ("256", "2")
        );
        // 128-row tiles add no SM90_BM: their specialisations keep exactly their macros.
        let plain_128 = |c: &Sm90Config| c.bm == 128 && !c.tma_store && !c.swap;
        for (name, c) in Sm90Config::ALL.into_iter().filter(|(_, c)| plain_128(c)) {
            for kind in [GemmKind::Forward, GemmKind::Dgrad] {
                let d = c.defines(kind, Epilogue::None, false, false);
                assert!(!d.contains_key("SM90_BM"), "{name}");
                assert_eq!(d.len(), 11, "{name}");
                let d = c.defines_store(kind, Epilogue::None, false, acc);
                assert!(!d.contains_key("SM90_BM"), "{name}");
            }
        }
    }
}
