//! Just enough SCTP to probe a path without kernel SCTP sockets: build a well-formed INIT
//! packet (RFC 9260 §3, checksum CRC32c per Appendix A) and recognise one on arrival.
//!
//! The INIT must be well-formed because netfilter's SCTP conntrack checks it: the common
//! header's verification tag must be 0, INIT must be the only chunk, and in PREROUTING the
//! CRC32c is verified; a malformed packet would be `ct state invalid` and dropped by the
//! first rules of our ruleset, turning a policy verdict into a packet-format artefact.

/// SCTP's IP protocol number.
pub const IPPROTO_SCTP: i32 = 132;
const CHUNK_INIT: u8 = 1;
const COMMON_HEADER: usize = 12;
const INIT_CHUNK: usize = 20;
/// Length of the packets [`init_packet`] builds.
pub const INIT_PACKET_LEN: usize = COMMON_HEADER + INIT_CHUNK;

/// CRC32c (Castagnoli, reflected polynomial 0x82F63B78), as SCTP uses it.
pub fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// An SCTP packet holding one INIT chunk from `src_port` to `dst_port`, whose initiate tag
/// is `tag` (must be non-zero; it doubles as the probe's identity).
pub fn init_packet(src_port: u16, dst_port: u16, tag: u32) -> [u8; INIT_PACKET_LEN] {
    assert!(tag != 0, "SCTP initiate tag must be non-zero");
    let mut p = [0u8; INIT_PACKET_LEN];
    p[0..2].copy_from_slice(&src_port.to_be_bytes());
    p[2..4].copy_from_slice(&dst_port.to_be_bytes());
    // p[4..8]: verification tag 0, mandatory for INIT. p[8..12]: checksum, filled below.
    let c = &mut p[COMMON_HEADER..];
    c[0] = CHUNK_INIT;
    c[1] = 0; // flags
    c[2..4].copy_from_slice(&(INIT_CHUNK as u16).to_be_bytes());
    c[4..8].copy_from_slice(&tag.to_be_bytes()); // initiate tag
    c[8..12].copy_from_slice(&65_535u32.to_be_bytes()); // a_rwnd
    c[12..14].copy_from_slice(&1u16.to_be_bytes()); // outbound streams
    c[14..16].copy_from_slice(&1u16.to_be_bytes()); // max inbound streams
    c[16..20].copy_from_slice(&tag.to_be_bytes()); // initial TSN
    let sum = crc32c(&p);
    // The checksum goes on the wire least significant byte first (RFC 9260 App. A).
    p[8..12].copy_from_slice(&sum.to_le_bytes());
    p
}

/// If `sctp` (an SCTP packet, no IP header) is a valid INIT, its (destination port,
/// initiate tag).
pub fn parse_init(sctp: &[u8]) -> Option<(u16, u32)> {
    if sctp.len() < INIT_PACKET_LEN {
        return None;
    }
    let mut copy = sctp.to_vec();
    copy[8..12].fill(0);
    let sum = u32::from_le_bytes(sctp[8..12].try_into().ok()?);
    if crc32c(&copy) != sum || sctp[4..8] != [0, 0, 0, 0] || sctp[COMMON_HEADER] != CHUNK_INIT {
        return None;
    }
    let dport = u16::from_be_bytes([sctp[2], sctp[3]]);
    let tag = u32::from_be_bytes(sctp[16..20].try_into().ok()?);
    Some((dport, tag))
}

/// The SCTP part of what an IPv4 raw socket returns (it includes the IP header).
pub fn strip_ipv4_header(packet: &[u8]) -> Option<&[u8]> {
    let ihl = usize::from(packet.first()? & 0x0f) * 4;
    if ihl < 20 { None } else { packet.get(ihl..) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn an_init_packet_parses_back_to_its_port_and_tag() {
        let p = init_packet(40_000, 80, 0xdead_beef);
        assert_eq!(parse_init(&p), Some((80, 0xdead_beef)));
    }

    #[test]
    fn a_corrupted_init_is_not_recognised() {
        let mut p = init_packet(40_000, 80, 7);
        p[20] ^= 1;
        assert_eq!(parse_init(&p), None);
        assert_eq!(parse_init(&p[..10]), None);
    }

    #[test]
    fn the_ipv4_header_is_skipped_by_its_length_field() {
        let mut pkt = vec![0x45u8];
        pkt.extend([0u8; 19]);
        pkt.extend(init_packet(1, 2, 3));
        assert_eq!(parse_init(strip_ipv4_header(&pkt).unwrap()), Some((2, 3)));
    }
}
