//! Function kinds in isolation: each `sql` run starts from a clean session, a runaway `sql` run
//! is ended without holding up others.

use std::time::Duration;

use crate::support::{caught_up, eventually, install_pgfire, start_service, texts, TestDb};

const WAIT: Duration = Duration::from_secs(30);

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
    let statuses = texts(&c, "SELECT DISTINCT status::text FROM pgfire.executions").await;
    assert_eq!(statuses, ["ok"]);
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
    for (i, (attempt, status, ms, error)) in runaway.iter().enumerate() {
        let expected = if i % 2 == 0 {
            (1, "timeout")
        } else {
            (2, "dead")
        };
        assert_eq!((*attempt, status.as_str()), expected, "{runaway:?}");
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
