//! Do the engines agree? DESIGN.md §2: "Every verdict can be computed three ways, and they
//! must agree ... A disagreement is a bug in one of them, never a tolerance."
//!
//! ```text
//!  per family: per engine: one BitMatrix per probe (same cluster, same probes)
//!      ──► compare row by row (bit sets), then cell by cell where rows differ
//!      ──► Vec<Disagreement{family, probe, src, dst, verdict per engine}>
//!      ──► Report ──► describe (one line per cell) | summary line | JSON
//! ```
//!
//! Pure: the engines run elsewhere (the CLI, the tests); this only compares their matrices
//! and words the result, so the tests and `netpol-check verify` share one judgement.

use serde_json::{Value, json};

use crate::policy::bitset::BitMatrix;
use crate::policy::matrix::{self, Family, Probe, ProbePort};
use crate::policy::model::Cluster;

/// One cell where the engines do not all say the same.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disagreement {
    /// The family the matrices were asked for.
    pub family: Family,
    /// Index into the probes.
    pub probe: usize,
    /// Source and destination, indices into `cluster.pods`.
    pub src: usize,
    pub dst: usize,
    /// Each engine's verdict (allowed?), in the order the engines were given.
    pub verdicts: Vec<bool>,
}

/// The cells where `engines` (each: one matrix per probe, all for `family`) disagree, in
/// probe, source, destination order.
///
/// # Panics
/// When the engines' results have different shapes (a caller bug, not a disagreement).
pub fn disagreements(family: Family, engines: &[&[BitMatrix]]) -> Vec<Disagreement> {
    let Some((first, rest)) = engines.split_first() else { return Vec::new() };
    for other in rest {
        assert_eq!(other.len(), first.len(), "every engine answers every probe");
        for (a, b) in first.iter().zip(other.iter()) {
            assert_eq!(a.size(), b.size(), "every engine answers for every pod");
        }
    }
    let mut out = Vec::new();
    for (probe, m) in first.iter().enumerate() {
        for src in 0..m.size() {
            if rest.iter().all(|e| e[probe].row(src) == m.row(src)) {
                continue;
            }
            for dst in 0..m.size() {
                let verdicts: Vec<bool> = engines.iter().map(|e| e[probe].get(src, dst)).collect();
                if verdicts.iter().any(|&v| v != verdicts[0]) {
                    out.push(Disagreement { family, probe, src, dst, verdicts });
                }
            }
        }
    }
    out
}

/// Everything one verification compared, and what it found.
#[derive(Clone, Debug)]
pub struct Report {
    pub engines: Vec<String>,
    pub families: Vec<Family>,
    pub probes: Vec<Probe>,
    /// Cells compared: families × probes × pods².
    pub cells: usize,
    /// Cells every engine denies: a sanity figure (a run that denies nothing proves little).
    pub denied: usize,
    pub disagreements: Vec<Disagreement>,
}

impl Report {
    /// Compares `results[f][e][k]`: family `families[f]`, engine `engines[e]`, probe `probes[k]`.
    pub fn new(
        engines: Vec<String>,
        families: Vec<Family>,
        probes: Vec<Probe>,
        results: &[Vec<Vec<BitMatrix>>],
    ) -> Self {
        assert_eq!(results.len(), families.len(), "one result per family");
        let mut report = Report { engines, families, probes, cells: 0, denied: 0, disagreements: Vec::new() };
        for (family, per_engine) in report.families.iter().zip(results) {
            let views: Vec<&[BitMatrix]> = per_engine.iter().map(Vec::as_slice).collect();
            report.disagreements.extend(disagreements(*family, &views));
            let Some(first) = per_engine.first() else { continue };
            for (k, m) in first.iter().enumerate() {
                let n = m.size();
                report.cells += n * n;
                let denied_by_all = |i: usize, j: usize| per_engine.iter().all(|e| !e[k].get(i, j));
                report.denied += (0..n).map(|i| (0..n).filter(|&j| denied_by_all(i, j)).count()).sum::<usize>();
            }
        }
        report
    }

    pub fn agree(&self) -> bool {
        self.disagreements.is_empty()
    }

    /// One line: what was compared and whether the engines agree.
    pub fn summary(&self) -> String {
        let engines = self.engines.join(", ");
        let fams: Vec<&str> = self.families.iter().map(|f| family_name(*f)).collect();
        let scope = format!(
            "{} cells ({} probes × {} × pods²; {} denied by all)",
            self.cells,
            self.probes.len(),
            fams.join("+"),
            self.denied
        );
        if self.agree() {
            format!("verify: {engines} agree on all {scope}")
        } else {
            format!("verify: {} of {scope} disagree between {engines}", self.disagreements.len())
        }
    }

    /// One line per disagreeing cell: probe, family of the packet, source -> destination,
    /// the port it used, and every engine's verdict.
    pub fn describe(&self, cluster: &Cluster, d: &Disagreement) -> String {
        let probe = &self.probes[d.probe];
        let verdicts: Vec<String> =
            self.engines.iter().zip(&d.verdicts).map(|(e, &v)| format!("{e} {}", verdict(v))).collect();
        format!(
            "{} {} {} -> {}{}: {}",
            probe,
            cell_family(cluster, d),
            cluster.pods[d.src].id,
            cluster.pods[d.dst].id,
            resolved_port(cluster, probe, d).map(|p| format!(" (port {p})")).unwrap_or_default(),
            verdicts.join(", ")
        )
    }

    /// The machine form: `{"engines": [...], "families": [...], "cells": N, "deniedByAll": N,
    /// "agree": bool, "disagreements": [{"from", "to", "port", "protocol", "family",
    /// "verdicts": {"engine": "allowed"|"denied", ...}}]}`.
    pub fn to_json(&self, cluster: &Cluster) -> Value {
        let items: Vec<Value> = self
            .disagreements
            .iter()
            .map(|d| {
                let probe = &self.probes[d.probe];
                let port = match &probe.port {
                    ProbePort::Number(n) => json!(n),
                    ProbePort::Named(name) => json!(name),
                };
                let verdicts: serde_json::Map<String, Value> =
                    self.engines.iter().zip(&d.verdicts).map(|(e, &v)| (e.clone(), json!(verdict(v)))).collect();
                json!({
                    "from": cluster.pods[d.src].id.to_string(),
                    "to": cluster.pods[d.dst].id.to_string(),
                    "port": port,
                    "resolvedPort": resolved_port(cluster, probe, d),
                    "protocol": probe.protocol.as_str(),
                    "family": cell_family(cluster, d),
                    "verdicts": verdicts,
                })
            })
            .collect();
        json!({
            "engines": self.engines,
            "families": self.families.iter().map(|f| family_name(*f)).collect::<Vec<_>>(),
            "cells": self.cells,
            "deniedByAll": self.denied,
            "agree": self.agree(),
            "disagreements": items,
        })
    }
}

fn verdict(allowed: bool) -> &'static str {
    if allowed { "allowed" } else { "denied" }
}

/// The family's name as the CLI spells it.
pub fn family_name(f: Family) -> &'static str {
    match f {
        Family::Primary => "primary",
        Family::Ipv4 => "ipv4",
        Family::Ipv6 => "ipv6",
    }
}

/// The family the cell's packet uses (Primary: the destination's first address decides).
fn cell_family(cluster: &Cluster, d: &Disagreement) -> &'static str {
    if d.family.ipv6_towards(cluster, d.dst) { "IPv6" } else { "IPv4" }
}

/// The port number a named probe resolved to on the destination (None for numbers, or when
/// the destination lacks the name).
fn resolved_port(cluster: &Cluster, probe: &Probe, d: &Disagreement) -> Option<u16> {
    match probe.port {
        ProbePort::Number(_) => None,
        ProbePort::Named(_) => matrix::cell_connection(cluster, probe, d.family, d.src, d.dst).map(|c| c.port),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::bitset::BitSet;
    use crate::policy::model::{ObjectRef, Pod, Policy, Protocol};

    /// Rows of `.` (allowed) and `X` (denied).
    fn matrix(rows: &[&str]) -> BitMatrix {
        let row = |r: &str| {
            let mut set = BitSet::empty(rows.len());
            r.chars().enumerate().filter(|(_, c)| *c == '.').for_each(|(j, _)| set.insert(j));
            set
        };
        BitMatrix::from_rows(rows.iter().map(|r| row(r)).collect())
    }

    fn cluster() -> Cluster {
        let pod = |name: &str, ip: &str| Pod {
            id: ObjectRef::new("a", name),
            labels: Default::default(),
            node: "n1".into(),
            ips: ip.parse::<std::net::IpAddr>().unwrap().into(),
            host_network: false,
            ports: Default::default(),
        };
        Cluster::new(vec![], vec![pod("x", "10.0.0.1"), pod("y", "fd00::2")], Vec::<Policy>::new())
    }

    fn tcp80() -> Probe {
        Probe { port: ProbePort::Number(80), protocol: Protocol::Tcp }
    }

    #[test]
    fn equal_matrices_have_no_disagreement() {
        let m = vec![matrix(&[".X", ".."])];
        assert!(disagreements(Family::Ipv4, &[&m, &m.clone(), &m.clone()]).is_empty());
    }

    #[test]
    fn every_differing_cell_is_reported_with_each_engines_verdict() {
        let a = vec![matrix(&[".X", ".."]), matrix(&["..", ".."])];
        let b = vec![matrix(&["..", ".."]), matrix(&["..", ".X"])];
        let d = disagreements(Family::Ipv6, &[&a, &a.clone(), &b]);
        assert_eq!(
            d,
            vec![
                Disagreement { family: Family::Ipv6, probe: 0, src: 0, dst: 1, verdicts: vec![false, false, true] },
                Disagreement { family: Family::Ipv6, probe: 1, src: 1, dst: 1, verdicts: vec![true, true, false] },
            ]
        );
    }

    #[test]
    fn the_report_names_cells_engines_and_counts() {
        let c = cluster();
        let good = vec![matrix(&[".X", "X."])];
        let bad = vec![matrix(&["..", "X."])];
        let engines = vec!["evaluator".to_string(), "kernel".to_string()];
        let report = Report::new(engines, vec![Family::Primary], vec![tcp80()], &[vec![good.clone(), bad.clone()]]);
        assert!(!report.agree());
        assert_eq!((report.cells, report.denied), (4, 1));
        assert_eq!(
            report.describe(&c, &report.disagreements[0]),
            "TCP/80 IPv6 a/x -> a/y: evaluator denied, kernel allowed"
        );
        assert_eq!(
            report.summary(),
            "verify: 1 of 4 cells (1 probes × primary × pods²; 1 denied by all) disagree between evaluator, kernel"
        );
        let j = report.to_json(&c);
        assert_eq!(j["disagreements"][0]["verdicts"]["kernel"], "allowed");
        assert_eq!(j["disagreements"][0]["family"], "IPv6");
        assert_eq!(j["agree"], false);
        let same =
            Report::new(vec!["a".into(), "b".into()], vec![Family::Ipv4], vec![tcp80()], &[vec![good.clone(), good]]);
        assert!(same.agree());
        assert!(same.summary().starts_with("verify: a, b agree on all 4 cells"), "{}", same.summary());
    }
}
