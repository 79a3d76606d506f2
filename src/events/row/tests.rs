//! Unit tests of the row events: payloads of each operation, what the WAL lacks, colliding
//! column names, and the written JSON against the map it stands for.
use super::*;
use crate::events::{Commit, Lsn};
use crate::replication::decode::{Column, EncodedRow, Relation};
use serde_json::json;

fn rel_with(cols: &[(&str, u32)]) -> Arc<Relation> {
    Arc::new(Relation {
        oid: 42,
        schema: Arc::from("public"),
        name: Arc::from("users"),
        columns: cols
            .iter()
            .map(|&(n, t)| Column::new(Arc::from(n), t))
            .collect(),
    })
}

fn rel() -> Arc<Relation> {
    rel_with(&[("id", 20), ("email", 25), ("bio", 25)])
}

fn change_of(rel: Arc<Relation>, op: Op, old: Option<&[Cell]>, new: Option<&[Cell]>) -> RowChange {
    RowChange {
        op,
        relation: rel,
        row: EncodedRow::from_cells(old, new),
        commit: Arc::new(Commit {
            lsn: Lsn(0x16B3748),
            end_lsn: Lsn(0),
            time: Default::default(),
            xid: 751,
        }),
        position: 2,
    }
}

fn change(op: Op, old: Option<&[Cell]>, new: Option<&[Cell]>) -> RowChange {
    change_of(rel(), op, old, new)
}

fn v(json: &'static str) -> Cell<'static> {
    Cell::Value(json.as_bytes())
}

fn user() -> Source {
    Source {
        oid: 42,
        kind: SourceKind::User,
        id_column: Some("id".into()),
        ..Source::default()
    }
}

fn record() -> Source {
    Source {
        oid: 42,
        kind: SourceKind::Record,
        id_column: Some("id".into()),
        ..Source::default()
    }
}

#[test]
fn update_has_changes_and_old_row() {
    let old = [v("42"), v(r#""x@b.c""#), v(r#""long""#)];
    let new = [v("42"), v(r#""a@b.c""#), Cell::Unchanged];
    let e = row_event(
        change(Op::Update, Some(&old), Some(&new)),
        &user(),
        &Arc::from("POST_USER_UPDATE"),
        &Arc::from("app"),
    );
    assert_eq!(e.id.to_string(), "00000000016B3748-0000000002");
    assert_eq!(
        e.data.json(),
        r#"{"user_id":42,"id":42,"email":"a@b.c","bio":"long","changes":{"email":{"old":"x@b.c","new":"a@b.c"}},"old":{"id":42,"email":"x@b.c","bio":"long"}}"#
    );
}

#[test]
fn record_insert_names_the_table() {
    let e = row_event(
        change(Op::Insert, None, Some(&[v("7"), Cell::Null, v(r#""b""#)])),
        &record(),
        &Arc::from("POST_RECORD_CREATE"),
        &Arc::from("app"),
    );
    assert_eq!(
        e.data.to_value(),
        json!({"record_id": 7, "table": "users", "id": 7, "email": null, "bio": "b"})
    );
}

#[test]
fn delete_carries_the_old_row() {
    let old = [v("5"), v(r#""d@b.c""#), Cell::Null];
    let e = row_event(
        change(Op::Delete, Some(&old), None),
        &user(),
        &Arc::from("POST_USER_DELETE"),
        &Arc::from("app"),
    );
    let data = e.data.to_value();
    assert_eq!(data["user_id"], json!(5));
    assert_eq!(data["email"], json!("d@b.c"));
    assert_eq!(data["old"]["email"], json!("d@b.c"));
}

#[test]
fn unchanged_toast_without_old_row_is_named() {
    let new = [v("1"), v(r#""e""#), Cell::Unchanged];
    let e = row_event(
        change(Op::Update, None, Some(&new)),
        &user(),
        &Arc::from("POST_USER_UPDATE"),
        &Arc::from("app"),
    );
    let data = e.data.to_value();
    assert_eq!(data["unchanged_toast"], json!(["bio"]));
    assert!(data.get("bio").is_none());
}

/// REPLICA IDENTITY DEFAULT: an update that changes the key carries only the old key, a
/// delete only the key. Nothing else is made up: what is missing is named.
#[test]
fn old_values_outside_the_key_are_named_never_invented() {
    let old = [v("1"), Cell::Unchanged, Cell::Unchanged];
    let new = [v("2"), v(r#""a@b.c""#), v(r#""bio""#)];
    let e = event_data(&change(Op::Update, Some(&old), Some(&new)), &user());
    assert_eq!(
        e.to_value(),
        json!({"user_id": 2, "id": 2, "email": "a@b.c", "bio": "bio",
               "changes": {"id": {"old": 1, "new": 2}},
               "old": {"id": 1}, "old_missing": ["email", "bio"]})
    );
    let e = event_data(&change(Op::Delete, Some(&old), None), &user());
    assert_eq!(
        e.to_value(),
        json!({"user_id": 1, "id": 1, "old": {"id": 1}, "old_missing": ["email", "bio"]})
    );
    // An update without any old row: nothing is known of it.
    let e = event_data(&change(Op::Update, None, Some(&new)), &user());
    assert_eq!(e.to_value()["old_missing"], json!(["id", "email", "bio"]));
    assert!(e.to_value().get("changes").is_none());
}

/// Columns named like pgfire's keys do not replace them: they are under `columns`.
#[test]
fn colliding_columns_go_under_columns() {
    let rel = rel_with(&[("id", 20), ("user_id", 20), ("table", 25), ("changes", 25)]);
    let new = [v("1"), v("99"), v(r#""t""#), v(r#""c""#)];
    let c = change_of(rel, Op::Insert, None, Some(&new));
    assert_eq!(
        event_data(&c, &user()).to_value(),
        json!({"user_id": 1, "id": 1, "table": "t",
               "columns": {"user_id": 99, "changes": "c"}})
    );
    assert_eq!(
        event_data(&c, &record()).to_value(),
        json!({"record_id": 1, "table": "users", "id": 1, "user_id": 99,
               "columns": {"table": "t", "changes": "c"}})
    );
}

/// The JSON written from the cells is exactly the map built from them, serialized.
#[test]
fn written_json_is_the_map() {
    let json_rel = rel_with(&[("id", 20), ("doc", 114), ("tags", 1009), ("n", 1700)]);
    let named = |n: &str| rel_with(&[("id", 20), (n, 25)]);
    type Case = (
        Arc<Relation>,
        Op,
        Option<Vec<Cell<'static>>>,
        Option<Vec<Cell<'static>>>,
    );
    let cases: Vec<Case> = vec![
        (
            rel(),
            Op::Insert,
            None,
            Some(vec![v("1"), v(r#""a\"b""#), Cell::Null]),
        ),
        (
            rel(),
            Op::Update,
            Some(vec![v("1"), Cell::Null, Cell::Unchanged]),
            Some(vec![v("2"), v(r#""x""#), Cell::Unchanged]),
        ),
        (
            rel(),
            Op::Update,
            Some(vec![v("1"), v(r#""x""#), v(r#""y""#)]),
            Some(vec![v("1"), v(r#""x""#), v(r#""y""#)]),
        ),
        (
            rel(),
            Op::Update,
            None,
            Some(vec![Cell::Unchanged, v(r#""x""#), Cell::Unchanged]),
        ),
        (
            rel(),
            Op::Delete,
            Some(vec![v("3"), Cell::Unchanged, Cell::Null]),
            None,
        ),
        (rel(), Op::Delete, None, None),
        (
            rel(),
            Op::Update,
            Some(vec![v("1"), Cell::Unchanged, Cell::Unchanged]),
            Some(vec![v("2"), v(r#""x""#), Cell::Unchanged]),
        ),
        (
            rel(),
            Op::Delete,
            Some(vec![v("1"), Cell::Unchanged, Cell::Unchanged]),
            None,
        ),
        (rel(), Op::Insert, None, Some(vec![v("1")])),
        // Objects equal up to key order are not a change; numbers keep their text.
        (
            json_rel.clone(),
            Op::Update,
            Some(vec![
                v("1"),
                v(r#"{"a":1,"b":2}"#),
                v(r#"["a"]"#),
                v("1.50"),
            ]),
            Some(vec![
                v("1"),
                v(r#"{"b":2,"a":1}"#),
                v(r#"["a","b"]"#),
                v("1.5"),
            ]),
        ),
        // Column names that collide with the keys pgfire adds.
        (
            named("table"),
            Op::Insert,
            None,
            Some(vec![v("1"), v(r#""t""#)]),
        ),
        (
            named("old"),
            Op::Update,
            Some(vec![v("1"), v(r#""o""#)]),
            Some(vec![v("1"), v(r#""n""#)]),
        ),
        (
            named("record_id"),
            Op::Insert,
            None,
            Some(vec![v("1"), v("9")]),
        ),
        (
            named("user_id"),
            Op::Insert,
            None,
            Some(vec![v("1"), v("9")]),
        ),
        (
            named("changes"),
            Op::Update,
            Some(vec![v("1"), v(r#""o""#)]),
            Some(vec![v("2"), v(r#""n""#)]),
        ),
        (
            named("unchanged_toast"),
            Op::Update,
            None,
            Some(vec![v("1"), Cell::Unchanged]),
        ),
        (
            named("na\"me\n"),
            Op::Insert,
            None,
            Some(vec![v("1"), v("2")]),
        ),
    ];
    for (i, (rel, op, old, new)) in cases.into_iter().enumerate() {
        let c = change_of(rel, op, old.as_deref(), new.as_deref());
        for src in [user(), record()] {
            let written = event_data(&c, &src);
            let built = EventData::from_object(&object(&c, &src));
            assert_eq!(written, built, "case {i} {:?}", src.kind);
        }
    }
}
