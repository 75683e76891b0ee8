//! The drop log's reader: packets an nftables `log group N` rule sent to nfnetlink_log,
//! read over our own netlink socket and made into attributed drop records (issue 18).
//!
//! ```text
//!  kernel: pod chain ── limit ── log prefix "<id>" group G ── drop
//!              │ NFULNL_MSG_PACKET (prefix, hook, devices, seq, first 128 bytes)
//!              ▼
//!  socket.rs   NflogSocket (bound to G in the node's netns) ──► NflogReader thread ──► sink
//!  wire.rs     bind_request / parse_packet ──► LoggedPacket { prefix, hook, headers, ... }
//!  record.rs   drop_record(packet, prefix → attribution, address → pod) ──► DropRecord
//! ```
//!
//! | file        | what |
//! |-------------|------|
//! | `wire.rs`   | configuration requests and packet messages (pure) |
//! | `socket.rs` | the socket in a netns, receives with a bound, overruns counted, the reader thread |
//! | `record.rs` | a logged packet + the caller's lookups → a drop record (pure) |
//!
//! One socket holds a group per network namespace (a second bind is refused with EBUSY);
//! the kernel queues messages in the socket's receive buffer, and when that is full drops
//! them: the reader sees ENOBUFS once, reads on, and counts the lost packets from the
//! group's sequence numbers.

pub mod record;
pub mod socket;
pub mod wire;

use std::time::SystemTime;

pub use record::{Attribution, Direction, DropRecord, Endpoint, PodRef, attributions, drop_record, pod_holding};
pub use socket::{DEFAULT_RECEIVE_BUFFER, NflogReader, NflogSocket, ReaderCounts};
pub use wire::{Headers, LogConfig, LoggedPacket, Transport};

/// A logged packet and when the reader got it (the kernel stamps only some packets).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceivedPacket {
    pub packet: LoggedPacket,
    pub received_at: SystemTime,
}
