//! A held statement that commits by itself in autocommit: a `CALL` of a procedure, or a `DO`
//! block, that runs `COMMIT` or `ROLLBACK`. PostgreSQL allows that only outside a transaction
//! block, so its tentative run in the proxy's own block fails (`2D000`, invalid transaction
//! termination), and PRE functions cannot decide its writes before its own COMMIT makes them
//! durable. Once that first try is rolled back, it runs again as the client sent it, outside
//! any block, with `pgfire.pre_mode` = `commits`: pgfire's trigger then refuses any write to a
//! table with PRE hooks (`0A000`, naming the table). So a procedure that commits and writes other
//! tables works as it does without the proxy, and one that writes a watched table fails at that
//! write as PostgreSQL fails a procedure at any error (what it committed before stays
//! committed, and held no row of a watched table).

use super::hold::{count_frames, query_frame, Io, Reply};
use crate::proxy::session::Fatal;
use crate::wire;

/// SQLSTATE invalid_transaction_termination: COMMIT or ROLLBACK inside a procedure called in a
/// transaction block.
pub(super) const INVALID_TERMINATION: &str = "2D000";

/// Whether the tentative run of a statement in the proxy's own block (`implicit`) failed only
/// because that block forbids the statement's own COMMIT or ROLLBACK.
pub(super) fn commits_by_itself(first: &Reply, implicit: bool) -> bool {
    implicit
        && first
            .error
            .as_ref()
            .is_some_and(|(code, _, _)| code == INVALID_TERMINATION)
}

/// End the failed first try, run the client's `frame` outside a block in `commits` mode (after
/// `closes`, Close messages of the statements it parses), and answer the client as the server
/// answers it. Returns the status the client is told.
pub(super) async fn run(io: &mut Io<'_>, frame: &[u8], closes: &[u8]) -> Result<u8, Fatal> {
    let mut out = query_frame(
        "ROLLBACK; SELECT pgfire.pre_disarm(), set_config('pgfire.pre_mode', 'commits', false), set_config('pgfire.pre_n', '0', false)",
    );
    out.extend_from_slice(closes);
    out.extend_from_slice(frame);
    out.extend_from_slice(&query_frame(
        "SELECT set_config('pgfire.pre_mode', '', false)",
    ));
    io.send(&out).await?;
    let prepared = io.reply().await?;
    let run = io.reply_skipping(count_frames(closes)).await?;
    let reset = io.reply().await?;
    if let Some((_, _, error)) = prepared.error.as_ref().or(reset.error.as_ref()) {
        // The proxy's own statements failed (the session is broken): say so.
        let mut frames = run.frames;
        frames.extend_from_slice(error);
        io.answer(frames, reset.status).await?;
        return Ok(reset.status);
    }
    if !run.rows.is_empty() {
        // Rows reported as if held: code in the statement set pgfire.pre_mode, and what it wrote
        // is committed by its own COMMIT. Detected, not undone: the client gets an error.
        tracing::warn!(
            rows = run.rows.len(),
            "a statement that commits by itself wrote a table with PRE hooks after changing pgfire.pre_mode"
        );
        let mut frames = bytes::BytesMut::new();
        wire::error_response(
            &mut frames,
            "ERROR",
            "42501",
            "pgfire: this statement changed pgfire.pre_mode and wrote a table with PRE hooks, committing it by itself; PRE functions did not decide those rows",
        );
        io.answer(frames, reset.status).await?;
        return Ok(reset.status);
    }
    io.answer(run.frames, reset.status).await?;
    Ok(reset.status)
}
