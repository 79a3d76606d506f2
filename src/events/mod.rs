//! The domain event: one type from the moment a change is decoded to the moment a function runs.
//! Dispatch and function kinds see nothing of pgoutput or the wire.

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::{Map, Value};

pub use crate::replication::position::{Commit, Lsn};

use crate::catalog::Catalog;
use crate::replication::decode::Item;

pub mod auth;
pub mod custom;
pub mod ddl;
pub mod row;

/// Builds the events of the stream from decoded items: pure, no IO. One builder follows one
/// stream, so events that depend on more than one change of a transaction can be told apart
/// (one login per user and transaction, see [`auth`]).
#[derive(Debug, Default)]
pub struct Builder {
    auth: auth::TxnState,
}

impl Builder {
    pub fn new() -> Builder {
        Builder::default()
    }

    /// Append to `out` the events one decoded item produces under `catalog` (the configuration
    /// in force at its commit), in the order they are to be delivered. Only events with
    /// subscribers are built. Configuration messages and checkpoints are not events: the caller
    /// handles them (and applies a configuration before the items after it).
    pub fn push(&mut self, item: Item, catalog: &Catalog, out: &mut Vec<Event>) {
        match item {
            Item::Row(change) => {
                let Some(source) = catalog.sources.get(&change.relation.oid) else {
                    return;
                };
                // Auth events are worked out before the row event takes the change.
                let mut auth_events = Vec::new();
                self.auth.events(&change, source, catalog, &mut auth_events);
                if let Some(event_type) = row::event_type(source.kind, change.op) {
                    if !catalog.subscribers(event_type).is_empty() {
                        out.push(row::row_event(
                            change,
                            source,
                            event_type,
                            &catalog.database,
                        ));
                    }
                }
                out.append(&mut auth_events);
            }
            // Only transactional messages are events: nothing rolled back produces one.
            Item::Message {
                prefix,
                content,
                commit: Some(commit),
                position,
                ..
            } => {
                let at = EventId {
                    commit_lsn: commit.lsn,
                    position,
                    sub: 0,
                };
                let event = match prefix.as_str() {
                    custom::MESSAGE_PREFIX => custom::event(&content, at, &commit, catalog),
                    ddl::MESSAGE_PREFIX => ddl::event(&content, at, &commit, catalog),
                    _ => return,
                };
                match event {
                    Ok(Some(e)) => out.push(e),
                    Ok(None) => {}
                    // Not written by pgfire's own functions (pg_logical_emit_message called by
                    // hand with pgfire's prefix): there is no event to deliver.
                    Err(err) => {
                        tracing::warn!(error = %err, prefix, lsn = %commit.lsn, "ignored a malformed pgfire message")
                    }
                }
            }
            // TRUNCATE of datahub tables arrives as a message of their TRUNCATE trigger.
            Item::Message { .. } | Item::Truncate { .. } | Item::Checkpoint(_) => {}
        }
    }
}

/// Why a logical message with one of pgfire's prefixes is no event (pgfire's own functions
/// write them; `pg_logical_emit_message` called by hand can write anything).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MessageError {
    #[error("not the JSON pgfire writes: {0}")]
    Json(String),
    #[error("event type {0:?} is not a custom event type")]
    NotCustom(String),
    #[error("{0}")]
    Invalid(String),
}

/// Where an event came from.
#[derive(Debug, Clone, Serialize)]
pub struct EventSource {
    pub database: Arc<str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schema: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table: Option<Arc<str>>,
    pub lsn: Lsn,
    pub xid: u32,
}

/// `event_data`: a JSON object, kept as its JSON text (written once, when the event is built, and
/// embedded as is in every envelope).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventData(String);

impl EventData {
    pub fn from_object(object: &Map<String, Value>) -> EventData {
        EventData(serde_json::to_string(object).unwrap_or_else(|_| "{}".into()))
    }

    /// JSON text its writer guarantees to be one valid JSON object.
    pub(crate) fn from_json_unchecked(text: String) -> EventData {
        EventData(text)
    }

    pub fn json(&self) -> &str {
        &self.0
    }

    /// The object as a JSON value.
    pub fn to_value(&self) -> Value {
        serde_json::from_str(&self.0).unwrap_or_default()
    }
}

/// A POST event ready for dispatch.
#[derive(Debug, Clone)]
pub struct Event {
    /// Stable across redeliveries: commit LSN and position in the transaction.
    pub id: EventId,
    pub event_type: Arc<str>,
    pub data: EventData,
    pub occurred_at: DateTime<Utc>,
    pub source: EventSource,
    /// An update that changed its row's id: the id before it (JSON), which delivery orders it
    /// behind too.
    pub old_id: Option<Box<str>>,
}

/// The event id: the commit LSN, the change's position in its transaction, and which of the
/// events of that change it is. Written as `00000000016B3748-0000000002` (hex LSN, decimal
/// position, both fixed width) for the first event of a change (row, DDL and custom events), and
/// `00000000016B3748-0000000002-07` for the others (auth events: `sub` is fixed per event type,
/// see [`auth::sub`]), so ids sort in commit order at any size of transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId {
    pub commit_lsn: Lsn,
    pub position: u32,
    /// 0 for the change's own event; 1-99 for the further events of the same change.
    pub sub: u8,
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}-{:010}", self.commit_lsn.0, self.position)?;
        if self.sub > 0 {
            write!(f, "-{:02}", self.sub.min(99))?;
        }
        Ok(())
    }
}

impl Serialize for EventId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl Event {
    /// The JSON envelope every function kind receives (DESIGN section 2).
    pub fn envelope(&self) -> Vec<u8> {
        use std::io::Write as _;
        let mut out = Vec::with_capacity(self.data.0.len() + 320);
        // Writing to a Vec cannot fail.
        let _ = write!(out, "{{\"id\":\"{}\",\"event_type\":", self.id);
        let _ = serde_json::to_writer(&mut out, &*self.event_type);
        out.extend_from_slice(b",\"event_data\":");
        out.extend_from_slice(self.data.0.as_bytes());
        let _ = write!(
            out,
            ",\"occurred_at\":\"{}\",\"source\":",
            self.occurred_at
                .to_rfc3339_opts(SecondsFormat::Micros, true)
        );
        let _ = serde_json::to_writer(&mut out, &self.source);
        out.push(b'}');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trip() {
        let l: Lsn = "0/16B3748".parse().unwrap();
        assert_eq!(l.0, 0x16B3748);
        assert_eq!(l.to_string(), "0/16B3748");
        assert_eq!(Lsn(0x1_0000_0002).to_string(), "1/2");
        assert!("16B3748".parse::<Lsn>().is_err());
        assert!("x/1".parse::<Lsn>().is_err());
        assert!("100000000/1".parse::<Lsn>().is_err());
    }

    #[test]
    fn ids_sort_by_commit_then_position() {
        let id = |l, p| EventId {
            commit_lsn: Lsn(l),
            position: p,
            sub: 0,
        };
        let sub = |l, p, s| EventId {
            commit_lsn: Lsn(l),
            position: p,
            sub: s,
        };
        // Further events of one change: after it, before the next change, in `sub` order.
        assert_eq!(
            sub(0x16B3748, 3, 7).to_string(),
            "00000000016B3748-0000000003-07"
        );
        assert!(id(0x10, 2).to_string() < sub(0x10, 2, 1).to_string());
        assert!(sub(0x10, 2, 1).to_string() < sub(0x10, 2, 10).to_string());
        assert!(sub(0x10, 2, 99).to_string() < id(0x10, 3).to_string());
        assert_eq!(id(0x16B3748, 3).to_string(), "00000000016B3748-0000000003");
        assert!(id(0x10, 2).to_string() < id(0x10, 10).to_string());
        assert!(id(0xF, 99).to_string() < id(0x10, 0).to_string());
        // Past a million changes in one transaction too.
        assert!(id(0x10, 999_999).to_string() < id(0x10, 1_000_000).to_string());
        assert!(id(0x10, u32::MAX - 1).to_string() < id(0x10, u32::MAX).to_string());
        assert!(id(0x10, u32::MAX).to_string() < id(0x11, 0).to_string());
    }

    #[test]
    fn envelope_is_the_documented_json() {
        let mut data = Map::new();
        data.insert("user_id".into(), Value::from(42));
        data.insert("email".into(), Value::from("a\"b"));
        let e = Event {
            id: EventId {
                commit_lsn: Lsn(0x16B3748),
                position: 2,
                sub: 0,
            },
            event_type: Arc::from("POST_USER_UPDATE"),
            data: EventData::from_object(&data),
            occurred_at: DateTime::from_timestamp_micros(1_735_787_045_678_901).unwrap(),
            source: EventSource {
                database: Arc::from("app"),
                schema: Some(Arc::from("public")),
                table: Some(Arc::from("users")),
                lsn: Lsn(0x16B3748),
                xid: 751,
            },
            old_id: None,
        };
        let text = String::from_utf8(e.envelope()).unwrap();
        assert_eq!(
            text,
            r#"{"id":"00000000016B3748-0000000002","event_type":"POST_USER_UPDATE","event_data":{"user_id":42,"email":"a\"b"},"occurred_at":"2025-01-02T03:04:05.678901Z","source":{"database":"app","schema":"public","table":"users","lsn":"0/16B3748","xid":751}}"#
        );
    }
}
