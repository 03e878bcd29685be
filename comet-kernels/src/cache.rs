//! NVRTC compilation to CUBIN, the on-disk cubin cache, and loaded modules per context.
//!
//! A kernel is a [`Program`] (a `.cu` source plus the embedded headers it includes) compiled
//! with a set of `-D` specialisations for one [`Arch`]. The cubin is cached on disk under
//! `COMET_CACHE_DIR` (default `<user cache dir>/comet-rs`) keyed by the SHA-256 of the source
//! and headers, the full option list, the NVRTC version and the arch, and kept in memory;
//! loaded modules and functions are kept per CUDA context. Everything is safe to use from
//! several threads. Key, option and directory logic loads no CUDA library and is tested in CI.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::ffi::{CStr, CString, c_char, c_int};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::{Ptx, sys as nvrtc_sys};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::toolkit;

/// Environment variable naming the cubin cache directory.
pub const CACHE_DIR_ENV: &str = "COMET_CACHE_DIR";

/// A GPU architecture (compute capability).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Arch {
    /// Major compute capability.
    pub major: u32,
    /// Minor compute capability.
    pub minor: u32,
}

impl Arch {
    /// Hopper (compute capability 9.0).
    pub const SM90: Arch = Arch { major: 9, minor: 0 };
    /// Ampere A100 (compute capability 8.0).
    pub const SM80: Arch = Arch { major: 8, minor: 0 };

    /// NVRTC target name: `sm_90a` on compute capability 9.0 (for wgmma/setmaxnreg),
    /// `sm_XY` otherwise.
    pub fn target(&self) -> String {
        if *self == Arch::SM90 {
            "sm_90a".to_string()
        } else {
            format!("sm_{}{}", self.major, self.minor)
        }
    }

    /// The architecture of a context's device.
    pub fn of(ctx: &CudaContext) -> Result<Arch> {
        let (major, minor) = ctx.compute_capability()?;
        Ok(Arch {
            major: major.max(0) as u32,
            minor: minor.max(0) as u32,
        })
    }
}

/// A CUDA C++ program: a main source and the in-memory headers it may `#include "..."`.
#[derive(Debug, Clone)]
pub struct Program {
    /// Name (used in logs and as NVRTC's file name).
    pub name: Cow<'static, str>,
    /// The `.cu` source.
    pub source: Cow<'static, str>,
    /// `(include name, content)` of headers made available to the program.
    pub headers: Vec<(Cow<'static, str>, Cow<'static, str>)>,
}

/// `-D` macro specialisations of a program (sorted, so equal sets give equal keys).
pub type Defines = BTreeMap<String, String>;

/// NVRTC options for `arch` with the given include options and defines, in a fixed order.
pub fn compile_options(arch: Arch, include_options: &[String], defines: &Defines) -> Vec<String> {
    let mut opts = vec![
        "-std=c++17".to_string(),
        "-default-device".to_string(),
        "-lineinfo".to_string(),
        format!("--gpu-architecture={}", arch.target()),
    ];
    opts.extend(include_options.iter().cloned());
    for (k, v) in defines {
        if v.is_empty() {
            opts.push(format!("-D{k}"));
        } else {
            opts.push(format!("-D{k}={v}"));
        }
    }
    opts
}

/// Cache key: hex SHA-256 of (program source and headers, options, NVRTC version, arch).
pub fn cache_key(
    program: &Program,
    options: &[String],
    nvrtc_version: (i32, i32),
    arch: Arch,
) -> String {
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field(b"comet-kernels cubin v1");
    field(arch.target().as_bytes());
    field(format!("nvrtc {}.{}", nvrtc_version.0, nvrtc_version.1).as_bytes());
    field(program.name.as_bytes());
    field(program.source.as_bytes());
    for (name, content) in &program.headers {
        field(name.as_bytes());
        field(content.as_bytes());
    }
    field(&(options.len() as u64).to_le_bytes());
    for o in options {
        field(o.as_bytes());
    }
    let digest = h.finalize();
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The cache directory from `COMET_CACHE_DIR`, else `<user cache dir>/comet-rs`; `None` when
/// neither is known (then only the in-memory cache is used).
pub fn default_cache_dir() -> Option<PathBuf> {
    cache_dir_from(std::env::var_os(CACHE_DIR_ENV), dirs::cache_dir())
}

fn cache_dir_from(env: Option<std::ffi::OsString>, user_cache: Option<PathBuf>) -> Option<PathBuf> {
    match env {
        Some(v) if !v.is_empty() => Some(PathBuf::from(v)),
        _ => user_cache.map(|d| d.join("comet-rs")),
    }
}

/// Whether `bytes` look like a cubin (an ELF image); a truncated cache file fails this.
pub fn looks_like_cubin(bytes: &[u8]) -> bool {
    bytes.len() > 64 && bytes.starts_with(b"\x7fELF")
}

fn cubin_path(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!("{key}.cubin"))
}

/// Writes `bytes` to `path` atomically (temporary file + rename).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|source| Error::Io {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Checks that NVRTC can be loaded (no panic from cudarc's loader when it cannot).
pub fn ensure_nvrtc() -> Result<()> {
    // SAFETY: only tries to dlopen the library by its candidate names.
    if unsafe { nvrtc_sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::LibraryMissing { library: "nvrtc" })
    }
}

/// Checks that the CUDA driver library can be loaded.
pub fn ensure_driver() -> Result<()> {
    // SAFETY: only tries to dlopen the library by its candidate names.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::LibraryMissing { library: "cuda" })
    }
}

/// The loaded NVRTC's version.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    ensure_nvrtc()?;
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: NVRTC is loadable (checked above); both pointers are valid for writes.
    let r = unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) };
    nvrtc_check("nvrtcVersion", r)?;
    Ok((major, minor))
}

fn nvrtc_check(call: &'static str, r: nvrtc_sys::nvrtcResult) -> Result<()> {
    if r == nvrtc_sys::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(Error::Nvrtc {
            call,
            code: format!("{r:?}"),
        })
    }
}

fn cstring(what: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::Invalid(format!("{what} contains a NUL byte")))
}

/// Destroys an NVRTC program on drop.
struct ProgramGuard(nvrtc_sys::nvrtcProgram);

impl Drop for ProgramGuard {
    fn drop(&mut self) {
        // SAFETY: the handle came from a successful nvrtcCreateProgram and is destroyed once.
        unsafe {
            let _ = nvrtc_sys::nvrtcDestroyProgram(&mut self.0);
        }
    }
}

fn program_log(prog: nvrtc_sys::nvrtcProgram) -> String {
    let mut size: usize = 0;
    // SAFETY: `prog` is a live program; `size` is valid for writes.
    let r = unsafe { nvrtc_sys::nvrtcGetProgramLogSize(prog, &mut size) };
    if r != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
        return String::new();
    }
    let mut buf = vec![0u8; size];
    // SAFETY: `buf` holds `size` bytes as NVRTC reported.
    let r = unsafe { nvrtc_sys::nvrtcGetProgramLog(prog, buf.as_mut_ptr() as *mut c_char) };
    if r != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS {
        return String::new();
    }
    CStr::from_bytes_until_nul(&buf)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Compiles `program` with `options` to a CUBIN through NVRTC.
pub fn compile_cubin(program: &Program, options: &[String], arch: Arch) -> Result<Vec<u8>> {
    ensure_nvrtc()?;
    let src = cstring("program source", &program.source)?;
    let name = cstring("program name", &program.name)?;
    let mut header_src = Vec::with_capacity(program.headers.len());
    let mut header_names = Vec::with_capacity(program.headers.len());
    for (n, c) in &program.headers {
        header_names.push(cstring("header name", n)?);
        header_src.push(cstring("header", c)?);
    }
    let header_src_ptrs: Vec<*const c_char> = header_src.iter().map(|c| c.as_ptr()).collect();
    let header_name_ptrs: Vec<*const c_char> = header_names.iter().map(|c| c.as_ptr()).collect();
    let opts: Vec<CString> = options
        .iter()
        .map(|o| cstring("option", o))
        .collect::<Result<_>>()?;
    let opt_ptrs: Vec<*const c_char> = opts.iter().map(|c| c.as_ptr()).collect();

    let mut prog: nvrtc_sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: all strings are NUL-terminated and outlive the program (they live until the end
    // of this function, after the guard destroys the program); counts match the arrays.
    let r = unsafe {
        nvrtc_sys::nvrtcCreateProgram(
            &mut prog,
            src.as_ptr(),
            name.as_ptr(),
            header_src_ptrs.len() as c_int,
            header_src_ptrs.as_ptr(),
            header_name_ptrs.as_ptr(),
        )
    };
    nvrtc_check("nvrtcCreateProgram", r)?;
    let guard = ProgramGuard(prog);
    let started = std::time::Instant::now();
    // SAFETY: `prog` is live; the option pointers are valid NUL-terminated strings.
    let r = unsafe {
        nvrtc_sys::nvrtcCompileProgram(guard.0, opt_ptrs.len() as c_int, opt_ptrs.as_ptr())
    };
    if r != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(Error::Compile {
            program: program.name.to_string(),
            arch: arch.target(),
            options: options.join(" "),
            log: format!("{r:?}\n{}", program_log(guard.0)),
        });
    }
    let log = program_log(guard.0);
    tracing::debug!(
        program = %program.name,
        ms = started.elapsed().as_millis() as u64,
        log = %log.trim(),
        "nvrtc compiled"
    );
    let mut size: usize = 0;
    // SAFETY: `prog` compiled successfully; `size` is valid for writes.
    nvrtc_check("nvrtcGetCUBINSize", unsafe {
        nvrtc_sys::nvrtcGetCUBINSize(guard.0, &mut size)
    })?;
    let mut cubin = vec![0u8; size];
    // SAFETY: `cubin` holds `size` bytes as NVRTC reported.
    nvrtc_check("nvrtcGetCUBIN", unsafe {
        nvrtc_sys::nvrtcGetCUBIN(guard.0, cubin.as_mut_ptr() as *mut c_char)
    })?;
    drop(guard);
    Ok(cubin)
}

type ModuleKey = (usize, String);
/// Memo of keys for programs whose source and headers are `'static` (embedded): identified by
/// the addresses and lengths of their texts, so the SHA-256 runs once per specialisation.
type StaticKey = (Vec<(usize, usize)>, Defines, Arch);
type FunctionKey = (usize, String, String);

/// Thread-safe cache of cubins (memory + disk), loaded modules and functions per context.
#[derive(Debug, Default)]
pub struct KernelCache {
    dir: Option<PathBuf>,
    toolkit_opts: OnceLock<Vec<String>>,
    cubins: Mutex<HashMap<String, Arc<Vec<u8>>>>,
    static_keys: Mutex<HashMap<StaticKey, (Vec<String>, String)>>,
    modules: Mutex<HashMap<ModuleKey, Arc<CudaModule>>>,
    functions: Mutex<HashMap<FunctionKey, CudaFunction>>,
}

impl KernelCache {
    /// A cache using `dir` on disk (`None`: memory only).
    pub fn new(dir: Option<PathBuf>) -> Self {
        KernelCache {
            dir,
            ..Default::default()
        }
    }

    /// The process-wide cache, under [`default_cache_dir`].
    pub fn global() -> Arc<KernelCache> {
        static GLOBAL: OnceLock<Arc<KernelCache>> = OnceLock::new();
        GLOBAL
            .get_or_init(|| Arc::new(KernelCache::new(default_cache_dir())))
            .clone()
    }

    /// The on-disk directory, if any.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    fn include_options(&self) -> Result<Vec<String>> {
        if let Some(o) = self.toolkit_opts.get() {
            return Ok(o.clone());
        }
        let opts = toolkit::discover()?.include_options();
        Ok(self.toolkit_opts.get_or_init(|| opts).clone())
    }

    /// The options and cache key `program` with `defines` gets for `arch`.
    pub fn key_for(
        &self,
        program: &Program,
        defines: &Defines,
        arch: Arch,
    ) -> Result<(Vec<String>, String)> {
        let static_id = static_identity(program);
        if let Some(id) = &static_id {
            let memo = (id.clone(), defines.clone(), arch);
            if let Some(k) = self.static_keys.lock().map_err(poisoned)?.get(&memo) {
                return Ok(k.clone());
            }
        }
        let options = compile_options(arch, &self.include_options()?, defines);
        let key = cache_key(program, &options, nvrtc_version()?, arch);
        if let Some(id) = static_id {
            self.static_keys
                .lock()
                .map_err(poisoned)?
                .insert((id, defines.clone(), arch), (options.clone(), key.clone()));
        }
        Ok((options, key))
    }

    /// The cubin of `program` specialised by `defines` for `arch`: from memory, disk, or NVRTC.
    pub fn cubin(
        &self,
        program: &Program,
        defines: &Defines,
        arch: Arch,
    ) -> Result<(String, Arc<Vec<u8>>)> {
        let (options, key) = self.key_for(program, defines, arch)?;
        if let Some(c) = self.cubins.lock().map_err(poisoned)?.get(&key) {
            return Ok((key, c.clone()));
        }
        let from_disk = self.dir.as_ref().and_then(|d| {
            let bytes = std::fs::read(cubin_path(d, &key)).ok()?;
            looks_like_cubin(&bytes).then_some(bytes)
        });
        let cubin = match from_disk {
            Some(b) => b,
            None => {
                let b = compile_cubin(program, &options, arch)?;
                if let Some(d) = &self.dir {
                    if let Err(e) = write_atomic(&cubin_path(d, &key), &b) {
                        tracing::warn!(error = %e, "could not write the kernel cache");
                    }
                }
                b
            }
        };
        let cubin = Arc::new(cubin);
        self.cubins
            .lock()
            .map_err(poisoned)?
            .entry(key.clone())
            .or_insert_with(|| cubin.clone());
        Ok((key, cubin))
    }

    /// The module of `program`/`defines` loaded into `ctx` (compiled for its arch).
    pub fn module(
        &self,
        ctx: &Arc<CudaContext>,
        program: &Program,
        defines: &Defines,
    ) -> Result<(String, Arc<CudaModule>)> {
        let arch = Arch::of(ctx)?;
        let (key, cubin) = self.cubin(program, defines, arch)?;
        let mk = (ctx.cu_ctx() as usize, key.clone());
        if let Some(m) = self.modules.lock().map_err(poisoned)?.get(&mk) {
            return Ok((key, m.clone()));
        }
        let module = ctx.load_module(Ptx::from_binary(cubin.to_vec()))?;
        let module = self
            .modules
            .lock()
            .map_err(poisoned)?
            .entry(mk)
            .or_insert(module)
            .clone();
        Ok((key, module))
    }

    /// Kernel `name` of `program`/`defines` in `ctx`.
    pub fn function(
        &self,
        ctx: &Arc<CudaContext>,
        program: &Program,
        defines: &Defines,
        name: &str,
    ) -> Result<CudaFunction> {
        let (key, module) = self.module(ctx, program, defines)?;
        let fk = (ctx.cu_ctx() as usize, key, name.to_string());
        if let Some(f) = self.functions.lock().map_err(poisoned)?.get(&fk) {
            return Ok(f.clone());
        }
        let f = module.load_function(name)?;
        self.functions
            .lock()
            .map_err(poisoned)?
            .entry(fk)
            .or_insert_with(|| f.clone());
        Ok(f)
    }
}

/// Addresses and lengths of a program's texts when all of them are `'static`.
fn static_identity(p: &Program) -> Option<Vec<(usize, usize)>> {
    let mut id = Vec::with_capacity(2 + 2 * p.headers.len());
    let mut add = |c: &Cow<'static, str>| match c {
        Cow::Borrowed(s) => {
            id.push((s.as_ptr() as usize, s.len()));
            true
        }
        Cow::Owned(_) => false,
    };
    if !add(&p.name) || !add(&p.source) {
        return None;
    }
    for (n, c) in &p.headers {
        if !add(n) || !add(c) {
            return None;
        }
    }
    Some(id)
}

fn poisoned<T>(_: std::sync::PoisonError<T>) -> Error {
    Error::Invalid("kernel cache lock poisoned by a panicking thread".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prog(src: &'static str) -> Program {
        Program {
            name: "t.cu".into(),
            source: src.into(),
            headers: vec![("h.cuh".into(), "#define X 1".into())],
        }
    }

    #[test]
    fn embedded_programs_get_a_key_memo_owned_ones_do_not() {
        let p = prog("static");
        assert!(static_identity(&p).is_some());
        let mut owned = prog("x");
        owned.source = Cow::Owned("x".to_string());
        assert!(static_identity(&owned).is_none());
        let mut owned_header = prog("x");
        owned_header
            .headers
            .push((Cow::Borrowed("h2"), Cow::Owned("y".into())));
        assert!(static_identity(&owned_header).is_none());
        // Different texts at different addresses give different identities.
        assert_ne!(static_identity(&prog("a")), static_identity(&prog("bb")));
    }

    #[test]
    fn arch_targets() {
        assert_eq!(Arch::SM90.target(), "sm_90a");
        assert_eq!(Arch::SM80.target(), "sm_80");
        assert_eq!(Arch { major: 8, minor: 9 }.target(), "sm_89");
        assert_eq!(
            Arch {
                major: 10,
                minor: 0
            }
            .target(),
            "sm_100"
        );
    }

    #[test]
    fn options_are_ordered_and_complete() {
        let mut d = Defines::new();
        d.insert("BM".into(), "128".into());
        d.insert("A_FLAG".into(), String::new());
        let o = compile_options(Arch::SM90, &["-I/x".to_string()], &d);
        assert_eq!(
            o,
            vec![
                "-std=c++17",
                "-default-device",
                "-lineinfo",
                "--gpu-architecture=sm_90a",
                "-I/x",
                "-DA_FLAG",
                "-DBM=128"
            ]
        );
    }

    #[test]
    fn key_changes_with_every_input() {
        let p = prog("a");
        let o = vec!["-DX=1".to_string()];
        let base = cache_key(&p, &o, (13, 0), Arch::SM90);
        assert_eq!(base.len(), 64);
        assert!(base.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(
            base,
            cache_key(&p, &o, (13, 0), Arch::SM90),
            "deterministic"
        );
        assert_ne!(
            base,
            cache_key(&prog("b"), &o, (13, 0), Arch::SM90),
            "source"
        );
        let mut p2 = prog("a");
        p2.headers[0].1 = "#define X 2".into();
        assert_ne!(base, cache_key(&p2, &o, (13, 0), Arch::SM90), "header");
        assert_ne!(
            base,
            cache_key(&p, &["-DX=2".to_string()], (13, 0), Arch::SM90),
            "options"
        );
        assert_ne!(
            base,
            cache_key(&p, &o, (13, 1), Arch::SM90),
            "nvrtc version"
        );
        assert_ne!(base, cache_key(&p, &o, (13, 0), Arch::SM80), "arch");
        // Field boundaries matter: moving a byte between two options changes the key.
        let split1 = vec!["-DA".to_string(), "B".to_string()];
        let split2 = vec!["-D".to_string(), "AB".to_string()];
        assert_ne!(
            cache_key(&p, &split1, (13, 0), Arch::SM90),
            cache_key(&p, &split2, (13, 0), Arch::SM90)
        );
    }

    #[test]
    fn cache_dir_resolution() {
        assert_eq!(
            cache_dir_from(Some("/tmp/c".into()), Some("/home/u/.cache".into())),
            Some(PathBuf::from("/tmp/c"))
        );
        assert_eq!(
            cache_dir_from(Some("".into()), Some("/home/u/.cache".into())),
            Some(PathBuf::from("/home/u/.cache/comet-rs"))
        );
        assert_eq!(
            cache_dir_from(None, Some("/home/u/.cache".into())),
            Some(PathBuf::from("/home/u/.cache/comet-rs"))
        );
        assert_eq!(cache_dir_from(None, None), None);
    }

    #[test]
    fn atomic_write_and_cubin_check() {
        let dir = std::env::temp_dir().join(format!("comet-kernels-test-{}", std::process::id()));
        let path = cubin_path(&dir, "abc");
        let mut fake = b"\x7fELF".to_vec();
        fake.resize(100, 7);
        write_atomic(&path, &fake).unwrap();
        let back = std::fs::read(&path).unwrap();
        assert_eq!(back, fake);
        assert!(looks_like_cubin(&back));
        assert!(!looks_like_cubin(&back[..10]), "truncated");
        assert!(!looks_like_cubin(
            b"garbage garbage garbage garbage garbage garbage garbage garbage garbage"
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn write_into_unwritable_location_is_an_io_error() {
        // A path below a regular file cannot be created.
        let file = std::env::temp_dir().join(format!("comet-kernels-file-{}", std::process::id()));
        std::fs::write(&file, b"x").unwrap();
        let err = write_atomic(&file.join("sub").join("k.cubin"), b"data").unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
        assert!(err.to_string().contains("comet-kernels-file"), "{err}");
        std::fs::remove_file(&file).unwrap();
    }
}
