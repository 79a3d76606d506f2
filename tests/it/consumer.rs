//! The replication consumer against what goes wrong around it: a non-UTF-8 database, errors
//! retrying cannot fix, a network that silently drops everything, PostgreSQL's fast shutdown.

use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pgfire::embedded::{Cluster, ClusterOptions};
use pgfire::service::{Service, ServiceConfig};

use crate::support::relay::Relay;
use crate::support::webhook::Receiver;
use crate::support::{eventually, install_pgfire, slot_name, test_cluster_options, texts, TestDb};

const WAIT: Duration = Duration::from_secs(30);

const SETUP: &str = "
CREATE TABLE users (id int PRIMARY KEY, email text);
CREATE TABLE delivered (event_id text NOT NULL, user_id int NOT NULL);
CREATE FUNCTION deliver(e jsonb) RETURNS void LANGUAGE sql AS $$
  INSERT INTO delivered VALUES (e->>'id', (e->'event_data'->>'user_id')::int) $$;
INSERT INTO pgfire.sources (table_name, kind) VALUES ('users', 'user');
INSERT INTO pgfire.functions (name, kind, target) VALUES ('deliver', 'sql', 'deliver');
INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('POST_USER_CREATE', 'deliver');
";

fn service_config(url: String) -> ServiceConfig {
    let mut cfg = ServiceConfig::new(url);
    cfg.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.status_interval = Duration::from_millis(100);
    cfg
}

async fn healthz(service: &Service) -> (u16, serde_json::Value) {
    let r = reqwest::get(format!("http://{}/healthz", service.admin_addr.unwrap()))
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn delivered(c: &tokio_postgres::Client) -> i64 {
    c.query_one("SELECT count(DISTINCT user_id) FROM delivered", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_latin1_database_delivers_utf8_names_and_values() {
    let cluster = crate::support::cluster();
    let name = format!("latin1_{}", std::process::id());
    cluster
        .psql(
            "postgres",
            &format!("CREATE DATABASE {name} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"),
        )
        .unwrap();
    let db = TestDb { name, cluster };
    install_pgfire(&db).await;
    let receiver = Receiver::start().await;
    // tokio-postgres speaks UTF-8; the server converts to LATIN1 and stores it so.
    let c = db.client().await;
    c.batch_execute(&format!(
        r#"CREATE TABLE "kunden_ä" (id int PRIMARY KEY, "straße" text);
           INSERT INTO pgfire.sources (table_name, kind) VALUES ('"kunden_ä"', 'record');
           INSERT INTO pgfire.functions (name, kind, target) VALUES ('hook', 'webhook', '{}');
           INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('POST_RECORD_CREATE', 'hook');"#,
        receiver.url("/h")
    ))
    .await
    .unwrap();
    let service = Service::start(service_config(db.url())).await.unwrap();
    c.batch_execute(r#"INSERT INTO "kunden_ä" VALUES (1, 'Müller')"#)
        .await
        .unwrap();
    let got = eventually(WAIT, "the webhook", || async {
        receiver.received().first().map(|r| r.json())
    })
    .await;
    assert_eq!(got["event_data"]["straße"], "Müller", "{got}");
    assert_eq!(got["source"]["table"], "kunden_ä", "{got}");
    assert_eq!(service.health.reconnects.load(Ordering::SeqCst), 0);
    service.stop().await;
}

#[tokio::test]
async fn an_error_retrying_cannot_fix_stops_the_consumer_with_a_clear_state() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    db.psql(SETUP);
    let service = Service::start(service_config(db.url())).await.unwrap();
    eventually(WAIT, "streaming", || async {
        service
            .health
            .connected
            .load(Ordering::SeqCst)
            .then_some(())
    })
    .await;
    // The publication goes away under a running pgfire: the next change cannot be decoded.
    db.psql(&format!(
        "DROP PUBLICATION {}; INSERT INTO users VALUES (1)",
        pgfire::install::PUBLICATION
    ));
    eventually(WAIT, "the consumer to stop", || async {
        service.health.stopped.is_cancelled().then_some(())
    })
    .await;
    let (code, body) = healthz(&service).await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["status"], "stopped", "{body}");
    let state = body["replication"]["state"].as_str().unwrap().to_string();
    assert!(
        state.starts_with("stopped: ") && state.contains("publication") && state.contains("42704"),
        "{state}"
    );
    // It stopped at the first failure: no reconnect loop, and the slot is free.
    assert_eq!(service.health.reconnects.load(Ordering::SeqCst), 0);
    let c = db.client().await;
    let slot = slot_name(&db);
    eventually(WAIT, "the slot released", || async {
        let active: bool = c
            .query_one(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()
            .get(0);
        (!active).then_some(())
    })
    .await;
    // `pgfire status` shows what the database knows and what the service says.
    let admin = format!("http://{}", service.admin_addr.unwrap());
    let url = db.url();
    // Off the test's runtime thread, which also serves the admin endpoint.
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_pgfire"))
            .args(["status", "--admin-url", &admin])
            .env("DATABASE_URL", url)
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("publication pgfire missing"), "{stdout}");
    assert!(stdout.contains("service: stopped: "), "{stdout}");
    service.stop().await;

    // `pgfire run` exits non-zero with the reason, on the same change and on a missing slot.
    for extra in [&[][..], &["--slot", "no_such_slot"][..]] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pgfire"))
            .args(["run", "--no-proxy", "--admin-listen", "127.0.0.1:0"])
            .args(extra)
            .env("DATABASE_URL", db.url())
            .env("PGFIRE_LOG", "off")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let status = eventually(WAIT, "pgfire run to exit", || {
            let s = child.try_wait().unwrap();
            async move { s }
        })
        .await;
        let mut stderr = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        assert!(!status.success(), "{stderr}");
        assert!(
            stderr.contains("the replication consumer stopped") && stderr.contains("42704"),
            "{stderr}"
        );
    }
}

#[tokio::test]
async fn a_silently_dead_connection_is_noticed_and_replaced() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    db.psql(SETUP);
    let relay = Relay::start(([127, 0, 0, 1], db.cluster.port).into()).await;
    let mut cfg = service_config(format!("postgres://postgres@{}/{}", relay.addr, db.name));
    let timeout = Duration::from_secs(1);
    cfg.replication_timeout = timeout;
    let service = Service::start(cfg).await.unwrap();
    let c = db.client().await;
    c.batch_execute("INSERT INTO users VALUES (1)")
        .await
        .unwrap();
    eventually(WAIT, "the first delivery", || async {
        (delivered(&c).await == 1).then_some(())
    })
    .await;
    // An idle stream stays up across several timeouts: pings are answered. (Watching a
    // period for something that must not happen, not waiting for something to happen.)
    let reconnects = service.health.reconnects.load(Ordering::SeqCst);
    tokio::time::sleep(timeout * 3).await;
    assert_eq!(service.health.reconnects.load(Ordering::SeqCst), reconnects);
    assert!(service.health.connected.load(Ordering::SeqCst));

    relay.blackhole();
    let cut = Instant::now();
    eventually(WAIT, "pgfire to notice the dead connection", || async {
        (!service.health.connected.load(Ordering::SeqCst)).then_some(())
    })
    .await;
    let noticed = cut.elapsed();
    assert!(
        noticed < timeout * 3 + Duration::from_secs(1),
        "{noticed:?}"
    );
    let (code, body) = healthz(&service).await;
    assert_eq!(code, 503, "{body}");
    let state = body["replication"]["state"].as_str().unwrap();
    assert!(
        state.starts_with("reconnecting: ") && state.contains("connection considered dead"),
        "{state}"
    );

    relay.resume();
    c.batch_execute("INSERT INTO users VALUES (2)")
        .await
        .unwrap();
    eventually(
        Duration::from_secs(60),
        "delivery after the network is back",
        || async { (delivered(&c).await == 2).then_some(()) },
    )
    .await;
    assert!(service.health.connected.load(Ordering::SeqCst));
    assert!(service.health.reconnects.load(Ordering::SeqCst) > reconnects);
    service.stop().await;
}

#[tokio::test]
async fn a_fast_shutdown_is_not_held_up_and_the_backlog_comes_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts: ClusterOptions = test_cluster_options();
    std::fs::remove_dir_all(&opts.data_dir).ok();
    opts.data_dir = dir.path().join("data");
    opts.ephemeral = false;
    opts.port = Some(pgfire::embedded::free_port().unwrap());
    let cluster = Cluster::start(&opts).unwrap();
    cluster.psql("postgres", "CREATE DATABASE app").unwrap();
    let url = cluster.url("app");
    let c = pgfire::db::connect(&url).await.unwrap();
    pgfire::install::install(&c, None, pgfire::install::MIGRATIONS)
        .await
        .unwrap();
    c.batch_execute(SETUP).await.unwrap();
    // A slow function: 50 ms per event.
    c.batch_execute(
        "CREATE OR REPLACE FUNCTION deliver(e jsonb) RETURNS void LANGUAGE sql AS $$
           SELECT pg_sleep(0.05);
           INSERT INTO delivered VALUES (e->>'id', (e->'event_data'->>'user_id')::int) $$",
    )
    .await
    .unwrap();
    let service = Service::start(service_config(url.clone())).await.unwrap();
    // A backlog of 20 s of work in one transaction: nothing of it is settled before the end.
    let total = 400;
    c.batch_execute(&format!(
        "INSERT INTO users SELECT g, 'u' || g FROM generate_series(1, {total}) g"
    ))
    .await
    .unwrap();
    eventually(WAIT, "deliveries under way", || async {
        (delivered(&c).await >= 10).then_some(())
    })
    .await;
    drop(c);

    let started = Instant::now();
    tokio::task::spawn_blocking(move || cluster.stop())
        .await
        .unwrap();
    let took = started.elapsed();
    eprintln!("fast shutdown with a backlog took {took:?}");
    assert!(
        took < Duration::from_secs(5),
        "pg_ctl stop -m fast took {took:?}"
    );

    let cluster = Cluster::start(&opts).unwrap();
    let c = pgfire::db::connect(&url).await.unwrap();
    eventually(
        Duration::from_secs(90),
        "every event after the restart",
        || async { (delivered(&c).await == total).then_some(()) },
    )
    .await;
    // Duplicates are allowed; a duplicate carries the id of the first delivery.
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
    assert_eq!(ids, total);
    assert!(service.health.reconnects.load(Ordering::SeqCst) >= 1);
    service.stop().await;
    drop(c);
    cluster.stop();
}

#[tokio::test]
async fn the_consumer_stops_when_dispatch_is_gone() {
    use pgfire::replication::{run, ConsumerConfig, ConsumerHealth};
    let db = TestDb::new();
    install_pgfire(&db).await;
    db.psql(SETUP);
    // The dispatch task died: its receiver is dropped.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    drop(rx);
    let health = std::sync::Arc::new(ConsumerHealth::default());
    let config = ConsumerConfig {
        database_url: db.url(),
        slot: slot_name(&db),
        publication: pgfire::install::PUBLICATION.to_string(),
        status_interval: Duration::from_millis(100),
        connect_timeout: Duration::from_secs(10),
        server_timeout: Duration::from_secs(30),
        dispatch_stopping: Default::default(),
        spill: None,
    };
    let consumer = tokio::spawn(run(
        config,
        tx,
        health.settled_lsn.clone(),
        health.clone(),
        tokio_util::sync::CancellationToken::new(),
    ));
    db.psql("INSERT INTO users VALUES (1)");
    tokio::time::timeout(WAIT, consumer)
        .await
        .expect("the consumer stops")
        .unwrap();
    assert!(health.stopped.is_cancelled());
    assert!(!health.connected.load(Ordering::SeqCst));
    let state = health.state();
    assert!(state.starts_with("stopped: dispatch stopped"), "{state}");
}

// Multi-threaded, as `pgfire run` is: spilling runs off the worker's other tasks there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_beyond_the_memory_budget_is_spilled_to_files_and_delivered_whole() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    db.psql(SETUP);
    let spill_dir = tempfile::tempdir().unwrap();
    let mut cfg = service_config(db.url());
    cfg.spill = pgfire::replication::spill::SpillConfig {
        dir: spill_dir.path().to_path_buf(),
        budget: 64 << 10,
    };
    let service = Service::start(cfg).await.unwrap();
    let c = db.client().await;
    // logical_decoding_work_mem is 64kB on the test cluster: these stream while in progress,
    // and pgfire holds at most 64 KiB of them in memory.
    c.batch_execute(
        "BEGIN; INSERT INTO users SELECT i, repeat('a', 200) FROM generate_series(100001, 105000) i; ROLLBACK;
         BEGIN;
         INSERT INTO users SELECT i, repeat('b', 200) FROM generate_series(1, 6000) i;
         SAVEPOINT s; INSERT INTO users SELECT i, 'gone' FROM generate_series(6001, 8000) i; ROLLBACK TO SAVEPOINT s;
         INSERT INTO users SELECT i, repeat('c', 200) FROM generate_series(8001, 10000) i;
         COMMIT;",
    )
    .await
    .unwrap();
    eventually(Duration::from_secs(120), "8000 users delivered", || async {
        (delivered(&c).await == 8000).then_some(())
    })
    .await;
    let wrong = texts(
        &c,
        "SELECT count(*)::text FROM delivered WHERE user_id BETWEEN 6001 AND 8000 OR user_id > 10000",
    )
    .await;
    assert_eq!(wrong, ["0"], "nothing rolled back is delivered");
    let spilled = service.health.spilled_bytes.load(Ordering::Relaxed);
    assert!(
        spilled > 1_000_000,
        "the transaction was spilled: {spilled} bytes"
    );
    let left: Vec<_> = std::fs::read_dir(spill_dir.path()).unwrap().collect();
    assert!(left.is_empty(), "spill files left behind: {left:?}");
    service.stop().await;
}
