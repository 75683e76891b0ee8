//! Every integration test but `tests/lab.rs` (see its top for why), in one binary: the crate
//! links once instead of once per file.
//! Each file is a module; `common` holds what several of them share.

mod agent_sync;
mod agent_system;
mod agent_tiers;
mod agent_watch;
mod cli;
mod cli_cluster;
mod common;
mod compile;
mod conformance;
mod conntrack;
mod deploy;
mod diff_lint;
mod examples;
mod kernel;
mod kernel_atomicity;
mod loader_fuzz;
mod nflog;
mod picture;
