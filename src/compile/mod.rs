//! The compiler: cluster state → the nftables ruleset one node needs.
//!
//! ```text
//!  forward, prio 0  egress_forward ─┐  1 ct established,related accept
//!  input,   prio 0  egress_input   ─┤  2 icmpv6 type 133-136 ip6 hoplimit 255 accept (ND)
//!                                   │  3 guard (pod CIDRs only): ip saddr @pod_cidrs_v4
//!                                   │      ip saddr != @local_pods_v4 counter drop (ip6 twin)
//!                                   └► 4 ip saddr vmap @egress_dispatch_v4 (ip6 twin)
//!                                         │ local isolated pod IP → jump pod_eg_<pod>
//!  forward, prio 10 ingress_forward ──► 1, 2, 3 on daddr, 4 ip daddr vmap @ingress_dispatch_v4
//!                                         │ local isolated pod IP → jump pod_in_<pod>
//!  pod_{eg,in}_<pod>: ct state invalid drop; [jump adm_{eg,in}_<list>]; jump
//!                     pol_{eg,in}_<policy> for each policy selecting it; log (node-wide
//!                     limit, NFLOG); counter drop (named counters: see `Observe`)
//!                     (none selecting it: [jump base_{eg,in}_<list>]; see compile/tiers.rs)
//!  pol_{eg,in}_<policy>: one rule per (rule × peer kind × port kind), set lookups, accept
//! ```
//!
//! Only isolated pods' packets and the guard's strangers are ever dropped: a node without
//! policies (and without pod CIDRs) changes no verdict, `ct state invalid` included, so an
//! SSH session or a kubelet connection conntrack picks up mid-stream is never cut. The
//! unknown-pod guard (`NodeConfig::pod_cidrs` not empty) drops new flows from or to an
//! address of the node's pod CIDRs that is no known local pod (`local_pods_*`, hash sets
//! patched element by element; `pod_cidrs_*`, static interval sets): a pod the agent has
//! not heard of yet, or whose deletion it has, fails closed. Two set lookups per new flow.
//! Neighbour discovery passes first: it carries the pods' own addresses, conntrack does
//! not track it, and without it an isolated IPv6 pod cannot even reach its gateway.
//!
//! An `accept` inside an egress chain ends only the priority-0 base chain: nftables still
//! runs the priority-10 ingress base chain on the same hook, so both sides are checked.
//! Traffic the node itself sends (`output`) is never hooked: "traffic from the node to its
//! own local pods (kubelet probes) is always allowed".
//!
//! Pure and deterministic: `BTreeMap`s everywhere, names from [`crate::nft::names`].
//! Rule count grows with local pods and the policies selecting them, never with the number
//! of pods in the cluster: cluster pods only ever become set elements.
//!
//! ```text
//!  compile/mod.rs          NodeConfig, the base skeleton, pod chains, set contents, peer
//!                          membership, ranges: the vocabulary both compilers share
//!  compile/naming.rs       canonical identities of sets, and their names (collisions resolved)
//!  compile/reference.rs    compile(): local pods → isolating policies → rules → peers, each
//!                          set built straight from the cluster; written for clarity only
//!  compile/incremental.rs  IncrementalCompiler (the agent): one Compiled per cluster, sets
//!                          patched for the changed pods, chains reused; always == compile()
//!  compile/tiers.rs        the Admin and Baseline tiers' chains (cluster policies), written
//!                          once for both compilers; the incremental one keeps their parts
//! ```
//!
//! Independence: neither compiler calls the evaluator (`policy::evaluate`, `policy::matrix`).
//! Isolation is [`crate::policy::model::Policy::isolates`]; which pods a peer admits is
//! written here (`peer_admits_pod`) from the model, so the ruleset engine (verdicts from the
//! compiled ruleset only) checks the evaluator rather than repeating it. And the incremental
//! compiler is checked against the reference one, a second code path without any cache.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::nft::ir::{
    AddrField, BaseChain, Chain, ChainPolicy, CounterLabels, CounterRef, CtState, Element, Hook, ICMPV6_ND_TYPES,
    IpFamily, Key, KeyType, Limit, Log, Map, MapVerdict, Match, ND_HOP_LIMIT, Rule, Ruleset, Set, Value, Verdict,
};
use crate::nft::names;
use crate::policy::model::{
    Cluster, Direction, IpBlock, NamespaceScope, Peer, Pod, Policy, PortMatch, PortSpec, Protocol,
};
use crate::policy::selector::Selector;

pub mod incremental;
pub mod naming;
pub mod reference;
pub mod tiers;

pub use incremental::{Compiled, IdleSets, IncrementalCompiler, Retired};
pub use reference::compile;

/// Which node to compile for, and the table to own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    pub node: String,
    pub table: String,
    /// The node's pod CIDRs (its `spec.podCIDRs`, or the agent's `--pod-cidr`): an address
    /// inside them that is no known local pod of this node is dropped both ways (the
    /// unknown-pod guard). Empty: no guard.
    pub pod_cidrs: Vec<IpNet>,
    /// Counters and the drop log (default: both on, as the agent installs them).
    pub observe: Observe,
}

impl NodeConfig {
    /// `node`, with the default table name `netpol`, no pod CIDRs (no unknown-pod guard),
    /// and the agent's default counters and drop log ([`Observe::default`]).
    pub fn new(node: impl Into<String>) -> Self {
        NodeConfig {
            node: node.into(),
            table: names::DEFAULT_TABLE.to_string(),
            pod_cidrs: Vec::new(),
            observe: Observe::default(),
        }
    }
}

/// What the ruleset lets the agent see of the traffic it decides: counters per policy rule
/// and per final drop, and a log of denied packets.
///
/// ```text
///  pol_{in,eg}_<policy>: <peer, port matches> counter name "cnt_<policy rule>" accept
///  pod_{in,eg}_<pod>:    ...; limit name "drop_log" log prefix "<pod chain>" group <g> counter
///                        counter name "drop_<namespace, isolating policies, direction>" drop
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observe {
    /// A named counter per (policy rule, direction) and per final drop.
    pub rule_counters: bool,
    /// Each pod chain's final drop logs to NFLOG first (`None`: no log rule).
    pub drop_log: Option<DropLog>,
}

impl Default for Observe {
    fn default() -> Self {
        Observe { rule_counters: true, drop_log: Some(DropLog::default()) }
    }
}

impl Observe {
    /// Neither counters nor the drop log: the bare ruleset.
    pub const OFF: Observe = Observe { rule_counters: false, drop_log: None };
}

/// The drop log: its NFLOG group and its node-wide budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropLog {
    pub group: u16,
    /// Packets per second logged by the whole node (one `limit` object every pod chain's
    /// log rule shares), and the burst above that rate the budget can save up.
    pub per_second: u32,
    pub burst: u32,
}

impl DropLog {
    /// The NFLOG group by default: 9469, the admin port, so it is easy to remember and far
    /// from the small groups (0-2) ulogd and Calico's flow logs use.
    pub const DEFAULT_GROUP: u16 = 9469;
    /// 10 packets/s for the whole node, bursts of 50: enough to see who is denied and by
    /// what within a second of it starting (a retrying client, a rollout missing a policy),
    /// at most ~860 000 log lines a day, however hard a flood hits an isolated pod. Every
    /// denied packet is still counted, whatever the budget (the counter is on the drop).
    pub const DEFAULT_PER_SECOND: u32 = 10;
    pub const DEFAULT_BURST: u32 = 50;
}

impl Default for DropLog {
    fn default() -> Self {
        DropLog { group: Self::DEFAULT_GROUP, per_second: Self::DEFAULT_PER_SECOND, burst: Self::DEFAULT_BURST }
    }
}

/// The counter a policy rule's nft rules count into (`None` with counters off).
fn rule_counter(observe: &Observe, labels: CounterLabels) -> Option<Arc<CounterRef>> {
    observe.rule_counters.then(|| {
        let l = &labels;
        let name = names::rule_counter(&l.tier, &l.namespace, &l.policy, &l.direction, &l.rule);
        Arc::new(CounterRef { name, labels: Arc::new(labels) })
    })
}

/// The labels of the counter of rule `ri` of NetworkPolicy `policy` in direction `d`.
fn policy_rule_labels(policy: &Policy, d: Direction, ri: usize) -> CounterLabels {
    CounterLabels {
        tier: "NetworkPolicy".into(),
        namespace: policy.id.namespace.clone(),
        policy: policy.id.name.clone(),
        direction: d.as_str().to_lowercase(),
        rule: ri.to_string(),
        action: "accept".into(),
        denied: false,
    }
}

/// Declares the objects the rules name: every named counter some rule counts into, and the
/// drop log's limit. Both compilers end with it, so their objects agree whatever chains
/// they reused; a counter no rule uses any more goes (its count with it: the agent keeps
/// what it last read).
fn declare_objects(rs: &mut Ruleset, observe: &Observe) {
    // Sorted and deduplicated in a list, then built in bulk: rules come nearly in name
    // order, so this costs a pass, where a lookup and an insert per rule into the map (a
    // thousand rules at 10k pods) was a sixth of an agent's compile after one pod event.
    let mut named: Vec<(&String, &Arc<CounterLabels>)> = rs
        .chains
        .values()
        .flat_map(|c| &c.rules)
        .filter_map(|r| r.named_counter.as_ref())
        .map(|c| (&c.name, &c.labels))
        .collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    named.dedup_by(|a, b| a.0 == b.0);
    rs.counters = named.into_iter().map(|(name, labels)| (name.clone(), Arc::clone(labels))).collect();
    if let Some(log) = observe.drop_log {
        rs.limits.insert(names::DROP_LOG_LIMIT.into(), Limit { per_second: log.per_second, burst: log.burst });
    }
}

const FAMILIES: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

/// "hostNetwork pods are not selectable as policy targets"; pods without an IP take no part.
fn is_local(pod: &Pod, node: &str) -> bool {
    *pod.node == *node && !pod.host_network && !pod.ips.is_empty()
}

/// Indices (ascending) of the pods of `node` that policies may select.
fn local_pods(cluster: &Cluster, node: &str) -> Vec<usize> {
    (0..cluster.pods.len()).filter(|&i| is_local(&cluster.pods[i], node)).collect()
}

/// Whether `peer` of a policy of namespace `policy_ns` admits pod `pod` (for its pod
/// addresses; an ipBlock admits addresses, see [`block_ranges`]): the compiler's own reading
/// of the model, not the evaluator's. "hostNetwork pods are reached by IP (ipBlock) only."
fn peer_admits_pod(cluster: &Cluster, policy_ns: &str, peer: &Peer, pod: &Pod) -> bool {
    let Peer::Pods { namespaces, pods } = peer else {
        return false;
    };
    !pod.host_network && pods.matches(&pod.labels) && scope_admits(cluster, policy_ns, namespaces, &pod.id.namespace)
}

/// Whether a pod peer's namespace scope (of a policy of namespace `policy_ns`) spans `ns`.
fn scope_admits(cluster: &Cluster, policy_ns: &str, scope: &NamespaceScope, ns: &str) -> bool {
    match scope {
        NamespaceScope::PolicyNamespace => ns == policy_ns,
        NamespaceScope::Matching(s) => cluster.namespaces.get(ns).is_some_and(|n| s.matches(&n.labels)),
    }
}

/// The pods of namespace `ns` (the cluster keeps its pods sorted by namespace, then name).
fn pods_of_namespace<'c>(cluster: &'c Cluster, ns: &str) -> &'c [Arc<Pod>] {
    let start = cluster.pods.partition_point(|p| p.id.namespace.as_str() < ns);
    let len = cluster.pods[start..].partition_point(|p| p.id.namespace == ns);
    &cluster.pods[start..start + len]
}

/// Base chains and dispatch maps: always present, so the layout never depends on pods
/// (only on the node's pod CIDRs: `guarded`, the families of the unknown-pod guard, whose
/// sets the caller adds).
///
/// Each base chain, in order: established and related flows pass (one conntrack
/// lookup, the path of almost every packet); neighbour discovery passes; the guard
/// drops addresses of the pod CIDRs that are no known local pod; the dispatch maps send
/// isolated pods' packets to their chains. `ct state invalid` is dropped only there
/// (first rule of a pod chain) and by the guard: a node without policies changes no
/// verdict, not even for the invalid packets of SSH or the kubelet.
fn skeleton(rs: &mut Ruleset, guarded: &[IpFamily]) {
    for name in [names::EGRESS_DISPATCH_V4, names::INGRESS_DISPATCH_V4] {
        rs.maps.insert(name.into(), Map { key: vec![KeyType::Ipv4Addr], ..Map::default() });
    }
    for name in [names::EGRESS_DISPATCH_V6, names::INGRESS_DISPATCH_V6] {
        rs.maps.insert(name.into(), Map { key: vec![KeyType::Ipv6Addr], ..Map::default() });
    }
    let established = Rule {
        matches: vec![Match::CtState(BTreeSet::from([CtState::Established, CtState::Related]))],
        verdict: Some(Verdict::Accept),
        ..Rule::default()
    };
    // RFC 4861: solicitations and advertisements carry the sender's own address and are
    // not tracked, so without this an isolated pod's solicitation for its gateway meets
    // its egress chain and dies, and with it every allowed flow of the pod. Hop limit
    // 255: on-link only, nothing a router forwarded. (ARP is no IP packet: the inet
    // hooks never see it.)
    let neighbour_discovery = Rule {
        matches: vec![Match::Icmpv6Type(ICMPV6_ND_TYPES.0, ICMPV6_ND_TYPES.1), Match::Ip6HopLimit(ND_HOP_LIMIT)],
        verdict: Some(Verdict::Accept),
        ..Rule::default()
    };
    let base_rules = |field: AddrField, v4: &str, v6: &str| {
        let mut rules = vec![established.clone(), neighbour_discovery.clone()];
        // Calico drops the traffic of workload endpoints it does not know: a new pod
        // before the agent hears of it, a deleted pod's address, every pod while the
        // agent is away, all fail closed.
        rules.extend(guarded.iter().map(|&f| Rule {
            matches: vec![
                Match::Lookup { key: Key::Addr(f, field), set: pod_cidrs_set(f).into(), negate: false },
                Match::Lookup { key: Key::Addr(f, field), set: local_pods_set(f).into(), negate: true },
            ],
            counter: true,
            verdict: Some(Verdict::Drop),
            comment: Some("no known pod of this node".into()),
            ..Rule::default()
        }));
        rules.extend([(IpFamily::V4, v4), (IpFamily::V6, v6)].into_iter().map(|(f, map)| Rule {
            verdict: Some(Verdict::Vmap { key: Key::Addr(f, field), map: map.into() }),
            ..Rule::default()
        }));
        rules
    };
    let egress = || base_rules(AddrField::Saddr, names::EGRESS_DISPATCH_V4, names::EGRESS_DISPATCH_V6);
    let base = |hook, priority| Some(BaseChain { hook, priority, policy: ChainPolicy::Accept });
    rs.chains.insert(
        names::EGRESS_FORWARD.into(),
        Arc::new(Chain {
            base: base(Hook::Forward, names::EGRESS_PRIORITY),
            comment: Some("egress of local pods".into()),
            rules: egress(),
        }),
    );
    rs.chains.insert(
        names::EGRESS_INPUT.into(),
        Arc::new(Chain {
            base: base(Hook::Input, names::EGRESS_PRIORITY),
            comment: Some("egress of local pods to this node".into()),
            rules: egress(),
        }),
    );
    let ingress = base_rules(AddrField::Daddr, names::INGRESS_DISPATCH_V4, names::INGRESS_DISPATCH_V6);
    rs.chains.insert(
        names::INGRESS_FORWARD.into(),
        Arc::new(Chain {
            base: base(Hook::Forward, names::INGRESS_PRIORITY),
            comment: Some("ingress to local pods".into()),
            rules: ingress,
        }),
    );
}

/// The unknown-pod guard's interval set of the node's pod CIDRs of `family`; `None` when
/// the node has none of that family (no guard for it).
fn pod_cidrs_of(config: &NodeConfig, family: IpFamily) -> Option<Set> {
    let blocks: Vec<IpBlock> = config
        .pod_cidrs
        .iter()
        .filter(|n| family_of_net(**n) == family)
        .map(|n| IpBlock { cidr: n.trunc(), except: Vec::new() })
        .collect();
    if blocks.is_empty() {
        return None;
    }
    // Overlapping CIDRs (a /16 and a /24 in it) are merged: interval elements of one
    // set may not overlap.
    let elements = block_ranges(&blocks.iter().collect::<Vec<_>>(), family)
        .into_iter()
        .flat_map(|(lo, hi)| range_to_prefixes(lo, hi, family))
        .map(|net| Element::single(Value::Prefix(net)))
        .collect();
    Some(Set {
        key: vec![family.addr_type()],
        interval: true,
        comment: Some(format!("{} pod CIDRs of this node", family_word(family))),
        elements,
    })
}

/// The unknown-pod guard's hash set of the addresses of family `family` of the `local` pods.
fn local_pods_of(cluster: &Cluster, local: &[usize], family: IpFamily) -> Set {
    let elements = local
        .iter()
        .flat_map(|&i| &cluster.pods[i].ips)
        .filter(|ip| IpFamily::of(**ip) == family)
        .map(|ip| Element::single(Value::Addr(*ip)))
        .collect();
    Set {
        key: vec![family.addr_type()],
        comment: Some(format!("known {} pods of this node", family_word(family))),
        elements,
        ..Set::default()
    }
}

/// A local pod's chain for direction `d`, named: its Admin tier chain, then a jump to the
/// chain of each of `policies` (the NetworkPolicies isolating it, in cluster order) and
/// drop, or, when none isolates it, its Baseline tier chain (see [`tiers`]).
fn pod_chain(
    pod: &Pod,
    d: Direction,
    policies: &[&Policy],
    tiers: &tiers::TierJumps,
    observe: &Observe,
) -> (String, Chain) {
    let ingress = d == Direction::Ingress;
    let name = names::pod_chain(ingress, &pod.id.namespace, &pod.id.name);
    // Only policed pods' packets get here (established and related ones were
    // accepted before dispatch): a packet conntrack calls invalid (out of window,
    // no connection to belong to) is no new connection a policy could allow.
    let invalid = Rule {
        matches: vec![Match::CtState(BTreeSet::from([CtState::Invalid]))],
        verdict: Some(Verdict::Drop),
        ..Rule::default()
    };
    // Nor is a TCP segment other than a bare SYN: with the kernel's default
    // nf_conntrack_tcp_loose=1 conntrack starts an entry for a mid-stream segment
    // it has none for, and a connection whose entry the agent deleted (a change
    // denied it) would come back as a "new" one from whichever side sends first.
    let opens_nothing = Rule { matches: vec![Match::TcpNotSyn], verdict: Some(Verdict::Drop), ..Rule::default() };
    let jump = |chain: String| Rule { verdict: Some(Verdict::Jump(chain)), ..Rule::default() };
    let mut rules: Vec<Rule> = vec![invalid, opens_nothing];
    rules.extend(tiers.admin.clone().map(jump));
    if policies.is_empty() {
        // "Further evaluation only happens for Pods not selected by a v1.NetworkPolicy."
        rules.extend(tiers.baseline.clone().map(jump));
    } else {
        rules.extend(policies.iter().map(|p| jump(names::policy_chain(ingress, &p.id.namespace, &p.id.name))));
        let direction = d.as_str().to_lowercase();
        // The log first, a rule without a verdict: over the node's budget the `limit`
        // ends that rule only, and the packet goes on to the drop below. Its prefix is
        // the chain's name, which the agent maps back to the pod, the direction and the
        // isolating policies (≤ 48 bytes, the kernel allows 127). Its own counter counts
        // what the budget let through: the packets logged.
        if let Some(log) = observe.drop_log {
            rules.push(Rule {
                log: Some(Log { limit: Some(names::DROP_LOG_LIMIT.into()), prefix: name.clone(), group: log.group }),
                counter: true,
                comment: Some(names::comment(&format!("{} {direction}: log the drop", pod.id))),
                ..Rule::default()
            });
        }
        // One counter for the pods of a namespace isolated by the same policies: bounded
        // by the node's pods, and a new pod of a kind already there continues its count.
        let policy_names: Vec<&str> = policies.iter().map(|p| p.id.name.as_str()).collect();
        let named_counter = observe.rule_counters.then(|| {
            Arc::new(CounterRef {
                name: names::drop_counter(&pod.id.namespace, &policy_names, &direction),
                labels: Arc::new(CounterLabels {
                    tier: "NetworkPolicy".into(),
                    namespace: pod.id.namespace.clone(),
                    policy: policy_names.join(","),
                    direction: direction.clone(),
                    rule: String::new(),
                    action: "drop".into(),
                    denied: true,
                }),
            })
        });
        rules.push(Rule {
            named_counter,
            verdict: Some(Verdict::Drop),
            comment: Some(names::comment(&format!("{} {direction}: no policy allows", pod.id))),
            ..Rule::default()
        });
    }
    let chain = Chain {
        base: None,
        comment: Some(names::comment(&format!("{} {}", pod.id, d.as_str().to_lowercase()))),
        rules,
    };
    (name, chain)
}

/// Sends the packets of a local isolated pod (from it: egress; to it: ingress) to its
/// chain `chain`: one dispatch map entry per address.
fn dispatch(rs: &mut Ruleset, pod: &Pod, ingress: bool, chain: &str) {
    for ip in &pod.ips {
        let map = match (ingress, ip.is_ipv6()) {
            (false, false) => names::EGRESS_DISPATCH_V4,
            (false, true) => names::EGRESS_DISPATCH_V6,
            (true, false) => names::INGRESS_DISPATCH_V4,
            (true, true) => names::INGRESS_DISPATCH_V6,
        };
        let m = rs.maps.get_mut(map).expect("base maps exist");
        m.elements.insert(Element::single(Value::Addr(*ip)), MapVerdict::Jump(chain.to_string()));
    }
}

/// The elements of a `inet_proto . inet_service` interval set of port `ranges` per
/// protocol (overlapping and adjacent ranges merged), and their text (the set's identity
/// and comment: shared by equal port lists).
fn ports_elements(ranges: BTreeMap<Protocol, Vec<(u16, u16)>>) -> (BTreeSet<Element>, String) {
    let mut elements = BTreeSet::new();
    for (proto, mut rs) in ranges {
        rs.sort();
        let mut merged: Vec<(u16, u16)> = Vec::new();
        for (a, b) in rs {
            match merged.last_mut() {
                Some(last) if u32::from(a) <= u32::from(last.1) + 1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        for (a, b) in merged {
            let port = if a == b { Value::Port(a) } else { Value::PortRange(a, b) };
            elements.insert(Element::concat(vec![Value::Proto(proto.number()), port]));
        }
    }
    let text: Vec<String> = elements.iter().map(|e: &Element| e.to_string()).collect();
    (elements, text.join(","))
}

/// The set of a ports list: `inet_proto . inet_service` intervals, commented with `text`.
fn ports_set(elements: BTreeSet<Element>, text: &str) -> Set {
    Set {
        key: vec![KeyType::InetProto, KeyType::InetService],
        interval: true,
        comment: Some(names::comment(text)),
        elements: elements.into_iter().collect(),
    }
}

/// The identity of the ports set of `text` (see [`ports_elements`]).
fn ports_ident(namer: &naming::Namer, text: &str) -> naming::Ident {
    namer.ident(names::PORTS, &[text], text)
}

/// The identity of the (v4, v6) peer sets of the pods matching `pods` in `scope` (a pod peer
/// of a policy of namespace `policy_ns`), their comment text, and their hint.
fn peer_idents(namer: &naming::Namer, policy_ns: &str, scope: &NamespaceScope, pods: &Selector) -> [naming::Ident; 2] {
    let pods_text = naming::text(pods, naming::selector);
    let (parts, hint): ([&str; 3], String) = match scope {
        NamespaceScope::PolicyNamespace => (["ns", policy_ns, &pods_text], format!("{policy_ns}_{pods}")),
        NamespaceScope::Matching(s) => {
            let scope_text = naming::text(s, naming::selector);
            let hint = format!("ns_{s}_{pods}");
            return [names::PEERS_V4, names::PEERS_V6]
                .map(|p| namer.ident(p, &["nssel", &scope_text, &pods_text], &hint));
        }
    };
    [names::PEERS_V4, names::PEERS_V6].map(|p| namer.ident(p, &parts, &hint))
}

/// The (v4, v6) address sets of `addrs` (any order, duplicates allowed), commented `text`.
fn address_sets(addrs: [Vec<IpAddr>; 2], text: &str) -> [Set; 2] {
    let [v4, v6] = addrs;
    [(IpFamily::V4, v4), (IpFamily::V6, v6)].map(|(family, mut addrs)| {
        // Sorted first: a BTreeSet built from sorted items is bulk-loaded, where inserting
        // one by one searches the tree for each.
        addrs.sort_unstable();
        addrs.dedup();
        Set {
            key: vec![family.addr_type()],
            interval: false,
            comment: Some(names::comment(text)),
            elements: addrs.into_iter().map(|ip| Element::single(Value::Addr(ip))).collect(),
        }
    })
}

/// The identity of the ipBlocks set (family prefix `prefix`) of rule `ri` of `policy` in
/// direction `dir` ("ingress"/"egress"): a set of that rule alone. The ingress named-port
/// sets (resolved on the node's own pods) are named the same way.
fn rule_ident(namer: &naming::Namer, prefix: &'static str, policy: &Policy, dir: &str, ri: usize) -> naming::Ident {
    let (ns, name) = (policy.id.namespace.as_str(), policy.id.name.as_str());
    namer.ident(prefix, &[ns, name, dir, &ri.to_string()], &format!("{ns}_{name}"))
}

/// The ipBlocks set of family `f` of `blocks` (cidrs minus excepts as prefixes), or `None`
/// when no block is of that family.
fn cidr_set(blocks: &[&IpBlock], f: IpFamily, comment: &str) -> Option<Set> {
    let ranges = block_ranges(blocks, f);
    if ranges.is_empty() && !blocks.iter().any(|b| family_of_net(b.cidr) == f) {
        return None;
    }
    let elements = ranges
        .iter()
        .flat_map(|&(lo, hi)| range_to_prefixes(lo, hi, f))
        .map(|n| Element::single(Value::Prefix(n)))
        .collect();
    Some(Set { key: vec![f.addr_type()], interval: true, comment: Some(names::comment(comment)), elements })
}

/// "A named port is resolved on the destination pod's containerPorts": the (address,
/// protocol, port) entries pod `j` brings to an egress rule's named-port set of family `f`,
/// if the rule's `peers` (of a policy in namespace `policy_ns`) admit it.
fn named_port_entries(
    cluster: &Cluster,
    policy_ns: &str,
    peers: Option<&[Peer]>,
    j: usize,
    f: IpFamily,
    named: &[(&str, Protocol)],
) -> Vec<(IpAddr, u8, u16)> {
    let pod = &cluster.pods[j];
    let mut entries = Vec::new();
    admitted_named_ports(cluster, policy_ns, peers, pod, f, &resolve_named_ports(pod, named), &mut entries);
    entries
}

/// The (protocol, port) that each of `named` resolves to on `pod`'s containerPorts, for
/// those it declares.
fn resolve_named_ports(pod: &Pod, named: &[(&str, Protocol)]) -> Vec<(u8, u16)> {
    named.iter().filter_map(|&(n, proto)| pod.resolve_named_port(n, proto).map(|port| (proto.number(), port))).collect()
}

/// Adds to `entries` the (address, protocol, port) entries of `pod`'s `resolved` named
/// ports (see [`resolve_named_ports`]) in an egress rule's set of family `f`, if the rule's
/// `peers` (of a policy in namespace `policy_ns`) admit the pod.
fn admitted_named_ports(
    cluster: &Cluster,
    policy_ns: &str,
    peers: Option<&[Peer]>,
    pod: &Pod,
    f: IpFamily,
    resolved: &[(u8, u16)],
    entries: &mut Vec<(IpAddr, u8, u16)>,
) {
    // The pod's own ports first: most pods lack the names, and then no peer need be read.
    if resolved.is_empty() {
        return;
    }
    let Some(ip) = pod.ip_of_family(f == IpFamily::V6) else {
        return;
    };
    // "ipBlock matches any destination IP, pod IPs included."
    let admitted = peers.is_none_or(|peers| {
        peers.iter().any(|p| match p {
            Peer::IpBlock(b) => b.contains(ip),
            Peer::Pods { .. } => peer_admits_pod(cluster, policy_ns, p, pod),
        })
    });
    if admitted {
        entries.extend(resolved.iter().map(|&(proto, port)| (ip, proto, port)));
    }
}

/// "A named port is resolved on the destination pod's containerPorts": the (address,
/// protocol, port) entries of an ingress rule's named ports `named` on the `local` pods (the
/// destination is the local pod itself), for family `f`.
fn local_named_port_entries(
    cluster: &Cluster,
    local: &[usize],
    f: IpFamily,
    named: &[(&str, Protocol)],
) -> Vec<(IpAddr, u8, u16)> {
    let mut entries = Vec::new();
    for &i in local {
        let pod = &cluster.pods[i];
        let Some(ip) = pod.ip_of_family(f == IpFamily::V6) else {
            continue;
        };
        entries.extend(resolve_named_ports(pod, named).into_iter().map(|(proto, port)| (ip, proto, port)));
    }
    entries
}

/// The policy's namespace, if a peer selects pods in it ("no namespaceSelector: the
/// policy's own namespace"): only then does an egress named-port set depend on it.
fn own_namespace<'n>(policy_ns: &'n str, peers: Option<&[Peer]>) -> Option<&'n str> {
    peers
        .is_some_and(|peers| {
            peers.iter().any(|p| matches!(p, Peer::Pods { namespaces: NamespaceScope::PolicyNamespace, .. }))
        })
        .then_some(policy_ns)
}

/// The identity (prefix `prefix`, one per family) and comment of an egress rule's
/// named-port set. The set holds the named ports `named` of the pods the rule's `peers`
/// admit, and nothing else of its policy: named by that content, it is one set for every
/// rule alike. A rule "to the `metrics` port of any pod" in each of 100 namespaces looks up
/// one set of every pod's address, built, sent and kept once.
fn egress_named_set(
    namer: &naming::Namer,
    prefix: &'static str,
    policy_ns: &str,
    peers: Option<&[Peer]>,
    named: &[(&str, Protocol)],
) -> (naming::Ident, String) {
    let ports: Vec<String> = named.iter().map(|(n, proto)| format!("{n}/{proto}")).collect();
    let ports = ports.join(",");
    let own_ns = own_namespace(policy_ns, peers).unwrap_or_default();
    let (identity, text, hint) = match peers {
        None => ("any".to_string(), "any pod".to_string(), "any".to_string()),
        Some(peers) => {
            let text: Vec<String> = peers
                .iter()
                .map(|peer| match peer {
                    Peer::Pods { namespaces, pods } => pods_text(own_ns, namespaces, pods),
                    Peer::IpBlock(b) if b.except.is_empty() => b.cidr.to_string(),
                    Peer::IpBlock(b) => {
                        let except: Vec<String> = b.except.iter().map(ToString::to_string).collect();
                        format!("{} except {}", b.cidr, except.join(","))
                    }
                })
                .collect();
            let hint = if own_ns.is_empty() { "peers".to_string() } else { own_ns.to_string() };
            (naming::text(peers, naming::peers), text.join(" or "), hint)
        }
    };
    let names_hint: Vec<&str> = named.iter().map(|(n, _)| *n).collect();
    let ident = namer.ident(
        prefix,
        &["egress named ports", &ports, &identity, own_ns],
        &format!("{}_{hint}", names_hint.join("_")),
    );
    (ident, names::comment(&format!("named ports {ports} of {text}")))
}

/// What a pod peer admits, in words (set comments): "pods app=web in ns-1".
fn pods_text(policy_ns: &str, scope: &NamespaceScope, pods: &Selector) -> String {
    match scope {
        NamespaceScope::PolicyNamespace => format!("pods {pods} in {policy_ns}"),
        NamespaceScope::Matching(s) => format!("pods {pods} in namespaces {s}"),
    }
}

fn named_port_element((ip, proto, port): (IpAddr, u8, u16)) -> Element {
    Element::concat(vec![Value::Addr(ip), Value::Proto(proto), Value::Port(port)])
}

/// A named-port set (`addr . inet_proto . inet_service`) of family `f` of `entries` (any
/// order, duplicates allowed).
fn named_port_set(f: IpFamily, mut entries: Vec<(IpAddr, u8, u16)>, comment: String) -> Set {
    // Sorted before the set is built (bulk-loaded).
    entries.sort_unstable();
    entries.dedup();
    Set {
        key: vec![f.addr_type(), KeyType::InetProto, KeyType::InetService],
        interval: false,
        comment: Some(comment),
        elements: entries.into_iter().map(named_port_element).collect(),
    }
}

/// The name of the unknown-pod guard's set of pod CIDRs of `family`.
fn pod_cidrs_set(family: IpFamily) -> &'static str {
    if family == IpFamily::V4 { names::POD_CIDRS_V4 } else { names::POD_CIDRS_V6 }
}

/// The name of the unknown-pod guard's set of local pod addresses of `family`.
fn local_pods_set(family: IpFamily) -> &'static str {
    if family == IpFamily::V4 { names::LOCAL_PODS_V4 } else { names::LOCAL_PODS_V6 }
}

fn family_word(family: IpFamily) -> &'static str {
    if family == IpFamily::V4 { "IPv4" } else { "IPv6" }
}

fn family_of_net(n: IpNet) -> IpFamily {
    match n {
        IpNet::V4(_) => IpFamily::V4,
        IpNet::V6(_) => IpFamily::V6,
    }
}

fn ip_num(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn net_range(n: IpNet) -> (u128, u128) {
    (ip_num(n.network()), ip_num(n.broadcast()))
}

/// The union over `blocks` of (cidr minus excepts), for one family, as disjoint sorted
/// inclusive ranges with adjacent ones merged.
pub fn block_ranges(blocks: &[&IpBlock], f: IpFamily) -> Vec<(u128, u128)> {
    let mut all: Vec<(u128, u128)> = Vec::new();
    for b in blocks.iter().filter(|b| family_of_net(b.cidr) == f) {
        let mut pieces = vec![net_range(b.cidr)];
        for e in &b.except {
            let (elo, ehi) = net_range(*e);
            let mut next = Vec::new();
            for (lo, hi) in pieces {
                if ehi < lo || elo > hi {
                    next.push((lo, hi));
                    continue;
                }
                if elo > lo {
                    next.push((lo, elo - 1));
                }
                if ehi < hi {
                    next.push((ehi + 1, hi));
                }
            }
            pieces = next;
        }
        all.extend(pieces);
    }
    all.sort();
    let mut merged: Vec<(u128, u128)> = Vec::new();
    for (lo, hi) in all {
        match merged.last_mut() {
            Some(last) if last.1 == u128::MAX || lo <= last.1 + 1 => last.1 = last.1.max(hi),
            _ => merged.push((lo, hi)),
        }
    }
    merged
}

/// The fewest prefixes covering exactly `lo..=hi`.
pub fn range_to_prefixes(lo: u128, hi: u128, f: IpFamily) -> Vec<IpNet> {
    let bits: u32 = if f == IpFamily::V4 { 32 } else { 128 };
    let mask = |n: u32| {
        if n >= 128 { u128::MAX } else { (1u128 << n) - 1 }
    };
    let mut out = Vec::new();
    let mut lo = lo;
    loop {
        let mut k = 0;
        while k < bits {
            let next = k + 1;
            if lo & mask(next) != 0 || lo.checked_add(mask(next)).is_none_or(|end| end > hi) {
                break;
            }
            k = next;
        }
        let len = (bits - k) as u8;
        out.push(match f {
            IpFamily::V4 => IpNet::V4(Ipv4Net::new(Ipv4Addr::from(lo as u32), len).expect("valid prefix")),
            IpFamily::V6 => IpNet::V6(Ipv6Net::new(Ipv6Addr::from(lo), len).expect("valid prefix")),
        });
        let end = lo + mask(k);
        if end >= hi {
            break;
        }
        lo = end + 1;
    }
    out
}

/// Port ranges by protocol.
type PortRanges = BTreeMap<Protocol, Vec<(u16, u16)>>;

/// A rule's ports as the ruleset matches them: numbered ports and ranges by protocol (one
/// `proto . port` set), and named ports (sorted, without repeats; resolved per pod).
fn numbered_and_named(specs: &[PortSpec]) -> (PortRanges, Vec<(&str, Protocol)>) {
    let mut ranges: BTreeMap<Protocol, Vec<(u16, u16)>> = BTreeMap::new();
    let mut named: Vec<(&str, Protocol)> = Vec::new();
    for s in specs {
        match &s.port {
            // "ports with protocol but no port = every port of that protocol"
            PortMatch::Any => ranges.entry(s.protocol).or_default().push((0, u16::MAX)),
            PortMatch::Range(a, b) => ranges.entry(s.protocol).or_default().push((*a, *b)),
            PortMatch::Named(n) => named.push((n.as_str(), s.protocol)),
        }
    }
    named.sort();
    named.dedup();
    (ranges, named)
}

/// A match of a policy rule's peers or ports (`None`: any), with the words for its comment.
type Described = (Option<Match>, String);

/// One policy rule's nft rules have in common: their comment's start, and the counter they
/// all count into (`None`: counters off).
struct Counted<'c> {
    base_comment: &'c str,
    counter: Option<Arc<CounterRef>>,
}

/// Appends the rule `matches` → `verdict` (its comment `base_comment` and `what`) to a
/// policy rule's rules, unless an equal one is there (two peers can yield the same lookup).
fn push_rule(out: &mut Vec<Rule>, rule: &Counted<'_>, matches: Vec<Match>, what: &str, verdict: &Verdict) {
    let r = Rule {
        matches,
        named_counter: rule.counter.clone(),
        verdict: Some(verdict.clone()),
        comment: Some(names::comment(&format!("{} {what}", rule.base_comment))),
        ..Rule::default()
    };
    if !out.contains(&r) {
        out.push(r);
    }
}

/// "Traffic is allowed if it matches at least one peer AND at least one port": one rule
/// per (peer match, port match), each ending in `verdict` (accept, for NetworkPolicy).
fn peer_port_rules(
    out: &mut Vec<Rule>,
    base_comment: &Counted<'_>,
    peer_matches: &[Described],
    port_matches: &[Described],
    verdict: &Verdict,
) {
    for (pm, pwhat) in peer_matches {
        for (qm, qwhat) in port_matches {
            let matches = pm.iter().chain(qm).cloned().collect();
            push_rule(out, base_comment, matches, &format!("{pwhat}, {qwhat}"), verdict);
        }
    }
}

/// The peer matches an ingress rule's named-port set of family `f` can follow (a v6 peer
/// set never matches a v4 packet).
fn peers_of_family(peer_matches: &[Described], f: IpFamily) -> Vec<&Described> {
    peer_matches
        .iter()
        .filter(|(pm, _)| {
            !pm.as_ref().is_some_and(|m| matches!(m, Match::Lookup { key, .. } if key.family() != Some(f)))
        })
        .collect()
}

/// The rules (ending in `verdict`) that look up a named-port set (`lookup`): after each
/// peer match of its family for ingress (the destination is the local pod), alone for
/// egress (the set holds only admitted peers).
fn named_port_rules(
    out: &mut Vec<Rule>,
    base_comment: &Counted<'_>,
    ingress: bool,
    peers: &[&Described],
    lookup: Match,
    verdict: &Verdict,
) {
    if ingress {
        for (pm, pwhat) in peers {
            let matches = pm.iter().cloned().chain([lookup.clone()]).collect();
            push_rule(out, base_comment, matches, &format!("{pwhat}, named ports"), verdict);
        }
    } else {
        push_rule(out, base_comment, vec![lookup], "peers, named ports", verdict);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ruleset engine checks the evaluator only while the compilers do not call it.
    #[test]
    fn neither_compiler_calls_the_evaluator() {
        let forbidden = [concat!("evalu", "ate"), concat!("matr", "ix::")];
        let sources = [
            ("mod.rs", include_str!("mod.rs")),
            ("reference.rs", include_str!("reference.rs")),
            ("incremental.rs", include_str!("incremental.rs")),
            ("naming.rs", include_str!("naming.rs")),
        ];
        for (file, text) in sources {
            for (n, line) in text.lines().enumerate() {
                let code = line.trim_start();
                if code.starts_with("//") {
                    continue;
                }
                assert!(!forbidden.iter().any(|f| code.contains(f)), "{file}:{}: {line}", n + 1);
            }
        }
    }

    #[test]
    fn a_cidr_minus_an_except_becomes_disjoint_prefixes() {
        let b = IpBlock {
            cidr: "10.0.0.0/24".parse().unwrap(),
            except: vec!["10.0.0.128/25".parse().unwrap(), "10.0.0.5/32".parse().unwrap()],
        };
        let r = block_ranges(&[&b], IpFamily::V4);
        let p: Vec<String> =
            r.iter().flat_map(|&(lo, hi)| range_to_prefixes(lo, hi, IpFamily::V4)).map(|n| n.to_string()).collect();
        assert_eq!(
            p,
            [
                "10.0.0.0/30",
                "10.0.0.4/32",
                "10.0.0.6/31",
                "10.0.0.8/29",
                "10.0.0.16/28",
                "10.0.0.32/27",
                "10.0.0.64/26"
            ]
        );
    }

    #[test]
    fn the_whole_address_space_is_one_prefix() {
        assert_eq!(range_to_prefixes(0, u128::MAX, IpFamily::V6), vec!["::/0".parse::<IpNet>().unwrap()]);
        assert_eq!(
            range_to_prefixes(0, u128::from(u32::MAX), IpFamily::V4),
            vec!["0.0.0.0/0".parse::<IpNet>().unwrap()]
        );
    }
}
