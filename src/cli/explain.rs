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
        let selecting = cluster.isolating_policies(i, direction);
        let verb = if direction == Direction::Ingress { "receive" } else { "send" };
        line(format_args!(""));
        if selecting.is_empty() {
            line(format_args!(
                "{direction}: not isolated; it may {verb} anything (no policy in {} selects it for {direction})",
                pod.id.namespace
            ));
            continue;
        }
        let names: Vec<String> = selecting.iter().map(|&k| cluster.policies[k].id.name.clone()).collect();
        line(format_args!("{direction}: isolated by {}; it may {verb} only:", names.join(", ")));
        let mut any = false;
        for &k in &selecting {
            let policy = &cluster.policies[k];
            if let Some(why) = &policy.quarantined {
                line(format_args!("  ({} allows nothing: it is enforced fail-closed, {why})", policy.id.name));
            }
            for (ri, rule) in policy.rules(direction).unwrap_or_default().iter().enumerate() {
                any = true;
                let field = if direction == Direction::Ingress { "ingress" } else { "egress" };
                line(format_args!(
                    "  - {}   [{} spec.{field}[{ri}]]",
                    report::describe_rule(cluster, &policy.id.namespace, rule, direction),
                    policy.id.name
                ));
            }
        }
        if !any {
            line(format_args!("  nothing: every {} connection is denied", direction.as_str().to_lowercase()));
        }
    }
    text
}
