//! The real `netpol-check` binary, run in temporary folders: exit codes, output contracts,
//! and the exact message for each kind of bad input.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn netpol_check(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_netpol-check")).current_dir(dir).args(args).output().expect("run netpol-check")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A temp folder holding `bad.yaml` with the given text.
fn with_file(text: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.yaml"), text).unwrap();
    dir
}

/// A NetworkPolicy `default/p` selecting everything, with the given `spec` body lines.
fn policy(spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: p\nspec:\n  podSelector: {{}}\n{spec}"
    )
}

const FOUNDING: &str = "policy-examples/frontend-backend";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

// --- exit codes and contracts ----------------------------------------------------------------

#[test]
fn query_exits_zero_when_allowed_and_one_when_denied() {
    let allowed = netpol_check(
        repo(),
        &["query", "--from", "tenant-a/nginx", "--to", "tenant-a/backend-1", "--port", "80", "-f", FOUNDING],
    );
    assert_eq!(allowed.status.code(), Some(0), "{}", stderr(&allowed));
    assert!(stdout(&allowed).starts_with("ALLOWED"));
    assert!(stdout(&allowed).contains("matched tenant-a/pol1 spec.ingress[0].from[0], ports[0]"));
    let denied = netpol_check(
        repo(),
        &["query", "--from", "tenant-a/debug", "--to", "tenant-a/backend-1", "--port", "80", "-f", FOUNDING],
    );
    assert_eq!(denied.status.code(), Some(1));
    assert!(stdout(&denied).starts_with("DENIED"));
    assert!(stdout(&denied).contains("isolated by tenant-a/pol1, and no rule matches"));
}

#[test]
fn matrix_json_keeps_the_documented_shape() {
    let o = netpol_check(repo(), &["matrix", "-o", "json", "--port", "80,http", "-f", FOUNDING]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["engine"], "evaluator");
    let pods: Vec<&str> = v["pods"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    let mut sorted = pods.clone();
    sorted.sort();
    assert_eq!(pods, sorted, "pods sorted by namespace then name");
    let probes = v["probes"].as_array().unwrap();
    assert_eq!(probes.len(), 2);
    assert_eq!(probes[0]["port"], 80);
    assert_eq!(probes[0]["protocol"], "TCP");
    assert_eq!(probes[1]["port"], "http");
    let allowed = probes[0]["allowed"].as_array().unwrap();
    assert_eq!(allowed.len(), pods.len());
    assert!(allowed.iter().all(|row| row.as_array().unwrap().len() == pods.len()));
    let (nginx, backend) = (
        pods.iter().position(|p| *p == "tenant-a/nginx").unwrap(),
        pods.iter().position(|p| *p == "tenant-a/backend-1").unwrap(),
    );
    assert_eq!(allowed[nginx][backend], true);
    assert_eq!(allowed[backend][backend + 1], false);
}

#[test]
fn matrix_text_is_a_truth_table_with_a_legend_and_no_colour_off_a_terminal() {
    let o = netpol_check(repo(), &["matrix", "--port", "80", "-f", FOUNDING]);
    let text = stdout(&o);
    assert!(text.contains("legend: . allowed   X denied"));
    assert!(text.contains("TCP 80"));
    assert!(text.lines().any(|l| l.contains("tenant-a/debug") && l.contains('X')));
    assert!(!text.contains('\x1b'));
}

#[test]
fn csv_and_yaml_outputs_carry_every_cell() {
    let csv = stdout(&netpol_check(repo(), &["matrix", "-o", "csv", "--port", "80", "-f", FOUNDING]));
    assert_eq!(csv.lines().next(), Some("port,protocol,from,to,allowed"));
    assert_eq!(csv.lines().count(), 1 + 5 * 5);
    assert!(csv.contains("80,TCP,tenant-a/debug,tenant-a/backend-1,false"));
    let yaml = stdout(&netpol_check(repo(), &["matrix", "-o", "yaml", "--port", "80", "-f", FOUNDING]));
    let v: serde_json::Value = yaml_serde::from_str(&yaml).unwrap();
    assert_eq!(v["probes"][0]["allowed"].as_array().unwrap().len(), 5);
}

#[test]
fn stdin_and_namespace_filter_work() {
    let cluster = std::fs::read_to_string(repo().join(FOUNDING).join("cluster.yaml")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_netpol-check"))
        .args(["matrix", "-o", "json", "--port", "80", "-n", "tenant-b", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(cluster.as_bytes()).unwrap();
    let o = child.wait_with_output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["pods"], serde_json::json!(["tenant-b/nginx"]));
}

#[test]
fn workloads_become_pods_with_synthetic_addresses_and_unknown_kinds_warn_once() {
    let dir = with_file(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\nspec:\n  replicas: 3\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers:\n      - name: c\n        ports: [{containerPort: 8080, name: http}]\n\
---\napiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: b}\n",
    );
    let o = netpol_check(dir.path(), &["matrix", "-o", "json", "--synthetic-ipv4", "10.50.0.0/24", "-f", "bad.yaml"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["pods"], serde_json::json!(["shop/web-0", "shop/web-1", "shop/web-2"]));
    assert_eq!(v["probes"][0]["port"], 8080);
    assert_eq!(stderr(&o).matches("skipped kind v1 Service").count(), 1);
    let q = netpol_check(
        dir.path(),
        &[
            "query",
            "--from",
            "10.50.0.1",
            "--to",
            "shop/web-2",
            "--port",
            "http",
            "--synthetic-ipv4",
            "10.50.0.0/24",
            "-f",
            "bad.yaml",
        ],
    );
    assert!(stdout(&q).starts_with("ALLOWED  shop/web-0 -> shop/web-2 TCP/8080"), "{}", stdout(&q));
}

#[test]
fn a_kubectl_list_loads_like_separate_documents() {
    let dir = with_file(
        "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Pod\n  metadata: {name: a, namespace: n}\n  spec: {nodeName: node-1, containers: []}\n  status: {phase: Running, podIP: 10.1.0.1}\n",
    );
    let o = netpol_check(dir.path(), &["explain", "n/a", "-f", "bad.yaml"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("Ingress: not isolated"));
}

#[test]
fn version_and_help_teach() {
    let v = netpol_check(repo(), &["--version"]);
    assert!(stdout(&v).starts_with("netpol-check "));
    let h = netpol_check(repo(), &["--help"]);
    assert!(stdout(&h).contains("Examples:"));
}

// --- bad input: the exact message, exit code 2 -------------------------------------------------

fn assert_error(text: &str, args: &[&str], expected: &str) {
    let dir = with_file(text);
    let mut all = args.to_vec();
    if !args.contains(&"-f") {
        all.extend(["-f", "bad.yaml"]);
    }
    let o = netpol_check(dir.path(), &all);
    assert_eq!(o.status.code(), Some(2), "stdout: {}\nstderr: {}", stdout(&o), stderr(&o));
    let last = stderr(&o).lines().rfind(|l| l.starts_with("error: ")).unwrap_or_default().to_string();
    assert_eq!(last, expected);
}

const MATRIX: &[&str] = &["matrix"];
const P: &str = "NetworkPolicy default/p";

#[test]
fn a_bad_cidr_is_named() {
    assert_error(
        &policy("  ingress:\n  - from:\n    - ipBlock: {cidr: 10.0.0.300/24}\n"),
        MATRIX,
        &format!(
            "error: bad.yaml:1: {P}: spec.ingress[0].from[0].ipBlock.cidr: \"10.0.0.300/24\" is not a valid CIDR (expected e.g. 10.0.0.0/16 or fd00::/64)"
        ),
    );
}

#[test]
fn an_except_outside_its_cidr_is_named() {
    assert_error(
        &policy("  egress:\n  - to:\n    - ipBlock: {cidr: 10.0.0.0/16, except: [10.1.0.0/24]}\n"),
        MATRIX,
        &format!(
            "error: bad.yaml:1: {P}: spec.egress[0].to[0].ipBlock.except[0]: \"10.1.0.0/24\" must be a strict subset of cidr \"10.0.0.0/16\""
        ),
    );
}

#[test]
fn end_port_without_port_is_named() {
    assert_error(
        &policy("  ingress:\n  - ports:\n    - endPort: 90\n"),
        MATRIX,
        &format!(
            "error: bad.yaml:1: {P}: spec.ingress[0].ports[0].endPort: may not be specified when `port` is not specified"
        ),
    );
}

#[test]
fn end_port_below_port_is_named() {
    assert_error(
        &policy("  ingress:\n  - ports:\n    - {port: 90, endPort: 80}\n"),
        MATRIX,
        &format!(
            "error: bad.yaml:1: {P}: spec.ingress[0].ports[0].endPort: 80 must be greater than or equal to `port` (90)"
        ),
    );
}

#[test]
fn end_port_with_a_named_port_is_named() {
    assert_error(
        &policy("  ingress:\n  - ports:\n    - {port: http, endPort: 80}\n"),
        MATRIX,
        &format!(
            "error: bad.yaml:1: {P}: spec.ingress[0].ports[0].endPort: may not be specified when `port` is a named port"
        ),
    );
}

#[test]
fn a_port_out_of_range_is_named() {
    assert_error(
        &policy("  ingress:\n  - ports:\n    - port: 70000\n"),
        MATRIX,
        &format!(
            "error: bad.yaml:1: {P}: spec.ingress[0].ports[0].port: must be between 1 and 65535, inclusive (got 70000)"
        ),
    );
}

#[test]
fn an_unknown_protocol_is_named() {
    assert_error(
        &policy("  ingress:\n  - ports:\n    - {port: 80, protocol: ICMP}\n"),
        MATRIX,
        &format!(
            "error: bad.yaml:1: {P}: spec.ingress[0].ports[0].protocol: unsupported value \"ICMP\": supported values are \"TCP\", \"UDP\", \"SCTP\""
        ),
    );
}

#[test]
fn an_unknown_selector_operator_is_named() {
    assert_error(
        &policy(
            "  ingress:\n  - from:\n    - podSelector:\n        matchExpressions: [{key: app, operator: Equals, values: [a]}]\n",
        ),
        MATRIX,
        &format!(
            "error: bad.yaml:1: {P}: spec.ingress[0].from[0].podSelector.matchExpressions[0].operator: not a valid selector operator \"Equals\": supported values are \"In\", \"NotIn\", \"Exists\", \"DoesNotExist\""
        ),
    );
}

#[test]
fn in_without_values_is_named() {
    assert_error(
        &policy(
            "  ingress:\n  - from:\n    - namespaceSelector:\n        matchExpressions: [{key: team, operator: In}]\n",
        ),
        MATRIX,
        &format!(
            "error: bad.yaml:1: {P}: spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].values: must be specified when `operator` is \"In\""
        ),
    );
}

#[test]
fn exists_with_values_is_named() {
    assert_error(
        &policy(
            "  ingress:\n  - from:\n    - podSelector:\n        matchExpressions: [{key: team, operator: Exists, values: [x]}]\n",
        ),
        MATRIX,
        &format!(
            "error: bad.yaml:1: {P}: spec.ingress[0].from[0].podSelector.matchExpressions[0].values: may not be specified when `operator` is \"Exists\""
        ),
    );
}

#[test]
fn an_invalid_label_key_is_named() {
    assert_error(
        &policy("  ingress:\n  - from:\n    - podSelector: {matchLabels: {\"-bad\": x}}\n"),
        MATRIX,
        &format!(
            "error: bad.yaml:1: {P}: spec.ingress[0].from[0].podSelector.matchLabels: invalid label key \"-bad\": name part must be 1-63 characters of letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        ),
    );
}

#[test]
fn an_invalid_label_value_is_named() {
    assert_error(
        &policy("  ingress:\n  - from:\n    - podSelector: {matchLabels: {app: \"a b\"}}\n"),
        MATRIX,
        &format!(
            "error: bad.yaml:1: {P}: spec.ingress[0].from[0].podSelector.matchLabels[app]: invalid label value \"a b\": must be at most 63 characters of letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        ),
    );
}

#[test]
fn an_unknown_policy_type_is_named() {
    assert_error(
        &policy("  policyTypes: [Ingress, Outgress]\n"),
        MATRIX,
        &format!(
            "error: bad.yaml:1: {P}: spec.policyTypes[1]: unsupported value \"Outgress\": supported values are \"Ingress\", \"Egress\""
        ),
    );
}

#[test]
fn an_ip_block_combined_with_a_selector_is_named() {
    assert_error(
        &policy("  ingress:\n  - from:\n    - ipBlock: {cidr: 10.0.0.0/8}\n      podSelector: {}\n"),
        MATRIX,
        &format!(
            "error: bad.yaml:1: {P}: spec.ingress[0].from[0]: may not specify more than 1 peer: ipBlock cannot be combined with podSelector or namespaceSelector"
        ),
    );
}

#[test]
fn an_empty_peer_is_named() {
    assert_error(
        &policy("  ingress:\n  - from:\n    - {}\n"),
        MATRIX,
        &format!(
            "error: bad.yaml:1: {P}: spec.ingress[0].from[0]: must specify a peer (podSelector, namespaceSelector or ipBlock)"
        ),
    );
}

#[test]
fn a_wrong_type_is_named_with_its_path() {
    assert_error(
        &policy("  ingress:\n  - ports:\n    - port: [80]\n"),
        MATRIX,
        &format!("error: bad.yaml:1: {P}: spec.ingress[0].ports[0].port: invalid type: sequence, expected IntOrString"),
    );
}

#[test]
fn invalid_yaml_names_its_line() {
    assert_error(
        "apiVersion: v1\nkind: Namespace\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: [\n",
        MATRIX,
        "error: bad.yaml:4: invalid YAML at line 7, column 1: did not find expected node content",
    );
}

#[test]
fn an_object_declared_twice_is_named_with_both_places() {
    let ns = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n";
    assert_error(
        &format!("{ns}---\n{ns}"),
        MATRIX,
        "error: bad.yaml:5: Namespace a: declared twice (first at bad.yaml:1)",
    );
}

#[test]
fn an_invalid_pod_ip_is_named() {
    assert_error(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: n}\nspec: {nodeName: x, containers: []}\nstatus: {phase: Running, podIP: 10.0.0.999}\n",
        MATRIX,
        "error: bad.yaml:1: Pod n/a: status.podIP: \"10.0.0.999\" is not a valid IP address",
    );
}

#[test]
fn an_invalid_container_port_name_is_named() {
    assert_error(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: n}\nspec:\n  containers:\n  - name: c\n    ports: [{containerPort: 80, name: much-too-long-port-name}]\n",
        MATRIX,
        "error: bad.yaml:1: Pod n/a: spec.containers[0].ports[0].name: invalid port name \"much-too-long-port-name\": must be 1-15 lower case letters, digits or '-', with at least one letter and no leading, trailing or double '-'",
    );
}

#[test]
fn a_missing_file_is_named() {
    assert_error("", &["matrix", "-f", "nowhere.yaml"], "error: nowhere.yaml: no such file or folder");
}

#[test]
fn an_unknown_pod_in_a_query_is_named() {
    assert_error(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n",
        &["query", "--from", "a/x", "--to", "10.0.0.1", "--port", "80"],
        "error: --from: no pod a/x in the input (pods without an IP, or in a terminal phase, take no part)",
    );
}

#[test]
fn an_unknown_protocol_flag_is_named() {
    assert_error(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n",
        &["matrix", "--protocol", "icmp"],
        "error: --protocol: unknown protocol \"icmp\" (expected TCP, UDP or SCTP)",
    );
}

#[test]
fn a_usage_error_exits_two() {
    let o = netpol_check(repo(), &["matrix"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn the_ruleset_command_prints_each_node_under_a_heading_and_rejects_a_bad_table_name() {
    let o = netpol_check(repo(), &["ruleset", "-f", FOUNDING]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("# ===== node node-1 =====") && text.contains("# ===== node node-2 ====="));
    assert_eq!(text.matches("table inet netpol {").count(), 2);
    let bad = netpol_check(repo(), &["ruleset", "--table", "x;y", "-f", FOUNDING]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("--table: \"x;y\" is not an nftables table name"));
}

#[test]
fn the_ruleset_command_guards_the_pod_cidrs_it_is_given_and_rejects_a_bad_one() {
    let args = ["ruleset", "--node", "node-1", "--pod-cidr", "10.244.1.0/24", "--pod-cidr", "fd00:1::/64", "-f"];
    let o = netpol_check(repo(), &[&args[..], &[FOUNDING]].concat());
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("elements = { 10.244.1.0/24 }") && text.contains("elements = { fd00:1::/64 }"), "{text}");
    assert!(text.contains("ip saddr @pod_cidrs_v4 ip saddr != @local_pods_v4 counter drop"), "{text}");
    let unguarded = stdout(&netpol_check(repo(), &["ruleset", "--node", "node-1", "-f", FOUNDING]));
    assert!(!unguarded.contains("pod_cidrs"), "{unguarded}");
    let bad = netpol_check(repo(), &["ruleset", "--pod-cidr", "10.244.1.0/33", "-f", FOUNDING]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("--pod-cidr"), "{}", stderr(&bad));
}

#[test]
fn a_ruleset_trace_shows_the_chain_that_dropped_the_packet() {
    let o = netpol_check(
        repo(),
        &[
            "query",
            "--engine",
            "ruleset",
            "--trace",
            "--from",
            "tenant-a/debug",
            "--to",
            "tenant-a/backend-1",
            "--port",
            "80",
            "-f",
            FOUNDING,
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    let text = stdout(&o);
    assert!(text.contains("ruleset trace:") && text.contains("node-1 forward: drop"), "{text}");
}

// --- verify and the kernel engine's options (no root needed) -----------------------------------

#[test]
fn verify_of_the_pure_engines_agrees_and_says_what_it_compared() {
    let o = netpol_check(repo(), &["verify", "--engines", "evaluator,ruleset", "-f", FOUNDING]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "verify: evaluator, ruleset agree on all 75 cells (3 probes × primary × pods²; 22 denied by all)\n"
    );
    let j = netpol_check(
        repo(),
        &["verify", "--engines", "ruleset,evaluator", "--family", "ipv4,ipv6", "-o", "json", "-f", FOUNDING],
    );
    assert_eq!(j.status.code(), Some(0), "{}", stderr(&j));
    let v: serde_json::Value = serde_json::from_slice(&j.stdout).unwrap();
    assert_eq!(v["engines"], serde_json::json!(["ruleset", "evaluator"]));
    assert_eq!(v["families"], serde_json::json!(["ipv4", "ipv6"]));
    assert_eq!((v["agree"].as_bool(), v["cells"].as_u64()), (Some(true), Some(150)));
}

#[test]
fn verify_needs_two_different_engines() {
    let one = netpol_check(repo(), &["verify", "--engines", "evaluator", "-f", FOUNDING]);
    assert_eq!(one.status.code(), Some(2));
    assert_eq!(stderr(&one), "error: --engines: name at least two engines to compare (evaluator, ruleset, kernel)\n");
    let twice = netpol_check(repo(), &["verify", "--engines", "ruleset,ruleset", "-f", FOUNDING]);
    assert_eq!(stderr(&twice), "error: --engines: ruleset is named twice\n");
}

#[test]
fn a_bad_probe_timeout_is_refused_before_anything_runs() {
    for (value, reason) in [
        ("soon", "\"soon\" is not a duration (milliseconds like 300 or 300ms, or seconds like 1.5s)"),
        ("2ms", "\"2ms\" is out of range (10ms to 60s)"),
        ("61s", "\"61s\" is out of range (10ms to 60s)"),
    ] {
        let o = netpol_check(repo(), &["matrix", "--engine", "kernel", "--probe-timeout", value, "-f", FOUNDING]);
        assert_eq!(o.status.code(), Some(2));
        assert!(
            stderr(&o).contains(&format!("invalid value '{value}' for '--probe-timeout <DURATION>': {reason}")),
            "{}",
            stderr(&o)
        );
    }
}
