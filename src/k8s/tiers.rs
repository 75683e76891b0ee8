//! The cluster-wide tiers' objects, as written or as the API server sends them, to the
//! validated model of [`crate::policy::tiers`].
//!
//! ```text
//!  ClusterNetworkPolicy  policy.networking.k8s.io/v1beta1, v1alpha2 ─┐
//!  AdminNetworkPolicy    policy.networking.k8s.io/v1alpha1          ─┼─► cluster_policy ─► ClusterPolicy
//!  BaselineAdminNetworkPolicy  policy.networking.k8s.io/v1alpha1    ─┘    (or FieldError{path, reason})
//!  Node v1 (labels, status.addresses) ──────────────────────────────────► node ─► Node
//! ```
//!
//! These kinds are CRDs: no k8s-openapi type exists for them, so the conversion reads the
//! object's JSON value and checks what the CRD's schema checks (exactly one field of a
//! subject, peer, protocol or port, MinItems/MaxItems, priority 0-1000, ports 1-65535, port
//! ranges, CIDRs, the `domainNames` pattern, the CEL rules, the singleton
//! BaselineAdminNetworkPolicy). Label selectors, label keys and values, port names and
//! object names go through [`crate::k8s::convert`] and [`crate::validate`], as for every
//! other kind.
//!
//! Two strictnesses ([`Mode`]):
//! - [`Mode::File`] (netpol-check): a field the API does not have is an error (the loader
//!   reports it as kubectl's strict field validation does), and so is a peer with no field.
//! - [`Mode::ApiServer`] (netpol-agent): the API server validated the object against the CRD
//!   it has, which may be newer than what netpol knows. Unknown fields are ignored, and a
//!   peer (or protocol entry) left with no field netpol knows makes its rule fail closed
//!   ([`ClusterRule::failed_closed`]): an Accept rule matches nothing, a Deny or Pass rule
//!   denies everything, as the API asks.
//!
//! Nothing here does I/O.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde_json::{Map, Value};

use crate::k8s::convert::{self, FieldError};
use crate::policy::model::{Direction, PortMatch, PortSpec, Protocol};
use crate::policy::selector::Selector;
use crate::policy::tiers::{
    Action, ClusterPeer, ClusterPolicy, ClusterPolicyId, ClusterPolicyKind, ClusterRule, Node, PodSet, Tier,
};
use crate::validate;

type Result<T> = std::result::Result<T, FieldError>;

/// How strictly an object is read: see the module documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Files given to netpol-check: every unknown field and every empty peer is an error.
    File,
    /// Objects the API server sent (netpol-agent): unknown fields are ignored, and a rule
    /// with a peer or protocol entry of no known field fails closed.
    ApiServer,
}

/// The API versions netpol reads `kind` in, or `None` if it is not a cluster policy kind.
pub fn versions(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        "ClusterNetworkPolicy" => Some(&["policy.networking.k8s.io/v1beta1", "policy.networking.k8s.io/v1alpha2"]),
        "AdminNetworkPolicy" | "BaselineAdminNetworkPolicy" => Some(&["policy.networking.k8s.io/v1alpha1"]),
        _ => None,
    }
}

/// The message for a cluster policy kind in an API version netpol does not read.
pub fn unknown_version(kind: &str, api_version: &str) -> String {
    let known = versions(kind).unwrap_or_default().join(", ");
    format!("no matches for kind {kind:?} in version {api_version:?} (netpol reads {kind} in {known})")
}

/// One kind in one version: what differs between them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Api {
    ClusterV1beta1,
    ClusterV1alpha2,
    Admin,
    Baseline,
}

impl Api {
    fn of(api_version: &str, kind: &str) -> Option<Api> {
        match (api_version, kind) {
            ("policy.networking.k8s.io/v1beta1", "ClusterNetworkPolicy") => Some(Api::ClusterV1beta1),
            ("policy.networking.k8s.io/v1alpha2", "ClusterNetworkPolicy") => Some(Api::ClusterV1alpha2),
            ("policy.networking.k8s.io/v1alpha1", "AdminNetworkPolicy") => Some(Api::Admin),
            ("policy.networking.k8s.io/v1alpha1", "BaselineAdminNetworkPolicy") => Some(Api::Baseline),
            _ => None,
        }
    }

    fn kind(self) -> ClusterPolicyKind {
        match self {
            Api::ClusterV1beta1 | Api::ClusterV1alpha2 => ClusterPolicyKind::ClusterNetworkPolicy,
            Api::Admin => ClusterPolicyKind::AdminNetworkPolicy,
            Api::Baseline => ClusterPolicyKind::BaselineAdminNetworkPolicy,
        }
    }

    fn is_cluster(self) -> bool {
        matches!(self, Api::ClusterV1beta1 | Api::ClusterV1alpha2)
    }

    /// MaxItems of `ingress`, `egress`, `from`, `to` and `protocols`/`ports`.
    fn max_items(self) -> usize {
        if self.is_cluster() { 25 } else { 100 }
    }

    /// The `action` values, as written, and what each is.
    fn actions(self) -> &'static [(&'static str, Action)] {
        match self {
            Api::ClusterV1beta1 | Api::ClusterV1alpha2 => {
                &[("Accept", Action::Accept), ("Deny", Action::Deny), ("Pass", Action::Pass)]
            }
            Api::Admin => &[("Allow", Action::Accept), ("Deny", Action::Deny), ("Pass", Action::Pass)],
            Api::Baseline => &[("Allow", Action::Accept), ("Deny", Action::Deny)],
        }
    }

    /// The field that lists a rule's ports.
    fn ports_field(self) -> &'static str {
        if self.is_cluster() { "protocols" } else { "ports" }
    }

    fn peer_fields(self, direction: Direction) -> &'static [&'static str] {
        match (direction, self) {
            (Direction::Ingress, _) => &["namespaces", "pods"],
            // BaselineAdminNetworkPolicy never had `domainNames`.
            (Direction::Egress, Api::Baseline) => &["namespaces", "pods", "nodes", "networks"],
            (Direction::Egress, _) => &["namespaces", "pods", "nodes", "networks", "domainNames"],
        }
    }
}

/// Converts a ClusterNetworkPolicy, AdminNetworkPolicy or BaselineAdminNetworkPolicy (the
/// whole object). In [`Mode::File`] the first unknown field is an error
/// (`spec.ingress[0].fromm: unknown field`).
pub fn cluster_policy(value: &Value, mode: Mode) -> Result<ClusterPolicy> {
    let (result, unknown) = cluster_policy_checked(value, mode);
    match unknown.first() {
        Some(path) if mode == Mode::File => Err(FieldError::new(path.clone(), "unknown field")),
        _ => result,
    }
}

/// [`cluster_policy`], and the paths of the fields the object has but the API does not
/// (ignored by the conversion), for a caller that reports them itself.
pub fn cluster_policy_checked(value: &Value, mode: Mode) -> (Result<ClusterPolicy>, Vec<String>) {
    let mut reader = Reader { mode, unknown: Vec::new() };
    let result = reader.policy(value);
    (result, reader.unknown)
}

/// Converts a v1 Node: its name, labels, and the addresses of `status.addresses` of type
/// InternalIP or ExternalIP that are IP addresses (the others, host names, are skipped).
pub fn node(value: &Value) -> Result<Node> {
    let typed: core::Node = serde_path_to_error::deserialize(value)
        .map_err(|e| FieldError::new(e.path().to_string(), e.into_inner().to_string()))?;
    node_from(&typed)
}

/// [`node`] of a typed Node.
pub fn node_from(node: &core::Node) -> Result<Node> {
    let name = node.metadata.name.clone().unwrap_or_default();
    convert::validate_dns_subdomain(&name, "metadata.name")?;
    let labels = convert::labels(node.metadata.labels.as_ref(), "metadata.labels")?;
    Ok(Node { name, labels, ips: addresses(node, &["InternalIP", "ExternalIP"]) })
}

/// The node's InternalIP addresses: what pods see as the node's address.
pub fn internal_ips(node: &core::Node) -> Vec<IpAddr> {
    addresses(node, &["InternalIP"])
}

fn addresses(node: &core::Node, types: &[&str]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    let listed = node.status.as_ref().and_then(|s| s.addresses.as_deref()).unwrap_or_default();
    for a in listed.iter().filter(|a| types.contains(&a.type_.as_str())) {
        if let Ok(ip) = a.address.parse::<IpAddr>()
            && !out.contains(&ip)
        {
            out.push(ip);
        }
    }
    out
}

/// Walks one object, recording the fields it does not know.
struct Reader {
    mode: Mode,
    unknown: Vec<String>,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_string() } else { format!("{path}.{key}") }
}

/// Whether a v1alpha1 `namespaces` peer is v0.1.0's NamespacedPeer (`{namespaceSelector:
/// ...}`, `{sameLabels: [...]}`) rather than a label selector (`{matchLabels: ...}`).
fn is_namespaced_peer(v: &Value) -> bool {
    ["namespaceSelector", "sameLabels", "notSameLabels"].iter().any(|k| v.get(k).is_some())
}

/// A field of a mapping; `null` is absent (it carries nothing, as in the API server).
fn field<'v>(map: &'v Map<String, Value>, key: &str) -> Option<&'v Value> {
    map.get(key).filter(|v| !v.is_null())
}

fn string<'v>(v: &'v Value, path: &str) -> Result<&'v str> {
    v.as_str().ok_or_else(|| FieldError::new(path, "must be a string"))
}

fn integer(v: &Value, path: &str) -> Result<i64> {
    v.as_i64().ok_or_else(|| FieldError::new(path, format!("must be an integer (got {v})")))
}

fn list<'v>(v: &'v Value, path: &str, max: usize) -> Result<&'v [Value]> {
    let items = v.as_array().ok_or_else(|| FieldError::new(path, "must be a list"))?;
    if items.is_empty() {
        return Err(FieldError::new(path, "must have at least 1 item"));
    }
    if items.len() > max {
        return Err(FieldError::new(path, format!("must have at most {max} items (got {})", items.len())));
    }
    Ok(items)
}

/// Fails on a repeated item of a `listType=set` list, as the API server does.
fn no_duplicates(items: &[Value], path: &str) -> Result<()> {
    let mut seen = BTreeSet::new();
    for (i, item) in items.iter().enumerate() {
        if !seen.insert(item.to_string()) {
            return Err(FieldError::new(format!("{path}[{i}]"), format!("duplicate value {item}")));
        }
    }
    Ok(())
}

/// `"a", "b"`: field names for messages.
fn names(fields: &[&str]) -> String {
    fields.iter().map(|f| format!("{f:?}")).collect::<Vec<_>>().join(", ")
}

impl Reader {
    /// `v` as a mapping; its keys outside `known` are recorded as unknown.
    fn object<'v>(&mut self, v: &'v Value, path: &str, known: &[&str]) -> Result<&'v Map<String, Value>> {
        let Value::Object(map) = v else {
            return Err(FieldError::new(path, "must be a mapping"));
        };
        for (key, value) in map {
            if !value.is_null() && !known.contains(&key.as_str()) {
                self.unknown.push(join(path, key));
            }
        }
        Ok(map)
    }

    /// The one field of `fields` that `map` sets ("exactly one field must be set"); `None`
    /// when it sets none.
    fn one_of(map: &Map<String, Value>, path: &str, fields: &[&'static str]) -> Result<Option<&'static str>> {
        let set: Vec<&'static str> = fields.iter().copied().filter(|f| field(map, f).is_some()).collect();
        match set.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(one)),
            several => Err(FieldError::new(
                path,
                format!("must set exactly one of {} (got {})", names(fields), names(several)),
            )),
        }
    }

    /// [`Reader::one_of`] where a newer API may have added the field that is set: none of
    /// `fields` set is an error in a file, and `None` from the API server (its rule fails
    /// closed).
    fn known_one_of(
        &self,
        map: &Map<String, Value>,
        path: &str,
        fields: &[&'static str],
    ) -> Result<Option<&'static str>> {
        match Self::one_of(map, path, fields)? {
            None if self.mode == Mode::File => {
                Err(FieldError::new(path, format!("must set exactly one of {}", names(fields))))
            }
            which => Ok(which),
        }
    }

    fn policy(&mut self, v: &Value) -> Result<ClusterPolicy> {
        let top = self.object(v, "", &["apiVersion", "kind", "metadata", "spec", "status"])?;
        let api_version = top.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
        let kind = top.get("kind").and_then(Value::as_str).unwrap_or_default();
        let api = Api::of(api_version, kind).ok_or_else(|| match versions(kind) {
            Some(_) => FieldError::new("apiVersion", unknown_version(kind, api_version)),
            None => FieldError::new("kind", format!("{kind:?} is not a cluster policy kind")),
        })?;
        let name = self.metadata(field(top, "metadata"))?;
        if api == Api::Baseline && name != "default" {
            return Err(FieldError::new(
                "metadata.name",
                format!("must be \"default\" (got {name:?}): there is one BaselineAdminNetworkPolicy in a cluster"),
            ));
        }
        let spec_fields: &[&str] = match api {
            Api::ClusterV1beta1 | Api::ClusterV1alpha2 => &["tier", "priority", "subject", "ingress", "egress"],
            Api::Admin => &["priority", "subject", "ingress", "egress"],
            Api::Baseline => &["subject", "ingress", "egress"],
        };
        let spec = field(top, "spec").ok_or_else(|| FieldError::new("spec", "is required"))?;
        let spec = self.object(spec, "spec", spec_fields)?;
        let tier = match api {
            Api::Admin => Tier::Admin,
            Api::Baseline => Tier::Baseline,
            Api::ClusterV1beta1 | Api::ClusterV1alpha2 => {
                let v = field(spec, "tier").ok_or_else(|| FieldError::new("spec.tier", "is required"))?;
                match string(v, "spec.tier")? {
                    "Admin" => Tier::Admin,
                    "Baseline" => Tier::Baseline,
                    other => {
                        return Err(FieldError::new(
                            "spec.tier",
                            format!("unsupported value {other:?}: supported values are \"Admin\", \"Baseline\""),
                        ));
                    }
                }
            }
        };
        let priority = match api {
            Api::Baseline => 0,
            _ => {
                let v = field(spec, "priority").ok_or_else(|| FieldError::new("spec.priority", "is required"))?;
                let n = integer(v, "spec.priority")?;
                u16::try_from(n).ok().filter(|p| *p <= 1000).ok_or_else(|| {
                    FieldError::new("spec.priority", format!("must be between 0 and 1000, inclusive (got {n})"))
                })?
            }
        };
        let subject = field(spec, "subject").ok_or_else(|| FieldError::new("spec.subject", "is required"))?;
        let subject = self.subject(subject, "spec.subject", api)?;
        let ingress = self.rules(field(spec, "ingress"), "spec.ingress", api, Direction::Ingress)?;
        let egress = self.rules(field(spec, "egress"), "spec.egress", api, Direction::Egress)?;
        Ok(ClusterPolicy { id: ClusterPolicyId { kind: api.kind(), name }, tier, priority, subject, ingress, egress })
    }

    /// The object's name (required, a DNS subdomain); in [`Mode::File`] its other fields
    /// are checked against ObjectMeta's.
    fn metadata(&mut self, v: Option<&Value>) -> Result<String> {
        let v = v.ok_or_else(|| FieldError::new("metadata.name", "is required"))?;
        let meta: ObjectMeta = serde_path_to_error::deserialize(v)
            .map_err(|e| FieldError::new(format!("metadata.{}", e.path()), e.into_inner().to_string()))?;
        if let (Value::Object(sent), Ok(Value::Object(kept))) = (v, serde_json::to_value(&meta)) {
            for (key, value) in sent {
                if !value.is_null() && !kept.contains_key(key) {
                    self.unknown.push(format!("metadata.{key}"));
                }
            }
        }
        let name = meta.name.unwrap_or_default();
        convert::validate_dns_subdomain(&name, "metadata.name")?;
        Ok(name)
    }

    /// A label selector, converted by the one selector conversion there is.
    fn selector(&mut self, v: &Value, path: &str) -> Result<Selector> {
        let map = self.object(v, path, &["matchLabels", "matchExpressions"])?;
        if let Some(Value::Array(expressions)) = field(map, "matchExpressions") {
            for (i, e) in expressions.iter().enumerate() {
                self.object(e, &format!("{path}.matchExpressions[{i}]"), &["key", "operator", "values"])?;
            }
        }
        let typed: LabelSelector = serde_path_to_error::deserialize(v).map_err(|e| {
            let inner = e.path().to_string();
            let at = if inner == "." { path.to_string() } else { format!("{path}.{inner}") };
            FieldError::new(at, e.into_inner().to_string())
        })?;
        convert::selector(&typed, path)
    }

    /// `subject`: exactly one of `namespaces` and `pods`.
    fn subject(&mut self, v: &Value, path: &str, api: Api) -> Result<PodSet> {
        const FIELDS: &[&str] = &["namespaces", "pods"];
        let map = self.object(v, path, FIELDS)?;
        match Self::one_of(map, path, FIELDS)? {
            Some("namespaces") => self.namespaces(&map["namespaces"], &join(path, "namespaces")),
            Some(_) => self.namespaced_pods(&map["pods"], &join(path, "pods"), api),
            None => Err(FieldError::new(path, format!("must set exactly one of {}", names(FIELDS)))),
        }
    }

    /// `namespaces: selector`: every pod of the namespaces it selects.
    fn namespaces(&mut self, v: &Value, path: &str) -> Result<PodSet> {
        Ok(PodSet { namespaces: self.selector(v, path)?, pods: Selector::everything() })
    }

    /// `pods: {namespaceSelector, podSelector}`. `podSelector` is required; so is
    /// `namespaceSelector` in v1alpha1 (optional, "if empty, it selects all Namespaces",
    /// in ClusterNetworkPolicy).
    fn namespaced_pods(&mut self, v: &Value, path: &str, api: Api) -> Result<PodSet> {
        let map = self.object(v, path, &["namespaceSelector", "podSelector"])?;
        let namespaces = match field(map, "namespaceSelector") {
            Some(s) => self.selector(s, &join(path, "namespaceSelector"))?,
            None if api.is_cluster() => Selector::everything(),
            None => return Err(FieldError::new(join(path, "namespaceSelector"), "is required")),
        };
        let pods =
            field(map, "podSelector").ok_or_else(|| FieldError::new(join(path, "podSelector"), "is required"))?;
        let pods = self.selector(pods, &join(path, "podSelector"))?;
        Ok(PodSet { namespaces, pods })
    }

    fn rules(&mut self, v: Option<&Value>, path: &str, api: Api, direction: Direction) -> Result<Vec<ClusterRule>> {
        let Some(v) = v else { return Ok(Vec::new()) };
        let items = v.as_array().ok_or_else(|| FieldError::new(path, "must be a list"))?;
        if items.len() > api.max_items() {
            return Err(FieldError::new(
                path,
                format!("must have at most {} items (got {})", api.max_items(), items.len()),
            ));
        }
        items.iter().enumerate().map(|(i, r)| self.rule(r, &format!("{path}[{i}]"), api, direction)).collect()
    }

    fn rule(&mut self, v: &Value, path: &str, api: Api, direction: Direction) -> Result<ClusterRule> {
        let peer_key = match direction {
            Direction::Ingress => "from",
            Direction::Egress => "to",
        };
        // ClusterNetworkPolicy v1alpha2 lists ports as `protocols` since network-policy-api
        // v0.1.8 and as v1alpha1's `ports` (portNumber, namedPort, portRange) before: both
        // are v1alpha2 objects clusters hold, and a rule sets one of them.
        let ports_keys: &[&str] =
            if api == Api::ClusterV1alpha2 { &["protocols", "ports"] } else { &[api.ports_field()] };
        let mut known = vec!["name", "action", peer_key];
        known.extend_from_slice(ports_keys);
        let map = self.object(v, path, &known)?;
        let ports_key = match ports_keys.iter().copied().filter(|k| field(map, k).is_some()).collect::<Vec<_>>()[..] {
            [] => ports_keys[0],
            [one] => one,
            _ => return Err(FieldError::new(path, "must set at most one of \"protocols\", \"ports\"")),
        };

        // "Name is an identifier for this rule, that may be no more than 100 characters".
        let name = match field(map, "name") {
            None => None,
            Some(n) => {
                let n = string(n, &join(path, "name"))?;
                let length = n.chars().count();
                if length > 100 {
                    return Err(FieldError::new(
                        join(path, "name"),
                        format!("must be no more than 100 characters (got {length})"),
                    ));
                }
                Some(n.to_string()).filter(|n| !n.is_empty())
            }
        };

        let action_path = join(path, "action");
        let written =
            string(field(map, "action").ok_or_else(|| FieldError::new(&action_path, "is required"))?, &action_path)?;
        let action = api.actions().iter().find(|(w, _)| *w == written).map(|(_, a)| *a).ok_or_else(|| {
            let supported: Vec<&str> = api.actions().iter().map(|(w, _)| *w).collect();
            FieldError::new(
                &action_path,
                format!("unsupported value {written:?}: supported values are {}", names(&supported)),
            )
        })?;

        let peers_path = join(path, peer_key);
        let listed = list(
            field(map, peer_key).ok_or_else(|| FieldError::new(&peers_path, "is required"))?,
            &peers_path,
            api.max_items(),
        )?;
        let mut peers = Vec::with_capacity(listed.len());
        let mut unreadable: Vec<String> = Vec::new();
        for (i, p) in listed.iter().enumerate() {
            let peer_path = format!("{peers_path}[{i}]");
            match self.peer(p, &peer_path, api, direction)? {
                Some(peer) => peers.push((peer_path, peer)),
                None => unreadable.push(peer_path),
            }
        }

        let ports_path = join(path, ports_key);
        let mut ports: Option<Vec<PortSpec>> = None;
        let mut named: Option<String> = None;
        if let Some(listed) = field(map, ports_key) {
            let listed = list(listed, &ports_path, api.max_items())?;
            let mut specs = Vec::new();
            for (i, p) in listed.iter().enumerate() {
                let port_path = format!("{ports_path}[{i}]");
                let read =
                    if ports_key == "protocols" { self.protocol(p, &port_path)? } else { self.port(p, &port_path)? };
                match read {
                    Some((found, is_named)) => {
                        if is_named && named.is_none() {
                            named = Some(port_path);
                        }
                        specs.extend(found);
                    }
                    None => unreadable.push(port_path),
                }
            }
            ports = Some(specs);
        }

        // "DomainNames is only supported for Accept rules" (v1alpha1: "ALLOW rules").
        if action != Action::Accept
            && let Some((at, _)) = peers.iter().find(|(_, p)| matches!(p, ClusterPeer::DomainNames(_)))
        {
            let accept = api.actions()[0].0;
            return Err(FieldError::new(
                join(at, "domainNames"),
                format!("is only supported in {accept} rules (this rule's action is {written})"),
            ));
        }
        // The egress rule's CEL rule: a named port means a pod's container port, which
        // networks, nodes and domain names do not have.
        if let Some(at) = &named
            && let Some((peer_at, _)) = peers.iter().find(|(_, p)| {
                matches!(p, ClusterPeer::Networks(_) | ClusterPeer::Nodes(_) | ClusterPeer::DomainNames(_))
            })
        {
            return Err(FieldError::new(
                at.clone(),
                format!(
                    "a named port cannot be used with a networks, nodes or domainNames peer ({peer_at}): they have no named ports"
                ),
            ));
        }

        if let Some(first) = unreadable.first() {
            let why = format!(
                "{first} sets no field netpol knows (written for a newer API?): the rule fails closed, as the API asks"
            );
            return Ok(ClusterRule::failed_closed(name, action, why));
        }
        Ok(ClusterRule { name, action, peers: peers.into_iter().map(|(_, p)| p).collect(), ports, fail_closed: None })
    }

    /// One peer; `None` when it sets no field we know (only in [`Mode::ApiServer`]).
    fn peer(&mut self, v: &Value, path: &str, api: Api, direction: Direction) -> Result<Option<ClusterPeer>> {
        let fields = api.peer_fields(direction);
        let map = self.object(v, path, fields)?;
        let Some(which) = self.known_one_of(map, path, fields)? else {
            return Ok(None);
        };
        let at = join(path, which);
        let value = &map[which];
        Ok(Some(match which {
            "namespaces" if !api.is_cluster() && is_namespaced_peer(value) => {
                match self.namespaced_peer(value, &at)? {
                    Some(set) => ClusterPeer::Pods(set),
                    None => return Ok(None),
                }
            }
            "namespaces" => ClusterPeer::Pods(self.namespaces(value, &at)?),
            "pods" if !api.is_cluster() && value.get("namespaces").is_some() => {
                // v0.1.0's `pods: {namespaces: NamespacedPeer, podSelector}`.
                let map = self.object(value, &at, &["namespaces", "podSelector"])?;
                let Some(mut set) = self.namespaced_peer(&map["namespaces"], &join(&at, "namespaces"))? else {
                    return Ok(None);
                };
                let pods = field(map, "podSelector")
                    .ok_or_else(|| FieldError::new(join(&at, "podSelector"), "is required"))?;
                set.pods = self.selector(pods, &join(&at, "podSelector"))?;
                ClusterPeer::Pods(set)
            }
            "pods" => ClusterPeer::Pods(self.namespaced_pods(value, &at, api)?),
            "nodes" => ClusterPeer::Nodes(self.selector(value, &at)?),
            "networks" => {
                let items = list(value, &at, 25)?;
                no_duplicates(items, &at)?;
                let mut nets = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let item_at = format!("{at}[{i}]");
                    nets.push(cidr(string(item, &item_at)?, &item_at, api)?);
                }
                ClusterPeer::Networks(nets)
            }
            _ => {
                let items = list(value, &at, 25)?;
                no_duplicates(items, &at)?;
                let mut domains = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let item_at = format!("{at}[{i}]");
                    let text = string(item, &item_at)?;
                    validate::domain_pattern(text).map_err(|reason| FieldError::new(&item_at, reason))?;
                    domains.push(text.to_string());
                }
                ClusterPeer::DomainNames(domains)
            }
        }))
    }

    /// v1alpha1 as network-policy-api v0.1.0 shipped it: `namespaces: {namespaceSelector |
    /// sameLabels | notSameLabels}` (v0.1.1 made `namespaces` the selector itself). Every
    /// pod of the selected namespaces. `sameLabels` and `notSameLabels` relate the peer to
    /// each subject's own namespace, which netpol does not model: an error in a file, and in
    /// an object from the API server a peer we cannot read (`None`: its rule fails closed).
    fn namespaced_peer(&mut self, v: &Value, path: &str) -> Result<Option<PodSet>> {
        const FIELDS: &[&str] = &["namespaceSelector", "sameLabels", "notSameLabels"];
        let map = self.object(v, path, FIELDS)?;
        match Self::one_of(map, path, FIELDS)? {
            Some("namespaceSelector") => {
                let at = join(path, "namespaceSelector");
                Ok(Some(PodSet {
                    namespaces: self.selector(&map["namespaceSelector"], &at)?,
                    pods: Selector::everything(),
                }))
            }
            Some(other) if self.mode == Mode::File => Err(FieldError::new(
                join(path, other),
                "is not supported by netpol (network-policy-api v0.1.0; later versions dropped it)",
            )),
            Some(_) => Ok(None),
            None => Err(FieldError::new(path, format!("must set exactly one of {}", names(FIELDS)))),
        }
    }

    /// A ClusterNetworkPolicy `protocols` entry: the specs, and whether it is a named port;
    /// `None` when it sets no field we know (only in [`Mode::ApiServer`]).
    fn protocol(&mut self, v: &Value, path: &str) -> Result<Option<(Vec<PortSpec>, bool)>> {
        const FIELDS: &[&str] = &["tcp", "udp", "sctp", "destinationNamedPort"];
        let map = self.object(v, path, FIELDS)?;
        let Some(which) = self.known_one_of(map, path, FIELDS)? else {
            return Ok(None);
        };
        let at = join(path, which);
        let protocol = match which {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            "sctp" => Protocol::Sctp,
            _ => return Ok(Some((named_port(string(&map[which], &at)?, &at)?, true))),
        };
        let inner = self.object(&map[which], &at, &["destinationPort"])?;
        let port_at = join(&at, "destinationPort");
        let port = field(inner, "destinationPort").ok_or_else(|| FieldError::new(&port_at, "is required"))?;
        const PORT_FIELDS: &[&str] = &["number", "range"];
        let port_map = self.object(port, &port_at, PORT_FIELDS)?;
        let port = match Self::one_of(port_map, &port_at, PORT_FIELDS)? {
            Some("number") => {
                let n_at = join(&port_at, "number");
                let n = convert::port_number(integer(&port_map["number"], &n_at)?, &n_at)?;
                PortMatch::Range(n, n)
            }
            Some(_) => {
                let range_at = join(&port_at, "range");
                let (start, end) = self.range(&port_map["range"], &range_at, &["start", "end"])?;
                // v1beta1 and v1alpha2: "self.start < self.end".
                if start >= end {
                    return Err(FieldError::new(range_at, format!("start ({start}) must be less than end ({end})")));
                }
                PortMatch::Range(start, end)
            }
            None => return Err(FieldError::new(&port_at, format!("must set exactly one of {}", names(PORT_FIELDS)))),
        };
        Ok(Some((vec![PortSpec { protocol, port }], false)))
    }

    /// `start` and `end` of a port range (both required, 1-65535).
    fn range(&mut self, v: &Value, path: &str, known: &[&str]) -> Result<(u16, u16)> {
        let map = self.object(v, path, known)?;
        let bound = |key: &str| -> Result<u16> {
            let at = join(path, key);
            let v = field(map, key).ok_or_else(|| FieldError::new(&at, "is required"))?;
            convert::port_number(integer(v, &at)?, &at)
        };
        Ok((bound("start")?, bound("end")?))
    }

    /// A v1alpha1 `ports` entry: exactly one of `portNumber`, `namedPort`, `portRange`.
    fn port(&mut self, v: &Value, path: &str) -> Result<Option<(Vec<PortSpec>, bool)>> {
        const FIELDS: &[&str] = &["portNumber", "namedPort", "portRange"];
        let map = self.object(v, path, FIELDS)?;
        let Some(which) = self.known_one_of(map, path, FIELDS)? else {
            return Ok(None);
        };
        let at = join(path, which);
        let value = &map[which];
        // `protocol` "defaults to TCP" (the CRD's default).
        let protocol = |map: &Map<String, Value>| -> Result<Protocol> {
            let p_at = join(&at, "protocol");
            let text = field(map, "protocol").map(|p| string(p, &p_at)).transpose()?;
            convert::protocol(text, &p_at)
        };
        let spec = match which {
            "namedPort" => return Ok(Some((named_port(string(value, &at)?, &at)?, true))),
            "portNumber" => {
                let map = self.object(value, &at, &["protocol", "port"])?;
                let p_at = join(&at, "port");
                let n = field(map, "port").ok_or_else(|| FieldError::new(&p_at, "is required"))?;
                let n = convert::port_number(integer(n, &p_at)?, &p_at)?;
                PortSpec { protocol: protocol(map)?, port: PortMatch::Range(n, n) }
            }
            _ => {
                let (start, end) = self.range(value, &at, &["protocol", "start", "end"])?;
                // The v1alpha1 CRD has no rule between the bounds; a range that ends before
                // it starts holds no port and is refused here.
                if start > end {
                    return Err(FieldError::new(
                        at,
                        format!("end ({end}) must be greater than or equal to start ({start})"),
                    ));
                }
                let map = value.as_object().expect("checked by range");
                PortSpec { protocol: protocol(map)?, port: PortMatch::Range(start, end) }
            }
        };
        Ok(Some((vec![spec], false)))
    }
}

/// A named port, which carries no protocol of its own: one spec per protocol.
fn named_port(name: &str, path: &str) -> Result<Vec<PortSpec>> {
    convert::validate_port_name(name, path)?;
    Ok(Protocol::ALL.iter().map(|&protocol| PortSpec { protocol, port: PortMatch::Named(name.to_string()) }).collect())
}

/// A `networks` entry, as each version's CRD checks it (at most 43 characters).
fn cidr(text: &str, path: &str, api: Api) -> Result<IpNet> {
    if text.len() > 43 {
        return Err(FieldError::new(path, format!("must be no more than 43 characters (got {})", text.len())));
    }
    match api {
        // "isCIDR(self) && cidr(self) == cidr(self).masked()"
        Api::ClusterV1beta1 => {
            let net = convert::parse_cidr(text, path)?;
            let written: IpNet = text.parse().expect("parsed by parse_cidr");
            if written != net {
                return Err(FieldError::new(path, format!("{text:?} has host bits set: write {net}")));
            }
            Ok(net)
        }
        // "isCIDR(self)": host bits allowed (and masked here).
        Api::ClusterV1alpha2 => convert::parse_cidr(text, path),
        // "self.contains(':') != self.contains('.')", then net.ParseCIDR.
        Api::Admin | Api::Baseline => {
            if text.contains(':') == text.contains('.') {
                return Err(FieldError::new(
                    path,
                    format!(
                        "{text:?} must be either an IPv4 or an IPv6 CIDR (IPv4 addresses embedded in IPv6 are not supported)"
                    ),
                ));
            }
            convert::parse_cidr(text, path)
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const V1BETA1: &str = "policy.networking.k8s.io/v1beta1";
    const V1ALPHA2: &str = "policy.networking.k8s.io/v1alpha2";
    const V1ALPHA1: &str = "policy.networking.k8s.io/v1alpha1";

    /// An object of `kind` in `api_version`, named `name`, with `spec`.
    fn object(api_version: &str, kind: &str, name: &str, spec: Value) -> Value {
        json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": name}, "spec": spec})
    }

    /// A v1beta1 Admin-tier ClusterNetworkPolicy `p` (priority 10, every namespace) with
    /// these egress rules.
    fn cnp_egress(rules: Value) -> Value {
        object(
            V1BETA1,
            "ClusterNetworkPolicy",
            "p",
            json!({"tier": "Admin", "priority": 10, "subject": {"namespaces": {}}, "egress": rules}),
        )
    }

    /// One v1beta1 egress rule with `action`, peers `to` and, if not null, `protocols`.
    fn egress_rule(action: &str, to: Value, protocols: Value) -> Value {
        let mut rule = json!({"action": action, "to": to});
        if !protocols.is_null() {
            rule["protocols"] = protocols;
        }
        rule
    }

    /// An AdminNetworkPolicy `a` (priority 5) with these egress rules.
    fn anp_egress(rules: Value) -> Value {
        object(
            V1ALPHA1,
            "AdminNetworkPolicy",
            "a",
            json!({"priority": 5, "subject": {"namespaces": {}}, "egress": rules}),
        )
    }

    fn banp(name: &str, spec: Value) -> Value {
        object(V1ALPHA1, "BaselineAdminNetworkPolicy", name, spec)
    }

    fn file(v: &Value) -> ClusterPolicy {
        cluster_policy(v, Mode::File).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The error a file gets, as `path: reason`.
    fn error(v: &Value) -> String {
        cluster_policy(v, Mode::File).expect_err("invalid").to_string()
    }

    fn api_server(v: &Value) -> ClusterPolicy {
        cluster_policy(v, Mode::ApiServer).unwrap_or_else(|e| panic!("{e}"))
    }

    fn labelled(key: &str, value: &str) -> Selector {
        let s: LabelSelector = serde_json::from_value(json!({"matchLabels": {key: value}})).unwrap();
        convert::selector(&s, "").unwrap()
    }

    fn tcp(port: u16) -> PortSpec {
        PortSpec { protocol: Protocol::Tcp, port: PortMatch::Range(port, port) }
    }

    fn named(name: &str) -> Vec<PortSpec> {
        Protocol::ALL.iter().map(|&protocol| PortSpec { protocol, port: PortMatch::Named(name.into()) }).collect()
    }

    #[test]
    fn a_v1beta1_cluster_network_policy_converts_every_peer_and_protocol_kind() {
        let v = object(
            V1BETA1,
            "ClusterNetworkPolicy",
            "tenants",
            json!({
                "tier": "Baseline",
                "priority": 7,
                "subject": {"pods": {"namespaceSelector": {"matchLabels": {"team": "a"}}, "podSelector": {}}},
                "ingress": [{
                    "name": "from-monitoring",
                    "action": "Accept",
                    "from": [{"namespaces": {"matchLabels": {"role": "monitoring"}}}],
                    "protocols": [{"tcp": {"destinationPort": {"number": 9090}}}, {"destinationNamedPort": "metrics"}],
                }],
                "egress": [
                    {"action": "Deny", "to": [{"networks": ["10.0.0.0/8", "fd00::/64"]}, {"nodes": {"matchLabels": {"zone": "x"}}}],
                     "protocols": [{"udp": {"destinationPort": {"range": {"start": 53, "end": 54}}}}]},
                    {"action": "Accept", "to": [{"domainNames": ["*.example.com", "example.org."]}]},
                ],
            }),
        );
        let p = file(&v);
        assert_eq!(p.id, ClusterPolicyId { kind: ClusterPolicyKind::ClusterNetworkPolicy, name: "tenants".into() });
        assert_eq!((p.tier, p.priority), (Tier::Baseline, 7));
        assert_eq!(p.subject, PodSet { namespaces: labelled("team", "a"), pods: Selector::everything() });
        let ingress = &p.ingress[0];
        assert_eq!(ingress.name.as_deref(), Some("from-monitoring"));
        assert_eq!(
            ingress.peers,
            [ClusterPeer::Pods(PodSet { namespaces: labelled("role", "monitoring"), pods: Selector::everything() })]
        );
        let mut ports = vec![tcp(9090)];
        ports.extend(named("metrics"));
        assert_eq!(ingress.ports.as_deref(), Some(ports.as_slice()), "a named port stands for TCP, UDP and SCTP");
        let deny = &p.egress[0];
        assert_eq!(deny.action, Action::Deny);
        assert_eq!(
            deny.peers,
            [
                ClusterPeer::Networks(vec!["10.0.0.0/8".parse().unwrap(), "fd00::/64".parse().unwrap()]),
                ClusterPeer::Nodes(labelled("zone", "x")),
            ]
        );
        assert_eq!(deny.ports, Some(vec![PortSpec { protocol: Protocol::Udp, port: PortMatch::Range(53, 54) }]));
        assert_eq!(p.egress[1].peers, [ClusterPeer::DomainNames(vec!["*.example.com".into(), "example.org.".into()])]);
        assert_eq!(p.egress[1].ports, None, "no protocols: all traffic");
        assert!(p.ingress.iter().chain(&p.egress).all(|r| r.fail_closed.is_none()));
    }

    #[test]
    fn a_v1alpha2_cluster_network_policy_converts_and_masks_host_bits_that_v1beta1_refuses() {
        let rules = json!([egress_rule("Pass", json!([{"networks": ["10.1.2.3/16"]}]), Value::Null)]);
        let mut v = cnp_egress(rules);
        assert_eq!(error(&v), "spec.egress[0].to[0].networks[0]: \"10.1.2.3/16\" has host bits set: write 10.1.0.0/16");
        v["apiVersion"] = json!(V1ALPHA2);
        let p = file(&v);
        assert_eq!(p.egress[0].peers, [ClusterPeer::Networks(vec!["10.1.0.0/16".parse().unwrap()])]);
        assert_eq!(p.egress[0].action, Action::Pass);
    }

    #[test]
    fn an_admin_network_policy_is_the_admin_tier_and_its_allow_is_accept() {
        let v = anp_egress(json!([{
            "name": "dns",
            "action": "Allow",
            "to": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "dns"}}}}],
            "ports": [
                {"portNumber": {"port": 53}},
                {"portNumber": {"protocol": "UDP", "port": 53}},
                {"portRange": {"protocol": "SCTP", "start": 100, "end": 100}},
                {"namedPort": "dns"},
            ],
        }]));
        let p = file(&v);
        assert_eq!(p.id.kind, ClusterPolicyKind::AdminNetworkPolicy);
        assert_eq!((p.tier, p.priority), (Tier::Admin, 5));
        let rule = &p.egress[0];
        assert_eq!(rule.action, Action::Accept);
        assert_eq!(
            rule.peers,
            [ClusterPeer::Pods(PodSet { namespaces: Selector::everything(), pods: labelled("app", "dns") })]
        );
        let mut ports = vec![
            tcp(53),
            PortSpec { protocol: Protocol::Udp, port: PortMatch::Range(53, 53) },
            PortSpec { protocol: Protocol::Sctp, port: PortMatch::Range(100, 100) },
        ];
        ports.extend(named("dns"));
        assert_eq!(rule.ports, Some(ports), "protocol defaults to TCP; a one-port range is valid in v1alpha1");
    }

    #[test]
    fn a_baseline_admin_network_policy_is_the_baseline_tier_named_default_without_pass() {
        let spec =
            json!({"subject": {"namespaces": {}}, "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]});
        let p = file(&banp("default", spec.clone()));
        assert_eq!((p.id.kind, p.tier, p.priority), (ClusterPolicyKind::BaselineAdminNetworkPolicy, Tier::Baseline, 0));
        assert_eq!(p.ingress[0].action, Action::Deny);
        assert_eq!(
            error(&banp("other", spec)),
            "metadata.name: must be \"default\" (got \"other\"): there is one BaselineAdminNetworkPolicy in a cluster"
        );
        let pass = json!({"subject": {"namespaces": {}}, "egress": [{"action": "Pass", "to": [{"namespaces": {}}]}]});
        assert_eq!(
            error(&banp("default", pass)),
            "spec.egress[0].action: unsupported value \"Pass\": supported values are \"Allow\", \"Deny\""
        );
    }

    #[test]
    fn a_subject_sets_exactly_one_field() {
        let with_subject = |subject: Value| {
            object(V1BETA1, "ClusterNetworkPolicy", "p", json!({"tier": "Admin", "priority": 1, "subject": subject}))
        };
        assert_eq!(error(&with_subject(json!({}))), "spec.subject: must set exactly one of \"namespaces\", \"pods\"");
        assert_eq!(
            error(&with_subject(json!({"namespaces": {}, "pods": {"podSelector": {}}}))),
            "spec.subject: must set exactly one of \"namespaces\", \"pods\" (got \"namespaces\", \"pods\")"
        );
        assert_eq!(
            error(&with_subject(json!({"pods": {"namespaceSelector": {}}}))),
            "spec.subject.pods.podSelector: is required"
        );
        assert_eq!(
            error(&object(V1BETA1, "ClusterNetworkPolicy", "p", json!({"tier": "Admin", "priority": 1}))),
            "spec.subject: is required"
        );
        let anp = object(
            V1ALPHA1,
            "AdminNetworkPolicy",
            "a",
            json!({"priority": 1, "subject": {"pods": {"podSelector": {}}}}),
        );
        assert_eq!(error(&anp), "spec.subject.pods.namespaceSelector: is required", "required in v1alpha1");
    }

    #[test]
    fn a_peer_sets_exactly_one_field_and_a_file_may_not_leave_it_empty() {
        assert_eq!(
            error(&cnp_egress(json!([egress_rule("Deny", json!([{}]), Value::Null)]))),
            "spec.egress[0].to[0]: must set exactly one of \"namespaces\", \"pods\", \"nodes\", \"networks\", \"domainNames\""
        );
        assert_eq!(
            error(&cnp_egress(json!([egress_rule(
                "Deny",
                json!([{"namespaces": {}, "networks": ["10.0.0.0/8"]}]),
                Value::Null
            )]))),
            "spec.egress[0].to[0]: must set exactly one of \"namespaces\", \"pods\", \"nodes\", \"networks\", \"domainNames\" (got \"namespaces\", \"networks\")"
        );
    }

    #[test]
    fn a_protocol_and_a_destination_port_set_exactly_one_field() {
        let with =
            |protocols: Value| error(&cnp_egress(json!([egress_rule("Deny", json!([{"namespaces": {}}]), protocols)])));
        assert_eq!(
            with(json!([{"tcp": {"destinationPort": {"number": 1}}, "udp": {"destinationPort": {"number": 1}}}])),
            "spec.egress[0].protocols[0]: must set exactly one of \"tcp\", \"udp\", \"sctp\", \"destinationNamedPort\" (got \"tcp\", \"udp\")"
        );
        assert_eq!(with(json!([{"tcp": {}}])), "spec.egress[0].protocols[0].tcp.destinationPort: is required");
        assert_eq!(
            with(json!([{"tcp": {"destinationPort": {"number": 80, "range": {"start": 1, "end": 2}}}}])),
            "spec.egress[0].protocols[0].tcp.destinationPort: must set exactly one of \"number\", \"range\" (got \"number\", \"range\")"
        );
        assert_eq!(
            error(&anp_egress(json!([{"action": "Deny", "to": [{"namespaces": {}}], "ports": [{}]}]))),
            "spec.egress[0].ports[0]: must set exactly one of \"portNumber\", \"namedPort\", \"portRange\""
        );
    }

    #[test]
    fn lists_have_the_crds_minimum_and_maximum_lengths() {
        let peer = json!({"namespaces": {}});
        assert_eq!(
            error(&cnp_egress(json!([egress_rule("Deny", json!([]), Value::Null)]))),
            "spec.egress[0].to: must have at least 1 item"
        );
        assert_eq!(error(&cnp_egress(json!([{"action": "Deny"}]))), "spec.egress[0].to: is required");
        assert_eq!(
            error(&cnp_egress(json!([egress_rule("Deny", json!([peer]), json!([]))]))),
            "spec.egress[0].protocols: must have at least 1 item"
        );
        assert_eq!(
            error(&cnp_egress(json!([egress_rule("Deny", Value::Array(vec![peer.clone(); 26]), Value::Null)]))),
            "spec.egress[0].to: must have at most 25 items (got 26)"
        );
        let rule = egress_rule("Deny", json!([peer]), Value::Null);
        assert_eq!(
            error(&cnp_egress(Value::Array(vec![rule.clone(); 26]))),
            "spec.egress: must have at most 25 items (got 26)"
        );
        assert!(
            cluster_policy(&anp_egress(Value::Array(vec![rule.clone(); 100])), Mode::File).is_ok(),
            "100 in v1alpha1"
        );
        assert_eq!(
            error(&anp_egress(Value::Array(vec![rule; 101]))),
            "spec.egress: must have at most 100 items (got 101)"
        );
        let networks: Vec<String> = (0..26).map(|i| format!("10.{i}.0.0/16")).collect();
        assert_eq!(
            error(&cnp_egress(json!([egress_rule("Deny", json!([{"networks": networks}]), Value::Null)]))),
            "spec.egress[0].to[0].networks: must have at most 25 items (got 26)"
        );
        assert_eq!(
            error(&cnp_egress(json!([egress_rule("Deny", json!([{"domainNames": []}]), Value::Null)]))),
            "spec.egress[0].to[0].domainNames: must have at least 1 item"
        );
    }

    #[test]
    fn a_set_list_refuses_a_repeated_value() {
        assert_eq!(
            error(&cnp_egress(json!([egress_rule(
                "Deny",
                json!([{"networks": ["10.0.0.0/8", "10.0.0.0/8"]}]),
                Value::Null
            )]))),
            "spec.egress[0].to[0].networks[1]: duplicate value \"10.0.0.0/8\""
        );
    }

    #[test]
    fn priority_tier_and_action_take_only_their_values() {
        let with = |tier: Value, priority: Value| {
            object(
                V1BETA1,
                "ClusterNetworkPolicy",
                "p",
                json!({"tier": tier, "priority": priority, "subject": {"namespaces": {}}}),
            )
        };
        assert_eq!(file(&with(json!("Admin"), json!(0))).priority, 0);
        assert_eq!(file(&with(json!("Admin"), json!(1000))).priority, 1000);
        assert_eq!(
            error(&with(json!("Admin"), json!(1001))),
            "spec.priority: must be between 0 and 1000, inclusive (got 1001)"
        );
        assert_eq!(
            error(&with(json!("Admin"), json!(-1))),
            "spec.priority: must be between 0 and 1000, inclusive (got -1)"
        );
        assert_eq!(error(&with(json!("Admin"), json!("high"))), "spec.priority: must be an integer (got \"high\")");
        assert_eq!(
            error(&with(json!("Developer"), json!(1))),
            "spec.tier: unsupported value \"Developer\": supported values are \"Admin\", \"Baseline\""
        );
        assert_eq!(
            error(&cnp_egress(json!([egress_rule("Allow", json!([{"namespaces": {}}]), Value::Null)]))),
            "spec.egress[0].action: unsupported value \"Allow\": supported values are \"Accept\", \"Deny\", \"Pass\""
        );
    }

    #[test]
    fn ports_are_1_to_65535_and_ranges_are_ordered_as_each_version_says() {
        let with = |port: Value| {
            error(&cnp_egress(json!([egress_rule(
                "Deny",
                json!([{"namespaces": {}}]),
                json!([{"tcp": {"destinationPort": port}}])
            )])))
        };
        assert_eq!(
            with(json!({"number": 0})),
            "spec.egress[0].protocols[0].tcp.destinationPort.number: must be between 1 and 65535, inclusive (got 0)"
        );
        assert_eq!(
            with(json!({"range": {"start": 1, "end": 65536}})),
            "spec.egress[0].protocols[0].tcp.destinationPort.range.end: must be between 1 and 65535, inclusive (got 65536)"
        );
        assert_eq!(
            with(json!({"range": {"start": 80, "end": 80}})),
            "spec.egress[0].protocols[0].tcp.destinationPort.range: start (80) must be less than end (80)"
        );
        assert_eq!(
            error(&anp_egress(
                json!([{"action": "Deny", "to": [{"namespaces": {}}], "ports": [{"portRange": {"start": 81, "end": 80}}]}])
            )),
            "spec.egress[0].ports[0].portRange: end (80) must be greater than or equal to start (81)"
        );
        assert_eq!(
            error(&anp_egress(
                json!([{"action": "Deny", "to": [{"namespaces": {}}], "ports": [{"portNumber": {"port": 70000}}]}])
            )),
            "spec.egress[0].ports[0].portNumber.port: must be between 1 and 65535, inclusive (got 70000)"
        );
        assert_eq!(
            error(&anp_egress(
                json!([{"action": "Deny", "to": [{"namespaces": {}}], "ports": [{"portNumber": {"protocol": "ICMP", "port": 1}}]}])
            )),
            "spec.egress[0].ports[0].portNumber.protocol: unsupported value \"ICMP\": supported values are \"TCP\", \"UDP\", \"SCTP\""
        );
        assert_eq!(
            error(&cnp_egress(json!([egress_rule(
                "Deny",
                json!([{"namespaces": {}}]),
                json!([{"destinationNamedPort": "HTTP"}])
            )]))),
            "spec.egress[0].protocols[0].destinationNamedPort: invalid port name \"HTTP\": must be 1-15 lower case letters, digits or '-', with at least one letter and no leading, trailing or double '-'"
        );
    }

    #[test]
    fn networks_are_cidrs_of_at_most_43_characters_and_v1alpha1_refuses_embedded_ipv4() {
        let cnp =
            |net: &str| error(&cnp_egress(json!([egress_rule("Deny", json!([{"networks": [net]}]), Value::Null)])));
        assert_eq!(
            cnp("10.0.0.0/33"),
            "spec.egress[0].to[0].networks[0]: \"10.0.0.0/33\" is not a valid CIDR (expected e.g. 10.0.0.0/16 or fd00::/64)"
        );
        let long = format!("{}/128", "0000:".repeat(7) + "0000:0");
        assert_eq!(
            cnp(&long),
            format!("spec.egress[0].to[0].networks[0]: must be no more than 43 characters (got {})", long.len())
        );
        let anp = error(&anp_egress(json!([{"action": "Deny", "to": [{"networks": ["::ffff:10.0.0.0/104"]}]}])));
        assert_eq!(
            anp,
            "spec.egress[0].to[0].networks[0]: \"::ffff:10.0.0.0/104\" must be either an IPv4 or an IPv6 CIDR (IPv4 addresses embedded in IPv6 are not supported)"
        );
        let masked = file(&anp_egress(json!([{"action": "Deny", "to": [{"networks": ["10.0.0.7/8"]}]}])));
        assert_eq!(
            masked.egress[0].peers,
            [ClusterPeer::Networks(vec!["10.0.0.0/8".parse().unwrap()])],
            "net.ParseCIDR masks"
        );
    }

    #[test]
    fn domain_names_follow_the_crd_pattern_and_only_accept_rules_take_them() {
        let with = |action: &str, name: &str| {
            error(&cnp_egress(json!([egress_rule(action, json!([{"domainNames": [name]}]), Value::Null)])))
        };
        for bad in ["localhost", "a.*.example.com", "-a.example.com", "a..b", "*.", "exa mple.com"] {
            assert_eq!(
                with("Accept", bad),
                format!(
                    "spec.egress[0].to[0].domainNames[0]: {bad:?} is not a valid domain name: must be two or more dot-separated labels of letters, digits, '-' or '_' (each starting and ending with a letter or digit), optionally with a trailing '.' or a leading '*.'"
                )
            );
        }
        assert_eq!(
            with("Deny", "example.com"),
            "spec.egress[0].to[0].domainNames: is only supported in Accept rules (this rule's action is Deny)"
        );
        assert_eq!(
            error(&anp_egress(json!([{"action": "Pass", "to": [{"domainNames": ["example.com"]}]}]))),
            "spec.egress[0].to[0].domainNames: is only supported in Allow rules (this rule's action is Pass)"
        );
    }

    #[test]
    fn a_named_port_cannot_go_with_networks_nodes_or_domain_names() {
        assert_eq!(
            error(&cnp_egress(json!([egress_rule(
                "Accept",
                json!([{"namespaces": {}}, {"nodes": {}}]),
                json!([{"tcp": {"destinationPort": {"number": 1}}}, {"destinationNamedPort": "http"}])
            )]))),
            "spec.egress[0].protocols[1]: a named port cannot be used with a networks, nodes or domainNames peer (spec.egress[0].to[1]): they have no named ports"
        );
        let banp_named = banp(
            "default",
            json!({"subject": {"namespaces": {}}, "egress": [{"action": "Allow", "to": [{"networks": ["10.0.0.0/8"]}], "ports": [{"namedPort": "http"}]}]}),
        );
        assert_eq!(
            error(&banp_named),
            "spec.egress[0].ports[0]: a named port cannot be used with a networks, nodes or domainNames peer (spec.egress[0].to[0]): they have no named ports"
        );
        let pods_only = cnp_egress(json!([egress_rule(
            "Accept",
            json!([{"namespaces": {}}]),
            json!([{"destinationNamedPort": "http"}])
        )]));
        assert_eq!(file(&pods_only).egress[0].ports, Some(named("http")));
    }

    #[test]
    fn a_rule_name_is_at_most_100_characters() {
        let rule = |name: String| json!([{"name": name, "action": "Deny", "to": [{"namespaces": {}}]}]);
        assert_eq!(file(&cnp_egress(rule("n".repeat(100)))).egress[0].name.as_deref().map(str::len), Some(100));
        assert_eq!(
            error(&cnp_egress(rule("n".repeat(101)))),
            "spec.egress[0].name: must be no more than 100 characters (got 101)"
        );
        assert_eq!(
            error(&anp_egress(rule("é".repeat(101)))),
            "spec.egress[0].name: must be no more than 100 characters (got 101)"
        );
        assert_eq!(file(&anp_egress(rule(String::new()))).egress[0].name, None, "an empty name is no name");
    }

    #[test]
    fn selectors_and_names_are_checked_by_the_shared_rules() {
        let v =
            cnp_egress(json!([egress_rule("Deny", json!([{"nodes": {"matchLabels": {"-bad": "x"}}}]), Value::Null)]));
        let expected = convert::validate_label_key("-bad", "spec.egress[0].to[0].nodes.matchLabels").unwrap_err();
        assert_eq!(error(&v), expected.to_string());
        let mut v = cnp_egress(json!([]));
        v["metadata"]["name"] = json!("Not_A_Name");
        assert!(error(&v).starts_with("metadata.name: \"Not_A_Name\" is not a valid name"), "{}", error(&v));
        let v = cnp_egress(json!([egress_rule(
            "Deny",
            json!([{"namespaces": {"matchExpressions": [{"key": "a", "operator": "In", "values": []}]}}]),
            Value::Null
        )]));
        assert_eq!(
            error(&v),
            "spec.egress[0].to[0].namespaces.matchExpressions[0].values: must be specified when `operator` is \"In\""
        );
    }

    #[test]
    fn an_unknown_field_of_a_file_is_an_error_with_its_path() {
        let mut v = cnp_egress(json!([{"action": "Deny", "to": [{"namespaces": {}}], "port": [{"tcp": {}}]}]));
        assert_eq!(error(&v), "spec.egress[0].port: unknown field");
        v["spec"]["egress"][0] = json!({"action": "Deny", "to": [{"namespaces": {}, "namespace": {}}]});
        assert_eq!(error(&v), "spec.egress[0].to[0].namespace: unknown field");
        v["spec"]["egress"] = json!([]);
        v["metadata"]["labelz"] = json!({});
        assert_eq!(error(&v), "metadata.labelz: unknown field");
        // An ingress peer has no `networks`; an AdminNetworkPolicy no `protocols`.
        let ingress = object(
            V1BETA1,
            "ClusterNetworkPolicy",
            "p",
            json!({"tier": "Admin", "priority": 1, "subject": {"namespaces": {}}, "ingress": [{"action": "Deny", "from": [{"networks": ["10.0.0.0/8"]}]}]}),
        );
        assert_eq!(error(&ingress), "spec.ingress[0].from[0].networks: unknown field");
        let (_, unknown) = cluster_policy_checked(
            &anp_egress(json!([{"action": "Deny", "to": [{"namespaces": {}}], "protocols": []}])),
            Mode::File,
        );
        assert_eq!(unknown, ["spec.egress[0].protocols"]);
    }

    #[test]
    fn a_peer_of_a_newer_api_fails_its_rule_closed_by_the_apis_own_rule() {
        let rules = json!([
            egress_rule("Accept", json!([{"namespaces": {}}, {"services": {"name": "x"}}]), json!([{"tcp": {"destinationPort": {"number": 80}}}])),
            egress_rule("Deny", json!([{"namespaces": {}}, {"services": {"name": "x"}}]), json!([{"tcp": {"destinationPort": {"number": 80}}}])),
            {"name": "p", "action": "Pass", "to": [{}]},
        ]);
        let p = api_server(&cnp_egress(rules.clone()));
        let why = "spec.egress[0].to[1] sets no field netpol knows (written for a newer API?): the rule fails closed, as the API asks";
        assert_eq!(
            p.egress[0],
            ClusterRule::failed_closed(None, Action::Accept, why.into()),
            "Accept: matches nothing"
        );
        assert!(p.egress[0].peers.is_empty());
        let deny_why = why.replace("egress[0]", "egress[1]");
        assert_eq!(p.egress[1], ClusterRule::failed_closed(None, Action::Deny, deny_why), "Deny: denies everything");
        assert_eq!(p.egress[1].peers, [ClusterPeer::Everything]);
        assert_eq!(p.egress[2].action, Action::Deny, "Pass fails closed as a Deny-all rule");
        assert_eq!(p.egress[2].peers, [ClusterPeer::Everything]);
        assert_eq!(p.egress[2].name.as_deref(), Some("p"));
        // A file holding the same object is refused instead.
        assert_eq!(error(&cnp_egress(rules)), "spec.egress[0].to[1].services: unknown field");
    }

    #[test]
    fn an_api_server_object_ignores_unknown_fields_beside_known_ones_and_fails_closed_on_an_unknown_protocol() {
        let p = api_server(&cnp_egress(json!([
            {"action": "Deny", "to": [{"namespaces": {}, "futurePeer": {}}], "futureField": 1},
            egress_rule("Deny", json!([{"namespaces": {}}]), json!([{"icmp": {}}])),
        ])));
        assert_eq!(p.egress[0].fail_closed, None);
        assert_eq!(
            p.egress[0].peers,
            [ClusterPeer::Pods(PodSet { namespaces: Selector::everything(), pods: Selector::everything() })]
        );
        assert_eq!(p.egress[1].peers, [ClusterPeer::Everything]);
        assert!(
            p.egress[1]
                .fail_closed
                .as_deref()
                .unwrap()
                .starts_with("spec.egress[0].protocols[0] sets no field".replace("[0].p", "[1].p").as_str())
        );
        let anp = api_server(&anp_egress(
            json!([{"action": "Allow", "to": [{"namespaces": {}}], "ports": [{"futurePort": 1}]}]),
        ));
        assert_eq!(
            anp.egress[0],
            ClusterRule::failed_closed(None, Action::Accept, anp.egress[0].fail_closed.clone().unwrap())
        );
    }

    #[test]
    fn an_unknown_api_version_names_the_versions_netpol_reads() {
        let mut v = cnp_egress(json!([]));
        v["apiVersion"] = json!("policy.networking.k8s.io/v1");
        assert_eq!(
            error(&v),
            "apiVersion: no matches for kind \"ClusterNetworkPolicy\" in version \"policy.networking.k8s.io/v1\" (netpol reads ClusterNetworkPolicy in policy.networking.k8s.io/v1beta1, policy.networking.k8s.io/v1alpha2)"
        );
    }

    #[test]
    fn a_node_keeps_its_labels_and_the_ips_of_its_internal_and_external_addresses() {
        let v = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "worker-1", "labels": {"zone": "x"}},
            "status": {"addresses": [
                {"type": "Hostname", "address": "worker-1"},
                {"type": "InternalIP", "address": "192.168.1.10"},
                {"type": "InternalIP", "address": "fd00::10"},
                {"type": "ExternalIP", "address": "203.0.113.10"},
                {"type": "ExternalIP", "address": "192.168.1.10"},
                {"type": "InternalDNS", "address": "10.9.9.9"},
                {"type": "ExternalIP", "address": "not-an-ip"},
            ]},
        });
        let n = node(&v).unwrap();
        assert_eq!(n.name, "worker-1");
        assert_eq!(n.labels.get("zone").map(String::as_str), Some("x"));
        let ips: Vec<IpAddr> =
            ["192.168.1.10", "fd00::10", "203.0.113.10"].iter().map(|s| s.parse().unwrap()).collect();
        assert_eq!(n.ips, ips);
        let typed: core::Node = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(internal_ips(&typed), ips[..2]);
        let bad = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n", "labels": {"zone": "-x"}}});
        assert!(node(&bad).unwrap_err().to_string().starts_with("metadata.labels[zone]: invalid label value"));
    }

    #[test]
    fn a_v1alpha2_rule_reads_ports_as_earlier_releases_wrote_them_or_protocols_but_not_both() {
        let with = |rule: Value| {
            object(
                V1ALPHA2,
                "ClusterNetworkPolicy",
                "p",
                json!({"tier": "Admin", "priority": 1, "subject": {"namespaces": {}}, "egress": [rule]}),
            )
        };
        let to = json!([{"namespaces": {}}]);
        let ports = json!([{"portNumber": {"protocol": "TCP", "port": 80}}]);
        let protocols = json!([{"tcp": {"destinationPort": {"number": 80}}}]);
        let by_ports = file(&with(json!({"action": "Deny", "to": to, "ports": ports})));
        let by_protocols = file(&with(json!({"action": "Deny", "to": to, "protocols": protocols})));
        assert_eq!(by_ports.egress[0].ports, Some(vec![tcp(80)]));
        assert_eq!(by_ports, by_protocols);
        assert_eq!(
            error(&with(json!({"action": "Deny", "to": to, "ports": ports, "protocols": protocols}))),
            "spec.egress[0]: must set at most one of \"protocols\", \"ports\""
        );
        // v1beta1 has `protocols` only.
        let v1beta1 = cnp_egress(json!([{"action": "Deny", "to": to, "ports": ports}]));
        assert_eq!(error(&v1beta1), "spec.egress[0].ports: unknown field");
    }

    #[test]
    fn a_v1alpha1_namespaces_peer_in_its_first_released_shape_reads_as_the_later_one() {
        let first = anp_egress(json!([{"action": "Deny", "to": [
            {"namespaces": {"namespaceSelector": {"matchLabels": {"team": "a"}}}},
            {"pods": {"namespaces": {"namespaceSelector": {"matchLabels": {"team": "b"}}}, "podSelector": {"matchLabels": {"app": "db"}}}},
        ]}]));
        let later = anp_egress(json!([{"action": "Deny", "to": [
            {"namespaces": {"matchLabels": {"team": "a"}}},
            {"pods": {"namespaceSelector": {"matchLabels": {"team": "b"}}, "podSelector": {"matchLabels": {"app": "db"}}}},
        ]}]));
        assert_eq!(file(&first), file(&later));
        assert_eq!(
            file(&first).egress[0].peers[0],
            ClusterPeer::Pods(PodSet { namespaces: labelled("team", "a"), pods: Selector::everything() })
        );
    }

    #[test]
    fn same_labels_peers_are_refused_in_files_and_fail_closed_from_the_api_server() {
        let policy = anp_egress(json!([{"action": "Deny", "to": [{"namespaces": {"sameLabels": ["tenant"]}}]}]));
        assert_eq!(
            error(&policy),
            "spec.egress[0].to[0].namespaces.sameLabels: is not supported by netpol (network-policy-api v0.1.0; later versions dropped it)"
        );
        let rule = &api_server(&policy).egress[0];
        assert_eq!(
            (rule.action, &rule.peers),
            (Action::Deny, &vec![ClusterPeer::Everything]),
            "a Deny rule denies all"
        );
        let allow = anp_egress(json!([{"action": "Allow", "to": [{"namespaces": {"notSameLabels": ["tenant"]}}]}]));
        assert!(api_server(&allow).egress[0].peers.is_empty(), "an Allow rule matches nothing");
    }
}
