//! Host-side planning of a layer call: buffer capacities ([`Layout`]), the header every rank
//! all-gathers before a call (per-chunk expert counts, its token count and a status word),
//! and what the NCCL baselines derive from the gathered headers ([`CallPlan`]: rows sent to
//! and received from each rank, per chunk).
//!
//! Data layouts (ARCHITECTURE.md's definitions):
//! - a chunk's **send buffer** on rank `s` holds its slots in the send layout (by destination
//!   rank, then local expert, then token): the block for rank `d` is
//!   `send_offsets[d] .. + send_rows[d]`;
//! - the NCCL all-to-all-v lands the blocks in a **staging buffer** by source rank
//!   (`recv_offsets[s] .. + recv_rows[s]`, rank order), each block in the sender's order (by
//!   local expert, then token);
//! - a permute by the received row indices then gives the **receive layout** (by local
//!   expert, then source rank rotated to start at this rank, then token), where each expert's
//!   rows are contiguous for the grouped GEMM. The way back runs the same steps in reverse.

use std::ops::Range;

use comet_kernels::layer_ops::{HEADER_EXTRA, chunk_bound};

use crate::error::{Error, Result};

/// Why a rank rejected its input of a call (the status word of its header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Reject {
    /// More tokens than `max_tokens`.
    TooManyTokens = 1,
    /// More chunks than tokens.
    TooManyChunks = 2,
    /// No tokens.
    ZeroTokens = 3,
    /// A tensor of the wrong dtype or shape.
    BadInput = 4,
    /// A kernel launch failed on the rank (its error names the cause).
    Device = 5,
}

impl Reject {
    /// The status code's meaning (for another rank's status word).
    pub fn describe(code: i32, tokens: usize) -> String {
        match code {
            1 => format!("{tokens} tokens exceed the layer's max_tokens"),
            2 => format!("more chunks than its {tokens} tokens"),
            3 => "no tokens".to_string(),
            4 => "a tensor of the wrong dtype or shape".to_string(),
            5 => "its routing kernels failed (see that rank's error)".to_string(),
            c => format!("unknown status {c}"),
        }
    }

    /// The status code of an error (what this rank tells the others).
    pub fn of(e: &Error) -> Reject {
        match e {
            Error::TooManyTokens { .. } => Reject::TooManyTokens,
            Error::TooManyChunks { .. } => Reject::TooManyChunks,
            Error::ZeroTokens { .. } => Reject::ZeroTokens,
            _ => Reject::BadInput,
        }
    }
}

/// The sizes every buffer of a layer is allocated for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Ranks (`W`).
    pub world: usize,
    /// This rank.
    pub rank: usize,
    /// Experts (`E`).
    pub experts: usize,
    /// Experts per token (`k`).
    pub top_k: usize,
    /// Token chunks per call.
    pub chunks: usize,
    /// Most tokens per rank and call.
    pub max_tokens: usize,
}

impl Layout {
    /// Checks `E % W == 0`, `rank < W`, `1 ≤ k ≤ E`, `1 ≤ chunks ≤ max_tokens`.
    pub fn new(
        world: usize,
        rank: usize,
        experts: usize,
        top_k: usize,
        chunks: usize,
        max_tokens: usize,
    ) -> Result<Self> {
        if world == 0 || experts % world != 0 {
            return Err(comet_core::Error::ExpertsNotDivisible { experts, ep: world }.into());
        }
        if rank >= world {
            return Err(comet_core::Error::RankOutOfRange { rank, world }.into());
        }
        if top_k == 0 || top_k > experts {
            return Err(comet_core::Error::TopKExceedsExperts { top_k, experts }.into());
        }
        if chunks == 0 {
            return Err(Error::ZeroChunks);
        }
        if max_tokens == 0 {
            return Err(Error::ZeroTokens { what: "max_tokens" });
        }
        if chunks > max_tokens {
            return Err(Error::TooManyChunks {
                chunks,
                tokens: max_tokens,
            });
        }
        Ok(Layout {
            world,
            rank,
            experts,
            top_k,
            chunks,
            max_tokens,
        })
    }

    /// Local experts per rank (`L = E / W`).
    pub fn local_experts(&self) -> usize {
        self.experts / self.world
    }

    /// Most tokens in one chunk of any call: `⌈max_tokens / chunks⌉`.
    pub fn chunk_capacity(&self) -> usize {
        self.max_tokens.div_ceil(self.chunks)
    }

    /// Rows of a chunk's send buffer: `chunk_capacity · k`.
    pub fn send_capacity(&self) -> usize {
        self.chunk_capacity() * self.top_k
    }

    /// Rows of a chunk's receive buffers, the worst case `W · chunk_capacity · min(k, L)`
    /// (a token sends at most `min(k, L)` slots to one rank: its `k` experts are distinct).
    pub fn recv_capacity(&self) -> usize {
        self.world * self.chunk_capacity() * self.top_k.min(self.local_experts())
    }

    /// Entries of one rank's header: `chunks · E` counts, then its tokens and status.
    pub fn header_len(&self) -> usize {
        self.chunks * self.experts + HEADER_EXTRA
    }

    /// Tokens of chunk `c` of a call with `tokens` tokens on a rank.
    pub fn chunk_tokens(&self, tokens: usize, c: usize) -> Range<usize> {
        chunk_bound(tokens, self.chunks, c)..chunk_bound(tokens, self.chunks, c + 1)
    }

    /// The status this rank reports for a call with `tokens` tokens (0 = accepted), checking
    /// what only this rank can see.
    pub fn check_tokens(&self, tokens: usize) -> Result<()> {
        if tokens == 0 {
            return Err(Error::ZeroTokens {
                what: "tokens of x",
            });
        }
        if tokens > self.max_tokens {
            return Err(Error::TooManyTokens {
                tokens,
                max_tokens: self.max_tokens,
            });
        }
        if self.chunks > tokens {
            return Err(Error::TooManyChunks {
                chunks: self.chunks,
                tokens,
            });
        }
        Ok(())
    }
}

/// The host mirror of the device header (`comet_kernels::layer_ops::chunk_counts`): per
/// chunk the slots routed to each expert, then `tokens` and `status`. `ids` is `[tokens, k]`
/// row-major; ids outside `0..E` are not counted.
pub fn header(layout: &Layout, ids: &[i32], tokens: usize, status: i32) -> Vec<i32> {
    let (e, k) = (layout.experts, layout.top_k);
    let mut out = vec![0i32; layout.header_len()];
    for c in 0..layout.chunks {
        let r = layout.chunk_tokens(tokens, c);
        for &id in ids.get(r.start * k..r.end * k).unwrap_or(&[]) {
            if id >= 0 && (id as usize) < e {
                out[c * e + id as usize] += 1;
            }
        }
    }
    out[layout.chunks * e] = tokens as i32;
    out[layout.chunks * e + 1] = status;
    out
}

/// What this rank exchanges for one chunk of a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkExchange {
    /// This rank's tokens of the chunk.
    pub tokens: Range<usize>,
    /// Rows this rank sends to each rank (its send buffer's blocks).
    pub send_rows: Vec<usize>,
    /// Start of each destination's block in the send buffer.
    pub send_offsets: Vec<usize>,
    /// Rows this rank receives from each rank.
    pub recv_rows: Vec<usize>,
    /// Start of each source's block in the staging buffer.
    pub recv_offsets: Vec<usize>,
    /// Rows received in all (the filled part of the receive buffers).
    pub recv_total: usize,
}

impl ChunkExchange {
    /// Slots of this rank's chunk (rows of its send buffer): tokens · k.
    pub fn send_total(&self) -> usize {
        self.send_offsets.last().copied().unwrap_or(0) + self.send_rows.last().copied().unwrap_or(0)
    }

    /// Rows sent to other ranks in the dispatch (equal to the rows that come back in the
    /// combine).
    pub fn remote_send_rows(&self, rank: usize) -> usize {
        self.send_rows
            .iter()
            .enumerate()
            .filter(|(d, _)| *d != rank)
            .map(|(_, n)| n)
            .sum()
    }

    /// Rows received from other ranks in the dispatch (and sent back to them in the combine).
    pub fn remote_recv_rows(&self, rank: usize) -> usize {
        self.recv_rows
            .iter()
            .enumerate()
            .filter(|(s, _)| *s != rank)
            .map(|(_, n)| n)
            .sum()
    }
}

/// The exchange of one call, derived from all ranks' headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallPlan {
    /// Tokens of each rank in this call.
    pub tokens: Vec<usize>,
    /// Per chunk.
    pub chunks: Vec<ChunkExchange>,
}

impl CallPlan {
    /// Rows this rank sends to other ranks in one forward (dispatch and combine together).
    pub fn remote_rows(&self, rank: usize) -> usize {
        self.chunks
            .iter()
            .map(|c| c.remote_send_rows(rank) + c.remote_recv_rows(rank))
            .sum()
    }
}

/// Derives the call's exchange from the all-gathered headers (`gathered`: rank `s`'s header
/// at `s · header_len`). A rank's non-zero status becomes [`Error::PeerRejected`] (the
/// lowest such rank); counts that cannot come from valid routing are [`Error::Counts`].
pub fn plan_call(layout: &Layout, gathered: &[i32]) -> Result<CallPlan> {
    let (w, e, k, l) = (
        layout.world,
        layout.experts,
        layout.top_k,
        layout.local_experts(),
    );
    let hl = layout.header_len();
    if gathered.len() != w * hl {
        return Err(Error::Counts {
            what: "gathered header entries".into(),
            value: gathered.len(),
            limit: w * hl,
        });
    }
    let head = |s: usize| &gathered[s * hl..(s + 1) * hl];
    let mut tokens = Vec::with_capacity(w);
    for s in 0..w {
        let h = head(s);
        let (m, status) = (h[layout.chunks * e], h[layout.chunks * e + 1]);
        let m = usize::try_from(m).map_err(|_| Error::Counts {
            what: format!("tokens of rank {s}"),
            value: 0,
            limit: layout.max_tokens,
        })?;
        if status != 0 {
            return Err(Error::PeerRejected {
                rank: s,
                reason: Reject::describe(status, m),
            });
        }
        if m > layout.max_tokens || m < layout.chunks {
            return Err(Error::Counts {
                what: format!("tokens of rank {s} (at least chunks = {})", layout.chunks),
                value: m,
                limit: layout.max_tokens,
            });
        }
        tokens.push(m);
    }
    let me = layout.rank;
    let mut chunks = Vec::with_capacity(layout.chunks);
    for c in 0..layout.chunks {
        let count = |s: usize, ex: usize| head(s)[c * e + ex].max(0) as usize;
        for (s, &m) in tokens.iter().enumerate() {
            let slots: usize = (0..e).map(|ex| count(s, ex)).sum();
            let want = layout.chunk_tokens(m, c).len() * k;
            if slots != want {
                return Err(Error::Counts {
                    what: format!("slots counted in chunk {c} of rank {s} (expected tokens·k)"),
                    value: slots,
                    limit: want,
                });
            }
        }
        let send_rows: Vec<usize> = (0..w)
            .map(|d| (0..l).map(|q| count(me, d * l + q)).sum())
            .collect();
        let recv_rows: Vec<usize> = (0..w)
            .map(|s| (0..l).map(|q| count(s, me * l + q)).sum())
            .collect();
        let prefix = |v: &[usize]| -> Vec<usize> {
            v.iter()
                .scan(0usize, |acc, &n| {
                    let at = *acc;
                    *acc += n;
                    Some(at)
                })
                .collect()
        };
        let recv_total: usize = recv_rows.iter().sum();
        if recv_total > layout.recv_capacity() {
            return Err(Error::Counts {
                what: format!("rows received in chunk {c}"),
                value: recv_total,
                limit: layout.recv_capacity(),
            });
        }
        chunks.push(ChunkExchange {
            tokens: layout.chunk_tokens(tokens[me], c),
            send_offsets: prefix(&send_rows),
            recv_offsets: prefix(&recv_rows),
            send_rows,
            recv_rows,
            recv_total,
        });
    }
    Ok(CallPlan { tokens, chunks })
}

#[cfg(test)]
mod tests;
