//! CDC throughput: pgfire decoding and dispatching a backlog of inserts to a no-op function,
//! against `pg_recvlogical` draining the same backlog with the same pgoutput options, side by
//! side in one run, for three shapes of transactions.
//!
//! `cargo bench --bench cdc` (env: PGFIRE_BENCH_ROWS, default 500000; PGFIRE_BENCH_ROUNDS,
//! default 2, run in A-B-B-A order; PGFIRE_BENCH_SHAPES, e.g. `one,hundred`, default all three).
//! The transaction larger than memory: `PGFIRE_BENCH_ROWS=3000000 PGFIRE_BENCH_SHAPES=one
//! PGFIRE_BENCH_ROUNDS=1 cargo bench --bench cdc` (pgfire spills beyond 128 MiB; peak RSS shown).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pgfire::embedded::{free_port, Cluster, ClusterOptions};

mod common;

#[derive(Clone, Copy)]
enum Shape {
    Single,
    Hundred,
    One,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Single => "single-row transactions",
            Shape::Hundred => "100-row transactions",
            Shape::One => "one big transaction",
        }
    }
    fn key(self) -> &'static str {
        match self {
            Shape::Single => "single",
            Shape::Hundred => "hundred",
            Shape::One => "one",
        }
    }
    fn load_sql(self, rows: u64) -> String {
        let insert =
            "INSERT INTO items (name, amount, created_at) VALUES ('item ' || i, i * 1.25, now())";
        match self {
            Shape::Single => format!("DO $$ BEGIN FOR i IN 1..{rows} LOOP {insert}; COMMIT; END LOOP; END $$"),
            Shape::Hundred => format!(
                "DO $$ BEGIN FOR b IN 0..{} LOOP INSERT INTO items (name, amount, created_at)
                   SELECT 'item ' || i, i * 1.25, now() FROM generate_series(b * 100 + 1, b * 100 + 100) i; COMMIT; END LOOP; END $$",
                rows / 100 - 1
            ),
            Shape::One => format!("INSERT INTO items (name, amount, created_at) SELECT 'item ' || i, i * 1.25, now() FROM generate_series(1, {rows}) i"),
        }
    }
}

const OPTIONS: [&str; 4] = [
    "proto_version=2",
    "publication_names=pgfire",
    "messages=true",
    "streaming=on",
];

fn main() -> anyhow::Result<()> {
    let rows: u64 = std::env::var("PGFIRE_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500_000);
    let rounds: usize = std::env::var("PGFIRE_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let rt = tokio::runtime::Runtime::new()?;
    let dir = tempfile::Builder::new().prefix("pgfire-bench-").tempdir()?;
    let mut opts = ClusterOptions::new(dir.path().join("data"))
        .setting("fsync", "off")
        .setting("synchronous_commit", "off")
        .setting("shared_buffers", "512MB")
        .setting("max_wal_size", "8GB")
        .setting("checkpoint_timeout", "30min")
        .setting("wal_sender_timeout", "60s")
        .setting("autovacuum", "off");
    opts.ephemeral = true;
    let cluster = Cluster::start(&opts)?;
    // PGFIRE_BENCH_BIN: another pgfire binary to measure (an A/B comparison with another build).
    let bin_env = std::env::var("PGFIRE_BENCH_BIN").ok();
    let bin = bin_env.as_deref().unwrap_or(env!("CARGO_BIN_EXE_pgfire"));
    println!(
        "pgfire CDC benchmark: {rows} inserts per shape, {rounds} rounds (A-B-B-A), PostgreSQL {}",
        cluster.bin_dir.display()
    );

    let mut results = Vec::new();
    let only = std::env::var("PGFIRE_BENCH_SHAPES").unwrap_or_default();
    for shape in [Shape::Single, Shape::Hundred, Shape::One] {
        if !only.is_empty() && !only.split(',').any(|s| s == shape.key()) {
            continue;
        }
        let mut recv = Vec::new();
        let mut fire = Vec::new();
        for r in 0..rounds {
            // A database of its own per round: a pgfire run writes the history of its 500 000
            // runs after the backlog, and a later run on the same database would find that WAL
            // in its walsender's way (pg_recvlogical stops at the backlog's end; pgfire goes on,
            // as in production). Another database's WAL is skipped at once.
            let db = format!("bench_{}_{r}", shape.key());
            let end = load(&cluster, &rt, &db, shape, rows, r)?;
            let url = cluster.url(&db);
            let order: [bool; 2] = if r % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for recv_first in order {
                cluster.psql(&db, "CHECKPOINT")?;
                if recv_first {
                    let secs = run_recvlogical(&cluster, &db, "recv", &end)?;
                    println!(
                        "  round {r}: pg_recvlogical {:>9.0} rows/s ({secs:.2} s)",
                        rows as f64 / secs
                    );
                    recv.push(rows as f64 / secs);
                } else {
                    let (secs, rss) = run_pgfire(bin, &url, "pgfire", &end)?;
                    println!(
                        "  round {r}: pgfire        {:>9.0} rows/s ({secs:.2} s, peak RSS {} MB)",
                        rows as f64 / secs,
                        rss / 1024
                    );
                    fire.push((rows as f64 / secs, rss));
                }
            }
            cluster.psql(
                "postgres",
                &format!("SELECT count(pg_drop_replication_slot(slot_name)) FROM pg_replication_slots WHERE database = '{db}'"),
            )?;
            cluster.psql("postgres", &format!("DROP DATABASE {db}"))?;
        }
        results.push((shape, recv, fire));
    }

    println!("\n| shape ({rows} inserts) | pg_recvlogical rows/s | pgfire rows/s | ratio | pgfire peak RSS |");
    println!("|---|---:|---:|---:|---:|");
    for (shape, recv, fire) in &results {
        let r = median(recv.clone());
        let f = median(fire.iter().map(|x| x.0).collect());
        let rss = fire.iter().map(|x| x.1).max().unwrap_or(0);
        println!(
            "| {} | {r:.0} | {f:.0} | {:.2}x | {} MB |",
            shape.name(),
            f / r,
            rss / 1024
        );
    }
    println!("(medians of {rounds} rounds; pgfire runs a `log` function with logging off, records every run in pgfire.executions)");
    cluster.stop();
    Ok(())
}

/// Create `db` with pgfire installed (slot `pgfire`), a slot `recv` for pg_recvlogical, and the
/// shape's backlog of `rows` inserts; the backlog's end, flushed.
fn load(
    cluster: &Cluster,
    rt: &tokio::runtime::Runtime,
    db: &str,
    shape: Shape,
    rows: u64,
    round: usize,
) -> anyhow::Result<String> {
    cluster.psql("postgres", &format!("CREATE DATABASE {db}"))?;
    let url = cluster.url(db);
    rt.block_on(async {
        let c = pgfire::db::connect(&url).await?;
        pgfire::install::install(&c, Some("pgfire"), pgfire::install::MIGRATIONS).await?;
        c.batch_execute(
            "CREATE TABLE items (id bigserial PRIMARY KEY, name text NOT NULL, amount numeric NOT NULL, created_at timestamptz NOT NULL);
             INSERT INTO pgfire.sources (table_name, kind) VALUES ('items', 'record');
             INSERT INTO pgfire.functions (name, kind) VALUES ('noop', 'log');
             INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('POST_RECORD_CREATE', 'noop');",
        )
        .await?;
        c.batch_execute("SELECT pg_create_logical_replication_slot('recv', 'pgoutput')")
            .await?;
        anyhow::Ok(())
    })?;
    let t0 = Instant::now();
    cluster.psql(db, &shape.load_sql(rows))?;
    let end = cluster.psql(db, "SELECT pg_current_wal_insert_lsn()")?;
    // The backlog must be flushed before anyone reads it.
    while cluster.psql(db, &format!("SELECT pg_current_wal_flush_lsn() >= '{end}'"))? != "t" {
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "\n{} (round {round}): loaded in {:.1} s, backlog ends at {end}",
        shape.name(),
        t0.elapsed().as_secs_f64()
    );
    Ok(end)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Drain the slot to `end` with pg_recvlogical; seconds taken.
fn run_recvlogical(cluster: &Cluster, db: &str, slot: &str, end: &str) -> anyhow::Result<f64> {
    let mut cmd = Command::new(cluster.bin_dir.join("pg_recvlogical"));
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &cluster.port.to_string(),
        "-U",
        "postgres",
        "-d",
        db,
    ])
    .args([
        "--slot",
        slot,
        "--start",
        "--no-loop",
        "-E",
        end,
        "-f",
        "/dev/null",
        "-s",
        "1",
    ]);
    for o in OPTIONS {
        cmd.args(["-o", o]);
    }
    let t0 = Instant::now();
    let out = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).output()?;
    let secs = t0.elapsed().as_secs_f64();
    anyhow::ensure!(
        out.status.success(),
        "pg_recvlogical failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(secs)
}

/// Run `pgfire run` on `slot` until it has settled `end`; seconds taken and peak RSS in kB.
fn run_pgfire(bin: &str, url: &str, slot: &str, end: &str) -> anyhow::Result<(f64, u64)> {
    let admin = free_port()?;
    let target: pgfire::events::Lsn = end.parse().map_err(anyhow::Error::msg)?;
    let t0 = Instant::now();
    let mut child = Command::new(bin)
        .args([
            "run",
            "--no-proxy",
            "--slot",
            slot,
            "--admin-listen",
            &format!("127.0.0.1:{admin}"),
        ])
        .env("DATABASE_URL", url)
        .env(
            "PGFIRE_LOG",
            std::env::var("PGFIRE_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    let metrics = format!("http://127.0.0.1:{admin}/metrics");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let secs = rt.block_on(async {
        let http = reqwest::Client::new();
        // When the whole backlog had arrived (the received position at its end): the rest is
        // pgfire's own work after the last commit, printed with the run.
        let mut received_at = None;
        loop {
            if let Some(status) = child.try_wait()? {
                anyhow::bail!("pgfire exited early: {status}");
            }
            if t0.elapsed() > Duration::from_secs(900) {
                child.kill().ok();
                anyhow::bail!("pgfire did not settle {end} within 15 minutes");
            }
            if let Ok(resp) = http.get(&metrics).send().await {
                let text = resp.text().await.unwrap_or_default();
                let gauge = |name: &str| {
                    text.lines()
                        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .unwrap_or(0)
                };
                if received_at.is_none() && gauge("pgfire_received_lsn") >= target.0 {
                    received_at = Some((t0.elapsed().as_secs_f64(), cpu_seconds(child.id())));
                }
                if gauge("pgfire_settled_lsn") >= target.0 {
                    let secs = t0.elapsed().as_secs_f64();
                    let spilled = gauge("pgfire_spilled_transaction_bytes_total");
                    if spilled > 0 {
                        println!(
                            "  (pgfire spilled {} MB of the transaction to files)",
                            spilled >> 20
                        );
                    }
                    let cpu = cpu_seconds(child.id());
                    if let Some((at, cpu_at)) = received_at {
                        println!(
                            "  (pgfire had received the backlog at {at:.2} s, settled it {:.2} s later; CPU {cpu_at:.2} s, then {:.2} s)",
                            secs - at,
                            cpu - cpu_at
                        );
                    }
                    return Ok(secs);
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })?;
    let rss = common::peak_rss_kb(child.id());
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    child.wait()?;
    Ok((secs, rss))
}

/// CPU time (user and system) the process `pid` has used so far, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces): utime and
    // stime are the 12th and 13th of them, in clock ticks (100 per second on Linux).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    f.iter().sum::<f64>() / 100.0
}
