//! Reachability matrices: which pod can open which connection to which pod.
//!
//! ```text
//!  Cluster ──► Index (once: policy → selected pods, rule → peer pods per family)
//!                │
//!  Probe{port|name, protocol} ──► per destination: ingress-allowed sources (bit set)
//!                               ► per source:      egress-allowed destinations (bit set)
//!                               ► allowed[i][j] = egress[i][j] AND ingress[j][i]
//! ```
//!
//! This is the evaluator engine at scale: the same semantics as [`crate::policy::evaluate`] (which
//! decides one connection by walking every policy), computed with bit sets so that
//! 10 000 pods × 1 000 policies takes seconds. The two are held equal by property tests.

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use crate::policy::bitset::{BitMatrix, BitSet};
use crate::policy::evaluate::{self, Connection, Endpoint};
use crate::policy::model::{Cluster, Direction, NamespaceScope, Peer, PortMatch, PortSpec, Protocol, Rule};
use crate::policy::selector::Selector;
use crate::policy::tiers::{Action, ClusterPeer, Tier};

/// The port of a probe: a number, or a name resolved on each destination pod.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProbePort {
    Number(u16),
    Named(String),
}

impl fmt::Display for ProbePort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbePort::Number(n) => write!(f, "{n}"),
            ProbePort::Named(name) => f.write_str(name),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Probe {
    pub port: ProbePort,
    pub protocol: Protocol,
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.protocol, self.port)
    }
}

/// Which address family a probe uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Family {
    /// The destination pod's primary (first) IP decides; the source uses its IP of that family.
    #[default]
    Primary,
    Ipv4,
    Ipv6,
}

impl Family {
    /// Whether the connection to `dst` is IPv6.
    pub fn ipv6_towards(self, cluster: &Cluster, dst: usize) -> bool {
        match self {
            Family::Primary => cluster.pods[dst].ips.first().is_some_and(|ip| ip.is_ipv6()),
            Family::Ipv4 => false,
            Family::Ipv6 => true,
        }
    }
}

/// The connection a matrix cell stands for, or `None` when the destination does not declare
/// the named port (nothing can listen there, so the cell is denied).
pub fn cell_connection(cluster: &Cluster, probe: &Probe, family: Family, src: usize, dst: usize) -> Option<Connection> {
    let port = match &probe.port {
        ProbePort::Number(n) => *n,
        ProbePort::Named(name) => cluster.pods[dst].resolve_named_port(name, probe.protocol)?,
    };
    Some(Connection {
        src: Endpoint::Pod(src),
        dst: Endpoint::Pod(dst),
        protocol: probe.protocol,
        port,
        ipv6: family.ipv6_towards(cluster, dst),
    })
}

/// Every port that any pod declares or any policy names (range ends included), per protocol.
pub fn default_probes(cluster: &Cluster) -> Vec<Probe> {
    let mut set = BTreeSet::new();
    for pod in cluster.pods.iter() {
        for p in pod.ports.iter() {
            set.insert((p.protocol, p.port));
        }
    }
    for policy in cluster.policies.iter() {
        for rules in [&policy.ingress, &policy.egress].into_iter().flatten() {
            for spec in rules.iter().filter_map(|r| r.ports.as_ref()).flatten() {
                if let PortMatch::Range(a, b) = spec.port {
                    set.insert((spec.protocol, a));
                    set.insert((spec.protocol, b));
                }
            }
        }
    }
    set.into_iter().map(|(protocol, port)| Probe { port: ProbePort::Number(port), protocol }).collect()
}

/// The whole-cluster matrix of one probe, by the reference evaluator, cell by cell. Slow
/// (every cell walks every policy) and obviously right: the yardstick for [`Index`].
pub fn reference_matrix(cluster: &Cluster, probe: &Probe, family: Family) -> BitMatrix {
    cell_by_cell(cluster, probe, family, |c| evaluate::evaluate(cluster, c).allowed)
}

/// A matrix decided one cell at a time: each cell's connection (see [`cell_connection`])
/// goes to `decide`; a cell without one is denied. Engines that decide single packets
/// (the reference, the ruleset interpreter) share this.
pub fn cell_by_cell(
    cluster: &Cluster,
    probe: &Probe,
    family: Family,
    decide: impl Fn(&Connection) -> bool,
) -> BitMatrix {
    let n = cluster.pods.len();
    let rows = (0..n)
        .map(|i| {
            let mut row = BitSet::empty(n);
            for j in 0..n {
                if cell_connection(cluster, probe, family, i, j).is_some_and(|c| decide(&c)) {
                    row.insert(j);
                }
            }
            row
        })
        .collect();
    BitMatrix::from_rows(rows)
}

/// Precomputed selector results for one cluster: build once, ask for many probes.
pub struct Index<'a> {
    cluster: &'a Cluster,
    n: usize,
    /// Per pod, the rules of the policies isolating it, as (policy, direction) lists.
    isolating: [Vec<Vec<usize>>; 2],
    /// Per ingress (policy, rule): the source pods it admits, for IPv4 and IPv6 packets.
    ingress_peers: HashMap<(usize, usize), [BitSet; 2]>,
    /// Per egress (policy, rule): the destination pods it admits, each seen through the
    /// family its cells use (the destination's).
    egress_peers: HashMap<(usize, usize), BitSet>,
    /// Destinations whose cells use IPv6 under `family`.
    dst_is_v6: BitSet,
    family: Family,
    /// Per direction and pod: the cluster policies governing it, in precedence order.
    governing: [Vec<Vec<usize>>; 2],
    /// Per ingress (cluster policy, rule): the source pods its peers match, per family.
    cluster_ingress_peers: HashMap<(usize, usize), [BitSet; 2]>,
    /// Per egress (cluster policy, rule): the destination pods its peers match, each seen
    /// through the family its cells use.
    cluster_egress_peers: HashMap<(usize, usize), BitSet>,
}

fn dir_slot(d: Direction) -> usize {
    match d {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

impl<'a> Index<'a> {
    pub fn new(cluster: &'a Cluster, family: Family) -> Self {
        let n = cluster.pods.len();
        let mut by_namespace: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, pod) in cluster.pods.iter().enumerate() {
            by_namespace.entry(pod.id.namespace.as_str()).or_default().push(i);
        }
        let mut isolating: [Vec<Vec<usize>>; 2] = [vec![Vec::new(); n], vec![Vec::new(); n]];
        for (pi, policy) in cluster.policies.iter().enumerate() {
            let candidates = by_namespace.get(policy.id.namespace.as_str()).map(Vec::as_slice).unwrap_or_default();
            for &i in candidates {
                for d in [Direction::Ingress, Direction::Egress] {
                    if policy.isolates(&cluster.pods[i], d) {
                        isolating[dir_slot(d)][i].push(pi);
                    }
                }
            }
        }
        // Peer sets, shared between rules with equal selectors.
        let mut selector_cache: HashMap<(Option<&str>, Option<&Selector>, &Selector), BitSet> = HashMap::new();
        let dst_is_v6 = (0..n).filter(|&j| family.ipv6_towards(cluster, j)).fold(BitSet::empty(n), |mut s, j| {
            s.insert(j);
            s
        });
        let mut dst_is_v4 = BitSet::full(n);
        for j in dst_is_v6.iter() {
            dst_is_v4.remove(j);
        }
        let (mut ingress_peers, mut egress_peers) = (HashMap::new(), HashMap::new());
        for (pi, policy) in cluster.policies.iter().enumerate() {
            for d in [Direction::Ingress, Direction::Egress] {
                for (ri, rule) in policy.rules(d).unwrap_or_default().iter().enumerate() {
                    let [v4, v6] =
                        rule_peer_sets(cluster, &policy.id.namespace, rule, &by_namespace, &mut selector_cache);
                    match d {
                        Direction::Ingress => {
                            ingress_peers.insert((pi, ri), [v4, v6]);
                        }
                        Direction::Egress => {
                            let mut mixed = v4;
                            mixed.intersect_with(&dst_is_v4);
                            mixed.union_with_intersection(&v6, &dst_is_v6);
                            egress_peers.insert((pi, ri), mixed);
                        }
                    }
                }
            }
        }
        // The cluster-wide tiers: who each policy governs, and whom each rule's peers match.
        let mut governing: [Vec<Vec<usize>>; 2] = [vec![Vec::new(); n], vec![Vec::new(); n]];
        let (mut cluster_ingress_peers, mut cluster_egress_peers) = (HashMap::new(), HashMap::new());
        for (pi, policy) in cluster.cluster_policies.iter().enumerate() {
            for (i, pod) in cluster.pods.iter().enumerate() {
                let labels = cluster.namespace_labels(&pod.id.namespace);
                for d in [Direction::Ingress, Direction::Egress] {
                    if policy.governs(pod, labels, d) {
                        governing[dir_slot(d)][i].push(pi);
                    }
                }
            }
            for (ri, rule) in policy.ingress.iter().enumerate() {
                cluster_ingress_peers.insert((pi, ri), cluster_peer_sets(cluster, &rule.peers));
            }
            for (ri, rule) in policy.egress.iter().enumerate() {
                let [mut mixed, v6] = cluster_peer_sets(cluster, &rule.peers);
                mixed.intersect_with(&dst_is_v4);
                mixed.union_with_intersection(&v6, &dst_is_v6);
                cluster_egress_peers.insert((pi, ri), mixed);
            }
        }
        Index {
            cluster,
            n,
            isolating,
            ingress_peers,
            egress_peers,
            dst_is_v6,
            family,
            governing,
            cluster_ingress_peers,
            cluster_egress_peers,
        }
    }

    /// The allowed matrix of one probe over every pod of the cluster.
    pub fn matrix(&self, probe: &Probe) -> BitMatrix {
        let (cluster, n) = (self.cluster, self.n);
        // The numeric port each destination is probed on; None: it lacks the named port.
        let dst_port: Vec<Option<u16>> = (0..n)
            .map(|j| match &probe.port {
                ProbePort::Number(p) => Some(*p),
                ProbePort::Named(name) => cluster.pods[j].resolve_named_port(name, probe.protocol),
            })
            .collect();
        // Which destinations each rule's ports admit: once per probe, shared by every pod.
        let uniform_port = dst_port.windows(2).all(|w| w[0] == w[1]);
        let ports_admit: HashMap<(usize, Direction, usize), PortsAdmit> = cluster
            .policies
            .iter()
            .enumerate()
            .flat_map(|(pi, policy)| {
                [Direction::Ingress, Direction::Egress].into_iter().flat_map(move |d| {
                    policy.rules(d).unwrap_or_default().iter().enumerate().map(move |(ri, rule)| ((pi, d, ri), rule))
                })
            })
            .map(|(key, rule)| {
                (key, ports_admit_set(cluster, rule.ports.as_deref(), probe.protocol, &dst_port, uniform_port))
            })
            .collect();
        let cluster_ports_admit: HashMap<(usize, Direction, usize), PortsAdmit> = cluster
            .cluster_policies
            .iter()
            .enumerate()
            .flat_map(|(pi, policy)| {
                [Direction::Ingress, Direction::Egress]
                    .into_iter()
                    .flat_map(move |d| policy.rules(d).iter().enumerate().map(move |(ri, rule)| ((pi, d, ri), rule)))
            })
            .map(|(key, rule)| {
                (key, ports_admit_set(cluster, rule.ports.as_deref(), probe.protocol, &dst_port, uniform_port))
            })
            .collect();

        // Ingress, by source: for each source i, the destinations that let it in. Every
        // unisolated destination does; an isolated one lets in the sources its rules allow.
        // (Only isolated destinations are walked: no full n×n transpose.)
        // Destinations a cluster policy governs are walked through the tiers too.
        let policed = |j: usize| !self.isolating[0][j].is_empty() || !self.governing[0][j].is_empty();
        let mut unpoliced = BitSet::empty(n);
        for j in (0..n).filter(|&j| !policed(j)) {
            unpoliced.insert(j);
        }
        let mut ingress_by_source = vec![unpoliced; n];
        for j in (0..n).filter(|&j| policed(j)) {
            let fam = usize::from(self.dst_is_v6.contains(j));
            let network_policy = (!self.isolating[0][j].is_empty()).then(|| {
                let mut allowed = BitSet::empty(n);
                for &pi in &self.isolating[0][j] {
                    let rules = cluster.policies[pi].ingress.as_deref().unwrap_or_default();
                    for ri in 0..rules.len() {
                        if ports_admit[&(pi, Direction::Ingress, ri)].admits(j) {
                            allowed.union_with(&self.ingress_peers[&(pi, ri)][fam]);
                        }
                    }
                }
                allowed
            });
            let allowed = match (network_policy, self.governing[0][j].is_empty()) {
                (Some(allowed), true) => allowed,
                (network_policy, _) => {
                    // Each cluster rule matches the sources its peers match, if its ports
                    // admit this destination.
                    let matched = |pi: usize, ri: usize| {
                        if cluster_ports_admit[&(pi, Direction::Ingress, ri)].admits(j) {
                            self.cluster_ingress_peers[&(pi, ri)][fam].clone()
                        } else {
                            BitSet::empty(n)
                        }
                    };
                    self.tiered(&self.governing[0][j], Direction::Ingress, network_policy, matched)
                }
            };
            for i in allowed.iter() {
                ingress_by_source[i].insert(j);
            }
        }
        let shortcuts = Shortcuts::new(self, &dst_port);

        // Egress: each source's row starts as the destinations that let it in, narrowed to
        // those its own egress rules allow when it is isolated.
        let rows = ingress_by_source
            .into_iter()
            .enumerate()
            .map(|(i, mut row)| {
                let policies = &self.isolating[1][i];
                let network_policy = (!policies.is_empty()).then(|| {
                    let mut allowed = BitSet::empty(n);
                    for &pi in policies {
                        let rules = cluster.policies[pi].egress.as_deref().unwrap_or_default();
                        for ri in 0..rules.len() {
                            ports_admit[&(pi, Direction::Egress, ri)]
                                .add_matches(&mut allowed, &self.egress_peers[&(pi, ri)]);
                        }
                    }
                    allowed
                });
                let governing = &self.governing[1][i];
                let allowed = if governing.is_empty() {
                    network_policy
                } else {
                    // Each cluster rule matches the destinations its peers match where its
                    // ports admit the probe.
                    let matched = |pi: usize, ri: usize| {
                        let mut set = BitSet::empty(n);
                        cluster_ports_admit[&(pi, Direction::Egress, ri)]
                            .add_matches(&mut set, &self.cluster_egress_peers[&(pi, ri)]);
                        set
                    };
                    Some(self.tiered(governing, Direction::Egress, network_policy, matched))
                };
                if let Some(allowed) = allowed {
                    row.intersect_with(&allowed);
                }
                shortcuts.apply(cluster, i, &mut row);
                row
            })
            .collect();
        BitMatrix::from_rows(rows)
    }

    pub fn family(&self) -> Family {
        self.family
    }

    /// The peers one side of a pod allows through the tiers: `governing` (the cluster
    /// policies that govern it in direction `d`, in precedence order) with `matched(policy,
    /// rule)` the peers each rule matches, and `network_policy` the peers its NetworkPolicies
    /// allow when they isolate it (`None`: not isolated).
    fn tiered(
        &self,
        governing: &[usize],
        d: Direction,
        network_policy: Option<BitSet>,
        matched: impl Fn(usize, usize) -> BitSet,
    ) -> BitSet {
        let n = self.n;
        let policies = &self.cluster.cluster_policies;
        let mut allowed = BitSet::empty(n);
        // Peers each tier has settled: decided, or passed on by a Pass rule ("Skips all
        // further ClusterNetworkPolicy rules in the current tier").
        let mut walk_tier = |tier: Tier, settled: &mut BitSet, decided: &mut BitSet| {
            for &pi in governing.iter().filter(|&&pi| policies[pi].tier == tier) {
                for (ri, rule) in policies[pi].rules(d).iter().enumerate() {
                    let mut fresh = matched(pi, ri);
                    fresh.difference_with(settled);
                    settled.union_with(&fresh);
                    match rule.action {
                        Action::Accept => allowed.union_with(&fresh),
                        Action::Deny => {}
                        // An Admin Pass goes on to the next tier; a Baseline Pass to the
                        // default, which allows.
                        Action::Pass if tier == Tier::Baseline => allowed.union_with(&fresh),
                        Action::Pass => continue,
                    }
                    decided.union_with(&fresh);
                }
            }
        };
        let mut decided = BitSet::empty(n);
        walk_tier(Tier::Admin, &mut BitSet::empty(n), &mut decided);
        let mut open = decided.complement();
        if let Some(network_policy) = network_policy {
            // "v1.NetworkPolicy always makes a final decision for selected pods."
            open.intersect_with(&network_policy);
            allowed.union_with(&open);
            return allowed;
        }
        let mut settled = decided.clone();
        walk_tier(Tier::Baseline, &mut settled, &mut decided);
        // "If a given connection wasn't allowed or denied by any of the tiers, the default
        // kubernetes policy is applied": allowed.
        allowed.union_with(&decided.complement());
        allowed
    }
}

/// The cells that policy does not decide, as masks over destinations: a cell is denied
/// when the destination lacks the probed (named) port or either end lacks an address of
/// the cell's family; otherwise it is allowed when it is self traffic or a hostNetwork
/// source talking to a pod on its own node.
struct Shortcuts {
    /// Indexed by (source has IPv4, source has IPv6): the destinations a cell can reach.
    reachable: [[BitSet; 2]; 2],
}

impl Shortcuts {
    fn new(index: &Index, dst_port: &[Option<u16>]) -> Self {
        let n = index.n;
        let (mut v4, mut v6) = (BitSet::empty(n), BitSet::empty(n));
        for (j, pod) in index.cluster.pods.iter().enumerate() {
            if dst_port[j].is_none() {
                continue;
            }
            let ipv6 = index.dst_is_v6.contains(j);
            if pod.ip_of_family(ipv6).is_some() {
                if ipv6 { v6.insert(j) } else { v4.insert(j) }
            }
        }
        let mut both = v4.clone();
        both.union_with(&v6);
        let none = BitSet::empty(n);
        Shortcuts { reachable: [[none, v6], [v4, both]] }
    }

    fn apply(&self, cluster: &Cluster, i: usize, row: &mut BitSet) {
        let src = &cluster.pods[i];
        let has = |ipv6| usize::from(src.ip_of_family(ipv6).is_some());
        let reachable = &self.reachable[has(false)][has(true)];
        row.intersect_with(reachable);
        if reachable.contains(i) {
            row.insert(i);
        }
        if src.host_network {
            for (j, dst) in cluster.pods.iter().enumerate() {
                if !dst.host_network && dst.node == src.node && reachable.contains(j) {
                    row.insert(j);
                }
            }
        }
    }
}

/// For which destinations a rule's ports admit the probe.
enum PortsAdmit {
    All,
    None,
    Some(BitSet),
}

impl PortsAdmit {
    /// `into |= peers` where the ports admit each destination.
    fn add_matches(&self, into: &mut BitSet, peers: &BitSet) {
        match self {
            PortsAdmit::All => into.union_with(peers),
            PortsAdmit::None => {}
            PortsAdmit::Some(set) => into.union_with_intersection(peers, set),
        }
    }

    fn admits(&self, j: usize) -> bool {
        match self {
            PortsAdmit::All => true,
            PortsAdmit::None => false,
            PortsAdmit::Some(s) => s.contains(j),
        }
    }
}

/// `uniform`: every destination is probed on the same port (computed once per probe).
fn ports_admit_set(
    cluster: &Cluster,
    ports: Option<&[PortSpec]>,
    protocol: Protocol,
    dst_port: &[Option<u16>],
    uniform: bool,
) -> PortsAdmit {
    let Some(specs) = ports else { return PortsAdmit::All };
    let named = specs.iter().any(|s| matches!(s.port, PortMatch::Named(_)));
    if !named && uniform {
        // Same answer for every destination (that has the port at all).
        return match dst_port.first().copied().flatten() {
            Some(port) if specs.iter().any(|s| s.matches(protocol, port, None)) => PortsAdmit::All,
            Some(_) => PortsAdmit::None,
            None => PortsAdmit::All,
        };
    }
    let mut set = BitSet::empty(cluster.pods.len());
    for (j, port) in dst_port.iter().enumerate() {
        if let Some(port) = port
            && specs.iter().any(|s| s.matches(protocol, *port, Some(&cluster.pods[j])))
        {
            set.insert(j);
        }
    }
    PortsAdmit::Some(set)
}

type SelectorKey<'s> = (Option<&'s str>, Option<&'s Selector>, &'s Selector);

/// The pods a rule's peers match, as seen by IPv4 packets and by IPv6 packets.
fn rule_peer_sets<'s>(
    cluster: &'s Cluster,
    policy_namespace: &'s str,
    rule: &'s Rule,
    by_namespace: &HashMap<&str, Vec<usize>>,
    cache: &mut HashMap<SelectorKey<'s>, BitSet>,
) -> [BitSet; 2] {
    let n = cluster.pods.len();
    let Some(peers) = &rule.peers else { return [BitSet::full(n), BitSet::full(n)] };
    let mut sets = [BitSet::empty(n), BitSet::empty(n)];
    for peer in peers {
        match peer {
            Peer::IpBlock(block) => {
                for (i, pod) in cluster.pods.iter().enumerate() {
                    for (fam, set) in sets.iter_mut().enumerate() {
                        if pod.ip_of_family(fam == 1).is_some_and(|ip| block.contains(ip)) {
                            set.insert(i);
                        }
                    }
                }
            }
            Peer::Pods { namespaces, pods } => {
                let key = match namespaces {
                    NamespaceScope::PolicyNamespace => (Some(policy_namespace), None, pods),
                    NamespaceScope::Matching(ns) => (None, Some(ns), pods),
                };
                let set = cache.entry(key).or_insert_with(|| {
                    let mut set = BitSet::empty(n);
                    let namespaces: Vec<&str> = match namespaces {
                        NamespaceScope::PolicyNamespace => vec![policy_namespace],
                        NamespaceScope::Matching(sel) => cluster
                            .namespaces
                            .values()
                            .filter(|ns| sel.matches(&ns.labels))
                            .map(|ns| ns.name.as_str())
                            .collect(),
                    };
                    for ns in namespaces {
                        for &i in by_namespace.get(ns).map(Vec::as_slice).unwrap_or_default() {
                            let pod = &cluster.pods[i];
                            if !pod.host_network && pods.matches(&pod.labels) {
                                set.insert(i);
                            }
                        }
                    }
                    set
                });
                sets[0].union_with(set);
                sets[1].union_with(set);
            }
        }
    }
    sets
}

/// The pods a cluster rule's peers match, as seen by IPv4 packets and by IPv6 packets.
fn cluster_peer_sets(cluster: &Cluster, peers: &[ClusterPeer]) -> [BitSet; 2] {
    let n = cluster.pods.len();
    let mut sets = [BitSet::empty(n), BitSet::empty(n)];
    for (i, pod) in cluster.pods.iter().enumerate() {
        for (fam, set) in sets.iter_mut().enumerate() {
            // A pod is matched by its address of the packet's family (networks, nodes,
            // domains) or by its labels (pods, namespaces).
            let Some(ip) = pod.ip_of_family(fam == 1).or_else(|| pod.ips.first().copied()) else {
                continue;
            };
            if peers.iter().any(|p| evaluate::cluster_peer_matches(cluster, p, Endpoint::Pod(i), ip)) {
                set.insert(i);
            }
        }
    }
    sets
}

#[cfg(test)]
#[path = "matrix_tests.rs"]
mod tests;
