//! The ordering key of an event: events of one key reach a function one at a time, in commit
//! order. A row event's key is its table and primary key (`user_id` / `record_id`, the source's
//! id column); a row event without one is keyed by its table alone (in commit order per table);
//! any other event by its type. An update that changed the row's id has its old key too
//! ([`prior`]): it is ordered behind the old key's earlier events and before the new key's later
//! ones.

use serde::Deserialize;
use serde_json::Value;

use crate::events::Event;

/// The top-level id fields of `event_data`; everything else is skipped unread.
#[derive(Deserialize)]
struct Ids {
    #[serde(default)]
    user_id: Option<Value>,
    #[serde(default)]
    record_id: Option<Value>,
}

/// The key `event` is ordered by.
pub fn of(event: &Event) -> String {
    let Some(table) = event.source.table.as_deref() else {
        return format!("type:{}", event.event_type);
    };
    let schema = event.source.schema.as_deref().unwrap_or("");
    let json = event.data.json();
    // Row events start with their id: read that value alone, not the whole row.
    let first = ["{\"user_id\":", "{\"record_id\":"]
        .iter()
        .find_map(|p| json.strip_prefix(p))
        .and_then(|rest| {
            serde_json::Deserializer::from_str(rest)
                .into_iter::<Value>()
                .next()
                .and_then(Result::ok)
        });
    let id = first
        .or_else(|| {
            serde_json::from_str::<Ids>(json)
                .ok()
                .and_then(|ids| ids.user_id.or(ids.record_id))
        })
        .filter(|v| !v.is_null());
    match id {
        Some(id) => format!("{schema}.{table}:{id}"),
        None => format!("{schema}.{table}"),
    }
}

/// The key `event` had before it, when it is an update that changed its row's id.
pub fn prior(event: &Event) -> Option<String> {
    let table = event.source.table.as_deref()?;
    let old: Value = serde_json::from_str(event.old_id.as_deref()?).ok()?;
    let schema = event.source.schema.as_deref().unwrap_or("");
    Some(format!("{schema}.{table}:{old}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{EventData, EventId, EventSource, Lsn};
    use std::sync::Arc;

    fn event(table: Option<&str>, data: &str) -> Event {
        Event {
            id: EventId {
                commit_lsn: Lsn(1),
                position: 0,
                sub: 0,
            },
            event_type: Arc::from("POST_USER_UPDATE"),
            data: EventData::from_json_unchecked(data.to_string()),
            occurred_at: Default::default(),
            source: EventSource {
                database: Arc::from("app"),
                schema: table.map(|_| Arc::from("public")),
                table: table.map(Arc::from),
                lsn: Lsn(1),
                xid: 1,
            },
            old_id: None,
        }
    }

    #[test]
    fn an_update_of_the_id_has_the_old_key_too() {
        let mut moved = event(Some("users"), r#"{"user_id":2,"id":2}"#);
        assert_eq!(prior(&moved), None);
        moved.old_id = Some("1".into());
        assert_eq!(of(&moved), "public.users:2");
        assert_eq!(prior(&moved).as_deref(), Some("public.users:1"));
        moved.old_id = Some(r#""A-1""#.into());
        assert_eq!(prior(&moved).as_deref(), Some(r#"public.users:"A-1""#));
    }

    #[test]
    fn rows_by_table_and_id_others_by_type() {
        assert_eq!(
            of(&event(
                Some("users"),
                r#"{"user_id":42,"id":42,"changes":{"user_id":1}}"#
            )),
            "public.users:42"
        );
        assert_eq!(
            of(&event(
                Some("orders"),
                r#"{"record_id":"A-1","table":"orders"}"#
            )),
            r#"public.orders:"A-1""#
        );
        // Precision kept: two ids that differ past f64 stay two keys.
        assert_ne!(
            of(&event(Some("t"), r#"{"record_id":12345678901234567891}"#)),
            of(&event(Some("t"), r#"{"record_id":12345678901234567890}"#))
        );
        assert_eq!(of(&event(Some("t"), r#"{"a":1}"#)), "public.t");
        assert_eq!(of(&event(Some("t"), r#"{"record_id":null}"#)), "public.t");
        assert_eq!(of(&event(None, r#"{"x":1}"#)), "type:POST_USER_UPDATE");
        // Not first: still found.
        assert_eq!(
            of(&event(Some("t"), r#"{"a":[1,{"b":2}],"record_id":5}"#)),
            "public.t:5"
        );
    }
}
