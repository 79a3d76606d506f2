//! Function kinds in isolation: each `sql` run starts from a clean session, a runaway `sql` run
//! is ended without holding up others, webhooks handle redirects and response bodies safely.

use std::time::{Duration, Instant};

use crate::support::webhook::{RawServer, Reply};
use crate::support::{caught_up, eventually, install_pgfire, start_service, texts, TestDb};

const WAIT: Duration = Duration::from_secs(30);
const SECRET: &str = "whsec_dGVzdC1zZWNyZXQta2V5LTEyMzQ1Njc4OTBhYmNk";

/// Runs recorded for `function`, as `attempt status duration_ms error` in order.
async fn runs_of(c: &tokio_postgres::Client, function: &str) -> Vec<(i32, String, i64, String)> {
    c.query(
        "SELECT attempt, status::text, duration_ms::int8, coalesce(error, '')
           FROM pgfire.executions WHERE function_name = $1 ORDER BY started_at, attempt",
        &[&function],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect()
}

async fn wait_runs(
    c: &tokio_postgres::Client,
    function: &str,
    n: usize,
) -> Vec<(i32, String, i64, String)> {
    eventually(WAIT, &format!("{n} runs of {function}"), || async {
        let r = runs_of(c, function).await;
        (r.len() >= n).then_some(r)
    })
    .await
}

#[tokio::test]
async fn every_sql_run_starts_from_a_clean_session() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    let c = db.client().await;
    let low = format!("{}_low", db.name);
    let me = texts(&c, "SELECT current_user::text").await.remove(0);
    c.batch_execute(&format!(
        "CREATE ROLE {low} NOLOGIN;
         CREATE TABLE t (id int PRIMARY KEY);
         CREATE TABLE seen (n bigserial PRIMARY KEY, fn text, who text, path text, pid int, temp bool,
                            listening int8, advisory int8, prepared int8, app text);
         GRANT SELECT, INSERT ON seen TO {low}; GRANT USAGE ON SEQUENCE seen_n_seq TO {low};
         CREATE FUNCTION public.observe(f text) RETURNS void LANGUAGE sql AS $$
           INSERT INTO public.seen (fn, who, path, pid, temp, listening, advisory, prepared, app)
           VALUES (f, current_user, current_setting('search_path'), pg_backend_pid(),
                   to_regclass('pg_temp.scratch') IS NOT NULL,
                   (SELECT count(*) FROM pg_listening_channels()),
                   (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()),
                   (SELECT count(*) FROM pg_prepared_statements),
                   current_setting('application_name')) $$;
         -- Leaves behind everything a session can hold: a role, a search_path, a setting, a
         -- temporary table, a prepared statement, a LISTEN, an advisory lock.
         CREATE FUNCTION public.dirty(e jsonb) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
           CREATE TEMP TABLE IF NOT EXISTS scratch (x int);
           EXECUTE 'LISTEN pgfire_test_channel';
           PERFORM pg_try_advisory_lock(42);
           IF NOT EXISTS (SELECT 1 FROM pg_prepared_statements WHERE name = 'leftover') THEN
             EXECUTE 'PREPARE leftover AS SELECT 1';
           END IF;
           PERFORM set_config('work_mem', '77kB', false);
           PERFORM set_config('default_transaction_read_only', 'on', false);
           PERFORM set_config('search_path', 'nowhere', false);
           PERFORM set_config('role', '{low}', false);
           PERFORM public.observe('dirty');
         END $$;
         CREATE FUNCTION public.clean(e jsonb) RETURNS void LANGUAGE sql AS $$
           SELECT public.observe('clean' || current_setting('work_mem')) $$;
         INSERT INTO pgfire.sources (table_name, kind) VALUES ('t', 'record');
         INSERT INTO pgfire.functions (name, kind, target) VALUES ('dirty', 'sql', 'dirty'), ('clean', 'sql', 'clean');
         INSERT INTO pgfire.subscriptions (event_type, function_name, priority) VALUES
           ('POST_RECORD_CREATE', 'dirty', 0), ('POST_RECORD_CREATE', 'clean', 1);"
    ))
    .await
    .unwrap();
    let service = start_service(&db).await;
    for i in 0..12 {
        c.execute("INSERT INTO t VALUES ($1)", &[&i]).await.unwrap();
    }
    caught_up(&db).await;
    let rows = c
        .query(
            "SELECT fn, who, path, pid, temp, listening, advisory, prepared, app FROM seen ORDER BY n",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 24, "every run recorded what it saw");
    let dirty_pids: Vec<i32> = rows
        .iter()
        .filter(|r| r.get::<_, &str>(0) == "dirty")
        .map(|r| r.get(3))
        .collect();
    let mut shared = 0;
    for r in &rows {
        let (f, who, path): (&str, &str, &str) = (r.get(0), r.get(1), r.get(2));
        if f == "dirty" {
            // The dirty function's changes took effect within its own run.
            assert_eq!((who, path), (low.as_str(), "nowhere"));
            continue;
        }
        assert_eq!(f, "clean4MB", "work_mem is reset");
        assert_eq!(who, me, "role is reset");
        assert_eq!(path, "\"$user\", public", "search_path is reset");
        assert!(!r.get::<_, bool>(4), "no temporary table left");
        assert_eq!(r.get::<_, i64>(5), 0, "no LISTEN left");
        assert_eq!(r.get::<_, i64>(6), 0, "no advisory lock left");
        assert_eq!(r.get::<_, i64>(7), 0, "no prepared statement left");
        assert_eq!(
            r.get::<_, &str>(8),
            "pgfire function",
            "startup parameters stay"
        );
        shared += dirty_pids.contains(&r.get(3)) as usize;
    }
    assert!(shared > 0, "the clean runs reused the dirty runs' sessions");
    // The history of successful runs may lag the slot: wait for it.
    for f in ["dirty", "clean"] {
        let runs = wait_runs(&c, f, 12).await;
        assert!(runs.iter().all(|r| r.1 == "ok"), "{f}: {runs:?}");
    }
    service.stop().await;
    c.batch_execute(&format!("DROP OWNED BY {low}; DROP ROLE {low}"))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_runaway_sql_run_is_ended_and_never_holds_up_another_function() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY);
         CREATE TABLE fast_runs (id int);
         -- Swallows every cancel: only terminating its backend ends it.
         CREATE FUNCTION runaway(e jsonb) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
           LOOP
             BEGIN PERFORM pg_sleep(1); EXCEPTION WHEN query_canceled THEN NULL; END;
           END LOOP;
         END $$;
         -- Honours its cancel: its session stays usable.
         CREATE FUNCTION slow(e jsonb) RETURNS void LANGUAGE sql AS $$ SELECT pg_sleep(30) $$;
         CREATE FUNCTION fast(e jsonb) RETURNS void LANGUAGE sql AS $$
           INSERT INTO fast_runs VALUES ((e->'event_data'->>'id')::int) $$;
         UPDATE pgfire.settings SET value = '2' WHERE key = 'delivery.max_attempts';
         UPDATE pgfire.settings SET value = '10' WHERE key = 'delivery.retry_base_ms';
         INSERT INTO pgfire.sources (table_name, kind) VALUES ('t', 'record');
         INSERT INTO pgfire.functions (name, kind, target, timeout_ms) VALUES
           ('runaway', 'sql', 'runaway', 300), ('slow', 'sql', 'slow', 200), ('fast', 'sql', 'fast', 10000);
         INSERT INTO pgfire.subscriptions (event_type, function_name, priority) VALUES
           ('POST_RECORD_CREATE', 'runaway', 0), ('POST_RECORD_CREATE', 'slow', 1),
           ('POST_RECORD_CREATE', 'fast', 2);",
    )
    .await
    .unwrap();
    let service = start_service(&db).await;
    for i in 0..4 {
        c.execute("INSERT INTO t VALUES ($1)", &[&i]).await.unwrap();
    }
    let fast = wait_runs(&c, "fast", 4).await;
    for (attempt, status, ms, error) in &fast {
        assert_eq!((*attempt, status.as_str(), error.as_str()), (1, "ok", ""));
        assert!(*ms < 1000, "fast run took {ms} ms: {fast:?}");
    }
    let runaway = wait_runs(&c, "runaway", 8).await;
    // Events of different rows run concurrently: each event's two attempts, in any interleaving.
    let mut attempts: Vec<(i32, &str)> = runaway.iter().map(|r| (r.0, r.1.as_str())).collect();
    attempts.sort();
    assert_eq!(
        attempts,
        [[(1, "timeout")]; 4]
            .concat()
            .into_iter()
            .chain([(2, "dead"); 4])
            .collect::<Vec<_>>(),
        "{runaway:?}"
    );
    for (attempt, status, ms, error) in &runaway {
        let _ = (attempt, status);
        assert_eq!(error, "timed out after 300 ms");
        // Timeout, then at most the grace (300 ms) for the cancel, then the termination.
        assert!(*ms < 2000, "runaway run took {ms} ms: {runaway:?}");
    }
    let slow = wait_runs(&c, "slow", 8).await;
    assert!(
        slow.iter()
            .all(|(_, _, ms, e)| e == "timed out after 200 ms" && *ms < 2000),
        "{slow:?}"
    );
    // Every runaway backend is gone; the sessions that honoured their cancel are reused, so
    // pgfire holds only a few.
    eventually(WAIT, "runaway backends to end", || async {
        let n = texts(
            &c,
            "SELECT count(*)::text FROM pg_stat_activity WHERE query LIKE '%runaway%' AND pid <> pg_backend_pid()",
        )
        .await;
        (n[0] == "0").then_some(())
    })
    .await;
    let sessions = texts(
        &c,
        &format!("SELECT count(*)::text FROM pg_stat_activity WHERE application_name = 'pgfire function' AND datname = '{}'", db.name),
    )
    .await;
    assert!(sessions[0].parse::<i32>().unwrap() <= 4, "{sessions:?}");
    service.stop().await;
}

fn route(path: &str) -> Reply {
    match path {
        "/moved" => Reply::Status(301, vec![("location", "/elsewhere?token=secret".into())]),
        "/see-other" => Reply::Status(303, vec![("location", "/elsewhere".into())]),
        "/temporary" => Reply::Status(307, vec![("location", "/permanent".into())]),
        "/permanent" => Reply::Status(308, vec![("location", "/target".into())]),
        "/loop" => Reply::Status(307, vec![("location", "/loop".into())]),
        "/endless-error" => Reply::Endless(500),
        "/endless-ok" => Reply::Endless(200),
        "/trickle" => Reply::Trickle(200, 1000, Duration::from_millis(20)),
        "/trickle-error" => Reply::Trickle(503, 1000, Duration::from_millis(20)),
        _ => Reply::Status(200, vec![]),
    }
}

#[tokio::test]
async fn webhook_redirects_fail_unless_they_keep_the_post() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    let server = RawServer::start(route).await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE t (id int PRIMARY KEY);
         UPDATE pgfire.settings SET value = '1' WHERE key = 'delivery.max_attempts';
         INSERT INTO pgfire.sources (table_name, kind) VALUES ('t', 'record');
         INSERT INTO pgfire.functions (name, kind, target, secret) VALUES
           ('moved', 'webhook', '{}', NULL), ('see_other', 'webhook', '{}', NULL),
           ('temporary', 'webhook', '{}', '{SECRET}'), ('loop', 'webhook', '{}', NULL);
         INSERT INTO pgfire.subscriptions (event_type, function_name, priority) VALUES
           ('POST_RECORD_CREATE', 'moved', 0), ('POST_RECORD_CREATE', 'see_other', 1),
           ('POST_RECORD_CREATE', 'temporary', 2), ('POST_RECORD_CREATE', 'loop', 3);",
        server.url("/moved"),
        server.url("/see-other"),
        server.url("/temporary"),
        server.url("/loop"),
    ))
    .await
    .unwrap();
    let service = start_service(&db).await;
    c.batch_execute("INSERT INTO t VALUES (1)").await.unwrap();
    let loop_runs = wait_runs(&c, "loop", 1).await;
    let base = format!("http://{}", server.addr);

    let moved = runs_of(&c, "moved").await;
    assert_eq!(moved.len(), 1);
    assert_eq!(moved[0].1, "dead");
    assert_eq!(
        moved[0].3,
        format!("POST {base}/moved answered 301 Moved Permanently, a redirect to {base}/elsewhere: not followed (pgfire follows only 307 and 308, at most 5 hops, never from https to http); set the function's target to the final URL")
    );
    let see_other = runs_of(&c, "see_other").await;
    assert!(
        see_other[0]
            .3
            .contains("answered 303 See Other, a redirect to"),
        "{see_other:?}"
    );
    let temporary = runs_of(&c, "temporary").await;
    assert_eq!(temporary[0].1, "ok", "{temporary:?}");
    assert!(
        loop_runs[0].3.contains("more than 5 redirects"),
        "{loop_runs:?}"
    );

    let got = server.received();
    assert!(
        got.iter().all(|r| r.method == "POST"),
        "never a GET: {got:?}"
    );
    assert!(
        !got.iter().any(|r| r.path.starts_with("/elsewhere")),
        "{got:?}"
    );
    // 307 then 308: the same POST, body and signature reach the final URL.
    let hops: Vec<_> = got
        .iter()
        .filter(|r| ["/temporary", "/permanent", "/target"].contains(&r.path.as_str()))
        .collect();
    assert_eq!(hops.len(), 3, "{got:?}");
    for r in &hops[1..] {
        assert_eq!(r.body, hops[0].body);
        for h in [
            "content-type",
            "webhook-id",
            "webhook-timestamp",
            "webhook-signature",
        ] {
            assert!(r.header(h).is_some(), "{h} on {}", r.path);
            assert_eq!(r.header(h), hops[0].header(h), "{h} on {}", r.path);
        }
    }
    let loops = got.iter().filter(|r| r.path == "/loop").count();
    assert_eq!(loops, 6, "the first request and five hops");
    service.stop().await;
}

fn rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn webhook_response_bodies_are_read_only_up_to_a_cap_and_within_the_timeout() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    let server = RawServer::start(route).await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE t (id int PRIMARY KEY);
         UPDATE pgfire.settings SET value = '2' WHERE key = 'delivery.max_attempts';
         UPDATE pgfire.settings SET value = '10' WHERE key = 'delivery.retry_base_ms';
         INSERT INTO pgfire.sources (table_name, kind) VALUES ('t', 'record');
         INSERT INTO pgfire.functions (name, kind, target, timeout_ms) VALUES
           ('endless_error', 'webhook', '{}', 2000), ('endless_ok', 'webhook', '{}', 2000),
           ('trickle', 'webhook', '{}', 400), ('trickle_error', 'webhook', '{}', 400);
         INSERT INTO pgfire.subscriptions (event_type, function_name, priority) VALUES
           ('POST_RECORD_CREATE', 'endless_error', 0), ('POST_RECORD_CREATE', 'endless_ok', 1),
           ('POST_RECORD_CREATE', 'trickle', 2), ('POST_RECORD_CREATE', 'trickle_error', 3);",
        server.url("/endless-error"),
        server.url("/endless-ok"),
        server.url("/trickle"),
        server.url("/trickle-error"),
    ))
    .await
    .unwrap();
    let service = start_service(&db).await;
    let rss_before = rss_kb();
    let t0 = Instant::now();
    c.batch_execute("INSERT INTO t VALUES (1)").await.unwrap();
    let trickle_error = wait_runs(&c, "trickle_error", 2).await;
    let elapsed = t0.elapsed();
    let rss_growth_mb = rss_kb().saturating_sub(rss_before) / 1024;

    let endless_error = runs_of(&c, "endless_error").await;
    let base = format!("http://{}", server.addr);
    for (_, status, ms, error) in &endless_error {
        assert!(status == "error" || status == "dead", "{endless_error:?}");
        assert_eq!(
            error,
            &format!(
                "POST {base}/endless-error answered 500 Internal Server Error: {}",
                "x".repeat(200)
            )
        );
        assert!(*ms < 2000, "{endless_error:?}");
    }
    let endless_ok = runs_of(&c, "endless_ok").await;
    assert_eq!(endless_ok.len(), 1);
    assert_eq!(endless_ok[0].1, "ok", "{endless_ok:?}");
    assert!(endless_ok[0].2 < 2000, "{endless_ok:?}");
    for runs in [runs_of(&c, "trickle").await, trickle_error] {
        assert_eq!(runs.len(), 2, "{runs:?}");
        assert_eq!(
            (runs[0].1.as_str(), runs[0].3.as_str()),
            ("timeout", "timed out after 400 ms")
        );
        assert_eq!(runs[1].1, "dead");
        assert!(runs.iter().all(|r| r.2 < 1000), "{runs:?}");
    }
    // Two endless bodies and four timed-out trickles: a few seconds, not the bodies' length.
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    assert!(rss_growth_mb < 200, "RSS grew by {rss_growth_mb} MB");
    service.stop().await;
}
