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
    /// Allowed, and already released along with the last function's call: its answer.
    Released(super::hold::Reply),
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
    release: &str,
) -> Result<Outcome, Fatal> {
    let statement = hooks.next_statement();
    let database = cfg.catalog.database.to_string();
    let mut runs = Vec::new();
    let mut datas: Vec<Option<Map<String, Value>>> = Vec::with_capacity(rows.len());
    let mut blocked = None;
    // The last call of the whole decision: when it is a sql function, the release goes with it.
    let last_row = rows.iter().rposition(|row| {
        cfg.catalog
            .sources
            .get(&row.oid)
            .and_then(|s| rows::event_type(s.kind, row.op))
            .is_some_and(|t| !cfg.catalog.subscribers(t).is_empty())
    });
    let mut released = None;
    let mut rolled_back = false;
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
            sub: 0,
        };
        let id_text = id.to_string();
        let mut data = rows::event_data(row, source.kind, source.id_column.as_deref());
        let mut rewrite = Map::new();
        for (j, sub) in subs.iter().enumerate() {
            let f = &sub.function;
            let speculate = Some(k) == last_row
                && j + 1 == subs.len()
                && f.kind == FunctionKind::Sql
                && !sub.shadow
                && rewrite.is_empty()
                && datas.iter().all(Option::is_none);
            let envelope = json!({
                "id": id_text,
                "event_type": event_type,
                "event_data": Value::Object(data.clone()),
                "occurred_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                "source": {"database": database, "schema": row.schema, "table": row.table},
            });
            let started = chrono::Utc::now().timestamp_micros();
            let clock = Instant::now();
            let called = call(
                io,
                hooks,
                f,
                &id_text,
                &envelope,
                speculate.then_some(release),
            )
            .await?;
            let result = called.result;
            released = called.released;
            rolled_back |= called.rolled_back;
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
            hooks.metrics.pre_decision(&f.name, status, sub.shadow);
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
    if let Some(done) = released {
        return Ok(Outcome::Released(done));
    }
    // Allowed after the speculative release failed (the statement was rolled back with the
    // savepoint): run it again as it was.
    if datas.iter().all(Option::is_none) && !rolled_back {
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

/// What one call came to.
struct Called {
    result: Result<Answer, FunctionError>,
    /// The release's answer, when it was sent with the call and the call allowed.
    released: Option<super::hold::Reply>,
    /// The savepoint was rolled back (a speculative release did not go through).
    rolled_back: bool,
}

/// Run one function on one event: its answer, or why there is none. With `release`, a `sql`
/// call goes with the release of the savepoint (see `pgfire.pre_call_last`). `Err(Fatal)` only
/// when the session itself is lost.
async fn call(
    io: &mut Io<'_>,
    hooks: &PreHooks,
    f: &FunctionDef,
    id: &str,
    envelope: &Value,
    release: Option<&str>,
) -> Result<Called, Fatal> {
    let plain = |result| Called {
        result,
        released: None,
        rolled_back: false,
    };
    let invalid = |e: answer::AnswerError| FunctionError::Failed(format!("invalid answer: {e}"));
    Ok(plain(match f.kind {
        FunctionKind::Log => {
            tracing::info!(function = %f.name, event_id = id, event_type = %envelope["event_type"], "PRE event");
            Ok(Answer::Allow { data: None })
        }
        // Both send the envelope and parse the answer they get back.
        FunctionKind::Webhook | FunctionKind::Nats => {
            let body = serde_json::to_vec(envelope).unwrap_or_default();
            let answered = match f.kind {
                FunctionKind::Nats => {
                    let event_type = envelope["event_type"].as_str().unwrap_or_default();
                    hooks.nats.pre(f, event_type, id, body).await
                }
                _ => hooks.webhook.pre(f, id, body).await,
            };
            answered.and_then(|bytes| answer::parse(&bytes).map_err(invalid))
        }
        FunctionKind::Sql => {
            let Some(callable) = f.sql_callable.as_deref() else {
                return Ok(plain(Err(FunctionError::Failed(format!(
                    "SQL function {}(jsonb) does not exist",
                    f.target.as_deref().unwrap_or_default()
                )))));
            };
            let ms = f.timeout.as_millis().max(1);
            let sql = format!(
                "SELECT set_config('pgfire.pre_st', current_setting('statement_timeout'), true), set_config('statement_timeout', '{ms}', true); \
                 SELECT pgfire.{}({}, {}::jsonb); \
                 SELECT set_config('statement_timeout', current_setting('pgfire.pre_st'), true)",
                if release.is_some() { "pre_call_last" } else { "pre_call" },
                dollar(callable),
                dollar(&rows::ascii_json(envelope))
            );
            let exchange = async {
                let mut out = super::hold::query_frame(&sql);
                if let Some(r) = release {
                    out.extend_from_slice(&super::hold::query_frame(r));
                }
                io.send(&out).await?;
                let called = io.reply().await?;
                let done = match release {
                    Some(_) => Some(io.reply().await?),
                    None => None,
                };
                Ok::<_, Fatal>((called, done))
            };
            let (mut reply, done) = match tokio::time::timeout(f.timeout + SQL_GRACE, exchange).await {
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
            let mut rolled_back = false;
            let result: Value = match reply.error.take() {
                None => {
                    if done.is_some() {
                        let result = reply
                            .values
                            .get(1)
                            .and_then(|v| v.as_deref())
                            .and_then(|v| serde_json::from_slice(v).ok())
                            .unwrap_or(Value::Null);
                        return Ok(Called {
                            result: sql_result(result, ms, invalid),
                            released: done,
                            rolled_back: false,
                        });
                    }
                    reply
                        .values
                        .get(1)
                        .and_then(|v| v.as_deref())
                        .and_then(|v| serde_json::from_slice(v).ok())
                        .unwrap_or(Value::Null)
                }
                Some((code, message, frame)) => {
                    rolled_back = done.is_some();
                    let decided = (code == "PGF02").then(|| decided_detail(&frame)).flatten();
                    match decided {
                        Some(v) => v,
                        None => {
                            return Ok(Called {
                                result: Err(FunctionError::Failed(format!(
                                    "{message} (SQLSTATE {code})"
                                ))),
                                released: None,
                                rolled_back,
                            })
                        }
                    }
                }
            };
            return Ok(Called {
                result: sql_result(result, ms, invalid),
                released: None,
                rolled_back,
            });
        }
    }))
}

/// The result of `pgfire.pre_call_last` carried in its error's detail.
fn decided_detail(frame: &[u8]) -> Option<Value> {
    use base64::Engine;
    let Ok(Some(crate::wire::Backend::ErrorResponse(n))) = crate::wire::decode_backend(frame)
    else {
        return None;
    };
    let json = base64::engine::general_purpose::STANDARD
        .decode(n.detail)
        .ok()?;
    serde_json::from_slice(&json).ok()
}

/// A `pgfire.pre_call` result: the answer, a timeout, or the function's error.
fn sql_result(
    result: Value,
    ms: u128,
    invalid: impl Fn(answer::AnswerError) -> FunctionError,
) -> Result<Answer, FunctionError> {
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
