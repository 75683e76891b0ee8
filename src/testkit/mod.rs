//! Test support shared by unit tests, integration tests and system tests: an in-process
//! fake Kubernetes API server and a recording [`crate::agent::SyncTarget`].

pub mod apiserver;
pub mod objects;
pub mod sync;
