//! Real-kernel lab tests: they build network namespaces, so they need root, `ip` and `nft`.
//! Without them they skip with a message, except under `CI=true`, where they fail.
//!
//! Its own test binary, not a module of `tests/it`, because its process must hold no lab
//! but these tests': they assert that no namespace named for this process remains (`ours`)
//! and one swaps the process-wide panic hook. `cargo test` runs a binary's tests as threads
//! of one process, where the kernel, conformance and conntrack tests' labs would show up.

#[path = "it/common/mod.rs"]
mod common;
use std::net::IpAddr;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use netpol::lab::{self, Family, L4, Lab, LabError, LabNode, LabPod, LabSpec, Probe};

/// Labs of one test at a time, so "no namespace of this process remains" is checkable.
static SERIAL: Mutex<()> = Mutex::new(());

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
    if !common::kernel_or_skip() {
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
    if !common::kernel_or_skip() {
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
    if !common::kernel_or_skip() {
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
    if !common::kernel_or_skip() {
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
    if !common::kernel_or_skip() {
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

// --- the data path under real traffic: neighbour discovery, ct invalid, the unknown-pod guard

use netpol::compile::{IncrementalCompiler, NodeConfig, compile};
use netpol::nft::Nftables as _;
use netpol::nft::backend::netlink::NetlinkNftables;
use netpol::nft::backend::process::RealNftables;
use netpol::nft::diff::{diff_with, full_sync};
use netpol::policy::model::{
    Cluster, IpBlock, Namespace, ObjectRef, Peer, Pod, Policy, PortMatch, PortSpec, Protocol, Rule,
};
use netpol::policy::selector::Selector;

/// A cluster pod of namespace `a` with these addresses.
fn cluster_pod(name: &str, node: &str, ips: &[&str], host_network: bool) -> Pod {
    let ips: Vec<IpAddr> = ips.iter().map(|s| ip(s)).collect();
    Pod {
        id: ObjectRef::new("a", name),
        labels: netpol::policy::model::Labels::from([("app".to_string(), name.to_string())]).into(),
        node: node.into(),
        ips: ips.as_slice().try_into().unwrap(),
        host_network,
        ports: Vec::new().into(),
    }
}

fn cluster(pods: Vec<Pod>, policies: Vec<Policy>) -> Cluster {
    Cluster::new(vec![Namespace { name: "a".into(), labels: Default::default() }], pods, policies)
}

/// The lab pod of a cluster pod, serving `serve`.
fn lab_pod(pod: &Pod, serve: &[(u16, L4)]) -> LabPod {
    LabPod {
        name: pod.id.to_string(),
        node: pod.node.to_string(),
        ips: pod.ips.to_vec(),
        serve: serve.to_vec(),
        host_network: pod.host_network,
    }
}

/// Allows the pods labelled `app: <app>` egress TCP `port` to anywhere (both families).
fn egress_anywhere_on(app: &str, port: u16) -> Policy {
    let anywhere =
        ["0.0.0.0/0", "::/0"].map(|c| Peer::IpBlock(IpBlock { cidr: c.parse().unwrap(), except: Vec::new() }));
    Policy {
        quarantined: None,
        id: ObjectRef::new("a", format!("{app}-egress-{port}")),
        pod_selector: Selector::new(vec![netpol::policy::selector::Requirement {
            key: "app".into(),
            operator: netpol::policy::selector::Operator::In([app.to_string()].into()),
        }]),
        ingress: None,
        egress: Some(vec![Rule {
            peers: Some(anywhere.to_vec()),
            ports: Some(vec![PortSpec { protocol: Protocol::Tcp, port: PortMatch::Range(port, port) }]),
        }]),
    }
}

#[test]
fn an_egress_isolated_ipv6_pod_reaches_its_node_on_an_allowed_port_through_real_neighbour_discovery() {
    if !common::kernel_or_skip() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // The issue's case: pod fd00:10::5 on node-1, egress TCP 8080 to ::/0 allowed, the node
    // serving 8080 on fd00:10::1 (a hostNetwork pod is the node), no static neighbours. IPv4
    // beside it: ARP is no IP packet, the ruleset never sees it.
    let client = cluster_pod("client", "node-1", &["10.10.0.5", "fd00:10::5"], false);
    let the_node = cluster_pod("node", "node-1", &["10.10.0.1", "fd00:10::1"], true);
    let c = cluster(vec![client.clone(), the_node.clone()], vec![egress_anywhere_on("client", 8080)]);
    let ruleset = netpol::nft::render::ruleset(&compile(&c, &NodeConfig::new("node-1")));
    let pods = [lab_pod(&client, &[]), lab_pod(&the_node, &[(8080, L4::Tcp), (8081, L4::Tcp)])];
    let lab = Lab::build(&[node("node-1", &ruleset)], &pods).unwrap();
    let probes = [
        Probe::new(0, 1, 8080, L4::Tcp).v6(),
        Probe::new(0, 1, 8080, L4::Tcp),
        // Control: the policy is enforced all the same.
        Probe::new(0, 1, 8081, L4::Tcp).v6(),
    ];
    let facts = lab.probe_all(&probes, Duration::from_secs(2)).unwrap();
    let neighbours = Command::new("ip")
        .args(["-n", &lab.pod_netns(0).unwrap(), "-6", "neigh", "show", "dev", lab::POD_IF])
        .output()
        .unwrap();
    let neighbours = String::from_utf8_lossy(&neighbours.stdout).into_owned();
    lab.teardown().unwrap();
    assert_eq!(facts, [true, true, false], "the pod's IPv6 neighbours: {neighbours}");
    assert!(neighbours.contains("fe80::1") && !neighbours.contains("PERMANENT"), "{neighbours}");
}

#[test]
fn a_node_without_policies_keeps_a_connection_that_conntrack_calls_invalid() {
    if !common::kernel_or_skip() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let a = cluster_pod("a", "node-1", &["10.10.0.2"], false);
    let b = cluster_pod("b", "node-1", &["10.10.0.3"], false);
    let the_node = cluster_pod("node", "node-1", &["10.10.0.1"], true);
    let c = cluster(vec![a.clone(), b.clone(), the_node.clone()], Vec::new());
    let lab =
        Lab::build(&[node("node-1", "")], &[lab_pod(&a, &[]), lab_pod(&b, &[]), lab_pod(&the_node, &[])]).unwrap();
    // A connection older than the ruleset (an SSH session when the agent starts): conntrack
    // meets it mid-stream. With `nf_conntrack_tcp_loose` 0 it tracks no such connection and
    // every one of its packets is `ct state invalid`.
    let server = lab.tcp_server(1, "10.10.0.3:7000".parse().unwrap()).unwrap();
    let mut stream = lab
        .in_pod(0, || {
            use std::io::{Read as _, Write as _};
            let mut s =
                std::net::TcpStream::connect_timeout(&"10.10.0.3:7000".parse().unwrap(), Duration::from_secs(2))?;
            s.write_all(b"x")?;
            s.read_exact(&mut [0u8; 1])?;
            Ok(s)
        })
        .unwrap();
    lab.load_ruleset("node-1", &netpol::nft::render::ruleset(&compile(&c, &NodeConfig::new("node-1")))).unwrap();
    lab.in_pod(2, || std::fs::write("/proc/sys/net/netfilter/nf_conntrack_tcp_loose", "0")).unwrap();
    std::io::Write::write_all(&mut stream, &[7u8; 1000]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while server.received() < 1_001 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let received = server.received();
    drop(stream);
    server.stop().unwrap();
    lab.teardown().unwrap();
    assert_eq!(received, 1_001, "the connection's data after the ruleset was loaded got through");
}

#[test]
fn the_unknown_pod_guard_cuts_off_a_stranger_of_the_pod_cidr_and_a_pod_once_its_deletion_is_seen() {
    if !common::kernel_or_skip() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // `a` and `b` are the cluster's pods of node-1, unisolated; `stranger` has an address
    // of node-1's pod CIDRs but is no pod of the cluster (one the agent has not heard of).
    let a = cluster_pod("a", "node-1", &["10.244.1.2", "fd00:1::2"], false);
    let b = cluster_pod("b", "node-1", &["10.244.1.3", "fd00:1::3"], false);
    let stranger = cluster_pod("stranger", "node-1", &["10.244.1.99", "fd00:1::99"], false);
    let serve = [(80, L4::Tcp), (53, L4::Udp)];
    let lab =
        Lab::build(&[node("node-1", "")], &[lab_pod(&a, &serve), lab_pod(&b, &serve), lab_pod(&stranger, &serve)])
            .unwrap();
    let config = NodeConfig {
        pod_cidrs: vec!["10.244.1.0/24".parse().unwrap(), "fd00:1::/64".parse().unwrap()],
        ..NodeConfig::new("node-1")
    };
    // As the agent: incremental compiles, applied over netlink.
    let netns = lab.node_netns("node-1").unwrap();
    let mut kernel = NetlinkNftables::open(RealNftables::in_netns(netns)).unwrap();
    let mut compiler = IncrementalCompiler::new(config);
    let mut applied = compiler.compile(&cluster(vec![a.clone(), b.clone()], Vec::new()), None).ruleset;
    kernel.apply(&full_sync(&applied)).unwrap();
    let both_ways = |x: usize, y: usize| {
        let mut v = Vec::new();
        for (from, to) in [(x, y), (y, x)] {
            for (port, proto) in serve {
                let p = Probe::new(from, to, port, proto);
                v.extend([p, p.v6()]);
            }
        }
        v
    };
    let timeout = Duration::from_millis(500);
    let probe = |probes: &[Probe]| lab.probe_all(probes, timeout).unwrap();
    let known = probe(&both_ways(0, 1));
    let with_stranger = [probe(&both_ways(0, 2)), probe(&both_ways(1, 2))].concat();
    // `b` is deleted: the compiler sees it, patches the local-pod sets, the kernel follows.
    let next = compiler.compile(&cluster(vec![a.clone()], Vec::new()), Some(&mut applied));
    let tx = diff_with(&applied, &next.ruleset, &next.set_deltas);
    kernel.apply(&tx).unwrap();
    let after_deletion = probe(&both_ways(0, 1));
    let still_a = probe(&[Probe::new(0, 0, 80, L4::Tcp), Probe::new(0, 0, 80, L4::Tcp).v6()]);
    lab.teardown().unwrap();
    assert!(known.iter().all(|&f| f), "known pods talk: {known:?}");
    assert!(with_stranger.iter().all(|&f| !f), "the stranger reaches or is reached: {with_stranger:?}");
    assert!(after_deletion.iter().all(|&f| !f), "the deleted pod kept access: {after_deletion:?}");
    assert_eq!(still_a, [true, true]);
    assert!(tx.render().contains("delete element inet netpol local_pods_v4 { 10.244.1.3 }"), "{}", tx.render());
}

/// Pods labelled `app: <target>` accept TCP 80 from pods labelled `app: <from>` only.
fn ingress_from(target: &str, from: &str) -> Policy {
    let app = |v: &str| {
        Selector::new(vec![netpol::policy::selector::Requirement {
            key: "app".into(),
            operator: netpol::policy::selector::Operator::In([v.to_string()].into()),
        }])
    };
    Policy {
        quarantined: None,
        id: ObjectRef::new("a", format!("{target}-from-{from}")),
        pod_selector: app(target),
        ingress: Some(vec![Rule {
            peers: Some(vec![Peer::Pods {
                namespaces: netpol::policy::model::NamespaceScope::PolicyNamespace,
                pods: app(from),
            }]),
            ports: Some(vec![PortSpec { protocol: Protocol::Tcp, port: PortMatch::Range(80, 80) }]),
        }]),
        egress: None,
    }
}

/// Packets the log rule of `chain` let through its limit (its own counter), from the kernel.
fn logged_packets(nft: &RealNftables, chain: &str) -> u64 {
    let out = nft.run(&["-j", "list", "chain", "inet", "netpol", chain], "").unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rules = v["nftables"].as_array().unwrap().iter().filter_map(|o| o.get("rule"));
    let log_rule = rules.into_iter().find(|r| r["expr"].as_array().unwrap().iter().any(|e| e.get("log").is_some()));
    let exprs = log_rule.expect("a log rule")["expr"].as_array().unwrap().clone();
    exprs.iter().find_map(|e| e.get("counter").and_then(|c| c["packets"].as_u64())).expect("the log rule's counter")
}

#[test]
fn real_packets_are_counted_exactly_per_rule_and_drop_and_the_drop_log_holds_its_limit_under_a_flood() {
    if !common::kernel_or_skip() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let client = cluster_pod("client", "node-1", &["10.244.1.2"], false);
    let web = cluster_pod("web", "node-1", &["10.244.1.3"], false);
    let stranger = cluster_pod("stranger", "node-1", &["10.244.1.4"], false);
    let serve = [(80, L4::Tcp), (53, L4::Udp)];
    let lab = Lab::build(
        &[node("node-1", "")],
        &[lab_pod(&client, &serve), lab_pod(&web, &serve), lab_pod(&stranger, &serve)],
    )
    .unwrap();
    // As the agent with its default flags: counters and the drop log on, over netlink.
    let netns = lab.node_netns("node-1").unwrap();
    let mut kernel = NetlinkNftables::open(RealNftables::in_netns(netns.clone())).unwrap();
    let rs = IncrementalCompiler::new(NodeConfig::new("node-1"))
        .compile(&cluster(vec![client, web, stranger], vec![ingress_from("web", "client")]), None)
        .ruleset;
    kernel.apply(&full_sync(&rs)).unwrap();
    let reader = RealNftables::in_netns(netns.clone());
    // As the agent reads them: a netlink dump, every read over the one socket kept open.
    let socket = std::sync::Mutex::new(netpol::nft::backend::netlink::CounterReader::new(
        Some(netns.clone()),
        "netpol",
        Duration::from_secs(5),
    ));
    let totals = netpol::agent::RuleCounters::new(std::sync::Arc::new(move || socket.lock().unwrap().read()));
    totals.applied(&rs.counters, true);
    // 5 allowed connections, 3 denied ones: one SYN each (a probe gives up before the
    // kernel's first retransmission, 1 s).
    let timeout = Duration::from_millis(300);
    let allowed = lab.probe_all(&[Probe::new(0, 1, 80, L4::Tcp); 5], timeout).unwrap();
    let denied = lab.probe_all(&[Probe::new(2, 1, 80, L4::Tcp); 3], timeout).unwrap();
    totals.read().unwrap();
    let by = |denied: bool| totals.totals().into_iter().filter(|(l, _)| l.denied == denied).collect::<Vec<_>>();
    let (accepts, drops) = (by(false), by(true));
    let web_chain = netpol::nft::names::pod_chain(true, "a", "web");
    let logged_before_flood = logged_packets(&reader, &web_chain);
    // A flood of denied UDP datagrams (each a new flow to conntrack: none is confirmed).
    const FLOOD: u64 = 3_000;
    let started = Instant::now();
    lab.in_pod(2, || {
        let s = std::net::UdpSocket::bind("10.244.1.4:0")?;
        // ~2 000/s for 1.5 s: long enough for the rate, not only the burst, to show.
        for i in 0..FLOOD {
            s.send_to(b"x", "10.244.1.3:53")?;
            if i % 20 == 19 {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let flood_secs = started.elapsed().as_secs_f64();
    let logged = logged_packets(&reader, &web_chain);
    totals.read().unwrap();
    // The dump reads what nft lists.
    let sorted = |mut v: Vec<netpol::nft::CounterValue>| {
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    };
    let (by_netlink, by_nft) = (sorted(kernel.counters("netpol").unwrap()), sorted(reader.counters("netpol").unwrap()));
    let drops_after = by(true);
    lab.teardown().unwrap();

    assert_eq!(allowed, [true; 5]);
    assert_eq!(denied, [false; 3]);
    assert_eq!(by_netlink, by_nft);
    assert_eq!(by_netlink.len(), rs.counters.len());
    assert_eq!(accepts.len(), 1, "{accepts:?}");
    assert_eq!((accepts[0].0.policy.as_str(), accepts[0].0.rule.as_str(), accepts[0].1), ("web-from-client", "0", 5));
    assert_eq!(drops.len(), 1, "{drops:?}");
    assert_eq!((drops[0].0.policy.as_str(), drops[0].1), ("web-from-client", 3));
    assert_eq!(logged_before_flood, 3, "every denied SYN logged while under the budget");
    // Every datagram dropped and counted; the log kept to its budget: the burst (50) plus
    // 10 per second, whatever the flood.
    assert_eq!(drops_after[0].1, 3 + FLOOD);
    let budget = 50.0 + 10.0 * flood_secs + 1.0;
    let flood_logged = (logged - logged_before_flood) as f64;
    eprintln!("flood of {FLOOD} in {flood_secs:.3} s: {flood_logged} logged (budget {budget:.1})");
    assert!(flood_logged <= budget, "{flood_logged} logged over a budget of {budget:.1}");
    assert!(flood_logged >= 50.0, "the burst and some of the rate are logged: {flood_logged}");
}

// --- staged set fills (src/nft/staging.rs) under real traffic

use netpol::nft::diff::{SetDeltas, diff};
use netpol::nft::staging;

/// `pod` relabelled `app: <app>`.
fn with_app(pod: Pod, app: &str) -> Pod {
    Pod { labels: netpol::policy::model::Labels::from([("app".to_string(), app.to_string())]).into(), ..pod }
}

#[test]
fn a_staged_fill_keeps_a_new_pod_dropped_and_an_isolated_pod_on_its_old_rules_until_the_last_step() {
    if !common::kernel_or_skip() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Node-1's pods: `a` (isolated by policy `a-from-old` first, by `a-from-new` then), `b`
    // (new in the desired cluster, isolated by `b-from-new`), and the two peers. Node-2's
    // PEERS pods are no lab pods: they only make the desired `app: new` peer set big enough
    // to be filled in chunks.
    const PEERS: usize = 3_000;
    const CHUNK: usize = 500;
    let a = cluster_pod("a", "node-1", &["10.244.1.2"], false);
    let b = cluster_pod("b", "node-1", &["10.244.1.3"], false);
    let old = cluster_pod("old", "node-1", &["10.244.1.4"], false);
    let new = cluster_pod("new", "node-1", &["10.244.1.5"], false);
    let far_peers: Vec<Pod> = (0..PEERS)
        .map(|i| {
            let address = format!("10.245.{}.{}", i / 250, i % 250 + 1);
            with_app(cluster_pod(&format!("peer-{i}"), "node-2", &[&address], false), "new")
        })
        .collect();
    let serve = [(80, L4::Tcp)];
    let lab = Lab::build(
        &[node("node-1", "")],
        &[lab_pod(&a, &serve), lab_pod(&b, &serve), lab_pod(&old, &serve), lab_pod(&new, &serve)],
    )
    .unwrap();
    let (to_a, to_b) = (0, 1);
    let (old_peer, new_peer) = (2, 3);
    let config = NodeConfig { pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()], ..NodeConfig::new("node-1") };

    let applied_cluster = cluster(
        [vec![a.clone(), old.clone(), new.clone()], far_peers.clone()].concat(),
        vec![ingress_from("a", "old")],
    );
    let desired_cluster = cluster(
        [vec![a.clone(), b.clone(), old.clone(), new.clone()], far_peers].concat(),
        vec![ingress_from("a", "new"), ingress_from("b", "new")],
    );
    // As the agent: incremental compiles, applied over netlink, the fill staged in chunks.
    let netns = lab.node_netns("node-1").unwrap();
    let mut kernel = NetlinkNftables::open(RealNftables::in_netns(netns)).unwrap();
    let mut compiler = IncrementalCompiler::new(config);
    let mut applied = compiler.compile(&applied_cluster, None).ruleset;
    kernel.apply(&full_sync(&applied)).unwrap();

    // Each pair: who reaches a and b on TCP 80, and b's own egress (to the old peer).
    let probes = [
        Probe::new(old_peer, to_a, 80, L4::Tcp),
        Probe::new(new_peer, to_a, 80, L4::Tcp),
        Probe::new(old_peer, to_b, 80, L4::Tcp),
        Probe::new(new_peer, to_b, 80, L4::Tcp),
        Probe::new(to_b, old_peer, 80, L4::Tcp),
    ];
    let timeout = Duration::from_millis(500);
    let probe = || lab.probe_all(&probes, timeout).unwrap();
    let before = probe();

    let compiled = compiler.compile(&desired_cluster, Some(&mut applied));
    let desired = compiled.ruleset;
    let guard_knows_b = |ruleset: &netpol::nft::ir::Ruleset| {
        let b = netpol::nft::ir::Element::single(netpol::nft::ir::Value::Addr(ip("10.244.1.3")));
        ruleset.sets[netpol::nft::names::LOCAL_PODS_V4].elements.contains(&b)
    };
    let first = staging::stage(&applied, &desired, &compiled.set_deltas, CHUNK)
        .expect("a fill of 3 001 elements in chunks of 500 is staged");
    let mut tx = diff_with(&applied, &first.ruleset, &compiled.set_deltas);
    // Each step: what is left to fill after it, whether the guard knows b, the probes.
    let mut steps = Vec::new();
    let mut next = Some(first);
    while let Some(step) = next {
        kernel.apply(&tx).unwrap();
        steps.push((step.remaining, guard_knows_b(&step.ruleset), probe()));
        // The next sync, as the agent's: from what the kernel holds towards the same desired.
        next = staging::stage(&step.ruleset, &desired, &SetDeltas::new(), CHUNK);
        tx = diff(&step.ruleset, next.as_ref().map_or(&desired, |next| &next.ruleset));
    }
    kernel.apply(&tx).unwrap();
    let after = probe();
    lab.teardown().unwrap();

    // The `app: new` set (the far peers and the new peer: 3 001 elements), 500 more a step;
    // the last 1 comes with the rules.
    let remaining: Vec<usize> = steps.iter().map(|s| s.0).collect();
    assert_eq!(remaining, [2_501, 2_001, 1_501, 1_001, 501, 1], "elements left after each staged step");
    //                 old→a  new→a  old→b  new→b  b→old
    let old_rules = [true, false, false, false, false];
    assert_eq!(before, old_rules, "before the fill: a admits the old peer only; b is unknown");
    for (i, (_, b_known, facts)) in steps.iter().enumerate() {
        assert_eq!(
            *facts, old_rules,
            "step {i} of the fill: a keeps its old verdicts, and b (its rules not in yet) must be \
             dropped both ways by the guard, not pass unfiltered"
        );
        assert!(!b_known, "step {i} of the fill: b is known to the guard before its rules are in");
    }
    assert_eq!(
        after,
        [false, true, false, true, true],
        "after the last step: a and b admit the new peer only, and b, known, sends"
    );
}
