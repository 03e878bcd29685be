//! A small NVRTC helper: CUDA C++ source → CUBIN for the device's own architecture.
//!
//! comet-comm compiles its own device code here so that it does not depend on
//! comet-kernels while that crate is being written; this should later move onto
//! comet-kernels' on-disk cache. Compiled cubins are cached in-process, keyed by
//! (source, options, architecture).

use std::collections::HashMap;
use std::ffi::{CStr, CString, c_char};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::nvrtc::sys;

use crate::error::{Error, Result};

/// Name under which device code includes the signal header: `#include "comet/signal.cuh"`.
pub const SIGNAL_HEADER_NAME: &str = "comet/signal.cuh";
/// The signal header's source (release/acquire signals with epochs and bounded waits).
pub const SIGNAL_HEADER: &str = include_str!("../cuda/signal.cuh");
/// Source of comet-comm's data-movement kernels.
pub const P2P_SOURCE: &str = include_str!("../cuda/p2p.cu");

/// The NVRTC target for a compute capability: `sm_90a` / `sm_100a` where the
/// architecture-specific features (wgmma, setmaxnreg) exist, else `sm_XY`.
pub fn arch_for_capability(major: i32, minor: i32) -> String {
    if (major == 9 || major == 10) && minor == 0 {
        format!("sm_{major}{minor}a")
    } else {
        format!("sm_{major}{minor}")
    }
}

/// Toolkit include directories that exist: `$CUDA_HOME`, `$CUDA_PATH`, `/usr/local/cuda`,
/// each with `include` and `include/cccl`. comet-comm's own sources need none of them.
pub fn toolkit_include_dirs() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(v) = std::env::var_os(var) {
            roots.push(PathBuf::from(v));
        }
    }
    roots.push(PathBuf::from("/usr/local/cuda"));
    let mut dirs = Vec::new();
    for root in roots {
        for sub in ["include", "include/cccl"] {
            let d = root.join(sub);
            if d.is_dir() && !dirs.contains(&d) {
                dirs.push(d);
            }
        }
    }
    dirs
}

fn ensure_nvrtc() -> Result<()> {
    // SAFETY: probing for the library only tries to dlopen candidate names.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::LibraryMissing {
            library: "libnvrtc",
            hint: "put the CUDA toolkit's lib directory (libnvrtc.so.13) on LD_LIBRARY_PATH".into(),
        })
    }
}

fn nvrtc_error_string(r: sys::nvrtcResult) -> String {
    // SAFETY: nvrtcGetErrorString returns a static NUL-terminated string for any code.
    unsafe {
        let p = sys::nvrtcGetErrorString(r);
        if p.is_null() {
            format!("{r:?}")
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

type CacheKey = (String, String, Vec<String>);

fn cache() -> &'static Mutex<HashMap<CacheKey, Arc<Vec<u8>>>> {
    static CACHE: OnceLock<Mutex<HashMap<CacheKey, Arc<Vec<u8>>>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Compiles `source` (which may `#include "comet/signal.cuh"`) to a CUBIN for `arch`
/// (e.g. `sm_90a`) with extra NVRTC `options` (e.g. `-DCOMET_UNROLL=8`).
pub fn compile_cubin(
    name: &str,
    source: &str,
    arch: &str,
    options: &[String],
) -> Result<Arc<Vec<u8>>> {
    let key: CacheKey = (source.to_string(), arch.to_string(), options.to_vec());
    if let Ok(c) = cache().lock()
        && let Some(hit) = c.get(&key)
    {
        return Ok(hit.clone());
    }
    ensure_nvrtc()?;
    let nv_err = |message: String, log: String| Error::Nvrtc {
        name: name.to_string(),
        arch: arch.to_string(),
        message,
        log,
    };
    let to_c = |s: &str| {
        CString::new(s).map_err(|_| nv_err(format!("{s:?} contains a NUL byte"), String::new()))
    };
    let c_src = to_c(source)?;
    let c_name = to_c(name)?;
    let c_hdr = to_c(SIGNAL_HEADER)?;
    let c_hdr_name = to_c(SIGNAL_HEADER_NAME)?;
    let mut opts: Vec<String> = vec![
        format!("--gpu-architecture={arch}"),
        "-default-device".into(),
        "-std=c++17".into(),
        "-lineinfo".into(),
    ];
    for d in toolkit_include_dirs() {
        opts.push(format!("-I{}", d.display()));
    }
    opts.extend(options.iter().cloned());
    let c_opts = opts.iter().map(|o| to_c(o)).collect::<Result<Vec<_>>>()?;
    let opt_ptrs: Vec<*const c_char> = c_opts.iter().map(|o| o.as_ptr()).collect();
    let headers = [c_hdr.as_ptr()];
    let header_names = [c_hdr_name.as_ptr()];

    let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call; the
    // header arrays have one element each, matching numHeaders = 1.
    let r = unsafe {
        sys::nvrtcCreateProgram(
            &mut prog,
            c_src.as_ptr(),
            c_name.as_ptr(),
            1,
            headers.as_ptr(),
            header_names.as_ptr(),
        )
    };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(nv_err(nvrtc_error_string(r), String::new()));
    }
    // The program is destroyed on every path below.
    struct Prog(sys::nvrtcProgram);
    impl Drop for Prog {
        fn drop(&mut self) {
            // SAFETY: the handle came from nvrtcCreateProgram and is destroyed once.
            unsafe {
                sys::nvrtcDestroyProgram(&mut self.0);
            }
        }
    }
    let prog = Prog(prog);
    let n_opts = i32::try_from(opt_ptrs.len())
        .map_err(|_| nv_err("too many options".into(), String::new()))?;
    // SAFETY: `opt_ptrs` holds `n_opts` valid C strings kept alive by `c_opts`.
    let r = unsafe { sys::nvrtcCompileProgram(prog.0, n_opts, opt_ptrs.as_ptr()) };
    let log = program_log(prog.0);
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(nv_err(nvrtc_error_string(r), log));
    }
    let mut size = 0usize;
    // SAFETY: prog compiled successfully; size is a valid out-pointer.
    let r = unsafe { sys::nvrtcGetCUBINSize(prog.0, &mut size) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
        return Err(nv_err(format!("no CUBIN ({})", nvrtc_error_string(r)), log));
    }
    let mut cubin = vec![0u8; size];
    // SAFETY: `cubin` has exactly the size NVRTC reported.
    let r = unsafe { sys::nvrtcGetCUBIN(prog.0, cubin.as_mut_ptr() as *mut c_char) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(nv_err(nvrtc_error_string(r), log));
    }
    if !log.trim().is_empty() {
        tracing::debug!(name, arch, "NVRTC log:\n{log}");
    }
    let cubin = Arc::new(cubin);
    if let Ok(mut c) = cache().lock() {
        c.insert(key, cubin.clone());
    }
    Ok(cubin)
}

fn program_log(prog: sys::nvrtcProgram) -> String {
    let mut size = 0usize;
    // SAFETY: prog is a live program; size is a valid out-pointer.
    if unsafe { sys::nvrtcGetProgramLogSize(prog, &mut size) } != sys::nvrtcResult::NVRTC_SUCCESS
        || size == 0
    {
        return String::new();
    }
    let mut buf = vec![0u8; size];
    // SAFETY: buf has the size NVRTC reported.
    if unsafe { sys::nvrtcGetProgramLog(prog, buf.as_mut_ptr() as *mut c_char) }
        != sys::nvrtcResult::NVRTC_SUCCESS
    {
        return String::new();
    }
    String::from_utf8_lossy(&buf)
        .trim_end_matches('\0')
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_names() {
        assert_eq!(arch_for_capability(9, 0), "sm_90a");
        assert_eq!(arch_for_capability(10, 0), "sm_100a");
        assert_eq!(arch_for_capability(8, 0), "sm_80");
        assert_eq!(arch_for_capability(8, 9), "sm_89");
        assert_eq!(arch_for_capability(12, 0), "sm_120");
    }

    #[test]
    fn signal_header_is_self_contained() {
        assert!(!SIGNAL_HEADER.contains("#include"));
        assert!(P2P_SOURCE.contains(&format!("#include \"{SIGNAL_HEADER_NAME}\"")));
    }

    /// Compiles the real sources when NVRTC is installed (no GPU needed).
    #[test]
    #[ignore = "needs NVRTC (libnvrtc.so.13 on LD_LIBRARY_PATH)"]
    fn p2p_source_compiles_for_hopper_and_ampere() {
        let selftest = include_str!("../cuda/selftest.cu");
        for arch in ["sm_90a", "sm_80"] {
            for (name, src) in [("p2p.cu", P2P_SOURCE), ("selftest.cu", selftest)] {
                let cubin = compile_cubin(name, src, arch, &[]).unwrap();
                assert_eq!(&cubin[..4], b"\x7fELF", "{name} {arch}: not an ELF cubin");
            }
        }
        let err = compile_cubin(
            "bad.cu",
            "extern \"C\" __global__ void k() { nope(); }",
            "sm_90a",
            &[],
        )
        .unwrap_err();
        match err {
            Error::Nvrtc { log, .. } => assert!(log.contains("nope"), "{log}"),
            other => panic!("expected Nvrtc error, got {other:?}"),
        }
    }
}
