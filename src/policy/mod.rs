//! The pure core: what NetworkPolicy means, with no I/O and no Kubernetes API type.
//!
//! ```text
//!  model::{Namespace, Pod, Policy} ──► Cluster (sorted, indexed) ◄── tiers::{ClusterPolicy, Node, DomainMap}
//!        │                               │
//!  selector (labels) ◄───────────────────┤
//!                                        ├─► evaluate: one connection, with the rule that decided it
//!                                        └─► matrix: every pair at once, on bitset::BitMatrix
//!  service::Service + Cluster pods ──► a Service port's endpoints (pod, resolved targetPort)
//! ```

pub mod bitset;
pub mod evaluate;
pub mod matrix;
pub mod model;
pub mod selector;
pub mod service;
pub mod tiers;
