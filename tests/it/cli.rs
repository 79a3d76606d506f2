//! The operator CLI, run as the built binary: subscribe / unsubscribe / functions / executions /
//! redeliver / events --json, tables by default and JSON with --json, and errors that name the
//! problem and exit non-zero. What it does is checked in the tables psql sees.

use std::process::Command;

use crate::support::{install_pgfire, texts, TestDb};

/// Run `pgfire args...` against `db`: (success, stdout, stderr).
fn pgfire(db: &TestDb, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pgfire"))
        .args(args)
        .env("DATABASE_URL", db.url())
        .env("PGFIRE_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(db: &TestDb, args: &[&str]) -> String {
    let (ok, out, err) = pgfire(db, args);
    assert!(ok, "pgfire {args:?} failed:\n{out}\n{err}");
    out
}

/// The error of a command that must fail.
fn fails(db: &TestDb, args: &[&str]) -> String {
    let (ok, out, err) = pgfire(db, args);
    assert!(!ok, "pgfire {args:?} should fail, printed:\n{out}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[tokio::test]
async fn subscribe_and_unsubscribe_agree_with_psql_and_name_every_problem() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    db.psql("INSERT INTO pgfire.functions (name, kind) VALUES ('audit', 'log'), ('mailer', 'log')");
    let c = db.client().await;

    let out = ok(
        &db,
        &["subscribe", "POST_USER_CREATE", "audit", "--priority", "5"],
    );
    assert!(
        out.contains("subscribed audit to POST_USER_CREATE (priority 5"),
        "{out}"
    );
    assert_eq!(
        texts(
            &c,
            "SELECT function_name || ':' || priority || ':' || active FROM pgfire.subscriptions"
        )
        .await,
        ["audit:5:true"]
    );
    // Again: the priority changes and it is active again (idempotent for scripts).
    db.psql("UPDATE pgfire.subscriptions SET active = false");
    let out = ok(
        &db,
        &[
            "subscribe",
            "POST_USER_CREATE",
            "audit",
            "--priority=-1",
            "--json",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["result"], "updated");
    assert_eq!(
        texts(
            &c,
            "SELECT priority || ':' || active FROM pgfire.subscriptions"
        )
        .await,
        ["-1:true"]
    );

    let err = fails(&db, &["subscribe", "POST_USER_CRATE", "audit"]);
    assert!(
        err.contains("unknown event type \"POST_USER_CRATE\""),
        "{err}"
    );
    let err = fails(&db, &["subscribe", "ORDER_SHIPPED", "audit"]);
    assert!(
        err.contains("unknown event type \"ORDER_SHIPPED\""),
        "a typo does not declare: {err}"
    );
    let out = ok(&db, &["subscribe", "ORDER_SHIPPED", "audit", "--declare"]);
    assert!(out.contains("subscribed audit to ORDER_SHIPPED"), "{out}");
    let err = fails(&db, &["subscribe", "POST_USER_CREATE", "nobody"]);
    assert!(err.contains("unknown function \"nobody\""), "{err}");
    let err = fails(
        &db,
        &[
            "subscribe",
            "POST_USER_CREATE",
            "audit",
            "--priority",
            "high",
        ],
    );
    assert!(err.contains("--priority"), "{err}");

    // The seed's limit of 10 active subscriptions per event.
    db.psql(
        "INSERT INTO pgfire.functions (name, kind) SELECT 'f' || i, 'log' FROM generate_series(1, 10) i;
         INSERT INTO pgfire.subscriptions (event_type, function_name) SELECT 'POST_LOGIN', 'f' || i FROM generate_series(1, 10) i",
    );
    let err = fails(&db, &["subscribe", "POST_LOGIN", "audit"]);
    assert!(
        err.contains("limit reached") && err.contains("already has 10 active subscriptions"),
        "{err}"
    );

    let out = ok(&db, &["unsubscribe", "POST_USER_CREATE", "audit"]);
    assert!(
        out.contains("unsubscribed audit from POST_USER_CREATE"),
        "{out}"
    );
    let err = fails(&db, &["unsubscribe", "POST_USER_CREATE", "audit"]);
    assert!(
        err.contains("\"audit\" is not subscribed to POST_USER_CREATE"),
        "{err}"
    );
    let err = fails(&db, &["unsubscribe", "POST_USER_CREATE", "nobody"]);
    assert!(err.contains("unknown function \"nobody\""), "{err}");
    let err = fails(&db, &["unsubscribe", "NOPE_EVENT", "audit"]);
    assert!(err.contains("unknown event type \"NOPE_EVENT\""), "{err}");

    // events --json agrees.
    let v: serde_json::Value = serde_json::from_str(&ok(&db, &["events", "--json"])).unwrap();
    let login = v
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "POST_LOGIN")
        .unwrap();
    assert_eq!(
        (login["subscribers"].as_i64(), login["group"].as_str()),
        (Some(10), Some("authentication"))
    );
    let shipped = v
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "ORDER_SHIPPED")
        .unwrap();
    assert_eq!(shipped["group"], "custom");
}

#[tokio::test]
async fn functions_and_executions_list_with_filters_and_json() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    db.psql(
        "INSERT INTO pgfire.functions (name, kind, target, timeout_ms) VALUES
             ('audit', 'log', NULL, 500), ('notify', 'webhook', 'http://127.0.0.1:9/hook', 10000);
         INSERT INTO pgfire.subscriptions (event_type, function_name, active) VALUES
             ('POST_USER_CREATE', 'notify', true), ('POST_USER_DELETE', 'notify', false);
         INSERT INTO pgfire.executions (event_id, event_type, function_name, attempt, status, started_at, duration_ms, error) VALUES
             ('e1', 'POST_USER_CREATE', 'notify', 1, 'ok', now() - interval '3 hours', 2.5, NULL),
             ('e2', 'POST_USER_CREATE', 'notify', 1, 'error', now() - interval '5 minutes', 10, E'POST answered 500:\\nboom'),
             ('e2', 'POST_USER_CREATE', 'notify', 2, 'dead', now() - interval '4 minutes', 11, 'gave up'),
             ('e3', 'POST_LOGIN', 'audit', 1, 'ok', now() - interval '1 minute', 0.1, NULL)",
    );

    let out = ok(&db, &["functions"]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("FUNCTION") && lines[0].contains("SUBSCRIPTIONS"),
        "{out}"
    );
    assert!(
        lines[1].starts_with("audit ") && lines[1].contains("500 ms"),
        "{out}"
    );
    assert!(
        lines[2].contains("webhook")
            && lines[2].contains("POST_USER_CREATE, POST_USER_DELETE (inactive)")
            && lines[2].ends_with("http://127.0.0.1:9/hook"),
        "{out}"
    );
    let v: serde_json::Value = serde_json::from_str(&ok(&db, &["functions", "--json"])).unwrap();
    assert_eq!(v[1]["name"], "notify");
    assert_eq!(v[1]["subscriptions"][1]["active"], false);

    let out = ok(&db, &["executions"]);
    assert_eq!(out.lines().count(), 5, "a header and four runs:\n{out}");
    assert!(
        out.contains("POST answered 500: boom"),
        "one line per run: {out}"
    );
    let ids = |args: &[&str]| -> Vec<String> {
        let mut a = vec!["executions", "--json"];
        a.extend_from_slice(args);
        let v: serde_json::Value = serde_json::from_str(&ok(&db, &a)).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| format!("{}/{}", r["event_id"].as_str().unwrap(), r["attempt"]))
            .collect()
    };
    assert_eq!(ids(&["--function", "notify"]), ["e2/2", "e2/1", "e1/1"]);
    assert_eq!(ids(&["--status", "failed"]), ["e2/2", "e2/1"]);
    assert_eq!(ids(&["--status", "ok", "--since", "1h"]), ["e3/1"]);
    assert_eq!(
        ids(&["--event", "POST_USER_CREATE", "--until", "1h"]),
        ["e1/1"]
    );
    assert_eq!(
        ids(&["--since", "2000-01-01 00:00Z", "--limit", "1"]),
        ["e3/1"]
    );
    let out = ok(&db, &["executions", "--function", "nobody"]);
    assert!(out.contains("no executions match"), "{out}");

    let err = fails(&db, &["executions", "--status", "broken"]);
    assert!(
        err.contains("unknown status \"broken\"") && err.contains("failed"),
        "{err}"
    );
    let err = fails(&db, &["executions", "--since", "yesterday-ish"]);
    assert!(err.contains("invalid time \"yesterday-ish\""), "{err}");
    let err = fails(&db, &["executions", "--limit", "0"]);
    assert!(err.contains("--limit must be at least 1"), "{err}");
}

#[tokio::test]
async fn commands_say_what_is_wrong_with_the_database() {
    let db = TestDb::new();
    // Not installed.
    let err = fails(&db, &["functions"]);
    assert!(err.contains("is pgfire installed?"), "{err}");
    // Unreachable.
    let out = Command::new(env!("CARGO_BIN_EXE_pgfire"))
        .args([
            "executions",
            "--database-url",
            "postgres://nobody@127.0.0.1:1/x",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("cannot reach the database"),
        "{err}"
    );
    // redeliver needs one of its selectors.
    install_pgfire(&db).await;
    let err = fails(&db, &["redeliver"]);
    assert!(
        err.contains("--execution") && err.contains("--function"),
        "{err}"
    );
}

// Multi-threaded: the admin endpoint answers while the test waits for the command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_asks_a_token_guarded_service_with_its_token() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    crate::support::init_logs();
    const TOKEN: &str = "status-token-0123456789abcdef";
    let mut cfg = pgfire::service::ServiceConfig::new(db.url());
    cfg.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.admin_token = Some(TOKEN.into());
    let service = pgfire::service::Service::start(cfg).await.unwrap();
    let admin = format!("http://{}", service.admin_addr.unwrap());
    crate::support::caught_up(&db).await;
    let status = |token: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgfire"));
        cmd.args(["status", "--admin-url", &admin])
            .env("DATABASE_URL", db.url())
            .env_remove("PGFIRE_ADMIN_TOKEN");
        if let Some(t) = token {
            cmd.env("PGFIRE_ADMIN_TOKEN", t);
        }
        String::from_utf8_lossy(&cmd.output().unwrap().stdout).into_owned()
    };
    let out = status(Some(TOKEN));
    let line = out
        .lines()
        .find(|l| l.starts_with("service: "))
        .unwrap_or_default()
        .to_string();
    assert!(!line.is_empty() && !line.contains("no answer"), "{out}");
    let out = status(None);
    assert!(
        out.contains("service: no answer"),
        "without the token: {out}"
    );
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeliver_sends_dead_runs_again() {
    use crate::support::hook::{Answer, Hook};
    let db = TestDb::new();
    install_pgfire(&db).await;
    let hook = Hook::start(|_, _| Answer::status(500)).await;
    db.psql(&format!(
        "INSERT INTO pgfire.functions (name, kind, target, max_attempts) VALUES ('hook', 'webhook', '{}', 1);
         INSERT INTO pgfire.event_types (name, description) VALUES ('ORDER_SHIPPED', 'shipped');
         INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('ORDER_SHIPPED', 'hook');",
        hook.url()
    ));
    let service = crate::support::start_service(&db).await;
    db.psql("SELECT pgfire.emit('ORDER_SHIPPED', '{\"n\": 1}'); SELECT pgfire.emit('ORDER_SHIPPED', '{\"n\": 2}')");
    let c = db.client().await;
    let dead = "SELECT count(*) FROM pgfire.parked WHERE status = 'dead'";
    crate::support::eventually(
        std::time::Duration::from_secs(30),
        "two dead runs",
        || async {
            (crate::support::count(&c, dead).await == 2
                && crate::support::count(
                    &c,
                    "SELECT count(*) FROM pgfire.executions WHERE status = 'dead'",
                )
                .await
                    == 2)
                .then_some(())
        },
    )
    .await;
    let id = texts(
        &c,
        "SELECT max(id)::text FROM pgfire.executions WHERE status = 'dead'",
    )
    .await;
    hook.script(|_, _| Answer::status(200));

    let out = ok(&db, &["redeliver", "--execution", &id[0]]);
    assert!(out.contains("1 dead run sent again"), "{out}");
    let out = ok(&db, &["redeliver", "--execution", &id[0], "--json"]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["redelivered"],
        0,
        "{out}"
    );
    let out = ok(&db, &["redeliver", "--function", "hook", "--since", "1h"]);
    assert!(out.contains("1 dead run sent again"), "{out}");
    crate::support::eventually(
        std::time::Duration::from_secs(30),
        "both delivered",
        || async {
            (crate::support::count(
                &c,
                "SELECT count(*) FROM pgfire.executions WHERE status = 'ok'",
            )
            .await
                == 2
                && crate::support::count(&c, "SELECT count(*) FROM pgfire.parked").await == 0)
                .then_some(())
        },
    )
    .await;
    let out = ok(&db, &["redeliver", "--function", "hook"]);
    assert!(out.contains("no dead runs matched"), "{out}");

    let err = fails(&db, &["redeliver", "--function", "nobody"]);
    assert!(err.contains("unknown function \"nobody\""), "{err}");
    let err = fails(&db, &["redeliver", "--execution", "999999"]);
    assert!(err.contains("no execution 999999"), "{err}");
    let err = fails(&db, &["redeliver", "--since", "soon-ish"]);
    assert!(err.contains("invalid time \"soon-ish\""), "{err}");
    let err = fails(
        &db,
        &["redeliver", "--execution", "1", "--function", "hook"],
    );
    assert!(err.contains("--execution names one run"), "{err}");
    service.stop().await;
}
