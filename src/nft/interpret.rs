//! Decides a packet against a [`Ruleset`] exactly as the kernel's nf_tables would.
//!
//! ```text
//!  hook H: base chains of H by ascending priority
//!    each: rules in order; a rule matches iff all its matches hold, then log, counter, verdict
//!    (log, limit and counters never decide: a rule without a verdict goes on to the next):
//!      accept ─► this base chain is done; the next base chain of H still runs
//!      drop   ─► the packet is gone
//!      jump c ─► push a return point, run c    goto c ─► run c, no return point
//!      return / end of a regular chain ─► back to the return point (base chain: its policy)
//!      vmap   ─► the element's verdict; no element: the rule does not match
//!  all base chains accepted ─► the packet passes the hook
//! ```
//!
//! An `ip …`/`ip6 …` match carries nft's implicit `meta nfproto` dependency: it never holds
//! for a packet of the other family, negated or not. `icmpv6 type` and `ip6 hoplimit` hold
//! only for IPv6 packets (the first for ICMPv6 ones), as nft's dependencies make them.

use std::cell::OnceCell;
use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;

use super::ir::{
    AddrField, ChainPolicy, CtState, Element, Hook, IpFamily, Key, MapVerdict, Match, Ruleset, Value, Verdict,
};
use super::render;

/// The kernel's jump stack depth (NFT_JUMP_STACK_SIZE).
pub const MAX_JUMP_DEPTH: usize = 16;

/// The fields of a packet that our rulesets look at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol number (6 TCP, 17 UDP, 132 SCTP).
    pub proto: u8,
    pub dport: u16,
    pub ct: CtState,
    /// The ICMPv6 type of an ICMPv6 packet (`proto` 58); ignored for other protocols.
    pub icmpv6_type: u8,
    /// The IPv6 hop limit (ignored for IPv4).
    pub hop_limit: u8,
    /// The TCP flags byte of a TCP segment (`proto` 6); ignored for other protocols.
    pub tcp_flags: u8,
}

/// The TCP flags of a connection's first segment: SYN alone.
pub const TCP_SYN: u8 = 0x02;
/// fin | syn | rst | ack: the flags `tcp flags & (...) != syn` looks at.
const TCP_OPENING_MASK: u8 = 0x17;

impl Packet {
    /// The first packet of a new flow (`ct state new`; for TCP a SYN), with a hop limit of
    /// 64 (Linux's default).
    pub fn new(src: IpAddr, dst: IpAddr, proto: u8, dport: u16) -> Packet {
        Packet { src, dst, proto, dport, ct: CtState::New, icmpv6_type: 0, hop_limit: 64, tcp_flags: TCP_SYN }
    }

    /// The same packet with these TCP flags.
    pub fn with_tcp_flags(self, tcp_flags: u8) -> Packet {
        Packet { tcp_flags, ..self }
    }

    /// The same packet in another connection-tracking state.
    pub fn with_ct(self, ct: CtState) -> Packet {
        Packet { ct, ..self }
    }

    /// An ICMPv6 message of `icmpv6_type` with hop limit `hop_limit` (conntrack does not
    /// track neighbour discovery: its state is whatever `ct` the caller gives).
    pub fn icmpv6(src: IpAddr, dst: IpAddr, icmpv6_type: u8, hop_limit: u8) -> Packet {
        Packet { src, dst, proto: 58, dport: 0, ct: CtState::New, icmpv6_type, hop_limit, tcp_flags: 0 }
    }

    pub fn family(&self) -> IpFamily {
        IpFamily::of(self.src)
    }
}

impl fmt::Display for Packet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {} {} dport {} ct {}",
            self.src,
            self.dst,
            super::ir::proto_name(self.proto),
            self.dport,
            self.ct.as_str()
        )
    }
}

/// The fate of a packet at a hook (or in one base chain).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    Accept,
    Drop,
}

/// A set or map prepared for lookups: exact keys hashed, intervals scanned.
#[derive(Default)]
struct Lookup<T> {
    exact: HashMap<Vec<Value>, T>,
    intervals: Vec<(Element, T)>,
}

impl<T: Clone> Lookup<T> {
    fn build<E: std::borrow::Borrow<Element>>(items: impl Iterator<Item = (E, T)>) -> Self {
        let mut l = Lookup { exact: HashMap::new(), intervals: Vec::new() };
        for (e, t) in items {
            let e = e.borrow();
            if e.is_interval() {
                l.intervals.push((e.clone(), t));
            } else {
                l.exact.insert(e.values().to_vec(), t);
            }
        }
        l
    }
    fn get(&self, key: &[Value]) -> Option<&T> {
        self.exact.get(key).or_else(|| self.intervals.iter().find(|(e, _)| e.contains(key)).map(|(_, t)| t))
    }
}

/// A ruleset ready to decide packets (build once, ask many times).
pub struct Interpreter<'a> {
    rs: &'a Ruleset,
    /// Each set's and map's lookup, built the first time a packet needs it: a decision
    /// usually consults a handful of a ruleset's hundreds of sets (the agent decides every
    /// conntrack flow after a sync with a fresh interpreter).
    sets: HashMap<&'a str, (&'a super::ir::Set, OnceCell<Lookup<()>>)>,
    maps: HashMap<&'a str, (&'a super::ir::Map, OnceCell<Lookup<&'a MapVerdict>>)>,
}

/// One step of a trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub depth: usize,
    pub text: String,
}

impl<'a> Interpreter<'a> {
    pub fn new(rs: &'a Ruleset) -> Self {
        let sets = rs.sets.iter().map(|(n, s)| (n.as_str(), (&**s, OnceCell::new()))).collect();
        let maps = rs.maps.iter().map(|(n, m)| (n.as_str(), (m, OnceCell::new()))).collect();
        Interpreter { rs, sets, maps }
    }

    fn set(&self, name: &str) -> Option<&Lookup<()>> {
        self.sets
            .get(name)
            .map(|(set, lookup)| lookup.get_or_init(|| Lookup::build(set.elements.iter().map(|e| (e, ())))))
    }

    fn map(&self, name: &str) -> Option<&Lookup<&'a MapVerdict>> {
        self.maps.get(name).map(|(map, lookup)| lookup.get_or_init(|| Lookup::build(map.elements.iter())))
    }

    pub fn ruleset(&self) -> &Ruleset {
        self.rs
    }

    /// The fate of `pkt` at `hook`: every base chain of the hook, by priority.
    pub fn hook(&self, hook: Hook, pkt: &Packet) -> Fate {
        self.hook_traced(hook, pkt, &mut None)
    }

    /// Like [`Interpreter::hook`], appending the chains and rules it went through to `trace`.
    pub fn hook_traced(&self, hook: Hook, pkt: &Packet, trace: &mut Option<Vec<Step>>) -> Fate {
        for (name, chain) in self.rs.base_chains(hook) {
            let base = chain.base.expect("base chain");
            note(trace, 0, || format!("base chain {name} (hook {}, priority {})", hook.as_str(), base.priority));
            if self.base_chain(name, pkt, trace) == Fate::Drop {
                return Fate::Drop;
            }
        }
        Fate::Accept
    }

    fn base_chain(&self, base: &str, pkt: &Packet, trace: &mut Option<Vec<Step>>) -> Fate {
        // (chain, next rule index) return points; the current frame is (chain, idx).
        let mut stack: Vec<(&str, usize)> = Vec::new();
        let (mut chain, mut idx): (&str, usize) = (self.rs.chains.get_key_value(base).expect("exists").0.as_str(), 0);
        loop {
            let rules = &self.rs.chains[chain].rules;
            if idx >= rules.len() {
                // End of chain: a regular chain returns, a base chain applies its policy.
                match stack.pop() {
                    Some((c, i)) => {
                        note(trace, stack.len() + 1, || format!("end of {chain}: return"));
                        (chain, idx) = (c, i);
                        continue;
                    }
                    None => {
                        let policy = self.rs.chains[chain].base.map_or(ChainPolicy::Accept, |b| b.policy);
                        note(trace, 1, || format!("end of {chain}: policy {}", policy.as_str()));
                        return if policy == ChainPolicy::Accept { Fate::Accept } else { Fate::Drop };
                    }
                }
            }
            let rule = &rules[idx];
            idx += 1;
            if !rule.matches.iter().all(|m| self.matches(m, pkt)) {
                continue;
            }
            let depth = stack.len() + 1;
            let mv: MapVerdict = match &rule.verdict {
                None => {
                    note(trace, depth, || format!("{chain} rule {}: {} (continue)", idx - 1, render::rule(rule)));
                    continue;
                }
                Some(Verdict::Accept) => MapVerdict::Accept,
                Some(Verdict::Drop) => MapVerdict::Drop,
                Some(Verdict::Return) => MapVerdict::Return,
                Some(Verdict::Jump(c)) => MapVerdict::Jump(c.clone()),
                Some(Verdict::Goto(c)) => MapVerdict::Goto(c.clone()),
                Some(Verdict::Vmap { key, map }) => {
                    let Some(k) = key_of(*key, pkt) else { continue };
                    match self.map(map.as_str()).and_then(|m| m.get(&k)) {
                        Some(v) => (*v).clone(),
                        None => {
                            note(trace, depth, || {
                                format!("{chain} rule {}: {} (no element)", idx - 1, render::rule(rule))
                            });
                            continue;
                        }
                    }
                }
            };
            note(trace, depth, || {
                format!("{chain} rule {}: {} => {}", idx - 1, render::rule(rule), render::map_verdict(&mv))
            });
            match mv {
                MapVerdict::Accept => return Fate::Accept,
                MapVerdict::Drop => return Fate::Drop,
                MapVerdict::Return => match stack.pop() {
                    Some((c, i)) => (chain, idx) = (c, i),
                    None => {
                        let policy = self.rs.chains[chain].base.map_or(ChainPolicy::Accept, |b| b.policy);
                        return if policy == ChainPolicy::Accept { Fate::Accept } else { Fate::Drop };
                    }
                },
                MapVerdict::Jump(target) => {
                    stack.push((chain, idx));
                    assert!(stack.len() <= MAX_JUMP_DEPTH, "jump stack overflow (the kernel refuses such a ruleset)");
                    chain = self.rs.chains.get_key_value(target.as_str()).expect("jump target exists").0.as_str();
                    idx = 0;
                }
                MapVerdict::Goto(target) => {
                    chain = self.rs.chains.get_key_value(target.as_str()).expect("goto target exists").0.as_str();
                    idx = 0;
                }
            }
        }
    }

    fn matches(&self, m: &Match, pkt: &Packet) -> bool {
        match m {
            Match::CtState(states) => states.contains(&pkt.ct),
            Match::NfProto(f) => pkt.family() == *f,
            Match::Icmpv6Type(lo, hi) => {
                pkt.family() == IpFamily::V6 && pkt.proto == 58 && (*lo..=*hi).contains(&pkt.icmpv6_type)
            }
            Match::Ip6HopLimit(n) => pkt.family() == IpFamily::V6 && pkt.hop_limit == *n,
            Match::TcpNotSyn => pkt.proto == 6 && pkt.tcp_flags & TCP_OPENING_MASK != TCP_SYN,
            Match::Lookup { key, set, negate } => {
                let Some(k) = key_of(*key, pkt) else {
                    return false;
                };
                let found = self.set(set.as_str()).is_some_and(|s| s.get(&k).is_some());
                found != *negate
            }
        }
    }
}

/// The packet's key for a lookup, or `None` when the key's family is not the packet's.
fn key_of(key: Key, pkt: &Packet) -> Option<Vec<Value>> {
    if key.family().is_some_and(|f| f != pkt.family()) {
        return None;
    }
    let addr = |field: AddrField| Value::Addr(if field == AddrField::Saddr { pkt.src } else { pkt.dst });
    Some(match key {
        Key::Addr(_, field) => vec![addr(field)],
        Key::ProtoDport => vec![Value::Proto(pkt.proto), Value::Port(pkt.dport)],
        Key::AddrProtoDport(_, field) => {
            vec![addr(field), Value::Proto(pkt.proto), Value::Port(pkt.dport)]
        }
    })
}

fn note(trace: &mut Option<Vec<Step>>, depth: usize, text: impl FnOnce() -> String) {
    if let Some(t) = trace {
        t.push(Step { depth, text: text() });
    }
}
