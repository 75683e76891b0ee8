//! Reachability as pictures: `matrix -o dot` (a Graphviz graph) and `matrix -o html` (one
//! self-contained page: a heat map per probe; a click on a cell shows `query`'s answer).
//!
//! ```text
//!  Picture{cluster, pods, probes[BitMatrix], family} ──► write_dot  ──► digraph: a cluster per namespace,
//!                                                    │                 an edge per allowed pair, labelled with its probes
//!                                                    └─► write_html ──► <table> heat maps + JSON data
//!                                                          (per cell: report::describe_verdict, the lines `query` prints)
//! ```
//!
//! Pure: the caller writes the result where it wants. Every name that reaches the output is
//! escaped for where it lands (DOT string, HTML text or attribute, JSON inside `<script>`):
//! Kubernetes names cannot hold `<` or `"`, but explanations quote label values and policy
//! names, and the page must stay inert whatever the input.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{self, Write};

use crate::cli::report;
use crate::policy::bitset::BitMatrix;
use crate::policy::evaluate;
use crate::policy::matrix::{self, Family, Probe, ProbePort};
use crate::policy::model::Cluster;

/// Past this many cells (pods² × probes), the page carries no explanations: they would make
/// it tens of megabytes. Its panel then shows the `netpol-check query` command for the cell.
pub const EXPLAINED_CELLS_MAX: usize = 100_000;

/// What the pictures draw: matrices over some pods of a cluster.
pub struct Picture<'a> {
    pub cluster: &'a Cluster,
    /// The engine that computed the matrices (`evaluator`, `ruleset`, `kernel`).
    pub engine: &'a str,
    pub family: Family,
    /// Indices into `cluster.pods`, in row (and column) order.
    pub pods: &'a [usize],
    /// Per probe, the matrix over `pods`: `m.get(i, j)` means `pods[i] -> pods[j]` allowed.
    pub probes: &'a [(Probe, BitMatrix)],
    /// The words that give `query` the same input (`-f PATH`, loader options), for the
    /// command the page shows next to each explanation.
    pub input_args: &'a [String],
}

impl Picture<'_> {
    fn pod_name(&self, i: usize) -> String {
        self.cluster.pods[self.pods[i]].id.to_string()
    }

    /// `(namespace, first row, rows)` runs: pods come sorted by namespace, then name.
    fn namespace_runs(&self) -> Vec<(&str, usize, usize)> {
        let mut runs: Vec<(&str, usize, usize)> = Vec::new();
        for (i, &p) in self.pods.iter().enumerate() {
            let ns = self.cluster.pods[p].id.namespace.as_str();
            match runs.last_mut() {
                Some((last, _, len)) if *last == ns => *len += 1,
                _ => runs.push((ns, i, 1)),
            }
        }
        runs
    }
}

// --- dot -------------------------------------------------------------------------------------

/// A DOT double-quoted string. Inside one, `\"` is a quote and a backslash starts an escape
/// in labels (`\n`, `\l`), so both are escaped, and line breaks become `\n`.
fn dot_quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => {}
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The reachability graph: one `subgraph cluster_…` per namespace holding its pods, one
/// edge per allowed (from, to) pair labelled with the probes that allow it (`TCP/80, UDP/53`).
/// A pod reaching itself is not drawn: that traffic is never policed. Deterministic: pods,
/// edges and labels come in the matrix's order.
pub fn write_dot(out: &mut impl Write, p: &Picture) -> io::Result<()> {
    let probes: Vec<String> = p.probes.iter().map(|(probe, _)| probe.to_string()).collect();
    writeln!(out, "// netpol-check matrix -o dot (engine {}): an edge is an allowed connection,", p.engine)?;
    writeln!(out, "// labelled with the probes allowing it; self edges omitted. Render: dot -Tsvg -o graph.svg")?;
    writeln!(out, "digraph netpol {{")?;
    writeln!(
        out,
        "  graph [rankdir=LR, fontname=\"Helvetica\", labelloc=t, label={}];",
        dot_quote(&format!(
            "reachability ({} engine; probes: {})",
            p.engine,
            if probes.is_empty() { "none".to_string() } else { probes.join(", ") }
        ))
    )?;
    writeln!(out, "  node [shape=box, style=\"rounded,filled\", fillcolor=\"#eef3fb\", fontname=\"Helvetica\"];")?;
    writeln!(out, "  edge [fontname=\"Helvetica\", fontsize=10, color=\"#2e7d4f\"];")?;
    for (ns, first, len) in p.namespace_runs() {
        writeln!(out, "  subgraph {} {{", dot_quote(&format!("cluster_{ns}")))?;
        writeln!(out, "    label={}; style=rounded; color=\"#7a8aa0\";", dot_quote(&format!("namespace {ns}")))?;
        for i in first..first + len {
            let pod = &p.cluster.pods[p.pods[i]];
            writeln!(out, "    {} [label={}];", dot_quote(&pod.id.to_string()), dot_quote(&pod.id.name))?;
        }
        writeln!(out, "  }}")?;
    }
    let n = p.pods.len();
    for i in 0..n {
        for j in (0..n).filter(|&j| j != i) {
            let allowed: Vec<&str> =
                p.probes.iter().zip(&probes).filter(|((_, m), _)| m.get(i, j)).map(|(_, name)| name.as_str()).collect();
            if !allowed.is_empty() {
                writeln!(
                    out,
                    "  {} -> {} [label={}];",
                    dot_quote(&p.pod_name(i)),
                    dot_quote(&p.pod_name(j)),
                    dot_quote(&allowed.join(", "))
                )?;
            }
        }
    }
    writeln!(out, "}}")
}

// --- explanations ----------------------------------------------------------------------------

/// Each cell's explanation, as the lines `netpol-check query` prints for it. Lines repeat a
/// lot (every cell of a row shares its egress side), so each distinct line is stored once
/// and a cell is a list of line numbers.
struct Explanations {
    lines: Vec<String>,
    numbers: HashMap<String, usize>,
    /// Per probe, per cell `i * n + j`: the line numbers of its explanation.
    cells: Vec<Vec<Vec<usize>>>,
}

impl Explanations {
    fn number(&mut self, line: String) -> usize {
        if let Some(&k) = self.numbers.get(&line) {
            return k;
        }
        self.lines.push(line.clone());
        self.numbers.insert(line, self.lines.len() - 1);
        self.lines.len() - 1
    }

    fn new(p: &Picture) -> Self {
        let mut this = Explanations { lines: Vec::new(), numbers: HashMap::new(), cells: Vec::new() };
        let n = p.pods.len();
        for (probe, m) in p.probes {
            let mut cells = Vec::with_capacity(n * n);
            for i in 0..n {
                for j in 0..n {
                    let lines = cell_explanation(p, probe, m.get(i, j), i, j);
                    cells.push(lines.into_iter().map(|l| this.number(l)).collect());
                }
            }
            this.cells.push(cells);
        }
        this
    }
}

/// What `netpol-check query` prints for one cell. The verdict is the matrix's (the engine's),
/// the explanation the evaluator's, exactly as `query --engine ENGINE` answers.
fn cell_explanation(p: &Picture, probe: &Probe, allowed: bool, i: usize, j: usize) -> Vec<String> {
    let (src, dst) = (p.pods[i], p.pods[j]);
    match matrix::cell_connection(p.cluster, probe, p.family, src, dst) {
        Some(conn) => {
            let mut verdict = evaluate::evaluate(p.cluster, &conn);
            verdict.allowed = allowed;
            report::describe_verdict(p.cluster, &conn, &verdict)
        }
        // `query` refuses such a cell with an error (`--port: … declares no TCP port named
        // "http"`); the matrix denies it, for the same reason.
        None => vec![
            format!("DENIED  {} -> {} {probe}", p.pod_name(i), p.pod_name(j)),
            format!(
                "{} declares no {} port named {:?}: nothing can listen there, so the cell is denied",
                p.pod_name(j),
                probe.protocol,
                probe.port.to_string()
            ),
        ],
    }
}

// --- html ------------------------------------------------------------------------------------

/// Text for HTML element content and quoted attribute values.
fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// JSON safe inside `<script type="application/json">`: no `<` (so no `</script>` or `<!--`),
/// no `>` or `&`, and no U+2028/U+2029, all as `\uXXXX` escapes JSON.parse reads back.
fn script_json(value: &serde_json::Value) -> String {
    let text = value.to_string();
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out
}

/// A word as a POSIX shell reads it: as is when plain, else single-quoted.
fn shell_word(text: &str) -> String {
    if !text.is_empty() && text.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c)) {
        text.to_string()
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}

/// The arguments after `--from X --to Y --port P --protocol T` that make `query` answer the
/// page's cell: the family, the engine and the input.
fn query_options(p: &Picture) -> String {
    let mut out = String::new();
    match p.family {
        Family::Primary => {}
        Family::Ipv4 => out.push_str(" --family ipv4"),
        Family::Ipv6 => out.push_str(" --family ipv6"),
    }
    if p.engine != "evaluator" {
        let _ = write!(out, " --engine {}", shell_word(p.engine));
    }
    for word in p.input_args {
        let _ = write!(out, " {}", shell_word(word));
    }
    out
}

const STYLE: &str = "
body{font-family:system-ui,sans-serif;margin:1em;color:#1d2430;background:#fff}
h1{font-size:1.3em;margin:0 0 .3em}
h2{font-size:1.05em;margin:1.2em 0 .4em}
.layout{display:flex;gap:1.5em;align-items:flex-start}
.maps{flex:1 1 auto;min-width:0;overflow:auto}
#panel{flex:0 0 40%;position:sticky;top:0;max-height:100vh;overflow:auto;border:1px solid #c5ccd6;border-radius:6px;padding:.6em .8em;background:#f7f9fc}
#explanation{white-space:pre-wrap;font:12px/1.4 ui-monospace,monospace;margin:.4em 0}
#query-command{font:12px ui-monospace,monospace;word-break:break-all}
.legend span{display:inline-block;margin-right:1.2em}
.sw{display:inline-block;width:12px;height:12px;vertical-align:middle;margin-right:.3em;border:1px solid #888}
table.heat{border-collapse:collapse;font-size:11px}
table.heat td{width:18px;height:18px;padding:0;border:1px solid #fff;cursor:pointer;text-align:center;color:#fff;font-size:10px}
table.heat td.a,.sw.a{background:#3a9d5d}
table.heat td.d,.sw.d{background:#d64541}
table.heat td.sel{outline:3px solid #1d2430;outline-offset:-2px}
table.heat th{font-weight:normal;white-space:nowrap;padding:0 4px;text-align:right}
table.heat thead th{writing-mode:vertical-rl;transform:rotate(180deg);text-align:left;padding:4px 0;vertical-align:bottom}
table.heat col.ns{border-left:2px solid #1d2430}
table.heat tr.ns th,table.heat tr.ns td{border-top:2px solid #1d2430}
table.overview td{padding:2px 8px;text-align:center;border:1px solid #fff}
table.overview th{font-weight:normal;padding:2px 6px;text-align:right}
.note{color:#5a6472;font-size:.9em}
";

/// Shows the clicked cell's explanation: event delegation on each heat map, data from the
/// JSON block, text through `textContent` only (never parsed as HTML).
const SCRIPT: &str = r#"
(function () {
  var data = JSON.parse(document.getElementById("netpol-data").textContent);
  var n = data.pods.length, selected = null;
  var title = document.getElementById("cell"), text = document.getElementById("explanation");
  var command = document.getElementById("query-command");
  // As shell_word in picture.rs: plain words as they are, others single-quoted.
  function word(text) {
    return /^[A-Za-z0-9_.\/=:,@%+-]+$/.test(text) ? text : "'" + text.replace(/'/g, "'\\''") + "'";
  }
  function show(k, i, j, td) {
    if (selected) selected.classList.remove("sel");
    selected = td; td.classList.add("sel");
    var probe = data.probes[k];
    title.textContent = data.pods[i] + " \u2192 " + data.pods[j] + "  " + probe.protocol + "/" + probe.port;
    command.textContent = "netpol-check query --from " + word(data.pods[i]) + " --to " + word(data.pods[j]) +
      " --port " + word(probe.port) + " --protocol " + probe.protocol + data.queryOptions;
    if (data.cells) {
      text.textContent = data.cells[k][i * n + j].map(function (l) { return data.lines[l]; }).join("\n");
    } else {
      text.textContent = "(not embedded: the page has more than " + data.explainedCellsMax +
        " cells; run the command below)";
    }
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.heat"), function (table) {
    var k = Number(table.getAttribute("data-probe"));
    table.addEventListener("click", function (event) {
      var td = event.target.closest("td");
      if (!td || !table.contains(td)) return;
      show(k, td.parentElement.rowIndex - 1, td.cellIndex - 1, td);
    });
  });
})();
"#;

/// A share of allowed cells as a colour from red (none) to green (all).
fn heat_colour(share: f64) -> String {
    format!("hsl({:.0},55%,{:.0}%)", 120.0 * share, 62.0 + 8.0 * (1.0 - share))
}

/// The page: a namespace overview (share of allowed cells), then one heat map per probe
/// (rows: from, columns: to), and a panel with the clicked cell's explanation, the lines
/// `netpol-check query` prints for it. Self-contained: inline CSS and script, no request.
pub fn write_html(out: &mut impl Write, p: &Picture) -> io::Result<()> {
    let n = p.pods.len();
    let cells = n * n * p.probes.len();
    let explanations = (cells <= EXPLAINED_CELLS_MAX).then(|| Explanations::new(p));
    let pods: Vec<String> = (0..n).map(|i| p.pod_name(i)).collect();
    let runs = p.namespace_runs();

    writeln!(out, "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">")?;
    writeln!(out, "<title>netpol-check matrix ({})</title>", html_escape(p.engine))?;
    writeln!(out, "<style>{STYLE}</style>\n</head>\n<body>")?;
    writeln!(out, "<h1>Reachability matrix</h1>")?;
    let family = match p.family {
        Family::Primary => "each destination's primary address family",
        Family::Ipv4 => "IPv4",
        Family::Ipv6 => "IPv6",
    };
    writeln!(
        out,
        "<p>engine: {} &middot; {n} pods &middot; {} probes &middot; {family} &middot; rows: from, columns: to</p>",
        html_escape(p.engine),
        p.probes.len()
    )?;
    writeln!(
        out,
        "<p class=\"legend\"><span><i class=\"sw a\"></i>allowed</span><span><i class=\"sw d\"></i>denied (X)</span>\
         <span>click a cell for the verdict and its reasons</span></p>"
    )?;
    if explanations.is_none() {
        writeln!(
            out,
            "<p class=\"note\">{cells} cells: explanations are embedded up to {EXPLAINED_CELLS_MAX} cells only; \
             the panel shows the <code>netpol-check query</code> command for a cell instead.</p>"
        )?;
    }
    writeln!(out, "<div class=\"layout\">\n<div class=\"maps\">")?;
    write_overview(out, p, &runs)?;
    for (k, (probe, m)) in p.probes.iter().enumerate() {
        let allowed: usize = (0..n).map(|i| m.row(i).count()).sum();
        writeln!(out, "<h2>{}   ({allowed} of {} allowed)</h2>", html_escape(&probe.to_string()), n * n)?;
        writeln!(out, "<table class=\"heat\" id=\"probe-{k}\" data-probe=\"{k}\">")?;
        // The first column of each namespace has a left border: where the namespace starts.
        write!(out, "<colgroup><col>")?;
        for (_, _, len) in &runs {
            write!(out, "<col class=\"ns\">")?;
            if *len > 1 {
                write!(out, "<col span=\"{}\">", len - 1)?;
            }
        }
        writeln!(out, "</colgroup>")?;
        write!(out, "<thead><tr><th></th>")?;
        for name in &pods {
            write!(out, "<th scope=\"col\" title=\"{0}\">{0}</th>", html_escape(name))?;
        }
        writeln!(out, "</tr></thead>\n<tbody>")?;
        let mut line = String::with_capacity(n * 14 + 64);
        for (i, name) in pods.iter().enumerate() {
            line.clear();
            let first_of_namespace = runs.iter().any(|&(_, first, _)| first == i);
            line.push_str(if first_of_namespace { "<tr class=\"ns\">" } else { "<tr>" });
            let _ = write!(line, "<th scope=\"row\">{}</th>", html_escape(name));
            for j in 0..n {
                line.push_str(if m.get(i, j) { "<td class=a></td>" } else { "<td class=d>X</td>" });
            }
            line.push_str("</tr>\n");
            out.write_all(line.as_bytes())?;
        }
        writeln!(out, "</tbody></table>")?;
    }
    writeln!(out, "</div>")?;
    writeln!(
        out,
        "<aside id=\"panel\"><strong id=\"cell\">No cell selected</strong>\n\
         <pre id=\"explanation\">Click a cell of a heat map.</pre>\n\
         <p class=\"note\">The same answer on the command line:<br><code id=\"query-command\"></code></p></aside>"
    )?;
    writeln!(out, "</div>")?;

    let probes: Vec<serde_json::Value> = p
        .probes
        .iter()
        .map(|(probe, _)| {
            let port = match &probe.port {
                ProbePort::Number(n) => n.to_string(),
                ProbePort::Named(name) => name.clone(),
            };
            serde_json::json!({"port": port, "protocol": probe.protocol.as_str()})
        })
        .collect();
    let data = serde_json::json!({
        "engine": p.engine,
        "pods": pods,
        "probes": probes,
        "queryOptions": query_options(p),
        "explainedCellsMax": EXPLAINED_CELLS_MAX,
        "lines": explanations.as_ref().map(|e| &e.lines),
        "cells": explanations.as_ref().map(|e| &e.cells),
    });
    writeln!(out, "<script type=\"application/json\" id=\"netpol-data\">{}</script>", script_json(&data))?;
    writeln!(out, "<script>{SCRIPT}</script>\n</body>\n</html>")
}

/// Namespace × namespace: the share of allowed cells over every probe, as a colour.
fn write_overview(out: &mut impl Write, p: &Picture, runs: &[(&str, usize, usize)]) -> io::Result<()> {
    if p.probes.is_empty() || runs.is_empty() {
        return Ok(());
    }
    writeln!(out, "<h2>Namespaces: share of allowed cells, all probes</h2>\n<table class=\"overview\">")?;
    write!(out, "<tr><th>from \\ to</th>")?;
    for (ns, _, _) in runs {
        write!(out, "<th>{}</th>", html_escape(ns))?;
    }
    writeln!(out, "</tr>")?;
    for &(from, fi, flen) in runs {
        write!(out, "<tr><th>{}</th>", html_escape(from))?;
        for &(_, ti, tlen) in runs {
            let total = flen * tlen * p.probes.len();
            let allowed: usize = p
                .probes
                .iter()
                .map(|(_, m)| (fi..fi + flen).map(|i| (ti..ti + tlen).filter(|&j| m.get(i, j)).count()).sum::<usize>())
                .sum();
            let share = allowed as f64 / total as f64;
            write!(
                out,
                "<td style=\"background:{}\" title=\"{allowed} of {total} allowed\">{:.0}%</td>",
                heat_colour(share),
                share * 100.0
            )?;
        }
        writeln!(out, "</tr>")?;
    }
    writeln!(out, "</table>")
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::sync::Arc;

    use super::*;
    use crate::policy::model::{ContainerPort, ObjectRef, Pod, PodIps, Policy, Protocol, Rule};
    use crate::policy::selector::Selector;

    const HOSTILE: &str = "</script><script>window.pwned=1</script><img src=x onerror=alert(1)>\"'&\\\n\u{2028}";

    fn pod(namespace: &str, name: &str, ip: [u8; 4], labels: &[(&str, &str)]) -> Pod {
        Pod {
            id: ObjectRef::new(namespace, name),
            labels: Arc::new(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            node: "node-a".into(),
            ips: PodIps::from(IpAddr::from(ip)),
            host_network: false,
            ports: Arc::new([ContainerPort { name: Some("http".into()), port: 80, protocol: Protocol::Tcp }]),
        }
    }

    /// `shop/db` admits only pods labelled `role=<HOSTILE>`; `shop/web` and `other/x` are open.
    fn hostile_cluster() -> Cluster {
        let policy = Policy {
            id: ObjectRef::new("shop", format!("db-{HOSTILE}")),
            pod_selector: Selector::from_labels([("app", "db")]),
            ingress: Some(vec![Rule {
                peers: Some(vec![crate::policy::model::Peer::Pods {
                    namespaces: crate::policy::model::NamespaceScope::PolicyNamespace,
                    pods: Selector::from_labels([("role", HOSTILE)]),
                }]),
                ports: None,
            }]),
            egress: None,
            quarantined: None,
        };
        Cluster::new(
            Vec::new(),
            [
                pod("shop", "db", [10, 0, 0, 1], &[("app", "db")]),
                pod("shop", "web", [10, 0, 0, 2], &[("app", "web")]),
                pod("other", "x", [10, 0, 0, 3], &[]),
            ],
            [policy],
        )
    }

    fn probes(cluster: &Cluster) -> Vec<(Probe, BitMatrix)> {
        [ProbePort::Number(80), ProbePort::Named("metrics".into())]
            .into_iter()
            .map(|port| {
                let probe = Probe { port, protocol: Protocol::Tcp };
                let m = matrix::reference_matrix(cluster, &probe, Family::Primary);
                (probe, m)
            })
            .collect()
    }

    fn render(cluster: &Cluster, write: fn(&mut Vec<u8>, &Picture) -> io::Result<()>) -> String {
        let pods: Vec<usize> = (0..cluster.pods.len()).collect();
        let probes = probes(cluster);
        let input_args = vec!["-f".to_string(), "my dir/it's.yaml".to_string()];
        let picture = Picture {
            cluster,
            engine: "evaluator",
            family: Family::Primary,
            pods: &pods,
            probes: &probes,
            input_args: &input_args,
        };
        let mut out = Vec::new();
        write(&mut out, &picture).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn data_block(html: &str) -> serde_json::Value {
        let start = html.find("id=\"netpol-data\">").unwrap() + "id=\"netpol-data\">".len();
        let end = start + html[start..].find("</script>").unwrap();
        serde_json::from_str(&html[start..end]).unwrap()
    }

    #[test]
    fn the_dot_graph_has_a_cluster_per_namespace_and_an_edge_per_allowed_pair_but_none_to_itself() {
        let cluster = hostile_cluster();
        let dot = render(&cluster, write_dot);
        assert!(dot.contains("subgraph \"cluster_other\" {"), "{dot}");
        assert!(dot.contains("subgraph \"cluster_shop\" {"), "{dot}");
        // Nobody carries the hostile role, so nobody reaches shop/db; the rest is open on
        // TCP/80 (every pod declares it) and closed on the name nobody declares.
        let edges: Vec<&str> = dot.lines().filter(|l| l.contains(" -> ")).collect();
        assert_eq!(
            edges,
            [
                "  \"other/x\" -> \"shop/web\" [label=\"TCP/80\"];",
                "  \"shop/db\" -> \"other/x\" [label=\"TCP/80\"];",
                "  \"shop/db\" -> \"shop/web\" [label=\"TCP/80\"];",
                "  \"shop/web\" -> \"other/x\" [label=\"TCP/80\"];",
            ]
        );
    }

    #[test]
    fn dot_strings_escape_quotes_backslashes_and_line_breaks() {
        assert_eq!(dot_quote("a\"b\\c\nd"), "\"a\\\"b\\\\c\\nd\"");
        assert_eq!(dot_quote("tenant-a/web.v1"), "\"tenant-a/web.v1\"");
    }

    #[test]
    fn hostile_names_reach_the_page_only_escaped() {
        let html = render(&hostile_cluster(), write_html);
        // The page's own two script blocks close; nothing from the input opens or closes one.
        assert_eq!(html.matches("<script").count(), 2, "{html}");
        assert_eq!(html.matches("</script>").count(), 2, "{html}");
        assert!(!html.contains("<img"));
        assert!(!html.contains('\u{2028}'));
        // ... and what the data block carries reads back exactly.
        let data = data_block(&html);
        let lines: Vec<&str> = data["lines"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
        assert!(lines.iter().any(|l| l.contains(&format!("shop/db-{HOSTILE}"))), "{lines:?}");
        assert!(lines.iter().any(|l| l.contains(&format!("role={HOSTILE}"))), "{lines:?}");
        assert_eq!(data["queryOptions"], " -f 'my dir/it'\\''s.yaml'");
        // Names in headers and titles are HTML-escaped text.
        let named = Cluster::new(Vec::new(), [pod("n&s", "<b>bold</b>", [10, 0, 0, 9], &[])], Vec::<Policy>::new());
        let html = render(&named, write_html);
        assert!(!html.contains("<b>"), "{html}");
        assert!(
            html.contains("title=\"n&amp;s/&lt;b&gt;bold&lt;/b&gt;\">n&amp;s/&lt;b&gt;bold&lt;/b&gt;</th>"),
            "{html}"
        );
    }

    #[test]
    fn each_embedded_cell_reads_as_the_lines_query_prints() {
        let cluster = hostile_cluster();
        let html = render(&cluster, write_html);
        let data = data_block(&html);
        let lines = data["lines"].as_array().unwrap();
        let cell = |k: usize, i: usize, j: usize| -> Vec<String> {
            data["cells"][k][i * 3 + j]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| lines[l.as_u64().unwrap() as usize].as_str().unwrap().to_string())
                .collect()
        };
        // Pods sort as other/x, shop/db, shop/web: web -> db on TCP/80 is denied.
        let conn = crate::cli::query::connection(&cluster, "shop/web", "shop/db", "80", Protocol::Tcp, Family::Primary)
            .unwrap();
        let verdict = evaluate::evaluate(&cluster, &conn);
        assert!(!verdict.allowed);
        assert_eq!(cell(0, 2, 1), report::describe_verdict(&cluster, &conn, &verdict));
        // A named port nobody declares: the matrix denies, and says why.
        assert_eq!(
            cell(1, 0, 2),
            [
                "DENIED  other/x -> shop/web TCP/metrics",
                "shop/web declares no TCP port named \"metrics\": nothing can listen there, so the cell is denied",
            ]
        );
    }

    #[test]
    fn a_page_with_too_many_cells_embeds_no_explanations_and_says_so() {
        let n = 400; // 400² = 160 000 cells on one probe
        let pods: Vec<Pod> =
            (0..n).map(|k| pod("big", &format!("p{k:03}"), [10, 1, (k / 256) as u8, (k % 256) as u8], &[])).collect();
        let cluster = Cluster::new(Vec::new(), pods, Vec::<Policy>::new());
        let probe = Probe { port: ProbePort::Number(80), protocol: Protocol::Tcp };
        let probes = vec![(probe.clone(), matrix::reference_matrix(&cluster, &probe, Family::Primary))];
        let all: Vec<usize> = (0..n).collect();
        let picture = Picture {
            cluster: &cluster,
            engine: "evaluator",
            family: Family::Primary,
            pods: &all,
            probes: &probes,
            input_args: &[],
        };
        let mut out = Vec::new();
        write_html(&mut out, &picture).unwrap();
        let html = String::from_utf8(out).unwrap();
        assert!(html.contains("explanations are embedded up to 100000 cells only"));
        let data = data_block(&html);
        assert!(data["cells"].is_null() && data["lines"].is_null());
        assert_eq!(html.matches("<td class=a></td>").count(), n * n);
    }
}
