//! Frees what a sync replaced on a thread of its own, off the path to the next commit.
//!
//! ```text
//!  sync thread ── later(old pod list, old cluster) ──► channel ──► "dispose" thread: drop
//! ```
//!
//! The pod list a sync replaces holds 100 000 shared pods at scale: its last owner
//! decrements 100 000 reference counts spread over the heap, 5-10 ms that delayed every
//! next sync (an eighth of the sync thread's time at 100k pods, benches/README.md). Sent
//! here, the sync thread only moves a pointer. Freeing never fails. At most
//! [`BACKLOG`] values wait: should the thread fall behind, the sender waits for it (the
//! memory they hold stays bounded).

use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Mutex, OnceLock};

type Garbage = Box<dyn Send>;

/// Values waiting to be freed at most (a sync gives away one or two).
pub const BACKLOG: usize = 64;

/// Drops `value` on the dispose thread (inline if that thread could not be started).
pub fn later<T: Send + 'static>(value: T) {
    static THREAD: OnceLock<Option<Mutex<SyncSender<Garbage>>>> = OnceLock::new();
    let sender = THREAD.get_or_init(|| {
        let (tx, rx) = sync_channel::<Garbage>(BACKLOG);
        let spawned = std::thread::Builder::new().name("dispose".into()).spawn(move || {
            for garbage in rx {
                drop(garbage);
            }
        });
        spawned.ok().map(|_| Mutex::new(tx))
    });
    let garbage: Garbage = Box::new(value);
    match sender {
        Some(sender) => {
            let sender = sender.lock().unwrap_or_else(|e| e.into_inner());
            // The thread only ends with the process; should the send fail, it drops here.
            let _ = sender.send(garbage);
        }
        None => drop(garbage),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    #[test]
    fn a_value_given_away_is_dropped_soon_on_another_thread() {
        struct Witness(Arc<Mutex<Option<std::thread::ThreadId>>>);
        impl Drop for Witness {
            fn drop(&mut self) {
                *self.0.lock().unwrap() = Some(std::thread::current().id());
            }
        }
        let dropped_on = Arc::new(Mutex::new(None));
        later(Witness(Arc::clone(&dropped_on)));
        let deadline = Instant::now() + Duration::from_secs(10);
        while dropped_on.lock().unwrap().is_none() {
            assert!(Instant::now() < deadline, "never dropped");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_ne!(*dropped_on.lock().unwrap(), Some(std::thread::current().id()));
    }
}
