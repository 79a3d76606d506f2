//! TLS to the database: a PostgreSQL with `ssl=on`, a certificate made here, and `hostssl`-only
//! rules; every connection pgfire makes (pools, history, the replication connection and its
//! watch) speaks TLS as `sslmode` and `sslrootcert` say, and a wrong CA or host name is a clear
//! error.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pgfire::embedded::{Cluster, ClusterOptions};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

use crate::support::{count, eventually, texts};

/// A CA, and a server certificate it signed for `localhost` only (not for 127.0.0.1).
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "pgfire test CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&key, &ca_cert, &ca_key)
            .unwrap();
        let other_key = KeyPair::generate().unwrap();
        let mut other = CertificateParams::new(Vec::<String>::new()).unwrap();
        other.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        other
            .distinguished_name
            .push(rcgen::DnType::CommonName, "some other CA");
        let other = other.self_signed(&other_key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).unwrap();
        std::fs::write(dir.path().join("other-ca.pem"), other.pem()).unwrap();
        std::fs::write(dir.path().join("server.crt"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("server.key"), key.serialize_pem()).unwrap();
        Pki { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A cluster that accepts only TLS connections over TCP (trust, and SCRAM for `scram_user`).
fn tls_cluster(data: &Path, pki: &Pki) -> Cluster {
    tls_cluster_with(
        data,
        pki,
        &[
            "hostssl all scram_user 127.0.0.1/32 scram-sha-256",
            "hostssl all all 127.0.0.1/32 trust",
        ],
    )
}

/// A cluster that accepts over TCP only TLS connections, by the `hostssl` rules given (its Unix
/// socket trusts everyone, for the tests' own setup).
pub fn tls_cluster_with(data: &Path, pki: &Pki, hostssl: &[&str]) -> Cluster {
    // The first start creates the data directory; the certificate goes in it (the server
    // wants its key owned by its own user, which the start arranges).
    Cluster::start(&ClusterOptions::new(data)).unwrap().stop();
    for f in ["server.crt", "server.key"] {
        std::fs::copy(pki.path(f), data.join(f)).unwrap();
    }
    let mut key = std::fs::metadata(data.join("server.key"))
        .unwrap()
        .permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut key, 0o600);
    std::fs::set_permissions(data.join("server.key"), key).unwrap();
    let mut opts = ClusterOptions::new(data)
        .setting("fsync", "off")
        .setting("synchronous_commit", "off")
        .setting("ssl", "on")
        .setting("ssl_cert_file", "server.crt")
        .setting("ssl_key_file", "server.key")
        .setting("password_encryption", "scram-sha-256");
    opts.hba = hostssl.iter().map(|l| l.to_string()).collect();
    opts.hba.push("hostnossl all all 0.0.0.0/0 reject".into());
    Cluster::start(&opts).unwrap()
}

#[tokio::test]
async fn every_connection_speaks_tls_as_the_connection_string_says() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let cluster = tls_cluster(&data.path().join("pg"), &pki);
    let ca = pki.path("ca.pem");
    let url = |host: &str, db: &str, extra: &str| {
        format!(
            "postgres://postgres@{host}:{}/{db}?sslmode=verify-full&sslrootcert={}{extra}",
            cluster.port,
            ca.display()
        )
    };
    let admin = pgfire::db::connect(&url("localhost", "postgres", ""))
        .await
        .expect("verify-full with the right CA and host");
    admin.batch_execute("CREATE DATABASE app").await.unwrap();
    let app_url = url("localhost", "app", "");

    // pgfire installed and running over TLS only: pools, history, replication.
    let c = pgfire::db::connect(&app_url).await.unwrap();
    pgfire::install::install(&c, Some("pgfire_tls"), pgfire::install::MIGRATIONS)
        .await
        .unwrap();
    c.batch_execute(
        "CREATE TABLE users (id int PRIMARY KEY, email text);
         CREATE TABLE delivered (event_id text, user_id int);
         CREATE FUNCTION deliver(e jsonb) RETURNS void LANGUAGE sql AS $$
           INSERT INTO delivered VALUES (e->>'id', (e->'event_data'->>'user_id')::int) $$;
         INSERT INTO pgfire.sources (table_name, kind) VALUES ('users', 'user');
         INSERT INTO pgfire.functions (name, kind, target) VALUES ('deliver', 'sql', 'deliver');
         INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('POST_USER_CREATE', 'deliver');",
    )
    .await
    .unwrap();
    let mut cfg = pgfire::service::ServiceConfig::new(app_url.clone());
    cfg.status_interval = Duration::from_millis(100);
    let service = pgfire::service::Service::start(cfg).await.unwrap();
    c.batch_execute("INSERT INTO users VALUES (1, 'a@b.c'), (2, 'd@e.f')")
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "events delivered over TLS",
        || async { (count(&c, "SELECT count(*) FROM delivered").await == 2).then_some(()) },
    )
    .await;
    eventually(Duration::from_secs(30), "their history stored", || async {
        (count(&c, "SELECT count(*) FROM pgfire.executions").await == 2).then_some(())
    })
    .await;
    // Every pgfire connection is encrypted (the rules refuse anything else, so this also
    // shows which connections there are).
    let plain = texts(
        &c,
        "SELECT a.application_name || ' ' || a.backend_type FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
          WHERE a.application_name LIKE 'pgfire%' AND NOT s.ssl",
    )
    .await;
    assert!(plain.is_empty(), "{plain:?}");
    let encrypted = texts(
        &c,
        "SELECT DISTINCT a.application_name FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
          WHERE a.application_name LIKE 'pgfire%' AND s.ssl ORDER BY 1",
    )
    .await;
    for name in [
        "pgfire",
        "pgfire function",
        "pgfire history",
        "pgfire watch",
    ] {
        assert!(
            encrypted.iter().any(|n| n == name),
            "{name} in {encrypted:?}"
        );
    }
    service.stop().await;

    // SCRAM over TLS (tokio-postgres binds the channel: SCRAM-SHA-256-PLUS), pools and
    // replication connection alike.
    admin
        .batch_execute("CREATE ROLE scram_user LOGIN REPLICATION PASSWORD 'sekret'")
        .await
        .unwrap();
    let scram = format!(
        "postgres://scram_user:sekret@localhost:{}/app?sslmode=verify-full&sslrootcert={}",
        cluster.port,
        ca.display()
    );
    let s = pgfire::db::connect(&scram).await.expect("SCRAM over TLS");
    s.batch_execute("SELECT 1").await.unwrap();
    pgfire::replication::conn::ReplicationConn::connect(&scram, Duration::from_secs(10))
        .await
        .expect("replication connection, SCRAM over TLS");
}

#[tokio::test]
async fn a_wrong_ca_a_wrong_host_name_or_no_tls_is_a_clear_error() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let cluster = tls_cluster(&data.path().join("pg"), &pki);
    let port = cluster.port;
    let with = |host: &str, mode: &str, ca: &str| {
        format!(
            "postgres://postgres@{host}:{port}/postgres?sslmode={mode}&sslrootcert={}",
            pki.path(ca).display()
        )
    };
    let err = |r: Result<tokio_postgres::Client, pgfire::db::ConnectError>| match r {
        Ok(_) => panic!("connected"),
        Err(e) => e.to_string(),
    };
    let repl = |url: String| async move {
        match pgfire::replication::conn::ReplicationConn::connect(&url, Duration::from_secs(10))
            .await
        {
            Ok(_) => panic!("replication connected"),
            Err(e) => e.to_string(),
        }
    };

    // A CA that did not sign the server's certificate.
    let bad_ca = with("localhost", "verify-full", "other-ca.pem");
    let e = err(pgfire::db::connect(&bad_ca).await);
    assert!(
        e.contains("UnknownIssuer") || e.contains("unknown issuer"),
        "{e}"
    );
    let e = repl(bad_ca).await;
    assert!(e.contains("TLS") && e.contains("UnknownIssuer"), "{e}");

    // The certificate names localhost, not 127.0.0.1: verify-full refuses, verify-ca accepts.
    let e = err(pgfire::db::connect(&with("127.0.0.1", "verify-full", "ca.pem")).await);
    assert!(
        e.contains("NotValidForName") || e.contains("not valid for name"),
        "{e}"
    );
    let e = repl(with("127.0.0.1", "verify-full", "ca.pem")).await;
    assert!(
        e.contains("NotValidForName") || e.contains("not valid for name"),
        "{e}"
    );
    pgfire::db::connect(&with("127.0.0.1", "verify-ca", "ca.pem"))
        .await
        .expect("verify-ca does not check the host name");
    pgfire::replication::conn::ReplicationConn::connect(
        &with("127.0.0.1", "verify-ca", "ca.pem"),
        Duration::from_secs(10),
    )
    .await
    .expect("replication with verify-ca");
    // require without a root certificate: encrypted, not verified (libpq's behaviour).
    let require = format!("postgres://postgres@127.0.0.1:{port}/postgres?sslmode=require");
    pgfire::db::connect(&require).await.expect("require");

    // No TLS where the server insists on it: the server's own refusal.
    let e = err(pgfire::db::connect(&format!(
        "postgres://postgres@127.0.0.1:{port}/postgres?sslmode=disable"
    ))
    .await);
    assert!(e.contains("no encryption") && e.contains("28000"), "{e}");
    // A CA file that is not there, and a mode libpq does not know.
    let e = err(pgfire::db::connect(&with("localhost", "verify-full", "missing.pem")).await);
    assert!(e.contains("cannot read sslrootcert"), "{e}");
    let e = err(pgfire::db::connect(&format!(
        "postgres://postgres@localhost:{port}/postgres?sslmode=verify"
    ))
    .await);
    assert!(e.contains("invalid sslmode \"verify\""), "{e}");
    // pgfire run says so and exits non-zero.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgfire"))
        .args(["run", "--no-proxy", "--admin-listen", "127.0.0.1:0"])
        .env(
            "DATABASE_URL",
            with("localhost", "verify-full", "other-ca.pem"),
        )
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("UnknownIssuer") || stderr.contains("unknown issuer"),
        "{stderr}"
    );
}
