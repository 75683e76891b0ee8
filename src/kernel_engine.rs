//! The `kernel` engine: the compiled rulesets loaded into a real kernel, probed with real
//! packets (DESIGN.md §2, §6).
//!
//! ```text
//!  Cluster ──► compile + render, per node ──► Lab (one netns per node, one per pod)
//!  probes × (src, dst) ──► cells: decided without packets (no such port, no address of
//!                          the family, src == dst) or one lab::Probe each
//!                      ──► one probe_all ──► Vec<BitMatrix>, one per probe
//! ```
//!
//! The cell semantics are those of [`matrix::reference_matrix`]: can a NEW connection from
//! pod i to pod j on the probe's port get through. Every destination therefore serves the
//! probed port whatever its containerPorts say (a named probe: the port the name resolves
//! to on that pod). The lab is torn down when this returns, also on error (its `Drop`).

use std::collections::BTreeSet;
use std::fmt;
use std::os::unix::fs::MetadataExt as _;
use std::process::Command;
use std::time::Duration;

use crate::bitset::{BitMatrix, BitSet};
use crate::compile::{NodeConfig, compile};
use crate::lab::{self, Lab, LabError, LabNode, LabPod};
use crate::matrix::{self, Family};
use crate::model::{Cluster, Protocol};
use crate::nft::render;

/// Why the kernel engine could not answer.
#[derive(Debug)]
#[non_exhaustive]
pub enum KernelError {
    /// Network namespaces and nftables need root.
    NotRoot,
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
            KernelError::NotRoot => {
                f.write_str("the kernel engine needs root (it creates network namespaces and loads nftables rulesets)")
            }
            KernelError::MissingTool { tool, package } => write!(
                f,
                "the kernel engine needs `{tool}` ({package}), which is not installed; \
                 install it with `apt-get install -y nftables iproute2`"
            ),
            KernelError::KernelFeature(what) => {
                write!(f, "this kernel lacks a feature the kernel engine needs: {what}")
            }
            KernelError::Unsupported(what) => write!(f, "the kernel engine does not support {what}"),
            KernelError::Lab(e) => write!(f, "lab: {e}"),
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

impl From<LabError> for KernelError {
    fn from(e: LabError) -> Self {
        // nft says "Operation not supported" when an expression's module is missing from the
        // kernel. ("No such file or directory" also means a dangling set or chain reference,
        // a compiler bug, so it stays a lab error.)
        if let LabError::Ruleset { stderr, .. } = &e
            && stderr.contains("Operation not supported")
        {
            return KernelError::KernelFeature(e.to_string());
        }
        KernelError::Lab(e)
    }
}

/// Root, `ip` and `nft`: what [`matrices`] needs before it touches anything.
pub fn check_prerequisites() -> Result<(), KernelError> {
    let root = std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
    if !root {
        return Err(KernelError::NotRoot);
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

/// One reachability matrix per probe (rows: source pod, columns: destination pod, indices
/// of `cluster.pods`), measured on a real kernel. One lab for all probes; `timeout` bounds
/// each wave of concurrent probes (a blocked probe costs that much once per wave).
pub fn matrices(
    cluster: &Cluster,
    probes: &[matrix::Probe],
    family: Family,
    timeout: Duration,
) -> Result<Vec<BitMatrix>, KernelError> {
    if let Some(p) = cluster.pods.iter().find(|p| p.host_network) {
        return Err(KernelError::Unsupported(format!("hostNetwork pods (`{}`)", p.id)));
    }
    check_prerequisites()?;
    let n = cluster.pods.len();

    // Decide what needs packets: per probe and cell (row-major), a fixed verdict or the
    // index of a lab probe.
    enum Cell {
        Fixed(bool),
        Probe(usize),
    }
    let mut serve: Vec<BTreeSet<(u16, Protocol)>> = vec![BTreeSet::new(); n];
    let mut lab_probes = Vec::new();
    let mut cells: Vec<Vec<Cell>> = Vec::with_capacity(probes.len());
    for probe in probes {
        let proto = probe.protocol;
        let mut these = Vec::with_capacity(n * n);
        for i in 0..n {
            for (j, served) in serve.iter_mut().enumerate() {
                let Some(conn) = matrix::cell_connection(cluster, probe, family, i, j) else {
                    these.push(Cell::Fixed(false));
                    continue;
                };
                let has = |k: usize| cluster.pods[k].ip_of_family(conn.ipv6).is_some();
                if !has(i) || !has(j) {
                    these.push(Cell::Fixed(false));
                } else if i == j {
                    // A pod to itself never reaches its node: nothing to enforce.
                    these.push(Cell::Fixed(true));
                } else {
                    served.insert((conn.port, proto));
                    let p = lab::Probe::new(i, j, conn.port, proto);
                    lab_probes.push(if conn.ipv6 { p.v6() } else { p });
                    these.push(Cell::Probe(lab_probes.len() - 1));
                }
            }
        }
        cells.push(these);
    }

    let facts = if lab_probes.is_empty() {
        Vec::new()
    } else {
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
                node: p.node.clone(),
                ips: p.ips.clone(),
                serve: serve.into_iter().collect(),
            })
            .collect();
        let lab = Lab::build(&nodes, &pods)?;
        let facts = lab.probe_all(&lab_probes, timeout)?;
        lab.teardown()?;
        facts
    };

    Ok(cells
        .into_iter()
        .map(|these| {
            let rows = these
                .chunks(n.max(1))
                .take(n)
                .map(|row| {
                    let mut set = BitSet::empty(n);
                    for (j, cell) in row.iter().enumerate() {
                        let allowed = match cell {
                            Cell::Fixed(b) => *b,
                            Cell::Probe(k) => facts[*k],
                        };
                        if allowed {
                            set.insert(j);
                        }
                    }
                    set
                })
                .collect();
            BitMatrix::from_rows(rows)
        })
        .collect())
}
