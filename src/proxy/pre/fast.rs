//! Held statements decided inside their own run, in one round trip: when every PRE function is
//! `sql` or `log`, pgfire's trigger runs each row's chain itself (`pgfire.pre_decide`, migration
//! 010), so the proxy sends the savepoint (in autocommit, a BEGIN of its own), the client's
//! statement and the release (and COMMIT) together.
//! An allowed write is released at once; a blocked one fails with the trigger's P0001 and the
//! session is left as the server left it; a row the database cannot decide (a rewrite, or a
//! function of another kind after a configuration change) fails with SQLSTATE PGF04, and the
//! statement goes back to the long way ([`super::hold`]) as if it had not run.

use bytes::BytesMut;

use super::hold::{self, query_frame, query_frame_bytes, Io, Reply};
use super::{commits, rows, PreConfig, PreHooks};
use crate::proxy::session::Fatal;
use crate::wire::{self, Frontend};

/// SQLSTATE of a row the database left to the proxy.
const HELD: &str = "PGF04";
/// SQLSTATE query_canceled.
const QUERY_CANCELED: &str = "57014";

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
    let run = format!("{}:{}", cfg.rows_limit, hooks.next_statement());
    let mode = format!("fast:{run}");
    // In autocommit the proxy's own transaction is what a rollback undoes; in the client's
    // transaction block a savepoint is (a rewrite, or the watchdog, undoes the run alone).
    let (begin, release) = match implicit {
        true => ("BEGIN", ""),
        false => ("SAVEPOINT pgfire_pre", "; RELEASE SAVEPOINT pgfire_pre"),
    };
    let (setup, end_sql) = if cfg.lean {
        (
            format!("{begin}; SELECT pgfire.pre_fast_begin('{run}')"),
            format!("SELECT pgfire.pre_fast_end('{mode}'){release}"),
        )
    } else {
        (
            format!("{begin}; SELECT pgfire.pre_arm_fast('{run}'), set_config('pgfire.pre_k', '0', true), set_config('pgfire.pre_log', '', true)"),
            format!("SELECT pgfire.pre_end('{mode}'){release}"),
        )
    };
    let simple = match wire::decode_frontend(frame)? {
        Some(Frontend::Query(q)) => Some(q.raw.to_vec()),
        _ => None,
    };
    let cancel = io.cancel;
    let exchange = async {
        match simple {
            Some(sql) => spliced(io, implicit, &setup, &sql, &end_sql).await,
            None => pipelined(io, implicit, &setup, frame, &end_sql).await,
        }
    };
    // The database times a call only once it has returned: a run that outlives its functions'
    // timeouts is cancelled, and the statement goes the long way, where each call has its own
    // statement_timeout.
    let mut cancelled = false;
    let Exchange {
        prepared,
        run,
        end,
        status: last_status,
        ended,
    } = match (cfg.watchdog, cancel) {
        (Some(limit), Some(cancel)) => {
            tokio::pin!(exchange);
            match tokio::time::timeout(limit, &mut exchange).await {
                Ok(done) => done?,
                Err(_) => {
                    tracing::warn!(
                        after_ms = limit.as_millis() as u64,
                        "a PRE run decided in the database outlived its functions' timeouts: cancelling it, to run the statement the long way"
                    );
                    // Sent and passed on to the backend before anything else is sent to it: it
                    // can only land in this exchange, or while the backend idles (a no-op).
                    cancel.send().await;
                    cancelled = true;
                    exchange.await?
                }
            }
        }
        _ => exchange.await?,
    };
    let by_watchdog = cancelled
        && [&run.error, &end.error]
            .into_iter()
            .flatten()
            .any(|(code, _, _)| code == QUERY_CANCELED);
    // The runs the release carries back.
    if let Some(reports) = end
        .values
        .first()
        .and_then(|v| v.as_deref())
        .and_then(|v| v.strip_prefix(END_MARK))
    {
        match rows::decode_runs(reports) {
            Ok(r) => io.runs.extend(r),
            Err(err) => tracing::warn!(error = %err, "unreadable PRE run reports"),
        }
    }

    if commits::commits_by_itself(&run, implicit) {
        io.runs.clear();
        return commits::run(io, frame, closes).await.map(Ran::Answered);
    }
    let code = run.error.as_ref().map(|(c, _, _)| c.clone());
    if (code.as_deref() == Some(HELD) || by_watchdog) && prepared.error.is_none() {
        // Undo the run and forget its decisions.
        io.runs.clear();
        if implicit && !ended {
            io.query("ROLLBACK").await?;
        }
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
    if let (Some((_, _, e)), None) = (&prepared.error, &run.error) {
        // The proxy's own setup failed and the client's statement never ran: the client gets
        // that error, the session what is left of its transaction.
        let failed_setup = Reply {
            frames: BytesMut::from(&e[..]),
            starts: vec![(0, b'E')],
            error: prepared.error.clone(),
            status: last_status,
            ..Reply::default()
        };
        if implicit {
            let status = io.query("ROLLBACK").await?.status;
            io.answer(failed_setup.frames, status).await?;
            return Ok(Ran::Answered(status));
        }
        return hold::failed(io, failed_setup, false)
            .await
            .map(Ran::Answered);
    }
    if prepared.error.is_some() || run.error.is_some() {
        if implicit {
            // End the proxy's transaction, unless its COMMIT already has (rolled back).
            let status = match ended {
                true => last_status,
                false => io.query("ROLLBACK").await?.status,
            };
            io.answer(run.frames, status).await?;
            return Ok(Ran::Answered(status));
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
    let mut status = last_status;
    if let Some((_, _, e)) = &end.error {
        frames.extend_from_slice(e);
        if implicit && !ended {
            status = io.query("ROLLBACK").await?.status;
        }
    }
    io.answer(frames, status).await?;
    Ok(Ran::Answered(status))
}

/// The answers to a fast run's three parts: the proxy's setup, the client's statement, and the
/// release (with the COMMIT in autocommit, whose error, if any, is the release's).
struct Exchange {
    prepared: Reply,
    run: Reply,
    end: Reply,
    /// The transaction status after it all.
    status: u8,
    /// In autocommit: the proxy's transaction has ended (committed, or rolled back by COMMIT).
    ended: bool,
}

/// An extended-protocol batch: the setup, the batch and the release as their own messages (the
/// COMMIT as one more, so that it ends the proxy's transaction whatever failed before it).
async fn pipelined(
    io: &mut Io<'_>,
    implicit: bool,
    setup: &str,
    frame: &[u8],
    end_sql: &str,
) -> Result<Exchange, Fatal> {
    let mut out = query_frame(setup);
    out.extend_from_slice(frame);
    out.extend_from_slice(&query_frame(end_sql));
    if implicit {
        out.extend_from_slice(&query_frame("COMMIT"));
    }
    io.send(&out).await?;
    let prepared = io.reply().await?;
    let run = io.reply().await?;
    let mut end = io.reply().await?;
    let mut status = end.status;
    if implicit {
        let commit = io.reply().await?;
        status = commit.status;
        if end.error.is_none() {
            end.error = commit.error;
        }
    }
    Ok(Exchange {
        prepared,
        run,
        end,
        status,
        ended: implicit,
    })
}

/// How the value pgfire.pre_fast_end (pgfire.pre_end before migration 11) returns begins (the
/// run reports follow): it marks where the
/// release's answer begins.
const END_MARK: &[u8] = b"pgfire:end:";

/// A simple Query: the client's query string inside one query string of the proxy's, between
/// the setup and the release, so the server answers it all at once; the answer is cut back into
/// its three parts.
async fn spliced(
    io: &mut Io<'_>,
    implicit: bool,
    setup: &str,
    sql: &[u8],
    end_sql: &str,
) -> Result<Exchange, Fatal> {
    // The client's bytes as they came (in its client_encoding), between ASCII of the proxy's.
    let mut text = format!("{setup};\n").into_bytes();
    text.extend_from_slice(sql);
    text.extend_from_slice(format!("\n;{end_sql}").as_bytes());
    if implicit {
        text.extend_from_slice(b"; COMMIT");
    }
    io.send(&query_frame_bytes(&text)).await?;
    let reply = io.reply().await?;
    // BEGIN (autocommit) or SAVEPOINT (in a block), then the arming SELECT's RowDescription,
    // DataRow and CommandComplete.
    let setup_frames = 4;
    let status = reply.status;
    let error_at = reply.starts.iter().position(|&(_, t)| t == b'E');
    let (prepared, rest) = split_at_frame(reply, setup_frames.min(error_at.unwrap_or(usize::MAX)));
    if prepared.error.is_some() {
        return Ok(Exchange {
            prepared,
            run: rest,
            end: Reply::default(),
            status,
            ended: false,
        });
    }
    // The release starts at the RowDescription before pgfire.pre_end's DataRow, or before its
    // error (the statement changed the settings it checks).
    let mut d = 0;
    let mut end_at = None;
    for (i, &(_, t)) in rest.starts.iter().enumerate() {
        match t {
            b'D' => {
                if rest
                    .values
                    .get(d)
                    .and_then(|v| v.as_deref())
                    .is_some_and(|v| v.starts_with(END_MARK))
                {
                    end_at = Some(i.saturating_sub(1));
                }
                d += 1;
            }
            b'E' if end_at.is_none()
                && i > 0
                && rest.starts[i - 1].1 == b'T'
                && rest
                    .error
                    .as_ref()
                    .is_some_and(|(_, m, _)| m.starts_with(TAMPERED_PREFIX)) =>
            {
                end_at = Some(i - 1);
            }
            _ => {}
        }
    }
    let (run, end) = split_at_frame(rest, end_at.unwrap_or(usize::MAX));
    let ended = implicit && run.error.is_none() && end.error.is_none();
    Ok(Exchange {
        prepared,
        run,
        end,
        status,
        ended,
    })
}

/// How the refusal of pgfire.pre_fast_end (and pgfire.pre_end) begins.
const TAMPERED_PREFIX: &str = "pgfire: the statement changed the settings";

/// `reply` cut before its frame number `n` (all of it when it has fewer).
fn split_at_frame(reply: Reply, n: usize) -> (Reply, Reply) {
    let cut = reply
        .starts
        .get(n)
        .map_or(reply.frames.len(), |&(offset, _)| offset);
    let mut first = Reply {
        status: reply.status,
        ..Reply::default()
    };
    let mut second = Reply {
        status: reply.status,
        ..Reply::default()
    };
    let mut frames = reply.frames;
    let tail = frames.split_off(cut);
    first.frames = frames;
    second.frames = tail;
    let mut values = reply.values.into_iter();
    for (offset, tag) in reply.starts {
        let part = if offset < cut {
            &mut first
        } else {
            &mut second
        };
        let at = if offset < cut { offset } else { offset - cut };
        part.starts.push((at, tag));
        if tag == b'D' {
            part.values.push(values.next().flatten());
        }
    }
    // The first error ends the answer: it is in the part that holds the last frames.
    if let Some(e) = reply.error {
        match second.starts.iter().any(|&(_, t)| t == b'E') {
            true => second.error = Some(e),
            false => first.error = Some(e),
        }
    }
    second.rows = reply.rows;
    (first, second)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};

    fn frame(out: &mut Reply, tag: u8, body: &[u8]) {
        out.starts.push((out.frames.len(), tag));
        out.frames.put_u8(tag);
        out.frames.put_i32(body.len() as i32 + 4);
        out.frames.put_slice(body);
    }

    #[test]
    fn an_answer_is_cut_at_a_frame() {
        let mut r = Reply {
            status: b'T',
            ..Reply::default()
        };
        frame(&mut r, b'C', b"SAVEPOINT\0");
        frame(&mut r, b'D', b"a");
        r.values.push(Some(b"a".to_vec()));
        frame(&mut r, b'C', b"UPDATE 1\0");
        frame(&mut r, b'D', b"b");
        r.values.push(Some(b"b".to_vec()));
        let whole = r.frames.clone();
        let (first, second) = split_at_frame(r, 2);
        assert_eq!(first.starts.len(), 2);
        assert_eq!(first.values, vec![Some(b"a".to_vec())]);
        assert_eq!(second.starts[0], (0, b'C'));
        assert_eq!(second.values, vec![Some(b"b".to_vec())]);
        let mut joined = BytesMut::from(&first.frames[..]);
        joined.extend_from_slice(&second.frames);
        assert_eq!(joined, whole);
        assert_eq!((first.status, second.status), (b'T', b'T'));
    }

    #[test]
    fn an_error_goes_with_its_part() {
        let mut r = Reply::default();
        frame(&mut r, b'C', b"SAVEPOINT\0");
        frame(&mut r, b'E', b"x\0");
        r.error = Some(("P0001".into(), "no".into(), bytes::Bytes::new()));
        let copy = Reply {
            frames: r.frames.clone(),
            starts: r.starts.clone(),
            error: r.error.clone(),
            ..Reply::default()
        };
        let (first, second) = split_at_frame(copy, 1);
        assert!(first.error.is_none() && second.error.is_some());
        let (first, second) = split_at_frame(r, usize::MAX);
        assert!(first.error.is_some() && second.frames.is_empty());
    }
}
