//! The node's conntrack table over ctnetlink, in the agent's network namespace or a named
//! one (`--netns`): dump, delete, and the node's own addresses.
//!
//! ```text
//!  flows():  socket (opened once, in the netns) ──send dump_request──► recv datagrams
//!            until NLMSG_DONE ──parse_flow──► Vec<Flow>       (each recv ≤ RECV_TIMEOUT,
//!                                                               the whole dump ≤ budget)
//!  delete(): delete_request per flow, packed ≤ 64 KiB per send ──► one ack per request
//!            (0 deleted, ENOENT already gone, else an error)
//!  local_addresses(): getifaddrs on a thread inside the netns
//! ```
//!
//! Any failure drops the socket (a dump given up half way leaves answers in it); the next
//! call opens a fresh one.

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use nix::errno::Errno;

use crate::nfnetlink::{NLMSG_ERROR, error_code, messages};
use crate::nft::backend::netlink::NetlinkSocket;

use super::wire::{NLMSG_DONE, delete_request, dump_request, is_conntrack_entry, parse_flow};
use super::{ConntrackError, ConntrackTable, Flow};

/// One receive gives up after this long: the kernel answers a dump or a delete at once.
const RECV_TIMEOUT: Duration = Duration::from_millis(500);
/// Delete requests per send are packed up to this many bytes.
const SEND_BYTES: usize = 64 * 1024;

/// ctnetlink in a network namespace.
#[derive(Debug)]
pub struct NetlinkConntrack {
    netns: Option<String>,
    socket: Option<NetlinkSocket>,
    seq: u32,
    buf: Vec<u8>,
    /// A dump (or a round of deletes) that takes longer is abandoned with an error, so a
    /// huge table never holds the sync loop for long.
    pub budget: Duration,
}

impl NetlinkConntrack {
    /// The conntrack table of `netns` (a name under /run/netns), or of ours. Nothing is
    /// opened until first used.
    pub fn new(netns: Option<String>) -> Self {
        NetlinkConntrack { netns, socket: None, seq: 1, buf: vec![0; 256 * 1024], budget: Duration::from_secs(2) }
    }

    fn socket(&mut self) -> Result<&NetlinkSocket, ConntrackError> {
        if self.socket.is_none() {
            let s = NetlinkSocket::open(self.netns.as_deref(), 0)
                .map_err(|e| ConntrackError(format!("opening a netfilter netlink socket: {e}")))?;
            s.set_receive_timeout(RECV_TIMEOUT).map_err(|e| ConntrackError(format!("socket time-out: {e}")))?;
            self.socket = Some(s);
        }
        Ok(self.socket.as_ref().expect("just opened"))
    }

    fn next_seq(&mut self, n: u32) -> u32 {
        let s = self.seq;
        self.seq = self.seq.wrapping_add(n);
        s
    }

    fn dump(&mut self) -> Result<Vec<Flow>, ConntrackError> {
        let seq = self.next_seq(1);
        let started = Instant::now();
        let budget = self.budget;
        let mut buf = std::mem::take(&mut self.buf);
        let result = (|| {
            let socket = self.socket()?;
            socket.send(&dump_request(seq)).map_err(|e| ConntrackError(format!("sending the dump request: {e}")))?;
            let mut flows = Vec::new();
            loop {
                if started.elapsed() > budget {
                    return Err(ConntrackError(format!(
                        "dump given up after {budget:?} ({} entries read)",
                        flows.len()
                    )));
                }
                let n = match socket.recv(&mut buf, true) {
                    Ok(Some(n)) => n,
                    Ok(None) => return Err(ConntrackError(format!("no answer to the dump within {RECV_TIMEOUT:?}"))),
                    Err(Errno::ENOBUFS) => {
                        return Err(ConntrackError("the dump overran the socket's receive buffer".into()));
                    }
                    Err(e) => return Err(ConntrackError(format!("reading the dump: {e}"))),
                };
                for (kind, _, s, payload) in messages(&buf[..n]) {
                    if s != seq {
                        continue;
                    }
                    if kind == NLMSG_DONE {
                        return Ok(flows);
                    }
                    if kind == NLMSG_ERROR {
                        let code = error_code(payload);
                        if code != 0 {
                            return Err(ConntrackError(format!("dump refused: {}", Errno::from_raw(-code))));
                        }
                    }
                    if is_conntrack_entry(kind)
                        && let Some(f) = parse_flow(payload)
                    {
                        flows.push(f);
                    }
                }
            }
        })();
        self.buf = buf;
        result
    }

    fn delete_all(&mut self, flows: &[Flow]) -> Result<usize, ConntrackError> {
        let started = Instant::now();
        let budget = self.budget;
        let mut buf = std::mem::take(&mut self.buf);
        let mut deleted = 0;
        let mut errors: Vec<String> = Vec::new();
        let mut rest = flows;
        let result = (|| {
            while !rest.is_empty() {
                if started.elapsed() > budget {
                    return Err(ConntrackError(format!("deletes given up after {budget:?} ({deleted} deleted)")));
                }
                let first_seq = self.seq;
                let mut batch = Vec::with_capacity(SEND_BYTES + 256);
                let mut count = 0u32;
                while let Some(f) = rest.first()
                    && batch.len() < SEND_BYTES
                {
                    delete_request(&mut batch, f, first_seq.wrapping_add(count));
                    count += 1;
                    rest = &rest[1..];
                }
                self.next_seq(count);
                let socket = self.socket()?;
                socket.reserve_send_buffer(batch.len());
                socket.send(&batch).map_err(|e| ConntrackError(format!("sending deletes: {e}")))?;
                let mut answered = 0u32;
                while answered < count {
                    let n = match socket.recv(&mut buf, true) {
                        Ok(Some(n)) => n,
                        Ok(None) => {
                            return Err(ConntrackError(format!("no answer to the deletes within {RECV_TIMEOUT:?}")));
                        }
                        Err(e) => return Err(ConntrackError(format!("reading the deletes' answers: {e}"))),
                    };
                    for (kind, _, s, payload) in messages(&buf[..n]) {
                        if kind != NLMSG_ERROR || s.wrapping_sub(first_seq) >= count {
                            continue;
                        }
                        answered += 1;
                        match error_code(payload) {
                            0 => deleted += 1,
                            // Gone meanwhile (closed, expired, or deleted by someone else).
                            c if c == -(Errno::ENOENT as i32) => {}
                            c => errors.push(Errno::from_raw(-c).to_string()),
                        }
                    }
                }
            }
            Ok(())
        })();
        self.buf = buf;
        result?;
        if errors.is_empty() {
            Ok(deleted)
        } else {
            errors.dedup();
            Err(ConntrackError(format!("{deleted} deleted, {} refused: {}", errors.len(), errors.join(", "))))
        }
    }
}

impl ConntrackTable for NetlinkConntrack {
    fn flows(&mut self) -> Result<Vec<Flow>, ConntrackError> {
        let result = self.dump();
        if result.is_err() {
            self.socket = None;
        }
        result
    }

    fn delete(&mut self, flows: &[Flow]) -> Result<usize, ConntrackError> {
        let result = self.delete_all(flows);
        if result.is_err() {
            self.socket = None;
        }
        result
    }

    fn local_addresses(&mut self) -> Result<HashSet<IpAddr>, ConntrackError> {
        let read = || -> std::io::Result<HashSet<IpAddr>> {
            let addrs = nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)?;
            Ok(addrs
                .filter_map(|a| a.address)
                .filter_map(|a| {
                    a.as_sockaddr_in()
                        .map(|s| IpAddr::V4(s.ip()))
                        .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
                })
                .collect())
        };
        let result = match &self.netns {
            None => read(),
            Some(name) => {
                let path = format!("/run/netns/{name}");
                let ns = std::fs::File::open(&path).map_err(|e| ConntrackError(format!("{path}: {e}")))?;
                // setns moves only the calling thread: a short-lived one reads the addresses.
                std::thread::scope(|s| {
                    s.spawn(|| {
                        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                            .map_err(|e| std::io::Error::other(format!("entering {path}: {e}")))?;
                        read()
                    })
                    .join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("netns thread panicked")))
                })
            }
        };
        result.map_err(|e| ConntrackError(format!("the node's addresses: {e}")))
    }
}
