//! `nats` functions against a real `nats-server -js` the test starts: the stream is created,
//! every event is published to `<target>.<event_type>` and acknowledged, with the event id in
//! its message id; a server that goes away parks the runs, which are published once it is back.

use std::time::Duration;

use crate::support::nats::NatsServer;
use crate::support::{caught_up, count, eventually, install_pgfire, start_service, TestDb};

const WAIT: Duration = Duration::from_secs(60);

async fn setup(db: &TestDb, nats: &NatsServer) -> tokio_postgres::Client {
    install_pgfire(db).await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE users (id int PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO pgfire.sources (table_name, kind) VALUES ('users', 'user');
         INSERT INTO pgfire.settings (key, value) VALUES ('nats.url', '{}');
         UPDATE pgfire.settings SET value = '10' WHERE key = 'delivery.retry_base_ms';
         UPDATE pgfire.settings SET value = '200' WHERE key = 'delivery.retry_max_ms';
         UPDATE pgfire.settings SET value = '100' WHERE key = 'delivery.max_attempts';
         INSERT INTO pgfire.functions (name, kind, target, timeout_ms) VALUES ('js', 'nats', 'app', 2000);
         INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES
           ('POST_USER_CREATE', 'js'), ('POST_USER_UPDATE', 'js');",
        nats.url()
    ))
    .await
    .unwrap();
    c
}

#[tokio::test]
async fn events_are_published_to_jetstream_and_acknowledged() {
    let nats = NatsServer::start().await;
    let db = TestDb::new();
    let c = setup(&db, &nats).await;
    let service = start_service(&db).await;
    c.batch_execute("INSERT INTO users (id) SELECT generate_series(1, 20); UPDATE users SET n = 1 WHERE id = 3;")
        .await
        .unwrap();
    caught_up(&db).await;
    let msgs = eventually(WAIT, "21 messages in PGFIRE", || async {
        let m = nats.messages("PGFIRE").await;
        (m.len() >= 21).then_some(m)
    })
    .await;
    assert_eq!(msgs.len(), 21);
    let creates = msgs
        .iter()
        .filter(|m| m.0 == "app.POST_USER_CREATE")
        .count();
    assert_eq!(creates, 20);
    for (subject, id, body) in &msgs {
        assert_eq!(
            body["event_type"]
                .as_str()
                .map(|t| format!("app.{t}"))
                .as_deref(),
            Some(subject.as_str())
        );
        assert_eq!(id, &format!("{}:js", body["id"].as_str().unwrap()));
    }
    let update = msgs.iter().find(|m| m.0 == "app.POST_USER_UPDATE").unwrap();
    assert_eq!(update.2["event_data"]["user_id"], 3);
    let ok = count(
        &c,
        "SELECT count(*) FROM pgfire.executions WHERE status = 'ok'",
    )
    .await;
    assert!(ok <= 21);
    service.stop().await;
}

#[tokio::test]
async fn a_nats_outage_parks_the_runs_and_they_are_published_when_it_is_back() {
    let mut nats = NatsServer::start().await;
    let db = TestDb::new();
    let c = setup(&db, &nats).await;
    let service = start_service(&db).await;
    c.batch_execute("INSERT INTO users (id) VALUES (1)")
        .await
        .unwrap();
    eventually(WAIT, "the first message", || async {
        (nats.messages("PGFIRE").await.len() == 1).then_some(())
    })
    .await;
    nats.kill();
    c.batch_execute("INSERT INTO users (id) VALUES (2); UPDATE users SET n = 1 WHERE id = 2; UPDATE users SET n = 2 WHERE id = 2;")
        .await
        .unwrap();
    caught_up(&db).await;
    eventually(WAIT, "parked runs", || async {
        (count(&c, "SELECT count(*) FROM pgfire.parked").await == 3).then_some(())
    })
    .await;
    nats.restart().await;
    let msgs = eventually(WAIT, "4 messages", || async {
        let m = nats.messages("PGFIRE").await;
        (m.len() >= 4).then_some(m)
    })
    .await;
    let row2: Vec<i64> = msgs
        .iter()
        .filter(|m| m.2["event_data"]["user_id"] == 2)
        .map(|m| m.2["event_data"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(row2, [0, 1, 2], "in commit order");
    eventually(WAIT, "the parked table to empty", || async {
        (count(&c, "SELECT count(*) FROM pgfire.parked").await == 0).then_some(())
    })
    .await;
    service.stop().await;
}
