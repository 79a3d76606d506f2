//! Unit tests of the auth events: each transition, and the changes that are none.

use super::*;
use crate::events::Commit;
use crate::replication::decode::{Column, EncodedRow, Relation};
use serde_json::json;
use std::collections::HashMap;

const ALL: [AuthEvent; 9] = [
    AuthEvent::SignedUp,
    AuthEvent::VerificationRequested,
    AuthEvent::EmailVerified,
    AuthEvent::ResetRequested,
    AuthEvent::PostPasswordReset,
    AuthEvent::PasswordReset,
    AuthEvent::PostLogin,
    AuthEvent::LoggedIn,
    AuthEvent::PostLogout,
];

fn catalog(subscribed: &[AuthEvent]) -> Catalog {
    let subs: Vec<String> = subscribed
        .iter()
        .map(|e| {
            format!(
                r#"{{"event_type": "{}", "function_name": "f", "priority": 0, "active": true}}"#,
                e.name()
            )
        })
        .collect();
    let json = format!(
        r#"{{"database": "app", "settings": {{"auth.reset_link": "https://app/reset?t={{token}}"}},
             "functions": [{{"name": "f", "kind": "log", "target": null, "timeout_ms": 1000, "active": true, "sql_callable": null}}],
             "subscriptions": [{}]}}"#,
        subs.join(",")
    );
    Catalog::from_snapshot(&json, &HashMap::new()).unwrap()
}

fn users() -> Source {
    Source {
        oid: 1,
        kind: SourceKind::User,
        id_column: Some("id".into()),
        password_column: Some("pw".into()),
        email_verified_column: Some("verified_at".into()),
        verification_token_column: Some("vt".into()),
        reset_token_column: Some("rt".into()),
        reset_sent_at_column: Some("rt_sent".into()),
        last_sign_in_column: Some("seen".into()),
        ..Source::default()
    }
}

fn sessions() -> Source {
    Source {
        oid: 2,
        kind: SourceKind::Session,
        user_id_column: Some("uid".into()),
        ..Source::default()
    }
}

const USER_COLS: [(&str, u32); 8] = [
    ("id", 20),
    ("email", 25),
    ("pw", 25),
    ("verified_at", 1184),
    ("vt", 25),
    ("rt", 25),
    ("rt_sent", 1184),
    ("seen", 1184),
];

fn rel(oid: u32, name: &str, cols: &[(&str, u32)]) -> Arc<Relation> {
    Arc::new(Relation {
        oid,
        schema: Arc::from("public"),
        name: Arc::from(name),
        columns: cols
            .iter()
            .map(|&(n, t)| Column::new(Arc::from(n), t))
            .collect(),
    })
}

/// 2025-01-02T03:04:05Z
const NOW: i64 = 1_735_787_045;

fn commit(lsn: u64) -> Arc<Commit> {
    Arc::new(Commit {
        lsn: Lsn(lsn),
        end_lsn: Lsn(lsn + 1),
        time: DateTime::from_timestamp(NOW, 0).unwrap(),
        xid: 7,
    })
}

/// A row of the users table from JSON values by column (missing columns NULL).
fn user_row(values: &Value) -> Vec<String> {
    USER_COLS
        .iter()
        .map(|(c, _)| values.get(*c).unwrap_or(&Value::Null).to_string())
        .collect()
}

fn cells(row: &[String]) -> Vec<Cell<'_>> {
    row.iter()
        .map(|v| match v.as_str() {
            "null" => Cell::Null,
            v => Cell::Value(v.as_bytes()),
        })
        .collect()
}

struct Txn {
    state: TxnState,
    lsn: u64,
    position: u32,
}

impl Txn {
    fn new() -> Txn {
        Txn {
            state: TxnState::default(),
            lsn: 0x100,
            position: 0,
        }
    }

    fn next_transaction(&mut self) {
        self.lsn += 0x100;
        self.position = 0;
    }

    fn change(
        &mut self,
        source: &Source,
        cat: &Catalog,
        op: Op,
        old: Option<&Value>,
        new: Option<&Value>,
    ) -> Vec<Event> {
        let (relation, row) = if source.kind == SourceKind::User {
            let old = old.map(user_row);
            let new = new.map(user_row);
            let r = rel(1, "users", &USER_COLS);
            let row = EncodedRow::from_cells(
                old.as_deref().map(cells).as_deref(),
                new.as_deref().map(cells).as_deref(),
            );
            (r, row)
        } else {
            let render = |v: &Value| {
                let revoked = v.get("revoked").cloned().unwrap_or(Value::Null);
                vec![
                    v["id"].to_string(),
                    v["uid"].to_string(),
                    revoked.to_string(),
                ]
            };
            let old = old.map(render);
            let new = new.map(render);
            let r = rel(2, "sessions", &[("id", 23), ("uid", 20), ("revoked", 16)]);
            let row = EncodedRow::from_cells(
                old.as_deref().map(cells).as_deref(),
                new.as_deref().map(cells).as_deref(),
            );
            (r, row)
        };
        let change = RowChange {
            op,
            relation,
            row,
            commit: commit(self.lsn),
            position: self.position,
        };
        self.position += 1;
        let mut out = Vec::new();
        self.state.events(&change, source, cat, &mut out);
        out
    }
}

fn summary(events: &[Event]) -> Vec<(String, String, Value)> {
    events
        .iter()
        .map(|e| {
            (
                e.id.to_string(),
                e.event_type.to_string(),
                e.data.to_value(),
            )
        })
        .collect()
}

fn names(events: &[Event]) -> Vec<String> {
    events.iter().map(|e| e.event_type.to_string()).collect()
}

#[test]
fn a_sign_up_with_a_verification_token() {
    let cat = catalog(&ALL);
    let mut t = Txn::new();
    let new = json!({"id": 42, "email": "a@b.c", "pw": "hash", "vt": "tok/1"});
    let events = t.change(&users(), &cat, Op::Insert, None, Some(&new));
    let user =
        json!({"id": 42, "email": "a@b.c", "verified_at": null, "rt_sent": null, "seen": null});
    assert_eq!(
        summary(&events),
        [
            (
                "0000000000000100-0000000000-01".to_string(),
                "auth.user_signedUp".to_string(),
                json!({"user_id": 42, "user": user})
            ),
            (
                "0000000000000100-0000000000-02".to_string(),
                "auth.email_verificationRequested".to_string(),
                json!({"user_id": 42, "user": user, "token": "tok/1",
                       "link": "http://localhost:3000/verify?token=tok%2F1",
                       "expires_at": "2025-01-03T03:04:05.000000Z"})
            ),
        ]
    );
    assert_eq!(events[0].source.table.as_deref(), Some("users"));
}

#[test]
fn only_subscribed_events_are_built() {
    let cat = catalog(&[AuthEvent::VerificationRequested]);
    let mut t = Txn::new();
    let new = json!({"id": 1, "vt": "x"});
    let events = t.change(&users(), &cat, Op::Insert, None, Some(&new));
    assert_eq!(names(&events), ["auth.email_verificationRequested"]);
}

#[test]
fn verification_and_reset_requests_and_email_verified_fire_on_transitions_only() {
    let cat = catalog(&ALL);
    let mut t = Txn::new();
    let u = json!({"id": 1, "email": "a@b.c", "pw": "h", "vt": ""});
    // Unrelated update: nothing.
    let renamed = json!({"id": 1, "email": "new@b.c", "pw": "h", "vt": ""});
    assert!(t
        .change(&users(), &cat, Op::Update, Some(&u), Some(&renamed))
        .is_empty());
    // A token set: requested; the same token again: nothing; a new one: requested again.
    let with_token = json!({"id": 1, "email": "a@b.c", "pw": "h", "vt": "t1"});
    let e = t.change(&users(), &cat, Op::Update, Some(&u), Some(&with_token));
    assert_eq!(names(&e), ["auth.email_verificationRequested"]);
    assert!(t
        .change(
            &users(),
            &cat,
            Op::Update,
            Some(&with_token),
            Some(&with_token)
        )
        .is_empty());
    // Verified: once, from unset to set; a later change of the timestamp is none.
    let verified = json!({"id": 1, "email": "a@b.c", "pw": "h", "vt": "", "verified_at": "2025-01-02T03:04:05Z"});
    let e = t.change(
        &users(),
        &cat,
        Op::Update,
        Some(&with_token),
        Some(&verified),
    );
    assert_eq!(names(&e), ["auth.email_verified"]);
    let again = json!({"id": 1, "email": "a@b.c", "pw": "h", "vt": "", "verified_at": "2025-01-02T04:00:00Z"});
    assert!(t
        .change(&users(), &cat, Op::Update, Some(&verified), Some(&again))
        .is_empty());
    // A reset requested carries the reset link and a one hour expiry.
    let reset = json!({"id": 1, "email": "a@b.c", "pw": "h", "rt": "r t"});
    let e = t.change(&users(), &cat, Op::Update, Some(&u), Some(&reset));
    assert_eq!(
        summary(&e),
        [(
            "0000000000000100-0000000005-04".to_string(),
            "auth.password_resetRequested".to_string(),
            json!({"user_id": 1, "user": {"id": 1, "email": "a@b.c", "verified_at": null, "rt_sent": null, "seen": null},
                   "token": "r t", "link": "https://app/reset?t=r%20t",
                   "expires_at": "2025-01-02T04:04:05.000000Z"})
        )]
    );
    // Deletes give no auth events.
    assert!(t
        .change(&users(), &cat, Op::Delete, Some(&u), None)
        .is_empty());
}

#[test]
fn a_password_change_is_a_reset_only_while_a_reset_is_pending() {
    let cat = catalog(&ALL);
    let mut t = Txn::new();
    let pending = json!({"id": 1, "pw": "old", "rt": "r1"});
    let done = json!({"id": 1, "pw": "new", "rt": null});
    let e = t.change(&users(), &cat, Op::Update, Some(&pending), Some(&done));
    assert_eq!(
        summary(&e)
            .iter()
            .map(|(id, n, _)| (id.as_str(), n.as_str()))
            .collect::<Vec<_>>(),
        [
            ("0000000000000100-0000000000-05", "POST_PASSWORD_RESET"),
            ("0000000000000100-0000000000-06", "auth.password_reset")
        ]
    );
    assert_eq!(
        e[0].data.to_value(),
        json!({"user_id": 1, "user": {"id": 1, "email": null, "verified_at": null, "rt_sent": null, "seen": null}})
    );
    // An admin setting a password: no reset pending, no event.
    let admin = json!({"id": 1, "pw": "newer", "rt": null});
    assert!(t
        .change(&users(), &cat, Op::Update, Some(&done), Some(&admin))
        .is_empty());
}

/// GoTrue clears the recovery token when its link is followed (signing the user in), and the
/// password is set afterwards: a reset requested within the TTL, signed in since, is pending.
#[test]
fn a_reset_after_the_token_was_consumed_by_following_the_link() {
    let cat = catalog(&ALL);
    let mut t = Txn::new();
    let at = |secs: i64| {
        DateTime::from_timestamp(NOW - secs, 0)
            .unwrap()
            .to_rfc3339_opts(SecondsFormat::Micros, true)
    };
    let consumed = json!({"id": 1, "pw": "old", "rt": "", "rt_sent": at(600), "seen": at(300)});
    let mut set = consumed.clone();
    set["pw"] = json!("new");
    let e = t.change(&users(), &cat, Op::Update, Some(&consumed), Some(&set));
    assert_eq!(names(&e), ["POST_PASSWORD_RESET", "auth.password_reset"]);
    // Requested too long ago, or never followed (no sign-in since): an ordinary change.
    for (sent, seen) in [(7200, 300), (600, 900)] {
        let old = json!({"id": 1, "pw": "old", "rt": "", "rt_sent": at(sent), "seen": at(seen)});
        let mut new = old.clone();
        new["pw"] = json!("new");
        assert!(
            t.change(&users(), &cat, Op::Update, Some(&old), Some(&new))
                .is_empty(),
            "{sent} {seen}"
        );
    }
}

#[test]
fn one_login_per_user_and_transaction() {
    let cat = catalog(&ALL);
    let mut t = Txn::new();
    let s = json!({"id": 5, "uid": 1});
    let e = t.change(&sessions(), &cat, Op::Insert, None, Some(&s));
    assert_eq!(
        summary(&e),
        [
            (
                "0000000000000100-0000000000-07".to_string(),
                "POST_LOGIN".to_string(),
                json!({"user_id": 1, "session": {"id": 5, "uid": 1, "revoked": null}})
            ),
            (
                "0000000000000100-0000000000-08".to_string(),
                "auth.user_loggedIn".to_string(),
                json!({"user_id": 1, "session": {"id": 5, "uid": 1, "revoked": null}})
            ),
        ]
    );
    // The last sign-in column of the same user in the same transaction: the same login.
    let before = json!({"id": 1, "seen": null});
    let after = json!({"id": 1, "seen": "2025-01-02T03:04:05Z"});
    assert!(t
        .change(&users(), &cat, Op::Update, Some(&before), Some(&after))
        .is_empty());
    // Another user in the same transaction logs in too.
    let other = json!({"id": 6, "uid": 2});
    assert_eq!(
        t.change(&sessions(), &cat, Op::Insert, None, Some(&other))
            .len(),
        2
    );
    // The next transaction: a login by the column alone.
    t.next_transaction();
    let later = json!({"id": 1, "seen": "2025-01-02T05:00:00Z"});
    let e = t.change(&users(), &cat, Op::Update, Some(&after), Some(&later));
    assert_eq!(names(&e), ["POST_LOGIN", "auth.user_loggedIn"]);
    assert_eq!(
        e[0].data.to_value()["user"]["seen"],
        json!("2025-01-02T05:00:00Z")
    );
    // Read again from its start (a reconnect): the same events, the same ids.
    let id = e[0].id;
    t.position = 0;
    let again = t.change(&users(), &cat, Op::Update, Some(&after), Some(&later));
    assert_eq!(again[0].id, id);
    // Updating a session is no login; deleting it is a logout.
    assert!(t
        .change(&sessions(), &cat, Op::Update, Some(&s), Some(&s))
        .is_empty());
    let e = t.change(&sessions(), &cat, Op::Delete, Some(&s), None);
    assert_eq!(names(&e), ["POST_LOGOUT"]);
    assert_eq!(e[0].id.to_string(), "0000000000000200-0000000002-09");
    assert_eq!(
        e[0].data.to_value(),
        json!({"user_id": 1, "session": {"id": 5, "uid": 1, "revoked": null}})
    );
}

#[test]
fn a_revoked_session_is_a_logout_once() {
    let cat = catalog(&ALL);
    let mut t = Txn::new();
    let mut src = sessions();
    src.revoked_column = Some("revoked".into());
    let live = json!({"id": 5, "uid": 1, "revoked": false});
    let revoked = json!({"id": 5, "uid": 1, "revoked": true});
    let e = t.change(&src, &cat, Op::Update, Some(&live), Some(&revoked));
    assert_eq!(names(&e), ["POST_LOGOUT"]);
    assert_eq!(e[0].data.to_value()["session"]["revoked"], json!(true));
    // Deleting it later, or updating it again, is no second logout.
    assert!(t
        .change(&src, &cat, Op::Update, Some(&revoked), Some(&revoked))
        .is_empty());
    assert!(t
        .change(&src, &cat, Op::Delete, Some(&revoked), None)
        .is_empty());
    // A session inserted revoked is no login; a live one deleted is a logout.
    t.next_transaction();
    assert!(t
        .change(&src, &cat, Op::Insert, None, Some(&revoked))
        .is_empty());
    assert_eq!(
        names(&t.change(&src, &cat, Op::Delete, Some(&live), None)),
        ["POST_LOGOUT"]
    );
}

#[test]
fn without_auth_subscribers_nothing_is_looked_at() {
    let cat = catalog(&[]);
    assert!(!cat.auth_subscribed);
    let mut t = Txn::new();
    let new = json!({"id": 1, "vt": "x"});
    assert!(t
        .change(&users(), &cat, Op::Insert, None, Some(&new))
        .is_empty());
    assert!(catalog(&[AuthEvent::PostLogout]).auth_subscribed);
}

#[test]
fn record_sources_have_no_auth_events() {
    let cat = catalog(&ALL);
    let mut t = Txn::new();
    let mut records = users();
    records.kind = SourceKind::Record;
    let new = json!({"id": 1, "vt": "x"});
    assert!(t
        .change(&records, &cat, Op::Insert, None, Some(&new))
        .is_empty());
}

#[test]
fn values_that_count_as_set_and_timestamps() {
    for v in [json!(null), json!(false), json!("")] {
        assert!(!is_set(&v), "{v}");
    }
    for v in [
        json!(true),
        json!("x"),
        json!(0),
        json!("2025-01-01T00:00:00Z"),
    ] {
        assert!(is_set(&v), "{v}");
    }
    let t = DateTime::from_timestamp(NOW, 0).unwrap();
    assert_eq!(timestamp(&json!("2025-01-02T03:04:05Z")), Some(t));
    assert_eq!(timestamp(&json!("2025-01-02T03:04:05.000000Z")), Some(t));
    assert_eq!(timestamp(&json!("2025-01-02T03:04:05")), Some(t));
    assert_eq!(timestamp(&json!("infinity")), None);
    assert_eq!(percent_encode("a+b/c d~"), "a%2Bb%2Fc%20d~");
}
