//! The configuration snapshot: functions, subscriptions, sources and settings read from schema
//! `pgfire`, validated, immutable once loaded. A running pgfire swaps in a new snapshot when a
//! configuration change arrives (in commit order, through the replication stream).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;

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
}

/// An active subscription of an active function.
#[derive(Debug, Clone)]
pub struct Subscription {
    pub function: Arc<FunctionDef>,
    pub priority: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    User,
    Record,
    Session,
}

/// A row of `pgfire.sources`.
#[derive(Debug, Clone)]
pub struct Source {
    pub oid: u32,
    pub kind: SourceKind,
    pub id_column: Option<String>,
}

/// Delivery settings from `pgfire.settings`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_attempts: u32,
    pub retry_base: Duration,
    pub retry_max: Duration,
    pub payload_limit: usize,
    pub all: HashMap<String, String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_attempts: 5,
            retry_base: Duration::from_millis(200),
            retry_max: Duration::from_secs(10),
            payload_limit: 1 << 20,
            all: HashMap::new(),
        }
    }
}

/// One immutable snapshot of pgfire's configuration.
#[derive(Debug, Default)]
pub struct Catalog {
    pub database: Arc<str>,
    /// Active subscriptions of active functions by event type, in run order (priority, name).
    pub subscriptions: HashMap<String, Vec<Subscription>>,
    pub sources: HashMap<u32, Source>,
    pub settings: Settings,
    /// Problems found while loading (rows skipped), for logs and `pgfire status`.
    pub warnings: Vec<String>,
}

impl Catalog {
    pub fn subscribers(&self, event_type: &str) -> &[Subscription] {
        self.subscriptions
            .get(event_type)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Load a snapshot. Rows the database accepted but this pgfire cannot use are skipped with a
    /// warning rather than failing the whole load.
    pub async fn load(client: &Client) -> Result<Catalog, tokio_postgres::Error> {
        let mut cat = Catalog {
            database: Arc::from(
                client
                    .query_one("SELECT current_database()::text", &[])
                    .await?
                    .get::<_, String>(0),
            ),
            ..Catalog::default()
        };
        for row in client
            .query("SELECT key, value FROM pgfire.settings", &[])
            .await?
        {
            cat.settings.all.insert(row.get(0), row.get(1));
        }
        cat.apply_settings();

        let mut functions: HashMap<String, Arc<FunctionDef>> = HashMap::new();
        let rows = client
            .query(
                "SELECT f.name, f.kind, f.target, f.timeout_ms, f.secret,
                        CASE WHEN f.kind = 'sql' THEN
                          (SELECT format('%I.%I', n.nspname, p.proname) FROM pg_proc p
                             JOIN pg_namespace n ON n.oid = p.pronamespace
                            WHERE p.oid = to_regprocedure(f.target || '(jsonb)')) END
                   FROM pgfire.functions f WHERE f.active",
                &[],
            )
            .await?;
        for row in rows {
            let name: String = row.get(0);
            let kind: String = row.get(1);
            let Some(kind) = FunctionKind::parse(&kind) else {
                cat.warnings
                    .push(format!("function {name}: unknown kind {kind:?}, skipped"));
                continue;
            };
            let sql_callable: Option<String> = row.get(5);
            if kind == FunctionKind::Sql && sql_callable.is_none() {
                cat.warnings.push(format!(
                    "function {name}: SQL function {:?}(jsonb) no longer exists",
                    row.get::<_, Option<String>>(2)
                ));
            }
            let timeout_ms: i32 = row.get(3);
            functions.insert(
                name.clone(),
                Arc::new(FunctionDef {
                    name: Arc::from(name),
                    kind,
                    target: row.get(2),
                    timeout: Duration::from_millis(timeout_ms.clamp(1, 10_000) as u64),
                    secret: row.get(4),
                    sql_callable,
                }),
            );
        }

        let rows = client
            .query(
                "SELECT event_type, function_name, priority FROM pgfire.subscriptions
                  WHERE active ORDER BY event_type, priority, function_name",
                &[],
            )
            .await?;
        for row in rows {
            let function_name: String = row.get(1);
            if let Some(function) = functions.get(&function_name) {
                cat.subscriptions
                    .entry(row.get(0))
                    .or_default()
                    .push(Subscription {
                        function: function.clone(),
                        priority: row.get(2),
                    });
            }
        }

        let rows = client
            .query(
                "SELECT table_name::oid, kind, id_column FROM pgfire.sources",
                &[],
            )
            .await?;
        for row in rows {
            let oid: u32 = row.get(0);
            let kind = match row.get::<_, &str>(1) {
                "user" => SourceKind::User,
                "record" => SourceKind::Record,
                _ => SourceKind::Session,
            };
            cat.sources.insert(
                oid,
                Source {
                    oid,
                    kind,
                    id_column: row.get(2),
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
    }
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
