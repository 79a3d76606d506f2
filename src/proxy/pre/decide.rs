//! The decision on the rows of one held statement: one PRE event per row, its functions in
//! priority order, each seeing the data as the ones before it left it; the first block stops
//! everything. `sql` functions run on the writer's own session, in its transaction
//! (`pgfire.pre_call`, bounded by `statement_timeout`); `webhook` functions get the signed
//! envelope; `log` allows. Every run is recorded.

use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use super::answer::{self, Answer};
use super::hold::{dollar, Io};
use super::rows::{self, Op, RowReport};
use super::{PreConfig, PreHooks};
use crate::catalog::{FunctionDef, FunctionKind};
use crate::events::{EventId, Lsn};
use crate::executions::{Execution, Status};
use crate::functions::FunctionError;
use crate::proxy::session::Fatal;

/// What the statement's rows come to.
pub(super) enum Outcome {
    Allow,
    /// `row`: the index of the row that was refused.
    Block {
        message: String,
        detail: String,
        row: usize,
    },
    /// One overlay per row, in the order the trigger reported them (null: as is).
    Modify {
        overlays: Vec<Value>,
    },
}

/// Margin past a `sql` function's timeout before the proxy gives the session up.
const SQL_GRACE: Duration = Duration::from_secs(5);

pub(super) async fn run(
    io: &mut Io<'_>,
    hooks: &PreHooks,
    cfg: &PreConfig,
    rows: &[RowReport],
) -> Result<Outcome, Fatal> {
    let statement = hooks.next_statement();
    let database = cfg.catalog.database.to_string();
    let mut runs = Vec::new();
    let mut datas: Vec<Option<Map<String, Value>>> = Vec::with_capacity(rows.len());
    let mut blocked = None;
    'rows: for (k, row) in rows.iter().enumerate() {
        datas.push(None);
        let Some(source) = cfg.catalog.sources.get(&row.oid) else {
            continue;
        };
        let Some(event_type) = rows::event_type(source.kind, row.op) else {
            continue;
        };
        let subs = cfg.catalog.subscribers(event_type);
        if subs.is_empty() {
            continue;
        }
        let id = EventId {
            commit_lsn: Lsn(statement),
            position: k as u32,
        };
        let id_text = id.to_string();
        let mut data = rows::event_data(row, source.kind, source.id_column.as_deref());
        let mut rewrite = Map::new();
        for sub in subs {
            let f = &sub.function;
            let envelope = json!({
                "id": id_text,
                "event_type": event_type,
                "event_data": Value::Object(data.clone()),
                "occurred_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                "source": {"database": database, "schema": row.schema, "table": row.table},
            });
            let started = chrono::Utc::now().timestamp_micros();
            let clock = Instant::now();
            let result = call(io, hooks, f, &id_text, &envelope).await?;
            let (status, error, effect) = match result {
                Ok(Answer::Allow { data: None }) => (Status::Ok, None, None),
                Ok(Answer::Allow { data: Some(d) }) => (Status::Modified, None, Some(Ok(d))),
                Ok(Answer::Block { message }) => {
                    (Status::Blocked, Some(message.clone()), Some(Err(message)))
                }
                Err(e) => {
                    let status = e.status();
                    let text = e.to_string();
                    let effect = f
                        .blocks_on_error
                        .then(|| Err(format!("PRE function {} failed: {text}", f.name)));
                    (status, Some(text), effect)
                }
            };
            let error = match (sub.shadow, &error) {
                (true, _) if status != Status::Ok => Some(format!(
                    "shadow mode (not applied): {}",
                    error.as_deref().unwrap_or(status.as_str())
                )),
                _ => error,
            };
            runs.push(Execution {
                event_id: id,
                event_type: event_type.into(),
                function_name: f.name.clone(),
                error: error.map(String::into_boxed_str),
                started_at_us: started,
                duration_us: clock.elapsed().as_micros() as u64,
                attempt: 1,
                status,
            });
            if sub.shadow {
                continue;
            }
            match effect {
                None => {}
                Some(Ok(d)) => {
                    rows::overlay_event(&mut data, &d, source.kind);
                    rewrite.extend(d);
                }
                Some(Err(message)) => {
                    blocked = Some((
                        k,
                        message,
                        format!(
                            "event {event_type} (id {id_text}) on {}.{}, function {}",
                            row.schema, row.table, f.name
                        ),
                    ));
                    break 'rows;
                }
            }
        }
        if !rewrite.is_empty() {
            datas[k] = Some(rewrite);
        }
    }
    hooks.record(runs).await;
    if let Some((row, message, detail)) = blocked {
        return Ok(Outcome::Block {
            message,
            detail,
            row,
        });
    }
    if datas.iter().all(Option::is_none) {
        return Ok(Outcome::Allow);
    }
    // An inserted row is stored as it was reported (sequence values and defaults included) with
    // the rewrite over it; an updated one gets the rewritten columns only.
    let overlays = rows
        .iter()
        .zip(datas)
        .map(|(row, data)| match row.op {
            Op::Insert => {
                let mut full = row.new.clone().unwrap_or_default();
                full.extend(data.unwrap_or_default());
                Value::Object(full)
            }
            Op::Update => data.map_or(Value::Null, Value::Object),
            Op::Delete => Value::Null,
        })
        .collect();
    Ok(Outcome::Modify { overlays })
}

/// Run one function on one event: its answer, or why there is none. `Err(Fatal)` only when the
/// session itself is lost.
async fn call(
    io: &mut Io<'_>,
    hooks: &PreHooks,
    f: &FunctionDef,
    id: &str,
    envelope: &Value,
) -> Result<Result<Answer, FunctionError>, Fatal> {
    let invalid = |e: answer::AnswerError| FunctionError::Failed(format!("invalid answer: {e}"));
    Ok(match f.kind {
        FunctionKind::Log => {
            tracing::info!(function = %f.name, event_id = id, event_type = %envelope["event_type"], "PRE event");
            Ok(Answer::Allow { data: None })
        }
        FunctionKind::Webhook => {
            let body = serde_json::to_vec(envelope).unwrap_or_default();
            match hooks.webhook.pre(f, id, body).await {
                Ok(bytes) => answer::parse(&bytes).map_err(invalid),
                Err(e) => Err(e),
            }
        }
        FunctionKind::Nats => Err(FunctionError::Failed(
            "nats PRE functions are not available in this version of pgfire".into(),
        )),
        FunctionKind::Sql => {
            let Some(callable) = f.sql_callable.as_deref() else {
                return Ok(Err(FunctionError::Failed(format!(
                    "SQL function {}(jsonb) does not exist",
                    f.target.as_deref().unwrap_or_default()
                ))));
            };
            let ms = f.timeout.as_millis().max(1);
            let sql = format!(
                "SELECT set_config('pgfire.pre_st', current_setting('statement_timeout'), true), set_config('statement_timeout', '{ms}', true); \
                 SELECT pgfire.pre_call({}, {}::jsonb); \
                 SELECT set_config('statement_timeout', current_setting('pgfire.pre_st'), true)",
                dollar(callable),
                dollar(&rows::ascii_json(envelope))
            );
            let reply = match tokio::time::timeout(f.timeout + SQL_GRACE, io.query(&sql)).await {
                Ok(r) => r?,
                Err(_) => {
                    return Err(Fatal {
                        code: "57014",
                        message: format!(
                            "pgfire: PRE function {} did not end after its timeout; closing the session",
                            f.name
                        ),
                    })
                }
            };
            if let Some((code, message, _)) = reply.error {
                return Ok(Err(FunctionError::Failed(format!(
                    "{message} (SQLSTATE {code})"
                ))));
            }
            let result: Value = reply
                .values
                .get(1)
                .and_then(|v| v.as_deref())
                .and_then(|v| serde_json::from_slice(v).ok())
                .unwrap_or(Value::Null);
            if result.get("timeout").is_some() {
                Err(FunctionError::Timeout(ms))
            } else if let Some(e) = result.get("error") {
                Err(FunctionError::Failed(format!(
                    "{} (SQLSTATE {})",
                    e.as_str().unwrap_or_default(),
                    result["sqlstate"].as_str().unwrap_or_default()
                )))
            } else {
                match result.get("answer") {
                    Some(a) => answer::from_value(a.clone()).map_err(invalid),
                    None => Err(FunctionError::Failed("no answer".into())),
                }
            }
        }
    })
}
