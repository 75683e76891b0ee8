//! The `kernel` engine: the compiled rulesets loaded into a real kernel, probed with real
//! packets (DESIGN.md §2, §6).
//!
//! ```text
//!  Cluster ──► compile + render, per node ──► Lab (one netns per node, one per pod;
//!                                                 hostNetwork pods live in their node's)
//!  connections (a matrix: every (family, probe, src, dst) cell)
//!     ──► decided without packets (no such port, no address of the family, src == dst)
//!         or one lab::Probe each ──► one probe_all ──► verdicts ──► Vec<BitMatrix>
//! ```
//!
//! The cell semantics are those of [`matrix::reference_matrix`]: can a NEW connection from
//! pod i to pod j on the probe's port get through. Every destination therefore serves the
//! probed port whatever its containerPorts say (a named probe: the port the name resolves
//! to on that pod). The lab is torn down when this returns, also on error (its `Drop`).
//!
//! hostNetwork pods ("not selectable as policy targets; as peers they are reached by IP
//! only") are processes of their node in the lab: their addresses are the node namespace's,
//! they serve there and their probes leave from there. So the kernel itself shows that
//! "traffic from the node to its own local pods is always allowed" (a node's own packets
//! take the `output` hook, which the ruleset does not hook) and that traffic to a
//! hostNetwork pod is judged by the node's `input` hook. hostNetwork pods of one node may
//! share an address (they are that node); any other shared address is
//! [`KernelError::Unsupported`]: one address cannot be two endpoints in one kernel.
//!
//! Every probed cell is a real connection attempt, so a run is refused up front beyond
//! [`MAX_CELLS`] cells or beyond the kernel's conntrack table (a full table drops new
//! connections, which would read as "blocked"). Narrow such runs with ports/protocols.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use crate::compile::{NodeConfig, compile};
use crate::lab::{self, Lab, LabError, LabNode, LabPod};
use crate::nft::render;
use crate::policy::bitset::{BitMatrix, BitSet};
use crate::policy::evaluate::{Connection, Endpoint};
use crate::policy::matrix::{self, Family};
use crate::policy::model::{Cluster, Protocol};

/// Why the kernel engine could not answer.
#[derive(Debug)]
#[non_exhaustive]
pub enum KernelError {
    /// Network namespaces and nftables need root.
    NotRoot,
    /// Root, but without the capabilities the lab needs (a container without privileges).
    MissingCapabilities(String),
    /// A required program is not installed (`nft` or `ip`).
    MissingTool { tool: &'static str, package: &'static str },
    /// The kernel refused something the lab needs (an nftables expression, a sysctl).
    KernelFeature(String),
    /// The cluster has something the lab cannot build.
    Unsupported(String),
    /// Building, loading or probing the lab failed.
    Lab(LabError),
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelError::NotRoot => f.write_str(
                "the kernel engine needs root (it creates network namespaces and loads nftables rulesets); \
                 run it with sudo, or use --engine evaluator or ruleset",
            ),
            KernelError::MissingCapabilities(what) => write!(
                f,
                "the kernel engine runs as root but lacks {what}; in a container, run it with --privileged \
                 (or --cap-add NET_ADMIN --cap-add SYS_ADMIN)"
            ),
            KernelError::MissingTool { tool, package } => write!(
                f,
                "the kernel engine needs `{tool}` ({package}), which is not installed (or not on PATH); \
                 install it with `apt-get install -y nftables iproute2`"
            ),
            KernelError::KernelFeature(what) => {
                write!(f, "this kernel lacks a feature the kernel engine needs: {what}")
            }
            KernelError::Unsupported(what) => write!(f, "the kernel engine does not support {what}"),
            KernelError::Lab(e) => write!(f, "lab: {}", one_line(&e.to_string())),
        }
    }
}

impl std::error::Error for KernelError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            KernelError::Lab(e) => Some(e),
            _ => None,
        }
    }
}

/// Multi-line tool output (nft points at the offending token on extra lines) as one line.
fn one_line(text: &str) -> String {
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('^')).collect();
    lines.join(" | ")
}

impl From<LabError> for KernelError {
    fn from(e: LabError) -> Self {
        // nft says "Operation not supported" when an expression's module is missing from the
        // kernel. ("No such file or directory" also means a dangling set or chain reference,
        // a compiler bug, so it stays a lab error.)
        if let LabError::Ruleset { node, stderr } = &e
            && stderr.contains("Operation not supported")
        {
            let first = stderr.lines().find(|l| l.contains("Operation not supported")).unwrap_or(stderr).trim();
            return KernelError::KernelFeature(format!(
                "nftables refused node `{node}`'s ruleset ({first}); load the nf_tables modules \
                 (nft_ct, nft_set_hash, nft_set_rbtree, ...) or use a kernel built with them"
            ));
        }
        KernelError::Lab(e)
    }
}

/// The effective uid and effective capability mask of this process, from
/// `/proc/self/status` (`Uid:` real, effective, ...; `CapEff:` hex).
fn identity() -> Option<(u32, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
    let euid = field("Uid:")?.split_whitespace().nth(1)?.parse().ok()?;
    let caps = u64::from_str_radix(field("CapEff:")?, 16).ok()?;
    Some((euid, caps))
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;

/// Root (with CAP_NET_ADMIN and CAP_SYS_ADMIN), network namespaces, `ip` and `nft` on
/// PATH: what [`matrices`] needs before it touches anything. Tools are found through PATH
/// like every other command the lab runs, so a PATH without them is reported here.
pub fn check_prerequisites() -> Result<(), KernelError> {
    check_privileges()?;
    if !std::path::Path::new("/proc/self/ns/net").exists() {
        return Err(KernelError::KernelFeature(
            "network namespaces (/proc/self/ns/net is missing: a kernel without CONFIG_NET_NS)".into(),
        ));
    }
    let runs = |tool: &str, arg: &str| Command::new(tool).arg(arg).output().is_ok_and(|o| o.status.success());
    if !runs("ip", "-V") {
        return Err(KernelError::MissingTool { tool: "ip", package: "iproute2" });
    }
    if !runs("nft", "--version") {
        return Err(KernelError::MissingTool { tool: "nft", package: "nftables" });
    }
    Ok(())
}

/// Effective uid 0 with CAP_NET_ADMIN and CAP_SYS_ADMIN: what creating and deleting network
/// namespaces needs (also `netpol-check lab cleanup`).
pub fn check_privileges() -> Result<(), KernelError> {
    let (euid, caps) = identity().unwrap_or((u32::MAX, 0));
    if euid != 0 {
        return Err(KernelError::NotRoot);
    }
    let missing: Vec<&str> = [(CAP_NET_ADMIN, "CAP_NET_ADMIN"), (CAP_SYS_ADMIN, "CAP_SYS_ADMIN")]
        .into_iter()
        .filter(|(bit, _)| caps & (1 << bit) == 0)
        .map(|(_, name)| name)
        .collect();
    if !missing.is_empty() {
        return Err(KernelError::MissingCapabilities(missing.join(" and ")));
    }
    Ok(())
}

/// One reachability matrix per probe (rows: source pod, columns: destination pod, indices
/// of `cluster.pods`), measured on a real kernel. One lab for all probes; `timeout` bounds
/// each wave of concurrent probes (a blocked probe costs that much once per wave).
pub fn matrices(
    cluster: &Cluster,
    probes: &[matrix::Probe],
    family: Family,
    timeout: Duration,
) -> Result<Vec<BitMatrix>, KernelError> {
    let mut per_family = matrices_per_family(cluster, probes, &[family], timeout)?;
    Ok(per_family.pop().unwrap_or_default())
}

/// Most matrix cells one run probes: each is a real connection attempt (a socket, a
/// conntrack entry), and a blocked one costs a time-out per wave of ~500.
pub const MAX_CELLS: usize = 1_000_000;

/// [`matrices`] for several families at once, from one lab: `result[f][k]` is the matrix
/// of `probes[k]` under `families[f]`.
pub fn matrices_per_family(
    cluster: &Cluster,
    probes: &[matrix::Probe],
    families: &[Family],
    timeout: Duration,
) -> Result<Vec<Vec<BitMatrix>>, KernelError> {
    let n = cluster.pods.len();
    let cells = families.len().saturating_mul(probes.len()).saturating_mul(n.saturating_mul(n));
    if cells > MAX_CELLS {
        return Err(KernelError::Unsupported(format!(
            "{cells} cells ({n} pods² × {} probes × {} families) in one run, at most {MAX_CELLS}: \
             every cell is a real connection; narrow it with --port/--protocol or a smaller input",
            probes.len(),
            families.len()
        )));
    }
    // Every cell, row-major per (family, probe); None: the destination lacks the named port.
    let cells: Vec<Option<Connection>> = families
        .iter()
        .flat_map(|&family| {
            probes.iter().flat_map(move |probe| {
                (0..n).flat_map(move |i| (0..n).map(move |j| matrix::cell_connection(cluster, probe, family, i, j)))
            })
        })
        .collect();
    let connections: Vec<Connection> = cells.iter().flatten().copied().collect();
    let verdicts = decide(cluster, &connections, timeout)?;
    let mut verdicts = verdicts.into_iter();
    let mut allowed = cells.iter().map(|c| c.is_some() && verdicts.next().unwrap_or(false));
    Ok(families
        .iter()
        .map(|_| {
            probes
                .iter()
                .map(|_| {
                    let rows = (0..n)
                        .map(|_| {
                            let mut row = BitSet::empty(n);
                            for j in 0..n {
                                if allowed.next().unwrap_or(false) {
                                    row.insert(j);
                                }
                            }
                            row
                        })
                        .collect();
                    BitMatrix::from_rows(rows)
                })
                .collect()
        })
        .collect())
}

/// Decides connections between pods of `cluster` on a real kernel, one verdict each, from
/// one lab. Both ends must be pods (the lab holds nothing else).
pub fn decide(cluster: &Cluster, connections: &[Connection], timeout: Duration) -> Result<Vec<bool>, KernelError> {
    check_supported(cluster)?;
    check_prerequisites()?;
    let n = cluster.pods.len();

    enum Verdict {
        Fixed(bool),
        Probe(usize),
    }
    let mut serve: Vec<BTreeSet<(u16, Protocol)>> = vec![BTreeSet::new(); n];
    let mut lab_probes = Vec::new();
    let mut families_used = [false; 2];
    let mut verdicts = Vec::with_capacity(connections.len());
    for conn in connections {
        let (i, j) = match (conn.src, conn.dst) {
            (Endpoint::Pod(i), Endpoint::Pod(j)) => (i, j),
            (Endpoint::Ip(ip), _) | (_, Endpoint::Ip(ip)) => {
                return Err(KernelError::Unsupported(format!(
                    "{ip} as an endpoint: the lab holds only the input's pods \
                     (for a hostNetwork pod, name it NAMESPACE/POD)"
                )));
            }
        };
        let has = |k: usize| cluster.pods[k].ip_of_family(conn.ipv6).is_some();
        verdicts.push(if !has(i) || !has(j) {
            Verdict::Fixed(false)
        } else if i == j {
            // "Traffic a pod sends to itself never reaches the node and is not policed."
            Verdict::Fixed(true)
        } else {
            serve[j].insert((conn.port, conn.protocol));
            families_used[usize::from(conn.ipv6)] = true;
            let p = lab::Probe::new(i, j, conn.port, conn.protocol);
            lab_probes.push(if conn.ipv6 { p.v6() } else { p });
            Verdict::Probe(lab_probes.len() - 1)
        });
    }

    // Every allowed probe leaves a conntrack entry in each node namespace it crosses (TCP
    // ones linger in TIME_WAIT), and a full table drops new connections: false "blocked"s.
    if let Some(max) = conntrack_max()
        && lab_probes.len() > max
    {
        return Err(KernelError::Unsupported(format!(
            "{} connections in one run, more than this kernel's conntrack table holds \
             (net.netfilter.nf_conntrack_max = {max}); narrow it with --port/--protocol or raise that sysctl",
            lab_probes.len()
        )));
    }

    let facts = if lab_probes.is_empty() {
        Vec::new()
    } else {
        if families_used[1] && !std::path::Path::new("/proc/sys/net/ipv6").exists() {
            return Err(KernelError::KernelFeature(
                "IPv6 (/proc/sys/net/ipv6 is missing: disabled on the kernel command line?); probe with --family ipv4"
                    .into(),
            ));
        }
        let nodes: Vec<LabNode> = cluster
            .nodes()
            .into_iter()
            .map(|node| {
                let ruleset = render::ruleset(&compile(cluster, &NodeConfig::new(node.clone())));
                LabNode { name: node, ruleset }
            })
            .collect();
        let pods: Vec<LabPod> = cluster
            .pods
            .iter()
            .zip(serve)
            .map(|(p, serve)| LabPod {
                name: p.id.to_string(),
                node: p.node.to_string(),
                // Only the families probed: an IPv4-only run works where IPv6 is disabled.
                ips: p.ips.iter().copied().filter(|ip| families_used[usize::from(ip.is_ipv6())]).collect(),
                serve: serve.into_iter().collect(),
                host_network: p.host_network,
            })
            .collect();
        let lab = Lab::build(&nodes, &pods)?;
        let facts = lab.probe_all(&lab_probes, timeout)?;
        lab.teardown()?;
        facts
    };
    Ok(verdicts
        .into_iter()
        .map(|v| match v {
            Verdict::Fixed(b) => b,
            Verdict::Probe(k) => facts[k],
        })
        .collect())
}

/// The kernel's conntrack table size, when the conntrack module is loaded (it is loaded on
/// the first ruleset otherwise, with the default that depends on memory).
fn conntrack_max() -> Option<usize> {
    std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max").ok()?.trim().parse().ok()
}

/// What the lab cannot model, refused before anything is built: an address held by two
/// endpoints the kernel would have to tell apart.
pub fn check_supported(cluster: &Cluster) -> Result<(), KernelError> {
    let mut owners: HashMap<IpAddr, usize> = HashMap::new();
    for (k, pod) in cluster.pods.iter().enumerate() {
        for ip in &pod.ips {
            let Some(&other) = owners.get(ip) else {
                owners.insert(*ip, k);
                continue;
            };
            let first = &cluster.pods[other];
            // hostNetwork pods of one node that share an address are all that node.
            if first.host_network && pod.host_network && first.node == pod.node {
                continue;
            }
            return Err(KernelError::Unsupported(format!(
                "pods {} and {} sharing address {ip}: one kernel cannot tell them apart \
                 (only hostNetwork pods of the same node may share an address; they are that node)",
                first.id, pod.id
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::{ObjectRef, Pod, Policy};

    fn pod(name: &str, node: &str, ip: &str, host_network: bool) -> Pod {
        Pod {
            id: ObjectRef::new("a", name),
            labels: Default::default(),
            node: node.into(),
            ips: ip.parse::<std::net::IpAddr>().unwrap().into(),
            host_network,
            ports: Default::default(),
        }
    }

    #[test]
    fn nft_output_becomes_one_line_without_its_caret_markers() {
        let stderr = "Error: Could not process rule: Operation not supported\nadd rule x\n    ^^^^^\n";
        assert_eq!(one_line(stderr), "Error: Could not process rule: Operation not supported | add rule x");
    }

    #[test]
    fn an_unsupported_nft_expression_is_reported_as_a_missing_kernel_feature() {
        let e = KernelError::from(LabError::Ruleset {
            node: "n1".into(),
            stderr: "/dev/stdin:3:1-20: Error: Could not process rule: Operation not supported\nx\n^^^".into(),
        });
        let text = e.to_string();
        assert!(matches!(e, KernelError::KernelFeature(_)), "{e:?}");
        assert!(text.contains("node `n1`") && text.contains("nf_tables") && !text.contains('\n'), "{text}");
    }

    #[test]
    fn host_network_pods_of_one_node_may_share_an_address_and_nothing_else_may() {
        let host = |name: &str, node: &str| pod(name, node, "10.0.0.1", true);
        let ok = Cluster::new(vec![], vec![host("h1", "n1"), host("h2", "n1")], Vec::<Policy>::new());
        assert!(check_supported(&ok).is_ok());
        let two_nodes = Cluster::new(vec![], vec![host("h1", "n1"), host("h2", "n2")], Vec::<Policy>::new());
        let e = check_supported(&two_nodes).unwrap_err().to_string();
        assert!(e.contains("a/h1 and a/h2 sharing address 10.0.0.1"), "{e}");
        let with_pod =
            Cluster::new(vec![], vec![host("h1", "n1"), pod("p", "n1", "10.0.0.1", false)], Vec::<Policy>::new());
        assert!(check_supported(&with_pod).is_err());
    }
}
