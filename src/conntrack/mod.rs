//! Connection tracking: ending the established flows a ruleset change no longer admits, and
//! the flows of addresses whose pods are gone (issue 14).
//!
//! ```text
//!  NftTarget sync, after nft accepted the transaction:
//!   previous pods' IPs − new pods' IPs ──► gone addresses ─┐
//!   may_tighten(transaction) ──► yes ──► Interpreter(desired) ┤
//!                                                           ▼
//!   ConntrackTable::flows() ──► Vec<Flow> ──► decide::flows_to_delete (pure) ──► delete(flows)
//!    ├─ NetlinkConntrack: ctnetlink dump / delete in the node's netns (socket.rs, wire.rs)
//!    └─ RecordingConntrack: an in-memory table that records what was deleted (tests)
//! ```
//!
//! A flow is decided as the first packet of its connection, `ct state new`, at the hook it
//! crossed on this node: the ruleset's first rules accept anything established, so only a
//! new packet meets the policy chains. Flows the ruleset still admits are never touched.

pub mod decide;
pub mod fake;
pub mod socket;
pub mod wire;

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;

pub use decide::{NodeAddresses, Reason, flows_to_delete, may_tighten};
pub use fake::RecordingConntrack;
pub use socket::NetlinkConntrack;

/// One direction of a conntrack entry. For ICMP (and ICMPv6) `sport` is the echo id and
/// `dport` the type (high byte) and code (low byte), as ctnetlink keys them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol number (6 TCP, 17 UDP, 132 SCTP).
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
}

/// A conntrack entry: what its first packet looked like (`original`), what the answers
/// look like (`reply`: after DNAT its source is the real destination).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Flow {
    pub original: Tuple,
    pub reply: Tuple,
    pub zone: u16,
    /// The kernel's id of the entry (CTA_ID): a delete with it never hits a newer entry
    /// that reuses the tuple.
    pub id: Option<u32>,
}

impl Tuple {
    /// The same connection seen from the other end: what its answers look like when no
    /// NAT rewrote it.
    pub fn reversed(self) -> Tuple {
        Tuple { src: self.dst, dst: self.src, proto: self.proto, sport: self.dport, dport: self.sport }
    }
}

impl Flow {
    /// The entry of a connection no NAT rewrote (the reply is the original reversed), in
    /// zone 0, without a kernel id.
    pub fn without_nat(original: Tuple) -> Flow {
        Flow { original, reply: original.reversed(), zone: 0, id: None }
    }

    /// The addresses at the ends of both directions (after NAT, the reply's differ).
    pub fn addresses(&self) -> [IpAddr; 4] {
        [self.original.src, self.original.dst, self.reply.src, self.reply.dst]
    }

    /// Does either direction of the flow have `addr` at one end?
    pub fn touches(&self, addr: &IpAddr) -> bool {
        self.addresses().contains(addr)
    }
}

impl fmt::Display for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.original;
        write!(f, "{} {}:{} -> {}:{}", crate::nft::ir::proto_name(o.proto), o.src, o.sport, o.dst, o.dport)
    }
}

/// A conntrack operation that failed (the socket, the kernel's answer, or its time-out).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("conntrack: {0}")]
pub struct ConntrackError(pub String);

/// The conntrack table of the node the agent programs.
pub trait ConntrackTable: Send + fmt::Debug {
    /// Every entry, of both families.
    fn flows(&mut self) -> Result<Vec<Flow>, ConntrackError>;

    /// Deletes these entries; how many were deleted (entries already gone do not count).
    fn delete(&mut self, flows: &[Flow]) -> Result<usize, ConntrackError>;

    /// The node's own addresses: a flow from one of them was sent by the node (its
    /// `output` hook is not policed), a flow to one of them crossed `input`.
    fn local_addresses(&mut self) -> Result<HashSet<IpAddr>, ConntrackError>;
}
