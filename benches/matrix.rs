//! Criterion benches: selector matching, and the evaluator's full matrix at 100 / 1 000 /
//! 10 000 pods. Run: `cargo bench --bench matrix`.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use netpol::cli::generate::{self, Params};
use netpol::policy::matrix::{Family, Index, default_probes};
use netpol::policy::model::Labels;
use netpol::policy::selector::{Operator, Requirement, Selector};

fn selectors(c: &mut Criterion) {
    let labels: Labels = [("app", "web"), ("tier", "frontend"), ("env", "prod"), ("team", "payments")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let match_labels = Selector::from_labels([("app", "web"), ("env", "prod")]);
    let expressions = Selector::new(vec![
        Requirement { key: "tier".into(), operator: Operator::In(["frontend".into(), "edge".into()].into()) },
        Requirement { key: "env".into(), operator: Operator::NotIn(["dev".into()].into()) },
        Requirement { key: "team".into(), operator: Operator::Exists },
    ]);
    let mut g = c.benchmark_group("selector");
    g.bench_function("match_labels", |b| b.iter(|| black_box(&match_labels).matches(black_box(&labels))));
    g.bench_function("match_expressions", |b| b.iter(|| black_box(&expressions).matches(black_box(&labels))));
    g.finish();
}

fn matrices(c: &mut Criterion) {
    let mut g = c.benchmark_group("matrix_all_probes");
    g.sample_size(10);
    for (pods, policies) in [(100, 30), (1_000, 300), (10_000, 1_000)] {
        let cluster =
            generate::cluster(&Params { pods, policies, namespaces: 20, nodes: 10, seed: 1, dual_stack: false });
        let probes = default_probes(&cluster);
        g.bench_with_input(BenchmarkId::new("pods", pods), &cluster, |b, cluster| {
            b.iter(|| {
                let index = Index::new(cluster, Family::Primary);
                for p in &probes {
                    black_box(index.matrix(p));
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, selectors, matrices);
criterion_main!(benches);
