//! The one door between Kubernetes API types (k8s-openapi) and our model.
//!
//! ```text
//!  k8s_openapi::{Namespace, Pod, NetworkPolicy, Service} ──► convert::{namespace, pod, policy, service}
//!        (as a client sent them)                                 │ defaulting + validation
//!  SlimPod (the agent's watch: only the fields read) ──► convert::slim_pod
//!                                                                ▼
//!                         model::{Namespace, Pod, Policy}, service::Service  or  FieldError{path, reason}
//! ```
//!
//! The API server defaults and validates before anyone sees an object; offline we must do
//! both ourselves, exactly as it would (`pkg/apis/networking/validation` and the
//! defaulting functions of `networking/v1`). No k8s-openapi type leaves this module.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::policy::model::{
    ContainerPort, IpBlock, Labels, Namespace, NamespaceScope, ObjectRef, Peer, Pod, PodIps, Policy, PortMatch,
    PortSpec, Protocol, Rule,
};
use crate::policy::selector::{Operator, Requirement, Selector, Values};
use crate::policy::service::{EndpointConditions, Service, ServicePort, TargetPort};
use crate::validate;

/// What is wrong with one field of one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// The JSON path of the field, e.g. `spec.ingress[0].ports[1].endPort`.
    pub path: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(path: impl Into<String>, reason: impl Into<String>) -> Self {
        FieldError { path: path.into(), reason: reason.into() }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

impl std::error::Error for FieldError {}

type Result<T> = std::result::Result<T, FieldError>;

/// What became of a Pod object.
#[derive(Debug, PartialEq)]
pub enum PodOutcome {
    Pod(Pod),
    /// Valid, but it does not take part (no IP yet, a terminal phase, not scheduled).
    Inactive(&'static str),
}

pub fn namespace(ns: &core::Namespace) -> Result<Namespace> {
    let name = ns.metadata.name.clone().unwrap_or_default();
    validate_dns_label(&name, "metadata.name")?;
    let labels = labels(ns.metadata.labels.as_ref(), "metadata.labels")?;
    let mut ns = Namespace { name, labels };
    // The API server sets this label on every namespace (immutable, since 1.21): upstream
    // `SetDefaults_Namespace` (pkg/apis/core/v1/defaults.go), whatever labels were written.
    ns.labels.insert(crate::policy::model::NAMESPACE_NAME_LABEL.to_string(), ns.name.clone());
    Ok(ns)
}

/// A Pod as the agent's watch decodes it: only the fields [`slim_pod`] reads. A real pod
/// is 5-10 KB of JSON (managed fields, containers with env, probes and volume mounts,
/// volumes, status conditions and container statuses); decoding all of it into
/// k8s-openapi's `Pod` for a dozen fields cost most of the agent's first list at 100 000
/// pods. Every other field, and any field a future API version adds, is skipped by the
/// decoder unread. Field names and defaults are the API's (`null` reads as absent).
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct SlimPod {
    #[serde(default, deserialize_with = "slim_metadata")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<SlimPodSpec>,
    #[serde(default)]
    pub status: Option<SlimPodStatus>,
}

/// `spec`: what places the pod and the ports its containers declare.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimPodSpec {
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub host_network: Option<bool>,
    #[serde(default)]
    pub containers: Option<Vec<SlimContainer>>,
}

/// `spec.containers[*]`: its ports only.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct SlimContainer {
    #[serde(default)]
    pub ports: Option<Vec<core::ContainerPort>>,
}

/// `status`: the phase and the addresses.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct SlimPodStatus {
    #[serde(default)]
    pub phase: Option<String>,
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(default, rename = "podIPs")]
    pub pod_ips: Option<Vec<core::PodIP>>,
}

/// `metadata`, keeping what names the pod, its labels, and the resourceVersion the watch
/// resumes from; the rest (managedFields, annotations, owners) is skipped unread.
fn slim_metadata<'de, D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<ObjectMeta, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Read {
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        namespace: Option<String>,
        #[serde(default)]
        labels: Option<std::collections::BTreeMap<String, String>>,
        #[serde(default)]
        resource_version: Option<String>,
    }
    let read: Option<Read> = serde::Deserialize::deserialize(deserializer)?;
    Ok(read.map_or_else(ObjectMeta::default, |r| ObjectMeta {
        name: r.name,
        namespace: r.namespace,
        labels: r.labels,
        resource_version: r.resource_version,
        ..ObjectMeta::default()
    }))
}

impl k8s_openapi::Resource for SlimPod {
    const API_VERSION: &'static str = "v1";
    const GROUP: &'static str = "";
    const KIND: &'static str = "Pod";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "pods";
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::Metadata for SlimPod {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The fields of a Pod that [`pod`] reads, borrowed from either pod type.
struct PodFields<'a> {
    metadata: &'a ObjectMeta,
    host_network: Option<bool>,
    node_name: Option<&'a str>,
    /// Each container's `ports` (absent: empty).
    container_ports: Vec<&'a [core::ContainerPort]>,
    /// `None`: the pod has no `status` at all (a manifest).
    status: Option<StatusFields<'a>>,
}

struct StatusFields<'a> {
    phase: Option<&'a str>,
    pod_ip: Option<&'a str>,
    pod_ips: Option<&'a [core::PodIP]>,
}

impl<'a> PodFields<'a> {
    fn of_pod(pod: &'a core::Pod) -> Self {
        let spec = pod.spec.as_ref();
        PodFields {
            metadata: &pod.metadata,
            host_network: spec.and_then(|s| s.host_network),
            node_name: spec.and_then(|s| s.node_name.as_deref()),
            container_ports: spec
                .map(|s| s.containers.iter().map(|c| c.ports.as_deref().unwrap_or_default()).collect())
                .unwrap_or_default(),
            status: pod.status.as_ref().map(|s| StatusFields {
                phase: s.phase.as_deref(),
                pod_ip: s.pod_ip.as_deref(),
                pod_ips: s.pod_ips.as_deref(),
            }),
        }
    }

    fn of_slim(pod: &'a SlimPod) -> Self {
        let spec = pod.spec.as_ref();
        PodFields {
            metadata: &pod.metadata,
            host_network: spec.and_then(|s| s.host_network),
            node_name: spec.and_then(|s| s.node_name.as_deref()),
            container_ports: spec
                .and_then(|s| s.containers.as_deref())
                .map(|cs| cs.iter().map(|c| c.ports.as_deref().unwrap_or_default()).collect())
                .unwrap_or_default(),
            status: pod.status.as_ref().map(|s| StatusFields {
                phase: s.phase.as_deref(),
                pod_ip: s.pod_ip.as_deref(),
                pod_ips: s.pod_ips.as_deref(),
            }),
        }
    }
}

/// Chooses a node and IPs for a pod that has none (offline only).
pub type Placement<'a> = dyn FnMut(&ObjectRef) -> (String, Vec<IpAddr>) + 'a;

/// Converts a Pod. `fallback` supplies a node and IPs for pods that were written as
/// manifests (no status at all), which the offline checker uses; the agent passes `None`.
pub fn pod(pod: &core::Pod, fallback: Option<&mut Placement<'_>>) -> Result<PodOutcome> {
    pod_fields(PodFields::of_pod(pod), fallback)
}

/// Converts a Pod as the agent's watch decodes it, exactly as [`pod`] converts the same
/// object decoded whole (without a fallback placement: the API server's pods have a status).
pub fn slim_pod(pod: &SlimPod) -> Result<PodOutcome> {
    pod_fields(PodFields::of_slim(pod), None)
}

fn pod_fields(pod: PodFields<'_>, fallback: Option<&mut Placement<'_>>) -> Result<PodOutcome> {
    let id = object_ref(pod.metadata)?;
    let labels = labels(pod.metadata.labels.as_ref(), "metadata.labels")?;
    let host_network = pod.host_network.unwrap_or(false);
    let mut ports = Vec::new();
    for (ci, container_ports) in pod.container_ports.iter().enumerate() {
        for (pi, p) in container_ports.iter().enumerate() {
            ports.push(container_port(p, &format!("spec.containers[{ci}].ports[{pi}]"))?);
        }
    }
    ports.sort();
    ports.dedup();

    let status = pod.status.as_ref();
    if let Some(phase) = status.and_then(|s| s.phase)
        && (phase == "Succeeded" || phase == "Failed")
    {
        return Ok(PodOutcome::Inactive("in a terminal phase"));
    }
    let mut ips = PodIps::new();
    let listed: Vec<(&str, String)> = match status.and_then(|s| s.pod_ips) {
        Some(list) if !list.is_empty() => {
            list.iter().enumerate().map(|(i, p)| (p.ip.as_str(), format!("status.podIPs[{i}].ip"))).collect()
        }
        _ => status.and_then(|s| s.pod_ip).map(|ip| vec![(ip, "status.podIP".to_string())]).unwrap_or_default(),
    };
    for (text, path) in listed {
        let ip: IpAddr =
            text.parse().map_err(|_| FieldError::new(&path, format!("{text:?} is not a valid IP address")))?;
        // "Pods may be allocated at most 1 value for each of IPv4 and IPv6."
        if !ips.contains(&ip) && ips.push(ip).is_err() {
            return Err(FieldError::new(path, "a pod has at most one IPv4 and one IPv6 address"));
        }
    }
    let mut node = pod.node_name.filter(|n| !n.is_empty()).map(str::to_string);
    if ips.is_empty() || node.is_none() {
        match (status.is_none(), fallback) {
            // A manifest: the checker places it and gives it synthetic addresses.
            (true, Some(assign)) => {
                let (assigned_node, assigned_ips) = assign(&id);
                node.get_or_insert(assigned_node);
                if ips.is_empty() {
                    ips = PodIps::try_from(assigned_ips).map_err(|_| {
                        FieldError::new("status.podIPs", "placement assigned more than one IP per family")
                    })?;
                }
            }
            _ if ips.is_empty() => return Ok(PodOutcome::Inactive("has no IP yet")),
            _ => return Ok(PodOutcome::Inactive("is not scheduled to a node")),
        }
    }
    Ok(PodOutcome::Pod(Pod {
        id,
        labels: labels.into(),
        node: node.unwrap_or_default().into(),
        ips,
        host_network,
        ports: ports.into(),
    }))
}

/// What an EndpointSlice would say of a pod as an endpoint. The kubelet always writes a
/// `Ready` condition; a status that lists no conditions at all (a hand-written manifest,
/// or none: a pod the checker places) states nothing, and is taken as ready.
pub fn endpoint_conditions(pod: &core::Pod) -> EndpointConditions {
    let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_deref()).filter(|c| !c.is_empty());
    // `podutil.IsPodReady`: the Ready condition's status is "True".
    let ready = conditions.is_none_or(|list| list.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    EndpointConditions { ready, terminating: pod.metadata.deletion_timestamp.is_some() }
}

/// Converts a v1 Service: what its endpoints need (namespace, name, selector, type, ports),
/// defaulted and validated as the API server's `ValidateService` and `SetDefaults_Service`
/// would. Fields endpoints do not depend on (cluster IPs, node ports, ...) are not read.
pub fn service(svc: &core::Service) -> Result<Service> {
    let id = object_ref(&svc.metadata)?;
    // Service names are DNS-1035 labels (`ValidateServiceName`): a letter first.
    validate::service_name(&id.name).map_err(|reason| FieldError::new("metadata.name", reason))?;
    let default_spec = core::ServiceSpec::default();
    let spec = svc.spec.as_ref().unwrap_or(&default_spec);
    // "If empty or not present, the service is assumed to have an external process
    // managing its endpoints, which Kubernetes will not modify."
    let selector = labels(spec.selector.as_ref(), "spec.selector")?;
    let selector = (!selector.is_empty()).then_some(selector);
    let external_name = match spec.type_.as_deref().filter(|t| !t.is_empty()).unwrap_or("ClusterIP") {
        "ClusterIP" | "NodePort" | "LoadBalancer" => None,
        "ExternalName" => {
            let name = spec.external_name.clone().unwrap_or_default();
            validate_dns_subdomain(name.trim_end_matches('.'), "spec.externalName")?;
            Some(name)
        }
        other => {
            return Err(FieldError::new(
                "spec.type",
                format!(
                    "unsupported value {other:?}: supported values are \"ClusterIP\", \"ExternalName\", \"LoadBalancer\", \"NodePort\""
                ),
            ));
        }
    };
    let written = spec.ports.as_deref().unwrap_or_default();
    let headless = spec.cluster_ip.as_deref() == Some("None");
    if written.is_empty() && !headless && external_name.is_none() {
        return Err(FieldError::new("spec.ports", "is required (a Service that is not headless needs a port)"));
    }
    let mut ports: Vec<ServicePort> = Vec::with_capacity(written.len());
    for (i, p) in written.iter().enumerate() {
        let path = format!("spec.ports[{i}]");
        let name = p.name.clone().filter(|n| !n.is_empty());
        match &name {
            None if written.len() > 1 => {
                return Err(FieldError::new(
                    format!("{path}.name"),
                    "is required when a Service has more than one port",
                ));
            }
            None => {}
            Some(n) => {
                validate_dns_label(n, &format!("{path}.name"))?;
                if let Some(j) = ports.iter().position(|q| q.name.as_ref() == Some(n)) {
                    return Err(FieldError::new(
                        format!("{path}.name"),
                        format!("duplicate name {n:?} (as spec.ports[{j}])"),
                    ));
                }
            }
        }
        let port = port_number(p.port.into(), &format!("{path}.port"))?;
        let protocol = protocol(p.protocol.as_deref(), &format!("{path}.protocol"))?;
        // Upstream `SetDefaults_Service`: a targetPort of 0 or "" (or none) becomes `port`.
        let target = match &p.target_port {
            None | Some(IntOrString::Int(0)) => TargetPort::Number(port),
            Some(IntOrString::String(s)) if s.is_empty() => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => TargetPort::Number(port_number((*n).into(), &format!("{path}.targetPort"))?),
            Some(IntOrString::String(s)) => {
                validate_port_name(s, &format!("{path}.targetPort"))?;
                TargetPort::Named(s.clone())
            }
        };
        if let Some(j) = ports.iter().position(|q| q.port == port && q.protocol == protocol) {
            return Err(FieldError::new(path, format!("duplicate {protocol} port {port} (as spec.ports[{j}])")));
        }
        ports.push(ServicePort { name, port, target, protocol });
    }
    Ok(Service { id, selector, external_name, ports })
}

fn container_port(p: &core::ContainerPort, path: &str) -> Result<ContainerPort> {
    let port = port_number(p.container_port.into(), &format!("{path}.containerPort"))?;
    // Upstream `SetDefaults_ContainerPort` (pkg/apis/core/v1/defaults.go): `if obj.Protocol
    // == ""` it becomes TCP, so an empty string defaults like an absent one here (unlike a
    // NetworkPolicyPort's protocol, a pointer defaulted only when nil).
    let protocol = protocol(p.protocol.as_deref().filter(|t| !t.is_empty()), &format!("{path}.protocol"))?;
    if let Some(name) = &p.name {
        validate_port_name(name, &format!("{path}.name"))?;
    }
    Ok(ContainerPort { name: p.name.clone(), port, protocol })
}

pub fn policy(np: &net::NetworkPolicy) -> Result<Policy> {
    let id = object_ref(&np.metadata)?;
    let default_spec = net::NetworkPolicySpec::default();
    let spec = np.spec.as_ref().unwrap_or(&default_spec);
    let pod_selector = match &spec.pod_selector {
        Some(s) => selector(s, "spec.podSelector")?,
        None => Selector::everything(),
    };
    let (isolates_ingress, isolates_egress) = policy_types(spec)?;
    let mut ingress = Vec::new();
    for (i, r) in spec.ingress.as_deref().unwrap_or_default().iter().enumerate() {
        ingress.push(rule(r.from.as_deref(), r.ports.as_deref(), &format!("spec.ingress[{i}]"), "from")?);
    }
    let mut egress = Vec::new();
    for (i, r) in spec.egress.as_deref().unwrap_or_default().iter().enumerate() {
        egress.push(rule(r.to.as_deref(), r.ports.as_deref(), &format!("spec.egress[{i}]"), "to")?);
    }
    Ok(Policy {
        id,
        pod_selector,
        ingress: isolates_ingress.then_some(ingress),
        egress: isolates_egress.then_some(egress),
        quarantined: None,
    })
}

/// Which directions a policy isolates: `(Ingress, Egress)`.
fn policy_types(spec: &net::NetworkPolicySpec) -> Result<(bool, bool)> {
    let (mut isolates_ingress, mut isolates_egress) = (false, false);
    // "If this field is not specified, it will default based on the existence of ingress or
    // egress rules; policies that contain an egress section are assumed to affect egress, and
    // all policies (whether or not they contain an ingress section) are assumed to affect
    // ingress."
    // Upstream `SetDefaults_NetworkPolicy` (pkg/apis/networking/v1/defaults.go) tests lengths,
    // not presence: `if len(obj.Spec.PolicyTypes) == 0` it sets `[Ingress]`, and appends
    // `Egress` only `if len(obj.Spec.Egress) != 0`. So `policyTypes: []` or `null` is
    // defaulted like an absent one, and `egress: []` (or `null`) does not isolate egress.
    match spec.policy_types.as_deref() {
        None | Some([]) => {
            isolates_ingress = true;
            isolates_egress = spec.egress.as_ref().is_some_and(|rules| !rules.is_empty());
        }
        Some(types) => {
            if types.len() > 2 {
                return Err(FieldError::new("spec.policyTypes", "may not specify more than two policyTypes"));
            }
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => isolates_ingress = true,
                    "Egress" => isolates_egress = true,
                    other => {
                        return Err(FieldError::new(
                            format!("spec.policyTypes[{i}]"),
                            format!("unsupported value {other:?}: supported values are \"Ingress\", \"Egress\""),
                        ));
                    }
                }
            }
        }
    }
    Ok((isolates_ingress, isolates_egress))
}

/// The fail-closed stand-in for a NetworkPolicy that `policy` rejects (`error`): the API
/// server can hold such objects (stored under older validation rules, ratcheted fields, a
/// newer API field), and skipping one would silently unisolate the pods it selects.
///
/// It isolates the pods its `podSelector` selects, for the directions it names, and allows
/// nothing. If even its `podSelector` (or its `policyTypes`) cannot be read, it isolates
/// every pod of its namespace in both directions.
pub fn policy_fail_closed(np: &net::NetworkPolicy, error: &FieldError) -> Policy {
    let id = object_ref(&np.metadata).unwrap_or_else(|_| ObjectRef {
        namespace: np.metadata.namespace.clone().unwrap_or_else(|| "default".to_string()),
        name: np.metadata.name.clone().unwrap_or_default(),
    });
    let default_spec = net::NetworkPolicySpec::default();
    let spec = np.spec.as_ref().unwrap_or(&default_spec);
    let selected = match &spec.pod_selector {
        Some(s) => selector(s, "spec.podSelector").ok(),
        None => Some(Selector::everything()),
    };
    let (pod_selector, (ingress, egress)) = match (selected, policy_types(spec)) {
        (Some(pods), Ok(directions)) => (pods, directions),
        _ => (Selector::everything(), (true, true)),
    };
    Policy {
        id,
        pod_selector,
        ingress: ingress.then(Vec::new),
        egress: egress.then(Vec::new),
        quarantined: Some(error.to_string()),
    }
}

fn rule(
    peers: Option<&[net::NetworkPolicyPeer]>,
    ports: Option<&[net::NetworkPolicyPort]>,
    path: &str,
    peer_field: &str,
) -> Result<Rule> {
    // "If this field is empty or missing, this rule matches all sources (traffic not
    // restricted by source)", and likewise for `to` and `ports`: no defaulting function
    // touches them, and the length is what counts, so absent, `null` and `[]` are alike.
    let peers = match peers {
        None | Some([]) => None,
        Some(list) => {
            let mut out = Vec::with_capacity(list.len());
            for (i, p) in list.iter().enumerate() {
                out.push(peer(p, &format!("{path}.{peer_field}[{i}]"))?);
            }
            Some(out)
        }
    };
    let ports = match ports {
        None | Some([]) => None,
        Some(list) => {
            let mut out = Vec::with_capacity(list.len());
            for (i, p) in list.iter().enumerate() {
                out.push(port_spec(p, &format!("{path}.ports[{i}]"))?);
            }
            Some(out)
        }
    };
    Ok(Rule { peers, ports })
}

fn peer(p: &net::NetworkPolicyPeer, path: &str) -> Result<Peer> {
    match (&p.pod_selector, &p.namespace_selector, &p.ip_block) {
        (None, None, None) => {
            Err(FieldError::new(path, "must specify a peer (podSelector, namespaceSelector or ipBlock)"))
        }
        (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => Err(FieldError::new(
            path,
            "may not specify more than 1 peer: ipBlock cannot be combined with podSelector or namespaceSelector",
        )),
        (pods, namespaces, None) => {
            let pods = match pods {
                Some(s) => selector(s, &format!("{path}.podSelector"))?,
                None => Selector::everything(),
            };
            let namespaces = match namespaces {
                Some(s) => NamespaceScope::Matching(selector(s, &format!("{path}.namespaceSelector"))?),
                None => NamespaceScope::PolicyNamespace,
            };
            Ok(Peer::Pods { namespaces, pods })
        }
        (None, None, Some(block)) => Ok(Peer::IpBlock(ip_block(block, &format!("{path}.ipBlock"))?)),
    }
}

fn ip_block(block: &net::IPBlock, path: &str) -> Result<IpBlock> {
    let cidr = parse_cidr(&block.cidr, &format!("{path}.cidr"))?;
    let mut except = Vec::new();
    for (i, e) in block.except.as_deref().unwrap_or_default().iter().enumerate() {
        let epath = format!("{path}.except[{i}]");
        let net = parse_cidr(e, &epath)?;
        // "must be a strict subset of `cidr`"
        if !cidr.contains(&net.network())
            || net.prefix_len() <= cidr.prefix_len()
            || net.addr().is_ipv4() != cidr.addr().is_ipv4()
        {
            return Err(FieldError::new(epath, format!("{e:?} must be a strict subset of cidr {:?}", block.cidr)));
        }
        except.push(net);
    }
    except.sort();
    except.dedup();
    Ok(IpBlock { cidr, except })
}

/// Parses a CIDR as the API server's `ParseCIDR` does: host bits may be set and are masked.
pub fn parse_cidr(text: &str, path: &str) -> Result<IpNet> {
    validate::cidr(text).map_err(|reason| FieldError::new(path, reason))
}

fn port_spec(p: &net::NetworkPolicyPort, path: &str) -> Result<PortSpec> {
    // "The protocol (TCP, UDP, or SCTP) which traffic must match. If not specified, this
    // field defaults to TCP." Upstream `SetDefaults_NetworkPolicyPort`: `if obj.Protocol ==
    // nil` (absent or null); an empty string is not nil, and validation rejects it.
    let protocol = protocol(p.protocol.as_deref(), &format!("{path}.protocol"))?;
    let port = match (&p.port, p.end_port) {
        (None, None) => PortMatch::Any,
        (None, Some(_)) => {
            return Err(FieldError::new(
                format!("{path}.endPort"),
                "may not be specified when `port` is not specified",
            ));
        }
        (Some(IntOrString::Int(n)), end) => {
            let start = port_number((*n).into(), &format!("{path}.port"))?;
            // "endPort indicates that the range of ports from port to endPort if set,
            // inclusive, should be allowed by the policy. This field cannot be defined if
            // the port field is not defined or if the port field is defined as a named
            // (string) port. The endPort must be equal or greater than port."
            let end = match end {
                None => start,
                Some(e) => {
                    let end = port_number(e.into(), &format!("{path}.endPort"))?;
                    if end < start {
                        return Err(FieldError::new(
                            format!("{path}.endPort"),
                            format!("{end} must be greater than or equal to `port` ({start})"),
                        ));
                    }
                    end
                }
            };
            PortMatch::Range(start, end)
        }
        (Some(IntOrString::String(s)), end) => {
            // A string is a port name to the API server, even when it holds only digits
            // (`port: "80"`): `ValidateNetworkPolicyPort` checks it with `IsValidPortName`,
            // which demands at least one letter, and so rejects it.
            if end.is_some() {
                return Err(FieldError::new(
                    format!("{path}.endPort"),
                    "may not be specified when `port` is a named port",
                ));
            }
            validate_port_name(s, &format!("{path}.port"))?;
            PortMatch::Named(s.clone())
        }
    };
    Ok(PortSpec { protocol, port })
}

pub(crate) fn protocol(text: Option<&str>, path: &str) -> Result<Protocol> {
    match text {
        None => Ok(Protocol::Tcp),
        Some(t @ ("TCP" | "UDP" | "SCTP")) => Ok(Protocol::parse(t).expect("listed")),
        Some(other) => Err(FieldError::new(
            path,
            format!("unsupported value {other:?}: supported values are \"TCP\", \"UDP\", \"SCTP\""),
        )),
    }
}

pub(crate) fn port_number(n: i64, path: &str) -> Result<u16> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p >= 1)
        .ok_or_else(|| FieldError::new(path, format!("must be between 1 and 65535, inclusive (got {n})")))
}

pub fn selector(s: &LabelSelector, path: &str) -> Result<Selector> {
    let mut reqs = Vec::new();
    for (k, v) in s.match_labels.iter().flatten() {
        validate_label_key(k, &format!("{path}.matchLabels"))?;
        validate_label_value(v, &format!("{path}.matchLabels[{k}]"))?;
        reqs.push(Requirement { key: k.clone(), operator: Operator::In(Values::from([v.clone()])) });
    }
    for (i, e) in s.match_expressions.iter().flatten().enumerate() {
        let epath = format!("{path}.matchExpressions[{i}]");
        validate_label_key(&e.key, &format!("{epath}.key"))?;
        let values: Values = e.values.iter().flatten().cloned().collect();
        for (j, v) in e.values.iter().flatten().enumerate() {
            validate_label_value(v, &format!("{epath}.values[{j}]"))?;
        }
        let operator = match e.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => {
                return Err(FieldError::new(
                    format!("{epath}.values"),
                    format!("must be specified when `operator` is {:?}", e.operator),
                ));
            }
            "In" => Operator::In(values),
            "NotIn" => Operator::NotIn(values),
            "Exists" | "DoesNotExist" if !values.is_empty() => {
                return Err(FieldError::new(
                    format!("{epath}.values"),
                    format!("may not be specified when `operator` is {:?}", e.operator),
                ));
            }
            "Exists" => Operator::Exists,
            "DoesNotExist" => Operator::DoesNotExist,
            other => {
                return Err(FieldError::new(
                    format!("{epath}.operator"),
                    format!(
                        "not a valid selector operator {other:?}: supported values are \"In\", \"NotIn\", \"Exists\", \"DoesNotExist\""
                    ),
                ));
            }
        };
        reqs.push(Requirement { key: e.key.clone(), operator });
    }
    Ok(Selector::new(reqs))
}

fn object_ref(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Result<ObjectRef> {
    let name = meta.name.clone().unwrap_or_default();
    validate_dns_subdomain(&name, "metadata.name")?;
    let namespace = meta.namespace.clone().unwrap_or_else(|| "default".to_string());
    validate_dns_label(&namespace, "metadata.namespace")?;
    Ok(ObjectRef { namespace, name })
}

pub(crate) fn labels(map: Option<&std::collections::BTreeMap<String, String>>, path: &str) -> Result<Labels> {
    let mut out = Labels::new();
    for (k, v) in map.into_iter().flatten() {
        validate_label_key(k, path)?;
        validate_label_value(v, &format!("{path}[{k}]"))?;
        out.insert(k.clone(), v.clone());
    }
    Ok(out)
}

// --- name validation: the rules and their messages live in `crate::validate` ---------------

pub fn validate_label_key(key: &str, path: &str) -> Result<()> {
    validate::label_key(key).map_err(|reason| FieldError::new(path, reason))
}

pub fn validate_label_value(value: &str, path: &str) -> Result<()> {
    validate::label_value(value).map_err(|reason| FieldError::new(path, reason))
}

fn validate_dns_label(s: &str, path: &str) -> Result<()> {
    validate::dns_label(s).map_err(|reason| FieldError::new(path, reason))
}

pub(crate) fn validate_dns_subdomain(s: &str, path: &str) -> Result<()> {
    validate::dns_subdomain(s).map_err(|reason| FieldError::new(path, reason))
}

pub fn validate_port_name(name: &str, path: &str) -> Result<()> {
    validate::port_name(name).map_err(|reason| FieldError::new(path, reason))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::Direction;

    fn network_policy(spec: serde_json::Value) -> net::NetworkPolicy {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "broken", "namespace": "shop"},
            "spec": spec,
        }))
        .expect("a well-typed NetworkPolicy")
    }

    /// Converts as the agent does: the policy when valid, its fail-closed stand-in otherwise.
    fn converted(np: &net::NetworkPolicy) -> Policy {
        policy(np).unwrap_or_else(|e| policy_fail_closed(np, &e))
    }

    fn pod_with(labels: &[(&str, &str)]) -> Pod {
        Pod::clone(&crate::policy::model::test_pod("shop", "p", labels))
    }

    const BAD_PEER: &str = "10.0.0.0/33";

    /// The object decoded whole and through [`SlimPod`], each converted as its users do.
    fn both_ways(object: &serde_json::Value) -> (Result<PodOutcome>, Result<PodOutcome>) {
        let full: core::Pod = serde_json::from_value(object.clone()).expect("a well-typed Pod");
        let slim: SlimPod = serde_json::from_value(object.clone()).expect("a well-typed Pod, slim");
        (pod(&full, None), slim_pod(&slim))
    }

    #[test]
    fn a_pod_converts_the_same_through_the_slim_type_as_through_the_full_one() {
        use serde_json::json;
        let running = |extra_status: serde_json::Value| {
            let mut status = json!({"phase": "Running", "podIP": "10.0.0.1"});
            status.as_object_mut().unwrap().extend(extra_status.as_object().unwrap().clone());
            json!({"metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"}},
                   "spec": {"nodeName": "node-a", "containers": [{"name": "app", "ports": [{"containerPort": 80, "name": "http"}]}]},
                   "status": status})
        };
        let model = {
            let mut p = Pod::clone(&crate::policy::model::test_pod("shop", "web-7d9f8b6c5-x2x8q", &[("app", "web")]));
            p.node = "node-7".into();
            p.ips = PodIps::try_from(vec!["10.1.2.3".parse::<IpAddr>().unwrap(), "fd00::3".parse().unwrap()]).unwrap();
            p.ports = vec![ContainerPort { name: Some("http".into()), port: 8080, protocol: Protocol::Tcp }].into();
            p
        };
        let table = [
            ("realistic", crate::testkit::realistic::deployment_pod(&model)),
            ("minimal", json!({"metadata": {"name": "p"}})),
            ("null everywhere", json!({"metadata": {"name": "p", "labels": null}, "spec": null, "status": null})),
            ("running", running(json!({}))),
            ("podIPs win over podIP", running(json!({"podIPs": [{"ip": "10.0.0.2"}, {"ip": "fd00::2"}]}))),
            ("empty podIPs", running(json!({"podIPs": []}))),
            ("succeeded", running(json!({"phase": "Succeeded"}))),
            ("failed", running(json!({"phase": "Failed"}))),
            ("pending without an IP", running(json!({"phase": "Pending", "podIP": null}))),
            ("not an IP", running(json!({"podIP": "10.0.0.300"}))),
            ("two IPv4", running(json!({"podIPs": [{"ip": "10.0.0.2"}, {"ip": "10.0.0.3"}]}))),
            (
                "host network",
                json!({"metadata": {"name": "h"}, "spec": {"hostNetwork": true, "nodeName": "n", "containers": [{"name": "c"}]}, "status": {"podIP": "192.0.2.1"}}),
            ),
            (
                "unscheduled",
                json!({"metadata": {"name": "u"}, "spec": {"containers": [{"name": "c", "ports": null}]}, "status": {"podIP": "10.0.0.1"}}),
            ),
            (
                "bad port",
                json!({"metadata": {"name": "b"}, "spec": {"nodeName": "n", "containers": [{"name": "c"}, {"name": "d", "ports": [{"containerPort": 80}, {"containerPort": 0}]}]}, "status": {"podIP": "10.0.0.1"}}),
            ),
            (
                "bad port name",
                json!({"metadata": {"name": "b"}, "spec": {"nodeName": "n", "containers": [{"name": "c", "ports": [{"containerPort": 80, "name": "Not_A_Name"}]}]}, "status": {"podIP": "10.0.0.1"}}),
            ),
            (
                "bad protocol",
                json!({"metadata": {"name": "b"}, "spec": {"nodeName": "n", "containers": [{"name": "c", "ports": [{"containerPort": 80, "protocol": "ICMP"}]}]}, "status": {"podIP": "10.0.0.1"}}),
            ),
            ("bad label", json!({"metadata": {"name": "b", "labels": {"app": "-x"}}, "status": {"podIP": "10.0.0.1"}})),
            ("bad name", json!({"metadata": {"name": "B_1"}})),
            ("bad namespace", json!({"metadata": {"name": "b", "namespace": "Shop"}})),
        ];
        for (what, object) in &table {
            let (full, slim) = both_ways(object);
            assert_eq!(full, slim, "{what}");
        }
        assert_eq!(
            both_ways(&table[0].1).1,
            Ok(PodOutcome::Pod({
                let mut labelled = model.clone();
                let mut labels = (*model.labels).clone();
                labels.insert(
                    "pod-template-hash".into(),
                    table[0].1["metadata"]["labels"]["pod-template-hash"].as_str().unwrap().into(),
                );
                labelled.labels = labels.into();
                labelled
            }))
        );
        assert_eq!(both_ways(&table[14].1).1.unwrap_err().path, "spec.containers[0].ports[0].name");
    }

    #[test]
    fn the_slim_pod_skips_fields_it_does_not_know_including_future_ones() {
        use serde_json::json;
        let plain = json!({"metadata": {"name": "web-1", "namespace": "shop", "resourceVersion": "7"},
                           "spec": {"nodeName": "node-a", "containers": [{"ports": [{"containerPort": 80}]}]},
                           "status": {"podIP": "10.0.0.1"}});
        let future = json!({"apiVersion": "v1", "kind": "Pod", "futureTopLevel": {"a": [1, 2, {"b": null}]},
                            "metadata": {"name": "web-1", "namespace": "shop", "resourceVersion": "7", "futureMeta": "x",
                                         "managedFields": [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}]},
                            "spec": {"nodeName": "node-a", "futureSpec": 3.5,
                                     "containers": [{"name": "app", "futureContainer": true, "ports": [{"containerPort": 80, "futurePort": "x"}]}]},
                            "status": {"podIP": "10.0.0.1", "futureStatus": [], "conditions": [{"type": "Ready", "status": "True"}]}});
        let read = |v: &serde_json::Value| serde_json::from_value::<SlimPod>(v.clone()).expect("decodes");
        let (plain, future) = (read(&plain), read(&future));
        assert_eq!(slim_pod(&plain), slim_pod(&future));
        assert!(matches!(slim_pod(&future), Ok(PodOutcome::Pod(_))));
        assert_eq!(future.metadata.resource_version.as_deref(), Some("7"), "the watch resumes from it");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(500))]
        /// Random pods built from the fields the conversion reads (present, absent, null,
        /// valid or not) and fields it does not: both decodings convert alike.
        #[test]
        fn random_pods_convert_the_same_slim_and_full(
            name in proptest::sample::select(vec!["web-1", "", "Bad_Name"]),
            namespace in proptest::option::of(proptest::sample::select(vec!["shop", "Bad"])),
            labels in proptest::option::of(proptest::collection::btree_map(
                proptest::sample::select(vec!["app", "tier", "-bad"]), proptest::sample::select(vec!["web", "", "x-"]), 0..3)),
            node in proptest::option::of(proptest::sample::select(vec!["node-a", ""])),
            host_network in proptest::option::of(proptest::bool::ANY),
            ports in proptest::collection::vec(proptest::option::of(proptest::collection::vec(
                (proptest::sample::select(vec![0i32, 80, 443, 70000]),
                 proptest::option::of(proptest::sample::select(vec!["http", "Bad_Name"])),
                 proptest::option::of(proptest::sample::select(vec!["TCP", "UDP", "", "ICMP"]))), 0..3)), 0..3),
            with_status in proptest::bool::ANY,
            phase in proptest::option::of(proptest::sample::select(vec!["Running", "Pending", "Succeeded", "Failed"])),
            pod_ip in proptest::option::of(proptest::sample::select(vec!["10.0.0.1", "fd00::1", "nope"])),
            pod_ips in proptest::option::of(proptest::collection::vec(
                proptest::sample::select(vec!["10.0.0.2", "10.0.0.3", "fd00::2", "x"]), 0..3)),
            junk in proptest::bool::ANY,
        ) {
            use serde_json::json;
            let containers: Vec<serde_json::Value> = ports.iter().enumerate().map(|(i, list)| {
                let mut c = json!({"name": format!("c{i}"), "image": "registry.example/app:1"});
                if let Some(list) = list {
                    c["ports"] = list.iter().map(|(port, name, protocol)| {
                        let mut p = json!({"containerPort": port});
                        if let Some(n) = name { p["name"] = json!(n); }
                        if let Some(t) = protocol { p["protocol"] = json!(t); }
                        p
                    }).collect();
                }
                c
            }).collect();
            let mut object = json!({"metadata": {"name": name, "namespace": namespace, "labels": labels},
                                    "spec": {"nodeName": node, "hostNetwork": host_network, "containers": containers}});
            if with_status {
                object["status"] = json!({"phase": phase, "podIP": pod_ip,
                                          "podIPs": pod_ips.map(|l| l.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>())});
            }
            if junk {
                object["metadata"]["annotations"] = json!({"note": "x"});
                object["spec"]["volumes"] = json!([{"name": "v", "emptyDir": {}}]);
                object["futureField"] = json!({"nested": [1, "two", null]});
            }
            let (full, slim) = both_ways(&object);
            proptest::prop_assert_eq!(full, slim);
        }
    }

    #[test]
    fn a_policy_name_with_a_part_longer_than_a_dns_label_is_valid_as_the_api_server_says() {
        // `IsDNS1123Subdomain` bounds the whole name (253), not each dot-separated part.
        let mut np = network_policy(serde_json::json!({"podSelector": {}}));
        np.metadata.name = Some(format!("{}.v2", "a".repeat(64)));
        assert!(policy(&np).is_ok(), "{:?}", policy(&np).err());
        np.metadata.name = Some("a..v2".into());
        assert!(policy(&np).is_err(), "an empty part is still invalid");
    }

    #[test]
    fn a_policy_with_an_unreadable_rule_isolates_what_it_selects_for_the_directions_it_names_and_allows_nothing() {
        let np = network_policy(serde_json::json!({
            "podSelector": {"matchLabels": {"app": "db"}},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": BAD_PEER}}]}],
        }));
        let p = converted(&np);
        assert_eq!(p.id, ObjectRef::new("shop", "broken"));
        assert_eq!(p.ingress, None, "Ingress is not named");
        assert_eq!(p.egress, Some(vec![]), "Egress is isolated with no allow rule");
        assert!(p.isolates(&pod_with(&[("app", "db")]), Direction::Egress));
        assert!(!p.isolates(&pod_with(&[("app", "web")]), Direction::Egress), "the selector still applies");
        let why = p.quarantined.expect("marked as fail-closed");
        assert!(why.contains("spec.egress[0].to[0].ipBlock.cidr"), "{why}");
    }

    #[test]
    fn a_fail_closed_policy_without_policy_types_takes_the_directions_defaulting_gives_it() {
        let np = network_policy(serde_json::json!({
            "podSelector": {},
            "ingress": [{"from": [{"ipBlock": {"cidr": BAD_PEER}}]}],
            "egress": [{}],
        }));
        let p = converted(&np);
        assert_eq!((p.ingress, p.egress), (Some(vec![]), Some(vec![])));
    }

    #[test]
    fn a_policy_whose_pod_selector_cannot_be_read_isolates_its_whole_namespace_both_ways() {
        let np = network_policy(serde_json::json!({
            "podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": []}]},
            "policyTypes": ["Ingress"],
        }));
        let p = converted(&np);
        assert_eq!(p.pod_selector, Selector::everything());
        assert_eq!((p.ingress, p.egress), (Some(vec![]), Some(vec![])));
        assert!(p.quarantined.expect("fail-closed").contains("spec.podSelector"));
    }

    #[test]
    fn a_policy_whose_policy_types_cannot_be_read_isolates_both_ways() {
        let np = network_policy(serde_json::json!({
            "podSelector": {"matchLabels": {"app": "db"}},
            "policyTypes": ["Sideways"],
        }));
        let p = converted(&np);
        assert_eq!(p.pod_selector, Selector::everything());
        assert_eq!((p.ingress, p.egress), (Some(vec![]), Some(vec![])));
    }

    #[test]
    fn a_valid_policy_is_not_marked_fail_closed() {
        let np = network_policy(serde_json::json!({"podSelector": {}, "ingress": [{}]}));
        assert_eq!(converted(&np).quarantined, None);
    }

    fn converted_service(spec: serde_json::Value) -> Result<Service> {
        let svc: core::Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": spec,
        }))
        .unwrap();
        service(&svc)
    }

    #[test]
    fn a_service_port_defaults_its_protocol_to_tcp_and_its_target_port_to_its_port() {
        let svc = converted_service(serde_json::json!({"selector": {"app": "web"}, "ports": [
            {"port": 80},
        ]}))
        .unwrap();
        assert_eq!(
            svc.ports,
            [ServicePort { name: None, port: 80, target: TargetPort::Number(80), protocol: Protocol::Tcp }]
        );
        // `SetDefaults_Service`: a targetPort of 0 or "" is unset.
        for zero in [serde_json::json!(0), serde_json::json!("")] {
            let svc =
                converted_service(serde_json::json!({"ports": [{"port": 53, "protocol": "UDP", "targetPort": zero}]}));
            assert_eq!(svc.unwrap().ports[0].target, TargetPort::Number(53));
        }
        let named = converted_service(serde_json::json!({"ports": [{"port": 80, "targetPort": "http"}]})).unwrap();
        assert_eq!(named.ports[0].target, TargetPort::Named("http".into()));
    }

    #[test]
    fn an_empty_selector_is_no_selector_as_the_api_says() {
        let svc = converted_service(serde_json::json!({"selector": {}, "ports": [{"port": 80}]})).unwrap();
        assert_eq!(svc.selector, None);
        let external = converted_service(serde_json::json!({"type": "ExternalName", "externalName": "db.example.com"}));
        assert_eq!(external.unwrap().external_name.as_deref(), Some("db.example.com"));
    }

    #[test]
    fn an_invalid_service_names_the_field_and_the_reason() {
        let error = |spec: serde_json::Value| converted_service(spec).unwrap_err().to_string();
        assert_eq!(
            error(serde_json::json!({})),
            "spec.ports: is required (a Service that is not headless needs a port)"
        );
        assert!(converted_service(serde_json::json!({"clusterIP": "None"})).is_ok(), "headless needs no port");
        assert_eq!(
            error(serde_json::json!({"ports": [{"port": 80, "name": "a"}, {"port": 81}]})),
            "spec.ports[1].name: is required when a Service has more than one port"
        );
        assert_eq!(
            error(serde_json::json!({"ports": [{"port": 80, "name": "a"}, {"port": 81, "name": "a"}]})),
            "spec.ports[1].name: duplicate name \"a\" (as spec.ports[0])"
        );
        assert_eq!(
            error(serde_json::json!({"ports": [{"port": 80, "name": "a"}, {"port": 80, "name": "b"}]})),
            "spec.ports[1]: duplicate TCP port 80 (as spec.ports[0])"
        );
        assert!(
            converted_service(
                serde_json::json!({"ports": [{"port": 53, "name": "a"}, {"port": 53, "name": "b", "protocol": "UDP"}]})
            )
            .is_ok()
        );
        assert_eq!(
            error(serde_json::json!({"ports": [{"port": 70000}]})),
            "spec.ports[0].port: must be between 1 and 65535, inclusive (got 70000)"
        );
        assert_eq!(
            error(serde_json::json!({"ports": [{"port": 80, "targetPort": "Not_A_Name"}]})),
            "spec.ports[0].targetPort: invalid port name \"Not_A_Name\": must be 1-15 lower case letters, digits or '-', with at least one letter and no leading, trailing or double '-'"
        );
        assert_eq!(
            error(serde_json::json!({"ports": [{"port": 80, "protocol": "ICMP"}]})),
            "spec.ports[0].protocol: unsupported value \"ICMP\": supported values are \"TCP\", \"UDP\", \"SCTP\""
        );
        assert!(
            error(serde_json::json!({"selector": {"app": "-x"}, "ports": [{"port": 80}]}))
                .starts_with("spec.selector[app]: invalid label value")
        );
        assert!(
            error(serde_json::json!({"type": "Magic", "ports": [{"port": 80}]}))
                .starts_with("spec.type: unsupported value \"Magic\"")
        );
        let numbered: core::Service = serde_json::from_value(
            serde_json::json!({"metadata": {"name": "1web"}, "spec": {"ports": [{"port": 80}]}}),
        )
        .unwrap();
        assert_eq!(
            service(&numbered).unwrap_err().to_string(),
            "metadata.name: \"1web\" is not a valid name: a Service name must start with a letter (a DNS-1035 label)"
        );
    }

    #[test]
    fn a_pod_is_a_ready_endpoint_unless_its_conditions_say_otherwise_and_terminating_once_deleted() {
        let pod = |meta: serde_json::Value, status: serde_json::Value| -> core::Pod {
            serde_json::from_value(serde_json::json!({"metadata": meta, "status": status})).unwrap()
        };
        let running = serde_json::json!({"phase": "Running", "podIP": "10.0.0.1"});
        assert_eq!(
            endpoint_conditions(&pod(serde_json::json!({"name": "p"}), running.clone())),
            EndpointConditions::default()
        );
        let unready = serde_json::json!({"podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": "False"}, {"type": "PodScheduled", "status": "True"}]});
        assert_eq!(
            endpoint_conditions(&pod(serde_json::json!({"name": "p"}), unready)),
            EndpointConditions { ready: false, terminating: false }
        );
        let no_ready =
            serde_json::json!({"podIP": "10.0.0.1", "conditions": [{"type": "PodScheduled", "status": "True"}]});
        assert!(!endpoint_conditions(&pod(serde_json::json!({"name": "p"}), no_ready)).ready);
        let deleted = serde_json::json!({"name": "p", "deletionTimestamp": "2026-12-01T10:00:00Z"});
        assert_eq!(endpoint_conditions(&pod(deleted, running)), EndpointConditions { ready: true, terminating: true });
    }
}
