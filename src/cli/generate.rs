//! A deterministic generator of realistic clusters, for benchmarks and property tests.
//!
//! ```text
//!  Params{pods, namespaces, policies, nodes, seed} ──► SplitMix64 ──► Cluster
//! ```
//!
//! Labels come from small vocabularies like real clusters have (`app`, `tier`, `env`,
//! `team`), so selectors match realistic fractions of pods. The same parameters always
//! give the same cluster.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::policy::model::{
    Cluster, ContainerPort, IpBlock, Labels, Namespace, NamespaceScope, ObjectRef, Peer, Pod, PodIps, Policy,
    PortMatch, PortSpec, Protocol, Rule,
};
use crate::policy::selector::{Operator, Requirement, Selector, Values};
use crate::policy::tiers::{
    Action, ClusterPeer, ClusterPolicy, ClusterPolicyId, ClusterPolicyKind, ClusterRule, DomainMap, Node, PodSet, Tier,
};

#[derive(Clone, Debug)]
pub struct Params {
    pub pods: usize,
    pub namespaces: usize,
    pub policies: usize,
    pub nodes: usize,
    pub seed: u64,
    /// Give every pod an IPv6 address too.
    pub dual_stack: bool,
}

impl Default for Params {
    fn default() -> Self {
        Params { pods: 100, namespaces: 10, policies: 30, nodes: 3, seed: 1, dual_stack: false }
    }
}

/// SplitMix64: tiny, fast, good enough for test data, and stable across platforms.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const APPS: &[&str] =
    &["frontend", "backend", "api", "db", "cache", "worker", "nginx", "auth", "search", "queue", "metrics", "billing"];
const TIERS: &[&str] = &["web", "app", "data"];
const ENVS: &[&str] = &["prod", "staging", "dev"];
const TEAMS: &[&str] = &["payments", "identity", "platform", "growth", "data"];
/// (port, protocol, name) that apps serve.
const PORTS: &[(u16, Protocol, &str)] = &[
    (80, Protocol::Tcp, "http"),
    (443, Protocol::Tcp, "https"),
    (8080, Protocol::Tcp, "web"),
    (5432, Protocol::Tcp, "postgres"),
    (6379, Protocol::Tcp, "redis"),
    (53, Protocol::Udp, "dns"),
    (9090, Protocol::Tcp, "metrics"),
];

fn app_port(app_index: usize) -> (u16, Protocol, &'static str) {
    PORTS[app_index % PORTS.len()]
}

pub fn cluster(p: &Params) -> Cluster {
    let mut rng = Rng::new(p.seed);
    let namespaces: Vec<Namespace> = (0..p.namespaces.max(1))
        .map(|i| {
            let name = format!("ns-{i}");
            let mut labels = Labels::new();
            labels.insert("team".into(), rng.pick(TEAMS).to_string());
            labels.insert("env".into(), rng.pick(ENVS).to_string());
            labels.insert(crate::policy::model::NAMESPACE_NAME_LABEL.into(), name.clone());
            Namespace { name, labels }
        })
        .collect();
    let pods: Vec<Pod> = (0..p.pods)
        .map(|i| {
            let ns = &namespaces[i % namespaces.len()];
            let app_index = rng.below(APPS.len());
            let app = APPS[app_index];
            let mut labels = Labels::new();
            labels.insert("app".into(), app.to_string());
            labels.insert("tier".into(), rng.pick(TIERS).to_string());
            if rng.chance(60) {
                labels.insert("env".into(), rng.pick(ENVS).to_string());
            }
            let (port, protocol, name) = app_port(app_index);
            // Named ports resolve to different numbers on different pods now and then.
            let port = if rng.chance(20) { port + 1000 } else { port };
            let ports = vec![
                ContainerPort { name: Some(name.to_string()), port, protocol },
                ContainerPort { name: Some("metrics".into()), port: 9090, protocol: Protocol::Tcp },
            ];
            let v4 = IpAddr::V4(Ipv4Addr::from(0x0A00_0000u32 + 0x1_0000 + i as u32));
            let mut ips = PodIps::from(v4);
            if p.dual_stack {
                let v6 = IpAddr::V6(Ipv6Addr::from(0xfd00_0000_0000_0000_0000_0000_0001_0000u128 + i as u128));
                ips.push(v6).expect("one address per family");
            }
            Pod {
                id: ObjectRef::new(ns.name.clone(), format!("{app}-{i}")),
                labels: labels.into(),
                node: format!("node-{}", i % p.nodes.max(1)).into(),
                ips,
                host_network: false,
                ports: {
                    let mut ports = ports;
                    ports.sort();
                    ports.dedup_by(|a, b| a.name == b.name);
                    ports.into()
                },
            }
        })
        .collect();
    let policies: Vec<Policy> =
        (0..p.policies).map(|i| policy(&mut rng, i, &namespaces[rng_index(i, namespaces.len())].name)).collect();
    Cluster::new(namespaces, pods, policies)
}

fn rng_index(i: usize, n: usize) -> usize {
    (i * 7 + 3) % n
}

fn app_selector(rng: &mut Rng) -> Selector {
    match rng.below(10) {
        0 => Selector::everything(),
        1 => Selector::new(vec![Requirement {
            key: "app".into(),
            operator: Operator::In(Values::from([rng.pick(APPS).to_string(), rng.pick(APPS).to_string()])),
        }]),
        2 => Selector::new(vec![
            Requirement { key: "tier".into(), operator: Operator::In(Values::from([rng.pick(TIERS).to_string()])) },
            Requirement { key: "env".into(), operator: Operator::NotIn(Values::from(["dev".to_string()])) },
        ]),
        3 => Selector::new(vec![Requirement { key: "env".into(), operator: Operator::Exists }]),
        _ => Selector::from_labels([("app", *rng.pick(APPS))]),
    }
}

fn ports(rng: &mut Rng) -> Option<Vec<PortSpec>> {
    match rng.below(6) {
        0 => None,
        1 => Some(vec![PortSpec { protocol: Protocol::Tcp, port: PortMatch::Range(8000, 9000) }]),
        2 => {
            let (_, protocol, name) = *rng.pick(PORTS);
            Some(vec![PortSpec { protocol, port: PortMatch::Named(name.to_string()) }])
        }
        _ => {
            let (port, protocol, _) = *rng.pick(PORTS);
            Some(vec![PortSpec { protocol, port: PortMatch::Range(port, port) }])
        }
    }
}

fn peer(rng: &mut Rng) -> Peer {
    match rng.below(8) {
        0 => Peer::IpBlock(IpBlock {
            cidr: "10.0.0.0/8".parse().expect("valid"),
            except: vec![format!("10.1.{}.0/24", rng.below(4)).parse().expect("valid")],
        }),
        1 | 2 => Peer::Pods {
            namespaces: NamespaceScope::Matching(Selector::from_labels([("team", *rng.pick(TEAMS))])),
            pods: app_selector(rng),
        },
        3 => Peer::Pods { namespaces: NamespaceScope::Matching(Selector::everything()), pods: app_selector(rng) },
        _ => Peer::Pods { namespaces: NamespaceScope::PolicyNamespace, pods: app_selector(rng) },
    }
}

fn rules(rng: &mut Rng) -> Vec<Rule> {
    (0..rng.below(3))
        .map(|_| Rule {
            peers: if rng.chance(10) { None } else { Some((0..1 + rng.below(2)).map(|_| peer(rng)).collect()) },
            ports: ports(rng),
        })
        .collect()
}

fn policy(rng: &mut Rng, i: usize, namespace: &str) -> Policy {
    let kind = rng.below(10);
    let pod_selector =
        if kind == 0 { Selector::everything() } else { Selector::from_labels([("app", *rng.pick(APPS))]) };
    let ingress = if kind == 0 { Some(Vec::new()) } else { Some(rules(rng)) };
    let egress = if rng.chance(30) { Some(rules(rng)) } else { None };
    Policy { id: ObjectRef::new(namespace, format!("policy-{i}")), pod_selector, ingress, egress, quarantined: None }
}

/// How a manifest writes an optional list that holds nothing: the API server treats the
/// three alike only where its defaulting tests the length (see `convert::policy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmptyList {
    Absent,
    Null,
    Empty,
}

/// The optional lists of a NetworkPolicy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListField {
    PolicyTypes,
    Ingress,
    Egress,
    /// A rule's `from` or `to`.
    Peers,
    Ports,
    Except,
}

fn put_list(
    out: &mut serde_json::Map<String, serde_json::Value>,
    key: &str,
    items: Vec<serde_json::Value>,
    form: EmptyList,
) {
    use serde_json::Value;
    match (items.is_empty(), form) {
        (false, _) | (true, EmptyList::Empty) => {
            out.insert(key.into(), Value::Array(items));
        }
        (true, EmptyList::Null) => {
            out.insert(key.into(), Value::Null);
        }
        (true, EmptyList::Absent) => {}
    }
}

fn selector_json(s: &Selector) -> serde_json::Value {
    use serde_json::{Value, json};
    let mut labels = serde_json::Map::new();
    let mut exprs = Vec::new();
    for r in s.requirements() {
        match &r.operator {
            Operator::In(vs) if vs.len() == 1 => {
                labels.insert(r.key.clone(), Value::String(vs.iter().next().cloned().unwrap_or_default()));
            }
            Operator::In(vs) => exprs.push(json!({"key": r.key, "operator": "In", "values": vs})),
            Operator::NotIn(vs) => exprs.push(json!({"key": r.key, "operator": "NotIn", "values": vs})),
            Operator::Exists => exprs.push(json!({"key": r.key, "operator": "Exists"})),
            Operator::DoesNotExist => exprs.push(json!({"key": r.key, "operator": "DoesNotExist"})),
        }
    }
    let mut out = serde_json::Map::new();
    if !labels.is_empty() {
        out.insert("matchLabels".into(), Value::Object(labels));
    }
    if !exprs.is_empty() {
        out.insert("matchExpressions".into(), Value::Array(exprs));
    }
    Value::Object(out)
}

fn rules_json(rules: &[Rule], peer_key: &str, empty: &mut dyn FnMut(ListField) -> EmptyList) -> serde_json::Value {
    use serde_json::{Value, json};
    Value::Array(
        rules
            .iter()
            .map(|r| {
                let mut out = serde_json::Map::new();
                let peers: Vec<Value> = r
                    .peers
                    .iter()
                    .flatten()
                    .map(|p| match p {
                        Peer::IpBlock(b) => {
                            let mut block = serde_json::Map::new();
                            block.insert("cidr".into(), json!(b.cidr.to_string()));
                            let except = b.except.iter().map(|e| json!(e.to_string())).collect();
                            put_list(&mut block, "except", except, empty(ListField::Except));
                            json!({ "ipBlock": block })
                        }
                        Peer::Pods { namespaces: NamespaceScope::PolicyNamespace, pods } => {
                            json!({"podSelector": selector_json(pods)})
                        }
                        Peer::Pods { namespaces: NamespaceScope::Matching(ns), pods } => {
                            json!({"namespaceSelector": selector_json(ns), "podSelector": selector_json(pods)})
                        }
                    })
                    .collect();
                put_list(&mut out, peer_key, peers, empty(ListField::Peers));
                let ports: Vec<Value> = r
                    .ports
                    .iter()
                    .flatten()
                    .map(|p| match &p.port {
                        PortMatch::Any => json!({"protocol": p.protocol.as_str()}),
                        PortMatch::Range(a, b) if a == b => json!({"protocol": p.protocol.as_str(), "port": a}),
                        PortMatch::Range(a, b) => json!({"protocol": p.protocol.as_str(), "port": a, "endPort": b}),
                        PortMatch::Named(n) => json!({"protocol": p.protocol.as_str(), "port": n}),
                    })
                    .collect();
                put_list(&mut out, "ports", ports, empty(ListField::Ports));
                Value::Object(out)
            })
            .collect(),
    )
}

/// `p` as a NetworkPolicy manifest, each optional list that holds nothing written as
/// `empty` says (absent, `null` or `[]`). `policyTypes` is written from the directions `p`
/// isolates when `explicit_policy_types`, else as an empty list in `empty`'s form, leaving
/// it to the API server's defaulting. A direction `p` does not isolate has no rules to write.
pub fn policy_manifest(
    p: &Policy,
    explicit_policy_types: bool,
    empty: &mut dyn FnMut(ListField) -> EmptyList,
) -> serde_json::Value {
    use serde_json::{Value, json};
    let mut spec = serde_json::Map::new();
    spec.insert("podSelector".into(), selector_json(&p.pod_selector));
    let mut types = Vec::new();
    for (field, key, kind, rules, peer_key) in [
        (ListField::Ingress, "ingress", "Ingress", &p.ingress, "from"),
        (ListField::Egress, "egress", "Egress", &p.egress, "to"),
    ] {
        if rules.is_some() {
            types.push(json!(kind));
        }
        let list = match rules.as_deref() {
            Some(r) => rules_json(r, peer_key, empty).as_array().cloned().unwrap_or_default(),
            None => Vec::new(),
        };
        put_list(&mut spec, key, list, empty(field));
    }
    if !explicit_policy_types {
        types.clear();
    }
    put_list(&mut spec, "policyTypes", types, empty(ListField::PolicyTypes));
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": p.id.name, "namespace": p.id.namespace}, "spec": Value::Object(spec)})
}

/// The cluster as Kubernetes manifests (a YAML stream), so the CLI can be benchmarked on it.
pub fn to_yaml(cluster: &Cluster) -> String {
    use serde_json::{Value, json};
    let mut docs: Vec<Value> = Vec::new();
    for ns in cluster.namespaces.values() {
        docs.push(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns.name, "labels": ns.labels}}));
    }
    for pod in cluster.pods.iter() {
        let ports: Vec<Value> = pod
            .ports
            .iter()
            .map(|p| json!({"name": p.name, "containerPort": p.port, "protocol": p.protocol.as_str()}))
            .collect();
        docs.push(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod.id.name, "namespace": pod.id.namespace, "labels": *pod.labels},
            "spec": {"nodeName": pod.node, "hostNetwork": pod.host_network, "containers": [{"name": "main", "image": "registry.example/app:1", "ports": ports}]},
            "status": {"phase": "Running", "podIP": pod.ips.first().map(|ip| ip.to_string()),
                       "podIPs": pod.ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect::<Vec<_>>()},
        }));
    }
    for p in cluster.policies.iter() {
        // As it always wrote them: rule peers and ports left out when absent, every other
        // list written even when empty, policyTypes explicit.
        let mut form = |field| match field {
            ListField::Peers | ListField::Ports => EmptyList::Absent,
            ListField::Ingress if p.ingress.is_none() => EmptyList::Absent,
            ListField::Egress if p.egress.is_none() => EmptyList::Absent,
            _ => EmptyList::Empty,
        };
        docs.push(policy_manifest(p, true, &mut form));
    }
    let mut out = String::new();
    for d in docs {
        out.push_str("---\n");
        out.push_str(&yaml_serde::to_string(&d).unwrap_or_default());
    }
    out
}

/// A small cluster that packs in every feature, for property tests: several nodes,
/// hostNetwork pods, IPv4-only, IPv6-only and dual-stack pods, named ports that resolve to
/// different numbers on different pods, matchExpressions, ipBlocks with except, endPort
/// ranges, TCP/UDP/SCTP, policies that select nothing.
pub fn small_random(seed: u64) -> Cluster {
    let mut rng = Rng::new(seed);
    let namespaces: Vec<Namespace> = ["a", "b", "c"]
        .iter()
        .map(|name| {
            let mut labels = Labels::from([(crate::policy::model::NAMESPACE_NAME_LABEL.to_string(), name.to_string())]);
            if rng.chance(50) {
                labels.insert("team".into(), rng.pick(&["x", "y"]).to_string());
            }
            Namespace { name: name.to_string(), labels }
        })
        .collect();
    let pod_count = 2 + rng.below(7);
    let pods: Vec<Pod> = (0..pod_count)
        .map(|i| {
            let mut labels = Labels::new();
            for key in ["app", "tier"] {
                if rng.chance(70) {
                    labels.insert(key.into(), rng.pick(&["web", "db", "api"]).to_string());
                }
            }
            let v4 = IpAddr::V4(Ipv4Addr::new(10, 0, rng.below(2) as u8, 1 + i as u8));
            let v6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, rng.below(2) as u16, 1 + i as u16));
            let ips = match rng.below(5) {
                0 => vec![v6],
                1 => vec![v4, v6],
                2 => vec![v6, v4],
                _ => vec![v4],
            };
            let mut ports = Vec::new();
            for (name, protocol) in [("web", Protocol::Tcp), ("dns", Protocol::Udp), ("sig", Protocol::Sctp)] {
                if rng.chance(60) {
                    ports.push(ContainerPort { name: Some(name.into()), port: *rng.pick(&[80, 81, 8080]), protocol });
                }
            }
            ports.sort();
            ports.dedup_by(|a, b| a.name == b.name);
            Pod {
                id: ObjectRef::new(namespaces[rng.below(3)].name.clone(), format!("p{i}")),
                labels: labels.into(),
                node: format!("node-{}", rng.below(2)).into(),
                ips: PodIps::try_from(ips).expect("one address per family"),
                host_network: rng.chance(8),
                ports: ports.into(),
            }
        })
        .collect();
    let selector = random_selector;
    let peer = |rng: &mut Rng| -> Peer {
        match rng.below(5) {
            0 => {
                let v6 = rng.chance(40);
                let (cidr, except): (&str, &[&str]) = if v6 {
                    ("fd00::/64", &["fd00::1:0/112", "fd00::3/128"])
                } else {
                    ("10.0.0.0/16", &["10.0.1.0/24", "10.0.0.2/32"])
                };
                Peer::IpBlock(IpBlock {
                    cidr: cidr.parse().expect("valid"),
                    except: except.iter().filter(|_| rng.chance(50)).map(|e| e.parse().expect("valid")).collect(),
                })
            }
            1 => Peer::Pods {
                namespaces: NamespaceScope::Matching(Selector::from_labels([("team", "x")])),
                pods: selector(rng),
            },
            2 => Peer::Pods { namespaces: NamespaceScope::Matching(Selector::everything()), pods: selector(rng) },
            _ => Peer::Pods { namespaces: NamespaceScope::PolicyNamespace, pods: selector(rng) },
        }
    };
    let port = random_port;
    let rules = |rng: &mut Rng| -> Vec<Rule> {
        (0..rng.below(3))
            .map(|_| Rule {
                peers: rng.chance(75).then(|| (0..1 + rng.below(2)).map(|_| peer(rng)).collect()),
                ports: rng.chance(60).then(|| (0..1 + rng.below(2)).map(|_| port(rng)).collect()),
            })
            .collect()
    };
    let policies: Vec<Policy> = (0..rng.below(5))
        .map(|i| {
            let ingress = rng.chance(75).then(|| rules(&mut rng));
            let egress = (ingress.is_none() || rng.chance(40)).then(|| rules(&mut rng));
            Policy {
                id: ObjectRef::new(namespaces[rng.below(3)].name.clone(), format!("pol{i}")),
                pod_selector: selector(&mut rng),
                ingress,
                egress,
                quarantined: None,
            }
        })
        .collect();
    Cluster::new(namespaces, pods, policies)
}

/// A selector of `small_random`'s labels: everything, nothing, or one of each operator.
fn random_selector(rng: &mut Rng) -> Selector {
    match rng.below(6) {
        0 => Selector::everything(),
        1 => Selector::new(vec![Requirement {
            key: "app".into(),
            operator: Operator::NotIn(Values::from([rng.pick(&["web", "db"]).to_string()])),
        }]),
        2 => Selector::new(vec![Requirement { key: "tier".into(), operator: Operator::Exists }]),
        3 => Selector::new(vec![Requirement { key: "tier".into(), operator: Operator::DoesNotExist }]),
        4 => Selector::from_labels([("app", "nothing-has-this")]),
        _ => Selector::from_labels([("app", *rng.pick(&["web", "db", "api"]))]),
    }
}

/// A port spec of `small_random`'s ports: any, a range, a named port, a single port.
fn random_port(rng: &mut Rng) -> PortSpec {
    let protocol = *rng.pick(&Protocol::ALL);
    let port = match rng.below(4) {
        0 => PortMatch::Any,
        1 => PortMatch::Range(80, 81),
        2 => PortMatch::Named(rng.pick(&["web", "dns", "sig"]).to_string()),
        _ => PortMatch::Range(*rng.pick(&[80, 8080]), 0).normalized(),
    };
    PortSpec { protocol, port }
}

/// [`small_random`] with the cluster-wide tiers: up to four cluster policies of every kind
/// and tier, priorities that tie, every action, every peer kind (pods, namespaces, nodes,
/// networks, domain names, a fail-closed deny-all), with the nodes (their addresses those of
/// their hostNetwork pods and one more) and resolved domain names they need.
pub fn small_random_tiered(seed: u64) -> Cluster {
    let cluster = small_random(seed);
    let mut rng = Rng::new(seed ^ 0x7469_6572_7321);
    let nodes: Vec<Node> = ["node-0", "node-1"]
        .iter()
        .enumerate()
        .map(|(k, name)| {
            let mut ips: Vec<IpAddr> = cluster
                .pods
                .iter()
                .filter(|p| p.host_network && p.node == *name)
                .flat_map(|p| p.ips.to_vec())
                .collect();
            ips.push(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 200 + k as u8)));
            ips.sort();
            ips.dedup();
            let role = if k == 0 { "control" } else { "worker" };
            Node { name: name.to_string(), labels: Labels::from([("role".to_string(), role.to_string())]), ips }
        })
        .collect();
    let domains = DomainMap::from([
        ("db.example.com".to_string(), vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, 3)), "fd00::3".parse().expect("valid")]),
        ("api.example.org".to_string(), vec![IpAddr::V4(Ipv4Addr::new(10, 0, 1, 2))]),
    ]);
    let pod_set = |rng: &mut Rng| PodSet {
        namespaces: if rng.chance(50) { Selector::everything() } else { Selector::from_labels([("team", "x")]) },
        pods: if rng.chance(30) { Selector::everything() } else { random_selector(rng) },
    };
    let networks: [&[&str]; 4] = [&["10.0.0.0/24"], &["fd00::/112"], &["10.0.1.0/24", "fd00::1:0/112"], &["0.0.0.0/0"]];
    let peer = |rng: &mut Rng, egress: bool| -> ClusterPeer {
        match if egress { rng.below(9) } else { rng.below(4) } {
            0 => ClusterPeer::Everything,
            1..=3 => ClusterPeer::Pods(pod_set(rng)),
            4 => ClusterPeer::Nodes(if rng.chance(50) {
                Selector::everything()
            } else {
                Selector::from_labels([("role", "worker")])
            }),
            5 | 6 => ClusterPeer::Networks(rng.pick(&networks).iter().map(|n| n.parse().expect("valid")).collect()),
            _ => ClusterPeer::DomainNames(vec![rng.pick(&["*.example.com", "api.example.org"]).to_string()]),
        }
    };
    let rules = |rng: &mut Rng, egress: bool, baseline_v1alpha1: bool| -> Vec<ClusterRule> {
        (0..rng.below(4))
            .map(|k| {
                let action = match rng.below(if baseline_v1alpha1 { 2 } else { 3 }) {
                    0 => Action::Accept,
                    1 => Action::Deny,
                    _ => Action::Pass,
                };
                let peers: Vec<ClusterPeer> = (0..1 + rng.below(2)).map(|_| peer(rng, egress)).collect();
                // "DomainNames is only supported for Accept rules."
                let peers: Vec<ClusterPeer> = peers
                    .into_iter()
                    .filter(|p| action == Action::Accept || !matches!(p, ClusterPeer::DomainNames(_)))
                    .collect();
                let fail_closed =
                    peers.contains(&ClusterPeer::Everything).then(|| "peer has no known field".to_string());
                // "networks/nodes/domainNames peer cannot be set with namedPorts since there
                // are no namedPorts for networks/nodes/domainNames".
                let named_ok = peers.iter().all(|p| matches!(p, ClusterPeer::Pods(_)));
                let port = |rng: &mut Rng| loop {
                    let spec = random_port(rng);
                    if named_ok || !matches!(spec.port, PortMatch::Named(_)) {
                        break spec;
                    }
                };
                ClusterRule {
                    name: rng.chance(50).then(|| format!("r{k}")),
                    action: if fail_closed.is_some() { Action::Deny } else { action },
                    ports: (fail_closed.is_none() && rng.chance(50))
                        .then(|| (0..1 + rng.below(2)).map(|_| port(rng)).collect()),
                    peers,
                    fail_closed,
                }
            })
            .collect()
    };
    let mut baseline_v1alpha1 = false;
    let policies: Vec<ClusterPolicy> = (0..rng.below(5))
        .map(|i| {
            let (kind, tier) = match rng.below(4) {
                0 if !baseline_v1alpha1 => (ClusterPolicyKind::BaselineAdminNetworkPolicy, Tier::Baseline),
                0 | 1 => (ClusterPolicyKind::AdminNetworkPolicy, Tier::Admin),
                2 => (ClusterPolicyKind::ClusterNetworkPolicy, Tier::Baseline),
                _ => (ClusterPolicyKind::ClusterNetworkPolicy, Tier::Admin),
            };
            let banp = kind == ClusterPolicyKind::BaselineAdminNetworkPolicy;
            baseline_v1alpha1 |= banp;
            ClusterPolicy {
                id: ClusterPolicyId { kind, name: if banp { "default".to_string() } else { format!("cp{}", i % 3) } },
                tier,
                priority: if banp { 0 } else { *rng.pick(&[0, 5, 5, 10]) },
                subject: pod_set(&mut rng),
                ingress: rules(&mut rng, false, banp),
                egress: rules(&mut rng, true, banp),
            }
        })
        .collect();
    // Names are unique per kind, as the API server keeps them.
    let mut seen = BTreeSet::new();
    let policies: Vec<ClusterPolicy> = policies.into_iter().filter(|p| seen.insert(p.id.clone())).collect();
    cluster.with_tiers(policies, nodes, domains)
}

/// `count` ClusterNetworkPolicies as a cluster of [`cluster`]'s shape might hold them: seven
/// in ten in the Admin tier, each governing a team's namespaces (or an app's pods in them)
/// with one to three ingress rules (Pass, Accept, Deny) from teams' namespaces or apps' pods,
/// half of them on one port, and now and then an egress rule (a Deny of a documentation
/// network, a Pass of pod traffic, an Accept of the nodes). Priorities spread over 0..=1000,
/// some equal. For benchmarks: the mix an agent meets, not every corner of the semantics
/// (that is [`small_random_tiered`]'s job).
pub fn cluster_policies(seed: u64, count: usize) -> Vec<ClusterPolicy> {
    let mut rng = Rng::new(seed ^ 0x636e_7073);
    let team_namespaces = |rng: &mut Rng| Selector::from_labels([("team", *rng.pick(TEAMS))]);
    let pod_set = |rng: &mut Rng| PodSet {
        namespaces: team_namespaces(rng),
        pods: if rng.chance(50) { Selector::everything() } else { Selector::from_labels([("app", *rng.pick(APPS))]) },
    };
    (0..count)
        .map(|i| {
            let tier = if rng.chance(70) { Tier::Admin } else { Tier::Baseline };
            let action = |rng: &mut Rng| match rng.below(10) {
                0..=3 => Action::Pass,
                4..=6 => Action::Accept,
                _ => Action::Deny,
            };
            let ingress = (0..1 + rng.below(3))
                .map(|k| {
                    let (port, protocol, _) = *rng.pick(PORTS);
                    ClusterRule {
                        name: Some(format!("rule-{k}")),
                        action: action(&mut rng),
                        peers: vec![ClusterPeer::Pods(pod_set(&mut rng))],
                        ports: rng.chance(50).then(|| vec![PortSpec { protocol, port: PortMatch::Range(port, port) }]),
                        fail_closed: None,
                    }
                })
                .collect();
            let egress = match rng.below(6) {
                0 => vec![ClusterRule {
                    name: Some("no-documentation-networks".into()),
                    action: Action::Deny,
                    peers: vec![ClusterPeer::Networks(vec!["192.0.2.0/24".parse().expect("valid")])],
                    ports: None,
                    fail_closed: None,
                }],
                1 => vec![ClusterRule {
                    name: Some("nodes".into()),
                    action: Action::Accept,
                    peers: vec![ClusterPeer::Nodes(Selector::everything())],
                    ports: None,
                    fail_closed: None,
                }],
                2 => vec![ClusterRule {
                    name: Some("pods-decide".into()),
                    action: Action::Pass,
                    peers: vec![ClusterPeer::Pods(PodSet {
                        namespaces: Selector::everything(),
                        pods: Selector::everything(),
                    })],
                    ports: None,
                    fail_closed: None,
                }],
                _ => Vec::new(),
            };
            let subject = if rng.chance(70) {
                PodSet { namespaces: team_namespaces(&mut rng), pods: Selector::everything() }
            } else {
                pod_set(&mut rng)
            };
            ClusterPolicy {
                id: ClusterPolicyId {
                    kind: ClusterPolicyKind::ClusterNetworkPolicy,
                    name: format!("cluster-policy-{i}"),
                },
                tier,
                priority: (rng.below(101) * 10) as u16,
                subject,
                ingress,
                egress,
            }
        })
        .collect()
}

/// The `policy.networking.k8s.io/v1beta1` ClusterNetworkPolicy object a client would send
/// for `policy` (its kind must be ClusterNetworkPolicy; fail-closed rules have no manifest).
pub fn cluster_policy_manifest(policy: &ClusterPolicy) -> serde_json::Value {
    use serde_json::{Value, json};
    let pod_set = |set: &PodSet| {
        if set.pods.is_everything() {
            json!({"namespaces": selector_json(&set.namespaces)})
        } else {
            json!({"pods": {"namespaceSelector": selector_json(&set.namespaces), "podSelector": selector_json(&set.pods)}})
        }
    };
    let rules = |rules: &[ClusterRule], peers_key: &str| -> Value {
        rules
            .iter()
            .map(|rule| {
                let peers: Vec<Value> = rule
                    .peers
                    .iter()
                    .map(|peer| match peer {
                        ClusterPeer::Pods(set) => pod_set(set),
                        ClusterPeer::Nodes(s) => json!({"nodes": selector_json(s)}),
                        ClusterPeer::Networks(nets) => {
                            json!({"networks": nets.iter().map(ToString::to_string).collect::<Vec<_>>()})
                        }
                        ClusterPeer::DomainNames(names) => json!({"domainNames": names}),
                        ClusterPeer::Everything => json!({"networks": ["0.0.0.0/0", "::/0"]}),
                    })
                    .collect();
                let mut out = json!({"action": rule.action.as_str(), peers_key: peers});
                if let Some(name) = &rule.name {
                    out["name"] = json!(name);
                }
                if let Some(specs) = &rule.ports {
                    let protocols: Vec<Value> = specs
                        .iter()
                        .map(|spec| {
                            let key = spec.protocol.as_str().to_ascii_lowercase();
                            match &spec.port {
                                PortMatch::Named(name) => json!({"destinationNamedPort": name}),
                                PortMatch::Range(a, b) if a == b => json!({key: {"destinationPort": {"number": a}}}),
                                PortMatch::Range(a, b) => {
                                    json!({key: {"destinationPort": {"range": {"start": a, "end": b}}}})
                                }
                                PortMatch::Any => {
                                    json!({key: {"destinationPort": {"range": {"start": 1, "end": 65535}}}})
                                }
                            }
                        })
                        .collect();
                    out["protocols"] = Value::Array(protocols);
                }
                out
            })
            .collect()
    };
    let mut spec =
        json!({"tier": policy.tier.as_str(), "priority": policy.priority, "subject": pod_set(&policy.subject)});
    if !policy.ingress.is_empty() {
        spec["ingress"] = rules(&policy.ingress, "from");
    }
    if !policy.egress.is_empty() {
        spec["egress"] = rules(&policy.egress, "to");
    }
    json!({
        "apiVersion": "policy.networking.k8s.io/v1beta1",
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": policy.id.name},
        "spec": spec,
    })
}

impl PortMatch {
    /// `Range(p, 0)` as shorthand for the single port `p`.
    fn normalized(self) -> Self {
        match self {
            PortMatch::Range(p, 0) => PortMatch::Range(p, p),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_cluster_policies_read_back_from_their_manifests_as_they_were() {
        use crate::k8s::tiers::{Mode, cluster_policy};
        let policies = cluster_policies(3, 60);
        for p in &policies {
            let manifest = cluster_policy_manifest(p);
            assert_eq!(cluster_policy(&manifest, Mode::File).as_ref(), Ok(p), "{manifest:#}");
        }
        let tiers: BTreeSet<Tier> = policies.iter().map(|p| p.tier).collect();
        let actions: BTreeSet<Action> = policies.iter().flat_map(|p| p.ingress.iter().map(|r| r.action)).collect();
        assert_eq!((tiers.len(), actions.len()), (2, 3), "every tier and action in the mix");
    }

    #[test]
    fn the_same_parameters_give_the_same_cluster() {
        let p = Params { pods: 50, ..Params::default() };
        assert_eq!(cluster(&p), cluster(&p));
    }

    #[test]
    fn the_cluster_has_the_requested_sizes() {
        let c = cluster(&Params { pods: 200, namespaces: 7, policies: 40, nodes: 4, seed: 9, dual_stack: true });
        assert_eq!((c.pods.len(), c.namespaces.len(), c.policies.len(), c.nodes().len()), (200, 7, 40, 4));
        assert!(c.pods.iter().all(|p| p.ips.len() == 2));
    }
}
