//! The one door from Kubernetes objects to the model: files and API objects in,
//! defaulted and validated [`crate::policy::model`] values out.
//!
//! ```text
//!  YAML / JSON files ──► load (documents, kinds, workloads, live dumps) ──┐
//!  API watch (agent) ─────────────────────────────────────────────────────┴─► convert ──► model
//! ```

pub mod convert;
pub mod load;
pub mod tiers;
