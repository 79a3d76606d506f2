//! The execution history (pgfire.executions) as operators read it: filtered lists, the newest
//! runs after a given id (the dashboard's live view), and runs per minute by status (its chart).

use serde::Serialize;
use tokio_postgres::Client;

use super::{OpsError, Result};

/// Every status pgfire.executions records; `failed` selects error, timeout and dead.
pub const STATUSES: [&str; 6] = ["ok", "error", "timeout", "blocked", "modified", "dead"];

#[derive(Debug, Clone, Default)]
pub struct ExecutionFilter {
    pub event_type: Option<String>,
    pub function: Option<String>,
    pub status: Option<String>,
    /// `30s`, `15m`, `2h`, `1d` ago, or a timestamp PostgreSQL reads.
    pub since: Option<String>,
    pub until: Option<String>,
    /// Only runs with a larger id (the live view asks for what is new).
    pub after_id: Option<i64>,
    pub limit: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Execution {
    pub id: i64,
    pub event_id: String,
    pub event_type: String,
    pub function_name: String,
    pub attempt: i32,
    pub status: String,
    pub started_at: String,
    pub duration_ms: f64,
    pub error: Option<String>,
}

/// The statuses a `status` filter selects, or an error naming the valid ones.
pub fn statuses(status: Option<&str>) -> Result<Option<Vec<String>>> {
    let Some(s) = status.map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    if s == "failed" {
        return Ok(Some(vec!["error".into(), "timeout".into(), "dead".into()]));
    }
    if STATUSES.contains(&s) {
        return Ok(Some(vec![s.to_string()]));
    }
    Err(OpsError::Invalid(format!(
        "unknown status \"{s}\": use one of {}, or failed (error, timeout and dead)",
        STATUSES.join(", ")
    )))
}

/// A time as PostgreSQL reads it: `15m` (and `s`, `h`, `d`) become that long ago, anything else
/// is passed on as a timestamp and checked by [`check_time`].
pub fn resolve_time(t: &str) -> Result<String> {
    let t = t.trim();
    let relative = t
        .strip_suffix(['s', 'm', 'h', 'd'])
        .and_then(|n| n.parse::<i64>().ok())
        .filter(|n| (0..=36_500 * 86_400).contains(n));
    if let Some(n) = relative {
        let unit = match t.chars().last() {
            Some('s') => 1,
            Some('m') => 60,
            Some('h') => 3600,
            _ => 86_400,
        };
        let at = chrono::Utc::now() - chrono::Duration::seconds(n.saturating_mul(unit));
        return Ok(at.to_rfc3339());
    }
    if t.is_empty() || t.len() > 64 {
        return Err(bad_time(t));
    }
    Ok(t.to_string())
}

fn bad_time(t: &str) -> OpsError {
    OpsError::Invalid(format!(
        "invalid time \"{t}\": use 30s, 15m, 2h, 1d (that long ago) or a timestamp such as 2026-12-02 03:00:00Z"
    ))
}

/// Check that PostgreSQL reads `t` as a timestamp.
pub(crate) async fn check_time(c: &Client, t: &str) -> Result<()> {
    c.query_one("SELECT $1::text::timestamptz", &[&t])
        .await
        .map(|_| ())
        .map_err(|_| bad_time(t))
}

fn nonempty(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// Runs matching `f`, newest first.
pub async fn executions(c: &Client, f: &ExecutionFilter) -> Result<Vec<Execution>> {
    let statuses = statuses(f.status.as_deref())?;
    let since = nonempty(&f.since).map(resolve_time).transpose()?;
    let until = nonempty(&f.until).map(resolve_time).transpose()?;
    for t in since.iter().chain(until.iter()) {
        check_time(c, t).await?;
    }
    let limit = f.limit.clamp(1, 10_000);
    let rows = c
        .query(
            &format!(
                "SELECT id, event_id, event_type, function_name, attempt, status, {}, duration_ms, error
                   FROM pgfire.executions
                  WHERE ($1::text IS NULL OR event_type = $1)
                    AND ($2::text IS NULL OR function_name = $2)
                    AND ($3::text[] IS NULL OR status = ANY($3))
                    AND ($4::text IS NULL OR started_at >= $4::text::timestamptz)
                    AND ($5::text IS NULL OR started_at <= $5::text::timestamptz)
                    AND ($6::bigint IS NULL OR id > $6)
                  ORDER BY id DESC LIMIT $7",
                super::timestamp("started_at")
            ),
            &[
                &nonempty(&f.event_type),
                &nonempty(&f.function),
                &statuses,
                &since,
                &until,
                &f.after_id,
                &limit,
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Execution {
            id: r.get(0),
            event_id: r.get(1),
            event_type: r.get(2),
            function_name: r.get(3),
            attempt: r.get(4),
            status: r.get(5),
            started_at: r.get(6),
            duration_ms: r.get(7),
            error: r.get(8),
        })
        .collect())
}

/// Runs of one minute, by status.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Minute {
    /// Unix seconds of the minute's start.
    pub minute: i64,
    pub status: String,
    pub runs: i64,
}

/// Runs per minute by status over the last hour.
pub async fn runs_per_minute(c: &Client) -> Result<Vec<Minute>> {
    let rows = c
        .query(
            "SELECT extract(epoch FROM date_trunc('minute', started_at))::bigint, status, count(*)::bigint
               FROM pgfire.executions
              WHERE started_at > now() - interval '1 hour'
              GROUP BY 1, 2 ORDER BY 1, 2",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Minute {
            minute: r.get(0),
            status: r.get(1),
            runs: r.get(2),
        })
        .collect())
}

/// A run in the delivery engine's retry queue (pgfire.parked).
#[derive(Debug, Clone, Serialize)]
pub struct ParkedRun {
    pub function_name: String,
    pub event_type: String,
    pub event_id: String,
    /// `parked` (retried by pgfire) or `dead` (given up; redeliver sends it again).
    pub status: String,
    pub attempt: i32,
    pub next_try: String,
    pub parked_at: String,
    pub last_error: Option<String>,
    /// The newest execution of this run, the handle `pgfire.redeliver(execution)` takes.
    pub execution_id: Option<i64>,
}

/// The retry queue, dead runs first then by next try; `None` on a database without the
/// delivery engine's migration.
pub async fn parked(c: &Client, limit: i64) -> Result<Option<Vec<ParkedRun>>> {
    if !super::has_redeliver(c).await? {
        return Ok(None);
    }
    let rows = c
        .query(
            &format!(
                "SELECT p.function_name, p.event_type, p.event_id, p.status, p.attempt, {}, {}, p.last_error,
                        (SELECT max(e.id) FROM pgfire.executions e
                          WHERE e.function_name = p.function_name AND e.event_id = p.event_id)
                   FROM pgfire.parked p
                  ORDER BY p.status = 'dead' DESC, p.next_try, p.id
                  LIMIT $1",
                super::timestamp("p.next_try"),
                super::timestamp("p.parked_at")
            ),
            &[&limit],
        )
        .await?;
    Ok(Some(
        rows.iter()
            .map(|r| ParkedRun {
                function_name: r.get(0),
                event_type: r.get(1),
                event_id: r.get(2),
                status: r.get(3),
                attempt: r.get(4),
                next_try: r.get(5),
                parked_at: r.get(6),
                last_error: r.get(7),
                execution_id: r.get(8),
            })
            .collect(),
    ))
}

/// The dead or parked run behind an execution, when the delivery engine keeps one.
pub async fn redeliverable(c: &Client, ids: &[i64]) -> Result<Vec<i64>> {
    if ids.is_empty() || !super::has_redeliver(c).await? {
        return Ok(Vec::new());
    }
    let rows = c
        .query(
            "SELECT e.id FROM pgfire.executions e
               JOIN pgfire.parked p ON p.function_name = e.function_name AND p.event_id = e.event_id
              WHERE e.id = ANY($1) AND p.status = 'dead'",
            &[&ids],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_checked() {
        assert_eq!(statuses(None).unwrap(), None);
        assert_eq!(statuses(Some(" ")).unwrap(), None);
        assert_eq!(statuses(Some("ok")).unwrap(), Some(vec!["ok".to_string()]));
        assert_eq!(statuses(Some("failed")).unwrap().unwrap().len(), 3);
        let err = statuses(Some("bogus")).unwrap_err().to_string();
        assert!(err.contains("unknown status \"bogus\""), "{err}");
    }

    #[test]
    fn relative_times_become_timestamps() {
        let t = resolve_time("15m").unwrap();
        let at = chrono::DateTime::parse_from_rfc3339(&t).unwrap();
        let ago = chrono::Utc::now().signed_duration_since(at);
        assert!((899..=901).contains(&ago.num_seconds()), "{ago}");
        assert_eq!(
            resolve_time("2026-12-02 03:00").unwrap(),
            "2026-12-02 03:00"
        );
        assert!(resolve_time("").is_err());
        assert!(resolve_time(&"9".repeat(100)).is_err());
    }
}
