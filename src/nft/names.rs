//! Every nftables object name, in one place.
//!
//! ```text
//!  fixed names ──► constants below
//!  generated   ──► <prefix> + 12 hex digits of a stable hash + '_' + readable hint
//!                  hint sanitised to [a-z0-9_], whole name ≤ MAX_NAME_LEN
//!                  (sets: identities and collisions in crate::compile::naming)
//! ```
//!
//! No Kubernetes string reaches nft text unescaped: names are sanitised here, comments go
//! through [`comment`] (a restricted alphabet, bounded length, quoted by the renderer).

/// The default table name (`NodeConfig::table`).
pub const DEFAULT_TABLE: &str = "netpol";

/// Base chain on `forward`, priority [`EGRESS_PRIORITY`]: egress of local pods to pods and the outside.
pub const EGRESS_FORWARD: &str = "egress_forward";
/// Base chain on `input`, priority [`EGRESS_PRIORITY`]: egress of local pods to the node.
pub const EGRESS_INPUT: &str = "egress_input";
/// Base chain on `forward`, priority [`INGRESS_PRIORITY`]: ingress to local pods.
pub const INGRESS_FORWARD: &str = "ingress_forward";

/// Verdict maps: local isolated pod IP → that pod's chain.
pub const EGRESS_DISPATCH_V4: &str = "egress_dispatch_v4";
pub const EGRESS_DISPATCH_V6: &str = "egress_dispatch_v6";
pub const INGRESS_DISPATCH_V4: &str = "ingress_dispatch_v4";
pub const INGRESS_DISPATCH_V6: &str = "ingress_dispatch_v6";

/// Interval sets of the node's pod CIDRs (`NodeConfig::pod_cidrs`), one per family that has
/// some: static, a handful of prefixes.
pub const POD_CIDRS_V4: &str = "pod_cidrs_v4";
pub const POD_CIDRS_V6: &str = "pod_cidrs_v6";
/// Hash sets of the addresses of the node's known local pods (isolated or not), beside the
/// pod CIDR sets: an address of the CIDRs outside them is no pod of this node (the
/// unknown-pod guard). Pod churn changes single elements.
pub const LOCAL_PODS_V4: &str = "local_pods_v4";
pub const LOCAL_PODS_V6: &str = "local_pods_v6";

/// Egress is decided first; its `accept` only ends the egress base chain, and the ingress
/// base chain (a later priority on the same hook) still sees the packet.
pub const EGRESS_PRIORITY: i32 = 0;
pub const INGRESS_PRIORITY: i32 = 10;

/// The named limit object every pod chain's drop log shares: one node-wide budget.
pub const DROP_LOG_LIMIT: &str = "drop_log";

pub const FIXED: &[&str] = &[
    DROP_LOG_LIMIT,
    EGRESS_FORWARD,
    EGRESS_INPUT,
    INGRESS_FORWARD,
    EGRESS_DISPATCH_V4,
    EGRESS_DISPATCH_V6,
    INGRESS_DISPATCH_V4,
    INGRESS_DISPATCH_V6,
    POD_CIDRS_V4,
    POD_CIDRS_V6,
    LOCAL_PODS_V4,
    LOCAL_PODS_V6,
];

/// Generated-name prefixes.
pub const POD_INGRESS: &str = "pod_in_";
pub const POD_EGRESS: &str = "pod_eg_";
pub const POLICY_INGRESS: &str = "pol_in_";
pub const POLICY_EGRESS: &str = "pol_eg_";
pub const PEERS_V4: &str = "peers4_";
pub const PEERS_V6: &str = "peers6_";
pub const CIDR_V4: &str = "cidr4_";
pub const CIDR_V6: &str = "cidr6_";
pub const PORTS: &str = "ports_";
pub const NAMED_V4: &str = "named4_";
pub const NAMED_V6: &str = "named6_";
pub const ADMIN_INGRESS: &str = "adm_in_";
pub const ADMIN_EGRESS: &str = "adm_eg_";
pub const BASELINE_INGRESS: &str = "base_in_";
pub const BASELINE_EGRESS: &str = "base_eg_";
pub const NODES_V4: &str = "nodes4_";
pub const NODES_V6: &str = "nodes6_";
pub const DOMAINS_V4: &str = "dns4_";
pub const DOMAINS_V6: &str = "dns6_";
/// Named counter objects: a policy rule's accepts, a pod chain's drops.
pub const RULE_COUNTER: &str = "cnt_";
pub const DROP_COUNTER: &str = "drop_";

pub const PREFIXES: &[&str] = &[
    POD_INGRESS,
    POD_EGRESS,
    POLICY_INGRESS,
    POLICY_EGRESS,
    PEERS_V4,
    PEERS_V6,
    CIDR_V4,
    CIDR_V6,
    PORTS,
    NAMED_V4,
    NAMED_V6,
    ADMIN_INGRESS,
    ADMIN_EGRESS,
    BASELINE_INGRESS,
    BASELINE_EGRESS,
    NODES_V4,
    NODES_V6,
    DOMAINS_V4,
    DOMAINS_V6,
    RULE_COUNTER,
    DROP_COUNTER,
];

/// Longest name we generate (nft allows 255; short names keep rules readable).
pub const MAX_NAME_LEN: usize = 48;
/// Hex digits of hash in a generated name (48 bits: collisions negligible at 10⁵ objects).
pub const HASH_LEN: usize = 12;
/// Longest comment we emit (the kernel allows 128 bytes).
pub const MAX_COMMENT_LEN: usize = 120;

/// FNV-1a, 64 bit: stable across runs, platforms and Rust versions (unlike `DefaultHasher`).
pub fn stable_hash(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            // A separator no part can forge by itself being split differently.
            h ^= 0xff;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        for b in part.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= part.len() as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // fmix64 (MurmurHash3): spreads the last bytes over the top bits we keep.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// `[a-z0-9_]` only; runs of anything else become one `_`.
pub fn sanitize(hint: &str) -> String {
    let mut out = String::with_capacity(hint.len());
    for c in hint.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('_') {
            out.push('_');
        }
    }
    out.trim_matches('_').to_string()
}

/// `prefix` + hash of `identity` + `_` + sanitised hint, at most [`MAX_NAME_LEN`] bytes.
pub fn generated(prefix: &str, identity: &[&str], hint: &str) -> String {
    generated_with_bits(prefix, identity, hint, 4 * HASH_LEN as u32)
}

/// [`generated`], keeping only the top `bits` (1 to 48) bits of the hash, still written as
/// [`HASH_LEN`] hex digits: tests force collisions with few bits (see
/// [`crate::compile::naming::Namer`], which resolves them).
pub fn generated_with_bits(prefix: &str, identity: &[&str], hint: &str, bits: u32) -> String {
    debug_assert!(PREFIXES.contains(&prefix));
    debug_assert!((1..=4 * HASH_LEN as u32).contains(&bits));
    let hash = stable_hash(identity);
    let mut name = format!("{prefix}{:0width$x}", hash >> (64 - bits), width = HASH_LEN);
    let hint = sanitize(hint);
    if !hint.is_empty() {
        name.push('_');
        name.push_str(&hint);
    }
    name.truncate(MAX_NAME_LEN);
    while name.ends_with('_') {
        name.pop();
    }
    name
}

/// Is this chain/set/map name one we generate or fix?
pub fn is_ours(name: &str) -> bool {
    if FIXED.contains(&name) {
        return true;
    }
    PREFIXES.iter().any(|p| {
        name.strip_prefix(p).is_some_and(|rest| {
            let (hash, hint) = rest.split_at(rest.len().min(HASH_LEN));
            hash.len() == HASH_LEN
                && hash.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
                && (hint.is_empty()
                    || (hint.starts_with('_')
                        && hint.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')))
                && name.len() <= MAX_NAME_LEN
        })
    })
}

/// A safe comment: printable ASCII without quotes or backslashes, bounded length. The
/// renderer wraps it in double quotes.
pub fn comment(text: &str) -> String {
    let mut out: String = text
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || " ./:=,-_()<>!+#@[]{}".contains(c) { c } else { '_' })
        .collect();
    if out.len() > MAX_COMMENT_LEN {
        out.truncate(MAX_COMMENT_LEN - 3);
        out.push_str("...");
    }
    out
}

/// The chain of a local pod for a direction.
pub fn pod_chain(ingress: bool, namespace: &str, name: &str) -> String {
    let prefix = if ingress { POD_INGRESS } else { POD_EGRESS };
    generated(prefix, &[namespace, name], &format!("{namespace}_{name}"))
}

/// The chain of a cluster-wide tier (`admin`: Admin, else Baseline) for a direction, for
/// the pods governed by exactly the cluster policies `policies` (their kind/name ids, in
/// precedence order): one chain per distinct list.
pub fn tier_chain(admin: bool, ingress: bool, policies: &[&str]) -> String {
    let prefix = match (admin, ingress) {
        (true, true) => ADMIN_INGRESS,
        (true, false) => ADMIN_EGRESS,
        (false, true) => BASELINE_INGRESS,
        (false, false) => BASELINE_EGRESS,
    };
    let hint = policies.iter().map(|id| id.rsplit('/').next().unwrap_or(id)).collect::<Vec<_>>().join("_");
    generated(prefix, policies, &hint)
}

/// The counter of rule `rule` of policy `namespace/name` (namespace empty: a cluster
/// policy of tier `tier`) for a direction: one per (policy rule, direction), whatever pods
/// the rule serves.
pub fn rule_counter(tier: &str, namespace: &str, name: &str, direction: &str, rule: &str) -> String {
    // A cluster policy's name is `kind/name`: its name alone reads better.
    let short = name.rsplit('/').next().unwrap_or(name);
    generated(RULE_COUNTER, &[tier, namespace, name, direction, rule], &format!("{namespace}_{short}_{rule}"))
}

/// The counter of the final drop of the pod chains isolated by exactly `policies` (names,
/// in the order the chain jumps to them) of `namespace` for a direction: pods alike share
/// it, so a new pod finds its count there and a deleted one leaves it.
pub fn drop_counter(namespace: &str, policies: &[&str], direction: &str) -> String {
    let mut identity = vec![namespace, direction];
    identity.extend(policies);
    generated(DROP_COUNTER, &identity, &format!("{namespace}_{}", policies.join("_")))
}

/// The chain of a policy for a direction.
pub fn policy_chain(ingress: bool, namespace: &str, name: &str) -> String {
    let prefix = if ingress { POLICY_INGRESS } else { POLICY_EGRESS };
    generated(prefix, &[namespace, name], &format!("{namespace}_{name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_names_are_ours_sanitised_and_bounded() {
        let n = pod_chain(true, "Weird NS\"; drop", "a-very-long-pod-name-that-goes-on-and-on-and-on-forever");
        assert!(is_ours(&n), "{n}");
        assert!(n.len() <= MAX_NAME_LEN);
        assert!(n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'));
        assert!(!is_ours("KUBE-SERVICES"));
        assert!(!is_ours("pod_in_xyz"));
        assert!(is_ours(EGRESS_FORWARD));
    }

    #[test]
    fn names_differ_for_different_identities_with_the_same_hint() {
        assert_ne!(pod_chain(true, "a-b", "c"), pod_chain(true, "a", "b-c"));
    }

    #[test]
    fn comments_lose_quotes_and_backslashes() {
        let c = comment("ns/\"pol\"\\n; flush ruleset");
        assert!(!c.contains('"') && !c.contains('\\') && !c.contains(';'));
    }
}
