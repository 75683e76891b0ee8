//! nfnetlink_log messages, pure: the configuration requests that bind a log group, and the
//! logged packets read back out of the kernel's messages
//! (linux/netfilter/nfnetlink_log.h, linux/netfilter/nfnetlink.h).
//!
//! ```text
//!  bind_request(config, seq) ──► [nlmsghdr ULOG CONFIG REQUEST|ACK][nfgenmsg AF_UNSPEC res_id=group]
//!                                 CFG_CMD BIND, CFG_MODE {copy_range, COPY_PACKET},
//!                                 CFG_QTHRESH, CFG_TIMEOUT, CFG_FLAGS SEQ
//!  NFULNL_MSG_PACKET payload ──parse_packet──► LoggedPacket { prefix, hook, family, timestamp,
//!                                               indev, outdev, seq, headers }
//!                     NFULA_PAYLOAD ──parse_headers──► Headers { src, dst, protocol, transport }
//! ```
//!
//! No PF_BIND is sent. The kernel reads `NFULNL_CFG_CMD_PF_BIND` as "make nfnetlink_log the
//! namespace's default logger for this family" (`nf_log_bind_pf`), which a packet logged by
//! an nftables `log group N` rule never consults: that rule asks for the ULOG logger by
//! type when it is added. Binding would instead redirect the node's other default-logger
//! users (such as conntrack's invalid-packet logging) into group 0. The kernel tests log
//! without it.
//!
//! Malformed input is an error value, never a panic: every length is checked before it is
//! read (a property test feeds random bytes).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::nfnetlink::{self, NLM_F_ACK, NLM_F_REQUEST, attr, attributes};

/// The nfnetlink_log subsystem (NFNL_SUBSYS_ULOG) and its message types (enum nfulnl_msg_types).
pub const NFNL_SUBSYS_ULOG: u16 = 4;
const NFULNL_MSG_PACKET: u16 = 0;
const NFULNL_MSG_CONFIG: u16 = 1;

// enum nfulnl_attr_type
const NFULA_PACKET_HDR: u16 = 1;
const NFULA_TIMESTAMP: u16 = 3;
const NFULA_IFINDEX_INDEV: u16 = 4;
const NFULA_IFINDEX_OUTDEV: u16 = 5;
const NFULA_PAYLOAD: u16 = 9;
const NFULA_PREFIX: u16 = 10;
const NFULA_SEQ: u16 = 12;

// enum nfulnl_attr_config
const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULA_CFG_TIMEOUT: u16 = 4;
const NFULA_CFG_QTHRESH: u16 = 5;
const NFULA_CFG_FLAGS: u16 = 6;
// enum nfulnl_msg_config_cmds
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_CFG_CMD_UNBIND: u8 = 2;
const NFULNL_COPY_PACKET: u8 = 2;
/// Number each logged packet (NFULA_SEQ), so that messages lost to a full receive buffer
/// show as gaps.
const NFULNL_CFG_F_SEQ: u16 = 1;

const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// What the kernel is asked to send for each packet logged to the group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogConfig {
    /// The log group (`log group N` in the rule).
    pub group: u16,
    /// Bytes of each packet copied, from its network header: enough for the IP header
    /// (IPv4 up to 60 bytes, IPv6 40 plus extension headers) and the ports or ICMP type.
    pub copy_range: u32,
    /// Packets queued in the kernel before a message is sent; 1 sends each at once.
    pub queue_threshold: u32,
    /// A queue below the threshold is sent after this long (a rule's own
    /// `queue-threshold` overrides ours, so this bounds the wait then).
    pub flush_timeout: Duration,
}

impl LogConfig {
    /// Group `group`, 128 bytes of each packet, each packet sent at once (flushed within
    /// 100 ms should a rule queue more).
    pub fn new(group: u16) -> LogConfig {
        LogConfig { group, copy_range: 128, queue_threshold: 1, flush_timeout: Duration::from_millis(100) }
    }
}

/// A request binding this socket to `config.group` and setting what is copied and when
/// it is sent, acknowledged. The kernel refuses it with EPERM when another socket holds
/// the group (EBUSY when this one already does).
pub fn bind_request(config: &LogConfig, seq: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    let flags = NLM_F_REQUEST | NLM_F_ACK;
    nfnetlink::message(&mut out, NFNL_SUBSYS_ULOG, NFULNL_MSG_CONFIG, flags, seq, AF_UNSPEC, config.group, |out| {
        attr(out, NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND]);
        // struct nfulnl_msg_config_mode (packed): __be32 copy_range, __u8 copy_mode, pad.
        let mut mode = config.copy_range.to_be_bytes().to_vec();
        mode.extend_from_slice(&[NFULNL_COPY_PACKET, 0]);
        attr(out, NFULA_CFG_MODE, &mode);
        attr(out, NFULA_CFG_QTHRESH, &config.queue_threshold.to_be_bytes());
        // In hundredths of a second.
        let hundredths = (config.flush_timeout.as_millis() / 10).clamp(1, u32::MAX as u128) as u32;
        attr(out, NFULA_CFG_TIMEOUT, &hundredths.to_be_bytes());
        attr(out, NFULA_CFG_FLAGS, &NFULNL_CFG_F_SEQ.to_be_bytes());
    });
    out
}

/// A request releasing `group` (the kernel also releases it when the socket closes).
pub fn unbind_request(group: u16, seq: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(28);
    let flags = NLM_F_REQUEST | NLM_F_ACK;
    nfnetlink::message(&mut out, NFNL_SUBSYS_ULOG, NFULNL_MSG_CONFIG, flags, seq, AF_UNSPEC, group, |out| {
        attr(out, NFULA_CFG_CMD, &[NFULNL_CFG_CMD_UNBIND]);
    });
    out
}

/// Is `kind` (a netlink message type) a logged packet?
pub fn is_logged_packet(kind: u16) -> bool {
    kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET
}

/// The netfilter hook a packet was logged at (for the inet, ip and ip6 families): the
/// ruleset's own hook type.
pub use crate::nft::ir::Hook;

/// The protocol family the packet was logged in (the nfgenmsg's family).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    Ipv4,
    Ipv6,
    /// Another family (bridge, netdev, arp): its payload is read by the IP version nibble.
    Other(u8),
}

/// What the transport header of a logged packet says, as far as it was copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// TCP, UDP, UDP-Lite, SCTP, DCCP: their headers start with the two ports.
    Ports { src: u16, dst: u16 },
    /// ICMP or ICMPv6.
    Icmp { kind: u8, code: u8 },
    /// A fragment after the first: its transport header travels in the first fragment.
    LaterFragment,
    /// The copy ended before the transport header's first fields (or an IPv6 extension
    /// header): `protocol` is the last next-header value read.
    Truncated,
    /// A protocol without ports this reader knows of (GRE, ESP, ...).
    Opaque,
}

/// The network and transport headers of a logged packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Headers {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol number (6 TCP, 17 UDP, 132 SCTP, 1 ICMP, 58 ICMPv6), after IPv6's
    /// extension headers.
    pub protocol: u8,
    pub transport: Transport,
}

/// Why a logged packet's payload could not be read as IP headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PayloadError {
    /// No NFULA_PAYLOAD (the group copies no packet bytes).
    Missing,
    /// Fewer bytes than the IP header needs.
    TooShort { needed: usize, got: usize },
    /// Not IPv4 or IPv6 (the version nibble).
    NotIp { version: u8 },
    /// An IPv4 header length below 20 bytes.
    BadHeaderLength { ihl: u8 },
}

impl fmt::Display for PayloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PayloadError::Missing => write!(f, "no packet bytes copied"),
            PayloadError::TooShort { needed, got } => write!(f, "{got} packet bytes, the IP header needs {needed}"),
            PayloadError::NotIp { version } => write!(f, "IP version {version}"),
            PayloadError::BadHeaderLength { ihl } => write!(f, "IPv4 header length {ihl} words"),
        }
    }
}

/// One packet logged to the group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedPacket {
    /// The rule's `log prefix`, without its terminating NUL ("" when it has none).
    pub prefix: String,
    /// The hook it was logged at, or the kernel's number for a hook we never attach to.
    pub hook: Result<Hook, u8>,
    pub family: Family,
    /// When the packet arrived, if the kernel had stamped it (it does not stamp every
    /// packet: locally sent ones usually carry none).
    pub timestamp: Option<SystemTime>,
    pub indev: Option<u32>,
    pub outdev: Option<u32>,
    /// The group's packet counter (NFULA_SEQ): consecutive unless messages were lost.
    pub seq: Option<u32>,
    pub headers: Result<Headers, PayloadError>,
}

/// Why a message is no readable logged packet.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("message too short for its nfgenmsg ({0} bytes)")]
    TooShort(usize),
    #[error("no packet header attribute (NFULA_PACKET_HDR)")]
    NoPacketHeader,
    #[error("attribute {name} is {len} bytes, expected {expected}")]
    BadAttribute { name: &'static str, len: usize, expected: usize },
    #[error("timestamp out of range")]
    BadTimestamp,
}

fn exact<const N: usize>(name: &'static str, data: &[u8]) -> Result<[u8; N], WireError> {
    data.get(..N).and_then(|b| <[u8; N]>::try_from(b).ok()).ok_or(WireError::BadAttribute {
        name,
        len: data.len(),
        expected: N,
    })
}

/// The logged packet in an NFULNL_MSG_PACKET message's payload (after the netlink header).
pub fn parse_packet(payload: &[u8]) -> Result<LoggedPacket, WireError> {
    let nfgen = payload.get(..4).ok_or(WireError::TooShort(payload.len()))?;
    let family = match nfgen[0] {
        AF_INET => Family::Ipv4,
        AF_INET6 => Family::Ipv6,
        n => Family::Other(n),
    };
    let mut packet = LoggedPacket {
        prefix: String::new(),
        hook: Err(u8::MAX),
        family,
        timestamp: None,
        indev: None,
        outdev: None,
        seq: None,
        headers: Err(PayloadError::Missing),
    };
    let mut has_header = false;
    let mut bytes: Option<&[u8]> = None;
    for (kind, data) in attributes(&payload[4..]) {
        match kind {
            NFULA_PACKET_HDR => {
                // struct nfulnl_msg_packet_hdr: __be16 hw_protocol, __u8 hook, pad.
                let h: [u8; 4] = exact("NFULA_PACKET_HDR", data)?;
                packet.hook = Hook::from_number(h[2]).ok_or(h[2]);
                has_header = true;
            }
            NFULA_TIMESTAMP => {
                // struct nfulnl_msg_packet_timestamp: __be64 sec, __be64 usec.
                let t: [u8; 16] = exact("NFULA_TIMESTAMP", data)?;
                let sec = u64::from_be_bytes(t[..8].try_into().expect("8 bytes"));
                let usec = u64::from_be_bytes(t[8..].try_into().expect("8 bytes"));
                let since_epoch =
                    Duration::from_secs(sec).checked_add(Duration::from_micros(usec)).ok_or(WireError::BadTimestamp)?;
                packet.timestamp = Some(UNIX_EPOCH.checked_add(since_epoch).ok_or(WireError::BadTimestamp)?);
            }
            NFULA_IFINDEX_INDEV => packet.indev = Some(u32::from_be_bytes(exact("NFULA_IFINDEX_INDEV", data)?)),
            NFULA_IFINDEX_OUTDEV => packet.outdev = Some(u32::from_be_bytes(exact("NFULA_IFINDEX_OUTDEV", data)?)),
            NFULA_SEQ => packet.seq = Some(u32::from_be_bytes(exact("NFULA_SEQ", data)?)),
            NFULA_PREFIX => {
                let text = data.split(|&b| b == 0).next().unwrap_or_default();
                packet.prefix = String::from_utf8_lossy(text).into_owned();
            }
            NFULA_PAYLOAD => bytes = Some(data),
            _ => {}
        }
    }
    if !has_header {
        return Err(WireError::NoPacketHeader);
    }
    if let Some(bytes) = bytes {
        packet.headers = parse_headers(family, bytes);
    }
    Ok(packet)
}

/// The IP and transport headers at the start of `bytes` (a packet from its network header,
/// cut at the copy range).
pub fn parse_headers(family: Family, bytes: &[u8]) -> Result<Headers, PayloadError> {
    let version = match family {
        Family::Ipv4 => 4,
        Family::Ipv6 => 6,
        Family::Other(_) => bytes.first().ok_or(PayloadError::TooShort { needed: 1, got: 0 })? >> 4,
    };
    match version {
        4 => ipv4(bytes),
        6 => ipv6(bytes),
        version => Err(PayloadError::NotIp { version }),
    }
}

fn too_short(needed: usize, bytes: &[u8]) -> PayloadError {
    PayloadError::TooShort { needed, got: bytes.len() }
}

fn ipv4(b: &[u8]) -> Result<Headers, PayloadError> {
    if b.len() < 20 {
        return Err(too_short(20, b));
    }
    let ihl = b[0] & 0x0f;
    let header_len = usize::from(ihl) * 4;
    if header_len < 20 {
        return Err(PayloadError::BadHeaderLength { ihl });
    }
    let src = IpAddr::V4(Ipv4Addr::new(b[12], b[13], b[14], b[15]));
    let dst = IpAddr::V4(Ipv4Addr::new(b[16], b[17], b[18], b[19]));
    let protocol = b[9];
    let fragment_offset = u16::from_be_bytes([b[6], b[7]]) & 0x1fff;
    let transport = if fragment_offset != 0 {
        Transport::LaterFragment
    } else {
        match b.get(header_len..) {
            Some(l4) => transport(protocol, l4),
            None => Transport::Truncated,
        }
    };
    Ok(Headers { src, dst, protocol, transport })
}

/// IPv6 extension headers this reader steps over (RFC 8200 section 4, RFC 6275, RFC 7401,
/// RFC 5533): each starts with its next header and its length in 8-byte units beyond
/// the first 8.
const HOP_BY_HOP: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const AUTH: u8 = 51;
const DEST_OPTIONS: u8 = 60;
const MOBILITY: u8 = 135;
const HIP: u8 = 139;
const SHIM6: u8 = 140;

fn ipv6(b: &[u8]) -> Result<Headers, PayloadError> {
    if b.len() < 40 {
        return Err(too_short(40, b));
    }
    let addr = |at: usize| {
        let octets: [u8; 16] = b[at..at + 16].try_into().expect("16 bytes within the 40 checked");
        IpAddr::V6(Ipv6Addr::from(octets))
    };
    let (src, dst) = (addr(8), addr(24));
    let mut next = b[6];
    let mut at = 40;
    // Each step consumes at least 8 bytes, so the walk ends with the copied bytes.
    let transport = loop {
        let Some(ext) = b.get(at..) else { break Transport::Truncated };
        match next {
            FRAGMENT => {
                let Some(h) = ext.get(..8) else { break Transport::Truncated };
                let offset = u16::from_be_bytes([h[2], h[3]]) >> 3;
                next = h[0];
                if offset != 0 {
                    break Transport::LaterFragment;
                }
                at += 8;
            }
            AUTH => {
                // RFC 4302: the length is in 4-byte units beyond the first 8 bytes.
                let Some(h) = ext.get(..2) else { break Transport::Truncated };
                next = h[0];
                at += (usize::from(h[1]) + 2) * 4;
            }
            HOP_BY_HOP | ROUTING | DEST_OPTIONS | MOBILITY | HIP | SHIM6 => {
                let Some(h) = ext.get(..2) else { break Transport::Truncated };
                next = h[0];
                at += (usize::from(h[1]) + 1) * 8;
            }
            protocol => break transport(protocol, ext),
        }
    };
    Ok(Headers { src, dst, protocol: next, transport })
}

fn transport(protocol: u8, l4: &[u8]) -> Transport {
    match protocol {
        // TCP, UDP, DCCP, SCTP, UDP-Lite
        6 | 17 | 33 | 132 | 136 => match l4.get(..4) {
            Some(p) => {
                Transport::Ports { src: u16::from_be_bytes([p[0], p[1]]), dst: u16::from_be_bytes([p[2], p[3]]) }
            }
            None => Transport::Truncated,
        },
        // ICMP, ICMPv6
        1 | 58 => match l4.get(..2) {
            Some(t) => Transport::Icmp { kind: t[0], code: t[1] },
            None => Transport::Truncated,
        },
        _ => Transport::Opaque,
    }
}

/// What the kernel sends for one logged packet, enough of it for the parser (the unit
/// tests' fixtures): family, hook, optional timestamp, devices, sequence number, prefix
/// and packet bytes.
#[cfg(test)]
pub(crate) struct PacketMessage<'a> {
    pub family: u8,
    pub hook: u8,
    pub timestamp: Option<(u64, u64)>,
    pub indev: Option<u32>,
    pub outdev: Option<u32>,
    pub seq: Option<u32>,
    pub prefix: Option<&'a str>,
    pub payload: Option<&'a [u8]>,
}

#[cfg(test)]
impl PacketMessage<'_> {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        nfnetlink::message(&mut out, NFNL_SUBSYS_ULOG, NFULNL_MSG_PACKET, 0, 0, self.family, 7, |out| {
            let hw_protocol: u16 = if self.family == AF_INET6 { 0x86dd } else { 0x0800 };
            let [p0, p1] = hw_protocol.to_be_bytes();
            attr(out, NFULA_PACKET_HDR, &[p0, p1, self.hook, 0]);
            attr(out, 2, &0u32.to_be_bytes()); // NFULA_MARK, which the parser skips
            if let Some((sec, usec)) = self.timestamp {
                attr(out, NFULA_TIMESTAMP, &[sec.to_be_bytes(), usec.to_be_bytes()].concat());
            }
            if let Some(i) = self.indev {
                attr(out, NFULA_IFINDEX_INDEV, &i.to_be_bytes());
            }
            if let Some(i) = self.outdev {
                attr(out, NFULA_IFINDEX_OUTDEV, &i.to_be_bytes());
            }
            if let Some(p) = self.prefix {
                attr(out, NFULA_PREFIX, &[p.as_bytes(), &[0]].concat());
            }
            if let Some(s) = self.seq {
                attr(out, NFULA_SEQ, &s.to_be_bytes());
            }
            if let Some(p) = self.payload {
                attr(out, NFULA_PAYLOAD, p);
            }
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nfnetlink::messages;

    /// An IPv4 header (20 bytes, no options) of `protocol` from `src` to `dst`, then `l4`.
    fn ipv4_packet(src: [u8; 4], dst: [u8; 4], protocol: u8, fragment: u16, l4: &[u8]) -> Vec<u8> {
        let total = (20 + l4.len()) as u16;
        let [t0, t1] = total.to_be_bytes();
        let [f0, f1] = fragment.to_be_bytes();
        let mut p = vec![0x45, 0, t0, t1, 0, 1, f0, f1, 64, protocol, 0, 0];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(l4);
        p
    }

    /// An IPv6 header from `src` to `dst` whose next header is `next`, then `rest`.
    fn ipv6_packet(src: &str, dst: &str, next: u8, rest: &[u8]) -> Vec<u8> {
        let (s, d): (Ipv6Addr, Ipv6Addr) = (src.parse().unwrap(), dst.parse().unwrap());
        let [l0, l1] = (rest.len() as u16).to_be_bytes();
        let mut p = vec![0x60, 0, 0, 0, l0, l1, next, 64];
        p.extend_from_slice(&s.octets());
        p.extend_from_slice(&d.octets());
        p.extend_from_slice(rest);
        p
    }

    fn ports(src: u16, dst: u16) -> Vec<u8> {
        [src.to_be_bytes(), dst.to_be_bytes()].concat()
    }

    fn packet<'a>(family: u8, prefix: &'a str, payload: &'a [u8]) -> PacketMessage<'a> {
        PacketMessage {
            family,
            hook: 2,
            timestamp: None,
            indev: Some(3),
            outdev: Some(4),
            seq: Some(0),
            prefix: Some(prefix),
            payload: Some(payload),
        }
    }

    /// The payload after the netlink header of the single message in `datagram`.
    fn parse(datagram: &[u8]) -> Result<LoggedPacket, WireError> {
        let (kind, _, _, payload) = messages(datagram).next().expect("one message");
        assert!(is_logged_packet(kind));
        parse_packet(payload)
    }

    #[test]
    fn the_bind_request_binds_the_group_and_copies_headers_at_once_numbered() {
        let req = bind_request(&LogConfig::new(0x0102), 5);
        assert_eq!(u32::from_ne_bytes(req[0..4].try_into().unwrap()) as usize, req.len());
        assert_eq!(u16::from_ne_bytes([req[4], req[5]]), 0x0401, "ULOG, CONFIG");
        assert_eq!(u16::from_ne_bytes([req[6], req[7]]), 0x0005, "request, ack");
        assert_eq!(&req[16..20], &[0, 0, 1, 2], "AF_UNSPEC, V0, group 0x0102 big-endian");
        let attrs: Vec<(u16, Vec<u8>)> = attributes(&req[20..]).map(|(k, v)| (k, v.to_vec())).collect();
        assert_eq!(
            attrs,
            vec![
                (NFULA_CFG_CMD, vec![NFULNL_CFG_CMD_BIND]),
                (NFULA_CFG_MODE, vec![0, 0, 0, 128, NFULNL_COPY_PACKET, 0]),
                (NFULA_CFG_QTHRESH, vec![0, 0, 0, 1]),
                (NFULA_CFG_TIMEOUT, vec![0, 0, 0, 10]),
                (NFULA_CFG_FLAGS, vec![0, 1]),
            ]
        );
        let unbind = unbind_request(7, 6);
        assert_eq!(&unbind[16..], &[0, 0, 0, 7, 5, 0, 1, 0, NFULNL_CFG_CMD_UNBIND, 0, 0, 0]);
    }

    #[test]
    fn a_logged_tcp_syn_reads_as_its_prefix_addresses_and_ports() {
        let bytes = ipv4_packet([10, 0, 0, 1], [10, 0, 0, 2], 6, 0x4000, &[ports(40000, 80), vec![0; 16]].concat());
        let msg = PacketMessage { timestamp: Some((1_700_000_000, 250_000)), ..packet(AF_INET, "np:7", &bytes) };
        let p = parse(&msg.encode()).unwrap();
        assert_eq!(p.prefix, "np:7");
        assert_eq!(p.family, Family::Ipv4);
        assert_eq!(p.hook, Ok(Hook::Forward));
        assert_eq!(p.timestamp, Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_250)));
        assert_eq!((p.indev, p.outdev, p.seq), (Some(3), Some(4), Some(0)));
        assert_eq!(
            p.headers,
            Ok(Headers {
                src: "10.0.0.1".parse().unwrap(),
                dst: "10.0.0.2".parse().unwrap(),
                protocol: 6,
                transport: Transport::Ports { src: 40000, dst: 80 },
            })
        );
    }

    #[test]
    fn a_packet_without_timestamp_devices_or_prefix_has_none_of_them() {
        let bytes = ipv4_packet([10, 0, 0, 1], [10, 0, 0, 2], 1, 0, &[8, 0, 0xf7, 0xff, 0, 0, 0, 0]);
        let msg = PacketMessage {
            timestamp: None,
            indev: None,
            outdev: None,
            seq: None,
            prefix: None,
            ..packet(2, "", &bytes)
        };
        let p = parse(&msg.encode()).unwrap();
        assert_eq!((p.timestamp, p.indev, p.outdev, p.seq), (None, None, None, None));
        assert_eq!(p.prefix, "");
        assert_eq!(p.headers.unwrap().transport, Transport::Icmp { kind: 8, code: 0 });
    }

    #[test]
    fn ipv6_extension_headers_are_stepped_over_to_the_transport_header() {
        // Hop-by-hop (8 bytes) → destination options (16 bytes) → UDP.
        let rest = [vec![60, 0, 1, 4, 0, 0, 0, 0], vec![17, 1], vec![0; 14], ports(5353, 53)].concat();
        let bytes = ipv6_packet("fd00::1", "fd00::2", HOP_BY_HOP, &rest);
        let h = parse(&packet(AF_INET6, "x", &bytes).encode()).unwrap().headers.unwrap();
        assert_eq!((h.src, h.dst), ("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap()));
        assert_eq!((h.protocol, h.transport), (17, Transport::Ports { src: 5353, dst: 53 }));
        // An authentication header counts its length in 4-byte units: 12 bytes here.
        let rest = [vec![58, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], vec![128, 0]].concat();
        let h = parse_headers(Family::Ipv6, &ipv6_packet("fd00::1", "fd00::2", AUTH, &rest)).unwrap();
        assert_eq!((h.protocol, h.transport), (58, Transport::Icmp { kind: 128, code: 0 }));
    }

    #[test]
    fn a_first_fragment_has_ports_and_a_later_one_says_it_is_a_fragment() {
        // IPv4: more-fragments with offset 0, then offset 185 (1480 bytes).
        let first = ipv4_packet([10, 0, 0, 1], [10, 0, 0, 2], 17, 0x2000, &ports(1000, 2000));
        let later = ipv4_packet([10, 0, 0, 1], [10, 0, 0, 2], 17, 185, &[1, 2, 3, 4]);
        assert_eq!(parse_headers(Family::Ipv4, &first).unwrap().transport, Transport::Ports { src: 1000, dst: 2000 });
        let h = parse_headers(Family::Ipv4, &later).unwrap();
        assert_eq!((h.protocol, h.transport), (17, Transport::LaterFragment));
        // IPv6: a fragment header with offset 0 (more fragments), then offset 1480/8.
        let frag = |offset: u16| {
            let [o0, o1] = ((offset << 3) | 1).to_be_bytes();
            vec![6, 0, o0, o1, 0, 0, 0, 9]
        };
        let first = ipv6_packet("fd00::1", "fd00::2", FRAGMENT, &[frag(0), ports(1, 443)].concat());
        let later = ipv6_packet("fd00::1", "fd00::2", FRAGMENT, &[frag(185), vec![0; 8]].concat());
        let h = parse_headers(Family::Ipv6, &first).unwrap();
        assert_eq!((h.protocol, h.transport), (6, Transport::Ports { src: 1, dst: 443 }));
        let h = parse_headers(Family::Ipv6, &later).unwrap();
        assert_eq!((h.protocol, h.transport), (6, Transport::LaterFragment));
    }

    #[test]
    fn a_short_copy_keeps_what_it_holds_and_says_what_is_missing() {
        let full = ipv4_packet([10, 0, 0, 1], [10, 0, 0, 2], 6, 0, &ports(1, 2));
        // The IP header whole, two bytes of TCP: addresses known, ports not.
        let h = parse_headers(Family::Ipv4, &full[..22]).unwrap();
        assert_eq!((h.dst, h.protocol, h.transport), ("10.0.0.2".parse().unwrap(), 6, Transport::Truncated));
        assert_eq!(parse_headers(Family::Ipv4, &full[..19]), Err(PayloadError::TooShort { needed: 20, got: 19 }));
        // Options announced but not copied.
        let mut opts = full.clone();
        opts[0] = 0x4f;
        assert_eq!(parse_headers(Family::Ipv4, &opts).unwrap().transport, Transport::Truncated);
        opts[0] = 0x44;
        assert_eq!(parse_headers(Family::Ipv4, &opts), Err(PayloadError::BadHeaderLength { ihl: 4 }));
        // IPv6 cut inside a hop-by-hop header.
        let v6 = ipv6_packet("fd00::1", "fd00::2", HOP_BY_HOP, &[17, 0, 0, 0, 0, 0, 0, 0]);
        let h = parse_headers(Family::Ipv6, &v6[..41]).unwrap();
        assert_eq!((h.protocol, h.transport), (HOP_BY_HOP, Transport::Truncated));
        assert_eq!(parse_headers(Family::Ipv6, &v6[..39]), Err(PayloadError::TooShort { needed: 40, got: 39 }));
        // A bridge-family log: read by the version nibble.
        assert_eq!(parse_headers(Family::Other(7), &v6).unwrap().protocol, 17);
        assert_eq!(parse_headers(Family::Other(7), &[0x20]), Err(PayloadError::NotIp { version: 2 }));
        assert_eq!(parse_headers(Family::Other(7), &[]), Err(PayloadError::TooShort { needed: 1, got: 0 }));
        // Nothing copied.
        let msg = PacketMessage { payload: None, ..packet(AF_INET, "p", &[]) };
        assert_eq!(parse(&msg.encode()).unwrap().headers, Err(PayloadError::Missing));
    }

    #[test]
    fn a_message_without_a_packet_header_or_with_a_short_attribute_is_an_error() {
        assert_eq!(parse_packet(&[2, 0]), Err(WireError::TooShort(2)));
        assert_eq!(parse_packet(&[2, 0, 0, 7]), Err(WireError::NoPacketHeader));
        let bytes = ipv4_packet([10, 0, 0, 1], [10, 0, 0, 2], 6, 0, &ports(1, 2));
        let mut msg = packet(AF_INET, "p", &bytes).encode();
        // The PACKET_HDR attribute follows the 20 header bytes: shrink it to 3 bytes.
        msg[20] = 7;
        let (_, _, _, payload) = messages(&msg).next().unwrap();
        assert_eq!(
            parse_packet(payload),
            Err(WireError::BadAttribute { name: "NFULA_PACKET_HDR", len: 3, expected: 4 })
        );
        let huge = PacketMessage { timestamp: Some((u64::MAX, 999_999)), ..packet(AF_INET, "p", &bytes) };
        assert_eq!(parse(&huge.encode()), Err(WireError::BadTimestamp));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        #[test]
        fn random_bytes_never_panic_the_parser(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = parse_packet(&bytes);
            let _ = parse_headers(Family::Ipv4, &bytes);
            let _ = parse_headers(Family::Ipv6, &bytes);
            let _ = parse_headers(Family::Other(0), &bytes);
        }

        #[test]
        fn random_packet_bytes_inside_a_wellformed_message_never_panic(
            payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..160),
            family in proptest::prop_oneof![proptest::prelude::Just(AF_INET), proptest::prelude::Just(AF_INET6), proptest::prelude::Just(7u8)],
        ) {
            let msg = packet(family, "p", &payload).encode();
            let parsed = parse(&msg);
            proptest::prop_assert!(parsed.is_ok(), "a well-formed message always parses: {parsed:?}");
        }
    }
}
