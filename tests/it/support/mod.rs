//! Test support: one private PostgreSQL per test process (started from the installed server
//! binaries), a fresh database per test, and helpers to wait on conditions instead of sleeping.

#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pgfire::embedded::{Cluster, ClusterOptions};

pub mod hook;
pub mod nats;
pub mod relay;
pub mod webhook;

/// Roles with passwords for authentication tests (the shared cluster's pg_hba asks them for one).
pub const MD5_USER: (&str, &str) = ("pgfire_md5", "md5-secret");
pub const SCRAM_USER: (&str, &str) = ("pgfire_scram", "scram-secret");

static SHARED: OnceLock<Cluster> = OnceLock::new();
static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Options for a private test cluster: logical replication on, fsync off, short sender timeout.
pub fn test_cluster_options() -> ClusterOptions {
    let dir = tempfile::Builder::new()
        .prefix("pgfire-test-")
        .tempdir()
        .expect("temp dir")
        .keep();
    let mut opts = ClusterOptions::new(dir)
        .setting("fsync", "off")
        .setting("synchronous_commit", "off")
        .setting("full_page_writes", "off")
        .setting("wal_sender_timeout", "10s")
        .setting("shared_buffers", "64MB")
        .setting("logical_decoding_work_mem", "64kB")
        // One slot per test database, and the suite has more tests than the default 64.
        .setting("max_replication_slots", "512")
        .setting("max_wal_senders", "128");
    opts.ephemeral = true;
    opts.hba = vec![
        format!("host all {} 127.0.0.1/32 md5", MD5_USER.0),
        format!("host all {} 127.0.0.1/32 scram-sha-256", SCRAM_USER.0),
    ];
    opts
}

/// The PostgreSQL shared by the tests of this process.
pub fn cluster() -> &'static Cluster {
    SHARED.get_or_init(|| {
        let c = Cluster::start(&test_cluster_options()).expect("start test PostgreSQL");
        c.psql(
            "postgres",
            &format!(
                "SET password_encryption = 'md5'; CREATE ROLE {} LOGIN SUPERUSER PASSWORD '{}'; \
                 SET password_encryption = 'scram-sha-256'; CREATE ROLE {} LOGIN SUPERUSER PASSWORD '{}';",
                MD5_USER.0, MD5_USER.1, SCRAM_USER.0, SCRAM_USER.1
            ),
        )
        .expect("create auth roles");
        c
    })
}

/// A fresh database on the shared cluster.
pub struct TestDb {
    pub name: String,
    pub cluster: &'static Cluster,
}

impl TestDb {
    pub fn new() -> TestDb {
        let cluster = cluster();
        let name = format!(
            "t{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        cluster
            .psql("postgres", &format!("CREATE DATABASE {name}"))
            .expect("create database");
        TestDb { name, cluster }
    }

    pub fn url(&self) -> String {
        self.cluster.url(&self.name)
    }

    /// Run SQL with psql; panics with psql's error on failure.
    pub fn psql(&self, sql: &str) -> String {
        self.cluster
            .psql(&self.name, sql)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Run SQL with psql, returning psql's error text on failure.
    pub fn try_psql(&self, sql: &str) -> Result<String, String> {
        self.cluster
            .psql(&self.name, sql)
            .map_err(|e| e.to_string())
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .expect("connect to test database");
        tokio::spawn(conn);
        client
    }
}

/// Poll `check` until it returns `Some`, or panic after `limit` with `what`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The replication slot name a test database uses (slot names are per cluster).
pub fn slot_name(db: &TestDb) -> String {
    format!("pgfire_{}", db.name)
}

/// Install pgfire into the test database with its own slot.
pub async fn install_pgfire(db: &TestDb) -> pgfire::install::InstallReport {
    let client = db.client().await;
    pgfire::install::install(&client, Some(&slot_name(db)), pgfire::install::MIGRATIONS)
        .await
        .expect("pgfire install")
}

/// Start pgfire (consumer, dispatch, admin on a free port; no proxy) against the test database.
pub async fn start_service(db: &TestDb) -> pgfire::service::Service {
    init_logs();
    let mut cfg = pgfire::service::ServiceConfig::new(db.url());
    cfg.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.status_interval = Duration::from_millis(100);
    pgfire::service::Service::start(cfg)
        .await
        .expect("start pgfire")
}

/// Query rows of one text column (for compact assertions).
pub async fn texts(client: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    client
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
}

/// The single `bigint` a query returns (a count, for compact assertions and waits).
pub async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// Wait until pgfire has settled everything committed so far: the slot's confirmed position
/// reaches the current WAL position.
pub async fn caught_up(db: &TestDb) {
    let c = db.client().await;
    let slot = slot_name(db);
    let target: String = c
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    eventually(Duration::from_secs(30), "pgfire to catch up", || async {
        let row = c
            .query_one(
                "SELECT coalesce(confirmed_flush_lsn >= $2::text::pg_lsn, false) FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot, &target],
            )
            .await
            .unwrap();
        row.get::<_, bool>(0).then_some(())
    })
    .await
}

/// Logs of the pgfire under test on stderr, filtered by `PGFIRE_TEST_LOG` (off when unset).
pub fn init_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Ok(filter) = std::env::var("PGFIRE_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
    });
}

/// Wait until a query matching `pattern` (SQL LIKE) runs in the test database, as
/// `pg_stat_activity` shows it.
pub async fn wait_running(db: &TestDb, pattern: &str) {
    let c = db.client().await;
    eventually(
        Duration::from_secs(10),
        &format!("a query like {pattern:?} to run"),
        || async {
            let n: i64 = c
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                      WHERE datname = current_database() AND state = 'active'
                        AND query LIKE $1 AND pid <> pg_backend_pid()",
                    &[&pattern],
                )
                .await
                .unwrap()
                .get(0);
            (n > 0).then_some(())
        },
    )
    .await
}

/// A local TCP port where nothing listens, held for as long as the value lives: bound but not
/// listening, so a connection is refused at once and no other test's server can be handed the
/// port meanwhile (a port from `free_port` is free only until someone binds it).
pub struct ClosedPort {
    _socket: tokio::net::TcpSocket,
    pub port: u16,
}

impl ClosedPort {
    pub fn new() -> ClosedPort {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().unwrap())
            .expect("bind a closed port");
        let port = socket.local_addr().expect("its address").port();
        ClosedPort {
            _socket: socket,
            port,
        }
    }
}
