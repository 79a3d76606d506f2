//! Operator actions over pgfire's SQL tables, shared by the dashboard and the CLI: the event
//! catalog and its subscribers, subscribe/unsubscribe/(de)activate, the functions, the execution
//! history with its filters, the stream's status, and redelivery. Everything goes through the same
//! tables a `psql` user would touch, so the dashboard, the CLI and SQL always agree; the database's
//! own validation errors come back as [`OpsError`]s that name the problem.

pub mod cli;
pub mod history;
pub mod probe;

use serde::Serialize;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

pub use history::{Execution, ExecutionFilter};

/// What went wrong, in terms a person acts on.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("unknown event type \"{0}\" (pgfire events lists them)")]
    UnknownEvent(String),
    #[error("unknown function \"{0}\" (pgfire functions lists them)")]
    UnknownFunction(String),
    #[error("function \"{function}\" is not subscribed to {event}")]
    NotSubscribed { event: String, function: String },
    #[error("limit reached: {0}")]
    LimitReached(String),
    #[error("{0}")]
    Invalid(String),
    #[error("not available yet: {0}")]
    Unavailable(String),
    #[error("cannot reach the database: {0}")]
    Connect(String),
    #[error("{0}")]
    Database(String),
}

impl OpsError {
    /// The HTTP status the dashboard answers with.
    pub fn http_status(&self) -> u16 {
        match self {
            OpsError::UnknownEvent(_)
            | OpsError::UnknownFunction(_)
            | OpsError::NotSubscribed { .. } => 404,
            OpsError::LimitReached(_) => 409,
            OpsError::Invalid(_) => 400,
            OpsError::Unavailable(_) => 501,
            OpsError::Connect(_) => 503,
            OpsError::Database(_) => 500,
        }
    }
}

impl From<tokio_postgres::Error> for OpsError {
    fn from(err: tokio_postgres::Error) -> Self {
        let text = crate::db::describe(&err);
        match err.code() {
            // The session ended under us, or the server refuses connections now.
            Some(c) if c.code().starts_with("08") || c.code().starts_with("57P") => {
                OpsError::Connect(text)
            }
            Some(c) if *c == SqlState::PROGRAM_LIMIT_EXCEEDED => OpsError::LimitReached(text),
            Some(c) if *c == SqlState::UNDEFINED_TABLE || *c == SqlState::INVALID_SCHEMA_NAME => {
                OpsError::Database(format!("{text} (is pgfire installed? run pgfire install)"))
            }
            Some(c)
                if *c == SqlState::INVALID_PARAMETER_VALUE
                    || *c == SqlState::INVALID_DATETIME_FORMAT
                    || *c == SqlState::DATETIME_FIELD_OVERFLOW
                    || *c == SqlState::INVALID_TEXT_REPRESENTATION =>
            {
                OpsError::Invalid(text)
            }
            Some(_) => OpsError::Database(text),
            None => OpsError::Connect(text),
        }
    }
}

pub type Result<T> = std::result::Result<T, OpsError>;

/// Connect for one command (the CLI); the dashboard keeps its own connection.
pub async fn connect(url: &str) -> Result<Client> {
    crate::db::connect(url)
        .await
        .map_err(|e| OpsError::Connect(e.to_string()))
}

/// The seed's groups of event types, in the order the dashboard shows them.
pub const GROUPS: [(&str, &str); 7] = [
    ("user", "User events"),
    ("authentication", "Authentication events"),
    ("data", "Data events"),
    ("datahub", "Datahub events"),
    ("auth", "Auth events"),
    ("custom", "Custom events"),
    ("other", "Other events"),
];

/// The group an event type belongs to.
pub fn group_of(name: &str, custom: bool) -> &'static str {
    if custom {
        "custom"
    } else if name.contains("_USER_") {
        "user"
    } else if matches!(name, "POST_LOGIN" | "POST_LOGOUT" | "POST_PASSWORD_RESET") {
        "authentication"
    } else if name.contains("_RECORD_") {
        "data"
    } else if name.starts_with("api.") {
        "datahub"
    } else if name.starts_with("auth.") {
        "auth"
    } else {
        "other"
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct EventType {
    pub name: String,
    pub phase: String,
    pub description: String,
    pub custom: bool,
    pub group: &'static str,
    pub subscribers: i32,
    pub active_subscribers: i32,
}

/// Every event type, grouped as the seed groups them (PRE before POST within a group).
pub async fn events(c: &Client) -> Result<Vec<EventType>> {
    let rows = c
        .query(
            "SELECT name, phase, description, custom, subscribers, active_subscribers
               FROM pgfire.events",
            &[],
        )
        .await?;
    let mut out: Vec<EventType> = rows
        .iter()
        .map(|r| {
            let (name, custom): (String, bool) = (r.get(0), r.get(3));
            EventType {
                group: group_of(&name, custom),
                name,
                phase: r.get(1),
                description: r.get(2),
                custom,
                subscribers: r.get(4),
                active_subscribers: r.get(5),
            }
        })
        .collect();
    let group_rank = |g: &str| GROUPS.iter().position(|(k, _)| *k == g).unwrap_or(99);
    // The seed's order within a group: by the action, PRE before POST.
    let action_rank = |n: &str| {
        let n = n.to_ascii_lowercase();
        [
            ["create", "created"],
            ["update", "updated"],
            ["emptied", "emptied"],
            ["delete", "deleted"],
            ["login", "loggedin"],
            ["signedup", "signedup"],
            ["logout", "logout"],
            ["verificationrequested", "verificationrequested"],
            ["verified", "verified"],
            ["resetrequested", "resetrequested"],
            ["reset", "reset"],
        ]
        .iter()
        .position(|a| a.iter().any(|s| n.ends_with(s)))
        .unwrap_or(99)
    };
    out.sort_by(|a, b| {
        (
            group_rank(a.group),
            action_rank(&a.name),
            &a.phase == "post",
            &a.name,
        )
            .cmp(&(
                group_rank(b.group),
                action_rank(&b.name),
                &b.phase == "post",
                &b.name,
            ))
    });
    Ok(out)
}

#[derive(Debug, Clone, Serialize)]
pub struct Subscriber {
    pub event_type: String,
    pub function_name: String,
    pub priority: i32,
    pub active: bool,
    pub function_active: bool,
    pub subscribed_at: String,
    /// A PRE subscription in shadow mode: it runs and its decision is recorded, but it never
    /// blocks or rewrites.
    pub shadow: bool,
}

/// Subscriptions, of one event type or all, in the order they run (priority, then name).
pub async fn subscribers(c: &Client, event: Option<&str>) -> Result<Vec<Subscriber>> {
    let rows = c
        .query(
            &format!(
                "SELECT s.event_type, s.function_name, s.priority, s.active, f.active, {},
                        coalesce((to_jsonb(s) ->> 'shadow')::boolean, false)
                   FROM pgfire.subscriptions s JOIN pgfire.functions f ON f.name = s.function_name
                  WHERE $1::text IS NULL OR s.event_type = $1
                  ORDER BY s.event_type, s.priority, s.function_name",
                timestamp("s.subscribed_at")
            ),
            &[&event],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Subscriber {
            event_type: r.get(0),
            function_name: r.get(1),
            priority: r.get(2),
            active: r.get(3),
            function_active: r.get(4),
            subscribed_at: r.get(5),
            shadow: r.get(6),
        })
        .collect())
}

/// A timestamp column as UTC text, e.g. `2026-12-02 03:04:05Z`.
pub(crate) fn timestamp(col: &str) -> String {
    format!("to_char({col} AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS\"Z\"')")
}

async fn event_exists(c: &Client, event: &str) -> Result<bool> {
    Ok(c.query_opt(
        "SELECT 1 FROM pgfire.event_types WHERE name = $1",
        &[&event],
    )
    .await?
    .is_some())
}

async fn function_exists(c: &Client, function: &str) -> Result<bool> {
    Ok(c.query_opt(
        "SELECT 1 FROM pgfire.functions WHERE name = $1",
        &[&function],
    )
    .await?
    .is_some())
}

/// What [`subscribe`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Subscribed {
    New,
    /// It was subscribed already: priority set, and active again.
    Updated,
}

/// Subscribe `function` to `event` (active), or update the priority of an existing
/// subscription and activate it. `declare` lets an unknown name become a custom event type, as
/// an INSERT into pgfire.subscriptions does; without it an unknown event is an error.
pub async fn subscribe(
    c: &Client,
    event: &str,
    function: &str,
    priority: i32,
    declare: bool,
) -> Result<Subscribed> {
    if !declare && !event_exists(c, event).await? {
        return Err(OpsError::UnknownEvent(event.to_string()));
    }
    if !function_exists(c, function).await? {
        return Err(OpsError::UnknownFunction(function.to_string()));
    }
    let row = c
        .query_one(
            "INSERT INTO pgfire.subscriptions (event_type, function_name, priority)
             VALUES ($1, $2, $3)
             ON CONFLICT (event_type, function_name) DO UPDATE SET priority = EXCLUDED.priority, active = true
             RETURNING (xmax = 0)",
            &[&event, &function, &priority],
        )
        .await
        .map_err(|e| refine(e, event, function))?;
    Ok(if row.get::<_, bool>(0) {
        Subscribed::New
    } else {
        Subscribed::Updated
    })
}

/// A database error of a subscription write, named by what it is about.
fn refine(err: tokio_postgres::Error, event: &str, function: &str) -> OpsError {
    if err.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION) {
        let constraint = err.as_db_error().and_then(|d| d.constraint()).unwrap_or("");
        if constraint.contains("function") {
            return OpsError::UnknownFunction(function.to_string());
        }
        return OpsError::UnknownEvent(event.to_string());
    }
    err.into()
}

/// Remove the subscription; its execution history stays.
pub async fn unsubscribe(c: &Client, event: &str, function: &str) -> Result<()> {
    let n = c
        .execute(
            "DELETE FROM pgfire.subscriptions WHERE event_type = $1 AND function_name = $2",
            &[&event, &function],
        )
        .await?;
    if n == 0 {
        return Err(not_subscribed(c, event, function).await);
    }
    Ok(())
}

async fn not_subscribed(c: &Client, event: &str, function: &str) -> OpsError {
    match (
        event_exists(c, event).await,
        function_exists(c, function).await,
    ) {
        (Err(e), _) | (_, Err(e)) => e,
        (Ok(false), _) => OpsError::UnknownEvent(event.to_string()),
        (_, Ok(false)) => OpsError::UnknownFunction(function.to_string()),
        _ => OpsError::NotSubscribed {
            event: event.to_string(),
            function: function.to_string(),
        },
    }
}

/// Activate or deactivate a subscription (the limit applies to activation).
pub async fn set_subscription_active(
    c: &Client,
    event: &str,
    function: &str,
    active: bool,
) -> Result<()> {
    let n = c
        .execute(
            "UPDATE pgfire.subscriptions SET active = $3 WHERE event_type = $1 AND function_name = $2",
            &[&event, &function, &active],
        )
        .await
        .map_err(|e| refine(e, event, function))?;
    if n == 0 {
        return Err(not_subscribed(c, event, function).await);
    }
    Ok(())
}

/// Activate or deactivate a function (an inactive function runs for none of its events).
pub async fn set_function_active(c: &Client, function: &str, active: bool) -> Result<()> {
    let n = c
        .execute(
            "UPDATE pgfire.functions SET active = $2 WHERE name = $1",
            &[&function, &active],
        )
        .await?;
    if n == 0 {
        return Err(OpsError::UnknownFunction(function.to_string()));
    }
    Ok(())
}

/// The most active subscriptions an event may have (setting `limits.subscriptions_per_event`).
pub async fn subscription_limit(c: &Client) -> Result<i32> {
    let v: Option<String> = c
        .query_opt(
            "SELECT value FROM pgfire.settings WHERE key = 'limits.subscriptions_per_event'",
            &[],
        )
        .await?
        .map(|r| r.get(0));
    Ok(v.and_then(|v| v.trim().parse().ok()).unwrap_or(10))
}

#[derive(Debug, Clone, Serialize)]
pub struct Function {
    pub name: String,
    pub kind: String,
    pub target: Option<String>,
    pub timeout_ms: i32,
    pub on_error: String,
    pub active: bool,
    pub created_at: String,
    /// Event types it is subscribed to, with whether each subscription is active.
    pub subscriptions: Vec<FunctionSubscription>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FunctionSubscription {
    pub event_type: String,
    pub phase: String,
    pub priority: i32,
    pub active: bool,
}

/// Every function with its subscriptions.
pub async fn functions(c: &Client) -> Result<Vec<Function>> {
    let rows = c
        .query(
            &format!(
                "SELECT f.name, f.kind, f.target, f.timeout_ms, f.on_error, f.active, {},
                        coalesce(json_agg(json_build_object('event_type', s.event_type, 'phase', t.phase,
                                                            'priority', s.priority, 'active', s.active)
                                          ORDER BY s.event_type) FILTER (WHERE s.event_type IS NOT NULL), '[]')::text
                   FROM pgfire.functions f
                   LEFT JOIN pgfire.subscriptions s ON s.function_name = f.name
                   LEFT JOIN pgfire.event_types t ON t.name = s.event_type
                  GROUP BY f.name ORDER BY f.name",
                timestamp("f.created_at")
            ),
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| {
            let subs: String = r.get(7);
            let subscriptions = serde_json::from_str::<Vec<serde_json::Value>>(&subs)
                .map_err(|e| OpsError::Database(format!("subscriptions of a function: {e}")))?
                .into_iter()
                .map(|v| FunctionSubscription {
                    event_type: v["event_type"].as_str().unwrap_or_default().to_string(),
                    phase: v["phase"].as_str().unwrap_or("post").to_string(),
                    priority: v["priority"].as_i64().unwrap_or(0) as i32,
                    active: v["active"].as_bool().unwrap_or(false),
                })
                .collect();
            Ok(Function {
                name: r.get(0),
                kind: r.get(1),
                target: r.get(2),
                timeout_ms: r.get(3),
                on_error: r.get(4),
                active: r.get(5),
                created_at: r.get(6),
                subscriptions,
            })
        })
        .collect()
}

/// The stream's state as the database sees it, and the retry queue's counts.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SlotStatus {
    pub slot: Option<String>,
    /// A walsender is streaming from the slot.
    pub slot_active: bool,
    /// WAL bytes between the server's position and what pgfire confirmed.
    pub lag_bytes: Option<i64>,
    /// Seconds the flush position trails, as the walsender measures it (0 when caught up).
    pub lag_seconds: Option<f64>,
    /// Runs waiting in pgfire.parked, and dead ones (`None` before the delivery engine's
    /// migration created the table).
    pub parked: Option<i64>,
    pub dead: Option<i64>,
}

pub async fn slot_status(c: &Client) -> Result<SlotStatus> {
    let row = c
        .query_one(
            "SELECT s.slot_name::text, coalesce(s.active, false),
                    pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint,
                    (SELECT coalesce(extract(epoch FROM r.flush_lag), 0)::float8
                       FROM pg_stat_replication r WHERE r.pid = s.active_pid)
               FROM (SELECT coalesce((SELECT value FROM pgfire.settings WHERE key = 'slot_name'), 'pgfire') AS name) n
               LEFT JOIN pg_replication_slots s ON s.slot_name = n.name",
            &[],
        )
        .await?;
    let mut status = SlotStatus {
        slot: row.get(0),
        slot_active: row.get(1),
        lag_bytes: row.get(2),
        lag_seconds: row.get(3),
        ..Default::default()
    };
    let has_parked: bool = c
        .query_one("SELECT to_regclass('pgfire.parked') IS NOT NULL", &[])
        .await?
        .get(0);
    if has_parked {
        let r = c
            .query_one(
                "SELECT count(*) FILTER (WHERE status = 'parked'), count(*) FILTER (WHERE status = 'dead')
                   FROM pgfire.parked",
                &[],
            )
            .await?;
        status.parked = Some(r.get(0));
        status.dead = Some(r.get(1));
    }
    Ok(status)
}

/// Whether this database has the delivery engine's retry queue (pgfire.parked and
/// pgfire.redeliver).
pub async fn has_redeliver(c: &Client) -> Result<bool> {
    Ok(c.query_one(
        "SELECT to_regprocedure('pgfire.redeliver(bigint)') IS NOT NULL",
        &[],
    )
    .await?
    .get(0))
}

const WAITING_FOR_DELIVERY: &str =
    "redelivery needs the delivery engine (pgfire.parked and pgfire.redeliver, migration 006): upgrade pgfire and run pgfire install";

/// Which dead runs to send again.
#[derive(Debug, Clone)]
pub enum Redeliver {
    /// The dead run one pgfire.executions row recorded.
    Execution(i64),
    /// Every dead run of a function.
    Function(String),
    /// Every dead run parked in a time range, of any function or of one.
    Range {
        since: String,
        until: Option<String>,
        function: Option<String>,
    },
}

/// Put dead runs back in the retry queue; how many.
pub async fn redeliver(c: &Client, what: &Redeliver) -> Result<i64> {
    if !has_redeliver(c).await? {
        return Err(OpsError::Unavailable(WAITING_FOR_DELIVERY.into()));
    }
    let n = match what {
        Redeliver::Execution(id) => {
            c.query_one("SELECT pgfire.redeliver($1::bigint)", &[id])
                .await?
        }
        Redeliver::Function(f) => {
            if !function_exists(c, f).await? {
                return Err(OpsError::UnknownFunction(f.clone()));
            }
            c.query_one("SELECT pgfire.redeliver($1::text)", &[f])
                .await?
        }
        Redeliver::Range {
            since,
            until,
            function,
        } => {
            let since = history::resolve_time(since)?;
            let until = until.as_deref().map(history::resolve_time).transpose()?;
            for t in std::iter::once(&since).chain(until.iter()) {
                history::check_time(c, t).await?;
            }
            c.query_one(
                "SELECT pgfire.redeliver($1::text::timestamptz, coalesce($2::text::timestamptz, now()), $3::text)",
                &[&since, &until, function],
            )
            .await?
        }
    };
    Ok(n.get(0))
}
