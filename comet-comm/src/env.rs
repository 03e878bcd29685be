//! The torchrun launch environment (one process per GPU).
//!
//! `torchrun` (and most launchers that copy it) set `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `LOCAL_WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT` in every process. [`DistEnv`] reads
//! and cross-checks them; every problem is an [`Error`] naming the variable and the value.

use crate::error::{Error, Result};

/// `RANK`: this process's global rank.
pub const RANK: &str = "RANK";
/// `WORLD_SIZE`: the number of ranks.
pub const WORLD_SIZE: &str = "WORLD_SIZE";
/// `LOCAL_RANK`: this process's rank on its host (also its GPU ordinal by default).
pub const LOCAL_RANK: &str = "LOCAL_RANK";
/// `LOCAL_WORLD_SIZE`: the number of ranks on this host.
pub const LOCAL_WORLD_SIZE: &str = "LOCAL_WORLD_SIZE";
/// `MASTER_ADDR`: host name or address of rank 0's rendezvous server.
pub const MASTER_ADDR: &str = "MASTER_ADDR";
/// `MASTER_PORT`: TCP port of rank 0's rendezvous server.
pub const MASTER_PORT: &str = "MASTER_PORT";

/// All variables read by [`DistEnv::from_process_env`], in the order they are checked.
pub const VARS: [&str; 6] = [
    RANK,
    WORLD_SIZE,
    LOCAL_RANK,
    LOCAL_WORLD_SIZE,
    MASTER_ADDR,
    MASTER_PORT,
];

/// The parsed and validated torchrun environment of one process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// Global rank, `< world_size`.
    pub rank: usize,
    /// Number of ranks, `>= 1`.
    pub world_size: usize,
    /// Rank on this host, `< local_world_size`.
    pub local_rank: usize,
    /// Ranks on this host, `<= world_size`.
    pub local_world_size: usize,
    /// Rank 0's host (name or address).
    pub master_addr: String,
    /// Rank 0's rendezvous port (non-zero).
    pub master_port: u16,
}

impl DistEnv {
    /// Reads the variables of this process (`std::env`).
    pub fn from_process_env() -> Result<Self> {
        Self::from_lookup(|name| match std::env::var(name) {
            Ok(v) => Some(Ok(v)),
            Err(std::env::VarError::NotPresent) => None,
            Err(std::env::VarError::NotUnicode(raw)) => Some(Err(raw.to_string_lossy().into())),
        })
    }

    /// Reads the variables through `lookup`, which returns `None` for an unset variable,
    /// `Some(Ok(value))` for a set one and `Some(Err(lossy))` for one that is not UTF-8.
    pub fn from_lookup<F>(lookup: F) -> Result<Self>
    where
        F: Fn(&str) -> Option<std::result::Result<String, String>>,
    {
        let get = |name: &'static str| -> Result<String> {
            match lookup(name) {
                None => Err(Error::MissingEnv { name }),
                Some(Err(lossy)) => Err(Error::InvalidEnv {
                    name,
                    value: lossy,
                    reason: "not valid UTF-8".into(),
                }),
                Some(Ok(v)) => Ok(v),
            }
        };
        let rank = parse_count(RANK, &get(RANK)?)?;
        let world_size = parse_count(WORLD_SIZE, &get(WORLD_SIZE)?)?;
        let local_rank = parse_count(LOCAL_RANK, &get(LOCAL_RANK)?)?;
        let local_world_size = parse_count(LOCAL_WORLD_SIZE, &get(LOCAL_WORLD_SIZE)?)?;
        let master_addr = get(MASTER_ADDR)?.trim().to_string();
        let port_raw = get(MASTER_PORT)?;
        let master_port = parse_port(&port_raw)?;

        if master_addr.is_empty() {
            return Err(Error::InvalidEnv {
                name: MASTER_ADDR,
                value: master_addr,
                reason: "empty host name".into(),
            });
        }
        if world_size == 0 {
            return Err(Error::InvalidEnv {
                name: WORLD_SIZE,
                value: "0".into(),
                reason: "must be at least 1".into(),
            });
        }
        if local_world_size == 0 {
            return Err(Error::InvalidEnv {
                name: LOCAL_WORLD_SIZE,
                value: "0".into(),
                reason: "must be at least 1".into(),
            });
        }
        if rank >= world_size {
            return Err(Error::InconsistentEnv(format!(
                "RANK={rank} must be less than WORLD_SIZE={world_size}"
            )));
        }
        if local_rank >= local_world_size {
            return Err(Error::InconsistentEnv(format!(
                "LOCAL_RANK={local_rank} must be less than LOCAL_WORLD_SIZE={local_world_size}"
            )));
        }
        if local_world_size > world_size {
            return Err(Error::InconsistentEnv(format!(
                "LOCAL_WORLD_SIZE={local_world_size} must not exceed WORLD_SIZE={world_size}"
            )));
        }
        if local_rank > rank {
            return Err(Error::InconsistentEnv(format!(
                "LOCAL_RANK={local_rank} exceeds RANK={rank}; ranks on a host are numbered from \
                 node_rank * LOCAL_WORLD_SIZE, so the local rank is never above the global one"
            )));
        }
        Ok(DistEnv {
            rank,
            world_size,
            local_rank,
            local_world_size,
            master_addr,
            master_port,
        })
    }

    /// `MASTER_ADDR:MASTER_PORT`, with brackets around an IPv6 literal.
    pub fn master_endpoint(&self) -> String {
        endpoint(&self.master_addr, self.master_port)
    }
}

pub(crate) fn endpoint(addr: &str, port: u16) -> String {
    if addr.contains(':') && !addr.starts_with('[') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    }
}

fn parse_count(name: &'static str, raw: &str) -> Result<usize> {
    let v = raw.trim();
    v.parse::<usize>().map_err(|e| Error::InvalidEnv {
        name,
        value: raw.to_string(),
        reason: format!("not a non-negative integer ({e})"),
    })
}

fn parse_port(raw: &str) -> Result<u16> {
    let v = raw.trim();
    let port = v.parse::<u16>().map_err(|e| Error::InvalidEnv {
        name: MASTER_PORT,
        value: raw.to_string(),
        reason: format!("not a TCP port in 1..=65535 ({e})"),
    })?;
    if port == 0 {
        return Err(Error::InvalidEnv {
            name: MASTER_PORT,
            value: raw.to_string(),
            reason: "port 0 is not a fixed port the other ranks could reach".into(),
        });
    }
    Ok(port)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<DistEnv> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        DistEnv::from_lookup(|name| map.get(name).cloned().map(Ok))
    }

    fn full() -> Vec<(&'static str, &'static str)> {
        vec![
            (RANK, "3"),
            (WORLD_SIZE, "8"),
            (LOCAL_RANK, "1"),
            (LOCAL_WORLD_SIZE, "2"),
            (MASTER_ADDR, "node0.example"),
            (MASTER_PORT, "29500"),
        ]
    }

    fn with(key: &str, value: &'static str) -> Vec<(&'static str, &'static str)> {
        full()
            .into_iter()
            .map(|(k, v)| if k == key { (k, value) } else { (k, v) })
            .collect()
    }

    #[test]
    fn parses_a_full_environment() {
        let e = env(&full()).unwrap();
        assert_eq!(
            e,
            DistEnv {
                rank: 3,
                world_size: 8,
                local_rank: 1,
                local_world_size: 2,
                master_addr: "node0.example".into(),
                master_port: 29500,
            }
        );
        assert_eq!(e.master_endpoint(), "node0.example:29500");
    }

    #[test]
    fn whitespace_is_tolerated() {
        let e = env(&with(RANK, " 3 ")).unwrap();
        assert_eq!(e.rank, 3);
    }

    #[test]
    fn each_missing_variable_is_named() {
        for missing in VARS {
            let pairs: Vec<_> = full().into_iter().filter(|(k, _)| *k != missing).collect();
            match env(&pairs) {
                Err(Error::MissingEnv { name }) => assert_eq!(name, missing),
                other => panic!("{missing}: expected MissingEnv, got {other:?}"),
            }
            let msg = env(&pairs).unwrap_err().to_string();
            assert!(msg.contains(missing), "{msg}");
        }
    }

    #[test]
    fn non_numeric_values_are_refused_with_their_value() {
        for (key, bad) in [
            (RANK, "one"),
            (WORLD_SIZE, "-2"),
            (LOCAL_RANK, "1.0"),
            (LOCAL_WORLD_SIZE, ""),
            (MASTER_PORT, "http"),
            (MASTER_PORT, "70000"),
        ] {
            match env(&with(key, bad)) {
                Err(Error::InvalidEnv { name, value, .. }) => {
                    assert_eq!(name, key);
                    assert_eq!(value, bad);
                }
                other => panic!("{key}={bad}: expected InvalidEnv, got {other:?}"),
            }
        }
    }

    #[test]
    fn port_zero_and_empty_host_are_refused() {
        assert!(matches!(
            env(&with(MASTER_PORT, "0")),
            Err(Error::InvalidEnv {
                name: MASTER_PORT,
                ..
            })
        ));
        assert!(matches!(
            env(&with(MASTER_ADDR, "  ")),
            Err(Error::InvalidEnv {
                name: MASTER_ADDR,
                ..
            })
        ));
    }

    #[test]
    fn inconsistent_values_are_refused() {
        let cases: Vec<Vec<(&str, &str)>> = vec![
            with(RANK, "8"),             // rank == world
            with(LOCAL_RANK, "2"),       // local rank == local world
            with(LOCAL_WORLD_SIZE, "9"), // local world > world
            {
                // local rank above global rank
                let mut v = with(RANK, "0");
                v.retain(|(k, _)| *k != LOCAL_RANK);
                v.push((LOCAL_RANK, "1"));
                v
            },
        ];
        for pairs in cases {
            match env(&pairs) {
                Err(Error::InconsistentEnv(msg)) => assert!(!msg.is_empty()),
                other => panic!("{pairs:?}: expected InconsistentEnv, got {other:?}"),
            }
        }
        assert!(matches!(
            env(&with(WORLD_SIZE, "0")),
            Err(Error::InvalidEnv {
                name: WORLD_SIZE,
                ..
            })
        ));
        assert!(matches!(
            env(&with(LOCAL_WORLD_SIZE, "0")),
            Err(Error::InvalidEnv {
                name: LOCAL_WORLD_SIZE,
                ..
            })
        ));
    }

    #[test]
    fn non_utf8_is_reported() {
        let r = DistEnv::from_lookup(|name| {
            if name == RANK {
                Some(Err("\u{FFFD}".into()))
            } else {
                Some(Ok("1".into()))
            }
        });
        assert!(matches!(r, Err(Error::InvalidEnv { name: RANK, .. })));
    }

    #[test]
    fn ipv6_endpoint_is_bracketed() {
        assert_eq!(endpoint("::1", 80), "[::1]:80");
        assert_eq!(endpoint("[::1]", 80), "[::1]:80");
        assert_eq!(endpoint("10.0.0.1", 80), "10.0.0.1:80");
    }
}
