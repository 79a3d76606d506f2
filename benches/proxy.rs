//! Proxy throughput: pgbench directly against PostgreSQL, through pgfire's proxy, and through
//! PgBouncer (session pooling), interleaved round by round in one run.
//!
//! `cargo bench --bench proxy` (env: PGFIRE_BENCH_SECONDS per pgbench run, default 5;
//! PGFIRE_BENCH_ROUNDS, default 2; PGFIRE_BENCH_WORKLOADS, PGFIRE_BENCH_MODES and
//! PGFIRE_BENCH_CLIENTS, comma-separated subsets of `select-only,tpcb-like`, `simple,extended`
//! and `8,50`; PGFIRE_BENCH_UPSTREAM=unix to have both proxies reach PostgreSQL over its Unix
//! socket instead of TCP). pgfire is the real `pgfire run --no-consumer` binary. Needs pgbench and
//! PgBouncer (`apt-get install pgbouncer`).

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use pgfire::embedded::{free_port, running_as_root, Cluster, ClusterOptions};

const TARGETS: [&str; 3] = ["direct", "pgfire", "pgbouncer"];

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
    let admin_port = free_port()?;
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
    let pgfire = Command::new(env!("CARGO_BIN_EXE_pgfire"))
        .args([
            "run",
            "--no-consumer",
            "--listen",
            &format!("127.0.0.1:{proxy_port}"),
            "--admin-listen",
            &format!("127.0.0.1:{admin_port}"),
        ])
        .env("DATABASE_URL", &upstream_url)
        .env("PGFIRE_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .map(Killed)?;
    wait_listening(proxy_port, "pgfire")?;

    let bouncer_port = free_port()?;
    let bouncer = start_pgbouncer(
        pgbouncer_bin,
        dir.path(),
        &upstream_host,
        cluster.port,
        bouncer_port,
    )?;

    let ports = [cluster.port, proxy_port, bouncer_port];
    println!(
        "pgfire proxy benchmark: pgbench -T {secs} -j 2, {rounds} rounds, scale 10, PostgreSQL {}, proxies reach it over {}",
        cluster.bin_dir.display(),
        if unix { "its Unix socket" } else { "TCP" }
    );
    // Each proxy's own CPU time per transaction, from /proc: a steadier measure of its cost than
    // throughput on a shared machine.
    let pids = [None, Some(pgfire.0.id()), Some(bouncer.0.id())];
    let tick_us = 1e6 / clock_ticks_per_second();
    let mut tps: BTreeMap<(String, String, u32, usize), Vec<f64>> = BTreeMap::new();
    let mut cpu: BTreeMap<(String, String, u32, usize), Vec<f64>> = BTreeMap::new();
    for round in 0..rounds {
        for &workload in &workloads {
            for &mode in &modes {
                for &clients in &clients_list {
                    // Rotate who goes first each round.
                    for k in 0..3 {
                        let t = (k + round) % 3;
                        let before = pids[t].and_then(cpu_ticks);
                        let (v, txns) =
                            run_pgbench(&pgbench, ports[t], workload, mode, clients, secs)?;
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

fn run_pgbench(
    pgbench: &std::path::Path,
    port: u16,
    workload: &str,
    mode: &str,
    clients: u32,
    secs: u64,
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
    cmd.arg(format!("postgres://postgres@127.0.0.1:{port}/bench"));
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
