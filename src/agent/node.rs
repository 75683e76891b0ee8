//! The agent's own Node, for its pod CIDRs: one GET, then a WATCH of that one object
//! (`fieldSelector=metadata.name=<node>`). The agent also lists and watches every Node
//! (slim: name, labels, addresses, for the `nodes` peers of cluster policies; `watch.rs`);
//! this read stays separate because the first sync waits for it alone (`--node-wait`), a
//! missing own Node is not an error, and its pod CIDRs change the compiler's configuration
//! (a full sync) where the other nodes change only the cluster. The cost is one more watch
//! per agent, of one object.
//!
//! ```text
//!  GET nodes/<node> ──► spec.podCIDRs ──► ClusterWatch::set_node_cidrs ──(changed)──► full sync
//!        ▲                                        ▲
//!        │ error, 410, end of stream              │ ADDED / MODIFIED
//!        └──────── WATCH nodes?fieldSelector=metadata.name=<node>&resourceVersion=<rv>
//! ```

use std::time::Duration;

use futures::StreamExt;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::{WatchEvent, WatchParams};

use super::trigger::Trigger;
use super::watch::{ClusterWatch, EventHook};

/// The server ends a watch after this many seconds; the client gives up on a silent one
/// a little later (bookmarks arrive well before).
const WATCH_TIMEOUT_SECS: u32 = 290;
const IDLE_LIMIT: Duration = Duration::from_secs(WATCH_TIMEOUT_SECS as u64 + 30);
const BACKOFF_INITIAL: Duration = Duration::from_millis(800);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// `spec.podCIDRs` ("podCIDRs represents the IP ranges assigned to the node for usage by
/// Pods on that node. If this field is specified, the 0th entry must match the podCIDR
/// field."), else `spec.podCIDR`. Entries that are no CIDR are warned about and left out.
pub fn pod_cidrs(node: &Node) -> Vec<IpNet> {
    let spec = node.spec.as_ref();
    let listed = spec.and_then(|s| s.pod_cidrs.clone()).filter(|l| !l.is_empty());
    let texts = listed.or_else(|| spec.and_then(|s| s.pod_cidr.clone()).map(|c| vec![c])).unwrap_or_default();
    let mut cidrs: Vec<IpNet> = texts
        .iter()
        .filter_map(|t| match t.parse::<IpNet>() {
            Ok(net) => Some(net.trunc()),
            Err(e) => {
                tracing::warn!(node = node.metadata.name.as_deref().unwrap_or(""), cidr = %t, "Node spec.podCIDRs: not a CIDR ({e}); left out");
                None
            }
        })
        .collect();
    cidrs.sort();
    cidrs.dedup();
    cidrs
}

/// Reads and watches the Node `name` forever, feeding its pod CIDRs to `watch`.
pub(super) async fn watch_node(
    watch: &ClusterWatch,
    api: Api<Node>,
    name: &str,
    trigger: &Trigger,
    hook: Option<&EventHook>,
) {
    let (counters, resource) = watch.node_counters();
    let mut backoff = BACKOFF_INITIAL;
    let mut failed = false;
    loop {
        if failed {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        if failed || counters.lists(resource) == 0 {
            counters.listing(resource);
        }
        failed = true;
        let node = match api.get(name).await {
            Ok(node) => node,
            // No such Node (the agent runs outside a cluster's nodes): nothing to wait
            // for; its CIDRs are none until it appears (the watch reports it).
            Err(kube::Error::Api(status)) if status.code == 404 => {
                tracing::warn!(node = name, "no such Node; no pod CIDRs from it until it exists");
                let mut none = Node::default();
                none.metadata.name = Some(name.to_string());
                none
            }
            Err(error) => {
                counters.failed(resource);
                tracing::warn!(node = name, %error, "reading the Node failed; retrying with backoff");
                continue;
            }
        };
        if let Some(hook) = hook {
            hook(resource);
        }
        watch.set_node_cidrs(pod_cidrs(&node), trigger);
        counters.delivered(resource);
        let mut version = node.metadata.resource_version.clone().unwrap_or_default();
        let params = WatchParams::default().fields(&format!("metadata.name={name}")).timeout(WATCH_TIMEOUT_SECS);
        let stream = match api.watch(&params, &version).await {
            Ok(stream) => stream,
            Err(error) => {
                counters.failed(resource);
                tracing::warn!(node = name, %error, "watching the Node failed; reading it again with backoff");
                continue;
            }
        };
        let mut stream = std::pin::pin!(stream);
        loop {
            let item = match tokio::time::timeout(IDLE_LIMIT, stream.next()).await {
                Ok(item) => item,
                Err(_) => {
                    counters.failed(resource);
                    tracing::warn!(node = name, "the Node watch went silent; reading it again");
                    break;
                }
            };
            match item {
                Some(Ok(WatchEvent::Added(node) | WatchEvent::Modified(node))) => {
                    if let Some(hook) = hook {
                        hook(resource);
                    }
                    version = node.metadata.resource_version.clone().unwrap_or(version);
                    watch.set_node_cidrs(pod_cidrs(&node), trigger);
                    counters.delivered(resource);
                    counters.event(resource);
                }
                Some(Ok(WatchEvent::Deleted(_))) => {
                    counters.delivered(resource);
                    counters.event(resource);
                    tracing::warn!(node = name, "this agent's Node was deleted; keeping its last pod CIDRs");
                }
                Some(Ok(WatchEvent::Bookmark(bookmark))) => {
                    version = bookmark.metadata.resource_version;
                    counters.delivered(resource);
                }
                Some(Ok(WatchEvent::Error(status))) => {
                    counters.failed(resource);
                    tracing::warn!(node = name, code = status.code, message = %status.message, "Node watch error; reading it again");
                    break;
                }
                Some(Err(error)) => {
                    counters.failed(resource);
                    tracing::warn!(node = name, %error, "Node watch failed; reading it again");
                    break;
                }
                None => {
                    // The server ended the watch (its timeout): read and watch again at once.
                    tracing::debug!(node = name, resource_version = %version, "Node watch ended");
                    failed = false;
                    backoff = BACKOFF_INITIAL;
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::NodeSpec;

    fn node(pod_cidr: Option<&str>, pod_cidrs: Option<&[&str]>) -> Node {
        Node {
            spec: Some(NodeSpec {
                pod_cidr: pod_cidr.map(str::to_string),
                pod_cidrs: pod_cidrs.map(|l| l.iter().map(|c| c.to_string()).collect()),
                ..NodeSpec::default()
            }),
            ..Node::default()
        }
    }

    #[test]
    fn pod_cidrs_come_from_spec_pod_cidrs_else_pod_cidr_and_bad_entries_are_left_out() {
        let both = node(Some("10.244.1.0/24"), Some(&["10.244.1.0/24", "fd00:10:244:1::/64"]));
        assert_eq!(
            pod_cidrs(&both),
            ["10.244.1.0/24".parse().unwrap(), "fd00:10:244:1::/64".parse::<IpNet>().unwrap()]
        );
        let legacy = node(Some("10.244.2.0/24"), None);
        assert_eq!(pod_cidrs(&legacy), ["10.244.2.0/24".parse::<IpNet>().unwrap()]);
        let bad = node(None, Some(&["10.244.3.7/24", "not-a-cidr"]));
        assert_eq!(pod_cidrs(&bad), ["10.244.3.0/24".parse::<IpNet>().unwrap()]);
        assert!(pod_cidrs(&Node::default()).is_empty());
    }
}
