//! Delivery under faults, against real processes: pgfire killed with SIGKILL at random points of
//! a 10 000-event run, PostgreSQL crashing while runs are parked, an endpoint down then back, a
//! handler hanging past its timeout, handlers answering garbage, function and subscription rows
//! deleted while their runs are in flight.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::hook::{Answer, Hook};
use crate::support::{caught_up, count, eventually, install_pgfire, start_service, texts, TestDb};

const WAIT: Duration = Duration::from_secs(120);

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

/// A small pseudo-random sequence (no dependency, seeded from the clock, printed on failure).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

/// Per row, the values delivered in arrival order, each event counted at its first arrival.
fn first_arrivals(rows: &[(String, i32, i32)]) -> HashMap<i32, Vec<i32>> {
    let mut seen = std::collections::HashSet::new();
    let mut m: HashMap<i32, Vec<i32>> = HashMap::new();
    for (id, row, n) in rows {
        if seen.insert(id.clone()) {
            m.entry(*row).or_default().push(*n);
        }
    }
    m
}

#[tokio::test]
async fn sigkill_at_random_points_of_a_10000_event_run_loses_nothing_and_keeps_row_order() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE items (id int PRIMARY KEY, n int NOT NULL);
         CREATE TABLE delivered (seq bigserial PRIMARY KEY, event_id text NOT NULL, row_id int NOT NULL, n int NOT NULL);
         CREATE FUNCTION deliver(e jsonb) RETURNS void LANGUAGE sql AS $$
           INSERT INTO delivered (event_id, row_id, n)
           VALUES (e->>'id', (e->'event_data'->>'id')::int, (e->'event_data'->>'n')::int) $$;
         INSERT INTO pgfire.sources (table_name, kind) VALUES ('items', 'record');
         INSERT INTO pgfire.functions (name, kind, target, concurrency) VALUES ('deliver', 'sql', 'deliver', 16);
         INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES
           ('POST_RECORD_CREATE', 'deliver'), ('POST_RECORD_UPDATE', 'deliver');",
    )
    .await
    .unwrap();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut rng = Lcg(seed);
    // 10 000 events: 500 rows created, then updated 19 times each, in transactions of 50 rows.
    let writer = {
        let url = db.url();
        tokio::spawn(async move {
            let c = pgfire::db::connect(&url).await.unwrap();
            for b in 0..10 {
                c.batch_execute(&format!(
                    "INSERT INTO items SELECT i, 0 FROM generate_series({}, {}) i",
                    b * 50,
                    b * 50 + 49
                ))
                .await
                .unwrap();
            }
            for n in 1..=19 {
                for b in 0..10 {
                    c.batch_execute(&format!(
                        "UPDATE items SET n = {n} WHERE id BETWEEN {} AND {}",
                        b * 50,
                        b * 50 + 49
                    ))
                    .await
                    .unwrap();
                }
            }
        })
    };
    let mut kills = 0;
    let mut child = spawn_pgfire(&db.url());
    for _ in 0..5 {
        // Wait for a random number of further deliveries, then kill -9 and start again.
        let now = count(&c, "SELECT count(*) FROM delivered").await;
        let more = 200 + rng.next(1500) as i64;
        let reached = tokio::time::timeout(WAIT, async {
            loop {
                if count(&c, "SELECT count(DISTINCT event_id) FROM delivered").await >= 10_000 {
                    return false;
                }
                if count(&c, "SELECT count(*) FROM delivered").await >= now + more {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no progress (seed {seed})"));
        if !reached {
            break;
        }
        child.kill().expect("kill -9");
        child.wait().unwrap();
        kills += 1;
        child = spawn_pgfire(&db.url());
    }
    writer.await.unwrap();
    eventually(WAIT, "every event delivered", || async {
        let n = count(&c, "SELECT count(DISTINCT event_id) FROM delivered").await;
        (n == 10_000).then_some(())
    })
    .await;
    child.kill().ok();
    child.wait().ok();
    assert!(kills >= 1, "killed at least once (seed {seed})");
    // A duplicate carries the same id as the first delivery, with the same content.
    let conflicting = texts(
        &c,
        "SELECT event_id FROM delivered GROUP BY event_id HAVING count(DISTINCT (row_id, n)) > 1",
    )
    .await;
    assert!(conflicting.is_empty(), "{conflicting:?} (seed {seed})");
    let rows: Vec<(String, i32, i32)> = c
        .query(
            "SELECT event_id, row_id, n FROM delivered ORDER BY seq",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let per_row = first_arrivals(&rows);
    assert_eq!(per_row.len(), 500);
    let expected: Vec<i32> = (0..=19).collect();
    for (row, ns) in &per_row {
        assert_eq!(
            ns, &expected,
            "row {row} in commit order (seed {seed}, {kills} kills)"
        );
    }
}

#[tokio::test]
async fn an_endpoint_down_for_a_while_gets_everything_in_row_order_when_back() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    let hook = Hook::start(|_, _| Answer::status(503)).await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE items (id int PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO pgfire.sources (table_name, kind) VALUES ('items', 'record');
         UPDATE pgfire.settings SET value = '100' WHERE key = 'delivery.max_attempts';
         UPDATE pgfire.settings SET value = '10' WHERE key = 'delivery.retry_base_ms';
         UPDATE pgfire.settings SET value = '200' WHERE key = 'delivery.retry_max_ms';
         INSERT INTO pgfire.functions (name, kind, target) VALUES ('hook', 'webhook', '{}');
         INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES
           ('POST_RECORD_CREATE', 'hook'), ('POST_RECORD_UPDATE', 'hook');",
        hook.url()
    ))
    .await
    .unwrap();
    let service = start_service(&db).await;
    c.batch_execute("INSERT INTO items (id) SELECT generate_series(1, 20)")
        .await
        .unwrap();
    for n in 1..=5 {
        c.batch_execute(&format!("UPDATE items SET n = {n}"))
            .await
            .unwrap();
    }
    caught_up(&db).await;
    eventually(WAIT, "every run parked", || async {
        (count(
            &c,
            "SELECT count(*) FROM pgfire.parked WHERE status = 'parked'",
        )
        .await
            == 120)
            .then_some(())
    })
    .await;
    hook.script(|_, _| Answer::status(204));
    eventually(WAIT, "the parked table to empty", || async {
        (count(&c, "SELECT count(*) FROM pgfire.parked").await == 0).then_some(())
    })
    .await;
    // Each event accepted once; in the order accepted, every row's events in commit order.
    let got = hook.got();
    let mut per_row: HashMap<i64, Vec<i64>> = HashMap::new();
    // (the history of successful runs may lag)
    let accepted = eventually(WAIT, "120 successful runs", || async {
        let a = texts(
            &c,
            "SELECT event_id FROM pgfire.executions WHERE status = 'ok' ORDER BY started_at, id",
        )
        .await;
        (a.len() >= 120).then_some(a)
    })
    .await;
    assert_eq!(accepted.len(), 120, "each event accepted once");
    let by_id: HashMap<String, (i64, i64)> = got
        .iter()
        .map(|g| {
            let d = &g.body["event_data"];
            (
                g.webhook_id.clone(),
                (d["id"].as_i64().unwrap(), d["n"].as_i64().unwrap()),
            )
        })
        .collect();
    for id in &accepted {
        let (row, n) = by_id[id];
        per_row.entry(row).or_default().push(n);
    }
    for (row, ns) in per_row {
        assert_eq!(ns, [0, 1, 2, 3, 4, 5], "row {row}");
    }
    service.stop().await;
}

#[tokio::test]
async fn a_handler_hanging_past_its_timeout_is_retried_and_holds_up_no_other_row() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    // The first request for row 1 hangs for 30 s; everything else answers at once.
    let hook = Hook::start(|e, n| {
        if n == 0 && e["event_data"]["id"] == 1 {
            Answer {
                delay: Duration::from_secs(30),
                ..Answer::status(200)
            }
        } else {
            Answer::status(200)
        }
    })
    .await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE items (id int PRIMARY KEY);
         INSERT INTO pgfire.sources (table_name, kind) VALUES ('items', 'record');
         UPDATE pgfire.settings SET value = '10' WHERE key = 'delivery.retry_base_ms';
         INSERT INTO pgfire.functions (name, kind, target, timeout_ms) VALUES ('hook', 'webhook', '{}', 500);
         INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('POST_RECORD_CREATE', 'hook');",
        hook.url()
    ))
    .await
    .unwrap();
    let service = start_service(&db).await;
    c.batch_execute("INSERT INTO items VALUES (1)")
        .await
        .unwrap();
    eventually(WAIT, "the hanging request", || async {
        (!hook.got().is_empty()).then_some(())
    })
    .await;
    c.batch_execute("INSERT INTO items SELECT generate_series(2, 11)")
        .await
        .unwrap();
    let runs = eventually(WAIT, "row 1 retried after its timeout", || async {
        let r = texts(&c, "SELECT attempt || ' ' || status || ' ' || coalesce(error, '') FROM pgfire.executions WHERE event_id = (SELECT min(event_id) FROM pgfire.executions) ORDER BY attempt").await;
        (r.len() >= 2).then_some(r)
    })
    .await;
    assert_eq!(runs, ["1 timeout timed out after 500 ms", "2 ok "]);
    eventually(WAIT, "the other rows", || async {
        (count(
            &c,
            "SELECT count(*) FROM pgfire.executions WHERE status = 'ok'",
        )
        .await
            == 11)
            .then_some(())
    })
    .await;
    service.stop().await;
}

/// A TCP server answering every connection with `reply` and closing it.
async fn garbage_server(reply: &'static [u8]) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(reply).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn handlers_answering_garbage_get_clear_errors_and_the_stream_moves_on() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    let not_http = garbage_server(b"\x00\xff garbage, not HTTP at all\r\n\r\n").await;
    let bad_status = garbage_server(b"HTTP/1.1 999999 What\r\ncontent-length: 3\r\n\r\nabc").await;
    let junk_body =
        garbage_server(b"HTTP/1.1 500 Oops\r\ncontent-length: 6\r\n\r\n\xff\xfe\x00\x01\x02\x03")
            .await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE items (id int PRIMARY KEY);
         INSERT INTO pgfire.sources (table_name, kind) VALUES ('items', 'record');
         UPDATE pgfire.settings SET value = '2' WHERE key = 'delivery.max_attempts';
         UPDATE pgfire.settings SET value = '10' WHERE key = 'delivery.retry_base_ms';
         INSERT INTO pgfire.functions (name, kind, target) VALUES
           ('not_http', 'webhook', 'http://{not_http}/x'), ('bad_status', 'webhook', 'http://{bad_status}/x'),
           ('junk_body', 'webhook', 'http://{junk_body}/x');
         INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES
           ('POST_RECORD_CREATE', 'not_http'), ('POST_RECORD_CREATE', 'bad_status'), ('POST_RECORD_CREATE', 'junk_body');"
    ))
    .await
    .unwrap();
    let service = start_service(&db).await;
    c.batch_execute("INSERT INTO items VALUES (1), (2)")
        .await
        .unwrap();
    caught_up(&db).await;
    let dead = eventually(WAIT, "6 dead runs", || async {
        let d = texts(&c, "SELECT function_name || ': ' || error FROM pgfire.executions WHERE status = 'dead' ORDER BY 1").await;
        (d.len() == 6).then_some(d)
    })
    .await;
    for d in &dead {
        assert!(d.contains("POST http://127.0.0.1:"), "{d}");
    }
    assert!(
        dead.iter()
            .any(|d| d.starts_with("junk_body: ") && d.contains("answered 500")),
        "{dead:?}"
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM pgfire.parked WHERE status = 'dead'"
        )
        .await,
        6
    );
    // pgfire is still delivering.
    assert!(service
        .health
        .connected
        .load(std::sync::atomic::Ordering::SeqCst));
    service.stop().await;
}

#[tokio::test]
async fn rows_deleted_while_runs_are_in_flight_leave_nothing_unaccounted() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    // Every request takes 300 ms and fails: runs are in flight or waiting for their retry.
    let hook = Hook::start(|_, _| Answer {
        delay: Duration::from_millis(300),
        ..Answer::status(500)
    })
    .await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE items (id int PRIMARY KEY);
         INSERT INTO pgfire.sources (table_name, kind) VALUES ('items', 'record');
         UPDATE pgfire.settings SET value = '100' WHERE key = 'delivery.max_attempts';
         UPDATE pgfire.settings SET value = '10' WHERE key = 'delivery.memory_attempts';
         UPDATE pgfire.settings SET value = '10' WHERE key = 'delivery.retry_base_ms';
         INSERT INTO pgfire.functions (name, kind, target) VALUES ('hook', 'webhook', '{}');
         INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('POST_RECORD_CREATE', 'hook');",
        hook.url()
    ))
    .await
    .unwrap();
    let service = start_service(&db).await;
    c.batch_execute("INSERT INTO items SELECT generate_series(1, 5)")
        .await
        .unwrap();
    eventually(WAIT, "runs in flight", || async {
        (hook.got().len() >= 5).then_some(())
    })
    .await;
    c.batch_execute("DELETE FROM pgfire.subscriptions; DELETE FROM pgfire.functions;")
        .await
        .unwrap();
    // The runs in flight end dead with the reason; the slot moves past them.
    let dead = eventually(WAIT, "5 dead runs", || async {
        let d = texts(
            &c,
            "SELECT error FROM pgfire.executions WHERE status = 'dead'",
        )
        .await;
        (d.len() == 5).then_some(d)
    })
    .await;
    assert!(
        dead.iter()
            .all(|e| e.contains("function hook is deleted or inactive now")),
        "{dead:?}"
    );
    caught_up(&db).await;
    c.batch_execute("INSERT INTO items VALUES (6)")
        .await
        .unwrap();
    caught_up(&db).await;
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM pgfire.parked WHERE status = 'dead'"
        )
        .await,
        5
    );
    service.stop().await;
}

/// A private cluster whose commits survive a crash (for the restart test).
fn durable_cluster(dir: &std::path::Path) -> pgfire::embedded::ClusterOptions {
    let mut opts = crate::support::test_cluster_options();
    std::fs::remove_dir_all(&opts.data_dir).ok();
    opts.data_dir = dir.join("data");
    opts.ephemeral = false;
    opts.port = Some(pgfire::embedded::free_port().unwrap());
    opts.settings
        .push(("synchronous_commit".into(), "on".into()));
    opts.settings.push(("fsync".into(), "on".into()));
    opts
}

#[tokio::test]
async fn postgres_crashing_while_runs_are_parked_loses_none_and_keeps_row_order() {
    let dir = tempfile::tempdir().unwrap();
    let opts = durable_cluster(dir.path());
    let cluster = pgfire::embedded::Cluster::start(&opts).unwrap();
    cluster.psql("postgres", "CREATE DATABASE app").unwrap();
    let url = cluster.url("app");
    let c = pgfire::db::connect(&url).await.unwrap();
    pgfire::install::install(&c, None, pgfire::install::MIGRATIONS)
        .await
        .unwrap();
    let hook = Hook::start(|_, _| Answer::status(503)).await;
    c.batch_execute(&format!(
        "CREATE TABLE items (id int PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO pgfire.sources (table_name, kind) VALUES ('items', 'record');
         UPDATE pgfire.settings SET value = '100' WHERE key = 'delivery.max_attempts';
         UPDATE pgfire.settings SET value = '1' WHERE key = 'delivery.memory_attempts';
         UPDATE pgfire.settings SET value = '10' WHERE key = 'delivery.retry_base_ms';
         UPDATE pgfire.settings SET value = '200' WHERE key = 'delivery.retry_max_ms';
         INSERT INTO pgfire.functions (name, kind, target) VALUES ('hook', 'webhook', '{}');
         INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES
           ('POST_RECORD_CREATE', 'hook'), ('POST_RECORD_UPDATE', 'hook');",
        hook.url()
    ))
    .await
    .unwrap();
    let mut cfg = pgfire::service::ServiceConfig::new(url.clone());
    cfg.status_interval = Duration::from_millis(100);
    let service = pgfire::service::Service::start(cfg).await.unwrap();
    c.batch_execute(
        "INSERT INTO items (id) SELECT generate_series(1, 10); UPDATE items SET n = 1;",
    )
    .await
    .unwrap();
    eventually(WAIT, "20 parked runs", || async {
        (count(
            &c,
            "SELECT count(*) FROM pgfire.parked WHERE status = 'parked'",
        )
        .await
            == 20)
            .then_some(())
    })
    .await;
    // A crash while the parked runs are being retried.
    let mut cluster = cluster;
    cluster.crash();
    drop(cluster);
    eventually(WAIT, "pgfire to notice", || async {
        (!service
            .health
            .connected
            .load(std::sync::atomic::Ordering::SeqCst))
        .then_some(())
    })
    .await;
    let cluster = pgfire::embedded::Cluster::start(&opts).unwrap();
    let c = pgfire::db::connect(&url).await.unwrap();
    c.batch_execute("UPDATE items SET n = 2; INSERT INTO items (id) VALUES (11);")
        .await
        .unwrap();
    hook.script(|_, _| Answer::status(200));
    eventually(WAIT, "the parked table to empty", || async {
        (count(&c, "SELECT count(*) FROM pgfire.parked").await == 0).then_some(())
    })
    .await;
    let accepted = eventually(WAIT, "31 successful runs", || async {
        let a = texts(
            &c,
            "SELECT event_id FROM pgfire.executions WHERE status = 'ok' ORDER BY started_at, id",
        )
        .await;
        (a.len() >= 31).then_some(a)
    })
    .await;
    let got = hook.got();
    let by_id: HashMap<String, (i64, i64)> = got
        .iter()
        .map(|g| {
            let d = &g.body["event_data"];
            (
                g.webhook_id.clone(),
                (d["id"].as_i64().unwrap(), d["n"].as_i64().unwrap()),
            )
        })
        .collect();
    let mut seen = std::collections::HashSet::new();
    let mut per_row: HashMap<i64, Vec<i64>> = HashMap::new();
    for id in &accepted {
        if seen.insert(id.clone()) {
            let (row, n) = by_id[id];
            per_row.entry(row).or_default().push(n);
        }
    }
    assert_eq!(seen.len(), 31, "every event accepted");
    for row in 1..=10 {
        assert_eq!(per_row[&row], [0, 1, 2], "row {row}");
    }
    assert_eq!(per_row[&11], [0]);
    service.stop().await;
    cluster.stop();
}
