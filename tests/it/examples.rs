//! Every `policy-examples/*/expect.yaml` check holds, by the reference evaluator and by the
//! matrix engine.

use std::path::{Path, PathBuf};

use netpol::cli::query;
use netpol::k8s::load::{self, LoadOptions};
use netpol::policy::evaluate::{self, Endpoint};
use netpol::policy::matrix::{Family, Index, Probe, ProbePort};
use netpol::policy::model::Protocol;
use serde_json::Value;

fn examples() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("policy-examples");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("expect.yaml").exists())
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn there_are_at_least_nine_examples_and_the_founding_one() {
    let names: Vec<String> = examples().iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert!(names.len() >= 9, "{names:?}");
    assert!(names.contains(&"frontend-backend".to_string()));
}

#[test]
fn every_example_expectation_holds() {
    let mut failures = Vec::new();
    let mut checked = 0;
    for dir in examples() {
        let sources = load::read_sources(std::slice::from_ref(&dir)).unwrap();
        let loaded = load::load_sources(&sources, &LoadOptions::default()).unwrap_or_else(|e| panic!("{e}"));
        let cluster = &loaded.cluster;
        let expect: Value = yaml_serde::from_str(&std::fs::read_to_string(dir.join("expect.yaml")).unwrap()).unwrap();
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let index = Index::new(cluster, Family::Primary);
        for check in expect["checks"].as_array().expect("checks") {
            let text = |k: &str| match &check[k] {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                other => panic!("{name}: bad {k}: {other}"),
            };
            let protocol = Protocol::parse(check["protocol"].as_str().unwrap_or("TCP")).unwrap();
            let want = check["allowed"].as_bool().unwrap();
            let conn = query::connection(cluster, &text("from"), &text("to"), &text("port"), protocol, Family::Primary)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let got = evaluate::evaluate(cluster, &conn).allowed;
            checked += 1;
            let label = format!("{name}: {} -> {} {}/{}", text("from"), text("to"), protocol, text("port"));
            if got != want {
                failures.push(format!("{label}: expected {want}, evaluator says {got}"));
            }
            // The matrix engine must agree on pod-to-pod checks over the primary family.
            if let (Endpoint::Pod(i), Endpoint::Pod(j)) = (conn.src, conn.dst)
                && conn.ipv6 == Family::Primary.ipv6_towards(cluster, j)
            {
                let probe = Probe { port: ProbePort::Number(conn.port), protocol };
                if index.matrix(&probe).get(i, j) != want {
                    failures.push(format!("{label}: expected {want}, matrix engine disagrees"));
                }
            }
        }
    }
    assert!(checked > 100, "only {checked} checks");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_legacy_policy_gives_the_same_matrix_as_its_v1_form() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("policy-examples");
    let load_dir = |d: &str| {
        let sources = load::read_sources(&[root.join(d)]).unwrap();
        load::load_sources(&sources, &LoadOptions::default()).unwrap()
    };
    let (v1, legacy) = (load_dir("frontend-backend"), load_dir("legacy-frontend-backend"));
    assert_eq!(v1.cluster.policies, legacy.cluster.policies);
    assert!(
        legacy
            .warnings
            .iter()
            .any(|w| w.contains("net.alpha.kubernetes.io/v1alpha1") && w.contains("apiVersion: networking.k8s.io/v1"))
    );
}
