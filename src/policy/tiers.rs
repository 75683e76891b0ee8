//! The cluster-wide policy tiers: ClusterNetworkPolicy (`policy.networking.k8s.io`
//! v1beta1 and v1alpha2, `tier: Admin | Baseline`) and its predecessors, the v1alpha1
//! AdminNetworkPolicy and BaselineAdminNetworkPolicy, after conversion: one model for the
//! three kinds.
//!
//! ```text
//!  ClusterNetworkPolicy (Admin | Baseline) ─┐
//!  AdminNetworkPolicy (v1alpha1)           ─┼─► convert ──► ClusterPolicy { tier, priority, subject, rules }
//!  BaselineAdminNetworkPolicy (v1alpha1)   ─┘                    │
//!  Node (labels, status.addresses) ───────────► Node ────────────┤
//!  --resolve name=IP (CLI only) ──────────────► DomainMap ───────┴─► Cluster ─► evaluate / matrix / compile
//! ```
//!
//! From the API's documentation (`apis/v1beta1/clusternetworkpolicy_types.go`):
//! "Policy tiers are evaluated in the following order: Admin tier, NetworkPolicy tier,
//! Baseline tier." "Policies with lower priority values have higher precedence." "The
//! relative precedence of ingress rules within a single CNP object (all of which share the
//! priority) will be determined by the order in which the rule is written."
//!
//! "If two (or more) policies in the same tier with the same priority could match a
//! connection, then the implementation can apply any of the matching policies": netpol
//! applies them in name order, then kind order ([`ClusterPolicy::precedence`]), on every
//! engine, so the answer is always the same one.
//!
//! Everything here is validated and normalized: a peer of a newer API than we know (no
//! field set) has already been turned into what the API asks for ("fail closed", see
//! [`ClusterRule::fail_closed`]). Nothing in this module does I/O.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::policy::model::{Labels, Pod, PortSpec};
use crate::policy::selector::Selector;

/// "Policy tiers are evaluated in the following order: Admin tier, NetworkPolicy tier,
/// Baseline tier." Only the two cluster-wide tiers are policies of this module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    Admin,
    Baseline,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Admin => "Admin",
            Tier::Baseline => "Baseline",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The API kind a cluster policy was written as: it names the policy in every message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ClusterPolicyKind {
    /// `policy.networking.k8s.io/v1beta1` (or `v1alpha2`) ClusterNetworkPolicy.
    ClusterNetworkPolicy,
    /// `policy.networking.k8s.io/v1alpha1` AdminNetworkPolicy: the Admin tier.
    AdminNetworkPolicy,
    /// `policy.networking.k8s.io/v1alpha1` BaselineAdminNetworkPolicy: the Baseline tier,
    /// a singleton named `default`.
    BaselineAdminNetworkPolicy,
}

impl ClusterPolicyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ClusterPolicyKind::ClusterNetworkPolicy => "ClusterNetworkPolicy",
            ClusterPolicyKind::AdminNetworkPolicy => "AdminNetworkPolicy",
            ClusterPolicyKind::BaselineAdminNetworkPolicy => "BaselineAdminNetworkPolicy",
        }
    }
}

impl fmt::Display for ClusterPolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a matching rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    /// "Accepts the selected traffic ... No further ingress ClusterNetworkPolicy or
    /// NetworkPolicy rules will be processed" (egress: "but any ingress rules at the
    /// destination do apply"). v1alpha1's `Allow`.
    Accept,
    /// "Drops the selected traffic. No further ClusterNetworkPolicy or NetworkPolicy rules
    /// will be processed."
    Deny,
    /// "Skips all further ClusterNetworkPolicy rules in the current tier for the selected
    /// traffic, and passes evaluation to the next tier."
    Pass,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Accept => "Accept",
            Action::Deny => "Deny",
            Action::Pass => "Pass",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The identity of a cluster policy: its kind and name (cluster-scoped, no namespace).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClusterPolicyId {
    pub kind: ClusterPolicyKind,
    pub name: String,
}

impl fmt::Display for ClusterPolicyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.name)
    }
}

/// Pods by namespace labels AND pod labels (`NamespacedPod`, or `namespaces:` alone with
/// every pod of the namespaces). "Note that host-networked pods are not included."
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodSet {
    pub namespaces: Selector,
    pub pods: Selector,
}

impl PodSet {
    /// Whether `pod`, in a namespace labelled `namespace_labels`, is in this set.
    pub fn contains(&self, pod: &Pod, namespace_labels: Option<&Labels>) -> bool {
        !pod.host_network
            && self.pods.matches(&pod.labels)
            && namespace_labels.is_some_and(|labels| self.namespaces.matches(labels))
    }
}

impl fmt::Display for PodSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pods {} in namespaces {}", self.pods, self.namespaces)
    }
}

/// A cluster policy after defaulting and validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterPolicy {
    pub id: ClusterPolicyId,
    pub tier: Tier,
    /// "a value from 0 to 1000 indicating the precedence of the policy within its tier";
    /// 0 for a BaselineAdminNetworkPolicy (a singleton, no priority).
    pub priority: u16,
    /// "Subject defines the pods to which this ClusterNetworkPolicy applies."
    pub subject: PodSet,
    /// "CNPs with no ingress rules do not affect ingress traffic."
    pub ingress: Vec<ClusterRule>,
    pub egress: Vec<ClusterRule>,
}

impl ClusterPolicy {
    /// The order policies are checked in: tier, then "lower priority values have higher
    /// precedence", then (the API leaves equal priorities to the implementation) name and
    /// kind. Every engine sorts by this key.
    pub fn precedence(&self) -> (Tier, u16, &str, ClusterPolicyKind) {
        (self.tier, self.priority, &self.id.name, self.id.kind)
    }

    pub fn rules(&self, direction: crate::policy::model::Direction) -> &[ClusterRule] {
        match direction {
            crate::policy::model::Direction::Ingress => &self.ingress,
            crate::policy::model::Direction::Egress => &self.egress,
        }
    }

    /// Whether this policy applies to `pod` (in a namespace labelled `namespace_labels`)
    /// in `direction`: the pod is a subject and the policy has rules for the direction.
    pub fn governs(
        &self,
        pod: &Pod,
        namespace_labels: Option<&Labels>,
        direction: crate::policy::model::Direction,
    ) -> bool {
        !self.rules(direction).is_empty() && self.subject.contains(pod, namespace_labels)
    }

    /// "DENIED by ClusterNetworkPolicy tenant-isolation (Admin, priority 10)": the words
    /// that name this policy in verdicts.
    pub fn describe(&self) -> String {
        match self.id.kind {
            ClusterPolicyKind::BaselineAdminNetworkPolicy => format!("{} ({})", self.id, self.tier),
            _ => format!("{} ({}, priority {})", self.id, self.tier, self.priority),
        }
    }
}

/// One ingress or egress rule of a cluster policy: traffic matching any peer AND any
/// protocol entry gets the action.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterRule {
    /// "Name is an identifier for this rule ... to help improve observability."
    pub name: Option<String>,
    pub action: Action,
    /// "If any element matches the source of incoming traffic then the specified action is
    /// applied." Never empty in a written rule; empty after fail-closed normalization of an
    /// Accept rule (it matches nothing).
    pub peers: Vec<ClusterPeer>,
    /// `protocols` (v1alpha1: `ports`): "If unspecified, protocol-specific attributes will
    /// not be used to match traffic", so `None` is all traffic, ICMP included. A
    /// `destinationNamedPort` (no protocol of its own) becomes one named spec per protocol.
    pub ports: Option<Vec<PortSpec>>,
    /// Why this rule is not what was written, when it is not: "If an implementation sees no
    /// fields are set [in a peer] then it can infer that the deployed CRD is of an
    /// incompatible version with an unknown field. In that case it should fail closed. For
    /// 'Accept' rules, 'fail closed' means: 'treat the rule as matching no traffic'. For
    /// 'Deny' and 'Pass' rules, 'fail closed' means: 'treat the rule as a Deny all rule'."
    pub fail_closed: Option<String>,
}

impl ClusterRule {
    /// The rule as the API asks to enforce one with a peer we cannot read, for `action`.
    pub fn failed_closed(name: Option<String>, action: Action, why: String) -> Self {
        match action {
            Action::Accept => ClusterRule { name, action, peers: Vec::new(), ports: None, fail_closed: Some(why) },
            Action::Deny | Action::Pass => ClusterRule {
                name,
                action: Action::Deny,
                peers: vec![ClusterPeer::Everything],
                ports: None,
                fail_closed: Some(why),
            },
        }
    }

    /// `rule "name"` or `rule 3`: how messages name rule `index` of a policy.
    pub fn label(&self, index: usize) -> String {
        match &self.name {
            Some(name) => format!("rule {name:?}"),
            None => format!("rule {index}"),
        }
    }
}

/// One element of `from` / `to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterPeer {
    /// `namespaces` (every pod of the matching namespaces) or `pods`. Never a hostNetwork pod.
    Pods(PodSet),
    /// "selects the nodeIPs as the peer type by matching on the IPs present in the
    /// node.Status.Addresses field of the node" (egress only).
    Nodes(Selector),
    /// "cluster-internal traffic will be checked against the rule as well" (egress only):
    /// CIDRs match pod addresses too. Masked, as the API validates.
    Networks(Vec<IpNet>),
    /// "DomainNames is only supported for Accept rules" (egress only): matches the
    /// addresses the names resolve to in [`DomainMap`] (the CLI's `--resolve`); the agent
    /// knows none and the peer matches nothing there.
    DomainNames(Vec<String>),
    /// Every address: only made by fail-closed normalization (a Deny-all rule).
    Everything,
}

/// A node: its labels (for `nodes` peers) and its addresses (`status.addresses`, the IPs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub labels: Labels,
    pub ips: Vec<IpAddr>,
}

/// Domain name → the addresses it resolves to (lower case, no trailing dot).
pub type DomainMap = BTreeMap<String, Vec<IpAddr>>;

/// "'*', the wildcard specifier, matches one or more entire labels ... may only be
/// specified as a prefix": whether `pattern` (as written in `domainNames`) names `name`.
/// Case-insensitive, a trailing dot ignored (both are DNS's own rules).
pub fn domain_matches(pattern: &str, name: &str) -> bool {
    let normalize = |s: &str| s.trim_end_matches('.').to_ascii_lowercase();
    let (pattern, name) = (normalize(pattern), normalize(name));
    match pattern.strip_prefix("*.") {
        // "`*.kubernetes.io` matches subdomains of kubernetes.io ... however
        // `kubernetes.io` ... do[es] not."
        Some(parent) => name.strip_suffix(parent).is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        None => pattern == name,
    }
}

/// The addresses `patterns` resolve to in `domains`.
pub fn resolve<'d>(domains: &'d DomainMap, patterns: &'d [String]) -> impl Iterator<Item = IpAddr> + 'd {
    domains
        .iter()
        .filter(|(name, _)| patterns.iter().any(|p| domain_matches(p, name)))
        .flat_map(|(_, ips)| ips.iter().copied())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_domain_matches_subdomains_of_any_depth_but_not_the_parent() {
        // The API's own examples.
        assert!(domain_matches("kubernetes.io", "kubernetes.io"));
        assert!(!domain_matches("kubernetes.io", "www.kubernetes.io"));
        assert!(!domain_matches("kubernetes.io", "my-kubernetes.io"));
        assert!(domain_matches("blog.kubernetes.io", "blog.kubernetes.io"));
        assert!(!domain_matches("blog.kubernetes.io", "kubernetes.io"));
        assert!(domain_matches("*.kubernetes.io", "www.kubernetes.io"));
        assert!(domain_matches("*.kubernetes.io", "latest.blog.kubernetes.io"));
        assert!(!domain_matches("*.kubernetes.io", "kubernetes.io"));
        assert!(!domain_matches("*.kubernetes.io", "my-kubernetes.io"));
        assert!(!domain_matches("*.kubernetes.io", "wikipedia.org"));
        assert!(domain_matches("Example.COM.", "example.com"));
    }

    #[test]
    fn an_accept_rule_that_fails_closed_matches_nothing_and_a_pass_rule_denies_everything() {
        let accept = ClusterRule::failed_closed(None, Action::Accept, "peer 0 has no known field".into());
        assert!(accept.peers.is_empty());
        let pass = ClusterRule::failed_closed(Some("p".into()), Action::Pass, "peer 0 has no known field".into());
        assert_eq!(pass.action, Action::Deny);
        assert_eq!(pass.peers, [ClusterPeer::Everything]);
        assert_eq!(pass.ports, None);
    }
}
