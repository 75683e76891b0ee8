//! The cluster-wide tiers in a node's ruleset: ClusterNetworkPolicy (Admin, Baseline) and
//! v1alpha1's AdminNetworkPolicy / BaselineAdminNetworkPolicy, around the NetworkPolicy tier.
//!
//! ```text
//!  pod_{eg,in}_<pod>: ct state invalid drop; tcp non-SYN drop
//!                     jump adm_{eg,in}_<list>    the Admin tier: accept | drop | return (Pass)
//!                     jump pol_{eg,in}_<policy>  the NetworkPolicy tier, when one isolates the
//!                     ...; counter drop          pod: it decides ("always makes a final decision")
//!                     jump base_{eg,in}_<list>   otherwise the Baseline tier: accept | drop | return
//!                     (end: back in the base chain, whose policy accepts: the default allow)
//!
//!  adm_/base_<list>: the rules of the cluster policies governing the pod, in precedence order,
//!                    each rule's (peer × port) matches with its verdict
//! ```
//!
//! "Pass: Skips all further ClusterNetworkPolicy rules in the current tier ... and passes
//! evaluation to the next tier": a tier is one chain per distinct list of governing
//! policies, so Pass is `return` (to the pod chain, which goes on with the next tier), and
//! nothing needs to know which pod it came from. Pods governed alike (every pod of a
//! namespace, typically) share the chain. "Accept ... No further ... NetworkPolicy rules
//! will be processed" (egress: "but any ingress rules at the destination do apply"):
//! `accept` ends this direction's base chain only; the ingress base chain, a later priority
//! on the same hook, still runs.
//!
//! Both compilers build tier chains with this code; they differ in where the pod peer sets
//! come from ([`TierSets`]: built afresh, or from the incremental compiler's cache). The
//! first-packet cost grows with the governing policies' rules, never with the cluster's pods:
//! peers are set lookups.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::naming::{Ident, Namer};
use super::*;
use crate::policy::tiers::{self as model, Action, ClusterPeer, ClusterPolicy, ClusterRule, Tier};

/// The tier chains a local pod's chain jumps to, for one direction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TierJumps {
    pub admin: Option<String>,
    pub baseline: Option<String>,
}

impl TierJumps {
    pub fn is_empty(&self) -> bool {
        self.admin.is_none() && self.baseline.is_none()
    }
}

/// What a compiler lends the tier chains: its ruleset, its namer, and the pod peer sets it
/// shares with NetworkPolicy chains.
pub(super) trait TierSets<'a> {
    fn cluster(&self) -> &'a Cluster;
    fn ruleset(&mut self) -> &mut Ruleset;
    fn namer(&mut self) -> &mut Namer;
    /// Whether rules count into named counters.
    fn observe(&self) -> Observe;
    /// The names of the (v4, v6) sets of the addresses of the pods matching `pods` in the
    /// namespaces matching `namespaces` (hostNetwork pods never), in the ruleset.
    fn pod_peer_sets(&mut self, namespaces: &'a Selector, pods: &'a Selector) -> [String; 2];

    /// The rules of cluster policy `pi` in direction `d` as an earlier compile made them,
    /// their sets named and in the ruleset again; `None`: compile them (and say what they
    /// use, [`TierSets::used`], then [`TierSets::keep`] them). The reference compiler keeps
    /// nothing.
    fn reuse(&mut self, _pi: usize, _d: Direction) -> Option<Vec<Rule>> {
        None
    }

    /// The rules being compiled use this set (in this order).
    fn used(&mut self, _set: UsedSet) {}

    /// The rules of cluster policy `pi` in direction `d` just compiled, with the sets
    /// [`TierSets::used`] reported since the last [`TierSets::reuse`].
    fn keep(&mut self, _pi: usize, _d: Direction, _rules: &[Rule]) {}

    /// The tier chain `name` of cluster policies `list` in direction `d` as an earlier
    /// compile made it, when every one of them was [`TierSets::reuse`]d in this compile
    /// (the chain is their rules, so it is the same): shared, a diff skips it unread.
    fn reuse_chain(&mut self, _name: &str, _list: &[usize], _d: Direction) -> Option<Arc<Chain>> {
        None
    }

    /// The tier chain `name` just built.
    fn keep_chain(&mut self, _name: &str, _list: &[usize], _d: Direction, _chain: &Arc<Chain>) {}
}

/// A set the rules of a cluster policy look up, as a later compile finds it again.
#[derive(Clone, Debug)]
pub enum UsedSet {
    /// A set of the policy's own (ports, networks, nodes, domain names): its identity, the
    /// name it had, its contents (which depend on the policy, the cluster's nodes and names).
    Fixed { ident: Ident, name: String, set: Arc<Set> },
    /// The pod peer sets of peer `peer` of rule `rule`: shared, patched as pods change.
    PodPeers { rule: usize, peer: usize, names: [String; 2] },
}

/// The tier chains of one compile: which lists of cluster policies govern which local pods.
#[derive(Debug, Default)]
pub(super) struct TierPlan {
    /// (tier, direction, governing policies) → the chain's name.
    chains: BTreeMap<(Tier, Direction, Vec<usize>), String>,
    /// (policy, direction) → the local pods it governs (ingress named ports resolve on them).
    governed: BTreeMap<(usize, Direction), Vec<usize>>,
}

impl TierPlan {
    /// Records the cluster policies governing local pod `i` in direction `d`, and returns
    /// the tier chains its pod chain jumps to. `isolated`: a NetworkPolicy isolates the pod
    /// for `d`, so its Baseline tier never applies ("Further evaluation only happens for
    /// Pods not selected by a v1.NetworkPolicy").
    pub fn add_pod(&mut self, cluster: &Cluster, i: usize, d: Direction, isolated: bool) -> TierJumps {
        let governing = governing(cluster, &cluster.pods[i], d);
        self.add_governed_pod(cluster, i, d, isolated, &governing)
    }

    /// [`TierPlan::add_pod`], given the pod's [`governing`] cluster policies (which a
    /// compiler may have kept from an earlier compile).
    pub fn add_governed_pod(
        &mut self,
        cluster: &Cluster,
        i: usize,
        d: Direction,
        isolated: bool,
        governing: &[usize],
    ) -> TierJumps {
        if governing.is_empty() {
            return TierJumps::default();
        }
        let governing: Vec<usize> = governing
            .iter()
            .copied()
            .filter(|&pi| !(isolated && cluster.cluster_policies[pi].tier == Tier::Baseline))
            .collect();
        for &pi in &governing {
            self.governed.entry((pi, d)).or_default().push(i);
        }
        let mut chain = |tier: Tier| {
            let list: Vec<usize> =
                governing.iter().copied().filter(|&pi| cluster.cluster_policies[pi].tier == tier).collect();
            if list.is_empty() {
                return None;
            }
            let name = self.chains.entry((tier, d, list)).or_insert_with_key(|(_, _, list)| {
                let ids: Vec<String> = list.iter().map(|&pi| policy_key(&cluster.cluster_policies[pi])).collect();
                let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
                names::tier_chain(tier == Tier::Admin, d == Direction::Ingress, &ids)
            });
            Some(name.clone())
        };
        TierJumps { admin: chain(Tier::Admin), baseline: chain(Tier::Baseline) }
    }

    /// Adds every tier chain (and the sets it looks up) to the compiler's ruleset.
    pub fn emit<'a>(self, sets: &mut impl TierSets<'a>) {
        let cluster = sets.cluster();
        // A policy's rules compile alike in every list it is in (their comments name the
        // policy, their sets are the policy's or shared): once per compile.
        let mut compiled: BTreeMap<(usize, Direction), Vec<Rule>> = BTreeMap::new();
        for ((tier, d, list), name) in &self.chains {
            // The rules first (they name the sets, in order), then the chain they make.
            for &pi in list {
                if let std::collections::btree_map::Entry::Vacant(slot) = compiled.entry((pi, *d)) {
                    slot.insert(self.policy_rules(sets, pi, *d));
                }
            }
            if let Some(chain) = sets.reuse_chain(name, list, *d) {
                sets.ruleset().chains.insert(name.clone(), chain);
                continue;
            }
            let mut rules = Vec::new();
            for &pi in list {
                rules.extend(compiled[&(pi, *d)].iter().cloned());
            }
            let ids: Vec<String> = list.iter().map(|&pi| cluster.cluster_policies[pi].id.name.clone()).collect();
            let comment = format!("{tier} tier {}: {}", d.as_str().to_lowercase(), ids.join(", "));
            let chain = Arc::new(Chain { base: None, comment: Some(names::comment(&comment)), rules });
            sets.keep_chain(name, list, *d, &chain);
            sets.ruleset().chains.insert(name.clone(), chain);
        }
    }

    /// The rules of cluster policy `pi` in direction `d`, as an earlier compile kept them or
    /// compiled now.
    fn policy_rules<'a>(&self, sets: &mut impl TierSets<'a>, pi: usize, d: Direction) -> Vec<Rule> {
        let cluster = sets.cluster();
        // Named ports resolve on pods (local ones for ingress): such rules are compiled
        // afresh; the others depend on the policy and shared sets only.
        let rules = cluster.cluster_policies[pi].rules(d);
        let keepable = !rules
            .iter()
            .flat_map(|r| r.ports.iter().flatten())
            .any(|p| matches!(p.port, crate::policy::model::PortMatch::Named(_)));
        if keepable && let Some(kept) = sets.reuse(pi, d) {
            return kept;
        }
        let local = self.governed.get(&(pi, d)).map(Vec::as_slice).unwrap_or_default();
        let mut out = Vec::new();
        for (ri, rule) in rules.iter().enumerate() {
            cluster_rule(sets, pi, d, ri, rule, local, &mut out);
        }
        if keepable {
            sets.keep(pi, d, &out);
        }
        out
    }
}

/// The cluster policies (indices, in precedence order) governing `pod` in direction `d`.
pub fn governing(cluster: &Cluster, pod: &Pod, d: Direction) -> Vec<usize> {
    if !cluster.has_tiers() {
        return Vec::new();
    }
    let labels = cluster.namespace_labels(&pod.id.namespace);
    (0..cluster.cluster_policies.len()).filter(|&pi| cluster.cluster_policies[pi].governs(pod, labels, d)).collect()
}

/// `kind/name`: a cluster policy's identity in chain names.
fn policy_key(policy: &ClusterPolicy) -> String {
    format!("{}/{}", policy.id.kind, policy.id.name)
}

/// The identity of a set of rule `ri` of cluster policy `policy` alone (its networks, its
/// ingress named ports). The kind stands where a NetworkPolicy's namespace would: no
/// namespace is spelled with capitals, so the two never meet.
fn rule_ident(namer: &Namer, prefix: &'static str, policy: &ClusterPolicy, dir: &str, ri: usize) -> Ident {
    let (kind, name) = (policy.id.kind.as_str(), policy.id.name.as_str());
    namer.ident(prefix, &[kind, name, dir, &ri.to_string()], name)
}

/// What a rule does, in nft: "Accept" accepts, "Deny" drops, "Pass" returns to the pod
/// chain, which goes on with the next tier.
fn verdict(action: Action) -> Verdict {
    match action {
        Action::Accept => Verdict::Accept,
        Action::Deny => Verdict::Drop,
        Action::Pass => Verdict::Return,
    }
}

/// One cluster policy rule as nft rules: its verdict for each (peer match × port match),
/// like a NetworkPolicy rule's accepts. `local`: the local pods the policy governs.
fn cluster_rule<'a>(
    sets: &mut impl TierSets<'a>,
    pi: usize,
    d: Direction,
    ri: usize,
    rule: &'a ClusterRule,
    local: &[usize],
    out: &mut Vec<Rule>,
) {
    let cluster = sets.cluster();
    let policy = &cluster.cluster_policies[pi];
    // "treat the rule as matching no traffic" (an Accept rule that failed closed).
    if rule.peers.is_empty() {
        return;
    }
    let ingress = d == Direction::Ingress;
    let dir = if ingress { "ingress" } else { "egress" };
    let peer_field = if ingress { AddrField::Saddr } else { AddrField::Daddr };
    let rule_name = rule.name.clone().unwrap_or_else(|| ri.to_string());
    let base_comment = format!("{} {dir} rule {rule_name} {}", policy.id, rule.action);
    let verdict = verdict(rule.action);
    // Labelled by tier, the namespace empty: never the counter of a NetworkPolicy.
    let labels = CounterLabels {
        tier: policy.tier.to_string(),
        namespace: String::new(),
        policy: format!("{}/{}", policy.id.kind, policy.id.name),
        direction: dir.into(),
        rule: rule_name.clone(),
        action: rule.action.to_string().to_lowercase(),
        denied: false,
    };
    let counted = Counted { base_comment: &base_comment, counter: rule_counter(&sets.observe(), labels) };

    // Ports: "If unspecified, protocol-specific attributes will not be used to match
    // traffic": no match at all, every protocol.
    let mut port_matches: Vec<Described> = Vec::new();
    let mut named: Vec<(&str, Protocol)> = Vec::new();
    match &rule.ports {
        None => port_matches.push((None, "all traffic".into())),
        Some(specs) => {
            let ranges;
            (ranges, named) = numbered_and_named(specs);
            if !ranges.is_empty() {
                let (elements, text) = ports_elements(ranges);
                let ident = ports_ident(sets.namer(), &text);
                let set = fixed_set(sets, ident, || ports_set(elements, &text));
                port_matches.push((Some(Match::Lookup { key: Key::ProtoDport, set, negate: false }), "ports".into()));
            }
        }
    }

    // Peers, looked up only when a rule uses them (as for NetworkPolicy rules).
    let peers_looked_up = !port_matches.is_empty() || (ingress && !named.is_empty());
    let mut peer_matches: Vec<Described> = Vec::new();
    if rule.peers.contains(&ClusterPeer::Everything) {
        peer_matches.push((None, "any peer".into()));
    } else if peers_looked_up {
        let lookups = |names: [String; 2], what: String, out: &mut Vec<Described>| {
            for (f, set) in FAMILIES.into_iter().zip(names) {
                let m = Match::Lookup { key: Key::Addr(f, peer_field), set, negate: false };
                out.push((Some(m), what.clone()));
            }
        };
        let mut networks: Vec<IpBlock> = Vec::new();
        for (k, peer) in rule.peers.iter().enumerate() {
            match peer {
                ClusterPeer::Pods(set) => {
                    let names = sets.pod_peer_sets(&set.namespaces, &set.pods);
                    sets.used(UsedSet::PodPeers { rule: ri, peer: k, names: names.clone() });
                    lookups(names, format!("peer {k} pods"), &mut peer_matches);
                }
                ClusterPeer::Nodes(selector) => {
                    let names = node_sets(sets, selector);
                    lookups(names, format!("peer {k} nodes"), &mut peer_matches);
                }
                ClusterPeer::DomainNames(domains) => {
                    let names = domain_sets(sets, domains);
                    lookups(names, format!("peer {k} domains"), &mut peer_matches);
                }
                ClusterPeer::Networks(nets) => {
                    networks.extend(nets.iter().map(|&cidr| IpBlock { cidr, except: Vec::new() }))
                }
                ClusterPeer::Everything => unreachable!("handled above"),
            }
        }
        let blocks: Vec<&IpBlock> = networks.iter().collect();
        for f in FAMILIES {
            let Some(cidrs) = cidr_set(&blocks, f, &format!("{base_comment} networks")) else {
                continue;
            };
            let prefix = if f == IpFamily::V4 { names::CIDR_V4 } else { names::CIDR_V6 };
            let ident = rule_ident(sets.namer(), prefix, policy, dir, ri);
            let set = fixed_set(sets, ident, || cidrs);
            peer_matches
                .push((Some(Match::Lookup { key: Key::Addr(f, peer_field), set, negate: false }), "networks".into()));
        }
    }
    peer_port_rules(out, &counted, &peer_matches, &port_matches, &verdict);

    // "DestinationNamedPort selects a destination port on a pod based on the ContainerPort
    // name": resolved per pod, as for NetworkPolicy (daddr . proto . port sets).
    if named.is_empty() {
        return;
    }
    // The peers as a NetworkPolicy would write them ("You can't use this in a rule that
    // targets resources without named ports (e.g. Nodes or Networks)": pods and namespaces
    // are what remain, and a network is an ipBlock).
    let as_peers: Option<Vec<Peer>> = (!rule.peers.contains(&ClusterPeer::Everything)).then(|| {
        rule.peers
            .iter()
            .flat_map(|peer| match peer {
                ClusterPeer::Pods(set) => vec![Peer::Pods {
                    namespaces: NamespaceScope::Matching(set.namespaces.clone()),
                    pods: set.pods.clone(),
                }],
                ClusterPeer::Networks(nets) => {
                    nets.iter().map(|&cidr| Peer::IpBlock(IpBlock { cidr, except: Vec::new() })).collect()
                }
                ClusterPeer::Nodes(_) | ClusterPeer::DomainNames(_) | ClusterPeer::Everything => Vec::new(),
            })
            .collect()
    });
    for f in FAMILIES {
        let peers_of_family = peers_of_family(&peer_matches, f);
        if ingress && peers_of_family.is_empty() {
            continue;
        }
        let prefix = if f == IpFamily::V4 { names::NAMED_V4 } else { names::NAMED_V6 };
        let mut entries: Vec<(IpAddr, u8, u16)> = Vec::new();
        let (ident, comment) = if ingress {
            // The destination is the local pod itself.
            entries = local_named_port_entries(cluster, local, f, &named);
            (rule_ident(sets.namer(), prefix, policy, dir, ri), names::comment(&format!("{base_comment} named ports")))
        } else {
            // The destination is any pod the peers admit: the set encodes peer AND port.
            for j in 0..cluster.pods.len() {
                entries.extend(named_port_entries(cluster, "", as_peers.as_deref(), j, f, &named));
            }
            egress_named_set(sets.namer(), prefix, "", as_peers.as_deref(), &named)
        };
        let set = sets.namer().name(&ident);
        sets.ruleset().sets.entry(set.clone()).or_insert_with(|| Arc::new(named_port_set(f, entries, comment)));
        let lookup = Match::Lookup { key: Key::AddrProtoDport(f, AddrField::Daddr), set, negate: false };
        named_port_rules(out, &counted, ingress, &peers_of_family, lookup, &verdict);
    }
}

/// Names `ident` and puts the set `build` makes under that name (unless a set of the same
/// identity is there already), reporting it as used; returns the name.
fn fixed_set<'a>(sets: &mut impl TierSets<'a>, ident: Ident, build: impl FnOnce() -> Set) -> String {
    let name = sets.namer().name(&ident);
    let set = Arc::clone(sets.ruleset().sets.entry(name.clone()).or_insert_with(|| Arc::new(build())));
    sets.used(UsedSet::Fixed { ident, name: name.clone(), set });
    name
}

/// The (v4, v6) sets of the addresses of the nodes matching `selector`: "the IPs present
/// in the node.Status.Addresses field of the node".
fn node_sets<'a>(sets: &mut impl TierSets<'a>, selector: &Selector) -> [String; 2] {
    let cluster = sets.cluster();
    let text = naming::text(selector, naming::selector);
    let mut addrs: [Vec<IpAddr>; 2] = [Vec::new(), Vec::new()];
    for node in cluster.nodes.iter().filter(|n| selector.matches(&n.labels)) {
        for ip in &node.ips {
            addrs[usize::from(ip.is_ipv6())].push(*ip);
        }
    }
    let [v4, v6] = address_sets(addrs, &format!("nodes {selector}"));
    let hint = format!("nodes_{selector}");
    let [i4, i6] =
        [names::NODES_V4, names::NODES_V6].map(|prefix| sets.namer().ident(prefix, &["nodes", &text], &hint));
    [fixed_set(sets, i4, || v4), fixed_set(sets, i6, || v6)]
}

/// The (v4, v6) sets of the addresses the domain names `domains` resolve to (the cluster's
/// [`model::DomainMap`]: the CLI's `--resolve`; empty in the agent, which matches none).
fn domain_sets<'a>(sets: &mut impl TierSets<'a>, domains: &[String]) -> [String; 2] {
    let cluster = sets.cluster();
    let text = domains.join("\n");
    let hint = domains.first().map(String::as_str).unwrap_or_default();
    let mut addrs: [Vec<IpAddr>; 2] = [Vec::new(), Vec::new()];
    for ip in model::resolve(&cluster.domains, domains) {
        addrs[usize::from(ip.is_ipv6())].push(ip);
    }
    let [v4, v6] = address_sets(addrs, &format!("domains {}", domains.join(",")));
    let [i4, i6] =
        [names::DOMAINS_V4, names::DOMAINS_V6].map(|prefix| sets.namer().ident(prefix, &["domains", &text], hint));
    [fixed_set(sets, i4, || v4), fixed_set(sets, i6, || v6)]
}
