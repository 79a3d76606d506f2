//! The proxy with real clients against a real PostgreSQL: tokio-postgres, psql, pgbench, and a
//! differential suite (the same statements direct and through the proxy, same answers).

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pgfire::proxy::{ProxyConfig, Upstream};
use tokio_postgres::types::{FromSql, Type};
use tokio_postgres::{NoTls, SimpleQueryMessage};
use tokio_util::sync::CancellationToken;

use crate::support::{cluster, TestDb, MD5_USER, SCRAM_USER};

/// A proxy in front of the shared test cluster.
pub struct Proxy {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Proxy {
    pub async fn start() -> Proxy {
        Self::with(|_| {}).await
    }

    pub async fn with(tune: impl FnOnce(&mut ProxyConfig)) -> Proxy {
        let mut config = ProxyConfig::new(Upstream::Tcp("127.0.0.1".into(), cluster().port));
        tune(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(pgfire::proxy::serve(config, listener, shutdown.clone()));
        Proxy {
            addr,
            shutdown,
            task,
        }
    }

    pub fn url(&self, db: &TestDb) -> String {
        format!("postgres://postgres@{}/{}", self.addr, db.name)
    }
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(conn);
    client
}

/// Any value in its binary form, for comparing results byte for byte.
#[derive(Debug, PartialEq)]
struct Raw(Vec<u8>);

impl<'a> FromSql<'a> for Raw {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(raw.to_vec()))
    }
    fn accepts(_: &Type) -> bool {
        true
    }
}

const SETUP: &str = "
CREATE TABLE items (id int PRIMARY KEY, name text, price numeric(10,2), tags text[], meta jsonb, at timestamptz, data bytea);
INSERT INTO items SELECT i, 'item ' || i, i * 1.5, ARRAY['a', 'b' || i], jsonb_build_object('i', i), '2025-01-01'::timestamptz + i * interval '1 hour', decode(md5(i::text), 'hex')
  FROM generate_series(1, 200) i;
INSERT INTO items (id) VALUES (0);
";

const STATEMENTS: &[&str] = &[
    "SELECT * FROM items ORDER BY id",
    "SELECT count(*), sum(price), max(at), min(name) FROM items",
    "SELECT NULL::int, ''::text, 'x'::char(3), 1.0e300::float8, 'NaN'::numeric, '{1,NULL}'::int[], '(1,2)'::point",
    "SELECT id, meta->'i', tags[2] FROM items WHERE id % 17 = 0 ORDER BY 1",
    "UPDATE items SET price = price + 1 WHERE id < 10",
    "SELECT 1/0",
    "SELECT * FROM no_such_table",
    "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t WHERE n < 1000) SELECT sum(n) FROM t",
    "SHOW server_version_num",
    "SELECT current_setting('application_name'), current_user, current_database() = current_database()",
];

#[tokio::test]
async fn differential_text_and_binary_results_match_direct() {
    let direct_db = TestDb::new();
    let proxied_db = TestDb::new();
    direct_db.psql(SETUP);
    proxied_db.psql(SETUP);
    let proxy = Proxy::start().await;
    let direct = connect(&direct_db.url()).await;
    let proxied = connect(&proxy.url(&proxied_db)).await;
    for sql in STATEMENTS {
        // Text format, simple protocol.
        let a = direct.simple_query(sql).await;
        let b = proxied.simple_query(sql).await;
        match (a, b) {
            (Ok(a), Ok(b)) => assert_eq!(simple_rows(&a), simple_rows(&b), "{sql}"),
            (Err(a), Err(b)) => {
                assert_eq!(a.code(), b.code(), "{sql}");
                assert_eq!(
                    a.as_db_error().map(|e| e.message()),
                    b.as_db_error().map(|e| e.message()),
                    "{sql}"
                );
            }
            (a, b) => panic!("{sql}: direct {a:?} vs proxied {b:?}"),
        }
        // Binary format, extended protocol, prepared statements.
        let a = direct.query(*sql, &[]).await;
        let b = proxied.query(*sql, &[]).await;
        match (a, b) {
            (Ok(a), Ok(b)) => {
                assert_eq!(a.len(), b.len(), "{sql}");
                for (ra, rb) in a.iter().zip(&b) {
                    let ca: Vec<_> = ra
                        .columns()
                        .iter()
                        .map(|c| (c.name().to_string(), c.type_().clone()))
                        .collect();
                    let cb: Vec<_> = rb
                        .columns()
                        .iter()
                        .map(|c| (c.name().to_string(), c.type_().clone()))
                        .collect();
                    assert_eq!(ca, cb, "{sql}");
                    for i in 0..ra.len() {
                        assert_eq!(
                            ra.get::<_, Option<Raw>>(i),
                            rb.get::<_, Option<Raw>>(i),
                            "{sql} column {i}"
                        );
                    }
                }
            }
            (Err(a), Err(b)) => assert_eq!(a.code(), b.code(), "{sql}"),
            (a, b) => panic!("{sql}: direct {a:?} vs proxied {b:?}"),
        }
    }
    // Parameters in binary, both ways.
    let q = "SELECT $1::int + 1, $2::text || '!', $3::float8 * 2, $4::int IS NULL";
    let none: Option<i32> = None;
    let ra = direct
        .query_one(q, &[&41i32, &"hi", &1.25f64, &none])
        .await
        .unwrap();
    let rb = proxied
        .query_one(q, &[&41i32, &"hi", &1.25f64, &none])
        .await
        .unwrap();
    for i in 0..4 {
        assert_eq!(ra.get::<_, Option<Raw>>(i), rb.get::<_, Option<Raw>>(i));
    }
    assert_eq!(rb.get::<_, i32>(0), 42);
}

fn simple_rows(msgs: &[SimpleQueryMessage]) -> Vec<String> {
    msgs.iter()
        .map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                let cols: Vec<String> = r.columns().iter().map(|c| c.name().to_string()).collect();
                let vals: Vec<String> = (0..r.len()).map(|i| format!("{:?}", r.get(i))).collect();
                format!("row {cols:?} {vals:?}")
            }
            SimpleQueryMessage::CommandComplete(n) => format!("complete {n}"),
            SimpleQueryMessage::RowDescription(cols) => format!(
                "description {:?}",
                cols.iter()
                    .map(|c| c.name().to_string())
                    .collect::<Vec<_>>()
            ),
            _ => "other".to_string(),
        })
        .collect()
}

#[tokio::test]
async fn transactions_pipelining_copy_and_notify_work_through_the_proxy() {
    let db = TestDb::new();
    db.psql("CREATE TABLE t (id int PRIMARY KEY, v text)");
    let proxy = Proxy::start().await;
    let (client, mut conn) = tokio_postgres::connect(&proxy.url(&db), NoTls)
        .await
        .unwrap();
    // Drive the connection and collect notifications.
    let (ntx, mut nrx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(msg)) = stream.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = msg {
                let _ = ntx.send((n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    // Pipelining: many statements in flight before one Sync each, on one connection.
    let stmt = client
        .prepare("INSERT INTO t VALUES ($1, $2)")
        .await
        .unwrap();
    let futs: Vec<_> = (0..200)
        .map(|i| {
            let (client, stmt) = (&client, &stmt);
            async move { client.execute(stmt, &[&i, &format!("v{i}")]).await }
        })
        .collect();
    for r in futures_util::future::join_all(futs).await {
        assert_eq!(r.unwrap(), 1);
    }
    // Transactions, a failed one, rollback.
    client
        .batch_execute("BEGIN; INSERT INTO t VALUES (1000, 'x'); ROLLBACK")
        .await
        .unwrap();
    let err = client
        .batch_execute("BEGIN; INSERT INTO t VALUES (1, 'dup'); COMMIT")
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), "23505");
    client.batch_execute("ROLLBACK").await.unwrap();
    let n: i64 = client
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 200);
    // COPY in both directions.
    let sink = client.copy_in("COPY t FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    let data: String = (1000..3000).map(|i| format!("{i}\tcopied {i}\n")).collect();
    sink.send(bytes::Bytes::from(data)).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 2000);
    let out = client
        .copy_out("COPY (SELECT id, v FROM t ORDER BY id) TO STDOUT")
        .await
        .unwrap();
    let chunks: Vec<bytes::Bytes> = out.map(|r| r.unwrap()).collect().await;
    let text: Vec<u8> = chunks.concat();
    assert_eq!(text.iter().filter(|b| **b == b'\n').count(), 2200);
    // A COPY the server rejects midway.
    let sink = client.copy_in("COPY t FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"5000\tok\nnot-a-number\tbad\n"))
        .await
        .unwrap();
    let err = sink.finish().await.unwrap_err();
    assert_eq!(err.code().unwrap().code(), "22P02");
    // LISTEN / NOTIFY.
    client.batch_execute("LISTEN chan").await.unwrap();
    db.psql("NOTIFY chan, 'hello'");
    let got = tokio::time::timeout(Duration::from_secs(10), nrx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, ("chan".to_string(), "hello".to_string()));
    // A large result, streamed.
    let rows = client
        .query_raw(
            "SELECT g, repeat('x', 100) FROM generate_series(1, 300000) g",
            std::iter::empty::<i32>(),
        )
        .await
        .unwrap();
    futures_util::pin_mut!(rows);
    let mut count = 0;
    while let Some(r) = rows.next().await {
        r.unwrap();
        count += 1;
    }
    assert_eq!(count, 300000);
}

#[tokio::test]
async fn postgres_authentication_passes_through_unchanged() {
    let db = TestDb::new();
    let proxy = Proxy::start().await;
    for (user, password) in [MD5_USER, SCRAM_USER] {
        let url = format!("postgres://{user}:{password}@{}/{}", proxy.addr, db.name);
        let c = connect(&url).await;
        let who: String = c
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(who, user);
        let bad = format!("postgres://{user}:wrong@{}/{}", proxy.addr, db.name);
        let err = tokio_postgres::connect(&bad, NoTls)
            .await
            .err()
            .expect("wrong password refused");
        assert_eq!(err.code().map(|c| c.code()), Some("28P01"), "{err}");
    }
}

#[tokio::test]
async fn cancel_reaches_the_right_backend() {
    let db = TestDb::new();
    let proxy = Proxy::start().await;
    let a = connect(&proxy.url(&db)).await;
    let b = connect(&proxy.url(&db)).await;
    let token = a.cancel_token();
    let slow_a = tokio::spawn(async move { a.query_one("SELECT pg_sleep(30)", &[]).await });
    let slow_b = tokio::spawn(async move { b.query_one("SELECT pg_sleep(1)", &[]).await });
    crate::support::wait_running(&db, "SELECT pg_sleep(30)").await;
    let t0 = std::time::Instant::now();
    token.cancel_query(NoTls).await.unwrap();
    let err = slow_a.await.unwrap().unwrap_err();
    assert_eq!(err.code().unwrap().code(), "57014");
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(
        slow_b.await.unwrap().is_ok(),
        "the other session was not cancelled"
    );
}

#[tokio::test]
async fn hostile_bytes_get_a_protocol_violation_and_a_closed_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = TestDb::new();
    let proxy = Proxy::start().await;
    async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(bytes).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .expect("connection closed")
            .ok();
        out
    }
    fn sqlstate(reply: &[u8]) -> String {
        let e = reply
            .iter()
            .rposition(|b| *b == b'E')
            .map(|i| &reply[i..])
            .unwrap_or(&[]);
        let i = e.windows(1).position(|w| w == b"C").unwrap_or(0);
        String::from_utf8_lossy(&e[i + 1..i + 6]).to_string()
    }
    // Garbage before startup, a bad startup length, an unknown protocol.
    for bytes in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0, 0, 0, 2, 1, 2, 3, 4],
        &[0, 0, 0, 8, 0, 9, 0, 0],
    ] {
        let reply = exchange(proxy.addr, bytes).await;
        assert_eq!(reply.first(), Some(&b'E'), "{bytes:?}");
        assert_eq!(sqlstate(&reply), "08P01");
    }
    // After a real startup: a bad length, an oversized length, an unknown tag.
    let mut startup = bytes::BytesMut::new();
    postgres_protocol::message::frontend::startup_message(
        [("user", "postgres"), ("database", db.name.as_str())],
        &mut startup,
    )
    .unwrap();
    for frame in [
        &[b'Q', 0, 0, 0, 1][..],
        &[b'Q', 0x7f, 0xff, 0xff, 0xff],
        &[b'z', 0, 0, 0, 4],
    ] {
        let mut bytes = startup.to_vec();
        bytes.extend_from_slice(frame);
        let reply = exchange(proxy.addr, &bytes).await;
        assert_eq!(sqlstate(&reply), "08P01", "{frame:?}");
    }
    // The proxy still serves.
    let c = connect(&proxy.url(&db)).await;
    assert_eq!(
        c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0),
        1
    );
}

/// Reads one whole backend frame (tag, body), or `None` at the end of the stream.
async fn read_frame(s: &mut tokio::net::TcpStream) -> Option<(u8, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 5];
    s.read_exact(&mut head).await.ok()?;
    let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    assert!(
        len >= 4,
        "malformed frame length {len} (tag {:?})",
        head[0] as char
    );
    let mut body = vec![0u8; len as usize - 4];
    s.read_exact(&mut body)
        .await
        .unwrap_or_else(|e| panic!("truncated {:?} frame: {e}", head[0] as char));
    Some((head[0], body))
}

#[tokio::test]
async fn a_protocol_violation_mid_result_arrives_after_the_frame_in_flight() {
    use tokio::io::AsyncWriteExt;
    let db = TestDb::new();
    let proxy = Proxy::start().await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut out = bytes::BytesMut::new();
    postgres_protocol::message::frontend::startup_message(
        [("user", "postgres"), ("database", db.name.as_str())],
        &mut out,
    )
    .unwrap();
    s.write_all(&out).await.unwrap();
    while let Some((tag, _)) = read_frame(&mut s).await {
        if tag == b'Z' {
            break;
        }
    }
    // A 16 MB value: the client is inside its DataRow when the garbage arrives.
    let mut q = bytes::BytesMut::new();
    postgres_protocol::message::frontend::query("SELECT repeat('x', 16000000)", &mut q).unwrap();
    s.write_all(&q).await.unwrap();
    let (tag, _) = read_frame(&mut s).await.unwrap();
    assert_eq!(tag, b'T');
    let mut head = [0u8; 5];
    tokio::io::AsyncReadExt::read_exact(&mut s, &mut head)
        .await
        .unwrap();
    assert_eq!(head[0], b'D');
    let row_len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize - 4;
    s.write_all(&[b'z', 0, 0, 0, 4]).await.unwrap();
    // The rest of the row arrives whole, then the FATAL as a frame of its own.
    let mut rest = vec![0u8; row_len];
    tokio::io::AsyncReadExt::read_exact(&mut s, &mut rest)
        .await
        .expect("the row in flight is finished");
    assert!(rest.ends_with(b"xxxx"));
    let mut frames = Vec::new();
    while let Some(f) = read_frame(&mut s).await {
        frames.push(f);
    }
    let (tag, body) = frames.last().expect("an error after the row");
    assert_eq!(*tag, b'E', "{frames:?}");
    let text = String::from_utf8_lossy(body);
    assert!(text.contains("C08P01"), "{text}");
    assert!(
        frames.iter().all(|(t, _)| *t == b'E'),
        "nothing of the server's follows the FATAL's frame boundary but errors: {:?}",
        frames.iter().map(|(t, _)| *t as char).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn limits_startup_timeout_and_graceful_shutdown() {
    use tokio::io::AsyncReadExt;
    let db = TestDb::new();
    let proxy = Proxy::with(|c| {
        c.max_clients = 2;
        c.startup_timeout = Duration::from_secs(1);
        c.shutdown_timeout = Duration::from_secs(20);
    })
    .await;
    // A client that says nothing is told off after the startup timeout.
    let mut silent = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&reply).contains("08P01"));
    // Two clients fit, the third does not.
    let a = connect(&proxy.url(&db)).await;
    let idle = connect(&proxy.url(&db)).await;
    let err = tokio_postgres::connect(&proxy.url(&db), NoTls)
        .await
        .err()
        .expect("third client refused");
    assert_eq!(err.code().map(|c| c.code()), Some("53300"), "{err}");
    // Shutdown: the idle session is closed at once, the open transaction may finish.
    a.batch_execute("CREATE TABLE s (x int); BEGIN; INSERT INTO s VALUES (1)")
        .await
        .unwrap();
    proxy.shutdown.cancel();
    crate::support::eventually(
        Duration::from_secs(10),
        "the idle session to close",
        || async { idle.is_closed().then_some(()) },
    )
    .await;
    assert!(
        idle.query_one("SELECT 1", &[]).await.is_err(),
        "idle session closed"
    );
    crate::support::eventually(
        Duration::from_secs(10),
        "the proxy to stop accepting",
        || async {
            tokio::net::TcpStream::connect(proxy.addr)
                .await
                .is_err()
                .then_some(())
        },
    )
    .await;
    a.batch_execute("INSERT INTO s VALUES (2); COMMIT")
        .await
        .unwrap();
    let n: i64 = connect(&db.url())
        .await
        .query_one("SELECT count(*) FROM s", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    tokio::time::timeout(Duration::from_secs(10), proxy.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn server_and_client_disconnects_mid_query() {
    let db = TestDb::new();
    let proxy = Proxy::start().await;
    let c = connect(&proxy.url(&db)).await;
    let pid: i32 = c
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let slow = tokio::spawn(async move { c.query_one("SELECT pg_sleep(30)", &[]).await });
    crate::support::wait_running(&db, "SELECT pg_sleep(30)").await;
    db.psql(&format!("SELECT pg_terminate_backend({pid})"));
    let err = tokio::time::timeout(Duration::from_secs(10), slow)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(
        err.code().map(|c| c.code()) == Some("57P01") || err.is_closed(),
        "{err}"
    );
    // A client that vanishes mid-query takes its backend with it.
    let c = connect(&proxy.url(&db)).await;
    let pid: i32 = c
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let slow = tokio::spawn(async move { c.query_one("SELECT pg_sleep(2)", &[]).await });
    crate::support::wait_running(&db, "SELECT pg_sleep(2)").await;
    slow.abort();
    let direct = connect(&db.url()).await;
    crate::support::eventually(Duration::from_secs(15), "the backend to end", || async {
        let n: i64 = direct
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
                &[&pid],
            )
            .await
            .unwrap()
            .get(0);
        (n == 0).then_some(())
    })
    .await;
}

fn psql(url: &str, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(cluster().bin_dir.join("psql"));
    cmd.args(["-X", "-v", "ON_ERROR_STOP=0", "-d", url])
        .args(args);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_script_output_is_the_same_direct_and_through_the_proxy() {
    let direct_db = TestDb::new();
    let proxied_db = TestDb::new();
    let proxy = Proxy::start().await;
    let dir = tempfile::tempdir().unwrap();
    let blob = dir.path().join("blob.bin");
    std::fs::write(
        &blob,
        (0..5000u32)
            .flat_map(|i| i.to_le_bytes())
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let csv = dir.path().join("data.csv");
    std::fs::write(&csv, "1,one\n2,two\n3,\"th,ree\"\n").unwrap();
    let script = dir.path().join("script.sql");
    std::fs::write(
        &script,
        format!(
            r#"
CREATE TABLE t (id int PRIMARY KEY, v text);
\copy t FROM '{csv}' WITH (FORMAT csv)
SELECT * FROM t ORDER BY id;
BEGIN;
INSERT INTO t VALUES (4, 'four');
SELECT 1/0;
SELECT 'not run';
ROLLBACK;
SELECT count(*) FROM t \gset
\echo rows :count
PREPARE p(int) AS SELECT v FROM t WHERE id = $1;
EXECUTE p(3);
\copy (SELECT * FROM t ORDER BY id) TO STDOUT
\lo_import '{blob}'
SELECT length(lo_get(:LASTOID)) AS blob_length;
\lo_unlink :LASTOID
DO $$ BEGIN RAISE NOTICE 'notice %', 42; END $$;
LISTEN x; NOTIFY x, 'payload';
SELECT * FROM generate_series(1, 5) g;
"#,
            csv = csv.display(),
            blob = blob.display()
        ),
    )
    .unwrap();
    let f = script.display().to_string();
    let (ok_a, out_a, err_a) = psql(&direct_db.url(), &["-f", &f], &[]);
    let (ok_b, out_b, err_b) = psql(&proxy.url(&proxied_db), &["-f", &f], &[]);
    assert_eq!(ok_a, ok_b);
    let scrub = |s: &str| {
        s.lines()
            .filter(|l| {
                !l.contains("server process with PID")
                    && !l.contains("lo_import")
                    && !l.starts_with("lo_unlink")
            })
            .map(|l| {
                l.replace(&direct_db.name, "DB")
                    .replace(&proxied_db.name, "DB")
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(scrub(&out_a), scrub(&out_b));
    assert_eq!(scrub(&err_a), scrub(&err_b));
    assert!(
        out_b.contains("blob_length") && out_b.contains("20000"),
        "{out_b}"
    );
    assert!(out_b.contains("rows 3"), "{out_b}");
    assert!(
        err_b.contains("division by zero") && err_b.contains("notice 42"),
        "{err_b}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_runs_in_every_protocol_mode() {
    let db = TestDb::new();
    let proxy = Proxy::start().await;
    let url = proxy.url(&db);
    let pgbench = cluster().bin_dir.join("pgbench");
    let out = Command::new(&pgbench)
        .args(["-i", "-s", "1", "-q", &url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for mode in ["simple", "extended", "prepared"] {
        for args in [
            &["-c", "4", "-t", "200"][..],
            &["-c", "4", "-t", "200", "-S"],
        ] {
            let out = Command::new(&pgbench)
                .args(["-n", "-M", mode])
                .args(args)
                .arg(&url)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "pgbench -M {mode} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                text.contains("number of transactions actually processed: 800/800"),
                "{text}"
            );
            assert!(text.contains("number of failed transactions: 0"), "{text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_terminated_with_a_certificate_and_declined_without() {
    let db = TestDb::new();
    let dir = tempfile::tempdir().unwrap();
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    let tls = pgfire::proxy::tls_config(&cert_path, &key_path).unwrap();
    let proxy = Proxy::with(|c| c.tls = Some(std::sync::Arc::new(tls))).await;
    let (ok, out, err) = psql(
        &proxy.url(&db),
        &["-c", "\\conninfo", "-c", "SELECT 40 + 2"],
        &[("PGSSLMODE", "require")],
    );
    assert!(ok, "{err}");
    assert!(out.contains("SSL connection (protocol: TLSv1.3"), "{out}");
    assert!(out.contains("42"), "{out}");
    // A large result over TLS arrives whole, and the session goes on after it.
    let (ok, out, err) = psql(
        &proxy.url(&db),
        &[
            "-c",
            "\\o /dev/null",
            "-c",
            "SELECT repeat('x', 1000) FROM generate_series(1, 30000)",
            "-c",
            "\\o",
            "-c",
            "SELECT 'after the large result'",
        ],
        &[("PGSSLMODE", "require")],
    );
    assert!(ok && out.contains("after the large result"), "{err}");
    // Verified against our CA, too.
    let ca = cert_path.display().to_string();
    let (ok, _, err) = psql(
        &proxy.url(&db),
        &["-c", "SELECT 1"],
        &[("PGSSLMODE", "verify-ca"), ("PGSSLROOTCERT", &ca)],
    );
    assert!(ok, "{err}");
    // SCRAM over the terminated TLS: the server (reached in plain) offers no channel binding,
    // so a client that prefers it authenticates without, and one that requires it is refused
    // before sending its password proof, never bound to the wrong certificate.
    let scram_url = format!(
        "postgres://{}:{}@{}/{}",
        SCRAM_USER.0, SCRAM_USER.1, proxy.addr, db.name
    );
    let (ok, out, err) = psql(
        &scram_url,
        &["-c", "SELECT current_user"],
        &[("PGSSLMODE", "require"), ("PGCHANNELBINDING", "prefer")],
    );
    assert!(ok && out.contains(SCRAM_USER.0), "{err}");
    let (ok, _, err) = psql(
        &scram_url,
        &["-c", "SELECT 1"],
        &[("PGSSLMODE", "require"), ("PGCHANNELBINDING", "require")],
    );
    assert!(!ok && err.contains("channel binding"), "{err}");

    let plain = Proxy::start().await;
    let (ok, _, err) = psql(
        &plain.url(&db),
        &["-c", "SELECT 1"],
        &[("PGSSLMODE", "require")],
    );
    assert!(!ok && err.contains("server does not support SSL"), "{err}");
    let (ok, out, err) = psql(
        &plain.url(&db),
        &["-c", "SELECT 'fell back'"],
        &[("PGSSLMODE", "prefer")],
    );
    assert!(ok && out.contains("fell back"), "{err}");
}

/// Run a script of tests/clients with the installed driver; the test fails if it is not there.
pub fn client_script(program: &str, script: &str, url: &str) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients");
    let (bin, note) = match program {
        "python" => (root.join(".venv/bin/python"), "psycopg"),
        _ => (std::path::PathBuf::from("node"), "node-postgres"),
    };
    if program == "python" && !bin.exists()
        || program == "node" && !root.join("node_modules/pg").exists()
    {
        panic!("{note} is not installed in tests/clients: run scripts/test (it installs the test drivers)");
    }
    let out = Command::new(bin)
        .arg(root.join(script))
        .arg(url)
        .current_dir(&root)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{script} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_works_through_the_proxy_pipeline_mode_included() {
    let db = TestDb::new();
    let proxy = Proxy::start().await;
    let out = client_script("python", "psycopg_suite.py", &proxy.url(&db));
    assert!(out.contains("psycopg suite ok"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_works_through_the_proxy() {
    let db = TestDb::new();
    let proxy = Proxy::start().await;
    let out = client_script("node", "node_suite.js", &proxy.url(&db));
    assert!(out.contains("node-postgres suite ok"), "{out}");
}

/// Records what the proxy hands to its hook.
struct Recorder(std::sync::Mutex<Vec<String>>);

impl pgfire::proxy::Hook for Recorder {
    fn frontend(&self, msg: &pgfire::wire::Frontend<'_>) {
        use pgfire::wire::Frontend;
        let line = match msg {
            Frontend::Query(q) => format!("Q {}", q.sql),
            Frontend::Parse(p) => format!("P {}", p.sql),
            Frontend::Bind(b) => format!(
                "B {:?}",
                b.params
                    .iter()
                    .map(|p| p.map(|v| v.to_vec()))
                    .collect::<Vec<_>>()
            ),
        };
        self.0.lock().unwrap().push(line);
    }
}

#[tokio::test]
async fn the_hook_sees_every_query_parse_and_bind() {
    let db = TestDb::new();
    let hook = std::sync::Arc::new(Recorder(Default::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = ProxyConfig::new(Upstream::Tcp("127.0.0.1".into(), cluster().port));
    let shutdown = CancellationToken::new();
    tokio::spawn(pgfire::proxy::serve_with_hook(
        config,
        listener,
        shutdown.clone(),
        hook.clone(),
    ));
    let c = connect(&format!("postgres://postgres@{addr}/{}", db.name)).await;
    c.simple_query("SELECT 42").await.unwrap();
    c.query("SELECT $1::text", &[&"param"]).await.unwrap();
    let seen = hook.0.lock().unwrap().clone();
    assert!(seen.contains(&"Q SELECT 42".to_string()), "{seen:?}");
    assert!(seen.contains(&"P SELECT $1::text".to_string()), "{seen:?}");
    assert!(
        seen.iter()
            .any(|l| l.starts_with("B") && l.contains(&format!("{:?}", b"param".to_vec()))),
        "{seen:?}"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn the_database_can_be_reached_over_its_unix_socket() {
    let db = TestDb::new();
    db.psql("CREATE TABLE t (id int PRIMARY KEY, v text)");
    // The upstream as `pgfire run` derives it from a socket-directory DATABASE_URL.
    let dir = cluster()
        .socket_dir
        .display()
        .to_string()
        .replace('/', "%2F");
    let database_url = format!("postgres://postgres@{dir}:{}/{}", cluster().port, db.name);
    let args = pgfire::proxy::ProxyArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        no_proxy: false,
        tls_cert: None,
        tls_key: None,
        max_client_connections: 10,
        startup_timeout: 10,
        shutdown_timeout: 5,
    };
    let upstream = ProxyConfig::from_args(&args, &database_url)
        .unwrap()
        .upstream;
    let Upstream::Unix(path) = &upstream else {
        panic!("expected a Unix socket upstream, got {upstream:?}");
    };
    assert_eq!(
        path,
        &cluster()
            .socket_dir
            .join(format!(".s.PGSQL.{}", cluster().port))
    );
    let proxy = Proxy::with(|c| c.upstream = upstream.clone()).await;
    let client = connect(&proxy.url(&db)).await;
    // Pipelined statements, COPY both ways, a large result and an error.
    let stmt = client
        .prepare("INSERT INTO t VALUES ($1, $2)")
        .await
        .unwrap();
    let values: Vec<(i32, String)> = (0..100).map(|i| (i, format!("v{i}"))).collect();
    let inserts: Vec<_> = values
        .iter()
        .map(|(i, v)| {
            let (client, stmt) = (&client, &stmt);
            async move { client.execute(stmt, &[i, v]).await }
        })
        .collect();
    for r in futures_util::future::join_all(inserts).await {
        assert_eq!(r.unwrap(), 1);
    }
    let sink = client.copy_in("COPY t FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"1000\tcopied\n"))
        .await
        .unwrap();
    assert_eq!(sink.finish().await.unwrap(), 1);
    let out = client
        .copy_out("COPY (SELECT count(*) FROM t) TO STDOUT")
        .await
        .unwrap();
    let chunks: Vec<_> = out.collect().await;
    assert_eq!(chunks.concat_bytes(), b"101\n");
    let n: i64 = client
        .query_one(
            "SELECT count(*) FROM (SELECT repeat('x', 100) FROM generate_series(1, 200000)) s",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 200_000);
    let rows = client
        .query(
            "SELECT repeat('y', 100) FROM generate_series(1, 100000)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 100_000);
    let err = client
        .execute("INSERT INTO t VALUES (1, 'dup')", &[])
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), "23505");
    assert_eq!(
        client
            .query_one("SELECT 1", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        1
    );
}

/// A session spoken in raw frames: the startup packet as `postgres` with `params`, read up to the
/// first ReadyForQuery.
async fn raw_session(
    addr: SocketAddr,
    db: &TestDb,
    params: &[(&str, &str)],
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut out = bytes::BytesMut::new();
    let all = [("user", "postgres"), ("database", db.name.as_str())];
    postgres_protocol::message::frontend::startup_message(
        all.iter().chain(params).copied(),
        &mut out,
    )
    .unwrap();
    s.write_all(&out).await.unwrap();
    until_ready(&mut s).await;
    s
}

/// The frames the server sends up to and including the next ReadyForQuery.
async fn until_ready(s: &mut tokio::net::TcpStream) -> Vec<(u8, Vec<u8>)> {
    let mut frames = Vec::new();
    loop {
        let frame = read_frame(s).await.expect("a ReadyForQuery before the end");
        let ready = frame.0 == b'Z';
        frames.push(frame);
        if ready {
            return frames;
        }
    }
}

/// A simple Query frame of raw bytes (in the client's encoding, not necessarily UTF-8).
fn query_frame(sql: &[u8]) -> Vec<u8> {
    let mut f = vec![b'Q'];
    f.extend_from_slice(&(sql.len() as i32 + 5).to_be_bytes());
    f.extend_from_slice(sql);
    f.push(0);
    f
}

/// The value of field `field` of an ErrorResponse body.
fn error_field(body: &[u8], field: u8) -> Option<&[u8]> {
    body.split(|b| *b == 0)
        .find(|f| f.first() == Some(&field))
        .map(|f| &f[1..])
}

#[tokio::test]
async fn an_error_in_a_non_utf8_client_encoding_is_an_ordinary_error() {
    use tokio::io::AsyncWriteExt;
    let db = TestDb::new();
    db.psql("CREATE TABLE people (name text PRIMARY KEY)");
    let proxy = Proxy::start().await;
    // 'Müller' in WIN1252: the ü is the byte 0xFC, which is not UTF-8.
    let insert = query_frame(b"INSERT INTO people VALUES ('M\xfcller')");
    let mut replies = Vec::new();
    for (i, addr) in [cluster_addr(), proxy.addr].into_iter().enumerate() {
        let mut s = raw_session(addr, &db, &[("client_encoding", "WIN1252")]).await;
        if i == 0 {
            s.write_all(&insert).await.unwrap();
            assert_eq!(until_ready(&mut s).await.last().unwrap().1, b"I");
        }
        s.write_all(&insert).await.unwrap();
        let frames = until_ready(&mut s).await;
        let (tag, body) = &frames[0];
        assert_eq!(*tag, b'E', "{frames:?}");
        assert_eq!(error_field(body, b'V'), Some(&b"ERROR"[..]));
        assert_eq!(error_field(body, b'C'), Some(&b"23505"[..]));
        assert_eq!(
            error_field(body, b'D'),
            Some(&b"Key (name)=(M\xfcller) already exists."[..])
        );
        // The session goes on.
        s.write_all(&query_frame(b"SELECT name FROM people"))
            .await
            .unwrap();
        let rows = until_ready(&mut s).await;
        assert!(
            rows.iter()
                .any(|(t, b)| *t == b'D' && b.ends_with(b"M\xfcller")),
            "{rows:?}"
        );
        replies.push(frames);
    }
    assert_eq!(
        replies[0], replies[1],
        "the same reply direct and through the proxy"
    );
}

fn cluster_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], cluster().port))
}

/// Wait until a backend of `db` runs a statement containing `text`.
async fn running(db: &TestDb, text: &str) {
    let c = connect(&db.url()).await;
    crate::support::eventually(Duration::from_secs(15), text, || async {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND state = 'active'
                    AND strpos(query, $1) > 0 AND pid <> pg_backend_pid()",
                &[&text],
            )
            .await
            .unwrap()
            .get(0);
        (n > 0).then_some(())
    })
    .await
}

#[tokio::test]
async fn shutdown_lets_pipelined_queries_finish_first() {
    use postgres_protocol::message::frontend;
    use tokio::io::AsyncWriteExt;
    let db = TestDb::new();
    db.psql("CREATE TABLE c (x int)");
    let proxy = Proxy::with(|c| c.shutdown_timeout = Duration::from_secs(20)).await;
    // Simple protocol: two queries in one write; the second sleeps.
    let mut simple = raw_session(proxy.addr, &db, &[]).await;
    let mut out = query_frame(b"SELECT 1");
    out.extend(query_frame(b"SELECT 'simple done' FROM pg_sleep(1)"));
    simple.write_all(&out).await.unwrap();
    // Extended protocol: two statements, each with its own Sync, in one write.
    let mut extended = raw_session(proxy.addr, &db, &[]).await;
    let mut out = bytes::BytesMut::new();
    for sql in ["SELECT 1", "SELECT 'extended done' FROM pg_sleep(1)"] {
        frontend::parse("", sql, [], &mut out).unwrap();
        let no_params: [Option<&[u8]>; 0] = [];
        frontend::bind(
            "",
            "",
            [0i16; 0],
            no_params,
            |_, _| Ok(postgres_protocol::IsNull::No),
            [0i16; 0],
            &mut out,
        )
        .map_err(|_| ())
        .unwrap();
        frontend::execute("", 0, &mut out).unwrap();
        frontend::sync(&mut out);
    }
    extended.write_all(&out).await.unwrap();
    // A session that did COPY FROM STDIN (whose Sync before the data the server ignores) and is
    // idle since: it is closed at once, not at the deadline.
    let copied = connect(&proxy.url(&db)).await;
    let sink = copied.copy_in("COPY c FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"1\n2\n"))
        .await
        .unwrap();
    assert_eq!(sink.finish().await.unwrap(), 2);

    running(&db, "'simple done'").await;
    running(&db, "'extended done'").await;
    proxy.shutdown.cancel();
    for (s, done) in [
        (&mut simple, "simple done"),
        (&mut extended, "extended done"),
    ] {
        let mut frames = Vec::new();
        while let Some(f) = read_frame(s).await {
            frames.push(f);
        }
        let tags: String = frames.iter().map(|(t, _)| *t as char).collect();
        let row = frames
            .iter()
            .position(|(t, b)| *t == b'D' && b.ends_with(done.as_bytes()));
        assert!(
            row.is_some(),
            "{done}: the second query's row arrives ({tags})"
        );
        let (tag, body) = frames.last().unwrap();
        assert_eq!(*tag, b'E', "{tags}");
        assert_eq!(error_field(body, b'C'), Some(&b"57P01"[..]), "{tags}");
        assert!(
            tags.ends_with("CZE"),
            "closed only after the ReadyForQuery: {tags}"
        );
    }
    tokio::time::timeout(Duration::from_secs(5), proxy.task)
        .await
        .expect("every session closed well before the shutdown timeout")
        .unwrap()
        .unwrap();
    assert!(copied.simple_query("SELECT 1").await.is_err());
}

trait ConcatBytes {
    fn concat_bytes(&self) -> Vec<u8>;
}

impl ConcatBytes for Vec<Result<bytes::Bytes, tokio_postgres::Error>> {
    fn concat_bytes(&self) -> Vec<u8> {
        self.iter()
            .flat_map(|c| c.as_ref().unwrap().to_vec())
            .collect()
    }
}
