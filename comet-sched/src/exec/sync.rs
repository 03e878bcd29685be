//! Shared buffers, bounded waits and the quiescence gate of the host executor.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ndarray::Array2;

use crate::error::{Error, Result};

/// A row-major f32 matrix that threads share: elements are `AtomicU32` bit patterns, read and
/// written with relaxed ordering; visibility between threads comes from the flags and
/// counters (release stores, acquire loads), as on the GPU.
pub(crate) struct SharedBuf {
    data: Vec<AtomicU32>,
    cols: usize,
}

impl SharedBuf {
    /// `rows × cols` elements, all NaN (poisoned: an element never written stays NaN).
    pub(crate) fn nan(rows: usize, cols: usize) -> Self {
        let bits = f32::NAN.to_bits();
        SharedBuf {
            data: (0..rows * cols).map(|_| AtomicU32::new(bits)).collect(),
            cols,
        }
    }

    pub(crate) fn get(&self, r: usize, c: usize) -> f32 {
        f32::from_bits(self.data[r * self.cols + c].load(Ordering::Relaxed))
    }

    pub(crate) fn set(&self, r: usize, c: usize, v: f32) {
        self.data[r * self.cols + c].store(v.to_bits(), Ordering::Relaxed);
    }

    pub(crate) fn to_array(&self) -> Array2<f32> {
        let rows = self.data.len().checked_div(self.cols).unwrap_or(0);
        Array2::from_shape_fn((rows, self.cols), |(r, c)| self.get(r, c))
    }
}

/// Deadline and abort flag shared by every wait of one run.
pub(crate) struct Waits {
    /// `None`: the timeout is too long to represent (never expires).
    deadline: Option<Instant>,
    timeout: Duration,
    abort: AtomicBool,
}

impl Waits {
    pub(crate) fn new(timeout: Duration) -> Self {
        Waits {
            deadline: Instant::now().checked_add(timeout),
            timeout,
            abort: AtomicBool::new(false),
        }
    }

    /// Makes every other wait of the run give up (a thread failed).
    pub(crate) fn abort(&self) {
        self.abort.store(true, Ordering::Release);
    }

    /// One pass of a wait loop: an error past the deadline or after an abort, else a pause.
    pub(crate) fn tick(&self, spins: &mut u32, what: &dyn Fn() -> String) -> Result<()> {
        self.tick_after(Duration::ZERO, spins, what)
    }

    /// [`Waits::tick`] with the deadline moved `grace` later: for waits downstream of other
    /// waits, so that when a dependency never arrives the wait that stalled first reports.
    pub(crate) fn tick_after(
        &self,
        grace: Duration,
        spins: &mut u32,
        what: &dyn Fn() -> String,
    ) -> Result<()> {
        if self.abort.load(Ordering::Acquire) {
            return Err(Error::Timeout {
                what: format!("{} (gave up: another executor thread failed)", what()),
                waited_ms: 0,
            });
        }
        let late = self
            .deadline
            .and_then(|d| d.checked_add(grace))
            .is_some_and(|d| Instant::now() > d);
        if late {
            return Err(Error::Timeout {
                what: what(),
                waited_ms: self.timeout.saturating_add(grace).as_millis(),
            });
        }
        *spins += 1;
        if *spins < 64 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(20));
        }
        Ok(())
    }

    /// Spins until `ready()`.
    pub(crate) fn until(
        &self,
        what: &dyn Fn() -> String,
        ready: impl FnMut() -> bool,
    ) -> Result<()> {
        self.until_after(Duration::ZERO, what, ready)
    }

    /// Spins until `ready()`, with the deadline moved `grace` later ([`Waits::tick_after`]).
    pub(crate) fn until_after(
        &self,
        grace: Duration,
        what: &dyn Fn() -> String,
        mut ready: impl FnMut() -> bool,
    ) -> Result<()> {
        let mut spins = 0;
        while !ready() {
            self.tick_after(grace, &mut spins, what)?;
        }
        Ok(())
    }

    /// The grace of downstream waits: a quarter of the timeout, at least 50 ms.
    pub(crate) fn downstream_grace(&self) -> Duration {
        (self.timeout / 4).max(Duration::from_millis(50))
    }
}

/// Orders producers and consumers of one rank.
///
/// Free mode: no ordering beyond the flags themselves (threads race as on a GPU).
///
/// Lazy mode: producers (the side that releases flags or counters) take one *step* at a
/// time, and only once every consumer is *quiescent* — finished, or blocked having seen the
/// state after the previous step. So a consumer runs everything its declared dependencies
/// allow before any further data arrives: a consumer that forgot a dependency reads poisoned
/// data deterministically instead of by chance. Consumers publish what they wait for, so a
/// producer can serve demand (and hold back everything nobody asked for).
pub(crate) struct Gate {
    lazy: bool,
    generation: AtomicU64,
    observed: Vec<AtomicU64>,
    wants: Vec<AtomicU64>,
    done: Vec<AtomicBool>,
    step: Mutex<()>,
}

impl Gate {
    pub(crate) fn new(consumers: usize, lazy: bool) -> Self {
        Gate {
            lazy,
            generation: AtomicU64::new(0),
            observed: (0..consumers).map(|_| AtomicU64::new(u64::MAX)).collect(),
            wants: (0..consumers).map(|_| AtomicU64::new(u64::MAX)).collect(),
            done: (0..consumers).map(|_| AtomicBool::new(false)).collect(),
            step: Mutex::new(()),
        }
    }

    /// Consumer `c` waits until `ready()`, publishing `want()` (evaluated after each failed
    /// check) while blocked.
    pub(crate) fn wait(
        &self,
        waits: &Waits,
        c: usize,
        want: &dyn Fn() -> u64,
        what: &dyn Fn() -> String,
        mut ready: impl FnMut() -> bool,
    ) -> Result<()> {
        let mut spins = 0;
        loop {
            let g = self.generation.load(Ordering::Acquire);
            if ready() {
                return Ok(());
            }
            self.wants[c].store(want(), Ordering::Relaxed);
            self.observed[c].store(g, Ordering::Release);
            waits.tick(&mut spins, what)?;
        }
    }

    /// True in lazy mode.
    pub(crate) fn is_lazy(&self) -> bool {
        self.lazy
    }

    /// Consumer `c` has no more waits.
    pub(crate) fn finish(&self, c: usize) {
        self.done[c].store(true, Ordering::Release);
    }

    /// Runs one producer step. Lazy mode: waits for quiescence, then calls `step` with the
    /// wants of the blocked consumers (free mode: with none) and publishes the new state.
    pub(crate) fn step<R>(
        &self,
        waits: &Waits,
        what: &dyn Fn() -> String,
        step: impl FnOnce(&[u64]) -> R,
    ) -> Result<R> {
        if !self.lazy {
            return Ok(step(&[]));
        }
        let _guard = self
            .step
            .lock()
            .map_err(|_| Error::ThreadPanicked("a producer panicked inside a gate step".into()))?;
        let g = self.generation.load(Ordering::Acquire);
        waits.until(what, || {
            (0..self.done.len()).all(|c| {
                self.done[c].load(Ordering::Acquire)
                    || self.observed[c].load(Ordering::Acquire) == g
            })
        })?;
        let wants: Vec<u64> = (0..self.done.len())
            .filter(|&c| !self.done[c].load(Ordering::Acquire))
            .map(|c| self.wants[c].load(Ordering::Relaxed))
            .collect();
        let r = step(&wants);
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(r)
    }
}
