//! Traffic on demand inside a live lab: one connection at a time from a chosen source
//! address and port, for tests that keep traffic flowing while rulesets change, and TCP
//! servers of our own for benchmarks.
//!
//! ```text
//!  caller thread ──Lab::in_pod(j, f)──► fresh thread, setns into pod j ──► f()
//!                                         tcp_connect / udp_exchange / std sockets
//!                                         (sockets it opens live in pod j for good)
//!  Lab::tcp_server(j, addr) ──► listener opened in pod j, served from a root-ns
//!                               thread (accepted sockets keep the listener's ns)
//! ```
//!
//! [`Lab::probe_all`] answers "is this reachable" for a batch of probes; the functions here
//! answer "what happened to this one connection, now", and let the caller pick the source
//! port. That matters when rulesets change under traffic: conntrack remembers a 5-tuple
//! (UDP flows for up to 120 s), so a probe that reuses the ephemeral port of an earlier,
//! then-allowed flow would be waved through as `established` rather than judged by the
//! ruleset now loaded. Callers that give every probe a fresh source port avoid that.
//!
//! [`tcp_connect`] and [`udp_exchange`] must run on a thread inside the source pod's
//! namespace, that is inside [`Lab::in_pod`].

use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use socket2::{Domain, Protocol, Socket, Type};

use super::{Lab, LabError, netns};

/// How often [`udp_exchange`] sends its datagram again while unanswered.
pub const UDP_RESEND: Duration = Duration::from_millis(100);

/// What became of one connection attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// TCP: the handshake completed. UDP: our datagram came back from the echo server.
    Reached,
    /// An answer said no: a TCP reset, an ICMP error (port unreachable, rejected).
    Refused(String),
    /// No answer before the time-out (what a `drop` looks like).
    Silent,
}

impl Outcome {
    pub fn reached(&self) -> bool {
        matches!(self, Outcome::Reached)
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Reached => f.write_str("reached"),
            Outcome::Refused(why) => write!(f, "refused ({why})"),
            Outcome::Silent => f.write_str("no answer"),
        }
    }
}

fn domain(addr: &SocketAddr) -> Domain {
    if addr.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 }
}

fn timeout_to_poll(left: Duration) -> PollTimeout {
    PollTimeout::from(u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX))
}

/// One new TCP connection from `from` (an address of this thread's pod; port 0 = any) to
/// `to`, waiting at most `timeout` for the handshake; the connection is closed at once.
/// `Err` only for local failures (the source address cannot be bound).
pub fn tcp_connect(from: SocketAddr, to: SocketAddr, timeout: Duration) -> io::Result<Outcome> {
    let sock = Socket::new(domain(&to), Type::STREAM, Some(Protocol::TCP))?;
    sock.bind(&from.into())?;
    match sock.connect_timeout(&to.into(), timeout) {
        Ok(()) => Ok(Outcome::Reached),
        Err(e) if e.kind() == io::ErrorKind::TimedOut => Ok(Outcome::Silent),
        Err(e) => Ok(Outcome::Refused(e.to_string())),
    }
}

/// One UDP exchange from `from` to the lab's echo server at `to`: send a 16-byte token
/// (again every [`UDP_RESEND`]) until the same token comes back or `timeout` passes.
pub fn udp_exchange(from: SocketAddr, to: SocketAddr, token: u64, timeout: Duration) -> io::Result<Outcome> {
    let sock = Socket::new(domain(&to), Type::DGRAM, Some(Protocol::UDP))?;
    sock.bind(&from.into())?;
    let udp: UdpSocket = sock.into();
    udp.set_nonblocking(true)?;
    let mut payload = [0u8; 16];
    payload[..8].copy_from_slice(b"npl-echo");
    payload[8..].copy_from_slice(&token.to_be_bytes());
    if let Err(e) = udp.connect(to).and_then(|()| udp.send(&payload)) {
        return Ok(Outcome::Refused(e.to_string()));
    }
    let deadline = Instant::now() + timeout;
    let mut next_send = Instant::now() + UDP_RESEND;
    let mut buf = [0u8; 64];
    loop {
        loop {
            match udp.recv(&mut buf) {
                Ok(n) if buf[..n] == payload => return Ok(Outcome::Reached),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Ok(Outcome::Refused(e.to_string())),
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(Outcome::Silent);
        }
        if now >= next_send {
            // A send error is an ICMP error queued on the socket: the next recv reports it.
            let _ = udp.send(&payload);
            next_send += UDP_RESEND;
        }
        let mut fds = [PollFd::new(udp.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout_to_poll(deadline.min(next_send).saturating_duration_since(now))) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// A TCP server of our own in one lab pod, one connection at a time, until dropped. Each
/// connection gets its first byte echoed, then everything else is read and discarded until
/// the peer closes: a one-byte request/response for connection-rate loops, a sink for
/// bulk transfers.
pub struct TcpServer {
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

#[derive(Default)]
struct Counts {
    connections: AtomicU64,
    bytes: AtomicU64,
}

/// How often a server idle in `accept` looks at its stop flag.
const SERVER_POLL: Duration = Duration::from_millis(50);

impl TcpServer {
    /// Connections whose first byte was echoed so far.
    pub fn connections(&self) -> u64 {
        self.counts.connections.load(Ordering::Relaxed)
    }

    /// Bytes read from all connections so far.
    pub fn received(&self) -> u64 {
        self.counts.bytes.load(Ordering::Relaxed)
    }

    /// Stop serving and report whether the server failed.
    pub fn stop(mut self) -> io::Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> io::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take() {
            Some(t) => t.join().unwrap_or_else(|_| Err(io::Error::other("lab TCP server panicked"))),
            None => Ok(()),
        }
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

fn serve_tcp(listener: TcpListener, stop: &AtomicBool, counts: &Counts) -> io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout_to_poll(SERVER_POLL)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(e.into()),
        }
        let mut conn: TcpStream = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => continue,
            // The client gave up (reset) before we accepted: not the server's failure.
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
            Err(e) => return Err(e),
        };
        conn.set_nonblocking(false)?;
        conn.set_nodelay(true)?;
        // A client that vanishes must not wedge the server.
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut first = [0u8; 1];
        if !matches!(conn.read(&mut first), Ok(1)) || conn.write_all(&first).is_err() {
            continue;
        }
        counts.connections.fetch_add(1, Ordering::Relaxed);
        counts.bytes.fetch_add(1, Ordering::Relaxed);
        // Until the peer closes (FIN) or resets.
        while let Ok(n @ 1..) = conn.read(&mut buf) {
            counts.bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
    Ok(())
}

impl Lab {
    /// Run `f` on a fresh thread inside pod `pod`'s network namespace and return its result.
    /// Sockets `f` opens stay in that namespace; the caller's thread never moves.
    pub fn in_pod<T: Send>(&self, pod: usize, f: impl FnOnce() -> io::Result<T> + Send) -> Result<T, LabError> {
        let ns = self.pod_netns(pod).ok_or_else(|| LabError::Spec(format!("no pod #{pod} in this lab")))?;
        netns::run_in(&ns, f).map_err(|e| LabError::io(format!("in pod `{}` ({ns})", self.pods[pod].name), e))
    }

    /// Start a [`TcpServer`] listening on `addr` (an address of pod `pod`, on a port the lab
    /// does not serve itself).
    pub fn tcp_server(&self, pod: usize, addr: SocketAddr) -> Result<TcpServer, LabError> {
        let listener = self.in_pod(pod, || {
            let s = Socket::new(domain(&addr), Type::STREAM, Some(Protocol::TCP))?;
            s.set_reuse_address(true)?;
            if addr.is_ipv6() {
                s.set_only_v6(true)?;
            }
            s.bind(&addr.into())?;
            s.listen(1024)?;
            s.set_nonblocking(true)?;
            Ok(TcpListener::from(s))
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Counts::default());
        let (stop2, counts2) = (stop.clone(), counts.clone());
        let thread = std::thread::Builder::new()
            .name("netpol-lab-tcp-server".into())
            .spawn(move || serve_tcp(listener, &stop2, &counts2))
            .map_err(|e| LabError::io("starting a lab TCP server", e))?;
        Ok(TcpServer { stop, counts, thread: Some(thread) })
    }
}
