//! The loader never panics: arbitrary bytes, and arbitrary YAML shaped like Kubernetes
//! objects (real kinds and field names, wrong types and values), either load or give an
//! error.

use netpol::k8s::load::{LoadOptions, Source, load_sources};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

fn load(text: String) {
    let sources = [Source { name: "fuzz.yaml".into(), text }];
    if let Err(e) = load_sources(&sources, &LoadOptions::default()) {
        // Every error names the file.
        assert!(e.to_string().starts_with("fuzz.yaml"), "{e}");
    }
}

const KEYS: &[&str] = &[
    "metadata",
    "name",
    "namespace",
    "labels",
    "spec",
    "podSelector",
    "namespaceSelector",
    "ingress",
    "egress",
    "from",
    "to",
    "ports",
    "port",
    "endPort",
    "protocol",
    "ipBlock",
    "cidr",
    "except",
    "policyTypes",
    "matchLabels",
    "matchExpressions",
    "key",
    "operator",
    "values",
    "containers",
    "containerPort",
    "status",
    "podIP",
    "podIPs",
    "ip",
    "phase",
    "nodeName",
    "hostNetwork",
    "template",
    "replicas",
    "items",
    "allowIncoming",
    "pods",
    "toPorts",
];

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        (0i64..70000).prop_map(|n| json!(n)),
        prop::sample::select(vec![
            "TCP",
            "UDP",
            "SCTP",
            "In",
            "NotIn",
            "Exists",
            "DoesNotExist",
            "Ingress",
            "Egress",
            "10.0.0.0/8",
            "10.1.2.3",
            "fd00::/64",
            "fd00::1",
            "::",
            "0.0.0.0/0",
            "http",
            "a",
            "",
            "x/y",
            "-",
            "Running",
            "node-1",
        ])
        .prop_map(|s| Value::String(s.to_string())),
        ".{0,12}".prop_map(Value::String),
    ]
}

fn shape() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(5, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect::<Map<_, _>>())),
        ]
    })
}

fn object() -> impl Strategy<Value = Value> {
    let kinds = prop::sample::select(vec![
        ("v1", "Namespace"),
        ("v1", "Pod"),
        ("networking.k8s.io/v1", "NetworkPolicy"),
        ("net.alpha.kubernetes.io/v1alpha1", "NetworkPolicy"),
        ("apps/v1", "Deployment"),
        ("apps/v1", "DaemonSet"),
        ("batch/v1", "CronJob"),
        ("v1", "List"),
        ("v1", "Service"),
    ]);
    (kinds, shape(), shape()).prop_map(|((api, kind), meta, spec)| {
        let mut o = Map::new();
        o.insert("apiVersion".into(), json!(api));
        o.insert("kind".into(), json!(kind));
        o.insert("metadata".into(), meta);
        o.insert(if kind == "List" { "items" } else { "spec" }.into(), spec);
        Value::Object(o)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn arbitrary_bytes_never_panic_the_loader(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        load(String::from_utf8_lossy(&bytes).into_owned());
    }

    #[test]
    fn arbitrary_kubernetes_shaped_yaml_never_panics_the_loader(docs in prop::collection::vec(object(), 1..4)) {
        let text = docs.iter().map(|d| yaml_serde::to_string(d).unwrap()).collect::<Vec<_>>().join("---\n");
        load(text);
    }
}

/// The loader's error for `text`, which must not load.
fn load_error(text: String) -> String {
    let sources = [Source { name: "fuzz.yaml".into(), text }];
    match load_sources(&sources, &LoadOptions::default()) {
        Ok(_) => panic!("a deeply nested document loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn deeply_nested_yaml_is_an_error_not_a_crash() {
    // Flow collections: refused by the loader's own depth scan, before the YAML parser.
    let flow = load_error(format!("kind: Pod\nspec: {}{}", "[".repeat(10_000), "]".repeat(10_000)));
    assert!(flow.starts_with("fuzz.yaml:1: nesting deeper than 128 levels at line 2"), "{flow}");
    // Block sequences (`- - - ... x`, valid YAML): the parser's recursion limit.
    let block = load_error(format!("kind: Pod\nspec:\n{}x\n", "- ".repeat(5_000)));
    assert!(
        block.starts_with("fuzz.yaml:1: invalid YAML at line 3") && block.contains("recursion limit exceeded"),
        "{block}"
    );
    // Block mappings, one level per line.
    let mappings: String = (0..3_000).map(|i| format!("{}a:\n", "  ".repeat(i))).collect();
    let mappings = load_error(format!("kind: Pod\nspec:\n{mappings}"));
    assert!(mappings.contains("recursion limit exceeded"), "{mappings}");
}

// --- defaulting of absent, null and empty lists ------------------------------------------------

use netpol::cli::generate::{self, EmptyList, ListField};
use netpol::policy::matrix::{self, Family};
use netpol::policy::model::{Cluster, Policy};

/// The API server's defaulting, stated on its own (upstream `SetDefaults_NetworkPolicy`):
/// "if len(spec.policyTypes) == 0, policyTypes = [Ingress], plus Egress if len(spec.egress)
/// != 0". Absent, `null` and `[]` all have length 0. A rule's `from`/`to`/`ports` of length 0
/// match everything, so the model's `None` stays `None`; a direction that isolates with no
/// rules written denies everything.
fn defaulted(written: &Policy, explicit_policy_types: bool) -> Policy {
    let types_written = explicit_policy_types && (written.ingress.is_some() || written.egress.is_some());
    let (ingress, egress) = if types_written {
        (written.ingress.is_some(), written.egress.is_some())
    } else {
        (true, written.egress.as_ref().is_some_and(|rules| !rules.is_empty()))
    };
    Policy {
        ingress: ingress.then(|| written.ingress.clone().unwrap_or_default()),
        egress: egress.then(|| written.egress.clone().unwrap_or_default()),
        ..written.clone()
    }
}

fn form(code: u8) -> EmptyList {
    match code % 3 {
        0 => EmptyList::Absent,
        1 => EmptyList::Null,
        _ => EmptyList::Empty,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn every_generated_policy_written_with_absent_null_or_empty_lists_gets_the_verdicts_defaulting_implies(
        seed in any::<u64>(),
        explicit_policy_types in any::<bool>(),
        forms in prop::collection::vec(any::<u8>(), 1..64),
    ) {
        let generated = generate::small_random(seed);
        let bare = Cluster::new(generated.namespaces.values().cloned().collect(), generated.pods.iter().cloned(), Vec::<Policy>::new());
        let mut text = generate::to_yaml(&bare);
        let mut next = 0usize;
        let mut choose = |_: ListField| {
            next += 1;
            form(forms[next % forms.len()])
        };
        for p in generated.policies.iter() {
            let manifest = generate::policy_manifest(p, explicit_policy_types, &mut choose);
            text.push_str("---\n");
            text.push_str(&yaml_serde::to_string(&manifest).unwrap());
        }
        let loaded = load_sources(&[Source { name: "gen.yaml".into(), text }], &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{e}"))
            .cluster;
        let expected = Cluster::new(
            loaded.namespaces.values().cloned().collect(),
            loaded.pods.iter().cloned(),
            generated.policies.iter().map(|p| defaulted(p, explicit_policy_types)),
        );
        prop_assert_eq!(loaded.pods.len(), generated.pods.len());
        for probe in matrix::default_probes(&expected) {
            prop_assert_eq!(
                matrix::reference_matrix(&loaded, &probe, Family::Primary),
                matrix::reference_matrix(&expected, &probe, Family::Primary),
                "{}", probe
            );
        }
    }
}
