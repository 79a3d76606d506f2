//! A procedure or DO block that commits by itself, called through the proxy in autocommit: it
//! runs as PostgreSQL runs it when it writes no table with PRE hooks; with only `sql` PRE
//! functions, pgfire's trigger decides each of its writes to one where it happens; with a
//! webhook in the chain, it fails precisely (`0A000`, naming the table) at such a write, which
//! the proxy could not decide before the procedure's own COMMIT. In a transaction block
//! PostgreSQL's own error (`2D000`) stands.

use std::process::Command;

use crate::pre::{db_error, setup};
use crate::support::{cluster, count, texts, TestDb};

const PROCEDURES: &str = r#"
CREATE TABLE audit (msg text);
CREATE PROCEDURE batches() LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO audit VALUES ('a');
    COMMIT;
    INSERT INTO audit VALUES ('b');
    ROLLBACK;
    INSERT INTO audit VALUES ('c');
END $$;
CREATE PROCEDURE two_users(e1 text, e2 text) LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO users (email) VALUES (e1);
    COMMIT;
    INSERT INTO users (email) VALUES (e2);
END $$;
CREATE PROCEDURE audit_then_user(e text) LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO audit VALUES ('before ' || e);
    COMMIT;
    INSERT INTO users (email) VALUES (e);
END $$;
CREATE PROCEDURE one_user(e text) LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO users (email) VALUES (e);
END $$;
"#;

#[tokio::test]
async fn procedures_that_commit_run_or_fail_precisely() {
    let db = TestDb::new();
    let proxy = setup(&db, PROCEDURES).await;
    let c = proxy.client(&db).await;
    let direct = db.client().await;
    // Commits, writes no watched table: as without the proxy, simple and extended protocol.
    c.simple_query("CALL batches()").await.unwrap();
    c.execute("CALL batches()", &[]).await.unwrap();
    c.simple_query("DO $$ BEGIN INSERT INTO audit VALUES ('d'); COMMIT; END $$")
        .await
        .unwrap();
    assert_eq!(
        texts(&direct, "SELECT msg FROM audit").await,
        ["a", "c", "a", "c", "d"]
    );
    // Every PRE function is `sql`: pgfire's trigger decides each write where it happens, so
    // a procedure that commits between writes to a watched table runs, each row decided.
    c.simple_query("CALL two_users('a@x.y', 'b@x.y')")
        .await
        .unwrap();
    c.execute("CALL two_users($1, $2)", &[&"c@x.y", &"d@x.y"])
        .await
        .unwrap();
    assert_eq!(count(&direct, "SELECT count(*) FROM users").await, 4);
    // A block fails the procedure at that write; what it committed before stays.
    let err = c
        .simple_query("CALL two_users('e@x.y', 'bad')")
        .await
        .unwrap_err();
    let (code, message, detail) = db_error(&err);
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("P0001", "Invalid email address")
    );
    assert!(
        detail.contains("PRE_USER_CREATE") && detail.contains("check_email"),
        "{detail}"
    );
    assert_eq!(count(&direct, "SELECT count(*) FROM users").await, 5);
    crate::pre::runs(&db, "check_email", "ok", 5).await;
    crate::pre::runs(&db, "check_email", "blocked", 1).await;
    // A write through a view, which the proxy cannot see coming, is decided the same way.
    c.simple_query("CREATE VIEW users_v AS SELECT id, email FROM users")
        .await
        .unwrap();
    c.simple_query("INSERT INTO users_v (email) VALUES ('v@x.y')")
        .await
        .unwrap();
    let err = c
        .simple_query("INSERT INTO users_v (email) VALUES ('nope')")
        .await
        .unwrap_err();
    assert_eq!(db_error(&err).1, "Invalid email address");
    c.simple_query("DELETE FROM users").await.unwrap();
    c.simple_query("DELETE FROM audit WHERE msg LIKE 'before%'")
        .await
        .unwrap();

    // With a webhook PRE function in the chain only the proxy can decide: inserts into a
    // watched table, commits, inserts again: refused at the first write.
    proxy
        .change(
            &db,
            "INSERT INTO pgfire.functions (name, kind, target) VALUES ('hook', 'webhook', 'http://127.0.0.1:9/');
             INSERT INTO pgfire.subscriptions (event_type, function_name, priority) VALUES ('PRE_USER_CREATE', 'hook', 5);",
        )
        .await;
    for sql in [
        "CALL two_users('a@x.y', 'b@x.y')",
        "DO $$ BEGIN INSERT INTO users (email) VALUES ('a@x.y'); COMMIT; END $$",
    ] {
        let err = c.simple_query(sql).await.unwrap_err();
        let (code, message, detail) = db_error(&err);
        assert_eq!(code, "0A000", "{sql}: {message}");
        assert!(message.contains("public.users"), "{message}");
        assert!(
            detail.contains("decide a write before it commits"),
            "{detail}"
        );
    }
    let err = c
        .execute("CALL two_users($1, $2)", &[&"a@x.y", &"b@x.y"])
        .await
        .unwrap_err();
    assert_eq!(db_error(&err).0, "0A000");
    assert_eq!(count(&direct, "SELECT count(*) FROM users").await, 0);
    // What it committed before the refused write stays, as after any error in a procedure.
    let err = c
        .simple_query("CALL audit_then_user('c@x.y')")
        .await
        .unwrap_err();
    assert_eq!(db_error(&err).0, "0A000");
    assert_eq!(
        count(
            &direct,
            "SELECT count(*) FROM audit WHERE msg = 'before c@x.y'"
        )
        .await,
        1
    );
    assert_eq!(count(&direct, "SELECT count(*) FROM users").await, 0);
    // The session goes on: a procedure that does not commit is held and decided as before
    // (the webhook does not answer: it allows, as `on_error` says by default).
    let err = c.simple_query("CALL one_user('bad')").await.unwrap_err();
    assert_eq!(db_error(&err).1, "Invalid email address");
    c.simple_query("CALL one_user('ok@x.y')").await.unwrap();
    assert_eq!(count(&direct, "SELECT count(*) FROM users").await, 1);
    // Nothing of the mode is left behind: an unseen write is refused as always.
    let err = c
        .simple_query("INSERT INTO users_v (email) VALUES ('v@x.y')")
        .await
        .unwrap_err();
    assert_eq!(db_error(&err).0, "42501");
    // In a transaction block, PostgreSQL's own answer.
    c.simple_query("BEGIN").await.unwrap();
    let err = c.simple_query("CALL batches()").await.unwrap_err();
    assert_eq!(db_error(&err).0, "2D000");
    c.simple_query("ROLLBACK").await.unwrap();
    assert_eq!(count(&direct, "SELECT count(*) FROM audit").await, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_calls_procedures_that_commit() {
    let db = TestDb::new();
    let proxy = setup(&db, PROCEDURES).await;
    let psql = |sql: &str| {
        let out = Command::new(cluster().bin_dir.join("psql"))
            .args([
                "-X",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                &proxy.url(&db),
                "-c",
                sql,
            ])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = psql("CALL batches()");
    assert!(ok, "{err}");
    let (ok, err) = psql("CALL two_users('a@x.y', 'b@x.y')");
    assert!(ok, "{err}");
    let (ok, err) = psql("CALL two_users('c@x.y', 'bad')");
    assert!(!ok);
    assert!(err.contains("Invalid email address"), "{err}");
    assert!(!err.contains("PL/pgSQL"), "{err}");
    let direct = db.client().await;
    assert_eq!(count(&direct, "SELECT count(*) FROM audit").await, 2);
    assert_eq!(count(&direct, "SELECT count(*) FROM users").await, 3);
}
