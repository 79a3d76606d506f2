//! A query string of several statements that mixes transaction control with held writes (or
//! holds a COPY FROM STDIN), run statement by statement, so that nothing commits before the
//! PRE functions decide: each statement is sent as a Query of its own (held ones through
//! [`super::hold`]), the client gets every statement's answer and one ReadyForQuery at the end,
//! and the first error stops the rest, as PostgreSQL answers the whole string.
//!
//! PostgreSQL runs such a string in an implicit transaction block: statements up to a COMMIT
//! (or the end) commit together, an error rolls them back, BEGIN turns the block into an
//! explicit one. The proxy opens a block of its own where the server would have opened the
//! implicit one, and gives the client what PostgreSQL says in one: the warning "there is no
//! transaction in progress" at COMMIT, ROLLBACK or PREPARE TRANSACTION, an error at SAVEPOINT,
//! RELEASE, ROLLBACK TO and AND CHAIN, no warning at BEGIN.

use bytes::{BufMut, BytesMut};

use super::gate::{self, Gate, HoldAs};
use super::hold::{self, query_frame, Io, Reply};
use super::{copy, PreConfig, PreHooks};
use crate::proxy::classify::{self, Control};
use crate::proxy::session::Fatal;
use crate::wire::{self, Backend};

/// SQLSTATE no_active_sql_transaction.
const NO_TRANSACTION: &str = "25P01";
/// SQLSTATE active_sql_transaction (the warning of BEGIN inside a block).
const ACTIVE_TRANSACTION: &[u8] = b"25001";

/// Run the query string `sql` (session status `status`); returns the status the client is told.
pub(in crate::proxy) async fn run(
    io: &mut Io<'_>,
    hooks: &PreHooks,
    cfg: &PreConfig,
    sql: &str,
    status: u8,
) -> Result<u8, Fatal> {
    // Settled: everything before the string is answered.
    let strings = io.lexing.strings(true);
    let statements = classify::classify_lexed(sql, &cfg.watched, strings).statements;
    io.inner = true;
    let result = statements_one_by_one(io, hooks, cfg, sql, &statements, status).await;
    io.inner = false;
    let status = result?;
    let mut z = BytesMut::new();
    hold::ready_frame(&mut z, status);
    io.send_client(z).await?;
    Ok(status)
}

async fn statements_one_by_one(
    io: &mut Io<'_>,
    hooks: &PreHooks,
    cfg: &PreConfig,
    sql: &str,
    statements: &[classify::Statement],
    mut status: u8,
) -> Result<u8, Fatal> {
    // The transaction block is the proxy's, standing for the server's implicit one.
    let mut ours = false;
    for s in statements {
        let Some(text) = sql.get(s.span.clone()) else {
            continue;
        };
        if status == b'I' && s.control != Some(Control::Begin) {
            let opened = io.query("BEGIN").await?;
            if opened.error.is_some() {
                io.send_client(opened.frames).await?;
                return Ok(opened.status);
            }
            status = opened.status;
            ours = true;
        }
        let (next, failed) = match (s.control, ours && status != b'E') {
            (Some(Control::Begin), true) => {
                ours = false;
                plain(io, text, Filter::BeginWarning).await?
            }
            (Some(Control::Commit { chain: false }), true)
            | (Some(Control::Rollback { chain: false }), true)
            | (Some(Control::Prepare), true) => {
                ours = false;
                let mut warning = BytesMut::new();
                wire::error_response(
                    &mut warning,
                    "WARNING",
                    NO_TRANSACTION,
                    "there is no transaction in progress",
                );
                warning[0] = b'N';
                io.send_client(warning).await?;
                plain(io, text, Filter::None).await?
            }
            (Some(c @ (Control::Savepoint | Control::Release | Control::RollbackTo)), true)
            | (Some(c @ (Control::Commit { .. } | Control::Rollback { .. })), true) => {
                let what = match c {
                    Control::Savepoint => "SAVEPOINT",
                    Control::Release => "RELEASE SAVEPOINT",
                    Control::RollbackTo => "ROLLBACK TO SAVEPOINT",
                    Control::Commit { .. } => "COMMIT AND CHAIN",
                    _ => "ROLLBACK AND CHAIN",
                };
                let status = io.query("ROLLBACK").await?.status;
                let mut out = BytesMut::new();
                let message = format!("{what} can only be used in transaction blocks");
                wire::error_response(&mut out, "ERROR", NO_TRANSACTION, &message);
                io.send_client(out).await?;
                return Ok(status);
            }
            _ if status == b'E' => plain(io, text, Filter::None).await?,
            // Each statement as the server will lex it: an earlier one may have changed how.
            _ => match gate::query(cfg, io.lexing.strings(true), text) {
                Gate::Pass => plain(io, text, Filter::None).await?,
                Gate::Hold(how) => {
                    let how = if how == HoldAs::Split {
                        HoldAs::Whole
                    } else {
                        how
                    };
                    let frame = query_frame(text);
                    let after = hold::run_query(io, hooks, cfg, (&frame, &[], how), status).await?;
                    (after, after == b'E')
                }
                Gate::Replace { frame, .. } => {
                    let refused = std::str::from_utf8(&frame[5..frame.len() - 1]).unwrap_or("");
                    plain(io, refused, Filter::Context).await?
                }
            },
        };
        status = next;
        if status == b'I' {
            ours = false;
        }
        if failed {
            if ours {
                status = io.query("ROLLBACK").await?.status;
            }
            return Ok(status);
        }
    }
    if ours && status == b'T' {
        // The implicit block's end: the client sees what the server says at commit (an error
        // of a deferred constraint, notices), not the proxy's CommandComplete.
        let done = io.query("COMMIT").await?;
        io.send_client(without_completions(&done)).await?;
        status = done.status;
    }
    Ok(status)
}

/// The frames of `reply` less its CommandCompletes.
fn without_completions(reply: &Reply) -> BytesMut {
    let mut out = BytesMut::new();
    for (i, &(start, tag)) in reply.starts.iter().enumerate() {
        let end = reply.starts.get(i + 1).map_or(reply.frames.len(), |s| s.0);
        if tag != b'C' {
            out.put_slice(&reply.frames[start..end]);
        }
    }
    out
}

/// What [`plain`] leaves out of the server's answer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Filter {
    None,
    /// The warning "there is already a transaction in progress" (the block is the proxy's).
    BeginWarning,
    /// The context of errors (raised by pgfire's own function for a refusal).
    Context,
}

/// Send one statement that is not held and pass its answer to the client as it comes (less
/// its ReadyForQuery); a COPY FROM STDIN (of a table without PRE hooks) gets its data relayed.
/// Returns the status and whether it failed.
async fn plain(io: &mut Io<'_>, sql: &str, filter: Filter) -> Result<(u8, bool), Fatal> {
    io.send(&query_frame(sql)).await?;
    let mut failed = false;
    let mut out = BytesMut::new();
    loop {
        let f = io.frame().await?;
        match f[0] {
            b'Z' => {
                io.send_client(out).await?;
                return Ok((*f.get(5).unwrap_or(&b'I'), failed));
            }
            b'G' => {
                out.put_slice(&f);
                io.send_client(out).await?;
                let mut rest = Reply::default();
                copy::relay_data(io, &mut rest, false, &mut copy::Replay::default()).await?;
                failed |= rest.error.is_some();
                io.send_client(rest.frames).await?;
                return Ok((rest.status, failed));
            }
            b'E' => {
                failed = true;
                if filter == Filter::Context {
                    out.put_slice(&hold::without_context(&f));
                } else {
                    out.put_slice(&f);
                }
            }
            b'N' if filter == Filter::BeginWarning => {
                let skip = matches!(wire::decode_backend(&f)?,
                    Some(Backend::NoticeResponse(n)) if n.code == ACTIVE_TRANSACTION);
                if !skip {
                    out.put_slice(&f);
                }
            }
            _ => out.put_slice(&f),
        }
        if out.len() >= FLUSH_AT {
            io.send_client(std::mem::take(&mut out)).await?;
        }
    }
}

/// Bytes of answers gathered before they are written to the client.
const FLUSH_AT: usize = 32 * 1024;
