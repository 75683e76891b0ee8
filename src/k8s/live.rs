//! Reading a live cluster through its API server: `netpol-check --cluster`. Read-only:
//! every request is a LIST; nothing is watched, created or changed.
//!
//! ```text
//!  --kubeconfig / KUBECONFIG / ~/.kube/config (--context), else the pod's service account
//!      ─► kube::Client ─► LIST, paged (limit 500 + continue), kind after kind:
//!           Namespaces, Pods, Nodes ................ typed (as the agent reads them)
//!           Services ............................... typed (for `svc/NS/NAME`, `--services`)
//!           NetworkPolicies ........................ whole JSON (unknown fields are seen)
//!           ClusterNetworkPolicy (v1beta1, else v1alpha2),
//!           Admin/BaselineAdminNetworkPolicy ....... whole JSON; 404 (no CRD): none
//!      ─► JSON objects ─► load::load_api_objects (pure) ─► Loaded
//! ```
//!
//! Why some kinds typed and some whole: a policy field netpol does not know (a newer API)
//! may change whom the policy selects or allows, so the loader must see it to refuse it. A
//! new Pod, Namespace or Node field changes nothing netpol reads of them (labels, IPs,
//! ports, node, hostNetwork are stable v1 fields); a cluster newer than netpol's API types
//! adds such fields every release, and refusing them would make `--cluster` useless there.
//! So those three are decoded into the API types, which drop what they do not know, exactly
//! as the agent's watches decode them. Services too, for the same reason: netpol reads their
//! type, selector, ports and targetPorts (stable v1 fields), and no policy ever sees a
//! Service (kube-proxy DNATs its address to an endpoint's first), so a newer field cannot
//! change a verdict. The agent does not read Services; `--cluster` does, so that `query --to
//! svc/NS/NAME` and `matrix --services` answer from the cluster as from files.
//!
//! The lists of different kinds are each consistent, not consistent with each other (the
//! API has no snapshot across kinds): a pod created between two lists may be missing.

use std::fmt::Debug;
use std::path::PathBuf;

use k8s_openapi::api::core::v1 as core;
use kube::api::{ApiResource, DynamicObject, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::k8s::load::{self, LoadError, LoadOptions, Loaded};
use crate::k8s::tiers;

/// Objects per page of a list: big clusters are read in pieces, as kubectl reads them.
pub const PAGE_SIZE: u32 = 500;

/// How many times a list starts over after its continue token expired (the server keeps
/// a list's snapshot for a few minutes; a slow client can outlive it).
const LIST_RESTARTS: u32 = 3;

/// Which cluster to read: the kubeconfig and context, or (both `None`) what `kubectl` would
/// use, and inside a pod its service account.
#[derive(Clone, Debug, Default)]
pub struct Target {
    /// A kubeconfig file instead of `KUBECONFIG` / `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// A context of the kubeconfig instead of its current one.
    pub context: Option<String>,
    /// List Services too. Only commands that use them do, so that a role without `list` on
    /// services (the agent's) answers every other question.
    pub services: bool,
}

/// Why a cluster could not be read. Each message names what failed and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{0}")]
    Config(String),
    #[error("{server}: listing {resource}: {why}")]
    List { server: String, resource: String, why: String },
    #[error("{0}")]
    Load(#[from] LoadError),
    #[error("cannot start the API client's runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

/// Lists the objects netpol reads and loads them as [`load::load_api_objects`] does.
pub fn load(target: &Target, options: &LoadOptions) -> Result<Loaded, ClusterError> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let config = config(target).await?;
        let source = format!("cluster at {}", config.cluster_url);
        let client = Client::try_from(config).map_err(|e| ClusterError::Config(format!("{source}: {}", chain(&e))))?;
        let objects = list_all(&client, &source, target.services).await?;
        Ok(load::load_api_objects(&source, objects, options)?)
    })
}

async fn config(target: &Target) -> Result<Config, ClusterError> {
    let options = KubeConfigOptions { context: target.context.clone(), ..KubeConfigOptions::default() };
    let context = |e: &dyn std::error::Error| match &target.context {
        Some(name) => {
            format!("--context {name}: {} (`kubectl config get-contexts` lists the contexts there are)", chain(e))
        }
        None => chain(e),
    };
    match &target.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .map_err(|e| ClusterError::Config(format!("--kubeconfig {}: {}", path.display(), chain(&e))))?;
            Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|e| ClusterError::Config(format!("--kubeconfig {}: {}", path.display(), context(&e))))
        }
        None if target.context.is_some() => {
            Config::from_kubeconfig(&options).await.map_err(|e| ClusterError::Config(context(&e)))
        }
        // What kubectl does, and in a pod its service account (`Config::infer`).
        None => Config::infer().await.map_err(|e| {
            ClusterError::Config(format!(
                "--cluster: no cluster to read ({}): set KUBECONFIG or give --kubeconfig PATH (and --context NAME), \
                 or run netpol-check in a pod with a service account",
                chain(&e)
            ))
        }),
    }
}

/// Every object of the kinds netpol reads, as whole JSON objects with apiVersion and kind.
async fn list_all(client: &Client, source: &str, services: bool) -> Result<Vec<Value>, ClusterError> {
    let mut objects = Vec::new();
    list_typed::<core::Namespace>(client, source, &mut objects).await?;
    list_typed::<core::Pod>(client, source, &mut objects).await?;
    list_typed::<core::Node>(client, source, &mut objects).await?;
    if services {
        list_typed::<core::Service>(client, source, &mut objects).await?;
    }
    let policies = resource("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies");
    if !list_dynamic(client, source, &policies, &mut objects).await? {
        return Err(ClusterError::List {
            server: source.to_string(),
            resource: "networkpolicies (networking.k8s.io/v1)".into(),
            why: "the API server does not serve it (404): is this a Kubernetes API server?".into(),
        });
    }
    for (kind, plural) in [
        ("ClusterNetworkPolicy", "clusternetworkpolicies"),
        ("AdminNetworkPolicy", "adminnetworkpolicies"),
        ("BaselineAdminNetworkPolicy", "baselineadminnetworkpolicies"),
    ] {
        // The versions in order of preference, the agent's: the first one served is read.
        // A kind whose CRD is not installed has no objects: "none", not an error.
        for api_version in tiers::versions(kind).unwrap_or_default() {
            if list_dynamic(client, source, &resource(api_version, kind, plural), &mut objects).await? {
                break;
            }
        }
    }
    Ok(objects)
}

fn resource(api_version: &str, kind: &str, plural: &str) -> ApiResource {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: api_version.into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// Lists a built-in kind into its API type (see the module documentation for why).
async fn list_typed<K>(client: &Client, source: &str, out: &mut Vec<Value>) -> Result<(), ClusterError>
where
    K: kube::Resource<DynamicType = ()> + k8s_openapi::Resource + Clone + DeserializeOwned + Serialize + Debug,
{
    let what = format!("{} ({})", K::plural(&()), K::API_VERSION);
    let items = list_pages(Api::<K>::all(client.clone()), source, &what).await?.ok_or_else(|| ClusterError::List {
        server: source.to_string(),
        resource: what.clone(),
        why: "the API server does not serve it (404): is this a Kubernetes API server?".into(),
    })?;
    for item in items {
        // k8s-openapi writes apiVersion and kind itself.
        out.push(serde_json::to_value(&item).map_err(|e| ClusterError::List {
            server: source.to_string(),
            resource: what.clone(),
            why: e.to_string(),
        })?);
    }
    Ok(())
}

/// Lists a kind as whole JSON objects; `false` when the server does not serve it (404).
async fn list_dynamic(
    client: &Client,
    source: &str,
    resource: &ApiResource,
    out: &mut Vec<Value>,
) -> Result<bool, ClusterError> {
    let what = format!("{} ({})", resource.plural, resource.api_version);
    let api = Api::<DynamicObject>::all_with(client.clone(), resource);
    let Some(items) = list_pages(api, source, &what).await? else {
        return Ok(false);
    };
    for mut item in items {
        // A list's items may leave apiVersion and kind to the list.
        if item.types.is_none() {
            item.types =
                Some(kube::core::TypeMeta { api_version: resource.api_version.clone(), kind: resource.kind.clone() });
        }
        out.push(serde_json::to_value(&item).map_err(|e| ClusterError::List {
            server: source.to_string(),
            resource: what.clone(),
            why: e.to_string(),
        })?);
    }
    Ok(true)
}

/// Every item of a list, page by page; `None` when the resource is not served (404).
async fn list_pages<K>(api: Api<K>, source: &str, what: &str) -> Result<Option<Vec<K>>, ClusterError>
where
    K: Clone + DeserializeOwned + Debug,
{
    let mut restarts = 0;
    'list: loop {
        let mut items = Vec::new();
        let mut params = ListParams::default().limit(PAGE_SIZE);
        loop {
            let page = match api.list(&params).await {
                Ok(page) => page,
                Err(kube::Error::Api(status)) if status.code == 404 && params.continue_token.is_none() => {
                    return Ok(None);
                }
                // "The provided continue parameter is too old": the list starts over.
                Err(kube::Error::Api(status))
                    if status.code == 410 && params.continue_token.is_some() && restarts < LIST_RESTARTS =>
                {
                    restarts += 1;
                    continue 'list;
                }
                Err(e) => {
                    return Err(ClusterError::List {
                        server: source.to_string(),
                        resource: what.to_string(),
                        why: why(&e, what),
                    });
                }
            };
            items.extend(page.items);
            match page.metadata.continue_.filter(|t| !t.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => return Ok(Some(items)),
            }
        }
    }
}

/// What a failed list means, and what to do about it.
fn why(e: &kube::Error, what: &str) -> String {
    let resource = what.split(' ').next().unwrap_or(what);
    match e {
        kube::Error::Api(status) if status.code == 403 => format!(
            "forbidden ({}): netpol-check needs `list` on {resource}; it lists namespaces, pods, nodes, \
             services, networkpolicies.networking.k8s.io and the policy.networking.k8s.io kinds, so grant \
             `list` on those (a read-only ClusterRole), or use a --context that has it",
            status.message
        ),
        kube::Error::Api(status) if status.code == 401 => format!(
            "unauthorized ({}): the API server refused the kubeconfig's credentials; log in again or use \
             another --context",
            status.message
        ),
        kube::Error::Api(status) => {
            format!("the API server answered {} {}: {}", status.code, status.reason, status.message)
        }
        other => format!(
            "cannot reach the API server ({}): check the server address of the kubeconfig's context and \
             that the cluster is up",
            chain(other)
        ),
    }
}

/// An error and its causes, one after another: kube's own messages are short
/// ("client error (Connect)") and the cause says what happened ("Connection refused").
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let part = cause.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = cause.source();
    }
    text
}
