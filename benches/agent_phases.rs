//! Where one agent sync spends its time, phase by phase, in-process (no apiserver, no nft):
//! the agent's own code on the cluster `benches/agent.rs` feeds the real binary.
//!
//! ```text
//!  generate::cluster ──► API objects (JSON) ──► watch stores ──snapshot──► convert ──► Cluster::new
//!                                                                                        │
//!                         render ◄── diff(applied, desired) ◄── compile(node-0) ◄────────┘
//! ```
//!
//! Each phase is run `--runs` times; the median and the minimum are printed. A partial
//! sync is measured after one pod event on node-0 (a new pod) and one elsewhere (a pod
//! relabelled on another node).
//!
//! `cargo bench --bench agent_phases -- --pods 10000 --policies 1000 --namespaces 100 --nodes 101`

use std::hint::black_box;
use std::time::{Duration, Instant};

use clap::Parser;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use netpol::agent::watch::AgentStores;
use netpol::compile::{NodeConfig, compile};
use netpol::generate::{self, Params};
use netpol::nft::diff::{diff, full_sync};

#[path = "common/objects.rs"]
mod objects;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    #[arg(long, default_value_t = 1_000)]
    policies: usize,
    #[arg(long, default_value_t = 100)]
    namespaces: usize,
    #[arg(long, default_value_t = 101)]
    nodes: usize,
    #[arg(long, default_value_t = 7)]
    runs: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Applies one API object (JSON) to the stores, as a watch event would.
fn apply_json(stores: &mut AgentStores, v: serde_json::Value) -> Result<(), serde_json::Error> {
    match v["kind"].as_str() {
        Some("Pod") => stores.apply(&serde_json::from_value::<Pod>(v)?),
        Some("Namespace") => stores.apply(&serde_json::from_value::<Namespace>(v)?),
        _ => stores.apply(&serde_json::from_value::<NetworkPolicy>(v)?),
    }
    Ok(())
}

fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, Duration, T) {
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        let out = f();
        times.push(t.elapsed());
        last = Some(black_box(out));
    }
    times.sort();
    (times[times.len() / 2], times[0], last.expect("ran at least once"))
}

fn row(name: &str, (median, min): (Duration, Duration)) {
    println!("{name:<40} median {:>9.2} ms   min {:>9.2} ms", ms(median), ms(min));
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let args = Args::parse();
    let params = Params {
        pods: args.pods,
        policies: args.policies,
        namespaces: args.namespaces,
        nodes: args.nodes,
        seed: args.seed,
        ..Params::default()
    };
    println!(
        "== {} pods, {} policies, {} namespaces, {} nodes; {} runs per phase (median, min)",
        params.pods, params.policies, params.namespaces, params.nodes, args.runs
    );
    let base = generate::cluster(&params);
    let mut objects = objects::namespaces_and_policies_json(&base);
    objects.extend(base.pods.iter().map(|p| objects::pod_json(p)));

    let (m, n, stores) = time(1, || {
        let mut stores = AgentStores::default();
        for o in &objects {
            apply_json(&mut stores, o.clone()).expect("valid object");
        }
        stores
    });
    row("watch stores: apply every object", (m, n));
    let (m, n, snapshot) = time(args.runs, || stores.snapshot());
    row("snapshot", (m, n));
    let (m, n, (cluster, _skipped)) = time(args.runs, || netpol::agent::nft_target::cluster(&snapshot));
    row("snapshot -> Cluster", (m, n));
    let config = NodeConfig { node: "node-0".into(), table: "netpol".into() };
    let (m, n, applied) = time(args.runs, || compile(&cluster, &config));
    row("compile node-0", (m, n));
    println!(
        "   ruleset: {} chains, {} rules, {} sets+maps, {} elements",
        applied.chains.len(),
        applied.rule_count(),
        applied.sets.len() + applied.maps.len(),
        applied.element_count()
    );
    // The same cluster from freshly allocated copies: what memory locality costs compile.
    let fresh = netpol::model::Cluster::new(
        cluster.namespaces.values().cloned().collect(),
        cluster.pods.iter().map(|p| (**p).clone()).collect::<Vec<_>>(),
        cluster.policies.iter().map(|p| (**p).clone()).collect::<Vec<_>>(),
    );
    let (m, n, _) = time(args.runs, || compile(&fresh, &config));
    row("compile node-0, fresh copies", (m, n));
    let (m, n, tx) = time(args.runs, || full_sync(&applied));
    row("full_sync transaction", (m, n));
    let (m, n, text) = time(args.runs, || tx.render());
    row("render full transaction", (m, n));
    println!("   full script: {} KiB", text.len() / 1024);

    // One pod event on this node, one elsewhere.
    let local = base.pods.iter().find(|p| p.node == "node-0").expect("node-0 runs pods");
    let remote = base.pods.iter().find(|p| p.node != "node-0").expect("other nodes run pods");
    let mut new_local = (**local).clone();
    new_local.id.name = format!("{}-new", local.id.name);
    new_local.ips = vec!["10.250.0.1".parse().expect("valid")];
    let mut relabelled = (**remote).clone();
    std::sync::Arc::make_mut(&mut relabelled.labels).insert("app".into(), "relabelled".into());
    for (what, pod) in [("new pod on node-0", new_local), ("remote pod relabelled", relabelled)] {
        let mut stores = stores.clone();
        apply_json(&mut stores, objects::pod_json(&pod)).expect("valid pod");
        let (m, n, snapshot) = time(args.runs, || stores.snapshot());
        row(&format!("{what}: snapshot"), (m, n));
        let (m, n, (cluster, _)) = time(args.runs, || netpol::agent::nft_target::cluster(&snapshot));
        row(&format!("{what}: snapshot -> Cluster"), (m, n));
        let (m, n, desired) = time(args.runs, || compile(&cluster, &config));
        row(&format!("{what}: compile"), (m, n));
        let (m, n, tx) = time(args.runs, || diff(&applied, &desired));
        row(&format!("{what}: diff"), (m, n));
        let (m, n, text) = time(args.runs, || tx.render());
        row(&format!("{what}: render"), (m, n));
        println!("   {} ops, {} bytes", tx.ops.len(), text.len());
    }
}
