//! Delivery throughput and latency: `pgfire run` (the release binary) delivering a backlog of
//! row events to a webhook receiver written in Rust (axum/hyper, in this process) that answers at
//! once, to one that takes 5 ms per request, and to NATS JetStream (a `nats-server -js` the bench
//! starts); then commit-to-handler latency at 1 000 commits/s for a webhook and a `sql` function.
//!
//! `cargo bench --bench delivery` (env: PGFIRE_BENCH_EVENTS, default 20000; PGFIRE_BENCH_ONLY,
//! e.g. `webhook,slow,nats,latency,bigtxn`; PGFIRE_BENCH_CONCURRENCY, default 64;
//! PGFIRE_BENCH_BIG_ROWS, default 500000: the rows of the one transaction `bigtxn` delivers to
//! the 5 ms receiver, with pgfire's peak RSS).

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use axum::Router;
use pgfire::embedded::{free_port, Cluster, ClusterOptions};

mod common;

#[derive(Default)]
struct Receiver {
    count: AtomicU64,
    first: Mutex<Option<Instant>>,
    last: Mutex<Option<Instant>>,
    /// Commit-to-handler latencies, µs (latency runs only).
    latencies: Mutex<Vec<i64>>,
    delay_ms: AtomicU64,
    measure: std::sync::atomic::AtomicBool,
}

async fn handle(State(r): State<Arc<Receiver>>, body: Bytes) -> &'static str {
    let now = Instant::now();
    if r.measure.load(Ordering::Relaxed) {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
            if let Some(at) = v["occurred_at"]
                .as_str()
                .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
            {
                let us = (chrono::Utc::now() - at.with_timezone(&chrono::Utc))
                    .num_microseconds()
                    .unwrap_or(0);
                r.latencies.lock().unwrap().push(us);
            }
        }
    }
    let d = r.delay_ms.load(Ordering::Relaxed);
    if d > 0 {
        tokio::time::sleep(Duration::from_millis(d)).await;
    }
    r.count.fetch_add(1, Ordering::SeqCst);
    {
        let mut f = r.first.lock().unwrap();
        if f.is_none() {
            *f = Some(now);
        }
    }
    *r.last.lock().unwrap() = Some(Instant::now());
    "ok"
}

fn main() -> anyhow::Result<()> {
    let events: u64 = env_or("PGFIRE_BENCH_EVENTS", 20_000);
    let concurrency: u64 = env_or("PGFIRE_BENCH_CONCURRENCY", 64);
    let only = std::env::var("PGFIRE_BENCH_ONLY").unwrap_or_default();
    let want = |k: &str| only.is_empty() || only.split(',').any(|s| s == k);
    let rt = tokio::runtime::Runtime::new()?;
    let dir = tempfile::Builder::new().prefix("pgfire-bench-").tempdir()?;
    let mut opts = ClusterOptions::new(dir.path().join("data"))
        // fsync off, but synchronous_commit on: the walsender sends only WAL that is flushed, and
        // with synchronous_commit off a commit waits for the WAL writer (up to 200 ms).
        .setting("fsync", "off")
        .setting("shared_buffers", "256MB")
        .setting("max_wal_size", "4GB")
        .setting("wal_sender_timeout", "60s")
        .setting("autovacuum", "off");
    opts.ephemeral = true;
    let cluster = Cluster::start(&opts)?;
    let bin = env!("CARGO_BIN_EXE_pgfire");
    let receiver = Arc::new(Receiver::default());
    let hook_addr = rt.block_on(async {
        let app = Router::new()
            .route("/{*p}", post(handle))
            .with_state(receiver.clone());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let a = l.local_addr()?;
        tokio::spawn(async move { axum::serve(l, app).await });
        anyhow::Ok(a)
    })?;
    let hook = format!("http://{hook_addr}/hook");
    println!(
        "pgfire delivery benchmark: {events} events per throughput run, concurrency {concurrency}, {} cores",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    let mut table = Vec::new();
    let last_peak = std::sync::Mutex::new(0u64);

    let throughput = |name: &str,
                      kind: &str,
                      target: &str,
                      delay_ms: u64,
                      n: u64,
                      txn_rows: u64,
                      nats_url: Option<&str>|
     -> anyhow::Result<f64> {
        let db = format!("bench_{name}");
        cluster.psql("postgres", &format!("CREATE DATABASE {db}"))?;
        let url = cluster.url(&db);
        rt.block_on(async {
            let c = pgfire::db::connect(&url).await?;
            pgfire::install::install(&c, Some(&format!("pgfire_{name}")), pgfire::install::MIGRATIONS).await?;
            let nats = nats_url
                .map(|u| format!("INSERT INTO pgfire.settings (key, value) VALUES ('nats.url', '{u}');"))
                .unwrap_or_default();
            c.batch_execute(&format!(
                "CREATE TABLE items (id bigserial PRIMARY KEY, name text NOT NULL, amount numeric NOT NULL);
                 INSERT INTO pgfire.sources (table_name, kind) VALUES ('items', 'record');
                 {nats}
                 INSERT INTO pgfire.functions (name, kind, target, concurrency) VALUES ('f', '{kind}', '{target}', {concurrency});
                 INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('POST_RECORD_CREATE', 'f');"
            ))
            .await?;
            // The backlog, in transactions of `txn_rows` rows, while pgfire is not running.
            c.batch_execute(&format!(
                "DO $$ BEGIN FOR b IN 0..{} LOOP INSERT INTO items (name, amount)
                   SELECT 'item ' || i, i * 1.25 FROM generate_series(b * {txn_rows} + 1, b * {txn_rows} + {txn_rows}) i; COMMIT; END LOOP; END $$",
                (n / txn_rows).max(1) - 1
            ))
            .await?;
            anyhow::Ok(())
        })?;
        receiver.count.store(0, Ordering::SeqCst);
        *receiver.first.lock().unwrap() = None;
        receiver.delay_ms.store(delay_ms, Ordering::SeqCst);
        let t0 = Instant::now();
        let mut child = spawn(bin, &url)?;
        let secs = rt.block_on(async {
            let c = pgfire::db::connect(&url).await?;
            loop {
                let done: i64 = if kind == "nats" {
                    c.query_one("SELECT count(*) FROM pgfire.executions WHERE status = 'ok'", &[]).await?.get(0)
                } else {
                    receiver.count.load(Ordering::SeqCst) as i64
                };
                if done >= n as i64 {
                    break;
                }
                anyhow::ensure!(t0.elapsed() < Duration::from_secs(600), "{name}: only {done} of {n} delivered in 10 minutes");
                tokio::time::sleep(Duration::from_millis(if kind == "nats" { 100 } else { 5 })).await;
            }
            let secs = if kind == "nats" {
                // First to last run, from the history.
                let r = c.query_one("SELECT extract(epoch FROM max(started_at + duration_ms * interval '1 millisecond') - min(started_at))::float8 FROM pgfire.executions", &[]).await?;
                r.get::<_, f64>(0)
            } else {
                let f = receiver.first.lock().unwrap().unwrap_or(t0);
                let l = receiver.last.lock().unwrap().unwrap_or(t0);
                (l - f).as_secs_f64()
            };
            anyhow::Ok(secs)
        })?;
        let peak_mb = common::peak_rss_kb(child.id()) / 1024;
        let _ = child.kill();
        let _ = child.wait();
        let rate = n as f64 / secs.max(1e-6);
        println!("  {name:<22} {rate:>9.0} events/s ({n} events, {secs:.2} s first to last, pgfire peak RSS {peak_mb} MB)");
        *last_peak.lock().unwrap() = peak_mb;
        Ok(rate)
    };

    if want("webhook") {
        let r = throughput("webhook", "webhook", &hook, 0, events, 100, None)?;
        table.push((
            "webhook, immediate Rust receiver".to_string(),
            format!("{r:.0} events/s"),
        ));
    }
    if want("slow") {
        let n = (events / 2).max(1000);
        let r = throughput("slow", "webhook", &hook, 5, n, 100, None)?;
        table.push((
            "webhook, receiver taking 5 ms".to_string(),
            format!("{r:.0} events/s"),
        ));
    }
    if want("nats") {
        let port = free_port()?;
        let store = tempfile::tempdir()?;
        let mut nats = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        std::thread::sleep(Duration::from_millis(500));
        let url = format!("nats://127.0.0.1:{port}");
        let r = throughput("nats", "nats", "bench", 0, events * 2, 100, Some(&url));
        let _ = nats.kill();
        let _ = nats.wait();
        let r = r?;
        table.push((
            "NATS JetStream (acked publishes)".to_string(),
            format!("{r:.0} events/s"),
        ));
    }
    if want("bigtxn") {
        let n = env_or("PGFIRE_BENCH_BIG_ROWS", 500_000);
        let r = throughput("bigtxn", "webhook", &hook, 5, n, n, None)?;
        let peak = *last_peak.lock().unwrap();
        table.push((
            format!("one {n}-row transaction, receiver taking 5 ms"),
            format!("{r:.0} events/s, pgfire peak RSS {peak} MB"),
        ));
    }
    if want("latency") {
        for kind in ["webhook", "sql"] {
            let (p50, p99, n) = latency(&rt, &cluster, bin, &receiver, &hook, kind)?;
            println!(
                "  latency {kind:<14} p50 {p50:.2} ms, p99 {p99:.2} ms ({n} commits at 1000/s)"
            );
            table.push((
                format!("commit → {kind} handler at 1 000 commits/s"),
                format!("p50 {p50:.2} ms, p99 {p99:.2} ms"),
            ));
        }
    }
    println!("\n| delivery | figure |\n|---|---:|");
    for (k, v) in &table {
        println!("| {k} | {v} |");
    }
    println!("(function concurrency {concurrency}; backlogs of 100-row transactions; PostgreSQL fsync off)");
    cluster.stop();
    Ok(())
}

/// 5 s of single-row commits at 1 000/s while pgfire runs; commit-to-handler latency
/// percentiles in ms.
fn latency(
    rt: &tokio::runtime::Runtime,
    cluster: &Cluster,
    bin: &str,
    receiver: &Arc<Receiver>,
    hook: &str,
    kind: &str,
) -> anyhow::Result<(f64, f64, usize)> {
    let db = format!("bench_latency_{kind}");
    cluster.psql("postgres", &format!("CREATE DATABASE {db}"))?;
    let url = cluster.url(&db);
    // PGFIRE_BENCH_HOOK_URL: another receiver for the webhook latency run (it measures itself).
    let other = std::env::var("PGFIRE_BENCH_HOOK_URL").ok();
    let hook = other.as_deref().unwrap_or(hook);
    let target = if kind == "sql" { "seen" } else { hook };
    rt.block_on(async {
        let c = pgfire::db::connect(&url).await?;
        pgfire::install::install(&c, Some(&format!("pgfire_lat_{kind}")), pgfire::install::MIGRATIONS).await?;
        c.batch_execute(&format!(
            "CREATE TABLE items (id bigserial PRIMARY KEY, name text NOT NULL);
             CREATE TABLE lat (us int8);
             CREATE FUNCTION seen(e jsonb) RETURNS void LANGUAGE sql AS $$
               INSERT INTO lat VALUES ((extract(epoch FROM clock_timestamp() - (e->>'occurred_at')::timestamptz) * 1e6)::int8) $$;
             INSERT INTO pgfire.sources (table_name, kind) VALUES ('items', 'record');
             INSERT INTO pgfire.functions (name, kind, target) VALUES ('f', '{kind}', '{target}');
             INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('POST_RECORD_CREATE', 'f');"
        ))
        .await?;
        anyhow::Ok(())
    })?;
    receiver.delay_ms.store(0, Ordering::SeqCst);
    receiver.latencies.lock().unwrap().clear();
    receiver.measure.store(kind == "webhook", Ordering::SeqCst);
    let mut child = spawn(bin, &url)?;
    let result = rt.block_on(async {
        let c = pgfire::db::connect(&url).await?;
        // Warm up until pgfire streams.
        c.batch_execute("INSERT INTO items (name) VALUES ('warm')")
            .await?;
        let t0 = Instant::now();
        loop {
            let n = if kind == "sql" {
                c.query_one("SELECT count(*) FROM lat", &[])
                    .await?
                    .get::<_, i64>(0) as usize
            } else {
                receiver.latencies.lock().unwrap().len()
            };
            if n > 0 || (other.is_some() && t0.elapsed() > Duration::from_secs(3)) {
                break;
            }
            anyhow::ensure!(
                t0.elapsed() < Duration::from_secs(30),
                "pgfire did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        c.batch_execute("TRUNCATE lat").await?;
        receiver.latencies.lock().unwrap().clear();
        let commits = 5000;
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let insert = c.prepare("INSERT INTO items (name) VALUES ('x')").await?;
        for _ in 0..commits {
            tick.tick().await;
            c.execute(&insert, &[]).await?;
        }
        let t1 = Instant::now();
        let mut lat: Vec<i64> = loop {
            if other.is_some() && kind == "webhook" {
                // The other receiver keeps its own figures.
                tokio::time::sleep(Duration::from_secs(2)).await;
                break vec![0];
            }
            let v: Vec<i64> = if kind == "sql" {
                c.query("SELECT us FROM lat", &[])
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect()
            } else {
                receiver.latencies.lock().unwrap().clone()
            };
            if v.len() >= commits {
                break v;
            }
            anyhow::ensure!(
                t1.elapsed() < Duration::from_secs(60),
                "only {} of {commits} delivered",
                v.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        lat.sort();
        let pct =
            |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1000.0;
        anyhow::Ok((pct(0.5), pct(0.99), lat.len()))
    });
    receiver.measure.store(false, Ordering::SeqCst);
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn spawn(bin: &str, url: &str) -> anyhow::Result<Child> {
    Ok(Command::new(bin)
        .args([
            "run",
            "--no-proxy",
            "--admin-listen",
            &format!("127.0.0.1:{}", free_port()?),
        ])
        .env("DATABASE_URL", url)
        .env("PGFIRE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?)
}

fn env_or(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
