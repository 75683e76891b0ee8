//! netpol: Kubernetes NetworkPolicy, evaluated, compiled to nftables, and proved.
//!
//! ```text
//!  k8s (load, convert) ──► policy::model::Cluster ──┬─► policy (evaluate, matrix) ──► cli (report, query)
//!       ▲                    (pure core)             ├─► compile ──► nft::ir::Ruleset ──► nft (render, diff,
//!  agent (watch) ────────────────────────────────────┘                                   interpret)
//!                                                                      nft::backend (netlink, nft) ──► kernel
//!  engines: evaluator | ruleset (compile + interpret) | kernel (compile + lab + backend), and verify
//! ```
//!
//! | folder      | layer |
//! |-------------|-------|
//! | `policy/`   | the pure core: model, selectors, reference evaluator, matrix |
//! | `k8s/`      | the one door from Kubernetes objects (files or API) to the model |
//! | `compile/`  | cluster → one node's nftables ruleset (reference and incremental) |
//! | `nft/`      | the ruleset IR and everything pure about it; `nft/backend/` is its only I/O |
//! | `engines/`  | the three engines behind one call, and `verify` across them |
//! | `lab/`      | network namespaces and real packets (the kernel engine's proof) |
//! | `conntrack/`| conntrack flow dump and delete over netlink (the agent's cleanup) |
//! | `nflog/`    | the nfnetlink_log reader: packets logged to a group, attributed drop records |
//! | `nfnetlink` | nfnetlink request framing shared by `conntrack/` and `nflog/` |
//! | `agent/`    | `netpol-agent`: watch, sync loop, metrics, admin server |
//! | `cli/`      | what `netpol-check` parses and prints |
//! | `testkit/`  | fake API server and agent process helpers for tests and benchmarks |
//! | `validate`  | every rule for names, table names, durations and CIDRs, with its message |
#![forbid(unsafe_code)]

#[cfg(feature = "agent")]
pub mod agent;
pub mod cli;
pub mod compile;
#[cfg(feature = "agent")]
pub mod conntrack;
pub mod engines;
pub mod k8s;
pub mod lab;
#[cfg(feature = "agent")]
pub mod nflog;
pub mod nfnetlink;
pub mod nft;
pub mod policy;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod validate;
