//! Which conntrack entries to delete after a sync, pure: the flows of addresses whose pods
//! are gone, and the flows the ruleset just applied would no longer admit.
//!
//! ```text
//!  previous pods, new pods ──► gone_addresses ──────────────────────────┐
//!  transaction, desired ──► may_tighten ──► Interpreter(desired) ──┐     │
//!  node's pods + node's own addresses ──► NodeAddresses ───────────┤     │
//!  dumped flows ──► flows_to_delete ─── touches a gone address? ───┼─────┴─► (flow, PodGone)
//!                                   └── touches a local pod? ──► first packet, ct new, at
//!                                       input (to the node) or forward ──► Drop ──► (flow, Denied)
//! ```
//!
//! Only a flow with a local pod at one end can change verdict on this node: the ruleset
//! dispatches on local pods' addresses only (ingress by destination, egress by source). A
//! flow the node sent itself crossed `output`, which no chain hooks (DESIGN §3: "traffic
//! from the node to its own local pods is always allowed"), so it is never deleted.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;

use crate::nft::interpret::{Fate, Interpreter, Packet};
use crate::nft::ir::{Hook, MapVerdict, Match, Ruleset};
use crate::nft::{Op, Transaction};
use crate::policy::model::{Pod, changed_items};

use super::Flow;

/// Why a flow is deleted (the metric's label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// An address at one end belonged to a pod that is gone (deleted, or its IP changed).
    PodGone,
    /// The ruleset just applied would drop the flow's first packet.
    Denied,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::PodGone => "pod_deleted",
            Reason::Denied => "denied",
        }
    }
}

/// What the decision must know of the node's addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeAddresses {
    /// Addresses of this node's pods (hostNetwork ones aside: they are the node's).
    pub local_pods: HashSet<IpAddr>,
    /// The node's own addresses: its interfaces' and its hostNetwork pods'.
    pub node: HashSet<IpAddr>,
}

impl NodeAddresses {
    /// The addresses of `node` given its pods and the addresses of its interfaces.
    pub fn new(pods: &[Arc<Pod>], node: &str, interfaces: HashSet<IpAddr>) -> Self {
        let mut a = NodeAddresses { local_pods: HashSet::new(), node: interfaces };
        for p in pods.iter().filter(|p| p.node == node) {
            let into = if p.host_network { &mut a.node } else { &mut a.local_pods };
            into.extend(p.ips.iter().copied());
        }
        a
    }
}

/// Addresses that a pod of `before` had and that no pod of the same name has in `after`:
/// the pod was deleted, or got another IP. (A new pod with the same IP is no reason to
/// keep the old pod's flows: that is the case the flush is for.) hostNetwork pods' addresses
/// are the node's and never count. Both lists sorted by namespace and name, as snapshots
/// keep them: the pods both share are skipped by pointer, so a sync pays for the pods that
/// changed only.
///
/// kube-proxy does the same for a removed UDP endpoint ("ClearUDPConntrackForPeers").
pub fn gone_addresses(before: &[Arc<Pod>], after: &[Arc<Pod>]) -> HashSet<IpAddr> {
    let changed = changed_items(before, after, |p| &p.id, usize::MAX).unwrap_or_default();
    let mut gone = HashSet::new();
    for (old, new) in changed {
        let Some(old) = old.map(|i| &before[i]).filter(|p| !p.host_network) else { continue };
        let kept: &[IpAddr] = match new.map(|j| &after[j]) {
            Some(p) if !p.host_network => &p.ips,
            _ => &[],
        };
        gone.extend(old.ips.iter().filter(|ip| !kept.contains(ip)));
    }
    gone
}

/// Could `tx` (applied to reach `desired`) deny something that was allowed? `false` only
/// when it provably just adds allows: new sets, elements added to sets no rule looks up
/// negated, map elements that accept. Anything touching chains or rules, any removal, any
/// dispatch to a chain (a pod newly isolated) may tighten.
pub fn may_tighten(tx: &Transaction, desired: &Ruleset) -> bool {
    let negated = || -> HashSet<&str> {
        desired
            .chains
            .values()
            .flat_map(|c| c.rules.iter())
            .flat_map(|r| r.matches.iter())
            .filter_map(|m| match m {
                Match::Lookup { set, negate: true, .. } => Some(set.as_str()),
                _ => None,
            })
            .collect()
    };
    let mut negated_sets: Option<HashSet<&str>> = None;
    tx.ops.iter().any(|op| match op {
        // Counters and limits decide nothing.
        Op::AddTable | Op::AddCounter { .. } | Op::DeleteCounter { .. } | Op::AddLimit { .. } => false,
        Op::AddSet { name: set, .. } | Op::AddElements { set, .. } => {
            negated_sets.get_or_insert_with(negated).contains(set.as_str())
        }
        Op::AddMapElements { elements, .. } => elements.iter().any(|(_, v)| *v != MapVerdict::Accept),
        Op::AddMap { map, .. } => map.elements.values().any(|v| *v != MapVerdict::Accept),
        Op::DeleteTable
        | Op::DefineTable(_)
        | Op::AddChain { .. }
        | Op::FlushChain { .. }
        | Op::DeleteChain { .. }
        | Op::AddRule { .. }
        | Op::DeleteSet { .. }
        | Op::DeleteMap { .. }
        | Op::DeleteElements { .. }
        | Op::DeleteMapElements { .. } => true,
    })
}

/// The first packet of `flow` as this node's ruleset saw it: the original source, and the
/// destination after DNAT (the reply's source and port). `None` for protocols a
/// NetworkPolicy cannot name (ICMP and others are left alone).
pub fn first_packet(flow: &Flow) -> Option<Packet> {
    let (o, r) = (&flow.original, &flow.reply);
    if !matches!(o.proto, 6 | 17 | 132) || o.src.is_ipv4() != r.src.is_ipv4() {
        return None;
    }
    Some(Packet::new(o.src, r.src, o.proto, r.sport))
}

/// Would the ruleset behind `interp` drop the first packet of `flow` now?
pub fn denied(interp: &Interpreter<'_>, addresses: &NodeAddresses, flow: &Flow) -> bool {
    let Some(pkt) = first_packet(flow) else { return false };
    let local = |ip: &IpAddr| addresses.local_pods.contains(ip);
    if !(local(&pkt.src) || local(&pkt.dst)) || pkt.src == pkt.dst || addresses.node.contains(&pkt.src) {
        return false;
    }
    let hook = if addresses.node.contains(&pkt.dst) { Hook::Input } else { Hook::Forward };
    interp.hook(hook, &pkt) == Fate::Drop
}

/// The flows to delete and why: those touching a `gone` address, then (with `ruleset`)
/// those the ruleset now denies. A flow appears once, gone first.
pub fn flows_to_delete<'f>(
    flows: &'f [Flow],
    gone: &HashSet<IpAddr>,
    ruleset: Option<(&Interpreter<'_>, &NodeAddresses)>,
) -> Vec<(&'f Flow, Reason)> {
    flows
        .iter()
        .filter_map(|f| {
            if !gone.is_empty() && f.addresses().iter().any(|a| gone.contains(a)) {
                return Some((f, Reason::PodGone));
            }
            let (interp, addresses) = ruleset?;
            denied(interp, addresses, f).then_some((f, Reason::Denied))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::{NodeConfig, compile};
    use crate::conntrack::Tuple;
    use crate::policy::model::{Cluster, Labels, NamespaceScope, Peer, PortMatch, PortSpec, Protocol, Rule};
    use crate::policy::model::{Namespace, ObjectRef, Policy};
    use crate::policy::selector::Selector;
    use proptest::prelude::*;

    const NODE: &str = "n1";

    fn pod(name: &str, node: &str, ip: &str, app: &str) -> Pod {
        Pod {
            id: ObjectRef::new("ns", name),
            labels: Labels::from([("app".to_string(), app.to_string())]).into(),
            node: node.into(),
            ips: ip.parse::<IpAddr>().unwrap().into(),
            host_network: false,
            ports: vec![].into(),
        }
    }

    fn host_pod(name: &str, node: &str, ip: &str) -> Pod {
        Pod { host_network: true, ..pod(name, node, ip, "host") }
    }

    /// Pods `app=db` admit TCP 5432 from `app=api` only.
    fn db_policy() -> Policy {
        Policy {
            quarantined: None,
            id: ObjectRef::new("ns", "db"),
            pod_selector: Selector::from_labels([("app", "db")]),
            ingress: Some(vec![Rule {
                peers: Some(vec![Peer::Pods {
                    namespaces: NamespaceScope::PolicyNamespace,
                    pods: Selector::from_labels([("app", "api")]),
                }]),
                ports: Some(vec![PortSpec { protocol: Protocol::Tcp, port: PortMatch::Range(5432, 5432) }]),
            }]),
            egress: None,
        }
    }

    fn cluster(pods: Vec<Pod>, policies: Vec<Policy>) -> Cluster {
        Cluster::new(vec![Namespace { name: "ns".into(), labels: Labels::new() }], pods, policies)
    }

    fn pods() -> Vec<Pod> {
        vec![
            pod("api", "n2", "10.0.2.1", "api"),
            pod("db", NODE, "10.0.1.1", "db"),
            host_pod("kubelet", NODE, "192.168.0.1"),
            pod("web", NODE, "10.0.1.2", "web"),
        ]
    }

    fn flow(proto: u8, src: &str, sport: u16, dst: &str, dport: u16) -> Flow {
        let (src, dst): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
        Flow::without_nat(Tuple { src, dst, proto, sport, dport })
    }

    fn addresses(c: &Cluster) -> NodeAddresses {
        NodeAddresses::new(&c.pods, NODE, HashSet::from(["192.168.0.1".parse().unwrap()]))
    }

    fn denied_by(c: &Cluster, flows: &[Flow]) -> Vec<Flow> {
        let rs = compile(c, &NodeConfig::new(NODE));
        let interp = Interpreter::new(&rs);
        let a = addresses(c);
        flows_to_delete(flows, &HashSet::new(), Some((&interp, &a))).into_iter().map(|(f, _)| *f).collect()
    }

    #[test]
    fn a_flow_the_policy_no_longer_admits_is_selected_and_an_admitted_one_is_not() {
        let c = cluster(pods(), vec![db_policy()]);
        let admitted = flow(6, "10.0.2.1", 40000, "10.0.1.1", 5432);
        let other_port = flow(6, "10.0.2.1", 40001, "10.0.1.1", 22);
        let from_web = flow(17, "10.0.1.2", 5000, "10.0.1.1", 5432);
        let to_web = flow(6, "10.0.2.1", 40002, "10.0.1.2", 80);
        assert_eq!(denied_by(&c, &[admitted, other_port, from_web, to_web]), vec![other_port, from_web]);
    }

    #[test]
    fn without_a_policy_nothing_is_selected() {
        let c = cluster(pods(), vec![]);
        assert!(denied_by(&c, &[flow(6, "10.0.2.1", 40001, "10.0.1.1", 22)]).is_empty());
    }

    #[test]
    fn flows_that_do_not_touch_a_local_pod_or_that_the_node_sent_are_left_alone() {
        let c = cluster(pods(), vec![db_policy()]);
        let remote_to_remote = flow(6, "10.0.2.1", 1, "10.0.3.3", 5432);
        let node_to_db = flow(6, "192.168.0.1", 50000, "10.0.1.1", 8080);
        let icmp = flow(1, "10.0.2.1", 7, "10.0.1.1", 0x0800);
        assert!(denied_by(&c, &[remote_to_remote, node_to_db, icmp]).is_empty());
    }

    #[test]
    fn a_dnatted_flow_is_decided_by_its_real_destination() {
        let c = cluster(pods(), vec![db_policy()]);
        // api -> a service address 10.96.0.5:5432, DNAT'd to db:5432 (allowed), and to db:22 (denied).
        let mut allowed = flow(6, "10.0.2.1", 40000, "10.96.0.5", 5432);
        allowed.reply.src = "10.0.1.1".parse().unwrap();
        let mut denied = allowed;
        denied.reply.sport = 22;
        assert_eq!(denied_by(&c, &[allowed, denied]), vec![denied]);
    }

    #[test]
    fn a_flow_to_the_node_itself_is_decided_at_input() {
        // web may send only to db: its flow to the node's address is decided by the input
        // chain's egress dispatch.
        let egress = Policy {
            quarantined: None,
            id: ObjectRef::new("ns", "web-egress"),
            pod_selector: Selector::from_labels([("app", "web")]),
            ingress: None,
            egress: Some(vec![Rule {
                peers: Some(vec![Peer::Pods {
                    namespaces: NamespaceScope::PolicyNamespace,
                    pods: Selector::from_labels([("app", "db")]),
                }]),
                ports: None,
            }]),
        };
        let c = cluster(pods(), vec![egress]);
        let to_node = flow(6, "10.0.1.2", 1234, "192.168.0.1", 10250);
        let to_db = flow(6, "10.0.1.2", 1235, "10.0.1.1", 80);
        assert_eq!(denied_by(&c, &[to_node, to_db]), vec![to_node]);
        let rs = compile(&c, &NodeConfig::new(NODE));
        let interp = Interpreter::new(&rs);
        let pkt = first_packet(&to_node).unwrap();
        assert_eq!(interp.hook(Hook::Input, &pkt), Fate::Drop);
    }

    #[test]
    fn a_gone_address_selects_every_flow_with_it_at_either_end_before_any_decision() {
        let before: Vec<Arc<Pod>> = pods().into_iter().map(Arc::new).collect();
        let after: Vec<Arc<Pod>> = before.iter().filter(|p| p.id.name != "db").cloned().collect();
        let gone = gone_addresses(&before, &after);
        assert_eq!(gone, HashSet::from(["10.0.1.1".parse().unwrap()]));
        let into = flow(17, "10.0.2.1", 53, "10.0.1.1", 53);
        let out = flow(6, "10.0.1.1", 53, "10.0.9.9", 80);
        let mut nat = flow(6, "10.0.2.1", 1, "10.96.0.1", 80);
        nat.reply.src = "10.0.1.1".parse().unwrap();
        let other = flow(6, "10.0.2.1", 1, "10.0.1.2", 80);
        let table = [into, out, nat, other];
        let picked = flows_to_delete(&table, &gone, None);
        assert_eq!(picked, vec![(&into, Reason::PodGone), (&out, Reason::PodGone), (&nat, Reason::PodGone)]);
    }

    #[test]
    fn an_ip_taken_over_by_another_pod_is_gone_and_a_host_network_address_never_is() {
        let before: Vec<Arc<Pod>> = pods().into_iter().map(Arc::new).collect();
        let mut after: Vec<Arc<Pod>> =
            before.iter().filter(|p| p.id.name != "db" && p.id.name != "kubelet").cloned().collect();
        after.push(Arc::new(pod("db-new", NODE, "10.0.1.1", "db")));
        after.sort_by(|a, b| a.id.cmp(&b.id));
        assert_eq!(gone_addresses(&before, &after), HashSet::from(["10.0.1.1".parse().unwrap()]));
        assert!(gone_addresses(&before, &before).is_empty());
        // A pod given another IP (a new allocation of the same pod, as a relist brings).
        let moved: Vec<Arc<Pod>> = before
            .iter()
            .map(|p| if p.id.name == "web" { Arc::new(pod("web", NODE, "10.0.1.7", "web")) } else { Arc::clone(p) })
            .collect();
        assert_eq!(gone_addresses(&before, &moved), HashSet::from(["10.0.1.2".parse().unwrap()]));
    }

    #[test]
    fn adding_allows_does_not_tighten_and_anything_else_may() {
        let c = cluster(pods(), vec![db_policy()]);
        let rs = compile(&c, &NodeConfig::new(NODE));
        let elements = |set: &str| Op::AddElements {
            set: set.into(),
            elements: vec![crate::nft::ir::Element::single(crate::nft::ir::Value::Addr("10.0.2.9".parse().unwrap()))],
        };
        let tx = |ops: Vec<Op>| Transaction { table: "t".into(), ops };
        let peer_set = rs.sets.keys().find(|n| n.starts_with("peers4")).unwrap().clone();
        assert!(!may_tighten(&tx(vec![elements(&peer_set)]), &rs));
        let accept = (crate::nft::ir::Element::single(crate::nft::ir::Value::Port(1)), MapVerdict::Accept);
        assert!(!may_tighten(&tx(vec![Op::AddMapElements { map: "m".into(), elements: vec![accept] }]), &rs));
        let jump = (crate::nft::ir::Element::single(crate::nft::ir::Value::Port(1)), MapVerdict::Jump("c".into()));
        assert!(may_tighten(&tx(vec![Op::AddMapElements { map: "m".into(), elements: vec![jump] }]), &rs));
        assert!(may_tighten(&tx(vec![Op::DeleteElements { set: peer_set.clone(), elements: vec![] }]), &rs));
        assert!(may_tighten(&tx(vec![Op::FlushChain { name: "c".into() }]), &rs));
        assert!(may_tighten(&crate::nft::diff::full_sync(&rs), &rs));
        // The same elements added to a set some rule looks up negated do tighten.
        let mut negated = rs.clone();
        let chain = negated.chains.values_mut().next().unwrap();
        Arc::make_mut(chain).rules.push(crate::nft::ir::Rule {
            matches: vec![Match::Lookup {
                key: crate::nft::ir::Key::Addr(crate::nft::ir::IpFamily::V4, crate::nft::ir::AddrField::Saddr),
                set: peer_set.clone(),
                negate: true,
            }],
            verdict: Some(crate::nft::ir::Verdict::Drop),
            ..crate::nft::ir::Rule::default()
        });
        assert!(may_tighten(&tx(vec![elements(&peer_set)]), &negated));
    }

    fn arb_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            Just("10.0.1.1"),
            Just("10.0.1.2"),
            Just("10.0.2.1"),
            Just("10.0.2.2"),
            Just("192.168.0.1"),
            Just("8.8.8.8")
        ]
        .prop_map(|s| s.parse().unwrap())
    }

    fn arb_flow() -> impl Strategy<Value = Flow> {
        (
            arb_ip(),
            arb_ip(),
            prop_oneof![Just(6u8), Just(17), Just(132), Just(1)],
            any::<u16>(),
            0u16..10,
            any::<bool>(),
        )
            .prop_map(|(src, dst, proto, sport, port_pick, nat)| {
                let dport = [22, 80, 5432, 53, 8080, 443, 1, 65535, 9000, 5433][port_pick as usize];
                let mut f = Flow::without_nat(Tuple { src, dst, proto, sport, dport });
                if nat {
                    f.original.dst = "10.96.0.7".parse().unwrap();
                }
                f
            })
    }

    fn arb_policies() -> impl Strategy<Value = Vec<Policy>> {
        let egress_web = Policy {
            quarantined: None,
            id: ObjectRef::new("ns", "web-egress"),
            pod_selector: Selector::from_labels([("app", "web")]),
            ingress: None,
            egress: Some(vec![Rule {
                peers: None,
                ports: Some(vec![PortSpec { protocol: Protocol::Udp, port: PortMatch::Range(53, 53) }]),
            }]),
        };
        let deny_all = Policy {
            quarantined: None,
            id: ObjectRef::new("ns", "deny"),
            pod_selector: Selector::from_labels([("app", "api")]),
            ingress: Some(vec![]),
            egress: Some(vec![]),
        };
        proptest::sample::subsequence(vec![db_policy(), egress_web, deny_all], 0..=3)
    }

    /// The evaluator's verdict on a flow between the cluster's pods (or an outside address):
    /// the independent oracle (it reads the policies, not the ruleset).
    fn evaluator_allows(c: &Cluster, f: &Flow) -> Option<bool> {
        let endpoint = |ip: IpAddr| match c.pods.iter().position(|p| p.ips.contains(&ip)) {
            Some(i) => crate::policy::evaluate::Endpoint::Pod(i),
            None => crate::policy::evaluate::Endpoint::Ip(ip),
        };
        let protocol = match f.original.proto {
            6 => Protocol::Tcp,
            17 => Protocol::Udp,
            132 => Protocol::Sctp,
            _ => return None,
        };
        let conn = crate::policy::evaluate::Connection {
            src: endpoint(f.original.src),
            dst: endpoint(f.reply.src),
            protocol,
            port: f.reply.sport,
            ipv6: f.original.src.is_ipv6(),
        };
        Some(crate::policy::evaluate::evaluate(c, &conn).allowed)
    }

    proptest! {
        /// The property the feature rests on: a flow the policies allow (the evaluator says
        /// so, from the policies themselves) is never selected, whatever the NAT; and what is
        /// selected, the ruleset drops at the hook the flow crossed.
        #[test]
        fn a_flow_still_allowed_is_never_selected(policies in arb_policies(), flows in proptest::collection::vec(arb_flow(), 1..40)) {
            let c = cluster(pods(), policies);
            let rs = compile(&c, &NodeConfig::new(NODE));
            let interp = Interpreter::new(&rs);
            let a = addresses(&c);
            let picked = flows_to_delete(&flows, &HashSet::new(), Some((&interp, &a)));
            for (f, reason) in &picked {
                prop_assert_eq!(*reason, Reason::Denied);
                prop_assert_ne!(evaluator_allows(&c, f), Some(true), "allowed by the policies, yet selected: {}", f);
                prop_assert!(evaluator_allows(&c, f).is_some(), "not a policeable protocol: {}", f);
                let pkt = first_packet(f).unwrap();
                let hook = if a.node.contains(&pkt.dst) { Hook::Input } else { Hook::Forward };
                prop_assert_eq!(interp.hook(hook, &pkt), Fate::Drop, "selected yet accepted: {}", f);
            }
        }
    }
}
