//! The cluster-wide tiers in the agent: ClusterNetworkPolicy, AdminNetworkPolicy and
//! BaselineAdminNetworkPolicy (`policy.networking.k8s.io`), watched through kube's dynamic
//! API, converted on arrival by [`crate::k8s::tiers::cluster_policy`] in
//! [`Mode::ApiServer`], and kept in one store per kind beside the others.
//!
//! ```text
//!  probe: LIST ?limit=1 (ClusterNetworkPolicy: v1beta1, else v1alpha2)
//!    ├─ 404 for every version: CRD not installed ─► store empty, kind "listed" (readiness,
//!    │                                               first sync) ─► probe again in 30-60 s
//!    ├─ other error: the watch is down, retried with backoff
//!    └─ served: list + watch (as every other kind) ... until a 404 (CRD deleted) ─► probe
//! ```
//!
//! **Why a periodic probe, not a watch of CustomResourceDefinitions.** The agent's RBAC
//! stays exactly the kinds it enforces (reading every CRD of the cluster is not its
//! business). A CRD is installed rarely and by hand, so picking it up within 30-60 s is
//! enough; the jitter keeps a fleet of agents from probing in step. The cost of a missing
//! CRD is at most four cheap 404 answers per agent per 30-60 s (the API server answers an
//! unserved resource from its router, without etcd or the watch cache); an installed one
//! costs nothing more than the watch.
//!
//! **A deleted CRD empties its store.** Deleting a CRD deletes its objects first (a
//! `DELETED` event each), then the API server answers 404. The agent follows: the policies
//! no longer exist, so it stops enforcing them. Keeping them would enforce what the cluster
//! no longer says, and nothing could ever lift it but a restart of every agent; and only a
//! cluster administrator can delete a CRD, which is the same power as deleting each policy.
//!
//! **Fail closed.** A cluster policy that does not convert ([`Watched::fail_closed`]):
//! - its tier, priority and subject read, but not its rules: a stand-in with the same tier,
//!   priority and subject and one Deny-everything rule for each direction the policy has
//!   rules for. Whatever the rules were, Accept, Deny or Pass, the subjects' traffic in those
//!   directions is denied at that tier and priority: nothing the policy might have denied
//!   gets through it, and a Baseline stand-in still lets NetworkPolicies allow (as a
//!   Baseline policy would).
//! - its subject (or tier, priority, name) does not read: it cannot be enforced. Denying
//!   everything of every pod instead would make one unreadable object (or one newer CRD
//!   field) cut the whole cluster off, DNS and the API server included, which is a worse
//!   failure than the policy missing. So it is skipped, and said loudly: a warning, the
//!   `netpol_cluster_policies{state="unenforced"}` gauge, and /readyz fails naming it until
//!   it is fixed or deleted.
//! - a rule with a peer or protocol of a newer CRD than netpol knows converts "fail closed"
//!   as the API asks (an Accept rule matches nothing, a Deny or Pass rule denies all): that
//!   is [`crate::k8s::tiers`]'s; the agent reports it once per policy.
//!
//! **`domainNames` peers.** The agent has no DNS-aware enforcement (it would need the
//! names' addresses as the pods resolve them, at the time they connect), so a `domainNames`
//! peer matches nothing. The API allows the peer in Accept rules only, so matching nothing
//! only ever denies more than the policy asks, never less. Each policy with one is warned
//! about once, and counted in `netpol_cluster_policies_unenforced_peers{kind, field}`.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{ApiResource, DynamicObject, ListParams};
use kube::runtime::watcher;
use kube::{Api, Client};
use serde::Deserialize;
use serde_json::Value;

use crate::k8s::convert::FieldError;
use crate::k8s::tiers::{Mode, cluster_policy};
use crate::policy::tiers::{Action, ClusterPeer, ClusterPolicy, ClusterRule};

use super::trigger::Trigger;
use super::watch::{AgentStores, ClusterWatch, EventHook, Objects, Resource, WatchBackoff, Watched};

/// The API group of the cluster policy CRDs.
pub const GROUP: &str = "policy.networking.k8s.io";

/// A missing CRD is probed for again after this long, plus up to as much again of jitter.
pub const CRD_RECHECK: Duration = Duration::from_secs(30);

/// One cluster policy kind: how it is served and where it is stored.
pub trait TierKind: Clone + std::fmt::Debug + Send + Sync + 'static {
    const RESOURCE: Resource;
    const KIND: &'static str;
    const PLURAL: &'static str;
    /// The versions read, in order of preference (the first one served is watched).
    const VERSIONS: &'static [&'static str];
    fn objects(stores: &mut AgentStores) -> &mut Objects<ClusterPolicy>;
}

/// `policy.networking.k8s.io` ClusterNetworkPolicy: v1beta1, else v1alpha2.
#[derive(Clone, Debug)]
pub struct ClusterNetwork;
/// `policy.networking.k8s.io/v1alpha1` AdminNetworkPolicy.
#[derive(Clone, Debug)]
pub struct Admin;
/// `policy.networking.k8s.io/v1alpha1` BaselineAdminNetworkPolicy.
#[derive(Clone, Debug)]
pub struct Baseline;

impl TierKind for ClusterNetwork {
    const RESOURCE: Resource = Resource::ClusterNetworkPolicies;
    const KIND: &'static str = "ClusterNetworkPolicy";
    const PLURAL: &'static str = "clusternetworkpolicies";
    const VERSIONS: &'static [&'static str] = &["v1beta1", "v1alpha2"];
    fn objects(stores: &mut AgentStores) -> &mut Objects<ClusterPolicy> {
        &mut stores.cluster_network_policies
    }
}

impl TierKind for Admin {
    const RESOURCE: Resource = Resource::AdminNetworkPolicies;
    const KIND: &'static str = "AdminNetworkPolicy";
    const PLURAL: &'static str = "adminnetworkpolicies";
    const VERSIONS: &'static [&'static str] = &["v1alpha1"];
    fn objects(stores: &mut AgentStores) -> &mut Objects<ClusterPolicy> {
        &mut stores.admin_network_policies
    }
}

impl TierKind for Baseline {
    const RESOURCE: Resource = Resource::BaselineAdminNetworkPolicies;
    const KIND: &'static str = "BaselineAdminNetworkPolicy";
    const PLURAL: &'static str = "baselineadminnetworkpolicies";
    const VERSIONS: &'static [&'static str] = &["v1alpha1"];
    fn objects(stores: &mut AgentStores) -> &mut Objects<ClusterPolicy> {
        &mut stores.baseline_admin_network_policies
    }
}

/// The dynamic API's resource of kind `T` in `version`.
pub fn api_resource<T: TierKind>(version: &str) -> ApiResource {
    ApiResource {
        group: GROUP.into(),
        version: version.into(),
        api_version: format!("{GROUP}/{version}"),
        kind: T::KIND.into(),
        plural: T::PLURAL.into(),
    }
}

/// A [`DynamicObject`] known to be of kind `T`: the type the stores route by.
#[derive(Clone, Debug, Deserialize)]
#[serde(transparent)]
pub struct TierObject<T> {
    pub object: DynamicObject,
    #[serde(skip)]
    kind: PhantomData<T>,
}

impl<T> TierObject<T> {
    pub fn new(object: DynamicObject) -> Self {
        TierObject { object, kind: PhantomData }
    }
}

impl<T: TierKind> kube::Resource for TierObject<T> {
    type DynamicType = ApiResource;
    type Scope = kube::core::ClusterResourceScope;

    fn kind(dt: &ApiResource) -> std::borrow::Cow<'_, str> {
        DynamicObject::kind(dt)
    }
    fn group(dt: &ApiResource) -> std::borrow::Cow<'_, str> {
        DynamicObject::group(dt)
    }
    fn version(dt: &ApiResource) -> std::borrow::Cow<'_, str> {
        DynamicObject::version(dt)
    }
    fn api_version(dt: &ApiResource) -> std::borrow::Cow<'_, str> {
        DynamicObject::api_version(dt)
    }
    fn plural(dt: &ApiResource) -> std::borrow::Cow<'_, str> {
        DynamicObject::plural(dt)
    }
    fn meta(&self) -> &kube::core::ObjectMeta {
        &self.object.metadata
    }
    fn meta_mut(&mut self) -> &mut kube::core::ObjectMeta {
        &mut self.object.metadata
    }
}

impl<T: TierKind> TierObject<T> {
    fn value(&self) -> Value {
        serde_json::to_value(&self.object).unwrap_or(Value::Null)
    }
}

impl<T: TierKind> Watched for TierObject<T> {
    type Model = ClusterPolicy;
    const KIND: &'static str = T::KIND;
    const DEFAULT_NAMESPACE: &'static str = "";
    const FAIL_CLOSED_MEANS: &'static str = "enforced fail-closed: its subjects' traffic is denied at its tier and priority in the directions it has rules for";
    const SKIPPED_MEANS: &'static str = "NOT ENFORCED: its subject cannot be read, so no one knows whom to deny (the agent reports not ready until it is fixed)";

    fn convert(&self) -> Result<Option<ClusterPolicy>, FieldError> {
        cluster_policy(&self.value(), Mode::ApiServer).map(Some)
    }

    fn fail_closed(&self, error: &FieldError) -> Option<ClusterPolicy> {
        stand_in(&self.value(), error)
    }

    fn share(policy: ClusterPolicy, stores: &mut AgentStores) -> ClusterPolicy {
        report_peers(&policy, stores);
        policy
    }

    fn objects(stores: &mut AgentStores) -> &mut Objects<ClusterPolicy> {
        T::objects(stores)
    }

    /// A list's items may come without apiVersion and kind; the conversion reads them.
    fn arrived(&mut self, api: &ApiResource) {
        if self.object.types.is_none() {
            self.object.types =
                Some(kube::core::TypeMeta { api_version: api.api_version.clone(), kind: api.kind.clone() });
        }
    }

    fn unchanged(old: &ClusterPolicy, new: &ClusterPolicy) -> bool {
        old == new
    }

    fn changed(stores: &mut AgentStores) {
        let mut all: Vec<Arc<ClusterPolicy>> =
            [&stores.cluster_network_policies, &stores.admin_network_policies, &stores.baseline_admin_network_policies]
                .iter()
                .flat_map(|o| o.enforced().iter().cloned())
                .collect();
        all.sort_by(|a, b| a.precedence().cmp(&b.precedence()));
        stores.cluster_policies = Arc::new(all);
        stores.tier_report = TierReport::of(stores);
    }
}

/// The stand-in for a cluster policy that failed conversion with `error`, if its tier,
/// priority and subject read without its rules (see the module doc).
pub fn stand_in(value: &Value, error: &FieldError) -> Option<ClusterPolicy> {
    let mut head = value.clone();
    let spec = head.get_mut("spec")?.as_object_mut()?;
    let has_rules = |rules: Option<Value>| match rules {
        None | Some(Value::Null) => false,
        Some(Value::Array(items)) => !items.is_empty(),
        Some(_) => true,
    };
    let ingress = has_rules(spec.remove("ingress"));
    let egress = has_rules(spec.remove("egress"));
    let mut policy = cluster_policy(&head, Mode::ApiServer).ok()?;
    let why = format!("the policy failed conversion ({error}): its subjects' traffic is denied instead");
    let deny_all = || vec![ClusterRule::failed_closed(Some("fail-closed".into()), Action::Deny, why.clone())];
    policy.ingress = if ingress { deny_all() } else { Vec::new() };
    policy.egress = if egress { deny_all() } else { Vec::new() };
    Some(policy)
}

/// What of the peers of `policy` is not enforced as written: `domainNames` (match nothing
/// in the agent) and `unknown` (a rule that failed closed on a peer or protocol of a newer
/// API). Names each field once per policy.
fn unenforced_fields(policy: &ClusterPolicy) -> Vec<&'static str> {
    let rules = || policy.ingress.iter().chain(&policy.egress);
    let mut fields = Vec::new();
    if rules().any(|r| r.peers.iter().any(|p| matches!(p, ClusterPeer::DomainNames(_)))) {
        fields.push("domainNames");
    }
    if rules().any(|r| r.fail_closed.is_some() && r.name.as_deref() != Some("fail-closed")) {
        fields.push("unknown");
    }
    fields
}

/// Warns once per policy about each peer field the agent does not enforce as written.
fn report_peers(policy: &ClusterPolicy, stores: &mut AgentStores) {
    let kind = policy.id.kind.as_str();
    let fields = unenforced_fields(policy);
    // A field the policy no longer has is warned about anew if it comes back.
    if !stores.reported_peers.is_empty() {
        stores
            .reported_peers
            .retain(|(k, name, f)| (*k, name.as_str()) != (kind, &policy.id.name) || fields.contains(f));
    }
    for field in fields {
        if !stores.reported_peers.insert((kind, policy.id.name.clone(), field)) {
            continue;
        }
        match field {
            "domainNames" => tracing::warn!(
                kind,
                name = %policy.id.name,
                field,
                "{} has domainNames peers: the agent has no DNS-aware enforcement, so they match nothing (their Accept rules allow nothing; the policy denies more than written, never less)",
                policy.id
            ),
            _ => {
                let why = policy.ingress.iter().chain(&policy.egress).find_map(|r| r.fail_closed.as_deref());
                tracing::warn!(kind, name = %policy.id.name, field, "{}: {}", policy.id, why.unwrap_or("a rule fails closed"))
            }
        }
    }
}

/// What the cluster policy stores hold that is not enforced as written, for the metrics
/// and the readiness probe.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TierReport {
    /// Enforced as written (or with rules the API itself says to fail closed).
    pub enforced: usize,
    /// Failed conversion, enforced by a deny stand-in.
    pub fail_closed: usize,
    /// Failed conversion and not enforced at all (`Kind name`).
    pub unenforced: Vec<String>,
    /// Policies per (kind, field) with peers not enforced as written (`domainNames`,
    /// `unknown`).
    pub unenforced_peers: BTreeMap<(&'static str, &'static str), usize>,
}

impl TierReport {
    fn of(stores: &AgentStores) -> TierReport {
        let mut report = TierReport::default();
        let stores_by_kind = [
            ("ClusterNetworkPolicy", &stores.cluster_network_policies),
            ("AdminNetworkPolicy", &stores.admin_network_policies),
            ("BaselineAdminNetworkPolicy", &stores.baseline_admin_network_policies),
        ];
        for (kind, objects) in stores_by_kind {
            report.fail_closed += objects.fail_closed_count();
            report.enforced += objects.enforced().len() - objects.fail_closed_count();
            report.unenforced.extend(objects.invalid_keys().map(|(_, name)| format!("{kind} {name}")));
            for policy in objects.enforced().iter() {
                for field in unenforced_fields(policy) {
                    *report.unenforced_peers.entry((kind, field)).or_default() += 1;
                }
            }
        }
        report
    }
}

impl ClusterWatch {
    /// Watches the cluster policy kind `T` while its CRD is installed (see the module doc).
    pub(super) async fn run_crd<T: TierKind>(
        &self,
        client: &Client,
        config: &watcher::Config,
        recheck: Duration,
        trigger: &Trigger,
        hook: Option<&EventHook>,
    ) {
        let resource = T::RESOURCE;
        let counters = self.counters().clone();
        let mut backoff = WatchBackoff::new();
        loop {
            match probe::<T>(client).await {
                Ok(Some(api)) => {
                    if counters.set_crd_installed(resource, true) {
                        tracing::info!(resource = resource.as_str(), api_version = %api.api_version, "CRD installed; listing and watching {}", T::KIND);
                    }
                    let objects = Api::<TierObject<T>>::all_with(client.clone(), &api);
                    self.run_one(objects, &api, config.clone(), resource, trigger, hook, true).await;
                }
                Ok(None) => {
                    let (emptied, report) = {
                        let mut stores = self.stores();
                        (stores.clear::<TierObject<T>>(), stores.tier_report.clone())
                    };
                    counters.set_tier_report(report);
                    let news = counters.set_crd_installed(resource, false);
                    if news {
                        tracing::info!(
                            resource = resource.as_str(),
                            recheck = ?recheck,
                            "CRD not installed (404): working without {}; checking again every {:?}-{:?}",
                            T::KIND,
                            recheck,
                            recheck * 2
                        );
                    }
                    if emptied {
                        tracing::warn!(
                            resource = resource.as_str(),
                            "the CRD is gone: its policies are no longer enforced"
                        );
                    }
                    counters.delivered(resource);
                    if counters.mark_listed(resource) {
                        counters.listing(resource);
                        self.listed_notify();
                    }
                    if news || emptied {
                        trigger.notify();
                    }
                    let wait = recheck + recheck.mul_f64(jitter());
                    tokio::time::sleep(wait).await;
                }
                Err(error) => {
                    counters.failed(resource);
                    let delay = backoff.next().unwrap_or(Duration::from_secs(30));
                    tracing::warn!(resource = resource.as_str(), %error, retry_in = ?delay, "probing for the CRD failed");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

/// A number in `[0, 1)`, different per agent and per call: spreads a fleet's probes.
fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let mut x = u64::from(nanos) ^ (u64::from(std::process::id()) << 32) | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// The version `T` is served in, trying [`TierKind::VERSIONS`] in order with a one-item
/// list (the agent may list these kinds); `None` when each answers 404.
async fn probe<T: TierKind>(client: &Client) -> Result<Option<ApiResource>, kube::Error> {
    for version in T::VERSIONS {
        let api = api_resource::<T>(version);
        match Api::<DynamicObject>::all_with(client.clone(), &api).list(&ListParams::default().limit(1)).await {
            Ok(_) => return Ok(Some(api)),
            Err(kube::Error::Api(status)) if status.code == 404 => continue,
            Err(error) => return Err(error),
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use kube::runtime::watcher::Event;
    use serde_json::json;

    use super::*;

    fn admin(name: &str, priority: u16) -> TierObject<Admin> {
        TierObject::new(
            serde_json::from_value(json!({
                "apiVersion": "policy.networking.k8s.io/v1alpha1",
                "kind": "AdminNetworkPolicy",
                "metadata": {"name": name, "resourceVersion": "1"},
                "spec": {
                    "priority": priority,
                    "subject": {"namespaces": {}},
                    "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}],
                },
            }))
            .unwrap(),
        )
    }

    fn node(name: &str, zone: &str, heartbeat: &str) -> k8s_openapi::api::core::v1::Node {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"zone": zone}},
            "status": {
                "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}],
                "conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": heartbeat}],
            },
        }))
        .unwrap()
    }

    #[test]
    fn snapshots_share_the_cluster_policy_and_node_lists_until_one_changes() {
        let mut stores = AgentStores::default();
        stores.apply(&admin("b", 20));
        stores.apply(&admin("a", 30));
        stores.apply(&node("node-a", "z1", "2026-01-01T00:00:00Z"));
        let (one, two) = (stores.snapshot(), stores.snapshot());
        assert!(Arc::ptr_eq(&one.cluster_policies, &two.cluster_policies));
        assert!(Arc::ptr_eq(&one.nodes, &two.nodes));
        // In precedence order (priority), not the store's name order.
        let names: Vec<&str> = one.cluster_policies.iter().map(|p| p.id.name.as_str()).collect();
        assert_eq!(names, ["b", "a"]);

        // A node status update that changes no label or address is no change at all.
        assert!(!stores.handle(&Event::Apply(node("node-a", "z1", "2026-01-01T00:00:40Z"))));
        assert!(Arc::ptr_eq(&one.nodes, &stores.snapshot().nodes));
        assert!(!stores.handle(&Event::Apply(admin("a", 30))), "the same policy again");
        assert!(Arc::ptr_eq(&one.cluster_policies, &stores.snapshot().cluster_policies));

        assert!(stores.handle(&Event::Apply(node("node-a", "z2", "2026-01-01T00:01:20Z"))));
        assert_eq!(stores.snapshot().nodes[0].labels["zone"], "z2");
        assert!(stores.handle(&Event::Apply(admin("a", 10))));
        let names: Vec<String> = stores.snapshot().cluster_policies.iter().map(|p| p.id.name.clone()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(one.cluster_policies.len(), 2, "a taken snapshot keeps its list");
    }

    #[test]
    fn a_stand_in_keeps_tier_priority_and_subject_and_denies_only_the_directions_with_rules() {
        let value = json!({
            "apiVersion": "policy.networking.k8s.io/v1beta1",
            "kind": "ClusterNetworkPolicy",
            "metadata": {"name": "p"},
            "spec": {
                "tier": "Baseline",
                "priority": 7,
                "subject": {"namespaces": {"matchLabels": {"team": "a"}}},
                "egress": [{"action": "Sometimes", "to": [{"networks": ["10.0.0.0/8"]}]}],
                "ingress": [],
            },
        });
        let error = cluster_policy(&value, Mode::ApiServer).unwrap_err();
        let p = stand_in(&value, &error).unwrap();
        assert_eq!((p.tier.as_str(), p.priority), ("Baseline", 7));
        assert!(p.ingress.is_empty());
        assert_eq!(p.egress.len(), 1);
        assert_eq!((p.egress[0].action, &p.egress[0].peers[..]), (Action::Deny, &[ClusterPeer::Everything][..]));

        let mut unreadable = value.clone();
        unreadable["spec"]["subject"] = json!({"namespaces": {"matchLabels": {"team": "not a value!"}}});
        let error = cluster_policy(&unreadable, Mode::ApiServer).unwrap_err();
        assert_eq!(stand_in(&unreadable, &error), None);
    }
}
