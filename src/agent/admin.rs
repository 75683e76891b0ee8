//! The admin HTTP server: `/metrics`, `/healthz`, `/readyz`.
//!
//! * `/healthz` (liveness): 503 when the agent is stuck: a sync has run longer than
//!   `stuck_after`, or the sync loop (between syncs) or the watch supervisor has not
//!   beaten its heart for `heartbeat_timeout`. kubelet then restarts the agent.
//! * `/readyz` (readiness): 200 once a full sync has been applied, while fewer than
//!   `unready_after_failures` syncs in a row have failed, the last success is at most
//!   `stale_after` old, and every watch is live ([`WatchCounters::live`]); 503 with the
//!   reasons otherwise.
//! * `/metrics`: OpenMetrics text (see [`super::metrics`]).
//!
//! ```text
//!  accept ──(fewer than max_connections open)──► one HTTP/1 connection, bounded in time
//!         └─(else)──► closed at once
//! ```
//!
//! The server is unauthenticated; it listens on the node's own IP (or 127.0.0.1) by
//! default, and takes at most `max_connections` connections at a time so that a flood
//! of them cannot grow the agent's memory.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::time::Instant;

use super::metrics::Metrics;
use super::trigger::SyncState;
use super::watch::WatchCounters;

/// Connections served at once by default; kubelet's two probes and a scraper need three.
pub const DEFAULT_MAX_CONNECTIONS: usize = 8;
/// A connection gets this long to send its request headers, and this long in all.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// The bounds the probes judge by.
#[derive(Debug, Clone)]
pub struct ProbeLimits {
    /// `/readyz` fails from this many consecutive sync failures on.
    pub unready_after_failures: u32,
    /// `/readyz` fails when the last successful sync is older than this.
    pub stale_after: Duration,
    /// `/healthz` fails when one sync has run longer than this.
    pub stuck_after: Duration,
    /// `/healthz` fails when the sync loop or the watch supervisor has not beaten for this long.
    pub heartbeat_timeout: Duration,
}

impl Default for ProbeLimits {
    fn default() -> Self {
        ProbeLimits {
            unready_after_failures: 3,
            // A full resync every 5 minutes, retries at most 30 s apart.
            stale_after: Duration::from_secs(300 + 120),
            // Two external calls of at most 30 s each (netlink, then nft) and compiling.
            stuck_after: Duration::from_secs(120),
            // Both beat every 5 s.
            heartbeat_timeout: Duration::from_secs(30),
        }
    }
}

impl ProbeLimits {
    /// The limits for a resync period and an external-call timeout.
    pub fn for_agent(resync_period: Duration, nft_timeout: Duration) -> ProbeLimits {
        ProbeLimits {
            stale_after: resync_period + Duration::from_secs(120),
            stuck_after: nft_timeout * 2 + Duration::from_secs(60),
            ..ProbeLimits::default()
        }
    }
}

/// What the admin server reads.
#[derive(Clone)]
pub struct AdminState {
    pub metrics: Metrics,
    pub status: tokio::sync::watch::Receiver<SyncState>,
    pub watch_counters: Option<Arc<WatchCounters>>,
    pub limits: ProbeLimits,
    /// The per-rule counters, read from the kernel at each scrape (`None`: not exported).
    pub rule_counters: Option<super::RuleCounters>,
}

fn ago(at: Option<Instant>) -> Option<Duration> {
    at.map(|at| Instant::now().saturating_duration_since(at))
}

/// Readiness: a full sync applied, fewer than `unready_after_failures` failures in a row,
/// the last success recent, every watch live. The reasons, joined, when not.
pub fn readiness(state: &SyncState, watches: Option<&WatchCounters>, limits: &ProbeLimits) -> Result<(), String> {
    let mut reasons = Vec::new();
    if !state.first_full_sync_done {
        reasons.push("no full sync applied yet".to_string());
    }
    if state.consecutive_failures >= limits.unready_after_failures {
        reasons.push(format!(
            "{} consecutive sync failures; last: {}",
            state.consecutive_failures,
            state.last_error.as_deref().unwrap_or("unknown")
        ));
    }
    if let Some(age) = ago(state.last_success_at).filter(|age| *age > limits.stale_after) {
        reasons.push(format!("last successful sync {}s ago", age.as_secs()));
    }
    if let Some(w) = watches {
        for r in w.watched() {
            if !w.live(r) {
                reasons.push(format!("watch of {} is not live", r.as_str()));
            }
        }
        // A cluster policy whose subject cannot be read is not enforced at all (see
        // `agent::tiers`): the agent does not claim to enforce the cluster's policies.
        let unenforced = w.tier_report().unenforced;
        if !unenforced.is_empty() {
            reasons.push(format!("cluster policies not enforced (failed conversion): {}", unenforced.join(", ")));
        }
    }
    if reasons.is_empty() { Ok(()) } else { Err(reasons.join("; ")) }
}

/// Liveness: no sync running longer than `stuck_after`, and the sync loop (when no sync
/// runs) and the watch supervisor beat within `heartbeat_timeout`.
pub fn liveness(state: &SyncState, watches: Option<&WatchCounters>, limits: &ProbeLimits) -> Result<(), String> {
    let mut reasons = Vec::new();
    match ago(state.sync_started) {
        Some(running) if running > limits.stuck_after => {
            reasons.push(format!("a sync has been running for {}s", running.as_secs()));
        }
        Some(_) => {}
        None => {
            if let Some(quiet) = ago(state.heartbeat).filter(|q| *q > limits.heartbeat_timeout) {
                reasons.push(format!("the sync loop has not run for {}s", quiet.as_secs()));
            }
        }
    }
    if let Some(quiet) = watches.and_then(|w| w.since_supervisor_beat()).filter(|q| *q > limits.heartbeat_timeout) {
        reasons.push(format!("the watch supervisor has not run for {}s", quiet.as_secs()));
    }
    if reasons.is_empty() { Ok(()) } else { Err(reasons.join("; ")) }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    resp
}

/// Answers one admin request.
pub fn respond(state: &AdminState, path: &str) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    match path {
        "/healthz" | "/livez" | "/readyz" => {
            let sync_state = state.status.borrow().clone();
            let watches = state.watch_counters.as_deref();
            let verdict = if path == "/readyz" {
                readiness(&sync_state, watches, &state.limits)
            } else {
                liveness(&sync_state, watches, &state.limits)
            };
            match verdict {
                Ok(()) => text(StatusCode::OK, PLAIN, "ok\n".into()),
                Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, format!("{reason}\n")),
            }
        }
        "/metrics" => {
            if let Some(counters) = &state.rule_counters {
                // A failed read exports the totals as of the last one.
                if let Err(error) = counters.read() {
                    tracing::debug!(%error, "could not read the rule counters");
                }
                state.metrics.record_rule_counters(&counters.totals());
            }
            let sync_state = state.status.borrow().clone();
            let body = state.metrics.encode(state.watch_counters.as_deref(), &sync_state);
            text(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", body)
        }
        _ => text(StatusCode::NOT_FOUND, PLAIN, "not found\n".into()),
    }
}

/// Serves the admin endpoints on `listener` until the task is dropped, at most
/// [`DEFAULT_MAX_CONNECTIONS`] connections at a time.
pub async fn serve(listener: TcpListener, state: AdminState) {
    serve_limited(listener, state, DEFAULT_MAX_CONNECTIONS).await
}

/// Serves the admin endpoints with at most `max_connections` open connections: one more
/// is accepted and closed at once (not queued), so a flood costs no memory.
pub async fn serve_limited(listener: TcpListener, state: AdminState, max_connections: usize) {
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "admin server accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::debug!(max_connections, "admin server busy; closing a connection");
            drop(stream);
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                // Off the runtime's threads: a scrape reads the kernel's counters.
                let (state, path) = (state.clone(), req.uri().path().to_string());
                async move {
                    let resp = tokio::task::spawn_blocking(move || respond(&state, &path)).await.unwrap_or_else(|e| {
                        text(StatusCode::INTERNAL_SERVER_ERROR, "text/plain; charset=utf-8", format!("{e}\n"))
                    });
                    Ok::<_, Infallible>(resp)
                }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready_state() -> SyncState {
        SyncState {
            first_full_sync_done: true,
            last_success_at: Some(Instant::now()),
            heartbeat: Some(Instant::now()),
            ..SyncState::default()
        }
    }

    #[test]
    fn readiness_needs_a_full_sync_and_few_consecutive_failures() {
        let limits = ProbeLimits::default();
        let mut s = SyncState::default();
        assert!(readiness(&s, None, &limits).is_err());
        s.first_full_sync_done = true;
        assert!(readiness(&s, None, &limits).is_ok());
        s.consecutive_failures = 2;
        assert!(readiness(&s, None, &limits).is_ok());
        s.consecutive_failures = 3;
        s.last_error = Some("nft said no".into());
        let err = readiness(&s, None, &limits).unwrap_err();
        assert!(err.contains("nft said no"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn readiness_fails_once_the_last_successful_sync_is_stale() {
        let limits = ProbeLimits { stale_after: Duration::from_secs(60), ..ProbeLimits::default() };
        let s = ready_state();
        assert!(readiness(&s, None, &limits).is_ok());
        tokio::time::advance(Duration::from_secs(61)).await;
        let err = readiness(&s, None, &limits).unwrap_err();
        assert!(err.contains("last successful sync 61s ago"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn liveness_fails_for_a_sync_running_too_long_and_for_a_silent_loop() {
        let limits = ProbeLimits {
            stuck_after: Duration::from_secs(100),
            heartbeat_timeout: Duration::from_secs(20),
            ..ProbeLimits::default()
        };
        let mut s = ready_state();
        assert!(liveness(&s, None, &limits).is_ok());
        // A sync running: the loop does not beat meanwhile, which is fine up to the bound.
        s.sync_started = Some(Instant::now());
        tokio::time::advance(Duration::from_secs(99)).await;
        assert!(liveness(&s, None, &limits).is_ok());
        tokio::time::advance(Duration::from_secs(2)).await;
        let err = liveness(&s, None, &limits).unwrap_err();
        assert!(err.contains("a sync has been running for 101s"), "{err}");
        // Between syncs, a loop that stopped beating.
        s.sync_started = None;
        let err = liveness(&s, None, &limits).unwrap_err();
        assert!(err.contains("the sync loop has not run"), "{err}");
        s.heartbeat = Some(Instant::now());
        assert!(liveness(&s, None, &limits).is_ok());
    }
}
