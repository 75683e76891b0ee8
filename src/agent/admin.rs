//! The admin HTTP server: `/metrics`, `/healthz`, `/readyz`.
//!
//! * `/healthz`: 200 while the process serves (liveness).
//! * `/readyz`: 200 once a full sync has been applied and while fewer than
//!   `unready_after_failures` syncs in a row have failed; 503 with the reason otherwise.
//! * `/metrics`: OpenMetrics text (see [`super::metrics`]).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use super::metrics::Metrics;
use super::trigger::SyncState;
use super::watch::WatchCounters;

/// What the admin server reads.
#[derive(Clone)]
pub struct AdminState {
    pub metrics: Metrics,
    pub status: tokio::sync::watch::Receiver<SyncState>,
    pub watch_counters: Option<Arc<WatchCounters>>,
    pub unready_after_failures: u32,
}

/// Readiness: a full sync applied, and fewer than `unready_after` failures in a row.
pub fn readiness(state: &SyncState, unready_after: u32) -> Result<(), String> {
    if !state.first_full_sync_done {
        return Err("no full sync applied yet".into());
    }
    if state.consecutive_failures >= unready_after {
        return Err(format!(
            "{} consecutive sync failures; last: {}",
            state.consecutive_failures,
            state.last_error.as_deref().unwrap_or("unknown")
        ));
    }
    Ok(())
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
        "/healthz" | "/livez" => text(StatusCode::OK, PLAIN, "ok\n".into()),
        "/readyz" => match readiness(&state.status.borrow(), state.unready_after_failures) {
            Ok(()) => text(StatusCode::OK, PLAIN, "ok\n".into()),
            Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, format!("{reason}\n")),
        },
        "/metrics" => {
            let sync_state = state.status.borrow().clone();
            let body = state.metrics.encode(state.watch_counters.as_deref(), &sync_state);
            text(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", body)
        }
        _ => text(StatusCode::NOT_FOUND, PLAIN, "not found\n".into()),
    }
}

/// Serves the admin endpoints on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, state: AdminState) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "admin server accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = respond(&state, req.uri().path());
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_a_full_sync_and_few_consecutive_failures() {
        let mut s = SyncState::default();
        assert!(readiness(&s, 3).is_err());
        s.first_full_sync_done = true;
        assert!(readiness(&s, 3).is_ok());
        s.consecutive_failures = 2;
        assert!(readiness(&s, 3).is_ok());
        s.consecutive_failures = 3;
        s.last_error = Some("nft said no".into());
        let err = readiness(&s, 3).unwrap_err();
        assert!(err.contains("nft said no"), "{err}");
    }
}
