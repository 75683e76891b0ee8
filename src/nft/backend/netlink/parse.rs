//! Reading what the kernel sends: the messages of a datagram, their attributes, and the
//! element keys of a set element message. Pure: bytes in, slices of them out.
//!
//! ```text
//!  datagram ──messages──► (type, flags, seq, payload) ──attributes──► (type, payload) ...
//!                                                 └──element_keys──► each element's key
//! ```

use super::{NFNL_SUBSYS_NFTABLES, NFTA_DATA_VALUE, NFTA_LIST_ELEM, NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_LIST_ELEMENTS};

/// An nf_tables message's own type, if `kind` is one (the subsystem is in the high byte).
pub fn nftables_message(kind: u16) -> Option<u16> {
    (kind >> 8 == NFNL_SUBSYS_NFTABLES).then_some(kind & 0xff)
}

/// The keys of the elements in a NEWSETELEM/DELSETELEM payload (after the nfgenmsg).
pub fn element_keys(payload: &[u8]) -> impl Iterator<Item = &[u8]> {
    let attrs = payload.get(4..).unwrap_or_default();
    attributes(attrs)
        .filter(|(k, _)| *k == NFTA_SET_ELEM_LIST_ELEMENTS)
        .flat_map(|(_, list)| attributes(list))
        .filter(|(k, _)| *k == NFTA_LIST_ELEM)
        .filter_map(|(_, elem)| attributes(elem).find(|(k, _)| *k == NFTA_SET_ELEM_KEY))
        .filter_map(|(_, key)| attributes(key).find(|(k, _)| *k == NFTA_DATA_VALUE).map(|(_, v)| v))
}

/// The messages of a datagram: (type, flags, sequence number, payload after the header).
pub fn messages(buf: &[u8]) -> impl Iterator<Item = (u16, u16, u32, &[u8])> {
    frames(buf).map(|(h, payload)| (h.kind, h.flags, h.seq, payload))
}

/// The messages of a datagram with the netlink port that sent each: (type, sender's port,
/// payload after the header). The kernel's announcements carry the port of the socket
/// whose request caused them.
pub fn messages_with_sender(buf: &[u8]) -> impl Iterator<Item = (u16, u32, &[u8])> {
    frames(buf).map(|(h, payload)| (h.kind, h.port, payload))
}

/// A netlink message header (`struct nlmsghdr`), in host byte order.
struct Header {
    kind: u16,
    flags: u16,
    seq: u32,
    port: u32,
}

fn frames(buf: &[u8]) -> impl Iterator<Item = (Header, &[u8])> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.len() < 16 {
            return None;
        }
        let len = u32::from_ne_bytes(rest[0..4].try_into().ok()?) as usize;
        if len < 16 || len > rest.len() {
            return None;
        }
        let header = Header {
            kind: u16::from_ne_bytes([rest[4], rest[5]]),
            flags: u16::from_ne_bytes([rest[6], rest[7]]),
            seq: u32::from_ne_bytes(rest[8..12].try_into().ok()?),
            port: u32::from_ne_bytes(rest[12..16].try_into().ok()?),
        };
        let payload = &rest[16..len];
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        Some((header, payload))
    })
}

/// The attributes in `buf`: (type without flags, payload).
pub fn attributes(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        if len < 4 || len > rest.len() {
            return None;
        }
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        let payload = &rest[4..len];
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        Some((kind, payload))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A netlink message: header (length, type, flags, seq, port) and payload.
    fn message(kind: u16, flags: u16, seq: u32, port: u32, payload: &[u8]) -> Vec<u8> {
        let len = 16 + payload.len() as u32;
        let mut m = [
            &len.to_ne_bytes()[..],
            &kind.to_ne_bytes(),
            &flags.to_ne_bytes(),
            &seq.to_ne_bytes(),
            &port.to_ne_bytes(),
            payload,
        ]
        .concat();
        m.resize(m.len().next_multiple_of(4), 0);
        m
    }

    fn attribute(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut a = [&(4 + payload.len() as u16).to_ne_bytes()[..], &kind.to_ne_bytes(), payload].concat();
        a.resize(a.len().next_multiple_of(4), 0);
        a
    }

    #[test]
    fn a_datagram_yields_its_messages_and_a_truncated_one_ends_the_walk() {
        let mut datagram = [message(10 << 8 | 12, 1, 7, 42, &[1, 2, 3]), message(2, 0, 8, 0, &[0; 4])].concat();
        let all: Vec<_> = messages(&datagram).map(|(k, f, s, p)| (k, f, s, p.to_vec())).collect();
        assert_eq!(all, vec![(10 << 8 | 12, 1, 7, vec![1, 2, 3]), (2, 0, 8, vec![0; 4])]);
        assert_eq!(messages_with_sender(&datagram).map(|(_, port, _)| port).collect::<Vec<_>>(), vec![42, 0]);
        assert_eq!(nftables_message(10 << 8 | 12), Some(12));
        assert_eq!(nftables_message(2), None, "NLMSG_ERROR is no nf_tables message");
        datagram.truncate(datagram.len() - 1);
        assert_eq!(messages(&datagram).count(), 1, "the cut message is not read past the end");
    }

    #[test]
    fn attributes_drop_their_flags_and_element_keys_are_found_in_their_nests() {
        let key = attribute(NFTA_SET_ELEM_KEY | 0x8000, &attribute(NFTA_DATA_VALUE, &[10, 0, 0, 1]));
        let elem = attribute(NFTA_LIST_ELEM | 0x8000, &key);
        let list = attribute(NFTA_SET_ELEM_LIST_ELEMENTS | 0x8000, &[elem.clone(), elem].concat());
        let payload = [&[0u8; 4][..], &attribute(1, b"t\0"), &list].concat();
        let keys: Vec<&[u8]> = element_keys(&payload).collect();
        assert_eq!(keys, vec![&[10, 0, 0, 1][..], &[10, 0, 0, 1][..]]);
        let kinds: Vec<u16> = attributes(&payload[4..]).map(|(k, _)| k).collect();
        assert_eq!(kinds, vec![1, NFTA_SET_ELEM_LIST_ELEMENTS]);
        assert_eq!(attributes(&[8, 0, 1, 0, 0]).count(), 0, "an attribute longer than the buffer is not read");
    }
}
