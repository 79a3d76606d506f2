//! Proxy throughput: pgbench directly against PostgreSQL, through pgfire's proxy, and through
//! PgBouncer (session pooling), interleaved round by round in one run.
//!
//! `cargo bench --bench proxy` (env: PGFIRE_BENCH_SECONDS per pgbench run, default 5;
//! PGFIRE_BENCH_ROUNDS, default 2; PGFIRE_BENCH_WORKLOADS, PGFIRE_BENCH_MODES and
//! PGFIRE_BENCH_CLIENTS, comma-separated subsets of `select-only,tpcb-like`, `simple,extended`
//! and `8,50`; PGFIRE_BENCH_UPSTREAM=unix to have both proxies reach PostgreSQL over its Unix
//! socket instead of TCP; PGFIRE_BENCH_BIN, another pgfire binary for the proxies, for an A/B of
//! two builds). pgfire is the real `pgfire run --no-consumer` binary. Needs pgbench and
//! PgBouncer (`apt-get install pgbouncer`).
//!
//! PRE hooks, in the same run (PGFIRE_BENCH_PRE=0 leaves them out): TPC-B-like
//! through a pgfire whose database has a `sql` PRE function (allowing) on `pgbench_accounts`
//! updates, and one with a `webhook` PRE function on a local keep-alive HTTP receiver; select-only
//! through a pgfire whose database has PRE subscriptions on another table. Each is a copy of the
//! benchmark database with pgfire installed, served by a pgfire of its own; "pgfire" is the proxy
//! without hooks. Added latency per held write: the median transaction latency (pgbench -l) less
//! the one without hooks (each TPC-B transaction holds one write).

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use pgfire::embedded::{free_port, running_as_root, Cluster, ClusterOptions};

const TARGETS: [&str; 6] = [
    "direct",
    "pgfire",
    "pgbouncer",
    "pgfire+sql",
    "pgfire+webhook",
    "pgfire+other",
];

fn main() -> anyhow::Result<()> {
    let secs: u64 = std::env::var("PGFIRE_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let rounds: usize = std::env::var("PGFIRE_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let pgbouncer_bin = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .ok_or_else(|| anyhow::anyhow!("PgBouncer not found: apt-get install pgbouncer"))?;

    let dir = tempfile::Builder::new()
        .prefix("pgfire-proxy-bench-")
        .tempdir()?;
    let mut opts = ClusterOptions::new(dir.path().join("data"))
        .setting("fsync", "off")
        .setting("synchronous_commit", "off")
        .setting("shared_buffers", "256MB")
        .setting("max_connections", "300");
    opts.ephemeral = true;
    let cluster = Cluster::start(&opts)?;
    cluster.psql("postgres", "CREATE DATABASE bench")?;
    let pgbench = cluster.bin_dir.join("pgbench");
    let init = Command::new(&pgbench)
        .args(["-i", "-s", "10", "-q", &cluster.url("bench")])
        .output()?;
    anyhow::ensure!(
        init.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&init.stderr)
    );

    // PGFIRE_BENCH_BIN: another pgfire binary to serve the proxies (an A/B of two builds).
    let pgfire_bin = std::env::var("PGFIRE_BENCH_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_pgfire").to_string());
    let with_pre = std::env::var("PGFIRE_BENCH_PRE").map_or(true, |v| v != "0");
    let receiver = if with_pre {
        Some(allow_receiver()?)
    } else {
        None
    };
    if let Some(hook_port) = receiver {
        for (db, slot) in [
            ("bench_sql", "pgfire_sql"),
            ("bench_hook", "pgfire_hook"),
            ("bench_other", "pgfire_other"),
        ] {
            cluster.psql("postgres", &format!("CREATE DATABASE {db} TEMPLATE bench"))?;
            let out = Command::new(env!("CARGO_BIN_EXE_pgfire"))
                .args(["install", "--slot", slot])
                .env("DATABASE_URL", cluster.url(db))
                .output()?;
            anyhow::ensure!(
                out.status.success(),
                "pgfire install: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let (table, kind, event) = match db {
                "bench_other" => {
                    cluster.psql(db, "CREATE TABLE users (id serial PRIMARY KEY, email text)")?;
                    ("users", "user", "PRE_USER_CREATE")
                }
                _ => ("pgbench_accounts", "record", "PRE_RECORD_UPDATE"),
            };
            let function = match db {
                "bench_hook" => format!(
                    "INSERT INTO pgfire.functions (name, kind, target) VALUES ('allow', 'webhook', 'http://127.0.0.1:{hook_port}/pre')"
                ),
                _ => "INSERT INTO pgfire.functions (name, kind, target) VALUES ('allow', 'sql', 'allow_all')".into(),
            };
            cluster.psql(
                db,
                &format!(
                    "CREATE FUNCTION allow_all(e jsonb) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{{\"allow\": true}}'::jsonb $$;
                     INSERT INTO pgfire.sources (table_name, kind) VALUES ('{table}', '{kind}');
                     -- PRE hooks need no old values in the WAL: keep the table as the others have it.
                     ALTER TABLE {table} REPLICA IDENTITY DEFAULT;
                     {function};
                     INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('{event}', 'allow');"
                ),
            )?;
        }
    }

    let list = |var: &str, all: &[&'static str]| -> Vec<&'static str> {
        match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => all
                .iter()
                .copied()
                .filter(|a| v.split(',').any(|w| w.trim() == *a))
                .collect(),
            _ => all.to_vec(),
        }
    };
    let workloads = list("PGFIRE_BENCH_WORKLOADS", &["select-only", "tpcb-like"]);
    let modes = list("PGFIRE_BENCH_MODES", &["simple", "extended"]);
    let clients_list: Vec<u32> = list("PGFIRE_BENCH_CLIENTS", &["8", "50"])
        .iter()
        .map(|c| c.parse().unwrap_or(8))
        .collect();
    let unix = std::env::var("PGFIRE_BENCH_UPSTREAM").is_ok_and(|v| v == "unix");
    // Where both proxies find PostgreSQL.
    let upstream_host = if unix {
        cluster.socket_dir.display().to_string()
    } else {
        "127.0.0.1".to_string()
    };

    // pgfire's proxy: the real binary, as users run it.
    let proxy_port = free_port()?;
    let upstream_url = format!(
        "postgres://postgres@{}:{}/bench",
        if unix {
            format!(
                "%2F{}",
                upstream_host.trim_start_matches('/').replace('/', "%2F")
            )
        } else {
            upstream_host.clone()
        },
        cluster.port
    );
    let launch = |url: &str, port: u16| -> anyhow::Result<Killed> {
        let admin_port = free_port()?;
        let child = Command::new(&pgfire_bin)
            .args([
                "run",
                "--no-consumer",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--admin-listen",
                &format!("127.0.0.1:{admin_port}"),
            ])
            .env("DATABASE_URL", url)
            .env("PGFIRE_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .map(Killed)?;
        wait_listening(port, "pgfire")?;
        Ok(child)
    };
    let pgfire = launch(&upstream_url, proxy_port)?;
    let mut pre_procs = Vec::new();
    let mut pre_ports = [0u16; 3];
    if with_pre {
        for (i, db) in ["bench_sql", "bench_hook", "bench_other"]
            .iter()
            .enumerate()
        {
            let port = free_port()?;
            let url = upstream_url.replace("/bench", &format!("/{db}"));
            pre_procs.push(launch(&url, port)?);
            pre_ports[i] = port;
        }
    }

    let bouncer_port = free_port()?;
    let bouncer = start_pgbouncer(
        pgbouncer_bin,
        dir.path(),
        &upstream_host,
        cluster.port,
        bouncer_port,
    )?;

    let ports = [
        cluster.port,
        proxy_port,
        bouncer_port,
        pre_ports[0],
        pre_ports[1],
        pre_ports[2],
    ];
    let dbs = [
        "bench",
        "bench",
        "bench",
        "bench_sql",
        "bench_hook",
        "bench_other",
    ];
    // Which targets run a workload: the PRE ones where they mean something.
    let runs = |t: usize, workload: &str, _mode: &str| match t {
        0..=2 => true,
        3 | 4 => with_pre && workload == "tpcb-like",
        _ => with_pre && workload == "select-only",
    };
    let logs = dir.path().join("latency");
    std::fs::create_dir_all(&logs)?;
    println!(
        "pgfire proxy benchmark: pgbench -T {secs} -j 2, {rounds} rounds, scale 10, PostgreSQL {}, proxies reach it over {}",
        cluster.bin_dir.display(),
        if unix { "its Unix socket" } else { "TCP" }
    );
    // Each proxy's own CPU time per transaction, from /proc: a steadier measure of its cost than
    // throughput on a shared machine.
    let pid_of = |i: usize| pre_procs.get(i).map(|p: &Killed| p.0.id());
    let pids = [
        None,
        Some(pgfire.0.id()),
        Some(bouncer.0.id()),
        pid_of(0),
        pid_of(1),
        pid_of(2),
    ];
    let tick_us = 1e6 / clock_ticks_per_second();
    let mut tps: BTreeMap<(String, String, u32, usize), Vec<f64>> = BTreeMap::new();
    let mut cpu: BTreeMap<(String, String, u32, usize), Vec<f64>> = BTreeMap::new();
    let mut p50: BTreeMap<(String, String, u32, usize), Vec<f64>> = BTreeMap::new();
    for round in 0..rounds {
        for &workload in &workloads {
            for &mode in &modes {
                for &clients in &clients_list {
                    // Rotate who goes first each round.
                    for k in 0..TARGETS.len() {
                        let t = (k + round) % TARGETS.len();
                        if !runs(t, workload, mode) {
                            continue;
                        }
                        let before = pids[t].and_then(cpu_ticks);
                        let log = (workload == "tpcb-like").then(|| logs.join(TARGETS[t]));
                        let (v, txns) = run_pgbench(
                            &pgbench,
                            ports[t],
                            dbs[t],
                            workload,
                            mode,
                            clients,
                            secs,
                            log.as_deref(),
                        )?;
                        if let Some(prefix) = &log {
                            if let Some(ms) = median_latency_ms(prefix)? {
                                p50.entry((workload.to_string(), mode.to_string(), clients, t))
                                    .or_default()
                                    .push(ms);
                            }
                        }
                        let used = before
                            .zip(pids[t].and_then(cpu_ticks))
                            .map(|(a, b)| (b - a) as f64 * tick_us / txns.max(1) as f64);
                        let key = (workload.to_string(), mode.to_string(), clients, t);
                        match used {
                            Some(us) => {
                                println!("  round {round}: {workload:<11} {mode:<8} -c {clients:<2} {:<9} {v:>9.0} tps {us:>6.1} µs CPU/txn", TARGETS[t]);
                                cpu.entry(key.clone()).or_default().push(us);
                            }
                            None => println!("  round {round}: {workload:<11} {mode:<8} -c {clients:<2} {:<9} {v:>9.0} tps", TARGETS[t]),
                        }
                        tps.entry(key).or_default().push(v);
                    }
                }
            }
        }
    }

    println!("\n| workload | protocol | clients | direct tps | pgfire tps | PgBouncer tps | pgfire / direct | pgfire / PgBouncer | CPU µs/txn pgfire | CPU µs/txn PgBouncer |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &workload in &workloads {
        for &mode in &modes {
            for &clients in &clients_list {
                let m = |t: usize| {
                    median(
                        tps.get(&(workload.to_string(), mode.to_string(), clients, t))
                            .cloned()
                            .unwrap_or_default(),
                    )
                };
                let (d, p, b) = (m(0), m(1), m(2));
                let c = |t: usize| {
                    median(
                        cpu.get(&(workload.to_string(), mode.to_string(), clients, t))
                            .cloned()
                            .unwrap_or_default(),
                    )
                };
                println!(
                    "| {workload} | {mode} | {clients} | {d:.0} | {p:.0} | {b:.0} | {:.2}x | {:.2}x | {:.1} | {:.1} |",
                    p / d,
                    p / b,
                    c(1),
                    c(2)
                );
            }
        }
    }
    println!(
        "(medians of {rounds} rounds of {secs} s; PgBouncer {} in session mode)",
        pgbouncer_version(pgbouncer_bin)
    );
    if with_pre {
        let get = |m: &BTreeMap<(String, String, u32, usize), Vec<f64>>,
                   w: &str,
                   mode: &str,
                   c: u32,
                   t: usize| {
            median(
                m.get(&(w.to_string(), mode.to_string(), c, t))
                    .cloned()
                    .unwrap_or_default(),
            )
        };
        println!("\nPRE hooks, TPC-B-like, one held write per transaction:");
        println!("| protocol | clients | pgfire tps | +sql tps | +sql / pgfire | +webhook tps | +webhook / pgfire | p50 ms pgfire | p50 added +sql | p50 added +webhook | CPU µs/txn pgfire | +sql | +webhook |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for (&mode, &clients) in modes
            .iter()
            .flat_map(|m| clients_list.iter().map(move |c| (m, c)))
        {
            if !workloads.contains(&"tpcb-like") {
                break;
            }
            let t = |i| get(&tps, "tpcb-like", mode, clients, i);
            let l = |i| get(&p50, "tpcb-like", mode, clients, i);
            let c = |i| get(&cpu, "tpcb-like", mode, clients, i);
            println!(
                "| {mode} | {clients} | {:.0} | {:.0} | {:.2}x | {:.0} | {:.2}x | {:.2} | {:.2} ms | {:.2} ms | {:.1} | {:.1} | {:.1} |",
                t(1),
                t(3),
                t(3) / t(1),
                t(4),
                t(4) / t(1),
                l(1),
                l(3) - l(1),
                l(4) - l(1),
                c(1),
                c(3),
                c(4)
            );
        }
        println!("\nPRE hooks on another table, select-only:");
        println!("| protocol | clients | pgfire tps | +other tps | +other / pgfire | CPU µs/txn pgfire | +other | PgBouncer |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|");
        for &mode in &modes {
            for &clients in &clients_list {
                if !workloads.contains(&"select-only") {
                    break;
                }
                let t = |i| get(&tps, "select-only", mode, clients, i);
                let c = |i| get(&cpu, "select-only", mode, clients, i);
                println!(
                    "| {mode} | {clients} | {:.0} | {:.0} | {:.2}x | {:.1} | {:.1} | {:.1} |",
                    t(1),
                    t(5),
                    t(5) / t(1),
                    c(1),
                    c(5),
                    c(2)
                );
            }
        }
    }
    drop(pre_procs);

    drop(pgfire);
    drop(bouncer);
    cluster.stop();
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[allow(clippy::too_many_arguments)]
fn run_pgbench(
    pgbench: &std::path::Path,
    port: u16,
    db: &str,
    workload: &str,
    mode: &str,
    clients: u32,
    secs: u64,
    log: Option<&std::path::Path>,
) -> anyhow::Result<(f64, u64)> {
    let mut cmd = Command::new(pgbench);
    cmd.args([
        "-n",
        "-j",
        "2",
        "-M",
        mode,
        "-c",
        &clients.to_string(),
        "-T",
        &secs.to_string(),
    ]);
    if workload == "select-only" {
        cmd.arg("-S");
    }
    if let Some(prefix) = log {
        cmd.arg("-l")
            .arg(format!("--log-prefix={}", prefix.display()));
    }
    cmd.arg(format!("postgres://postgres@127.0.0.1:{port}/{db}"));
    let out = cmd.output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "pgbench on port {port}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tps = text
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no tps in pgbench output: {text}"))?;
    let txns = text
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|l| l.split(['/', ' ']).next())
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no transaction count in pgbench output: {text}"))?;
    Ok((tps, txns))
}

/// The median transaction latency of the pgbench logs written with `prefix` (their third field,
/// in µs), in ms; the logs are removed.
fn median_latency_ms(prefix: &std::path::Path) -> anyhow::Result<Option<f64>> {
    let (Some(dir), Some(stem)) = (prefix.parent(), prefix.file_name()) else {
        return Ok(None);
    };
    let stem = stem.to_string_lossy().into_owned();
    let mut lat = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !name.starts_with(&format!("{stem}.")) {
            continue;
        }
        for line in std::fs::read_to_string(&path)?.lines() {
            if let Some(us) = line
                .split_whitespace()
                .nth(2)
                .and_then(|v| v.parse::<f64>().ok())
            {
                lat.push(us / 1000.0);
            }
        }
        std::fs::remove_file(&path)?;
    }
    Ok((!lat.is_empty()).then(|| median(lat)))
}

/// A local HTTP/1.1 receiver (keep-alive) that answers every POST with `{"allow": true}`: the
/// webhook PRE function's endpoint. Returns its port.
fn allow_receiver() -> anyhow::Result<u16> {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = stream.set_nodelay(true);
                let Ok(mut out) = stream.try_clone() else {
                    return;
                };
                let mut reader = BufReader::new(stream);
                loop {
                    let mut length = 0usize;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        match reader.read_line(&mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        if line == "\r\n" {
                            break;
                        }
                        let lower = line.to_ascii_lowercase();
                        if let Some(v) = lower.strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; length];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    let answer = r#"{"allow": true}"#;
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
                        answer.len()
                    );
                    if out.write_all(response.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(port)
}

/// User plus system CPU time of a process so far, in clock ticks (/proc/PID/stat).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses: utime and stime are the 12th and
    // 13th of them.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut f = rest.split_whitespace().skip(11);
    Some(f.next()?.parse::<u64>().ok()? + f.next()?.parse::<u64>().ok()?)
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn start_pgbouncer(
    bin: &str,
    dir: &std::path::Path,
    pg_host: &str,
    pg_port: u16,
    port: u16,
) -> anyhow::Result<Killed> {
    let dir = dir.join("pgbouncer");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("userlist.txt"), "\"postgres\" \"\"\n")?;
    let ini = dir.join("pgbouncer.ini");
    std::fs::write(
        &ini,
        format!(
            "[databases]\n* = host={pg_host} port={pg_port}\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
             unix_socket_dir =\nauth_type = trust\nauth_file = {users}\npool_mode = session\nmax_client_conn = 500\n\
             default_pool_size = 100\nlogfile = {log}\nignore_startup_parameters = extra_float_digits\n",
            users = dir.join("userlist.txt").display(),
            log = dir.join("pgbouncer.log").display(),
        ),
    )?;
    let mut cmd = Command::new(bin);
    if running_as_root() {
        // PgBouncer refuses root; run it as `postgres` directly (not under runuser, so that
        // killing the child kills PgBouncer itself).
        let id = |flag: &str| -> anyhow::Result<u32> {
            let out = Command::new("id").args([flag, "postgres"]).output()?;
            Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
        };
        Command::new("chown")
            .arg("-R")
            .arg("postgres:")
            .arg(&dir)
            .status()?;
        cmd.uid(id("-u")?).gid(id("-g")?);
    }
    let child = Killed(
        cmd.arg(&ini)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    wait_listening(port, "PgBouncer")
        .map_err(|e| anyhow::anyhow!("{e}; see {}", dir.join("pgbouncer.log").display()))?;
    Ok(child)
}

/// A child process killed when dropped, on every path out of the benchmark.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_listening(port: u16, what: &str) -> anyhow::Result<()> {
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("{what} did not start listening on port {port}")
}

fn pgbouncer_version(bin: &str) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| {
            s.lines()
                .next()
                .map(|l| l.trim_start_matches("PgBouncer ").to_string())
        })
        .unwrap_or_default()
}
