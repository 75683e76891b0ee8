//! Every case of the upstream conformance corpus, through the real CLI's JSON output, on
//! every engine (DESIGN.md §7: "must all pass on every engine").
//!
//! The corpus lives in `tests/conformance/cases` (upstream's cases and our own, see its
//! README). Under `CI=true` a machine where the kernel engine cannot run (root, `ip`, `nft`)
//! fails the kernel test; elsewhere that skips.

use crate::common;

use std::process::Command;

use common::Case;
use serde_json::Value;

fn run_matrix(case: &Case, engine: &str, probe: usize) -> Value {
    let p = &case.probes[probe].0;
    let out = Command::new(env!("CARGO_BIN_EXE_netpol-check"))
        .args(["matrix", "-o", "json", "--engine", engine, "--port", &p.port.to_string(), "--protocol"])
        .arg(p.protocol.as_str())
        .arg("-f")
        .arg(&case.path)
        .output()
        .expect("run netpol-check");
    assert!(out.status.success(), "netpol-check failed on {}: {}", case.name, String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

fn check_engine(engine: &str) {
    let mut failures = Vec::new();
    for case in common::conformance_cases() {
        for probe in 0..case.probes.len() {
            let got = run_matrix(&case, engine, probe);
            // The CLI lists pods sorted by namespace then name, as the cluster holds them.
            let pods: Vec<String> = case.cluster.pods.iter().map(|p| p.id.to_string()).collect();
            assert_eq!(got["pods"], serde_json::json!(pods), "{}", case.name);
            let allowed = &got["probes"][0]["allowed"];
            failures.extend(case.disagreements(probe, engine, |i, j| allowed[i][j].as_bool().unwrap()));
        }
    }
    assert!(failures.is_empty(), "{} cells disagree:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn every_conformance_case_passes_with_the_evaluator_engine() {
    check_engine("evaluator");
}

#[test]
fn every_conformance_case_passes_with_the_ruleset_engine() {
    check_engine("ruleset");
}

/// One kernel run per case (one lab): every port and protocol of the case at once; the
/// output holds their cross product, from which each expected probe is picked.
#[test]
fn every_conformance_case_passes_with_the_kernel_engine() {
    if !common::kernel_or_skip() {
        return;
    }
    let started = std::time::Instant::now();
    let cases = common::conformance_cases();
    let mut failures = Vec::new();
    for case in &cases {
        let mut ports: Vec<String> = case.probes.iter().map(|(p, _)| p.port.to_string()).collect();
        let mut protocols: Vec<&str> = case.probes.iter().map(|(p, _)| p.protocol.as_str()).collect();
        ports.dedup();
        protocols.sort();
        protocols.dedup();
        let out = Command::new(env!("CARGO_BIN_EXE_netpol-check"))
            .args(["matrix", "-o", "json", "--engine", "kernel", "--port", &ports.join(","), "--protocol"])
            .arg(protocols.join(","))
            .arg("-f")
            .arg(&case.path)
            .output()
            .expect("run netpol-check");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "netpol-check failed on {}: {stderr}", case.name);
        let got: Value = serde_json::from_slice(&out.stdout).expect("JSON output");
        assert_eq!(got["engine"], "kernel");
        for (k, (probe, _)) in case.probes.iter().enumerate() {
            let port = match &probe.port {
                netpol::policy::matrix::ProbePort::Number(n) => serde_json::json!(n),
                netpol::policy::matrix::ProbePort::Named(name) => serde_json::json!(name),
            };
            let found = got["probes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["port"] == port && p["protocol"] == probe.protocol.as_str());
            let allowed = &found.unwrap_or_else(|| panic!("{}: no {probe} in the output", case.name))["allowed"];
            failures.extend(case.disagreements(k, "kernel", |i, j| allowed[i][j].as_bool().unwrap()));
        }
    }
    eprintln!("{} conformance cases through `matrix --engine kernel` in {:.1?}", cases.len(), started.elapsed());
    assert!(failures.is_empty(), "{} cells disagree:\n{}", failures.len(), failures.join("\n"));
}
