//! PRE hooks in the proxy: the configuration sessions classify against (swapped atomically when
//! pgfire's tables change, through LISTEN/NOTIFY), the shared clients PRE functions run with, and
//! the history of PRE runs. [`hold`] is the hold/decide/release state machine of one held
//! statement, [`decide`] the chain of functions on its rows, [`copy`] the COPY FROM STDIN
//! sub-protocol inside it, [`split`] query strings run statement by statement, [`commits`]
//! statements whose procedure or DO block commits by itself, [`fast`] statements whose chains
//! the database decides in one round trip, [`verdicts`] the gate's memory of texts it has seen.

pub mod answer;
pub(super) mod commits;
pub(super) mod copy;
pub(super) mod decide;
pub(super) mod fast;
pub(super) mod gate;
pub(super) mod hold;
pub mod rows;
pub(super) mod split;
pub(super) mod unit;
pub(super) mod verdicts;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client};
use tokio_util::sync::CancellationToken;

use super::classify::{TableName, Watched, SAFE_FUNCTIONS};
use crate::catalog::{Catalog, FunctionKind};
use crate::events::{EventId, Lsn};
use crate::executions::{self, Execution, Progress, Status};
use crate::functions::nats::{Nats, NatsConfig};
use crate::functions::webhook::Webhook;
use crate::metrics::{Metrics, Phase};

/// Default of `limits.pre_rows_per_statement`.
pub const DEFAULT_ROWS_LIMIT: u32 = 1000;
/// How long past the longest `sql` timeout a fast run may go unanswered ([`PreConfig::watchdog`]).
const WATCHDOG_MARGIN: std::time::Duration = std::time::Duration::from_millis(250);

/// One immutable PRE configuration: what sessions hold and which functions decide.
#[derive(Debug, Default)]
pub struct PreConfig {
    pub catalog: Catalog,
    /// Tables with PRE hooks (user and record sources with an active PRE subscription).
    pub watched: Watched,
    pub rows_limit: u32,
    pub allow_truncate: bool,
    /// What starts a PRE run on a writer's session (`pgfire.pre_arm`): pgfire's key, which the
    /// session's roles cannot read.
    pub key: String,
    /// Every PRE subscription runs a `sql` or `log` function: held statements are decided by
    /// pgfire's trigger inside their own run, in one round trip (migration 010).
    pub fast: bool,
    /// The database starts and ends a fast run in one call each (`pgfire.pre_fast_begin`,
    /// `pgfire.pre_fast_end`, migration 011).
    pub lean: bool,
    /// How long a fast run may go unanswered before the proxy cancels it and runs the statement
    /// the long way, where each call has its own `statement_timeout` (the database times a fast
    /// run's calls only after they return): the longest `sql` function timeout plus a margin;
    /// `None` when no PRE function is `sql`.
    pub watchdog: Option<std::time::Duration>,
    /// What the gate decided on the texts seen under this configuration.
    pub(super) verdicts: verdicts::Verdicts<gate::Decision>,
}

impl PreConfig {
    /// Whether any statement can be held at all.
    pub fn active(&self) -> bool {
        !self.watched.is_empty()
    }
}

/// What the PRE side of the proxy shares between sessions.
pub struct PreHooks {
    config: RwLock<Arc<PreConfig>>,
    pub(super) webhook: Webhook,
    pub(super) nats: Nats,
    history: mpsc::Sender<Execution>,
    /// Makes PRE event ids unique within this process.
    seq: AtomicU64,
    /// Bumped at every configuration load (tests wait on it).
    generation: AtomicU64,
    /// The database the hooks watch.
    database: String,
    /// Where PRE runs and decisions are counted.
    pub(super) metrics: Arc<Metrics>,
}

impl PreHooks {
    /// The configuration in force now.
    pub fn config(&self) -> Arc<PreConfig> {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether a session with this startup packet's parameters is on the database these hooks
    /// watch (`database`, defaulting to `user`, as PostgreSQL defaults it). Sessions on other
    /// databases are relayed without PRE hooks.
    pub fn serves(&self, params: &[(String, String)]) -> bool {
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let db = get("database").filter(|d| !d.is_empty()).or(get("user"));
        db == Some(self.database.as_str())
    }

    /// How many configurations were loaded so far.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    fn swap(&self, cfg: PreConfig) {
        self.nats.configure(NatsConfig::from_catalog(&cfg.catalog));
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(cfg);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// A number no other held statement of this process gets (the "LSN" part of PRE event ids:
    /// PRE events have no commit yet).
    pub(super) fn next_statement(&self) -> u64 {
        let now = chrono::Utc::now().timestamp_micros().max(0) as u64;
        (now << 12) | (self.seq.fetch_add(1, Ordering::Relaxed) & 0xFFF)
    }

    /// Queue run records for `pgfire.executions` (written in batches by the history writer).
    pub(super) async fn record(&self, runs: Vec<Execution>) {
        for r in runs {
            if self.history.send(r).await.is_err() {
                tracing::warn!("PRE history writer stopped; a PRE run is not recorded");
            }
        }
    }

    /// Queue the runs the database decided (`pgfire.pre_decide`'s reports) for
    /// `pgfire.executions`, counted as the proxy's own are. Never waits: a full queue drops the
    /// record with a warning.
    pub(in crate::proxy) fn record_reports(&self, reports: Vec<rows::RunReport>) {
        for report in reports {
            for run in report.runs {
                let status = match run.status.as_str() {
                    "ok" => Status::Ok,
                    "modified" => Status::Modified,
                    "blocked" => Status::Blocked,
                    "timeout" => Status::Timeout,
                    _ => Status::Error,
                };
                if run.kind == "log" {
                    tracing::info!(function = %run.function, event_type = %report.event_type, "PRE event");
                }
                self.metrics.pre_decision(&run.function, status, run.shadow);
                let error = match (run.shadow, run.error) {
                    (true, error) if status != Status::Ok => Some(format!(
                        "shadow mode (not applied): {}",
                        error.as_deref().unwrap_or(status.as_str())
                    )),
                    (_, error) => error,
                };
                let execution = Execution {
                    event_id: EventId {
                        commit_lsn: Lsn(report.stmt),
                        position: report.pos,
                        sub: 0,
                    },
                    event_type: report.event_type.as_str().into(),
                    function_name: run.function.as_str().into(),
                    error: error.map(String::into_boxed_str),
                    started_at_us: run.at,
                    duration_us: run.us.max(0) as u64,
                    attempt: 1,
                    status,
                };
                if self.history.try_send(execution).is_err() {
                    tracing::warn!("PRE history queue full or stopped; a PRE run is not recorded");
                }
            }
        }
    }

    /// Load the configuration, then follow its changes until `shutdown`: every NOTIFY on
    /// `pgfire_config` reloads it for the next statement of every session. PRE runs and
    /// decisions are counted in `metrics`.
    pub async fn start(
        database_url: String,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<PreHooks>> {
        let (client, notes) = listen(&database_url).await?;
        let database: String = client
            .query_one("SELECT current_database()::text", &[])
            .await?
            .get(0);
        let first = load(&client).await;
        let (history, rx) = mpsc::channel(65_536);
        let progress = Arc::new(Progress::new(Arc::new(AtomicU64::new(0))));
        let (recorder, _writer) =
            executions::start(database_url.clone(), progress, shutdown.clone());
        let recorder = recorder.counting(metrics.clone(), Phase::Pre);
        tokio::spawn(record_history(rx, recorder));
        let hooks = Arc::new(PreHooks {
            config: RwLock::new(Arc::new(PreConfig::default())),
            webhook: Webhook::new()?,
            nats: Nats::new(),
            history,
            seq: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            database,
            metrics,
        });
        hooks.swap(first);
        tokio::spawn(follow(hooks.clone(), database_url, client, notes, shutdown));
        Ok(hooks)
    }
}

async fn record_history(mut rx: mpsc::Receiver<Execution>, mut recorder: executions::Recorder) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while let Ok(r) = rx.try_recv() {
            batch.push(r);
        }
        recorder.record(batch, None).await;
    }
}

/// A connection that LISTENs on `pgfire_config`; the receiver sees one `()` per notification and
/// closes when the connection ends.
async fn listen(url: &str) -> anyhow::Result<(Client, mpsc::UnboundedReceiver<()>)> {
    // TLS as the URL says, like every connection to the database.
    let (config, tls) = crate::db::config(url)?;
    let (client, mut conn) = config.connect(tls).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(AsyncMessage::Notification(_)) => {
                    if tx.send(()).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::debug!(error = %err, "PRE configuration connection closed");
                    break;
                }
            }
        }
    });
    client.batch_execute("LISTEN pgfire_config").await?;
    Ok((client, rx))
}

async fn follow(
    hooks: Arc<PreHooks>,
    url: String,
    mut client: Client,
    mut notes: mpsc::UnboundedReceiver<()>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            note = notes.recv() => {
                if note.is_none() {
                    // The connection ended: reconnect, then reload (changes may have been missed).
                    loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                        match listen(&url).await {
                            Ok((c, n)) => {
                                client = c;
                                notes = n;
                                break;
                            }
                            Err(err) => tracing::warn!(error = %err, "cannot reconnect for PRE configuration"),
                        }
                    }
                }
                while notes.try_recv().is_ok() {}
                hooks.swap(load(&client).await);
            }
        }
    }
}

#[derive(Deserialize)]
struct PreSnapshot {
    tables: Vec<PreTable>,
}

#[derive(Deserialize)]
struct PreTable {
    schema: String,
    name: String,
}

/// Today's PRE configuration; an empty one (nothing held) when pgfire is not installed or its
/// configuration cannot be read, with a warning.
async fn load(client: &Client) -> PreConfig {
    match try_load(client).await {
        Ok(cfg) => cfg,
        Err(err) => {
            tracing::warn!(error = %err, "PRE hooks off: cannot read pgfire's configuration");
            PreConfig::default()
        }
    }
}

async fn try_load(client: &Client) -> anyhow::Result<PreConfig> {
    let catalog = Catalog::load(client).await?;
    let row = client
        .query_one("SELECT pgfire.pre_snapshot()::text", &[])
        .await?;
    let snap: PreSnapshot = serde_json::from_str(row.get::<_, &str>(0))?;
    let shadowed: Vec<String> = client
        .query(
            "SELECT DISTINCT proname::text FROM pg_proc
              WHERE pronamespace <> 'pg_catalog'::regnamespace AND proname = ANY($1)",
            &[&SAFE_FUNCTIONS],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let watched = Watched::from_catalog(snap.tables.into_iter().map(|t| TableName {
        schema: t.schema,
        name: t.name,
    }))
    .with_shadowed_builtins(shadowed);
    let all = &catalog.settings.all;
    let rows_limit = all
        .get("limits.pre_rows_per_statement")
        .and_then(|v| v.trim().parse::<u32>().ok())
        .unwrap_or(DEFAULT_ROWS_LIMIT)
        .max(1);
    let allow_truncate = all
        .get("pre.allow_truncate")
        .is_some_and(|v| matches!(v.trim(), "true" | "on" | "yes" | "1"));
    let key: String = client
        .query_one("SELECT key FROM pgfire.pre_key", &[])
        .await?
        .get(0);
    // Migration 10 brings runs the database decides (a proxy newer than the database's
    // migrations uses the long way until `pgfire install` has run).
    // Migration 11 starts and ends a fast run in one call each.
    let row = client
        .query_one(
            "SELECT to_regprocedure('pgfire.pre_arm_fast(text)') IS NOT NULL, to_regprocedure('pgfire.pre_fast_begin(text)') IS NOT NULL",
            &[],
        )
        .await?;
    let (decides, lean): (bool, bool) = (row.get(0), row.get(1));
    let pre_functions = || {
        catalog
            .subscriptions
            .iter()
            .filter(|(event_type, _)| event_type.starts_with("PRE_"))
            .flat_map(|(_, subs)| subs)
            .map(|s| &s.function)
    };
    let fast =
        decides && pre_functions().all(|f| matches!(f.kind, FunctionKind::Sql | FunctionKind::Log));
    let watchdog = pre_functions()
        .filter(|f| f.kind == FunctionKind::Sql)
        .map(|f| f.timeout)
        .max()
        .map(|t| t + WATCHDOG_MARGIN);
    Ok(PreConfig {
        catalog,
        watched,
        rows_limit,
        allow_truncate,
        key,
        fast,
        lean,
        watchdog,
        verdicts: Default::default(),
    })
}
