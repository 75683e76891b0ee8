//! Command-line and environment configuration of `netpol-agent`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::validate;

/// Default admin port. 9090 is Prometheus' own port and the agent runs on the host
/// network, so a less crowded port is taken.
pub const DEFAULT_ADMIN_PORT: u16 = 9469;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// netpol-agent: enforces Kubernetes NetworkPolicies on this node with nftables.
#[derive(Debug, Clone, Parser)]
#[command(name = "netpol-agent", version, about)]
pub struct AgentConfig {
    /// Name of the node this agent programs (usually from the downward API).
    #[arg(long, env = "NODE_NAME", value_parser = parse_node_name)]
    pub node: String,

    /// nftables table (family inet) owned by the agent.
    #[arg(long, env = "NETPOL_TABLE", default_value = "netpol", value_parser = parse_table)]
    pub table: String,

    /// Kubeconfig file; without it the in-cluster service account is used.
    #[arg(long, env = "KUBECONFIG", value_parser = parse_kubeconfig)]
    pub kubeconfig: Option<PathBuf>,

    /// Full resync at least this often (e.g. 30s, 5m, 1h).
    #[arg(long, env = "NETPOL_RESYNC_PERIOD", default_value = "5m", value_parser = parse_resync)]
    pub resync_period: Duration,

    /// Minimum spacing of sync starts: a change syncs at once, unless the last sync
    /// started less than this ago; then it waits until then, with whatever arrives
    /// meanwhile (e.g. 5ms; 0: syncs back to back). Changes arriving during a sync go into
    /// the next one.
    #[arg(long, env = "NETPOL_DEBOUNCE", default_value = "5ms", value_parser = parse_debounce)]
    pub debounce: Duration,

    /// Address of the /metrics, /healthz and /readyz server (unauthenticated). Default:
    /// port 9469 on --host-ip, else on 127.0.0.1; never all addresses unless asked.
    #[arg(long, env = "NETPOL_ADMIN_ADDR")]
    pub admin_addr: Option<SocketAddr>,

    /// This node's own IP (in the cluster `status.hostIP` from the downward API): where
    /// the admin server listens by default, and where kubelet probes a host-network pod.
    #[arg(long, env = "HOST_IP")]
    pub host_ip: Option<IpAddr>,

    /// A pod CIDR of this node (repeatable; comma-separated in the environment), for
    /// IPAMs that do not use the Node's spec.podCIDRs. The union with the Node's
    /// spec.podCIDRs is guarded: traffic of an address inside it that is no known local
    /// pod is dropped.
    #[arg(long = "pod-cidr", env = "NETPOL_POD_CIDRS", value_delimiter = ',', value_parser = parse_cidr)]
    pub pod_cidrs: Vec<ipnet::IpNet>,

    /// Drop traffic of addresses inside this node's pod CIDRs that are no known local pod
    /// (on by default). `false` reads no Node and ignores --pod-cidr: for networks where
    /// the node itself sends forwarded traffic from an address inside its pod CIDR (a
    /// bridge gateway used as the source of hairpin or masqueraded traffic), which the
    /// guard would take for a stranger.
    #[arg(long, env = "NETPOL_UNKNOWN_POD_GUARD", default_value_t = true, action = clap::ArgAction::Set)]
    pub unknown_pod_guard: bool,

    /// The first sync waits at most this long for the agent's Node (its pod CIDRs);
    /// after that it syncs without them until the Node is read.
    #[arg(long, env = "NETPOL_NODE_WAIT", default_value = "10s", value_parser = parse_duration)]
    pub node_wait: Duration,

    /// An `nft` call, or a wait for the kernel's netlink answer, is given up (and the nft
    /// child killed) after this long; the next sync is then full.
    #[arg(long, env = "NETPOL_NFT_TIMEOUT", default_value = "30s", value_parser = parse_nft_timeout)]
    pub nft_timeout: Duration,

    /// Log format.
    #[arg(long, env = "NETPOL_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Log filter (tracing EnvFilter syntax, e.g. `info` or `netpol=debug,kube=warn`).
    #[arg(long, env = "RUST_LOG", default_value = "info", value_parser = parse_log_level)]
    pub log_level: String,

    /// Program the nftables of this network namespace (a name under /run/netns, as
    /// `ip netns add` makes them) instead of the agent's own. For development and tests;
    /// in the cluster the agent runs on the host network and needs none.
    #[arg(long, env = "NETPOL_NETNS", value_parser = parse_netns)]
    pub netns: Option<String>,

    /// Sets no chain looks up any more (a policy left the node's pods) stay in the kernel,
    /// kept current, while they hold at most this many elements per cluster pod in all,
    /// most recently used first: a policy that comes back finds its peer sets there
    /// instead of sending thousands of addresses again. Each element costs the agent ~6-9
    /// bytes (an IPv4 address; ~26-37 in a set of other keys) and the kernel ~100; 0 keeps
    /// none.
    #[arg(long, env = "NETPOL_IDLE_SET_ELEMENTS_PER_POD", default_value_t = 4, value_parser = clap::value_parser!(u64).range(0..=64))]
    pub idle_set_elements_per_pod: u64,

    /// Objects per page when the watches list (at start and at each relist). Each page is
    /// decoded whole, as API objects, while the objects of the pages before it are already
    /// converted and kept: the smaller the page, the fewer of those long-lived objects end
    /// up scattered between the decoding's freed memory, which the allocator then cannot
    /// give back. At 10 000 pods, 100 instead of kube-runtime's 500 took the agent's RSS
    /// per pod from 2.41 to 1.83 KiB after the first sync and its peak from 2.90 to 2.49,
    /// for 0.2 s more to the first sync (benches/README.md).
    #[arg(long, env = "NETPOL_LIST_PAGE_SIZE", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub list_page_size: u32,

    /// Listen to the kernel's nf_tables announcements and resync fully as soon as another
    /// tool deletes or changes the table (`nft flush ruleset`, a firewall reload) instead
    /// of at the next periodic resync. Costs the kernel a notification per changed object
    /// of every commit while on.
    #[arg(long, env = "NETPOL_WATCH_TABLE", default_value_t = true, action = clap::ArgAction::Set)]
    pub watch_table: bool,

    /// Delete the agent's nftables table on exit (otherwise the rules stay in force while
    /// the agent restarts).
    #[arg(long, env = "NETPOL_CLEANUP_ON_EXIT")]
    pub cleanup_on_exit: bool,

    /// After each sync, end the established connections the new rules no longer admit
    /// (checked only when a change could deny something), and those of pods that are gone,
    /// so that a reused IP inherits no flow: their conntrack entries are deleted. `false`
    /// leaves conntrack alone (established connections then outlive a tightening).
    #[arg(long, env = "NETPOL_CONNTRACK_CLEANUP", default_value_t = true, action = clap::ArgAction::Set)]
    pub conntrack_cleanup: bool,

    #[command(flatten)]
    pub observe: crate::cli::observe::ObserveArgs,
}

// Names, table names, durations and CIDRs follow `crate::validate`, the rules and messages
// netpol-check uses too; only the ranges below are the agent's own.

fn parse_duration(s: &str) -> Result<Duration, String> {
    validate::duration(s)
}

fn parse_resync(s: &str) -> Result<Duration, String> {
    validate::duration_in(s, Duration::from_secs(1), None)
}

fn parse_nft_timeout(s: &str) -> Result<Duration, String> {
    validate::duration_in(s, Duration::from_millis(100), Some(Duration::from_secs(600)))
}

/// At most 10s: it delays every change.
fn parse_debounce(s: &str) -> Result<Duration, String> {
    validate::duration_in(s, Duration::ZERO, Some(Duration::from_secs(10)))
}

fn parse_cidr(s: &str) -> Result<ipnet::IpNet, String> {
    validate::cidr_arg(s)
}

/// A node name is a DNS subdomain, as the API server requires of a Node's name.
fn parse_node_name(s: &str) -> Result<String, String> {
    validate::dns_subdomain(s).map(|()| s.to_string())
}

fn parse_table(s: &str) -> Result<String, String> {
    validate::table_name(s).map(|()| s.to_string())
}

fn parse_kubeconfig(s: &str) -> Result<PathBuf, String> {
    // KUBECONFIG may list several files separated by ':'; we take one file.
    if s.contains(':') {
        return Err(format!("`{s}`: pass a single kubeconfig file (lists of files are not supported)"));
    }
    let p = PathBuf::from(s);
    if !p.is_file() {
        return Err(format!("`{s}` is not a readable file"));
    }
    Ok(p)
}

fn parse_netns(s: &str) -> Result<String, String> {
    let valid = !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if !valid || s.starts_with('.') {
        return Err(format!("`{s}` is not a network namespace name (letters, digits, `_`, `-`, `.`)"));
    }
    if !std::path::Path::new("/run/netns").join(s).exists() {
        return Err(format!("no network namespace `{s}` (/run/netns/{s} does not exist)"));
    }
    Ok(s.to_string())
}

fn parse_log_level(s: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::try_new(s)
        .map(|_| s.to_string())
        .map_err(|e| format!("`{s}` is not a valid log filter: {e}"))
}

impl AgentConfig {
    /// Where the admin server listens: --admin-addr, else port 9469 on --host-ip, else on
    /// 127.0.0.1 (never every address of a host-network pod by default).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr.unwrap_or_else(|| {
            SocketAddr::new(self.host_ip.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)), DEFAULT_ADMIN_PORT)
        })
    }

    /// Installs the global tracing subscriber per `--log-format` and `--log-level`.
    /// Fails if one is already installed.
    pub fn init_logging(&self) -> Result<(), String> {
        let filter = tracing_subscriber::EnvFilter::try_new(&self.log_level).map_err(|e| format!("log filter: {e}"))?;
        let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
        match self.log_format {
            LogFormat::Text => builder.try_init(),
            LogFormat::Json => builder.json().try_init(),
        }
        .map_err(|e| format!("logging: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<AgentConfig, clap::Error> {
        AgentConfig::try_parse_from(std::iter::once("netpol-agent").chain(args.iter().copied()))
    }

    #[test]
    fn lists_are_paged_by_100_unless_told_otherwise_and_a_page_holds_at_least_one_object() {
        assert_eq!(parse(&["--node", "a"]).unwrap().list_page_size, 100);
        assert_eq!(parse(&["--node", "a", "--list-page-size", "500"]).unwrap().list_page_size, 500);
        assert!(parse(&["--node", "a", "--list-page-size", "0"]).is_err());
    }

    #[test]
    fn durations_take_a_unit_and_a_bare_number_says_what_to_write() {
        let c = parse(&["--node", "a", "--node-wait", "500ms", "--resync-period", "1.5m", "--debounce", "0"]).unwrap();
        assert_eq!(c.node_wait, Duration::from_millis(500));
        assert_eq!(c.resync_period, Duration::from_secs(90));
        assert_eq!(c.debounce, Duration::ZERO);
        // The same message netpol-check gives for --probe-timeout 300 (tests/it/cli.rs).
        let e = parse(&["--node", "a", "--node-wait", "300"]).unwrap_err().to_string();
        assert!(
            e.contains("invalid value '300' for '--node-wait <NODE_WAIT>': \"300\" has no unit (write 300ms or 300s)"),
            "{e}"
        );
        let e = parse(&["--node", "a", "--nft-timeout", "soon"]).unwrap_err().to_string();
        assert!(e.contains("\"soon\" is not a duration (a number and a unit: 500ms, 1.5s, 5m, 1h)"), "{e}");
        let e = parse(&["--node", "a", "--debounce", "11s"]).unwrap_err().to_string();
        assert!(e.contains("\"11s\" is out of range (0ms to 10s)"), "{e}");
    }

    #[test]
    fn names_and_tables_follow_the_rules_netpol_check_uses_with_the_same_messages() {
        // `a..b` has an empty label: no DNS subdomain, no node name.
        let e = parse(&["--node", "a..b"]).unwrap_err().to_string();
        assert!(e.contains(&format!("\"a..b\" is not a valid name: must be {}", validate::DNS_SUBDOMAIN_RULE)), "{e}");
        // The kernel's limit, not a shorter one of our own (netpol-check prints such tables).
        let long = format!("t{}", "_".repeat(254));
        assert_eq!(parse(&["--node", "a", "--table", &long]).unwrap().table, long);
        let e = parse(&["--node", "a", "--table", "x;y"]).unwrap_err().to_string();
        assert!(
            e.contains("\"x;y\" is not an nftables table name (a letter, then letters, digits or '_'; at most 255)"),
            "{e}"
        );
    }

    #[test]
    fn defaults_apply_when_only_the_node_is_given() {
        let c = parse(&["--node", "node-a"]).unwrap();
        assert_eq!(c.node, "node-a");
        assert_eq!(c.table, "netpol");
        assert_eq!(c.resync_period, Duration::from_secs(300));
        assert_eq!(c.debounce, Duration::from_millis(5));
        assert_eq!(c.admin_addr(), "127.0.0.1:9469".parse().unwrap());
        assert!(c.pod_cidrs.is_empty());
        assert_eq!(c.nft_timeout, Duration::from_secs(30));
        assert_eq!(c.log_format, LogFormat::Text);
        assert!(!c.cleanup_on_exit);
        assert_eq!(c.idle_set_elements_per_pod, 4);
        assert!(c.watch_table);
        assert!(c.unknown_pod_guard);
        assert!(!parse(&["--node", "node-a", "--unknown-pod-guard=false"]).unwrap().unknown_pod_guard);
        assert!(!parse(&["--node", "node-a", "--watch-table=false"]).unwrap().watch_table);
        assert_eq!(c.observe.observe(), crate::compile::Observe::default());
    }

    #[test]
    fn the_drop_log_group_is_a_16_bit_number() {
        let c = parse(&["--node", "a", "--drop-log-group", "7"]).unwrap();
        assert_eq!(c.observe.observe().drop_log.map(|l| l.group), Some(7));
        let e = parse(&["--node", "a", "--drop-log-group", "65536"]).unwrap_err().to_string();
        assert!(e.contains("65536") && e.contains("--drop-log-group"), "{e}");
    }

    #[test]
    fn the_admin_server_listens_on_the_host_ip_when_known_and_an_explicit_address_wins() {
        let c = parse(&["--node", "a", "--host-ip", "192.0.2.10"]).unwrap();
        assert_eq!(c.admin_addr(), "192.0.2.10:9469".parse().unwrap());
        let c = parse(&["--node", "a", "--host-ip", "2001:db8::10"]).unwrap();
        assert_eq!(c.admin_addr(), "[2001:db8::10]:9469".parse().unwrap());
        let c = parse(&["--node", "a", "--host-ip", "192.0.2.10", "--admin-addr", "127.0.0.1:1234"]).unwrap();
        assert_eq!(c.admin_addr(), "127.0.0.1:1234".parse().unwrap());
    }

    #[test]
    fn pod_cidrs_repeat_and_split_on_commas_and_bad_ones_are_named() {
        let c =
            parse(&["--node", "a", "--pod-cidr", "10.244.1.0/24", "--pod-cidr", "fd00:1::/64,10.9.0.7/16"]).unwrap();
        let want: Vec<ipnet::IpNet> =
            ["10.244.1.0/24", "fd00:1::/64", "10.9.0.0/16"].iter().map(|c| c.parse().unwrap()).collect();
        assert_eq!(c.pod_cidrs, want);
        let e = parse(&["--node", "a", "--pod-cidr", "10.0.0.0/33"]).unwrap_err().to_string();
        assert!(e.contains("\"10.0.0.0/33\" is not a valid CIDR (expected e.g. 10.0.0.0/16 or fd00::/64)"), "{e}");
    }

    #[test]
    fn bad_values_are_rejected_with_the_reason() {
        let e = parse(&["--node", "Node_A"]).unwrap_err().to_string();
        assert!(e.contains("\"Node_A\" is not a valid name"), "{e}");
        let e = parse(&["--node", "a", "--table", "1bad"]).unwrap_err().to_string();
        assert!(e.contains("\"1bad\" is not an nftables table name"), "{e}");
        let e = parse(&["--node", "a", "--resync-period", "10ms"]).unwrap_err().to_string();
        assert!(e.contains("at least 1s"), "{e}");
        let e = parse(&["--node", "a", "--kubeconfig", "/nonexistent/kc"]).unwrap_err().to_string();
        assert!(e.contains("not a readable file"), "{e}");
        let e = parse(&["--node", "a", "--log-format", "xml"]).unwrap_err().to_string();
        assert!(e.contains("xml"), "{e}");
        let e = parse(&["--node", "a", "--netns", "../etc"]).unwrap_err().to_string();
        assert!(e.contains("not a network namespace name"), "{e}");
        let e = parse(&["--node", "a", "--netns", "npl-surely-absent-4242"]).unwrap_err().to_string();
        assert!(e.contains("/run/netns/npl-surely-absent-4242 does not exist"), "{e}");
        let e = parse(&["--node", "a", "--idle-set-elements-per-pod", "65"]).unwrap_err().to_string();
        assert!(e.contains("65") && e.contains("0..=64"), "{e}");
    }
}
