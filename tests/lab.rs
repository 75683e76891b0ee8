//! Real-kernel lab tests: they build network namespaces, so they need root, `ip` and `nft`.
//! Without them they skip with a message, except under `CI=true`, where they fail.

use std::net::IpAddr;
use std::os::unix::fs::MetadataExt as _;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use netpol::lab::{self, Family, L4, Lab, LabError, LabNode, LabPod, LabSpec, Probe};

/// Labs of one test at a time, so "no namespace of this process remains" is checkable.
static SERIAL: Mutex<()> = Mutex::new(());

fn lab_env_ok() -> bool {
    let root = std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
    let has = |tool: &str, arg: &str| Command::new(tool).arg(arg).output().is_ok_and(|o| o.status.success());
    let mut missing = Vec::new();
    if !root {
        missing.push("root");
    }
    if !has("ip", "-V") {
        missing.push("`ip` (iproute2)");
    }
    if !has("nft", "--version") {
        missing.push("`nft` (nftables)");
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!("lab tests need {}", missing.join(", "));
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg} (CI=true: failing instead of skipping)");
    }
    eprintln!("SKIPPED: {msg}");
    false
}

fn ours() -> Vec<String> {
    let prefix = format!("{}{}-", lab::NETNS_PREFIX, std::process::id());
    lab::lab_namespaces().unwrap().into_iter().filter(|n| n.starts_with(&prefix)).collect()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

const SERVE: &[(u16, L4)] = &[(80, L4::Tcp), (53, L4::Udp), (9000, L4::Sctp)];

fn node(name: &str, ruleset: &str) -> LabNode {
    LabNode { name: name.into(), ruleset: ruleset.into() }
}

fn pod(name: &str, node: &str, ips: &[&str]) -> LabPod {
    LabPod {
        name: name.into(),
        node: node.into(),
        ips: ips.iter().map(|s| ip(s)).collect(),
        serve: SERVE.to_vec(),
        host_network: false,
    }
}

/// Two nodes, two pods each, dual stack.
fn four_pods() -> Vec<LabPod> {
    vec![
        pod("default/a0", "a", &["10.0.0.1", "fd00::1"]),
        pod("default/a1", "a", &["10.0.0.2", "fd00::2"]),
        pod("default/b0", "b", &["10.0.1.1", "fd00:1::1"]),
        pod("default/b1", "b", &["10.0.1.2", "fd00:1::2"]),
    ]
}

/// Every pod to every pod (itself included), every served port, both families.
fn full_matrix(pods: usize) -> Vec<Probe> {
    let mut v = Vec::new();
    for from in 0..pods {
        for to in 0..pods {
            for &(port, proto) in SERVE {
                let p = Probe::new(from, to, port, proto);
                v.push(p);
                v.push(p.v6());
            }
        }
    }
    v
}

fn describe(p: &Probe) -> String {
    format!("{p:?}")
}

#[test]
fn without_rulesets_every_served_port_is_reachable_and_unserved_ones_are_not() {
    if !lab_env_ok() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pods = four_pods();
    let mut probes = full_matrix(pods.len());
    let reachable = probes.len();
    // Controls: nothing listens on these ports, so the facts must be "no".
    for (from, to) in [(0, 1), (0, 2), (3, 3)] {
        for (port, proto) in [(81, L4::Tcp), (54, L4::Udp), (9001, L4::Sctp)] {
            probes.push(Probe::new(from, to, port, proto));
            probes.push(Probe::new(from, to, port, proto).v6());
        }
    }
    let spec = LabSpec {
        nodes: vec![node("a", ""), node("b", "")],
        pods,
        probes: probes.clone(),
        timeout: LabSpec::DEFAULT_TIMEOUT,
    };
    let t = Instant::now();
    let facts = lab::run(&spec).unwrap();
    eprintln!("run with {} probes: {:?}", probes.len(), t.elapsed());
    let wrong: Vec<String> = probes
        .iter()
        .zip(&facts)
        .enumerate()
        .filter(|(i, (_, f))| **f != (*i < reachable))
        .map(|(_, (p, f))| format!("{} -> {f}", describe(p)))
        .collect();
    assert!(wrong.is_empty(), "unexpected facts: {wrong:#?}");
    assert_eq!(ours(), Vec::<String>::new());
}

const RULESET_A: &str = r#"
table inet lab_test {
    chain forward {
        type filter hook forward priority filter; policy accept;
        ct state established,related accept
        ct state invalid drop
        ip saddr 10.0.1.1 ip daddr 10.0.0.1 tcp dport 80 drop
        ip6 saddr fd00:1::2 ip6 daddr fd00::2 tcp dport 80 drop
        ip saddr 10.0.0.2 ip daddr 10.0.0.1 meta l4proto sctp th dport 9000 drop
        ip6 saddr fd00::1 ip6 daddr fd00::2 udp dport 53 drop
    }
}
"#;

#[test]
fn a_node_ruleset_drops_exactly_the_matching_probes_across_and_within_nodes() {
    if !lab_env_ok() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let t = Instant::now();
    let lab = Lab::build(&[node("a", ""), node("b", "")], &four_pods()).unwrap();
    let built = t.elapsed();
    lab.load_ruleset("a", RULESET_A).unwrap();
    let probes = full_matrix(4);
    let t = Instant::now();
    let facts = lab.probe_all(&probes, LabSpec::DEFAULT_TIMEOUT).unwrap();
    eprintln!("build {built:?}, {} probes {:?}", probes.len(), t.elapsed());
    let blocked = [
        Probe::new(2, 0, 80, L4::Tcp),      // across nodes, ingress at a
        Probe::new(3, 1, 80, L4::Tcp).v6(), // across nodes, IPv6
        Probe::new(1, 0, 9000, L4::Sctp),   // within node a, SCTP
        Probe::new(0, 1, 53, L4::Udp).v6(), // within node a, UDP over IPv6
    ];
    let wrong: Vec<String> = probes
        .iter()
        .zip(&facts)
        .filter(|(p, f)| **f == blocked.contains(p))
        .map(|(p, f)| format!("{} -> {f}", describe(p)))
        .collect();
    assert!(wrong.is_empty(), "unexpected facts: {wrong:#?}");
    assert!(matches!(lab.load_ruleset("nope", ""), Err(LabError::UnknownNode(_))));
    lab.teardown().unwrap();
    assert_eq!(ours(), Vec::<String>::new());
}

#[test]
fn nothing_is_left_behind_after_success_error_or_a_crash() {
    if !lab_env_ok() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut spec = LabSpec {
        nodes: vec![node("a", "")],
        pods: vec![pod("x/p", "a", &["10.9.0.1"]), pod("x/q", "a", &["10.9.0.2"])],
        probes: vec![Probe::new(0, 1, 80, L4::Tcp)],
        timeout: LabSpec::DEFAULT_TIMEOUT,
    };
    assert_eq!(lab::run(&spec).unwrap(), vec![true]);
    assert_eq!(ours(), Vec::<String>::new());

    spec.nodes[0].ruleset = "table inet broken { chain c { this is not nft } }".into();
    match lab::run(&spec) {
        Err(LabError::Ruleset { node, .. }) => assert_eq!(node, "a"),
        other => panic!("expected a ruleset error, got {other:?}"),
    }
    assert_eq!(ours(), Vec::<String>::new());

    // A probe that cannot be asked (no IPv6 address) is an error, not a "false".
    spec.nodes[0].ruleset.clear();
    spec.probes = vec![Probe::new(0, 1, 80, L4::Tcp).v6()];
    assert!(matches!(lab::run(&spec), Err(LabError::Probe { index: 0, .. })));
    assert_eq!(ours(), Vec::<String>::new());

    // A panic while a lab is live: Drop tears it down during unwinding.
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(|| {
        let _lab = Lab::build(&[node("a", "")], &[pod("x/p", "a", &["10.9.0.1"])]).unwrap();
        assert!(!ours().is_empty());
        panic!("deliberate");
    });
    std::panic::set_hook(quiet);
    assert!(r.is_err());
    assert_eq!(ours(), Vec::<String>::new());

    // A crashed run: a namespace named for a process that no longer exists.
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let leaked = format!("{}{dead}-dead-p0", lab::NETNS_PREFIX);
    let out = Command::new("ip").args(["netns", "add", &leaked]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A namespace of a live process (this one) must survive the cleanup.
    let lab = Lab::build(&[node("a", "")], &[]).unwrap();
    // (Another test process may run the same cleanup concurrently and get there first.)
    lab::cleanup_leftovers().unwrap();
    let left = lab::lab_namespaces().unwrap();
    assert!(!left.contains(&leaked), "{left:?}");
    assert!(lab.namespaces().iter().all(|n| left.contains(n)));
    drop(lab);
    assert_eq!(ours(), Vec::<String>::new());
}

#[test]
fn two_labs_with_the_same_addresses_coexist() {
    if !lab_env_ok() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Lab 1 blocks a0 -> b0 TCP at node b; lab 2 has no rules. Same addresses in both.
    let block = "table inet t {
        chain f {
            type filter hook forward priority 0; policy accept;
            ct state established,related accept
            ip saddr 10.0.0.1 ip daddr 10.0.1.1 tcp dport 80 drop
        }
    }";
    let probe = Probe::new(0, 2, 80, L4::Tcp);
    let (l1, l2) = std::thread::scope(|s| {
        let h1 = s.spawn(|| Lab::build(&[node("a", ""), node("b", block)], &four_pods()));
        let h2 = s.spawn(|| Lab::build(&[node("a", ""), node("b", "")], &four_pods()));
        (h1.join().unwrap().unwrap(), h2.join().unwrap().unwrap())
    });
    assert_ne!(l1.run_id(), l2.run_id());
    assert!(l1.namespaces().iter().all(|n| !l2.namespaces().contains(n)));
    let (f1, f2) = std::thread::scope(|s| {
        let h1 = s.spawn(|| l1.probe_all(&[probe, probe.v6()], Duration::from_millis(300)));
        let h2 = s.spawn(|| l2.probe_all(&[probe, probe.v6()], Duration::from_millis(300)));
        (h1.join().unwrap().unwrap(), h2.join().unwrap().unwrap())
    });
    assert_eq!(f1, vec![false, true]);
    assert_eq!(f2, vec![true, true]);
    assert_eq!(probe.v6().family, Family::V6);
    drop(l1);
    drop(l2);
    assert_eq!(ours(), Vec::<String>::new());
}

#[test]
fn a_nine_pod_matrix_builds_and_probes_in_seconds() {
    if !lab_env_ok() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let nodes = [node("a", ""), node("b", ""), node("c", "")];
    let pods: Vec<LabPod> = (0..9)
        .map(|j| {
            let mut p = pod(
                &format!("ns/p{j}"),
                ["a", "b", "c"][j % 3],
                &[&format!("10.1.{}.{}", j % 3, j + 1), &format!("fd00:1::{:x}", j + 1)],
            );
            p.serve =
                vec![(80, L4::Tcp), (443, L4::Tcp), (53, L4::Udp), (5353, L4::Udp), (9000, L4::Sctp), (9001, L4::Sctp)];
            p
        })
        .collect();
    let mut probes = Vec::new();
    for from in 0..9 {
        for (to, target) in pods.iter().enumerate() {
            for &(port, proto) in &target.serve {
                probes.push(Probe::new(from, to, port, proto));
            }
        }
    }
    let t = Instant::now();
    let lab = Lab::build(&nodes, &pods).unwrap();
    let built = t.elapsed();
    let t = Instant::now();
    let facts = lab.probe_all(&probes, LabSpec::DEFAULT_TIMEOUT).unwrap();
    let probed = t.elapsed();
    let t = Instant::now();
    lab.teardown().unwrap();
    eprintln!("9 pods / 3 nodes: build {built:?}, {} probes {probed:?}, teardown {:?}", probes.len(), t.elapsed());
    assert!(facts.iter().all(|f| *f), "{} of {} failed", facts.iter().filter(|f| !**f).count(), facts.len());
    assert!(built < Duration::from_secs(5) && probed < Duration::from_secs(5));
}
