//! Loading Kubernetes YAML/JSON into a [`Cluster`]: the checker's front door.
//!
//! ```text
//!  files / folders / stdin ──► read_sources (I/O) ──► Source{name, text}
//!                                                        │ load_sources (pure)
//!                                                        ▼
//!  less a UTF-8 BOM, split into documents (line of each) ─► nesting depth scan
//!     ─► JSON value(s) (YAML, JSON, or JSON objects one after another) ─┐
//!  objects an API server listed (k8s::live) ─► load_api_objects (pure) ─┴► by apiVersion/kind:
//!     Namespace, Pod, NetworkPolicy, Node,
//!     Service .................................. typed, unknown fields refused (strict)
//!     ClusterNetworkPolicy (v1beta1, v1alpha2),
//!     Admin/BaselineAdminNetworkPolicy (v1alpha1)  k8s::tiers (files: Mode::File, API
//!                                                objects: Mode::ApiServer; unknown fields
//!                                                refused, as for the typed kinds)
//!     *List ..................................... each item (kind from the list if absent)
//!     Deployment, StatefulSet, DaemonSet, ... .. typed (strict), then pods from the template
//!                                                (synthetic IPs), unless ownerReferences
//!                                                link it to other objects of the input
//!     net.alpha.kubernetes.io NetworkPolicy .... converted to v1, with a warning
//!     a kind above in another version .......... "no matches for kind" error
//!     anything else ............................ skipped, one warning per kind
//!                                                        ▼
//!                         convert (validate, default) ─► shared-IP check
//!                                                        ▼
//!                 Cluster::with_tiers(cluster policies, nodes, LoadOptions::domains)
//!                                                        ▼
//!                               Loaded { cluster, warnings, node_ips, services }
//! ```
//!
//! Every error names the file (for API objects, `cluster at <server>`), the line where the
//! document starts, the object and the field path. Nothing here panics on any input. A
//! mapping that gives one key twice is an error (with its line and the key), as it is to
//! the API server: taking the last one silently would check what the author did not write.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io::Read;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use crate::k8s::convert::{self, FieldError, PodOutcome};
use crate::k8s::tiers;
use crate::policy::model::{Cluster, Namespace, ObjectRef, Pod, Policy};
use crate::policy::service::{EndpointConditions, Service};
use crate::policy::tiers::{ClusterPolicy, DomainMap, Node};

/// A load failure, with everything needed to find and fix it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadError {
    pub file: String,
    /// 1-based line where the offending document starts (0 when not about a document).
    pub line: usize,
    /// `Kind namespace/name`, when known.
    pub object: Option<String>,
    /// The field path, when the error is about one field.
    pub field: Option<String>,
    pub reason: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
        }
        if let Some(o) = &self.object {
            write!(f, ": {o}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.reason)
    }
}

impl std::error::Error for LoadError {}

/// One input text and the name to report it by.
#[derive(Clone, Debug)]
pub struct Source {
    pub name: String,
    pub text: String,
}

#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Where pods without IPs (workload templates, bare manifests) get their IPv4 addresses.
    pub synthetic_ipv4: IpNet,
    /// If set, such pods also get an IPv6 address from here (dual stack).
    pub synthetic_ipv6: Option<IpNet>,
    /// Downgrade what a permissive API server would store anyway to warnings: unknown
    /// fields (dropped, as without strict field validation) and pods sharing an IP (the
    /// first in namespace/name order keeps it, the others take no part).
    pub lenient: bool,
    /// What domain names resolve to (netpol-check's `--resolve`), for `domainNames` peers.
    pub domains: DomainMap,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            synthetic_ipv4: "10.244.0.0/16".parse().expect("valid"),
            synthetic_ipv6: None,
            lenient: false,
            domains: DomainMap::new(),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Loaded {
    pub cluster: Cluster,
    pub warnings: Vec<String>,
    /// Node addresses the input reveals (a Node's InternalIPs first; then a pod's
    /// `status.hostIP`/`hostIPs`, a hostNetwork pod's IP), with the node each belongs to:
    /// such an address means that node.
    pub node_ips: BTreeMap<IpAddr, String>,
    /// The v1 Services of the input, sorted by namespace and name. They change no verdict
    /// (kube-proxy rewrites a Service's address to an endpoint's before any policy sees the
    /// packet): `query --to svc/...` and `matrix --services` resolve them to endpoints.
    pub services: Vec<Service>,
    /// The pods that would be not-ready or terminating endpoints (every other pod is a
    /// ready one), by namespace/name.
    pub endpoint_conditions: BTreeMap<ObjectRef, EndpointConditions>,
}

// --- I/O -----------------------------------------------------------------------------------

/// Reads files, folders (recursively: `*.yaml`, `*.yml`, `*.json`, sorted) and `-` (stdin).
pub fn read_sources(paths: &[PathBuf]) -> Result<Vec<Source>, LoadError> {
    let mut out = Vec::new();
    for path in paths {
        if path.as_os_str() == "-" {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text).map_err(|e| io_error("<stdin>", &e))?;
            out.push(Source { name: "<stdin>".into(), text });
        } else if path.is_dir() {
            let mut files = Vec::new();
            collect_dir(path, &mut files)?;
            if files.is_empty() {
                return Err(LoadError {
                    file: path.display().to_string(),
                    line: 0,
                    object: None,
                    field: None,
                    reason: "folder holds no .yaml, .yml or .json file".into(),
                });
            }
            for f in files {
                out.push(read_file(&f)?);
            }
        } else {
            out.push(read_file(path)?);
        }
    }
    Ok(out)
}

fn collect_dir(dir: &Path, files: &mut Vec<PathBuf>) -> Result<(), LoadError> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| io_error(&dir.display().to_string(), &e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            collect_dir(&p, files)?;
        } else if p.extension().and_then(|e| e.to_str()).is_some_and(|e| matches!(e, "yaml" | "yml" | "json")) {
            files.push(p);
        }
    }
    Ok(())
}

fn read_file(path: &Path) -> Result<Source, LoadError> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| io_error(&name, &e))?;
    let text = String::from_utf8(bytes).map_err(|e| LoadError {
        file: name.clone(),
        line: 0,
        object: None,
        field: None,
        reason: format!("not UTF-8 text (invalid byte at offset {})", e.utf8_error().valid_up_to()),
    })?;
    Ok(Source { name, text })
}

fn io_error(file: &str, e: &std::io::Error) -> LoadError {
    let reason = match e.kind() {
        std::io::ErrorKind::NotFound => "no such file or folder".to_string(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
        _ => e.to_string(),
    };
    LoadError { file: file.to_string(), line: 0, object: None, field: None, reason }
}

// --- pure ----------------------------------------------------------------------------------

/// Where a document came from, for messages.
#[derive(Clone, Debug)]
struct Origin {
    file: String,
    line: usize,
    /// The path of the object inside its document: `""`, or `items[3].` in a List.
    item: String,
}

impl Origin {
    /// An error about `field` (a path inside the object), prefixed with the object's own
    /// path in a List so that `items[3].spec.ingress` finds it.
    fn error(&self, object: Option<String>, field: Option<String>, reason: impl Into<String>) -> LoadError {
        let field = match field {
            Some(f) => Some(format!("{}{f}", self.item)),
            None => (!self.item.is_empty()).then(|| self.item.trim_end_matches('.').to_string()),
        };
        LoadError { file: self.file.clone(), line: self.line, object, field, reason: reason.into() }
    }
    fn inside(&self, item: &str) -> Origin {
        Origin { item: format!("{}{item}", self.item), ..self.clone() }
    }
    fn at(&self) -> String {
        // An object listed from the API server has no line.
        if self.line == 0 { self.file.clone() } else { format!("{}:{}", self.file, self.line) }
    }
}

/// A recognised object, not yet converted.
enum Raw {
    Namespace(core::Namespace),
    Pod(Box<core::Pod>),
    Policy(net::NetworkPolicy),
    /// A ClusterNetworkPolicy, AdminNetworkPolicy or BaselineAdminNetworkPolicy, converted.
    ClusterPolicy(Box<ClusterPolicy>),
    Node(Box<core::Node>),
    Service(Box<core::Service>),
    /// Pod templates to instantiate: (workload label, pods to make, per-node?).
    Workload {
        kind: String,
        object: ObjectRef,
        template: Value,
        replicas: Replicas,
        owners: Owners,
    },
}

/// An object's `metadata.ownerReferences`, and what another object's references to it must
/// match: a live dump (`kubectl get all -o yaml`) links a Deployment, its ReplicaSet and
/// their pods this way.
#[derive(Clone, Debug, Default)]
struct Owners {
    kind: String,
    uid: Option<String>,
    /// (kind, name, uid) of each owner.
    refs: Vec<(String, String, Option<String>)>,
}

impl Owners {
    fn of(value: &Value, kind: &str) -> Owners {
        let meta = value.get("metadata");
        let refs = meta
            .and_then(|m| m.get("ownerReferences"))
            .and_then(Value::as_array)
            .map(|list| {
                list.iter()
                    .map(|r| {
                        let text = |k| str_field(r, k).unwrap_or_default().to_string();
                        (text("kind"), text("name"), str_field(r, "uid").map(str::to_string))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Owners { kind: kind.to_string(), uid: meta.and_then(|m| str_field(m, "uid")).map(str::to_string), refs }
    }

    /// Whether one of these references names `owner` (kind and name, and the uid when both
    /// sides have one), an object of the same namespace.
    fn refer_to(&self, owner: &Owners, owner_id: &ObjectRef, namespace: &str) -> bool {
        namespace == owner_id.namespace
            && self.refs.iter().any(|(kind, name, uid)| {
                *kind == owner.kind
                    && *name == owner_id.name
                    && match (uid, &owner.uid) {
                        (Some(a), Some(b)) => a == b,
                        _ => true,
                    }
            })
    }
}

enum Replicas {
    Count(u32),
    OnePerNode,
}

/// Loads every source into one cluster.
pub fn load_sources(sources: &[Source], options: &LoadOptions) -> Result<Loaded, LoadError> {
    let mut warnings = Vec::new();
    let mut skipped_kinds: BTreeMap<String, String> = BTreeMap::new();
    let mut raws: Vec<(Origin, String, Raw)> = Vec::new();
    for source in sources {
        // kubectl reads a file that starts with a UTF-8 byte order mark (editors on Windows
        // write one); so do we.
        let text = source.text.strip_prefix('\u{feff}').unwrap_or(&source.text);
        for (line, doc) in split_documents(text) {
            for (line, value) in parse_document(&source.name, &doc, line)? {
                let origin = Origin { file: source.name.clone(), line, item: String::new() };
                let mut collector = Collector {
                    options,
                    mode: tiers::Mode::File,
                    raws: &mut raws,
                    warnings: &mut warnings,
                    skipped: &mut skipped_kinds,
                };
                collector.collect(value, &origin)?;
            }
        }
    }
    for (kind, first) in skipped_kinds {
        warnings.push(format!("{first}: skipped kind {kind} (netpol-check reads Namespace, Pod, NetworkPolicy, workloads, ClusterNetworkPolicy, AdminNetworkPolicy, BaselineAdminNetworkPolicy, Node and Service); other objects of this kind are skipped too"));
    }
    assemble(raws, warnings, options)
}

/// Loads objects an API server listed (`netpol-check --cluster`), each a whole object with
/// `apiVersion` and `kind`, named in messages after `source` (`cluster at https://...`).
///
/// They take the files' path from the sorting by kind on: decoded into the API types
/// with unknown fields refused, then converted by [`convert`] and [`tiers`], the code the
/// agent converts its watched objects with. One difference: cluster policies are read in
/// [`tiers::Mode::ApiServer`], as the agent reads them (the server validated them against
/// its CRD). An object that does not convert, or has fields netpol does not know (a newer
/// API than netpol's), is an error naming it: an answer about a cluster must not quietly
/// leave out what the cluster enforces. With `lenient` it is what the agent enforces
/// instead, with a warning: a NetworkPolicy fails closed, unknown fields are ignored.
pub fn load_api_objects(source: &str, objects: Vec<Value>, options: &LoadOptions) -> Result<Loaded, LoadError> {
    let mut warnings = Vec::new();
    let mut skipped = BTreeMap::new();
    let mut raws = Vec::new();
    let origin = Origin { file: source.to_string(), line: 0, item: String::new() };
    let mut collector = Collector {
        options,
        mode: tiers::Mode::ApiServer,
        raws: &mut raws,
        warnings: &mut warnings,
        skipped: &mut skipped,
    };
    for object in objects {
        collector.collect(object, &origin)?;
    }
    assemble(raws, warnings, options)
}

/// The objects collected from every source, converted and checked as one cluster.
fn assemble(
    raws: Vec<(Origin, String, Raw)>,
    mut warnings: Vec<String>,
    options: &LoadOptions,
) -> Result<Loaded, LoadError> {
    // Reject an object declared twice: the second would silently win in a cluster.
    let mut seen: HashMap<String, String> = HashMap::new();
    for (origin, label, raw) in &raws {
        if matches!(raw, Raw::Workload { .. }) {
            continue;
        }
        if let Some(first) = seen.insert(label.clone(), origin.at()) {
            return Err(origin.error(Some(label.clone()), None, format!("declared twice (first at {first})")));
        }
    }

    // Nodes known from scheduled pods and Node objects place the pods we synthesize.
    let mut nodes: BTreeSet<String> = raws
        .iter()
        .filter_map(|(_, _, r)| match r {
            Raw::Pod(p) => p.spec.as_ref().and_then(|s| s.node_name.clone()),
            Raw::Node(n) => n.metadata.name.clone(),
            _ => None,
        })
        .filter(|n| !n.is_empty())
        .collect();
    if nodes.is_empty() {
        nodes.insert("node-1".to_string());
    }
    let nodes: Vec<String> = nodes.into_iter().collect();
    let taken: BTreeSet<IpAddr> = raws
        .iter()
        .filter_map(|(_, _, r)| match r {
            Raw::Pod(p) => p.status.as_ref(),
            _ => None,
        })
        .flat_map(|s| s.pod_ips.iter().flatten().map(|p| p.ip.clone()).chain(s.pod_ip.clone()))
        .filter_map(|ip| ip.parse().ok())
        .collect();
    let mut placer = Placer::new(options, nodes, taken);

    // A workload of a live dump makes no pods of its own: its pods, or the workload that
    // makes them (a Deployment's ReplicaSet, a CronJob's Job), are in the input already.
    let linked: Vec<(ObjectRef, Owners)> = raws
        .iter()
        .filter_map(|(_, _, raw)| match raw {
            Raw::Workload { object, owners, .. } => Some((object.clone(), owners.clone())),
            Raw::Pod(p) => Some((
                ObjectRef::new(p.metadata.namespace.as_deref().unwrap_or("default"), ""),
                Owners {
                    kind: "Pod".into(),
                    uid: None,
                    refs: p
                        .metadata
                        .owner_references
                        .iter()
                        .flatten()
                        .map(|r| (r.kind.clone(), r.name.clone(), Some(r.uid.clone()).filter(|u| !u.is_empty())))
                        .collect(),
                },
            )),
            _ => None,
        })
        .collect();
    let makes_own_pods = |object: &ObjectRef, owners: &Owners| {
        let owned = linked
            .iter()
            .any(|(other, theirs)| theirs.kind != "Pod" && owners.refer_to(theirs, other, &object.namespace));
        let owns = linked.iter().any(|(other, theirs)| theirs.refer_to(owners, object, &other.namespace));
        !owned && !owns
    };

    let mut node_ips: BTreeMap<IpAddr, String> = BTreeMap::new();
    for (_, _, raw) in &raws {
        let Raw::Pod(p) = raw else { continue };
        let node = p.spec.as_ref().and_then(|s| s.node_name.as_deref()).unwrap_or_default();
        let status = p.status.as_ref();
        let host_ips = status.and_then(|s| s.host_ips.as_deref()).unwrap_or_default().iter().map(|h| h.ip.as_str());
        for ip in host_ips.chain(status.and_then(|s| s.host_ip.as_deref())) {
            if let (Ok(ip), false) = (ip.parse(), node.is_empty()) {
                node_ips.entry(ip).or_insert_with(|| node.to_string());
            }
        }
    }

    let mut namespaces: Vec<Namespace> = Vec::new();
    let mut pods: Vec<Pod> = Vec::new();
    let mut policies: Vec<Policy> = Vec::new();
    let mut cluster_policies: Vec<ClusterPolicy> = Vec::new();
    let mut nodes: Vec<Node> = Vec::new();
    let mut services: Vec<Service> = Vec::new();
    let mut endpoint_conditions: BTreeMap<ObjectRef, EndpointConditions> = BTreeMap::new();
    // A Node object's InternalIPs are that node's addresses, whatever pods say.
    let mut declared_node_ips: BTreeMap<IpAddr, String> = BTreeMap::new();
    let mut pod_ids: HashMap<ObjectRef, String> = HashMap::new();
    let mut pod_origins: HashMap<ObjectRef, (Origin, String)> = HashMap::new();
    for (origin, label, raw) in raws {
        let field_err = |e: FieldError| origin.error(Some(label.clone()), Some(e.path), e.reason);
        match raw {
            Raw::Namespace(ns) => namespaces.push(convert::namespace(&ns).map_err(field_err)?),
            Raw::ClusterPolicy(policy) => cluster_policies.push(*policy),
            Raw::Service(svc) => services.push(convert::service(&svc).map_err(field_err)?),
            Raw::Node(node) => {
                let converted = tiers::node_from(&node).map_err(field_err)?;
                for ip in tiers::internal_ips(&node) {
                    declared_node_ips.entry(ip).or_insert_with(|| converted.name.clone());
                }
                nodes.push(converted);
            }
            Raw::Policy(p) => match convert::policy(&p) {
                Ok(policy) => policies.push(policy),
                // What netpol-agent enforces for a policy it cannot convert.
                Err(e) if options.lenient => {
                    warnings.push(format!(
                        "{}: {label}: {e} (--lenient: enforced fail-closed, as netpol-agent does: it isolates the pods it selects for its directions and allows nothing)",
                        origin.at()
                    ));
                    policies.push(convert::policy_fail_closed(&p, &e));
                }
                Err(e) => return Err(field_err(e)),
            },
            Raw::Pod(p) => {
                let mut assign = |id: &ObjectRef| placer.place(id);
                match convert::pod(&p, Some(&mut assign)).map_err(field_err)? {
                    PodOutcome::Pod(pod) => {
                        let conditions = convert::endpoint_conditions(&p);
                        if conditions != EndpointConditions::default() {
                            endpoint_conditions.insert(pod.id.clone(), conditions);
                        }
                        pod_ids.insert(pod.id.clone(), origin.at());
                        pod_origins.insert(pod.id.clone(), (origin.clone(), label.clone()));
                        pods.push(pod)
                    }
                    PodOutcome::Inactive(why) => {
                        warnings.push(format!("{}: {label} {why}: it takes no part", origin.at()))
                    }
                }
            }
            Raw::Workload { kind, object, template, replicas, owners } => {
                if !makes_own_pods(&object, &owners) {
                    continue;
                }
                let names: Vec<(String, Option<String>)> = match replicas {
                    Replicas::Count(n) => (0..n).map(|i| (format!("{}-{i}", object.name), None)).collect(),
                    Replicas::OnePerNode => placer
                        .nodes
                        .iter()
                        .map(|node| (format!("{}-{node}", object.name), Some(node.clone())))
                        .collect(),
                };
                for (name, node) in names {
                    let pod = pod_from_template(&template, &object.namespace, &name, node.as_deref()).map_err(|e| {
                        origin.error(Some(label.clone()), Some(format!("spec.template.{}", e.path)), e.reason)
                    })?;
                    let mut assign = |id: &ObjectRef| placer.place(id);
                    let converted = convert::pod(&pod, Some(&mut assign)).map_err(|e| {
                        origin.error(Some(label.clone()), Some(format!("spec.template.{}", e.path)), e.reason)
                    })?;
                    if let PodOutcome::Pod(pod) = converted {
                        if let Some(first) = pod_ids.insert(pod.id.clone(), origin.at()) {
                            return Err(origin.error(
                                Some(label.clone()),
                                None,
                                format!("{kind} makes pod {} which is also declared at {first}", pod.id),
                            ));
                        }
                        pods.push(pod);
                    }
                }
            }
        }
    }
    if placer.exhausted {
        return Err(LoadError {
            file: "<options>".into(),
            line: 0,
            object: None,
            field: None,
            reason: format!(
                "the synthetic IP range {} is too small for the pods that need addresses",
                options.synthetic_ipv4
            ),
        });
    }
    let pods = drop_shared_addresses(pods, &pod_origins, options.lenient, &mut warnings)?;
    for pod in pods.iter().filter(|p| p.host_network) {
        for ip in &pod.ips {
            node_ips.entry(*ip).or_insert_with(|| pod.node.as_str().to_string());
        }
    }
    if !declared_node_ips.is_empty() {
        // Node objects name their own addresses; what pods reveal only adds the others.
        for (ip, node) in node_ips {
            declared_node_ips.entry(ip).or_insert(node);
        }
        node_ips = declared_node_ips;
    }
    let cluster = Cluster::new(namespaces, pods, policies).with_tiers(cluster_policies, nodes, options.domains.clone());
    services.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(Loaded { cluster, warnings, node_ips, services, endpoint_conditions })
}

/// Two live pods never hold one address: the engines could not tell them apart (and would
/// each pick a different one). Only hostNetwork pods of one node share its address: they
/// are that node. Otherwise it is an error at the later pod in namespace/name order; with
/// `lenient` a warning, and the earlier pod keeps the address while the later takes no part.
fn drop_shared_addresses(
    mut pods: Vec<Pod>,
    origins: &HashMap<ObjectRef, (Origin, String)>,
    lenient: bool,
    warnings: &mut Vec<String>,
) -> Result<Vec<Pod>, LoadError> {
    pods.sort_by(|a, b| a.id.cmp(&b.id));
    let mut owners: HashMap<IpAddr, usize> = HashMap::new();
    let mut kept = Vec::with_capacity(pods.len());
    for pod in pods {
        let clash = pod.ips.iter().find_map(|ip| {
            let &k = owners.get(ip)?;
            let first: &Pod = &kept[k];
            let same_node = first.host_network && pod.host_network && first.node == pod.node;
            (!same_node).then(|| (*ip, first.id.clone()))
        });
        let Some((ip, first)) = clash else {
            for ip in &pod.ips {
                owners.entry(*ip).or_insert(kept.len());
            }
            kept.push(pod);
            continue;
        };
        // Synthesized pods never clash (they skip every declared address), so both were declared.
        let (origin, label) = origins.get(&pod.id).cloned().unwrap_or_else(|| {
            (Origin { file: "<input>".into(), line: 0, item: String::new() }, format!("Pod {}", pod.id))
        });
        let first_at = origins.get(&first).map(|(o, _)| o.at()).unwrap_or_default();
        let error = origin.error(
            Some(label),
            Some("status.podIP".into()),
            format!(
                "{ip} is also the IP of Pod {first} ({first_at}); two live pods cannot share an address \
                 (only hostNetwork pods of one node, which are that node, may)"
            ),
        );
        if !lenient {
            return Err(error);
        }
        warnings.push(format!("{error} (--lenient: {first} keeps the address, {} takes no part)", pod.id));
    }
    Ok(kept)
}

/// Splits a YAML stream at `---` lines; yields (1-based line of the document's first line, text).
pub fn split_documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut start = 1;
    for (i, line) in text.lines().enumerate() {
        let is_separator = line == "---" || line.starts_with("--- ") || line.starts_with("---\t") || line == "...";
        if is_separator {
            docs.push((start, std::mem::take(&mut current)));
            start = i + 2;
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    docs.push((start, current));
    docs.into_iter()
        .filter_map(|(start, doc)| {
            // Report the first line with content, not the blank or comment lines above it.
            let skip = doc.lines().take_while(|l| l.trim().is_empty() || l.trim_start().starts_with('#')).count();
            (skip < doc.lines().count()).then(|| (start + skip, doc))
        })
        .collect()
}

/// How deep `[`/`{` may nest. The YAML deserializer gives up past 128 levels of any nesting
/// ("recursion limit exceeded"), but only after parsing, which takes time quadratic in the
/// depth (benches/README.md); flow nesting alone past that limit is refused first.
/// (The API server's own JSON limit is 10 000 levels; no object we read comes near either.)
pub const MAX_FLOW_NESTING: usize = 128;

/// Refuses a document whose flow collections nest deeper than [`MAX_FLOW_NESTING`]: one
/// cheap pass over the text, skipping quoted strings and comments. Brackets inside plain
/// scalars are counted too, which can only make the check stricter on absurd input.
fn check_nesting(doc: &str) -> Result<(), String> {
    let (mut depth, mut line, mut quote, mut comment, mut prev) = (0usize, 1usize, None, false, '\n');
    let mut chars = doc.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\n' {
            line += 1;
            comment = false;
        }
        match quote {
            _ if comment => {}
            Some('"') if c == '\\' => {
                chars.next();
            }
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None => match c {
                '"' | '\'' if prev.is_whitespace() || matches!(prev, '[' | '{' | ',' | ':') => quote = Some(c),
                '#' if prev.is_whitespace() => comment = true,
                '[' | '{' => {
                    depth += 1;
                    if depth > MAX_FLOW_NESTING {
                        return Err(format!(
                            "nesting deeper than {MAX_FLOW_NESTING} levels at line {line} (a Kubernetes object is never this deep)"
                        ));
                    }
                }
                ']' | '}' => depth = depth.saturating_sub(1),
                _ => {}
            },
        }
        prev = c;
    }
    Ok(())
}

/// Parses one document: YAML, JSON, or (as kubectl reads them) several JSON objects one
/// after another. Yields each value with the 1-based line where it starts.
fn parse_document(file: &str, doc: &str, line: usize) -> Result<Vec<(usize, Value)>, LoadError> {
    let error =
        |line: usize, reason: String| LoadError { file: file.to_string(), line, object: None, field: None, reason };
    check_nesting(doc).map_err(|reason| error(line, reason))?;
    let trimmed = doc.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        let mut values = Vec::new();
        let mut stream = serde_json::Deserializer::from_str(doc).into_iter::<UniqueKeys>();
        let mut start = 0;
        let json: Result<(), serde_json::Error> = loop {
            // The value starts at the first non-blank character after the previous one.
            start += doc[start..].len() - doc[start..].trim_start().len();
            match stream.next() {
                None => break Ok(()),
                Some(Ok(UniqueKeys(v))) => {
                    values.push((line + doc[..start].matches('\n').count(), v));
                    start = stream.byte_offset();
                }
                Some(Err(e)) => break Err(e),
            }
        };
        if json.is_ok() {
            return Ok(values.into_iter().filter(|(_, v)| !v.is_null()).collect());
        }
    }
    match yaml_serde::from_str(doc) {
        Ok(UniqueKeys(Value::Null)) => Ok(Vec::new()),
        Ok(UniqueKeys(v)) => Ok(vec![(line, v)]),
        Err(e) => Err(error(line, yaml_error(&e, line))),
    }
}

/// A JSON value read from YAML or JSON text, refusing a mapping that gives one key twice.
/// serde_json's own `Value` keeps the last of them without a word, so the checker would
/// check a policy other than the one written (`podSelector` given twice: which one does
/// the reader of the file think applies?), while the API server refuses such an object
/// ("duplicate field", kubectl's default strict field validation).
struct UniqueKeys(Value);

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(UniqueKeysVisitor).map(UniqueKeys)
    }
}

struct UniqueKeysVisitor;

impl<'de> serde::de::Visitor<'de> for UniqueKeysVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a YAML or JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_i128<E: serde::de::Error>(self, v: i128) -> Result<Value, E> {
        i64::try_from(v).map(Value::from).map_err(|_| E::custom("JSON number out of range"))
    }

    fn visit_u128<E: serde::de::Error>(self, v: u128) -> Result<Value, E> {
        u64::try_from(v).map(Value::from).map_err(|_| E::custom("JSON number out of range"))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // As serde_json's Value: a number JSON cannot hold (NaN, infinities) is null.
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(UniqueKeys(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(serde::de::Error::custom(format!("key `{key}` given twice in one mapping")));
            }
            let UniqueKeys(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

fn yaml_error(e: &yaml_serde::Error, doc_line: usize) -> String {
    match e.location() {
        Some(loc) => format!(
            "invalid YAML at line {}, column {}: {}",
            doc_line + loc.line() - 1,
            loc.column(),
            strip_location(&e.to_string())
        ),
        None => format!("invalid YAML: {e}"),
    }
}

fn strip_location(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

fn str_field<'v>(v: &'v Value, key: &str) -> Option<&'v str> {
    v.get(key).and_then(Value::as_str)
}

/// Kinds without a namespace: messages name them by name alone.
const CLUSTER_SCOPED: &[&str] =
    &["Namespace", "Node", "ClusterNetworkPolicy", "AdminNetworkPolicy", "BaselineAdminNetworkPolicy"];

fn object_label(kind: &str, v: &Value) -> String {
    let meta = v.get("metadata");
    let name = meta.and_then(|m| str_field(m, "name")).unwrap_or("<no name>");
    match meta.and_then(|m| str_field(m, "namespace")) {
        _ if CLUSTER_SCOPED.contains(&kind) => format!("{kind} {name}"),
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} default/{name}"),
    }
}

/// Sorts parsed documents into [`Raw`] objects, checking each kind we read as strictly as
/// the API server does.
struct Collector<'a> {
    options: &'a LoadOptions,
    /// How cluster policies are read: [`tiers::Mode::File`] for files,
    /// [`tiers::Mode::ApiServer`] for objects an API server listed.
    mode: tiers::Mode,
    raws: &'a mut Vec<(Origin, String, Raw)>,
    warnings: &'a mut Vec<String>,
    skipped: &'a mut BTreeMap<String, String>,
}

/// The kinds netpol-check reads, each in the one group/version an API server serves it in
/// (besides the legacy `net.alpha.kubernetes.io/v1alpha1` NetworkPolicy).
const READ_KINDS: &[(&str, &str)] = &[
    ("v1", "Namespace"),
    ("v1", "Pod"),
    ("v1", "Node"),
    ("v1", "Service"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("apps/v1", "Deployment"),
    ("apps/v1", "StatefulSet"),
    ("apps/v1", "DaemonSet"),
    ("apps/v1", "ReplicaSet"),
    ("v1", "ReplicationController"),
    ("batch/v1", "Job"),
    ("batch/v1", "CronJob"),
];

impl Collector<'_> {
    fn collect(&mut self, value: Value, origin: &Origin) -> Result<(), LoadError> {
        if !value.is_object() {
            return Err(origin.error(None, None, "expected a Kubernetes object (a mapping with apiVersion and kind)"));
        }
        let api_version = str_field(&value, "apiVersion").unwrap_or("").to_string();
        let Some(kind) = str_field(&value, "kind").map(str::to_string) else {
            self.warnings.push(format!("{}: skipped a document without `kind` (not a Kubernetes object)", origin.at()));
            return Ok(());
        };
        let label = object_label(&kind, &value);
        let raw = match (api_version.as_str(), kind.as_str()) {
            ("v1", "Namespace") => Raw::Namespace(self.decode(&value, origin, &label)?),
            ("v1", "Pod") => Raw::Pod(Box::new(self.decode(&value, origin, &label)?)),
            ("v1", "Node") => Raw::Node(Box::new(self.decode(&value, origin, &label)?)),
            ("v1", "Service") => Raw::Service(Box::new(self.decode(&value, origin, &label)?)),
            (version, k) if tiers::versions(k).is_some() => {
                if !tiers::versions(k).unwrap_or_default().contains(&version) {
                    return Err(origin.error(Some(label), None, tiers::unknown_version(k, version)));
                }
                Raw::ClusterPolicy(Box::new(self.cluster_policy(&value, origin, &label)?))
            }
            ("networking.k8s.io/v1", "NetworkPolicy") => Raw::Policy(self.decode(&value, origin, &label)?),
            ("net.alpha.kubernetes.io/v1alpha1", "NetworkPolicy") => {
                let v1 = legacy_to_v1(&value).map_err(|e| origin.error(Some(label.clone()), Some(e.path), e.reason))?;
                let yaml = yaml_serde::to_string(&v1).unwrap_or_default();
                self.warnings.push(format!(
                    "{}: {label}: converted from the pre-v1 net.alpha.kubernetes.io/v1alpha1 form; write it as networking.k8s.io/v1:\n{}",
                    origin.at(),
                    yaml.trim_end()
                ));
                Raw::Policy(self.decode(&v1, origin, &label)?)
            }
            ("conformance.netpol/v1", "Expectation") => return Ok(()),
            (_, k) if k.ends_with("List") && value.get("items").is_some() => {
                let Some(Value::Array(items)) = value.get("items") else {
                    return Err(origin.error(Some(label), Some("items".into()), "must be a list"));
                };
                // `kubectl get --raw` lists (`PodList`, ...) leave `kind` and `apiVersion` out
                // of their items: they are the list's, less `List`.
                let item_kind = k.strip_suffix("List").filter(|k| !k.is_empty());
                for (i, item) in items.iter().enumerate() {
                    let mut item = item.clone();
                    if let (Some(item_kind), Value::Object(fields)) = (item_kind, &mut item)
                        && !fields.contains_key("kind")
                    {
                        fields.insert("kind".into(), Value::String(item_kind.to_string()));
                        fields.entry("apiVersion").or_insert_with(|| Value::String(api_version.clone()));
                    }
                    self.collect(item, &origin.inside(&format!("items[{i}].")))?;
                }
                return Ok(());
            }
            (group, k) if workload_kind(group, k) => {
                self.check_workload(&value, k, origin, &label)?;
                let (template, replicas) = workload_template(&value, k)
                    .map_err(|e| origin.error(Some(label.clone()), Some(e.path), e.reason))?;
                let meta = value.get("metadata");
                let object = ObjectRef::new(
                    meta.and_then(|m| str_field(m, "namespace")).unwrap_or("default"),
                    meta.and_then(|m| str_field(m, "name")).unwrap_or(""),
                );
                if object.name.is_empty() {
                    return Err(origin.error(Some(label), Some("metadata.name".into()), "is required"));
                }
                Raw::Workload { kind: k.to_string(), object, template, replicas, owners: Owners::of(&value, k) }
            }
            (_, k) if READ_KINDS.iter().any(|(_, read)| read.eq_ignore_ascii_case(k)) => {
                // The API server has no such resource: kubectl stops with "no matches for kind".
                return Err(origin.error(
                    Some(label),
                    None,
                    format!("no matches for kind {k:?} in version {api_version:?}"),
                ));
            }
            _ => {
                let key = if api_version.is_empty() { kind.clone() } else { format!("{api_version} {kind}") };
                self.skipped.entry(key).or_insert_with(|| origin.at());
                return Ok(());
            }
        };
        self.raws.push((origin.clone(), label, raw));
        Ok(())
    }

    /// Decodes a kind we read into its API type, and rejects the fields that type does not
    /// have, as kubectl's strict field validation (the default since 1.27) does:
    /// `strict decoding error: unknown field "spec.ingress[0].fromm"`. Which fields a type has
    /// is what it keeps: a field the typed round trip drops is unknown. `status` is not
    /// checked (we read little of it, and newer servers add to it), nor are `null` values
    /// (they carry nothing). With `lenient` the fields are dropped with a warning, as a
    /// server without strict validation would drop them.
    fn decode<T: DeserializeOwned + Serialize>(
        &mut self,
        value: &Value,
        origin: &Origin,
        label: &str,
    ) -> Result<T, LoadError> {
        let typed: T = serde_path_to_error::deserialize(value).map_err(|e| {
            let p = e.path().to_string();
            let field = if p == "." { None } else { Some(p) };
            origin.error(Some(label.to_string()), field, e.into_inner().to_string())
        })?;
        let mut unknown = Vec::new();
        if let (Value::Object(sent), Ok(Value::Object(kept))) = (value, serde_json::to_value(&typed)) {
            for (key, v) in sent.iter().filter(|(key, _)| *key != "status") {
                unknown_fields(v, kept.get(key), key.clone(), &mut unknown);
            }
        }
        self.unknown_fields(&unknown, origin, label)?;
        Ok(typed)
    }

    /// Converts a cluster policy in the collector's [`tiers::Mode`], its unknown fields
    /// refused as [`Collector::decode`] refuses them (with `lenient`, ignored with a warning).
    fn cluster_policy(&mut self, value: &Value, origin: &Origin, label: &str) -> Result<ClusterPolicy, LoadError> {
        let (result, unknown) = tiers::cluster_policy_checked(value, self.mode);
        self.unknown_fields(&unknown, origin, label)?;
        result.map_err(|e| origin.error(Some(label.to_string()), Some(e.path), e.reason))
    }

    /// The error (or, with `lenient`, the warning) for fields a kind does not have.
    fn unknown_fields(&mut self, unknown: &[String], origin: &Origin, label: &str) -> Result<(), LoadError> {
        if unknown.is_empty() {
            return Ok(());
        }
        let list: Vec<String> = unknown.iter().map(|p| format!("unknown field {p:?}")).collect();
        let error = origin.error(Some(label.to_string()), None, format!("strict decoding error: {}", list.join(", ")));
        if !self.options.lenient {
            return Err(error);
        }
        self.warnings
            .push(format!("{error} (--lenient: ignored, as a server without strict field validation drops it)"));
        Ok(())
    }

    /// A workload's fields are checked as strictly as a Pod's (its pod template above all).
    fn check_workload(&mut self, value: &Value, kind: &str, origin: &Origin, label: &str) -> Result<(), LoadError> {
        use k8s_openapi::api::{apps::v1 as apps, batch::v1 as batch};
        match kind {
            "Deployment" => self.decode::<apps::Deployment>(value, origin, label).map(drop),
            "StatefulSet" => self.decode::<apps::StatefulSet>(value, origin, label).map(drop),
            "DaemonSet" => self.decode::<apps::DaemonSet>(value, origin, label).map(drop),
            "ReplicaSet" => self.decode::<apps::ReplicaSet>(value, origin, label).map(drop),
            "ReplicationController" => self.decode::<core::ReplicationController>(value, origin, label).map(drop),
            "Job" => self.decode::<batch::Job>(value, origin, label).map(drop),
            "CronJob" => self.decode::<batch::CronJob>(value, origin, label).map(drop),
            _ => Ok(()),
        }
    }
}

/// The paths of `sent` (a field as written) that `kept` (the same field after a typed round
/// trip) lost.
fn unknown_fields(sent: &Value, kept: Option<&Value>, path: String, out: &mut Vec<String>) {
    if sent.is_null() {
        return;
    }
    let Some(kept) = kept else {
        out.push(path);
        return;
    };
    match (sent, kept) {
        (Value::Object(sent), Value::Object(kept)) => {
            for (key, v) in sent {
                unknown_fields(v, kept.get(key), format!("{path}.{key}"), out);
            }
        }
        (Value::Array(sent), Value::Array(kept)) => {
            for (i, (v, k)) in sent.iter().zip(kept).enumerate() {
                unknown_fields(v, Some(k), format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn workload_kind(group: &str, kind: &str) -> bool {
    matches!(
        (group, kind),
        ("apps/v1", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet")
            | ("v1", "ReplicationController")
            | ("batch/v1", "Job" | "CronJob")
    )
}

fn workload_template(v: &Value, kind: &str) -> Result<(Value, Replicas), FieldError> {
    let spec = v.get("spec").ok_or_else(|| FieldError::new("spec", "is required"))?;
    let (spec, prefix) = if kind == "CronJob" {
        let job = spec
            .get("jobTemplate")
            .and_then(|j| j.get("spec"))
            .ok_or_else(|| FieldError::new("spec.jobTemplate.spec", "is required"))?;
        (job, "spec.jobTemplate.spec")
    } else {
        (spec, "spec")
    };
    let template =
        spec.get("template").cloned().ok_or_else(|| FieldError::new(format!("{prefix}.template"), "is required"))?;
    // Upstream `SetDefaults_Deployment`, `_ReplicaSet`, `_StatefulSet` (apps/v1),
    // `SetDefaults_ReplicationController` (core/v1): `if obj.Spec.Replicas == nil` it is 1;
    // `SetDefaults_Job` (batch/v1): a nil `parallelism` is 1. Absent and `null` are nil.
    let count = |key: &str| -> Result<u32, FieldError> {
        match spec.get(key) {
            None | Some(Value::Null) => Ok(1),
            Some(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()).filter(|n| *n <= 10_000).ok_or_else(|| {
                FieldError::new(format!("{prefix}.{key}"), format!("must be a whole number from 0 to 10000 (got {n})"))
            }),
        }
    };
    let replicas = match kind {
        "DaemonSet" => Replicas::OnePerNode,
        "Job" | "CronJob" => Replicas::Count(count("parallelism")?),
        _ => Replicas::Count(count("replicas")?),
    };
    Ok((template, replicas))
}

fn pod_from_template(
    template: &Value,
    namespace: &str,
    name: &str,
    node: Option<&str>,
) -> Result<core::Pod, FieldError> {
    let mut pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {}, "spec": {}});
    if let Some(meta) = template.get("metadata") {
        pod["metadata"] = meta.clone();
    }
    if let Some(spec) = template.get("spec") {
        pod["spec"] = spec.clone();
    }
    let Value::Object(meta) = &mut pod["metadata"] else {
        return Err(FieldError::new("metadata", "must be a mapping"));
    };
    meta.insert("name".into(), Value::String(name.to_string()));
    meta.insert("namespace".into(), Value::String(namespace.to_string()));
    if let (Some(node), Value::Object(spec)) = (node, &mut pod["spec"]) {
        spec.insert("nodeName".into(), Value::String(node.to_string()));
    }
    serde_path_to_error::deserialize(pod).map_err(|e| FieldError::new(e.path().to_string(), e.into_inner().to_string()))
}

/// The pre-v1 form (`net.alpha.kubernetes.io/v1alpha1`): `spec.podSelector` is a plain label
/// map and `spec.allowIncoming` holds `from[].pods`/`from[].namespaces` (label maps) and
/// `toPorts[]`. No `allowIncoming` means no incoming traffic is allowed.
fn legacy_to_v1(v: &Value) -> Result<Value, FieldError> {
    let spec = v.get("spec").cloned().unwrap_or(Value::Object(Map::new()));
    let labels = |value: Option<&Value>, path: &str| -> Result<Value, FieldError> {
        match value {
            None | Some(Value::Null) => Ok(json!({})),
            Some(Value::Object(m)) => Ok(json!({"matchLabels": m})),
            Some(_) => Err(FieldError::new(path, "must be a map of labels")),
        }
    };
    let mut rule = Map::new();
    if let Some(incoming) = spec.get("allowIncoming") {
        if let Some(from) = incoming.get("from") {
            let list = from.as_array().ok_or_else(|| FieldError::new("spec.allowIncoming.from", "must be a list"))?;
            let mut peers = Vec::new();
            for (i, peer) in list.iter().enumerate() {
                let mut out = Map::new();
                if let Some(p) = peer.get("pods") {
                    out.insert("podSelector".into(), labels(Some(p), &format!("spec.allowIncoming.from[{i}].pods"))?);
                }
                if let Some(n) = peer.get("namespaces") {
                    out.insert(
                        "namespaceSelector".into(),
                        labels(Some(n), &format!("spec.allowIncoming.from[{i}].namespaces"))?,
                    );
                }
                peers.push(Value::Object(out));
            }
            rule.insert("from".into(), Value::Array(peers));
        }
        if let Some(ports) = incoming.get("toPorts") {
            rule.insert("ports".into(), ports.clone());
        }
    }
    let ingress = if spec.get("allowIncoming").is_some() { vec![Value::Object(rule)] } else { vec![] };
    let mut metadata = v.get("metadata").cloned().unwrap_or(json!({}));
    if let Value::Object(m) = &mut metadata {
        m.retain(|k, _| k == "name" || k == "namespace" || k == "labels");
    }
    Ok(json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata,
        "spec": {
            "podSelector": labels(spec.get("podSelector"), "spec.podSelector")?,
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        }
    }))
}

/// Places synthesized pods on nodes (round robin) and gives them addresses (in order).
struct Placer {
    nodes: Vec<String>,
    next_node: usize,
    v4: IpNet,
    v6: Option<IpNet>,
    next_host: u128,
    taken: BTreeSet<IpAddr>,
    exhausted: bool,
}

impl Placer {
    fn new(options: &LoadOptions, nodes: Vec<String>, taken: BTreeSet<IpAddr>) -> Self {
        Placer {
            nodes,
            next_node: 0,
            v4: options.synthetic_ipv4,
            v6: options.synthetic_ipv6,
            next_host: 1,
            taken,
            exhausted: false,
        }
    }

    fn nth(net: IpNet, k: u128) -> Option<IpAddr> {
        match net {
            IpNet::V4(n) => {
                let size = 1u128 << (32 - n.prefix_len());
                (k < size.saturating_sub(1))
                    .then(|| IpAddr::from(std::net::Ipv4Addr::from((u32::from(n.network()) as u128 + k) as u32)))
            }
            IpNet::V6(n) => {
                let bits = 128 - u32::from(n.prefix_len());
                let fits = bits >= 127 || k < (1u128 << bits) - 1;
                fits.then(|| IpAddr::from(std::net::Ipv6Addr::from(u128::from(n.network()) + k)))
            }
        }
    }

    fn place(&mut self, _id: &ObjectRef) -> (String, Vec<IpAddr>) {
        let node = self.nodes[self.next_node % self.nodes.len()].clone();
        self.next_node += 1;
        loop {
            let k = self.next_host;
            self.next_host += 1;
            let Some(v4) = Self::nth(self.v4, k) else {
                self.exhausted = true;
                return (node, vec![]);
            };
            if self.taken.contains(&v4) {
                continue;
            }
            let mut ips = vec![v4];
            if let Some(v6) = self.v6.and_then(|net| Self::nth(net, k)) {
                ips.push(v6);
            }
            return (node, ips);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::policy::tiers::{ClusterPolicyKind, Tier};

    fn load(text: &str, options: &LoadOptions) -> Result<Loaded, LoadError> {
        load_sources(&[Source { name: "in.yaml".into(), text: text.into() }], options)
    }

    fn loaded(text: &str) -> Loaded {
        load(text, &LoadOptions::default()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn error(text: &str) -> String {
        load(text, &LoadOptions::default()).expect_err("invalid").to_string()
    }

    /// A cluster policy document of `kind` in `version` named `name`, with a `spec` body
    /// (YAML lines, indented two spaces).
    fn tier_doc(version: &str, kind: &str, name: &str, spec: &str) -> String {
        format!(
            "apiVersion: policy.networking.k8s.io/{version}\nkind: {kind}\nmetadata:\n  name: {name}\nspec:\n{spec}"
        )
    }

    const CNP_SPEC: &str = "  tier: Admin\n  priority: 3\n  subject: {namespaces: {}}\n";
    const ANP_SPEC: &str = "  priority: 2\n  subject: {namespaces: {}}\n";
    const BANP_SPEC: &str = "  subject: {namespaces: {}}\n";

    fn node_doc(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels: {{zone: x}}\nstatus:\n  addresses:\n  - {{type: InternalIP, address: {ip}}}\n"
        )
    }

    #[test]
    fn every_cluster_policy_kind_and_version_and_nodes_load_into_the_cluster() {
        let text = [
            tier_doc("v1beta1", "ClusterNetworkPolicy", "beta", CNP_SPEC),
            tier_doc("v1alpha2", "ClusterNetworkPolicy", "alpha", CNP_SPEC),
            tier_doc("v1alpha1", "AdminNetworkPolicy", "admin", ANP_SPEC),
            tier_doc("v1alpha1", "BaselineAdminNetworkPolicy", "default", BANP_SPEC),
            node_doc("worker-1", "192.168.1.10"),
        ]
        .join("---\n");
        let options = LoadOptions {
            domains: DomainMap::from([("example.com".to_string(), vec!["203.0.113.7".parse().unwrap()])]),
            ..LoadOptions::default()
        };
        let l = load(&text, &options).unwrap();
        let order: Vec<(Tier, u16, &str, ClusterPolicyKind)> =
            l.cluster.cluster_policies.iter().map(|p| p.precedence()).collect();
        assert_eq!(
            order,
            [
                (Tier::Admin, 2, "admin", ClusterPolicyKind::AdminNetworkPolicy),
                (Tier::Admin, 3, "alpha", ClusterPolicyKind::ClusterNetworkPolicy),
                (Tier::Admin, 3, "beta", ClusterPolicyKind::ClusterNetworkPolicy),
                (Tier::Baseline, 0, "default", ClusterPolicyKind::BaselineAdminNetworkPolicy),
            ]
        );
        assert_eq!(l.cluster.nodes.len(), 1);
        assert_eq!(l.cluster.nodes[0].ips, ["192.168.1.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(l.cluster.domains.as_ref(), &options.domains);
        assert_eq!(l.node_ips.get(&"192.168.1.10".parse().unwrap()).map(String::as_str), Some("worker-1"));
    }

    #[test]
    fn a_nodes_internal_ip_wins_over_what_a_pod_says_and_pods_still_add_the_others() {
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: a}\nspec: {nodeName: pod-says, containers: []}\nstatus: {podIP: 10.0.0.1, hostIP: 192.168.1.10, hostIPs: [{ip: 192.168.1.10}, {ip: 192.168.1.11}]}\n";
        let without = loaded(pod);
        assert_eq!(without.node_ips.get(&"192.168.1.10".parse().unwrap()).map(String::as_str), Some("pod-says"));
        let with = loaded(&format!("{pod}---\n{}", node_doc("worker-1", "192.168.1.10")));
        assert_eq!(with.node_ips.get(&"192.168.1.10".parse().unwrap()).map(String::as_str), Some("worker-1"));
        assert_eq!(with.node_ips.get(&"192.168.1.11".parse().unwrap()).map(String::as_str), Some("pod-says"));
    }

    #[test]
    fn a_cluster_policy_declared_twice_is_an_error_but_one_name_in_two_kinds_is_not() {
        let text = [
            tier_doc("v1beta1", "ClusterNetworkPolicy", "x", CNP_SPEC),
            tier_doc("v1alpha1", "AdminNetworkPolicy", "x", ANP_SPEC),
            tier_doc("v1alpha2", "ClusterNetworkPolicy", "x", CNP_SPEC),
        ];
        assert_eq!(loaded(&text[..2].join("---\n")).cluster.cluster_policies.len(), 2);
        assert_eq!(
            error(&text.join("---\n")),
            "in.yaml:18: ClusterNetworkPolicy x: declared twice (first at in.yaml:1)"
        );
        let nodes = format!("{}---\n{}", node_doc("n", "10.9.0.1"), node_doc("n", "10.9.0.2"));
        assert_eq!(error(&nodes), "in.yaml:10: Node n: declared twice (first at in.yaml:1)");
    }

    #[test]
    fn a_cluster_policy_error_names_the_file_line_object_and_field() {
        let text = format!(
            "# head\n{}",
            tier_doc(
                "v1beta1",
                "ClusterNetworkPolicy",
                "p",
                "  tier: Admin\n  priority: 2000\n  subject: {namespaces: {}}\n"
            )
        );
        assert_eq!(
            error(&text),
            "in.yaml:2: ClusterNetworkPolicy p: spec.priority: must be between 0 and 1000, inclusive (got 2000)"
        );
        let list = "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: policy.networking.k8s.io/v1alpha1, kind: BaselineAdminNetworkPolicy, metadata: {name: default}, spec: {subject: {}}}\n";
        assert_eq!(
            error(list),
            "in.yaml:1: BaselineAdminNetworkPolicy default: items[0].spec.subject: must set exactly one of \"namespaces\", \"pods\""
        );
    }

    #[test]
    fn an_unknown_field_of_a_cluster_policy_is_refused_like_any_kinds_and_lenient_ignores_it() {
        let text = tier_doc("v1beta1", "ClusterNetworkPolicy", "p", &format!("{CNP_SPEC}  ingres: []\n"));
        let expected = "in.yaml:1: ClusterNetworkPolicy p: strict decoding error: unknown field \"spec.ingres\"";
        assert_eq!(error(&text), expected);
        let lenient = load(&text, &LoadOptions { lenient: true, ..LoadOptions::default() }).unwrap();
        assert_eq!(lenient.cluster.cluster_policies.len(), 1);
        assert!(lenient.warnings.iter().any(|w| w.starts_with(expected)), "{:?}", lenient.warnings);
        let node = format!(
            "{}  taints: []\n",
            node_doc("n", "10.9.0.1").replace("status:\n", "spec:\n  podCIDRz: x\nstatus:\n")
        );
        assert_eq!(error(&node), "in.yaml:1: Node n: strict decoding error: unknown field \"spec.podCIDRz\"");
    }

    /// The documents of `text` as an API server would list them.
    fn api_objects(text: &str) -> Vec<Value> {
        split_documents(text).iter().map(|(_, doc)| yaml_serde::from_str(doc).expect("YAML")).collect()
    }

    #[test]
    fn a_cluster_policy_of_a_newer_api_from_the_server_is_refused_by_name_and_lenient_fails_its_rule_closed() {
        // An egress peer whose only field netpol does not know (a newer CRD's).
        let spec = format!("{ANP_SPEC}  egress:\n  - action: Allow\n    to: [{{newPeer: {{}}}}]\n");
        let text = tier_doc("v1alpha1", "AdminNetworkPolicy", "newer", &spec);
        let source = "cluster at https://k8s:6443/";
        let error = load_api_objects(source, api_objects(&text), &LoadOptions::default()).expect_err("refused");
        assert_eq!(
            error.to_string(),
            "cluster at https://k8s:6443/: AdminNetworkPolicy newer: strict decoding error: unknown field \"spec.egress[0].to[0].newPeer\""
        );
        let lenient = LoadOptions { lenient: true, ..LoadOptions::default() };
        let loaded = load_api_objects(source, api_objects(&text), &lenient).expect("lenient");
        let rule = &loaded.cluster.cluster_policies[0].egress[0];
        assert!(rule.fail_closed.is_some() && rule.peers.is_empty(), "an Allow rule that fails closed matches nothing");
        assert!(loaded.warnings[0].starts_with(&error.to_string()), "{:?}", loaded.warnings);
    }

    #[test]
    fn objects_from_the_server_load_as_the_same_documents_in_a_file() {
        let text = [
            tier_doc("v1alpha1", "AdminNetworkPolicy", "admin", ANP_SPEC),
            node_doc("worker-1", "192.168.1.10"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n".to_string(),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: a}\nspec: {nodeName: worker-1, containers: []}\nstatus: {podIP: 10.0.0.1, hostIP: 192.168.1.10}\n".to_string(),
        ]
        .join("---\n");
        let from_api = load_api_objects("cluster", api_objects(&text), &LoadOptions::default()).unwrap();
        let from_file = loaded(&text);
        assert_eq!(format!("{:?}", from_api.cluster), format!("{:?}", from_file.cluster));
        assert_eq!(from_api.node_ips, from_file.node_ips);
    }

    #[test]
    fn an_unknown_version_of_a_cluster_policy_kind_names_the_versions_read() {
        assert_eq!(
            error(&tier_doc("v1", "AdminNetworkPolicy", "a", ANP_SPEC)),
            "in.yaml:1: AdminNetworkPolicy a: no matches for kind \"AdminNetworkPolicy\" in version \"policy.networking.k8s.io/v1\" (netpol reads AdminNetworkPolicy in policy.networking.k8s.io/v1alpha1)"
        );
        assert_eq!(
            error("apiVersion: v2\nkind: Node\nmetadata: {name: n}\n"),
            "in.yaml:1: Node n: no matches for kind \"Node\" in version \"v2\""
        );
    }

    #[test]
    fn services_load_sorted_and_a_bad_one_names_the_file_line_object_and_field() {
        let svc = |name: &str, spec: &str| {
            format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec: {spec}\n")
        };
        let l = loaded(
            &[svc("b", "{ports: [{port: 80}]}"), svc("a", "{selector: {app: a}, ports: [{port: 80}]}")].join("---\n"),
        );
        let names: Vec<String> = l.services.iter().map(|s| s.id.to_string()).collect();
        assert_eq!(names, ["shop/a", "shop/b"]);
        let bad = format!("# head\n{}", svc("c", "{ports: [{port: 80, targetPort: web_1}]}"));
        assert!(
            error(&bad).starts_with("in.yaml:2: Service shop/c: spec.ports[0].targetPort: invalid port name \"web_1\""),
            "{}",
            error(&bad)
        );
        assert_eq!(
            error(&svc("d", "{ports: [{port: 80}], selektor: {}}")),
            "in.yaml:1: Service shop/d: strict decoding error: unknown field \"spec.selektor\""
        );
        assert_eq!(
            error(&[svc("a", "{ports: [{port: 80}]}"), svc("a", "{ports: [{port: 81}]}")].join("---\n")),
            "in.yaml:6: Service shop/a: declared twice (first at in.yaml:1)"
        );
    }

    #[test]
    fn documents_report_their_first_content_line() {
        let docs = split_documents("# head\n---\n\nkind: A\n---\nkind: B\n");
        assert_eq!(docs.iter().map(|(l, _)| *l).collect::<Vec<_>>(), vec![4, 6]);
    }
}
