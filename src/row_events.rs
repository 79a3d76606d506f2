//! Committed row changes of source tables to POST events (DESIGN section 2): the row's columns,
//! `user_id` or `record_id` and `table`, `changes` on updates, and the old row.

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::catalog::{Source, SourceKind};
use crate::event::{Event, EventId, EventSource};
use crate::replication::decode::{Cell, Op, RowChange};

/// The POST event type of a change to a source, if that kind of source has row events.
pub fn event_type(kind: SourceKind, op: Op) -> Option<&'static str> {
    Some(match (kind, op) {
        (SourceKind::User, Op::Insert) => "POST_USER_CREATE",
        (SourceKind::User, Op::Update) => "POST_USER_UPDATE",
        (SourceKind::User, Op::Delete) => "POST_USER_DELETE",
        (SourceKind::Record, Op::Insert) => "POST_RECORD_CREATE",
        (SourceKind::Record, Op::Update) => "POST_RECORD_UPDATE",
        (SourceKind::Record, Op::Delete) => "POST_RECORD_DELETE",
        (SourceKind::Session, _) => return None,
    })
}

/// Build the event for `change` of `source`, moving the row's values into it.
pub fn row_event(
    change: RowChange,
    source: &Source,
    event_type: &str,
    database: &Arc<str>,
) -> Event {
    let rel = change.relation.clone();
    let id_key = match source.kind {
        SourceKind::User => "user_id",
        _ => "record_id",
    };
    let id_index = source
        .id_column
        .as_deref()
        .and_then(|c| rel.columns.iter().position(|col| &*col.name == c));
    let old_map: Option<Map<String, Value>> = change.old.as_ref().map(|cells| {
        rel.columns
            .iter()
            .zip(cells)
            .filter_map(|(c, cell)| cell_value(cell, None).map(|v| (c.name.to_string(), v)))
            .collect()
    });
    let (cells, fallback) = match change.new {
        Some(new) => (new, change.old.as_deref()),
        None => (change.old.clone().unwrap_or_default(), None),
    };
    let mut data = Map::with_capacity(cells.len() + 4);
    let id = id_index
        .and_then(|i| cells.get(i))
        .and_then(|cell| cell_value(cell, fallback.and_then(|o| o.get(id_index?))))
        .unwrap_or(Value::Null);
    data.insert(id_key.to_string(), id);
    if source.kind != SourceKind::User {
        data.insert("table".to_string(), Value::String(rel.name.to_string()));
    }
    let mut changes = (change.op == Op::Update && old_map.is_some()).then(Map::new);
    let mut missing = Vec::new();
    for (i, (col, cell)) in rel.columns.iter().zip(cells).enumerate() {
        let old_cell = fallback.and_then(|o| o.get(i));
        let value = match cell {
            Cell::Value(v) => Some(v), // moved, not copied
            other => cell_value(&other, old_cell),
        };
        let Some(v) = value else {
            missing.push(Value::String(col.name.to_string()));
            continue;
        };
        if let Some(changes) = changes.as_mut() {
            let old_v = old_cell
                .and_then(|o| cell_value(o, None))
                .unwrap_or(Value::Null);
            if old_v != v {
                let mut c = Map::with_capacity(2);
                c.insert("old".into(), old_v);
                c.insert("new".into(), v.clone());
                changes.insert(col.name.to_string(), Value::Object(c));
            }
        }
        data.insert(col.name.to_string(), v);
    }
    // Columns the server did not resend (unchanged TOAST, no old row to take them from).
    if !missing.is_empty() {
        data.insert("unchanged_toast".to_string(), Value::Array(missing));
    }
    if let Some(changes) = changes {
        data.insert("changes".to_string(), Value::Object(changes));
    }
    if change.op != Op::Insert {
        if let Some(old) = old_map {
            data.insert("old".to_string(), Value::Object(old));
        }
    }

    Event {
        id: EventId {
            commit_lsn: change.commit.lsn,
            position: change.position,
        },
        event_type: Arc::from(event_type),
        data,
        occurred_at: change.commit.time,
        source: EventSource {
            database: database.clone(),
            schema: Some(rel.schema.clone()),
            table: Some(rel.name.clone()),
            lsn: change.commit.lsn,
            xid: change.commit.xid,
        },
    }
}

/// A cell's value; an unchanged TOAST cell takes the old row's value, or has none.
fn cell_value(cell: &Cell, old: Option<&Cell>) -> Option<Value> {
    match cell {
        Cell::Null => Some(Value::Null),
        Cell::Value(v) => Some(v.clone()),
        Cell::Unchanged => match old {
            Some(Cell::Value(v)) => Some(v.clone()),
            Some(Cell::Null) => Some(Value::Null),
            _ => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Commit, Lsn};
    use crate::replication::decode::{Column, Relation};
    use crate::replication::values::classify;
    use serde_json::json;

    fn rel() -> Arc<Relation> {
        let col = |n: &str, t: u32| Column {
            name: Arc::from(n),
            type_oid: t,
            class: classify(t),
        };
        Arc::new(Relation {
            oid: 42,
            schema: Arc::from("public"),
            name: Arc::from("users"),
            columns: vec![col("id", 20), col("email", 25), col("bio", 25)],
        })
    }

    fn change(op: Op, old: Option<Vec<Cell>>, new: Option<Vec<Cell>>) -> RowChange {
        RowChange {
            op,
            relation: rel(),
            old,
            new,
            commit: Arc::new(Commit {
                lsn: Lsn(0x16B3748),
                end_lsn: Lsn(0),
                time: Default::default(),
                xid: 751,
            }),
            position: 2,
            raw_size: 0,
        }
    }

    fn v(x: Value) -> Cell {
        Cell::Value(x)
    }

    fn user() -> Source {
        Source {
            oid: 42,
            kind: SourceKind::User,
            id_column: Some("id".into()),
        }
    }

    #[test]
    fn update_has_changes_and_old_row() {
        let old = vec![v(json!(42)), v(json!("x@b.c")), v(json!("long"))];
        let new = vec![v(json!(42)), v(json!("a@b.c")), Cell::Unchanged];
        let e = row_event(
            change(Op::Update, Some(old), Some(new)),
            &user(),
            "POST_USER_UPDATE",
            &Arc::from("app"),
        );
        assert_eq!(e.id.to_string(), "00000000016B3748-000002");
        assert_eq!(
            Value::Object(e.data),
            json!({"user_id": 42, "id": 42, "email": "a@b.c", "bio": "long",
                   "changes": {"email": {"old": "x@b.c", "new": "a@b.c"}},
                   "old": {"id": 42, "email": "x@b.c", "bio": "long"}})
        );
    }

    #[test]
    fn record_insert_names_the_table() {
        let src = Source {
            oid: 42,
            kind: SourceKind::Record,
            id_column: Some("id".into()),
        };
        let e = row_event(
            change(
                Op::Insert,
                None,
                Some(vec![v(json!(7)), Cell::Null, v(json!("b"))]),
            ),
            &src,
            "POST_RECORD_CREATE",
            &Arc::from("app"),
        );
        assert_eq!(
            Value::Object(e.data),
            json!({"record_id": 7, "table": "users", "id": 7, "email": null, "bio": "b"})
        );
    }

    #[test]
    fn delete_carries_the_old_row() {
        let old = vec![v(json!(5)), v(json!("d@b.c")), Cell::Null];
        let e = row_event(
            change(Op::Delete, Some(old), None),
            &user(),
            "POST_USER_DELETE",
            &Arc::from("app"),
        );
        assert_eq!(e.data["user_id"], json!(5));
        assert_eq!(e.data["email"], json!("d@b.c"));
        assert_eq!(e.data["old"]["email"], json!("d@b.c"));
    }

    #[test]
    fn unchanged_toast_without_old_row_is_named() {
        let new = vec![v(json!(1)), v(json!("e")), Cell::Unchanged];
        let e = row_event(
            change(Op::Update, None, Some(new)),
            &user(),
            "POST_USER_UPDATE",
            &Arc::from("app"),
        );
        assert_eq!(e.data["unchanged_toast"], json!(["bio"]));
        assert!(!e.data.contains_key("bio"));
    }
}
