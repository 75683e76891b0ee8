//! Human and machine output: matrices (text, JSON, YAML, CSV) and plain-language
//! descriptions of policies, peers and verdicts.
//!
//! ```text
//!  MatrixReport{engine, pods, probes[BitMatrix]} ──► write_text | write_json | write_yaml | write_csv
//!  Verdict (+ ruleset Trace) ──► describe_verdict ──► query_text | query_json (query)
//! ```
//!
//! `explain`'s answer is `cli::explain`, built from [`describe_rule`].
//!
//! The JSON matrix is a contract scripts rely on:
//! `{"engine": E, "pods": ["ns/name", ...], "probes": [{"port": 80|"name", "protocol": "TCP",
//! "allowed": [[bool, ...], ...]}]}`, `allowed[i][j]` meaning `pods[i] -> pods[j]`.

use std::io::{self, Write};

use crate::engines::ruleset::Trace;
use crate::policy::bitset::BitMatrix;
use crate::policy::evaluate::{ClusterMatch, Connection, Decision, Endpoint, Shortcut, SideVerdict, Verdict};
use crate::policy::matrix::{Probe, ProbePort};
use crate::policy::model::{Cluster, Direction, NamespaceScope, Peer, PortSpec, Rule};
use crate::policy::tiers::{Action, ClusterPeer, ClusterRule, Tier};

pub struct MatrixReport<'a> {
    pub engine: &'a str,
    pub pods: Vec<String>,
    pub probes: Vec<(Probe, BitMatrix)>,
}

fn json_port(port: &ProbePort) -> String {
    match port {
        ProbePort::Number(n) => n.to_string(),
        ProbePort::Named(name) => serde_json::to_string(name).unwrap_or_default(),
    }
}

pub fn write_json(out: &mut impl Write, r: &MatrixReport) -> io::Result<()> {
    write!(out, "{{\"engine\": {}, \"pods\": [", serde_json::to_string(r.engine)?)?;
    for (i, p) in r.pods.iter().enumerate() {
        if i > 0 {
            out.write_all(b", ")?;
        }
        out.write_all(serde_json::to_string(p)?.as_bytes())?;
    }
    out.write_all(b"], \"probes\": [")?;
    for (k, (probe, m)) in r.probes.iter().enumerate() {
        if k > 0 {
            out.write_all(b", ")?;
        }
        write!(out, "{{\"port\": {}, \"protocol\": \"{}\", \"allowed\": [", json_port(&probe.port), probe.protocol)?;
        for i in 0..m.size() {
            out.write_all(if i > 0 { b", [" } else { b"[" })?;
            for j in 0..m.size() {
                let cell: &[u8] = if m.get(i, j) { b"true" } else { b"false" };
                if j > 0 {
                    out.write_all(b", ")?;
                }
                out.write_all(cell)?;
            }
            out.write_all(b"]")?;
        }
        out.write_all(b"]}")?;
    }
    out.write_all(b"]}\n")
}

pub fn write_yaml(out: &mut impl Write, r: &MatrixReport) -> io::Result<()> {
    writeln!(out, "engine: {}", r.engine)?;
    writeln!(out, "pods:")?;
    for p in r.pods.iter() {
        writeln!(out, "- {}", serde_json::to_string(p)?)?;
    }
    writeln!(out, "probes:")?;
    for (probe, m) in &r.probes {
        writeln!(out, "- port: {}\n  protocol: {}\n  allowed:", json_port(&probe.port), probe.protocol)?;
        for i in 0..m.size() {
            let cells: Vec<&str> = (0..m.size()).map(|j| if m.get(i, j) { "true" } else { "false" }).collect();
            writeln!(out, "  - [{}]", cells.join(", "))?;
        }
    }
    Ok(())
}

/// One line per cell: easy to filter with grep, awk or a spreadsheet.
pub fn write_csv(out: &mut impl Write, r: &MatrixReport) -> io::Result<()> {
    writeln!(out, "port,protocol,from,to,allowed")?;
    for (probe, m) in &r.probes {
        for i in 0..m.size() {
            for j in 0..m.size() {
                writeln!(out, "{},{},{},{},{}", probe.port, probe.protocol, r.pods[i], r.pods[j], m.get(i, j))?;
            }
        }
    }
    Ok(())
}

/// A truth table per probe: rows are sources, columns destinations.
pub fn write_text(out: &mut impl Write, r: &MatrixReport, color: bool) -> io::Result<()> {
    let (allow, deny) = if color { ("\x1b[32m.\x1b[0m", "\x1b[1;31mX\x1b[0m") } else { (".", "X") };
    let n = r.pods.len();
    let width = r.pods.iter().map(String::len).max().unwrap_or(0);
    let number_width = n.to_string().len();
    writeln!(out, "engine: {}    legend: {allow} allowed   {deny} denied    rows: from   columns: to", r.engine)?;
    if n == 0 {
        writeln!(out, "(no pods)")?;
        return Ok(());
    }
    let col = number_width.max(1);
    for (probe, m) in &r.probes {
        let allowed = (0..n).map(|i| m.row(i).count()).sum::<usize>();
        writeln!(out, "\n{} {}   ({allowed} of {} allowed)", probe.protocol, probe.port, n * n)?;
        // Column numbers, printed vertically when they take more than one digit.
        for digit in 0..number_width {
            write!(out, "{:w$}  ", "", w = width + number_width + 1)?;
            for j in 0..n {
                let s = format!("{:>w$}", j + 1, w = number_width);
                write!(out, "{:>col$}", &s[digit..digit + 1])?;
                out.write_all(b" ")?;
            }
            out.write_all(b"\n")?;
        }
        // Each cell pre-rendered once; a row is assembled and written in one go.
        let (allow_cell, deny_cell) =
            (format!("{:>pad$}{allow} ", "", pad = col - 1), format!("{:>pad$}{deny} ", "", pad = col - 1));
        let mut line = Vec::with_capacity(width + number_width + 3 + n * allow_cell.len() + 1);
        for i in 0..n {
            line.clear();
            write!(line, "{:>nw$} {:<w$}  ", i + 1, r.pods[i], nw = number_width, w = width)?;
            for j in 0..n {
                line.extend_from_slice(if m.get(i, j) { allow_cell.as_bytes() } else { deny_cell.as_bytes() });
            }
            line.push(b'\n');
            out.write_all(&line)?;
        }
    }
    Ok(())
}

// --- descriptions ----------------------------------------------------------------------------

pub fn describe_peer(cluster: &Cluster, policy_namespace: &str, peer: &Peer) -> String {
    let _ = cluster;
    match peer {
        Peer::IpBlock(b) if b.except.is_empty() => format!("addresses in {}", b.cidr),
        Peer::IpBlock(b) => {
            format!(
                "addresses in {} except {}",
                b.cidr,
                b.except.iter().map(|e| e.to_string()).collect::<Vec<_>>().join(", ")
            )
        }
        Peer::Pods { namespaces, pods } => {
            let who = if pods.is_everything() { "all pods".to_string() } else { format!("pods with {pods}") };
            match namespaces {
                NamespaceScope::PolicyNamespace => format!("{who} in namespace {policy_namespace}"),
                NamespaceScope::Matching(ns) if ns.is_everything() => format!("{who} in every namespace"),
                NamespaceScope::Matching(ns) => format!("{who} in namespaces with {ns}"),
            }
        }
    }
}

pub fn describe_ports(ports: &Option<Vec<PortSpec>>) -> String {
    match ports {
        None => "any port and protocol".to_string(),
        Some(list) => list.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", "),
    }
}

/// "from pods with app=web in namespace shop, on TCP/80" — one rule, plainly.
pub fn describe_rule(cluster: &Cluster, policy_namespace: &str, rule: &Rule, direction: Direction) -> String {
    let (prep, everyone) = match direction {
        Direction::Ingress => ("from", "from anywhere"),
        Direction::Egress => ("to", "to anywhere"),
    };
    let peers = match &rule.peers {
        None => everyone.to_string(),
        Some(peers) => {
            format!(
                "{prep} {}",
                peers.iter().map(|p| describe_peer(cluster, policy_namespace, p)).collect::<Vec<_>>().join(" or ")
            )
        }
    };
    format!("{peers}, on {}", describe_ports(&rule.ports))
}

pub fn endpoint_name(cluster: &Cluster, e: Endpoint) -> String {
    match e {
        Endpoint::Pod(i) => cluster.pods[i].id.to_string(),
        Endpoint::Ip(ip) => ip.to_string(),
    }
}

fn side_field(direction: Direction) -> (&'static str, &'static str) {
    match direction {
        Direction::Ingress => ("ingress", "from"),
        Direction::Egress => ("egress", "to"),
    }
}

/// The explanation of one side of a verdict, as lines.
pub fn describe_side(cluster: &Cluster, conn: &Connection, side: &SideVerdict) -> Vec<String> {
    let (subject, label) = match side.direction {
        Direction::Egress => (conn.src, "egress from"),
        Direction::Ingress => (conn.dst, "ingress to"),
    };
    let name = endpoint_name(cluster, subject);
    let mut lines = Vec::new();
    let isolating: Vec<String> = side.isolated_by.iter().map(|&i| cluster.policies[i].id.to_string()).collect();
    match &side.decision {
        Decision::Skipped => {}
        Decision::NotPoliced => match subject {
            Endpoint::Ip(_) => lines.push(format!("{label} {name}: not a pod, no NetworkPolicy applies")),
            Endpoint::Pod(_) => lines.push(format!("{label} {name}: a hostNetwork pod, which NetworkPolicy does not select")),
        },
        Decision::NotIsolated => lines.push(format!(
            "{label} {name}: allowed, the pod is not isolated for {} (no policy in its namespace selects it with policyTypes {}{})",
            side.direction,
            side.direction,
            if cluster.has_tiers() { ", and no cluster policy rule matches" } else { "" }
        )),
        Decision::Allowed(m) => {
            let policy = &cluster.policies[m.policy];
            let rule = &policy.rules(side.direction).unwrap_or_default()[m.rule];
            let (field, peer_field) = side_field(side.direction);
            lines.push(format!("{label} {name}: allowed; isolated by {}", isolating.join(", ")));
            let mut at = format!("spec.{field}[{}]", m.rule);
            if let Some(p) = m.peer {
                at.push_str(&format!(".{peer_field}[{p}]"));
            }
            if let Some(p) = m.port {
                at.push_str(&format!(", ports[{p}]"));
            }
            lines.push(format!(
                "  matched {} {at}: {}",
                policy.id,
                describe_rule(cluster, &policy.id.namespace, rule, side.direction)
            ));
        }
        Decision::Cluster(m) => {
            let verb = if m.action == Action::Deny { "DENIED" } else { "ALLOWED" };
            lines.push(format!("{label} {name}: {verb} by {}", cluster_rule_name(cluster, m, side.direction)));
            lines.push(format!("  matched {}", cluster_match_detail(cluster, m, side.direction)));
        }
        Decision::NoRuleMatched => {
            lines.push(format!("{label} {name}: DENIED; isolated by {}, and no rule matches", isolating.join(", ")));
            for &pi in &side.isolated_by {
                let policy = &cluster.policies[pi];
                let rules = policy.rules(side.direction).unwrap_or_default();
                match &policy.quarantined {
                    Some(why) => lines.push(format!(
                        "  {} allows nothing: it is enforced fail-closed ({why})",
                        policy.id
                    )),
                    None if rules.is_empty() => lines.push(format!("  {} allows no {} at all", policy.id, side.direction)),
                    None => {}
                }
                for (ri, rule) in rules.iter().enumerate() {
                    let (field, _) = side_field(side.direction);
                    lines.push(format!(
                        "  {} spec.{field}[{ri}] allows only {}",
                        policy.id,
                        describe_rule(cluster, &policy.id.namespace, rule, side.direction)
                    ));
                }
            }
        }
    }
    // The Pass rules that sent the connection on, in the order they did: an Admin one
    // before the decision's details, a Baseline one (on to the default) after them.
    let mut admin = Vec::new();
    let mut baseline = Vec::new();
    for m in &side.passed {
        let (next, out) = match cluster.cluster_policies[m.policy].tier {
            Tier::Admin => ("the NetworkPolicy tier", &mut admin),
            Tier::Baseline => ("the default (allow)", &mut baseline),
        };
        out.push(format!("  passed on to {next} by {}", cluster_rule_name(cluster, m, side.direction)));
        out.push(format!("    matched {}", cluster_match_detail(cluster, m, side.direction)));
    }
    let at = lines.len().min(1);
    lines.splice(at..at, admin);
    lines.extend(baseline);
    lines
}

/// `ClusterNetworkPolicy tenant-isolation (Admin, priority 10) ingress rule "deny-others"`.
pub fn cluster_rule_name(cluster: &Cluster, m: &ClusterMatch, direction: Direction) -> String {
    let policy = &cluster.cluster_policies[m.policy];
    let rule = &policy.rules(direction)[m.rule];
    format!("{} {} {}", policy.describe(), side_field(direction).0, rule.label(m.rule))
}

/// Where in the policy the match is, and the rule in words.
fn cluster_match_detail(cluster: &Cluster, m: &ClusterMatch, direction: Direction) -> String {
    let policy = &cluster.cluster_policies[m.policy];
    let rule = &policy.rules(direction)[m.rule];
    let (field, peer_field) = side_field(direction);
    let mut at = format!("spec.{field}[{}].{peer_field}[{}]", m.rule, m.peer);
    if let Some(p) = m.port {
        at.push_str(&format!(", protocols[{p}]"));
    }
    let mut text = format!("{at}: {} {}", rule.action, describe_cluster_rule(rule, direction));
    if let Some(why) = &rule.fail_closed {
        text.push_str(&format!(" (enforced fail-closed: {why})"));
    }
    text
}

/// "from pods with app=web in namespaces with team=a, on TCP/80": a cluster rule, plainly.
pub fn describe_cluster_rule(rule: &ClusterRule, direction: Direction) -> String {
    let prep = match direction {
        Direction::Ingress => "from",
        Direction::Egress => "to",
    };
    let peers: Vec<String> = rule.peers.iter().map(describe_cluster_peer).collect();
    let peers = if peers.is_empty() { "nothing".to_string() } else { peers.join(" or ") };
    let ports = match &rule.ports {
        None => "all traffic".to_string(),
        Some(_) => describe_ports(&rule.ports),
    };
    format!("{prep} {peers}, on {ports}")
}

fn describe_cluster_peer(peer: &ClusterPeer) -> String {
    match peer {
        ClusterPeer::Pods(set) => {
            let who = if set.pods.is_everything() { "all pods".to_string() } else { format!("pods with {}", set.pods) };
            if set.namespaces.is_everything() {
                format!("{who} in every namespace")
            } else {
                format!("{who} in namespaces with {}", set.namespaces)
            }
        }
        ClusterPeer::Nodes(s) if s.is_everything() => "every node".to_string(),
        ClusterPeer::Nodes(s) => format!("nodes with {s}"),
        ClusterPeer::Networks(nets) => {
            format!("networks {}", nets.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "))
        }
        ClusterPeer::DomainNames(names) => format!("domains {}", names.join(", ")),
        ClusterPeer::Everything => "anywhere".to_string(),
    }
}

pub fn describe_verdict(cluster: &Cluster, conn: &Connection, v: &Verdict) -> Vec<String> {
    let mut lines = vec![format!(
        "{}  {} -> {} {}/{}",
        if v.allowed { "ALLOWED" } else { "DENIED" },
        endpoint_name(cluster, conn.src),
        endpoint_name(cluster, conn.dst),
        conn.protocol,
        conn.port
    )];
    match v.shortcut {
        Some(Shortcut::SamePod) => {
            lines.push("a pod talking to itself: the traffic never reaches the node and is not policed".into())
        }
        Some(Shortcut::NodeToLocalPod) => lines.push(
            "from the node (a hostNetwork pod) to a pod on the same node: always allowed (kubelet probes)".into(),
        ),
        Some(Shortcut::NoAddress) => lines.push(format!(
            "one side has no {} address, so no such connection can be made",
            if conn.ipv6 { "IPv6" } else { "IPv4" }
        )),
        None => {
            lines.extend(describe_side(cluster, conn, &v.egress));
            lines.extend(describe_side(cluster, conn, &v.ingress));
        }
    }
    lines
}

/// `query`'s text answer: the verdict and why, then, given a `trace`, the ruleset's path.
pub fn query_text(cluster: &Cluster, conn: &Connection, verdict: &Verdict, trace: Option<&Trace>) -> String {
    let mut text = String::new();
    for line in describe_verdict(cluster, conn, verdict) {
        text += &format!("{line}\n");
    }
    if let Some(t) = trace {
        text += &format!("\nruleset trace:\n{t}\n");
    }
    text
}

/// A cluster policy's matching rule, for JSON: who, which tier, which rule, what it did.
fn cluster_match_json(cluster: &Cluster, m: &ClusterMatch, direction: Direction) -> serde_json::Value {
    let policy = &cluster.cluster_policies[m.policy];
    let rule = &policy.rules(direction)[m.rule];
    serde_json::json!({
        "clusterPolicy": policy.id.to_string(),
        "tier": policy.tier.as_str(),
        "priority": policy.priority,
        "direction": direction.as_str(),
        "rule": m.rule, "ruleName": rule.name, "action": m.action.as_str(),
        "peer": m.peer, "port": m.port,
    })
}

/// `query -o json`'s answer, pretty-printed with a final newline. A contract scripts rely on:
/// `{"engine", "allowed", "from", "to", "port", "protocol", "family", "shortcut", "egress",
/// "ingress", "explanation", "trace"}`, each side `{"isolatedBy": [...], "decision": ...}`.
pub fn query_json(
    engine: &str,
    cluster: &Cluster,
    conn: &Connection,
    verdict: &Verdict,
    trace: Option<&Trace>,
) -> String {
    let side = |s: &SideVerdict| {
        let mut out = serde_json::json!({
            "isolatedBy": s.isolated_by.iter().map(|&i| cluster.policies[i].id.to_string()).collect::<Vec<_>>(),
            "decision": match &s.decision {
                Decision::NotPoliced => serde_json::json!("not-policed"),
                Decision::NotIsolated => serde_json::json!("not-isolated"),
                Decision::NoRuleMatched => serde_json::json!("no-rule-matched"),
                Decision::Skipped => serde_json::json!("skipped"),
                Decision::Allowed(m) => serde_json::json!({
                    "policy": cluster.policies[m.policy].id.to_string(),
                    "direction": s.direction.as_str(),
                    "rule": m.rule, "peer": m.peer, "port": m.port,
                }),
                Decision::Cluster(m) => cluster_match_json(cluster, m, s.direction),
            },
        });
        // Only where a cluster policy passed: NetworkPolicy-only answers keep their shape.
        if !s.passed.is_empty() {
            out["passed"] = s.passed.iter().map(|m| cluster_match_json(cluster, m, s.direction)).collect();
        }
        out
    };
    let body = serde_json::json!({
        "engine": engine,
        "allowed": verdict.allowed,
        "from": endpoint_name(cluster, conn.src),
        "to": endpoint_name(cluster, conn.dst),
        "port": conn.port,
        "protocol": conn.protocol.as_str(),
        "family": if conn.ipv6 { "IPv6" } else { "IPv4" },
        "shortcut": verdict.shortcut.map(|s| format!("{s:?}")),
        "egress": side(&verdict.egress),
        "ingress": side(&verdict.ingress),
        "explanation": describe_verdict(cluster, conn, verdict),
        "trace": trace.map(|t| t.lines.clone()),
    });
    // `{:#}` is `serde_json::to_string_pretty`, which cannot fail on a `Value`.
    format!("{body:#}\n")
}
