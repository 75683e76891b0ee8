//! `netpol-check`: the netpol engine as a dry-run CLI over Kubernetes YAML.
//! Thin: argument parsing, wiring, exit codes (0 ok/allowed, 1 denied/disagreement, 2 error).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, anyhow, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

use netpol::cli::explain;
use netpol::cli::picture::{self, Picture};
use netpol::cli::query;
use netpol::cli::report::{self, MatrixReport};
use netpol::cli::services;
use netpol::compile::{self, NodeConfig};
use netpol::engines::Engine;
use netpol::engines::kernel;
use netpol::engines::ruleset;
use netpol::engines::verify;
use netpol::k8s::load::{self, LoadOptions, Loaded};
use netpol::lab;
use netpol::nft::{json, render};
use netpol::policy::bitset::BitMatrix;
use netpol::policy::evaluate::{self, Endpoint};
use netpol::policy::matrix::{self, Family, Probe, ProbePort};
use netpol::policy::model::{Cluster, Protocol};
use netpol::validate;

const ABOUT: &str = "Who can reach whom, and why: Kubernetes NetworkPolicy, checked offline.";

const LONG_ABOUT: &str = "\
Who can reach whom, and why: Kubernetes NetworkPolicy, checked offline.

netpol-check reads Kubernetes YAML or JSON (Namespaces, Pods, NetworkPolicies, and workloads
such as Deployments, whose pods it makes from their templates; Services, resolved to their
endpoints), or with --cluster the objects of a live cluster (list only), and answers with the
same semantics a cluster enforces.

Examples:
  netpol-check matrix -f policy-examples/frontend-backend
  netpol-check matrix -f cluster/ --port 80,http --protocol TCP -o json
  netpol-check query --from tenant-a/nginx --to tenant-a/backend-1 --port 80 -f policy-examples/frontend-backend
  netpol-check query --from tenant-a/nginx --to svc/tenant-a/backend --port http -f cluster/
  netpol-check explain tenant-a/backend-1 -f policy-examples/frontend-backend
  kubectl get ns,pods,networkpolicies -A -o yaml | netpol-check matrix -f -
  netpol-check matrix --cluster --context staging
  netpol-check diff --cluster new-cluster-state/
  sudo netpol-check matrix --engine kernel -f policy-examples/frontend-backend
  sudo netpol-check verify -f policy-examples/frontend-backend
  netpol-check diff old-policies/ new-policies/
  netpol-check lint -f policy-examples/policies-add-up

Exit codes: 0 success (query: allowed; verify: the engines agree; diff: no cell changes; lint:
no finding), 1 query denied, engines disagree, cells change or findings, 2 bad input, usage,
or an engine that cannot run.";

#[derive(Parser)]
#[command(name = "netpol-check", version, about = ABOUT, long_about = LONG_ABOUT)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print reachability matrices: one truth table per port and protocol.
    #[command(long_about = "Print reachability matrices: one truth table per port and protocol.\n\n\
Rows are sources, columns destinations; '.' allowed, 'X' denied. Without --port, every port that\n\
any pod declares or any policy names is probed. A named port (--port http) is resolved on each\n\
destination pod; a destination without that port is denied (nothing can listen there).\n\n\
With --services, a second table has one column per Service port: '.' the row's pod may reach\n\
every endpoint, '~' some, 'X' none, '-' the port has no endpoints.")]
    Matrix(MatrixArgs),
    /// Can A open a connection to B? ALLOWED or DENIED, and the rules that decided it.
    #[command(long_about = "Can A open a connection to B? Prints ALLOWED or DENIED, then why: for each side,\n\
whether it is isolated and by which policies, and which rule (policy, direction, rule index,\n\
peer, port) allowed it, or that no rule matched. Exit code 0 allowed, 1 denied, 2 error.\n\n\
Endpoints are NAMESPACE/POD or an IP address (an IP that belongs to a pod means that pod).\n\
The IP of a hostNetwork pod, or a node's address (a pod's status.hostIP), means that node, in\n\
every engine: it reaches its own pods whatever the policies, and policies see it by ipBlock only.\n\
A node with no hostNetwork pod in the input is answered as node/<node name>.\n\n\
--to svc/NAMESPACE/NAME asks about a Service port (--port: its number or name): each endpoint\n\
(a selected pod with an IP, the targetPort resolved on it) is answered as a pod destination,\n\
then 'N of M endpoints allowed'. Exit 0 when every endpoint is allowed, 1 when any is denied\n\
or there is none, 2 for an unknown Service or port, or one without a selector or of type\n\
ExternalName (its endpoints cannot be computed from pods).")]
    Query(QueryArgs),
    /// Which policies select a pod, and what it may receive and send, in plain language.
    Explain(ExplainArgs),
    /// Print the nftables ruleset a node would get (default: every node that runs pods).
    #[command(long_about = "Print the nftables ruleset a node would get, exactly as netpol-agent would load it\n\
with `nft -f` (or as `nft -j` JSON). Without --node, every node that runs pods, one after another.")]
    Ruleset(RulesetArgs),
    /// Run several engines on the same input and print every cell where they disagree.
    #[command(long_about = "Run several engines on the same input and print every cell where they disagree.\n\n\
Each disagreement is one line: probe, packet family, source -> destination, and each engine's\n\
verdict; then one summary line. Exit code 0 when all agree, 1 on any disagreement, 2 on errors.\n\
The kernel engine needs root, `ip` and `nft` (it builds the cluster from network namespaces).")]
    Verify(VerifyArgs),
    /// Housekeeping of the kernel engine's lab (network namespaces named npl-*).
    #[command(subcommand)]
    Lab(LabCommand),
    /// Write a generated cluster (namespaces, pods, policies) as YAML, for benchmarks.
    Generate(GenerateArgs),
    /// Every cell whose verdict changes between two inputs, grouped by the change causing it.
    #[command(
        long_about = "Every cell whose verdict changes between two inputs, grouped by the change causing it.\n\n\
OLD and NEW are each a file or a folder (or - for stdin, on one side), read with the same loader\n\
options; `diff --cluster NEW` compares the live cluster (OLD) with NEW, which holds the whole\n\
picture (a `kubectl get -o yaml` dump with the policies edited, say). Cells are (from pod, to pod,\n\
probe) over the pods present on both sides (pods on one side only are listed, not compared);\n\
probes are the default ones of both sides, or --port/--protocol.\n\
A cell is grouped under the changed policies its explanations name (isolating or deciding a side,\n\
before or after) when those changes alone give the new verdict; otherwise under the changed\n\
endpoints, their namespaces and the changed nodes. Exit code 0 when no cell changes, 1 otherwise,\n\
2 on bad input: the check a CI job runs on a pull request that edits policies."
    )]
    Diff(DiffArgs),
    /// Policies that cannot mean what they say: selecting nothing, never matching, shadowed.
    #[command(long_about = "Policies that cannot mean what they say, judged against the input.\n\n\
NetworkPolicies: selects-no-pod, named-port-never-matches, namespace-selector-matches-nothing,\n\
rule-shadowed (another rule of a policy selecting at least its pods allows all it allows),\n\
ipblock-covers-pods (the pods' own addresses, or --pod-cidr ranges, lie in the block),\n\
open-despite-default-deny (a rule open to every address in a namespace with a default deny).\n\
Cluster policies: subject-selects-no-pod, cluster-rule-shadowed (an earlier rule of the tier\n\
matches all it matches), ambiguous-priority (equal priorities, overlapping rules, different\n\
actions). Each finding names the object, the field path and why. Exit code 0 when clean,\n\
1 on any finding, 2 on bad input.")]
    Lint(LintArgs),
}

#[derive(Args)]
struct DiffArgs {
    /// OLD then NEW, each a file or folder: the input before and after the change. With
    /// --cluster only NEW: the live cluster is OLD.
    #[arg(value_names = ["OLD", "NEW"], num_args = 1..=2, required = true)]
    inputs: Vec<PathBuf>,
    #[command(flatten)]
    cluster: ClusterArgs,
    #[command(flatten)]
    options: LoaderArgs,
    /// Ports to probe: numbers or container port names, comma separated (default: all known
    /// on either side).
    #[arg(long, value_delimiter = ',', value_name = "PORT")]
    port: Vec<String>,
    /// Protocols to probe, comma separated (default: those the probed ports use).
    #[arg(long, value_delimiter = ',', value_name = "PROTOCOL")]
    protocol: Vec<String>,
    /// Address family of the probes.
    #[arg(long, value_enum, default_value = "primary")]
    family: FamilyArg,
    #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
    output: VerifyFormat,
}

#[derive(Args)]
struct LintArgs {
    #[command(flatten)]
    input: Input,
    /// The pod CIDRs of the cluster (repeatable): an ipBlock overlapping one is reported.
    /// Without it, an ipBlock holding the address of a pod of the input is.
    #[arg(long = "pod-cidr", value_name = "CIDR", value_parser = validate::cidr_arg)]
    pod_cidrs: Vec<ipnet::IpNet>,
    #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
    output: VerifyFormat,
}

#[derive(Subcommand)]
enum LabCommand {
    /// Remove the network namespaces left by lab runs that crashed (killed with SIGKILL, ...).
    #[command(
        long_about = "Remove the network namespaces left by lab runs that crashed (killed with SIGKILL, ...).\n\n\
Only namespaces named npl-<pid>-... whose process <pid> no longer exists are removed; those of\n\
running labs (any process, this one included) are never touched. Prints each name removed."
    )]
    Cleanup(CleanupArgs),
}

#[derive(Args)]
struct CleanupArgs {
    /// Only print what would be removed.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Args)]
struct Input {
    /// A YAML/JSON file, a folder (read recursively: *.yaml, *.yml, *.json) or - for stdin.
    #[arg(
        short = 'f',
        long = "file",
        value_name = "PATH",
        required_unless_present = "cluster",
        conflicts_with = "cluster"
    )]
    files: Vec<PathBuf>,
    #[command(flatten)]
    cluster: ClusterArgs,
    #[command(flatten)]
    options: LoaderArgs,
}

/// `--synthetic-ipv4`'s default: also what a `query` command printed for a page leaves out.
const SYNTHETIC_IPV4_DEFAULT: &str = "10.244.0.0/16";

/// Where `--cluster` reads from: shared by `-f` inputs and `diff`.
#[derive(Args)]
struct ClusterArgs {
    /// Read the live cluster instead of files: Namespaces, Pods, NetworkPolicies, Nodes,
    /// Services and the cluster policy kinds, listed (read-only) through the API server of the current
    /// kubeconfig context (KUBECONFIG, else ~/.kube/config; in a pod, its service account).
    #[arg(long)]
    cluster: bool,
    /// With --cluster: this context of the kubeconfig instead of its current one.
    #[arg(long, value_name = "NAME")]
    context: Option<String>,
    /// With --cluster: this kubeconfig file instead of KUBECONFIG or ~/.kube/config.
    #[arg(long, value_name = "PATH")]
    kubeconfig: Option<PathBuf>,
}

impl ClusterArgs {
    /// Whether to read the cluster. (clap's `requires` counts the flag's default `false` as
    /// given, so the pairing is checked here.)
    fn read(&self) -> Result<bool> {
        if !self.cluster {
            let flag = if self.context.is_some() {
                Some("--context")
            } else {
                self.kubeconfig.as_ref().map(|_| "--kubeconfig")
            };
            if let Some(flag) = flag {
                bail!("{flag}: only with --cluster (it chooses the cluster to read)");
            }
        }
        Ok(self.cluster)
    }
}

/// How files are read: shared by `-f` inputs and `diff`'s two sides.
#[derive(Args)]
struct LoaderArgs {
    /// Range for the IPv4 addresses of pods that have none (workload templates, bare manifests).
    #[arg(long, value_name = "CIDR", default_value = SYNTHETIC_IPV4_DEFAULT, value_parser = validate::cidr_arg)]
    synthetic_ipv4: IpNet,
    /// Also give such pods an IPv6 address from this range (dual stack).
    #[arg(long, value_name = "CIDR", value_parser = validate::cidr_arg)]
    synthetic_ipv6: Option<IpNet>,
    /// Warn instead of failing on unknown fields (ignored) and on pods sharing an IP (the
    /// first in namespace/name order keeps it; the others take no part).
    #[arg(long)]
    lenient: bool,
    /// What a domain name resolves to, for the domainNames peers of cluster policies
    /// (repeatable; IPv4 or IPv6): --resolve example.com=203.0.113.7.
    #[arg(long, value_name = "NAME=IP", value_parser = validate::resolve_arg)]
    resolve: Vec<(String, std::net::IpAddr)>,
}

/// How long a kernel probe waits for an answer: `300ms`, `1s`, `1.5s`.
#[derive(Clone, Copy)]
struct ProbeTimeout(std::time::Duration);

/// The duration grammar and messages are `validate::duration`'s, the agent's too; the
/// range is this flag's own. The lab waits whole milliseconds.
fn parse_probe_timeout(text: &str) -> Result<ProbeTimeout, String> {
    let range = (std::time::Duration::from_millis(10), std::time::Duration::from_secs(60));
    let d = validate::duration_in(text, range.0, Some(range.1))?;
    Ok(ProbeTimeout(std::time::Duration::from_millis((d.as_secs_f64() * 1000.0).round() as u64)))
}

#[derive(Args)]
struct KernelOptions {
    /// With the kernel engine: how long each probe waits for its answer (300ms, 1.5s).
    /// A blocked connection costs this once per wave of concurrent probes.
    #[arg(long, value_name = "DURATION", default_value = "300ms", value_parser = parse_probe_timeout)]
    probe_timeout: ProbeTimeout,
}

#[derive(Clone, Copy, ValueEnum)]
enum MatrixFormat {
    Text,
    Json,
    Yaml,
    Csv,
    /// A Graphviz graph: namespaces as clusters, an edge per allowed pair labelled with its
    /// probes (render with `dot -Tsvg`).
    Dot,
    /// One self-contained page: a heat map per probe; click a cell for `query`'s answer.
    Html,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum FamilyArg {
    /// Each destination's first IP decides the family; the source uses its IP of that family.
    Primary,
    Ipv4,
    Ipv6,
}

#[derive(Clone, Copy, ValueEnum)]
enum ColorArg {
    Auto,
    Always,
    Never,
}

#[derive(Args)]
struct MatrixArgs {
    #[command(flatten)]
    input: Input,
    /// Ports to probe: numbers or container port names, comma separated (default: all known).
    #[arg(long, value_delimiter = ',', value_name = "PORT")]
    port: Vec<String>,
    /// Protocols to probe, comma separated (default: those the probed ports use).
    #[arg(long, value_delimiter = ',', value_name = "PROTOCOL")]
    protocol: Vec<String>,
    /// Show only pods of this namespace (repeatable).
    #[arg(short = 'n', long = "namespace", value_name = "NS")]
    namespaces: Vec<String>,
    /// Add a column per Service port: may each pod reach all, some or none of its endpoints
    /// (text and JSON output).
    #[arg(long)]
    services: bool,
    /// Which engine computes the verdicts.
    #[arg(long, value_enum, default_value = "evaluator")]
    engine: Engine,
    #[command(flatten)]
    kernel: KernelOptions,
    /// Address family of the probes.
    #[arg(long, value_enum, default_value = "primary")]
    family: FamilyArg,
    #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
    output: MatrixFormat,
    /// Colour the text table (auto: only on a terminal, and not when NO_COLOR is set).
    #[arg(long, value_enum, default_value = "auto")]
    color: ColorArg,
}

#[derive(Clone, Copy, ValueEnum)]
enum QueryFormat {
    Text,
    Json,
}

#[derive(Args)]
struct QueryArgs {
    #[command(flatten)]
    input: Input,
    /// Source: NAMESPACE/POD or an IP address.
    #[arg(long, value_name = "NS/POD|IP")]
    from: String,
    /// Destination: NAMESPACE/POD, an IP address, or svc/NAMESPACE/NAME (a Service).
    #[arg(long, value_name = "NS/POD|IP|svc/NS/NAME")]
    to: String,
    /// Destination port: a number, or a container port name of the destination pod; for a
    /// Service, its port's number or name.
    #[arg(long)]
    port: String,
    /// TCP, UDP or SCTP (default TCP; for a Service port given by name, that port's).
    #[arg(long)]
    protocol: Option<String>,
    /// Address family (default: the destination's first IP).
    #[arg(long, value_enum, default_value = "primary")]
    family: FamilyArg,
    #[arg(long, value_enum, default_value = "evaluator")]
    engine: Engine,
    #[command(flatten)]
    kernel: KernelOptions,
    /// With --engine ruleset: print the chains and rules the packet went through.
    #[arg(long)]
    trace: bool,
    #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
    output: QueryFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum VerifyFormat {
    Text,
    Json,
}

#[derive(Args)]
struct VerifyArgs {
    #[command(flatten)]
    input: Input,
    /// The engines to compare, comma separated (at least two).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "evaluator,ruleset,kernel")]
    engines: Vec<Engine>,
    /// Ports to probe: numbers or container port names, comma separated (default: all known).
    #[arg(long, value_delimiter = ',', value_name = "PORT")]
    port: Vec<String>,
    /// Protocols to probe, comma separated (default: those the probed ports use).
    #[arg(long, value_delimiter = ',', value_name = "PROTOCOL")]
    protocol: Vec<String>,
    /// Address families of the probes, comma separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "primary")]
    family: Vec<FamilyArg>,
    #[command(flatten)]
    kernel: KernelOptions,
    #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
    output: VerifyFormat,
}

#[derive(Args)]
struct ExplainArgs {
    #[command(flatten)]
    input: Input,
    /// The pod to explain.
    #[arg(value_name = "NS/POD")]
    pod: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum RulesetFormat {
    /// `nft -f` text.
    Nft,
    /// `nft -j` JSON.
    Json,
}

#[derive(Args)]
struct RulesetArgs {
    #[command(flatten)]
    input: Input,
    /// The node to compile for (repeatable; default: every node that runs pods).
    #[arg(long = "node", value_name = "NODE")]
    nodes: Vec<String>,
    /// The nftables table name.
    #[arg(long, default_value = "netpol")]
    table: String,
    /// A pod CIDR of the node (repeatable): its addresses that are no known local pod are
    /// dropped both ways (the unknown-pod guard). None: no guard.
    #[arg(long = "pod-cidr", value_name = "CIDR", value_parser = validate::cidr_arg)]
    pod_cidrs: Vec<ipnet::IpNet>,
    #[arg(short = 'o', long = "output", value_enum, default_value = "nft")]
    output: RulesetFormat,
    #[command(flatten)]
    observe: netpol::cli::observe::ObserveArgs,
}

#[derive(Args)]
struct GenerateArgs {
    #[arg(long, default_value_t = 1000)]
    pods: usize,
    #[arg(long, default_value_t = 300)]
    policies: usize,
    #[arg(long, default_value_t = 20)]
    namespaces: usize,
    #[arg(long, default_value_t = 10)]
    nodes: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Give every pod an IPv6 address too.
    #[arg(long)]
    dual_stack: bool,
}

/// A line on stderr. A closed stderr loses the line, never the exit code (no panic).
macro_rules! note {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// A line of a command's output, gathered in a `String` and printed at once by [`print_out`].
macro_rules! outln {
    ($text:expr) => {
        $text.push('\n')
    };
    ($text:expr, $($arg:tt)*) => {{
        $text.push_str(&format!($($arg)*));
        $text.push('\n');
    }};
}

/// A closed stdout (`| head -1`) ends the output quietly: the command still exits with the
/// code its answer deserves (a DENIED query 1, an agreeing verify 0).
fn quietly(written: std::io::Result<()>) -> Result<()> {
    match written {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// Writes `text` to stdout, quietly on a closed pipe.
fn print_out(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    quietly(out.write_all(text.as_bytes()).and_then(|()| out.flush()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Matrix(a) => matrix_cmd(a),
        Command::Query(a) => query_cmd(a),
        Command::Explain(a) => explain_cmd(a),
        Command::Ruleset(a) => ruleset_cmd(a),
        Command::Verify(a) => verify_cmd(a),
        Command::Lab(LabCommand::Cleanup(a)) => lab_cleanup_cmd(a),
        Command::Generate(a) => generate_cmd(a),
        Command::Diff(a) => diff_cmd(a),
        Command::Lint(a) => lint_cmd(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // A closed pipe (`| head`) is not an error worth a message.
            if e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) {
                return ExitCode::SUCCESS;
            }
            note!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn load(input: &Input) -> Result<Cluster> {
    Ok(load_all(input, Services::Unused)?.cluster)
}

/// Whether a command reads Services: with `--cluster`, only one that does lists them, so a
/// role without `list` on services can still answer everything else.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Services {
    Used,
    Unused,
}

/// Loads the input (files, or the cluster); warnings go to stderr.
fn load_all(input: &Input, services: Services) -> Result<Loaded> {
    if input.cluster.read()? {
        return load_cluster(&input.cluster, &input.options, services, "");
    }
    load_paths(&input.files, &input.options, "")
}

/// Loads `files` with `input`'s options; warnings go to stderr, after `side` ("OLD: ").
fn load_paths(files: &[PathBuf], input: &LoaderArgs, side: &str) -> Result<Loaded> {
    let options = loader_options(input)?;
    let sources = load::read_sources(files).map_err(|e| anyhow!("{side}{e}"))?;
    let loaded = load::load_sources(&sources, &options).map_err(|e| anyhow!("{side}{e}"))?;
    print_warnings(&loaded, side);
    Ok(loaded)
}

/// Loads the live cluster with `input`'s options; warnings go to stderr, after `side`.
#[cfg(feature = "cluster")]
fn load_cluster(cluster: &ClusterArgs, input: &LoaderArgs, services: Services, side: &str) -> Result<Loaded> {
    let options = loader_options(input)?;
    let target = netpol::k8s::live::Target {
        kubeconfig: cluster.kubeconfig.clone(),
        context: cluster.context.clone(),
        services: services == Services::Used,
    };
    let loaded = netpol::k8s::live::load(&target, &options).map_err(|e| anyhow!("{side}{e}"))?;
    print_warnings(&loaded, side);
    Ok(loaded)
}

/// The lean build (`--no-default-features`) has no API client: the flag stays, to say so.
#[cfg(not(feature = "cluster"))]
fn load_cluster(_: &ClusterArgs, _: &LoaderArgs, _: Services, _: &str) -> Result<Loaded> {
    bail!(
        "--cluster: this netpol-check was built without cluster support (cargo feature `cluster`, on by \
         default): build it with the default features (`cargo install --path .`), or give the objects as \
         files (`kubectl get ns,pods,nodes,services,networkpolicies -A -o yaml | netpol-check ... -f -`)"
    )
}

fn loader_options(input: &LoaderArgs) -> Result<LoadOptions> {
    if !input.synthetic_ipv4.addr().is_ipv4() {
        bail!("--synthetic-ipv4: {} is not an IPv4 range", input.synthetic_ipv4);
    }
    if let Some(v6) = input.synthetic_ipv6.filter(|n| !n.addr().is_ipv6()) {
        bail!("--synthetic-ipv6: {v6} is not an IPv6 range");
    }
    Ok(LoadOptions {
        synthetic_ipv4: input.synthetic_ipv4,
        synthetic_ipv6: input.synthetic_ipv6,
        lenient: input.lenient,
        domains: domains(&input.resolve),
    })
}

fn print_warnings(loaded: &Loaded, side: &str) {
    for w in &loaded.warnings {
        note!("warning: {side}{w}");
    }
}

/// The `--resolve` entries as one map: a name given twice resolves to every address given.
fn domains(entries: &[(String, std::net::IpAddr)]) -> netpol::policy::tiers::DomainMap {
    let mut map = netpol::policy::tiers::DomainMap::new();
    for (name, ip) in entries {
        let ips = map.entry(name.clone()).or_default();
        if !ips.contains(ip) {
            ips.push(*ip);
        }
    }
    map
}

/// Probing one family where no pod has an address of it answers nothing but "denied".
fn check_family(cluster: &Cluster, family: FamilyArg) -> Result<()> {
    let (name, ipv6) = match family {
        FamilyArg::Primary => return Ok(()),
        FamilyArg::Ipv4 => ("ipv4", false),
        FamilyArg::Ipv6 => ("ipv6", true),
    };
    if !cluster.pods.is_empty() && cluster.pods.iter().all(|p| p.ip_of_family(ipv6).is_none()) {
        bail!("--family {name}: no pod of the input has an {} address", if ipv6 { "IPv6" } else { "IPv4" });
    }
    Ok(())
}

/// Says so when a matrix has no cell to fill.
fn warn_if_nothing_to_probe(cluster: &Cluster, probes: &[Probe]) {
    if cluster.pods.is_empty() {
        note!("warning: nothing to probe: the input has no pods that take part");
    } else if probes.is_empty() {
        note!("warning: nothing to probe: no pod declares a port and no policy names one (give --port)");
    }
}

fn family(f: FamilyArg) -> Family {
    match f {
        FamilyArg::Primary => Family::Primary,
        FamilyArg::Ipv4 => Family::Ipv4,
        FamilyArg::Ipv6 => Family::Ipv6,
    }
}

fn parse_protocol(text: &str) -> Result<Protocol> {
    Protocol::parse(text).ok_or_else(|| anyhow!("--protocol: unknown protocol {text:?} (expected TCP, UDP or SCTP)"))
}

fn probes(cluster: &Cluster, ports: &[String], protocols: &[String]) -> Result<Vec<Probe>> {
    let protocols: Vec<Protocol> = protocols.iter().map(|p| parse_protocol(p)).collect::<Result<_>>()?;
    let mut out = if ports.is_empty() {
        matrix::default_probes(cluster)
    } else {
        let mut out = Vec::new();
        for p in ports {
            let port = query::parse_port(p).map_err(|e| anyhow!("--port: {e}"))?;
            if let ProbePort::Named(name) = &port
                && !cluster.pods.iter().any(|pod| pod.ports.iter().any(|c| c.name.as_deref() == Some(name)))
            {
                note!("warning: --port {name}: no pod declares a port of that name; every cell is denied");
            }
            let protos: &[Protocol] = if protocols.is_empty() { &[Protocol::Tcp] } else { &protocols };
            out.extend(protos.iter().map(|&protocol| Probe { port: port.clone(), protocol }));
        }
        out
    };
    if !protocols.is_empty() {
        out.retain(|p| protocols.contains(&p.protocol));
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The kernel engine's prerequisites (root, `ip`, `nft`) come first: no point reading input
/// a run cannot use. A run that will build labs gets the Ctrl-C handler that removes them.
fn check_kernel(engines: &[Engine]) -> Result<()> {
    if engines.contains(&Engine::Kernel) {
        kernel::check_prerequisites()?;
        install_interrupt_handler();
    }
    Ok(())
}

/// On Ctrl-C or SIGTERM, delete the namespaces of every live lab, then exit 130 as a shell
/// does for an interrupted command. A signal does not unwind, so the labs' `Drop` would not
/// run. Installed only for the kernel engine: other commands keep the default signal action.
fn install_interrupt_handler() {
    if let Err(e) = ctrlc::set_handler(|| {
        lab::teardown_live_labs();
        std::process::exit(130);
    }) {
        note!("warning: no Ctrl-C handler ({e}): an interrupted run leaves its lab for `netpol-check lab cleanup`");
    }
}

fn matrix_cmd(a: MatrixArgs) -> Result<ExitCode> {
    check_kernel(&[a.engine])?;
    if a.services && !matches!(a.output, MatrixFormat::Text | MatrixFormat::Json) {
        bail!("--services: Service columns are printed with -o text or -o json");
    }
    let loaded = load_all(&a.input, if a.services { Services::Used } else { Services::Unused })?;
    let cluster = loaded.cluster;
    check_family(&cluster, a.family)?;
    let probes = probes(&cluster, &a.port, &a.protocol)?;
    warn_if_nothing_to_probe(&cluster, &probes);
    for ns in &a.namespaces {
        if !cluster.namespaces.contains_key(ns) {
            bail!("--namespace: no namespace {ns:?} in the input");
        }
    }
    let keep: Vec<usize> = (0..cluster.pods.len())
        .filter(|&i| a.namespaces.is_empty() || a.namespaces.contains(&cluster.pods[i].id.namespace))
        .collect();
    let (columns, column_warnings) =
        if a.services { services::columns(&cluster, &loaded.services, &a.namespaces) } else { Default::default() };
    for w in &column_warnings {
        note!("warning: {w}");
    }
    if a.services && loaded.services.is_empty() {
        note!("warning: --services: the input has no Service");
    }
    // The Service columns' endpoint ports are probed with the matrix's own probes, by the
    // same engine run; only the requested probes are shown as pod tables.
    let column_probes = services::probes(&columns);
    let mut all_probes = probes.clone();
    all_probes.extend(column_probes.iter().filter(|p| !probes.contains(p)).cloned());
    let fam = family(a.family);
    let mut per_family = a.engine.matrices(&cluster, &all_probes, &[fam], a.kernel.probe_timeout.0)?;
    let matrices = per_family.pop().unwrap_or_default();
    let by_probe = services::by_probe(&all_probes, &matrices);
    let cells = services::cells(&columns, &keep, |p| by_probe.get(p).copied());
    let results = probes.into_iter().zip(&matrices).map(|(p, m)| (p, m.project(&keep))).collect();
    let report = MatrixReport {
        engine: a.engine.name(),
        pods: keep.iter().map(|&i| cluster.pods[i].id.to_string()).collect(),
        probes: results,
    };
    let input_args = query_input_args(&a.input);
    let picture = Picture {
        cluster: &cluster,
        engine: a.engine.name(),
        family: fam,
        pods: &keep,
        probes: &report.probes,
        input_args: &input_args,
    };
    let color = match a.color {
        ColorArg::Always => true,
        ColorArg::Never => false,
        ColorArg::Auto => std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 20, stdout.lock());
    quietly(
        match a.output {
            MatrixFormat::Text if a.services => report::write_text(&mut out, &report, color)
                .and_then(|()| services::write_text(&mut out, &cluster, &keep, &columns, &cells, color)),
            MatrixFormat::Json if a.services => {
                services::write_json(&mut out, &report, &services::json_value(&cluster, &columns, &cells))
            }
            MatrixFormat::Text => report::write_text(&mut out, &report, color),
            MatrixFormat::Json => report::write_json(&mut out, &report),
            MatrixFormat::Yaml => report::write_yaml(&mut out, &report),
            MatrixFormat::Csv => report::write_csv(&mut out, &report),
            MatrixFormat::Dot => picture::write_dot(&mut out, &picture),
            MatrixFormat::Html => picture::write_html(&mut out, &picture),
        }
        .and_then(|()| out.flush()),
    )?;
    Ok(ExitCode::SUCCESS)
}

/// The words that give `query` the input `input` names, as a user would type them.
fn query_input_args(input: &Input) -> Vec<String> {
    let mut words = Vec::new();
    for file in &input.files {
        words.extend(["-f".to_string(), file.display().to_string()]);
    }
    let options = &input.options;
    if options.synthetic_ipv4.to_string() != SYNTHETIC_IPV4_DEFAULT {
        words.extend(["--synthetic-ipv4".to_string(), options.synthetic_ipv4.to_string()]);
    }
    if let Some(v6) = options.synthetic_ipv6 {
        words.extend(["--synthetic-ipv6".to_string(), v6.to_string()]);
    }
    if options.lenient {
        words.push("--lenient".to_string());
    }
    for (name, ip) in &options.resolve {
        words.extend(["--resolve".to_string(), format!("{name}={ip}")]);
    }
    words
}

fn query_cmd(a: QueryArgs) -> Result<ExitCode> {
    check_kernel(&[a.engine])?;
    if services::is_service(&a.from) {
        bail!(
            "--from: {:?} is a Service, and a Service is not a source: connections come from pods (give NS/POD or an IP)",
            a.from
        );
    }
    if a.trace && !matches!(a.engine, Engine::Ruleset) {
        bail!("--trace: needs --engine ruleset (the evaluator explains itself without it)");
    }
    let loaded = load_all(&a.input, if services::is_service(&a.to) { Services::Used } else { Services::Unused })?;
    if services::is_service(&a.to) {
        return service_query_cmd(a, loaded);
    }
    // A node's address (a hostNetwork pod's, or a pod's status.hostIP) means that node.
    let cluster = query::with_node_endpoints(&loaded.cluster, &loaded.node_ips, &[&a.from, &a.to]);
    let protocol = parse_protocol(a.protocol.as_deref().unwrap_or("TCP"))?;
    let conn =
        query::connection(&cluster, &a.from, &a.to, &a.port, protocol, family(a.family)).map_err(|e| anyhow!(e))?;
    let mut verdict = evaluate::evaluate(&cluster, &conn);
    let mut trace = None;
    match a.engine {
        Engine::Evaluator => {}
        Engine::Ruleset => {
            let t = ruleset::trace(&cluster, &conn);
            // The explanation stays the evaluator's; the verdict is the ruleset's own.
            verdict.allowed = t.allowed;
            trace = Some(t);
        }
        Engine::Kernel => {
            // One connection, one probe (in a lab of the whole cluster); the explanation
            // stays the evaluator's, the verdict is what the packets did.
            let facts = kernel::decide(&cluster, &[conn], a.kernel.probe_timeout.0)?;
            verdict.allowed = facts.first().copied().unwrap_or(false);
        }
    }
    // The trace exists with the ruleset engine; it is shown when asked for.
    let trace = trace.as_ref().filter(|_| a.trace);
    let text = match a.output {
        QueryFormat::Text => report::query_text(&cluster, &conn, &verdict, trace),
        QueryFormat::Json => report::query_json(a.engine.name(), &cluster, &conn, &verdict, trace),
    };
    print_out(&text)?;
    Ok(if verdict.allowed { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// `query --to svc/NS/NAME`: one answer per endpoint of the Service port, by the chosen
/// engine (the kernel engine probes them all in one lab), then the summary.
fn service_query_cmd(a: QueryArgs, loaded: Loaded) -> Result<ExitCode> {
    let cluster = query::with_node_endpoints(&loaded.cluster, &loaded.node_ips, &[&a.from]);
    let protocol = a.protocol.as_deref().map(parse_protocol).transpose()?;
    let target = services::target(&cluster, &loaded.services, &loaded.endpoint_conditions, &a.to, &a.port, protocol)
        .map_err(|e| anyhow!(e))?;
    let src = query::resolve_endpoint(&cluster, &a.from).map_err(|e| anyhow!("--from: {e}"))?;
    let conns = target.connections(&cluster, src, family(a.family));
    let mut verdicts: Vec<evaluate::Verdict> = conns.iter().map(|c| evaluate::evaluate(&cluster, c)).collect();
    let mut traces = Vec::new();
    match a.engine {
        Engine::Evaluator => {}
        Engine::Ruleset => {
            let engine = ruleset::Engine::new(&cluster);
            for (verdict, conn) in verdicts.iter_mut().zip(&conns) {
                let t = engine.trace(&cluster, conn);
                verdict.allowed = t.allowed;
                traces.push(t);
            }
        }
        Engine::Kernel if !conns.is_empty() => {
            let facts = kernel::decide(&cluster, &conns, a.kernel.probe_timeout.0)?;
            for (verdict, allowed) in verdicts.iter_mut().zip(facts) {
                verdict.allowed = allowed;
            }
        }
        Engine::Kernel => {}
    }
    let answers: Vec<services::Answer> = conns
        .into_iter()
        .zip(verdicts)
        .enumerate()
        .map(|(k, (conn, verdict))| (conn, verdict, traces.get(k).filter(|_| a.trace)))
        .collect();
    let text = match a.output {
        QueryFormat::Text => services::query_text(&cluster, &target, &answers),
        QueryFormat::Json => services::query_json(a.engine.name(), &cluster, &target, &answers),
    };
    print_out(&text)?;
    let all_allowed = !answers.is_empty() && services::allowed_count(&answers) == answers.len();
    Ok(if all_allowed { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn explain_cmd(a: ExplainArgs) -> Result<ExitCode> {
    let cluster = load(&a.input)?;
    let Endpoint::Pod(i) = query::resolve_endpoint(&cluster, &a.pod).map_err(|e| anyhow!("NS/POD: {e}"))? else {
        bail!("NS/POD: {:?} is not a pod of the input", a.pod);
    };
    print_out(&explain::explain(&cluster, i))?;
    Ok(ExitCode::SUCCESS)
}

fn ruleset_cmd(a: RulesetArgs) -> Result<ExitCode> {
    // The agent's rules (`--table`, `--node`) and messages: what this prints, it would load.
    validate::table_name(&a.table).map_err(|e| anyhow!("--table: {e}"))?;
    for node in &a.nodes {
        validate::dns_subdomain(node).map_err(|e| anyhow!("--node: {e}"))?;
    }
    let cluster = load(&a.input)?;
    let known = cluster.nodes();
    let nodes = if a.nodes.is_empty() { known.clone() } else { a.nodes.clone() };
    for node in &nodes {
        if !known.contains(node) {
            note!("warning: --node {node}: no pod of the input runs there; its ruleset isolates nothing");
        }
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut write = || -> std::io::Result<()> {
        for (k, node) in nodes.iter().enumerate() {
            let config = NodeConfig {
                table: a.table.clone(),
                pod_cidrs: a.pod_cidrs.clone(),
                observe: a.observe.observe(),
                ..NodeConfig::new(node.clone())
            };
            let ruleset = compile::compile(&cluster, &config);
            match a.output {
                RulesetFormat::Nft => {
                    if nodes.len() > 1 {
                        writeln!(out, "{}# ===== node {node} =====", if k > 0 { "\n" } else { "" })?;
                    }
                    out.write_all(render::ruleset(&ruleset).as_bytes())?;
                }
                RulesetFormat::Json => writeln!(out, "{}", json::to_string(&ruleset))?,
            }
        }
        out.flush()
    };
    quietly(write())?;
    Ok(ExitCode::SUCCESS)
}

fn verify_cmd(a: VerifyArgs) -> Result<ExitCode> {
    let mut engines: Vec<Engine> = Vec::new();
    for e in a.engines {
        if engines.contains(&e) {
            bail!("--engines: {} is named twice", e.name());
        }
        engines.push(e);
    }
    if engines.len() < 2 {
        bail!("--engines: name at least two engines to compare (evaluator, ruleset, kernel)");
    }
    let mut families: Vec<FamilyArg> = Vec::new();
    for f in a.family {
        if !families.contains(&f) {
            families.push(f);
        }
    }
    check_kernel(&engines)?;
    let cluster = load(&a.input)?;
    // Engines comparing their verdicts on a family nobody has still check something (that
    // all deny): a warning here, where matrix refuses.
    for &f in &families {
        if let Err(e) = check_family(&cluster, f) {
            note!("warning: {e}: every cell of that family is denied");
        }
    }
    let probes = probes(&cluster, &a.port, &a.protocol)?;
    // Engine by engine (the kernel's lab serves every family at once), then regrouped per family.
    let families: Vec<Family> = families.into_iter().map(family).collect();
    let mut results: Vec<Vec<Vec<BitMatrix>>> = vec![Vec::new(); families.len()];
    for &engine in &engines {
        let per_family = engine
            .matrices(&cluster, &probes, &families, a.kernel.probe_timeout.0)
            .map_err(|e| anyhow!("{} engine: {e:#}", engine.name()))?;
        for (slot, matrices) in results.iter_mut().zip(per_family) {
            slot.push(matrices);
        }
    }
    let names = engines.iter().map(|e| e.name().to_string()).collect();
    let report = verify::Report::new(names, families, probes, &results);
    let mut text = String::new();
    match a.output {
        VerifyFormat::Text => {
            for d in &report.disagreements {
                outln!(text, "{}", report.describe(&cluster, d));
            }
            outln!(text, "{}", report.summary());
        }
        VerifyFormat::Json => outln!(text, "{}", serde_json::to_string_pretty(&report.to_json(&cluster))?),
    }
    print_out(&text)?;
    Ok(if report.agree() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn lab_cleanup_cmd(a: CleanupArgs) -> Result<ExitCode> {
    let mut text = String::new();
    let stale = lab::leftovers()?;
    let others = lab::lab_namespaces()?.len().saturating_sub(stale.len());
    let kept = if others > 0 {
        format!("; {others} other npl-* namespaces left alone (not a crashed run's)")
    } else {
        String::new()
    };
    if stale.is_empty() {
        outln!(text, "no leftover lab namespaces{kept}");
        print_out(&text)?;
        return Ok(ExitCode::SUCCESS);
    }
    if a.dry_run {
        for name in &stale {
            outln!(text, "would remove {name}");
        }
        outln!(text, "{} leftover lab namespaces would be removed{kept}", stale.len());
        print_out(&text)?;
        return Ok(ExitCode::SUCCESS);
    }
    kernel::check_privileges().map_err(|e| match e {
        kernel::KernelError::NotRoot => {
            anyhow!("removing network namespaces needs root; run `sudo netpol-check lab cleanup`")
        }
        e => anyhow!(e),
    })?;
    // Listed again by the library, which re-checks every owner right before deleting.
    let removed = lab::cleanup_leftovers()?;
    for name in &removed {
        outln!(text, "removed {name}");
    }
    outln!(text, "removed {} leftover lab namespaces{kept}", removed.len());
    print_out(&text)?;
    Ok(ExitCode::SUCCESS)
}

fn generate_cmd(a: GenerateArgs) -> Result<ExitCode> {
    let params = netpol::cli::generate::Params {
        pods: a.pods,
        namespaces: a.namespaces,
        policies: a.policies,
        nodes: a.nodes,
        seed: a.seed,
        dual_stack: a.dual_stack,
    };
    let yaml = netpol::cli::generate::to_yaml(&netpol::cli::generate::cluster(&params));
    print_out(&yaml)?;
    Ok(ExitCode::SUCCESS)
}

fn diff_cmd(a: DiffArgs) -> Result<ExitCode> {
    let (old, new) = match (a.cluster.read()?, a.inputs.as_slice()) {
        (true, [new]) => (load_cluster(&a.cluster, &a.options, Services::Unused, "OLD (cluster): ")?.cluster, new),
        (true, _) => bail!("--cluster: give NEW only (the live cluster is OLD)"),
        (false, [old, new]) => {
            if old.as_os_str() == "-" && new.as_os_str() == "-" {
                bail!("OLD and NEW: only one side can be read from stdin (-)");
            }
            (load_paths(std::slice::from_ref(old), &a.options, "OLD: ")?.cluster, new)
        }
        (false, _) => bail!("NEW: missing (give OLD and NEW, or --cluster and NEW)"),
    };
    let new = load_paths(std::slice::from_ref(new), &a.options, "NEW: ")?.cluster;
    for (side, cluster) in [("OLD", &old), ("NEW", &new)] {
        check_family(cluster, a.family).map_err(|e| anyhow!("{side}: {e}"))?;
    }
    let probes = if a.port.is_empty() {
        let protocols: Vec<Protocol> = a.protocol.iter().map(|p| parse_protocol(p)).collect::<Result<_>>()?;
        let mut all = netpol::cli::diff::default_probes(&old, &new);
        if !protocols.is_empty() {
            all.retain(|p| protocols.contains(&p.protocol));
        }
        all
    } else {
        probes(&new, &a.port, &a.protocol)?
    };
    let report = netpol::cli::diff::diff(&old, &new, probes, family(a.family));
    let mut text = String::new();
    match a.output {
        VerifyFormat::Text => text = report.text(&old, &new),
        VerifyFormat::Json => outln!(text, "{}", serde_json::to_string_pretty(&report.to_json(&old, &new))?),
    }
    print_out(&text)?;
    Ok(if report.unchanged() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn lint_cmd(a: LintArgs) -> Result<ExitCode> {
    let cluster = load(&a.input)?;
    let findings = netpol::cli::lint::lint(&cluster, &a.pod_cidrs);
    let mut text = String::new();
    match a.output {
        VerifyFormat::Text => {
            for f in &findings {
                outln!(text, "{}", f.line());
            }
            let policies = cluster.policies.len() + cluster.cluster_policies.len();
            outln!(text, "lint: {} findings in {policies} policies", findings.len());
        }
        VerifyFormat::Json => outln!(text, "{}", serde_json::to_string_pretty(&netpol::cli::lint::to_json(&findings))?),
    }
    print_out(&text)?;
    Ok(if findings.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
