//! Services, and the endpoints a Service's port stands for: what `query --to svc/NS/NAME`
//! and `matrix --services` ask about.
//!
//! ```text
//!  Service{selector, ports} ──► port (number or name) ──► ServicePort{port, targetPort, protocol}
//!         │                                                   │
//!  Cluster pods ──► same namespace, selector matches ─────────┴─► targetPort resolved per pod
//!                                                                 ──► [ServiceEndpoint{pod, port}]
//! ```
//!
//! A Service changes no policy verdict: kube-proxy rewrites the Service's address to one
//! endpoint's (DNAT) before the packet reaches any NetworkPolicy, so each endpoint is
//! answered as the pod-to-pod connection it becomes. Pure: no I/O.

use std::fmt;

use crate::policy::model::{Cluster, Labels, ObjectRef, Protocol};

/// A v1 Service after defaulting and validation: what endpoints need of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub id: ObjectRef,
    /// `spec.selector`. "If empty or not present, the service is assumed to have an
    /// external process managing its endpoints, which Kubernetes will not modify": `None`.
    pub selector: Option<Labels>,
    /// `spec.type: ExternalName`: a DNS alias; "ExternalName services ... have no selector
    /// and ... no endpoints" (the EndpointSlice controller skips them whatever they select).
    pub external_name: Option<String>,
    /// In the order written; each `(port, protocol)` once, names unique.
    pub ports: Vec<ServicePort>,
}

/// One entry of `spec.ports`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// Required (a DNS label) when the Service has more than one port.
    pub name: Option<String>,
    /// The port the Service's own address listens on.
    pub port: u16,
    pub target: TargetPort,
    pub protocol: Protocol,
}

/// `targetPort`: "Number or name of the port to access on the pods targeted by the
/// service ... If this is a string, it will be looked up as a named port in the target
/// Pod's container ports. If this is not specified, the value of the 'port' field is used."
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Named(String),
}

impl fmt::Display for TargetPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetPort::Number(n) => write!(f, "{n}"),
            TargetPort::Named(name) => f.write_str(name),
        }
    }
}

impl fmt::Display for ServicePort {
    /// `TCP/80 (http) -> targetPort 8080`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.protocol, self.port)?;
        if let Some(name) = &self.name {
            write!(f, " ({name})")?;
        }
        write!(f, " -> targetPort {}", self.target)
    }
}

/// A pod a Service port sends to, with the port number its targetPort resolves to there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceEndpoint {
    /// Index into [`Cluster::pods`].
    pub pod: usize,
    pub port: u16,
}

/// What an EndpointSlice says of an endpoint besides its address: kube-proxy sends new
/// connections to `ready` endpoints, and only when a Service has none of those to the
/// serving ones that are `terminating`. The controller lists both kinds (and not-ready ones),
/// so they are answered like the others and marked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointConditions {
    /// The pod's `Ready` condition is `True` (`podutil.IsPodReady`).
    pub ready: bool,
    /// The pod has a `deletionTimestamp`: it is shutting down.
    pub terminating: bool,
}

impl Default for EndpointConditions {
    fn default() -> Self {
        EndpointConditions { ready: true, terminating: false }
    }
}

impl EndpointConditions {
    /// Why kube-proxy may not send this endpoint new connections, if it may not always.
    pub fn caveat(&self) -> Option<&'static str> {
        // A terminating endpoint is never `ready` in its EndpointSlice; `serving` is its Ready
        // condition, and kube-proxy falls back to serving terminating endpoints only.
        match (self.ready, self.terminating) {
            (true, true) => Some(
                "terminating (deletionTimestamp set): kube-proxy sends it new connections only while the Service has no ready endpoint",
            ),
            (false, true) => Some(
                "terminating (deletionTimestamp set) and not ready (its Ready condition is not True): kube-proxy sends it no new connections",
            ),
            (false, false) => {
                Some("not ready (its Ready condition is not True): kube-proxy sends it no new connections")
            }
            (true, false) => None,
        }
    }
}

/// A Service port's endpoints, and the selected pods that are not endpoints of it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Endpoints {
    pub endpoints: Vec<ServiceEndpoint>,
    /// Pods the selector matches that declare no container port of the targetPort's name
    /// and protocol: the EndpointSlice controller leaves them out of that port.
    pub lacking_port: Vec<usize>,
}

/// Why a Service has no endpoints that can be computed from the input's pods.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotComputable {
    /// No selector: whoever manages its EndpointSlices, it is not the controller.
    NoSelector,
    /// `type: ExternalName`: a DNS name, resolved by clients, with no endpoints.
    ExternalName(String),
}

impl fmt::Display for NotComputable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotComputable::NoSelector => f.write_str(
                "has no selector: its endpoints are managed outside Kubernetes (EndpointSlices written by hand or \
                 by another controller) and cannot be computed from pods",
            ),
            NotComputable::ExternalName(name) => write!(
                f,
                "is of type ExternalName (a DNS alias for {name}): it has no endpoints; ask about the address {name} \
                 resolves to instead"
            ),
        }
    }
}

impl Service {
    /// The Service port a user named: a number (with the protocol, when several ports share
    /// the number; without one, TCP first) or a port's name.
    pub fn port(&self, text: &str, protocol: Option<Protocol>) -> Result<&ServicePort, String> {
        let found = match text.parse::<u32>() {
            Ok(number) => {
                let same: Vec<&ServicePort> = self.ports.iter().filter(|p| u32::from(p.port) == number).collect();
                match protocol {
                    Some(protocol) => same.into_iter().find(|p| p.protocol == protocol),
                    None => same.iter().find(|p| p.protocol == Protocol::Tcp).or(same.first()).copied(),
                }
            }
            Err(_) => {
                let named = self.ports.iter().find(|p| p.name.as_deref() == Some(text));
                if let (Some(port), Some(protocol)) = (named, protocol)
                    && port.protocol != protocol
                {
                    return Err(format!("port {text:?} of service {} is {}, not {protocol}", self.id, port.protocol));
                }
                named
            }
        };
        found.ok_or_else(|| {
            let wanted = match protocol {
                Some(protocol) => format!("{protocol} port {text:?}"),
                None => format!("port {text:?}"),
            };
            format!("service {} has no {wanted}; its ports: {}", self.id, self.describe_ports())
        })
    }

    /// `TCP/80 (http) -> targetPort 8080, UDP/53 (dns) -> targetPort 53`.
    pub fn describe_ports(&self) -> String {
        if self.ports.is_empty() {
            return "none".into();
        }
        self.ports.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    }

    /// The selector the EndpointSlice controller builds endpoints from, or why it builds
    /// none: it skips ExternalName Services, and those without a selector.
    pub fn selector(&self) -> Result<&Labels, NotComputable> {
        if let Some(name) = &self.external_name {
            return Err(NotComputable::ExternalName(name.clone()));
        }
        self.selector.as_ref().ok_or(NotComputable::NoSelector)
    }

    /// The endpoints of `port` as the EndpointSlice controller computes them from pods:
    /// every pod of the Service's namespace whose labels match the selector and that takes
    /// part at all (the model holds only pods with an IP and not in a terminal phase:
    /// `ShouldPodBeInEndpoints` keeps exactly those, terminating ones included), hostNetwork
    /// pods too (their address is their node's). The controller looks up a named targetPort
    /// on each pod's container ports (`FindPort`: name and protocol), so endpoints may get
    /// different numbers, and a pod without the name is no endpoint of that port.
    pub fn endpoints(&self, cluster: &Cluster, port: &ServicePort) -> Result<Endpoints, NotComputable> {
        let selector = self.selector()?;
        let mut out = Endpoints::default();
        for (i, pod) in cluster.pods.iter().enumerate() {
            // A Service's selector is a plain label map: every pair must be on the pod.
            let selected =
                pod.id.namespace == self.id.namespace && selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v));
            if !selected {
                continue;
            }
            let number = match &port.target {
                TargetPort::Number(n) => Some(*n),
                TargetPort::Named(name) => pod.resolve_named_port(name, port.protocol),
            };
            match number {
                Some(port) => out.endpoints.push(ServiceEndpoint { pod: i, port }),
                None => out.lacking_port.push(i),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::sync::Arc;

    use super::*;
    use crate::policy::model::{ContainerPort, NodeName, Pod, PodIps};

    /// A pod of `namespace` with `labels` and `(name, port, protocol)` container ports.
    fn pod(namespace: &str, name: &str, labels: &[(&str, &str)], ports: &[(&str, u16, Protocol)]) -> Pod {
        Pod {
            id: ObjectRef::new(namespace, name),
            labels: Arc::new(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            node: NodeName::from("node-a"),
            ips: PodIps::from(IpAddr::from([192, 0, 2, 1])),
            host_network: false,
            ports: ports
                .iter()
                .map(|(n, port, protocol)| ContainerPort {
                    name: Some(n.to_string()),
                    port: *port,
                    protocol: *protocol,
                })
                .collect::<Vec<_>>()
                .into(),
        }
    }

    fn service(selector: Option<&[(&str, &str)]>, ports: Vec<ServicePort>) -> Service {
        Service {
            id: ObjectRef::new("shop", "web"),
            selector: selector.map(|s| s.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            external_name: None,
            ports,
        }
    }

    fn service_port(name: &str, port: u16, target: TargetPort, protocol: Protocol) -> ServicePort {
        ServicePort { name: Some(name.into()), port, target, protocol }
    }

    fn names(cluster: &Cluster, pods: impl IntoIterator<Item = usize>) -> Vec<String> {
        pods.into_iter().map(|i| cluster.pods[i].id.to_string()).collect()
    }

    #[test]
    fn a_named_target_port_resolves_on_each_pod_and_pods_without_the_name_are_no_endpoints() {
        let cluster = Cluster::new(
            vec![],
            vec![
                pod("shop", "a", &[("app", "web")], &[("http", 8080, Protocol::Tcp)]),
                pod("shop", "b", &[("app", "web")], &[("http", 9090, Protocol::Tcp)]),
                pod("shop", "c", &[("app", "web")], &[("metrics", 9100, Protocol::Tcp)]),
                // The name with another protocol is not the port: FindPort matches both.
                pod("shop", "d", &[("app", "web")], &[("http", 8080, Protocol::Udp)]),
            ],
            Vec::<crate::policy::model::Policy>::new(),
        );
        let port = service_port("web", 80, TargetPort::Named("http".into()), Protocol::Tcp);
        let svc = service(Some(&[("app", "web")]), vec![port.clone()]);
        let got = svc.endpoints(&cluster, &port).unwrap();
        assert_eq!(got.endpoints, [ServiceEndpoint { pod: 0, port: 8080 }, ServiceEndpoint { pod: 1, port: 9090 }]);
        assert_eq!(names(&cluster, got.lacking_port), ["shop/c", "shop/d"]);
    }

    #[test]
    fn a_numeric_target_port_is_the_same_on_every_selected_pod_declared_or_not() {
        let cluster = Cluster::new(
            vec![],
            vec![
                pod("shop", "a", &[("app", "web"), ("tier", "1")], &[]),
                pod("shop", "b", &[("app", "api")], &[]),
                pod("other", "c", &[("app", "web")], &[]),
            ],
            Vec::<crate::policy::model::Policy>::new(),
        );
        let port = service_port("web", 80, TargetPort::Number(8080), Protocol::Tcp);
        let svc = service(Some(&[("app", "web")]), vec![port.clone()]);
        let got = svc.endpoints(&cluster, &port).unwrap();
        // Only the Service's own namespace, only pods carrying every selector label.
        assert_eq!(names(&cluster, got.endpoints.iter().map(|e| e.pod)), ["shop/a"]);
        assert!(got.endpoints.iter().all(|e| e.port == 8080));
        assert!(got.lacking_port.is_empty());
    }

    #[test]
    fn a_service_without_a_selector_or_of_type_external_name_has_no_computable_endpoints() {
        let cluster =
            Cluster::new(vec![], vec![pod("shop", "a", &[], &[])], Vec::<crate::policy::model::Policy>::new());
        let port = service_port("web", 80, TargetPort::Number(80), Protocol::Tcp);
        let none = service(None, vec![port.clone()]);
        assert_eq!(none.endpoints(&cluster, &port), Err(NotComputable::NoSelector));
        let alias = Service { external_name: Some("db.example.com".into()), ..service(Some(&[]), vec![port.clone()]) };
        assert_eq!(alias.endpoints(&cluster, &port), Err(NotComputable::ExternalName("db.example.com".into())));
    }

    #[test]
    fn pods_in_a_terminal_phase_or_without_an_ip_never_reach_the_model_so_are_never_endpoints() {
        use crate::k8s::convert::{PodOutcome, pod as convert_pod};
        let text = |phase: &str, ip: &str| {
            format!(
                r#"{{"metadata": {{"name": "p", "namespace": "shop", "labels": {{"app": "web"}}}},
                    "spec": {{"nodeName": "n", "containers": []}},
                    "status": {{"phase": "{phase}", "podIP": "{ip}"}}}}"#
            )
        };
        let outcome = |phase: &str, ip: &str| {
            let p: k8s_openapi::api::core::v1::Pod = serde_json::from_str(&text(phase, ip)).unwrap();
            convert_pod(&p, None).unwrap()
        };
        assert!(matches!(outcome("Running", "10.0.0.1"), PodOutcome::Pod(_)));
        assert!(matches!(outcome("Pending", "10.0.0.1"), PodOutcome::Pod(_)));
        assert_eq!(outcome("Succeeded", "10.0.0.1"), PodOutcome::Inactive("in a terminal phase"));
        assert_eq!(outcome("Failed", "10.0.0.1"), PodOutcome::Inactive("in a terminal phase"));
        let no_ip: k8s_openapi::api::core::v1::Pod = serde_json::from_str(
            r#"{"metadata": {"name": "p", "namespace": "shop"}, "spec": {"nodeName": "n", "containers": []}, "status": {"phase": "Pending"}}"#,
        )
        .unwrap();
        assert_eq!(convert_pod(&no_ip, None).unwrap(), PodOutcome::Inactive("has no IP yet"));
    }

    #[test]
    fn host_network_pods_are_endpoints_like_any_selected_pod() {
        let mut host = pod("shop", "h", &[("app", "web")], &[]);
        host.host_network = true;
        let cluster = Cluster::new(vec![], vec![host], Vec::<crate::policy::model::Policy>::new());
        let port = service_port("web", 80, TargetPort::Number(80), Protocol::Tcp);
        let svc = service(Some(&[("app", "web")]), vec![port.clone()]);
        assert_eq!(svc.endpoints(&cluster, &port).unwrap().endpoints, [ServiceEndpoint { pod: 0, port: 80 }]);
    }

    #[test]
    fn a_port_is_found_by_number_preferring_tcp_or_by_name_and_an_unknown_one_lists_the_ports() {
        let svc = service(
            Some(&[]),
            vec![
                service_port("dns-udp", 53, TargetPort::Number(5353), Protocol::Udp),
                service_port("dns-tcp", 53, TargetPort::Number(5353), Protocol::Tcp),
            ],
        );
        assert_eq!(svc.port("53", None).unwrap().name.as_deref(), Some("dns-tcp"));
        assert_eq!(svc.port("53", Some(Protocol::Udp)).unwrap().name.as_deref(), Some("dns-udp"));
        assert_eq!(svc.port("dns-udp", None).unwrap().protocol, Protocol::Udp);
        assert_eq!(
            svc.port("dns-udp", Some(Protocol::Tcp)).unwrap_err(),
            "port \"dns-udp\" of service shop/web is UDP, not TCP"
        );
        assert_eq!(
            svc.port("80", None).unwrap_err(),
            "service shop/web has no port \"80\"; its ports: UDP/53 (dns-udp) -> targetPort 5353, TCP/53 (dns-tcp) -> targetPort 5353"
        );
        assert!(svc.port("53", Some(Protocol::Sctp)).is_err());
    }
}
