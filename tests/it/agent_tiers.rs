//! The agent and the cluster-wide tiers against the in-process fake apiserver (real kube
//! client) and the fake nftables: CRDs missing, installed later and deleted; cluster
//! policies converted, changed, deleted, failing closed; `domainNames` reported. Verdicts
//! are read from the table the agent programmed, by the ruleset interpreter.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kube::runtime::watcher;
use netpol::agent::nft_target::NftTarget;
use netpol::agent::quarantine::Quarantining;
use netpol::agent::watch::{Resource, WatchOptions};
use netpol::agent::{ClusterWatch, Metrics, SyncLoop, SyncLoopConfig, SyncState, Trigger, admin};
use netpol::nft::fake::FakeNftables;
use netpol::nft::interpret::{Fate, Interpreter, Packet};
use netpol::nft::ir::Hook;
use netpol::nft::render;
use netpol::testkit::apiserver::{FakeApiServer, Kind};
use netpol::testkit::objects::{namespace, pod};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

const NODE: &str = "node-a";
const TABLE: &str = "netpol_tiers";
/// shop/web-1, on this node.
const WEB: &str = "192.0.2.1";
/// ops/client-1, on another node.
const CLIENT: &str = "192.0.2.2";
/// An address outside the cluster.
const OUTSIDE: &str = "198.51.100.7";

// ---------------------------------------------------------------- objects

fn seed(server: &FakeApiServer) {
    server.apply(&namespace("shop", &[("team", "a")])).unwrap();
    server.apply(&namespace("ops", &[("team", "b")])).unwrap();
    server.apply(&pod("shop", "web-1", NODE, WEB, &[("app", "web")])).unwrap();
    server.apply(&pod("ops", "client-1", "node-b", CLIENT, &[("app", "client")])).unwrap();
}

/// A ClusterNetworkPolicy (v1beta1) in `tier` whose subject is namespace `shop`, with one
/// ingress rule: `action` from the pods of namespaces labelled `team: b`.
fn cnp(name: &str, tier: &str, priority: u16, action: &str) -> Value {
    json!({
        "apiVersion": "policy.networking.k8s.io/v1beta1",
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": name},
        "spec": {
            "tier": tier,
            "priority": priority,
            "subject": {"namespaces": {"matchLabels": {"team": "a"}}},
            "ingress": [{"name": "from-ops", "action": action, "from": [{"namespaces": {"matchLabels": {"team": "b"}}}]}],
        },
    })
}

/// An AdminNetworkPolicy (v1alpha1) on namespace `shop`: `action` for ingress from `team: b`.
fn anp(name: &str, priority: u16, action: &str) -> Value {
    json!({
        "apiVersion": "policy.networking.k8s.io/v1alpha1",
        "kind": "AdminNetworkPolicy",
        "metadata": {"name": name},
        "spec": {
            "priority": priority,
            "subject": {"namespaces": {"matchLabels": {"team": "a"}}},
            "ingress": [{"action": action, "from": [{"namespaces": {"matchLabels": {"team": "b"}}}]}],
        },
    })
}

// ---------------------------------------------------------------- harness

struct Agent {
    watch: ClusterWatch,
    nft: Arc<Mutex<FakeNftables>>,
    status: tokio::sync::watch::Receiver<SyncState>,
    metrics: Metrics,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Agent {
    /// The watches (a missing CRD probed every 100-200 ms) and the sync loop over the
    /// agent's real target with fake nftables.
    fn start(server: &FakeApiServer) -> Agent {
        let trigger = Trigger::new();
        let options =
            WatchOptions { crd_recheck: Duration::from_millis(100), ..WatchOptions::new(watcher::Config::default()) };
        let (watch, driver) = ClusterWatch::start_with(server.client(), options, trigger.clone());
        let nft: Arc<Mutex<FakeNftables>> = Arc::default();
        let target = Quarantining::new(NftTarget::new(nft.clone(), NODE, TABLE));
        let config = SyncLoopConfig {
            debounce: Duration::from_millis(20),
            retry_initial: Duration::from_millis(50),
            retry_max: Duration::from_secs(1),
            heartbeat: Duration::from_millis(50),
            ..SyncLoopConfig::default()
        };
        let metrics = Metrics::new();
        let sync_loop = SyncLoop::new(target, watch.clone(), trigger, config).with_metrics(metrics.clone());
        let status = sync_loop.status();
        let tasks = vec![
            tokio::spawn(async move {
                let _ = driver.await;
            }),
            tokio::spawn(async move {
                sync_loop.run(std::future::pending::<()>()).await;
            }),
        ];
        Agent { watch, nft, status, metrics, tasks }
    }

    fn nft(&self) -> MutexGuard<'_, FakeNftables> {
        self.nft.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the programmed table does with a TCP packet to `port` (`None`: no table yet).
    fn fate(&self, src: &str, dst: &str, port: u16) -> Option<Fate> {
        let nft = self.nft();
        let ruleset = nft.ruleset(TABLE)?;
        let packet = Packet::new(src.parse().unwrap(), dst.parse().unwrap(), 6, port);
        Some(Interpreter::new(ruleset).hook(Hook::Forward, &packet))
    }

    /// The programmed table, rendered.
    fn table(&self) -> String {
        self.nft().ruleset(TABLE).map(render::ruleset).unwrap_or_default()
    }

    async fn until(&self, what: &str, cond: impl Fn(&Agent) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; table:\n{}\nlast sync: {:?}",
                self.table(),
                self.status.borrow().last_error
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn readiness(&self) -> Result<(), String> {
        admin::readiness(&self.status.borrow(), Some(self.watch.counters()), &admin::ProbeLimits::default())
    }

    fn metrics_text(&self) -> String {
        self.metrics.encode(Some(self.watch.counters()), &self.status.borrow())
    }
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_syncs_and_becomes_ready_when_no_cluster_policy_crd_is_installed() {
    let server = FakeApiServer::start().await.unwrap();
    seed(&server);
    let agent = Agent::start(&server);
    agent.until("the first sync", |a| a.fate(CLIENT, WEB, 80).is_some()).await;
    agent.until("ready", |a| a.readiness().is_ok()).await;

    let counters = agent.watch.counters();
    for r in Resource::CRDS {
        assert!(counters.listed(r), "{} counts as listed (empty)", r.as_str());
        assert_eq!(counters.crd_installed(r), Some(false), "{}", r.as_str());
    }
    assert_eq!(agent.fate(CLIENT, WEB, 80), Some(Fate::Accept), "no policy of any tier: default allow");
    assert!(agent.watch.snapshot().cluster_policies.is_empty());
    let metrics = agent.metrics_text();
    for r in Resource::CRDS {
        let line = format!("netpol_crd_installed{{resource=\"{}\"}} 0", r.as_str());
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
    // The 404s are probed again (not once and forgotten), and never listed as objects.
    let probes_before = agent.watch.counters().lists(Resource::AdminNetworkPolicies);
    assert_eq!(probes_before, 1, "a missing CRD counts one list, the first");
    assert_eq!(server.list_requests(Kind::AdminNetworkPolicy), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crd_installed_later_is_picked_up_and_enforced_and_goes_with_its_crd() {
    let server = FakeApiServer::start().await.unwrap();
    seed(&server);
    let agent = Agent::start(&server);
    agent.until("the first sync", |a| a.fate(CLIENT, WEB, 80) == Some(Fate::Accept)).await;
    assert!(!agent.table().contains("Admin tier"));

    server.install_crd(Kind::AdminNetworkPolicy);
    server.apply_json(anp("ops-out", 10, "Deny")).unwrap();
    agent.until("the Admin deny", |a| a.fate(CLIENT, WEB, 80) == Some(Fate::Drop)).await;
    let table = agent.table();
    assert!(table.contains("comment \"Admin tier ingress: ops-out\""), "the tier chain:\n{table}");
    assert_eq!(agent.watch.counters().crd_installed(Resource::AdminNetworkPolicies), Some(true));
    assert!(agent.metrics_text().contains("netpol_crd_installed{resource=\"adminnetworkpolicies\"} 1"));
    assert_eq!(agent.fate(OUTSIDE, WEB, 80), Some(Fate::Accept), "only team b is denied");

    // Deleting the CRD deletes its policies: the agent stops enforcing them, and probes again.
    server.uninstall_crd(Kind::AdminNetworkPolicy);
    agent.until("the policy gone with its CRD", |a| a.fate(CLIENT, WEB, 80) == Some(Fate::Accept)).await;
    agent
        .until("the CRD reported missing", |a| {
            a.watch.counters().crd_installed(Resource::AdminNetworkPolicies) == Some(false)
        })
        .await;
    assert!(!agent.table().contains("Admin tier"));
    agent.until("ready", |a| a.readiness().is_ok()).await;

    // And a ClusterNetworkPolicy CRD serving only v1alpha2 is read in v1alpha2.
    server.install_crd_version(Kind::ClusterNetworkPolicy, "policy.networking.k8s.io/v1alpha2");
    let mut old = cnp("ops-out-v1alpha2", "Admin", 5, "Deny");
    old["apiVersion"] = "policy.networking.k8s.io/v1alpha2".into();
    server.apply_json(old).unwrap();
    agent.until("the v1alpha2 deny", |a| a.fate(CLIENT, WEB, 80) == Some(Fate::Drop)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_network_policy_change_of_priority_or_action_resyncs_and_a_deleted_one_goes() {
    let server = FakeApiServer::start().await.unwrap();
    seed(&server);
    server.install_crd(Kind::ClusterNetworkPolicy);
    // Lower priority first: the Accept at 10 wins over the Deny at 20.
    server.apply_json(cnp("accept-ops", "Admin", 10, "Accept")).unwrap();
    server.apply_json(cnp("deny-ops", "Admin", 20, "Deny")).unwrap();
    let agent = Agent::start(&server);
    agent.until("the Accept first", |a| a.fate(CLIENT, WEB, 80) == Some(Fate::Accept)).await;
    let names = |a: &Agent| -> Vec<String> {
        a.watch.snapshot().cluster_policies.iter().map(|p| format!("{}@{}", p.id.name, p.priority)).collect()
    };
    assert_eq!(names(&agent), ["accept-ops@10", "deny-ops@20"]);

    server.apply_json(cnp("accept-ops", "Admin", 30, "Accept")).unwrap();
    agent.until("the Deny first after the priority change", |a| a.fate(CLIENT, WEB, 80) == Some(Fate::Drop)).await;
    assert_eq!(names(&agent), ["deny-ops@20", "accept-ops@30"]);

    // Pass hands over to the NetworkPolicy tier (none here: default allow).
    server.apply_json(cnp("deny-ops", "Admin", 20, "Pass")).unwrap();
    agent.until("the Pass after the action change", |a| a.fate(CLIENT, WEB, 80) == Some(Fate::Accept)).await;
    server.apply_json(cnp("deny-ops", "Admin", 20, "Deny")).unwrap();
    agent.until("the Deny again", |a| a.fate(CLIENT, WEB, 80) == Some(Fate::Drop)).await;

    server.delete(Kind::ClusterNetworkPolicy, "", "deny-ops").unwrap();
    agent.until("the deleted Deny gone", |a| a.fate(CLIENT, WEB, 80) == Some(Fate::Accept)).await;
    assert_eq!(names(&agent), ["accept-ops@30"]);
    server.delete(Kind::ClusterNetworkPolicy, "", "accept-ops").unwrap();
    agent.until("no tier chain left", |a| !a.table().contains("Admin tier")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_of_a_newer_api_fails_closed_a_pass_rule_denies_everything_and_an_accept_rule_matches_nothing() {
    let server = FakeApiServer::start().await.unwrap();
    seed(&server);
    server.install_crd(Kind::ClusterNetworkPolicy);
    // An Accept from team b at 5, then a Pass rule whose only peer is a field of a newer
    // API: the Accept's peer is unknown too, so it matches nothing, and the Pass denies all.
    let mut newer = cnp("from-the-future", "Admin", 5, "Accept");
    newer["spec"]["ingress"] = json!([
        {"action": "Accept", "from": [{"serviceAccounts": {"name": "ops"}}]},
        {"action": "Pass", "from": [{"serviceAccounts": {"name": "ops"}}]},
    ]);
    server.apply_json(newer).unwrap();
    let agent = Agent::start(&server);
    agent.until("the fail-closed deny", |a| a.fate(CLIENT, WEB, 80) == Some(Fate::Drop)).await;
    assert_eq!(agent.fate(OUTSIDE, WEB, 443), Some(Fate::Drop), "everything, not only team b");
    let rules = &agent.watch.snapshot().cluster_policies[0].ingress;
    assert!(rules[0].peers.is_empty() && rules[0].fail_closed.is_some(), "{rules:?}");
    agent.until("ready", |a| a.readiness().is_ok()).await;
    let metrics = agent.metrics_text();
    let line = "netpol_cluster_policies_unenforced_peers{kind=\"ClusterNetworkPolicy\",field=\"unknown\"} 1";
    assert!(metrics.contains(line), "{line} in\n{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_policy_that_fails_conversion_is_denied_at_its_tier_or_reported_unenforced_when_its_subject_is_unreadable()
 {
    let server = FakeApiServer::start().await.unwrap();
    seed(&server);
    server.install_crd(Kind::ClusterNetworkPolicy);
    // Readable subject, a rule the agent cannot read (an action of no known API).
    let mut broken_rules = cnp("broken-rules", "Baseline", 10, "Accept");
    broken_rules["spec"]["ingress"][0]["action"] = "Reject".into();
    server.apply_json(broken_rules).unwrap();
    let agent = Agent::start(&server);
    agent.until("the Baseline deny stand-in", |a| a.fate(OUTSIDE, WEB, 80) == Some(Fate::Drop)).await;
    let snapshot = agent.watch.snapshot();
    assert_eq!(snapshot.fail_closed_cluster_policies, 1);
    let stand_in = &snapshot.cluster_policies[0];
    assert_eq!((stand_in.tier.as_str(), stand_in.priority), ("Baseline", 10));
    assert!(stand_in.egress.is_empty(), "no egress rules: egress untouched");
    assert_eq!(agent.fate(WEB, OUTSIDE, 80), Some(Fate::Accept));
    agent.until("ready", |a| a.readiness().is_ok()).await;

    // Unreadable subject: nobody knows whom to deny. Not enforced, and not ready.
    let mut broken_subject = cnp("broken-subject", "Admin", 1, "Deny");
    broken_subject["spec"]["subject"] = json!({});
    server.apply_json(broken_subject).unwrap();
    agent.until("not ready", |a| a.readiness().is_err()).await;
    let why = agent.readiness().unwrap_err();
    assert!(why.contains("ClusterNetworkPolicy broken-subject"), "{why}");
    assert!(agent.metrics_text().contains("netpol_cluster_policies{state=\"unenforced\"} 1"));
    assert_eq!(agent.watch.snapshot().unenforced_cluster_policies, 1);

    // Not a deny of everything either: without the Baseline stand-in, traffic flows.
    server.delete(Kind::ClusterNetworkPolicy, "", "broken-rules").unwrap();
    agent.until("the stand-in gone", |a| a.fate(CLIENT, WEB, 80) == Some(Fate::Accept)).await;

    // Fixed: ready again, and enforced.
    server.apply_json(cnp("broken-subject", "Admin", 1, "Deny")).unwrap();
    agent.until("ready again", |a| a.readiness().is_ok()).await;
    agent.until("the fixed Deny", |a| a.fate(CLIENT, WEB, 80) == Some(Fate::Drop)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_names_peers_match_nothing_and_are_reported_once_per_policy() {
    let server = FakeApiServer::start().await.unwrap();
    seed(&server);
    server.install_crd(Kind::ClusterNetworkPolicy);
    let names = |name: &str| {
        let mut p = cnp(name, "Admin", 10, "Accept");
        p["spec"]["ingress"] = Value::Null;
        p["spec"]["egress"] = json!([{"action": "Accept", "to": [{"domainNames": ["example.com", "*.example.org"]}]}]);
        p
    };
    server.apply_json(names("to-example")).unwrap();
    // A Deny of all egress below it: the names allow nothing, so the Deny decides.
    let mut deny_all = cnp("deny-egress", "Admin", 20, "Deny");
    deny_all["spec"]["ingress"] = Value::Null;
    deny_all["spec"]["egress"] = json!([{"action": "Deny", "to": [{"networks": ["0.0.0.0/0"]}]}]);
    server.apply_json(deny_all).unwrap();
    let agent = Agent::start(&server);
    agent.until("the egress deny", |a| a.fate(WEB, "93.184.215.14", 443) == Some(Fate::Drop)).await;

    let line = "netpol_cluster_policies_unenforced_peers{kind=\"ClusterNetworkPolicy\",field=\"domainNames\"} 1";
    assert!(agent.metrics_text().contains(line), "{line} in\n{}", agent.metrics_text());
    // The same policy again (a status update, say) is the same one policy.
    server.apply_json(names("to-example")).unwrap();
    server.apply_json(names("to-example-too")).unwrap();
    agent.until("two policies with names", |a| a.watch.snapshot().cluster_policies.len() == 3).await;
    let line = "netpol_cluster_policies_unenforced_peers{kind=\"ClusterNetworkPolicy\",field=\"domainNames\"} 2";
    assert!(agent.metrics_text().contains(line), "{line} in\n{}", agent.metrics_text());
    agent.until("ready", |a| a.readiness().is_ok()).await;
}
