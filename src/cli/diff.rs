//! `netpol-check diff OLD NEW`: every cell whose verdict changes between two inputs, grouped
//! by the change of objects that causes it. Pure: the binary loads both sides.
//!
//! ```text
//!  old Cluster, new Cluster ──► changes: NetworkPolicies, cluster policies, namespaces, pods, nodes
//!        │                                      (added / removed / modified)
//!        ├─► common pods (in both, by namespace/name), probes, one family
//!        ├─► matrix::Index per side ──► cells whose verdict differs
//!        └─► per changed cell: evaluate on both sides ──► the policies each explanation names
//!              ∩ the changed policies = the cause (checked: the old cluster with only those
//!              policies changed gives the new verdict); otherwise the changed endpoints,
//!              their namespaces, the nodes ──► Report ──► text | JSON
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde_json::{Value, json};

use crate::cli::report::{describe_side, describe_verdict};
use crate::engines::verify::family_name;
use crate::policy::evaluate::{self, Decision, SideVerdict, Verdict};
use crate::policy::matrix::{self, Family, Index, Probe, ProbePort};
use crate::policy::model::{Cluster, ObjectRef};

/// What kind of object changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKind {
    NetworkPolicy,
    ClusterPolicy,
    Namespace,
    Pod,
    Node,
}

impl ObjectKind {
    fn as_str(self) -> &'static str {
        match self {
            ObjectKind::NetworkPolicy => "NetworkPolicy",
            ObjectKind::ClusterPolicy => "ClusterPolicy",
            ObjectKind::Namespace => "Namespace",
            ObjectKind::Pod => "Pod",
            ObjectKind::Node => "Node",
        }
    }
}

/// How an object changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChangeKind {
    Added,
    Removed,
    /// A policy's spec, or a node's labels/addresses.
    Modified,
    /// A namespace's or pod's labels.
    Relabelled,
    /// A pod's addresses, node, ports or hostNetwork (its labels unchanged).
    Moved,
}

impl ChangeKind {
    fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Added => "added",
            ChangeKind::Removed => "removed",
            ChangeKind::Modified => "modified",
            ChangeKind::Relabelled => "relabelled",
            ChangeKind::Moved => "changed (addresses, node, ports or hostNetwork)",
        }
    }

    fn json_name(self) -> &'static str {
        match self {
            ChangeKind::Moved => "changed",
            other => other.as_str(),
        }
    }
}

/// One object that differs between the two inputs. `name` is `namespace/name` for
/// namespaced objects, `Kind name` for cluster policies (their kind is part of their name).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Change {
    pub kind: ObjectKind,
    pub name: String,
    pub change: ChangeKind,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            // "ClusterNetworkPolicy tenant-isolation modified": the kind is in the name.
            ObjectKind::ClusterPolicy => write!(f, "{} {}", self.name, self.change.as_str()),
            kind => write!(f, "{} {} {}", kind.as_str(), self.name, self.change.as_str()),
        }
    }
}

impl Change {
    fn to_json(&self) -> Value {
        json!({"kind": self.kind.as_str(), "name": self.name, "change": self.change.json_name()})
    }
}

/// Every object that differs between `old` and `new`, sorted by kind then name.
pub fn changes(old: &Cluster, new: &Cluster) -> Vec<Change> {
    let mut out = Vec::new();
    let mut compare = |kind: ObjectKind, a: BTreeMap<String, ChangeSig>, b: BTreeMap<String, ChangeSig>| {
        for (name, before) in &a {
            match b.get(name) {
                None => out.push(Change { kind, name: name.clone(), change: ChangeKind::Removed }),
                Some(after) if after != before => {
                    let change = if after.labels != before.labels { ChangeKind::Relabelled } else { after.rest_kind };
                    let change =
                        if matches!(kind, ObjectKind::NetworkPolicy | ObjectKind::ClusterPolicy | ObjectKind::Node) {
                            ChangeKind::Modified
                        } else {
                            change
                        };
                    out.push(Change { kind, name: name.clone(), change });
                }
                Some(_) => {}
            }
        }
        for name in b.keys().filter(|n| !a.contains_key(*n)) {
            out.push(Change { kind, name: name.clone(), change: ChangeKind::Added });
        }
    };
    compare(ObjectKind::NetworkPolicy, policy_sigs(old), policy_sigs(new));
    compare(ObjectKind::ClusterPolicy, cluster_policy_sigs(old), cluster_policy_sigs(new));
    compare(ObjectKind::Namespace, namespace_sigs(old), namespace_sigs(new));
    compare(ObjectKind::Pod, pod_sigs(old), pod_sigs(new));
    compare(ObjectKind::Node, node_sigs(old), node_sigs(new));
    out.sort();
    out
}

/// What is compared of an object: its labels apart (relabelled), the rest as text.
#[derive(PartialEq, Eq)]
struct ChangeSig {
    labels: String,
    rest: String,
    rest_kind: ChangeKind,
}

fn sig(labels: String, rest: String, rest_kind: ChangeKind) -> ChangeSig {
    ChangeSig { labels, rest, rest_kind }
}

fn policy_sigs(c: &Cluster) -> BTreeMap<String, ChangeSig> {
    c.policies.iter().map(|p| (p.id.to_string(), sig(String::new(), format!("{p:?}"), ChangeKind::Modified))).collect()
}

fn cluster_policy_sigs(c: &Cluster) -> BTreeMap<String, ChangeSig> {
    c.cluster_policies
        .iter()
        .map(|p| (p.id.to_string(), sig(String::new(), format!("{p:?}"), ChangeKind::Modified)))
        .collect()
}

fn namespace_sigs(c: &Cluster) -> BTreeMap<String, ChangeSig> {
    c.namespaces
        .values()
        .map(|ns| (ns.name.clone(), sig(format!("{:?}", ns.labels), String::new(), ChangeKind::Relabelled)))
        .collect()
}

fn pod_sigs(c: &Cluster) -> BTreeMap<String, ChangeSig> {
    c.pods
        .iter()
        .map(|p| {
            let rest = format!("{:?} {:?} {} {:?}", p.ips, p.node, p.host_network, p.ports);
            (p.id.to_string(), sig(format!("{:?}", p.labels), rest, ChangeKind::Moved))
        })
        .collect()
}

fn node_sigs(c: &Cluster) -> BTreeMap<String, ChangeSig> {
    c.nodes.iter().map(|n| (n.name.clone(), sig(String::new(), format!("{n:?}"), ChangeKind::Modified))).collect()
}

/// One cell whose verdict changed.
#[derive(Clone, Debug)]
pub struct ChangedCell {
    pub probe: usize,
    /// `namespace/name` of both ends (present on both sides).
    pub from: ObjectRef,
    pub to: ObjectRef,
    /// Each side's pod indices and verdict (`None`: no connection, a named port the
    /// destination does not declare: denied).
    pub before: Option<(evaluate::Connection, Verdict)>,
    pub after: Option<(evaluate::Connection, Verdict)>,
    pub allowed_before: bool,
    pub allowed_after: bool,
}

/// The changed cells that one set of changes explains.
#[derive(Clone, Debug)]
pub struct Group {
    /// The changes that explain every cell of the group, sorted; empty when no change of
    /// the input explains them (should not happen; shown as such rather than guessed).
    pub causes: Vec<Change>,
    pub cells: Vec<ChangedCell>,
}

/// Everything one diff compared, and what changed.
#[derive(Clone, Debug)]
pub struct Report {
    pub family: Family,
    pub probes: Vec<Probe>,
    /// Pods present on both sides, sorted: the rows and columns compared.
    pub common_pods: Vec<ObjectRef>,
    pub only_old: Vec<ObjectRef>,
    pub only_new: Vec<ObjectRef>,
    pub changes: Vec<Change>,
    /// probes × common pods².
    pub cells: usize,
    pub groups: Vec<Group>,
}

/// The probes of a diff by default: those of either side.
pub fn default_probes(old: &Cluster, new: &Cluster) -> Vec<Probe> {
    let mut probes = matrix::default_probes(old);
    probes.extend(matrix::default_probes(new));
    probes.sort();
    probes.dedup();
    probes
}

/// Compares `old` and `new` on `probes` in `family`.
pub fn diff(old: &Cluster, new: &Cluster, probes: Vec<Probe>, family: Family) -> Report {
    let old_ids: BTreeSet<&ObjectRef> = old.pods.iter().map(|p| &p.id).collect();
    let new_ids: BTreeSet<&ObjectRef> = new.pods.iter().map(|p| &p.id).collect();
    let common: Vec<ObjectRef> = old_ids.intersection(&new_ids).map(|&id| id.clone()).collect();
    let only_old = old_ids.difference(&new_ids).map(|&id| id.clone()).collect();
    let only_new = new_ids.difference(&old_ids).map(|&id| id.clone()).collect();
    let keep_old: Vec<usize> = common.iter().map(|id| old.pod_index(id).expect("common")).collect();
    let keep_new: Vec<usize> = common.iter().map(|id| new.pod_index(id).expect("common")).collect();
    let changes = changes(old, new);
    let (index_old, index_new) = (Index::new(old, family), Index::new(new, family));
    let mut by_cause: BTreeMap<Vec<Change>, Vec<ChangedCell>> = BTreeMap::new();
    let mut attribution = Attribution {
        old,
        new,
        changes: &changes,
        family,
        objects_only: with_objects_of(old, new),
        hybrids: BTreeMap::new(),
    };
    for (k, probe) in probes.iter().enumerate() {
        let (a, b) = (index_old.matrix(probe).project(&keep_old), index_new.matrix(probe).project(&keep_new));
        for i in 0..common.len() {
            if a.row(i) == b.row(i) {
                continue;
            }
            for j in (0..common.len()).filter(|&j| a.get(i, j) != b.get(i, j)) {
                let cell_of = |c: &Cluster, src: usize, dst: usize| {
                    matrix::cell_connection(c, probe, family, src, dst).map(|conn| {
                        let v = evaluate::evaluate(c, &conn);
                        (conn, v)
                    })
                };
                let cell = ChangedCell {
                    probe: k,
                    from: common[i].clone(),
                    to: common[j].clone(),
                    before: cell_of(old, keep_old[i], keep_old[j]),
                    after: cell_of(new, keep_new[i], keep_new[j]),
                    allowed_before: a.get(i, j),
                    allowed_after: b.get(i, j),
                };
                let causes = causes(&mut attribution, &cell, probe);
                by_cause.entry(causes).or_default().push(cell);
            }
        }
    }
    let cells = probes.len() * common.len() * common.len();
    let groups = by_cause.into_iter().map(|(causes, cells)| Group { causes, cells }).collect();
    Report { family, probes, common_pods: common, only_old, only_new, changes, cells, groups }
}

/// The policies a verdict's explanation names, as changes' names: those isolating or
/// deciding either side, and the cluster rules that passed it on.
fn named_policies(cluster: &Cluster, verdict: &Verdict) -> BTreeSet<(ObjectKind, String)> {
    let mut out = BTreeSet::new();
    let mut side = |s: &SideVerdict| {
        for &i in &s.isolated_by {
            out.insert((ObjectKind::NetworkPolicy, cluster.policies[i].id.to_string()));
        }
        match &s.decision {
            Decision::Allowed(m) => {
                out.insert((ObjectKind::NetworkPolicy, cluster.policies[m.policy].id.to_string()));
            }
            Decision::Cluster(m) => {
                out.insert((ObjectKind::ClusterPolicy, cluster.cluster_policies[m.policy].id.to_string()));
            }
            _ => {}
        }
        for m in &s.passed {
            out.insert((ObjectKind::ClusterPolicy, cluster.cluster_policies[m.policy].id.to_string()));
        }
    };
    side(&verdict.egress);
    side(&verdict.ingress);
    out
}

/// What attributing cells to changes needs, built once per diff.
struct Attribution<'a> {
    old: &'a Cluster,
    new: &'a Cluster,
    changes: &'a [Change],
    family: Family,
    /// The new objects under the old policies.
    objects_only: Cluster,
    /// The old cluster with some changed policies as they are in the new one, by the changes.
    hybrids: BTreeMap<Vec<Change>, Cluster>,
}

/// The changes that explain one cell. First the changed policies that either explanation
/// names: they are the cause when the old cluster with only them changed already gives the
/// new verdict. Then the changed ends of the cell, their namespaces and the changed nodes:
/// the cause when the new objects under the old policies give the new verdict. Otherwise
/// both together.
fn causes(a: &mut Attribution, cell: &ChangedCell, probe: &Probe) -> Vec<Change> {
    let Attribution { old, new, changes, family, objects_only, hybrids } = a;
    let (old, new, changes, family, objects_only) = (*old, *new, *changes, *family, &*objects_only);
    let mut named = BTreeSet::new();
    if let Some((_, v)) = &cell.before {
        named.extend(named_policies(old, v));
    }
    if let Some((_, v)) = &cell.after {
        named.extend(named_policies(new, v));
    }
    let policies: Vec<Change> = changes
        .iter()
        .filter(|c| matches!(c.kind, ObjectKind::NetworkPolicy | ObjectKind::ClusterPolicy))
        .filter(|c| named.contains(&(c.kind, c.name.clone())))
        .cloned()
        .collect();
    let allowed_in = |c: &Cluster| {
        let (Some(src), Some(dst)) = (c.pod_index(&cell.from), c.pod_index(&cell.to)) else { return false };
        matrix::cell_connection(c, probe, family, src, dst).is_some_and(|conn| evaluate::evaluate(c, &conn).allowed)
    };
    if !policies.is_empty() {
        let hybrid = hybrids.entry(policies.clone()).or_insert_with(|| with_policies_of(old, new, &policies));
        if allowed_in(hybrid) == cell.allowed_after {
            return policies;
        }
    }
    // The changes of pods, namespaces and nodes: those of the cell's ends, their
    // namespaces, and the nodes (what `nodes` peers and node shortcuts read).
    let namespaces = [&cell.from.namespace, &cell.to.namespace];
    let pods = [cell.from.to_string(), cell.to.to_string()];
    let mut objects: Vec<Change> = changes
        .iter()
        .filter(|c| match c.kind {
            ObjectKind::Pod => pods.contains(&c.name),
            ObjectKind::Namespace => namespaces.contains(&&c.name),
            ObjectKind::Node => true,
            _ => false,
        })
        .cloned()
        .collect();
    if objects.is_empty() {
        // A pod elsewhere (its address in an ipBlock): every change that is no policy's.
        objects = changes
            .iter()
            .filter(|c| !matches!(c.kind, ObjectKind::NetworkPolicy | ObjectKind::ClusterPolicy))
            .cloned()
            .collect();
    }
    // Those changes alone (the new objects under the old policies) give the new verdict.
    if !objects.is_empty() && allowed_in(objects_only) == cell.allowed_after {
        return objects;
    }
    let mut out = policies;
    out.extend(objects);
    if out.is_empty() {
        // Nothing named or near explains it: every change is shown rather than a guess.
        out = changes.to_vec();
    }
    out.sort();
    out.dedup();
    out
}

/// `new`'s namespaces, pods and nodes under `old`'s policies: the object changes alone.
fn with_objects_of(old: &Cluster, new: &Cluster) -> Cluster {
    Cluster::new(new.namespaces.values().cloned().collect(), new.pods.iter().cloned(), old.policies.iter().cloned())
        .with_tiers(old.cluster_policies.iter().cloned(), new.nodes.to_vec(), (*new.domains).clone())
}

/// `old` with the named policies as they are in `new` (added, removed or modified).
fn with_policies_of(old: &Cluster, new: &Cluster, policies: &[Change]) -> Cluster {
    let named = |kind: ObjectKind, name: String| policies.iter().any(|c| c.kind == kind && c.name == name);
    let mut nps: Vec<_> =
        old.policies.iter().filter(|p| !named(ObjectKind::NetworkPolicy, p.id.to_string())).cloned().collect();
    nps.extend(new.policies.iter().filter(|p| named(ObjectKind::NetworkPolicy, p.id.to_string())).cloned());
    let mut cps: Vec<_> =
        old.cluster_policies.iter().filter(|p| !named(ObjectKind::ClusterPolicy, p.id.to_string())).cloned().collect();
    cps.extend(new.cluster_policies.iter().filter(|p| named(ObjectKind::ClusterPolicy, p.id.to_string())).cloned());
    Cluster::new(old.namespaces.values().cloned().collect(), old.pods.iter().cloned(), nps).with_tiers(
        cps,
        old.nodes.to_vec(),
        (*old.domains).clone(),
    )
}

fn verdict_word(allowed: bool) -> &'static str {
    if allowed { "allowed" } else { "denied" }
}

impl Report {
    pub fn changed_cells(&self) -> usize {
        self.groups.iter().map(|g| g.cells.len()).sum()
    }

    /// Whether no cell changes: the exit code's question.
    pub fn unchanged(&self) -> bool {
        self.groups.is_empty()
    }

    /// One line: what was compared and how many cells changed.
    pub fn summary(&self) -> String {
        let scope = format!(
            "{} cells ({} probes × {} × {} common pods²)",
            self.cells,
            self.probes.len(),
            family_name(self.family),
            self.common_pods.len()
        );
        if self.unchanged() {
            format!("diff: no cell changes of {scope}; {} objects changed", self.changes.len())
        } else {
            format!(
                "diff: {} of {scope} change, in {} groups; {} objects changed",
                self.changed_cells(),
                self.groups.len(),
                self.changes.len()
            )
        }
    }

    /// "TCP/80 tenant-a/debug -> tenant-a/backend-1 (port 80): denied -> allowed".
    fn cell_line(&self, cell: &ChangedCell) -> String {
        let probe = &self.probes[cell.probe];
        let port = match (&probe.port, &cell.after, &cell.before) {
            (ProbePort::Named(_), Some((conn, _)), _) | (ProbePort::Named(_), None, Some((conn, _))) => {
                format!(" (port {})", conn.port)
            }
            _ => String::new(),
        };
        format!(
            "{probe} {} -> {}{port}: {} -> {}",
            cell.from,
            cell.to,
            verdict_word(cell.allowed_before),
            verdict_word(cell.allowed_after)
        )
    }

    /// Why a side of the cell decided as it did, in `cluster`: the explanation's lines of
    /// the sides whose answer changed (all of it for a shortcut or a missing named port).
    fn why(
        cluster: &Cluster,
        probe: &Probe,
        side: &Option<(evaluate::Connection, Verdict)>,
        other: &Option<(evaluate::Connection, Verdict)>,
    ) -> Vec<String> {
        let Some((conn, v)) = side else {
            return vec![format!("the destination declares no port named {} ({}): denied", probe.port, probe.protocol)];
        };
        if v.shortcut.is_some() {
            return describe_verdict(cluster, conn, v).into_iter().skip(1).collect();
        }
        let mut lines = Vec::new();
        for (s, o) in
            [(&v.egress, other.as_ref().map(|(_, w)| &w.egress)), (&v.ingress, other.as_ref().map(|(_, w)| &w.ingress))]
        {
            let differs = o.is_none_or(|o| {
                o.allows() != s.allows() || o.decision != s.decision || o.isolated_by.len() != s.isolated_by.len()
            });
            if differs {
                lines.extend(describe_side(cluster, conn, s));
            }
        }
        if lines.is_empty() {
            lines = describe_verdict(cluster, conn, v).into_iter().skip(1).collect();
        }
        lines
    }

    /// The text form: objects only on one side, then each group under its causes, each
    /// cell with the explanations before and after, then the summary line.
    pub fn text(&self, old: &Cluster, new: &Cluster) -> String {
        let mut out = String::new();
        if !self.only_old.is_empty() {
            out += &format!("pods only in OLD (not compared): {}\n", join(&self.only_old));
        }
        if !self.only_new.is_empty() {
            out += &format!("pods only in NEW (not compared): {}\n", join(&self.only_new));
        }
        for g in &self.groups {
            if !out.is_empty() {
                out.push('\n');
            }
            let causes: Vec<String> = g.causes.iter().map(ToString::to_string).collect();
            let causes = if causes.is_empty() { "no change of the input".to_string() } else { causes.join(", ") };
            out += &format!("{} cells change because: {causes}\n", g.cells.len());
            for cell in &g.cells {
                let probe = &self.probes[cell.probe];
                out += &format!("  {}\n", self.cell_line(cell));
                for (label, lines) in [
                    ("before", Self::why(old, probe, &cell.before, &cell.after)),
                    ("after", Self::why(new, probe, &cell.after, &cell.before)),
                ] {
                    for (k, line) in lines.iter().enumerate() {
                        let head = if k == 0 { format!("{label}:") } else { String::new() };
                        out += &format!("    {head:<8}{line}\n");
                    }
                }
            }
        }
        if !out.is_empty() {
            out.push('\n');
        }
        out += &self.summary();
        out.push('\n');
        out
    }

    /// The machine form (documented in the README):
    /// `{"family", "probes": [{"port", "protocol"}], "commonPods": N, "cells": N,
    /// "changedCells": N, "unchanged": bool, "podsOnlyInOld": [...], "podsOnlyInNew": [...],
    /// "changes": [{"kind", "name", "change"}], "groups": [{"causes": [{"kind", "name",
    /// "change"}], "cells": [{"from", "to", "port", "resolvedPort", "protocol", "family",
    /// "before", "after", "explanationBefore": [...], "explanationAfter": [...]}]}]}`.
    pub fn to_json(&self, old: &Cluster, new: &Cluster) -> Value {
        let groups: Vec<Value> = self
            .groups
            .iter()
            .map(|g| {
                let cells: Vec<Value> = g
                    .cells
                    .iter()
                    .map(|cell| {
                        let probe = &self.probes[cell.probe];
                        let port = match &probe.port {
                            ProbePort::Number(n) => json!(n),
                            ProbePort::Named(name) => json!(name),
                        };
                        let conn = cell.after.as_ref().or(cell.before.as_ref()).map(|(c, _)| c);
                        json!({
                            "from": cell.from.to_string(),
                            "to": cell.to.to_string(),
                            "port": port,
                            "resolvedPort": match probe.port {
                                ProbePort::Named(_) => conn.map(|c| c.port),
                                ProbePort::Number(_) => None,
                            },
                            "protocol": probe.protocol.as_str(),
                            "family": conn.map(|c| if c.ipv6 { "IPv6" } else { "IPv4" }),
                            "before": verdict_word(cell.allowed_before),
                            "after": verdict_word(cell.allowed_after),
                            "explanationBefore": Self::why(old, probe, &cell.before, &cell.after),
                            "explanationAfter": Self::why(new, probe, &cell.after, &cell.before),
                        })
                    })
                    .collect();
                json!({"causes": g.causes.iter().map(Change::to_json).collect::<Vec<_>>(), "cells": cells})
            })
            .collect();
        json!({
            "family": family_name(self.family),
            "probes": self.probes.iter().map(|p| json!({
                "port": match &p.port { ProbePort::Number(n) => json!(n), ProbePort::Named(s) => json!(s) },
                "protocol": p.protocol.as_str(),
            })).collect::<Vec<_>>(),
            "commonPods": self.common_pods.len(),
            "cells": self.cells,
            "changedCells": self.changed_cells(),
            "unchanged": self.unchanged(),
            "podsOnlyInOld": self.only_old.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "podsOnlyInNew": self.only_new.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "changes": self.changes.iter().map(Change::to_json).collect::<Vec<_>>(),
            "groups": groups,
        })
    }
}

fn join(ids: &[ObjectRef]) -> String {
    ids.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}
