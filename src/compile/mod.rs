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
//!  pod_{eg,in}_<pod>: ct state invalid drop; jump pol_{eg,in}_<policy> for each policy
//!                     selecting it; counter drop
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
//! Two entry points: [`compile`] (one cluster, from nothing) and [`IncrementalCompiler`]
//! (the agent: one cluster after another, reusing the pod-address sets no changed pod can be
//! in, and always equal to `compile`, up to the idle sets it may be asked to keep).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::nft::diff::{SetDelta, SetDeltas};
use crate::nft::ir::{
    AddrField, BaseChain, Chain, ChainPolicy, CtState, Element, Hook, ICMPV6_ND_TYPES, IpFamily, Key, KeyType, Map,
    MapVerdict, Match, ND_HOP_LIMIT, Rule, Ruleset, Set, Value, Verdict,
};
use crate::nft::names;
use crate::policy::model::{
    Cluster, Direction, IpBlock, NamespaceScope, Peer, Pod, PortMatch, Protocol, Rule as PolicyRule,
};
use crate::policy::selector::{Operator, Selector};

/// Which node to compile for, and the table to own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    pub node: String,
    pub table: String,
    /// The node's pod CIDRs (its `spec.podCIDRs`, or the agent's `--pod-cidr`): an address
    /// inside them that is no known local pod of this node is dropped both ways (the
    /// unknown-pod guard). Empty: no guard.
    pub pod_cidrs: Vec<IpNet>,
}

impl NodeConfig {
    /// `node`, with the default table name `netpol` and no pod CIDRs (no unknown-pod guard).
    pub fn new(node: impl Into<String>) -> Self {
        NodeConfig { node: node.into(), table: names::DEFAULT_TABLE.to_string(), pod_cidrs: Vec::new() }
    }
}

const FAMILIES: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

/// Compiles the ruleset of one node.
pub fn compile(cluster: &Cluster, config: &NodeConfig) -> Ruleset {
    Compiler::new(cluster, config, &mut SetCache::default()).run(local_pods(cluster, &config.node))
}

/// "hostNetwork pods are not selectable as policy targets"; pods without an IP take no part.
fn is_local(pod: &Pod, node: &str) -> bool {
    *pod.node == *node && !pod.host_network && !pod.ips.is_empty()
}

/// Indices (ascending) of the pods of `node` that policies may select.
fn local_pods(cluster: &Cluster, node: &str) -> Vec<usize> {
    (0..cluster.pods.len()).filter(|&i| is_local(&cluster.pods[i], node)).collect()
}

/// Compiles one node's ruleset again and again, as the cluster changes, for the agent.
///
/// ```text
///  cluster_n ──► changed pods (cluster_{n-1} vs cluster_n) ──► patch the cached sets they
///      │                                                      were or become members of
///      │                                                      (in place if ruleset_{n-1}
///      │                                                      lets go of them; SetDeltas kept)
///      └──────► compile with the cache ──► ruleset_n (== compile(cluster_n), always,
///                 │                              plus idle sets if asked to keep them)
///                 │ an untouched cached set or chain is reused: the same Arc as in ruleset_{n-1}
/// ```
///
/// Still a compile of the whole snapshot, never of event deltas: what it reuses are the
/// pod-address sets (peers, named ports) that no pod differing between the two snapshots
/// can be a member of, before or after. Those sets are most of a node's ruleset at scale
/// (every pod of the cluster can be a peer) while the rest (chains, dispatch maps) only
/// grows with the node's own pods. Reused sets are the same allocations as in the previous
/// ruleset, which is what lets [`crate::nft::diff`] skip them without reading elements.
#[derive(Debug)]
pub struct IncrementalCompiler {
    config: NodeConfig,
    /// The cluster the cache reflects.
    last: Option<Cluster>,
    /// The cluster before `last`, until [`IncrementalCompiler::release_retired`].
    retired: Option<Cluster>,
    /// Indices (ascending) of `last`'s pods on this node that policies may select.
    local: Vec<usize>,
    /// How many of `last`'s pods carry each address.
    addresses: AddressCounts,
    cache: SetCache,
    /// Elements per cluster pod that idle sets may hold (see
    /// [`IncrementalCompiler::keeping_idle_sets`]); 0: none are kept.
    idle_elements_per_pod: usize,
    /// The idle sets the last compile kept, and their elements.
    idle: (usize, usize),
}

/// More changed pods than this and checking each cached set against each is no longer
/// cheaper than rebuilding the sets.
const MAX_TRACKED_POD_CHANGES: usize = 256;

impl IncrementalCompiler {
    pub fn new(config: NodeConfig) -> Self {
        IncrementalCompiler {
            config,
            last: None,
            retired: None,
            local: Vec::new(),
            addresses: AddressCounts::default(),
            cache: SetCache::default(),
            idle_elements_per_pod: 0,
            idle: (0, 0),
        }
    }

    /// Also keeps *idle* sets: peer and egress named-port sets that no chain looks up any
    /// more stay in the result (unreferenced, so they decide no packet) and up to date, the
    /// most recently used first, while they hold at most `elements_per_pod` elements per
    /// pod of the cluster in all.
    ///
    /// Why: when a policy stops selecting the node's last pod, its chain goes and with it
    /// the peer sets only it looked up, which may hold thousands of addresses (a peer of all
    /// namespaces). When a new pod on the node brings the policy back, those sets would be
    /// built and sent to the kernel again, element by element: tens of milliseconds in
    /// which every other event waits. A kept set is already there, patched like any other.
    /// The bound keeps the memory this costs a fixed share of what the cluster's pods cost.
    pub fn keeping_idle_sets(mut self, elements_per_pod: usize) -> Self {
        self.idle_elements_per_pod = elements_per_pod;
        self
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// The cluster of the last compile, unless forgotten since.
    pub fn last_cluster(&self) -> Option<&Cluster> {
        self.last.as_ref()
    }

    /// The ruleset of this node for `cluster`: equal to [`compile`]`(cluster, config)`.
    pub fn compile(&mut self, cluster: &Cluster) -> Ruleset {
        self.compile_after(cluster, None)
    }

    /// [`IncrementalCompiler::compile`] of the node whose kernel holds `applied` (the last
    /// result, as nft accepted it): the sets it patches are patched in place rather than
    /// copied, and `applied` is left fit only for
    /// [`crate::nft::diff::diff_with`]`(applied, result, `[`IncrementalCompiler::take_set_deltas`]`)`
    /// (its patched sets are stand-ins without elements).
    pub fn compile_after(&mut self, cluster: &Cluster, applied: Option<&mut Ruleset>) -> Ruleset {
        self.cache.deltas.clear();
        let changed =
            self.last.as_ref().and_then(|last| changed_pods(&last.pods, &cluster.pods, MAX_TRACKED_POD_CHANGES));
        match (&self.last, &changed) {
            (Some(last), Some(changed)) => {
                self.addresses.update(last, cluster, changed);
                // Namespace labels decide which namespaces a peer set spans: any change there
                // and nothing cached is trusted (namespaces change rarely).
                if last.namespaces == cluster.namespaces {
                    self.cache.patch(&PodChanges::new(last, cluster, changed, &self.addresses), applied);
                } else {
                    self.cache.clear();
                }
            }
            _ => {
                self.addresses = AddressCounts::of(cluster);
                self.cache.clear();
            }
        }
        let local = match &changed {
            // The local pods of the last compile, where they are now, and the changed pods that
            // are local: no walk over every pod of the cluster.
            Some(changed) => {
                let node = self.config.node.as_str();
                let mut local = unchanged_indices(&self.local, changed);
                local.extend(changed.iter().filter_map(|&(_, j)| j).filter(|&j| is_local(&cluster.pods[j], node)));
                local.sort_unstable();
                local.dedup();
                local
            }
            None => local_pods(cluster, &self.config.node),
        };
        self.local.clone_from(&local);
        self.cache.generation += 1;
        let mut ruleset = Compiler::new(cluster, &self.config, &mut self.cache).run(local);
        let idle_budget = self.idle_elements_per_pod.saturating_mul(cluster.pods.len());
        let idle = self.cache.keep_used_and_idle(idle_budget);
        self.idle = (idle.len(), idle.iter().map(|(_, set)| set.elements.len()).sum());
        for (name, set) in idle {
            ruleset.sets.entry(name).or_insert(set);
        }
        // The cluster's lists are shared: keeping it costs three reference counts. The one
        // it replaces may hold the last references to 10 000 pods: released later, off the
        // path from an event to its commit.
        self.retired = self.last.replace(cluster.clone());
        ruleset
    }

    /// How many idle sets the last compile kept (see
    /// [`IncrementalCompiler::keeping_idle_sets`]), and their elements.
    pub fn idle_sets(&self) -> (usize, usize) {
        self.idle
    }

    /// Forgets every earlier compile: the next one builds everything afresh (a full sync
    /// trusts nothing it remembers, not even after a compile that panicked halfway).
    pub fn forget(&mut self) {
        *self = IncrementalCompiler::new(self.config.clone()).keeping_idle_sets(self.idle_elements_per_pod);
    }

    /// Frees what the last compile let go of (the cluster before it), once its result is
    /// applied.
    pub fn release_retired(&mut self) {
        self.retired = None;
    }

    /// How the last [`IncrementalCompiler::compile`] changed the sets it patched, for
    /// [`crate::nft::diff::diff_with`] against the ruleset before it (taken: they hold the
    /// sets' earlier versions alive).
    pub fn take_set_deltas(&mut self) -> SetDeltas {
        std::mem::take(&mut self.cache.deltas)
    }
}

/// The pods that differ between two clusters (both sorted by namespace and name), as
/// (index in the old cluster, index in the new one); `None` where absent.
type ChangedPod = (Option<usize>, Option<usize>);

/// The changed pods of two clusters' sorted pod lists, or `None` when more than `limit` differ.
fn changed_pods(old: &[Arc<Pod>], new: &[Arc<Pod>], limit: usize) -> Option<Vec<ChangedPod>> {
    crate::policy::model::changed_items(old, new, |p| &p.id, limit)
}

/// Where the pods at `old` (ascending indices in the old cluster) are in the new one, for
/// those that did not change, given the `changed` pods: each moves by the pods added
/// minus the pods removed before it. No pod is read (a search by name would compare
/// strings behind a pointer per step, for each of the node's pods, on every sync).
fn unchanged_indices(old: &[usize], changed: &[ChangedPod]) -> Vec<usize> {
    let mut out = Vec::with_capacity(old.len());
    let (mut next, mut added, mut removed) = (0, 0, 0);
    for &i in old {
        // The changed pods before pod i, in the two clusters' common (name) order: a pod of
        // the old cluster is before it if its old index is lower; an added one, at new index
        // k = (old pods before it) + added - removed (the changes before it, all counted by
        // now), is if fewer than i + 1 old pods are before it.
        while let Some(&(old_index, new_index)) = changed.get(next) {
            match (old_index, new_index) {
                (Some(k), _) if k < i => removed += usize::from(new_index.is_none()),
                (None, Some(k)) if k <= i + added - removed => added += 1,
                _ => break,
            }
            next += 1;
        }
        if changed.get(next).is_some_and(|&(k, _)| k == Some(i)) {
            continue; // changed or gone: the changed pods' new versions are looked at apart
        }
        out.push(i + added - removed);
    }
    out
}

/// How many pods carry each address, kept in step with the compiler's clusters.
#[derive(Debug, Default)]
struct AddressCounts(HashMap<IpAddr, u32>);

impl AddressCounts {
    fn of(cluster: &Cluster) -> Self {
        let mut counts = AddressCounts::default();
        for pod in cluster.pods.iter() {
            counts.add(pod);
        }
        counts
    }

    /// From `old`'s counts to `new`'s, given the pods that differ.
    fn update(&mut self, old: &Cluster, new: &Cluster, changed: &[ChangedPod]) {
        for &(i, j) in changed {
            if let Some(i) = i {
                self.remove(&old.pods[i]);
            }
            if let Some(j) = j {
                self.add(&new.pods[j]);
            }
        }
    }

    fn add(&mut self, pod: &Pod) {
        for ip in &pod.ips {
            *self.0.entry(*ip).or_default() += 1;
        }
    }

    fn remove(&mut self, pod: &Pod) {
        for ip in &pod.ips {
            if let std::collections::hash_map::Entry::Occupied(mut count) = self.0.entry(*ip) {
                *count.get_mut() -= 1;
                if *count.get() == 0 {
                    count.remove();
                }
            }
        }
    }

    fn count(&self, ip: IpAddr) -> usize {
        self.0.get(&ip).map_or(0, |&n| n as usize)
    }
}

/// Two clusters with the same namespaces, and the pods that differ between them.
struct PodChanges<'p> {
    old: &'p Cluster,
    new: &'p Cluster,
    changed: &'p [ChangedPod],
    /// For every address a changed pod had (sorted): the new cluster's pods that have it.
    holders: Vec<(IpAddr, Vec<usize>)>,
}

impl<'p> PodChanges<'p> {
    /// `addresses`: how many pods of `new` carry each address.
    fn new(old: &'p Cluster, new: &'p Cluster, changed: &'p [ChangedPod], addresses: &AddressCounts) -> Self {
        let mut holders: Vec<(IpAddr, Vec<usize>)> = changed
            .iter()
            .filter_map(|(i, _)| *i)
            .flat_map(|i| old.pods[i].ips.iter().map(|ip| (*ip, Vec::new())))
            .collect();
        holders.sort_unstable_by_key(|(ip, _)| *ip);
        holders.dedup_by_key(|(ip, _)| *ip);
        // The changed pods' new versions are known; only an address that some unchanged pod
        // carries too (an IP reused while its old pod is still listed) takes a walk over
        // the cluster: a binary search per address, no hashing.
        let mut unchanged_holders = false;
        for (ip, pods) in &mut holders {
            pods.extend(changed.iter().filter_map(|(_, j)| *j).filter(|&j| new.pods[j].ips.contains(ip)));
            unchanged_holders |= addresses.count(*ip) > pods.len();
        }
        if unchanged_holders {
            for pods in holders.iter_mut().map(|(_, pods)| pods) {
                pods.clear();
            }
            for (j, pod) in new.pods.iter().enumerate() {
                for ip in &pod.ips {
                    if let Ok(k) = holders.binary_search_by_key(ip, |(h, _)| *h) {
                        holders[k].1.push(j);
                    }
                }
            }
        }
        PodChanges { old, new, changed, holders }
    }

    /// How `set` changes from the old cluster to the new one, given that it held exactly
    /// what the pods of the old one contribute, where `contribution(cluster, pod index)` are
    /// the elements one pod brings to it: the elements gone and added. `None`: no changed pod
    /// brings or takes anything, `set` stands.
    fn element_changes(
        &self,
        set: &Set,
        contribution: impl Fn(&Cluster, usize) -> Vec<Element>,
    ) -> Option<(BTreeSet<Element>, BTreeSet<Element>)> {
        let mut gone = BTreeSet::new();
        let mut added = BTreeSet::new();
        for &(old, new) in self.changed {
            gone.extend(old.into_iter().flat_map(|i| contribution(self.old, i)));
            added.extend(new.into_iter().flat_map(|j| contribution(self.new, j)));
        }
        // An element the old version of a pod brought stays if another pod still brings it
        // (two pods may share an address for a while: a deleted pod's IP reused).
        gone.retain(|e: &Element| {
            !added.contains(e) && !self.holders(e).iter().any(|&j| contribution(self.new, j).contains(e))
        });
        added.retain(|e| !set.elements.contains(e));
        (!gone.is_empty() || !added.is_empty()).then_some((gone, added))
    }

    /// Indices of the new cluster's pods that carry the address of `element` (its first
    /// component), an address some changed pod had.
    fn holders(&self, element: &Element) -> &[usize] {
        match element.values().first() {
            Some(Value::Addr(ip)) => match self.holders.binary_search_by_key(ip, |(h, _)| *h) {
                Ok(k) => &self.holders[k].1,
                Err(_) => &[],
            },
            _ => &[],
        }
    }
}

/// Takes `gone` out of the cached set `name` and puts `added` in, and says so in a delta.
///
/// The set is changed in place when nothing else holds it: a big peer set is not copied
/// for one pod. The ruleset applied last (`applied`, when given) holds it too, so its
/// entry is first swapped for a stand-in with the set's declaration and no elements, the
/// delta's `from`: `applied` then only serves [`crate::nft::diff::diff_with`] with these
/// deltas. When `applied` is not given or does not hold the set, the set is copied and
/// `from` is the version before.
fn patch_set(
    set: &mut Arc<Set>,
    name: &str,
    gone: BTreeSet<Element>,
    added: BTreeSet<Element>,
    applied: Option<&mut Ruleset>,
) -> SetDelta {
    let from = match applied.and_then(|rs| rs.sets.get_mut(name)).filter(|held| Arc::ptr_eq(held, set)) {
        Some(held) => {
            let stand_in = Arc::new(set.declaration());
            *held = Arc::clone(&stand_in);
            stand_in
        }
        None => Arc::clone(set),
    };
    let patched = Arc::make_mut(set);
    for e in &gone {
        patched.elements.remove(e);
    }
    patched.elements.extend(added.iter().cloned());
    SetDelta { from, to: Arc::clone(set), gone: gone.into_iter().collect(), added: added.into_iter().collect() }
}

/// Pod-address sets of earlier compiles, by set name (names are derived from what the set
/// holds: its scope and selector, or its policy rule).
#[derive(Debug, Default)]
struct SetCache {
    /// Peer sets by their IPv4 name.
    peers: HashMap<String, CachedPeers>,
    /// Egress named-port sets by name.
    named: HashMap<String, CachedNamedPorts>,
    /// How the last patch changed sets, by set name.
    deltas: SetDeltas,
    /// Policy chains by (policy object, direction).
    policy_chains: HashMap<(ByAddress<crate::policy::model::Policy>, Direction), CachedPolicyChain>,
    /// Local pods' chains by (pod object, direction).
    pod_chains: HashMap<(ByAddress<Pod>, Direction), CachedPodChain>,
    /// The policies (indices) selecting each local pod for (egress, ingress), in the
    /// policy list `selections_of`: a pod and a list both unchanged select the same.
    selections: HashMap<ByAddress<Pod>, [Vec<usize>; 2]>,
    selections_of: Option<crate::policy::model::SharedList<crate::policy::model::Policy>>,
    /// Compiles so far (the current one included): the clock of the cached sets' `last_used`.
    generation: u64,
    /// The (v4, v6) sets of the local pods' addresses, when the unknown-pod guard is on.
    local_pods: Option<CachedLocalPods>,
}

/// The addresses of a node's known local pods, by family: the unknown-pod guard's sets,
/// patched element by element as pods come and go.
#[derive(Debug)]
struct CachedLocalPods {
    node: String,
    sets: [Arc<Set>; 2],
}

impl CachedLocalPods {
    /// The addresses of family `family` that pod `i` of `cluster` brings to the set.
    fn contribution(&self, cluster: &Cluster, i: usize, family: IpFamily) -> Vec<Element> {
        let pod = &cluster.pods[i];
        if !is_local(pod, &self.node) {
            return Vec::new();
        }
        pod.ips.iter().filter(|ip| IpFamily::of(**ip) == family).map(|ip| Element::single(Value::Addr(*ip))).collect()
    }
}

/// A shared object as a map key by its allocation: an unchanged object is the same
/// allocation from one snapshot to the next, and the key keeps it alive (so the address
/// cannot be reused while it is cached).
#[derive(Debug)]
struct ByAddress<T>(Arc<T>);

impl<T> PartialEq for ByAddress<T> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl<T> Eq for ByAddress<T> {}

impl<T> std::hash::Hash for ByAddress<T> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        Arc::as_ptr(&self.0).hash(state);
    }
}

/// Where a policy chain's set comes from when the chain is reused.
#[derive(Debug)]
enum SetSource {
    /// The peer sets cached under this (IPv4) name; the chain names both families.
    Peers,
    /// An egress named-port set cached under its name.
    NamedPorts,
    /// A set of the policy alone (ipBlocks, ports).
    Fixed(Arc<Set>),
}

#[derive(Debug)]
struct CachedPolicyChain {
    name: String,
    chain: Arc<Chain>,
    sets: Vec<(String, SetSource)>,
    /// The local pods an ingress rule's named ports were resolved on (the chain's named-port
    /// sets hold their addresses and ports): the chain stands for the very same pods only.
    resolved_on: Option<Vec<Arc<Pod>>>,
    used: bool,
}

#[derive(Debug)]
struct CachedPodChain {
    /// The policies it jumps to (their ids name the chains).
    policies: Vec<Arc<crate::policy::model::Policy>>,
    name: String,
    chain: Arc<Chain>,
    used: bool,
}

/// The (v4, v6) address sets of the pods matching `selector` in `namespaces`.
#[derive(Debug)]
struct CachedPeers {
    /// The (v4, v6) set names.
    names: [String; 2],
    /// Sorted: every sync asks each cached set whether the changed pods' namespaces are in
    /// it (a binary search; up to every namespace of the cluster).
    namespaces: Vec<String>,
    selector: Selector,
    sets: [Arc<Set>; 2],
    /// The compile that last looked the sets up ([`SetCache::generation`]): this one's, or
    /// they are idle.
    last_used: u64,
}

impl CachedPeers {
    /// "hostNetwork pods are reached by IP (ipBlock) only."
    fn member(&self, pod: &Pod) -> bool {
        !pod.host_network
            && self.namespaces.binary_search(&pod.id.namespace).is_ok()
            && self.selector.matches(&pod.labels)
    }
}

/// An egress rule's `daddr . proto . port` set of one family: the named ports `named` of
/// the pods its peers admit. Shared by every egress rule with the same peers and named ports
/// (see [`egress_named_set`]).
#[derive(Debug)]
struct CachedNamedPorts {
    /// The rule's peers ("empty or missing: all destinations").
    peers: Option<Vec<Peer>>,
    /// The policy's namespace, when a peer selects pods in it (see [`own_namespace`]).
    own_namespace: Option<String>,
    family: IpFamily,
    named: Vec<(String, Protocol)>,
    set: Arc<Set>,
    /// The compile that last looked the set up ([`SetCache::generation`]): this one's, or
    /// it is idle.
    last_used: u64,
}

impl CachedNamedPorts {
    /// The elements pod `j` of `cluster` brings to the set.
    fn contribution(&self, cluster: &Cluster, j: usize) -> Vec<Element> {
        let named: Vec<(&str, Protocol)> = self.named.iter().map(|(n, p)| (n.as_str(), *p)).collect();
        let ns = self.own_namespace.as_deref().unwrap_or_default();
        named_port_entries(cluster, ns, self.peers.as_deref(), j, self.family, &named)
            .into_iter()
            .map(named_port_element)
            .collect()
    }
}

impl SetCache {
    fn clear(&mut self) {
        self.peers.clear();
        self.named.clear();
        self.deltas.clear();
        self.local_pods = None;
    }

    /// Brings every cached set up to date with `changes`, touching only the sets a changed
    /// pod was or becomes a member of (see [`patch_set`] for `applied`).
    fn patch(&mut self, changes: &PodChanges, mut applied: Option<&mut Ruleset>) {
        for cached in self.peers.values_mut() {
            // Most cached sets are untouched by a sync's few changed pods: one membership
            // test per changed pod version says so, where the contributions below would
            // test each four times (two versions, two families).
            let touched = changes.changed.iter().any(|&(i, j)| {
                i.is_some_and(|i| cached.member(&changes.old.pods[i]))
                    || j.is_some_and(|j| cached.member(&changes.new.pods[j]))
            });
            if !touched {
                continue;
            }
            for (k, family) in FAMILIES.into_iter().enumerate() {
                let contribution = |cluster: &Cluster, i: usize| -> Vec<Element> {
                    let pod = &cluster.pods[i];
                    if !cached.member(pod) {
                        return Vec::new();
                    }
                    pod.ips
                        .iter()
                        .filter(|ip| IpFamily::of(**ip) == family)
                        .map(|ip| Element::single(Value::Addr(*ip)))
                        .collect()
                };
                if let Some((gone, added)) = changes.element_changes(&cached.sets[k], contribution) {
                    let name = &cached.names[k];
                    let delta = patch_set(&mut cached.sets[k], name, gone, added, applied.as_deref_mut());
                    self.deltas.insert(name.clone(), delta);
                }
            }
        }
        for (name, cached) in &mut self.named {
            if let Some((gone, added)) = changes.element_changes(&cached.set, |c, j| cached.contribution(c, j)) {
                let delta = patch_set(&mut cached.set, name, gone, added, applied.as_deref_mut());
                self.deltas.insert(name.clone(), delta);
            }
        }
        // A pod that comes, goes, moves or changes address changes single elements of the
        // guard's sets: never a rebuild of the node's whole list.
        if let Some(cached) = &mut self.local_pods {
            for (k, family) in FAMILIES.into_iter().enumerate() {
                let contribution = |c: &Cluster, i: usize| cached.contribution(c, i, family);
                if let Some((gone, added)) = changes.element_changes(&cached.sets[k], contribution) {
                    let name = local_pods_set(family);
                    let delta = patch_set(&mut cached.sets[k], name, gone, added, applied.as_deref_mut());
                    self.deltas.insert(name.to_string(), delta);
                }
            }
        }
    }

    /// Ends a compile: drops the chains it did not use, and the sets it did not use but
    /// for the idle ones that fit in `budget` elements, most recently used first (a set
    /// counts at least one: an empty one still costs its declaration). Returns those idle
    /// sets, by name.
    fn keep_used_and_idle(&mut self, budget: usize) -> Vec<(String, Arc<Set>)> {
        self.policy_chains.retain(|_, c| std::mem::take(&mut c.used));
        self.pod_chains.retain(|_, c| std::mem::take(&mut c.used));
        let now = self.generation;
        let size = |sets: &[Arc<Set>]| sets.iter().map(|s| s.elements.len().max(1)).sum::<usize>();
        // (last used, is a peer entry, cache key, elements): by recency, then by key.
        let mut idle: Vec<(u64, bool, &String, usize)> = self
            .peers
            .iter()
            .filter(|(_, c)| c.last_used != now)
            .map(|(key, c)| (c.last_used, true, key, size(&c.sets)))
            .chain(
                self.named
                    .iter()
                    .filter(|(_, c)| c.last_used != now)
                    .map(|(key, c)| (c.last_used, false, key, size(std::slice::from_ref(&c.set)))),
            )
            .collect();
        idle.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| (a.1, a.2).cmp(&(b.1, b.2))));
        let mut room = budget;
        let mut evicted: Vec<(bool, String)> = Vec::new();
        for (_, peer, key, elements) in idle {
            match room.checked_sub(elements) {
                Some(left) => room = left,
                None => evicted.push((peer, key.clone())),
            }
        }
        for (peer, key) in evicted {
            if peer {
                self.peers.remove(&key);
            } else {
                self.named.remove(&key);
            }
        }
        let mut out = Vec::new();
        for c in self.peers.values().filter(|c| c.last_used != now) {
            out.extend(c.names.iter().cloned().zip(c.sets.iter().cloned()));
        }
        for (name, c) in self.named.iter().filter(|(_, c)| c.last_used != now) {
            out.push((name.clone(), Arc::clone(&c.set)));
        }
        out
    }

    /// The sets a reused policy chain looks up, as they are now, each cache entry marked
    /// used; `None` if one of them is no longer cached (its chain is then built afresh).
    fn current_sets(&mut self, sources: &[(String, SetSource)]) -> Option<Vec<(String, Arc<Set>)>> {
        let mut out = Vec::with_capacity(sources.len() + 1);
        for (name, source) in sources {
            match source {
                SetSource::Peers => {
                    let cached = self.peers.get(name)?;
                    out.extend(cached.names.iter().cloned().zip(cached.sets.iter().cloned()));
                }
                SetSource::NamedPorts => out.push((name.clone(), Arc::clone(&self.named.get(name)?.set))),
                SetSource::Fixed(set) => out.push((name.clone(), Arc::clone(set))),
            }
        }
        for (name, source) in sources {
            match source {
                SetSource::Peers => self.peers.get_mut(name).expect("checked").last_used = self.generation,
                SetSource::NamedPorts => self.named.get_mut(name).expect("checked").last_used = self.generation,
                SetSource::Fixed(_) => {}
            }
        }
        Some(out)
    }
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
    let Some(ip) = pod.ip_of_family(f == IpFamily::V6) else {
        return Vec::new();
    };
    // The pod's own ports first: most pods lack the names, and then no peer need be read.
    let entries: Vec<(IpAddr, u8, u16)> = named
        .iter()
        .filter_map(|&(n, proto)| pod.resolve_named_port(n, proto).map(|port| (ip, proto.number(), port)))
        .collect();
    let admitted = entries.is_empty()
        || peers.is_none_or(|peers| {
            peers.iter().any(|p| {
                crate::policy::evaluate::peer_matches(
                    cluster,
                    policy_ns,
                    p,
                    crate::policy::evaluate::Endpoint::Pod(j),
                    ip,
                )
            })
        });
    if admitted { entries } else { Vec::new() }
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

/// The name (prefix `prefix`, one per family) and comment of an egress rule's named-port
/// set. The set holds the named ports `named` of the pods the rule's `peers` admit, and
/// nothing else of its policy: named by that content, it is one set for every rule alike.
/// A rule "to the `metrics` port of any pod" in each of 100 namespaces looks up one set of
/// every pod's address, built, sent and kept once.
fn egress_named_set(
    prefix: &str,
    policy_ns: &str,
    peers: Option<&[Peer]>,
    named: &[(&str, Protocol)],
) -> (String, String) {
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
            (format!("{peers:?}"), text.join(" or "), hint)
        }
    };
    let names_hint: Vec<&str> = named.iter().map(|(n, _)| *n).collect();
    let name = names::generated(
        prefix,
        &["egress named ports", &ports, &identity, own_ns],
        &format!("{}_{hint}", names_hint.join("_")),
    );
    (name, names::comment(&format!("named ports {ports} of {text}")))
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

struct Compiler<'a, 'c> {
    cluster: &'a Cluster,
    config: &'a NodeConfig,
    cache: &'c mut SetCache,
    /// Sets still to be built from their namespaces' pods before a label index pays off.
    scans_left: usize,
    rs: Ruleset,
    /// Peer-set names already built, by (scope, selector).
    peer_sets: HashMap<PeerKey<'a>, [String; 2]>,
    /// Pod indices (ascending) by (namespace, label value), per label key; built for a key
    /// the first time a selector requires it to be `In` some values.
    pods_by_label: HashMap<&'a str, HashMap<(&'a str, &'a str), Vec<usize>>>,
    /// While a policy chain is built: the sets its rules look up, and where they come
    /// from; `None` once one of them depends on more than the policy.
    set_log: Option<Vec<(String, SetSource)>>,
    /// While a policy chain is built: an ingress rule resolved named ports on the local pods.
    resolved_on_local: bool,
}

/// How many sets of few pods a compile builds from their namespaces' pods before it indexes
/// the cluster's pods by label (a walk over every pod): an incremental compile builds a
/// handful of sets, a fresh one hundreds.
const SCANS_BEFORE_INDEX: usize = 16;

/// At most this many pods in a set's namespaces and they are read one by one rather than
/// through the label index.
const SCAN_LIMIT: usize = 1024;

/// (policy namespace for the own-namespace scope, namespace selector, pod selector).
type PeerKey<'a> = (Option<&'a str>, Option<&'a Selector>, &'a Selector);

/// The index range of the items of namespace `ns` in a list sorted by namespace first.
fn namespace_range<T>(items: &[T], ns: &str, namespace_of: impl Fn(&T) -> &str) -> std::ops::Range<usize> {
    let start = items.partition_point(|x| namespace_of(x) < ns);
    let end = start + items[start..].partition_point(|x| namespace_of(x) == ns);
    start..end
}

impl<'a, 'c> Compiler<'a, 'c> {
    fn new(cluster: &'a Cluster, config: &'a NodeConfig, cache: &'c mut SetCache) -> Self {
        Compiler {
            cluster,
            config,
            cache,
            rs: Ruleset::new(config.table.clone()),
            peer_sets: HashMap::new(),
            pods_by_label: HashMap::new(),
            scans_left: SCANS_BEFORE_INDEX,
            set_log: None,
            resolved_on_local: false,
        }
    }

    /// Indices of the pods of namespace `ns` (the cluster keeps pods sorted by namespace, name).
    fn pods_in(&self, ns: &str) -> std::ops::Range<usize> {
        namespace_range(&self.cluster.pods, ns, |p| p.id.namespace.as_str())
    }

    /// Indices of the policies of namespace `ns`.
    fn policies_in(&self, ns: &str) -> std::ops::Range<usize> {
        namespace_range(&self.cluster.policies, ns, |p| p.id.namespace.as_str())
    }

    /// The node's ruleset, given its pods that policies may select (`local`, ascending).
    fn run(mut self, local: Vec<usize>) -> Ruleset {
        self.base(&local);
        let cluster = self.cluster;
        let mut selections = std::mem::take(&mut self.cache.selections);
        if !self.cache.selections_of.as_ref().is_some_and(|list| Arc::ptr_eq(list, &cluster.policies)) {
            selections.clear();
            self.cache.selections_of = Some(Arc::clone(&cluster.policies));
        }
        let mut kept = HashMap::with_capacity(local.len());
        // (policy, direction) → the local pods it selects.
        let mut selected: BTreeMap<(usize, Direction), Vec<usize>> = BTreeMap::new();
        for &i in &local {
            let pod = &cluster.pods[i];
            let key = ByAddress(Arc::clone(pod));
            let by_direction = selections.remove(&key).unwrap_or_else(|| {
                [Direction::Egress, Direction::Ingress].map(|d| {
                    // "A pod is isolated for a direction iff some policy in its namespace
                    // selects it and lists that direction."
                    self.policies_in(&pod.id.namespace)
                        .filter(|&pi| {
                            let p = &cluster.policies[pi];
                            p.rules(d).is_some() && p.pod_selector.matches(&pod.labels)
                        })
                        .collect()
                })
            });
            for (d, policies) in [Direction::Egress, Direction::Ingress].into_iter().zip(&by_direction) {
                if policies.is_empty() {
                    continue; // unisolated: absent from the dispatch map, passes
                }
                for &pi in policies {
                    selected.entry((pi, d)).or_default().push(i);
                }
                self.pod_chain(pod, d, policies);
            }
            kept.insert(key, by_direction);
        }
        self.cache.selections = kept;
        for ((pi, d), pods) in &selected {
            self.policy_chain(*pi, *d, pods);
        }
        self.rs
    }

    /// Base chains and dispatch maps: always present, so the layout never depends on pods
    /// (only on the node's pod CIDRs, which add the unknown-pod guard's sets and rules).
    ///
    /// Each base chain, in order: established and related flows pass (one conntrack
    /// lookup, the path of almost every packet); neighbour discovery passes; the guard
    /// drops addresses of the pod CIDRs that are no known local pod; the dispatch maps send
    /// isolated pods' packets to their chains. `ct state invalid` is dropped only there
    /// (first rule of a pod chain) and by the guard: a node without policies changes no
    /// verdict, not even for the invalid packets of SSH or the kubelet.
    fn base(&mut self, local: &[usize]) {
        for name in [names::EGRESS_DISPATCH_V4, names::INGRESS_DISPATCH_V4] {
            self.rs.maps.insert(name.into(), Map { key: vec![KeyType::Ipv4Addr], ..Map::default() });
        }
        for name in [names::EGRESS_DISPATCH_V6, names::INGRESS_DISPATCH_V6] {
            self.rs.maps.insert(name.into(), Map { key: vec![KeyType::Ipv6Addr], ..Map::default() });
        }
        let guarded = self.guard_sets(local);
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
            }));
            rules.extend([(IpFamily::V4, v4), (IpFamily::V6, v6)].into_iter().map(|(f, map)| Rule {
                verdict: Some(Verdict::Vmap { key: Key::Addr(f, field), map: map.into() }),
                ..Rule::default()
            }));
            rules
        };
        let egress = || base_rules(AddrField::Saddr, names::EGRESS_DISPATCH_V4, names::EGRESS_DISPATCH_V6);
        let base = |hook, priority| Some(BaseChain { hook, priority, policy: ChainPolicy::Accept });
        self.rs.chains.insert(
            names::EGRESS_FORWARD.into(),
            Arc::new(Chain {
                base: base(Hook::Forward, names::EGRESS_PRIORITY),
                comment: Some("egress of local pods".into()),
                rules: egress(),
            }),
        );
        self.rs.chains.insert(
            names::EGRESS_INPUT.into(),
            Arc::new(Chain {
                base: base(Hook::Input, names::EGRESS_PRIORITY),
                comment: Some("egress of local pods to this node".into()),
                rules: egress(),
            }),
        );
        let ingress = base_rules(AddrField::Daddr, names::INGRESS_DISPATCH_V4, names::INGRESS_DISPATCH_V6);
        self.rs.chains.insert(
            names::INGRESS_FORWARD.into(),
            Arc::new(Chain {
                base: base(Hook::Forward, names::INGRESS_PRIORITY),
                comment: Some("ingress to local pods".into()),
                rules: ingress,
            }),
        );
    }

    /// The unknown-pod guard's sets, for each family the node has pod CIDRs of: the CIDRs
    /// (an interval set, static) and the local pods' addresses (a hash set, from the cache
    /// when an earlier compile built it: patched there, not rebuilt). Returns those families.
    fn guard_sets(&mut self, local: &[usize]) -> Vec<IpFamily> {
        let config = self.config;
        if config.pod_cidrs.is_empty() {
            return Vec::new();
        }
        let cluster = self.cluster;
        let cached = match self.cache.local_pods.take().filter(|c| c.node == config.node) {
            Some(cached) => cached,
            None => {
                let set = |family: IpFamily| {
                    let elements = local
                        .iter()
                        .flat_map(|&i| &cluster.pods[i].ips)
                        .filter(|ip| IpFamily::of(**ip) == family)
                        .map(|ip| Element::single(Value::Addr(*ip)))
                        .collect();
                    Arc::new(Set {
                        key: vec![family.addr_type()],
                        comment: Some(format!("known {} pods of this node", family_word(family))),
                        elements,
                        ..Set::default()
                    })
                };
                CachedLocalPods { node: config.node.clone(), sets: FAMILIES.map(set) }
            }
        };
        let mut families = Vec::new();
        for (k, family) in FAMILIES.into_iter().enumerate() {
            let blocks: Vec<IpBlock> = config
                .pod_cidrs
                .iter()
                .filter(|n| family_of_net(**n) == family)
                .map(|n| IpBlock { cidr: n.trunc(), except: Vec::new() })
                .collect();
            if blocks.is_empty() {
                continue;
            }
            // Overlapping CIDRs (a /16 and a /24 in it) are merged: interval elements of one
            // set may not overlap.
            let elements = block_ranges(&blocks.iter().collect::<Vec<_>>(), family)
                .into_iter()
                .flat_map(|(lo, hi)| range_to_prefixes(lo, hi, family))
                .map(|net| Element::single(Value::Prefix(net)))
                .collect();
            let cidrs = Set {
                key: vec![family.addr_type()],
                interval: true,
                comment: Some(format!("{} pod CIDRs of this node", family_word(family))),
                elements,
            };
            self.rs.sets.insert(pod_cidrs_set(family).into(), Arc::new(cidrs));
            self.rs.sets.insert(local_pods_set(family).into(), Arc::clone(&cached.sets[k]));
            families.push(family);
        }
        self.cache.local_pods = Some(cached);
        families
    }

    /// A local isolated pod's chain: its policies' chains, then drop; and its dispatch entries.
    fn pod_chain(&mut self, pod: &Arc<Pod>, d: Direction, policies: &[usize]) {
        let ingress = d == Direction::Ingress;
        let cluster = self.cluster;
        let key = (ByAddress(Arc::clone(pod)), d);
        // The chain names the pod and jumps to its policies' chains, named by the policies'
        // ids: the same pod object and the same policy ids make the same chain.
        let cached = self.cache.pod_chains.get_mut(&key).filter(|c| {
            c.policies.len() == policies.len()
                && c.policies.iter().zip(policies).all(|(p, &pi)| {
                    let now = &cluster.policies[pi];
                    Arc::ptr_eq(p, now) || p.id == now.id
                })
        });
        let (name, chain) = match cached {
            Some(c) => {
                c.used = true;
                (c.name.clone(), Arc::clone(&c.chain))
            }
            None => {
                let name = names::pod_chain(ingress, &pod.id.namespace, &pod.id.name);
                // Only isolated pods' packets get here (established and related ones were
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
                let opens_nothing =
                    Rule { matches: vec![Match::TcpNotSyn], verdict: Some(Verdict::Drop), ..Rule::default() };
                let mut rules: Vec<Rule> = [invalid, opens_nothing]
                    .into_iter()
                    .chain(policies.iter().map(|&pi| {
                        let p = &cluster.policies[pi];
                        Rule {
                            verdict: Some(Verdict::Jump(names::policy_chain(ingress, &p.id.namespace, &p.id.name))),
                            ..Rule::default()
                        }
                    }))
                    .collect();
                rules.push(Rule {
                    counter: true,
                    verdict: Some(Verdict::Drop),
                    comment: Some(names::comment(&format!(
                        "{} {}: no policy allows",
                        pod.id,
                        d.as_str().to_lowercase()
                    ))),
                    ..Rule::default()
                });
                let chain = Arc::new(Chain {
                    base: None,
                    comment: Some(names::comment(&format!("{} {}", pod.id, d.as_str().to_lowercase()))),
                    rules,
                });
                let cached = CachedPodChain {
                    policies: policies.iter().map(|&pi| Arc::clone(&cluster.policies[pi])).collect(),
                    name: name.clone(),
                    chain: Arc::clone(&chain),
                    used: true,
                };
                self.cache.pod_chains.insert(key, cached);
                (name, chain)
            }
        };
        for ip in &pod.ips {
            let map = match (ingress, ip.is_ipv6()) {
                (false, false) => names::EGRESS_DISPATCH_V4,
                (false, true) => names::EGRESS_DISPATCH_V6,
                (true, false) => names::INGRESS_DISPATCH_V4,
                (true, true) => names::INGRESS_DISPATCH_V6,
            };
            let m = self.rs.maps.get_mut(map).expect("base maps exist");
            m.elements.insert(Element::single(Value::Addr(*ip)), MapVerdict::Jump(name.clone()));
        }
        self.rs.chains.insert(name, chain);
    }

    /// The chain of one policy in one direction; `local` are the local pods it selects.
    ///
    /// The chain and the names of the sets it looks up depend on the policy alone (an
    /// ingress rule's named ports aside, which resolve on the local pods): an unchanged
    /// policy reuses its chain, and its sets come from the cache, patched for the pods
    /// that changed.
    fn policy_chain(&mut self, pi: usize, d: Direction, local: &[usize]) {
        let cluster = self.cluster;
        let policy = &cluster.policies[pi];
        let key = (ByAddress(Arc::clone(policy)), d);
        if let Some(mut cached) = self.cache.policy_chains.remove(&key)
            && cached.resolved_on.as_ref().is_none_or(|pods| {
                pods.len() == local.len() && pods.iter().zip(local).all(|(p, &i)| Arc::ptr_eq(p, &cluster.pods[i]))
            })
            && let Some(sets) = self.cache.current_sets(&cached.sets)
        {
            for (set_name, set) in sets {
                self.rs.sets.entry(set_name).or_insert(set);
            }
            self.rs.chains.insert(cached.name.clone(), Arc::clone(&cached.chain));
            cached.used = true;
            self.cache.policy_chains.insert(key, cached);
            return;
        }
        let ingress = d == Direction::Ingress;
        let name = names::policy_chain(ingress, &policy.id.namespace, &policy.id.name);
        let mut rules = Vec::new();
        self.set_log = Some(Vec::new());
        self.resolved_on_local = false;
        for (ri, rule) in policy.rules(d).unwrap_or_default().iter().enumerate() {
            self.rule(pi, d, ri, rule, local, &mut rules);
        }
        let chain = Arc::new(Chain {
            base: None,
            comment: Some(names::comment(&format!("{} {}", policy.id, d.as_str().to_lowercase()))),
            rules,
        });
        if let Some(sets) = self.set_log.take() {
            let resolved_on =
                self.resolved_on_local.then(|| local.iter().map(|&i| Arc::clone(&cluster.pods[i])).collect());
            let cached =
                CachedPolicyChain { name: name.clone(), chain: Arc::clone(&chain), sets, resolved_on, used: true };
            self.cache.policy_chains.insert(key, cached);
        }
        self.rs.chains.insert(name, chain);
    }

    /// Notes where a set the current policy chain looks up comes from (see `policy_chain`).
    fn log_set(&mut self, name: &str, source: SetSource) {
        if let Some(log) = &mut self.set_log {
            log.push((name.to_string(), source));
        }
    }

    /// "Traffic is allowed if it matches at least one peer AND at least one port": one nft rule
    /// per (peer kind × port kind), each a set lookup ending in accept.
    fn rule(&mut self, pi: usize, d: Direction, ri: usize, rule: &'a PolicyRule, local: &[usize], out: &mut Vec<Rule>) {
        let cluster = self.cluster;
        let policy = &cluster.policies[pi];
        let ns = policy.id.namespace.as_str();
        let ingress = d == Direction::Ingress;
        let dir = if ingress { "ingress" } else { "egress" };
        let peer_field = if ingress { AddrField::Saddr } else { AddrField::Daddr };
        let base_comment = format!("{}/{} {dir} rule {ri}", ns, policy.id.name);

        // Port matches: None = all ports, all protocols.
        let mut port_matches: Vec<(Option<Match>, String)> = Vec::new();
        let mut named: Vec<(&str, Protocol)> = Vec::new();
        match &rule.ports {
            None => port_matches.push((None, "all ports".into())),
            Some(specs) => {
                let mut ranges: BTreeMap<Protocol, Vec<(u16, u16)>> = BTreeMap::new();
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
                if !ranges.is_empty() {
                    let set = self.ports_set(ranges);
                    self.log_set(&set, SetSource::Fixed(Arc::clone(&self.rs.sets[&set])));
                    port_matches
                        .push((Some(Match::Lookup { key: Key::ProtoDport, set, negate: false }), "ports".into()));
                }
            }
        }

        // Peer matches: None = any peer (no match at all). Their sets are made only if a
        // rule looks them up: with ports, or with an ingress rule's named ports (an egress
        // rule's named-port set holds its peers' addresses itself).
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
                            let sets = self.peer_set(ns, namespaces, pods);
                            self.log_set(&sets[0], SetSource::Peers);
                            for (f, set) in FAMILIES.into_iter().zip(sets) {
                                let m = Match::Lookup { key: Key::Addr(f, peer_field), set, negate: false };
                                peer_matches.push((Some(m), format!("peer {k} pods")));
                            }
                        }
                        Peer::IpBlock(b) => blocks.push(b),
                    }
                }
                if !blocks.is_empty() {
                    for f in FAMILIES {
                        let ranges = block_ranges(&blocks, f);
                        if ranges.is_empty() && !blocks.iter().any(|b| family_of_net(b.cidr) == f) {
                            continue;
                        }
                        let prefix = if f == IpFamily::V4 { names::CIDR_V4 } else { names::CIDR_V6 };
                        let set = names::generated(
                            prefix,
                            &[ns, &policy.id.name, dir, &ri.to_string()],
                            &format!("{ns}_{}", policy.id.name),
                        );
                        let elements = ranges
                            .iter()
                            .flat_map(|&(lo, hi)| range_to_prefixes(lo, hi, f))
                            .map(|n| Element::single(Value::Prefix(n)))
                            .collect();
                        let cidrs = Arc::new(Set {
                            key: vec![f.addr_type()],
                            interval: true,
                            comment: Some(names::comment(&format!("{base_comment} ipBlocks"))),
                            elements,
                        });
                        self.log_set(&set, SetSource::Fixed(Arc::clone(&cidrs)));
                        self.rs.sets.insert(set.clone(), cidrs);
                        peer_matches.push((
                            Some(Match::Lookup { key: Key::Addr(f, peer_field), set, negate: false }),
                            "ipBlocks".into(),
                        ));
                    }
                }
            }
        }

        let mut push = |matches: Vec<Match>, what: String| {
            let r = Rule {
                matches,
                counter: true,
                verdict: Some(Verdict::Accept),
                comment: Some(names::comment(&format!("{base_comment} {what}"))),
            };
            if !out.contains(&r) {
                out.push(r);
            }
        };
        for (pm, pwhat) in &peer_matches {
            for (qm, qwhat) in &port_matches {
                push(pm.iter().chain(qm).cloned().collect(), format!("{pwhat}, {qwhat}"));
            }
        }

        // "A named port is resolved on the destination pod's containerPorts, per pod; it never
        // matches a non-pod destination": daddr . proto . port sets of resolved pods.
        if named.is_empty() {
            return;
        }
        for f in FAMILIES {
            // An ingress rule looks the set up after each peer match of its family (a v6
            // peer set never matches a v4 packet): none, and the set would serve no rule.
            let peers_of_family: Vec<&(Option<Match>, String)> = peer_matches
                .iter()
                .filter(|(pm, _)| {
                    !pm.as_ref().is_some_and(|m| matches!(m, Match::Lookup { key, .. } if key.family() != Some(f)))
                })
                .collect();
            if ingress && peers_of_family.is_empty() {
                continue;
            }
            let prefix = if f == IpFamily::V4 { names::NAMED_V4 } else { names::NAMED_V6 };
            let (set, comment) = if ingress {
                let set = names::generated(
                    prefix,
                    &[ns, &policy.id.name, dir, &ri.to_string()],
                    &format!("{ns}_{}", policy.id.name),
                );
                (set, names::comment(&format!("{base_comment} named ports")))
            } else {
                egress_named_set(prefix, ns, rule.peers.as_deref(), &named)
            };
            let elements = self.named_port_set(pi, rule, ingress, local, &named, f, &set, comment);
            if ingress {
                // Resolved on the local pods: the chain is kept for the same pods only.
                self.resolved_on_local = true;
                self.log_set(&set, SetSource::Fixed(Arc::clone(&elements)));
            } else {
                self.log_set(&set, SetSource::NamedPorts);
            }
            self.rs.sets.insert(set.clone(), elements);
            let lookup = Match::Lookup { key: Key::AddrProtoDport(f, AddrField::Daddr), set, negate: false };
            if ingress {
                for (pm, pwhat) in peers_of_family {
                    push(pm.iter().cloned().chain([lookup.clone()]).collect(), format!("{pwhat}, named ports"));
                }
            } else {
                push(vec![lookup], "peers, named ports".into());
            }
        }
    }

    /// The `daddr . proto . port` set `name` (family `f`) of a rule of policy `pi`, for its
    /// named ports `named`. An egress set depends on the rule's peers and on the pods they
    /// admit: cached, and shared by alike rules. An ingress set holds the local pods' own
    /// ports.
    #[allow(clippy::too_many_arguments)]
    fn named_port_set(
        &mut self,
        pi: usize,
        rule: &'a PolicyRule,
        ingress: bool,
        local: &[usize],
        named: &[(&str, Protocol)],
        f: IpFamily,
        name: &str,
        comment: String,
    ) -> Arc<Set> {
        let cluster = self.cluster;
        let policy = &cluster.policies[pi];
        let ns = policy.id.namespace.as_str();
        let own_ns = own_namespace(ns, rule.peers.as_deref());
        if !ingress
            && let Some(cached) = self.cache.named.get_mut(name)
            && cached.peers == rule.peers
            && cached.own_namespace.as_deref() == own_ns
            && cached.named.iter().map(|(n, proto)| (n.as_str(), *proto)).eq(named.iter().copied())
        {
            cached.last_used = self.cache.generation;
            return Arc::clone(&cached.set);
        }
        // (address, protocol, port), sorted before the set is built (bulk-loaded).
        let mut entries: Vec<(IpAddr, u8, u16)> = Vec::new();
        if ingress {
            // The destination is the local pod itself.
            for &i in local {
                let pod = &cluster.pods[i];
                let Some(ip) = pod.ip_of_family(f == IpFamily::V6) else {
                    continue;
                };
                for &(n, proto) in named {
                    entries.extend(pod.resolve_named_port(n, proto).map(|port| (ip, proto.number(), port)));
                }
            }
        } else {
            // The destination is any pod the peers admit, so the set encodes peer AND port.
            // The pods any peer may admit (a superset; each is checked by named_port_entries).
            let destinations: Vec<usize> = match &rule.peers {
                Some(peers) if !peers.iter().any(|p| matches!(p, Peer::IpBlock(_))) => {
                    let mut out = Vec::new();
                    for peer in peers {
                        if let Peer::Pods { namespaces, pods } = peer {
                            let in_scope = self.scope_namespaces(ns, namespaces);
                            out.extend(self.candidates(&in_scope, pods));
                        }
                    }
                    out.sort_unstable();
                    out.dedup();
                    out
                }
                _ => (0..cluster.pods.len()).collect(),
            };
            for j in destinations {
                entries.extend(named_port_entries(cluster, ns, rule.peers.as_deref(), j, f, named));
            }
        }
        entries.sort_unstable();
        entries.dedup();
        let set = Arc::new(Set {
            key: vec![f.addr_type(), KeyType::InetProto, KeyType::InetService],
            interval: false,
            comment: Some(comment),
            elements: entries.into_iter().map(named_port_element).collect(),
        });
        if !ingress {
            let cached = CachedNamedPorts {
                peers: rule.peers.clone(),
                own_namespace: own_ns.map(str::to_string),
                family: f,
                named: named.iter().map(|&(n, proto)| (n.to_string(), proto)).collect(),
                set: Arc::clone(&set),
                last_used: self.cache.generation,
            };
            self.cache.named.insert(name.to_string(), cached);
        }
        set
    }

    /// The shared pod-IP sets (v4, v6) of one (namespace scope, pod selector).
    fn peer_set(&mut self, policy_ns: &'a str, scope: &'a NamespaceScope, pods: &'a Selector) -> [String; 2] {
        let key: PeerKey<'a> = match scope {
            NamespaceScope::PolicyNamespace => (Some(policy_ns), None, pods),
            NamespaceScope::Matching(s) => (None, Some(s), pods),
        };
        if let Some(names) = self.peer_sets.get(&key) {
            return names.clone();
        }
        let (identity, hint): (Vec<String>, String) = match scope {
            NamespaceScope::PolicyNamespace => {
                (vec!["ns".into(), policy_ns.into(), format!("{pods:?}")], format!("{policy_ns}_{pods}"))
            }
            NamespaceScope::Matching(s) => {
                (vec!["nssel".into(), format!("{s:?}"), format!("{pods:?}")], format!("ns_{s}_{pods}"))
            }
        };
        let ids: Vec<&str> = identity.iter().map(String::as_str).collect();
        let out = [names::generated(names::PEERS_V4, &ids, &hint), names::generated(names::PEERS_V6, &ids, &hint)];
        let sets = match self.cache.peers.get_mut(&out[0]) {
            Some(cached) => {
                cached.last_used = self.cache.generation;
                cached.sets.clone()
            }
            None => {
                let cached = self.build_peer_sets(policy_ns, scope, pods, &out);
                let sets = cached.sets.clone();
                self.cache.peers.insert(out[0].clone(), cached);
                sets
            }
        };
        for (name, set) in out.iter().zip(sets) {
            self.rs.sets.insert(name.clone(), set);
        }
        self.peer_sets.insert(key, out.clone());
        out
    }

    /// The (v4, v6) sets of the pods matching `pods` in `scope`, named `names`, built.
    fn build_peer_sets(
        &mut self,
        policy_ns: &'a str,
        scope: &'a NamespaceScope,
        pods: &'a Selector,
        names: &[String; 2],
    ) -> CachedPeers {
        let cluster = self.cluster;
        let namespaces = self.scope_namespaces(policy_ns, scope);
        // Addresses first, sorted: a BTreeSet built from sorted items is bulk-loaded, where
        // inserting one by one searches the tree for each.
        let mut addrs: [Vec<IpAddr>; 2] = [Vec::new(), Vec::new()];
        for i in self.candidates(&namespaces, pods) {
            let pod = &cluster.pods[i];
            // hostNetwork pods are reached by IP (ipBlock) only.
            if pod.host_network || !pods.matches(&pod.labels) {
                continue;
            }
            for ip in &pod.ips {
                addrs[usize::from(ip.is_ipv6())].push(*ip);
            }
        }
        let scope_text = pods_text(policy_ns, scope, pods);
        let [v4, v6] = addrs;
        let sets = [(IpFamily::V4, v4), (IpFamily::V6, v6)].map(|(family, mut addrs)| {
            addrs.sort_unstable();
            addrs.dedup();
            Arc::new(Set {
                key: vec![family.addr_type()],
                interval: false,
                comment: Some(names::comment(&scope_text)),
                elements: addrs.into_iter().map(|ip| Element::single(Value::Addr(ip))).collect(),
            })
        });
        let namespaces: Vec<String> = namespaces.into_iter().map(str::to_string).collect();
        debug_assert!(namespaces.is_sorted(), "scope_namespaces walks the namespace map in name order");
        let last_used = self.cache.generation;
        CachedPeers { names: names.clone(), namespaces, selector: pods.clone(), sets, last_used }
    }

    /// The namespaces a peer's pods may live in.
    fn scope_namespaces(&self, policy_ns: &'a str, scope: &NamespaceScope) -> Vec<&'a str> {
        match scope {
            NamespaceScope::PolicyNamespace => vec![policy_ns],
            NamespaceScope::Matching(s) => {
                self.cluster.namespaces.values().filter(|n| s.matches(&n.labels)).map(|n| n.name.as_str()).collect()
            }
        }
    }

    /// Indices (ascending) of the pods in `namespaces` that may match `selector` (a
    /// superset of those that do): the pods of those namespaces, or, when `selector`
    /// requires a label to be `In` some values, the pods of those namespaces carrying them.
    fn candidates(&mut self, namespaces: &[&'a str], selector: &'a Selector) -> Vec<usize> {
        let requirement = selector.requirements().iter().find_map(|r| match &r.operator {
            Operator::In(values) => Some((r.key.as_str(), values)),
            _ => None,
        });
        let Some((key, values)) = requirement.filter(|&(key, _)| self.use_index(key, namespaces)) else {
            let mut out: Vec<usize> = namespaces.iter().flat_map(|ns| self.pods_in(ns)).collect();
            out.sort_unstable();
            return out;
        };
        let cluster = self.cluster;
        let index = self.pods_by_label.entry(key).or_insert_with(|| {
            let mut index: HashMap<(&str, &str), Vec<usize>> = HashMap::new();
            for (i, pod) in cluster.pods.iter().enumerate() {
                if let Some(v) = pod.labels.get(key) {
                    index.entry((pod.id.namespace.as_str(), v.as_str())).or_default().push(i);
                }
            }
            index
        });
        let index: &HashMap<(&str, &str), Vec<usize>> = index;
        let mut out = Vec::new();
        for &ns in namespaces {
            for v in values {
                out.extend(index.get(&(ns, v.as_str())).into_iter().flatten().copied());
            }
        }
        out.sort_unstable();
        out
    }

    /// Whether the pods of `namespaces` that carry label `key` are found through the label
    /// index (built now if need be) rather than by reading those namespaces' pods: yes once
    /// the index exists, the namespaces hold more than [`SCAN_LIMIT`] pods, or
    /// [`SCANS_BEFORE_INDEX`] sets were built by reading.
    fn use_index(&mut self, key: &str, namespaces: &[&str]) -> bool {
        if self.pods_by_label.contains_key(key) || self.scans_left == 0 {
            return true;
        }
        if namespaces.iter().map(|ns| self.pods_in(ns).len()).sum::<usize>() > SCAN_LIMIT {
            return true;
        }
        self.scans_left -= 1;
        false
    }

    /// A `inet_proto . inet_service` interval set, named by content (shared by equal port lists).
    fn ports_set(&mut self, ranges: BTreeMap<Protocol, Vec<(u16, u16)>>) -> String {
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
        let text = text.join(",");
        let name = names::generated(names::PORTS, &[&text], &text);
        self.rs.sets.entry(name.clone()).or_insert_with(|| {
            Arc::new(Set {
                key: vec![KeyType::InetProto, KeyType::InetService],
                interval: true,
                comment: Some(names::comment(&text)),
                elements,
            })
        });
        name
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh compile that builds sets from their namespaces' pods `scans` times before
    /// it indexes the pods by label.
    fn compile_scanning(cluster: &Cluster, config: &NodeConfig, scans: usize) -> Ruleset {
        let mut cache = SetCache::default();
        let mut compiler = Compiler::new(cluster, config, &mut cache);
        compiler.scans_left = scans;
        compiler.run(local_pods(cluster, &config.node))
    }

    /// A pod of namespace `ns` named `name`, labelled `version: <version>`.
    fn named_pod(ns: &str, name: &str, version: usize) -> Arc<Pod> {
        crate::policy::model::test_pod(ns, name, &[("version", &version.to_string())])
    }

    #[test]
    fn unchanged_pods_are_found_in_the_next_cluster_by_counting_the_changes_before_them() {
        let mut rng = crate::cli::generate::Rng::new(7);
        for round in 0..500 {
            // Pods named 0..40 in two namespaces; each present in either list or both, and
            // shared, relabelled or an equal copy (a relist) when in both.
            let (mut old, mut new) = (Vec::new(), Vec::new());
            for ns in ["a", "b"] {
                for n in 0..rng.below(40) {
                    let pod = named_pod(ns, &format!("p{n:02}"), 0);
                    match rng.below(6) {
                        0 => old.push(pod),
                        1 => new.push(pod),
                        2 => {
                            old.push(Arc::clone(&pod));
                            new.push(named_pod(ns, &format!("p{n:02}"), 1));
                        }
                        3 => {
                            old.push(Arc::clone(&pod));
                            new.push(Arc::new(Pod::clone(&pod)));
                        }
                        _ => {
                            old.push(Arc::clone(&pod));
                            new.push(pod);
                        }
                    }
                }
            }
            let changed = changed_pods(&old, &new, usize::MAX).expect("no limit");
            let picked: Vec<usize> = (0..old.len()).filter(|_| rng.chance(50)).collect();
            let by_name: Vec<usize> = picked
                .iter()
                .filter_map(|&i| new.binary_search_by(|p| p.id.cmp(&old[i].id)).ok().filter(|&j| new[j] == old[i]))
                .collect();
            assert_eq!(unchanged_indices(&picked, &changed), by_name, "round {round}");
        }
    }

    #[test]
    fn sets_built_from_their_namespaces_pods_equal_sets_built_through_the_label_index() {
        let mut clusters: Vec<Cluster> = (0..150).map(crate::cli::generate::small_random).collect();
        clusters.push(crate::cli::generate::cluster(&crate::cli::generate::Params {
            pods: 2_000,
            namespaces: 12,
            policies: 120,
            nodes: 8,
            seed: 3,
            dual_stack: true,
        }));
        for (k, cluster) in clusters.iter().enumerate() {
            for node in cluster.nodes() {
                let config = NodeConfig::new(node);
                let indexed = compile_scanning(cluster, &config, 0);
                assert_eq!(compile_scanning(cluster, &config, usize::MAX), indexed, "cluster {k}, {}", config.node);
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
