//! `pgfire install` / `uninstall`: idempotent, versioned, and clear about missing privileges.

use pgfire::install::{self, Migration, MIGRATIONS};

use crate::support::{install_pgfire, slot_name, texts, TestDb};

#[tokio::test]
async fn install_is_idempotent_and_uninstall_removes_everything() {
    let db = TestDb::new();
    let first = install_pgfire(&db).await;
    let all: Vec<i32> = MIGRATIONS.iter().map(|m| m.version).collect();
    assert_eq!(first.applied, all);
    assert!(first.created_publication && first.created_slot);
    let second = install_pgfire(&db).await;
    assert_eq!(second.applied, Vec::<i32>::new());
    assert!(!second.created_publication && !second.created_slot);

    let c = db.client().await;
    let tables = texts(
        &c,
        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'pgfire' ORDER BY 1",
    )
    .await;
    assert_eq!(
        tables,
        [
            "config_applied",
            "event_types",
            "executions",
            "functions",
            "migrations",
            "settings",
            "sources",
            "subscriptions"
        ]
    );
    let events = texts(&c, "SELECT name || ' ' || phase || ' ' || subscribers FROM pgfire.events WHERE name LIKE '%USER_CREATE' ORDER BY 1").await;
    assert_eq!(events, ["POST_USER_CREATE post 0", "PRE_USER_CREATE pre 0"]);
    let desc = texts(
        &c,
        "SELECT description FROM pgfire.events WHERE name = 'POST_RECORD_DELETE'",
    )
    .await;
    assert_eq!(desc, ["After a record is deleted"]);
    assert_eq!(
        texts(&c, "SELECT count(*)::text FROM pgfire.event_types").await,
        ["25"]
    );
    let slot = texts(
        &c,
        &format!(
            "SELECT plugin::text FROM pg_replication_slots WHERE slot_name = '{}'",
            slot_name(&db)
        ),
    )
    .await;
    assert_eq!(slot, ["pgoutput"]);

    install::uninstall(&c).await.expect("uninstall");
    assert!(texts(
        &c,
        "SELECT nspname::text FROM pg_namespace WHERE nspname = 'pgfire'"
    )
    .await
    .is_empty());
    assert!(texts(&c, "SELECT pubname::text FROM pg_publication")
        .await
        .is_empty());
    assert!(texts(
        &c,
        &format!(
            "SELECT slot_name::text FROM pg_replication_slots WHERE slot_name = '{}'",
            slot_name(&db)
        )
    )
    .await
    .is_empty());
    // pgfire's event triggers went with the schema.
    assert!(texts(
        &c,
        "SELECT evtname::text FROM pg_event_trigger WHERE evtname LIKE 'pgfire%'"
    )
    .await
    .is_empty());
    // And it installs again from nothing.
    assert_eq!(install_pgfire(&db).await.applied, all);
}

#[tokio::test]
async fn a_newer_version_upgrades_in_place_and_an_older_pgfire_refuses() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    let c = db.client().await;
    c.batch_execute("INSERT INTO pgfire.functions (name, kind) VALUES ('keep_me', 'log')")
        .await
        .unwrap();
    let latest = MIGRATIONS.last().unwrap().version;
    let mut newer: Vec<Migration> = MIGRATIONS.to_vec();
    newer.push(Migration {
        version: latest + 1,
        name: "test upgrade",
        sql: "ALTER TABLE pgfire.functions ADD COLUMN note text;",
    });
    let report = install::install(&c, Some(&slot_name(&db)), &newer)
        .await
        .unwrap();
    assert_eq!(report.applied, vec![latest + 1]);
    assert_eq!(report.version, latest + 1);
    assert_eq!(
        texts(
            &c,
            "SELECT name || coalesce(note, '-') FROM pgfire.functions"
        )
        .await,
        ["keep_me-"]
    );
    // This build does not know the newer version: it must not touch a newer schema.
    let err = install::install(&c, Some(&slot_name(&db)), MIGRATIONS)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("newer than this pgfire"), "{err}");
}

#[tokio::test]
async fn a_failing_migration_rolls_back_and_says_which() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    let c = db.client().await;
    let latest = MIGRATIONS.last().unwrap().version;
    let mut broken: Vec<Migration> = MIGRATIONS.to_vec();
    broken.push(Migration {
        version: latest + 1,
        name: "broken",
        sql: "CREATE TABLE pgfire.half (x int); SELECT no_such_function();",
    });
    let err = install::install(&c, Some(&slot_name(&db)), &broken)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("migration {} (broken) failed", latest + 1)),
        "{err}"
    );
    assert!(texts(
        &c,
        "SELECT tablename::text FROM pg_tables WHERE tablename = 'half'"
    )
    .await
    .is_empty());
    assert_eq!(
        texts(&c, "SELECT max(version)::text FROM pgfire.migrations").await,
        [latest.to_string()]
    );
}

#[tokio::test]
async fn missing_privileges_are_named_with_their_fix() {
    let db = TestDb::new();
    let role = format!("weak_{}", db.name);
    db.psql(&format!(
        "CREATE ROLE {role} LOGIN; REVOKE CREATE ON DATABASE {} FROM PUBLIC",
        db.name
    ));
    let url = format!(
        "postgres://{role}@127.0.0.1:{}/{}",
        db.cluster.port, db.name
    );
    let c = pgfire::db::connect(&url).await.unwrap();
    let err = install::install(&c, Some(&slot_name(&db)), MIGRATIONS)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("role {role} lacks privileges")),
        "{err}"
    );
    assert!(
        err.contains(&format!("ALTER ROLE {role} REPLICATION")),
        "{err}"
    );
    assert!(
        err.contains(&format!("GRANT CREATE ON DATABASE {} TO {role}", db.name)),
        "{err}"
    );
}

#[tokio::test]
async fn registering_a_source_needs_ownership_and_sets_replica_identity() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    let c = db.client().await;
    c.batch_execute("CREATE TABLE users (id int PRIMARY KEY, email text); INSERT INTO pgfire.sources VALUES ('users', 'user')").await.unwrap();
    assert_eq!(
        texts(
            &c,
            "SELECT relreplident::text FROM pg_class WHERE relname = 'users'"
        )
        .await,
        ["f"]
    );
    assert_eq!(
        texts(
            &c,
            "SELECT tablename::text FROM pg_publication_tables WHERE pubname = 'pgfire'"
        )
        .await,
        ["users"]
    );
    assert_eq!(
        texts(&c, "SELECT id_column FROM pgfire.sources").await,
        ["id"]
    );
    c.batch_execute("DELETE FROM pgfire.sources").await.unwrap();
    assert!(texts(
        &c,
        "SELECT tablename::text FROM pg_publication_tables WHERE pubname = 'pgfire'"
    )
    .await
    .is_empty());

    // pgfire's own tables would loop; not a table; a table someone else owns.
    let err = c
        .batch_execute("INSERT INTO pgfire.sources VALUES ('pgfire.executions', 'record')")
        .await
        .unwrap_err();
    assert!(
        err.as_db_error()
            .unwrap()
            .message()
            .contains("pgfire's own tables"),
        "{err:?}"
    );
    let err = c
        .batch_execute(
            "CREATE VIEW v AS SELECT 1; INSERT INTO pgfire.sources VALUES ('v', 'record')",
        )
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), "42809");
    let owner = format!("owner_{}", db.name);
    let app = format!("app_{}", db.name);
    db.psql(&format!(
        "CREATE ROLE {owner}; CREATE ROLE {app} LOGIN; CREATE TABLE theirs (id int PRIMARY KEY); ALTER TABLE theirs OWNER TO {owner};
         GRANT ALL ON SCHEMA pgfire TO {app}; GRANT ALL ON ALL TABLES IN SCHEMA pgfire TO {app}; ALTER PUBLICATION pgfire OWNER TO {app};"
    ));
    let url = format!("postgres://{app}@127.0.0.1:{}/{}", db.cluster.port, db.name);
    let appc = pgfire::db::connect(&url).await.unwrap();
    let err = appc
        .batch_execute("INSERT INTO pgfire.sources VALUES ('theirs', 'record')")
        .await
        .unwrap_err();
    let db_err = err.as_db_error().unwrap();
    assert_eq!(db_err.code().code(), "42501");
    assert!(
        db_err.message().contains(&format!("owned by {owner}")),
        "{}",
        db_err.message()
    );
    assert!(db_err.hint().unwrap().contains("REPLICA IDENTITY FULL"));
}

#[tokio::test]
async fn configuration_is_validated_by_the_database() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    let c = db.client().await;
    let code = |sql: &'static str| {
        let c = &c;
        async move {
            c.batch_execute(sql)
                .await
                .unwrap_err()
                .code()
                .unwrap()
                .code()
                .to_string()
        }
    };
    assert_eq!(
        code("INSERT INTO pgfire.functions (name, kind, target) VALUES ('f', 'lambda', 'x')").await,
        "22023"
    );
    assert_eq!(
        code(
            "INSERT INTO pgfire.functions (name, kind, target) VALUES ('f', 'webhook', 'ftp://x')"
        )
        .await,
        "22023"
    );
    assert_eq!(
        code("INSERT INTO pgfire.functions (name, kind) VALUES ('f', 'webhook')").await,
        "23502"
    );
    assert_eq!(
        code("INSERT INTO pgfire.functions (name, kind, target) VALUES ('f', 'sql', 'no_such_fn')")
            .await,
        "42883"
    );
    assert_eq!(
        code("INSERT INTO pgfire.functions (name, kind, timeout_ms) VALUES ('f', 'log', 60000)")
            .await,
        "22023"
    );
    assert_eq!(code("INSERT INTO pgfire.functions (name, kind, target, secret) VALUES ('f', 'webhook', 'http://h/', 'plain')").await, "22023");
    c.batch_execute("INSERT INTO pgfire.functions (name, kind, target) VALUES ('hook', 'webhook', 'http://127.0.0.1:9/x')").await.unwrap();
    let secret = texts(
        &c,
        "SELECT secret FROM pgfire.functions WHERE name = 'hook'",
    )
    .await;
    assert!(
        secret[0].starts_with("whsec_") && secret[0].len() > 40,
        "{secret:?}"
    );
    assert_eq!(code("INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('POST_USER_CREATED', 'hook')").await, "23503");
    assert_eq!(code("INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('POST_USER_CREATE', 'nobody')").await, "23503");
    // A custom event type is registered on first subscription.
    c.batch_execute("INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('ORDER_SHIPPED', 'hook')").await.unwrap();
    assert_eq!(
        texts(
            &c,
            "SELECT phase || ' ' || subscribers FROM pgfire.events WHERE name = 'ORDER_SHIPPED'"
        )
        .await,
        ["post 1"]
    );
    // At most 10 active subscriptions per event.
    for i in 0..10 {
        c.batch_execute(&format!(
            "INSERT INTO pgfire.functions (name, kind) VALUES ('l{i}', 'log'); INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('POST_USER_CREATE', 'l{i}')"
        ))
        .await
        .unwrap();
    }
    let err = c.batch_execute("INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('POST_USER_CREATE', 'hook')").await.unwrap_err();
    assert_eq!(err.code().unwrap().code(), "54000");
    c.batch_execute("INSERT INTO pgfire.subscriptions (event_type, function_name, active) VALUES ('POST_USER_CREATE', 'hook', false)").await.unwrap();
}

#[tokio::test]
async fn events_and_status_commands_show_the_catalog_and_the_slot() {
    let db = TestDb::new();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgfire"))
            .args(args)
            .env("DATABASE_URL", db.url())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, _, err) = run(&["events"]);
    assert!(!ok && err.contains("run pgfire install"), "{err}");
    let (ok, out, err) = run(&["install", "--slot", &slot_name(&db)]);
    assert!(ok, "{err}");
    let latest = pgfire::install::MIGRATIONS.last().unwrap().version;
    assert!(
        out.contains(&format!("pgfire installed: schema version {latest}")),
        "{out}"
    );
    let (ok, out, _) = run(&["install"]);
    assert!(
        ok && out.contains("up to date") && out.contains(&slot_name(&db)),
        "{out}"
    );
    db.psql("INSERT INTO pgfire.functions (name, kind) VALUES ('l', 'log'); INSERT INTO pgfire.subscriptions VALUES ('POST_USER_CREATE', 'l')");
    let (ok, out, _) = run(&["events"]);
    assert!(ok);
    let line = out
        .lines()
        .find(|l| l.starts_with("POST_USER_CREATE"))
        .unwrap();
    assert!(
        line.contains(" 1 ") && line.contains("After a new user is created"),
        "{line}"
    );
    let (ok, out, _) = run(&["status"]);
    assert!(ok);
    assert!(
        out.contains(&format!("slot {}: not in use", slot_name(&db))),
        "{out}"
    );
    assert!(out.contains("no failed runs in the last hour"), "{out}");
}
