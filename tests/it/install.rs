//! `pgfire install` / `uninstall`: idempotent, versioned, and clear about missing privileges.

use pgfire::install::{self, Migration, MIGRATIONS};

use crate::support::{install_pgfire, slot_name, texts, TestDb};

/// Every migration version this build knows, oldest first.
fn all_versions() -> Vec<i32> {
    MIGRATIONS.iter().map(|m| m.version).collect()
}

/// The version after the newest this build knows.
fn next_version() -> i32 {
    MIGRATIONS.last().unwrap().version + 1
}

#[tokio::test]
async fn install_is_idempotent_and_uninstall_removes_everything() {
    let db = TestDb::new();
    let first = install_pgfire(&db).await;
    assert_eq!(first.applied, all_versions());
    assert!(first.tracks_dropped_sources);
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
            "datahub_tables",
            "event_types",
            "executions",
            "functions",
            "migrations",
            "parked",
            "pre_chains",
            "pre_key",
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
    // And it installs again from nothing.
    assert!(
        texts(&c, "SELECT evtname::text FROM pg_event_trigger")
            .await
            .is_empty(),
        "the event trigger goes with schema pgfire"
    );
    assert_eq!(install_pgfire(&db).await.applied, all_versions());
}

#[tokio::test]
async fn a_newer_version_upgrades_in_place_and_an_older_pgfire_refuses() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    let c = db.client().await;
    c.batch_execute("INSERT INTO pgfire.functions (name, kind) VALUES ('keep_me', 'log')")
        .await
        .unwrap();
    let mut newer: Vec<Migration> = MIGRATIONS.to_vec();
    newer.push(Migration {
        version: next_version(),
        name: "test upgrade",
        sql: "ALTER TABLE pgfire.functions ADD COLUMN note text;",
    });
    let report = install::install(&c, Some(&slot_name(&db)), &newer)
        .await
        .unwrap();
    assert_eq!(report.applied, vec![next_version()]);
    assert_eq!(report.version, next_version());
    assert_eq!(
        texts(
            &c,
            "SELECT name || coalesce(note, '-') FROM pgfire.functions"
        )
        .await,
        ["keep_me-"]
    );
    // This build does not know that version: it must not touch a newer schema.
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
    let mut broken: Vec<Migration> = MIGRATIONS.to_vec();
    broken.push(Migration {
        version: next_version(),
        name: "broken",
        sql: "CREATE TABLE pgfire.half (x int); SELECT no_such_function();",
    });
    let err = install::install(&c, Some(&slot_name(&db)), &broken)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("migration {} (broken) failed", next_version())),
        "{err}"
    );
    assert!(texts(
        &c,
        "SELECT tablename::text FROM pg_tables WHERE tablename = 'half'"
    )
    .await
    .is_empty());
    let max: i32 = c
        .query_one("SELECT max(version) FROM pgfire.migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(max, next_version() - 1);
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
    assert!(
        out.contains(&format!(
            "pgfire installed: schema version {}",
            next_version() - 1
        )),
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
    assert!(!out.contains("REPLICA IDENTITY"), "{out}");
    // A source that lost its replica identity is pointed out, with the fix.
    db.psql(
        "CREATE TABLE people (id int PRIMARY KEY);
         INSERT INTO pgfire.sources (table_name, kind) VALUES ('people', 'user');
         ALTER TABLE people REPLICA IDENTITY DEFAULT;",
    );
    let (ok, out, _) = run(&["status"]);
    assert!(ok);
    assert!(
        out.contains("warning: source people lacks REPLICA IDENTITY FULL")
            && out.contains("ALTER TABLE people REPLICA IDENTITY FULL"),
        "{out}"
    );
}

/// The database error of `sql`, which must fail.
async fn refused(c: &tokio_postgres::Client, sql: &str) -> tokio_postgres::error::DbError {
    c.batch_execute(sql)
        .await
        .err()
        .unwrap_or_else(|| panic!("accepted: {sql}"))
        .as_db_error()
        .unwrap_or_else(|| panic!("not a database error: {sql}"))
        .clone()
}

#[tokio::test]
async fn settings_are_checked_when_written() {
    use tokio_postgres::error::SqlState;
    let db = TestDb::new();
    install_pgfire(&db).await;
    let c = db.client().await;
    for (key, bad, range) in [
        (
            "limits.payload_bytes",
            "0",
            "from 1024 to 104857600 (bytes)",
        ),
        (
            "limits.payload_bytes",
            "abc",
            "from 1024 to 104857600 (bytes)",
        ),
        ("limits.timeout_ms", "-5", "from 1 to 300000 (ms)"),
        ("limits.timeout_ms", "1.5", "from 1 to 300000 (ms)"),
        ("limits.subscriptions_per_event", "0", "from 1 to 1000"),
        ("delivery.max_attempts", "101", "from 1 to 100"),
        ("delivery.retry_base_ms", "", "from 1 to 3600000"),
        (
            "delivery.retry_max_ms",
            "99999999999999999999",
            "from 1 to 3600000",
        ),
        ("auth.reset_ttl_seconds", "59", "from 60 to 31536000"),
        (
            "auth.verification_ttl_seconds",
            "1e3",
            "from 60 to 31536000",
        ),
    ] {
        let e = refused(
            &c,
            &format!("UPDATE pgfire.settings SET value = '{bad}' WHERE key = '{key}'"),
        )
        .await;
        assert_eq!(e.code(), &SqlState::INVALID_PARAMETER_VALUE, "{key}={bad}");
        assert!(
            e.message()
                .starts_with(&format!("setting {key} must be an integer {range}")),
            "{key}={bad}: {}",
            e.message()
        );
        assert!(e.hint().unwrap().contains("the default is"), "{key}");
    }
    for (key, bad) in [
        ("auth.verification_link", "http://x/verify"),
        ("auth.reset_link", "http://x/reset?t={tok}"),
        ("datahub_schemas", "public,,app"),
        ("datahub_schemas", "public; drop table x"),
    ] {
        let e = refused(
            &c,
            &format!("UPDATE pgfire.settings SET value = '{bad}' WHERE key = '{key}'"),
        )
        .await;
        assert_eq!(e.code(), &SqlState::INVALID_PARAMETER_VALUE, "{key}={bad}");
        assert!(e.message().contains(key), "{}", e.message());
        assert!(e.hint().is_some(), "{key}");
    }
    // An INSERT of a known key is checked like an UPDATE.
    c.batch_execute("DELETE FROM pgfire.settings WHERE key = 'delivery.max_attempts'")
        .await
        .unwrap();
    let e = refused(
        &c,
        "INSERT INTO pgfire.settings (key, value) VALUES ('delivery.max_attempts', 'many')",
    )
    .await;
    assert_eq!(e.code(), &SqlState::INVALID_PARAMETER_VALUE);
    // Accepted: the bounds, spaces around a number, lists of schemas, unknown keys.
    c.batch_execute(
        "INSERT INTO pgfire.settings (key, value) VALUES ('delivery.max_attempts', ' 100 ');
         UPDATE pgfire.settings SET value = '1024' WHERE key = 'limits.payload_bytes';
         UPDATE pgfire.settings SET value = '104857600' WHERE key = 'limits.payload_bytes';
         UPDATE pgfire.settings SET value = '300000' WHERE key = 'limits.timeout_ms';
         UPDATE pgfire.settings SET value = '60' WHERE key = 'auth.reset_ttl_seconds';
         UPDATE pgfire.settings SET value = 'public, app_data,Données' WHERE key = 'datahub_schemas';
         UPDATE pgfire.settings SET value = '' WHERE key = 'datahub_schemas';
         UPDATE pgfire.settings SET value = 'https://a.example/v?token={token}&x=1' WHERE key = 'auth.verification_link';
         INSERT INTO pgfire.settings (key, value) VALUES ('my.own_key', 'anything'), ('limits.future_thing', 'abc');",
    )
    .await
    .unwrap();
    // A raised limit admits longer functions; lowering it below one is refused, naming it.
    c.batch_execute(
        "INSERT INTO pgfire.functions (name, kind, timeout_ms) VALUES ('slow', 'log', 60000), ('slower', 'log', 120000)",
    )
    .await
    .unwrap();
    let e = refused(
        &c,
        "UPDATE pgfire.settings SET value = '30000' WHERE key = 'limits.timeout_ms'",
    )
    .await;
    assert_eq!(e.code(), &SqlState::INVALID_PARAMETER_VALUE);
    assert_eq!(
        e.message(),
        r#"limits.timeout_ms 30000 is below the timeout_ms of function "slower" (120000 ms), "slow" (60000 ms)"#
    );
    assert!(e.hint().unwrap().contains("UPDATE pgfire.functions"));
    // Deleting the limit falls back to its default (10000 ms): refused too.
    let e = refused(
        &c,
        "DELETE FROM pgfire.settings WHERE key = 'limits.timeout_ms'",
    )
    .await;
    assert!(
        e.message().contains("below the timeout_ms"),
        "{}",
        e.message()
    );
    c.batch_execute(
        "UPDATE pgfire.settings SET value = '120000' WHERE key = 'limits.timeout_ms';
         UPDATE pgfire.functions SET timeout_ms = 5000;
         UPDATE pgfire.settings SET value = '5000' WHERE key = 'limits.timeout_ms';
         DELETE FROM pgfire.settings WHERE key = 'limits.timeout_ms'",
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn an_invalid_setting_stops_the_upgrade_with_its_key() {
    let db = TestDb::new();
    let c = db.client().await;
    // A version-1 install with a setting version 1 accepted.
    install::install(&c, Some(&slot_name(&db)), &MIGRATIONS[..1])
        .await
        .unwrap();
    c.batch_execute("UPDATE pgfire.settings SET value = 'abc' WHERE key = 'limits.payload_bytes'")
        .await
        .unwrap();
    let err = install::install(&c, Some(&slot_name(&db)), MIGRATIONS)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("migration 2 (validation) failed"), "{err}");
    assert!(err.contains("limits.payload_bytes"), "{err}");
    // Fixed, the upgrade from version 1 applies the rest.
    c.batch_execute("UPDATE pgfire.settings SET value = '2048' WHERE key = 'limits.payload_bytes'")
        .await
        .unwrap();
    let report = install::install(&c, Some(&slot_name(&db)), MIGRATIONS)
        .await
        .unwrap();
    assert_eq!(report.applied, all_versions()[1..]);
    assert_eq!(
        install::install(&c, Some(&slot_name(&db)), MIGRATIONS)
            .await
            .unwrap()
            .applied,
        Vec::<i32>::new()
    );
}

#[tokio::test]
async fn secrets_must_decode_and_sql_targets_must_be_functions() {
    use tokio_postgres::error::SqlState;
    let db = TestDb::new();
    install_pgfire(&db).await;
    let c = db.client().await;
    for secret in [
        "whsec_abc",              // not a multiple of 4 characters
        "whsec_QR==",             // stray bits in the last character
        "whsec_dGVzdA=",          // padding cut short
        "whsec_dGVzdA==dGVzdA==", // padding in the middle (the regex lets it by)
    ] {
        let e = refused(
            &c,
            &format!("INSERT INTO pgfire.functions (name, kind, target, secret) VALUES ('w', 'webhook', 'http://h/', '{secret}')"),
        )
        .await;
        assert_eq!(e.code(), &SqlState::INVALID_PARAMETER_VALUE, "{secret}");
        assert!(e.message().contains("whsec_"), "{secret}: {}", e.message());
    }
    c.batch_execute(
        "INSERT INTO pgfire.functions (name, kind, target, secret) VALUES
           ('w', 'webhook', 'http://h/', 'whsec_dGVzdC1zZWNyZXQta2V5LTEyMzQ1Njc4OTBhYmNk'),
           ('w2', 'webhook', 'http://h/', 'whsec_QQ==')",
    )
    .await
    .unwrap();
    let e = refused(
        &c,
        "UPDATE pgfire.functions SET secret = 'whsec_abc' WHERE name = 'w'",
    )
    .await;
    assert_eq!(e.code(), &SqlState::INVALID_PARAMETER_VALUE);

    c.batch_execute(
        "CREATE PROCEDURE proc(e jsonb) LANGUAGE sql AS 'SELECT 1';
         CREATE AGGREGATE agg(jsonb) (SFUNC = jsonb_concat, STYPE = jsonb);
         CREATE FUNCTION fine(e jsonb) RETURNS jsonb LANGUAGE sql AS 'SELECT e';",
    )
    .await
    .unwrap();
    for (target, what) in [("proc", "a procedure"), ("agg", "an aggregate")] {
        let e = refused(
            &c,
            &format!(
                "INSERT INTO pgfire.functions (name, kind, target) VALUES ('s', 'sql', '{target}')"
            ),
        )
        .await;
        assert_eq!(e.code(), &SqlState::WRONG_OBJECT_TYPE, "{target}");
        assert!(
            e.message().contains(&format!("is {what}")),
            "{}",
            e.message()
        );
        assert!(e.hint().unwrap().contains("CREATE FUNCTION"));
    }
    c.batch_execute(
        "INSERT INTO pgfire.functions (name, kind, target) VALUES ('s', 'sql', 'fine')",
    )
    .await
    .unwrap();
    let e = refused(
        &c,
        "UPDATE pgfire.functions SET target = 'proc' WHERE name = 's'",
    )
    .await;
    assert_eq!(e.code(), &SqlState::WRONG_OBJECT_TYPE);
}

#[tokio::test]
async fn dropping_a_source_table_deletes_its_row() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE users (id int PRIMARY KEY); CREATE TABLE orders (id int PRIMARY KEY);
         CREATE SCHEMA app; CREATE TABLE app.items (id int PRIMARY KEY);
         INSERT INTO pgfire.sources (table_name, kind) VALUES ('users', 'user'), ('orders', 'record'), ('app.items', 'record');
         DROP TABLE users;",
    )
    .await
    .unwrap();
    let sources = "SELECT table_name::text FROM pgfire.sources ORDER BY 1";
    assert_eq!(texts(&c, sources).await, ["app.items", "orders"]);
    // Dropped with its schema, too; the others keep working.
    c.batch_execute("DROP SCHEMA app CASCADE").await.unwrap();
    assert_eq!(texts(&c, sources).await, ["orders"]);
    c.batch_execute(
        "CREATE TABLE users (id int PRIMARY KEY);
         INSERT INTO pgfire.sources (table_name, kind) VALUES ('users', 'user');
         UPDATE pgfire.sources SET id_column = 'id';",
    )
    .await
    .unwrap();
    assert_eq!(texts(&c, sources).await, ["orders", "users"]);
    // A drop that fails leaves the row.
    c.batch_execute("BEGIN; DROP TABLE orders; ROLLBACK")
        .await
        .unwrap();
    assert_eq!(texts(&c, sources).await, ["orders", "users"]);
    // A role that is not a superuser may drop its own table (the trigger runs as pgfire's owner).
    let role = format!("owner_{}", db.name);
    db.psql(&format!(
        "CREATE ROLE {role} LOGIN; GRANT CREATE ON SCHEMA public TO {role}; GRANT USAGE ON SCHEMA pgfire TO {role}"
    ));
    let url = format!(
        "postgres://{role}@127.0.0.1:{}/{}",
        db.cluster.port, db.name
    );
    let owner = pgfire::db::connect(&url).await.unwrap();
    owner
        .batch_execute("CREATE TABLE mine (id int); DROP TABLE mine")
        .await
        .unwrap();
    // A source that does not exist is refused.
    let e = refused(
        &c,
        "INSERT INTO pgfire.sources (table_name, kind) VALUES (4000000000, 'record')",
    )
    .await;
    assert_eq!(e.code(), &tokio_postgres::error::SqlState::UNDEFINED_TABLE);
}

#[tokio::test]
async fn installed_by_a_role_that_is_not_superuser_a_dropped_source_stays_editable() {
    let db = TestDb::new();
    let role = format!("installer_{}", db.name);
    db.psql(&format!(
        "CREATE ROLE {role} LOGIN REPLICATION; GRANT CREATE ON DATABASE {} TO {role}; GRANT CREATE ON SCHEMA public TO {role}",
        db.name
    ));
    let url = format!(
        "postgres://{role}@127.0.0.1:{}/{}",
        db.cluster.port, db.name
    );
    let c = pgfire::db::connect(&url).await.unwrap();
    let slot = format!("{}_weak", slot_name(&db));
    let report = install::install(&c, Some(&slot), MIGRATIONS).await.unwrap();
    assert_eq!(report.applied, all_versions());
    assert!(!report.tracks_dropped_sources);
    c.batch_execute(
        "CREATE TABLE users (id int PRIMARY KEY); CREATE TABLE orders (id int PRIMARY KEY);
         INSERT INTO pgfire.sources (table_name, kind) VALUES ('users', 'user'), ('orders', 'record');
         DROP TABLE users;",
    )
    .await
    .unwrap();
    assert_eq!(
        texts(&c, "SELECT count(*)::text FROM pgfire.sources").await,
        ["2"]
    );
    // The dangling row does not break updates of the table, and can be deleted.
    c.batch_execute(
        "UPDATE pgfire.sources SET last_sign_in_column = NULL;
         CREATE TABLE items (id int PRIMARY KEY);
         INSERT INTO pgfire.sources (table_name, kind) VALUES ('items', 'record');
         DELETE FROM pgfire.sources WHERE NOT EXISTS (SELECT FROM pg_class WHERE oid = table_name);",
    )
    .await
    .unwrap();
    assert_eq!(
        texts(&c, "SELECT table_name::text FROM pgfire.sources ORDER BY 1").await,
        ["items", "orders"]
    );
    // A superuser can add the event trigger later.
    db.psql("SELECT pgfire.track_dropped_sources()");
    c.batch_execute("DROP TABLE items").await.unwrap();
    assert_eq!(
        texts(&c, "SELECT table_name::text FROM pgfire.sources").await,
        ["orders"]
    );
    let report = install::install(&c, Some(&slot), MIGRATIONS).await.unwrap();
    assert!(report.applied.is_empty() && report.tracks_dropped_sources);
    install::uninstall(&c).await.unwrap();
    assert!(texts(&c, "SELECT evtname::text FROM pg_event_trigger")
        .await
        .is_empty());
}
