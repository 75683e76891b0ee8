//! The Kubernetes-facing half of `netpol-agent`: watches, the coalescing sync trigger,
//! the admin server (metrics and probes) and the command-line configuration.
//!
//! The agent is level-triggered: watch events only update the stores and poke a
//! [`trigger::Trigger`]; the sync loop then hands the whole [`Snapshot`] to a
//! [`SyncTarget`] (compile + diff + nft), never a single event. Nothing is synced until
//! Pods, Namespaces and NetworkPolicies have all listed once; any failure makes the next
//! sync a full one.

pub mod admin;
pub mod config;
pub mod metrics;
pub mod nft_target;
pub mod trigger;
pub mod watch;

use std::future::Future;

use crate::model::{Namespace, Pod, Policy, SharedList};

pub use config::AgentConfig;
pub use metrics::Metrics;
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
    /// From the snapshot to the transaction (model, compile, diff).
    pub compile: std::time::Duration,
    /// Sending the transaction until the kernel committed it (zero when it was empty).
    pub apply: std::time::Duration,
    /// Conntrack entries this sync deleted after the apply (a counter's increments; see
    /// [`crate::conntrack`]), and the time the dump, decision and deletes took.
    pub conntrack_flows_deleted: ConntrackFlowsDeleted,
    pub conntrack: std::time::Duration,
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

/// Runs the agent until `shutdown` resolves: watches, admin server, sync loop. Returns the
/// target after cleaning up when `--cleanup-on-exit` is set.
pub async fn run<T: SyncTarget>(
    config: AgentConfig,
    target: T,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<T, AgentError> {
    let client = kube_client(&config).await?;
    let trigger = Trigger::new();
    let (watch, driver) = ClusterWatch::start(client, kube::runtime::watcher::Config::default(), trigger.clone());
    let watch_task = tokio::spawn(driver);

    let metrics = Metrics::new();
    let loop_config =
        SyncLoopConfig { debounce: config.debounce, resync_period: config.resync_period, ..SyncLoopConfig::default() };
    let sync_loop = SyncLoop::new(target, watch.clone(), trigger, loop_config).with_metrics(metrics.clone());
    let admin_state = admin::AdminState {
        metrics,
        status: sync_loop.status(),
        watch_counters: Some(watch.counters().clone()),
        unready_after_failures: sync_loop.config().unready_after_failures,
    };
    let listener = tokio::net::TcpListener::bind(config.admin_addr)
        .await
        .map_err(|source| AgentError::Admin { addr: config.admin_addr, source })?;
    tracing::info!(addr = %config.admin_addr, node = %config.node, table = %config.table, "agent starting");
    let admin_task = tokio::spawn(admin::serve(listener, admin_state));

    let mut target = sync_loop.run(shutdown).await;
    watch_task.abort();
    admin_task.abort();
    if config.cleanup_on_exit {
        tracing::info!("cleaning up on exit");
        target = tokio::task::spawn_blocking(move || target.cleanup().map(|()| target))
            .await
            .map_err(|e| AgentError::Cleanup(SyncError::Panic(e.to_string())))?
            .map_err(AgentError::Cleanup)?;
    }
    Ok(target)
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
