//! The admin HTTP endpoint, wired here: `/healthz` (200 when the consumer streams, 503 with its
//! state and the reason when not: reconnecting, or stopped on an error retrying cannot fix),
//! `/metrics` in Prometheus' text format, and the dashboard (pages, their JSON API and assets),
//! behind [`guard`] (loopback or a token, CSRF checks on every state-changing request).

mod api;
mod chart;
mod events_page;
mod executions_page;
mod functions_page;
pub mod guard;
mod html;
mod status;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{FromRef, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::delivery::DeliveryStats;
use crate::events::Lsn;
use crate::executions::Progress;
use crate::replication::ConsumerHealth;

/// Metric names, in one place.
pub mod metric {
    pub const EVENTS: &str = "pgfire_events_total";
    pub const RUNS: &str = "pgfire_function_runs_total";
    pub const FAILURES: &str = "pgfire_function_failures_total";
    pub const PARKED: &str = "pgfire_runs_parked_total";
    pub const DEAD: &str = "pgfire_runs_dead_total";
    pub const IN_FLIGHT: &str = "pgfire_events_in_flight";
    pub const RECEIVED_LSN: &str = "pgfire_received_lsn";
    pub const CONFIRMED_LSN: &str = "pgfire_confirmed_lsn";
    pub const SETTLED_LSN: &str = "pgfire_settled_lsn";
    pub const RECONNECTS: &str = "pgfire_replication_reconnects_total";
    pub const CONNECTED: &str = "pgfire_replication_connected";
    pub const STREAMED_BYTES: &str = "pgfire_streamed_transaction_bytes";
    pub const SPILLED_BYTES: &str = "pgfire_spilled_transaction_bytes_total";
    pub const PROXY_CONNECTIONS: &str = "pgfire_proxy_connections";
}

#[derive(Clone)]
pub struct AdminState {
    /// `None` when the consumer is not running (`--no-consumer`).
    pub consumer: Option<Arc<ConsumerHealth>>,
    pub dispatch: Arc<DeliveryStats>,
    /// The execution history and what the slot may confirm (`None` without a consumer).
    pub history: Option<Arc<Progress>>,
    /// The served database, which the dashboard reads and writes (pgfire's SQL tables).
    pub database_url: String,
    /// The token every request must carry (`--admin-token`); required off loopback.
    pub token: Option<String>,
    /// Where the proxy listens, when it runs.
    pub proxy_addr: Option<SocketAddr>,
    /// Client connections the proxy holds: a hook for the proxy to update (nothing sets it
    /// yet, so the status bar says the count is not exposed).
    pub proxy_connections: Option<Arc<std::sync::atomic::AtomicU64>>,
}

/// What every handler of the endpoint shares.
pub struct Dashboard {
    pub state: AdminState,
    pub db: status::AdminDb,
    /// The per-process secret state-changing requests must echo (forms and `x-csrf-token`).
    pub csrf: String,
    pub lag: status::LagHistory,
}

type Shared = Arc<Dashboard>;

impl FromRef<Shared> for AdminState {
    fn from_ref(d: &Shared) -> AdminState {
        d.state.clone()
    }
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let dashboard = Arc::new(Dashboard {
        db: status::AdminDb::new(&state.database_url),
        csrf: guard::new_secret()?,
        lag: Default::default(),
        state,
    });
    tokio::spawn(status::sample_lag(dashboard.clone(), shutdown.clone()));
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/", get(events_page::page))
        .route("/events/subscribe", post(events_page::subscribe))
        .route("/events/active", post(events_page::set_active))
        .route(
            "/events/unsubscribe",
            get(events_page::confirm_unsubscribe).post(events_page::unsubscribe),
        )
        .route("/functions", get(functions_page::page))
        .route("/functions/active", post(functions_page::set_active))
        .route("/functions/test", post(functions_page::test_event))
        .route("/executions", get(executions_page::page))
        .route("/executions/redeliver", post(executions_page::redeliver))
        .route("/api/status", get(api::status))
        .route("/api/events", get(api::events))
        .route("/api/functions", get(api::functions))
        .route("/api/executions", get(api::executions))
        .route("/api/chart", get(api::chart))
        .route("/assets/app.js", get(api::script))
        .route("/assets/app.css", get(api::style))
        .fallback(api::not_found)
        .layer(axum::middleware::from_fn_with_state(
            dashboard.clone(),
            guard::guard,
        ))
        .with_state(dashboard);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Listen on `addr`: refused off loopback without a token, since the dashboard changes the
/// configuration.
pub async fn bind(
    addr: SocketAddr,
    token: Option<&str>,
) -> anyhow::Result<tokio::net::TcpListener> {
    guard::check_exposure(addr, token)?;
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
    // A standby (another pgfire holds the slot) is healthy: it takes over when the slot frees.
    let standby = c.standby.load(Ordering::SeqCst);
    let status = match (connected, c.stopped.is_cancelled()) {
        (_, true) => "stopped",
        (true, false) => "ok",
        (false, false) if standby => "standby",
        (false, false) => "unavailable",
    };
    let body = serde_json::json!({
        "status": status,
        "replication": {
            "connected": connected,
            "standby": standby,
            "state": c.state(),
            "received_lsn": Lsn(c.received_lsn.load(Ordering::Relaxed)).to_string(),
            "confirmed_lsn": Lsn(c.confirmed_lsn.load(Ordering::Relaxed)).to_string(),
            "reconnects": c.reconnects.load(Ordering::Relaxed),
            "error": c.last_error(),
        },
        "dispatch": {
            "error": s.dispatch.stopped.lock().ok().and_then(|e| e.clone()),
        },
        "delivery": {
            "in_flight": s.dispatch.in_flight.load(Ordering::Relaxed),
            "running": s.dispatch.running.lock().ok().map(|r| r.clone()).unwrap_or_default(),
        },
        "history": s.history.as_ref().map(|h| serde_json::json!({
            "stored_lsn": Lsn(h.stored.load(Ordering::Relaxed)).to_string(),
            "error": h.error.lock().ok().and_then(|e| e.clone()),
        })),
    });
    let code = if connected || (standby && !c.stopped.is_cancelled()) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body))
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let mut values = vec![
        (metric::EVENTS, "counter", load(&s.dispatch.events)),
        (metric::RUNS, "counter", load(&s.dispatch.runs)),
        (metric::FAILURES, "counter", load(&s.dispatch.failures)),
        (metric::PARKED, "counter", load(&s.dispatch.parked)),
        (metric::DEAD, "counter", load(&s.dispatch.dead)),
        (metric::IN_FLIGHT, "gauge", load(&s.dispatch.in_flight)),
    ];
    if let Some(c) = &s.consumer {
        values.extend([
            (
                metric::CONNECTED,
                "gauge",
                c.connected.load(Ordering::Relaxed) as u64,
            ),
            (metric::RECEIVED_LSN, "gauge", load(&c.received_lsn)),
            (metric::CONFIRMED_LSN, "gauge", load(&c.confirmed_lsn)),
            (metric::SETTLED_LSN, "gauge", load(&c.settled_lsn)),
            (metric::RECONNECTS, "counter", load(&c.reconnects)),
            (metric::STREAMED_BYTES, "gauge", load(&c.streamed_bytes)),
            (metric::SPILLED_BYTES, "counter", load(&c.spilled_bytes)),
        ]);
    }
    if let Some(p) = &s.proxy_connections {
        values.push((metric::PROXY_CONNECTIONS, "gauge", load(p)));
    }
    let out: String = values
        .into_iter()
        .map(|(name, kind, v)| format!("# TYPE {name} {kind}\n{name} {v}\n"))
        .collect();
    ([("content-type", "text/plain; version=0.0.4")], out)
}
