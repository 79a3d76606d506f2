//! The dashboard on the admin endpoint: over HTTP (token, CSRF, Host, escaping of hostile
//! values, readable errors) and in headless Chromium through the seed's flows
//! (tests/clients/browser/dashboard.js, screenshots under target/artifacts/dashboard).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::webhook::Receiver;
use crate::support::{count, eventually, init_logs, install_pgfire, start_service, texts, TestDb};

const WAIT: Duration = Duration::from_secs(30);

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// The CSRF secret a page carries.
fn csrf_of(html: &str) -> String {
    let at = html
        .find("name=\"csrf-token\" content=\"")
        .expect("csrf meta")
        + 27;
    html[at..at + 64].to_string()
}

/// The flash message a redirect carries (decoded from its cookie).
fn flash_of(resp: &reqwest::Response) -> String {
    use base64::Engine;
    let cookie = resp
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let value = cookie
        .strip_prefix("pgfire_flash=")
        .and_then(|v| v.split(';').next())
        .unwrap_or("");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(value)
        .unwrap_or_default();
    String::from_utf8_lossy(&raw).into_owned()
}

#[tokio::test]
async fn forms_need_the_csrf_secret_and_errors_read_as_messages() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    db.psql("INSERT INTO pgfire.functions (name, kind) VALUES ('audit', 'log')");
    let service = start_service(&db).await;
    let base = format!("http://{}", service.admin_addr.unwrap());
    let h = http();
    let page = h.get(&base).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    let html = page.text().await.unwrap();
    let csrf = csrf_of(&html);
    let subscribe = |form: Vec<(&'static str, String)>, origin: Option<&'static str>| {
        let mut req = h.post(format!("{base}/events/subscribe")).form(&form);
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        req.send()
    };
    let form = |csrf: &str, function: &str, priority: &str| {
        vec![
            ("csrf", csrf.to_string()),
            ("event", "POST_USER_CREATE".to_string()),
            ("function", function.to_string()),
            ("priority", priority.to_string()),
        ]
    };
    let c = db.client().await;
    let subs = || texts(&c, "SELECT function_name FROM pgfire.subscriptions");

    // No secret, a wrong one, or another site's page: refused, nothing written.
    let r = h
        .post(format!("{base}/events/subscribe"))
        .form(&[
            ("event", "POST_USER_CREATE"),
            ("function", "audit"),
            ("priority", "0"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("CSRF token does not match"));
    assert_eq!(
        subscribe(form("0".repeat(64).as_str(), "audit", "0"), None)
            .await
            .unwrap()
            .status(),
        403
    );
    let r = subscribe(form(&csrf, "audit", "0"), Some("http://evil.example"))
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("came from another site"));
    let r = h
        .post(format!("{base}/events/subscribe"))
        .header("sec-fetch-site", "cross-site")
        .header("x-csrf-token", &csrf)
        .form(&form(&csrf, "audit", "0"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(subs().await.is_empty());

    // The dashboard's own form: done, and back to the card.
    let r = subscribe(form(&csrf, "audit", "0"), None).await.unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(
        r.headers()["location"],
        "/?open=POST_USER_CREATE#event-POST_USER_CREATE"
    );
    assert_eq!(flash_of(&r), "oSubscribed audit to POST_USER_CREATE.");
    assert_eq!(subs().await, ["audit"]);

    // Database errors come back as messages on the page, never a bare 500.
    let r = subscribe(form(&csrf, "nobody", "0"), None).await.unwrap();
    assert_eq!(
        flash_of(&r),
        "eunknown function \"nobody\" (pgfire functions lists them)"
    );
    let r = subscribe(form(&csrf, "audit", "first"), None)
        .await
        .unwrap();
    assert!(
        flash_of(&r).contains("priority must be a whole number"),
        "{}",
        flash_of(&r)
    );
    let r = h
        .post(format!("{base}/events/subscribe"))
        .form(&[("csrf", csrf.as_str()), ("event", "POST_USER_CREATE")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert!(flash_of(&r).contains("the form was incomplete"));
    let r = h
        .get(format!(
            "{base}/events/unsubscribe?event=POST_LOGIN&function=audit"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("function &quot;audit&quot; is not subscribed to POST_LOGIN"));
    let r = h.get(format!("{base}/no/such/page")).send().await.unwrap();
    assert_eq!(r.status(), 404);

    // The limit of 10, on the card and as the error of an 11th.
    db.psql(
        "INSERT INTO pgfire.functions (name, kind) SELECT 'f' || i, 'log' FROM generate_series(1, 10) i;
         INSERT INTO pgfire.subscriptions (event_type, function_name) SELECT 'POST_LOGIN', 'f' || i FROM generate_series(1, 10) i",
    );
    let html = h
        .get(format!("{base}/?open=POST_LOGIN"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        html.contains("Limit reached: POST_LOGIN has 10 active subscriptions"),
        "{html}"
    );
    let r = h
        .post(format!("{base}/events/subscribe"))
        .form(&[
            ("csrf", csrf.as_str()),
            ("event", "POST_LOGIN"),
            ("function", "audit"),
            ("priority", "0"),
        ])
        .send()
        .await
        .unwrap();
    let flash = flash_of(&r);
    assert!(
        flash.starts_with("elimit reached: event POST_LOGIN already has 10 active subscriptions"),
        "{flash}"
    );
    // The next page shows it, once.
    let cookie = r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let page = h
        .get(format!("{base}/?open=POST_LOGIN"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert!(page.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
    let html = page.text().await.unwrap();
    assert!(
        html.contains("role=\"alert\">limit reached: event POST_LOGIN already has 10"),
        "{html}"
    );

    // Activating an 11th is refused the same way; deactivating one makes room.
    db.psql("INSERT INTO pgfire.subscriptions (event_type, function_name, active) VALUES ('POST_LOGIN', 'audit', false)");
    let toggle = |function: &'static str, active: &'static str| {
        h.post(format!("{base}/events/active"))
            .form(&[
                ("csrf", csrf.as_str()),
                ("event", "POST_LOGIN"),
                ("function", function),
                ("active", active),
            ])
            .send()
    };
    let r = toggle("audit", "true").await.unwrap();
    assert!(
        flash_of(&r).starts_with("elimit reached"),
        "{}",
        flash_of(&r)
    );
    let r = toggle("f1", "false").await.unwrap();
    assert_eq!(
        flash_of(&r),
        "oThe subscription of f1 to POST_LOGIN is inactive."
    );
    let r = toggle("audit", "true").await.unwrap();
    assert_eq!(
        flash_of(&r),
        "oThe subscription of audit to POST_LOGIN is active."
    );
    let html = h
        .get(format!("{base}/?open=POST_LOGIN"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(html.contains("11 subscribers, 10 active"), "{html}");
    // A function deactivated from its page.
    let r = h
        .post(format!("{base}/functions/active"))
        .form(&[
            ("csrf", csrf.as_str()),
            ("function", "audit"),
            ("active", "false"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(flash_of(&r), "oaudit is inactive.");
    assert_eq!(
        texts(
            &c,
            "SELECT active::text FROM pgfire.functions WHERE name = 'audit'"
        )
        .await,
        ["false"]
    );
    let html = h
        .get(format!("{base}/?open=POST_LOGIN"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(html.contains("(the function is inactive)"), "{html}");
    service.stop().await;
}

#[tokio::test]
async fn hostile_names_and_errors_are_shown_as_text() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    const XSS: &str = "<script>alert(1)</script><img src=x onerror=alert(2)>";
    db.psql(&format!(
        "INSERT INTO pgfire.event_types (name, phase, description, custom) VALUES ('ORDER_SHIPPED', 'post', $x${XSS}\"'$x$, true);
         INSERT INTO pgfire.functions (name, kind, target) VALUES ('hook', 'webhook', $x$http://127.0.0.1:9/\"><script>alert(3)</script>$x$);
         INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('ORDER_SHIPPED', 'hook');
         INSERT INTO pgfire.executions (event_id, event_type, function_name, attempt, status, started_at, duration_ms, error)
         VALUES ('e1', 'ORDER_SHIPPED', 'hook', 1, 'error', now(), 1, $x$POST answered 500: {XSS}$x$)"
    ));
    let service = start_service(&db).await;
    let base = format!("http://{}", service.admin_addr.unwrap());
    let h = http();
    for path in [
        "/",
        "/?open=ORDER_SHIPPED",
        "/functions",
        "/executions",
        "/executions?function=%3Cscript%3E",
    ] {
        let html = h
            .get(format!("{base}{path}"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            !html.contains("<script>") && !html.contains("<img"),
            "{path}: {html}"
        );
        // (the filtered list is empty: nothing of the hostile rows to show there)
        assert!(
            path.contains("function=") || html.contains("&lt;script&gt;"),
            "{path} shows the text: {html}"
        );
    }
    let json = h
        .get(format!("{base}/api/executions?after=0"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(
        v["rows"][0].as_str().unwrap().contains("&lt;img src=x"),
        "{v}"
    );
    assert!(
        v["runs"][0]["error"].as_str().unwrap().contains(XSS),
        "JSON keeps the raw text"
    );
    service.stop().await;
}

#[tokio::test]
async fn a_token_guards_every_request_and_off_loopback_one_is_required() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    init_logs();
    let mut cfg = pgfire::service::ServiceConfig::new(db.url());
    cfg.admin_listen = Some("0.0.0.0:0".parse().unwrap());
    let err = pgfire::service::Service::start(cfg.clone())
        .await
        .err()
        .expect("refused");
    assert!(
        format!("{err:#}").contains("not a loopback address"),
        "{err:#}"
    );
    cfg.admin_token = Some("short".into());
    let err = pgfire::service::Service::start(cfg.clone())
        .await
        .err()
        .expect("refused");
    assert!(
        format!("{err:#}").contains("at least 16 characters"),
        "{err:#}"
    );

    const TOKEN: &str = "test-token-0123456789abcdef";
    cfg.admin_token = Some(TOKEN.into());
    cfg.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    let service = pgfire::service::Service::start(cfg).await.unwrap();
    let base = format!("http://{}", service.admin_addr.unwrap());
    let h = http();
    for path in [
        "/",
        "/functions",
        "/executions",
        "/api/status",
        "/metrics",
        "/healthz",
        "/assets/app.js",
    ] {
        let r = h.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
    }
    let r = h
        .get(format!("{base}/functions"))
        .bearer_auth("wrong-token-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = h
        .get(format!("{base}/functions"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Opened once with ?token=, the address drops it and a cookie keeps it.
    let r = h
        .get(format!("{base}/executions?token={TOKEN}&status=ok"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/executions?status=ok");
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let cookie = cookie.split(';').next().unwrap().to_string();
    let r = h
        .get(format!("{base}/executions?status=ok"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // With a token, any Host name is fine; without one only loopback names are (DNS rebinding).
    let r = h
        .get(format!("{base}/"))
        .header("host", "pgfire.internal:9187")
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    service.stop().await;

    let service = start_service(&db).await;
    let base = format!("http://{}", service.admin_addr.unwrap());
    let r = h
        .get(format!("{base}/"))
        .header("host", "evil.example:9187")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("answers only to loopback names"));
    let r = h
        .get(format!("{base}/"))
        .header("host", "localhost:9187")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    service.stop().await;
}

#[tokio::test]
async fn send_test_event_shows_the_answer() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    let receiver = Receiver::with_statuses(vec![202]).await;
    db.psql(&format!(
        "CREATE FUNCTION public.check_user(e jsonb) RETURNS jsonb LANGUAGE sql AS $$
             SELECT jsonb_build_object('allow', false, 'message', 'no ' || (e->'event_data'->>'email'))
         $$;
         CREATE FUNCTION public.broken(e jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'it broke'; END $$;
         INSERT INTO pgfire.functions (name, kind, target) VALUES
             ('notify', 'webhook', '{}'), ('check', 'sql', 'public.check_user'), ('broken', 'sql', 'public.broken');",
        receiver.url("/hook")
    ));
    let service = start_service(&db).await;
    let base = format!("http://{}", service.admin_addr.unwrap());
    let h = http();
    let csrf = csrf_of(
        &h.get(format!("{base}/functions"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    let test = |function: &'static str, event: &'static str| {
        h.post(format!("{base}/functions/test"))
            .form(&[
                ("csrf", csrf.as_str()),
                ("function", function),
                ("event", event),
            ])
            .send()
    };
    let html = test("notify", "POST_USER_CREATE")
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        html.contains("id=\"probe-verdict\">HTTP 202: accepted"),
        "{html}"
    );
    let got = receiver.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].json()["event_type"], "POST_USER_CREATE");
    assert!(got[0].header("webhook-signature").starts_with("v1,"));

    let html = test("check", "PRE_USER_CREATE")
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        html.contains(
            "{&quot;allow&quot;: false, &quot;message&quot;: &quot;no ada@example.com&quot;}"
        ),
        "the PRE answer: {html}"
    );
    let html = test("broken", "POST_LOGIN")
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        html.contains("failed") && html.contains("it broke"),
        "{html}"
    );
    let html = test("nobody", "POST_LOGIN")
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        html.contains("unknown function &quot;nobody&quot;"),
        "{html}"
    );
    let c = db.client().await;
    assert!(
        texts(&c, "SELECT function_name FROM pgfire.executions")
            .await
            .is_empty(),
        "a probe is not history"
    );
    service.stop().await;
}

/// The node script's directory, with playwright-core installed by scripts/test.
fn browser_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients");
    if !root.join("node_modules/playwright-core").exists()
        || !Path::new("/usr/bin/chromium").exists()
    {
        panic!("the browser tests need chromium and playwright-core: run scripts/test (it installs them)");
    }
    root
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_flows_work_in_a_real_browser() {
    let root = browser_dir();
    let db = TestDb::new();
    install_pgfire(&db).await;
    let receiver = Receiver::start().await;
    let flaky = Flaky::start().await;
    db.psql(&format!(
        "CREATE TABLE public.users (id bigserial PRIMARY KEY, email text NOT NULL);
         INSERT INTO pgfire.sources (table_name, kind) VALUES ('public.users', 'user');
         CREATE FUNCTION public.reject(e jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'mailbox full for %', e->'event_data'->>'email'; END $$;
         INSERT INTO pgfire.functions (name, kind, target) VALUES
             ('notify', 'webhook', '{}'), ('welcome_mail', 'sql', 'public.reject');
         INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('POST_USER_CREATE', 'welcome_mail');
         UPDATE pgfire.settings SET value = '1' WHERE key = 'delivery.max_attempts';
         INSERT INTO pgfire.functions (name, kind, target, max_attempts) VALUES ('flaky', 'webhook', '{}', 1);
         INSERT INTO pgfire.event_types (name, description) VALUES ('ORDER_SHIPPED', 'An order left the warehouse');
         INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('ORDER_SHIPPED', 'flaky');",
        receiver.url("/hook"),
        flaky.hook()
    ));
    let service = start_service(&db).await;
    let base = format!("http://{}", service.admin_addr.unwrap());
    // A failed run to find in the history.
    db.psql("INSERT INTO users (email) VALUES ('ada@example.com')");
    let c = db.client().await;
    eventually(WAIT, "the failed run of welcome_mail", || async {
        let n = texts(
            &c,
            "SELECT status FROM pgfire.executions WHERE function_name = 'welcome_mail'",
        )
        .await;
        (!n.is_empty() && n.iter().all(|s| s != "ok")).then_some(())
    })
    .await;
    // A dead run to redeliver once its endpoint works again.
    db.psql("SELECT pgfire.emit('ORDER_SHIPPED', '{\"order\": 7}')");
    eventually(WAIT, "the dead run of flaky", || async {
        let dead = texts(&c, "SELECT status FROM pgfire.parked WHERE function_name = 'flaky' AND status = 'dead'").await;
        let recorded = texts(&c, "SELECT status FROM pgfire.executions WHERE function_name = 'flaky' AND status = 'dead'").await;
        (!dead.is_empty() && !recorded.is_empty()).then_some(())
    })
    .await;

    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/artifacts/dashboard");
    std::fs::create_dir_all(&shots).unwrap();
    let _ = std::fs::remove_file(shots.join("failure.png"));
    let url = db.url();
    let control = flaky.control();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(root.join("browser/dashboard.js"))
            .arg(&base)
            .arg(&shots)
            .env("DATABASE_URL", url)
            .env("FLAKY_CONTROL", control)
            .current_dir(&root)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the browser flows failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("dashboard flows ok"), "{stdout}");
    // What the browser did is what psql sees.
    assert!(
        texts(
            &c,
            "SELECT function_name FROM pgfire.subscriptions WHERE event_type = 'POST_USER_CREATE'"
        )
        .await
            == ["welcome_mail"]
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM pgfire.executions WHERE function_name = 'flaky' AND status = 'ok'").await,
        1,
        "the redelivered run succeeded"
    );
    assert!(
        !receiver.received().is_empty(),
        "the test event and the live run reached the webhook"
    );
    service.stop().await;
}

#[tokio::test]
async fn pages_say_when_the_database_cannot_be_reached() {
    let db = TestDb::new();
    install_pgfire(&db).await;
    let service = start_service(&db).await;
    let base = format!("http://{}", service.admin_addr.unwrap());
    let h = http();
    assert_eq!(h.get(&base).send().await.unwrap().status(), 200);
    // No new connections to the database, and the dashboard's own one ended.
    let admin = db.cluster.url("postgres");
    let (c, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c.batch_execute(&format!(
        "ALTER DATABASE {0} ALLOW_CONNECTIONS false;
         SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{0}' AND backend_type = 'client backend'",
        db.name
    ))
    .await
    .unwrap();
    for path in ["/", "/functions", "/executions"] {
        let r = h.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 503, "{path}");
        let html = r.text().await.unwrap();
        assert!(
            html.contains("role=\"alert\">cannot reach the database:")
                && html.contains("<h1>Something went wrong</h1>"),
            "{path}: {html}"
        );
    }
    let r = h.get(format!("{base}/api/functions")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .starts_with("cannot reach the database"),
        "{v}"
    );
    c.batch_execute(&format!(
        "ALTER DATABASE {} ALLOW_CONNECTIONS true",
        db.name
    ))
    .await
    .unwrap();
    eventually(WAIT, "the dashboard to reconnect", || async {
        let r = h.get(&base).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    service.stop().await;
}

/// A webhook endpoint that fails (500, "try later <b>…</b>") until `POST /control/heal`.
struct Flaky {
    addr: std::net::SocketAddr,
}

impl Flaky {
    async fn start() -> Flaky {
        use axum::routing::post;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let healed = Arc::new(AtomicBool::new(false));
        let h = healed.clone();
        let app = axum::Router::new()
            .route(
                "/control/heal",
                post(move || {
                    h.store(true, Ordering::SeqCst);
                    async { "healed" }
                }),
            )
            .route(
                "/hook",
                post(move || {
                    let ok = healed.load(Ordering::SeqCst);
                    async move {
                        match ok {
                            true => (axum::http::StatusCode::OK, "ok".to_string()),
                            false => (
                                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                                "try later <b>soon</b>".to_string(),
                            ),
                        }
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Flaky { addr }
    }

    fn hook(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn control(&self) -> String {
        format!("http://{}/control/heal", self.addr)
    }
}
