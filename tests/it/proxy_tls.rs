//! The proxy's upstream leg over TLS: a PostgreSQL with `ssl=on`, a certificate made here and
//! `hostssl ... scram-sha-256`-only rules; psql, tokio-postgres and psycopg authenticate through
//! the proxy with a password (channel binding is never offered to them), PRE hooks block and
//! rewrite, cancel requests travel over TLS too, and a wrong CA, a wrong host name or a server
//! without TLS is a clear FATAL.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgfire::embedded::Cluster;
use pgfire::proxy::{ProxyConfig, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

use crate::support::{count, eventually, texts};
use crate::tls::{tls_cluster_with, Pki};

const PASSWORD: &str = "sekret";

/// A TLS-only cluster where every TCP connection authenticates with SCRAM, the password role
/// `alice` and her database `app`.
fn scram_cluster(data: &Path, pki: &Pki) -> Cluster {
    let cluster = tls_cluster_with(data, pki, &["hostssl all all 127.0.0.1/32 scram-sha-256"]);
    cluster
        .psql(
            "postgres",
            &format!("CREATE ROLE alice LOGIN SUPERUSER PASSWORD '{PASSWORD}'"),
        )
        .unwrap();
    cluster
        .psql("postgres", "CREATE DATABASE app OWNER alice")
        .unwrap();
    cluster
}

/// The database URL pgfire is given: `alice` on `app`, with these TLS parameters.
fn db_url(host: &str, port: u16, tls: &str) -> String {
    format!("postgres://alice:{PASSWORD}@{host}:{port}/app?{tls}")
}

fn verify_full(pki: &Pki, port: u16) -> String {
    db_url(
        "localhost",
        port,
        &format!(
            "sslmode=verify-full&sslrootcert={}",
            pki.path("ca.pem").display()
        ),
    )
}

/// A proxy in front of the database of `url`, stopped when dropped.
struct TlsProxy {
    addr: SocketAddr,
    shutdown: CancellationToken,
}

impl TlsProxy {
    async fn start(url: &str, tune: impl FnOnce(&mut ProxyConfig)) -> TlsProxy {
        crate::support::init_logs();
        let mut config = ProxyConfig::for_database(url).expect("proxy configuration");
        tune(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        tokio::spawn(pgfire::proxy::serve(config, listener, shutdown.clone()));
        TlsProxy { addr, shutdown }
    }

    /// `alice` on `app` through the proxy; the client leg in plain unless `extra` says otherwise.
    fn url(&self, extra: &str) -> String {
        format!("postgres://alice:{PASSWORD}@{}/app?{extra}", self.addr)
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// Whether this session's server end is encrypted (the upstream leg, seen from the database).
const SSL_IN_USE: &str =
    "SELECT current_user || ' ' || ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

fn psql(cluster: &Cluster, url: &str, sql: &str, env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(cluster.bin_dir.join("psql"));
    cmd.args(["-X", "-A", "-t", "-d", url, "-c", sql]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A rustls server configuration for the proxy's client leg, from a certificate made here.
fn client_leg_tls(dir: &Path) -> Arc<tokio_rustls::rustls::ServerConfig> {
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let (c, k) = (dir.join("proxy.crt"), dir.join("proxy.key"));
    std::fs::write(&c, cert.cert.pem()).unwrap();
    std::fs::write(&k, cert.key_pair.serialize_pem()).unwrap();
    Arc::new(pgfire::proxy::tls_config(&c, &k).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_tokio_postgres_and_psycopg_use_scram_through_a_tls_upstream() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let cluster = scram_cluster(&data.path().join("pg"), &pki);
    let proxy = TlsProxy::start(&verify_full(&pki, cluster.port), |_| {}).await;
    let alice_tls = "alice true";

    // psql in plain to the proxy (which has no certificate), channel binding preferred: the
    // server offered SCRAM-SHA-256-PLUS, the proxy did not pass it on.
    let (ok, out, err) = psql(
        &cluster,
        &proxy.url(""),
        SSL_IN_USE,
        &[("PGSSLMODE", "prefer"), ("PGCHANNELBINDING", "prefer")],
    );
    assert!(ok, "{err}");
    assert_eq!(out.trim(), alice_tls);
    // Channel binding required: libpq says why, before sending any proof.
    let (ok, _, err) = psql(
        &cluster,
        &proxy.url(""),
        "SELECT 1",
        &[("PGCHANNELBINDING", "require")],
    );
    assert!(!ok && err.contains("channel binding"), "{err}");

    // tokio-postgres, extended protocol included.
    let c = connect(&proxy.url("")).await.expect("tokio-postgres");
    let row = c.query_one(SSL_IN_USE, &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), alice_tls);
    let n: i32 = c
        .query_one("SELECT $1::int + 1", &[&41])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 42);
    // Large messages both ways over the TLS leg arrive whole.
    let big = "y".repeat(8 << 20);
    let len: i32 = c
        .query_one("SELECT length($1::text)", &[&big])
        .await
        .unwrap()
        .get(0);
    assert_eq!(len, 8 << 20);
    let rows = c
        .query(
            "SELECT repeat('x', 1000) FROM generate_series(1, 20000)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 20000);
    let err = connect(&proxy.url("channel_binding=require"))
        .await
        .expect_err("channel_binding=require refused");
    let text = pgfire::db::describe(&err);
    assert!(
        text.contains("server did not use channel binding"),
        "{text}"
    );

    // psycopg (libpq underneath): its suite, cancel included, and channel binding required.
    let out = crate::proxy::client_script("python", "psycopg_suite.py", &proxy.url(""));
    assert!(out.contains("psycopg suite ok"), "{out}");
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/.venv/bin/python");
    let out = Command::new(python)
        .args([
            "-c",
            "import sys, psycopg\n\
             try:\n    psycopg.connect(sys.argv[1], channel_binding='require')\n\
             except psycopg.OperationalError as e:\n    print('refused:', e)\n",
            &proxy.url(""),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("refused:") && text.contains("channel binding"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // With TLS on both legs, a client that supports channel binding tells the server so, and
    // the server must then refuse plain SCRAM (a downgrade looks the same): the proxy says so
    // first, with the way out; with channel binding disabled the client gets in.
    let certs = tempfile::tempdir().unwrap();
    let tls_proxy = TlsProxy::start(&verify_full(&pki, cluster.port), |c| {
        c.tls = Some(client_leg_tls(certs.path()))
    })
    .await;
    let (ok, _, err) = psql(
        &cluster,
        &tls_proxy.url(""),
        "SELECT 1",
        &[("PGSSLMODE", "require"), ("PGCHANNELBINDING", "prefer")],
    );
    assert!(!ok && err.contains("channel_binding=disable"), "{err}");
    let (ok, out, err) = psql(
        &cluster,
        &tls_proxy.url(""),
        SSL_IN_USE,
        &[("PGSSLMODE", "require"), ("PGCHANNELBINDING", "disable")],
    );
    assert!(ok, "{err}");
    assert_eq!(out.trim(), alice_tls);
    let (ok, _, err) = psql(
        &cluster,
        &tls_proxy.url(""),
        "SELECT 1",
        &[("PGSSLMODE", "require"), ("PGCHANNELBINDING", "require")],
    );
    assert!(!ok && err.contains("channel binding"), "{err}");
    // tokio-postgres over TLS to the proxy (its certificate not checked: sslmode=require).
    let tls_client = |extra: &str| {
        let (config, tls) =
            pgfire::db::config(&tls_proxy.url(&format!("sslmode=require&{extra}"))).unwrap();
        async move {
            let (client, conn) = config.connect(tls).await?;
            tokio::spawn(conn);
            Ok::<_, tokio_postgres::Error>(client)
        }
    };
    let err = tls_client("channel_binding=prefer")
        .await
        .expect_err("channel binding cannot pass");
    assert_eq!(err.code().map(|c| c.code()), Some("08P01"), "{err}");
    let text = pgfire::db::describe(&err);
    assert!(text.contains("channel_binding=disable"), "{text}");
    let c = tls_client("channel_binding=disable").await.unwrap();
    let row = c.query_one(SSL_IN_USE, &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), alice_tls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_hooks_block_and_rewrite_through_a_tls_upstream() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let cluster = scram_cluster(&data.path().join("pg"), &pki);
    let url = verify_full(&pki, cluster.port);
    let direct = pgfire::db::connect(&url).await.unwrap();
    pgfire::install::install(&direct, Some("pgfire_tls"), pgfire::install::MIGRATIONS)
        .await
        .unwrap();
    cluster.psql("app", crate::pre::USERS).unwrap();
    cluster
        .psql(
            "app",
            r#"CREATE FUNCTION tidy(e jsonb) RETURNS jsonb LANGUAGE sql AS $$
                SELECT jsonb_build_object('allow', true, 'data',
                       jsonb_build_object('email', lower(e->'event_data'->>'email')))
            $$;
            INSERT INTO pgfire.functions (name, kind, target) VALUES ('tidy', 'sql', 'tidy');
            INSERT INTO pgfire.subscriptions (event_type, function_name, priority)
                VALUES ('PRE_USER_CREATE', 'tidy', -1);"#,
        )
        .unwrap();
    // The PRE hooks' own connections (configuration, history) go over TLS with the same URL.
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let hooks =
        pgfire::proxy::pre::PreHooks::start(url.clone(), Default::default(), shutdown.clone())
            .await
            .expect("PRE hooks over TLS");
    let proxy = TlsProxy::start(&url, |c| c.pre = Some(hooks)).await;
    let c = connect(&proxy.url("")).await.unwrap();
    let err = c
        .simple_query("INSERT INTO users (email) VALUES ('not-an-email')")
        .await
        .unwrap_err();
    let (code, message, _) = crate::pre::db_error(&err);
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("P0001", "Invalid email address")
    );
    let back = crate::pre::rows(
        &c,
        "INSERT INTO users (email) VALUES ('Ann@X.Y') RETURNING email",
    )
    .await;
    assert_eq!(back[0][0].as_deref(), Some("ann@x.y"));
    assert_eq!(
        texts(&direct, "SELECT email FROM users").await,
        vec!["ann@x.y".to_string()]
    );
    // Every run recorded (the history writer connects over TLS too).
    eventually(Duration::from_secs(10), "PRE runs recorded", || async {
        (count(&direct, "SELECT count(*) FROM pgfire.executions").await >= 4).then_some(())
    })
    .await;
    let plain = texts(
        &direct,
        "SELECT a.application_name FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
          WHERE a.backend_type = 'client backend' AND NOT s.ssl AND a.datname = 'app'",
    )
    .await;
    assert!(plain.is_empty(), "{plain:?}");
}

/// A TCP relay to `target` that records the first eight bytes of every connection.
async fn sniffing_relay(target: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<[u8; 8]>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut first = [0u8; 8];
                if client.read_exact(&mut first).await.is_err() {
                    return;
                }
                record.lock().unwrap().push(first);
                let Ok(mut server) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                if server.write_all(&first).await.is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_request_goes_to_the_database_over_tls() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let cluster = scram_cluster(&data.path().join("pg"), &pki);
    let (relay, seen) = sniffing_relay(([127, 0, 0, 1], cluster.port).into()).await;
    let proxy = TlsProxy::start(&verify_full(&pki, relay.port()), |_| {}).await;
    let a = connect(&proxy.url("")).await.unwrap();
    let b = connect(&proxy.url("")).await.unwrap();
    let token = a.cancel_token();
    let slow_a = tokio::spawn(async move { a.query_one("SELECT pg_sleep(60)", &[]).await });
    let watcher = connect(&proxy.url("")).await.unwrap();
    eventually(Duration::from_secs(10), "the slow query to run", || async {
        let n = count(
            &watcher,
            "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'",
        )
        .await;
        (n == 1).then_some(())
    })
    .await;
    token.cancel_query(NoTls).await.unwrap();
    let err = slow_a.await.unwrap().unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("57014"), "{err}");
    b.batch_execute("SELECT 1")
        .await
        .expect("the other session goes on");
    // Three sessions and the cancel request, each begun with an SSLRequest.
    let mut ssl_request = [0u8; 8];
    ssl_request[..4].copy_from_slice(&8i32.to_be_bytes());
    ssl_request[4..].copy_from_slice(&pgfire::wire::SSL_REQUEST.to_be_bytes());
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert!(seen.iter().all(|s| *s == ssl_request), "{seen:?}");
}

/// The FATAL a client gets through a proxy whose upstream is `url`: SQLSTATE and message.
async fn refused(url: &str) -> (String, String) {
    let proxy = TlsProxy::start(url, |_| {}).await;
    let err = connect(&proxy.url(""))
        .await
        .expect_err("the proxy cannot reach the database");
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("not a FATAL from the proxy: {err}"));
    assert_eq!(db.severity(), "FATAL");
    (db.code().code().to_string(), db.message().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_a_wrong_host_or_no_tls_upstream_is_a_clear_fatal() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let cluster = scram_cluster(&data.path().join("pg"), &pki);
    let port = cluster.port;
    let with = |host: &str, mode: &str, ca: &str| {
        db_url(
            host,
            port,
            &format!("sslmode={mode}&sslrootcert={}", pki.path(ca).display()),
        )
    };

    let (code, message) = refused(&with("localhost", "verify-full", "other-ca.pem")).await;
    assert_eq!(code, "08006");
    assert!(
        message.contains("not signed by a certificate authority of sslrootcert")
            && message.contains("UnknownIssuer")
            && message.contains(&format!("localhost:{port}")),
        "{message}"
    );
    // Nothing secret in what the client is told (and the log says the same).
    assert!(!message.contains(PASSWORD), "{message}");
    let (code, message) = refused(&with("127.0.0.1", "verify-full", "ca.pem")).await;
    assert_eq!(code, "08006");
    assert!(
        message.contains("does not name the host \"127.0.0.1\"") && message.contains("verify-full"),
        "{message}"
    );
    // verify-ca does not check the host name; require without a root does not check the chain.
    for url in [
        with("127.0.0.1", "verify-ca", "ca.pem"),
        db_url("127.0.0.1", port, "sslmode=require"),
    ] {
        let proxy = TlsProxy::start(&url, |_| {}).await;
        let c = connect(&proxy.url("")).await.expect(&url);
        assert_eq!(
            c.query_one(SSL_IN_USE, &[])
                .await
                .unwrap()
                .get::<_, String>(0),
            "alice true"
        );
    }
    // sslmode=disable against hostssl-only rules: the server's own refusal, relayed.
    let (code, message) = refused(&db_url("127.0.0.1", port, "sslmode=disable")).await;
    assert_eq!(code, "28000");
    assert!(message.contains("no encryption"), "{message}");
    // psql sees the proxy's FATAL as it is.
    let proxy = TlsProxy::start(&with("localhost", "verify-full", "other-ca.pem"), |_| {}).await;
    let (ok, _, err) = psql(&cluster, &proxy.url(""), "SELECT 1", &[]);
    assert!(!ok && err.contains("UnknownIssuer"), "{err}");

    // A server without TLS: require refuses it, prefer goes on in plain.
    let plain = crate::support::cluster();
    let plain_url = |mode: &str| {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode={mode}",
            plain.port
        )
    };
    let (code, message) = refused(&plain_url("require")).await;
    assert_eq!(code, "08006");
    assert!(
        message.contains("does not accept TLS connections, and sslmode=require requires TLS"),
        "{message}"
    );
    let proxy = TlsProxy::start(&plain_url("prefer"), |_| {}).await;
    let c = connect(&format!("postgres://postgres@{}/postgres", proxy.addr))
        .await
        .expect("prefer falls back to plain");
    let ssl: bool = c
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!ssl);

    // Settings that cannot work are refused when the proxy is configured.
    let err = ProxyConfig::for_database(&with("localhost", "verify-full", "missing.pem"))
        .err()
        .expect("a missing root certificate");
    assert!(err.to_string().contains("cannot read sslrootcert"), "{err}");
    let err = ProxyConfig::for_database(&db_url("localhost", port, "sslmode=verify"))
        .err()
        .expect("an unknown sslmode");
    assert!(err.to_string().contains("invalid sslmode"), "{err}");
    assert!(matches!(
        ProxyConfig::for_database("postgres://u@localhost:5433/db?sslmode=disable")
            .unwrap()
            .upstream,
        Upstream::Tcp(ref h, 5433) if h == "localhost"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgfire_run_proxies_over_tls_as_pgsslmode_and_pgsslrootcert_say() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let cluster = scram_cluster(&data.path().join("pg"), &pki);
    let direct = pgfire::db::connect(&verify_full(&pki, cluster.port))
        .await
        .unwrap();
    pgfire::install::install(&direct, Some("pgfire_run"), pgfire::install::MIGRATIONS)
        .await
        .unwrap();
    let listen = format!("127.0.0.1:{}", pgfire::embedded::free_port().unwrap());
    let admin = format!("127.0.0.1:{}", pgfire::embedded::free_port().unwrap());
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgfire"))
        .args(["run", "--listen", &listen, "--admin-listen", &admin])
        .env(
            "DATABASE_URL",
            format!("postgres://alice:{PASSWORD}@localhost:{}/app", cluster.port),
        )
        .env("PGSSLMODE", "verify-full")
        .env("PGSSLROOTCERT", pki.path("ca.pem"))
        .env("PGFIRE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn pgfire");
    let through = format!("postgres://alice:{PASSWORD}@{listen}/app");
    let c = eventually(
        Duration::from_secs(30),
        "the proxy of pgfire run",
        || async { connect(&through).await.ok() },
    )
    .await;
    let row = c.query_one(SSL_IN_USE, &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "alice true");
    let _ = child.kill();
    let _ = child.wait();
}

/// A log sink for the subscriber of one current-thread test.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn the_log_names_the_cause_and_no_password() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let cluster = scram_cluster(&data.path().join("pg"), &pki);
    let logs = LogBuffer::default();
    let sink = logs.clone();
    // A current-thread runtime: the proxy's tasks log to this thread's subscriber.
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .finish(),
    );
    let url = db_url(
        "localhost",
        cluster.port,
        &format!(
            "sslmode=verify-full&sslrootcert={}",
            pki.path("other-ca.pem").display()
        ),
    );
    let (code, _) = refused(&url).await;
    assert_eq!(code, "08006");
    let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(
        text.contains("cannot reach the database") && text.contains("UnknownIssuer"),
        "{text}"
    );
    assert!(!text.contains(PASSWORD), "{text}");
}
