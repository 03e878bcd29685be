//! Optional per-phase timing with CUDA event pairs, recorded on the stream each phase runs on.
//!
//! With several chunks (the pipelined strategy) a phase is timed once per chunk on its
//! stream and the intervals are summed: phases that overlap then add up to more than the
//! layer time, which is the point of the strategy. Enabling timing adds event records only.

use std::collections::BTreeMap;

use cudarc::driver::CudaEvent;

use comet_kernels::Gpu;

use crate::error::Result;

/// Event pairs of the phases of the calls since the last [`PhaseTimer::take`].
#[derive(Debug, Default)]
pub(crate) struct PhaseTimer {
    enabled: bool,
    spans: Vec<(&'static str, CudaEvent, CudaEvent)>,
}

/// A started phase (`None` while timing is off).
pub(crate) struct Started(Option<CudaEvent>);

impl PhaseTimer {
    pub(crate) fn set_enabled(&mut self, on: bool) {
        self.enabled = on;
        if !on {
            self.spans.clear();
        }
    }

    /// Records the start of a phase on `gpu`'s stream.
    pub(crate) fn start(&self, gpu: &Gpu) -> Result<Started> {
        if !self.enabled {
            return Ok(Started(None));
        }
        Ok(Started(Some(record(gpu)?)))
    }

    /// Records the end of phase `name` on `gpu`'s stream.
    pub(crate) fn stop(&mut self, name: &'static str, gpu: &Gpu, s: Started) -> Result<()> {
        if let Some(begin) = s.0 {
            let end = record(gpu)?;
            self.spans.push((name, begin, end));
        }
        Ok(())
    }

    /// Milliseconds per phase (summed over its intervals), waiting for the events; clears the
    /// recorded spans.
    pub(crate) fn take(&mut self) -> Result<BTreeMap<String, f64>> {
        let mut out = BTreeMap::new();
        for (name, a, b) in self.spans.drain(..) {
            *out.entry(name.to_string()).or_insert(0.0) += f64::from(a.elapsed_ms(&b)?);
        }
        Ok(out)
    }
}

fn record(gpu: &Gpu) -> Result<CudaEvent> {
    let e = gpu.timing_event()?;
    e.record(gpu.stream())?;
    Ok(e)
}
