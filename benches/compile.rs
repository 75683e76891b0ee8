//! Compile, diff and load costs at cluster scale.
//!
//! The cluster generator here is private and minimal: `netpol::generate` is being written in
//! main; switch to it when it lands.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use netpol::compile::{NodeConfig, compile};
use netpol::model::{
    Cluster, ContainerPort, IpBlock, Labels, Namespace, NamespaceScope, ObjectRef, Peer, Pod, Policy, PortMatch,
    PortSpec, Protocol, Rule,
};
use netpol::nft::diff::{diff, full_sync};
use netpol::selector::Selector;

const PODS_PER_NODE: usize = 110;
const PODS_PER_NAMESPACE: usize = 20;

fn labels(pairs: &[(&str, String)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

fn sel(k: &str, v: &str) -> Selector {
    Selector::from_labels([(k, v)])
}

fn v4(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000u32 + 1 + i as u32))
}

fn make_pod(i: usize, namespaces: usize, nodes: usize) -> Pod {
    let mut ips = vec![v4(i)];
    if i.is_multiple_of(10) {
        ips.push(IpAddr::V6(Ipv6Addr::from(0xfd00_0000_0000_0000_0000_0000_0000_0000u128 + 1 + i as u128)));
    }
    Pod {
        id: ObjectRef::new(format!("ns-{}", i % namespaces), format!("pod-{i}")),
        labels: labels(&[
            ("app", format!("a{}", (i / namespaces) % 20)),
            ("tier", ["fe", "be", "db"][i % 3].to_string()),
        ])
        .into(),
        node: format!("node-{}", i % nodes),
        ips,
        host_network: false,
        ports: vec![
            ContainerPort {
                name: Some("http".into()),
                port: if i.is_multiple_of(2) { 80 } else { 8080 },
                protocol: Protocol::Tcp,
            },
            ContainerPort { name: Some("metrics".into()), port: 9090, protocol: Protocol::Tcp },
        ],
    }
}

/// `pods` pods, 110 per node, 20 per namespace; `policies` policies spread over namespaces.
fn cluster(pods: usize, policies: usize) -> Cluster {
    let namespaces = pods.div_ceil(PODS_PER_NAMESPACE);
    let nodes = pods.div_ceil(PODS_PER_NODE);
    let nss = (0..namespaces)
        .map(|k| Namespace {
            name: format!("ns-{k}"),
            labels: labels(&[
                ("team", format!("t{}", k % 10)),
                ("env", if k.is_multiple_of(2) { "prod" } else { "dev" }.into()),
            ]),
        })
        .collect();
    let pod_list: Vec<Pod> = (0..pods).map(|i| make_pod(i, namespaces, nodes)).collect();
    let tcp = |p: u16| PortSpec { protocol: Protocol::Tcp, port: PortMatch::Range(p, p) };
    let pols: Vec<Policy> = (0..policies)
        .map(|j| {
            let mut ingress = vec![Rule {
                peers: Some(vec![Peer::Pods { namespaces: NamespaceScope::PolicyNamespace, pods: sel("tier", "fe") }]),
                ports: Some(vec![if j.is_multiple_of(2) {
                    tcp(80)
                } else {
                    PortSpec { protocol: Protocol::Tcp, port: PortMatch::Named("http".into()) }
                }]),
            }];
            if j.is_multiple_of(3) {
                ingress.push(Rule {
                    peers: Some(vec![Peer::Pods {
                        namespaces: NamespaceScope::Matching(sel("team", &format!("t{}", j % 10))),
                        pods: Selector::everything(),
                    }]),
                    ports: Some(vec![PortSpec { protocol: Protocol::Tcp, port: PortMatch::Named("metrics".into()) }]),
                });
            }
            if j.is_multiple_of(5) {
                ingress.push(Rule {
                    peers: Some(vec![Peer::IpBlock(IpBlock {
                        cidr: "10.200.0.0/16".parse().unwrap(),
                        except: vec!["10.200.1.0/24".parse().unwrap()],
                    })]),
                    ports: Some(vec![PortSpec { protocol: Protocol::Tcp, port: PortMatch::Range(8000, 8100) }]),
                });
            }
            let egress = j.is_multiple_of(4).then(|| {
                vec![
                    Rule {
                        peers: Some(vec![Peer::Pods {
                            namespaces: NamespaceScope::PolicyNamespace,
                            pods: sel("tier", "db"),
                        }]),
                        ports: Some(vec![tcp(5432)]),
                    },
                    Rule {
                        peers: Some(vec![Peer::IpBlock(IpBlock {
                            cidr: "0.0.0.0/0".parse().unwrap(),
                            except: vec!["10.0.0.0/8".parse().unwrap()],
                        })]),
                        ports: Some(vec![PortSpec { protocol: Protocol::Udp, port: PortMatch::Range(53, 53) }]),
                    },
                ]
            });
            Policy {
                id: ObjectRef::new(format!("ns-{}", j % namespaces), format!("pol-{j}")),
                pod_selector: sel("app", &format!("a{}", j % 20)),
                ingress: Some(ingress),
                egress,
            }
        })
        .collect();
    Cluster::new(nss, pod_list, pols)
}

fn with_pods(c: &Cluster, pods: Vec<Arc<Pod>>) -> Cluster {
    Cluster::new(c.namespaces.values().cloned().collect(), pods, c.policies.clone())
}

fn bench_compile(c: &mut Criterion) {
    let small = cluster(10_000, 1_000);
    let config = NodeConfig::new("node-0");
    let rs = compile(&small, &config);
    eprintln!(
        "10k pods / 1k policies, node-0: {} chains, {} rules, {} sets/maps, {} elements",
        rs.chains.len(),
        rs.rule_count(),
        rs.sets.len() + rs.maps.len(),
        rs.element_count()
    );
    let mut g = c.benchmark_group("compile_one_node");
    g.sample_size(20).measurement_time(Duration::from_secs(5));
    g.bench_function("10k_pods_1k_policies", |b| b.iter(|| black_box(compile(black_box(&small), &config))));
    drop(small);
    let big = cluster(100_000, 10_000);
    let rs = compile(&big, &config);
    eprintln!(
        "100k pods / 10k policies, node-0: {} chains, {} rules, {} sets/maps, {} elements",
        rs.chains.len(),
        rs.rule_count(),
        rs.sets.len() + rs.maps.len(),
        rs.element_count()
    );
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.bench_function("100k_pods_10k_policies", |b| b.iter(|| black_box(compile(black_box(&big), &config))));
    g.finish();
}

fn bench_diff(c: &mut Criterion) {
    let base = cluster(10_000, 1_000);
    let config = NodeConfig::new("node-0");
    let a = compile(&base, &config);
    let namespaces = base.namespaces.len();
    let nodes = base.nodes().len();
    // A new pod on node-0 (index ≡ 0 mod nodes), one deleted there, one relabelled there.
    let mut added = base.pods.clone();
    added.push(make_pod(10_000 * nodes, namespaces, nodes).into());
    let mut deleted = base.pods.clone();
    let victim = deleted.iter().position(|p| p.node == "node-0").unwrap();
    deleted.remove(victim);
    // A local isolated pod no policy selects any more; a remote pod that becomes a peer.
    let mut relabelled = base.pods.clone();
    let k = relabelled.iter().position(|p| p.node == "node-0").unwrap();
    Arc::make_mut(&mut Arc::make_mut(&mut relabelled[k]).labels).insert("app".into(), "none".into());
    let local_ns = &base.pods[k].id.namespace;
    let mut peer = base.pods.clone();
    let k = peer
        .iter()
        .position(|p| p.node != "node-0" && &p.id.namespace == local_ns && p.labels["tier"] != "fe")
        .unwrap();
    Arc::make_mut(&mut Arc::make_mut(&mut peer[k]).labels).insert("tier".into(), "fe".into());
    let mut g = c.benchmark_group("diff_one_pod_change");
    for (name, pods) in
        [("pod_add", added), ("pod_delete", deleted), ("pod_relabel_local", relabelled), ("pod_relabel_peer", peer)]
    {
        let b_rs = compile(&with_pods(&base, pods), &config);
        let tx = diff(&a, &b_rs);
        eprintln!("{name}: {} ({} ops)", tx.stats(), tx.ops.len());
        g.bench_function(name, |b| b.iter(|| black_box(diff(black_box(&a), black_box(&b_rs)))));
    }
    g.finish();
}

/// Loads the full-sync transaction of a 10k-pod cluster's node ruleset with the real `nft -f`,
/// once, inside a throwaway network namespace.
fn nft_load_once() {
    let ok = std::process::Command::new("nft").arg("--version").output().is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("nft load: nft not found, skipped");
        return;
    }
    let ns = format!("npl-bench-{}", std::process::id());
    if !std::process::Command::new("ip").args(["netns", "add", &ns]).status().is_ok_and(|s| s.success()) {
        eprintln!("nft load: cannot create a network namespace, skipped");
        return;
    }
    let c = cluster(10_000, 1_000);
    for node in ["node-0", "node-1"] {
        let rs = compile(&c, &NodeConfig::new(node));
        let text = full_sync(&rs).render();
        let nft = netpol::nft::real::RealNftables::in_netns(ns.clone());
        let start = Instant::now();
        let result = nft.apply_text(&text);
        let elapsed = start.elapsed();
        eprintln!(
            "nft -f (10k pods, {node}: {} bytes, {} rules, {} elements): {elapsed:?} {}",
            text.len(),
            rs.rule_count(),
            rs.element_count(),
            if result.is_ok() { "ok".to_string() } else { format!("FAILED: {result:?}") }
        );
    }
    let _ = std::process::Command::new("ip").args(["netns", "del", &ns]).status();
}

fn main() {
    nft_load_once();
    let mut c = Criterion::default().configure_from_args();
    bench_compile(&mut c);
    bench_diff(&mut c);
    c.final_summary();
}
