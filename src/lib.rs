//! netpol: Kubernetes NetworkPolicy, evaluated, compiled to nftables, and proved.
//!
//! ```text
//!  YAML ──► load ──┐                          ┌──► evaluate ──► verdicts / explain
//!                  ├─► model::Cluster ────────┤
//!  (agent) watch ──┘   (pure, sync)           └──► matrix ──► report (text/json/yaml/csv)
//! ```
//!
//! The pure core (`model`, `selector`, `evaluate`, `matrix`, `bitset`) does no I/O;
//! `convert` is the only module that knows k8s-openapi types; `load` reads files.
#![forbid(unsafe_code)]

pub mod agent;
pub mod bitset;
pub mod compile;
pub mod conntrack;
pub mod convert;
pub mod engine;
pub mod evaluate;
pub mod generate;
pub mod kernel_engine;
pub mod lab;
pub mod load;
pub mod matrix;
pub mod model;
pub mod nft;
pub mod query;
pub mod report;
pub mod ruleset_engine;
pub mod selector;
pub mod testkit;
pub mod verify;
