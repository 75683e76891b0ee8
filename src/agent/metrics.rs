//! Prometheus metrics of the agent (prometheus-client, OpenMetrics text).
//!
//! Sync metrics are recorded by the sync loop as they happen; watch counters and "seconds
//! since the last successful sync" are copied in at scrape time by [`Metrics::encode`].

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::trigger::SyncState;
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
struct ResourceLabels {
    resource: &'static str,
}

fn mode(full: bool) -> ModeLabels {
    ModeLabels { mode: if full { Mode::full } else { Mode::partial } }
}

fn duration_histogram() -> Histogram {
    // 0.5 ms .. ~16 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
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
    transaction_ops: Family<ModeLabels, Histogram>,
    chains: Gauge,
    sets: Gauge,
    set_elements: Gauge,
    idle_sets: Gauge,
    idle_set_elements: Gauge,
    rules: Gauge,
    skipped_objects: Gauge,
    index_objects: Family<ResourceLabels, Gauge>,
    watch_events: Family<ResourceLabels, Counter>,
    watch_relists: Family<ResourceLabels, Counter>,
    watch_errors: Family<ResourceLabels, Counter>,
    seconds_since_sync: Gauge<f64, AtomicU64>,
    consecutive_failures: Gauge,
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
        let transaction_ops = Family::<ModeLabels, Histogram>::new_with_constructor(ops_histogram as fn() -> Histogram);
        let chains = Gauge::default();
        let sets = Gauge::default();
        let set_elements = Gauge::default();
        let idle_sets = Gauge::default();
        let idle_set_elements = Gauge::default();
        let rules = Gauge::default();
        let skipped_objects = Gauge::default();
        let index_objects = Family::<ResourceLabels, Gauge>::default();
        let watch_events = Family::<ResourceLabels, Counter>::default();
        let watch_relists = Family::<ResourceLabels, Counter>::default();
        let watch_errors = Family::<ResourceLabels, Counter>::default();
        let seconds_since_sync = Gauge::<f64, AtomicU64>::default();
        let consecutive_failures = Gauge::default();

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
        Metrics {
            inner: Arc::new(Inner {
                registry,
                sync_duration,
                sync_phase_duration,
                sync_failures,
                transaction_ops,
                chains,
                sets,
                set_elements,
                idle_sets,
                idle_set_elements,
                rules,
                skipped_objects,
                index_objects,
                watch_events,
                watch_relists,
                watch_errors,
                seconds_since_sync,
                consecutive_failures,
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
        i.rules.set(gauge_value(stats.rules));
        i.skipped_objects.set(gauge_value(stats.skipped_objects));
    }

    /// A failed sync.
    pub fn record_failure(&self, full: bool, elapsed: Duration, kind: &'static str) {
        let i = &self.inner;
        i.sync_duration.get_or_create(&mode(full)).observe(elapsed.as_secs_f64());
        i.sync_failures.get_or_create(&FailureLabels { mode: mode(full).mode, kind }).inc();
    }

    /// Store sizes, at each sync.
    pub fn record_index_sizes(&self, snapshot: &Snapshot) {
        for (resource, n) in [
            (Resource::Pods, snapshot.pods.len()),
            (Resource::Namespaces, snapshot.namespaces.len()),
            (Resource::NetworkPolicies, snapshot.policies.len()),
        ] {
            self.inner.index_objects.get_or_create(&ResourceLabels { resource: resource.as_str() }).set(gauge_value(n));
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
        }
        let since = state.last_success.unwrap_or(i.started).elapsed();
        i.seconds_since_sync.set(since.as_secs_f64());
        i.consecutive_failures.set(i64::from(state.consecutive_failures));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &i.registry).expect("writing to a String cannot fail");
        out
    }
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn set_counter(c: &Counter, v: u64) {
    c.inner().store(v, std::sync::atomic::Ordering::Relaxed);
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
            &SyncStats { transaction_ops: 12, chains: 4, set_elements: 9, ..SyncStats::default() },
        );
        m.record_failure(false, Duration::from_millis(1), "apply");
        let watch = WatchCounters::default();
        let text = m.encode(Some(&watch), &SyncState::default());
        for needle in [
            "netpol_sync_duration_seconds_bucket{",
            "mode=\"full\"",
            "netpol_sync_failures_total{mode=\"partial\",kind=\"apply\"} 1",
            "netpol_ruleset_chains 4",
            "netpol_ruleset_set_elements 9",
            "netpol_watch_events_total{resource=\"pods\"} 0",
            "netpol_watch_relists_total{resource=\"networkpolicies\"} 0",
            "netpol_last_successful_sync_age_seconds ",
            "netpol_sync_transaction_ops_count{mode=\"full\"} 1",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }
}
