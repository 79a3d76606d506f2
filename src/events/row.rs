//! Committed row changes of source tables to POST events (DESIGN section 2): the row's columns,
//! `user_id` or `record_id` and `table`, `changes` on updates, and the old row.

use std::sync::{Arc, LazyLock};

use serde_json::{Map, Value};

use crate::catalog::{Source, SourceKind};
use crate::events::{Event, EventData, EventId, EventSource};
use crate::replication::decode::{Cell, Column, Op, PgfireKey, RowChange};
use crate::replication::values::{json_string, may_hold_objects, TypeClass};

/// The POST event type of a change to a source, if that kind of source has row events (shared:
/// events of a type hold the same name).
pub fn event_type(kind: SourceKind, op: Op) -> Option<&'static Arc<str>> {
    static NAMES: LazyLock<[Arc<str>; 6]> = LazyLock::new(|| {
        [
            "POST_USER_CREATE",
            "POST_USER_UPDATE",
            "POST_USER_DELETE",
            "POST_RECORD_CREATE",
            "POST_RECORD_UPDATE",
            "POST_RECORD_DELETE",
        ]
        .map(Arc::from)
    });
    let base = match kind {
        SourceKind::User => 0,
        SourceKind::Record => 3,
        SourceKind::Session => return None,
    };
    let offset = match op {
        Op::Insert => 0,
        Op::Update => 1,
        Op::Delete => 2,
    };
    NAMES.get(base + offset)
}

/// Build the event for `change` of `source`.
pub fn row_event(
    change: RowChange,
    source: &Source,
    event_type: &Arc<str>,
    database: &Arc<str>,
) -> Event {
    let data = event_data(&change, source);
    let old_id = old_id(&change, source);
    let rel = &change.relation;
    Event {
        id: EventId {
            commit_lsn: change.commit.lsn,
            position: change.position,
            sub: 0,
        },
        event_type: event_type.clone(),
        data,
        occurred_at: change.commit.time,
        source: EventSource {
            database: database.clone(),
            schema: Some(rel.schema.clone()),
            table: Some(rel.name.clone()),
            lsn: change.commit.lsn,
            xid: change.commit.xid,
        },
        old_id,
    }
}

fn id_key(kind: SourceKind) -> &'static str {
    match kind {
        SourceKind::User => "user_id",
        _ => "record_id",
    }
}

/// Whether a column's name is one of the keys pgfire adds to `event_data`: such a column is
/// written under `columns` instead, so pgfire's keys keep their meaning.
fn reserved(kind: SourceKind, col: &Column) -> bool {
    match col.pgfire_key {
        PgfireKey::None => false,
        PgfireKey::All => true,
        PgfireKey::User => kind == SourceKind::User,
        PgfireKey::Record => kind != SourceKind::User,
    }
}

/// The id before an update that changed it (JSON text), if the WAL holds it.
fn old_id(change: &RowChange, source: &Source) -> Option<Box<str>> {
    if change.op != Op::Update {
        return None;
    }
    let rel = &change.relation;
    let i = rel
        .columns
        .iter()
        .position(|col| Some(&*col.name) == source.id_column.as_deref())?;
    let old = change.row.old()?.cells().nth(i)?;
    let Cell::Value(before) = old else {
        return None;
    };
    let cells: Vec<Cell> = change.row.new_row()?.cells().collect();
    let after = cell_json(&cells, None, i)?;
    (!same_value(rel.columns[i].class, before, after))
        .then(|| String::from_utf8_lossy(before).into())
}

/// `event_data` of a row change, written as JSON straight from the rendered cells: `user_id` or
/// `record_id` and `table`, the row's columns (a column named like one of pgfire's keys goes
/// under `columns`), then `unchanged_toast`, `changes`, `old` and `old_missing` where they apply.
/// Only what the WAL holds is reported: a value it does not hold is never made up, its column is
/// named in `unchanged_toast` (new row) or `old_missing` (old row).
pub fn event_data(change: &RowChange, source: &Source) -> EventData {
    let rel = &change.relation;
    let id_key = id_key(source.kind);
    let old: Option<Vec<Cell>> = change.row.old().map(|t| t.cells().collect());
    let (cells, fallback): (Vec<Cell>, Option<&[Cell]>) = match change.row.new_row() {
        Some(new) => (new.cells().collect(), old.as_deref()),
        None => (old.clone().unwrap_or_default(), None),
    };
    let value = |i: usize| cell_json(&cells, fallback, i);
    let id_index = source
        .id_column
        .as_deref()
        .and_then(|c| rel.columns.iter().position(|col| &*col.name == c));

    let mut out = Vec::with_capacity(256);
    out.push(b'{');
    json_string(id_key, &mut out);
    out.push(b':');
    out.extend_from_slice(id_index.and_then(value).unwrap_or(b"null"));
    if source.kind != SourceKind::User {
        out.extend_from_slice(b",\"table\":");
        json_string(&rel.name, &mut out);
    }
    let columns = rel.columns.len().min(cells.len());
    let mut missing = Vec::new();
    let mut colliding = Vec::new();
    for (i, col) in rel.columns[..columns].iter().enumerate() {
        match value(i) {
            Some(_) if reserved(source.kind, col) => colliding.push(i),
            Some(v) => {
                out.push(b',');
                out.extend_from_slice(&col.json_name);
                out.push(b':');
                out.extend_from_slice(v);
            }
            None => missing.push(i),
        }
    }
    if !colliding.is_empty() {
        out.extend_from_slice(b",\"columns\":{");
        for (n, &i) in colliding.iter().enumerate() {
            if n > 0 {
                out.push(b',');
            }
            out.extend_from_slice(&rel.columns[i].json_name);
            out.push(b':');
            out.extend_from_slice(value(i).unwrap_or(b"null"));
        }
        out.push(b'}');
    }
    let names = |out: &mut Vec<u8>, key: &[u8], list: &mut dyn Iterator<Item = usize>| {
        let mut first = true;
        for i in list {
            if first {
                out.extend_from_slice(key);
                first = false;
            } else {
                out.push(b',');
            }
            out.extend_from_slice(&rel.columns[i].json_name);
        }
        if !first {
            out.push(b']');
        }
    };
    if change.op != Op::Delete {
        names(
            &mut out,
            b",\"unchanged_toast\":[",
            &mut missing.iter().copied(),
        );
    }
    if let (Op::Update, Some(old)) = (change.op, old.as_deref()) {
        out.extend_from_slice(b",\"changes\":{");
        let mut first = true;
        for (i, col) in rel.columns[..columns].iter().enumerate() {
            let Some(new_v) = value(i) else { continue };
            let old_v: &[u8] = match old.get(i) {
                Some(&Cell::Value(v)) => v,
                Some(Cell::Null) => b"null",
                // Not in the WAL: whether it changed is unknown.
                _ => continue,
            };
            if same_value(col.class, old_v, new_v) {
                continue;
            }
            if !first {
                out.push(b',');
            }
            first = false;
            out.extend_from_slice(&col.json_name);
            out.extend_from_slice(b":{\"old\":");
            out.extend_from_slice(old_v);
            out.extend_from_slice(b",\"new\":");
            out.extend_from_slice(new_v);
            out.push(b'}');
        }
        out.push(b'}');
    }
    if let (Op::Update | Op::Delete, Some(old)) = (change.op, old.as_deref()) {
        out.extend_from_slice(b",\"old\":{");
        let mut first = true;
        for (col, cell) in rel.columns.iter().zip(old) {
            let v: &[u8] = match *cell {
                Cell::Value(v) => v,
                Cell::Null => b"null",
                Cell::Unchanged => continue,
            };
            if !first {
                out.push(b',');
            }
            first = false;
            out.extend_from_slice(&col.json_name);
            out.push(b':');
            out.extend_from_slice(v);
        }
        out.push(b'}');
    }
    if change.op != Op::Insert {
        names(
            &mut out,
            b",\"old_missing\":[",
            &mut old_missing(change, old.as_deref()),
        );
    }
    out.push(b'}');
    match String::from_utf8(out) {
        Ok(text) => EventData::from_json_unchecked(text),
        // Cells hold JSON text, which is UTF-8; should that ever fail, build the map instead.
        Err(_) => EventData::from_object(&object(change, source)),
    }
}

/// The columns of an update's or delete's old row that the WAL does not hold: those outside the
/// replica identity's key, or every column when an update carries no old row at all (the
/// table's replica identity is not FULL).
fn old_missing<'a>(
    change: &'a RowChange,
    old: Option<&'a [Cell<'a>]>,
) -> Box<dyn Iterator<Item = usize> + 'a> {
    match old {
        Some(old) => Box::new(
            old.iter()
                .enumerate()
                .filter(|(_, c)| **c == Cell::Unchanged)
                .map(|(i, _)| i)
                .filter(|&i| i < change.relation.columns.len()),
        ),
        None => Box::new(0..change.relation.columns.len()),
    }
}

/// Whether a change lacks old values a source with REPLICA IDENTITY FULL would have.
pub fn lacks_old_values(change: &RowChange) -> bool {
    match change.row.old() {
        None => change.op == Op::Update,
        Some(old) => old.cells().any(|c| c == Cell::Unchanged),
    }
}

/// Column `i`'s JSON; an unchanged TOAST cell takes the old row's value, or has none.
fn cell_json<'a>(cells: &[Cell<'a>], fallback: Option<&[Cell<'a>]>, i: usize) -> Option<&'a [u8]> {
    match *cells.get(i)? {
        Cell::Value(v) => Some(v),
        Cell::Null => Some(b"null"),
        Cell::Unchanged => cell_json(fallback?, None, i),
    }
}

/// Whether two rendered values are the same JSON value.
fn same_value(class: TypeClass, a: &[u8], b: &[u8]) -> bool {
    if a == b {
        return true;
    }
    // Equal objects may differ in key order; other values are equal only if written the same.
    may_hold_objects(class)
        && matches!(
            (serde_json::from_slice::<Value>(a), serde_json::from_slice::<Value>(b)),
            (Ok(x), Ok(y)) if x == y
        )
}

/// `event_data` built as a map: the reference for [`event_data`], and what it falls back to.
fn object(change: &RowChange, source: &Source) -> Map<String, Value> {
    let rel = &change.relation;
    let id_index = source
        .id_column
        .as_deref()
        .and_then(|c| rel.columns.iter().position(|col| &*col.name == c));
    let old: Option<Vec<Cell>> = change.row.old().map(|t| t.cells().collect());
    let old_map: Option<Map<String, Value>> = old.as_ref().map(|cells| {
        rel.columns
            .iter()
            .zip(cells)
            .filter_map(|(c, cell)| cell_value(*cell, None).map(|v| (c.name.to_string(), v)))
            .collect()
    });
    let (cells, fallback): (Vec<Cell>, Option<&[Cell]>) = match change.row.new_row() {
        Some(new) => (new.cells().collect(), old.as_deref()),
        None => (old.clone().unwrap_or_default(), None),
    };
    let mut data = Map::with_capacity(cells.len() + 4);
    let id = id_index
        .and_then(|i| cells.get(i))
        .and_then(|cell| cell_value(*cell, fallback.and_then(|o| o.get(id_index?)).copied()))
        .unwrap_or(Value::Null);
    data.insert(id_key(source.kind).to_string(), id);
    if source.kind != SourceKind::User {
        data.insert("table".to_string(), Value::String(rel.name.to_string()));
    }
    let mut changes = (change.op == Op::Update && old_map.is_some()).then(Map::new);
    let mut missing = Vec::new();
    let mut colliding = Map::new();
    for (i, (col, cell)) in rel.columns.iter().zip(&cells).enumerate() {
        let old_cell = fallback.and_then(|o| o.get(i)).copied();
        let Some(v) = cell_value(*cell, old_cell) else {
            missing.push(Value::String(col.name.to_string()));
            continue;
        };
        if let Some(changes) = changes.as_mut() {
            let old_v = old
                .as_deref()
                .and_then(|o| o.get(i))
                .and_then(|o| cell_value(*o, None));
            if let Some(old_v) = old_v.filter(|o| *o != v) {
                let mut c = Map::with_capacity(2);
                c.insert("old".into(), old_v);
                c.insert("new".into(), v.clone());
                changes.insert(col.name.to_string(), Value::Object(c));
            }
        }
        if reserved(source.kind, col) {
            colliding.insert(col.name.to_string(), v);
        } else {
            data.insert(col.name.to_string(), v);
        }
    }
    if !colliding.is_empty() {
        data.insert("columns".to_string(), Value::Object(colliding));
    }
    if !missing.is_empty() && change.op != Op::Delete {
        data.insert("unchanged_toast".to_string(), Value::Array(missing));
    }
    if let Some(changes) = changes {
        data.insert("changes".to_string(), Value::Object(changes));
    }
    if change.op != Op::Insert {
        if let Some(old) = old_map {
            data.insert("old".to_string(), Value::Object(old));
        }
        let gone: Vec<Value> = old_missing(change, old.as_deref())
            .map(|i| Value::String(rel.columns[i].name.to_string()))
            .collect();
        if !gone.is_empty() {
            data.insert("old_missing".to_string(), Value::Array(gone));
        }
    }
    data
}

/// A cell's value; an unchanged TOAST cell takes the old row's value, or has none.
fn cell_value(cell: Cell<'_>, old: Option<Cell<'_>>) -> Option<Value> {
    let parse = |v: &[u8]| serde_json::from_slice(v).unwrap_or(Value::Null);
    match cell {
        Cell::Null => Some(Value::Null),
        Cell::Value(v) => Some(parse(v)),
        Cell::Unchanged => match old {
            Some(Cell::Value(v)) => Some(parse(v)),
            Some(Cell::Null) => Some(Value::Null),
            _ => None,
        },
    }
}

#[cfg(test)]
mod tests;
