//! Every case of the upstream conformance corpus, through the real CLI's JSON output.
//!
//! The corpus lives in `../shared/conformance/cases` beside the repository (override with
//! `NETPOL_CONFORMANCE_DIR`). Under `CI=true` a missing corpus fails the test.

mod common;

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
