//! POST row events end to end: a committed row, the replication stream, a subscribed function.

use std::time::Duration;

use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::support::webhook::Receiver;
use crate::support::{
    caught_up, eventually, install_pgfire, start_service, texts, ClosedPort, TestDb,
};

const SECRET: &str = "whsec_dGVzdC1zZWNyZXQta2V5LTEyMzQ1Njc4OTBhYmNk";
const WAIT: Duration = Duration::from_secs(30);

/// A capture table and SQL functions `capture_a` / `capture_b` that append envelopes to it.
const CAPTURE: &str = "
CREATE TABLE captured (n bigserial PRIMARY KEY, fn text NOT NULL, envelope jsonb NOT NULL);
CREATE FUNCTION capture_a(e jsonb) RETURNS void LANGUAGE sql AS $$ INSERT INTO captured (fn, envelope) VALUES ('a', e) $$;
CREATE FUNCTION capture_b(e jsonb) RETURNS void LANGUAGE sql AS $$ INSERT INTO captured (fn, envelope) VALUES ('b', e) $$;
";

async fn captured(c: &tokio_postgres::Client) -> Vec<(String, Value)> {
    c.query("SELECT fn, envelope::text FROM captured ORDER BY n", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), serde_json::from_str(r.get::<_, &str>(1)).unwrap()))
        .collect()
}

async fn wait_captured(c: &tokio_postgres::Client, n: usize) -> Vec<(String, Value)> {
    eventually(WAIT, &format!("{n} captured events"), || async {
        let rows = captured(c).await;
        (rows.len() >= n).then_some(rows)
    })
    .await
}

fn verify_signature(secret: &str, id: &str, ts: &str, body: &[u8], header: &str) -> bool {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.trim_start_matches("whsec_"))
        .unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(body);
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    header.split(' ').any(|s| s == format!("v1,{expected}"))
}

#[tokio::test]
async fn user_events_reach_a_signed_webhook_with_the_exact_payload() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    let hook = Receiver::start().await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE users (id bigint PRIMARY KEY, email text NOT NULL, balance numeric, visits int8, profile jsonb, tags text[], seen timestamptz, note text);
         INSERT INTO pgfire.sources (table_name, kind) VALUES ('users', 'user');
         INSERT INTO pgfire.functions (name, kind, target, secret) VALUES ('hook', 'webhook', '{}', '{SECRET}');
         INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES
           ('POST_USER_CREATE', 'hook'), ('POST_USER_UPDATE', 'hook'), ('POST_USER_DELETE', 'hook');",
        hook.url("/hooks/users")
    ))
    .await
    .unwrap();
    let service = start_service(&db).await;
    c.batch_execute(
        "INSERT INTO users VALUES (42, 'x@b.c', 12345678901234567890.123456789, 9007199254740993,
                                  '{\"plan\": \"pro\", \"n\": 1.10}', '{a,\"b c\",NULL}', '2025-01-02 03:04:05.678+00', NULL);
         UPDATE users SET email = 'a@b.c' WHERE id = 42;
         DELETE FROM users WHERE id = 42;",
    )
    .await
    .unwrap();
    let got = eventually(WAIT, "3 webhooks", || async {
        let r = hook.received();
        (r.len() >= 3).then_some(r)
    })
    .await;
    assert_eq!(got.len(), 3);

    let mut ids = Vec::new();
    for (i, r) in got.iter().enumerate() {
        let env = r.json();
        assert!(
            verify_signature(
                SECRET,
                &r.header("webhook-id"),
                &r.header("webhook-timestamp"),
                &r.body,
                &r.header("webhook-signature")
            ),
            "signature of webhook {i}"
        );
        assert_eq!(r.header("webhook-id"), env["id"].as_str().unwrap());
        assert_eq!(r.header("content-type"), "application/json");
        assert_eq!(env["source"]["database"], json!(db.name));
        assert_eq!(env["source"]["schema"], json!("public"));
        assert_eq!(env["source"]["table"], json!("users"));
        assert!(env["source"]["lsn"].as_str().unwrap().contains('/'));
        assert!(env["source"]["xid"].as_u64().unwrap() > 0);
        assert!(env["occurred_at"].as_str().unwrap().ends_with('Z'));
        ids.push(env["id"].as_str().unwrap().to_string());
    }
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, ids, "ids are distinct and in commit order");

    // Exact text of values that must not lose precision.
    let body = String::from_utf8(got[0].body.to_vec()).unwrap();
    assert!(
        body.contains(r#""balance":12345678901234567890.123456789"#),
        "{body}"
    );
    assert!(body.contains(r#""visits":9007199254740993"#), "{body}");
    assert!(body.contains(r#""n":1.10"#), "{body}");

    let create = got[0].json();
    assert_eq!(create["event_type"], "POST_USER_CREATE");
    let expected_row = serde_json::from_str::<Value>(
        r#"{"id": 42, "email": "x@b.c", "balance": 12345678901234567890.123456789, "visits": 9007199254740993,
            "profile": {"plan": "pro", "n": 1.10}, "tags": ["a", "b c", null], "seen": "2025-01-02T03:04:05.678Z", "note": null}"#,
    )
    .unwrap();
    let mut expected_create = serde_json::Map::new();
    expected_create.insert("user_id".into(), json!(42));
    expected_create.extend(expected_row.as_object().unwrap().clone());
    assert_eq!(create["event_data"], Value::Object(expected_create.clone()));

    let update = got[1].json();
    assert_eq!(update["event_type"], "POST_USER_UPDATE");
    assert_eq!(update["event_data"]["email"], "a@b.c");
    assert_eq!(update["event_data"]["user_id"], 42);
    assert_eq!(
        update["event_data"]["changes"],
        json!({"email": {"old": "x@b.c", "new": "a@b.c"}})
    );
    assert_eq!(update["event_data"]["old"], expected_row);

    let delete = got[2].json();
    assert_eq!(delete["event_type"], "POST_USER_DELETE");
    assert_eq!(delete["event_data"]["user_id"], 42);
    assert_eq!(delete["event_data"]["email"], "a@b.c");
    assert_eq!(delete["event_data"]["old"]["email"], "a@b.c");

    let statuses = eventually(WAIT, "3 execution rows", || async {
        let s = texts(&c, "SELECT status || ' ' || attempt || ' ' || function_name || ' ' || event_type FROM pgfire.executions ORDER BY event_id").await;
        (s.len() >= 3).then_some(s)
    })
    .await;
    assert_eq!(
        statuses,
        [
            "ok 1 hook POST_USER_CREATE",
            "ok 1 hook POST_USER_UPDATE",
            "ok 1 hook POST_USER_DELETE"
        ]
    );
    service.stop().await;
}

#[tokio::test]
async fn record_events_name_their_table_and_other_tables_stay_silent() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "{CAPTURE}
         CREATE TABLE orders (order_no text PRIMARY KEY, total numeric(10,2));
         CREATE TABLE audit (id serial PRIMARY KEY, what text);
         INSERT INTO pgfire.sources (table_name, kind) VALUES ('orders', 'record');
         INSERT INTO pgfire.functions (name, kind, target) VALUES ('a', 'sql', 'capture_a');
         INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES
           ('POST_RECORD_CREATE', 'a'), ('POST_RECORD_UPDATE', 'a'), ('POST_RECORD_DELETE', 'a'), ('POST_USER_CREATE', 'a');"
    ))
    .await
    .unwrap();
    let service = start_service(&db).await;
    c.batch_execute(
        "INSERT INTO audit (what) VALUES ('ignored');
         INSERT INTO orders VALUES ('A-1', 10.50);
         INSERT INTO audit (what) VALUES ('ignored too');
         UPDATE orders SET total = 11.00;
         DELETE FROM orders;",
    )
    .await
    .unwrap();
    let got = wait_captured(&c, 3).await;
    let types: Vec<_> = got
        .iter()
        .map(|(_, e)| e["event_type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        types,
        [
            "POST_RECORD_CREATE",
            "POST_RECORD_UPDATE",
            "POST_RECORD_DELETE"
        ]
    );
    let expected: Value = serde_json::from_str(
        r#"{"record_id": "A-1", "table": "orders", "order_no": "A-1", "total": 10.50}"#,
    )
    .unwrap();
    assert_eq!(got[0].1["event_data"], expected);
    assert_eq!(
        got[1].1["event_data"]["changes"],
        serde_json::from_str::<Value>(r#"{"total": {"old": 10.50, "new": 11.00}}"#).unwrap()
    );
    // A later event proves nothing else is in flight: the audit rows produced nothing.
    c.batch_execute("INSERT INTO orders VALUES ('A-2', 1)")
        .await
        .unwrap();
    let got = wait_captured(&c, 4).await;
    assert_eq!(got.len(), 4);
    assert!(got.iter().all(|(_, e)| e["source"]["table"] == "orders"));
    service.stop().await;
}

#[tokio::test]
async fn functions_run_in_priority_order_and_inactive_ones_are_skipped() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "{CAPTURE}
         CREATE TABLE users (id int PRIMARY KEY);
         CREATE FUNCTION capture_c(e jsonb) RETURNS void LANGUAGE sql AS $$ INSERT INTO captured (fn, envelope) VALUES ('c', e) $$;
         INSERT INTO pgfire.sources (table_name, kind) VALUES ('users', 'user');
         INSERT INTO pgfire.functions (name, kind, target) VALUES ('a', 'sql', 'capture_a'), ('b', 'sql', 'capture_b'), ('c', 'sql', 'capture_c');
         INSERT INTO pgfire.functions (name, kind, target, active) VALUES ('off', 'sql', 'capture_c', false);
         INSERT INTO pgfire.subscriptions (event_type, function_name, priority, active) VALUES
           ('POST_USER_CREATE', 'a', 10, true), ('POST_USER_CREATE', 'b', -5, true),
           ('POST_USER_CREATE', 'c', 0, false), ('POST_USER_CREATE', 'off', 1, true);"
    ))
    .await
    .unwrap();
    let service = start_service(&db).await;
    c.batch_execute("INSERT INTO users VALUES (1); INSERT INTO users VALUES (2);")
        .await
        .unwrap();
    let got = wait_captured(&c, 4).await;
    // Each function gets both events (two rows: they may run concurrently); the functions of
    // one event start in priority order (b, then a) and run independently of each other.
    let order = |f: &str| -> Vec<String> {
        let mut v: Vec<String> = got
            .iter()
            .filter(|(g, _)| g == f)
            .map(|(_, e)| e["event_data"]["user_id"].to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        (order("a"), order("b")),
        (
            vec!["1".to_string(), "2".into()],
            vec!["1".to_string(), "2".into()]
        )
    );
    let starts = eventually(WAIT, "the history of 4 runs", || async {
        let s = texts(&c, "SELECT string_agg(function_name, '' ORDER BY started_at, id) FROM pgfire.executions GROUP BY event_id ORDER BY event_id").await;
        (s.len() == 2 && s.iter().all(|s| s.len() == 2)).then_some(s)
    })
    .await;
    assert_eq!(starts, ["ba", "ba"]);
    service.stop().await;
}

#[tokio::test]
async fn configuration_changes_apply_while_running_in_commit_order() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "{CAPTURE}
         CREATE TABLE users (id int PRIMARY KEY);
         CREATE TABLE things (id int PRIMARY KEY);
         INSERT INTO pgfire.sources (table_name, kind) VALUES ('users', 'user');
         INSERT INTO pgfire.functions (name, kind, target) VALUES ('a', 'sql', 'capture_a'), ('b', 'sql', 'capture_b');"
    ))
    .await
    .unwrap();
    let service = start_service(&db).await;
    caught_up(&db).await;
    // Each step commits, and the next starts once pgfire has seen it.
    let steps = [
        "INSERT INTO users VALUES (1)",
        "INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('POST_USER_CREATE', 'a')",
        "INSERT INTO users VALUES (2)",
        "UPDATE pgfire.subscriptions SET active = false",
        "INSERT INTO users VALUES (3)",
        "INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('POST_USER_CREATE', 'b')",
        "UPDATE pgfire.functions SET active = false WHERE name = 'b'",
        "INSERT INTO users VALUES (4)",
        "UPDATE pgfire.functions SET active = true WHERE name = 'b'",
        "INSERT INTO users VALUES (5)",
        "INSERT INTO pgfire.sources (table_name, kind) VALUES ('things', 'record')",
        "INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('POST_RECORD_CREATE', 'b')",
        "INSERT INTO things VALUES (6)",
    ];
    for step in steps {
        c.batch_execute(step).await.unwrap();
        if step.contains("pgfire.") {
            caught_up(&db).await;
        }
    }
    // A change in the same transaction as the rows applies to the rows after it.
    c.batch_execute(
        "BEGIN; INSERT INTO users VALUES (7); UPDATE pgfire.subscriptions SET active = true WHERE function_name = 'a';
         INSERT INTO users VALUES (8); COMMIT;",
    )
    .await
    .unwrap();
    let got = wait_captured(&c, 6).await;
    let seen: Vec<String> = got
        .iter()
        .map(|(f, e)| {
            format!(
                "{f}{}",
                e["event_data"]["user_id"]
                    .as_i64()
                    .or(e["event_data"]["record_id"].as_i64())
                    .unwrap()
            )
        })
        .collect();
    // Functions run independently (each in its rows' commit order): order by row, then function.
    let mut seen = seen;
    seen.sort_by_key(|s| (s[1..].parse::<i64>().unwrap(), s[..1].to_string()));
    assert_eq!(seen, ["a2", "b5", "b6", "b7", "a8", "b8"]);
    service.stop().await;
}

/// While pgfire is down the configuration changes between rows: the backlog is routed by the
/// configuration of each row's own commit, not by today's tables.
#[tokio::test]
async fn a_backlog_is_routed_by_the_configuration_of_its_commit() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "{CAPTURE}
         CREATE TABLE users (id int PRIMARY KEY);
         INSERT INTO pgfire.sources (table_name, kind) VALUES ('users', 'user');
         INSERT INTO pgfire.functions (name, kind, target) VALUES ('a', 'sql', 'capture_a'), ('b', 'sql', 'capture_b');
         INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('POST_USER_CREATE', 'a');"
    ))
    .await
    .unwrap();
    let service = start_service(&db).await;
    c.batch_execute("INSERT INTO users VALUES (1)")
        .await
        .unwrap();
    wait_captured(&c, 1).await;
    caught_up(&db).await;
    service.stop().await;

    // pgfire is down: rows and configuration changes pile up in the slot.
    for step in [
        "INSERT INTO users VALUES (2)",
        "UPDATE pgfire.subscriptions SET active = false WHERE function_name = 'a'",
        "INSERT INTO users VALUES (3)",
        "INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('POST_USER_CREATE', 'b')",
        "INSERT INTO users VALUES (4)",
        "UPDATE pgfire.settings SET value = '2' WHERE key = 'delivery.max_attempts'",
    ] {
        c.batch_execute(step).await.unwrap();
    }
    let service = start_service(&db).await;
    caught_up(&db).await;
    let seen: Vec<String> = captured(&c)
        .await
        .iter()
        .map(|(f, e)| format!("{f}{}", e["event_data"]["user_id"]))
        .collect();
    // (functions run independently: compared as a set)
    let mut seen = seen;
    seen.sort();
    assert_eq!(seen, ["a1", "a2", "b4"]);
    service.stop().await;

    // A restart resumes with the configuration in force where the slot stands, kept in
    // pgfire.config_applied (older snapshots are pruned as the slot moves).
    c.batch_execute("UPDATE pgfire.subscriptions SET active = true WHERE function_name = 'a'; INSERT INTO users VALUES (5)")
        .await
        .unwrap();
    let service = start_service(&db).await;
    caught_up(&db).await;
    let seen: Vec<String> = captured(&c)
        .await
        .iter()
        .map(|(f, e)| format!("{f}{}", e["event_data"]["user_id"]))
        .collect();
    let mut seen = seen;
    seen.sort();
    assert_eq!(seen, ["a1", "a2", "a5", "b4", "b5"]);
    service.stop().await;
    let kept: i64 = c
        .query_one("SELECT count(*) FROM pgfire.config_applied", &[])
        .await
        .unwrap()
        .get(0);
    assert!(kept <= 3, "{kept} snapshots kept");
}

/// The configuration travels in logical messages, which every logical decoding consumer of the
/// database sees (publications filter tables, not messages): webhook secrets stay out of them.
#[tokio::test]
async fn webhook_secrets_never_travel_in_the_stream() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    let c = db.client().await;
    c.batch_execute(
        "SELECT pg_create_logical_replication_slot(current_database() || '_peek', 'test_decoding')",
    )
    .await
    .unwrap();
    c.batch_execute(&format!(
        "INSERT INTO pgfire.functions (name, kind, target, secret) VALUES ('w', 'webhook', 'http://127.0.0.1:9/x', '{SECRET}');
         UPDATE pgfire.functions SET timeout_ms = 500 WHERE name = 'w';"
    ))
    .await
    .unwrap();
    // The test cluster commits asynchronously: decoding sees a commit once its WAL is flushed.
    let seen = eventually(WAIT, "the change in the stream", || async {
        let seen = texts(
            &c,
            "SELECT data FROM pg_logical_slot_peek_changes(current_database() || '_peek', NULL, NULL)",
        )
        .await;
        (seen.iter().filter(|d| d.contains("pgfire.config")).count() >= 2).then_some(seen)
    })
    .await;
    c.batch_execute("SELECT pg_drop_replication_slot(current_database() || '_peek')")
        .await
        .unwrap();
    // (test_decoding shows every table's rows, pgfire.functions' too; a publication-based
    // consumer such as pgoutput does not, and the messages are what it would see of pgfire.)
    let messages: Vec<&String> = seen.iter().filter(|d| d.starts_with("message:")).collect();
    assert!(
        !messages.iter().any(|d| d.contains("whsec_")),
        "a secret in the stream: {messages:?}"
    );
}

#[tokio::test]
async fn a_failing_webhook_is_retried_and_recorded_attempt_by_attempt() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    let hook = Receiver::with_statuses(vec![500, 503]).await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE users (id int PRIMARY KEY);
         UPDATE pgfire.settings SET value = '10' WHERE key = 'delivery.retry_base_ms';
         INSERT INTO pgfire.sources (table_name, kind) VALUES ('users', 'user');
         INSERT INTO pgfire.functions (name, kind, target) VALUES ('hook', 'webhook', '{}');
         INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('POST_USER_CREATE', 'hook');",
        hook.url("/h")
    ))
    .await
    .unwrap();
    let service = start_service(&db).await;
    c.batch_execute("INSERT INTO users VALUES (1)")
        .await
        .unwrap();
    let rows = eventually(WAIT, "3 attempts", || async {
        let s = texts(&c, "SELECT attempt || ' ' || status || ' ' || coalesce(error, '') FROM pgfire.executions ORDER BY attempt").await;
        (s.len() >= 3).then_some(s)
    })
    .await;
    assert!(
        rows[0].starts_with("1 error POST http://127.0.0.1:") && rows[0].contains("500"),
        "{rows:?}"
    );
    assert!(
        rows[1].starts_with("2 error") && rows[1].contains("503"),
        "{rows:?}"
    );
    assert_eq!(rows[2], "3 ok ");
    let got = hook.received();
    assert_eq!(got.len(), 3);
    assert!(
        got.iter()
            .all(|r| r.header("webhook-id") == got[0].header("webhook-id")),
        "same id on every attempt"
    );
    service.stop().await;
}

#[tokio::test]
async fn an_unreachable_webhook_goes_dead_and_the_stream_moves_on() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    let closed = ClosedPort::new();
    let closed_port = closed.port;
    let c = db.client().await;
    c.batch_execute(&format!(
        "{CAPTURE}
         CREATE TABLE users (id int PRIMARY KEY);
         UPDATE pgfire.settings SET value = '2' WHERE key = 'delivery.max_attempts';
         UPDATE pgfire.settings SET value = '10' WHERE key = 'delivery.retry_base_ms';
         INSERT INTO pgfire.sources (table_name, kind) VALUES ('users', 'user');
         INSERT INTO pgfire.functions (name, kind, target) VALUES ('down', 'webhook', 'http://127.0.0.1:{closed_port}/x'), ('a', 'sql', 'capture_a');
         INSERT INTO pgfire.subscriptions (event_type, function_name, priority) VALUES ('POST_USER_CREATE', 'down', 0), ('POST_USER_CREATE', 'a', 1);"
    ))
    .await
    .unwrap();
    let service = start_service(&db).await;
    c.batch_execute("INSERT INTO users VALUES (1); INSERT INTO users VALUES (2);")
        .await
        .unwrap();
    wait_captured(&c, 2).await;
    let rows = eventually(WAIT, "history", || async {
        let s = texts(&c, "SELECT function_name || ' ' || attempt || ' ' || status FROM pgfire.executions WHERE function_name = 'down' ORDER BY event_id, attempt").await;
        (s.len() >= 4).then_some(s)
    })
    .await;
    assert_eq!(
        rows,
        ["down 1 error", "down 2 dead", "down 1 error", "down 2 dead"]
    );
    let err = texts(
        &c,
        "SELECT error FROM pgfire.executions WHERE status = 'dead' LIMIT 1",
    )
    .await;
    assert!(
        err[0].contains(&format!("POST http://127.0.0.1:{closed_port}/x")),
        "{err:?}"
    );
    service.stop().await;
}

#[tokio::test]
async fn column_types_keep_their_meaning() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "{CAPTURE}
         CREATE TYPE mood AS ENUM ('ok', 'happy');
         CREATE TABLE t (id int PRIMARY KEY, i2 int2, i8 int8, n numeric, nn numeric, f8 float8, finf float8, b bool, v varchar(5), c char(3),
                         u uuid, j json, jb jsonb, d date, ts timestamp, tz timestamptz, tinf timestamptz, iv interval, by bytea,
                         ia int[], ta text[], ja jsonb[], m mood, nul text);
         INSERT INTO pgfire.sources (table_name, kind) VALUES ('t', 'record');
         INSERT INTO pgfire.functions (name, kind, target) VALUES ('a', 'sql', 'capture_a');
         INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('POST_RECORD_CREATE', 'a');"
    ))
    .await
    .unwrap();
    let service = start_service(&db).await;
    c.batch_execute(
        r#"INSERT INTO t VALUES (1, -32768, -9223372036854775808, 0.000000000000000000001, 'NaN', 0.1, '-Infinity', true, 'abc', 'x',
                  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"k": [1, 2]}', '{"b": 1, "a": {"c": null}}', '2024-02-29',
                  '2024-01-02 03:04:05.5', '2024-01-02 03:04:05+02', 'infinity', '1 day 2 hours', '\x00ff',
                  '{{1,2},{3,NULL}}', '{"a,b","q\"z"}', ARRAY['{"x":1}'::jsonb], 'happy', NULL)"#,
    )
    .await
    .unwrap();
    let got = wait_captured(&c, 1).await;
    // Compare as text: the envelope went through jsonb in the capture table, so compare structure.
    let d = &got[0].1["event_data"];
    let expect = json!({
        "record_id": 1, "table": "t", "id": 1, "i2": -32768, "i8": -9223372036854775808_i64, "f8": 0.1, "finf": "-Infinity", "b": true,
        "v": "abc", "c": "x  ", "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "j": {"k": [1, 2]}, "jb": {"a": {"c": null}, "b": 1},
        "d": "2024-02-29", "ts": "2024-01-02T03:04:05.5", "tz": "2024-01-02T01:04:05Z", "tinf": "infinity", "iv": "P1DT2H", "by": "\\x00ff",
        "ia": [[1, 2], [3, null]], "ta": ["a,b", "q\"z"], "ja": [{"x": 1}], "m": "happy", "nul": null, "nn": "NaN"
    });
    for (k, v) in expect.as_object().unwrap() {
        assert_eq!(&d[k], v, "column {k}");
    }
    // numeric exactness survives jsonb too.
    assert_eq!(
        texts(&c, "SELECT envelope->'event_data'->>'n' FROM captured").await,
        ["0.000000000000000000001"]
    );
    service.stop().await;
}

#[tokio::test]
async fn unchanged_toast_values_are_filled_from_the_old_row() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "{CAPTURE}
         CREATE TABLE docs (id int PRIMARY KEY, title text, body text);
         ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
         INSERT INTO pgfire.sources (table_name, kind) VALUES ('docs', 'record');
         INSERT INTO pgfire.functions (name, kind, target) VALUES ('a', 'sql', 'capture_a');
         INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('POST_RECORD_UPDATE', 'a');"
    ))
    .await
    .unwrap();
    let service = start_service(&db).await;
    c.batch_execute("INSERT INTO docs SELECT 1, 'v1', string_agg(md5(i::text), '') FROM generate_series(1, 400) i; UPDATE docs SET title = 'v2';")
        .await
        .unwrap();
    let got = wait_captured(&c, 1).await;
    let d = &got[0].1["event_data"];
    assert_eq!(d["title"], "v2");
    assert_eq!(d["body"].as_str().map(str::len), Some(400 * 32));
    assert_eq!(d["changes"], json!({"title": {"old": "v1", "new": "v2"}}));
    assert!(d.get("unchanged_toast").is_none());
    service.stop().await;
}

#[tokio::test]
async fn large_transactions_stream_and_only_committed_work_is_delivered() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "{CAPTURE}
         CREATE TABLE big (id int PRIMARY KEY, pad text);
         INSERT INTO pgfire.sources (table_name, kind) VALUES ('big', 'record');
         INSERT INTO pgfire.functions (name, kind, target) VALUES ('a', 'sql', 'capture_a');
         INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('POST_RECORD_CREATE', 'a');"
    ))
    .await
    .unwrap();
    let service = start_service(&db).await;
    // logical_decoding_work_mem is 64kB on the test cluster, so these stream while in progress.
    c.batch_execute(
        "BEGIN; INSERT INTO big SELECT i, repeat('x', 100) FROM generate_series(1, 3000) i; ROLLBACK;
         BEGIN;
         INSERT INTO big SELECT i, repeat('y', 100) FROM generate_series(1, 2000) i;
         SAVEPOINT s; INSERT INTO big SELECT i, repeat('z', 100) FROM generate_series(2001, 4000) i; ROLLBACK TO SAVEPOINT s;
         INSERT INTO big SELECT i, repeat('w', 100) FROM generate_series(4001, 5000) i;
         COMMIT;",
    )
    .await
    .unwrap();
    eventually(WAIT, "3000 events", || async {
        let n = texts(&c, "SELECT count(*)::text FROM captured").await;
        (n[0] == "3000").then_some(())
    })
    .await;
    let ids = texts(
        &c,
        "SELECT string_agg((envelope->'event_data'->>'id'), ',' ORDER BY envelope->>'id') FROM captured",
    )
    .await;
    let expected: Vec<String> = (1..=2000)
        .chain(4001..=5000)
        .map(|i| i.to_string())
        .collect();
    assert_eq!(ids[0], expected.join(","));
    let positions = texts(
        &c,
        "SELECT count(DISTINCT envelope->>'id')::text FROM captured",
    )
    .await;
    assert_eq!(positions, ["3000"]);
    let stats = texts(
        &c,
        &format!(
            "SELECT stream_txns::text FROM pg_stat_replication_slots WHERE slot_name = 'pgfire_{}'",
            db.name
        ),
    )
    .await;
    assert!(
        stats.first().map(|s| s != "0").unwrap_or(false),
        "the transaction was streamed: {stats:?}"
    );
    service.stop().await;
}
