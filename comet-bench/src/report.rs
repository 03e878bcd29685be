//! Benchmark reports: each rank's JSON, gathered into one result set, printed as a table
//! (strategies × presets), written as `<date>-<gpu>x<n>.json` and an SVG chart.
//!
//! # Rank report (what `comet-bench run --json PATH` writes, one file per rank)
//!
//! ```json
//! { "schema": "comet-bench/rank/1", "rank": 0, "world_size": 2, "gpu_name": "NVIDIA H200",
//!   "dense_gemm_tflops": 795.0, "git_commit": "abc123",
//!   "cases": [ { "preset": "mixtral-8x7b", "strategy": "sequential", "tokens_per_rank": 8192,
//!                "dtype": "bf16", "backward": false, "iterations": 20, "median_ms": 3.2,
//!                "phases_ms": { "routing": 0.1, "dispatch": 0.9, "experts": 1.5, "combine": 0.7 },
//!                "flops": 1.2e12, "comm_bytes": 1.1e8 } ] }
//! ```
//!
//! `flops` is the expert-GEMM work this rank did in one iteration, `comm_bytes` the bytes it
//! sent to other ranks in one iteration; both optional.
//!
//! The PyTorch baseline's record (`bench/torch_reference.py bench --json`, bench/INTEROP.md
//! §8, `"impl": "torch"`) is accepted beside the rank reports: it is already gathered over
//! its ranks and becomes the `pytorch` strategy's forward (and forward + backward) cases; its
//! phases are means over ranks and its communication rate uses the mean rank's bytes.
//!
//! # Gathering
//! A case (preset, strategy, tokens, dtype, forward/backward) must be reported by every rank
//! `0..world_size` exactly once. Its layer time is the slowest rank's median; phases likewise
//! (max over ranks). TFLOP/s per GPU = Σ flops / time / world. Ratio to the compute floor =
//! time / max over ranks of (flops / dense GEMM rate measured in the same run). Comm GB/s =
//! the busiest rank's bytes / time. Share of communication hidden (comet-rs's overlapping
//! strategies) = (t_sequential − t) / (Sequential's dispatch + combine time).

use crate::run::{LEGACY_STORES_SUFFIX, MMA_WGRAD_SUFFIX};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Schema tag of a rank report.
pub const RANK_SCHEMA: &str = "comet-bench/rank/1";
/// Schema tag of a gathered results file.
pub const RESULTS_SCHEMA: &str = "comet-bench/results/1";

/// One rank's benchmark report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankReport {
    /// [`RANK_SCHEMA`].
    pub schema: String,
    /// This rank.
    pub rank: usize,
    /// Number of ranks in the run.
    pub world_size: usize,
    /// The GPU's name, e.g. "NVIDIA H200".
    pub gpu_name: String,
    /// Dense bf16 GEMM rate measured in the same run (TFLOP/s), for the compute floor.
    #[serde(default)]
    pub dense_gemm_tflops: Option<f64>,
    /// Commit the binary was built from.
    #[serde(default)]
    pub git_commit: Option<String>,
    /// The measured cases.
    pub cases: Vec<CaseResult>,
}

/// One measured case on one rank.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseResult {
    /// Preset name (or a custom shape's label).
    pub preset: String,
    /// Strategy: sequential, pipelined, comet, pytorch, ...
    pub strategy: String,
    /// Tokens on each rank.
    pub tokens_per_rank: usize,
    /// Data type, e.g. "bf16".
    pub dtype: String,
    /// Whether forward + backward was timed (else forward only).
    pub backward: bool,
    /// Timed iterations.
    pub iterations: usize,
    /// Median time of one layer call on this rank, ms.
    pub median_ms: f64,
    /// Median time per phase (routing, dispatch, experts, combine, ...), ms.
    #[serde(default)]
    pub phases_ms: BTreeMap<String, f64>,
    /// Expert-GEMM floating-point operations this rank did per iteration.
    #[serde(default)]
    pub flops: Option<f64>,
    /// Bytes this rank sent to other ranks per iteration.
    #[serde(default)]
    pub comm_bytes: Option<f64>,
}

/// What identifies a case across ranks.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CaseKey {
    /// Preset.
    pub preset: String,
    /// Strategy.
    pub strategy: String,
    /// Tokens per rank.
    pub tokens_per_rank: usize,
    /// Data type.
    pub dtype: String,
    /// Forward + backward.
    pub backward: bool,
}

impl CaseKey {
    fn of(c: &CaseResult) -> Self {
        CaseKey {
            preset: c.preset.clone(),
            strategy: c.strategy.clone(),
            tokens_per_rank: c.tokens_per_rank,
            dtype: c.dtype.clone(),
            backward: c.backward,
        }
    }

    /// The group a case is tabulated in (all but preset and strategy).
    fn group(&self) -> Group {
        (self.tokens_per_rank, self.dtype.clone(), self.backward)
    }
}

impl std::fmt::Display for CaseKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}/{} tokens/{}/{}",
            self.preset,
            self.strategy,
            self.tokens_per_rank,
            self.dtype,
            if self.backward { "fwd+bwd" } else { "fwd" }
        )
    }
}

type Group = (usize, String, bool);

/// One case over all ranks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatheredCase {
    /// The case.
    #[serde(flatten)]
    pub key: CaseKey,
    /// Layer time: the slowest rank's median, ms.
    pub ms: f64,
    /// Each rank's median, ms (empty for a baseline record gathered elsewhere).
    pub ms_per_rank: Vec<f64>,
    /// Per phase, the slowest rank's median, ms.
    pub phases_ms: BTreeMap<String, f64>,
    /// Expert-GEMM TFLOP/s per GPU.
    pub tflops_per_gpu: Option<f64>,
    /// Layer time over the compute floor (≥ 1 unless the floor was mis-measured).
    pub floor_ratio: Option<f64>,
    /// The busiest rank's sent bytes over the layer time, GB/s.
    pub comm_gb_s: Option<f64>,
    /// Share of Sequential's communication time hidden: (t_seq − t) / t_comm_seq.
    pub comm_hidden: Option<f64>,
}

/// A gathered benchmark run: what `<date>-<gpu>x<n>.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Results {
    /// [`RESULTS_SCHEMA`].
    pub schema: String,
    /// UTC date of the report, YYYY-MM-DD.
    pub date: String,
    /// Rank 0's GPU name.
    pub gpu_name: String,
    /// Number of ranks (GPUs).
    pub world_size: usize,
    /// Commit, if the ranks reported one.
    pub git_commit: Option<String>,
    /// Every case, sorted.
    pub cases: Vec<GatheredCase>,
    /// The raw rank reports the cases came from.
    pub ranks: Vec<RankReport>,
    /// The raw PyTorch baseline records (bench/INTEROP.md §8).
    #[serde(default)]
    pub baselines: Vec<serde_json::Value>,
}

/// The record `bench/torch_reference.py bench --json` writes (bench/INTEROP.md §8): the
/// PyTorch + NCCL expert-parallel layer, already gathered over its ranks. Only the fields the
/// table needs are read; the whole record is kept in [`Results::baselines`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TorchRecord {
    /// `"torch"`.
    #[serde(rename = "impl")]
    pub implementation: String,
    /// Canonical preset name (or "custom").
    pub preset: String,
    /// Tokens per rank.
    pub tokens_per_rank: usize,
    /// Ranks.
    pub world: usize,
    /// GPU name.
    pub gpu: String,
    /// Data type.
    pub dtype: String,
    /// Median forward time, max over ranks, ms.
    pub forward_ms: f64,
    /// Forward phases, ms (mean over ranks).
    #[serde(default)]
    pub phases: BTreeMap<String, f64>,
    /// Expert-GEMM TFLOP/s per GPU, forward.
    #[serde(default)]
    pub tflops: Option<f64>,
    /// Compute floor over forward time (≤ 1).
    #[serde(default)]
    pub ratio_to_floor: Option<f64>,
    /// Communication volume.
    #[serde(default)]
    pub comm: Option<TorchComm>,
    /// Median forward + backward time, max over ranks, ms (with `--backward`).
    #[serde(default)]
    pub fwd_bwd_ms: Option<f64>,
    /// Forward phases in the training loop, ms.
    #[serde(default)]
    pub phases_train: BTreeMap<String, f64>,
    /// Expert-GEMM TFLOP/s per GPU, forward + backward.
    #[serde(default)]
    pub tflops_fwd_bwd: Option<f64>,
    /// Compute floor over forward + backward time.
    #[serde(default)]
    pub ratio_to_floor_fwd_bwd: Option<f64>,
    /// Commit.
    #[serde(default)]
    pub git_commit: Option<String>,
}

/// `comm` of a [`TorchRecord`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TorchComm {
    /// Bytes sent to other ranks per rank and iteration (mean over ranks).
    pub remote_bytes: f64,
}

/// An input of `comet-bench report`.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A comet-bench rank report.
    Rank(RankReport),
    /// A PyTorch baseline record, with its raw JSON.
    Torch(TorchRecord, serde_json::Value),
}

/// Read a rank report or a PyTorch record (told apart by `"impl": "torch"`).
pub fn read_input(path: &Path) -> Result<Input> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let json = |source| Error::Json {
        path: path.to_path_buf(),
        source,
    };
    let value: serde_json::Value = serde_json::from_str(&text).map_err(json)?;
    if value.get("impl").and_then(|v| v.as_str()) == Some("torch") {
        let rec = serde_json::from_value(value.clone()).map_err(json)?;
        Ok(Input::Torch(rec, value))
    } else {
        Ok(Input::Rank(serde_json::from_value(value).map_err(json)?))
    }
}

/// Read a rank report.
pub fn read_rank(path: &Path) -> Result<RankReport> {
    match read_input(path)? {
        Input::Rank(r) => Ok(r),
        Input::Torch(..) => Err(Error::Schema {
            path: path.to_path_buf(),
            found: "torch".into(),
            expected: RANK_SCHEMA,
        }),
    }
}

/// The table cases of a PyTorch record: forward, and forward + backward when timed.
fn torch_cases(path: &Path, t: &TorchRecord) -> Result<Vec<GatheredCase>> {
    let mut out = Vec::new();
    let mut add = |backward: bool,
                   ms: f64,
                   phases: &BTreeMap<String, f64>,
                   tflops: Option<f64>,
                   ratio: Option<f64>|
     -> Result<()> {
        let key = CaseKey {
            preset: t.preset.clone(),
            strategy: "pytorch".into(),
            tokens_per_rank: t.tokens_per_rank,
            dtype: t.dtype.clone(),
            backward,
        };
        if !(ms.is_finite() && ms > 0.0) {
            return Err(Error::BadTime {
                path: path.to_path_buf(),
                case: key.to_string(),
                value: ms,
            });
        }
        out.push(GatheredCase {
            key,
            ms,
            ms_per_rank: Vec::new(),
            phases_ms: phases.clone(),
            tflops_per_gpu: tflops,
            floor_ratio: ratio.filter(|r| *r > 0.0).map(|r| 1.0 / r),
            comm_gb_s: t.comm.as_ref().map(|c| c.remote_bytes / (ms * 1e-3) / 1e9),
            comm_hidden: None,
        });
        Ok(())
    };
    add(false, t.forward_ms, &t.phases, t.tflops, t.ratio_to_floor)?;
    if let Some(fb) = t.fwd_bwd_ms {
        add(
            true,
            fb,
            &t.phases_train,
            t.tflops_fwd_bwd,
            t.ratio_to_floor_fwd_bwd,
        )?;
    }
    Ok(out)
}

/// Gather rank reports (each with the file it came from, for error messages).
pub fn gather(reports: Vec<(PathBuf, RankReport)>, date: &str) -> Result<Results> {
    gather_inputs(
        reports
            .into_iter()
            .map(|(p, r)| (p, Input::Rank(r)))
            .collect(),
        date,
    )
}

/// Gather rank reports and PyTorch baseline records.
pub fn gather_inputs(inputs: Vec<(PathBuf, Input)>, date: &str) -> Result<Results> {
    let mut reports = Vec::new();
    let mut torch = Vec::new();
    for (p, i) in inputs {
        match i {
            Input::Rank(r) => reports.push((p, r)),
            Input::Torch(t, raw) => torch.push((p, t, raw)),
        }
    }
    let mut world = None;
    let mut per_case: BTreeMap<CaseKey, BTreeMap<usize, (&CaseResult, &RankReport)>> =
        BTreeMap::new();
    for (path, r) in &reports {
        if r.schema != RANK_SCHEMA {
            return Err(Error::Schema {
                path: path.clone(),
                found: r.schema.clone(),
                expected: RANK_SCHEMA,
            });
        }
        let w = *world.get_or_insert(r.world_size);
        if r.world_size != w {
            return Err(Error::WorldMismatch {
                path: path.clone(),
                found: r.world_size,
                expected: w,
            });
        }
        if r.rank >= r.world_size {
            return Err(Error::RankOutOfRange {
                path: path.clone(),
                rank: r.rank,
                world: r.world_size,
            });
        }
        for c in &r.cases {
            let key = CaseKey::of(c);
            if !(c.median_ms.is_finite() && c.median_ms > 0.0) {
                return Err(Error::BadTime {
                    path: path.clone(),
                    case: key.to_string(),
                    value: c.median_ms,
                });
            }
            let entry = per_case.entry(key.clone()).or_default();
            if entry.insert(r.rank, (c, r)).is_some() {
                return Err(Error::DuplicateRank {
                    path: path.clone(),
                    rank: r.rank,
                    case: key.to_string(),
                });
            }
        }
    }
    for (path, t, _) in &torch {
        let w = *world.get_or_insert(t.world);
        if t.world != w {
            return Err(Error::WorldMismatch {
                path: path.clone(),
                found: t.world,
                expected: w,
            });
        }
    }
    let world = world.ok_or(Error::NoResults)?;
    if per_case.is_empty() && torch.is_empty() {
        return Err(Error::NoResults);
    }

    let mut cases = Vec::new();
    for (key, ranks) in &per_case {
        let missing: Vec<usize> = (0..world).filter(|r| !ranks.contains_key(r)).collect();
        if !missing.is_empty() {
            return Err(Error::MissingRanks {
                case: key.to_string(),
                missing,
                world,
            });
        }
        let ms_per_rank: Vec<f64> = ranks.values().map(|(c, _)| c.median_ms).collect();
        let ms = ms_per_rank.iter().copied().fold(0.0, f64::max);
        let mut phases_ms = BTreeMap::new();
        for (c, _) in ranks.values() {
            for (p, t) in &c.phases_ms {
                let e = phases_ms.entry(p.clone()).or_insert(0.0f64);
                *e = e.max(*t);
            }
        }
        let all = |f: &dyn Fn(&CaseResult, &RankReport) -> Option<f64>| -> Option<Vec<f64>> {
            ranks.values().map(|(c, r)| f(c, r)).collect()
        };
        let flops = all(&|c, _| c.flops);
        let tflops_per_gpu = flops
            .as_ref()
            .map(|f| f.iter().sum::<f64>() / (ms * 1e-3) / 1e12 / world as f64);
        let floor_ratio = all(&|c, r| Some(c.flops? / (r.dense_gemm_tflops? * 1e12) * 1e3))
            .map(|floors| ms / floors.iter().copied().fold(0.0, f64::max))
            .filter(|x| x.is_finite());
        let comm_gb_s = all(&|c, _| c.comm_bytes)
            .map(|b| b.iter().copied().fold(0.0, f64::max) / (ms * 1e-3) / 1e9);
        cases.push(GatheredCase {
            key: key.clone(),
            ms,
            ms_per_rank,
            phases_ms,
            tflops_per_gpu,
            floor_ratio,
            comm_gb_s,
            comm_hidden: None,
        });
    }
    for (path, t, _) in &torch {
        for c in torch_cases(path, t)? {
            if cases.iter().any(|o: &GatheredCase| o.key == c.key) {
                return Err(Error::DuplicateCase {
                    path: path.clone(),
                    case: c.key.to_string(),
                });
            }
            cases.push(c);
        }
    }
    cases.sort_by(|a, b| a.key.cmp(&b.key));
    // Share of Sequential's communication hidden by the other comet-rs strategies, each
    // against Sequential with the same GEMM stores (`+mma-wgrad` cases against
    // `sequential+mma-wgrad`, and older reports' `+s90` cases against `sequential+s90`), so
    // a faster or slower weight gradient is not counted as hidden communication.
    let stores_suffixes = [MMA_WGRAD_SUFFIX, LEGACY_STORES_SUFFIX];
    let baseline = |s: &str| -> String {
        match stores_suffixes.iter().find(|&&x| s.ends_with(x)) {
            Some(x) => format!("sequential{x}"),
            None => "sequential".to_string(),
        }
    };
    let is_baseline = |s: &str| s == "sequential" || baseline(s) == s;
    let seq: BTreeMap<(String, String, Group), (f64, Option<f64>)> = cases
        .iter()
        .filter(|c| is_baseline(&c.key.strategy))
        .map(|c| {
            let comm = match (c.phases_ms.get("dispatch"), c.phases_ms.get("combine")) {
                (Some(d), Some(k)) if d + k > 0.0 => Some(d + k),
                _ => None,
            };
            let key = (c.key.strategy.clone(), c.key.preset.clone(), c.key.group());
            (key, (c.ms, comm))
        })
        .collect();
    let overlapping = |s: &str| !s.starts_with("sequential") && s != "pytorch";
    for c in cases.iter_mut().filter(|c| overlapping(&c.key.strategy)) {
        let key = (
            baseline(&c.key.strategy),
            c.key.preset.clone(),
            c.key.group(),
        );
        if let Some((t_seq, Some(t_comm))) = seq.get(&key) {
            c.comm_hidden = Some((t_seq - c.ms) / t_comm);
        }
    }

    let mut ranks: Vec<RankReport> = reports.into_iter().map(|(_, r)| r).collect();
    ranks.sort_by(|a, b| (a.rank, &a.gpu_name).cmp(&(b.rank, &b.gpu_name)));
    let gpu_name = ranks
        .iter()
        .find(|r| r.rank == 0)
        .map(|r| r.gpu_name.clone())
        .or_else(|| torch.first().map(|(_, t, _)| t.gpu.clone()))
        .unwrap_or_default();
    let git_commit = ranks
        .iter()
        .find_map(|r| r.git_commit.clone())
        .or_else(|| torch.iter().find_map(|(_, t, _)| t.git_commit.clone()));
    Ok(Results {
        schema: RESULTS_SCHEMA.to_string(),
        date: date.to_string(),
        gpu_name,
        world_size: world,
        git_commit,
        cases,
        ranks,
        baselines: torch.into_iter().map(|(_, _, raw)| raw).collect(),
    })
}

/// Known strategies first, in this order; others after, alphabetically.
const STRATEGY_ORDER: &[&str] = &["sequential", "pipelined", "comet", "pytorch"];

fn order_of(names: impl IntoIterator<Item = String>, first: &[&str]) -> Vec<String> {
    let set: BTreeSet<String> = names.into_iter().collect();
    let mut out: Vec<String> = first
        .iter()
        .filter(|f| set.contains(**f))
        .map(|f| f.to_string())
        .collect();
    out.extend(set.into_iter().filter(|s| !first.contains(&s.as_str())));
    out
}

fn preset_order(results: &Results) -> Vec<String> {
    let known: Vec<&str> = comet_core::Preset::all().iter().map(|p| p.name()).collect();
    order_of(results.cases.iter().map(|c| c.key.preset.clone()), &known)
}

fn groups(results: &Results) -> Vec<Group> {
    let set: BTreeSet<Group> = results.cases.iter().map(|c| c.key.group()).collect();
    set.into_iter().collect()
}

fn find<'a>(
    results: &'a Results,
    g: &Group,
    preset: &str,
    strategy: &str,
) -> Option<&'a GatheredCase> {
    results
        .cases
        .iter()
        .find(|c| c.key.group() == *g && c.key.preset == preset && c.key.strategy == strategy)
}

/// A Markdown-style table; the first `left` columns are left-aligned, the rest right-aligned.
fn render_table(header: &[String], rows: &[Vec<String>], left: usize) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, cell) in r.iter().enumerate() {
            width[i] = width[i].max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| -> String {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i < left {
                    format!("{c:<w$}", w = width[i])
                } else {
                    format!("{c:>w$}", w = width[i])
                }
            })
            .collect();
        format!("| {} |", parts.join(" | "))
    };
    let mut out = vec![line(header)];
    out.push(format!(
        "|{}|",
        width
            .iter()
            .map(|w| "-".repeat(w + 2))
            .collect::<Vec<_>>()
            .join("|")
    ));
    out.extend(rows.iter().map(|r| line(r)));
    out.join("\n")
}

fn opt(v: Option<f64>, digits: usize, unit: &str) -> String {
    v.map(|x| format!("{x:.digits$}{unit}"))
        .unwrap_or_else(|| "-".into())
}

/// The comparison tables: per (tokens, dtype, fwd/bwd) group, strategies × presets with the
/// layer time (and TFLOP/s per GPU), then one line per case with the phases and ratios.
pub fn table(results: &Results) -> String {
    let presets = preset_order(results);
    let mut out = format!(
        "comet-rs MoE layer, {} x {}, {}{}\n",
        results.world_size,
        results.gpu_name,
        results.date,
        results
            .git_commit
            .as_deref()
            .map(|c| format!(", commit {c}"))
            .unwrap_or_default()
    );
    for g in groups(results) {
        let strategies = order_of(
            results
                .cases
                .iter()
                .filter(|c| c.key.group() == g)
                .map(|c| c.key.strategy.clone()),
            STRATEGY_ORDER,
        );
        out.push_str(&format!(
            "\n{} tokens per rank, {}, {} — layer time (slowest rank), TFLOP/s per GPU\n",
            g.0,
            g.1,
            if g.2 { "forward + backward" } else { "forward" }
        ));
        let mut header = vec!["strategy".to_string()];
        header.extend(presets.iter().cloned());
        let rows: Vec<Vec<String>> = strategies
            .iter()
            .map(|s| {
                let mut row = vec![s.clone()];
                for p in &presets {
                    row.push(match find(results, &g, p, s) {
                        Some(c) => match c.tflops_per_gpu {
                            Some(tf) => format!("{:.3} ms {:.0} TF/s", c.ms, tf),
                            None => format!("{:.3} ms", c.ms),
                        },
                        None => "-".into(),
                    });
                }
                row
            })
            .collect();
        out.push_str(&render_table(&header, &rows, 1));
        out.push('\n');

        let phase_names = order_of(
            results
                .cases
                .iter()
                .filter(|c| c.key.group() == g)
                .flat_map(|c| c.phases_ms.keys().cloned()),
            &["routing", "dispatch", "experts", "combine"],
        );
        let mut header: Vec<String> = ["preset", "strategy", "ms"].map(String::from).to_vec();
        header.extend(phase_names.iter().map(|p| format!("{p} ms")));
        header.extend(["x floor", "comm GB/s", "comm hidden"].map(String::from));
        let mut rows = Vec::new();
        for p in &presets {
            for s in &strategies {
                let Some(c) = find(results, &g, p, s) else {
                    continue;
                };
                let mut row = vec![p.clone(), s.clone(), format!("{:.3}", c.ms)];
                row.extend(
                    phase_names
                        .iter()
                        .map(|ph| opt(c.phases_ms.get(ph).copied(), 3, "")),
                );
                row.push(opt(c.floor_ratio, 2, ""));
                row.push(opt(c.comm_gb_s, 1, ""));
                row.push(opt(c.comm_hidden.map(|h| h * 100.0), 0, "%"));
                rows.push(row);
            }
        }
        out.push('\n');
        out.push_str(&render_table(&header, &rows, 2));
        out.push('\n');
    }
    out
}

/// Bar colours per strategy (sequential grey, pipelined blue, comet red, pytorch green).
fn colour(strategy: &str, i: usize) -> plotters::style::RGBColor {
    use plotters::style::{Palette, Palette99, RGBColor};
    match strategy {
        "sequential" => RGBColor(128, 128, 128),
        "pipelined" => RGBColor(31, 119, 180),
        "comet" => RGBColor(214, 39, 40),
        "pytorch" => RGBColor(44, 160, 44),
        _ => {
            let (r, g, b) = Palette99::COLORS[(i * 7) % Palette99::COLORS.len()];
            RGBColor(r, g, b)
        }
    }
}

/// An SVG chart: per group, bars of each strategy's layer time per preset, relative to
/// Sequential (or to the fastest strategy when Sequential is absent). Lower is better.
pub fn svg(results: &Results) -> Result<String> {
    use plotters::prelude::*;
    let chart_err = |e: &dyn std::fmt::Display| Error::Chart(e.to_string());
    let presets = preset_order(results);
    let groups = groups(results);
    if groups.is_empty() {
        return Err(Error::NoResults);
    }
    let strategies = order_of(
        results.cases.iter().map(|c| c.key.strategy.clone()),
        STRATEGY_ORDER,
    );
    let mut buf = String::new();
    {
        let height = 420 * groups.len() as u32;
        let root = SVGBackend::with_string(&mut buf, (960, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| chart_err(&e))?;
        let areas = root.split_evenly((groups.len(), 1));
        for (area, g) in areas.iter().zip(&groups) {
            // Relative times per (preset, strategy).
            let mut bars = Vec::new();
            let mut ymax = 0.0f64;
            for (pi, p) in presets.iter().enumerate() {
                let here: Vec<&GatheredCase> = strategies
                    .iter()
                    .filter_map(|s| find(results, g, p, s))
                    .collect();
                let base = find(results, g, p, "sequential")
                    .map(|c| c.ms)
                    .or_else(|| here.iter().map(|c| c.ms).reduce(f64::min));
                let Some(base) = base else { continue };
                for (si, s) in strategies.iter().enumerate() {
                    if let Some(c) = find(results, g, p, s) {
                        let rel = c.ms / base;
                        ymax = ymax.max(rel);
                        bars.push((pi, si, rel, c.ms));
                    }
                }
            }
            let has_seq = strategies.iter().any(|s| s == "sequential");
            let caption = format!(
                "{} x {}: {} tokens/rank, {}, {} (bar labels: ms)",
                results.world_size,
                results.gpu_name,
                g.0,
                g.1,
                if g.2 { "fwd+bwd" } else { "fwd" }
            );
            let n = presets.len() as f64;
            let mut chart = ChartBuilder::on(area)
                .caption(caption, ("sans-serif", 20))
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(64)
                .build_cartesian_2d(-0.5f64..n - 0.5, 0f64..(ymax * 1.35).max(0.1))
                .map_err(|e| chart_err(&e))?;
            let label = |x: &f64| -> String {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < presets.len() {
                    presets[i as usize].clone()
                } else {
                    String::new()
                }
            };
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(presets.len())
                .x_label_formatter(&label)
                .y_desc(if has_seq {
                    "layer time / Sequential (lower is better)"
                } else {
                    "layer time / fastest (lower is better)"
                })
                .draw()
                .map_err(|e| chart_err(&e))?;
            let slot = 0.8 / strategies.len() as f64;
            for (si, s) in strategies.iter().enumerate() {
                let col = colour(s, si);
                let rects: Vec<_> = bars
                    .iter()
                    .filter(|b| b.1 == si)
                    .map(|&(pi, _, rel, _)| {
                        let x0 = pi as f64 - 0.4 + si as f64 * slot;
                        Rectangle::new([(x0, 0.0), (x0 + slot * 0.9, rel)], col.filled())
                    })
                    .collect();
                if rects.is_empty() {
                    continue;
                }
                chart
                    .draw_series(rects)
                    .map_err(|e| chart_err(&e))?
                    .label(s.clone())
                    .legend(move |(x, y)| {
                        Rectangle::new([(x, y - 5), (x + 12, y + 5)], col.filled())
                    });
                let labels: Vec<_> = bars
                    .iter()
                    .filter(|b| b.1 == si)
                    .map(|&(pi, _, rel, ms)| {
                        let x = pi as f64 - 0.4 + (si as f64 + 0.45) * slot;
                        Text::new(
                            format!("{ms:.2}"),
                            (x, rel),
                            ("sans-serif", 11).into_font().color(&BLACK).pos(
                                plotters::style::text_anchor::Pos::new(
                                    plotters::style::text_anchor::HPos::Center,
                                    plotters::style::text_anchor::VPos::Bottom,
                                ),
                            ),
                        )
                    })
                    .collect();
                chart.draw_series(labels).map_err(|e| chart_err(&e))?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .border_style(BLACK)
                .background_style(WHITE.mix(0.85))
                .draw()
                .map_err(|e| chart_err(&e))?;
        }
        root.present().map_err(|e| chart_err(&e))?;
    }
    Ok(buf)
}

/// `2026-11-29-h200x2`: date, the GPU's short name, the number of GPUs.
pub fn file_stem(date: &str, gpu_name: &str, world: usize) -> String {
    let lower = gpu_name.to_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty() && *w != "nvidia")
        .collect();
    let gpu = if words.is_empty() {
        "gpu".to_string()
    } else {
        words.join("-")
    };
    format!("{date}-{gpu}x{world}")
}

/// The UTC calendar date (YYYY-MM-DD) of a Unix time in seconds.
pub fn utc_date(unix_secs: u64) -> String {
    // Days to civil date (H. Hinnant's algorithm), valid for every u64 day count we meet.
    let z = (unix_secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Today's UTC date.
pub fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    utc_date(secs)
}

/// Write `<stem>.json` and `<stem>.svg` into `dir` (created if needed), never overwriting an
/// earlier result: a `-2`, `-3`, ... suffix is added instead. Returns both paths.
pub fn write(results: &Results, dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let stem = file_stem(&results.date, &results.gpu_name, results.world_size);
    let mut n = 1;
    let (json, svg_path) = loop {
        let s = if n == 1 {
            stem.clone()
        } else {
            format!("{stem}-{n}")
        };
        let j = dir.join(format!("{s}.json"));
        let v = dir.join(format!("{s}.svg"));
        if !j.exists() && !v.exists() {
            break (j, v);
        }
        n += 1;
    };
    let text = serde_json::to_string_pretty(results).map_err(|source| Error::Json {
        path: json.clone(),
        source,
    })?;
    std::fs::write(&json, text + "\n").map_err(io(&json))?;
    std::fs::write(&svg_path, svg(results)?).map_err(io(&svg_path))?;
    Ok((json, svg_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(preset: &str, strategy: &str, ms: f64) -> CaseResult {
        CaseResult {
            preset: preset.into(),
            strategy: strategy.into(),
            tokens_per_rank: 8192,
            dtype: "bf16".into(),
            backward: false,
            iterations: 20,
            median_ms: ms,
            phases_ms: BTreeMap::from([
                ("routing".to_string(), 0.1),
                ("dispatch".to_string(), ms * 0.3),
                ("experts".to_string(), ms * 0.4),
                ("combine".to_string(), ms * 0.2),
            ]),
            flops: Some(1.0e12),
            comm_bytes: Some(2.0e8),
        }
    }

    fn rank(r: usize, world: usize, cases: Vec<CaseResult>) -> (PathBuf, RankReport) {
        (
            PathBuf::from(format!("rank{r}.json")),
            RankReport {
                schema: RANK_SCHEMA.into(),
                rank: r,
                world_size: world,
                gpu_name: "NVIDIA H200".into(),
                dense_gemm_tflops: Some(800.0),
                git_commit: Some("abc123".into()),
                cases,
            },
        )
    }

    /// Two ranks, two presets, sequential + comet; rank 1 is slower on mixtral.
    fn fake() -> Vec<(PathBuf, RankReport)> {
        vec![
            rank(
                0,
                2,
                vec![
                    case("mixtral-8x7b", "sequential", 4.0),
                    case("mixtral-8x7b", "comet", 2.5),
                    case("qwen2-moe-2.7b", "sequential", 1.0),
                    case("qwen2-moe-2.7b", "comet", 0.8),
                ],
            ),
            rank(
                1,
                2,
                vec![
                    case("mixtral-8x7b", "sequential", 5.0),
                    case("mixtral-8x7b", "comet", 3.0),
                    case("qwen2-moe-2.7b", "sequential", 1.0),
                    case("qwen2-moe-2.7b", "comet", 0.8),
                ],
            ),
        ]
    }

    #[test]
    fn gather_takes_the_slowest_rank_and_derives_rates() {
        let r = gather(fake(), "2026-11-29").unwrap();
        assert_eq!(r.world_size, 2);
        assert_eq!(r.cases.len(), 4);
        let c = r
            .cases
            .iter()
            .find(|c| c.key.preset == "mixtral-8x7b" && c.key.strategy == "sequential")
            .unwrap();
        assert_eq!(c.ms, 5.0);
        assert_eq!(c.ms_per_rank, vec![4.0, 5.0]);
        assert!((c.phases_ms["dispatch"] - 1.5).abs() < 1e-12);
        // 2e12 flops over 5 ms on 2 GPUs = 200 TFLOP/s per GPU.
        assert!((c.tflops_per_gpu.unwrap() - 200.0).abs() < 1e-9);
        // floor = 1e12 / 800e12 s = 1.25 ms; 5 / 1.25 = 4.
        assert!((c.floor_ratio.unwrap() - 4.0).abs() < 1e-9);
        // 2e8 bytes / 5 ms = 40 GB/s.
        assert!((c.comm_gb_s.unwrap() - 40.0).abs() < 1e-9);
        assert_eq!(c.comm_hidden, None);
        let comet = r
            .cases
            .iter()
            .find(|c| c.key.preset == "mixtral-8x7b" && c.key.strategy == "comet")
            .unwrap();
        // Sequential comm = dispatch 1.5 + combine 1.0 = 2.5 ms; (5 - 3) / 2.5 = 0.8.
        assert!((comet.comm_hidden.unwrap() - 0.8).abs() < 1e-9);
        assert_eq!(r.git_commit.as_deref(), Some("abc123"));
    }

    /// `+mma-wgrad` cases (Hopper training stores off) hide communication relative to
    /// `sequential+mma-wgrad`, unlabelled ones (the default, stores on) relative to
    /// `sequential`; `sequential+mma-wgrad` itself is a baseline, not an overlap. Older
    /// reports' `+s90` cases still compare with `sequential+s90`.
    #[test]
    fn sm90_stores_cases_compare_with_their_own_sequential() {
        let cases = vec![
            case("mixtral-8x7b", "sequential", 4.0),
            case("mixtral-8x7b", "pipelined", 3.4),
            case("mixtral-8x7b", "sequential+mma-wgrad", 5.0),
            case("mixtral-8x7b", "pipelined+r16+mma-wgrad", 4.0),
        ];
        let hidden_in = |r: &Results, s: &str| {
            r.cases
                .iter()
                .find(|c| c.key.strategy == s)
                .unwrap()
                .comm_hidden
        };
        let r = gather(vec![rank(0, 1, cases)], "2026-11-29").unwrap();
        let hidden = |s: &str| hidden_in(&r, s);
        assert_eq!(hidden("sequential"), None);
        assert_eq!(hidden("sequential+mma-wgrad"), None);
        // sequential comm 1.2 + 0.8 = 2.0 ms: (4 - 3.4) / 2.0 = 0.3.
        assert!((hidden("pipelined").unwrap() - 0.3).abs() < 1e-9);
        // sequential+mma-wgrad comm 1.5 + 1.0 = 2.5 ms: (5 - 4) / 2.5 = 0.4 (against
        // `sequential` it would be 0.0).
        assert!((hidden("pipelined+r16+mma-wgrad").unwrap() - 0.4).abs() < 1e-9);
        assert!(table(&r).contains("sequential+mma-wgrad"));

        let legacy = vec![
            case("mixtral-8x7b", "sequential", 5.0),
            case("mixtral-8x7b", "pipelined", 4.0),
            case("mixtral-8x7b", "sequential+s90", 4.0),
            case("mixtral-8x7b", "pipelined+r16+s90", 3.4),
        ];
        let r = gather(vec![rank(0, 1, legacy)], "2026-11-29").unwrap();
        let hidden = |s: &str| hidden_in(&r, s);
        assert_eq!(hidden("sequential+s90"), None);
        assert!((hidden("pipelined").unwrap() - 0.4).abs() < 1e-9);
        assert!((hidden("pipelined+r16+s90").unwrap() - 0.3).abs() < 1e-9);
    }

    #[test]
    fn gather_rejects_inconsistent_reports() {
        let mut missing = fake();
        missing[1].1.cases.pop();
        let e = gather(missing, "d").unwrap_err().to_string();
        assert!(e.contains("no result from rank(s) [1]"), "{e}");

        let mut dup = fake();
        dup.push(dup[0].clone());
        let e = gather(dup, "d").unwrap_err();
        assert!(matches!(e, Error::DuplicateRank { rank: 0, .. }), "{e}");

        let mut schema = fake();
        schema[0].1.schema = "comet-bench/rank/0".into();
        let e = gather(schema, "d").unwrap_err().to_string();
        assert!(e.contains("rank0.json: schema"), "{e}");

        let mut world = fake();
        world[1].1.world_size = 4;
        assert!(matches!(
            gather(world, "d").unwrap_err(),
            Error::WorldMismatch {
                found: 4,
                expected: 2,
                ..
            }
        ));

        let mut range = fake();
        range[1].1.rank = 2;
        assert!(matches!(
            gather(range, "d").unwrap_err(),
            Error::RankOutOfRange {
                rank: 2,
                world: 2,
                ..
            }
        ));

        let mut nan = fake();
        nan[0].1.cases[0].median_ms = f64::NAN;
        assert!(matches!(
            gather(nan, "d").unwrap_err(),
            Error::BadTime { .. }
        ));

        assert!(matches!(gather(vec![], "d").unwrap_err(), Error::NoResults));
    }

    /// A record as `bench/torch_reference.py bench --backward --json` writes it.
    const TORCH_JSON: &str = r#"{"impl": "torch", "preset": "mixtral-8x7b", "tokens_per_rank": 8192,
        "world": 2, "gpu": "NVIDIA H200", "torch_version": "2.11", "grouped_mm": true,
        "dtype": "bf16", "shape": {"hidden": 4096}, "iters": 20, "date": "2026-11-29T18:00:00+00:00",
        "git_commit": "def456", "forward_ms": 6.0,
        "phases": {"routing": 0.2, "dispatch": 2.0, "experts": 3.0, "combine": 0.8},
        "tflops": 166.7, "expert_flops_fwd": 1e12, "dense_tflops": 790.0, "dense_n": 8192,
        "ratio_to_floor": 0.25, "comm": {"remote_bytes": 3e8, "dispatch_gbps": 150, "combine_gbps": 375},
        "per_rank": [], "backward_ms": 12.0, "fwd_bwd_ms": 18.0,
        "phases_train": {"routing": 0.3}, "tflops_fwd_bwd": 166.7, "ratio_to_floor_fwd_bwd": 0.2}"#;

    fn torch_input(dir: &Path, name: &str, text: &str) -> (PathBuf, Input) {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        let i = read_input(&p).unwrap();
        (p, i)
    }

    #[test]
    fn pytorch_records_join_the_table() {
        let dir = std::env::temp_dir().join(format!("comet-bench-torch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut inputs: Vec<(PathBuf, Input)> = fake()
            .into_iter()
            .map(|(p, r)| (p, Input::Rank(r)))
            .collect();
        inputs.push(torch_input(&dir, "torch.json", TORCH_JSON));
        let r = gather_inputs(inputs.clone(), "2026-11-29").unwrap();
        let py = r
            .cases
            .iter()
            .find(|c| c.key.strategy == "pytorch" && !c.key.backward)
            .unwrap();
        assert_eq!(py.ms, 6.0);
        assert_eq!(py.floor_ratio, Some(4.0));
        // 3e8 bytes over 6 ms = 50 GB/s.
        assert!((py.comm_gb_s.unwrap() - 50.0).abs() < 1e-9);
        // Only comet-rs's overlapping strategies get a "hidden" share.
        assert_eq!(py.comm_hidden, None);
        let bwd = r
            .cases
            .iter()
            .find(|c| c.key.strategy == "pytorch" && c.key.backward)
            .unwrap();
        assert_eq!(bwd.ms, 18.0);
        assert_eq!(r.baselines.len(), 1);
        let t = table(&r);
        let pos = |s: &str| t.find(s).unwrap_or_else(|| panic!("{s} missing:\n{t}"));
        assert!(pos("| sequential") < pos("| comet") && pos("| comet") < pos("| pytorch"));
        assert!(t.contains("forward + backward"), "{t}");
        svg(&r).unwrap();

        // The same record twice, or from a run of another size, is an error.
        let mut twice = inputs.clone();
        twice.push(torch_input(&dir, "torch2.json", TORCH_JSON));
        assert!(matches!(
            gather_inputs(twice, "d").unwrap_err(),
            Error::DuplicateCase { .. }
        ));
        let mut other = inputs;
        other.push(torch_input(
            &dir,
            "torch4.json",
            &TORCH_JSON.replace("\"world\": 2", "\"world\": 4"),
        ));
        assert!(matches!(
            gather_inputs(other, "d").unwrap_err(),
            Error::WorldMismatch {
                found: 4,
                expected: 2,
                ..
            }
        ));
        // A torch record is not a rank report.
        assert!(matches!(
            read_rank(&dir.join("torch.json")).unwrap_err(),
            Error::Schema { .. }
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn table_is_strategies_by_presets() {
        let r = gather(fake(), "2026-11-29").unwrap();
        let t = table(&r);
        assert!(
            t.contains("2 x NVIDIA H200, 2026-11-29, commit abc123"),
            "{t}"
        );
        assert!(t.contains("8192 tokens per rank, bf16, forward"), "{t}");
        let header = t.lines().find(|l| l.starts_with("| strategy")).unwrap();
        // Presets in the canonical order (mixtral before qwen2-moe).
        assert!(
            header.find("mixtral").unwrap() < header.find("qwen2").unwrap(),
            "{header}"
        );
        let seq = t.lines().find(|l| l.starts_with("| sequential")).unwrap();
        assert!(seq.contains("5.000 ms 200 TF/s"), "{seq}");
        assert!(t.contains("| mixtral-8x7b   | comet"), "{t}");
        assert!(t.contains("80%"), "{t}");
    }

    #[test]
    fn svg_draws_every_strategy_and_preset() {
        let r = gather(fake(), "2026-11-29").unwrap();
        let s = svg(&r).unwrap();
        assert!(s.starts_with("<svg"), "{}", &s[..s.len().min(200)]);
        assert!(s.trim_end().ends_with("</svg>"));
        for needle in [
            "mixtral-8x7b",
            "qwen2-moe-2.7b",
            "sequential",
            "comet",
            "5.00",
            "3.00",
        ] {
            assert!(s.contains(needle), "{needle} missing from the chart");
        }
        assert!(s.matches("<rect").count() >= 4 + 2, "bars + legend");
    }

    #[test]
    fn write_never_overwrites() {
        let dir = std::env::temp_dir().join(format!("comet-bench-report-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let r = gather(fake(), "2026-11-29").unwrap();
        let (j1, s1) = write(&r, &dir).unwrap();
        assert_eq!(j1.file_name().unwrap(), "2026-11-29-h200x2.json");
        assert_eq!(s1.file_name().unwrap(), "2026-11-29-h200x2.svg");
        let (j2, _) = write(&r, &dir).unwrap();
        assert_eq!(j2.file_name().unwrap(), "2026-11-29-h200x2-2.json");
        let back: Results = serde_json::from_str(&std::fs::read_to_string(&j1).unwrap()).unwrap();
        assert_eq!(back, r);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn names_and_dates() {
        assert_eq!(
            file_stem("2026-11-29", "NVIDIA H200", 2),
            "2026-11-29-h200x2"
        );
        assert_eq!(
            file_stem("2026-11-29", "NVIDIA H100 80GB HBM3", 8),
            "2026-11-29-h100-80gb-hbm3x8"
        );
        assert_eq!(file_stem("d", "", 1), "d-gpux1");
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(951_782_400), "2000-02-29");
        assert_eq!(utc_date(1_798_502_400), "2026-12-29");
        assert_eq!(utc_date(1_709_251_199), "2024-02-29");
    }
}
