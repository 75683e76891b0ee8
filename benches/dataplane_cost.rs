//! Dataplane cost of the compiled ruleset on a real kernel: new TCP connections per second
//! and single-stream TCP throughput between two lab pods on different nodes, with
//!
//! * (a) no table loaded on either node,
//! * (b) the ruleset compiled from a big generated cluster (default 10 000 pods, 1 000
//!   policies) that contains both pods, isolates them, and allows the measured port,
//! * (c) the ruleset of a small cluster: the same two pods, 8 neighbours and only the
//!   policies that isolate the pair (the same first-packet path, tiny sets and maps),
//! * (d) our table with no policy at all: conntrack and the base chains, the pair unisolated.
//!
//! (a)→(d) is the price of a stateful table, (d)→(c) that of the pair's policy chains,
//! (c)→(b) that of cluster size.
//!
//! ```text
//!  generate::cluster ──► pick (src, dst): other nodes, both isolated, TCP port allowed
//!        │                     (evaluator)           │
//!        ▼                                           ▼
//!  compile(src node), compile(dst node)      one Lab per configuration (same pods, same
//!        │  loaded once per lab                      │ addresses), TCP server in dst
//!        └──────► rounds × (a, b, c, d) slices ◄─────┘ clients inside src (Lab::in_pod)
//!                    conn/s, MB/s ──► medians, ratios to (a)
//! ```
//!
//! Run with `benches/dataplane-cost.sh` (root, `ip`, `nft`), which passes its arguments on:
//! `--rounds N --slice SECONDS --pods P --policies Q --namespaces K --nodes M --seed X`.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use netpol::compile::{NodeConfig, compile};
use netpol::evaluate::{Connection, Endpoint, evaluate};
use netpol::generate::{self, Params, Rng};
use netpol::kernel_engine;
use netpol::lab::traffic::TcpServer;
use netpol::lab::{Lab, LabNode, LabPod};
use netpol::model::{Cluster, Direction, Policy, Protocol};
use netpol::nft::ir::{MapVerdict, Ruleset, Value, Verdict};
use netpol::nft::real::RealNftables;
use netpol::nft::{names, render};
use socket2::{Domain, Socket, Type};

struct Args {
    rounds: usize,
    slice: f64,
    params: Params,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        rounds: 15,
        slice: 0.5,
        params: Params { pods: 10_000, namespaces: 50, policies: 1_000, nodes: 10, seed: 1, dual_stack: false },
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
                    + cluster.isolating_policies(dst, Direction::Ingress).len();
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

/// The same pair in a small cluster: it, 8 neighbours from the destination's namespace, and
/// only the policies that isolate the pair. Returns the cluster and the pair's new indices.
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
    let small = Cluster::new(
        big.namespaces.values().cloned().collect(),
        keep.iter().map(|&i| big.pods[i].clone()),
        policies.iter().map(|&i| big.policies[i].clone()),
    );
    let index = |i: usize| small.pod_index(&big.pods[i].id).expect("kept");
    let (src, dst) = (index(pair.src), index(pair.dst));
    (small, src, dst)
}

/// The chains a new packet of the pair walks in `rs` (the pod chain the dispatch map sends
/// it to, then the policy chains it jumps to) and the rules they hold.
fn first_packet_path(rs: &Ruleset, map: &str, ip: IpAddr) -> (Vec<String>, usize) {
    let Some(MapVerdict::Jump(pod_chain)) =
        rs.maps.get(map).and_then(|m| m.elements.iter().find(|(k, _)| k.0 == [Value::Addr(ip)]).map(|(_, v)| v))
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

/// Sum of the `counter packets N` of `chains` on a node: how many first packets the
/// ruleset's policy rules classified.
fn counted_packets(nft: &RealNftables, chains: &[String]) -> Result<u64, String> {
    let mut total = 0;
    for chain in chains {
        let text = nft
            .run(&["list", "chain", "inet", names::DEFAULT_TABLE, chain], "")
            .map_err(|e| format!("listing chain {chain}: {e}"))?;
        for word in text.split("counter packets ").skip(1) {
            total += word.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    Ok(total)
}

/// One configuration under test: a lab of its own (the same two pods, the same addresses:
/// labs are separate namespaces) with its rulesets loaded once, and a server in the
/// destination pod. Separate labs let the measurement hop between configurations every
/// slice instead of reloading rulesets, so other load on the machine hits all alike.
struct Setup {
    label: &'static str,
    lab: Lab,
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
    kernel_engine::check_prerequisites().map_err(|e| e.to_string())?;
    let p = &args.params;
    let t = Instant::now();
    let big = generate::cluster(p);
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

    let configs: [(&'static str, Option<Vec<Ruleset>>); 4] = [
        ("(a) no table", None),
        ("(b) big ruleset", Some(compile_for(&big))),
        ("(c) small ruleset", Some(compile_for(&small))),
        ("(d) table, no policy", Some(compile_for(&bare))),
    ];
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
    for (label, rulesets) in configs {
        let mut counted_chains = Vec::new();
        let mut size = "no table".to_string();
        if let Some(rs) = &rulesets {
            let (eg, eg_rules) = first_packet_path(&rs[0], names::EGRESS_DISPATCH_V4, src_ip);
            let (ing, in_rules) = first_packet_path(&rs[1], names::INGRESS_DISPATCH_V4, dst_ip);
            size = format!(
                "{} + {} rules, {} + {} set/map elements; first packet: {} chains/{eg_rules} rules at src, \
                 {} chains/{in_rules} rules at dst",
                rs[0].rule_count(),
                rs[1].rule_count(),
                rs[0].element_count(),
                rs[1].element_count(),
                eg.len(),
                ing.len()
            );
            // The pod chain ends in a counted drop; its policy chains' accepts count the pair.
            counted_chains = ing.into_iter().skip(1).collect();
        }
        println!("{label:21} {size}");
        let lab_nodes: Vec<LabNode> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| LabNode {
                name: n.clone(),
                ruleset: rulesets.as_ref().map(|rs| render::ruleset(&rs[i])).unwrap_or_default(),
            })
            .collect();
        let t = Instant::now();
        let lab = Lab::build(&lab_nodes, &lab_pods).map_err(|e| format!("{label}: {e}"))?;
        eprintln!("{label}: lab built and rulesets loaded in {:.2?}", t.elapsed());
        let server = lab.tcp_server(DST, to).map_err(|e| format!("{label}: server: {e}"))?;
        let dst_nft = RealNftables::in_netns(lab.node_netns(&nodes[1]).expect("lab node"));
        setups.push(Setup { label, lab, server, dst_nft, counted_chains, rates: Vec::new(), streams: Vec::new() });
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
    let (a_rate, a_stream) = (median(&setups[0].rates), median(&setups[0].streams));
    println!();
    println!(
        "{:<21} | {:>9} | {:>8} | {:>7} | {:>7} | {:>8} | {:>7} | {:>7}",
        "configuration", "conn/s", "µs/conn", "/ (a)", "paired", "MB/s", "/ (a)", "paired"
    );
    println!("{}", "-".repeat(97));
    for s in &setups {
        let (rate, stream) = (median(&s.rates), median(&s.streams));
        println!(
            "{:<21} | {rate:>9.0} | {:>8.1} | {:>7.3} | {:>7.3} | {stream:>8.0} | {:>7.3} | {:>7.3}",
            s.label,
            1e6 / rate,
            rate / a_rate,
            paired_ratio(&s.rates, &setups[0].rates),
            stream / a_stream,
            paired_ratio(&s.streams, &setups[0].streams),
        );
    }
    println!(
        "medians of {} slices of {:.2} s per configuration and metric, configurations interleaved, \
         \"paired\" = median of per-round ratios",
        args.rounds, args.slice
    );
    println!(
        "size independence, conn/s paired: (b)/(c) = {:.3}, (b)/(d) = {:.3}, (c)/(d) = {:.3}",
        paired_ratio(&setups[1].rates, &setups[2].rates),
        paired_ratio(&setups[1].rates, &setups[3].rates),
        paired_ratio(&setups[2].rates, &setups[3].rates),
    );
    for s in setups.drain(..) {
        s.server.stop().map_err(|e| format!("{}: server: {e}", s.label))?;
        s.lab.teardown().map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dataplane-cost: {e}");
            ExitCode::from(2)
        }
    }
}
