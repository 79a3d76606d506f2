//! PRE hooks through the proxy with real clients (tokio-postgres in the simple protocol, psql):
//! the seed's examples (an invalid email blocked, data modified, functions chained by
//! priority), blocking in autocommit and in transactions, rewriting with RETURNING, sql, log and
//! webhook functions, timeouts and `on_error`, every PRE run in `pgfire.executions`.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use pgfire::proxy::pre::PreHooks;
use pgfire::proxy::{ProxyConfig, Upstream};
use tokio_postgres::{NoTls, SimpleQueryMessage};
use tokio_util::sync::CancellationToken;

use crate::support::{cluster, count, eventually, install_pgfire, TestDb};

/// A proxy with PRE hooks in front of a test database with pgfire installed.
pub struct PreProxy {
    pub addr: SocketAddr,
    pub hooks: Arc<PreHooks>,
    shutdown: CancellationToken,
}

impl Drop for PreProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl PreProxy {
    pub async fn start(db: &TestDb) -> PreProxy {
        crate::support::init_logs();
        let shutdown = CancellationToken::new();
        let hooks = PreHooks::start(db.url(), Default::default(), shutdown.clone())
            .await
            .expect("start PRE hooks");
        let mut config = ProxyConfig::new(Upstream::Tcp("127.0.0.1".into(), cluster().port));
        config.pre = Some(hooks.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(pgfire::proxy::serve(config, listener, shutdown.clone()));
        PreProxy {
            addr,
            hooks,
            shutdown,
        }
    }

    pub fn url(&self, db: &TestDb) -> String {
        format!("postgres://postgres@{}/{}", self.addr, db.name)
    }

    pub async fn client(&self, db: &TestDb) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url(db), NoTls)
            .await
            .expect("connect through the proxy");
        tokio::spawn(conn);
        client
    }

    /// Run `change` directly on the database, then wait until the proxy has loaded the
    /// configuration it made.
    pub async fn change(&self, db: &TestDb, change: &str) {
        let before = self.hooks.generation();
        db.psql(change);
        eventually(
            Duration::from_secs(10),
            "the proxy to load the new configuration",
            || async { (self.hooks.generation() > before).then_some(()) },
        )
        .await;
    }
}

/// The seed's users table, a `user` source, and the seed's email check as a `sql` PRE function.
pub const USERS: &str = r#"
CREATE TABLE users (
    id serial PRIMARY KEY,
    email text NOT NULL,
    name text,
    created_at timestamptz NOT NULL DEFAULT now(),
    email_lower text GENERATED ALWAYS AS (lower(email)) STORED
);
INSERT INTO pgfire.sources (table_name, kind) VALUES ('users', 'user');
CREATE TABLE seen (event jsonb);
CREATE FUNCTION check_email(e jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO seen VALUES (e);
    IF e->'event_data'->>'email' LIKE '%_@_%' THEN
        RETURN '{"allow": true}';
    END IF;
    RETURN '{"allow": false, "message": "Invalid email address"}';
END $$;
INSERT INTO pgfire.functions (name, kind, target) VALUES ('check_email', 'sql', 'check_email');
INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('PRE_USER_CREATE', 'check_email');
"#;

pub async fn setup(db: &TestDb, extra: &str) -> PreProxy {
    install_pgfire(db).await;
    db.psql(USERS);
    if !extra.is_empty() {
        db.psql(extra);
    }
    PreProxy::start(db).await
}

/// SQLSTATE, message and detail of a failed statement.
pub fn db_error(e: &tokio_postgres::Error) -> (String, String, String) {
    let d = e
        .as_db_error()
        .unwrap_or_else(|| panic!("not a database error: {e}"));
    (
        d.code().code().to_string(),
        d.message().to_string(),
        d.detail().unwrap_or_default().to_string(),
    )
}

/// The rows of a simple query, as text.
pub async fn rows(c: &tokio_postgres::Client, sql: &str) -> Vec<Vec<Option<String>>> {
    c.simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
            }
            _ => None,
        })
        .collect()
}

/// Wait until `pgfire.executions` has `n` PRE runs of `function` with `status`.
pub async fn runs(db: &TestDb, function: &str, status: &str, n: i64) {
    let c = db.client().await;
    let sql = format!(
        "SELECT count(*) FROM pgfire.executions WHERE function_name = '{function}' AND status = '{status}'"
    );
    eventually(
        Duration::from_secs(10),
        &format!("{n} {status} runs of {function}"),
        || async { (count(&c, &sql).await == n).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_invalid_email_is_blocked_in_autocommit() {
    let db = TestDb::new();
    let proxy = setup(&db, "").await;
    let c = proxy.client(&db).await;
    let err = c
        .simple_query("INSERT INTO users (email) VALUES ('not-an-email')")
        .await
        .unwrap_err();
    let (code, message, detail) = db_error(&err);
    assert_eq!(code, "P0001");
    assert_eq!(message, "Invalid email address");
    assert!(
        detail.contains("PRE_USER_CREATE") && detail.contains("check_email"),
        "{detail}"
    );
    // Nothing written, and the session goes on in autocommit.
    let direct = db.client().await;
    assert_eq!(count(&direct, "SELECT count(*) FROM users").await, 0);
    assert_eq!(count(&direct, "SELECT count(*) FROM seen").await, 0);
    let back = rows(
        &c,
        "INSERT INTO users (email) VALUES ('a@b.c') RETURNING id, email_lower",
    )
    .await;
    assert_eq!(back.len(), 1);
    assert_eq!(back[0][1].as_deref(), Some("a@b.c"));
    assert_eq!(count(&direct, "SELECT count(*) FROM users").await, 1);
    // The event is the real row: the serial id as user_id, the default and generated columns.
    let event: serde_json::Value = direct
        .query_one("SELECT event FROM seen", &[])
        .await
        .unwrap()
        .get(0);
    let id: i32 = back[0][0].as_deref().unwrap().parse().unwrap();
    assert_eq!(event["event_type"], "PRE_USER_CREATE");
    assert_eq!(event["event_data"]["user_id"], id);
    assert_eq!(event["event_data"]["email_lower"], "a@b.c");
    assert!(event["event_data"]["created_at"].is_string());
    assert_eq!(event["source"]["table"], "users");
    runs(&db, "check_email", "blocked", 1).await;
    runs(&db, "check_email", "ok", 1).await;
    // psql sees the same error.
    let out = Command::new(cluster().bin_dir.join("psql"))
        .args(["-X", "-d", &proxy.url(&db), "-c"])
        .arg("INSERT INTO users (email) VALUES ('x')")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("Invalid email address"), "{stderr}");
    assert!(!stderr.contains("pre_block"), "{stderr}");
}

#[tokio::test]
async fn a_block_inside_a_transaction_aborts_it() {
    let db = TestDb::new();
    let proxy = setup(&db, "").await;
    let c = proxy.client(&db).await;
    c.simple_query("BEGIN").await.unwrap();
    c.simple_query("INSERT INTO users (email) VALUES ('ok@x.y')")
        .await
        .unwrap();
    let err = c
        .simple_query("INSERT INTO users (email) VALUES ('bad')")
        .await
        .unwrap_err();
    assert_eq!(db_error(&err).0, "P0001");
    // As after any error in a transaction block: aborted until ROLLBACK.
    let err = c.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(db_error(&err).0, "25P02");
    c.simple_query("ROLLBACK").await.unwrap();
    assert_eq!(
        rows(&c, "SELECT count(*) FROM users").await[0][0].as_deref(),
        Some("0")
    );
    // A transaction whose writes are allowed commits them.
    c.simple_query("BEGIN").await.unwrap();
    c.simple_query("INSERT INTO users (email) VALUES ('one@x.y')")
        .await
        .unwrap();
    c.simple_query("SAVEPOINT mine").await.unwrap();
    c.simple_query("INSERT INTO users (email) VALUES ('two@x.y')")
        .await
        .unwrap();
    c.simple_query("ROLLBACK TO SAVEPOINT mine").await.unwrap();
    c.simple_query("COMMIT").await.unwrap();
    let direct = db.client().await;
    assert_eq!(
        crate::support::texts(&direct, "SELECT email FROM users ORDER BY id").await,
        vec!["one@x.y".to_string()]
    );
}

#[tokio::test]
async fn a_rewrite_is_stored_and_returned() {
    let db = TestDb::new();
    let proxy = setup(
        &db,
        r#"
        CREATE FUNCTION tidy(e jsonb) RETURNS jsonb LANGUAGE sql AS $$
            SELECT jsonb_build_object('allow', true, 'data',
                   jsonb_build_object('email', lower(e->'event_data'->>'email'), 'name', 'rewritten ' || (e->'event_data'->>'user_id')))
        $$;
        INSERT INTO pgfire.functions (name, kind, target) VALUES ('tidy', 'sql', 'tidy');
        INSERT INTO pgfire.subscriptions (event_type, function_name, priority) VALUES
            ('PRE_USER_CREATE', 'tidy', -1), ('PRE_USER_UPDATE', 'tidy', 0);
        "#,
    )
    .await;
    let c = proxy.client(&db).await;
    let back = rows(
        &c,
        "INSERT INTO users (email, name) VALUES ('Ann@X.Y', 'orig') RETURNING id, email, name, email_lower",
    )
    .await;
    assert_eq!(back[0][1].as_deref(), Some("ann@x.y"));
    assert_eq!(back[0][3].as_deref(), Some("ann@x.y"));
    // The id the function saw (it wrote it into name) is the id stored.
    assert_eq!(
        back[0][2],
        Some(format!("rewritten {}", back[0][0].clone().unwrap()))
    );
    let direct = db.client().await;
    let stored = direct
        .query_one("SELECT id, email, name FROM users", &[])
        .await
        .unwrap();
    assert_eq!(stored.get::<_, String>(1), "ann@x.y");
    assert_eq!(
        stored.get::<_, i32>(0).to_string(),
        back[0][0].clone().unwrap()
    );
    // An update is rewritten too, inside a transaction.
    c.simple_query("BEGIN").await.unwrap();
    let back = rows(
        &c,
        "UPDATE users SET email = 'BOB@X.Y' RETURNING email, email_lower",
    )
    .await;
    c.simple_query("COMMIT").await.unwrap();
    assert_eq!(back[0][0].as_deref(), Some("bob@x.y"));
    assert_eq!(back[0][1].as_deref(), Some("bob@x.y"));
    runs(&db, "tidy", "modified", 2).await;
}

#[tokio::test]
async fn functions_chain_by_priority_and_the_first_block_stops_the_chain() {
    let db = TestDb::new();
    let proxy = setup(
        &db,
        r#"
        CREATE FUNCTION add_a(e jsonb) RETURNS jsonb LANGUAGE sql AS $$
            SELECT jsonb_build_object('allow', true, 'data', jsonb_build_object('name', coalesce(e->'event_data'->>'name', '') || 'A')) $$;
        CREATE FUNCTION add_b(e jsonb) RETURNS jsonb LANGUAGE sql AS $$
            SELECT jsonb_build_object('allow', true, 'data', jsonb_build_object('name', coalesce(e->'event_data'->>'name', '') || 'B')) $$;
        CREATE FUNCTION no_zed(e jsonb) RETURNS jsonb LANGUAGE sql AS $$
            SELECT CASE WHEN e->'event_data'->>'email' LIKE 'zed%' THEN '{"allow": false, "message": "no zed"}'::jsonb
                        ELSE '{"allow": true}'::jsonb END $$;
        INSERT INTO pgfire.functions (name, kind, target) VALUES ('add_a', 'sql', 'add_a'), ('add_b', 'sql', 'add_b'), ('no_zed', 'sql', 'no_zed');
        INSERT INTO pgfire.subscriptions (event_type, function_name, priority) VALUES
            ('PRE_USER_CREATE', 'add_b', 20), ('PRE_USER_CREATE', 'add_a', 10), ('PRE_USER_CREATE', 'no_zed', 15);
        "#,
    )
    .await;
    let c = proxy.client(&db).await;
    let back = rows(
        &c,
        "INSERT INTO users (email, name) VALUES ('x@y.z', '>') RETURNING name",
    )
    .await;
    assert_eq!(back[0][0].as_deref(), Some(">AB"));
    let err = c
        .simple_query("INSERT INTO users (email) VALUES ('zed@y.z')")
        .await
        .unwrap_err();
    assert_eq!(db_error(&err).1, "no zed");
    // add_b (priority 20) never ran for the blocked row.
    runs(&db, "add_b", "modified", 1).await;
    runs(&db, "add_a", "modified", 2).await;
    runs(&db, "no_zed", "blocked", 1).await;
}

#[tokio::test]
async fn timeouts_errors_and_bad_answers_follow_on_error() {
    let db = TestDb::new();
    let proxy = setup(
        &db,
        r#"
        CREATE FUNCTION slow(e jsonb) RETURNS jsonb LANGUAGE sql AS $$ SELECT pg_sleep(5); SELECT '{"allow": false}'::jsonb $$;
        CREATE FUNCTION broken(e jsonb) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{"allowed": "yes"}'::jsonb $$;
        CREATE FUNCTION fails(e jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'boom'; END $$;
        INSERT INTO pgfire.functions (name, kind, target, timeout_ms) VALUES ('slow', 'sql', 'slow', 200);
        INSERT INTO pgfire.functions (name, kind, target) VALUES ('broken', 'sql', 'broken'), ('fails', 'sql', 'fails');
        INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES
            ('PRE_USER_CREATE', 'slow'), ('PRE_USER_CREATE', 'broken'), ('PRE_USER_CREATE', 'fails');
        "#,
    )
    .await;
    let c = proxy.client(&db).await;
    // on_error defaults to allow: the write goes through, each failure recorded.
    c.simple_query("SET statement_timeout = '30s'")
        .await
        .unwrap();
    c.simple_query("INSERT INTO users (email) VALUES ('a@b.c')")
        .await
        .unwrap();
    runs(&db, "slow", "timeout", 1).await;
    runs(&db, "broken", "error", 1).await;
    runs(&db, "fails", "error", 1).await;
    // The client's own statement_timeout is back.
    assert_eq!(
        rows(&c, "SHOW statement_timeout").await[0][0].as_deref(),
        Some("30s")
    );
    // A security check blocks on error.
    proxy
        .change(
            &db,
            "UPDATE pgfire.functions SET on_error = 'block' WHERE name = 'slow'",
        )
        .await;
    let err = c
        .simple_query("INSERT INTO users (email) VALUES ('b@b.c')")
        .await
        .unwrap_err();
    let (code, message, _) = db_error(&err);
    assert_eq!(code, "P0001");
    assert!(
        message.contains("slow") && message.contains("timed out"),
        "{message}"
    );
    let direct = db.client().await;
    assert_eq!(count(&direct, "SELECT count(*) FROM users").await, 1);
    let error: String = direct
        .query_one(
            "SELECT error FROM pgfire.executions WHERE function_name = 'broken' LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(error.contains("allow"), "{error}");
}

/// A `sql` function that hangs is cut at its timeout (the database times a call decided inside
/// the statement's run only once it returns: the proxy cancels a run that outlives the
/// functions' timeouts and takes the long way, where each call has its own statement_timeout),
/// in both protocols, in autocommit and in a transaction block. A statement slow by itself,
/// cancelled that way, runs again and is written once.
#[tokio::test]
async fn a_hung_sql_function_is_cut_at_its_timeout() {
    let db = TestDb::new();
    let proxy = setup(
        &db,
        r#"
        CREATE FUNCTION hangs(e jsonb) RETURNS jsonb LANGUAGE sql AS $$ SELECT pg_sleep(120); SELECT '{"allow": false}'::jsonb $$;
        INSERT INTO pgfire.functions (name, kind, target, timeout_ms, on_error) VALUES ('hangs', 'sql', 'hangs', 300, 'allow');
        INSERT INTO pgfire.subscriptions (event_type, function_name, priority) VALUES ('PRE_USER_CREATE', 'hangs', 20);
        -- The proxy waits for the longest sql timeout of the configuration (plus a margin).
        UPDATE pgfire.functions SET timeout_ms = 300 WHERE name = 'check_email';
        "#,
    )
    .await;
    let c = proxy.client(&db).await;
    let t0 = std::time::Instant::now();
    c.simple_query("INSERT INTO users (email) VALUES ('a@b.c')")
        .await
        .unwrap();
    c.execute("INSERT INTO users (email) VALUES ($1)", &[&"b@b.c"])
        .await
        .unwrap();
    c.simple_query("BEGIN").await.unwrap();
    c.simple_query("INSERT INTO users (email) VALUES ('c@b.c')")
        .await
        .unwrap();
    c.execute("INSERT INTO users (email) VALUES ($1)", &[&"d@b.c"])
        .await
        .unwrap();
    c.simple_query("COMMIT").await.unwrap();
    // Each would take two minutes if the call were timed only once it returned; each takes
    // about 0.55 s (the watchdog) and 0.3 s (the long way's call).
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "four writes took {:?}",
        t0.elapsed()
    );
    runs(&db, "hangs", "timeout", 4).await;
    let direct = db.client().await;
    assert_eq!(count(&direct, "SELECT count(*) FROM users").await, 4);

    // A security check blocks on its timeout, in both protocols; in a transaction block the
    // transaction is aborted until ROLLBACK, as PostgreSQL leaves it after an error.
    proxy
        .change(
            &db,
            "UPDATE pgfire.functions SET on_error = 'block' WHERE name = 'hangs'",
        )
        .await;
    let err = c
        .execute("INSERT INTO users (email) VALUES ($1)", &[&"e@b.c"])
        .await
        .unwrap_err();
    let (code, message, _) = db_error(&err);
    assert_eq!(code, "P0001");
    assert!(
        message.contains("hangs") && message.contains("timed out"),
        "{message}"
    );
    c.simple_query("BEGIN").await.unwrap();
    let err = c
        .simple_query("INSERT INTO users (email) VALUES ('f@b.c')")
        .await
        .unwrap_err();
    assert_eq!(db_error(&err).0, "P0001");
    let aborted = c.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(db_error(&aborted).0, "25P02");
    c.simple_query("ROLLBACK").await.unwrap();
    assert_eq!(count(&direct, "SELECT count(*) FROM users").await, 4);
    runs(&db, "hangs", "timeout", 6).await;

    // The client's own slow statement outlives the watchdog (300 ms + its margin): cancelled,
    // it runs again the long way, and its row is written and decided once.
    proxy
        .change(
            &db,
            "DELETE FROM pgfire.subscriptions WHERE function_name = 'hangs'",
        )
        .await;
    c.simple_query("INSERT INTO users (email) SELECT 'slow@b.c' FROM pg_sleep(1.5)")
        .await
        .unwrap();
    c.execute(
        "INSERT INTO users (email) SELECT $1 FROM pg_sleep(1.5)",
        &[&"slow2@b.c"],
    )
    .await
    .unwrap();
    for email in ["slow@b.c", "slow2@b.c"] {
        let written = format!("SELECT count(*) FROM users WHERE email = '{email}'");
        assert_eq!(count(&direct, &written).await, 1, "{email}");
        let decided =
            format!("SELECT count(*) FROM seen WHERE event->'event_data'->>'email' = '{email}'");
        assert_eq!(count(&direct, &decided).await, 1, "{email}");
    }
    // The session is as it was.
    assert_eq!(rows(&c, "SELECT 7").await[0][0].as_deref(), Some("7"));
}

#[tokio::test]
async fn hooks_changed_while_clients_are_connected() {
    let db = TestDb::new();
    let proxy = setup(&db, "").await;
    let c = proxy.client(&db).await;
    assert!(c
        .simple_query("INSERT INTO users (email) VALUES ('bad')")
        .await
        .is_err());
    // Deactivated: the same session writes the next statement unchecked.
    proxy
        .change(&db, "UPDATE pgfire.subscriptions SET active = false")
        .await;
    c.simple_query("INSERT INTO users (email) VALUES ('bad')")
        .await
        .unwrap();
    // Back on, as a shadow: runs and records, never blocks.
    proxy
        .change(
            &db,
            "UPDATE pgfire.subscriptions SET active = true, shadow = true",
        )
        .await;
    c.simple_query("INSERT INTO users (email) VALUES ('bad2')")
        .await
        .unwrap();
    runs(&db, "check_email", "blocked", 2).await;
    // Live again.
    proxy
        .change(&db, "UPDATE pgfire.subscriptions SET shadow = false")
        .await;
    assert!(c
        .simple_query("INSERT INTO users (email) VALUES ('bad3')")
        .await
        .is_err());
    // Removed with its function.
    proxy
        .change(
            &db,
            "DELETE FROM pgfire.functions WHERE name = 'check_email'",
        )
        .await;
    c.simple_query("INSERT INTO users (email) VALUES ('bad4')")
        .await
        .unwrap();
    let direct = db.client().await;
    assert_eq!(count(&direct, "SELECT count(*) FROM users").await, 3);
}

/// A proxy in front of a database whose fast runs start and end the migration-10 way (no
/// `pgfire.pre_fast_begin`) uses those calls: blocks, allows and records the same.
#[tokio::test]
async fn a_database_without_the_one_call_fast_run_is_decided_the_earlier_way() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    db.psql(USERS);
    db.psql("DROP FUNCTION pgfire.pre_fast_begin(text); DROP FUNCTION pgfire.pre_fast_end(text);");
    let proxy = PreProxy::start(&db).await;
    let c = proxy.client(&db).await;
    let err = c
        .simple_query("INSERT INTO users (email) VALUES ('bad')")
        .await
        .unwrap_err();
    assert_eq!(db_error(&err).1, "Invalid email address");
    c.simple_query("BEGIN; INSERT INTO users (email) VALUES ('a@b.c'); COMMIT")
        .await
        .unwrap();
    let direct = db.client().await;
    assert_eq!(count(&direct, "SELECT count(*) FROM users").await, 1);
    runs(&db, "check_email", "blocked", 1).await;
    runs(&db, "check_email", "ok", 1).await;
}

/// A PRE update event decided in the database carries `changes` and `old` as POST events do,
/// also for a column added after the table was registered.
#[tokio::test]
async fn update_events_carry_changes_and_old_also_after_ddl() {
    let db = TestDb::new();
    let proxy = setup(
        &db,
        "CREATE FUNCTION capture(e jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO seen VALUES (e); RETURN '{\"allow\": true}'; END $$;
         INSERT INTO pgfire.functions (name, kind, target) VALUES ('capture', 'sql', 'capture');
         INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('PRE_USER_UPDATE', 'capture');",
    )
    .await;
    let c = proxy.client(&db).await;
    c.simple_query("INSERT INTO users (email, name) VALUES ('a@b.c', 'old')")
        .await
        .unwrap();
    c.simple_query("UPDATE users SET name = 'new', email = 'A@b.c'")
        .await
        .unwrap();
    let direct = db.client().await;
    let event: serde_json::Value = direct
        .query_one(
            "SELECT event FROM seen WHERE event->>'event_type' = 'PRE_USER_UPDATE'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let data = &event["event_data"];
    assert_eq!(
        data["changes"],
        serde_json::json!({
            "name": {"old": "old", "new": "new"},
            "email": {"old": "a@b.c", "new": "A@b.c"}
        })
    );
    assert_eq!(data["old"]["name"], "old");
    assert_eq!(data["name"], "new");
    assert_eq!(data["user_id"], data["id"]);
    // A column added since: its change is there too.
    db.psql("ALTER TABLE users ADD COLUMN plan text");
    c.simple_query("UPDATE users SET plan = 'pro'")
        .await
        .unwrap();
    let event: serde_json::Value = direct
        .query_one(
            "SELECT event FROM seen WHERE event->'event_data'->'changes' ? 'plan'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        event["event_data"]["changes"],
        serde_json::json!({"plan": {"old": null, "new": "pro"}})
    );
}

/// `sql` functions are called by pgfire's generated dispatcher, planned once per session: a new
/// body, a dropped function and one created again are what the next statement of the same
/// session runs, with no configuration change in between.
#[tokio::test]
async fn a_sql_function_replaced_or_dropped_is_what_the_next_statement_runs() {
    let db = TestDb::new();
    let proxy = setup(
        &db,
        "CREATE FUNCTION gate(e jsonb) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{\"allow\": true}'::jsonb $$;
         INSERT INTO pgfire.functions (name, kind, target) VALUES ('gate', 'sql', 'gate');
         INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('PRE_USER_UPDATE', 'gate');",
    )
    .await;
    let c = proxy.client(&db).await;
    c.simple_query("INSERT INTO users (email) VALUES ('a@b.c')")
        .await
        .unwrap();
    for _ in 0..3 {
        c.simple_query("UPDATE users SET name = 'x'").await.unwrap();
    }
    db.psql(
        "CREATE OR REPLACE FUNCTION gate(e jsonb) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{\"allow\": false, \"message\": \"closed\"}'::jsonb $$",
    );
    let err = c
        .simple_query("UPDATE users SET name = 'y'")
        .await
        .expect_err("the new body blocks");
    assert_eq!(db_error(&err).0, "P0001");
    assert_eq!(db_error(&err).1, "closed");
    // Dropped: an error, which on_error (allow) lets through, recorded with the reason.
    db.psql("DROP FUNCTION gate(jsonb)");
    c.simple_query("UPDATE users SET name = 'z'").await.unwrap();
    runs(&db, "gate", "error", 1).await;
    let direct = db.client().await;
    let why: String = direct
        .query_one(
            "SELECT error FROM pgfire.executions WHERE function_name = 'gate' AND status = 'error'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(why.contains("gate"), "{why}");
    // Created again, under a new body: called again.
    db.psql(
        "CREATE FUNCTION gate(e jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$ BEGIN RETURN jsonb_build_object('allow', e->'event_data'->>'name' <> 'no'); END $$",
    );
    c.simple_query("UPDATE users SET name = 'ok'")
        .await
        .unwrap();
    let err = c
        .simple_query("UPDATE users SET name = 'no'")
        .await
        .expect_err("the re-created function blocks");
    assert_eq!(db_error(&err).0, "P0001");
    assert_eq!(
        count(&direct, "SELECT count(*) FROM users WHERE name = 'ok'").await,
        1
    );
    runs(&db, "gate", "ok", 4).await;
    runs(&db, "gate", "blocked", 2).await;
}

#[tokio::test]
async fn post_events_see_only_the_final_row() {
    let db = TestDb::new();
    let proxy = setup(
        &db,
        r#"
        CREATE FUNCTION shout(e jsonb) RETURNS jsonb LANGUAGE sql AS $$
            SELECT jsonb_build_object('allow', true, 'data', jsonb_build_object('name', upper(e->'event_data'->>'name'))) $$;
        INSERT INTO pgfire.functions (name, kind, target) VALUES ('shout', 'sql', 'shout');
        INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('PRE_USER_CREATE', 'shout');
        CREATE TABLE post_seen (event jsonb);
        CREATE FUNCTION keep_post(e jsonb) RETURNS jsonb LANGUAGE sql AS $$ INSERT INTO post_seen VALUES (e) RETURNING '{}'::jsonb $$;
        INSERT INTO pgfire.functions (name, kind, target) VALUES ('keep_post', 'sql', 'keep_post');
        INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('POST_USER_CREATE', 'keep_post');
        "#,
    )
    .await;
    let service = crate::support::start_service(&db).await;
    let c = proxy.client(&db).await;
    c.simple_query("INSERT INTO users (email, name) VALUES ('bad', 'blocked one')")
        .await
        .unwrap_err();
    c.simple_query("INSERT INTO users (email, name) VALUES ('a@b.c', 'quiet')")
        .await
        .unwrap();
    crate::support::caught_up(&db).await;
    let direct = db.client().await;
    let posts = crate::support::texts(
        &direct,
        "SELECT event->'event_data'->>'name' FROM post_seen",
    )
    .await;
    assert_eq!(posts, vec!["QUIET".to_string()]);
    service.stop().await;
}

/// Only `sql` PRE functions: the database decides in the statement's own run, which the proxy
/// sends with a simple Query spliced into one string of its own. Query strings of every shape
/// answer as PostgreSQL answers them; the run's id and history are there.
#[tokio::test]
async fn the_database_decides_query_strings_of_any_shape() {
    let db = TestDb::new();
    let proxy = setup(&db, "").await;
    let c = proxy.client(&db).await;
    let direct = db.client().await;
    // A trailing comment, a trailing semicolon, two statements, RETURNING.
    c.simple_query("INSERT INTO users (email) VALUES ('a@x.y') -- the end")
        .await
        .unwrap();
    c.simple_query("INSERT INTO users (email) VALUES ('b@x.y');")
        .await
        .unwrap();
    let got = rows(
        &c,
        "INSERT INTO users (email) VALUES ('c@x.y'); INSERT INTO users (email) VALUES ('d@x.y') RETURNING email_lower",
    )
    .await;
    assert_eq!(got, vec![vec![Some("d@x.y".to_string())]]);
    assert_eq!(count(&direct, "SELECT count(*) FROM users").await, 4);
    // A block in the second statement: the string's implicit transaction writes nothing.
    let err = c
        .simple_query(
            "INSERT INTO users (email) VALUES ('e@x.y'); INSERT INTO users (email) VALUES ('bad')",
        )
        .await
        .unwrap_err();
    assert_eq!(db_error(&err).1, "Invalid email address");
    assert_eq!(count(&direct, "SELECT count(*) FROM users").await, 4);
    // The session is as PostgreSQL leaves it, in autocommit and in a block.
    c.simple_query("SELECT 1").await.unwrap();
    c.simple_query("BEGIN").await.unwrap();
    c.simple_query("INSERT INTO users (email) VALUES ('f@x.y')")
        .await
        .unwrap();
    let err = c
        .simple_query("INSERT INTO users (email) VALUES ('nope')")
        .await
        .unwrap_err();
    assert_eq!(db_error(&err).0, "P0001");
    let err = c.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(db_error(&err).0, "25P02");
    c.simple_query("ROLLBACK").await.unwrap();
    assert_eq!(count(&direct, "SELECT count(*) FROM users").await, 4);
    // Every run recorded, with the event's id as the function saw it (and wrote it to `seen`).
    // (e@x.y and f@x.y were allowed before the blocks that undid them: their runs happened.)
    runs(&db, "check_email", "ok", 6).await;
    runs(&db, "check_email", "blocked", 2).await;
    let ids = crate::support::texts(
        &direct,
        "SELECT DISTINCT e.event_id FROM pgfire.executions e JOIN seen s ON s.event->>'id' = e.event_id",
    )
    .await;
    // (The function's own rows of the undone writes went with them.)
    assert_eq!(ids.len(), 4, "{ids:?}");
}
