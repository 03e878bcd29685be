//! [`Counts`]: the routing counts matrix, all a device-side schedule may depend on.

use comet_core::RoutingPlan;

use crate::error::{Error, Result};

/// `counts[s][e]`: slots of source rank `s` routed to expert `e` (`[W, E]`, row-major), the
/// matrix every rank holds after the counts exchange of the forward pass. The layer-0 and
/// layer-1 tile schedules are pure functions of it (plus the rank and tile shape), so the
/// GPU can compute them on the device without a host synchronisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counts {
    world: usize,
    experts: usize,
    data: Vec<usize>,
}

impl Counts {
    /// A counts matrix of `world` ranks and `experts` experts, `data[s·E + e]`.
    ///
    /// # Errors
    /// [`Error::ZeroSize`] for `world` or `experts` 0; [`Error::NotMultiple`] if `experts`
    /// is not a multiple of `world`; [`Error::Mismatch`] if `data.len() != world·experts`;
    /// [`Error::TooLarge`] if a rank receives more rows than the engine's `i32` row index.
    pub fn new(world: usize, experts: usize, data: Vec<usize>) -> Result<Self> {
        if world == 0 {
            return Err(Error::ZeroSize { name: "world" });
        }
        if experts == 0 {
            return Err(Error::ZeroSize { name: "experts" });
        }
        if experts % world != 0 {
            return Err(Error::NotMultiple {
                what: "experts",
                value: experts,
                multiple_of: world,
            });
        }
        if data.len() != world * experts {
            return Err(Error::Mismatch {
                what: "counts entries (world * experts)",
                expected: world * experts,
                got: data.len(),
            });
        }
        let c = Counts {
            world,
            experts,
            data,
        };
        for d in 0..world {
            let rows: u128 = (0..world)
                .flat_map(|s| (0..c.local()).map(move |l| (s, l)))
                .map(|(s, l)| c.get(s, d * c.local() + l) as u128)
                .sum();
            if rows > i32::MAX as u128 {
                return Err(Error::TooLarge {
                    what: "receive rows of a rank (engine row offsets are i32)",
                    value: rows,
                    limit: i32::MAX as u128,
                });
            }
        }
        Ok(c)
    }

    /// The counts of a routing plan.
    pub fn from_plan(plan: &RoutingPlan) -> Self {
        Counts {
            world: plan.world(),
            experts: plan.experts(),
            data: plan.counts().iter().copied().collect(),
        }
    }

    /// Ranks `W`.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Experts `E`.
    pub fn experts(&self) -> usize {
        self.experts
    }

    /// Local experts per rank `L = E / W`.
    pub fn local(&self) -> usize {
        self.experts / self.world
    }

    /// `counts[s][e]` (panics on an index out of range, like a slice).
    pub fn get(&self, s: usize, e: usize) -> usize {
        self.data[s * self.experts + e]
    }

    /// Rows of segment `(l, s)` on rank `d`: `counts[s][d·L + l]`.
    pub fn segment_rows(&self, d: usize, l: usize, s: usize) -> usize {
        self.get(s, d * self.local() + l)
    }

    /// Checks a rank index.
    ///
    /// # Errors
    /// [`Error::RankOutOfRange`].
    pub fn check_rank(&self, rank: usize) -> Result<()> {
        if rank >= self.world {
            return Err(Error::RankOutOfRange {
                rank,
                world: self.world,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_validate_and_index() {
        let c = Counts::new(2, 4, (0..8).collect()).unwrap();
        assert_eq!(c.local(), 2);
        assert_eq!(c.get(1, 2), 6);
        assert_eq!(c.segment_rows(1, 0, 0), 2);
        assert!(matches!(
            Counts::new(0, 4, vec![]),
            Err(Error::ZeroSize { name: "world" })
        ));
        assert!(matches!(
            Counts::new(3, 4, vec![0; 12]),
            Err(Error::NotMultiple {
                value: 4,
                multiple_of: 3,
                ..
            })
        ));
        assert!(matches!(
            Counts::new(2, 4, vec![0; 7]),
            Err(Error::Mismatch {
                expected: 8,
                got: 7,
                ..
            })
        ));
        assert!(matches!(
            Counts::new(1, 1, vec![1 << 31]),
            Err(Error::TooLarge { .. })
        ));
        assert!(matches!(
            c.check_rank(2),
            Err(Error::RankOutOfRange { rank: 2, world: 2 })
        ));
    }
}
