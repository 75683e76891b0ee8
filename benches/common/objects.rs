//! The generated cluster, its size flags and its API objects, shared by the agent benchmarks.

use std::net::IpAddr;

use netpol::cli::generate::{self, Params};
use netpol::policy::model::{Cluster, Pod};
use serde_json::{Value, json};

/// The size of the generated cluster (`--pods --policies --namespaces --nodes --seed`).
#[derive(clap::Args, Debug, Clone)]
pub struct ClusterArgs {
    /// Pods of the cluster.
    #[arg(long, default_value_t = 10_000)]
    pub pods: usize,
    /// Policies of the cluster.
    #[arg(long, default_value_t = 1_000)]
    pub policies: usize,
    /// Namespaces of the cluster.
    #[arg(long, default_value_t = 100)]
    pub namespaces: usize,
    /// Nodes of the cluster. Prime by default: pods go to node `i % nodes` and namespace
    /// `i % namespaces`, so an even divisor would put one node's pods in one namespace.
    #[arg(long, default_value_t = 101)]
    pub nodes: usize,
    /// Seed of the generator (same seed, same cluster).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// ClusterNetworkPolicies in the mix (`generate::cluster_policies`: Admin and Baseline,
    /// every action), served as `policy.networking.k8s.io/v1beta1` objects.
    #[arg(long, default_value_t = 0)]
    pub cluster_policies: usize,
    /// Serve pods the size and shape of a real Deployment's pods (~10 KB of JSON each:
    /// `netpol::testkit::realistic`); `--realistic-pods=false` serves the small pods
    /// (~2.8 KB) of earlier measurements.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub realistic_pods: bool,
}

impl ClusterArgs {
    /// A pod as the API server serves it: realistic or small (see `--realistic-pods`).
    pub fn pod_object(&self, p: &Pod) -> Value {
        if self.realistic_pods { netpol::testkit::realistic::deployment_pod(p) } else { pod_json(p) }
    }

    pub fn params(&self) -> Params {
        Params {
            pods: self.pods,
            policies: self.policies,
            namespaces: self.namespaces,
            nodes: self.nodes,
            seed: self.seed,
            dual_stack: false,
        }
    }
}

/// A small pod with some of the fields a Deployment's pod has on the wire (owner,
/// annotations, env, volumes, conditions, managedFields), ~2.8 KB of JSON: the pods of
/// measurements before `--realistic-pods`.
pub fn pod_json(p: &Pod) -> Value {
    let labels: serde_json::Map<String, Value> = p
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .chain([("pod-template-hash".to_string(), json!("7d9f8b6c5"))])
        .collect();
    let ports: Vec<Value> = p
        .ports
        .iter()
        .map(|port| json!({"name": port.name, "containerPort": port.port, "protocol": port.protocol.as_str()}))
        .collect();
    let ip = p.ips.first().map(IpAddr::to_string);
    let app = p.labels.get("app").cloned().unwrap_or_default();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": p.id.name, "namespace": p.id.namespace, "labels": labels,
            "generateName": format!("{app}-7d9f8b6c5-"),
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z",
                            "prometheus.io/scrape": "true"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{app}-7d9f8b6c5"),
                                 "uid": "3f1c8f8e-0000-4000-8000-000000000001", "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [{"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
                               "time": "2026-01-01T00:00:00Z", "fieldsType": "FieldsV1",
                               "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:app": {}}}, "f:spec": {"f:containers": {}}}},
                              {"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "subresource": "status",
                               "time": "2026-01-01T00:00:05Z", "fieldsType": "FieldsV1",
                               "fieldsV1": {"f:status": {"f:conditions": {}, "f:podIP": {}, "f:podIPs": {}}}}],
        },
        "spec": {
            "nodeName": p.node, "hostNetwork": p.host_network,
            "restartPolicy": "Always", "dnsPolicy": "ClusterFirst", "serviceAccountName": "default",
            "terminationGracePeriodSeconds": 30, "schedulerName": "default-scheduler",
            "containers": [{
                "name": "main", "image": format!("registry.example/{app}:1.4.2"), "imagePullPolicy": "IfNotPresent",
                "ports": ports,
                "env": [{"name": "LOG_LEVEL", "value": "info"}, {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
                "volumeMounts": [{"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}],
                "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
            }],
            "volumes": [{"name": "kube-api-access", "projected": {"sources": [{"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}]}}],
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}],
        },
        "status": {
            "phase": "Running", "hostIP": "192.0.2.1", "podIP": ip,
            "podIPs": p.ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect::<Vec<_>>(),
            "startTime": "2026-01-01T00:00:01Z", "qosClass": "Burstable",
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:05Z"},
                           {"type": "ContainersReady", "status": "True", "lastTransitionTime": "2026-01-01T00:00:05Z"},
                           {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
            "containerStatuses": [{"name": "main", "ready": true, "restartCount": 0, "started": true,
                                   "image": format!("registry.example/{app}:1.4.2"), "imageID": "sha256:0123456789abcdef",
                                   "containerID": "containerd://0123456789abcdef",
                                   "state": {"running": {"startedAt": "2026-01-01T00:00:04Z"}}}],
        },
    })
}

/// Namespaces and policies as API objects, through `generate::to_yaml` (its pods are
/// written by [`pod_json`], which is faster and fatter).
pub fn namespaces_and_policies_json(cluster: &Cluster) -> Vec<Value> {
    let without_pods = Cluster::new(
        cluster.namespaces.values().cloned().collect(),
        Vec::<Pod>::new(),
        cluster.policies.iter().cloned(),
    );
    generate::to_yaml(&without_pods)
        .split("---\n")
        .filter(|doc| !doc.trim().is_empty())
        .map(|doc| yaml_serde::from_str::<Value>(doc).expect("generate::to_yaml writes valid YAML"))
        .collect()
}
