//! The kernel engine against the other two (DESIGN.md §2: three engines, one truth), on
//! random clusters with hostNetwork pods in both families; hostNetwork semantics cell by
//! cell; and the real `netpol-check` binary's `verify`, its errors and `lab cleanup`.
//! (The conformance corpus runs through the CLI's kernel engine in tests/it/conformance.rs.)
//!
//! They build network namespaces, so they need root, `ip` and `nft`. Without them they skip
//! with a message, except under `CI=true`, where they fail.

use crate::common;

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use netpol::cli::generate;
use netpol::engines::Engine;
use netpol::engines::kernel::{self, KernelError};
use netpol::engines::verify;
use netpol::k8s::load::{LoadOptions, Source, load_sources};
use netpol::lab::{self, LabSpec};
use netpol::policy::bitset::BitMatrix;
use netpol::policy::matrix::{self, Family, Probe, ProbePort};
use netpol::policy::model::{Cluster, ObjectRef, Pod, PodIps, Protocol};

const TIMEOUT: Duration = LabSpec::DEFAULT_TIMEOUT;

fn random_probes() -> Vec<Probe> {
    vec![
        Probe { port: ProbePort::Number(80), protocol: Protocol::Tcp },
        Probe { port: ProbePort::Number(81), protocol: Protocol::Udp },
        Probe { port: ProbePort::Number(80), protocol: Protocol::Sctp },
        Probe { port: ProbePort::Named("web".into()), protocol: Protocol::Tcp },
    ]
}

const FAMILIES: [Family; 3] = [Family::Ipv4, Family::Ipv6, Family::Primary];

/// `small_random(seed)` (2 nodes, v4/v6/dual-stack pods, every policy feature, sometimes a
/// hostNetwork pod); on even seeds without one, its last pod becomes hostNetwork, so half
/// the clusters or more exercise them. Every 8th seed is instead a 3-node dual-stack
/// `generate::cluster`, for more nodes and more policies per pod.
fn random_cluster(seed: u64) -> Cluster {
    if seed % 8 == 7 {
        let p = generate::Params { pods: 10, namespaces: 3, policies: 6, nodes: 3, seed, dual_stack: true };
        return generate::cluster(&p);
    }
    let mut c = generate::small_random(seed);
    if seed.is_multiple_of(2)
        && !c.pods.iter().any(|p| p.host_network)
        && let Some(last) = std::sync::Arc::make_mut(&mut c.pods).last_mut()
    {
        std::sync::Arc::make_mut(last).host_network = true;
    }
    c
}

/// Every engine's matrices, `[family][engine][probe]`, engines in `verify` order.
fn three_engines(cluster: &Cluster, probes: &[Probe]) -> Result<Vec<Vec<Vec<BitMatrix>>>, KernelError> {
    let mut per_engine = Vec::new();
    for engine in Engine::ALL {
        per_engine.push(engine.matrices(cluster, probes, &FAMILIES, TIMEOUT)?);
    }
    Ok((0..FAMILIES.len()).map(|f| per_engine.iter_mut().map(|e| std::mem::take(&mut e[f])).collect()).collect())
}

/// Cells the engines deny although both ends have an address of the family, the port
/// resolves and source != destination: only the loaded ruleset can make the kernel deny
/// them. Counted overall and for cells with a hostNetwork end.
fn policed_denials(cluster: &Cluster, probe: &Probe, family: Family, allowed: &BitMatrix) -> (usize, usize) {
    let n = cluster.pods.len();
    let (mut all, mut host) = (0, 0);
    for i in 0..n {
        for j in (0..n).filter(|&j| j != i && !allowed.get(i, j)) {
            if let Some(conn) = matrix::cell_connection(cluster, probe, family, i, j) {
                let has = |k: usize| cluster.pods[k].ip_of_family(conn.ipv6).is_some();
                if has(i) && has(j) {
                    all += 1;
                    host += usize::from(cluster.pods[i].host_network || cluster.pods[j].host_network);
                }
            }
        }
    }
    (all, host)
}

/// Probed cells (both ends addressed, src != dst) with a hostNetwork end.
fn host_network_cells(cluster: &Cluster, probe: &Probe, family: Family) -> usize {
    let n = cluster.pods.len();
    let mut count = 0;
    for i in 0..n {
        for j in (0..n).filter(|&j| j != i) {
            let host = cluster.pods[i].host_network || cluster.pods[j].host_network;
            if let Some(conn) = matrix::cell_connection(cluster, probe, family, i, j) {
                let has = |k: usize| cluster.pods[k].ip_of_family(conn.ipv6).is_some();
                count += usize::from(host && has(i) && has(j));
            }
        }
    }
    count
}

/// Every engine's matrices of `cluster` (see [`three_engines`]) and how many cells were
/// compared; each disagreement (or the lab's error) goes to `failures`, named by `seed`.
fn compare_engines(
    cluster: &Cluster,
    probes: &[Probe],
    seed: u64,
    failures: &mut Vec<String>,
) -> Option<(usize, Vec<Vec<Vec<BitMatrix>>>)> {
    let engines: Vec<String> = ["evaluator", "ruleset", "kernel"].map(String::from).into();
    let results = match three_engines(cluster, probes) {
        Ok(r) => r,
        Err(e) => {
            failures.push(format!("seed {seed}: {e}"));
            return None;
        }
    };
    let report = verify::Report::new(engines, FAMILIES.to_vec(), probes.to_vec(), &results);
    for d in &report.disagreements {
        failures.push(format!("seed {seed}, {:?}: {}", d.family, report.describe(cluster, d)));
    }
    Some((report.cells, results))
}

const RANDOM_SEEDS: u64 = 40;

#[test]
fn evaluator_ruleset_and_kernel_agree_on_random_clusters_with_host_network_pods() {
    if !common::kernel_or_skip() {
        return;
    }
    let started = Instant::now();
    let probes = random_probes();
    let mut failures = Vec::new();
    let (mut cells, mut denied, mut host_cells, mut host_denied, mut clusters_with_host) = (0, 0, 0, 0, 0);
    for seed in 0..RANDOM_SEEDS {
        let cluster = random_cluster(seed);
        clusters_with_host += usize::from(cluster.pods.iter().any(|p| p.host_network));
        let Some((cells_compared, results)) = compare_engines(&cluster, &probes, seed, &mut failures) else {
            continue;
        };
        cells += cells_compared;
        for (&family, per_engine) in FAMILIES.iter().zip(&results) {
            for (probe, evaluator) in probes.iter().zip(&per_engine[0]) {
                let (all, host) = policed_denials(&cluster, probe, family, evaluator);
                denied += all;
                host_denied += host;
                host_cells += host_network_cells(&cluster, probe, family);
            }
        }
    }
    eprintln!(
        "{RANDOM_SEEDS} random clusters ({clusters_with_host} with hostNetwork pods) × 3 families × 3 engines: \
         {cells} cells, {denied} denied by policy, {host_cells} probed cells with a hostNetwork end \
         ({host_denied} denied) in {:.1?}",
        started.elapsed()
    );
    // Not vacuous: a kernel that dropped nothing, or ignored hostNetwork pods, would fail.
    assert!(clusters_with_host >= RANDOM_SEEDS as usize / 2, "{clusters_with_host} clusters with hostNetwork pods");
    assert!(denied > 500, "only {denied} cells denied by policy");
    assert!(host_cells > 300 && host_denied > 30, "{host_cells} hostNetwork cells, {host_denied} denied");
    assert!(failures.is_empty(), "{} disagreements:\n{}", failures.len(), failures.join("\n"));
}

const TIERED_SEEDS: u64 = 48;

/// The cluster-wide tiers on a real kernel: `small_random_tiered` clusters (every kind,
/// tier, action and peer kind, tied priorities, hostNetwork pods whose addresses are node
/// addresses), each engine's matrices compared cell by cell.
#[test]
fn evaluator_ruleset_and_kernel_agree_on_random_clusters_with_cluster_policies() {
    if !common::kernel_or_skip() {
        return;
    }
    let started = Instant::now();
    let probes = random_probes();
    let mut failures = Vec::new();
    let (mut cells, mut by_cluster_policy) = (0, 0);
    for seed in 0..TIERED_SEEDS {
        let cluster = generate::small_random_tiered(seed);
        let Some((cells_compared, _)) = compare_engines(&cluster, &probes, seed, &mut failures) else {
            continue;
        };
        cells += cells_compared;
        // Cells a cluster policy rule decided (Accept, Deny), by the evaluator's account.
        for probe in &probes {
            for i in 0..cluster.pods.len() {
                for j in 0..cluster.pods.len() {
                    if let Some(conn) = matrix::cell_connection(&cluster, probe, Family::Primary, i, j) {
                        let v = netpol::policy::evaluate::evaluate(&cluster, &conn);
                        by_cluster_policy += [&v.egress, &v.ingress]
                            .iter()
                            .filter(|s| matches!(s.decision, netpol::policy::evaluate::Decision::Cluster(_)))
                            .count();
                    }
                }
            }
        }
    }
    eprintln!(
        "{TIERED_SEEDS} random tiered clusters × 3 families × 3 engines: {cells} cells, {by_cluster_policy} \
         sides decided by a cluster policy rule, in {:.1?}",
        started.elapsed()
    );
    assert!(by_cluster_policy > 200, "only {by_cluster_policy} sides decided by cluster policies");
    assert!(failures.is_empty(), "{} disagreements:\n{}", failures.len(), failures.join("\n"));
}

/// Two nodes; node n1 runs two hostNetwork pods with the node's address and a pod, node n2
/// one hostNetwork pod and two pods. Every pod of `a` is ingress-isolated with no rule;
/// `a/client` may send only to 10.0.0.1/32 (n1's address).
const HOST_NETWORK_CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: a}
---
apiVersion: v1
kind: Namespace
metadata: {name: kube-system}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: a, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: c, image: x, ports: [{containerPort: 80}]}]}
status: {phase: Running, podIPs: [{ip: 10.1.1.1}, {ip: "fd00:1::1"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: remote, namespace: a, labels: {app: web}}
spec: {nodeName: n2, containers: [{name: c, image: x}]}
status: {phase: Running, podIPs: [{ip: 10.1.2.1}, {ip: "fd00:2::1"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: a, labels: {app: client}}
spec: {nodeName: n2, containers: [{name: c, image: x}]}
status: {phase: Running, podIPs: [{ip: 10.1.2.2}, {ip: "fd00:2::2"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: agent-n1, namespace: kube-system}
spec: {nodeName: n1, hostNetwork: true, containers: [{name: c, image: x}]}
status: {phase: Running, podIPs: [{ip: 10.0.0.1}, {ip: "fd00::1"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: exporter-n1, namespace: kube-system}
spec: {nodeName: n1, hostNetwork: true, containers: [{name: c, image: x}]}
status: {phase: Running, podIPs: [{ip: 10.0.0.1}, {ip: "fd00::1"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: agent-n2, namespace: kube-system}
spec: {nodeName: n2, hostNetwork: true, containers: [{name: c, image: x}]}
status: {phase: Running, podIPs: [{ip: 10.0.0.2}, {ip: "fd00::2"}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-ingress, namespace: a}
spec: {podSelector: {}, policyTypes: [Ingress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-to-n1-only, namespace: a}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress: [{to: [{ipBlock: {cidr: 10.0.0.1/32}}, {ipBlock: {cidr: "fd00::1/128"}}]}]
"#;

fn host_network_cluster() -> Cluster {
    let sources = [Source { name: "host-network.yaml".into(), text: HOST_NETWORK_CLUSTER.into() }];
    load_sources(&sources, &LoadOptions::default()).unwrap().cluster
}

#[test]
fn host_network_pods_are_their_node_on_every_engine() {
    if !common::kernel_or_skip() {
        return;
    }
    let cluster = host_network_cluster();
    let probes = [Probe { port: ProbePort::Number(80), protocol: Protocol::Tcp }];
    let at = |name: &str| cluster.pods.iter().position(|p| p.id.to_string() == name).unwrap();
    // (from, to, allowed, why)
    let expected = [
        ("kube-system/agent-n1", "a/web", true, "a node reaches its own pods (output is not policed)"),
        ("kube-system/agent-n2", "a/remote", true, "a node reaches its own pods"),
        ("kube-system/agent-n1", "a/remote", false, "another node's traffic meets the ingress policy"),
        ("kube-system/agent-n2", "a/web", false, "another node's traffic meets the ingress policy"),
        ("a/web", "kube-system/agent-n1", true, "a hostNetwork pod is never isolated"),
        ("a/remote", "kube-system/agent-n1", true, "a hostNetwork pod is never isolated"),
        ("a/client", "kube-system/agent-n1", true, "the ipBlock admits n1's address"),
        ("a/client", "kube-system/exporter-n1", true, "the same address: the same node"),
        ("a/client", "kube-system/agent-n2", false, "egress to its own node is policed (input hook)"),
        ("a/client", "a/web", false, "neither egress nor ingress admits it"),
        ("kube-system/agent-n1", "kube-system/exporter-n1", true, "the node to itself"),
        ("kube-system/agent-n1", "kube-system/agent-n2", true, "node to node is not policed"),
    ];
    let results = three_engines(&cluster, &probes).unwrap();
    let mut wrong = Vec::new();
    for (f, family) in FAMILIES.iter().enumerate() {
        for (e, engine) in ["evaluator", "ruleset", "kernel"].iter().enumerate() {
            let m = &results[f][e][0];
            for (from, to, allowed, why) in expected {
                if m.get(at(from), at(to)) != allowed {
                    wrong.push(format!("{engine} {family:?}: {from} -> {to} should be allowed={allowed} ({why})"));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn a_pod_sharing_an_address_with_another_endpoint_is_refused_with_a_clear_error() {
    let text = HOST_NETWORK_CLUSTER.replace("podIPs: [{ip: 10.0.0.2}", "podIPs: [{ip: 10.1.2.2}");
    let sources = [Source { name: "shared.yaml".into(), text }];
    // The loader refuses such input itself, naming both pods...
    let refused = load_sources(&sources, &LoadOptions::default()).unwrap_err().to_string();
    assert!(refused.contains("10.1.2.2 is also the IP of Pod a/client"), "{refused}");
    // ...and the kernel engine still refuses a cluster built another way (a library caller).
    let loaded =
        load_sources(&[Source { name: "hn.yaml".into(), text: HOST_NETWORK_CLUSTER.into() }], &LoadOptions::default())
            .unwrap()
            .cluster;
    let pods: Vec<Pod> = loaded
        .pods
        .iter()
        .map(|p| {
            let mut pod = (**p).clone();
            if pod.id == ObjectRef::new("kube-system", "agent-n2") {
                pod.ips = PodIps::try_from(vec!["10.1.2.2".parse().unwrap(), "fd00::2".parse().unwrap()]).unwrap();
            }
            pod
        })
        .collect();
    let cluster = Cluster::new(loaded.namespaces.values().cloned().collect(), pods, loaded.policies.iter().cloned());
    let probes = random_probes();
    match kernel::matrices(&cluster, &probes, Family::Ipv4, TIMEOUT) {
        Err(e @ KernelError::Unsupported(_)) => {
            assert!(e.to_string().contains("a/client and kube-system/agent-n2 sharing address 10.1.2.2"), "{e}")
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

#[test]
fn errors_say_how_to_fix_them() {
    let missing = KernelError::MissingTool { tool: "nft", package: "nftables" }.to_string();
    assert!(missing.contains("apt-get install -y nftables iproute2"), "{missing}");
    assert!(KernelError::NotRoot.to_string().contains("root"));
}

// --- the real binary ---------------------------------------------------------------------------

fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_netpol-check"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
    cmd
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

const FOUNDING: &str = "policy-examples/frontend-backend";

/// A folder of executables for PATH: `ip` and `nft` linked to the real ones if `real`
/// lists them, or shell scripts given as (name, body).
fn tool_dir(real: &[&str], scripts: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for tool in real {
        let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .chain(["/usr/sbin".into(), "/sbin".into()])
            .map(|d: PathBuf| d.join(tool))
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("no {tool} on PATH"));
        std::os::unix::fs::symlink(found, dir.path().join(tool)).unwrap();
    }
    for (name, body) in scripts {
        let path = dir.path().join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    dir
}

/// PATH with `dir` first and nothing else, or `dir` before the usual PATH.
fn path_with(dir: &Path, alone: bool) -> std::ffi::OsString {
    let mut dirs = vec![dir.to_path_buf()];
    if !alone {
        dirs.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
    }
    std::env::join_paths(dirs).unwrap()
}

/// Runs the binary as uid/gid 65534 (`nobody`). The build's binary may sit under a folder
/// that user cannot enter (a checkout in /root), so then a copy in a world-readable
/// temporary folder runs instead; the working folder is that temporary folder too.
struct Nobody {
    dir: tempfile::TempDir,
    exe: PathBuf,
}

impl Nobody {
    fn new() -> Nobody {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let original = PathBuf::from(env!("CARGO_BIN_EXE_netpol-check"));
        let reachable = original
            .ancestors()
            .skip(1)
            .all(|d| std::fs::metadata(d).is_ok_and(|m| m.permissions().mode() & 0o001 != 0));
        let exe = if reachable {
            original
        } else {
            let copy = dir.path().join("netpol-check");
            std::fs::copy(&original, &copy).unwrap();
            copy
        };
        Nobody { dir, exe }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.exe);
        cmd.current_dir(self.dir.path()).uid(65534).gid(65534);
        cmd
    }
}

/// Exit 2 and exactly one line on stderr, containing `expected`.
fn assert_one_line_error(out: &Output, expected: &str) {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stdout: {}\nstderr: {err}", text(&out.stdout));
    assert_eq!(err.lines().count(), 1, "one line, got: {err}");
    assert!(err.contains(expected), "expected {expected:?} in: {err}");
}

#[test]
fn the_binary_verifies_random_clusters_in_both_families() {
    if !common::kernel_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for seed in [0, 2, 7] {
        let cluster = random_cluster(seed);
        assert!(seed == 7 || cluster.pods.iter().any(|p| p.host_network));
        let file = dir.path().join(format!("seed-{seed}.yaml"));
        std::fs::write(&file, generate::to_yaml(&cluster)).unwrap();
        let out = bin()
            .args(["verify", "--family", "ipv4,ipv6,primary", "--port", "80,81,web", "--protocol", "TCP,UDP,SCTP"])
            .args(["-o", "json", "-f"])
            .arg(&file)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "seed {seed}: {}\n{}", text(&out.stderr), text(&out.stdout));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["engines"], serde_json::json!(["evaluator", "ruleset", "kernel"]));
        assert_eq!(v["agree"], true);
        let n = cluster.pods.len() as u64;
        assert_eq!(v["cells"], 3 * 9 * n * n, "3 families × 9 probes × pods²");
        assert!(v["deniedByAll"].as_u64().unwrap() > n, "seed {seed}: {v}");
    }
}

/// 50 pods on 3 nodes, 14 probes, both families: 70 000 cells, most of them blocked, so the
/// lab sends its probes in waves of thousands. Sending one such wave takes a large part of
/// the time-out on a loaded machine; this caught a deadline that started before the
/// sending and turned allowed cells into false "blocked"s.
#[test]
fn the_binary_verifies_a_50_pod_cluster_sent_in_large_waves() {
    if !common::kernel_or_skip() {
        return;
    }
    let params = generate::Params { pods: 50, namespaces: 4, policies: 20, nodes: 3, seed: 1, dual_stack: true };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fifty.yaml");
    std::fs::write(&file, generate::to_yaml(&generate::cluster(&params))).unwrap();
    let started = Instant::now();
    let out = bin().args(["verify", "--family", "ipv4,ipv6", "-o", "json", "-f"]).arg(&file).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    eprintln!("verify, 50 pods, 70 000 cells: {:.1?}", started.elapsed());
    assert_eq!(out.status.code(), Some(0), "{}\n{}", text(&out.stderr), text(&out.stdout));
    assert_eq!((v["agree"].as_bool(), v["cells"].as_u64()), (Some(true), Some(70_000)));
    let denied = v["deniedByAll"].as_u64().unwrap();
    assert!((10_000..65_500).contains(&denied), "{denied} denied: neither nothing nor everything");
}

#[test]
fn query_with_the_kernel_engine_sends_one_probe_and_exits_by_its_fate() {
    if !common::kernel_or_skip() {
        return;
    }
    let query = |from: &str, to: &str| {
        bin()
            .args(["query", "--engine", "kernel", "--probe-timeout", "100ms", "--port", "80", "-f", FOUNDING])
            .args(["--from", from, "--to", to])
            .output()
            .unwrap()
    };
    let allowed = query("tenant-a/nginx", "tenant-a/backend-1");
    assert_eq!(allowed.status.code(), Some(0), "{}", text(&allowed.stderr));
    assert!(text(&allowed.stdout).starts_with("ALLOWED  tenant-a/nginx -> tenant-a/backend-1 TCP/80"));
    let denied = query("tenant-a/debug", "tenant-a/backend-1");
    assert_eq!(denied.status.code(), Some(1), "{}", text(&denied.stderr));
    assert!(text(&denied.stdout).starts_with("DENIED"));
    let outside = query("192.0.2.7", "tenant-a/backend-1");
    assert_one_line_error(&outside, "does not support 192.0.2.7 as an endpoint: the lab holds only the input's pods");
}

#[test]
fn verify_reports_a_kernel_that_enforces_nothing_and_exits_one() {
    if !common::kernel_or_skip() {
        return;
    }
    // An `nft` that accepts every ruleset and loads none: the kernel then allows everything.
    let fake = tool_dir(
        &[],
        &[("nft", r#"case "$1" in --version) echo "nftables v1.0.0 (fake)";; *) cat >/dev/null;; esac"#)],
    );
    let out = bin()
        .env("PATH", path_with(fake.path(), false))
        .args(["verify", "--engines", "evaluator,kernel", "--port", "80", "-f", FOUNDING])
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("TCP/80 IPv4 tenant-a/debug -> tenant-a/backend-1: evaluator denied, kernel allowed\n"),
        "{stdout}"
    );
    let summary = stdout.lines().last().unwrap();
    assert!(summary.starts_with("verify: 6 of 25 cells") && summary.ends_with("disagree between evaluator, kernel"));
}

#[test]
fn kernel_engine_errors_are_one_actionable_line_with_exit_two() {
    if !common::kernel_or_skip() {
        return;
    }
    let matrix = ["matrix", "--engine", "kernel", "-f", FOUNDING];

    // Not root: the same binary as the `nobody` user.
    let nobody = Nobody::new();
    let out = nobody.command().args(matrix).output().unwrap();
    assert_one_line_error(&out, "the kernel engine needs root");
    assert!(text(&out.stderr).contains("--engine evaluator or ruleset"));

    // Root without the capabilities (as in an unprivileged container), when `setpriv`
    // (util-linux) is there to drop them.
    match Command::new("setpriv")
        .args(["--bounding-set=-net_admin,-sys_admin", "--inh-caps=-net_admin,-sys_admin"])
        .arg(env!("CARGO_BIN_EXE_netpol-check"))
        .args(matrix)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
    {
        Ok(out) => assert_one_line_error(&out, "lacks CAP_NET_ADMIN and CAP_SYS_ADMIN"),
        Err(e) => _ = common::skip(&format!("not checked without capabilities: setpriv: {e}")),
    }

    // No `ip`, then `ip` but no `nft`, on PATH.
    let empty = tool_dir(&[], &[]);
    let out = bin().env("PATH", path_with(empty.path(), true)).args(matrix).output().unwrap();
    assert_one_line_error(&out, "needs `ip` (iproute2), which is not installed (or not on PATH)");
    let only_ip = tool_dir(&["ip"], &[]);
    let out = bin().env("PATH", path_with(only_ip.path(), true)).args(matrix).output().unwrap();
    assert_one_line_error(&out, "needs `nft` (nftables)");
    assert!(text(&out.stderr).contains("apt-get install -y nftables iproute2"));

    // A kernel without an nftables expression: nft answers "Operation not supported".
    let unsupported = tool_dir(
        &["ip"],
        &[(
            "nft",
            r#"case "$1" in --version) echo "nftables v1.0.0 (fake)";; *) cat >/dev/null
echo "/dev/stdin:7:3-40: Error: Could not process rule: Operation not supported" >&2
echo "    ct state established,related accept" >&2
echo "    ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^" >&2; exit 1;; esac"#,
        )],
    );
    let before = lab::lab_namespaces().unwrap();
    let out = bin().env("PATH", path_with(unsupported.path(), false)).args(matrix).output().unwrap();
    assert_one_line_error(&out, "this kernel lacks a feature the kernel engine needs: nftables refused node `node-1`");
    assert!(text(&out.stderr).contains("Operation not supported"));
    // The failed run removed its lab: it has exited, so anything it left would now be a
    // leftover (a namespace whose owner is gone) that was not there before.
    let left_behind: Vec<String> = lab::leftovers().unwrap().into_iter().filter(|n| !before.contains(n)).collect();
    assert!(left_behind.is_empty(), "{left_behind:?}");
}

#[test]
fn lab_cleanup_removes_a_crashed_runs_namespaces_and_never_a_live_ones() {
    if !common::kernel_or_skip() {
        return;
    }
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let leaked = format!("{}{dead}-kclitest-n0", lab::NETNS_PREFIX);
    let live = format!("{}{}-kclitest-n0", lab::NETNS_PREFIX, std::process::id());
    for ns in [&leaked, &live] {
        let out = Command::new("ip").args(["netns", "add", ns]).output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
    }

    // Other test processes (of this suite or another checkout) may run a cleanup at the same
    // time and remove the dead one first; the live one must survive every cleanup.
    let present = |ns: &str| lab::lab_namespaces().unwrap().iter().any(|n| n == ns);

    let was_there = present(&leaked);
    let dry = bin().args(["lab", "cleanup", "--dry-run"]).output().unwrap();
    let dry_out = text(&dry.stdout);
    assert!(dry.status.success(), "{}", text(&dry.stderr));
    assert!(!was_there || dry_out.contains(&format!("would remove {leaked}\n")), "{dry_out}");
    assert!(!dry_out.contains(&live) && present(&live), "{dry_out}");
    assert!(!dry_out.lines().any(|l| l.starts_with("removed ")), "--dry-run removed something: {dry_out}");

    let not_root = Nobody::new().command().args(["lab", "cleanup"]).output().unwrap();
    if present(&leaked) {
        assert_one_line_error(&not_root, "removing network namespaces needs root");
    }

    let was_there = present(&leaked);
    let out = bin().args(["lab", "cleanup"]).output().unwrap();
    let stdout = text(&out.stdout);
    let live_survived = present(&live);
    let leaked_gone = !present(&leaked);
    let _ = Command::new("ip").args(["netns", "del", &live]).output();
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(leaked_gone, "{stdout}");
    assert!(!was_there || stdout.contains(&format!("removed {leaked}\n")), "{stdout}");
    assert!(live_survived && !stdout.contains(&live), "a live process's namespace was removed: {stdout}");
}
