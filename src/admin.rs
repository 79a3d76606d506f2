//! The admin HTTP endpoint: `/healthz` (200 when the consumer streams, 503 with the reason when
//! not) and `/metrics` in Prometheus' text format.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::dispatch::DispatchStats;
use crate::event::Lsn;
use crate::replication::ConsumerHealth;

/// Metric names, in one place.
pub mod metric {
    pub const EVENTS: &str = "pgfire_events_total";
    pub const RUNS: &str = "pgfire_function_runs_total";
    pub const FAILURES: &str = "pgfire_function_failures_total";
    pub const RECEIVED_LSN: &str = "pgfire_received_lsn";
    pub const CONFIRMED_LSN: &str = "pgfire_confirmed_lsn";
    pub const SETTLED_LSN: &str = "pgfire_settled_lsn";
    pub const RECONNECTS: &str = "pgfire_replication_reconnects_total";
    pub const CONNECTED: &str = "pgfire_replication_connected";
    pub const STREAMED_BYTES: &str = "pgfire_streamed_transaction_bytes";
}

#[derive(Clone)]
pub struct AdminState {
    /// `None` when the consumer is not running (`--no-consumer`).
    pub consumer: Option<Arc<ConsumerHealth>>,
    pub dispatch: Arc<DispatchStats>,
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!("cannot listen on {addr} for the admin endpoint: {e} (use --admin-listen)")
    })
}

async fn healthz(State(s): State<AdminState>) -> impl IntoResponse {
    let Some(c) = &s.consumer else {
        return (
            StatusCode::OK,
            axum::Json(serde_json::json!({"status": "ok", "consumer": "off"})),
        );
    };
    let connected = c.connected.load(Ordering::SeqCst);
    let body = serde_json::json!({
        "status": if connected { "ok" } else { "unavailable" },
        "replication": {
            "connected": connected,
            "received_lsn": Lsn(c.received_lsn.load(Ordering::Relaxed)).to_string(),
            "confirmed_lsn": Lsn(c.confirmed_lsn.load(Ordering::Relaxed)).to_string(),
            "error": c.last_error.lock().ok().and_then(|e| e.clone()),
        }
    });
    let code = if connected {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body))
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    let mut out = String::new();
    let mut put = |name: &str, kind: &str, v: u64| {
        out.push_str(&format!("# TYPE {name} {kind}\n{name} {v}\n"));
    };
    put(
        metric::EVENTS,
        "counter",
        s.dispatch.events.load(Ordering::Relaxed),
    );
    put(
        metric::RUNS,
        "counter",
        s.dispatch.runs.load(Ordering::Relaxed),
    );
    put(
        metric::FAILURES,
        "counter",
        s.dispatch.failures.load(Ordering::Relaxed),
    );
    if let Some(c) = &s.consumer {
        put(
            metric::CONNECTED,
            "gauge",
            c.connected.load(Ordering::Relaxed) as u64,
        );
        put(
            metric::RECEIVED_LSN,
            "gauge",
            c.received_lsn.load(Ordering::Relaxed),
        );
        put(
            metric::CONFIRMED_LSN,
            "gauge",
            c.confirmed_lsn.load(Ordering::Relaxed),
        );
        put(
            metric::SETTLED_LSN,
            "gauge",
            c.settled_lsn.load(Ordering::Relaxed),
        );
        put(
            metric::RECONNECTS,
            "counter",
            c.reconnects.load(Ordering::Relaxed),
        );
        put(
            metric::STREAMED_BYTES,
            "gauge",
            c.streamed_bytes.load(Ordering::Relaxed),
        );
    }
    ([("content-type", "text/plain; version=0.0.4")], out)
}
