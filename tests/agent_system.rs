//! System tests of the real `netpol-agent` binary.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use netpol::testkit::agent_process::{AgentLaunch, NftRoute};
use netpol::testkit::apiserver::{FakeApiServer, Kind};
use netpol::testkit::objects::{namespace, pod};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn launch(dir: &std::path::Path, server: &FakeApiServer, node: &str, table: &str, nft: NftRoute) -> AgentLaunch {
    let kubeconfig = dir.join("kubeconfig");
    if !kubeconfig.exists() {
        std::fs::write(&kubeconfig, server.kubeconfig_yaml()).unwrap();
    }
    AgentLaunch {
        binary: PathBuf::from(env!("CARGO_BIN_EXE_netpol-agent")),
        node: node.into(),
        table: table.into(),
        kubeconfig,
        nft,
        workdir: dir.to_path_buf(),
        extra_args: Vec::new(),
    }
}

// ---------------------------------------------------------------- shutdown

/// The sync loop polls its shutdown future only after its first sync attempt, which waits
/// out the debounce (here 2 s, bounded by the 500 ms max delay). A SIGTERM in that window
/// must still be a clean shutdown, so the handlers must exist from the start. Needs no
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
