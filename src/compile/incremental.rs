//! The incremental compiler: one node's ruleset, compiled again and again as the cluster
//! changes, for the agent; always equal to [`super::compile`] (the reference compiler, a
//! separate code path without any cache), up to the idle sets it may be asked to keep.
//!
//! ```text
//!  cluster_n ──► changed pods (cluster_{n-1} vs cluster_n) ──► patch the cached sets they
//!      │                                                      were or become members of
//!      │                                                      (in place if ruleset_{n-1}
//!      │                                                      lets go of them)
//!      └──────► compile with the cache ──► Compiled { ruleset_n (== compile(cluster_n)
//!                 │                                   plus idle sets if asked to keep them),
//!                 │                                   set_deltas, idle, retired }
//!                 │ an untouched cached set or chain is reused: the same Arc as in ruleset_{n-1}
//! ```
//!
//! Still a compile of the whole snapshot, never of event deltas: what it reuses are the
//! pod-address sets (peers, named ports) that no pod differing between the two snapshots
//! can be a member of, before or after. Those sets are most of a node's ruleset at scale
//! (every pod of the cluster can be a peer) while the rest (chains, dispatch maps) only
//! grows with the node's own pods. Reused sets are the same allocations as in the previous
//! ruleset, which is what lets [`crate::nft::diff`] skip them without reading elements.
//!
//! The cache is keyed by the sets' canonical identities ([`super::naming`]), never by their
//! names: two sets whose names would collide stay two sets. Names are given afresh by each
//! compile's [`Namer`], in the reference compiler's order; a reused chain whose sets would
//! now be named otherwise is built again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use super::naming::{Hashed, HashedMap, Ident, Namer};
use super::tiers::{TierJumps, TierPlan, TierSets, UsedSet};
use super::*;
use crate::nft::diff::{SetDelta, SetDeltas};
use crate::policy::model::ContainerPort;
use crate::policy::model::Rule as PolicyRule;
use crate::policy::selector::Operator;
use crate::policy::tiers::{ClusterPeer, ClusterPolicy, DomainMap, Node};

/// Compiles one node's ruleset again and again, as the cluster changes (see the module).
#[derive(Debug)]
pub struct IncrementalCompiler {
    config: NodeConfig,
    /// Names sets (a fresh copy per compile).
    namer: Namer,
    /// How many names the last compile gave (room for the next one's).
    names: usize,
    /// The cluster the cache reflects.
    last: Option<Cluster>,
    /// Indices (ascending) of `last`'s pods on this node that policies may select.
    local: Vec<usize>,
    /// How many of `last`'s pods carry each address.
    addresses: AddressCounts,
    cache: SetCache,
    /// Elements per cluster pod that idle sets may hold (see
    /// [`IncrementalCompiler::keeping_idle_sets`]); 0: none are kept.
    idle_elements_per_pod: usize,
    /// See [`IncrementalCompiler::indexing_labels_after`].
    scans_before_index: usize,
}

/// What one [`IncrementalCompiler::compile`] returns: everything it knows, in one value.
#[derive(Debug)]
#[must_use]
pub struct Compiled {
    /// The node's ruleset: [`super::compile`] of the cluster, plus the idle sets kept.
    pub ruleset: Ruleset,
    /// How the sets this compile patched changed, by name: for
    /// [`crate::nft::diff::diff_with`]`(applied, &ruleset, &set_deltas)` against the ruleset
    /// the compile was given as `applied` (or, given none, the last one it returned).
    pub set_deltas: SetDeltas,
    /// The idle sets the ruleset holds (see [`IncrementalCompiler::keeping_idle_sets`]).
    pub idle: IdleSets,
    /// The cluster this compile replaced as the compiler's memory: dropping it frees what
    /// only it still holds (after a relist, 10 000 pods). The agent drops it after the apply,
    /// off the path from an event to its commit; dropping it at once is just as correct.
    pub retired: Retired,
}

/// How many idle sets a ruleset holds, and their elements.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdleSets {
    pub sets: usize,
    pub elements: usize,
}

/// The cluster a compile replaced, freed when this is dropped (see [`Compiled::retired`]).
#[derive(Debug, Default)]
pub struct Retired(#[allow(dead_code)] Option<Cluster>);

/// More changed pods than this and checking each cached set against each is no longer
/// cheaper than rebuilding the sets.
const MAX_TRACKED_POD_CHANGES: usize = 256;

impl IncrementalCompiler {
    pub fn new(config: NodeConfig) -> Self {
        IncrementalCompiler {
            config,
            namer: Namer::new(),
            names: 0,
            last: None,
            local: Vec::new(),
            addresses: AddressCounts::default(),
            cache: SetCache::default(),
            idle_elements_per_pod: 0,
            scans_before_index: SCANS_BEFORE_INDEX,
        }
    }

    /// Builds `scans` sets per compile from their namespaces' pods before it looks pods up
    /// by label (default [`SCANS_BEFORE_INDEX`]); tests use 0 so that small clusters take
    /// the label index, and keep it across compiles, as big ones do.
    pub fn indexing_labels_after(mut self, scans: usize) -> Self {
        self.scans_before_index = scans;
        self
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
    /// (An idle set whose last name a used set of the compile now holds stays out of it.)
    pub fn keeping_idle_sets(mut self, elements_per_pod: usize) -> Self {
        self.idle_elements_per_pod = elements_per_pod;
        self
    }

    /// Names sets with `namer` (tests narrow its hash to force collisions); compare with
    /// [`super::reference::compile_with_namer`] of the same namer.
    pub fn with_namer(mut self, namer: Namer) -> Self {
        self.namer = namer;
        self
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// The cluster of the last compile, unless forgotten since.
    pub fn last_cluster(&self) -> Option<&Cluster> {
        self.last.as_ref()
    }

    /// The ruleset of this node for `cluster` (equal to [`super::compile`]`(cluster, config)`
    /// plus idle sets), with the set deltas the diff needs and what the compile retired.
    ///
    /// `applied`: the ruleset the kernel holds (the last result, as nft accepted it), or
    /// `None`. Given, the sets this compile patches are patched in place rather than copied
    /// (no copy of a big peer set for one pod), and `applied`'s entries for them become
    /// *stand-ins*: their declarations without elements, the `from` of their
    /// [`Compiled::set_deltas`]. After the call `applied` is fit only for
    /// [`crate::nft::diff::diff_with`]`(applied, &compiled.ruleset, &compiled.set_deltas)`:
    /// the transaction from what the kernel holds to the result, as [`crate::nft::diff::diff`]
    /// of the untouched `applied` would be; then drop it. Not given, patched sets are copies
    /// and the deltas go from the last result returned.
    pub fn compile(&mut self, cluster: &Cluster, applied: Option<&mut Ruleset>) -> Compiled {
        let mut deltas = SetDeltas::new();
        let changed =
            self.last.as_ref().and_then(|last| changed_pods(&last.pods, &cluster.pods, MAX_TRACKED_POD_CHANGES));
        match (&self.last, &changed) {
            (Some(last), Some(changed)) => {
                self.addresses.update(last, cluster, changed);
                self.cache.labels.update(&last.pods, &cluster.pods, changed, self.cache.generation);
                // Namespace labels decide which namespaces a peer set spans: any change there
                // and nothing cached is trusted (namespaces change rarely).
                if last.namespaces == cluster.namespaces {
                    let changes = PodChanges::new(last, cluster, changed, &self.addresses);
                    self.cache.patch(&changes, applied, &mut deltas);
                } else {
                    self.cache.clear();
                }
            }
            _ => {
                self.addresses = AddressCounts::of(cluster);
                self.cache.clear();
                self.cache.labels = LabelIndex::default();
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
        let namer = self.namer.fresh(self.names);
        let mut compiler = Compiler::new(cluster, &self.config, &mut self.cache, namer);
        compiler.pod_families = FAMILIES.map(|f| self.addresses.has_family(f));
        compiler.scans_left = self.scans_before_index;
        let (mut ruleset, names) = compiler.run(local);
        self.names = names;
        let idle_budget = self.idle_elements_per_pod.saturating_mul(cluster.pods.len());
        let kept = self.cache.keep_used_and_idle(idle_budget);
        let idle = IdleSets { sets: kept.len(), elements: kept.iter().map(|(_, set)| set.elements.len()).sum() };
        for (name, set) in kept {
            ruleset.sets.entry(name).or_insert(set);
        }
        // The cluster's lists are shared: keeping it costs three reference counts. The one
        // it replaces may hold the last references to 10 000 pods: the caller frees it.
        let retired = Retired(self.last.replace(cluster.clone()));
        Compiled { ruleset, set_deltas: deltas, idle, retired }
    }

    /// Forgets every earlier compile: the next one builds everything afresh (a full sync
    /// trusts nothing it remembers, not even after a compile that panicked halfway).
    pub fn forget(&mut self) {
        *self = IncrementalCompiler::new(self.config.clone())
            .keeping_idle_sets(self.idle_elements_per_pod)
            .indexing_labels_after(self.scans_before_index)
            .with_namer(self.namer.fresh(0));
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
    let mut out = old.to_vec();
    retain_unchanged(&mut out, changed);
    out
}

/// [`unchanged_indices`] in place: `indices` (ascending, in the old cluster) keeps the pods
/// that did not change, at their indices in the new one.
fn retain_unchanged(indices: &mut Vec<usize>, changed: &[ChangedPod]) {
    if changed.is_empty() {
        return;
    }
    let (mut next, mut added, mut removed, mut kept) = (0, 0, 0, 0);
    for read in 0..indices.len() {
        let i = indices[read];
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
        indices[kept] = i + added - removed;
        kept += 1;
    }
    indices.truncate(kept);
}

/// Pod indices (ascending) by namespace and label value, per label key: where
/// `Compiler::candidates` finds the pods a selector's `In` requirement may admit. A key is
/// indexed the first time a compile needs it, then kept in step with each compile's
/// changed pods, so that a set built later does not walk every pod of the cluster again
/// (at 100k pods, rebuilding it on each sync that built a set was a fifth of the agent's
/// CPU). A key no compile used for [`LABEL_INDEX_IDLE_COMPILES`] compiles is dropped.
///
/// Indices count from the first pod of their namespace (the cluster keeps pods sorted by
/// namespace, then name): a pod added or gone shifts the indices of its own namespace
/// only, and a compile renumbers just the namespaces whose pods changed (renumbering
/// every indexed pod of the cluster was an eighth of the agent's CPU at 100k pods).
#[derive(Debug, Default)]
struct LabelIndex {
    keys: HashMap<String, IndexedKey>,
}

#[derive(Debug, Default)]
struct IndexedKey {
    /// Namespace → label value → indices within the namespace.
    namespaces: HashMap<String, HashMap<String, Vec<usize>>>,
    /// The compile that last looked the key up ([`SetCache::generation`]).
    last_used: u64,
}

/// Compiles a label key's index is kept without being looked up.
const LABEL_INDEX_IDLE_COMPILES: u64 = 256;

impl LabelIndex {
    /// From the `old` cluster's indices to the `new` one's, given the pods that differ.
    fn update(&mut self, old: &[Arc<Pod>], new: &[Arc<Pod>], changed: &[ChangedPod], generation: u64) {
        self.keys.retain(|_, k| generation.saturating_sub(k.last_used) <= LABEL_INDEX_IDLE_COMPILES);
        if self.keys.is_empty() {
            return;
        }
        let namespace_of = |&(i, j): &ChangedPod| match (i, j) {
            (Some(i), _) => old[i].id.namespace.as_str(),
            (None, Some(j)) => new[j].id.namespace.as_str(),
            (None, None) => "",
        };
        // `changed` is in (namespace, name) order: each namespace's changes are one run.
        for run in changed.chunk_by(|a, b| namespace_of(a) == namespace_of(b)) {
            let ns = namespace_of(&run[0]);
            let old_start = namespace_range(old, ns, |p| p.id.namespace.as_str()).start;
            let new_start = namespace_range(new, ns, |p| p.id.namespace.as_str()).start;
            let relative: Vec<ChangedPod> =
                run.iter().map(|&(i, j)| (i.map(|i| i - old_start), j.map(|j| j - new_start))).collect();
            for (key, indexed) in &mut self.keys {
                let values = indexed.namespaces.entry(ns.to_string()).or_default();
                values.retain(|_, pods| {
                    retain_unchanged(pods, &relative);
                    !pods.is_empty()
                });
                for j in run.iter().filter_map(|&(_, j)| j) {
                    if let Some(value) = new[j].labels.get(key.as_str()) {
                        let pods = values.entry(value.clone()).or_default();
                        let at = pods.partition_point(|&k| k < j - new_start);
                        pods.insert(at, j - new_start);
                    }
                }
                if values.is_empty() {
                    indexed.namespaces.remove(ns);
                }
            }
        }
    }

    /// The index of `key` over `cluster`'s pods, built now if need be.
    fn of(&mut self, all: &[Arc<Pod>], key: &str, generation: u64) -> &HashMap<String, HashMap<String, Vec<usize>>> {
        let indexed = self.keys.entry(key.to_string()).or_insert_with(|| {
            let mut namespaces: HashMap<String, HashMap<String, Vec<usize>>> = HashMap::new();
            let mut start = 0;
            for (i, pod) in all.iter().enumerate() {
                if i > 0 && all[i - 1].id.namespace != pod.id.namespace {
                    start = i;
                }
                if let Some(v) = pod.labels.get(key) {
                    let values = namespaces.entry(pod.id.namespace.clone()).or_default();
                    values.entry(v.clone()).or_default().push(i - start);
                }
            }
            IndexedKey { namespaces, last_used: generation }
        });
        indexed.last_used = generation;
        &indexed.namespaces
    }
}

/// How many pods carry each address, kept in step with the compiler's clusters, and how
/// many distinct addresses each family has.
#[derive(Debug, Default)]
struct AddressCounts {
    pods: HashMap<IpAddr, u32>,
    /// Distinct addresses by family, v4 then v6 (see [`FAMILIES`]).
    families: [usize; 2],
}

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
            let count = self.pods.entry(*ip).or_default();
            if *count == 0 {
                self.families[usize::from(ip.is_ipv6())] += 1;
            }
            *count += 1;
        }
    }

    fn remove(&mut self, pod: &Pod) {
        for ip in &pod.ips {
            if let std::collections::hash_map::Entry::Occupied(mut count) = self.pods.entry(*ip) {
                *count.get_mut() -= 1;
                if *count.get() == 0 {
                    count.remove();
                    self.families[usize::from(ip.is_ipv6())] -= 1;
                }
            }
        }
    }

    fn count(&self, ip: IpAddr) -> usize {
        self.pods.get(&ip).map_or(0, |&n| n as usize)
    }

    /// Whether some pod has an address of family `f`.
    fn has_family(&self, f: IpFamily) -> bool {
        self.families[usize::from(f == IpFamily::V6)] > 0
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
/// deltas. When `applied` holds another version, `from` is a stand-in it does not hold
/// (the diff compares elements). When `applied` is not given, the set is copied and
/// `from` is the version before.
fn patch_set(
    set: &mut Arc<Set>,
    name: &str,
    gone: BTreeSet<Element>,
    added: BTreeSet<Element>,
    applied: Option<&mut Ruleset>,
) -> SetDelta {
    let from = match applied.map(|rs| rs.sets.get_mut(name).filter(|held| Arc::ptr_eq(held, set))) {
        Some(Some(held)) => {
            let stand_in = Arc::new(set.declaration());
            *held = Arc::clone(&stand_in);
            stand_in
        }
        // The kernel holds another version of it (a staged fill's partial one): no delta
        // can serve that diff, which compares elements. Patched in place all the same (a
        // copy of a 90 000-element set per pod event made a fill's syncs crawl).
        Some(None) => Arc::new(set.declaration()),
        None => Arc::clone(set),
    };
    let patched = Arc::make_mut(set);
    for e in &gone {
        patched.elements.remove(e);
    }
    patched.elements.extend(added.iter().cloned());
    SetDelta { from, to: Arc::clone(set), gone: gone.into_iter().collect(), added: added.into_iter().collect() }
}

/// Pod-address sets of earlier compiles, by canonical identity ([`Ident::key`]: what the
/// set holds, its scope and selector, or its peers and named ports), never by name.
#[derive(Debug, Default)]
struct SetCache {
    /// Peer sets by their IPv4 identity.
    peers: HashedMap<CachedPeers>,
    /// Egress named-port sets by identity.
    named: HashedMap<CachedNamedPorts>,
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
    /// Cluster policies' compiled rules by (policy object, direction), valid for the nodes
    /// and resolved names of `tier_inputs` (their node and domain sets depend on them).
    cluster_rules: HashMap<(ByAddress<ClusterPolicy>, Direction), CachedClusterRules>,
    tier_inputs: Option<(Arc<Vec<Node>>, Arc<DomainMap>)>,
    /// The cluster policies governing each local pod for (egress, ingress), valid for the
    /// cluster policy list and namespace map of `governing_of`.
    governing: HashMap<ByAddress<Pod>, [Vec<usize>; 2]>,
    /// Tier chains by name.
    tier_chains: HashMap<String, CachedTierChain>,
    governing_of: Option<(crate::policy::model::SharedList<ClusterPolicy>, Arc<crate::policy::model::NamespaceMap>)>,
    /// The pods by label, for the pod list of the last compile. Not cleared with the sets
    /// ([`SetCache::clear`]): namespace labels do not change it.
    labels: LabelIndex,
}

/// A tier chain: the cluster policies (in order) whose rules it holds, for one direction.
#[derive(Debug)]
struct CachedTierChain {
    policies: Vec<Arc<ClusterPolicy>>,
    direction: Direction,
    chain: Arc<Chain>,
    used: bool,
}

/// A cluster policy's rules for one direction, and the sets they use in naming order.
#[derive(Debug)]
struct CachedClusterRules {
    rules: Vec<Rule>,
    sets: Vec<UsedSet>,
    used: bool,
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
    /// Family `k` (0: v4, 1: v6) of the peer sets cached under this (IPv4) identity key.
    Peers(Hashed, usize),
    /// The egress named-port set cached under its identity key.
    NamedPorts,
    /// A set of the policy alone (ipBlocks, ports).
    Fixed(Arc<Set>),
}

/// A set a policy chain looks up: its identity, the name it had, where it comes from.
#[derive(Debug)]
struct LoggedSet {
    ident: Ident,
    name: String,
    source: SetSource,
}

#[derive(Debug)]
struct CachedPolicyChain {
    name: String,
    chain: Arc<Chain>,
    /// In the order the chain's rules name them (the order of the reference compiler).
    sets: Vec<LoggedSet>,
    /// The local pods an ingress rule's named ports were resolved on (the chain's named-port
    /// sets hold their addresses and ports): the chain stands for the very same pods only.
    resolved_on: Option<Vec<Arc<Pod>>>,
    used: bool,
}

#[derive(Debug)]
struct CachedPodChain {
    /// The policies it jumps to (their ids name the chains).
    policies: Vec<Arc<crate::policy::model::Policy>>,
    /// The tier chains it jumps to.
    tiers: TierJumps,
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
    /// The name the set had in the last compile that looked it up.
    name: String,
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
        self.local_pods = None;
    }

    /// Brings every cached set up to date with `changes`, touching only the sets a changed
    /// pod was or becomes a member of (see [`patch_set`] for `applied`); each change goes to
    /// `deltas`, under the set's last name.
    fn patch(&mut self, changes: &PodChanges, mut applied: Option<&mut Ruleset>, deltas: &mut SetDeltas) {
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
                    deltas.insert(name.clone(), delta);
                }
            }
        }
        for cached in self.named.values_mut() {
            if let Some((gone, added)) = changes.element_changes(&cached.set, |c, j| cached.contribution(c, j)) {
                let delta = patch_set(&mut cached.set, &cached.name, gone, added, applied.as_deref_mut());
                deltas.insert(cached.name.clone(), delta);
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
                    deltas.insert(name.to_string(), delta);
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
        self.cluster_rules.retain(|_, c| std::mem::take(&mut c.used));
        self.tier_chains.retain(|_, c| std::mem::take(&mut c.used));
        let now = self.generation;
        let size = |sets: &[Arc<Set>]| sets.iter().map(|s| s.elements.len().max(1)).sum::<usize>();
        // (last used, is a peer entry, last name, cache key, elements): by recency, then by
        // name (then key, should two idle sets have had the same name in different compiles).
        let mut idle: Vec<(u64, bool, &String, &Hashed, usize)> = self
            .peers
            .iter()
            .filter(|(_, c)| c.last_used != now)
            .map(|(key, c)| (c.last_used, true, &c.names[0], key, size(&c.sets)))
            .chain(
                self.named
                    .iter()
                    .filter(|(_, c)| c.last_used != now)
                    .map(|(key, c)| (c.last_used, false, &c.name, key, size(std::slice::from_ref(&c.set)))),
            )
            .collect();
        idle.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| (a.1, a.2, a.3).cmp(&(b.1, b.2, b.3))));
        let mut room = budget;
        let mut evicted: Vec<(bool, Hashed)> = Vec::new();
        let mut kept: Vec<(bool, Hashed)> = Vec::new();
        for (_, peer, _, key, elements) in idle {
            match room.checked_sub(elements) {
                Some(left) => {
                    room = left;
                    kept.push((peer, key.clone()));
                }
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
        // Most recently used first: should two have the same name, that one is in the ruleset.
        let mut out = Vec::new();
        for (peer, key) in kept {
            if peer {
                let c = &self.peers[&key];
                out.extend(c.names.iter().cloned().zip(c.sets.iter().cloned()));
            } else {
                let c = &self.named[&key];
                out.push((c.name.clone(), Arc::clone(&c.set)));
            }
        }
        out
    }

    /// The sets a reused policy chain looks up, as they are now, each cache entry marked
    /// used, their names given by `namer` in the chain's order; `None` if one of them is no
    /// longer cached or is named otherwise now (its chain is then built afresh).
    fn current_sets(&mut self, sources: &[LoggedSet], namer: &mut Namer) -> Option<Vec<(String, Arc<Set>)>> {
        let mut out = Vec::with_capacity(sources.len());
        for logged in sources {
            let set = match &logged.source {
                SetSource::Peers(key, k) => Arc::clone(&self.peers.get(key)?.sets[*k]),
                SetSource::NamedPorts => Arc::clone(&self.named.get(logged.ident.key())?.set),
                SetSource::Fixed(set) => Arc::clone(set),
            };
            if !namer.names_as(&logged.ident, &logged.name) {
                return None;
            }
            out.push((logged.name.clone(), set));
        }
        for logged in sources {
            match &logged.source {
                SetSource::Peers(key, k) => {
                    let cached = self.peers.get_mut(key).expect("checked");
                    cached.last_used = self.generation;
                    cached.names[*k].clone_from(&logged.name);
                }
                SetSource::NamedPorts => {
                    let cached = self.named.get_mut(logged.ident.key()).expect("checked");
                    cached.last_used = self.generation;
                    cached.name.clone_from(&logged.name);
                }
                SetSource::Fixed(_) => {}
            }
        }
        Some(out)
    }
}

struct Compiler<'a, 'c> {
    cluster: &'a Cluster,
    config: &'a NodeConfig,
    cache: &'c mut SetCache,
    /// Sets still to be built from their namespaces' pods before a label index pays off.
    scans_left: usize,
    rs: Ruleset,
    /// Names this compile's sets, in the reference compiler's order.
    namer: Namer,
    /// Peer-set names already built, by (scope, selector).
    peer_sets: HashMap<PeerKey<'a>, ([Ident; 2], [String; 2])>,
    /// While a policy chain is built: the sets its rules look up, and where they come
    /// from; `None` once one of them depends on more than the policy.
    set_log: Option<Vec<LoggedSet>>,
    /// While a policy chain is built: an ingress rule resolved named ports on the local pods.
    resolved_on_local: bool,
    /// Whether some pod of the cluster has an address of each family (v4, v6): a set of
    /// the pods' named ports of a family no pod has is empty, and not built by a walk over
    /// every pod.
    pod_families: [bool; 2],
    /// While a cluster policy's rules are built: the sets they use (see [`TierSets::used`]).
    tier_log: Vec<UsedSet>,
    /// The (cluster policy, direction) whose rules this compile took from the cache.
    reused_cluster_rules: std::collections::HashSet<(usize, Direction)>,
}

impl<'a> TierSets<'a> for Compiler<'a, '_> {
    fn observe(&self) -> Observe {
        self.config.observe
    }

    fn cluster(&self) -> &'a Cluster {
        self.cluster
    }

    fn reuse(&mut self, pi: usize, d: Direction) -> Option<Vec<Rule>> {
        self.tier_log.clear();
        let cluster = self.cluster;
        let policy = &cluster.cluster_policies[pi];
        let key = (ByAddress(Arc::clone(policy)), d);
        let cached = self.cache.cluster_rules.remove(&key)?;
        // Each set again, in the order the rules first named them: the same names (or the
        // rules are compiled afresh), fixed sets as they were, pod peer sets as patched.
        for used in &cached.sets {
            match used {
                UsedSet::Fixed { ident, name, set } => {
                    if !self.namer.names_as(ident, name) {
                        return None;
                    }
                    self.rs.sets.entry(name.clone()).or_insert_with(|| Arc::clone(set));
                }
                UsedSet::PodPeers { rule, peer, names } => {
                    let ClusterPeer::Pods(set) = &policy.rules(d)[*rule].peers[*peer] else {
                        return None;
                    };
                    if self.peer_set_of("", Some(&set.namespaces), &set.pods).1 != *names {
                        return None;
                    }
                }
            }
        }
        let rules = cached.rules.clone();
        self.cache.cluster_rules.insert(key, CachedClusterRules { used: true, ..cached });
        self.reused_cluster_rules.insert((pi, d));
        Some(rules)
    }

    fn reuse_chain(&mut self, name: &str, list: &[usize], d: Direction) -> Option<Arc<Chain>> {
        let cluster = self.cluster;
        let cached = self.cache.tier_chains.get_mut(name)?;
        let same = cached.direction == d
            && cached.policies.len() == list.len()
            && cached.policies.iter().zip(list).all(|(p, &pi)| Arc::ptr_eq(p, &cluster.cluster_policies[pi]))
            && list.iter().all(|&pi| self.reused_cluster_rules.contains(&(pi, d)));
        if !same {
            return None;
        }
        cached.used = true;
        Some(Arc::clone(&cached.chain))
    }

    fn keep_chain(&mut self, name: &str, list: &[usize], d: Direction, chain: &Arc<Chain>) {
        let policies = list.iter().map(|&pi| Arc::clone(&self.cluster.cluster_policies[pi])).collect();
        let cached = CachedTierChain { policies, direction: d, chain: Arc::clone(chain), used: true };
        self.cache.tier_chains.insert(name.to_string(), cached);
    }

    fn used(&mut self, set: UsedSet) {
        self.tier_log.push(set);
    }

    fn keep(&mut self, pi: usize, d: Direction, rules: &[Rule]) {
        let key = (ByAddress(Arc::clone(&self.cluster.cluster_policies[pi])), d);
        let sets = std::mem::take(&mut self.tier_log);
        self.cache.cluster_rules.insert(key, CachedClusterRules { rules: rules.to_vec(), sets, used: true });
    }

    fn ruleset(&mut self) -> &mut Ruleset {
        &mut self.rs
    }

    fn namer(&mut self) -> &mut Namer {
        &mut self.namer
    }

    fn pod_peer_sets(&mut self, namespaces: &'a Selector, pods: &'a Selector) -> [String; 2] {
        // A pod peer with a namespace selector depends on no policy namespace.
        self.peer_set_of("", Some(namespaces), pods).1
    }
}

/// How many sets of few pods a compile builds from their namespaces' pods before it indexes
/// the cluster's pods by label (a walk over every pod): an incremental compile builds a
/// handful of sets, a fresh one hundreds.
pub const SCANS_BEFORE_INDEX: usize = 16;

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
    fn new(cluster: &'a Cluster, config: &'a NodeConfig, cache: &'c mut SetCache, namer: Namer) -> Self {
        Compiler {
            cluster,
            config,
            cache,
            rs: Ruleset::new(config.table.clone()),
            namer,
            peer_sets: HashMap::new(),
            scans_left: SCANS_BEFORE_INDEX,
            set_log: None,
            resolved_on_local: false,
            pod_families: [true; 2],
            tier_log: Vec::new(),
            reused_cluster_rules: std::collections::HashSet::new(),
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
    /// Also returns how many names the compile gave.
    fn run(mut self, local: Vec<usize>) -> (Ruleset, usize) {
        self.base(&local);
        let cluster = self.cluster;
        let same_tier_inputs = self.cache.tier_inputs.as_ref().is_some_and(|(nodes, domains)| {
            (Arc::ptr_eq(nodes, &cluster.nodes) || **nodes == *cluster.nodes)
                && (Arc::ptr_eq(domains, &cluster.domains) || **domains == *cluster.domains)
        });
        if !same_tier_inputs {
            self.cache.cluster_rules.clear();
            self.cache.tier_inputs = Some((Arc::clone(&cluster.nodes), Arc::clone(&cluster.domains)));
        }
        let mut selections = std::mem::take(&mut self.cache.selections);
        if !self.cache.selections_of.as_ref().is_some_and(|list| Arc::ptr_eq(list, &cluster.policies)) {
            selections.clear();
            self.cache.selections_of = Some(Arc::clone(&cluster.policies));
        }
        let mut kept = HashMap::with_capacity(local.len());
        let mut governing_of = std::mem::take(&mut self.cache.governing);
        // The same objects, or equal ones (after a relist, or a snapshot built anew).
        let same_governors = self.cache.governing_of.as_ref().is_some_and(|(policies, namespaces)| {
            (Arc::ptr_eq(policies, &cluster.cluster_policies) || **policies == *cluster.cluster_policies)
                && (Arc::ptr_eq(namespaces, &cluster.namespaces) || **namespaces == *cluster.namespaces)
        });
        if !same_governors {
            governing_of.clear();
            self.cache.governing_of = Some((Arc::clone(&cluster.cluster_policies), Arc::clone(&cluster.namespaces)));
        }
        let mut kept_governing = HashMap::with_capacity(local.len());
        // (policy, direction) → the local pods it selects.
        let mut selected: BTreeMap<(usize, Direction), Vec<usize>> = BTreeMap::new();
        let mut tiers = TierPlan::default();
        for &i in &local {
            let pod = &cluster.pods[i];
            let key = ByAddress(Arc::clone(pod));
            let by_direction = selections.remove(&key).unwrap_or_else(|| {
                // Only the policies of the pod's own namespace can isolate it.
                [Direction::Egress, Direction::Ingress].map(|d| {
                    self.policies_in(&pod.id.namespace).filter(|&pi| cluster.policies[pi].isolates(pod, d)).collect()
                })
            });
            // The cluster policies governing it, kept while the pod, the cluster policies
            // and the namespaces stay the same objects.
            let governing = governing_of.remove(&ByAddress(Arc::clone(pod))).unwrap_or_else(|| {
                [Direction::Egress, Direction::Ingress].map(|d| super::tiers::governing(cluster, pod, d))
            });
            let slot = |d: Direction| usize::from(d == Direction::Ingress);
            for (d, policies) in [Direction::Egress, Direction::Ingress].into_iter().zip(&by_direction) {
                let jumps = tiers.add_governed_pod(cluster, i, d, !policies.is_empty(), &governing[slot(d)]);
                if policies.is_empty() && jumps.is_empty() {
                    continue; // unpoliced: absent from the dispatch map, passes
                }
                for &pi in policies {
                    selected.entry((pi, d)).or_default().push(i);
                }
                self.pod_chain(pod, d, policies, jumps);
            }
            kept.insert(key, by_direction);
            kept_governing.insert(ByAddress(Arc::clone(pod)), governing);
        }
        self.cache.selections = kept;
        self.cache.governing = kept_governing;
        for ((pi, d), pods) in &selected {
            self.policy_chain(*pi, *d, pods);
        }
        // The cluster-wide tiers' chains, built each compile (their sets come from the cache).
        tiers.emit(&mut self);
        declare_objects(&mut self.rs, &self.config.observe);
        (self.rs, self.namer.len())
    }

    /// Base chains and dispatch maps (see [`skeleton`]), with the unknown-pod guard's sets.
    fn base(&mut self, local: &[usize]) {
        let guarded = self.guard_sets(local);
        skeleton(&mut self.rs, &guarded);
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
            None => CachedLocalPods {
                node: config.node.clone(),
                sets: FAMILIES.map(|family| Arc::new(local_pods_of(cluster, local, family))),
            },
        };
        let mut families = Vec::new();
        for (k, family) in FAMILIES.into_iter().enumerate() {
            let Some(cidrs) = pod_cidrs_of(config, family) else {
                continue;
            };
            self.rs.sets.insert(pod_cidrs_set(family).into(), Arc::new(cidrs));
            self.rs.sets.insert(local_pods_set(family).into(), Arc::clone(&cached.sets[k]));
            families.push(family);
        }
        self.cache.local_pods = Some(cached);
        families
    }

    /// A local isolated pod's chain: its policies' chains, then drop; and its dispatch entries.
    fn pod_chain(&mut self, pod: &Arc<Pod>, d: Direction, policies: &[usize], tiers: TierJumps) {
        let ingress = d == Direction::Ingress;
        let cluster = self.cluster;
        let key = (ByAddress(Arc::clone(pod)), d);
        // The chain names the pod and jumps to its policies' chains, named by the policies'
        // ids: the same pod object and the same policy ids make the same chain.
        let cached = self.cache.pod_chains.get_mut(&key).filter(|c| {
            c.tiers == tiers
                && c.policies.len() == policies.len()
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
                let isolating: Vec<&Policy> = policies.iter().map(|&pi| &*cluster.policies[pi]).collect();
                let (name, chain) = super::pod_chain(pod, d, &isolating, &tiers, &self.config.observe);
                let chain = Arc::new(chain);
                let cached = CachedPodChain {
                    policies: policies.iter().map(|&pi| Arc::clone(&cluster.policies[pi])).collect(),
                    tiers,
                    name: name.clone(),
                    chain: Arc::clone(&chain),
                    used: true,
                };
                self.cache.pod_chains.insert(key, cached);
                (name, chain)
            }
        };
        dispatch(&mut self.rs, pod, ingress, &name);
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
            && let Some(sets) = self.cache.current_sets(&cached.sets, &mut self.namer)
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
    fn log_set(&mut self, ident: &Ident, name: &str, source: SetSource) {
        if let Some(log) = &mut self.set_log {
            log.push(LoggedSet { ident: ident.clone(), name: name.to_string(), source });
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
        let counted = Counted {
            base_comment: &base_comment,
            counter: rule_counter(&self.config.observe, policy_rule_labels(policy, d, ri)),
        };

        // Port matches: None = all ports, all protocols.
        let mut port_matches: Vec<(Option<Match>, String)> = Vec::new();
        let mut named: Vec<(&str, Protocol)> = Vec::new();
        match &rule.ports {
            None => port_matches.push((None, "all ports".into())),
            Some(specs) => {
                let ranges;
                (ranges, named) = numbered_and_named(specs);
                if !ranges.is_empty() {
                    let (elements, text) = ports_elements(ranges);
                    let ident = ports_ident(&self.namer, &text);
                    let set = self.namer.name(&ident);
                    let ports = self.rs.sets.entry(set.clone()).or_insert_with(|| Arc::new(ports_set(elements, &text)));
                    let ports = Arc::clone(ports);
                    self.log_set(&ident, &set, SetSource::Fixed(ports));
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
                            let (idents, sets) = self.peer_set(ns, namespaces, pods);
                            for (k, (ident, set)) in idents.iter().zip(&sets).enumerate() {
                                self.log_set(ident, set, SetSource::Peers(idents[0].key().clone(), k));
                            }
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
                        let Some(cidrs) = cidr_set(&blocks, f, &format!("{base_comment} ipBlocks")) else {
                            continue;
                        };
                        let cidrs = Arc::new(cidrs);
                        let prefix = if f == IpFamily::V4 { names::CIDR_V4 } else { names::CIDR_V6 };
                        let ident = rule_ident(&self.namer, prefix, policy, dir, ri);
                        let set = self.namer.name(&ident);
                        self.log_set(&ident, &set, SetSource::Fixed(Arc::clone(&cidrs)));
                        self.rs.sets.insert(set.clone(), cidrs);
                        peer_matches.push((
                            Some(Match::Lookup { key: Key::Addr(f, peer_field), set, negate: false }),
                            "ipBlocks".into(),
                        ));
                    }
                }
            }
        }

        peer_port_rules(out, &counted, &peer_matches, &port_matches, &Verdict::Accept);

        // "A named port is resolved on the destination pod's containerPorts, per pod; it never
        // matches a non-pod destination": daddr . proto . port sets of resolved pods.
        if named.is_empty() {
            return;
        }
        for f in FAMILIES {
            // An ingress rule looks the set up after each peer match of its family (a v6
            // peer set never matches a v4 packet): none, and the set would serve no rule.
            let peers_of_family = peers_of_family(&peer_matches, f);
            if ingress && peers_of_family.is_empty() {
                continue;
            }
            let prefix = if f == IpFamily::V4 { names::NAMED_V4 } else { names::NAMED_V6 };
            let (ident, comment) = if ingress {
                (
                    rule_ident(&self.namer, prefix, policy, dir, ri),
                    names::comment(&format!("{base_comment} named ports")),
                )
            } else {
                egress_named_set(&self.namer, prefix, ns, rule.peers.as_deref(), &named)
            };
            let set = self.namer.name(&ident);
            let elements = self.named_port_set(pi, rule, ingress, local, &named, f, &ident, &set, comment);
            if ingress {
                // Resolved on the local pods: the chain is kept for the same pods only.
                self.resolved_on_local = true;
                self.log_set(&ident, &set, SetSource::Fixed(Arc::clone(&elements)));
            } else {
                self.log_set(&ident, &set, SetSource::NamedPorts);
            }
            self.rs.sets.insert(set.clone(), elements);
            let lookup = Match::Lookup { key: Key::AddrProtoDport(f, AddrField::Daddr), set, negate: false };
            named_port_rules(out, &counted, ingress, &peers_of_family, lookup, &Verdict::Accept);
        }
    }

    /// The `daddr . proto . port` set `ident`, named `name` (family `f`) of a rule of policy
    /// `pi`, for its named ports `named`. An egress set depends on the rule's peers and on the
    /// pods they admit: cached by identity, and shared by alike rules. An ingress set holds
    /// the local pods' own ports.
    #[allow(clippy::too_many_arguments)]
    fn named_port_set(
        &mut self,
        pi: usize,
        rule: &'a PolicyRule,
        ingress: bool,
        local: &[usize],
        named: &[(&str, Protocol)],
        f: IpFamily,
        ident: &Ident,
        name: &str,
        comment: String,
    ) -> Arc<Set> {
        let cluster = self.cluster;
        let policy = &cluster.policies[pi];
        let ns = policy.id.namespace.as_str();
        let own_ns = own_namespace(ns, rule.peers.as_deref());
        if !ingress
            && let Some(cached) = self.cache.named.get_mut(ident.key())
            && cached.peers == rule.peers
            && cached.own_namespace.as_deref() == own_ns
            && cached.named.iter().map(|(n, proto)| (n.as_str(), *proto)).eq(named.iter().copied())
        {
            cached.last_used = self.cache.generation;
            cached.name = name.to_string();
            return Arc::clone(&cached.set);
        }
        // (address, protocol, port), sorted before the set is built (bulk-loaded).
        let mut entries: Vec<(IpAddr, u8, u16)> = Vec::new();
        if ingress {
            // The destination is the local pod itself.
            entries = local_named_port_entries(cluster, local, f, named);
        } else {
            // The destination is any pod the peers admit, so the set encodes peer AND port.
            // The pods any peer may admit (a superset; each is checked by admitted_named_ports).
            let destinations: Vec<usize> = match &rule.peers {
                _ if !self.pod_families[usize::from(f == IpFamily::V6)] => Vec::new(),
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
            // The replicas of a workload share one list of container ports (the agent
            // interns them): each list's named ports are resolved once. Reading every pod's
            // ports and their names was most of a compile that built a set of any pod's
            // named ports at 100 000 pods.
            let mut by_ports: HashMap<*const ContainerPort, Vec<(u8, u16)>> = HashMap::new();
            for j in destinations {
                let pod = &cluster.pods[j];
                let resolved =
                    by_ports.entry(Arc::as_ptr(&pod.ports).cast()).or_insert_with(|| resolve_named_ports(pod, named));
                admitted_named_ports(cluster, ns, rule.peers.as_deref(), pod, f, resolved, &mut entries);
            }
        }
        let set = Arc::new(super::named_port_set(f, entries, comment));
        if !ingress {
            let cached = CachedNamedPorts {
                name: name.to_string(),
                peers: rule.peers.clone(),
                own_namespace: own_ns.map(str::to_string),
                family: f,
                named: named.iter().map(|&(n, proto)| (n.to_string(), proto)).collect(),
                set: Arc::clone(&set),
                last_used: self.cache.generation,
            };
            self.cache.named.insert(ident.key().clone(), cached);
        }
        set
    }

    /// The shared pod-IP sets (v4, v6) of one (namespace scope, pod selector): their
    /// identities and names.
    fn peer_set(
        &mut self,
        policy_ns: &'a str,
        scope: &'a NamespaceScope,
        pods: &'a Selector,
    ) -> ([Ident; 2], [String; 2]) {
        let namespaces = match scope {
            NamespaceScope::PolicyNamespace => None,
            NamespaceScope::Matching(s) => Some(s),
        };
        self.peer_set_of(policy_ns, namespaces, pods)
    }

    /// [`Compiler::peer_set`] of the pods matching `pods` in the namespaces matching
    /// `namespaces` (`None`: in `policy_ns` alone).
    fn peer_set_of(
        &mut self,
        policy_ns: &'a str,
        namespaces: Option<&'a Selector>,
        pods: &'a Selector,
    ) -> ([Ident; 2], [String; 2]) {
        let key: PeerKey<'a> = match namespaces {
            None => (Some(policy_ns), None, pods),
            Some(s) => (None, Some(s), pods),
        };
        if let Some(known) = self.peer_sets.get(&key) {
            return known.clone();
        }
        let scope = match namespaces {
            None => NamespaceScope::PolicyNamespace,
            Some(s) => NamespaceScope::Matching(s.clone()),
        };
        let scope = &scope;
        let idents = peer_idents(&self.namer, policy_ns, scope, pods);
        let out = [self.namer.name(&idents[0]), self.namer.name(&idents[1])];
        let sets = match self.cache.peers.get_mut(idents[0].key()) {
            Some(cached) => {
                cached.last_used = self.cache.generation;
                cached.names.clone_from(&out);
                cached.sets.clone()
            }
            None => {
                let cached = self.build_peer_sets(policy_ns, scope, pods, &out);
                let sets = cached.sets.clone();
                self.cache.peers.insert(idents[0].key().clone(), cached);
                sets
            }
        };
        for (name, set) in out.iter().zip(sets) {
            self.rs.sets.insert(name.clone(), set);
        }
        self.peer_sets.insert(key, (idents.clone(), out.clone()));
        (idents, out)
    }

    /// The (v4, v6) sets of the pods matching `pods` in `scope`, named `names`, built.
    fn build_peer_sets(
        &mut self,
        policy_ns: &'a str,
        scope: &NamespaceScope,
        pods: &'a Selector,
        names: &[String; 2],
    ) -> CachedPeers {
        let cluster = self.cluster;
        let namespaces = self.scope_namespaces(policy_ns, scope);
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
        let sets = address_sets(addrs, &pods_text(policy_ns, scope, pods)).map(Arc::new);
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
        let starts: Vec<usize> = namespaces.iter().map(|ns| self.pods_in(ns).start).collect();
        let index = self.cache.labels.of(&self.cluster.pods, key, self.cache.generation);
        let mut out = Vec::new();
        for (&ns, start) in namespaces.iter().zip(starts) {
            let Some(by_value) = index.get(ns) else { continue };
            for v in values {
                out.extend(by_value.get(v.as_str()).into_iter().flatten().map(|i| start + i));
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
        if self.cache.labels.keys.contains_key(key) || self.scans_left == 0 {
            return true;
        }
        if namespaces.iter().map(|ns| self.pods_in(ns).len()).sum::<usize>() > SCAN_LIMIT {
            return true;
        }
        self.scans_left -= 1;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh compile that builds sets from their namespaces' pods `scans` times before
    /// it indexes the pods by label.
    fn compile_scanning(cluster: &Cluster, config: &NodeConfig, scans: usize) -> Ruleset {
        let mut cache = SetCache::default();
        let mut compiler = Compiler::new(cluster, config, &mut cache, Namer::new());
        compiler.scans_left = scans;
        compiler.run(local_pods(cluster, &config.node)).0
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
    fn a_label_index_kept_in_step_with_the_changed_pods_equals_one_built_afresh() {
        let mut rng = crate::cli::generate::Rng::new(11);
        for round in 0..300 {
            // As above, and a third of the pods without the indexed label.
            let pod = |ns: &str, n: usize, version: usize, labelled: bool| {
                let name = format!("p{n:02}");
                if labelled { named_pod(ns, &name, version) } else { crate::policy::model::test_pod(ns, &name, &[]) }
            };
            let (mut old, mut new) = (Vec::new(), Vec::new());
            for ns in ["a", "b", "c"] {
                for n in 0..rng.below(30) {
                    let (v, labelled) = (rng.below(3), rng.below(3) > 0);
                    let before = pod(ns, n, v, labelled);
                    match rng.below(5) {
                        0 => old.push(before),
                        1 => new.push(before),
                        2 => {
                            old.push(before);
                            new.push(pod(ns, n, rng.below(3), rng.below(3) > 0));
                        }
                        _ => {
                            old.push(Arc::clone(&before));
                            new.push(before);
                        }
                    }
                }
            }
            let changed = changed_pods(&old, &new, usize::MAX).expect("no limit");
            let mut kept = LabelIndex::default();
            kept.of(&old, "version", 0);
            kept.update(&old, &new, &changed, 1);
            let mut fresh = LabelIndex::default();
            assert_eq!(kept.of(&new, "version", 1), fresh.of(&new, "version", 1), "round {round}");
        }
    }

    #[test]
    fn a_label_key_no_compile_looks_up_is_dropped_from_the_index() {
        let pods = vec![named_pod("a", "p", 0)];
        let mut index = LabelIndex::default();
        index.of(&pods, "version", 1);
        index.update(&pods, &pods, &[], 1 + LABEL_INDEX_IDLE_COMPILES);
        assert!(index.keys.contains_key("version"));
        index.update(&pods, &pods, &[], 2 + LABEL_INDEX_IDLE_COMPILES);
        assert!(index.keys.is_empty());
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
}

#[cfg(test)]
mod mutation {
    use super::*;
    use crate::cli::generate;

    /// What the cross-check against the reference compiler rests on: a cached set that is
    /// wrong (one address too many, as a missed patch would leave it) shows in the result,
    /// so `incremental == reference` fails. A check that could not fail would prove nothing.
    #[test]
    fn a_corrupted_cached_set_makes_the_incremental_result_differ_from_the_reference() {
        let bogus = Element::single(Value::Addr(IpAddr::from([192, 0, 2, 254])));
        let (mut corrupted, mut caught) = (0, 0);
        for seed in 0..200 {
            let cluster = generate::small_random(seed);
            for node in cluster.nodes() {
                let config = NodeConfig::new(node);
                let mut compiler = IncrementalCompiler::new(config.clone());
                let first = compiler.compile(&cluster, None).ruleset;
                assert_eq!(first, compile(&cluster, &config), "seed {seed}: equal before the corruption");
                let Some(cached) = compiler.cache.peers.values_mut().find(|c| !c.sets[0].elements.contains(&bogus))
                else {
                    continue;
                };
                Arc::make_mut(&mut cached.sets[0]).elements.insert(bogus.clone());
                corrupted += 1;
                let again = compiler.compile(&cluster.clone(), None).ruleset;
                caught += usize::from(again != compile(&cluster, &config));
            }
        }
        assert!(corrupted >= 50, "too few peer sets to corrupt: {corrupted}");
        assert_eq!(caught, corrupted, "a corrupted cache went unnoticed");
    }
}
