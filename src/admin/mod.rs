//! The admin HTTP endpoint, wired here: `/healthz` (200 when the consumer streams, 503 with its
//! state and the reason when not: reconnecting, or stopped on an error retrying cannot fix),
//! `/metrics` in Prometheus' text format, and the dashboard (pages, their JSON API and assets),
//! behind [`guard`] (loopback or a token, CSRF checks on every state-changing request).

mod api;
mod chart;
mod events_page;
mod executions_page;
mod exposition;
mod functions_page;
pub mod guard;
mod html;
pub mod metric;
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
use crate::metrics::Metrics;
use crate::replication::ConsumerHealth;

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
    /// Events, runs, PRE decisions and proxy statements, as the service's parts count them.
    pub metrics: Arc<Metrics>,
    /// The slot the consumer reads (`None` without a consumer), for its lag in bytes.
    pub slot: Option<String>,
}

/// What every handler of the endpoint shares.
pub struct Dashboard {
    pub state: AdminState,
    pub db: status::AdminDb,
    /// The per-process secret state-changing requests must echo (forms and `x-csrf-token`).
    pub csrf: String,
    pub lag: status::LagHistory,
    /// What `/metrics` reads from the database, cached.
    pub gauges: exposition::DbGauges,
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
        gauges: Default::default(),
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

async fn metrics(State(d): State<Shared>) -> impl IntoResponse {
    let body = exposition::render(&d).await;
    ([("content-type", "text/plain; version=0.0.4")], body)
}
