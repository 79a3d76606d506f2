//! Query strings that mix transaction control with writes to a table with PRE hooks (as psql -c
//! and many ORMs send them), run statement by statement: the same answers as PostgreSQL's, the
//! writes held, a block stopping the rest with the session as PostgreSQL leaves it.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::pre::{db_error, rows, setup, PreProxy};
use crate::support::{cluster, count, install_pgfire, TestDb};

/// psql -c `sql` (its standard input `stdin`): success, stdout, stderr.
fn psql_c(url: &str, sql: &str, stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(cluster().bin_dir.join("psql"))
        .args(["-X", "-v", "ON_ERROR_STOP=0", "-d", url, "-c", sql])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Strings whose writes PRE hooks allow unchanged, with every kind of transaction control in
/// and out of the implicit block; psql shows the same direct and through the proxy.
const STRINGS: &[&str] = &[
    "BEGIN; INSERT INTO users (email) VALUES ('a@x.y') RETURNING id, email; COMMIT",
    "INSERT INTO users (email) VALUES ('b@x.y'); COMMIT; SELECT count(*) FROM users",
    "SELECT 1; BEGIN; INSERT INTO users (email) VALUES ('c@x.y'); COMMIT",
    "INSERT INTO users (email) VALUES ('d@x.y'); ROLLBACK; SELECT count(*) FROM users",
    "SELECT 1; SAVEPOINT s; INSERT INTO users (email) VALUES ('e@x.y')",
    "INSERT INTO users (email) VALUES ('f@x.y'); RELEASE s",
    "INSERT INTO users (email) VALUES ('g@x.y'); ROLLBACK TO s",
    "INSERT INTO users (email) VALUES ('h@x.y'); COMMIT AND CHAIN",
    "BEGIN; INSERT INTO users (email) VALUES ('i@x.y'); SELECT 1/0; COMMIT",
    "INSERT INTO users (email) VALUES ('j@x.y'); SELECT 1/0",
    "BEGIN; SAVEPOINT s; INSERT INTO users (email) VALUES ('k@x.y'); RELEASE s; ROLLBACK TO s; COMMIT",
    "BEGIN; SAVEPOINT s; INSERT INTO users (email) VALUES ('l@x.y'); ROLLBACK TO s; INSERT INTO users (email) VALUES ('m@x.y'); COMMIT",
    "SELECT 1; BEGIN ISOLATION LEVEL SERIALIZABLE; INSERT INTO users (email) VALUES ('n@x.y')",
    "BEGIN ISOLATION LEVEL SERIALIZABLE; INSERT INTO users (email) VALUES ('o@x.y'); END",
    "START TRANSACTION; INSERT INTO users (email) VALUES ('p@x.y'); ABORT; INSERT INTO users (email) VALUES ('q@x.y')",
    "COMMIT; INSERT INTO users (email) VALUES ('r@x.y'); BEGIN; COMMIT",
    "SELECT email FROM users ORDER BY id; COPY (SELECT id, email FROM users ORDER BY id) TO STDOUT; SELECT count(*) FROM users",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_answers_are_the_same_direct_and_through_the_proxy() {
    let direct_db = TestDb::new();
    install_pgfire(&direct_db).await;
    direct_db.psql(crate::pre::USERS);
    let proxied_db = TestDb::new();
    let proxy = setup(&proxied_db, "").await;
    let mut failures = Vec::new();
    for sql in STRINGS {
        let a = psql_c(&direct_db.url(), sql, "");
        let b = psql_c(&proxy.url(&proxied_db), sql, "");
        if a != b {
            failures.push(format!("{sql}\ndirect: {a:?}\nproxy:  {b:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    let d = direct_db.client().await;
    let p = proxied_db.client().await;
    let all = "SELECT string_agg(id || ' ' || email, ',' ORDER BY id) FROM users";
    assert_eq!(rows(&d, all).await, rows(&p, all).await);
    // Every stored row went through the PRE hooks (check_email's record of it commits with it).
    let stored = count(&p, "SELECT count(*) FROM users").await;
    assert!(stored >= 7, "{stored}");
    assert_eq!(count(&p, "SELECT count(*) FROM seen").await, stored);
    assert_eq!(count(&d, "SELECT count(*) FROM seen").await, 0);
}

/// A rewrite before the seed's email check: email lower-cased, name `split <user_id>`.
const TIDY: &str = r#"
CREATE FUNCTION tidy(e jsonb) RETURNS jsonb LANGUAGE sql AS $$
    SELECT jsonb_build_object('allow', true, 'data',
           jsonb_build_object('email', lower(e->'event_data'->>'email'), 'name', 'split ' || (e->'event_data'->>'user_id'))) $$;
INSERT INTO pgfire.functions (name, kind, target) VALUES ('tidy', 'sql', 'tidy');
INSERT INTO pgfire.subscriptions (event_type, function_name, priority) VALUES ('PRE_USER_CREATE', 'tidy', -1);
"#;

async fn users(db: &TestDb) -> i64 {
    count(&db.client().await, "SELECT count(*) FROM users").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_and_rewrites_inside_a_query_string() {
    let db = TestDb::new();
    let proxy: PreProxy = setup(&db, TIDY).await;
    let c = proxy.client(&db).await;
    // Rewritten, RETURNING shows it, committed by the string's own COMMIT.
    let got = rows(
        &c,
        "BEGIN; INSERT INTO users (email) VALUES ('Ann@X.Y') RETURNING email, name = 'split ' || id; COMMIT",
    )
    .await;
    assert_eq!(got, vec![vec![Some("ann@x.y".into()), Some("t".into())]]);
    assert_eq!(users(&db).await, 1);
    // Blocked in the string's transaction block: the rest skipped, the block aborted.
    let err = c
        .simple_query("BEGIN; INSERT INTO users (email) VALUES ('bad'); COMMIT")
        .await
        .unwrap_err();
    assert_eq!(db_error(&err).1, "Invalid email address");
    assert_eq!(
        db_error(&c.simple_query("SELECT 1").await.unwrap_err()).0,
        "25P02"
    );
    // A string that ends the failed block and writes again.
    c.simple_query("ROLLBACK; INSERT INTO users (email) VALUES ('Bob@X.Y')")
        .await
        .unwrap();
    assert_eq!(users(&db).await, 2);
    // Blocked after a COMMIT: what the COMMIT committed stays, the rest is rolled back.
    let err = c
        .simple_query("INSERT INTO users (email) VALUES ('cy@x.y'); COMMIT; INSERT INTO users (email) VALUES ('dee@x.y'); INSERT INTO users (email) VALUES ('bad')")
        .await
        .unwrap_err();
    assert_eq!(db_error(&err).0, "P0001");
    assert_eq!(users(&db).await, 3);
    assert_eq!(rows(&c, "SELECT 1").await, vec![vec![Some("1".into())]]);
    // Inside the client's own transaction.
    c.simple_query("BEGIN").await.unwrap();
    c.simple_query("SAVEPOINT a; INSERT INTO users (email) VALUES ('Eve@X.Y'); RELEASE a")
        .await
        .unwrap();
    let err = c
        .simple_query("SAVEPOINT b; INSERT INTO users (email) VALUES ('bad'); RELEASE b")
        .await
        .unwrap_err();
    assert_eq!(db_error(&err).0, "P0001");
    c.simple_query("ROLLBACK TO b; COMMIT").await.unwrap();
    assert_eq!(users(&db).await, 4);
    // Refusals inside a string are the server's errors, and stop it.
    let err = c
        .simple_query("BEGIN; TRUNCATE users; COMMIT")
        .await
        .unwrap_err();
    assert_eq!(db_error(&err).0, "0A000");
    c.simple_query("ROLLBACK").await.unwrap();
    // psql -c, and a COPY FROM STDIN in a string of several statements, its data from psql.
    let url = proxy.url(&db);
    let (ok, _, err) = psql_c(
        &url,
        "BEGIN; INSERT INTO users (email) VALUES ('bad'); COMMIT",
        "",
    );
    assert!(err.contains("ERROR:  Invalid email address"), "{ok} {err}");
    let (ok, out, err) = psql_c(
        &url,
        "BEGIN; COPY users (email) FROM STDIN; COMMIT",
        "Fay@X.Y\nGus@X.Y\n\\.\n",
    );
    assert!(ok && out.contains("COPY 2"), "{out}{err}");
    let (_, _, err) = psql_c(
        &url,
        "COPY users (email) FROM STDIN; SELECT 1",
        "ok@x.y\nbad\n\\.\n",
    );
    assert!(err.contains("Invalid email address"), "{err}");
    assert_eq!(users(&db).await, 6);
    let direct = db.client().await;
    assert_eq!(
        count(&direct, "SELECT count(*) FROM users WHERE name IS DISTINCT FROM 'split ' || id OR email <> lower(email)").await,
        0
    );
}
