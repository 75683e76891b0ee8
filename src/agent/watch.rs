//! Kubernetes watches: `kube-runtime` watchers feeding reflector stores for Pods (all
//! namespaces), Namespaces and NetworkPolicies.
//!
//! Each object is stripped on arrival (`.modify()`) down to what the agent reads, so the
//! stores hold a few hundred bytes per pod instead of kilobytes. Relists are
//! level-triggered: the reflector swaps in the relisted set atomically at `InitDone`, and
//! the agent only ever reads whole [`Snapshot`]s. Watch errors (including `410 Gone`,
//! after which the watcher relists) are retried with the watcher's default backoff.

use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use futures::StreamExt;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Container, ContainerPort, Namespace, Pod, PodSpec, PodStatus};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, reflector::store::Writer};
use kube::{Api, Client};
use serde::de::DeserializeOwned;

use super::Snapshot;
use super::trigger::{SnapshotSource, Trigger};

/// The three watched resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    Pods,
    Namespaces,
    NetworkPolicies,
}

impl Resource {
    pub const ALL: [Resource; 3] = [Resource::Pods, Resource::Namespaces, Resource::NetworkPolicies];

    /// Label value used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Pods => "pods",
            Resource::Namespaces => "namespaces",
            Resource::NetworkPolicies => "networkpolicies",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Default)]
struct PerResource {
    listed: AtomicBool,
    events: AtomicU64,
    lists: AtomicU64,
    errors: AtomicU64,
}

/// Counters per watched resource, read by the metrics endpoint and by tests.
#[derive(Debug, Default)]
pub struct WatchCounters {
    per: [PerResource; 3],
}

impl WatchCounters {
    /// Has this resource completed its first list?
    pub fn listed(&self, r: Resource) -> bool {
        self.per[r.index()].listed.load(Ordering::SeqCst)
    }

    /// Watch events (applied or deleted objects) received after the lists.
    pub fn events(&self, r: Resource) -> u64 {
        self.per[r.index()].events.load(Ordering::SeqCst)
    }

    /// Lists started (the first one included).
    pub fn lists(&self, r: Resource) -> u64 {
        self.per[r.index()].lists.load(Ordering::SeqCst)
    }

    /// Relists: lists after the first (after `410 Gone`, or a failed list or watch start).
    pub fn relists(&self, r: Resource) -> u64 {
        self.lists(r).saturating_sub(1)
    }

    /// Errors reported by the watcher (each followed by a backoff).
    pub fn errors(&self, r: Resource) -> u64 {
        self.per[r.index()].errors.load(Ordering::SeqCst)
    }
}

/// Read side of the watches: the stores and the counters. Cheap to clone.
#[derive(Clone)]
pub struct ClusterWatch {
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    policies: Store<NetworkPolicy>,
    counters: Arc<WatchCounters>,
}

impl ClusterWatch {
    /// Starts watching. Returns the read side and the future that drives the three
    /// watches (spawn it; it runs until dropped). Every change to a store, and every
    /// completed (re)list, calls `trigger.notify()`.
    pub fn start(client: Client, config: watcher::Config, trigger: Trigger) -> (ClusterWatch, BoxFuture<'static, ()>) {
        let (pods, pods_w) = reflector::store();
        let (namespaces, namespaces_w) = reflector::store();
        let (policies, policies_w) = reflector::store();
        let counters = Arc::new(WatchCounters::default());
        let driver = {
            let counters = counters.clone();
            async move {
                futures::join!(
                    run_one(
                        Api::<Pod>::all(client.clone()),
                        config.clone(),
                        pods_w,
                        strip_pod,
                        Resource::Pods,
                        counters.clone(),
                        trigger.clone(),
                    ),
                    run_one(
                        Api::<Namespace>::all(client.clone()),
                        config.clone(),
                        namespaces_w,
                        strip_namespace,
                        Resource::Namespaces,
                        counters.clone(),
                        trigger.clone(),
                    ),
                    run_one(
                        Api::<NetworkPolicy>::all(client),
                        config,
                        policies_w,
                        strip_network_policy,
                        Resource::NetworkPolicies,
                        counters,
                        trigger,
                    ),
                );
            }
        };
        let watch = ClusterWatch { pods, namespaces, policies, counters };
        (watch, Box::pin(driver))
    }

    /// True once Pods, Namespaces and NetworkPolicies have each listed once.
    pub fn is_ready(&self) -> bool {
        Resource::ALL.iter().all(|r| self.counters.listed(*r))
    }

    /// Waits until [`ClusterWatch::is_ready`].
    pub async fn wait_ready(&self) {
        // The writers live inside the driver; if it is dropped, readiness never comes.
        let _ = futures::join!(
            self.pods.wait_until_ready(),
            self.namespaces.wait_until_ready(),
            self.policies.wait_until_ready()
        );
    }

    /// A copy of the three stores, each sorted by namespace and name.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot { namespaces: sorted(&self.namespaces), pods: sorted(&self.pods), policies: sorted(&self.policies) }
    }

    pub fn counters(&self) -> &Arc<WatchCounters> {
        &self.counters
    }
}

impl SnapshotSource for ClusterWatch {
    fn is_ready(&self) -> bool {
        ClusterWatch::is_ready(self)
    }

    fn snapshot(&self) -> Snapshot {
        ClusterWatch::snapshot(self)
    }
}

fn sorted<K>(store: &Store<K>) -> Vec<K>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    let mut items: Vec<K> = store.state().iter().map(|o| (**o).clone()).collect();
    items.sort_by(|a, b| {
        (a.meta().namespace.as_deref(), a.meta().name.as_deref())
            .cmp(&(b.meta().namespace.as_deref(), b.meta().name.as_deref()))
    });
    items
}

async fn run_one<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: Writer<K>,
    strip: fn(&mut K),
    resource: Resource,
    counters: Arc<WatchCounters>,
    trigger: Trigger,
) where
    K: kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let per = &counters.per[resource.index()];
    let stream = watcher(api, config).default_backoff().modify(strip).reflect(writer);
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        match item {
            Ok(Event::Init) => {
                let n = per.lists.fetch_add(1, Ordering::SeqCst);
                if n > 0 {
                    tracing::info!(resource = resource.as_str(), "relisting");
                }
            }
            Ok(Event::InitApply(_)) => {}
            Ok(Event::InitDone) => {
                if !per.listed.swap(true, Ordering::SeqCst) {
                    tracing::info!(resource = resource.as_str(), "initial list complete");
                }
                trigger.notify();
            }
            Ok(Event::Apply(_) | Event::Delete(_)) => {
                per.events.fetch_add(1, Ordering::SeqCst);
                trigger.notify();
            }
            Err(error) => {
                per.errors.fetch_add(1, Ordering::SeqCst);
                tracing::warn!(resource = resource.as_str(), %error, "watch error; retrying with backoff");
            }
        }
    }
}

use kube::runtime::watcher::watcher;

/// Keeps the identity and lifecycle fields of an object's metadata, and labels when asked.
fn strip_meta(meta: &mut ObjectMeta, keep_labels: bool) {
    let m = std::mem::take(meta);
    *meta = ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        uid: m.uid,
        resource_version: m.resource_version,
        creation_timestamp: m.creation_timestamp,
        deletion_timestamp: m.deletion_timestamp,
        labels: if keep_labels { m.labels } else { None },
        ..ObjectMeta::default()
    };
}

fn strip_container(c: Container) -> Option<Container> {
    let ports: Vec<ContainerPort> = c
        .ports?
        .into_iter()
        .map(|p| ContainerPort {
            name: p.name,
            container_port: p.container_port,
            protocol: p.protocol,
            ..ContainerPort::default()
        })
        .collect();
    if ports.is_empty() {
        return None;
    }
    Some(Container { name: c.name, ports: Some(ports), restart_policy: c.restart_policy, ..Container::default() })
}

/// Keeps labels, name, namespace, `spec.nodeName`, `spec.hostNetwork`, container ports
/// (name, number, protocol; also of sidecar init containers, which serve traffic),
/// `status.phase` and `status.podIP(s)`.
pub fn strip_pod(pod: &mut Pod) {
    strip_meta(&mut pod.metadata, true);
    if let Some(spec) = pod.spec.take() {
        let init: Vec<Container> = spec
            .init_containers
            .unwrap_or_default()
            .into_iter()
            .filter(|c| c.restart_policy.as_deref() == Some("Always"))
            .filter_map(strip_container)
            .collect();
        pod.spec = Some(PodSpec {
            node_name: spec.node_name,
            host_network: spec.host_network,
            containers: spec.containers.into_iter().filter_map(strip_container).collect(),
            init_containers: (!init.is_empty()).then_some(init),
            ..PodSpec::default()
        });
    }
    if let Some(status) = pod.status.take() {
        pod.status = Some(PodStatus {
            phase: status.phase,
            pod_ip: status.pod_ip,
            pod_ips: status.pod_ips,
            ..PodStatus::default()
        });
    }
}

/// Keeps name and labels.
pub fn strip_namespace(ns: &mut Namespace) {
    strip_meta(&mut ns.metadata, true);
    ns.spec = None;
    ns.status = None;
}

/// Keeps name, namespace and the full spec.
pub fn strip_network_policy(np: &mut NetworkPolicy) {
    strip_meta(&mut np.metadata, false);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn fat_pod() -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "web-1", "namespace": "shop", "uid": "u1", "resourceVersion": "7",
                "labels": {"segment": "frontend"},
                "annotations": {"big": "x".repeat(1000)},
                "managedFields": [{"manager": "kubelet", "operation": "Update"}],
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web", "uid": "r1"}],
            },
            "spec": {
                "nodeName": "node-a",
                "hostNetwork": false,
                "containers": [
                    {"name": "app", "image": "nginx", "env": [{"name": "A", "value": "b"}],
                     "ports": [{"name": "http", "containerPort": 80, "protocol": "TCP", "hostPort": 8080}]},
                    {"name": "log", "image": "busybox"}
                ],
                "initContainers": [
                    {"name": "setup", "image": "busybox", "ports": [{"containerPort": 1}]},
                    {"name": "mesh", "image": "proxy", "restartPolicy": "Always",
                     "ports": [{"name": "admin", "containerPort": 15000}]}
                ],
                "volumes": [{"name": "v", "emptyDir": {}}]
            },
            "status": {"phase": "Running", "podIP": "192.0.2.10", "podIPs": [{"ip": "192.0.2.10"}, {"ip": "2001:db8::10"}],
                       "hostIP": "198.51.100.1", "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap()
    }

    #[test]
    fn stripping_a_pod_keeps_only_what_the_agent_reads() {
        let mut pod = fat_pod();
        strip_pod(&mut pod);
        let expected: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "u1", "resourceVersion": "7",
                         "labels": {"segment": "frontend"}},
            "spec": {
                "nodeName": "node-a",
                "hostNetwork": false,
                "containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 80, "protocol": "TCP"}]}],
                "initContainers": [{"name": "mesh", "restartPolicy": "Always",
                                    "ports": [{"name": "admin", "containerPort": 15000}]}]
            },
            "status": {"phase": "Running", "podIP": "192.0.2.10", "podIPs": [{"ip": "192.0.2.10"}, {"ip": "2001:db8::10"}]}
        }))
        .unwrap();
        assert_eq!(pod, expected);
    }

    #[test]
    fn stripping_a_namespace_keeps_its_labels() {
        let mut ns = Namespace {
            metadata: ObjectMeta {
                name: Some("shop".into()),
                labels: Some(BTreeMap::from([("team".into(), "a".into())])),
                annotations: Some(BTreeMap::from([("x".into(), "y".into())])),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        strip_namespace(&mut ns);
        assert_eq!(ns.metadata.labels.unwrap()["team"], "a");
        assert!(ns.metadata.annotations.is_none());
    }

    #[test]
    fn stripping_a_policy_keeps_its_whole_spec() {
        let mut np: NetworkPolicy = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "shop", "labels": {"a": "b"}, "annotations": {"c": "d"}},
            "spec": {"podSelector": {"matchLabels": {"segment": "backend"}},
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"segment": "frontend"}}}],
                                  "ports": [{"port": 80}]}]}
        }))
        .unwrap();
        let spec = np.spec.clone();
        strip_network_policy(&mut np);
        assert_eq!(np.spec, spec);
        assert!(np.metadata.labels.is_none() && np.metadata.annotations.is_none());
        assert_eq!(np.metadata.name.as_deref(), Some("p"));
    }
}
