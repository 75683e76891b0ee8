//! An in-memory conntrack table for tests: it holds the flows a test puts in, answers dumps
//! from them, removes what is deleted and records every call. Clones share one table, so a
//! test keeps a clone while the agent owns the other.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{ConntrackError, ConntrackTable, Flow};

#[derive(Debug, Default)]
pub struct Recorded {
    /// The table now.
    pub flows: Vec<Flow>,
    /// The node's own addresses, as `local_addresses` reports them.
    pub node_addresses: HashSet<IpAddr>,
    /// How many dumps were asked for.
    pub dumps: usize,
    /// Every flow deleted, in order.
    pub deleted: Vec<Flow>,
    /// The next call fails with this (once).
    pub fail_next: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub struct RecordingConntrack(Arc<Mutex<Recorded>>);

impl RecordingConntrack {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn state(&self) -> MutexGuard<'_, Recorded> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds flows to the table.
    pub fn insert(&self, flows: impl IntoIterator<Item = Flow>) {
        self.state().flows.extend(flows);
    }

    fn failure(&self) -> Result<(), ConntrackError> {
        match self.state().fail_next.take() {
            Some(e) => Err(ConntrackError(e)),
            None => Ok(()),
        }
    }
}

impl ConntrackTable for RecordingConntrack {
    fn flows(&mut self) -> Result<Vec<Flow>, ConntrackError> {
        self.failure()?;
        let mut s = self.state();
        s.dumps += 1;
        Ok(s.flows.clone())
    }

    fn delete(&mut self, flows: &[Flow]) -> Result<usize, ConntrackError> {
        self.failure()?;
        let mut s = self.state();
        let before = s.flows.len();
        s.flows.retain(|f| !flows.contains(f));
        s.deleted.extend_from_slice(flows);
        Ok(before - s.flows.len())
    }

    fn local_addresses(&mut self) -> Result<HashSet<IpAddr>, ConntrackError> {
        self.failure()?;
        Ok(self.state().node_addresses.clone())
    }
}
