//! Datahub events: the logical messages pgfire's event triggers and TRUNCATE triggers write
//! (prefix `pgfire.ddl`, transactional; `sql/005_events.sql`) to `api.dataTable_created`,
//! `_updated`, `_deleted` and `_emptied` for the tables of the datahub schemas, never pgfire's.
//!
//! `event_data` is `schema` and `table`, then for created and updated `columns` (name, type,
//! nullable, default) and `constraints` (name, type, definition), and for updated `changes`
//! (what the statement changed: `renamed`, `moved`, `columns_added`, `columns_dropped`,
//! `columns_renamed`, `columns_altered`, `constraints_added`, `constraints_dropped`).

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::catalog::Catalog;
use crate::events::{Commit, Event, EventData, EventId, EventSource, MessageError};

/// The prefix of the messages of the datahub triggers.
pub const MESSAGE_PREFIX: &str = "pgfire.ddl";

/// The event type of a message's `op`.
fn event_type(op: &str) -> Option<&'static str> {
    Some(match op {
        "created" => "api.dataTable_created",
        "updated" => "api.dataTable_updated",
        "deleted" => "api.dataTable_deleted",
        "emptied" => "api.dataTable_emptied",
        _ => return None,
    })
}

/// The event of one datahub message committed at `commit`, if it has subscribers and its table
/// is in a datahub schema as of that commit.
pub fn event(
    content: &[u8],
    id: EventId,
    commit: &Commit,
    catalog: &Catalog,
) -> Result<Option<Event>, MessageError> {
    let mut msg: Map<String, Value> =
        serde_json::from_slice(content).map_err(|e| MessageError::Json(e.to_string()))?;
    let text = |msg: &Map<String, Value>, key: &str| match msg.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        _ => Err(MessageError::Invalid(format!(
            "datahub message without a {key:?} string"
        ))),
    };
    let op = text(&msg, "op")?;
    let Some(event_type) = event_type(&op) else {
        return Err(MessageError::Invalid(format!(
            "unknown datahub operation {op:?}"
        )));
    };
    let (schema, table) = (text(&msg, "schema")?, text(&msg, "table")?);
    if schema == "pgfire" || !catalog.settings.datahub_schemas.contains(&schema) {
        return Ok(None);
    }
    if catalog.subscribers(event_type).is_empty() {
        return Ok(None);
    }
    let mut data = Map::new();
    data.insert("schema".into(), Value::String(schema.clone()));
    data.insert("table".into(), Value::String(table.clone()));
    let keys: &[&str] = match op.as_str() {
        "created" => &["columns", "constraints"],
        "updated" => &["columns", "constraints", "changes"],
        _ => &[],
    };
    for key in keys {
        let value = msg.remove(*key).unwrap_or(Value::Null);
        data.insert(key.to_string(), value);
    }
    Ok(Some(Event {
        id,
        event_type: Arc::from(event_type),
        data: EventData::from_object(&data),
        occurred_at: commit.time,
        source: EventSource {
            database: catalog.database.clone(),
            schema: Some(Arc::from(schema)),
            table: Some(Arc::from(table)),
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
    use serde_json::json;
    use std::collections::HashMap;

    fn catalog(datahub: Option<&str>) -> Catalog {
        let settings = datahub
            .map(|d| format!(r#""datahub_schemas": "{d}""#))
            .unwrap_or_default();
        let subs: Vec<String> = ["created", "updated", "deleted", "emptied"]
            .iter()
            .map(|op| format!(r#"{{"event_type": "api.dataTable_{op}", "function_name": "f", "priority": 0, "active": true}}"#))
            .collect();
        let json = format!(
            r#"{{"database": "app", "settings": {{{settings}}},
                 "functions": [{{"name": "f", "kind": "log", "target": null, "timeout_ms": 1000, "active": true, "sql_callable": null}}],
                 "subscriptions": [{}]}}"#,
            subs.join(",")
        );
        Catalog::from_snapshot(&json, &HashMap::new()).unwrap()
    }

    fn commit() -> Commit {
        Commit {
            lsn: Lsn(0x20),
            end_lsn: Lsn(0x30),
            time: Default::default(),
            xid: 9,
        }
    }

    fn id() -> EventId {
        EventId {
            commit_lsn: Lsn(0x20),
            position: 0,
            sub: 0,
        }
    }

    fn data(msg: &Value, cat: &Catalog) -> Option<(String, Value)> {
        let bytes = serde_json::to_vec(msg).unwrap();
        event(&bytes, id(), &commit(), cat)
            .unwrap()
            .map(|e| (e.event_type.to_string(), e.data.to_value()))
    }

    #[test]
    fn each_operation_has_its_event_and_fields() {
        let cat = catalog(None);
        let cols = json!([{"name": "id", "type": "integer", "nullable": false, "default": null}]);
        let created = json!({"op": "created", "table": "t", "schema": "public", "columns": cols, "constraints": []});
        let (t, d) = data(&created, &cat).unwrap();
        assert_eq!(t, "api.dataTable_created");
        assert_eq!(
            d,
            json!({"schema": "public", "table": "t", "columns": cols, "constraints": []})
        );
        let changes = json!({"columns_added": [{"name": "x", "type": "text", "nullable": true, "default": null}]});
        let updated = json!({"op": "updated", "schema": "public", "table": "t", "columns": cols,
                             "constraints": [], "changes": changes});
        let (t, d) = data(&updated, &cat).unwrap();
        assert_eq!(t, "api.dataTable_updated");
        assert_eq!(d["changes"], changes);
        for op in ["deleted", "emptied"] {
            let (t, d) = data(
                &json!({"op": op, "schema": "public", "table": "t", "columns": []}),
                &cat,
            )
            .unwrap();
            assert_eq!(t, format!("api.dataTable_{op}"));
            assert_eq!(d, json!({"schema": "public", "table": "t"}));
        }
    }

    #[test]
    fn only_datahub_schemas_and_never_pgfire() {
        let msg = |schema: &str| json!({"op": "emptied", "schema": schema, "table": "t"});
        assert!(data(&msg("app"), &catalog(None)).is_none());
        assert!(data(&msg("app"), &catalog(Some("public, app"))).is_some());
        assert!(data(&msg("public"), &catalog(Some(""))).is_none());
        assert!(data(&msg("pgfire"), &catalog(Some("pgfire,public"))).is_none());
    }

    #[test]
    fn malformed_messages_are_errors() {
        let cat = catalog(None);
        for bad in [
            &b"[]"[..],
            b"nope",
            br#"{"op": "dropped", "schema": "public", "table": "t"}"#,
            br#"{"op": "created", "schema": 1, "table": "t"}"#,
            br#"{"op": "created", "schema": "public"}"#,
        ] {
            assert!(event(bad, id(), &commit(), &cat).is_err());
        }
    }
}
