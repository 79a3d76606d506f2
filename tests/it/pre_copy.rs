//! COPY into a table with PRE hooks, held like any write: `COPY ... FROM STDIN` with
//! tokio-postgres (`copy_in`, the extended protocol), psql (`\copy`) and psycopg
//! (`cursor.copy()`), allowed, blocked, rewritten, failed by the client (CopyFail) or by the
//! data; server-side `COPY ... FROM 'file'` and `FROM PROGRAM`.

use std::process::Command;

use futures_util::SinkExt;

use crate::pre::{db_error, rows, setup, PreProxy};
use crate::support::{cluster, count, TestDb};

/// A rewrite before the seed's email check: email lower-cased, name `copied <user_id>`.
const TIDY: &str = r#"
CREATE FUNCTION tidy(e jsonb) RETURNS jsonb LANGUAGE sql AS $$
    SELECT jsonb_build_object('allow', true, 'data',
           jsonb_build_object('email', lower(e->'event_data'->>'email'), 'name', 'copied ' || (e->'event_data'->>'user_id'))) $$;
INSERT INTO pgfire.functions (name, kind, target) VALUES ('tidy', 'sql', 'tidy');
INSERT INTO pgfire.subscriptions (event_type, function_name, priority) VALUES ('PRE_USER_CREATE', 'tidy', -1);
"#;

async fn copy_in(c: &tokio_postgres::Client, data: &str) -> Result<u64, tokio_postgres::Error> {
    let sink = c.copy_in("COPY users (email) FROM STDIN").await?;
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from(data.to_string())).await?;
    sink.finish().await
}

/// Every stored row is rewritten: its name says the id it was stored with.
async fn all_rewritten(db: &TestDb) -> i64 {
    let direct = db.client().await;
    count(
        &direct,
        "SELECT count(*) FROM users WHERE name IS DISTINCT FROM 'copied ' || id OR email <> lower(email)",
    )
    .await
}

#[tokio::test]
async fn tokio_postgres_copy_in_is_held() {
    let db = TestDb::new();
    let proxy = setup(&db, TIDY).await;
    let c = proxy.client(&db).await;
    let direct = db.client().await;
    // Allowed and rewritten: the stored rows carry the rewrite, with the ids the functions saw.
    assert_eq!(copy_in(&c, "A@X.Y\nB@X.Y\nC@X.Y\n").await.unwrap(), 3);
    assert_eq!(count(&direct, "SELECT count(*) FROM users").await, 3);
    assert_eq!(all_rewritten(&db).await, 0);
    // One bad row blocks the whole COPY.
    let err = copy_in(&c, "d@x.y\nbad\ne@x.y\n").await.unwrap_err();
    let (code, message, detail) = db_error(&err);
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("P0001", "Invalid email address")
    );
    assert!(detail.contains("PRE_USER_CREATE"), "{detail}");
    assert_eq!(count(&direct, "SELECT count(*) FROM users").await, 3);
    // Data the server rejects: its own error, and the session goes on.
    let err = c
        .copy_in("COPY users (id, email) FROM STDIN")
        .await
        .unwrap();
    futures_util::pin_mut!(err);
    err.send(bytes::Bytes::from_static(b"x\ty@x.y\n"))
        .await
        .unwrap();
    let err = err.finish().await.unwrap_err();
    assert_eq!(db_error(&err).0, "22P02");
    // The client gives up midway (CopyFail): nothing stored, the session goes on.
    {
        let sink = c.copy_in("COPY users (email) FROM STDIN").await.unwrap();
        futures_util::pin_mut!(sink);
        sink.send(bytes::Bytes::from_static(b"f@x.y\n"))
            .await
            .unwrap();
    }
    assert_eq!(
        c.query_one("SELECT count(*) FROM users", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        3
    );
    // In a transaction: a blocked COPY aborts it, as any error would.
    c.batch_execute("BEGIN").await.unwrap();
    assert_eq!(copy_in(&c, "g@x.y\n").await.unwrap(), 1);
    let err = copy_in(&c, "bad\n").await.unwrap_err();
    assert_eq!(db_error(&err).0, "P0001");
    let err = c.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(db_error(&err).0, "25P02");
    c.batch_execute("ROLLBACK").await.unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    assert_eq!(copy_in(&c, "h@x.y\n").await.unwrap(), 1);
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(count(&direct, "SELECT count(*) FROM users").await, 4);
    assert_eq!(all_rewritten(&db).await, 0);
    // More rows than limits.pre_rows_per_statement: refused.
    proxy
        .change(
            &db,
            "UPDATE pgfire.settings SET value = '5' WHERE key = 'limits.pre_rows_per_statement'",
        )
        .await;
    let many: String = (0..8).map(|i| format!("m{i}@x.y\n")).collect();
    let err = copy_in(&c, &many).await.unwrap_err();
    assert_eq!(db_error(&err).0, "54000");
    assert_eq!(count(&direct, "SELECT count(*) FROM users").await, 4);
    // A bigger COPY in many messages, within the limit, allowed and rewritten.
    let sink = c.copy_in("COPY users (email) FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    for i in 0..5 {
        sink.send(bytes::Bytes::from(format!("Big{i}@X.Y\n")))
            .await
            .unwrap();
    }
    assert_eq!(sink.finish().await.unwrap(), 5);
    assert_eq!(count(&direct, "SELECT count(*) FROM users").await, 9);
    assert_eq!(all_rewritten(&db).await, 0);
    // The session is fine, and COPY out of the table streams.
    assert_eq!(
        rows(&c, "SELECT count(*) FROM users").await[0][0].as_deref(),
        Some("9")
    );
}

fn psql(proxy: &PreProxy, db: &TestDb, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(cluster().bin_dir.join("psql"))
        .args(["-X", "-v", "ON_ERROR_STOP=1", "-d", &proxy.url(db)])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_copy_and_server_side_copy_are_held() {
    let db = TestDb::new();
    let proxy = setup(&db, TIDY).await;
    let direct = db.client().await;
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.csv");
    std::fs::write(&good, "Ann@X.Y\nBob@X.Y\n").unwrap();
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "cy@x.y\nbad\n").unwrap();
    let copy = |f: &std::path::Path| format!("\\copy users (email) FROM '{}'", f.display());
    let (ok, out, err) = psql(&proxy, &db, &["-c", &copy(&good)]);
    assert!(ok && out.contains("COPY 2"), "{out}{err}");
    let (ok, _, err) = psql(&proxy, &db, &["-c", &copy(&bad)]);
    assert!(!ok && err.contains("Invalid email address"), "{err}");
    assert_eq!(count(&direct, "SELECT count(*) FROM users").await, 2);
    assert_eq!(all_rewritten(&db).await, 0);
    // Data the server rejects midway: its error, nothing stored, psql goes on to the next.
    let broken = dir.path().join("broken.tsv");
    std::fs::write(&broken, "90\tok@x.y\nx\ty@x.y\n").unwrap();
    let (ok, out, err) = psql(
        &proxy,
        &db,
        &[
            "-v",
            "ON_ERROR_STOP=0",
            "-c",
            &format!("\\copy users (id, email) FROM '{}'", broken.display()),
            "-c",
            "SELECT count(*) AS n FROM users",
        ],
    );
    assert!(ok && err.contains("invalid input syntax"), "{out}{err}");
    assert!(out.contains(" 2\n"), "{out}{err}");
    // Many rows in many CopyData messages, each decided and rewritten.
    let many = dir.path().join("many.csv");
    let lines: String = (0..900).map(|i| format!("Many{i}@X.Y\n")).collect();
    std::fs::write(&many, lines).unwrap();
    let (ok, out, err) = psql(&proxy, &db, &["-c", &copy(&many)]);
    assert!(ok && out.contains("COPY 900"), "{out}{err}");
    assert_eq!(all_rewritten(&db).await, 0);
    direct
        .batch_execute("DELETE FROM users WHERE email LIKE 'many%'")
        .await
        .unwrap();
    // psql's \copy from its own standard input, inside a transaction with more after it.
    let script = dir.path().join("script.sql");
    std::fs::write(
        &script,
        "BEGIN;\n\\copy users (email) FROM STDIN\nDan@X.Y\n\\.\nSELECT count(*) AS n FROM users;\nCOMMIT;\n",
    )
    .unwrap();
    let (ok, out, err) = psql(&proxy, &db, &["-f", &script.display().to_string()]);
    assert!(
        ok && out.contains("COPY 1") && out.contains(" 3\n"),
        "{out}{err}"
    );
    assert_eq!(all_rewritten(&db).await, 0);
    // Server-side COPY (superuser) from a file and from a program: held the same way.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    for f in [&good, &bad] {
        std::fs::set_permissions(f, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    }
    let c = proxy.client(&db).await;
    let n = c
        .execute(
            &format!("COPY users (email) FROM '{}'", good.display()),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(n, 2);
    let err = c
        .simple_query(&format!("COPY users (email) FROM '{}'", bad.display()))
        .await
        .unwrap_err();
    assert_eq!(db_error(&err).1, "Invalid email address");
    c.simple_query("COPY users (email) FROM PROGRAM 'printf \"Eve@X.Y\\nFay@X.Y\\n\"'")
        .await
        .unwrap();
    let err = c
        .simple_query("COPY users (email) FROM PROGRAM 'echo nope'")
        .await
        .unwrap_err();
    assert_eq!(db_error(&err).1, "Invalid email address");
    assert_eq!(count(&direct, "SELECT count(*) FROM users").await, 7);
    assert_eq!(all_rewritten(&db).await, 0);
    assert_eq!(
        count(
            &direct,
            "SELECT count(*) FROM users WHERE email IN ('bad', 'nope')"
        )
        .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_copy_is_held() {
    let db = TestDb::new();
    let proxy = setup(&db, TIDY).await;
    let url = proxy.url(&db);
    let out = tokio::task::spawn_blocking(move || {
        crate::pre_extended::client_script("python", "pre_copy.py", &url)
    })
    .await
    .unwrap();
    assert!(out.ends_with("ok\n"), "{out}");
    assert_eq!(all_rewritten(&db).await, 0);
    let direct = db.client().await;
    assert_eq!(
        count(
            &direct,
            "SELECT count(*) FROM users WHERE email LIKE '%bad%' OR email LIKE 'fail%'"
        )
        .await,
        0
    );
    assert_eq!(count(&direct, "SELECT count(*) FROM users").await, 4);
}
