//! The kernel engine against the truth: the upstream conformance corpus, and the reference
//! evaluator on random clusters (DESIGN.md §2: `kernel == evaluator`).
//!
//! They build network namespaces, so they need root, `ip` and `nft`. Without them they skip
//! with a message, except under `CI=true`, where they fail.

mod common;

use common::ci;
use std::time::{Duration, Instant};

use netpol::bitset::BitMatrix;
use netpol::generate;
use netpol::kernel_engine::{self, KernelError};
use netpol::lab::LabSpec;
use netpol::matrix::{self, Family, Probe, ProbePort};
use netpol::model::{Cluster, Protocol};

const TIMEOUT: Duration = LabSpec::DEFAULT_TIMEOUT;

fn kernel_ok() -> bool {
    match kernel_engine::check_prerequisites() {
        Ok(()) => true,
        Err(e) if ci() => panic!("{e} (CI=true: failing instead of skipping)"),
        Err(e) => {
            eprintln!("SKIPPED: {e}");
            false
        }
    }
}

#[test]
fn every_conformance_case_passes_with_the_kernel_engine() {
    if !kernel_ok() {
        return;
    }
    let cases = common::conformance_cases();
    let started = Instant::now();
    let mut failures = Vec::new();
    for case in &cases {
        let probes: Vec<Probe> = case.probes.iter().map(|(p, _)| p.clone()).collect();
        let got = kernel_engine::matrices(&case.cluster, &probes, Family::Primary, TIMEOUT)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        for (k, m) in got.iter().enumerate() {
            failures.extend(case.disagreements(k, "the kernel", |i, j| m.get(i, j)));
        }
    }
    eprintln!("{} conformance cases on the kernel in {:.1?}", cases.len(), started.elapsed());
    assert!(failures.is_empty(), "{} cells disagree:\n{}", failures.len(), failures.join("\n"));
}

fn verdict(allowed: bool) -> &'static str {
    if allowed { "allowed" } else { "denied" }
}

/// `small_random(seed)` without its hostNetwork pods, which the kernel engine refuses.
fn random_cluster(seed: u64) -> Cluster {
    let c = generate::small_random(seed);
    let pods = c.pods.into_iter().filter(|p| !p.host_network);
    Cluster::new(c.namespaces.into_values().collect(), pods, c.policies)
}

fn random_probes() -> Vec<Probe> {
    vec![
        Probe { port: ProbePort::Number(80), protocol: Protocol::Tcp },
        Probe { port: ProbePort::Number(81), protocol: Protocol::Udp },
        Probe { port: ProbePort::Number(80), protocol: Protocol::Sctp },
        Probe { port: ProbePort::Named("web".into()), protocol: Protocol::Tcp },
    ]
}

/// Every differing cell, as `seed, family, probe, src -> dst: evaluator X, kernel Y`.
fn diff(seed: u64, family: Family, probe: &Probe, cluster: &Cluster, want: &BitMatrix, got: &BitMatrix) -> Vec<String> {
    let n = cluster.pods.len();
    let mut out = Vec::new();
    for i in 0..n {
        for j in 0..n {
            if want.get(i, j) != got.get(i, j) {
                out.push(format!(
                    "seed {seed}, {family:?}, {probe}: {} -> {}: evaluator {}, kernel {}",
                    cluster.pods[i].id,
                    cluster.pods[j].id,
                    verdict(want.get(i, j)),
                    verdict(got.get(i, j))
                ));
            }
        }
    }
    out
}

/// Cells the evaluator denies although both ends have an address of the family and the port
/// resolves: only the loaded ruleset can make the kernel deny them.
fn policed_denials_of(cluster: &Cluster, probe: &Probe, family: Family, want: &BitMatrix) -> usize {
    let n = cluster.pods.len();
    let mut count = 0;
    for i in 0..n {
        for j in (0..n).filter(|&j| j != i && !want.get(i, j)) {
            if let Some(conn) = matrix::cell_connection(cluster, probe, family, i, j) {
                let has = |k: usize| cluster.pods[k].ip_of_family(conn.ipv6).is_some();
                count += usize::from(has(i) && has(j));
            }
        }
    }
    count
}

const RANDOM_SEEDS: u64 = 40;

#[test]
fn kernel_equals_evaluator_on_random_clusters() {
    if !kernel_ok() {
        return;
    }
    let started = Instant::now();
    let probes = random_probes();
    let mut failures = Vec::new();
    let (mut cells, mut policed_denials) = (0, 0);
    for seed in 0..RANDOM_SEEDS {
        let cluster = random_cluster(seed);
        for family in [Family::Ipv4, Family::Ipv6, Family::Primary] {
            let got = match kernel_engine::matrices(&cluster, &probes, family, TIMEOUT) {
                Ok(got) => got,
                Err(e) => {
                    failures.push(format!("seed {seed}, {family:?}: {e}"));
                    continue;
                }
            };
            assert_eq!(got.len(), probes.len());
            for (probe, got) in probes.iter().zip(&got) {
                let want = matrix::reference_matrix(&cluster, probe, family);
                assert_eq!(got.size(), cluster.pods.len());
                cells += cluster.pods.len() * cluster.pods.len();
                policed_denials += policed_denials_of(&cluster, probe, family, &want);
                failures.extend(diff(seed, family, probe, &cluster, &want, got));
            }
        }
    }
    eprintln!(
        "{RANDOM_SEEDS} random clusters × 3 families: {cells} cells ({policed_denials} denied by policy) in {:.1?}",
        started.elapsed()
    );
    // Not vacuous: a kernel that dropped nothing would fail on these.
    assert!(policed_denials > 500, "only {policed_denials} cells denied by policy");
    assert!(failures.is_empty(), "{} disagreements:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn host_network_pods_are_refused_with_a_clear_error() {
    let cluster = (0..100).map(generate::small_random).find(|c| c.pods.iter().any(|p| p.host_network)).unwrap();
    let probes = random_probes();
    match kernel_engine::matrices(&cluster, &probes, Family::Ipv4, TIMEOUT) {
        Err(e @ KernelError::Unsupported(_)) => assert!(e.to_string().contains("hostNetwork"), "{e}"),
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

#[test]
fn errors_say_how_to_fix_them() {
    let missing = KernelError::MissingTool { tool: "nft", package: "nftables" }.to_string();
    assert!(missing.contains("apt-get install -y nftables iproute2"), "{missing}");
    assert!(KernelError::NotRoot.to_string().contains("root"));
}
