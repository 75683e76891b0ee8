//! A recording [`SyncTarget`] for tests: keeps every call with its snapshot, and can be
//! told to fail, panic, be slow or hold a call until the test releases it.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::agent::{Snapshot, SyncError, SyncStats, SyncTarget};

/// One call to [`SyncTarget::sync`].
#[derive(Debug, Clone)]
pub struct SyncCall {
    pub full: bool,
    pub snapshot: Snapshot,
    pub at: Instant,
    /// Whether this call was made to fail (or panic).
    pub failed: bool,
}

#[derive(Default)]
struct Inner {
    calls: Vec<SyncCall>,
    fail_next: u32,
    panic_next: u32,
    delay: Duration,
    cleanups: u32,
    /// What the next successful calls report as staged elements remaining, one each.
    staged: std::collections::VecDeque<usize>,
}

/// A [`SyncTarget`] that records. Clones share the record, so a test keeps one clone and
/// hands the other to the sync loop.
#[derive(Clone, Default)]
pub struct RecordingTarget {
    inner: Arc<Mutex<Inner>>,
    /// Calls block while this is true (see [`RecordingTarget::hold`]).
    held: Arc<(Mutex<bool>, Condvar)>,
}

impl RecordingTarget {
    pub fn new() -> RecordingTarget {
        RecordingTarget::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every call so far, oldest first.
    pub fn calls(&self) -> Vec<SyncCall> {
        self.lock().calls.clone()
    }

    /// The last call, if any.
    pub fn last(&self) -> Option<SyncCall> {
        self.lock().calls.last().cloned()
    }

    /// The next `n` calls fail with [`SyncError::Apply`].
    pub fn fail_next(&self, n: u32) {
        self.lock().fail_next = n;
    }

    /// The next `n` calls panic.
    pub fn panic_next(&self, n: u32) {
        self.lock().panic_next = n;
    }

    /// Every call takes this long (blocking, as a real `nft` run does).
    pub fn set_delay(&self, delay: Duration) {
        self.lock().delay = delay;
    }

    /// The next successful calls report these staged elements still to add, one per call
    /// (a fill in chunks, [`crate::nft::staging`]); later ones report none.
    pub fn stage_next(&self, remaining: &[usize]) {
        self.lock().staged.extend(remaining);
    }

    /// Every call from now on blocks (after it is recorded) until [`RecordingTarget::release`]:
    /// a test keeps a sync running for exactly as long as it needs, not for a guessed delay.
    pub fn hold(&self) {
        *self.held.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
    }

    /// Lets held calls return, and later ones run through.
    pub fn release(&self) {
        *self.held.0.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.held.1.notify_all();
    }

    /// Calls to [`SyncTarget::cleanup`].
    pub fn cleanups(&self) -> u32 {
        self.lock().cleanups
    }

    /// Polls (every 10 ms, real time) until `pred` holds for the calls, or `timeout`.
    pub async fn wait_until(&self, timeout: Duration, mut pred: impl FnMut(&[SyncCall]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.lock().calls) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl SyncTarget for RecordingTarget {
    fn sync(&mut self, snapshot: &Snapshot, full: bool) -> Result<SyncStats, SyncError> {
        let (delay, panic, fail, staged) = {
            let mut g = self.lock();
            let panic = g.panic_next > 0;
            g.panic_next = g.panic_next.saturating_sub(1);
            let fail = !panic && g.fail_next > 0;
            if fail {
                g.fail_next -= 1;
            }
            g.calls.push(SyncCall { full, snapshot: snapshot.clone(), at: Instant::now(), failed: panic || fail });
            let staged = if panic || fail { 0 } else { g.staged.pop_front().unwrap_or(0) };
            (g.delay, panic, fail, staged)
        };
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        let (held, released) = &*self.held;
        drop(released.wait_while(held.lock().unwrap_or_else(|e| e.into_inner()), |h| *h));
        if panic {
            panic!("injected panic");
        }
        if fail {
            return Err(SyncError::Apply("injected failure".into()));
        }
        Ok(SyncStats {
            transaction_ops: snapshot.pods.len() + snapshot.policies.len(),
            chains: snapshot.policies.len(),
            sets: snapshot.policies.len(),
            set_elements: snapshot.pods.len(),
            rules: snapshot.policies.len(),
            staged_elements_remaining: staged,
            ..SyncStats::default()
        })
    }

    fn cleanup(&mut self) -> Result<(), SyncError> {
        self.lock().cleanups += 1;
        Ok(())
    }
}
