//! Custom events: the logical messages `pgfire.emit(event_type, data)` writes (prefix
//! `pgfire.emit`, transactional) to POST events with the same envelope as every other event.
//! `pgfire.emit` checks the name (declared in `pgfire.event_types`, not built-in) and that `data`
//! is an object; this side checks again what it relies on, since any role allowed to call
//! `pg_logical_emit_message` can write a message with this prefix.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::catalog::Catalog;
use crate::events::{Commit, Event, EventData, EventId, EventSource, MessageError};

/// The prefix of the messages `pgfire.emit` writes.
pub const MESSAGE_PREFIX: &str = "pgfire.emit";

#[derive(Debug, Deserialize)]
struct Emitted {
    event_type: String,
    data: Map<String, Value>,
}

/// Whether `name` may be a custom event type: the rule `pgfire.emit` and `pgfire.event_types`
/// apply (letters, digits, `_ . : -`, starting with a letter; not a built-in prefix).
pub fn is_custom_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 128
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.:-".contains(c))
        && !["PRE_", "POST_", "auth.", "api."]
            .iter()
            .any(|p| name.starts_with(p))
}

/// The event of one `pgfire.emit` message committed at `commit`, if it has subscribers.
pub fn event(
    content: &[u8],
    id: EventId,
    commit: &Commit,
    catalog: &Catalog,
) -> Result<Option<Event>, MessageError> {
    let emitted: Emitted =
        serde_json::from_slice(content).map_err(|e| MessageError::Json(e.to_string()))?;
    if !is_custom_name(&emitted.event_type) {
        return Err(MessageError::NotCustom(emitted.event_type));
    }
    if catalog.subscribers(&emitted.event_type).is_empty() {
        return Ok(None);
    }
    Ok(Some(Event {
        id,
        event_type: Arc::from(emitted.event_type),
        data: EventData::from_object(&emitted.data),
        occurred_at: commit.time,
        source: EventSource {
            database: catalog.database.clone(),
            schema: None,
            table: None,
            lsn: commit.lsn,
            xid: commit.xid,
        },
        old_id: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Lsn;
    use std::collections::HashMap;

    pub(crate) fn catalog_with(event_types: &[&str]) -> Catalog {
        let subs: Vec<String> = event_types
            .iter()
            .map(|t| format!(r#"{{"event_type": "{t}", "function_name": "f", "priority": 0, "active": true}}"#))
            .collect();
        let json = format!(
            r#"{{"database": "app", "functions": [{{"name": "f", "kind": "log", "target": null,
                 "timeout_ms": 1000, "active": true, "sql_callable": null}}],
                 "subscriptions": [{}]}}"#,
            subs.join(",")
        );
        Catalog::from_snapshot(&json, &HashMap::new()).unwrap()
    }

    fn commit() -> Commit {
        Commit {
            lsn: Lsn(0x16B3748),
            end_lsn: Lsn(0x16B3800),
            time: chrono::DateTime::from_timestamp_micros(1_735_787_045_678_901).unwrap(),
            xid: 751,
        }
    }

    fn id() -> EventId {
        EventId {
            commit_lsn: Lsn(0x16B3748),
            position: 3,
            sub: 0,
        }
    }

    #[test]
    fn an_emitted_event_has_the_envelope_of_every_event() {
        let cat = catalog_with(&["ORDER_SHIPPED"]);
        let msg = br#"{"data": {"id": 12345678901234567890, "items": [1, 2]}, "event_type": "ORDER_SHIPPED"}"#;
        let e = event(msg, id(), &commit(), &cat).unwrap().unwrap();
        assert_eq!(
            String::from_utf8(e.envelope()).unwrap(),
            r#"{"id":"00000000016B3748-0000000003","event_type":"ORDER_SHIPPED","event_data":{"id":12345678901234567890,"items":[1,2]},"occurred_at":"2025-01-02T03:04:05.678901Z","source":{"database":"app","lsn":"0/16B3748","xid":751}}"#
        );
    }

    #[test]
    fn without_subscribers_there_is_no_event() {
        let cat = catalog_with(&["OTHER"]);
        let msg = br#"{"event_type": "ORDER_SHIPPED", "data": {}}"#;
        assert!(event(msg, id(), &commit(), &cat).unwrap().is_none());
    }

    #[test]
    fn forged_or_malformed_messages_are_errors_never_events() {
        let cat = catalog_with(&["POST_USER_CREATE", "X"]);
        for (msg, want) in [
            (
                &br#"{"event_type": "POST_USER_CREATE", "data": {}}"#[..],
                MessageError::NotCustom("POST_USER_CREATE".into()),
            ),
            (
                br#"{"event_type": "1x", "data": {}}"#,
                MessageError::NotCustom("1x".into()),
            ),
        ] {
            assert_eq!(event(msg, id(), &commit(), &cat).unwrap_err(), want);
        }
        for msg in [
            &b"not json"[..],
            br#"{"event_type": "X", "data": [1]}"#,
            br#"{"event_type": "X"}"#,
            b"\xff\xfe",
        ] {
            assert!(matches!(
                event(msg, id(), &commit(), &cat),
                Err(MessageError::Json(_))
            ));
        }
    }

    #[test]
    fn custom_names() {
        for ok in [
            "ORDER_SHIPPED",
            "order.shipped",
            "a",
            "Billing:invoice-paid",
        ] {
            assert!(is_custom_name(ok), "{ok}");
        }
        for bad in [
            "",
            "_x",
            "1x",
            "POST_X",
            "PRE_X",
            "auth.x",
            "api.x",
            "a b",
            "é",
            &"a".repeat(129),
        ] {
            assert!(!is_custom_name(bad), "{bad}");
        }
    }
}
