//! What `netpol-check` shows and generates: parsing what a user types, and formatting
//! answers. No engine lives here.
//!
//! ```text
//!  "ns/pod", "10.1.2.3", "http" ──► query ──► evaluate::Connection
//!  MatrixReport, Verdict ─────────► report ──► text / JSON / YAML / CSV
//!  Cluster + pod ─────────────────► explain ──► text
//!  old Cluster + new Cluster ─────► diff ─────► changed cells by cause ──► text / JSON
//!  Cluster ───────────────────────► lint ─────► findings ──► text / JSON
//!  Params{pods, policies, ...} ───► generate ──► Cluster (benchmarks, property tests)
//!  --rule-counters, --drop-log... ─► observe ──► compile::Observe (netpol-check and the agent)
//! ```

pub mod diff;
pub mod explain;
pub mod generate;
pub mod lint;
pub mod observe;
pub mod query;
pub mod report;
