//! Epoch arithmetic of signal words, the host-side mirror of `cuda/signal.cuh`.
//!
//! A signal word is a `u64` that only moves forward: a producer releases epoch `e` by
//! storing `e` (or by adding to a counter whose target is known), a consumer waits until
//! the word has *reached* `e`. Because words are never reset by the host between calls,
//! values wrap around `u64::MAX` eventually (or at once, when a test starts near the top);
//! "reached" is therefore decided on the wrapping difference, like TCP sequence numbers:
//! `seen` has reached `target` iff `seen - target (mod 2^64)`, read as a signed number, is
//! `>= 0`. This is exact as long as producer and consumer are less than 2^63 steps apart.

/// Whether a signal word holding `seen` has reached epoch `target` (wrap-around safe).
#[inline]
pub const fn reached(seen: u64, target: u64) -> bool {
    (seen.wrapping_sub(target) as i64) >= 0
}

/// Signed distance from `from` to `to` (positive when `to` is ahead).
#[inline]
pub const fn distance(from: u64, to: u64) -> i64 {
    to.wrapping_sub(from) as i64
}

/// A host-side epoch sequence for one signal set: the initial word value and the epochs
/// handed out since, so that no device memory is ever zeroed between calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochSeq {
    base: u64,
    current: u64,
}

impl EpochSeq {
    /// A sequence whose signal words were initialised to `base`.
    pub const fn new(base: u64) -> Self {
        EpochSeq {
            base,
            current: base,
        }
    }

    /// The value the signal words were initialised with.
    pub const fn base(&self) -> u64 {
        self.base
    }

    /// The last epoch handed out (`base` before the first call).
    pub const fn current(&self) -> u64 {
        self.current
    }

    /// Hands out the next epoch (wrapping past `u64::MAX` to 0).
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.current = self.current.wrapping_add(1);
        self.current
    }

    /// How many epochs have been handed out (modulo 2^64).
    pub const fn calls(&self) -> u64 {
        self.current.wrapping_sub(self.base)
    }
}

/// Target of a counter that `contributions` producers each increment once per epoch,
/// after `calls` epochs, when the counter started at `base`.
#[inline]
pub const fn counter_target(base: u64, calls: u64, contributions: u64) -> u64 {
    base.wrapping_add(calls.wrapping_mul(contributions))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reached_simple_cases() {
        assert!(reached(5, 5));
        assert!(reached(6, 5));
        assert!(!reached(4, 5));
        assert!(reached(0, 0));
    }

    #[test]
    fn reached_across_wrap_around() {
        let top = u64::MAX;
        assert!(reached(0, top), "0 comes right after u64::MAX");
        assert!(reached(3, top - 2));
        assert!(!reached(top, 0), "u64::MAX is one step before 0");
        assert!(!reached(top - 10, 5));
        assert_eq!(distance(top, 0), 1);
        assert_eq!(distance(0, top), -1);
        assert_eq!(distance(top - 2, 3), 6);
    }

    #[test]
    fn sequence_wraps_and_counts_calls() {
        let mut s = EpochSeq::new(u64::MAX - 1);
        assert_eq!(s.current(), u64::MAX - 1);
        assert_eq!(s.next(), u64::MAX);
        assert_eq!(s.next(), 0);
        assert_eq!(s.next(), 1);
        assert_eq!(s.calls(), 3);
        assert_eq!(s.base(), u64::MAX - 1);
        // Every epoch handed out has been reached by every later one and not by earlier ones.
        let mut s = EpochSeq::new(u64::MAX - 3);
        let es: Vec<u64> = (0..8).map(|_| s.next()).collect();
        for (i, &a) in es.iter().enumerate() {
            for (j, &b) in es.iter().enumerate() {
                assert_eq!(reached(b, a), j >= i, "epochs {i}:{a} {j}:{b}");
            }
        }
    }

    #[test]
    fn counter_targets_wrap() {
        assert_eq!(counter_target(u64::MAX, 1, 1), 0);
        assert_eq!(counter_target(u64::MAX - 5, 2, 4), 2);
        assert_eq!(counter_target(10, 3, 132), 10 + 396);
    }

    proptest! {
        #[test]
        fn reached_matches_ordering_of_offsets(base in any::<u64>(), a in 0u64..(1 << 62), b in 0u64..(1 << 62)) {
            let (x, y) = (base.wrapping_add(a), base.wrapping_add(b));
            prop_assert_eq!(reached(x, y), a >= b);
            prop_assert_eq!(distance(x, y), b as i64 - a as i64);
        }

        #[test]
        fn counter_reaches_target_exactly_at_last_contribution(base in any::<u64>(), calls in 0u64..1000, n in 1u64..512) {
            let mut word = counter_target(base, calls, n);
            let target = counter_target(base, calls + 1, n);
            for _ in 0..n - 1 {
                word = word.wrapping_add(1);
                prop_assert!(!reached(word, target));
            }
            word = word.wrapping_add(1);
            prop_assert_eq!(word, target);
            prop_assert!(reached(word, target));
        }
    }
}
