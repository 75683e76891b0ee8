//! The agent's Kubernetes half against the in-process fake apiserver, with a real kube
//! client: watches, readiness gating, relists, reconnects, coalescing, retries, the admin
//! server, and `agent::run` from a kubeconfig.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::runtime::watcher;
use netpol::agent::watch::{EventHook, Resource, Supervision, WatchOptions};
use netpol::agent::{ClusterWatch, Metrics, Snapshot, SyncLoop, SyncLoopConfig, SyncState, Trigger, admin};
use netpol::policy::model::NAMESPACE_NAME_LABEL;
use netpol::testkit::apiserver::{FakeApiServer, Kind};
use netpol::testkit::objects::{self, labels, namespace};
use netpol::testkit::sync::RecordingTarget;
use tokio::task::JoinHandle;

use crate::common;

// ---------------------------------------------------------------- builders

fn pod(ns: &str, name: &str, ip: &str, l: &[(&str, &str)]) -> Pod {
    objects::pod(ns, name, "node-a", ip, l)
}

fn policy(ns: &str, name: &str, selects: &[(&str, &str)]) -> NetworkPolicy {
    NetworkPolicy {
        metadata: ObjectMeta { name: Some(name.into()), namespace: Some(ns.into()), ..ObjectMeta::default() },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector { match_labels: labels(selects), ..LabelSelector::default() }),
            policy_types: Some(vec!["Ingress".into()]),
            ..NetworkPolicySpec::default()
        }),
    }
}

/// Two namespaces, three pods, one policy.
fn seed(server: &FakeApiServer) {
    server.apply(&namespace("shop", &[("team", "a")])).unwrap();
    server.apply(&namespace("ops", &[("team", "b")])).unwrap();
    server.apply(&pod("shop", "web-1", "192.0.2.1", &[("segment", "frontend")])).unwrap();
    server.apply(&pod("shop", "web-2", "192.0.2.2", &[("segment", "frontend")])).unwrap();
    server.apply(&pod("shop", "db-1", "192.0.2.3", &[("segment", "backend")])).unwrap();
    server.apply(&policy("shop", "backend-from-frontend", &[("segment", "backend")])).unwrap();
}

// ---------------------------------------------------------------- snapshot views

fn pod_labels(s: &Snapshot) -> BTreeMap<String, BTreeMap<String, String>> {
    s.pods.iter().map(|p| (p.id.to_string(), (*p.labels).clone())).collect()
}

/// Namespace labels as written (without the name label the API server adds), keyed
/// `/<name>` like a cluster-scoped object.
fn ns_labels(s: &Snapshot) -> BTreeMap<String, BTreeMap<String, String>> {
    s.namespaces
        .iter()
        .map(|n| {
            let mut labels = n.labels.clone();
            labels.remove(NAMESPACE_NAME_LABEL);
            (format!("/{}", n.name), labels)
        })
        .collect()
}

fn policy_names(s: &Snapshot) -> Vec<String> {
    s.policies.iter().map(|p| p.id.to_string()).collect()
}

fn l(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    labels(pairs).unwrap()
}

// ---------------------------------------------------------------- harness

async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn fast_config() -> SyncLoopConfig {
    SyncLoopConfig {
        debounce: Duration::from_millis(20),
        retry_initial: Duration::from_millis(50),
        retry_max: Duration::from_secs(1),
        // An idle loop goes around this often, so `Agent::loop_went_around` returns soon.
        heartbeat: Duration::from_millis(50),
        ..SyncLoopConfig::default()
    }
}

struct Agent {
    watch: ClusterWatch,
    target: RecordingTarget,
    status: tokio::sync::watch::Receiver<SyncState>,
    metrics: Metrics,
    config: SyncLoopConfig,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The fake apiserver with the [`seed`] objects, and an agent ([`fast_config`]) that has
/// synced them once.
async fn seeded_and_synced() -> (FakeApiServer, Agent) {
    let server = FakeApiServer::start().await.unwrap();
    seed(&server);
    let agent = Agent::start(&server, fast_config());
    agent.wait_synced("the first sync", |s| s.pods.len() == 3).await;
    // The loop syncs on the leading edge: the lists' last notifications may each still take
    // a sync of their own. Tests count syncs from a quiet loop.
    agent.loop_went_around().await;
    (server, agent)
}

impl Agent {
    /// Watches (paged lists of 2 objects) and the sync loop over a recording target.
    fn start(server: &FakeApiServer, config: SyncLoopConfig) -> Agent {
        Agent::start_with(server, config, WatchOptions::new(watcher::Config::default().page_size(2)))
    }

    /// As [`Agent::start`], with these watch options.
    fn start_with(server: &FakeApiServer, config: SyncLoopConfig, options: WatchOptions) -> Agent {
        let trigger = Trigger::new();
        let (watch, driver) = ClusterWatch::start_with(server.client(), options, trigger.clone());
        let target = RecordingTarget::new();
        let metrics = Metrics::new();
        let sync_loop =
            SyncLoop::new(target.clone(), watch.clone(), trigger, config.clone()).with_metrics(metrics.clone());
        let status = sync_loop.status();
        let tasks = vec![
            tokio::spawn(async move {
                let _ = driver.await;
            }),
            tokio::spawn(async move {
                sync_loop.run(std::future::pending::<()>()).await;
            }),
        ];
        Agent { watch, target, status, metrics, config, tasks }
    }

    fn synced(&self) -> Snapshot {
        self.target.calls().iter().rev().find(|c| !c.failed).map(|c| c.snapshot.clone()).unwrap_or_default()
    }

    /// Waits until the last successful sync saw a snapshot satisfying `pred`.
    async fn wait_synced(&self, what: &str, pred: impl Fn(&Snapshot) -> bool) {
        wait_for(what, Duration::from_secs(10), || pred(&self.synced())).await;
    }

    /// See [`common::loop_went_around`].
    async fn loop_went_around(&self) {
        common::loop_went_around(&self.status).await;
    }
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_initial_list_and_then_live_updates_reach_the_snapshot() {
    let server = FakeApiServer::start().await.unwrap();
    seed(&server);
    let agent = Agent::start(&server, fast_config());
    agent.watch.wait_ready().await;

    let snap = agent.watch.snapshot();
    assert_eq!(pod_labels(&snap).keys().collect::<Vec<_>>(), ["shop/db-1", "shop/web-1", "shop/web-2"]);
    assert_eq!(ns_labels(&snap)["/shop"], l(&[("team", "a")]));
    assert_eq!(policy_names(&snap), ["shop/backend-from-frontend"]);
    // Converted on arrival: node, ports and IPs are what the API objects say.
    let web = &snap.pods[1];
    assert_eq!(web.id.to_string(), "shop/web-1");
    assert_eq!(web.node, "node-a");
    assert_eq!(web.ports[0].port, 80);
    assert_eq!(*web.ips, ["192.0.2.1".parse::<std::net::IpAddr>().unwrap()]);
    assert_eq!(snap.skipped_objects, 0);
    // Lists of 3 pods with page size 2 took two pages.
    assert!(server.list_requests(Kind::Pod) >= 2);

    // Live: add, relabel, delete.
    server.apply(&pod("ops", "mon-1", "192.0.2.9", &[("app", "mon")])).unwrap();
    server.apply(&pod("shop", "web-1", "192.0.2.1", &[("segment", "canary")])).unwrap();
    server.delete(Kind::Pod, "shop", "web-2").unwrap();
    server.apply(&namespace("ops", &[("team", "c")])).unwrap();
    server.delete(Kind::NetworkPolicy, "shop", "backend-from-frontend").unwrap();
    server.apply(&policy("ops", "deny-all", &[])).unwrap();

    agent
        .wait_synced("live updates to reach the synced snapshot", |s| {
            let pods = pod_labels(s);
            pods.len() == 3
                && pods.get("shop/web-1") == Some(&l(&[("segment", "canary")]))
                && pods.contains_key("ops/mon-1")
                && ns_labels(s)["/ops"] == l(&[("team", "c")])
                && policy_names(s) == ["ops/deny-all"]
        })
        .await;
    assert_eq!(agent.synced(), agent.watch.snapshot());
    assert_eq!(agent.watch.counters().relists(Resource::Pods), 0);
    assert!(agent.watch.counters().events(Resource::Pods) >= 3);
    assert_eq!(agent.watch.counters().events(Resource::NetworkPolicies), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_synced_until_pods_namespaces_and_policies_have_all_listed() {
    let server = FakeApiServer::start().await.unwrap();
    seed(&server);
    server.pause_kind(Kind::NetworkPolicy);
    let agent = Agent::start(&server, fast_config());
    let counters = agent.watch.counters().clone();
    wait_for("pods and namespaces to list", Duration::from_secs(5), || {
        counters.listed(Resource::Pods) && counters.listed(Resource::Namespaces)
    })
    .await;
    // Pod changes keep coming; still nothing may be programmed.
    server.apply(&pod("shop", "web-3", "192.0.2.4", &[("segment", "frontend")])).unwrap();
    wait_for("the watch to see web-3", Duration::from_secs(5), || agent.watch.snapshot().pods.len() == 4).await;
    agent.loop_went_around().await;
    assert!(!agent.watch.is_ready());
    assert!(agent.target.calls().is_empty(), "synced before policies listed");

    server.resume_kind(Kind::NetworkPolicy);
    agent.wait_synced("the first sync", |s| !s.policies.is_empty()).await;
    let calls = agent.target.calls();
    assert!(calls[0].full, "the first sync is full");
    assert_eq!(pod_labels(&calls[0].snapshot).len(), 4);
    assert_eq!(policy_names(&calls[0].snapshot), ["shop/backend-from-frontend"]);
    let mut status = agent.status.clone();
    let published = tokio::time::timeout(Duration::from_secs(5), status.wait_for(|s| s.first_full_sync_done)).await;
    assert!(published.is_ok_and(|r| r.is_ok()), "the sync loop publishes its first full sync");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_gone_after_compaction_makes_the_watcher_relist_and_converge_with_nothing_lost() {
    let (server, agent) = seeded_and_synced().await;
    let lists_before = server.list_requests(Kind::Pod);

    // Changes the agent does not see before history is forgotten and the streams die.
    server.pause();
    for i in 0..10 {
        server.apply(&pod("ops", &format!("job-{i}"), &format!("192.0.2.{}", 100 + i), &[("job", "x")])).unwrap();
    }
    server.delete(Kind::Pod, "shop", "web-2").unwrap();
    server.apply(&namespace("shop", &[("team", "z")])).unwrap();
    server.apply(&policy("ops", "jobs", &[("job", "x")])).unwrap();
    server.compact();
    server.drop_connections();
    server.resume();

    agent
        .wait_synced("convergence after the relist", |s| {
            let pods = pod_labels(s);
            pods.len() == 12
                && !pods.contains_key("shop/web-2")
                && ns_labels(s)["/shop"] == l(&[("team", "z")])
                && policy_names(s) == ["ops/jobs", "shop/backend-from-frontend"]
        })
        .await;
    let c = agent.watch.counters();
    assert!(c.relists(Resource::Pods) >= 1, "pods relisted after 410");
    assert!(c.relists(Resource::Namespaces) >= 1);
    assert!(c.relists(Resource::NetworkPolicies) >= 1);
    assert!(server.list_requests(Kind::Pod) > lists_before);
    assert_eq!(agent.synced(), agent.watch.snapshot());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_live_watch_makes_the_watcher_relist() {
    let (server, agent) = seeded_and_synced().await;
    wait_for("four live watches (pods, namespaces, policies, nodes)", Duration::from_secs(5), || {
        server.live_watches() == 4
    })
    .await;

    server.expire_watches();
    server.apply(&pod("shop", "web-9", "192.0.2.99", &[("segment", "frontend")])).unwrap();
    agent.wait_synced("the new pod after the relist", |s| s.pods.len() == 4).await;
    wait_for("the pods relist to be counted", Duration::from_secs(5), || {
        agent.watch.counters().relists(Resource::Pods) >= 1
    })
    .await;
    assert!(agent.watch.counters().errors(Resource::Pods) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_reconnect_from_the_last_version_and_converge() {
    let (server, agent) = seeded_and_synced().await;
    let watches_before = server.watch_requests(Kind::Pod);

    for round in 0..3 {
        server.drop_connections();
        server
            .apply(&pod("shop", &format!("drop-{round}"), &format!("192.0.2.{}", 50 + round), &[("round", "x")]))
            .unwrap();
    }
    agent.wait_synced("the pods added while connections dropped", |s| s.pods.len() == 6).await;
    assert!(server.watch_requests(Kind::Pod) > watches_before);
    // History was kept, so the watcher resumed instead of relisting.
    assert_eq!(agent.watch.counters().relists(Resource::Pods), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_apiserver_responses_delay_but_do_not_break_convergence() {
    let server = FakeApiServer::start().await.unwrap();
    seed(&server);
    server.set_latency(Duration::from_millis(300));
    let agent = Agent::start(&server, fast_config());
    agent.wait_synced("the first sync", |s| s.pods.len() == 3).await;
    // The three pods came in two pages (page size 2), each answered late.
    assert!(server.list_requests(Kind::Pod) >= 2, "{} pod lists", server.list_requests(Kind::Pod));
    server.drop_connections();
    server.apply(&pod("shop", "late", "192.0.2.77", &[("segment", "frontend")])).unwrap();
    agent.wait_synced("the pod added behind a slow reconnect", |s| s.pods.len() == 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_rapid_changes_coalesce_into_a_few_syncs_and_the_last_state_wins() {
    let (server, agent) = seeded_and_synced().await;
    let before = agent.target.calls().len();

    for i in 0..100 {
        let v = i.to_string();
        server.apply(&pod("shop", "web-1", "192.0.2.1", &[("version", &v)])).unwrap();
    }
    agent.wait_synced("the last version", |s| pod_labels(s).get("shop/web-1") == Some(&l(&[("version", "99")]))).await;
    // Any sync still owed to the burst has happened by now.
    agent.loop_went_around().await;
    let calls = agent.target.calls();
    let syncs = calls.len() - before;
    assert!(syncs <= 5, "100 changes took {syncs} syncs");
    assert!(calls[before..].iter().all(|c| !c.full), "changes sync partially");
    assert_eq!(pod_labels(&calls.last().unwrap().snapshot)["shop/web-1"], l(&[("version", "99")]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_during_a_slow_sync_are_all_taken_by_the_one_sync_right_after_it() {
    let (server, agent) = seeded_and_synced().await;
    // The sync for the first change runs until every later change has reached the watch.
    agent.target.hold();
    let before = agent.target.calls().len();

    server.apply(&pod("shop", "web-1", "192.0.2.1", &[("version", "0")])).unwrap();
    wait_for("the slow sync to start", Duration::from_secs(5), || agent.target.calls().len() > before).await;
    for i in 1..20 {
        let v = i.to_string();
        server.apply(&pod("shop", "web-1", "192.0.2.1", &[("version", &v)])).unwrap();
    }
    wait_for("the watch to see the last version", Duration::from_secs(5), || {
        pod_labels(&agent.watch.snapshot()).get("shop/web-1") == Some(&l(&[("version", "19")]))
    })
    .await;
    assert_eq!(agent.target.calls().len(), before + 1, "the changes landed during the held sync");
    agent.target.release();
    agent.wait_synced("the last version", |s| pod_labels(s).get("shop/web-1") == Some(&l(&[("version", "19")]))).await;
    agent.loop_went_around().await;
    let calls = agent.target.calls();
    assert_eq!(calls.len() - before, 2, "one sync for the first change, one for the 19 during it");
    assert_eq!(pod_labels(&calls[before].snapshot)["shop/web-1"], l(&[("version", "0")]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_sync_is_retried_with_growing_backoff_and_the_next_sync_is_full() {
    let (server, agent) = seeded_and_synced().await;
    let before = agent.target.calls().len();

    agent.target.fail_next(3);
    server.apply(&pod("shop", "web-4", "192.0.2.5", &[("segment", "frontend")])).unwrap();
    agent.wait_synced("the retried sync", |s| s.pods.len() == 4).await;
    let calls = agent.target.calls()[before..].to_vec();
    let shape: Vec<(bool, bool)> = calls.iter().map(|c| (c.full, c.failed)).collect();
    assert_eq!(
        shape,
        [(false, true), (true, true), (true, true), (true, false)],
        "partial fails, then full retries until one succeeds"
    );
    let gaps: Vec<Duration> = calls.windows(2).map(|w| w[1].at - w[0].at).collect();
    let initial = agent.config.retry_initial;
    for (i, gap) in gaps.iter().enumerate() {
        assert!(*gap >= initial * (1 << i), "retry {i} came after {gap:?}");
    }
    // The loop publishes its state just after the target returns: wait for it, not race it.
    let mut status = agent.status.clone();
    let published = status.wait_for(|s| s.consecutive_failures == 0 && s.failures == 3);
    let st = tokio::time::timeout(Duration::from_secs(5), published)
        .await
        .expect("the sync loop publishes the successful retry")
        .expect("the sync loop is alive")
        .clone();
    assert_eq!((st.failures, st.consecutive_failures), (3, 0));
    let text = agent.metrics.encode(None, &st);
    assert!(text.contains("netpol_sync_failures_total{mode=\"full\",kind=\"apply\"} 2"), "{text}");
}

/// GET over a fresh connection; returns (status, body).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let status = buf[9..12].parse().unwrap();
    let body = buf.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("").to_string();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_server_reports_readiness_and_metrics() {
    let server = FakeApiServer::start().await.unwrap();
    seed(&server);
    server.pause_kind(Kind::Namespace);
    let agent = Agent::start(&server, fast_config());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let admin_task = tokio::spawn(admin::serve(
        listener,
        admin::AdminState {
            metrics: agent.metrics.clone(),
            status: agent.status.clone(),
            watch_counters: Some(agent.watch.counters().clone()),
            limits: admin::ProbeLimits::default(),
            rule_counters: None,
        },
    ));

    assert_eq!(http_get(addr, "/healthz").await.0, 200);
    let (code, body) = http_get(addr, "/readyz").await;
    assert_eq!(code, 503);
    assert!(body.contains("no full sync"), "{body}");

    server.resume_kind(Kind::Namespace);
    agent.wait_synced("the first sync", |s| s.pods.len() == 3).await;
    assert_eq!(http_get(addr, "/readyz").await.0, 200);
    server.apply(&pod("shop", "web-5", "192.0.2.6", &[("segment", "frontend")])).unwrap();
    agent.wait_synced("the new pod", |s| s.pods.len() == 4).await;

    let (code, metrics) = http_get(addr, "/metrics").await;
    assert_eq!(code, 200);
    for needle in [
        "netpol_sync_duration_seconds_count{mode=\"full\"} 1",
        "netpol_sync_duration_seconds_count{mode=\"partial\"}",
        "netpol_watch_events_total{resource=\"pods\"} 1",
        "netpol_watch_relists_total{resource=\"pods\"} 0",
        "netpol_index_objects{resource=\"pods\"} 4",
        "netpol_ruleset_set_elements 4",
        "netpol_last_successful_sync_age_seconds",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }

    // Three failures in a row make the node unready.
    agent.target.fail_next(100);
    server.delete(Kind::Pod, "shop", "web-5").unwrap();
    let status = agent.status.clone();
    wait_for("three failures", Duration::from_secs(5), || status.borrow().consecutive_failures >= 3).await;
    let (code, body) = http_get(addr, "/readyz").await;
    assert_eq!(code, 503);
    assert!(body.contains("injected failure"), "{body}");
    assert_eq!(http_get(addr, "/nope").await.0, 404);
    admin_task.abort();
}

fn run_agent(
    config: netpol::agent::AgentConfig,
    target: RecordingTarget,
) -> (tokio::sync::oneshot::Sender<()>, JoinHandle<Result<RecordingTarget, netpol::agent::AgentError>>) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let shutdown: std::pin::Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(async move {
        let _ = stopped.await;
    });
    let task = tokio::spawn(netpol::agent::run(config, target, shutdown));
    (stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_runs_from_a_kubeconfig_and_cleans_up_on_exit() {
    use clap::Parser;
    let server = FakeApiServer::start().await.unwrap();
    seed(&server);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig_yaml()).unwrap();
    let config = netpol::agent::AgentConfig::try_parse_from([
        "netpol-agent",
        "--node",
        "node-a",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--admin-addr",
        "127.0.0.1:0",
        "--debounce",
        "5ms",
        "--cleanup-on-exit",
    ])
    .unwrap();
    let target = RecordingTarget::new();
    let (stop, task) = run_agent(config, target.clone());
    assert!(
        target
            .wait_until(Duration::from_secs(10), |c| c.last().is_some_and(|c| c.full && c.snapshot.pods.len() == 3))
            .await,
        "the agent synced the seeded cluster"
    );
    stop.send(()).unwrap();
    let returned = task.await.unwrap().unwrap();
    assert_eq!(returned.cleanups(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fake_apiserver_speaks_paging_bookmarks_timeouts_and_410() {
    let server = FakeApiServer::start().await.unwrap();
    seed(&server);
    let addr = server.addr();

    // Paging: 3 pods, 2 per page, then the continuation.
    let (code, body) = http_get(addr, "/api/v1/pods?limit=2").await;
    assert_eq!(code, 200);
    let page: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(page["kind"], "PodList");
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    let token = page["metadata"]["continue"].as_str().unwrap().to_string();
    let rv = page["metadata"]["resourceVersion"].as_str().unwrap().to_string();
    let (_, body) = http_get(addr, &format!("/api/v1/pods?limit=2&continue={token}")).await;
    let page: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    assert_eq!(page["metadata"]["resourceVersion"], rv.as_str());
    // Namespaced path.
    let (_, body) = http_get(addr, "/apis/networking.k8s.io/v1/namespaces/ops/networkpolicies").await;
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(list["items"].as_array().unwrap().is_empty());

    // A watch with bookmarks that times out: events since rv, then a bookmark, then the end.
    server.apply(&policy("shop", "late", &[])).unwrap();
    let (code, body) = http_get(
        addr,
        &format!(
            "/apis/networking.k8s.io/v1/networkpolicies?watch=1&resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=1"
        ),
    )
    .await;
    assert_eq!(code, 200);
    assert!(body.contains(r#""type":"ADDED""#) && body.contains(r#""name":"late""#), "{body}");
    assert!(body.contains(r#""type":"BOOKMARK""#), "{body}");

    // After compaction, an old resourceVersion gets an ERROR event with 410 Expired.
    server.compact();
    let (code, body) = http_get(addr, &format!("/api/v1/pods?watch=true&resourceVersion={rv}&timeoutSeconds=1")).await;
    assert_eq!(code, 200);
    assert!(body.contains(r#""type":"ERROR""#) && body.contains(r#""code":410"#), "{body}");
    assert!(body.contains("Expired"), "{body}");
    // And so does a continue token from before the compaction.
    let (code, _) = http_get(addr, &format!("/api/v1/pods?limit=2&continue={token}")).await;
    assert_eq!(code, 410);
    assert_eq!(server.list_requests(Kind::Pod), 2);
    assert_eq!(server.watch_requests(Kind::NetworkPolicy), 1);
    assert_eq!(server.live_watches(), 0);
}

/// Measurement behind the default debounce (run with `--ignored --nocapture`): a burst of
/// 100 pod updates 1 ms apart, syncs taken and latency from the last update to its sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, not a check"]
async fn measure_how_debounce_trades_syncs_for_latency() {
    for debounce_ms in [0u64, 5, 10, 20, 50, 100] {
        let server = FakeApiServer::start().await.unwrap();
        seed(&server);
        let config = SyncLoopConfig { debounce: Duration::from_millis(debounce_ms), ..fast_config() };
        let agent = Agent::start(&server, config);
        agent.wait_synced("the first sync", |s| s.pods.len() == 3).await;
        let before = agent.target.calls().len();
        for i in 0..100 {
            let v = i.to_string();
            server.apply(&pod("shop", "web-1", "192.0.2.1", &[("version", &v)])).unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let last = Instant::now();
        agent
            .wait_synced("the last version", |s| pod_labels(s).get("shop/web-1") == Some(&l(&[("version", "99")])))
            .await;
        let latency = agent.target.last().unwrap().at - last;
        let syncs = agent.target.calls().len() - before;
        println!("debounce {debounce_ms:>3} ms: {syncs:>3} syncs, last change synced after {latency:?}");
    }
}

// ---------------------------------------------------------------- supervision, 410, Node, probes

/// Supervision fast enough for a test.
fn quick_supervision() -> Supervision {
    Supervision {
        restart_initial: Duration::from_millis(50),
        restart_max: Duration::from_millis(200),
        heartbeat: Duration::from_millis(50),
        ..Supervision::default()
    }
}

/// A hook that panics on the next event of `resource` once armed (and every time when
/// `always`).
fn panicking_hook(resource: Resource, always: bool) -> (EventHook, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let armed = std::sync::Arc::new(AtomicBool::new(always));
    let hook_armed = armed.clone();
    let hook: EventHook = std::sync::Arc::new(move |r| {
        let fire = if always { hook_armed.load(Ordering::SeqCst) } else { hook_armed.swap(false, Ordering::SeqCst) };
        if r == resource && fire {
            panic!("injected watch panic");
        }
    });
    (hook, armed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_watch_task_restarts_the_watches_which_relist_and_the_next_sync_is_full() {
    let server = FakeApiServer::start().await.unwrap();
    seed(&server);
    let (hook, armed) = panicking_hook(Resource::Pods, false);
    let options = WatchOptions {
        supervision: quick_supervision(),
        on_event: Some(hook),
        ..WatchOptions::new(watcher::Config::default().page_size(2))
    };
    let agent = Agent::start_with(&server, fast_config(), options);
    agent.wait_synced("the first sync", |s| s.pods.len() == 3).await;
    agent.loop_went_around().await;
    let before = agent.target.calls().len();

    armed.store(true, std::sync::atomic::Ordering::SeqCst);
    // The pod's event trips the hook: the whole watch task (all three watches) panics.
    server.apply(&pod("shop", "web-5", "192.0.2.6", &[("segment", "frontend")])).unwrap();
    agent.wait_synced("the restarted watches to relist the new pod", |s| s.pods.len() == 4).await;
    let counters = agent.watch.counters();
    assert_eq!(counters.restarts(), 1);
    assert!(counters.relists(Resource::Pods) >= 1 && counters.relists(Resource::NetworkPolicies) >= 1);
    let after: Vec<bool> = agent.target.calls()[before..].iter().map(|c| c.full).collect();
    assert_eq!(after.first(), Some(&true), "the first sync after the restart is full: {after:?}");

    // The restarted watches keep delivering.
    server.delete(Kind::Pod, "shop", "web-1").unwrap();
    agent.wait_synced("a later deletion", |s| s.pods.len() == 3 && !pod_labels(s).contains_key("shop/web-1")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_that_keep_panicking_make_the_supervisor_give_up_with_the_reason() {
    let server = FakeApiServer::start().await.unwrap();
    seed(&server);
    let (hook, _) = panicking_hook(Resource::Namespaces, true);
    let options = WatchOptions {
        supervision: Supervision { max_restarts: 2, ..quick_supervision() },
        on_event: Some(hook),
        ..WatchOptions::new(watcher::Config::default())
    };
    let (watch, driver) = ClusterWatch::start_with(server.client(), options, Trigger::new());
    let error = tokio::time::timeout(Duration::from_secs(10), driver)
        .await
        .expect("the supervisor gives up")
        .expect_err("giving up is an error");
    assert_eq!(error.restarts, 3);
    assert!(error.to_string().contains("panicked: injected watch panic"), "{error}");
    assert_eq!(watch.counters().restarts(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_gone_answered_as_the_status_of_the_watch_start_makes_the_agent_relist_and_converge() {
    let (server, agent) = seeded_and_synced().await;

    // While the watches are cut, the world changes and its history is compacted; the
    // watches then resume from a resourceVersion the server answers with HTTP 410.
    server.pause_kind(Kind::Pod);
    server.drop_connections();
    server.apply(&pod("shop", "web-5", "192.0.2.6", &[("segment", "frontend")])).unwrap();
    server.delete(Kind::Pod, "shop", "web-2").unwrap();
    server.compact();
    server.set_gone_as_status(true);
    server.resume_kind(Kind::Pod);

    agent
        .wait_synced("the relisted pods", |s| {
            pod_labels(s).keys().cloned().collect::<Vec<_>>() == ["shop/db-1", "shop/web-1", "shop/web-5"]
        })
        .await;
    let counters = agent.watch.counters();
    assert!(counters.relists(Resource::Pods) >= 1, "the pods relisted");
    assert!(counters.errors(Resource::Pods) >= 1, "the 410 was seen");

    // And the relisted watch is live again: a later change arrives as an event.
    server.set_gone_as_status(false);
    server.apply(&pod("shop", "web-6", "192.0.2.7", &[])).unwrap();
    agent.wait_synced("a later pod", |s| s.pods.len() == 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_gone_error_event_in_the_stream_makes_the_agent_relist_and_converge() {
    let (server, agent) = seeded_and_synced().await;
    server.pause_kind(Kind::Pod);
    server.drop_connections();
    server.delete(Kind::Pod, "shop", "web-1").unwrap();
    server.compact();
    server.resume_kind(Kind::Pod);
    agent.wait_synced("the relisted pods", |s| s.pods.len() == 2).await;
    assert!(agent.watch.counters().relists(Resource::Pods) >= 1);
}

fn node(name: &str, cidrs: &[&str]) -> k8s_openapi::api::core::v1::Node {
    k8s_openapi::api::core::v1::Node {
        metadata: ObjectMeta { name: Some(name.into()), ..ObjectMeta::default() },
        spec: Some(k8s_openapi::api::core::v1::NodeSpec {
            pod_cidr: cidrs.first().map(|c| c.to_string()),
            pod_cidrs: Some(cidrs.iter().map(|c| c.to_string()).collect()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn cidrs(s: &Snapshot) -> Vec<String> {
    s.pod_cidrs.iter().map(|c| c.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nodes_pod_cidrs_are_read_with_a_get_and_a_name_selected_watch_and_a_change_syncs_fully() {
    let server = FakeApiServer::start().await.unwrap();
    seed(&server);
    server.apply(&node("node-a", &["10.244.1.0/24"])).unwrap();
    server.apply(&node("node-b", &["10.244.2.0/24"])).unwrap();
    let options = WatchOptions {
        node: Some("node-a".into()),
        pod_cidrs: vec!["10.9.0.0/16".parse().unwrap()],
        ..WatchOptions::new(watcher::Config::default().page_size(2))
    };
    let agent = Agent::start_with(&server, fast_config(), options);
    agent.wait_synced("the first sync", |s| s.pods.len() == 3).await;
    let first = agent.target.calls().into_iter().find(|c| !c.failed).unwrap();
    assert_eq!(cidrs(&first.snapshot), ["10.9.0.0/16", "10.244.1.0/24"], "the first sync waited for the Node");

    // Another node's change is not this agent's business (the watch selects its Node).
    let before = agent.target.calls().len();
    server.apply(&node("node-b", &["10.244.3.0/24"])).unwrap();
    server.apply(&node("node-a", &["10.244.1.0/24", "fd00:10:244:1::/64"])).unwrap();
    agent.wait_synced("the new CIDRs", |s| cidrs(s).len() == 3).await;
    let calls = agent.target.calls();
    let changed = calls[before..].iter().find(|c| cidrs(&c.snapshot).len() == 3).unwrap();
    assert!(changed.full, "a change of the pod CIDRs is a full sync");
    assert_eq!(cidrs(&changed.snapshot), ["10.9.0.0/16", "10.244.1.0/24", "fd00:10:244:1::/64"]);
    assert!(calls.iter().all(|c| !cidrs(&c.snapshot).contains(&"10.244.3.0/24".to_string())));

    // Its own Node is read by name: a GET and a name-selected watch (besides the list and
    // watch of every node, for the cluster policies' `nodes` peers).
    assert!(server.get_requests() >= 1);
    assert!(server.named_watch_requests() >= 1);
}

/// `--unknown-pod-guard=false` (for networks whose node forwards from an address inside its
/// pod CIDR): the agent reads no Node and ignores `--pod-cidr`, so no sync carries a CIDR.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_unknown_pod_guard_off_the_agent_reads_no_node_and_guards_no_cidr() {
    use clap::Parser;
    let server = FakeApiServer::start().await.unwrap();
    seed(&server);
    server.apply(&node("node-a", &["10.244.1.0/24"])).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig_yaml()).unwrap();
    let args = |guard: &str| {
        netpol::agent::AgentConfig::try_parse_from([
            "netpol-agent",
            "--node",
            "node-a",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--admin-addr",
            "127.0.0.1:0",
            "--pod-cidr",
            "10.9.0.0/16",
            "--watch-table=false",
            guard,
        ])
        .unwrap()
    };
    for (guard, want) in [("--unknown-pod-guard=true", 2), ("--unknown-pod-guard=false", 0)] {
        let target = RecordingTarget::new();
        let (stop, task) = run_agent(args(guard), target.clone());
        let synced =
            target.wait_until(Duration::from_secs(10), |c| c.last().is_some_and(|c| c.snapshot.pods.len() == 3)).await;
        assert!(synced, "{guard}: the agent synced the seeded cluster");
        let last = target.calls().last().cloned().unwrap();
        assert_eq!(cidrs(&last.snapshot).len(), want, "{guard}: {:?}", cidrs(&last.snapshot));
        stop.send(()).unwrap();
        task.await.unwrap().unwrap();
    }
    assert_eq!(server.named_watch_requests(), 1, "only the guarded agent watched its Node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_sync_waits_for_the_node_but_only_up_to_the_bound() {
    let server = FakeApiServer::start().await.unwrap();
    seed(&server);
    server.apply(&node("node-a", &["10.244.1.0/24"])).unwrap();
    server.pause_node_reads();
    let options = WatchOptions {
        node: Some("node-a".into()),
        node_wait: Duration::from_secs(3),
        ..WatchOptions::new(watcher::Config::default())
    };
    let started = Instant::now();
    let agent = Agent::start_with(&server, fast_config(), options);
    let counters = agent.watch.counters().clone();
    wait_for("the lists", Duration::from_secs(5), || Resource::ALL.iter().all(|r| counters.listed(*r))).await;
    assert!(agent.target.calls().is_empty(), "listed, but the Node is not read yet: no sync");
    agent.wait_synced("the sync after the bound", |s| s.pods.len() == 3).await;
    // Not before the bound: the readiness check compares with it (timers never fire early).
    let first = agent.target.calls()[0].at;
    assert!(first >= started + Duration::from_secs(3), "synced {:?} after the start", first - started);
    assert!(cidrs(&agent.synced()).is_empty(), "synced without the Node's CIDRs");

    server.resume_kind(Kind::Node);
    agent.wait_synced("the Node's CIDRs", |s| cidrs(s) == ["10.244.1.0/24"]).await;
    let calls = agent.target.calls();
    assert!(calls.iter().find(|c| !cidrs(&c.snapshot).is_empty()).unwrap().full);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_and_metrics_show_watches_that_are_not_live() {
    let server = FakeApiServer::start().await.unwrap();
    seed(&server);
    let agent = Agent::start(&server, fast_config());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = admin::AdminState {
        metrics: agent.metrics.clone(),
        status: agent.status.clone(),
        watch_counters: Some(agent.watch.counters().clone()),
        limits: admin::ProbeLimits::default(),
        rule_counters: None,
    };
    let admin_task = tokio::spawn(admin::serve(listener, state));
    agent.wait_synced("the first sync", |s| s.pods.len() == 3).await;
    assert_eq!(http_get(addr, "/readyz").await.0, 200);
    let (_, metrics) = http_get(addr, "/metrics").await;
    for needle in [
        "netpol_watch_up{resource=\"pods\"} 1",
        "netpol_watch_last_event_age_seconds{resource=\"networkpolicies\"} ",
        "netpol_syncs_total{mode=\"full\",outcome=\"success\"} 1",
        "netpol_last_successful_sync_timestamp_seconds ",
        "netpol_watch_restarts_total 0",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }
    assert!(!metrics.contains("netpol_last_successful_sync_timestamp_seconds 0.0"), "{metrics}");

    // The API server goes away: every watch fails.
    drop(server);
    let mut body = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !body.contains("watch of pods is not live") {
        assert!(Instant::now() < deadline, "readiness never reported the watch: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (code, b) = http_get(addr, "/readyz").await;
        body = b;
        assert!(code == 503 || !body.contains("not live"));
    }
    assert_eq!(http_get(addr, "/healthz").await.0, 200, "a lost API server is not a stuck agent");
    let (_, metrics) = http_get(addr, "/metrics").await;
    assert!(metrics.contains("netpol_watch_up{resource=\"pods\"} 0"), "{metrics}");
    admin_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_server_closes_connections_beyond_its_cap_and_serves_again_when_they_end() {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_keep, status) = tokio::sync::watch::channel(SyncState::default());
    let state = admin::AdminState {
        metrics: Metrics::new(),
        status,
        watch_counters: None,
        limits: admin::ProbeLimits::default(),
        rule_counters: None,
    };
    let admin_task = tokio::spawn(admin::serve_limited(listener, state, 2));
    // Two idle connections take both slots. No wait is needed before the third: the server
    // accepts in connection order and takes a slot before its next accept.
    let idle =
        [tokio::net::TcpStream::connect(addr).await.unwrap(), tokio::net::TcpStream::connect(addr).await.unwrap()];
    let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(3), third.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "the connection over the cap is closed at once: {read:?}");

    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let attempt = tokio::time::timeout(Duration::from_millis(500), async {
            use tokio::io::AsyncWriteExt;
            let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).await.ok()?;
            Some(out)
        })
        .await;
        if let Ok(Some(out)) = attempt
            && out.starts_with("HTTP/1.1 200")
        {
            break;
        }
        assert!(Instant::now() < deadline, "the admin server never served again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    admin_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_nft_is_killed_after_its_timeout_and_the_sync_loop_goes_on() {
    use netpol::agent::nft_target::NftTarget;
    use netpol::nft::backend::netlink::NetlinkNftables;
    use netpol::nft::backend::process::RealNftables;
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let hanging = dir.path().join("nft");
    // `exec`: the hanging process is the agent's child itself, as the real nft is.
    std::fs::write(&hanging, "#!/bin/sh\nexec sleep 600\n").unwrap();
    std::fs::set_permissions(&hanging, std::fs::Permissions::from_mode(0o755)).unwrap();
    let nft = RealNftables { nft: hanging, timeout: Duration::from_millis(300), ..RealNftables::default() };
    // nft only: nothing reaches this process's own kernel tables.
    let target = NftTarget::new(NetlinkNftables::nft_only(nft), "node-a", "netpol_hang");

    let server = FakeApiServer::start().await.unwrap();
    seed(&server);
    let trigger = Trigger::new();
    let (watch, driver) = ClusterWatch::start(server.client(), watcher::Config::default(), trigger.clone());
    let sync_loop = SyncLoop::new(target, watch, trigger, fast_config());
    let status = sync_loop.status();
    let tasks = [
        tokio::spawn(async move {
            let _ = driver.await;
        }),
        tokio::spawn(async move {
            sync_loop.run(std::future::pending::<()>()).await;
        }),
    ];
    wait_for("two failed syncs", Duration::from_secs(10), || status.borrow().failures >= 2).await;
    let st = status.borrow().clone();
    let error = st.last_error.clone().unwrap();
    assert!(error.contains("did not finish within 300ms; killed it"), "{error}");
    assert!(st.sync_started.is_none() || st.failures >= 2);
    assert!(admin::liveness(&st, None, &admin::ProbeLimits::default()).is_ok(), "failing, not stuck");
    for t in tasks {
        t.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_fails_through_the_admin_endpoint_while_a_sync_runs_past_its_bound() {
    let server = FakeApiServer::start().await.unwrap();
    seed(&server);
    let agent = Agent::start(&server, fast_config());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let limits = admin::ProbeLimits { stuck_after: Duration::from_millis(300), ..admin::ProbeLimits::default() };
    let state = admin::AdminState {
        metrics: agent.metrics.clone(),
        status: agent.status.clone(),
        watch_counters: Some(agent.watch.counters().clone()),
        limits,
        rule_counters: None,
    };
    let admin_task = tokio::spawn(admin::serve(listener, state));
    agent.wait_synced("the first sync", |s| s.pods.len() == 3).await;
    assert_eq!(http_get(addr, "/healthz").await.0, 200);

    // A sync held until liveness fails (past 300 ms); it recovers once the sync returns.
    agent.target.hold();
    server.apply(&pod("shop", "web-5", "192.0.2.6", &[])).unwrap();
    let mut body = String::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !body.contains("a sync has been running") {
        assert!(Instant::now() < deadline, "liveness never failed: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (code, b) = http_get(addr, "/healthz").await;
        assert!(code == 503 || code == 200);
        body = b;
    }
    agent.target.release();
    agent.wait_synced("the slow sync", |s| s.pods.len() == 4).await;
    wait_for("liveness to recover", Duration::from_secs(5), || agent.status.borrow().sync_started.is_none()).await;
    assert_eq!(http_get(addr, "/healthz").await.0, 200);
    admin_task.abort();
}
