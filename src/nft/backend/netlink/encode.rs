//! Our IR as nf_tables messages: pure, no socket. What nft 1.0 sends for the same text,
//! expression by expression and element by element.
//!
//! ```text
//!  Transaction + KnownSets ──encode──► Encoded { batch: [BEGIN, NEWTABLE/NEWSET/NEWCHAIN/
//!       │                                   NEWRULE/NEWSETELEM/..., END], origins: seq → op }
//!       └─ range changes in an existing interval set, a set of unknown kind ──► Unsupported
//! ```

use std::collections::HashMap;

use super::{
    NFNL_SUBSYS_NFTABLES, NFTA_DATA_VALUE, NFTA_LIST_ELEM, NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_LIST_ELEMENTS,
    NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_TABLE, NLA_F_NESTED, NLM_F_ACK, NLM_F_REQUEST, msg,
};
use crate::nft::ir::{
    Chain, ChainPolicy, CounterLabels, CtState, Element, Hook, IpFamily, Key, KeyType, Limit, MapVerdict, Match, Rule,
    Verdict,
};
use crate::nft::{Op, Transaction};

// ---------------------------------------------------------------- constants (linux/netfilter/*.h)

const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;

const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;

const NFPROTO_INET: u8 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_CHAIN_USERDATA: u16 = 12;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;

/// The comment's type in chain and rule user data (libnftnl's NFTNL_UDATA_*_COMMENT).
const UDATA_COMMENT: u8 = 0;
/// ... and in a set's (NFTNL_UDATA_SET_COMMENT).
const UDATA_SET_COMMENT: u8 = 7;

const NF_DROP: i32 = 0;
const NF_ACCEPT: i32 = 1;
const NFT_JUMP: i32 = -3;
const NFT_GOTO: i32 = -4;
const NFT_RETURN: i32 = -5;

const NFT_REG_VERDICT: u32 = 0;
/// The first 32-bit register; a 16-byte value fills four of them.
const NFT_REG32_00: u32 = 8;

/// Element lists are split so that each stays well under a netlink attribute's 64 KiB.
const ELEMENTS_PER_MESSAGE_BYTES: usize = 32 * 1024;

// ---------------------------------------------------------------- message building

/// A finished batch: its bytes, and (sequence number, op index) per nf_tables message.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Encoded {
    pub(super) batch: Vec<u8>,
    pub(super) origins: Vec<(u32, usize)>,
}

/// A batch of netlink messages being built, with the op each message came from.
#[derive(Default)]
struct Batch {
    buf: Vec<u8>,
    /// (sequence number, index of the op in the transaction) per message, BEGIN/END aside.
    origins: Vec<(u32, usize)>,
    seq: u32,
    /// Where the last nf_tables message starts.
    last: Option<usize>,
}

impl Batch {
    fn new(first_seq: u32) -> Batch {
        let mut b = Batch { seq: first_seq, ..Batch::default() };
        b.control(NFNL_MSG_BATCH_BEGIN);
        b
    }

    /// BEGIN or END: the subsystem goes in the header's resource id.
    fn control(&mut self, kind: u16) {
        let start = self.header(kind, NLM_F_REQUEST);
        self.buf.extend_from_slice(&[0, 0]);
        self.buf.extend_from_slice(&NFNL_SUBSYS_NFTABLES.to_be_bytes());
        self.finish(start);
    }

    fn header(&mut self, kind: u16, flags: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&self.seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
        self.seq = self.seq.wrapping_add(1);
        start
    }

    /// Starts an nf_tables message of the `inet` family for op number `op`.
    fn message(&mut self, kind: u16, flags: u16, op: usize) -> usize {
        self.origins.push((self.seq, op));
        let start = self.header((NFNL_SUBSYS_NFTABLES << 8) | kind, NLM_F_REQUEST | flags);
        self.last = Some(start);
        self.buf.extend_from_slice(&[NFPROTO_INET, 0, 0, 0]); // nfgenmsg: family, version, res_id
        start
    }

    fn finish(&mut self, start: usize) {
        let len = (self.buf.len() - start) as u32;
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    /// Closes the batch. Only its last message asks for an acknowledgement: the kernel
    /// reports every failed message anyway, and it handles the whole batch within the
    /// send, so that acknowledgement comes after every error there is.
    fn end(mut self) -> Encoded {
        if let Some(last) = self.last {
            let flags = u16::from_ne_bytes([self.buf[last + 6], self.buf[last + 7]]) | NLM_F_ACK;
            self.buf[last + 6..last + 8].copy_from_slice(&flags.to_ne_bytes());
        }
        self.control(NFNL_MSG_BATCH_END);
        Encoded { batch: self.buf, origins: self.origins }
    }

    fn attr(&mut self, kind: u16, data: &[u8]) {
        self.buf.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    /// A NUL-terminated string attribute.
    fn str(&mut self, kind: u16, s: &str) {
        self.buf.extend_from_slice(&((4 + s.len() + 1) as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(s.as_bytes());
        self.buf.push(0);
        self.pad();
    }

    fn u32(&mut self, kind: u16, v: u32) {
        self.attr(kind, &v.to_be_bytes());
    }

    fn nest(&mut self, kind: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        start
    }

    fn end_nest(&mut self, start: usize) {
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    /// `NFTA_DATA_VALUE` inside a nest of `kind`.
    fn data_value(&mut self, kind: u16, value: &[u8]) {
        let n = self.nest(kind);
        self.attr(NFTA_DATA_VALUE, value);
        self.end_nest(n);
    }

    fn verdict(&mut self, kind: u16, code: i32, chain: Option<&str>) {
        let data = self.nest(kind);
        let verdict = self.nest(NFTA_DATA_VERDICT);
        self.attr(NFTA_VERDICT_CODE, &code.to_be_bytes());
        if let Some(c) = chain {
            self.str(NFTA_VERDICT_CHAIN, c);
        }
        self.end_nest(verdict);
        self.end_nest(data);
    }

    /// libnftnl's user data: type, length, value (a comment with its NUL).
    fn comment(&mut self, kind: u16, text: &str) {
        let mut data = Vec::with_capacity(text.len() + 3);
        comment_tlv(&mut data, UDATA_COMMENT, text);
        self.attr(kind, &data);
    }
}

/// A comment as libnftnl user data: type, length, the text with its NUL. One byte of
/// length: nft caps comments at 128 bytes, and so does `names::comment`.
fn comment_tlv(out: &mut Vec<u8>, kind: u8, text: &str) {
    let text = crate::nft::names::comment(text);
    let bytes = &text.as_bytes()[..text.len().min(254)];
    out.extend_from_slice(&[kind, (bytes.len() + 1) as u8]);
    out.extend_from_slice(bytes);
    out.push(0);
}

// ---------------------------------------------------------------- expressions

/// A rule's expressions, each a list element: its name, then `body` writes its attributes.
impl Batch {
    fn expr(&mut self, name: &str, body: impl FnOnce(&mut Batch)) {
        let elem = self.nest(NFTA_LIST_ELEM);
        self.str(NFTA_EXPR_NAME, name);
        let data = self.nest(NFTA_EXPR_DATA);
        body(self);
        self.end_nest(data);
        self.end_nest(elem);
    }

    fn meta(&mut self, key: u32, dreg: u32) {
        // NFTA_META_DREG 1, NFTA_META_KEY 2
        self.expr("meta", |b| {
            b.u32(1, dreg);
            b.u32(2, key);
        });
    }

    fn payload(&mut self, base: u32, offset: u32, len: u32, dreg: u32) {
        // NFTA_PAYLOAD_DREG 1, BASE 2, OFFSET 3, LEN 4
        self.expr("payload", |b| {
            b.u32(1, dreg);
            b.u32(2, base);
            b.u32(3, offset);
            b.u32(4, len);
        });
    }

    fn cmp(&mut self, op: u32, sreg: u32, value: &[u8]) {
        // NFTA_CMP_SREG 1, OP 2, DATA 3
        self.expr("cmp", |b| {
            b.u32(1, sreg);
            b.u32(2, op);
            b.data_value(3, value);
        });
    }

    fn lookup(&mut self, set: &str, sreg: u32, dreg: Option<u32>, invert: bool) {
        // NFTA_LOOKUP_SET 1, SREG 2, DREG 3, FLAGS 5 (NFT_LOOKUP_F_INV = 1)
        self.expr("lookup", |b| {
            b.str(1, set);
            b.u32(2, sreg);
            if let Some(d) = dreg {
                b.u32(3, d);
            }
            if invert {
                b.u32(5, 1);
            }
        });
    }

    /// A reference to a named object of the table (`counter name`, `limit name`).
    fn objref(&mut self, kind: u32, name: &str) {
        // NFTA_OBJREF_IMM_TYPE 1, NFTA_OBJREF_IMM_NAME 2
        self.expr("objref", |b| {
            b.u32(1, kind);
            b.str(2, name);
        });
    }

    fn immediate_verdict(&mut self, code: i32, chain: Option<&str>) {
        // NFTA_IMMEDIATE_DREG 1, DATA 2
        self.expr("immediate", |b| {
            b.u32(1, NFT_REG_VERDICT);
            b.verdict(2, code, chain);
        });
    }
}

const META_NFPROTO: u32 = 15;
const META_L4PROTO: u32 = 16;
const PAYLOAD_NETWORK: u32 = 1;
const PAYLOAD_TRANSPORT: u32 = 2;
const CMP_EQ: u32 = 0;
const CMP_NEQ: u32 = 1;
const CMP_LTE: u32 = 3;
const CMP_GTE: u32 = 5;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_TCP: u8 = 6;
/// TCP header flag bits (the byte at offset 13).
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

fn nfproto(f: IpFamily) -> u8 {
    match f {
        IpFamily::V4 => NFPROTO_IPV4,
        IpFamily::V6 => NFPROTO_IPV6,
    }
}

/// What `ct state` tests: the kernel's state bits (NF_CT_STATE_BIT).
fn ct_state_bit(s: CtState) -> u32 {
    match s {
        CtState::Invalid => 1,
        CtState::Established => 1 << 1,
        CtState::Related => 1 << 2,
        CtState::New => 1 << 3,
    }
}

/// nft's implicit `meta nfproto` dependency of an `ip`/`ip6`/`icmpv6` match, unless the
/// rule already tested the family.
fn require_family(e: &mut Batch, f: IpFamily, family_known: &mut Option<IpFamily>) {
    if *family_known != Some(f) {
        e.meta(META_NFPROTO, 1);
        e.cmp(CMP_EQ, 1, &[nfproto(f)]);
        *family_known = Some(f);
    }
}

/// Loads `key` of the packet into registers from the first one on, as nft does: an
/// `ip`/`ip6` field needs the family (`meta nfproto`) unless the rule already tested it;
/// concatenation fields go into consecutive 32-bit registers. `interval`: the set the key
/// is looked up in has `flags interval` (nft then converts `meta l4proto` of a
/// `meta l4proto . th dport` key with a byteorder expression).
fn load_key(e: &mut Batch, key: Key, family_known: &mut Option<IpFamily>, interval: bool) {
    let mut addr = |e: &mut Batch, f: IpFamily, field: crate::nft::ir::AddrField| -> u32 {
        require_family(e, f, family_known);
        let (len, offset) = match (f, field) {
            (IpFamily::V4, crate::nft::ir::AddrField::Saddr) => (4, 12),
            (IpFamily::V4, crate::nft::ir::AddrField::Daddr) => (4, 16),
            (IpFamily::V6, crate::nft::ir::AddrField::Saddr) => (16, 8),
            (IpFamily::V6, crate::nft::ir::AddrField::Daddr) => (16, 24),
        };
        e.payload(PAYLOAD_NETWORK, offset, len, 1);
        len
    };
    match key {
        Key::Addr(f, field) => {
            addr(e, f, field);
        }
        Key::ProtoDport => {
            e.meta(META_L4PROTO, 1);
            if interval {
                // NFTA_BYTEORDER_SREG 1, DREG 2, OP 3 (hton = 1), LEN 4, SIZE 5
                e.expr("byteorder", |b| {
                    b.u32(1, 1);
                    b.u32(2, 1);
                    b.u32(3, 1);
                    b.u32(4, 1);
                    b.u32(5, 2);
                });
            }
            e.payload(PAYLOAD_TRANSPORT, 2, 2, NFT_REG32_00 + 1);
        }
        Key::AddrProtoDport(f, field) => {
            let words = addr(e, f, field) / 4;
            e.meta(META_L4PROTO, NFT_REG32_00 + words);
            e.payload(PAYLOAD_TRANSPORT, 2, 2, NFT_REG32_00 + words + 1);
        }
    }
}

/// The netfilter hook numbers of the inet family (NF_INET_*).
fn hook_number(h: Hook) -> u32 {
    u32::from(h.number())
}

fn verdict_code(v: &MapVerdict) -> (i32, Option<&str>) {
    match v {
        MapVerdict::Accept => (NF_ACCEPT, None),
        MapVerdict::Drop => (NF_DROP, None),
        MapVerdict::Return => (NFT_RETURN, None),
        MapVerdict::Jump(c) => (NFT_JUMP, Some(c)),
        MapVerdict::Goto(c) => (NFT_GOTO, Some(c)),
    }
}

// ---------------------------------------------------------------- the table's sets

/// What the encoder must know of a set or map it adds elements to or looks keys up in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SetKind {
    map: bool,
    interval: bool,
}

/// The sets and maps of the table as applied, by name.
#[derive(Clone, Debug, Default)]
pub(super) struct KnownSets {
    table: String,
    sets: HashMap<String, SetKind>,
}

impl KnownSets {
    /// Nothing known of `table` yet.
    fn empty(table: &str) -> KnownSets {
        KnownSets { table: table.to_string(), sets: HashMap::new() }
    }

    /// Follows a transaction that was applied (by either path).
    pub(super) fn applied(&mut self, tx: &Transaction) {
        if tx.table != self.table {
            *self = KnownSets::empty(&tx.table);
        }
        for op in &tx.ops {
            self.applied_op(op);
        }
    }

    /// Does `op` add or remove sets or maps?
    fn changed_by(op: &Op) -> bool {
        matches!(
            op,
            Op::DeleteTable
                | Op::DefineTable(_)
                | Op::AddSet { .. }
                | Op::AddMap { .. }
                | Op::DeleteSet { .. }
                | Op::DeleteMap { .. }
        )
    }

    fn applied_op(&mut self, op: &Op) {
        match op {
            Op::DeleteTable => self.sets.clear(),
            Op::DefineTable(rs) => {
                self.sets.clear();
                for (name, s) in &rs.sets {
                    self.sets.insert(name.clone(), SetKind { map: false, interval: s.interval });
                }
                for (name, m) in &rs.maps {
                    self.sets.insert(name.clone(), SetKind { map: true, interval: m.interval });
                }
            }
            Op::AddSet { name, set } => {
                self.sets.insert(name.clone(), SetKind { map: false, interval: set.interval });
            }
            Op::AddMap { name, map } => {
                self.sets.insert(name.clone(), SetKind { map: true, interval: map.interval });
            }
            Op::DeleteSet { name } | Op::DeleteMap { name } => {
                self.sets.remove(name);
            }
            _ => {}
        }
    }

    fn kind(&self, name: &str) -> Option<SetKind> {
        self.sets.get(name).copied()
    }
}

// ---------------------------------------------------------------- encoding

/// One element as the kernel takes it.
#[derive(Debug, PartialEq, Eq)]
struct WireElement<'a> {
    key: Vec<u8>,
    /// A concatenation with ranges (pipapo): where the element's range ends.
    key_end: Option<Vec<u8>>,
    /// A single-field interval set (rbtree) holds a range as its start and an end
    /// element one past its last value (NFT_SET_ELEM_INTERVAL_END).
    interval_end: bool,
    /// The start of a range that runs to the last value (no end element follows).
    open: bool,
    verdict: Option<&'a MapVerdict>,
}

impl<'a> WireElement<'a> {
    fn key(key: Vec<u8>, verdict: Option<&'a MapVerdict>) -> Self {
        WireElement { key, key_end: None, interval_end: false, open: false, verdict }
    }
}

/// The low (or high) key of an element: each component's end of its span (`Value::span`)
/// in network byte order at its type's width; in a concatenation each is padded to a
/// whole 32-bit register.
fn key_bytes(e: &Element, high: bool) -> Vec<u8> {
    let values = e.values();
    let concat = values.len() > 1;
    let mut out = Vec::with_capacity(values.len() * 4);
    for v in values {
        let width = datatype(v.key_type()).1 as usize;
        let (lo, hi) = v.span();
        out.extend_from_slice(&(if high { hi } else { lo }).to_be_bytes()[16 - width..]);
        if concat {
            out.resize(out.len().next_multiple_of(4), 0);
        }
    }
    out
}

/// The low and high key of an element (the same for a single value).
fn element_span(e: &Element) -> (Vec<u8>, Vec<u8>) {
    (key_bytes(e, false), key_bytes(e, true))
}

/// The key of an element of a non-interval set (`None` if it is a range).
fn element_key(e: &Element) -> Option<Vec<u8>> {
    (!e.values().iter().any(|v| v.is_interval())).then(|| key_bytes(e, false))
}

/// `bytes` + 1 as a big-endian number, `None` past the largest value.
fn successor(bytes: &[u8]) -> Option<Vec<u8>> {
    let mut out = bytes.to_vec();
    for b in out.iter_mut().rev() {
        if *b == 0xff {
            *b = 0;
        } else {
            *b += 1;
            return Some(out);
        }
    }
    None
}

/// The elements of a set or map as nft sends them when it creates them: keys of a plain
/// set as they are; a concatenation with ranges as (start, end) pairs; a single-field
/// interval set as start and end-after elements in order, after an end element at zero
/// when the first range does not start there (what nft 1.0 sends, byte for byte).
fn wire_elements<'a, E: std::borrow::Borrow<Element>>(
    interval: bool,
    concat: bool,
    elements: impl Iterator<Item = (E, Option<&'a MapVerdict>)>,
) -> Result<Vec<WireElement<'a>>, Unsupported> {
    if !interval {
        return elements
            .map(|(e, v)| element_key(e.borrow()).map(|k| WireElement::key(k, v)).ok_or(Unsupported))
            .collect();
    }
    if concat {
        return Ok(elements
            .map(|(e, v)| {
                let (lo, hi) = element_span(e.borrow());
                WireElement { key_end: Some(hi), ..WireElement::key(lo, v) }
            })
            .collect());
    }
    let mut spans: Vec<(Vec<u8>, Vec<u8>, Option<&MapVerdict>)> = elements
        .map(|(e, v)| {
            let (lo, hi) = element_span(e.borrow());
            (lo, hi, v)
        })
        .collect();
    spans.sort();
    let mut out = Vec::with_capacity(spans.len() * 2 + 1);
    if let Some((first, _, _)) = spans.first()
        && first.iter().any(|b| *b != 0)
    {
        out.push(WireElement { interval_end: true, ..WireElement::key(vec![0; first.len()], None) });
    }
    for (lo, hi, v) in spans {
        match successor(&hi) {
            Some(after) => {
                out.push(WireElement::key(lo, v));
                out.push(WireElement { interval_end: true, ..WireElement::key(after, None) });
            }
            None => out.push(WireElement { open: true, ..WireElement::key(lo, v) }),
        }
    }
    Ok(out)
}

const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
const NFTA_SET_ELEM_KEY_END: u16 = 10;
const NFT_SET_ELEM_INTERVAL_END: u32 = 1;

/// Why a transaction goes through nft instead.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Unsupported;

fn encode_rule(
    b: &mut Batch,
    table: &str,
    chain: &str,
    rule: &Rule,
    op: usize,
    sets: &KnownSets,
) -> Result<(), Unsupported> {
    let m = b.message(msg::NEWRULE, NLM_F_CREATE | NLM_F_APPEND, op);
    b.str(NFTA_RULE_TABLE, table);
    b.str(NFTA_RULE_CHAIN, chain);
    let list = b.nest(NFTA_RULE_EXPRESSIONS);
    let mut family_known = None;
    let interval_of = |name: &str| sets.kind(name).map(|k| k.interval).ok_or(Unsupported);
    {
        let e = &mut *b;
        for m in &rule.matches {
            match m {
                Match::CtState(states) => {
                    let mask: u32 = states.iter().map(|s| ct_state_bit(*s)).fold(0, |a, b| a | b);
                    // NFTA_CT_DREG 1, NFTA_CT_KEY 2 (NFT_CT_STATE = 0)
                    e.expr("ct", |b| {
                        b.u32(1, 1);
                        b.u32(2, 0);
                    });
                    // NFTA_BITWISE_SREG 1, DREG 2, LEN 3, MASK 4, XOR 5: (reg & mask) ^ 0
                    e.expr("bitwise", |b| {
                        b.u32(1, 1);
                        b.u32(2, 1);
                        b.u32(3, 4);
                        b.data_value(4, &mask.to_ne_bytes());
                        b.data_value(5, &0u32.to_ne_bytes());
                    });
                    e.cmp(CMP_NEQ, 1, &0u32.to_ne_bytes());
                }
                Match::NfProto(f) => {
                    e.meta(META_NFPROTO, 1);
                    e.cmp(CMP_EQ, 1, &[nfproto(*f)]);
                    family_known = Some(*f);
                }
                Match::Lookup { key, set, negate } => {
                    load_key(e, *key, &mut family_known, interval_of(set)?);
                    e.lookup(set, 1, None, *negate);
                }
                // nft: `meta nfproto ipv6` (unless known), `meta l4proto ipv6-icmp`, the type
                // byte (transport header + 0), then `cmp eq` or a `cmp gte` / `cmp lte` pair.
                Match::Icmpv6Type(lo, hi) => {
                    require_family(e, IpFamily::V6, &mut family_known);
                    e.meta(META_L4PROTO, 1);
                    e.cmp(CMP_EQ, 1, &[IPPROTO_ICMPV6]);
                    e.payload(PAYLOAD_TRANSPORT, 0, 1, 1);
                    if lo == hi {
                        e.cmp(CMP_EQ, 1, &[*lo]);
                    } else {
                        e.cmp(CMP_GTE, 1, &[*lo]);
                        e.cmp(CMP_LTE, 1, &[*hi]);
                    }
                }
                // The hop limit byte: network header + 7.
                Match::Ip6HopLimit(n) => {
                    require_family(e, IpFamily::V6, &mut family_known);
                    e.payload(PAYLOAD_NETWORK, 7, 1, 1);
                    e.cmp(CMP_EQ, 1, &[*n]);
                }
                // nft: `meta l4proto tcp`, the flags byte (transport header + 13) masked with
                // fin|syn|rst|ack (0x17), `cmp neq` syn (0x02).
                Match::TcpNotSyn => {
                    e.meta(META_L4PROTO, 1);
                    e.cmp(CMP_EQ, 1, &[IPPROTO_TCP]);
                    e.payload(PAYLOAD_TRANSPORT, 13, 1, 1);
                    e.expr("bitwise", |b| {
                        b.u32(1, 1);
                        b.u32(2, 1);
                        b.u32(3, 1);
                        b.data_value(4, &[TCP_FIN | TCP_SYN | TCP_RST | TCP_ACK]);
                        b.data_value(5, &[0]);
                    });
                    e.cmp(CMP_NEQ, 1, &[TCP_SYN]);
                }
            }
        }
        if let Some(log) = &rule.log {
            if let Some(limit) = &log.limit {
                e.objref(NFT_OBJECT_LIMIT, limit);
            }
            // NFTA_LOG_GROUP 1 (be16), NFTA_LOG_PREFIX 2: what nft sends for
            // `log prefix "<p>" group <g>`.
            e.expr("log", |b| {
                b.attr(1, &log.group.to_be_bytes());
                b.str(2, &log.prefix);
            });
        }
        if let Some(c) = &rule.named_counter {
            e.objref(NFT_OBJECT_COUNTER, &c.name);
        } else if rule.counter {
            e.expr("counter", |_| {});
        }
        match &rule.verdict {
            None => {}
            Some(Verdict::Accept) => e.immediate_verdict(NF_ACCEPT, None),
            Some(Verdict::Drop) => e.immediate_verdict(NF_DROP, None),
            Some(Verdict::Return) => e.immediate_verdict(NFT_RETURN, None),
            Some(Verdict::Jump(c)) => e.immediate_verdict(NFT_JUMP, Some(c)),
            Some(Verdict::Goto(c)) => e.immediate_verdict(NFT_GOTO, Some(c)),
            Some(Verdict::Vmap { key, map }) => {
                load_key(e, *key, &mut family_known, interval_of(map)?);
                e.lookup(map, 1, Some(NFT_REG_VERDICT), false);
            }
        }
    }
    b.end_nest(list);
    if let Some(c) = &rule.comment {
        b.comment(NFTA_RULE_USERDATA, c);
    }
    b.finish(m);
    Ok(())
}

/// Element messages for one set or map, split to keep each attribute small.
fn encode_elements(b: &mut Batch, kind: u16, table: &str, set: &str, op: usize, elements: &[WireElement<'_>]) {
    let mut elements = elements.iter().peekable();
    while elements.peek().is_some() {
        let m = b.message(kind, if kind == msg::NEWSETELEM { NLM_F_CREATE } else { 0 }, op);
        b.str(NFTA_SET_ELEM_LIST_TABLE, table);
        b.str(NFTA_SET_ELEM_LIST_SET, set);
        let list = b.nest(NFTA_SET_ELEM_LIST_ELEMENTS);
        let start = b.buf.len();
        while let Some(e) = elements.next_if(|_| b.buf.len() - start < ELEMENTS_PER_MESSAGE_BYTES) {
            let elem = b.nest(NFTA_LIST_ELEM);
            if e.interval_end {
                b.u32(NFTA_SET_ELEM_FLAGS, NFT_SET_ELEM_INTERVAL_END);
            }
            b.data_value(NFTA_SET_ELEM_KEY, &e.key);
            if let Some(end) = &e.key_end {
                b.data_value(NFTA_SET_ELEM_KEY_END, end);
            }
            if let Some(v) = e.verdict {
                let (code, chain) = verdict_code(v);
                b.verdict(NFTA_SET_ELEM_DATA, code, chain);
            }
            if e.open {
                // libnftnl's element flags in user data: NFTNL_SET_ELEM_F_INTERVAL_OPEN.
                b.attr(NFTA_SET_ELEM_USERDATA, &[1, 4, 1, 0, 0, 0]);
            }
            b.end_nest(elem);
        }
        b.end_nest(list);
        b.finish(m);
    }
}

/// The kernel's id of a key type (nft's datatype numbers) and its length in bytes.
fn datatype(t: KeyType) -> (u32, u32) {
    match t {
        KeyType::Ipv4Addr => (7, 4),
        KeyType::Ipv6Addr => (8, 16),
        KeyType::InetProto => (12, 1),
        KeyType::InetService => (13, 2),
    }
}

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DATA_TYPE: u16 = 6;
const NFTA_SET_DATA_LEN: u16 = 7;
const NFTA_SET_DESC: u16 = 9;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_USERDATA: u16 = 13;
const NFTA_SET_DESC_CONCAT: u16 = 2;
const NFTA_SET_FIELD_LEN: u16 = 1;
const NFT_SET_INTERVAL: u32 = 0x4;
const NFT_SET_MAP: u32 = 0x8;
const NFT_SET_CONCAT: u32 = 0x80;
const NFT_DATA_VERDICT: u32 = 0xffff_ff00;

/// A set or map declaration, with the user data nft keeps for listing it.
struct SetDeclaration<'a> {
    name: &'a str,
    key: &'a [KeyType],
    interval: bool,
    map: bool,
    comment: Option<&'a str>,
}

fn encode_set_declaration(
    b: &mut Batch,
    table: &str,
    d: &SetDeclaration<'_>,
    op: usize,
    id: u32,
) -> Result<(), Unsupported> {
    let concat = d.key.len() > 1;
    if d.key.is_empty() || (d.map && concat) {
        return Err(Unsupported);
    }
    let (key_type, key_len) = d.key.iter().fold((0u32, 0u32), |(t, l), k| {
        let (id, len) = datatype(*k);
        (t << 6 | id, l + if concat { len.next_multiple_of(4) } else { len })
    });
    let mut flags = 0;
    if d.interval {
        flags |= NFT_SET_INTERVAL;
        if concat {
            flags |= NFT_SET_CONCAT;
        }
    }
    if d.map {
        flags |= NFT_SET_MAP;
    }
    let m = b.message(msg::NEWSET, NLM_F_CREATE, op);
    b.str(NFTA_SET_TABLE, table);
    b.str(NFTA_SET_NAME, d.name);
    b.u32(NFTA_SET_FLAGS, flags);
    b.u32(NFTA_SET_KEY_TYPE, key_type);
    b.u32(NFTA_SET_KEY_LEN, key_len);
    if d.map {
        b.u32(NFTA_SET_DATA_TYPE, NFT_DATA_VERDICT);
        b.u32(NFTA_SET_DATA_LEN, 0);
    }
    if d.interval && concat {
        let desc = b.nest(NFTA_SET_DESC);
        let fields = b.nest(NFTA_SET_DESC_CONCAT);
        for k in d.key {
            let field = b.nest(NFTA_LIST_ELEM);
            b.u32(NFTA_SET_FIELD_LEN, datatype(*k).1);
            b.end_nest(field);
        }
        b.end_nest(fields);
        b.end_nest(desc);
    }
    b.u32(NFTA_SET_ID, id);
    // libnftnl user data (NFTNL_UDATA_SET_*): the key's byte order (big endian for one
    // address, "none" for a concatenation, which also records its typeof), a map's data
    // byte order and data-interval flag, the comment.
    let mut udata: Vec<u8> =
        if concat { vec![0, 4, 0, 0, 0, 0, 3, 8, 0, 4, 13, 0, 0, 0, 1, 0] } else { vec![0, 4, 2, 0, 0, 0] };
    if d.map {
        udata.extend_from_slice(&[1, 4, 0, 0, 0, 0, 6, 4, 0, 0, 0, 0]);
    }
    if let Some(c) = d.comment {
        comment_tlv(&mut udata, UDATA_SET_COMMENT, c);
    }
    b.attr(NFTA_SET_USERDATA, &udata);
    b.finish(m);
    Ok(())
}

const NFTA_OBJ_TABLE: u16 = 1;
const NFTA_OBJ_NAME: u16 = 2;
const NFTA_OBJ_TYPE: u16 = 3;
const NFTA_OBJ_DATA: u16 = 4;
const NFTA_OBJ_USERDATA: u16 = 8;
const NFT_OBJECT_COUNTER: u32 = 1;
const NFT_OBJECT_LIMIT: u32 = 4;
/// libnftnl's NFTNL_UDATA_OBJ_COMMENT.
const UDATA_OBJ_COMMENT: u8 = 0;

/// `add counter`: zero packets and bytes (NFTA_COUNTER_BYTES 1, PACKETS 2), the labels as
/// its comment. An existing counter is left as it is (no NLM_F_EXCL), count and all.
fn encode_counter(b: &mut Batch, table: &str, name: &str, labels: &CounterLabels, op: usize) {
    let m = b.message(msg::NEWOBJ, NLM_F_CREATE, op);
    b.str(NFTA_OBJ_TABLE, table);
    b.str(NFTA_OBJ_NAME, name);
    b.u32(NFTA_OBJ_TYPE, NFT_OBJECT_COUNTER);
    let data = b.nest(NFTA_OBJ_DATA);
    b.attr(1, &0u64.to_be_bytes());
    b.attr(2, &0u64.to_be_bytes());
    b.end_nest(data);
    let mut udata = Vec::new();
    comment_tlv(&mut udata, UDATA_OBJ_COMMENT, &labels.comment());
    b.attr(NFTA_OBJ_USERDATA, &udata);
    b.finish(m);
}

/// `add limit`: `rate <r>/second burst <b> packets` (NFTA_LIMIT_RATE 1, UNIT 2 in seconds,
/// BURST 3, TYPE 4: NFT_LIMIT_PKTS 0, FLAGS 5).
fn encode_limit(b: &mut Batch, table: &str, name: &str, limit: &Limit, op: usize) {
    let m = b.message(msg::NEWOBJ, NLM_F_CREATE, op);
    b.str(NFTA_OBJ_TABLE, table);
    b.str(NFTA_OBJ_NAME, name);
    b.u32(NFTA_OBJ_TYPE, NFT_OBJECT_LIMIT);
    let data = b.nest(NFTA_OBJ_DATA);
    b.attr(1, &u64::from(limit.per_second).to_be_bytes());
    b.attr(2, &1u64.to_be_bytes());
    b.u32(3, limit.burst);
    b.u32(4, 0);
    b.u32(5, 0);
    b.end_nest(data);
    b.finish(m);
}

fn encode_table(b: &mut Batch, kind: u16, table: &str, op: usize) {
    let m = b.message(kind, if kind == msg::NEWTABLE { NLM_F_CREATE } else { 0 }, op);
    b.str(NFTA_TABLE_NAME, table);
    if kind == msg::NEWTABLE {
        b.u32(NFTA_TABLE_FLAGS, 0);
    }
    b.finish(m);
}

fn encode_chain(b: &mut Batch, table: &str, name: &str, chain: &Chain, op: usize) {
    let m = b.message(msg::NEWCHAIN, NLM_F_CREATE, op);
    b.str(NFTA_CHAIN_TABLE, table);
    b.str(NFTA_CHAIN_NAME, name);
    if let Some(base) = chain.base {
        let hook = b.nest(NFTA_CHAIN_HOOK);
        b.u32(NFTA_HOOK_HOOKNUM, hook_number(base.hook));
        b.attr(NFTA_HOOK_PRIORITY, &base.priority.to_be_bytes());
        b.end_nest(hook);
        b.u32(NFTA_CHAIN_POLICY, if base.policy == ChainPolicy::Accept { NF_ACCEPT } else { NF_DROP } as u32);
        b.str(NFTA_CHAIN_TYPE, "filter");
    }
    if let Some(c) = &chain.comment {
        b.comment(NFTA_CHAIN_USERDATA, c);
    }
    b.finish(m);
}

/// Encodes one op; `kinds` holds the table's sets as they are before it.
fn encode_op(
    b: &mut Batch,
    t: &str,
    i: usize,
    op: &Op,
    kinds: &KnownSets,
    set_id: &mut u32,
) -> Result<(), Unsupported> {
    // Elements of an existing set: only plain ones (changing ranges in place is left to
    // nft, which reads the set's current ranges first).
    let existing_elements =
        |b: &mut Batch, kind: u16, name: &str, map: bool, wire: Result<Vec<WireElement<'_>>, Unsupported>| {
            match kinds.kind(name) {
                Some(k) if k.map == map && !k.interval => encode_elements(b, kind, t, name, i, &wire?),
                _ => return Err(Unsupported),
            }
            Ok(())
        };
    match op {
        Op::AddTable => encode_table(b, msg::NEWTABLE, t, i),
        Op::DeleteTable => encode_table(b, msg::DELTABLE, t, i),
        Op::AddChain { name, chain } => encode_chain(b, t, name, chain, i),
        Op::FlushChain { name } => {
            let m = b.message(msg::DELRULE, 0, i);
            b.str(NFTA_RULE_TABLE, t);
            b.str(NFTA_RULE_CHAIN, name);
            b.finish(m);
        }
        Op::DeleteChain { name } => {
            let m = b.message(msg::DELCHAIN, 0, i);
            b.str(NFTA_CHAIN_TABLE, t);
            b.str(NFTA_CHAIN_NAME, name);
            b.finish(m);
        }
        Op::AddRule { chain, rule } => encode_rule(b, t, chain, rule, i, kinds)?,
        Op::AddCounter { name, labels } => encode_counter(b, t, name, labels, i),
        Op::AddLimit { name, limit } => encode_limit(b, t, name, limit, i),
        Op::DeleteCounter { name } => {
            let m = b.message(msg::DELOBJ, 0, i);
            b.str(NFTA_OBJ_TABLE, t);
            b.str(NFTA_OBJ_NAME, name);
            b.u32(NFTA_OBJ_TYPE, NFT_OBJECT_COUNTER);
            b.finish(m);
        }
        Op::DeleteSet { name } | Op::DeleteMap { name } => {
            let m = b.message(msg::DELSET, 0, i);
            b.str(NFTA_SET_TABLE, t);
            b.str(NFTA_SET_NAME, name);
            b.finish(m);
        }
        Op::AddSet { name, set } => {
            let d = SetDeclaration {
                name,
                key: &set.key,
                interval: set.interval,
                map: false,
                comment: set.comment.as_deref(),
            };
            *set_id += 1;
            encode_set_declaration(b, t, &d, i, *set_id)?;
            let wire = wire_elements(set.interval, set.key.len() > 1, set.elements.iter().map(|e| (e, None)))?;
            encode_elements(b, msg::NEWSETELEM, t, name, i, &wire);
        }
        Op::AddMap { name, map } => {
            let d = SetDeclaration {
                name,
                key: &map.key,
                interval: map.interval,
                map: true,
                comment: map.comment.as_deref(),
            };
            *set_id += 1;
            encode_set_declaration(b, t, &d, i, *set_id)?;
            let wire = wire_elements(map.interval, false, map.elements.iter().map(|(e, v)| (e, Some(v))))?;
            encode_elements(b, msg::NEWSETELEM, t, name, i, &wire);
        }
        Op::AddElements { set, elements } => {
            let wire = wire_elements(false, false, elements.iter().map(|e| (e, None)));
            existing_elements(b, msg::NEWSETELEM, set, false, wire)?;
        }
        Op::DeleteElements { set, elements } => {
            let wire = wire_elements(false, false, elements.iter().map(|e| (e, None)));
            existing_elements(b, msg::DELSETELEM, set, false, wire)?;
        }
        Op::AddMapElements { map, elements } => {
            let wire = wire_elements(false, false, elements.iter().map(|(e, v)| (e, Some(v))));
            existing_elements(b, msg::NEWSETELEM, map, true, wire)?;
        }
        Op::DeleteMapElements { map, elements } => {
            let wire = wire_elements(false, false, elements.iter().map(|e| (e, None)));
            existing_elements(b, msg::DELSETELEM, map, true, wire)?;
        }
        Op::DefineTable(rs) => {
            // In the order nft's block syntax amounts to: the table, its sets, every
            // chain, the rules (which name sets and chains), then the verdict maps'
            // elements (which jump to chains).
            encode_table(b, msg::NEWTABLE, t, i);
            let mut inner = KnownSets::empty(t);
            for (name, set) in &rs.sets {
                let op = Op::AddSet { name: name.clone(), set: set.clone() };
                encode_op(b, t, i, &op, &inner, set_id)?;
                inner.applied_op(&op);
            }
            for (name, map) in &rs.maps {
                let declared = crate::nft::ir::Map { elements: Default::default(), ..map.clone() };
                let op = Op::AddMap { name: name.clone(), map: declared };
                encode_op(b, t, i, &op, &inner, set_id)?;
                inner.applied_op(&op);
            }
            for (name, labels) in &rs.counters {
                encode_counter(b, t, name, labels, i);
            }
            for (name, limit) in &rs.limits {
                encode_limit(b, t, name, limit, i);
            }
            for (name, chain) in &rs.chains {
                encode_chain(b, t, name, chain, i);
            }
            for (name, chain) in &rs.chains {
                for rule in &chain.rules {
                    encode_rule(b, t, name, rule, i, &inner)?;
                }
            }
            for (name, map) in &rs.maps {
                let wire = wire_elements(map.interval, false, map.elements.iter().map(|(e, v)| (e, Some(v))))?;
                encode_elements(b, msg::NEWSETELEM, t, name, i, &wire);
            }
        }
    }
    Ok(())
}

/// The whole transaction as one batch, or `Unsupported` if any op needs nft. `known`:
/// the table's sets as applied (`None`: unknown, so only ops that need none are encoded).
pub(super) fn encode(tx: &Transaction, known: Option<&KnownSets>, first_seq: u32) -> Result<Encoded, Unsupported> {
    // Copied only if the transaction adds or removes sets (a partial sync rarely does).
    let mut kinds = match known {
        Some(k) if k.table == tx.table => std::borrow::Cow::Borrowed(k),
        _ => std::borrow::Cow::Owned(KnownSets::empty(&tx.table)),
    };
    let mut b = Batch::new(first_seq);
    let mut set_id = 0;
    for (i, op) in tx.ops.iter().enumerate() {
        encode_op(&mut b, &tx.table, i, op, &kinds, &mut set_id)?;
        if KnownSets::changed_by(op) {
            kinds.to_mut().applied_op(op);
        }
    }
    Ok(b.end())
}

#[cfg(test)]
mod tests {
    use super::super::{attributes, messages, nftables_message};
    use super::*;
    use crate::nft::ir::{KeyType, MapVerdict, Ruleset, Set, Value};
    use std::net::IpAddr;
    use std::sync::Arc;

    fn known(sets: &[(&str, bool, bool)]) -> KnownSets {
        KnownSets {
            table: "t".into(),
            sets: sets
                .iter()
                .map(|(n, map, interval)| (n.to_string(), SetKind { map: *map, interval: *interval }))
                .collect(),
        }
    }

    fn addr(s: &str) -> Element {
        Element::single(Value::Addr(s.parse().unwrap()))
    }

    #[test]
    fn a_concatenation_pads_each_component_to_a_register() {
        let e = Element::concat(vec![Value::Addr("10.1.2.3".parse().unwrap()), Value::Proto(6), Value::Port(8080)]);
        assert_eq!(element_key(&e).unwrap(), vec![10, 1, 2, 3, 6, 0, 0, 0, 0x1f, 0x90, 0, 0]);
        assert_eq!(element_key(&Element::single(Value::Port(80))).unwrap(), vec![0, 80]);
    }

    #[test]
    fn element_changes_of_a_plain_set_are_encoded_and_intervals_are_not() {
        let mut tx = Transaction::new("t");
        tx.push(Op::AddElements { set: "s".into(), elements: vec![addr("10.0.0.1")] });
        tx.push(Op::DeleteMapElements { map: "m".into(), elements: vec![addr("10.0.0.2")] });
        assert!(encode(&tx, Some(&known(&[("s", false, false), ("m", true, false)])), 1).is_ok());
        assert_eq!(encode(&tx, Some(&known(&[("s", false, true), ("m", true, false)])), 1), Err(Unsupported));
        assert_eq!(encode(&tx, Some(&known(&[("m", true, false)])), 1), Err(Unsupported), "unknown set");
        assert_eq!(
            encode(&tx, Some(&known(&[("s", true, false), ("m", true, false)])), 1),
            Err(Unsupported),
            "a map named as a set"
        );
    }

    #[test]
    fn range_changes_in_an_existing_interval_set_go_through_nft() {
        // nft reads the set's current ranges first; a new set's ranges are encoded.
        let mut tx = Transaction::new("t");
        tx.push(Op::DeleteElements { set: "cidr".into(), elements: vec![addr("10.0.0.1")] });
        assert_eq!(encode(&tx, Some(&known(&[("cidr", false, true)])), 1), Err(Unsupported));
        let mut rs = Ruleset::new("t");
        rs.sets.insert("cidr".into(), Arc::new(Set { key: vec![KeyType::Ipv4Addr], interval: true, ..Set::default() }));
        let tx =
            Transaction { table: "t".into(), ops: vec![Op::AddTable, Op::DeleteTable, Op::DefineTable(Box::new(rs))] };
        assert!(encode(&tx, None, 1).is_ok());
    }

    #[test]
    fn large_element_lists_are_split_into_messages_under_the_attribute_limit() {
        let elements: Vec<(Element, MapVerdict)> = (0..20_000u32)
            .map(|i| (Element::single(Value::Addr(IpAddr::V4(i.into()))), MapVerdict::Jump("some_chain".into())))
            .collect();
        let tx = Transaction { table: "t".into(), ops: vec![Op::AddMapElements { map: "m".into(), elements }] };
        let Encoded { batch, origins } = encode(&tx, Some(&known(&[("m", true, false)])), 7).unwrap();
        assert!(origins.len() > 1);
        let msgs: Vec<_> = messages(&batch).collect();
        assert_eq!(msgs.len(), origins.len() + 2, "BEGIN, the element messages, END");
        assert!(msgs.iter().all(|(_, _, _, p)| p.len() < 60 * 1024));
        let count: usize = msgs[1..msgs.len() - 1]
            .iter()
            .map(|(_, _, _, p)| {
                attributes(&p[4..])
                    .filter(|(k, _)| *k == NFTA_SET_ELEM_LIST_ELEMENTS)
                    .map(|(_, list)| attributes(list).count())
                    .sum::<usize>()
            })
            .sum();
        assert_eq!(count, 20_000);
        assert_eq!(msgs.first().unwrap().2, 7);
    }

    /// The attributes of the one NEWSET message `op` encodes to, set id left out.
    fn newset_attributes(op: Op) -> Vec<(u16, Vec<u8>)> {
        let tx = Transaction { table: "t2".into(), ops: vec![op] };
        let Encoded { batch, .. } = encode(&tx, None, 1).unwrap();
        let (_, _, _, payload) =
            messages(&batch).find(|(k, ..)| nftables_message(*k) == Some(msg::NEWSET)).expect("a NEWSET");
        attributes(&payload[4..]).filter(|(k, _)| *k != NFTA_SET_ID).map(|(k, v)| (k, v.to_vec())).collect()
    }

    fn be(v: u32) -> Vec<u8> {
        v.to_be_bytes().to_vec()
    }

    /// What nft 1.0.6 sends for the same declarations (`nft --debug=mnl -f`), attribute by
    /// attribute: the user data is not visible in listings, so only this pins it down.
    #[test]
    fn set_declarations_carry_the_same_attributes_and_user_data_as_nft_sends() {
        let set = |key: Vec<KeyType>, interval: bool, comment: Option<&str>| {
            Arc::new(Set { key, interval, comment: comment.map(String::from), ..Set::default() })
        };
        let name = |n: &str| format!("{n}\0").into_bytes();
        assert_eq!(
            newset_attributes(Op::AddSet { name: "s4".into(), set: set(vec![KeyType::Ipv4Addr], false, Some("c4")) }),
            vec![
                (1, name("t2")),
                (2, name("s4")),
                (3, be(0)),
                (4, be(7)),
                (5, be(4)),
                (13, vec![0, 4, 2, 0, 0, 0, 7, 3, b'c', b'4', 0]),
            ]
        );
        let concat_udata = vec![0, 4, 0, 0, 0, 0, 3, 8, 0, 4, 13, 0, 0, 0, 1, 0];
        let n4 = vec![KeyType::Ipv4Addr, KeyType::InetProto, KeyType::InetService];
        assert_eq!(
            newset_attributes(Op::AddSet { name: "n4".into(), set: set(n4, false, None) }),
            vec![
                (1, name("t2")),
                (2, name("n4")),
                (3, be(0)),
                (4, be(0x730d)),
                (5, be(12)),
                (13, concat_udata.clone())
            ]
        );
        let p = newset_attributes(Op::AddSet {
            name: "p".into(),
            set: set(vec![KeyType::InetProto, KeyType::InetService], true, None),
        });
        let desc: Vec<u8> =
            [&[28u8, 0, 2, 0x80][..], &[12, 0, 1, 0x80, 8, 0, 1, 0], &be(1), &[12, 0, 1, 0x80, 8, 0, 1, 0], &be(2)]
                .concat();
        assert_eq!(
            p,
            vec![
                (1, name("t2")),
                (2, name("p")),
                (3, be(0x84)),
                (4, be(0x30d)),
                (5, be(8)),
                (9, desc),
                (13, concat_udata)
            ]
        );
        let map =
            crate::nft::ir::Map { key: vec![KeyType::Ipv6Addr], comment: Some("cm".into()), ..Default::default() };
        assert_eq!(
            newset_attributes(Op::AddMap { name: "m6".into(), map }),
            vec![
                (1, name("t2")),
                (2, name("m6")),
                (3, be(8)),
                (4, be(8)),
                (5, be(16)),
                (6, be(0xffff_ff00)),
                (7, be(0)),
                (13, vec![0, 4, 2, 0, 0, 0, 1, 4, 0, 0, 0, 0, 6, 4, 0, 0, 0, 0, 7, 3, b'c', b'm', 0]),
            ]
        );
    }

    #[test]
    fn interval_elements_are_sent_as_nft_sends_them() {
        let prefix = |s: &str| Element::single(Value::Prefix(s.parse().unwrap()));
        let elements = [prefix("10.0.0.0/16"), prefix("10.1.0.0/24"), addr("192.168.1.1")];
        let wire = wire_elements(true, false, elements.iter().map(|e| (e, None))).unwrap();
        let summary: Vec<(Vec<u8>, bool)> = wire.iter().map(|w| (w.key.clone(), w.interval_end)).collect();
        assert_eq!(
            summary,
            vec![
                (vec![0, 0, 0, 0], true),
                (vec![10, 0, 0, 0], false),
                (vec![10, 1, 0, 0], true),
                (vec![10, 1, 0, 0], false),
                (vec![10, 1, 1, 0], true),
                (vec![192, 168, 1, 1], false),
                (vec![192, 168, 1, 2], true),
            ]
        );
        // A range up to the last address has no end element; nft marks it open instead.
        let all = [prefix("0.0.0.0/0")];
        let wire = wire_elements(true, false, all.iter().map(|e| (e, None))).unwrap();
        assert_eq!(wire, vec![WireElement { open: true, ..WireElement::key(vec![0; 4], None) }]);
        // A concatenation with a port range: its start and its end.
        let ports = [Element::concat(vec![Value::Proto(17), Value::PortRange(1000, 2000)])];
        let wire = wire_elements(true, true, ports.iter().map(|e| (e, None))).unwrap();
        assert_eq!(wire[0].key, vec![17, 0, 0, 0, 0x03, 0xe8, 0, 0]);
        assert_eq!(wire[0].key_end, Some(vec![17, 0, 0, 0, 0x07, 0xd0, 0, 0]));
    }

    #[test]
    fn what_was_applied_teaches_the_kinds_of_sets() {
        let mut rs = Ruleset::new("t");
        rs.sets.insert("s".into(), Arc::new(Set { interval: true, ..Set::default() }));
        let mut k = KnownSets::default();
        k.applied(&Transaction { table: "t".into(), ops: vec![Op::DefineTable(Box::new(rs))] });
        assert_eq!(k.kind("s"), Some(SetKind { map: false, interval: true }));
        k.applied(&Transaction { table: "t".into(), ops: vec![Op::DeleteSet { name: "s".into() }] });
        assert_eq!(k.kind("s"), None);
    }
}
