//! Auth events from the row changes of the sources with auth roles (`pgfire.sources`: user and
//! session tables, and which of their columns hold the password, the email-verified flag, the
//! verification and reset tokens, the last sign-in): sign-up, verification and reset requests,
//! email verified, password reset, login and logout. Pure: one committed change (with its old
//! row: sources have REPLICA IDENTITY FULL) in, events out; the only state is the current
//! transaction's logins, so a session row and a last-sign-in column changed in one transaction
//! make one login.
//!
//! Each fires on a real transition only: a token set to a new non-empty value, a verified flag
//! or timestamp going from unset (NULL, false) to set, a password changing while a reset is
//! pending, the last sign-in changing to a new value, a session row inserted, revoked or deleted.
//! Other updates of the same rows produce none.

use std::collections::HashSet;
use std::sync::Arc;

use chrono::{DateTime, NaiveDateTime, SecondsFormat, TimeDelta, Utc};
use serde_json::{Map, Value};

use crate::catalog::{Catalog, Source, SourceKind};
use crate::events::{Event, EventData, EventId, EventSource, Lsn};
use crate::replication::decode::{Cell, Op, RowChange};

/// The auth events, in the order the events of one change are delivered. The discriminant is
/// the event id's `sub` (fixed per type, so ids stay stable whatever is subscribed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthEvent {
    SignedUp = 1,
    VerificationRequested = 2,
    EmailVerified = 3,
    ResetRequested = 4,
    PostPasswordReset = 5,
    PasswordReset = 6,
    PostLogin = 7,
    LoggedIn = 8,
    PostLogout = 9,
}

impl AuthEvent {
    pub fn name(self) -> &'static str {
        match self {
            AuthEvent::SignedUp => "auth.user_signedUp",
            AuthEvent::VerificationRequested => "auth.email_verificationRequested",
            AuthEvent::EmailVerified => "auth.email_verified",
            AuthEvent::ResetRequested => "auth.password_resetRequested",
            AuthEvent::PostPasswordReset => "POST_PASSWORD_RESET",
            AuthEvent::PasswordReset => "auth.password_reset",
            AuthEvent::PostLogin => "POST_LOGIN",
            AuthEvent::LoggedIn => "auth.user_loggedIn",
            AuthEvent::PostLogout => "POST_LOGOUT",
        }
    }

    /// The event id's `sub` of this event type.
    pub fn sub(self) -> u8 {
        self as u8
    }
}

/// What the builder remembers of the transaction being read: the users who logged in in it.
#[derive(Debug, Default)]
pub struct TxnState {
    commit: Option<Lsn>,
    last_position: u32,
    logged_in: HashSet<String>,
}

impl TxnState {
    /// Follow the stream: a new transaction, or the same one read again from its start (after
    /// a reconnect), forgets the logins seen.
    fn enter(&mut self, commit: Lsn, position: u32) {
        if self.commit != Some(commit) || position <= self.last_position {
            self.logged_in.clear();
            self.commit = Some(commit);
        }
        self.last_position = position;
    }

    /// Whether this is the user's first login of the transaction.
    fn first_login(&mut self, user_id: &Value) -> bool {
        self.logged_in.insert(user_id.to_string())
    }

    /// Append to `out` the auth events of `change` to `source`, with subscribers only.
    pub fn events(
        &mut self,
        change: &RowChange,
        source: &Source,
        catalog: &Catalog,
        out: &mut Vec<Event>,
    ) {
        if !catalog.auth_subscribed
            || !matches!(source.kind, SourceKind::User | SourceKind::Session)
        {
            return;
        }
        self.enter(change.commit.lsn, change.position);
        let row = RowView::new(change);
        let mut found = Found::default();
        match source.kind {
            SourceKind::User => self.user_change(&row, source, catalog, &mut found),
            _ => self.session_change(&row, source, &mut found),
        }
        found.0.sort_by_key(|(e, _)| e.sub());
        for (kind, data) in found.0 {
            if catalog.subscribers(kind.name()).is_empty() {
                continue;
            }
            out.push(event(change, kind, data, catalog));
        }
    }

    fn user_change(
        &mut self,
        row: &RowView,
        source: &Source,
        catalog: &Catalog,
        found: &mut Found,
    ) {
        let user_id = col(&source.id_column)
            .and_then(|c| row.value(c))
            .unwrap_or(Value::Null);
        let secrets: Vec<&str> = [
            &source.password_column,
            &source.verification_token_column,
            &source.reset_token_column,
        ]
        .into_iter()
        .filter_map(|c| c.as_deref())
        .collect();
        let base = || {
            let mut d = Map::new();
            d.insert("user_id".into(), user_id.clone());
            d.insert("user".into(), Value::Object(row.object(&secrets)));
            d
        };
        let settings = &catalog.settings;
        let commit_time = row.change.commit.time;
        let request = |token: Value, template: &str, ttl: std::time::Duration| {
            let mut d = base();
            let text = match &token {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let link = template.replace("{token}", &percent_encode(&text));
            let expires = commit_time + TimeDelta::from_std(ttl).unwrap_or(TimeDelta::zero());
            d.insert("token".into(), token);
            d.insert("link".into(), Value::String(link));
            d.insert(
                "expires_at".into(),
                Value::String(expires.to_rfc3339_opts(SecondsFormat::Micros, true)),
            );
            d
        };
        let newly_set = |c: Option<&str>| -> Option<Value> {
            let new = row.value(c?).filter(is_set)?;
            match row.change.op {
                Op::Insert => Some(new),
                Op::Update => (row.old_value(c?).as_ref() != Some(&new)).then_some(new),
                Op::Delete => None,
            }
        };
        match row.change.op {
            Op::Insert => found.add(AuthEvent::SignedUp, base()),
            Op::Update => {}
            Op::Delete => return,
        }
        if let Some(token) = newly_set(col(&source.verification_token_column)) {
            let d = request(
                token,
                &settings.verification_link,
                settings.verification_ttl,
            );
            found.add(AuthEvent::VerificationRequested, d);
        }
        if row.change.op != Op::Update {
            if let Some(token) = newly_set(col(&source.reset_token_column)) {
                let d = request(token, &settings.reset_link, settings.reset_ttl);
                found.add(AuthEvent::ResetRequested, d);
            }
            return;
        }
        if let Some(c) = col(&source.email_verified_column) {
            let was = row.old_value(c);
            if was.as_ref().is_some_and(|v| !is_set(v)) && row.value(c).is_some_and(|v| is_set(&v))
            {
                found.add(AuthEvent::EmailVerified, base());
            }
        }
        if let Some(token) = newly_set(col(&source.reset_token_column)) {
            let d = request(token, &settings.reset_link, settings.reset_ttl);
            found.add(AuthEvent::ResetRequested, d);
        }
        if self.is_reset(row, source, catalog) {
            found.add(AuthEvent::PostPasswordReset, base());
            found.add(AuthEvent::PasswordReset, base());
        }
        if let Some(c) = col(&source.last_sign_in_column) {
            if newly_set(Some(c)).is_some() && self.first_login(&user_id) {
                found.add(AuthEvent::PostLogin, base());
                found.add(AuthEvent::LoggedIn, base());
            }
        }
    }

    /// A password change is a reset when a reset was pending: the reset token set in the old
    /// row; or, for a schema that clears the token when its link is followed (GoTrue), a reset
    /// requested (`reset_sent_at_column`) less than the reset TTL ago, the user signed in since
    /// (by the link) and the token consumed. An admin setting a password is no reset.
    fn is_reset(&self, row: &RowView, source: &Source, catalog: &Catalog) -> bool {
        let Some(pw) = source.password_column.as_deref() else {
            return false;
        };
        let (Some(old), Some(new)) = (row.old_value(pw), row.value(pw)) else {
            return false;
        };
        if old == new || !is_set(&new) {
            return false;
        }
        let Some(token) = source.reset_token_column.as_deref() else {
            return false;
        };
        match row.old_value(token) {
            Some(t) if is_set(&t) => return true,
            Some(_) => {}
            None => return false,
        }
        let Some(sent) = source
            .reset_sent_at_column
            .as_deref()
            .and_then(|c| row.old_value(c))
            .and_then(|v| timestamp(&v))
        else {
            return false;
        };
        let now = row.change.commit.time;
        let ttl = TimeDelta::from_std(catalog.settings.reset_ttl).unwrap_or(TimeDelta::zero());
        if sent > now || now - sent > ttl {
            return false;
        }
        match source.last_sign_in_column.as_deref() {
            Some(c) => row
                .old_value(c)
                .and_then(|v| timestamp(&v))
                .is_some_and(|signed_in| signed_in >= sent),
            None => true,
        }
    }

    fn session_change(&mut self, row: &RowView, source: &Source, found: &mut Found) {
        let Some(user_col) = source.user_id_column.as_deref() else {
            return;
        };
        let user_id = row.value(user_col).unwrap_or(Value::Null);
        let data = || {
            let mut d = Map::new();
            d.insert("user_id".into(), user_id.clone());
            d.insert("session".into(), Value::Object(row.object(&[])));
            d
        };
        // With a revoked column, a session revoked is a logout, and one already revoked is
        // neither a login (inserted so) nor a logout (deleted later).
        let revoked = |v: Option<Value>| v.is_some_and(|v| is_set(&v));
        let revoked_col = source.revoked_column.as_deref();
        let was_revoked = revoked_col.is_some_and(|c| revoked(row.old_value(c)));
        let is_revoked = revoked_col.is_some_and(|c| revoked(row.value(c)));
        match row.change.op {
            Op::Insert if !is_revoked && self.first_login(&user_id) => {
                found.add(AuthEvent::PostLogin, data());
                found.add(AuthEvent::LoggedIn, data());
            }
            Op::Update if is_revoked && !was_revoked && row.old.is_some() => {
                found.add(AuthEvent::PostLogout, data())
            }
            Op::Delete if !was_revoked => found.add(AuthEvent::PostLogout, data()),
            _ => {}
        }
    }
}

/// The auth events one change gives, with their data.
#[derive(Default)]
struct Found(Vec<(AuthEvent, Map<String, Value>)>);

impl Found {
    fn add(&mut self, kind: AuthEvent, data: Map<String, Value>) {
        self.0.push((kind, data));
    }
}

fn event(
    change: &RowChange,
    kind: AuthEvent,
    data: Map<String, Value>,
    catalog: &Catalog,
) -> Event {
    let rel = &change.relation;
    Event {
        id: EventId {
            commit_lsn: change.commit.lsn,
            position: change.position,
            sub: kind.sub(),
        },
        event_type: Arc::from(kind.name()),
        data: EventData::from_object(&data),
        occurred_at: change.commit.time,
        source: EventSource {
            database: catalog.database.clone(),
            schema: Some(rel.schema.clone()),
            table: Some(rel.name.clone()),
            lsn: change.commit.lsn,
            xid: change.commit.xid,
        },
        old_id: None,
    }
}

fn col(c: &Option<String>) -> Option<&str> {
    c.as_deref()
}

/// A value that counts as set: not NULL, not false, not the empty string.
fn is_set(v: &Value) -> bool {
    !matches!(v, Value::Null | Value::Bool(false)) && v.as_str() != Some("")
}

/// A rendered `timestamptz` (RFC 3339) or `timestamp` (taken as UTC).
fn timestamp(v: &Value) -> Option<DateTime<Utc>> {
    let s = v.as_str()?;
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .ok()
        .or_else(|| {
            NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
                .ok()
                .map(|t| t.and_utc())
        })
}

/// A token as a URL component: unreserved characters stay, every other byte is %XX.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A change's rows by column name, as JSON values.
struct RowView<'a> {
    change: &'a RowChange,
    old: Option<Vec<Cell<'a>>>,
    new: Option<Vec<Cell<'a>>>,
}

impl<'a> RowView<'a> {
    fn new(change: &'a RowChange) -> RowView<'a> {
        RowView {
            change,
            old: change.row.old().map(|t| t.cells().collect()),
            new: change.row.new_row().map(|t| t.cells().collect()),
        }
    }

    fn index(&self, column: &str) -> Option<usize> {
        self.change
            .relation
            .columns
            .iter()
            .position(|c| &*c.name == column)
    }

    /// The column's value in the new row (the old row for a delete); an unchanged TOAST value
    /// comes from the old row. None when the WAL does not hold it.
    fn value(&self, column: &str) -> Option<Value> {
        let i = self.index(column)?;
        let primary = self.new.as_deref().or(self.old.as_deref())?;
        match primary.get(i)? {
            Cell::Unchanged => self.old_value(column),
            c => cell_value(*c),
        }
    }

    /// The column's value in the old row, if the WAL holds it.
    fn old_value(&self, column: &str) -> Option<Value> {
        let i = self.index(column)?;
        cell_value(*self.old.as_deref()?.get(i)?)
    }

    /// The row (new, or old for a delete) as an object, without the columns `except`.
    fn object(&self, except: &[&str]) -> Map<String, Value> {
        let mut m = Map::new();
        for col in &self.change.relation.columns {
            if except.contains(&&*col.name) {
                continue;
            }
            if let Some(v) = self.value(&col.name) {
                m.insert(col.name.to_string(), v);
            }
        }
        m
    }
}

fn cell_value(c: Cell<'_>) -> Option<Value> {
    match c {
        Cell::Null => Some(Value::Null),
        Cell::Value(v) => Some(serde_json::from_slice(v).unwrap_or(Value::Null)),
        Cell::Unchanged => None,
    }
}

#[cfg(test)]
mod tests;
