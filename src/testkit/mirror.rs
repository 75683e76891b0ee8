//! The fake API server together with a mirror of everything a test applied to it: the
//! cluster an agent must end up enforcing, as the agent's stores would hold it.
//!
//! ```text
//!  test ──ns/pod/policy/delete──► MirroredApi ──► FakeApiServer ──watch──► agent
//!                                      └──► mirror ──snapshot()──► expected state
//! ```

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::agent::Snapshot;
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
}

impl MirroredApi {
    pub fn new(server: FakeApiServer) -> MirroredApi {
        MirroredApi { server, namespaces: BTreeMap::new(), pods: BTreeMap::new(), policies: BTreeMap::new() }
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
        Snapshot::from_objects(&namespaces, &pods, &policies)
    }
}
