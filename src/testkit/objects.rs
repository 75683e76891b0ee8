//! Builders of Kubernetes objects for tests, as a client would send them (with the fields
//! the agent strips on arrival, so tests can see that it does).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, ContainerPort, Namespace, Pod, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

pub fn labels(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
    Some(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
}

/// A namespace with `labels` (and an annotation the agent never reads).
pub fn namespace(name: &str, l: &[(&str, &str)]) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: labels(l),
            annotations: labels(&[("note", "stripped on arrival")]),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    }
}

/// A running pod on `node` at `ip`, serving TCP 80 named `http` (plus an image, an
/// annotation and a hostIP, which the agent never reads).
pub fn pod(ns: &str, name: &str, node: &str, ip: &str, l: &[(&str, &str)]) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            labels: labels(l),
            annotations: labels(&[("note", "stripped on arrival")]),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            containers: vec![Container {
                name: "app".into(),
                image: Some("registry.example/app:1".into()),
                ports: Some(vec![ContainerPort {
                    name: Some("http".into()),
                    container_port: 80,
                    protocol: Some("TCP".into()),
                    ..ContainerPort::default()
                }]),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(ip.into()),
            host_ip: Some("198.51.100.1".into()),
            ..PodStatus::default()
        }),
    }
}
