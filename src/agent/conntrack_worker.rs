//! The conntrack cleanup beside the sync loop: a sync hands over what to end and returns at
//! once; the worker dumps and deletes at most once per `pace`, taking everything handed
//! over meanwhile in one dump.
//!
//! ```text
//!  sync ──post(gone addresses, ruleset to decide with)──► pending (merged: gone ∪, latest ruleset)
//!                                                            │  worker thread, ≤ 1 run per pace
//!                                                            ▼
//!                                          nft_target::end_flows(table, gone, ruleset)
//!                                          ok: counts for the next sync's stats
//!                                          error: back into pending, tried again a pace later
//! ```
//!
//! A dump walks the kernel's whole conntrack hash (~9 ms on a 24 GiB node whatever it
//! holds); done inline it added that to every sync under churn (benches/README.md, agent).
//! Paced, a flow a change denies still ends within `pace` plus one dump of that change.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::agent::ConntrackFlowsDeleted;
use crate::conntrack::ConntrackTable;
use crate::nft::ir::Ruleset;
use crate::policy::model::{Pod, SharedList};

/// At most one dump this often by default: flows a change denies end within ~0.2 s plus a
/// dump, well inside the 1 s the agent promises.
pub const DEFAULT_PACE: Duration = Duration::from_millis(200);

/// The ruleset just applied, with the pods and node name its decision needs. The ruleset
/// is the target's own (shared, not copied: a sync takes back a decision not yet started
/// on, so the compile that follows finds the ruleset its own again; `retract_decision`).
pub(crate) struct Decision {
    pub ruleset: Arc<Ruleset>,
    pub pods: SharedList<Pod>,
    pub node: String,
}

#[derive(Default)]
struct Pending {
    gone: HashSet<IpAddr>,
    decide: Option<Decision>,
    /// Deleted since the last `take_deleted`.
    deleted: ConntrackFlowsDeleted,
    running: bool,
    stop: bool,
    /// When the worker's next paced run may start (`None` before its first run: at once).
    next_slot: Option<Instant>,
    /// A sync took the decision back and hands over its own when done: the worker waits for
    /// it rather than run without.
    retracted: bool,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.gone.is_empty() && self.decide.is_none()
    }
}

struct Shared {
    pending: Mutex<Pending>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Owns the node's conntrack table on its own thread; stopped and joined on drop.
pub struct ConntrackWorker {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for ConntrackWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConntrackWorker").finish_non_exhaustive()
    }
}

impl ConntrackWorker {
    /// `after_run` runs on the worker after each cleanup.
    pub fn start(
        mut table: Box<dyn ConntrackTable>,
        pace: Duration,
        after_run: impl Fn() + Send + 'static,
    ) -> std::io::Result<ConntrackWorker> {
        let shared = Arc::new(Shared { pending: Mutex::default(), changed: Condvar::new() });
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new().name("conntrack".into()).spawn(move || {
                let mut last_run: Option<Instant> = None;
                loop {
                    let mut p = shared.lock();
                    while !p.stop && (p.is_empty() || p.retracted) {
                        p = shared.changed.wait(p).unwrap_or_else(|e| e.into_inner());
                    }
                    if p.stop {
                        return;
                    }
                    // Paced: what arrives until the next slot joins this run.
                    if let Some(wait) = last_run.map(|at| (at + pace).saturating_duration_since(Instant::now()))
                        && !wait.is_zero()
                    {
                        drop(shared.changed.wait_timeout(p, wait).unwrap_or_else(|e| e.into_inner()));
                        continue;
                    }
                    let gone = std::mem::take(&mut p.gone);
                    let decide = p.decide.take();
                    p.running = true;
                    last_run = Some(Instant::now());
                    p.next_slot = last_run.map(|at| at + pace);
                    drop(p);
                    let started = Instant::now();
                    let result = super::nft_target::end_flows(
                        table.as_mut(),
                        &gone,
                        decide.as_ref().map(|d| (&*d.ruleset, &d.pods[..], d.node.as_str())),
                    );
                    let mut p = shared.lock();
                    p.running = false;
                    match result {
                        Ok(deleted) => {
                            p.deleted.pod_deleted += deleted.pod_deleted;
                            p.deleted.denied += deleted.denied;
                            if deleted.pod_deleted + deleted.denied > 0 {
                                tracing::info!(
                                    pod_deleted = deleted.pod_deleted,
                                    denied = deleted.denied,
                                    ms = started.elapsed().as_secs_f64() * 1e3,
                                    "conntrack entries deleted"
                                );
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, gone = gone.len(), "conntrack cleanup failed; trying again");
                            p.gone.extend(gone);
                            // A newer ruleset handed over meanwhile decides instead.
                            p.decide = p.decide.take().or(decide);
                        }
                    }
                    shared.changed.notify_all();
                    drop(p);
                    after_run();
                }
            })?
        };
        Ok(ConntrackWorker { shared, thread: Some(thread) })
    }

    /// Hands over the addresses of pods now gone and, if the sync may have denied
    /// something, the ruleset it applied (replacing an older one not yet used).
    pub(crate) fn post(&self, gone: HashSet<IpAddr>, decide: Option<Decision>) {
        let mut p = self.shared.lock();
        p.gone.extend(gone);
        p.retracted = false;
        if decide.is_some() {
            p.decide = decide;
        }
        self.shared.changed.notify_all();
    }

    /// Takes back a ruleset handed over that the worker has not started on (whether there
    /// was one). A sync about to compile calls it: the compiler patches sets in place when
    /// it alone holds them, and a ruleset waiting here for the next paced run would make it
    /// copy every set it patches (at 100k pods, a third of the agent's CPU went into those
    /// copies and into freeing them; benches/README.md). The sync hands over its own
    /// ruleset after it applies, so no decision is lost, only taken later.
    ///
    /// Only while the worker waits for its next slot: once that has come the decision stays
    /// for the worker to take (the compile then copies what it patches, at most once a
    /// pace), so that syncs back to back cannot keep it from ever running.
    pub(crate) fn retract_decision(&self) -> bool {
        let mut p = self.shared.lock();
        let waiting_for_slot = p.next_slot.is_some_and(|slot| Instant::now() < slot);
        if !waiting_for_slot || p.running || p.decide.is_none() {
            return false;
        }
        p.decide = None;
        p.retracted = true;
        true
    }

    /// Entries deleted since the last call.
    pub fn take_deleted(&self) -> ConntrackFlowsDeleted {
        std::mem::take(&mut self.shared.lock().deleted)
    }

    /// Waits until everything handed over is done (or `limit` passes): whether it is.
    pub fn settle(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut p = self.shared.lock();
        while !p.is_empty() || p.running {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            p = self.shared.changed.wait_timeout(p, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        true
    }
}

impl Drop for ConntrackWorker {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::fake::RecordingConntrack;

    fn decision() -> Option<Decision> {
        Some(Decision { ruleset: Arc::default(), pods: SharedList::default(), node: "node-a".into() })
    }

    fn worker(pace: Duration) -> (ConntrackWorker, RecordingConntrack) {
        let table = RecordingConntrack::new();
        let worker = ConntrackWorker::start(Box::new(table.clone()), pace, || {}).unwrap();
        (worker, table)
    }

    #[test]
    fn a_decision_taken_back_before_the_workers_slot_waits_for_the_one_handed_over_next() {
        let (worker, table) = worker(Duration::from_millis(300));
        worker.post(HashSet::new(), decision());
        assert!(worker.settle(Duration::from_secs(5)), "the first decision runs at once");
        assert_eq!(table.state().dumps, 1);

        worker.post(HashSet::new(), decision());
        assert!(worker.retract_decision(), "the worker waits for its slot: the decision can be taken back");
        std::thread::sleep(Duration::from_millis(450));
        assert_eq!(table.state().dumps, 1, "past its slot, the worker waits for the sync's own decision");

        worker.post(HashSet::new(), decision());
        assert!(worker.settle(Duration::from_secs(5)));
        assert_eq!(table.state().dumps, 2, "the decision handed over after the sync runs");
    }

    #[test]
    fn a_decision_stays_with_the_worker_once_its_slot_has_come() {
        let (worker, table) = worker(Duration::from_millis(300));
        assert!(!worker.retract_decision(), "nothing handed over: nothing to take back");
        worker.post(HashSet::new(), decision());
        assert!(worker.settle(Duration::from_secs(5)));
        std::thread::sleep(Duration::from_millis(350));
        // The slot has come: a decision handed over now is the worker's to run, never taken back.
        let mut p = worker.shared.lock();
        p.decide = decision();
        drop(p);
        assert!(!worker.retract_decision());
        worker.shared.changed.notify_all();
        assert!(worker.settle(Duration::from_secs(5)));
        assert_eq!(table.state().dumps, 2);
    }
}
