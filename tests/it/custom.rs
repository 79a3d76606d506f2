//! Custom events: `pgfire.emit(type, data)` delivers a committed event with the envelope of every
//! event, in commit order with row changes; a rolled-back emit delivers nothing; an undeclared,
//! built-in or invalid name, or data that is not an object, is an error at emit time.

use serde_json::json;

use crate::capture::{exactly, refused, setup, types};
use crate::support::{start_service, texts, TestDb};

#[tokio::test]
async fn an_emitted_event_reaches_its_subscribers_once_committed() {
    let db = TestDb::new();
    // Subscribing to a new name declares it; so does a row of pgfire.event_types.
    let c = setup(&db, &["ORDER_SHIPPED", "POST_RECORD_CREATE"]).await;
    c.batch_execute(
        "INSERT INTO pgfire.event_types (name, description) VALUES ('invoice.paid', 'An invoice was paid');
         CREATE TABLE orders (id int PRIMARY KEY, total numeric);
         INSERT INTO pgfire.sources (table_name, kind) VALUES ('orders', 'record');",
    )
    .await
    .unwrap();
    crate::capture::subscribe(&c, &["invoice.paid"]).await;
    assert_eq!(
        texts(
            &c,
            "SELECT name || ' ' || phase || ' ' || custom || ' ' || description FROM pgfire.events WHERE custom ORDER BY name"
        )
        .await,
        [
            "ORDER_SHIPPED post true Custom event emitted with pgfire.emit",
            "invoice.paid post true An invoice was paid"
        ]
    );
    let service = start_service(&db).await;
    c.batch_execute(
        "BEGIN;
         INSERT INTO orders VALUES (1, 10);
         SELECT pgfire.emit('ORDER_SHIPPED', '{\"order\": 1, \"total\": 12345678901234567890.5, \"items\": [{\"sku\": \"a\"}], \"note\": null}');
         INSERT INTO orders VALUES (2, 20);
         COMMIT;
         BEGIN;
         SELECT pgfire.emit('ORDER_SHIPPED', '{\"order\": 3}');
         ROLLBACK;
         BEGIN;
         INSERT INTO orders VALUES (4, 40);
         SAVEPOINT s;
         SELECT pgfire.emit('ORDER_SHIPPED', '{\"order\": 4}');
         ROLLBACK TO s;
         SELECT pgfire.emit('invoice.paid', NULL);
         COMMIT;",
    )
    .await
    .unwrap();
    let events = exactly(&db, &c, 5).await;
    assert_eq!(
        types(&events),
        [
            "POST_RECORD_CREATE",
            "ORDER_SHIPPED",
            "POST_RECORD_CREATE",
            "POST_RECORD_CREATE",
            "invoice.paid"
        ]
    );
    let shipped = &events[1];
    let row = &events[0];
    assert_eq!(
        shipped["event_data"],
        serde_json::from_str::<serde_json::Value>(
            r#"{"order": 1, "total": 12345678901234567890.5, "items": [{"sku": "a"}], "note": null}"#
        )
        .unwrap()
    );
    // The same envelope as a row event of the same transaction: commit LSN, xid, commit time;
    // the id is the commit LSN and the message's position.
    assert_eq!(
        shipped["source"],
        json!({"database": db.name, "lsn": row["source"]["lsn"], "xid": row["source"]["xid"]})
    );
    assert_eq!(shipped["occurred_at"], row["occurred_at"]);
    let row_id = row["id"].as_str().unwrap();
    assert_eq!(
        shipped["id"].as_str().unwrap(),
        format!("{}-0000000001", &row_id[..16])
    );
    let mut keys: Vec<_> = shipped.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        ["event_data", "event_type", "id", "occurred_at", "source"]
    );
    // The text of a numeric is kept exactly.
    let text: Vec<String> = texts(
        &c,
        "SELECT envelope->'event_data'->>'total' FROM capture.events WHERE envelope->>'event_type' = 'ORDER_SHIPPED'",
    )
    .await;
    assert_eq!(text, ["12345678901234567890.5"]);
    assert_eq!(events[4]["event_data"], json!({}));
    service.stop().await;
}

#[tokio::test]
async fn bad_names_and_data_are_errors_at_emit_time() {
    let db = TestDb::new();
    let c = setup(&db, &["ORDER_SHIPPED"]).await;
    for (sql, code, message, hint) in [
        (
            "SELECT pgfire.emit('ORDER_LOST', '{}')",
            "42704",
            "event type \"ORDER_LOST\" is not declared",
            "declare it first: INSERT INTO pgfire.event_types (name, description) VALUES ('ORDER_LOST', 'what it means'); subscribing a function to it declares it too",
        ),
        (
            "SELECT pgfire.emit('POST_USER_CREATE', '{}')",
            "22023",
            "\"POST_USER_CREATE\" is a built-in event type: pgfire.emit sends custom events only",
            "pgfire emits built-in events itself from committed changes; declare a custom event type with a name of its own",
        ),
        (
            "SELECT pgfire.emit('order shipped', '{}')",
            "22023",
            "invalid event type \"order shipped\"",
            "use letters, digits, _ . : -, starting with a letter: SELECT pgfire.emit('ORDER_SHIPPED', '{\"id\": 1}')",
        ),
        (
            "SELECT pgfire.emit(NULL, '{}')",
            "22023",
            "invalid event type NULL",
            "use letters, digits, _ . : -, starting with a letter: SELECT pgfire.emit('ORDER_SHIPPED', '{\"id\": 1}')",
        ),
        (
            "SELECT pgfire.emit('ORDER_SHIPPED', '[1, 2]')",
            "22023",
            "the data of event \"ORDER_SHIPPED\" must be a JSON object, not array",
            "it becomes event_data: wrap the value, for example jsonb_build_object('value', ...)",
        ),
        (
            "INSERT INTO pgfire.event_types (name) VALUES ('auth.user_mine')",
            "22023",
            "event type \"auth.user_mine\" uses a prefix reserved for built-in events",
            "custom event types may not start with PRE_, POST_, auth. or api.; SELECT name FROM pgfire.events lists the built-in ones",
        ),
        (
            "INSERT INTO pgfire.event_types (name, phase) VALUES ('CHECKED', 'pre')",
            "22023",
            "custom event type \"CHECKED\" must have phase post, not pre",
            "custom events are emitted once committed, with pgfire.emit; there are no custom PRE events",
        ),
        (
            "INSERT INTO pgfire.event_types (name) VALUES ('1st')",
            "22023",
            "invalid custom event type \"1st\"",
            "use letters, digits, _ . : - (at most 128 characters), starting with a letter, for example ORDER_SHIPPED",
        ),
        (
            "UPDATE pgfire.event_types SET phase = 'pre' WHERE name = 'POST_LOGIN'",
            "42501",
            "event type \"POST_LOGIN\" is built in: only its description can change",
            "",
        ),
    ] {
        assert_eq!(
            refused(&c, sql).await,
            (code.to_string(), message.to_string(), hint.to_string()),
            "{sql}"
        );
    }
    // pgfire's own event (a message forged with pgfire's prefix) is no event.
    let service = start_service(&db).await;
    c.batch_execute(
        "SELECT pg_logical_emit_message(true, 'pgfire.emit', '{\"event_type\": \"POST_LOGIN\", \"data\": {}}');
         SELECT pg_logical_emit_message(true, 'pgfire.emit', 'garbage');
         SELECT pgfire.emit('ORDER_SHIPPED', '{\"after\": true}');",
    )
    .await
    .unwrap();
    let events = exactly(&db, &c, 1).await;
    assert_eq!(events[0]["event_data"], json!({"after": true}));
    service.stop().await;
}

/// `pgfire events` lists every event type with its description, custom ones after the built-in.
#[tokio::test]
async fn pgfire_events_lists_built_in_and_custom_events() {
    let db = TestDb::new();
    let c = setup(&db, &["ORDER_SHIPPED", "api.dataTable_created"]).await;
    c.batch_execute("INSERT INTO pgfire.event_types (name, description) VALUES ('invoice.paid', 'An invoice was paid')")
        .await
        .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgfire"))
        .arg("events")
        .env("DATABASE_URL", db.url())
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = String::from_utf8_lossy(&out.stdout);
    let line = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} not in {out}"))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(
        line("api.dataTable_created"),
        "api.dataTable_created post 1 A table was created in a datahub schema (setting datahub_schemas); carries its columns and constraints"
    );
    assert_eq!(
        line("auth.password_resetRequested"),
        "auth.password_resetRequested post 0 Emitted whenever the password reset was requested (a reset token set); carries token, link and expires_at (one hour)"
    );
    assert_eq!(
        line("ORDER_SHIPPED"),
        "ORDER_SHIPPED post 1 Custom event emitted with pgfire.emit"
    );
    assert_eq!(
        line("invoice.paid"),
        "invoice.paid post 0 An invoice was paid"
    );
    let names: Vec<&str> = out
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(names.len(), 27);
    assert_eq!(&names[25..], ["ORDER_SHIPPED", "invoice.paid"]);
}

/// kill -9 of pgfire in the middle of a transaction's events: after the restart, the custom,
/// datahub, row and auth events of that transaction come again with the same ids and envelopes.
#[tokio::test]
async fn system_events_are_redelivered_with_the_same_ids() {
    use std::process::{Command, Stdio};
    let db = TestDb::new();
    let c = setup(&db, &[]).await;
    c.batch_execute("SELECT pgfire.use_preset('generic')")
        .await
        .unwrap();
    crate::capture::subscribe(
        &c,
        &[
            "POST_USER_CREATE",
            "auth.user_signedUp",
            "auth.email_verificationRequested",
            "api.dataTable_created",
            "GATE",
        ],
    )
    .await;
    c.batch_execute(
        "CREATE FUNCTION capture.gate(e jsonb) RETURNS void LANGUAGE sql AS $$ SELECT pg_advisory_xact_lock_shared(4242) $$;
         INSERT INTO pgfire.functions (name, kind, target) VALUES ('gate', 'sql', 'capture.gate');
         INSERT INTO pgfire.subscriptions (event_type, function_name, priority) VALUES ('GATE', 'gate', 10);",
    )
    .await
    .unwrap();
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_pgfire"))
            .args(["run", "--no-proxy", "--admin-listen", "127.0.0.1:0"])
            .env("DATABASE_URL", db.url())
            .env("PGFIRE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn pgfire")
    };
    // The gate holds the last event of the transaction until the lock is released.
    let locker = db.client().await;
    locker
        .batch_execute("SELECT pg_advisory_lock(4242)")
        .await
        .unwrap();
    c.batch_execute(
        "BEGIN;
         CREATE TABLE widgets (id int);
         INSERT INTO users (email, verification_token) VALUES ('ada@example.com', 'tok');
         SELECT pgfire.emit('GATE', '{\"n\": 1}');
         COMMIT;",
    )
    .await
    .unwrap();
    let mut first = spawn();
    crate::support::wait_running(&db, "%capture.gate(%").await;
    crate::support::eventually(
        std::time::Duration::from_secs(30),
        "the transaction's five events",
        || async { (crate::capture::captured(&c).await.len() == 5).then_some(()) },
    )
    .await;
    first.kill().expect("kill -9");
    first.wait().unwrap();
    locker
        .batch_execute("SELECT pg_advisory_unlock(4242)")
        .await
        .unwrap();
    let mut second = spawn();
    crate::support::eventually(
        std::time::Duration::from_secs(30),
        "the transaction's events again",
        || async { (crate::capture::captured(&c).await.len() >= 10).then_some(()) },
    )
    .await;
    crate::support::caught_up(&db).await;
    second.kill().ok();
    second.wait().ok();
    // Each id twice, with the same envelope both times; five distinct ids.
    let per_id = texts(
        &c,
        "SELECT min(envelope->>'event_type') || ' ' || count(*) || ' ' || count(DISTINCT envelope)
           FROM capture.events GROUP BY envelope->>'id' ORDER BY envelope->>'id'",
    )
    .await;
    assert_eq!(
        per_id,
        [
            "api.dataTable_created 2 1",
            "POST_USER_CREATE 2 1",
            "auth.user_signedUp 2 1",
            "auth.email_verificationRequested 2 1",
            "GATE 2 1"
        ]
    );
}
