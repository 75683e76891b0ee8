//! Every case of the upstream conformance corpus, through the real CLI's JSON output.
//!
//! The corpus lives in `../shared/conformance/cases` beside the repository (override with
//! `NETPOL_CONFORMANCE_DIR`). Under `CI=true` a missing corpus fails the test.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

pub fn conformance_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("NETPOL_CONFORMANCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/conformance/cases"));
    if dir.is_dir() {
        return Some(dir);
    }
    assert!(std::env::var("CI").as_deref() != Ok("true"), "conformance corpus missing at {}", dir.display());
    eprintln!("skipping: no conformance corpus at {}", dir.display());
    None
}

/// The `Expectation` document of a case file.
fn expectation(text: &str) -> Value {
    text.split("\n---")
        .filter_map(|doc| yaml_serde::from_str::<Value>(doc).ok())
        .find(|v| v.get("kind").and_then(Value::as_str) == Some("Expectation"))
        .expect("case has an Expectation document")
}

fn run_matrix(file: &PathBuf, engine: &str, port: u64, protocol: &str) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_netpol-check"))
        .args(["matrix", "-o", "json", "--engine", engine, "--port", &port.to_string(), "--protocol", protocol, "-f"])
        .arg(file)
        .output()
        .expect("run netpol-check");
    assert!(
        out.status.success(),
        "netpol-check failed on {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

fn check_engine(engine: &str) {
    let Some(dir) = conformance_dir() else { return };
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(files.len() >= 20, "expected the whole corpus, found {} files", files.len());
    let mut failures = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let exp = expectation(&text);
        let order: Vec<String> =
            exp["podOrder"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
        let ignore_loopback = exp["ignoreLoopback"].as_bool().unwrap_or(false);
        for probe in exp["probes"].as_array().unwrap() {
            let port = probe["port"].as_u64().unwrap();
            let protocol = probe["protocol"].as_str().unwrap();
            let got = run_matrix(file, engine, port, protocol);
            let pods: Vec<String> =
                got["pods"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
            let allowed = &got["probes"][0]["allowed"];
            let expected: Vec<Vec<bool>> = probe["matrix"]
                .as_str()
                .unwrap()
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| l.split_whitespace().map(|c| c == ".").collect())
                .collect();
            for (i, from) in order.iter().enumerate() {
                for (j, to) in order.iter().enumerate() {
                    if ignore_loopback && i == j {
                        continue;
                    }
                    let gi = pods.iter().position(|p| p == from).expect("pod in output");
                    let gj = pods.iter().position(|p| p == to).expect("pod in output");
                    let cell = allowed[gi][gj].as_bool().unwrap();
                    if cell != expected[i][j] {
                        failures.push(format!(
                            "{}: {protocol}/{port} {from} -> {to}: expected {}, got {}",
                            file.file_name().unwrap().to_string_lossy(),
                            if expected[i][j] { "allowed" } else { "denied" },
                            if cell { "allowed" } else { "denied" }
                        ));
                    }
                }
            }
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
