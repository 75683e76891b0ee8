//! Prometheus metrics of the agent (prometheus-client, OpenMetrics text).
//!
//! Sync metrics are recorded by the sync loop as they happen; watch counters and health
//! (watch up, time since each watch's last delivery, supervisor restarts) and the last
//! successful sync (age and Unix time) are copied in at scrape time by [`Metrics::encode`].
//!
//! ```text
//!  SyncLoop ──record_sync / record_failure──► Metrics ◄──encode(WatchCounters, SyncState)── /metrics
//! ```

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::trigger::{Arrivals, SyncState};
use super::watch::{Resource, WatchCounters};
use super::{Snapshot, SyncStats};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum Mode {
    partial,
    full,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ModeLabels {
    mode: Mode,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PhaseLabels {
    mode: Mode,
    phase: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FailureLabels {
    mode: Mode,
    kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    mode: Mode,
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PathLabels {
    path: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResourceLabels {
    resource: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

/// A policy rule's counter: bounded by the rules of the policies selecting local pods.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RuleLabels {
    tier: String,
    namespace: String,
    policy: String,
    direction: String,
    rule: String,
    action: String,
}

/// A final drop's counter: bounded by the (namespace, isolating policies) of local pods.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DeniedLabels {
    namespace: String,
    policy: String,
    direction: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PeerFieldLabels {
    kind: &'static str,
    field: &'static str,
}

fn mode(full: bool) -> ModeLabels {
    ModeLabels { mode: if full { Mode::full } else { Mode::partial } }
}

fn duration_histogram() -> Histogram {
    // 0.5 ms .. ~16 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

fn enforcement_histogram() -> Histogram {
    // 0.25 ms .. ~33 s: a quiet cluster's changes take a millisecond or two.
    Histogram::new(exponential_buckets(0.00025, 2.0, 18))
}

fn ops_histogram() -> Histogram {
    // 1 .. 262144 operations
    Histogram::new(exponential_buckets(1.0, 4.0, 10))
}

struct Inner {
    registry: Registry,
    sync_duration: Family<ModeLabels, Histogram>,
    sync_phase_duration: Family<PhaseLabels, Histogram>,
    sync_failures: Family<FailureLabels, Counter>,
    event_enforcement: Histogram,
    transaction_ops: Family<ModeLabels, Histogram>,
    chains: Gauge,
    sets: Gauge,
    set_elements: Gauge,
    idle_sets: Gauge,
    idle_set_elements: Gauge,
    staged_elements_remaining: Gauge,
    rules: Gauge,
    skipped_objects: Gauge,
    index_objects: Family<ResourceLabels, Gauge>,
    watch_events: Family<ResourceLabels, Counter>,
    watch_relists: Family<ResourceLabels, Counter>,
    watch_errors: Family<ResourceLabels, Counter>,
    seconds_since_sync: Gauge<f64, AtomicU64>,
    consecutive_failures: Gauge,
    syncs: Family<OutcomeLabels, Counter>,
    watch_up: Family<ResourceLabels, Gauge>,
    watch_event_age: Family<ResourceLabels, Gauge<f64, AtomicU64>>,
    watch_restarts: Counter,
    last_success_timestamp: Gauge<f64, AtomicU64>,
    transactions: Family<PathLabels, Counter>,
    netlink_fallbacks: Counter,
    guard_enabled: Gauge,
    fail_closed_policies: Gauge,
    crd_installed: Family<ResourceLabels, Gauge>,
    cluster_policies: Family<StateLabels, Gauge>,
    unenforced_peers: Family<PeerFieldLabels, Gauge>,
    foreign_table_changes: Counter,
    conntrack_flows_deleted: Family<ReasonLabels, Counter>,
    rule_packets: Family<RuleLabels, Counter>,
    denied_packets: Family<DeniedLabels, Counter>,
    started: std::time::Instant,
}

/// The agent's metrics. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("netpol");
        let sync_duration =
            Family::<ModeLabels, Histogram>::new_with_constructor(duration_histogram as fn() -> Histogram);
        let sync_phase_duration =
            Family::<PhaseLabels, Histogram>::new_with_constructor(duration_histogram as fn() -> Histogram);
        let sync_failures = Family::<FailureLabels, Counter>::default();
        let event_enforcement = enforcement_histogram();
        let transaction_ops = Family::<ModeLabels, Histogram>::new_with_constructor(ops_histogram as fn() -> Histogram);
        let chains = Gauge::default();
        let sets = Gauge::default();
        let set_elements = Gauge::default();
        let idle_sets = Gauge::default();
        let idle_set_elements = Gauge::default();
        let staged_elements_remaining = Gauge::default();
        let rules = Gauge::default();
        let skipped_objects = Gauge::default();
        let index_objects = Family::<ResourceLabels, Gauge>::default();
        let watch_events = Family::<ResourceLabels, Counter>::default();
        let watch_relists = Family::<ResourceLabels, Counter>::default();
        let watch_errors = Family::<ResourceLabels, Counter>::default();
        let seconds_since_sync = Gauge::<f64, AtomicU64>::default();
        let consecutive_failures = Gauge::default();
        let syncs = Family::<OutcomeLabels, Counter>::default();
        let watch_up = Family::<ResourceLabels, Gauge>::default();
        let watch_event_age = Family::<ResourceLabels, Gauge<f64, AtomicU64>>::default();
        let watch_restarts = Counter::default();
        let last_success_timestamp = Gauge::<f64, AtomicU64>::default();
        let transactions = Family::<PathLabels, Counter>::default();
        let netlink_fallbacks = Counter::default();
        let guard_enabled = Gauge::default();
        let fail_closed_policies = Gauge::default();
        let crd_installed = Family::<ResourceLabels, Gauge>::default();
        let cluster_policies = Family::<StateLabels, Gauge>::default();
        let unenforced_peers = Family::<PeerFieldLabels, Gauge>::default();
        let foreign_table_changes = Counter::default();
        let conntrack_flows_deleted = Family::<ReasonLabels, Counter>::default();
        let rule_packets = Family::<RuleLabels, Counter>::default();
        let denied_packets = Family::<DeniedLabels, Counter>::default();

        registry.register_with_unit(
            "sync_duration",
            "Time to compile and apply one sync, by mode (partial or full)",
            prometheus_client::registry::Unit::Seconds,
            sync_duration.clone(),
        );
        registry.register_with_unit(
            "sync_phase_duration",
            "Time of one part of a successful sync, by mode: compile (snapshot to the transaction) \
             and apply (the kernel commit)",
            prometheus_client::registry::Unit::Seconds,
            sync_phase_duration.clone(),
        );
        registry.register("sync_failures", "Failed syncs by mode and failure kind", sync_failures.clone());
        registry.register_with_unit(
            "event_enforcement_latency",
            "Time from a change's arrival at the agent (a watch event, a finished list, a node change) to \
             the end of the kernel commit that enforces it: the first successful sync that took it and left \
             no set still to fill",
            prometheus_client::registry::Unit::Seconds,
            event_enforcement.clone(),
        );
        registry.register("sync_transaction_ops", "Operations per nft transaction, by mode", transaction_ops.clone());
        registry.register("ruleset_chains", "Chains in the applied ruleset", chains.clone());
        registry.register("ruleset_sets", "Sets and maps in the applied ruleset", sets.clone());
        registry.register(
            "ruleset_set_elements",
            "Elements across all sets and maps of the applied ruleset",
            set_elements.clone(),
        );
        registry.register(
            "ruleset_idle_sets",
            "Sets of the applied ruleset no rule looks up, kept for policies that come back to the node",
            idle_sets.clone(),
        );
        registry.register("ruleset_idle_set_elements", "Elements across the idle sets", idle_set_elements.clone());
        registry.register(
            "ruleset_staged_elements_remaining",
            "Elements still to add, a chunk per sync, to new sets whose rules wait for them to be complete",
            staged_elements_remaining.clone(),
        );
        registry.register("ruleset_rules", "Rules in the applied ruleset", rules.clone());
        registry.register(
            "skipped_objects",
            "Objects skipped at the last sync because they failed conversion",
            skipped_objects.clone(),
        );
        registry.register(
            "index_objects",
            "Objects in the watch stores at the last sync, by resource",
            index_objects.clone(),
        );
        registry.register(
            "watch_events",
            "Watch events (applied or deleted objects) received, by resource",
            watch_events.clone(),
        );
        registry.register(
            "watch_relists",
            "Relists (after 410 Gone or a failed watch), by resource",
            watch_relists.clone(),
        );
        registry.register(
            "watch_errors",
            "Watch errors (each retried with backoff), by resource",
            watch_errors.clone(),
        );
        registry.register_with_unit(
            "last_successful_sync_age",
            "Time since the last successful sync (since start when none yet)",
            prometheus_client::registry::Unit::Seconds,
            seconds_since_sync.clone(),
        );
        registry.register(
            "sync_consecutive_failures",
            "Failed syncs since the last successful one",
            consecutive_failures.clone(),
        );
        registry.register("syncs", "Sync attempts by mode and outcome (success or failure)", syncs.clone());
        registry.register(
            "watch_up",
            "1 while the watch is live (listed, and delivering or recovered from its last error), by resource",
            watch_up.clone(),
        );
        registry.register_with_unit(
            "watch_last_event_age",
            "Time since the watch last delivered a list, an event or (the Node's watch) a bookmark, by resource",
            prometheus_client::registry::Unit::Seconds,
            watch_event_age.clone(),
        );
        registry.register(
            "watch_restarts",
            "Restarts of the watches by their supervisor (after the watch task ended)",
            watch_restarts.clone(),
        );
        registry.register_with_unit(
            "last_successful_sync_timestamp",
            "Unix time of the last successful sync (0 before the first)",
            prometheus_client::registry::Unit::Seconds,
            last_success_timestamp.clone(),
        );
        registry.register(
            "nft_transactions",
            "nftables transactions applied, by path (netlink: the agent's own socket; nft: the nft command)",
            transactions.clone(),
        );
        registry.register(
            "netlink_fallbacks",
            "Transactions that went through the nft command instead of netlink",
            netlink_fallbacks.clone(),
        );
        registry.register(
            "unknown_pod_guard_enabled",
            "1 when pod CIDRs are known (--pod-cidr or the Node's spec.podCIDRs) and traffic of unknown \
             addresses inside them is dropped; 0 when the guard is off",
            guard_enabled.clone(),
        );
        registry.register(
            "policies_fail_closed",
            "NetworkPolicies enforced fail-closed at the last sync (they isolate what they select and allow \
             nothing): they failed conversion, or this node could not enforce them and quarantined them",
            fail_closed_policies.clone(),
        );
        registry.register(
            "crd_installed",
            "Whether the CRD of a cluster policy kind is installed (1) or not (0: the agent works without the kind and probes for it every 30-60 s)",
            crd_installed.clone(),
        );
        registry.register(
            "cluster_policies",
            "Cluster policies (ClusterNetworkPolicy, AdminNetworkPolicy, BaselineAdminNetworkPolicy) by state: enforced, fail_closed (failed conversion, enforced by a deny stand-in), unenforced (failed conversion, subject unreadable: not enforced)",
            cluster_policies.clone(),
        );
        registry.register(
            "cluster_policies_unenforced_peers",
            "Cluster policies with peers the agent does not enforce as written, by kind and field: domainNames (no DNS-aware enforcement: they match nothing), unknown (a newer API's peer: the rule fails closed)",
            unenforced_peers.clone(),
        );
        registry.register(
            "foreign_table_changes",
            "Changes another program made to the agent's table (or lost nf_tables announcements), each \
             undone at once by a full sync",
            foreign_table_changes.clone(),
        );
        registry.register(
            "conntrack_flows_deleted",
            "Conntrack entries deleted after syncs, by reason (pod_deleted: an address of a pod that is gone; \
             denied: the new ruleset no longer admits the flow)",
            conntrack_flows_deleted.clone(),
        );
        registry.register(
            "policy_rule_packets",
            "Packets (first packets of connections) a policy rule matched on this node, by tier \
             (NetworkPolicy, Admin, Baseline), namespace (empty for cluster policies), policy, direction, \
             rule (index or name) and action (accept, deny, pass); read from the kernel at each scrape",
            rule_packets.clone(),
        );
        registry.register(
            "policy_denied_packets",
            "Packets an isolated local pod's chain dropped because no policy allowed them, by namespace, \
             policy (the isolating policies, comma-separated) and direction",
            denied_packets.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                registry,
                sync_duration,
                sync_phase_duration,
                sync_failures,
                event_enforcement,
                transaction_ops,
                chains,
                sets,
                set_elements,
                idle_sets,
                idle_set_elements,
                staged_elements_remaining,
                rules,
                skipped_objects,
                index_objects,
                watch_events,
                watch_relists,
                watch_errors,
                seconds_since_sync,
                consecutive_failures,
                syncs,
                watch_up,
                watch_event_age,
                watch_restarts,
                last_success_timestamp,
                transactions,
                netlink_fallbacks,
                guard_enabled,
                fail_closed_policies,
                crd_installed,
                cluster_policies,
                unenforced_peers,
                foreign_table_changes,
                conntrack_flows_deleted,
                rule_packets,
                denied_packets,
                started: std::time::Instant::now(),
            }),
        }
    }

    /// A successful sync.
    pub fn record_sync(&self, full: bool, elapsed: Duration, stats: &SyncStats) {
        let i = &self.inner;
        i.sync_duration.get_or_create(&mode(full)).observe(elapsed.as_secs_f64());
        let m = mode(full).mode;
        for (phase, took) in [("compile", stats.compile), ("apply", stats.apply)] {
            i.sync_phase_duration.get_or_create(&PhaseLabels { mode: m, phase }).observe(took.as_secs_f64());
        }
        i.transaction_ops.get_or_create(&mode(full)).observe(stats.transaction_ops as f64);
        i.chains.set(gauge_value(stats.chains));
        i.sets.set(gauge_value(stats.sets));
        i.set_elements.set(gauge_value(stats.set_elements));
        i.idle_sets.set(gauge_value(stats.idle_sets));
        i.idle_set_elements.set(gauge_value(stats.idle_set_elements));
        i.staged_elements_remaining.set(gauge_value(stats.staged_elements_remaining));
        i.rules.set(gauge_value(stats.rules));
        i.skipped_objects.set(gauge_value(stats.skipped_objects));
        i.syncs.get_or_create(&OutcomeLabels { mode: m, outcome: "success" }).inc();
        i.transactions.get_or_create(&PathLabels { path: "netlink" }).inc_by(stats.via_netlink);
        i.transactions.get_or_create(&PathLabels { path: "nft" }).inc_by(stats.via_nft);
        i.netlink_fallbacks.inc_by(stats.via_nft);
        i.fail_closed_policies.set(gauge_value(stats.fail_closed_policies));
        let deleted = stats.conntrack_flows_deleted;
        for (reason, n) in [("pod_deleted", deleted.pod_deleted), ("denied", deleted.denied)] {
            i.conntrack_flows_deleted.get_or_create(&ReasonLabels { reason }).inc_by(n as u64);
        }
    }

    /// The changes of `arrivals` are in the kernel since `enforced_at`.
    pub fn record_enforced(&self, arrivals: &Arrivals, enforced_at: tokio::time::Instant) {
        for (wait, n) in arrivals.waits(enforced_at) {
            for _ in 0..n {
                self.inner.event_enforcement.observe(wait.as_secs_f64());
            }
        }
    }

    /// Another program changed the table (the table monitor saw it).
    pub fn record_foreign_table_change(&self) {
        self.inner.foreign_table_changes.inc();
    }

    /// Whether the unknown-pod guard is on (pod CIDRs known).
    pub fn record_guard(&self, enabled: bool) {
        self.inner.guard_enabled.set(i64::from(enabled));
    }

    /// A failed sync.
    pub fn record_failure(&self, full: bool, elapsed: Duration, kind: &'static str) {
        let i = &self.inner;
        i.sync_duration.get_or_create(&mode(full)).observe(elapsed.as_secs_f64());
        i.sync_failures.get_or_create(&FailureLabels { mode: mode(full).mode, kind }).inc();
        i.syncs.get_or_create(&OutcomeLabels { mode: mode(full).mode, outcome: "failure" }).inc();
    }

    /// Store sizes, at each sync.
    pub fn record_index_sizes(&self, snapshot: &Snapshot) {
        for (resource, n) in [
            (Resource::Pods, snapshot.pods.len()),
            (Resource::Namespaces, snapshot.namespaces.len()),
            (Resource::NetworkPolicies, snapshot.policies.len()),
            (Resource::Nodes, snapshot.nodes.len()),
            (Resource::ClusterNetworkPolicies, count(snapshot, "ClusterNetworkPolicy")),
            (Resource::AdminNetworkPolicies, count(snapshot, "AdminNetworkPolicy")),
            (Resource::BaselineAdminNetworkPolicies, count(snapshot, "BaselineAdminNetworkPolicy")),
        ] {
            self.inner.index_objects.get_or_create(&ResourceLabels { resource: resource.as_str() }).set(gauge_value(n));
        }
    }

    /// Sets the per-rule families to these totals (monotonic: see
    /// [`crate::agent::RuleCounters`]); series no longer among them end.
    pub fn record_rule_counters(&self, totals: &[(std::sync::Arc<crate::nft::ir::CounterLabels>, u64)]) {
        let i = &self.inner;
        i.rule_packets.clear();
        i.denied_packets.clear();
        for (l, packets) in totals {
            let counter = if l.denied {
                i.denied_packets.get_or_create(&DeniedLabels {
                    namespace: l.namespace.clone(),
                    policy: l.policy.clone(),
                    direction: l.direction.clone(),
                })
            } else {
                i.rule_packets.get_or_create(&RuleLabels {
                    tier: l.tier.clone(),
                    namespace: l.namespace.clone(),
                    policy: l.policy.clone(),
                    direction: l.direction.clone(),
                    rule: l.rule.clone(),
                    action: l.action.clone(),
                })
            };
            set_counter(&counter, *packets);
        }
    }

    /// Renders the OpenMetrics text, after copying in the watch counters and the sync
    /// state.
    pub fn encode(&self, watch: Option<&WatchCounters>, state: &SyncState) -> String {
        let i = &self.inner;
        if let Some(w) = watch {
            for r in Resource::ALL {
                let l = ResourceLabels { resource: r.as_str() };
                set_counter(&i.watch_events.get_or_create(&l), w.events(r));
                set_counter(&i.watch_relists.get_or_create(&l), w.relists(r));
                set_counter(&i.watch_errors.get_or_create(&l), w.errors(r));
            }
            for r in w.watched() {
                let l = ResourceLabels { resource: r.as_str() };
                i.watch_up.get_or_create(&l).set(i64::from(w.live(r)));
                let age = w.since_last_delivery(r).unwrap_or_else(|| i.started.elapsed());
                i.watch_event_age.get_or_create(&l).set(age.as_secs_f64());
            }
            set_counter(&i.watch_restarts, w.restarts());
            for r in Resource::CRDS {
                if let Some(installed) = w.crd_installed(r) {
                    i.crd_installed.get_or_create(&ResourceLabels { resource: r.as_str() }).set(i64::from(installed));
                }
            }
            let report = w.tier_report();
            for (state, n) in [
                ("enforced", report.enforced),
                ("fail_closed", report.fail_closed),
                ("unenforced", report.unenforced.len()),
            ] {
                i.cluster_policies.get_or_create(&StateLabels { state }).set(gauge_value(n));
            }
            // Bounded: three kinds, two fields. A pair that went back to none shows 0.
            for kind in ["ClusterNetworkPolicy", "AdminNetworkPolicy", "BaselineAdminNetworkPolicy"] {
                for field in ["domainNames", "unknown"] {
                    let n = report.unenforced_peers.get(&(kind, field)).copied().unwrap_or(0);
                    let labels = PeerFieldLabels { kind, field };
                    if n > 0 || i.unenforced_peers.get(&labels).is_some() {
                        i.unenforced_peers.get_or_create(&labels).set(gauge_value(n));
                    }
                }
            }
        }
        let wall = state.last_success_wall.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
        i.last_success_timestamp.set(wall.map_or(0.0, |d| d.as_secs_f64()));
        let since = state.last_success.unwrap_or(i.started).elapsed();
        i.seconds_since_sync.set(since.as_secs_f64());
        i.consecutive_failures.set(i64::from(state.consecutive_failures));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &i.registry).expect("writing to a String cannot fail");
        out
    }
}

/// The snapshot's cluster policies of `kind`.
fn count(snapshot: &Snapshot, kind: &str) -> usize {
    snapshot.cluster_policies.iter().filter(|p| p.id.kind.as_str() == kind).count()
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn set_counter(c: &Counter, v: u64) {
    c.inner().store(v, std::sync::atomic::Ordering::Relaxed);
}

/// The value of one sample (its series as rendered: name, then labels if any) in the
/// OpenMetrics `text`.
#[cfg(test)]
pub(crate) fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_sync_and_watch_families() {
        let m = Metrics::new();
        m.record_sync(
            true,
            Duration::from_millis(3),
            &SyncStats {
                transaction_ops: 12,
                chains: 4,
                set_elements: 9,
                staged_elements_remaining: 5,
                via_netlink: 2,
                via_nft: 1,
                fail_closed_policies: 2,
                conntrack_flows_deleted: crate::agent::ConntrackFlowsDeleted { pod_deleted: 3, denied: 4 },
                ..SyncStats::default()
            },
        );
        m.record_guard(true);
        m.record_foreign_table_change();
        m.record_failure(false, Duration::from_millis(1), "apply");
        // Three changes, two of them within the merge window, enforced 3 ms after the first.
        let first = tokio::time::Instant::now();
        let mut arrivals = Arrivals::default();
        for after_us in [0, 10, 2000] {
            arrivals.push(first + Duration::from_micros(after_us));
        }
        m.record_enforced(&arrivals, first + Duration::from_millis(3));
        let watch = WatchCounters::default();
        let state = SyncState {
            last_success_wall: Some(std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
            ..SyncState::default()
        };
        let text = m.encode(Some(&watch), &state);
        for needle in [
            "netpol_sync_duration_seconds_bucket{",
            "mode=\"full\"",
            "netpol_sync_failures_total{mode=\"partial\",kind=\"apply\"} 1",
            "netpol_ruleset_chains 4",
            "netpol_ruleset_set_elements 9",
            "netpol_ruleset_staged_elements_remaining 5",
            "netpol_watch_events_total{resource=\"pods\"} 0",
            "netpol_watch_relists_total{resource=\"networkpolicies\"} 0",
            "netpol_last_successful_sync_age_seconds ",
            "netpol_sync_transaction_ops_count{mode=\"full\"} 1",
            "netpol_syncs_total{mode=\"full\",outcome=\"success\"} 1",
            "netpol_syncs_total{mode=\"partial\",outcome=\"failure\"} 1",
            "netpol_nft_transactions_total{path=\"netlink\"} 2",
            "netpol_nft_transactions_total{path=\"nft\"} 1",
            "netpol_netlink_fallbacks_total 1",
            "netpol_last_successful_sync_timestamp_seconds 1700000000.0",
            "netpol_unknown_pod_guard_enabled 1",
            "netpol_watch_up{resource=\"pods\"} 0",
            "netpol_watch_last_event_age_seconds{resource=\"namespaces\"} ",
            "netpol_watch_restarts_total 0",
            "netpol_policies_fail_closed 2",
            "netpol_foreign_table_changes_total 1",
            "netpol_conntrack_flows_deleted_total{reason=\"pod_deleted\"} 3",
            "netpol_conntrack_flows_deleted_total{reason=\"denied\"} 4",
            "netpol_event_enforcement_latency_seconds_count 3",
            "netpol_event_enforcement_latency_seconds_bucket{le=\"0.002\"} 1",
            "netpol_event_enforcement_latency_seconds_bucket{le=\"0.004\"} 3",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        let sum = sample(&text, "netpol_event_enforcement_latency_seconds_sum").expect("the histogram's sum");
        assert!((sum - 0.007).abs() < 1e-9, "3 + 3 + 1 ms, got {sum} s");
    }
}
