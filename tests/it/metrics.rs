//! `/metrics` end to end: one pgfire (consumer, delivery, proxy with PRE hooks, admin) on a test
//! database; row and custom events, runs that succeed, fail and park, or die, PRE decisions that
//! allow, block, modify and shadow-block, statements the proxy streams, holds and refuses. Every
//! line of the scrape is checked against the exposition format, then the values.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tokio_postgres::NoTls;

use crate::support::{caught_up, count, eventually, install_pgfire, TestDb};

const WAIT: Duration = Duration::from_secs(60);
const SECRET: &str = "whsec_bWV0cmljcy1zZWNyZXQtbmV2ZXItc2hvd24=";
const ROW_VALUE: &str = "row-value-alice@example.com";

const SETUP: &str = r#"
CREATE TABLE items (id int PRIMARY KEY, fail bool NOT NULL, note text);
INSERT INTO pgfire.sources (table_name, kind) VALUES ('items', 'record');
CREATE FUNCTION fine(e jsonb) RETURNS void LANGUAGE sql AS $$ SELECT $$;
CREATE FUNCTION failing(e jsonb) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF (e->'event_data'->>'fail')::bool THEN
        RAISE EXCEPTION 'refusing this one';
    END IF;
END $$;
CREATE FUNCTION sleepy(e jsonb) RETURNS void LANGUAGE sql AS $$ SELECT pg_sleep(3) $$;
UPDATE pgfire.settings SET value = '1' WHERE key = 'delivery.memory_attempts';
UPDATE pgfire.settings SET value = '3600000' WHERE key = 'delivery.retry_base_ms';
UPDATE pgfire.settings SET value = '3600000' WHERE key = 'delivery.retry_max_ms';
INSERT INTO pgfire.functions (name, kind, target) VALUES ('fine', 'sql', 'fine'), ('sleepy', 'sql', 'sleepy');
INSERT INTO pgfire.functions (name, kind, target, max_attempts) VALUES ('parks', 'sql', 'failing', 100), ('dies', 'sql', 'failing', 1);
INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES
  ('POST_RECORD_CREATE', 'fine'), ('POST_RECORD_CREATE', 'parks'), ('POST_RECORD_CREATE', 'dies'),
  ('ORDER_SHIPPED', 'fine'), ('SLOW_EVENT', 'sleepy');

CREATE TABLE users (id serial PRIMARY KEY, email text NOT NULL, name text);
INSERT INTO pgfire.sources (table_name, kind) VALUES ('users', 'user');
CREATE FUNCTION check_email(e jsonb) RETURNS jsonb LANGUAGE sql AS $$
  SELECT CASE WHEN e->'event_data'->>'email' LIKE '%_@_%' THEN '{"allow": true}'::jsonb
              ELSE '{"allow": false, "message": "Invalid email address"}'::jsonb END $$;
CREATE FUNCTION set_name(e jsonb) RETURNS jsonb LANGUAGE sql AS $$
  SELECT '{"allow": true, "data": {"name": "renamed"}}'::jsonb $$;
CREATE FUNCTION refuse(e jsonb) RETURNS jsonb LANGUAGE sql AS $$
  SELECT '{"allow": false, "message": "no"}'::jsonb $$;
INSERT INTO pgfire.functions (name, kind, target) VALUES
  ('check_email', 'sql', 'check_email'), ('set_name', 'sql', 'set_name'), ('refuse', 'sql', 'refuse');
INSERT INTO pgfire.subscriptions (event_type, function_name, priority, shadow) VALUES
  ('PRE_USER_CREATE', 'refuse', 0, true), ('PRE_USER_CREATE', 'check_email', 1, false),
  ('PRE_USER_CREATE', 'set_name', 2, false);
"#;

#[tokio::test]
async fn metrics_count_events_runs_pre_decisions_and_statements() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    db.psql(SETUP);
    db.psql(&format!(
        "UPDATE pgfire.functions SET secret = '{SECRET}' WHERE name = 'fine'"
    ));
    let service = start(&db).await;
    let admin = service.admin_addr.unwrap();
    let c = db.client().await;

    // POST: two row events (one makes `parks` fail and park, `dies` fail for good), one custom.
    c.batch_execute(&format!(
        "INSERT INTO items VALUES (1, false, '{ROW_VALUE}'), (2, true, '{ROW_VALUE}');
         SELECT pgfire.emit('ORDER_SHIPPED', '{{\"id\": 1}}'::jsonb);"
    ))
    .await
    .unwrap();
    caught_up(&db).await;

    // PRE and proxy statements, through the proxy.
    let url = format!(
        "postgres://postgres@{}/{}",
        service.proxy_addr.unwrap(),
        db.name
    );
    let (p, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(conn);
    p.simple_query("SELECT 1").await.unwrap();
    // The extended protocol: a Parse, streamed.
    let one: i32 = p
        .query_one("SELECT $1::int4", &[&1i32])
        .await
        .unwrap()
        .get(0);
    assert_eq!(one, 1);
    p.simple_query(&format!(
        "INSERT INTO users (email, name) VALUES ('{ROW_VALUE}', 'x')"
    ))
    .await
    .unwrap();
    let blocked = p
        .simple_query("INSERT INTO users (email) VALUES ('not-an-email')")
        .await
        .unwrap_err();
    let message = |e: &tokio_postgres::Error| e.as_db_error().map(|d| d.message().to_string());
    assert_eq!(message(&blocked).as_deref(), Some("Invalid email address"));
    let refused = p.simple_query("TRUNCATE users").await.unwrap_err();
    assert!(
        message(&refused).is_some_and(|m| m.contains("TRUNCATE")),
        "{refused:?}"
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM users WHERE name = 'renamed'").await,
        1
    );

    let m = eventually(
        WAIT,
        "every run counted and the parked run seen",
        || async {
            let m = scrape(admin).await;
            let done = m.get(
                "pgfire_function_runs_total",
                &[("function", "dies"), ("status", "dead")],
            ) == Some(1.0)
                && m.get("pgfire_parked_runs", &[("function", "parks")]) == Some(1.0)
                && m.get("pgfire_dead_runs", &[("function", "dies")]) == Some(1.0)
                && m.get(
                    "pgfire_function_runs_total",
                    &[("function", "set_name"), ("status", "modified")],
                ) == Some(1.0);
            done.then_some(m)
        },
    )
    .await;

    // Events by type.
    let events = |t: &str| m.get("pgfire_events_total", &[("type", t)]);
    assert_eq!(events("POST_RECORD_CREATE"), Some(2.0));
    assert_eq!(events("ORDER_SHIPPED"), Some(1.0));
    assert_eq!(
        events("PRE_USER_CREATE"),
        None,
        "PRE events are not stream events"
    );

    // POST runs by function and status, and their durations.
    let runs = |f: &str, phase: &str, status: &str| {
        m.get(
            "pgfire_function_runs_total",
            &[("function", f), ("phase", phase), ("status", status)],
        )
    };
    assert_eq!(runs("fine", "post", "ok"), Some(3.0));
    assert_eq!(runs("fine", "post", "error"), Some(0.0));
    assert_eq!(runs("parks", "post", "ok"), Some(1.0));
    assert_eq!(runs("parks", "post", "error"), Some(1.0));
    assert_eq!(runs("dies", "post", "ok"), Some(1.0));
    assert_eq!(runs("dies", "post", "dead"), Some(1.0));
    assert_eq!(
        runs("dies", "post", "blocked"),
        None,
        "no PRE status on POST"
    );
    let duration = |f: &str, phase: &str, suffix: &str, le: Option<&str>| {
        let mut labels = vec![("function", f), ("phase", phase)];
        labels.extend(le.map(|le| ("le", le)));
        m.get(
            &format!("pgfire_function_run_duration_seconds{suffix}"),
            &labels,
        )
    };
    assert_eq!(duration("fine", "post", "_count", None), Some(3.0));
    assert_eq!(duration("fine", "post", "_bucket", Some("+Inf")), Some(3.0));
    assert!(duration("fine", "post", "_sum", None).unwrap() > 0.0);
    assert_eq!(duration("dies", "post", "_count", None), Some(2.0));
    assert_eq!(m.get("pgfire_runs_parked_total", &[]), Some(1.0));
    assert_eq!(m.get("pgfire_runs_dead_total", &[]), Some(1.0));
    assert_eq!(
        m.get("pgfire_parked_runs", &[("function", "fine")]),
        Some(0.0)
    );
    assert_eq!(
        m.get("pgfire_dead_runs", &[("function", "parks")]),
        Some(0.0)
    );

    // PRE runs and decisions.
    assert_eq!(runs("check_email", "pre", "ok"), Some(1.0));
    assert_eq!(runs("check_email", "pre", "blocked"), Some(1.0));
    assert_eq!(runs("set_name", "pre", "modified"), Some(1.0));
    assert_eq!(runs("refuse", "pre", "blocked"), Some(2.0));
    assert_eq!(duration("check_email", "pre", "_count", None), Some(2.0));
    let decision = |f: &str, outcome: &str, shadow: &str| {
        m.get(
            "pgfire_pre_decisions_total",
            &[("function", f), ("outcome", outcome), ("shadow", shadow)],
        )
    };
    assert_eq!(decision("check_email", "allowed", "false"), Some(1.0));
    assert_eq!(decision("check_email", "blocked", "false"), Some(1.0));
    assert_eq!(decision("check_email", "error", "false"), Some(0.0));
    assert_eq!(decision("set_name", "modified", "false"), Some(1.0));
    assert_eq!(decision("refuse", "blocked", "true"), Some(2.0));
    assert_eq!(decision("refuse", "blocked", "false"), Some(0.0));

    // Proxy statements and connections.
    let statements = |a: &str| m.get("pgfire_proxy_statements_total", &[("action", a)]);
    assert_eq!(statements("streamed"), Some(2.0));
    assert_eq!(statements("held"), Some(2.0));
    assert_eq!(statements("refused"), Some(1.0));
    assert_eq!(m.get("pgfire_proxy_connections", &[]), Some(1.0));

    // The stream: connected, caught up (a parked run is settled), the slot's WAL lag read.
    assert_eq!(m.get("pgfire_replication_connected", &[]), Some(1.0));
    assert_eq!(m.get("pgfire_slot_lag_seconds", &[]), Some(0.0));
    assert!(m.get("pgfire_slot_lag_bytes", &[]).unwrap() >= 0.0);
    assert_eq!(m.get("pgfire_metrics_database_up", &[]), Some(1.0));

    // Configuration names only: no row value, no secret.
    assert!(!m.text.contains(ROW_VALUE), "{}", m.text);
    assert!(!m.text.contains("not-an-email"), "{}", m.text);
    assert!(!m.text.contains(SECRET), "{}", m.text);

    // An event whose function takes 3 s: the lag in seconds grows while it runs, then is 0.
    c.batch_execute("SELECT pgfire.emit('SLOW_EVENT', '{}'::jsonb)")
        .await
        .unwrap();
    eventually(WAIT, "the slot lag in seconds to grow", || async {
        let lag = scrape(admin).await.get("pgfire_slot_lag_seconds", &[]);
        lag.filter(|l| *l >= 1.0).map(|_| ())
    })
    .await;
    eventually(WAIT, "the slow event to settle", || async {
        let m = scrape(admin).await;
        (m.get("pgfire_slot_lag_seconds", &[]) == Some(0.0)
            && m.get(
                "pgfire_function_runs_total",
                &[("function", "sleepy"), ("status", "ok")],
            ) == Some(1.0))
        .then_some(())
    })
    .await;
    let m = scrape(admin).await;
    assert_eq!(
        m.get(
            "pgfire_function_run_duration_seconds_bucket",
            &[("function", "sleepy"), ("le", "2.5")]
        ),
        Some(0.0)
    );
    assert_eq!(
        m.get(
            "pgfire_function_run_duration_seconds_bucket",
            &[("function", "sleepy"), ("le", "5")]
        ),
        Some(1.0)
    );
    drop(p);
    service.stop().await;
}

/// The proxy alone, on a database without pgfire: every statement streams, the consumer's
/// families are absent, and the database gauges are missing with `database_up` 0, not an error.
#[tokio::test]
async fn metrics_of_a_proxy_without_hooks_or_consumer() {
    let db = TestDb::new();
    let service = start_with(&db, false).await;
    let url = format!(
        "postgres://postgres@{}/{}",
        service.proxy_addr.unwrap(),
        db.name
    );
    let (p, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(conn);
    p.simple_query("CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let one: i32 = p.query_one("SELECT id FROM t", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    let m = scrape(service.admin_addr.unwrap()).await;
    let statements = |a: &str| m.get("pgfire_proxy_statements_total", &[("action", a)]);
    assert_eq!(statements("streamed"), Some(2.0));
    assert_eq!(statements("held"), Some(0.0));
    assert_eq!(statements("refused"), Some(0.0));
    assert_eq!(m.get("pgfire_replication_connected", &[]), None);
    assert_eq!(m.get("pgfire_slot_lag_seconds", &[]), None);
    assert_eq!(m.get("pgfire_metrics_database_up", &[]), Some(0.0));
    assert!(!m.text.contains("pgfire_parked_runs"), "{}", m.text);
    drop(p);
    service.stop().await;
}

/// pgfire with the consumer, the proxy and the admin endpoint on free ports.
async fn start(db: &TestDb) -> pgfire::service::Service {
    start_with(db, true).await
}

async fn start_with(db: &TestDb, consumer: bool) -> pgfire::service::Service {
    crate::support::init_logs();
    let mut cfg = pgfire::service::ServiceConfig::new(db.url());
    cfg.consumer = consumer;
    cfg.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.status_interval = Duration::from_millis(100);
    cfg.proxy = Some(pgfire::proxy::ProxyArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        no_proxy: false,
        tls_cert: None,
        tls_key: None,
        max_client_connections: 10,
        startup_timeout: 5,
        shutdown_timeout: 5,
    });
    pgfire::service::Service::start(cfg)
        .await
        .expect("start pgfire")
}

async fn scrape(admin: std::net::SocketAddr) -> Scrape {
    let r = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/plain; version=0.0.4");
    let text = r.text().await.unwrap();
    match Scrape::parse(&text) {
        Ok(s) => s,
        Err(e) => panic!("{e}\n{text}"),
    }
}

/// One scrape, checked line by line against the text exposition format.
struct Scrape {
    text: String,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Scrape {
    /// The value of the one sample of `name` whose labels include `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<f64> = self
            .samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).is_some_and(|x| x == v))
            })
            .map(|(_, _, v)| *v)
            .collect();
        assert!(found.len() <= 1, "{name} {labels:?} matches {found:?}");
        found.first().copied()
    }

    fn parse(text: &str) -> Result<Scrape, String> {
        let mut kinds: HashMap<String, String> = HashMap::new();
        let mut helped = std::collections::HashSet::new();
        let mut samples = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, _) = rest.split_once(' ').ok_or(format!("bad HELP: {line}"))?;
                if !helped.insert(name.to_string()) {
                    return Err(format!("second HELP for {name}"));
                }
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').ok_or(format!("bad TYPE: {line}"))?;
                if !matches!(kind, "counter" | "gauge" | "histogram") {
                    return Err(format!("unknown type: {line}"));
                }
                if !helped.contains(name) {
                    return Err(format!("TYPE without HELP first: {line}"));
                }
                if kinds.insert(name.into(), kind.into()).is_some() {
                    return Err(format!("second TYPE for {name}"));
                }
                continue;
            }
            if line.is_empty() || line.starts_with('#') {
                return Err(format!("unexpected line: {line:?}"));
            }
            let (name, labels, value) = sample(line)?;
            // A counter or gauge is its family; a histogram's samples end in a suffix.
            let family = match kinds.get(&name) {
                Some(k) if k != "histogram" => name.as_str(),
                _ => ["_bucket", "_sum", "_count"]
                    .iter()
                    .filter_map(|suffix| name.strip_suffix(suffix))
                    .find(|f| kinds.get(*f).is_some_and(|k| k == "histogram"))
                    .ok_or(format!("sample of no TYPE'd family: {line}"))?,
            };
            if kinds[family] == "counter" && !name.ends_with("_total") {
                return Err(format!("counter without _total: {line}"));
            }
            if kinds[family] == "counter" && value < 0.0 {
                return Err(format!("negative counter: {line}"));
            }
            if !seen.insert((name.clone(), labels.clone())) {
                return Err(format!("duplicate sample: {line}"));
            }
            samples.push((name, labels, value));
        }
        let s = Scrape {
            text: text.to_string(),
            samples,
        };
        for (family, kind) in &kinds {
            if kind == "histogram" {
                s.check_histogram(family)?;
            }
        }
        Ok(s)
    }

    /// Buckets cumulative and ordered by `le`, the last one `+Inf` and equal to `_count`.
    fn check_histogram(&self, family: &str) -> Result<(), String> {
        let mut series: BTreeMap<BTreeMap<String, String>, Vec<(f64, f64)>> = BTreeMap::new();
        for (name, labels, v) in &self.samples {
            if *name != format!("{family}_bucket") {
                continue;
            }
            let mut rest = labels.clone();
            let le = rest
                .remove("le")
                .ok_or(format!("bucket without le: {labels:?}"))?;
            let le: f64 = match le.as_str() {
                "+Inf" => f64::INFINITY,
                x => x.parse().map_err(|_| format!("bad le {x}"))?,
            };
            series.entry(rest).or_default().push((le, *v));
        }
        for (labels, buckets) in series {
            for w in buckets.windows(2) {
                if w[1].0 <= w[0].0 || w[1].1 < w[0].1 {
                    return Err(format!(
                        "{family} {labels:?}: buckets not cumulative: {buckets:?}"
                    ));
                }
            }
            let last = buckets.last().unwrap();
            if last.0 != f64::INFINITY {
                return Err(format!("{family} {labels:?}: no +Inf bucket"));
            }
            let count = self
                .samples
                .iter()
                .find(|(n, l, _)| *n == format!("{family}_count") && *l == labels)
                .map(|s| s.2);
            if count != Some(last.1) {
                return Err(format!(
                    "{family} {labels:?}: +Inf {} but count {count:?}",
                    last.1
                ));
            }
            let has_sum = self
                .samples
                .iter()
                .any(|(n, l, _)| *n == format!("{family}_sum") && *l == labels);
            if !has_sum {
                return Err(format!("{family} {labels:?}: no _sum"));
            }
        }
        Ok(())
    }
}

/// `name{k="v",...} value`: the metric name, label names and the quoting of values checked.
fn sample(line: &str) -> Result<(String, BTreeMap<String, String>, f64), String> {
    let bad = |why: &str| format!("{why}: {line}");
    let name_end = line.find(['{', ' ']).ok_or_else(|| bad("no value"))?;
    let name = &line[..name_end];
    let valid_name = |n: &str, colon: bool| {
        let mut chars = n.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':'))
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':'))
    };
    if !valid_name(name, true) {
        return Err(bad("bad metric name"));
    }
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        loop {
            let start = chars
                .peek()
                .map(|(i, _)| *i)
                .ok_or_else(|| bad("open labels"))?;
            if body[start..].starts_with('}') {
                rest = &body[start + 1..];
                break;
            }
            let eq = body[start..]
                .find('=')
                .ok_or_else(|| bad("label without ="))?
                + start;
            let key = &body[start..eq];
            if !valid_name(key, false) || key.starts_with("__") {
                return Err(bad("bad label name"));
            }
            while chars.peek().is_some_and(|(i, _)| *i <= eq) {
                chars.next();
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(bad("label value not quoted"));
            }
            let mut value = String::new();
            loop {
                match chars.next().map(|(_, c)| c) {
                    Some('"') => break,
                    Some('\\') => match chars.next().map(|(_, c)| c) {
                        Some('\\') => value.push('\\'),
                        Some('"') => value.push('"'),
                        Some('n') => value.push('\n'),
                        _ => return Err(bad("bad escape in label value")),
                    },
                    Some(c) => value.push(c),
                    None => return Err(bad("unterminated label value")),
                }
            }
            if labels.insert(key.to_string(), value).is_some() {
                return Err(bad("label twice"));
            }
            match chars.next().map(|(_, c)| c) {
                Some(',') => {}
                Some('}') => {
                    let end = chars.peek().map_or(body.len(), |(i, _)| *i);
                    rest = &body[end..];
                    break;
                }
                _ => return Err(bad("labels not separated by ,")),
            }
        }
    }
    let value = rest
        .strip_prefix(' ')
        .ok_or_else(|| bad("no space before value"))?;
    let value: f64 = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().map_err(|_| bad("value not a number"))?,
    };
    Ok((name.to_string(), labels, value))
}

#[test]
fn the_format_check_refuses_bad_lines() {
    let ok = "# HELP a_total x\n# TYPE a_total counter\na_total{k=\"v\\\"\"} 1\n";
    assert!(Scrape::parse(ok).is_ok());
    for bad in [
        "a_total 1\n",
        "# HELP a_total x\n# TYPE a_total counter\na_total{k=v} 1\n",
        "# HELP a_total x\n# TYPE a_total counter\na_total{k=\"v\"}1\n",
        "# HELP a_total x\n# TYPE a_total counter\na_total{k=\"v\" 1\n",
        "# HELP a_total x\n# TYPE a_total counter\na_total -1\n",
        "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
        "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 1\n",
    ] {
        assert!(Scrape::parse(bad).is_err(), "{bad}");
    }
}
