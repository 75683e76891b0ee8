//! The real `netpol-check` binary, run in temporary folders: exit codes, output contracts,
//! and the exact message for each kind of bad input.

use crate::common;
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
---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: b}\n",
    );
    let o = netpol_check(dir.path(), &["matrix", "-o", "json", "--synthetic-ipv4", "10.50.0.0/24", "-f", "bad.yaml"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["pods"], serde_json::json!(["shop/web-0", "shop/web-1", "shop/web-2"]));
    assert_eq!(v["probes"][0]["port"], 8080);
    assert_eq!(stderr(&o).matches("skipped kind v1 ConfigMap").count(), 1);
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
fn a_key_given_twice_in_one_mapping_is_refused_with_its_line_not_resolved_silently() {
    // Which podSelector did the author mean? The API server refuses the object; so do we.
    assert_error(
        &policy("  podSelector:\n    matchLabels: {app: web}\n  policyTypes: [Ingress]\n"),
        MATRIX,
        "error: bad.yaml:1: invalid YAML at line 6, column 3: spec: key `podSelector` given twice in one mapping",
    );
}

#[test]
fn a_key_given_twice_in_a_json_object_is_refused_too() {
    assert_error(
        "{\"apiVersion\": \"v1\", \"kind\": \"Pod\",\n \"metadata\": {\"name\": \"a\", \"labels\": {\"app\": \"web\", \"app\": \"db\"}}}\n",
        MATRIX,
        "error: bad.yaml:1: invalid YAML at line 2, column 38: metadata.labels: key `app` given twice in one mapping",
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

/// The table and node name rules are netpol-agent's, word for word (src/agent/config.rs): a
/// ruleset printed here is one the agent would load under the same names.
#[test]
fn the_ruleset_command_checks_table_and_node_names_as_the_agent_does() {
    let longest = format!("t{}", "_".repeat(254));
    let o = netpol_check(repo(), &["ruleset", "--node", "node-1", "--table", &longest, "-f", FOUNDING]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).starts_with(&format!("table inet {longest} {{")), "{}", stdout(&o));
    let too_long = format!("{longest}x");
    let o = netpol_check(repo(), &["ruleset", "--table", &too_long, "-f", FOUNDING]);
    assert_eq!(
        stderr(&o),
        format!(
            "error: --table: {too_long:?} is not an nftables table name (a letter, then letters, digits or '_'; at most 255)\n"
        )
    );
    let o = netpol_check(repo(), &["ruleset", "--node", "a..b", "-f", FOUNDING]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        stderr(&o),
        "error: --node: \"a..b\" is not a valid name: must be dot-separated parts of lower case letters, digits or '-', each starting and ending with a letter or digit, at most 253 characters in all\n"
    );
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
    assert!(
        stderr(&bad).contains(
            "invalid value '10.244.1.0/33' for '--pod-cidr <CIDR>': \"10.244.1.0/33\" is not a valid CIDR (expected e.g. 10.0.0.0/16 or fd00::/64)"
        ),
        "{}",
        stderr(&bad)
    );
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
        ("soon", "\"soon\" is not a duration (a number and a unit: 500ms, 1.5s, 5m, 1h)"),
        // netpol-agent gives the same message for `--node-wait 300` (src/agent/config.rs).
        ("300", "\"300\" has no unit (write 300ms or 300s)"),
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

// --- issue 15: the answer the API server would give ---------------------------------------------

/// Two running pods `default/a` and `default/b` on node-1, then the given documents.
fn two_pods_and(docs: &str) -> String {
    let pod = |name: &str, ip: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {{app: {name}}}}}\nspec:\n  nodeName: node-1\n  containers:\n  - name: c\n    ports: [{{containerPort: 80, name: http}}]\nstatus: {{phase: Running, podIP: {ip}}}\n"
        )
    };
    format!("{}---\n{}---\n{docs}", pod("a", "10.1.0.1"), pod("b", "10.1.0.2"))
}

fn query_in(text: &str, from: &str, to: &str, extra: &[&str]) -> Output {
    let dir = with_file(text);
    let mut args = vec!["query", "--from", from, "--to", to, "--port", "80", "-f", "bad.yaml"];
    args.extend(extra);
    netpol_check(dir.path(), &args)
}

#[test]
fn empty_policy_types_isolate_ingress_as_the_api_server_defaults_them() {
    let o = query_in(&two_pods_and(&policy("  policyTypes: []\n")), "default/b", "default/a", &[]);
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).starts_with("DENIED"), "{}", stdout(&o));
}

#[test]
fn an_empty_egress_list_without_policy_types_does_not_isolate_egress() {
    let text = two_pods_and(&policy("  egress: []\n"));
    let out = query_in(&text, "default/a", "192.0.2.1", &[]);
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    // Ingress is still isolated: "all policies are assumed to affect ingress".
    let inside = query_in(&text, "default/b", "default/a", &[]);
    assert_eq!(inside.status.code(), Some(1), "{}", stdout(&inside));
}

#[test]
fn an_unknown_field_is_a_strict_decoding_error_with_its_path() {
    assert_error(
        &two_pods_and(&policy("  ingress:\n  - fromm:\n    - podSelector: {matchLabels: {app: a}}\n")),
        MATRIX,
        &format!("error: bad.yaml:21: {P}: strict decoding error: unknown field \"spec.ingress[0].fromm\""),
    );
    assert_error(
        &policy("  ingress:\n  - from:\n    - podSelector: {matchLabel: {app: a}}\n"),
        MATRIX,
        &format!(
            "error: bad.yaml:1: {P}: strict decoding error: unknown field \"spec.ingress[0].from[0].podSelector.matchLabel\""
        ),
    );
}

#[test]
fn unknown_fields_of_pods_namespaces_and_workload_templates_are_errors_but_status_is_not_checked() {
    assert_error(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: a, lables: {x: y}}\n",
        MATRIX,
        "error: bad.yaml:1: Namespace a: strict decoding error: unknown field \"metadata.lables\"",
    );
    assert_error(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers:\n      - name: c\n        port: [{containerPort: 80}]\n",
        MATRIX,
        "error: bad.yaml:1: Deployment default/web: strict decoding error: unknown field \"spec.template.spec.containers[0].port\"",
    );
    let dir = with_file(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {nodeName: n, containers: []}\nstatus: {phase: Running, podIP: 10.0.0.1, someFutureField: 1}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: s}\nspec: {anything: 1}\n",
    );
    let o = netpol_check(dir.path(), &["explain", "default/a", "-f", "bad.yaml"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn lenient_turns_an_unknown_field_into_a_warning() {
    let dir = with_file(&two_pods_and(&policy("  ingress:\n  - fromm:\n    - podSelector: {}\n")));
    let o = netpol_check(
        dir.path(),
        &["query", "--lenient", "--from", "default/b", "--to", "default/a", "--port", "80", "-f", "bad.yaml"],
    );
    assert!(
        stderr(&o).contains(&format!(
            "warning: bad.yaml:21: {P}: strict decoding error: unknown field \"spec.ingress[0].fromm\""
        )),
        "{}",
        stderr(&o)
    );
    // The rule without the unknown field has no peers: it allows everyone, as the API server
    // would store it with the field dropped.
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
}

#[test]
fn lenient_enforces_a_policy_that_fails_validation_fail_closed_as_the_agent_does_and_says_so() {
    // Selects app=a, would allow everyone, but its ipBlock is no CIDR.
    let bad = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: p\nspec:\n  podSelector: {matchLabels: {app: a}}\n  ingress:\n  - from:\n    - ipBlock: {cidr: 10.0.0.0/33}\n";
    let text = two_pods_and(bad);
    let strict = query_in(&text, "default/b", "default/a", &[]);
    assert_eq!(strict.status.code(), Some(2), "without --lenient it is an error: {}", stderr(&strict));

    let o = query_in(&text, "default/b", "default/a", &["--lenient"]);
    assert_eq!(o.status.code(), Some(1), "a is isolated and nothing is allowed: {}", stdout(&o));
    assert!(stderr(&o).contains("spec.ingress[0].from[0].ipBlock.cidr"), "{}", stderr(&o));
    assert!(stderr(&o).contains("enforced fail-closed"), "{}", stderr(&o));
    assert!(stdout(&o).contains("default/p allows nothing: it is enforced fail-closed"), "{}", stdout(&o));
    // b is not selected: untouched.
    assert_eq!(query_in(&text, "default/a", "default/b", &["--lenient"]).status.code(), Some(0));

    let dir = with_file(&text);
    let explain = netpol_check(dir.path(), &["explain", "default/a", "--lenient", "-f", "bad.yaml"]);
    assert!(stdout(&explain).contains("(p allows nothing: it is enforced fail-closed"), "{}", stdout(&explain));
    // Every engine agrees on it.
    for engine in ["evaluator", "ruleset"] {
        let m =
            netpol_check(dir.path(), &["matrix", "--lenient", "--engine", engine, "--port", "80", "-f", "bad.yaml"]);
        assert!(
            stdout(&m).contains("(3 of 4 allowed)") && stdout(&m).contains("2 default/b  X ."),
            "{engine}: {}",
            stdout(&m)
        );
    }
}

#[test]
fn a_kind_we_read_in_an_unknown_version_has_no_matches() {
    for (api_version, kind) in [
        ("extensions/v1beta1", "NetworkPolicy"),
        ("networking.k8s.io/V1", "NetworkPolicy"),
        ("networking.k8s.io/v1", "networkpolicy"),
    ] {
        let text =
            format!("apiVersion: {api_version}\nkind: {kind}\nmetadata: {{name: p}}\nspec: {{podSelector: {{}}}}\n");
        assert_error(
            &text,
            MATRIX,
            &format!(
                "error: bad.yaml:1: {kind} default/p: no matches for kind \"{kind}\" in version \"{api_version}\""
            ),
        );
    }
}

#[test]
fn a_digit_only_port_name_is_rejected_as_the_api_server_does() {
    assert_error(
        &policy("  ingress:\n  - ports:\n    - port: \"80\"\n"),
        MATRIX,
        &format!(
            "error: bad.yaml:1: {P}: spec.ingress[0].ports[0].port: invalid port name \"80\": must be 1-15 lower case letters, digits or '-', with at least one letter and no leading, trailing or double '-'"
        ),
    );
}

/// `kubectl get all -o yaml`: a Deployment, its ReplicaSet and its one pod, linked by uid.
const LIVE_DUMP: &str = r#"apiVersion: v1
kind: List
items:
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: web, namespace: shop, uid: d-1}
  spec:
    replicas: 1
    selector: {matchLabels: {app: web}}
    template:
      metadata: {labels: {app: web}}
      spec: {containers: [{name: c, ports: [{containerPort: 80}]}]}
- apiVersion: apps/v1
  kind: ReplicaSet
  metadata:
    name: web-5d9
    namespace: shop
    uid: r-1
    ownerReferences: [{apiVersion: apps/v1, kind: Deployment, name: web, uid: d-1, controller: true}]
  spec:
    replicas: 1
    selector: {matchLabels: {app: web}}
    template:
      metadata: {labels: {app: web}}
      spec: {containers: [{name: c, ports: [{containerPort: 80}]}]}
- apiVersion: v1
  kind: Pod
  metadata:
    name: web-5d9-x2x
    namespace: shop
    labels: {app: web}
    ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-5d9, uid: r-1, controller: true}]
  spec: {nodeName: node-1, containers: [{name: c, ports: [{containerPort: 80}]}]}
  status: {phase: Running, podIP: 10.1.0.7}
"#;

fn matrix_pods(dir: &Path, args: &[&str]) -> Vec<String> {
    let mut all = vec!["matrix", "-o", "json"];
    all.extend(args);
    let o = netpol_check(dir, &all);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["pods"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect()
}

#[test]
fn a_live_dump_counts_each_pod_once_and_its_workloads_make_none() {
    let dir = with_file(LIVE_DUMP);
    assert_eq!(matrix_pods(dir.path(), &["-f", "bad.yaml"]), vec!["shop/web-5d9-x2x"]);
}

#[test]
fn a_raw_typed_list_a_byte_order_mark_and_concatenated_json_load_as_kubectl_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let raw = r#"{"kind":"PodList","apiVersion":"v1","items":[{"metadata":{"name":"a","namespace":"n"},"spec":{"nodeName":"node-1","containers":[]},"status":{"phase":"Running","podIP":"10.1.0.1"}}]}"#;
    std::fs::write(dir.path().join("raw.json"), raw).unwrap();
    assert_eq!(matrix_pods(dir.path(), &["-f", "raw.json"]), vec!["n/a"]);
    let pod = |name: &str, ip: &str| {
        format!(
            r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"{name}","namespace":"n"}},"spec":{{"nodeName":"node-1","containers":[]}},"status":{{"phase":"Running","podIP":"{ip}"}}}}"#
        )
    };
    std::fs::write(dir.path().join("stream.json"), format!("{}\n{}", pod("a", "10.1.0.1"), pod("b", "10.1.0.2")))
        .unwrap();
    assert_eq!(matrix_pods(dir.path(), &["-f", "stream.json"]), vec!["n/a", "n/b"]);
    std::fs::write(dir.path().join("bom.json"), format!("\u{feff}{}", pod("a", "10.1.0.1"))).unwrap();
    assert_eq!(matrix_pods(dir.path(), &["-f", "bom.json"]), vec!["n/a"]);
    std::fs::write(
        dir.path().join("bom.yaml"),
        format!("\u{feff}apiVersion: v1\nkind: Namespace\nmetadata: {{name: a}}\n---\n{}", pod("p", "10.1.0.3")),
    )
    .unwrap();
    assert_eq!(matrix_pods(dir.path(), &["-f", "bom.yaml"]), vec!["n/p"]);
}

#[test]
fn two_live_pods_with_one_ip_are_an_error_naming_both_and_lenient_keeps_the_first() {
    let text = two_pods_and(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: c, namespace: default}\nspec: {nodeName: node-2, containers: []}\nstatus: {phase: Running, podIP: 10.1.0.1}\n",
    );
    assert_error(
        &text,
        MATRIX,
        "error: bad.yaml:21: Pod default/c: status.podIP: 10.1.0.1 is also the IP of Pod default/a (bad.yaml:1); two live pods cannot share an address (only hostNetwork pods of one node, which are that node, may)",
    );
    let dir = with_file(&text);
    let o = netpol_check(dir.path(), &["matrix", "-o", "json", "--lenient", "-f", "bad.yaml"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stderr(&o)
            .contains("warning: bad.yaml:21: Pod default/c: status.podIP: 10.1.0.1 is also the IP of Pod default/a"),
        "{}",
        stderr(&o)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["pods"], serde_json::json!(["default/a", "default/b"]));
}

/// A hostNetwork pod `default/hn` on node-1 (the node's IP 192.168.0.10), pod `default/a`
/// there too (it reports that host IP), and a policy that denies all ingress.
fn host_network_cluster() -> String {
    let hn = "apiVersion: v1\nkind: Pod\nmetadata: {name: hn, namespace: default}\nspec: {nodeName: node-1, hostNetwork: true, containers: []}\nstatus: {phase: Running, podIP: 192.168.0.10, hostIP: 192.168.0.10}\n";
    let other = "apiVersion: v1\nkind: Pod\nmetadata: {name: far, namespace: default}\nspec: {nodeName: node-2, containers: []}\nstatus: {phase: Running, podIP: 10.1.0.9, hostIP: 192.168.0.20}\n";
    two_pods_and(&format!("{hn}---\n{other}---\n{}", policy("  policyTypes: [Ingress]\n")))
}

#[test]
fn a_host_network_pod_or_node_ip_in_a_query_means_that_node() {
    let text = host_network_cluster();
    for engine in ["evaluator", "ruleset"] {
        for from in ["default/hn", "192.168.0.10"] {
            let o = query_in(&text, from, "default/a", &["--engine", engine]);
            assert_eq!(o.status.code(), Some(0), "{engine} --from {from}: {}{}", stdout(&o), stderr(&o));
        }
        // node-2's address (known from the host IP its pod reports) is node-2: not a's node.
        let o = query_in(&text, "192.168.0.20", "default/far", &["--engine", engine]);
        assert_eq!(o.status.code(), Some(0), "{engine} node-2 to its own pod: {}{}", stdout(&o), stderr(&o));
        let o = query_in(&text, "192.168.0.20", "default/a", &["--engine", engine]);
        assert_eq!(o.status.code(), Some(1), "{engine} node-2 to node-1's pod: {}{}", stdout(&o), stderr(&o));
    }
    let help = netpol_check(repo(), &["query", "--help"]);
    assert!(stdout(&help).contains("status.hostIP"), "{}", stdout(&help));
}

/// Runs `args` with stdout a pipe whose reader is gone before anything is written.
fn with_closed_stdout(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_netpol-check"))
        .current_dir(repo())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    child.wait_with_output().unwrap()
}

#[test]
fn a_closed_pipe_never_panics_and_keeps_the_exit_code() {
    let denied = with_closed_stdout(&[
        "query",
        "--from",
        "tenant-a/debug",
        "--to",
        "tenant-a/backend-1",
        "--port",
        "80",
        "-f",
        FOUNDING,
    ]);
    assert_eq!(denied.status.code(), Some(1), "{}", stderr(&denied));
    let denied_json = with_closed_stdout(&[
        "query",
        "-o",
        "json",
        "--from",
        "tenant-a/debug",
        "--to",
        "tenant-a/backend-1",
        "--port",
        "80",
        "-f",
        FOUNDING,
    ]);
    assert_eq!(denied_json.status.code(), Some(1), "{}", stderr(&denied_json));
    let explain = with_closed_stdout(&["explain", "tenant-a/backend-1", "-f", FOUNDING]);
    assert_eq!(explain.status.code(), Some(0), "{}", stderr(&explain));
    let cleanup = with_closed_stdout(&["lab", "cleanup", "--dry-run"]);
    assert!(matches!(cleanup.status.code(), Some(0 | 2)), "{:?} {}", cleanup.status, stderr(&cleanup));
    for o in [&denied, &denied_json, &explain, &cleanup] {
        assert!(!stderr(o).contains("panicked"), "{}", stderr(o));
    }
}

#[test]
fn deeply_nested_yaml_is_refused_before_parsing() {
    let deep = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: a}}\nspec: {}{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    assert_error(
        &deep,
        MATRIX,
        "error: bad.yaml:1: nesting deeper than 128 levels at line 4 (a Kubernetes object is never this deep)",
    );
}

#[test]
fn a_port_name_no_pod_declares_warns() {
    let o = netpol_check(repo(), &["matrix", "--port", "nosuch", "-f", FOUNDING]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("warning: --port nosuch: no pod declares a port of that name; every cell is denied"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn ipv6_probes_on_an_ipv4_only_cluster_are_an_error() {
    let o = netpol_check(repo(), &["matrix", "--family", "ipv6", "-f", FOUNDING]);
    assert_eq!(o.status.code(), Some(2), "{}", stdout(&o));
    assert_eq!(stderr(&o), "error: --family ipv6: no pod of the input has an IPv6 address\n");
}

#[test]
fn a_synthetic_range_of_the_wrong_family_is_refused() {
    let o = netpol_check(repo(), &["matrix", "--synthetic-ipv4", "fd00::/64", "-f", FOUNDING]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--synthetic-ipv4: fd00::/64 is not an IPv4 range"), "{}", stderr(&o));
    let o = netpol_check(repo(), &["matrix", "--synthetic-ipv6", "10.0.0.0/8", "-f", FOUNDING]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--synthetic-ipv6: 10.0.0.0/8 is not an IPv6 range"), "{}", stderr(&o));
}

#[test]
fn a_cidr_is_not_an_endpoint() {
    assert_error(
        &two_pods_and(""),
        &["query", "--from", "10.0.2.0/24", "--to", "default/a", "--port", "80"],
        "error: --from: \"10.0.2.0/24\" is a CIDR, not an endpoint (give one IP address, or NAMESPACE/POD)",
    );
}

#[test]
fn an_error_inside_a_list_keeps_its_items_path() {
    assert_error(
        "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Namespace\n  metadata: {name: a}\n- apiVersion: networking.k8s.io/v1\n  kind: NetworkPolicy\n  metadata: {name: p}\n  spec:\n    podSelector: {}\n    ingress:\n    - ports: [{port: 0}]\n",
        MATRIX,
        &format!(
            "error: bad.yaml:1: {P}: items[1].spec.ingress[0].ports[0].port: must be between 1 and 65535, inclusive (got 0)"
        ),
    );
}

#[test]
fn a_matrix_with_nothing_to_probe_says_so() {
    let dir = with_file("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n");
    let o = netpol_check(dir.path(), &["matrix", "-f", "bad.yaml"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("warning: nothing to probe: the input has no pods that take part"), "{}", stderr(&o));
    let dir = with_file(&two_pods_and("").replace("    ports: [{containerPort: 80, name: http}]\n", ""));
    let o = netpol_check(dir.path(), &["matrix", "-f", "bad.yaml"]);
    assert!(
        stderr(&o).contains("warning: nothing to probe: no pod declares a port and no policy names one (give --port)"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_host_network_pod_or_node_ip_in_a_kernel_query_means_that_node_too() {
    if !common::kernel_or_skip() {
        return;
    }
    let text = host_network_cluster();
    for (from, to, code) in
        [("192.168.0.10", "default/a", 0), ("192.168.0.20", "default/far", 0), ("192.168.0.20", "default/a", 1)]
    {
        let o = query_in(&text, from, to, &["--engine", "kernel"]);
        assert_eq!(o.status.code(), Some(code), "kernel {from} -> {to}: {}{}", stdout(&o), stderr(&o));
    }
}

#[test]
fn an_empty_container_port_protocol_defaults_to_tcp_as_the_api_server_does() {
    let text =
        two_pods_and("").replace("{containerPort: 80, name: http}", "{containerPort: 80, name: http, protocol: \"\"}");
    let dir = with_file(&text);
    let o = netpol_check(
        dir.path(),
        &["query", "--from", "default/b", "--to", "default/a", "--port", "http", "-f", "bad.yaml"],
    );
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).starts_with("ALLOWED  default/b -> default/a TCP/80"), "{}", stdout(&o));
}

// --- cluster-wide tiers: ClusterNetworkPolicy, AdminNetworkPolicy, Node, --resolve ------------

/// A ClusterNetworkPolicy `p` (v1beta1, Admin tier, priority 10, every namespace) with the
/// given `spec` body lines.
fn cluster_policy(spec: &str) -> String {
    format!(
        "apiVersion: policy.networking.k8s.io/v1beta1\nkind: ClusterNetworkPolicy\nmetadata:\n  name: p\nspec:\n  tier: Admin\n  priority: 10\n  subject: {{namespaces: {{}}}}\n{spec}"
    )
}

const CNP: &str = "ClusterNetworkPolicy p";

#[test]
fn a_bad_cluster_network_policy_is_named_with_its_field() {
    assert_error(
        &cluster_policy("  egress:\n  - action: Deny\n    to: [{domainNames: [example.com]}]\n"),
        MATRIX,
        &format!(
            "error: bad.yaml:1: {CNP}: spec.egress[0].to[0].domainNames: is only supported in Accept rules (this rule's action is Deny)"
        ),
    );
    assert_error(
        &cluster_policy("  egress:\n  - action: Accept\n    to: [{networks: [10.0.0.1/8]}]\n"),
        &["query", "--from", "10.0.0.1", "--to", "10.0.0.2", "--port", "80"],
        &format!(
            "error: bad.yaml:1: {CNP}: spec.egress[0].to[0].networks[0]: \"10.0.0.1/8\" has host bits set: write 10.0.0.0/8"
        ),
    );
}

#[test]
fn an_unknown_field_of_a_cluster_policy_file_is_named_with_its_path() {
    assert_error(
        &cluster_policy("  ingress:\n  - action: Accept\n    from: [{namespace: {}}]\n"),
        MATRIX,
        &format!(
            "error: bad.yaml:1: {CNP}: strict decoding error: unknown field \"spec.ingress[0].from[0].namespace\""
        ),
    );
}

#[test]
fn an_admin_network_policy_in_an_unknown_version_names_the_versions_read() {
    assert_error(
        "apiVersion: policy.networking.k8s.io/v1beta1\nkind: AdminNetworkPolicy\nmetadata: {name: a}\nspec: {}\n",
        MATRIX,
        "error: bad.yaml:1: AdminNetworkPolicy a: no matches for kind \"AdminNetworkPolicy\" in version \"policy.networking.k8s.io/v1beta1\" (netpol reads AdminNetworkPolicy in policy.networking.k8s.io/v1alpha1)",
    );
}

#[test]
fn a_baseline_admin_network_policy_not_named_default_is_refused() {
    assert_error(
        "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: BaselineAdminNetworkPolicy\nmetadata: {name: strict}\nspec: {subject: {namespaces: {}}}\n",
        MATRIX,
        "error: bad.yaml:1: BaselineAdminNetworkPolicy strict: metadata.name: must be \"default\" (got \"strict\"): there is one BaselineAdminNetworkPolicy in a cluster",
    );
}

#[test]
fn resolve_is_taken_by_every_command_that_loads_and_changes_no_answer_of_the_examples() {
    let resolve = ["--resolve", "example.com=203.0.113.7", "--resolve", "Example.COM.=2001:db8::7"];
    let commands: &[&[&str]] = &[
        &["matrix", "-f", FOUNDING],
        &["query", "--from", "tenant-a/nginx", "--to", "tenant-a/backend-1", "--port", "80", "-f", FOUNDING],
        &["explain", "tenant-a/backend-1", "-f", FOUNDING],
        &["ruleset", "-f", FOUNDING],
    ];
    for args in commands {
        let plain = netpol_check(repo(), args);
        let with: Vec<&str> = args.iter().copied().chain(resolve).collect();
        let resolved = netpol_check(repo(), &with);
        assert_eq!(resolved.status.code(), plain.status.code(), "{args:?}: {}", stderr(&resolved));
        assert_eq!(stdout(&resolved), stdout(&plain), "{args:?}");
    }
}

#[test]
fn a_bad_resolve_value_is_named_and_exits_2() {
    let tiers = cluster_policy("  egress:\n  - action: Accept\n    to: [{domainNames: [example.com]}]\n");
    assert_error(
        &tiers,
        &["matrix", "--resolve", "example.com"],
        "error: invalid value 'example.com' for '--resolve <NAME=IP>': \"example.com\" is not NAME=IP (e.g. example.com=203.0.113.7)",
    );
    assert_error(
        &tiers,
        &["explain", "a/b", "--resolve", "example.com=203.0.113.300"],
        "error: invalid value 'example.com=203.0.113.300' for '--resolve <NAME=IP>': \"203.0.113.300\" is not an IPv4 or IPv6 address",
    );
    assert_error(
        &tiers,
        &["ruleset", "--resolve", "*.example.com=203.0.113.7"],
        "error: invalid value '*.example.com=203.0.113.7' for '--resolve <NAME=IP>': \"*.example.com\" is not a domain name: must be two or more dot-separated labels of letters, digits, '-' or '_' (each starting and ending with a letter or digit), without a '*'",
    );
}

#[test]
fn a_node_objects_internal_ip_is_that_node_in_a_query() {
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: a}\nspec: {nodeName: worker-1, containers: [{name: c, image: x}]}\nstatus: {podIP: 10.244.0.5}\n";
    let node = "apiVersion: v1\nkind: Node\nmetadata: {name: worker-1}\nstatus:\n  addresses: [{type: InternalIP, address: 192.168.1.10}]\n";
    let query = ["query", "--from", "192.168.1.10", "--to", "a/p", "--port", "80", "-f", "bad.yaml"];
    let without = with_file(pod);
    let o = netpol_check(without.path(), &query);
    assert!(stdout(&o).starts_with("ALLOWED  192.168.1.10 -> a/p"), "no Node: an outside address\n{}", stdout(&o));
    let with = with_file(&format!("{pod}---\n{node}"));
    let o = netpol_check(with.path(), &query);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("ALLOWED  node/worker-1 -> a/p TCP/80"), "{}", stdout(&o));
}

// --- the cluster-wide tiers ------------------------------------------------------------------

const TENANTS: &str = "policy-examples/tier-tenant-isolation";

#[test]
fn query_names_the_tier_policy_priority_and_rule_that_denied_a_connection() {
    let o = netpol_check(
        repo(),
        &["query", "-f", TENANTS, "--from", "tenant-b/web", "--to", "tenant-a/web", "--port", "80"],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.starts_with("DENIED  tenant-b/web -> tenant-a/web TCP/80\n"), "{text}");
    assert!(
        text.contains(
            "ingress to tenant-a/web: DENIED by ClusterNetworkPolicy tenant-a-isolation (Admin, priority 10) ingress rule \"deny-other-tenants\"\n  matched spec.ingress[1].from[0]: Deny from all pods in namespaces with tenant, on all traffic"
        ),
        "{text}"
    );
}

#[test]
fn query_shows_the_pass_that_handed_a_connection_to_the_network_policy_that_decided_it() {
    let o = netpol_check(
        repo(),
        &["query", "-f", TENANTS, "--from", "tenant-a/web", "--to", "tenant-a/db", "--port", "5432"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let text = stdout(&o);
    let pass = text.find("passed on to the NetworkPolicy tier by ClusterNetworkPolicy tenant-a-isolation (Admin, priority 10) ingress rule \"tenant-a-decides-its-own\"");
    let decided = text.find("matched tenant-a/db-from-web spec.ingress[0].from[0], ports[0]");
    assert!(pass.is_some() && decided.is_some() && pass < decided, "the Pass, then the NetworkPolicy rule:\n{text}");
}

#[test]
fn query_json_carries_the_cluster_policy_decision_and_the_passes() {
    let o = netpol_check(
        repo(),
        &["query", "-o", "json", "-f", TENANTS, "--from", "tenant-a/web", "--to", "tenant-a/db", "--port", "5432"],
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(v["ingress"]["decision"]["policy"], "tenant-a/db-from-web");
    let pass = &v["ingress"]["passed"][0];
    assert_eq!(pass["clusterPolicy"], "ClusterNetworkPolicy tenant-a-isolation");
    assert_eq!((&pass["tier"], &pass["priority"], &pass["action"]), (&"Admin".into(), &10.into(), &"Pass".into()));
    assert_eq!(pass["ruleName"], "tenant-a-decides-its-own");
    let denied = netpol_check(
        repo(),
        &["query", "-o", "json", "-f", TENANTS, "--from", "tenant-b/web", "--to", "tenant-a/web", "--port", "80"],
    );
    let v: serde_json::Value = serde_json::from_slice(&denied.stdout).expect("JSON");
    assert_eq!(v["ingress"]["decision"]["action"], "Deny");
    assert_eq!(v["ingress"]["decision"]["rule"], 1);
    assert!(v["egress"].get("passed").is_none(), "no pass, no key: {v}");
}

#[test]
fn verify_agrees_on_every_tier_example_with_the_ruleset_engine() {
    for example in [
        "tier-tenant-isolation",
        "tier-monitoring-exception",
        "tier-baseline-default-deny",
        "tier-egress-cidr-deny",
        "tier-legacy-admin-baseline",
    ] {
        let dir = format!("policy-examples/{example}");
        let o = netpol_check(repo(), &["verify", "--engines", "evaluator,ruleset", "--family", "ipv4", "-f", &dir]);
        assert_eq!(o.status.code(), Some(0), "{example}: {}{}", stdout(&o), stderr(&o));
    }
}

#[test]
fn explain_lists_a_pods_tiers_in_the_order_they_decide() {
    let o = netpol_check(repo(), &["explain", "shop/frontend", "-f", "policy-examples/tier-baseline-default-deny"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let text = stdout(&o);
    let order: Vec<Option<usize>> = [
        "Ingress: tiers in order",
        "  NetworkPolicy tier: not isolated; it goes on (no policy in shop selects it for Ingress)",
        "  Baseline tier:\n    - Deny from all pods in every namespace, on all traffic   [ClusterNetworkPolicy default-deny-between-pods (Baseline, priority 100) ingress rule \"deny-from-every-pod\"]",
        "  then: allowed (the default)",
    ]
    .iter()
    .map(|line| text.find(line))
    .collect();
    assert!(order.iter().all(Option::is_some) && order.is_sorted(), "{order:?}\n{text}");
    let isolated =
        stdout(&netpol_check(repo(), &["explain", "shop/backend", "-f", "policy-examples/tier-baseline-default-deny"]));
    assert!(isolated.contains("(the Baseline tier never applies: a NetworkPolicy selects the pod)"), "{isolated}");
}

// --- Services: query --to svc/..., matrix --services ------------------------------------------

const SERVICES: &str = "tests/fixtures/services";

#[test]
fn a_service_query_answers_each_endpoint_on_the_port_its_named_target_port_has_there() {
    let o = netpol_check(
        repo(),
        &["query", "--from", "shop/client", "--to", "svc/shop/web", "--port", "http", "-f", SERVICES],
    );
    assert_eq!(o.status.code(), Some(1), "one endpoint is denied: {}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("svc/shop/web TCP/80 (http) -> targetPort http: 3 endpoints"), "{out}");
    // "http" is 8080 on web-1 and web-4, 9090 on web-2; the policy opens 8080 to the client.
    assert!(out.contains("\nALLOWED  shop/client -> shop/web-1 TCP/8080\n"), "{out}");
    assert!(out.contains("\nDENIED  shop/client -> shop/web-2 TCP/9090\n"), "{out}");
    assert!(out.contains("\nALLOWED  shop/client -> shop/web-4 TCP/8080\n"), "{out}");
    assert!(out.contains("not endpoints of this port (no TCP container port named http): shop/web-3\n"), "{out}");
    assert!(out.contains("note: endpoint shop/web-4 is terminating (deletionTimestamp set) and not ready"), "{out}");
    assert!(!out.contains("web-old"), "a finished pod is no endpoint: {out}");
    assert!(out.ends_with("svc/shop/web TCP/80: 2 of 3 endpoints allowed\n"), "{out}");
    // The same port by number, from a pod every endpoint admits: exit 0.
    let all = netpol_check(
        repo(),
        &["query", "--from", "shop/monitor", "--to", "svc/shop/web", "--port", "80", "-f", SERVICES],
    );
    assert_eq!(all.status.code(), Some(0), "{}", stdout(&all));
    assert!(stdout(&all).ends_with("svc/shop/web TCP/80: 3 of 3 endpoints allowed\n"));
}

#[test]
fn a_service_query_in_json_keeps_the_documented_shape_with_one_pod_answer_per_endpoint() {
    let o = netpol_check(
        repo(),
        &["query", "--from", "shop/client", "--to", "svc/shop/web", "--port", "80", "-o", "json", "-f", SERVICES],
    );
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["engine"], "evaluator");
    assert_eq!(v["service"], "shop/web");
    assert_eq!(v["port"], serde_json::json!({"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}));
    assert_eq!((v["endpoints"].as_u64(), v["allowedEndpoints"].as_u64()), (Some(3), Some(2)));
    assert_eq!(v["allowed"], false);
    assert_eq!(v["notEndpoints"], serde_json::json!(["shop/web-3"]));
    let answers = v["answers"].as_array().unwrap();
    let seen: Vec<(&str, u64, bool)> = answers
        .iter()
        .map(|a| (a["to"].as_str().unwrap(), a["port"].as_u64().unwrap(), a["allowed"].as_bool().unwrap()))
        .collect();
    assert_eq!(seen, [("shop/web-1", 8080, true), ("shop/web-2", 9090, false), ("shop/web-4", 8080, true)]);
    // Each answer is a pod query's JSON, plus the endpoint's conditions.
    assert_eq!(answers[1]["ingress"]["decision"], "no-rule-matched");
    assert_eq!(
        answers[2]["endpoint"],
        serde_json::json!({"pod": "shop/web-4", "port": 8080, "ready": false, "terminating": true})
    );
}

#[test]
fn the_ruleset_engine_gives_a_service_query_the_same_verdicts() {
    let o = netpol_check(
        repo(),
        &[
            "query",
            "--engine",
            "ruleset",
            "--from",
            "shop/client",
            "--to",
            "svc/shop/web",
            "--port",
            "http",
            "-f",
            SERVICES,
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).ends_with("svc/shop/web TCP/80: 2 of 3 endpoints allowed\n"), "{}", stdout(&o));
}

#[test]
fn a_service_query_refuses_what_it_cannot_answer_with_exit_two_and_says_why() {
    let cases: [(&[&str], &str); 6] = [
        (
            &["--to", "svc/shop/nope", "--port", "80"],
            "error: --to: no service shop/nope in the input (services of shop: legacy-db, search, web)",
        ),
        (
            &["--to", "svc/shop/web", "--port", "81"],
            "error: --port: service shop/web has no port \"81\"; its ports: TCP/80 (http) -> targetPort http, TCP/9000 (admin) -> targetPort 9000",
        ),
        (
            &["--to", "svc/shop/web", "--port", "http", "--protocol", "UDP"],
            "error: --port: port \"http\" of service shop/web is TCP, not UDP",
        ),
        (
            &["--to", "svc/shop/legacy-db", "--port", "5432"],
            "error: --to: service shop/legacy-db has no selector: its endpoints are managed outside Kubernetes",
        ),
        (&["--to", "svc/shop/search", "--port", "80"], "error: --to: service shop/search is of type ExternalName"),
        (&["--to", "svc/web", "--port", "80"], "error: --to: \"svc/web\" is not svc/NAMESPACE/NAME"),
    ];
    for (args, message) in cases {
        let mut all = vec!["query", "--from", "shop/client"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-f", SERVICES]);
        let o = netpol_check(repo(), &all);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(stdout(&o).is_empty(), "{args:?}");
        assert!(stderr(&o).contains(message), "{args:?}: {}", stderr(&o));
    }
    let from = netpol_check(
        repo(),
        &["query", "--from", "svc/shop/web", "--to", "shop/client", "--port", "80", "-f", SERVICES],
    );
    assert_eq!(from.status.code(), Some(2));
    assert!(stderr(&from).contains("error: --from: \"svc/shop/web\" is a Service, and a Service is not a source"));
}

#[test]
fn matrix_services_adds_a_column_per_service_port_marking_all_some_or_none_of_its_endpoints() {
    let o = netpol_check(repo(), &["matrix", "--services", "--port", "80", "--color", "never", "-f", SERVICES]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    let table = &out[out.find("\nservices ").expect("a services table") + 1..];
    let expected = "\
services    legend: . every endpoint allowed   ~ some   X none   - no endpoints    rows: from   columns: Service ports
1 svc/shop/web TCP/80 (http) -> targetPort http: 3 endpoints
2 svc/shop/web TCP/9000 (admin) -> targetPort 9000: 4 endpoints

                1 2 
1 shop/client   ~ X 
2 shop/monitor  . X 
3 shop/web-1    ~ ~ 
4 shop/web-2    ~ ~ 
5 shop/web-3    X ~ 
6 shop/web-4    ~ ~ 
";
    assert_eq!(table, expected);
    // The Services that cannot have a column are named, not guessed.
    assert!(stderr(&o).contains("warning: --services: service shop/legacy-db has no selector"), "{}", stderr(&o));
    assert!(stderr(&o).contains("warning: --services: service shop/search is of type ExternalName"));
}

#[test]
fn matrix_services_in_json_gives_each_row_its_count_of_allowed_endpoints() {
    let o = netpol_check(repo(), &["matrix", "--services", "--port", "80", "-o", "json", "-f", SERVICES]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["pods"].as_array().unwrap().len(), 6);
    assert_eq!(v["probes"].as_array().unwrap().len(), 1, "only the asked probe is a pod table");
    let web = &v["services"][0];
    assert_eq!(web["service"], "shop/web");
    assert_eq!(web["port"]["targetPort"], "http");
    assert_eq!(
        web["endpoints"],
        serde_json::json!([{"pod": "shop/web-1", "port": 8080}, {"pod": "shop/web-2", "port": 9090}, {"pod": "shop/web-4", "port": 8080}])
    );
    // client, monitor, web-1, web-2, web-3, web-4 (a pod reaches itself).
    assert_eq!(web["allowed"], serde_json::json!([2, 3, 1, 1, 0, 1]));
    let csv = netpol_check(repo(), &["matrix", "--services", "-o", "csv", "-f", SERVICES]);
    assert_eq!(csv.status.code(), Some(2));
    assert!(stderr(&csv).contains("error: --services: Service columns are printed with -o text or -o json"));
}

#[test]
fn real_packets_to_each_endpoint_of_a_service_give_the_evaluators_answers() {
    if !common::kernel_or_skip() {
        return;
    }
    let services_json = |engine: &str| -> serde_json::Value {
        let o = netpol_check(
            repo(),
            &["matrix", "--engine", engine, "--services", "--port", "80", "-o", "json", "-f", SERVICES],
        );
        assert_eq!(o.status.code(), Some(0), "{engine}: {}", stderr(&o));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["services"].clone()
    };
    assert_eq!(services_json("kernel"), services_json("evaluator"));
    let o = netpol_check(
        repo(),
        &[
            "query",
            "--engine",
            "kernel",
            "--from",
            "shop/client",
            "--to",
            "svc/shop/web",
            "--port",
            "http",
            "-f",
            SERVICES,
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stdout(&o).ends_with("svc/shop/web TCP/80: 2 of 3 endpoints allowed\n"), "{}", stdout(&o));
}
