//! Discovery of the CUDA toolkit headers NVRTC needs (`cuda_bf16.h` and friends).
//!
//! NVRTC 13 ships no built-in CUDA headers: every compile passes `-I<root>/include` and
//! `-I<root>/include/cccl` (CUDA 13 moved `cuda/`, `cub/` and `thrust/` there). The root is
//! looked for in `CUDA_HOME`, then `CUDA_PATH`, then `/usr/local/cuda`; the first whose
//! `include/cuda_bf16.h` exists wins. This module loads no CUDA library, so it is tested on
//! machines without CUDA.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Environment variables consulted, in order.
pub const ENV_VARS: [&str; 2] = ["CUDA_HOME", "CUDA_PATH"];
/// Fallback toolkit root when no variable names a usable one.
pub const DEFAULT_ROOT: &str = "/usr/local/cuda";
/// The header whose presence marks a usable include directory.
pub const MARKER_HEADER: &str = "cuda_bf16.h";

/// A CUDA toolkit found on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Toolkit {
    /// Toolkit root (e.g. `/usr/local/cuda`).
    pub root: PathBuf,
    /// Include directories to pass to NVRTC, in order.
    pub include_dirs: Vec<PathBuf>,
}

impl Toolkit {
    /// NVRTC `-I` options for the include directories.
    pub fn include_options(&self) -> Vec<String> {
        self.include_dirs
            .iter()
            .map(|d| format!("-I{}", d.display()))
            .collect()
    }
}

/// Finds the toolkit from the process environment and the file system.
pub fn discover() -> Result<Toolkit> {
    discover_with(|k| std::env::var_os(k), |p| p.is_file(), |p| p.is_dir())
}

/// Finds the toolkit with injected environment and file-system probes (for tests).
///
/// `env` reads a variable, `is_file`/`is_dir` probe paths. The error names every candidate
/// tried and why it was rejected.
pub fn discover_with(
    env: impl Fn(&str) -> Option<OsString>,
    is_file: impl Fn(&Path) -> bool,
    is_dir: impl Fn(&Path) -> bool,
) -> Result<Toolkit> {
    let mut tried: Vec<String> = Vec::new();
    let mut candidates: Vec<(String, PathBuf)> = Vec::new();
    for var in ENV_VARS {
        match env(var) {
            Some(v) if !v.is_empty() => candidates.push((var.to_string(), PathBuf::from(v))),
            _ => tried.push(format!("${var} (unset)")),
        }
    }
    candidates.push(("default".to_string(), PathBuf::from(DEFAULT_ROOT)));
    for (source, root) in candidates {
        let include = root.join("include");
        let marker = include.join(MARKER_HEADER);
        if is_file(&marker) {
            let mut include_dirs = vec![include.clone()];
            let cccl = include.join("cccl");
            if is_dir(&cccl) {
                include_dirs.push(cccl);
            }
            return Ok(Toolkit { root, include_dirs });
        }
        tried.push(format!(
            "{} from {source} ({} missing)",
            root.display(),
            marker.display()
        ));
    }
    Err(Error::ToolkitNotFound {
        tried: tried.join("; "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    fn fake(vars: &[(&str, &str)], files: &[&str], dirs: &[&str]) -> Result<Toolkit> {
        let vars: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        let files: HashSet<PathBuf> = files.iter().map(PathBuf::from).collect();
        let dirs: HashSet<PathBuf> = dirs.iter().map(PathBuf::from).collect();
        discover_with(
            |k| vars.get(k).cloned(),
            |p| files.contains(p),
            |p| dirs.contains(p),
        )
    }

    #[test]
    fn cuda_home_wins_and_cccl_is_added() {
        let tk = fake(
            &[("CUDA_HOME", "/opt/cuda"), ("CUDA_PATH", "/other")],
            &[
                "/opt/cuda/include/cuda_bf16.h",
                "/other/include/cuda_bf16.h",
            ],
            &["/opt/cuda/include/cccl"],
        )
        .unwrap();
        assert_eq!(tk.root, PathBuf::from("/opt/cuda"));
        assert_eq!(
            tk.include_dirs,
            vec![
                PathBuf::from("/opt/cuda/include"),
                PathBuf::from("/opt/cuda/include/cccl")
            ]
        );
        assert_eq!(
            tk.include_options(),
            vec!["-I/opt/cuda/include", "-I/opt/cuda/include/cccl"]
        );
    }

    #[test]
    fn falls_back_past_a_bad_variable() {
        let tk = fake(
            &[("CUDA_HOME", "/broken")],
            &["/usr/local/cuda/include/cuda_bf16.h"],
            &[],
        )
        .unwrap();
        assert_eq!(tk.root, PathBuf::from(DEFAULT_ROOT));
        assert_eq!(
            tk.include_dirs,
            vec![PathBuf::from("/usr/local/cuda/include")]
        );
    }

    #[test]
    fn cuda_path_used_when_home_unset() {
        let tk = fake(
            &[("CUDA_PATH", "/p")],
            &["/p/include/cuda_bf16.h"],
            &["/p/include/cccl"],
        )
        .unwrap();
        assert_eq!(tk.root, PathBuf::from("/p"));
        assert_eq!(tk.include_dirs.len(), 2);
    }

    #[test]
    fn error_names_every_path_tried() {
        let err = fake(&[("CUDA_HOME", "/a"), ("CUDA_PATH", "/b")], &[], &[]).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::ToolkitNotFound { .. }));
        for needle in [
            "/a/include/cuda_bf16.h",
            "/b/include/cuda_bf16.h",
            "/usr/local/cuda/include/cuda_bf16.h",
            "CUDA_HOME",
            "CUDA_PATH",
        ] {
            assert!(msg.contains(needle), "{msg} lacks {needle}");
        }
    }

    #[test]
    fn unset_variables_are_reported() {
        let msg = fake(&[], &[], &[]).unwrap_err().to_string();
        assert!(msg.contains("$CUDA_HOME (unset)"), "{msg}");
        assert!(msg.contains("$CUDA_PATH (unset)"), "{msg}");
    }
}
