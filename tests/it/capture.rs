//! Shared by the datahub, auth and custom event tests: a `sql` function that stores every
//! envelope it receives (in schema `capture`, outside the datahub schemas), and waits on them.

use std::time::Duration;

use serde_json::Value;

use crate::support::{caught_up, install_pgfire, TestDb};

const CAPTURE: &str = "
CREATE SCHEMA capture;
CREATE TABLE capture.events (n bigserial PRIMARY KEY, envelope jsonb NOT NULL);
CREATE FUNCTION capture.store(e jsonb) RETURNS void LANGUAGE sql AS $$ INSERT INTO capture.events (envelope) VALUES (e) $$;
INSERT INTO pgfire.functions (name, kind, target) VALUES ('capture', 'sql', 'capture.store');
";

/// Install pgfire and subscribe the capturing function to `event_types`.
pub async fn setup(db: &TestDb, event_types: &[&str]) -> tokio_postgres::Client {
    install_pgfire(db).await;
    let c = db.client().await;
    c.batch_execute(CAPTURE).await.unwrap();
    subscribe(&c, event_types).await;
    c
}

pub async fn subscribe(c: &tokio_postgres::Client, event_types: &[&str]) {
    for t in event_types {
        c.execute(
            "INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ($1, 'capture')",
            &[t],
        )
        .await
        .unwrap_or_else(|e| panic!("subscribe to {t}: {e}"));
    }
}

/// The envelopes captured so far, in event id order (commit order).
pub async fn captured(c: &tokio_postgres::Client) -> Vec<Value> {
    let mut events: Vec<Value> = c
        .query("SELECT envelope::text FROM capture.events", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| serde_json::from_str(r.get::<_, &str>(0)).unwrap())
        .collect();
    events.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    events
}

/// Wait for `n` envelopes; then, once pgfire has settled everything committed, check there are
/// no more than that.
pub async fn exactly(db: &TestDb, c: &tokio_postgres::Client, n: usize) -> Vec<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while captured(c).await.len() < n {
        if std::time::Instant::now() > deadline {
            let events = captured(c).await;
            panic!(
                "timed out waiting for {n} events; {} captured: {}",
                events.len(),
                serde_json::to_string_pretty(&types_and_data(&events)).unwrap()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    caught_up(db).await;
    let events = captured(c).await;
    assert_eq!(
        events.len(),
        n,
        "{}",
        serde_json::to_string_pretty(&events).unwrap()
    );
    events
}

/// (event_type, event_data) of each envelope.
pub fn types_and_data(events: &[Value]) -> Vec<(String, Value)> {
    events
        .iter()
        .map(|e| {
            (
                e["event_type"].as_str().unwrap().to_string(),
                e["event_data"].clone(),
            )
        })
        .collect()
}

/// The event types of the envelopes.
pub fn types(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["event_type"].as_str().unwrap().to_string())
        .collect()
}

/// The database error of `sql`, which must fail: (SQLSTATE, message, hint).
pub async fn refused(c: &tokio_postgres::Client, sql: &str) -> (String, String, String) {
    let e = c
        .batch_execute(sql)
        .await
        .err()
        .unwrap_or_else(|| panic!("accepted: {sql}"));
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("not a database error: {sql}: {e}"));
    (
        db.code().code().to_string(),
        db.message().to_string(),
        db.hint().unwrap_or_default().to_string(),
    )
}
