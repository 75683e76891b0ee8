//! The coalescing, debounced sync trigger and the level-triggered sync loop.
//!
//! Watch events call [`Trigger::notify`]; any number of notifications collapse into one
//! pending wake-up ([`tokio::sync::Notify`] keeps at most one permit). The loop syncs the
//! *whole* current snapshot, on the leading edge: an idle loop syncs a change at once, and
//! changes that arrive while a sync runs are all taken by exactly one next sync, which
//! starts as soon as the running one ends, but never sooner than `debounce` after the
//! start of the one before (a minimum spacing, so that syncs shorter than the window
//! batch a burst). A change waits at most the window plus two sync durations, and on a
//! quiet cluster only its own sync:
//!
//! ```text
//!  change ─► sync ─► sync (everything that arrived meanwhile, ≥ window after) ─► idle
//! ```
//!
//! Each notification's arrival is kept until a sync puts it in the kernel: the first
//! successful sync that started after it and left no set still to fill (a staged fill's
//! rules wait for their sets). Its wait is the agent's share of a change's way to the
//! kernel, observed as `netpol_event_enforcement_latency_seconds`:
//!
//! ```text
//!  notify ─► Arrivals (trigger) ─take, then snapshot─► unenforced ─sync ok, nothing staged─► histogram
//! ```
//!
//! Full syncs happen at start, after any failure, and every `resync_period`. A failed sync
//! is retried after an exponential backoff (changes arriving meanwhile do not cut the
//! backoff short: the retry picks them up anyway). Nothing is synced until the snapshot
//! source reports that all resources have listed once.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::metrics::Metrics;
use super::{Snapshot, SyncError, SyncStats, SyncTarget};

/// Where the sync loop reads the cluster from.
pub trait SnapshotSource: Send + Sync + 'static {
    /// All resources have listed at least once.
    fn is_ready(&self) -> bool;
    /// The current state, whole.
    fn snapshot(&self) -> Snapshot;
}

/// Change notifications, coalesced. Cheap to clone.
#[derive(Clone, Default)]
pub struct Trigger {
    inner: Arc<TriggerInner>,
}

#[derive(Default)]
struct TriggerInner {
    notify: Notify,
    notifications: AtomicU64,
    /// Someone (a restarted watch, a changed Node) asked that the next sync be full.
    full_requested: std::sync::atomic::AtomicBool,
    /// When the notifications no sync has taken yet arrived.
    arrivals: std::sync::Mutex<Arrivals>,
}

impl Trigger {
    pub fn new() -> Trigger {
        Trigger::default()
    }

    /// Something changed: schedule a sync.
    pub fn notify(&self) {
        self.inner.notifications.fetch_add(1, Ordering::SeqCst);
        self.inner.arrivals.lock().unwrap_or_else(|e| e.into_inner()).push(Instant::now());
        self.inner.notify.notify_one();
    }

    /// Something changed in a way the sync target cannot see from the snapshot alone (the
    /// watches restarted, the node's configuration changed, another program changed the
    /// table): the next sync is full.
    pub fn request_full(&self) {
        self.inner.full_requested.store(true, Ordering::SeqCst);
        self.notify();
    }

    /// Takes a pending [`Trigger::request_full`].
    fn take_full_request(&self) -> bool {
        self.inner.full_requested.swap(false, Ordering::SeqCst)
    }

    /// The arrivals of the notifications so far not taken, oldest first. Taken *before* the
    /// snapshot: a change that lands in between is in the snapshot but counted for the next
    /// sync (its wait looks longer than it was, never shorter).
    fn take_arrivals(&self) -> Arrivals {
        std::mem::take(&mut *self.inner.arrivals.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Notifications received so far.
    pub fn notifications(&self) -> u64 {
        self.inner.notifications.load(Ordering::SeqCst)
    }

    async fn notified(&self) {
        self.inner.notify.notified().await;
    }
}

/// Arrival times of changes not yet in the kernel, oldest first, in bounded memory: an
/// arrival within [`Arrivals::MERGE_WITHIN`] of the newest kept one, or any arrival once
/// [`Arrivals::MAX_RUNS`] are kept (a burst of events during a long sync, a long run of
/// failed syncs), is counted with that newest one. Counting a change with an earlier
/// arrival only makes its wait look longer, never shorter.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Arrivals {
    /// (first arrival, changes counted with it), in arrival order.
    runs: Vec<(Instant, u64)>,
}

impl Arrivals {
    /// Arrivals this close to the newest kept one share its entry.
    pub const MERGE_WITHIN: Duration = Duration::from_micros(20);
    /// Entries kept at most (16 bytes each).
    pub const MAX_RUNS: usize = 4096;

    /// A change arrived at `at` (no earlier than the ones before it).
    pub fn push(&mut self, at: Instant) {
        self.push_run(at, 1);
    }

    fn push_run(&mut self, at: Instant, count: u64) {
        let full = self.runs.len() >= Self::MAX_RUNS;
        match self.runs.last_mut() {
            Some((newest, n)) if full || at.saturating_duration_since(*newest) < Self::MERGE_WITHIN => {
                *n = n.saturating_add(count);
            }
            _ => self.runs.push((at, count)),
        }
    }

    /// Adds `later`, whose changes all arrived after these.
    pub fn append(&mut self, later: Arrivals) {
        for (at, count) in later.runs {
            self.push_run(at, count);
        }
    }

    /// Changes counted.
    pub fn len(&self) -> u64 {
        self.runs.iter().map(|(_, n)| n).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Each entry's wait until `enforced_at`, with the number of changes that waited it.
    pub fn waits(&self, enforced_at: Instant) -> impl Iterator<Item = (Duration, u64)> + '_ {
        self.runs.iter().map(move |(at, n)| (enforced_at.saturating_duration_since(*at), *n))
    }
}

/// Tuning of the sync loop.
#[derive(Debug, Clone)]
pub struct SyncLoopConfig {
    /// Minimum spacing of sync starts: a change that arrives sooner than this after the
    /// start of the last sync waits until then (with everything else that arrives); a
    /// change later than that syncs at once. 0: syncs run back to back under churn.
    pub debounce: Duration,
    /// Full sync at least this often.
    pub resync_period: Duration,
    /// First retry delay after a failure; doubles per consecutive failure.
    pub retry_initial: Duration,
    /// Cap of the retry delay.
    pub retry_max: Duration,
    /// `/readyz` fails from this many consecutive failures on.
    pub unready_after_failures: u32,
    /// The loop proves it is alive at least this often, also when idle (liveness).
    pub heartbeat: Duration,
}

/// Default minimum spacing of sync starts. A burst of pod events (a rollout, a node
/// drain) arrives over a few milliseconds to tens of milliseconds: its first event syncs
/// at once, and what arrives during that sync, or within the window, goes into the next
/// one, so under any churn syncs run back to back. A change on a quiet cluster never waits
/// for the window: trailing-edge batching (sync `window` after the oldest change) made
/// every event at 100 pod events/s wait 5 ms on top of its sync (measured with
/// `benches/agent.rs`: benches/README.md).
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(5);

impl Default for SyncLoopConfig {
    fn default() -> Self {
        SyncLoopConfig {
            debounce: DEFAULT_DEBOUNCE,
            resync_period: Duration::from_secs(300),
            retry_initial: Duration::from_millis(250),
            retry_max: Duration::from_secs(30),
            unready_after_failures: 3,
            heartbeat: Duration::from_secs(5),
        }
    }
}

/// What the sync loop has done so far; published on a watch channel.
#[derive(Debug, Clone, Default)]
pub struct SyncState {
    /// Successful syncs (partial and full).
    pub syncs: u64,
    /// Successful full syncs.
    pub full_syncs: u64,
    /// Failed syncs.
    pub failures: u64,
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// A full sync has been applied.
    pub first_full_sync_done: bool,
    /// When the last successful sync finished.
    pub last_success: Option<std::time::Instant>,
    /// The last failure, rendered.
    pub last_error: Option<String>,
    /// Stats of the last successful sync.
    pub last_stats: SyncStats,
    /// Duration of the last sync attempt.
    pub last_duration: Duration,
    /// When the last successful sync finished, as wall-clock time (for the
    /// `_timestamp_seconds` gauge).
    pub last_success_wall: Option<std::time::SystemTime>,
    /// When the loop last proved it runs (each wake-up, and every `heartbeat` when idle);
    /// `None` before it started. Tokio time, so paused-clock tests can drive it.
    pub heartbeat: Option<Instant>,
    /// When the sync running now started; `None` between syncs.
    pub sync_started: Option<Instant>,
    /// When the last successful sync finished, in tokio time (readiness: "recent").
    pub last_success_at: Option<Instant>,
}

/// The sync loop: owns the target, reads snapshots from the source when triggered.
pub struct SyncLoop<T, S> {
    target: T,
    source: S,
    trigger: Trigger,
    config: SyncLoopConfig,
    status: tokio::sync::watch::Sender<SyncState>,
    metrics: Option<Metrics>,
}

enum Wake {
    Change,
    Resync,
    Retry,
    Heartbeat,
    Shutdown,
}

impl<T: SyncTarget, S: SnapshotSource> SyncLoop<T, S> {
    pub fn new(target: T, source: S, trigger: Trigger, config: SyncLoopConfig) -> Self {
        SyncLoop {
            target,
            source,
            trigger,
            config,
            status: tokio::sync::watch::Sender::new(SyncState::default()),
            metrics: None,
        }
    }

    /// Records sync metrics into `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// A receiver of the loop's state (for `/readyz` and tests).
    pub fn status(&self) -> tokio::sync::watch::Receiver<SyncState> {
        self.status.subscribe()
    }

    pub fn config(&self) -> &SyncLoopConfig {
        &self.config
    }

    /// Runs until `shutdown` resolves; returns the target.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> T {
        let SyncLoop { target, source, trigger, config, status, metrics } = self;
        let mut target = Some(target);
        let mut shutdown = std::pin::pin!(shutdown);
        let mut need_full = true;
        // Try at once: the source may be ready before the loop starts.
        let mut pending = true;
        let mut retry_at: Option<Instant> = None;
        let mut next_resync: Option<Instant> = None;
        let mut failures_in_row: u32 = 0;
        let mut last_started: Option<Instant> = None;
        // Changes taken by syncs that did not (yet) put them in the kernel.
        let mut unenforced = Arrivals::default();

        loop {
            status.send_modify(|s| s.heartbeat = Some(Instant::now()));
            let beat = tokio::time::sleep(config.heartbeat);
            let wake = if pending {
                pending = false;
                Wake::Change
            } else if let Some(at) = retry_at {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => Wake::Retry,
                    _ = beat => Wake::Heartbeat,
                    _ = &mut shutdown => Wake::Shutdown,
                }
            } else {
                let resync = async {
                    match next_resync {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = trigger.notified() => Wake::Change,
                    _ = resync => Wake::Resync,
                    _ = beat => Wake::Heartbeat,
                    _ = &mut shutdown => Wake::Shutdown,
                }
            };
            match wake {
                Wake::Shutdown => break,
                Wake::Change => batch(&trigger, last_started, config.debounce).await,
                Wake::Resync => need_full = true,
                Wake::Retry => {}
                Wake::Heartbeat => continue,
            }
            if !source.is_ready() {
                tracing::debug!("not all resources listed yet; not syncing");
                continue;
            }
            retry_at = None;
            if trigger.take_full_request() {
                need_full = true;
            }
            unenforced.append(trigger.take_arrivals());
            let snapshot = source.snapshot();
            if let Some(m) = &metrics {
                m.record_index_sizes(&snapshot);
                m.record_guard(!snapshot.pod_cidrs.is_empty());
            }
            let full = need_full;
            last_started = Some(Instant::now());
            let started = std::time::Instant::now();
            status.send_modify(|s| s.sync_started = Some(Instant::now()));
            let Some(t) = target.take() else { break };
            let (t, result) = run_blocking(t, snapshot, full).await;
            target = Some(t);
            let elapsed = started.elapsed();
            match result {
                Ok(stats) => {
                    tracing::debug!(full, ?elapsed, ops = stats.transaction_ops, "sync applied");
                    failures_in_row = 0;
                    need_full = false;
                    if full {
                        next_resync = Some(Instant::now() + config.resync_period);
                    }
                    if let Some(m) = &metrics {
                        m.record_sync(full, elapsed, &stats);
                    }
                    // A fill staged in chunks is not complete (crate::nft::staging): the next
                    // sync is due now, as a retry is (no batching window; changes join it).
                    // Until it is, the changes taken so far may wait for its rules.
                    if stats.staged_elements_remaining > 0 {
                        retry_at = Some(Instant::now());
                    } else {
                        let enforced = std::mem::take(&mut unenforced);
                        if let Some(m) = &metrics {
                            m.record_enforced(&enforced, Instant::now());
                        }
                    }
                    status.send_modify(|s| {
                        s.syncs += 1;
                        s.full_syncs += u64::from(full);
                        s.consecutive_failures = 0;
                        s.first_full_sync_done |= full;
                        s.last_success = Some(std::time::Instant::now());
                        s.last_success_wall = Some(std::time::SystemTime::now());
                        s.last_success_at = Some(Instant::now());
                        s.sync_started = None;
                        s.last_stats = stats;
                        s.last_duration = elapsed;
                    });
                }
                Err(error) => {
                    failures_in_row = failures_in_row.saturating_add(1);
                    let delay = retry_delay(&config, failures_in_row);
                    tracing::warn!(full, kind = error.kind(), %error, retry_in = ?delay, "sync failed; next sync is full");
                    need_full = true;
                    retry_at = Some(Instant::now() + delay);
                    if let Some(m) = &metrics {
                        m.record_failure(full, elapsed, error.kind());
                    }
                    status.send_modify(|s| {
                        s.failures += 1;
                        s.consecutive_failures = failures_in_row;
                        s.last_error = Some(error.to_string());
                        s.last_duration = elapsed;
                        s.sync_started = None;
                    });
                }
            }
        }
        target.expect("the target is back after every sync")
    }
}

/// Waits until `window` after the start of the last sync (not at all if that has passed,
/// or if there was none: the leading edge), swallowing the wake-ups of changes that arrive
/// meanwhile: the coming sync takes them.
async fn batch(trigger: &Trigger, last_started: Option<Instant>, window: Duration) {
    let Some(not_before) = last_started.map(|at| at + window).filter(|at| *at > Instant::now()) else {
        return;
    };
    let deadline = tokio::time::sleep_until(not_before);
    let mut deadline = std::pin::pin!(deadline);
    loop {
        tokio::select! {
            biased;
            _ = &mut deadline => return,
            _ = trigger.notified() => continue,
        }
    }
}

/// Exponential backoff: `retry_initial * 2^(n-1)`, capped at `retry_max`.
fn retry_delay(config: &SyncLoopConfig, failures_in_row: u32) -> Duration {
    let exp = failures_in_row.saturating_sub(1).min(20);
    config.retry_initial.saturating_mul(1u32 << exp).min(config.retry_max)
}

/// Runs one sync on a blocking thread; a panic becomes [`SyncError::Panic`] and the target
/// is kept (the next sync is full anyway).
async fn run_blocking<T: SyncTarget>(
    mut target: T,
    snapshot: Snapshot,
    full: bool,
) -> (T, Result<SyncStats, SyncError>) {
    let handle = tokio::task::spawn_blocking(move || {
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| target.sync(&snapshot, full)))
            .unwrap_or_else(|panic| Err(SyncError::from_panic(panic.as_ref())));
        (target, result)
    });
    match handle.await {
        Ok(out) => out,
        // Only reachable if the runtime shuts down mid-sync; the target is lost then.
        Err(e) => panic!("sync task did not complete: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::sync::RecordingTarget;
    use std::sync::atomic::AtomicBool;

    #[derive(Clone, Default)]
    struct FakeSource {
        ready: Arc<AtomicBool>,
    }

    impl SnapshotSource for FakeSource {
        fn is_ready(&self) -> bool {
            self.ready.load(Ordering::SeqCst)
        }
        fn snapshot(&self) -> Snapshot {
            Snapshot::default()
        }
    }

    #[test]
    fn retry_delay_doubles_up_to_the_cap() {
        let c = SyncLoopConfig {
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(1),
            ..SyncLoopConfig::default()
        };
        let d: Vec<u128> = (1..=6).map(|n| retry_delay(&c, n).as_millis()).collect();
        assert_eq!(d, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(retry_delay(&c, u32::MAX), Duration::from_secs(1));
    }

    /// A sync loop (`config`) over a source that is ready at once and a recording target.
    fn ready_loop(config: SyncLoopConfig) -> (SyncLoop<RecordingTarget, FakeSource>, RecordingTarget, Trigger) {
        let source = FakeSource::default();
        source.ready.store(true, Ordering::SeqCst);
        let target = RecordingTarget::new();
        let trigger = Trigger::new();
        (SyncLoop::new(target.clone(), source, trigger.clone(), config), target, trigger)
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_syncs_until_the_source_is_ready_then_the_first_sync_is_full() {
        let source = FakeSource::default();
        let target = RecordingTarget::new();
        let trigger = Trigger::new();
        let sl = SyncLoop::new(target.clone(), source.clone(), trigger.clone(), SyncLoopConfig::default());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(sl.run(async {
            let _ = stop_rx.await;
        }));
        for _ in 0..5 {
            trigger.notify();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(target.calls().len(), 0);
        source.ready.store(true, Ordering::SeqCst);
        trigger.notify();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let calls = target.calls();
        assert_eq!(calls.len(), 1);
        assert!(calls[0].full);
        let _ = stop_tx.send(());
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_resync_period_forces_a_full_sync() {
        let (sl, target, trigger) =
            ready_loop(SyncLoopConfig { resync_period: Duration::from_secs(10), ..SyncLoopConfig::default() });
        let status = sl.status();
        let task = tokio::spawn(sl.run(tokio::time::sleep(Duration::from_secs(25))));
        tokio::time::sleep(Duration::from_secs(1)).await;
        trigger.notify();
        tokio::time::sleep(Duration::from_secs(1)).await;
        task.await.unwrap();
        let fulls: Vec<bool> = target.calls().iter().map(|c| c.full).collect();
        assert_eq!(fulls, [true, false, true, true]);
        assert_eq!(status.borrow().full_syncs, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_target_counts_as_a_failure_and_the_next_sync_is_full() {
        let (sl, target, _trigger) = ready_loop(SyncLoopConfig::default());
        target.panic_next(1);
        let status = sl.status();
        tokio::spawn(sl.run(std::future::pending()));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let st = status.borrow().clone();
        assert_eq!(st.failures, 1);
        assert!(st.last_error.unwrap().contains("panicked"));
        assert!(st.first_full_sync_done);
        let fulls: Vec<bool> = target.calls().iter().map(|c| c.full).collect();
        assert_eq!(fulls, [true, true]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_requested_full_sync_makes_the_next_sync_full_once() {
        let (sl, target, trigger) = ready_loop(SyncLoopConfig::default());
        tokio::spawn(sl.run(std::future::pending()));
        tokio::time::sleep(Duration::from_millis(100)).await;
        trigger.notify();
        tokio::time::sleep(Duration::from_millis(100)).await;
        trigger.request_full();
        tokio::time::sleep(Duration::from_millis(100)).await;
        trigger.notify();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let fulls: Vec<bool> = target.calls().iter().map(|c| c.full).collect();
        assert_eq!(fulls, [true, false, true, false]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_loop_keeps_beating_and_a_running_sync_is_visible() {
        let (sl, _target, _trigger) =
            ready_loop(SyncLoopConfig { heartbeat: Duration::from_secs(5), ..SyncLoopConfig::default() });
        let status = sl.status();
        tokio::spawn(sl.run(std::future::pending()));
        tokio::time::sleep(Duration::from_secs(60)).await;
        let beat = status.borrow().heartbeat.expect("the loop beats");
        assert!(Instant::now().duration_since(beat) <= Duration::from_secs(5), "idle for a minute, still beating");
        assert!(status.borrow().sync_started.is_none());
        assert!(status.borrow().last_success_at.is_some() && status.borrow().last_success_wall.is_some());
    }

    /// Changes every `gap` for a second of paused time; returns the syncs they took.
    async fn syncs_for_churn(gap: Duration) -> usize {
        let (sl, target, trigger) = ready_loop(SyncLoopConfig::default());
        tokio::spawn(sl.run(std::future::pending()));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = target.calls().len();
        let changes = Duration::from_secs(1).as_micros() / gap.as_micros();
        for _ in 0..changes {
            trigger.notify();
            tokio::time::sleep(gap).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        target.calls().len() - before
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_loop_syncs_a_change_at_once() {
        let (sl, target, trigger) = ready_loop(SyncLoopConfig::default());
        tokio::spawn(sl.run(std::future::pending()));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = target.calls().len();
        trigger.notify();
        tokio::time::sleep(Duration::from_micros(100)).await;
        assert_eq!(target.calls().len(), before + 1, "synced without waiting for the window");
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_soon_after_a_sync_started_waits_for_the_window_with_everything_after_it() {
        let (sl, target, trigger) = ready_loop(SyncLoopConfig::default());
        tokio::spawn(sl.run(std::future::pending()));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = target.calls().len();
        trigger.notify();
        tokio::time::sleep(Duration::from_millis(1)).await;
        trigger.notify();
        trigger.notify();
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(target.calls().len(), before + 1, "2 ms after the first sync started: not yet");
        tokio::time::sleep(Duration::from_millis(3)).await;
        assert_eq!(target.calls().len(), before + 2, "the window passed: one sync for both changes");
    }

    #[tokio::test(start_paused = true)]
    async fn under_steady_churn_changes_are_batched_in_windows_that_later_changes_do_not_extend() {
        // One change per ms: syncs at least 5 ms apart take about 5 changes each. A
        // quiet-period debounce would wait for the churn to end (1 sync); none, 1000.
        let syncs = syncs_for_churn(Duration::from_millis(1)).await;
        assert!((150..=250).contains(&syncs), "{syncs} syncs for 1000 changes 1 ms apart");
    }

    #[tokio::test(start_paused = true)]
    async fn changes_further_apart_than_the_window_each_sync_on_their_own() {
        let syncs = syncs_for_churn(Duration::from_millis(10)).await;
        assert_eq!(syncs, 100, "each of 100 changes 10 ms apart syncs on its own");
    }

    fn arrivals_at(base: Instant, offsets_us: &[u64]) -> Arrivals {
        let mut a = Arrivals::default();
        for us in offsets_us {
            a.push(base + Duration::from_micros(*us));
        }
        a
    }

    #[test]
    fn arrivals_closer_than_the_merge_window_share_the_earlier_arrival() {
        let t0 = Instant::now();
        let a = arrivals_at(t0, &[0, 5, 19, 20, 1000]);
        assert_eq!(a.len(), 5);
        let end = t0 + Duration::from_millis(2);
        let waits: Vec<(Duration, u64)> = a.waits(end).collect();
        assert_eq!(
            waits,
            [(Duration::from_millis(2), 3), (Duration::from_micros(1980), 1), (Duration::from_micros(1000), 1)]
        );
    }

    #[test]
    fn arrivals_beyond_the_cap_count_with_the_newest_kept_one_and_never_look_shorter() {
        let t0 = Instant::now();
        let mut a = Arrivals::default();
        let n = Arrivals::MAX_RUNS as u64 + 500;
        for i in 0..n {
            a.push(t0 + Duration::from_millis(i));
        }
        assert_eq!(a.len(), n);
        let end = t0 + Duration::from_millis(n);
        let waits: Vec<(Duration, u64)> = a.waits(end).collect();
        assert_eq!(waits.len(), Arrivals::MAX_RUNS);
        assert_eq!(waits.last().map(|(_, k)| *k), Some(501), "the newest kept entry carries the rest");
        // Each change's reported wait is at least its true wait.
        let mut i = 0;
        for (wait, k) in waits {
            for _ in 0..k {
                assert!(wait >= end - (t0 + Duration::from_millis(i)));
                i += 1;
            }
        }
    }

    #[test]
    fn appended_arrivals_come_after_the_kept_ones() {
        let t0 = Instant::now();
        let mut older = arrivals_at(t0, &[0]);
        older.append(arrivals_at(t0, &[10, 500]));
        let end = t0 + Duration::from_millis(1);
        let waits: Vec<(Duration, u64)> = older.waits(end).collect();
        assert_eq!(waits, [(Duration::from_millis(1), 2), (Duration::from_micros(500), 1)]);
    }

    /// The count and sum of `netpol_event_enforcement_latency_seconds`, once its count is
    /// `want` (polled, real time), or as it is after two seconds.
    async fn enforcement_once(metrics: &Metrics, want: u64) -> (u64, f64) {
        let read = || {
            let text = metrics.encode(None, &SyncState::default());
            let value = |series: &str| super::super::metrics::sample(&text, series).unwrap_or_default();
            (
                value("netpol_event_enforcement_latency_seconds_count") as u64,
                value("netpol_event_enforcement_latency_seconds_sum"),
            )
        };
        for _ in 0..200 {
            if read().0 >= want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        read()
    }

    /// A ready loop with metrics, after its first (full) sync; every sync from now on takes
    /// `sync_takes`.
    async fn loop_with_metrics(
        config: SyncLoopConfig,
        sync_takes: Duration,
    ) -> (RecordingTarget, Trigger, Metrics, tokio::task::JoinHandle<RecordingTarget>) {
        let (sl, target, trigger) = ready_loop(config);
        let metrics = Metrics::new();
        let task = tokio::spawn(sl.with_metrics(metrics.clone()).run(std::future::pending()));
        assert!(target.wait_until(Duration::from_secs(5), |c| c.len() == 1).await, "the first sync");
        target.set_delay(sync_takes);
        (target, trigger, metrics, task)
    }

    const SYNC_TAKES: Duration = Duration::from_millis(40);

    #[tokio::test]
    async fn a_change_is_enforced_when_the_sync_that_took_it_ends() {
        let (target, trigger, metrics, _task) = loop_with_metrics(SyncLoopConfig::default(), SYNC_TAKES).await;
        assert_eq!(enforcement_once(&metrics, 0).await, (0, 0.0), "the first sync took no change");
        trigger.notify();
        let (n, waited) = enforcement_once(&metrics, 1).await;
        assert_eq!((n, target.calls().len()), (1, 2));
        assert!((SYNC_TAKES.as_secs_f64()..2.0).contains(&waited), "waited {waited} s");
    }

    #[tokio::test]
    async fn a_change_taken_by_a_staged_sync_waits_for_the_sync_that_completes_the_fill() {
        let (target, trigger, metrics, _task) = loop_with_metrics(SyncLoopConfig::default(), SYNC_TAKES).await;
        target.stage_next(&[3000, 1000]);
        trigger.notify();
        let (n, waited) = enforcement_once(&metrics, 1).await;
        assert_eq!((n, target.calls().len()), (1, 4), "two steps, then the sync that completes the fill");
        assert!(waited >= 3.0 * SYNC_TAKES.as_secs_f64(), "waited {waited} s");
    }

    #[tokio::test]
    async fn a_change_taken_by_a_failed_sync_waits_for_the_retry_that_succeeds() {
        let retry = Duration::from_millis(60);
        let config = SyncLoopConfig { retry_initial: retry, ..SyncLoopConfig::default() };
        let (target, trigger, metrics, _task) = loop_with_metrics(config, SYNC_TAKES).await;
        target.fail_next(1);
        trigger.notify();
        let (n, waited) = enforcement_once(&metrics, 1).await;
        let calls = target.calls();
        assert_eq!((n, calls.len()), (1, 3));
        assert!(calls[1].failed && !calls[2].failed);
        assert!(waited >= (2 * SYNC_TAKES + retry).as_secs_f64(), "waited {waited} s");
    }
}
