//! The hold/decide/release state machine of one held statement (DESIGN section 6), driven on the
//! client's own upstream session while the client waits:
//!
//! 1. *tentative run*: `SAVEPOINT pgfire_pre` (after a `BEGIN` of the proxy's own when the client
//!    is in autocommit: PostgreSQL refuses savepoints in implicit transactions), `pgfire.pre_mode`
//!    set to `record`, then the client's statement; its response is held back, and pgfire's row
//!    trigger reports every row it writes;
//! 2. *decision*: the PRE functions of every row, in priority order ([`super::decide`]);
//! 3. *allow*: release the savepoint (and commit the proxy's transaction), send the held
//!    response. *Block*: roll back to the savepoint and have the server raise the P0001 error
//!    itself (`pgfire.pre_block`), so the session is left as PostgreSQL leaves it. *Modify*: roll
//!    back to the savepoint, hand the decisions to the trigger (`pgfire.pre_apply`), run the
//!    statement again, check the trigger applied them to the same rows, release.
//!
//! A statement that fails on its own is answered as the server answered it. The client sees no
//! message of the proxy's own statements: only its statement's response, or the error.

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::decide::{self, Outcome};
use super::gate::HoldAs;
use super::rows::{self, RowReport};
use super::{commits, copy, fast};
use super::{PreConfig, PreHooks};
use crate::proxy::lexing::Lexing;
use crate::proxy::session::{io_fatal, Fatal};
use crate::wire::{self, Backend};

/// The sockets and buffers a held statement is driven with.
pub(in crate::proxy) struct Io<'a> {
    pub ur: &'a mut (dyn AsyncRead + Unpin + Send),
    pub uw: &'a mut (dyn AsyncWrite + Unpin + Send),
    pub cw: &'a mut (dyn AsyncWrite + Unpin + Send),
    /// The client's side, read only for COPY data ([`super::copy`]).
    pub cr: &'a mut (dyn AsyncRead + Unpin + Send),
    /// Client bytes read and not yet handled (the relay's upstream buffer).
    pub cbuf: &'a mut BytesMut,
    /// Server bytes read and not yet handled (the relay's downstream buffer).
    pub buf: &'a mut BytesMut,
    /// Asynchronous messages (notifications, parameter changes) met on the way, for the client.
    pub async_out: BytesMut,
    /// One statement of a longer query string ([`super::split`]): its answer goes to the client
    /// without a ReadyForQuery, which comes at the end of the string.
    pub inner: bool,
    /// How the session lexes strings, kept up to date from the server's ParameterStatus.
    pub lexing: Lexing,
    /// Runs the database decided on the way (`pgfire.pre_decide`), recorded when the held
    /// statement ends.
    pub runs: Vec<rows::RunReport>,
    /// How to cancel what the session's backend runs (unknown until its BackendKeyData).
    pub cancel: Option<Cancel<'a>>,
}

/// The proxy's own CancelRequest for a session's backend.
#[derive(Clone, Copy)]
pub(in crate::proxy) struct Cancel<'a> {
    pub config: &'a crate::proxy::ProxyConfig,
    /// The BackendKeyData's body: process id and secret key.
    pub key: &'a [u8],
}

impl Cancel<'_> {
    /// Send it and wait until the server has passed it on to the backend.
    pub async fn send(self) {
        crate::proxy::session::cancel_backend(self.config, self.key).await
    }
}

/// The answer to one Query the proxy sent, up to its ReadyForQuery.
#[derive(Default)]
pub(super) struct Reply {
    /// Frames meant for the client: all but ReadyForQuery and row reports.
    pub frames: BytesMut,
    /// Where each frame of `frames` starts, with its tag.
    pub starts: Vec<(usize, u8)>,
    /// Rows pgfire's trigger reported.
    pub rows: Vec<RowReport>,
    /// For each row, how many bytes of `frames` came before its report.
    pub row_at: Vec<usize>,
    /// Row reports that could not be read.
    pub bad_rows: usize,
    /// The first ErrorResponse: SQLSTATE, message, and the frame itself.
    pub error: Option<(String, String, Bytes)>,
    /// First column of every DataRow.
    pub values: Vec<Option<Vec<u8>>>,
    /// Transaction status of the ReadyForQuery.
    pub status: u8,
}

impl Io<'_> {
    pub(super) async fn send(&mut self, bytes: &[u8]) -> Result<(), Fatal> {
        self.uw.write_all(bytes).await.map_err(io_fatal)?;
        // Flushed: a TLS upstream may keep written bytes until then.
        self.uw.flush().await.map_err(io_fatal)
    }

    /// The next whole server frame.
    pub(super) async fn frame(&mut self) -> Result<BytesMut, Fatal> {
        loop {
            if let Some((_, len)) = wire::frame_header(self.buf)? {
                if self.buf.len() >= len {
                    let frame = self.buf.split_to(len);
                    self.lexing.observe(&frame);
                    return Ok(frame);
                }
                self.buf.reserve(len - self.buf.len());
            }
            if self.ur.read_buf(self.buf).await.map_err(io_fatal)? == 0 {
                return Err(Fatal {
                    code: wire::CONNECTION_FAILURE,
                    message: "the database closed the connection".into(),
                });
            }
        }
    }

    /// Read the answer to one Query, up to its ReadyForQuery.
    pub(super) async fn reply(&mut self) -> Result<Reply, Fatal> {
        self.reply_skipping(0).await
    }

    /// [`Io::reply`], leaving out the first `closes` CloseComplete messages (of Close messages
    /// the proxy put before the client's).
    pub(super) async fn reply_skipping(&mut self, mut closes: usize) -> Result<Reply, Fatal> {
        let mut r = Reply::default();
        loop {
            let frame = self.frame().await?;
            if frame[0] == b'3' && closes > 0 {
                closes -= 1;
                continue;
            }
            if self.absorb(&mut r, frame)? {
                return Ok(r);
            }
        }
    }

    /// Read `reply` on to its ReadyForQuery.
    pub(super) async fn reply_into(&mut self, r: &mut Reply) -> Result<(), Fatal> {
        loop {
            let frame = self.frame().await?;
            if self.absorb(r, frame)? {
                return Ok(());
            }
        }
    }

    /// Add one server frame to `r`; true at its ReadyForQuery.
    pub(super) fn absorb(&mut self, r: &mut Reply, frame: BytesMut) -> Result<bool, Fatal> {
        if !matches!(frame[0], b'Z' | b'A' | b'S') {
            r.starts.push((r.frames.len(), frame[0]));
        }
        match frame[0] {
            b'Z' => {
                r.status = *frame.get(5).unwrap_or(&b'I');
                return Ok(true);
            }
            b'N' => {
                if let Some(Backend::NoticeResponse(n)) = wire::decode_backend(&frame)? {
                    if n.code == rows::RUN_CODE && n.message == rows::RUN_MESSAGE {
                        r.starts.pop();
                        match rows::decode_runs(n.detail) {
                            Ok(runs) => self.runs.extend(runs),
                            Err(err) => tracing::warn!(error = %err, "unreadable PRE run report"),
                        }
                        return Ok(false);
                    }
                    if n.code == rows::ROW_CODE && n.message == rows::ROW_MESSAGE {
                        r.starts.pop();
                        match rows::decode(n.detail) {
                            Ok(row) => {
                                r.rows.push(row);
                                r.row_at.push(r.frames.len());
                            }
                            Err(err) => {
                                tracing::warn!(error = %err, "unreadable PRE row report");
                                r.bad_rows += 1;
                            }
                        }
                        return Ok(false);
                    }
                }
                r.frames.extend_from_slice(&frame);
            }
            b'E' => {
                if r.error.is_none() {
                    if let Some(Backend::ErrorResponse(n)) = wire::decode_backend(&frame)? {
                        r.error = Some((
                            String::from_utf8_lossy(n.code).into_owned(),
                            n.message_lossy(),
                            without_context(&frame),
                        ));
                    }
                }
                match decided_block(&frame) {
                    Some(clean) => r.frames.extend_from_slice(&clean),
                    None => r.frames.extend_from_slice(&frame),
                }
            }
            b'D' => {
                r.values.push(first_column(&frame));
                r.frames.extend_from_slice(&frame);
            }
            b'A' | b'S' => self.async_out.extend_from_slice(&frame),
            _ => r.frames.extend_from_slice(&frame),
        }
        Ok(false)
    }

    /// The next whole server frame already read, if any.
    pub(super) fn buffered_frame(&mut self) -> Result<Option<BytesMut>, Fatal> {
        match wire::frame_header(self.buf)? {
            Some((_, len)) if self.buf.len() >= len => {
                let frame = self.buf.split_to(len);
                self.lexing.observe(&frame);
                Ok(Some(frame))
            }
            _ => Ok(None),
        }
    }

    /// Send one Query of the proxy's own and read its answer.
    pub(super) async fn query(&mut self, sql: &str) -> Result<Reply, Fatal> {
        self.send(&query_frame(sql)).await?;
        self.reply().await
    }

    /// The answer to the client's statement: `out`, then its ReadyForQuery with `status`
    /// (unless the statement is one of a longer query string).
    pub(super) async fn answer(&mut self, mut out: BytesMut, status: u8) -> Result<(), Fatal> {
        if !self.inner {
            ready_frame(&mut out, status);
        }
        self.send_client(out).await
    }

    pub(super) async fn send_client(&mut self, out: BytesMut) -> Result<(), Fatal> {
        if !self.async_out.is_empty() {
            let early = std::mem::take(&mut self.async_out);
            self.cw.write_all(&early).await.map_err(io_fatal)?;
        }
        self.cw.write_all(&out).await.map_err(io_fatal)?;
        self.cw.flush().await.map_err(io_fatal)
    }
}

/// A Query ('Q') frame.
pub(super) fn query_frame(sql: &str) -> BytesMut {
    query_frame_bytes(sql.as_bytes())
}

/// A Query frame of text in whatever encoding it came (a client's own bytes).
pub(super) fn query_frame_bytes(sql: &[u8]) -> BytesMut {
    let mut b = BytesMut::with_capacity(sql.len() + 6);
    b.put_u8(b'Q');
    b.put_i32((sql.len() + 5) as i32);
    b.put_slice(sql);
    b.put_u8(0);
    b
}

pub(super) fn ready_frame(out: &mut BytesMut, status: u8) {
    out.put_slice(&[b'Z', 0, 0, 0, 5, status]);
}

/// `text` as a dollar-quoted literal whose tag it does not contain.
pub(super) fn dollar(text: &str) -> String {
    let mut tag = String::from("$pgf$");
    let mut n = 0;
    while text.contains(&tag[..tag.len() - 1]) {
        n += 1;
        tag = format!("$pgf{n}$");
    }
    format!("{tag}{text}{tag}")
}

/// The first column of a DataRow frame (None for NULL or a malformed frame).
fn first_column(frame: &[u8]) -> Option<Vec<u8>> {
    let body = frame.get(5..)?;
    let n = i16::from_be_bytes([*body.first()?, *body.get(1)?]);
    if n < 1 {
        return None;
    }
    let len = i32::from_be_bytes(body.get(2..6)?.try_into().ok()?);
    if len < 0 {
        return None;
    }
    body.get(6..6 + len as usize).map(<[u8]>::to_vec)
}

/// An ErrorResponse without its `W` (context) field: the error raised for a blocked write reads
/// as the handler's, not as a line of pgfire's PL/pgSQL.
pub(super) fn without_context(frame: &[u8]) -> Bytes {
    let Some(body) = frame.get(5..) else {
        return Bytes::copy_from_slice(frame);
    };
    let mut fields = BytesMut::new();
    let mut rest = body;
    while let Some((&t, tail)) = rest.split_first() {
        if t == 0 {
            break;
        }
        let Some(end) = tail.iter().position(|&b| b == 0) else {
            return Bytes::copy_from_slice(frame);
        };
        if t != b'W' {
            fields.put_u8(t);
            fields.put_slice(&tail[..=end]);
        }
        rest = &tail[end + 1..];
    }
    fields.put_u8(0);
    let mut out = BytesMut::with_capacity(fields.len() + 5);
    out.put_u8(b'E');
    out.put_i32((fields.len() + 4) as i32);
    out.put_slice(&fields);
    out.freeze()
}

/// A block raised by pgfire's trigger (`pgfire.pre_decide`), without its context: it reads as
/// the handler's error, not as a line of pgfire's PL/pgSQL. None for any other frame.
pub(in crate::proxy) fn decided_block(frame: &[u8]) -> Option<Bytes> {
    const MARK: &[u8] = b"function pgfire.pre_decide(";
    let raised = frame.len() > 5
        && frame[0] == b'E'
        && frame.windows(6).any(|w| w == b"CP0001")
        && frame.windows(MARK.len()).any(|w| w == MARK);
    raised.then(|| without_context(frame))
}

/// Raise `message` (SQLSTATE `code`) on the server, so the session's state is the server's own.
pub(super) fn raise_sql(message: &str, detail: Option<&str>, code: &str) -> String {
    let m = rows::ascii_json(&message);
    let d = detail.map_or("null".to_string(), |d| rows::ascii_json(&d));
    format!(
        "SELECT pgfire.pre_block({}::jsonb, {}::jsonb, '{code}')",
        dollar(&m),
        dollar(&d)
    )
}

/// Run one held simple-protocol Query, or an extended-protocol batch up to its Sync (`frame`,
/// the client's bytes; `closes`, Close messages for the statements the batch parses, sent before
/// it runs again), with the session's transaction status `status` (`I` or `T`). Returns the
/// status the client is told.
pub(in crate::proxy) async fn run_query(
    io: &mut Io<'_>,
    hooks: &PreHooks,
    cfg: &PreConfig,
    (frame, closes, how): (&[u8], &[u8], HoldAs),
    status: u8,
) -> Result<u8, Fatal> {
    let mut closes_first: &[u8] = &[];
    if cfg.fast && how == HoldAs::Whole {
        match fast::run(io, hooks, cfg, (frame, closes), status).await? {
            fast::Ran::Answered(status) => return Ok(status),
            // Back where it started: the statement runs the long way, its statements parsed again.
            fast::Ran::Held => closes_first = closes,
        }
    }
    let implicit = status == b'I';
    let limit = cfg.rows_limit;
    let mut setup = String::new();
    if implicit {
        setup.push_str("BEGIN; ");
    }
    setup.push_str(&format!(
        "SAVEPOINT pgfire_pre; SELECT {}, set_config('pgfire.pre_n', '0', true)",
        arm_sql(cfg, &format!("record:{limit}"))
    ));
    let record = format!("record:{limit}");
    let (prepared, first, intact, replay) = match how {
        HoldAs::CopyIn => copy::first_run(io, &setup, frame, &record).await?,
        _ => {
            let (p, f, i) = tentative(io, &setup, frame, closes_first, &record).await?;
            (p, f, i, copy::Replay::default())
        }
    };
    if how == HoldAs::Whole
        && prepared.error.is_none()
        && commits::commits_by_itself(&first, implicit)
    {
        return commits::run(io, frame, closes).await;
    }
    if prepared.error.is_some() || first.error.is_some() {
        return failed(io, first, implicit).await;
    }
    if !intact {
        return block(io, TAMPERED, None, "42501", implicit, None).await;
    }
    if let Some(reason) = tampered(&first, 'r', None) {
        return block(io, &reason, None, "42501", implicit, None).await;
    }
    if first.rows.len() > limit as usize {
        let msg = format!(
            "pgfire: this statement writes more than {limit} rows of tables with PRE hooks"
        );
        return block(io, &msg, None, "54000", implicit, None).await;
    }
    if first.rows.is_empty() {
        return release(io, first, implicit).await;
    }
    match decide::run(io, hooks, cfg, &first.rows, &release_sql(implicit)).await? {
        Outcome::Allow => release(io, first, implicit).await,
        Outcome::Released(done) => released(io, first, done).await,
        Outcome::Block {
            message,
            detail,
            row,
        } => {
            // What the client would have had before the error: the answers to the messages
            // before the statement that wrote the row, not the row's own results.
            let before = until_row(&first, row);
            block(io, &message, Some(&detail), "P0001", implicit, Some(before)).await
        }
        Outcome::Modify { overlays } => {
            if how == HoldAs::CopyIn && replay.too_large {
                let msg = format!(
                    "pgfire: a PRE function rewrote rows of this COPY, whose data ({} bytes or more) is too large to send again",
                    copy::REPLAY_LIMIT
                );
                return block(io, &msg, None, "54000", implicit, None).await;
            }
            let apply = rows::ascii_json(&overlays);
            let setup = format!(
                "ROLLBACK TO SAVEPOINT pgfire_pre; SELECT {}, set_config('pgfire.pre_n', '0', true), set_config('pgfire.pre_apply', {}, true)",
                arm_sql(cfg, &format!("apply:{limit}")),
                dollar(&apply)
            );
            let apply_mode = format!("apply:{limit}");
            let (prepared, again, intact) = match how {
                HoldAs::CopyIn => {
                    copy::rerun(io, &setup, frame, closes, &replay, &apply_mode).await?
                }
                _ => tentative(io, &setup, frame, closes, &apply_mode).await?,
            };
            if prepared.error.is_some() || again.error.is_some() {
                return failed(io, again, implicit).await;
            }
            if !intact {
                return block(io, TAMPERED, None, "42501", implicit, None).await;
            }
            if let Some(reason) = tampered(&again, 'a', Some(&first.rows)) {
                return block(io, &reason, None, "40001", implicit, None).await;
            }
            release(io, again, implicit).await
        }
    }
}

const TAMPERED: &str =
    "pgfire: the statement changed the settings PRE hooks run with (pgfire.pre_mode, pgfire.proxied)";

/// Send `setup`, the client's `frame` and a check of the settings the trigger reads, pipelined;
/// returns the answers to the first two and whether the settings were still as set (`mode`,
/// and the session marked as proxied) after the client's statement.
async fn tentative(
    io: &mut Io<'_>,
    setup: &str,
    frame: &[u8],
    closes: &[u8],
    mode: &str,
) -> Result<(Reply, Reply, bool), Fatal> {
    let mut out = query_frame(setup);
    out.extend_from_slice(closes);
    out.extend_from_slice(frame);
    out.extend_from_slice(&query_frame(CHECK_SQL));
    io.send(&out).await?;
    let prepared = io.reply().await?;
    let run = io.reply_skipping(count_frames(closes)).await?;
    let check = io.reply().await?;
    let intact = intact(&run, &check, mode);
    Ok((prepared, run, intact))
}

/// Starts a PRE run in `mode` (`record:<limit>`, `apply:<limit>`): pgfire.pre_mode becomes
/// `<mode>:<run>`, which pgfire's trigger obeys only while `<run>` is the session's current run.
fn arm_sql(cfg: &PreConfig, mode: &str) -> String {
    // The key is hex (md5), safe in a plain literal whatever standard_conforming_strings says.
    let key: String = cfg.key.chars().filter(char::is_ascii_hexdigit).collect();
    format!("pgfire.pre_arm('{key}', '{mode}')")
}

/// Reads the settings pgfire's trigger runs with, after the client's statement (the mode less
/// its run number).
pub(super) const CHECK_SQL: &str =
    "SELECT regexp_replace(coalesce(current_setting('pgfire.pre_mode', true), ''), ':[0-9]+$', '') || '/' || current_setting('pgfire.proxied', true)";

/// Whether the answer to [`CHECK_SQL`] shows the settings as the proxy set them (`mode`, the
/// session proxied), or the statement failed (and wrote nothing).
pub(super) fn intact(run: &Reply, check: &Reply, mode: &str) -> bool {
    let expected = format!("{mode}/on");
    run.error.is_some()
        || check.values.first().and_then(|v| v.as_deref()) == Some(expected.as_bytes())
}

/// Why the row reports of a run cannot be trusted, if they cannot: a report of the other mode
/// (someone changed `pgfire.pre_mode` mid-statement), an unreadable one, or, on the second run,
/// not the same rows as the first (kind, table, and the old row of an update or delete, in
/// order: code that writes other rows the second time, or a row changed by a concurrent commit
/// in between).
fn tampered(reply: &Reply, mode: char, first: Option<&[RowReport]>) -> Option<String> {
    if reply.bad_rows > 0 || reply.rows.iter().any(|r| r.mode != mode) {
        return Some("pgfire: the PRE hooks' row reports were tampered with".into());
    }
    if let Some(first) = first {
        let same = first.len() == reply.rows.len()
            && first
                .iter()
                .zip(&reply.rows)
                .all(|(a, b)| a.op == b.op && a.oid == b.oid && a.old == b.old);
        if !same {
            return Some(
                "pgfire: the rows this statement writes changed between its PRE run and the write; run it again".into(),
            );
        }
    }
    None
}

/// The client's statement failed on its own: the client gets the server's answer; the proxy's
/// own transaction, if it opened one, is rolled back.
pub(super) async fn failed(io: &mut Io<'_>, reply: Reply, implicit: bool) -> Result<u8, Fatal> {
    let mut status = reply.status;
    if implicit {
        status = io
            .query("ROLLBACK; SELECT pgfire.pre_disarm()")
            .await?
            .status;
    } else if status == b'E' {
        // End the run, then leave the transaction failed again, as the statement left it.
        let code = reply.error.as_ref().map_or("XX000", |(c, _, _)| c.as_str());
        let code: String = code.chars().filter(char::is_ascii_alphanumeric).collect();
        let sql = format!(
            "ROLLBACK TO SAVEPOINT pgfire_pre; RELEASE SAVEPOINT pgfire_pre; SELECT pgfire.pre_disarm(); {}",
            raise_sql("pgfire: the statement failed", None, &code)
        );
        status = io.query(&sql).await?.status;
    }
    io.answer(reply.frames, status).await?;
    Ok(status)
}

/// Keep what the statement did; the client gets its held response (and the commit's error,
/// when the proxy's own transaction fails to commit, as PostgreSQL reports it).
async fn release(io: &mut Io<'_>, reply: Reply, implicit: bool) -> Result<u8, Fatal> {
    let done = io.query(&release_sql(implicit)).await?;
    released(io, reply, done).await
}

/// The statements that keep what a held statement did.
pub(super) fn release_sql(implicit: bool) -> String {
    let mut sql = String::from(
        "SELECT set_config('pgfire.pre_mode', '', true), set_config('pgfire.proxied', 'on', false), pgfire.pre_disarm(); RELEASE SAVEPOINT pgfire_pre",
    );
    if implicit {
        sql.push_str("; COMMIT");
    }
    sql
}

/// The client's held response after the release answered `done`.
async fn released(io: &mut Io<'_>, reply: Reply, done: Reply) -> Result<u8, Fatal> {
    let mut out = reply.frames;
    if let Some((_, _, frame)) = &done.error {
        out.extend_from_slice(frame);
    }
    io.answer(out, done.status).await?;
    Ok(done.status)
}

/// How many frames `bytes` holds.
pub(super) fn count_frames(mut bytes: &[u8]) -> usize {
    let mut n = 0;
    while let Ok(Some((_, len))) = wire::frame_header(bytes) {
        if len > bytes.len() {
            break;
        }
        bytes = &bytes[len..];
        n += 1;
    }
    n
}

/// The frames of `reply` before the results of the statement that wrote row `row`: up to its
/// report, less the DataRows (RETURNING) just before it.
fn until_row(reply: &Reply, row: usize) -> BytesMut {
    let at = reply.row_at.get(row).copied().unwrap_or(0);
    let mut cut = at;
    for &(start, tag) in reply.starts.iter().rev() {
        if start >= at {
            continue;
        }
        if tag == b'D' || tag == b'N' {
            cut = start;
        } else {
            break;
        }
    }
    BytesMut::from(&reply.frames[..cut])
}

/// Undo the statement and have the server raise the error; the client gets `before` (the
/// answers it would have had before the error), the error and the ReadyForQuery.
async fn block(
    io: &mut Io<'_>,
    message: &str,
    detail: Option<&str>,
    code: &str,
    implicit: bool,
    before: Option<BytesMut>,
) -> Result<u8, Fatal> {
    let sql = format!(
        "ROLLBACK TO SAVEPOINT pgfire_pre; RELEASE SAVEPOINT pgfire_pre; SELECT pgfire.pre_disarm(); {}",
        raise_sql(message, detail, code)
    );
    let raised = io.query(&sql).await?;
    let mut status = raised.status;
    if implicit {
        status = io.query("ROLLBACK").await?.status;
    }
    let mut out = before.unwrap_or_default();
    match &raised.error {
        Some((_, _, frame)) => out.extend_from_slice(frame),
        None => wire::error_response(&mut out, "ERROR", code, message),
    }
    io.answer(out, status).await?;
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollar_quotes_avoid_their_tag() {
        assert_eq!(dollar("a"), "$pgf$a$pgf$");
        assert_eq!(dollar("x$pgf$y"), "$pgf1$x$pgf$y$pgf1$");
        assert_eq!(dollar("$pgf"), "$pgf1$$pgf$pgf1$");
    }

    #[test]
    fn first_column_reads_data_rows() {
        let mut f = BytesMut::new();
        f.put_u8(b'D');
        f.put_i32(4 + 2 + 4 + 3);
        f.put_i16(1);
        f.put_i32(3);
        f.put_slice(b"abc");
        assert_eq!(first_column(&f), Some(b"abc".to_vec()));
        assert_eq!(first_column(&f[..8]), None);
        assert_eq!(first_column(b"D\0\0\0\x06\xff\xff"), None);
    }

    #[test]
    fn context_is_dropped_from_errors() {
        let mut f = BytesMut::new();
        wire::error_response(&mut f, "ERROR", "P0001", "no");
        // Add a W field by hand.
        let mut body = f[5..f.len() - 1].to_vec();
        body.extend_from_slice(b"Wsome context\0\0");
        let mut g = BytesMut::new();
        g.put_u8(b'E');
        g.put_i32(body.len() as i32 + 4);
        g.put_slice(&body);
        assert_eq!(&without_context(&g)[..], &f[..]);
    }
}
