//! System tests of the real `netpol-agent` binary on a real kernel: one agent process per
//! lab node, all watching the in-process fake apiserver, each with its `nft` redirected
//! into its node's network namespace (see `testkit::agent_process`).
//!
//! ```text
//!  test ──apply/delete──► FakeApiServer (127.0.0.1) ◄──list/watch── netpol-agent --node node-a ─nft─► node-a netns
//!    │                       │                                    netpol-agent --node node-b ─nft─► node-b netns
//!    │                       └─ mirror ─► nft_target::cluster ─► matrix::Index / evaluate ─► expected
//!    └─ Lab::probe_all (every ordered pair of lab pods, real packets) ─► kernel facts ══ expected?
//! ```
//!
//! * churn: every step (pods, policies, namespaces, IP reuse) must change the expected
//!   matrix, be applied by the agents whose node's ruleset changed, and then match it.
//! * restart gap: connections flow without pause while agents are SIGTERMed, SIGKILLed
//!   and replaced and the apiserver misbehaves; no denied one may open, no allowed one fail.
//! * shutdown: SIGTERM before the first sync is a clean exit (needs no root).
//!
//! Run: `cargo nextest run --test agent_system` as root (add `--no-capture` for timings).
//!
//! Lab pods are fixed when the lab is built; API pods come and go. Every lab pod is a
//! "slot": an address on a node. An API pod whose IP is a slot's address *is* that lab
//! pod; a slot without an API pod is just an address in the pod network that no pod owns,
//! which the evaluator sees as a non-pod endpoint (`evaluate::Endpoint::Ip`: not policed on
//! its own side, matched only by ipBlocks on the other). Every ordered pair of slots is
//! compared, on every probed port; a slot to itself is left out (it never reaches the node).
//!
//! The agents run in the root namespace (to reach the apiserver on loopback); each one's
//! kernel is a lab node. Nothing else in the root namespace is touched.

use crate::common;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use netpol::agent::nft_target;
use netpol::agent::watch::WatchBackoff;
use netpol::compile::{NodeConfig, compile};
use netpol::lab::{self, L4, Lab, LabNode, LabPod};
use netpol::nft::ir::Ruleset;
use netpol::policy::bitset::BitMatrix;
use netpol::policy::evaluate::{self, Connection, Endpoint};
use netpol::policy::matrix::{self, Family, ProbePort};
use netpol::policy::model::{Cluster, Direction};
use netpol::testkit::agent_process::{AgentLaunch, AgentProcess, NftRoute};
use netpol::testkit::apiserver::{FakeApiServer, Kind};
use netpol::testkit::mirror::MirroredApi;
use netpol::testkit::objects::{labels, namespace, pod};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn launch(dir: &Path, server: &FakeApiServer, node: &str, table: &str, nft: NftRoute) -> AgentLaunch {
    let kubeconfig = dir.join("kubeconfig");
    if !kubeconfig.exists() {
        std::fs::write(&kubeconfig, server.kubeconfig_yaml()).unwrap();
    }
    AgentLaunch::new(env!("CARGO_BIN_EXE_netpol-agent"), node, table, kubeconfig, nft, dir)
}

// ---------------------------------------------------------------- builders

fn select(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector { match_labels: labels(pairs), ..LabelSelector::default() }
}

/// A peer: pods matching `pods` (None: any) in namespaces matching `namespaces` (None: the
/// policy's own namespace).
fn peer(namespaces: Option<&[(&str, &str)]>, pods: Option<&[(&str, &str)]>) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        namespace_selector: namespaces.map(select),
        pod_selector: pods.map(select),
        ..NetworkPolicyPeer::default()
    }
}

fn ip_block(cidr: &str, except: &[&str]) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        ip_block: Some(IPBlock {
            cidr: cidr.into(),
            except: (!except.is_empty()).then(|| except.iter().map(|s| s.to_string()).collect()),
        }),
        ..NetworkPolicyPeer::default()
    }
}

fn port(protocol: &str, port: IntOrString) -> NetworkPolicyPort {
    NetworkPolicyPort { port: Some(port), protocol: Some(protocol.into()), ..NetworkPolicyPort::default() }
}

fn tcp(n: i32) -> NetworkPolicyPort {
    port("TCP", IntOrString::Int(n))
}

fn udp(n: i32) -> NetworkPolicyPort {
    port("UDP", IntOrString::Int(n))
}

fn named_tcp(name: &str) -> NetworkPolicyPort {
    port("TCP", IntOrString::String(name.into()))
}

fn from(peers: Vec<NetworkPolicyPeer>, ports: Vec<NetworkPolicyPort>) -> NetworkPolicyIngressRule {
    NetworkPolicyIngressRule { from: Some(peers), ports: Some(ports) }
}

fn to(peers: Vec<NetworkPolicyPeer>, ports: Vec<NetworkPolicyPort>) -> NetworkPolicyEgressRule {
    NetworkPolicyEgressRule { to: Some(peers), ports: Some(ports) }
}

/// A policy selecting `selects` in `ns`; a direction is in policyTypes iff its rules are given.
fn policy(
    ns: &str,
    name: &str,
    selects: &[(&str, &str)],
    ingress: Option<Vec<NetworkPolicyIngressRule>>,
    egress: Option<Vec<NetworkPolicyEgressRule>>,
) -> NetworkPolicy {
    let mut types = Vec::new();
    if ingress.is_some() {
        types.push("Ingress".to_string());
    }
    if egress.is_some() {
        types.push("Egress".to_string());
    }
    NetworkPolicy {
        metadata: ObjectMeta { name: Some(name.into()), namespace: Some(ns.into()), ..ObjectMeta::default() },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(select(selects)),
            policy_types: Some(types),
            ingress,
            egress,
        }),
    }
}

// ---------------------------------------------------------------- the API and its mirror

/// The fake apiserver and a mirror of everything applied to it: the cluster the agents
/// must end up enforcing.
type Api = MirroredApi;

/// The cluster as the agents see it once synced: the agent's own conversion of the
/// mirror's objects.
fn applied_cluster(api: &Api) -> Cluster {
    let (cluster, skipped) = nft_target::cluster(&api.snapshot());
    assert_eq!(skipped, 0, "every object the test applies is valid");
    cluster
}

// ---------------------------------------------------------------- lab slots and matrices

/// A lab pod: an address on a node, owned by whichever API pod has that IP (or none).
#[derive(Clone, Copy)]
struct Slot {
    ip: Ipv4Addr,
    node: &'static str,
}

const fn slot(a: u8, b: u8, node: &'static str) -> Slot {
    Slot { ip: Ipv4Addr::new(10, 44, a, b), node }
}

/// One compared cell: from slot `from` to slot `to` on `port`/`proto`.
#[derive(Clone, Copy, Debug)]
struct Cell {
    from: usize,
    to: usize,
    port: u16,
    proto: L4,
}

/// Every ordered pair of distinct slots, on every port.
fn all_cells(slots: &[Slot], ports: &[(u16, L4)]) -> Vec<Cell> {
    let mut cells = Vec::new();
    for &(port, proto) in ports {
        for from in 0..slots.len() {
            for to in (0..slots.len()).filter(|&to| to != from) {
                cells.push(Cell { from, to, port, proto });
            }
        }
    }
    cells
}

fn lab_probes(cells: &[Cell]) -> Vec<lab::Probe> {
    cells.iter().map(|c| lab::Probe::new(c.from, c.to, c.port, c.proto)).collect()
}

/// A lab with one node per name and one pod per slot, serving every port; no rulesets
/// (the agents program them).
fn build_lab(nodes: &[&str], slots: &[Slot], ports: &[(u16, L4)]) -> Lab {
    let lab_nodes: Vec<LabNode> =
        nodes.iter().map(|n| LabNode { name: n.to_string(), ruleset: String::new() }).collect();
    let pods: Vec<LabPod> = slots
        .iter()
        .enumerate()
        .map(|(i, s)| LabPod {
            name: format!("slot-{i}"),
            node: s.node.into(),
            ips: vec![IpAddr::V4(s.ip)],
            serve: ports.to_vec(),
            host_network: false,
        })
        .collect();
    Lab::build(&lab_nodes, &pods).unwrap()
}

/// The slot's endpoint as the evaluator sees it: the API pod owning its IP, else the IP.
fn endpoint(cluster: &Cluster, slot: &Slot) -> Endpoint {
    let ip = IpAddr::V4(slot.ip);
    cluster.pod_by_ip(ip).map_or(Endpoint::Ip(ip), Endpoint::Pod)
}

/// The verdict per cell: the evaluator's, and with the unknown-pod guard on (`guarded`),
/// denied wherever one end is a slot no API pod owns (its node's guard drops it).
fn expected_guarded(cluster: &Cluster, slots: &[Slot], cells: &[Cell], guarded: bool) -> Vec<bool> {
    let mut want = expected(cluster, slots, cells);
    if guarded {
        let unknown = |i: usize| matches!(endpoint(cluster, &slots[i]), Endpoint::Ip(_));
        for (w, c) in want.iter_mut().zip(cells) {
            *w &= !(unknown(c.from) || unknown(c.to));
        }
    }
    want
}

/// The evaluator's verdict per cell: pod-to-pod cells from `matrix::Index` (the engine
/// `netpol-check matrix` uses), cells with a non-pod end from `evaluate::evaluate`.
fn expected(cluster: &Cluster, slots: &[Slot], cells: &[Cell]) -> Vec<bool> {
    for s in slots {
        if let Endpoint::Pod(k) = endpoint(cluster, s) {
            assert_eq!(cluster.pods[k].node, s.node, "{} must run on its slot's node", cluster.pods[k].id);
        }
    }
    let index = matrix::Index::new(cluster, Family::Ipv4);
    let mut matrices: BTreeMap<(u16, L4), BitMatrix> = BTreeMap::new();
    cells
        .iter()
        .map(|c| {
            let (src, dst) = (endpoint(cluster, &slots[c.from]), endpoint(cluster, &slots[c.to]));
            match (src, dst) {
                (Endpoint::Pod(i), Endpoint::Pod(j)) => matrices
                    .entry((c.port, c.proto))
                    .or_insert_with(|| {
                        index.matrix(&matrix::Probe { port: ProbePort::Number(c.port), protocol: c.proto })
                    })
                    .get(i, j),
                _ => {
                    let conn = Connection { src, dst, protocol: c.proto, port: c.port, ipv6: false };
                    evaluate::evaluate(cluster, &conn).allowed
                }
            }
        })
        .collect()
}

fn describe(cluster: &Cluster, slots: &[Slot], i: usize) -> String {
    let s = &slots[i];
    match endpoint(cluster, s) {
        Endpoint::Pod(k) => format!("{} ({}, {})", cluster.pods[k].id, s.ip, s.node),
        Endpoint::Ip(_) => format!("no pod ({}, {})", s.ip, s.node),
    }
}

fn verdict(allowed: bool) -> &'static str {
    if allowed { "allowed" } else { "denied" }
}

/// One line per cell where the kernel disagrees with the evaluator.
fn disagreements(cluster: &Cluster, slots: &[Slot], cells: &[Cell], want: &[bool], got: &[bool]) -> Vec<String> {
    cells
        .iter()
        .zip(want.iter().zip(got))
        .filter(|(_, (w, g))| w != g)
        .map(|(c, (w, g))| {
            format!(
                "{}/{} {} -> {}: evaluator {}, kernel {}",
                c.proto,
                c.port,
                describe(cluster, slots, c.from),
                describe(cluster, slots, c.to),
                verdict(*w),
                verdict(*g)
            )
        })
        .collect()
}

// ---------------------------------------------------------------- the agents and the scene

/// One agent per lab node; a restart replaces the process, keeping the launch.
struct Fleet {
    launches: Vec<AgentLaunch>,
    agents: Vec<AgentProcess>,
    started: Vec<usize>,
}

impl Fleet {
    /// One agent per node, each with `--pod-cidr` for its entry of `pod_cidrs` (none if
    /// empty: the unknown-pod guard stays off).
    fn start(
        dir: &Path,
        server: &FakeApiServer,
        lab: &Lab,
        nodes: &[&str],
        table: &str,
        pod_cidrs: &[String],
    ) -> Fleet {
        let launches: Vec<AgentLaunch> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let netns = lab.node_netns(n).unwrap();
                let mut l = launch(dir, server, n, table, NftRoute::Netns(netns));
                l.extra_args = vec!["--debounce".into(), "20ms".into()];
                // The sync loop's "not syncing" lines show that a gate held (`declined_to_sync`).
                l.log_level = "info,netpol::agent::trigger=debug".into();
                if let Some(cidr) = pod_cidrs.get(i) {
                    l.extra_args.extend(["--pod-cidr".to_string(), cidr.clone()]);
                }
                l
            })
            .collect();
        let mut fleet = Fleet { launches, agents: Vec::new(), started: vec![0; nodes.len()] };
        for i in 0..nodes.len() {
            let agent = fleet.spawn(i);
            fleet.agents.push(agent);
        }
        fleet
    }

    fn spawn(&mut self, i: usize) -> AgentProcess {
        self.started[i] += 1;
        let l = &self.launches[i];
        l.spawn(&format!("agent-{}-{}.log", l.node, self.started[i])).unwrap()
    }

    /// Replaces agent `i`, which must have exited, with a new process.
    fn restart(&mut self, i: usize) {
        assert!(self.agents[i].exited().is_some(), "restart of a running agent");
        self.agents[i] = self.spawn(i);
    }

    /// Panics with its log if an agent has exited.
    fn assert_running(&mut self) {
        for a in &mut self.agents {
            if let Some(status) = a.exited() {
                panic!("the agent for {} exited ({status}):\n{}", a.node(), a.log());
            }
        }
    }

    fn applied_counts(&self) -> Vec<usize> {
        self.agents.iter().map(|a| a.applied(None)).collect()
    }

    fn logs(&self) -> String {
        self.agents.iter().map(|a| format!("--- agent {} log\n{}", a.node(), a.log())).collect()
    }
}

/// How long one probe round waits for blocked probes. Allowed TCP/UDP probes between lab
/// namespaces answer in well under a millisecond; a miss only makes another round.
const ROUND_TIMEOUT: Duration = Duration::from_millis(250);
/// How long the agents get to apply and converge after one change.
const CONVERGE_LIMIT: Duration = Duration::from_secs(10);

/// How long one step took to settle, from the change.
struct Settled {
    /// Until every agent whose node's ruleset changed had applied a transaction (its log).
    applied: Duration,
    /// Until the end of the first of two probe rounds in a row that equal the evaluator.
    matched: Duration,
}

/// A lab, the fake apiserver with its mirror, and one real agent per lab node.
/// Fields drop in order: agents first, then the lab, then the apiserver.
struct Scene {
    fleet: Fleet,
    lab: Lab,
    api: Api,
    nodes: Vec<&'static str>,
    slots: Vec<Slot>,
    cells: Vec<Cell>,
    table: String,
    /// The expected facts and per-node rulesets at the last settled step.
    facts: Vec<bool>,
    rulesets: Option<Vec<Ruleset>>,
    /// Each node's pod CIDR when the agents run with the unknown-pod guard (else empty).
    pod_cidrs: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Scene {
    /// Builds the lab, seeds the apiserver and starts the agents (not yet settled).
    fn start(
        nodes: &[&'static str],
        slots: &[Slot],
        ports: &[(u16, L4)],
        table: &str,
        seed: impl FnOnce(&mut Api),
    ) -> Scene {
        Scene::start_guarded(nodes, slots, ports, table, &[], seed)
    }

    /// [`Scene::start`] with agents that know their node's pod CIDR (`pod_cidrs[i]` for
    /// `nodes[i]`): an address inside it that is no known pod of that node is cut off.
    fn start_guarded(
        nodes: &[&'static str],
        slots: &[Slot],
        ports: &[(u16, L4)],
        table: &str,
        pod_cidrs: &[String],
        seed: impl FnOnce(&mut Api),
    ) -> Scene {
        let mut api = Api::new(block_on_current(FakeApiServer::start()).unwrap());
        seed(&mut api);
        let dir = tempfile::tempdir().unwrap();
        let lab = build_lab(nodes, slots, ports);
        let fleet = Fleet::start(dir.path(), &api.server, &lab, nodes, table, pod_cidrs);
        let cells = all_cells(slots, ports);
        // Before any agent has run nothing is enforced.
        let facts = expected(&Cluster::default(), slots, &cells);
        Scene {
            fleet,
            lab,
            api,
            nodes: nodes.to_vec(),
            slots: slots.to_vec(),
            cells,
            table: table.into(),
            facts,
            rulesets: None,
            pod_cidrs: pod_cidrs.to_vec(),
            _dir: dir,
        }
    }

    fn expected(&self, cluster: &Cluster) -> Vec<bool> {
        expected_guarded(cluster, &self.slots, &self.cells, !self.pod_cidrs.is_empty())
    }

    fn compile_all(&self, cluster: &Cluster) -> Vec<Ruleset> {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let pod_cidrs = self.pod_cidrs.get(i).map(|c| vec![c.parse().unwrap()]).unwrap_or_default();
                compile(cluster, &NodeConfig { table: self.table.clone(), pod_cidrs, ..NodeConfig::new(n.to_string()) })
            })
            .collect()
    }

    /// Applies `change` and waits until the kernel agrees with the evaluator.
    fn step(&mut self, name: &str, change: impl FnOnce(&mut Api)) -> Settled {
        let before = self.fleet.applied_counts();
        let t = Instant::now();
        change(&mut self.api);
        self.settle(name, t, &before)
    }

    /// After a change made at `changed_at` (applied counts `before`): the change must alter
    /// the expected matrix (or convergence would prove nothing); every agent whose node's
    /// ruleset changed must apply a transaction; then the kernel must equal the evaluator
    /// on every cell for two probe rounds in a row.
    fn settle(&mut self, name: &str, changed_at: Instant, before: &[usize]) -> Settled {
        let cluster = applied_cluster(&self.api);
        let want = self.expected(&cluster);
        assert_ne!(want, self.facts, "step `{name}` does not change the expected matrix: it would prove nothing");
        let rulesets = self.compile_all(&cluster);
        let must_apply: Vec<usize> =
            (0..self.nodes.len()).filter(|&i| self.rulesets.as_ref().is_none_or(|old| old[i] != rulesets[i])).collect();
        assert!(!must_apply.is_empty(), "step `{name}` changes no node's ruleset");
        loop {
            self.fleet.assert_running();
            if must_apply.iter().all(|&i| self.fleet.agents[i].applied(None) > before[i]) {
                break;
            }
            assert!(changed_at.elapsed() < CONVERGE_LIMIT, "step `{name}`: not applied in time\n{}", self.fleet.logs());
            std::thread::sleep(Duration::from_millis(2));
        }
        let applied = changed_at.elapsed();
        let matched = self.probe_until_equal(name, &cluster, &want, changed_at);
        self.facts = want;
        self.rulesets = Some(rulesets);
        Settled { applied, matched }
    }

    /// Probes every cell until two rounds in a row equal `want`; the time from `since` to
    /// the end of the first of them.
    fn probe_until_equal(&mut self, name: &str, cluster: &Cluster, want: &[bool], since: Instant) -> Duration {
        let probes = lab_probes(&self.cells);
        let mut first_match: Option<Duration> = None;
        loop {
            self.fleet.assert_running();
            let got = self.lab.probe_all(&probes, ROUND_TIMEOUT).unwrap();
            if got == want {
                match first_match {
                    Some(t) => return t,
                    None => first_match = Some(since.elapsed()),
                }
                continue;
            }
            first_match = None;
            if since.elapsed() > CONVERGE_LIMIT {
                panic!(
                    "step `{name}`: the kernel still disagrees with the evaluator after {CONVERGE_LIMIT:?}:\n{}\n{}",
                    disagreements(cluster, &self.slots, &self.cells, want, &got).join("\n"),
                    self.fleet.logs()
                );
            }
        }
    }
}

/// Runs a future to completion on the current runtime (the scene's apiserver needs one).
fn block_on_current<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Handle::current().block_on(f)
}

// ---------------------------------------------------------------- churn

const CHURN_NODES: [&str; 3] = ["node-a", "node-b", "node-c"];
const CHURN_SLOTS: [Slot; 8] = [
    slot(0, 10, "node-a"),
    slot(0, 11, "node-a"),
    slot(0, 12, "node-a"),
    slot(1, 10, "node-b"),
    slot(1, 11, "node-b"),
    slot(1, 12, "node-b"),
    slot(2, 10, "node-c"),
    slot(2, 11, "node-c"),
];
const CHURN_PORTS: [(u16, L4); 3] = [(80, L4::Tcp), (8080, L4::Tcp), (5353, L4::Udp)];

/// An API pod on churn slot `i`: its IP and node.
fn pod_at(ns: &str, name: &str, i: usize, l: &[(&str, &str)]) -> Pod {
    let s = CHURN_SLOTS[i];
    pod(ns, name, s.node, &s.ip.to_string(), l)
}

fn db_from_web(ports: Vec<NetworkPolicyPort>) -> NetworkPolicy {
    policy(
        "shop",
        "db-from-web",
        &[("app", "db")],
        Some(vec![from(vec![peer(None, Some(&[("app", "web")]))], ports)]),
        None,
    )
}

/// Three agents on three nodes follow pod adds, deletes, relabels, IP reuse, policy adds,
/// changes and deletes, namespace relabels and a completed pod; after every step the
/// kernel's matrix (every ordered slot pair, TCP 80 and 8080, UDP 5353) equals the
/// evaluator's for the cluster as applied.
#[test]
fn every_step_of_pod_policy_and_namespace_churn_converges_to_the_evaluators_matrix_in_the_kernel() {
    if !common::kernel_or_skip() {
        return;
    }
    let test_started = Instant::now();
    let rt = runtime();
    let _in_runtime = rt.enter();
    let started = Instant::now();
    let mut scene = Scene::start(&CHURN_NODES, &CHURN_SLOTS, &CHURN_PORTS, "netpol_churn", |api| {
        // Web pods may reach db pods on TCP 80; slots 1, 2, 5 and 7 have no pod yet.
        api.ns(namespace("shop", &[("team", "a")]));
        api.ns(namespace("ops", &[("team", "b")]));
        api.ns(namespace("batch", &[("team", "c")]));
        api.pod(pod_at("shop", "web-1", 0, &[("app", "web")]));
        api.pod(pod_at("shop", "db-1", 3, &[("app", "db")]));
        api.pod(pod_at("shop", "web-2", 4, &[("app", "web")]));
        api.pod(pod_at("ops", "mon-1", 6, &[("app", "mon")]));
        api.policy(db_from_web(vec![tcp(80)]));
    });
    let mut times =
        vec![("initial lists (agents started)".to_string(), scene.settle("initial lists", started, &[0, 0, 0]))];
    let mut step = |name: &str, change: &dyn Fn(&mut Api)| {
        let settled = scene.step(name, change);
        times.push((name.to_string(), settled));
    };

    step("pods added on two nodes", &|api| {
        api.pod(pod_at("shop", "db-2", 1, &[("app", "db")]));
        api.pod(pod_at("batch", "job-1", 7, &[("app", "job")]));
    });
    step("egress policy with an ipBlock, and a cross-namespace ingress policy, added", &|api| {
        api.policy(policy(
            "ops",
            "mon-egress",
            &[("app", "mon")],
            None,
            Some(vec![
                to(vec![peer(Some(&[("team", "a")]), Some(&[("app", "db")]))], vec![tcp(8080), udp(5353)]),
                to(vec![ip_block("10.44.0.0/24", &["10.44.0.12/32"])], vec![tcp(80)]),
            ]),
        ));
        api.policy(policy(
            "shop",
            "db-from-team-b",
            &[("app", "db")],
            Some(vec![from(vec![peer(Some(&[("team", "b")]), None)], vec![tcp(8080)])]),
            None,
        ));
    });
    step("pod relabelled out of a peer selector", &|api| {
        api.pod(pod_at("shop", "web-2", 4, &[("app", "api")]));
    });
    step("namespace relabelled into a namespace selector", &|api| {
        api.ns(namespace("batch", &[("team", "b")]));
    });
    step("policy modified: named port, UDP, a second peer", &|api| {
        api.policy(policy(
            "shop",
            "db-from-web",
            &[("app", "db")],
            Some(vec![from(
                vec![peer(None, Some(&[("app", "web")])), peer(None, Some(&[("app", "api")]))],
                vec![named_tcp("http"), udp(5353)],
            )]),
            None,
        ));
    });
    step("isolated pod deleted", &|api| api.delete_pod("shop", "db-1"));
    step("IPs reused by pods of other namespaces and labels", &|api| {
        // db-1's address (slot 3) goes to a cache in another namespace; web-1's (slot 0)
        // to a pod with the same labels in another namespace, in one burst.
        api.pod(pod_at("batch", "cache-1", 3, &[("app", "cache")]));
        api.delete_pod("shop", "web-1");
        api.pod(pod_at("ops", "web-1", 0, &[("app", "web")]));
    });
    step("default-deny ingress in the namespace that reused an IP", &|api| {
        api.policy(policy("batch", "default-deny-ingress", &[], Some(vec![]), None));
    });
    step("policy deleted", &|api| api.delete_policy("shop", "db-from-web"));
    step("pod completed", &|api| {
        let mut job = api.get_pod("batch", "job-1");
        job.status.as_mut().unwrap().phase = Some("Succeeded".into());
        api.pod(job);
    });
    step("namespace relabelled out of a namespace selector", &|api| {
        api.ns(namespace("ops", &[("team", "x")]));
    });

    for a in &mut scene.fleet.agents {
        let status = a.terminate(Duration::from_secs(10)).unwrap().expect("agent stops on SIGTERM");
        assert_eq!(status.code(), Some(0), "{}", a.log());
    }
    eprintln!(
        "churn: {} nodes, {} cells per probe round, {} steps, {:?} in all",
        CHURN_NODES.len(),
        scene.cells.len(),
        times.len(),
        test_started.elapsed()
    );
    for (name, s) in &times {
        eprintln!("  applied {:>4} ms, kernel matched {:>4} ms: {name}", s.applied.as_millis(), s.matched.as_millis());
    }
}

// ---------------------------------------------------------------- cluster-wide tiers

const TIER_NODES: [&str; 2] = ["node-a", "node-b"];
/// shop/web-1 (node-a), shop/db-1 (node-b), ops/mon-1 (node-a), ops/mon-2 (node-b).
const TIER_SLOTS: [Slot; 4] =
    [slot(9, 10, "node-a"), slot(9, 11, "node-b"), slot(9, 12, "node-a"), slot(9, 13, "node-b")];
const TIER_PORTS: [(u16, L4); 1] = [(80, L4::Tcp)];
const TIER_WEB: usize = 0;
const TIER_DB: usize = 1;
const TIER_MON: [usize; 2] = [2, 3];

fn tier_pod(ns: &str, name: &str, i: usize, l: &[(&str, &str)]) -> Pod {
    let s = TIER_SLOTS[i];
    pod(ns, name, s.node, &s.ip.to_string(), l)
}

/// A ClusterNetworkPolicy (v1beta1) on the namespaces labelled `team: a` (shop): `action`
/// for ingress from the namespaces labelled `team: b` (ops).
fn shop_from_ops(name: &str, tier: &str, priority: u16, action: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "policy.networking.k8s.io/v1beta1",
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": name},
        "spec": {
            "tier": tier,
            "priority": priority,
            "subject": {"namespaces": {"matchLabels": {"team": "a"}}},
            "ingress": [{"action": action, "from": [{"namespaces": {"matchLabels": {"team": "b"}}}]}],
        },
    })
}

/// Whether the settled scene's kernel lets slot `from` reach slot `to` on TCP 80.
fn tier_fact(scene: &Scene, from: usize, to: usize) -> bool {
    let i = scene.cells.iter().position(|c| c.from == from && c.to == to).expect("a probed cell");
    scene.facts[i]
}

/// The Admin tier before NetworkPolicies, the Baseline tier after them, with real agents
/// and real packets: an Admin Deny between two namespaces overrides a NetworkPolicy's
/// allow; an Admin Pass above it hands the traffic over to the NetworkPolicy (the lower
/// Deny is skipped); a Baseline deny (BaselineAdminNetworkPolicy) is overridden where a
/// NetworkPolicy allows and holds where none does. After every step the kernel equals
/// the evaluator on every cell.
#[test]
fn admin_and_baseline_tiers_around_network_policies_are_enforced_by_the_agents_with_real_packets() {
    if !common::kernel_or_skip() {
        return;
    }
    let rt = runtime();
    let _in_runtime = rt.enter();
    let started = Instant::now();
    let mut scene = Scene::start(&TIER_NODES, &TIER_SLOTS, &TIER_PORTS, "netpol_tiers", |api| {
        // Installed before the agents start: one installed later is found within 30-60 s.
        api.server.install_crd(Kind::ClusterNetworkPolicy);
        api.server.install_crd(Kind::BaselineAdminNetworkPolicy);
        api.ns(namespace("shop", &[("team", "a")]));
        api.ns(namespace("ops", &[("team", "b")]));
        api.pod(tier_pod("shop", "web-1", TIER_WEB, &[("app", "web")]));
        api.pod(tier_pod("shop", "db-1", TIER_DB, &[("app", "db")]));
        api.pod(tier_pod("ops", "mon-1", TIER_MON[0], &[("app", "mon")]));
        api.pod(tier_pod("ops", "mon-2", TIER_MON[1], &[("app", "mon")]));
        // The db accepts the ops namespace only.
        api.policy(policy(
            "shop",
            "db-from-ops",
            &[("app", "db")],
            Some(vec![from(vec![peer(Some(&[("team", "b")]), None)], vec![tcp(80)])]),
            None,
        ));
    });
    scene.settle("initial lists", started, &[0, 0]);
    for mon in TIER_MON {
        assert!(tier_fact(&scene, mon, TIER_DB), "the NetworkPolicy lets ops reach the db");
    }
    assert!(!tier_fact(&scene, TIER_WEB, TIER_DB), "and nothing else");

    scene.step("an Admin Deny from ops to shop", |api| {
        api.cluster_policy(shop_from_ops("deny-ops", "Admin", 20, "Deny"));
    });
    for mon in TIER_MON {
        assert!(!tier_fact(&scene, mon, TIER_DB), "the Admin Deny overrides the NetworkPolicy's allow");
        assert!(!tier_fact(&scene, mon, TIER_WEB));
    }
    assert!(tier_fact(&scene, TIER_DB, TIER_MON[0]), "ops itself is not a subject");

    scene.step("an Admin Pass above the Deny", |api| {
        api.cluster_policy(shop_from_ops("pass-ops", "Admin", 10, "Pass"));
    });
    for mon in TIER_MON {
        assert!(tier_fact(&scene, mon, TIER_DB), "passed to the NetworkPolicy, which allows");
        assert!(tier_fact(&scene, mon, TIER_WEB), "passed to no NetworkPolicy: default allow");
    }

    scene.step("the Admin policies replaced by a Baseline deny", |api| {
        api.delete_cluster_policy(Kind::ClusterNetworkPolicy, "pass-ops");
        api.delete_cluster_policy(Kind::ClusterNetworkPolicy, "deny-ops");
        api.cluster_policy(serde_json::json!({
            "apiVersion": "policy.networking.k8s.io/v1alpha1",
            "kind": "BaselineAdminNetworkPolicy",
            "metadata": {"name": "default"},
            "spec": {
                "subject": {"namespaces": {"matchLabels": {"team": "a"}}},
                "ingress": [{"action": "Deny", "from": [{"namespaces": {"matchLabels": {"team": "b"}}}]}],
            },
        }));
    });
    for mon in TIER_MON {
        assert!(tier_fact(&scene, mon, TIER_DB), "the NetworkPolicy overrides the Baseline deny");
        assert!(!tier_fact(&scene, mon, TIER_WEB), "no NetworkPolicy selects web: the Baseline deny holds");
    }

    for a in &mut scene.fleet.agents {
        let status = a.terminate(Duration::from_secs(10)).unwrap().expect("agent stops on SIGTERM");
        assert_eq!(status.code(), Some(0), "{}", a.log());
    }
}

// ---------------------------------------------------------------- restarts under traffic

const GAP_NODES: [&str; 2] = ["node-a", "node-b"];
const GAP_SLOTS: [Slot; 6] = [
    slot(5, 10, "node-a"),
    slot(5, 11, "node-a"),
    slot(5, 12, "node-a"),
    slot(6, 10, "node-b"),
    slot(6, 11, "node-b"),
    slot(6, 12, "node-b"),
];
const GAP_PORTS: [(u16, L4); 1] = [(80, L4::Tcp)];

/// An API pod on restart-test slot `i`.
fn gap_pod(ns: &str, name: &str, i: usize, l: &[(&str, &str)]) -> Pod {
    let s = GAP_SLOTS[i];
    pod(ns, name, s.node, &s.ip.to_string(), l)
}

/// How long an expected-allowed connection may take. A refused or dropped SYN fails at
/// once or at the next retransmission (1 s), so this only excuses a slow machine.
const ALLOWED_TIMEOUT: Duration = Duration::from_secs(1);
/// How long an expected-denied connection is given to complete: between lab namespaces a
/// connection that gets through completes in well under a millisecond.
const DENIED_TIMEOUT: Duration = Duration::from_millis(60);
/// Threads probing the denied cells, staggered: a wave of denied probes lasts the whole
/// time-out, so several threads are needed to look often (a gap of a few milliseconds,
/// such as a non-atomic table replacement, must not slip between two looks).
const DENIED_THREADS: u32 = 3;

/// Whether the agent's log shows its sync loop declining to sync (not all resources
/// listed) after pods and namespaces had both completed their initial list: the loop woke
/// for those lists and held off, the provable point for "nothing synced before
/// NetworkPolicies listed".
fn declined_to_sync_after_pod_and_namespace_lists(log: &str) -> bool {
    let lines: Vec<serde_json::Value> = log.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let listed = |resource: &str| {
        lines
            .iter()
            .position(|v| v["fields"]["message"] == "initial list complete" && v["fields"]["resource"] == resource)
    };
    let (Some(pods), Some(namespaces)) = (listed("pods"), listed("namespaces")) else { return false };
    lines[pods.max(namespaces)..].iter().any(|v| v["fields"]["message"] == "not all resources listed yet; not syncing")
}

/// New connections over and over on a fixed set of cells that should all be allowed (or
/// all denied); every connection is counted, every wrong one recorded with the phase it
/// happened in.
struct Flow<'a> {
    cells: Vec<Cell>,
    allowed: bool,
    timeout: Duration,
    pause: Duration,
    attempted: AtomicU64,
    /// Probe rounds finished (by all of the flow's threads).
    rounds: AtomicU64,
    wrong: Mutex<Vec<String>>,
    phase: &'a Mutex<String>,
}

impl Flow<'_> {
    fn run(&self, lab: &Lab, stop: &AtomicBool, t0: Instant) {
        let probes = lab_probes(&self.cells);
        while !stop.load(Ordering::SeqCst) {
            let facts = lab.probe_all(&probes, self.timeout).unwrap();
            self.attempted.fetch_add(facts.len() as u64, Ordering::SeqCst);
            for (c, got) in self.cells.iter().zip(facts) {
                if got != self.allowed {
                    let phase = self.phase.lock().unwrap().clone();
                    self.wrong.lock().unwrap().push(format!(
                        "{:>6} ms [{phase}] slot {} -> slot {} tcp/{}: expected {}, kernel {}",
                        t0.elapsed().as_millis(),
                        c.from,
                        c.to,
                        c.port,
                        verdict(self.allowed),
                        verdict(got)
                    ));
                }
            }
            self.rounds.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(self.pause);
        }
    }

    fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::SeqCst)
    }
}

/// Stops the flows when the choreography ends, also by panic (else the scope would wait
/// for them forever).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// While new connections flow without pause (web → db allowed, bot → db and db → db
/// denied, bots egress-isolated, same node and across nodes), agents are stopped with
/// SIGTERM and SIGKILL and replaced, once while NetworkPolicies cannot be listed, once
/// both at once; then the apiserver expires watches (410), drops every connection and
/// compacts its history. The rules stay in the kernel while no agent runs, and a new agent
/// replaces the table atomically only after all three lists: not one denied connection
/// may get through, and not one allowed connection may fail.
#[test]
fn restarts_kills_and_api_faults_under_traffic_never_open_a_denied_connection_nor_refuse_an_allowed_one() {
    if !common::kernel_or_skip() {
        return;
    }
    use std::os::unix::process::ExitStatusExt as _;
    let test_started = Instant::now();
    let rt = runtime();
    let _in_runtime = rt.enter();
    let started = Instant::now();
    let mut scene = Scene::start(&GAP_NODES, &GAP_SLOTS, &GAP_PORTS, "netpol_gap", |api| {
        api.ns(namespace("front", &[("tier", "front")]));
        api.ns(namespace("back", &[("tier", "back")]));
        for (node_side, n) in [(0, 1), (3, 2)] {
            api.pod(gap_pod("front", &format!("web-{n}"), node_side, &[("app", "web")]));
            api.pod(gap_pod("front", &format!("bot-{n}"), node_side + 1, &[("app", "bot")]));
            api.pod(gap_pod("back", &format!("db-{n}"), node_side + 2, &[("app", "db")]));
        }
        api.policy(policy(
            "back",
            "db-from-web",
            &[("app", "db")],
            Some(vec![from(vec![peer(Some(&[("tier", "front")]), Some(&[("app", "web")]))], vec![tcp(80)])]),
            None,
        ));
        api.policy(policy(
            "front",
            "bot-egress",
            &[("app", "bot")],
            None,
            Some(vec![to(vec![peer(Some(&[]), Some(&[("app", "web")]))], vec![tcp(80)])]),
        ));
    });
    let initial = scene.settle("initial lists", started, &[0, 0]);

    // The flows, from the evaluator's verdicts; both must police something.
    let cluster = applied_cluster(&scene.api);
    let isolated_in = |slot: usize| match endpoint(&cluster, &GAP_SLOTS[slot]) {
        Endpoint::Pod(k) => !cluster.isolating_policies(k, Direction::Ingress).is_empty(),
        Endpoint::Ip(_) => false,
    };
    let same_node = |c: &Cell| GAP_SLOTS[c.from].node == GAP_SLOTS[c.to].node;
    let cells_where = |want: bool| -> Vec<Cell> {
        scene.cells.iter().zip(&scene.facts).filter(|&(_, &allowed)| allowed == want).map(|(c, _)| *c).collect()
    };
    let (allowed, denied) = (cells_where(true), cells_where(false));
    assert!(allowed.iter().any(|c| isolated_in(c.to)), "no allowed connection into an isolated pod");
    assert!(denied.iter().any(|c| isolated_in(c.to) && same_node(c)), "no denied connection within a node");
    assert!(denied.iter().any(|c| isolated_in(c.to) && !same_node(c)), "no denied connection across nodes");

    let phase = Mutex::new("steady".to_string());
    let set_phase = |p: &str| *phase.lock().unwrap() = p.to_string();
    let allowed_flow = Flow {
        cells: allowed,
        allowed: true,
        timeout: ALLOWED_TIMEOUT,
        pause: Duration::from_millis(10),
        attempted: AtomicU64::new(0),
        rounds: AtomicU64::new(0),
        wrong: Mutex::new(Vec::new()),
        phase: &phase,
    };
    let denied_flow = Flow {
        cells: denied,
        allowed: false,
        timeout: DENIED_TIMEOUT,
        pause: Duration::ZERO,
        attempted: AtomicU64::new(0),
        rounds: AtomicU64::new(0),
        wrong: Mutex::new(Vec::new()),
        phase: &phase,
    };
    let stop = AtomicBool::new(false);
    let mut first_syncs: Vec<(String, Duration)> = Vec::new();
    let traffic_started = Instant::now();

    std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        let lab = &scene.lab;
        s.spawn(|| allowed_flow.run(lab, &stop, test_started));
        for k in 0..DENIED_THREADS {
            let (denied_flow, stop) = (&denied_flow, &stop);
            s.spawn(move || {
                std::thread::sleep(DENIED_TIMEOUT * k / DENIED_THREADS);
                denied_flow.run(lab, stop, test_started)
            });
        }
        let fleet = &mut scene.fleet;
        let server = &scene.api.server;
        // Returns once both flows have probed the current phase: a whole round of the
        // allowed flow, and of at least one denied thread (with k threads, k + 1 rounds
        // finished mean one thread began a round after the call), instead of a guessed
        // sleep that a slow machine may not fill with probes.
        let traffic_ran = || {
            let (allowed, denied) = (allowed_flow.rounds(), denied_flow.rounds());
            let deadline = Instant::now() + CONVERGE_LIMIT;
            while allowed_flow.rounds() < allowed + 2 || denied_flow.rounds() < denied + u64::from(DENIED_THREADS) + 1 {
                assert!(Instant::now() < deadline, "the flows stopped probing");
                std::thread::sleep(Duration::from_millis(2));
            }
        };
        traffic_ran();

        // A new agent for node `i`; returns once it has replaced the table (its first,
        // full, transaction).
        let replace = |fleet: &mut Fleet, i: usize, label: &str, first_syncs: &mut Vec<(String, Duration)>| {
            let spawned = Instant::now();
            fleet.restart(i);
            fleet.agents[i].wait_applied(Some("full"), 1, CONVERGE_LIMIT).unwrap();
            first_syncs.push((label.to_string(), spawned.elapsed()));
        };
        let sigterm = |fleet: &mut Fleet, i: usize| {
            let status = fleet.agents[i].terminate(Duration::from_secs(10)).unwrap().expect("stops on SIGTERM");
            assert_eq!(status.code(), Some(0), "{}", fleet.agents[i].log());
        };

        for (i, label) in [(0, "SIGTERM node-a"), (1, "SIGTERM node-b")] {
            set_phase(label);
            sigterm(fleet, i);
            traffic_ran(); // with no agent on the node
            replace(fleet, i, label, &mut first_syncs);
            traffic_ran();
        }

        set_phase("SIGKILL node-a");
        let status = fleet.agents[0].kill_hard().unwrap();
        assert_eq!(status.signal(), Some(9));
        traffic_ran();
        replace(fleet, 0, "SIGKILL node-a", &mut first_syncs);
        traffic_ran();

        // The new agent lists pods and namespaces but not policies: it must keep its hands
        // off the table (an early sync would open every isolated pod).
        set_phase("SIGTERM node-b, restart while NetworkPolicies cannot list");
        server.pause_kind(Kind::NetworkPolicy);
        sigterm(fleet, 1);
        traffic_ran();
        let spawned = Instant::now();
        fleet.restart(1);
        let deadline = Instant::now() + CONVERGE_LIMIT;
        while !declined_to_sync_after_pod_and_namespace_lists(&fleet.agents[1].log()) {
            fleet.assert_running();
            assert!(Instant::now() < deadline, "the new agent never listed:\n{}", fleet.agents[1].log());
            std::thread::sleep(Duration::from_millis(5));
        }
        traffic_ran();
        assert_eq!(
            fleet.agents[1].applied(None),
            0,
            "synced before NetworkPolicies listed:\n{}",
            fleet.agents[1].log()
        );
        server.resume_kind(Kind::NetworkPolicy);
        fleet.agents[1].wait_applied(Some("full"), 1, CONVERGE_LIMIT).unwrap();
        first_syncs.push(("SIGTERM node-b, NetworkPolicies held back".into(), spawned.elapsed()));
        traffic_ran();

        set_phase("SIGTERM both nodes at once");
        sigterm(fleet, 0);
        sigterm(fleet, 1);
        traffic_ran();
        replace(fleet, 0, "SIGTERM both: node-a", &mut first_syncs);
        replace(fleet, 1, "SIGTERM both: node-b", &mut first_syncs);
        traffic_ran();

        for (label, fault) in [
            ("watches expired (410)", &(|| server.expire_watches()) as &dyn Fn()),
            ("all apiserver connections dropped", &|| server.drop_connections()),
            ("history compacted and watches expired (relist)", &|| {
                server.compact();
                server.expire_watches();
            }),
        ] {
            set_phase(label);
            let watches = server.watch_requests(Kind::Pod);
            fault();
            // Both agents have watched pods again (after a relist where history is gone).
            let deadline = Instant::now() + CONVERGE_LIMIT;
            while server.watch_requests(Kind::Pod) < watches + 2 {
                fleet.assert_running();
                assert!(Instant::now() < deadline, "the agents never watched again after: {label}");
                std::thread::sleep(Duration::from_millis(2));
            }
            traffic_ran();
        }
        // The agents are alive after the faults: a change that alters both rulesets (a
        // web pod outside the lab joins the peer sets) but no lab verdict is applied.
        set_phase("change after the faults");
        let before = fleet.applied_counts();
        server.apply(&pod("front", "web-3", "node-a", "10.44.9.9", &[("app", "web")])).unwrap();
        for (i, a) in fleet.agents.iter_mut().enumerate() {
            a.wait_applied(None, before[i] + 1, CONVERGE_LIMIT).unwrap();
        }
        traffic_ran();
        fleet.assert_running();
    });
    let traffic_time = traffic_started.elapsed();

    let refused = allowed_flow.wrong.into_inner().unwrap();
    let leaked = denied_flow.wrong.into_inner().unwrap();
    let (allowed_n, denied_n) = (allowed_flow.attempted.into_inner(), denied_flow.attempted.into_inner());
    eprintln!(
        "restart gap: initial sync {} ms; {:?} of traffic; {} allowed connections attempted, {} refused; \
         {} denied connections attempted, {} got through",
        initial.applied.as_millis(),
        traffic_time,
        allowed_n,
        refused.len(),
        denied_n,
        leaked.len()
    );
    for (label, took) in &first_syncs {
        eprintln!("  new agent's first full sync {:>4} ms after start: {label}", took.as_millis());
    }
    eprintln!("  whole test {:?}", test_started.elapsed());
    assert!(allowed_n > 1000 && denied_n > 100, "too little traffic to mean anything");
    assert!(leaked.is_empty(), "denied connections got through:\n{}\n{}", leaked.join("\n"), scene.fleet.logs());
    assert!(refused.is_empty(), "allowed connections failed:\n{}\n{}", refused.join("\n"), scene.fleet.logs());
    for a in &mut scene.fleet.agents {
        let status = a.terminate(Duration::from_secs(10)).unwrap().expect("agent stops on SIGTERM");
        assert_eq!(status.code(), Some(0), "{}", a.log());
    }
}

// ---------------------------------------------------------------- chaos

/// What the cluster expects, over time: each change appends the matrix it implies.
struct Expectations {
    /// (since when, expected verdict per cell), in time order.
    history: Vec<(Instant, Vec<bool>)>,
    /// While an agent is down (SIGKILLed until its replacement's first full sync) its node
    /// keeps the rules of before, and while an apiserver fault keeps the agents uninformed
    /// (until they watch again) so may both nodes: every matrix in force since stays
    /// acceptable.
    down: Vec<(Instant, Option<Instant>)>,
}

/// How long the agents get to see a change before a wrong verdict counts.
const CHAOS_GRACE: Duration = Duration::from_secs(1);

impl Expectations {
    /// The verdicts a probe round that ran over `[t0, t1]` may show for `cell`: what was
    /// expected at any moment from `CHAOS_GRACE` before it (or from the start of an agent's
    /// outage overlapping that) to its end.
    fn acceptable(&self, t0: Instant, t1: Instant, cell: usize) -> (bool, bool) {
        let mut from = t0.checked_sub(CHAOS_GRACE).unwrap_or(t0);
        for &(down, up) in &self.down {
            let up_graced = up.map(|u| u + CHAOS_GRACE);
            if down <= t1 && up_graced.is_none_or(|u| u >= from) {
                from = from.min(down);
            }
        }
        let (mut allowed, mut denied) = (false, false);
        // The matrix in force at `from` is the last one that started before it.
        let first = self.history.iter().rposition(|(at, _)| *at <= from).unwrap_or(0);
        for (at, want) in &self.history[first..] {
            if *at > t1 {
                break;
            }
            allowed |= want[cell];
            denied |= !want[cell];
        }
        (allowed, denied)
    }
}

/// A small deterministic generator for the choreography (seed printed, reproducible with
/// NETPOL_CHAOS_SEED).
struct Dice(u64);

impl Dice {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// While every ordered pair of lab pods is probed without pause, a seeded choreography of
/// SIGKILLs at random points (each agent replaced after 0-300 ms), apiserver faults (dropped
/// connections, 410 in the stream and as the status of a watch start, a compacted history,
/// a kind held back 0.3-0.8 s), foreign `nft flush ruleset`s on a node, pod churn that
/// reuses addresses (a slot's pod deleted, another pod with other labels created there
/// later) and policy changes. The agents run with their node's pod CIDR, so an address no
/// pod owns is cut off. Judged per probe round: a verdict is wrong if it matches none of
/// the matrices in force from 1 s before the round (or from an overlapping agent outage, or
/// apiserver fault until the agents watch again) to its end — no denied connection gets
/// through once the agents had 1 s to see the change, no allowed one is refused after a new
/// pod's first second.
#[test]
fn chaos_of_kills_api_faults_foreign_flushes_and_ip_reuse_under_traffic_never_errs_once_the_agents_had_a_second() {
    if !common::kernel_or_skip() {
        return;
    }
    let seed = std::env::var("NETPOL_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    });
    eprintln!("chaos seed {seed} (NETPOL_CHAOS_SEED={seed} replays the choreography)");
    let mut dice = Dice(seed);
    let rt = runtime();
    let _in_runtime = rt.enter();
    let started = Instant::now();
    let cidrs = ["10.44.5.0/24".to_string(), "10.44.6.0/24".to_string()];
    let mut scene = Scene::start_guarded(&GAP_NODES, &GAP_SLOTS, &GAP_PORTS, "netpol_chaos", &cidrs, |api| {
        api.ns(namespace("front", &[("tier", "front")]));
        api.ns(namespace("back", &[("tier", "back")]));
        api.pod(gap_pod("front", "web-1", 0, &[("app", "web")]));
        api.pod(gap_pod("back", "db-1", 2, &[("app", "db")]));
        api.pod(gap_pod("front", "bot-1", 3, &[("app", "bot")]));
        api.pod(gap_pod("back", "db-2", 5, &[("app", "db")]));
        api.policy(policy(
            "back",
            "db-from-web",
            &[("app", "db")],
            Some(vec![from(vec![peer(Some(&[("tier", "front")]), Some(&[("app", "web")]))], vec![tcp(80)])]),
            None,
        ));
    });
    scene.settle("initial lists", started, &[0, 0]);

    let expectations =
        Mutex::new(Expectations { history: vec![(Instant::now(), scene.facts.clone())], down: Vec::new() });
    let rounds: Mutex<Vec<(Instant, Instant, Vec<bool>)>> = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let mut actions: BTreeMap<&str, u32> = BTreeMap::new();
    let Scene { fleet, lab, api, nodes, cells, .. } = &mut scene;
    let all_cells = cells.clone();
    let expect_now = |api: &Api| expected_guarded(&applied_cluster(api), &GAP_SLOTS, &all_cells, true);
    let push = |want: Vec<bool>| expectations.lock().unwrap().history.push((Instant::now(), want));
    let mut names = 0u32;
    let mut owners: Vec<Option<(String, String)>> = vec![
        Some(("front".into(), "web-1".into())),
        None,
        Some(("back".into(), "db-1".into())),
        Some(("front".into(), "bot-1".into())),
        None,
        Some(("back".into(), "db-2".into())),
    ];
    let chaos_for = Duration::from_secs(25);

    std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        let (lab, stop, rounds) = (&*lab, &stop, &rounds);
        let probes = lab_probes(cells);
        s.spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let t0 = Instant::now();
                let got = lab.probe_all(&probes, Duration::from_millis(300)).unwrap();
                rounds.lock().unwrap().push((t0, Instant::now(), got));
            }
        });
        let chaos_started = Instant::now();
        while chaos_started.elapsed() < chaos_for {
            match dice.below(6) {
                0 => {
                    let i = dice.below(2) as usize;
                    *actions.entry("SIGKILL and replace an agent").or_default() += 1;
                    let down_at = Instant::now();
                    expectations.lock().unwrap().down.push((down_at, None));
                    fleet.agents[i].kill_hard().unwrap();
                    std::thread::sleep(Duration::from_millis(dice.below(300)));
                    fleet.restart(i);
                    fleet.agents[i].wait_applied(Some("full"), 1, CONVERGE_LIMIT).unwrap();
                    let mut e = expectations.lock().unwrap();
                    let last = e.down.last_mut().unwrap();
                    last.1 = Some(Instant::now());
                }
                1 => {
                    let fault = dice.below(5);
                    *actions.entry("apiserver fault").or_default() += 1;
                    // An agent cannot see what the API server does not tell it: from the
                    // fault until both agents watch every kind again (after the relist that
                    // brings them up to date), the rules of before stay acceptable, as while
                    // an agent is down.
                    let kinds = [Kind::Pod, Kind::Namespace, Kind::NetworkPolicy];
                    let watches: Vec<u64> = kinds.iter().map(|&k| api.server.watch_requests(k)).collect();
                    expectations.lock().unwrap().down.push((Instant::now(), None));
                    match fault {
                        0 => api.server.drop_connections(),
                        1 => api.server.expire_watches(),
                        2 => {
                            api.server.compact();
                            api.server.expire_watches();
                        }
                        3 => {
                            api.server.set_gone_as_status(true);
                            api.server.expire_watches();
                            std::thread::sleep(Duration::from_millis(300));
                            api.server.set_gone_as_status(false);
                        }
                        _ => {
                            let kind = [Kind::Pod, Kind::Namespace, Kind::NetworkPolicy][dice.below(3) as usize];
                            api.server.pause_kind(kind);
                            api.server.drop_connections();
                            std::thread::sleep(Duration::from_millis(300 + dice.below(500)));
                            api.server.resume_kind(kind);
                        }
                    }
                    // Faults that come close together make the agents back off, up to
                    // WatchBackoff::MAX between retries, by design (a watch that fails right
                    // after each relist must not hammer the API server): the window lasts
                    // until they are back, however long that is within the backoff's bound.
                    let deadline = Instant::now() + WatchBackoff::MAX + CONVERGE_LIMIT;
                    while kinds.iter().zip(&watches).any(|(&k, &before)| api.server.watch_requests(k) < before + 2) {
                        fleet.assert_running();
                        assert!(
                            Instant::now() < deadline,
                            "the agents never watched again after apiserver fault {fault}: watch requests before {watches:?}, now {:?}\n{}",
                            kinds.iter().map(|&k| api.server.watch_requests(k)).collect::<Vec<_>>(),
                            fleet.logs()
                        );
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    expectations.lock().unwrap().down.last_mut().unwrap().1 = Some(Instant::now());
                }
                2 => {
                    let node = nodes[dice.below(2) as usize];
                    *actions.entry("foreign nft flush ruleset").or_default() += 1;
                    // Until the agent puts the table back, that node enforces nothing.
                    push(vec![true; cells.len()]);
                    let netns = lab.node_netns(node).unwrap();
                    let out = std::process::Command::new("ip")
                        .args(["netns", "exec", &netns, "nft", "flush", "ruleset"])
                        .output()
                        .unwrap();
                    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                    push(expect_now(api));
                    // Nothing else happens for a while: only the agent's own watch on its
                    // table can put it back in time.
                    std::thread::sleep(CHAOS_GRACE + Duration::from_millis(300));
                }
                3 | 4 => {
                    let slot = dice.below(GAP_SLOTS.len() as u64) as usize;
                    match owners[slot].take() {
                        Some((ns, name)) => {
                            *actions.entry("pod deleted (its address freed)").or_default() += 1;
                            api.delete_pod(&ns, &name);
                        }
                        None => {
                            *actions.entry("pod created on a freed address").or_default() += 1;
                            names += 1;
                            let (ns, app) =
                                [("front", "web"), ("front", "bot"), ("back", "db")][dice.below(3) as usize];
                            let name = format!("{app}-x{names}");
                            api.pod(gap_pod(ns, &name, slot, &[("app", app)]));
                            owners[slot] = Some((ns.into(), name));
                        }
                    }
                    push(expect_now(api));
                }
                _ => {
                    *actions.entry("policy changed").or_default() += 1;
                    let allowed_app = ["web", "bot"][dice.below(2) as usize];
                    api.policy(policy(
                        "back",
                        "db-from-web",
                        &[("app", "db")],
                        Some(vec![from(
                            vec![peer(Some(&[("tier", "front")]), Some(&[("app", allowed_app)]))],
                            vec![tcp(80)],
                        )]),
                        None,
                    ));
                    push(expect_now(api));
                }
            }
            fleet.assert_running();
            std::thread::sleep(Duration::from_millis(100 + dice.below(400)));
        }
        // The last change gets its second too.
        std::thread::sleep(CHAOS_GRACE + Duration::from_millis(500));
        stop.store(true, Ordering::SeqCst);
    });

    let expectations = expectations.into_inner().unwrap();
    let rounds = rounds.into_inner().unwrap();
    let mut wrong = Vec::new();
    let mut judged = 0usize;
    for (t0, t1, got) in &rounds {
        for (k, &allowed) in got.iter().enumerate() {
            judged += 1;
            let (may_allow, may_deny) = expectations.acceptable(*t0, *t1, k);
            if (allowed && !may_allow) || (!allowed && !may_deny) {
                let c = cells[k];
                wrong.push(format!(
                    "{:>6} ms: slot {} -> slot {} tcp/{}: kernel {}",
                    t0.duration_since(started).as_millis(),
                    c.from,
                    c.to,
                    c.port,
                    verdict(allowed)
                ));
            }
        }
    }
    eprintln!(
        "chaos: {} changes of the expected matrix, {} probe rounds, {judged} verdicts judged, {} wrong; actions {actions:?}",
        expectations.history.len() - 1,
        rounds.len(),
        wrong.len()
    );
    assert!(rounds.len() > 20 && actions.len() >= 4, "too little chaos to mean anything: {actions:?}");
    assert!(wrong.is_empty(), "seed {seed}: wrong verdicts:\n{}\n{}", wrong.join("\n"), scene.fleet.logs());
    for a in &mut scene.fleet.agents {
        let status = a.terminate(Duration::from_secs(10)).unwrap().expect("agent stops on SIGTERM");
        assert_eq!(status.code(), Some(0), "{}", a.log());
    }
}

// ---------------------------------------------------------------- shutdown

/// The sync loop polls its shutdown future only after its first sync attempt, which here
/// never comes (the NetworkPolicies never list; the window is 2 s besides). A SIGTERM
/// then must still be a clean shutdown, so the handlers must exist from the start. Needs no
/// root: nothing is ever synced (NetworkPolicies never list) and `nft` refuses anyway.
#[test]
fn a_sigterm_right_after_start_before_the_first_sync_is_a_clean_exit_0() {
    let rt = runtime();
    let _in_runtime = rt.enter();
    let server = rt.block_on(FakeApiServer::start()).unwrap();
    server.apply(&namespace("shop", &[])).unwrap();
    server.apply(&pod("shop", "web-1", "node-a", "192.0.2.1", &[("app", "web")])).unwrap();
    server.pause_kind(Kind::NetworkPolicy);
    let dir = tempfile::tempdir().unwrap();
    let mut l = launch(dir.path(), &server, "node-a", "netpol_sigterm", NftRoute::Refuse);
    l.extra_args = vec!["--debounce".into(), "2s".into()];

    let mut agent = l.spawn("agent.log").unwrap();
    // The first answered list proves the process is inside `agent::run`, past installing
    // (or, before the fix, creating) its shutdown future: signal at once.
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.list_requests(Kind::Pod) == 0 {
        assert!(agent.exited().is_none(), "the agent exited early:\n{}", agent.log());
        assert!(Instant::now() < deadline, "the agent never listed pods:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(2));
    }
    let status = agent.terminate(Duration::from_secs(10)).unwrap().expect("the agent did not stop on SIGTERM");
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM before the first sync must be a clean exit ({status}):\n{}",
        agent.log()
    );
    assert_eq!(agent.applied(None), 0, "nothing may be applied before NetworkPolicies list");
}
