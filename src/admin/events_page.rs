//! The Events page (`/`): a card per event type, grouped as the seed groups them, each expanding
//! to its subscribers with Subscribe, activate/deactivate and Unsubscribe (with a confirmation
//! page), all over pgfire.subscriptions.

use std::fmt::Write;

use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Form;
use serde::Deserialize;

use super::functions_page::bad_form;
use super::html::{esc, hidden, redirect, status_badge, url_enc, Flash, Page};
use super::{Dashboard, Shared};
use crate::ops::{self, OpsError, Subscribed};

/// A page that could not be built: the error, readable, with the shell around it.
pub async fn error_page(d: &Dashboard, section: &'static str, err: OpsError) -> Response {
    let code = StatusCode::from_u16(err.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    Page {
        title: "Something went wrong".into(),
        section,
        body: format!(
            "<p class=\"flash error\" role=\"alert\">{}</p><p><a href=\"/\">Back to the events</a></p>",
            esc(&err.to_string())
        ),
        status: super::status::status_bar(d).await,
        csrf: d.csrf.clone(),
        flash: None,
        code,
    }
    .into_response()
}

#[derive(Debug, Deserialize, Default)]
pub struct PageQuery {
    /// The card shown expanded.
    pub open: Option<String>,
}

pub async fn page(
    State(d): State<Shared>,
    query: Result<Query<PageQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let q = query.map(|Query(q)| q).unwrap_or_default();
    match body(&d, q.open.as_deref()).await {
        Ok(body) => Page {
            title: "Events".into(),
            section: "Events",
            body,
            status: super::status::status_bar(&d).await,
            csrf: d.csrf.clone(),
            flash: Flash::from_headers(&headers),
            code: StatusCode::OK,
        }
        .into_response(),
        Err(e) => error_page(&d, "Events", e).await,
    }
}

fn card_id(event: &str) -> String {
    format!("event-{}", url_enc(event))
}

/// Where to go back to after acting on `event`'s card.
fn back_to(event: &str) -> String {
    format!("/?open={}#{}", url_enc(event), card_id(event))
}

async fn body(d: &Dashboard, open: Option<&str>) -> Result<String, OpsError> {
    let c = d.db.get().await?;
    let events = ops::events(&c).await?;
    let subs = ops::subscribers(&c, None).await?;
    let functions = ops::functions(&c).await?;
    let limit = ops::subscription_limit(&c).await?;
    let mut out = String::from(
        "<p class=\"lede\">Subscribe functions to events to run code when something happens in the database. \
         Click an event to see its subscribers.</p>",
    );
    for (group, heading) in ops::GROUPS {
        let in_group: Vec<_> = events.iter().filter(|e| e.group == group).collect();
        if in_group.is_empty() {
            continue;
        }
        let _ = write!(
            out,
            "<section class=\"group\" aria-labelledby=\"g-{group}\"><h2 id=\"g-{group}\">{heading}</h2><div class=\"cards\">"
        );
        for e in in_group {
            let mine: Vec<_> = subs.iter().filter(|s| s.event_type == e.name).collect();
            let open = open == Some(e.name.as_str());
            card(&mut out, e, &mine, &functions, limit, open, &d.csrf);
        }
        out.push_str("</div></section>");
    }
    Ok(out)
}

fn card(
    out: &mut String,
    e: &ops::EventType,
    subs: &[&ops::Subscriber],
    functions: &[ops::Function],
    limit: i32,
    open: bool,
    csrf: &str,
) {
    let name = esc(&e.name);
    let count = match (e.subscribers, e.active_subscribers) {
        (1, 1) => "1 subscriber".to_string(),
        (n, a) if n == a => format!("{n} subscribers"),
        (n, a) => format!("{n} subscribers, {a} active"),
    };
    let _ = write!(
        out,
        "<article class=\"card\" id=\"{id}\"><details{open}><summary>\
         <h3 class=\"event-name\">{name}</h3> <span class=\"phase phase-{phase}\">{phase}</span> \
         <span class=\"count\" data-subscribers=\"{n}\">{count}</span>\
         <p class=\"description\">{desc}</p></summary><div class=\"card-body\">",
        id = esc(&card_id(&e.name)),
        open = if open { " open" } else { "" },
        phase = esc(&e.phase),
        n = e.subscribers,
        count = esc(&count),
        desc = esc(&e.description),
    );
    if subs.is_empty() {
        out.push_str("<p class=\"empty\">No functions subscribed yet.</p>");
    } else {
        let _ = write!(
            out,
            "<table class=\"subscribers\"><caption>Subscribers of {name}</caption><thead><tr>\
             <th scope=\"col\">Function</th><th scope=\"col\">Status</th><th scope=\"col\">Priority</th>\
             <th scope=\"col\">Subscribed</th><th scope=\"col\">Actions</th></tr></thead><tbody>"
        );
        for s in subs {
            let f = esc(&s.function_name);
            let status = match (s.active, s.function_active) {
                (true, true) => status_badge("Active"),
                (true, false) => format!(
                    "{} <span class=\"note\">(the function is inactive)</span>",
                    status_badge("Active")
                ),
                (false, _) => status_badge("Inactive"),
            };
            let status = if s.shadow {
                format!("{status} <span class=\"note\">(shadow: its decision is recorded, never applied)</span>")
            } else {
                status
            };
            let (toggle, to) = if s.active {
                ("Deactivate", "false")
            } else {
                ("Activate", "true")
            };
            let keys = format!(
                "{}{}",
                hidden("event", &s.event_type),
                hidden("function", &s.function_name)
            );
            let _ = write!(
                out,
                "<tr><th scope=\"row\"><a href=\"/functions#function-{anchor}\">{f}</a></th><td>{status}</td>\
                 <td>{prio}</td><td><time datetime=\"{at}\">{at}</time></td><td class=\"actions\">\
                 <form method=\"post\" action=\"/events/active\">{csrf}{keys}{active}<button type=\"submit\">{toggle}</button></form>\
                 <form method=\"get\" action=\"/events/unsubscribe\">{keys}<button type=\"submit\" class=\"danger\">Unsubscribe</button></form>\
                 </td></tr>",
                anchor = esc(&url_enc(&s.function_name)),
                prio = s.priority,
                at = esc(&s.subscribed_at),
                csrf = hidden("csrf", csrf),
                active = hidden("active", to),
            );
        }
        out.push_str("</tbody></table>");
    }
    if e.active_subscribers >= limit {
        let _ = write!(
            out,
            "<p class=\"limit\" role=\"note\">Limit reached: {name} has {} active subscriptions, the most an event may have \
             (setting limits.subscriptions_per_event is {limit}). Deactivate or unsubscribe one before subscribing another.</p>",
            e.active_subscribers
        );
    }
    let free: Vec<&str> = functions
        .iter()
        .filter(|f| !subs.iter().any(|s| s.function_name == f.name))
        .map(|f| f.name.as_str())
        .collect();
    let field = format!("sub-{}", url_enc(&e.name));
    let _ = write!(
        out,
        "<details class=\"subscribe\"><summary>Subscribe Function</summary>"
    );
    if free.is_empty() {
        out.push_str(if functions.is_empty() {
            "<p>No functions yet: create one with <code>INSERT INTO pgfire.functions (name, kind, target) VALUES (…)</code>.</p>"
        } else {
            "<p>Every function is subscribed to this event already.</p>"
        });
    } else {
        let _ = write!(
            out,
            "<form method=\"post\" action=\"/events/subscribe\" class=\"subscribe-form\">{}{}\
             <label for=\"{field}-fn\">Function</label><select id=\"{field}-fn\" name=\"function\" required>{}</select>\
             <label for=\"{field}-prio\">Priority</label><input id=\"{field}-prio\" name=\"priority\" type=\"number\" value=\"0\" step=\"1\" required>\
             <button type=\"submit\">Subscribe</button></form>",
            hidden("csrf", csrf),
            hidden("event", &e.name),
            super::html::options(free.iter().copied(), None),
            field = esc(&field),
        );
    }
    out.push_str("</details></div></details></article>");
}

#[derive(Debug, Deserialize)]
pub struct SubscribeForm {
    pub event: String,
    pub function: String,
    pub priority: String,
}

pub async fn subscribe(
    State(d): State<Shared>,
    form: Result<Form<SubscribeForm>, FormRejection>,
) -> Response {
    let Ok(Form(f)) = form else {
        return redirect("/", Flash::error(&bad_form()));
    };
    let back = back_to(&f.event);
    let result = async {
        let priority: i32 = f.priority.trim().parse().map_err(|_| {
            OpsError::Invalid(format!(
                "priority must be a whole number (lower runs first), not \"{}\"",
                f.priority
            ))
        })?;
        let c = d.db.get().await?;
        ops::subscribe(&c, &f.event, &f.function, priority, false).await
    }
    .await;
    match result {
        Ok(Subscribed::New) => redirect(
            &back,
            Flash::ok(format!("Subscribed {} to {}.", f.function, f.event)),
        ),
        Ok(Subscribed::Updated) => redirect(
            &back,
            Flash::ok(format!(
                "{} was subscribed to {} already: its priority is set and it is active.",
                f.function, f.event
            )),
        ),
        Err(e) => redirect(&back, Flash::error(&e)),
    }
}

#[derive(Debug, Deserialize)]
pub struct ActiveForm {
    pub event: String,
    pub function: String,
    pub active: String,
}

pub async fn set_active(
    State(d): State<Shared>,
    form: Result<Form<ActiveForm>, FormRejection>,
) -> Response {
    let Ok(Form(f)) = form else {
        return redirect("/", Flash::error(&bad_form()));
    };
    let back = back_to(&f.event);
    let active = f.active == "true";
    let result = async {
        let c = d.db.get().await?;
        ops::set_subscription_active(&c, &f.event, &f.function, active).await
    }
    .await;
    match result {
        Ok(()) => redirect(
            &back,
            Flash::ok(format!(
                "The subscription of {} to {} is {}.",
                f.function,
                f.event,
                if active { "active" } else { "inactive" }
            )),
        ),
        Err(e) => redirect(&back, Flash::error(&e)),
    }
}

#[derive(Debug, Deserialize)]
pub struct Pair {
    pub event: String,
    pub function: String,
}

/// The confirmation step of Unsubscribe.
pub async fn confirm_unsubscribe(
    State(d): State<Shared>,
    query: Result<Query<Pair>, QueryRejection>,
) -> Response {
    let Ok(Query(p)) = query else {
        return error_page(&d, "Events", bad_form()).await;
    };
    let found = async {
        let c = d.db.get().await?;
        let subs = ops::subscribers(&c, Some(&p.event)).await?;
        match subs.iter().any(|s| s.function_name == p.function) {
            true => Ok(()),
            false => Err(OpsError::NotSubscribed {
                event: p.event.clone(),
                function: p.function.clone(),
            }),
        }
    }
    .await;
    if let Err(e) = found {
        return error_page(&d, "Events", e).await;
    }
    let body = format!(
        "<p>{f} will no longer run when {e} fires. Its execution history stays.</p>\
         <form method=\"post\" action=\"/events/unsubscribe\" class=\"confirm\">{csrf}{ev}{fn_}\
         <button type=\"submit\" class=\"danger\">Confirm</button> <a href=\"{back}\">Cancel</a></form>",
        f = esc(&p.function),
        e = esc(&p.event),
        csrf = hidden("csrf", &d.csrf),
        ev = hidden("event", &p.event),
        fn_ = hidden("function", &p.function),
        back = esc(&back_to(&p.event)),
    );
    Page {
        title: format!("Unsubscribe {} from {}?", p.function, p.event),
        section: "Events",
        body,
        status: super::status::status_bar(&d).await,
        csrf: d.csrf.clone(),
        flash: None,
        code: StatusCode::OK,
    }
    .into_response()
}

pub async fn unsubscribe(
    State(d): State<Shared>,
    form: Result<Form<Pair>, FormRejection>,
) -> Response {
    let Ok(Form(p)) = form else {
        return redirect("/", Flash::error(&bad_form()));
    };
    let back = back_to(&p.event);
    let result = async {
        let c = d.db.get().await?;
        ops::unsubscribe(&c, &p.event, &p.function).await
    }
    .await;
    match result {
        Ok(()) => redirect(
            &back,
            Flash::ok(format!("Unsubscribed {} from {}.", p.function, p.event)),
        ),
        Err(e) => redirect(&back, Flash::error(&e)),
    }
}
