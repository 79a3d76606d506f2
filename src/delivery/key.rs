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
    let rest = ["{\"user_id\":", "{\"record_id\":"]
        .iter()
        .find_map(|p| json.strip_prefix(p));
    // The usual id, a number or a string without escapes, is its own text (as it prints).
    if let Some(id) = rest.and_then(plain_scalar) {
        return format!("{schema}.{table}:{id}");
    }
    let first = rest.and_then(|rest| {
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

/// The JSON value at the start of `text` when it is an integer, or a string with no escape, whose
/// text is the same as `serde_json` prints it; `None` for anything else (parsed in full then).
fn plain_scalar(text: &str) -> Option<&str> {
    let b = text.as_bytes();
    let end = match b.first()? {
        b'"' => 1 + b[1..].iter().position(|c| *c == b'"' || *c == b'\\')?,
        // Integers only (an exponent, say, prints otherwise).
        b'-' | b'0'..=b'9' => {
            1 + b[1..]
                .iter()
                .position(|c| !c.is_ascii_digit())
                .unwrap_or(b.len() - 1)
        }
        _ => return None,
    };
    match b.get(end) {
        // A string ends at its quote; a backslash means an escape (parsed in full instead).
        Some(b'"') if b[0] == b'"' => Some(&text[..end + 1]),
        Some(b',' | b'}') | None if b[0] != b'"' => Some(&text[..end]),
        _ => None,
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
        // The text of a plain id is the key exactly as the parsed value prints (keys of parked
        // runs stored by earlier versions stay the same); others are parsed.
        for id in [
            "0",
            "-17",
            "3.25",
            "1e10",
            "12345678901234567891",
            r#""A-1""#,
            r#""é ü""#,
            r#""a\"b""#,
            r#""tab\there""#,
            r#""\u00e9""#,
            "[1,2]",
            "true",
        ] {
            let printed: Value = serde_json::from_str(id).unwrap();
            for data in [
                format!(r#"{{"record_id":{id}}}"#),
                format!(r#"{{"record_id":{id},"x":1}}"#),
            ] {
                assert_eq!(
                    of(&event(Some("t"), &data)),
                    format!("public.t:{printed}"),
                    "{data}"
                );
            }
        }
        // Not first: still found.
        assert_eq!(
            of(&event(Some("t"), r#"{"a":[1,{"b":2}],"record_id":5}"#)),
            "public.t:5"
        );
    }
}
