//! A private PostgreSQL server run from the installed server binaries: what `pgfire dev` and the
//! test suite start. As root, `initdb` and `postgres` run as the `postgres` user (initdb refuses root).
//!
//! The server is started under a small shell watchdog that holds a pipe from this process: when
//! pgfire exits, however it exits, the pipe closes and the watchdog shuts the server down fast.

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("no PostgreSQL server binaries found (looked in $PGFIRE_PG_BINDIR and /usr/lib/postgresql/*/bin); install them, e.g. `apt-get install postgresql`")]
    NoBinaries,
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("PostgreSQL did not become ready within {0:?}; see {1}")]
    NotReady(Duration, PathBuf),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// How to lay out and start a private cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The data directory; created and initialised when it holds no cluster yet.
    pub data_dir: PathBuf,
    /// TCP port on 127.0.0.1; a free one is picked when `None`.
    pub port: Option<u16>,
    /// Extra `name = value` server settings, after the defaults (so they win).
    pub settings: Vec<(String, String)>,
    /// pg_hba.conf lines placed before the default trust lines.
    pub hba: Vec<String>,
    /// Remove the data directory once the server has stopped (tests).
    pub ephemeral: bool,
}

impl ClusterOptions {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            port: None,
            settings: Vec::new(),
            hba: Vec::new(),
            ephemeral: false,
        }
    }

    pub fn setting(mut self, name: &str, value: impl ToString) -> Self {
        self.settings.push((name.to_string(), value.to_string()));
        self
    }
}

/// A running private PostgreSQL server.
#[derive(Debug)]
pub struct Cluster {
    pub data_dir: PathBuf,
    pub socket_dir: PathBuf,
    pub port: u16,
    pub bin_dir: PathBuf,
    watchdog: Child,
    lifeline: Option<ChildStdin>,
}

impl Cluster {
    /// Initialise (if needed) and start the cluster, waiting until it accepts connections.
    pub fn start(opts: &ClusterOptions) -> Result<Cluster, ClusterError> {
        let bin_dir = find_bin_dir()?;
        let root = running_as_root();
        std::fs::create_dir_all(&opts.data_dir)?;
        let data_dir = opts.data_dir.canonicalize()?;
        let socket_dir = data_dir.join("sockets");
        if !data_dir.join("PG_VERSION").exists() {
            initdb(&bin_dir, &data_dir, root)?;
        }
        std::fs::create_dir_all(&socket_dir)?;
        write_hba(&data_dir, &opts.hba)?;
        if root {
            run(
                Command::new("chown")
                    .arg("-R")
                    .arg("postgres:")
                    .arg(&data_dir),
                "chown",
            )?;
            // The postgres user must be able to reach the data directory through its parents.
            for dir in data_dir.ancestors().skip(1) {
                if dir == Path::new("/") {
                    break;
                }
                let _ = Command::new("chmod").arg("o+x").arg(dir).status();
            }
        }
        let port = match opts.port {
            Some(p) => p,
            None => free_port()?,
        };
        let _ = std::fs::remove_file(data_dir.join("postmaster.pid.ready"));
        let mut args: Vec<String> = vec![
            bin_dir.join("postgres").display().to_string(),
            "-D".into(),
            data_dir.display().to_string(),
            "-p".into(),
            port.to_string(),
        ];
        let defaults = [
            ("listen_addresses", "127.0.0.1".to_string()),
            ("unix_socket_directories", socket_dir.display().to_string()),
            ("wal_level", "logical".into()),
            ("max_replication_slots", "64".into()),
            ("max_wal_senders", "64".into()),
            ("max_connections", "300".into()),
            ("wal_sender_timeout", "20s".into()),
            ("logging_collector", "off".into()),
        ];
        for (k, v) in defaults
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .chain(opts.settings.iter().cloned())
        {
            args.push("-c".into());
            args.push(format!("{k}={v}"));
        }
        let log = data_dir.join("server.log");
        let mut cmd = if root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]);
            c
        } else {
            Command::new("env")
        };
        cmd.args(&args);
        // The watchdog runs the server and, when our end of its stdin closes, stops it (fast shutdown).
        let script = format!(
            r#"{cmd} >>"$LOG" 2>&1 </dev/null &
pid=$!
cat >/dev/null
if [ -f "$PGDATA/postmaster.pid" ]; then kill -INT "$(head -n 1 "$PGDATA/postmaster.pid")" 2>/dev/null; fi
wait $pid
if [ "$EPHEMERAL" = 1 ]; then rm -rf "$PGDATA"; fi"#,
            cmd = shell_words(&cmd)
        );
        let mut watchdog = Command::new("sh")
            .arg("-c")
            .arg(script)
            .env("LOG", &log)
            .env("PGDATA", &data_dir)
            .env("EPHEMERAL", if opts.ephemeral { "1" } else { "0" })
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()?;
        let lifeline = watchdog.stdin.take();
        let cluster = Cluster {
            data_dir,
            socket_dir,
            port,
            bin_dir,
            watchdog,
            lifeline,
        };
        cluster.wait_ready(Duration::from_secs(30), &log)?;
        Ok(cluster)
    }

    fn wait_ready(&self, limit: Duration, log: &Path) -> Result<(), ClusterError> {
        let deadline = Instant::now() + limit;
        let pidfile = self.data_dir.join("postmaster.pid");
        while Instant::now() < deadline {
            if let Ok(text) = std::fs::read_to_string(&pidfile) {
                // Line 8 of postmaster.pid is the server status; "ready" once it accepts connections.
                if text.lines().nth(7).map(str::trim) == Some("ready")
                    && text.lines().nth(3).map(str::trim) == Some(&self.port.to_string()[..])
                {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Err(ClusterError::NotReady(limit, log.to_path_buf()))
    }

    /// A `postgres://` URL for `db` as the `postgres` superuser over TCP.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{}", self.port, db)
    }

    /// Run a SQL command with psql against `db` (setup that must not depend on pgfire's own code).
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, ClusterError> {
        let out = Command::new(self.bin_dir.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.socket_dir)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-c",
                sql,
            ])
            .output()?;
        if !out.status.success() {
            return Err(ClusterError::Command {
                what: format!("psql -c {sql:?}"),
                detail: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Stop the server (fast shutdown) and wait for it to exit.
    pub fn stop(mut self) {
        self.shutdown();
    }

    /// Stop the server immediately (`SIGQUIT`, as in a crash) without a checkpoint.
    pub fn crash(&mut self) {
        if let Ok(text) = std::fs::read_to_string(self.data_dir.join("postmaster.pid")) {
            if let Some(pid) = text.lines().next() {
                let _ = Command::new("kill").args(["-QUIT", pid.trim()]).status();
            }
        }
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(mut stdin) = self.lifeline.take() {
            let _ = stdin.flush();
        }
        let _ = self.watchdog.wait();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Where PostgreSQL's server binaries are: `$PGFIRE_PG_BINDIR`, else the newest `/usr/lib/postgresql/*/bin`.
pub fn find_bin_dir() -> Result<PathBuf, ClusterError> {
    if let Ok(dir) = std::env::var("PGFIRE_PG_BINDIR") {
        let dir = PathBuf::from(dir);
        if dir.join("postgres").exists() {
            return Ok(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|_| ClusterError::NoBinaries)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, b)| b)
        .ok_or(ClusterError::NoBinaries)
}

/// True when this process runs as root (uid 0), read from /proc.
pub fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn initdb(bin_dir: &Path, data_dir: &Path, root: bool) -> Result<(), ClusterError> {
    if root {
        run(
            Command::new("chown").arg("postgres:").arg(data_dir),
            "chown",
        )?;
    }
    let mut cmd = if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin_dir.join("initdb"));
        c
    } else {
        Command::new(bin_dir.join("initdb"))
    };
    cmd.arg("-D").arg(data_dir).args([
        "-U",
        "postgres",
        "-A",
        "trust",
        "-E",
        "UTF8",
        "--locale=C",
        "--no-sync",
    ]);
    run(&mut cmd, "initdb")
}

fn write_hba(data_dir: &Path, extra: &[String]) -> Result<(), ClusterError> {
    let mut text = String::from("# written by pgfire\n");
    for line in extra {
        text.push_str(line);
        text.push('\n');
    }
    text.push_str(
        "local all all trust\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n",
    );
    text.push_str("local replication all trust\nhost replication all 127.0.0.1/32 trust\n");
    std::fs::write(data_dir.join("pg_hba.conf"), text)?;
    Ok(())
}

fn run(cmd: &mut Command, what: &str) -> Result<(), ClusterError> {
    let out = cmd.output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ClusterError::Command {
            what: what.to_string(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

fn shell_words(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| format!("'{}'", a.to_string_lossy().replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join(" ")
}
