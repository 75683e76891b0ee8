//! Compile, diff and load costs at cluster scale, on `netpol::cli::generate` clusters (the
//! generator the CLI, the agent bench and the tests use: mixed selectors, namespace
//! selectors, ipBlocks with excepts, named ports, egress).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use netpol::cli::generate::{self, Params};
use netpol::compile::{IncrementalCompiler, NodeConfig, compile};
use netpol::nft::diff::{diff, full_sync};
use netpol::policy::model::{Cluster, Direction, Pod};

const PODS_PER_NODE: usize = 110;
const PODS_PER_NAMESPACE: usize = 20;

/// `pods` pods, 110 per node, 20 per namespace, `policies` policies.
fn cluster(pods: usize, policies: usize) -> Cluster {
    generate::cluster(&Params {
        pods,
        policies,
        namespaces: pods.div_ceil(PODS_PER_NAMESPACE),
        nodes: pods.div_ceil(PODS_PER_NODE),
        seed: 1,
        dual_stack: false,
    })
}

fn with_pods(c: &Cluster, pods: Vec<Arc<Pod>>) -> Cluster {
    Cluster::new(c.namespaces.values().cloned().collect(), pods, c.policies.iter().cloned())
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
    // A new pod on node-0 (a copy of one there, at an unused address), one deleted there,
    // one relabelled there.
    let mut added = base.pods.to_vec();
    let mut new_pod: Pod = (**added.iter().find(|p| p.node == "node-0").unwrap()).clone();
    new_pod.id.name = "bench-new-pod".into();
    new_pod.ips = IpAddr::V4(Ipv4Addr::new(10, 255, 255, 254)).into();
    added.push(new_pod.into());
    let mut deleted = base.pods.to_vec();
    let victim = deleted.iter().position(|p| p.node == "node-0").unwrap();
    deleted.remove(victim);
    // A local isolated pod no policy selects any more; a remote pod that becomes a peer.
    let mut relabelled = base.pods.to_vec();
    let k = (0..base.pods.len())
        .find(|&i| base.pods[i].node == "node-0" && !base.isolating_policies(i, Direction::Ingress).is_empty())
        .unwrap();
    Arc::make_mut(&mut relabelled[k]).labels = Default::default();
    let local_ns = &base.pods[k].id.namespace;
    let mut peer = base.pods.to_vec();
    let k = peer
        .iter()
        .position(|p| p.node != "node-0" && &p.id.namespace == local_ns && p.labels["tier"] != "web")
        .unwrap();
    Arc::make_mut(&mut Arc::make_mut(&mut peer[k]).labels).insert("tier".into(), "web".into());
    let cases =
        [("pod_add", added), ("pod_delete", deleted), ("pod_relabel_local", relabelled), ("pod_relabel_peer", peer)];
    let cases: Vec<(&str, Cluster)> = cases.into_iter().map(|(name, pods)| (name, with_pods(&base, pods))).collect();
    // The diff of two fresh compiles reads every element of both rulesets; the agent's
    // incremental compiler shares unchanged sets, which the diff skips unread.
    let mut g = c.benchmark_group("diff_one_pod_change");
    for (name, changed) in &cases {
        let b_rs = compile(changed, &config);
        let tx = diff(&a, &b_rs);
        eprintln!("{name}: {} ({} ops)", tx.stats(), tx.ops.len());
        g.bench_function(format!("{name}_fresh_compiles"), |b| {
            b.iter(|| black_box(diff(black_box(&a), black_box(&b_rs))))
        });
        let mut compiler = IncrementalCompiler::new(config.clone());
        let a_inc = compiler.compile(&base, None).ruleset;
        let b_inc = compiler.compile(changed, None).ruleset;
        assert_eq!(diff(&a_inc, &b_inc), tx, "{name}: the incremental compiler's diff differs");
        g.bench_function(format!("{name}_incremental_compiles"), |b| {
            b.iter(|| black_box(diff(black_box(&a_inc), black_box(&b_inc))))
        });
    }
    g.finish();
    // What one agent sync computes for one pod event: compile the new snapshot and diff it
    // against the last. Each iteration goes there and back (two one-pod changes).
    let mut g = c.benchmark_group("incremental_compile_and_diff_there_and_back");
    g.sample_size(30);
    for (name, changed) in &cases {
        let mut compiler = IncrementalCompiler::new(config.clone());
        let mut last = compiler.compile(&base, None).ruleset;
        g.bench_function(*name, |b| {
            b.iter(|| {
                for next in [changed, &base] {
                    let rs = compiler.compile(next, None).ruleset;
                    black_box(diff(&last, &rs));
                    last = rs;
                }
            })
        });
    }
    g.finish();
    // The same with 50 ClusterNetworkPolicies in the mix (Admin and Baseline tiers).
    // Shared between snapshots, as the agent's are.
    let tiers = base.clone().with_tiers(generate::cluster_policies(1, 50), Vec::new(), Default::default());
    let tiered = |c: &Cluster| Cluster {
        cluster_policies: Arc::clone(&tiers.cluster_policies),
        nodes: Arc::clone(&tiers.nodes),
        domains: Arc::clone(&tiers.domains),
        ..c.clone()
    };
    let tiered_base = tiered(&base);
    let rs = compile(&tiered_base, &config);
    let tier_chains: Vec<_> =
        rs.chains.iter().filter(|(n, _)| n.starts_with("adm_") || n.starts_with("base_")).collect();
    eprintln!(
        "10k pods / 1k policies / 50 cluster policies, node-0: {} chains ({} tier chains, {} rules in them), {} rules, {} sets/maps, {} elements",
        rs.chains.len(),
        tier_chains.len(),
        tier_chains.iter().map(|(_, c)| c.rules.len()).sum::<usize>(),
        rs.rule_count(),
        rs.sets.len() + rs.maps.len(),
        rs.element_count()
    );
    let mut g = c.benchmark_group("incremental_compile_and_diff_there_and_back_50_cluster_policies");
    g.sample_size(30);
    for (name, changed) in &cases {
        let changed = tiered(changed);
        let mut compiler = IncrementalCompiler::new(config.clone());
        let mut last = compiler.compile(&tiered_base, None).ruleset;
        g.bench_function(*name, |b| {
            b.iter(|| {
                for next in [&changed, &tiered_base] {
                    let rs = compiler.compile(next, None).ruleset;
                    black_box(diff(&last, &rs));
                    last = rs;
                }
            })
        });
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
        let nft = netpol::nft::backend::process::RealNftables::in_netns(ns.clone());
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
