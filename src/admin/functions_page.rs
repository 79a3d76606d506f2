//! The Functions page (`/functions`): every function with its kind, target, timeout, on_error,
//! active toggle and subscriptions, and "Send test event", which runs it once with a sample
//! envelope and shows its answer on the page.

use std::fmt::Write;

use axum::extract::rejection::FormRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Form;
use serde::Deserialize;

use super::events_page::error_page;
use super::html::{esc, hidden, options, redirect, status_badge, url_enc, Flash, Page};
use super::{Dashboard, Shared};
use crate::ops::probe::ProbeResult;
use crate::ops::{self, OpsError};

pub async fn page(State(d): State<Shared>, headers: HeaderMap) -> Response {
    render(&d, Flash::from_headers(&headers), None).await
}

async fn render(d: &Dashboard, flash: Option<Flash>, probe: Option<ProbeResult>) -> Response {
    match body(d, probe.as_ref()).await {
        Ok(body) => Page {
            title: "Functions".into(),
            section: "Functions",
            body,
            status: super::status::status_bar(d).await,
            csrf: d.csrf.clone(),
            flash,
            code: StatusCode::OK,
        }
        .into_response(),
        Err(e) => error_page(d, "Functions", e).await,
    }
}

fn probe_html(out: &mut String, p: &ProbeResult) {
    let verdict = match (p.ok, p.http_status) {
        (true, Some(s)) => format!("HTTP {s}: accepted"),
        (false, Some(s)) => format!("HTTP {s}: failed"),
        (true, None) => "accepted".into(),
        (false, None) => "failed".into(),
    };
    let envelope = serde_json::to_string_pretty(&p.envelope).unwrap_or_default();
    let _ = write!(
        out,
        "<section class=\"probe {cls}\" aria-labelledby=\"probe-title\"><h2 id=\"probe-title\">Test event result</h2>\
         <p>{f} answered a sample {e} in {ms:.1} ms: <strong id=\"probe-verdict\">{verdict}</strong></p>\
         <h3>Answer</h3><pre id=\"probe-answer\">{answer}</pre>\
         <details><summary>Envelope sent</summary><pre>{envelope}</pre></details></section>",
        cls = if p.ok { "ok" } else { "failed" },
        f = esc(&p.function),
        e = esc(&p.event_type),
        ms = p.duration_ms,
        verdict = esc(&verdict),
        answer = if p.answer.is_empty() {
            "(empty)".to_string()
        } else {
            esc(&p.answer)
        },
        envelope = esc(&envelope),
    );
}

async fn body(d: &Dashboard, probe: Option<&ProbeResult>) -> Result<String, OpsError> {
    let c = d.db.get().await?;
    let functions = ops::functions(&c).await?;
    let events = ops::events(&c).await?;
    let mut out = String::new();
    if let Some(p) = probe {
        probe_html(&mut out, p);
    }
    if functions.is_empty() {
        out.push_str(
            "<p class=\"empty\">No functions yet. Create one with SQL, for example \
             <code>INSERT INTO pgfire.functions (name, kind, target) VALUES ('notify', 'webhook', 'https://example.com/hook')</code>.</p>",
        );
        return Ok(out);
    }
    out.push_str("<div class=\"cards functions\">");
    for f in &functions {
        let name = esc(&f.name);
        let id = format!("function-{}", url_enc(&f.name));
        let (toggle, to) = if f.active {
            ("Deactivate", "false")
        } else {
            ("Activate", "true")
        };
        let _ = write!(
            out,
            "<article class=\"card function\" id=\"{id}\" aria-labelledby=\"{id}-h\"><h2 id=\"{id}-h\">{name}</h2>\
             <dl class=\"props\"><div><dt>Kind</dt><dd>{kind}</dd></div><div><dt>Target</dt><dd class=\"target\">{target}</dd></div>\
             <div><dt>Timeout</dt><dd>{timeout} ms</dd></div><div><dt>On error (PRE)</dt><dd>{on_error}</dd></div>\
             <div><dt>Status</dt><dd>{status}</dd></div><div><dt>Created</dt><dd><time datetime=\"{created}\">{created}</time></dd></div></dl>\
             <form method=\"post\" action=\"/functions/active\">{csrf}{fname}{active}<button type=\"submit\">{toggle}</button></form>",
            id = esc(&id),
            kind = esc(&f.kind),
            target = esc(f.target.as_deref().unwrap_or("–")),
            timeout = f.timeout_ms,
            on_error = esc(&f.on_error),
            status = status_badge(if f.active { "Active" } else { "Inactive" }),
            created = esc(&f.created_at),
            csrf = hidden("csrf", &d.csrf),
            fname = hidden("function", &f.name),
            active = hidden("active", to),
        );
        out.push_str("<h3>Subscriptions</h3>");
        if f.subscriptions.is_empty() {
            out.push_str("<p class=\"empty\">Not subscribed to any event.</p>");
        } else {
            out.push_str("<ul class=\"subscriptions\">");
            for s in &f.subscriptions {
                let _ = write!(
                    out,
                    "<li><a href=\"/?open={q}#event-{q}\">{e}</a> <span class=\"phase phase-{phase}\">{phase}</span> priority {p} {st}</li>",
                    q = esc(&url_enc(&s.event_type)),
                    e = esc(&s.event_type),
                    phase = esc(&s.phase),
                    p = s.priority,
                    st = status_badge(if s.active { "Active" } else { "Inactive" }),
                );
            }
            out.push_str("</ul>");
        }
        // Its own event types first, then every other.
        let mut choices: Vec<&str> = f
            .subscriptions
            .iter()
            .map(|s| s.event_type.as_str())
            .collect();
        choices.extend(
            events
                .iter()
                .map(|e| e.name.as_str())
                .filter(|n| !f.subscriptions.iter().any(|s| s.event_type == *n)),
        );
        let _ = write!(
            out,
            "<form method=\"post\" action=\"/functions/test\" class=\"test-form\">{csrf}{fname}\
             <label for=\"{id}-ev\">Event type</label><select id=\"{id}-ev\" name=\"event\">{opts}</select>\
             <button type=\"submit\">Send test event</button></form></article>",
            id = esc(&id),
            csrf = hidden("csrf", &d.csrf),
            fname = hidden("function", &f.name),
            opts = options(choices, None),
        );
    }
    out.push_str("</div>");
    Ok(out)
}

#[derive(Debug, Deserialize)]
pub struct ActiveForm {
    pub function: String,
    pub active: String,
}

pub async fn set_active(
    State(d): State<Shared>,
    form: Result<Form<ActiveForm>, FormRejection>,
) -> Response {
    let Ok(Form(f)) = form else {
        return redirect("/functions", Flash::error(&bad_form()));
    };
    let active = f.active == "true";
    let result = async {
        let c = d.db.get().await?;
        ops::set_function_active(&c, &f.function, active).await
    }
    .await;
    let back = format!("/functions#function-{}", url_enc(&f.function));
    match result {
        Ok(()) => redirect(
            &back,
            Flash::ok(format!(
                "{} is {}.",
                f.function,
                if active { "active" } else { "inactive" }
            )),
        ),
        Err(e) => redirect(&back, Flash::error(&e)),
    }
}

pub fn bad_form() -> OpsError {
    OpsError::Invalid("the form was incomplete: reload the page and try again".into())
}

#[derive(Debug, Deserialize)]
pub struct TestForm {
    pub function: String,
    pub event: String,
}

/// Run the function once and show the page with its answer (not recorded in the history).
pub async fn test_event(
    State(d): State<Shared>,
    form: Result<Form<TestForm>, FormRejection>,
) -> Response {
    let Ok(Form(f)) = form else {
        return redirect("/functions", Flash::error(&bad_form()));
    };
    let result = async {
        let c = d.db.get().await?;
        ops::probe::send_test_event(&c, d.db.url(), &f.function, &f.event).await
    }
    .await;
    match result {
        Ok(p) => render(&d, None, Some(p)).await,
        Err(e) => render(&d, Some(Flash::error(&e)), None).await,
    }
}
