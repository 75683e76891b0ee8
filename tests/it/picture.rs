//! `matrix -o dot` and `matrix -o html` from the real binary. The graph parses back to the
//! matrix and renders with Graphviz; the page, opened in a real headless Chromium driven
//! over WebDriver, shows for a clicked cell exactly what `netpol-check query` prints.
//!
//! Needs `dot` (graphviz) and `chromium` + `chromedriver` (Debian's packages; scripts/test.sh
//! installs them). Without them the test says so and passes as skipped, except under
//! `CI=true`, where it fails. Each page test leaves a screenshot in
//! `target/tmp/netpol-check-html/` and prints its path.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common;

const FOUNDING: &str = "policy-examples/frontend-backend";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn netpol_check(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_netpol-check")).current_dir(repo()).args(args).output().expect("run netpol-check")
}

/// `program` on PATH, or a skip (a failure under CI=true) naming the package to install.
fn find_or_skip(program: &str, package: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).map(|dir| dir.join(program)).find(|p| p.is_file()));
    if found.is_none() {
        common::skip(&format!("this test needs {program} (apt-get install -y {package})"));
    }
    found
}

/// Where the page tests leave their screenshots: `target/tmp/netpol-check-html/`.
fn screenshot_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("netpol-check-html");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// --- dot -------------------------------------------------------------------------------------

/// The edges of a DOT graph as this crate writes them: `"from" -> "to" [label="..."];`.
fn parse_edges(dot: &str) -> BTreeMap<(String, String), Vec<String>> {
    let mut edges = BTreeMap::new();
    for line in dot.lines().map(str::trim).filter(|l| l.contains("\" -> \"")) {
        let rest = line.strip_prefix('"').unwrap();
        let (from, rest) = rest.split_once("\" -> \"").unwrap();
        let (to, rest) = rest.split_once("\" [label=\"").unwrap();
        let label = rest.strip_suffix("\"];").unwrap_or_else(|| panic!("an edge line ends with \"];: {line}"));
        let probes = label.split(", ").map(str::to_string).collect();
        assert!(edges.insert((from.to_string(), to.to_string()), probes).is_none(), "one edge per pair: {line}");
    }
    edges
}

/// The JSON matrix as `(from, to) -> ["TCP/80", ...]`: the probes allowing each pair.
fn allowed_pairs(matrix: &Value) -> BTreeMap<(String, String), Vec<String>> {
    let pods: Vec<&str> = matrix["pods"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    let mut out: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for probe in matrix["probes"].as_array().unwrap() {
        let port = match &probe["port"] {
            Value::String(name) => name.clone(),
            n => n.to_string(),
        };
        let name = format!("{}/{port}", probe["protocol"].as_str().unwrap());
        for (i, row) in probe["allowed"].as_array().unwrap().iter().enumerate() {
            for (j, cell) in row.as_array().unwrap().iter().enumerate() {
                if cell.as_bool().unwrap() && i != j {
                    out.entry((pods[i].to_string(), pods[j].to_string())).or_default().push(name.clone());
                }
            }
        }
    }
    out
}

#[test]
fn the_dot_graph_has_an_edge_exactly_where_the_matrix_allows_two_pods_to_connect() {
    for example in [FOUNDING, "policy-examples/tier-tenant-isolation", "policy-examples/named-ports-per-pod"] {
        let json = netpol_check(&["matrix", "-o", "json", "-f", example]);
        let dot = netpol_check(&["matrix", "-o", "dot", "-f", example]);
        assert_eq!(dot.status.code(), Some(0), "{}", String::from_utf8_lossy(&dot.stderr));
        let matrix: Value = serde_json::from_slice(&json.stdout).unwrap();
        let dot = String::from_utf8(dot.stdout).unwrap();
        assert_eq!(parse_edges(&dot), allowed_pairs(&matrix), "{example}:\n{dot}");
        // Each pod is a node inside its namespace's cluster, once.
        for pod in matrix["pods"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()) {
            let (ns, name) = pod.split_once('/').unwrap();
            let cluster = dot.find(&format!("subgraph \"cluster_{ns}\" {{")).unwrap();
            let node = dot.find(&format!("    \"{pod}\" [label=\"{name}\"];")).unwrap();
            let cluster_end = cluster + dot[cluster..].find("\n  }").unwrap();
            assert!(cluster < node && node < cluster_end, "{pod} drawn inside cluster_{ns}");
            assert_eq!(dot.matches(&format!("\n    \"{pod}\" [label=")).count(), 1);
        }
    }
}

#[test]
fn graphviz_renders_the_graph_with_a_box_per_namespace_and_an_arrow_per_edge() {
    let Some(dot_program) = find_or_skip("dot", "graphviz") else { return };
    let dot = netpol_check(&["matrix", "-o", "dot", "-f", FOUNDING]).stdout;
    let edges = parse_edges(std::str::from_utf8(&dot).unwrap()).len();
    let mut render =
        Command::new(dot_program).arg("-Tsvg").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    render.stdin.take().unwrap().write_all(&dot).unwrap();
    let svg = render.wait_with_output().unwrap();
    assert!(svg.status.success(), "{}", String::from_utf8_lossy(&svg.stderr));
    let svg = String::from_utf8(svg.stdout).unwrap();
    assert_eq!(svg.matches("class=\"cluster\"").count(), 2, "tenant-a and tenant-b");
    assert_eq!(svg.matches("class=\"edge\"").count(), edges);
    assert_eq!(svg.matches("class=\"node\"").count(), 5);
}

// --- WebDriver -------------------------------------------------------------------------------

/// One HTTP/1.1 exchange with the driver on 127.0.0.1: the status and the body as JSON.
/// chromedriver keeps the connection open whatever `Connection: close` says, so the body is
/// read to its `Content-Length` (or to the last chunk), not to the end of the stream.
fn http(port: u16, method: &str, path: &str, body: Option<&Value>) -> std::io::Result<(u16, Value)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let body = body.map(Value::to_string).unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
         Content-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string());
    let mut raw = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    let complete = |raw: &[u8]| -> Option<usize> {
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
        let content = &raw[split + 4..];
        let length = head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok());
        match length {
            Some(length) => (content.len() >= length).then_some(split),
            None if head.contains("transfer-encoding: chunked") => content.ends_with(b"0\r\n\r\n").then_some(split),
            None => None,
        }
    };
    let split = loop {
        if let Some(split) = complete(&raw) {
            break split;
        }
        let read = stream.read(&mut chunk)?;
        if read == 0 {
            break raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| bad("no end of headers"))?;
        }
        raw.extend_from_slice(&chunk[..read]);
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status: u16 =
        head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| bad("no status code"))?;
    let mut content = raw[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        content = dechunk(&content).ok_or_else(|| bad("bad chunked body"))?;
    }
    let value = if content.is_empty() { Value::Null } else { serde_json::from_slice(&content)? };
    Ok((status, value))
}

/// A chunked HTTP body, joined.
fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

/// A standard base64 decoder: WebDriver screenshots come as base64 PNG.
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a') as u32 + 26,
            b'0'..=b'9' => (c - b'0') as u32 + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let bytes: Vec<u8> = text.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (k, &c) in chunk.iter().enumerate() {
            acc |= value(c) << (18 - 6 * k);
        }
        out.extend_from_slice(&acc.to_be_bytes()[1..chunk.len()]);
    }
    out
}

/// A chromedriver process and its Chromium session. Dropping it, on every exit path (a
/// failed assertion included), ends the session (Chromium quits), then kills chromedriver's
/// whole process group: whatever it started goes with it.
struct Browser {
    driver: Child,
    port: u16,
    session: String,
    _profile: tempfile::TempDir,
}

/// The W3C WebDriver key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    fn start(chromedriver: &Path, chromium: &Path) -> Browser {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let profile = tempfile::tempdir().unwrap();
        let log = profile.path().join("chromedriver.log");
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start chromedriver");
        // The guard exists before any wait, so a driver that never answers is killed too.
        let mut browser = Browser { driver, port, session: String::new(), _profile: profile };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, status)) = http(port, "GET", "/status", None)
                && status["value"]["ready"] == true
            {
                break;
            }
            if let Ok(Some(exit)) = browser.driver.try_wait() {
                panic!("chromedriver exited with {exit}: {}", std::fs::read_to_string(&log).unwrap_or_default());
            }
            assert!(Instant::now() < deadline, "chromedriver not ready within 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile_dir = browser._profile.path().join("chromium-profile");
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium.display().to_string(),
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1280,900",
                    format!("--user-data-dir={}", profile_dir.display()),
                ],
            },
        }}});
        let session = browser.call("POST", "/session", Some(&capabilities));
        browser.session = session["sessionId"].as_str().expect("a session id").to_string();
        browser
    }

    /// A WebDriver command; its `value`, or a panic with the driver's error.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let (status, reply) =
            http(self.port, method, path, body).unwrap_or_else(|e| panic!("{method} {path}: no answer: {e}"));
        assert_eq!(status, 200, "{method} {path}: {reply}");
        reply["value"].clone()
    }

    fn session_call(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    fn open(&self, page: &Path) {
        self.session_call("POST", "/url", Some(&json!({"url": format!("file://{}", page.display())})));
    }

    fn element(&self, css: &str) -> String {
        let found = self.session_call("POST", "/element", Some(&json!({"using": "css selector", "value": css})));
        found[ELEMENT].as_str().unwrap_or_else(|| panic!("no element {css}: {found}")).to_string()
    }

    fn count(&self, css: &str) -> usize {
        let found = self.session_call("POST", "/elements", Some(&json!({"using": "css selector", "value": css})));
        found.as_array().unwrap().len()
    }

    fn click(&self, element: &str) {
        self.session_call("POST", &format!("/element/{element}/click"), Some(&json!({})));
    }

    fn text(&self, element: &str) -> String {
        self.session_call("GET", &format!("/element/{element}/text"), None).as_str().unwrap().to_string()
    }

    fn attribute(&self, element: &str, name: &str) -> Value {
        self.session_call("GET", &format!("/element/{element}/attribute/{name}"), None)
    }

    fn script(&self, source: &str) -> Value {
        self.session_call("POST", "/execute/sync", Some(&json!({"script": source, "args": []})))
    }

    /// Saves the viewport as a PNG under `screenshot_dir()`, prints and returns its path.
    fn screenshot(&self, name: &str) -> PathBuf {
        let png = base64_decode(self.session_call("GET", "/screenshot", None).as_str().unwrap());
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
        let (width, height) =
            (u32::from_be_bytes(png[16..20].try_into().unwrap()), u32::from_be_bytes(png[20..24].try_into().unwrap()));
        assert!(width >= 800 && height >= 600, "the window's size, not an empty image: {width}x{height}");
        let path = screenshot_dir().join(format!("{name}.png"));
        std::fs::write(&path, &png).unwrap();
        println!("screenshot: {} ({width}x{height}, {} bytes)", path.display(), png.len());
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = http(self.port, "DELETE", &format!("/session/{}", self.session), None);
        }
        // chromedriver leads its own process group (process_group(0)): the group's id is its pid.
        let group = nix::unistd::Pid::from_raw(-(self.driver.id() as i32));
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn browser_or_skip() -> Option<Browser> {
    let chromium = find_or_skip("chromium", "chromium")?;
    let chromedriver = find_or_skip("chromedriver", "chromium-driver")?;
    Some(Browser::start(&chromedriver, &chromium))
}

/// The CSS selector of cell (from `i`, to `j`) of heat map `k`: row `i` of the body, and
/// the `j`th data cell after the row's header.
fn cell_selector(k: usize, i: usize, j: usize) -> String {
    format!("#probe-{k} tbody tr:nth-child({}) td:nth-child({})", i + 1, j + 2)
}

#[test]
fn clicking_a_cell_of_the_page_shows_what_query_prints_for_it() {
    let Some(browser) = browser_or_skip() else { return };
    let page_dir = tempfile::tempdir().unwrap();
    let page = page_dir.path().join("frontend-backend.html");
    let html = netpol_check(&["matrix", "-o", "html", "-f", FOUNDING]);
    assert_eq!(html.status.code(), Some(0), "{}", String::from_utf8_lossy(&html.stderr));
    std::fs::write(&page, &html.stdout).unwrap();
    let matrix: Value =
        serde_json::from_slice(&netpol_check(&["matrix", "-o", "json", "-f", FOUNDING]).stdout).unwrap();
    let pods: Vec<&str> = matrix["pods"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    browser.open(&page);

    // Every cell has its matrix's colour.
    for (k, probe) in matrix["probes"].as_array().unwrap().iter().enumerate() {
        let allowed = probe["allowed"].as_array().unwrap();
        let count = |v: bool| allowed.iter().flat_map(|r| r.as_array().unwrap()).filter(|c| **c == v).count();
        assert_eq!(browser.count(&format!("#probe-{k} td.a")), count(true));
        assert_eq!(browser.count(&format!("#probe-{k} td.d")), count(false));
    }

    // A denied cell and an allowed one, each clicked for real, each checked against `query`.
    let first = |k: usize, wanted: bool| -> (usize, usize) {
        let rows = matrix["probes"][k]["allowed"].as_array().unwrap();
        (0..pods.len() * pods.len())
            .map(|c| (c / pods.len(), c % pods.len()))
            .find(|&(i, j)| rows[i][j] == wanted && i != j)
            .unwrap()
    };
    for (k, wanted) in [(0, false), (1, true)] {
        let (i, j) = first(k, wanted);
        let probe = &matrix["probes"][k];
        let port = match &probe["port"] {
            Value::String(s) => s.clone(),
            n => n.to_string(),
        };
        let cell = browser.element(&cell_selector(k, i, j));
        assert_eq!(browser.attribute(&cell, "class"), if wanted { "a" } else { "d" });
        browser.click(&cell);
        let shown = browser.text(&browser.element("#explanation"));
        let query = netpol_check(&[
            "query",
            "--from",
            pods[i],
            "--to",
            pods[j],
            "--port",
            &port,
            "--protocol",
            probe["protocol"].as_str().unwrap(),
            "-f",
            FOUNDING,
        ]);
        assert_eq!(query.status.code(), Some(if wanted { 0 } else { 1 }));
        let printed = String::from_utf8(query.stdout).unwrap();
        assert_eq!(shown.trim_end(), printed.trim_end(), "cell {} -> {} of probe {k}", pods[i], pods[j]);
        assert_eq!(browser.attribute(&cell, "class"), if wanted { "a sel" } else { "d sel" });
        // The command the page shows prints that same answer.
        let command = browser.text(&browser.element("#query-command"));
        let words: Vec<&str> = command.split_whitespace().collect();
        assert_eq!(words[0], "netpol-check", "{command}");
        let rerun = netpol_check(&words[1..]);
        assert_eq!(String::from_utf8(rerun.stdout).unwrap(), printed, "{command}");
        if !wanted {
            browser.screenshot("frontend-backend-denied-cell");
        }
    }
    // Self-contained: the page asked for nothing over the network, or from disk.
    assert_eq!(browser.script("return performance.getEntriesByType('resource').length"), 0);
}

#[test]
fn a_page_of_hostile_names_runs_none_of_them_and_shows_them_as_text() {
    use netpol::cli::picture::{Picture, write_html};
    use netpol::policy::matrix::{Family, Probe, ProbePort, reference_matrix};
    use netpol::policy::model::{Cluster, NamespaceScope, ObjectRef, Peer, Pod, PodIps, Policy, Protocol, Rule};
    use netpol::policy::selector::Selector;
    use std::sync::Arc;

    let Some(browser) = browser_or_skip() else { return };
    // The loader refuses such names and values; the page must not depend on it.
    let hostile = "</script><script>window.pwned=1</script><img src=x onerror=\"window.pwned=2\">'&amp;";
    let pod = |name: &str, ip: [u8; 4], app: &str| Pod {
        id: ObjectRef::new("shop", name),
        labels: Arc::new([("app".to_string(), app.to_string())].into()),
        node: "node-a".into(),
        ips: PodIps::from(std::net::IpAddr::from(ip)),
        host_network: false,
        ports: Arc::new([]),
    };
    let policy = Policy {
        id: ObjectRef::new("shop", format!("db-{hostile}")),
        pod_selector: Selector::from_labels([("app", "db")]),
        ingress: Some(vec![Rule {
            peers: Some(vec![Peer::Pods {
                namespaces: NamespaceScope::PolicyNamespace,
                pods: Selector::from_labels([("role", hostile)]),
            }]),
            ports: None,
        }]),
        egress: None,
        quarantined: None,
    };
    let cluster = Cluster::new(
        Vec::new(),
        [pod("db", [10, 0, 0, 1], "db"), pod(&format!("web{hostile}"), [10, 0, 0, 2], "web")],
        [policy],
    );
    let probe = Probe { port: ProbePort::Number(80), protocol: Protocol::Tcp };
    let probes = vec![(probe.clone(), reference_matrix(&cluster, &probe, Family::Primary))];
    let pods = [0, 1];
    let picture = Picture {
        cluster: &cluster,
        engine: "evaluator",
        family: Family::Primary,
        pods: &pods,
        probes: &probes,
        input_args: &[],
    };
    let mut html = Vec::new();
    write_html(&mut html, &picture).unwrap();
    let page_dir = tempfile::tempdir().unwrap();
    let page = page_dir.path().join("hostile.html");
    std::fs::write(&page, html).unwrap();
    browser.open(&page);
    // web -> db is denied: nobody carries the hostile role.
    let cell = browser.element(&cell_selector(0, 1, 0));
    browser.click(&cell);
    let shown = browser.text(&browser.element("#explanation"));
    assert!(shown.starts_with(&format!("DENIED  shop/web{hostile} -> shop/db TCP/80")), "{shown}");
    assert!(shown.contains(&format!("isolated by shop/db-{hostile}, and no rule matches")), "{shown}");
    assert!(shown.contains(&format!("role={hostile}")), "{shown}");
    let command = browser.text(&browser.element("#query-command"));
    let quoted = format!("'shop/web{}'", hostile.replace('\'', "'\\''"));
    assert!(command.starts_with(&format!("netpol-check query --from {quoted} --to shop/db")), "{command}");
    assert_eq!(browser.script("return typeof window.pwned"), "undefined");
    assert_eq!(browser.count("img"), 0);
    assert_eq!(browser.count("script"), 2, "the page's own two");
    let header = browser.text(&browser.element("#probe-0 tbody tr:nth-child(2) th"));
    assert_eq!(header, format!("shop/web{hostile}"));
    browser.screenshot("hostile-names");
}
