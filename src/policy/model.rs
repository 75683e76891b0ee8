//! The domain model: our own small types for namespaces, pods and policies.
//!
//! ```text
//!  k8s-openapi objects ──► convert ──► model::{Namespace, Pod, Policy} ──► Cluster (sorted, indexed)
//!                                                                             │
//!                                                 evaluate / matrix / compile ◄┘
//! ```
//!
//! Everything here is already defaulted and validated: an invalid state cannot be
//! represented (a port is `1..=65535`, a range has `start <= end`, an `except` lies inside
//! its `cidr`). Nothing in this module does I/O.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::ops::Deref;
use std::sync::Arc;

use ipnet::IpNet;

use crate::policy::selector::Selector;
use crate::policy::tiers::{ClusterPolicy, DomainMap, Node};

/// Label key → value, sorted so that output and hashing are deterministic.
pub type Labels = BTreeMap<String, String>;

/// The label the API server puts on every namespace (since Kubernetes 1.21).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A layer-4 protocol that NetworkPolicy can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// The spelling Kubernetes uses (`TCP`, `UDP`, `SCTP`).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }

    /// The IANA protocol number, as nftables' `meta l4proto` sees it.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// Parses the Kubernetes spelling; case-insensitive for CLI convenience.
    pub fn parse(text: &str) -> Option<Protocol> {
        match text.to_ascii_uppercase().as_str() {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `namespace/name`, the identity of a namespaced object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectRef { namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

/// A port a container declares; named ones are what named policy ports resolve to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub id: ObjectRef,
    /// Shared: many pods carry the same label set (every replica of a workload), and the
    /// agent keeps one copy of each distinct set for the whole cluster.
    pub labels: Arc<Labels>,
    /// Shared like the labels: one allocation per node name.
    pub node: NodeName,
    /// The pod's IPs, primary first (at most one per family).
    pub ips: PodIps,
    /// hostNetwork pods share the node's IP: never policy targets, peers by ipBlock only.
    pub host_network: bool,
    /// Shared like the labels: the replicas of a workload declare the same ports.
    pub ports: Arc<[ContainerPort]>,
}

/// A node's name. Cheap to clone and shared between pods: the agent keeps one allocation
/// per node for the whole cluster. Compares with `String` and `str`, so `pod.node ==
/// config.node` reads as it did when it was a `String`.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeName(Arc<str>);

impl NodeName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Deref for NodeName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for NodeName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<Arc<str>> for NodeName {
    fn from(name: Arc<str>) -> Self {
        NodeName(name)
    }
}

impl From<&str> for NodeName {
    fn from(name: &str) -> Self {
        NodeName(name.into())
    }
}

impl From<String> for NodeName {
    fn from(name: String) -> Self {
        NodeName(name.into())
    }
}

impl From<NodeName> for Arc<str> {
    fn from(name: NodeName) -> Self {
        name.0
    }
}

impl From<NodeName> for String {
    fn from(name: NodeName) -> Self {
        name.0.to_string()
    }
}

impl PartialEq<str> for NodeName {
    fn eq(&self, other: &str) -> bool {
        *self.0 == *other
    }
}

impl PartialEq<&str> for NodeName {
    fn eq(&self, other: &&str) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<String> for NodeName {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<NodeName> for String {
    fn eq(&self, other: &NodeName) -> bool {
        **self == *other.0
    }
}

impl PartialEq<NodeName> for &str {
    fn eq(&self, other: &NodeName) -> bool {
        **self == *other.0
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl serde::Serialize for NodeName {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

/// A pod's IPs, primary first, held inline (no heap allocation per pod): "Pods may be
/// allocated at most 1 value for each of IPv4 and IPv6", so there are at most two.
#[derive(Clone)]
pub struct PodIps {
    slots: [IpAddr; 2],
    len: u8,
}

/// More IPs than a pod can have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooManyIps;

impl PodIps {
    pub const MAX: usize = 2;

    pub const fn new() -> Self {
        let unused = IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);
        PodIps { slots: [unused; 2], len: 0 }
    }

    /// Appends `ip`; fails when the pod already has [`PodIps::MAX`] addresses.
    pub fn push(&mut self, ip: IpAddr) -> Result<(), TooManyIps> {
        let slot = self.slots.get_mut(usize::from(self.len)).ok_or(TooManyIps)?;
        *slot = ip;
        self.len += 1;
        Ok(())
    }

    /// The addresses for which `keep` holds, in order.
    pub fn filtered(&self, mut keep: impl FnMut(&IpAddr) -> bool) -> PodIps {
        let mut out = PodIps::new();
        for ip in self.iter().filter(|ip| keep(ip)) {
            out.push(*ip).expect("a subset fits");
        }
        out
    }
}

impl Default for PodIps {
    fn default() -> Self {
        PodIps::new()
    }
}

impl Deref for PodIps {
    type Target = [IpAddr];
    fn deref(&self) -> &[IpAddr] {
        &self.slots[..usize::from(self.len)]
    }
}

impl<'a> IntoIterator for &'a PodIps {
    type Item = &'a IpAddr;
    type IntoIter = std::slice::Iter<'a, IpAddr>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl From<IpAddr> for PodIps {
    fn from(ip: IpAddr) -> Self {
        let mut ips = PodIps::new();
        ips.slots[0] = ip;
        ips.len = 1;
        ips
    }
}

impl TryFrom<&[IpAddr]> for PodIps {
    type Error = TooManyIps;
    fn try_from(list: &[IpAddr]) -> Result<Self, TooManyIps> {
        let mut ips = PodIps::new();
        for ip in list {
            ips.push(*ip)?;
        }
        Ok(ips)
    }
}

impl TryFrom<Vec<IpAddr>> for PodIps {
    type Error = TooManyIps;
    fn try_from(list: Vec<IpAddr>) -> Result<Self, TooManyIps> {
        PodIps::try_from(list.as_slice())
    }
}

impl PartialEq for PodIps {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for PodIps {}

impl Hash for PodIps {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (**self).hash(state)
    }
}

impl fmt::Debug for PodIps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl Pod {
    /// The pod's IP of the same family as `like`, if it has one.
    pub fn ip_of_family(&self, ipv6: bool) -> Option<IpAddr> {
        self.ips.iter().copied().find(|ip| ip.is_ipv6() == ipv6)
    }

    /// Resolves a named port on this pod: "a named port ... is resolved on the destination
    /// pod's containerPorts (name + protocol)".
    pub fn resolve_named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.ports.iter().find(|p| p.protocol == protocol && p.name.as_deref() == Some(name)).map(|p| p.port)
    }
}

/// Which way traffic flows relative to the selected pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "Ingress",
            Direction::Egress => "Egress",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A NetworkPolicy after defaulting and validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub id: ObjectRef,
    pub pod_selector: Selector,
    /// `Some` iff `policyTypes` contains `Ingress`; an empty list denies all ingress.
    pub ingress: Option<Vec<Rule>>,
    /// `Some` iff `policyTypes` contains `Egress`; an empty list denies all egress.
    pub egress: Option<Vec<Rule>>,
    /// Why this policy is enforced fail-closed, when it is: the object could not be
    /// converted (see `convert::policy_fail_closed`), so it keeps isolating what it selects
    /// for the directions it names, and allows nothing (its rule lists are empty).
    pub quarantined: Option<String>,
}

impl Policy {
    /// "A pod is isolated for a direction iff some policy in its namespace selects it and
    /// lists that direction." hostNetwork pods are never selected.
    pub fn isolates(&self, pod: &Pod, direction: Direction) -> bool {
        self.id.namespace == pod.id.namespace
            && !pod.host_network
            && self.rules(direction).is_some()
            && self.pod_selector.matches(&pod.labels)
    }

    pub fn rules(&self, direction: Direction) -> Option<&[Rule]> {
        match direction {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }
}

/// One entry of `ingress` or `egress`: traffic matching any peer AND any port is allowed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// "If this field is empty or missing, this rule matches all sources/destinations."
    pub peers: Option<Vec<Peer>>,
    /// "If this field is empty or missing, this rule matches all ports."
    pub ports: Option<Vec<PortSpec>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// podSelector and/or namespaceSelector.
    Pods {
        namespaces: NamespaceScope,
        pods: Selector,
    },
    IpBlock(IpBlock),
}

/// Where a pod peer's pods may live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NamespaceScope {
    /// No namespaceSelector: "selects the pods matching podSelector in the policy's own namespace".
    PolicyNamespace,
    /// A namespaceSelector; `{}` selects all namespaces.
    Matching(Selector),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpBlock {
    pub cidr: IpNet,
    /// Each a strict subset of `cidr`, same family.
    pub except: Vec<IpNet>,
}

impl IpBlock {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.cidr.contains(&ip) && !self.except.iter().any(|e| e.contains(&ip))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortSpec {
    pub protocol: Protocol,
    pub port: PortMatch,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortMatch {
    /// No `port`: every port of the protocol.
    Any,
    /// `port`, or `port`..=`endPort`; `start <= end`.
    Range(u16, u16),
    /// A named port, resolved on the destination pod.
    Named(String),
}

impl PortSpec {
    /// Does this spec admit `protocol`/`port` towards `destination` (a pod, or an outside IP)?
    pub fn matches(&self, protocol: Protocol, port: u16, destination: Option<&Pod>) -> bool {
        if self.protocol != protocol {
            return false;
        }
        match &self.port {
            PortMatch::Any => true,
            PortMatch::Range(start, end) => (*start..=*end).contains(&port),
            // "A named port never matches a non-pod destination."
            PortMatch::Named(name) => destination
                .and_then(|pod| pod.resolve_named_port(name, protocol))
                .is_some_and(|resolved| resolved == port),
        }
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.port {
            PortMatch::Any => write!(f, "{} any port", self.protocol),
            PortMatch::Range(a, b) if a == b => write!(f, "{}/{}", self.protocol, a),
            PortMatch::Range(a, b) => write!(f, "{}/{}-{}", self.protocol, a, b),
            PortMatch::Named(n) => write!(f, "{}/{} (named)", self.protocol, n),
        }
    }
}

/// A whole cluster state: namespaces by name, pods and policies sorted by namespace/name.
///
/// The three collections are shared (copied on write): the agent builds a cluster from
/// its stores' lists without copying them, and keeps the previous one for the next
/// sync's comparison at the cost of three reference counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cluster {
    pub namespaces: Arc<NamespaceMap>,
    pub pods: SharedList<Pod>,
    pub policies: SharedList<Policy>,
    /// The cluster-wide tiers' policies, in [`ClusterPolicy::precedence`] order.
    pub cluster_policies: SharedList<ClusterPolicy>,
    /// The nodes, by name: what `nodes` peers select.
    pub nodes: Arc<Vec<Node>>,
    /// What domain names resolve to, for `domainNames` peers (the CLI's `--resolve`).
    pub domains: Arc<DomainMap>,
}

impl Cluster {
    /// Builds a cluster, sorting pods and policies and synthesizing any namespace that a pod
    /// or policy names but that was not declared (with its `kubernetes.io/metadata.name`
    /// label, as the API server would have set it).
    pub fn new<P: Into<Arc<Pod>>, Q: Into<Arc<Policy>>>(
        namespaces: Vec<Namespace>,
        pods: impl IntoIterator<Item = P>,
        policies: impl IntoIterator<Item = Q>,
    ) -> Self {
        let mut pods: Vec<Arc<Pod>> = pods.into_iter().map(Into::into).collect();
        let mut policies: Vec<Arc<Policy>> = policies.into_iter().map(Into::into).collect();
        pods.sort_by(|a, b| a.id.cmp(&b.id));
        policies.sort_by(|a, b| a.id.cmp(&b.id));
        Cluster::from_sorted(Arc::new(namespace_map(namespaces)), Arc::new(pods), Arc::new(policies))
    }

    /// [`Cluster::new`] of a [`namespace_map`] and of pods and policies already sorted by
    /// namespace and name (the agent's stores keep them so), taken as they are: a sync
    /// neither copies nor sorts 10 000 pods. The map is copied only if a pod or policy
    /// names a namespace it lacks.
    pub fn from_sorted(mut namespaces: Arc<NamespaceMap>, pods: SharedList<Pod>, policies: SharedList<Policy>) -> Self {
        debug_assert!(pods.is_sorted_by(|a, b| a.id <= b.id) && policies.is_sorted_by(|a, b| a.id <= b.id));
        let missing: Vec<&String> = distinct_namespaces(&pods, |p| &p.id.namespace)
            .chain(distinct_namespaces(&policies, |p| &p.id.namespace))
            .filter(|name| !namespaces.contains_key(*name))
            .collect();
        if !missing.is_empty() {
            let by_name = Arc::make_mut(&mut namespaces);
            for name in missing {
                by_name.entry(name.clone()).or_insert_with(|| Namespace::synthesized(name));
            }
        }
        Cluster { namespaces, pods, policies, ..Cluster::default() }
    }

    /// This cluster with the cluster-wide tiers' policies (any order), its nodes and its
    /// resolved domain names.
    pub fn with_tiers<Q: Into<Arc<ClusterPolicy>>>(
        mut self,
        cluster_policies: impl IntoIterator<Item = Q>,
        nodes: Vec<Node>,
        domains: DomainMap,
    ) -> Self {
        let mut cluster_policies: Vec<Arc<ClusterPolicy>> = cluster_policies.into_iter().map(Into::into).collect();
        cluster_policies.sort_by(|a, b| a.precedence().cmp(&b.precedence()));
        let mut nodes = nodes;
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        self.cluster_policies = Arc::new(cluster_policies);
        self.nodes = Arc::new(nodes);
        self.domains = Arc::new(domains);
        self
    }

    /// [`Cluster::with_tiers`] of lists already in [`ClusterPolicy::precedence`] and name
    /// order, taken as they are (the agent's stores keep them so): nothing is sorted or
    /// copied, and clusters built from the same lists share them.
    pub fn with_sorted_tiers(
        mut self,
        cluster_policies: SharedList<ClusterPolicy>,
        nodes: Arc<Vec<Node>>,
        domains: Arc<DomainMap>,
    ) -> Self {
        debug_assert!(cluster_policies.is_sorted_by(|a, b| a.precedence() <= b.precedence()));
        debug_assert!(nodes.is_sorted_by(|a, b| a.name <= b.name));
        self.cluster_policies = cluster_policies;
        self.nodes = nodes;
        self.domains = domains;
        self
    }

    /// Whether any cluster-wide policy exists: without one, the tiers are NetworkPolicy alone.
    pub fn has_tiers(&self) -> bool {
        !self.cluster_policies.is_empty()
    }

    /// [`Cluster::from_sorted`], knowing the cluster built before from the same namespace
    /// map (`previous`): when that one needed no synthesized namespace, only the pods and
    /// policies added since can name a missing one. Every sync builds a cluster; this one
    /// looks at the few objects that changed, where `from_sorted` compares the namespace
    /// names of 10 000 pods behind their pointers (8 % of the agent's CPU).
    pub fn from_sorted_after(
        previous: Option<&Cluster>,
        namespaces: Arc<NamespaceMap>,
        pods: SharedList<Pod>,
        policies: SharedList<Policy>,
    ) -> Self {
        /// More changes than this and the whole check is as cheap.
        const LIMIT: usize = 256;
        if let Some(previous) = previous
            && Arc::ptr_eq(&previous.namespaces, &namespaces)
        {
            // Whether the objects added to `old` to make `new` all name known namespaces.
            fn added_are_known<T: PartialEq>(
                old: &[Arc<T>],
                new: &[Arc<T>],
                id: impl Fn(&T) -> &ObjectRef,
                namespaces: &NamespaceMap,
            ) -> bool {
                changed_items(old, new, &id, LIMIT).is_some_and(|changed| {
                    changed.iter().filter_map(|&(_, j)| j).all(|j| namespaces.contains_key(&id(&new[j]).namespace))
                })
            }
            if added_are_known(&previous.pods, &pods, |p| &p.id, &namespaces)
                && added_are_known(&previous.policies, &policies, |p| &p.id, &namespaces)
            {
                return Cluster { namespaces, pods, policies, ..Cluster::default() };
            }
        }
        Cluster::from_sorted(namespaces, pods, policies)
    }

    pub fn pod_index(&self, id: &ObjectRef) -> Option<usize> {
        self.pods.binary_search_by(|p| p.id.cmp(id)).ok()
    }

    /// Indices of the policies that isolate pod `pod` for `direction`.
    pub fn isolating_policies(&self, pod: usize, direction: Direction) -> Vec<usize> {
        let pod = &self.pods[pod];
        self.policies.iter().enumerate().filter(|(_, p)| p.isolates(pod, direction)).map(|(i, _)| i).collect()
    }

    pub fn namespace_labels(&self, namespace: &str) -> Option<&Labels> {
        self.namespaces.get(namespace).map(|ns| &ns.labels)
    }

    /// The pod (not hostNetwork) that owns `ip`, if any.
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<usize> {
        self.pods.iter().position(|p| !p.host_network && p.ips.contains(&ip))
    }

    /// Every node that runs at least one pod, sorted.
    pub fn nodes(&self) -> Vec<String> {
        let mut nodes: Vec<String> = self.pods.iter().map(|p| p.node.to_string()).collect();
        nodes.sort();
        nodes.dedup();
        nodes
    }
}

/// A list shared between snapshots and copied on write.
pub type SharedList<T> = Arc<Vec<Arc<T>>>;

/// The items that differ between two lists sorted by `id`, as (index in `old`, index in
/// `new`), `None` where absent; `None` when more than `limit` differ.
pub(crate) fn changed_items<T: PartialEq>(
    old: &[Arc<T>],
    new: &[Arc<T>],
    id: impl Fn(&T) -> &ObjectRef,
    limit: usize,
) -> Option<Vec<(Option<usize>, Option<usize>)>> {
    use std::cmp::Ordering;
    let mut changed = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < old.len() || j < new.len() {
        // Snapshots share the objects that did not change: the common case costs no
        // comparison of names.
        if let (Some(a), Some(b)) = (old.get(i), new.get(j))
            && Arc::ptr_eq(a, b)
        {
            i += 1;
            j += 1;
            continue;
        }
        let order = match (old.get(i), new.get(j)) {
            (Some(a), Some(b)) => id(a).cmp(id(b)),
            (Some(_), None) => Ordering::Less,
            _ => Ordering::Greater,
        };
        match order {
            Ordering::Equal => {
                // A relist brings equal objects in new allocations.
                if old[i] != new[j] {
                    changed.push((Some(i), Some(j)));
                }
                i += 1;
                j += 1;
            }
            Ordering::Less => {
                changed.push((Some(i), None));
                i += 1;
            }
            Ordering::Greater => {
                changed.push((None, Some(j)));
                j += 1;
            }
        }
        if changed.len() > limit {
            return None;
        }
    }
    Some(changed)
}

/// Namespaces by name, as a [`Cluster`] holds them.
pub type NamespaceMap = BTreeMap<String, Namespace>;

/// Namespaces by name, each with its `kubernetes.io/metadata.name` label (the API server
/// sets it on every namespace; declared ones in files may lack it).
pub fn namespace_map(namespaces: impl IntoIterator<Item = Namespace>) -> NamespaceMap {
    namespaces
        .into_iter()
        .map(|mut ns| {
            ns.labels.entry(NAMESPACE_NAME_LABEL.to_string()).or_insert_with(|| ns.name.clone());
            (ns.name.clone(), ns)
        })
        .collect()
}

/// The namespaces of a list sorted by namespace, each once: a binary search jumps over
/// each namespace's items instead of comparing every item's namespace.
fn distinct_namespaces<T>(items: &[T], namespace_of: impl Fn(&T) -> &String) -> impl Iterator<Item = &String> {
    let mut start = 0;
    std::iter::from_fn(move || {
        let first = namespace_of(items.get(start)?);
        let run = items[start..].partition_point(|x| namespace_of(x) == first);
        start += run;
        Some(namespace_of(&items[start - run]))
    })
}

impl Namespace {
    pub fn synthesized(name: &str) -> Self {
        Namespace {
            name: name.to_string(),
            labels: Labels::from([(NAMESPACE_NAME_LABEL.to_string(), name.to_string())]),
        }
    }
}

/// A pod for unit tests: on node `node-a` at 192.0.2.1, with `labels` and no ports.
#[cfg(test)]
pub(crate) fn test_pod(namespace: &str, name: &str, labels: &[(&str, &str)]) -> Arc<Pod> {
    Arc::new(Pod {
        id: ObjectRef::new(namespace, name),
        labels: Arc::new(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
        node: NodeName::from("node-a"),
        ips: PodIps::from(IpAddr::from([192, 0, 2, 1])),
        host_network: false,
        ports: Arc::from(Vec::new()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn pod_ips_hold_two_addresses_inline_and_refuse_a_third() {
        let mut ips = PodIps::from(ip("192.0.2.1"));
        ips.push(ip("2001:db8::1")).unwrap();
        assert_eq!(*ips, [ip("192.0.2.1"), ip("2001:db8::1")]);
        assert_eq!(ips.push(ip("192.0.2.2")), Err(TooManyIps));
        assert_eq!(ips.len(), 2);
        assert_eq!(ips.filtered(|a| a.is_ipv6()), PodIps::from(ip("2001:db8::1")));
        assert!(PodIps::try_from(vec![ip("192.0.2.1"), ip("192.0.2.2"), ip("192.0.2.3")]).is_err());
    }

    #[test]
    fn pod_ips_compare_by_their_addresses_only() {
        // A slot once used and dropped by `filtered` leaves nothing behind to compare.
        let both = PodIps::try_from(vec![ip("192.0.2.9"), ip("2001:db8::1")]).unwrap();
        assert_eq!(both.filtered(|a| a.is_ipv6()), PodIps::from(ip("2001:db8::1")));
        assert_ne!(PodIps::new(), PodIps::from(ip("0.0.0.0")));
    }

    #[test]
    fn a_cluster_built_after_another_synthesizes_the_namespaces_its_new_pods_name() {
        let mut rng = crate::cli::generate::Rng::new(11);
        let declared = Arc::new(namespace_map([Namespace::synthesized("a"), Namespace::synthesized("b")]));
        // Pods of namespaces a, b (declared) and c (not), sorted by namespace and name.
        let pods = |rng: &mut crate::cli::generate::Rng, shared: &[Arc<Pod>]| -> SharedList<Pod> {
            let mut out: Vec<Arc<Pod>> = shared.iter().filter(|_| rng.chance(80)).cloned().collect();
            for k in 0..rng.below(3) {
                let ns = if rng.chance(20) { "c" } else { *rng.pick(&["a", "b"]) };
                out.push(test_pod(ns, &format!("new-{k}-{}", rng.below(1000)), &[]));
            }
            out.sort_by(|x, y| x.id.cmp(&y.id));
            out.dedup_by(|x, y| x.id == y.id);
            Arc::new(out)
        };
        let mut previous = Cluster::from_sorted(Arc::clone(&declared), pods(&mut rng, &[]), Arc::new(Vec::new()));
        let mut reused = 0;
        for step in 0..300 {
            let next = pods(&mut rng, &previous.pods);
            let after = Cluster::from_sorted_after(
                Some(&previous),
                Arc::clone(&declared),
                Arc::clone(&next),
                Arc::new(Vec::new()),
            );
            let whole = Cluster::from_sorted(Arc::clone(&declared), next, Arc::new(Vec::new()));
            assert_eq!(after, whole, "step {step}");
            reused += usize::from(Arc::ptr_eq(&after.namespaces, &declared));
            previous = after;
        }
        assert!(reused > 50, "too few steps without a pod of c to mean anything: {reused}");
    }

    #[test]
    fn node_names_compare_with_strings_both_ways() {
        let node = NodeName::from("node-a");
        let owned = String::from("node-a");
        assert!(node == "node-a" && node == *"node-a" && node == owned);
        assert!(owned == node && "node-a" == node);
        assert!(node != "node-b");
        assert_eq!(node.to_string(), "node-a");
        assert_eq!(format!("{node:?}"), "\"node-a\"");
    }
}
