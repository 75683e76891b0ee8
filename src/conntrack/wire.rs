//! ctnetlink messages, pure: the dump request, delete requests built from a dumped flow, and
//! the flows read back out of the kernel's answers (linux/netfilter/nfnetlink_conntrack.h).
//!
//! ```text
//!  dump_request(seq) ──► [nlmsghdr CT_GET REQUEST|DUMP][nfgenmsg AF_UNSPEC]   (every family)
//!  answer datagrams ──► messages ──► parse_flow(family, attributes) ──► Flow
//!  delete_request(flow, seq) ──► [nlmsghdr CT_DELETE REQUEST|ACK][nfgenmsg family]
//!                                 CTA_TUPLE_ORIG { IP { src, dst }, PROTO { num, ports } }
//!                                 CTA_ZONE (when not 0), CTA_ID (the entry dumped, no other)
//! ```
//!
//! A delete request always carries a tuple: ctnetlink reads one without a tuple as "flush
//! the whole table", which this module can never send.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::nfnetlink::{self, NLM_F_ACK, NLM_F_REQUEST, attr, attributes, nest};

use super::{Flow, Tuple};

/// The ctnetlink subsystem (NFNL_SUBSYS_CTNETLINK) and its message types (IPCTNL_MSG_CT_*).
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLM_F_DUMP: u16 = 0x300;
/// The end of a dump.
pub const NLMSG_DONE: u16 = 3;

const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

// enum ctattr_type
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
// enum ctattr_tuple
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
// enum ctattr_ip
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
// enum ctattr_l4proto
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTO_ICMP_ID: u16 = 4;
const CTA_PROTO_ICMP_TYPE: u16 = 5;
const CTA_PROTO_ICMP_CODE: u16 = 6;
const CTA_PROTO_ICMPV6_ID: u16 = 7;
const CTA_PROTO_ICMPV6_TYPE: u16 = 8;
const CTA_PROTO_ICMPV6_CODE: u16 = 9;

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;

/// Is `kind` (a netlink message type) a ctnetlink entry, as a dump sends them?
pub fn is_conntrack_entry(kind: u16) -> bool {
    kind == (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
}

/// Appends a ctnetlink message: header, nfgenmsg of `family`, then what `body` writes.
fn message(out: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, family: u8, body: impl FnOnce(&mut Vec<u8>)) {
    nfnetlink::message(out, NFNL_SUBSYS_CTNETLINK, kind, flags, seq, family, 0, body);
}

/// Asks for every entry of every family (AF_UNSPEC: ctnetlink filters on the family only
/// when one is given).
pub fn dump_request(seq: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(20);
    message(&mut out, IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, AF_UNSPEC, |_| {});
    out
}

fn family_of(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { AF_INET } else { AF_INET6 }
}

/// Appends a request deleting `flow`'s entry (found by its original tuple and zone, and
/// only if it still has the id it was dumped with), acknowledged.
pub fn delete_request(out: &mut Vec<u8>, flow: &Flow, seq: u32) {
    let t = &flow.original;
    message(out, IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, seq, family_of(t.src), |out| {
        nest(out, CTA_TUPLE_ORIG, |out| tuple(out, t));
        if flow.zone != 0 {
            attr(out, CTA_ZONE, &flow.zone.to_be_bytes());
        }
        if let Some(id) = flow.id {
            attr(out, CTA_ID, &id.to_be_bytes());
        }
    });
}

fn tuple(out: &mut Vec<u8>, t: &Tuple) {
    nest(out, CTA_TUPLE_IP, |out| match (t.src, t.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            attr(out, CTA_IP_V4_SRC, &s.octets());
            attr(out, CTA_IP_V4_DST, &d.octets());
        }
        (s, d) => {
            attr(out, CTA_IP_V6_SRC, &v6(s).octets());
            attr(out, CTA_IP_V6_DST, &v6(d).octets());
        }
    });
    nest(out, CTA_TUPLE_PROTO, |out| {
        attr(out, CTA_PROTO_NUM, &[t.proto]);
        let (id, kind, code) = match t.proto {
            IPPROTO_ICMP => (CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE),
            IPPROTO_ICMPV6 => (CTA_PROTO_ICMPV6_ID, CTA_PROTO_ICMPV6_TYPE, CTA_PROTO_ICMPV6_CODE),
            _ => {
                attr(out, CTA_PROTO_SRC_PORT, &t.sport.to_be_bytes());
                attr(out, CTA_PROTO_DST_PORT, &t.dport.to_be_bytes());
                return;
            }
        };
        // An ICMP tuple: the id in place of the source port, type and code in the
        // destination port's two bytes (see `Tuple`).
        attr(out, id, &t.sport.to_be_bytes());
        attr(out, kind, &[(t.dport >> 8) as u8]);
        attr(out, code, &[t.dport as u8]);
    });
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

/// The flow in a ctnetlink entry's payload (after the netlink header): `None` when its
/// tuples are missing or malformed.
pub fn parse_flow(payload: &[u8]) -> Option<Flow> {
    let attrs = payload.get(4..)?;
    let (mut original, mut reply, mut zone, mut id) = (None, None, 0, None);
    for (kind, data) in attributes(attrs) {
        match kind {
            CTA_TUPLE_ORIG => original = parse_tuple(data),
            CTA_TUPLE_REPLY => reply = parse_tuple(data),
            CTA_ZONE => zone = u16::from_be_bytes(data.get(..2)?.try_into().ok()?),
            CTA_ID => id = Some(u32::from_be_bytes(data.get(..4)?.try_into().ok()?)),
            _ => {}
        }
    }
    Some(Flow { original: original?, reply: reply?, zone, id })
}

fn parse_tuple(data: &[u8]) -> Option<Tuple> {
    let (mut src, mut dst, mut proto) = (None, None, None);
    let (mut sport, mut dport) = (0u16, 0u16);
    let be16 = |d: &[u8]| d.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    for (kind, nested) in attributes(data) {
        match kind {
            CTA_TUPLE_IP => {
                for (k, v) in attributes(nested) {
                    let addr = match k {
                        CTA_IP_V4_SRC | CTA_IP_V4_DST => {
                            IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(v.get(..4)?).ok()?))
                        }
                        CTA_IP_V6_SRC | CTA_IP_V6_DST => {
                            IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(v.get(..16)?).ok()?))
                        }
                        _ => continue,
                    };
                    if matches!(k, CTA_IP_V4_SRC | CTA_IP_V6_SRC) {
                        src = Some(addr);
                    } else {
                        dst = Some(addr);
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (k, v) in attributes(nested) {
                    match k {
                        CTA_PROTO_NUM => proto = v.first().copied(),
                        CTA_PROTO_SRC_PORT | CTA_PROTO_ICMP_ID | CTA_PROTO_ICMPV6_ID => sport = be16(v)?,
                        CTA_PROTO_DST_PORT => dport = be16(v)?,
                        CTA_PROTO_ICMP_TYPE | CTA_PROTO_ICMPV6_TYPE => {
                            dport = (dport & 0x00ff) | (u16::from(*v.first()?) << 8)
                        }
                        CTA_PROTO_ICMP_CODE | CTA_PROTO_ICMPV6_CODE => {
                            dport = (dport & 0xff00) | u16::from(*v.first()?)
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let (src, dst) = (src?, dst?);
    if src.is_ipv4() != dst.is_ipv4() {
        return None;
    }
    Some(Tuple { src, dst, proto: proto?, sport, dport })
}

/// What the kernel builds for an entry, enough of it to read back (the unit tests' fixtures
/// and the fake's dumps): the two tuples, zone, id, and a status attribute the parser skips.
pub fn entry_message(flow: &Flow, seq: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let flags = 0x2; // NLM_F_MULTI
    message(&mut out, IPCTNL_MSG_CT_NEW, flags, seq, family_of(flow.original.src), |out| {
        nest(out, CTA_TUPLE_ORIG, |out| tuple(out, &flow.original));
        nest(out, CTA_TUPLE_REPLY, |out| tuple(out, &flow.reply));
        attr(out, 3, &0x18eu32.to_be_bytes()); // CTA_STATUS: confirmed, assured, seen reply
        if flow.zone != 0 {
            attr(out, CTA_ZONE, &flow.zone.to_be_bytes());
        }
        if let Some(id) = flow.id {
            attr(out, CTA_ID, &id.to_be_bytes());
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nft::backend::netlink::messages;

    fn tcp(src: &str, sport: u16, dst: &str, dport: u16) -> Flow {
        let (src, dst): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
        Flow { id: Some(0xdead_beef), ..Flow::without_nat(Tuple { src, dst, proto: 6, sport, dport }) }
    }

    #[test]
    fn the_dump_request_asks_for_every_family() {
        let req = dump_request(42);
        assert_eq!(req.len(), 20);
        assert_eq!(u32::from_ne_bytes(req[0..4].try_into().unwrap()), 20);
        assert_eq!(u16::from_ne_bytes([req[4], req[5]]), 0x0101, "ctnetlink, CT_GET");
        assert_eq!(u16::from_ne_bytes([req[6], req[7]]), 0x0301, "request, dump");
        assert_eq!(u32::from_ne_bytes(req[8..12].try_into().unwrap()), 42);
        assert_eq!(&req[16..20], &[0, 0, 0, 0], "AF_UNSPEC, version 0");
    }

    #[test]
    fn a_delete_request_names_the_original_tuple_byte_for_byte() {
        let mut out = Vec::new();
        delete_request(&mut out, &tcp("10.0.0.1", 40000, "10.0.0.2", 80), 7);
        let expected: Vec<u8> = [
            &80u32.to_ne_bytes()[..],
            &0x0102u16.to_ne_bytes(),
            &0x0005u16.to_ne_bytes(),
            &7u32.to_ne_bytes(),
            &[0, 0, 0, 0],
            &[2, 0, 0, 0],
            // CTA_TUPLE_ORIG (nested): IP { V4_SRC, V4_DST }, PROTO { NUM, SRC_PORT, DST_PORT }
            &[52, 0, 0x01, 0x80],
            &[20, 0, 0x01, 0x80, 8, 0, 1, 0, 10, 0, 0, 1, 8, 0, 2, 0, 10, 0, 0, 2],
            &[28, 0, 0x02, 0x80, 5, 0, 1, 0, 6, 0, 0, 0, 6, 0, 2, 0, 0x9c, 0x40, 0, 0, 6, 0, 3, 0, 0, 80, 0, 0],
            // CTA_ID
            &[8, 0, 12, 0, 0xde, 0xad, 0xbe, 0xef],
        ]
        .concat();
        assert_eq!(out, expected);
    }

    #[test]
    fn a_delete_request_carries_a_zone_only_when_the_entry_has_one() {
        let mut flow = tcp("fd00::1", 1, "fd00::2", 2);
        flow.id = None;
        let mut plain = Vec::new();
        delete_request(&mut plain, &flow, 1);
        flow.zone = 5;
        let mut zoned = Vec::new();
        delete_request(&mut zoned, &flow, 1);
        assert_eq!(zoned.len(), plain.len() + 8);
        assert_eq!(&zoned[zoned.len() - 8..], &[6, 0, 18, 0, 0, 5, 0, 0]);
        assert_eq!(plain[16], 10, "AF_INET6");
    }

    #[test]
    fn an_entry_reads_back_as_the_flow_it_was_built_from() {
        let mut flows = vec![tcp("10.0.0.1", 40000, "10.0.0.2", 80), tcp("fd00::a", 5, "fd00::b", 443)];
        flows[1].zone = 3;
        flows[1].id = None;
        // A DNAT'd flow: the reply comes from the real destination.
        let mut nat = tcp("10.0.0.1", 40001, "10.96.0.10", 53);
        nat.original.proto = 17;
        nat.reply =
            Tuple { src: "10.0.0.9".parse().unwrap(), dst: nat.original.src, proto: 17, sport: 5353, dport: 40001 };
        flows.push(nat);
        let icmp = Tuple {
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.0.0.2".parse().unwrap(),
            proto: 1,
            sport: 77,
            dport: 0x0800,
        };
        flows.push(Flow {
            original: icmp,
            reply: Tuple { src: icmp.dst, dst: icmp.src, dport: 0, ..icmp },
            zone: 0,
            id: Some(1),
        });
        let datagram: Vec<u8> = flows.iter().enumerate().flat_map(|(i, f)| entry_message(f, i as u32)).collect();
        let parsed: Vec<Flow> = messages(&datagram)
            .filter(|(kind, ..)| is_conntrack_entry(*kind))
            .filter_map(|(_, _, _, payload)| parse_flow(payload))
            .collect();
        assert_eq!(parsed, flows);
    }

    #[test]
    fn an_entry_without_both_tuples_or_with_a_short_address_is_left_out() {
        let flow = tcp("10.0.0.1", 1, "10.0.0.2", 2);
        let msg = entry_message(&flow, 1);
        let payload = &msg[16..];
        // Only the original tuple: cut the message after it (nfgenmsg + 52-byte nest).
        assert_eq!(parse_flow(&payload[..4 + 52]), None);
        // A 3-byte IPv4 source.
        let mut bad = payload.to_vec();
        bad[4 + 4 + 4] = 7; // the V4_SRC attribute's length
        assert_eq!(parse_flow(&bad), None);
        assert_eq!(parse_flow(&[]), None);
    }
}
