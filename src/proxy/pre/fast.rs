//! Held statements decided inside their own run, in one round trip: when every PRE function is
//! `sql` or `log`, pgfire's trigger runs each row's chain itself (`pgfire.pre_decide`, migration
//! 010), so the proxy sends the savepoint, the client's statement and the release together.
//! An allowed write is released at once; a blocked one fails with the trigger's P0001 and the
//! session is left as the server left it; a row the database cannot decide (a rewrite, or a
//! function of another kind after a configuration change) fails with SQLSTATE PGF04, and the
//! statement goes back to the long way ([`super::hold`]) as if it had not run.

use bytes::BytesMut;

use super::hold::{self, arm_sql, query_frame, Io};
use super::{commits, PreConfig, PreHooks};
use crate::proxy::session::Fatal;

/// SQLSTATE of a row the database left to the proxy.
const HELD: &str = "PGF04";

/// How the fast run ended.
pub(super) enum Ran {
    /// The client has its answer; the session's transaction status.
    Answered(u8),
    /// Undone: run the statement the long way.
    Held,
}

/// Run `frame` armed in `fast` mode (`closes`: Close messages of the statements it parses, for
/// when it runs again), the session's transaction status being `status` (`I` or `T`).
pub(super) async fn run(
    io: &mut Io<'_>,
    hooks: &PreHooks,
    cfg: &PreConfig,
    (frame, closes): (&[u8], &[u8]),
    status: u8,
) -> Result<Ran, Fatal> {
    let implicit = status == b'I';
    let mode = format!("fast:{}:{}", cfg.rows_limit, hooks.next_statement());
    let mut setup = String::new();
    if implicit {
        setup.push_str("BEGIN; ");
    }
    setup.push_str(&format!(
        "SAVEPOINT pgfire_pre; SELECT {}, set_config('pgfire.pre_n', '0', true), set_config('pgfire.pre_k', '0', true)",
        arm_sql(cfg, &mode)
    ));
    let mut out = query_frame(&setup);
    out.extend_from_slice(frame);
    out.extend_from_slice(&query_frame(&format!(
        "SELECT pgfire.pre_end('{mode}'); RELEASE SAVEPOINT pgfire_pre"
    )));
    // Its own message, so that it ends the proxy's transaction whatever failed before it.
    if implicit {
        out.extend_from_slice(&query_frame("COMMIT"));
    }
    io.send(&out).await?;
    let prepared = io.reply().await?;
    let run = io.reply().await?;
    let end = io.reply().await?;
    let commit = match implicit {
        true => Some(io.reply().await?),
        false => None,
    };
    let last_status = commit.as_ref().map_or(end.status, |c| c.status);

    if commits::commits_by_itself(&run, implicit) {
        io.runs.clear();
        return commits::run(io, frame, closes).await.map(Ran::Answered);
    }
    let code = run.error.as_ref().map(|(c, _, _)| c.clone());
    if code.as_deref() == Some(HELD) && prepared.error.is_none() {
        // Undo the run (in autocommit the COMMIT already has) and forget its decisions.
        io.runs.clear();
        if !implicit {
            let undo = io
                .query("ROLLBACK TO SAVEPOINT pgfire_pre; RELEASE SAVEPOINT pgfire_pre; SELECT pgfire.pre_disarm()")
                .await?;
            if let Some((_, _, e)) = undo.error {
                let mut frames = BytesMut::new();
                frames.extend_from_slice(&e);
                io.answer(frames, undo.status).await?;
                return Ok(Ran::Answered(undo.status));
            }
        }
        return Ok(Ran::Held);
    }
    if prepared.error.is_some() || run.error.is_some() {
        if implicit {
            // The COMMIT has rolled the proxy's transaction back.
            io.answer(run.frames, last_status).await?;
            return Ok(Ran::Answered(last_status));
        }
        return hold::failed(io, run, false).await.map(Ran::Answered);
    }
    if !run.rows.is_empty() {
        tracing::warn!(
            rows = run.rows.len(),
            "rows reported during a fast PRE run; its release checked the run was intact"
        );
    }
    let mut frames = run.frames;
    if let Some((_, _, e)) = end.error.as_ref().or(commit.as_ref().and_then(|c| c.error.as_ref())) {
        frames.extend_from_slice(e);
    }
    io.answer(frames, last_status).await?;
    Ok(Ran::Answered(last_status))
}
