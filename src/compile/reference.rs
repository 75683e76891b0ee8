//! The reference compiler: one cluster → one node's ruleset, written for clarity only.
//!
//! ```text
//!  local pods ──► for each direction: the policies isolating it (Policy::isolates), the
//!      │          cluster policies governing it (ClusterPolicy::governs)
//!      │              └─► its pod chain (jumps to its tier chains and those policies' chains)
//!      │                  + dispatch entries
//!      └──► each (policy, direction) selecting a local pod ──► its chain:
//!               each rule × (peers: pod sets | ipBlock sets | any) × (ports set | named ports | any)
//!               each set built straight from the cluster (every pod in scope read), named by its
//!               canonical identity
//!      └──► each distinct list of cluster policies governing a local pod ──► its tier chain
//!               (compile/tiers.rs, shared with the incremental compiler)
//! ```
//!
//! No cache, no label index, no budgets: [`super::IncrementalCompiler`] is checked against
//! this on every step of random cluster histories, two independent ways to the same result.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use super::naming::Namer;
use super::tiers::{TierPlan, TierSets};
use super::*;
use crate::policy::model::Rule as PolicyRule;

/// Compiles the ruleset of one node.
pub fn compile(cluster: &Cluster, config: &NodeConfig) -> Ruleset {
    compile_with_namer(cluster, config, &Namer::new())
}

/// [`compile`], the sets named by a fresh copy of `namer` (tests narrow its hash to force
/// name collisions).
pub fn compile_with_namer(cluster: &Cluster, config: &NodeConfig, namer: &Namer) -> Ruleset {
    let local = local_pods(cluster, &config.node);
    let mut rs = Ruleset::new(config.table.clone());

    // The unknown-pod guard, for each family the node has pod CIDRs of.
    let mut guarded = Vec::new();
    for family in FAMILIES {
        if let Some(cidrs) = pod_cidrs_of(config, family) {
            rs.sets.insert(pod_cidrs_set(family).into(), Arc::new(cidrs));
            rs.sets.insert(local_pods_set(family).into(), Arc::new(local_pods_of(cluster, &local, family)));
            guarded.push(family);
        }
    }
    skeleton(&mut rs, &guarded);

    // Each local pod isolated for a direction gets a chain; unisolated, it is absent from
    // the dispatch map and passes.
    let mut selected: BTreeMap<(usize, Direction), Vec<usize>> = BTreeMap::new();
    let mut tiers = TierPlan::default();
    for &i in &local {
        let pod = &cluster.pods[i];
        for d in [Direction::Egress, Direction::Ingress] {
            let isolating = cluster.isolating_policies(i, d);
            let jumps = tiers.add_pod(cluster, i, d, !isolating.is_empty());
            if isolating.is_empty() && jumps.is_empty() {
                continue;
            }
            let policies: Vec<&Policy> = isolating.iter().map(|&pi| &*cluster.policies[pi]).collect();
            let (name, chain) = pod_chain(pod, d, &policies, &jumps, &config.observe);
            dispatch(&mut rs, pod, d == Direction::Ingress, &name);
            rs.chains.insert(name, Arc::new(chain));
            for pi in isolating {
                selected.entry((pi, d)).or_default().push(i);
            }
        }
    }

    // Each policy selecting a local pod, in cluster order (the order sets are named in).
    let mut reference = Reference { cluster, rs, namer: namer.fresh(0), observe: config.observe };
    for (&(pi, d), local) in &selected {
        reference.policy_chain(&cluster.policies[pi], d, local);
    }
    // The cluster-wide tiers' chains, after the NetworkPolicy chains (the order sets are named in).
    tiers.emit(&mut reference);
    declare_objects(&mut reference.rs, &config.observe);
    reference.rs
}

impl<'a> TierSets<'a> for Reference<'a> {
    fn observe(&self) -> Observe {
        self.observe
    }

    fn cluster(&self) -> &'a Cluster {
        self.cluster
    }

    fn ruleset(&mut self) -> &mut Ruleset {
        &mut self.rs
    }

    fn namer(&mut self) -> &mut Namer {
        &mut self.namer
    }

    fn pod_peer_sets(&mut self, namespaces: &'a Selector, pods: &'a Selector) -> [String; 2] {
        let scope = NamespaceScope::Matching(namespaces.clone());
        let peer = Peer::Pods { namespaces: scope.clone(), pods: pods.clone() };
        // A pod peer with a namespace selector depends on no policy namespace.
        self.peer_sets("", &peer, &scope, pods)
    }
}

struct Reference<'a> {
    cluster: &'a Cluster,
    rs: Ruleset,
    namer: Namer,
    observe: Observe,
}

impl Reference<'_> {
    /// The chain of `policy` in direction `d`; `local` are the local pods it selects.
    fn policy_chain(&mut self, policy: &Policy, d: Direction, local: &[usize]) {
        let ingress = d == Direction::Ingress;
        let mut rules = Vec::new();
        for (ri, rule) in policy.rules(d).unwrap_or_default().iter().enumerate() {
            self.rule(policy, d, ri, rule, local, &mut rules);
        }
        let chain = Chain {
            base: None,
            comment: Some(names::comment(&format!("{} {}", policy.id, d.as_str().to_lowercase()))),
            rules,
        };
        self.rs.chains.insert(names::policy_chain(ingress, &policy.id.namespace, &policy.id.name), Arc::new(chain));
    }

    /// "Traffic is allowed if it matches at least one peer AND at least one port": one nft
    /// rule per (peer kind × port kind), each a set lookup ending in accept.
    fn rule(
        &mut self,
        policy: &Policy,
        d: Direction,
        ri: usize,
        rule: &PolicyRule,
        local: &[usize],
        out: &mut Vec<Rule>,
    ) {
        let ns = policy.id.namespace.as_str();
        let ingress = d == Direction::Ingress;
        let dir = if ingress { "ingress" } else { "egress" };
        let peer_field = if ingress { AddrField::Saddr } else { AddrField::Daddr };
        let base_comment = format!("{}/{} {dir} rule {ri}", ns, policy.id.name);
        let counted = Counted {
            base_comment: &base_comment,
            counter: rule_counter(&self.observe, policy_rule_labels(policy, d, ri)),
        };

        // Ports: None = all ports of all protocols; numbered ones in one set; named ones
        // resolved per pod below.
        let mut port_matches: Vec<(Option<Match>, String)> = Vec::new();
        let mut named: Vec<(&str, Protocol)> = Vec::new();
        match &rule.ports {
            None => port_matches.push((None, "all ports".into())),
            Some(specs) => {
                let ranges;
                (ranges, named) = numbered_and_named(specs);
                if !ranges.is_empty() {
                    let (elements, text) = ports_elements(ranges);
                    let set = self.namer.name(&ports_ident(&self.namer, &text));
                    self.rs.sets.entry(set.clone()).or_insert_with(|| Arc::new(ports_set(elements, &text)));
                    port_matches
                        .push((Some(Match::Lookup { key: Key::ProtoDport, set, negate: false }), "ports".into()));
                }
            }
        }

        // Peers: None = any peer. Their sets are made only if a rule looks them up: with
        // ports, or with an ingress rule's named ports (an egress rule's named-port set
        // holds its peers' addresses itself).
        let peers_looked_up = !port_matches.is_empty() || (ingress && !named.is_empty());
        let mut peer_matches: Vec<(Option<Match>, String)> = Vec::new();
        match &rule.peers {
            None => peer_matches.push((None, "any peer".into())),
            Some(_) if !peers_looked_up => {}
            Some(peers) => {
                let mut blocks: Vec<&IpBlock> = Vec::new();
                for (k, peer) in peers.iter().enumerate() {
                    match peer {
                        Peer::Pods { namespaces, pods } => {
                            let sets = self.peer_sets(ns, peer, namespaces, pods);
                            for (f, set) in FAMILIES.into_iter().zip(sets) {
                                let m = Match::Lookup { key: Key::Addr(f, peer_field), set, negate: false };
                                peer_matches.push((Some(m), format!("peer {k} pods")));
                            }
                        }
                        Peer::IpBlock(b) => blocks.push(b),
                    }
                }
                for f in FAMILIES {
                    let Some(cidrs) = cidr_set(&blocks, f, &format!("{base_comment} ipBlocks")) else {
                        continue;
                    };
                    let prefix = if f == IpFamily::V4 { names::CIDR_V4 } else { names::CIDR_V6 };
                    let set = self.namer.name(&rule_ident(&self.namer, prefix, policy, dir, ri));
                    self.rs.sets.insert(set.clone(), Arc::new(cidrs));
                    peer_matches.push((
                        Some(Match::Lookup { key: Key::Addr(f, peer_field), set, negate: false }),
                        "ipBlocks".into(),
                    ));
                }
            }
        }

        peer_port_rules(out, &counted, &peer_matches, &port_matches, &Verdict::Accept);

        // "A named port is resolved on the destination pod's containerPorts, per pod; it
        // never matches a non-pod destination": daddr . proto . port sets of resolved pods.
        if named.is_empty() {
            return;
        }
        for f in FAMILIES {
            // An ingress rule looks the set up after each peer match of its family: none,
            // and the set would serve no rule.
            let peers_of_family = peers_of_family(&peer_matches, f);
            if ingress && peers_of_family.is_empty() {
                continue;
            }
            let prefix = if f == IpFamily::V4 { names::NAMED_V4 } else { names::NAMED_V6 };
            let mut entries: Vec<(IpAddr, u8, u16)> = Vec::new();
            let (ident, comment) = if ingress {
                // The destination is the local pod itself.
                entries = local_named_port_entries(self.cluster, local, f, &named);
                let comment = names::comment(&format!("{base_comment} named ports"));
                (rule_ident(&self.namer, prefix, policy, dir, ri), comment)
            } else {
                // The destination is any pod the peers admit: the set encodes peer AND port.
                for j in 0..self.cluster.pods.len() {
                    entries.extend(named_port_entries(self.cluster, ns, rule.peers.as_deref(), j, f, &named));
                }
                egress_named_set(&self.namer, prefix, ns, rule.peers.as_deref(), &named)
            };
            let set = self.namer.name(&ident);
            self.rs.sets.insert(set.clone(), Arc::new(named_port_set(f, entries, comment)));
            let lookup = Match::Lookup { key: Key::AddrProtoDport(f, AddrField::Daddr), set, negate: false };
            named_port_rules(out, &counted, ingress, &peers_of_family, lookup, &Verdict::Accept);
        }
    }

    /// The names of the (v4, v6) sets of the addresses of the pods `peer` (`pods` in
    /// `scope`, of a policy of namespace `policy_ns`) admits, built from every pod of the
    /// cluster the first time.
    fn peer_sets(&mut self, policy_ns: &str, peer: &Peer, scope: &NamespaceScope, pods: &Selector) -> [String; 2] {
        let names = peer_idents(&self.namer, policy_ns, scope, pods).map(|ident| self.namer.name(&ident));
        if !self.rs.sets.contains_key(&names[0]) {
            let cluster = self.cluster;
            let mut addrs: [Vec<IpAddr>; 2] = [Vec::new(), Vec::new()];
            // Only the pods of the namespaces in scope can be admitted: the others are not read.
            let in_scope = cluster.namespaces.keys().filter(|ns| scope_admits(cluster, policy_ns, scope, ns));
            for pod in in_scope.flat_map(|ns| pods_of_namespace(cluster, ns)) {
                if peer_admits_pod(cluster, policy_ns, peer, pod) {
                    for ip in &pod.ips {
                        addrs[usize::from(ip.is_ipv6())].push(*ip);
                    }
                }
            }
            let sets = address_sets(addrs, &pods_text(policy_ns, scope, pods));
            for (name, set) in names.iter().zip(sets) {
                self.rs.sets.insert(name.clone(), Arc::new(set));
            }
        }
        names
    }
}
