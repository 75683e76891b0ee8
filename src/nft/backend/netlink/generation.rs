//! The ruleset's generation: a number the kernel moves on by one with each commit that
//! changes anything, in any table of the network namespace (`nft_net->base_seq`).
//!
//! ```text
//!  request(seq) ──► GETGEN ──► kernel ──► NEWGEN {NFTA_GEN_ID (be32), pid, name of the asker}
//!  answer(datagram, seq) ──► Some(Ok(id)) / Some(Err(errno)) / None (not this answer)
//! ```
//!
//! Two readings around a stretch of time tell how many commits it held, whoever made
//! them: what the table monitor needs while it does not listen (see `monitor::quietly`).

use std::time::{Duration, Instant};

use nix::errno::Errno;

use super::parse::{attributes, messages, nftables_message};
use super::{NFNL_SUBSYS_NFTABLES, NLM_F_REQUEST, NLMSG_ERROR, NetlinkSocket, msg};

/// In NEWGEN: the generation's id, big-endian.
const NFTA_GEN_ID: u16 = 1;

/// The request for the current generation (no attributes, family unspecified).
pub(super) fn request(seq: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(20);
    crate::nfnetlink::message(&mut out, NFNL_SUBSYS_NFTABLES, msg::GETGEN, NLM_F_REQUEST, seq, 0, 0, |_| {});
    out
}

/// The generation the answer to request `seq` carries, the kernel's refusal of it, or
/// `None` when `datagram` does not answer it.
pub(super) fn answer(datagram: &[u8], seq: u32) -> Option<Result<u32, Errno>> {
    messages(datagram).filter(|(_, _, s, _)| *s == seq).find_map(|(kind, _, _, payload)| {
        if kind == NLMSG_ERROR {
            let code = crate::nfnetlink::error_code(payload);
            return (code != 0).then(|| Err(Errno::from_raw(-code)));
        }
        (nftables_message(kind) == Some(msg::NEWGEN)).then(|| {
            attributes(payload.get(4..).unwrap_or_default())
                .find(|(k, _)| *k == NFTA_GEN_ID)
                .and_then(|(_, v)| <[u8; 4]>::try_from(v).ok())
                .map(u32::from_be_bytes)
                .ok_or(Errno::EBADMSG)
        })
    })
}

/// Asks the kernel for the current generation over `socket` (one that joined no group, so
/// that only answers arrive), waiting at most `timeout`.
pub fn current(socket: &NetlinkSocket, seq: u32, timeout: Duration) -> Result<u32, Errno> {
    socket.send(&request(seq))?;
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 1024];
    while Instant::now() < deadline {
        match socket.recv(&mut buf, true)? {
            Some(n) => {
                if let Some(answer) = answer(&buf[..n], seq) {
                    return answer;
                }
            }
            None => break,
        }
    }
    Err(Errno::ETIMEDOUT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn newgen(seq: u32, id: u32) -> Vec<u8> {
        let mut out = Vec::new();
        crate::nfnetlink::message(&mut out, NFNL_SUBSYS_NFTABLES, msg::NEWGEN, 0, seq, 0, 0, |out| {
            crate::nfnetlink::attr(out, NFTA_GEN_ID, &id.to_be_bytes());
            crate::nfnetlink::attr(out, 2, &4242u32.to_be_bytes());
            crate::nfnetlink::attr(out, 3, b"netpol-agent\0");
        });
        out
    }

    #[test]
    fn the_request_asks_nf_tables_for_its_generation() {
        let req = request(7);
        let (kind, flags, seq, payload) = messages(&req).next().expect("one message");
        assert_eq!((nftables_message(kind), flags, seq), (Some(msg::GETGEN), NLM_F_REQUEST, 7));
        assert_eq!(payload, [0, 0, 0, 0], "nfgenmsg only: no family, no attributes");
    }

    #[test]
    fn the_answer_carries_the_generation_big_endian_and_only_for_its_own_request() {
        assert_eq!(answer(&newgen(7, 0x0102_0304), 7), Some(Ok(0x0102_0304)));
        assert_eq!(answer(&newgen(6, 1), 7), None, "an answer to another request");
    }

    #[test]
    fn a_refusal_or_an_answer_without_an_id_is_an_error() {
        let mut refusal = Vec::new();
        crate::nfnetlink::message(&mut refusal, 0, NLMSG_ERROR, 0, 7, 0, 0, |_| {});
        // An NLMSG_ERROR carries the errno where the nfgenmsg would be: rewrite it.
        let at = 16;
        refusal[at..at + 4].copy_from_slice(&(-(Errno::EPERM as i32)).to_ne_bytes());
        assert_eq!(answer(&refusal, 7), Some(Err(Errno::EPERM)));

        let mut bare = Vec::new();
        crate::nfnetlink::message(&mut bare, NFNL_SUBSYS_NFTABLES, msg::NEWGEN, 0, 7, 0, 0, |_| {});
        assert_eq!(answer(&bare, 7), Some(Err(Errno::EBADMSG)));
    }
}
