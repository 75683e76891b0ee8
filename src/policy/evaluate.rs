//! The reference semantics of NetworkPolicy v1, written for clarity, with explanations.
//!
//! ```text
//!  Connection{src, dst, protocol, port}
//!      │
//!      ├─ same pod? node → own pod? ──► allowed, not policed
//!      ▼
//!  egress side (source pod)   ──► tiers: Admin → NetworkPolicy → Baseline ──► Accept | Deny | Pass → default allow
//!  ingress side (destination) ──► tiers: Admin → NetworkPolicy → Baseline ──► Accept | Deny | Pass → default allow
//!      ▼
//!  Verdict { allowed = egress allows AND ingress allows, with the rule that decided each }
//! ```
//!
//! Tiers are an ordered pipeline: each tier answers Accept, Deny or Pass for one side of a
//! connection, and the first non-Pass answer wins. The cluster-wide tiers
//! (ClusterNetworkPolicy `Admin` / `Baseline`, and v1alpha1's AdminNetworkPolicy /
//! BaselineAdminNetworkPolicy, see [`crate::policy::tiers`]) go before and after the
//! NetworkPolicy tier, which decides every pod it isolates ("v1.NetworkPolicy always makes
//! a final decision for selected pods").
//!
//! This module decides one connection at a time by walking every policy; `matrix` computes
//! whole matrices fast with precomputed sets and is tested against this one.

use std::net::IpAddr;

use crate::policy::model::{Cluster, Direction, NamespaceScope, Peer, Pod, Protocol, Rule};
use crate::policy::tiers::{self, Action, ClusterPeer};

/// One end of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// A pod of the cluster, by index into `Cluster::pods`.
    Pod(usize),
    /// Anything else, by IP: outside the cluster, a node, a hostNetwork process.
    Ip(IpAddr),
}

/// A new connection attempt: the unit of a verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Connection {
    pub src: Endpoint,
    pub dst: Endpoint,
    pub protocol: Protocol,
    pub port: u16,
    /// Which family the packet uses; it decides the IP that ipBlocks see.
    pub ipv6: bool,
}

/// Why a connection is allowed or denied, one side at a time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    pub shortcut: Option<Shortcut>,
    pub egress: SideVerdict,
    pub ingress: SideVerdict,
}

/// Traffic that is never policed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shortcut {
    /// "Traffic a pod sends to itself never reaches the node and is not policed."
    SamePod,
    /// "Traffic from the node to its own local pods (kubelet probes) is always allowed."
    NodeToLocalPod,
    /// One endpoint has no address of the connection's family: nothing can be sent.
    NoAddress,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SideVerdict {
    pub direction: Direction,
    /// Indices into `Cluster::policies` of the policies that isolate this side's pod.
    pub isolated_by: Vec<usize>,
    pub decision: Decision,
    /// The Pass rules that sent the connection on to a later tier, in tier order (an
    /// Admin one before the decision, a Baseline one before the default).
    pub passed: Vec<ClusterMatch>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// This side is not a pod we police (an outside IP, or a hostNetwork pod).
    NotPoliced,
    /// The pod is not selected by any policy of this direction: everything is allowed.
    NotIsolated,
    /// The first rule that admits the connection.
    Allowed(RuleMatch),
    /// Isolated, and no rule of any isolating policy admits the connection.
    NoRuleMatched,
    /// Not decided (a shortcut applied).
    Skipped,
    /// A cluster policy's rule decided: Accept or Deny.
    Cluster(ClusterMatch),
}

/// The rule of a cluster policy that matched a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterMatch {
    /// Index into `Cluster::cluster_policies`.
    pub policy: usize,
    pub rule: usize,
    pub action: Action,
    /// Index of the matching peer.
    pub peer: usize,
    /// Index of the matching port spec; `None` when the rule has no `protocols` (all traffic).
    pub port: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleMatch {
    pub policy: usize,
    pub rule: usize,
    /// Index of the matching peer; `None` when the rule has no peers (all peers).
    pub peer: Option<usize>,
    /// Index of the matching port; `None` when the rule has no ports (all ports).
    pub port: Option<usize>,
}

impl SideVerdict {
    fn new(direction: Direction, isolated_by: Vec<usize>, decision: Decision) -> Self {
        SideVerdict { direction, isolated_by, decision, passed: Vec::new() }
    }

    pub fn allows(&self) -> bool {
        match self.decision {
            Decision::NoRuleMatched => false,
            Decision::Cluster(m) => m.action != Action::Deny,
            Decision::NotPoliced | Decision::NotIsolated | Decision::Allowed(_) | Decision::Skipped => true,
        }
    }

    fn skipped(direction: Direction) -> Self {
        SideVerdict::new(direction, Vec::new(), Decision::Skipped)
    }
}

impl Connection {
    /// The IP this endpoint uses for the connection's family, if it has one.
    pub fn ip_of(&self, cluster: &Cluster, end: Endpoint) -> Option<IpAddr> {
        match end {
            Endpoint::Ip(ip) => (ip.is_ipv6() == self.ipv6).then_some(ip),
            Endpoint::Pod(i) => cluster.pods[i].ip_of_family(self.ipv6),
        }
    }
}

/// Decides one connection: the reference semantics.
pub fn evaluate(cluster: &Cluster, conn: &Connection) -> Verdict {
    let shortcut = shortcut(cluster, conn);
    if let Some(shortcut) = shortcut {
        let allowed = shortcut != Shortcut::NoAddress;
        return Verdict {
            allowed,
            shortcut: Some(shortcut),
            egress: SideVerdict::skipped(Direction::Egress),
            ingress: SideVerdict::skipped(Direction::Ingress),
        };
    }
    // "A connection is allowed iff the source side allows egress AND the destination side
    // allows ingress."
    let egress = side(cluster, conn, Direction::Egress);
    let ingress = side(cluster, conn, Direction::Ingress);
    Verdict { allowed: egress.allows() && ingress.allows(), shortcut: None, egress, ingress }
}

fn shortcut(cluster: &Cluster, conn: &Connection) -> Option<Shortcut> {
    if conn.ip_of(cluster, conn.src).is_none() || conn.ip_of(cluster, conn.dst).is_none() {
        return Some(Shortcut::NoAddress);
    }
    match (conn.src, conn.dst) {
        (Endpoint::Pod(a), Endpoint::Pod(b)) if a == b => Some(Shortcut::SamePod),
        (Endpoint::Pod(a), Endpoint::Pod(b)) => {
            let (src, dst) = (&cluster.pods[a], &cluster.pods[b]);
            (src.host_network && !dst.host_network && src.node == dst.node).then_some(Shortcut::NodeToLocalPod)
        }
        _ => None,
    }
}

/// A side of the connection: the policed pod and the peer at the other end.
fn side(cluster: &Cluster, conn: &Connection, direction: Direction) -> SideVerdict {
    let (subject, peer) = match direction {
        Direction::Egress => (conn.src, conn.dst),
        Direction::Ingress => (conn.dst, conn.src),
    };
    let not_policed = || SideVerdict::new(direction, Vec::new(), Decision::NotPoliced);
    let Endpoint::Pod(subject) = subject else {
        return not_policed();
    };
    if cluster.pods[subject].host_network {
        // "hostNetwork pods are not selectable as policy targets"; "Note that
        // host-networked pods are not included in subject selection."
        return not_policed();
    }
    let mut passed = Vec::new();
    for tier in TIERS {
        match tier.decide(cluster, conn, direction, subject, peer) {
            TierDecision::Pass(pass) => passed.extend(pass),
            TierDecision::Decided(mut verdict) => {
                verdict.passed = passed;
                return verdict;
            }
        }
    }
    // "If a given connection wasn't allowed or denied by any of the tiers, the default
    // kubernetes policy is applied, which says that all pods can communicate with each
    // other."
    SideVerdict { passed, ..SideVerdict::new(direction, Vec::new(), Decision::NotIsolated) }
}

/// The ordered policy tiers: "Policy tiers are evaluated in the following order: Admin
/// tier, NetworkPolicy tier, Baseline tier."
const TIERS: &[Tier] = &[Tier::Cluster(tiers::Tier::Admin), Tier::NetworkPolicy, Tier::Cluster(tiers::Tier::Baseline)];

#[derive(Clone, Copy, Debug)]
enum Tier {
    Cluster(tiers::Tier),
    NetworkPolicy,
}

enum TierDecision {
    /// Not decided here; the Pass rule that sent it on, if one did.
    Pass(Option<ClusterMatch>),
    Decided(SideVerdict),
}

impl Tier {
    fn decide(
        self,
        cluster: &Cluster,
        conn: &Connection,
        direction: Direction,
        subject: usize,
        peer: Endpoint,
    ) -> TierDecision {
        match self {
            Tier::Cluster(tier) => cluster_tier(cluster, conn, tier, direction, subject, peer),
            Tier::NetworkPolicy => network_policy_tier(cluster, conn, direction, subject, peer),
        }
    }
}

/// An Admin or Baseline tier: its policies governing the subject, in precedence order
/// ("Policies with lower priority values have higher precedence"), each one's rules in
/// written order; the first rule matching the connection decides.
fn cluster_tier(
    cluster: &Cluster,
    conn: &Connection,
    tier: tiers::Tier,
    direction: Direction,
    subject: usize,
    peer: Endpoint,
) -> TierDecision {
    let pod = &cluster.pods[subject];
    let namespace_labels = cluster.namespace_labels(&pod.id.namespace);
    let destination = match conn.dst {
        Endpoint::Pod(i) => Some(&*cluster.pods[i]),
        Endpoint::Ip(_) => None,
    };
    let peer_ip = conn.ip_of(cluster, peer).expect("shortcut checked addresses");
    let governing = cluster.cluster_policies.iter().enumerate().filter(|(_, p)| p.tier == tier);
    for (pi, policy) in governing.filter(|(_, p)| p.governs(pod, namespace_labels, direction)) {
        for (ri, rule) in policy.rules(direction).iter().enumerate() {
            let Some(peer_idx) = rule.peers.iter().position(|p| cluster_peer_matches(cluster, p, peer, peer_ip)) else {
                continue;
            };
            // "If unspecified, protocol-specific attributes will not be used to match traffic."
            let port_idx = match &rule.ports {
                None => None,
                Some(ports) => match ports.iter().position(|p| p.matches(conn.protocol, conn.port, destination)) {
                    Some(k) => Some(k),
                    None => continue,
                },
            };
            let matched = ClusterMatch { policy: pi, rule: ri, action: rule.action, peer: peer_idx, port: port_idx };
            return match rule.action {
                // "Pass: Skips all further ClusterNetworkPolicy rules in the current tier for
                // the selected traffic, and passes evaluation to the next tier."
                Action::Pass => TierDecision::Pass(Some(matched)),
                Action::Accept | Action::Deny => {
                    TierDecision::Decided(SideVerdict::new(direction, Vec::new(), Decision::Cluster(matched)))
                }
            };
        }
    }
    TierDecision::Pass(None)
}

/// Whether a cluster policy's peer matches the endpoint at the other end (address `ip`).
pub(crate) fn cluster_peer_matches(cluster: &Cluster, peer: &ClusterPeer, endpoint: Endpoint, ip: IpAddr) -> bool {
    match peer {
        // "Note that host-networked pods are not included in this type of peer."
        ClusterPeer::Pods(set) => match endpoint {
            Endpoint::Pod(i) => {
                let pod = &cluster.pods[i];
                set.contains(pod, cluster.namespace_labels(&pod.id.namespace))
            }
            Endpoint::Ip(_) => false,
        },
        // "It selects the nodeIPs as the peer type by matching on the IPs present in the
        // node.Status.Addresses field of the node."
        ClusterPeer::Nodes(selector) => {
            cluster.nodes.iter().any(|node| selector.matches(&node.labels) && node.ips.contains(&ip))
        }
        // "cluster-internal traffic will be checked against the rule as well."
        ClusterPeer::Networks(nets) => nets.iter().any(|net| net.contains(&ip)),
        ClusterPeer::DomainNames(names) => tiers::resolve(&cluster.domains, names).any(|a| a == ip),
        ClusterPeer::Everything => true,
    }
}

fn network_policy_tier(
    cluster: &Cluster,
    conn: &Connection,
    direction: Direction,
    subject: usize,
    peer: Endpoint,
) -> TierDecision {
    // "A pod is isolated for a direction iff some policy in its namespace selects it and
    // lists that direction." Unisolated pods pass to the next tier: "Further evaluation
    // only happens for Pods not selected by a v1.NetworkPolicy."
    let isolated_by = cluster.isolating_policies(subject, direction);
    if isolated_by.is_empty() {
        return TierDecision::Pass(None);
    }
    let destination = match conn.dst {
        Endpoint::Pod(i) => Some(&*cluster.pods[i]),
        Endpoint::Ip(_) => None,
    };
    let peer_ip = conn.ip_of(cluster, peer).expect("shortcut checked addresses");
    // "Policies are additive": the first rule of any isolating policy that admits it wins.
    for &pi in &isolated_by {
        let policy = &cluster.policies[pi];
        for (ri, rule) in policy.rules(direction).unwrap_or_default().iter().enumerate() {
            if let Some((peer_idx, port_idx)) =
                rule_admits(cluster, &policy.id.namespace, rule, peer, peer_ip, destination, conn)
            {
                let decision = Decision::Allowed(RuleMatch { policy: pi, rule: ri, peer: peer_idx, port: port_idx });
                return TierDecision::Decided(SideVerdict::new(direction, isolated_by, decision));
            }
        }
    }
    TierDecision::Decided(SideVerdict::new(direction, isolated_by, Decision::NoRuleMatched))
}

/// "Traffic is allowed ... if the traffic matches at least one peer AND at least one port";
/// returns the indices of the peer and port that matched.
fn rule_admits(
    cluster: &Cluster,
    policy_namespace: &str,
    rule: &Rule,
    peer: Endpoint,
    peer_ip: IpAddr,
    destination: Option<&Pod>,
    conn: &Connection,
) -> Option<(Option<usize>, Option<usize>)> {
    let peer_idx = match &rule.peers {
        None => None,
        Some(peers) => Some(peers.iter().position(|p| peer_matches(cluster, policy_namespace, p, peer, peer_ip))?),
    };
    let port_idx = match &rule.ports {
        None => None,
        Some(ports) => Some(ports.iter().position(|p| p.matches(conn.protocol, conn.port, destination))?),
    };
    Some((peer_idx, port_idx))
}

pub(crate) fn peer_matches(
    cluster: &Cluster,
    policy_namespace: &str,
    peer: &Peer,
    endpoint: Endpoint,
    ip: IpAddr,
) -> bool {
    match peer {
        // "ipBlock matches any source/destination IP, pod IPs included."
        Peer::IpBlock(block) => block.contains(ip),
        Peer::Pods { namespaces, pods } => {
            let Endpoint::Pod(i) = endpoint else { return false };
            let pod = &cluster.pods[i];
            // hostNetwork pods are reached by IP (ipBlock) only.
            if pod.host_network || !pods.matches(&pod.labels) {
                return false;
            }
            match namespaces {
                NamespaceScope::PolicyNamespace => pod.id.namespace == policy_namespace,
                NamespaceScope::Matching(selector) => {
                    cluster.namespace_labels(&pod.id.namespace).is_some_and(|labels| selector.matches(labels))
                }
            }
        }
    }
}
