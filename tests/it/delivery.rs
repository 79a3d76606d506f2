//! The delivery engine: rows run concurrently and in commit order per row, a failing function is
//! parked without holding up the others, parked runs retry under the current configuration and
//! keep their row's order, dead runs are redelivered, `Retry-After` is honoured, limits and
//! pauses.

use std::collections::HashMap;
use std::time::Duration;

use crate::support::hook::{Answer, Got, Hook};
use crate::support::{
    caught_up, count, eventually, install_pgfire, start_service, texts, ClosedPort, TestDb,
};

const WAIT: Duration = Duration::from_secs(60);

/// A `users` source with a webhook function `hook` (and whatever `extra` adds) on every user
/// event.
async fn setup(db: &TestDb, url: &str, extra: &str) -> tokio_postgres::Client {
    install_pgfire(db).await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE users (id int PRIMARY KEY, n int NOT NULL DEFAULT 0, pad text);
         INSERT INTO pgfire.sources (table_name, kind) VALUES ('users', 'user');
         UPDATE pgfire.settings SET value = '10' WHERE key = 'delivery.retry_base_ms';
         UPDATE pgfire.settings SET value = '100' WHERE key = 'delivery.retry_max_ms';
         INSERT INTO pgfire.functions (name, kind, target) VALUES ('hook', 'webhook', '{url}');
         INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES
           ('POST_USER_CREATE', 'hook'), ('POST_USER_UPDATE', 'hook');
         {extra}"
    ))
    .await
    .unwrap();
    c
}

/// (user id, n) of each request, in arrival order.
fn rows(got: &[Got]) -> Vec<(i64, i64)> {
    got.iter()
        .map(|g| {
            let d = &g.body["event_data"];
            (d["user_id"].as_i64().unwrap(), d["n"].as_i64().unwrap())
        })
        .collect()
}

/// Each row's values of `n` in arrival order.
fn per_row(got: &[(i64, i64)]) -> HashMap<i64, Vec<i64>> {
    let mut m: HashMap<i64, Vec<i64>> = HashMap::new();
    for (id, n) in got {
        m.entry(*id).or_default().push(*n);
    }
    m
}

async fn wait_got(hook: &Hook, n: usize) -> Vec<Got> {
    eventually(WAIT, &format!("{n} requests"), || async {
        let g = hook.got();
        (g.len() >= n).then_some(g)
    })
    .await
}

#[tokio::test]
async fn rows_run_concurrently_and_each_row_in_commit_order() {
    let db = TestDb::new();
    let hook = Hook::start(|_, _| Answer {
        delay: Duration::from_millis(20),
        ..Answer::status(200)
    })
    .await;
    let c = setup(
        &db,
        &hook.url(),
        "UPDATE pgfire.functions SET concurrency = 8",
    )
    .await;
    let service = start_service(&db).await;
    // 10 rows, each created then updated 4 times, interleaved across transactions.
    c.batch_execute("INSERT INTO users (id) SELECT generate_series(1, 10)")
        .await
        .unwrap();
    for n in 1..=4 {
        c.batch_execute(&format!("UPDATE users SET n = {n}"))
            .await
            .unwrap();
    }
    let got = rows(&wait_got(&hook, 50).await);
    caught_up(&db).await;
    assert_eq!(got.len(), 50, "each event once");
    for (id, ns) in per_row(&got) {
        assert_eq!(ns, [0, 1, 2, 3, 4], "row {id} in commit order");
    }
    let max = hook.max_concurrent();
    assert!(max > 1 && max <= 8, "{max} requests at once");
    service.stop().await;
}

#[tokio::test]
async fn an_update_of_the_primary_key_is_ordered_in_both_rows() {
    let db = TestDb::new();
    // Events about row 1 (as it is, or as it was) take a while to answer.
    let slow = Duration::from_millis(300);
    let hook = Hook::start(move |e, _| {
        let d = &e["event_data"];
        let about_one = d["user_id"] == 1 || d["old"]["id"] == 1;
        Answer {
            delay: if about_one { slow } else { Duration::ZERO },
            ..Answer::status(200)
        }
    })
    .await;
    let c = setup(&db, &hook.url(), "").await;
    let service = start_service(&db).await;
    for sql in [
        "INSERT INTO users (id) VALUES (1)",
        "UPDATE users SET id = 2 WHERE id = 1",
        "UPDATE users SET n = 1 WHERE id = 2",
    ] {
        c.batch_execute(sql).await.unwrap();
    }
    let got = wait_got(&hook, 3).await;
    caught_up(&db).await;
    let what: Vec<(i64, i64)> = rows(&got);
    assert_eq!(what, [(1, 0), (2, 0), (2, 1)], "commit order");
    // Each sent only once the one before it was answered.
    for pair in got.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(gap >= slow, "sent {gap:?} after the one before it");
    }
    assert_eq!(got[1].body["event_data"]["old"]["id"], 1);
    service.stop().await;
}

#[tokio::test]
async fn one_failing_endpoint_does_not_hold_up_another_function() {
    let db = TestDb::new();
    let bad = Hook::start(|_, _| Answer::status(500)).await;
    let good = Hook::start(|_, _| Answer::status(200)).await;
    let c = setup(
        &db,
        &bad.url(),
        &format!(
            "UPDATE pgfire.settings SET value = '100' WHERE key = 'delivery.max_attempts';
             UPDATE pgfire.settings SET value = '2' WHERE key = 'delivery.memory_attempts';
             INSERT INTO pgfire.functions (name, kind, target) VALUES ('good', 'webhook', '{}');
             INSERT INTO pgfire.subscriptions (event_type, function_name, priority) VALUES
               ('POST_USER_CREATE', 'good', 1), ('POST_USER_UPDATE', 'good', 1);",
            good.url()
        ),
    )
    .await;
    let service = start_service(&db).await;
    let started = std::time::Instant::now();
    c.batch_execute("INSERT INTO users (id) SELECT generate_series(1, 100)")
        .await
        .unwrap();
    for n in 1..=2 {
        c.batch_execute(&format!("UPDATE users SET n = {n}"))
            .await
            .unwrap();
    }
    let got = rows(&wait_got(&good, 300).await);
    let took = started.elapsed();
    for (id, ns) in per_row(&got) {
        assert_eq!(ns, [0, 1, 2], "row {id}");
    }
    // The slot moves on: the failing runs are parked, the later events of their rows behind them.
    caught_up(&db).await;
    let parked = count(
        &c,
        "SELECT count(*) FROM pgfire.parked WHERE function_name = 'hook' AND status = 'parked'",
    )
    .await;
    assert_eq!(parked, 300);
    let waiting = count(&c, "SELECT count(*) FROM pgfire.parked WHERE attempt = 0").await;
    assert_eq!(waiting, 200, "the updates wait, never tried");
    assert!(
        took < Duration::from_secs(20),
        "the healthy function took {took:?}"
    );
    // The failing function is retried from the table meanwhile.
    eventually(WAIT, "parked runs retried", || async {
        let n = count(
            &c,
            "SELECT count(*) FROM pgfire.executions WHERE function_name = 'hook' AND attempt > 2",
        )
        .await;
        (n > 0).then_some(())
    })
    .await;
    service.stop().await;
}

#[tokio::test]
async fn parked_runs_use_the_current_configuration_and_keep_row_order() {
    let db = TestDb::new();
    let closed = ClosedPort::new();
    let closed_port = closed.port;
    let hook = Hook::start(|_, _| Answer::status(200)).await;
    let c = setup(
        &db,
        &format!("http://127.0.0.1:{closed_port}/down"),
        "UPDATE pgfire.settings SET value = '100' WHERE key = 'delivery.max_attempts';
         UPDATE pgfire.settings SET value = '1' WHERE key = 'delivery.memory_attempts';",
    )
    .await;
    let service = start_service(&db).await;
    c.batch_execute("INSERT INTO users (id) VALUES (1), (2)")
        .await
        .unwrap();
    for n in 1..=3 {
        c.batch_execute(&format!("UPDATE users SET n = {n} WHERE id = 1"))
            .await
            .unwrap();
    }
    caught_up(&db).await;
    assert_eq!(count(&c, "SELECT count(*) FROM pgfire.parked").await, 5);
    // Fixing the URL fixes the pending retries.
    c.batch_execute(&format!(
        "UPDATE pgfire.functions SET target = '{}' WHERE name = 'hook'",
        hook.url()
    ))
    .await
    .unwrap();
    let got = wait_got(&hook, 5).await;
    let got = per_row(&rows(&got));
    assert_eq!(got[&1], [0, 1, 2, 3]);
    assert_eq!(got[&2], [0]);
    eventually(WAIT, "the parked table to empty", || async {
        (count(&c, "SELECT count(*) FROM pgfire.parked").await == 0).then_some(())
    })
    .await;
    // The row flows in memory again.
    c.batch_execute("UPDATE users SET n = 9 WHERE id = 1")
        .await
        .unwrap();
    let got = wait_got(&hook, 6).await;
    assert_eq!(rows(&got)[5], (1, 9));
    service.stop().await;
}

#[tokio::test]
async fn dead_runs_keep_their_envelope_and_are_redelivered() {
    let db = TestDb::new();
    let hook = Hook::start(|_, _| Answer::status(500)).await;
    let c = setup(
        &db,
        &hook.url(),
        "UPDATE pgfire.functions SET max_attempts = 2 WHERE name = 'hook';",
    )
    .await;
    let service = start_service(&db).await;
    c.batch_execute("INSERT INTO users (id) VALUES (1), (2), (3)")
        .await
        .unwrap();
    caught_up(&db).await;
    let dead = texts(
        &c,
        "SELECT event_id FROM pgfire.parked WHERE status = 'dead' ORDER BY event_id",
    )
    .await;
    assert_eq!(dead.len(), 3);
    let kept = count(&c, "SELECT count(*) FROM pgfire.parked WHERE envelope->>'id' = event_id AND last_error LIKE '%500%'").await;
    assert_eq!(kept, 3);
    hook.script(|_, _| Answer::status(200));
    // One execution...
    let n = count(&c, &format!(
        "SELECT pgfire.redeliver((SELECT max(id) FROM pgfire.executions WHERE status = 'dead' AND event_id = '{}'))",
        dead[0]
    ))
    .await;
    assert_eq!(n, 1);
    eventually(WAIT, "the redelivered run", || async {
        (hook
            .got()
            .iter()
            .filter(|g| g.webhook_id == dead[0])
            .count()
            == 3)
            .then_some(())
    })
    .await;
    // ...then a time range, then a whole function.
    let n = count(
        &c,
        "SELECT pgfire.redeliver(now() - interval '1 hour', now(), 'nobody')",
    )
    .await;
    assert_eq!(n, 0);
    let n = count(&c, "SELECT pgfire.redeliver('hook')").await;
    assert_eq!(n, 2);
    eventually(WAIT, "the parked table to empty", || async {
        (count(&c, "SELECT count(*) FROM pgfire.parked").await == 0).then_some(())
    })
    .await;
    // pgfire status shows the function's dead runs and its last error.
    hook.script(|_, _| Answer::status(500));
    c.batch_execute("INSERT INTO users (id) VALUES (4)")
        .await
        .unwrap();
    caught_up(&db).await;
    let admin = format!("http://{}", service.admin_addr.unwrap());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgfire"))
        .args(["status", "--admin-url", &admin])
        .env("DATABASE_URL", db.url())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = out
        .lines()
        .find(|l| l.starts_with("hook "))
        .unwrap_or_else(|| panic!("{out}"));
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        &cols[..6],
        ["hook", "webhook", "active", "0", "0", "1"],
        "{out}"
    );
    assert!(line.contains("answered 500"), "{line}");
    let err = c
        .batch_execute("SELECT pgfire.redeliver('nope')")
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("no function \"nope\"")
            || format!("{err:?}").contains("no function"),
        "{err:?}"
    );
    service.stop().await;
}

#[tokio::test]
async fn later_events_of_a_row_wait_behind_its_redelivered_run() {
    let db = TestDb::new();
    // Row 1's create fails (slowly) until told otherwise; then the next three tries still fail.
    // Its other events would go through at once.
    let failing = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(i64::MAX));
    let f = failing.clone();
    let hook = Hook::start(move |e, _| {
        let d = &e["event_data"];
        let create = d["user_id"] == 1 && d["n"] == 0;
        if create && f.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) > 0 {
            Answer {
                delay: Duration::from_millis(300),
                ..Answer::status(500)
            }
        } else {
            Answer::status(200)
        }
    })
    .await;
    let c = setup(
        &db,
        &hook.url(),
        "UPDATE pgfire.settings SET value = '1' WHERE key = 'delivery.memory_attempts';
         UPDATE pgfire.functions SET max_attempts = 2 WHERE name = 'hook';",
    )
    .await;
    let service = start_service(&db).await;
    c.batch_execute("INSERT INTO users (id) VALUES (1), (2)")
        .await
        .unwrap();
    eventually(WAIT, "row 1's run dead", || async {
        let dead = count(
            &c,
            "SELECT count(*) FROM pgfire.parked WHERE status = 'dead'",
        )
        .await;
        (dead == 1).then_some(())
    })
    .await;
    c.batch_execute("UPDATE pgfire.functions SET max_attempts = 20 WHERE name = 'hook'")
        .await
        .unwrap();
    failing.store(3, std::sync::atomic::Ordering::SeqCst);
    let n = count(&c, "SELECT pgfire.redeliver('hook')").await;
    assert_eq!(n, 1);
    // Committed after the revival: they wait until the revived run is delivered.
    for n in 1..=2 {
        c.batch_execute(&format!("UPDATE users SET n = {n}"))
            .await
            .unwrap();
    }
    eventually(WAIT, "everything delivered", || async {
        let parked = count(&c, "SELECT count(*) FROM pgfire.parked").await;
        let ok = count(
            &c,
            "SELECT count(*) FROM pgfire.executions WHERE status = 'ok'",
        )
        .await;
        (parked == 0 && ok == 6).then_some(())
    })
    .await;
    let got = rows(&hook.got());
    let one: Vec<i64> = got.iter().filter(|(id, _)| *id == 1).map(|r| r.1).collect();
    // The create (twice dead, then three failures and a success), then the updates in order.
    assert_eq!(
        one,
        [0, 0, 0, 0, 0, 0, 1, 2],
        "row 1 in commit order: {one:?}"
    );
    assert_eq!(per_row(&got)[&2], [0, 1, 2]);
    service.stop().await;
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let db = TestDb::new();
    let hook = Hook::start(|_, n| match n {
        0 => Answer {
            retry_after: Some("1".into()),
            ..Answer::status(503)
        },
        _ => Answer::status(200),
    })
    .await;
    let c = setup(&db, &hook.url(), "").await;
    let service = start_service(&db).await;
    c.batch_execute("INSERT INTO users (id) VALUES (1)")
        .await
        .unwrap();
    let got = wait_got(&hook, 2).await;
    let gap = got[1].at - got[0].at;
    assert!(gap >= Duration::from_millis(990), "retried after {gap:?}");
    assert_eq!(got[0].webhook_id, got[1].webhook_id);
    service.stop().await;
}

#[tokio::test]
async fn an_event_over_the_payload_limit_is_recorded_and_not_sent() {
    let db = TestDb::new();
    let hook = Hook::start(|_, _| Answer::status(200)).await;
    let c = setup(
        &db,
        &hook.url(),
        "UPDATE pgfire.settings SET value = '2048' WHERE key = 'limits.payload_bytes';",
    )
    .await;
    let service = start_service(&db).await;
    c.batch_execute("INSERT INTO users (id, pad) VALUES (1, repeat('x', 5000)); INSERT INTO users (id) VALUES (2);")
        .await
        .unwrap();
    let got = wait_got(&hook, 1).await;
    caught_up(&db).await;
    assert_eq!(rows(&got), [(2, 0)]);
    let err = eventually(WAIT, "the refused run's record", || async {
        texts(
            &c,
            "SELECT status || ': ' || error FROM pgfire.executions WHERE status <> 'ok'",
        )
        .await
        .pop()
    })
    .await;
    assert!(
        err.starts_with("dead: event payload of ")
            && err.contains("exceeds the limit of 2048 bytes (setting limits.payload_bytes)"),
        "{err}"
    );
    assert_eq!(hook.got().len(), 1);
    service.stop().await;
}

#[tokio::test]
async fn a_paused_function_gets_its_events_in_order_on_resume() {
    let db = TestDb::new();
    let hook = Hook::start(|_, _| Answer::status(200)).await;
    let c = setup(
        &db,
        &hook.url(),
        "UPDATE pgfire.functions SET paused = true",
    )
    .await;
    let service = start_service(&db).await;
    c.batch_execute("INSERT INTO users (id) VALUES (1), (2)")
        .await
        .unwrap();
    for n in 1..=3 {
        c.batch_execute(&format!("UPDATE users SET n = {n} WHERE id = 1"))
            .await
            .unwrap();
    }
    caught_up(&db).await;
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM pgfire.parked WHERE status = 'parked'"
        )
        .await,
        5
    );
    assert!(hook.got().is_empty());
    c.batch_execute("UPDATE pgfire.functions SET paused = false")
        .await
        .unwrap();
    let got = per_row(&rows(&wait_got(&hook, 5).await));
    assert_eq!(got[&1], [0, 1, 2, 3]);
    assert_eq!(got[&2], [0]);
    service.stop().await;
}

#[tokio::test]
async fn a_function_deleted_while_its_runs_are_parked_leaves_them_dead_with_the_reason() {
    let db = TestDb::new();
    let hook = Hook::start(|_, _| Answer::status(500)).await;
    let c = setup(
        &db,
        &hook.url(),
        "UPDATE pgfire.settings SET value = '100' WHERE key = 'delivery.max_attempts';
         UPDATE pgfire.settings SET value = '1' WHERE key = 'delivery.memory_attempts';",
    )
    .await;
    let service = start_service(&db).await;
    c.batch_execute("INSERT INTO users (id) VALUES (1), (2)")
        .await
        .unwrap();
    caught_up(&db).await;
    eventually(WAIT, "2 parked runs", || async {
        (count(
            &c,
            "SELECT count(*) FROM pgfire.parked WHERE status = 'parked'",
        )
        .await
            == 2)
            .then_some(())
    })
    .await;
    c.batch_execute("DELETE FROM pgfire.functions WHERE name = 'hook'")
        .await
        .unwrap();
    let errors = eventually(WAIT, "the parked runs to be dead", || async {
        let e = texts(
            &c,
            "SELECT last_error FROM pgfire.parked WHERE status = 'dead'",
        )
        .await;
        (e.len() == 2).then_some(e)
    })
    .await;
    assert!(
        errors
            .iter()
            .all(|e| e.contains("function hook is deleted or inactive now")),
        "{errors:?}"
    );
    service.stop().await;
}

#[tokio::test]
async fn delivery_columns_are_validated() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    for (sql, message) in [
        (
            "INSERT INTO pgfire.functions (name, kind, concurrency) VALUES ('f', 'log', 0)",
            "concurrency 0 of function \"f\" is out of range",
        ),
        (
            "INSERT INTO pgfire.functions (name, kind, concurrency) VALUES ('f', 'log', 1001)",
            "out of range",
        ),
        (
            "INSERT INTO pgfire.functions (name, kind, max_attempts) VALUES ('f', 'log', 0)",
            "max_attempts 0",
        ),
        (
            "INSERT INTO pgfire.functions (name, kind, max_age_seconds) VALUES ('f', 'log', -1)",
            "max_age_seconds -1",
        ),
        (
            "UPDATE pgfire.settings SET value = '0' WHERE key = 'delivery.memory_attempts'",
            "from 1 to 100",
        ),
        (
            "UPDATE pgfire.settings SET value = 'x' WHERE key = 'history.retention_seconds'",
            "must be an integer",
        ),
    ] {
        let err = db.try_psql(sql).unwrap_err();
        assert!(err.contains(message), "{sql}: {err}");
    }
}

#[tokio::test]
async fn writes_of_a_sql_function_do_not_trigger_it_again() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY);
         CREATE TABLE seen (fn text, id int);
         -- Writes a row into the very table it is subscribed to: without the rule, a loop.
         CREATE FUNCTION echo(e jsonb) RETURNS void LANGUAGE sql AS $$
           INSERT INTO seen VALUES ('echo', (e->'event_data'->>'id')::int);
           INSERT INTO t VALUES ((e->'event_data'->>'id')::int + 1000) $$;
         CREATE FUNCTION watch(e jsonb) RETURNS void LANGUAGE sql AS $$
           INSERT INTO seen VALUES ('watch', (e->'event_data'->>'id')::int) $$;
         INSERT INTO pgfire.sources (table_name, kind) VALUES ('t', 'record');
         INSERT INTO pgfire.functions (name, kind, target) VALUES ('echo', 'sql', 'echo'), ('watch', 'sql', 'watch');
         INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES
           ('POST_RECORD_CREATE', 'echo'), ('POST_RECORD_CREATE', 'watch');",
    )
    .await
    .unwrap();
    let service = start_service(&db).await;
    c.batch_execute("INSERT INTO t VALUES (1), (2)")
        .await
        .unwrap();
    // The other function sees the echoes: the rule is about the function that wrote them.
    eventually(WAIT, "watch to see the echoes", || async {
        (count(&c, "SELECT count(*) FROM seen WHERE fn = 'watch'").await == 4).then_some(())
    })
    .await;
    caught_up(&db).await;
    let echo = texts(
        &c,
        "SELECT string_agg(id::text, ',' ORDER BY id) FROM seen WHERE fn = 'echo'",
    )
    .await;
    assert_eq!(echo, ["1,2"]);
    assert_eq!(count(&c, "SELECT count(*) FROM t").await, 4);
    service.stop().await;
}

#[tokio::test]
async fn history_past_its_retention_is_pruned_in_small_batches() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    let c = db.client().await;
    c.batch_execute(
        "UPDATE pgfire.settings SET value = '86400' WHERE key = 'history.retention_seconds';
         INSERT INTO pgfire.executions (event_id, event_type, function_name, attempt, status, started_at, duration_ms)
           SELECT 'e' || i, 'E', 'f', 1, 'ok', now() - interval '2 days', 1 FROM generate_series(1, 2500) i;
         INSERT INTO pgfire.executions (event_id, event_type, function_name, attempt, status, started_at, duration_ms)
           VALUES ('recent', 'E', 'f', 1, 'ok', now() - interval '1 hour', 1);
         INSERT INTO pgfire.parked (function_name, key, event_id, event_type, envelope, status, parked_at)
           VALUES ('f', 'k', 'old', 'E', '{}', 'dead', now() - interval '2 days'),
                  ('f', 'k', 'new', 'E', '{}', 'dead', now());",
    )
    .await
    .unwrap();
    let service = start_service(&db).await;
    eventually(WAIT, "old history to be pruned", || async {
        (count(&c, "SELECT count(*) FROM pgfire.executions").await == 1).then_some(())
    })
    .await;
    assert_eq!(
        texts(&c, "SELECT event_id FROM pgfire.executions").await,
        ["recent"]
    );
    assert_eq!(
        texts(&c, "SELECT event_id FROM pgfire.parked").await,
        ["new"]
    );
    service.stop().await;
}

#[tokio::test]
async fn subscription_filters_are_validated_and_only_matching_events_run() {
    let db = TestDb::new();
    let hook = Hook::start(|_, _| Answer::status(200)).await;
    let c = setup(&db, &hook.url(), "").await;
    // The same syntax pgfire evaluates, checked by the database with clear errors.
    for (filter, message) in [
        ("", "empty (use NULL for no filter)"),
        ("n =", "expected a number, 'text', true or false"),
        ("changed(n", "expected changed(field)"),
        ("n = 1 and", "expected a condition after and/or"),
        ("n ~ 1", "unexpected ~ 1"),
        ("n = 1 pad = 2", "expected and, or, or the end"),
        ("n is nothing", "expected null after is"),
    ] {
        let err = db
            .try_psql(&format!(
                "UPDATE pgfire.subscriptions SET filter = '{}' WHERE event_type = 'POST_USER_UPDATE'",
                filter.replace('\'', "''")
            ))
            .unwrap_err();
        assert!(
            err.contains(&format!("invalid filter \"{filter}\": {message}")),
            "{filter}: {err}"
        );
    }
    c.batch_execute(
        "UPDATE pgfire.subscriptions SET filter = 'changed(n) and n >= 2 or pad = ''vip''' WHERE event_type = 'POST_USER_UPDATE';
         UPDATE pgfire.subscriptions SET filter = 'not pad is null' WHERE event_type = 'POST_USER_CREATE';",
    )
    .await
    .unwrap();
    let service = start_service(&db).await;
    c.batch_execute(
        "INSERT INTO users (id) VALUES (1);
         INSERT INTO users (id, pad) VALUES (2, 'x');
         UPDATE users SET n = 1 WHERE id = 1;
         UPDATE users SET n = 2 WHERE id = 1;
         UPDATE users SET pad = 'y' WHERE id = 1;
         UPDATE users SET pad = 'vip' WHERE id = 2;",
    )
    .await
    .unwrap();
    caught_up(&db).await;
    let got = eventually(WAIT, "3 matching events", || async {
        let g = hook.got();
        (g.len() >= 3).then_some(g)
    })
    .await;
    let mut seen: Vec<String> = got
        .iter()
        .map(|g| {
            format!(
                "{} {}",
                g.body["event_type"].as_str().unwrap(),
                g.body["event_data"]["user_id"]
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            "POST_USER_CREATE 2",
            "POST_USER_UPDATE 1",
            "POST_USER_UPDATE 2"
        ]
    );
    let n = got
        .iter()
        .find(|g| {
            g.body["event_type"] == "POST_USER_UPDATE" && g.body["event_data"]["user_id"] == 1
        })
        .map(|g| g.body["event_data"]["n"].clone());
    assert_eq!(n, Some(serde_json::json!(2)));
    service.stop().await;
}
