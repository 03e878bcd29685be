//! CPU tests of the interop reader and writer (the GPU run is exercised on a GPU host by
//! `comet-bench check` against `bench/torch_reference.py`).

use super::*;
use ndarray::{Array2, Array3};

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("comet-check-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const CONFIG: &str = r#"{"hidden": 16, "ffn": 8, "experts": 4, "top_k": 2,
  "activation": "swiglu", "renormalize": true, "world": 2, "tokens_per_rank": 3,
  "dtype": "bf16", "seed": 5, "preset": "custom", "format_version": 1, "extra": [1, 2]}"#;

fn bf16_values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let v = ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2001) as f32 / 1000.0
                - 1.0;
            f32::from_bits(v.to_bits() & 0xffff_0000)
        })
        .collect()
}

fn write_dir(dir: &Path, config: &str) {
    std::fs::write(dir.join("config.json"), config).unwrap();
    let a2 = |r, c, s| Array2::from_shape_vec((r, c), bf16_values(r * c, s)).unwrap();
    let a3 = |a, b, c, s| Array3::from_shape_vec((a, b, c), bf16_values(a * b * c, s)).unwrap();
    ndarray_npy::write_npy(dir.join("x.npy"), &a2(6, 16, 1)).unwrap();
    ndarray_npy::write_npy(dir.join("wr.npy"), &a2(4, 16, 2)).unwrap();
    ndarray_npy::write_npy(dir.join("w0.npy"), &a3(4, 16, 16, 3)).unwrap();
    ndarray_npy::write_npy(dir.join("w1.npy"), &a3(4, 16, 8, 4)).unwrap();
    ndarray_npy::write_npy(dir.join("dy.npy"), &a2(6, 16, 5)).unwrap();
}

#[test]
fn config_is_parsed_and_unknown_keys_ignored() {
    let c = InteropConfig::parse(Path::new("c.json"), CONFIG).unwrap();
    assert_eq!(
        (
            c.hidden,
            c.ffn,
            c.experts,
            c.top_k,
            c.world,
            c.tokens_per_rank
        ),
        (16, 8, 4, 2, 2, 3)
    );
    assert_eq!(c.activation, Activation::SwiGlu);
    assert!(c.renormalize);
    let l = c.layer().unwrap();
    assert_eq!(l.n0(), 16);
}

#[test]
fn bad_configs_name_the_key_and_the_rule() {
    let bad = |from: &str, to: &str| {
        let text = CONFIG.replace(from, to);
        InteropConfig::parse(Path::new("cfg.json"), &text)
            .unwrap_err()
            .to_string()
    };
    let e = bad(r#""hidden": 16, "#, "");
    assert!(
        e.contains("cfg.json") && e.contains("\"hidden\" is missing"),
        "{e}"
    );
    let e = bad(r#""ffn": 8"#, r#""ffn": "8""#);
    assert!(e.contains("ffn = \"8\""), "{e}");
    let e = bad(r#""top_k": 2"#, r#""top_k": 5"#);
    assert!(e.contains("top_k = 5 exceeds experts = 4"), "{e}");
    let e = bad(r#""world": 2"#, r#""world": 3"#);
    assert!(e.contains("not divisible by world = 3"), "{e}");
    let e = bad(r#""dtype": "bf16""#, r#""dtype": "f32""#);
    assert!(e.contains("only \"bf16\""), "{e}");
    let e = bad(r#""activation": "swiglu""#, r#""activation": "relu""#);
    assert!(e.contains("\"relu\""), "{e}");
    let e = bad(r#""renormalize": true"#, r#""renormalize": 1"#);
    assert!(e.contains("renormalize = 1"), "{e}");
    let e = bad(r#""tokens_per_rank": 3"#, r#""tokens_per_rank": 0"#);
    assert!(e.contains("tokens_per_rank = 0"), "{e}");
    let e = InteropConfig::parse(Path::new("cfg.json"), "{oops").unwrap_err();
    assert!(matches!(e, Error::Json { .. }), "{e}");
}

#[test]
fn inputs_are_read_and_checked_against_the_config() {
    let dir = tmp("read");
    write_dir(&dir, CONFIG);
    let inp = read_inputs(&dir).unwrap();
    assert_eq!(inp.x.dim(), (6, 16));
    assert_eq!(inp.w0.dim(), (4, 16, 16));
    // A shape that disagrees with the config names the file.
    ndarray_npy::write_npy(dir.join("w1.npy"), &Array3::<f32>::zeros((4, 16, 9))).unwrap();
    let e = read_inputs(&dir).unwrap_err().to_string();
    assert!(e.contains("w1.npy") && e.contains("[4, 16, 9]"), "{e}");
    // A value that is not bf16-representable.
    write_dir(&dir, CONFIG);
    let mut x = Array2::<f32>::zeros((6, 16));
    x[[2, 3]] = 0.1;
    x[[4, 1]] = f32::NAN;
    ndarray_npy::write_npy(dir.join("x.npy"), &x).unwrap();
    let e = read_inputs(&dir).unwrap_err().to_string();
    assert!(
        e.contains("x.npy") && e.contains("1 non-finite and 1 not bf16"),
        "{e}"
    );
    // A missing file.
    std::fs::remove_file(dir.join("dy.npy")).unwrap();
    let e = read_inputs(&dir).unwrap_err().to_string();
    assert!(e.contains("dy.npy"), "{e}");
    // i32 where f32 is required.
    write_dir(&dir, CONFIG);
    ndarray_npy::write_npy(dir.join("wr.npy"), &Array2::<i32>::zeros((4, 16))).unwrap();
    let e = read_inputs(&dir).unwrap_err().to_string();
    assert!(e.contains("wr.npy"), "{e}");
}

#[test]
fn outputs_follow_interop_section_2() {
    let dir = tmp("write");
    let c = InteropConfig::parse(Path::new("c.json"), CONFIG).unwrap();
    let (m, k, h, l, n0, f) = (3, 2, 16, 2, 16, 8);
    let rank = |r: usize| RankOutput {
        ids: (0..m * k).map(|i| ((i + r) % 4) as i32).collect(),
        weights: vec![0.5; m * k],
        y: vec![r as f32 + 1.0; m * h],
        dx: vec![r as f32 - 1.0; m * h],
        dwr: vec![1.0 + r as f32; 4 * h],
        dw0: vec![r as f32; l * n0 * h],
        dw1: vec![10.0 + r as f32; l * h * f],
    };
    let files = write_outputs(
        &dir,
        &c,
        &[rank(0), rank(1)],
        &serde_json::json!({"impl": "x"}),
    )
    .unwrap();
    assert_eq!(files.len(), 8);
    let ids: Array2<i32> = ndarray_npy::read_npy(dir.join("topk_ids.npy")).unwrap();
    assert_eq!(ids.dim(), (6, 2));
    assert_eq!(ids[[3, 0]], 1, "rank 1's rows follow rank 0's");
    let y: Array2<f32> = ndarray_npy::read_npy(dir.join("y.npy")).unwrap();
    assert_eq!((y[[0, 0]], y[[5, 15]]), (1.0, 2.0));
    let dwr: Array2<f32> = ndarray_npy::read_npy(dir.join("dwr.npy")).unwrap();
    assert!(dwr.iter().all(|&v| v == 3.0), "dwr summed over ranks");
    let dw0: Array3<f32> = ndarray_npy::read_npy(dir.join("dw0.npy")).unwrap();
    assert_eq!(dw0.dim(), (4, 16, 16));
    assert_eq!(
        (dw0[[1, 0, 0]], dw0[[2, 0, 0]]),
        (0.0, 1.0),
        "global expert order"
    );
    let dw1: Array3<f32> = ndarray_npy::read_npy(dir.join("dw1.npy")).unwrap();
    assert_eq!(dw1.dim(), (4, 16, 8));
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["impl"], "x");
    // A rank output of the wrong size is an error, not a panic.
    let mut short = rank(1);
    short.y.pop();
    let e = write_outputs(&dir, &c, &[rank(0), short], &Value::Null).unwrap_err();
    assert!(
        e.to_string().contains("y: rank outputs of the wrong size"),
        "{e}"
    );
    let e = write_outputs(&dir, &c, &[rank(0)], &Value::Null).unwrap_err();
    assert!(
        e.to_string().contains("1 rank outputs for world = 2"),
        "{e}"
    );
}

#[test]
fn without_enough_gpus_check_says_so() {
    if !crate::probe::probe().devices.is_empty() {
        return; // a GPU host runs the real check (bench/torch/run_gpu.sh)
    }
    let dir = tmp("nogpu");
    write_dir(&dir, CONFIG);
    let opts = CheckOptions {
        strategy: Strategy::Sequential,
        engine: GemmEngine::Auto,
    };
    let e = check(&dir, &dir.join("out"), &opts).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Gpus {
                needed: 2,
                found: 0,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("world = 2 in config.json"), "{e}");
}
