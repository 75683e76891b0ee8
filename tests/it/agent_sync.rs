//! The whole agent pipeline against the in-process fake apiserver (real kube client) and
//! the fake nftables: watches → snapshot → convert → compile → diff → one transaction.
//! The fake's table must always equal the compiled ruleset of the cluster as it is.

use crate::common;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::runtime::watcher;
use netpol::agent::nft_target::{self, NftTarget, is_full_sync};
use netpol::agent::quarantine::Quarantining;
use netpol::agent::watch::Resource;
use netpol::agent::{ClusterWatch, SyncLoop, SyncLoopConfig, SyncState, SyncTarget, Trigger};
use netpol::compile::{NodeConfig, compile};
use netpol::nft::fake::FakeNftables;
use netpol::nft::interpret::{Fate, Interpreter, Packet};
use netpol::nft::ir::Hook;
use netpol::nft::{NftError, Nftables, Transaction, render};
use netpol::testkit::agent_process::{AgentLaunch, AgentProcess, NftRoute};
use netpol::testkit::apiserver::{FakeApiServer, Kind};
use netpol::testkit::mirror::MirroredApi;
use netpol::testkit::objects::{labels, namespace, pod};
use tokio::task::JoinHandle;

const NODE: &str = "node-a";
const TABLE: &str = "netpol_sync";

// ---------------------------------------------------------------- builders

/// Pods labelled `selects` accept ingress from pods labelled `from` on `port`.
fn policy(ns: &str, name: &str, selects: &[(&str, &str)], from: &[(&str, &str)], port: i32) -> NetworkPolicy {
    NetworkPolicy {
        metadata: ObjectMeta { name: Some(name.into()), namespace: Some(ns.into()), ..ObjectMeta::default() },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector { match_labels: labels(selects), ..LabelSelector::default() }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(vec![NetworkPolicyPeer {
                    pod_selector: Some(LabelSelector { match_labels: labels(from), ..LabelSelector::default() }),
                    ..NetworkPolicyPeer::default()
                }]),
                ports: Some(vec![NetworkPolicyPort {
                    port: Some(IntOrString::Int(port)),
                    protocol: Some("TCP".into()),
                    ..NetworkPolicyPort::default()
                }]),
            }]),
            ..NetworkPolicySpec::default()
        }),
    }
}

/// A policy the converter rejects: its ipBlock is not a CIDR.
fn invalid_policy(ns: &str, name: &str) -> NetworkPolicy {
    let mut p = policy(ns, name, &[], &[], 80);
    let rule = &mut p.spec.as_mut().unwrap().ingress.as_mut().unwrap()[0];
    rule.from = Some(vec![NetworkPolicyPeer {
        ip_block: Some(IPBlock { cidr: "10.0.0.0/33".into(), except: None }),
        ..NetworkPolicyPeer::default()
    }]);
    p
}

// ---------------------------------------------------------------- a fake that can fail

#[derive(Default)]
struct Flaky {
    fake: FakeNftables,
    fail_next: u32,
    /// Refuses (to apply or to check) every transaction whose text holds this, as a
    /// kernel refuses a rule it cannot take.
    refuse_containing: Option<String>,
    /// Every transaction accepted, in order.
    history: Vec<Transaction>,
    failures: u32,
}

impl Nftables for Flaky {
    fn apply(&mut self, tx: &Transaction) -> Result<(), NftError> {
        if self.fail_next > 0 {
            self.fail_next -= 1;
            self.failures += 1;
            return Err(NftError::Rejected("injected failure".into()));
        }
        self.refuses(tx)?;
        self.fake.apply(tx)?;
        self.history.push(tx.clone());
        Ok(())
    }
    fn check(&self, tx: &Transaction) -> Result<(), NftError> {
        self.refuses(tx)?;
        self.fake.check(tx)
    }
    fn list(&self, table: &str) -> Result<String, NftError> {
        self.fake.list(table)
    }
    fn counters(&self, table: &str) -> Result<Vec<netpol::nft::CounterValue>, NftError> {
        self.fake.counters(table)
    }
}

impl Flaky {
    fn refuses(&self, tx: &Transaction) -> Result<(), NftError> {
        match &self.refuse_containing {
            Some(text) if tx.render().contains(text.as_str()) => {
                Err(NftError::Rejected(format!("Error: Could not process rule: {text}")))
            }
            _ => Ok(()),
        }
    }
}

// ---------------------------------------------------------------- harness

/// The fake apiserver, a mirror of what it holds, and the agent's sync loop over an
/// `NftTarget` sharing its fake nftables with the test.
struct World {
    api: MirroredApi,
    nft: Arc<Mutex<Flaky>>,
    tasks: Vec<JoinHandle<()>>,
    /// The agent's watch and sync-loop status, once started.
    agent: Option<(ClusterWatch, tokio::sync::watch::Receiver<SyncState>)>,
}

impl Drop for World {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// `world.pod(..)`, `world.server`, `world.snapshot()`: the mirrored API's.
impl std::ops::Deref for World {
    type Target = MirroredApi;
    fn deref(&self) -> &MirroredApi {
        &self.api
    }
}

impl std::ops::DerefMut for World {
    fn deref_mut(&mut self) -> &mut MirroredApi {
        &mut self.api
    }
}

impl World {
    async fn new() -> World {
        let server = FakeApiServer::start().await.unwrap();
        World { api: MirroredApi::new(server), nft: Arc::default(), tasks: Vec::new(), agent: None }
    }

    fn start_agent(&mut self) {
        let trigger = Trigger::new();
        let (watch, driver) =
            ClusterWatch::start(self.server.client(), watcher::Config::default().page_size(2), trigger.clone());
        let target = Quarantining::new(NftTarget::new(self.nft.clone(), NODE, TABLE));
        let config = SyncLoopConfig {
            debounce: Duration::from_millis(20),
            retry_initial: Duration::from_millis(50),
            retry_max: Duration::from_secs(1),
            // An idle loop goes around this often (see `common::loop_went_around`).
            heartbeat: Duration::from_millis(50),
            ..SyncLoopConfig::default()
        };
        let sync_loop = SyncLoop::new(target, watch.clone(), trigger, config);
        self.agent = Some((watch, sync_loop.status()));
        self.tasks.push(tokio::spawn(async move {
            let _ = driver.await;
        }));
        self.tasks.push(tokio::spawn(async move {
            sync_loop.run(std::future::pending::<()>()).await;
        }));
    }

    fn nft(&self) -> MutexGuard<'_, Flaky> {
        self.nft.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The compiled ruleset of the cluster as the test wrote it, rendered.
    fn expected(&self) -> String {
        let (cluster, _) = nft_target::cluster(&self.snapshot());
        render::ruleset(&compile(&cluster, &NodeConfig { table: TABLE.into(), ..NodeConfig::new(NODE) }))
    }

    /// Waits until the fake's table equals the expected one.
    async fn converged(&self, what: &str) {
        let expected = self.expected();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let dump = self.nft().fake.dump_without_idle_sets();
            if dump == expected {
                return;
            }
            if Instant::now() > deadline {
                panic!("timed out converging after {what}:\n--- expected\n{expected}\n--- got\n{dump}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn history_len(&self) -> usize {
        self.nft().history.len()
    }

    /// Transactions applied since `mark`: at least one, and none of them a full sync.
    fn assert_incremental_since(&self, mark: usize, what: &str) {
        let nft = self.nft();
        let since = &nft.history[mark..];
        assert!(!since.is_empty(), "{what}: nothing applied");
        for tx in since {
            assert!(!is_full_sync(tx), "{what}: expected a diff, got a full sync:\n{}", tx.render());
        }
    }

    /// Two namespaces, pods on this node and another, one policy.
    fn seed(&mut self) {
        self.ns(namespace("shop", &[("team", "a")]));
        self.ns(namespace("ops", &[("team", "b")]));
        self.pod(pod("shop", "web-1", NODE, "192.0.2.1", &[("segment", "frontend")]));
        self.pod(pod("shop", "web-2", "node-b", "192.0.2.2", &[("segment", "frontend")]));
        self.pod(pod("shop", "db-1", NODE, "192.0.2.3", &[("segment", "backend")]));
        self.policy(policy("shop", "backend-from-frontend", &[("segment", "backend")], &[("segment", "frontend")], 80));
    }
}

async fn seeded_and_synced() -> World {
    let mut w = World::new().await;
    w.seed();
    w.start_agent();
    w.converged("the initial lists").await;
    w
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_programmed_until_all_three_kinds_have_listed_and_the_first_sync_is_full() {
    let mut w = World::new().await;
    w.seed();
    w.server.pause_kind(Kind::NetworkPolicy);
    w.start_agent();
    let (watch, status) = w.agent.clone().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(watch.counters().listed(Resource::Pods) && watch.counters().listed(Resource::Namespaces)) {
        assert!(Instant::now() < deadline, "pods and namespaces never listed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The loop has woken for those lists and declined to sync.
    common::loop_went_around(&status).await;
    assert!(!watch.is_ready());
    assert_eq!(w.nft().history.len(), 0, "programmed before NetworkPolicies listed");
    assert!(w.nft().fake.ruleset(TABLE).is_none());

    w.server.resume_kind(Kind::NetworkPolicy);
    w.converged("the initial lists").await;
    let nft = w.nft();
    assert!(is_full_sync(&nft.history[0]), "the first sync must replace the table");
    // The policy is really there: the backend pod is isolated on this node.
    assert!(nft.fake.dump().contains("192.0.2.3"), "{}", nft.fake.dump());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_adds_relabels_deletes_and_policy_changes_converge_through_diffs() {
    let mut w = seeded_and_synced().await;

    let mark = w.history_len();
    w.pod(pod("shop", "web-3", NODE, "192.0.2.4", &[("segment", "frontend")]));
    w.converged("a pod add").await;
    w.assert_incremental_since(mark, "a pod add");

    let mark = w.history_len();
    w.pod(pod("shop", "web-3", NODE, "192.0.2.4", &[("segment", "backend")]));
    w.converged("a relabel").await;
    w.assert_incremental_since(mark, "a relabel");

    let mark = w.history_len();
    w.delete_pod("shop", "web-1");
    w.converged("a pod delete").await;
    w.assert_incremental_since(mark, "a pod delete");

    let mark = w.history_len();
    w.policy(policy("shop", "backend-from-frontend", &[("segment", "backend")], &[("segment", "frontend")], 8080));
    w.converged("a policy change").await;
    w.assert_incremental_since(mark, "a policy change");

    let mark = w.history_len();
    w.policy(policy("shop", "backend-ssh-from-frontend", &[("segment", "backend")], &[("segment", "frontend")], 22));
    w.converged("a new policy").await;
    w.assert_incremental_since(mark, "a new policy");
}

/// Waits until `holds` (on the fake's applied table), failing after 15 s.
async fn until(w: &World, what: &str, holds: impl Fn(&World) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !(w.nft().fake.ruleset(TABLE).is_some() && holds(w)) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}:\n{}", w.nft().fake.dump());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A pod that fails conversion takes no part: its address is no known pod, so with the
/// node's pod CIDRs the unknown-pod guard cuts it off both ways. Without them it stays open,
/// as every pod the agent does not know (the warning, `netpol_skipped_objects` and
/// `netpol_unknown_pod_guard_enabled 0` say so).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_pod_that_fails_conversion_is_cut_off_by_the_unknown_pod_guard() {
    let mut w = World::new().await;
    w.seed();
    // A label value the API server would never have stored.
    w.pod(pod("shop", "broken", NODE, "192.0.2.9", &[("segment", "not a label value!")]));
    let mut snapshot = w.snapshot();
    assert_eq!(snapshot.skipped_objects, 1);
    let fate = |snapshot: &netpol::agent::Snapshot, src: &str, dst: &str| {
        let mut target = NftTarget::new(FakeNftables::new(), NODE, TABLE);
        target.sync(snapshot, true).unwrap();
        let pkt = Packet::new(src.parse().unwrap(), dst.parse().unwrap(), 6, 80);
        Interpreter::new(target.last_applied().unwrap()).hook(Hook::Forward, &pkt)
    };
    assert_eq!(fate(&snapshot, "192.0.2.9", "192.0.2.1"), Fate::Accept, "no pod CIDRs: open, as any unknown pod");

    // This node's pods: web-1 (.1), db-1 (.3) and the broken one (.9); web-2 (.2) is elsewhere.
    snapshot.pod_cidrs = ["192.0.2.0/31", "192.0.2.3/32", "192.0.2.8/30"].map(|c| c.parse().unwrap()).to_vec();
    assert_eq!(fate(&snapshot, "192.0.2.9", "192.0.2.1"), Fate::Drop, "from the broken pod");
    assert_eq!(fate(&snapshot, "192.0.2.1", "192.0.2.9"), Fate::Drop, "to the broken pod");
    assert_eq!(fate(&snapshot, "192.0.2.3", "192.0.2.1"), Fate::Accept, "known local pods are untouched");
    assert_eq!(fate(&snapshot, "198.51.100.7", "192.0.2.1"), Fate::Accept, "and so is the outside");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_the_kernel_refuses_is_quarantined_fail_closed_and_the_rest_is_enforced() {
    let mut w = World::new().await;
    w.seed();
    // Frontends (web-1 here) accept backends on 443 — but no kernel takes its rules.
    w.policy(policy("shop", "poison", &[("segment", "frontend")], &[("segment", "backend")], 443));
    w.nft().refuse_containing = Some("shop/poison ingress rule".into());
    w.start_agent();
    until(&w, "the table without the poison's rules", |w| forwarded(w, "192.0.2.2", "192.0.2.3", 80) == Fate::Accept)
        .await;
    // Quarantined: web-1 stays isolated, and nothing is allowed to it.
    assert_eq!(forwarded(&w, "192.0.2.3", "192.0.2.1", 443), Fate::Drop);
    assert_eq!(forwarded(&w, "198.51.100.7", "192.0.2.1", 80), Fate::Drop);
    // The rest is enforced.
    assert_eq!(forwarded(&w, "192.0.2.2", "192.0.2.3", 81), Fate::Drop);
    assert!(!w.nft().fake.dump().contains("shop/poison ingress rule"), "none of its rules");

    // A new version of the object gets its chance (the kernel takes it now).
    w.nft().refuse_containing = None;
    w.policy(policy("shop", "poison", &[("segment", "frontend")], &[("segment", "backend")], 8443));
    until(&w, "the new version enforced", |w| forwarded(w, "192.0.2.3", "192.0.2.1", 8443) == Fate::Accept).await;
    w.converged("the new version").await;
}

/// The fate of a new TCP connection `src` -> `dst`:`port` in the fake's applied table, on
/// this node's forward hook.
fn forwarded(w: &World, src: &str, dst: &str, port: u16) -> Fate {
    let nft = w.nft();
    let rs = nft.fake.ruleset(TABLE).expect("the table is programmed");
    let pkt = Packet::new(src.parse().unwrap(), dst.parse().unwrap(), 6, port);
    Interpreter::new(rs).hook(Hook::Forward, &pkt)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_that_fails_conversion_isolates_what_it_selects_while_the_valid_ones_are_enforced() {
    let mut w = World::new().await;
    w.seed();
    w.start_agent();
    w.converged("the initial lists").await;
    // shop/web-1 (192.0.2.1) is selected by no policy: anything reaches it.
    assert_eq!(forwarded(&w, "198.51.100.7", "192.0.2.1", 443), Fate::Accept);

    // Selects every pod of shop for Ingress; its ipBlock is not a CIDR.
    w.policy(invalid_policy("shop", "broken"));
    w.converged("a policy that fails conversion").await;
    assert_eq!(forwarded(&w, "198.51.100.7", "192.0.2.1", 443), Fate::Drop, "web-1 is isolated, nothing allowed");
    assert_eq!(forwarded(&w, "192.0.2.2", "192.0.2.1", 80), Fate::Drop);
    // The valid policy still admits frontends to the backend, and nothing else.
    assert_eq!(forwarded(&w, "192.0.2.2", "192.0.2.3", 80), Fate::Accept);
    assert_eq!(forwarded(&w, "192.0.2.2", "192.0.2.3", 81), Fate::Drop);

    let snapshot = w.snapshot();
    assert_eq!((snapshot.skipped_objects, snapshot.fail_closed_policies), (0, 1));
    let mut target = NftTarget::new(FakeNftables::new(), NODE, TABLE);
    let stats = target.sync(&snapshot, true).unwrap();
    assert_eq!(stats.fail_closed_policies, 1);
    assert_eq!(target.nftables().dump(), w.expected());

    // Fixed, it allows what it says again.
    let mut fixed = invalid_policy("shop", "broken");
    fixed.spec.as_mut().unwrap().ingress.as_mut().unwrap()[0].from = None;
    w.policy(fixed);
    w.converged("the policy fixed").await;
    assert_eq!(forwarded(&w, "198.51.100.7", "192.0.2.1", 80), Fate::Accept);
    assert_eq!(forwarded(&w, "198.51.100.7", "192.0.2.1", 443), Fate::Drop);
    assert_eq!(w.snapshot().fail_closed_policies, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nft_failure_is_retried_and_the_retry_is_a_full_sync() {
    let mut w = seeded_and_synced().await;
    let mark = w.history_len();
    w.nft().fail_next = 1;
    w.pod(pod("shop", "web-3", NODE, "192.0.2.4", &[("segment", "frontend")]));
    w.converged("a pod add after a failure").await;
    let nft = w.nft();
    assert_eq!(nft.failures, 1);
    assert!(is_full_sync(&nft.history[mark]), "the sync after a failure must be full:\n{}", nft.history[mark].render());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_watches_and_dropped_connections_still_converge() {
    let mut w = seeded_and_synced().await;

    w.server.compact();
    w.server.expire_watches();
    w.pod(pod("shop", "web-3", NODE, "192.0.2.4", &[("segment", "frontend")]));
    w.converged("a 410").await;

    w.server.drop_connections();
    w.delete_pod("shop", "web-2");
    w.policy(policy("shop", "backend-from-frontend", &[("segment", "backend")], &[("segment", "frontend")], 443));
    w.converged("dropped connections").await;

    w.server.compact();
    w.server.drop_connections();
    w.pod(pod("shop", "db-2", NODE, "192.0.2.5", &[("segment", "backend")]));
    w.converged("a 410 after dropped connections").await;
}

// ---------------------------------------------------------------- the real binary

use std::process::Command;

/// A throwaway network namespace, deleted on drop (with every table in it).
struct Netns(String);

impl Netns {
    fn new(name: String) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let out = Command::new("ip").args(["netns", "add", &name]).output().unwrap();
        assert!(out.status.success(), "ip netns add {name}: {}", String::from_utf8_lossy(&out.stderr));
        Netns(name)
    }

    /// `nft list table inet <table>` inside the namespace, or `None` if it does not exist.
    fn list(&self, table: &str) -> Option<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "nft", "list", "table", "inet", table])
            .output()
            .unwrap();
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Where a test runs the real binary: a throwaway netns, a table named for the test
/// process, a work dir with a kubeconfig for the world's apiserver.
struct BinaryPlace {
    netns: Netns,
    table: String,
    dir: tempfile::TempDir,
    kubeconfig: std::path::PathBuf,
}

impl BinaryPlace {
    fn new(w: &World, tag: &str) -> BinaryPlace {
        let pid = std::process::id();
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, w.server.kubeconfig_yaml()).unwrap();
        BinaryPlace {
            netns: Netns::new(format!("npl-{tag}-{pid}")),
            table: format!("netpol_{tag}_{pid}"),
            dir,
            kubeconfig,
        }
    }
}

/// The agent process, killed on drop if still running.
/// How long the agent may take to stop on SIGTERM.
const STOP_LIMIT: Duration = Duration::from_secs(10);

/// The real `netpol-agent` against the fake apiserver. The agent runs in the root
/// namespace (to reach the apiserver on 127.0.0.1), but the `nft` it finds first on PATH
/// is a wrapper that runs the real nft inside a throwaway namespace, so the host's
/// ruleset is never touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_binary_programs_its_table_keeps_it_on_sigterm_and_removes_it_with_cleanup_on_exit() {
    if !common::kernel_or_skip() {
        return;
    }
    let mut w = World::new().await;
    w.seed();
    let BinaryPlace { netns, table, dir, kubeconfig } = BinaryPlace::new(&w, "test");
    let launch = |extra: &[&str]| {
        let mut l = AgentLaunch::new(
            env!("CARGO_BIN_EXE_netpol-agent"),
            NODE,
            &table,
            &kubeconfig,
            NftRoute::Netns(netns.0.clone()),
            dir.path(),
        );
        l.extra_args = extra.iter().map(|a| a.to_string()).collect();
        l.spawn("agent.log").unwrap()
    };

    let expected = {
        let (cluster, _) = nft_target::cluster(&w.snapshot());
        compile(&cluster, &NodeConfig { table: table.clone(), ..NodeConfig::new(NODE) })
    };
    let wait_for_table = |agent: &mut AgentProcess| {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(text) = netns.list(&table)
                && expected.chains.keys().all(|c| text.contains(&format!("chain {c} {{")))
            {
                return text;
            }
            if let Some(status) = agent.exited() {
                panic!("netpol-agent exited ({status}) before programming:\n{}", agent.log());
            }
            assert!(Instant::now() < deadline, "the table never appeared with its chains:\n{}", agent.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    // Without --cleanup-on-exit the rules stay in force after SIGTERM.
    let mut agent = launch(&[]);
    let text = wait_for_table(&mut agent);
    assert!(text.contains("192.0.2.3"), "{text}");
    let status = agent.terminate(STOP_LIMIT).unwrap().expect("netpol-agent stops on SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", agent.log());
    assert!(netns.list(&table).is_some(), "the table must survive a plain shutdown");

    // A restart takes the old table over; with --cleanup-on-exit it is removed on SIGTERM.
    let mut agent = launch(&["--cleanup-on-exit"]);
    wait_for_table(&mut agent);
    let status = agent.terminate(STOP_LIMIT).unwrap().expect("netpol-agent stops on SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", agent.log());
    assert!(netns.list(&table).is_none(), "--cleanup-on-exit must delete the table");
}

/// Another program (`nft flush ruleset`, a firewall reload) wiping or editing the agent's
/// table is undone at once, not at the periodic resync (5 minutes here); the agent's own
/// commits, over netlink or through `nft`, are never taken for such a change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_flush_or_edit_of_the_table_is_undone_at_once_and_our_own_commits_are_not_foreign() {
    if !common::kernel_or_skip() {
        return;
    }
    const FOREIGN: &str = "another program changed the table";
    let mut w = World::new().await;
    w.seed();
    let BinaryPlace { netns, table, dir, kubeconfig } = BinaryPlace::new(&w, "foreign");
    let mut launch = AgentLaunch::new(
        env!("CARGO_BIN_EXE_netpol-agent"),
        NODE,
        &table,
        &kubeconfig,
        NftRoute::Netns(netns.0.clone()),
        dir.path(),
    );
    launch.extra_args = vec!["--resync-period".into(), "5m".into()];
    launch.log_level = "info,netpol::nft=debug".into();
    let mut agent = launch.spawn("agent.log").unwrap();

    let expected = |w: &World| {
        let (cluster, _) = nft_target::cluster(&w.snapshot());
        render::ruleset(&compile(&cluster, &NodeConfig { table: table.clone(), ..NodeConfig::new(NODE) }))
    };
    // The kernel's listing, once it holds every chain and address the compiled ruleset has.
    let restored_within = |agent: &mut AgentProcess, want: &str, limit: Duration| -> Duration {
        let started = Instant::now();
        let chains = want.lines().map(str::trim).filter(|l| l.starts_with("chain "));
        let addresses = want
            .split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter(|t| t.starts_with("192.0.2."))
            .map(|t| format!("{t},"));
        let needles: Vec<String> = chains.map(str::to_string).chain(addresses).collect();
        loop {
            if let Some(text) = netns.list(&table).map(|t| t.replace(['\n', '\t', ' ', '}'], ",").replace(",,", ","))
                && needles.iter().all(|n| text.contains(&n.replace(' ', ",")))
            {
                return started.elapsed();
            }
            if let Some(status) = agent.exited() {
                panic!("netpol-agent exited ({status}):\n{}", agent.log());
            }
            assert!(started.elapsed() < limit, "the table was not restored within {limit:?}:\n{}", agent.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    restored_within(&mut agent, &expected(&w), Duration::from_secs(15));

    // Our own partial syncs (netlink) are ours.
    for i in 0..5 {
        w.pod(pod(
            "shop",
            &format!("web-{}", 10 + i),
            NODE,
            &format!("192.0.2.{}", 10 + i),
            &[("segment", "frontend")],
        ));
    }
    restored_within(&mut agent, &expected(&w), Duration::from_secs(15));
    // ... and so are those it sends through `nft` (a range changed inside an interval set).
    let from_block = |cidr: &str| {
        let mut p = invalid_policy("shop", "from-block");
        p.spec.as_mut().unwrap().ingress.as_mut().unwrap()[0].from.as_mut().unwrap()[0]
            .ip_block
            .as_mut()
            .unwrap()
            .cidr = cidr.into();
        p
    };
    w.policy(from_block("198.51.100.0/24"));
    restored_within(&mut agent, &expected(&w), Duration::from_secs(15));
    w.policy(from_block("203.0.113.0/24"));
    let deadline = Instant::now() + Duration::from_secs(15);
    while !netns.list(&table).unwrap_or_default().contains("203.0.113.0/24") {
        assert!(Instant::now() < deadline, "the new range never arrived:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    // The agent logs the commit's route once nft returns, which may be after the listing.
    while !agent.log().contains(r#""via":"nft""#) {
        assert!(Instant::now() < deadline, "no commit went through nft:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    // (Own commits taken for foreign would also show in the exact count at the end.)
    assert!(!agent.log().contains(FOREIGN), "own commits taken for foreign:\n{}", agent.log());

    // A foreign `flush ruleset` removes the table; the agent puts it back.
    let nft = |args: &[&str]| {
        let out = Command::new("ip").args(["netns", "exec", &netns.0, "nft"]).args(args).output().unwrap();
        assert!(out.status.success(), "nft {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    // (The agent may have put it back before a listing could see it gone.)
    nft(&["flush", "ruleset"]);
    let took = restored_within(&mut agent, &expected(&w), Duration::from_secs(5));
    eprintln!("table back {took:?} after a foreign flush ruleset");

    // A foreign edit inside the table (its ingress dispatch emptied) is undone as well.
    let ingress = netpol::nft::names::INGRESS_FORWARD;
    nft(&["flush", "chain", "inet", &table, ingress]);
    let took = {
        let started = Instant::now();
        loop {
            let text = netns.list(&table).unwrap_or_default();
            let chain = text.split(&format!("chain {ingress} {{")).nth(1).unwrap_or("");
            let chain = chain.split("\n\t}").next().unwrap_or("");
            if chain.contains("vmap") {
                break started.elapsed();
            }
            assert!(started.elapsed() < Duration::from_secs(5), "the flushed chain was not restored:\n{text}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    eprintln!("chain back {took:?} after a foreign flush chain");
    assert_eq!(agent.log().matches(FOREIGN).count(), 2, "{}", agent.log());

    let status = agent.terminate(STOP_LIMIT).unwrap().expect("netpol-agent stops on SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", agent.log());
}

// ---------------------------------------------------------------- per-rule counters

/// The totals of the rule counters as `/metrics` shows them, by metric line prefix.
fn exported(metrics: &netpol::agent::Metrics, counters: &netpol::agent::RuleCounters, line: &str) -> Option<u64> {
    counters.read().unwrap();
    metrics.record_rule_counters(&counters.totals());
    let text = metrics.encode(None, &SyncState::default());
    text.lines().find(|l| l.starts_with(line)).and_then(|l| l.rsplit(' ').next()).map(|n| n.parse().unwrap())
}

#[test]
fn rule_totals_never_go_down_across_full_syncs_and_deleted_counters() {
    let fake = Arc::new(Mutex::new(FakeNftables::new()));
    let reader = Arc::clone(&fake);
    let counters = netpol::agent::RuleCounters::new(Arc::new(move || reader.lock().unwrap().counters(TABLE)));
    let mut target = NftTarget::new(Arc::clone(&fake), NODE, TABLE).with_rule_counters(counters.clone());
    let metrics = netpol::agent::Metrics::new();
    let namespaces = vec![namespace("shop", &[])];
    let pods = vec![
        pod("shop", "web", NODE, "10.0.0.1", &[("app", "web")]),
        pod("shop", "client", "node-b", "10.0.0.2", &[("app", "client")]),
    ];
    let policies = vec![policy("shop", "web", &[("app", "web")], &[("app", "client")], 80)];
    let isolated = netpol::agent::Snapshot::from_objects(&namespaces, &pods, &policies);
    target.sync(&isolated, true).unwrap();
    let denied = r#"netpol_policy_denied_packets_total{namespace="shop",policy="web",direction="ingress"}"#;
    let accepted = r#"netpol_policy_rule_packets_total{tier="NetworkPolicy",namespace="shop",policy="web",direction="ingress",rule="0",action="accept"}"#;
    let count = |denied: bool, packets: u64| {
        let mut fake = fake.lock().unwrap();
        let rs = fake.ruleset(TABLE).unwrap().clone();
        let (name, _) = rs.counters.iter().find(|(_, l)| l.denied == denied).unwrap();
        assert!(fake.count(TABLE, name, packets, packets * 60));
    };
    count(true, 5);
    count(false, 3);
    assert_eq!((exported(&metrics, &counters, denied), exported(&metrics, &counters, accepted)), (Some(5), Some(3)));
    // More packets, then a full sync replaces the table (its counters start at zero): the
    // sync reads them first, so nothing counted is lost and the totals go on.
    count(true, 1);
    target.sync(&isolated, true).unwrap();
    assert!(is_full_sync(fake.lock().unwrap().last_transaction().unwrap()));
    assert!(fake.lock().unwrap().counters(TABLE).unwrap().iter().all(|c| c.packets == 0));
    count(true, 2);
    assert_eq!(exported(&metrics, &counters, denied), Some(8));
    // The policy goes (a partial sync deletes its counters): the series keep their totals.
    count(false, 4);
    let open = netpol::agent::Snapshot::from_objects(&namespaces, &pods, &[]);
    target.sync(&open, false).unwrap();
    assert!(fake.lock().unwrap().counters(TABLE).unwrap().is_empty());
    assert_eq!((exported(&metrics, &counters, denied), exported(&metrics, &counters, accepted)), (Some(8), Some(7)));
    // It comes back: the same series continue from there.
    target.sync(&isolated, false).unwrap();
    count(true, 1);
    assert_eq!(exported(&metrics, &counters, denied), Some(9));
}

/// Always ready, with an empty cluster.
struct EmptyCluster;

impl netpol::agent::trigger::SnapshotSource for EmptyCluster {
    fn is_ready(&self) -> bool {
        true
    }

    fn snapshot(&self) -> netpol::agent::Snapshot {
        netpol::agent::Snapshot::default()
    }
}

/// A target whose syncs report these staged elements remaining, one per sync (0 after),
/// and when each sync ran.
#[derive(Clone, Default)]
struct Filling {
    remaining: Arc<Mutex<Vec<usize>>>,
    synced_at: Arc<Mutex<Vec<Instant>>>,
}

impl SyncTarget for Filling {
    fn sync(
        &mut self,
        _: &netpol::agent::Snapshot,
        _: bool,
    ) -> Result<netpol::agent::SyncStats, netpol::agent::SyncError> {
        self.synced_at.lock().unwrap().push(Instant::now());
        let remaining = self.remaining.lock().unwrap().pop().unwrap_or(0);
        Ok(netpol::agent::SyncStats { staged_elements_remaining: remaining, ..Default::default() })
    }
}

#[tokio::test]
async fn while_a_fill_is_staged_the_loop_syncs_again_at_once_without_a_change() {
    let target = Filling { remaining: Arc::new(Mutex::new(vec![1, 2_048, 4_096])), ..Filling::default() };
    // Syncs after a change wait out a 300 ms batching window (the first one too); those
    // of a fill go at once.
    let config = SyncLoopConfig { debounce: Duration::from_millis(300), ..SyncLoopConfig::default() };
    let sync_loop = SyncLoop::new(target.clone(), EmptyCluster, Trigger::new(), config);
    let run = tokio::spawn(sync_loop.run(tokio::time::sleep(Duration::from_millis(1_000))));
    run.await.unwrap();
    let synced_at = target.synced_at.lock().unwrap().clone();
    assert_eq!(synced_at.len(), 4, "the first sync and one per chunk left, then nothing");
    for pair in synced_at.windows(2) {
        assert!(pair[1] - pair[0] < Duration::from_millis(150), "{:?} between syncs of a fill", pair[1] - pair[0]);
    }
}
