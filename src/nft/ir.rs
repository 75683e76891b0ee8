//! The typed nftables IR: what a node's ruleset is made of, as data, never as free text.
//!
//! ```text
//!  Ruleset (one `inet` table)
//!   ├─ sets   name → Set { key: [KeyType], interval, elements: {Element} }
//!   ├─ maps   name → Map { key: [KeyType], elements: {Element → MapVerdict} }   (verdict maps)
//!   ├─ counters name → CounterLabels      (named `counter` objects: what a rule counts into)
//!   ├─ limits   name → Limit { rate/s, burst }   (named `limit` objects: shared budgets)
//!   └─ chains name → Chain { base: Option<BaseChain{hook, priority, policy}>, rules: [Rule] }
//!                          Rule { matches: [Match], log, counter | named_counter, verdict, comment }
//! ```
//!
//! Every collection is a `BTreeMap`/`BTreeSet`, so equal rulesets render byte-identically.
//! Names come from [`crate::nft::names`]; comments are sanitised there too.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

/// The address family of the one table we own: `inet` (IPv4 and IPv6 together).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TableFamily {
    Inet,
}

impl TableFamily {
    pub fn as_str(self) -> &'static str {
        "inet"
    }
}

/// A whole table: the unit `compile` produces, `diff` compares and the fake holds.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Ruleset {
    pub table: String,
    /// Shared: a set that did not change is the same allocation in the applied and the
    /// desired ruleset (and in the compiler's cache), so keeping both costs nothing and
    /// [`crate::nft::diff`] skips it without looking at its elements.
    pub sets: BTreeMap<String, Arc<Set>>,
    pub maps: BTreeMap<String, Map>,
    /// Shared like the sets: the compiler reuses a chain whose policy or pod did not
    /// change, and the diff skips it unread.
    pub chains: BTreeMap<String, Arc<Chain>>,
    /// Named counter objects, each with what it counts (the agent's metric labels). Rules
    /// point at them by name ([`Rule::named_counter`]): an object outlives the rewrite of the
    /// chains that use it, so a partial sync keeps its count.
    pub counters: BTreeMap<String, Arc<CounterLabels>>,
    /// Named limit objects (token buckets shared by every rule that names them).
    pub limits: BTreeMap<String, Limit>,
}

impl Ruleset {
    pub fn new(table: impl Into<String>) -> Self {
        Ruleset { table: table.into(), ..Ruleset::default() }
    }

    pub fn family(&self) -> TableFamily {
        TableFamily::Inet
    }

    /// Number of rules over all chains.
    pub fn rule_count(&self) -> usize {
        self.chains.values().map(|c| c.rules.len()).sum()
    }

    /// Number of set and map elements over all sets and maps.
    pub fn element_count(&self) -> usize {
        self.sets.values().map(|s| s.elements.len()).sum::<usize>()
            + self.maps.values().map(|m| m.elements.len()).sum::<usize>()
    }

    /// The named counters some rule counts into.
    pub fn referenced_counters(&self) -> BTreeSet<&str> {
        let rules = self.chains.values().flat_map(|c| &c.rules);
        rules.filter_map(|r| r.named_counter.as_ref().map(|c| c.name.as_str())).collect()
    }

    /// The names of the sets some rule looks up.
    pub fn referenced_sets(&self) -> BTreeSet<&str> {
        let lookups = self.chains.values().flat_map(|c| &c.rules).flat_map(|r| &r.matches);
        lookups
            .filter_map(|m| match m {
                Match::Lookup { set, .. } => Some(set.as_str()),
                _ => None,
            })
            .collect()
    }

    /// The names of the sets some rule looks up negated (`!= @set`): the unknown-pod
    /// guard's known pods, where membership lets traffic on.
    pub fn negated_lookups(&self) -> BTreeSet<&str> {
        let lookups = self.chains.values().flat_map(|c| &c.rules).flat_map(|r| &r.matches);
        lookups
            .filter_map(|m| match m {
                Match::Lookup { set, negate: true, .. } => Some(set.as_str()),
                _ => None,
            })
            .collect()
    }

    /// The ruleset without the sets no rule looks up: what it does to packets, whatever
    /// idle sets it keeps (see [`crate::compile::IncrementalCompiler::keeping_idle_sets`]).
    pub fn without_idle_sets(&self) -> Ruleset {
        let referenced = self.referenced_sets();
        let mut out = self.clone();
        out.sets.retain(|name, _| referenced.contains(name.as_str()));
        out
    }

    /// Base chains of a hook, by ascending priority (then name): the kernel's evaluation order.
    pub fn base_chains(&self, hook: Hook) -> Vec<(&str, &Chain)> {
        let mut out: Vec<(&str, &Chain)> = self
            .chains
            .iter()
            .filter(|(_, c)| c.base.is_some_and(|b| b.hook == hook))
            .map(|(n, c)| (n.as_str(), &**c))
            .collect();
        out.sort_by_key(|(n, c)| (c.base.map(|b| b.priority), *n));
        out
    }
}

/// A netfilter hook of the `inet` family that we attach to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    // The kernel's numbers (`NF_INET_*`), which [`Hook::number`] reads.
    Prerouting = 0,
    Input = 1,
    Forward = 2,
    Output = 3,
    Postrouting = 4,
}

impl Hook {
    /// The hooks in the kernel's order (their netfilter numbers are their indices).
    pub const ALL: [Hook; 5] = [Hook::Prerouting, Hook::Input, Hook::Forward, Hook::Output, Hook::Postrouting];

    /// The kernel's number of the hook in the inet, ip and ip6 families (`NF_INET_*`).
    pub fn number(self) -> u8 {
        self as u8
    }

    /// The hook the kernel numbers `n` (`None`: one we never attach to, e.g. `NF_INET_INGRESS`).
    pub fn from_number(n: u8) -> Option<Hook> {
        Hook::ALL.get(usize::from(n)).copied()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Prerouting => "prerouting",
            Hook::Input => "input",
            Hook::Forward => "forward",
            Hook::Output => "output",
            Hook::Postrouting => "postrouting",
        }
    }
}

/// What a base chain does with a packet that falls off its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChainPolicy {
    Accept,
    Drop,
}

impl ChainPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            ChainPolicy::Accept => "accept",
            ChainPolicy::Drop => "drop",
        }
    }
}

/// `type filter hook <hook> priority <priority>; policy <policy>;`
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BaseChain {
    pub hook: Hook,
    pub priority: i32,
    pub policy: ChainPolicy,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Chain {
    /// `Some` for a base chain (attached to a hook), `None` for a regular chain.
    pub base: Option<BaseChain>,
    pub comment: Option<String>,
    pub rules: Vec<Rule>,
}

/// One rule: all matches must hold, then the optional log (under its limit), the optional
/// counter, then the verdict.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Rule {
    pub matches: Vec<Match>,
    /// `limit name "<l>" log prefix "<p>" group <g>`: sends the packet to an NFLOG group.
    /// Over the limit the rest of the rule is skipped (no log, no counter, no verdict):
    /// give such a rule no verdict, so that it never decides a packet.
    pub log: Option<Log>,
    /// An anonymous `counter` (lives and dies with the rule).
    pub counter: bool,
    /// `counter name "<c>"`: counts into a named counter object of the table (which
    /// survives the rule). Takes the place of `counter`.
    pub named_counter: Option<Arc<CounterRef>>,
    /// `None`: the rule only counts; evaluation continues with the next rule.
    pub verdict: Option<Verdict>,
    pub comment: Option<String>,
}

/// A rule's reference to a named counter object, with the labels the object carries (so
/// that the compiler can declare, from the rules alone, every object they count into).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CounterRef {
    pub name: String,
    /// Shared by the rules, the ruleset's declarations and the agent's totals.
    pub labels: Arc<CounterLabels>,
}

/// What a named counter counts, in the agent's metric labels: a policy rule's accepts
/// (`rule` its index or name) or a pod chain's final drop (`rule` empty, `policy` the
/// isolating policies joined by `,`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct CounterLabels {
    /// `NetworkPolicy`, or a cluster tier: `Admin`, `Baseline`.
    pub tier: String,
    /// The policy's namespace (empty for cluster policies).
    pub namespace: String,
    pub policy: String,
    /// `ingress` or `egress`.
    pub direction: String,
    pub rule: String,
    /// What the rule does with what it counts: `accept`, a cluster rule's `deny` or
    /// `pass`, or `drop` for a pod chain's final drop.
    pub action: String,
    /// Dropped by a pod chain's final drop (`true`), or matched by a policy rule.
    pub denied: bool,
}

impl CounterLabels {
    /// The object's comment: the labels in words.
    pub fn comment(&self) -> String {
        let ns = if self.namespace.is_empty() { String::new() } else { format!("{}/", self.namespace) };
        let what = if self.denied { "denied".to_string() } else { format!("rule {} {}", self.rule, self.action) };
        crate::nft::names::comment(&format!("{} {ns}{} {} {what}", self.tier, self.policy, self.direction))
    }
}

/// `log prefix "<prefix>" group <group>`, under the named limit `limit` (if any).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Log {
    pub limit: Option<String>,
    pub prefix: String,
    pub group: u16,
}

/// A named `limit` object: `rate <rate>/second burst <burst> packets`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Limit {
    pub per_second: u32,
    pub burst: u32,
}

/// A connection-tracking state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CtState {
    New,
    Established,
    Related,
    Invalid,
}

impl CtState {
    pub fn as_str(self) -> &'static str {
        match self {
            CtState::New => "new",
            CtState::Established => "established",
            CtState::Related => "related",
            CtState::Invalid => "invalid",
        }
    }
}

/// Which address of the packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AddrField {
    Saddr,
    Daddr,
}

impl AddrField {
    pub fn as_str(self) -> &'static str {
        match self {
            AddrField::Saddr => "saddr",
            AddrField::Daddr => "daddr",
        }
    }
}

/// IPv4 (`ip`) or IPv6 (`ip6`) payload; an `ip`/`ip6` match implies that family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(ip: IpAddr) -> Self {
        if ip.is_ipv6() { IpFamily::V6 } else { IpFamily::V4 }
    }
    /// The nft payload protocol keyword.
    pub fn keyword(self) -> &'static str {
        match self {
            IpFamily::V4 => "ip",
            IpFamily::V6 => "ip6",
        }
    }
    pub fn addr_type(self) -> KeyType {
        match self {
            IpFamily::V4 => KeyType::Ipv4Addr,
            IpFamily::V6 => KeyType::Ipv6Addr,
        }
    }
}

/// What a set lookup or a verdict map is keyed by: a packet field or a concatenation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    /// `ip saddr` / `ip6 daddr` ...
    Addr(IpFamily, AddrField),
    /// `meta l4proto . th dport`
    ProtoDport,
    /// `ip daddr . meta l4proto . th dport` (named ports resolved per pod)
    AddrProtoDport(IpFamily, AddrField),
}

impl Key {
    /// The set key type a lookup with this key needs.
    pub fn key_types(self) -> Vec<KeyType> {
        match self {
            Key::Addr(f, _) => vec![f.addr_type()],
            Key::ProtoDport => vec![KeyType::InetProto, KeyType::InetService],
            Key::AddrProtoDport(f, _) => {
                vec![f.addr_type(), KeyType::InetProto, KeyType::InetService]
            }
        }
    }
    /// The IP family the key implies, if any.
    pub fn family(self) -> Option<IpFamily> {
        match self {
            Key::Addr(f, _) | Key::AddrProtoDport(f, _) => Some(f),
            Key::ProtoDport => None,
        }
    }
}

/// A match expression of a rule.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Match {
    /// `ct state { ... }`: true iff the packet's state is one of these.
    CtState(BTreeSet<CtState>),
    /// `<key> @set` (or `<key> != @set` when negated).
    Lookup { key: Key, set: String, negate: bool },
    /// `meta nfproto ipv4|ipv6`
    NfProto(IpFamily),
    /// `icmpv6 type <lo>-<hi>` (one type when equal): implies IPv6 and ICMPv6.
    Icmpv6Type(u8, u8),
    /// `ip6 hoplimit <n>`: implies IPv6.
    Ip6HopLimit(u8),
    /// `tcp flags & (fin | syn | rst | ack) != syn`: a TCP segment that is not a bare SYN,
    /// so it opens no connection (implies TCP).
    TcpNotSyn,
}

impl Match {
    /// The IP family the match implies, if any (nft's implicit `meta nfproto` dependency).
    pub fn family(&self) -> Option<IpFamily> {
        match self {
            Match::Lookup { key, .. } => key.family(),
            Match::NfProto(f) => Some(*f),
            Match::Icmpv6Type(..) | Match::Ip6HopLimit(_) => Some(IpFamily::V6),
            Match::CtState(_) | Match::TcpNotSyn => None,
        }
    }
}

/// ICMPv6 router solicitation (133), router advertisement (134), neighbour solicitation
/// (135) and neighbour advertisement (136): neighbour discovery (RFC 4861).
pub const ICMPV6_ND_TYPES: (u8, u8) = (133, 136);
/// "The IP Hop Limit field has a value of 255, i.e., the packet could not possibly have
/// been forwarded by a router" (RFC 4861 §7.1.1): what makes an ND message on-link.
pub const ND_HOP_LIMIT: u8 = 255;

/// The verdict a rule ends with.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    Accept,
    Drop,
    Return,
    Jump(String),
    Goto(String),
    /// `<key> vmap @map`: the verdict of the element the key finds; no element, no match.
    Vmap {
        key: Key,
        map: String,
    },
}

/// The data of a verdict map's element.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MapVerdict {
    Accept,
    Drop,
    Return,
    Jump(String),
    Goto(String),
}

/// The type of one component of a set key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeyType {
    Ipv4Addr,
    Ipv6Addr,
    InetProto,
    InetService,
}

impl KeyType {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::Ipv4Addr => "ipv4_addr",
            KeyType::Ipv6Addr => "ipv6_addr",
            KeyType::InetProto => "inet_proto",
            KeyType::InetService => "inet_service",
        }
    }
}

/// A named set.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Set {
    /// One type, or several for a concatenation (`ipv4_addr . inet_proto . inet_service`).
    pub key: Vec<KeyType>,
    /// `flags interval`: elements may be prefixes and ranges (and must not overlap).
    pub interval: bool,
    pub comment: Option<String>,
    pub elements: Elements,
}

impl Set {
    /// The set's type, flags and comment, without elements.
    pub fn declaration(&self) -> Set {
        Set { key: self.key.clone(), interval: self.interval, comment: self.comment.clone(), elements: Elements::new() }
    }

    /// Same type and flags (what an `add set` of an existing set must agree with).
    pub fn same_declaration(&self, other: &Set) -> bool {
        self.key == other.key && self.interval == other.interval && self.comment == other.comment
    }
}

/// A named verdict map (`type <key> : verdict`).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Map {
    pub key: Vec<KeyType>,
    pub interval: bool,
    pub comment: Option<String>,
    pub elements: BTreeMap<Element, MapVerdict>,
}

impl Map {
    pub fn same_declaration(&self, other: &Map) -> bool {
        self.key == other.key && self.interval == other.interval && self.comment == other.comment
    }
}

/// One component of a set element.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Value {
    Addr(IpAddr),
    /// A prefix (interval sets only). Address ranges are always split into prefixes
    /// ([`crate::compile::range_to_prefixes`]): no range variant keeps a value at 18 bytes
    /// (an element at 24), where two addresses would take 34 (40) in every set element.
    Prefix(IpNet),
    Proto(u8),
    Port(u16),
    /// An inclusive port range (interval sets only).
    PortRange(u16, u16),
}

impl Value {
    /// The key type this value belongs to.
    pub fn key_type(self) -> KeyType {
        match self {
            Value::Addr(ip) => {
                if ip.is_ipv6() {
                    KeyType::Ipv6Addr
                } else {
                    KeyType::Ipv4Addr
                }
            }
            Value::Prefix(net) => match net {
                IpNet::V4(_) => KeyType::Ipv4Addr,
                IpNet::V6(_) => KeyType::Ipv6Addr,
            },
            Value::Proto(_) => KeyType::InetProto,
            Value::Port(_) | Value::PortRange(..) => KeyType::InetService,
        }
    }

    pub fn is_interval(self) -> bool {
        matches!(self, Value::Prefix(_) | Value::PortRange(..))
    }

    /// The inclusive span this value covers, as numbers (for overlap checks and lookups).
    pub fn span(self) -> (u128, u128) {
        fn num(ip: IpAddr) -> u128 {
            match ip {
                IpAddr::V4(a) => u128::from(u32::from(a)),
                IpAddr::V6(a) => u128::from(a),
            }
        }
        match self {
            Value::Addr(ip) => (num(ip), num(ip)),
            Value::Prefix(net) => (num(net.network()), num(net.broadcast())),
            Value::Proto(p) => (u128::from(p), u128::from(p)),
            Value::Port(p) => (u128::from(p), u128::from(p)),
            Value::PortRange(a, b) => (u128::from(a), u128::from(b)),
        }
    }

    /// Does this (possibly interval) value hold the packet value `v` (a single value)?
    pub fn contains(self, v: Value) -> bool {
        if self.key_type() != v.key_type() {
            return false;
        }
        let (lo, hi) = self.span();
        let (x, _) = v.span();
        lo <= x && x <= hi
    }
}

/// A set element: one value per key component.
///
/// Almost every element of a node's ruleset is one address, so one value is stored inline
/// (no allocation of its own: a 10 000-pod cluster puts ~50 000 of them in one node's
/// sets); a concatenation (`addr . proto . port`) is one boxed slice.
#[derive(Clone, Debug)]
pub struct Element(Repr);

// Every pod address of a node's sets is one of these: 24 bytes, not 40 (see `Value::Prefix`).
const _: () = assert!(std::mem::size_of::<Element>() == 24);

#[derive(Clone, Debug)]
enum Repr {
    One(Value),
    Concat(Box<[Value]>),
}

impl PartialEq for Element {
    fn eq(&self, other: &Self) -> bool {
        self.values() == other.values()
    }
}

impl Eq for Element {}

impl PartialOrd for Element {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// By values, component after component: the order elements are rendered in.
impl Ord for Element {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.values().cmp(other.values())
    }
}

impl std::hash::Hash for Element {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.values().hash(state)
    }
}

impl Element {
    pub fn single(v: Value) -> Self {
        Element(Repr::One(v))
    }
    /// An element of a concatenated key, one value per component.
    pub fn concat(values: Vec<Value>) -> Self {
        match <[Value; 1]>::try_from(values) {
            Ok([v]) => Element::single(v),
            Err(values) => Element(Repr::Concat(values.into_boxed_slice())),
        }
    }
    /// One value per key component.
    pub fn values(&self) -> &[Value] {
        match &self.0 {
            Repr::One(v) => std::slice::from_ref(v),
            Repr::Concat(vs) => vs,
        }
    }
    pub fn key_types(&self) -> Vec<KeyType> {
        self.values().iter().map(|v| v.key_type()).collect()
    }
    pub fn is_interval(&self) -> bool {
        self.values().iter().any(|v| v.is_interval())
    }
    /// Does this element hold the packet key `key` (all single values)?
    pub fn contains(&self, key: &[Value]) -> bool {
        self.values().len() == key.len() && self.values().iter().zip(key).all(|(e, k)| e.contains(*k))
    }
    /// Do two elements of the same set share any key?
    pub fn overlaps(&self, other: &Element) -> bool {
        self.values().len() == other.values().len()
            && self.values().iter().zip(other.values()).all(|(a, b)| {
                let ((a0, a1), (b0, b1)) = (a.span(), b.span());
                a.key_type() == b.key_type() && a0 <= b1 && b0 <= a1
            })
    }
}

/// A set's elements, in [`Element`] order.
///
/// A set of plain addresses (the pod sets: nearly all of a node's elements at scale) keeps
/// them as numbers, ~6 (IPv4) or ~22 (IPv6) bytes each in its B-tree against ~26-37 as
/// `Element`s (24 bytes a key, plus the tree's slack). So does a set of `addr . proto .
/// port` (named ports: one element per pod and port): 8 bytes (IPv4) or 20 (IPv6) against
/// an `Element` and its boxed values (~90 bytes), and a number to compare rather than three
/// values, where a new named-port set of 90 000 elements took most of a 100 ms compile.
/// Every other set keeps `Element`s. Iteration hands out owned `Element`s, made on the fly.
#[derive(Clone, Default)]
pub struct Elements(Store);

#[derive(Clone)]
enum Store {
    V4(BTreeSet<u32>),
    V6(BTreeSet<u128>),
    V4Port(BTreeSet<V4Port>),
    V6Port(BTreeSet<V6Port>),
    Any(BTreeSet<Element>),
}

impl Default for Store {
    fn default() -> Self {
        Store::V4(BTreeSet::new())
    }
}

/// An element as a compact store keeps it: a number whose order is the [`Element`] order
/// of the elements it stands for.
trait Compact: Ord + Copy {
    /// `e` as this kind of number, if it is of this kind.
    fn of(e: &Element) -> Option<Self>;
    fn element(self) -> Element;
}

impl Compact for u32 {
    fn of(e: &Element) -> Option<u32> {
        match e.0 {
            Repr::One(Value::Addr(IpAddr::V4(a))) => Some(u32::from(a)),
            _ => None,
        }
    }
    fn element(self) -> Element {
        Element::single(Value::Addr(IpAddr::V4(self.into())))
    }
}

impl Compact for u128 {
    fn of(e: &Element) -> Option<u128> {
        match e.0 {
            Repr::One(Value::Addr(IpAddr::V6(a))) => Some(u128::from(a)),
            _ => None,
        }
    }
    fn element(self) -> Element {
        Element::single(Value::Addr(IpAddr::V6(self.into())))
    }
}

/// `ipv4_addr . inet_proto . inet_service` as address << 24 | protocol << 16 | port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct V4Port(u64);

impl Compact for V4Port {
    fn of(e: &Element) -> Option<V4Port> {
        match &e.0 {
            Repr::Concat(values) => match **values {
                [Value::Addr(IpAddr::V4(a)), Value::Proto(p), Value::Port(q)] => {
                    Some(V4Port(u64::from(u32::from(a)) << 24 | u64::from(p) << 16 | u64::from(q)))
                }
                _ => None,
            },
            Repr::One(_) => None,
        }
    }
    fn element(self) -> Element {
        let V4Port(n) = self;
        let addr = IpAddr::V4(((n >> 24) as u32).into());
        Element(Repr::Concat(Box::new([Value::Addr(addr), Value::Proto((n >> 16) as u8), Value::Port(n as u16)])))
    }
}

/// `ipv6_addr . inet_proto . inet_service` as (address, protocol << 16 | port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct V6Port(u128, u32);

impl Compact for V6Port {
    fn of(e: &Element) -> Option<V6Port> {
        match &e.0 {
            Repr::Concat(values) => match **values {
                [Value::Addr(IpAddr::V6(a)), Value::Proto(p), Value::Port(q)] => {
                    Some(V6Port(u128::from(a), u32::from(p) << 16 | u32::from(q)))
                }
                _ => None,
            },
            Repr::One(_) => None,
        }
    }
    fn element(self) -> Element {
        let V6Port(a, rest) = self;
        let values = [Value::Addr(IpAddr::V6(a.into())), Value::Proto((rest >> 16) as u8), Value::Port(rest as u16)];
        Element(Repr::Concat(Box::new(values)))
    }
}

/// `$compact` with `$set` the store's B-tree and `$K` its [`Compact`] kind, or `$any` with
/// `$set` the B-tree of `Element`s.
macro_rules! by_store {
    ($store:expr, |$set:ident: $K:ident| $compact:expr, |$any_set:ident| $any:expr) => {
        match $store {
            Store::V4($set) => {
                #[allow(dead_code)]
                type $K = u32;
                $compact
            }
            Store::V6($set) => {
                #[allow(dead_code)]
                type $K = u128;
                $compact
            }
            Store::V4Port($set) => {
                #[allow(dead_code)]
                type $K = V4Port;
                $compact
            }
            Store::V6Port($set) => {
                #[allow(dead_code)]
                type $K = V6Port;
                $compact
            }
            Store::Any($any_set) => $any,
        }
    };
}

/// The store an empty set takes for its first element `e`.
fn store_for(e: &Element) -> Store {
    if u32::of(e).is_some() {
        Store::V4(BTreeSet::new())
    } else if u128::of(e).is_some() {
        Store::V6(BTreeSet::new())
    } else if V4Port::of(e).is_some() {
        Store::V4Port(BTreeSet::new())
    } else if V6Port::of(e).is_some() {
        Store::V6Port(BTreeSet::new())
    } else {
        Store::Any(BTreeSet::new())
    }
}

impl Elements {
    pub fn new() -> Self {
        Elements::default()
    }

    pub fn len(&self) -> usize {
        by_store!(&self.0, |s: K| s.len(), |s| s.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, e: &Element) -> bool {
        by_store!(&self.0, |s: K| K::of(e).is_some_and(|k| s.contains(&k)), |s| s.contains(e))
    }

    /// `true` if `e` was not there yet.
    pub fn insert(&mut self, e: Element) -> bool {
        if self.is_empty() {
            self.0 = store_for(&e);
        }
        by_store!(
            &mut self.0,
            |s: K| {
                if let Some(k) = K::of(&e) {
                    return s.insert(k);
                }
            },
            |s| return s.insert(e)
        );
        // Elements of two kinds in one set (no compiled set has them): keep them all.
        let mut any: BTreeSet<Element> = self.iter().collect();
        let inserted = any.insert(e);
        self.0 = Store::Any(any);
        inserted
    }

    /// `true` if `e` was there.
    pub fn remove(&mut self, e: &Element) -> bool {
        by_store!(&mut self.0, |s: K| K::of(e).is_some_and(|k| s.remove(&k)), |s| s.remove(e))
    }

    pub fn first(&self) -> Option<Element> {
        self.iter().next()
    }

    /// The first element at or after `e` in [`Element`] order.
    pub fn first_from(&self, e: &Element) -> Option<Element> {
        by_store!(
            &self.0,
            |s: K| match K::of(e) {
                Some(k) => s.range(k..).next().map(|k| k.element()),
                None => self.iter().find(|x| x >= e),
            },
            |s| s.range(e..).next().cloned()
        )
    }

    /// In [`Element`] order.
    pub fn iter(&self) -> ElementsIter<'_> {
        match &self.0 {
            Store::V4(s) => ElementsIter(StoreIter::V4(s.iter())),
            Store::V6(s) => ElementsIter(StoreIter::V6(s.iter())),
            Store::V4Port(s) => ElementsIter(StoreIter::V4Port(s.iter())),
            Store::V6Port(s) => ElementsIter(StoreIter::V6Port(s.iter())),
            Store::Any(s) => ElementsIter(StoreIter::Any(s.iter())),
        }
    }

    /// The elements `self` has and `other` lacks, in order. Two sets of one compact kind go
    /// through the B-trees' own difference (a merge walk, or lookups when `other` is much
    /// bigger): a staged fill compares sets of tens of thousands of addresses on every sync.
    pub fn difference<'a>(&'a self, other: &'a Elements) -> Box<dyn Iterator<Item = Element> + 'a> {
        match (&self.0, &other.0) {
            (Store::V4(a), Store::V4(b)) => Box::new(a.difference(b).map(|k| k.element())),
            (Store::V6(a), Store::V6(b)) => Box::new(a.difference(b).map(|k| k.element())),
            (Store::V4Port(a), Store::V4Port(b)) => Box::new(a.difference(b).map(|k| k.element())),
            (Store::V6Port(a), Store::V6Port(b)) => Box::new(a.difference(b).map(|k| k.element())),
            (Store::Any(a), Store::Any(b)) => Box::new(a.difference(b).cloned()),
            _ => Box::new(self.iter().filter(move |e| !other.contains(e))),
        }
    }
}

/// The iterator of [`Elements::iter`].
pub struct ElementsIter<'a>(StoreIter<'a>);

enum StoreIter<'a> {
    V4(std::collections::btree_set::Iter<'a, u32>),
    V6(std::collections::btree_set::Iter<'a, u128>),
    V4Port(std::collections::btree_set::Iter<'a, V4Port>),
    V6Port(std::collections::btree_set::Iter<'a, V6Port>),
    Any(std::collections::btree_set::Iter<'a, Element>),
}

impl Iterator for ElementsIter<'_> {
    type Item = Element;

    fn next(&mut self) -> Option<Element> {
        match &mut self.0 {
            StoreIter::V4(i) => i.next().map(|k| k.element()),
            StoreIter::V6(i) => i.next().map(|k| k.element()),
            StoreIter::V4Port(i) => i.next().map(|k| k.element()),
            StoreIter::V6Port(i) => i.next().map(|k| k.element()),
            StoreIter::Any(i) => i.next().cloned(),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        match &self.0 {
            StoreIter::V4(i) => i.size_hint(),
            StoreIter::V6(i) => i.size_hint(),
            StoreIter::V4Port(i) => i.size_hint(),
            StoreIter::V6Port(i) => i.size_hint(),
            StoreIter::Any(i) => i.size_hint(),
        }
    }
}

impl<'a> IntoIterator for &'a Elements {
    type Item = Element;
    type IntoIter = ElementsIter<'a>;

    fn into_iter(self) -> ElementsIter<'a> {
        self.iter()
    }
}

impl Extend<Element> for Elements {
    fn extend<I: IntoIterator<Item = Element>>(&mut self, elements: I) {
        for e in elements {
            self.insert(e);
        }
    }
}

impl FromIterator<Element> for Elements {
    /// Collected first, then built in bulk (the B-tree's own sort and bulk build): a new
    /// peer set of 25 000 addresses is not inserted one element at a time.
    fn from_iter<I: IntoIterator<Item = Element>>(elements: I) -> Self {
        let elements: Vec<Element> = elements.into_iter().collect();
        let Some(first) = elements.first() else { return Elements::new() };
        /// Every element as kind `K`, or `None`.
        fn all<K: Compact>(elements: &[Element]) -> Option<BTreeSet<K>> {
            elements.iter().map(K::of).collect()
        }
        let compact = match store_for(first) {
            Store::V4(_) => all(&elements).map(Store::V4),
            Store::V6(_) => all(&elements).map(Store::V6),
            Store::V4Port(_) => all(&elements).map(Store::V4Port),
            Store::V6Port(_) => all(&elements).map(Store::V6Port),
            Store::Any(_) => None,
        };
        Elements(compact.unwrap_or_else(|| Store::Any(elements.into_iter().collect())))
    }
}

impl<const N: usize> From<[Element; N]> for Elements {
    fn from(elements: [Element; N]) -> Self {
        elements.into_iter().collect()
    }
}

impl PartialEq for Elements {
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (Store::V4(a), Store::V4(b)) => a == b,
            (Store::V6(a), Store::V6(b)) => a == b,
            (Store::V4Port(a), Store::V4Port(b)) => a == b,
            (Store::V6Port(a), Store::V6Port(b)) => a == b,
            (Store::Any(a), Store::Any(b)) => a == b,
            _ => self.len() == other.len() && self.iter().eq(other.iter()),
        }
    }
}
impl Eq for Elements {}

impl fmt::Debug for Elements {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Addr(ip) => write!(f, "{ip}"),
            Value::Prefix(net) => write!(f, "{net}"),
            Value::Proto(p) => f.write_str(&proto_name(*p)),
            Value::Port(p) => write!(f, "{p}"),
            Value::PortRange(a, b) => write!(f, "{a}-{b}"),
        }
    }
}

impl fmt::Display for Element {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, v) in self.values().iter().enumerate() {
            if i > 0 {
                f.write_str(" . ")?;
            }
            write!(f, "{v}")?;
        }
        Ok(())
    }
}

/// nft's spelling of an IP protocol number.
pub fn proto_name(p: u8) -> String {
    match p {
        6 => "tcp".into(),
        17 => "udp".into(),
        132 => "sctp".into(),
        1 => "icmp".into(),
        58 => "ipv6-icmp".into(),
        n => n.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hook_is_found_again_by_its_kernel_number() {
        for hook in Hook::ALL {
            assert_eq!(Hook::from_number(hook.number()), Some(hook));
        }
        assert_eq!(Hook::Forward.number(), 2, "NF_INET_FORWARD");
        assert_eq!(Hook::from_number(5), None, "NF_INET_INGRESS: never attached to");
    }
    use proptest::prelude::*;

    /// Addresses from a small pool (so removals hit), single or in a concatenation (with a
    /// protocol and port, as named ports are, or another one, kept as `Element`s).
    fn element() -> impl Strategy<Value = Element> {
        let v4 = (0u32..6).prop_map(|n| Value::Addr(IpAddr::V4((0x0a00_0000 + n).into())));
        let v6 = (0u128..6).prop_map(|n| Value::Addr(IpAddr::V6((0xfd00_u128 << 112 | n).into())));
        let proto = prop_oneof![Just(6u8), Just(17), Just(132)];
        let port = prop_oneof![1u16..4, Just(u16::MAX)];
        let with_port = |a, p, q| Element::concat(vec![a, Value::Proto(p), Value::Port(q)]);
        prop_oneof![
            4 => v4.clone().prop_map(Element::single),
            2 => v6.clone().prop_map(Element::single),
            2 => (v4.clone(), proto.clone(), port.clone()).prop_map(move |(a, p, q)| with_port(a, p, q)),
            2 => (v6, proto, port.clone()).prop_map(move |(a, p, q)| with_port(a, p, q)),
            1 => (v4, port).prop_map(|(a, q)| Element::concat(vec![a, Value::Port(q)])),
        ]
    }

    /// Which store an element would take in an empty set.
    fn kind(e: &Element) -> std::mem::Discriminant<Store> {
        std::mem::discriminant(&store_for(e))
    }

    #[derive(Clone, Debug)]
    enum Step {
        Insert(Element),
        Remove(Element),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![3 => element().prop_map(Step::Insert), 2 => element().prop_map(Step::Remove)]
    }

    proptest! {
        /// The compact stores are an implementation detail: whatever is inserted and removed,
        /// in whatever mix of kinds, `Elements` answers as a `BTreeSet<Element>` would.
        #[test]
        fn elements_behave_as_a_sorted_set_of_elements(
            // Mostly one kind per history, as compiled sets are (that of `probe`); sometimes a mix.
            one_kind in any::<bool>(),
            steps in proptest::collection::vec(step(), 0..40),
            probe in element(),
        ) {
            let steps: Vec<Step> = if one_kind {
                steps.into_iter().filter(|s| matches!(s, Step::Insert(e) | Step::Remove(e) if kind(e) == kind(&probe))).collect()
            } else {
                steps
            };
            let mut model = BTreeSet::new();
            let mut elements = Elements::new();
            for s in steps {
                match s {
                    Step::Insert(e) => prop_assert_eq!(elements.insert(e.clone()), model.insert(e)),
                    Step::Remove(e) => prop_assert_eq!(elements.remove(&e), model.remove(&e)),
                }
                prop_assert_eq!(elements.len(), model.len());
                prop_assert!(elements.iter().eq(model.iter().cloned()));
            }
            prop_assert_eq!(elements.contains(&probe), model.contains(&probe));
            prop_assert_eq!(elements.first_from(&probe), model.range(&probe..).next().cloned());
            prop_assert_eq!(elements.first(), model.first().cloned());
            let rebuilt: Elements = model.iter().cloned().collect();
            prop_assert_eq!(&rebuilt, &elements);
            prop_assert_eq!(format!("{elements:?}"), format!("{model:?}"));
        }
    }

    #[test]
    fn a_set_of_addresses_with_protocol_and_port_keeps_them_as_numbers_in_element_order() {
        let named =
            |a: &str, p, q| Element::concat(vec![Value::Addr(a.parse().unwrap()), Value::Proto(p), Value::Port(q)]);
        let v4: Elements = [named("10.0.0.2", 6, 80), named("10.0.0.1", 17, 53), named("10.0.0.1", 6, 8080)].into();
        assert!(matches!(v4.0, Store::V4Port(_)));
        let texts: Vec<String> = v4.iter().map(|e| e.to_string()).collect();
        assert_eq!(texts, ["10.0.0.1 . tcp . 8080", "10.0.0.1 . udp . 53", "10.0.0.2 . tcp . 80"]);
        let v6: Elements = [named("fd00::2", 132, 1), named("fd00::1", 6, 65535)].into();
        assert!(matches!(v6.0, Store::V6Port(_)));
        let texts: Vec<String> = v6.iter().map(|e| e.to_string()).collect();
        assert_eq!(texts, ["fd00::1 . tcp . 65535", "fd00::2 . sctp . 1"]);
    }

    #[test]
    fn a_set_of_ipv4_addresses_keeps_them_as_numbers() {
        let elements: Elements =
            ["10.0.0.2", "10.0.0.1"].map(|a| Element::single(Value::Addr(a.parse().unwrap()))).into();
        assert!(matches!(elements.0, Store::V4(_)));
        let texts: Vec<String> = elements.iter().map(|e| e.to_string()).collect();
        assert_eq!(texts, ["10.0.0.1", "10.0.0.2"]);
    }
}
