//! Kubernetes watches: `kube-runtime` watchers for Pods (all namespaces), Namespaces,
//! NetworkPolicies, Nodes and the cluster policy kinds (while their CRDs are installed, see
//! [`super::tiers`]), feeding the agent's own stores of converted model objects. Pods are
//! decoded as [`convert::SlimPod`]: only the fields the conversion reads, the rest of each
//! (5-10 KB) pod skipped unread.
//!
//! ```text
//!  watcher() ──Event──► convert on arrival ──► share labels, node name, ports (interners)
//!                        (invalid: warn once, keep as Invalid;          │
//!                         no IP/terminal pod: keep as Inactive)         ▼
//!                                    Store: set of entries, sorted by the object's own namespace/name
//!                                                                       └─snapshot()─► Snapshot (Arc clones)
//! ```
//!
//! Each object is converted the moment it arrives, so the stores hold only the model
//! (about 200 bytes and 3 allocations per pod at 10 000 pods: label sets, node names and
//! port lists are shared, IPs inline, no k8s-openapi objects) and a sync never re-converts.
//! Relists are level-triggered: `Init` starts a fresh set, `InitApply` fills it,
//! `InitDone` swaps it in whole (objects deleted while the watch was down vanish then).
//! Lists are paged (kube-runtime asks for 500 objects a page), so no list is ever held
//! whole. A watch error is retried at once, and with backoff only if errors keep coming
//! ([`WatchBackoff`]); a `410 Gone` in the stream makes the watcher relist, and one
//! answered to the watch start (which kube-runtime would retry with the same
//! resourceVersion forever) makes the agent start a fresh watcher, which relists.
//!
//! The watches (and the agent's Node, see `node.rs`) run in one task under a
//! supervisor ([`ClusterWatch::start_with`]): when the task ends (a panic) the watches are
//! restarted with backoff, relist, and the next sync is full; too many restarts end the
//! supervisor with a [`WatchError`], and the agent exits non-zero. [`WatchCounters`] keep,
//! per watch, when it last delivered and last failed, for the probes and metrics.

use std::borrow::Borrow;
use std::collections::{BTreeSet, HashSet};
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use std::sync::Mutex;

use futures::StreamExt;
use futures::future::BoxFuture;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::k8s;
use crate::k8s::convert::{self, FieldError, PodOutcome};
use crate::policy::{model, tiers};

use super::Snapshot;
use super::trigger::{SnapshotSource, Trigger};

/// The watched resources: the ones the agent lists and watches, and the agent's own
/// Node (read with a GET and a field-selected WATCH, for its pod CIDRs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    Pods,
    Namespaces,
    NetworkPolicies,
    Node,
    /// Every Node, slim (name, labels, addresses): what `nodes` peers of cluster policies select.
    Nodes,
    /// The cluster policy CRDs (`policy.networking.k8s.io`), each watched only while its
    /// CRD is installed (see [`super::tiers`]).
    ClusterNetworkPolicies,
    AdminNetworkPolicies,
    BaselineAdminNetworkPolicies,
}

impl Resource {
    /// The listed resources: nothing is synced until each has listed once (a CRD kind whose
    /// CRD is not installed counts as listed, empty).
    pub const ALL: [Resource; 7] = [
        Resource::Pods,
        Resource::Namespaces,
        Resource::NetworkPolicies,
        Resource::Nodes,
        Resource::ClusterNetworkPolicies,
        Resource::AdminNetworkPolicies,
        Resource::BaselineAdminNetworkPolicies,
    ];

    /// The kinds served by CRDs, which may not be installed.
    pub const CRDS: [Resource; 3] =
        [Resource::ClusterNetworkPolicies, Resource::AdminNetworkPolicies, Resource::BaselineAdminNetworkPolicies];

    /// Label value used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Pods => "pods",
            Resource::Namespaces => "namespaces",
            Resource::NetworkPolicies => "networkpolicies",
            Resource::Node => "node",
            Resource::Nodes => "nodes",
            Resource::ClusterNetworkPolicies => "clusternetworkpolicies",
            Resource::AdminNetworkPolicies => "adminnetworkpolicies",
            Resource::BaselineAdminNetworkPolicies => "baselineadminnetworkpolicies",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// The cluster policy kinds (their store changes the tier report).
    fn is_tiers(self) -> bool {
        Resource::CRDS.contains(&self)
    }
}

/// A watch that has reported an error counts as down until it delivers again, or until
/// this long has passed without another error: kube-runtime resumes a broken watch
/// silently (no event says "reconnected") and retries a failing one at least every 30 s
/// (its default backoff's cap), so a quiet minute after an error means the retry took.
pub const WATCH_HEAL_AFTER: Duration = Duration::from_secs(65);

#[derive(Debug, Default)]
struct PerResource {
    listed: AtomicBool,
    events: AtomicU64,
    lists: AtomicU64,
    errors: AtomicU64,
    /// Milliseconds after the counters' origin, plus one (0: never), of the last list,
    /// event or bookmark the watch delivered, and of its last error.
    last_ok: AtomicU64,
    last_error: AtomicU64,
    /// A CRD kind: 0 not probed yet, 1 its CRD is installed, 2 it is not.
    crd: std::sync::atomic::AtomicU8,
}

/// Counters per watched resource, read by the metrics endpoint, the probes and by tests.
#[derive(Debug)]
pub struct WatchCounters {
    per: [PerResource; 8],
    /// Tokio time the millisecond stamps count from.
    origin: Instant,
    /// Whether the Node is watched (a node name was given).
    node_watched: AtomicBool,
    /// Times the supervisor restarted the watches after their task ended.
    restarts: AtomicU64,
    /// Stamp (as `last_ok`) of the supervisor's last heartbeat.
    supervisor_beat: AtomicU64,
    /// What the stores of the cluster policy kinds hold that is not enforced as written.
    tiers: Mutex<super::tiers::TierReport>,
}

impl Default for WatchCounters {
    fn default() -> Self {
        WatchCounters {
            per: Default::default(),
            origin: Instant::now(),
            node_watched: AtomicBool::new(false),
            restarts: AtomicU64::new(0),
            supervisor_beat: AtomicU64::new(0),
            tiers: Mutex::default(),
        }
    }
}

impl WatchCounters {
    /// Has this resource completed its first list (the Node: its first read)?
    pub fn listed(&self, r: Resource) -> bool {
        self.per[r.index()].listed.load(Ordering::SeqCst)
    }

    /// Watch events (applied or deleted objects) received after the lists.
    pub fn events(&self, r: Resource) -> u64 {
        self.per[r.index()].events.load(Ordering::SeqCst)
    }

    /// Lists started (the first one included).
    pub fn lists(&self, r: Resource) -> u64 {
        self.per[r.index()].lists.load(Ordering::SeqCst)
    }

    /// Relists: lists after the first (after `410 Gone`, a failed list or watch start, or
    /// a restart of the watches).
    pub fn relists(&self, r: Resource) -> u64 {
        self.lists(r).saturating_sub(1)
    }

    /// Errors reported by the watcher (each followed by a backoff).
    pub fn errors(&self, r: Resource) -> u64 {
        self.per[r.index()].errors.load(Ordering::SeqCst)
    }

    /// Times the watch supervisor restarted the watches.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::SeqCst)
    }

    /// The resources watched: the three listed ones, and the Node when a node name was given.
    pub fn watched(&self) -> Vec<Resource> {
        let mut all = Resource::ALL.to_vec();
        if self.node_watched.load(Ordering::SeqCst) {
            all.push(Resource::Node);
        }
        all
    }

    fn stamp(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    fn since(&self, stamp: u64) -> Option<Duration> {
        (stamp > 0).then(|| self.origin.elapsed().saturating_sub(Duration::from_millis(stamp - 1)))
    }

    pub(super) fn delivered(&self, r: Resource) {
        self.per[r.index()].last_ok.store(self.stamp(), Ordering::SeqCst);
    }

    pub(super) fn listing(&self, r: Resource) {
        self.per[r.index()].lists.fetch_add(1, Ordering::SeqCst);
    }

    pub(super) fn event(&self, r: Resource) {
        self.per[r.index()].events.fetch_add(1, Ordering::SeqCst);
    }

    pub(super) fn failed(&self, r: Resource) {
        let per = &self.per[r.index()];
        per.errors.fetch_add(1, Ordering::SeqCst);
        per.last_error.store(self.stamp(), Ordering::SeqCst);
    }

    /// Time since the watch last delivered a list, an event or a bookmark (`None`: never).
    pub fn since_last_delivery(&self, r: Resource) -> Option<Duration> {
        self.since(self.per[r.index()].last_ok.load(Ordering::SeqCst))
    }

    /// Is this watch live: listed, and either nothing failed since it last delivered or
    /// [`WATCH_HEAL_AFTER`] passed without another error?
    pub fn live(&self, r: Resource) -> bool {
        let per = &self.per[r.index()];
        let (ok, error) = (per.last_ok.load(Ordering::SeqCst), per.last_error.load(Ordering::SeqCst));
        self.listed(r) && (error <= ok || self.since(error).is_some_and(|d| d >= WATCH_HEAL_AFTER))
    }

    /// Whether the CRD of a CRD kind is installed (`None`: not probed yet, or no CRD kind).
    pub fn crd_installed(&self, r: Resource) -> Option<bool> {
        match self.per[r.index()].crd.load(Ordering::SeqCst) {
            1 => Some(true),
            2 => Some(false),
            _ => None,
        }
    }

    /// Records whether the CRD of `r` is installed; whether that is news.
    pub(super) fn set_crd_installed(&self, r: Resource, installed: bool) -> bool {
        let state = if installed { 1 } else { 2 };
        self.per[r.index()].crd.swap(state, Ordering::SeqCst) != state
    }

    /// Marks a listed resource as listed (a CRD kind without its CRD: listed, empty);
    /// whether it is the first time.
    pub(super) fn mark_listed(&self, r: Resource) -> bool {
        !self.per[r.index()].listed.swap(true, Ordering::SeqCst)
    }

    /// The cluster policies not enforced as written, as the stores last held them.
    pub fn tier_report(&self) -> super::tiers::TierReport {
        self.tiers.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(super) fn set_tier_report(&self, report: super::tiers::TierReport) {
        *self.tiers.lock().unwrap_or_else(|e| e.into_inner()) = report;
    }

    /// Time since the watch supervisor's last heartbeat (`None` before it started).
    pub fn since_supervisor_beat(&self) -> Option<Duration> {
        self.since(self.supervisor_beat.load(Ordering::SeqCst))
    }
}

/// How an object stands in a store. An active entry is keyed by its model object's own
/// namespace/name, so the store holds no second copy of them.
#[derive(Debug, Clone)]
enum Entry<M> {
    /// Converted; takes part in syncs.
    Active(Arc<M>),
    /// Valid, but takes no part (a pod without an IP, in a terminal phase, unscheduled).
    Inactive(Box<ObjectKey>),
    /// Failed conversion; warned about on arrival, counted in every snapshot.
    Invalid(Box<ObjectKey>),
    /// Failed conversion, and enforced by its fail-closed stand-in (a NetworkPolicy that
    /// isolates what it selects and allows nothing): takes part in syncs like `Active`,
    /// and is counted like `Invalid`.
    FailClosed(Arc<M>),
}

impl<M> Entry<M> {
    /// The model object a sync sees, if any.
    fn enforced(&self) -> Option<&Arc<M>> {
        match self {
            Entry::Active(m) | Entry::FailClosed(m) => Some(m),
            Entry::Inactive(_) | Entry::Invalid(_) => None,
        }
    }

    /// `(skipped, enforced fail-closed)`: how this entry counts among the objects that
    /// failed conversion.
    fn failures(&self) -> (usize, usize) {
        match self {
            Entry::Invalid(_) => (1, 0),
            Entry::FailClosed(_) => (0, 1),
            Entry::Active(_) | Entry::Inactive(_) => (0, 0),
        }
    }
}

/// `(namespace, name)`: what a store is keyed and sorted by. The namespace is empty for
/// cluster-scoped objects.
pub trait Keyed {
    fn key(&self) -> (&str, &str);
}

impl Keyed for (&str, &str) {
    fn key(&self) -> (&str, &str) {
        *self
    }
}

impl Keyed for model::Pod {
    fn key(&self) -> (&str, &str) {
        (&self.id.namespace, &self.id.name)
    }
}

impl Keyed for model::Policy {
    fn key(&self) -> (&str, &str) {
        (&self.id.namespace, &self.id.name)
    }
}

impl Keyed for model::Namespace {
    fn key(&self) -> (&str, &str) {
        ("", &self.name)
    }
}

impl Keyed for tiers::Node {
    fn key(&self) -> (&str, &str) {
        ("", &self.name)
    }
}

/// Each cluster policy kind has its own store: the name is the key.
impl Keyed for tiers::ClusterPolicy {
    fn key(&self) -> (&str, &str) {
        ("", &self.id.name)
    }
}

impl<M: Keyed> Keyed for Entry<M> {
    fn key(&self) -> (&str, &str) {
        match self {
            Entry::Active(m) | Entry::FailClosed(m) => m.key(),
            Entry::Inactive(key) | Entry::Invalid(key) => (&key.0, &key.1),
        }
    }
}

// Entries are ordered by key, and looked up by a borrowed `(namespace, name)` through
// `dyn Keyed` (a set of entries cannot be searched with a tuple of `&str` otherwise).
impl<M: Keyed> PartialEq for Entry<M> {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl<M: Keyed> Eq for Entry<M> {}

impl<M: Keyed> PartialOrd for Entry<M> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl<M: Keyed> Ord for Entry<M> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}

impl PartialEq for dyn Keyed + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for dyn Keyed + '_ {}

impl PartialOrd for dyn Keyed + '_ {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for dyn Keyed + '_ {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}

impl<'a, M: Keyed + 'a> Borrow<dyn Keyed + 'a> for Entry<M> {
    fn borrow(&self) -> &(dyn Keyed + 'a) {
        self
    }
}

/// The objects of one resource, converted, sorted by namespace/name.
///
/// ```text
///  event ─► live (every key: active, inactive, invalid ─┬─► active (+ fail-closed): the
///                or fail-closed)                       │   snapshot's list, kept in step
///                                                      │   entry by entry
///                                                      └─► invalid, fail-closed: counts
/// ```
///
/// `active` is handed to every snapshot as it is (a reference count, not a copy of 10 000
/// pointers per sync); the first change after a snapshot copies it once if the snapshot,
/// or the compiler's memory of it, still holds it.
#[derive(Debug, Clone)]
pub struct Objects<M> {
    live: BTreeSet<Entry<M>>,
    /// The set a (re)list is building, swapped in at `InitDone`.
    relisting: Option<BTreeSet<Entry<M>>>,
    /// The `Active` entries of `live`, in the same order.
    active: Arc<Vec<Arc<M>>>,
    /// How many entries of `live` are `Invalid`, and how many `FailClosed`.
    invalid: usize,
    fail_closed: usize,
}

impl<M> Default for Objects<M> {
    fn default() -> Self {
        Objects { live: BTreeSet::new(), relisting: None, active: Arc::default(), invalid: 0, fail_closed: 0 }
    }
}

/// `(namespace, name)`; the namespace is empty for cluster-scoped objects.
type ObjectKey = (String, String);

/// The key a kind's model object will carry: `default_namespace` stands in for a missing
/// namespace as it does in [`convert`] (empty for cluster-scoped kinds).
fn object_key(meta: &ObjectMeta, default_namespace: &str) -> ObjectKey {
    let namespace = meta.namespace.clone().unwrap_or_else(|| default_namespace.to_string());
    (namespace, meta.name.clone().unwrap_or_default())
}

impl<M: Keyed> Objects<M> {
    fn init(&mut self) {
        self.relisting = Some(BTreeSet::new());
    }

    fn apply(&mut self, entry: Entry<M>, init: bool) {
        match (&mut self.relisting, init) {
            (Some(set), true) => {
                set.replace(entry);
            }
            _ => {
                self.set_active(entry.key(), entry.enforced().cloned());
                let (invalid, fail_closed) = entry.failures();
                self.invalid += invalid;
                self.fail_closed += fail_closed;
                let old = self.live.replace(entry);
                self.forget(old.as_ref());
            }
        }
    }

    fn init_done(&mut self) {
        if let Some(set) = self.relisting.take() {
            self.live = set;
            (self.invalid, self.fail_closed) =
                self.live.iter().map(Entry::failures).fold((0, 0), |(a, b), (c, d)| (a + c, b + d));
            self.active = Arc::new(self.live.iter().filter_map(|e| e.enforced().cloned()).collect());
        }
    }

    fn delete(&mut self, key: &ObjectKey) {
        let old = self.live.take(&(key.0.as_str(), key.1.as_str()) as &dyn Keyed);
        self.forget(old.as_ref());
        self.set_active((&key.0, &key.1), None);
    }

    /// Uncounts an entry that left `live`.
    fn forget(&mut self, old: Option<&Entry<M>>) {
        if let Some(old) = old {
            let (invalid, fail_closed) = old.failures();
            self.invalid -= invalid;
            self.fail_closed -= fail_closed;
        }
    }

    /// Puts `object` under `key` in the active list, or takes the key out of it.
    fn set_active(&mut self, key: (&str, &str), object: Option<Arc<M>>) {
        let at = self.active.binary_search_by(|m| m.key().cmp(&key));
        match (at, object) {
            (Ok(i), Some(m)) => Arc::make_mut(&mut self.active)[i] = m,
            (Ok(i), None) => {
                Arc::make_mut(&mut self.active).remove(i);
            }
            (Err(i), Some(m)) => Arc::make_mut(&mut self.active).insert(i, m),
            (Err(_), None) => {}
        }
    }

    /// The objects syncs enforce (active and fail-closed), sorted by namespace and name
    /// (shared), how many are invalid (skipped) and how many of them are fail-closed.
    fn active(&self) -> (Arc<Vec<Arc<M>>>, usize, usize) {
        (Arc::clone(&self.active), self.invalid, self.fail_closed)
    }

    /// The objects syncs enforce, sorted by key.
    pub(super) fn enforced(&self) -> &Arc<Vec<Arc<M>>> {
        &self.active
    }

    /// The keys of the objects that failed conversion and are not enforced at all.
    pub(super) fn invalid_keys(&self) -> impl Iterator<Item = (&str, &str)> {
        self.live.iter().filter(|e| matches!(e, Entry::Invalid(_))).map(|e| e.key())
    }

    /// How many objects failed conversion and are enforced by a fail-closed stand-in.
    pub(super) fn fail_closed_count(&self) -> usize {
        self.fail_closed
    }
}

/// A watched Kubernetes kind and the model object it converts to.
pub trait Watched: kube::Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static {
    type Model: Keyed + Debug + Send + Sync + 'static;
    const KIND: &'static str;
    /// The namespace [`convert`] gives an object that names none ("" if cluster-scoped).
    const DEFAULT_NAMESPACE: &'static str;
    /// What the warning about an object that failed conversion says is done with it, when
    /// [`Watched::fail_closed`] gives a stand-in, and when it does not.
    const FAIL_CLOSED_MEANS: &'static str = "enforced fail-closed: it isolates the pods it selects and allows nothing";
    const SKIPPED_MEANS: &'static str = "skipped";
    /// `Ok(None)`: valid, but it takes no part (logged at debug level with the reason).
    fn convert(&self) -> Result<Option<Self::Model>, FieldError>;
    /// What to enforce for an object that failed conversion with `error`: `None` skips it.
    fn fail_closed(&self, _error: &FieldError) -> Option<Self::Model> {
        None
    }
    /// Replaces parts of a converted object with equal ones the stores already hold.
    fn share(model: Self::Model, _stores: &mut AgentStores) -> Self::Model {
        model
    }
    fn objects(stores: &mut AgentStores) -> &mut Objects<Self::Model>;
    /// Completes an object as it arrives from `api` (a dynamic object's apiVersion and kind).
    fn arrived(&mut self, _dynamic_type: &Self::DynamicType) {}
    /// Whether `new` changes nothing a sync sees in `old`: its update needs no sync (a
    /// Node's status updates, most of which touch neither labels nor addresses).
    fn unchanged(_old: &Self::Model, _new: &Self::Model) -> bool {
        false
    }
    /// Called after this kind's store changed (the stores' derived lists follow it).
    fn changed(_stores: &mut AgentStores) {}
}

impl Watched for Pod {
    type Model = model::Pod;
    const KIND: &'static str = "Pod";
    const DEFAULT_NAMESPACE: &'static str = "default";
    fn convert(&self) -> Result<Option<model::Pod>, FieldError> {
        Ok(match convert::pod(self, None)? {
            PodOutcome::Pod(p) => Some(p),
            PodOutcome::Inactive(why) => {
                tracing::debug!("pod {} {why}; not enforced", display_key(&object_key(&self.metadata, "default")));
                None
            }
        })
    }
    fn share(mut pod: model::Pod, stores: &mut AgentStores) -> model::Pod {
        pod.labels = stores.pod_labels.intern(pod.labels);
        pod.node = stores.node_names.intern(pod.node.into()).into();
        pod.ports = stores.pod_ports.intern(pod.ports);
        pod
    }
    fn objects(stores: &mut AgentStores) -> &mut Objects<model::Pod> {
        &mut stores.pods
    }
}

/// The agent's pod watch: [`convert::SlimPod`] decodes only the fields the conversion
/// reads, and converts exactly as the full `Pod` would (one store for both).
impl Watched for convert::SlimPod {
    type Model = model::Pod;
    const KIND: &'static str = "Pod";
    const DEFAULT_NAMESPACE: &'static str = "default";
    fn convert(&self) -> Result<Option<model::Pod>, FieldError> {
        Ok(match convert::slim_pod(self)? {
            PodOutcome::Pod(p) => Some(p),
            PodOutcome::Inactive(why) => {
                tracing::debug!("pod {} {why}; not enforced", display_key(&object_key(&self.metadata, "default")));
                None
            }
        })
    }
    fn share(pod: model::Pod, stores: &mut AgentStores) -> model::Pod {
        <Pod as Watched>::share(pod, stores)
    }
    fn objects(stores: &mut AgentStores) -> &mut Objects<model::Pod> {
        &mut stores.pods
    }
}

impl Watched for Namespace {
    type Model = model::Namespace;
    const KIND: &'static str = "Namespace";
    const DEFAULT_NAMESPACE: &'static str = "";
    fn convert(&self) -> Result<Option<model::Namespace>, FieldError> {
        convert::namespace(self).map(Some)
    }
    fn objects(stores: &mut AgentStores) -> &mut Objects<model::Namespace> {
        &mut stores.namespaces
    }
}

impl Watched for NetworkPolicy {
    type Model = model::Policy;
    const KIND: &'static str = "NetworkPolicy";
    const DEFAULT_NAMESPACE: &'static str = "default";
    fn convert(&self) -> Result<Option<model::Policy>, FieldError> {
        convert::policy(self).map(Some)
    }
    /// Skipping a policy would unisolate the pods it selects: it isolates them instead,
    /// allowing nothing (see [`convert::policy_fail_closed`]).
    fn fail_closed(&self, error: &FieldError) -> Option<model::Policy> {
        Some(convert::policy_fail_closed(self, error))
    }
    fn objects(stores: &mut AgentStores) -> &mut Objects<model::Policy> {
        &mut stores.policies
    }
}

fn display_key((namespace, name): &ObjectKey) -> String {
    if namespace.is_empty() { name.clone() } else { format!("{namespace}/{name}") }
}

/// Every Node, for the `nodes` peers of cluster policies: its name, labels and addresses
/// ([`k8s::tiers::node_from`]); the rest of the (large) object is dropped on arrival.
impl Watched for k8s_openapi::api::core::v1::Node {
    type Model = tiers::Node;
    const KIND: &'static str = "Node";
    const DEFAULT_NAMESPACE: &'static str = "";
    fn convert(&self) -> Result<Option<tiers::Node>, FieldError> {
        k8s::tiers::node_from(self).map(Some)
    }
    fn objects(stores: &mut AgentStores) -> &mut Objects<tiers::Node> {
        &mut stores.nodes
    }
    fn unchanged(old: &tiers::Node, new: &tiers::Node) -> bool {
        old == new
    }
    fn changed(stores: &mut AgentStores) {
        // The stores keep nodes sorted by name, as the Cluster wants them.
        stores.node_list = Arc::new(stores.nodes.active.iter().map(|n| (**n).clone()).collect());
    }
}

/// Converts one arriving object. One that fails conversion is warned about here, once per
/// object and reason (not again on every relist or status update), with structured fields.
fn entry<K: Watched>(obj: &K, stores: &mut AgentStores) -> Entry<K::Model> {
    let key = || Box::new(object_key(obj.meta(), K::DEFAULT_NAMESPACE));
    match obj.convert() {
        Ok(Some(m)) => {
            stores.forget_failure(K::KIND, key);
            Entry::Active(Arc::new(K::share(m, stores)))
        }
        Ok(None) => {
            stores.forget_failure(K::KIND, key);
            Entry::Inactive(key())
        }
        Err(e) => {
            let stand_in = obj.fail_closed(&e);
            let key = key();
            let first =
                stores.failed.insert((K::KIND, (*key).clone()), e.to_string()).is_none_or(|old| old != e.to_string());
            if first {
                let (namespace, name) = &*key;
                let enforced = if stand_in.is_some() { K::FAIL_CLOSED_MEANS } else { K::SKIPPED_MEANS };
                tracing::warn!(kind = K::KIND, namespace, name, field = %e.path, reason = %e.reason, "{} {} failed conversion, {enforced}: {e}", K::KIND, display_key(&key));
            }
            match stand_in {
                Some(m) => Entry::FailClosed(Arc::new(K::share(m, stores))),
                None => Entry::Invalid(key),
            }
        }
    }
}

/// The agent's stores: every watched object, converted on arrival. Cheap to snapshot:
/// a snapshot clones `Arc`s, never objects.
#[derive(Debug, Clone, Default)]
pub struct AgentStores {
    pods: Objects<model::Pod>,
    namespaces: Objects<model::Namespace>,
    policies: Objects<model::Policy>,
    pub(super) nodes: Objects<tiers::Node>,
    pub(super) cluster_network_policies: Objects<tiers::ClusterPolicy>,
    pub(super) admin_network_policies: Objects<tiers::ClusterPolicy>,
    pub(super) baseline_admin_network_policies: Objects<tiers::ClusterPolicy>,
    /// The active nodes, sorted by name (rebuilt when a node changes).
    node_list: Arc<Vec<tiers::Node>>,
    /// The cluster policies of the three stores in [`tiers::ClusterPolicy::precedence`]
    /// order, rebuilt when one changes, so that every snapshot shares the list.
    pub(super) cluster_policies: model::SharedList<tiers::ClusterPolicy>,
    /// What of the cluster policies is not enforced as written (rebuilt with the list).
    pub(super) tier_report: super::tiers::TierReport,
    /// Cluster policies (kind, name, what) already warned about for a peer the agent does
    /// not enforce as written: each is warned about once.
    pub(super) reported_peers: HashSet<(&'static str, String, &'static str)>,
    /// One copy of each distinct pod label set: replicas of a workload share theirs.
    pod_labels: Interner<model::Labels>,
    /// One copy of each node name and of each distinct container port list.
    node_names: Interner<str>,
    pod_ports: Interner<[model::ContainerPort]>,
    /// The objects that failed conversion, by kind and key, with the reason last warned of.
    failed: std::collections::HashMap<(&'static str, ObjectKey), String>,
}

/// Hands out one shared `Arc` per distinct value. Values no longer used anywhere else are
/// dropped in sweeps, each after the table has doubled since the last one, so a sweep
/// costs amortized O(1) per insertion.
#[derive(Debug)]
struct Interner<T: ?Sized> {
    values: HashSet<Arc<T>>,
    sweep_at: usize,
}

// Not derived: the derive would require `T: Clone`, and `str` is not.
impl<T: ?Sized> Clone for Interner<T> {
    fn clone(&self) -> Self {
        Interner { values: self.values.clone(), sweep_at: self.sweep_at }
    }
}

/// Below this many distinct values an interner never sweeps.
const MIN_SWEEP: usize = 1024;

impl<T: ?Sized> Default for Interner<T> {
    fn default() -> Self {
        Interner { values: HashSet::new(), sweep_at: MIN_SWEEP }
    }
}

impl<T: Eq + Hash + ?Sized> Interner<T> {
    fn intern(&mut self, value: Arc<T>) -> Arc<T> {
        if let Some(shared) = self.values.get(&*value) {
            return shared.clone();
        }
        if self.values.len() >= self.sweep_at {
            self.values.retain(|v| Arc::strong_count(v) > 1);
            self.sweep_at = (2 * self.values.len()).max(MIN_SWEEP);
        }
        self.values.insert(value.clone());
        value
    }
}

impl AgentStores {
    /// Applies one watcher event; whether a sync may see a change (an update that changes
    /// nothing of a kind with [`Watched::unchanged`] does not).
    pub fn handle<K: Watched>(&mut self, event: &Event<K>) -> bool {
        match event {
            Event::Init => K::objects(self).init(),
            Event::InitApply(obj) => {
                let entry = entry(obj, self);
                K::objects(self).apply(entry, true)
            }
            Event::InitDone => {
                K::objects(self).init_done();
                K::changed(self);
            }
            Event::Apply(obj) => {
                let entry = entry(obj, self);
                let objects = K::objects(self);
                if let (Entry::Active(new), Some(Entry::Active(old))) = (&entry, objects.live.get(&entry as &dyn Keyed))
                    && K::unchanged(old, new)
                {
                    return false;
                }
                objects.apply(entry, false);
                K::changed(self);
            }
            Event::Delete(obj) => {
                let key = object_key(obj.meta(), K::DEFAULT_NAMESPACE);
                self.forget_failure(K::KIND, || Box::new(key.clone()));
                if !self.reported_peers.is_empty() {
                    self.reported_peers.retain(|(kind, name, _)| (*kind, name.as_str()) != (K::KIND, key.1.as_str()));
                }
                K::objects(self).delete(&key);
                K::changed(self);
            }
        }
        true
    }

    /// Empties the store of `K` as a list of no objects would (a CRD kind whose CRD is not
    /// installed); whether it held anything.
    pub(super) fn clear<K: Watched>(&mut self) -> bool {
        let had = !K::objects(self).live.is_empty();
        self.handle::<K>(&Event::Init);
        self.handle::<K>(&Event::InitDone);
        had
    }

    /// The object converts again, or is gone: a new failure of it is warned about anew.
    /// (Almost always no object has failed: then this costs no key.)
    fn forget_failure(&mut self, kind: &'static str, key: impl FnOnce() -> Box<ObjectKey>) {
        if !self.failed.is_empty() {
            self.failed.remove(&(kind, *key()));
        }
    }

    /// Adds or replaces one object (outside any list), as a watch `Apply` would.
    pub fn apply<K: Watched>(&mut self, obj: &K) {
        self.handle(&Event::Apply(obj.clone()));
    }

    /// The active objects, each list sorted by namespace and name.
    pub fn snapshot(&self) -> Snapshot {
        let (namespaces, a, _) = self.namespaces.active();
        let (pods, b, _) = self.pods.active();
        let (policies, c, fail_closed_policies) = self.policies.active();
        let d = self.nodes.invalid;
        let unenforced =
            [&self.cluster_network_policies, &self.admin_network_policies, &self.baseline_admin_network_policies];
        let e: usize = unenforced.iter().map(|o| o.invalid).sum();
        let fail_closed_cluster_policies = unenforced.iter().map(|o| o.fail_closed).sum();
        Snapshot {
            namespaces,
            pods,
            policies,
            skipped_objects: a + b + c + d + e,
            fail_closed_policies,
            pod_cidrs: Vec::new(),
            cluster_policies: Arc::clone(&self.cluster_policies),
            nodes: Arc::clone(&self.node_list),
            fail_closed_cluster_policies,
            unenforced_cluster_policies: e,
        }
    }
}

impl Snapshot {
    /// The snapshot the agent's stores would hold after listing these objects.
    pub fn from_objects(namespaces: &[Namespace], pods: &[Pod], policies: &[NetworkPolicy]) -> Snapshot {
        let mut stores = AgentStores::default();
        namespaces.iter().for_each(|o| stores.apply(o));
        pods.iter().for_each(|o| stores.apply(o));
        policies.iter().for_each(|o| stores.apply(o));
        stores.snapshot()
    }
}

/// Called with each watch event's resource before the event reaches the stores. The
/// agent installs none; it is the seam through which tests make the watch task fail.
pub type EventHook = Arc<dyn Fn(Resource) + Send + Sync>;

/// How the watch supervisor treats a watch task that ended (it only ends by panicking).
#[derive(Debug, Clone)]
pub struct Supervision {
    /// First delay before restarting the watches; doubles per restart, up to `restart_max`.
    pub restart_initial: Duration,
    pub restart_max: Duration,
    /// More than this many restarts within `window`: give up, and the agent exits non-zero.
    pub max_restarts: usize,
    pub window: Duration,
    /// The supervisor proves it is alive at least this often (liveness).
    pub heartbeat: Duration,
}

impl Default for Supervision {
    fn default() -> Self {
        Supervision {
            restart_initial: Duration::from_secs(1),
            restart_max: Duration::from_secs(60),
            max_restarts: 5,
            window: Duration::from_secs(600),
            heartbeat: Duration::from_secs(5),
        }
    }
}

/// What the watches are started with.
#[derive(Clone)]
pub struct WatchOptions {
    pub config: watcher::Config,
    /// The agent's own Node, read for its `spec.podCIDRs`; `None` reads no Node.
    pub node: Option<String>,
    /// Pod CIDRs given on the command line; every snapshot carries their union with the
    /// Node's.
    pub pod_cidrs: Vec<IpNet>,
    /// The first sync waits at most this long for the Node's first read.
    pub node_wait: Duration,
    pub supervision: Supervision,
    pub on_event: Option<EventHook>,
    /// A cluster policy kind whose CRD is not installed is probed for again after this
    /// long plus up to as much again ([`super::tiers::CRD_RECHECK`]).
    pub crd_recheck: Duration,
}

/// How long the first sync waits for the agent's Node by default (see [`WatchOptions`]).
pub const DEFAULT_NODE_WAIT: Duration = Duration::from_secs(10);

impl WatchOptions {
    pub fn new(config: watcher::Config) -> Self {
        WatchOptions {
            config,
            node: None,
            pod_cidrs: Vec::new(),
            node_wait: DEFAULT_NODE_WAIT,
            supervision: Supervision::default(),
            on_event: None,
            crd_recheck: super::tiers::CRD_RECHECK,
        }
    }
}

/// The watches could not be kept running.
#[derive(Debug, thiserror::Error)]
#[error("the watches ended {restarts} times within {window:?} (last: {last}); giving up")]
pub struct WatchError {
    pub restarts: usize,
    pub window: Duration,
    pub last: String,
}

/// Read side of the watches: the stores and the counters. Cheap to clone.
#[derive(Clone)]
pub struct ClusterWatch {
    stores: Arc<Mutex<AgentStores>>,
    counters: Arc<WatchCounters>,
    listed: Arc<Notify>,
    /// The Node's pod CIDRs, as last read.
    node_cidrs: Arc<Mutex<Vec<IpNet>>>,
    flag_cidrs: Arc<Vec<IpNet>>,
    /// Until when the first sync waits for the Node's read (`None`: no Node is read).
    node_wait_until: Option<Instant>,
}

/// Aborts a spawned task when dropped: the supervisor's watch task ends with it.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl ClusterWatch {
    /// Starts watching Pods, Namespaces and NetworkPolicies with `config` and the
    /// default supervision; see [`ClusterWatch::start_with`].
    pub fn start(
        client: Client,
        config: watcher::Config,
        trigger: Trigger,
    ) -> (ClusterWatch, BoxFuture<'static, Result<(), WatchError>>) {
        ClusterWatch::start_with(client, WatchOptions::new(config), trigger)
    }

    /// Starts watching. Returns the read side and the supervisor future that drives the
    /// watches (spawn it). Every change to a store, and every completed (re)list, calls
    /// `trigger.notify()`. The supervisor restarts the watches when their task ends (a
    /// panic), asking for a full sync, and resolves with an error only when it gives up.
    ///
    /// ```text
    ///  supervisor ──spawn──► watch task: join(pods, namespaces, policies, node)
    ///      │  ◄── ended (panic) ──┘
    ///      └─ backoff, request a full sync, spawn again (relists); too often: Err
    /// ```
    pub fn start_with(
        client: Client,
        options: WatchOptions,
        trigger: Trigger,
    ) -> (ClusterWatch, BoxFuture<'static, Result<(), WatchError>>) {
        let counters = WatchCounters::default();
        counters.node_watched.store(options.node.is_some(), Ordering::SeqCst);
        let watch = ClusterWatch {
            stores: Arc::default(),
            counters: Arc::new(counters),
            listed: Arc::new(Notify::new()),
            node_cidrs: Arc::default(),
            flag_cidrs: Arc::new(options.pod_cidrs.clone()),
            node_wait_until: options.node.as_ref().map(|_| Instant::now() + options.node_wait),
        };
        let driver = watch.clone().supervise(client, options, trigger);
        (watch, Box::pin(driver))
    }

    async fn supervise(self, client: Client, options: WatchOptions, trigger: Trigger) -> Result<(), WatchError> {
        let policy = options.supervision.clone();
        let mut recent: std::collections::VecDeque<Instant> = Default::default();
        let mut delay = policy.restart_initial;
        loop {
            let mut task = tokio::spawn(self.clone().run_all(client.clone(), options.clone(), trigger.clone()));
            let _abort = AbortOnDrop(task.abort_handle());
            let ended = loop {
                self.beat();
                tokio::select! {
                    ended = &mut task => break ended,
                    _ = tokio::time::sleep(policy.heartbeat) => {}
                }
            };
            let why = match ended {
                Err(e) if e.is_panic() => {
                    let panic = e.into_panic();
                    let msg = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into());
                    format!("panicked: {msg}")
                }
                Err(e) => e.to_string(),
                Ok(()) => "ended".into(),
            };
            // The stores keep the last state; every watch is down until it lists again.
            for r in self.counters.watched() {
                self.counters.failed(r);
            }
            let now = Instant::now();
            recent.retain(|at| now.duration_since(*at) < policy.window);
            if recent.is_empty() {
                delay = policy.restart_initial;
            }
            recent.push_back(now);
            if recent.len() > policy.max_restarts {
                tracing::error!(restarts = recent.len(), window = ?policy.window, last = %why, "watch task keeps failing; giving up");
                return Err(WatchError { restarts: recent.len(), window: policy.window, last: why });
            }
            self.counters.restarts.fetch_add(1, Ordering::SeqCst);
            tracing::error!(reason = %why, restart_in = ?delay, "watch task ended; restarting the watches (relist, then a full sync)");
            let restart_at = Instant::now() + delay;
            while Instant::now() < restart_at {
                self.beat();
                tokio::time::sleep_until(restart_at.min(Instant::now() + policy.heartbeat)).await;
            }
            delay = (delay * 2).min(policy.restart_max);
            trigger.request_full();
        }
    }

    fn beat(&self) {
        self.counters.supervisor_beat.store(self.counters.stamp(), Ordering::SeqCst);
    }

    /// The watch task: every watch, until one panics (none ends otherwise).
    async fn run_all(self, client: Client, options: WatchOptions, trigger: Trigger) {
        let WatchOptions { config, node, on_event: hook, crd_recheck, .. } = options;
        let node_watch = async {
            let Some(name) = node else { return };
            let wait = async {
                if let Some(until) = self.node_wait_until {
                    tokio::time::sleep_until(until).await;
                    if !self.counters.listed(Resource::Node) {
                        tracing::warn!(node = %name, "the Node was not read in time: syncing without its pod CIDRs until it is");
                        trigger.notify();
                    }
                }
            };
            let api = Api::<k8s_openapi::api::core::v1::Node>::all(client.clone());
            futures::join!(super::node::watch_node(&self, api, &name, &trigger, hook.as_ref()), wait);
        };
        use super::tiers::{Admin, Baseline, ClusterNetwork};
        let hook = hook.as_ref();
        futures::join!(
            self.run_one(
                Api::<convert::SlimPod>::all(client.clone()),
                &(),
                config.clone(),
                Resource::Pods,
                &trigger,
                hook,
                false
            ),
            self.run_one(
                Api::<Namespace>::all(client.clone()),
                &(),
                config.clone(),
                Resource::Namespaces,
                &trigger,
                hook,
                false
            ),
            self.run_one(
                Api::<NetworkPolicy>::all(client.clone()),
                &(),
                config.clone(),
                Resource::NetworkPolicies,
                &trigger,
                hook,
                false
            ),
            self.run_one(
                Api::<k8s_openapi::api::core::v1::Node>::all(client.clone()),
                &(),
                config.clone(),
                Resource::Nodes,
                &trigger,
                hook,
                false
            ),
            self.run_crd::<ClusterNetwork>(&client, &config, crd_recheck, &trigger, hook),
            self.run_crd::<Admin>(&client, &config, crd_recheck, &trigger, hook),
            self.run_crd::<Baseline>(&client, &config, crd_recheck, &trigger, hook),
            node_watch,
        );
    }

    /// True once Pods, Namespaces and NetworkPolicies have each listed once, and the Node
    /// (if one is read) has been read or its wait is over.
    pub fn is_ready(&self) -> bool {
        let node_ready = match self.node_wait_until {
            None => true,
            Some(until) => self.counters.listed(Resource::Node) || Instant::now() >= until,
        };
        node_ready && Resource::ALL.iter().all(|r| self.counters.listed(*r))
    }

    /// Waits until [`ClusterWatch::is_ready`].
    pub async fn wait_ready(&self) {
        loop {
            // Created before the check: a `notify_waiters` in between still reaches it.
            let listed = self.listed.notified();
            if self.is_ready() {
                return;
            }
            listed.await;
        }
    }

    /// The active objects of the three stores, each sorted by namespace and name, and
    /// the pod CIDRs (command line and Node).
    pub fn snapshot(&self) -> Snapshot {
        let mut snapshot = self.lock().snapshot();
        snapshot.pod_cidrs = self.pod_cidrs();
        snapshot
    }

    /// The union of the command line's and the Node's pod CIDRs, sorted, each once.
    pub fn pod_cidrs(&self) -> Vec<IpNet> {
        let node = self.node_cidrs.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let all: BTreeSet<IpNet> = self.flag_cidrs.iter().copied().chain(node).collect();
        all.into_iter().collect()
    }

    pub fn counters(&self) -> &Arc<WatchCounters> {
        &self.counters
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AgentStores> {
        self.stores.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn stores(&self) -> std::sync::MutexGuard<'_, AgentStores> {
        self.lock()
    }

    /// Wakes [`ClusterWatch::wait_ready`] after a resource listed.
    pub(super) fn listed_notify(&self) {
        self.listed.notify_waiters();
    }

    /// Records the Node's pod CIDRs; a change asks for a full sync with them.
    pub(super) fn set_node_cidrs(&self, cidrs: Vec<IpNet>, trigger: &Trigger) {
        let first = !self.counters.per[Resource::Node.index()].listed.swap(true, Ordering::SeqCst);
        let changed = {
            let mut current = self.node_cidrs.lock().unwrap_or_else(|e| e.into_inner());
            let changed = *current != cidrs;
            *current = cidrs;
            changed
        };
        if first || changed {
            let union = self.pod_cidrs();
            tracing::info!(pod_cidrs = ?union, "pod CIDRs of this node (command line and Node)");
            if union.is_empty() {
                tracing::warn!(
                    "no pod CIDRs (neither --pod-cidr nor the Node's spec.podCIDRs): unknown pods are not guarded"
                );
            }
        }
        if first {
            self.listed.notify_waiters();
        }
        if changed {
            trigger.request_full();
        } else if first {
            trigger.notify();
        }
    }

    pub(super) fn node_counters(&self) -> (&WatchCounters, Resource) {
        (&self.counters, Resource::Node)
    }

    /// Lists and watches one kind forever; with `until_not_found`, until the API server
    /// answers 404 (a CRD kind whose CRD is gone).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn run_one<K: Watched>(
        &self,
        api: Api<K>,
        dynamic_type: &K::DynamicType,
        config: watcher::Config,
        resource: Resource,
        trigger: &Trigger,
        hook: Option<&EventHook>,
        until_not_found: bool,
    ) {
        let per = &self.counters.per[resource.index()];
        // 410s answered to the watch start in a row, and when the last came.
        let mut gone_in_row: u32 = 0;
        let mut last_gone: Option<Instant> = None;
        loop {
            let stream = watcher(api.clone(), config.clone()).backoff(WatchBackoff::new());
            let mut stream = std::pin::pin!(stream);
            while let Some(item) = stream.next().await {
                let event = match item {
                    Ok(event) => event.modify(|object| object.arrived(dynamic_type)),
                    Err(error) if until_not_found && is_not_found(&error) => {
                        tracing::warn!(resource = resource.as_str(), %error, "the API server no longer serves this kind (its CRD was deleted?)");
                        return;
                    }
                    Err(error) => {
                        self.counters.failed(resource);
                        if is_gone_at_watch_start(&error) {
                            tracing::warn!(resource = resource.as_str(), %error, "watch start answered 410 Gone; relisting");
                            break;
                        }
                        tracing::warn!(resource = resource.as_str(), %error, "watch error; retrying with backoff");
                        continue;
                    }
                };
                if let Some(hook) = hook {
                    hook(resource);
                }
                let changed = self.lock().handle(&event);
                if resource.is_tiers() {
                    let report = self.lock().tier_report.clone();
                    self.counters.set_tier_report(report);
                }
                match event {
                    Event::Init => {
                        let n = per.lists.fetch_add(1, Ordering::SeqCst);
                        if n > 0 {
                            tracing::info!(resource = resource.as_str(), "relisting");
                        }
                    }
                    Event::InitApply(_) => {}
                    Event::InitDone => {
                        self.counters.delivered(resource);
                        if !per.listed.swap(true, Ordering::SeqCst) {
                            tracing::info!(resource = resource.as_str(), "initial list complete");
                            self.listed.notify_waiters();
                        }
                        trigger.notify();
                    }
                    Event::Apply(_) | Event::Delete(_) => {
                        self.counters.delivered(resource);
                        per.events.fetch_add(1, Ordering::SeqCst);
                        if changed {
                            trigger.notify();
                        }
                    }
                }
            }
            // kube-runtime's watcher answers a 410 at the watch start by starting the
            // same watch again, forever (kube-rs issue 1042): a new watcher lists afresh.
            // Back off only if the 410s keep coming.
            let now = Instant::now();
            gone_in_row = match last_gone {
                Some(at) if now.duration_since(at) < Duration::from_secs(60) => gone_in_row.saturating_add(1),
                _ => 0,
            };
            last_gone = Some(now);
            if gone_in_row > 0 {
                let delay =
                    Duration::from_secs(1).saturating_mul(1 << (gone_in_row - 1).min(5)).min(Duration::from_secs(30));
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Did the watch start fail with HTTP 410 Gone (the resourceVersion is too old)?
///
/// "When retained changes are unavailable [...] the server will respond with 410 Gone;
/// clients must handle this by relisting" (Kubernetes API concepts, efficient detection
/// of changes). The real apiserver sends it as an `ERROR` event, which kube-runtime
/// handles; proxies and aggregated servers also answer the request itself with 410.
fn is_gone_at_watch_start(error: &watcher::Error) -> bool {
    matches!(error, watcher::Error::WatchStartFailed(kube::Error::Api(status)) if status.code == 410)
}

/// Did the API server answer 404 Not Found (to the list, the watch, or in the stream)?
fn is_not_found(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => status.code == 404,
        watcher::Error::WatchError(status) => status.code == 404,
        _ => false,
    }
}

/// The pause between a watch error and the watcher's next attempt (a relist, or the watch
/// again).
///
/// kube-runtime's default (client-go's reflector: 800 ms doubling to 30 s, with up to as much
/// again of jitter) waits 0.8-1.6 s even after a routine `410 Expired` in the stream, which
/// etcd compaction causes several times an hour: for that long a deleted pod's address stays
/// allowed to its old peers, and a new pod stays cut off by the unknown-pod guard. So an
/// error that ends a healthy watch (events delivered for [`WatchBackoff::HEALTHY`] since the
/// last error, or no error for [`WatchBackoff::QUIET`]) is retried at once, after at most
/// [`WatchBackoff::FIRST_JITTER`] (a fleet of agents does not relist in lockstep). Errors
/// that come back sooner back off from 800 ms doubling to 30 s, as client-go does: a watch
/// that fails right after each relist must not relist as fast as the apiserver answers
/// (kube-runtime restarts its schedule on every event, which would let it).
#[derive(Debug)]
pub struct WatchBackoff {
    /// Errors in the current run of them.
    errors: u32,
    last_error: Option<tokio::time::Instant>,
    /// The first event delivered after the last error.
    healthy_since: Option<tokio::time::Instant>,
    /// xorshift state for the jitter.
    jitter: u64,
}

impl WatchBackoff {
    /// The most the first retry of a run of errors waits.
    pub const FIRST_JITTER: Duration = Duration::from_millis(100);
    /// Events delivered this long after an error end a run of errors.
    pub const HEALTHY: Duration = Duration::from_secs(5);
    /// No error for this long ends a run of errors too (a watch with nothing to deliver).
    pub const QUIET: Duration = Duration::from_secs(60);
    const INITIAL: Duration = Duration::from_millis(800);
    /// The longest pause between retries.
    pub const MAX: Duration = Duration::from_secs(30);

    pub fn new() -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        WatchBackoff { errors: 0, last_error: None, healthy_since: None, jitter: (nanos as u64) | 1 }
    }

    /// The pause before the retry after error number `errors` of a run (0: the first), with
    /// `jitter` in `[0, 1)`.
    pub fn delay(errors: u32, jitter: f64) -> Duration {
        if errors == 0 {
            return Self::FIRST_JITTER.mul_f64(jitter);
        }
        let base = Self::INITIAL.saturating_mul(1 << (errors - 1).min(6)).min(Self::MAX);
        base.saturating_add(base.mul_f64(jitter)).min(Self::MAX)
    }

    fn next_jitter(&mut self) -> f64 {
        self.jitter ^= self.jitter << 13;
        self.jitter ^= self.jitter >> 7;
        self.jitter ^= self.jitter << 17;
        (self.jitter >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let now = tokio::time::Instant::now();
        let healthy = self.healthy_since.is_some_and(|at| now.duration_since(at) >= Self::HEALTHY);
        let quiet = self.last_error.is_none_or(|at| now.duration_since(at) >= Self::QUIET);
        if healthy || quiet {
            self.errors = 0;
        }
        self.last_error = Some(now);
        self.healthy_since = None;
        let jitter = self.next_jitter();
        let delay = Self::delay(self.errors, jitter);
        self.errors = self.errors.saturating_add(1);
        Some(delay)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    /// Called on every event the watch delivers: the run of errors ends only once events
    /// have flowed for [`WatchBackoff::HEALTHY`] (see the type's doc).
    fn reset(&mut self) {
        self.healthy_since.get_or_insert_with(tokio::time::Instant::now);
    }
}

impl SnapshotSource for ClusterWatch {
    fn is_ready(&self) -> bool {
        ClusterWatch::is_ready(self)
    }

    fn snapshot(&self) -> Snapshot {
        ClusterWatch::snapshot(self)
    }
}

use kube::runtime::watcher::watcher;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::objects::{namespace, pod};

    fn names(s: &Snapshot) -> Vec<String> {
        s.pods.iter().map(|p| p.id.to_string()).collect()
    }

    #[test]
    fn a_relist_replaces_the_store_at_init_done_so_pods_deleted_meanwhile_vanish() {
        let mut stores = AgentStores::default();
        stores.apply(&pod("shop", "web-1", "node-a", "192.0.2.1", &[]));
        stores.apply(&pod("shop", "web-2", "node-a", "192.0.2.2", &[]));
        stores.handle(&Event::<Pod>::Init);
        stores.handle(&Event::InitApply(pod("shop", "web-2", "node-a", "192.0.2.2", &[("v", "2")])));
        // Until the relist is done, the old state stands.
        assert_eq!(names(&stores.snapshot()), ["shop/web-1", "shop/web-2"]);
        stores.handle(&Event::<Pod>::InitDone);
        let s = stores.snapshot();
        assert_eq!(names(&s), ["shop/web-2"]);
        assert_eq!(s.pods[0].labels["v"], "2");
    }

    #[test]
    fn invalid_objects_are_counted_and_pods_without_an_ip_take_no_part() {
        let mut stores = AgentStores::default();
        stores.apply(&namespace("shop", &[]));
        stores.apply(&pod("shop", "web-1", "node-a", "192.0.2.1", &[]));
        let mut pending = pod("shop", "pending", "node-a", "192.0.2.9", &[]);
        pending.status.as_mut().unwrap().pod_ip = None;
        stores.apply(&pending);
        stores.apply(&pod("shop", "broken", "node-a", "not-an-ip", &[]));
        let s = stores.snapshot();
        assert_eq!(names(&s), ["shop/web-1"]);
        assert_eq!(s.skipped_objects, 1);
        assert_eq!(s.namespaces.len(), 1);
        // Fixing the object clears the count; deleting it removes it.
        stores.apply(&pod("shop", "broken", "node-a", "192.0.2.3", &[]));
        assert_eq!(stores.snapshot().skipped_objects, 0);
        stores.handle(&Event::Delete(pod("shop", "broken", "node-a", "192.0.2.3", &[])));
        assert_eq!(names(&stores.snapshot()), ["shop/web-1"]);
    }

    #[test]
    fn a_snapshot_shares_the_stored_objects() {
        let mut stores = AgentStores::default();
        stores.apply(&pod("shop", "web-1", "node-a", "192.0.2.1", &[]));
        let (a, b) = (stores.snapshot(), stores.snapshot());
        assert!(Arc::ptr_eq(&a.pods[0], &b.pods[0]));
    }

    #[test]
    fn pods_with_equal_labels_share_one_label_map_and_relabelled_pods_get_their_own() {
        let mut stores = AgentStores::default();
        stores.apply(&pod("shop", "web-1", "node-a", "192.0.2.1", &[("app", "web")]));
        stores.apply(&pod("shop", "web-2", "node-b", "192.0.2.2", &[("app", "web")]));
        stores.apply(&pod("shop", "db-1", "node-b", "192.0.2.3", &[("app", "db")]));
        let s = stores.snapshot();
        assert!(Arc::ptr_eq(&s.pods[1].labels, &s.pods[2].labels), "web-1 and web-2 share");
        assert!(!Arc::ptr_eq(&s.pods[0].labels, &s.pods[1].labels));
        stores.apply(&pod("shop", "web-2", "node-b", "192.0.2.2", &[("app", "web"), ("v", "2")]));
        let s = stores.snapshot();
        assert_eq!(names(&s), ["shop/db-1", "shop/web-1", "shop/web-2"]);
        assert_eq!(s.pods[1].labels["app"], "web");
        assert!(!s.pods[1].labels.contains_key("v"), "relabelling web-2 leaves web-1 alone");
        assert_eq!(s.pods[2].labels["v"], "2");
    }

    #[test]
    fn pods_share_one_node_name_and_one_port_list_per_distinct_value() {
        let mut stores = AgentStores::default();
        stores.apply(&pod("shop", "web-1", "node-a", "192.0.2.1", &[]));
        stores.apply(&pod("shop", "web-2", "node-a", "192.0.2.2", &[]));
        let mut other_ports = pod("shop", "db-1", "node-b", "192.0.2.3", &[]);
        other_ports.spec.as_mut().unwrap().containers[0].ports.as_mut().unwrap()[0].container_port = 5432;
        stores.apply(&other_ports);
        let s = stores.snapshot();
        let [db, web1, web2] = [&s.pods[0], &s.pods[1], &s.pods[2]];
        assert_eq!((web1.node.as_str(), db.node.as_str()), ("node-a", "node-b"));
        assert!(Arc::ptr_eq(&Arc::<str>::from(web1.node.clone()), &Arc::<str>::from(web2.node.clone())));
        assert!(Arc::ptr_eq(&web1.ports, &web2.ports), "web-1 and web-2 declare the same ports");
        assert_eq!(db.ports[0].port, 5432);
        assert_eq!(web1.ports[0].port, 80);
    }

    #[test]
    fn a_pod_without_a_namespace_is_stored_and_deleted_as_the_default_namespace_one() {
        let mut stores = AgentStores::default();
        let mut unnamespaced = pod("ignored", "web-1", "node-a", "192.0.2.1", &[]);
        unnamespaced.metadata.namespace = None;
        stores.apply(&unnamespaced);
        assert_eq!(names(&stores.snapshot()), ["default/web-1"]);
        // The same object in the default namespace is the same entry, not a second one.
        stores.apply(&pod("default", "web-1", "node-a", "192.0.2.1", &[]));
        assert_eq!(names(&stores.snapshot()), ["default/web-1"]);
        stores.handle(&Event::Delete(unnamespaced));
        assert!(stores.snapshot().pods.is_empty());
    }

    #[test]
    fn a_pod_with_more_than_one_ip_per_family_is_invalid() {
        use k8s_openapi::api::core::v1::PodIP;
        let mut stores = AgentStores::default();
        let mut crowded = pod("shop", "web-1", "node-a", "192.0.2.1", &[]);
        let ips = ["192.0.2.1", "2001:db8::1", "192.0.2.2"].map(|ip| PodIP { ip: ip.into() });
        crowded.status.as_mut().unwrap().pod_ips = Some(ips.to_vec());
        stores.apply(&crowded);
        let s = stores.snapshot();
        assert!(s.pods.is_empty());
        assert_eq!(s.skipped_objects, 1);
    }

    #[test]
    fn an_entry_changing_between_active_inactive_and_invalid_keeps_one_slot() {
        let mut stores = AgentStores::default();
        stores.apply(&pod("shop", "web-1", "node-a", "192.0.2.1", &[]));
        let mut pending = pod("shop", "web-1", "node-a", "192.0.2.1", &[]);
        pending.status.as_mut().unwrap().pod_ip = None;
        stores.apply(&pending);
        assert!(stores.snapshot().pods.is_empty());
        stores.apply(&pod("shop", "web-1", "node-a", "not-an-ip", &[]));
        assert_eq!(stores.snapshot().skipped_objects, 1);
        stores.apply(&pod("shop", "web-1", "node-a", "192.0.2.1", &[]));
        let s = stores.snapshot();
        assert_eq!((names(&s), s.skipped_objects), (vec!["shop/web-1".to_string()], 0));
        assert_eq!(stores.pods.live.len(), 1);
    }

    /// The snapshot's lists as the stores' entries say they should be: every `Active`
    /// entry in key order, and the `Invalid` ones counted.
    fn expected_from_entries(stores: &AgentStores) -> (Vec<String>, usize) {
        let active = stores.pods.live.iter().filter_map(|e| match e {
            Entry::Active(p) => Some(p.id.to_string()),
            _ => None,
        });
        let invalid = stores.pods.live.iter().filter(|e| matches!(e, Entry::Invalid(_))).count();
        (active.collect(), invalid)
    }

    #[test]
    fn the_shared_active_list_follows_every_apply_delete_and_relist_and_never_changes_a_taken_snapshot() {
        for seed in 0..200 {
            let mut rng = crate::cli::generate::Rng::new(seed);
            let mut stores = AgentStores::default();
            let mut relisting = false;
            for step in 0..60 {
                let name = format!("p{}", rng.below(6));
                let namespace = ["a", "b"][rng.below(2)];
                let ip = format!("192.0.2.{}", 1 + rng.below(9));
                let mut object = pod(namespace, &name, "node-a", &ip, &[("step", &step.to_string())]);
                match rng.below(10) {
                    0 => object.status.as_mut().unwrap().pod_ip = None,
                    1 => object.status.as_mut().unwrap().pod_ip = Some("not-an-ip".into()),
                    _ => {}
                }
                let before = stores.snapshot();
                let frozen: Vec<String> = names(&before);
                let event = match (relisting, rng.below(12)) {
                    (false, 0) => {
                        relisting = true;
                        Event::Init
                    }
                    (true, 0 | 1) => {
                        relisting = false;
                        Event::InitDone
                    }
                    (true, _) => Event::InitApply(object),
                    (false, 1..=3) => Event::Delete(object),
                    (false, _) => Event::Apply(object),
                };
                stores.handle(&event);
                let after = stores.snapshot();
                assert_eq!(
                    (names(&after), after.skipped_objects),
                    expected_from_entries(&stores),
                    "seed {seed} step {step}"
                );
                assert_eq!(names(&before), frozen, "seed {seed} step {step}: a taken snapshot changed");
            }
        }
    }

    #[test]
    fn the_interner_forgets_label_sets_no_pod_uses_once_it_has_doubled() {
        let mut interner = Interner::default();
        let kept = interner.intern(Arc::new(model::Labels::from([("app".into(), "kept".into())])));
        for i in 0..MIN_SWEEP {
            interner.intern(Arc::new(model::Labels::from([("app".into(), format!("gone-{i}"))])));
        }
        // The sweep ran when the table was full: only `kept` and the newest value stay.
        assert_eq!(interner.values.len(), 2);
        assert!(interner.values.contains(&*kept));
        assert_eq!(interner.sweep_at, MIN_SWEEP);
        let again = interner.intern(Arc::new((*kept).clone()));
        assert!(Arc::ptr_eq(&kept, &again));
    }

    #[test]
    fn a_watch_error_after_a_quiet_spell_is_retried_at_once_and_errors_that_keep_coming_back_off_to_30_s() {
        for jitter in [0.0, 0.5, 0.999] {
            assert!(WatchBackoff::delay(0, jitter) <= WatchBackoff::FIRST_JITTER);
        }
        assert_eq!(WatchBackoff::delay(1, 0.0), Duration::from_millis(800));
        assert_eq!(WatchBackoff::delay(2, 0.0), Duration::from_millis(1600));
        assert_eq!(WatchBackoff::delay(3, 0.5), Duration::from_millis(4800));
        assert_eq!(WatchBackoff::delay(30, 0.9), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn the_watch_backoff_escalates_while_errors_follow_each_retry_and_starts_again_after_a_healthy_spell() {
        use kube::runtime::utils::Backoff;
        let mut backoff = WatchBackoff::new();
        assert!(backoff.next().unwrap() <= WatchBackoff::FIRST_JITTER, "a routine 410: at once");
        backoff.reset(); // the relist delivered events...
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(backoff.next().unwrap() >= Duration::from_millis(800), "...but it failed again soon: back off");
        backoff.reset();
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(backoff.next().unwrap() >= Duration::from_millis(1600));
        backoff.reset();
        tokio::time::advance(WatchBackoff::HEALTHY).await;
        assert!(backoff.next().unwrap() <= WatchBackoff::FIRST_JITTER, "healthy for a while: at once again");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(backoff.next().unwrap() >= Duration::from_millis(800), "no event since: a run of errors");
        tokio::time::advance(WatchBackoff::QUIET).await;
        assert!(backoff.next().unwrap() <= WatchBackoff::FIRST_JITTER, "no error for a minute: at once");
    }
}
