//! Shared by the integration tests: the conformance corpus (`tests/conformance/`), loaded once per file,
//! and the cell-by-cell comparison every engine's test makes against it.
#![allow(dead_code)] // tests/lab.rs, its own binary, uses only kernel_or_skip

use std::path::PathBuf;

use netpol::k8s::load::{LoadOptions, load_sources, read_sources};
use netpol::policy::matrix::{Probe, ProbePort};
use netpol::policy::model::{Cluster, ObjectRef, Protocol};
use serde_json::Value;

/// Whether this machine can run the real-kernel tests: root with CAP_NET_ADMIN and
/// CAP_SYS_ADMIN, network namespaces, `ip` and `nft`. Every such test starts with
/// `if !common::kernel_or_skip() { return; }`. Without them the test prints why and passes
/// as skipped, except under `CI=true`: CI runs as root with everything installed, so there
/// a missing prerequisite is a failure, never a silent pass.
pub fn kernel_or_skip() -> bool {
    match netpol::engines::kernel::check_prerequisites() {
        Ok(()) => true,
        Err(why) => skip(&format!("this test needs the kernel: {why}")),
    }
}

/// Skips the calling test (or the part of it that needs what is missing): prints `why` and
/// returns false — except under `CI=true`, where it panics with `why`.
pub fn skip(why: &str) -> bool {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    assert!(!ci, "{why} (CI=true: failing instead of skipping)");
    eprintln!("SKIPPED: {why}");
    false
}

/// `tests/conformance/cases` in this repository: the corpus travels with the code, so a
/// fresh clone tests itself.
pub fn conformance_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/conformance/cases")
}

/// `tests/conformance/tiers`: the ClusterNetworkPolicy / AdminNetworkPolicy /
/// BaselineAdminNetworkPolicy cases transcribed from kubernetes-sigs/network-policy-api.
pub fn tier_conformance_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/conformance/tiers")
}

/// One expected cell: `.` allowed, `X` denied, `?` not checked by upstream (`None`: any
/// answer passes).
pub type Cell = Option<bool>;

/// Parses one matrix row (`. X ?` separated by spaces).
pub fn parse_row(line: &str) -> Vec<Cell> {
    line.split_whitespace()
        .map(|c| match c {
            "." => Some(true),
            "X" => Some(false),
            "?" => None,
            other => panic!("matrix cell {other:?} is none of '.', 'X', '?'"),
        })
        .collect()
}

/// One case file: its cluster and what upstream expects of it.
pub struct Case {
    pub name: String,
    pub path: PathBuf,
    pub cluster: Cluster,
    /// `podOrder`, as indices into `cluster.pods`.
    pub order: Vec<usize>,
    pub ignore_loopback: bool,
    /// Each probe with its expected matrix (rows: source, columns: destination, in `order`).
    pub probes: Vec<(Probe, Vec<Vec<Cell>>)>,
}

/// Every case of the corpus, sorted by file name.
pub fn conformance_cases() -> Vec<Case> {
    case_files(&conformance_dir(), 20).into_iter().map(load_case).collect()
}

/// Every case of the tiers corpus (`tests/conformance/tiers`), sorted by file name.
pub fn tier_conformance_cases() -> Vec<Case> {
    case_files(&tier_conformance_dir(), 20).into_iter().map(load_case).collect()
}

/// The `.yaml` files of a corpus folder, sorted; at least `min` of them, so that a
/// misplaced folder fails instead of testing nothing.
pub fn case_files(dir: &std::path::Path, min: usize) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("conformance corpus at {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= min, "expected the whole corpus in {}, found {} files", dir.display(), files.len());
    files
}

fn load_case(path: PathBuf) -> Case {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let cluster = load_sources(&read_sources(std::slice::from_ref(&path)).unwrap(), &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .cluster;
    let text = std::fs::read_to_string(&path).unwrap();
    let exp: Value = netpol::k8s::load::split_documents(&text)
        .into_iter()
        .filter_map(|(_, doc)| yaml_serde::from_str::<Value>(&doc).ok())
        .find(|v| v["kind"] == "Expectation")
        .unwrap_or_else(|| panic!("{name}: no Expectation document"));
    let order = exp["podOrder"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let (ns, pod) = s.as_str().unwrap().split_once('/').unwrap();
            cluster.pod_index(&ObjectRef::new(ns, pod)).unwrap_or_else(|| panic!("{name}: pod {ns}/{pod} not loaded"))
        })
        .collect();
    let probes = exp["probes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let port = match &p["port"] {
                Value::Number(n) => ProbePort::Number(n.as_u64().unwrap() as u16),
                v => ProbePort::Named(v.as_str().unwrap().to_string()),
            };
            let protocol = Protocol::parse(p["protocol"].as_str().unwrap()).unwrap();
            let matrix =
                p["matrix"].as_str().unwrap().lines().filter(|l| !l.trim().is_empty()).map(parse_row).collect();
            (Probe { port, protocol }, matrix)
        })
        .collect();
    Case { name, path, cluster, order, ignore_loopback: exp["ignoreLoopback"].as_bool().unwrap_or(false), probes }
}

fn verdict(allowed: bool) -> &'static str {
    if allowed { "allowed" } else { "denied" }
}

impl Case {
    /// The cells where `got(i, j)` (indices into `cluster.pods`) disagrees with probe
    /// `probe`'s expected matrix, one line each naming `engine`.
    pub fn disagreements(&self, probe: usize, engine: &str, got: impl Fn(usize, usize) -> bool) -> Vec<String> {
        let (p, want) = &self.probes[probe];
        let mut out = Vec::new();
        for (r, &i) in self.order.iter().enumerate() {
            for (c, &j) in self.order.iter().enumerate() {
                let Some(want) = want[r][c] else { continue };
                if (r == c && self.ignore_loopback) || got(i, j) == want {
                    continue;
                }
                out.push(format!(
                    "{}: {p} {} -> {}: expected {}, {engine} says {}",
                    self.name,
                    self.cluster.pods[i].id,
                    self.cluster.pods[j].id,
                    verdict(want),
                    verdict(got(i, j))
                ));
            }
        }
        out
    }
}

/// Waits until an agent's sync loop (`status`: its `SyncLoop::status`) has run a whole
/// iteration that began after this call: by then it has handled every change notified
/// before the call, syncing it or deciding not to. That is the provable point after which
/// "no (further) sync happened" can be asserted, instead of after a guessed sleep.
///
/// Each iteration starts by publishing its heartbeat; one that starts with a notification
/// pending wakes for it at once (its heartbeat timer is fresh), unless an earlier
/// iteration's batch window already took it. So the second heartbeat after the call ends an
/// iteration that began after it. Give the loop a short `heartbeat` so an idle one goes
/// around soon.
pub async fn loop_went_around(status: &tokio::sync::watch::Receiver<netpol::agent::SyncState>) {
    let since = tokio::time::Instant::now();
    let mut seen = Vec::new();
    let mut status = status.clone();
    let went_around = status.wait_for(|s| {
        if let Some(beat) = s.heartbeat.filter(|b| *b > since && !seen.contains(b)) {
            seen.push(beat);
        }
        seen.len() >= 2
    });
    let went_around = tokio::time::timeout(std::time::Duration::from_secs(10), went_around).await;
    assert!(went_around.is_ok_and(|r| r.is_ok()), "the sync loop did not go around within 10 s");
}
