//! The real-kernel lab: build a cluster's nodes and pods out of throwaway network
//! namespaces, load each node's nftables ruleset with the real `nft`, serve every declared
//! port, probe (source, destination, port, protocol) with real packets, tear down.
//!
//! Pure data in ([`LabSpec`]), facts out (`Vec<bool>`, one per [`Probe`]): a probe is
//! `true` only when the connection was observed to complete (TCP handshake, UDP echo,
//! SCTP INIT seen at the destination), never a guess.
//!
//! # Topology: routed /32s, like Calico
//!
//! ```text
//!  pod ns p0                     node ns n0                  fabric ns (router)      node ns n1
//!  eth0 10.0.0.1/32 ──veth── p0 (ee:ee:ee:ee:ee:ee)
//!  default via 169.254.1.1       10.0.0.1/32 dev p0
//!                                10.0.1.1/32 via .254 ── fab0 ──veth── n0    n1 ──veth── fab0 ...
//!                                                      169.254.100.1   10.0.1.1/32 via .2 dev n1
//! ```
//!
//! A hostNetwork pod is a process of its node: no namespace of its own, its addresses on the
//! node namespace's `lo`, routed to that node by the fabric, served and probed from there.
//!
//! Each pod namespace has one `eth0` whose veth peer lives in its node's namespace. The
//! pod's addresses are /32 and /128; its default routes go to `169.254.1.1` / `fe80::1`,
//! which the node owns (`169.254.1.1` on its `lo`, `fe80::1` on every pod veth): the pod
//! finds them by real ARP and neighbour discovery, and the node finds its pods the same way,
//! as on a real node (so a ruleset that drops solicitations shows). Each node
//! namespace forwards, routes every local pod address to that pod's veth and every remote
//! pod address to the fabric, one extra namespace that routes
//! each pod address to the node that owns it: a routed underlay, like a top-of-rack router.
//!
//! Why routed rather than bridged pods: with routing, *every* pod-to-pod packet crosses the
//! node's `forward` hook as an IP packet, exactly where our ruleset (and Calico) enforce
//! policy. Across nodes a packet crosses the source node's `forward` (egress checks) and
//! the destination node's `forward` (ingress checks); within a node it crosses that node's
//! `forward` once. Bridged pods would need `br_netfilter` (a host-wide switch) to show
//! their traffic to `inet` tables.
//!
//! Why the fabric is a router and not a bridge (measured): a bridge port only starts
//! forwarding when the kernel's link watcher reports its carrier, which is rate limited
//! to once a second; cross-node probes failed for ~1 s after every build. Veth-only paths
//! are up at once. Interface indexes are chosen so no veth shares its peer's index (which
//! would also make the link watcher lag), and `build` waits until every link is
//! operationally up with its qdisc, so no first packet is lost to a half-ready veth. Between
//! nodes and the fabric neighbours are static; between pods and their node ARP and ND are
//! real (measured no slower than static entries, benches/README.md; DAD stays off). A 9-pod,
//! 3-node lab builds in well under 0.2 s.
//!
//! # Safety of the host
//!
//! Lab addresses exist only inside lab namespaces; the root namespace sees only `ip netns
//! add/del`. Veths are created from inside a node namespace with their peer placed
//! directly in the pod or fabric namespace. Sysctls are written from a thread that has
//! entered the namespace and checked that it did (same nsfs inode). Nodes have no default
//! route, so nothing can leave the lab. Every namespace is named
//! `npl-<pid>-<suffix>-{n<i>,p<j>,fab}` (no `p<j>` for a hostNetwork pod) and registered
//! before it is created; [`Lab`]'s
//! `Drop` deletes them (also on error and panic), [`teardown_live_labs`] deletes those of
//! every live lab for a program's Ctrl-C/SIGTERM handler (a signal does not unwind, so no
//! `Drop` runs; the library installs no handler: netpol-check does), and
//! [`cleanup_leftovers`] removes those whose process is gone.
#![forbid(unsafe_code)]

mod netns;
mod probe;
mod sctp;
mod serve;
mod topology;
pub mod traffic;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use topology::{FABRIC_IF, NETNS_PREFIX, POD_IF};

/// Name of the node-side interface of pod `pod` (index in the lab's pods), inside its
/// node's namespace: `p<index>`. Traffic from the fabric arrives on [`FABRIC_IF`].
pub fn node_side_interface(pod: usize) -> String {
    topology::pod_peer_if(pod)
}

/// Layer-4 protocol of a served port or a probe: the model's own [`Protocol`], so callers
/// need no conversion.
///
/// [`Protocol`]: crate::policy::model::Protocol
pub use crate::policy::model::Protocol as L4;

/// Address family of a probe.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, PartialOrd, Ord)]
pub enum Family {
    #[default]
    V4,
    V6,
}

impl Family {
    fn of(ip: &IpAddr) -> Family {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }
}

/// A node: a network namespace that routes for its pods and enforces `ruleset`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabNode {
    pub name: String,
    /// `nft -f` text loaded in the node's namespace in one transaction; empty = none.
    pub ruleset: String,
}

/// A pod: a network namespace with these addresses, serving these ports.
///
/// A hostNetwork pod is a process of its node instead: its addresses are the node
/// namespace's (on `lo`), it serves there and its probes leave from there. Only hostNetwork
/// pods of the same node may share an address (they are all "the node").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabPod {
    /// `namespace/name`, for messages.
    pub name: String,
    /// Name of its [`LabNode`].
    pub node: String,
    pub ips: Vec<IpAddr>,
    pub serve: Vec<(u16, L4)>,
    pub host_network: bool,
}

/// Where a probe goes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[non_exhaustive]
pub enum Endpoint {
    /// The pod at this index of the lab's pods: its first address of the probe's family.
    Pod(usize),
}

/// One question for the kernel: does a new `proto` connection from pod `from` (its first
/// address of `family`) to `to` on `port` get through?
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Probe {
    pub from: usize,
    pub to: Endpoint,
    pub port: u16,
    pub proto: L4,
    pub family: Family,
}

impl Probe {
    /// An IPv4 probe from pod `from` to pod `to`.
    pub fn new(from: usize, to: usize, port: u16, proto: L4) -> Probe {
        Probe { from, to: Endpoint::Pod(to), port, proto, family: Family::V4 }
    }
    /// The same probe over IPv6.
    pub fn v6(self) -> Probe {
        Probe { family: Family::V6, ..self }
    }
}

/// A whole lab run: topology, rulesets (in the nodes), probes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabSpec {
    pub nodes: Vec<LabNode>,
    pub pods: Vec<LabPod>,
    pub probes: Vec<Probe>,
    /// Per probe; every probe of a wave shares one deadline.
    pub timeout: Duration,
}

impl LabSpec {
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(300);
}

/// Why a lab could not be built, loaded or probed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LabError {
    #[error("invalid lab: {0}")]
    Spec(String),
    #[error("invalid probe #{index}: {reason}")]
    Probe { index: usize, reason: String },
    #[error("unknown lab node `{0}`")]
    UnknownNode(String),
    #[error("nft rejected the ruleset of node `{node}`: {stderr}")]
    Ruleset { node: String, stderr: String },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command { command: String, status: String, stderr: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl LabError {
    fn io(context: impl Into<String>, source: std::io::Error) -> LabError {
        LabError::Io { context: context.into(), source }
    }
}

/// How long a build waits for the kernel to bring its veths up (normally a few ms; the
/// link watcher may lag on a loaded machine).
const LINKS_READY_LIMIT: Duration = Duration::from_secs(5);

/// How long a wave's end waits for the serving thread to answer what reached it in time.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(10);

/// Namespaces of live labs, by run id, for a program's Ctrl-C handler.
static LIVE: Mutex<BTreeMap<String, Vec<String>>> = Mutex::new(BTreeMap::new());

fn live() -> std::sync::MutexGuard<'static, BTreeMap<String, Vec<String>>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Delete the namespaces of every lab of this process that is still alive; returns how
/// many labs. For the signal handler of a program that builds labs: a signal does not
/// unwind, so [`Lab`]'s `Drop` does not run. Safe to call from any thread at any time.
pub fn teardown_live_labs() -> usize {
    let mut labs = live();
    let all: Vec<String> = labs.values().flatten().cloned().collect();
    let _ = netns::delete_existing(&all);
    let n = labs.len();
    labs.clear();
    n
}

fn new_run_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    // Fold the clock into 16 bits: two processes that reuse a pid still differ.
    let h = (nanos ^ (nanos >> 16) ^ (nanos >> 32) ^ (nanos >> 48)) as u16;
    format!("{}-{n:x}{h:04x}", std::process::id())
}

struct PodRt {
    name: String,
    ips: Vec<IpAddr>,
}

/// A live lab: namespaces wired, rulesets loaded, ports served. Dropping it tears it down.
pub struct Lab {
    names: topology::Names,
    node_names: Vec<String>,
    pods: Vec<PodRt>,
    namespaces: Vec<String>,
    /// Per pod, where its sockets live: its own namespace, or its node's (hostNetwork).
    pod_netns: Vec<String>,
    server: Option<serve::Server>,
    seen: serve::Seen,
    tags: AtomicU32,
    torn_down: bool,
    build_time: Duration,
}

fn validate(nodes: &[LabNode], pods: &[LabPod]) -> Result<Vec<usize>, LabError> {
    let spec = |m: String| Err(LabError::Spec(m));
    if nodes.len() > topology::MAX_NODES {
        return spec(format!("{} nodes, at most {}", nodes.len(), topology::MAX_NODES));
    }
    let mut node_ix = HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        if node_ix.insert(n.name.as_str(), i).is_some() {
            return spec(format!("node `{}` declared twice", n.name));
        }
    }
    let mut owners: HashMap<IpAddr, &LabPod> = HashMap::new();
    let mut pod_names = HashSet::new();
    let mut placement = Vec::with_capacity(pods.len());
    for p in pods {
        if !pod_names.insert(p.name.as_str()) {
            return spec(format!("pod `{}` declared twice", p.name));
        }
        let Some(&node) = node_ix.get(p.node.as_str()) else {
            return spec(format!("pod `{}` is on unknown node `{}`", p.name, p.node));
        };
        placement.push(node);
        for ip in &p.ips {
            if topology::reserved(*ip) {
                return spec(format!(
                    "pod `{}` has address {ip}, which the lab cannot give a pod \
                     (link-local, loopback, multicast, unspecified or the lab fabric fd00:fab::/64)",
                    p.name
                ));
            }
            if let Some(other) = owners.insert(*ip, p) {
                let both_the_node = other.host_network && p.host_network && other.node == p.node;
                if !both_the_node {
                    return spec(format!(
                        "pods `{}` and `{}` share address {ip} (only hostNetwork pods of one node may)",
                        other.name, p.name
                    ));
                }
            }
        }
        if let Some((port, _)) = p.serve.iter().find(|(port, _)| *port == 0) {
            return spec(format!("pod `{}` serves port {port}", p.name));
        }
    }
    Ok(placement)
}

impl Lab {
    /// Build the namespaces for `nodes` and `pods`, load every node's ruleset, start
    /// serving. On any error everything created so far is removed.
    pub fn build(nodes: &[LabNode], pods: &[LabPod]) -> Result<Lab, LabError> {
        let started = Instant::now();
        let placement = validate(nodes, pods)?;
        let names = topology::Names::new(new_run_id());
        let wiring: Vec<topology::PodWiring> = pods
            .iter()
            .zip(&placement)
            .map(|(p, &node)| topology::PodWiring { node, ips: p.ips.clone(), host_network: p.host_network })
            .collect();
        let plan = topology::Plan::new(&names, nodes.len(), &wiring);
        // Register before creating, so an interrupt mid-build removes what exists.
        live().insert(names.run_id().to_owned(), plan.namespaces.clone());
        let seed = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos())
            ^ std::process::id().rotate_left(16);
        let mut lab = Lab {
            names,
            node_names: nodes.iter().map(|n| n.name.clone()).collect(),
            pods: pods.iter().map(|p| PodRt { name: p.name.clone(), ips: p.ips.clone() }).collect(),
            namespaces: plan.namespaces.clone(),
            pod_netns: plan.pod_netns.clone(),
            server: None,
            seen: Arc::default(),
            tags: AtomicU32::new(seed | 1),
            torn_down: false,
            build_time: Duration::ZERO,
        };

        netns::add_namespaces(&plan.namespaces)?;
        let sysctl_jobs: Vec<(String, &[(&str, &str)])> = (0..nodes.len())
            .map(|i| (lab.names.node(i), topology::NODE_SYSCTLS))
            .chain(
                pods.iter()
                    .enumerate()
                    .filter(|(_, p)| !p.host_network)
                    .map(|(j, _)| (lab.names.pod(j), topology::POD_SYSCTLS)),
            )
            .chain([(lab.names.fabric(), topology::FABRIC_SYSCTLS)])
            .collect();
        std::thread::scope(|s| {
            let jobs: Vec<_> =
                sysctl_jobs.iter().map(|(ns, values)| (ns, s.spawn(move || netns::sysctls(ns, values)))).collect();
            jobs.into_iter().try_for_each(|(ns, job)| {
                job.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("sysctl thread panicked")))
                    .map_err(|e| LabError::io(format!("configuring {ns}"), e))
            })
        })?;
        netns::ip_batches(&plan.nodes)?;
        netns::ip_batches(&plan.ends)?;
        netns::wait_links_ready(&plan.namespaces, LINKS_READY_LIMIT)?;
        for node in nodes {
            lab.load_ruleset(&node.name, &node.ruleset)?;
        }
        // Per (namespace, address), what the pods holding it serve.
        let mut services: Vec<serve::AddressService<'_>> = Vec::new();
        for (j, p) in pods.iter().enumerate() {
            for &ip in &p.ips {
                let netns = lab.pod_netns[j].as_str();
                match services.iter_mut().find(|s| s.netns == netns && s.ip == ip) {
                    Some(s) => s.serve.extend(&p.serve),
                    None => services.push(serve::AddressService { netns, ip, serve: p.serve.clone() }),
                }
            }
        }
        let server = serve::Server::start(&services, lab.seen.clone())
            .map_err(|e| LabError::io("starting the lab's servers", e))?;
        lab.server = Some(server);
        lab.build_time = started.elapsed();
        Ok(lab)
    }

    /// This run's id (the `<pid>-<suffix>` part of its namespace names).
    pub fn run_id(&self) -> &str {
        self.names.run_id()
    }

    /// Every namespace of this lab.
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// The namespace of the node called `node`.
    pub fn node_netns(&self, node: &str) -> Option<String> {
        self.node_names.iter().position(|n| n == node).map(|i| self.names.node(i))
    }

    /// The namespace of pod `index`: its own, or its node's for a hostNetwork pod.
    pub fn pod_netns(&self, index: usize) -> Option<String> {
        self.pod_netns.get(index).cloned()
    }

    /// How long [`Lab::build`] took.
    pub fn build_time(&self) -> Duration {
        self.build_time
    }

    /// Load `nft_text` in node `node`'s namespace, one transaction (`nft -f -` under `ip
    /// netns exec`). Empty (blank) text loads nothing.
    pub fn load_ruleset(&self, node: &str, nft_text: &str) -> Result<(), LabError> {
        let ns = self.node_netns(node).ok_or_else(|| LabError::UnknownNode(node.to_owned()))?;
        if nft_text.trim().is_empty() {
            return Ok(());
        }
        netns::nft_load(&ns, nft_text).map_err(|e| match e {
            LabError::Command { stderr, .. } => LabError::Ruleset { node: node.to_owned(), stderr },
            e => e,
        })
    }

    fn resolve(&self, index: usize, p: &Probe) -> Result<probe::Resolved, LabError> {
        let bad = |reason: String| LabError::Probe { index, reason };
        let Endpoint::Pod(to) = p.to;
        let pick = |pod: usize, role: &str| -> Result<IpAddr, LabError> {
            let rt = self.pods.get(pod).ok_or_else(|| bad(format!("{role} pod #{pod} does not exist")))?;
            rt.ips
                .iter()
                .copied()
                .find(|ip| Family::of(ip) == p.family)
                .ok_or_else(|| bad(format!("{role} pod `{}` has no {:?} address", rt.name, p.family)))
        };
        if p.port == 0 {
            return Err(bad("port 0".into()));
        }
        Ok(probe::Resolved {
            src_pod: p.from,
            src: pick(p.from, "source")?,
            dst: pick(to, "destination")?,
            port: p.port,
            proto: p.proto,
        })
    }

    /// Probe everything concurrently; one fact per probe, in order. Probes run in waves
    /// sized to the open-file limit, each wave bounded by one `timeout`.
    pub fn probe_all(&self, probes: &[Probe], timeout: Duration) -> Result<Vec<bool>, LabError> {
        let resolved: Vec<probe::Resolved> =
            probes.iter().enumerate().map(|(i, p)| self.resolve(i, p)).collect::<Result<_, _>>()?;
        let mut out = Vec::with_capacity(resolved.len());
        let ns_of = |pod: usize| self.pod_netns[pod].clone();
        let catch_up = || {
            if let Some(server) = &self.server
                && !server.catch_up(CATCH_UP_LIMIT)
            {
                eprintln!("netpol lab {}: the serving thread did not catch up in {CATCH_UP_LIMIT:?}", self.run_id());
            }
        };
        for chunk in resolved.chunks(wave_size()) {
            let facts = probe::wave(chunk, &ns_of, timeout, &self.seen, &self.tags, &catch_up)
                .map_err(|e| LabError::io("probing", e))?;
            out.extend(facts);
        }
        Ok(out)
    }

    /// Tear down now and report failure (dropping does the same, silently).
    pub fn teardown(mut self) -> Result<(), LabError> {
        self.teardown_inner()
    }

    fn teardown_inner(&mut self) -> Result<(), LabError> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        if let Some(mut s) = self.server.take() {
            s.stop();
        }
        let result = netns::delete_existing(&self.namespaces);
        live().remove(self.names.run_id());
        result
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = self.teardown_inner() {
            eprintln!("netpol lab {}: teardown: {e}", self.names.run_id());
        }
    }
}

/// Most probes in one wave. Every blocked probe of a wave costs the wave's one time-out, so
/// fewer, larger waves are faster (benches/README.md); `poll` over 8 192 sockets stays cheap.
const MAX_WAVE: usize = 8192;

/// How many probes one wave may hold: each TCP/UDP probe is one open file.
fn wave_size() -> usize {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    // Raise the soft open-file limit to the hard one, once per process, as Go's runtime
    // does for every program: the common soft default of 1 024 would cut waves to ~480,
    // each paying a whole time-out.
    static RAISE: Once = Once::new();
    RAISE.call_once(|| {
        if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
            && soft < hard
        {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard.min(1 << 20), hard);
        }
    });
    let soft = getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft);
    let open = std::fs::read_dir("/proc/self/fd").map_or(64, |d| d.count() as u64);
    let free = soft.saturating_sub(open + 64);
    usize::try_from(free / 2).unwrap_or(usize::MAX).clamp(16, MAX_WAVE)
}

/// Build the lab, probe, tear down (also on error).
pub fn run(spec: &LabSpec) -> Result<Vec<bool>, LabError> {
    let lab = Lab::build(&spec.nodes, &spec.pods)?;
    let facts = lab.probe_all(&spec.probes, spec.timeout);
    lab.teardown()?;
    facts
}

/// The `npl-*` namespaces left by lab runs whose process is gone (the pid in the name no
/// longer exists), sorted. Namespaces of live processes are never listed.
pub fn leftovers() -> Result<Vec<String>, LabError> {
    Ok(netns::list()
        .map_err(|e| LabError::io(format!("listing {}", netns::NETNS_DIR), e))?
        .into_iter()
        .filter(|n| topology::owner_pid(n).is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists()))
        .collect())
}

/// Remove the [`leftovers`] of crashed runs; returns their names. Namespaces of live
/// processes (other concurrent runs, this one) are left alone.
pub fn cleanup_leftovers() -> Result<Vec<String>, LabError> {
    let stale = leftovers()?;
    netns::delete_namespaces(&stale)?;
    Ok(stale)
}

/// Names of all lab namespaces (`npl-*`) currently present, of any run.
pub fn lab_namespaces() -> Result<Vec<String>, LabError> {
    Ok(netns::list()
        .map_err(|e| LabError::io(format!("listing {}", netns::NETNS_DIR), e))?
        .into_iter()
        .filter(|n| n.starts_with(NETNS_PREFIX))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, node: &str, ips: &[&str]) -> LabPod {
        LabPod {
            name: name.into(),
            node: node.into(),
            ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            serve: vec![(80, L4::Tcp)],
            host_network: false,
        }
    }

    fn node(name: &str) -> LabNode {
        LabNode { name: name.into(), ruleset: String::new() }
    }

    #[test]
    fn pods_are_placed_on_their_nodes_by_index() {
        let pods = [pod("a/x", "n2", &["10.0.0.1"]), pod("a/y", "n1", &["10.0.0.2"])];
        assert_eq!(validate(&[node("n1"), node("n2")], &pods).unwrap(), vec![1, 0]);
    }

    #[test]
    fn a_spec_the_lab_cannot_build_is_refused_before_anything_is_created() {
        let nodes = [node("n1")];
        let err = |pods: &[LabPod]| validate(&nodes, pods).unwrap_err().to_string();
        assert!(err(&[pod("a/x", "n9", &[])]).contains("unknown node `n9`"));
        assert!(
            err(&[pod("a/x", "n1", &["10.0.0.1"]), pod("a/y", "n1", &["10.0.0.1"])]).contains("share address 10.0.0.1")
        );
        assert!(err(&[pod("a/x", "n1", &["169.254.1.1"])]).contains("cannot give a pod"));
        let host = |name: &str, node: &str| LabPod { host_network: true, ..pod(name, node, &["10.0.0.1"]) };
        let two_nodes = [node("n1"), node("n2")];
        assert!(validate(&two_nodes, &[host("a/x", "n1"), host("a/y", "n1")]).is_ok(), "both are node n1");
        let e = validate(&two_nodes, &[host("a/x", "n1"), host("a/y", "n2")]).unwrap_err().to_string();
        assert!(e.contains("share address 10.0.0.1"), "{e}");
        assert!(err(&[host("a/x", "n1"), pod("a/y", "n1", &["10.0.0.1"])]).contains("share address"));
        assert!(err(&[pod("a/x", "n1", &[]), pod("a/x", "n1", &[])]).contains("declared twice"));
        assert!(validate(&[node("n1"), node("n1")], &[]).is_err());
    }

    #[test]
    fn run_ids_differ_within_one_process_and_carry_its_pid() {
        let (a, b) = (new_run_id(), new_run_id());
        assert_ne!(a, b);
        let pid = std::process::id();
        assert_eq!(topology::owner_pid(&topology::Names::new(a).pod(0)), Some(pid));
    }
}
