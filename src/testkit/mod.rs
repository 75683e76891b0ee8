//! Test support shared by unit tests, integration tests and system tests: an in-process
//! fake Kubernetes API server, pods as real clusters serve them ([`realistic`]), a
//! recording [`crate::agent::SyncTarget`] and the real `netpol-agent` binary as a child
//! process.

pub mod agent_process;
pub mod apiserver;
pub mod mirror;
pub mod objects;
pub mod realistic;
pub mod sync;
