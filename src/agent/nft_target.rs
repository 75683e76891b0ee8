//! The real [`SyncTarget`]: snapshot → model → compile for this node → one atomic nft
//! transaction (the diff against what was last applied, or a full replacement). What a
//! sync replaces (the cluster and pod list before) is freed off its thread ([`dispose`]).
//!
//! ```text
//!  Snapshot ──Arcs──► Cluster ──IncrementalCompiler(node)──► desired ─┬─ full / nothing known ─► full_sync
//!   (the stores' lists,            (reuses untouched sets and chains, └─ else ─► diff_with(applied, desired, deltas)
//!    shared, not copied)            patches the others in place:          (reused sets skipped unread,
//!                                   `applied` keeps stand-ins, deltas)     patched ones by their deltas)
//! ```
//!
//! A sync that would add more elements to sets no rule looks up yet than a chunk (as many
//! as [`crate::nft::staging::chunk_for`] says: fewer when it brings changes, so that events
//! do not wait for a whole chunk of their own) commits a step instead
//! ([`crate::nft::staging`]): one chunk, the chains needing the rest held back. The step
//! is what is remembered as applied; the stats say how much is left, and the sync loop
//! syncs again at once.
//!
//! What was applied is remembered only after nft accepted it; any failure forgets it, so
//! the next sync replaces the whole table, compiled afresh. A table left by an earlier run
//! stays in force until the first (full) sync replaces it in the same transaction.
//!
//! With a conntrack table ([`NftTarget::with_conntrack`]), an accepted sync then ends the
//! flows it must (see [`crate::conntrack`]):
//!
//! ```text
//!  previous snapshot's pods ─┐
//!  this snapshot's pods ─────┴─► gone addresses ─┐   (none, and the transaction only adds
//!  may_tighten(tx, desired) or an earlier failure ┤    allows: no dump at all)
//!                                                 ▼
//!            dump ──► flows_to_delete(flows, gone, Interpreter(desired)) ──► delete
//! ```
//!
//! A conntrack failure does not fail the sync (the ruleset is in force); it is logged and
//! the next sync tries again. The agent hands the cleanup to a worker beside the sync loop
//! instead ([`NftTarget::with_conntrack_in_background`]), paced to one dump per 200 ms.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::agent::conntrack_worker::{ConntrackWorker, Decision};
use crate::agent::dispose;
use crate::agent::rule_counters::RuleCounters;
use crate::agent::{ConntrackFlowsDeleted, Snapshot, SyncError, SyncStats, SyncTarget};
use crate::compile::{Compiled, IncrementalCompiler, NodeConfig, Observe};
use crate::conntrack::{ConntrackError, ConntrackTable, Flow, NodeAddresses, Reason, flows_to_delete, may_tighten};
use crate::nft::diff::{diff_with, full_sync};
use crate::nft::interpret::Interpreter;
use crate::nft::ir::Ruleset;
use crate::nft::staging;
use crate::nft::{NftError, Nftables, Op, Transaction};
use crate::policy::model::{Cluster, Namespace, NamespaceMap, Pod, SharedList, namespace_map};
use crate::policy::tiers::DomainMap;

/// Idle sets (peer sets no chain looks up any more) stay in the kernel while they hold at
/// most this many elements per cluster pod in all, unless [`NftTarget::keeping_idle_sets`]
/// says otherwise: a policy that comes back to the node finds its big peer sets there
/// instead of sending them again. An element costs the agent ~26 bytes and the kernel
/// ~100, so at most 0.1 and 0.4 KiB per cluster pod. Replaying the agent bench's churn,
/// more kept elements per pod mean fewer big syncs, most recently used sets first
/// (the counts: benches/README.md, agent).
pub const IDLE_SET_ELEMENTS_PER_POD: usize = 4;

/// Where flows are ended: in the sync itself, or by a worker beside the sync loop.
#[derive(Debug)]
enum Conntrack {
    Inline(Box<dyn ConntrackTable>),
    Background(ConntrackWorker),
}

/// Programs one node's nftables table from whole snapshots.
#[derive(Debug)]
pub struct NftTarget<N: Nftables> {
    nft: N,
    compiler: IncrementalCompiler,
    /// The ruleset nft last accepted; `None` before the first sync and after any failure.
    applied: Option<Arc<Ruleset>>,
    /// The last snapshot's namespace list and its map: namespaces change rarely, and an
    /// unchanged map lets the compiler trust its caches without comparing every label.
    namespaces: Option<(SharedList<Namespace>, Arc<NamespaceMap>)>,
    /// Idle-set budget the compiler is built with (kept when it is rebuilt).
    idle_set_elements_per_pod: usize,
    /// The node's conntrack table, when flows are to be ended (`--conntrack-cleanup`).
    conntrack: Option<Conntrack>,
    /// The pods as of the last conntrack cleanup: their addresses that are gone since
    /// are flushed at the next one.
    conntrack_pods: Option<SharedList<Pod>>,
    /// A cleanup that had to decide flows failed, or a decision handed over to the worker
    /// was taken back before it ran: the next sync decides them whatever its transaction.
    conntrack_pending: bool,
    /// The per-rule totals the metrics export, kept monotonic across syncs.
    rule_counters: Option<RuleCounters>,
    /// Elements an incremental sync adds at most to sets no rule looks up yet (see
    /// [`crate::nft::staging`]): a fixed number (0 never stages), or `None`: by the
    /// sync's compile time and kind ([`staging::chunk_for`]).
    staging_chunk: Option<usize>,
    /// The last sync was a step that brought changes with a small chunk: the next one
    /// takes a full chunk whatever it brings (see [`staging::SyncKind`]).
    rode_along: bool,
}

impl<N: Nftables> NftTarget<N> {
    pub fn new(nft: N, node: impl Into<String>, table: impl Into<String>) -> Self {
        let config = NodeConfig { table: table.into(), ..NodeConfig::new(node) };
        let compiler = IncrementalCompiler::new(config).keeping_idle_sets(IDLE_SET_ELEMENTS_PER_POD);
        NftTarget {
            nft,
            compiler,
            applied: None,
            namespaces: None,
            idle_set_elements_per_pod: IDLE_SET_ELEMENTS_PER_POD,
            conntrack: None,
            conntrack_pods: None,
            conntrack_pending: false,
            rule_counters: None,
            staging_chunk: None,
            rode_along: false,
        }
    }

    /// Fills sets no rule looks up yet `chunk` elements per sync (0 fills them whole, in
    /// one transaction with the rules naming them). By default the chunk follows the
    /// compile's time and what the sync brings ([`staging::chunk_for`]).
    pub fn staging_fills(mut self, chunk: usize) -> Self {
        self.staging_chunk = Some(chunk);
        self
    }

    /// Keeps `counters` told of every applied ruleset's named counters, and has it read
    /// them right before a sync replaces or deletes them (see [`RuleCounters`]).
    pub fn with_rule_counters(mut self, counters: RuleCounters) -> Self {
        self.rule_counters = Some(counters);
        self
    }

    /// After each accepted sync, deletes from `table` the flows of pods that are gone and
    /// the flows the new ruleset denies (without it, conntrack is left alone).
    pub fn with_conntrack(mut self, table: impl ConntrackTable + 'static) -> Self {
        self.conntrack = Some(Conntrack::Inline(Box::new(table)));
        self
    }

    /// As [`NftTarget::with_conntrack`], but on a worker thread that dumps at most once per
    /// `pace` (see [`ConntrackWorker`]): the sync returns as soon as the kernel committed.
    /// What was deleted shows in a later sync's stats.
    /// `after_run` is called on the worker after each cleanup (the agent trims its heap).
    pub fn with_conntrack_in_background(
        mut self,
        table: impl ConntrackTable + 'static,
        pace: std::time::Duration,
        after_run: impl Fn() + Send + 'static,
    ) -> std::io::Result<Self> {
        self.conntrack = Some(Conntrack::Background(ConntrackWorker::start(Box::new(table), pace, after_run)?));
        Ok(self)
    }

    /// Waits until the conntrack cleanup handed to a worker is done (or `limit` passes);
    /// whether it is. Inline cleanups are done when the sync returns.
    pub fn conntrack_settle(&self, limit: std::time::Duration) -> bool {
        match &self.conntrack {
            Some(Conntrack::Background(worker)) => worker.settle(limit),
            _ => true,
        }
    }

    /// Keeps idle sets up to `elements_per_pod` elements per cluster pod (see
    /// [`IDLE_SET_ELEMENTS_PER_POD`], the default; 0 keeps none).
    pub fn keeping_idle_sets(mut self, elements_per_pod: usize) -> Self {
        self.compiler = IncrementalCompiler::new(self.compiler.config().clone()).keeping_idle_sets(elements_per_pod);
        self.idle_set_elements_per_pod = elements_per_pod;
        self
    }

    /// Compiles with these counters and drop log (the default: [`Observe::default`]).
    pub fn observing(mut self, observe: Observe) -> Self {
        let config = NodeConfig { observe, ..self.compiler.config().clone() };
        self.compiler = IncrementalCompiler::new(config).keeping_idle_sets(self.idle_set_elements_per_pod);
        self
    }

    /// Compiles with `pod_cidrs` from now on. The compiler starts afresh with the new
    /// configuration, and the caller must sync fully: every chain may change.
    fn use_pod_cidrs(&mut self, pod_cidrs: &[ipnet::IpNet]) {
        let config = NodeConfig { pod_cidrs: pod_cidrs.to_vec(), ..self.compiler.config().clone() };
        tracing::info!(pod_cidrs = ?config.pod_cidrs, "compiling with new pod CIDRs; full sync");
        self.compiler = IncrementalCompiler::new(config).keeping_idle_sets(self.idle_set_elements_per_pod);
    }

    pub fn config(&self) -> &NodeConfig {
        self.compiler.config()
    }

    /// The ruleset nft last accepted, if the target still trusts it.
    pub fn last_applied(&self) -> Option<&Ruleset> {
        self.applied.as_deref()
    }

    pub fn nftables(&self) -> &N {
        &self.nft
    }

    pub fn into_nftables(self) -> N {
        self.nft
    }

    /// The namespace map of `snapshot`, built again only when its namespace list changed.
    fn namespace_map(&mut self, snapshot: &Snapshot) -> Arc<NamespaceMap> {
        match &self.namespaces {
            Some((list, map)) if Arc::ptr_eq(list, &snapshot.namespaces) => Arc::clone(map),
            _ => {
                let map = Arc::new(namespace_map(snapshot.namespaces.iter().map(|n| (**n).clone())));
                self.namespaces = Some((Arc::clone(&snapshot.namespaces), Arc::clone(&map)));
                map
            }
        }
    }

    /// Whether the last compile was of `snapshot`'s very objects (the stores' shared lists,
    /// unchanged since): a sync then only goes on with a fill.
    fn compiled_last(&self, snapshot: &Snapshot) -> bool {
        let Some(last) = self.compiler.last_cluster() else { return false };
        Arc::ptr_eq(&last.pods, &snapshot.pods)
            && Arc::ptr_eq(&last.policies, &snapshot.policies)
            && Arc::ptr_eq(&last.cluster_policies, &snapshot.cluster_policies)
            && Arc::ptr_eq(&last.nodes, &snapshot.nodes)
            && self.namespaces.as_ref().is_some_and(|(list, _)| Arc::ptr_eq(list, &snapshot.namespaces))
    }

    /// The ruleset this node should have for `snapshot`, its sets patched in place where
    /// `applied` (what the kernel has) lets go of them: `applied` is then good for the diff
    /// against the result only (see [`IncrementalCompiler::compile`]).
    fn desired(&mut self, snapshot: &Snapshot, applied: Option<&mut Ruleset>) -> Compiled {
        let namespaces = self.namespace_map(snapshot);
        let cluster = Cluster::from_sorted_after(
            self.compiler.last_cluster(),
            namespaces,
            Arc::clone(&snapshot.pods),
            Arc::clone(&snapshot.policies),
        );
        self.compiler.compile(&with_tiers(cluster, snapshot), applied)
    }
}

/// The model cluster of a snapshot (its objects were converted, and invalid ones left out,
/// when they arrived), and how many objects were left out.
pub fn cluster(snapshot: &Snapshot) -> (Cluster, usize) {
    let namespaces = namespace_map(snapshot.namespaces.iter().map(|n| (**n).clone()));
    (cluster_with(snapshot, Arc::new(namespaces)), snapshot.skipped_objects)
}

pub(crate) fn cluster_with(snapshot: &Snapshot, namespaces: Arc<NamespaceMap>) -> Cluster {
    // The stores keep their objects sorted by namespace and name.
    let cluster = Cluster::from_sorted(namespaces, Arc::clone(&snapshot.pods), Arc::clone(&snapshot.policies));
    with_tiers(cluster, snapshot)
}

/// `cluster` with the snapshot's cluster policies and nodes, shared as they are (the
/// stores keep them in precedence and name order). No domain name resolves in the agent:
/// `domainNames` peers match nothing (see [`crate::agent::tiers`]).
pub(crate) fn with_tiers(cluster: Cluster, snapshot: &Snapshot) -> Cluster {
    static NO_DOMAINS: std::sync::OnceLock<Arc<DomainMap>> = std::sync::OnceLock::new();
    let domains = Arc::clone(NO_DOMAINS.get_or_init(Arc::default));
    cluster.with_sorted_tiers(Arc::clone(&snapshot.cluster_policies), Arc::clone(&snapshot.nodes), domains)
}

impl<N: Nftables + Send + 'static> SyncTarget for NftTarget<N> {
    fn sync(&mut self, snapshot: &Snapshot, full: bool) -> Result<SyncStats, SyncError> {
        let started = std::time::Instant::now();
        // The pod CIDRs (flag and Node) travel with the snapshot; a change recompiles all.
        let full = if snapshot.pod_cidrs != self.compiler.config().pod_cidrs {
            self.use_pod_cidrs(&snapshot.pod_cidrs);
            true
        } else {
            full
        };
        // What was applied serves this diff only (the compiler turns the sets it patches
        // into stand-ins there); a full sync needs none of it.
        let mut applied = self.applied.take().filter(|_| !full);
        if let Some(Conntrack::Background(worker)) = &self.conntrack
            && worker.retract_decision()
        {
            // Handed over again, with this sync's ruleset, once it is applied.
            self.conntrack_pending = true;
        }
        if full {
            self.compiler.forget();
        }
        // Before the compile: it makes this snapshot's objects the last compiled.
        let rode_along = std::mem::take(&mut self.rode_along);
        let kind = if rode_along || self.compiled_last(snapshot) {
            staging::SyncKind::GoesOnWithAFill
        } else {
            staging::SyncKind::BringsChanges
        };
        // `retired` (the cluster before) is dropped once the ruleset is applied, and the
        // deltas (which may hold sets' earlier versions) at the end: off the path to the commit.
        let Compiled { ruleset: desired, mut set_deltas, idle, retired } =
            self.desired(snapshot, applied.as_mut().map(Arc::make_mut));
        // A big fill of sets no rule looks up yet goes in chunks, one per sync, and the
        // rules that need them with the last (see crate::nft::staging). Full syncs never.
        let chunk = self.staging_chunk.unwrap_or_else(|| staging::chunk_for(started.elapsed(), kind));
        let staging_started = std::time::Instant::now();
        let step = applied.as_ref().filter(|_| chunk > 0).and_then(|a| staging::stage(a, &desired, &set_deltas, chunk));
        let staging_time = staging_started.elapsed();
        let mut stats = SyncStats {
            chains: desired.chains.len(),
            sets: desired.sets.len() + desired.maps.len(),
            set_elements: desired.element_count(),
            rules: desired.rule_count(),
            idle_sets: idle.sets,
            idle_set_elements: idle.elements,
            skipped_objects: snapshot.skipped_objects,
            fail_closed_policies: snapshot.fail_closed_policies,
            ..SyncStats::default()
        };
        // `after`: what the kernel is to hold once `tx` is in.
        let (tx, after, step) = match (step, &applied) {
            (Some(step), Some(applied)) => {
                set_deltas.extend(step.deltas);
                match diff_with(applied, &step.ruleset, &set_deltas) {
                    // A new layout after all: the whole desired table, at once.
                    tx if is_full_sync(&tx) => (full_sync(&desired), desired, None),
                    tx => {
                        self.rode_along = kind == staging::SyncKind::BringsChanges;
                        (tx, step.ruleset, Some((step.remaining, step.held_chains)))
                    }
                }
            }
            (_, Some(applied)) => (diff_with(applied, &desired, &set_deltas), desired, None),
            (_, None) => (full_sync(&desired), desired, None),
        };
        if let Some((remaining, held_chains)) = step {
            stats.staged_elements_remaining = remaining;
            stats.staged_chains_held = held_chains;
        }
        stats.transaction_ops = tx.ops.len();
        stats.compile = started.elapsed();
        if tx.is_empty() {
            // The kernel holds what was applied, which equals `after`.
            self.applied = Some(Arc::new(after));
            dispose::later(retired);
            tracing::debug!("ruleset unchanged; nothing to apply");
            self.end_flows(snapshot, false, &mut stats);
            return Ok(stats);
        }
        // Asked before the apply: `after` moves into `applied` then.
        let tightens = self.conntrack.is_some() && may_tighten(&tx, &after);
        let replaces = is_full_sync(&tx);
        let kind = if replaces { "full" } else { "incremental" };
        if let Some(counters) = &self.rule_counters
            && (replaces || tx.ops.iter().any(|op| matches!(op, Op::DeleteCounter { .. })))
            && let Err(error) = counters.read()
        {
            // Their counts since the last scrape are lost; the totals stay monotonic.
            tracing::debug!(%error, "could not read the rule counters before they go");
        }
        let applying = std::time::Instant::now();
        let applied = self.nft.apply(&tx);
        stats.apply = applying.elapsed();
        dispose::later(retired);
        match applied {
            Ok(()) => {
                tracing::info!(
                    kind,
                    ops = tx.ops.len(),
                    staged_elements_remaining = stats.staged_elements_remaining,
                    staged_chains_held = stats.staged_chains_held,
                    touched = %tx.stats(),
                    table = %tx.table,
                    compile_ms = stats.compile.as_secs_f64() * 1e3,
                    of_which_staging_ms = staging_time.as_secs_f64() * 1e3,
                    apply_ms = stats.apply.as_secs_f64() * 1e3,
                    "applied"
                );
                if let Some(counters) = &self.rule_counters {
                    counters.applied(&after.counters, replaces);
                }
                self.applied = Some(Arc::new(after));
                self.end_flows(snapshot, tightens, &mut stats);
                Ok(stats)
            }
            Err(e) => {
                // We no longer know what the kernel has: the next sync replaces everything.
                self.applied = None;
                Err(SyncError::Apply(Box::new(e)))
            }
        }
    }

    fn cleanup(&mut self) -> Result<(), SyncError> {
        self.applied = None;
        // `add` first so that `delete` cannot fail on a missing table; one transaction.
        let tx = Transaction { table: self.config().table.clone(), ops: vec![Op::AddTable, Op::DeleteTable] };
        self.nft.apply(&tx).map_err(|e| SyncError::Apply(Box::new(e)))
    }
}

impl<N: Nftables> NftTarget<N> {
    /// The pods the next sync's cleanup compares with; the list before is freed off the
    /// sync thread (see [`dispose`]).
    fn remember_pods(&mut self, pods: &SharedList<Pod>) {
        if let Some(before) = self.conntrack_pods.replace(Arc::clone(pods)) {
            dispose::later(before);
        }
    }

    /// Ends the flows the sync just applied calls for (see the module doc): those of pods
    /// gone since the last cleanup, and, when `tightens` (or an earlier cleanup failed),
    /// those the applied ruleset denies. Needs `self.applied` to be what nft holds.
    fn end_flows(&mut self, snapshot: &Snapshot, tightens: bool, stats: &mut SyncStats) {
        let Some(conntrack) = self.conntrack.as_mut() else { return };
        let started = std::time::Instant::now();
        let gone: HashSet<IpAddr> = match &self.conntrack_pods {
            Some(before) if !Arc::ptr_eq(before, &snapshot.pods) => {
                crate::conntrack::decide::gone_addresses(before, &snapshot.pods)
            }
            _ => HashSet::new(),
        };
        let decide = (tightens || self.conntrack_pending).then_some(()).and(self.applied.as_ref());
        let node = self.compiler.config().node.as_str();
        let table = match conntrack {
            Conntrack::Background(worker) => {
                if !gone.is_empty() || decide.is_some() {
                    let decide = decide.map(|rs| Decision {
                        ruleset: Arc::clone(rs),
                        pods: Arc::clone(&snapshot.pods),
                        node: node.to_string(),
                    });
                    self.conntrack_pending &= decide.is_none();
                    worker.post(gone, decide);
                }
                stats.conntrack_flows_deleted = worker.take_deleted();
                self.remember_pods(&snapshot.pods);
                return;
            }
            Conntrack::Inline(table) => table.as_mut(),
        };
        if gone.is_empty() && decide.is_none() {
            self.remember_pods(&snapshot.pods);
            return;
        }
        match end_flows(table, &gone, decide.map(|rs| (&**rs, &snapshot.pods[..], node))) {
            Ok(deleted) => {
                stats.conntrack_flows_deleted = deleted;
                self.remember_pods(&snapshot.pods);
                self.conntrack_pending = false;
                stats.conntrack = started.elapsed();
                if deleted.pod_deleted + deleted.denied > 0 {
                    tracing::info!(
                        pod_deleted = deleted.pod_deleted,
                        denied = deleted.denied,
                        ms = stats.conntrack.as_secs_f64() * 1e3,
                        "conntrack entries deleted"
                    );
                }
            }
            Err(e) => {
                // The ruleset is in force; the flows are ended at the next sync.
                self.conntrack_pending |= decide.is_some();
                stats.conntrack = started.elapsed();
                tracing::warn!(error = %e, gone = gone.len(), "conntrack cleanup failed; retrying at the next sync");
            }
        }
    }
}

/// One dump of `table`, then the deletes: flows touching `gone`, then (with a ruleset, the
/// node's pods and its name) the flows that ruleset denies.
pub(crate) fn end_flows(
    table: &mut dyn ConntrackTable,
    gone: &HashSet<IpAddr>,
    ruleset: Option<(&Ruleset, &[Arc<Pod>], &str)>,
) -> Result<ConntrackFlowsDeleted, ConntrackError> {
    let flows = table.flows()?;
    let addresses = match ruleset {
        Some((_, pods, node)) => Some(NodeAddresses::new(pods, node, table.local_addresses()?)),
        None => None,
    };
    let interpreter = ruleset.map(|(rs, ..)| Interpreter::new(rs));
    let picked = flows_to_delete(&flows, gone, interpreter.as_ref().zip(addresses.as_ref()));
    let of = |reason: Reason| -> Vec<Flow> { picked.iter().filter(|(_, r)| *r == reason).map(|(f, _)| **f).collect() };
    let (pod_deleted, denied) = (of(Reason::PodGone), of(Reason::Denied));
    let mut deleted = ConntrackFlowsDeleted::default();
    if !pod_deleted.is_empty() {
        deleted.pod_deleted = table.delete(&pod_deleted)?;
    }
    if !denied.is_empty() {
        deleted.denied = table.delete(&denied)?;
    }
    Ok(deleted)
}

/// Is `tx` a whole-table replacement (as made by [`full_sync`])?
pub fn is_full_sync(tx: &Transaction) -> bool {
    matches!(tx.ops.as_slice(), [Op::AddTable, Op::DeleteTable, Op::DefineTable(_)])
}

/// An nftables shared between the target and its owner (tests keep one clone to inspect
/// the fake while the agent runs).
impl<N: Nftables> Nftables for Arc<Mutex<N>> {
    fn apply(&mut self, tx: &Transaction) -> Result<(), NftError> {
        self.lock().unwrap_or_else(|e| e.into_inner()).apply(tx)
    }

    fn check(&self, tx: &Transaction) -> Result<(), NftError> {
        self.lock().unwrap_or_else(|e| e.into_inner()).check(tx)
    }

    fn list(&self, table: &str) -> Result<String, NftError> {
        self.lock().unwrap_or_else(|e| e.into_inner()).list(table)
    }

    fn counters(&self, table: &str) -> Result<Vec<crate::nft::CounterValue>, NftError> {
        self.lock().unwrap_or_else(|e| e.into_inner()).counters(table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nft::fake::FakeNftables;

    #[test]
    fn a_full_sync_is_one_transaction_that_replaces_the_table() {
        let rs = Ruleset::new("t");
        let tx = full_sync(&rs);
        assert!(is_full_sync(&tx));
        let text = tx.render();
        let add = text.find("add table inet t").unwrap();
        let del = text.find("delete table inet t").unwrap();
        assert!(add < del, "{text}");
    }

    #[test]
    fn a_change_of_the_pod_cidrs_compiles_with_them_and_replaces_the_whole_table() {
        let mut t = NftTarget::new(FakeNftables::new(), "node-a", "t");
        let mut s = Snapshot::default();
        t.sync(&s, false).unwrap();
        assert!(t.config().pod_cidrs.is_empty());
        s.pod_cidrs = vec!["10.244.1.0/24".parse().unwrap()];
        t.sync(&s, false).unwrap();
        assert_eq!(t.config().pod_cidrs, s.pod_cidrs);
        assert!(is_full_sync(t.nftables().last_transaction().unwrap()), "a new pod CIDR set is a full sync");
        // Unchanged again: back to diffs.
        t.sync(&s, false).unwrap();
        assert_eq!(t.nftables().applied_count(), 2);
    }

    #[test]
    fn an_unchanged_snapshot_applies_nothing_the_second_time() {
        let mut t = NftTarget::new(FakeNftables::new(), "node-a", "t");
        let s = Snapshot::default();
        let first = t.sync(&s, false).unwrap();
        assert_eq!(first.transaction_ops, 3);
        assert_eq!(t.nftables().applied_count(), 1);
        let second = t.sync(&s, false).unwrap();
        assert_eq!(second.transaction_ops, 0);
        assert_eq!(t.nftables().applied_count(), 1);
        // `full` always rebuilds.
        t.sync(&s, true).unwrap();
        assert!(is_full_sync(t.nftables().last_transaction().unwrap()));
        t.cleanup().unwrap();
        assert!(t.nftables().ruleset("t").is_none());
        t.cleanup().unwrap();
    }
}
