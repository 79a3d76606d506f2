//! Code run by a statement (a function, a SECURITY DEFINER function, another trigger, a view)
//! that changes pgfire's settings while the statement runs, and restores them, or keeps a PRE
//! run's mode for later, or disables pgfire's triggers: each write it attempts on a watched table
//! is refused (42501) or decided all the same (the PRE function blocks it), for a superuser and
//! a role without privileges alike, whether the database decides (only `sql` PRE functions) or
//! the proxy does (a webhook in the chain).

use crate::pre::{db_error, setup, PreProxy};
use crate::support::{count, TestDb};

const TAMPER: &str = r#"
CREATE VIEW users_v AS SELECT id, email FROM users;
CREATE FUNCTION flip_and_restore(e text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    mode text := current_setting('pgfire.' || 'pre_mode');
    proxied text := current_setting('pgfire.' || 'proxied');
BEGIN
    PERFORM set_config('pgfire.' || 'proxied', 'off', true);
    PERFORM set_config('pgfire.' || 'pre_mode', '', true);
    INSERT INTO users (email) VALUES (e);
    PERFORM set_config('pgfire.' || 'pre_mode', mode, true);
    PERFORM set_config('pgfire.' || 'proxied', proxied, true);
END $$;
CREATE FUNCTION flip_definer(e text) RETURNS void LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN PERFORM flip_and_restore(e); END $$;
-- Between pgfire's BEFORE and AFTER row triggers (AFTER triggers fire in name order).
CREATE FUNCTION flip_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('x.saved', current_setting('pgfire.' || 'pre_mode'), true);
    PERFORM set_config('pgfire.' || 'pre_mode', '', true);
    RETURN NULL;
END $$;
CREATE FUNCTION restore_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('pgfire.' || 'pre_mode', current_setting('x.saved'), true);
    RETURN NULL;
END $$;
CREATE TRIGGER a_flip AFTER INSERT ON users FOR EACH ROW WHEN (NEW.email LIKE 'flip%') EXECUTE FUNCTION flip_row();
CREATE TRIGGER z_restore AFTER INSERT ON users FOR EACH ROW WHEN (NEW.email LIKE 'flip%') EXECUTE FUNCTION restore_row();
CREATE FUNCTION quiet_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM set_config('client_min_messages', 'warning', true); RETURN NULL; END $$;
CREATE TRIGGER a_quiet AFTER INSERT ON users FOR EACH ROW WHEN (NEW.email LIKE 'quiet%') EXECUTE FUNCTION quiet_row();
-- A mode set for the session by a view that a plain SELECT reads (it streams).
CREATE VIEW forge AS SELECT set_config('pgfire.' || 'pre_mode', 'record:1000', false) AS m;
-- The mode of a held statement kept, and set again later in the same transaction.
CREATE TABLE kept (mode text);
CREATE FUNCTION keep_mode() RETURNS void LANGUAGE sql AS $$
    INSERT INTO kept SELECT current_setting('pgfire.' || 'pre_mode') $$;
CREATE VIEW replay AS SELECT set_config('pgfire.' || 'pre_mode', (SELECT max(mode) FROM kept), false) AS m;
-- A run ended from inside the statement, a mode of another kind started with the next number,
-- the first mode put back before the release.
-- The same, then a fast run started again with the first one's string before the release.
CREATE FUNCTION rearm_fast(e text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    mode text := current_setting('pgfire.' || 'pre_mode');
BEGIN
    PERFORM pgfire.pre_disarm();
    PERFORM set_config('pgfire.' || 'pre_mode', 'record:1000:' || pgfire.pre_run(), true);
    INSERT INTO users (email) VALUES (e);
    PERFORM pgfire.pre_arm_fast(split_part(mode, ':', 2) || ':' || split_part(mode, ':', 3));
END $$;
CREATE FUNCTION rearm(e text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    mode text := current_setting('pgfire.' || 'pre_mode');
BEGIN
    PERFORM pgfire.pre_disarm();
    PERFORM set_config('pgfire.' || 'pre_mode', 'record:1000:' || pgfire.pre_run(), true);
    INSERT INTO users (email) VALUES (e);
    PERFORM set_config('pgfire.' || 'pre_mode', mode, true);
END $$;
-- The table's owner disables pgfire's triggers from a function.
CREATE FUNCTION disable_then_write(e text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE 'ALTER TABLE users DISABLE TRIGGER USER';
    INSERT INTO users (email) VALUES (e);
    EXECUTE 'ALTER TABLE users ENABLE TRIGGER USER';
END $$;
CREATE FUNCTION rename_then_write(e text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE 'DROP TRIGGER pgfire_pre_after ON users';
    INSERT INTO users (email) VALUES (e);
END $$;
"#;

/// Attempts, each in its own session state; every one must fail with 42501.
const ATTEMPTS: &[&[&str]] = &[
    &["SELECT flip_and_restore('bad')"],
    &["SELECT flip_definer('bad')"],
    &["SELECT rearm('bad')"],
    &["SELECT rearm_fast('bad')"],
    &["INSERT INTO users (email) VALUES ('flip')"],
    &["INSERT INTO users (email) VALUES ('quiet')"],
    &[
        "SELECT * FROM forge",
        "INSERT INTO users_v (email) VALUES ('forged')",
    ],
    &[
        "BEGIN",
        "SELECT keep_mode()",
        "SELECT * FROM replay",
        "INSERT INTO users_v (email) VALUES ('replayed')",
    ],
    &[
        "SELECT keep_mode()",
        "SELECT * FROM replay",
        "INSERT INTO users_v (email) VALUES ('replayed')",
    ],
];

async fn attempt(c: &tokio_postgres::Client, steps: &[&str]) -> Result<(), String> {
    let (last, before) = steps.split_last().unwrap();
    for s in before {
        c.simple_query(s).await.map_err(|e| format!("{s}: {e}"))?;
    }
    let result = match c.simple_query(last).await {
        Ok(_) => Err(format!("{last}: got through")),
        Err(e) => {
            let (code, message, _) = db_error(&e);
            // Refused, or decided all the same: the PRE function saw the write and blocked it.
            if code == "42501" || (code == "P0001" && message == "Invalid email address") {
                Ok(())
            } else {
                Err(format!("{last}: {code} {message}"))
            }
        }
    };
    let _ = c.simple_query("ROLLBACK").await;
    let _ = c.simple_query("RESET ALL").await;
    result
}

/// The attempts with the configuration as it is (only `sql` PRE functions: pgfire's trigger
/// decides in the database), then with a webhook PRE function added (the proxy decides).
async fn attempts(proxy: &PreProxy, db: &TestDb, url: &str, extra: &[&[&str]]) -> Vec<String> {
    let mut failures = attempts_once(url, extra).await;
    proxy
        .change(
            db,
            "INSERT INTO pgfire.functions (name, kind, target) VALUES ('hook', 'webhook', 'http://127.0.0.1:9/');
             INSERT INTO pgfire.subscriptions (event_type, function_name, priority) VALUES ('PRE_USER_CREATE', 'hook', 5);",
        )
        .await;
    failures.extend(
        attempts_once(url, extra)
            .await
            .into_iter()
            .map(|f| format!("with a webhook: {f}")),
    );
    failures
}

async fn attempts_once(url: &str, extra: &[&[&str]]) -> Vec<String> {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect through the proxy");
    tokio::spawn(conn);
    let mut failures = Vec::new();
    for steps in ATTEMPTS.iter().chain(extra) {
        if let Err(f) = attempt(&c, steps).await {
            failures.push(f);
        }
    }
    // A good write still goes through.
    if let Err(e) = c
        .simple_query("INSERT INTO users (email) VALUES ('good@x.y')")
        .await
    {
        failures.push(format!("a good write failed: {e}"));
    }
    failures
}

#[tokio::test]
async fn a_superuser_s_code_cannot_switch_pre_hooks_off() {
    let db = TestDb::new();
    let proxy = setup(&db, TAMPER).await;
    let owner_only: &[&[&str]] = &[
        &["SELECT disable_then_write('bad')"],
        &["SELECT rename_then_write('bad')"],
    ];
    let failures = attempts(&proxy, &db, &proxy.url(&db), owner_only).await;
    assert!(failures.is_empty(), "{failures:#?}");
    let direct = db.client().await;
    assert_eq!(count(&direct, "SELECT count(*) FROM users").await, 2);
    assert_eq!(
        count(
            &direct,
            "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'pgfire_pre_%' AND tgenabled = 'A'"
        )
        .await,
        3
    );
}

#[tokio::test]
async fn a_role_without_privileges_cannot_either() {
    let db = TestDb::new();
    let role = format!("app_{}", db.name);
    let grants = format!(
        "CREATE ROLE {role} LOGIN;
         GRANT USAGE ON SCHEMA pgfire TO {role};
         GRANT CREATE ON SCHEMA public TO {role};
         GRANT SELECT, INSERT, UPDATE, DELETE ON users, users_v, seen, kept TO {role};
         GRANT SELECT ON forge, replay TO {role};
         GRANT USAGE ON SEQUENCE users_id_seq TO {role};"
    );
    let extra = format!("{TAMPER}{grants}");
    let proxy = setup(&db, &extra).await;
    let url = format!("postgres://{role}@{}/{}", proxy.addr, db.name);
    // Its own function, created through the proxy.
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c.simple_query(
        "CREATE FUNCTION mine(e text) RETURNS void LANGUAGE plpgsql AS $$
         DECLARE m text := current_setting('pgfire.' || 'pre_mode');
         BEGIN
             PERFORM set_config('pgfire.' || 'pre_mode', '', true);
             PERFORM set_config('pgfire.' || 'proxied', 'off', true);
             INSERT INTO users (email) VALUES (e);
             PERFORM set_config('pgfire.' || 'pre_mode', m, true);
             PERFORM set_config('pgfire.' || 'proxied', 'on', true);
         END $$",
    )
    .await
    .unwrap();
    // Starting a PRE run of its own takes pgfire's key.
    let err = c
        .simple_query("SELECT pgfire.pre_arm('guess', 'record:1000')")
        .await
        .unwrap_err();
    assert_eq!(db_error(&err).0, "42501");
    let own: &[&[&str]] = &[&["SELECT mine('bad')"]];
    let failures = attempts(&proxy, &db, &url, own).await;
    assert!(failures.is_empty(), "{failures:#?}");
    let direct = db.client().await;
    assert_eq!(count(&direct, "SELECT count(*) FROM users").await, 2);
}

/// A rewritten UPDATE runs twice; code that updates other rows the second time is caught.
#[tokio::test]
async fn a_rewrite_s_second_run_must_write_the_same_rows() {
    let db = TestDb::new();
    let extra = r#"
INSERT INTO users (email) VALUES ('one@x.y'), ('two@x.y');
CREATE FUNCTION rename(e jsonb) RETURNS jsonb LANGUAGE sql AS $$
    SELECT '{"allow": true, "data": {"name": "renamed"}}'::jsonb $$;
INSERT INTO pgfire.functions (name, kind, target) VALUES ('rename', 'sql', 'rename');
INSERT INTO pgfire.subscriptions (event_type, function_name) VALUES ('PRE_USER_UPDATE', 'rename');
CREATE FUNCTION shifty() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('pgfire.' || 'pre_mode') LIKE 'apply%' THEN
        UPDATE users SET name = 'x' WHERE id = 2;
    ELSE
        UPDATE users SET name = 'x' WHERE id = 1;
    END IF;
END $$;
"#;
    let proxy = setup(&db, extra).await;
    let c = proxy.client(&db).await;
    let err = c.simple_query("SELECT shifty()").await.unwrap_err();
    assert_eq!(db_error(&err).0, "40001");
    // An honest rewrite goes through.
    c.simple_query("UPDATE users SET name = 'x' WHERE id = 1")
        .await
        .unwrap();
    let direct = db.client().await;
    assert_eq!(
        crate::support::texts(&direct, "SELECT coalesce(name, '-') FROM users ORDER BY id").await,
        ["renamed", "-"]
    );
}
