//! What `netpol-check` shows and generates: parsing what a user types, and formatting
//! answers. No engine lives here.
//!
//! ```text
//!  "ns/pod", "10.1.2.3", "http" ──► query ──► evaluate::Connection
//!  MatrixReport, Verdict ─────────► report ──► text / JSON / YAML / CSV
//!  Cluster + matrices ────────────► picture ─► Graphviz DOT / one HTML page (heat maps + explanations)
//!  Cluster + pod ─────────────────► explain ──► text
//!  old Cluster + new Cluster ─────► diff ─────► changed cells by cause ──► text / JSON
//!  Cluster ───────────────────────► lint ─────► findings ──► text / JSON
//!  "svc/ns/name" + Services ──────► services ─► endpoints ──► a pod answer each / matrix columns
//!  Params{pods, policies, ...} ───► generate ──► Cluster (benchmarks, property tests)
//!  --rule-counters, --drop-log... ─► observe ──► compile::Observe (netpol-check and the agent)
//! ```

pub mod diff;
pub mod explain;
pub mod generate;
pub mod lint;
pub mod observe;
pub mod picture;
pub mod query;
pub mod report;
pub mod services;
