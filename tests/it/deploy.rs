//! The deployment manifests (`deploy/*.yaml`) and the `Dockerfile`, checked without a
//! cluster or a container engine.
//!
//! Every manifest is read into its k8s-openapi type and serialized back; the result must
//! equal the original document, so a misspelt or misplaced field (which serde would
//! silently drop) fails here instead of being ignored by the API server. On top of that,
//! the security properties the deployment promises are asserted one by one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::Parser;
use k8s_openapi::Resource;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, Namespace, PodSpec, Probe, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use netpol::agent::AgentConfig;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

const NAMESPACE: &str = "netpol-system";
const SERVICE_ACCOUNT: &str = "netpol-agent";
const ROLE: &str = "netpol-agent";
const AGENT_BINARY: &str = "/usr/local/bin/netpol-agent";

// ---------------------------------------------------------------- loading

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `deploy/*.yaml` except the kustomization, sorted, as (file name, JSON value).
fn manifests() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(repo().join("deploy")).expect("deploy/ exists") {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !(name.ends_with(".yaml") || name.ends_with(".yml")) || name.starts_with("kustomization.") {
            continue;
        }
        out.push((name, read_yaml(&path)));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(!out.is_empty(), "no manifests in deploy/");
    out
}

fn read_yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    yaml_serde::from_str(&text).unwrap_or_else(|e| panic!("{}: not one YAML document: {e}", path.display()))
}

/// The first path at which two JSON values differ, or `None` if they are equal.
fn first_difference(path: &str, original: &Value, reserialized: &Value) -> Option<String> {
    match (original, reserialized) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            keys.into_iter().find_map(|k| {
                let p = format!("{path}.{k}");
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => first_difference(&p, x, y),
                    (Some(_), None) => Some(format!("{p}: not a field of the typed object (typo or misplaced?)")),
                    (None, Some(_)) => Some(format!("{p}: appears only after re-serialization")),
                    (None, None) => unreachable!(),
                }
            })
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            a.iter().zip(b).enumerate().find_map(|(i, (x, y))| first_difference(&format!("{path}[{i}]"), x, y))
        }
        _ if original == reserialized => None,
        _ => Some(format!("{path}: {original} became {reserialized}")),
    }
}

/// Reads `value` as `K` strictly: serializing the typed object back must give the same
/// JSON, so unknown fields (dropped by serde) and wrongly typed values are errors.
fn strict<K: DeserializeOwned + Serialize>(file: &str, value: &Value) -> Result<K, String> {
    let typed: K = serde_path_to_error::deserialize(value.clone()).map_err(|e| format!("{file}: {e}"))?;
    let back = serde_json::to_value(&typed).map_err(|e| format!("{file}: {e}"))?;
    match first_difference("", value, &back) {
        None => Ok(typed),
        Some(diff) => Err(format!("{file}: {diff}")),
    }
}

/// The one manifest of kind `K`, read strictly.
fn one<K: Resource + DeserializeOwned + Serialize>() -> K {
    let mut found: Vec<K> = manifests()
        .iter()
        .filter(|(_, v)| v["kind"] == K::KIND && v["apiVersion"] == K::API_VERSION)
        .map(|(file, v)| strict::<K>(file, v).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    assert_eq!(found.len(), 1, "expected exactly one {} {}", K::API_VERSION, K::KIND);
    found.pop().unwrap()
}

fn daemonset() -> DaemonSet {
    one::<DaemonSet>()
}

fn pod_spec() -> PodSpec {
    daemonset().spec.expect("DaemonSet.spec").template.spec.expect("DaemonSet.spec.template.spec")
}

fn agent_container() -> Container {
    let spec = pod_spec();
    assert_eq!(spec.containers.len(), 1, "the agent pod has one container");
    assert!(spec.init_containers.is_none(), "no init containers (they would need their own hardening)");
    spec.containers.into_iter().next().unwrap()
}

/// The container's args, parsed by the agent's own command line (so the manifest can
/// only use flags the agent has). `--kubeconfig` points at a throwaway file so that a
/// `KUBECONFIG` in the test's environment cannot interfere.
fn agent_config() -> AgentConfig {
    let kubeconfig = tempfile::NamedTempFile::new().unwrap();
    let c = agent_container();
    assert!(c.command.is_none(), "the image's ENTRYPOINT (netpol-agent) runs; `command` would replace it");
    let args = c.args.unwrap_or_default();
    let argv = ["netpol-agent", "--node", "node-from-downward-api", "--kubeconfig"]
        .into_iter()
        .map(String::from)
        .chain([kubeconfig.path().to_string_lossy().into_owned()])
        .chain(args);
    AgentConfig::try_parse_from(argv).unwrap_or_else(|e| panic!("the DaemonSet's args do not parse: {e}"))
}

fn admin_port() -> u16 {
    agent_config().admin_addr().port()
}

/// The env var's downward-API field path.
fn env_field(name: &str) -> String {
    let env = agent_container().env.expect("env");
    let var = env.iter().find(|e| e.name == name).unwrap_or_else(|| panic!("{name} in env"));
    assert!(var.value.is_none(), "{name} comes from the downward API, not a literal");
    var.value_from.as_ref().and_then(|v| v.field_ref.as_ref()).expect("a fieldRef").field_path.clone()
}

/// The TCP port a probe's httpGet targets, resolving a named port on the container.
fn probe_target(probe: &Probe, container: &Container) -> (String, u16) {
    let get = probe.http_get.as_ref().expect("an httpGet probe");
    let port = match &get.port {
        IntOrString::Int(n) => u16::try_from(*n).expect("a port number"),
        IntOrString::String(name) => {
            let p = container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .unwrap_or_else(|| panic!("probe port `{name}` is not a container port"));
            u16::try_from(p.container_port).unwrap()
        }
    };
    assert!(get.scheme.as_deref().is_none_or(|s| s == "HTTP"), "the admin server speaks plain HTTP");
    (get.path.clone().unwrap_or_default(), port)
}

// ---------------------------------------------------------------- the manifests as a whole

#[test]
fn every_manifest_is_a_known_kind_that_round_trips_without_unknown_fields() {
    for (file, v) in manifests() {
        let kind = (v["apiVersion"].as_str().unwrap_or(""), v["kind"].as_str().unwrap_or(""));
        let checked = match kind {
            ("v1", "Namespace") => strict::<Namespace>(&file, &v).map(drop),
            ("v1", "ServiceAccount") => strict::<ServiceAccount>(&file, &v).map(drop),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => strict::<ClusterRole>(&file, &v).map(drop),
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => strict::<ClusterRoleBinding>(&file, &v).map(drop),
            ("apps/v1", "DaemonSet") => strict::<DaemonSet>(&file, &v).map(drop),
            other => Err(format!("{file}: unexpected kind {other:?}")),
        };
        checked.unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn a_misspelt_field_fails_the_strict_reading() {
    let (file, mut v) = manifests().into_iter().find(|(_, v)| v["kind"] == "DaemonSet").unwrap();
    v["spec"]["template"]["spec"]["hostNetwrok"] = Value::Bool(true);
    let e = strict::<DaemonSet>(&file, &v).unwrap_err();
    assert!(e.contains(".spec.template.spec.hostNetwrok"), "{e}");

    let (file, mut v) = manifests().into_iter().find(|(_, v)| v["kind"] == "ClusterRole").unwrap();
    v["rules"][0]["verb"] = serde_json::json!(["create"]);
    let e = strict::<ClusterRole>(&file, &v).unwrap_err();
    assert!(e.contains(".rules[0].verb"), "{e}");
}

#[test]
fn the_kustomization_lists_every_manifest_and_nothing_else() {
    let k = read_yaml(&repo().join("deploy/kustomization.yaml"));
    let listed: BTreeSet<String> = k["resources"]
        .as_array()
        .expect("kustomization resources")
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    let present: BTreeSet<String> = manifests().into_iter().map(|(f, _)| f).collect();
    assert_eq!(listed, present);
}

#[test]
fn namespaced_objects_live_in_the_agent_namespace() {
    assert_eq!(one::<Namespace>().metadata.name.as_deref(), Some(NAMESPACE));
    assert_eq!(one::<ServiceAccount>().metadata.namespace.as_deref(), Some(NAMESPACE));
    assert_eq!(daemonset().metadata.namespace.as_deref(), Some(NAMESPACE));
}

#[test]
fn the_namespace_admits_the_privileged_agent_under_pod_security_admission() {
    let labels = one::<Namespace>().metadata.labels.unwrap_or_default();
    assert_eq!(labels.get("pod-security.kubernetes.io/enforce").map(String::as_str), Some("privileged"));
}

// ---------------------------------------------------------------- RBAC

#[test]
fn the_cluster_role_grants_only_get_list_watch_on_pods_namespaces_networkpolicies_nodes_and_the_cluster_policy_kinds() {
    let role = one::<ClusterRole>();
    assert_eq!(role.metadata.name.as_deref(), Some(ROLE));
    assert!(role.aggregation_rule.is_none(), "an aggregated role could gain rules from elsewhere");

    let mut granted = BTreeSet::new();
    for rule in role.rules.expect("rules") {
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none(), "{rule:?}");
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    let mut expected = BTreeSet::new();
    // Nodes: every one's labels and addresses (`nodes` peers), and the agent's own pod CIDRs.
    // The cluster policy kinds, and not their CRDs (a missing one is probed by listing it).
    for (group, resource) in [
        ("", "pods"),
        ("", "namespaces"),
        ("networking.k8s.io", "networkpolicies"),
        ("", "nodes"),
        ("policy.networking.k8s.io", "clusternetworkpolicies"),
        ("policy.networking.k8s.io", "adminnetworkpolicies"),
        ("policy.networking.k8s.io", "baselineadminnetworkpolicies"),
    ] {
        for verb in ["get", "list", "watch"] {
            expected.insert((group.to_string(), resource.to_string(), verb.to_string()));
        }
    }
    assert_eq!(granted, expected);
}

#[test]
fn the_binding_binds_the_role_to_the_service_account_in_its_namespace() {
    let binding = one::<ClusterRoleBinding>();
    assert_eq!(binding.role_ref.api_group, "rbac.authorization.k8s.io");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(binding.role_ref.name, ROLE);

    let subjects = binding.subjects.expect("subjects");
    assert_eq!(subjects.len(), 1, "{subjects:?}");
    let s = &subjects[0];
    assert_eq!(s.kind, "ServiceAccount");
    assert_eq!(s.name, SERVICE_ACCOUNT);
    assert_eq!(s.namespace.as_deref(), Some(NAMESPACE));
    assert_eq!(one::<ServiceAccount>().metadata.name.as_deref(), Some(SERVICE_ACCOUNT));
}

// ---------------------------------------------------------------- the DaemonSet

#[test]
fn the_daemonset_runs_as_the_agent_service_account() {
    assert_eq!(pod_spec().service_account_name.as_deref(), Some(SERVICE_ACCOUNT));
}

#[test]
fn the_daemonset_selects_its_own_pods() {
    let spec = daemonset().spec.unwrap();
    let selector = spec.selector.match_labels.expect("matchLabels");
    let labels = spec.template.metadata.and_then(|m| m.labels).expect("template labels");
    for (k, v) in &selector {
        assert_eq!(labels.get(k), Some(v), "selector label {k}");
    }
}

#[test]
fn the_daemonset_is_on_the_host_network_with_cluster_dns() {
    let spec = pod_spec();
    assert_eq!(spec.host_network, Some(true));
    assert_eq!(spec.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_ne!(spec.host_pid, Some(true));
    assert_ne!(spec.host_ipc, Some(true));
}

#[test]
fn the_daemonset_is_node_critical_and_tolerates_every_taint() {
    let spec = pod_spec();
    assert_eq!(spec.priority_class_name.as_deref(), Some("system-node-critical"));
    let tolerations = spec.tolerations.expect("tolerations");
    assert!(
        tolerations.iter().any(|t| t.operator.as_deref() == Some("Exists")
            && t.key.is_none()
            && t.effect.is_none()
            && t.toleration_seconds.is_none()),
        "needs a bare `operator: Exists` toleration: {tolerations:?}"
    );
}

#[test]
fn the_daemonset_rolls_out_one_node_at_a_time() {
    let spec = pod_spec();
    assert_eq!(spec.termination_grace_period_seconds, Some(30));
    let strategy = daemonset().spec.unwrap().update_strategy.expect("updateStrategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.expect("rollingUpdate");
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(1)));
    assert!(matches!(rolling.max_surge, None | Some(IntOrString::Int(0))), "two agents on one host network clash");
}

#[test]
fn the_container_adds_only_net_admin_and_drops_all() {
    let sc = agent_container().security_context.expect("container securityContext");
    let caps = sc.capabilities.expect("capabilities");
    assert_eq!(caps.drop, Some(vec!["ALL".to_string()]));
    assert_eq!(caps.add, Some(vec!["NET_ADMIN".to_string()]));
    assert_ne!(sc.privileged, Some(true));
    assert!(pod_spec().security_context.and_then(|p| p.sysctls).is_none());
}

#[test]
fn the_container_cannot_escalate_privileges_and_has_a_read_only_root_filesystem() {
    let sc = agent_container().security_context.expect("container securityContext");
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_ne!(sc.proc_mount.as_deref(), Some("Unmasked"));
}

#[test]
fn the_pod_mounts_nothing_from_the_host() {
    for volume in pod_spec().volumes.iter().flatten() {
        assert!(volume.host_path.is_none(), "hostPath volume `{}`", volume.name);
    }
}

#[test]
fn the_node_name_comes_from_spec_node_name() {
    assert_eq!(env_field("NODE_NAME"), "spec.nodeName");
}

#[test]
fn the_container_args_are_flags_the_agent_accepts() {
    let config = agent_config();
    assert!(config.admin_addr.is_none(), "the admin address follows HOST_IP, not a fixed address");
    assert!(!config.cleanup_on_exit, "rules must stay in force while the agent restarts");
}

#[test]
fn the_admin_server_listens_on_the_node_ip_from_the_downward_api_not_on_every_address() {
    assert_eq!(env_field("HOST_IP"), "status.hostIP");
    // What the agent makes of the args once the kubelet has filled in HOST_IP.
    let kubeconfig = tempfile::NamedTempFile::new().unwrap();
    let argv = ["netpol-agent", "--node", "n", "--host-ip", "192.0.2.7", "--kubeconfig"]
        .into_iter()
        .map(String::from)
        .chain([kubeconfig.path().to_string_lossy().into_owned()])
        .chain(agent_container().args.unwrap_or_default());
    let config = AgentConfig::try_parse_from(argv).unwrap();
    assert_eq!(config.admin_addr().to_string(), "192.0.2.7:9469");
    assert!(!config.admin_addr().ip().is_unspecified());
}

#[test]
fn the_probes_reach_the_admin_server_on_the_pod_ip_which_is_the_host_ip_on_the_host_network() {
    assert_eq!(pod_spec().host_network, Some(true), "a hostNetwork pod's IP is status.hostIP");
    let c = agent_container();
    for probe in [c.liveness_probe.as_ref().unwrap(), c.readiness_probe.as_ref().unwrap()] {
        let get = probe.http_get.as_ref().unwrap();
        assert!(get.host.is_none(), "no host: kubelet probes the pod IP (= HOST_IP), where the server listens");
    }
}

#[test]
fn the_admin_port_is_declared_so_the_scheduler_sees_the_host_port() {
    let port = admin_port();
    let c = agent_container();
    let declared = c.ports.iter().flatten().find(|p| p.container_port == i32::from(port)).expect("admin port");
    assert!(declared.protocol.as_deref().is_none_or(|p| p == "TCP"));
    assert!(declared.host_port.is_none_or(|h| h == i32::from(port)), "hostNetwork: hostPort equals containerPort");
}

#[test]
fn liveness_and_readiness_probes_hit_healthz_and_readyz_on_the_admin_port() {
    let port = admin_port();
    let c = agent_container();
    let live = c.liveness_probe.as_ref().expect("livenessProbe");
    let ready = c.readiness_probe.as_ref().expect("readinessProbe");
    assert_eq!(probe_target(live, &c), ("/healthz".to_string(), port));
    assert_eq!(probe_target(ready, &c), ("/readyz".to_string(), port));
}

#[test]
fn the_container_has_resource_requests_and_limits() {
    let r = agent_container().resources.expect("resources");
    let requests: BTreeMap<String, Quantity> = r.requests.expect("requests");
    let limits: BTreeMap<String, Quantity> = r.limits.expect("limits");
    // The values come from benches/agent-bench.sh (see the comment in the manifest).
    assert_eq!(requests.get("cpu"), Some(&Quantity("100m".into())));
    assert_eq!(requests.get("memory"), Some(&Quantity("64Mi".into())));
    assert_eq!(limits.get("memory"), Some(&Quantity("448Mi".into())));
    assert!(!limits.contains_key("cpu"), "a CPU limit would throttle syncs");
}

#[test]
fn the_container_runs_the_image_built_from_the_dockerfile() {
    let image = agent_container().image.expect("image");
    assert!(image.starts_with("ghcr.io/netpol/netpol:"), "{image}");
    assert!(!image.ends_with(":latest"), "pin a tag");
}

// ---------------------------------------------------------------- the Dockerfile

/// The Dockerfile as logical instructions (continuations joined, comments dropped),
/// grouped by stage: one `Vec` per `FROM`.
fn dockerfile_stages() -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile");
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part.trim());
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                instructions.push(std::mem::take(&mut current));
            }
        }
    }
    let mut stages: Vec<Vec<String>> = Vec::new();
    for i in instructions {
        if i.to_ascii_uppercase().starts_with("FROM ") {
            stages.push(Vec::new());
        }
        stages.last_mut().expect("the Dockerfile starts with FROM").push(i);
    }
    stages
}

#[test]
fn the_dockerfile_builds_both_binaries_with_the_locked_dependencies_and_the_agent_feature() {
    let stages = dockerfile_stages();
    assert!(stages.len() >= 2, "multi-stage: a builder and a runtime");
    let builder = stages[0].join("\n");
    assert!(builder.contains("cargo build --profile deploy --locked --features agent --bins"), "{builder}");
    assert!(builder.contains("target/deploy/netpol-agent"), "{builder}");
}

#[test]
fn the_shipped_profile_exists_and_keeps_unwinding_for_the_sync_loop() {
    let manifest = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
    let deploy: Vec<&str> = manifest
        .split("\n[")
        .find(|section| section.starts_with("profile.deploy]"))
        .expect("Cargo.toml has [profile.deploy]")
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    assert!(deploy.iter().any(|l| l.replace(' ', "") == "inherits=\"release\""), "{deploy:?}");
    // The agent's sync loop catches a panicking sync and retries; abort would kill the agent.
    assert!(!deploy.iter().any(|l| l.contains("panic")), "{deploy:?}");
}

#[test]
fn the_dockerfile_runtime_stage_installs_nftables_and_runs_netpol_agent() {
    let stages = dockerfile_stages();
    let runtime = stages.last().unwrap();
    assert!(runtime[0].contains("debian:bookworm-slim"), "{}", runtime[0]);

    let installs_nft = runtime.iter().any(|i| {
        let words: Vec<&str> = i.split_whitespace().collect();
        words.first().is_some_and(|w| w.eq_ignore_ascii_case("RUN"))
            && words.windows(2).any(|w| w == ["apt-get", "install"])
            && words.contains(&"nftables")
    });
    assert!(installs_nft, "the runtime stage must apt-get install nftables: {runtime:#?}");

    let copies = runtime
        .iter()
        .filter(|i| i.to_ascii_uppercase().starts_with("COPY "))
        .flat_map(|i| i.split_whitespace())
        .collect::<Vec<_>>();
    assert!(copies.iter().any(|w| w.ends_with("/netpol-agent")), "{copies:?}");
    assert!(copies.iter().any(|w| w.ends_with("/netpol-check")), "{copies:?}");

    let entrypoints: Vec<&String> =
        runtime.iter().filter(|i| i.to_ascii_uppercase().starts_with("ENTRYPOINT")).collect();
    let last = entrypoints.last().expect("an ENTRYPOINT in the runtime stage");
    let exec_form: Vec<String> =
        serde_json::from_str(last["ENTRYPOINT".len()..].trim()).expect("ENTRYPOINT in exec (JSON) form");
    assert_eq!(exec_form, vec![AGENT_BINARY.to_string()]);
}

#[test]
fn the_docker_context_leaves_out_build_output_and_git() {
    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).expect(".dockerignore");
    let entries: BTreeSet<&str> = ignore.lines().map(str::trim).filter(|l| !l.starts_with('#')).collect();
    assert!(entries.contains("target/") || entries.contains("target"), "{entries:?}");
    assert!(entries.contains(".git/") || entries.contains(".git"), "{entries:?}");
}
