//! An in-process fake Kubernetes API server that speaks the list/watch protocol.
//!
//! It serves Pods, Namespaces, NetworkPolicies and Services (cluster-wide and namespaced
//! paths; the agent does not read Services, `netpol-check --cluster` lists them) over plain
//! HTTP/1.1 on `127.0.0.1:0`, with the parts of the protocol a `kube-runtime`
//! watcher relies on:
//!
//! * list: `*List` with `metadata.resourceVersion`; `limit`/`continue` paging served from a
//!   consistent snapshot (an unknown or compacted continue token is a `410 Expired`). Each
//!   object is serialized once, when stored; lists and watches copy those bytes, and a page
//!   costs O(its items), so serving 100 000 realistic pods stays cheap next to the client;
//! * watch (`watch=1|true`) from a `resourceVersion`: chunked, newline-delimited JSON
//!   `WatchEvent`s (`ADDED`, `MODIFIED`, `DELETED`, `BOOKMARK` when `allowWatchBookmarks`
//!   is set); a `resourceVersion` older than the retained history gets, like the real
//!   apiserver, HTTP 200 and one `ERROR` event carrying a `Status` 410 `Expired`;
//!   `timeoutSeconds` ends the stream cleanly (after a bookmark when bookmarks are on);
//!   `resourceVersion` absent or `"0"` replays the current state as `ADDED` first.
//!
//! Nodes are served as the agent's RBAC allows them: `GET /api/v1/nodes/<name>`, a watch
//! filtered by `fieldSelector=metadata.name=<name>` (the agent's own Node), and a list and
//! watch of all of them (the `nodes` peers of cluster policies).
//!
//! The cluster policy kinds (`policy.networking.k8s.io`: ClusterNetworkPolicy,
//! AdminNetworkPolicy, BaselineAdminNetworkPolicy) are CRDs: each is served only once its
//! "CRD" is installed ([`FakeApiServer::install_crd`], in one version), and answers 404
//! before, like an API server without the CRD. [`FakeApiServer::uninstall_crd`] deletes its
//! objects (a `DELETED` event each, as the CRD's deletion does) and then ends its watches.
//! [`FakeApiServer::set_gone_as_status`] makes a watch from a compacted resourceVersion
//! get HTTP 410 as the response status instead of the `ERROR` event.
//!
//! Test controls change the world and the transport: [`FakeApiServer::apply`],
//! [`FakeApiServer::delete`], [`FakeApiServer::compact`], [`FakeApiServer::expire_watches`],
//! [`FakeApiServer::drop_connections`], [`FakeApiServer::set_latency`],
//! [`FakeApiServer::pause`]/[`FakeApiServer::resume`] (also per resource), and counters of
//! requests served; [`FakeApiServer::forbid`] answers a kind with 403 as RBAC would. Label
//! selectors are ignored, and field selectors but `metadata.name`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures::channel::mpsc;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::{AbortHandle, JoinHandle};

/// The resources the fake serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Pod,
    Namespace,
    NetworkPolicy,
    /// `get` by name and a `watch` with a `metadata.name` field selector (the agent's own
    /// Node), and a list and watch of all nodes.
    Node,
    /// CRDs of `policy.networking.k8s.io`: 404 until installed.
    ClusterNetworkPolicy,
    AdminNetworkPolicy,
    BaselineAdminNetworkPolicy,
    /// Listed by `netpol-check --cluster` (for `svc/...` queries), not watched by the agent.
    Service,
}

/// The API group of the cluster policy CRDs.
const POLICY_GROUP: &str = "policy.networking.k8s.io";

impl Kind {
    /// The listed kinds, in a fixed order.
    pub const ALL: [Kind; 3] = [Kind::Pod, Kind::Namespace, Kind::NetworkPolicy];
    /// The kinds served only while their CRD is installed.
    pub const CRDS: [Kind; 3] =
        [Kind::ClusterNetworkPolicy, Kind::AdminNetworkPolicy, Kind::BaselineAdminNetworkPolicy];

    /// The kind of a k8s-openapi resource type, if the fake serves it.
    pub fn of<K: k8s_openapi::Resource>() -> Option<Kind> {
        Self::from_kind_str(K::KIND)
    }

    fn from_kind_str(kind: &str) -> Option<Kind> {
        match kind {
            "Pod" => Some(Kind::Pod),
            "Namespace" => Some(Kind::Namespace),
            "NetworkPolicy" => Some(Kind::NetworkPolicy),
            "Node" => Some(Kind::Node),
            "ClusterNetworkPolicy" => Some(Kind::ClusterNetworkPolicy),
            "AdminNetworkPolicy" => Some(Kind::AdminNetworkPolicy),
            "BaselineAdminNetworkPolicy" => Some(Kind::BaselineAdminNetworkPolicy),
            "Service" => Some(Kind::Service),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::Node => "Node",
            Kind::ClusterNetworkPolicy => "ClusterNetworkPolicy",
            Kind::AdminNetworkPolicy => "AdminNetworkPolicy",
            Kind::BaselineAdminNetworkPolicy => "BaselineAdminNetworkPolicy",
            Kind::Service => "Service",
        }
    }

    /// The apiVersion served; a CRD kind's is its installed version's (see
    /// [`State::api_version`]).
    fn api_version(self) -> &'static str {
        match self {
            Kind::Pod | Kind::Namespace | Kind::Node | Kind::Service => "v1",
            Kind::NetworkPolicy => "networking.k8s.io/v1",
            Kind::ClusterNetworkPolicy => "policy.networking.k8s.io/v1beta1",
            Kind::AdminNetworkPolicy | Kind::BaselineAdminNetworkPolicy => "policy.networking.k8s.io/v1alpha1",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Kind::Pod => "pods",
            Kind::Namespace => "namespaces",
            Kind::NetworkPolicy => "networkpolicies",
            Kind::Node => "nodes",
            Kind::ClusterNetworkPolicy => "clusternetworkpolicies",
            Kind::AdminNetworkPolicy => "adminnetworkpolicies",
            Kind::BaselineAdminNetworkPolicy => "baselineadminnetworkpolicies",
            Kind::Service => "services",
        }
    }

    fn is_crd(self) -> bool {
        Kind::CRDS.contains(&self)
    }

    fn namespaced(self) -> bool {
        !matches!(self, Kind::Namespace | Kind::Node) && !self.is_crd()
    }

    fn index(self) -> usize {
        match self {
            Kind::Pod => 0,
            Kind::Namespace => 1,
            Kind::NetworkPolicy => 2,
            Kind::Node => 3,
            Kind::ClusterNetworkPolicy => 4,
            Kind::AdminNetworkPolicy => 5,
            Kind::BaselineAdminNetworkPolicy => 6,
            Kind::Service => 7,
        }
    }
}

/// Errors from the test controls.
#[derive(Debug, thiserror::Error)]
pub enum FakeError {
    #[error("object is not JSON-serializable: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error("object kind {0:?} is not served by the fake apiserver")]
    UnknownKind(String),
    #[error("object has no metadata.name")]
    NoName,
    #[error("the CRD of {0} is not installed")]
    NotInstalled(&'static str),
}

type Body = BoxBody<Bytes, std::io::Error>;
type Key = (Kind, String, String);

enum WatchMsg {
    /// One serialized watch event line (with trailing newline) and its resourceVersion.
    Line(u64, Bytes),
    /// Send a bookmark at this resourceVersion if the watch asked for them. Queued under
    /// the state lock, so every earlier event of this watch precedes it.
    Bookmark(u64),
    /// Send a 410 ERROR event and close the stream.
    Expire,
    /// Close the stream cleanly.
    End,
}

struct Subscriber {
    id: u64,
    kind: Kind,
    namespace: Option<String>,
    /// `fieldSelector=metadata.name=<name>`: only this object's events.
    name: Option<String>,
    tx: mpsc::UnboundedSender<WatchMsg>,
}

struct HistoryEvent {
    rv: u64,
    kind: Kind,
    namespace: String,
    name: String,
    line: Bytes,
}

/// Does an object (namespace, name) pass a watch's namespace and name filters?
fn selected(namespace: Option<&str>, name: Option<&str>, object_namespace: &str, object_name: &str) -> bool {
    namespace.is_none_or(|n| n == object_namespace) && name.is_none_or(|n| n == object_name)
}

/// A list being paged: the snapshot taken by its first page (shared handles to the
/// objects' serialized bytes, not copies) and where the next page starts. A page costs
/// O(its own items), whatever follows it.
struct Page {
    rv: u64,
    kind: Kind,
    items: Arc<[Bytes]>,
    next: usize,
}

/// A stored object: its JSON, serialized once when it is stored (every list and watch
/// serves these bytes as they are), and its uid.
struct Stored {
    json: Bytes,
    uid: String,
}

#[derive(Default)]
struct State {
    rv: u64,
    compacted_rv: u64,
    next_id: u64,
    objects: BTreeMap<Key, Stored>,
    history: Vec<HistoryEvent>,
    subscribers: Vec<Subscriber>,
    pages: HashMap<String, Page>,
    /// The installed CRDs, each with the version it serves (`policy.networking.k8s.io/...`).
    crds: HashMap<Kind, String>,
    /// Kinds whose lists and watches are refused with 403 Forbidden (RBAC without them).
    forbidden: HashSet<Kind>,
}

impl State {
    /// The apiVersion `kind` is served in (a CRD kind: as installed).
    fn api_version(&self, kind: Kind) -> String {
        self.crds.get(&kind).cloned().unwrap_or_else(|| kind.api_version().to_string())
    }

    /// Is `kind` served (a CRD kind: installed)?
    fn serves(&self, kind: Kind) -> bool {
        !kind.is_crd() || self.crds.contains_key(&kind)
    }
}

#[derive(Default, Clone)]
struct Pause {
    all: bool,
    kinds: HashSet<Kind>,
    /// Only the reads of one Node by name (GET and a `metadata.name` watch).
    node_reads: bool,
}

impl Pause {
    fn blocks(&self, kind: Kind) -> bool {
        self.all || self.kinds.contains(&kind)
    }

    fn blocks_named(&self, kind: Kind) -> bool {
        self.blocks(kind) || (kind == Kind::Node && self.node_reads)
    }
}

struct Shared {
    state: Mutex<State>,
    latency: Mutex<Duration>,
    pause: tokio::sync::watch::Sender<Pause>,
    /// Answer a watch from a compacted resourceVersion with HTTP 410 instead of 200 and
    /// an `ERROR` event.
    gone_as_status: std::sync::atomic::AtomicBool,
    lists: [AtomicU64; 8],
    watches: [AtomicU64; 8],
    /// Watches with a `metadata.name` field selector.
    named_watches: AtomicU64,
    gets: AtomicU64,
    live_watches: AtomicUsize,
    conns: Mutex<HashMap<u64, AbortHandle>>,
    next_conn: AtomicU64,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn wait_unpaused(&self, kind: Kind) {
        self.wait_unpaused_as(kind, false).await
    }

    /// Waits until `kind` is not paused; `named`: a read of one object by name.
    async fn wait_unpaused_as(&self, kind: Kind, named: bool) {
        let mut rx = self.pause.subscribe();
        // The sender lives as long as `self`, so this only fails if it is gone: then go on.
        let _ = rx.wait_for(|p| if named { !p.blocks_named(kind) } else { !p.blocks(kind) }).await;
    }

    fn latency(&self) -> Duration {
        *self.latency.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The fake API server. Dropping it stops serving and closes every connection.
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.accept.abort();
        // Ends the feeding tasks, which hold `shared` and would otherwise wait for events.
        self.shared.state().subscribers.clear();
        self.abort_connections();
    }
}

impl FakeApiServer {
    /// Binds `127.0.0.1:0` and starts serving. Must run inside a tokio runtime.
    pub async fn start() -> std::io::Result<FakeApiServer> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            latency: Mutex::new(Duration::ZERO),
            pause: tokio::sync::watch::Sender::new(Pause::default()),
            gone_as_status: Default::default(),
            gets: Default::default(),
            named_watches: Default::default(),
            lists: Default::default(),
            watches: Default::default(),
            live_watches: AtomicUsize::new(0),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(FakeApiServer { addr, shared, accept })
    }

    /// The address served.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig (YAML) pointing at this server over plain HTTP, without credentials.
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {url}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            url = self.url()
        )
    }

    /// A `kube::Client` talking to this server.
    pub fn client(&self) -> kube::Client {
        let url = self.url().parse().expect("own URL parses");
        let config = kube::Config::new(url);
        kube::Client::try_from(config).expect("a plain-http kube client builds")
    }

    /// Creates or replaces an object; returns its new resourceVersion.
    /// Installs the CRD of a cluster policy kind, served in its first version
    /// (ClusterNetworkPolicy: v1beta1); see [`FakeApiServer::install_crd_version`].
    pub fn install_crd(&self, kind: Kind) {
        self.install_crd_version(kind, kind.api_version());
    }

    /// Installs the CRD of `kind` serving `api_version` only (`policy.networking.k8s.io/v1alpha2`).
    pub fn install_crd_version(&self, kind: Kind, api_version: &str) {
        assert!(kind.is_crd(), "{kind:?} is no CRD kind");
        self.shared.state().crds.insert(kind, api_version.to_string());
    }

    /// Refuses every list and watch of `kind` with 403 Forbidden, as the API server does
    /// for a user whose RBAC roles do not grant them.
    pub fn forbid(&self, kind: Kind) {
        self.shared.state().forbidden.insert(kind);
    }

    /// Deletes the CRD of `kind`: its objects first (a `DELETED` event each, as the API
    /// server's CRD finalizer does), then its watches end and it answers 404.
    pub fn uninstall_crd(&self, kind: Kind) {
        let names: Vec<String> = {
            let st = self.shared.state();
            st.objects.keys().filter(|k| k.0 == kind).map(|k| k.2.clone()).collect()
        };
        for name in names {
            self.delete(kind, "", &name);
        }
        let mut st = self.shared.state();
        st.crds.remove(&kind);
        for s in st.subscribers.iter().filter(|s| s.kind == kind) {
            let _ = s.tx.unbounded_send(WatchMsg::End);
        }
        st.subscribers.retain(|s| s.kind != kind);
    }

    /// Creates or replaces an object; returns its new resourceVersion.
    pub fn apply<K>(&self, obj: &K) -> Result<u64, FakeError>
    where
        K: k8s_openapi::Resource + serde::Serialize,
    {
        let mut value = serde_json::to_value(obj)?;
        if let Some(map) = value.as_object_mut() {
            map.insert("apiVersion".into(), K::API_VERSION.into());
            map.insert("kind".into(), K::KIND.into());
        }
        self.apply_json(value)
    }

    /// Creates or replaces an object given as JSON (with `kind`); returns its resourceVersion.
    pub fn apply_json(&self, value: Value) -> Result<u64, FakeError> {
        let mut st = self.shared.state();
        store(&mut st, value, true)
    }

    /// Creates or replaces many objects under one lock, for benchmark-sized clusters
    /// (100 000 pods load in about a second instead of piling up watch history). Live
    /// watches see every object, as with [`FakeApiServer::apply_json`], but no history is
    /// kept: it is compacted to the new resourceVersion, so a watch resuming from an older
    /// one relists. Returns the resourceVersion after the last object. On an error, the
    /// objects before the bad one stay applied.
    pub fn apply_bulk(&self, values: impl IntoIterator<Item = Value>) -> Result<u64, FakeError> {
        let mut st = self.shared.state();
        for value in values {
            store(&mut st, value, false)?;
        }
        st.compacted_rv = st.rv;
        st.history.clear();
        st.pages.clear();
        Ok(st.rv)
    }

    /// Deletes an object (namespace `""` for Namespaces); returns the deletion's
    /// resourceVersion, or `None` if there was no such object.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Option<u64> {
        let namespace = if kind.namespaced() { namespace } else { "" };
        let mut st = self.shared.state();
        let stored = st.objects.remove(&(kind, namespace.to_string(), name.to_string()))?;
        st.rv += 1;
        let rv = st.rv;
        let mut value: Value = serde_json::from_slice(&stored.json).expect("stored objects are JSON");
        value["metadata"]["resourceVersion"] = rv.to_string().into();
        let json = serde_json::to_vec(&value).expect("JSON values serialize");
        publish(&mut st, kind, (namespace, name), "DELETED", &json, true);
        Some(rv)
    }

    /// The current (global) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.state().rv
    }

    /// The JSON bytes of the stored objects of a kind, as lists and watches serve them.
    pub fn stored_bytes(&self, kind: Kind) -> usize {
        self.shared.state().objects.iter().filter(|(k, _)| k.0 == kind).map(|(_, o)| o.json.len()).sum()
    }

    /// Number of stored objects of a kind.
    pub fn count(&self, kind: Kind) -> usize {
        self.shared.state().objects.keys().filter(|k| k.0 == kind).count()
    }

    /// Forgets all history (and pending list continuations): a watch from any
    /// resourceVersion older than now gets a 410 `Expired`.
    pub fn compact(&self) {
        let mut st = self.shared.state();
        st.compacted_rv = st.rv;
        st.history.clear();
        st.pages.clear();
    }

    /// From now on (`true`), a watch from a resourceVersion older than the history gets
    /// HTTP 410 Gone as the response status (as proxies and aggregated API servers answer)
    /// instead of HTTP 200 and an `ERROR` event.
    pub fn set_gone_as_status(&self, on: bool) {
        self.shared.gone_as_status.store(on, Ordering::SeqCst);
    }

    /// Ends every live watch with an `ERROR` event carrying a 410 `Expired` Status, as the
    /// apiserver does when a watcher falls too far behind.
    pub fn expire_watches(&self) {
        let mut st = self.shared.state();
        for s in &st.subscribers {
            let _ = s.tx.unbounded_send(WatchMsg::Expire);
        }
        st.subscribers.clear();
    }

    /// Sends a `BOOKMARK` (current resourceVersion) on every live watch that asked for them.
    pub fn bookmark(&self) {
        let st = self.shared.state();
        for s in &st.subscribers {
            let _ = s.tx.unbounded_send(WatchMsg::Bookmark(st.rv));
        }
    }

    /// Closes every client connection abruptly (TCP closed mid-stream, no final chunk).
    pub fn drop_connections(&self) {
        self.shared.state().subscribers.clear();
        self.abort_connections();
    }

    fn abort_connections(&self) {
        let conns: Vec<AbortHandle> =
            self.shared.conns.lock().unwrap_or_else(|e| e.into_inner()).drain().map(|(_, h)| h).collect();
        for c in conns {
            c.abort();
        }
    }

    /// Delays every response (list, and the start of every watch) by `latency`.
    pub fn set_latency(&self, latency: Duration) {
        *self.shared.latency.lock().unwrap_or_else(|e| e.into_inner()) = latency;
    }

    /// Holds every response and every watch event until [`FakeApiServer::resume`].
    pub fn pause(&self) {
        self.shared.pause.send_modify(|p| p.all = true);
    }

    /// Holds responses and watch events of one kind until [`FakeApiServer::resume_kind`].
    pub fn pause_kind(&self, kind: Kind) {
        self.shared.pause.send_modify(|p| {
            p.kinds.insert(kind);
        });
    }

    /// Releases everything held by [`FakeApiServer::pause`] and [`FakeApiServer::pause_kind`].
    pub fn resume(&self) {
        self.shared.pause.send_modify(|p| {
            p.all = false;
            p.kinds.clear();
            p.node_reads = false;
        });
    }

    /// Releases one kind held by [`FakeApiServer::pause_kind`] (a global pause stays).
    pub fn resume_kind(&self, kind: Kind) {
        self.shared.pause.send_modify(|p| {
            p.kinds.remove(&kind);
            p.node_reads &= kind != Kind::Node;
        });
    }

    /// List requests served (answered) for a kind, including continuation pages.
    pub fn list_requests(&self, kind: Kind) -> u64 {
        self.shared.lists[kind.index()].load(Ordering::SeqCst)
    }

    /// GETs of a single object served (found or not).
    pub fn get_requests(&self) -> u64 {
        self.shared.gets.load(Ordering::SeqCst)
    }

    /// Watches of one object by name (`fieldSelector=metadata.name=...`) served.
    pub fn named_watch_requests(&self) -> u64 {
        self.shared.named_watches.load(Ordering::SeqCst)
    }

    /// Holds the reads of a Node by name (the GET and the name-selected watch of the
    /// agent's own Node), not the list and watch of all nodes, until [`FakeApiServer::resume`].
    pub fn pause_node_reads(&self) {
        self.shared.pause.send_modify(|p| p.node_reads = true);
    }

    /// Watch requests served (stream started) for a kind.
    pub fn watch_requests(&self, kind: Kind) -> u64 {
        self.shared.watches[kind.index()].load(Ordering::SeqCst)
    }

    /// Watch streams currently open.
    pub fn live_watches(&self) -> usize {
        self.shared.live_watches.load(Ordering::SeqCst)
    }
}

fn event_line(event_type: &str, object: &Value) -> Bytes {
    event_line_raw(event_type, &serde_json::to_vec(object).expect("JSON values serialize"))
}

/// A watch event line around an object's serialized JSON (no re-serialization).
fn event_line_raw(event_type: &str, object: &[u8]) -> Bytes {
    let mut line = Vec::with_capacity(object.len() + event_type.len() + 24);
    line.extend_from_slice(b"{\"type\":\"");
    line.extend_from_slice(event_type.as_bytes());
    line.extend_from_slice(b"\",\"object\":");
    line.extend_from_slice(object);
    line.extend_from_slice(b"}\n");
    Bytes::from(line)
}

/// Creates or replaces one object (JSON with `kind`) in `st`, publishing its event (and
/// keeping it in history when `keep_history`). Returns the new resourceVersion.
fn store(st: &mut State, mut value: Value, keep_history: bool) -> Result<u64, FakeError> {
    let kind_str = value.get("kind").and_then(Value::as_str).unwrap_or("");
    let kind = Kind::from_kind_str(kind_str).ok_or_else(|| FakeError::UnknownKind(kind_str.into()))?;
    if !st.serves(kind) {
        return Err(FakeError::NotInstalled(kind.as_str()));
    }
    value["apiVersion"] = st.api_version(kind).into();
    let meta_str = |field: &str| value.get("metadata").and_then(|m| m.get(field)).and_then(Value::as_str);
    let name = meta_str("name").filter(|n| !n.is_empty()).ok_or(FakeError::NoName)?.to_string();
    let namespace = if kind.namespaced() {
        meta_str("namespace").filter(|n| !n.is_empty()).unwrap_or("default").to_string()
    } else {
        String::new()
    };
    let given_uid = meta_str("uid").map(str::to_string);
    st.rv += 1;
    let rv = st.rv;
    let key = (kind, namespace.clone(), name.clone());
    let previous_uid = st.objects.get(&key).map(|o| o.uid.clone());
    let event_type = if st.objects.contains_key(&key) { "MODIFIED" } else { "ADDED" };
    let uid = given_uid.or(previous_uid).unwrap_or_else(|| format!("00000000-0000-4000-8000-{rv:012}"));
    if !value["metadata"].is_object() {
        value["metadata"] = json!({});
    }
    value["metadata"]["resourceVersion"] = rv.to_string().into();
    value["metadata"]["uid"] = uid.clone().into();
    if kind.namespaced() {
        value["metadata"]["namespace"] = namespace.clone().into();
    }
    let json = Bytes::from(serde_json::to_vec(&value)?);
    if keep_history || !st.subscribers.is_empty() {
        publish(st, kind, (&namespace, &name), event_type, &json, keep_history);
    }
    st.objects.insert(key, Stored { json, uid });
    Ok(rv)
}

/// Records an event in history and fans it out to matching live watches. Called with the
/// state lock held, so every watch sees events in resourceVersion order without gaps.
fn publish(
    st: &mut State,
    kind: Kind,
    (namespace, name): (&str, &str),
    event_type: &str,
    object: &[u8],
    keep_history: bool,
) {
    let line = event_line_raw(event_type, object);
    if keep_history {
        st.history.push(HistoryEvent {
            rv: st.rv,
            kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
            line: line.clone(),
        });
    }
    let rv = st.rv;
    st.subscribers.retain(|s| {
        if s.kind != kind || !selected(s.namespace.as_deref(), s.name.as_deref(), namespace, name) {
            return true;
        }
        s.tx.unbounded_send(WatchMsg::Line(rv, line.clone())).is_ok()
    });
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        // As the Kubernetes API server (Go's net package) does: without it, a watch event
        // written while the previous one is unacknowledged waits for the client's delayed
        // ACK (Nagle), ~40 ms.
        let _ = stream.set_nodelay(true);
        let id = shared.next_conn.fetch_add(1, Ordering::SeqCst);
        let conn_shared = shared.clone();
        let task = tokio::spawn(async move {
            let service_shared = conn_shared.clone();
            let service = hyper::service::service_fn(move |req| {
                let shared = service_shared.clone();
                async move { Ok::<_, Infallible>(handle(shared, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
            conn_shared.conns.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        });
        shared.conns.lock().unwrap_or_else(|e| e.into_inner()).insert(id, task.abort_handle());
    }
}

fn full(status: StatusCode, body: Value) -> Response<Body> {
    full_bytes(status, Bytes::from(serde_json::to_vec(&body).expect("JSON values serialize")))
}

fn full_bytes(status: StatusCode, bytes: Bytes) -> Response<Body> {
    let mut resp = Response::new(Full::new(bytes).map_err(|e: Infallible| match e {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    resp
}

fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn error(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    full(code, status_json(code.as_u16(), reason, message))
}

/// Which resource (and namespace) a path names.
fn route(path: &str) -> Option<(Kind, Option<String>)> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segs.as_slice() {
        ["api", "v1", "nodes"] => Some((Kind::Node, None)),
        ["api", "v1", "pods"] => Some((Kind::Pod, None)),
        ["api", "v1", "namespaces"] => Some((Kind::Namespace, None)),
        ["api", "v1", "namespaces", ns, "pods"] => Some((Kind::Pod, Some(ns.to_string()))),
        ["api", "v1", "services"] => Some((Kind::Service, None)),
        ["api", "v1", "namespaces", ns, "services"] => Some((Kind::Service, Some(ns.to_string()))),
        ["apis", "networking.k8s.io", "v1", "networkpolicies"] => Some((Kind::NetworkPolicy, None)),
        ["apis", "networking.k8s.io", "v1", "namespaces", ns, "networkpolicies"] => {
            Some((Kind::NetworkPolicy, Some(ns.to_string())))
        }
        ["apis", POLICY_GROUP, _, plural] => Kind::CRDS.into_iter().find(|k| k.plural() == *plural).map(|k| (k, None)),
        _ => None,
    }
}

/// Does the request's path name `kind` in the version it is served in (a CRD kind: the
/// installed one)?
fn served_at(st: &State, kind: Kind, path: &str) -> bool {
    if !kind.is_crd() {
        return true;
    }
    st.crds.get(&kind).is_some_and(|v| path.trim_matches('/').starts_with(&format!("apis/{v}/")))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(hi), Some(lo)) => {
                        out.push((hi * 16 + lo) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn truthy(v: Option<&String>) -> bool {
    matches!(v.map(String::as_str), Some("1" | "true"))
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET {
        return error(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "the fake apiserver serves only GET");
    }
    if req.uri().path() == "/version" {
        return full(
            StatusCode::OK,
            json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-fake", "platform": "linux/amd64"}),
        );
    }
    if let Some(name) = req.uri().path().strip_prefix("/api/v1/nodes/").filter(|n| !n.is_empty() && !n.contains('/')) {
        let name = percent_decode(name);
        let latency = shared.latency();
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        shared.wait_unpaused_as(Kind::Node, true).await;
        shared.gets.fetch_add(1, Ordering::SeqCst);
        let object = shared.state().objects.get(&(Kind::Node, String::new(), name.clone())).map(|o| o.json.clone());
        return match object {
            Some(node) => full_bytes(StatusCode::OK, node),
            None => error(StatusCode::NOT_FOUND, "NotFound", &format!("nodes \"{name}\" not found")),
        };
    }
    let route = route(req.uri().path()).filter(|(kind, _)| served_at(&shared.state(), *kind, req.uri().path()));
    let Some((kind, namespace)) = route else {
        return error(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("the server could not find the requested resource ({})", req.uri().path()),
        );
    };
    if shared.state().forbidden.contains(&kind) {
        let group = req.uri().path().strip_prefix("/apis/").and_then(|p| p.split('/').next()).unwrap_or("");
        let message = format!(
            "{} is forbidden: User \"system:anonymous\" cannot list resource \"{}\" in API group \"{group}\" at the cluster scope",
            kind.plural(),
            kind.plural()
        );
        return error(StatusCode::FORBIDDEN, "Forbidden", &message);
    }
    let q = query(&req);
    let latency = shared.latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let named = q.get("fieldSelector").is_some_and(|f| f.starts_with("metadata.name="));
    shared.wait_unpaused_as(kind, named).await;
    if truthy(q.get("watch")) {
        if named {
            shared.named_watches.fetch_add(1, Ordering::SeqCst);
        }
        watch(shared, kind, namespace, &q)
    } else {
        list(&shared, kind, namespace, &q)
    }
}

fn list(shared: &Shared, kind: Kind, namespace: Option<String>, q: &HashMap<String, String>) -> Response<Body> {
    let limit = q.get("limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0);
    let mut st = shared.state();
    let (rv, items, start) = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => match st.pages.remove(token) {
            Some(page) if page.kind == kind => (page.rv, page.items, page.next),
            _ => {
                return error(
                    StatusCode::GONE,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result.",
                );
            }
        },
        None => {
            let items: Arc<[Bytes]> = st
                .objects
                .iter()
                .filter(|((k, ns, _), _)| *k == kind && namespace.as_deref().is_none_or(|n| n == ns))
                .map(|(_, o)| o.json.clone())
                .collect();
            (st.rv, items, 0)
        }
    };
    let end = limit.map_or(items.len(), |l| items.len().min(start.saturating_add(l)));
    let mut metadata = json!({ "resourceVersion": rv.to_string() });
    if end < items.len() {
        st.next_id += 1;
        let token = format!("page-{}-{}", rv, st.next_id);
        metadata["continue"] = token.clone().into();
        metadata["remainingItemCount"] = (items.len() - end).into();
        st.pages.insert(token, Page { rv, kind, items: Arc::clone(&items), next: end });
    }
    let api_version = st.api_version(kind);
    drop(st);
    shared.lists[kind.index()].fetch_add(1, Ordering::SeqCst);
    let page = &items[start..end];
    let head = json!({
        "kind": format!("{}List", kind.as_str()),
        "apiVersion": api_version,
        "metadata": metadata,
    });
    // `{...head fields..., "items": [` the stored bytes `]}`: no object is re-serialized.
    let mut body = serde_json::to_vec(&head).expect("JSON values serialize");
    body.pop();
    body.reserve(page.iter().map(|b| b.len() + 1).sum::<usize>() + 12);
    body.extend_from_slice(b",\"items\":[");
    for (i, item) in page.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(item);
    }
    body.extend_from_slice(b"]}");
    full_bytes(StatusCode::OK, Bytes::from(body))
}

fn watch(shared: Arc<Shared>, kind: Kind, namespace: Option<String>, q: &HashMap<String, String>) -> Response<Body> {
    let bookmarks = truthy(q.get("allowWatchBookmarks"));
    let send_initial = truthy(q.get("sendInitialEvents"));
    let timeout = q.get("timeoutSeconds").and_then(|t| t.parse::<u64>().ok()).unwrap_or(1800);
    let from: Option<u64> = match q.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => None,
        Some(rv) => match rv.parse() {
            Ok(rv) => Some(rv),
            Err(_) => {
                return error(StatusCode::BAD_REQUEST, "BadRequest", &format!("invalid resource version: {rv}"));
            }
        },
    };

    // Only `metadata.name=<name>` is understood (the agent's Node watch uses it).
    let name = q.get("fieldSelector").and_then(|f| f.strip_prefix("metadata.name=")).map(str::to_string);
    let (tx, rx) = mpsc::unbounded::<WatchMsg>();
    let mut initial: Vec<Bytes> = Vec::new();
    let start_rv;
    {
        let mut st = shared.state();
        match from {
            Some(from) if from < st.compacted_rv => {
                let msg = format!("too old resource version: {from} ({})", st.compacted_rv);
                drop(st);
                shared.watches[kind.index()].fetch_add(1, Ordering::SeqCst);
                if shared.gone_as_status.load(Ordering::SeqCst) {
                    return error(StatusCode::GONE, "Expired", &msg);
                }
                let line = event_line("ERROR", &status_json(410, "Expired", &msg));
                return streaming(
                    shared,
                    Stream {
                        kind,
                        bookmarks,
                        start_rv: 0,
                        rx: None,
                        initial: vec![line],
                        timeout: Duration::ZERO,
                        id: 0,
                    },
                );
            }
            Some(from) => {
                initial.extend(
                    st.history
                        .iter()
                        .filter(|e| {
                            e.rv > from
                                && e.kind == kind
                                && selected(namespace.as_deref(), name.as_deref(), &e.namespace, &e.name)
                        })
                        .map(|e| e.line.clone()),
                );
            }
            None => {
                initial.extend(
                    st.objects
                        .iter()
                        .filter(|((k, ns, n), _)| *k == kind && selected(namespace.as_deref(), name.as_deref(), ns, n))
                        .map(|(_, o)| event_line_raw("ADDED", &o.json)),
                );
                if send_initial {
                    let bm = json!({
                        "kind": kind.as_str(),
                        "apiVersion": st.api_version(kind),
                        "metadata": {
                            "resourceVersion": st.rv.to_string(),
                            "annotations": {"k8s.io/initial-events-end": "true"},
                        },
                    });
                    initial.push(event_line("BOOKMARK", &bm));
                }
            }
        }
        start_rv = st.rv;
        st.next_id += 1;
        let id = st.next_id;
        st.subscribers.push(Subscriber { id, kind, namespace, name, tx });
        shared.watches[kind.index()].fetch_add(1, Ordering::SeqCst);
        streaming(
            shared.clone(),
            Stream { kind, bookmarks, start_rv, rx: Some(rx), initial, timeout: Duration::from_secs(timeout), id },
        )
    }
}

/// Builds a chunked streaming response and spawns the task that feeds it.
struct Stream {
    kind: Kind,
    bookmarks: bool,
    /// Every event up to this resourceVersion is in `initial`.
    start_rv: u64,
    rx: Option<mpsc::UnboundedReceiver<WatchMsg>>,
    initial: Vec<Bytes>,
    timeout: Duration,
    id: u64,
}

fn bookmark_line(kind: Kind, rv: u64) -> Bytes {
    let bm = json!({
        "kind": kind.as_str(),
        "apiVersion": kind.api_version(),
        "metadata": { "resourceVersion": rv.to_string() },
    });
    event_line("BOOKMARK", &bm)
}

fn streaming(shared: Arc<Shared>, s: Stream) -> Response<Body> {
    let (mut body_tx, body_rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(16);
    let body = BodyExt::boxed(StreamBody::new(body_rx));
    let mut resp = Response::new(body);
    resp.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    shared.live_watches.fetch_add(1, Ordering::SeqCst);
    tokio::spawn(async move {
        let Stream { kind, bookmarks, start_rv, rx, initial, timeout, id } = s;
        let feed = async {
            for line in initial {
                shared.wait_unpaused(kind).await;
                body_tx.send(Ok(Frame::data(line))).await.ok()?;
            }
            let Some(mut rx) = rx else { return Some(()) };
            // Highest resourceVersion up to which this watch has delivered everything.
            let mut known_rv = start_rv;
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline);
            loop {
                let msg = tokio::select! {
                    msg = rx.next() => msg,
                    _ = &mut deadline => {
                        if bookmarks {
                            shared.wait_unpaused(kind).await;
                            let line = bookmark_line(kind, known_rv);
                            body_tx.send(Ok(Frame::data(line))).await.ok()?;
                        }
                        return Some(());
                    }
                };
                shared.wait_unpaused(kind).await;
                match msg {
                    // Sender dropped by drop_connections: fail the stream mid-body.
                    None => {
                        let _ = body_tx.send(Err(std::io::Error::other("watch dropped"))).await;
                        return None;
                    }
                    Some(WatchMsg::Line(rv, line)) => {
                        known_rv = known_rv.max(rv);
                        body_tx.send(Ok(Frame::data(line))).await.ok()?;
                    }
                    Some(WatchMsg::Bookmark(rv)) => {
                        known_rv = known_rv.max(rv);
                        if bookmarks {
                            let line = bookmark_line(kind, known_rv);
                            body_tx.send(Ok(Frame::data(line))).await.ok()?;
                        }
                    }
                    Some(WatchMsg::End) => return Some(()),
                    Some(WatchMsg::Expire) => {
                        let line = event_line("ERROR", &status_json(410, "Expired", "too old resource version"));
                        body_tx.send(Ok(Frame::data(line))).await.ok()?;
                        return Some(());
                    }
                }
            }
        };
        feed.await;
        shared.live_watches.fetch_sub(1, Ordering::SeqCst);
        shared.state().subscribers.retain(|s| s.id != id);
    });
    resp
}
