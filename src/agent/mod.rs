//! The Kubernetes-facing half of `netpol-agent`: watches, the coalescing sync trigger,
//! the admin server (metrics and probes) and the command-line configuration.
//!
//! The agent is level-triggered: watch events only update the stores and poke a
//! [`trigger::Trigger`]; the sync loop then hands the whole [`Snapshot`] to a
//! [`SyncTarget`] (compile + diff + nft), never a single event. Nothing is synced until
//! Pods, Namespaces, NetworkPolicies, Nodes and the cluster policy kinds (or their CRD's
//! 404) have all listed once (and the agent's Node has been read, or `--node-wait`
//! passed); any failure makes the next sync a full one.
//!
//! ```text
//!  supervisor ─► watch task (pods, namespaces, policies, own Node) ─► stores ─► Trigger
//!      │ restarts it (full sync after); gives up: run() ends with an error     │
//!      ▼                                                                       ▼
//!  heartbeats ──► admin (/healthz, /readyz, /metrics) ◄── SyncState ◄── SyncLoop ─► SyncTarget
//! ```

pub mod admin;
pub mod config;
pub mod conntrack_worker;
pub mod dispose;
pub mod metrics;
pub mod nft_target;
mod node;
pub mod quarantine;
pub mod rule_counters;
pub mod tiers;
pub mod trigger;
pub mod watch;

use std::future::Future;

use crate::policy::model::{Namespace, Pod, Policy, SharedList};
use crate::policy::tiers::{ClusterPolicy, Node};

pub use config::AgentConfig;
pub use metrics::Metrics;
pub use rule_counters::RuleCounters;
pub use trigger::{SyncLoop, SyncLoopConfig, SyncState, Trigger};
pub use watch::ClusterWatch;

/// Everything the agent knows about the cluster at one moment: the model objects taking
/// part (pods with an IP on a node, valid namespaces and policies), each list sorted by
/// namespace and name. Shares the lists with the watch stores (copied on write), so taking
/// one costs three reference counts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub namespaces: SharedList<Namespace>,
    pub pods: SharedList<Pod>,
    pub policies: SharedList<Policy>,
    /// Objects left out because they failed conversion or validation.
    pub skipped_objects: usize,
    /// NetworkPolicies that failed conversion and are enforced fail-closed (in `policies`).
    pub fail_closed_policies: usize,
    /// This node's pod CIDRs (`--pod-cidr` and the Node's `spec.podCIDRs`), sorted: the
    /// compiler drops traffic of addresses inside them that are no known local pod.
    pub pod_cidrs: Vec<ipnet::IpNet>,
    /// The cluster policies of the three kinds, in [`ClusterPolicy::precedence`] order
    /// (shared with the stores until one changes).
    pub cluster_policies: SharedList<ClusterPolicy>,
    /// Every node (name, labels, addresses), sorted by name: what `nodes` peers select.
    pub nodes: std::sync::Arc<Vec<Node>>,
    /// Cluster policies that failed conversion and are enforced by a deny stand-in (in
    /// `cluster_policies`), and those that cannot be enforced at all (in `skipped_objects`).
    pub fail_closed_cluster_policies: usize,
    pub unenforced_cluster_policies: usize,
}

/// What one sync did, for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Operations in the nft transaction sent (0 when nothing changed).
    pub transaction_ops: usize,
    /// Chains in the desired ruleset.
    pub chains: usize,
    /// Sets and maps in the desired ruleset.
    pub sets: usize,
    /// Elements across all sets and maps of the desired ruleset.
    pub set_elements: usize,
    /// Rules in the desired ruleset.
    pub rules: usize,
    /// Idle sets the desired ruleset keeps (no rule looks them up), and their elements.
    pub idle_sets: usize,
    pub idle_set_elements: usize,
    /// Objects skipped because they failed conversion or validation.
    pub skipped_objects: usize,
    /// NetworkPolicies that failed conversion and are enforced fail-closed.
    pub fail_closed_policies: usize,
    /// From the snapshot to the transaction (model, compile, diff).
    pub compile: std::time::Duration,
    /// Sending the transaction until the kernel committed it (zero when it was empty).
    pub apply: std::time::Duration,
    /// Transactions this sync sent over netlink, and through the nft command (a fallback);
    /// filled in by targets that know (the agent's netlink target).
    pub via_netlink: u64,
    pub via_nft: u64,
    /// Conntrack entries this sync deleted after the apply (a counter's increments; see
    /// [`crate::conntrack`]), and the time the dump, decision and deletes took.
    pub conntrack_flows_deleted: ConntrackFlowsDeleted,
    pub conntrack: std::time::Duration,
    /// Elements still to add to sets no rule looks up yet after this sync's chunk (see
    /// [`crate::nft::staging`]), and the chains held back until they are complete: more
    /// than zero, and the sync loop syncs again at once.
    pub staged_elements_remaining: usize,
    pub staged_chains_held: usize,
}

/// Conntrack entries deleted by one sync, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConntrackFlowsDeleted {
    /// An address at one end belonged to a pod that is gone (deleted, or given another IP).
    pub pod_deleted: usize,
    /// The ruleset just applied no longer admits the flow.
    pub denied: usize,
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a sync failed. [`SyncError::kind`] labels the failure metric.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("compiling the ruleset failed: {0}")]
    Compile(#[source] BoxError),
    #[error("applying the nftables transaction failed: {0}")]
    Apply(#[source] BoxError),
    #[error("sync panicked: {0}")]
    Panic(String),
    #[error("{0}")]
    Other(#[source] BoxError),
}

impl SyncError {
    /// A panic caught while syncing, with its message.
    pub fn from_panic(panic: &(dyn std::any::Any + Send)) -> SyncError {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        SyncError::Panic(message)
    }

    /// Short, stable label: `compile`, `apply`, `panic` or `other`.
    pub fn kind(&self) -> &'static str {
        match self {
            SyncError::Compile(_) => "compile",
            SyncError::Apply(_) => "apply",
            SyncError::Panic(_) => "panic",
            SyncError::Other(_) => "other",
        }
    }
}

/// Programs the node from a whole snapshot. Implemented by the real applier (compile,
/// diff against the last applied ruleset, one atomic nft transaction) and by
/// [`crate::testkit::sync::RecordingTarget`].
///
/// `sync` is blocking (it may run `nft`); the sync loop calls it on a blocking thread.
pub trait SyncTarget: Send + 'static {
    /// Brings the node in line with `snapshot`. With `full`, the target must not trust
    /// its memory of what is applied (rebuild everything in one transaction).
    fn sync(&mut self, snapshot: &Snapshot, full: bool) -> Result<SyncStats, SyncError>;

    /// Removes everything the target programmed (`--cleanup-on-exit`).
    fn cleanup(&mut self) -> Result<(), SyncError> {
        Ok(())
    }
}

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    #[error("kubernetes client: {0}")]
    Client(#[from] kube::Error),
    #[error("admin server on {addr}: {source}")]
    Admin { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("cleanup on exit failed: {0}")]
    Cleanup(#[source] SyncError),
    #[error("watches: {0}")]
    Watches(#[from] watch::WatchError),
}

/// Builds the Kubernetes client the configuration asks for: the given kubeconfig, else
/// in-cluster.
pub async fn kube_client(config: &AgentConfig) -> Result<kube::Client, AgentError> {
    let kc = match &config.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| AgentError::Kubeconfig(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|e| AgentError::Kubeconfig(format!("{}: {e}", path.display())))?
        }
        None => {
            kube::Config::incluster().map_err(|e| AgentError::Kubeconfig(format!("in-cluster configuration: {e}")))?
        }
    };
    Ok(kube::Client::try_from(kc)?)
}

/// Runs the agent until `shutdown` resolves: watches (supervised), admin server, sync
/// loop. Returns the target after cleaning up when `--cleanup-on-exit` is set, or
/// [`AgentError::Watches`] when the watch supervisor gave up.
pub async fn run<T: SyncTarget>(
    config: AgentConfig,
    target: T,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<T, AgentError> {
    run_with_counters(config, target, None, shutdown).await
}

/// [`run`], with `/metrics` exporting `rule_counters` (read at each scrape; the target
/// must be told of the same, see [`nft_target::NftTarget::with_rule_counters`]).
pub async fn run_with_counters<T: SyncTarget>(
    config: AgentConfig,
    target: T,
    rule_counters: Option<RuleCounters>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<T, AgentError> {
    let client = kube_client(&config).await?;
    let trigger = Trigger::new();
    let guard = config.unknown_pod_guard;
    if !guard {
        tracing::warn!(
            ignored_pod_cidrs = config.pod_cidrs.len(),
            "--unknown-pod-guard=false: pods the agent does not know yet stay open"
        );
    }
    let options = watch::WatchOptions {
        node: guard.then(|| config.node.clone()),
        pod_cidrs: if guard { config.pod_cidrs.clone() } else { Vec::new() },
        node_wait: config.node_wait,
        ..watch::WatchOptions::new(kube::runtime::watcher::Config::default().page_size(config.list_page_size))
    };
    let (watch, driver) = ClusterWatch::start_with(client, options, trigger.clone());
    let mut watch_task = tokio::spawn(driver);

    let metrics = Metrics::new();
    // Dropped (stopped) when the agent stops.
    let _table_monitor = if config.watch_table { watch_table(&config, &trigger, &metrics) } else { None };
    metrics.record_guard(guard && !config.pod_cidrs.is_empty());
    if guard && config.pod_cidrs.is_empty() {
        // The warning that the guard is off comes once the Node is read without CIDRs.
        tracing::info!("no --pod-cidr given: the unknown-pod guard depends on the Node's spec.podCIDRs");
    }
    let loop_config =
        SyncLoopConfig { debounce: config.debounce, resync_period: config.resync_period, ..SyncLoopConfig::default() };
    let sync_loop = SyncLoop::new(target, watch.clone(), trigger, loop_config).with_metrics(metrics.clone());
    let mut limits = admin::ProbeLimits::for_agent(config.resync_period, config.nft_timeout);
    limits.unready_after_failures = sync_loop.config().unready_after_failures;
    let admin_state = admin::AdminState {
        metrics,
        status: sync_loop.status(),
        watch_counters: Some(watch.counters().clone()),
        limits,
        rule_counters,
    };
    let admin_addr = config.admin_addr();
    let listener = tokio::net::TcpListener::bind(admin_addr)
        .await
        .map_err(|source| AgentError::Admin { addr: admin_addr, source })?;
    tracing::info!(addr = %admin_addr, node = %config.node, table = %config.table, "agent starting");
    let admin_task = tokio::spawn(admin::serve(listener, admin_state));

    // The sync loop ends on `shutdown`, or when the watch supervisor gives up: syncing
    // on from stores nobody updates would hide the failure.
    let (watches_failed_tx, watches_failed) = tokio::sync::oneshot::channel::<watch::WatchError>();
    let supervised = async {
        let error = match (&mut watch_task).await {
            Ok(Err(error)) => error,
            Ok(Ok(())) => watch::WatchError { restarts: 0, window: Default::default(), last: "ended".into() },
            Err(e) => watch::WatchError { restarts: 0, window: Default::default(), last: e.to_string() },
        };
        let _ = watches_failed_tx.send(error);
    };
    let stop = async {
        tokio::select! {
            _ = shutdown => {},
            _ = supervised => {},
        }
    };
    let mut target = sync_loop.run(stop).await;
    watch_task.abort();
    admin_task.abort();
    if let Ok(error) = watches_failed.await {
        return Err(AgentError::Watches(error));
    }
    if config.cleanup_on_exit {
        tracing::info!("cleaning up on exit");
        target = tokio::task::spawn_blocking(move || target.cleanup().map(|()| target))
            .await
            .map_err(|e| AgentError::Cleanup(SyncError::Panic(e.to_string())))?
            .map_err(AgentError::Cleanup)?;
    }
    Ok(target)
}

/// Resyncs fully as soon as another tool changes the table (see [`crate::nft::backend::monitor`]).
/// Without the monitor such a change waits for the periodic resync, which is said once.
fn watch_table(
    config: &AgentConfig,
    trigger: &Trigger,
    metrics: &Metrics,
) -> Option<crate::nft::backend::monitor::TableMonitor> {
    use crate::nft::backend::monitor::{Change, TableMonitor};
    let (trigger, metrics) = (trigger.clone(), metrics.clone());
    let mut pacer = LostResyncs::new(LOST_RESYNC_INTERVAL);
    let on_change = move |change| {
        let why = match change {
            Change::Foreign { port } => {
                tracing::warn!(port, "another program changed the table; resyncing it fully");
                resync_fully(&trigger, &metrics);
                return;
            }
            Change::Lost => "nf_tables announcements were lost (the monitor's buffer overflowed)",
            Change::Unheard { .. } => {
                "another program committed to nf_tables during one of our big commits, when the monitor did not listen"
            }
        };
        match pacer.on_lost(std::time::Instant::now()) {
            Resync::Now => {
                tracing::warn!(?change, "{why}; resyncing fully to be sure");
                resync_fully(&trigger, &metrics);
            }
            Resync::At(at) => {
                let wait = at.saturating_duration_since(std::time::Instant::now());
                tracing::warn!(
                    ?change,
                    ?wait,
                    "{why}; resyncing fully to be sure once the last such resync is a minute old"
                );
                let (later_trigger, later_metrics) = (trigger.clone(), metrics.clone());
                let deferred = std::thread::Builder::new().name("lost-resync".into()).spawn(move || {
                    std::thread::sleep(wait);
                    resync_fully(&later_trigger, &later_metrics);
                });
                if deferred.is_err() {
                    // No thread to wait on: resync now rather than not at all.
                    resync_fully(&trigger, &metrics);
                }
            }
            Resync::AlreadyDue => tracing::debug!(?change, "{why}; a full resync is already due"),
        }
    };
    match TableMonitor::start(config.netns.as_deref(), &config.table, on_change) {
        Ok(monitor) => Some(monitor),
        Err(e) => {
            tracing::warn!(
                resync_period = ?config.resync_period,
                "cannot listen to nf_tables announcements ({e}): a change another program makes to the table is undone only at the next periodic resync"
            );
            None
        }
    }
}

/// Counts a full resync for a foreign or possibly foreign change, and asks for it.
fn resync_fully(trigger: &Trigger, metrics: &Metrics) {
    metrics.record_foreign_table_change();
    trigger.request_full();
}

/// Lost or unheard announcements are mostly around our own big syncs (hundreds of thousands
/// of set elements): a full sync for each could make the next one, so they resync at most
/// this often.
const LOST_RESYNC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// When lost or unheard nf_tables announcements resync the table fully (pure: the caller
/// gives the time). At once, unless the last such resync is younger than the interval: then
/// when it is that old. Never not at all: what was missed may have been a foreign change,
/// and the periodic resync can be minutes away.
#[derive(Debug)]
struct LostResyncs {
    interval: std::time::Duration,
    /// The last such resync, made or planned.
    last: Option<std::time::Instant>,
}

/// What [`LostResyncs::on_lost`] decided.
#[derive(Debug, PartialEq, Eq)]
enum Resync {
    Now,
    /// Later, at this time.
    At(std::time::Instant),
    /// One planned already comes after this loss.
    AlreadyDue,
}

impl LostResyncs {
    fn new(interval: std::time::Duration) -> Self {
        LostResyncs { interval, last: None }
    }

    fn on_lost(&mut self, now: std::time::Instant) -> Resync {
        match self.last {
            Some(last) if last > now => Resync::AlreadyDue,
            Some(last) if now < last + self.interval => {
                let at = last + self.interval;
                self.last = Some(at);
                Resync::At(at)
            }
            _ => {
                self.last = Some(now);
                Resync::Now
            }
        }
    }
}

/// A future that resolves on SIGTERM or SIGINT (Ctrl-C). The handlers are installed
/// now, when this is called, not when the future is first polled: [`run`] polls its
/// shutdown future only after the first sync attempt (up to the batching window
/// later), and a signal before that would hit the default action and kill the process
/// without its clean shutdown. Call it inside a tokio runtime, before [`run`].
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = interrupt.recv() => {},
        }
        tracing::info!("shutdown signal received");
    })
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{LostResyncs, Resync};

    #[test]
    fn a_loss_resyncs_at_once_and_one_within_the_interval_is_put_off_never_dropped() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut pacer = LostResyncs::new(60 * s);
        assert_eq!(pacer.on_lost(t0), Resync::Now);
        assert_eq!(pacer.on_lost(t0 + 10 * s), Resync::At(t0 + 60 * s), "put off to a minute after the last");
        assert_eq!(pacer.on_lost(t0 + 20 * s), Resync::AlreadyDue, "the one put off covers it");
        assert_eq!(pacer.on_lost(t0 + 70 * s), Resync::At(t0 + 120 * s), "a minute after the one put off");
        assert_eq!(pacer.on_lost(t0 + 200 * s), Resync::Now, "long after: at once again");
    }
}
