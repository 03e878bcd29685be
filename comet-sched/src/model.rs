//! [`CostModel`]: the few rates and latencies the simulator needs.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Rates and latencies of one GPU and its links.
///
/// [`CostModel::h200`] holds values measured on H200s in this project (bench/results):
/// dense bf16 GEMM ~790 TFLOP/s and the grouped engine 500–720 TFLOP/s
/// (`2026-11-29-hopper-gemm-h200.json`); NVLink push ~360 GB/s per direction, 16 blocks
/// already ~330–345 GB/s, the copy engine ~390 GB/s with ~2 µs per copy
/// (`2026-11-29-p2p-h200x2.json`); local device-to-device copies ~2000 GB/s. The per-block
/// local copy rate, launch and flag latencies are estimates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CostModel {
    /// SMs (one persistent block each).
    pub sms: usize,
    /// Grouped-GEMM rate with every SM computing (TFLOP/s); a GEMM block runs at
    /// `gemm_tflops / sms`.
    pub gemm_tflops: f64,
    /// NVLink bytes one communication block moves per second (GB/s).
    pub copy_gbps_per_block: f64,
    /// NVLink saturation per direction (GB/s): `k` blocks move `min(k · per_block, link)`.
    pub link_gbps: f64,
    /// Local (HBM to HBM) bytes one block copies per second (GB/s).
    pub local_gbps_per_block: f64,
    /// Local copy saturation (GB/s).
    pub hbm_gbps: f64,
    /// Copy engine rate over NVLink (GB/s), used when `n_comm = 0`.
    pub copy_engine_gbps: f64,
    /// Fixed cost of one copy-engine copy (µs).
    pub copy_engine_latency_us: f64,
    /// Kernel launch latency (µs).
    pub launch_us: f64,
    /// Time from a flag's release to a waiting block seeing it (µs).
    pub flag_latency_us: f64,
}

impl CostModel {
    /// One H200 in an NVLink (NV18) node.
    pub fn h200() -> Self {
        CostModel {
            sms: 132,
            gemm_tflops: 600.0,
            copy_gbps_per_block: 21.0,
            link_gbps: 360.0,
            local_gbps_per_block: 60.0,
            hbm_gbps: 2000.0,
            copy_engine_gbps: 390.0,
            copy_engine_latency_us: 2.0,
            launch_us: 4.0,
            flag_latency_us: 1.0,
        }
    }

    /// Checks every parameter.
    ///
    /// # Errors
    /// [`Error::ZeroSize`] for 0 SMs; [`Error::BadParameter`] for a rate that is not finite
    /// and positive or a latency that is not finite and non-negative.
    pub fn validate(&self) -> Result<()> {
        if self.sms == 0 {
            return Err(Error::ZeroSize { name: "sms" });
        }
        for (name, v) in [
            ("gemm_tflops", self.gemm_tflops),
            ("copy_gbps_per_block", self.copy_gbps_per_block),
            ("link_gbps", self.link_gbps),
            ("local_gbps_per_block", self.local_gbps_per_block),
            ("hbm_gbps", self.hbm_gbps),
            ("copy_engine_gbps", self.copy_engine_gbps),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(Error::BadParameter { name, value: v });
            }
        }
        for (name, v) in [
            ("copy_engine_latency_us", self.copy_engine_latency_us),
            ("launch_us", self.launch_us),
            ("flag_latency_us", self.flag_latency_us),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::BadParameter { name, value: v });
            }
        }
        Ok(())
    }

    /// Checks a communication-block count: it must leave at least one GEMM block.
    ///
    /// # Errors
    /// [`Error::NCommTooLarge`] if `n_comm ≥ sms`.
    pub fn check_n_comm(&self, n_comm: usize) -> Result<()> {
        if n_comm >= self.sms {
            return Err(Error::NCommTooLarge {
                n_comm,
                sms: self.sms,
            });
        }
        Ok(())
    }

    /// Time of one GEMM tile of `flops` on one block (µs).
    pub fn tile_us(&self, flops: f64) -> f64 {
        flops / (self.gemm_tflops * 1e12 / self.sms as f64) * 1e6
    }

    /// Per-block NVLink rate with `active` blocks copying (bytes/µs).
    pub fn remote_rate(&self, active: usize) -> f64 {
        let per = self.copy_gbps_per_block;
        per.min(self.link_gbps / active.max(1) as f64) * 1e3
    }

    /// Per-block local copy rate with `active` blocks copying (bytes/µs).
    pub fn local_rate(&self, active: usize) -> f64 {
        let per = self.local_gbps_per_block;
        per.min(self.hbm_gbps / active.max(1) as f64) * 1e3
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h200_is_valid_and_saturates() {
        let m = CostModel::h200();
        m.validate().unwrap();
        // 16 blocks: 336 GB/s; 64 blocks share the 360 GB/s link.
        assert!((m.remote_rate(16) * 16.0 / 1e3 - 336.0).abs() < 1e-9);
        assert!((m.remote_rate(64) * 64.0 / 1e3 - 360.0).abs() < 1e-9);
        // A 128x256x4096 tile: 268 MFLOP at 600/132 TFLOP/s per block = 59 µs.
        let t = m.tile_us(2.0 * 128.0 * 256.0 * 4096.0);
        assert!((t - 59.05).abs() < 0.01, "{t}");
        assert!(matches!(
            m.check_n_comm(132),
            Err(Error::NCommTooLarge {
                n_comm: 132,
                sms: 132
            })
        ));
        m.check_n_comm(131).unwrap();
    }

    #[test]
    fn bad_parameters_are_named() {
        let m = CostModel {
            link_gbps: f64::NAN,
            ..CostModel::h200()
        };
        assert!(matches!(
            m.validate(),
            Err(Error::BadParameter {
                name: "link_gbps",
                ..
            })
        ));
        let m = CostModel {
            launch_us: -1.0,
            ..CostModel::h200()
        };
        assert!(matches!(
            m.validate(),
            Err(Error::BadParameter {
                name: "launch_us",
                ..
            })
        ));
        let m = CostModel {
            sms: 0,
            ..CostModel::h200()
        };
        assert!(matches!(m.validate(), Err(Error::ZeroSize { name: "sms" })));
    }
}
