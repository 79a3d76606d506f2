//! The configuration snapshot: functions, subscriptions, sources and settings of schema `pgfire`,
//! as `pgfire.config_snapshot()` writes them, immutable once loaded. Every configuration change
//! carries the whole new snapshot in the replication stream, so a running pgfire applies it
//! exactly as of its commit, and resumes after a restart with the one in force at the slot.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio_postgres::Client;

use crate::fasthash::FastMap;
use crate::replication::position::Lsn;

/// The prefix of the logical messages that announce a configuration change (their content is
/// the whole snapshot, `pgfire.config_snapshot()`).
pub const CONFIG_MESSAGE_PREFIX: &str = "pgfire.config";

/// What a function does when it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FunctionKind {
    Webhook,
    Sql,
    Nats,
    Log,
}

impl FunctionKind {
    fn parse(s: &str) -> Option<FunctionKind> {
        Some(match s {
            "webhook" => FunctionKind::Webhook,
            "sql" => FunctionKind::Sql,
            "nats" => FunctionKind::Nats,
            "log" => FunctionKind::Log,
            _ => return None,
        })
    }
}

/// A row of `pgfire.functions`.
#[derive(Debug, Clone)]
pub struct FunctionDef {
    pub name: Arc<str>,
    pub kind: FunctionKind,
    pub target: Option<String>,
    pub timeout: Duration,
    pub secret: Option<String>,
    /// For `sql` functions: the schema-qualified, quoted name to call.
    pub sql_callable: Option<String>,
    /// PRE runs: a failing or timed-out run blocks the write (`on_error = 'block'`).
    pub blocks_on_error: bool,
    /// POST events of different rows run at once up to this many.
    pub concurrency: usize,
    /// Events are parked, not run, until it is resumed.
    pub paused: bool,
    /// Overrides of `delivery.max_attempts` / `delivery.max_age_seconds`.
    pub max_attempts: Option<u32>,
    pub max_age: Option<Duration>,
}

impl FunctionDef {
    /// Attempts before a failing run is dead.
    pub fn max_attempts(&self, settings: &Settings) -> u32 {
        self.max_attempts.unwrap_or(settings.max_attempts)
    }

    /// Age of a parked run past which it is dead.
    pub fn max_age(&self, settings: &Settings) -> Duration {
        self.max_age.unwrap_or(settings.max_age)
    }
}

/// An active subscription of an active function.
#[derive(Debug, Clone)]
pub struct Subscription {
    pub function: Arc<FunctionDef>,
    pub priority: i32,
    /// PRE shadow mode: runs and is recorded, never blocks or rewrites.
    pub shadow: bool,
    /// A condition on the event (`delivery::filter`); only matching events run it.
    pub filter: Option<Arc<str>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SourceKind {
    User,
    #[default]
    Record,
    Session,
}

/// A row of `pgfire.sources`: the table, its kind, and the columns that play the auth roles
/// (checked against the table when the row is written; see `sql/005_events.sql`).
#[derive(Debug, Clone, Default)]
pub struct Source {
    pub oid: u32,
    pub kind: SourceKind,
    pub id_column: Option<String>,
    /// User sources: the password (hash); a change of it while a reset is pending is a reset.
    pub password_column: Option<String>,
    /// User sources: a flag or timestamp; unset to set is `auth.email_verified`.
    pub email_verified_column: Option<String>,
    /// User sources: a new value is `auth.email_verificationRequested`.
    pub verification_token_column: Option<String>,
    /// User sources: a new value is `auth.password_resetRequested`.
    pub reset_token_column: Option<String>,
    /// User sources: when the reset was requested, for schemas that clear the reset token when
    /// its link is followed (GoTrue's `recovery_sent_at`).
    pub reset_sent_at_column: Option<String>,
    /// User sources: advancing is a login.
    pub last_sign_in_column: Option<String>,
    /// Session sources: the column naming the session's user.
    pub user_id_column: Option<String>,
    /// Session sources: a flag or timestamp set when the session is revoked (a logout).
    pub revoked_column: Option<String>,
}

/// Delivery settings from `pgfire.settings`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_attempts: u32,
    pub retry_base: Duration,
    pub retry_max: Duration,
    pub payload_limit: usize,
    /// The longest timeout a function may set (`limits.timeout_ms`).
    pub timeout_limit: Duration,
    /// Link templates of the auth token events (`{token}` is replaced).
    pub verification_link: String,
    pub reset_link: String,
    /// Validity of email verification and password reset tokens.
    pub verification_ttl: Duration,
    pub reset_ttl: Duration,
    /// Schemas whose tables give `api.dataTable_*` events (`datahub_schemas`; never `pgfire`).
    pub datahub_schemas: Vec<String>,
    /// Attempts of a failing run in memory before it is parked.
    pub memory_attempts: u32,
    /// Age of a parked run past which it is dead.
    pub max_age: Duration,
    /// Events held in memory at most, and their envelopes' bytes.
    pub max_in_flight: usize,
    pub max_in_flight_bytes: usize,
    /// History older than this is pruned.
    pub retention: Duration,
    pub all: HashMap<String, String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_attempts: 5,
            retry_base: Duration::from_millis(200),
            retry_max: Duration::from_secs(10),
            payload_limit: 1 << 20,
            timeout_limit: Duration::from_secs(10),
            verification_link: "http://localhost:3000/verify?token={token}".into(),
            reset_link: "http://localhost:3000/reset-password?token={token}".into(),
            verification_ttl: Duration::from_secs(86_400),
            reset_ttl: Duration::from_secs(3_600),
            datahub_schemas: vec!["public".into()],
            memory_attempts: 3,
            max_age: Duration::from_secs(86_400),
            max_in_flight: 10_000,
            max_in_flight_bytes: 64 << 20,
            retention: Duration::from_secs(7 * 86_400),
            all: HashMap::new(),
        }
    }
}

/// One immutable snapshot of pgfire's configuration.
#[derive(Debug, Default)]
pub struct Catalog {
    pub database: Arc<str>,
    /// Active subscriptions of active functions by event type, in run order (priority, name).
    pub subscriptions: FastMap<String, Vec<Subscription>>,
    pub sources: FastMap<u32, Source>,
    /// Every active function by name (paused ones included), for parked runs' retries.
    pub functions: HashMap<Arc<str>, Arc<FunctionDef>>,
    pub settings: Settings,
    /// Some auth event (`auth.*`, `POST_LOGIN`, `POST_LOGOUT`, `POST_PASSWORD_RESET`) has
    /// subscribers: without any, row changes of auth sources are not looked at for them.
    pub auth_subscribed: bool,
    /// Problems found while loading (rows skipped), for logs and `pgfire status`.
    pub warnings: Vec<String>,
}

/// The configuration as `pgfire.config_snapshot()` writes it (into the stream and into
/// `pgfire.config_applied`).
#[derive(Debug, Deserialize)]
struct Snapshot {
    database: String,
    #[serde(default)]
    settings: HashMap<String, String>,
    #[serde(default)]
    functions: Vec<FunctionRow>,
    #[serde(default)]
    subscriptions: Vec<SubscriptionRow>,
    #[serde(default)]
    sources: Vec<SourceRow>,
}

#[derive(Debug, Deserialize)]
struct FunctionRow {
    name: String,
    kind: String,
    target: Option<String>,
    timeout_ms: i64,
    active: bool,
    sql_callable: Option<String>,
    #[serde(default)]
    on_error: Option<String>,
    concurrency: Option<i64>,
    #[serde(default)]
    paused: bool,
    #[serde(default)]
    max_attempts: Option<i64>,
    #[serde(default)]
    max_age_seconds: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct SubscriptionRow {
    event_type: String,
    function_name: String,
    priority: i32,
    active: bool,
    #[serde(default)]
    shadow: bool,
    filter: Option<String>,
}

#[derive(Debug, Deserialize)]
struct SourceRow {
    oid: u32,
    kind: String,
    id_column: Option<String>,
    #[serde(default)]
    password_column: Option<String>,
    #[serde(default)]
    email_verified_column: Option<String>,
    #[serde(default)]
    verification_token_column: Option<String>,
    #[serde(default)]
    reset_token_column: Option<String>,
    #[serde(default)]
    reset_sent_at_column: Option<String>,
    #[serde(default)]
    last_sign_in_column: Option<String>,
    #[serde(default)]
    user_id_column: Option<String>,
    #[serde(default)]
    revoked_column: Option<String>,
}

/// Why a configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("{}", crate::db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("malformed configuration snapshot: {0}")]
    Malformed(String),
}

impl Catalog {
    pub fn subscribers(&self, event_type: &str) -> &[Subscription] {
        self.subscriptions
            .get(event_type)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Today's configuration, read in one statement (one snapshot).
    pub async fn load(client: &Client) -> Result<Catalog, CatalogError> {
        let snapshot = current_snapshot(client).await?;
        Catalog::from_snapshot(&snapshot, &secrets(client).await?)
    }

    /// The configuration in force where slot `slot` stands: the last one pgfire applied from a
    /// change committed before the slot's confirmed position (or, if there is none, today's).
    pub async fn load_as_of_slot(client: &Client, slot: &str) -> Result<Catalog, CatalogError> {
        let (snapshot, _) = snapshot_as_of_slot(client, slot, Lsn(0)).await?;
        Catalog::from_snapshot(&snapshot, &secrets(client).await?)
    }

    /// A catalog from the JSON of `pgfire.config_snapshot()` and the functions' signing secrets
    /// (which the snapshot leaves out). Rows the database accepted but this pgfire cannot use are
    /// skipped with a warning rather than failing the whole load.
    pub fn from_snapshot(
        json: &str,
        secrets: &HashMap<String, String>,
    ) -> Result<Catalog, CatalogError> {
        let snap: Snapshot =
            serde_json::from_str(json).map_err(|e| CatalogError::Malformed(e.to_string()))?;
        let mut cat = Catalog {
            database: Arc::from(snap.database),
            ..Catalog::default()
        };
        cat.settings.all = snap.settings;
        cat.apply_settings();
        let timeout_limit = cat.settings.timeout_limit;

        let mut functions: HashMap<String, Arc<FunctionDef>> = HashMap::new();
        for f in snap.functions.into_iter().filter(|f| f.active) {
            let Some(kind) = FunctionKind::parse(&f.kind) else {
                cat.warnings.push(format!(
                    "function {}: unknown kind {:?}, skipped",
                    f.name, f.kind
                ));
                continue;
            };
            if kind == FunctionKind::Sql && f.sql_callable.is_none() {
                cat.warnings.push(format!(
                    "function {}: SQL function {:?}(jsonb) no longer exists",
                    f.name, f.target
                ));
            }
            let timeout_ms = (f.timeout_ms.max(1) as u64).min(timeout_limit.as_millis() as u64);
            let secret = secrets.get(&f.name).cloned();
            functions.insert(
                f.name.clone(),
                Arc::new(FunctionDef {
                    name: Arc::from(f.name),
                    kind,
                    target: f.target,
                    timeout: Duration::from_millis(timeout_ms),
                    secret,
                    sql_callable: f.sql_callable,
                    blocks_on_error: f.on_error.as_deref() == Some("block"),
                    concurrency: f.concurrency.unwrap_or(10).clamp(1, 1000) as usize,
                    paused: f.paused,
                    max_attempts: f.max_attempts.map(|n| n.clamp(1, 100) as u32),
                    max_age: f
                        .max_age_seconds
                        .map(|s| Duration::from_secs(s.max(1) as u64)),
                }),
            );
        }
        cat.functions = functions
            .values()
            .map(|f| (f.name.clone(), f.clone()))
            .collect();

        let mut subs = snap.subscriptions;
        subs.sort_by(|a, b| {
            (&a.event_type, a.priority, &a.function_name).cmp(&(
                &b.event_type,
                b.priority,
                &b.function_name,
            ))
        });
        for s in subs.into_iter().filter(|s| s.active) {
            if let Some(function) = functions.get(&s.function_name) {
                cat.subscriptions
                    .entry(s.event_type)
                    .or_default()
                    .push(Subscription {
                        function: function.clone(),
                        priority: s.priority,
                        shadow: s.shadow,
                        filter: s
                            .filter
                            .filter(|f| !f.trim().is_empty())
                            .map(|f| Arc::from(f.as_str())),
                    });
            }
        }

        cat.auth_subscribed = cat.subscriptions.keys().any(|t| {
            t.starts_with("auth.")
                || matches!(
                    t.as_str(),
                    "POST_LOGIN" | "POST_LOGOUT" | "POST_PASSWORD_RESET"
                )
        });
        for s in snap.sources {
            let kind = match s.kind.as_str() {
                "user" => SourceKind::User,
                "record" => SourceKind::Record,
                _ => SourceKind::Session,
            };
            cat.sources.insert(
                s.oid,
                Source {
                    oid: s.oid,
                    kind,
                    id_column: s.id_column,
                    password_column: s.password_column,
                    email_verified_column: s.email_verified_column,
                    verification_token_column: s.verification_token_column,
                    reset_token_column: s.reset_token_column,
                    reset_sent_at_column: s.reset_sent_at_column,
                    last_sign_in_column: s.last_sign_in_column,
                    user_id_column: s.user_id_column,
                    revoked_column: s.revoked_column,
                },
            );
        }
        for w in &cat.warnings {
            tracing::warn!(warning = %w, "configuration");
        }
        Ok(cat)
    }

    fn apply_settings(&mut self) {
        let s = &mut self.settings;
        let num = |key: &str| s.all.get(key).and_then(|v| v.trim().parse::<u64>().ok());
        if let Some(v) = num("delivery.max_attempts") {
            s.max_attempts = v.clamp(1, 100) as u32;
        }
        if let Some(v) = num("delivery.retry_base_ms") {
            s.retry_base = Duration::from_millis(v.min(3_600_000));
        }
        if let Some(v) = num("delivery.retry_max_ms") {
            s.retry_max = Duration::from_millis(v.min(3_600_000));
        }
        if let Some(v) = num("limits.payload_bytes") {
            s.payload_limit = v as usize;
        }
        if let Some(v) = num("limits.timeout_ms") {
            s.timeout_limit = Duration::from_millis(v.max(1));
        }
        if let Some(v) = num("auth.verification_ttl_seconds") {
            s.verification_ttl = Duration::from_secs(v.max(1));
        }
        if let Some(v) = num("auth.reset_ttl_seconds") {
            s.reset_ttl = Duration::from_secs(v.max(1));
        }
        if let Some(v) = s.all.get("auth.verification_link") {
            s.verification_link = v.clone();
        }
        if let Some(v) = s.all.get("auth.reset_link") {
            s.reset_link = v.clone();
        }
        if let Some(v) = s.all.get("datahub_schemas") {
            s.datahub_schemas = v
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty() && *n != "pgfire")
                .map(str::to_string)
                .collect();
        }
        if let Some(v) = num("delivery.memory_attempts") {
            s.memory_attempts = v.clamp(1, 100) as u32;
        }
        if let Some(v) = num("delivery.max_age_seconds") {
            s.max_age = Duration::from_secs(v.max(1));
        }
        if let Some(v) = num("delivery.max_in_flight") {
            s.max_in_flight = v.clamp(1, 1_000_000) as usize;
        }
        if let Some(v) = num("delivery.max_in_flight_bytes") {
            s.max_in_flight_bytes = v.max(1 << 20) as usize;
        }
        if let Some(v) = num("history.retention_seconds") {
            s.retention = Duration::from_secs(v.max(60));
        }
    }
}

/// The functions' signing secrets, by function name. They are not in the snapshots (logical
/// messages reach every logical decoding consumer of the database): a webhook is signed with its
/// function's secret as it is when the snapshot is applied.
pub async fn secrets(client: &Client) -> Result<HashMap<String, String>, CatalogError> {
    Ok(client
        .query(
            "SELECT name, secret FROM pgfire.functions WHERE secret IS NOT NULL",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// Today's configuration as `pgfire.config_snapshot()` writes it (one statement, one snapshot).
pub async fn current_snapshot(client: &Client) -> Result<String, CatalogError> {
    let row = client
        .query_one("SELECT pgfire.config_snapshot()::text", &[])
        .await?;
    Ok(row.get(0))
}

/// The snapshot (`pgfire.config_snapshot()` JSON) in force where slot `slot` stands, and the
/// slot's confirmed position: the last configuration pgfire applied from a change committed
/// before it, or today's when none is recorded.
pub async fn snapshot_as_of_slot(
    client: &Client,
    slot: &str,
    from: Lsn,
) -> Result<(String, Lsn), CatalogError> {
    // A stream started at an LSN past the slot's position starts there (PostgreSQL streams from
    // the later of the two).
    let row = client
        .query_one(
            "SELECT (SELECT a.snapshot::text FROM pgfire.config_applied a
                      WHERE a.commit_lsn < s.confirmed_flush_lsn
                      ORDER BY a.commit_lsn DESC LIMIT 1),
                    coalesce(s.confirmed_flush_lsn, '0/0')::text
               FROM (SELECT greatest((SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1),
                                     $2::text::pg_lsn)) s(confirmed_flush_lsn)",
            &[&slot, &from.to_string()],
        )
        .await?;
    let confirmed: Lsn = row
        .get::<_, &str>(1)
        .parse()
        .map_err(CatalogError::Malformed)?;
    match row.get::<_, Option<String>>(0) {
        Some(snapshot) => Ok((snapshot, confirmed)),
        None => {
            tracing::warn!(
                slot,
                "no configuration recorded for the slot's position; using today's"
            );
            Ok((current_snapshot(client).await?, confirmed))
        }
    }
}

/// Record that `snapshot` is the configuration from the change committed at `at` on (the last
/// change of a transaction wins), and prune the snapshots no restart can need: those older than
/// the one in force at slot `slot`'s confirmed position.
pub async fn record_applied(
    client: &Client,
    slot: &str,
    at: Lsn,
    snapshot: &str,
) -> Result<(), CatalogError> {
    client
        .execute(
            "WITH applied AS (
                 INSERT INTO pgfire.config_applied (commit_lsn, snapshot)
                 VALUES ($1::text::pg_lsn, $2::text::jsonb)
                 ON CONFLICT (commit_lsn) DO UPDATE SET snapshot = EXCLUDED.snapshot, applied_at = now())
             DELETE FROM pgfire.config_applied
              WHERE commit_lsn < (SELECT max(a.commit_lsn) FROM pgfire.config_applied a
                                   WHERE a.commit_lsn < (SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $3))",
            &[&at.to_string(), &snapshot, &slot],
        )
        .await?;
    Ok(())
}

/// `pgfire events`: every event type with its description and subscriber count.
pub async fn events_cmd(url: &str) -> anyhow::Result<()> {
    let client = crate::db::connect(url).await?;
    let rows = client
        .query(
            "SELECT name, phase, subscribers, active_subscribers, description FROM pgfire.events
              ORDER BY custom, CASE phase WHEN 'pre' THEN 0 ELSE 1 END, name",
            &[],
        )
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "{} (is pgfire installed? run pgfire install)",
                crate::db::describe(&e)
            )
        })?;
    println!(
        "{:<36} {:<5} {:>11}  DESCRIPTION",
        "EVENT", "PHASE", "SUBSCRIBERS"
    );
    for r in rows {
        let (name, phase, subs, active, desc): (String, String, i32, i32, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        let count = if subs == active {
            subs.to_string()
        } else {
            format!("{active}/{subs}")
        };
        println!("{name:<36} {phase:<5} {count:>11}  {desc}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(limit: Option<&str>, timeout_ms: i64) -> String {
        let settings = match limit {
            Some(l) => format!(r#"{{"limits.timeout_ms": "{l}"}}"#),
            None => "{}".into(),
        };
        format!(
            r#"{{"version": 1, "database": "app", "settings": {settings},
                 "functions": [{{"name": "f", "kind": "log", "target": null, "timeout_ms": {timeout_ms},
                                 "on_error": "allow", "active": true, "sql_callable": null}}],
                 "subscriptions": [{{"event_type": "E", "function_name": "f", "priority": 0, "active": true}}],
                 "sources": [{{"oid": 16384, "table": "users", "kind": "user", "id_column": "id"}}]}}"#
        )
    }

    fn timeout(cat: &Catalog) -> Duration {
        cat.subscribers("E")[0].function.timeout
    }

    #[test]
    fn a_function_gets_its_own_timeout_up_to_the_limit() {
        let cat =
            Catalog::from_snapshot(&snapshot(Some("20000"), 15_000), &HashMap::new()).unwrap();
        assert_eq!(timeout(&cat), Duration::from_secs(15));
        let cat = Catalog::from_snapshot(&snapshot(Some("5000"), 15_000), &HashMap::new()).unwrap();
        assert_eq!(timeout(&cat), Duration::from_secs(5));
        let cat = Catalog::from_snapshot(&snapshot(None, 15_000), &HashMap::new()).unwrap();
        assert_eq!(timeout(&cat), Duration::from_secs(10), "10 s by default");
        assert_eq!(cat.sources[&16384].kind, SourceKind::User);
        assert_eq!(cat.settings.datahub_schemas, ["public"]);
        assert_eq!(cat.settings.reset_ttl, Duration::from_secs(3600));
    }

    #[test]
    fn auth_roles_and_settings_are_read() {
        let json = r#"{"version": 2, "database": "app",
            "settings": {"datahub_schemas": " app, pgfire,,crm ", "auth.reset_ttl_seconds": "600",
                         "auth.verification_link": "https://x/v?t={token}"},
            "sources": [{"oid": 1, "table": "users", "kind": "user", "id_column": "id",
                         "password_column": "pw", "email_verified_column": "verified_at",
                         "verification_token_column": "vt", "reset_token_column": "rt",
                         "last_sign_in_column": "seen", "user_id_column": null, "future": 1},
                        {"oid": 2, "table": "sessions", "kind": "session", "id_column": null,
                         "user_id_column": "uid"}]}"#;
        let cat = Catalog::from_snapshot(json, &HashMap::new()).unwrap();
        assert_eq!(cat.settings.datahub_schemas, ["app", "crm"]);
        assert_eq!(cat.settings.reset_ttl, Duration::from_secs(600));
        assert_eq!(cat.settings.verification_ttl, Duration::from_secs(86400));
        assert_eq!(cat.settings.verification_link, "https://x/v?t={token}");
        let users = &cat.sources[&1];
        assert_eq!(users.password_column.as_deref(), Some("pw"));
        assert_eq!(users.last_sign_in_column.as_deref(), Some("seen"));
        assert_eq!(users.reset_sent_at_column, None);
        assert_eq!(cat.sources[&2].kind, SourceKind::Session);
        assert_eq!(cat.sources[&2].user_id_column.as_deref(), Some("uid"));
        assert!(!cat.auth_subscribed);
    }

    #[test]
    fn a_malformed_snapshot_is_an_error() {
        for bad in ["", "{}", "[]", r#"{"database": 1}"#, "not json"] {
            assert!(
                Catalog::from_snapshot(bad, &HashMap::new()).is_err(),
                "{bad}"
            );
        }
    }
}
