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

pub mod row;

/// Builds the events of the stream from decoded items: pure, no IO. One builder follows one
/// stream, so events that depend on more than one change of a transaction can be told apart.
#[derive(Debug, Default)]
pub struct Builder {}

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
                let Some(event_type) = row::event_type(source.kind, change.op) else {
                    return;
                };
                if catalog.subscribers(event_type).is_empty() {
                    return;
                }
                out.push(row::row_event(
                    change,
                    source,
                    event_type,
                    &catalog.database,
                ));
            }
            Item::Message { .. } | Item::Truncate { .. } | Item::Checkpoint(_) => {}
        }
    }
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
}

/// The event id: the commit LSN and the change's position in its transaction. Written as
/// `00000000016B3748-0000000002` (hex LSN, decimal position, both fixed width), so ids sort in
/// commit order at any size of transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId {
    pub commit_lsn: Lsn,
    pub position: u32,
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}-{:010}", self.commit_lsn.0, self.position)
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
        };
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
        };
        let text = String::from_utf8(e.envelope()).unwrap();
        assert_eq!(
            text,
            r#"{"id":"00000000016B3748-0000000002","event_type":"POST_USER_UPDATE","event_data":{"user_id":42,"email":"a\"b"},"occurred_at":"2025-01-02T03:04:05.678901Z","source":{"database":"app","schema":"public","table":"users","lsn":"0/16B3748","xid":751}}"#
        );
    }
}
