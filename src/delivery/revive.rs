//! A parked run's event, read back from its stored envelope (the envelope itself is what is sent
//! again, byte for byte; the event gives the kinds its id and type).

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::events::{Event, EventData, EventId, EventSource, Lsn};

#[derive(Deserialize)]
struct Envelope {
    id: String,
    event_type: String,
    #[serde(default)]
    event_data: Map<String, Value>,
    occurred_at: chrono::DateTime<chrono::Utc>,
    source: Source,
}

#[derive(Deserialize)]
struct Source {
    database: String,
    #[serde(default)]
    schema: Option<String>,
    #[serde(default)]
    table: Option<String>,
    lsn: String,
    #[serde(default)]
    xid: u32,
}

/// An event id as written (`00000000016B3748-0000000002`, or with a `-07` suffix for the
/// further events of one change).
pub fn event_id(text: &str) -> Option<EventId> {
    let mut parts = text.splitn(3, '-');
    let lsn = parts.next()?;
    let position = parts.next()?;
    let sub = match parts.next() {
        Some(s) => s.parse().ok()?,
        None => 0,
    };
    Some(EventId {
        commit_lsn: Lsn(u64::from_str_radix(lsn, 16).ok()?),
        position: position.parse().ok()?,
        sub,
    })
}

/// The event a stored envelope describes.
pub fn event(envelope: &[u8]) -> Result<Event, String> {
    let e: Envelope = serde_json::from_slice(envelope).map_err(|e| e.to_string())?;
    Ok(Event {
        id: event_id(&e.id).ok_or_else(|| format!("invalid event id {:?}", e.id))?,
        event_type: Arc::from(e.event_type),
        data: EventData::from_object(&e.event_data),
        occurred_at: e.occurred_at,
        source: EventSource {
            database: Arc::from(e.source.database),
            schema: e.source.schema.map(Arc::from),
            table: e.source.table.map(Arc::from),
            lsn: e.source.lsn.parse()?,
            xid: e.source.xid,
        },
        old_id: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_round_trips() {
        let text = r#"{"id":"00000000016B3748-0000000002","event_type":"POST_USER_UPDATE","event_data":{"user_id":42,"n":1.50},"occurred_at":"2025-01-02T03:04:05.678901Z","source":{"database":"app","schema":"public","table":"users","lsn":"0/16B3748","xid":751}}"#;
        let e = event(text.as_bytes()).unwrap();
        assert_eq!(String::from_utf8(e.envelope()).unwrap(), text);
        assert!(event(b"{}").is_err());
        assert!(event_id("zz-1").is_none());
    }
}
