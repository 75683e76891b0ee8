//! Services in `query --to svc/NS/NAME` and `matrix --services`: a Service port becomes its
//! endpoints, and each endpoint is answered as the pod-to-pod connection it is.
//!
//! ```text
//!  "svc/NS/NAME", "80"|"http" ──► target ──► ServiceTarget{service, port, endpoints}
//!                                               │ one Connection per endpoint (resolved targetPort)
//!  verdicts ──► query_text | query_json: one pod answer per endpoint + "N of M endpoints allowed"
//!
//!  Services ──► columns ──► ServiceColumn per (Service, port) ──► probes it needs (numbers)
//!  engine matrices of those probes ──► cells: allowed endpoints per source row
//!                                  ──► write_text (. all  ~ some  X none  - no endpoints) | json_value
//! ```
//!
//! Why per endpoint: kube-proxy rewrites the Service's address to one endpoint's (DNAT)
//! before the packet reaches the filter hooks, so NetworkPolicy only ever sees a connection
//! to a pod, on the port the targetPort resolves to there. Which endpoint a connection gets
//! is kube-proxy's choice: the answer is all of them.

use std::collections::BTreeMap;
use std::io::{self, Write};

use crate::cli::query;
use crate::cli::report;
use crate::engines::ruleset::Trace;
use crate::policy::bitset::BitMatrix;
use crate::policy::evaluate::{Connection, Endpoint, Verdict};
use crate::policy::matrix::{Family, Probe, ProbePort};
use crate::policy::model::{Cluster, ObjectRef, Protocol};
use crate::policy::service::{EndpointConditions, Service, ServiceEndpoint, ServicePort, TargetPort};

/// How a Service is named on the command line: `svc/NAMESPACE/NAME`.
pub const SERVICE_PREFIX: &str = "svc/";

/// Whether a typed endpoint names a Service.
pub fn is_service(text: &str) -> bool {
    text.starts_with(SERVICE_PREFIX)
}

/// The Service `svc/NS/NAME` names.
pub fn find<'a>(services: &'a [Service], text: &str) -> Result<&'a Service, String> {
    let rest = text.strip_prefix(SERVICE_PREFIX).unwrap_or(text);
    let Some((namespace, name)) = rest.split_once('/').filter(|(ns, n)| !ns.is_empty() && !n.is_empty()) else {
        return Err(format!("{text:?} is not svc/NAMESPACE/NAME"));
    };
    let id = ObjectRef::new(namespace, name);
    services.iter().find(|s| s.id == id).ok_or_else(|| {
        let known = services.iter().filter(|s| s.id.namespace == namespace).map(|s| s.id.name.as_str());
        let known: Vec<&str> = known.collect();
        if known.is_empty() {
            format!("no service {id} in the input (namespace {namespace} has no Service)")
        } else {
            format!("no service {id} in the input (services of {namespace}: {})", known.join(", "))
        }
    })
}

/// A Service port a query goes to, and where it leads.
#[derive(Clone, Debug)]
pub struct ServiceTarget<'a> {
    pub service: &'a Service,
    pub port: &'a ServicePort,
    pub endpoints: Vec<ServiceEndpoint>,
    /// Each endpoint's conditions, in the same order.
    pub conditions: Vec<EndpointConditions>,
    /// Selected pods that lack the named targetPort (not endpoints of this port).
    pub lacking_port: Vec<usize>,
}

/// Resolves `--to svc/NS/NAME --port P`. `protocol` is the one the user typed, if any;
/// `conditions` are the loader's (pods absent from it are ready). An unknown Service or
/// port, or endpoints that cannot be computed, are bad input.
pub fn target<'a>(
    cluster: &Cluster,
    services: &'a [Service],
    conditions: &BTreeMap<ObjectRef, EndpointConditions>,
    to: &str,
    port: &str,
    protocol: Option<Protocol>,
) -> Result<ServiceTarget<'a>, String> {
    let service = find(services, to).map_err(|e| format!("--to: {e}"))?;
    service.selector().map_err(|e| format!("--to: service {} {e}", service.id))?;
    let port = service.port(port, protocol).map_err(|e| format!("--port: {e}"))?;
    let found = service.endpoints(cluster, port).map_err(|e| format!("--to: service {} {e}", service.id))?;
    let conditions =
        found.endpoints.iter().map(|e| conditions.get(&cluster.pods[e.pod].id).copied().unwrap_or_default()).collect();
    Ok(ServiceTarget { service, port, endpoints: found.endpoints, conditions, lacking_port: found.lacking_port })
}

impl ServiceTarget<'_> {
    /// One connection from `src` per endpoint, on the port its targetPort resolves to there.
    pub fn connections(&self, cluster: &Cluster, src: Endpoint, family: Family) -> Vec<Connection> {
        self.endpoints
            .iter()
            .map(|e| {
                let dst = Endpoint::Pod(e.pod);
                let ipv6 = query::connection_family(cluster, src, dst, family);
                Connection { src, dst, protocol: self.port.protocol, port: e.port, ipv6 }
            })
            .collect()
    }

    /// `svc/tenant-a/backend TCP/80 (http) -> targetPort http`.
    fn heading(&self) -> String {
        format!("{SERVICE_PREFIX}{} {}", self.service.id, self.port)
    }

    fn lacking_names(&self, cluster: &Cluster) -> Vec<String> {
        self.lacking_port.iter().map(|&i| cluster.pods[i].id.to_string()).collect()
    }
}

/// One endpoint's answer: the connection, its verdict, and the ruleset's trace if asked for.
pub type Answer<'t> = (Connection, Verdict, Option<&'t Trace>);

/// How many of the answers are allowed.
pub fn allowed_count(answers: &[Answer]) -> usize {
    answers.iter().filter(|(_, v, _)| v.allowed).count()
}

/// `query --to svc/...`'s text: a heading, each endpoint's pod answer, and the summary.
pub fn query_text(cluster: &Cluster, target: &ServiceTarget, answers: &[Answer]) -> String {
    let mut text = format!(
        "{}: {} endpoint{} (the connection is DNATed to one of them before any policy sees it)\n",
        target.heading(),
        answers.len(),
        if answers.len() == 1 { "" } else { "s" }
    );
    if !target.lacking_port.is_empty() {
        text += &format!(
            "not endpoints of this port (no {} container port named {}): {}\n",
            target.port.protocol,
            target.port.target,
            target.lacking_names(cluster).join(", ")
        );
    }
    for ((conn, verdict, trace), conditions) in answers.iter().zip(&target.conditions) {
        text += "\n";
        text += &report::query_text(cluster, conn, verdict, *trace);
        if let Some(caveat) = conditions.caveat() {
            text += &format!("note: endpoint {} is {caveat}\n", report::endpoint_name(cluster, conn.dst));
        }
    }
    text += "\n";
    text += &summary(target, answers);
    text += "\n";
    text
}

/// `svc/NS/NAME TCP/80: 1 of 2 endpoints allowed`, or why there is nothing to allow.
fn summary(target: &ServiceTarget, answers: &[Answer]) -> String {
    let id = format!("{SERVICE_PREFIX}{} {}/{}", target.service.id, target.port.protocol, target.port.port);
    if answers.is_empty() {
        let why = if target.lacking_port.is_empty() {
            "no pod of the input with an IP, not in a terminal phase, matches the selector"
        } else {
            "the pods the selector matches lack the targetPort"
        };
        return format!("{id}: no endpoints ({why}): every connection fails");
    }
    format!("{id}: {} of {} endpoints allowed", allowed_count(answers), answers.len())
}

/// `query --to svc/... -o json`, a contract:
/// `{"engine", "service", "port": {"name", "port", "targetPort", "protocol"}, "endpoints": M,
/// "allowedEndpoints": N, "allowed": N == M && M > 0, "notEndpoints": [...], "answers": [...]}`,
/// each answer the JSON of a pod query (`report::query_json`), in the endpoints' order, plus
/// `"endpoint": {"pod", "port", "ready", "terminating"}`.
pub fn query_json(engine: &str, cluster: &Cluster, target: &ServiceTarget, answers: &[Answer]) -> String {
    let each: Vec<serde_json::Value> = answers
        .iter()
        .zip(&target.conditions)
        .map(|((conn, verdict, trace), conditions)| {
            let text = report::query_json(engine, cluster, conn, verdict, *trace);
            let mut answer: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            answer["endpoint"] = serde_json::json!({
                "pod": report::endpoint_name(cluster, conn.dst),
                "port": conn.port,
                "ready": conditions.ready,
                "terminating": conditions.terminating,
            });
            answer
        })
        .collect();
    let allowed = allowed_count(answers);
    let body = serde_json::json!({
        "engine": engine,
        "service": target.service.id.to_string(),
        "port": port_json(target.port),
        "endpoints": answers.len(),
        "allowedEndpoints": allowed,
        "allowed": !answers.is_empty() && allowed == answers.len(),
        "notEndpoints": target.lacking_names(cluster),
        "answers": each,
    });
    format!("{body:#}\n")
}

fn port_json(port: &ServicePort) -> serde_json::Value {
    let target = match &port.target {
        TargetPort::Number(n) => serde_json::json!(n),
        TargetPort::Named(name) => serde_json::json!(name),
    };
    serde_json::json!({"name": port.name, "port": port.port, "targetPort": target, "protocol": port.protocol.as_str()})
}

// --- matrix columns -------------------------------------------------------------------------

/// One matrix column: a Service port and its endpoints.
#[derive(Clone, Debug)]
pub struct ServiceColumn {
    pub service: ObjectRef,
    pub port: ServicePort,
    pub endpoints: Vec<ServiceEndpoint>,
}

impl ServiceColumn {
    fn probe(&self, endpoint: &ServiceEndpoint) -> Probe {
        Probe { port: ProbePort::Number(endpoint.port), protocol: self.port.protocol }
    }
}

/// A column per port of each Service of `namespaces` (all when empty), and a warning for
/// each Service whose endpoints cannot be computed (it gets no column).
pub fn columns(cluster: &Cluster, services: &[Service], namespaces: &[String]) -> (Vec<ServiceColumn>, Vec<String>) {
    let mut out = Vec::new();
    let mut warnings = Vec::new();
    for service in services.iter().filter(|s| namespaces.is_empty() || namespaces.contains(&s.id.namespace)) {
        if let Err(why) = service.selector() {
            warnings.push(format!("--services: service {} {why}; it gets no column", service.id));
            continue;
        }
        for port in &service.ports {
            let found = service.endpoints(cluster, port).unwrap_or_default();
            out.push(ServiceColumn { service: service.id.clone(), port: port.clone(), endpoints: found.endpoints });
        }
    }
    (out, warnings)
}

/// The numeric probes the columns' endpoints need, sorted, each once.
pub fn probes(columns: &[ServiceColumn]) -> Vec<Probe> {
    let mut out: Vec<Probe> = columns.iter().flat_map(|c| c.endpoints.iter().map(|e| c.probe(e))).collect();
    out.sort();
    out.dedup();
    out
}

/// For each column, for each row (a cluster pod index): how many of its endpoints the row's
/// pod may connect to. `matrix_of` gives the whole-cluster matrix of a probe from [`probes`].
pub fn cells<'m>(
    columns: &[ServiceColumn],
    rows: &[usize],
    matrix_of: impl Fn(&Probe) -> Option<&'m BitMatrix>,
) -> Vec<Vec<usize>> {
    columns
        .iter()
        .map(|c| {
            rows.iter()
                .map(|&i| {
                    c.endpoints.iter().filter(|e| matrix_of(&c.probe(e)).is_some_and(|m| m.get(i, e.pod))).count()
                })
                .collect()
        })
        .collect()
}

/// A cell's symbol: every endpoint allowed, some, none, or no endpoint at all.
fn symbol(allowed: usize, endpoints: usize) -> char {
    match (allowed, endpoints) {
        (_, 0) => '-',
        (a, m) if a == m => '.',
        (0, _) => 'X',
        _ => '~',
    }
}

/// The service table of `matrix --services`: rows are the matrix's pods, columns Service
/// ports, numbered and listed above it with their endpoint counts.
pub fn write_text(
    out: &mut impl Write,
    cluster: &Cluster,
    rows: &[usize],
    columns: &[ServiceColumn],
    cells: &[Vec<usize>],
    color: bool,
) -> io::Result<()> {
    let paint = |c: char| -> String {
        let code = match c {
            '.' => "32",
            '~' => "33",
            'X' => "1;31",
            _ => return c.to_string(),
        };
        if color { format!("\x1b[{code}m{c}\x1b[0m") } else { c.to_string() }
    };
    writeln!(
        out,
        "\nservices    legend: {} every endpoint allowed   {} some   {} none   {} no endpoints    rows: from   columns: Service ports",
        paint('.'),
        paint('~'),
        paint('X'),
        paint('-')
    )?;
    if columns.is_empty() {
        return writeln!(out, "(no Service with computable endpoints)");
    }
    let number_width = columns.len().to_string().len();
    for (k, c) in columns.iter().enumerate() {
        writeln!(
            out,
            "{:>w$} {SERVICE_PREFIX}{} {}: {} endpoint{}",
            k + 1,
            c.service,
            c.port,
            c.endpoints.len(),
            if c.endpoints.len() == 1 { "" } else { "s" },
            w = number_width
        )?;
    }
    let names: Vec<String> = rows.iter().map(|&i| cluster.pods[i].id.to_string()).collect();
    let width = names.iter().map(String::len).max().unwrap_or(0);
    let row_number_width = rows.len().to_string().len();
    writeln!(out)?;
    for digit in 0..number_width {
        write!(out, "{:w$}  ", "", w = width + row_number_width + 1)?;
        for k in 0..columns.len() {
            let s = format!("{:>w$}", k + 1, w = number_width);
            write!(out, "{:>w$} ", &s[digit..digit + 1], w = number_width)?;
        }
        writeln!(out)?;
    }
    for (r, name) in names.iter().enumerate() {
        write!(out, "{:>nw$} {:<w$}  ", r + 1, name, nw = row_number_width, w = width)?;
        for (k, c) in columns.iter().enumerate() {
            write!(out, "{:>pad$}{} ", "", paint(symbol(cells[k][r], c.endpoints.len())), pad = number_width - 1)?;
        }
        writeln!(out)?;
    }
    Ok(())
}

/// The `"services"` member of `matrix --services -o json`: per column `{"service", "port":
/// {"name", "port", "targetPort", "protocol"}, "endpoints": [{"pod", "port"}], "allowed":
/// [N per row]}`, rows in the order of the matrix's `pods`; a row reaches every endpoint when
/// its N is the number of endpoints, none when 0.
pub fn json_value(cluster: &Cluster, columns: &[ServiceColumn], cells: &[Vec<usize>]) -> serde_json::Value {
    let list: Vec<serde_json::Value> = columns
        .iter()
        .zip(cells)
        .map(|(c, row_counts)| {
            let endpoints: Vec<serde_json::Value> = c
                .endpoints
                .iter()
                .map(|e| serde_json::json!({"pod": cluster.pods[e.pod].id.to_string(), "port": e.port}))
                .collect();
            serde_json::json!({
                "service": c.service.to_string(),
                "port": port_json(&c.port),
                "endpoints": endpoints,
                "allowed": row_counts,
            })
        })
        .collect();
    serde_json::Value::Array(list)
}

/// Which matrix answers each numeric probe: `probes[k]`'s matrix is `matrices[k]`.
pub fn by_probe<'m>(probes: &[Probe], matrices: &'m [BitMatrix]) -> BTreeMap<Probe, &'m BitMatrix> {
    probes.iter().cloned().zip(matrices.iter()).collect()
}

/// `matrix --services -o json`: the matrix's JSON (`report::write_json`, unchanged) with
/// the `"services"` member ([`json_value`]) added last.
pub fn write_json(out: &mut impl Write, report: &report::MatrixReport, services: &serde_json::Value) -> io::Result<()> {
    let mut matrix = Vec::new();
    report::write_json(&mut matrix, report)?;
    // The matrix is one JSON object and a newline: reopen it before its closing brace.
    let body =
        matrix.trim_ascii_end().strip_suffix(b"}").ok_or_else(|| io::Error::other("matrix JSON is not an object"))?;
    out.write_all(body)?;
    writeln!(out, ", \"services\": {services}}}")
}
