//! Two `pgfire run` on one database: one streams, the other stands by (PostgreSQL's slot
//! ownership is the lock) and takes the slot over when the first is killed.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::hook::{Answer, Hook};
use crate::support::{count, eventually, install_pgfire, texts, TestDb};

const SETUP: &str = "
CREATE TABLE users (id int PRIMARY KEY, email text);
CREATE TABLE delivered (event_id text NOT NULL, user_id int NOT NULL);
CREATE TABLE audited (event_id text NOT NULL, user_id int NOT NULL);
CREATE FUNCTION deliver(e jsonb) RETURNS void LANGUAGE sql AS $$
  INSERT INTO delivered VALUES (e->>'id', (e->'event_data'->>'user_id')::int) $$;
CREATE FUNCTION audit(e jsonb) RETURNS void LANGUAGE sql AS $$
  INSERT INTO audited VALUES (e->>'id', (e->'event_data'->>'user_id')::int) $$;
INSERT INTO pgfire.sources (table_name, kind) VALUES ('users', 'user');
INSERT INTO pgfire.functions (name, kind, target) VALUES ('deliver', 'sql', 'deliver'), ('audit', 'sql', 'audit');
INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('POST_USER_CREATE', 'deliver');
";

struct Pgfire {
    child: Child,
    admin: String,
}

impl Pgfire {
    fn spawn(url: &str) -> Pgfire {
        let port = pgfire::embedded::free_port().unwrap();
        let admin = format!("127.0.0.1:{port}");
        let child = Command::new(env!("CARGO_BIN_EXE_pgfire"))
            .args(["run", "--no-proxy", "--admin-listen", &admin])
            .env("DATABASE_URL", url)
            .env("PGFIRE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn pgfire");
        Pgfire { child, admin }
    }

    /// `/healthz`: HTTP status and body, once the endpoint answers.
    async fn healthz(&self) -> Option<(u16, serde_json::Value)> {
        let r = reqwest::get(format!("http://{}/healthz", self.admin))
            .await
            .ok()?;
        let code = r.status().as_u16();
        Some((code, r.json().await.ok()?))
    }

    async fn wait_status(&self, want: &str, limit: Duration) -> serde_json::Value {
        eventually(limit, &format!("pgfire {want}"), || async {
            let (code, body) = self.healthz().await?;
            (body["status"] == want && code == 200).then_some(body)
        })
        .await
    }
}

impl Drop for Pgfire {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

async fn insert(c: &tokio_postgres::Client, from: i32, to: i32) {
    for id in from..to {
        c.execute("INSERT INTO users VALUES ($1, 'u')", &[&id])
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_standby_takes_the_slot_over_when_the_active_pgfire_is_killed() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    let c = db.client().await;
    c.batch_execute(SETUP).await.unwrap();

    let mut active = Pgfire::spawn(&db.url());
    active.wait_status("ok", Duration::from_secs(30)).await;
    let standby = Pgfire::spawn(&db.url());
    let health = standby
        .wait_status("standby", Duration::from_secs(30))
        .await;
    let state = health["replication"]["state"].as_str().unwrap_or_default();
    assert!(state.starts_with("standby: "), "{state}");
    assert!(
        state.contains("active for PID"),
        "names who holds it: {state}"
    );
    // `pgfire status` says so too.
    let out = Command::new(env!("CARGO_BIN_EXE_pgfire"))
        .args([
            "status",
            "--admin-url",
            &format!("http://{}", standby.admin),
        ])
        .env("DATABASE_URL", db.url())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("standby"), "{text}");

    insert(&c, 0, 300).await;
    // A configuration change while the standby waits: it must apply where the slot stands
    // when it takes over, not what it loaded at its start.
    c.batch_execute(
        "INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('POST_USER_CREATE', 'audit')",
    )
    .await
    .unwrap();
    insert(&c, 300, 600).await;
    // The active one has confirmed past the change: the standby never sees it in the stream.
    let after = texts(&c, "SELECT pg_current_wal_insert_lsn()::text").await;
    let slot = crate::support::slot_name(&db);
    eventually(Duration::from_secs(60), "the slot past the change", || async {
        let past = texts(
            &c,
            &format!(
                "SELECT (confirmed_flush_lsn >= '{}')::text FROM pg_replication_slots WHERE slot_name = '{slot}'",
                after[0]
            ),
        )
        .await;
        (past == ["true"]).then_some(())
    })
    .await;

    active.child.kill().expect("kill -9");
    active.child.wait().unwrap();
    let killed = Instant::now();
    insert(&c, 600, 1000).await;
    standby.wait_status("ok", Duration::from_secs(15)).await;
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(15), "took over in {took:?}");

    eventually(Duration::from_secs(60), "every row delivered", || async {
        let n = count(&c, "SELECT count(DISTINCT user_id) FROM delivered").await;
        let a = count(
            &c,
            "SELECT count(DISTINCT user_id) FROM audited WHERE user_id >= 300",
        )
        .await;
        (n == 1000 && a == 700).then_some(())
    })
    .await;
    // Duplicates may come, each with the id of the first delivery.
    for table in ["delivered", "audited"] {
        let conflicting = texts(
            &c,
            &format!(
                "SELECT event_id FROM {table} GROUP BY event_id HAVING count(DISTINCT user_id) > 1"
            ),
        )
        .await;
        assert!(conflicting.is_empty(), "{table}: {conflicting:?}");
    }
    let early_audits = count(&c, "SELECT count(*) FROM audited WHERE user_id < 300").await;
    assert_eq!(
        early_audits, 0,
        "audit subscribed after user 299 was committed"
    );
}

/// Send `signal` (STOP, CONT) to a process.
fn signal(child: &Child, signal: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{signal}");
}

#[tokio::test]
async fn a_pgfire_that_lost_the_slot_leaves_the_parked_runs_to_the_one_holding_it() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    let hook = Hook::start(|_, _| Answer::status(500)).await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE users (id int PRIMARY KEY, email text);
         INSERT INTO pgfire.sources (table_name, kind) VALUES ('users', 'user');
         UPDATE pgfire.settings SET value = '1' WHERE key = 'delivery.memory_attempts';
         UPDATE pgfire.settings SET value = '100' WHERE key = 'delivery.max_attempts';
         UPDATE pgfire.settings SET value = '50' WHERE key = 'delivery.retry_base_ms';
         UPDATE pgfire.settings SET value = '100' WHERE key = 'delivery.retry_max_ms';
         INSERT INTO pgfire.functions (name, kind, target) VALUES ('hook', 'webhook', '{}');
         INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('POST_USER_CREATE', 'hook');",
        hook.url()
    ))
    .await
    .unwrap();
    let a = Pgfire::spawn(&db.url());
    a.wait_status("ok", Duration::from_secs(30)).await;
    insert(&c, 1, 4).await;
    eventually(
        Duration::from_secs(30),
        "three runs parked and retried",
        || async {
            let parked = count(&c, "SELECT count(*) FROM pgfire.parked WHERE attempt > 1").await;
            (parked == 3).then_some(())
        },
    )
    .await;
    let mut b = Pgfire::spawn(&db.url());
    b.wait_status("standby", Duration::from_secs(30)).await;

    // A loses the slot while alive: frozen, its walsender ended; B takes the slot, and A,
    // woken, finds it held and stands by.
    signal(&a.child, "STOP");
    let slot = crate::support::slot_name(&db);
    c.execute(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot],
    )
    .await
    .unwrap();
    b.wait_status("ok", Duration::from_secs(30)).await;
    signal(&a.child, "CONT");
    a.wait_status("standby", Duration::from_secs(30)).await;

    // With B frozen, nobody may retry: A stands by. (Retries come every 100 ms or so while
    // one holds the slot.)
    signal(&b.child, "STOP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (requests, runs) = (
        hook.got().len(),
        count(&c, "SELECT count(*) FROM pgfire.executions").await,
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(hook.got().len(), requests, "a standby sent requests");
    assert_eq!(
        count(&c, "SELECT count(*) FROM pgfire.executions").await,
        runs,
        "a standby recorded runs"
    );
    signal(&b.child, "CONT");
    eventually(Duration::from_secs(30), "B retrying again", || async {
        (hook.got().len() > requests + 3).then_some(())
    })
    .await;

    // B dies: A takes the slot over and retries the parked runs, which now succeed.
    b.child.kill().unwrap();
    b.child.wait().unwrap();
    hook.script(|_, _| Answer::status(200));
    a.wait_status("ok", Duration::from_secs(30)).await;
    eventually(
        Duration::from_secs(60),
        "the parked runs delivered",
        || async {
            let ok = count(
                &c,
                "SELECT count(DISTINCT event_id) FROM pgfire.executions WHERE status = 'ok'",
            )
            .await;
            let parked = count(&c, "SELECT count(*) FROM pgfire.parked").await;
            (ok == 3 && parked == 0).then_some(())
        },
    )
    .await;
}
