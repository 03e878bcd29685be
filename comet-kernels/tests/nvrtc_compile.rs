//! Compiles every kernel variant through NVRTC for sm_90a and sm_80 (no GPU needed, but the
//! NVRTC library and CUDA headers are). Run with
//! `LD_LIBRARY_PATH=/usr/local/cuda/lib CUDA_HOME=/usr/local/cuda cargo test -p comet-kernels
//! --test nvrtc_compile -- --ignored`; set `COMET_DUMP_CUBINS=<dir>` to keep the cubins for
//! `cuobjdump --dump-resource-usage`.

use comet_kernels::buffer::DType;
use comet_kernels::cache::{Arch, Defines, KernelCache, Program};
use comet_kernels::gemm::{self, Epilogue, GemmDesc, GemmKind, Meta, TileShape};
use comet_kernels::{sm90, sources};

fn compile(cache: &KernelCache, program: &Program, defines: &Defines, arch: Arch, tag: &str) {
    let (key, cubin) = cache
        .cubin(program, defines, arch)
        .unwrap_or_else(|e| panic!("{tag}: {e}"));
    assert!(
        comet_kernels::cache::looks_like_cubin(&cubin),
        "{tag}: not a cubin"
    );
    if let Some(dir) = std::env::var_os("COMET_DUMP_CUBINS") {
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(format!("{tag}-{}-{}.cubin", arch.target(), &key[..8])),
            &*cubin,
        )
        .unwrap();
    }
}

fn gemm_desc(kind: GemmKind, epi: Epilogue, dtype: DType, out: DType, tile: TileShape) -> GemmDesc {
    let (g, rows, n, k) = (4, 256, 256, 128);
    let (a, b, c) = match kind {
        GemmKind::Forward => (
            [rows, k].to_vec(),
            [g, n, k].to_vec(),
            [rows, if epi == Epilogue::SwiGlu { n / 2 } else { n }].to_vec(),
        ),
        GemmKind::Dgrad => ([rows, n].to_vec(), [g, n, k].to_vec(), [rows, k].to_vec()),
        GemmKind::Wgrad => ([rows, n].to_vec(), [rows, k].to_vec(), [g, n, k].to_vec()),
    };
    GemmDesc {
        kind,
        a: Meta::new(dtype, &a),
        b: Meta::new(dtype, &b),
        offsets: Some(Meta::new(DType::I32, &[g + 1])),
        c: Meta::new(out, &c),
        epilogue: epi,
        aux: None,
        row_scale: None,
        tile_list_len: None,
        tile,
    }
}

#[test]
#[ignore = "needs NVRTC"]
fn every_kernel_compiles() {
    let cache = KernelCache::new(None);
    let variants = [
        (GemmKind::Forward, Epilogue::None),
        (GemmKind::Forward, Epilogue::SwiGlu),
        (GemmKind::Forward, Epilogue::Gelu),
        (GemmKind::Dgrad, Epilogue::None),
        (GemmKind::Wgrad, Epilogue::None),
    ];
    for (name, tile) in TileShape::ALL {
        for (kind, epi) in variants {
            for out in [DType::BF16, DType::F32] {
                let plan = gemm::plan(&gemm_desc(kind, epi, DType::BF16, out, tile)).unwrap();
                compile(
                    &cache,
                    &gemm::program(),
                    &plan.defines,
                    Arch::SM90,
                    &format!("gemm-{name}-{kind:?}-{epi:?}-{out}"),
                );
            }
        }
    }
    for (kind, epi) in variants {
        let plan = gemm::plan(&gemm_desc(
            kind,
            epi,
            DType::F16,
            DType::F16,
            TileShape::T128X128,
        ))
        .unwrap();
        compile(
            &cache,
            &gemm::program(),
            &plan.defines,
            Arch::SM90,
            &format!("gemm-f16-{kind:?}-{epi:?}"),
        );
        compile(
            &cache,
            &gemm::program(),
            &plan.defines,
            Arch::SM80,
            &format!("gemm-f16-{kind:?}-{epi:?}"),
        );
        let plan = gemm::plan(&gemm_desc(
            kind,
            epi,
            DType::BF16,
            DType::BF16,
            TileShape::T128X128,
        ))
        .unwrap();
        compile(
            &cache,
            &gemm::program(),
            &plan.defines,
            Arch::SM80,
            &format!("gemm-bf16-{kind:?}-{epi:?}"),
        );
    }
    for arch in [Arch::SM90, Arch::SM80] {
        for f16 in [false, true] {
            let mut d = Defines::new();
            if f16 {
                d.insert("COMET_F16".into(), String::new());
            }
            for (n, src) in [
                ("rows.cu", sources::ROWS_CU),
                ("activation.cu", sources::ACTIVATION_CU),
                ("routing.cu", sources::ROUTING_CU),
            ] {
                compile(
                    &cache,
                    &sources::program(n, src),
                    &d,
                    arch,
                    &format!("{n}-f16{f16}"),
                );
            }
            for epl in [1, 2, 8, 32] {
                let mut d = d.clone();
                d.insert("ROUTER_EPL".into(), epl.to_string());
                compile(
                    &cache,
                    &sources::program("router.cu", sources::ROUTER_CU),
                    &d,
                    arch,
                    &format!("router-epl{epl}-f16{f16}"),
                );
            }
        }
    }
}

/// Every specialisation the GPU tests and `gemm_bench` use on sm_90a.
fn sm90_variants() -> Vec<(Program, Defines, String)> {
    let mut v = Vec::new();
    let kinds = [
        (GemmKind::Forward, Epilogue::None),
        (GemmKind::Forward, Epilogue::SwiGlu),
        (GemmKind::Forward, Epilogue::Gelu),
        (GemmKind::Dgrad, Epilogue::None),
        (GemmKind::Wgrad, Epilogue::None),
    ];
    for (name, tile) in TileShape::ALL {
        for (kind, epi) in kinds {
            for dtype in [DType::BF16, DType::F16] {
                for out in [dtype, DType::F32] {
                    let plan = gemm::plan(&gemm_desc(kind, epi, dtype, out, tile)).unwrap();
                    v.push((
                        gemm::program(),
                        plan.defines,
                        format!("gemm-{name}-{kind:?}-{epi:?}-{dtype}-{out}"),
                    ));
                }
            }
        }
    }
    for f16 in [false, true] {
        let mut d = Defines::new();
        if f16 {
            d.insert("COMET_F16".into(), String::new());
        }
        for (n, src) in [
            ("rows.cu", sources::ROWS_CU),
            ("activation.cu", sources::ACTIVATION_CU),
        ] {
            v.push((sources::program(n, src), d.clone(), format!("{n}-f16{f16}")));
        }
        for epl in 1..=32 {
            let mut d = d.clone();
            d.insert("ROUTER_EPL".into(), epl.to_string());
            v.push((
                sources::program("router.cu", sources::ROUTER_CU),
                d,
                format!("router-epl{epl}-f16{f16}"),
            ));
        }
    }
    v.push((
        sources::program("routing.cu", sources::ROUTING_CU),
        Defines::new(),
        "routing".into(),
    ));
    v.push((
        sources::program("init.cu", sources::INIT_CU),
        Defines::new(),
        "init".into(),
    ));
    // The Hopper engine: every named configuration, with and without the L2 hint (what
    // `Sm90Config::choose` and the sm90 tests pick), for every (kind, epilogue) it takes.
    for (name, cfg) in sm90::Sm90Config::ALL {
        for l2_hint in [false, true] {
            let cfg = sm90::Sm90Config { l2_hint, ..cfg };
            for (kind, epi) in kinds {
                if cfg.validate(kind, epi).is_err() {
                    continue;
                }
                for f16 in [false, true] {
                    v.push((
                        sm90::program(),
                        cfg.defines(kind, epi, f16, f16),
                        format!("sm90-{name}-hint{l2_hint}-{kind:?}-{epi:?}-f16{f16}"),
                    ));
                }
                // Store variants (bf16 inputs): f32 output, f32 accumulate, pre-activation.
                for store in sm90_stores() {
                    if cfg.validate_store(kind, epi, store).is_ok() {
                        v.push((
                            sm90::program(),
                            cfg.defines_store(kind, epi, false, store),
                            format!("sm90-{name}-hint{l2_hint}-{kind:?}-{epi:?}-{store:?}"),
                        ));
                    }
                }
            }
        }
    }
    // Ping-pong with the TMA-store epilogue (weight gradients; sm90 wgrad test), f32 output.
    let tspp = sm90::Sm90Config {
        tma_store: true,
        ..sm90::Sm90Config::PINGPONG_128
    };
    for store in sm90_stores() {
        if tspp
            .validate_store(GemmKind::Wgrad, Epilogue::None, store)
            .is_ok()
        {
            v.push((
                sm90::program(),
                tspp.defines_store(GemmKind::Wgrad, Epilogue::None, false, store),
                format!("sm90-tspp128-Wgrad-{store:?}"),
            ));
        }
    }
    // The f16 store variants the sm90 GPU tests run.
    let [_, acc, aux] = sm90_stores();
    let hinted = |c: sm90::Sm90Config| sm90::Sm90Config { l2_hint: true, ..c };
    for (cfg, kind, epi, store) in [
        (
            hinted(sm90::Sm90Config::COOP_256),
            GemmKind::Wgrad,
            Epilogue::None,
            acc,
        ),
        (
            hinted(sm90::Sm90Config::COOP_256_C2),
            GemmKind::Forward,
            Epilogue::SwiGlu,
            aux,
        ),
    ] {
        v.push((
            sm90::program(),
            cfg.defines_store(kind, epi, true, store),
            format!("sm90-{cfg:?}-{kind:?}-{epi:?}-{store:?}-f16"),
        ));
    }
    v
}

/// The Hopper engine's non-default stores: f32, f32 accumulate, pre-activation.
fn sm90_stores() -> [sm90::Sm90Store; 3] {
    let f32_out = sm90::Sm90Store {
        f32_out: true,
        ..Default::default()
    };
    [
        f32_out,
        sm90::Sm90Store {
            accumulate: true,
            ..f32_out
        },
        sm90::Sm90Store {
            aux: true,
            ..Default::default()
        },
    ]
}

/// Fills the on-disk cache (`COMET_CACHE_DIR`) with every sm_90a specialisation, so a GPU
/// host with the same toolkit path and NVRTC version finds them compiled.
#[test]
#[ignore = "needs NVRTC"]
fn warm_cache() {
    let cache = KernelCache::new(comet_kernels::cache::default_cache_dir());
    let started = std::time::Instant::now();
    let all = sm90_variants();
    // The 256-row tiles (`SM90_BM=256`) are among them, through `Sm90Config::ALL`.
    let tall = all
        .iter()
        .filter(|(_, d, _)| d.get("SM90_BM").map(String::as_str) == Some("256"))
        .count();
    assert!(tall >= 40, "{tall} specialisations with 256-row tiles");
    for (p, d, tag) in &all {
        compile(&cache, p, d, Arch::SM90, tag);
    }
    eprintln!(
        "{} specialisations in {:.1}s into {:?}",
        all.len(),
        started.elapsed().as_secs_f64(),
        cache.dir()
    );
}

#[test]
#[ignore = "needs NVRTC"]
fn compile_errors_carry_the_log() {
    let cache = KernelCache::new(None);
    let bad = sources::external_program(
        "bad.cu",
        "#include \"comet/common.cuh\"\n__global__ void k() { undeclared_thing(); }\n",
    );
    let err = cache.cubin(&bad, &Defines::new(), Arch::SM90).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, comet_kernels::Error::Compile { .. }), "{msg}");
    assert!(msg.contains("undeclared_thing"), "{msg}");
    assert!(msg.contains("sm_90a"), "{msg}");
}

#[test]
#[ignore = "needs NVRTC"]
fn disk_cache_round_trip() {
    let dir = std::env::temp_dir().join(format!("comet-cache-test-{}", std::process::id()));
    let p = sources::program("rows.cu", sources::ROWS_CU);
    let first = KernelCache::new(Some(dir.clone()));
    let (key, cubin) = first.cubin(&p, &Defines::new(), Arch::SM90).unwrap();
    let file = dir.join(format!("{key}.cubin"));
    assert_eq!(std::fs::read(&file).unwrap(), *cubin);
    // A second cache finds it on disk; a corrupted file is recompiled and replaced.
    let second = KernelCache::new(Some(dir.clone()));
    assert_eq!(
        *second.cubin(&p, &Defines::new(), Arch::SM90).unwrap().1,
        *cubin
    );
    std::fs::write(&file, b"junk").unwrap();
    let third = KernelCache::new(Some(dir.clone()));
    assert_eq!(
        *third.cubin(&p, &Defines::new(), Arch::SM90).unwrap().1,
        *cubin
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
