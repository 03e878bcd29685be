//! The tuning table: measured communication-block budgets, persisted as JSON, with the cost
//! model as the fallback for shapes never measured.

use std::path::Path;

use comet_core::{DType, MoeConfig};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The token bucket of `tokens` tokens per rank: the next power of two (at least 1), so
/// that nearby batch sizes share an entry.
pub fn token_bucket(tokens: usize) -> usize {
    tokens
        .max(1)
        .checked_next_power_of_two()
        .unwrap_or(usize::MAX)
}

/// What a budget depends on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TuningKey {
    /// GPU name as the driver reports it (e.g. `"NVIDIA H200"`).
    pub gpu: String,
    /// Expert-parallel ranks.
    pub world: usize,
    /// Hidden size `H`.
    pub hidden: usize,
    /// FFN size `F`.
    pub ffn: usize,
    /// Experts `E`.
    pub experts: usize,
    /// Top-k.
    pub top_k: usize,
    /// [`token_bucket`] of the tokens per rank.
    pub token_bucket: usize,
    /// Element type of the activations.
    pub dtype: DType,
}

impl TuningKey {
    /// The key of `cfg` on `world` ranks of `gpu` with `tokens` tokens per rank.
    pub fn new(gpu: &str, world: usize, cfg: &MoeConfig, tokens: usize) -> Self {
        TuningKey {
            gpu: gpu.to_string(),
            world,
            hidden: cfg.hidden(),
            ffn: cfg.ffn(),
            experts: cfg.experts(),
            top_k: cfg.top_k(),
            token_bucket: token_bucket(tokens),
            dtype: cfg.dtype(),
        }
    }
}

/// One measured budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TuningEntry {
    /// What it applies to.
    pub key: TuningKey,
    /// Communication blocks of layer 0 (0 = copy engine).
    pub n_comm_layer0: usize,
    /// Communication blocks of layer 1.
    pub n_comm_layer1: usize,
    /// Measured layer-0 time at this budget (µs), if recorded.
    #[serde(default)]
    pub layer0_us: Option<f64>,
    /// Measured layer-1 time at this budget (µs), if recorded.
    #[serde(default)]
    pub layer1_us: Option<f64>,
    /// Where the numbers come from (commit, date, tool).
    #[serde(default)]
    pub source: String,
}

/// Where a [`Budget`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BudgetSource {
    /// A measured entry of the table.
    Table,
    /// The cost model (no entry for the key).
    Model,
}

/// The communication blocks to use for one layer call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    /// Layer 0's communication blocks.
    pub n_comm_layer0: usize,
    /// Layer 1's communication blocks.
    pub n_comm_layer1: usize,
    /// Table or model.
    pub source: BudgetSource,
}

/// A JSON table of measured budgets.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TuningTable {
    /// Schema version ([`TuningTable::VERSION`]).
    pub version: u32,
    /// Entries, at most one per key.
    pub entries: Vec<TuningEntry>,
}

impl TuningTable {
    /// The schema version this crate reads and writes.
    pub const VERSION: u32 = 1;

    /// An empty table.
    pub fn new() -> Self {
        TuningTable {
            version: Self::VERSION,
            entries: Vec::new(),
        }
    }

    /// Parses a table from JSON text (`path` only names the source in errors).
    ///
    /// # Errors
    /// [`Error::Json`] for invalid JSON or schema; [`Error::Mismatch`] for another schema
    /// version; [`Error::Invariant`] for a key listed twice.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let t: TuningTable = serde_json::from_str(text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        if t.version != Self::VERSION {
            return Err(Error::Mismatch {
                what: "tuning table schema version",
                expected: Self::VERSION as usize,
                got: t.version as usize,
            });
        }
        for (i, e) in t.entries.iter().enumerate() {
            if t.entries[..i].iter().any(|p| p.key == e.key) {
                return Err(Error::Invariant(format!(
                    "tuning table {}: key {:?} listed twice",
                    path.display(),
                    e.key
                )));
            }
        }
        Ok(t)
    }

    /// Reads a table.
    ///
    /// # Errors
    /// [`Error::Io`]; as [`TuningTable::from_json`].
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text, path)
    }

    /// Reads a table, or an empty one if the file does not exist.
    ///
    /// # Errors
    /// As [`TuningTable::load`] for a file that exists.
    pub fn load_or_empty(path: &Path) -> Result<Self> {
        if path.exists() {
            Self::load(path)
        } else {
            Ok(Self::new())
        }
    }

    /// Writes the table as pretty JSON (to a temporary file renamed over `path`, so a
    /// reader never sees half a table).
    ///
    /// # Errors
    /// [`Error::Io`]; [`Error::Json`].
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let tmp = path.with_extension("json.tmp");
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        std::fs::write(&tmp, text + "\n").map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// The entry of `key`, if measured.
    pub fn lookup(&self, key: &TuningKey) -> Option<&TuningEntry> {
        self.entries.iter().find(|e| &e.key == key)
    }

    /// Adds an entry, replacing the one of the same key.
    pub fn insert(&mut self, entry: TuningEntry) {
        match self.entries.iter_mut().find(|e| e.key == entry.key) {
            Some(e) => *e = entry,
            None => self.entries.push(entry),
        }
    }

    /// The budget of `key`: the table's entry, else `model()` (typically
    /// [`crate::budget::choose_n_comm_layer0`] and `_layer1` on the call's schedules).
    /// Either must leave a GEMM block on `sms` SMs.
    ///
    /// # Errors
    /// [`Error::NCommTooLarge`] for an entry or model answer with `n_comm ≥ sms`; the
    /// model's errors.
    pub fn budget(
        &self,
        key: &TuningKey,
        sms: usize,
        model: impl FnOnce() -> Result<(usize, usize)>,
    ) -> Result<Budget> {
        let (n0, n1, source) = match self.lookup(key) {
            Some(e) => (e.n_comm_layer0, e.n_comm_layer1, BudgetSource::Table),
            None => {
                let (a, b) = model()?;
                (a, b, BudgetSource::Model)
            }
        };
        for n_comm in [n0, n1] {
            if n_comm >= sms {
                return Err(Error::NCommTooLarge { n_comm, sms });
            }
        }
        Ok(Budget {
            n_comm_layer0: n0,
            n_comm_layer1: n1,
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(tokens: usize) -> TuningKey {
        let cfg = MoeConfig::new(4096, 14336, 8, 2).unwrap();
        TuningKey::new("NVIDIA H200", 2, &cfg, tokens)
    }

    fn entry(tokens: usize, n0: usize) -> TuningEntry {
        TuningEntry {
            key: key(tokens),
            n_comm_layer0: n0,
            n_comm_layer1: n0 + 1,
            layer0_us: Some(1000.0),
            layer1_us: None,
            source: "test".into(),
        }
    }

    #[test]
    fn buckets_are_powers_of_two() {
        assert_eq!(token_bucket(0), 1);
        assert_eq!(token_bucket(1), 1);
        assert_eq!(token_bucket(5000), 8192);
        assert_eq!(token_bucket(8192), 8192);
        assert_eq!(key(5000), key(8000));
        assert_ne!(key(4096), key(4097));
    }

    #[test]
    fn save_load_lookup_and_fallback() {
        let dir = std::env::temp_dir().join(format!("comet-sched-tuning-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("table.json");
        let mut t = TuningTable::new();
        t.insert(entry(8192, 20));
        t.insert(entry(4096, 12));
        t.insert(entry(8192, 26)); // replaces
        assert_eq!(t.entries.len(), 2);
        t.save(&path).unwrap();
        let back = TuningTable::load(&path).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.lookup(&key(8000)).map(|e| e.n_comm_layer0), Some(26));

        let from_table = back
            .budget(&key(8192), 132, || panic!("model not asked"))
            .unwrap();
        assert_eq!(
            from_table,
            Budget {
                n_comm_layer0: 26,
                n_comm_layer1: 27,
                source: BudgetSource::Table
            }
        );
        let from_model = back.budget(&key(100), 132, || Ok((7, 9))).unwrap();
        assert_eq!(from_model.source, BudgetSource::Model);
        assert_eq!((from_model.n_comm_layer0, from_model.n_comm_layer1), (7, 9));
        assert!(matches!(
            back.budget(&key(100), 132, || Ok((132, 1))),
            Err(Error::NCommTooLarge {
                n_comm: 132,
                sms: 132
            })
        ));
        assert!(matches!(
            back.budget(&key(8192), 16, || Ok((0, 0))),
            Err(Error::NCommTooLarge {
                n_comm: 26,
                sms: 16
            })
        ));

        // Missing file: empty table; a missing file to load: an I/O error naming it.
        let missing = dir.join("none.json");
        assert_eq!(
            TuningTable::load_or_empty(&missing).unwrap(),
            TuningTable::new()
        );
        assert!(
            matches!(TuningTable::load(&missing), Err(Error::Io { path, .. }) if path == missing)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_tables_are_errors() {
        let p = Path::new("t.json");
        assert!(matches!(
            TuningTable::from_json("{", p),
            Err(Error::Json { .. })
        ));
        assert!(matches!(
            TuningTable::from_json(r#"{"version": 2, "entries": []}"#, p),
            Err(Error::Mismatch {
                expected: 1,
                got: 2,
                ..
            })
        ));
        let mut t = TuningTable::new();
        t.entries.push(entry(8192, 1));
        t.entries.push(entry(8192, 2));
        let text = serde_json::to_string(&t).unwrap();
        assert!(matches!(
            TuningTable::from_json(&text, p),
            Err(Error::Invariant(_))
        ));
        // The dtype is stored by name.
        assert!(text.contains(r#""dtype":"bf16""#), "{text}");
    }
}
