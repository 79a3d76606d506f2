//! Every form of write to a watched table is seen by PRE hooks, and every way around them the
//! tests could think of is refused or detected, each with its SQLSTATE; a webhook PRE function
//! on a real HTTP server.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use axum::Router;

use crate::pre::{db_error, rows, runs, setup};
use crate::support::{count, TestDb};

/// check_email also decides updates (the new email), and deletes of the row with id 1 are
/// blocked.
const MORE: &str = r#"
INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('PRE_USER_UPDATE', 'check_email');
CREATE FUNCTION keep_first(e jsonb) RETURNS jsonb LANGUAGE sql AS $$
    SELECT CASE WHEN (e->'event_data'->>'user_id')::int = 1 THEN '{"allow": false, "message": "the first user stays"}'::jsonb
                ELSE '{"allow": true}'::jsonb END $$;
INSERT INTO pgfire.functions (name, kind, target) VALUES ('keep_first', 'sql', 'keep_first');
INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('PRE_USER_DELETE', 'keep_first');
INSERT INTO users (email) VALUES ('first@x.y'), ('second@x.y');
CREATE FUNCTION add_user(e text) RETURNS void LANGUAGE sql AS $$ INSERT INTO users (email) VALUES (e) $$;
CREATE PROCEDURE add_user_p(e text) LANGUAGE sql AS $$ INSERT INTO users (email) VALUES (e) $$;
CREATE SCHEMA other;
CREATE VIEW users_v AS SELECT id, email FROM users;
CREATE TABLE signup (email text);
CREATE FUNCTION signup_user() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO users (email) VALUES (NEW.email); RETURN NEW; END $$;
CREATE TRIGGER signup_user AFTER INSERT ON signup FOR EACH ROW EXECUTE FUNCTION signup_user();
CREATE TABLE notes (body text);
CREATE FUNCTION sneaky() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('pgfire.' || 'proxied', 'off', true);
    PERFORM set_config('pgfire.' || 'pre_mode', '', true);
    INSERT INTO users (email) VALUES ('sneaky');
END $$;
"#;

#[tokio::test]
async fn every_form_of_write_is_seen() {
    let db = TestDb::new();
    let proxy = setup(&db, MORE).await;
    let c = proxy.client(&db).await;
    c.simple_query("PREPARE p(text) AS INSERT INTO users (email) VALUES ($1)")
        .await
        .unwrap();
    let forms = [
        "INSERT INTO users (email) VALUES ('ok@x.y'), ('bad')",
        "INSERT INTO users (id, email) VALUES (2, 'bad') ON CONFLICT (id) DO UPDATE SET email = EXCLUDED.email",
        "INSERT INTO users (email) SELECT 'bad'",
        "MERGE INTO users u USING (SELECT 'bad' AS e) s ON false WHEN NOT MATCHED THEN INSERT (email) VALUES (s.e)",
        "MERGE INTO users u USING (SELECT 2 AS id) s ON u.id = s.id WHEN MATCHED THEN UPDATE SET email = 'bad'",
        "WITH x AS (INSERT INTO users (email) VALUES ('bad') RETURNING id) SELECT * FROM x",
        "WITH x AS (UPDATE users SET email = 'bad' WHERE id = 2 RETURNING id) SELECT count(*) FROM x",
        "SELECT add_user('bad')",
        "CALL add_user_p('bad')",
        "DO $$ BEGIN INSERT INTO users (email) VALUES ('bad'); END $$",
        "EXECUTE p('bad')",
        "SELECT 1; INSERT INTO users (email) VALUES ('bad'); SELECT 2",
        "UPDATE users SET email = 'bad' WHERE id = 2",
        "INSERT INTO public.users (email) VALUES ('bad')",
        "INSERT INTO \"public\".\"users\" (email) VALUES ('bad')",
        "insert into PUBLIC.USERS (email) values ('bad')",
        "InSeRt InTo UsErS (email) VaLuEs ('bad')",
    ];
    for sql in forms {
        let err = c
            .simple_query(sql)
            .await
            .expect_err(&format!("{sql} got through"));
        assert_eq!(
            db_error(&err),
            (
                "P0001".into(),
                "Invalid email address".into(),
                db_error(&err).2
            ),
            "{sql}"
        );
    }
    // Through search_path.
    c.simple_query("SET search_path = other, public")
        .await
        .unwrap();
    let err = c
        .simple_query("INSERT INTO users (email) VALUES ('bad')")
        .await
        .unwrap_err();
    assert_eq!(db_error(&err).0, "P0001");
    c.simple_query("RESET search_path").await.unwrap();
    // Deletes: one PRE event per row; the first user stays.
    let err = c.simple_query("DELETE FROM users").await.unwrap_err();
    assert_eq!(db_error(&err).1, "the first user stays");
    c.simple_query("DELETE FROM users WHERE id = 2")
        .await
        .unwrap();
    let direct = db.client().await;
    assert_eq!(
        crate::support::texts(&direct, "SELECT email FROM users ORDER BY id").await,
        vec!["first@x.y".to_string()]
    );
    // The good writes of these forms go through.
    for sql in [
        "INSERT INTO users (email) VALUES ('a@x.y'), ('b@x.y')",
        "SELECT add_user('c@x.y')",
        "CALL add_user_p('d@x.y')",
        "DO $$ BEGIN INSERT INTO users (email) VALUES ('e@x.y'); END $$",
        "EXECUTE p('f@x.y')",
        "WITH x AS (INSERT INTO users (email) VALUES ('g@x.y') RETURNING id) SELECT * FROM x",
    ] {
        c.simple_query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    assert_eq!(count(&direct, "SELECT count(*) FROM users").await, 8);
}

#[tokio::test]
async fn every_way_around_is_refused_or_detected() {
    let db = TestDb::new();
    let proxy = setup(&db, MORE).await;
    let c = proxy.client(&db).await;
    // (statement, SQLSTATE): each is refused, or the write it attempts is detected.
    let attempts = [
        ("SET session_replication_role = replica", "42501"),
        ("SET LOCAL session_replication_role = replica", "42501"),
        ("SELECT set_config('session_replication_role', 'replica', false)", "42501"),
        ("SET pgfire.pre_mode = 'record:1000'", "42501"),
        ("SET pgfire.proxied = off", "42501"),
        ("RESET pgfire.proxied", "42501"),
        ("SELECT set_config('pgfire.proxied', 'off', false)", "42501"),
        ("ALTER TABLE users DISABLE TRIGGER pgfire_pre_before", "42501"),
        ("ALTER TABLE users DISABLE TRIGGER ALL", "42501"),
        ("ALTER TABLE users ENABLE REPLICA TRIGGER pgfire_pre_after", "42501"),
        ("DROP TRIGGER pgfire_pre_before ON users", "42501"),
        ("DROP FUNCTION pgfire.pre_row() CASCADE", "42501"),
        ("CREATE OR REPLACE FUNCTION pgfire.pre_row() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$", "42501"),
        ("DELETE FROM pgfire.subscriptions", "42501"),
        ("UPDATE pgfire.settings SET value = 'true' WHERE key = 'pre.allow_truncate'", "42501"),
        ("SET search_path = pgfire, public", "42501"),
        ("TRUNCATE users", "0A000"),
        ("TRUNCATE signup CASCADE", "0A000"),
        ("CREATE RULE r AS ON INSERT TO notes DO ALSO INSERT INTO users (email) VALUES ('bad')", "42501"),
        // Writes the proxy cannot see coming: with only `sql` PRE functions, pgfire's trigger
        // decides them where they happen (with a webhook in the chain it refuses them, 42501:
        // tests/it/pre_tamper.rs).
        ("INSERT INTO users_v (email) VALUES ('bad')", "P0001"),
        ("INSERT INTO signup VALUES ('bad')", "P0001"),
        // A function that switches the mechanism off before it writes.
        ("SELECT sneaky()", "P0001"),
    ];
    let direct = db.client().await;
    let before = count(&direct, "SELECT count(*) FROM users").await;
    let mut failures = Vec::new();
    for (sql, code) in attempts {
        match c.simple_query(sql).await {
            Ok(_) => failures.push(format!("{sql}: got through")),
            Err(e) => {
                let (got, message, _) = db_error(&e);
                if got != code {
                    failures.push(format!("{sql}: {got} {message}, wanted {code}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(count(&direct, "SELECT count(*) FROM users").await, before);
    // Messages above NOTICE would hide the rows: the write is refused.
    c.simple_query("SET client_min_messages = error")
        .await
        .unwrap();
    let err = c
        .simple_query("INSERT INTO users (email) VALUES ('ok@x.y')")
        .await
        .unwrap_err();
    assert_eq!(db_error(&err).0, "42501");
    c.simple_query("RESET client_min_messages").await.unwrap();
    // The extended protocol: held like the simple one.
    let err = c
        .execute("INSERT INTO users (email) VALUES ($1)", &[&"bad"])
        .await
        .unwrap_err();
    assert_eq!(db_error(&err).1, "Invalid email address");
    // The session is fine afterwards, and reads of the table stream through.
    assert_eq!(
        c.query_one("SELECT count(*) FROM users", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        before
    );
    // TRUNCATE can be allowed.
    proxy
        .change(
            &db,
            "UPDATE pgfire.settings SET value = 'true' WHERE key = 'pre.allow_truncate'",
        )
        .await;
    c.simple_query("TRUNCATE users").await.unwrap();
}

#[tokio::test]
async fn a_statement_over_the_row_limit_is_refused() {
    let db = TestDb::new();
    let proxy = setup(
        &db,
        "UPDATE pgfire.settings SET value = '5' WHERE key = 'limits.pre_rows_per_statement'",
    )
    .await;
    let c = proxy.client(&db).await;
    c.simple_query("INSERT INTO users (email) SELECT i || '@x.y' FROM generate_series(1, 5) i")
        .await
        .unwrap();
    let err = c
        .simple_query("INSERT INTO users (email) SELECT i || '@x.y' FROM generate_series(1, 6) i")
        .await
        .unwrap_err();
    let (code, message, _) = db_error(&err);
    assert_eq!(code, "54000");
    assert!(message.contains("more than 5 rows"), "{message}");
    let direct = db.client().await;
    assert_eq!(count(&direct, "SELECT count(*) FROM users").await, 5);
}

#[derive(Clone, Default)]
struct Hook {
    seen: Arc<Mutex<Vec<(HeaderMap, serde_json::Value)>>>,
}

async fn answer(State(h): State<Hook>, headers: HeaderMap, body: Bytes) -> String {
    let event: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let email = event["event_data"]["email"]
        .as_str()
        .unwrap_or("")
        .to_string();
    h.seen.lock().unwrap().push((headers, event));
    if email.starts_with("blocked") {
        r#"{"allow": false, "message": "the webhook says no"}"#.into()
    } else if email.starts_with("garbage") {
        "this is not json".into()
    } else {
        format!(r#"{{"allow": true, "data": {{"name": "hooked {email}"}}}}"#)
    }
}

async fn receiver() -> (SocketAddr, Hook) {
    let hook = Hook::default();
    let app = Router::new()
        .route("/pre", post(answer))
        .with_state(hook.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, hook)
}

#[tokio::test]
async fn a_webhook_pre_function_decides() {
    let db = TestDb::new();
    let (addr, hook) = receiver().await;
    let proxy = setup(
        &db,
        &format!(
            "UPDATE pgfire.subscriptions SET active = false;
             INSERT INTO pgfire.functions (name, kind, target) VALUES ('hook', 'webhook', 'http://{addr}/pre');
             INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('PRE_USER_CREATE', 'hook');"
        ),
    )
    .await;
    let c = proxy.client(&db).await;
    let back = rows(
        &c,
        "INSERT INTO users (email) VALUES ('w@x.y') RETURNING name",
    )
    .await;
    assert_eq!(back[0][0].as_deref(), Some("hooked w@x.y"));
    let err = c
        .simple_query("INSERT INTO users (email) VALUES ('blocked@x.y')")
        .await
        .unwrap_err();
    assert_eq!(db_error(&err).1, "the webhook says no");
    // Not JSON: on_error allows by default, the run is an error.
    c.simple_query("INSERT INTO users (email) VALUES ('garbage@x.y')")
        .await
        .unwrap();
    runs(&db, "hook", "modified", 1).await;
    runs(&db, "hook", "blocked", 1).await;
    runs(&db, "hook", "error", 1).await;
    let seen = hook.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3);
    let (headers, event) = &seen[0];
    assert_eq!(event["event_type"], "PRE_USER_CREATE");
    assert!(event["event_data"]["user_id"].is_number());
    let secret: String = db
        .client()
        .await
        .query_one(
            "SELECT secret FROM pgfire.functions WHERE name = 'hook'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let id = headers["webhook-id"].to_str().unwrap();
    let ts: i64 = headers["webhook-timestamp"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body = serde_json::to_vec(event).unwrap();
    assert_eq!(
        headers["webhook-signature"].to_str().unwrap(),
        pgfire::functions::webhook::sign(&secret, id, ts, &body).unwrap()
    );
    let direct = db.client().await;
    assert_eq!(count(&direct, "SELECT count(*) FROM users").await, 2);
}
