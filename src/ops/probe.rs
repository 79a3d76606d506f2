//! "Send a test event": run one function once with a sample envelope and show its answer (a
//! webhook's HTTP status and body, a sql function's returned value; for a PRE event that answer
//! is the allow/block/modify decision). Nothing is recorded in the history: it is a probe, not an
//! event.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};
use tokio_postgres::Client;

use super::{OpsError, Result};

/// Bytes of an answer shown at most.
const ANSWER_LIMIT: usize = 16 * 1024;

#[derive(Debug, Clone, Serialize)]
pub struct ProbeResult {
    pub function: String,
    pub event_type: String,
    /// The function accepted the event (2xx, a value returned, a line logged).
    pub ok: bool,
    /// For a webhook, the HTTP status.
    pub http_status: Option<u16>,
    /// What it answered: the body, the returned value, or what went wrong.
    pub answer: String,
    pub duration_ms: f64,
    /// The envelope sent.
    pub envelope: Value,
}

/// A sample envelope of `event_type`, shaped like the real ones.
pub fn sample_envelope(event_type: &str, database: &str) -> Value {
    let id = format!("test-{}", chrono::Utc::now().timestamp_micros());
    let data = if event_type.contains("_USER_") {
        json!({"user_id": 1, "id": 1, "email": "ada@example.com", "name": "Ada"})
    } else if event_type.contains("_RECORD_") {
        json!({"record_id": 1, "id": 1, "table": "records"})
    } else if event_type.starts_with("api.dataTable") {
        json!({"schema": "public", "table": "example", "columns": []})
    } else if event_type.starts_with("auth.") || event_type.contains("LOG") {
        json!({"user_id": 1, "email": "ada@example.com"})
    } else {
        json!({})
    };
    let mut data = data;
    if event_type.ends_with("_UPDATE") {
        data["changes"] =
            json!({"email": {"old": "ada@old.example.com", "new": "ada@example.com"}});
    }
    json!({
        "id": id,
        "event_type": event_type,
        "event_data": data,
        "occurred_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "source": {"database": database, "test": true},
    })
}

/// Run `function` once with a sample `event_type` envelope.
pub async fn send_test_event(
    c: &Client,
    database_url: &str,
    function: &str,
    event_type: &str,
) -> Result<ProbeResult> {
    let row = c
        .query_opt(
            "SELECT kind, target, secret, timeout_ms, current_database()::text FROM pgfire.functions WHERE name = $1",
            &[&function],
        )
        .await?
        .ok_or_else(|| OpsError::UnknownFunction(function.to_string()))?;
    let (kind, target, secret, timeout_ms, database): (
        String,
        Option<String>,
        Option<String>,
        i32,
        String,
    ) = (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    if c.query_opt(
        "SELECT 1 FROM pgfire.event_types WHERE name = $1",
        &[&event_type],
    )
    .await?
    .is_none()
    {
        return Err(OpsError::UnknownEvent(event_type.to_string()));
    }
    let envelope = sample_envelope(event_type, &database);
    let timeout = Duration::from_millis(timeout_ms.max(1) as u64);
    let started = Instant::now();
    let (ok, http_status, answer) = match kind.as_str() {
        "webhook" => {
            webhook(
                target.as_deref().unwrap_or(""),
                secret.as_deref(),
                &envelope,
                timeout,
            )
            .await
        }
        "sql" => {
            sql(
                database_url,
                target.as_deref().unwrap_or(""),
                &envelope,
                timeout,
            )
            .await
        }
        "log" => {
            tracing::info!(function, event_type, "test event (log function)");
            (
                true,
                None,
                "logged one line (log functions answer nothing)".into(),
            )
        }
        other => (
            false,
            None,
            format!("test events for {other} functions are not supported by the dashboard yet"),
        ),
    };
    Ok(ProbeResult {
        function: function.to_string(),
        event_type: event_type.to_string(),
        ok,
        http_status,
        answer: truncate(answer),
        duration_ms: started.elapsed().as_secs_f64() * 1000.0,
        envelope,
    })
}

fn truncate(mut s: String) -> String {
    if s.len() > ANSWER_LIMIT {
        let mut end = ANSWER_LIMIT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str(" …");
    }
    s
}

async fn webhook(
    url: &str,
    secret: Option<&str>,
    envelope: &Value,
    timeout: Duration,
) -> (bool, Option<u16>, String) {
    let body = envelope.to_string();
    let id = envelope["id"].as_str().unwrap_or_default().to_string();
    let ts = chrono::Utc::now().timestamp();
    let client = match reqwest::Client::builder()
        .user_agent(concat!(
            "pgfire/",
            env!("CARGO_PKG_VERSION"),
            " (test event)"
        ))
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .build()
    {
        Ok(c) => c,
        Err(e) => return (false, None, format!("cannot build the HTTP client: {e}")),
    };
    let mut req = client
        .post(url)
        .header("content-type", "application/json")
        .header("webhook-id", &id)
        .header("webhook-timestamp", ts.to_string());
    if let Some(secret) = secret {
        match crate::functions::webhook::sign(secret, &id, ts, body.as_bytes()) {
            Ok(sig) => req = req.header("webhook-signature", sig),
            Err(e) => return (false, None, e),
        }
    }
    match req.body(body).send().await {
        Ok(resp) => {
            let status = resp.status();
            let text = resp
                .text()
                .await
                .unwrap_or_else(|e| format!("(body unreadable: {e})"));
            (status.is_success(), Some(status.as_u16()), text)
        }
        Err(e) if e.is_timeout() => (
            false,
            None,
            format!("timed out after {} ms", timeout.as_millis()),
        ),
        Err(e) => (false, None, format!("POST {url} failed: {e}")),
    }
}

/// A sql function runs on a session of its own, bounded by `statement_timeout`, so a slow one
/// holds up nothing else.
async fn sql(
    url: &str,
    target: &str,
    envelope: &Value,
    timeout: Duration,
) -> (bool, Option<u16>, String) {
    let c = match crate::db::connect(url).await {
        Ok(c) => c,
        Err(e) => return (false, None, format!("cannot connect: {e}")),
    };
    let run = async {
        c.batch_execute(&format!(
            "SET application_name = 'pgfire test event'; SET statement_timeout = {}",
            timeout.as_millis()
        ))
        .await?;
        // The call names the function as PostgreSQL prints it (quoted where needed).
        let q: Option<String> = c
            .query_one(
                "SELECT format('SELECT %s($1::text::jsonb)::text', to_regprocedure($1 || '(jsonb)')::oid::regproc)
                  WHERE to_regprocedure($1 || '(jsonb)') IS NOT NULL",
                &[&target],
            )
            .await
            .ok()
            .map(|r| r.get(0));
        let Some(q) = q else {
            return Ok(Err(format!("SQL function {target}(jsonb) does not exist")));
        };
        let r = c.query_one(&q, &[&envelope.to_string()]).await?;
        Ok::<_, tokio_postgres::Error>(Ok(r.get::<_, Option<String>>(0)))
    };
    match tokio::time::timeout(timeout + Duration::from_secs(1), run).await {
        Ok(Ok(Ok(v))) => (true, None, v.unwrap_or_else(|| "NULL".into())),
        Ok(Ok(Err(msg))) => (false, None, msg),
        Ok(Err(e)) => (false, None, crate::db::describe(&e)),
        Err(_) => (
            false,
            None,
            format!("timed out after {} ms", timeout.as_millis()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_look_like_events() {
        let e = sample_envelope("POST_USER_UPDATE", "app");
        assert_eq!(e["event_type"], "POST_USER_UPDATE");
        assert_eq!(e["event_data"]["user_id"], 1);
        assert!(e["event_data"]["changes"]["email"]["new"].is_string());
        assert!(e["id"].as_str().unwrap().starts_with("test-"));
        assert_eq!(
            sample_envelope("ORDER_SHIPPED", "app")["event_data"],
            json!({})
        );
    }

    #[test]
    fn long_answers_are_cut_on_a_char_boundary() {
        let s = truncate("é".repeat(ANSWER_LIMIT));
        assert!(s.ends_with(" …") && s.len() <= ANSWER_LIMIT + 4);
    }
}
