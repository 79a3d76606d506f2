//! pgfire's logs: human by default, one JSON object per line with `--log-format json`, and never
//! a row value or a secret, even at debug level and when functions fail.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::webhook::Receiver;
use crate::support::{count, eventually, install_pgfire, TestDb};

const SECRET: &str = "whsec_c2VjcmV0LWluLXRoZS1sb2dzLXRlc3QtMTIzNDU2Nzg=";
const ROW_VALUE: &str = "row-value-7f3a9c@example.com";

#[tokio::test]
async fn logs_are_json_on_request_and_never_carry_row_values_or_secrets() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    // A webhook that fails once, a sql function whose error detail names the row's value.
    let receiver = Receiver::with_statuses(vec![500]).await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE users (id int PRIMARY KEY, email text);
         CREATE TABLE seen (email text UNIQUE);
         INSERT INTO seen VALUES ('{ROW_VALUE}');
         CREATE FUNCTION remember(e jsonb) RETURNS void LANGUAGE sql AS $$
           INSERT INTO seen VALUES (e->'event_data'->>'email') $$;
         INSERT INTO pgfire.sources (table_name, kind) VALUES ('users', 'user');
         INSERT INTO pgfire.settings (key, value) VALUES ('delivery.max_attempts', '2')
           ON CONFLICT (key) DO UPDATE SET value = excluded.value;
         INSERT INTO pgfire.functions (name, kind, target, secret) VALUES
           ('hook', 'webhook', '{}', '{SECRET}'), ('remember', 'sql', 'remember', NULL);
         INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES
           ('POST_USER_CREATE', 'hook'), ('POST_USER_CREATE', 'remember');",
        receiver.url("/hook")
    ))
    .await
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_pgfire"))
        .args([
            "run",
            "--no-proxy",
            "--admin-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .env("DATABASE_URL", db.url())
        .env("PGFIRE_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.batch_execute(&format!("INSERT INTO users VALUES (1, '{ROW_VALUE}')"))
        .await
        .unwrap();
    eventually(Duration::from_secs(60), "the runs recorded", || async {
        let failed = count(
            &c,
            "SELECT count(*) FROM pgfire.executions WHERE function_name = 'remember' AND status = 'dead'",
        )
        .await;
        let hook = count(
            &c,
            "SELECT count(*) FROM pgfire.executions WHERE function_name = 'hook' AND status = 'ok'",
        )
        .await;
        (failed >= 1 && hook >= 1).then_some(())
    })
    .await;
    // The history keeps the database's words (the detail names the value): it is the database.
    let errors = crate::support::texts(
        &c,
        "SELECT error FROM pgfire.executions WHERE function_name = 'remember' AND error IS NOT NULL",
    )
    .await;
    assert!(
        errors.iter().any(|e| e.contains("duplicate key")),
        "{errors:?}"
    );
    terminate(child.id());
    let out = child.wait_with_output().unwrap();
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(logs.lines().count() > 5, "{logs}");
    for line in logs.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(v["level"].is_string() && v["message"].is_string(), "{line}");
    }
    assert!(
        logs.contains("function failed"),
        "failures are logged: {logs}"
    );
    assert!(
        !logs.contains(ROW_VALUE),
        "a row value in the logs:\n{logs}"
    );
    assert!(
        !logs.contains(&SECRET[6..20]),
        "the secret in the logs:\n{logs}"
    );
}

/// SIGTERM, so pgfire stops as it would in production and flushes its logs.
fn terminate(pid: u32) {
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
}
