//! Layer 1 (GEMM1 → top-k reduce → combine): GEMM1's output cut along columns.
//!
//! GEMM1 writes `o [recv_rows, H]` in the receive layout. A token's `k` slots may sit on
//! several rows of this rank (one per local expert it chose), so the top-k reduction
//! couples rows; columns stay independent. The output is therefore cut into *column
//! groups* of width `G` (a multiple of the tile width `BN`; by default `⌈N/8⌉` rounded up
//! to `BN`, [`default_group_width`]), and the GEMM runs column-group-major: every expert's
//! tiles of group `s` before any tile of group `s + 1`. Communication blocks wait on group
//! `s`'s completion counter, reduce and send its columns while the GEMM blocks compute
//! `s + 1`.
//!
//! # Tile order (counts-only, like layer 0)
//! 1. Expert rows and m-tiles from the counts (`rows_l = Σ_s counts[s][d·L + l]`,
//!    `mt[l] = ⌈rows_l / BM⌉`, prefix sums).
//! 2. Group `s` owns n-tiles `s·G/BN .. min((s + 1)·G/BN, nt)` and columns
//!    `s·G .. min((s + 1)·G, N)`.
//! 3. For `s = 0..S`: for each expert `l` in order, its m-tiles in order, expanded to the
//!    group's n-tiles by the [`NOrder`] (runs of one expert).
//! 4. Completion counter target of group `s`: `Σ_l mt[l] · |n-tiles of s|`. A GEMM tile of
//!    n-tile `n` belongs to group `n / (G/BN)`; after its epilogue's stores it fences and
//!    counts itself. A self-resetting counter suits epochs: `atomicInc(&cnt[s], target − 1)`
//!    returns `target − 1` to the last tile, which wraps the counter to 0 for the next call
//!    and stores the group's flag at the call's epoch (release).
//!
//! # Reduce and combine ([`ReducePlan`], [`CombineLayout`])
//! For each token `(owner o, t)` with at least one slot routed to rank `d`, rank `d` sums
//! `w[t, j] · o[row_j, cols]` over those slots (slot order; `w` may instead be applied as
//! GEMM1's per-row scale, leaving a plain sum) and writes the partial to row
//! [`CombineLayout::row`]`(t, d)` of the owner's combine buffer, columns of the group.
//! The owner's combine buffer has one row per `(token, rank)` pair where the token has a
//! slot on that rank, ordered by token, then rank ascending — at most `M_o · min(k, W)`
//! rows (a worst-case size known without a host synchronisation). The owner sums each
//! token's rows in that fixed order (reproducible results). On the device, rank `d` learns
//! `(o, t, combine row)` of each receive row from metadata that layer 0's dispatch carries
//! with the row (the owner computes the combine rows from its own ids).

use std::ops::Range;

use comet_core::RoutingPlan;

use crate::counts::Counts;
use crate::error::{Error, Result};
use crate::tile::{CanonicalTiles, NOrder, TileShape};

/// The default column-group width for `n` output columns and tile width `bn`: `⌈n / 8⌉`
/// rounded up to a multiple of `bn` (so at most 8 groups).
pub fn default_group_width(n: usize, bn: usize) -> usize {
    let bn = bn.max(1);
    n.div_ceil(8).div_ceil(bn).max(1) * bn
}

/// Parameters of a layer-1 schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Layer1Options {
    /// GEMM1's output tiles (`n` = hidden `H`).
    pub tile: TileShape,
    /// Column-group width `G` (`None`: [`default_group_width`]).
    pub group_width: Option<usize>,
    /// Order of the n-tiles inside a group.
    pub n_order: NOrder,
}

impl Layer1Options {
    /// Options with the default group width and n-tiles kept together.
    pub fn new(tile: TileShape) -> Self {
        Layer1Options {
            tile,
            group_width: None,
            n_order: NOrder::Together,
        }
    }

    /// The group width in use, checked.
    ///
    /// # Errors
    /// [`Error::ZeroSize`] for a width of 0; [`Error::NotMultiple`] if it is not a
    /// multiple of `bn`; the errors of [`NOrder::validate`].
    pub fn group_width(&self) -> Result<usize> {
        self.n_order.validate()?;
        let bn = self.tile.bn();
        let g = self
            .group_width
            .unwrap_or_else(|| default_group_width(self.tile.n(), bn));
        if g == 0 {
            return Err(Error::ZeroSize {
                name: "column group width",
            });
        }
        if g % bn != 0 {
            return Err(Error::NotMultiple {
                what: "column group width",
                value: g,
                multiple_of: bn,
            });
        }
        Ok(g)
    }
}

/// One column group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnGroup {
    /// Output columns.
    pub cols: Range<usize>,
    /// n-tiles.
    pub n_tiles: Range<usize>,
    /// Positions of its tiles in [`Layer1Schedule::tiles`].
    pub slots: Range<usize>,
    /// Completion-counter target: tiles that must finish before the group is reduced.
    pub target: usize,
}

/// One GEMM1 tile in processing order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupTile {
    /// Local expert.
    pub expert: usize,
    /// m-tile inside the expert.
    pub m_tile: usize,
    /// n-tile.
    pub n_tile: usize,
    /// Column group whose counter the tile increments.
    pub group: usize,
    /// Receive rows.
    pub rows: Range<usize>,
}

/// The layer-1 tile schedule of one rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer1Schedule {
    /// The rank `d`.
    pub rank: usize,
    /// Local experts `L`.
    pub local: usize,
    /// The options it was built with.
    pub options: Layer1Options,
    /// The group width `G` in use.
    pub group_width: usize,
    /// `L + 1` row offsets of the local experts.
    pub expert_offsets: Vec<usize>,
    /// Column groups in order.
    pub groups: Vec<ColumnGroup>,
    /// Tiles in processing order (column-group-major).
    pub tiles: Vec<GroupTile>,
}

impl Layer1Schedule {
    /// The schedule of rank `d` from the routing counts alone (module doc, steps 1–4).
    ///
    /// # Errors
    /// [`Error::RankOutOfRange`]; the errors of [`Layer1Options::group_width`].
    pub fn from_counts(counts: &Counts, d: usize, options: Layer1Options) -> Result<Self> {
        let _span = tracing::debug_span!("layer1_schedule", rank = d).entered();
        counts.check_rank(d)?;
        let g = options.group_width()?;
        let (w, l_n) = (counts.world(), counts.local());
        let tile = options.tile;
        let mut expert_offsets = Vec::with_capacity(l_n + 1);
        expert_offsets.push(0usize);
        for l in 0..l_n {
            let rows: usize = (0..w).map(|s| counts.segment_rows(d, l, s)).sum();
            expert_offsets.push(expert_offsets[l] + rows);
        }
        // (expert, m-tile, rows) in canonical order.
        let mut m_tiles = Vec::new();
        for l in 0..l_n {
            let (a, b) = (expert_offsets[l], expert_offsets[l + 1]);
            for m in 0..tile.m_tiles(b - a) {
                let r0 = a + m * tile.bm();
                m_tiles.push((l, m, r0..(r0 + tile.bm()).min(b)));
            }
        }
        let per = g / tile.bn();
        let nt = tile.n_tiles();
        let n_groups = nt.div_ceil(per);
        let mut groups = Vec::with_capacity(n_groups);
        let mut tiles = Vec::with_capacity(m_tiles.len() * nt);
        for s in 0..n_groups {
            let n_range = s * per..((s + 1) * per).min(nt);
            let first = tiles.len();
            for (k, n) in options
                .n_order
                .expand(&m_tiles, n_range.clone(), |x, y| x.0 == y.0)
            {
                let (l, m, rows) = &m_tiles[k];
                tiles.push(GroupTile {
                    expert: *l,
                    m_tile: *m,
                    n_tile: n,
                    group: s,
                    rows: rows.clone(),
                });
            }
            groups.push(ColumnGroup {
                cols: s * g..((s + 1) * g).min(tile.n()),
                n_tiles: n_range,
                slots: first..tiles.len(),
                target: tiles.len() - first,
            });
        }
        Ok(Layer1Schedule {
            rank: d,
            local: l_n,
            options,
            group_width: g,
            expert_offsets,
            groups,
            tiles,
        })
    }

    /// The schedule of rank `d` for a routing plan.
    ///
    /// # Errors
    /// As [`Layer1Schedule::from_counts`].
    pub fn from_plan(plan: &RoutingPlan, d: usize, options: Layer1Options) -> Result<Self> {
        Self::from_counts(&Counts::from_plan(plan), d, options)
    }

    /// Rows of GEMM1's output on this rank.
    pub fn recv_rows(&self) -> usize {
        self.expert_offsets.last().copied().unwrap_or(0)
    }

    /// m-tiles of each local expert.
    pub fn m_tiles_per_expert(&self) -> Vec<usize> {
        let bm = self.options.tile.bm();
        self.expert_offsets
            .windows(2)
            .map(|p| (p[1] - p[0]).div_ceil(bm))
            .collect()
    }

    /// The column group of n-tile `n` (for a schedule whose group width is a multiple of
    /// `bn`, as [`Layer1Schedule::check_indices`] verifies).
    pub fn group_of(&self, n_tile: usize) -> usize {
        n_tile / (self.group_width / self.options.tile.bn()).max(1)
    }

    /// The engine's canonical id space for this schedule's tiles.
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

    /// The engine's `order` input for this schedule (padded with `-1` to `len`).
    ///
    /// # Errors
    /// As [`CanonicalTiles::engine_order`].
    pub fn engine_order(&self, band: usize, len: usize) -> Result<Vec<i32>> {
        self.canonical(band)?.engine_order(
            self.tiles.iter().map(|t| (t.expert, t.m_tile, t.n_tile)),
            len,
        )
    }

    /// Checks that every index is in range (what an executor needs to run it safely).
    ///
    /// # Errors
    /// [`Error::OutOfRange`] naming the tile or group.
    pub fn check_indices(&self) -> Result<()> {
        let bn = self.options.tile.bn();
        if self.group_width == 0 || self.group_width % bn != 0 {
            return Err(Error::NotMultiple {
                what: "column group width of the schedule",
                value: self.group_width,
                multiple_of: bn,
            });
        }
        if self.expert_offsets.len() != self.local + 1
            || self.expert_offsets.windows(2).any(|p| p[0] > p[1])
        {
            return Err(Error::Invariant(format!(
                "expert offsets {:?} are not {} + 1 non-decreasing values",
                self.expert_offsets, self.local
            )));
        }
        let (nt, rows) = (self.options.tile.n_tiles(), self.recv_rows());
        for (k, t) in self.tiles.iter().enumerate() {
            for (what, index, len) in [
                ("expert", t.expert, self.local),
                ("n-tile", t.n_tile, nt),
                ("group", t.group, self.groups.len()),
                ("last row", t.rows.end.saturating_sub(1), rows),
            ] {
                if index >= len {
                    return Err(Error::OutOfRange {
                        what: format!("{what} of layer-1 tile {k}"),
                        index,
                        len,
                    });
                }
            }
        }
        for (s, g) in self.groups.iter().enumerate() {
            if g.slots.end > self.tiles.len() || g.slots.start > g.slots.end {
                return Err(Error::OutOfRange {
                    what: format!("last slot of group {s}"),
                    index: g.slots.end.saturating_sub(1),
                    len: self.tiles.len(),
                });
            }
            if g.cols.end > self.options.tile.n() || g.cols.start > g.cols.end {
                return Err(Error::OutOfRange {
                    what: format!("last column of group {s}"),
                    index: g.cols.end.saturating_sub(1),
                    len: self.options.tile.n(),
                });
            }
        }
        Ok(())
    }

    /// Checks every invariant: each `(expert, m, n)` tile exactly once with its m-tile's
    /// rows; a tile's group is the group of its n-tile; groups partition the columns in
    /// order; tiles are column-group-major (group indices never decrease, group `s`'s tiles
    /// are exactly its slots) and each counter target equals its group's tile count.
    ///
    /// # Errors
    /// [`Error::Invariant`] describing the first violation.
    pub fn check(&self) -> Result<()> {
        self.check_indices()?;
        let bad = |m: String| Err(Error::Invariant(m));
        let tile = self.options.tile;
        let mts = self.m_tiles_per_expert();
        let mut base = vec![0usize];
        for &m in &mts {
            base.push(base[base.len() - 1] + m);
        }
        let nt = tile.n_tiles();
        let mut count = vec![0u32; base[mts.len()] * nt];
        let mut prev_group = 0;
        for (k, t) in self.tiles.iter().enumerate() {
            if t.m_tile >= mts[t.expert] {
                return bad(format!(
                    "layer-1 tile {k}: m-tile {} does not exist",
                    t.m_tile
                ));
            }
            let r0 = self.expert_offsets[t.expert] + t.m_tile * tile.bm();
            let want = r0..(r0 + tile.bm()).min(self.expert_offsets[t.expert + 1]);
            if t.rows != want {
                return bad(format!(
                    "layer-1 tile {k}: rows {:?}, expected {want:?}",
                    t.rows
                ));
            }
            if t.group != self.group_of(t.n_tile) {
                return bad(format!(
                    "layer-1 tile {k}: n-tile {} counted in group {} (belongs to {})",
                    t.n_tile,
                    t.group,
                    self.group_of(t.n_tile)
                ));
            }
            if t.group < prev_group {
                return bad(format!(
                    "layer-1 tile {k}: group {} after group {prev_group} (not column-group-major)",
                    t.group
                ));
            }
            if !self.groups[t.group].slots.contains(&k) {
                return bad(format!("layer-1 tile {k} outside its group's slots"));
            }
            prev_group = t.group;
            count[(base[t.expert] + t.m_tile) * nt + t.n_tile] += 1;
        }
        if let Some(i) = count.iter().position(|&c| c != 1) {
            return bad(format!(
                "layer-1 tile (m-tile {}, n {}) appears {} times",
                i / nt,
                i % nt,
                count[i]
            ));
        }
        let mut col = 0;
        for (s, g) in self.groups.iter().enumerate() {
            let in_group = self.tiles.iter().filter(|t| t.group == s).count();
            if g.target != in_group || g.slots.len() != in_group {
                return bad(format!(
                    "group {s}: counter target {} / slots {:?}, but {in_group} tiles",
                    g.target, g.slots
                ));
            }
            let span = tile.cols(g.n_tiles.start).start..tile.cols(g.n_tiles.end.max(1) - 1).end;
            if g.cols.start != col || g.cols != span {
                return bad(format!(
                    "group {s}: columns {:?} (n-tiles {:?})",
                    g.cols, g.n_tiles
                ));
            }
            col = g.cols.end;
        }
        if col != tile.n() {
            return bad(format!(
                "groups cover columns 0..{col}, not 0..{}",
                tile.n()
            ));
        }
        Ok(())
    }
}

/// The combine buffer of a token owner: one row per `(token, rank)` pair where the token
/// has at least one slot on that rank, by token, then rank ascending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CombineLayout {
    /// The owner rank.
    pub owner: usize,
    /// `M_o + 1` offsets: token `t`'s rows are `offsets[t] .. offsets[t + 1]`.
    pub offsets: Vec<usize>,
    /// The sending rank of each combine row (ascending within a token).
    pub senders: Vec<usize>,
}

impl CombineLayout {
    /// The layout of `owner` in `plan`.
    ///
    /// # Errors
    /// [`Error::RankOutOfRange`].
    pub fn new(plan: &RoutingPlan, owner: usize) -> Result<Self> {
        if owner >= plan.world() {
            return Err(Error::RankOutOfRange {
                rank: owner,
                world: plan.world(),
            });
        }
        let l = plan.local_experts();
        let ids = plan.ids(owner);
        let mut offsets = Vec::with_capacity(ids.nrows() + 1);
        let mut senders = Vec::new();
        offsets.push(0);
        let mut ranks = Vec::with_capacity(plan.top_k());
        for row in ids.rows() {
            ranks.clear();
            ranks.extend(row.iter().map(|&e| e as usize / l));
            ranks.sort_unstable();
            ranks.dedup();
            senders.extend_from_slice(&ranks);
            offsets.push(senders.len());
        }
        Ok(CombineLayout {
            owner,
            offsets,
            senders,
        })
    }

    /// Rows of the combine buffer.
    pub fn rows(&self) -> usize {
        self.senders.len()
    }

    /// The row holding rank `d`'s partial of token `t`, if `t` has a slot on `d`.
    pub fn row(&self, t: usize, d: usize) -> Option<usize> {
        let r = *self.offsets.get(t)?..*self.offsets.get(t + 1)?;
        let k = self.senders[r.clone()].binary_search(&d).ok()?;
        Some(r.start + k)
    }

    /// Worst-case rows for `tokens` tokens: `tokens · min(k, W)`.
    pub fn max_rows(tokens: usize, top_k: usize, world: usize) -> usize {
        tokens.saturating_mul(top_k.min(world))
    }
}

/// A slot of a token held on this rank: top-k position and receive row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotRow {
    /// Top-k position `j` (weight `w[t, j]` of the owner's routing).
    pub slot: usize,
    /// Row of GEMM1's output on this rank.
    pub row: usize,
}

/// The reduce-and-send work for one token, the same for every column group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReduceItem {
    /// The token's rank.
    pub owner: usize,
    /// The token's row on its owner.
    pub token: usize,
    /// Destination row in the owner's [`CombineLayout`].
    pub combine_row: usize,
    /// The token's slots on this rank, in slot order.
    pub slots: Vec<SlotRow>,
}

/// All reduce items of one rank: owners in rotated order starting at the rank itself
/// (`d, d + 1, …`), tokens ascending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReducePlan {
    /// The rank `d` doing the work.
    pub rank: usize,
    /// The items.
    pub items: Vec<ReduceItem>,
}

impl ReducePlan {
    /// The reduce plan of rank `d`, given every owner's combine layout (`layouts[o]`).
    ///
    /// # Errors
    /// [`Error::RankOutOfRange`]; [`Error::Mismatch`] unless one layout per rank.
    pub fn new(plan: &RoutingPlan, d: usize, layouts: &[CombineLayout]) -> Result<Self> {
        let w = plan.world();
        if d >= w {
            return Err(Error::RankOutOfRange { rank: d, world: w });
        }
        if layouts.len() != w {
            return Err(Error::Mismatch {
                what: "combine layouts (one per rank)",
                expected: w,
                got: layouts.len(),
            });
        }
        let mut items = Vec::new();
        for i in 0..w {
            let o = (d + i) % w;
            for t in 0..plan.tokens(o) {
                let slots: Vec<SlotRow> = (0..plan.top_k())
                    .filter_map(|j| {
                        let (dest, row) = plan.dest(o, t, j);
                        (dest == d).then_some(SlotRow { slot: j, row })
                    })
                    .collect();
                if slots.is_empty() {
                    continue;
                }
                let combine_row = layouts[o].row(t, d).ok_or_else(|| {
                    Error::Invariant(format!(
                        "combine layout of rank {o} has no row for token {t} from rank {d}"
                    ))
                })?;
                items.push(ReduceItem {
                    owner: o,
                    token: t,
                    combine_row,
                    slots,
                });
            }
        }
        Ok(ReducePlan { rank: d, items })
    }

    /// All ranks' combine layouts and reduce plans for `plan`.
    ///
    /// # Errors
    /// As [`CombineLayout::new`] and [`ReducePlan::new`].
    pub fn all(plan: &RoutingPlan) -> Result<(Vec<CombineLayout>, Vec<ReducePlan>)> {
        let layouts = (0..plan.world())
            .map(|o| CombineLayout::new(plan, o))
            .collect::<Result<Vec<_>>>()?;
        let plans = (0..plan.world())
            .map(|d| ReducePlan::new(plan, d, &layouts))
            .collect::<Result<Vec<_>>>()?;
        Ok((layouts, plans))
    }

    /// Items sent to remote owners (the rest are local writes).
    pub fn remote_items(&self) -> usize {
        self.items.iter().filter(|i| i.owner != self.rank).count()
    }
}

#[cfg(test)]
mod tests;
