//! `nats` PRE functions against a real `nats-server -js` the test starts: a subscriber answers
//! the request (allow, rewrite, block); a subject nobody answers, one that never answers in
//! time, and one a JetStream stream takes each follow `on_error`.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::StreamExt;

use crate::pre::{db_error, rows, runs, setup};
use crate::support::nats::NatsServer;
use crate::support::{count, TestDb};

/// Answer PRE requests on `guard.>` as the seed's email check does, rewriting the name of the
/// rows it allows; `guard.PRE_USER_UPDATE` is received and never answered. Returns the event
/// ids the requests carried.
async fn responder(nats: &NatsServer) -> Arc<Mutex<Vec<String>>> {
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut sub = client.subscribe("guard.>").await.unwrap();
    client.flush().await.unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let ids = seen.clone();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let id = m
                .headers
                .as_ref()
                .and_then(|h| h.get("Pgfire-Event-Id"))
                .map(|v| v.to_string())
                .unwrap_or_default();
            ids.lock().unwrap().push(id);
            if m.subject.as_str() == "guard.PRE_USER_UPDATE" {
                continue;
            }
            let event: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            let email = event["event_data"]["email"].as_str().unwrap_or_default();
            let answer = match email.contains('@') {
                true => serde_json::json!({"allow": true, "data": {"name": "checked by nats"}}),
                false => serde_json::json!({"allow": false, "message": "Invalid email address"}),
            };
            if let Some(reply) = m.reply {
                let body = Bytes::from(serde_json::to_vec(&answer).unwrap());
                client.publish(reply, body).await.unwrap();
            }
        }
    });
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_pre_functions_answer_by_request_reply() {
    let nats = NatsServer::start().await;
    let seen = responder(&nats).await;
    // A stream that takes `taken.>`, as one made for POST events would.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "OTHER".into(),
        subjects: vec!["taken.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();

    let db = TestDb::new();
    let proxy = setup(
        &db,
        &format!(
            "DELETE FROM pgfire.subscriptions WHERE function_name = 'check_email';
             INSERT INTO pgfire.settings (key, value) VALUES ('nats.url', '{}');
             INSERT INTO pgfire.functions (name, kind, target, timeout_ms) VALUES ('guard', 'nats', 'guard', 500);
             INSERT INTO pgfire.functions (name, kind, target, on_error) VALUES
                 ('nobody', 'nats', 'nobody', 'block'), ('stored', 'nats', 'taken', 'block');
             INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES
                 ('PRE_USER_CREATE', 'guard'), ('PRE_USER_UPDATE', 'guard');",
            nats.url()
        ),
    )
    .await;
    let c = proxy.client(&db).await;

    // Allowed and rewritten by the subscriber's answer, RETURNING the stored row.
    let back = rows(
        &c,
        "INSERT INTO users (email, name) VALUES ('ada@example.com', 'Ada') RETURNING name",
    )
    .await;
    assert_eq!(back[0][0].as_deref(), Some("checked by nats"));
    runs(&db, "guard", "modified", 1).await;

    // Blocked: the seed's message, nothing stored.
    let err = c
        .simple_query("INSERT INTO users (email) VALUES ('not-an-email')")
        .await
        .unwrap_err();
    let (code, message, detail) = db_error(&err);
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("P0001", "Invalid email address")
    );
    assert!(detail.contains("guard"), "{detail}");
    runs(&db, "guard", "blocked", 1).await;
    let direct = db.client().await;
    assert_eq!(count(&direct, "SELECT count(*) FROM users").await, 1);
    {
        let ids = seen.lock().unwrap();
        assert_eq!(ids.len(), 2);
        assert!(ids.iter().all(|id| !id.is_empty()), "{ids:?}");
    }

    // No answer within the function's timeout: on_error allow lets the write through.
    c.simple_query("UPDATE users SET name = 'Ada L.'")
        .await
        .unwrap();
    runs(&db, "guard", "timeout", 1).await;
    assert_eq!(
        rows(&direct, "SELECT name FROM users").await[0][0].as_deref(),
        Some("Ada L.")
    );

    // Nobody subscribed, and a subject a stream takes: errors, here with on_error block.
    proxy
        .change(
            &db,
            "INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES
                 ('PRE_USER_DELETE', 'nobody');",
        )
        .await;
    let err = c.simple_query("DELETE FROM users").await.unwrap_err();
    let (code, message, _) = db_error(&err);
    assert_eq!(code, "P0001");
    assert!(message.contains("no NATS subscriber"), "{message}");
    runs(&db, "nobody", "error", 1).await;
    proxy
        .change(
            &db,
            "UPDATE pgfire.subscriptions SET function_name = 'stored' WHERE function_name = 'nobody'",
        )
        .await;
    let err = c.simple_query("DELETE FROM users").await.unwrap_err();
    let (_, message, _) = db_error(&err);
    assert!(
        message.contains("taken by JetStream stream OTHER"),
        "{message}"
    );
    runs(&db, "stored", "error", 1).await;
    // Nothing was stored in that stream.
    let mut other = js.get_stream("OTHER").await.unwrap();
    assert_eq!(other.info().await.unwrap().state.messages, 0);
    assert_eq!(count(&direct, "SELECT count(*) FROM users").await, 1);
}
