//! The ruleset engine: every node's compiled ruleset, interpreted packet by packet.
//!
//! ```text
//!  Cluster ──► compile(node) for every node (once) ──► Interpreter per node
//!  connection i → j:
//!    same pod / no address of the family          ──► shortcut (as the evaluator)
//!    hops: node(i) forward  if i is a local (non-hostNetwork) pod, unless j is on node(i)
//!                                                      and is hostNetwork (then node(i) input)
//!          node(j) forward  if j is a pod (input if hostNetwork), unless already visited
//!    (a hostNetwork source sends from its node: `output` is not hooked)
//!  allowed iff every hop accepts
//! ```

use std::collections::BTreeMap;
use std::fmt;

use crate::compile::{NodeConfig, compile};
use crate::nft::interpret::{Fate, Interpreter, Packet, Step};
use crate::nft::ir::{Hook, Ruleset};
use crate::policy::bitset::BitMatrix;
use crate::policy::evaluate::{Connection, Endpoint};
use crate::policy::matrix::{Family, Probe, cell_by_cell};
use crate::policy::model::Cluster;

/// Every node's ruleset (compiled once), ready to decide connections.
pub struct Engine {
    rulesets: BTreeMap<String, Ruleset>,
}

/// A decision with the path the packet took.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trace {
    pub allowed: bool,
    pub lines: Vec<String>,
}

impl fmt::Display for Trace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for l in &self.lines {
            writeln!(f, "{l}")?;
        }
        write!(f, "=> {}", if self.allowed { "allowed" } else { "denied" })
    }
}

impl Engine {
    /// Compiles every node that runs a pod, with the default table.
    pub fn new(cluster: &Cluster) -> Self {
        let rulesets =
            cluster.nodes().into_iter().map(|n| (n.clone(), compile(cluster, &NodeConfig::new(n)))).collect();
        Engine { rulesets }
    }

    /// Decides with the given rulesets, by node (compiled otherwise, e.g. with a narrow
    /// [`crate::compile::naming::Namer`]).
    pub fn from_rulesets(rulesets: BTreeMap<String, Ruleset>) -> Self {
        Engine { rulesets }
    }

    pub fn rulesets(&self) -> &BTreeMap<String, Ruleset> {
        &self.rulesets
    }

    fn interpreters(&self) -> BTreeMap<&str, Interpreter<'_>> {
        self.rulesets.iter().map(|(n, rs)| (n.as_str(), Interpreter::new(rs))).collect()
    }

    /// Decides one connection, with a printable trace.
    pub fn trace(&self, cluster: &Cluster, conn: &Connection) -> Trace {
        let interps = self.interpreters();
        let mut lines = Vec::new();
        let allowed = decide(cluster, &interps, conn, Some(&mut lines));
        Trace { allowed, lines }
    }

    /// The matrix of one probe, with the same cell semantics as `matrix::reference_matrix`.
    pub fn matrix(&self, cluster: &Cluster, probe: &Probe, family: Family) -> BitMatrix {
        let interps = self.interpreters();
        cell_by_cell(cluster, probe, family, |c| decide(cluster, &interps, c, None))
    }
}

/// The ruleset engine's matrix of one probe (compiles each node once).
pub fn matrix(cluster: &Cluster, probe: &Probe, family: Family) -> BitMatrix {
    Engine::new(cluster).matrix(cluster, probe, family)
}

/// One connection through the ruleset engine, as a printable trace (for `--trace`).
pub fn trace(cluster: &Cluster, conn: &Connection) -> Trace {
    Engine::new(cluster).trace(cluster, conn)
}

/// The (node, hook) hops a new connection's first packet goes through.
pub fn hops(cluster: &Cluster, conn: &Connection) -> Vec<(String, Hook)> {
    let mut out: Vec<(String, Hook)> = Vec::new();
    // Where the destination is delivered: a pod's veth is forwarded to, a hostNetwork pod is the node.
    let dst_hop = match conn.dst {
        Endpoint::Pod(j) => {
            let p = &cluster.pods[j];
            Some((p.node.to_string(), if p.host_network { Hook::Input } else { Hook::Forward }))
        }
        Endpoint::Ip(_) => None,
    };
    match conn.src {
        Endpoint::Pod(i) if !cluster.pods[i].host_network => {
            let node = &cluster.pods[i].node;
            match &dst_hop {
                Some((n, hook)) if node == n => out.push((n.clone(), *hook)),
                _ => {
                    out.push((node.to_string(), Hook::Forward));
                    out.extend(dst_hop);
                }
            }
        }
        Endpoint::Pod(i) => {
            // Sent by the node itself (output, not hooked); delivered locally via input, or
            // to a local pod without crossing forward.
            let node = &cluster.pods[i].node;
            match dst_hop {
                Some((n, Hook::Forward)) if *node == n => {}
                other => out.extend(other),
            }
        }
        Endpoint::Ip(_) => out.extend(dst_hop),
    }
    out
}

fn decide(
    cluster: &Cluster,
    interps: &BTreeMap<&str, Interpreter<'_>>,
    conn: &Connection,
    mut lines: Option<&mut Vec<String>>,
) -> bool {
    let (Some(src), Some(dst)) = (conn.ip_of(cluster, conn.src), conn.ip_of(cluster, conn.dst)) else {
        if let Some(l) = lines.as_deref_mut() {
            l.push("no address of the connection's family at one end: nothing is sent".into());
        }
        return false;
    };
    if let (Endpoint::Pod(a), Endpoint::Pod(b)) = (conn.src, conn.dst)
        && a == b
    {
        if let Some(l) = lines.as_deref_mut() {
            l.push("a pod talking to itself never reaches the node: not policed".into());
        }
        return true;
    }
    let pkt = Packet::new(src, dst, conn.protocol.number(), conn.port);
    if let Some(l) = lines.as_deref_mut() {
        l.push(format!("packet {pkt}"));
    }
    let path = hops(cluster, conn);
    if path.is_empty()
        && let Some(l) = lines.as_deref_mut()
    {
        l.push("sent by the node to its own pod: no hooked chain on the path".into());
    }
    for (node, hook) in path {
        let Some(interp) = interps.get(node.as_str()) else {
            continue;
        };
        let mut steps: Option<Vec<Step>> = lines.is_some().then(Vec::new);
        let fate = interp.hook_traced(hook, &pkt, &mut steps);
        if let Some(l) = lines.as_deref_mut() {
            l.push(format!("{node} {}:", hook.as_str()));
            for s in steps.unwrap_or_default() {
                l.push(format!("{}{}", "  ".repeat(s.depth + 1), s.text));
            }
            l.push(format!("  {node} {}: {}", hook.as_str(), if fate == Fate::Accept { "accept" } else { "drop" }));
        }
        if fate == Fate::Drop {
            return false;
        }
    }
    true
}
