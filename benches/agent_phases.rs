//! Where one agent sync spends its time, phase by phase, in-process (no apiserver, no nft):
//! the agent's own code on the cluster `benches/agent.rs` feeds the real binary.
//!
//! ```text
//!  generate::cluster ──► API objects (JSON text) ──decode──► watch stores ──snapshot──► convert ──► Cluster::new
//!                                                                                        │
//!                         render ◄── diff(applied, desired) ◄── compile(node-0) ◄────────┘
//! ```
//!
//! Each phase is run `--runs` times; the median and the minimum are printed. A partial
//! sync is measured after one pod event on node-0 (a new pod) and one elsewhere (a pod
//! relabelled on another node).
//!
//! Memory: a counting global allocator (this bench only) reports the live heap bytes each
//! structure holds (watch stores after the list, snapshot, Cluster, one compiled Ruleset)
//! and the peak of live bytes during one whole sync (snapshot → Cluster → compile → diff →
//! render) on top of the stores and the applied ruleset the agent keeps between syncs.
//!
//! `cargo bench --bench agent_phases -- --pods 10000 --policies 1000 --namespaces 100 --nodes 101`

use std::hint::black_box;
use std::time::{Duration, Instant};

use clap::Parser;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use netpol::agent::watch::AgentStores;
use netpol::cli::generate;
use netpol::compile::{IncrementalCompiler, NodeConfig, compile};
use netpol::k8s::convert::SlimPod;
use netpol::nft::diff::{diff, diff_with, full_sync};

#[path = "common/objects.rs"]
mod objects;

/// Live heap accounting: every allocation of this process goes through [`heap::Counting`].
mod heap {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

    static LIVE: AtomicUsize = AtomicUsize::new(0);
    static PEAK: AtomicUsize = AtomicUsize::new(0);
    static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

    /// The system allocator, counting requested bytes (not malloc's per-chunk overhead,
    /// which adds 8-16 bytes to each allocation).
    pub struct Counting;

    fn grow(bytes: usize) {
        let live = LIVE.fetch_add(bytes, Relaxed) + bytes;
        PEAK.fetch_max(live, Relaxed);
    }

    // SAFETY: every method forwards to `System` with the caller's arguments unchanged; the
    // counters are only bookkeeping and never affect the pointers handed out.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            // SAFETY: same contract as ours, forwarded.
            let p = unsafe { System.alloc(layout) };
            if !p.is_null() {
                grow(layout.size());
                ALLOCATIONS.fetch_add(1, Relaxed);
            }
            p
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: same contract as ours, forwarded.
            unsafe { System.dealloc(ptr, layout) };
            LIVE.fetch_sub(layout.size(), Relaxed);
            ALLOCATIONS.fetch_sub(1, Relaxed);
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            // SAFETY: same contract as ours, forwarded.
            let p = unsafe { System.realloc(ptr, layout, new_size) };
            if !p.is_null() {
                LIVE.fetch_sub(layout.size(), Relaxed);
                grow(new_size);
            }
            p
        }
    }

    /// (live bytes, live allocations) now.
    pub fn live() -> (usize, usize) {
        (LIVE.load(Relaxed), ALLOCATIONS.load(Relaxed))
    }

    /// Starts a new peak measurement at the current live size.
    pub fn reset_peak() {
        PEAK.store(LIVE.load(Relaxed), Relaxed);
    }

    pub fn peak() -> usize {
        PEAK.load(Relaxed)
    }
}

#[global_allocator]
static ALLOCATOR: heap::Counting = heap::Counting;

/// Live heap held by the value `build` returns: bytes and allocations that are still
/// live after it returns, minus those live before.
fn held<T>(build: impl FnOnce() -> T) -> (T, usize, usize) {
    let (bytes, allocations) = heap::live();
    let value = build();
    let (bytes_after, allocations_after) = heap::live();
    (value, bytes_after.saturating_sub(bytes), allocations_after.saturating_sub(allocations))
}

fn memory_row(what: &str, bytes: usize, allocations: usize, pods: usize) {
    println!(
        "{what:<40} {:>9.2} MiB  {:>9} allocations  {:>7.0} B/pod  {:>5.2} allocations/pod",
        bytes as f64 / (1024.0 * 1024.0),
        allocations,
        bytes as f64 / pods.max(1) as f64,
        allocations as f64 / pods.max(1) as f64,
    );
}

#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    cluster: objects::ClusterArgs,
    #[arg(long, default_value_t = 7)]
    runs: usize,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// An API object as the wire carries it: its kind and its JSON text.
type Wire = (String, Vec<u8>);

fn wire(v: &serde_json::Value) -> Wire {
    (v["kind"].as_str().unwrap_or("").to_string(), serde_json::to_vec(v).expect("JSON values serialize"))
}

/// Decodes one API object from its JSON text and applies it to the stores, as a watch
/// event would (pods decoded slim, as the agent's watch decodes them).
fn apply_wire(stores: &mut AgentStores, (kind, text): &Wire) -> Result<(), serde_json::Error> {
    match kind.as_str() {
        "Pod" => stores.apply(&serde_json::from_slice::<SlimPod>(text)?),
        "Namespace" => stores.apply(&serde_json::from_slice::<Namespace>(text)?),
        _ => stores.apply(&serde_json::from_slice::<NetworkPolicy>(text)?),
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
    let params = args.cluster.params();
    println!(
        "== {} pods, {} policies, {} namespaces, {} nodes; {} runs per phase (median, min)",
        params.pods, params.policies, params.namespaces, params.nodes, args.runs
    );
    let base = generate::cluster(&params);
    let mut objects: Vec<Wire> = objects::namespaces_and_policies_json(&base).iter().map(wire).collect();
    objects.extend(base.pods.iter().map(|p| wire(&args.cluster.pod_object(p))));
    let pod_bytes: usize = objects.iter().filter(|(k, _)| k == "Pod").map(|(_, t)| t.len()).sum();
    println!(
        "   {} pods: {} bytes of JSON per pod",
        if args.cluster.realistic_pods { "realistic" } else { "small" },
        pod_bytes / params.pods.max(1)
    );

    let pods = params.pods;
    let ((m, n, stores), bytes, allocations) = held(|| {
        time(1, || {
            let mut stores = AgentStores::default();
            for o in &objects {
                apply_wire(&mut stores, o).expect("valid object");
            }
            stores
        })
    });
    row("watch stores: decode and apply every object", (m, n));
    let store_memory = (bytes, allocations);
    // The pods' share of the stores: the same objects applied to a second store in two steps.
    let mut pods_apart = AgentStores::default();
    let (namespaces_and_policies, pods_last): (Vec<_>, Vec<_>) = objects.iter().partition(|o| o.0 != "Pod");
    namespaces_and_policies.into_iter().for_each(|o| apply_wire(&mut pods_apart, o).expect("valid object"));
    let ((), bytes, allocations) =
        held(|| pods_last.into_iter().for_each(|o| apply_wire(&mut pods_apart, o).expect("valid object")));
    let pod_store_memory = (bytes, allocations);
    drop(pods_apart);
    let ((m, n, snapshot), bytes, allocations) = held(|| time(args.runs, || stores.snapshot()));
    row("snapshot", (m, n));
    let snapshot_memory = (bytes, allocations);
    let ((m, n, (cluster, _skipped)), bytes, allocations) =
        held(|| time(args.runs, || netpol::agent::nft_target::cluster(&snapshot)));
    row("snapshot -> Cluster", (m, n));
    let cluster_memory = (bytes, allocations);
    let config = NodeConfig::new("node-0");
    let ((m, n, applied), bytes, allocations) = held(|| time(args.runs, || compile(&cluster, &config)));
    let ruleset_memory = (bytes, allocations);
    row("compile node-0", (m, n));
    println!(
        "   ruleset: {} chains, {} rules, {} sets+maps, {} elements",
        applied.chains.len(),
        applied.rule_count(),
        applied.sets.len() + applied.maps.len(),
        applied.element_count()
    );
    // The same cluster from freshly allocated copies: what memory locality costs compile.
    let fresh = netpol::policy::model::Cluster::new(
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
    new_local.ips = "10.250.0.1".parse::<std::net::IpAddr>().expect("valid").into();
    let mut relabelled = (**remote).clone();
    std::sync::Arc::make_mut(&mut relabelled.labels).insert("app".into(), "relabelled".into());
    // The agent's own path: the incremental compiler, primed with the cluster before the event.
    let base_cluster = cluster.clone();
    for (what, pod) in [("new pod on node-0", new_local), ("remote pod relabelled", relabelled)] {
        let mut stores = stores.clone();
        apply_wire(&mut stores, &wire(&args.cluster.pod_object(&pod))).expect("valid pod");
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
        // There and back (two one-pod changes) per run, so every run sees a change.
        let mut incremental = IncrementalCompiler::new(config.clone());
        // As the agent does: against the applied ruleset, whose patched sets become stand-ins.
        let mut last = incremental.compile(&base_cluster, None).ruleset;
        let compiled = incremental.compile(&cluster, Some(&mut last));
        assert_eq!(diff_with(&last, &compiled.ruleset, &compiled.set_deltas), tx, "the agent's path differs");
        last = compiled.ruleset;
        let (m, n, _) = time(args.runs, || {
            for next in [&base_cluster, &cluster] {
                let compiled = incremental.compile(next, Some(&mut last));
                black_box(diff_with(&last, &compiled.ruleset, &compiled.set_deltas));
                last = compiled.ruleset;
            }
        });
        row(&format!("{what}: incremental compile + diff (agent)"), (m / 2, n / 2));
    }

    // What the agent keeps between syncs is the stores and the applied ruleset; the rest
    // of a sync lives only while it runs.
    drop((snapshot, cluster, fresh, tx, text));
    println!("== live heap, requested bytes (malloc adds 8-16 B per allocation); {pods} pods");
    memory_row("watch stores after the list", store_memory.0, store_memory.1, pods);
    memory_row("   of which the pods", pod_store_memory.0, pod_store_memory.1, pods);
    memory_row("snapshot", snapshot_memory.0, snapshot_memory.1, pods);
    memory_row("snapshot -> Cluster", cluster_memory.0, cluster_memory.1, pods);
    memory_row("compiled Ruleset node-0", ruleset_memory.0, ruleset_memory.1, pods);
    let sync_peak = |what: &str, stores: &AgentStores, applied: Option<&netpol::nft::ir::Ruleset>| {
        let (before, _) = heap::live();
        heap::reset_peak();
        let snapshot = stores.snapshot();
        let (cluster, _) = netpol::agent::nft_target::cluster(&snapshot);
        let desired = compile(&cluster, &config);
        let tx = match applied {
            Some(applied) => diff(applied, &desired),
            None => full_sync(&desired),
        };
        black_box(tx.render());
        let peak = heap::peak() - before;
        println!(
            "{what:<40} {:>9.2} MiB  above the stores and the applied ruleset  {:>7.0} B/pod",
            peak as f64 / (1024.0 * 1024.0),
            peak as f64 / pods.max(1) as f64
        );
    };
    sync_peak("peak during the first (full) sync", &stores, None);
    let mut stores = stores;
    let mut new_pod = (**local).clone();
    new_pod.id.name = format!("{}-another", local.id.name);
    new_pod.ips = "10.250.0.2".parse::<std::net::IpAddr>().expect("valid").into();
    apply_wire(&mut stores, &wire(&args.cluster.pod_object(&new_pod))).expect("valid pod");
    sync_peak("peak during a sync after one new pod", &stores, Some(&applied));
    println!("   size_of model::Pod: {} B", std::mem::size_of::<netpol::policy::model::Pod>());
}
