//! nfnetlink request framing, pure: what ctnetlink (`conntrack/`), nfnetlink_log
//! (`nflog/`) and nf_tables generation requests (`nft::backend::netlink::generation`) have
//! in common (linux/netlink.h, linux/netfilter/nfnetlink.h).
//!
//! ```text
//!  message(out, subsystem, type, flags, seq, family, res_id, body)
//!    ──► [nlmsghdr len type=(subsystem<<8)|type flags seq port 0][nfgenmsg family V0 res_id]
//!        body: attr(type, bytes) / nest(type, attrs...), each padded to 4 bytes
//!  answers ──► nft::backend::netlink::{messages, attributes} ──► error_code (NLMSG_ERROR)
//! ```
//!
//! Reading is shared from `nft::backend::netlink` (its `messages` and `attributes`); this
//! module holds the writing half and the acknowledgement's code.

use crate::nft::backend::netlink::NLA_F_NESTED;

// For ctnetlink and nfnetlink_log requests, which only the agent makes.
#[cfg(feature = "agent")]
pub(crate) use crate::nft::backend::netlink::{NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR};
pub use crate::nft::backend::netlink::{attributes, messages};

/// Appends a netlink message of nfnetlink `subsystem`: the header, the nfgenmsg (`family`,
/// version 0, `res_id` in network order), then what `body` writes.
#[allow(clippy::too_many_arguments)] // the header's fields, each needed
pub fn message(
    out: &mut Vec<u8>,
    subsystem: u16,
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
    body: impl FnOnce(&mut Vec<u8>),
) {
    let start = out.len();
    out.extend_from_slice(&0u32.to_ne_bytes()); // length, set below
    out.extend_from_slice(&((subsystem << 8) | kind).to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    let [hi, lo] = res_id.to_be_bytes();
    out.extend_from_slice(&[family, 0, hi, lo]); // nfgenmsg: family, NFNETLINK_V0, res_id
    body(out);
    let len = (out.len() - start) as u32;
    out[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

/// Appends an attribute, padded to 4 bytes.
pub fn attr(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
    out.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// Appends a nested attribute holding what `body` writes.
pub fn nest(out: &mut Vec<u8>, kind: u16, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&0u16.to_ne_bytes());
    out.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    body(out);
    let len = (out.len() - start) as u16;
    out[start..start + 2].copy_from_slice(&len.to_ne_bytes());
}

/// The code of an NLMSG_ERROR payload: 0 for an acknowledgement, else a negative errno
/// (`-EINVAL` for a payload too short to hold one).
pub fn error_code(payload: &[u8]) -> i32 {
    payload.get(..4).map_or(-(nix::errno::Errno::EINVAL as i32), |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_carries_its_subsystem_family_and_group_in_network_order() {
        let mut out = Vec::new();
        message(&mut out, 4, 1, NLM_F_REQUEST | NLM_F_ACK, 9, 0, 0x0102, |out| attr(out, 1, &[7]));
        assert_eq!(u32::from_ne_bytes(out[0..4].try_into().unwrap()) as usize, out.len());
        assert_eq!(u16::from_ne_bytes([out[4], out[5]]), 0x0401);
        assert_eq!(&out[16..20], &[0, 0, 1, 2], "AF_UNSPEC, V0, res_id 0x0102 big-endian");
        assert_eq!(&out[20..], &[5, 0, 1, 0, 7, 0, 0, 0], "a 1-byte attribute padded to 8");
        let read: Vec<_> = messages(&out).map(|(kind, _, seq, p)| (kind, seq, p.len())).collect();
        assert_eq!(read, vec![(0x0401, 9, 12)]);
    }

    #[test]
    fn an_error_payload_too_short_reads_as_einval() {
        assert_eq!(error_code(&0i32.to_ne_bytes()), 0);
        assert_eq!(error_code(&(-16i32).to_ne_bytes()), -16);
        assert_eq!(error_code(&[1, 2]), -22);
    }
}
