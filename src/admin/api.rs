//! The dashboard's small JSON API (read-only: status, events, functions, executions after an id
//! for the live view, the chart's SVG) and its static assets, embedded in the binary.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::executions_page::Filters;
use super::Shared;
use crate::ops::{self, history, OpsError};

const SCRIPT: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/app.css");

/// An error as JSON: `{"error": "..."}` with its status.
pub struct ApiError(OpsError);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code =
            StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (code, Json(serde_json::json!({"error": self.0.to_string()}))).into_response()
    }
}

impl From<OpsError> for ApiError {
    fn from(e: OpsError) -> Self {
        ApiError(e)
    }
}

pub async fn status(State(d): State<Shared>) -> Response {
    let bar = super::status::status_bar(&d).await;
    let html = bar.render();
    Json(serde_json::json!({"status": bar, "html": html})).into_response()
}

pub async fn events(State(d): State<Shared>) -> Result<Response, ApiError> {
    let c = d.db.get().await?;
    #[derive(Serialize)]
    struct Out {
        events: Vec<ops::EventType>,
        subscriptions: Vec<ops::Subscriber>,
    }
    Ok(Json(Out {
        events: ops::events(&c).await?,
        subscriptions: ops::subscribers(&c, None).await?,
    })
    .into_response())
}

pub async fn functions(State(d): State<Shared>) -> Result<Response, ApiError> {
    let c = d.db.get().await?;
    Ok(Json(ops::functions(&c).await?).into_response())
}

/// Runs matching the filters (after `after`, for the live view), oldest first, with the rows'
/// HTML as the page draws them.
pub async fn executions(
    State(d): State<Shared>,
    query: Result<Query<Filters>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(f) = query.map_err(|e| OpsError::Invalid(format!("bad filters: {e}")))?;
    let c = d.db.get().await?;
    let mut runs = history::executions(&c, &f.to_filter(500)).await?;
    runs.reverse();
    let dead: Vec<i64> = runs
        .iter()
        .filter(|r| r.status != "ok")
        .map(|r| r.id)
        .collect();
    let redeliverable = history::redeliverable(&c, &dead).await?;
    let rows: Vec<String> = runs
        .iter()
        .map(|r| {
            let mut s = String::new();
            super::executions_page::row(&mut s, r, redeliverable.contains(&r.id), &d.csrf);
            s
        })
        .collect();
    Ok(
        Json(serde_json::json!({"runs": runs, "rows": rows, "redeliverable": redeliverable}))
            .into_response(),
    )
}

pub async fn chart(State(d): State<Shared>) -> Result<Response, ApiError> {
    let c = d.db.get().await?;
    let minutes = history::runs_per_minute(&c).await?;
    let svg = super::chart::render(&minutes, &d.lag.samples(), chrono::Utc::now().timestamp());
    Ok(([(header::CONTENT_TYPE, "text/html; charset=utf-8")], svg).into_response())
}

pub async fn script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        SCRIPT,
    )
        .into_response()
}

pub async fn style() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        STYLE,
    )
        .into_response()
}

pub async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Not found · pgfire</title></head>\
         <body><main><h1>Not found</h1><p>There is no such page. <a href=\"/\">Events</a> · \
         <a href=\"/functions\">Functions</a> · <a href=\"/executions\">Executions</a></p></main></body></html>\n",
    )
        .into_response()
}
