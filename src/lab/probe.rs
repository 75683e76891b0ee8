//! Probing: every probe of a wave is started at once and one `poll` loop watches them all,
//! so a wave costs one time-out however many probes it holds.
//!
//! * TCP: a non-blocking `connect` from the source pod's first address of the family;
//!   success = the handshake completed (`SO_ERROR` is 0 when the socket turns writable).
//!   A refusal (RST) or an ICMP error fails at once; silence fails at the deadline.
//! * UDP: a connected socket sends a unique token; success = the same token comes back
//!   from the echo server. An ICMP error (port unreachable, reject) fails at once.
//! * SCTP: a raw socket sends a well-formed INIT whose initiate tag is unique; success =
//!   the destination's raw socket saw that tag on a served port. No reply is expected.
//!
//! UDP datagrams and SCTP INITs are resent every [`RESEND`] until the deadline, so a lost
//! packet does not turn into a false "blocked". The deadline counts from the moment the
//! wave's last first packet is out; at the deadline the serving thread catches up on
//! everything that reached it and the answers are read once more, so a slow server (not
//! the ruleset) never makes a probe fail. Sockets are created inside the source
//! pod's namespace (from a short-lived thread) and driven from the caller's thread.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsFd as _;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::serve::Seen;
use super::{L4, netns, sctp};

/// How often UDP tokens and SCTP INITs are sent again while unanswered.
pub const RESEND: Duration = Duration::from_millis(100);

/// How long the last look at a wave waits after the server caught up.
const SETTLE: Duration = Duration::from_millis(20);

/// A probe with its addresses resolved.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub src_pod: usize,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub port: u16,
    pub proto: L4,
}

enum State {
    Done(bool),
    Tcp(Socket),
    Udp(UdpSocket, [u8; 16]),
    Sctp { raw: usize, to: SockAddr, packet: [u8; sctp::INIT_PACKET_LEN], key: (IpAddr, u16, u32) },
}

impl State {
    fn pending(&self) -> bool {
        !matches!(self, State::Done(_))
    }
}

fn domain(ip: IpAddr) -> Domain {
    if ip.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 }
}

fn next_tag(tags: &AtomicU32) -> u32 {
    loop {
        let t = tags.fetch_add(1, Ordering::Relaxed);
        if t != 0 {
            return t;
        }
    }
}

/// Per-probe sockets (probe index, socket) and raw SCTP sockets (source address, socket).
type SourceSockets = (Vec<(usize, Socket)>, Vec<(IpAddr, Socket)>);

/// Sockets for the probes `idx` (all from the same source pod), created in its namespace:
/// one per TCP/UDP probe, and one raw SCTP socket per source address.
fn open_sockets(ns: &str, probes: &[Resolved], idx: &[usize]) -> io::Result<SourceSockets> {
    netns::run_in(ns, || {
        let mut socks = Vec::new();
        let mut raws: Vec<(IpAddr, Socket)> = Vec::new();
        for &i in idx {
            let p = &probes[i];
            let (ty, proto) = match p.proto {
                L4::Tcp => (Type::STREAM, Protocol::TCP),
                L4::Udp => (Type::DGRAM, Protocol::UDP),
                L4::Sctp => {
                    if !raws.iter().any(|(ip, _)| *ip == p.src) {
                        let s = Socket::new(domain(p.src), Type::RAW, Some(Protocol::from(sctp::IPPROTO_SCTP)))?;
                        s.bind(&SocketAddr::new(p.src, 0).into())?;
                        raws.push((p.src, s));
                    }
                    continue;
                }
            };
            let s = Socket::new(domain(p.src), ty, Some(proto))?;
            s.bind(&SocketAddr::new(p.src, 0).into())?;
            s.set_nonblocking(true)?;
            socks.push((i, s));
        }
        Ok((socks, raws))
    })
}

/// Run one wave of probes concurrently; `ns_of(pod)` names a pod's namespace. At the
/// deadline, `catch_up()` returns once the destinations' server has answered everything
/// that reached it, and the answers are collected one last time: a probe fails only when
/// its packet did not arrive in time, not when the one serving thread was behind.
pub fn wave(
    probes: &[Resolved],
    ns_of: &dyn Fn(usize) -> String,
    timeout: Duration,
    seen: &Seen,
    tags: &AtomicU32,
    catch_up: &dyn Fn(),
) -> io::Result<Vec<bool>> {
    let mut by_source: HashMap<usize, Vec<usize>> = HashMap::new();
    for (i, p) in probes.iter().enumerate() {
        by_source.entry(p.src_pod).or_default().push(i);
    }
    let mut states: Vec<State> = (0..probes.len()).map(|_| State::Done(false)).collect();
    let mut raws: Vec<Socket> = Vec::new();
    let mut sockets: Vec<(usize, Socket)> = Vec::new();
    let mut raw_of: HashMap<IpAddr, usize> = HashMap::new();
    for (src_pod, idx) in &by_source {
        let (socks, r) = open_sockets(&ns_of(*src_pod), probes, idx)?;
        sockets.extend(socks);
        for (ip, s) in r {
            raw_of.insert(ip, raws.len());
            raws.push(s);
        }
    }

    let sending = Instant::now();
    for (i, sock) in sockets {
        let p = &probes[i];
        let to = SocketAddr::new(p.dst, p.port);
        states[i] = match p.proto {
            L4::Tcp => match sock.connect(&to.into()) {
                Ok(()) => State::Done(true),
                Err(e) if e.raw_os_error() == Some(nix::libc::EINPROGRESS) => State::Tcp(sock),
                Err(_) => State::Done(false),
            },
            L4::Udp => {
                let udp: UdpSocket = sock.into();
                let mut token = [0u8; 16];
                token[..4].copy_from_slice(b"npl!");
                token[4..8].copy_from_slice(&next_tag(tags).to_be_bytes());
                token[8..16].copy_from_slice(&(i as u64).to_be_bytes());
                match udp.connect(to).and_then(|()| udp.send(&token)) {
                    Ok(_) => State::Udp(udp, token),
                    Err(_) => State::Done(false),
                }
            }
            L4::Sctp => unreachable!("SCTP probes have no per-probe socket"),
        };
    }
    for (i, p) in probes.iter().enumerate().filter(|(_, p)| p.proto == L4::Sctp) {
        let tag = next_tag(tags);
        // A source port derived from the tag keeps concurrent probes' conntrack tuples apart.
        let sport = 32_768 + (tag % 28_000) as u16;
        let packet = sctp::init_packet(sport, p.port, tag);
        let to: SockAddr = SocketAddr::new(p.dst, 0).into();
        let raw = raw_of[&p.src];
        states[i] = match raws[raw].send_to(&packet, &to) {
            Ok(_) => State::Sctp { raw, to, packet, key: (p.dst, p.port, tag) },
            Err(_) => State::Done(false),
        };
    }

    // The clock starts once every first packet is out: issuing thousands of connects takes
    // a while on a loaded machine, and a deadline set before that loop shortened the last
    // probes' time-out, and turned allowed cells into false "blocked"s under load
    // (benches/README.md).
    let start = Instant::now();
    let deadline = start + timeout;
    let mut next_resend = start + RESEND;
    tracing::trace!(probes = probes.len(), sending = ?start.duration_since(sending), "lab wave sent");
    let mut buf = [0u8; 64];
    let mut last_round = false;
    loop {
        let sctp_pending = states.iter().any(|s| matches!(s, State::Sctp { .. }));
        if sctp_pending {
            let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
            for s in states.iter_mut() {
                if let State::Sctp { key, .. } = s
                    && seen.remove(key)
                {
                    *s = State::Done(true);
                }
            }
        }
        let now = Instant::now();
        if last_round || !states.iter().any(State::pending) {
            break;
        }
        if now >= deadline {
            catch_up();
            // Answers sent by then are normally queued already (veth hops run in the
            // sender's softirq); under softirq load the kernel defers to ksoftirqd, so
            // give them a moment before the last look.
            std::thread::sleep(SETTLE);
            last_round = true;
        } else if now >= next_resend {
            for s in &states {
                match s {
                    State::Udp(u, token) => {
                        let _ = u.send(token);
                    }
                    State::Sctp { raw, to, packet, .. } => {
                        let _ = raws[*raw].send_to(packet, to);
                    }
                    _ => {}
                }
            }
            next_resend += RESEND;
        }
        let mut wait = deadline.min(next_resend).saturating_duration_since(now);
        if sctp_pending {
            wait = wait.min(Duration::from_millis(2));
        }
        if last_round {
            wait = Duration::ZERO;
        }
        let (ready, order): (Vec<Option<PollFlags>>, Vec<usize>) = {
            let mut fds = Vec::new();
            let mut order = Vec::new();
            for (i, s) in states.iter().enumerate() {
                match s {
                    State::Tcp(t) => fds.push(PollFd::new(t.as_fd(), PollFlags::POLLOUT)),
                    State::Udp(u, _) => fds.push(PollFd::new(u.as_fd(), PollFlags::POLLIN)),
                    _ => continue,
                }
                order.push(i);
            }
            let ms = if last_round { 0 } else { u16::try_from(wait.as_millis().max(1)).unwrap_or(u16::MAX) };
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
            (fds.iter().map(PollFd::revents).collect(), order)
        };
        for (i, rev) in order.into_iter().zip(ready) {
            if rev.is_none_or(|r| r.is_empty()) {
                continue;
            }
            match &states[i] {
                State::Tcp(t) => {
                    states[i] = State::Done(matches!(t.take_error(), Ok(None)));
                }
                State::Udp(u, token) => loop {
                    match u.recv(&mut buf) {
                        Ok(n) if buf[..n] == token[..] => {
                            states[i] = State::Done(true);
                            break;
                        }
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(_) => {
                            states[i] = State::Done(false);
                            break;
                        }
                    }
                },
                _ => {}
            }
        }
    }
    // INITs that arrive after the deadline must not linger in the shared set.
    let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
    for s in &states {
        if let State::Sctp { key, .. } = s {
            seen.remove(key);
        }
    }
    Ok(states.iter().map(|s| matches!(s, State::Done(true))).collect())
}
