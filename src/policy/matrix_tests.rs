//! The matrix engine equals the reference evaluator, cell by cell.

use proptest::prelude::*;

use super::*;
use crate::cli::generate;

fn probes() -> Vec<Probe> {
    let mut out = Vec::new();
    for protocol in Protocol::ALL {
        for port in
            [ProbePort::Number(80), ProbePort::Number(81), ProbePort::Number(8080), ProbePort::Named("web".into())]
        {
            out.push(Probe { port, protocol });
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]
    #[test]
    fn the_matrix_engine_agrees_with_the_reference_on_random_clusters(seed in any::<u64>()) {
        let cluster = generate::small_random(seed);
        for family in [Family::Primary, Family::Ipv4, Family::Ipv6] {
            let index = Index::new(&cluster, family);
            for probe in probes() {
                let fast = index.matrix(&probe);
                let slow = reference_matrix(&cluster, &probe, family);
                prop_assert_eq!(fast, slow, "seed {} probe {} family {:?}", seed, probe, family);
            }
        }
    }
}

#[test]
fn the_generated_benchmark_cluster_agrees_with_the_reference() {
    let cluster = generate::cluster(&generate::Params {
        pods: 120,
        policies: 40,
        namespaces: 6,
        nodes: 3,
        seed: 7,
        dual_stack: true,
    });
    let index = Index::new(&cluster, Family::Primary);
    for probe in default_probes(&cluster).into_iter().take(6) {
        assert_eq!(index.matrix(&probe), reference_matrix(&cluster, &probe, Family::Primary), "{probe}");
    }
}
