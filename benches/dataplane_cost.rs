//! Dataplane cost of the compiled ruleset on a real kernel: new TCP connections per second
//! and single-stream TCP throughput between two lab pods on different nodes, with
//!
//! * (a) no table loaded on either node,
//! * (b) the ruleset compiled from a big generated cluster (default 10 000 pods, 1 000
//!   policies) that contains both pods, isolates them, and allows the measured port,
//! * (c) the ruleset of a small cluster: the same two pods, 8 neighbours and only the
//!   policies that isolate the pair (the same first-packet path, tiny sets and maps),
//! * (d) our table with no policy at all: conntrack and the base chains, the pair unisolated,
//! * (e) conntrack only: a one-rule table (`ct state established,related accept`) whose only
//!   effect is that the kernel tracks connections, as on every Kubernetes node (kube-proxy),
//! * (f) (b) with the unknown-pod guard on: each node's pod CIDR holds its measured pod, so
//!   every first packet pays both of the guard's lookups in each base chain (the CIDRs'
//!   interval set, then the node's local-pod set of ~1 000 addresses),
//! * (g) (b) without the per-rule counters and the drop log (`--rule-counters=false
//!   --drop-log=false`): what they cost is (g)→(b),
//! * any number of variants (`--variant LABEL=SRC.nft,DST.nft`): hand-edited rulesets, e.g.
//!   of (b) written out with `--dump DIR`, measured like the others.
//!
//! (a)→(e) is the price of connection tracking, (e)→(d) that of our base chains, (d)→(c)
//! that of the pair's policy chains, (c)→(b) that of cluster size, (b)→(f) that of the guard. Every configuration that
//! isolates the pair must drop a connection the policies deny (checked once per lab), and
//! its destination's policy rules must have counted every measured connection.
//!
//! ```text
//!  generate::cluster ──► pick (src, dst): other nodes, both isolated, TCP port allowed
//!        │                     (evaluator)           │
//!        ▼                                           ▼
//!  compile(src node), compile(dst node)      one Lab per configuration (same pods, same
//!        │  loaded once per lab                      │ addresses), TCP server in dst
//!        └──────► rounds × (a, b, c, d, e, variants) ◄┘ clients inside src (Lab::in_pod)
//!                    conn/s, MB/s, nf_conntrack_count ──► medians, ratios to (a) and (e)
//! ```
//!
//! Run with `benches/dataplane-cost.sh` (root, `ip`, `nft`), which passes its arguments on:
//! `--rounds N --slice SECONDS --pods P --policies Q --namespaces K --nodes M --seed X
//! --configs abcdefg --dump DIR --variant LABEL=SRC.nft,DST.nft --cluster-policies N` (N
//! ClusterNetworkPolicies in the big cluster, Admin and Baseline, see
//! `generate::cluster_policies`; the pair picked is the one the most policies and cluster
//! policies govern).

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use netpol::cli::generate::{self, Params, Rng};
use netpol::compile::{NodeConfig, Observe, compile};
use netpol::engines::kernel;
use netpol::lab::traffic::{Outcome, TcpServer, tcp_connect};
use netpol::lab::{Lab, LabNode, LabPod};
use netpol::nft::backend::process::RealNftables;
use netpol::nft::ir::{MapVerdict, Ruleset, Value, Verdict};
use netpol::nft::{names, render};
use netpol::policy::evaluate::{Connection, Endpoint, evaluate};
use netpol::policy::model::{Cluster, Direction, Policy, Protocol};
use socket2::{Domain, Socket, Type};

struct Args {
    rounds: usize,
    slice: f64,
    params: Params,
    /// Which built-in configurations to run, by letter (`abcde`).
    configs: String,
    /// Write the (b) rulesets of both nodes as nft text into this directory and stop.
    dump: Option<std::path::PathBuf>,
    variants: Vec<Variant>,
    /// ClusterNetworkPolicies added to the big cluster (`generate::cluster_policies`).
    cluster_policies: usize,
}

/// A hand-edited ruleset pair, measured as one more configuration.
struct Variant {
    label: String,
    src: std::path::PathBuf,
    dst: std::path::PathBuf,
}

fn parse_variant(value: &str) -> Result<Variant, String> {
    let bad = || format!("--variant {value}: expected LABEL=SRC.nft,DST.nft");
    let (label, files) = value.split_once('=').ok_or_else(bad)?;
    let (src, dst) = files.split_once(',').ok_or_else(bad)?;
    if label.is_empty() || src.is_empty() || dst.is_empty() {
        return Err(bad());
    }
    Ok(Variant { label: label.to_string(), src: src.into(), dst: dst.into() })
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        rounds: 15,
        slice: 0.5,
        params: Params { pods: 10_000, namespaces: 50, policies: 1_000, nodes: 10, seed: 1, dual_stack: false },
        configs: "abcdef".to_string(),
        dump: None,
        variants: Vec::new(),
        cluster_policies: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        // `cargo bench` passes `--bench`; ignore it.
        if flag == "--bench" {
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || value.parse::<usize>().map_err(|e| format!("{flag} {value}: {e}"));
        match flag.as_str() {
            "--rounds" => args.rounds = number()?.max(1),
            "--slice" => args.slice = value.parse().map_err(|e| format!("{flag} {value}: {e}"))?,
            "--pods" => args.params.pods = number()?,
            "--policies" => args.params.policies = number()?,
            "--namespaces" => args.params.namespaces = number()?,
            "--nodes" => args.params.nodes = number()?.max(2),
            "--seed" => args.params.seed = number()? as u64,
            "--configs" => {
                if value.is_empty() || !value.chars().all(|c| "abcdefg".contains(c)) {
                    return Err(format!("{flag} {value}: letters among abcdefg"));
                }
                args.configs = value;
            }
            "--dump" => args.dump = Some(value.into()),
            "--cluster-policies" => args.cluster_policies = number()?,
            "--variant" => args.variants.push(parse_variant(&value)?),
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    Ok(args)
}

/// The measured pair: indices into the big cluster and the allowed TCP port.
struct Pair {
    src: usize,
    dst: usize,
    port: u16,
}

fn tcp(src: usize, dst: usize, port: u16) -> Connection {
    Connection { src: Endpoint::Pod(src), dst: Endpoint::Pod(dst), protocol: Protocol::Tcp, port, ipv6: false }
}

/// Among random pairs on different nodes where the source is egress-isolated, the
/// destination ingress-isolated and a TCP port of the destination is allowed, the one whose
/// sides are selected by the most policies (the longest first-packet path).
fn pick_pair(cluster: &Cluster, seed: u64) -> Option<Pair> {
    let n = cluster.pods.len();
    let egress: Vec<usize> = (0..n).filter(|&i| !cluster.isolating_policies(i, Direction::Egress).is_empty()).collect();
    let ingress: Vec<usize> =
        (0..n).filter(|&i| !cluster.isolating_policies(i, Direction::Ingress).is_empty()).collect();
    if egress.is_empty() || ingress.is_empty() {
        return None;
    }
    let mut rng = Rng::new(seed ^ 0xdada);
    let mut best: Option<(usize, Pair)> = None;
    let mut found = 0;
    for _ in 0..200_000 {
        let (src, dst) = (*rng.pick(&egress), *rng.pick(&ingress));
        if cluster.pods[src].node == cluster.pods[dst].node {
            continue;
        }
        let ports = cluster.pods[dst].ports.iter().filter(|p| p.protocol == Protocol::Tcp).map(|p| p.port);
        for port in ports {
            if evaluate(cluster, &tcp(src, dst, port)).allowed {
                let weight = cluster.isolating_policies(src, Direction::Egress).len()
                    + cluster.isolating_policies(dst, Direction::Ingress).len()
                    + governing(cluster, src, Direction::Egress).len()
                    + governing(cluster, dst, Direction::Ingress).len();
                if best.as_ref().is_none_or(|(w, _)| weight > *w) {
                    best = Some((weight, Pair { src, dst, port }));
                }
                found += 1;
                break;
            }
        }
        if found >= 500 {
            break;
        }
    }
    best.map(|(_, p)| p)
}

/// The cluster policies that govern pod `i` in direction `d`.
fn governing(cluster: &Cluster, i: usize, d: Direction) -> Vec<usize> {
    let pod = &cluster.pods[i];
    let labels = cluster.namespace_labels(&pod.id.namespace);
    (0..cluster.cluster_policies.len()).filter(|&k| cluster.cluster_policies[k].governs(pod, labels, d)).collect()
}

/// The same pair in a small cluster: it, 8 neighbours from the destination's namespace, and
/// only the policies that isolate or govern the pair. Returns the cluster and the pair's new
/// indices.
fn small_cluster(big: &Cluster, pair: &Pair) -> (Cluster, usize, usize) {
    let mut keep = vec![pair.src, pair.dst];
    let ns = &big.pods[pair.dst].id.namespace;
    let neighbours: Vec<usize> =
        (0..big.pods.len()).filter(|&i| &big.pods[i].id.namespace == ns && !keep.contains(&i)).take(8).collect();
    keep.extend(neighbours);
    let mut policies: Vec<usize> = big.isolating_policies(pair.src, Direction::Egress);
    policies.extend(big.isolating_policies(pair.dst, Direction::Ingress));
    policies.sort_unstable();
    policies.dedup();
    let mut tiers = governing(big, pair.src, Direction::Egress);
    tiers.extend(governing(big, pair.dst, Direction::Ingress));
    tiers.sort_unstable();
    tiers.dedup();
    let small = Cluster::new(
        big.namespaces.values().cloned().collect(),
        keep.iter().map(|&i| big.pods[i].clone()),
        policies.iter().map(|&i| big.policies[i].clone()),
    )
    .with_tiers(
        tiers.iter().map(|&k| big.cluster_policies[k].clone()),
        (*big.nodes).clone(),
        (*big.domains).clone(),
    );
    let index = |i: usize| small.pod_index(&big.pods[i].id).expect("kept");
    let (src, dst) = (index(pair.src), index(pair.dst));
    (small, src, dst)
}

/// The chains a new packet of the pair walks in `rs` (the pod chain the dispatch map sends
/// it to, then the policy chains it jumps to) and the rules they hold.
fn first_packet_path(rs: &Ruleset, map: &str, ip: IpAddr) -> (Vec<String>, usize) {
    let Some(MapVerdict::Jump(pod_chain)) =
        rs.maps.get(map).and_then(|m| m.elements.iter().find(|(k, _)| k.values() == [Value::Addr(ip)]).map(|(_, v)| v))
    else {
        return (Vec::new(), 0);
    };
    let mut chains = vec![pod_chain.clone()];
    for rule in &rs.chains[pod_chain].rules {
        if let Some(Verdict::Jump(c)) = &rule.verdict {
            chains.push(c.clone());
        }
    }
    let rules = chains.iter().map(|c| rs.chains[c].rules.len()).sum();
    (chains, rules)
}

/// Sum of the counters `chains` count into on a node (anonymous `counter packets N`, and
/// each named `counter name "c"` once): how many first packets the ruleset's policy rules
/// classified.
fn counted_packets(nft: &RealNftables, chains: &[String]) -> Result<u64, String> {
    use netpol::nft::Nftables as _;
    let mut total = 0;
    let mut named = std::collections::BTreeSet::new();
    for chain in chains {
        let text = nft
            .run(&["list", "chain", "inet", names::DEFAULT_TABLE, chain], "")
            .map_err(|e| format!("listing chain {chain}: {e}"))?;
        for word in text.split("counter packets ").skip(1) {
            total += word.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
        }
        for word in text.split("counter name \"").skip(1) {
            named.extend(word.split('"').next().map(str::to_string));
        }
    }
    if !named.is_empty() {
        let values = nft.counters(names::DEFAULT_TABLE).map_err(|e| format!("reading the counters: {e}"))?;
        total += values.iter().filter(|v| named.contains(&v.name)).map(|v| v.packets).sum::<u64>();
    }
    Ok(total)
}

/// One configuration under test: a lab of its own (the same two pods, the same addresses:
/// labs are separate namespaces) with its rulesets loaded once, and a server in the
/// destination pod. Separate labs let the measurement hop between configurations every
/// slice instead of reloading rulesets, so other load on the machine hits all alike.
struct Setup {
    label: String,
    lab: Lab,
    /// Both nodes' namespaces, for their conntrack counts.
    node_netns: [String; 2],
    /// Per round, after its connection slices: nf_conntrack_count of (src node, dst node).
    conntrack: Vec<[u64; 2]>,
    server: TcpServer,
    /// The destination node's nft and the policy chains whose counters see every first
    /// packet of the pair (empty when the pair is not isolated in this configuration).
    dst_nft: RealNftables,
    counted_chains: Vec<String>,
    rates: Vec<f64>,
    streams: Vec<f64>,
}

/// Lab pods 0 (source) and 1 (destination).
const SRC: usize = 0;
const DST: usize = 1;

/// New connections for `seconds` from inside the source pod: connect, send 1 byte, read the
/// echo, close with a reset (no TIME_WAIT, so ports never run out). Connections per second.
fn connection_slice(lab: &Lab, from: IpAddr, to: SocketAddr, seconds: f64) -> Result<f64, String> {
    let (count, elapsed) = lab
        .in_pod(SRC, || {
            let started = Instant::now();
            let deadline = started + Duration::from_secs_f64(seconds);
            let mut count = 0u64;
            let mut byte = [7u8; 1];
            while Instant::now() < deadline {
                let sock = Socket::new(Domain::IPV4, Type::STREAM, None)?;
                sock.bind(&SocketAddr::new(from, 0).into())?;
                sock.connect_timeout(&to.into(), Duration::from_secs(3))?;
                sock.set_linger(Some(Duration::ZERO))?;
                sock.set_tcp_nodelay(true)?;
                let mut stream: TcpStream = sock.into();
                stream.write_all(&byte)?;
                stream.read_exact(&mut byte)?;
                count += 1;
            }
            Ok((count, started.elapsed()))
        })
        .map_err(|e| format!("connection rate: {e}"))?;
    Ok(count as f64 / elapsed.as_secs_f64())
}

/// One TCP stream for `seconds` from inside the source pod: MB/s (10^6 bytes) the
/// destination's server read.
fn stream_slice(setup: &Setup, from: IpAddr, to: SocketAddr, seconds: f64) -> Result<f64, String> {
    let before = setup.server.received();
    let elapsed = setup
        .lab
        .in_pod(SRC, || {
            let sock = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            sock.bind(&SocketAddr::new(from, 0).into())?;
            sock.connect_timeout(&to.into(), Duration::from_secs(3))?;
            let mut stream: TcpStream = sock.into();
            let mut byte = [7u8; 1];
            stream.write_all(&byte)?;
            stream.read_exact(&mut byte)?;
            let chunk = vec![0x5au8; 128 * 1024];
            let started = Instant::now();
            let deadline = started + Duration::from_secs_f64(seconds);
            while Instant::now() < deadline {
                stream.write_all(&chunk)?;
            }
            stream.shutdown(Shutdown::Write)?;
            // The server closes once it has read everything.
            let _ = stream.read(&mut byte);
            Ok(started.elapsed())
        })
        .map_err(|e| format!("throughput: {e}"))?;
    let bytes = setup.server.received() - before - 1;
    Ok(bytes as f64 / 1e6 / elapsed.as_secs_f64())
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median over rounds of `ours[i] / base[i]`: each round's configurations ran back to back,
/// so the paired ratio cancels drift in the machine's load.
fn paired_ratio(ours: &[f64], base: &[f64]) -> f64 {
    let ratios: Vec<f64> = ours.iter().zip(base).map(|(o, b)| o / b).collect();
    median(&ratios)
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    kernel::check_prerequisites().map_err(|e| e.to_string())?;
    let p = &args.params;
    let t = Instant::now();
    let mut big = generate::cluster(p);
    if args.cluster_policies > 0 {
        let tiers = generate::cluster_policies(p.seed, args.cluster_policies);
        big = big.with_tiers(tiers, Vec::new(), Default::default());
    }
    let pair = pick_pair(&big, p.seed).ok_or("no isolated, allowed TCP pair across nodes in this cluster")?;
    let (small, small_src, small_dst) = small_cluster(&big, &pair);
    for (name, c, s, d) in [("big", &big, pair.src, pair.dst), ("small", &small, small_src, small_dst)] {
        if !evaluate(c, &tcp(s, d, pair.port)).allowed {
            return Err(format!("the pair is not allowed in the {name} cluster"));
        }
    }
    let (src_pod, dst_pod) = (&big.pods[pair.src], &big.pods[pair.dst]);
    let bare = Cluster::new(
        big.namespaces.values().cloned().collect(),
        vec![src_pod.clone(), dst_pod.clone()],
        Vec::<Policy>::new(),
    );
    let nodes = [src_pod.node.to_string(), dst_pod.node.to_string()];
    let compile_for = |c: &Cluster| -> Vec<Ruleset> { nodes.iter().map(|n| compile(c, &NodeConfig::new(n))).collect() };
    let (src_ip, dst_ip) = (src_pod.ips[0], dst_pod.ips[0]);
    let to = SocketAddr::new(dst_ip, pair.port);
    println!(
        "cluster: {} pods, {} policies, {} namespaces, {} nodes (seed {}); pair {} ({src_ip}, {}) -> {} ({dst_ip}, {}) TCP {}",
        p.pods, p.policies, p.namespaces, p.nodes, p.seed, src_pod.id, nodes[0], dst_pod.id, nodes[1], pair.port
    );

    let big_rulesets = compile_for(&big);
    if let Some(dir) = &args.dump {
        std::fs::create_dir_all(dir).map_err(|e| format!("--dump {}: {e}", dir.display()))?;
        for (rs, file) in big_rulesets.iter().zip(["src.nft", "dst.nft"]) {
            let path = dir.join(file);
            std::fs::write(&path, render::ruleset(rs)).map_err(|e| format!("writing {}: {e}", path.display()))?;
            println!("wrote {}", path.display());
        }
        return Ok(());
    }
    let (eg, eg_rules) = first_packet_path(&big_rulesets[0], names::EGRESS_DISPATCH_V4, src_ip);
    let (ing, in_rules) = first_packet_path(&big_rulesets[1], names::INGRESS_DISPATCH_V4, dst_ip);
    let big_size = |rs: &[Ruleset]| {
        format!(
            "{} + {} rules, {} + {} set/map elements; first packet: {} chains/{eg_rules} rules at src, \
             {} chains/{in_rules} rules at dst",
            rs[0].rule_count(),
            rs[1].rule_count(),
            rs[0].element_count(),
            rs[1].element_count(),
            eg.len(),
            ing.len()
        )
    };
    // The pod chain ends in a counted drop; its policy chains' accepts count the pair.
    let big_counted: Vec<String> = ing.iter().skip(1).cloned().collect();

    let mut configs: Vec<Config> = Vec::new();
    let render_both = |rs: &[Ruleset]| rs.iter().map(render::ruleset).collect::<Vec<_>>();
    for letter in "abcdefg".chars().filter(|c| args.configs.contains(*c)) {
        configs.push(match letter {
            'a' => Config::new("(a) no table", "no table".into(), None, Vec::new()),
            'b' => Config::new(
                "(b) big ruleset",
                big_size(&big_rulesets),
                Some(render_both(&big_rulesets)),
                big_counted.clone(),
            ),
            'c' => {
                let rs = compile_for(&small);
                let (ing, _) = first_packet_path(&rs[1], names::INGRESS_DISPATCH_V4, dst_ip);
                let size = format!(
                    "{} + {} rules, {} + {} set/map elements",
                    rs[0].rule_count(),
                    rs[1].rule_count(),
                    rs[0].element_count(),
                    rs[1].element_count()
                );
                Config::new("(c) small ruleset", size, Some(render_both(&rs)), ing.into_iter().skip(1).collect())
            }
            'd' => {
                let rs = compile_for(&bare);
                let size = format!("{} + {} rules, no policy", rs[0].rule_count(), rs[1].rule_count());
                Config::new("(d) table, no policy", size, Some(render_both(&rs)), Vec::new())
            }
            'f' => {
                // Each node's pod CIDR: its measured pod's address (a /32), so the pair's first
                // packets are inside the CIDRs and known: both lookups, then dispatch as in (b).
                let guarded = |node: &str, ip: IpAddr| NodeConfig {
                    pod_cidrs: vec![ipnet::IpNet::from(ip)],
                    ..NodeConfig::new(node)
                };
                let rs = vec![compile(&big, &guarded(&nodes[0], src_ip)), compile(&big, &guarded(&nodes[1], dst_ip))];
                Config::new("(f) big ruleset, guard on", big_size(&rs), Some(render_both(&rs)), big_counted.clone())
            }
            'g' => {
                let off = |node: &str| NodeConfig { observe: Observe::OFF, ..NodeConfig::new(node) };
                let rs: Vec<Ruleset> = nodes.iter().map(|n| compile(&big, &off(n))).collect();
                // Nothing counts: the proof that the ruleset saw the connections is (b)'s.
                let label = "(g) big ruleset, counters and drop log off";
                Config { isolates: true, ..Config::new(label, big_size(&rs), Some(render_both(&rs)), Vec::new()) }
            }
            _ => Config::new(
                "(e) conntrack only",
                "one rule: ct state established,related accept".into(),
                Some(vec![CONNTRACK_ONLY.to_string(), CONNTRACK_ONLY.to_string()]),
                Vec::new(),
            ),
        });
    }
    for v in &args.variants {
        let read = |path: &std::path::Path| {
            std::fs::read_to_string(path).map_err(|e| format!("--variant {}: {}: {e}", v.label, path.display()))
        };
        let text = vec![read(&v.src)?, read(&v.dst)?];
        let size = format!("{} + {}", v.src.display(), v.dst.display());
        // A variant of (b) keeps (b)'s policy chains, whose counters must see every connection.
        configs.push(Config::new(&v.label, size, Some(text), big_counted.clone()));
    }
    // A port the policies deny between the pair in both clusters: configurations that
    // isolate the pair must drop it, the others let it reach the destination (a reset).
    let denied_port = (1..=u16::MAX)
        .map(|k| pair.port.wrapping_add(k))
        .find(|&p| {
            p != 0
                && !evaluate(&big, &tcp(pair.src, pair.dst, p)).allowed
                && !evaluate(&small, &tcp(small_src, small_dst, p)).allowed
        })
        .ok_or("no TCP port is denied between the pair")?;

    let lab_pods: Vec<LabPod> = [src_pod, dst_pod]
        .iter()
        .map(|p| LabPod {
            name: p.id.to_string(),
            node: p.node.to_string(),
            ips: vec![p.ips[0]],
            serve: Vec::new(),
            host_network: false,
        })
        .collect();
    let mut setups = Vec::new();
    for config in configs {
        let label = config.label;
        println!("{label:21} {}", config.size);
        let lab_nodes: Vec<LabNode> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| LabNode {
                name: n.clone(),
                ruleset: config.rulesets.as_ref().map(|rs| rs[i].clone()).unwrap_or_default(),
            })
            .collect();
        let t = Instant::now();
        let lab = Lab::build(&lab_nodes, &lab_pods).map_err(|e| format!("{label}: {e}"))?;
        eprintln!("{label}: lab built and rulesets loaded in {:.2?}", t.elapsed());
        let denied = SocketAddr::new(dst_ip, denied_port);
        let outcome = lab
            .in_pod(SRC, || tcp_connect(SocketAddr::new(src_ip, 0), denied, Duration::from_millis(500)))
            .map_err(|e| format!("{label}: denied probe: {e}"))?;
        let isolates = config.isolates;
        println!("{label:21} denied port {denied_port}: {outcome}");
        if isolates && outcome != Outcome::Silent {
            return Err(format!("{label}: a connection the policies deny to port {denied_port} was not dropped"));
        }
        if !isolates && outcome == Outcome::Silent {
            return Err(format!("{label}: a connection to the unisolated pair's port {denied_port} was dropped"));
        }
        let server = lab.tcp_server(DST, to).map_err(|e| format!("{label}: server: {e}"))?;
        let node_netns = [0, 1].map(|i| lab.node_netns(&nodes[i]).expect("lab node"));
        let dst_nft = RealNftables::in_netns(node_netns[1].clone());
        setups.push(Setup {
            label,
            lab,
            node_netns,
            conntrack: Vec::new(),
            server,
            dst_nft,
            counted_chains: config.counted_chains,
            rates: Vec::new(),
            streams: Vec::new(),
        });
    }
    eprintln!("prepared in {:.1?}", t.elapsed());

    let n = setups.len();
    for round in 0..args.rounds {
        // Rotate the order so each configuration runs first, second, ... equally often.
        for k in 0..n {
            let s = &mut setups[(round + k) % n];
            let rate = connection_slice(&s.lab, src_ip, to, args.slice)?;
            s.rates.push(rate);
        }
        for s in &mut setups {
            let counts = [conntrack_count(&s.node_netns[0])?, conntrack_count(&s.node_netns[1])?];
            s.conntrack.push(counts);
        }
        for k in 0..n {
            let s = &setups[(round + k) % n];
            let mbps = stream_slice(s, src_ip, to, args.slice)?;
            setups[(round + k) % n].streams.push(mbps);
        }
        let line: Vec<String> =
            setups.iter().map(|s| format!("{:.0} conn/s {:.0} MB/s", s.rates[round], s.streams[round])).collect();
        eprintln!("round {:2}: {}", round + 1, line.join(" | "));
    }
    // Proof that the rulesets were in the path: the destination's policy rules counted
    // every connection's first packet (a SYN reusing a 5-tuple whose conntrack entry is
    // still alive may pass as part of the old flow, hence the 1% slack).
    for s in &setups {
        if s.counted_chains.is_empty() {
            continue;
        }
        let counted = counted_packets(&s.dst_nft, &s.counted_chains)?;
        let served = s.server.connections();
        println!(
            "{}: the destination's policy rules accepted {counted} first packets of {served} connections",
            s.label
        );
        if (counted as f64) < 0.99 * served as f64 {
            return Err(format!("{}: the ruleset saw too few connections", s.label));
        }
    }
    print_table(&setups, &args);
    for s in setups.drain(..) {
        s.server.stop().map_err(|e| format!("{}: server: {e}", s.label))?;
        s.lab.teardown().map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Loaded on both nodes for (e): any `ct` expression makes the kernel track every
/// connection through the namespace; this rule also accepts what it would accept anyway.
const CONNTRACK_ONLY: &str = "table inet conntrack_only {
\tchain forward {
\t\ttype filter hook forward priority 0; policy accept;
\t\tct state established,related accept
\t}
}
";

/// A configuration before its lab exists.
struct Config {
    label: String,
    /// What is loaded, for the header.
    size: String,
    /// nft text per node (source, destination); `None` loads nothing.
    rulesets: Option<Vec<String>>,
    /// The destination's policy chains on the pair's first-packet path, whose counters must
    /// see every connection (empty: nothing to count).
    counted_chains: Vec<String>,
    /// The pair is isolated: a port the policies deny must be dropped.
    isolates: bool,
}

impl Config {
    fn new(label: &str, size: String, rulesets: Option<Vec<String>>, counted_chains: Vec<String>) -> Config {
        let isolates = !counted_chains.is_empty();
        Config { label: label.to_string(), size, rulesets, counted_chains, isolates }
    }
}

/// Connections the kernel tracks in namespace `netns` (`nf_conntrack_count` is per netns).
fn conntrack_count(netns: &str) -> Result<u64, String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", netns, "cat", "/proc/sys/net/netfilter/nf_conntrack_count"])
        .output()
        .map_err(|e| format!("reading nf_conntrack_count in {netns}: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // Without conntrack loaded in the namespace the file may be missing: nothing tracked.
    Ok(if out.status.success() { text.trim().parse().unwrap_or(0) } else { 0 })
}

fn print_table(setups: &[Setup], args: &Args) {
    let find = |prefix: &str| setups.iter().find(|s| s.label.starts_with(prefix));
    let (a, e) = (find("(a)"), find("(e)"));
    let ratio = |x: f64, base: Option<f64>| base.map_or("-".to_string(), |b| format!("{:.3}", x / b));
    let paired =
        |ours: &[f64], base: Option<&[f64]>| base.map_or("-".to_string(), |b| format!("{:.3}", paired_ratio(ours, b)));
    println!();
    println!(
        "{:<21} | {:>7} | {:>7} | {:>6} {:>6} | {:>6} {:>6} | {:>6} | {:>6} {:>6} | {:>6} {:>6} | {:>15}",
        "configuration",
        "conn/s",
        "µs/conn",
        "/(a)",
        "paired",
        "/(e)",
        "paired",
        "MB/s",
        "/(a)",
        "paired",
        "/(e)",
        "paired",
        "conntrack max"
    );
    println!("{}", "-".repeat(131));
    for s in setups {
        let (rate, stream) = (median(&s.rates), median(&s.streams));
        let ct_max = [0, 1].map(|i| s.conntrack.iter().map(|c| c[i]).max().unwrap_or(0));
        println!(
            "{:<21} | {rate:>7.0} | {:>7.1} | {:>6} {:>6} | {:>6} {:>6} | {stream:>6.0} | {:>6} {:>6} | {:>6} {:>6} | {:>15}",
            s.label,
            1e6 / rate,
            ratio(rate, a.map(|a| median(&a.rates))),
            paired(&s.rates, a.map(|a| a.rates.as_slice())),
            ratio(rate, e.map(|e| median(&e.rates))),
            paired(&s.rates, e.map(|e| e.rates.as_slice())),
            ratio(stream, a.map(|a| median(&a.streams))),
            paired(&s.streams, a.map(|a| a.streams.as_slice())),
            ratio(stream, e.map(|e| median(&e.streams))),
            paired(&s.streams, e.map(|e| e.streams.as_slice())),
            format!("{} / {}", ct_max[0], ct_max[1]),
        );
    }
    println!(
        "medians of {} slices of {:.2} s per configuration and metric, configurations interleaved, \
         \"paired\" = median of per-round ratios; conntrack max = most nf_conntrack_count entries \
         (source node / destination node) seen after a round's connection slices",
        args.rounds, args.slice
    );
    if let (Some(b), Some(c), Some(d)) = (find("(b)"), find("(c)"), find("(d)")) {
        println!(
            "size independence, conn/s paired: (b)/(c) = {:.3}, (b)/(d) = {:.3}, (c)/(d) = {:.3}",
            paired_ratio(&b.rates, &c.rates),
            paired_ratio(&b.rates, &d.rates),
            paired_ratio(&c.rates, &d.rates),
        );
    }
}

fn main() -> ExitCode {
    // The library installs no signal handler; a signal does not unwind, so without this a
    // Ctrl-C would leave the lab's namespaces behind.
    if let Err(e) = ctrlc::set_handler(|| {
        netpol::lab::teardown_live_labs();
        std::process::exit(130);
    }) {
        eprintln!("warning: no Ctrl-C cleanup: {e}");
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dataplane-cost: {e}");
            ExitCode::from(2)
        }
    }
}
