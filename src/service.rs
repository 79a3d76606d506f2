//! `pgfire run`, `pgfire dev` and `pgfire status`: wiring the consumer, dispatch, execution
//! history, proxy and admin endpoint together, and stopping them in phases.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState};
use crate::cli::ServiceArgs;
use crate::delivery::{DeliveryStats, Engine, Slot};
use crate::embedded::{Cluster, ClusterOptions};
use crate::executions::{self, Progress};
use crate::functions::Kinds;
use crate::install::{self, PUBLICATION};
use crate::intake::Intake;
use crate::metrics::{Metrics, Phase};
use crate::proxy::{self, ProxyArgs, ProxyConfig};
use crate::replication::spill::SpillConfig;
use crate::replication::{self, ConsumerConfig, ConsumerHealth};
use crate::{catalog::Catalog, db};

/// What to run.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub database_url: String,
    pub admin_listen: Option<SocketAddr>,
    pub consumer: bool,
    /// Overrides the slot recorded by `pgfire install`.
    pub slot: Option<String>,
    pub proxy: Option<ProxyArgs>,
    pub status_interval: Duration,
    /// Silence from the replication server after which it is pinged, and after as long again
    /// considered dead (`--replication-timeout`).
    pub replication_timeout: Duration,
    /// Where large streamed transactions are spilled, and beyond how much memory.
    pub spill: SpillConfig,
    /// The token every admin request must carry (required off loopback).
    pub admin_token: Option<String>,
}

impl ServiceConfig {
    pub fn new(database_url: impl Into<String>) -> Self {
        ServiceConfig {
            database_url: database_url.into(),
            admin_listen: None,
            consumer: true,
            slot: None,
            proxy: None,
            status_interval: Duration::from_secs(1),
            replication_timeout: Duration::from_secs(30),
            spill: SpillConfig::default(),
            admin_token: None,
        }
    }

    fn from_args(database_url: &str, args: ServiceArgs) -> Self {
        ServiceConfig {
            database_url: database_url.to_string(),
            admin_listen: Some(args.admin_listen),
            consumer: !args.no_consumer,
            slot: args.slot,
            proxy: (!args.proxy.no_proxy).then_some(args.proxy),
            status_interval: Duration::from_secs(1),
            replication_timeout: Duration::from_secs(args.replication_timeout.max(1)),
            spill: SpillConfig {
                dir: args.spill_dir.unwrap_or_else(SpillConfig::default_dir),
                budget: args.max_transaction_memory,
            },
            admin_token: args.admin_token,
        }
    }
}

/// What the consumer says of the slot, for delivery (polled: the consumer keeps it in atomics).
fn slot_state(health: Arc<ConsumerHealth>, stop: CancellationToken) -> watch::Receiver<Slot> {
    use std::sync::atomic::Ordering::SeqCst;
    let (tx, rx) = watch::channel(Slot::Unsure);
    tokio::spawn(async move {
        loop {
            let now = if health.connected.load(SeqCst) {
                Slot::Held
            } else if health.standby.load(SeqCst) {
                Slot::Lost
            } else {
                Slot::Unsure
            };
            tx.send_if_modified(|s| std::mem::replace(s, now) != now);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tx.closed() => return,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    });
    rx
}

/// A running pgfire.
pub struct Service {
    shutdown: CancellationToken,
    dispatch_stop: CancellationToken,
    history_abandon: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    dispatch: Option<JoinHandle<()>>,
    history: Option<JoinHandle<()>>,
    pub admin_addr: Option<SocketAddr>,
    pub proxy_addr: Option<SocketAddr>,
    pub health: Arc<ConsumerHealth>,
    pub stats: Arc<DeliveryStats>,
}

impl Service {
    /// Check the installation, then start every part. Fails fast when the database cannot be
    /// reached or pgfire is not installed; once running, the consumer reconnects by itself.
    pub async fn start(cfg: ServiceConfig) -> anyhow::Result<Service> {
        let client = db::connect(&cfg.database_url)
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to the database: {}", e))?;
        // The proxy alone needs nothing installed; the consumer needs the schema and slot.
        let installation = match cfg.consumer {
            true => Some(installation(&client, cfg.slot.clone()).await?),
            false => None,
        };
        drop(client);

        let shutdown = CancellationToken::new();
        let dispatch_stop = CancellationToken::new();
        let history_abandon = CancellationToken::new();
        let health = Arc::new(ConsumerHealth::default());
        let stats = Arc::new(DeliveryStats::default());
        let metrics = Arc::new(Metrics::default());
        let mut tasks = Vec::new();
        let mut history = None;
        let mut dispatch = None;
        let mut progress = None;
        let slot = installation.as_ref().map(|(slot, _)| slot.clone());
        if let Some((slot, catalog)) = installation {
            let settled = health.settled_lsn.clone();
            let shared = Arc::new(Progress::new(settled.clone()));
            progress = Some(shared.clone());
            let (recorder, writer) =
                executions::start(cfg.database_url.clone(), shared, history_abandon.clone());
            let recorder = recorder.counting(metrics.clone(), Phase::Post);
            history = Some(writer);
            // consumer → intake (decoded items) → delivery (events and checkpoints).
            let (tx, rx) = tokio::sync::mpsc::channel(16);
            let (events_tx, events_rx) = tokio::sync::mpsc::channel(16);
            let catalog = Arc::new(catalog);
            let intake = Intake {
                catalog: catalog.clone(),
                database_url: cfg.database_url.clone(),
                slot: slot.clone(),
                warned_identity: Default::default(),
                builder: Default::default(),
                stats: stats.clone(),
                metrics: metrics.clone(),
            };
            let engine = Engine {
                catalog,
                kinds: Arc::new(Kinds::new(&cfg.database_url)?),
                recorder,
                database_url: cfg.database_url.clone(),
                stats: stats.clone(),
            };
            let intake = tokio::spawn(intake.run(rx, events_tx, dispatch_stop.clone()));
            // The engine retries parked runs and knows which rows wait behind them: only the
            // pgfire holding the slot may do that, so it delivers while this one holds it.
            let held = slot_state(health.clone(), dispatch_stop.clone());
            let engine = tokio::spawn(engine.run(events_rx, held, dispatch_stop.clone()));
            dispatch = Some(tokio::spawn(async move {
                let _ = engine.await;
                let _ = intake.await;
            }));
            let consumer = ConsumerConfig {
                database_url: cfg.database_url.clone(),
                slot,
                publication: PUBLICATION.to_string(),
                status_interval: cfg.status_interval,
                connect_timeout: Duration::from_secs(10),
                server_timeout: cfg.replication_timeout,
                dispatch_stopping: dispatch_stop.clone(),
                spill: Some(cfg.spill.clone()),
            };
            tasks.push(tokio::spawn(replication::run(
                consumer,
                tx,
                settled,
                health.clone(),
                shutdown.clone(),
            )));
        }

        let mut proxy_addr = None;
        let mut proxy_connections = None;
        if let Some(args) = &cfg.proxy {
            let mut config = ProxyConfig::from_args(args, &cfg.database_url)?;
            proxy_connections = Some(config.connections.clone());
            config.metrics = metrics.clone();
            config.pre = Some(
                proxy::pre::PreHooks::start(
                    cfg.database_url.clone(),
                    metrics.clone(),
                    shutdown.clone(),
                )
                .await
                .map_err(|e| anyhow::anyhow!("cannot start PRE hooks: {e}"))?,
            );
            let listener = tokio::net::TcpListener::bind(args.listen)
                .await
                .with_context(|| {
                    format!(
                        "cannot listen on {} for the proxy (use --listen)",
                        args.listen
                    )
                })?;
            proxy_addr = Some(listener.local_addr()?);
            let token = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(err) = proxy::serve(config, listener, token).await {
                    tracing::error!(error = %err, "proxy stopped");
                }
            }));
        }

        let mut admin_addr = None;
        if let Some(addr) = cfg.admin_listen {
            let listener = admin::bind(addr, cfg.admin_token.as_deref()).await?;
            admin_addr = Some(listener.local_addr()?);
            let state = AdminState {
                consumer: cfg.consumer.then(|| health.clone()),
                dispatch: stats.clone(),
                history: progress.clone(),
                database_url: cfg.database_url.clone(),
                token: cfg.admin_token.clone(),
                proxy_addr,
                proxy_connections,
                metrics: metrics.clone(),
                slot: slot.clone(),
            };
            let token = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(err) = admin::serve(listener, state, token).await {
                    tracing::error!(error = %err, "admin endpoint stopped");
                }
            }));
        }

        Ok(Service {
            shutdown,
            dispatch_stop,
            history_abandon,
            tasks,
            dispatch,
            history,
            admin_addr,
            proxy_addr,
            health,
            stats,
        })
    }

    /// Stop in phases: dispatch stops (the event in progress stays unsettled, to run again
    /// after a restart), the history writer stores what it holds (up to 30 s while the
    /// database is unreachable), then the consumer confirms what is settled and closes the
    /// stream, with the proxy and the admin endpoint.
    pub async fn stop(self) {
        self.dispatch_stop.cancel();
        if let Some(d) = self.dispatch {
            if tokio::time::timeout(Duration::from_secs(30), d)
                .await
                .is_err()
            {
                tracing::warn!("dispatch did not stop within 30 s");
            }
        }
        if let Some(mut history) = self.history {
            if tokio::time::timeout(Duration::from_secs(30), &mut history)
                .await
                .is_err()
            {
                self.history_abandon.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(2), history).await;
            }
        }
        self.shutdown.cancel();
        for t in self.tasks {
            if tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .is_err()
            {
                tracing::warn!("a task did not stop within 30 s");
            }
        }
    }
}

/// Check that pgfire is installed and current; the slot to read and the configuration.
async fn installation(
    client: &tokio_postgres::Client,
    slot: Option<String>,
) -> anyhow::Result<(String, Catalog)> {
    let known = install::MIGRATIONS
        .iter()
        .map(|m| m.version)
        .max()
        .unwrap_or(0);
    let installed: bool = client
        .query_one("SELECT to_regclass('pgfire.migrations') IS NOT NULL", &[])
        .await
        .map_err(|e| anyhow::anyhow!(db::describe(&e)))?
        .get(0);
    let version: Option<i32> = if installed {
        client
            .query_one("SELECT max(version) FROM pgfire.migrations", &[])
            .await
            .map_err(|e| anyhow::anyhow!(db::describe(&e)))?
            .get(0)
    } else {
        None
    };
    match version {
        None => {
            anyhow::bail!("pgfire is not installed in this database: run `pgfire install` first")
        }
        Some(v) if v < known => {
            anyhow::bail!("the database has pgfire schema version {v}, older than this pgfire ({known}): run `pgfire install` to upgrade")
        }
        _ => {}
    }
    let stored: Option<String> = client
        .query_opt(
            "SELECT value FROM pgfire.settings WHERE key = 'slot_name'",
            &[],
        )
        .await
        .map_err(|e| anyhow::anyhow!(db::describe(&e)))?
        .map(|r| r.get(0));
    let slot = slot
        .or(stored)
        .unwrap_or_else(|| install::DEFAULT_SLOT.to_string());
    let catalog = Catalog::load_as_of_slot(client, &slot).await?;
    Ok((slot, catalog))
}

/// Wait for Ctrl-C or SIGTERM.
pub async fn terminated() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}

pub async fn run_cmd(url: &str, args: ServiceArgs) -> anyhow::Result<()> {
    let service = Service::start(ServiceConfig::from_args(url, args)).await?;
    if let Some(a) = service.admin_addr {
        tracing::info!(admin = %a, "admin endpoint listening");
    }
    if let Some(p) = service.proxy_addr {
        tracing::info!(proxy = %p, "proxy listening");
    }
    // A consumer that stopped on an error retrying cannot fix ends the service, non-zero.
    let stopped = service.health.stopped.clone();
    let fatal = tokio::select! {
        _ = terminated() => None,
        _ = stopped.cancelled() => Some(service.health.last_error().unwrap_or_default()),
    };
    tracing::info!("stopping");
    service.stop().await;
    match fatal {
        Some(reason) => anyhow::bail!("the replication consumer stopped: {reason}"),
        None => Ok(()),
    }
}

/// The demo `pgfire dev` loads into a new database.
const DEV_DEMO: &str = "
CREATE TABLE IF NOT EXISTS public.users (
    id         bigserial PRIMARY KEY,
    email      text NOT NULL UNIQUE,
    name       text,
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO pgfire.sources (table_name, kind) VALUES ('public.users', 'user') ON CONFLICT DO NOTHING;
INSERT INTO pgfire.functions (name, kind) VALUES ('log_users', 'log') ON CONFLICT DO NOTHING;
INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES
    ('POST_USER_CREATE', 'log_users'), ('POST_USER_UPDATE', 'log_users'), ('POST_USER_DELETE', 'log_users')
ON CONFLICT DO NOTHING;
";

pub async fn dev_cmd(data_dir: PathBuf, pg_port: u16, args: ServiceArgs) -> anyhow::Result<()> {
    let mut opts = ClusterOptions::new(&data_dir);
    opts.port = Some(pg_port);
    let first = !data_dir.join("PG_VERSION").exists();
    println!(
        "pgfire dev: {} PostgreSQL in {} ...",
        if first { "creating" } else { "starting" },
        data_dir.display()
    );
    let cluster = tokio::task::spawn_blocking(move || Cluster::start(&opts)).await??;
    let admin_url = cluster.url("postgres");
    let admin_client = db::connect(&admin_url).await?;
    if admin_client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = 'app'", &[])
        .await?
        .is_none()
    {
        admin_client.batch_execute("CREATE DATABASE app").await?;
    }
    drop(admin_client);
    let url = cluster.url("app");
    let client = db::connect(&url).await?;
    install::install(&client, None, install::MIGRATIONS).await?;
    client
        .batch_execute(DEV_DEMO)
        .await
        .map_err(|e| anyhow::anyhow!(db::describe(&e)))?;
    drop(client);

    let listen = args.proxy.listen;
    let no_proxy = args.proxy.no_proxy;
    let admin = args.admin_listen;
    let service = Service::start(ServiceConfig::from_args(&url, args)).await?;
    let app_url = if no_proxy {
        url.clone()
    } else {
        format!("postgres://postgres@{listen}/app")
    };
    println!(
        "\npgfire dev is running.\n\
         \n  database (direct):   {url}\
         \n  through pgfire:      {}\
         \n  dashboard:           http://{admin}/  (/healthz, /metrics)\n\
         \nTry it: a user row becomes a POST_USER_CREATE event, logged by the demo function `log_users`:\n\
         \n  psql {app_url} -c \"INSERT INTO users (email, name) VALUES ('ada@example.com', 'Ada')\"\
         \n  psql {app_url} -c \"SELECT name, subscribers, description FROM pgfire.events\"\
         \n  psql {app_url} -c \"SELECT * FROM pgfire.executions ORDER BY id DESC LIMIT 5\"\n\
         \nCtrl-C stops pgfire and its PostgreSQL; the next `pgfire dev` reuses {}.\n",
        if no_proxy { "(proxy off)".to_string() } else { app_url.clone() },
        data_dir.display()
    );
    let stopped = service.health.stopped.clone();
    let fatal = tokio::select! {
        _ = terminated() => None,
        _ = stopped.cancelled() => Some(service.health.last_error().unwrap_or_default()),
    };
    println!("pgfire dev: stopping ...");
    service.stop().await;
    tokio::task::spawn_blocking(move || cluster.stop()).await?;
    println!("pgfire dev: stopped.");
    match fatal {
        Some(reason) => anyhow::bail!("the replication consumer stopped: {reason}"),
        None => Ok(()),
    }
}

/// What the running service says about its consumer: `/healthz` of `admin_url`, with the runs
/// in flight per function (empty when it does not answer).
async fn service_state(admin_url: &str) -> (String, std::collections::HashMap<String, u64>) {
    let url = format!("{}/healthz", admin_url.trim_end_matches('/'));
    let answer = async {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()?;
        // An admin endpoint with a token (--admin-token) wants it too.
        let mut req = client.get(&url);
        if let Ok(token) = std::env::var("PGFIRE_ADMIN_TOKEN") {
            req = req.bearer_auth(token);
        }
        req.send().await?.json::<serde_json::Value>().await
    };
    match answer.await {
        Ok(body) => {
            let running =
                serde_json::from_value(body["delivery"]["running"].clone()).unwrap_or_default();
            let state = match body["replication"]["state"].as_str() {
                Some(state) => state.to_string(),
                None => format!(
                    "consumer {}",
                    body["consumer"].as_str().unwrap_or("unknown")
                ),
            };
            (state, running)
        }
        Err(err) => (
            format!("no answer from {url} ({err}); is pgfire run running?"),
            Default::default(),
        ),
    }
}

pub async fn status_cmd(url: &str, admin_url: &str) -> anyhow::Result<()> {
    let client = db::connect(url)
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to the database: {}", e))?;
    let q = |e: tokio_postgres::Error| {
        anyhow::anyhow!(
            "{} (is pgfire installed? run pgfire install)",
            db::describe(&e)
        )
    };
    let row = client
        .query_opt(
            "SELECT s.slot_name::text, s.active, s.confirmed_flush_lsn::text,
                    pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint,
                    pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn))
               FROM pg_replication_slots s
              WHERE s.slot_name = coalesce((SELECT value FROM pgfire.settings WHERE key = 'slot_name'), 'pgfire')",
            &[],
        )
        .await
        .map_err(q)?;
    match row {
        Some(r) => {
            let (name, active, lsn, lag, retained): (
                String,
                bool,
                Option<String>,
                Option<i64>,
                Option<String>,
            ) = (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
            println!(
                "slot {name}: {}",
                if active {
                    "streaming"
                } else {
                    "not in use (is pgfire run running?)"
                }
            );
            println!(
                "  confirmed up to {}, {} bytes behind, WAL retained {}",
                lsn.unwrap_or_default(),
                lag.unwrap_or(0),
                retained.unwrap_or_default()
            );
        }
        None => println!("replication slot missing: run pgfire install"),
    }
    let publication = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&PUBLICATION],
        )
        .await
        .map_err(q)?;
    if publication.is_none() {
        println!("publication {PUBLICATION} missing: run pgfire install");
    }
    let (state, running) = service_state(admin_url).await;
    println!("service: {state}");
    // Sources (and their partitions) whose changes lack old values.
    let lacking = client
        .query(
            "SELECT s.table_name::text, c.oid::regclass::text
               FROM pgfire.sources s
               JOIN pg_class c ON c.oid = s.table_name
                               OR c.oid IN (SELECT relid FROM pg_partition_tree(s.table_name))
              WHERE c.relkind = 'r' AND c.relreplident <> 'f'
              ORDER BY 1, 2",
            &[],
        )
        .await
        .map_err(q)?;
    for r in lacking {
        let (source, table): (String, String) = (r.get(0), r.get(1));
        let which = if source == table {
            source.clone()
        } else {
            format!("{source} (partition {table})")
        };
        println!(
            "warning: source {which} lacks REPLICA IDENTITY FULL: old values are missing from its events (fix: ALTER TABLE {table} REPLICA IDENTITY FULL)"
        );
    }
    // Datahub events need event triggers, which only a superuser can create.
    let datahub_off: bool = client
        .query_one(
            "SELECT to_regprocedure('pgfire.track_datahub()') IS NOT NULL
                AND NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'pgfire_datahub_ddl')",
            &[],
        )
        .await
        .map_err(q)?
        .get(0);
    if datahub_off {
        println!(
            "warning: datahub events (api.dataTable_*) are off: their event triggers need a superuser (fix: as a superuser, SELECT pgfire.track_datahub())"
        );
    }
    crate::delivery::status::print(&client, &running)
        .await
        .map_err(q)?;
    let rows = client
        .query(
            "SELECT function_name, status, count(*)::bigint, max(started_at)::text, (array_agg(error ORDER BY id DESC))[1]
               FROM pgfire.executions
              WHERE status IN ('error', 'timeout', 'dead') AND started_at > now() - interval '1 hour'
              GROUP BY 1, 2 ORDER BY 4 DESC LIMIT 20",
            &[],
        )
        .await
        .map_err(q)?;
    if rows.is_empty() {
        println!("no failed runs in the last hour");
    } else {
        println!("failed runs in the last hour:");
        for r in rows {
            let (f, s, n, at, err): (String, String, i64, String, Option<String>) =
                (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
            println!(
                "  {f:<24} {s:<8} {n:>6}  last {at}: {}",
                err.unwrap_or_default()
            );
        }
    }
    Ok(())
}
