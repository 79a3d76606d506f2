//! At least once: kill -9 of pgfire, PostgreSQL restarts, unreachable databases.

use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use pgfire::embedded::{Cluster, ClusterOptions};

use crate::support::{
    count, eventually, install_pgfire, start_service, test_cluster_options, texts, TestDb,
};

const SETUP: &str = "
CREATE TABLE users (id int PRIMARY KEY, email text);
CREATE TABLE delivered (event_id text NOT NULL, user_id int NOT NULL);
CREATE FUNCTION deliver(e jsonb) RETURNS void LANGUAGE sql AS $$
  INSERT INTO delivered VALUES (e->>'id', (e->'event_data'->>'user_id')::int) $$;
INSERT INTO pgfire.sources (table_name, kind) VALUES ('users', 'user');
INSERT INTO pgfire.functions (name, kind, target) VALUES ('deliver', 'sql', 'deliver');
INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('POST_USER_CREATE', 'deliver');
";

fn spawn_pgfire(url: &str) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_pgfire"))
        .args(["run", "--no-proxy", "--admin-listen", "127.0.0.1:0"])
        .env("DATABASE_URL", url)
        .env("PGFIRE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn pgfire")
}

#[tokio::test]
async fn kill_9_loses_no_event_and_redelivers_with_the_same_id() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    let c = db.client().await;
    c.batch_execute(SETUP).await.unwrap();
    let mut child = spawn_pgfire(&db.url());
    // 1500 rows in 500 transactions of 1 to 5 rows, while pgfire runs.
    let writer = {
        let url = db.url();
        tokio::spawn(async move {
            let c = pgfire::db::connect(&url).await.unwrap();
            let mut id = 0;
            for t in 0..500 {
                let n = 1 + t % 5;
                let rows: Vec<String> = (0..n)
                    .map(|i| format!("({}, 'u{}')", id + i, id + i))
                    .collect();
                id += n;
                c.batch_execute(&format!("INSERT INTO users VALUES {}", rows.join(",")))
                    .await
                    .unwrap();
            }
            id
        })
    };
    eventually(Duration::from_secs(60), "some deliveries", || async {
        let n = count(&c, "SELECT count(*) FROM delivered").await;
        (n >= 200).then_some(())
    })
    .await;
    child.kill().expect("kill -9");
    child.wait().unwrap();
    let total = writer.await.unwrap();
    let before: i64 = c
        .query_one("SELECT count(DISTINCT user_id) FROM delivered", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        before < total as i64,
        "killed before the end ({before} of {total})"
    );

    let mut child = spawn_pgfire(&db.url());
    eventually(Duration::from_secs(60), "every row delivered", || async {
        let n = count(&c, "SELECT count(DISTINCT user_id) FROM delivered").await;
        (n == total as i64).then_some(())
    })
    .await;
    child.kill().ok();
    child.wait().ok();
    // Duplicates are allowed, but a duplicate carries the same id as the first delivery.
    let conflicting = texts(
        &c,
        "SELECT event_id FROM delivered GROUP BY event_id HAVING count(DISTINCT user_id) > 1",
    )
    .await;
    assert!(conflicting.is_empty(), "{conflicting:?}");
    let ids: i64 = c
        .query_one("SELECT count(DISTINCT event_id) FROM delivered", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(ids, total as i64);
}

#[tokio::test]
async fn postgres_restarts_and_pgfire_reconnects_without_losing_events() {
    let dir = tempfile::tempdir().unwrap();
    // Commits must survive the crash below.
    let opts = durable_cluster(dir.path());
    let (cluster, url, c) = installed_app(&opts).await;
    c.batch_execute(SETUP).await.unwrap();
    let mut cfg = pgfire::service::ServiceConfig::new(url.clone());
    cfg.status_interval = Duration::from_millis(100);
    let service = pgfire::service::Service::start(cfg).await.unwrap();
    c.batch_execute("INSERT INTO users VALUES (1)")
        .await
        .unwrap();
    let delivered = |c: tokio_postgres::Client| async move {
        count(&c, "SELECT count(DISTINCT user_id) FROM delivered").await
    };
    eventually(Duration::from_secs(30), "first delivery", || async {
        (delivered(pgfire::db::connect(&url).await.unwrap()).await == 1).then_some(())
    })
    .await;

    // An immediate shutdown, as in a crash, with a committed row pgfire may not have seen.
    c.batch_execute("INSERT INTO users VALUES (2)")
        .await
        .unwrap();
    let mut cluster = cluster;
    cluster.crash();
    drop(cluster);
    eventually(Duration::from_secs(10), "pgfire to notice", || async {
        (!service.health.connected.load(Ordering::SeqCst)).then_some(())
    })
    .await;
    let cluster = Cluster::start(&opts).unwrap();
    let c = pgfire::db::connect(&url).await.unwrap();
    c.batch_execute("INSERT INTO users VALUES (3)")
        .await
        .unwrap();
    eventually(
        Duration::from_secs(60),
        "deliveries after the restart",
        || async { (delivered(pgfire::db::connect(&url).await.unwrap()).await == 3).then_some(()) },
    )
    .await;
    assert!(service.health.reconnects.load(Ordering::SeqCst) >= 1);
    service.stop().await;
    cluster.stop();
}

#[tokio::test]
async fn an_unreachable_database_is_a_clear_error() {
    let closed = crate::support::ClosedPort::new();
    let url = format!("postgres://postgres@127.0.0.1:{}/app", closed.port);
    let err =
        match pgfire::service::Service::start(pgfire::service::ServiceConfig::new(url.clone()))
            .await
        {
            Ok(_) => panic!("started without a database"),
            Err(e) => e.to_string(),
        };
    assert!(
        err.contains("cannot connect to the database") && err.contains("onnection refused"),
        "{err}"
    );
    // The command line says the same and exits non-zero.
    let out = Command::new(env!("CARGO_BIN_EXE_pgfire"))
        .args(["install"])
        .env("DATABASE_URL", &url)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("pgfire: ") && stderr.contains("onnection refused"),
        "{stderr}"
    );
    // A malformed URL too.
    let out = Command::new(env!("CARGO_BIN_EXE_pgfire"))
        .args(["run"])
        .env("DATABASE_URL", "postgres://[::1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pgfire: "),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn running_before_install_says_what_to_do() {
    let db = TestDb::new();
    let err = match pgfire::service::Service::start(pgfire::service::ServiceConfig::new(db.url()))
        .await
    {
        Ok(_) => panic!("started without pgfire installed"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("run `pgfire install` first"), "{err}");
    // The proxy alone needs nothing installed.
    let mut cfg = pgfire::service::ServiceConfig::new(db.url());
    cfg.consumer = false;
    cfg.proxy = Some(pgfire::proxy::ProxyArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        no_proxy: false,
        tls_cert: None,
        tls_key: None,
        max_client_connections: 10,
        startup_timeout: 5,
        shutdown_timeout: 5,
    });
    let service = pgfire::service::Service::start(cfg)
        .await
        .expect("proxy-only pgfire");
    let url = format!(
        "postgres://postgres@{}/{}",
        service.proxy_addr.unwrap(),
        db.name
    );
    let c = pgfire::db::connect(&url).await.unwrap();
    assert_eq!(
        c.query_one("SELECT 7", &[]).await.unwrap().get::<_, i32>(0),
        7
    );
    drop(c);
    service.stop().await;
    let out = Command::new(env!("CARGO_BIN_EXE_pgfire"))
        .args(["uninstall"])
        .env("DATABASE_URL", db.url())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--yes"));
}

#[tokio::test]
async fn healthz_and_metrics_report_the_stream() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    db.psql(SETUP);
    let service = start_service(&db).await;
    let admin = service.admin_addr.unwrap();
    db.psql("INSERT INTO users VALUES (1)");
    let c = db.client().await;
    eventually(Duration::from_secs(30), "delivery", || async {
        (!texts(&c, "SELECT event_id FROM delivered").await.is_empty()).then_some(())
    })
    .await;
    let health = reqwest::get(format!("http://{admin}/healthz"))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let body: serde_json::Value = health.json().await.unwrap();
    assert_eq!(body["status"], "ok");
    assert_eq!(body["replication"]["connected"], true);
    // The run's metric counts what is recorded in pgfire.executions, and that record is
    // written after the function's own write to `delivered` commits: wait for it.
    let run_line =
        "pgfire_function_runs_total{function=\"deliver\",phase=\"post\",status=\"ok\"} 1\n";
    let metrics = eventually(Duration::from_secs(30), "the run in /metrics", || async {
        let m = reqwest::get(format!("http://{admin}/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        m.contains(run_line).then_some(m)
    })
    .await;
    assert!(
        metrics.contains("pgfire_events_total{type=\"POST_USER_CREATE\"} 1\n"),
        "{metrics}"
    );
    service.stop().await;
}

/// Start the cluster of `opts`, create database `app` and install pgfire in it.
async fn installed_app(opts: &ClusterOptions) -> (Cluster, String, tokio_postgres::Client) {
    let cluster = Cluster::start(opts).unwrap();
    cluster.psql("postgres", "CREATE DATABASE app").unwrap();
    let url = cluster.url("app");
    let c = pgfire::db::connect(&url).await.unwrap();
    pgfire::install::install(&c, None, pgfire::install::MIGRATIONS)
        .await
        .unwrap();
    (cluster, url, c)
}

/// A private cluster whose data survives a restart (commits durable), for outage tests.
fn durable_cluster(dir: &std::path::Path) -> ClusterOptions {
    let mut opts: ClusterOptions = test_cluster_options();
    std::fs::remove_dir_all(&opts.data_dir).ok();
    opts.data_dir = dir.join("data");
    opts.ephemeral = false;
    opts.port = Some(pgfire::embedded::free_port().unwrap());
    opts.settings
        .push(("synchronous_commit".into(), "on".into()));
    opts.settings.push(("fsync".into(), "on".into()));
    opts
}

/// The history writer keeps what it could not write while PostgreSQL is down (longer than the
/// five tries it used to give up after) and writes it once the database is back: every event of
/// every committed row has its run in pgfire.executions.
#[tokio::test]
async fn no_run_record_is_dropped_across_a_database_outage() {
    let dir = tempfile::tempdir().unwrap();
    let opts = durable_cluster(dir.path());
    let (cluster, url, c) = installed_app(&opts).await;
    c.batch_execute(
        "CREATE TABLE users (id int PRIMARY KEY);
         INSERT INTO pgfire.sources (table_name, kind) VALUES ('users', 'user');
         INSERT INTO pgfire.functions (name, kind) VALUES ('trace', 'log');
         INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('POST_USER_CREATE', 'trace');",
    )
    .await
    .unwrap();
    let mut cfg = pgfire::service::ServiceConfig::new(url.clone());
    cfg.status_interval = Duration::from_millis(50);
    let service = pgfire::service::Service::start(cfg).await.unwrap();
    // Rows keep committing until the database goes down under them.
    let writer = {
        let url = url.clone();
        tokio::spawn(async move {
            let c = pgfire::db::connect(&url).await.unwrap();
            for t in 0.. {
                let sql = format!(
                    "INSERT INTO users SELECT g FROM generate_series({}, {}) g",
                    t * 10,
                    t * 10 + 9
                );
                if c.batch_execute(&sql).await.is_err() {
                    break;
                }
            }
        })
    };
    eventually(Duration::from_secs(30), "runs being recorded", || async {
        let n: i64 = c
            .query_one("SELECT count(*) FROM pgfire.executions", &[])
            .await
            .ok()?
            .get(0);
        (n >= 500).then_some(())
    })
    .await;
    let mut cluster = cluster;
    cluster.crash();
    drop(cluster);
    writer.await.unwrap();
    // Down for longer than the writer's old five tries (about 6 s).
    tokio::time::sleep(Duration::from_secs(8)).await;
    let cluster = Cluster::start(&opts).unwrap();
    let c = pgfire::db::connect(&url).await.unwrap();
    let rows: i64 = c
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .unwrap()
        .get(0);
    eventually(
        Duration::from_secs(60),
        "a run recorded for every committed row",
        || async {
            let c = pgfire::db::connect(&url).await.ok()?;
            let n: i64 = c
                .query_one(
                    "SELECT count(DISTINCT event_id) FROM pgfire.executions WHERE status = 'ok'",
                    &[],
                )
                .await
                .ok()?
                .get(0);
            (n == rows).then_some(())
        },
    )
    .await;
    service.stop().await;
    cluster.stop();
}

/// The slot never moves past an event before the record of its dead run is stored: once the slot
/// has confirmed a backlog of failing events, every one of their `dead` runs is already in
/// pgfire.executions (nothing left only in memory for a kill -9 to lose).
#[tokio::test]
async fn dead_runs_are_stored_before_the_slot_moves_past_them() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE users (id int PRIMARY KEY);
         CREATE FUNCTION refuse(e jsonb) RETURNS void LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'no'; END $$;
         INSERT INTO pgfire.sources (table_name, kind) VALUES ('users', 'user');
         INSERT INTO pgfire.functions (name, kind, target) VALUES ('refuse', 'sql', 'refuse');
         INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('POST_USER_CREATE', 'refuse');
         UPDATE pgfire.settings SET value = '1' WHERE key = 'delivery.max_attempts';",
    )
    .await
    .unwrap();
    let service = start_service(&db).await;
    for i in 0..200 {
        c.batch_execute(&format!("INSERT INTO users VALUES ({i})"))
            .await
            .unwrap();
    }
    crate::support::caught_up(&db).await;
    // No waiting here: what the slot has confirmed must already be recorded.
    let dead = count(
        &c,
        "SELECT count(DISTINCT event_id) FROM pgfire.executions WHERE status = 'dead'",
    )
    .await;
    assert_eq!(dead, 200);
    service.stop().await;
}

/// A replication connection lost mid-stream: the server resends from the slot's confirmed
/// position, which lags what dispatch already has; nothing is handed to dispatch twice.
#[tokio::test]
async fn a_reconnect_does_not_deliver_what_dispatch_already_has() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    let c = db.client().await;
    // Dispatch slower than the writer: events wait in the channel to dispatch, handed over but
    // not yet settled, when the connection is lost.
    c.batch_execute(&format!(
        "{SETUP}
         CREATE OR REPLACE FUNCTION deliver(e jsonb) RETURNS void LANGUAGE sql AS $$
           SELECT pg_sleep(0.003);
           INSERT INTO delivered VALUES (e->>'id', (e->'event_data'->>'user_id')::int) $$;"
    ))
    .await
    .unwrap();
    let service = start_service(&db).await;
    let slot = crate::support::slot_name(&db);
    c.batch_execute(
        "DO $$ BEGIN FOR i IN 1..600 LOOP INSERT INTO users VALUES (i); COMMIT; END LOOP; END $$",
    )
    .await
    .unwrap();
    eventually(Duration::from_secs(30), "some deliveries", || async {
        let n = count(&c, "SELECT count(*) FROM delivered").await;
        (n >= 50).then_some(())
    })
    .await;
    c.execute(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot],
    )
    .await
    .unwrap();
    eventually(Duration::from_secs(60), "every row delivered", || async {
        let n = count(&c, "SELECT count(DISTINCT user_id) FROM delivered").await;
        (n == 600).then_some(())
    })
    .await;
    crate::support::caught_up(&db).await;
    assert!(service.health.reconnects.load(Ordering::SeqCst) >= 1);
    let r = c
        .query_one(
            "SELECT count(*), count(DISTINCT event_id) FROM delivered",
            &[],
        )
        .await
        .unwrap();
    let (all, distinct): (i64, i64) = (r.get(0), r.get(1));
    assert_eq!(all, distinct, "delivered twice after the reconnect");
    service.stop().await;
}
