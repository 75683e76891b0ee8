//! `netpol-check diff` and `netpol-check lint`, through the real binary, on the small inputs
//! of `tests/fixtures/` (edited in temporary copies) and on every bundled example.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fixtures() -> PathBuf {
    repo().join("tests/fixtures")
}

fn netpol_check(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_netpol-check")).current_dir(repo()).args(args).output().expect("run netpol-check")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// An input folder: `tests/fixtures/cluster.yaml` and `diff/policies.yaml`, each with the
/// given (from, to) text replacements applied, in a temporary folder.
struct Side {
    dir: tempfile::TempDir,
}

impl Side {
    fn base() -> Self {
        let dir = tempfile::tempdir().unwrap();
        for (from, to) in [("cluster.yaml", "cluster.yaml"), ("diff/policies.yaml", "policies.yaml")] {
            std::fs::copy(fixtures().join(from), dir.path().join(to)).unwrap();
        }
        Side { dir }
    }

    /// Replaces `from` (which must occur) by `to` in `file`.
    fn edit(self, file: &str, from: &str, to: &str) -> Self {
        let path = self.dir.path().join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "{file} lacks {from:?}");
        std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
        self
    }

    fn add(self, file: &str, text: &str) -> Self {
        std::fs::write(self.dir.path().join(file), text).unwrap();
        self
    }

    fn path(&self) -> &str {
        self.dir.path().to_str().unwrap()
    }
}

fn diff(old: &Side, new: &Side, extra: &[&str]) -> Output {
    let mut args = vec!["diff", old.path(), new.path()];
    args.extend_from_slice(extra);
    netpol_check(&args)
}

/// The cell lines (`  TCP/5432 a -> b: denied -> allowed`) under each group heading.
fn groups(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.split_once(" cells change because: ") {
            out.push((rest.1.to_string(), Vec::new()));
        } else if let Some(cell) = line.strip_prefix("  ").filter(|l| !l.starts_with(' ')) {
            out.last_mut().expect("a cell under a heading").1.push(cell.to_string());
        }
    }
    out
}

// --- diff --------------------------------------------------------------------------------------

#[test]
fn diff_of_identical_inputs_exits_zero_and_says_nothing_changed() {
    let o = diff(&Side::base(), &Side::base(), &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "diff: no cell changes of 18 cells (2 probes × primary × 3 common pods²); 0 objects changed\n"
    );
}

#[test]
fn a_policy_edit_shows_exactly_the_cells_it_changes_grouped_under_it() {
    // db now also takes 5432 from the pods of namespaces labelled team=b (other/client).
    let new = Side::base().edit(
        "policies.yaml",
        "    - podSelector: {matchLabels: {app: web}}\n",
        "    - podSelector: {matchLabels: {app: web}}\n    - namespaceSelector: {matchLabels: {team: b}}\n",
    );
    let o = diff(&Side::base(), &new, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let text = stdout(&o);
    assert_eq!(
        groups(&text),
        [(
            "NetworkPolicy app/db-in modified".to_string(),
            vec!["TCP/5432 other/client -> app/db: denied -> allowed".to_string()]
        )],
        "{text}"
    );
    // Each cell says why, before and after, in the evaluator's words.
    assert!(
        text.contains("    before: ingress to app/db: DENIED; isolated by app/db-in, and no rule matches"),
        "{text}"
    );
    assert!(text.contains("    after:  ingress to app/db: allowed; isolated by app/db-in"), "{text}");
    assert!(text.contains("matched app/db-in spec.ingress[0].from[1], ports[0]"), "{text}");
    assert!(text.ends_with(
        "diff: 1 of 18 cells (2 probes × primary × 3 common pods²) change, in 1 groups; 1 objects changed\n"
    ));
}

#[test]
fn a_pod_relabel_is_attributed_to_the_pod_not_to_the_policy_that_reads_the_label() {
    let new = Side::base().edit(
        "cluster.yaml",
        "name: client, namespace: other, labels: {app: client}",
        "name: client, namespace: other, labels: {app: web}",
    );
    // A policy that selects by that label across namespaces, unchanged on both sides.
    let wide = "    - podSelector: {matchLabels: {app: web}}\n      namespaceSelector: {}\n";
    let (old, new) = (
        Side::base().edit("policies.yaml", "    - podSelector: {matchLabels: {app: web}}\n", wide),
        new.edit("policies.yaml", "    - podSelector: {matchLabels: {app: web}}\n", wide),
    );
    let o = diff(&old, &new, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(
        groups(&stdout(&o)),
        [(
            "Pod other/client relabelled".to_string(),
            vec!["TCP/5432 other/client -> app/db: denied -> allowed".to_string()]
        )],
        "{}",
        stdout(&o)
    );
}

#[test]
fn a_namespace_relabel_is_attributed_to_the_namespace() {
    let team_b = "    - podSelector: {matchLabels: {app: web}}\n    - namespaceSelector: {matchLabels: {team: b}}\n";
    let old = Side::base().edit("policies.yaml", "    - podSelector: {matchLabels: {app: web}}\n", team_b);
    let new = Side::base().edit("policies.yaml", "    - podSelector: {matchLabels: {app: web}}\n", team_b).edit(
        "cluster.yaml",
        "metadata: {name: other, labels: {team: b}}",
        "metadata: {name: other, labels: {team: c}}",
    );
    let o = diff(&old, &new, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(
        groups(&stdout(&o)),
        [(
            "Namespace other relabelled".to_string(),
            vec!["TCP/5432 other/client -> app/db: allowed -> denied".to_string()]
        )],
        "{}",
        stdout(&o)
    );
}

#[test]
fn a_cell_needing_both_the_policy_and_the_relabel_names_both() {
    // The relabel alone does nothing (the rule reads namespace app only), and the policy
    // edit alone does nothing (client is not app=web): only both together open the cell.
    let new = Side::base()
        .edit(
            "cluster.yaml",
            "name: client, namespace: other, labels: {app: client}",
            "name: client, namespace: other, labels: {app: web}",
        )
        .edit(
            "policies.yaml",
            "    - podSelector: {matchLabels: {app: web}}\n",
            "    - podSelector: {matchLabels: {app: web}}\n      namespaceSelector: {}\n",
        );
    let o = diff(&Side::base(), &new, &[]);
    assert_eq!(
        groups(&stdout(&o)),
        [(
            "NetworkPolicy app/db-in modified, Pod other/client relabelled".to_string(),
            vec!["TCP/5432 other/client -> app/db: denied -> allowed".to_string()]
        )],
        "{}",
        stdout(&o)
    );
}

#[test]
fn pods_on_one_side_only_are_listed_and_not_compared() {
    let new = Side::base().add(
        "extra.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: cache, namespace: app, labels: {app: cache}}\nspec:\n  nodeName: node-1\n  containers: [{name: main, image: c}]\nstatus: {phase: Running, podIP: 10.8.1.12}\n",
    );
    let o = diff(&Side::base(), &new, &[]);
    assert_eq!(o.status.code(), Some(0), "a new pod changes no compared cell: {}", stdout(&o));
    assert!(stdout(&o).starts_with("pods only in NEW (not compared): app/cache\n"), "{}", stdout(&o));
}

#[test]
fn diff_json_keeps_the_documented_shape() {
    let new = Side::base().edit(
        "policies.yaml",
        "    - {port: 5432, protocol: TCP}\n",
        "    - {port: 5433, protocol: TCP}\n",
    );
    let o = diff(&Side::base(), &new, &["-o", "json"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["family"], "primary");
    assert_eq!(v["unchanged"], false);
    assert_eq!(v["commonPods"], 3);
    // Probes of both sides: 80 and 5432 (web and db declare them), 5433 (the new policy names it).
    assert_eq!(
        v["probes"],
        serde_json::json!([
            {"port": 80, "protocol": "TCP"},
            {"port": 5432, "protocol": "TCP"},
            {"port": 5433, "protocol": "TCP"}
        ])
    );
    assert_eq!(v["cells"], 27);
    assert_eq!(v["changes"], serde_json::json!([{"kind": "NetworkPolicy", "name": "app/db-in", "change": "modified"}]));
    assert_eq!(v["podsOnlyInOld"], serde_json::json!([]));
    let groups = v["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0]["causes"], v["changes"]);
    let cells = groups[0]["cells"].as_array().unwrap();
    let summary: Vec<(String, String, u64, String, String)> = cells
        .iter()
        .map(|c| {
            (
                c["from"].as_str().unwrap().into(),
                c["to"].as_str().unwrap().into(),
                c["port"].as_u64().unwrap(),
                c["before"].as_str().unwrap().into(),
                c["after"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("app/web".into(), "app/db".into(), 5432, "allowed".into(), "denied".into()),
            ("app/web".into(), "app/db".into(), 5433, "denied".into(), "allowed".into()),
        ]
    );
    assert_eq!(v["changedCells"], 2);
    assert_eq!(cells[0]["protocol"], "TCP");
    assert_eq!(cells[0]["family"], "IPv4");
    assert!(cells[0]["explanationBefore"][0].as_str().unwrap().starts_with("ingress to app/db: allowed"));
}

#[test]
fn diff_of_bad_input_exits_two_and_names_the_side() {
    let bad = Side::base().add("bad.yaml", "kind: Pod\nmetadata: {name: x\n");
    let o = diff(&Side::base(), &bad, &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).starts_with("error: NEW: "), "{}", stderr(&o));
    let o = netpol_check(&["diff", "-", "-"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("only one side can be read from stdin"), "{}", stderr(&o));
}

// --- lint --------------------------------------------------------------------------------------

/// `lint` of `tests/fixtures/cluster.yaml` with `lint/<name>.yaml`: its findings' lines.
fn lint_fixture(name: &str, extra: &[&str]) -> (Option<i32>, Vec<String>) {
    let file = format!("tests/fixtures/lint/{name}.yaml");
    let mut args = vec!["lint", "-f", "tests/fixtures/cluster.yaml", "-f", &file];
    args.extend_from_slice(extra);
    let o = netpol_check(&args);
    let text = stdout(&o);
    let lines: Vec<String> = text.lines().filter(|l| !l.starts_with("lint: ")).map(String::from).collect();
    (o.status.code(), lines)
}

#[test]
fn lint_names_a_policy_that_selects_no_pod() {
    assert_eq!(
        lint_fixture("selects-no-pod", &[]),
        (
            Some(1),
            vec!["NetworkPolicy app/typo spec.podSelector: selects no pod: no pod of namespace app has labels matching app=wbe [selects-no-pod]".into()]
        )
    );
}

#[test]
fn lint_names_named_ports_no_destination_declares_both_ways() {
    assert_eq!(
        lint_fixture("named-port-never-matches", &[]),
        (
            Some(1),
            vec![
                "NetworkPolicy app/db-in spec.ingress[0].ports[0]: port TCP/http (named) never matches: no pod the policy selects declares a TCP port named \"http\" [named-port-never-matches]".into(),
                "NetworkPolicy app/web-out spec.egress[0].ports[0]: port TCP/http (named) never matches: no pod the rule's peers can be declares a TCP port named \"http\" [named-port-never-matches]".into(),
            ]
        )
    );
}

#[test]
fn lint_names_a_namespace_selector_matching_no_namespace() {
    assert_eq!(
        lint_fixture("namespace-selector-matches-nothing", &[]),
        (
            Some(1),
            vec!["NetworkPolicy app/from-team-c spec.ingress[0].from[0].namespaceSelector: never matches: no namespace of the input has labels matching team=c [namespace-selector-matches-nothing]".into()]
        )
    );
}

#[test]
fn lint_names_a_rule_another_rule_covers() {
    assert_eq!(
        lint_fixture("rule-shadowed", &[]),
        (
            Some(1),
            vec!["NetworkPolicy app/db-in spec.ingress[1]: adds nothing: this policy's spec.ingress[0] already allows all it allows (from pods with app=web in namespace app, on TCP/5432), for every pod this policy selects [rule-shadowed]".into()]
        )
    );
}

#[test]
fn lint_names_an_ip_block_holding_pod_addresses_or_overlapping_a_pod_cidr() {
    assert_eq!(
        lint_fixture("ipblock-covers-pods", &[]),
        (
            Some(1),
            vec!["NetworkPolicy app/db-in spec.ingress[0].from[0].ipBlock: 10.8.0.0/16 contains the addresses of pods app/db, app/web: it matches those pods too, whatever their labels and namespaces [ipblock-covers-pods]".into()]
        )
    );
    // With --pod-cidr the ranges are the evidence: 10.8.2.0/24 is cut out by the except.
    assert_eq!(
        lint_fixture("ipblock-covers-pods", &["--pod-cidr", "10.8.1.0/24", "--pod-cidr", "10.8.2.0/24"]),
        (
            Some(1),
            vec!["NetworkPolicy app/db-in spec.ingress[0].from[0].ipBlock: 10.8.0.0/16 overlaps the pod CIDRs 10.8.1.0/24 (--pod-cidr): it matches pods too, whatever their labels and namespaces [ipblock-covers-pods]".into()]
        )
    );
    assert_eq!(lint_fixture("ipblock-covers-pods", &["--pod-cidr", "10.8.2.0/24"]), (Some(0), vec![]));
}

#[test]
fn lint_names_a_pod_open_to_everyone_under_a_default_deny() {
    assert_eq!(
        lint_fixture("open-despite-default-deny", &[]),
        (
            Some(1),
            vec!["NetworkPolicy app/web-public spec.ingress[0]: pods app/web take ingress from every address on TCP/80, though app/default-deny denies all ingress in namespace app by default [open-despite-default-deny]".into()]
        )
    );
}

#[test]
fn lint_names_a_cluster_policy_whose_subject_selects_no_pod() {
    assert_eq!(
        lint_fixture("subject-selects-no-pod", &[]),
        (
            Some(1),
            vec!["ClusterNetworkPolicy team-c spec.subject: selects no pod: no pod of the input is a pod in a namespace with team=c [subject-selects-no-pod]".into()]
        )
    );
}

#[test]
fn lint_names_a_cluster_rule_an_earlier_rule_of_its_tier_shadows() {
    assert_eq!(
        lint_fixture("cluster-rule-shadowed", &[]),
        (
            Some(1),
            vec!["ClusterNetworkPolicy team-a spec.ingress[1]: rule \"deny-team-b\" (Deny from all pods in namespaces with team=b, on all traffic) never decides: its rule \"pass-all\", checked first in the Admin tier, matches all it matches [cluster-rule-shadowed]".into()]
        )
    );
}

#[test]
fn lint_names_equal_priorities_that_overlap_with_different_actions() {
    assert_eq!(
        lint_fixture("ambiguous-priority", &[]),
        (
            Some(1),
            vec!["ClusterNetworkPolicy deny-all spec.ingress[0]: rule \"deny-everyone\" (Deny) and ClusterNetworkPolicy accept-b rule \"accept-team-b\" spec.ingress[0] (Accept) have the same priority 20, both apply to pods such as app/db and match some of the same traffic: the API leaves which one wins to the implementation (netpol: name order, accept-b first) [ambiguous-priority]".into()]
        )
    );
}

#[test]
fn lint_json_lists_findings_with_code_object_path_and_message() {
    let o = netpol_check(&[
        "lint",
        "-o",
        "json",
        "-f",
        "tests/fixtures/cluster.yaml",
        "-f",
        "tests/fixtures/lint/selects-no-pod.yaml",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["count"], 1);
    assert_eq!(v["findings"][0]["code"], "selects-no-pod");
    assert_eq!(v["findings"][0]["object"], "NetworkPolicy app/typo");
    assert_eq!(v["findings"][0]["path"], "spec.podSelector");
    assert!(v["findings"][0]["message"].as_str().unwrap().starts_with("selects no pod"));
}

#[test]
fn lint_of_a_clean_input_exits_zero() {
    let o = netpol_check(&["lint", "-f", "tests/fixtures/cluster.yaml", "-f", "tests/fixtures/diff/policies.yaml"]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert_eq!(stdout(&o), "lint: 0 findings in 1 policies\n");
}

/// Every bundled example, linted. The findings below are true and meant by their examples:
/// `policies-add-up` keeps a policy with a selector typo to show it isolates nothing;
/// `dual-stack` and `ipblock-except` admit node-1's pod range by ipBlock on purpose (their
/// comments say so), which is exactly "an ipBlock that matches pods". Every other example
/// is clean.
#[test]
fn every_bundled_example_lints_to_the_findings_it_really_has() {
    let expected: &[(&str, &[&str])] = &[
        (
            "dual-stack",
            &[
                "NetworkPolicy ds/api-ingress spec.ingress[0].from[0].ipBlock: 10.12.1.0/24 contains the addresses of pods ds/client, ds/web: it matches those pods too, whatever their labels and namespaces [ipblock-covers-pods]",
                "NetworkPolicy ds/api-ingress spec.ingress[0].from[1].ipBlock: fd00:12:1::/64 contains the addresses of pods ds/client, ds/web: it matches those pods too, whatever their labels and namespaces [ipblock-covers-pods]",
            ],
        ),
        (
            "ipblock-except",
            &[
                "NetworkPolicy payments/ledger-ingress spec.ingress[0].from[0].ipBlock: 10.7.1.0/24 contains the addresses of pods payments/gateway, tools/shell: it matches those pods too, whatever their labels and namespaces [ipblock-covers-pods]",
            ],
        ),
        (
            "policies-add-up",
            &[
                "NetworkPolicy shop/allow-all-typo spec.podSelector: selects no pod: no pod of namespace shop has labels matching app=apii [selects-no-pod]",
            ],
        ),
    ];
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(repo().join("policy-examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 18, "{dirs:?}");
    for dir in dirs {
        let name = dir.file_name().unwrap().to_str().unwrap().to_string();
        let o = netpol_check(&["lint", "-f", dir.to_str().unwrap()]);
        let want: Vec<String> = expected
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, lines)| lines.iter().map(|l| l.to_string()).collect())
            .unwrap_or_default();
        let got: Vec<String> = stdout(&o).lines().filter(|l| !l.starts_with("lint: ")).map(String::from).collect();
        assert_eq!(got, want, "{name}");
        assert_eq!(o.status.code(), Some(if want.is_empty() { 0 } else { 1 }), "{name}: {}", stderr(&o));
    }
}
