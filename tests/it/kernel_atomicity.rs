//! Ruleset changes are atomic for the packets that cross them (issue 4, DESIGN.md §4–§5).
//!
//! ```text
//!  policy sets A and B over the same 6 pods on 2 nodes
//!     │ evaluate: every (src, dst, port) is MustPass (A and B allow), MustBlock (no mix of
//!     │ A's and B's egress/ingress sides allows), OnlyA, OnlyB, or Mixed (not asserted)
//!     ▼
//!  lab: 2 node namespaces loaded with compile(A), 6 pod namespaces serving TCP 80/8080, UDP 53/81
//!     │ probe threads, each inside a source pod, never stop: a new TCP connect or UDP echo
//!     │ per attempt, each from a never-used source port (no conntrack entry can vouch for it)
//!     ▼
//!  main thread: 100 × full sync (delete + define table in one transaction), then 100 ×
//!  diff(applied, desired) as one transaction, alternating A ↔ B on both nodes, every other
//!  swap through `nft -f` and the others as the agent's netlink batch; after each swap, a
//!  sample: OnlyX reaches, OnlyNotX does not (the swap took effect)
//! ```
//!
//! Verdicts: a MustBlock connection that ever reaches, or a MustPass connection that is
//! ever refused or unanswered within 2 s, fails the test. Cross-node connections cross the
//! source node's egress and the destination node's ingress; the two nodes are swapped one
//! after the other, so for a moment one may hold A and the other B. That is why MustBlock
//! means "denied by every mix of A's and B's sides", not just "denied by A and by B".
//!
//! Needs root, `ip` and `nft`; skips with a message without them, fails under `CI=true`.

use crate::common;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use netpol::compile::{NodeConfig, compile};
use netpol::lab::traffic::{self, Outcome};
use netpol::lab::{Lab, LabNode, LabPod};
use netpol::nft::backend::netlink::NetlinkNftables;
use netpol::nft::backend::process::RealNftables;
use netpol::nft::diff::{diff, full_sync};
use netpol::nft::ir::Ruleset;
use netpol::nft::{Nftables as _, Op, render};
use netpol::policy::evaluate::{Connection, Endpoint, evaluate};
use netpol::policy::model::{
    Cluster, ContainerPort, Labels, NamespaceScope, ObjectRef, Peer, Pod, Policy, PortMatch, PortSpec, Protocol, Rule,
};
use netpol::policy::selector::Selector;

/// Swaps of each kind (full sync, incremental diff).
const SWAPS: usize = 100;
/// A MustPass attempt gets this long: a lost SYN is resent after 1 s, so even one loss on
/// a loaded 2-core machine does not turn into a false "refused".
const PASS_TIMEOUT: Duration = Duration::from_secs(2);
/// A MustBlock attempt waits this long for an answer that must not come (an allowed
/// handshake completes in well under a millisecond here).
const BLOCK_TIMEOUT: Duration = Duration::from_millis(150);
/// The "OnlyNotX is blocked" half of the sample after each swap.
const SAMPLE_BLOCK_TIMEOUT: Duration = Duration::from_millis(80);
/// Pause between MustPass attempts of one thread, so probing leaves CPU for the swaps.
const PASS_PACING: Duration = Duration::from_millis(2);
/// Source ports handed out to probes: each used once per source pod.
const FIRST_SOURCE_PORT: u16 = 10_000;
const LAST_SOURCE_PORT: u16 = 65_000;
const NS: &str = "shop";
const SERVED: [(u16, Protocol); 4] =
    [(80, Protocol::Tcp), (8080, Protocol::Tcp), (53, Protocol::Udp), (81, Protocol::Udp)];

// ---------------------------------------------------------------------------------------
// The cluster: builders, and the two policy sets.

fn pod(name: &str, node: &str, ip: &str, app: &str) -> Pod {
    Pod {
        id: ObjectRef::new(NS, name),
        labels: Labels::from([("app".to_string(), app.to_string())]).into(),
        node: node.into(),
        ips: ip.parse::<std::net::IpAddr>().unwrap().into(),
        host_network: false,
        ports: SERVED.iter().map(|&(port, protocol)| ContainerPort { name: None, port, protocol }).collect(),
    }
}

fn pods() -> Vec<Pod> {
    vec![
        pod("web-0", "n0", "10.20.0.1", "web"),
        pod("api-0", "n0", "10.20.0.2", "api"),
        pod("db-0", "n0", "10.20.0.3", "db"),
        pod("web-1", "n1", "10.20.1.1", "web"),
        pod("api-1", "n1", "10.20.1.2", "api"),
        pod("db-1", "n1", "10.20.1.3", "db"),
    ]
}

fn app(name: &str) -> Selector {
    Selector::from_labels([("app", name)])
}

fn from_app(name: &str) -> Option<Vec<Peer>> {
    Some(vec![Peer::Pods { namespaces: NamespaceScope::PolicyNamespace, pods: app(name) }])
}

fn ports(list: &[(Protocol, u16)]) -> Option<Vec<PortSpec>> {
    Some(list.iter().map(|&(protocol, p)| PortSpec { protocol, port: PortMatch::Range(p, p) }).collect())
}

fn policy(name: &str, selects: &str, ingress: Option<Vec<Rule>>, egress: Option<Vec<Rule>>) -> Policy {
    Policy { id: ObjectRef::new(NS, name), pod_selector: app(selects), ingress, egress, quarantined: None }
}

const TCP: Protocol = Protocol::Tcp;
const UDP: Protocol = Protocol::Udp;

/// db is locked down in both sets: the MustBlock anchor, within and across nodes.
fn db_lockdown() -> Policy {
    policy("db-lockdown", "db", Some(vec![]), Some(vec![]))
}

/// A: web admits api on TCP 80 and UDP 53; api may send only TCP 80 to web and UDP 53 anywhere.
fn policies_a() -> Vec<Policy> {
    vec![
        policy(
            "web-allow",
            "web",
            Some(vec![Rule { peers: from_app("api"), ports: ports(&[(TCP, 80), (UDP, 53)]) }]),
            None,
        ),
        db_lockdown(),
        policy(
            "api-egress",
            "api",
            None,
            Some(vec![
                Rule { peers: from_app("web"), ports: ports(&[(TCP, 80)]) },
                Rule { peers: None, ports: ports(&[(UDP, 53)]) },
            ]),
        ),
    ]
}

/// B: web also admits api on TCP 8080 and UDP 81, and web on everything; api's egress is
/// free, but its ingress admits only web on TCP 80 and UDP 53. Changes chains, sets and
/// dispatch maps.
fn policies_b() -> Vec<Policy> {
    vec![
        policy(
            "web-allow",
            "web",
            Some(vec![
                Rule { peers: from_app("api"), ports: ports(&[(TCP, 80), (TCP, 8080), (UDP, 53), (UDP, 81)]) },
                Rule { peers: from_app("web"), ports: None },
            ]),
            None,
        ),
        db_lockdown(),
        policy(
            "api-ingress",
            "api",
            Some(vec![Rule { peers: from_app("web"), ports: ports(&[(TCP, 80), (UDP, 53)]) }]),
            None,
        ),
    ]
}

// ---------------------------------------------------------------------------------------
// Classes of connections, from the reference evaluator.

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    MustPass,
    MustBlock,
    OnlyA,
    OnlyB,
    /// Allowed by some mix of A's and B's sides only: nothing to assert while swapping.
    Mixed,
}

#[derive(Clone, Copy, Debug)]
struct Conn {
    src: usize,
    dst: usize,
    port: u16,
    proto: Protocol,
    cross_node: bool,
}

fn classify(a: &Cluster, b: &Cluster, c: &Conn) -> Class {
    let conn = Connection {
        src: Endpoint::Pod(c.src),
        dst: Endpoint::Pod(c.dst),
        protocol: c.proto,
        port: c.port,
        ipv6: false,
    };
    let (va, vb) = (evaluate(a, &conn), evaluate(b, &conn));
    assert!(va.shortcut.is_none() && vb.shortcut.is_none(), "{c:?} is not policed");
    let sides = [(&va.egress, &va.ingress), (&vb.egress, &vb.ingress)];
    // Within a node one ruleset decides both sides; across nodes any mix may be loaded.
    let mut combos = vec![(0, 0), (1, 1)];
    if c.cross_node {
        combos.extend([(0, 1), (1, 0)]);
    }
    let allowed: Vec<bool> = combos.iter().map(|&(e, i)| sides[e].0.allows() && sides[i].1.allows()).collect();
    match (va.allowed, vb.allowed) {
        (true, true) => Class::MustPass,
        _ if allowed.iter().all(|x| !x) => Class::MustBlock,
        (true, false) => Class::OnlyA,
        (false, true) => Class::OnlyB,
        (false, false) => Class::Mixed,
    }
}

// ---------------------------------------------------------------------------------------
// Probing.

struct Probing<'a> {
    lab: &'a Lab,
    cluster: &'a Cluster,
    /// Next fresh source port, per source pod.
    next_port: Vec<AtomicU16>,
    token: AtomicU64,
    started: Instant,
    /// Attempts per (class, TCP?, cross-node?).
    attempts: Mutex<BTreeMap<(Class, bool, bool), u64>>,
    violations: Mutex<Vec<String>>,
    /// What the main thread is doing, for messages: "full sync 17 -> B".
    phase: Mutex<String>,
    /// Probe threads that have gone once through their connections.
    warmed_up: AtomicUsize,
}

impl Probing<'_> {
    fn ip(&self, pod: usize) -> IpAddr {
        self.cluster.pods[pod].ips[0]
    }

    fn describe(&self, c: &Conn) -> String {
        let p = &self.cluster.pods;
        let span = if c.cross_node { "across nodes" } else { "within a node" };
        format!("{} -> {} {}/{} ({span})", p[c.src].id.name, p[c.dst].id.name, c.proto, c.port)
    }

    /// One attempt, on a thread that is inside `c.src`'s namespace.
    fn attempt(&self, c: &Conn, timeout: Duration) -> Outcome {
        let port = self.next_port[c.src].fetch_add(1, Ordering::Relaxed);
        assert!(port < LAST_SOURCE_PORT, "source ports of {} used up: lower the probe rate", self.describe(c));
        let from = SocketAddr::new(self.ip(c.src), port);
        let to = SocketAddr::new(self.ip(c.dst), c.port);
        let result = match c.proto {
            Protocol::Tcp => traffic::tcp_connect(from, to, timeout),
            _ => traffic::udp_exchange(from, to, self.token.fetch_add(1, Ordering::Relaxed), timeout),
        };
        result.unwrap_or_else(|e| panic!("{}: local failure: {e}", self.describe(c)))
    }

    /// Record an attempt of a class that must always (or never) reach.
    fn record(&self, class: Class, c: &Conn, outcome: &Outcome) {
        *self.attempts.lock().unwrap().entry((class, c.proto == Protocol::Tcp, c.cross_node)).or_default() += 1;
        let wrong = match class {
            Class::MustPass => !outcome.reached(),
            Class::MustBlock => outcome.reached(),
            _ => false,
        };
        if wrong {
            let phase = self.phase.lock().unwrap().clone();
            self.violations.lock().unwrap().push(format!(
                "{:?} {}: {outcome} at {:.3?}, during {phase}",
                class,
                self.describe(c),
                self.started.elapsed()
            ));
        }
    }

    /// Probe `conns` (all from one source pod) round and round until `stop`.
    fn keep_probing(&self, class: Class, conns: &[Conn], timeout: Duration, pacing: Duration, stop: &AtomicBool) {
        let src = conns[0].src;
        self.lab
            .in_pod(src, || {
                let mut first_round = true;
                while !stop.load(Ordering::Relaxed) {
                    for c in conns {
                        let outcome = self.attempt(c, timeout);
                        self.record(class, c, &outcome);
                        std::thread::sleep(pacing);
                    }
                    if std::mem::take(&mut first_round) {
                        self.warmed_up.fetch_add(1, Ordering::SeqCst);
                    }
                }
                Ok(())
            })
            .unwrap();
    }

    /// After a swap to `loaded` ("A" or "B") settled on both nodes: the connections only it
    /// allows reach, those only the other allows do not. Returns what was wrong.
    fn sample(&self, loaded: Class, only_a: &[Conn], only_b: &[Conn]) -> Vec<String> {
        let (reach, block) = if loaded == Class::OnlyA { (only_a, only_b) } else { (only_b, only_a) };
        let jobs: Vec<(bool, &Conn)> =
            reach.iter().map(|c| (true, c)).chain(block.iter().map(|c| (false, c))).collect();
        std::thread::scope(|s| {
            let handles: Vec<_> = jobs
                .iter()
                .map(|&(must_reach, c)| {
                    s.spawn(move || {
                        let timeout = if must_reach { PASS_TIMEOUT } else { SAMPLE_BLOCK_TIMEOUT };
                        let outcome = self.lab.in_pod(c.src, || Ok(self.attempt(c, timeout))).unwrap();
                        (outcome.reached() != must_reach).then(|| {
                            let want = if must_reach { "reach" } else { "be blocked" };
                            format!("with {loaded:?} loaded, {} should {want}: {outcome}", self.describe(c))
                        })
                    })
                })
                .collect();
            handles.into_iter().filter_map(|h| h.join().unwrap()).collect()
        })
    }
}

// ---------------------------------------------------------------------------------------

fn node_rulesets(cluster: &Cluster, nodes: &[&str]) -> Vec<Ruleset> {
    nodes.iter().map(|n| compile(cluster, &NodeConfig::new(*n))).collect()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

#[test]
fn swapping_rulesets_under_traffic_never_leaks_or_refuses_a_connection_both_agree_on() {
    if !common::kernel_or_skip() {
        return;
    }
    let a = Cluster::new(vec![], pods(), policies_a());
    let b = Cluster::new(vec![], pods(), policies_b());
    assert_eq!(a.pods, b.pods, "both policy sets apply to the same pods");
    let node_names = ["n0", "n1"];
    let rulesets = [node_rulesets(&a, &node_names), node_rulesets(&b, &node_names)];

    // Every ordered pair of pods, every served port.
    let n = a.pods.len();
    let mut by_class: BTreeMap<Class, Vec<Conn>> = BTreeMap::new();
    for src in 0..n {
        for dst in (0..n).filter(|&d| d != src) {
            for &(port, proto) in &SERVED {
                let cross_node = a.pods[src].node != a.pods[dst].node;
                let c = Conn { src, dst, port, proto, cross_node };
                by_class.entry(classify(&a, &b, &c)).or_default().push(c);
            }
        }
    }
    // The policy sets must give every class something to show, within and across nodes,
    // over TCP and UDP, or the test would prove less than it claims.
    for class in [Class::MustPass, Class::MustBlock, Class::OnlyA, Class::OnlyB] {
        let conns = by_class.get(&class).map(Vec::as_slice).unwrap_or_default();
        for (tcp, cross) in [(true, true), (true, false), (false, true), (false, false)] {
            let has = conns.iter().any(|c| (c.proto == Protocol::Tcp) == tcp && c.cross_node == cross);
            let (what, span) = (if tcp { "TCP" } else { "UDP" }, if cross { "across nodes" } else { "within a node" });
            assert!(has, "{class:?} has no {what} connection {span}");
        }
    }

    let lab_nodes: Vec<LabNode> = node_names
        .iter()
        .zip(&rulesets[0])
        .map(|(name, rs)| LabNode { name: (*name).into(), ruleset: render::ruleset(rs) })
        .collect();
    let lab_pods: Vec<LabPod> = a
        .pods
        .iter()
        .map(|p| LabPod {
            name: p.id.to_string(),
            node: p.node.to_string(),
            ips: p.ips.to_vec(),
            serve: SERVED.iter().map(|&(port, proto)| (port, proto)).collect(),
            host_network: false,
        })
        .collect();
    let lab = Lab::build(&lab_nodes, &lab_pods).unwrap();
    let mut nft: Vec<NetlinkNftables> = node_names
        .iter()
        .map(|name| NetlinkNftables::open(RealNftables::in_netns(lab.node_netns(name).unwrap())).unwrap())
        .collect();

    let probing = Probing {
        lab: &lab,
        cluster: &a,
        next_port: (0..n).map(|_| AtomicU16::new(FIRST_SOURCE_PORT)).collect(),
        token: AtomicU64::new(1),
        started: Instant::now(),
        attempts: Mutex::default(),
        violations: Mutex::default(),
        phase: Mutex::new("start (A loaded)".into()),
        warmed_up: AtomicUsize::new(0),
    };
    let only_a = by_class.get(&Class::OnlyA).cloned().unwrap_or_default();
    let only_b = by_class.get(&Class::OnlyB).cloned().unwrap_or_default();
    let stop = AtomicBool::new(false);
    let mut sample_failures = Vec::new();
    let mut apply_times = Vec::new();
    let mut incremental_ops = 0;

    let swap_time = std::thread::scope(|s| {
        // The probe threads stop also when this closure panics; else the scope would wait
        // for them forever and a failing test would hang instead of failing.
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = StopOnDrop(&stop);
        let mut spawned = 0;
        // Probe threads: per source pod, one for MustPass connections and two for MustBlock
        // ones (each blocked attempt waits out its time-out).
        for class in [Class::MustPass, Class::MustBlock] {
            for src in 0..n {
                let conns: Vec<Conn> = by_class[&class].iter().copied().filter(|c| c.src == src).collect();
                let (timeout, pacing, threads) = match class {
                    Class::MustPass => (PASS_TIMEOUT, PASS_PACING, 1),
                    _ => (BLOCK_TIMEOUT, Duration::ZERO, 2),
                };
                for k in 0..threads {
                    let mine: Vec<Conn> = conns.iter().copied().skip(k).step_by(threads).collect();
                    if mine.is_empty() {
                        continue;
                    }
                    let (probing, stop) = (&probing, &stop);
                    s.spawn(move || probing.keep_probing(class, &mine, timeout, pacing, stop));
                    spawned += 1;
                }
            }
        }
        // Traffic under A before the first swap: every probe thread has gone once round.
        let deadline = Instant::now() + Duration::from_secs(10);
        while probing.warmed_up.load(Ordering::SeqCst) < spawned {
            assert!(Instant::now() < deadline, "the probe threads never got going");
            std::thread::sleep(Duration::from_millis(2));
        }
        let swaps_started = Instant::now();

        let mut applied = 0; // index into `rulesets`: 0 = A, 1 = B
        for round in 0..2 * SWAPS {
            let incremental = round >= SWAPS;
            let want = 1 - applied;
            let label = if want == 0 { Class::OnlyA } else { Class::OnlyB };
            // Every other swap through an nft process, the others over the agent's own
            // netlink batches: both are one kernel transaction.
            let via_nft = round % 2 == 0;
            let kind = match (incremental, via_nft) {
                (false, true) => "full sync (nft)",
                (false, false) => "full sync (netlink)",
                (true, true) => "incremental diff (nft)",
                (true, false) => "incremental diff (netlink)",
            };
            *probing.phase.lock().unwrap() = format!("{kind} #{round} to {}", ["A", "B"][want]);
            for (node, nft) in nft.iter_mut().enumerate() {
                let tx = if incremental {
                    let tx = diff(&rulesets[applied][node], &rulesets[want][node]);
                    // The agent's path must really be incremental here, not a full sync in disguise.
                    assert!(
                        !tx.ops.iter().any(|op| matches!(op, Op::DefineTable(_) | Op::DeleteTable)),
                        "A and B share a layout, yet the diff replaces the table"
                    );
                    incremental_ops += tx.ops.len();
                    tx
                } else {
                    full_sync(&rulesets[want][node])
                };
                let t = Instant::now();
                let applied = if via_nft { nft.apply_via_nft(&tx) } else { nft.apply(&tx) };
                applied.unwrap_or_else(|e| panic!("{kind} #{round} on {}: {e}", node_names[node]));
                apply_times.push((via_nft, t.elapsed()));
            }
            applied = want;
            *probing.phase.lock().unwrap() = format!("after {kind} #{round} ({} loaded)", ["A", "B"][want]);
            sample_failures
                .extend(probing.sample(label, &only_a, &only_b).into_iter().map(|f| format!("{kind} #{round}: {f}")));
        }
        stop.store(true, Ordering::Relaxed);
        swaps_started.elapsed()
    });
    let total = probing.started.elapsed();
    let attempts = probing.attempts.into_inner().unwrap();
    let violations = probing.violations.into_inner().unwrap();
    lab.teardown().unwrap();

    let count = |class: Class| attempts.iter().filter(|((c, _, _), _)| *c == class).map(|(_, n)| n).sum::<u64>();
    eprintln!(
        "{} swaps ({SWAPS} full sync, {SWAPS} incremental averaging {} ops per node) in {swap_time:.1?} \
         (median apply: {:.1?} through nft, {:.1?} over netlink), each followed by a sample of {} OnlyA/OnlyB connections; {} MustPass and {} \
         MustBlock attempts in {total:.1?}; by (class, tcp, cross-node): {attempts:?}",
        2 * SWAPS,
        incremental_ops / (SWAPS * node_names.len()),
        median(apply_times.iter().filter(|(nft, _)| *nft).map(|(_, d)| *d).collect()),
        median(apply_times.iter().filter(|(nft, _)| !*nft).map(|(_, d)| *d).collect()),
        only_a.len() + only_b.len(),
        count(Class::MustPass),
        count(Class::MustBlock),
    );
    let first = |v: &[String]| v.iter().take(30).cloned().collect::<Vec<_>>().join("\n");
    assert!(
        violations.is_empty(),
        "{} connections broke the rules, first ones:\n{}",
        violations.len(),
        first(&violations)
    );
    assert!(
        sample_failures.is_empty(),
        "{} samples say swaps did not take effect, first ones:\n{}",
        sample_failures.len(),
        first(&sample_failures)
    );
    // Traffic really flowed through the swaps: thousands of attempts, every kind of each class.
    assert!(count(Class::MustPass) >= 2_000, "too few MustPass attempts: {attempts:?}");
    assert!(count(Class::MustBlock) >= 500, "too few MustBlock attempts: {attempts:?}");
    for class in [Class::MustPass, Class::MustBlock] {
        for key in [(true, true), (true, false), (false, true), (false, false)] {
            assert!(attempts.get(&(class, key.0, key.1)).is_some_and(|&n| n >= 20), "{class:?} {key:?}: {attempts:?}");
        }
    }
}
