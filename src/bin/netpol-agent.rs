//! `netpol-agent`: enforces Kubernetes NetworkPolicies on this node with nftables.
//! Thin: configuration, logging, wiring, exit codes (0 clean shutdown, 1 fatal runtime
//! error, 2 bad configuration).
//!
//! ```text
//!  config ──► logging ──► tokio (1 worker) ──► agent::run(RememberPods(TrimWhenIdle(CountingPaths(Quarantining(NftTarget(NetlinkNftables, NetlinkConntrack))))))
//!                                                   │    each sync one netlink batch (nft as the fallback),
//!                                                   │    every receive and every nft call bounded (--nft-timeout)
//!                                                   └─ syncs pause ──► malloc_trim(0), own thread
//!  --drop-log G ──► NflogReader (own thread) ──► one `netpol::drop` log line per logged packet,
//!                   its addresses named by the pods RememberPods kept from the last sync
//! ```

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, OnceLock};

use clap::Parser;

use netpol::agent::conntrack_worker::DEFAULT_PACE;
use netpol::agent::nft_target::NftTarget;
use netpol::agent::quarantine::Quarantining;
use netpol::agent::{self, AgentConfig, AgentError, Snapshot, SyncError, SyncStats, SyncTarget};
use netpol::conntrack::NetlinkConntrack;
use netpol::nflog::{
    Attribution, DEFAULT_RECEIVE_BUFFER, LogConfig, NflogReader, NflogSocket, attributions, drop_record, pod_holding,
};
use netpol::nft::backend::netlink::NetlinkNftables;
use netpol::nft::backend::process::RealNftables;
use netpol::policy::model::{Pod, Policy, SharedList};

const BAD_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let config = match AgentConfig::try_parse() {
        Ok(c) => c,
        // clap prints the reason (or --help / --version) and picks the code: 2 for errors.
        Err(e) => e.exit(),
    };
    if let Err(e) = config.init_logging() {
        eprintln!("netpol-agent: {e}");
        return ExitCode::from(BAD_CONFIG);
    }
    // One worker is plenty: it only decodes watch events and serves the admin endpoints;
    // syncs run on a blocking thread. Fewer threads also means fewer malloc arenas holding
    // freed memory (see benches/agent-bench.sh).
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("netpol-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let nft = RealNftables { netns: config.netns.clone(), timeout: config.nft_timeout, ..RealNftables::default() };
    let nft = match NetlinkNftables::open(nft.clone()) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!("no netlink socket ({e}): every transaction goes through the nft command");
            NetlinkNftables::nft_only(nft)
        }
    };
    let idle_per_pod = usize::try_from(config.idle_set_elements_per_pod).unwrap_or(usize::MAX);
    let trimmer = heap_trimmer();
    let observe = config.observe.observe();
    let mut target = NftTarget::new(nft, config.node.clone(), config.table.clone())
        .keeping_idle_sets(idle_per_pod)
        .observing(observe);
    // Dumped over netlink at each scrape and before a sync replaces or deletes them.
    let rule_counters = observe.rule_counters.then(|| {
        let (netns, table, timeout) = (config.netns.clone(), config.table.clone(), config.nft_timeout);
        let reader = Mutex::new(netpol::nft::backend::netlink::CounterReader::new(netns, &table, timeout));
        agent::RuleCounters::new(std::sync::Arc::new(move || reader.lock().unwrap_or_else(|e| e.into_inner()).read()))
    });
    if let Some(counters) = &rule_counters {
        target = target.with_rule_counters(counters.clone());
    }
    if config.conntrack_cleanup {
        // Beside the sync loop: a dump walks the whole conntrack hash, ~9 ms here. Its
        // decisions' transient buffers go back to the kernel as a sync's do.
        let churned = trimmer.clone();
        let after_run = move || {
            let _ = churned.send(());
        };
        let table = NetlinkConntrack::new(config.netns.clone());
        target = match target.with_conntrack_in_background(table, DEFAULT_PACE, after_run) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("netpol-agent: cannot start the conntrack worker: {e}");
                return ExitCode::FAILURE;
            }
        };
    }
    let synced: Synced = Arc::default();
    let drop_log_group = observe.drop_log.map(|log| log.group);
    let target = RememberPods {
        target: TrimWhenIdle::new(CountingPaths(Quarantining::new(target)), trimmer),
        synced: drop_log_group.map(|_| (Arc::clone(&synced), config.node.clone())),
    };
    // Lives until the agent exits; the kernel releases the group with the socket.
    let _drop_log =
        drop_log_group.and_then(|group| start_drop_log(config.netns.as_deref(), group, Arc::clone(&synced)));
    let result = runtime.block_on(async {
        let shutdown = agent::shutdown_signal()?;
        Ok::<_, std::io::Error>(agent::run_with_counters(config, target, rule_counters, shutdown).await)
    });
    let result = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("netpol-agent: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    match result {
        Ok(_) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e @ AgentError::Kubeconfig(_)) => {
            tracing::error!("{e}");
            eprintln!("netpol-agent: {e}");
            ExitCode::from(BAD_CONFIG)
        }
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("netpol-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Reads the drop log's group on its own thread and writes each packet as a log line.
/// Enforcement never waits for it: a group that cannot be bound is warned about and the
/// agent runs without its drop log.
fn start_drop_log(netns: Option<&str>, group: u16, synced: Synced) -> Option<NflogReader> {
    let started = NflogSocket::open(netns, &LogConfig::new(group), DEFAULT_RECEIVE_BUFFER).and_then(|socket| {
        NflogReader::start(socket, move |received| {
            let last = Arc::clone(&synced.lock().unwrap_or_else(|e| e.into_inner()));
            let record = drop_record(
                &received,
                |prefix| last.attributions().get(prefix).cloned(),
                |ip| pod_holding(&last.pods, ip),
            );
            tracing::info!(
                target: "netpol::drop",
                prefix = %record.prefix,
                service = %record.service(),
                hook = ?received.packet.hook,
                "{record}"
            );
        })
    });
    match started {
        Ok(reader) => {
            tracing::info!(group, "reading the drop log");
            Some(reader)
        }
        Err(e) => {
            tracing::warn!(group, "no drop log: {e}");
            None
        }
    }
}

/// What the drop log needs of the snapshot last handed to a sync: whose addresses it
/// names, and what each of its pod chains' prefixes stands for.
/// The attributions are worked out on the drop log's thread at its first packet after a
/// sync, off the path from an event to its commit.
#[derive(Default)]
struct LastSynced {
    pods: SharedList<Pod>,
    policies: SharedList<Policy>,
    node: String,
    attributions: OnceLock<HashMap<String, Attribution>>,
}

impl LastSynced {
    fn attributions(&self) -> &HashMap<String, Attribution> {
        self.attributions.get_or_init(|| attributions(&self.pods, &self.policies, &self.node))
    }
}

type Synced = Arc<Mutex<Arc<LastSynced>>>;

/// Keeps what the drop log needs of each snapshot (when it is on: `synced`, with this
/// node's name), then syncs.
struct RememberPods<T> {
    target: T,
    synced: Option<(Synced, String)>,
}

impl<T: SyncTarget> SyncTarget for RememberPods<T> {
    fn sync(&mut self, snapshot: &Snapshot, full: bool) -> Result<SyncStats, SyncError> {
        if let Some((synced, node)) = &self.synced {
            // The snapshot's lists: reference counts, not copies.
            let last = LastSynced {
                pods: Arc::clone(&snapshot.pods),
                policies: Arc::clone(&snapshot.policies),
                node: node.clone(),
                attributions: OnceLock::new(),
            };
            let before = std::mem::replace(&mut *synced.lock().unwrap_or_else(|e| e.into_inner()), Arc::new(last));
            // Its pod list may be the last of the sync before: freed off the sync thread.
            agent::dispose::later(before);
        }
        self.target.sync(snapshot, full)
    }

    fn cleanup(&mut self) -> Result<(), SyncError> {
        self.target.cleanup()
    }
}

/// Reports which path (netlink, or the nft command as the fallback) each sync's
/// transactions took, for the metrics.
struct CountingPaths(Quarantining<NetlinkNftables>);

impl SyncTarget for CountingPaths {
    fn sync(&mut self, snapshot: &Snapshot, full: bool) -> Result<SyncStats, SyncError> {
        let (netlink, nft) = self.0.target().nftables().sent;
        let mut stats = self.0.sync(snapshot, full)?;
        let (netlink_after, nft_after) = self.0.target().nftables().sent;
        stats.via_netlink = netlink_after.saturating_sub(netlink);
        stats.via_nft = nft_after.saturating_sub(nft);
        Ok(stats)
    }

    fn cleanup(&mut self) -> Result<(), SyncError> {
        self.0.cleanup()
    }
}

/// Hands the heap a sync freed back to the kernel. A sync builds a whole desired ruleset
/// and a transaction (about as much again as the agent keeps), then frees them; glibc
/// keeps freed pages that lie below live data, so without a trim the agent's RSS stays at
/// its highest sync (benches/README.md, agent).
///
/// The trim runs on its own thread once syncs pause (250 ms without one): it walks the
/// heap under the allocator's lock for milliseconds, which a sync allocating meanwhile
/// would add to its latency. Under continuous churn each sync reuses what the previous
/// one freed, so the heap does not grow for want of a trim.
struct TrimWhenIdle<T> {
    target: T,
    synced: std::sync::mpsc::Sender<()>,
}

impl<T> TrimWhenIdle<T> {
    /// Wraps `target`; `heap_trimmer` is [`heap_trimmer`]'s sender.
    fn new(target: T, heap_trimmer: std::sync::mpsc::Sender<()>) -> Self {
        TrimWhenIdle { target, synced: heap_trimmer }
    }
}

/// The trim thread: each message says the heap just churned (a sync, a conntrack cleanup);
/// it trims once 250 ms pass without another.
fn heap_trimmer() -> std::sync::mpsc::Sender<()> {
    let (synced, syncs) = std::sync::mpsc::channel::<()>();
    let spawned = std::thread::Builder::new().name("heap-trim".into()).spawn(move || {
        use std::sync::mpsc::RecvTimeoutError;
        use std::time::Duration;
        // Each pass: wait for a churn, then trim once churns pause.
        while syncs.recv().is_ok() {
            loop {
                match syncs.recv_timeout(Duration::from_millis(250)) {
                    Ok(()) => continue,
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            release_free_heap();
        }
    });
    if let Err(e) = spawned {
        tracing::warn!("no heap-trim thread ({e}): freed memory stays with the allocator");
    }
    synced
}

impl<T: SyncTarget> SyncTarget for TrimWhenIdle<T> {
    fn sync(&mut self, snapshot: &Snapshot, full: bool) -> Result<SyncStats, SyncError> {
        let result = self.target.sync(snapshot, full);
        let _ = self.synced.send(());
        result
    }

    fn cleanup(&mut self) -> Result<(), SyncError> {
        self.target.cleanup()
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_free_heap() {
    unsafe extern "C" {
        /// glibc: `int malloc_trim(size_t pad)`; returns 1 if memory was released.
        fn malloc_trim(pad: usize) -> std::ffi::c_int;
    }
    // SAFETY: malloc_trim takes a plain integer and touches only glibc's own allocator
    // state, under the allocator's locks; any thread may call it at any time, and it
    // never moves or frees memory that is in use.
    unsafe {
        malloc_trim(0);
    }
}

/// Other C libraries (musl) return freed memory by themselves or have no such call.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_heap() {}
