//! End-to-end benchmark of the real `netpol-agent` binary: event → rules committed in the
//! kernel, and the agent's memory per cluster pod.
//!
//! ```text
//!  generate::cluster ──► FakeApiServer (in-process, bulk-loaded) ◄── list/watch ── netpol-agent (child)
//!        │                      ▲                                                  │ --netns: netlink batches
//!        │   churn: add/delete/relabel pods at --rate                              ▼
//!        └──────────────────────┘                                 throwaway netns "npl-bench-<pid>"
//!                                                                                  │
//!     latency = commit announced by the kernel in that netns  −  event applied to the fake
//! ```
//!
//! The kernel is the witness: an event touches one pod, whose IP no other pod has and whose
//! next event comes a second or more later, and its latency is the time from applying the event to the fake apiserver until the kernel
//! announces (nf_tables netlink group, in the agent's netns) the end of the first commit,
//! before the pod's next event, whose element changes mention that IP. Events that change
//! no rule (the churn replayed through the compiler, idle sets kept as the agent keeps
//! them) are counted apart and left out of the percentiles, and so are changes whose IP
//! shows up in no commit before the pod's next event (reported: the agent missed them, or
//! kept other idle sets than the replay). At the end the kernel's table
//! must hold exactly the pod IPs that `compile` gives for the final cluster.
//!
//! Memory: VmRSS / VmHWM of the agent from `/proc/<pid>/status`, after the first full
//! sync and after the churn once the agent has converged (every event received, no sync
//! finishing for a second, the kernel table as compiled), divided by the cluster's pod count.
//!
//! Run it with `benches/agent-bench.sh` (root, `ip`, `nft`); it is not part of CI.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use netpol::cli::generate::{self, Params, Rng};
use netpol::compile::{IncrementalCompiler, NodeConfig, compile};
use netpol::nft::ir::{Element as NftElement, Ruleset, Value as NftValue};
use netpol::policy::model::{Cluster, Pod};
use netpol::testkit::agent_process::{AgentLaunch, NftRoute};
use netpol::testkit::apiserver::{FakeApiServer, Kind};

const NODE: &str = "node-0";
const TABLE: &str = "netpol";

/// Benchmark of the real netpol-agent binary against an in-process fake apiserver.
#[derive(Parser, Debug)]
struct Args {
    /// The latency cluster.
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Larger clusters (pod counts) to run after the first, with policies, namespaces and
    /// nodes scaled alike (comma-separated; 0 for none).
    #[arg(long, value_delimiter = ',', default_value = "100000")]
    scale_to: Vec<usize>,
    /// Pod events per second during the churn.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Share of the deletes and relabels that pick a pod of the agent's node, in percent
    /// (adds land there at three quarters of that rate, so that the node keeps its share of
    /// pods). The default puts almost half of all events on the node; in a real cluster of
    /// 101 nodes a node sees ~1 %.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(0..=100))]
    local_percent: u64,
    /// Seconds of churn per cluster.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Passed to the agent as --debounce (its default when absent).
    #[arg(long)]
    debounce: Option<String>,
    /// The node's pod CIDR, passed to the agent as --pod-cidr (repeatable): the unknown-pod
    /// guard is on, and a new local pod's address must reach the guard's set before its
    /// traffic passes (the generated pods live in 10.0.0.0/8).
    #[arg(long)]
    pod_cidr: Vec<ipnet::IpNet>,
    /// Extra command-line arguments for the agent (repeatable), e.g.
    /// `--agent-arg=--conntrack-cleanup=false`.
    #[arg(long, allow_hyphen_values = true)]
    agent_arg: Vec<String>,
    /// Extra environment for the agent (NAME=VALUE), e.g. MALLOC_ARENA_MAX=1.
    #[arg(long)]
    agent_env: Vec<String>,
    /// The agent binary (default: the one cargo built with this benchmark).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Also write each measured event of the first cluster as a line "seconds into the
    /// churn, kind, on the agent's node, latency ms" (tab-separated) to this file.
    #[arg(long)]
    latencies: Option<PathBuf>,
    /// The agent's log level (its log is copied to `--agent-log` if given).
    #[arg(long, default_value = "warn")]
    agent_log_level: String,
    /// Copy the agent's log of the first cluster to this file at the end.
    #[arg(long)]
    agent_log: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

// ---------------------------------------------------------------- cleanup, also on Ctrl-C

/// Child processes and network namespaces alive right now, for the Ctrl-C handler. Normal
/// exits and panics clean up through `Drop`; a signal does not unwind, so the handler
/// removes what is registered here.
static LIVE: Mutex<(Vec<u32>, Vec<String>)> = Mutex::new((Vec::new(), Vec::new()));

fn live() -> std::sync::MutexGuard<'static, (Vec<u32>, Vec<String>)> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

fn install_signal_cleanup() {
    let result = ctrlc::set_handler(|| {
        let (pids, netns) = live().clone();
        for pid in pids {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
        for ns in netns {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
        eprintln!("interrupted: killed the agent and removed the benchmark netns");
        std::process::exit(130);
    });
    if let Err(e) = result {
        eprintln!("warning: no Ctrl-C cleanup: {e}");
    }
}

/// A throwaway network namespace, deleted on drop with every table in it.
struct Netns(String);

impl Netns {
    fn create(name: String) -> Result<Netns, String> {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        live().1.push(name.clone());
        let out = Command::new("ip").args(["netns", "add", &name]).output().map_err(|e| format!("ip: {e}"))?;
        if !out.status.success() {
            live().1.retain(|n| *n != name);
            return Err(format!("ip netns add {name}: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(Netns(name))
    }

    fn nft(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "nft"])
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
        live().1.retain(|n| *n != self.0);
    }
}

#[path = "common/objects.rs"]
mod objects;
use objects::{ClusterArgs, namespaces_and_policies_json};

/// Which set or map elements each pod IPv4 address is part of.
fn memberships(rs: &Ruleset) -> HashMap<Ipv4Addr, BTreeSet<String>> {
    let mut out: HashMap<Ipv4Addr, BTreeSet<String>> = HashMap::new();
    let mut note = |name: &str, values: &[NftValue]| {
        for v in values {
            if let NftValue::Addr(IpAddr::V4(ip)) = v {
                out.entry(*ip).or_default().insert(format!("{name} {values:?}"));
            }
        }
    };
    for (name, set) in &rs.sets {
        for e in &set.elements {
            note(name, e.values());
        }
    }
    for (name, map) in &rs.maps {
        for e in map.elements.keys() {
            note(name, e.values());
        }
    }
    out
}

/// The sets and maps of `rs` that hold `ip` (as the whole key or its first component).
fn memberships_of(rs: &Ruleset, ip: Ipv4Addr) -> BTreeSet<String> {
    let addr = NftValue::Addr(IpAddr::V4(ip));
    // Elements sort by their components: the first one starting with `addr` is the first at
    // or after the one-component element `addr`.
    let first = NftElement::single(addr);
    let starts_with_addr = |e: Option<&NftElement>| e.is_some_and(|e| e.values().first() == Some(&addr));
    let mut out = BTreeSet::new();
    for (name, set) in &rs.sets {
        if starts_with_addr(set.elements.first_from(&first).as_ref()) {
            out.insert(name.clone());
        }
    }
    for (name, map) in &rs.maps {
        if starts_with_addr(map.elements.range(&first..).next().map(|(k, _)| k)) {
            out.insert(name.clone());
        }
    }
    out
}

/// `cluster` with `count` generated ClusterNetworkPolicies (seeded by `seed`).
fn with_cluster_policies(cluster: Cluster, seed: u64, count: usize) -> Cluster {
    if count == 0 {
        return cluster;
    }
    cluster.with_tiers(generate::cluster_policies(seed, count), Vec::new(), Default::default())
}

/// `cluster` with `base`'s cluster policies, nodes and resolved names.
fn with_tiers_of(base: &Cluster, cluster: Cluster) -> Cluster {
    cluster.with_tiers(base.cluster_policies.iter().cloned(), (*base.nodes).clone(), (*base.domains).clone())
}

/// For each event: did it change its pod's memberships on the agent's node, given the
/// cluster as it was when the event happened? (Replays the churn from `base`, keeping idle
/// sets as the agent does by default: a set that goes idle keeps its elements in the
/// kernel, and an event whose only effect is that sends no element naming its pod.)
fn replay(base: &Cluster, events: &[Event], config: &NodeConfig) -> Vec<bool> {
    let namespaces: Vec<_> = base.namespaces.values().cloned().collect();
    let mut pods: BTreeMap<(String, String), Arc<Pod>> =
        base.pods.iter().map(|p| ((p.id.namespace.clone(), p.id.name.clone()), Arc::clone(p))).collect();
    let mut compiler = IncrementalCompiler::new(config.clone())
        .keeping_idle_sets(netpol::agent::nft_target::IDLE_SET_ELEMENTS_PER_POD);
    let mut before = compiler.compile(base, None).ruleset;
    events
        .iter()
        .map(|e| {
            match &e.became {
                Some(p) => pods.insert(e.pod.clone(), Arc::new(p.clone())),
                None => pods.remove(&e.pod),
            };
            let cluster = with_tiers_of(
                base,
                Cluster::new(namespaces.clone(), pods.values().cloned(), base.policies.iter().cloned()),
            );
            let after = compiler.compile(&cluster, None).ruleset;
            let changed = memberships_of(&before, e.ip) != memberships_of(&after, e.ip);
            before = after;
            changed
        })
        .collect()
}

/// Plain IPv4 addresses (not prefixes) in nft output.
fn ipv4_tokens(line: &str) -> impl Iterator<Item = Ipv4Addr> + '_ {
    line.split(|c: char| c.is_whitespace() || matches!(c, '{' | '}' | ',' | ':' | '(' | ')'))
        .filter(|t| !t.contains('/'))
        .filter_map(|t| t.parse().ok())
}

/// Which sets and maps of an `nft list table` listing each plain IPv4 address is in,
/// counting only those some rule looks up (`@name`): the agent keeps idle sets, which
/// decide no packet.
fn kernel_memberships(listing: &str) -> HashMap<Ipv4Addr, BTreeSet<String>> {
    let referenced: BTreeSet<&str> =
        listing.split(|c: char| c.is_whitespace() || c == ',').filter_map(|t| t.strip_prefix('@')).collect();
    let mut out: HashMap<Ipv4Addr, BTreeSet<String>> = HashMap::new();
    let mut current: Option<&str> = None;
    for line in listing.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["set" | "map", name, "{"] => current = referenced.contains(name).then_some(*name),
            ["chain", ..] => current = None,
            _ => {
                if let Some(name) = current {
                    for ip in ipv4_tokens(line) {
                        out.entry(ip).or_default().insert(name.to_string());
                    }
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------- kernel witness

/// Commit times per IP, as the kernel announces them.
#[derive(Default)]
struct Commits {
    by_ip: HashMap<Ipv4Addr, Vec<Instant>>,
    generations: u64,
    /// Times the socket's buffer overflowed and announcements were lost (ENOBUFS).
    overruns: u64,
}

/// Listens to the kernel's nf_tables announcements in the agent's netns (the multicast
/// group `nft monitor` reads, decoded here: nft monitor drops the element changes of sets
/// it did not see created, ~1 800 per 15 s run at 10k pods). Each committed transaction
/// announces its element changes, then a new generation; a thread timestamps the
/// generation and files it under every IPv4 address the changed elements' keys start with.
struct Monitor {
    commits: Arc<Mutex<Commits>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Monitor {
    fn start(netns: &Netns) -> Result<Monitor, String> {
        use netpol::nft::backend::netlink::{self, NetlinkSocket};
        let socket = NetlinkSocket::open(Some(&netns.0), 1 << (netlink::NFNLGRP_NFTABLES - 1))
            .map_err(|e| format!("netlink monitor in {}: {e}", netns.0))?;
        socket.set_receive_timeout(Duration::from_millis(200)).map_err(|e| e.to_string())?;
        let commits = Arc::new(Mutex::new(Commits::default()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let (commits, stop) = (commits.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 20];
                let mut pending: Vec<Ipv4Addr> = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let n = match socket.recv(&mut buf, true) {
                        Ok(Some(n)) => n,
                        Ok(None) => continue,
                        Err(nix::errno::Errno::ENOBUFS) => {
                            commits.lock().unwrap_or_else(|e| e.into_inner()).overruns += 1;
                            continue;
                        }
                        Err(_) => break,
                    };
                    let now = Instant::now();
                    for (kind, _, _, payload) in netlink::messages(&buf[..n]) {
                        match netlink::nftables_message(kind) {
                            Some(netlink::msg::NEWSETELEM | netlink::msg::DELSETELEM) => {
                                pending.extend(
                                    netlink::element_keys(payload)
                                        .filter_map(|k| <[u8; 4]>::try_from(k.get(..4)?).ok())
                                        .map(Ipv4Addr::from),
                                );
                            }
                            Some(netlink::msg::NEWGEN) => {
                                let mut c = commits.lock().unwrap_or_else(|e| e.into_inner());
                                c.generations += 1;
                                for ip in pending.drain(..) {
                                    let times = c.by_ip.entry(ip).or_default();
                                    if times.last() != Some(&now) {
                                        times.push(now);
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                }
            })
        };
        Ok(Monitor { commits, stop, thread: Some(thread) })
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------- agent process probes

fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((code, body))
}

/// (VmRSS, VmHWM) in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// User + system CPU seconds of a process.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesized command name; utime and stime are fields 14 and 15.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = [11, 12].iter().filter_map(|i| fields.get(*i)?.parse::<f64>().ok()).sum();
    ticks / clock_ticks()
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// One histogram of the agent's metrics text, summed over the label sets that contain
/// `labels` (`""`: all of them).
#[derive(Debug, Clone, Default)]
struct Histogram {
    /// Cumulative (upper bound in seconds, samples at or under it), ascending.
    buckets: Vec<(f64, u64)>,
    count: u64,
    sum: f64,
}

impl Histogram {
    fn read(metrics: &str, name: &str, labels: &str) -> Histogram {
        let mut h = Histogram::default();
        let mut buckets: BTreeMap<u64, (f64, u64)> = BTreeMap::new();
        for line in metrics.lines().filter(|l| l.starts_with(name) && l.contains(labels)) {
            let (Some(series), Some(value)) = (line.split([' ', '{']).next(), line.rsplit(' ').next()) else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else { continue };
            match series.strip_prefix(name) {
                Some("_bucket") => {
                    let le = line.split("le=\"").nth(1).and_then(|rest| rest.split('"').next()).unwrap_or("+Inf");
                    let le = le.parse::<f64>().unwrap_or(f64::INFINITY);
                    buckets.entry(le.to_bits()).or_insert((le, 0)).1 += value as u64;
                }
                Some("_count") => h.count += value as u64,
                Some("_sum") => h.sum += value,
                _ => {}
            }
        }
        h.buckets = buckets.into_values().collect();
        h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        h
    }

    /// The samples recorded since `before` (a reading of the same histogram).
    fn since(&self, before: &Histogram) -> Histogram {
        let earlier = |le: f64| before.buckets.iter().find(|(b, _)| *b == le).map_or(0, |(_, n)| *n);
        Histogram {
            buckets: self.buckets.iter().map(|(le, n)| (*le, n.saturating_sub(earlier(*le)))).collect(),
            count: self.count.saturating_sub(before.count),
            sum: self.sum - before.sum,
        }
    }

    fn mean_ms(&self) -> f64 {
        if self.count == 0 { f64::NAN } else { self.sum / self.count as f64 * 1000.0 }
    }

    /// The upper bound of the bucket the `q` quantile falls in, ms.
    fn quantile_ms(&self, q: f64) -> f64 {
        let want = (q * self.count as f64).ceil() as u64;
        self.buckets.iter().find(|(_, n)| *n >= want).map_or(f64::NAN, |(le, _)| le * 1000.0)
    }
}

/// Mean seconds of the partial syncs' `phase` (compile, apply), from the phase histogram.
fn partial_phase_mean(metrics: &str, phase: &str) -> Option<f64> {
    let h =
        Histogram::read(metrics, "netpol_sync_phase_duration_seconds", &format!("mode=\"partial\",phase=\"{phase}\""));
    (h.count > 0).then(|| h.sum / h.count as f64)
}

const ENFORCEMENT: &str = "netpol_event_enforcement_latency_seconds";

/// Sum of a metric's samples over all label sets (`name{...} value` or `name value`).
fn metric_sum(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(['{', ' '])))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Does the kernel put every pod IP in exactly the sets and maps the final cluster compiles
/// to (not just: hold the same IPs)? `Ok(pod IPs)` if so.
fn kernel_agrees(netns: &Netns, expected: &HashMap<Ipv4Addr, BTreeSet<String>>) -> Result<usize, String> {
    let kernel = kernel_memberships(&netns.nft(&["list", "table", "inet", TABLE])?);
    let wrong: Vec<&Ipv4Addr> = expected
        .keys()
        .chain(kernel.keys())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|ip| kernel.get(ip) != expected.get(ip))
        .collect();
    match wrong.first() {
        None => Ok(kernel.len()),
        Some(ip) => Err(format!(
            "{} of {} pod IPs are in other sets than compiled, e.g. {ip}: kernel {:?}, expected {:?}",
            wrong.len(),
            expected.len(),
            kernel.get(ip),
            expected.get(ip)
        )),
    }
}

/// Waits until the agent has converged: it received every churn event, no sync finished
/// for a second, and the kernel agrees with the compiled final cluster. The kernel's
/// verdict when it is (or at the deadline).
fn converge(
    netns: &Netns,
    admin_port: u16,
    events: u64,
    expected: &HashMap<Ipv4Addr, BTreeSet<String>>,
    timeout: Duration,
) -> Result<usize, String> {
    let deadline = Instant::now() + timeout;
    let syncs = || {
        http_get(admin_port, "/metrics").map(|(_, body)| {
            (metric_sum(&body, "netpol_watch_events_total"), metric_sum(&body, "netpol_sync_duration_seconds_count"))
        })
    };
    let mut last = syncs();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = syncs();
        let quiet = now.is_some() && now == last && now.is_some_and(|(seen, _)| seen >= events);
        last = now;
        if quiet {
            let verdict = kernel_agrees(netns, expected);
            // A sync that committed but had not finished (its count bumps at the end)
            // when the kernel was read is not converged yet.
            let still_quiet = syncs() == last;
            if (verdict.is_ok() && still_quiet) || Instant::now() > deadline {
                return verdict;
            }
        } else if Instant::now() > deadline {
            return kernel_agrees(netns, expected)
                .and_then(|_| Err(format!("the agent did not settle within {} s", timeout.as_secs())));
        }
    }
}

// ---------------------------------------------------------------- one run

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EventKind {
    Add,
    Delete,
    Relabel,
}

struct Event {
    kind: EventKind,
    ip: Ipv4Addr,
    at: Instant,
    local: bool,
    /// The pod the event touched (namespace, name) and what it became (`None`: deleted).
    pod: (String, String),
    became: Option<Pod>,
}

struct Outcome {
    pods: usize,
    policies: usize,
    namespaces: usize,
    nodes: usize,
    load_secs: f64,
    first_sync_secs: f64,
    rss_first: (u64, u64),
    rss_end: (u64, u64),
    converge_secs: f64,
    events: Vec<Event>,
    latencies: Vec<(EventKind, Duration)>,
    tally: Tally,
    local_pods: (usize, usize),
    converged: Result<usize, String>,
    partial_syncs: Histogram,
    /// The agent's own measure of the churn's changes: arrival at the agent to the commit
    /// that enforced them (`netpol_event_enforcement_latency_seconds`).
    enforcement: Histogram,
    /// Mean compile and apply time of a partial sync, seconds.
    phases: [Option<f64>; 2],
    agent_cpu_per_sec: f64,
    /// Idle sets the agent keeps after the churn, and their elements.
    idle_sets: (u64, u64),
    generations: u64,
    /// Times the kernel's announcements overflowed the monitor's socket.
    monitor_overruns: u64,
    /// The first lines of the agent's log (warnings and errors only).
    complaints: Vec<String>,
}

/// Events that are not in the latency percentiles.
#[derive(Default)]
struct Tally {
    /// Events that change no set membership of their pod, by kind.
    unchanged: BTreeMap<&'static str, usize>,
    /// ... of which a commit mentioned the IP anyway (a set created or dropped whole
    /// because of another event).
    mentioned_anyway: usize,
    /// Events that should have changed rules but no commit mentioned their IP before the
    /// pod's next event (or at all).
    missed: usize,
}

struct Setup<'a> {
    args: &'a Args,
    agent: &'a Path,
    dir: &'a Path,
}

fn run(setup: &Setup<'_>, params: &Params) -> Result<Outcome, String> {
    let args = setup.args;
    eprintln!(
        "== {} pods, {} policies, {} namespaces, {} nodes",
        params.pods, params.policies, params.namespaces, params.nodes
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let server = runtime.block_on(FakeApiServer::start()).map_err(|e| e.to_string())?;

    let t = Instant::now();
    let base = with_cluster_policies(generate::cluster(params), params.seed, args.cluster.cluster_policies);
    let mut objects = namespaces_and_policies_json(&base);
    if base.has_tiers() {
        server.install_crd(Kind::ClusterNetworkPolicy);
        objects.extend(base.cluster_policies.iter().map(|p| generate::cluster_policy_manifest(p)));
    }
    // Pods are made one at a time as the fake stores them (as JSON text): 100 000
    // realistic pods held as `Value`s at once would take gigabytes.
    let pods = base.pods.iter().map(|p| args.cluster.pod_object(p));
    server.apply_bulk(objects.into_iter().chain(pods)).map_err(|e| e.to_string())?;
    let load_secs = t.elapsed().as_secs_f64();
    let pod_bytes = server.stored_bytes(Kind::Pod);
    eprintln!(
        "   generated and loaded into the fake apiserver in {load_secs:.1} s; {} pods: {} bytes of JSON per pod, {:.0} MB listed in all",
        if args.cluster.realistic_pods { "realistic" } else { "small" },
        pod_bytes / params.pods.max(1),
        pod_bytes as f64 / 1e6
    );

    let netns = Netns::create(format!("npl-bench-{}", std::process::id()))?;
    let kubeconfig = setup.dir.join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig_yaml()).map_err(|e| e.to_string())?;
    let admin_port =
        std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| e.to_string())?.port();

    let mut launch =
        AgentLaunch::new(setup.agent, NODE, TABLE, &kubeconfig, NftRoute::Netns(netns.0.clone()), setup.dir);
    launch.admin_addr = format!("127.0.0.1:{admin_port}");
    launch.log_level = args.agent_log_level.clone();
    if let Some(d) = &args.debounce {
        launch.extra_args = vec!["--debounce".into(), d.clone()];
    }
    for cidr in &args.pod_cidr {
        launch.extra_args.extend(["--pod-cidr".to_string(), cidr.to_string()]);
    }
    launch.extra_args.extend(args.agent_arg.iter().cloned());
    for kv in &args.agent_env {
        let (k, v) = kv.split_once('=').ok_or_else(|| format!("--agent-env {kv}: expected NAME=VALUE"))?;
        launch.env.push((k.into(), v.into()));
    }
    let started = Instant::now();
    let mut agent = launch.spawn(&format!("agent-{}.log", params.pods)).map_err(|e| format!("netpol-agent: {e}"))?;
    // Killed on drop; registered so that Ctrl-C kills it too.
    live().0.push(agent.pid());

    // First full sync: /readyz turns 200 once it is in the kernel.
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        if let Some(status) = agent.exited() {
            return Err(format!("netpol-agent exited ({status}) before its first sync:\n{}", agent.log()));
        }
        if http_get(admin_port, "/readyz").is_some_and(|(code, _)| code == 200) {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("no first sync within 900 s:\n{}", agent.log()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let first_sync_secs = started.elapsed().as_secs_f64();
    // The commits are watched from here on: the first sync is timed as a node without an
    // observer would see it. A listener that falls behind the kernel's announcements (one
    // per element: 494 000 at 100k pods) slows the commit itself 3-7 times (nft -f of those
    // elements: 1.3 s alone, 1.9 s beside a listener reading them, 6.6 s beside one that
    // does not keep up).
    let monitor = Monitor::start(&netns)?;
    // Let the allocator settle after the first sync's peak.
    std::thread::sleep(Duration::from_secs(2));
    let rss_first = memory_kib(agent.pid());
    eprintln!("   first full sync after {first_sync_secs:.1} s; RSS {} KiB, HWM {} KiB", rss_first.0, rss_first.1);

    let cpu_before = cpu_seconds(agent.pid());
    let enforcement_before =
        Histogram::read(&http_get(admin_port, "/metrics").map(|(_, body)| body).unwrap_or_default(), ENFORCEMENT, "");

    // ---- churn
    let mut rng = Rng::new(params.seed ^ 0x5eed);
    let apps: Vec<String> =
        base.pods.iter().filter_map(|p| p.labels.get("app").cloned()).collect::<BTreeSet<_>>().into_iter().collect();
    let mut mirror: BTreeMap<(String, String), Pod> =
        base.pods.iter().map(|p| ((p.id.namespace.clone(), p.id.name.clone()), (**p).clone())).collect();
    // Pods a delete or relabel may pick (remote, local): the initial cluster's, each added
    // pod a second after its add, each relabelled pod a second after its relabel. A pod
    // leaves the pool while its event is fresh, so an IP's events are a second or more
    // apart, and each event's commit is the first one after it that names the IP.
    let mut pool: [Vec<(String, String)>; 2] = [Vec::new(), Vec::new()];
    let mut resting: std::collections::VecDeque<(Instant, usize, (String, String))> = Default::default();
    for (k, p) in &mirror {
        pool[usize::from(p.node == NODE)].push(k.clone());
    }
    let local_pods_at_start = pool[1].len();
    let other_nodes: Vec<String> = (1..params.nodes).map(|i| format!("node-{i}")).collect();
    let mut events: Vec<Event> = Vec::new();
    let period = Duration::from_secs_f64(1.0 / args.rate);
    let total = (args.rate * args.seconds as f64) as usize;
    let churn_start = Instant::now();
    for n in 0..total {
        let due = churn_start + period * n as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        while resting.front().is_some_and(|(at, _, _)| at.elapsed() >= Duration::from_secs(1)) {
            let (_, side, key) = resting.pop_front().expect("checked");
            pool[side].push(key);
        }
        let local = rng.chance(args.local_percent);
        let roll = rng.below(10);
        let kind = if roll < 4 {
            EventKind::Add
        } else if roll < 7 {
            EventKind::Delete
        } else {
            EventKind::Relabel
        };
        // An untouched pod, from the chosen side while it has any.
        let pick = |rng: &mut Rng| -> Option<(usize, usize)> {
            let side = if pool[usize::from(local)].is_empty() { usize::from(!local) } else { usize::from(local) };
            (!pool[side].is_empty()).then(|| (side, rng.below(pool[side].len())))
        };
        let event = match kind {
            EventKind::Add => {
                let template = &base.pods[rng.below(base.pods.len())];
                let ip = Ipv4Addr::from(0x0A80_0000u32 + n as u32);
                let mut p = (**template).clone();
                p.id.name = format!("churn-{n}");
                // New pods land on the agent's node at 3/4 of the rate deletes pick a local
                // pod (4 adds for every 3 deletes): as many arrive as leave, so the node keeps
                // its share of the pods (by default 3 in 8 adds, while almost half of all
                // events concern it).
                let lands_here = rng.below(400) < 3 * args.local_percent as usize;
                p.node = if lands_here { NODE.into() } else { rng.pick(&other_nodes).as_str().into() };
                p.ips = IpAddr::V4(ip).into();
                let key = (p.id.namespace.clone(), p.id.name.clone());
                let p_local = p.node == NODE;
                // The event starts when the API server takes the write: the object is
                // built before, as a client builds it before sending it.
                let object = args.cluster.pod_object(&p);
                let at = Instant::now();
                server.apply_json(object).map_err(|e| e.to_string())?;
                mirror.insert(key.clone(), p.clone());
                resting.push_back((at, usize::from(p_local), key.clone()));
                Event { kind, ip, at, local: p_local, pod: key, became: Some(p) }
            }
            EventKind::Delete | EventKind::Relabel => {
                let Some((side, i)) = pick(&mut rng) else { continue };
                let key = pool[side][i].clone();
                let Some(IpAddr::V4(ip)) = mirror[&key].ips.first().copied() else { continue };
                let mut at = Instant::now();
                let became = if kind == EventKind::Delete {
                    server.delete(Kind::Pod, &key.0, &key.1).ok_or("pod to delete is missing")?;
                    mirror.remove(&key);
                    None
                } else {
                    let p = mirror.get_mut(&key).expect("pooled pods are live");
                    let old = p.labels.get("app").cloned().unwrap_or_default();
                    let new = loop {
                        let a = rng.pick(&apps);
                        if *a != old || apps.len() < 2 {
                            break a.clone();
                        }
                    };
                    Arc::make_mut(&mut p.labels).insert("app".into(), new);
                    let object = args.cluster.pod_object(p);
                    at = Instant::now();
                    server.apply_json(object).map_err(|e| e.to_string())?;
                    resting.push_back((at, side, key.clone()));
                    Some(p.clone())
                };
                pool[side].swap_remove(i);
                Event { kind, ip, at, local: side == 1, pod: key, became }
            }
        };
        events.push(event);
        if let Some(status) = agent.exited() {
            return Err(format!("netpol-agent exited ({status}) during the churn:\n{}", agent.log()));
        }
    }
    let churn_secs = churn_start.elapsed().as_secs_f64();
    // Drain: the last events' commits.
    std::thread::sleep(Duration::from_secs(3));
    let agent_cpu_per_sec = (cpu_seconds(agent.pid()) - cpu_before) / (churn_secs + 3.0);

    // ---- ground truth: which events changed their pod's set memberships on the agent's node
    // when they happened (the churn replayed through the compiler, event by event; an event
    // can also change nothing then and matter later, when another event creates a set whole)
    let config = NodeConfig { table: TABLE.into(), pod_cidrs: args.pod_cidr.clone(), ..NodeConfig::new(NODE) };
    let local_pods_at_end = mirror.values().filter(|p| p.node == NODE).count();
    let final_cluster = with_tiers_of(
        &base,
        Cluster::new(base.namespaces.values().cloned().collect(), mirror.into_values(), base.policies.iter().cloned()),
    );
    let after = memberships(&compile(&final_cluster, &config));

    // ---- converge before measuring memory: RSS read while a sync runs (at 100k pods the
    // last ones outlast the drain) counts that sync's transient buffers.
    let expected: HashMap<Ipv4Addr, BTreeSet<String>> = after
        .iter()
        .map(|(ip, m)| (*ip, m.iter().map(|e| e.split(' ').next().unwrap_or_default().to_string()).collect()))
        .collect();
    let converge_start = Instant::now();
    let converged = converge(&netns, admin_port, events.len() as u64, &expected, Duration::from_secs(600));
    let converge_secs = converge_start.elapsed().as_secs_f64() + 3.0;
    // malloc_trim runs right after each sync; give it a moment.
    std::thread::sleep(Duration::from_secs(1));
    let rss_end = memory_kib(agent.pid());
    eprintln!(
        "   {} events in {churn_secs:.1} s, converged {converge_secs:.1} s after the last; RSS {} KiB, HWM {} KiB",
        events.len(),
        rss_end.0,
        rss_end.1
    );
    let metrics = http_get(admin_port, "/metrics").map(|(_, body)| body).unwrap_or_default();
    let partial_syncs = Histogram::read(&metrics, "netpol_sync_duration_seconds", "mode=\"partial\"");
    let enforcement = Histogram::read(&metrics, ENFORCEMENT, "").since(&enforcement_before);
    let phases = ["compile", "apply"].map(|p| partial_phase_mean(&metrics, p));
    let idle_sets =
        (metric_sum(&metrics, "netpol_ruleset_idle_sets"), metric_sum(&metrics, "netpol_ruleset_idle_set_elements"));

    let replay_start = Instant::now();
    let changed_when_applied = replay(&base, &events, &config);
    eprintln!("   churn replayed through the compiler in {:.1} s", replay_start.elapsed().as_secs_f64());

    // ---- match events to the first commit mentioning their IP
    let commits = monitor.commits.lock().unwrap_or_else(|e| e.into_inner());
    let mut latencies = Vec::new();
    let mut timeline = Vec::new();
    let mut tally = Tally::default();
    // An event's commit comes before its pod's next event (a second or more later): a
    // commit after that is the next event's, and would stand for this one only if the
    // replay and the agent disagree on what the event changed (the idle sets each keeps).
    let mut next_event_at: HashMap<Ipv4Addr, Instant> = HashMap::new();
    let mut window_ends = vec![None; events.len()];
    for (k, e) in events.iter().enumerate().rev() {
        window_ends[k] = next_event_at.insert(e.ip, e.at);
    }
    for ((e, changed), window_end) in events.iter().zip(&changed_when_applied).zip(window_ends) {
        let commit = commits.by_ip.get(&e.ip).and_then(|times| {
            times.iter().copied().find(|t| *t >= e.at).filter(|t| window_end.is_none_or(|end| *t < end))
        });
        match (*changed, commit) {
            (true, Some(t)) => {
                latencies.push((e.kind, t - e.at));
                timeline.push(format!(
                    "{:.3}\t{}\t{}\t{:.2}",
                    (e.at - churn_start).as_secs_f64(),
                    kind_name(e.kind),
                    e.local,
                    (t - e.at).as_secs_f64() * 1e3
                ));
            }
            (true, None) => tally.missed += 1,
            (false, None) => *tally.unchanged.entry(kind_name(e.kind)).or_default() += 1,
            (false, Some(_)) => {
                *tally.unchanged.entry(kind_name(e.kind)).or_default() += 1;
                tally.mentioned_anyway += 1;
            }
        }
    }
    // The agent's log and the latencies are kept for the first cluster only.
    let first_cluster = params.pods == args.cluster.params().pods;
    if let Some(path) = args.agent_log.as_ref().filter(|_| first_cluster) {
        std::fs::copy(agent.log_path(), path).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if let Some(path) = args.latencies.as_ref().filter(|_| first_cluster) {
        timeline.push(String::new());
        std::fs::write(path, timeline.join("\n")).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let generations = commits.generations;
    let monitor_overruns = commits.overruns;
    drop(commits);

    // Anything the agent warned about is worth reading.
    let complaints: Vec<String> = agent
        .log()
        .lines()
        .filter(|l| l.contains("\"level\":\"WARN\"") || l.contains("\"level\":\"ERROR\""))
        .take(5)
        .map(|l| l.chars().take(400).collect())
        .collect();
    let agent_pid = agent.pid();
    let _ = agent.terminate(Duration::from_secs(10));
    drop(monitor);
    drop(agent);
    live().0.retain(|p| *p != agent_pid);
    drop(netns);
    drop(server);
    Ok(Outcome {
        pods: params.pods,
        policies: params.policies,
        namespaces: params.namespaces,
        nodes: params.nodes,
        load_secs,
        first_sync_secs,
        rss_first,
        rss_end,
        converge_secs,
        events,
        latencies,
        tally,
        local_pods: (local_pods_at_start, local_pods_at_end),
        converged,
        partial_syncs,
        enforcement,
        phases,
        agent_cpu_per_sec,
        idle_sets,
        generations,
        monitor_overruns,
        complaints,
    })
}

fn kind_name(k: EventKind) -> &'static str {
    match k {
        EventKind::Add => "add",
        EventKind::Delete => "delete",
        EventKind::Relabel => "relabel",
    }
}

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

fn report(o: &Outcome, args: &Args) {
    println!();
    println!(
        "cluster: {} pods, {} policies, {} namespaces, {} nodes (agent on {NODE})",
        o.pods, o.policies, o.namespaces, o.nodes
    );
    println!(
        "setup: generate+load {:.1} s; agent start to first full sync in the kernel {:.1} s",
        o.load_secs, o.first_sync_secs
    );
    let local = o.events.iter().filter(|e| e.local).count();

    println!(
        "churn: {} events at {}/s for {} s ({} on the agent's node), {} nft commits seen",
        o.events.len(),
        args.rate,
        args.seconds,
        local,
        o.generations
    );
    if o.monitor_overruns > 0 {
        println!(
            "the kernel's announcements overflowed the monitor's socket {} times (most likely during a big \
             sync); commits announced then are missing",
            o.monitor_overruns
        );
    }
    println!("| events | measured (changed rules) | no rule change | p50 ms | p90 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|---|");
    for kind in [Some(EventKind::Add), Some(EventKind::Delete), Some(EventKind::Relabel), None] {
        let mut ds: Vec<Duration> =
            o.latencies.iter().filter(|(k, _)| kind.is_none_or(|w| w == *k)).map(|(_, d)| *d).collect();
        ds.sort();
        let name = kind.map(kind_name).unwrap_or("all");
        let total = o.events.iter().filter(|e| kind.is_none_or(|w| w == e.kind)).count();
        let unchanged: usize = match kind {
            Some(k) => o.tally.unchanged.get(kind_name(k)).copied().unwrap_or(0),
            None => o.tally.unchanged.values().sum(),
        };
        println!(
            "| {name} ({total}) | {} | {unchanged} | {:.1} | {:.1} | {:.1} | {:.1} |",
            ds.len(),
            percentile(&ds, 0.5),
            percentile(&ds, 0.9),
            percentile(&ds, 0.99),
            ds.last().map(|d| d.as_secs_f64() * 1000.0).unwrap_or(f64::NAN)
        );
    }
    println!(
        "no rule change = the event left its pod's set and map memberships on the agent's node as they were \
         (the churn replayed through the compiler, idle sets kept as the agent keeps them; {} of them had their \
         IP in a later commit, from a set another event made or dropped whole); changes not committed before the \
         pod's next event or at all: {}",
        o.tally.mentioned_anyway, o.tally.missed
    );
    println!("pods on the agent's node: {} before the churn, {} after", o.local_pods.0, o.local_pods.1);
    match &o.converged {
        Ok(n) => println!(
            "kernel table after churn puts each of the expected {n} pod IPs in exactly its compiled sets and maps"
        ),
        Err(e) => println!("KERNEL TABLE DIFFERS from the expected ruleset: {e}"),
    }
    let partial = &o.partial_syncs;
    if partial.count > 0 {
        println!(
            "agent partial syncs: {}, mean {:.1} ms, p50 <= {:.1} ms, p99 <= {:.1} ms (histogram buckets)",
            partial.count,
            partial.mean_ms(),
            partial.quantile_ms(0.5),
            partial.quantile_ms(0.99)
        );
    }
    let own = &o.enforcement;
    if own.count > 0 {
        let measured_mean =
            o.latencies.iter().map(|(_, d)| d.as_secs_f64()).sum::<f64>() * 1000.0 / o.latencies.len().max(1) as f64;
        println!(
            "agent's own share (arrival at the agent to the enforcing commit, {ENFORCEMENT}): {} changes, mean \
             {:.2} ms, p50 <= {:.2} ms, p99 <= {:.2} ms (buckets); the measured events' mean, from the API write \
             to the commit: {measured_mean:.2} ms",
            own.count,
            own.mean_ms(),
            own.quantile_ms(0.5),
            own.quantile_ms(0.99)
        );
    }
    if let [Some(compile), Some(apply)] = o.phases {
        println!(
            "   of which compile (snapshot to transaction) {:.1} ms, apply (until the kernel committed) {:.2} ms",
            compile * 1000.0,
            apply * 1000.0
        );
    }
    println!("agent CPU during churn: {:.2} cores", o.agent_cpu_per_sec);
    println!(
        "idle sets the agent keeps after the churn (unreferenced, for policies that come back): {} sets, {} elements",
        o.idle_sets.0, o.idle_sets.1
    );
    if !o.complaints.is_empty() {
        println!("the agent logged warnings or errors, first ones:");
        for line in &o.complaints {
            println!("   {line}");
        }
    }
    let per_pod = |kib: u64| kib as f64 / o.pods as f64;
    println!("after churn, the agent converged {:.1} s after the last event (memory measured then)", o.converge_secs);
    println!("| memory | after first sync | after churn |");
    println!("|---|---|---|");
    println!("| VmRSS KiB | {} | {} |", o.rss_first.0, o.rss_end.0);
    println!("| VmHWM KiB | {} | {} |", o.rss_first.1, o.rss_end.1);
    println!("| RSS KiB per cluster pod | {:.2} | {:.2} |", per_pod(o.rss_first.0), per_pod(o.rss_end.0));
    println!("| HWM KiB per cluster pod | {:.2} | {:.2} |", per_pod(o.rss_first.1), per_pod(o.rss_end.1));
}

fn main() {
    let args = Args::parse();
    install_signal_cleanup();
    let agent = args.agent.clone().unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_netpol-agent")));
    let is_root = std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false);
    if !is_root {
        eprintln!("the agent benchmark needs root (network namespaces and nft)");
        std::process::exit(2);
    }
    // The final check reads the kernel's table with `nft`: without it, every run would wait
    // out the convergence timeout (10 minutes) and fail.
    for tool in ["nft", "ip"] {
        if Command::new(tool).arg("-V").output().is_err() {
            eprintln!("the agent benchmark needs the `{tool}` command (Debian: apt-get install -y nftables iproute2)");
            std::process::exit(2);
        }
    }
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("tempdir: {e}");
            std::process::exit(1);
        }
    };
    let setup = Setup { args: &args, agent: &agent, dir: dir.path() };
    let first = args.cluster.params();
    let mut sizes = vec![first.clone()];
    for &pods in args.scale_to.iter().filter(|p| **p > 0) {
        let scale = pods as f64 / first.pods as f64;
        let scaled = |n: usize| ((n as f64 * scale).round() as usize).max(1);
        sizes.push(Params {
            pods,
            namespaces: scaled(first.namespaces),
            policies: scaled(first.policies),
            // Odd, so pods of one node spread over namespaces.
            nodes: scaled(first.nodes) | 1,
            ..first.clone()
        });
    }
    let mut failed = false;
    for params in &sizes {
        match run(&setup, params) {
            Ok(outcome) => report(&outcome, &args),
            Err(e) => {
                eprintln!("run with {} pods failed: {e}", params.pods);
                failed = true;
            }
        }
    }
    drop(dir);
    if failed {
        std::process::exit(1);
    }
}
