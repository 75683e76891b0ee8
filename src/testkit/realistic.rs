//! Pods as a Deployment's pods look on the wire of a real cluster, for the fake API server
//! to serve at benchmark scale.
//!
//! ```text
//!  model::Pod (name, namespace, labels, node, IPs, ports, hostNetwork)
//!        │ deployment_pod
//!        ▼
//!  JSON Pod: what the model says, plus everything a real pod carries that the agent
//!  never reads (ownerReferences, managedFields, 3 containers, an init container,
//!  env, probes, volumes, tolerations, status conditions and container statuses)
//! ```
//!
//! The shape follows a pod of a Kubernetes 1.33 Deployment as `kubectl get pod -o json`
//! shows it: the controller-manager's and the kubelet's `managedFields` entries (the
//! kubelet's on the `status` subresource), the projected service-account token volume the
//! admission plugin adds (`kube-api-access-<5 chars>`: token, `kube-root-ca.crt`, the
//! namespace through the downward API), a `pod-template-hash` label that is the same for
//! pods of one template (the model pod's labels and images), the two `NoExecute` tolerations the
//! DefaultTolerationSeconds plugin adds, and the five conditions a running pod reports. A
//! pod is 9-10 KB of JSON, as real ones of this kind are. Everything the agent reads
//! (`metadata.name/namespace/labels`, `spec.nodeName`, `spec.hostNetwork`,
//! `spec.containers[*].ports`, `status.phase/podIP/podIPs`) comes from the model pod, so the
//! agent converts it back to that pod.

use std::net::IpAddr;

use serde_json::{Map, Value, json};

use crate::policy::model::Pod;

/// A stable 32-bit digest of `text` (FNV-1a), for uids, hashes and image digests that
/// differ between pods and stay the same from run to run.
fn digest(text: &str) -> u32 {
    text.bytes().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

/// `n` hex digits derived from `seed`.
fn hex(seed: &str, n: usize) -> String {
    let mut out = String::with_capacity(n + 8);
    let mut i = 0u32;
    while out.len() < n {
        out.push_str(&format!("{:08x}", digest(&format!("{seed}/{i}"))));
        i += 1;
    }
    out.truncate(n);
    out
}

fn uid(seed: &str) -> String {
    let h = hex(seed, 32);
    format!("{}-{}-4{}-8{}-{}", &h[0..8], &h[8..12], &h[13..16], &h[17..20], &h[20..32])
}

/// The pod `p` as a Deployment's pod: see the module documentation.
pub fn deployment_pod(p: &Pod) -> Value {
    let app = p.labels.get("app").cloned().unwrap_or_else(|| p.id.name.clone());
    let image = format!("registry.example.com/apps/{app}");
    // The Deployment controller labels a pod with a hash of its pod template: the same
    // template (labels, images, ...) gives the same hash, whichever namespace it runs in.
    let hash = hex(&format!("{:?}/{image}", p.labels), 10);
    let replica_set = format!("{app}-{hash}");
    let rs_uid = uid(&format!("rs/{}/{replica_set}", p.id.namespace));
    let pod_uid = uid(&format!("pod/{}/{}", p.id.namespace, p.id.name));
    let token_volume = format!("kube-api-access-{}", &hex(&pod_uid, 5));
    let mut labels: Map<String, Value> = p.labels.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
    labels.insert("pod-template-hash".into(), hash.clone().into());
    let ports: Vec<Value> = p
        .ports
        .iter()
        .map(|port| {
            let mut entry = json!({"containerPort": port.port, "protocol": port.protocol.as_str()});
            if let Some(name) = &port.name {
                entry["name"] = name.clone().into();
            }
            entry
        })
        .collect();
    let ips: Vec<String> = p.ips.iter().map(IpAddr::to_string).collect();
    let host_ip = format!("172.18.{}.{}", digest(&p.node) % 250, 1 + digest(&p.node) % 250);
    let started = "2026-11-30T08:14:07Z";
    let env = json!([
        {"name": "APP_NAME", "value": app},
        {"name": "APP_ENV", "value": "production"},
        {"name": "LOG_LEVEL", "value": "info"},
        {"name": "HTTP_PORT", "value": "8080"},
        {"name": "GOMAXPROCS", "valueFrom": {"resourceFieldRef": {"containerName": "app", "divisor": "0", "resource": "limits.cpu"}}},
        {"name": "GOMEMLIMIT", "valueFrom": {"resourceFieldRef": {"containerName": "app", "divisor": "0", "resource": "limits.memory"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}}},
        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "spec.nodeName"}}},
        {"name": "DATABASE_URL", "valueFrom": {"secretKeyRef": {"key": "url", "name": format!("{app}-db")}}},
        {"name": "FEATURE_FLAGS", "valueFrom": {"configMapKeyRef": {"key": "flags", "name": format!("{app}-config")}}},
        {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://otel-collector.observability.svc:4317"},
    ]);
    let mounts = |extra: &[Value]| -> Value {
        let mut all = extra.to_vec();
        all.push(json!({"mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "name": token_volume, "readOnly": true}));
        Value::Array(all)
    };
    let restricted = json!({"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]},
                            "readOnlyRootFilesystem": true, "runAsNonRoot": true, "runAsUser": 10001});
    let containers = json!([
        {
            "name": "app", "image": format!("{image}:v2.14.3"), "imagePullPolicy": "IfNotPresent",
            "command": ["/usr/local/bin/server"],
            "args": ["--config=/etc/app/config.yaml", "--listen=:8080", "--metrics-listen=:9090"],
            "env": env, "ports": ports,
            "resources": {"limits": {"cpu": "1", "memory": "512Mi"}, "requests": {"cpu": "250m", "memory": "256Mi"}},
            "livenessProbe": {"failureThreshold": 3, "httpGet": {"path": "/healthz", "port": 8080, "scheme": "HTTP"},
                              "initialDelaySeconds": 10, "periodSeconds": 10, "successThreshold": 1, "timeoutSeconds": 1},
            "readinessProbe": {"failureThreshold": 3, "httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTP"},
                               "periodSeconds": 5, "successThreshold": 1, "timeoutSeconds": 1},
            "securityContext": restricted,
            "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
            "volumeMounts": mounts(&[json!({"mountPath": "/etc/app", "name": "config", "readOnly": true}),
                                     json!({"mountPath": "/tmp", "name": "tmp"})]),
        },
        {
            "name": "log-shipper", "image": "registry.example.com/platform/fluent-bit:3.1.9", "imagePullPolicy": "IfNotPresent",
            "args": ["--config=/fluent-bit/etc/fluent-bit.yaml"],
            "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}},
                    {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}}],
            "resources": {"limits": {"memory": "64Mi"}, "requests": {"cpu": "20m", "memory": "32Mi"}},
            "securityContext": restricted,
            "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
            "volumeMounts": mounts(&[json!({"mountPath": "/var/log/app", "name": "tmp", "readOnly": true})]),
        },
    ]);
    let init_containers = json!([{
        "name": "migrate", "image": format!("{image}-migrations:v2.14.3"), "imagePullPolicy": "IfNotPresent",
        "command": ["/usr/local/bin/migrate", "up"],
        "env": [{"name": "DATABASE_URL", "valueFrom": {"secretKeyRef": {"key": "url", "name": format!("{app}-db")}}}],
        "resources": {"limits": {"memory": "128Mi"}, "requests": {"cpu": "50m", "memory": "64Mi"}},
        "securityContext": restricted,
        "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
        "volumeMounts": mounts(&[]),
    }]);
    let ready_at = "2026-11-30T08:14:19Z";
    let condition =
        |t: &str, at: &str| json!({"lastProbeTime": null, "lastTransitionTime": at, "status": "True", "type": t});
    let container_status = |name: &str, image: &str| {
        json!({
            "containerID": format!("containerd://{}", hex(&format!("{pod_uid}/{name}"), 64)),
            "image": image, "imageID": format!("{}@sha256:{}", image.split(':').next().unwrap_or(image), hex(image, 64)),
            "lastState": {}, "name": name, "ready": true, "restartCount": 0, "started": true,
            "state": {"running": {"startedAt": "2026-11-30T08:14:12Z"}},
        })
    };
    let ip_keys: Map<String, Value> =
        ips.iter().map(|ip| (format!("k:{{\"ip\":\"{ip}\"}}"), json!({".": {}, "f:ip": {}}))).collect();
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "annotations": {
                "kubectl.kubernetes.io/restartedAt": "2026-11-30T08:13:58Z",
                "prometheus.io/scrape": "true", "prometheus.io/port": "9090", "prometheus.io/path": "/metrics",
                "checksum/config": hex(&format!("{}/{app}/config", p.id.namespace), 64),
            },
            "creationTimestamp": "2026-11-30T08:14:02Z",
            "generateName": format!("{replica_set}-"),
            "labels": labels,
            "managedFields": [
                {"apiVersion": "v1", "fieldsType": "FieldsV1", "manager": "kube-controller-manager", "operation": "Update",
                 "time": "2026-11-30T08:14:02Z",
                 "fieldsV1": {
                     "f:metadata": {"f:annotations": {".": {}, "f:checksum/config": {}, "f:kubectl.kubernetes.io/restartedAt": {},
                                                      "f:prometheus.io/path": {}, "f:prometheus.io/port": {}, "f:prometheus.io/scrape": {}},
                                    "f:generateName": {}, "f:labels": {".": {}, "f:app": {}, "f:pod-template-hash": {}},
                                    "f:ownerReferences": {".": {}, format!("k:{{\"uid\":\"{rs_uid}\"}}"): {}}},
                     "f:spec": {"f:containers": {"k:{\"name\":\"app\"}": {".": {}, "f:args": {}, "f:command": {}, "f:env": {".": {}},
                                                                        "f:image": {}, "f:imagePullPolicy": {}, "f:livenessProbe": {".": {}},
                                                                        "f:name": {}, "f:ports": {".": {}}, "f:readinessProbe": {".": {}},
                                                                        "f:resources": {".": {}}, "f:securityContext": {".": {}},
                                                                        "f:volumeMounts": {".": {}}},
                                                "k:{\"name\":\"log-shipper\"}": {".": {}, "f:args": {}, "f:image": {}, "f:name": {},
                                                                                "f:resources": {".": {}}, "f:volumeMounts": {".": {}}}},
                                "f:dnsPolicy": {}, "f:enableServiceLinks": {},
                                "f:initContainers": {".": {}, "k:{\"name\":\"migrate\"}": {".": {}, "f:command": {}, "f:image": {}, "f:name": {}}},
                                "f:restartPolicy": {}, "f:schedulerName": {}, "f:securityContext": {".": {}},
                                "f:terminationGracePeriodSeconds": {}, "f:volumes": {".": {}}},
                 }},
                {"apiVersion": "v1", "fieldsType": "FieldsV1", "manager": "kubelet", "operation": "Update",
                 "subresource": "status", "time": ready_at,
                 "fieldsV1": {"f:status": {
                     "f:conditions": {"k:{\"type\":\"ContainersReady\"}": {".": {}, "f:lastProbeTime": {}, "f:lastTransitionTime": {}, "f:status": {}, "f:type": {}},
                                      "k:{\"type\":\"Initialized\"}": {".": {}, "f:lastProbeTime": {}, "f:lastTransitionTime": {}, "f:status": {}, "f:type": {}},
                                      "k:{\"type\":\"PodReadyToStartContainers\"}": {".": {}, "f:lastProbeTime": {}, "f:lastTransitionTime": {}, "f:status": {}, "f:type": {}},
                                      "k:{\"type\":\"Ready\"}": {".": {}, "f:lastProbeTime": {}, "f:lastTransitionTime": {}, "f:status": {}, "f:type": {}}},
                     "f:containerStatuses": {}, "f:hostIP": {}, "f:hostIPs": {}, "f:initContainerStatuses": {},
                     "f:phase": {}, "f:podIP": {}, "f:podIPs": Value::Object(ip_keys), "f:startTime": {},
                 }}},
            ],
            "name": p.id.name, "namespace": p.id.namespace,
            "ownerReferences": [{"apiVersion": "apps/v1", "blockOwnerDeletion": true, "controller": true,
                                 "kind": "ReplicaSet", "name": replica_set, "uid": rs_uid}],
            "uid": pod_uid,
        },
        "spec": {
            "containers": containers,
            "dnsPolicy": "ClusterFirst", "enableServiceLinks": true,
            "initContainers": init_containers,
            "nodeName": p.node.as_str(),
            "preemptionPolicy": "PreemptLowerPriority", "priority": 0, "restartPolicy": "Always",
            "schedulerName": "default-scheduler",
            "securityContext": {"fsGroup": 10001, "runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
            "serviceAccount": app, "serviceAccountName": app,
            "terminationGracePeriodSeconds": 30,
            "tolerations": [
                {"effect": "NoExecute", "key": "node.kubernetes.io/not-ready", "operator": "Exists", "tolerationSeconds": 300},
                {"effect": "NoExecute", "key": "node.kubernetes.io/unreachable", "operator": "Exists", "tolerationSeconds": 300},
            ],
            "volumes": [
                {"configMap": {"defaultMode": 420, "name": format!("{app}-config")}, "name": "config"},
                {"emptyDir": {"sizeLimit": "256Mi"}, "name": "tmp"},
                {"name": token_volume, "projected": {"defaultMode": 420, "sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {"configMap": {"items": [{"key": "ca.crt", "path": "ca.crt"}], "name": "kube-root-ca.crt"}},
                    {"downwardAPI": {"items": [{"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}, "path": "namespace"}]}},
                ]}},
            ],
        },
        "status": {
            "conditions": [
                condition("PodReadyToStartContainers", "2026-11-30T08:14:05Z"),
                condition("Initialized", "2026-11-30T08:14:11Z"),
                condition("Ready", ready_at),
                condition("ContainersReady", ready_at),
                condition("PodScheduled", "2026-11-30T08:14:02Z"),
            ],
            "containerStatuses": [
                container_status("app", &format!("{image}:v2.14.3")),
                container_status("log-shipper", "registry.example.com/platform/fluent-bit:3.1.9"),
            ],
            "hostIP": host_ip, "hostIPs": [{"ip": host_ip}],
            "initContainerStatuses": [{
                "containerID": format!("containerd://{}", hex(&format!("{pod_uid}/migrate"), 64)),
                "image": format!("{image}-migrations:v2.14.3"),
                "imageID": format!("{image}-migrations@sha256:{}", hex(&format!("{image}-migrations"), 64)),
                "lastState": {}, "name": "migrate", "ready": true, "restartCount": 0, "started": false,
                "state": {"terminated": {"containerID": format!("containerd://{}", hex(&format!("{pod_uid}/migrate"), 64)),
                                         "exitCode": 0, "finishedAt": "2026-11-30T08:14:10Z", "reason": "Completed",
                                         "startedAt": "2026-11-30T08:14:06Z"}},
            }],
            "phase": "Running",
            "podIPs": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>(),
            "qosClass": "Burstable",
            "startTime": started,
        },
    });
    if let Some(ip) = ips.first() {
        pod["status"]["podIP"] = ip.clone().into();
    }
    if p.host_network {
        pod["spec"]["hostNetwork"] = true.into();
    }
    pod
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::convert::{self, PodOutcome};
    use crate::policy::model::{ContainerPort, Protocol};

    fn model_pod() -> Pod {
        let mut pod = (*crate::policy::model::test_pod("shop", "web-7d9f8b6c5-x2x8q", &[("app", "web")])).clone();
        pod.node = "node-7".into();
        pod.ips = crate::policy::model::PodIps::try_from(vec!["10.1.2.3".parse::<IpAddr>().unwrap()]).unwrap();
        pod.ports = vec![ContainerPort { name: Some("http".into()), port: 8080, protocol: Protocol::Tcp }].into();
        pod
    }

    #[test]
    fn a_deployment_pod_is_as_large_as_a_real_one_and_converts_back_to_its_model_pod() {
        let pod = model_pod();
        let json = deployment_pod(&pod);
        let bytes = serde_json::to_vec(&json).unwrap().len();
        assert!((5_000..10_000).contains(&bytes), "{bytes} bytes");
        let full: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json).unwrap();
        assert_eq!(full.spec.as_ref().unwrap().containers.len(), 2);
        assert_eq!(full.metadata.managed_fields.as_ref().unwrap().len(), 2);
        // Every replica of a Deployment carries its template's hash as a label.
        let mut labels = (*pod.labels).clone();
        labels.insert("pod-template-hash".into(), full.metadata.labels.as_ref().unwrap()["pod-template-hash"].clone());
        let expected = crate::policy::model::Pod { labels: labels.into(), ..pod };
        assert_eq!(convert::pod(&full, None).unwrap(), PodOutcome::Pod(expected));
    }
}
