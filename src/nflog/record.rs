//! A logged packet made into a drop record, pure: who was denied what, named as the
//! cluster knows them.
//!
//! ```text
//!  ReceivedPacket ──prefix──► attribution(prefix) ──► direction, policed pod, isolating policies
//!                 ──headers─► pod_at(src), pod_at(dst) ──► ns/pod, else the address
//!                             (pod_holding: the pods the agent last synced)
//!                 ──────────► DropRecord { time, prefix, attribution, src, dst, protocol, transport }
//! ```
//!
//! The lookups are the caller's (the agent builds them from the plan it compiled, which
//! gave each pod chain's drop its prefix): a prefix nobody knows (a rule of an older plan,
//! another program's log) still gives a record, unattributed.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use super::ReceivedPacket;
use super::wire::{Headers, PayloadError, Transport};
use crate::nft::names;
use crate::policy::model::{Direction as ModelDirection, Pod, Policy};

/// The direction a pod's chain polices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

/// A pod, `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What a log prefix stands for: the chain whose final drop logged the packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attribution {
    pub direction: Direction,
    /// The pod the chain polices (the destination for ingress, the source for egress).
    pub pod: PodRef,
    /// The policies isolating that pod in that direction (`ns/name`, or a cluster
    /// policy's kind and name), none of which allowed the packet.
    pub policies: Vec<String>,
}

/// One end of a dropped packet: a pod when the address is one, else the address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Pod(PodRef),
    Address(IpAddr),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Pod(p) => p.fmt(f),
            Endpoint::Address(a) => a.fmt(f),
        }
    }
}

/// A denied packet, attributed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DropRecord {
    /// When the kernel stamped the packet, else when it was read.
    pub time: SystemTime,
    pub prefix: String,
    /// `None`: the prefix is none the lookup knows.
    pub attribution: Option<Attribution>,
    /// The ends and protocol; `Err` when the copied bytes held no readable IP header.
    pub packet: Result<(Endpoint, Endpoint, u8, Transport), PayloadError>,
}

/// Makes `received` into a record: `attribution` says what a prefix stands for, `pod_at`
/// which pod holds an address.
pub fn drop_record(
    received: &ReceivedPacket,
    attribution: impl Fn(&str) -> Option<Attribution>,
    pod_at: impl Fn(IpAddr) -> Option<PodRef>,
) -> DropRecord {
    let p = &received.packet;
    let end = |ip: IpAddr| pod_at(ip).map_or(Endpoint::Address(ip), Endpoint::Pod);
    DropRecord {
        time: p.timestamp.unwrap_or(received.received_at),
        prefix: p.prefix.clone(),
        attribution: attribution(&p.prefix),
        packet: p.headers.map(|Headers { src, dst, protocol, transport }| (end(src), end(dst), protocol, transport)),
    }
}

/// The pod holding `ip` among `pods`, for [`drop_record`]'s `pod_at`. A hostNetwork pod
/// is not one: its address is its node's, shown as the address. One pass over the pods
/// per logged packet, which the rules' rate limit keeps rare.
pub fn pod_holding(pods: &[Arc<Pod>], ip: IpAddr) -> Option<PodRef> {
    pods.iter()
        .find(|p| !p.host_network && p.ips.contains(&ip))
        .map(|p| PodRef { namespace: p.id.namespace.clone(), name: p.id.name.clone() })
}

/// What each drop-log prefix of `node`'s ruleset stands for: the name of a pod chain
/// (the prefix the compiler gives its final drop's log rule) → the direction, the pod and
/// the NetworkPolicies isolating it. Found as the compiler finds them, from the same
/// snapshot ([`Policy::isolates`]: a pod chain ends in the drop exactly when some policy
/// isolates its pod; a test holds the two together on random clusters), for the pods of
/// `node` alone: the only ones with chains there.
pub fn attributions(pods: &[Arc<Pod>], policies: &[Arc<Policy>], node: &str) -> HashMap<String, Attribution> {
    // A policy isolates only pods of its own namespace.
    let mut by_namespace: HashMap<&str, Vec<&Policy>> = HashMap::new();
    for p in policies {
        by_namespace.entry(p.id.namespace.as_str()).or_default().push(p);
    }
    let mut out = HashMap::new();
    for pod in pods.iter().filter(|p| p.node == node && !p.host_network) {
        let candidates = by_namespace.get(pod.id.namespace.as_str()).map_or(&[][..], |v| v.as_slice());
        for (direction, model_direction) in
            [(Direction::Ingress, ModelDirection::Ingress), (Direction::Egress, ModelDirection::Egress)]
        {
            let isolating: Vec<String> =
                candidates.iter().filter(|p| p.isolates(pod, model_direction)).map(|p| p.id.to_string()).collect();
            if isolating.is_empty() {
                continue;
            }
            let chain = names::pod_chain(direction == Direction::Ingress, &pod.id.namespace, &pod.id.name);
            let pod_ref = PodRef { namespace: pod.id.namespace.clone(), name: pod.id.name.clone() };
            out.insert(chain, Attribution { direction, pod: pod_ref, policies: isolating });
        }
    }
    out
}

impl DropRecord {
    /// The protocol and what identifies the service: `TCP/443`, `ICMP 8/0` (type/code),
    /// `TCP (later fragment)`, `proto 47`.
    pub fn service(&self) -> String {
        let Ok((_, _, protocol, transport)) = &self.packet else { return "unknown".into() };
        let name = match protocol {
            6 => "TCP".to_string(),
            17 => "UDP".to_string(),
            132 => "SCTP".to_string(),
            1 => "ICMP".to_string(),
            58 => "ICMPv6".to_string(),
            n => format!("proto {n}"),
        };
        match transport {
            Transport::Ports { dst, .. } => format!("{name}/{dst}"),
            Transport::Icmp { kind, code } => format!("{name} {kind}/{code}"),
            Transport::LaterFragment => format!("{name} (later fragment)"),
            Transport::Truncated => format!("{name} (header not copied)"),
            Transport::Opaque => name,
        }
    }
}

impl fmt::Display for DropRecord {
    /// `denied ingress to shop/db (isolated by shop/db-from-web): shop/web -> shop/db TCP/5432`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.attribution {
            Some(a) => {
                let (direction, to_from) = match a.direction {
                    Direction::Ingress => ("ingress", "to"),
                    Direction::Egress => ("egress", "from"),
                };
                write!(f, "denied {direction} {to_from} {}", a.pod)?;
                if !a.policies.is_empty() {
                    write!(f, " (isolated by {})", a.policies.join(", "))?;
                }
            }
            None => write!(f, "denied by a rule logging {:?}", self.prefix)?,
        }
        match &self.packet {
            Ok((src, dst, ..)) => write!(f, ": {src} -> {dst} {}", self.service()),
            Err(e) => write!(f, ": packet unreadable ({e})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The attributions are not a guess: on random clusters (with tiers), every log prefix
    /// the compiler gives a pod chain is one of them, naming that chain's pod and exactly
    /// the policies its counted drop is labelled with, and no attribution names a chain
    /// that does not log.
    #[test]
    fn every_drop_log_prefix_the_compiler_writes_is_attributed_to_its_pod_and_isolating_policies() {
        use crate::cli::generate;
        use crate::compile::{NodeConfig, compile};
        let mut checked = 0;
        for seed in 0..200 {
            let cluster =
                if seed % 2 == 0 { generate::small_random(seed) } else { generate::small_random_tiered(seed) };
            for node in cluster.nodes() {
                let rs = compile(&cluster, &NodeConfig::new(node.clone()));
                let index = attributions(&cluster.pods, &cluster.policies, &node);
                let mut logged = 0;
                for chain in rs.chains.values() {
                    let Some(log) = chain.rules.iter().find_map(|r| r.log.as_ref()) else { continue };
                    let drop = chain.rules.iter().rev().find_map(|r| r.named_counter.as_ref()).expect("a counted drop");
                    let a =
                        index.get(&log.prefix).unwrap_or_else(|| panic!("seed {seed}: {} unattributed", log.prefix));
                    let names: Vec<&str> = a.policies.iter().map(|p| p.split_once('/').unwrap().1).collect();
                    assert_eq!(names.join(","), drop.labels.policy, "seed {seed}: {}", log.prefix);
                    assert!(a.policies.iter().all(|p| p.starts_with(&format!("{}/", a.pod.namespace))));
                    assert_eq!(
                        drop.labels.direction,
                        if a.direction == Direction::Ingress { "ingress" } else { "egress" }
                    );
                    logged += 1;
                }
                assert_eq!(logged, index.len(), "seed {seed} node {node}: an attribution without a logging chain");
                checked += logged;
            }
        }
        assert!(checked > 300, "only {checked} pod chains checked");
    }
    use crate::nflog::wire::{Family, Hook, LoggedPacket};
    use std::time::{Duration, UNIX_EPOCH};

    fn pod(ns: &str, name: &str) -> PodRef {
        PodRef { namespace: ns.into(), name: name.into() }
    }

    fn received(prefix: &str, headers: Result<Headers, PayloadError>, stamped: bool) -> ReceivedPacket {
        ReceivedPacket {
            packet: LoggedPacket {
                prefix: prefix.into(),
                hook: Ok(Hook::Forward),
                family: Family::Ipv4,
                timestamp: stamped.then(|| UNIX_EPOCH + Duration::from_secs(100)),
                indev: None,
                outdev: None,
                seq: Some(1),
                headers,
            },
            received_at: UNIX_EPOCH + Duration::from_secs(200),
        }
    }

    fn tcp(src: &str, dst: &str, port: u16) -> Result<Headers, PayloadError> {
        Ok(Headers {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            protocol: 6,
            transport: Transport::Ports { src: 40000, dst: port },
        })
    }

    /// The shop cluster: `np-in-3` is db's ingress chain, isolated by db-from-web; web is
    /// 10.0.0.2, db 10.0.0.3.
    fn shop_attribution(prefix: &str) -> Option<Attribution> {
        (prefix == "np-in-3").then(|| Attribution {
            direction: Direction::Ingress,
            pod: pod("shop", "db"),
            policies: vec!["shop/db-from-web".into()],
        })
    }

    fn shop_pod_at(ip: IpAddr) -> Option<PodRef> {
        match ip.to_string().as_str() {
            "10.0.0.2" => Some(pod("shop", "web")),
            "10.0.0.3" => Some(pod("shop", "db")),
            _ => None,
        }
    }

    #[test]
    fn a_denied_packet_names_the_policed_pod_its_policies_and_both_ends() {
        let r =
            drop_record(&received("np-in-3", tcp("10.0.0.2", "10.0.0.3", 5432), true), shop_attribution, shop_pod_at);
        assert_eq!(r.time, UNIX_EPOCH + Duration::from_secs(100), "the kernel's stamp");
        assert_eq!(r.attribution.as_ref().unwrap().pod, pod("shop", "db"));
        assert_eq!(
            r.to_string(),
            "denied ingress to shop/db (isolated by shop/db-from-web): shop/web -> shop/db TCP/5432"
        );
    }

    #[test]
    fn an_address_of_no_pod_is_shown_as_the_address_and_an_unknown_prefix_as_itself() {
        let r =
            drop_record(&received("np-out-9", tcp("192.0.2.7", "10.0.0.3", 22), false), shop_attribution, shop_pod_at);
        assert_eq!(r.time, UNIX_EPOCH + Duration::from_secs(200), "no stamp: when it was read");
        assert_eq!(r.attribution, None);
        assert_eq!(r.to_string(), "denied by a rule logging \"np-out-9\": 192.0.2.7 -> shop/db TCP/22");
    }

    #[test]
    fn an_address_is_a_pods_unless_only_a_host_network_pod_holds_it() {
        let model = |name: &str, ip: &str, host_network: bool| {
            Arc::new(Pod {
                id: crate::policy::model::ObjectRef::new("shop", name),
                labels: Arc::default(),
                node: crate::policy::model::NodeName::default(),
                ips: ip.parse::<IpAddr>().unwrap().into(),
                host_network,
                ports: Arc::new([]),
            })
        };
        let pods = vec![model("kube-proxy", "192.0.2.1", true), model("web", "10.0.0.2", false)];
        assert_eq!(pod_holding(&pods, "10.0.0.2".parse().unwrap()), Some(pod("shop", "web")));
        assert_eq!(pod_holding(&pods, "192.0.2.1".parse().unwrap()), None, "the node's address");
        assert_eq!(pod_holding(&pods, "10.0.0.9".parse().unwrap()), None);
    }

    #[test]
    fn egress_icmp_and_unreadable_packets_read_as_such() {
        let egress = |p: &str| {
            (p == "np-out-2").then(|| Attribution {
                direction: Direction::Egress,
                pod: pod("shop", "web"),
                policies: vec![],
            })
        };
        let icmp = Ok(Headers {
            src: "10.0.0.2".parse().unwrap(),
            dst: "10.0.0.9".parse().unwrap(),
            protocol: 1,
            transport: Transport::Icmp { kind: 8, code: 0 },
        });
        let r = drop_record(&received("np-out-2", icmp, false), egress, shop_pod_at);
        assert_eq!(r.to_string(), "denied egress from shop/web: shop/web -> 10.0.0.9 ICMP 8/0");
        let r = drop_record(&received("np-out-2", Err(PayloadError::Missing), false), egress, shop_pod_at);
        assert_eq!(r.to_string(), "denied egress from shop/web: packet unreadable (no packet bytes copied)");
        assert_eq!(r.service(), "unknown");
    }
}
