//! The rows pgfire's PRE trigger reports (a NoticeResponse, SQLSTATE `PGF01`, whose detail is the
//! base64 of a JSON object), and the PRE events made from them: the same `event_data` as POST
//! events (DESIGN section 2). Pure; reports are untrusted input and never panic.

use base64::Engine;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::catalog::SourceKind;

/// SQLSTATE of the trigger's row reports.
pub const ROW_CODE: &[u8] = b"PGF01";
/// Their message.
pub const ROW_MESSAGE: &[u8] = b"pgfire:pre";

/// The statement the row came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Insert,
    Update,
    Delete,
}

/// One row as the trigger saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct RowReport {
    /// `r` in the tentative run, `a` when the decisions were applied.
    pub mode: char,
    pub op: Op,
    pub oid: u32,
    pub schema: String,
    pub table: String,
    pub new: Option<Map<String, Value>>,
    pub old: Option<Map<String, Value>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RowError {
    #[error("row report is not base64")]
    Base64,
    #[error("row report is not the expected JSON: {0}")]
    Json(String),
    #[error("row report has an unknown operation {0:?}")]
    Op(String),
}

#[derive(Deserialize)]
struct Raw {
    mode: String,
    op: String,
    oid: u32,
    schema: String,
    table: String,
    new: Option<Map<String, Value>>,
    old: Option<Map<String, Value>>,
}

/// SQLSTATE of the reports of PRE runs decided in the database (`pgfire.pre_decide`).
pub const RUN_CODE: &[u8] = b"PGF03";
/// Their message.
pub const RUN_MESSAGE: &[u8] = b"pgfire:run";

/// The runs of one row's chain, decided in the database.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RunReport {
    /// The statement's number (the "LSN" part of the event id) and the row's position in it.
    pub stmt: u64,
    pub pos: u32,
    pub event_type: String,
    pub runs: Vec<Run>,
}

/// One function's run on the row.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Run {
    #[serde(rename = "fn")]
    pub function: String,
    pub kind: String,
    /// `ok`, `modified`, `blocked`, `error` or `timeout`.
    pub status: String,
    pub error: Option<String>,
    pub shadow: bool,
    /// Start, microseconds since the Unix epoch, and duration.
    pub at: i64,
    pub us: i64,
}

/// Decode run reports (the base64 of a JSON array of them).
pub fn decode_runs(detail: &[u8]) -> Result<Vec<RunReport>, RowError> {
    let json = unbase64(detail)?;
    serde_json::from_slice(&json).map_err(|e| RowError::Json(e.to_string()))
}

fn unbase64(detail: &[u8]) -> Result<Vec<u8>, RowError> {
    let clean: Vec<u8> = detail
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(clean)
        .map_err(|_| RowError::Base64)
}

/// Decode the detail field of a row report.
pub fn decode(detail: &[u8]) -> Result<RowReport, RowError> {
    let json = unbase64(detail)?;
    let raw: Raw = serde_json::from_slice(&json).map_err(|e| RowError::Json(e.to_string()))?;
    let op = match raw.op.as_str() {
        "INSERT" => Op::Insert,
        "UPDATE" => Op::Update,
        "DELETE" => Op::Delete,
        other => return Err(RowError::Op(other.into())),
    };
    Ok(RowReport {
        mode: raw.mode.chars().next().unwrap_or('?'),
        op,
        oid: raw.oid,
        schema: raw.schema,
        table: raw.table,
        new: raw.new,
        old: raw.old,
    })
}

/// The PRE event type of a row of a source of `kind`.
pub fn event_type(kind: SourceKind, op: Op) -> Option<&'static str> {
    Some(match (kind, op) {
        (SourceKind::User, Op::Insert) => "PRE_USER_CREATE",
        (SourceKind::User, Op::Update) => "PRE_USER_UPDATE",
        (SourceKind::User, Op::Delete) => "PRE_USER_DELETE",
        (SourceKind::Record, Op::Insert) => "PRE_RECORD_CREATE",
        (SourceKind::Record, Op::Update) => "PRE_RECORD_UPDATE",
        (SourceKind::Record, Op::Delete) => "PRE_RECORD_DELETE",
        (SourceKind::Session, _) => return None,
    })
}

/// Keys pgfire adds to `event_data`; a column of that name goes under `columns`.
fn reserved(kind: SourceKind, name: &str) -> bool {
    matches!(name, "changes" | "old" | "columns")
        || match kind {
            SourceKind::User => name == "user_id",
            _ => name == "record_id" || name == "table",
        }
}

/// `event_data` of a row: `user_id` or `record_id` and `table`, the row's columns (the new row,
/// or the deleted one), `changes` and `old` on updates, `old` on deletes.
pub fn event_data(
    row: &RowReport,
    kind: SourceKind,
    id_column: Option<&str>,
) -> Map<String, Value> {
    let cols = row.new.as_ref().or(row.old.as_ref());
    let mut data = Map::new();
    let id = id_column
        .and_then(|c| cols.and_then(|m| m.get(c)))
        .cloned()
        .unwrap_or(Value::Null);
    match kind {
        SourceKind::User => {
            data.insert("user_id".into(), id);
        }
        _ => {
            data.insert("record_id".into(), id);
            data.insert("table".into(), Value::String(row.table.clone()));
        }
    }
    let mut colliding = Map::new();
    for (k, v) in cols.into_iter().flatten() {
        if reserved(kind, k) {
            colliding.insert(k.clone(), v.clone());
        } else {
            data.insert(k.clone(), v.clone());
        }
    }
    if !colliding.is_empty() {
        data.insert("columns".into(), Value::Object(colliding));
    }
    if row.op == Op::Update {
        if let (Some(new), Some(old)) = (&row.new, &row.old) {
            data.insert("changes".into(), Value::Object(changes(old, new)));
        }
    }
    if row.op != Op::Insert {
        if let Some(old) = &row.old {
            data.insert("old".into(), Value::Object(old.clone()));
        }
    }
    data
}

/// `{column: {old, new}}` for every column whose value differs.
pub fn changes(old: &Map<String, Value>, new: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for (k, v) in new {
        let before = old.get(k).cloned().unwrap_or(Value::Null);
        if &before != v {
            let mut c = Map::new();
            c.insert("old".into(), before);
            c.insert("new".into(), v.clone());
            out.insert(k.clone(), Value::Object(c));
        }
    }
    out
}

/// `data` from a handler laid over `event_data`: the columns it names take its values (a
/// reserved name is a column under `columns`); `changes` follows on updates.
pub fn overlay_event(event: &mut Map<String, Value>, data: &Map<String, Value>, kind: SourceKind) {
    for (k, v) in data {
        if reserved(kind, k) {
            if let Some(Value::Object(cols)) = event.get_mut("columns") {
                cols.insert(k.clone(), v.clone());
            }
        } else {
            event.insert(k.clone(), v.clone());
        }
    }
    if let (Some(Value::Object(old)), true) =
        (event.get("old").cloned(), event.contains_key("changes"))
    {
        let mut new = Map::new();
        for k in old.keys() {
            if let Some(v) = event.get(k) {
                new.insert(k.clone(), v.clone());
            }
        }
        event.insert("changes".into(), Value::Object(changes(&old, &new)));
    }
}

/// JSON text with every non-ASCII character escaped (`\uXXXX`), so it reads the same in any
/// ASCII-compatible `client_encoding`.
pub fn ascii_json(value: &impl serde::Serialize) -> String {
    let text = serde_json::to_string(value).unwrap_or_else(|_| "null".into());
    if text.is_ascii() {
        return text;
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{u:04x}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn report(op: &str, new: Value, old: Value) -> Vec<u8> {
        let v = json!({"mode": "r", "op": op, "oid": 16384, "schema": "public", "table": "users",
                       "new": new, "old": old});
        base64::engine::general_purpose::STANDARD
            .encode(v.to_string())
            .into_bytes()
    }

    #[test]
    fn an_update_has_changes_and_old() {
        let r = decode(&report(
            "UPDATE",
            json!({"id": 1, "email": "new@x.y", "n": 12345678901234567890u64}),
            json!({"id": 1, "email": "old@x.y", "n": 12345678901234567890u64}),
        ))
        .unwrap();
        assert_eq!(r.op, Op::Update);
        let d = event_data(&r, SourceKind::User, Some("id"));
        assert_eq!(d["user_id"], 1);
        assert_eq!(d["email"], "new@x.y");
        assert_eq!(
            Value::Object(d["changes"].as_object().unwrap().clone()),
            json!({"email": {"old": "old@x.y", "new": "new@x.y"}})
        );
        assert_eq!(d["old"]["email"], "old@x.y");
        assert_eq!(d["n"].to_string(), "12345678901234567890");
    }

    #[test]
    fn a_record_names_its_table_and_colliding_columns_move() {
        let r = decode(&report(
            "INSERT",
            json!({"id": 7, "table": "x"}),
            Value::Null,
        ))
        .unwrap();
        let d = event_data(&r, SourceKind::Record, Some("id"));
        assert_eq!(d["record_id"], 7);
        assert_eq!(d["table"], "users");
        assert_eq!(d["columns"]["table"], "x");
        assert!(d.get("old").is_none());
    }

    #[test]
    fn a_delete_carries_the_row() {
        let r = decode(&report("DELETE", Value::Null, json!({"id": 3}))).unwrap();
        let d = event_data(&r, SourceKind::User, Some("id"));
        assert_eq!(d["user_id"], 3);
        assert_eq!(d["id"], 3);
        assert_eq!(d["old"]["id"], 3);
    }

    #[test]
    fn run_reports_decode() {
        let v = json!([{"stmt": 7, "pos": 2, "event_type": "PRE_USER_CREATE", "runs": [
            {"fn": "check", "kind": "sql", "status": "blocked", "error": "no", "shadow": false, "at": 1, "us": 5}]}]);
        let detail = base64::engine::general_purpose::STANDARD.encode(v.to_string());
        let r = decode_runs(detail.as_bytes()).unwrap();
        assert_eq!(
            (r[0].stmt, r[0].pos, r[0].runs[0].status.as_str()),
            (7, 2, "blocked")
        );
        assert_eq!(r[0].runs[0].error.as_deref(), Some("no"));
        assert_eq!(decode_runs(b"!!"), Err(RowError::Base64));
        assert!(decode_runs(b"e30=").is_err());
    }

    #[test]
    fn bad_reports_are_errors() {
        assert_eq!(decode(b"!!!"), Err(RowError::Base64));
        assert!(matches!(decode(b"e30="), Err(RowError::Json(_))));
        assert!(matches!(
            decode(&report("TRUNCATE", Value::Null, Value::Null)),
            Err(RowError::Op(_))
        ));
    }

    #[test]
    fn ascii_json_escapes_everything_else() {
        assert_eq!(ascii_json(&json!("é😀")), r#""\u00e9\ud83d\ude00""#);
        let back: Value = serde_json::from_str(&ascii_json(&json!({"k": "é😀"}))).unwrap();
        assert_eq!(back["k"], "é😀");
    }

    #[test]
    fn overlay_updates_changes() {
        let r = decode(&report(
            "UPDATE",
            json!({"id": 1, "email": "b"}),
            json!({"id": 1, "email": "a"}),
        ))
        .unwrap();
        let mut d = event_data(&r, SourceKind::User, Some("id"));
        let data: Map<String, Value> = serde_json::from_value(json!({"email": "c"})).unwrap();
        overlay_event(&mut d, &data, SourceKind::User);
        assert_eq!(d["email"], "c");
        assert_eq!(d["changes"]["email"]["new"], "c");
    }
}
