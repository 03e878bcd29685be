//! Layer 0 (dispatch → GEMM0): the receive buffer cut along rows.
//!
//! The receive buffer of rank `d` (`[recv_rows, H]`, `comet_core::RoutingPlan`'s receive
//! layout) holds segments `(l, s)` ordered by local expert `l`, then by source rank in
//! rotated order `s = (d + i) mod W`, `i = 0..W` (`i` is the segment's *source position*;
//! `i = 0` is the local rank). GEMM0's m-tiles cut each expert's rows into runs of `BM`;
//! a tile needs exactly the rows of the segments it overlaps.
//!
//! # Flags
//! A flag guards a *chunk*: a run of receive rows of one segment that one copy moves and
//! then releases.
//! - [`Chunking::Segment`]: one flag per segment `(l, i)`, id `l·W + i`, for every segment
//!   including empty ones (an empty segment's flag is released without copying). `L·W`
//!   flags, ids known to every rank without any scan.
//! - [`Chunking::Rows(C)`](Chunking::Rows): segment `(l, i)` of `n` rows is split into
//!   `⌈n / C⌉` chunks of `C` rows (the last shorter), so a large segment releases its first
//!   rows early. Chunk ids run in receive-layout order: `chunk_base(l, i) + c` with
//!   `chunk_base` the exclusive prefix sum of `⌈n / C⌉` over segments in `(l, i)` order.
//!   At most `⌊recv_rows / C⌋ + L·W` flags (each segment adds at most one partial chunk).
//!
//! A chunk's rows in the receive layout are `seg_start + c·C ..` and its rows in the source
//! rank's send layout (`RoutingPlan::send_rows_to`: by expert id, then token) are
//! `send_start(s, d·L + l) + c·C ..` with `send_start(s, e) = Σ_{e' < e} counts[s][e']`.
//!
//! # Arrival order
//! Copies run (and flags are released) in *arrival order*: source positions `i = 0, 1, …,
//! W − 1` (the local rank's rows first, then `d + 1`, `d + 2`, … as in a ring), and inside
//! one source by local expert, then chunk — the order of the source's send layout, so each
//! source's data is read front to back. [`Layer0Schedule::copy_order`] lists it.
//!
//! # The counts-only algorithm (what a device kernel computes)
//! Inputs: `counts[W][E]`, rank `d`, `BM`, `nt = ⌈N / BN⌉`, chunk rows `C` (or one chunk per
//! segment), the n-order. Every step is a map, a prefix sum or a counting sort over small
//! arrays, so one thread block computes it from the counts the routing kernel left on the
//! device (no host synchronisation):
//! 1. **Segments.** `n[l][i] = counts[(d + i) mod W][d·L + l]`; `seg_start` = exclusive
//!    prefix sum of `n` in `(l, i)` order (`L·W + 1` entries); expert `l`'s rows are
//!    `seg_start[l][0] .. seg_start[l + 1][0]`.
//! 2. **Chunks.** `nc[l][i] = ⌈n[l][i] / C⌉` (segment mode: 1 for every segment);
//!    `chunk_base` = exclusive prefix sum of `nc` in `(l, i)` order.
//! 3. **m-tiles.** `mt[l] = ⌈rows_l / BM⌉`; `tile_base` = exclusive prefix sum of `mt`.
//!    m-tile `(l, m)` has rows `[a, b)` = `start_l + m·BM .. min(start_l + (m + 1)·BM, end_l)`.
//! 4. **Dependencies** of m-tile `(l, m)`: `i_lo` = the segment of row `a` (the largest `i`
//!    with `seg_start[l][i] ≤ a` and `n[l][i] > 0`; a binary search over `W` offsets),
//!    `i_hi` = the segment of row `b − 1`; `sources` = the number of non-empty segments in
//!    `i_lo ..= i_hi`. Chunk mode: the needed flags are the contiguous id range from
//!    `chunk_base[l][i_lo] + (a − seg_start[l][i_lo]) / C` to
//!    `chunk_base[l][i_hi] + (b − 1 − seg_start[l][i_hi]) / C`. Segment mode: `l·W + i` for
//!    the non-empty `i` in `i_lo ..= i_hi`.
//! 5. **Readiness class** `bucket = i_hi·W + (sources − 1)`: the latest source in arrival
//!    order, then fewest sources first. `i_hi = 0` means all rows are local.
//! 6. **Counting sort** of the m-tiles by bucket, stable in `(l, m)` order: histogram of
//!    the `W²` buckets, exclusive prefix sum, then each m-tile's position is its bucket's
//!    start plus the number of earlier m-tiles with the same bucket (one pass in `(l, m)`
//!    order, or a warp-ballot rank per chunk of 32 m-tiles).
//! 7. **n-tiles.** [`NOrder::Together`]: each sorted m-tile emits `n = 0..nt`.
//!    [`NOrder::Interleaved`]: consecutive sorted m-tiles with the same expert and bucket
//!    form runs of at most `band`; each run emits, for `n = 0..nt`, its m-tiles in order.
//! 8. **Engine ids** (optional): each `(l, m, n)` maps to the sm90 scheduler's canonical id
//!    ([`crate::tile::CanonicalTiles`]), giving the `order` array the engine takes.
//!
//! # Waiting per tile on the engine
//! The engine's `FlagWait` hook waits on one word per `(expert, m-tile)`. A fused kernel
//! gets there from the chunk flags with a fan-in count: after copying chunk `f`, a comm block
//! does `atomicInc(&arrived[t], fanin[t] − 1)` for each m-tile `t` in
//! [`Layer0Schedule::flag_tiles`]`(f)`; the arrival that returns `fanin[t] − 1` (the last one;
//! `atomicInc` wraps the counter back to 0 for the next call) stores the tile's flag with
//! release semantics at the call's epoch. `fanin[t]` is `m_tiles[t].flags.len()`.

use std::ops::Range;

use comet_core::RoutingPlan;

use crate::counts::Counts;
use crate::error::{Error, Result};
use crate::tile::{CanonicalTiles, NOrder, TileShape};

/// How receive rows are grouped under flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Chunking {
    /// One flag per `(local expert, source rank)` segment.
    Segment,
    /// Segments split into chunks of this many rows (0 is rejected).
    Rows(usize),
}

/// Parameters of a layer-0 schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Layer0Options {
    /// GEMM0's output tiles (`n` = the activation's columns `F`).
    pub tile: TileShape,
    /// Rows per flag.
    pub chunking: Chunking,
    /// Order of the n-tiles.
    pub n_order: NOrder,
}

impl Layer0Options {
    /// Options with one flag per segment and n-tiles kept together.
    pub fn new(tile: TileShape) -> Self {
        Layer0Options {
            tile,
            chunking: Chunking::Segment,
            n_order: NOrder::Together,
        }
    }

    /// Checks the parameters.
    ///
    /// # Errors
    /// [`Error::ZeroSize`] for `Chunking::Rows(0)` or an interleave band of 0.
    pub fn validate(&self) -> Result<()> {
        if self.chunking == Chunking::Rows(0) {
            return Err(Error::ZeroSize { name: "chunk rows" });
        }
        self.n_order.validate()
    }
}

/// A run of receive rows released by one flag, and where it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Local expert `l` of the segment.
    pub expert: usize,
    /// Source rank `s` of the segment.
    pub source: usize,
    /// Rows of the receive buffer (may be empty in [`Chunking::Segment`] mode).
    pub rows: Range<usize>,
    /// The same rows in the source rank's send layout.
    pub src_rows: Range<usize>,
}

/// One m-tile of GEMM0 and what it depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MTile {
    /// Local expert.
    pub expert: usize,
    /// m-tile index inside the expert.
    pub m_tile: usize,
    /// Receive rows of the tile (`1..=BM` of them).
    pub rows: Range<usize>,
    /// Flags whose chunks overlap the rows, ascending.
    pub flags: Vec<u32>,
    /// Source position (`i`, 0 = local) of the tile's last row: the latest source it needs.
    pub last_source: usize,
    /// Number of distinct source ranks among its rows.
    pub sources: usize,
}

impl MTile {
    /// Readiness class `last_source·W + sources − 1` (the sort key of the schedule).
    pub fn bucket(&self, world: usize) -> usize {
        self.last_source * world + self.sources.saturating_sub(1)
    }
}

/// One GEMM0 tile in processing order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TileRef {
    /// Local expert.
    pub expert: usize,
    /// m-tile index inside the expert.
    pub m_tile: usize,
    /// n-tile index.
    pub n_tile: usize,
    /// Receive rows the tile reads (and writes in the output).
    pub rows: Range<usize>,
    /// Flags it must acquire before loading its rows.
    pub flags: Vec<u32>,
}

/// The layer-0 schedule of one rank: flags, copy order and tile order. Plain data: the
/// fields are public so a fused kernel's launcher can upload them (and tests can break
/// them); [`Layer0Schedule::check`] verifies every invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer0Schedule {
    /// The receiving rank `d`.
    pub rank: usize,
    /// Ranks `W`.
    pub world: usize,
    /// Local experts `L`.
    pub local: usize,
    /// The options it was built with.
    pub options: Layer0Options,
    /// `L·W + 1` segment offsets: segment `(l, i)` is `seg_offsets[l·W + i] .. [l·W + i + 1]`.
    pub seg_offsets: Vec<usize>,
    /// Flag id → the chunk it guards.
    pub flags: Vec<Chunk>,
    /// Flag ids in arrival order (a permutation of `0..flags.len()`).
    pub copy_order: Vec<u32>,
    /// m-tiles in `(expert, m)` order; m-tile `(l, m)` is `m_tiles[m_tile_base[l] + m]`.
    pub m_tiles: Vec<MTile>,
    /// `L + 1` prefix sums of m-tiles per expert.
    pub m_tile_base: Vec<usize>,
    /// The tiles in processing order.
    pub tiles: Vec<TileRef>,
}

impl Layer0Schedule {
    /// The schedule of rank `d` from the routing counts alone (module doc, steps 1–7).
    ///
    /// # Errors
    /// [`Error::RankOutOfRange`]; the errors of [`Layer0Options::validate`].
    pub fn from_counts(counts: &Counts, d: usize, options: Layer0Options) -> Result<Self> {
        let _span = tracing::debug_span!("layer0_schedule", rank = d).entered();
        counts.check_rank(d)?;
        options.validate()?;
        let (w, l_n) = (counts.world(), counts.local());
        let tile = options.tile;
        let bm = tile.bm();

        // 1. Segments.
        let seg_rows = |l: usize, i: usize| counts.segment_rows(d, l, (d + i) % w);
        let mut seg_offsets = Vec::with_capacity(l_n * w + 1);
        seg_offsets.push(0);
        for l in 0..l_n {
            for i in 0..w {
                let last = seg_offsets[seg_offsets.len() - 1];
                seg_offsets.push(last + seg_rows(l, i));
            }
        }
        let seg = |l: usize, i: usize| seg_offsets[l * w + i]..seg_offsets[l * w + i + 1];
        // Send-layout start of expert e on source s.
        let send_start =
            |s: usize, e: usize| -> usize { (0..e).map(|e2| counts.get(s, e2)).sum::<usize>() };

        // 2. Chunks.
        let mut chunk_base = Vec::with_capacity(l_n * w + 1);
        chunk_base.push(0usize);
        let mut flags = Vec::new();
        for l in 0..l_n {
            for i in 0..w {
                let s = (d + i) % w;
                let r = seg(l, i);
                let src0 = send_start(s, d * l_n + l);
                let pieces: Vec<Range<usize>> = match options.chunking {
                    Chunking::Segment => std::iter::once(0..r.len()).collect(),
                    Chunking::Rows(c) => (0..r.len().div_ceil(c))
                        .map(|k| k * c..((k + 1) * c).min(r.len()))
                        .collect(),
                };
                for p in &pieces {
                    flags.push(Chunk {
                        expert: l,
                        source: s,
                        rows: r.start + p.start..r.start + p.end,
                        src_rows: src0 + p.start..src0 + p.end,
                    });
                }
                chunk_base.push(chunk_base[chunk_base.len() - 1] + pieces.len());
            }
        }
        if flags.len() > u32::MAX as usize {
            return Err(Error::TooLarge {
                what: "flags of a layer-0 schedule (ids are u32)",
                value: flags.len() as u128,
                limit: u32::MAX as u128,
            });
        }
        let mut copy_order = Vec::with_capacity(flags.len());
        for i in 0..w {
            for l in 0..l_n {
                copy_order.extend(chunk_base[l * w + i] as u32..chunk_base[l * w + i + 1] as u32);
            }
        }

        // 3.–4. m-tiles and their dependencies.
        let mut m_tile_base = Vec::with_capacity(l_n + 1);
        m_tile_base.push(0usize);
        let mut m_tiles = Vec::new();
        for l in 0..l_n {
            let (start, end) = (seg_offsets[l * w], seg_offsets[(l + 1) * w]);
            let mt = tile.m_tiles(end - start);
            // The segment (source position) of a row of this expert: the last non-empty
            // segment starting at or before it.
            let seg_of = |row: usize| -> usize {
                let offs = &seg_offsets[l * w..=(l + 1) * w];
                // Largest i with offs[i] <= row < offs[i + 1] (the segment is non-empty).
                let (mut lo, mut hi) = (0usize, w);
                while hi - lo > 1 {
                    let mid = (lo + hi) / 2;
                    if offs[mid] <= row {
                        lo = mid;
                    } else {
                        hi = mid;
                    }
                }
                lo
            };
            for m in 0..mt {
                let a = start + m * bm;
                let b = (a + bm).min(end);
                let (i_lo, i_hi) = (seg_of(a), seg_of(b - 1));
                let nonempty: Vec<usize> =
                    (i_lo..=i_hi).filter(|&i| !seg(l, i).is_empty()).collect();
                let needed: Vec<u32> = match options.chunking {
                    Chunking::Segment => nonempty.iter().map(|&i| (l * w + i) as u32).collect(),
                    Chunking::Rows(c) => {
                        let first = chunk_base[l * w + i_lo] + (a - seg(l, i_lo).start) / c;
                        let last = chunk_base[l * w + i_hi] + (b - 1 - seg(l, i_hi).start) / c;
                        (first as u32..=last as u32).collect()
                    }
                };
                m_tiles.push(MTile {
                    expert: l,
                    m_tile: m,
                    rows: a..b,
                    flags: needed,
                    last_source: i_hi,
                    sources: nonempty.len(),
                });
            }
            m_tile_base.push(m_tiles.len());
        }

        // 5.–6. Counting sort by readiness class, stable in (l, m) order.
        let buckets = w * w;
        let mut start = vec![0usize; buckets + 1];
        for t in &m_tiles {
            start[t.bucket(w) + 1] += 1;
        }
        for b in 0..buckets {
            start[b + 1] += start[b];
        }
        let mut sorted = vec![0usize; m_tiles.len()];
        let mut next = start;
        for (idx, t) in m_tiles.iter().enumerate() {
            let b = t.bucket(w);
            sorted[next[b]] = idx;
            next[b] += 1;
        }

        // 7. n-tiles.
        let pairs = options
            .n_order
            .expand(&sorted, 0..tile.n_tiles(), |&x, &y| {
                m_tiles[x].expert == m_tiles[y].expert
                    && m_tiles[x].bucket(w) == m_tiles[y].bucket(w)
            });
        let tiles = pairs
            .into_iter()
            .map(|(k, n)| {
                let t = &m_tiles[sorted[k]];
                TileRef {
                    expert: t.expert,
                    m_tile: t.m_tile,
                    n_tile: n,
                    rows: t.rows.clone(),
                    flags: t.flags.clone(),
                }
            })
            .collect();

        Ok(Layer0Schedule {
            rank: d,
            world: w,
            local: l_n,
            options,
            seg_offsets,
            flags,
            copy_order,
            m_tiles,
            m_tile_base,
            tiles,
        })
    }

    /// The schedule of rank `d` for a routing plan ([`Layer0Schedule::from_counts`] on its
    /// counts).
    ///
    /// # Errors
    /// As [`Layer0Schedule::from_counts`].
    pub fn from_plan(plan: &RoutingPlan, d: usize, options: Layer0Options) -> Result<Self> {
        Self::from_counts(&Counts::from_plan(plan), d, options)
    }

    /// Rows of the receive buffer.
    pub fn recv_rows(&self) -> usize {
        self.seg_offsets.last().copied().unwrap_or(0)
    }

    /// Receive rows of local expert `l` (panics if `l ≥ L`, like a slice index).
    pub fn expert_rows(&self, l: usize) -> Range<usize> {
        self.seg_offsets[l * self.world]..self.seg_offsets[(l + 1) * self.world]
    }

    /// m-tiles of each local expert.
    pub fn m_tiles_per_expert(&self) -> Vec<usize> {
        self.m_tile_base.windows(2).map(|p| p[1] - p[0]).collect()
    }

    /// Indices (into [`Layer0Schedule::m_tiles`]) of the m-tiles that flag `f` feeds: those
    /// whose rows overlap its chunk (contiguous; empty for an empty chunk). Panics if `f` is
    /// not a flag of the schedule, like a slice index.
    pub fn flag_tiles(&self, f: u32) -> Range<usize> {
        let c = &self.flags[f as usize];
        if c.rows.is_empty() {
            return 0..0;
        }
        let base = self.m_tile_base[c.expert];
        let start = self.expert_rows(c.expert).start;
        let bm = self.options.tile.bm();
        base + (c.rows.start - start) / bm..base + (c.rows.end - 1 - start) / bm + 1
    }

    /// The engine's canonical id space for this schedule's tiles (raster band `band`).
    ///
    /// # Errors
    /// As [`CanonicalTiles::new`].
    pub fn canonical(&self, band: usize) -> Result<CanonicalTiles> {
        CanonicalTiles::new(
            &self.m_tiles_per_expert(),
            self.options.tile.n_tiles(),
            band,
        )
    }

    /// The engine's `order` input: this schedule's tiles as canonical ids, padded with `-1`
    /// to `len` (at least `Sm90Plan::max_tiles`).
    ///
    /// # Errors
    /// As [`CanonicalTiles::new`] and [`CanonicalTiles::engine_order`].
    pub fn engine_order(&self, band: usize, len: usize) -> Result<Vec<i32>> {
        self.canonical(band)?.engine_order(
            self.tiles.iter().map(|t| (t.expert, t.m_tile, t.n_tile)),
            len,
        )
    }

    /// Checks that every index in the schedule is in range (what an executor needs to run
    /// it safely; it does *not* check that the flags cover the rows — [`Self::check`] does).
    ///
    /// # Errors
    /// [`Error::OutOfRange`] naming the tile and the index.
    pub fn check_indices(&self) -> Result<()> {
        let shaped = self.seg_offsets.len() == self.local * self.world + 1
            && self.seg_offsets.windows(2).all(|p| p[0] <= p[1])
            && self.m_tile_base.len() == self.local + 1
            && self.m_tile_base.windows(2).all(|p| p[0] <= p[1])
            && self.m_tile_base.last() == Some(&self.m_tiles.len());
        if !shaped {
            return Err(Error::Invariant(format!(
                "segment offsets ({} entries) or m-tile bases ({} entries) do not fit {} experts x {} ranks and {} m-tiles",
                self.seg_offsets.len(),
                self.m_tile_base.len(),
                self.local,
                self.world,
                self.m_tiles.len()
            )));
        }
        let recv = self.recv_rows();
        let nt = self.options.tile.n_tiles();
        for (k, t) in self.tiles.iter().enumerate() {
            for (what, index, len) in [
                ("expert", t.expert, self.local),
                ("n-tile", t.n_tile, nt),
                ("last row", t.rows.end.saturating_sub(1), recv),
            ] {
                if index >= len {
                    return Err(Error::OutOfRange {
                        what: format!("{what} of tile {k}"),
                        index,
                        len,
                    });
                }
            }
            if t.rows.start > t.rows.end {
                return Err(Error::Invariant(format!(
                    "tile {k} has decreasing rows {:?}",
                    t.rows
                )));
            }
            for &f in &t.flags {
                if f as usize >= self.flags.len() {
                    return Err(Error::OutOfRange {
                        what: format!("flag of tile {k}"),
                        index: f as usize,
                        len: self.flags.len(),
                    });
                }
            }
        }
        for &f in &self.copy_order {
            if f as usize >= self.flags.len() {
                return Err(Error::OutOfRange {
                    what: "flag of the copy order".into(),
                    index: f as usize,
                    len: self.flags.len(),
                });
            }
        }
        for (f, c) in self.flags.iter().enumerate() {
            if c.rows.end > recv || c.rows.len() != c.src_rows.len() {
                return Err(Error::Invariant(format!(
                    "flag {f}: rows {:?} / source rows {:?} do not fit the {recv} receive rows",
                    c.rows, c.src_rows
                )));
            }
        }
        Ok(())
    }

    /// Checks every invariant of a layer-0 schedule:
    /// - chunks partition the receive rows, each inside its segment; the copy order is a
    ///   permutation of the flags in arrival order (source position, expert, row);
    /// - every receive row is covered by exactly one m-tile, and every `(expert, m, n)` tile
    ///   appears exactly once in the order with the m-tile's rows;
    /// - every tile's flags are exactly the non-empty chunks overlapping its rows (so they
    ///   cover them);
    /// - local-first: the tiles' readiness classes never decrease along the order (all-local
    ///   tiles first, then by last source, then fewest sources).
    ///
    /// # Errors
    /// [`Error::Invariant`] describing the first violation.
    pub fn check(&self) -> Result<()> {
        self.check_indices()?;
        let w = self.world;
        let bad = |m: String| Err(Error::Invariant(m));
        let recv = self.recv_rows();
        // Chunks: partition, inside their segments.
        let mut owner = vec![usize::MAX; recv];
        for (f, c) in self.flags.iter().enumerate() {
            let i = (c.source + w - self.rank) % w;
            let seg = self.seg_offsets[c.expert * w + i]..self.seg_offsets[c.expert * w + i + 1];
            if c.rows.start < seg.start || c.rows.end > seg.end {
                return bad(format!("flag {f} rows {:?} leave segment {seg:?}", c.rows));
            }
            for r in c.rows.clone() {
                if owner[r] != usize::MAX {
                    return bad(format!("row {r} is under flags {} and {f}", owner[r]));
                }
                owner[r] = f;
            }
        }
        if let Some(r) = owner.iter().position(|&o| o == usize::MAX) {
            return bad(format!("receive row {r} is under no flag"));
        }
        let mut seen = vec![false; self.flags.len()];
        let mut prev: Option<(usize, usize, usize)> = None;
        for &f in &self.copy_order {
            if std::mem::replace(&mut seen[f as usize], true) {
                return bad(format!("flag {f} twice in the copy order"));
            }
            let c = &self.flags[f as usize];
            let key = ((c.source + w - self.rank) % w, c.expert, c.rows.start);
            if prev.is_some_and(|p| p > key) {
                return bad(format!("copy order is not in arrival order at flag {f}"));
            }
            prev = Some(key);
        }
        if seen.iter().any(|s| !s) {
            return bad("a flag is missing from the copy order".into());
        }
        // m-tiles: one per BM rows of each expert.
        let mut covered = vec![0u32; recv];
        for t in &self.m_tiles {
            for r in t.rows.clone() {
                covered[r] += 1;
            }
            let er = self.expert_rows(t.expert);
            if t.rows.start < er.start || t.rows.end > er.end || t.rows.is_empty() {
                return bad(format!(
                    "m-tile ({}, {}) rows {:?} not inside expert rows {er:?}",
                    t.expert, t.m_tile, t.rows
                ));
            }
        }
        if let Some(r) = covered.iter().position(|&c| c != 1) {
            return bad(format!("receive row {r} is in {} m-tiles", covered[r]));
        }
        // Tiles: each (l, m, n) once, with the m-tile's rows and exactly its chunks.
        let nt = self.options.tile.n_tiles();
        let mut count = vec![0u32; self.m_tiles.len() * nt];
        let mut last_bucket = 0usize;
        for (k, t) in self.tiles.iter().enumerate() {
            let base = self.m_tile_base[t.expert];
            if t.m_tile >= self.m_tile_base[t.expert + 1] - base {
                return bad(format!("tile {k}: m-tile {} does not exist", t.m_tile));
            }
            let mt = &self.m_tiles[base + t.m_tile];
            count[(base + t.m_tile) * nt + t.n_tile] += 1;
            if t.rows != mt.rows {
                return bad(format!(
                    "tile {k}: rows {:?} != m-tile rows {:?}",
                    t.rows, mt.rows
                ));
            }
            let mut need: Vec<u32> = t.rows.clone().map(|r| owner[r] as u32).collect();
            need.dedup();
            let mut have = t.flags.clone();
            have.sort_unstable();
            if have != need {
                return bad(format!(
                    "tile {k} (expert {}, m {}, n {}): flags {:?}, its rows need {:?}",
                    t.expert, t.m_tile, t.n_tile, t.flags, need
                ));
            }
            // Readiness class from the rows themselves: last source position, then the
            // number of distinct sources.
            let pos = |r: usize| (self.flags[owner[r]].source + w - self.rank) % w;
            let mut srcs: Vec<usize> = t.rows.clone().map(pos).collect();
            srcs.dedup();
            let b = srcs.iter().max().copied().unwrap_or(0) * w + srcs.len().saturating_sub(1);
            if b < last_bucket {
                return bad(format!(
                    "tile {k}: readiness class {b} after class {last_bucket} (not local-first / arrival order)"
                ));
            }
            last_bucket = b;
        }
        if let Some(i) = count.iter().position(|&c| c != 1) {
            return bad(format!(
                "tile (m-tile {}, n {}) appears {} times",
                i / nt,
                i % nt,
                count[i]
            ));
        }
        Ok(())
    }
}

/// Upper bound on the flags of any layer-0 schedule with at most `max_recv_rows` receive
/// rows (for sizing device flag arrays without a host synchronisation).
pub fn max_flags(chunking: Chunking, max_recv_rows: usize, world: usize, local: usize) -> usize {
    match chunking {
        Chunking::Segment => world * local,
        Chunking::Rows(c) => max_recv_rows / c.max(1) + world * local,
    }
}

#[cfg(test)]
mod tests;
