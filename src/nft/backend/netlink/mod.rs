//! nftables over netlink, in process: the agent's transactions without an `nft` process.
//!
//! ```text
//!  Transaction ──encode──► one batch [BEGIN, NEWTABLE/NEWSET/NEWCHAIN/NEWRULE/NEWSETELEM/..., END]
//!       │                        └──socket.send (one sendmsg: the kernel commits it whole or not
//!       │                             at all) ──socket.recv──► parse::messages ──► errors, ack
//!       └─ range changes in an existing interval set, or the first transaction after the
//!          kernel refused a batch ──► the whole transaction through `nft -f` (RealNftables)
//! ```
//!
//! | file        | what |
//! |-------------|------|
//! | `encode.rs` | IR → nf_tables messages (pure) |
//! | `socket.rs` | the `NETLINK_NETFILTER` socket: open, send, receive |
//! | `parse.rs`  | datagrams → messages → attributes (pure; the monitor and conntrack read with it too) |
//! | `counters.rs` | the table's named counters, dumped (what `nft -j list counters` prints) |
//! | `generation.rs` | the ruleset's generation (how many commits a stretch of time held) |
//! | `mod.rs`    | the wire constants they share, and [`NetlinkNftables`], which ties them |
//!
//! Why: an `nft -f` process costs ~25 ms per transaction on a quiet 2-core node whatever
//! its size — starting it, reading the table's chains, sets and interval elements into its
//! cache, and, when it exits, closing its netlink socket, which waits for the kernel to
//! release the committed transaction (an RCU grace period) — and seconds to parse a large
//! full sync. A long-lived socket and a batch encoded from the IR cost well under a
//! millisecond for the element and chain changes pod churn makes.
//!
//! The encoding mirrors what nft 1.0 sends for the same text, expression by expression and
//! element by element (`tests/it/compile.rs` compares the kernel's view of both paths,
//! `nft --debug=netlink list` and the listing; the unit tests pin the set declarations'
//! user data, which no listing shows). The kinds of the table's sets (interval or not, set
//! or map) come from what was applied through this value.

mod counters;
mod encode;
pub mod generation;
mod parse;
mod socket;

use nix::errno::Errno;

use super::process::RealNftables;
use crate::nft::{CounterValue, NftError, Nftables, Transaction};
pub use counters::{CounterReader, read_counters};
use encode::{Encoded, KnownSets, encode};
pub use parse::{attributes, element_keys, messages, messages_with_sender, nftables_message};
pub use socket::{Listener, NetlinkSocket};

// ---------------------------------------------------------------- constants shared by encode and parse
// (linux/netlink.h, linux/netfilter/nfnetlink.h, linux/netfilter/nf_tables.h)

pub(crate) const NFNL_SUBSYS_NFTABLES: u16 = 10;

pub(crate) const NLMSG_ERROR: u16 = 2;

pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_ACK: u16 = 0x4;
pub(crate) const NLA_F_NESTED: u16 = 0x8000;

/// nf_tables message types.
pub mod msg {
    pub const NEWTABLE: u16 = 0;
    pub const DELTABLE: u16 = 2;
    pub const NEWCHAIN: u16 = 3;
    pub const DELCHAIN: u16 = 5;
    pub const NEWRULE: u16 = 6;
    pub const DELRULE: u16 = 8;
    pub const NEWSET: u16 = 9;
    pub const DELSET: u16 = 11;
    pub const NEWSETELEM: u16 = 12;
    pub const DELSETELEM: u16 = 14;
    pub const NEWGEN: u16 = 15;
    pub const GETGEN: u16 = 16;
    pub const NEWOBJ: u16 = 18;
    pub const DELOBJ: u16 = 20;
}

/// Also the element list's attributes: table, set, elements.
pub const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
pub const NFTA_SET_ELEM_LIST_SET: u16 = 2;
pub const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
pub const NFTA_LIST_ELEM: u16 = 1;
pub const NFTA_SET_ELEM_KEY: u16 = 1;
pub const NFTA_DATA_VALUE: u16 = 1;

/// The nf_tables multicast group (NFNLGRP_NFTABLES): every committed change, then NEWGEN.
pub const NFNLGRP_NFTABLES: u32 = 7;

// ---------------------------------------------------------------- the Nftables

/// [`Nftables`] that sends what it can encode over its own netlink socket and the rest
/// through `nft -f`; checks and listings always go through nft.
#[derive(Debug)]
pub struct NetlinkNftables {
    /// `None`: no socket could be opened; everything goes through nft.
    socket: Option<NetlinkSocket>,
    nft: RealNftables,
    /// `None` after a failure: nothing is known until the next full sync.
    known: Option<KnownSets>,
    seq: u32,
    /// The kernel refused the last batch: send the next transactions through nft until
    /// one succeeds.
    nft_next: bool,
    /// Where the kernel's answers are read (an error quotes the message it refuses, up to
    /// an element list's 32 KiB).
    answers: Vec<u8>,
    /// Transactions sent over netlink, and through nft.
    pub sent: (u64, u64),
}

impl NetlinkNftables {
    /// A socket in `nft`'s network namespace (`nft.netns`, or ours).
    pub fn open(nft: RealNftables) -> std::io::Result<NetlinkNftables> {
        let socket = NetlinkSocket::open(nft.netns.as_deref(), 0)?;
        super::monitor::note_own_socket(socket.port()?);
        // The answer is there when the send returns; this only bounds a kernel gone wrong
        // (each receive, and with the deadline in `send_batch` all of them together).
        socket.set_receive_timeout(nft.timeout)?;
        let seq =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as u32).unwrap_or(1);
        Ok(NetlinkNftables {
            socket: Some(socket),
            nft,
            known: None,
            seq,
            nft_next: false,
            answers: vec![0; 64 * 1024],
            sent: (0, 0),
        })
    }

    /// Everything through nft (when no netlink socket can be had).
    pub fn nft_only(nft: RealNftables) -> NetlinkNftables {
        NetlinkNftables { socket: None, nft, known: None, seq: 1, nft_next: false, answers: Vec::new(), sent: (0, 0) }
    }

    /// The nft this value falls back to (and lists and checks with).
    pub fn nft(&self) -> &RealNftables {
        &self.nft
    }

    /// Applies `tx` through nft whatever it holds (tests compare both paths), keeping
    /// track of the table's sets as `apply` does.
    pub fn apply_via_nft(&mut self, tx: &Transaction) -> Result<(), NftError> {
        let was = std::mem::replace(&mut self.nft_next, true);
        let result = self.apply(tx);
        self.nft_next = was && result.is_err();
        result
    }

    fn send_batch(
        socket: &NetlinkSocket,
        buf: &mut [u8],
        tx: &Transaction,
        batch: &[u8],
        origins: &[(u32, usize)],
    ) -> Result<(), NftError> {
        let rejected = |what: String| NftError::Rejected(what);
        let Some(&(last_seq, _)) = origins.last() else { return Ok(()) };
        socket.reserve_send_buffer(batch.len());
        socket.send(batch).map_err(|e| rejected(format!("sending the batch over netlink: {e}")))?;
        // The kernel handled the batch inside the send: its errors, then the last
        // message's acknowledgement, are waiting.
        let mut errors: Vec<String> = Vec::new();
        let deadline = std::time::Instant::now() + socket.receive_timeout();
        loop {
            if std::time::Instant::now() >= deadline {
                return Err(rejected("the kernel did not finish answering the batch in time".into()));
            }
            let n = match socket.recv(buf, true) {
                Ok(Some(n)) => n,
                Ok(None) => return Err(rejected("the kernel did not answer the batch".into())),
                Err(e) => return Err(rejected(format!("reading the kernel's answer: {e}"))),
            };
            let mut done = false;
            for (kind, _, seq, payload) in messages(&buf[..n]) {
                if kind != NLMSG_ERROR || payload.len() < 4 {
                    continue;
                }
                done |= seq == last_seq;
                let code = i32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]]);
                if code == 0 {
                    continue;
                }
                let errno = Errno::from_raw(-code);
                let op = origins.iter().find(|(s, _)| *s == seq).and_then(|(_, op)| tx.ops.get(*op));
                errors.push(match op {
                    Some(op) => {
                        let text: String = crate::nft::render::op(&tx.table, op).chars().take(200).collect();
                        format!("{errno}: {text}")
                    }
                    None => errno.to_string(),
                });
            }
            if done {
                break;
            }
        }
        if errors.is_empty() { Ok(()) } else { Err(rejected(errors.join("; "))) }
    }
}

/// A transaction of at least this many set elements is committed with our own table
/// monitors not listening ([`super::monitor::quietly`]). The kernel builds an announcement
/// of each element for a listening group. Full syncs of large clusters are over this
/// (494 000 elements at 100 000 pods), and their commit took 9.8-10.2 s beside the
/// monitor and 0.77-0.93 s without it. Staged fills' chunks (at most 8 192 elements) and pod
/// churn stay under it: a foreign commit made while nobody listens costs a full sync, which
/// must stay rare.
pub const QUIET_COMMIT_ELEMENTS: usize = 65_536;

impl Nftables for NetlinkNftables {
    fn apply(&mut self, tx: &Transaction) -> Result<(), NftError> {
        if tx.stats().elements >= QUIET_COMMIT_ELEMENTS {
            let netns = self.nft.netns.clone();
            super::monitor::quietly(netns.as_deref(), || self.apply_announced(tx))
        } else {
            self.apply_announced(tx)
        }
    }

    fn check(&self, tx: &Transaction) -> Result<(), NftError> {
        self.nft.check(tx)
    }

    fn list(&self, table: &str) -> Result<String, NftError> {
        self.nft.list(table)
    }

    fn counters(&self, table: &str) -> Result<Vec<CounterValue>, NftError> {
        read_counters(self.nft.netns.as_deref(), table, self.nft.timeout)
    }
}

impl NetlinkNftables {
    /// [`Nftables::apply`], whoever listens.
    fn apply_announced(&mut self, tx: &Transaction) -> Result<(), NftError> {
        // After the kernel refused a batch, the next transaction (a full sync) goes through
        // nft: should our encoding ever be what the kernel refuses, nft still gets through.
        let encoded = match &self.socket {
            Some(socket) if !self.nft_next => encode(tx, self.known.as_ref(), self.seq).ok().map(|e| (socket, e)),
            _ => None,
        };
        let result = match encoded {
            Some((socket, Encoded { batch, origins })) => {
                self.seq = self.seq.wrapping_add(origins.len() as u32 + 2);
                self.sent.0 += 1;
                tracing::debug!(via = "netlink", messages = origins.len(), bytes = batch.len(), "transaction");
                let result = Self::send_batch(socket, &mut self.answers, tx, &batch, &origins);
                self.nft_next = result.is_err();
                result
            }
            None => {
                self.sent.1 += 1;
                tracing::debug!(via = "nft", ops = tx.ops.len(), "transaction");
                let result = self.nft.apply(tx);
                self.nft_next &= result.is_err();
                result
            }
        };
        match result {
            Ok(()) => {
                self.known.get_or_insert_with(KnownSets::default).applied(tx);
                Ok(())
            }
            Err(e) => {
                self.known = None;
                Err(e)
            }
        }
    }
}
