//! Every case of the upstream conformance corpus, through the real CLI's JSON output, on
//! every engine (DESIGN.md §7: "must all pass on every engine").
//!
//! The corpus lives in `tests/conformance/cases` (upstream's cases and our own, see its
//! README); the tiers corpus (ClusterNetworkPolicy, AdminNetworkPolicy,
//! BaselineAdminNetworkPolicy, from kubernetes-sigs/network-policy-api) in
//! `tests/conformance/tiers`, where a `?` cell is one upstream does not check. Under
//! `CI=true` a machine where the kernel engine cannot run (root, `ip`, `nft`) fails the
//! kernel tests; elsewhere they skip.

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

fn check_engine(engine: &str, cases: Vec<Case>) {
    let mut failures = Vec::new();
    for case in cases {
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
    check_engine("evaluator", common::conformance_cases());
}

#[test]
fn every_conformance_case_passes_with_the_ruleset_engine() {
    check_engine("ruleset", common::conformance_cases());
}

/// One kernel run per case (one lab): every port and protocol of the case at once; the
/// output holds their cross product, from which each expected probe is picked.
#[test]
fn every_conformance_case_passes_with_the_kernel_engine() {
    check_kernel(common::conformance_cases());
}

fn check_kernel(cases: Vec<Case>) {
    if !common::kernel_or_skip() {
        return;
    }
    let started = std::time::Instant::now();
    let mut failures = Vec::new();
    for case in &cases {
        let mut ports: Vec<String> = case.probes.iter().map(|(p, _)| p.port.to_string()).collect();
        let mut protocols: Vec<&str> = case.probes.iter().map(|(p, _)| p.protocol.as_str()).collect();
        ports.sort();
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

#[test]
fn every_tier_conformance_case_passes_with_the_evaluator_engine() {
    check_engine("evaluator", common::tier_conformance_cases());
}

#[test]
fn every_tier_conformance_case_passes_with_the_ruleset_engine() {
    check_engine("ruleset", common::tier_conformance_cases());
}

#[test]
fn every_tier_conformance_case_passes_with_the_kernel_engine() {
    check_kernel(common::tier_conformance_cases());
}

/// The tiers corpus read as plain YAML, without the loader: every file parses, ends with
/// its `Expectation`, whose `podOrder` names exactly the pods the file declares and whose
/// matrices are square over them, made of `.`, `X` and `?` only, each asserting something.
#[test]
fn every_tier_case_file_parses_and_its_pod_order_names_exactly_its_pods() {
    for path in common::case_files(&common::tier_conformance_dir(), 20) {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        let docs: Vec<Value> = netpol::k8s::load::split_documents(&text)
            .into_iter()
            .map(|(_, doc)| yaml_serde::from_str::<Value>(&doc).unwrap_or_else(|e| panic!("{name}: {e}")))
            .filter(|v| !v.is_null())
            .collect();
        let (exp, objects) = docs.split_last().unwrap_or_else(|| panic!("{name}: empty"));
        assert_eq!(exp["kind"], "Expectation", "{name}: the last document must be the Expectation");
        assert!(objects.iter().all(|o| o["kind"] != "Expectation"), "{name}: more than one Expectation");
        let mut declared: Vec<String> = objects
            .iter()
            .filter(|o| o["kind"] == "Pod")
            .map(|o| {
                format!("{}/{}", o["metadata"]["namespace"].as_str().unwrap(), o["metadata"]["name"].as_str().unwrap())
            })
            .collect();
        let order: Vec<String> =
            exp["podOrder"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect();
        let mut ordered = order.clone();
        declared.sort();
        ordered.sort();
        assert_eq!(ordered, declared, "{name}: podOrder and the declared pods differ");
        ordered.dedup();
        assert_eq!(ordered.len(), order.len(), "{name}: podOrder names a pod twice");
        let probes = exp["probes"].as_array().unwrap_or_else(|| panic!("{name}: no probes"));
        assert!(!probes.is_empty(), "{name}: no probes");
        for probe in probes {
            let rows: Vec<Vec<common::Cell>> = probe["matrix"]
                .as_str()
                .unwrap()
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(common::parse_row)
                .collect();
            assert_eq!(rows.len(), order.len(), "{name}: {probe:?} has the wrong number of rows");
            assert!(rows.iter().all(|r| r.len() == order.len()), "{name}: a row of {probe:?} has the wrong width");
            assert!(rows.iter().flatten().any(Option::is_some), "{name}: {probe:?} asserts no cell");
        }
    }
}
