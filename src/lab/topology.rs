//! The lab's wiring as pure data: namespace names, MAC addresses and the `ip -batch`
//! scripts that build it. Nothing here touches the system, so the scripts are unit-tested.
//!
//! Every script runs with `ip -n <lab namespace> -batch -`, except the first one, which
//! only creates the namespaces (`netns add`). No line ever configures the root namespace.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Prefix of every network namespace a lab creates; `cleanup_leftovers` looks only at these.
pub const NETNS_PREFIX: &str = "npl-";

/// The next hop every pod routes to (IPv4), like Calico's `169.254.1.1`. The node owns it
/// (on `lo`), so it answers every pod's ARP request for it on the pod's veth: real ARP,
/// no static neighbour entry.
pub const POD_GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The next hop every pod routes to (IPv6): the node side of every pod veth carries this
/// link-local address and answers the pod's neighbour solicitations for it (real ND).
pub const POD_GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// MAC address of every node-side pod veth (the same on all of them, as Calico does).
pub const NODE_SIDE_MAC: &str = "ee:ee:ee:ee:ee:ee";
/// Name of the pod's interface.
pub const POD_IF: &str = "eth0";
/// Name of the node's interface into the fabric.
pub const FABRIC_IF: &str = "fab0";
/// Interface indexes are set explicitly so that the two ends of a veth never share one.
/// The kernel's link watcher treats a device whose index equals its peer's (`iflink`) as
/// not urgent and handles its carrier change up to a second later; until then the end
/// brought up first has no qdisc and drops every packet (measured: cross-node probes
/// failed for ~1 s when both fabric ends happened to be index 2 in their namespaces).
pub const POD_IF_INDEX: u32 = 10;
/// See [`POD_IF_INDEX`]: the node's fabric interface.
pub const FABRIC_IF_INDEX: u32 = 10;
/// See [`POD_IF_INDEX`]: node-side pod veth `p<j>` is `PEER_INDEX_BASE + j`, fabric port
/// `n<i>` is `PEER_INDEX_BASE + i`; both differ from their peers' index 10.
pub const PEER_INDEX_BASE: usize = 100;

/// Most nodes a lab wires (one /24 of fabric addresses, .254 being the router).
pub const MAX_NODES: usize = 250;

/// The fabric addresses of node `i`: `169.254.100.<i+1>/24` and `fd00:fab::<i+1>/64`.
pub fn fabric_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(169, 254, 100, u8::try_from(i + 1).expect("at most MAX_NODES nodes"))
}

/// See [`fabric_v4`].
pub fn fabric_v6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0xfab, 0, 0, 0, 0, 0, u16::try_from(i + 1).expect("at most MAX_NODES nodes"))
}

/// The fabric router's address as the nodes see it (a static neighbour entry only).
pub const FABRIC_GW_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 100, 254);
/// See [`FABRIC_GW_V4`].
pub const FABRIC_GW_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xfab, 0, 0, 0, 0, 0, 0xfe);

/// True for addresses a pod may not carry in the lab: the lab's own plumbing
/// (link-local, the fabric prefix) and addresses that are not unicast host addresses.
pub fn reserved(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_unspecified() || v4.is_loopback() || v4.is_link_local() || v4.is_multicast() || v4.is_broadcast()
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || v6.to_ipv4_mapped().is_some()
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] == 0xfd00 && s[1] == 0x0fab && s[2] == 0 && s[3] == 0)
        }
    }
}

/// MAC address of pod `j`'s `eth0` (locally administered, unique in the lab).
pub fn pod_mac(j: usize) -> String {
    let b = (j as u32).to_be_bytes();
    format!("02:00:00:{:02x}:{:02x}:{:02x}", b[1], b[2], b[3])
}

/// MAC address of node `i`'s fabric interface.
pub fn node_mac(i: usize) -> String {
    let b = (i as u32).to_be_bytes();
    format!("02:fa:00:{:02x}:{:02x}:{:02x}", b[1], b[2], b[3])
}

/// MAC address of the fabric router's port towards node `i`.
pub fn fabric_mac(i: usize) -> String {
    let b = (i as u32).to_be_bytes();
    format!("02:fb:00:{:02x}:{:02x}:{:02x}", b[1], b[2], b[3])
}

/// Name of the node-side veth of pod `j` (inside the node namespace).
pub fn pod_peer_if(j: usize) -> String {
    format!("p{j}")
}

/// Name of the fabric-side veth of node `i` (inside the fabric namespace).
pub fn fabric_port(i: usize) -> String {
    format!("n{i}")
}

/// The names of one lab run's namespaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    run_id: String,
}

impl Names {
    pub fn new(run_id: impl Into<String>) -> Self {
        Names { run_id: run_id.into() }
    }
    pub fn run_id(&self) -> &str {
        &self.run_id
    }
    pub fn node(&self, i: usize) -> String {
        format!("{NETNS_PREFIX}{}-n{i}", self.run_id)
    }
    pub fn pod(&self, j: usize) -> String {
        format!("{NETNS_PREFIX}{}-p{j}", self.run_id)
    }
    pub fn fabric(&self) -> String {
        format!("{NETNS_PREFIX}{}-fab", self.run_id)
    }
}

/// The pid encoded in a lab namespace name `npl-<pid>-<suffix>-<what>`, if it is one.
pub fn owner_pid(netns: &str) -> Option<u32> {
    let rest = netns.strip_prefix(NETNS_PREFIX)?;
    let (pid, _) = rest.split_once('-')?;
    pid.parse().ok()
}

/// What the scripts need to know about a pod.
#[derive(Clone, Debug)]
pub struct PodWiring {
    pub node: usize,
    pub ips: Vec<IpAddr>,
    /// A hostNetwork pod is a process of its node: no namespace of its own; its addresses
    /// belong to the node's namespace (on `lo`), and the fabric routes them to that node.
    pub host_network: bool,
}

/// The scripts that build a lab, in the order they must run. Scripts of one phase are
/// independent and may run concurrently.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Namespaces to create, in order (nodes, pods that are not hostNetwork, fabric). Run
    /// in the root namespace as `netns add` lines: the only root-namespace operation of a build.
    pub namespaces: Vec<String>,
    /// Per pod, the namespace its sockets live in: its own, or its node's for a hostNetwork pod.
    pub pod_netns: Vec<String>,
    /// Phase 1: one script per node namespace (creates the veths to its pods and to the
    /// fabric, addresses, routes, static neighbours).
    pub nodes: Vec<(String, String)>,
    /// Phase 2: the pods' scripts and the fabric's (they configure the far ends of the
    /// veths phase 1 created).
    pub ends: Vec<(String, String)>,
}

impl Plan {
    pub fn new(names: &Names, node_count: usize, pods: &[PodWiring]) -> Plan {
        let mut namespaces: Vec<String> = (0..node_count).map(|i| names.node(i)).collect();
        namespaces.extend(pods.iter().enumerate().filter(|(_, p)| !p.host_network).map(|(j, _)| names.pod(j)));
        namespaces.push(names.fabric());
        let pod_netns = pods
            .iter()
            .enumerate()
            .map(|(j, p)| if p.host_network { names.node(p.node) } else { names.pod(j) })
            .collect();
        // hostNetwork pods of one node may share an address (they are the node): each
        // address is configured and routed once.
        let mut routed = std::collections::HashSet::new();
        let unique_ips: Vec<(usize, &PodWiring, Vec<IpAddr>)> = pods
            .iter()
            .enumerate()
            .map(|(j, p)| (j, p, p.ips.iter().copied().filter(|ip| routed.insert(*ip)).collect()))
            .collect();

        let fabric = names.fabric();
        let mut nodes = Vec::with_capacity(node_count);
        for i in 0..node_count {
            let mut s = String::new();
            let _ = writeln!(s, "link set lo up");
            let _ = writeln!(
                s,
                "link add {FABRIC_IF} index {FABRIC_IF_INDEX} address {} type veth peer name {} netns {fabric} index {} address {}",
                node_mac(i),
                fabric_port(i),
                PEER_INDEX_BASE + i,
                fabric_mac(i)
            );
            let _ = writeln!(s, "link set {FABRIC_IF} up");
            let _ = writeln!(s, "addr add {}/24 dev {FABRIC_IF}", fabric_v4(i));
            let _ = writeln!(s, "addr add {}/64 dev {FABRIC_IF} nodad", fabric_v6(i));
            for gw in [IpAddr::V4(FABRIC_GW_V4), IpAddr::V6(FABRIC_GW_V6)] {
                let _ = writeln!(s, "neigh add {gw} lladdr {} dev {FABRIC_IF} nud permanent", fabric_mac(i));
            }
            if unique_ips.iter().any(|(_, pod, _)| pod.node == i && !pod.host_network) {
                let _ = writeln!(s, "addr add {POD_GATEWAY_V4}/32 dev lo");
            }
            for (j, pod, ips) in &unique_ips {
                let j = *j;
                if pod.node == i && pod.host_network {
                    // The node's own addresses, on `lo` so no link needs to come up: packets to
                    // them are delivered locally (the `input` hook), packets from them are
                    // sent by the node (`output`, which the ruleset leaves alone).
                    for ip in ips {
                        let nodad = if ip.is_ipv6() { " nodad" } else { "" };
                        let _ = writeln!(s, "addr add {} dev lo{nodad}", host_prefix(*ip));
                    }
                } else if pod.node == i {
                    let peer = pod_peer_if(j);
                    let _ = writeln!(
                        s,
                        "link add {peer} index {} address {NODE_SIDE_MAC} type veth peer name {POD_IF} netns {} index {POD_IF_INDEX} address {}",
                        PEER_INDEX_BASE + j,
                        names.pod(j),
                        pod_mac(j)
                    );
                    let _ = writeln!(s, "link set {peer} up");
                    let _ = writeln!(s, "addr add {POD_GATEWAY_V6}/64 dev {peer} nodad");
                    // No neighbour entry: the node finds the pod by ARP and ND, as a real node.
                    for ip in ips {
                        let _ = writeln!(s, "route add {} dev {peer}", host_prefix(*ip));
                    }
                } else {
                    for ip in ips {
                        let via = match ip {
                            IpAddr::V4(_) => IpAddr::V4(FABRIC_GW_V4),
                            IpAddr::V6(_) => IpAddr::V6(FABRIC_GW_V6),
                        };
                        let _ = writeln!(s, "route add {} via {via} dev {FABRIC_IF}", host_prefix(*ip));
                    }
                }
            }
            nodes.push((names.node(i), s));
        }

        let mut ends = Vec::with_capacity(pods.len() + 1);
        for (j, pod) in pods.iter().enumerate().filter(|(_, p)| !p.host_network) {
            let mut s = String::new();
            let _ = writeln!(s, "link set lo up");
            let _ = writeln!(s, "link set {POD_IF} up");
            for ip in &pod.ips {
                let nodad = if ip.is_ipv6() { " nodad" } else { "" };
                let _ = writeln!(s, "addr add {} dev {POD_IF}{nodad}", host_prefix(*ip));
            }
            // The gateways are found by ARP and ND (no neighbour entry): the pod's
            // solicitations cross the node's `input` hook, where the ruleset must let them by.
            let _ = writeln!(s, "route add 0.0.0.0/0 via {POD_GATEWAY_V4} dev {POD_IF} onlink");
            let _ = writeln!(s, "route add ::/0 via {POD_GATEWAY_V6} dev {POD_IF}");
            ends.push((names.pod(j), s));
        }
        let mut s = String::new();
        let _ = writeln!(s, "link set lo up");
        for i in 0..node_count {
            let port = fabric_port(i);
            let _ = writeln!(s, "link set {port} up");
            for gw in [IpAddr::V4(fabric_v4(i)), IpAddr::V6(fabric_v6(i))] {
                let _ = writeln!(s, "neigh add {gw} lladdr {} dev {port} nud permanent", node_mac(i));
            }
        }
        for (_, pod, ips) in &unique_ips {
            for ip in ips {
                let via = match ip {
                    IpAddr::V4(_) => IpAddr::V4(fabric_v4(pod.node)),
                    IpAddr::V6(_) => IpAddr::V6(fabric_v6(pod.node)),
                };
                let _ = writeln!(s, "route add {} via {via} dev {} onlink", host_prefix(*ip), fabric_port(pod.node));
            }
        }
        ends.push((fabric, s));

        Plan { namespaces, pod_netns, nodes, ends }
    }
}

fn host_prefix(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}/32"),
        IpAddr::V6(v6) => format!("{v6}/128"),
    }
}

/// Sysctls (path under `/proc/sys`, value) a node namespace needs before its interfaces
/// exist, so the `default` values reach them: forwarding on, no reverse-path filter, no
/// IPv6 duplicate address detection (it would hold addresses tentative for ~2 s).
pub const NODE_SYSCTLS: &[(&str, &str)] = &[
    ("net/ipv4/conf/all/rp_filter", "0"),
    ("net/ipv4/conf/default/rp_filter", "0"),
    ("net/ipv4/ip_forward", "1"),
    ("net/ipv6/conf/all/accept_dad", "0"),
    ("net/ipv6/conf/default/accept_dad", "0"),
    ("net/ipv6/conf/all/forwarding", "1"),
];

/// Sysctls the fabric router needs before its interfaces exist.
pub const FABRIC_SYSCTLS: &[(&str, &str)] = NODE_SYSCTLS;

/// Sysctls a pod namespace needs before its interface exists.
pub const POD_SYSCTLS: &[(&str, &str)] = &[
    ("net/ipv4/conf/all/rp_filter", "0"),
    ("net/ipv4/conf/default/rp_filter", "0"),
    ("net/ipv6/conf/all/accept_dad", "0"),
    ("net/ipv6/conf/default/accept_dad", "0"),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn names_carry_the_pid_so_leftovers_can_be_attributed() {
        let n = Names::new("4242-1abcd");
        assert_eq!(n.node(0), "npl-4242-1abcd-n0");
        assert_eq!(n.pod(3), "npl-4242-1abcd-p3");
        assert_eq!(n.fabric(), "npl-4242-1abcd-fab");
        assert_eq!(owner_pid(&n.pod(3)), Some(4242));
        assert_eq!(owner_pid("npl-x-1"), None);
        assert_eq!(owner_pid("other-1-2"), None);
    }

    #[test]
    fn lab_plumbing_addresses_are_reserved() {
        assert!(reserved(ip("169.254.1.1")));
        assert!(reserved(ip("fd00:fab::3")));
        assert!(reserved(ip("fe80::1")));
        assert!(reserved(ip("127.0.0.1")));
        assert!(reserved(ip("::ffff:10.0.0.1")));
        assert!(!reserved(ip("10.0.0.1")));
        assert!(!reserved(ip("fd00::1")));
    }

    #[test]
    fn local_pods_are_routed_to_their_veth_and_remote_pods_via_the_owner_node() {
        let pods = vec![
            PodWiring { node: 0, ips: vec![ip("10.0.0.1"), ip("fd00::1")], host_network: false },
            PodWiring { node: 1, ips: vec![ip("10.0.1.1")], host_network: false },
        ];
        let plan = Plan::new(&Names::new("1-a"), 2, &pods);
        assert_eq!(plan.namespaces.len(), 5);
        let (ns, n0) = &plan.nodes[0];
        assert_eq!(ns, "npl-1-a-n0");
        assert!(n0.contains(
            "link add p0 index 100 address ee:ee:ee:ee:ee:ee type veth peer name eth0 netns npl-1-a-p0 index 10 address 02:00:00:00:00:00\n"
        ));
        assert!(n0.contains("route add 10.0.0.1/32 dev p0\n"));
        // Real neighbour discovery between pods and their node: the node owns the gateways.
        assert!(n0.contains("addr add 169.254.1.1/32 dev lo\n"));
        assert!(n0.contains("addr add fe80::1/64 dev p0 nodad\n"));
        assert!(!n0.contains("dev p0 nud permanent"), "{n0}");
        assert!(!plan.ends[0].1.contains("neigh add"), "{}", plan.ends[0].1);
        assert!(n0.contains("route add fd00::1/128 dev p0\n"));
        assert!(n0.contains("route add 10.0.1.1/32 via 169.254.100.254 dev fab0\n"));
        assert!(n0.contains("neigh add 169.254.100.254 lladdr 02:fb:00:00:00:00 dev fab0 nud permanent\n"));
        let (_, p0) = &plan.ends[0];
        assert!(p0.contains("addr add fd00::1/128 dev eth0 nodad\n"));
        assert!(p0.contains("route add 0.0.0.0/0 via 169.254.1.1 dev eth0 onlink\n"));
        let (fab, f) = plan.ends.last().unwrap();
        assert_eq!(fab, "npl-1-a-fab");
        assert!(f.contains("route add 10.0.1.1/32 via 169.254.100.2 dev n1 onlink\n"));
        assert!(f.contains("route add fd00::1/128 via fd00:fab::1 dev n0 onlink\n"));
        assert!(f.contains("neigh add 169.254.100.2 lladdr 02:fa:00:00:00:01 dev n1 nud permanent\n"));
        // No script line mentions the root namespace: every script runs under `ip -n`.
        assert!(plan.nodes.iter().chain(&plan.ends).all(|(ns, _)| ns.starts_with(NETNS_PREFIX)));
    }

    #[test]
    fn host_network_pods_are_addresses_of_their_node_routed_to_it_by_the_fabric() {
        let pods = vec![
            PodWiring { node: 0, ips: vec![ip("10.0.0.1")], host_network: false },
            PodWiring { node: 1, ips: vec![ip("10.0.1.9"), ip("fd00::9")], host_network: true },
            // A second hostNetwork pod of node 1 with the node's address again.
            PodWiring { node: 1, ips: vec![ip("10.0.1.9")], host_network: true },
        ];
        let plan = Plan::new(&Names::new("1-a"), 2, &pods);
        // No namespace of their own; their sockets live in node 1's.
        assert_eq!(plan.namespaces, ["npl-1-a-n0", "npl-1-a-n1", "npl-1-a-p0", "npl-1-a-fab"]);
        assert_eq!(plan.pod_netns, ["npl-1-a-p0", "npl-1-a-n1", "npl-1-a-n1"]);
        let n1 = &plan.nodes[1].1;
        assert_eq!(n1.matches("addr add 10.0.1.9/32 dev lo\n").count(), 1, "{n1}");
        assert!(n1.contains("addr add fd00::9/128 dev lo nodad\n"));
        assert!(!n1.contains("link add p1"));
        let n0 = &plan.nodes[0].1;
        assert_eq!(n0.matches("route add 10.0.1.9/32 via 169.254.100.254 dev fab0\n").count(), 1);
        let fab = &plan.ends.last().unwrap().1;
        assert_eq!(fab.matches("route add 10.0.1.9/32 via 169.254.100.2 dev n1 onlink\n").count(), 1);
        assert!(fab.contains("route add fd00::9/128 via fd00:fab::2 dev n1 onlink\n"));
        assert_eq!(plan.ends.len(), 2, "one pod script and the fabric's");
    }
}
