//! PRE hooks in the extended query protocol: tokio-postgres (text and binary parameters and
//! results, named statements reused across batches, pipelined queries, transactions), psycopg 3
//! (pipeline mode, server-side prepared statements, binary) and node-postgres.

use std::process::Command;

use crate::pre::{db_error, setup};
use crate::support::{count, TestDb};

/// A rewrite before the seed's email check: email lower-cased, name `rewritten <user_id>`.
const TIDY: &str = r#"
CREATE FUNCTION tidy(e jsonb) RETURNS jsonb LANGUAGE sql AS $$
    SELECT jsonb_build_object('allow', true, 'data',
           jsonb_build_object('email', lower(e->'event_data'->>'email'), 'name', 'rewritten ' || (e->'event_data'->>'user_id'))) $$;
INSERT INTO pgfire.functions (name, kind, target) VALUES ('tidy', 'sql', 'tidy');
INSERT INTO pgfire.subscriptions (event_type, function_name, priority) VALUES ('PRE_USER_CREATE', 'tidy', -1);
"#;

#[tokio::test]
async fn tokio_postgres_parameters_statements_and_pipelines() {
    let db = TestDb::new();
    let proxy = setup(&db, TIDY).await;
    let c = proxy.client(&db).await;
    let err = c
        .execute("INSERT INTO users (email) VALUES ($1)", &[&"BAD"])
        .await
        .unwrap_err();
    let (code, message, detail) = db_error(&err);
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("P0001", "Invalid email address")
    );
    assert!(detail.contains("check_email"), "{detail}");
    // A named statement, prepared once, executed many times; results in binary.
    let ins = c
        .prepare("INSERT INTO users (email, name) VALUES ($1, $2) RETURNING id, email, name")
        .await
        .unwrap();
    let mut first = None;
    for i in 0..3 {
        let row = c
            .query_one(&ins, &[&format!("U{i}@X.Y"), &"orig"])
            .await
            .unwrap();
        let (id, email, name): (i32, String, String) = (row.get(0), row.get(1), row.get(2));
        assert_eq!(email, format!("u{i}@x.y"));
        assert_eq!(name, format!("rewritten {id}"));
        first.get_or_insert(id);
    }
    assert!(c.query_one(&ins, &[&"bad", &"x"]).await.is_err());
    // A binary integer parameter in an UPDATE (check_email is not on updates: allowed).
    let n = c
        .execute(
            "UPDATE users SET name = 'upd' WHERE id = $1",
            &[&first.unwrap()],
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    // Pipelined: each query its own batch, answered in order; the blocked one alone fails.
    let (a, b, d) = tokio::join!(
        c.execute("INSERT INTO users (email) VALUES ($1)", &[&"p1@x.y"]),
        c.execute("INSERT INTO users (email) VALUES ($1)", &[&"bad"]),
        c.query_one("SELECT count(*) FROM users", &[]),
    );
    assert!(a.is_ok() && b.is_err() && d.is_ok(), "{a:?} {b:?} {d:?}");
    // In a transaction: the block aborts it.
    let mut c = c;
    let tx = c.transaction().await.unwrap();
    tx.execute("INSERT INTO users (email) VALUES ($1)", &[&"tx@x.y"])
        .await
        .unwrap();
    assert!(tx
        .execute("INSERT INTO users (email) VALUES ($1)", &[&"bad"])
        .await
        .is_err());
    let err = tx.query_one("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(db_error(&err).0, "25P02");
    drop(tx);
    let direct = db.client().await;
    assert_eq!(count(&direct, "SELECT count(*) FROM users").await, 4);
    assert_eq!(
        count(&direct, "SELECT count(*) FROM users WHERE email = lower(email) AND name LIKE 'rewritten %' OR name = 'upd'").await,
        4
    );
}

/// Run a script of tests/clients with its driver (installed by scripts/test).
pub fn client_script(program: &str, script: &str, url: &str) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients");
    let bin = match program {
        "python" => root.join(".venv/bin/python"),
        _ => std::path::PathBuf::from("node"),
    };
    let installed = match program {
        "python" => bin.exists(),
        _ => root.join("node_modules/pg").exists(),
    };
    assert!(
        installed,
        "{program} driver not installed in tests/clients: run scripts/test"
    );
    let out = Command::new(bin)
        .arg(root.join(script))
        .arg(url)
        .current_dir(&root)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{script} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_with_pipeline_mode() {
    let db = TestDb::new();
    let proxy = setup(&db, TIDY).await;
    let url = proxy.url(&db);
    let out = tokio::task::spawn_blocking(move || client_script("python", "pre_psycopg.py", &url))
        .await
        .unwrap();
    assert!(
        out.contains("blocked in a pipeline") && out.ends_with("ok\n"),
        "{out}"
    );
    let direct = db.client().await;
    assert_eq!(
        count(&direct, "SELECT count(*) FROM users WHERE email = 'bad'").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres() {
    let db = TestDb::new();
    let proxy = setup(&db, TIDY).await;
    let url = proxy.url(&db);
    let out = tokio::task::spawn_blocking(move || client_script("node", "pre_node.js", &url))
        .await
        .unwrap();
    assert!(out.ends_with("ok\n"), "{out}");
    let direct = db.client().await;
    assert_eq!(
        count(&direct, "SELECT count(*) FROM users WHERE email = 'bad'").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_fetched_before_its_sync_is_refused_with_what_to_do() {
    let db = TestDb::new();
    let proxy = setup(&db, TIDY).await;
    let url = proxy.url(&db);
    let out = tokio::task::spawn_blocking(move || client_script("python", "pre_flush.py", &url))
        .await
        .unwrap();
    assert!(out.ends_with("ok\n"), "{out}");
    let direct = db.client().await;
    assert_eq!(
        count(
            &direct,
            "SELECT count(*) FROM users WHERE email = 'flush@x.y'"
        )
        .await,
        1
    );
}
