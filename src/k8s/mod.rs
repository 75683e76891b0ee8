//! The one door from Kubernetes objects to the model: files and API objects in,
//! defaulted and validated [`crate::policy::model`] values out.
//!
//! ```text
//!  YAML / JSON files ──► load (documents, kinds, workloads, live dumps) ──┐
//!  API lists (live, `netpol-check --cluster`) ──► load::load_api_objects ──┤
//!  API watch (agent) ─────────────────────────────────────────────────────┴─► convert ──► model
//! ```

pub mod convert;
#[cfg(feature = "cluster")]
pub mod live;
pub mod load;
pub mod tiers;
