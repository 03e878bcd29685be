//! TCP rendezvous for the one-process-per-GPU model.
//!
//! Rank 0 listens on `MASTER_PORT`; every other rank connects (retrying until the deadline,
//! since rank 0 may start later), says who it is, and waits. Once all `WORLD_SIZE - 1`
//! ranks have checked in with a consistent world size and distinct ranks, rank 0 builds
//! the payload (the NCCL unique id) and sends it to everyone. Every step has a deadline: an
//! unreachable master, a missing rank, a world-size mismatch or a duplicate rank is an
//! error on every rank involved within the configured timeout, never a hang.
//!
//! Wire format (little endian): hello = `b"CMTC"`, version `u32`, rank, world, local rank,
//! local world (`u32` each); reply = `b"CMTR"`, tag `u8` (0 accept, 1 reject), length
//! `u32`, then the payload or a UTF-8 reason.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::env::{DistEnv, endpoint};
use crate::error::{Error, Result};

const HELLO_MAGIC: &[u8; 4] = b"CMTC";
const REPLY_MAGIC: &[u8; 4] = b"CMTR";
const VERSION: u32 = 1;
const HELLO_LEN: usize = 24;
const TAG_ACCEPT: u8 = 0;
const TAG_REJECT: u8 = 1;
/// Largest payload or reason accepted on the wire.
const MAX_PAYLOAD: u32 = 1 << 20;

/// Who takes part in a rendezvous and how long it may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RendezvousConfig {
    /// Rank 0's host.
    pub master_addr: String,
    /// Rank 0's port.
    pub master_port: u16,
    /// This rank.
    pub rank: usize,
    /// Number of ranks.
    pub world_size: usize,
    /// Rank on this host.
    pub local_rank: usize,
    /// Ranks on this host.
    pub local_world_size: usize,
    /// Deadline for the whole rendezvous, measured from the call.
    pub timeout: Duration,
}

impl RendezvousConfig {
    /// A configuration from a parsed environment.
    pub fn from_env(env: &DistEnv, timeout: Duration) -> Self {
        RendezvousConfig {
            master_addr: env.master_addr.clone(),
            master_port: env.master_port,
            rank: env.rank,
            world_size: env.world_size,
            local_rank: env.local_rank,
            local_world_size: env.local_world_size,
            timeout,
        }
    }

    fn endpoint(&self) -> String {
        endpoint(&self.master_addr, self.master_port)
    }
}

/// What a rank announced when it joined (as seen by rank 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Global rank.
    pub rank: usize,
    /// The world size it believes in.
    pub world_size: usize,
    /// Its local rank.
    pub local_rank: usize,
    /// Its local world size.
    pub local_world_size: usize,
}

impl Hello {
    fn encode(&self) -> Result<[u8; HELLO_LEN]> {
        let mut b = [0u8; HELLO_LEN];
        b[0..4].copy_from_slice(HELLO_MAGIC);
        b[4..8].copy_from_slice(&VERSION.to_le_bytes());
        for (i, v) in [
            self.rank,
            self.world_size,
            self.local_rank,
            self.local_world_size,
        ]
        .into_iter()
        .enumerate()
        {
            let v = u32::try_from(v).map_err(|_| Error::invalid("rank/world", v, "< 2^32"))?;
            b[8 + 4 * i..12 + 4 * i].copy_from_slice(&v.to_le_bytes());
        }
        Ok(b)
    }

    fn decode(b: &[u8; HELLO_LEN]) -> Result<Self> {
        if &b[0..4] != HELLO_MAGIC {
            return Err(Error::Protocol(format!(
                "a connection to the rendezvous port sent {:02x?} instead of the comet-comm greeting",
                &b[0..4]
            )));
        }
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]) as usize;
        let version = word(4);
        if version != VERSION as usize {
            return Err(Error::Protocol(format!(
                "rendezvous protocol version {version}, expected {VERSION}"
            )));
        }
        Ok(Hello {
            rank: word(8),
            world_size: word(12),
            local_rank: word(16),
            local_world_size: word(20),
        })
    }
}

/// Runs the rendezvous: rank 0 serves (binding `MASTER_PORT`), the others join.
///
/// `make_payload` is called on rank 0 only, after every rank has checked in; its bytes
/// are returned on every rank.
pub fn rendezvous<F>(cfg: &RendezvousConfig, make_payload: F) -> Result<Vec<u8>>
where
    F: FnOnce() -> Result<Vec<u8>>,
{
    validate(cfg)?;
    if cfg.rank == 0 {
        let listener = bind_master(cfg)?;
        serve(listener, cfg, make_payload).map(|(payload, _)| payload)
    } else {
        join(cfg)
    }
}

fn validate(cfg: &RendezvousConfig) -> Result<()> {
    if cfg.world_size == 0 {
        return Err(Error::invalid("world_size", 0, ">= 1"));
    }
    if cfg.rank >= cfg.world_size {
        return Err(Error::BadRank {
            rank: cfg.rank,
            world: cfg.world_size,
            reason: "rank must be less than the world size".into(),
        });
    }
    if cfg.timeout.is_zero() {
        return Err(Error::invalid("timeout", "0 s", "> 0"));
    }
    Ok(())
}

/// Binds rank 0's listener: the loopback address itself when `MASTER_ADDR` is a loopback
/// name, otherwise every interface of the address family `MASTER_ADDR` resolves to.
pub fn bind_master(cfg: &RendezvousConfig) -> Result<TcpListener> {
    let resolved: Vec<SocketAddr> = (cfg.master_addr.as_str(), cfg.master_port)
        .to_socket_addrs()
        .map_err(|e| Error::io(format!("resolving MASTER_ADDR {}", cfg.endpoint()), e))?
        .collect();
    let first = resolved.first().copied().ok_or_else(|| {
        Error::io(
            format!("resolving MASTER_ADDR {}", cfg.endpoint()),
            std::io::Error::new(ErrorKind::NotFound, "no address"),
        )
    })?;
    let bind_ip = if first.ip().is_loopback() {
        first.ip()
    } else if first.is_ipv6() {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    };
    TcpListener::bind(SocketAddr::new(bind_ip, cfg.master_port)).map_err(|e| {
        Error::io(
            format!("binding the rendezvous port {bind_ip}:{}", cfg.master_port),
            e,
        )
    })
}

/// Rank 0's side on an already bound listener. Returns the payload and every rank's
/// hello (index = rank; rank 0's own from `cfg`).
pub fn serve<F>(
    listener: TcpListener,
    cfg: &RendezvousConfig,
    make_payload: F,
) -> Result<(Vec<u8>, Vec<Hello>)>
where
    F: FnOnce() -> Result<Vec<u8>>,
{
    validate(cfg)?;
    let start = Instant::now();
    let deadline = start + cfg.timeout;
    let world = cfg.world_size;
    let mut hellos: Vec<Option<Hello>> = vec![None; world];
    hellos[0] = Some(Hello {
        rank: 0,
        world_size: world,
        local_rank: cfg.local_rank,
        local_world_size: cfg.local_world_size,
    });
    let mut conns: Vec<(usize, TcpStream)> = Vec::with_capacity(world.saturating_sub(1));
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("configuring the rendezvous listener", e))?;

    let fail = |conns: &mut Vec<(usize, TcpStream)>, err: Error| -> Error {
        let reason = format!("rendezvous aborted by rank 0: {err}");
        for (_, s) in conns.iter_mut() {
            let _ = send_reply(s, TAG_REJECT, reason.as_bytes());
        }
        err
    };

    while conns.len() + 1 < world {
        let now = Instant::now();
        if now >= deadline {
            let missing: Vec<usize> = (0..world).filter(|r| hellos[*r].is_none()).collect();
            let err = Error::RendezvousTimeout {
                waited: start.elapsed(),
                world,
                missing,
            };
            return Err(fail(&mut conns, err));
        }
        let mut stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(e) => return Err(fail(&mut conns, Error::io("accepting a rank", e))),
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        let setup = stream
            .set_nonblocking(false)
            .and_then(|_| stream.set_read_timeout(Some(remaining.max(Duration::from_millis(1)))))
            .and_then(|_| stream.set_write_timeout(Some(remaining.max(Duration::from_millis(1)))))
            .and_then(|_| stream.set_nodelay(true));
        if let Err(e) = setup {
            return Err(fail(
                &mut conns,
                Error::io("configuring a rank's connection", e),
            ));
        }
        let mut buf = [0u8; HELLO_LEN];
        let hello = match stream.read_exact(&mut buf) {
            Ok(()) => Hello::decode(&buf),
            // A connection that says nothing before the deadline is not a rank: drop it.
            Err(e) if is_timeout(&e) || e.kind() == ErrorKind::UnexpectedEof => continue,
            Err(e) => Err(Error::io("reading a rank's greeting", e)),
        };
        let hello = match hello {
            Ok(h) => h,
            Err(Error::Protocol(msg)) => {
                // A stranger on the port (a scanner, a stale client): refuse it, keep going.
                let _ = send_reply(&mut stream, TAG_REJECT, msg.as_bytes());
                tracing::warn!("rendezvous: ignored a connection: {msg}");
                continue;
            }
            Err(e) => return Err(fail(&mut conns, e)),
        };
        let refusal = if hello.world_size != world {
            Some(Error::WorldSizeMismatch {
                rank: hello.rank,
                expected: world,
                got: hello.world_size,
            })
        } else if hello.rank == 0 || hello.rank >= world {
            Some(Error::BadRank {
                rank: hello.rank,
                world,
                reason: if hello.rank == 0 {
                    "rank 0 is the master itself; two processes claim rank 0".into()
                } else {
                    "rank is not below the world size".into()
                },
            })
        } else if hellos[hello.rank].is_some() {
            Some(Error::BadRank {
                rank: hello.rank,
                world,
                reason: "two processes claim this rank".into(),
            })
        } else {
            None
        };
        if let Some(err) = refusal {
            let _ = send_reply(&mut stream, TAG_REJECT, err.to_string().as_bytes());
            return Err(fail(&mut conns, err));
        }
        hellos[hello.rank] = Some(hello);
        conns.push((hello.rank, stream));
    }

    let payload = match make_payload() {
        Ok(p) => p,
        Err(e) => return Err(fail(&mut conns, e)),
    };
    if payload.len() > MAX_PAYLOAD as usize {
        let err = Error::invalid(
            "rendezvous payload",
            payload.len(),
            format!("<= {MAX_PAYLOAD} bytes"),
        );
        return Err(fail(&mut conns, err));
    }
    for (rank, s) in conns.iter_mut() {
        send_reply(s, TAG_ACCEPT, &payload)
            .map_err(|e| Error::io(format!("sending the payload to rank {rank}"), e))?;
    }
    let hellos = hellos.into_iter().flatten().collect();
    Ok((payload, hellos))
}

/// A non-zero rank's side: connect (retrying), greet, wait for the payload.
pub fn join(cfg: &RendezvousConfig) -> Result<Vec<u8>> {
    validate(cfg)?;
    let start = Instant::now();
    let deadline = start + cfg.timeout;
    let addr = cfg.endpoint();
    let mut last_error = String::from("no attempt made");
    let mut backoff = Duration::from_millis(10);
    let mut stream = loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::MasterUnreachable {
                addr,
                waited: start.elapsed(),
                last_error,
            });
        }
        let remaining = deadline - now;
        match addr.to_socket_addrs() {
            Err(e) => last_error = format!("cannot resolve: {e}"),
            Ok(addrs) => {
                let mut connected = None;
                for a in addrs {
                    let attempt = remaining
                        .min(Duration::from_secs(2))
                        .max(Duration::from_millis(1));
                    match TcpStream::connect_timeout(&a, attempt) {
                        Ok(s) => {
                            connected = Some(s);
                            break;
                        }
                        Err(e) => last_error = format!("{a}: {e}"),
                    }
                }
                if let Some(s) = connected {
                    break s;
                }
            }
        }
        let now = Instant::now();
        std::thread::sleep(backoff.min(deadline.saturating_duration_since(now)));
        backoff = (backoff * 2).min(Duration::from_millis(250));
    };
    let remaining = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    stream
        .set_read_timeout(Some(remaining))
        .and_then(|_| stream.set_write_timeout(Some(remaining)))
        .and_then(|_| stream.set_nodelay(true))
        .map_err(|e| Error::io("configuring the connection to rank 0", e))?;
    let hello = Hello {
        rank: cfg.rank,
        world_size: cfg.world_size,
        local_rank: cfg.local_rank,
        local_world_size: cfg.local_world_size,
    }
    .encode()?;
    stream
        .write_all(&hello)
        .map_err(|e| Error::io(format!("greeting rank 0 at {addr}"), e))?;
    let (tag, body) = match read_reply(&mut stream) {
        Ok(r) => r,
        Err(ReplyError::Io(e)) if is_timeout(&e) => {
            return Err(Error::Timeout {
                rank: cfg.rank,
                what: format!("rank 0 at {addr} to complete the rendezvous (other ranks missing?)"),
                waited: start.elapsed(),
            });
        }
        Err(ReplyError::Io(e)) => {
            return Err(Error::io(format!("waiting for rank 0 at {addr}"), e));
        }
        Err(ReplyError::Protocol(msg)) => return Err(Error::Protocol(msg)),
    };
    match tag {
        TAG_ACCEPT => Ok(body),
        _ => Err(Error::RendezvousRejected(
            String::from_utf8_lossy(&body).into_owned(),
        )),
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

fn send_reply(s: &mut TcpStream, tag: u8, body: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(body.len())
        .unwrap_or(u32::MAX)
        .min(MAX_PAYLOAD);
    let mut msg = Vec::with_capacity(9 + len as usize);
    msg.extend_from_slice(REPLY_MAGIC);
    msg.push(tag);
    msg.extend_from_slice(&len.to_le_bytes());
    msg.extend_from_slice(&body[..len as usize]);
    s.write_all(&msg)?;
    s.flush()
}

enum ReplyError {
    Io(std::io::Error),
    Protocol(String),
}

fn read_reply(s: &mut TcpStream) -> std::result::Result<(u8, Vec<u8>), ReplyError> {
    let mut head = [0u8; 9];
    s.read_exact(&mut head).map_err(ReplyError::Io)?;
    if &head[0..4] != REPLY_MAGIC {
        return Err(ReplyError::Protocol(format!(
            "rank 0 answered {:02x?} instead of the comet-comm reply",
            &head[0..4]
        )));
    }
    let tag = head[4];
    if tag != TAG_ACCEPT && tag != TAG_REJECT {
        return Err(ReplyError::Protocol(format!("unknown reply tag {tag}")));
    }
    let len = u32::from_le_bytes([head[5], head[6], head[7], head[8]]);
    if len > MAX_PAYLOAD {
        return Err(ReplyError::Protocol(format!(
            "reply of {len} bytes exceeds the {MAX_PAYLOAD}-byte limit"
        )));
    }
    let mut body = vec![0u8; len as usize];
    s.read_exact(&mut body).map_err(ReplyError::Io)?;
    Ok((tag, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    fn cfg(port: u16, rank: usize, world: usize, timeout_ms: u64) -> RendezvousConfig {
        RendezvousConfig {
            master_addr: "127.0.0.1".into(),
            master_port: port,
            rank,
            world_size: world,
            local_rank: rank,
            local_world_size: world,
            timeout: Duration::from_millis(timeout_ms),
        }
    }

    fn listener() -> (TcpListener, u16) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        (l, port)
    }

    /// A port with nothing listening on it (bound once, then released).
    fn dead_port() -> u16 {
        let (l, port) = listener();
        drop(l);
        port
    }

    #[test]
    fn hello_round_trips() {
        let h = Hello {
            rank: 5,
            world_size: 9,
            local_rank: 1,
            local_world_size: 4,
        };
        assert_eq!(Hello::decode(&h.encode().unwrap()).unwrap(), h);
        let mut bad = h.encode().unwrap();
        bad[0] = b'X';
        assert!(matches!(Hello::decode(&bad), Err(Error::Protocol(_))));
    }

    #[test]
    fn four_thread_ranks_receive_rank0_payload() {
        let world = 4;
        let (l, port) = listener();
        let payload: Vec<u8> = (0..128u32).map(|i| (i * 7 + 3) as u8).collect();
        let expect = payload.clone();
        thread::scope(|s| {
            let root = s.spawn(move || serve(l, &cfg(port, 0, world, 10_000), || Ok(payload)));
            let others: Vec<_> = (1..world)
                .map(|r| s.spawn(move || join(&cfg(port, r, world, 10_000))))
                .collect();
            let (got0, hellos) = root.join().unwrap().unwrap();
            assert_eq!(got0, expect);
            assert_eq!(hellos.len(), world);
            for (r, h) in hellos.iter().enumerate() {
                assert_eq!(h.rank, r);
                assert_eq!(h.world_size, world);
            }
            for o in others {
                assert_eq!(o.join().unwrap().unwrap(), expect);
            }
        });
    }

    #[test]
    fn ranks_started_before_the_master_retry_until_it_is_up() {
        let world = 3;
        let port = dead_port();
        let expect = vec![42u8; 16];
        thread::scope(|s| {
            let others: Vec<_> = (1..world)
                .map(|r| s.spawn(move || join(&cfg(port, r, world, 10_000))))
                .collect();
            thread::sleep(Duration::from_millis(300));
            let root =
                s.spawn(move || rendezvous(&cfg(port, 0, world, 10_000), || Ok(vec![42u8; 16])));
            assert_eq!(root.join().unwrap().unwrap(), expect);
            for o in others {
                assert_eq!(o.join().unwrap().unwrap(), expect);
            }
        });
    }

    #[test]
    fn single_rank_world_needs_no_peers() {
        let (l, port) = listener();
        let (p, hellos) = serve(l, &cfg(port, 0, 1, 1_000), || Ok(vec![1, 2, 3])).unwrap();
        assert_eq!(p, vec![1, 2, 3]);
        assert_eq!(hellos.len(), 1);
    }

    #[test]
    fn unreachable_master_is_an_error_within_the_timeout() {
        let port = dead_port();
        let t0 = Instant::now();
        let err = join(&cfg(port, 1, 2, 400)).unwrap_err();
        let took = t0.elapsed();
        assert!(matches!(err, Error::MasterUnreachable { .. }), "{err:?}");
        assert!(err.to_string().contains(&port.to_string()), "{err}");
        assert!(took < Duration::from_secs(3), "took {took:?}");
        assert!(
            took >= Duration::from_millis(350),
            "gave up early: {took:?}"
        );
    }

    #[test]
    fn missing_rank_times_out_on_master_and_peers() {
        let world = 3;
        let (l, port) = listener();
        let t0 = Instant::now();
        thread::scope(|s| {
            let root = s.spawn(move || serve(l, &cfg(port, 0, world, 500), || Ok(vec![0u8; 8])));
            // Only rank 1 joins; rank 2 never comes. Rank 1 allows itself longer than rank 0.
            let r1 = s.spawn(move || join(&cfg(port, 1, world, 3_000)));
            match root.join().unwrap() {
                Err(Error::RendezvousTimeout {
                    missing, world: w, ..
                }) => {
                    assert_eq!(missing, vec![2]);
                    assert_eq!(w, world);
                }
                other => panic!("expected RendezvousTimeout, got {other:?}"),
            }
            match r1.join().unwrap() {
                Err(Error::RendezvousRejected(msg)) => {
                    assert!(msg.contains("missing ranks: [2]"), "{msg}")
                }
                other => panic!("expected RendezvousRejected, got {other:?}"),
            }
        });
        assert!(t0.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn peer_times_out_when_master_never_answers() {
        // A listener that accepts (kernel backlog) but never replies.
        let (l, port) = listener();
        let t0 = Instant::now();
        let err = join(&cfg(port, 1, 2, 300)).unwrap_err();
        drop(l);
        assert!(matches!(err, Error::Timeout { rank: 1, .. }), "{err:?}");
        assert!(t0.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn world_size_mismatch_is_reported_on_both_sides() {
        let (l, port) = listener();
        thread::scope(|s| {
            let root = s.spawn(move || serve(l, &cfg(port, 0, 2, 5_000), || Ok(vec![9u8; 4])));
            let r1 = s.spawn(move || join(&cfg(port, 1, 3, 5_000)));
            match root.join().unwrap() {
                Err(Error::WorldSizeMismatch {
                    rank: 1,
                    expected: 2,
                    got: 3,
                }) => {}
                other => panic!("expected WorldSizeMismatch, got {other:?}"),
            }
            match r1.join().unwrap() {
                Err(Error::RendezvousRejected(msg)) => {
                    assert!(
                        msg.contains("WORLD_SIZE=3") && msg.contains("WORLD_SIZE=2"),
                        "{msg}"
                    )
                }
                other => panic!("expected RendezvousRejected, got {other:?}"),
            }
        });
    }

    #[test]
    fn duplicate_rank_is_refused() {
        let (l, port) = listener();
        thread::scope(|s| {
            let root = s.spawn(move || serve(l, &cfg(port, 0, 3, 5_000), || Ok(vec![1u8])));
            let a = s.spawn(move || join(&cfg(port, 1, 3, 5_000)));
            thread::sleep(Duration::from_millis(100));
            let b = s.spawn(move || join(&cfg(port, 1, 3, 5_000)));
            match root.join().unwrap() {
                Err(Error::BadRank { rank: 1, .. }) => {}
                other => panic!("expected BadRank, got {other:?}"),
            }
            for h in [a, b] {
                assert!(matches!(
                    h.join().unwrap(),
                    Err(Error::RendezvousRejected(_))
                ));
            }
        });
    }

    #[test]
    fn second_rank_zero_is_refused() {
        let (l, port) = listener();
        thread::scope(|s| {
            let root = s.spawn(move || serve(l, &cfg(port, 0, 2, 5_000), || Ok(vec![1u8])));
            // A client claiming rank 0 (speaking the protocol directly).
            let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
            let h = Hello {
                rank: 0,
                world_size: 2,
                local_rank: 0,
                local_world_size: 2,
            };
            c.write_all(&h.encode().unwrap()).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let (tag, body) = read_reply(&mut c).map_err(|_| ()).unwrap();
            assert_eq!(tag, TAG_REJECT);
            assert!(String::from_utf8_lossy(&body).contains("rank 0"));
            assert!(matches!(
                root.join().unwrap(),
                Err(Error::BadRank { rank: 0, .. })
            ));
        });
    }

    #[test]
    fn stranger_on_the_port_is_ignored() {
        let (l, port) = listener();
        thread::scope(|s| {
            let root = s.spawn(move || serve(l, &cfg(port, 0, 2, 5_000), || Ok(vec![7u8; 3])));
            let mut junk = TcpStream::connect(("127.0.0.1", port)).unwrap();
            junk.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            let r1 = s.spawn(move || join(&cfg(port, 1, 2, 5_000)));
            assert_eq!(root.join().unwrap().unwrap().0, vec![7u8; 3]);
            assert_eq!(r1.join().unwrap().unwrap(), vec![7u8; 3]);
        });
    }

    #[test]
    fn payload_failure_on_master_is_reported_to_peers() {
        let (l, port) = listener();
        thread::scope(|s| {
            let root = s.spawn(move || {
                serve(l, &cfg(port, 0, 2, 5_000), || {
                    Err(Error::Protocol("no NCCL id today".into()))
                })
            });
            let r1 = s.spawn(move || join(&cfg(port, 1, 2, 5_000)));
            assert!(matches!(root.join().unwrap(), Err(Error::Protocol(_))));
            match r1.join().unwrap() {
                Err(Error::RendezvousRejected(msg)) => assert!(msg.contains("no NCCL id today")),
                other => panic!("expected RendezvousRejected, got {other:?}"),
            }
        });
    }

    #[test]
    fn bad_configs_are_refused_up_front() {
        assert!(matches!(
            rendezvous(&cfg(1, 2, 2, 100), || Ok(vec![])),
            Err(Error::BadRank { rank: 2, .. })
        ));
        assert!(matches!(
            rendezvous(&cfg(1, 0, 0, 100), || Ok(vec![])),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(matches!(
            rendezvous(&cfg(1, 0, 1, 0), || Ok(vec![])),
            Err(Error::InvalidArgument { .. })
        ));
    }

    #[test]
    fn rendezvous_through_the_environment_parser() {
        let (l, port) = listener();
        drop(l);
        let port_s = port.to_string();
        thread::scope(|s| {
            let handles: Vec<_> = (0..2usize)
                .map(|r| {
                    let port_s = port_s.clone();
                    s.spawn(move || {
                        let env = DistEnv::from_lookup(|name| {
                            Some(Ok(match name {
                                "RANK" | "LOCAL_RANK" => r.to_string(),
                                "WORLD_SIZE" | "LOCAL_WORLD_SIZE" => "2".into(),
                                "MASTER_ADDR" => "localhost".into(),
                                "MASTER_PORT" => port_s.clone(),
                                _ => return None,
                            }))
                        })?;
                        rendezvous(
                            &RendezvousConfig::from_env(&env, Duration::from_secs(10)),
                            || Ok(b"unique-id".to_vec()),
                        )
                    })
                })
                .collect();
            for h in handles {
                assert_eq!(h.join().unwrap().unwrap(), b"unique-id".to_vec());
            }
        });
    }
}
