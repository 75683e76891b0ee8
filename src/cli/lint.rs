//! `netpol-check lint`: policies that cannot mean what they say, judged against the input.
//! Pure: the binary loads the cluster and prints the findings.
//!
//! ```text
//!  Cluster (+ pod CIDRs, given or none) ──► NetworkPolicies: selects no pod, named port no
//!        │                                   destination declares, namespace selector matching
//!        │                                   no namespace, rule covered by another, ipBlock
//!        │                                   matching pods, open to everyone under a default deny
//!        └──────────────────────────────► cluster policies: subject selects no pod, rule
//!                                            shadowed by an earlier one of its tier, equal
//!                                            priorities overlapping with different actions
//!  ──► Vec<Finding{code, object, path, message}> ──► text | JSON
//! ```
//!
//! Every check only reports what is certain: coverage between rules is decided on their
//! text (a selector's requirements a subset of another's, a CIDR inside another), which
//! can miss a redundancy but never invents one; "selects no pod" and "overlap" are facts
//! about the pods, namespaces and nodes of the input.

use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::{Value, json};

use crate::cli::report::{describe_cluster_rule, describe_rule};
use crate::policy::evaluate::{Endpoint, cluster_peer_matches};
use crate::policy::model::{Cluster, Direction, IpBlock, NamespaceScope, Peer, PortMatch, PortSpec, Rule};
use crate::policy::selector::Selector;
use crate::policy::tiers::{ClusterPeer, ClusterPolicy, ClusterRule, PodSet, Tier};

/// One problem: which object, where in it, and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Finding {
    /// A stable name of the check: `selects-no-pod`, `named-port-never-matches`, ...
    pub code: &'static str,
    /// `NetworkPolicy ns/name` or `ClusterNetworkPolicy name` (the kind as written).
    pub object: String,
    /// The field path in the object: `spec.ingress[0].from[1].namespaceSelector`.
    pub path: String,
    pub message: String,
}

impl Finding {
    pub fn line(&self) -> String {
        format!("{} {}: {} [{}]", self.object, self.path, self.message, self.code)
    }

    pub fn to_json(&self) -> Value {
        json!({"code": self.code, "object": self.object, "path": self.path, "message": self.message})
    }
}

/// Every finding on `cluster`. `pod_cidrs`: the pod ranges (`--pod-cidr`); empty means the
/// pods' own addresses are the evidence that an ipBlock matches pods.
pub fn lint(cluster: &Cluster, pod_cidrs: &[IpNet]) -> Vec<Finding> {
    let mut out = Vec::new();
    for (pi, _) in cluster.policies.iter().enumerate() {
        network_policy(cluster, pi, pod_cidrs, &mut out);
    }
    for (pi, _) in cluster.cluster_policies.iter().enumerate() {
        cluster_policy(cluster, pi, &mut out);
    }
    ambiguous_priorities(cluster, &mut out);
    out.sort();
    out
}

fn np_name(cluster: &Cluster, pi: usize) -> String {
    format!("NetworkPolicy {}", cluster.policies[pi].id)
}

fn field(direction: Direction) -> (&'static str, &'static str) {
    match direction {
        Direction::Ingress => ("ingress", "from"),
        Direction::Egress => ("egress", "to"),
    }
}

/// The pods (indices) a NetworkPolicy selects (hostNetwork pods never are).
fn selected_pods(cluster: &Cluster, pi: usize) -> Vec<usize> {
    let p = &cluster.policies[pi];
    (0..cluster.pods.len())
        .filter(|&i| {
            let pod = &cluster.pods[i];
            pod.id.namespace == p.id.namespace && !pod.host_network && p.pod_selector.matches(&pod.labels)
        })
        .collect()
}

/// The pods a rule's peers can be (peers absent: every pod).
fn peer_pods(cluster: &Cluster, namespace: &str, rule: &Rule) -> Vec<usize> {
    (0..cluster.pods.len())
        .filter(|&i| match &rule.peers {
            None => true,
            Some(peers) => peers.iter().any(|peer| {
                cluster.pods[i]
                    .ips
                    .iter()
                    .any(|&ip| crate::policy::evaluate::peer_matches(cluster, namespace, peer, Endpoint::Pod(i), ip))
            }),
        })
        .collect()
}

fn network_policy(cluster: &Cluster, pi: usize, pod_cidrs: &[IpNet], out: &mut Vec<Finding>) {
    let policy = &cluster.policies[pi];
    let object = np_name(cluster, pi);
    let selected = selected_pods(cluster, pi);
    if selected.is_empty() {
        out.push(Finding {
            code: "selects-no-pod",
            object: object.clone(),
            path: "spec.podSelector".into(),
            message: format!(
                "selects no pod: no pod of namespace {} has labels matching {}",
                policy.id.namespace, policy.pod_selector
            ),
        });
    }
    for direction in [Direction::Ingress, Direction::Egress] {
        let (f, peer_field) = field(direction);
        let rules = policy.rules(direction).unwrap_or_default();
        for (ri, rule) in rules.iter().enumerate() {
            // Named ports resolve on the destination: the selected pods for ingress, the
            // peers for egress. (A policy selecting nothing is reported once, above.)
            let destinations = match direction {
                Direction::Ingress => selected.clone(),
                Direction::Egress => peer_pods(cluster, &policy.id.namespace, rule),
            };
            if direction == Direction::Egress || !selected.is_empty() {
                for (k, spec) in rule.ports.iter().flatten().enumerate() {
                    if let PortMatch::Named(name) = &spec.port
                        && !destinations
                            .iter()
                            .any(|&d| cluster.pods[d].resolve_named_port(name, spec.protocol).is_some())
                    {
                        let whose = match direction {
                            Direction::Ingress => "no pod the policy selects",
                            Direction::Egress => "no pod the rule's peers can be",
                        };
                        out.push(Finding {
                            code: "named-port-never-matches",
                            object: object.clone(),
                            path: format!("spec.{f}[{ri}].ports[{k}]"),
                            message: format!(
                                "port {} never matches: {whose} declares a {} port named {name:?}",
                                spec, spec.protocol
                            ),
                        });
                    }
                }
            }
            for (k, peer) in rule.peers.iter().flatten().enumerate() {
                let at = format!("spec.{f}[{ri}].{peer_field}[{k}]");
                match peer {
                    Peer::Pods { namespaces: NamespaceScope::Matching(sel), .. }
                        if !cluster.namespaces.values().any(|ns| sel.matches(&ns.labels)) =>
                    {
                        out.push(Finding {
                            code: "namespace-selector-matches-nothing",
                            object: object.clone(),
                            path: format!("{at}.namespaceSelector"),
                            message: format!("never matches: no namespace of the input has labels matching {sel}"),
                        });
                    }
                    Peer::IpBlock(block) => {
                        if let Some(why) = ip_block_covers_pods(cluster, block, pod_cidrs) {
                            out.push(Finding {
                                code: "ipblock-covers-pods",
                                object: object.clone(),
                                path: format!("{at}.ipBlock"),
                                message: why,
                            });
                        }
                    }
                    _ => {}
                }
            }
            // A rule another rule of an isolating policy covers adds nothing: rules add up.
            if let Some((pj, rj)) = covering_rule(cluster, pi, direction, ri) {
                let by = if pj == pi { "this policy's".to_string() } else { format!("{}'s", cluster.policies[pj].id) };
                out.push(Finding {
                    code: "rule-shadowed",
                    object: object.clone(),
                    path: format!("spec.{f}[{ri}]"),
                    message: format!(
                        "adds nothing: {by} spec.{f}[{rj}] already allows all it allows ({}), for every pod this policy selects",
                        describe_rule(cluster, &policy.id.namespace, rule, direction)
                    ),
                });
            }
        }
    }
    open_despite_default_deny(cluster, pi, &selected, out);
}

/// Whether `block` matches pods: the pods' addresses it contains, or the pod CIDRs it overlaps.
fn ip_block_covers_pods(cluster: &Cluster, block: &IpBlock, pod_cidrs: &[IpNet]) -> Option<String> {
    if !pod_cidrs.is_empty() {
        let hit: Vec<String> = pod_cidrs
            .iter()
            .filter(|net| overlaps(&block.cidr, net) && !block.except.iter().any(|e| e.contains(*net)))
            .map(ToString::to_string)
            .collect();
        return (!hit.is_empty()).then(|| {
            format!(
                "{} overlaps the pod CIDRs {} (--pod-cidr): it matches pods too, whatever their labels and namespaces",
                block.cidr,
                hit.join(", ")
            )
        });
    }
    let pods: Vec<String> = cluster
        .pods
        .iter()
        .filter(|p| !p.host_network && p.ips.iter().any(|&ip| block.contains(ip)))
        .map(|p| p.id.to_string())
        .collect();
    (!pods.is_empty()).then(|| {
        let shown = if pods.len() > 5 { format!("{} and {} more", pods[..5].join(", "), pods.len() - 5) } else { pods.join(", ") };
        format!(
            "{} contains the addresses of pods {shown}: it matches those pods too, whatever their labels and namespaces",
            block.cidr
        )
    })
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Selector `a` matches everything `b` matches, on their text: `a`'s requirements are
/// a subset of `b`'s.
fn selector_covers(a: &Selector, b: &Selector) -> bool {
    a.requirements().iter().all(|r| b.requirements().contains(r))
}

fn peer_covers(a: &Peer, b: &Peer) -> bool {
    match (a, b) {
        (Peer::Pods { namespaces: na, pods: pa }, Peer::Pods { namespaces: nb, pods: pb }) => {
            let ns = match (na, nb) {
                (NamespaceScope::Matching(sa), NamespaceScope::Matching(sb)) => selector_covers(sa, sb),
                (NamespaceScope::Matching(sa), NamespaceScope::PolicyNamespace) => sa.is_everything(),
                (NamespaceScope::PolicyNamespace, NamespaceScope::PolicyNamespace) => true,
                (NamespaceScope::PolicyNamespace, NamespaceScope::Matching(_)) => false,
            };
            ns && selector_covers(pa, pb)
        }
        (Peer::IpBlock(a), Peer::IpBlock(b)) => {
            a.cidr.contains(&b.cidr)
                && a.except.iter().filter(|e| overlaps(e, &b.cidr)).all(|e| b.except.iter().any(|x| x.contains(e)))
        }
        _ => false,
    }
}

fn port_covers(a: &PortSpec, b: &PortSpec) -> bool {
    a.protocol == b.protocol
        && match (&a.port, &b.port) {
            (PortMatch::Any, _) => true,
            (PortMatch::Range(s, e), PortMatch::Range(x, y)) => s <= x && y <= e,
            (PortMatch::Named(x), PortMatch::Named(y)) => x == y,
            _ => false,
        }
}

fn ports_cover(a: &Option<Vec<PortSpec>>, b: &Option<Vec<PortSpec>>) -> bool {
    match (a, b) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(a), Some(b)) => b.iter().all(|y| a.iter().any(|x| port_covers(x, y))),
    }
}

/// Rule `a` (of a policy in the same namespace) allows all rule `b` allows.
fn rule_covers(a: &Rule, b: &Rule) -> bool {
    let peers = match (&a.peers, &b.peers) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(pa), Some(pb)) => pb.iter().all(|y| pa.iter().any(|x| peer_covers(x, y))),
    };
    peers && ports_cover(&a.ports, &b.ports)
}

/// Another rule, of this policy or of one in its namespace selecting (on its text) every
/// pod this one selects, that covers rule `ri`. Of two rules covering each other, the
/// later (policy name, then index) is the one reported.
fn covering_rule(cluster: &Cluster, pi: usize, direction: Direction, ri: usize) -> Option<(usize, usize)> {
    let policy = &cluster.policies[pi];
    let rule = &policy.rules(direction)?[ri];
    for (pj, other) in cluster.policies.iter().enumerate() {
        if other.id.namespace != policy.id.namespace || !selector_covers(&other.pod_selector, &policy.pod_selector) {
            continue;
        }
        for (rj, candidate) in other.rules(direction).unwrap_or_default().iter().enumerate() {
            if (pj, rj) == (pi, ri) || !rule_covers(candidate, rule) {
                continue;
            }
            let mutual = rule_covers(rule, candidate) && selector_covers(&policy.pod_selector, &other.pod_selector);
            if mutual && (pj, rj) > (pi, ri) {
                continue;
            }
            return Some((pj, rj));
        }
    }
    None
}

/// A policy of the namespace that selects every pod and allows nothing for `direction`:
/// the namespace's default deny.
fn default_deny(cluster: &Cluster, namespace: &str, direction: Direction) -> Option<usize> {
    cluster.policies.iter().position(|p| {
        p.id.namespace == namespace
            && p.pod_selector.is_everything()
            && p.quarantined.is_none()
            && p.rules(direction).is_some_and(|r| r.is_empty())
    })
}

/// A rule that admits every source (or destination): no peers, or an ipBlock of a whole
/// family without except.
fn from_everywhere(rule: &Rule) -> Option<&'static str> {
    match &rule.peers {
        None => Some("every address"),
        Some(peers) => peers.iter().find_map(|p| match p {
            Peer::IpBlock(b) if b.cidr.prefix_len() == 0 && b.except.is_empty() => {
                Some(if b.cidr.addr().is_ipv4() { "every IPv4 address" } else { "every IPv6 address" })
            }
            _ => None,
        }),
    }
}

fn open_despite_default_deny(cluster: &Cluster, pi: usize, selected: &[usize], out: &mut Vec<Finding>) {
    let policy = &cluster.policies[pi];
    for direction in [Direction::Ingress, Direction::Egress] {
        let Some(deny) = default_deny(cluster, &policy.id.namespace, direction) else { continue };
        let (f, prep) = match direction {
            Direction::Ingress => ("ingress", "from"),
            Direction::Egress => ("egress", "to"),
        };
        for (ri, rule) in policy.rules(direction).unwrap_or_default().iter().enumerate() {
            let Some(everyone) = from_everywhere(rule) else { continue };
            // An Admin tier policy governing the pod may still deny: then it is not open.
            let open: Vec<String> = selected
                .iter()
                .filter(|&&i| {
                    let pod = &cluster.pods[i];
                    let ns = cluster.namespace_labels(&pod.id.namespace);
                    !cluster.cluster_policies.iter().any(|c| c.tier == Tier::Admin && c.governs(pod, ns, direction))
                })
                .map(|&i| cluster.pods[i].id.to_string())
                .collect();
            if open.is_empty() {
                continue;
            }
            let ports = crate::cli::report::describe_ports(&rule.ports);
            out.push(Finding {
                code: "open-despite-default-deny",
                object: np_name(cluster, pi),
                path: format!("spec.{f}[{ri}]"),
                message: format!(
                    "pods {} take {f} {prep} {everyone} on {ports}, though {} denies all {f} in namespace {} by default",
                    open.join(", "),
                    cluster.policies[deny].id,
                    policy.id.namespace
                ),
            });
        }
    }
}

// --- cluster policies ----------------------------------------------------------------------

fn cp_name(policy: &ClusterPolicy) -> String {
    policy.id.to_string()
}

fn pods_of_subject(cluster: &Cluster, subject: &PodSet) -> Vec<usize> {
    (0..cluster.pods.len())
        .filter(|&i| {
            let pod = &cluster.pods[i];
            subject.contains(pod, cluster.namespace_labels(&pod.id.namespace))
        })
        .collect()
}

fn cluster_policy(cluster: &Cluster, pi: usize, out: &mut Vec<Finding>) {
    let policy = &cluster.cluster_policies[pi];
    if pods_of_subject(cluster, &policy.subject).is_empty() {
        out.push(Finding {
            code: "subject-selects-no-pod",
            object: cp_name(policy),
            path: "spec.subject".into(),
            message: format!("selects no pod: no pod of the input is {}", describe_pod_set(&policy.subject)),
        });
    }
    for direction in [Direction::Ingress, Direction::Egress] {
        let (f, _) = field(direction);
        for (ri, rule) in policy.rules(direction).iter().enumerate() {
            if let Some((pj, rj)) = earlier_covering_rule(cluster, pi, direction, ri) {
                let other = &cluster.cluster_policies[pj];
                let by = if pj == pi {
                    format!("its {}", other.rules(direction)[rj].label(rj))
                } else {
                    format!("{} {} (spec.{f}[{rj}])", other.describe(), other.rules(direction)[rj].label(rj))
                };
                out.push(Finding {
                    code: "cluster-rule-shadowed",
                    object: cp_name(policy),
                    path: format!("spec.{f}[{ri}]"),
                    message: format!(
                        "{} ({} {}) never decides: {by}, checked first in the {} tier, matches all it matches",
                        rule.label(ri),
                        rule.action,
                        describe_cluster_rule(rule, direction),
                        policy.tier
                    ),
                });
            }
        }
    }
}

/// "pods with app=web in namespaces with team=a", "a pod of every namespace".
fn describe_pod_set(set: &PodSet) -> String {
    let who = if set.pods.is_everything() { "a pod".to_string() } else { format!("a pod with {}", set.pods) };
    if set.namespaces.is_everything() {
        format!("{who} of any namespace")
    } else {
        format!("{who} in a namespace with {}", set.namespaces)
    }
}

fn cluster_peer_covers(a: &ClusterPeer, b: &ClusterPeer) -> bool {
    match (a, b) {
        (ClusterPeer::Everything, _) => true,
        (ClusterPeer::Pods(x), ClusterPeer::Pods(y)) => podset_covers(x, y),
        (ClusterPeer::Nodes(x), ClusterPeer::Nodes(y)) => selector_covers(x, y),
        (ClusterPeer::Networks(x), ClusterPeer::Networks(y)) => y.iter().all(|n| x.iter().any(|m| m.contains(n))),
        (ClusterPeer::DomainNames(x), ClusterPeer::DomainNames(y)) => y.iter().all(|n| x.contains(n)),
        _ => false,
    }
}

fn podset_covers(a: &PodSet, b: &PodSet) -> bool {
    selector_covers(&a.namespaces, &b.namespaces) && selector_covers(&a.pods, &b.pods)
}

fn cluster_rule_covers(a: &ClusterRule, b: &ClusterRule) -> bool {
    !a.peers.is_empty()
        && b.peers.iter().all(|y| a.peers.iter().any(|x| cluster_peer_covers(x, y)))
        && ports_cover(&a.ports, &b.ports)
}

/// A rule checked before rule `ri` of policy `pi` in its tier (an earlier rule of the same
/// policy, or any rule of a policy of the tier with a strictly lower priority whose subject
/// covers this one's) that matches all it matches.
fn earlier_covering_rule(cluster: &Cluster, pi: usize, direction: Direction, ri: usize) -> Option<(usize, usize)> {
    let policy = &cluster.cluster_policies[pi];
    let rule = &policy.rules(direction)[ri];
    for (pj, other) in cluster.cluster_policies.iter().enumerate() {
        let earlier_policy = other.tier == policy.tier
            && other.priority < policy.priority
            && podset_covers(&other.subject, &policy.subject);
        let limit = if pj == pi {
            ri
        } else if earlier_policy {
            other.rules(direction).len()
        } else {
            continue;
        };
        if let Some(rj) = other.rules(direction)[..limit].iter().position(|c| cluster_rule_covers(c, rule)) {
            return Some((pj, rj));
        }
    }
    None
}

/// Whether some endpoint of the input (or, for address peers, some address) matches both.
fn peers_overlap(cluster: &Cluster, a: &ClusterPeer, b: &ClusterPeer) -> bool {
    let nets = |p: &ClusterPeer| match p {
        ClusterPeer::Networks(n) => Some(n.clone()),
        ClusterPeer::Everything => Some(vec!["0.0.0.0/0".parse().expect("valid"), "::/0".parse().expect("valid")]),
        _ => None,
    };
    if let (Some(x), Some(y)) = (nets(a), nets(b))
        && x.iter().any(|m| y.iter().any(|n| overlaps(m, n)))
    {
        return true;
    }
    let mut candidates: Vec<(Endpoint, IpAddr)> = Vec::new();
    for (i, pod) in cluster.pods.iter().enumerate() {
        candidates.extend(pod.ips.iter().map(|&ip| (Endpoint::Pod(i), ip)));
    }
    for node in cluster.nodes.iter() {
        candidates.extend(node.ips.iter().map(|&ip| (Endpoint::Ip(ip), ip)));
    }
    for ips in cluster.domains.values() {
        candidates.extend(ips.iter().map(|&ip| (Endpoint::Ip(ip), ip)));
    }
    candidates.iter().any(|&(e, ip)| cluster_peer_matches(cluster, a, e, ip) && cluster_peer_matches(cluster, b, e, ip))
}

fn port_specs_overlap(a: &Option<Vec<PortSpec>>, b: &Option<Vec<PortSpec>>) -> bool {
    let (Some(a), Some(b)) = (a, b) else { return true };
    a.iter().any(|x| {
        b.iter().any(|y| {
            x.protocol == y.protocol
                && match (&x.port, &y.port) {
                    (PortMatch::Any, _) | (_, PortMatch::Any) => true,
                    (PortMatch::Range(s, e), PortMatch::Range(u, v)) => s <= v && u <= e,
                    (PortMatch::Named(m), PortMatch::Named(n)) => m == n,
                    // A name against a number overlaps only on some pods: not certain here.
                    _ => false,
                }
        })
    })
}

/// "If two (or more) policies in the same tier with the same priority could match a
/// connection, then the implementation can apply any of the matching policies": rules of
/// such policies that both match some connection of the input with different actions.
fn ambiguous_priorities(cluster: &Cluster, out: &mut Vec<Finding>) {
    let policies = &cluster.cluster_policies;
    for (pi, a) in policies.iter().enumerate() {
        for b in policies.iter().skip(pi + 1) {
            if a.tier != b.tier || a.priority != b.priority {
                continue;
            }
            let (sa, sb) = (pods_of_subject(cluster, &a.subject), pods_of_subject(cluster, &b.subject));
            let shared: Vec<usize> = sa.iter().copied().filter(|i| sb.contains(i)).collect();
            if shared.is_empty() {
                continue;
            }
            for direction in [Direction::Ingress, Direction::Egress] {
                let (f, _) = field(direction);
                for (ri, x) in a.rules(direction).iter().enumerate() {
                    for (rj, y) in b.rules(direction).iter().enumerate() {
                        if x.action == y.action
                            || !port_specs_overlap(&x.ports, &y.ports)
                            || !x.peers.iter().any(|p| y.peers.iter().any(|q| peers_overlap(cluster, p, q)))
                        {
                            continue;
                        }
                        out.push(Finding {
                            code: "ambiguous-priority",
                            object: cp_name(b),
                            path: format!("spec.{f}[{rj}]"),
                            message: format!(
                                "{} ({}) and {} {} spec.{f}[{ri}] ({}) have the same priority {}, both apply to pods such as {} and match some of the same traffic: the API leaves which one wins to the implementation (netpol: name order, {} first)",
                                y.label(rj),
                                y.action,
                                a.id,
                                x.label(ri),
                                x.action,
                                a.priority,
                                cluster.pods[shared[0]].id,
                                a.id.name
                            ),
                        });
                    }
                }
            }
        }
    }
}

/// The JSON form: `{"findings": [{"code", "object", "path", "message"}], "count": N}`.
pub fn to_json(findings: &[Finding]) -> Value {
    json!({"count": findings.len(), "findings": findings.iter().map(Finding::to_json).collect::<Vec<_>>()})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cidr_inside_another_with_no_except_in_the_way_is_covered() {
        let block = |c: &str, e: &[&str]| {
            Peer::IpBlock(IpBlock { cidr: c.parse().unwrap(), except: e.iter().map(|x| x.parse().unwrap()).collect() })
        };
        assert!(peer_covers(&block("10.0.0.0/8", &[]), &block("10.1.0.0/16", &[])));
        assert!(!peer_covers(&block("10.0.0.0/8", &["10.1.2.0/24"]), &block("10.1.0.0/16", &[])));
        assert!(peer_covers(&block("10.0.0.0/8", &["10.1.2.0/24"]), &block("10.1.0.0/16", &["10.1.0.0/20"])));
        assert!(!peer_covers(&block("10.1.0.0/16", &[]), &block("10.0.0.0/8", &[])));
    }
}
