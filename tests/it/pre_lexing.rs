//! PRE hooks follow how the session lexes strings: with `standard_conforming_strings` off (set
//! by the client, at startup or later, even pipelined just before the statement), a write hidden
//! from a standard lexing is held and decided, and statements with harmless backslashes still
//! run as PostgreSQL runs them; with psql and tokio-postgres.

use std::process::Command;

use crate::pre::{db_error, rows, setup, PreProxy};
use crate::support::{cluster, count, TestDb};

/// Under `standard_conforming_strings = off` a SELECT of one string, then an INSERT; under
/// `on`, one string holding the INSERT.
fn hidden(email: &str) -> String {
    format!("SELECT '\\''; INSERT INTO users (email) VALUES ($${email}$$); --'")
}

#[tokio::test]
async fn a_write_hidden_by_backslash_escapes_is_held_and_decided() {
    let db = TestDb::new();
    let proxy = setup(&db, "").await;
    let c = proxy.client(&db).await;
    let direct = db.client().await;
    // Standard strings: the INSERT is inside a string; nothing is written.
    let got = rows(&c, &hidden("on@x.y")).await;
    assert_eq!(
        got[0][0].as_deref(),
        Some("\\'; INSERT INTO users (email) VALUES ($$on@x.y$$); --")
    );
    c.simple_query("SET standard_conforming_strings = off")
        .await
        .unwrap();
    let err = c.simple_query(&hidden("bad")).await.unwrap_err();
    assert_eq!(db_error(&err).1, "Invalid email address");
    c.simple_query(&hidden("off@x.y")).await.unwrap();
    // Harmless backslashes: a read streams (the server's escape), a write elsewhere runs.
    assert_eq!(
        rows(&c, "SELECT 'a\\tb', 'C:\\\\dir'").await[0],
        vec![Some("a\tb".to_string()), Some("C:\\dir".to_string())]
    );
    c.simple_query("CREATE TABLE notes (body text); INSERT INTO notes VALUES ('x\\'y')")
        .await
        .unwrap();
    assert_eq!(
        rows(&direct, "SELECT body FROM notes").await[0][0].as_deref(),
        Some("x'y")
    );
    // The extended protocol lexes the same way.
    let err = c
        .execute("INSERT INTO users (email) VALUES ('b\\'ad')", &[])
        .await
        .unwrap_err();
    assert_eq!(db_error(&err).1, "Invalid email address");
    let n: i64 = c
        .query_one("SELECT count(*) FROM users WHERE email <> 'a\\'b'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    // Set back, pipelined with the statement right after it: classified both ways, decided
    // as the server lexes it once the SET is answered.
    let again = hidden("again@x.y");
    let (set, read) = tokio::join!(
        c.simple_query("SET standard_conforming_strings = on"),
        c.simple_query(&again)
    );
    set.unwrap();
    read.unwrap();
    let bad = hidden("bad");
    let (set, write) = tokio::join!(
        c.simple_query("SET standard_conforming_strings = off"),
        c.simple_query(&bad)
    );
    set.unwrap();
    assert_eq!(db_error(&write.unwrap_err()).1, "Invalid email address");
    assert_eq!(
        crate::support::texts(&direct, "SELECT email FROM users ORDER BY id").await,
        vec!["off@x.y".to_string()]
    );
    // In a transaction block, SET LOCAL is undone by ROLLBACK, and the proxy follows.
    c.simple_query("BEGIN; SET LOCAL standard_conforming_strings = on; ROLLBACK")
        .await
        .unwrap();
    let err = c.simple_query(&hidden("bad")).await.unwrap_err();
    assert_eq!(db_error(&err).1, "Invalid email address");
    assert_eq!(count(&direct, "SELECT count(*) FROM users").await, 1);
}

fn psql(proxy: &PreProxy, db: &TestDb, sql: &str, options: &str) -> (bool, String, String) {
    let out = Command::new(cluster().bin_dir.join("psql"))
        .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", &proxy.url(db)])
        .args(["-c", sql])
        .env("PGOPTIONS", options)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_with_standard_strings_off_from_startup() {
    let db = TestDb::new();
    let proxy = setup(&db, "").await;
    let off = "-c standard_conforming_strings=off";
    let (ok, _, err) = psql(&proxy, &db, &hidden("bad"), off);
    assert!(!ok && err.contains("Invalid email address"), "{err}");
    let (ok, out, err) = psql(&proxy, &db, &hidden("psql@x.y"), off);
    assert!(ok, "{err}");
    assert!(out.trim().ends_with("INSERT 0 1"), "{out}");
    let (ok, out, err) = psql(&proxy, &db, "SELECT 'a\\\\b'", off);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "a\\b");
    // And on: the same text is one string.
    let (ok, out, err) = psql(&proxy, &db, &hidden("bad"), "");
    assert!(ok, "{err}");
    assert!(out.contains("INSERT INTO users"), "{out}");
    let direct = db.client().await;
    assert_eq!(
        crate::support::texts(&direct, "SELECT email FROM users").await,
        vec!["psql@x.y".to_string()]
    );
}

/// A client in another `client_encoding` (LATIN1, psql): its query strings are not UTF-8, and
/// PRE hooks still hold and decide its writes (the session goes on); the bytes reach the server
/// as they came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_in_latin1_is_held_and_decided() {
    let db = TestDb::new();
    let proxy = setup(&db, "").await;
    let run = |sql: &[u8]| {
        use std::os::unix::ffi::OsStrExt;
        let out = Command::new(cluster().bin_dir.join("psql"))
            .args(["-X", "-v", "ON_ERROR_STOP=1", "-d", &proxy.url(&db), "-c"])
            .arg(std::ffi::OsStr::from_bytes(sql))
            .env("PGCLIENTENCODING", "LATIN1")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // 'José' in Latin-1: é is one byte, 0xE9.
    let (ok, err) = run(b"INSERT INTO users (email, name) VALUES ('jose@x.y', 'Jos\xe9')");
    assert!(ok, "{err}");
    let (ok, err) = run(b"INSERT INTO users (email, name) VALUES ('nope', 'Jos\xe9')");
    assert!(!ok);
    assert!(err.contains("Invalid email address"), "{err}");
    // Two statements, one session: the session goes on after the block.
    let (ok, err) =
        run(b"SELECT 'caf\xe9'; INSERT INTO users (email, name) VALUES ('b@x.y', '\xe9t\xe9')");
    assert!(ok, "{err}");
    let direct = db.client().await;
    assert_eq!(
        rows(&direct, "SELECT name FROM users ORDER BY id").await,
        vec![
            vec![Some("José".to_string())],
            vec![Some("été".to_string())]
        ]
    );
    assert_eq!(count(&direct, "SELECT count(*) FROM users").await, 2);
}
