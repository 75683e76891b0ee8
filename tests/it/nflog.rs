//! The drop log's reader against the kernel: nftables rules in a lab node log what they
//! drop to an nfnetlink_log group, and our reader, bound in that node's namespace, must
//! yield each packet with its prefix, addresses, protocol and ports; a rule's rate limit
//! bounds what arrives; a full receive buffer is survived and its losses counted.
//!
//! ```text
//!  pod a (10.79.0.1, fd79::1) ──veth──► node n1: forward hook, table inet nflogtest
//!                                         match ── [limit] ── log prefix P group 7 ── drop
//!                                            │ NFULNL_MSG_PACKET
//!                                            ▼
//!                        NflogSocket (bound in n1) ──► NflogReader ──► channel ──► asserts
//!  pod b (10.79.0.2, fd79::2): never reached
//! ```
//!
//! Root, `ip` and `nft` needed; without them the tests skip (and fail under `CI=true`).
//! Everything lives in the lab's namespaces, which the lab removes also on failure.

use crate::common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use netpol::lab::{Lab, LabNode, LabPod};
use netpol::nflog::wire::{Family, Hook};
use netpol::nflog::{DEFAULT_RECEIVE_BUFFER, Headers, LogConfig, NflogReader, NflogSocket, ReceivedPacket, Transport};
use netpol::testkit::agent_process::{AgentLaunch, NftRoute};
use netpol::testkit::apiserver::FakeApiServer;
use netpol::testkit::objects::{namespace, pod};
use socket2::{Domain, Protocol, Socket, Type};

const NODE: &str = "n1";
const GROUP: u16 = 7;
const A: &str = "10.79.0.1";
const B: &str = "10.79.0.2";
const A6: &str = "fd79::1";
const B6: &str = "fd79::2";
const POD_A: usize = 0;

/// The node's rules: each logs what it drops with its own prefix.
fn ruleset() -> String {
    format!(
        "table inet nflogtest {{
  chain forward {{
    type filter hook forward priority 0; policy accept;
    ip saddr {A} ip daddr {B} tcp dport 8080 log prefix \"deny-tcp\" group {GROUP} drop
    ip6 saddr {A6} ip6 daddr {B6} udp dport 5353 log prefix \"deny-udp6\" group {GROUP} drop
    icmp type echo-request log prefix \"deny-icmp\" group {GROUP} drop
    icmpv6 type echo-request log prefix \"deny-icmp6\" group {GROUP} drop
    udp dport 9100 limit rate 1/minute burst 3 packets log prefix \"limited\" group {GROUP}
    udp dport 9100 drop
    udp dport 9200 log prefix \"flood\" group {GROUP} drop
  }}
}}
"
    )
}

fn lab() -> Lab {
    let pod = |name: &str, v4: &str, v6: &str| LabPod {
        name: format!("t/{name}"),
        node: NODE.into(),
        ips: vec![v4.parse().unwrap(), v6.parse().unwrap()],
        serve: vec![],
        host_network: false,
    };
    Lab::build(&[LabNode { name: NODE.into(), ruleset: ruleset() }], &[pod("a", A, A6), pod("b", B, B6)])
        .expect("the lab")
}

/// A reader of the group in the lab's node, handing packets to a channel.
fn reader(lab: &Lab, receive_buffer: usize) -> (NflogReader, mpsc::Receiver<ReceivedPacket>) {
    let ns = lab.node_netns(NODE).unwrap();
    let socket = NflogSocket::open(Some(&ns), &LogConfig::new(GROUP), receive_buffer).expect("binding the group");
    let (tx, rx) = mpsc::channel();
    let reader = NflogReader::start(socket, move |p| {
        let _ = tx.send(p);
    })
    .unwrap();
    (reader, rx)
}

/// `count` UDP datagrams from pod a (`from`) to `to`.
fn send_udp(lab: &Lab, from: SocketAddr, to: SocketAddr, count: usize) {
    lab.in_pod(POD_A, || {
        let s = UdpSocket::bind(from)?;
        for _ in 0..count {
            s.send_to(b"drop me", to)?;
        }
        Ok(())
    })
    .unwrap();
}

/// What arrives within `wait` (less once `enough` packets are in).
fn collect(rx: &mpsc::Receiver<ReceivedPacket>, enough: usize, wait: Duration) -> Vec<ReceivedPacket> {
    let deadline = Instant::now() + wait;
    let mut got = Vec::new();
    while got.len() < enough {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(p) => got.push(p),
            Err(_) => break,
        }
    }
    got
}

fn headers(p: &ReceivedPacket) -> Headers {
    p.packet.headers.unwrap_or_else(|e| panic!("{:?}: unreadable payload: {e}", p.packet.prefix))
}

#[test]
fn the_reader_yields_tcp_udp_and_icmp_drops_with_their_prefix_addresses_and_ports() {
    if !common::kernel_or_skip() {
        return;
    }
    let lab = lab();
    let (reader, rx) = reader(&lab, DEFAULT_RECEIVE_BUFFER);
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    lab.in_pod(POD_A, || {
        // A TCP SYN (dropped: the connect times out; its retransmission comes after 1 s).
        let tcp = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        tcp.bind(&SocketAddr::new(ip(A), 40001).into())?;
        let _ = tcp.connect_timeout(&SocketAddr::new(ip(B), 8080).into(), Duration::from_millis(200));
        // UDP over IPv6.
        UdpSocket::bind(SocketAddr::new(ip(A6), 40002))?.send_to(b"x", SocketAddr::new(ip(B6), 5353))?;
        // Echo requests, v4 and v6 (type 8 / 128, code 0; the v6 checksum is the kernel's).
        let icmp = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?;
        icmp.send_to(&[8, 0, 0xf7, 0xfe, 0, 1, 0, 0], &SocketAddr::new(ip(B), 0).into())?;
        let icmp6 = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?;
        icmp6.send_to(&[128, 0, 0, 0, 0, 1, 0, 0], &SocketAddr::new(ip(B6), 0).into())?;
        Ok(())
    })
    .unwrap();
    let got = collect(&rx, 4, Duration::from_secs(5));
    let by_prefix = |prefix: &str| {
        got.iter()
            .find(|p| p.packet.prefix == prefix)
            .unwrap_or_else(|| panic!("no packet logged with prefix {prefix:?}; got {got:#?}"))
    };

    let tcp = by_prefix("deny-tcp");
    assert_eq!((tcp.packet.hook, tcp.packet.family), (Ok(Hook::Forward), Family::Ipv4));
    assert!(tcp.packet.indev.is_some() && tcp.packet.outdev.is_some() && tcp.packet.indev != tcp.packet.outdev);
    assert_eq!(
        headers(tcp),
        Headers { src: ip(A), dst: ip(B), protocol: 6, transport: Transport::Ports { src: 40001, dst: 8080 } }
    );
    let udp6 = by_prefix("deny-udp6");
    assert_eq!(udp6.packet.family, Family::Ipv6);
    assert_eq!(
        headers(udp6),
        Headers { src: ip(A6), dst: ip(B6), protocol: 17, transport: Transport::Ports { src: 40002, dst: 5353 } }
    );
    let icmp = headers(by_prefix("deny-icmp"));
    assert_eq!((icmp.src, icmp.dst, icmp.protocol), (ip(A), ip(B), 1));
    assert_eq!(icmp.transport, Transport::Icmp { kind: 8, code: 0 });
    let icmp6 = headers(by_prefix("deny-icmp6"));
    assert_eq!((icmp6.src, icmp6.dst, icmp6.protocol), (ip(A6), ip(B6), 58));
    assert_eq!(icmp6.transport, Transport::Icmp { kind: 128, code: 0 });
    let seqs: Vec<u32> = got.iter().filter_map(|p| p.packet.seq).collect();
    assert_eq!(seqs.len(), got.len(), "every packet numbered");
    assert_eq!(reader.counts().lost, 0);

    // The group is this reader's: a second socket is refused, until the reader is gone.
    let ns = lab.node_netns(NODE).unwrap();
    let second = NflogSocket::open(Some(&ns), &LogConfig::new(GROUP), DEFAULT_RECEIVE_BUFFER);
    let refused = second.unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::AddrInUse, "{refused}");
    assert!(refused.to_string().contains("group 7"), "{refused}");
    drop(reader);
    NflogSocket::open(Some(&ns), &LogConfig::new(GROUP), DEFAULT_RECEIVE_BUFFER)
        .expect("the kernel released the group with the closed socket");
    lab.teardown().unwrap();
}

#[test]
fn a_rate_limited_log_rule_sends_no_more_than_its_burst() {
    if !common::kernel_or_skip() {
        return;
    }
    let lab = lab();
    let (reader, rx) = reader(&lab, DEFAULT_RECEIVE_BUFFER);
    let sent = 40;
    send_udp(&lab, SocketAddr::new(A.parse().unwrap(), 40010), SocketAddr::new(B.parse().unwrap(), 9100), sent);
    // Everything the kernel sends arrives well within a second (queue threshold 1).
    let got = collect(&rx, sent, Duration::from_secs(1));
    let counts = reader.counts();
    eprintln!("rate limit: {sent} sent, {} logged, {counts:?}", got.len());
    assert!(got.iter().all(|p| p.packet.prefix == "limited"));
    // burst 3 packets, 1/minute: the bucket starts full, and refills by one per minute.
    assert!((3..=4).contains(&got.len()), "{} logged of {sent}", got.len());
    assert_eq!((counts.overruns, counts.lost), (0, 0), "the limit, not a loss, bounded them");
    lab.teardown().unwrap();
}

#[test]
fn a_full_receive_buffer_is_survived_and_the_lost_packets_counted() {
    if !common::kernel_or_skip() {
        return;
    }
    let lab = lab();
    let ns = lab.node_netns(NODE).unwrap();
    // The smallest buffer the kernel allows: two or three messages.
    let socket = NflogSocket::open(Some(&ns), &LogConfig::new(GROUP), 1024).unwrap();
    let (tx, rx) = mpsc::channel();
    let (release, gate) = mpsc::channel::<()>();
    let mut first = true;
    // The sink holds the reader on the first packet until the flood is over.
    let reader = NflogReader::start(socket, move |p| {
        if std::mem::take(&mut first) {
            let _ = gate.recv_timeout(Duration::from_secs(10));
        }
        let _ = tx.send(p);
    })
    .unwrap();
    let (a, b): (IpAddr, IpAddr) = (A.parse().unwrap(), B.parse().unwrap());
    let flood = 300;
    send_udp(&lab, SocketAddr::new(a, 40020), SocketAddr::new(b, 9200), flood);
    std::thread::sleep(Duration::from_millis(200));
    release.send(()).unwrap();
    // One more, after: the reader still reads, and its number closes the count.
    std::thread::sleep(Duration::from_millis(300));
    send_udp(&lab, SocketAddr::new(a, 40021), SocketAddr::new(b, 9200), 1);
    let got = collect(&rx, flood + 1, Duration::from_secs(2));
    let counts = reader.counts();
    eprintln!("overrun: {} sent, {} received, {counts:?}", flood + 1, got.len());
    let last = got.last().expect("packets after the overrun");
    assert_eq!(headers(last).transport, Transport::Ports { src: 40021, dst: 9200 }, "the packet sent after it");
    assert!(counts.overruns >= 1, "{counts:?}");
    assert!(counts.lost >= 1, "{counts:?}");
    assert_eq!(counts.packets, got.len() as u64);
    assert_eq!(counts.packets + counts.lost, (flood + 1) as u64, "every packet either read or counted lost");
    assert_eq!(counts.errors, 0);
    lab.teardown().unwrap();
}

/// The agent's own drop log, as deployed (on by default): a packet its rules deny is
/// logged by the pod chain's final drop, and the agent writes one `netpol::drop` line for
/// it naming the direction, both pods and the policy that isolates the receiver.
#[test]
fn a_packet_the_agent_denies_is_logged_with_its_pods_and_the_isolating_policy() {
    if !common::kernel_or_skip() {
        return;
    }
    let lab = lab();
    let ns = lab.node_netns(NODE).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let server = rt.block_on(FakeApiServer::start()).unwrap();
    server.apply(&namespace("t", &[])).unwrap();
    server.apply(&pod("t", "a", NODE, A, &[("app", "a")])).unwrap();
    server.apply(&pod("t", "b", NODE, B, &[("app", "b")])).unwrap();
    // b accepts nothing: ingress isolated, no rule.
    server
        .apply_json(serde_json::json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "b-deny-all", "namespace": "t"},
            "spec": {"podSelector": {"matchLabels": {"app": "b"}}, "policyTypes": ["Ingress"]}
        }))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig_yaml()).unwrap();
    let mut launch = AgentLaunch::new(
        env!("CARGO_BIN_EXE_netpol-agent"),
        NODE,
        "netpol",
        &kubeconfig,
        NftRoute::Netns(ns.clone()),
        dir.path(),
    );
    launch.extra_args = vec!["--node-wait".into(), "1s".into()];
    let mut agent = launch.spawn("agent.log").unwrap();
    let wait_for =
        |agent: &mut netpol::testkit::agent_process::AgentProcess, what: &str, found: &dyn Fn(&str) -> bool| {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(line) = agent.log().lines().find(|l| found(l)) {
                    return line.to_string();
                }
                if let Some(status) = agent.exited() {
                    panic!("netpol-agent exited ({status}) before {what}:\n{}", agent.log());
                }
                assert!(Instant::now() < deadline, "no {what} in the agent's log:\n{}", agent.log());
                std::thread::sleep(Duration::from_millis(50));
            }
        };
    wait_for(&mut agent, "drop log start", &|l| l.contains("reading the drop log"));
    agent.wait_applied(None, 1, Duration::from_secs(15)).unwrap();
    // A port no rule of the lab's own table logs: only the agent's rules see it.
    send_udp(&lab, SocketAddr::new(A.parse().unwrap(), 40030), SocketAddr::new(B.parse().unwrap(), 9300), 1);
    let line = wait_for(&mut agent, "drop line", &|l| l.contains("netpol::drop"));
    eprintln!("agent: {line}");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        v["fields"]["message"], "denied ingress to t/b (isolated by t/b-deny-all): t/a -> t/b UDP/9300",
        "{line}"
    );
    assert!(v["fields"]["prefix"].as_str().unwrap().starts_with("pod_in_"), "{line}");
    assert_eq!(v["fields"]["service"], "UDP/9300", "{line}");
    let status = agent.terminate(Duration::from_secs(10)).unwrap().expect("netpol-agent stops on SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", agent.log());
    // The agent's socket is gone with it: the group is free again.
    let group = netpol::compile::DropLog::DEFAULT_GROUP;
    NflogSocket::open(Some(&ns), &LogConfig::new(group), DEFAULT_RECEIVE_BUFFER).expect("the group released");
    drop(server);
    lab.teardown().unwrap();
}
