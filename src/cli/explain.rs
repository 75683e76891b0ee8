//! `netpol-check explain`: which policies select a pod, and what it may receive and send, in
//! plain language.
//!
//! ```text
//!  Cluster + pod index ──► explain ──► text: a header line, then per direction
//!                                      "not isolated" or the rules that let traffic through
//! ```

use std::fmt::Write;

use crate::cli::report;
use crate::policy::model::{Cluster, Direction};
use crate::policy::tiers::Tier;

/// The whole `explain` answer for `cluster.pods[i]`, one line per `\n`.
pub fn explain(cluster: &Cluster, i: usize) -> String {
    let pod = &cluster.pods[i];
    let mut text = String::new();
    // Writing to a String cannot fail.
    let mut line = |args: std::fmt::Arguments| {
        let _ = text.write_fmt(args);
        text.push('\n');
    };
    let ips: Vec<String> = pod.ips.iter().map(|ip| ip.to_string()).collect();
    let labels: Vec<String> = pod.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    line(format_args!(
        "{}  ({}; node {}; labels {})",
        pod.id,
        ips.join(", "),
        pod.node,
        if labels.is_empty() { "none".into() } else { labels.join(",") }
    ));
    if pod.host_network {
        line(format_args!(
            "hostNetwork pod: NetworkPolicy never selects it; it is reached (and seen) by its node's IP only"
        ));
        return text;
    }
    for direction in [Direction::Ingress, Direction::Egress] {
        line(format_args!(""));
        let governing = |tier: Tier| -> Vec<usize> {
            let labels = cluster.namespace_labels(&pod.id.namespace);
            (0..cluster.cluster_policies.len())
                .filter(|&k| {
                    cluster.cluster_policies[k].tier == tier
                        && cluster.cluster_policies[k].governs(pod, labels, direction)
                })
                .collect()
        };
        let (admin, baseline) = (governing(Tier::Admin), governing(Tier::Baseline));
        if admin.is_empty() && baseline.is_empty() {
            for l in network_policy_lines(cluster, i, direction, "") {
                line(format_args!("{l}"));
            }
            continue;
        }
        // "Policy tiers are evaluated in the following order: Admin tier, NetworkPolicy tier,
        // Baseline tier."
        let isolated = !cluster.isolating_policies(i, direction).is_empty();
        line(format_args!(
            "{direction}: tiers in order, the first rule that matches decides (Pass goes on to the next tier):"
        ));
        if !admin.is_empty() {
            line(format_args!("  Admin tier:"));
            cluster_rule_lines(cluster, &admin, direction, &mut line);
        }
        for l in network_policy_lines(cluster, i, direction, "  NetworkPolicy tier: ") {
            line(format_args!("{l}"));
        }
        if isolated {
            if !baseline.is_empty() {
                line(format_args!("  (the Baseline tier never applies: a NetworkPolicy selects the pod)"));
            }
            continue;
        }
        if !baseline.is_empty() {
            line(format_args!("  Baseline tier:"));
            cluster_rule_lines(cluster, &baseline, direction, &mut line);
        }
        line(format_args!("  then: allowed (the default)"));
    }
    text
}

/// The rules of the cluster policies `policies` (in precedence order) for `direction`, one
/// line each, with the words that name the rule.
fn cluster_rule_lines(
    cluster: &Cluster,
    policies: &[usize],
    direction: Direction,
    line: &mut impl FnMut(std::fmt::Arguments),
) {
    for &k in policies {
        let policy = &cluster.cluster_policies[k];
        for (ri, rule) in policy.rules(direction).iter().enumerate() {
            line(format_args!(
                "    - {} {}   [{} {} {}]",
                rule.action,
                report::describe_cluster_rule(rule, direction),
                policy.describe(),
                direction.as_str().to_lowercase(),
                rule.label(ri)
            ));
        }
    }
}

/// What the NetworkPolicies of the pod's namespace say for `direction`, as lines, the first
/// starting with `lead` (the direction's name when it is empty).
fn network_policy_lines(cluster: &Cluster, i: usize, direction: Direction, lead: &str) -> Vec<String> {
    let pod = &cluster.pods[i];
    let mut out = Vec::new();
    let head = if lead.is_empty() { format!("{direction}: ") } else { lead.to_string() };
    let indent = if lead.is_empty() { "" } else { "  " };
    let selecting = cluster.isolating_policies(i, direction);
    let verb = if direction == Direction::Ingress { "receive" } else { "send" };
    if selecting.is_empty() {
        let then = if lead.is_empty() { format!("it may {verb} anything") } else { "it goes on".to_string() };
        out.push(format!("{head}not isolated; {then} (no policy in {} selects it for {direction})", pod.id.namespace));
        return out;
    }
    let names: Vec<String> = selecting.iter().map(|&k| cluster.policies[k].id.name.clone()).collect();
    out.push(format!("{head}isolated by {}; it may {verb} only:", names.join(", ")));
    let mut any = false;
    for &k in &selecting {
        let policy = &cluster.policies[k];
        if let Some(why) = &policy.quarantined {
            out.push(format!("{indent}  ({} allows nothing: it is enforced fail-closed, {why})", policy.id.name));
        }
        for (ri, rule) in policy.rules(direction).unwrap_or_default().iter().enumerate() {
            any = true;
            let field = if direction == Direction::Ingress { "ingress" } else { "egress" };
            out.push(format!(
                "{indent}  - {}   [{} spec.{field}[{ri}]]",
                report::describe_rule(cluster, &policy.id.namespace, rule, direction),
                policy.id.name
            ));
        }
    }
    if !any {
        out.push(format!("{indent}  nothing: every {} connection is denied", direction.as_str().to_lowercase()));
    }
    out
}
