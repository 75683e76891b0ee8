//! The fake API server together with a mirror of everything a test applied to it: the
//! cluster an agent must end up enforcing, as the agent's stores would hold it.
//!
//! ```text
//!  test ──ns/pod/policy/delete──► MirroredApi ──► FakeApiServer ──watch──► agent
//!                                      └──► mirror ──snapshot()──► expected state
//! ```
//!
//! Cluster policies (ClusterNetworkPolicy, AdminNetworkPolicy, BaselineAdminNetworkPolicy)
//! are applied as JSON, and mirrored as the agent converts them (`Mode::ApiServer`).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::agent::Snapshot;
use crate::k8s::tiers::{Mode, cluster_policy};
use crate::policy::tiers::ClusterPolicy;
use crate::testkit::apiserver::{FakeApiServer, Kind};

/// `(namespace, name)` of a namespaced object.
pub type Key = (String, String);

fn key(m: &ObjectMeta) -> Key {
    (m.namespace.clone().unwrap_or_default(), m.name.clone().unwrap_or_default())
}

fn owned(ns: &str, name: &str) -> Key {
    (ns.to_string(), name.to_string())
}

pub struct MirroredApi {
    pub server: FakeApiServer,
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: BTreeMap<Key, Pod>,
    pub policies: BTreeMap<Key, NetworkPolicy>,
    /// Cluster policies by (kind, name), as applied.
    pub cluster_policies: BTreeMap<Key, Value>,
}

impl MirroredApi {
    pub fn new(server: FakeApiServer) -> MirroredApi {
        MirroredApi {
            server,
            namespaces: BTreeMap::new(),
            pods: BTreeMap::new(),
            policies: BTreeMap::new(),
            cluster_policies: BTreeMap::new(),
        }
    }

    /// Applies (creates or replaces) a namespace.
    pub fn ns(&mut self, n: Namespace) {
        self.server.apply(&n).expect("the fake accepts the namespace");
        self.namespaces.insert(n.metadata.name.clone().unwrap_or_default(), n);
    }

    /// Applies (creates or replaces) a pod.
    pub fn pod(&mut self, p: Pod) {
        self.server.apply(&p).expect("the fake accepts the pod");
        self.pods.insert(key(&p.metadata), p);
    }

    /// Applies (creates or replaces) a policy.
    pub fn policy(&mut self, p: NetworkPolicy) {
        self.server.apply(&p).expect("the fake accepts the policy");
        self.policies.insert(key(&p.metadata), p);
    }

    /// Applies (creates or replaces) a cluster policy, given as JSON with its `kind`; its
    /// CRD must be installed.
    pub fn cluster_policy(&mut self, value: Value) {
        self.server.apply_json(value.clone()).expect("the fake accepts the cluster policy");
        let kind = value["kind"].as_str().unwrap_or_default().to_string();
        let name = value["metadata"]["name"].as_str().unwrap_or_default().to_string();
        self.cluster_policies.insert((kind, name), value);
    }

    pub fn delete_cluster_policy(&mut self, kind: Kind, name: &str) {
        self.server.delete(kind, "", name).expect("cluster policy exists");
        self.cluster_policies.remove(&owned(kind.as_str(), name));
    }

    pub fn delete_pod(&mut self, ns: &str, name: &str) {
        self.server.delete(Kind::Pod, ns, name).expect("pod exists");
        self.pods.remove(&owned(ns, name));
    }

    pub fn delete_policy(&mut self, ns: &str, name: &str) {
        self.server.delete(Kind::NetworkPolicy, ns, name).expect("policy exists");
        self.policies.remove(&owned(ns, name));
    }

    /// The pod as last applied, to modify.
    pub fn get_pod(&self, ns: &str, name: &str) -> Pod {
        self.pods[&owned(ns, name)].clone()
    }

    /// Everything applied, as the agent's stores would hold it.
    pub fn snapshot(&self) -> Snapshot {
        let namespaces: Vec<Namespace> = self.namespaces.values().cloned().collect();
        let pods: Vec<Pod> = self.pods.values().cloned().collect();
        let policies: Vec<NetworkPolicy> = self.policies.values().cloned().collect();
        let mut snapshot = Snapshot::from_objects(&namespaces, &pods, &policies);
        let mut tiers: Vec<Arc<ClusterPolicy>> = self
            .cluster_policies
            .values()
            .map(|v| {
                Arc::new(cluster_policy(v, Mode::ApiServer).expect("the test applies convertible cluster policies"))
            })
            .collect();
        tiers.sort_by(|a, b| a.precedence().cmp(&b.precedence()));
        snapshot.cluster_policies = Arc::new(tiers);
        snapshot
    }
}
