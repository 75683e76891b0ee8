//! `netpol-check --cluster`: the real binary, through the real kube client, against the
//! fake API server (plain HTTP) seeded with the objects of a bundled example. It must answer
//! exactly as for the same example's files, and fail with exit code 2 and a message that
//! names the kind and what to do when it cannot read the cluster.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use netpol::k8s::load::{read_sources, split_documents};
use netpol::testkit::apiserver::{FakeApiServer, Kind};
use serde_json::{Value, json};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The objects of files or folders under the repository, as an API server would store them:
/// every document but the conformance `Expectation`s (not Kubernetes objects).
fn objects_of(path: &str) -> Vec<Value> {
    let sources = read_sources(&[repo().join(path)]).expect("the example reads");
    let mut out = Vec::new();
    for source in sources {
        for (_, doc) in split_documents(&source.text) {
            let value: Value = yaml_serde::from_str(&doc).expect("the example is YAML");
            if !value.is_null() && value["kind"] != "Expectation" {
                out.push(value);
            }
        }
    }
    out
}

/// A fake API server on its own runtime, and a kubeconfig pointing at it.
struct LiveCluster {
    // Dropped before the runtime that serves it.
    server: FakeApiServer,
    runtime: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
}

impl LiveCluster {
    /// A server with no CRD installed, and no object.
    fn empty() -> LiveCluster {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("a runtime");
        let server = runtime.block_on(FakeApiServer::start()).expect("the fake API server starts");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("kubeconfig"), server.kubeconfig_yaml()).unwrap();
        LiveCluster { server, runtime, dir }
    }

    /// A server holding the objects of `path`, with the CRDs of the cluster policy kinds
    /// it has installed (in the version it uses).
    fn with(path: &str) -> LiveCluster {
        let cluster = LiveCluster::empty();
        cluster.apply(objects_of(path));
        cluster
    }

    fn apply(&self, objects: Vec<Value>) {
        let _guard = self.runtime.enter();
        for object in objects {
            let kind = object["kind"].as_str().unwrap_or_default();
            let crd = Kind::CRDS.into_iter().find(|k| k.as_str() == kind);
            if let Some(crd) = crd {
                self.server.install_crd_version(crd, object["apiVersion"].as_str().unwrap());
            }
            self.server.apply_json(object).expect("the fake stores the object");
        }
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// Runs netpol-check in the repository with KUBECONFIG naming this server, and nothing
    /// that would make it find another cluster.
    fn run(&self, args: &[&str]) -> Output {
        netpol_check(args, &[("KUBECONFIG", self.kubeconfig().as_os_str())])
    }
}

fn netpol_check(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Output {
    let home = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_netpol-check"));
    command
        .current_dir(repo())
        .args(args)
        .env("HOME", home.path())
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("run netpol-check")
}

/// Runs `args` once with `-f path` and once with `--cluster`, and asserts the same exit
/// code and the same bytes on stdout.
fn assert_same_answer(cluster: &LiveCluster, path: &str, args: &[&str]) {
    let from_files = netpol_check(&[args, &["-f", path]].concat(), &[]);
    let from_cluster = cluster.run(&[args, &["--cluster"]].concat());
    assert!(from_files.status.code().is_some_and(|c| c < 2), "{args:?} -f {path}: {}", stderr(&from_files));
    assert_eq!(from_cluster.status.code(), from_files.status.code(), "{args:?} --cluster: {}", stderr(&from_cluster));
    assert!(!stdout(&from_files).is_empty(), "{args:?}: no output");
    assert_eq!(stdout(&from_cluster), stdout(&from_files), "{args:?}: --cluster answers otherwise than -f {path}");
}

#[test]
fn every_command_answers_from_the_cluster_as_from_the_same_objects_in_files() {
    let path = "policy-examples/frontend-backend";
    let cluster = LiveCluster::with(path);
    for args in [
        &["matrix"][..],
        &["matrix", "-o", "json", "--port", "80,http"],
        &["query", "--from", "tenant-a/nginx", "--to", "tenant-a/backend-1", "--port", "80"],
        &["query", "--from", "tenant-a/debug", "--to", "tenant-a/backend-1", "--port", "80", "-o", "json"],
        &["explain", "tenant-a/backend-1"],
        &["ruleset"],
        &["ruleset", "-o", "json"],
        &["verify", "--engines", "evaluator,ruleset"],
        &["lint"],
    ] {
        assert_same_answer(&cluster, path, args);
    }
}

#[test]
fn admin_and_baseline_policies_are_read_from_the_cluster_as_from_files() {
    let path = "policy-examples/tier-legacy-admin-baseline";
    let cluster = LiveCluster::with(path);
    for args in
        [&["matrix"][..], &["explain", "tenant-a/web"], &["ruleset"], &["verify", "--engines", "evaluator,ruleset"]]
    {
        assert_same_answer(&cluster, path, args);
    }
}

#[test]
fn cluster_network_policies_with_node_peers_are_read_in_the_version_the_server_serves() {
    // v1alpha2 only: the v1beta1 list answers 404 and the next version is read.
    let path = "tests/conformance/tiers/002-cnp-admin-egress-node-peers.yaml";
    let cluster = LiveCluster::with(path);
    for args in [&["matrix"][..], &["ruleset"], &["lint"]] {
        assert_same_answer(&cluster, path, args);
    }
    assert!(cluster.server.list_requests(Kind::ClusterNetworkPolicy) >= 1);
}

#[test]
fn a_server_without_the_policy_crds_has_no_cluster_policies_and_is_no_error() {
    let path = "policy-examples/frontend-backend";
    let cluster = LiveCluster::with(path);
    let out = cluster.run(&["matrix", "--cluster"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stderr(&out), "", "a missing CRD is said nothing about");
    assert_same_answer(&cluster, path, &["matrix"]);
}

#[test]
fn services_are_read_from_the_cluster_as_from_files() {
    let path = "tests/fixtures/services";
    let cluster = LiveCluster::with(path);
    for args in [
        &["query", "--from", "shop/client", "--to", "svc/shop/web", "--port", "http"][..],
        &["query", "--from", "shop/client", "--to", "svc/shop/web", "--port", "http", "-o", "json"],
        &["matrix", "--services", "--port", "80"],
        &["matrix", "--services", "--port", "80", "-o", "json"],
    ] {
        assert_same_answer(&cluster, path, args);
    }
    assert!(cluster.server.list_requests(Kind::Service) >= 1);
}

#[test]
fn a_service_field_newer_than_netpol_is_dropped_as_for_pods() {
    let cluster = LiveCluster::with("tests/fixtures/services");
    // A Service field netpol's API types do not know: no policy sees a Service, so it
    // cannot change a verdict, and a newer cluster must stay readable.
    cluster.apply(vec![json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
                 "someFutureField": {"mode": "x"}}})]);
    let out = cluster.run(&["query", "--from", "shop/monitor", "--to", "svc/shop/web", "--port", "80", "--cluster"]);
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).starts_with("svc/shop/web TCP/80 (http) -> targetPort http: 3 endpoints"), "{}", stdout(&out));
}

#[test]
fn a_cluster_without_a_service_of_that_name_says_so() {
    let cluster = LiveCluster::with("policy-examples/frontend-backend");
    let out =
        cluster.run(&["query", "--from", "tenant-a/nginx", "--to", "svc/tenant-a/web", "--port", "80", "--cluster"]);
    let from_files = netpol_check(
        &[
            "query",
            "--from",
            "tenant-a/nginx",
            "--to",
            "svc/tenant-a/web",
            "--port",
            "80",
            "-f",
            "policy-examples/frontend-backend",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(stderr(&out), stderr(&from_files));
}

#[test]
fn forbidden_services_exit_2_naming_them() {
    let cluster = LiveCluster::with("tests/fixtures/services");
    cluster.server.forbid(Kind::Service);
    let out = cluster.run(&["query", "--from", "shop/client", "--to", "svc/shop/web", "--port", "http", "--cluster"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(stdout(&out), "", "nothing but the answer goes to stdout");
    let err = stderr(&out);
    assert!(err.contains("listing services (v1): forbidden ("), "{err}");
    assert!(err.contains("netpol-check needs `list` on services"), "{err}");
}

#[test]
fn commands_that_use_no_service_neither_list_services_nor_need_the_right_to() {
    let cluster = LiveCluster::with("tests/fixtures/services");
    cluster.server.forbid(Kind::Service);
    let out = cluster.run(&["matrix", "--port", "80", "--cluster"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let files = netpol_check(&["matrix", "--port", "80", "-f", "tests/fixtures/services"], &[]);
    assert_eq!(stdout(&out), stdout(&files));
    assert_eq!(cluster.server.list_requests(Kind::Service), 0);
}

#[test]
fn big_lists_are_read_in_pages() {
    let cluster = LiveCluster::empty();
    let pods: Vec<Value> = (0..1200)
        .map(|i| {
            json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("p{i:04}"), "namespace": "default", "labels": {"app": "a"}},
                "spec": {"nodeName": "node-1", "containers": [{"name": "c", "ports": [{"containerPort": 80}]}]},
                "status": {"phase": "Running", "podIP": format!("10.1.{}.{}", i / 200, i % 200 + 1)}})
        })
        .collect();
    cluster.apply(vec![json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}})]);
    cluster.apply(pods);
    let out = cluster.run(&["explain", "default/p1199", "--cluster"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("default/p1199"), "{}", stdout(&out));
    // 1200 pods at 500 a page: three list requests.
    assert_eq!(cluster.server.list_requests(Kind::Pod), 3);
}

#[test]
fn a_forbidden_kind_exits_2_naming_it_and_the_permission_to_ask_for() {
    let cluster = LiveCluster::with("policy-examples/frontend-backend");
    cluster.server.forbid(Kind::NetworkPolicy);
    let out = cluster.run(&["matrix", "--cluster"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(stdout(&out), "", "nothing but the answer goes to stdout");
    let err = stderr(&out);
    assert!(err.starts_with("error: cluster at http://127.0.0.1:"), "{err}");
    assert!(err.contains("listing networkpolicies (networking.k8s.io/v1): forbidden ("), "{err}");
    assert!(err.contains("netpol-check needs `list` on networkpolicies"), "{err}");
}

#[test]
fn a_forbidden_crd_kind_is_an_error_not_none() {
    let cluster = LiveCluster::with("policy-examples/tier-legacy-admin-baseline");
    cluster.server.forbid(Kind::AdminNetworkPolicy);
    let out = cluster.run(&["matrix", "--cluster"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("listing adminnetworkpolicies (policy.networking.k8s.io/v1alpha1): forbidden"));
}

#[test]
fn an_unreachable_server_exits_2_saying_so() {
    let cluster = LiveCluster::empty();
    let port = cluster.server.addr().port();
    drop(cluster);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: gone\n  cluster:\n    server: http://127.0.0.1:{port}\n\
             contexts:\n- name: gone\n  context:\n    cluster: gone\n    user: u\ncurrent-context: gone\n\
             users:\n- name: u\n  user: {{}}\n"
        ),
    )
    .unwrap();
    let out = netpol_check(&["matrix", "--cluster"], &[("KUBECONFIG", kubeconfig.as_os_str())]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "cluster at http://127.0.0.1:{port}/: listing namespaces (v1): cannot reach the API server ("
        )),
        "{err}"
    );
    assert!(err.contains("check the server address of the kubeconfig's context"), "{err}");
}

#[test]
fn no_kubeconfig_and_no_pod_exits_2_saying_what_to_set() {
    let missing = tempfile::tempdir().unwrap().path().join("nowhere");
    let out = netpol_check(&["matrix", "--cluster"], &[("KUBECONFIG", missing.as_os_str())]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.starts_with("error: --cluster: no cluster to read ("), "{err}");
    assert!(err.contains("set KUBECONFIG or give --kubeconfig PATH"), "{err}");
}

#[test]
fn context_and_kubeconfig_choose_the_cluster() {
    let cluster = LiveCluster::with("policy-examples/frontend-backend");
    // The current context points nowhere; --context fake is the fake server.
    let text = cluster.server.kubeconfig_yaml().replace("current-context: fake", "current-context: other");
    let text = text
        .replacen("contexts:\n", "contexts:\n- name: other\n  context:\n    cluster: nowhere\n    user: fake\n", 1)
        .replacen("clusters:\n", "clusters:\n- name: nowhere\n  cluster:\n    server: http://127.0.0.1:1\n", 1);
    let path = cluster.dir.path().join("two-contexts");
    std::fs::write(&path, text).unwrap();
    let path = path.to_str().unwrap();
    let current = netpol_check(&["matrix", "--cluster", "--kubeconfig", path], &[]);
    assert_eq!(current.status.code(), Some(2), "the current context's server is down");
    let chosen = netpol_check(&["matrix", "--cluster", "--kubeconfig", path, "--context", "fake"], &[]);
    assert_eq!(chosen.status.code(), Some(0), "{}", stderr(&chosen));
    let unknown = netpol_check(&["matrix", "--cluster", "--kubeconfig", path, "--context", "nope"], &[]);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(stderr(&unknown).contains("--context nope"), "{}", stderr(&unknown));
}

#[test]
fn context_needs_cluster_and_cluster_excludes_files() {
    let out = netpol_check(&["matrix", "--context", "x", "-f", "policy-examples/frontend-backend"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--cluster"), "{}", stderr(&out));
    let out = netpol_check(&["matrix", "--cluster", "-f", "policy-examples/frontend-backend"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("cannot be used with"), "{}", stderr(&out));
}

#[test]
fn a_policy_the_model_cannot_represent_is_an_error_naming_it_and_lenient_fails_it_closed() {
    let cluster = LiveCluster::with("policy-examples/frontend-backend");
    // The fake does not validate: a CIDR the real API server would refuse is stored.
    cluster.apply(vec![json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "bad", "namespace": "tenant-a"},
        "spec": {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.300/8"}}]}]}})]);
    let out = cluster.run(&["matrix", "--cluster"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("NetworkPolicy tenant-a/bad: spec.ingress[0].from[0].ipBlock.cidr: "), "{err}");

    // Allowed without the policy (nginx is not isolated); its fail-closed stand-in isolates
    // every pod of tenant-a for ingress and allows nothing.
    let query = ["query", "--from", "tenant-a/backend-1", "--to", "tenant-a/nginx", "--port", "80", "--cluster"];
    let lenient = cluster.run(&[&query[..], &["--lenient"]].concat());
    assert_eq!(lenient.status.code(), Some(1), "{}", stdout(&lenient));
    assert!(stderr(&lenient).contains("enforced fail-closed, as netpol-agent does"), "{}", stderr(&lenient));
}

#[test]
fn an_unknown_field_of_a_policy_from_the_cluster_is_refused_unless_lenient() {
    let cluster = LiveCluster::with("policy-examples/frontend-backend");
    // A field of a newer API than netpol's: it may change what the policy allows.
    cluster.apply(vec![json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "newer", "namespace": "tenant-a"},
        "spec": {"podSelector": {}, "ingress": [{"fromCIDRGroups": ["x"]}]}})]);
    let out = cluster.run(&["matrix", "--cluster"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains(
            "NetworkPolicy tenant-a/newer: strict decoding error: unknown field \"spec.ingress[0].fromCIDRGroups\""
        ),
        "{}",
        stderr(&out)
    );
    let lenient = cluster.run(&["matrix", "--cluster", "--lenient"]);
    assert_eq!(lenient.status.code(), Some(0), "{}", stderr(&lenient));
}

#[test]
fn diff_of_the_cluster_against_files_shows_the_change() {
    let cluster = LiveCluster::with("policy-examples/frontend-backend");
    let same = cluster.run(&["diff", "--cluster", "policy-examples/frontend-backend"]);
    assert_eq!(same.status.code(), Some(0), "{}{}", stdout(&same), stderr(&same));

    // The new state: the same example without its policy.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(repo().join("policy-examples/frontend-backend/cluster.yaml"), dir.path().join("cluster.yaml"))
        .unwrap();
    let new = dir.path().to_str().unwrap();
    let changed = cluster.run(&["diff", "--cluster", new]);
    assert_eq!(changed.status.code(), Some(1), "{}", stderr(&changed));
    let from_files = netpol_check(&["diff", "policy-examples/frontend-backend", new], &[]);
    assert_eq!(stdout(&changed), stdout(&from_files), "cluster vs files reads as files vs files");
    assert!(stdout(&changed).contains("tenant-a/pol1"), "{}", stdout(&changed));

    let two = cluster.run(&["diff", "--cluster", new, new]);
    assert_eq!(two.status.code(), Some(2));
    assert!(stderr(&two).contains("--cluster: give NEW only (the live cluster is OLD)"), "{}", stderr(&two));
}
