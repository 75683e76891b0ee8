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

/// Every family and probe of `cluster`: the matrix engine's matrix equals the reference's.
fn agrees_with_the_reference(cluster: &Cluster, seed: u64) -> Result<(), TestCaseError> {
    for family in [Family::Primary, Family::Ipv4, Family::Ipv6] {
        let index = Index::new(cluster, family);
        for probe in probes() {
            let fast = index.matrix(&probe);
            let slow = reference_matrix(cluster, &probe, family);
            prop_assert_eq!(fast, slow, "seed {} probe {} family {:?}", seed, probe, family);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]
    #[test]
    fn the_matrix_engine_agrees_with_the_reference_on_random_clusters(seed in any::<u64>()) {
        agrees_with_the_reference(&generate::small_random(seed), seed)?;
    }

    #[test]
    fn the_matrix_engine_agrees_with_the_reference_on_random_clusters_with_cluster_policies(seed in any::<u64>()) {
        agrees_with_the_reference(&generate::small_random_tiered(seed), seed)?;
    }
}

/// The tiered generator is worth its cases: across seeds, cluster rules of every action
/// and tier decide cells, and Admin Pass rules hand cells on to a later tier.
#[test]
fn random_tiered_clusters_exercise_every_action_of_every_tier() {
    use crate::policy::evaluate::{Decision, evaluate};
    use crate::policy::tiers::{Action, Tier};
    let mut seen = std::collections::BTreeSet::new();
    for seed in 0..300 {
        let cluster = generate::small_random_tiered(seed);
        for i in 0..cluster.pods.len() {
            for j in 0..cluster.pods.len() {
                let Some(conn) = cell_connection(&cluster, &probes()[0], Family::Primary, i, j) else { continue };
                let v = evaluate(&cluster, &conn);
                for side in [&v.egress, &v.ingress] {
                    if let Decision::Cluster(m) = side.decision {
                        seen.insert((cluster.cluster_policies[m.policy].tier, m.action));
                    }
                    for m in &side.passed {
                        seen.insert((cluster.cluster_policies[m.policy].tier, m.action));
                    }
                }
            }
        }
    }
    for tier in [Tier::Admin, Tier::Baseline] {
        for action in [Action::Accept, Action::Deny, Action::Pass] {
            assert!(seen.contains(&(tier, action)), "no cell decided by a {tier} {action} rule: {seen:?}");
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
