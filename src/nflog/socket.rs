//! The log group's netlink socket, in the agent's network namespace or a named one, and
//! the thread that reads it.
//!
//! ```text
//!  NflogSocket::open(netns, config, receive_buffer)
//!     socket(AF_NETLINK, NETLINK_NETFILTER) made on a thread inside the netns
//!     ──send bind_request──► kernel ──ack (EBUSY: another socket holds the group)
//!  receive() ──recv ≤ RECEIVE_WAIT──► datagram ──messages──► parse_packet ──► Batch
//!      ENOBUFS (the receive buffer overflowed, the kernel dropped messages) ──► overrun,
//!      then reading goes on; NFULA_SEQ gaps ──► how many packets were lost
//!  NflogReader::start(socket, sink) ──thread "nflog"──► receive() in a loop ──► sink(packet)
//!                                     counters (packets, overruns, lost, malformed, errors)
//! ```
//!
//! The kernel releases the group when the socket closes, so a reader that ends (or a
//! process that dies) leaves nothing bound behind.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use nix::errno::Errno;
use nix::sys::socket::{self, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, sockopt};

use super::ReceivedPacket;
use super::wire::{LogConfig, WireError, bind_request, is_logged_packet, parse_packet};
use crate::nfnetlink::{NLMSG_ERROR, error_code, messages};

/// One receive waits at most this long, so that a stopping reader notices within it.
pub const RECEIVE_WAIT: Duration = Duration::from_millis(200);
/// The receive buffer asked for by default: each logged packet is a message of its own,
/// in a buffer of about a page (NLMSG_GOODSIZE), so this holds a few hundred; the rules'
/// rate limit keeps the flow below what one reader thread takes.
pub const DEFAULT_RECEIVE_BUFFER: usize = 1 << 20;

/// A socket bound to one nfnetlink_log group.
#[derive(Debug)]
pub struct NflogSocket {
    fd: OwnedFd,
    group: u16,
    buf: Vec<u8>,
    /// The NFULA_SEQ the next packet should carry, once one was seen.
    expected_seq: Option<u32>,
}

/// What one receive brought.
#[derive(Debug, Default)]
pub struct Batch {
    pub packets: Vec<ReceivedPacket>,
    /// The receive buffer had overflowed: the kernel dropped messages before this read.
    pub overrun: bool,
    /// Packets the group's sequence numbers show were never received.
    pub lost: u64,
    /// Messages of the group that could not be read.
    pub malformed: Vec<WireError>,
}

impl NflogSocket {
    /// Opens a socket in the network namespace `netns` (a name under /run/netns) or in
    /// ours, with a receive buffer of `receive_buffer` bytes (the kernel doubles it), and
    /// binds it to `config.group`. A group another socket of the namespace holds is refused
    /// (`ErrorKind::AddrInUse`).
    pub fn open(netns: Option<&str>, config: &LogConfig, receive_buffer: usize) -> io::Result<NflogSocket> {
        let fd = match netns {
            None => create()?,
            Some(name) => in_netns(name, create)?,
        };
        if socket::setsockopt(&fd, sockopt::RcvBufForce, &receive_buffer).is_err() {
            socket::setsockopt(&fd, sockopt::RcvBuf, &receive_buffer)?;
        }
        socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        let tv = nix::sys::time::TimeVal::new(0, RECEIVE_WAIT.as_micros() as _);
        socket::setsockopt(&fd, sockopt::ReceiveTimeout, &tv)?;
        let mut s = NflogSocket { fd, group: config.group, buf: vec![0; 64 * 1024], expected_seq: None };
        s.configure(config)?;
        Ok(s)
    }

    /// The group this socket reads.
    pub fn group(&self) -> u16 {
        self.group
    }

    fn configure(&mut self, config: &LogConfig) -> io::Result<()> {
        const SEQ: u32 = 1;
        let request = bind_request(config, SEQ);
        socket::send(self.fd.as_raw_fd(), &request, MsgFlags::empty())?;
        // The kernel answers inside the send; the bound only guards a kernel gone wrong.
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            let n = match socket::recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::empty()) {
                Ok(n) => n,
                Err(Errno::EAGAIN | Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            for (kind, _, seq, payload) in messages(&self.buf[..n]) {
                if kind != NLMSG_ERROR || seq != SEQ {
                    continue;
                }
                return match error_code(payload) {
                    0 => Ok(()),
                    // The kernel refuses a group another socket holds with EPERM (EBUSY only
                    // when it is our own socket's already), and a caller without
                    // CAP_NET_ADMIN with EPERM too.
                    c if c == -(Errno::EBUSY as i32) || c == -(Errno::EPERM as i32) => Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!(
                            "nflog group {} is bound by another socket (or CAP_NET_ADMIN is missing): {}",
                            config.group,
                            Errno::from_raw(-c)
                        ),
                    )),
                    c => {
                        Err(io::Error::other(format!("binding nflog group {}: {}", config.group, Errno::from_raw(-c))))
                    }
                };
            }
        }
        Err(io::Error::new(io::ErrorKind::TimedOut, format!("no answer binding nflog group {}", config.group)))
    }

    /// Reads one datagram, waiting at most [`RECEIVE_WAIT`] (then the batch is empty).
    pub fn receive(&mut self) -> io::Result<Batch> {
        let mut batch = Batch::default();
        let n = match socket::recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::empty()) {
            Ok(n) => n,
            Err(Errno::EAGAIN | Errno::EINTR) => return Ok(batch),
            // The kernel could not queue messages for us: they are gone (the sequence
            // numbers of the next ones say how many), and the socket reads on.
            Err(Errno::ENOBUFS) => {
                batch.overrun = true;
                return Ok(batch);
            }
            Err(e) => return Err(e.into()),
        };
        let received_at = SystemTime::now();
        for (kind, _, _, payload) in messages(&self.buf[..n]) {
            if !is_logged_packet(kind) {
                continue;
            }
            match parse_packet(payload) {
                Ok(packet) => batch.packets.push(ReceivedPacket { packet, received_at }),
                Err(e) => batch.malformed.push(e),
            }
        }
        for seq in batch.packets.iter().filter_map(|p| p.packet.seq) {
            batch.lost += self.gap_before(seq);
        }
        Ok(batch)
    }

    /// How many packets were numbered between the last one seen and `seq`.
    fn gap_before(&mut self, seq: u32) -> u64 {
        let gap = match self.expected_seq {
            // Counting forward at most half the number space: a number behind the
            // expected one is no loss (the counter only goes forward).
            Some(expected) if seq.wrapping_sub(expected) < 1 << 31 => u64::from(seq.wrapping_sub(expected)),
            _ => 0,
        };
        self.expected_seq = Some(seq.wrapping_add(1));
        gap
    }
}

fn create() -> io::Result<OwnedFd> {
    Ok(socket::socket(AddressFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkNetFilter)?)
}

/// Runs `f` on a short-lived thread inside the network namespace `name`: setns moves only
/// the calling thread, and a socket keeps the namespace it was made in.
fn in_netns<T: Send>(name: &str, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    let path = format!("/run/netns/{name}");
    let ns = std::fs::File::open(&path).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| io::Error::other(format!("entering {path}: {e}")))?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("netns thread panicked")))
    })
}

/// What a reader has counted since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReaderCounts {
    /// Packets handed to the sink.
    pub packets: u64,
    /// Times the receive buffer overflowed.
    pub overruns: u64,
    /// Packets the sequence numbers show were lost (to overruns).
    pub lost: u64,
    /// Messages of the group that could not be read.
    pub malformed: u64,
    /// Receives that failed otherwise (the reader waits a moment and reads on).
    pub errors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    packets: AtomicU64,
    overruns: AtomicU64,
    lost: AtomicU64,
    malformed: AtomicU64,
    errors: AtomicU64,
}

/// Reads a group on its own thread and hands each packet to a sink; stopped and joined
/// on drop (within [`RECEIVE_WAIT`] once the sink returns).
///
/// The sink runs on the reader's thread: for an async consumer it sends into a channel
/// without blocking (`tokio::sync::mpsc::Sender::try_send`, dropping when full, as the
/// kernel's rate limit already bounds what a log is for).
#[derive(Debug)]
pub struct NflogReader {
    counters: Arc<Counters>,
    group: u16,
    _listener: crate::nft::backend::netlink::Listener,
}

impl NflogReader {
    pub fn start(mut socket: NflogSocket, mut sink: impl FnMut(ReceivedPacket) + Send + 'static) -> io::Result<Self> {
        let counters = Arc::new(Counters::default());
        let group = socket.group();
        let shared = Arc::clone(&counters);
        let listener = crate::nft::backend::netlink::Listener::spawn("nflog", move || {
            let counters = &shared;
            match socket.receive() {
                Ok(batch) => {
                    if batch.overrun {
                        counters.overruns.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(group, "nflog receive buffer overrun: logged packets were dropped");
                    }
                    if batch.lost > 0 {
                        let total = counters.lost.fetch_add(batch.lost, Ordering::Relaxed) + batch.lost;
                        tracing::warn!(group, lost = batch.lost, total, "logged packets lost to an overrun");
                    }
                    counters.malformed.fetch_add(batch.malformed.len() as u64, Ordering::Relaxed);
                    for e in &batch.malformed {
                        tracing::debug!(group, error = %e, "unreadable nflog message");
                    }
                    for packet in batch.packets {
                        counters.packets.fetch_add(1, Ordering::Relaxed);
                        sink(packet);
                    }
                }
                Err(e) => {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(group, error = %e, "reading the nflog group failed; reading on");
                    std::thread::sleep(RECEIVE_WAIT);
                }
            }
            std::ops::ControlFlow::Continue(())
        })?;
        Ok(NflogReader { counters, group, _listener: listener })
    }

    pub fn group(&self) -> u16 {
        self.group
    }

    pub fn counts(&self) -> ReaderCounts {
        let c = &self.counters;
        ReaderCounts {
            packets: c.packets.load(Ordering::Relaxed),
            overruns: c.overruns.load(Ordering::Relaxed),
            lost: c.lost.load(Ordering::Relaxed),
            malformed: c.malformed.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unbound() -> NflogSocket {
        let fd = create().expect("a netlink socket");
        NflogSocket { fd, group: 0, buf: Vec::new(), expected_seq: None }
    }

    #[test]
    fn sequence_gaps_count_the_packets_never_received() {
        let mut s = unbound();
        assert_eq!(s.gap_before(5), 0, "the first packet seen sets the count's start");
        assert_eq!(s.gap_before(6), 0);
        assert_eq!(s.gap_before(10), 3, "7, 8 and 9 were lost");
        assert_eq!(s.gap_before(4), 0, "a number behind is no loss");
        assert_eq!(s.gap_before(5), 0);
        let mut s = unbound();
        s.gap_before(u32::MAX - 1);
        assert_eq!(s.gap_before(1), 2, "across the wrap: u32::MAX and 0 were lost");
    }
}
