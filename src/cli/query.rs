//! Turning what a user types (`ns/pod` or an IP, a port number or name) into a
//! [`Connection`] to evaluate. Shared by the CLI and the tests.
//!
//! ```text
//!  Cluster + node IPs (from the loader) ──► with_node_endpoints ──► Cluster (+ node endpoints)
//!  "tenant-a/nginx", "10.1.2.3", "http", TCP, Family ──► Connection{src, dst, protocol, port, ipv6}
//! ```

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::policy::evaluate::{Connection, Endpoint};
use crate::policy::matrix::{Family, ProbePort};
use crate::policy::model::{Cluster, ObjectRef, Pod, PodIps, Protocol};

/// The namespace that names node endpoints (`node/<node name>`) in answers.
pub const NODE_ENDPOINT_NAMESPACE: &str = "node";

/// `NAMESPACE/POD`, or an IP address: an IP that belongs to a pod means that pod; one of a
/// hostNetwork pod means its node, which every hostNetwork pod of that node stands for.
pub fn resolve_endpoint(cluster: &Cluster, text: &str) -> Result<Endpoint, String> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        let host = || cluster.pods.iter().position(|p| p.host_network && p.ips.contains(&ip));
        return Ok(cluster.pod_by_ip(ip).or_else(host).map(Endpoint::Pod).unwrap_or(Endpoint::Ip(ip)));
    }
    if text.parse::<IpNet>().is_ok() {
        return Err(format!("{text:?} is a CIDR, not an endpoint (give one IP address, or NAMESPACE/POD)"));
    }
    let Some((ns, name)) = text.split_once('/') else {
        return Err(format!("{text:?} is neither NAMESPACE/POD nor an IP address"));
    };
    cluster
        .pod_index(&ObjectRef::new(ns, name))
        .map(Endpoint::Pod)
        .ok_or_else(|| format!("no pod {text} in the input (pods without an IP, or in a terminal phase, take no part)"))
}

/// The cluster, plus a node endpoint for each of `endpoints` that is the address of a node
/// (`node_ips`: a Node object's InternalIP, or a pod's `status.hostIP`) but of no pod: a hostNetwork pod
/// `node/<node name>` of that node. That is what a node is to every engine: traffic it sends
/// to its own pods is always allowed, and policies see it by IP (ipBlock) only.
pub fn with_node_endpoints(cluster: &Cluster, node_ips: &BTreeMap<IpAddr, String>, endpoints: &[&str]) -> Cluster {
    let mut nodes: Vec<Pod> = Vec::new();
    for text in endpoints {
        let Ok(ip) = text.parse::<IpAddr>() else { continue };
        let Some(node) = node_ips.get(&ip) else { continue };
        if cluster.pods.iter().any(|p| p.ips.contains(&ip)) || nodes.iter().any(|p| p.ips.contains(&ip)) {
            continue;
        }
        nodes.push(Pod {
            id: ObjectRef::new(NODE_ENDPOINT_NAMESPACE, node.clone()),
            labels: Arc::default(),
            node: node.as_str().into(),
            ips: PodIps::from(ip),
            host_network: true,
            ports: Arc::new([]),
        });
    }
    if nodes.is_empty() {
        return cluster.clone();
    }
    let pods: Vec<Arc<Pod>> = cluster.pods.iter().cloned().chain(nodes.into_iter().map(Arc::new)).collect();
    Cluster::new(cluster.namespaces.values().cloned().collect(), pods, cluster.policies.iter().cloned()).with_tiers(
        cluster.cluster_policies.iter().cloned(),
        cluster.nodes.to_vec(),
        cluster.domains.as_ref().clone(),
    )
}

/// A port as typed: a number in 1..=65535, or a valid container port name.
pub fn parse_port(text: &str) -> Result<ProbePort, String> {
    match text.parse::<u32>() {
        Ok(n) if (1..=65535).contains(&n) => Ok(ProbePort::Number(n as u16)),
        Ok(n) => Err(format!("{n} is not a port (1-65535)")),
        Err(_) => {
            crate::validate::port_name(text)?;
            Ok(ProbePort::Named(text.to_string()))
        }
    }
}

/// A port number, or a container port name resolved on the destination pod.
pub fn resolve_port(cluster: &Cluster, dst: Endpoint, port: &str, protocol: Protocol) -> Result<u16, String> {
    match (parse_port(port)?, dst) {
        (ProbePort::Number(n), _) => Ok(n),
        (ProbePort::Named(name), Endpoint::Pod(j)) => cluster.pods[j]
            .resolve_named_port(&name, protocol)
            .ok_or_else(|| format!("{} declares no {protocol} port named {name:?}", cluster.pods[j].id)),
        (ProbePort::Named(_), Endpoint::Ip(_)) => {
            Err("a named port needs a pod destination (it is resolved on the destination pod)".into())
        }
    }
}

/// The family a connection uses: forced, or that of an IP endpoint the user typed, or the
/// destination pod's primary one.
pub fn connection_family(cluster: &Cluster, src: Endpoint, dst: Endpoint, family: Family) -> bool {
    match (family, src, dst) {
        (Family::Ipv4, ..) => false,
        (Family::Ipv6, ..) => true,
        (Family::Primary, _, Endpoint::Ip(ip)) => ip.is_ipv6(),
        (Family::Primary, Endpoint::Ip(ip), Endpoint::Pod(j))
            if cluster.pods[j].ip_of_family(ip.is_ipv6()).is_some() =>
        {
            ip.is_ipv6()
        }
        (Family::Primary, _, Endpoint::Pod(j)) => Family::Primary.ipv6_towards(cluster, j),
    }
}

/// Everything at once: the connection a user asked about.
pub fn connection(
    cluster: &Cluster,
    from: &str,
    to: &str,
    port: &str,
    protocol: Protocol,
    family: Family,
) -> Result<Connection, String> {
    let src = resolve_endpoint(cluster, from).map_err(|e| format!("--from: {e}"))?;
    let dst = resolve_endpoint(cluster, to).map_err(|e| format!("--to: {e}"))?;
    let port = resolve_port(cluster, dst, port, protocol).map_err(|e| format!("--port: {e}"))?;
    Ok(Connection { src, dst, protocol, port, ipv6: connection_family(cluster, src, dst, family) })
}
