//! Is there a CUDA device? Answered without panicking when no CUDA driver is installed.
//!
//! cudarc 0.19 with dynamic loading panics inside its library loader when `libcuda` is
//! missing, so the probe first checks that the driver library loads at all, and runs the
//! driver calls under `catch_unwind` (a missing symbol also panics there).

use serde::{Deserialize, Serialize};

/// Whether this build of comet-bench can run the MoE layer benchmark on GPUs (`run`, with
/// comet-layer's Sequential and Pipelined strategies). When false, `cargo xtask bench` falls
/// back to the CPU reference and says so.
pub const GPU_BENCH: bool = true;

/// What `comet-bench devices --json` prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceReport {
    /// Whether the CUDA driver library (`libcuda`) could be loaded.
    pub driver_found: bool,
    /// Why no device is usable, if that is so.
    pub error: Option<String>,
    /// The devices, in ordinal order.
    pub devices: Vec<DeviceInfo>,
    /// Whether this build can run the GPU benchmark ([`GPU_BENCH`]).
    pub gpu_bench: bool,
}

/// One CUDA device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Device ordinal.
    pub ordinal: usize,
    /// Name, e.g. "NVIDIA H200".
    pub name: String,
    /// Compute capability, e.g. "9.0".
    pub compute_capability: String,
    /// Total memory in MiB.
    pub memory_mib: u64,
}

/// Probe the CUDA driver and list the devices. Never panics; problems end up in `error`.
pub fn probe() -> DeviceReport {
    // SAFETY: `is_culib_present` dlopens the CUDA driver under its usual names and drops the
    // handle; a CUDA driver's initialisers are expected to be safe to run. No symbol is called.
    let driver_found = unsafe { cudarc::driver::sys::is_culib_present() };
    if !driver_found {
        return DeviceReport {
            driver_found,
            error: Some("no CUDA driver found (libcuda could not be loaded)".into()),
            devices: Vec::new(),
            gpu_bench: GPU_BENCH,
        };
    }
    let listed = std::panic::catch_unwind(list_devices).unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        Err(format!("the CUDA driver could not be used: {why}"))
    });
    match listed {
        Ok(devices) => DeviceReport {
            driver_found,
            error: devices
                .is_empty()
                .then(|| "the CUDA driver reports 0 devices".to_string()),
            devices,
            gpu_bench: GPU_BENCH,
        },
        Err(error) => DeviceReport {
            driver_found,
            error: Some(error),
            devices: Vec::new(),
            gpu_bench: GPU_BENCH,
        },
    }
}

fn list_devices() -> std::result::Result<Vec<DeviceInfo>, String> {
    use cudarc::driver::{result, sys::CUdevice_attribute as Attr};
    let fail = |what: &str, e: result::DriverError| format!("{what}: {e}");
    result::init().map_err(|e| fail("cuInit", e))?;
    let count = result::device::get_count().map_err(|e| fail("cuDeviceGetCount", e))?;
    let mut devices = Vec::new();
    for ordinal in 0..count {
        let dev = result::device::get(ordinal).map_err(|e| fail("cuDeviceGet", e))?;
        let name = result::device::get_name(dev).map_err(|e| fail("cuDeviceGetName", e))?;
        // SAFETY: `dev` was returned by cuDeviceGet above, as these calls require.
        let (major, minor, bytes) = unsafe {
            (
                result::device::get_attribute(
                    dev,
                    Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                )
                .map_err(|e| fail("cuDeviceGetAttribute", e))?,
                result::device::get_attribute(
                    dev,
                    Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                )
                .map_err(|e| fail("cuDeviceGetAttribute", e))?,
                result::device::total_mem(dev).map_err(|e| fail("cuDeviceTotalMem", e))?,
            )
        };
        devices.push(DeviceInfo {
            ordinal: ordinal as usize,
            name,
            compute_capability: format!("{major}.{minor}"),
            memory_mib: bytes as u64 / (1024 * 1024),
        });
    }
    Ok(devices)
}

/// One line per device, or the reason there is none (for `comet-bench devices`).
pub fn describe(report: &DeviceReport) -> String {
    if report.devices.is_empty() {
        let why = report.error.as_deref().unwrap_or("no CUDA device found");
        return format!("no CUDA device: {why}");
    }
    let mut s = format!("{} CUDA device(s):", report.devices.len());
    for d in &report.devices {
        s.push_str(&format!(
            "\n  {}: {} (compute capability {}, {} MiB)",
            d.ordinal, d.name, d.compute_capability, d.memory_mib
        ));
    }
    if !report.gpu_bench {
        s.push_str("\n(this comet-bench has no GPU benchmark path yet)");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs everywhere: with no driver it must say so instead of panicking; with one, every
    /// listed device has a name and memory.
    #[test]
    fn probe_never_panics_and_is_consistent() {
        let r = probe();
        if !r.driver_found {
            assert!(r.devices.is_empty());
            assert!(r.error.as_deref().unwrap().contains("no CUDA driver found"));
            assert!(describe(&r).contains("no CUDA driver found"));
        }
        if r.devices.is_empty() {
            assert!(r.error.is_some());
        } else {
            assert!(r.error.is_none());
        }
        for (i, d) in r.devices.iter().enumerate() {
            assert_eq!(d.ordinal, i);
            assert!(!d.name.is_empty() && d.memory_mib > 0);
        }
        assert_eq!(r.gpu_bench, GPU_BENCH);
    }

    #[test]
    fn describe_lists_devices() {
        let r = DeviceReport {
            driver_found: true,
            error: None,
            devices: vec![DeviceInfo {
                ordinal: 0,
                name: "NVIDIA H200".into(),
                compute_capability: "9.0".into(),
                memory_mib: 143771,
            }],
            gpu_bench: false,
        };
        let s = describe(&r);
        assert!(
            s.contains("0: NVIDIA H200 (compute capability 9.0, 143771 MiB)"),
            "{s}"
        );
        assert!(s.contains("no GPU benchmark path yet"), "{s}");
        // The JSON is what xtask reads.
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(v["driver_found"], true);
        assert_eq!(v["devices"][0]["name"], "NVIDIA H200");
        assert_eq!(v["gpu_bench"], false);
    }
}
