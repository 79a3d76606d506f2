//! The Executions page (`/executions`): the history with filters (event type, function, status,
//! time range), each failed run with its error and attempt, Redeliver for dead runs, new runs
//! appearing live (app.js polls /api/executions), and the last hour's chart.

use std::fmt::Write;

use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Form;
use serde::Deserialize;

use super::events_page::error_page;
use super::functions_page::bad_form;
use super::html::{esc, hidden, options, redirect, status_badge, url_enc, Flash, Page};
use super::{Dashboard, Shared};
use crate::ops::history::{self, Execution, ExecutionFilter, STATUSES};
use crate::ops::{self, OpsError, Redeliver};

/// Runs listed at most on one page.
const PAGE_RUNS: i64 = 200;

#[derive(Debug, Deserialize, Default, Clone)]
pub struct Filters {
    pub event_type: Option<String>,
    pub function: Option<String>,
    pub status: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    /// The live view asks for runs after this id.
    pub after: Option<i64>,
}

impl Filters {
    pub fn to_filter(&self, limit: i64) -> ExecutionFilter {
        ExecutionFilter {
            event_type: self.event_type.clone(),
            function: self.function.clone(),
            status: self.status.clone(),
            since: self.since.clone(),
            until: self.until.clone(),
            after_id: self.after,
            limit,
        }
    }

    /// The filters as a query string (without `after`), for the live view.
    fn query(&self) -> String {
        [
            ("event_type", &self.event_type),
            ("function", &self.function),
            ("status", &self.status),
            ("since", &self.since),
            ("until", &self.until),
        ]
        .iter()
        .filter_map(|(k, v)| {
            v.as_deref()
                .filter(|v| !v.is_empty())
                .map(|v| format!("{k}={}", url_enc(v)))
        })
        .collect::<Vec<_>>()
        .join("&")
    }
}

pub async fn page(
    State(d): State<Shared>,
    query: Result<Query<Filters>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let flash = Flash::from_headers(&headers);
    let (filters, flash) = match query {
        Ok(Query(f)) => (f, flash),
        Err(_) => (
            Filters::default(),
            Some(Flash::error(&OpsError::Invalid(
                "the filters could not be read: showing every run".into(),
            ))),
        ),
    };
    match body(&d, &filters).await {
        Ok((body, filter_error)) => Page {
            title: "Executions".into(),
            section: "Executions",
            body,
            status: super::status::status_bar(&d).await,
            csrf: d.csrf.clone(),
            flash: filter_error.map(|e| Flash::error(&e)).or(flash),
            code: StatusCode::OK,
        }
        .into_response(),
        Err(e) => error_page(&d, "Executions", e).await,
    }
}

/// One run as a table row (the same markup app.js builds for live rows).
pub fn row(out: &mut String, r: &Execution, redeliverable: bool, csrf: &str) {
    let action = if redeliverable {
        format!(
            "<form method=\"post\" action=\"/executions/redeliver\">{}{}<button type=\"submit\">Redeliver</button></form>",
            hidden("csrf", csrf),
            hidden("execution", &r.id.to_string())
        )
    } else {
        String::new()
    };
    let _ = write!(
        out,
        "<tr data-id=\"{id}\" data-status=\"{st}\"><td>{id}</td><td><time datetime=\"{at}\">{at}</time></td><td>{ev}</td>\
         <td><a href=\"/executions?function={fq}\">{f}</a></td><td>{badge}</td><td>{attempt}</td><td>{ms:.1} ms</td>\
         <td class=\"error\">{err}</td><td>{action}</td></tr>",
        id = r.id,
        st = esc(&r.status),
        at = esc(&r.started_at),
        ev = esc(&r.event_type),
        fq = esc(&url_enc(&r.function_name)),
        f = esc(&r.function_name),
        badge = status_badge(&r.status),
        attempt = r.attempt,
        ms = r.duration_ms,
        err = esc(r.error.as_deref().unwrap_or("")),
    );
}

async fn body(d: &Dashboard, f: &Filters) -> Result<(String, Option<OpsError>), OpsError> {
    let c = d.db.get().await?;
    let events = ops::events(&c).await?;
    let functions = ops::functions(&c).await?;
    // A filter the database cannot read is shown as a message above an unfiltered list.
    let (runs, filter_error) = match history::executions(&c, &f.to_filter(PAGE_RUNS)).await {
        Ok(r) => (r, None),
        Err(e @ OpsError::Invalid(_)) => (
            history::executions(&c, &Filters::default().to_filter(PAGE_RUNS)).await?,
            Some(e),
        ),
        Err(e) => return Err(e),
    };
    let ids: Vec<i64> = runs
        .iter()
        .filter(|r| r.status != "ok")
        .map(|r| r.id)
        .collect();
    let redeliverable = history::redeliverable(&c, &ids).await?;
    let minutes = history::runs_per_minute(&c).await?;
    let mut out = String::new();
    let status_choices: Vec<&str> = STATUSES.iter().copied().chain(["failed"]).collect();
    let _ = write!(
        out,
        "<form method=\"get\" action=\"/executions\" class=\"filters\" aria-label=\"Filters\">\
         <label for=\"f-event\">Event type</label><select id=\"f-event\" name=\"event_type\"><option value=\"\">any</option>{ev}</select>\
         <label for=\"f-function\">Function</label><select id=\"f-function\" name=\"function\"><option value=\"\">any</option>{fu}</select>\
         <label for=\"f-status\">Status</label><select id=\"f-status\" name=\"status\"><option value=\"\">any</option>{st}</select>\
         <label for=\"f-since\">Since</label><input id=\"f-since\" name=\"since\" placeholder=\"1h, 15m or 2026-12-02 03:00\" value=\"{since}\">\
         <label for=\"f-until\">Until</label><input id=\"f-until\" name=\"until\" placeholder=\"now\" value=\"{until}\">\
         <button type=\"submit\">Filter</button> <a href=\"/executions\">Clear</a></form>",
        ev = options(events.iter().map(|e| e.name.as_str()), f.event_type.as_deref()),
        fu = options(functions.iter().map(|f| f.name.as_str()), f.function.as_deref()),
        st = options(status_choices, f.status.as_deref()),
        since = esc(f.since.as_deref().unwrap_or("")),
        until = esc(f.until.as_deref().unwrap_or("")),
    );
    let _ = write!(
        out,
        "<section aria-labelledby=\"chart-h\"><h2 id=\"chart-h\">Last hour</h2><div id=\"chart\">{}</div></section>",
        super::chart::render(&minutes, &d.lag.samples(), chrono::Utc::now().timestamp())
    );
    let after = runs.iter().map(|r| r.id).max().unwrap_or(0);
    let live = f.until.as_deref().is_none_or(str::is_empty);
    let _ = write!(
        out,
        "<section aria-labelledby=\"runs-h\"><h2 id=\"runs-h\">Runs</h2>\
         <p class=\"live\">{live_note}</p>\
         <table class=\"runs\"><caption>Function runs, newest first</caption><thead><tr>\
         <th scope=\"col\">ID</th><th scope=\"col\">Started</th><th scope=\"col\">Event</th><th scope=\"col\">Function</th>\
         <th scope=\"col\">Status</th><th scope=\"col\">Attempt</th><th scope=\"col\">Duration</th><th scope=\"col\">Error</th>\
         <th scope=\"col\">Action</th></tr></thead><tbody id=\"runs\" data-live=\"{live}\" data-after=\"{after}\" data-query=\"{q}\">",
        live_note = if live {
            "<span id=\"live-state\">Live: new runs appear here as they happen.</span>"
        } else {
            "Not live: the range has an end."
        },
        q = esc(&f.query()),
    );
    for r in &runs {
        row(&mut out, r, redeliverable.contains(&r.id), &d.csrf);
    }
    out.push_str("</tbody></table>");
    if runs.is_empty() {
        out.push_str("<p class=\"empty\" id=\"runs-empty\">No runs match.</p>");
    }
    out.push_str("</section>");
    retry_queue(&mut out, history::parked(&c, PAGE_RUNS).await?, &d.csrf);
    Ok((out, filter_error))
}

/// The delivery engine's retry queue: parked runs (retried by pgfire) and dead ones, which
/// Redeliver sends again.
fn retry_queue(out: &mut String, parked: Option<Vec<history::ParkedRun>>, csrf: &str) {
    out.push_str("<section aria-labelledby=\"queue-h\"><h2 id=\"queue-h\">Retry queue</h2>");
    let Some(parked) = parked else {
        out.push_str(
            "<p class=\"empty\">Waiting for the delivery engine: this database has no retry queue yet \
             (pgfire.parked and pgfire.redeliver come with migration 006; run pgfire install after upgrading).</p></section>",
        );
        return;
    };
    if parked.is_empty() {
        out.push_str("<p class=\"empty\">No parked or dead runs.</p></section>");
        return;
    }
    out.push_str(
        "<table class=\"runs\"><caption>Parked and dead runs</caption><thead><tr><th scope=\"col\">Function</th>\
         <th scope=\"col\">Event</th><th scope=\"col\">Status</th><th scope=\"col\">Attempt</th><th scope=\"col\">Next try</th>\
         <th scope=\"col\">Last error</th><th scope=\"col\">Action</th></tr></thead><tbody>",
    );
    let mut dead_functions: Vec<&str> = Vec::new();
    for p in &parked {
        let action = match (p.status.as_str(), p.execution_id) {
            ("dead", Some(id)) => format!(
                "<form method=\"post\" action=\"/executions/redeliver\">{}{}<button type=\"submit\">Redeliver</button></form>",
                hidden("csrf", csrf),
                hidden("execution", &id.to_string())
            ),
            _ => String::new(),
        };
        if p.status == "dead" && !dead_functions.contains(&p.function_name.as_str()) {
            dead_functions.push(&p.function_name);
        }
        let _ = write!(
            out,
            "<tr><td>{f}</td><td>{ev} <span class=\"note\">{id}</span></td><td>{st}</td><td>{attempt}</td>\
             <td><time datetime=\"{next}\">{next}</time></td><td class=\"error\">{err}</td><td>{action}</td></tr>",
            f = esc(&p.function_name),
            ev = esc(&p.event_type),
            id = esc(&p.event_id),
            st = status_badge(&p.status),
            attempt = p.attempt,
            next = esc(if p.status == "dead" { "–" } else { &p.next_try }),
            err = esc(p.last_error.as_deref().unwrap_or("")),
        );
    }
    out.push_str("</tbody></table>");
    for f in dead_functions {
        let _ = write!(
            out,
            "<form method=\"post\" action=\"/executions/redeliver\" class=\"inline\">{}{}\
             <button type=\"submit\">Redeliver every dead run of {}</button></form>",
            hidden("csrf", csrf),
            hidden("function", f),
            esc(f)
        );
    }
    out.push_str("</section>");
}

/// One execution's dead run, or every dead run of a function.
#[derive(Debug, Deserialize)]
pub struct RedeliverForm {
    pub execution: Option<i64>,
    pub function: Option<String>,
}

pub async fn redeliver(
    State(d): State<Shared>,
    form: Result<Form<RedeliverForm>, FormRejection>,
) -> Response {
    let Ok(Form(f)) = form else {
        return redirect("/executions", Flash::error(&bad_form()));
    };
    let (what, name) = match (f.execution, f.function) {
        (Some(id), _) => (Redeliver::Execution(id), format!("execution {id}")),
        (None, Some(function)) => (
            Redeliver::Function(function.clone()),
            format!("function {function}"),
        ),
        (None, None) => return redirect("/executions", Flash::error(&bad_form())),
    };
    let result = async {
        let c = d.db.get().await?;
        ops::redeliver(&c, &what).await
    }
    .await;
    match result {
        Ok(0) => redirect(
            "/executions",
            Flash::error(&OpsError::Invalid(format!(
                "{name} has no dead run to send again (it may have been redelivered already)"
            ))),
        ),
        Ok(n) => redirect(
            "/executions",
            Flash::ok(format!(
                "{n} dead run{} of {name} sent again; new runs appear below.",
                if n == 1 { "" } else { "s" }
            )),
        ),
        Err(e) => redirect("/executions", Flash::error(&e)),
    }
}
