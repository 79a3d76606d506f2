//! Auth events end to end, from the row changes of the auth sources: the generic preset's
//! tables and Supabase Auth's (GoTrue) `auth` schema, each flow giving exactly the events of its
//! real transitions; and bad configuration refused with the problem and the fix.

use chrono::{DateTime, SecondsFormat, TimeDelta};
use serde_json::{json, Value};

use crate::capture::{exactly, refused, setup, types, types_and_data};
use crate::support::{start_service, texts, TestDb};

const AUTH_EVENTS: [&str; 11] = [
    "auth.user_signedUp",
    "auth.email_verificationRequested",
    "auth.email_verified",
    "auth.password_resetRequested",
    "POST_PASSWORD_RESET",
    "auth.password_reset",
    "POST_LOGIN",
    "auth.user_loggedIn",
    "POST_LOGOUT",
    "POST_USER_CREATE",
    "POST_USER_UPDATE",
];

/// Run each statement (or BEGIN ... COMMIT block) as its own transaction, in order.
async fn steps(c: &tokio_postgres::Client, steps: &[&str]) {
    for step in steps {
        c.batch_execute(step)
            .await
            .unwrap_or_else(|e| panic!("{step}: {e}"));
    }
}

/// `occurred_at` of an envelope plus `seconds`, as pgfire writes timestamps.
fn later(envelope: &Value, seconds: i64) -> Value {
    let t = DateTime::parse_from_rfc3339(envelope["occurred_at"].as_str().unwrap()).unwrap();
    json!((t + TimeDelta::seconds(seconds))
        .to_utc()
        .to_rfc3339_opts(SecondsFormat::Micros, true))
}

#[tokio::test]
async fn the_generic_preset_gives_each_auth_event_once_per_transition() {
    let db = TestDb::new();
    let c = setup(&db, &AUTH_EVENTS[..9]).await;
    for _ in 0..2 {
        // A preset can run again.
        assert_eq!(
            texts(&c, "SELECT pgfire.use_preset('generic')").await,
            ["generic preset: public.users (user) and public.sessions (session) registered"]
        );
    }
    assert_eq!(
        texts(
            &c,
            "SELECT concat_ws(' ', table_name, kind, id_column, password_column, email_verified_column,
                    verification_token_column, reset_token_column, last_sign_in_column, user_id_column, revoked_column)
               FROM pgfire.sources ORDER BY 1"
        )
        .await,
        [
            "sessions session user_id revoked_at",
            "users user id password_hash email_verified_at verification_token reset_token last_sign_in_at"
        ]
    );
    c.batch_execute(
        "UPDATE pgfire.settings SET value = 'https://app.example.com/verify?token={token}' WHERE key = 'auth.verification_link';
         UPDATE pgfire.settings SET value = '7200' WHERE key = 'auth.reset_ttl_seconds';",
    )
    .await
    .unwrap();
    let service = start_service(&db).await;
    // Each step its own transaction, as an application makes them.
    steps(
        &c,
        &[
            // sign up, with a verification token
            "INSERT INTO users (id, email, password_hash, verification_token, created_at)
             VALUES (1, 'ada@example.com', 'hash-1', 'v+1', '2025-01-02 03:04:05+00')",
            // verified
            "UPDATE users SET email_verified_at = '2025-01-02 04:00:00+00', verification_token = NULL",
            // a login: a session row and the last sign-in column in one transaction
            "BEGIN;
             INSERT INTO sessions (id, user_id, created_at, user_agent, ip) VALUES (10, 1, '2025-01-02 05:00:00+00', 'curl', '10.0.0.1');
             UPDATE users SET last_sign_in_at = '2025-01-02 05:00:00+00';
             COMMIT",
            // unrelated updates of the same rows
            "UPDATE users SET email = 'ada@lovelace.org'",
            "UPDATE sessions SET user_agent = 'firefox'",
            // logout
            "DELETE FROM sessions",
            // another login, then that session revoked: a logout; deleting it later is none
            "INSERT INTO sessions (id, user_id, created_at) VALUES (11, 1, '2025-01-02 06:00:00+00')",
            "UPDATE sessions SET revoked_at = '2025-01-02 07:00:00+00' WHERE id = 11",
            "DELETE FROM sessions WHERE id = 11",
            // a reset requested, then done
            "UPDATE users SET reset_token = 'r-1'",
            "UPDATE users SET password_hash = 'hash-2', reset_token = NULL",
            // an admin setting the password: no reset
            "UPDATE users SET password_hash = 'hash-3'",
        ],
    )
    .await;
    let events = exactly(&db, &c, 12).await;
    let user = |email: &str, verified: Value, signed_in: Value| {
        json!({"id": 1, "email": email, "email_verified_at": verified,
               "last_sign_in_at": signed_in, "created_at": "2025-01-02T03:04:05Z"})
    };
    let verified = json!("2025-01-02T04:00:00Z");
    let signed_in = json!("2025-01-02T05:00:00Z");
    let session = json!({"id": 10, "user_id": 1, "created_at": "2025-01-02T05:00:00Z",
                         "user_agent": "curl", "ip": "10.0.0.1", "revoked_at": null});
    let final_user = user("ada@lovelace.org", verified.clone(), signed_in.clone());
    let second = json!({"id": 11, "user_id": 1, "created_at": "2025-01-02T06:00:00Z",
                        "user_agent": null, "ip": null, "revoked_at": null});
    let mut revoked = second.clone();
    revoked["revoked_at"] = json!("2025-01-02T07:00:00Z");
    assert_eq!(
        types_and_data(&events),
        [
            (
                "auth.user_signedUp".into(),
                json!({"user_id": 1, "user": user("ada@example.com", Value::Null, Value::Null)})
            ),
            (
                "auth.email_verificationRequested".into(),
                json!({"user_id": 1, "user": user("ada@example.com", Value::Null, Value::Null),
                       "token": "v+1", "link": "https://app.example.com/verify?token=v%2B1",
                       "expires_at": later(&events[1], 86_400)})
            ),
            (
                "auth.email_verified".into(),
                json!({"user_id": 1, "user": user("ada@example.com", verified.clone(), Value::Null)})
            ),
            (
                "POST_LOGIN".into(),
                json!({"user_id": 1, "session": session})
            ),
            (
                "auth.user_loggedIn".into(),
                json!({"user_id": 1, "session": session})
            ),
            (
                "POST_LOGOUT".into(),
                json!({"user_id": 1, "session": {"id": 10, "user_id": 1, "created_at": "2025-01-02T05:00:00Z",
                                                 "user_agent": "firefox", "ip": "10.0.0.1", "revoked_at": null}})
            ),
            (
                "POST_LOGIN".into(),
                json!({"user_id": 1, "session": second})
            ),
            (
                "auth.user_loggedIn".into(),
                json!({"user_id": 1, "session": second})
            ),
            (
                "POST_LOGOUT".into(),
                json!({"user_id": 1, "session": revoked})
            ),
            (
                "auth.password_resetRequested".into(),
                json!({"user_id": 1, "user": final_user, "token": "r-1",
                       "link": "http://localhost:3000/reset-password?token=r-1",
                       "expires_at": later(&events[9], 7200)})
            ),
            (
                "POST_PASSWORD_RESET".into(),
                json!({"user_id": 1, "user": final_user})
            ),
            (
                "auth.password_reset".into(),
                json!({"user_id": 1, "user": final_user})
            ),
        ]
    );
    // Ids: the change's own position, and a fixed suffix per auth event type.
    let ids: Vec<&str> = events
        .iter()
        .map(|e| &e["id"].as_str().unwrap()[17..])
        .collect();
    assert_eq!(
        ids,
        [
            "0000000000-01",
            "0000000000-02",
            "0000000000-03",
            "0000000000-07",
            "0000000000-08",
            "0000000000-09",
            "0000000000-07",
            "0000000000-08",
            "0000000000-09",
            "0000000000-04",
            "0000000000-05",
            "0000000000-06"
        ]
    );
    assert_eq!(events[3]["source"]["table"], "sessions");
    assert_eq!(events[0]["source"]["table"], "users");
    service.stop().await;
}

/// Row events and auth events of one change: both delivered, with distinct ids.
#[tokio::test]
async fn a_change_gives_its_row_event_and_its_auth_events() {
    let db = TestDb::new();
    let c = setup(&db, &AUTH_EVENTS).await;
    c.batch_execute("SELECT pgfire.use_preset('generic')")
        .await
        .unwrap();
    let service = start_service(&db).await;
    steps(
        &c,
        &[
            "INSERT INTO users (id, email, verification_token) VALUES (7, 'b@example.com', 'tok')",
            "UPDATE users SET last_sign_in_at = now()",
            "BEGIN; INSERT INTO sessions (user_id) VALUES (7); INSERT INTO sessions (user_id) VALUES (7); COMMIT",
        ],
    )
    .await;
    let events = exactly(&db, &c, 8).await;
    assert_eq!(
        types(&events),
        [
            "POST_USER_CREATE",
            "auth.user_signedUp",
            "auth.email_verificationRequested",
            "POST_USER_UPDATE",
            "POST_LOGIN",
            "auth.user_loggedIn",
            // Two sessions of the user in one transaction: one login.
            "POST_LOGIN",
            "auth.user_loggedIn",
        ]
    );
    let ids: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids[1], format!("{}-01", ids[0]));
    assert_eq!(ids[2], format!("{}-02", ids[0]));
    let mut unique = ids.clone();
    unique.dedup();
    assert_eq!(unique.len(), ids.len());
    service.stop().await;
}

/// The tables and columns Supabase Auth's (GoTrue's) migrations leave in schema `auth`, written
/// here from their documented shape (the tables the preset reads and those a sign-in touches).
const GOTRUE_SCHEMA: &str = "
CREATE SCHEMA auth;
CREATE TYPE auth.aal_level AS ENUM ('aal1', 'aal2', 'aal3');
CREATE TABLE auth.users (
    instance_id uuid,
    id uuid NOT NULL PRIMARY KEY,
    aud varchar(255),
    role varchar(255),
    email varchar(255),
    encrypted_password varchar(255),
    email_confirmed_at timestamptz,
    invited_at timestamptz,
    confirmation_token varchar(255),
    confirmation_sent_at timestamptz,
    recovery_token varchar(255),
    recovery_sent_at timestamptz,
    email_change_token_new varchar(255),
    email_change varchar(255),
    email_change_sent_at timestamptz,
    last_sign_in_at timestamptz,
    raw_app_meta_data jsonb,
    raw_user_meta_data jsonb,
    is_super_admin boolean,
    created_at timestamptz,
    updated_at timestamptz,
    phone text UNIQUE DEFAULT NULL,
    phone_confirmed_at timestamptz,
    phone_change text DEFAULT '',
    phone_change_token varchar(255) DEFAULT '',
    phone_change_sent_at timestamptz,
    confirmed_at timestamptz GENERATED ALWAYS AS (LEAST(email_confirmed_at, phone_confirmed_at)) STORED,
    email_change_token_current varchar(255) DEFAULT '',
    email_change_confirm_status smallint DEFAULT 0 CHECK (email_change_confirm_status >= 0 AND email_change_confirm_status <= 2),
    banned_until timestamptz,
    reauthentication_token varchar(255) DEFAULT '',
    reauthentication_sent_at timestamptz,
    is_sso_user boolean NOT NULL DEFAULT false,
    deleted_at timestamptz,
    is_anonymous boolean NOT NULL DEFAULT false
);
CREATE TABLE auth.identities (
    provider_id text NOT NULL,
    user_id uuid NOT NULL REFERENCES auth.users (id) ON DELETE CASCADE,
    identity_data jsonb NOT NULL,
    provider text NOT NULL,
    last_sign_in_at timestamptz,
    created_at timestamptz,
    updated_at timestamptz,
    email text GENERATED ALWAYS AS (lower(identity_data ->> 'email')) STORED,
    id uuid NOT NULL DEFAULT gen_random_uuid() PRIMARY KEY,
    UNIQUE (provider_id, provider)
);
CREATE TABLE auth.sessions (
    id uuid NOT NULL PRIMARY KEY,
    user_id uuid NOT NULL REFERENCES auth.users (id) ON DELETE CASCADE,
    created_at timestamptz,
    updated_at timestamptz,
    factor_id uuid,
    aal auth.aal_level,
    not_after timestamptz,
    refreshed_at timestamp,
    user_agent text,
    ip inet,
    tag text
);
CREATE TABLE auth.refresh_tokens (
    instance_id uuid,
    id bigserial PRIMARY KEY,
    token varchar(255) UNIQUE,
    user_id varchar(255),
    revoked boolean,
    created_at timestamptz,
    updated_at timestamptz,
    parent varchar(255),
    session_id uuid REFERENCES auth.sessions (id) ON DELETE CASCADE
);
CREATE TABLE auth.mfa_amr_claims (
    session_id uuid NOT NULL REFERENCES auth.sessions (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    authentication_method text NOT NULL,
    id uuid NOT NULL PRIMARY KEY,
    UNIQUE (session_id, authentication_method)
);
";

const ADA: &str = "00000000-0000-4000-8000-0000000000a1";
const BOB: &str = "00000000-0000-4000-8000-0000000000b2";

/// A GoTrue sign-in: a session with its AMR claim and refresh token, and the user's
/// last_sign_in_at, in one transaction.
fn sign_in(user: &str, session: &str, method: &str) -> String {
    format!(
        "BEGIN;
         INSERT INTO auth.sessions (id, user_id, created_at, updated_at, aal, user_agent, ip)
         VALUES ('{session}', '{user}', now(), now(), 'aal1', 'Mozilla/5.0', '203.0.113.7');
         INSERT INTO auth.mfa_amr_claims (session_id, created_at, updated_at, authentication_method, id)
         VALUES ('{session}', now(), now(), '{method}', gen_random_uuid());
         INSERT INTO auth.refresh_tokens (instance_id, token, user_id, revoked, created_at, updated_at, session_id)
         VALUES ('00000000-0000-0000-0000-000000000000', md5(random()::text), '{user}', false, now(), now(), '{session}');
         UPDATE auth.users SET last_sign_in_at = now(), updated_at = now() WHERE id = '{user}';
         UPDATE auth.identities SET last_sign_in_at = now() WHERE user_id = '{user}';
         COMMIT"
    )
}

/// Sign-up with email confirmation: the user and its identity, then the confirmation token.
fn sign_up(user: &str, email: &str) -> String {
    format!(
        "BEGIN;
         INSERT INTO auth.users (instance_id, id, aud, role, email, encrypted_password, confirmation_token,
                                 recovery_token, email_change_token_new, email_change, raw_app_meta_data,
                                 raw_user_meta_data, is_super_admin, created_at, updated_at)
         VALUES ('00000000-0000-0000-0000-000000000000', '{user}', 'authenticated', 'authenticated', '{email}',
                 '$2a$10$hash-of-first-password', '', '', '', '',
                 '{{\"provider\": \"email\", \"providers\": [\"email\"]}}', '{{}}', NULL,
                 '2025-01-02 03:04:05+00', '2025-01-02 03:04:05+00');
         INSERT INTO auth.identities (provider_id, user_id, identity_data, provider, created_at, updated_at)
         VALUES ('{user}', '{user}', jsonb_build_object('sub', '{user}', 'email', '{email}'), 'email', now(), now());
         UPDATE auth.users SET confirmation_token = 'pkce_' || md5('{email}'), confirmation_sent_at = now() WHERE id = '{user}';
         COMMIT"
    )
}

#[tokio::test]
async fn the_supabase_preset_follows_gotrue_flows() {
    let db = TestDb::new();
    let c = setup(&db, &AUTH_EVENTS[..9]).await;
    c.batch_execute(GOTRUE_SCHEMA).await.unwrap();
    assert_eq!(
        texts(&c, "SELECT pgfire.use_preset('supabase')").await,
        ["supabase preset: auth.users (user) and auth.sessions (session) registered"]
    );
    let service = start_service(&db).await;
    let s1 = "00000000-0000-4000-8000-0000000000c1";
    let s2 = "00000000-0000-4000-8000-0000000000c2";
    let s3 = "00000000-0000-4000-8000-0000000000c3";
    let mut flow: Vec<String> = vec![
        // Sign up (email confirmation on): signed up, verification requested.
        sign_up(ADA, "ada@example.com"),
        // Confirm the email by the link: verified, token consumed.
        format!("UPDATE auth.users SET email_confirmed_at = now(), confirmation_token = '', updated_at = now() WHERE id = '{ADA}'"),
        // Sign in with the password: one login.
        sign_in(ADA, s1, "password"),
        // A refresh: the session refreshed, a new refresh token; no login.
        format!(
            "BEGIN;
             UPDATE auth.refresh_tokens SET revoked = true WHERE session_id = '{s1}';
             INSERT INTO auth.refresh_tokens (token, user_id, revoked, created_at, updated_at, session_id)
             VALUES ('rotated', '{ADA}', false, now(), now(), '{s1}');
             UPDATE auth.sessions SET refreshed_at = now(), updated_at = now() WHERE id = '{s1}';
             COMMIT"
        ),
        // Sign out: the session deleted (its refresh tokens and claims cascade).
        format!("DELETE FROM auth.sessions WHERE id = '{s1}'"),
        // Request a password reset.
        format!("UPDATE auth.users SET recovery_token = 'pkce_recovery', recovery_sent_at = now(), updated_at = now() WHERE id = '{ADA}'"),
        // Follow the reset link: the token consumed, the user signed in (recovery).
        format!("BEGIN; UPDATE auth.users SET recovery_token = '' WHERE id = '{ADA}'; COMMIT"),
        sign_in(ADA, s2, "recovery"),
        // Set the new password in that session: the reset (other sessions signed out).
        format!(
            "BEGIN;
             UPDATE auth.users SET encrypted_password = '$2a$10$hash-of-new-password', email_change = '',
                                   reauthentication_token = '', updated_at = now() WHERE id = '{ADA}';
             DELETE FROM auth.sessions WHERE user_id = '{ADA}' AND id <> '{s2}';
             COMMIT"
        ),
        // A metadata update: no auth event.
        format!("UPDATE auth.users SET raw_user_meta_data = '{{\"name\": \"Ada\"}}', updated_at = now() WHERE id = '{ADA}'"),
        // Another user, confirmed at creation by an admin, signed in elsewhere.
        sign_up(BOB, "bob@example.com"),
        format!("UPDATE auth.users SET email_confirmed_at = now(), confirmation_token = '' WHERE id = '{BOB}'"),
        sign_in(BOB, s3, "password"),
    ];
    // An admin sets Bob's password: no reset; GoTrue signs him out everywhere.
    flow.push(format!(
        "BEGIN;
         UPDATE auth.users SET encrypted_password = '$2a$10$set-by-admin', updated_at = now() WHERE id = '{BOB}';
         DELETE FROM auth.sessions WHERE user_id = '{BOB}';
         COMMIT"
    ));
    for step in &flow {
        c.batch_execute(step)
            .await
            .unwrap_or_else(|e| panic!("{step}: {e}"));
    }
    let events = exactly(&db, &c, 17).await;
    let who: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            (
                e["event_type"].as_str().unwrap().to_string(),
                e["event_data"]["user_id"].as_str().unwrap()[34..].to_string(),
            )
        })
        .collect();
    let ev = |t: &str, u: &str| (t.to_string(), u.to_string());
    assert_eq!(
        who,
        [
            ev("auth.user_signedUp", "a1"),
            ev("auth.email_verificationRequested", "a1"),
            ev("auth.email_verified", "a1"),
            ev("POST_LOGIN", "a1"),
            ev("auth.user_loggedIn", "a1"),
            ev("POST_LOGOUT", "a1"),
            ev("auth.password_resetRequested", "a1"),
            ev("POST_LOGIN", "a1"),
            ev("auth.user_loggedIn", "a1"),
            ev("POST_PASSWORD_RESET", "a1"),
            ev("auth.password_reset", "a1"),
            ev("auth.user_signedUp", "b2"),
            ev("auth.email_verificationRequested", "b2"),
            ev("auth.email_verified", "b2"),
            ev("POST_LOGIN", "b2"),
            ev("auth.user_loggedIn", "b2"),
            ev("POST_LOGOUT", "b2"),
        ]
    );
    // The sign-up's user: GoTrue's columns, without the password hash and the tokens.
    assert_eq!(
        events[0]["event_data"],
        json!({"user_id": ADA, "user": {
            "instance_id": "00000000-0000-0000-0000-000000000000", "id": ADA, "aud": "authenticated",
            "role": "authenticated", "email": "ada@example.com", "email_confirmed_at": null,
            "invited_at": null, "confirmation_sent_at": null, "recovery_sent_at": null,
            "email_change_token_new": "", "email_change": "", "email_change_sent_at": null,
            "last_sign_in_at": null, "raw_app_meta_data": {"provider": "email", "providers": ["email"]},
            "raw_user_meta_data": {}, "is_super_admin": null, "created_at": "2025-01-02T03:04:05Z",
            "updated_at": "2025-01-02T03:04:05Z", "phone": null, "phone_confirmed_at": null,
            "phone_change": "", "phone_change_token": "", "phone_change_sent_at": null,
            "email_change_token_current": "", "email_change_confirm_status": 0, "banned_until": null,
            "reauthentication_token": "", "reauthentication_sent_at": null, "is_sso_user": false,
            "deleted_at": null, "is_anonymous": false}})
    );
    let request = &events[1]["event_data"];
    let token = texts(&c, "SELECT 'pkce_' || md5('ada@example.com')")
        .await
        .remove(0);
    assert_eq!(request["token"], json!(token));
    assert_eq!(
        request["link"],
        json!(format!("http://localhost:3000/verify?token={token}"))
    );
    assert_eq!(request["expires_at"], later(&events[1], 86_400));
    let reset_request = &events[6]["event_data"];
    assert_eq!(reset_request["token"], "pkce_recovery");
    assert_eq!(
        reset_request["link"],
        "http://localhost:3000/reset-password?token=pkce_recovery"
    );
    assert_eq!(reset_request["expires_at"], later(&events[6], 3600));
    let login = &events[3]["event_data"];
    assert_eq!(login["session"]["id"], s1);
    assert_eq!(login["session"]["aal"], "aal1");
    assert_eq!(login["session"]["ip"], "203.0.113.7");
    assert_eq!(events[5]["event_data"]["session"]["id"], s1);
    assert_eq!(events[0]["source"]["schema"], "auth");
    service.stop().await;
}

#[tokio::test]
async fn bad_auth_configuration_names_the_problem_and_the_fix() {
    let db = TestDb::new();
    let c = setup(&db, &[]).await;
    c.batch_execute(
        "CREATE TABLE accounts (id int PRIMARY KEY, mail text, pass text);
         CREATE TABLE logins (id int PRIMARY KEY, account int);
         CREATE TABLE users (id int PRIMARY KEY);",
    )
    .await
    .unwrap();
    let cases = [
        (
            "INSERT INTO pgfire.sources (table_name, kind, password_column) VALUES ('accounts', 'user', 'password')",
            "42703",
            "password_column \"password\" is not a column of accounts",
            "its columns are id, mail, pass: set password_column to one of them, or to NULL",
        ),
        (
            "INSERT INTO pgfire.sources (table_name, kind, password_column) VALUES ('accounts', 'record', 'pass')",
            "22023",
            "source accounts is of kind record, which has no auth role columns (password_column set)",
            "auth events come from a users table of kind 'user' (password, email-verified, token and last sign-in columns) and a sessions table of kind 'session' (user_id_column): set kind, or set those columns to NULL",
        ),
        (
            "INSERT INTO pgfire.sources (table_name, kind, user_id_column) VALUES ('accounts', 'user', 'id')",
            "22023",
            "source accounts is of kind user, which has no user_id_column (columns of a sessions table)",
            "a user source names its users with id_column; user_id_column is for a sessions table of kind 'session', naming the user of each session",
        ),
        (
            "INSERT INTO pgfire.sources (table_name, kind, last_sign_in_column, user_id_column) VALUES ('logins', 'session', 'id', 'account')",
            "22023",
            "source logins is of kind session, which has no last_sign_in_column (columns of the users table)",
            "set them on the users table's source (kind 'user'); a session source takes user_id_column only",
        ),
        (
            "INSERT INTO pgfire.sources (table_name, kind) VALUES ('logins', 'session')",
            "23502",
            "session source logins needs user_id_column, the column naming each session's user",
            "for example INSERT INTO pgfire.sources (table_name, kind, user_id_column) VALUES ('logins', 'session', 'owner_id')",
        ),
        (
            "SELECT pgfire.use_preset('supabase')",
            "42P01",
            "the supabase preset needs the Supabase Auth (GoTrue) tables auth.users and auth.sessions; this database lacks auth.users and auth.sessions",
            "run it on a database where Supabase Auth has run its migrations, or use SELECT pgfire.use_preset('generic') for tables of your own",
        ),
        (
            "SELECT pgfire.use_preset('generic')",
            "42703",
            "table users lacks column(s) email, password_hash, email_verified_at, verification_token, reset_token, last_sign_in_at that the generic preset uses",
            "add them (the README documents the generic schema), or register the table yourself: INSERT INTO pgfire.sources (table_name, kind, ...) with your column names",
        ),
        (
            "SELECT pgfire.use_preset('firebase')",
            "22023",
            "unknown preset \"firebase\"",
            "the presets are generic (tables public.users and public.sessions, created if absent) and supabase (Supabase Auth's auth.users and auth.sessions)",
        ),
    ];
    for (sql, code, message, hint) in cases {
        assert_eq!(
            refused(&c, sql).await,
            (code.to_string(), message.to_string(), hint.to_string()),
            "{sql}"
        );
    }
    // A failed preset leaves nothing behind; an update to a bad column is refused too.
    assert!(texts(&c, "SELECT table_name::text FROM pgfire.sources")
        .await
        .is_empty());
    c.batch_execute(
        "INSERT INTO pgfire.sources (table_name, kind, password_column) VALUES ('accounts', 'user', 'pass');
         INSERT INTO pgfire.sources (table_name, kind, user_id_column) VALUES ('logins', 'session', 'account');",
    )
    .await
    .unwrap();
    let (code, message, _) = refused(
        &c,
        "UPDATE pgfire.sources SET email_verified_column = 'verified' WHERE table_name = 'accounts'::regclass",
    )
    .await;
    assert_eq!(
        (code.as_str(), message.as_str()),
        (
            "42703",
            "email_verified_column \"verified\" is not a column of accounts"
        )
    );
}
