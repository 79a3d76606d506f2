//! What a source table's changes become whatever its shape: partitioned tables (partitions
//! attached later included), a replica identity set back to DEFAULT by hand, columns named like
//! pgfire's own keys.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{caught_up, eventually, install_pgfire, start_service, TestDb};

const CAPTURE: &str = "
CREATE TABLE captured (n bigserial PRIMARY KEY, envelope jsonb NOT NULL);
CREATE FUNCTION capture(e jsonb) RETURNS void LANGUAGE sql AS $$ INSERT INTO captured (envelope) VALUES (e) $$;
INSERT INTO pgfire.functions (name, kind, target) VALUES ('capture', 'sql', 'capture');
";

fn subscribe(kind: &str) -> String {
    let k = kind.to_uppercase();
    format!(
        "INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES
           ('POST_{k}_CREATE', 'capture'), ('POST_{k}_UPDATE', 'capture'), ('POST_{k}_DELETE', 'capture');"
    )
}

async fn wait_events(c: &tokio_postgres::Client, n: usize) -> Vec<Value> {
    eventually(Duration::from_secs(30), &format!("{n} events"), || async {
        let rows: Vec<Value> = c
            .query(
                "SELECT envelope::text FROM captured ORDER BY envelope->>'id'",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| serde_json::from_str(r.get::<_, &str>(0)).unwrap())
            .collect();
        (rows.len() >= n).then_some(rows)
    })
    .await
}

#[tokio::test]
async fn a_partitioned_source_gives_events_under_its_own_name() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "{CAPTURE}
         CREATE TABLE orders (id int, region text, total numeric, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
         CREATE TABLE orders_eu PARTITION OF orders FOR VALUES IN ('eu');
         INSERT INTO pgfire.sources (table_name, kind, id_column) VALUES ('orders', 'record', 'id');
         {}",
        subscribe("record")
    ))
    .await
    .unwrap();
    let service = start_service(&db).await;
    // Partitions created and attached after registration.
    c.batch_execute(
        "CREATE TABLE orders_us PARTITION OF orders FOR VALUES IN ('us');
         CREATE TABLE orders_asia (LIKE orders);
         ALTER TABLE orders ATTACH PARTITION orders_asia FOR VALUES IN ('asia');
         INSERT INTO orders VALUES (1, 'eu', 10), (2, 'us', 20), (3, 'asia', 30);
         UPDATE orders SET total = total + 1 WHERE id = 3;
         DELETE FROM orders WHERE id = 2;",
    )
    .await
    .unwrap();
    let events = wait_events(&c, 5).await;
    let summary: Vec<(String, Value, Value)> = events
        .iter()
        .map(|e| {
            (
                e["event_type"].as_str().unwrap().to_string(),
                e["source"]["table"].clone(),
                e["event_data"]["record_id"].clone(),
            )
        })
        .collect();
    let t = json!("orders");
    assert_eq!(
        summary,
        [
            ("POST_RECORD_CREATE".into(), t.clone(), json!(1)),
            ("POST_RECORD_CREATE".into(), t.clone(), json!(2)),
            ("POST_RECORD_CREATE".into(), t.clone(), json!(3)),
            ("POST_RECORD_UPDATE".into(), t.clone(), json!(3)),
            ("POST_RECORD_DELETE".into(), t.clone(), json!(2)),
        ]
    );
    // Partitions attached later have their old values too.
    assert_eq!(
        events[3]["event_data"]["changes"],
        json!({"total": {"old": 30, "new": 31}})
    );
    assert_eq!(events[4]["event_data"]["table"], json!("orders"));
    assert_eq!(events[4]["event_data"]["total"], json!(20));
    assert!(events[4]["event_data"].get("old_missing").is_none());
    caught_up(&db).await;
    service.stop().await;
}

/// REPLICA IDENTITY DEFAULT set back by hand: only what the WAL holds is reported, the rest is
/// named in old_missing, never made up as null.
#[tokio::test]
async fn a_source_without_full_identity_reports_only_what_the_wal_holds() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "{CAPTURE}
         CREATE TABLE users (id int PRIMARY KEY, v text, w text);
         INSERT INTO pgfire.sources (table_name, kind) VALUES ('users', 'user');
         {}
         ALTER TABLE users REPLICA IDENTITY DEFAULT;",
        subscribe("user")
    ))
    .await
    .unwrap();
    let service = start_service(&db).await;
    c.batch_execute(
        "INSERT INTO users VALUES (1, 'a', 'b');
         UPDATE users SET id = 2 WHERE id = 1;
         DELETE FROM users WHERE id = 2;",
    )
    .await
    .unwrap();
    let events = wait_events(&c, 3).await;
    let update = &events[1]["event_data"];
    assert_eq!(update["changes"], json!({"id": {"old": 1, "new": 2}}));
    assert_eq!(update["old"], json!({"id": 1}));
    assert_eq!(update["old_missing"], json!(["v", "w"]));
    let delete = &events[2]["event_data"];
    assert_eq!(
        *delete,
        json!({"user_id": 2, "id": 2, "old": {"id": 2}, "old_missing": ["v", "w"]})
    );
    service.stop().await;
}

/// Columns named user_id, record_id, table, old or changes do not replace pgfire's keys.
#[tokio::test]
async fn columns_named_like_pgfire_keys_stay_reachable_under_columns() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "{CAPTURE}
         CREATE TABLE accounts (id int PRIMARY KEY, user_id int, \"table\" text, old text, changes text);
         CREATE TABLE notes (id int PRIMARY KEY, record_id int, \"table\" text);
         INSERT INTO pgfire.sources (table_name, kind) VALUES ('accounts', 'user'), ('notes', 'record');
         {}{}",
        subscribe("user"),
        subscribe("record")
    ))
    .await
    .unwrap();
    let service = start_service(&db).await;
    c.batch_execute(
        "INSERT INTO accounts VALUES (7, 99, 't', 'o', 'c');
         UPDATE accounts SET old = 'o2' WHERE id = 7;
         INSERT INTO notes VALUES (1, 5, 'x');",
    )
    .await
    .unwrap();
    let events = wait_events(&c, 3).await;
    assert_eq!(
        events[0]["event_data"],
        json!({"user_id": 7, "id": 7, "table": "t",
               "columns": {"user_id": 99, "old": "o", "changes": "c"}})
    );
    let update = &events[1]["event_data"];
    assert_eq!(update["user_id"], json!(7));
    assert_eq!(update["changes"], json!({"old": {"old": "o", "new": "o2"}}));
    assert_eq!(update["old"]["old"], json!("o"));
    assert_eq!(update["columns"]["old"], json!("o2"));
    assert_eq!(
        events[2]["event_data"],
        json!({"record_id": 1, "table": "notes", "id": 1, "columns": {"record_id": 5, "table": "x"}})
    );
    service.stop().await;
}
