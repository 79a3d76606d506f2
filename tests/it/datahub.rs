//! Datahub events: CREATE / ALTER / DROP TABLE and TRUNCATE of the tables of the datahub schemas,
//! with columns, constraints and what changed; nothing for a rolled-back DDL, other schemas or
//! pgfire's own; in order with row changes; installed and removed by install / uninstall; off,
//! with a clear word, for a role that is not a superuser.

use serde_json::{json, Value};

use crate::capture::{exactly, setup, types, types_and_data};
use crate::support::{install_pgfire, slot_name, start_service, texts, TestDb};

const ALL: [&str; 4] = [
    "api.dataTable_created",
    "api.dataTable_updated",
    "api.dataTable_deleted",
    "api.dataTable_emptied",
];

fn col(name: &str, ty: &str, nullable: bool, default: Value) -> Value {
    json!({"name": name, "type": ty, "nullable": nullable, "default": default})
}

#[tokio::test]
async fn table_lifecycle_events_carry_columns_and_what_changed() {
    let db = TestDb::new();
    let c = setup(&db, &ALL).await;
    let service = start_service(&db).await;
    c.batch_execute(
        "CREATE TABLE products (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, title text NOT NULL, price numeric(10,2) DEFAULT 0);
         ALTER TABLE products ADD COLUMN stock int, ALTER COLUMN price TYPE numeric(12,2), ALTER COLUMN price SET NOT NULL,
                              ADD CONSTRAINT price_positive CHECK (price >= 0);
         ALTER TABLE products RENAME COLUMN title TO name;
         ALTER TABLE products DROP COLUMN stock, DROP CONSTRAINT price_positive;
         ALTER TABLE products SET (fillfactor = 90);
         ALTER TABLE products RENAME TO items;
         INSERT INTO items (name, price) VALUES ('a', 1);
         TRUNCATE items;
         DROP TABLE items;",
    )
    .await
    .unwrap();
    let events = exactly(&db, &c, 7).await;
    let id = col("id", "bigint", false, Value::Null);
    let title = col("title", "text", false, Value::Null);
    let name = col("name", "text", false, Value::Null);
    let price = col("price", "numeric(12,2)", false, json!("0"));
    let stock = col("stock", "integer", true, Value::Null);
    let pkey =
        json!({"name": "products_pkey", "type": "primary key", "definition": "PRIMARY KEY (id)"});
    let check = json!({"name": "price_positive", "type": "check", "definition": "CHECK ((price >= (0)::numeric))"});
    let t = |table: &str| json!({"schema": "public", "table": table});
    let with = |base: Value, extra: Value| {
        let mut b = base;
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        b
    };
    assert_eq!(
        types_and_data(&events),
        [
            (
                "api.dataTable_created".into(),
                with(
                    t("products"),
                    json!({"columns": [id, title, col("price", "numeric(10,2)", true, json!("0"))],
                           "constraints": [pkey]})
                )
            ),
            (
                "api.dataTable_updated".into(),
                with(
                    t("products"),
                    json!({"columns": [id, title, price, stock], "constraints": [check, pkey],
                           "changes": {
                               "columns_added": [stock],
                               "columns_altered": [{"name": "price",
                                                    "type": {"old": "numeric(10,2)", "new": "numeric(12,2)"},
                                                    "nullable": {"old": true, "new": false}}],
                               "constraints_added": [check]}})
                )
            ),
            (
                "api.dataTable_updated".into(),
                with(
                    t("products"),
                    json!({"columns": [id, name, price, stock], "constraints": [check, pkey],
                           "changes": {"columns_renamed": [{"old": "title", "new": "name"}]}})
                )
            ),
            (
                "api.dataTable_updated".into(),
                with(
                    t("products"),
                    json!({"columns": [id, name, price], "constraints": [pkey],
                           "changes": {"columns_dropped": [stock], "constraints_dropped": [check]}})
                )
            ),
            (
                "api.dataTable_updated".into(),
                with(
                    t("items"),
                    json!({"columns": [id, name, price], "constraints": [pkey],
                           "changes": {"renamed": {"old": "products", "new": "items"}}})
                )
            ),
            ("api.dataTable_emptied".into(), t("items")),
            ("api.dataTable_deleted".into(), t("items")),
        ]
    );
    let created = &events[0];
    assert_eq!(
        created["source"]["table"], "products",
        "the envelope's source names the table"
    );
    assert_eq!(created["source"]["schema"], "public");
    service.stop().await;
}

#[tokio::test]
async fn ddl_is_in_order_with_row_changes_and_rolled_back_ddl_is_nothing() {
    let db = TestDb::new();
    let c = setup(&db, &ALL).await;
    subscribe_record(&c).await;
    c.batch_execute(
        "CREATE SCHEMA other;
         CREATE TABLE orders (id int PRIMARY KEY);
         INSERT INTO pgfire.sources (table_name, kind) VALUES ('orders', 'record');",
    )
    .await
    .unwrap();
    let service = start_service(&db).await;
    c.batch_execute(
        "BEGIN;
         INSERT INTO orders VALUES (1);
         CREATE TABLE notes (id int);
         INSERT INTO orders VALUES (2);
         TRUNCATE notes;
         INSERT INTO orders VALUES (3);
         COMMIT;
         BEGIN; CREATE TABLE never (id int); ROLLBACK;
         BEGIN; SAVEPOINT s; ALTER TABLE notes ADD COLUMN gone int; ROLLBACK TO s; COMMIT;
         BEGIN; TRUNCATE notes; ROLLBACK;
         BEGIN; DROP TABLE notes; ROLLBACK;
         CREATE TABLE other.elsewhere (id int);
         ALTER TABLE other.elsewhere ADD COLUMN x int;
         TRUNCATE other.elsewhere;
         CREATE TABLE pgfire.mine (id int);
         DROP TABLE pgfire.mine;
         CREATE TEMP TABLE scratch (id int);
         ALTER TABLE notes SET SCHEMA other;
         ALTER TABLE other.notes SET SCHEMA public;",
    )
    .await
    .unwrap();
    let events = exactly(&db, &c, 8).await;
    let summary: Vec<(String, Value)> = events
        .iter()
        .map(|e| {
            let d = &e["event_data"];
            let what = d.get("record_id").cloned().unwrap_or(d["table"].clone());
            (e["event_type"].as_str().unwrap().to_string(), what)
        })
        .collect();
    assert_eq!(
        summary,
        [
            // Created after install, before pgfire ran: in the stream all the same.
            ("api.dataTable_created".into(), json!("orders")),
            ("POST_RECORD_CREATE".into(), json!(1)),
            ("api.dataTable_created".into(), json!("notes")),
            ("POST_RECORD_CREATE".into(), json!(2)),
            ("api.dataTable_emptied".into(), json!("notes")),
            ("POST_RECORD_CREATE".into(), json!(3)),
            // Moved out of the datahub schemas and back.
            ("api.dataTable_deleted".into(), json!("notes")),
            ("api.dataTable_created".into(), json!("notes")),
        ]
    );
    service.stop().await;
}

async fn subscribe_record(c: &tokio_postgres::Client) {
    crate::capture::subscribe(c, &["POST_RECORD_CREATE"]).await;
}

#[tokio::test]
async fn the_datahub_schemas_setting_says_which_tables() {
    let db = TestDb::new();
    let c = setup(&db, &ALL).await;
    c.batch_execute(
        "CREATE SCHEMA app;
         CREATE TABLE app.early (id int);
         CREATE TABLE public.quiet (id int);
         UPDATE pgfire.settings SET value = 'app, crm' WHERE key = 'datahub_schemas';",
    )
    .await
    .unwrap();
    let service = start_service(&db).await;
    c.batch_execute(
        "TRUNCATE app.early;
         CREATE TABLE app.later (id int);
         CREATE TABLE public.ignored (id int);
         TRUNCATE public.quiet;
         DROP TABLE public.quiet;
         INSERT INTO pgfire.settings (key, value) VALUES ('datahub_schemas', 'pgfire')
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value;
         CREATE TABLE pgfire.never (id int);
         TRUNCATE app.early;",
    )
    .await
    .unwrap();
    let events = exactly(&db, &c, 3).await;
    let tables: Vec<(String, Value, Value)> = events
        .iter()
        .map(|e| {
            (
                e["event_type"].as_str().unwrap().to_string(),
                e["event_data"]["schema"].clone(),
                e["event_data"]["table"].clone(),
            )
        })
        .collect();
    assert_eq!(
        tables,
        [
            // Before the setting changed, public was the datahub schema.
            (
                "api.dataTable_created".into(),
                json!("public"),
                json!("quiet")
            ),
            ("api.dataTable_emptied".into(), json!("app"), json!("early")),
            ("api.dataTable_created".into(), json!("app"), json!("later")),
        ]
    );
    service.stop().await;
}

#[tokio::test]
async fn install_places_the_triggers_uninstall_removes_them() {
    let db = TestDb::new();
    db.psql("CREATE TABLE existing (id int)");
    let report = install_pgfire(&db).await;
    assert!(report.tracks_datahub);
    let c = db.client().await;
    c.batch_execute("CREATE TABLE later (id int)")
        .await
        .unwrap();
    assert_eq!(
        texts(&c, "SELECT evtname::text FROM pg_event_trigger ORDER BY 1").await,
        [
            "pgfire_datahub_ddl",
            "pgfire_datahub_dropped",
            "pgfire_partition_added",
            "pgfire_pre_guard",
            "pgfire_source_dropped"
        ]
    );
    assert_eq!(
        texts(
            &c,
            "SELECT tgrelid::regclass::text FROM pg_trigger WHERE tgname = 'pgfire_emptied' ORDER BY 1"
        )
        .await,
        ["existing", "later"]
    );
    pgfire::install::uninstall(&c).await.unwrap();
    assert!(texts(&c, "SELECT evtname::text FROM pg_event_trigger")
        .await
        .is_empty());
    assert!(texts(
        &c,
        "SELECT tgname::text FROM pg_trigger WHERE tgname = 'pgfire_emptied'"
    )
    .await
    .is_empty());
    c.batch_execute("TRUNCATE existing; ALTER TABLE later ADD COLUMN x int; DROP TABLE later")
        .await
        .unwrap();
}

/// A role that is not a superuser cannot create event triggers: install says so and how to
/// turn them on; row, auth and custom events work all the same.
#[tokio::test]
async fn a_role_that_is_not_superuser_is_told_and_everything_else_works() {
    let db = TestDb::new();
    let role = format!("plain_{}", db.name);
    db.psql(&format!(
        "CREATE ROLE {role} LOGIN REPLICATION; GRANT CREATE ON DATABASE {} TO {role}; GRANT CREATE ON SCHEMA public TO {role}",
        db.name
    ));
    let url = format!(
        "postgres://{role}@127.0.0.1:{}/{}",
        db.cluster.port, db.name
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgfire"))
        .args(["install", "--slot", &slot_name(&db)])
        .env("DATABASE_URL", &url)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("not installed as a superuser, so pgfire could not create the event triggers of the datahub events (api.dataTable_created/_updated/_deleted/_emptied): they stay off, everything else works; have a superuser run SELECT pgfire.track_datahub(); to turn them on."),
        "{stdout}"
    );
    let c = pgfire::db::connect(&url).await.unwrap();
    c.batch_execute(
        "CREATE SCHEMA capture;
         CREATE TABLE capture.events (n bigserial PRIMARY KEY, envelope jsonb NOT NULL);
         CREATE FUNCTION capture.store(e jsonb) RETURNS void LANGUAGE sql AS $$ INSERT INTO capture.events (envelope) VALUES (e) $$;
         INSERT INTO pgfire.functions (name, kind, target) VALUES ('capture', 'sql', 'capture.store');
         CREATE TABLE users (id int PRIMARY KEY, last_seen timestamptz);
         INSERT INTO pgfire.sources (table_name, kind, last_sign_in_column) VALUES ('users', 'user', 'last_seen');",
    )
    .await
    .unwrap();
    crate::capture::subscribe(
        &c,
        &[
            "api.dataTable_created",
            "POST_USER_CREATE",
            "POST_LOGIN",
            "SHIPPED",
        ],
    )
    .await;
    let service = start_service(&db).await;
    c.batch_execute(
        "CREATE TABLE products (id int);
         INSERT INTO users VALUES (1, NULL);
         UPDATE users SET last_seen = now();
         SELECT pgfire.emit('SHIPPED', '{\"id\": 1}');",
    )
    .await
    .unwrap();
    let events = exactly(&db, &c, 3).await;
    assert_eq!(
        types(&events),
        ["POST_USER_CREATE", "POST_LOGIN", "SHIPPED"]
    );
    service.stop().await;
    // pgfire status says so too.
    let status = |url: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgfire"))
            .args(["status", "--admin-url", "http://127.0.0.1:9"])
            .env("DATABASE_URL", url)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let warning = "warning: datahub events (api.dataTable_*) are off: their event triggers need a superuser (fix: as a superuser, SELECT pgfire.track_datahub())";
    assert!(status(&url).contains(warning), "{}", status(&url));
    // A superuser turns them on later: pgfire install again, or pgfire.track_datahub().
    let report = install_pgfire(&db).await;
    assert!(report.applied.is_empty() && report.tracks_datahub && report.tracks_dropped_sources);
    assert_eq!(db.psql("SELECT pgfire.track_datahub()").trim(), "t");
    assert!(!status(&url).contains("datahub"));
    assert_eq!(
        texts(
            &c,
            "SELECT tgrelid::regclass::text FROM pg_trigger WHERE tgname = 'pgfire_emptied' ORDER BY 1"
        )
        .await,
        ["products", "users"]
    );
}

/// Partitions are not datahub tables: a table attached as one leaves the datahub, detached it
/// comes back; TRUNCATE of the partitioned table is one emptied event.
#[tokio::test]
async fn partitions_are_part_of_their_table() {
    let db = TestDb::new();
    let c = setup(&db, &ALL).await;
    let service = start_service(&db).await;
    for step in [
        "CREATE TABLE metrics (at date, v int) PARTITION BY RANGE (at)",
        "CREATE TABLE metrics_2025 PARTITION OF metrics FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')",
        "CREATE TABLE metrics_2026 (at date, v int)",
        "ALTER TABLE metrics ATTACH PARTITION metrics_2026 FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')",
        "TRUNCATE metrics",
        "ALTER TABLE metrics DETACH PARTITION metrics_2026",
    ] {
        c.batch_execute(step).await.unwrap();
    }
    let events = exactly(&db, &c, 5).await;
    let summary: Vec<(String, Value)> = events
        .iter()
        .map(|e| {
            (
                e["event_type"].as_str().unwrap().to_string(),
                e["event_data"]["table"].clone(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("api.dataTable_created".into(), json!("metrics")),
            ("api.dataTable_created".into(), json!("metrics_2026")),
            ("api.dataTable_deleted".into(), json!("metrics_2026")),
            ("api.dataTable_emptied".into(), json!("metrics")),
            ("api.dataTable_created".into(), json!("metrics_2026")),
        ]
    );
    service.stop().await;
}
