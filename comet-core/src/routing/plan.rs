//! The routing plan: counts, receive/send layouts, scatter index and combine mapping.

use std::ops::Range;

use ndarray::{Array2, ArrayView2};

use crate::config::MAX_TENSOR_ELEMS;
use crate::error::{Error, Result};

/// Where every routing slot of every rank goes, computed from the top-k ids of all `W` ranks.
///
/// Notation: `W` ranks, `E` experts, `L = E / W` local experts per rank, `k` slots per token,
/// `M_s` tokens on source rank `s`. Expert `e` lives on rank `e / L` as local expert `e % L`.
/// A *slot* is a pair `(t, j)`: token `t` of its rank and top-k position `j`.
///
/// Definitions (the GPU routing-metadata kernels must reproduce these exactly):
/// - `count(s, e)`: number of slots `(t, j)` on rank `s` with `ids_s[t, j] = e`.
/// - **Receive layout** of rank `d` (the layer-0 shared tensor, `[recv_rows(d), H]`): the
///   segments `(l, s)` for `l = 0..L` (outer) and `s = (d + i) mod W`, `i = 0..W` (inner,
///   *rotated* so the receiving rank's own rows come first). Segment `(l, s)` has
///   `count(s, d·L + l)` rows: the slots of rank `s` routed to expert `d·L + l`, in ascending
///   token order (a token routes to an expert at most once, so there is no tie). Hence each
///   local expert's rows are contiguous ([`RoutingPlan::expert_rows`]).
/// - **Send layout** of rank `s` (for the NCCL baselines, `[M_s·k, H]`): rows ordered by
///   destination rank, then local expert, then token — which is simply by expert id `e`,
///   then token. The block sent to `d` ([`RoutingPlan::send_rows_to`]) holds, for
///   `l = 0..L`, exactly segment `(l, s)` of `d`'s receive layout, in the same order.
/// - **Scatter index**: slot `(t, j)` of `s` → `(e / L, row)` with
///   `row = start of segment (e % L, s) on e / L + #{t' < t : e ∈ ids_s[t']}`,
///   `e = ids_s[t, j]` ([`RoutingPlan::dest`]).
/// - **Combine mapping**: receive row `row` of `d` → the slot `(s, t, j)` it came from
///   ([`RoutingPlan::source`]), the exact inverse of the scatter index. Rank `s` sums
///   `w[t, j] · out[dest(s, t, j)]` over `j = 0..k` in slot order.
///
/// Accessors index like slices: they panic on a rank, expert, token, slot or row index that
/// is out of range (a caller bug, like `v[i]`); everything derived from user input is checked
/// in [`RoutingPlan::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingPlan {
    world: usize,
    experts: usize,
    local: usize,
    top_k: usize,
    tokens: Vec<usize>,
    /// `[W, E]`.
    counts: Array2<usize>,
    /// Per receiving rank `d`: `L·W + 1` offsets of segments `(l, i)` at index `l·W + i`.
    recv_offsets: Vec<Vec<usize>>,
    /// Per source rank `s`: `E + 1` offsets of its send layout, by expert id.
    send_offsets: Vec<Vec<usize>>,
    /// Per source rank: ids flattened `t·k + j`.
    ids: Vec<Array2<u32>>,
    /// Per source rank, per slot `t·k + j`: index among the slots of `s` routed to the same
    /// expert (= token order within its segment).
    slot_rank: Vec<Vec<usize>>,
    /// Per source rank, per slot: receive row on the destination rank.
    dest_rows: Vec<Vec<usize>>,
    /// Per receiving rank, per receive row: `(s, t, j)`.
    sources: Vec<Vec<(usize, usize, usize)>>,
}

impl RoutingPlan {
    /// Builds the plan from every rank's top-k ids (`ids[s]` is `[M_s, k]`).
    ///
    /// # Errors
    /// - [`Error::ZeroSize`] if `world` or `experts` is 0;
    /// - [`Error::LengthMismatch`] if `ids.len() != world`;
    /// - [`Error::ExpertsNotDivisible`] if `experts % world != 0`;
    /// - [`Error::TopKZero`], [`Error::TopKExceedsExperts`], or [`Error::ShapeMismatch`] if
    ///   the ranks' `k` (columns) differ;
    /// - [`Error::ExpertIdOutOfRange`] / [`Error::DuplicateExpert`] naming rank, token and
    ///   slot;
    /// - [`Error::ExceedsIndexType`] if the total slots `Σ M_s·k` exceed the kernels' `u32`
    ///   row index.
    pub fn new(ids: &[ArrayView2<u32>], experts: usize, world: usize) -> Result<Self> {
        if world == 0 {
            return Err(Error::ZeroSize { name: "world" });
        }
        if experts == 0 {
            return Err(Error::ZeroSize { name: "experts" });
        }
        if ids.len() != world {
            return Err(Error::LengthMismatch {
                what: "routing ids (one [tokens, top_k] array per rank)",
                expected: world,
                got: ids.len(),
            });
        }
        if experts % world != 0 {
            return Err(Error::ExpertsNotDivisible { experts, ep: world });
        }
        let local = experts / world;
        let top_k = ids[0].ncols();
        if top_k == 0 {
            return Err(Error::TopKZero);
        }
        if top_k > experts {
            return Err(Error::TopKExceedsExperts { top_k, experts });
        }
        let mut total_slots: u128 = 0;
        for a in ids {
            if a.ncols() != top_k {
                return Err(Error::ShapeMismatch {
                    what: "routing ids of a rank (every rank must use the same top_k)",
                    expected: vec![a.nrows(), top_k],
                    got: vec![a.nrows(), a.ncols()],
                });
            }
            total_slots += (a.nrows() as u128) * (top_k as u128);
        }
        if total_slots > MAX_TENSOR_ELEMS as u128 {
            return Err(Error::ExceedsIndexType {
                what: "scatter index [all ranks' tokens, top_k]",
                elements: total_slots,
                limit: MAX_TENSOR_ELEMS as u64,
            });
        }

        // Validate ids and count.
        let mut counts = Array2::<usize>::zeros((world, experts));
        let mut slot_rank = Vec::with_capacity(world);
        for (s, a) in ids.iter().enumerate() {
            check_ids(*a, experts, s)?;
            let mut ranks = Vec::with_capacity(a.len());
            for &id in a.iter() {
                let e = id as usize;
                ranks.push(counts[[s, e]]);
                counts[[s, e]] += 1;
            }
            slot_rank.push(ranks);
        }

        // Receive layout offsets.
        let mut recv_offsets = Vec::with_capacity(world);
        for d in 0..world {
            let mut off = Vec::with_capacity(local * world + 1);
            let mut acc = 0usize;
            off.push(acc);
            for l in 0..local {
                for i in 0..world {
                    let s = (d + i) % world;
                    acc += counts[[s, d * local + l]];
                    off.push(acc);
                }
            }
            recv_offsets.push(off);
        }

        // Send layout offsets (by expert id = (dest, local expert)).
        let send_offsets: Vec<Vec<usize>> = (0..world)
            .map(|s| {
                let mut off = Vec::with_capacity(experts + 1);
                let mut acc = 0usize;
                off.push(acc);
                for e in 0..experts {
                    acc += counts[[s, e]];
                    off.push(acc);
                }
                off
            })
            .collect();

        // Scatter index and its inverse.
        let mut sources: Vec<Vec<(usize, usize, usize)>> = recv_offsets
            .iter()
            .map(|o| vec![(0, 0, 0); o[local * world]])
            .collect();
        let mut dest_rows = Vec::with_capacity(world);
        for (s, a) in ids.iter().enumerate() {
            let mut rows = Vec::with_capacity(a.len());
            for (t, row) in a.rows().into_iter().enumerate() {
                for (j, &id) in row.iter().enumerate() {
                    let e = id as usize;
                    let (d, l) = (e / local, e % local);
                    let i = (s + world - d) % world;
                    let r = recv_offsets[d][l * world + i] + slot_rank[s][t * top_k + j];
                    sources[d][r] = (s, t, j);
                    rows.push(r);
                }
            }
            dest_rows.push(rows);
        }

        Ok(RoutingPlan {
            world,
            experts,
            local,
            top_k,
            tokens: ids.iter().map(|a| a.nrows()).collect(),
            counts,
            recv_offsets,
            send_offsets,
            ids: ids.iter().map(|a| a.to_owned()).collect(),
            slot_rank,
            dest_rows,
            sources,
        })
    }

    /// Number of ranks `W`.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Number of experts `E`.
    pub fn experts(&self) -> usize {
        self.experts
    }

    /// Experts per rank `L = E / W`.
    pub fn local_experts(&self) -> usize {
        self.local
    }

    /// Slots per token `k`.
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// Tokens `M_s` on source rank `s`.
    pub fn tokens(&self, s: usize) -> usize {
        self.tokens[s]
    }

    /// The top-k ids of rank `s`, `[M_s, k]`, as given to [`RoutingPlan::new`].
    pub fn ids(&self, s: usize) -> ArrayView2<'_, u32> {
        self.ids[s].view()
    }

    /// `count(s, e)`: slots of rank `s` routed to expert `e`.
    pub fn count(&self, s: usize, e: usize) -> usize {
        self.counts[[s, e]]
    }

    /// All counts, `[W, E]`.
    pub fn counts(&self) -> ArrayView2<'_, usize> {
        self.counts.view()
    }

    /// Slots routed to expert `e` from all ranks.
    pub fn expert_count(&self, e: usize) -> usize {
        self.counts.column(e).sum()
    }

    /// Rows of rank `d`'s receive layout: `Σ_s Σ_l count(s, d·L + l)`.
    pub fn recv_rows(&self, d: usize) -> usize {
        self.recv_offsets[d][self.local * self.world]
    }

    /// Rows of local expert `l` on rank `d` (contiguous in the receive layout).
    pub fn expert_rows(&self, d: usize, l: usize) -> Range<usize> {
        let o = &self.recv_offsets[d];
        o[l * self.world]..o[(l + 1) * self.world]
    }

    /// Rows of segment `(l, s)` on rank `d`: local expert `l`'s rows that come from rank `s`.
    pub fn segment(&self, d: usize, l: usize, s: usize) -> Range<usize> {
        assert!(s < self.world, "source rank {s} >= world {}", self.world);
        let i = (s + self.world - d) % self.world;
        let o = &self.recv_offsets[d];
        o[l * self.world + i]..o[l * self.world + i + 1]
    }

    /// The `L·W + 1` segment offsets of rank `d`'s receive layout: segment `(l, i)` (local
    /// expert `l`, source rank `(d + i) mod W`) is `offsets[l·W + i]..offsets[l·W + i + 1]`.
    pub fn segment_offsets(&self, d: usize) -> &[usize] {
        &self.recv_offsets[d]
    }

    /// Rows rank `d` receives from rank `s` (all its local experts): `send_rows_to(s, d).len()`.
    pub fn recv_rows_from(&self, d: usize, s: usize) -> usize {
        (0..self.local)
            .map(|l| self.counts[[s, d * self.local + l]])
            .sum()
    }

    /// Scatter index: slot `(t, j)` of rank `s` → `(destination rank, receive row)`.
    pub fn dest(&self, s: usize, t: usize, j: usize) -> (usize, usize) {
        let idx = self.slot_index(t, j);
        let e = self.ids[s][[t, j]] as usize;
        (e / self.local, self.dest_rows[s][idx])
    }

    /// Receive rows of all slots of rank `s`, flattened `t·k + j` (the destination rank of
    /// slot `(t, j)` is `ids(s)[t, j] / L`).
    pub fn scatter_rows(&self, s: usize) -> &[usize] {
        &self.dest_rows[s]
    }

    /// Combine mapping: receive row `row` of rank `d` → the slot `(s, t, j)` it holds.
    pub fn source(&self, d: usize, row: usize) -> (usize, usize, usize) {
        self.sources[d][row]
    }

    /// Sources of every receive row of rank `d`, in receive-layout order.
    pub fn sources(&self, d: usize) -> &[(usize, usize, usize)] {
        &self.sources[d]
    }

    /// Row of slot `(t, j)` in rank `s`'s send layout (ordered by destination rank, local
    /// expert, token).
    pub fn send_row(&self, s: usize, t: usize, j: usize) -> usize {
        let idx = self.slot_index(t, j);
        let e = self.ids[s][[t, j]] as usize;
        self.send_offsets[s][e] + self.slot_rank[s][idx]
    }

    /// Rows of rank `s`'s send layout that go to rank `d`.
    pub fn send_rows_to(&self, s: usize, d: usize) -> Range<usize> {
        let o = &self.send_offsets[s];
        o[d * self.local]..o[(d + 1) * self.local]
    }

    /// Worst-case receive rows on any rank, for sizing device buffers without a host
    /// synchronisation: `Σ_s M_s · min(k, L)` (a token sends at most one row per expert and
    /// so at most `min(k, L)` rows to one rank). Saturates at `usize::MAX`.
    pub fn max_recv_rows(tokens_per_rank: &[usize], top_k: usize, local_experts: usize) -> usize {
        let per = top_k.min(local_experts);
        tokens_per_rank
            .iter()
            .fold(0usize, |acc, &m| acc.saturating_add(m.saturating_mul(per)))
    }

    fn slot_index(&self, t: usize, j: usize) -> usize {
        // Callers index `ids[s][[t, j]]` too, which panics for j >= k or t >= M_s.
        t * self.top_k + j
    }
}

/// Checks one rank's top-k ids: every id below `experts`, no id twice in a token.
///
/// # Errors
/// [`Error::ExpertIdOutOfRange`] or [`Error::DuplicateExpert`], naming `rank`, token and slot.
pub(crate) fn check_ids(ids: ArrayView2<u32>, experts: usize, rank: usize) -> Result<()> {
    for (t, row) in ids.rows().into_iter().enumerate() {
        for (j, &id) in row.iter().enumerate() {
            if id as usize >= experts {
                return Err(Error::ExpertIdOutOfRange {
                    rank,
                    token: t,
                    slot: j,
                    id,
                    experts,
                });
            }
            if let Some(first) = row.iter().take(j).position(|&o| o == id) {
                return Err(Error::DuplicateExpert {
                    rank,
                    token: t,
                    id,
                    first,
                    second: j,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
