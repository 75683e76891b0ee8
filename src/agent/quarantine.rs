//! One policy that makes every full sync fail (the kernel refuses its rules, the compiler
//! panics on it) must not freeze the node: find it, enforce it fail-closed, keep the rest.
//!
//! ```text
//!  full sync fails ─► culprit(candidates, fails) ──bisect──► the one policy whose rules
//!                      (policies isolating a local pod;      alone still fail
//!                       fails(S) = compile with only S                │
//!                       + the kernel's check of the result)          ▼
//!                                              Quarantine: the policy, as it is (that version),
//!                                              becomes its fail-closed stand-in in every sync
//!                                              until the object changes or goes
//! ```
//!
//! The search is pure: `fails` is the caller's. [`Quarantining`] wraps the node's
//! [`NftTarget`]: its `fails` compiles the node's ruleset with only the given policies and
//! asks the kernel to check it (`nft --check`), so nothing is applied while searching and
//! the node keeps its last table meanwhile.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use crate::agent::nft_target::NftTarget;
use crate::agent::{Snapshot, SyncError, SyncStats, SyncTarget};
use crate::compile::compile;
use crate::nft::Nftables;
use crate::nft::diff::full_sync;
use crate::policy::model::{Cluster, Direction, ObjectRef, Policy, SharedList, namespace_map};
use crate::policy::selector::Selector;

/// The one candidate whose presence alone makes `fails` true, found by bisection in
/// O(log n) calls. `None` when nothing fails without any candidate being at fault (the
/// failure is not theirs), or when no single one is (only a combination fails).
pub fn culprit<T: Clone>(candidates: &[T], mut fails: impl FnMut(&[T]) -> bool) -> Option<T> {
    if candidates.is_empty() || fails(&[]) {
        return None;
    }
    let mut suspects = candidates;
    while suspects.len() > 1 {
        let (a, b) = suspects.split_at(suspects.len() / 2);
        suspects = if fails(a) {
            a
        } else if fails(b) {
            b
        } else {
            return None;
        };
    }
    suspects.first().filter(|only| fails(std::slice::from_ref(only))).cloned()
}

/// The fail-closed stand-in for a policy this node cannot enforce: it isolates what the
/// policy selects for its directions and allows nothing. With `whole_namespace` (the
/// stand-in itself cannot be enforced), it isolates every pod of the namespace both ways.
pub fn stand_in(policy: &Policy, reason: &str, whole_namespace: bool) -> Policy {
    let (pod_selector, ingress, egress) = if whole_namespace {
        (Selector::everything(), true, true)
    } else {
        (policy.pod_selector.clone(), policy.ingress.is_some(), policy.egress.is_some())
    };
    Policy {
        id: policy.id.clone(),
        pod_selector,
        ingress: ingress.then(Vec::new),
        egress: egress.then(Vec::new),
        quarantined: Some(reason.to_string()),
    }
}

/// The policies this node enforces fail-closed because it could not enforce them as
/// they are: each version stays quarantined until its object changes or is deleted.
#[derive(Debug, Default)]
pub struct Quarantine {
    /// By policy: the version found at fault, and what is enforced instead.
    policies: BTreeMap<ObjectRef, (Arc<Policy>, Arc<Policy>)>,
    /// The last list given to [`Quarantine::apply`] and its result: an unchanged list
    /// gives the same list again, which the incremental compiler's caches rely on.
    last: Option<(SharedList<Policy>, SharedList<Policy>)>,
}

impl Quarantine {
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    pub fn insert(&mut self, culprit: Arc<Policy>, stand_in: Policy) {
        self.policies.insert(culprit.id.clone(), (culprit, Arc::new(stand_in)));
        self.last = None;
    }

    /// `policies` with each quarantined version replaced by its stand-in. Entries whose
    /// object changed or went are released first (the new version gets its chance).
    pub fn apply(&mut self, policies: &SharedList<Policy>) -> SharedList<Policy> {
        if self.policies.is_empty() {
            return Arc::clone(policies);
        }
        if let Some((given, result)) = &self.last
            && Arc::ptr_eq(given, policies)
        {
            return Arc::clone(result);
        }
        let mut still = BTreeMap::new();
        let replaced: Vec<Arc<Policy>> = policies
            .iter()
            .map(|p| match self.policies.remove(&p.id) {
                Some((version, stand_in)) if Arc::ptr_eq(&version, p) || *version == **p => {
                    let out = Arc::clone(&stand_in);
                    still.insert(p.id.clone(), (version, stand_in));
                    out
                }
                Some(_) => {
                    tracing::info!(policy = %p.id, "a quarantined policy changed: trying its new version");
                    Arc::clone(p)
                }
                None => Arc::clone(p),
            })
            .collect();
        for id in self.policies.keys() {
            tracing::info!(policy = %id, "a quarantined policy is gone");
        }
        self.policies = still;
        let replaced = Arc::new(replaced);
        self.last = Some((Arc::clone(policies), Arc::clone(&replaced)));
        replaced
    }
}

/// The node's [`NftTarget`], which quarantines a policy that makes a full sync fail
/// instead of failing every sync on it.
pub struct Quarantining<N: Nftables> {
    target: NftTarget<N>,
    quarantine: Quarantine,
}

impl<N: Nftables + Send + 'static> Quarantining<N> {
    pub fn new(target: NftTarget<N>) -> Self {
        Quarantining { target, quarantine: Quarantine::default() }
    }

    pub fn target(&self) -> &NftTarget<N> {
        &self.target
    }

    /// Syncs `snapshot` with the quarantined policies replaced; a panic is an error.
    fn try_sync(&mut self, snapshot: &Snapshot, full: bool) -> Result<SyncStats, SyncError> {
        let enforced = Snapshot { policies: self.quarantine.apply(&snapshot.policies), ..snapshot.clone() };
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| self.target.sync(&enforced, full)))
            .unwrap_or_else(|panic| Err(SyncError::from_panic(panic.as_ref())));
        result.map(|mut stats| {
            stats.fail_closed_policies += self.quarantine.len();
            stats
        })
    }

    /// The policy, among those isolating a pod of this node, whose rules alone make the
    /// node's ruleset fail to compile or be accepted by the kernel.
    fn find_culprit(&self, snapshot: &Snapshot) -> Option<Arc<Policy>> {
        let config = self.target.config();
        let namespaces = Arc::new(namespace_map(snapshot.namespaces.iter().map(|n| (**n).clone())));
        let local: Vec<_> = snapshot.pods.iter().filter(|p| *p.node == *config.node && !p.ips.is_empty()).collect();
        // The snapshot's policies as they are (quarantined ones too: they still fail).
        let candidates: Vec<Arc<Policy>> = snapshot
            .policies
            .iter()
            .filter(|p| {
                local.iter().any(|pod| [Direction::Ingress, Direction::Egress].into_iter().any(|d| p.isolates(pod, d)))
            })
            .cloned()
            .collect();
        let nft = self.target.nftables();
        culprit(&candidates, |only| {
            // With the cluster policies: they are compiled with every candidate (and alone
            // first: if they fail by themselves, no NetworkPolicy is the culprit).
            let cluster =
                Cluster::from_sorted(Arc::clone(&namespaces), Arc::clone(&snapshot.pods), Arc::new(only.to_vec()));
            let cluster = crate::agent::nft_target::with_tiers(cluster, snapshot);
            // A panic (compiling, or in the backend) fails as a refusal does.
            std::panic::catch_unwind(AssertUnwindSafe(|| nft.check(&full_sync(&compile(&cluster, config))).is_err()))
                .unwrap_or(true)
        })
    }
}

impl<N: Nftables + Send + 'static> SyncTarget for Quarantining<N> {
    fn sync(&mut self, snapshot: &Snapshot, full: bool) -> Result<SyncStats, SyncError> {
        let error = match self.try_sync(snapshot, full) {
            Err(e) if full && matches!(e, SyncError::Apply(_) | SyncError::Panic(_) | SyncError::Compile(_)) => e,
            done => return done,
        };
        let Some(culprit) = self.find_culprit(snapshot) else { return Err(error) };
        // The stand-in keeps what the policy selects isolated; if even that fails, its
        // whole namespace is isolated both ways.
        for whole_namespace in [false, true] {
            let reason = format!("this node could not enforce it: {error}");
            tracing::error!(
                namespace = %culprit.id.namespace,
                name = %culprit.id.name,
                %error,
                whole_namespace,
                "NetworkPolicy {} quarantined: enforced fail-closed (it isolates what it selects and allows nothing) until it changes",
                culprit.id
            );
            self.quarantine.insert(Arc::clone(&culprit), stand_in(&culprit, &reason, whole_namespace));
            if let Ok(stats) = self.try_sync(snapshot, true) {
                return Ok(stats);
            }
        }
        Err(error)
    }

    fn cleanup(&mut self) -> Result<(), SyncError> {
        self.target.cleanup()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bisection_finds_the_one_candidate_at_fault_in_logarithmic_calls() {
        for n in 1..200usize {
            for bad in [0, n / 3, n - 1] {
                let candidates: Vec<usize> = (0..n).collect();
                let mut calls = 0;
                let found = culprit(&candidates, |s| {
                    calls += 1;
                    s.contains(&bad)
                });
                assert_eq!(found, Some(bad), "n={n}");
                let log = usize::BITS - n.leading_zeros();
                assert!(calls <= 2 * log as usize + 2, "n={n}: {calls} calls");
            }
        }
    }

    #[test]
    fn no_culprit_when_the_failure_is_not_the_candidates_or_only_a_combination_fails() {
        let candidates: Vec<usize> = (0..10).collect();
        assert_eq!(culprit(&candidates, |_| true), None, "fails without any candidate");
        assert_eq!(culprit(&candidates, |_| false), None, "nothing fails");
        assert_eq!(culprit(&candidates, |s| s.contains(&1) && s.contains(&8)), None);
        assert_eq!(culprit(&[] as &[usize], |_| true), None);
    }

    fn policy(name: &str, app: &str) -> Arc<Policy> {
        let selector = Selector::new(vec![crate::policy::selector::Requirement {
            key: "app".into(),
            operator: crate::policy::selector::Operator::In([app.to_string()].into()),
        }]);
        Arc::new(Policy {
            id: ObjectRef::new("shop", name),
            pod_selector: selector,
            ingress: Some(vec![crate::policy::model::Rule { peers: None, ports: None }]),
            egress: None,
            quarantined: None,
        })
    }

    #[test]
    fn a_quarantined_version_is_replaced_until_its_object_changes_or_goes() {
        let (bad, good) = (policy("bad", "db"), policy("good", "web"));
        let mut q = Quarantine::default();
        q.insert(Arc::clone(&bad), stand_in(&bad, "the kernel refused its rules", false));
        let list: SharedList<Policy> = Arc::new(vec![Arc::clone(&bad), Arc::clone(&good)]);
        let enforced = q.apply(&list);
        assert_eq!(enforced[0].ingress, Some(vec![]), "isolates, allows nothing");
        assert_eq!(enforced[0].pod_selector, bad.pod_selector);
        assert!(enforced[0].quarantined.is_some());
        assert!(Arc::ptr_eq(&enforced[1], &good));
        assert_eq!(q.len(), 1);

        let fixed = Arc::new(Policy { ingress: Some(vec![]), ..(*bad).clone() });
        let enforced = q.apply(&Arc::new(vec![Arc::clone(&fixed), Arc::clone(&good)]));
        assert!(Arc::ptr_eq(&enforced[0], &fixed), "the new version gets its chance");
        assert!(q.is_empty());
    }

    /// A backend that panics on any transaction holding the rules of `shop/bad`.
    #[derive(Default)]
    struct PanicsOnBad(crate::nft::fake::FakeNftables);

    impl Nftables for PanicsOnBad {
        fn apply(&mut self, tx: &crate::nft::Transaction) -> Result<(), crate::nft::NftError> {
            assert!(!tx.render().contains("shop/bad ingress rule"), "the backend cannot take it");
            self.0.apply(tx)
        }
        fn check(&self, tx: &crate::nft::Transaction) -> Result<(), crate::nft::NftError> {
            assert!(!tx.render().contains("shop/bad ingress rule"), "the backend cannot take it");
            self.0.check(tx)
        }
        fn list(&self, table: &str) -> Result<String, crate::nft::NftError> {
            self.0.list(table)
        }
        fn counters(&self, table: &str) -> Result<Vec<crate::nft::CounterValue>, crate::nft::NftError> {
            self.0.counters(table)
        }
    }

    #[test]
    fn a_policy_that_makes_the_sync_panic_is_quarantined_and_the_others_are_applied() {
        // Sorted by namespace and name, as the stores keep them.
        let db = crate::policy::model::Pod {
            ips: "192.0.2.2".parse::<std::net::IpAddr>().unwrap().into(),
            ..(*crate::policy::model::test_pod("shop", "db", &[("app", "db")])).clone()
        };
        let pods = vec![Arc::new(db), crate::policy::model::test_pod("shop", "web", &[("app", "web")])];
        let snapshot = Snapshot {
            namespaces: Arc::new(vec![Arc::new(crate::policy::model::Namespace {
                name: "shop".into(),
                labels: Default::default(),
            })]),
            pods: Arc::new(pods),
            policies: Arc::new(vec![policy("bad", "web"), policy("good", "db")]),
            ..Snapshot::default()
        };
        let mut target = Quarantining::new(NftTarget::new(PanicsOnBad::default(), "node-a", "t"));
        let stats = target.sync(&snapshot, true).expect("the rest is applied");
        assert_eq!(stats.fail_closed_policies, 1);
        let applied = crate::nft::render::ruleset(target.target().last_applied().expect("applied"));
        assert!(applied.contains("shop/good ingress rule 0"), "{applied}");
        assert!(!applied.contains("shop/bad ingress rule"), "{applied}");
        assert!(applied.contains("shop/web ingress: no policy allows"), "web stays isolated:\n{applied}");
        // The next syncs keep it quarantined without searching again.
        assert_eq!(target.sync(&snapshot, false).expect("nothing to do").transaction_ops, 0);
    }

    #[test]
    fn the_whole_namespace_stand_in_isolates_every_pod_both_ways() {
        let p = stand_in(&policy("bad", "db"), "why", true);
        assert_eq!(p.pod_selector, Selector::everything());
        assert_eq!((p.ingress, p.egress), (Some(vec![]), Some(vec![])));
    }
}
