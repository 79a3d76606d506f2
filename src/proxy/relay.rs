//! The relay of one session once started: bytes forwarded in both directions as they arrive,
//! frame boundaries tracked, only the frames pgfire looks into decoded (Query, and with PRE hooks
//! the extended-protocol messages; SCRAM's first message to a TLS upstream; ReadyForQuery,
//! AuthenticationSASL and rewritten errors from the server), and held statements handed to the
//! PRE state machine with the session's sockets.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::in_flight::InFlight;
use super::lexing::Lexing;
use super::pre::gate::{self, Gate, HoldAs};
use super::pre::hold::{self, Cancel, Io};
use super::pre::rows::{self, RunReport};
use super::pre::split;
use super::pre::unit::{self, Next, Units};
use super::pre::PreHooks;
use super::scram;
use super::session::{io_fatal, Conn, Fatal, Hook, READ_CHUNK};
use super::ProxyConfig;
use crate::metrics::{Action, Metrics};
use crate::wire::{self, Backend, Frontend, Query, WireError};
use std::borrow::Cow;

/// Tracks frame boundaries in one direction so bytes can be forwarded as they arrive, while
/// whole frames of the types we inspect are held until complete.
#[derive(Default)]
struct Scanner {
    /// Bytes of the current pass-through frame not yet seen.
    remaining: usize,
}

impl Scanner {
    /// How many bytes at the start of `buf` can be forwarded now. `whole(tag)` says which frames
    /// to inspect (they are passed complete to `inspect`); `on_frame` sees each frame's tag once,
    /// before any of its bytes can be forwarded, and may refuse it. When `inspect` returns true
    /// the scan stops before that frame (`.1`): the caller takes it whole from the returned
    /// position (its `on_frame` has been called).
    fn scan(
        &mut self,
        buf: &[u8],
        mut on_frame: impl FnMut(u8) -> Result<(), WireError>,
        whole: impl Fn(u8) -> bool,
        mut inspect: impl FnMut(&[u8]) -> Result<bool, WireError>,
    ) -> Result<(usize, bool), WireError> {
        let mut pos = 0;
        loop {
            if self.remaining > 0 {
                let n = self.remaining.min(buf.len() - pos);
                pos += n;
                self.remaining -= n;
                if self.remaining > 0 {
                    return Ok((pos, false));
                }
            }
            let Some((tag, len)) = wire::frame_header(&buf[pos..])? else {
                return Ok((pos, false));
            };
            if whole(tag) {
                if buf.len() - pos < len {
                    return Ok((pos, false));
                }
                on_frame(tag)?;
                if inspect(&buf[pos..pos + len])? {
                    return Ok((pos, true));
                }
                pos += len;
            } else {
                on_frame(tag)?;
                self.remaining = len;
            }
        }
    }
}

pub(super) async fn relay(
    client: Conn,
    upstream: Conn,
    pending: BytesMut,
    config: &ProxyConfig,
    pre: Option<&PreHooks>,
    hook: &dyn Hook,
    drain: &CancellationToken,
) {
    let up = Upside {
        buf: pending,
        tls_upstream: matches!(upstream, Conn::DbTls(_)),
        metrics: config.metrics.clone(),
        ..Upside::default()
    };
    match (client, upstream) {
        // The common cases: borrowed halves of plain sockets, no locking.
        (Conn::Tcp(mut c), Conn::Tcp(mut u)) => {
            let (cr, cw) = c.split();
            let (ur, uw) = u.split();
            relay_halves(cr, cw, ur, uw, up, config, pre, hook, drain).await
        }
        (Conn::Tcp(mut c), Conn::Unix(mut u)) => {
            let (cr, cw) = c.split();
            let (ur, uw) = u.split();
            relay_halves(cr, cw, ur, uw, up, config, pre, hook, drain).await
        }
        (c, u) => {
            let (cr, cw) = tokio::io::split(c);
            let (ur, uw) = tokio::io::split(u);
            relay_halves(cr, cw, ur, uw, up, config, pre, hook, drain).await
        }
    }
}

/// Errors of the server to rewrite on their way to the client: the server's ErrorResponse whose
/// message contains the marker becomes the frame (see [`gate::parse`]).
type Rewrites = Mutex<Vec<(String, BytesMut)>>;
/// Rewrites kept at most; older ones (whose batch failed before reaching them) are dropped.
const MAX_REWRITES: usize = 64;

/// The session state both directions share (one task: the locks are never contended): what is
/// in flight, and how the server lexes strings.
type Shared<'a> = (&'a Mutex<InFlight>, &'a Mutex<Lexing>);

/// What the client direction stopped for.
enum Flow {
    /// The client left.
    Left,
    /// A Query, or an extended-protocol batch up to its Sync, to hold once everything before it
    /// is answered; `closes`: Close messages for the statements the batch parses.
    Held {
        bytes: BytesMut,
        closes: BytesMut,
        how: HoldAs,
    },
}

/// The client-to-server direction's state, kept outside its future, which ends at every held
/// statement.
#[derive(Default)]
struct Upside {
    buf: BytesMut,
    scanner: Scanner,
    /// The extended-protocol batch being gathered (PRE hooks on).
    units: Units,
    /// The database is reached over TLS: SCRAM with the GS2 flag "y" cannot succeed.
    tls_upstream: bool,
    /// Where statements are counted.
    metrics: Arc<Metrics>,
}

/// Write to the server, flushed: a TLS stream may keep written bytes until flushed (a no-op on
/// plain sockets).
async fn send(uw: &mut (impl AsyncWrite + Unpin), bytes: &[u8]) -> Result<(), Fatal> {
    uw.write_all(bytes).await.map_err(io_fatal)?;
    uw.flush().await.map_err(io_fatal)
}

#[allow(clippy::too_many_arguments)]
async fn relay_halves(
    mut cr: impl AsyncRead + Unpin + Send,
    mut cw: impl AsyncWrite + Unpin + Send,
    mut ur: impl AsyncRead + Unpin + Send,
    mut uw: impl AsyncWrite + Unpin + Send,
    mut up: Upside,
    config: &ProxyConfig,
    pre: Option<&PreHooks>,
    hook: &dyn Hook,
    drain: &CancellationToken,
) {
    // Shared by both directions (one task: the locks are never contended).
    let in_flight = Mutex::new(InFlight::new());
    let lexing = Mutex::new(Lexing::default());
    let rewrites: Rewrites = Mutex::new(Vec::new());
    let mut down = Downstream {
        pre: pre.is_some(),
        ..Downstream::default()
    };
    let outcome = loop {
        let flow = tokio::select! {
            r = client_to_server(&mut cr, &mut uw, &mut up, hook, pre, (&in_flight, &lexing), &rewrites) => r,
            r = server_to_client(&mut ur, &mut cw, &mut down, (&in_flight, &lexing), &rewrites, drain, (config, pre)) => r.map(|()| Flow::Left),
        };
        match (flow, pre) {
            (Ok(Flow::Held { bytes, closes, how }), Some(pre)) => {
                let io = (&mut ur, &mut uw, &mut cw, &mut cr, &mut up.buf);
                let statement = (&bytes[..], &closes[..], how);
                let shared = (&in_flight, &lexing);
                let pre = (pre, config);
                if let Err(f) = held(statement, io, &mut down, shared, &rewrites, pre).await {
                    break Err(f);
                }
            }
            (Ok(Flow::Held { bytes, .. }), None) => {
                if let Err(f) = send(&mut uw, &bytes).await {
                    break Err(f);
                }
            }
            (Ok(Flow::Left), _) => break Ok(()),
            (Err(f), _) => break Err(f),
        }
    };
    if let Err(f) = outcome {
        // The client may be in the middle of a server frame: finish it first, so that the FATAL
        // arrives as a frame of its own; a client that cannot be given a whole frame in time is
        // just disconnected.
        let whole = tokio::time::timeout(FINISH_FRAME_TIMEOUT, down.finish_frame(&mut ur, &mut cw))
            .await
            .is_ok_and(|r| r.is_ok());
        if whole {
            let mut b = BytesMut::new();
            wire::error_response(&mut b, "FATAL", f.code, &f.message);
            let _ = cw.write_all(&b).await;
        }
        // Tell the server we are gone, politely.
        let _ = send(&mut uw, &[b'X', 0, 0, 0, 4]).await;
    }
    let _ = cw.shutdown().await;
    let _ = uw.shutdown().await;
}

/// A held Query: once the server has answered everything sent before it, run it through the PRE
/// hooks (or as is, in a failed transaction, which the server refuses anyway; a query string
/// run statement by statement is, as its ROLLBACK may end the failed transaction).
async fn held(
    (frame, closes, how): (&[u8], &[u8], HoldAs),
    (ur, uw, cw, cr, cbuf): (
        &mut (impl AsyncRead + Unpin + Send),
        &mut (impl AsyncWrite + Unpin + Send),
        &mut (impl AsyncWrite + Unpin + Send),
        &mut (impl AsyncRead + Unpin + Send),
        &mut BytesMut,
    ),
    down: &mut Downstream,
    (in_flight, lexing): Shared<'_>,
    rewrites: &Rewrites,
    (pre, config): (&PreHooks, &ProxyConfig),
) -> Result<(), Fatal> {
    loop {
        scan_down(down, (in_flight, lexing), rewrites)?;
        pre.record_reports(std::mem::take(&mut down.runs));
        down.write_ready(cw).await.map_err(io_fatal)?;
        // The held Query itself is counted as sent.
        if lock(in_flight).owed() <= 1 && down.scanner.remaining == 0 && down.ready == 0 {
            break;
        }
        if ur.read_buf(&mut down.buf).await.map_err(io_fatal)? == 0 {
            return Err(Fatal {
                code: wire::CONNECTION_FAILURE,
                message: "the database closed the connection".into(),
            });
        }
    }
    let status = lock(in_flight).status();
    let cfg = pre.config();
    let known = *lock(lexing);
    // Everything before it is answered: how the server lexes the Query is known now. A Query
    // with a backslash was held (or refused) when either lexing said so; decide again.
    let mut how = how;
    if frame[0] == b'Q' && frame.contains(&b'\\') && cfg.active() {
        if let Some(Frontend::Query(q)) = wire::decode_frontend(frame)? {
            match gate::query(&cfg, known.strings(true), &q.sql) {
                Gate::Pass => return send(uw, frame).await,
                Gate::Replace { frame: instead, .. } => return send(uw, &instead).await,
                Gate::Hold(h) => how = h,
            }
        }
    }
    let split = how == HoldAs::Split && frame[0] == b'Q';
    if !(matches!(status, b'I' | b'T') || split && status == b'E') || !cfg.active() {
        return send(uw, frame).await;
    }
    let mut io = Io {
        ur,
        uw,
        cw,
        cr,
        cbuf,
        buf: &mut down.buf,
        async_out: BytesMut::new(),
        inner: false,
        lexing: known,
        runs: Vec::new(),
        cancel: down.key.as_deref().map(|key| Cancel { config, key }),
    };
    let status = if split {
        match wire::decode_frontend(frame)? {
            // Statement by statement needs the client's own text: not for one in another encoding.
            Some(Frontend::Query(Query {
                sql: Cow::Borrowed(sql),
                ..
            })) => split::run(&mut io, pre, &cfg, sql, status).await,
            _ => hold::run_query(&mut io, pre, &cfg, (frame, closes, how), status).await,
        }
    } else {
        hold::run_query(&mut io, pre, &cfg, (frame, closes, how), status).await
    };
    // What the server reported on the way (also when the session ends in error).
    *lock(lexing) = io.lexing;
    pre.record_reports(std::mem::take(&mut io.runs));
    let status = status?;
    lock(in_flight).ready(status);
    Ok(())
}

/// How long a session that ends with an error waits for the rest of a server frame the client
/// has begun to receive.
const FINISH_FRAME_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The server-to-client direction's state, kept outside its future so that, when the session
/// ends, the proxy knows whether the client stands at a frame boundary.
#[derive(Default)]
struct Downstream {
    buf: BytesMut,
    scanner: Scanner,
    /// Bytes at the start of `buf` already scanned and still to be written to the client.
    ready: usize,
    /// The session has PRE hooks: reports of runs the database decided for writes the proxy
    /// streamed (`pgfire.pre_decide`) are taken out of the stream into `runs`.
    pre: bool,
    runs: Vec<RunReport>,
    /// The backend's BackendKeyData (process id and secret key; PRE hooks on), for the
    /// proxy's own CancelRequest ([`Cancel`]).
    key: Option<Vec<u8>>,
}

impl Downstream {
    /// Write the scanned bytes; cancel-safe (progress is recorded after every write). Flushed,
    /// so that nothing waits in a TLS session's buffer while the proxy waits for the server (a
    /// no-op on plain sockets).
    async fn write_ready(&mut self, cw: &mut (impl AsyncWrite + Unpin)) -> std::io::Result<()> {
        if self.ready == 0 {
            return Ok(());
        }
        while self.ready > 0 {
            let n = cw.write(&self.buf[..self.ready]).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            self.buf.advance(n);
            self.ready -= n;
        }
        cw.flush().await
    }

    /// Forward the rest of the frame the client is in the middle of, and nothing after it.
    async fn finish_frame(
        &mut self,
        ur: &mut (impl AsyncRead + Unpin),
        cw: &mut (impl AsyncWrite + Unpin),
    ) -> std::io::Result<()> {
        loop {
            self.write_ready(cw).await?;
            if self.scanner.remaining == 0 {
                return Ok(());
            }
            if self.buf.is_empty() && ur.read_buf(&mut self.buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let n = self.scanner.remaining.min(self.buf.len());
            self.scanner.remaining -= n;
            self.ready = n;
        }
    }
}

async fn client_to_server(
    cr: &mut (impl AsyncRead + Unpin),
    uw: &mut (impl AsyncWrite + Unpin),
    up: &mut Upside,
    hook: &dyn Hook,
    pre: Option<&PreHooks>,
    (in_flight, lexing): Shared<'_>,
    rewrites: &Rewrites,
) -> Result<Flow, Fatal> {
    let inspect_frontend = hook.wants_frontend();
    let note = |list: Vec<(String, BytesMut)>| {
        if list.is_empty() {
            return;
        }
        let mut all = rewrites.lock().unwrap_or_else(|p| p.into_inner());
        for r in list {
            if all.len() >= MAX_REWRITES {
                all.remove(0);
            }
            all.push(r);
        }
    };
    loop {
        // The configuration in force for the statements of this read.
        let cfg = pre.map(|p| p.config()).filter(|c| c.active());
        if cfg.is_none() && up.units.pending() {
            let (bytes, list) = up.units.take_raw();
            note(list);
            send(uw, &bytes).await?;
        }
        let gathering = up.units.pending();
        let mut gated = None;
        let mut saw_query = false;
        let mut binding_refused = false;
        let check_binding = up.tls_upstream;
        let metrics = up.metrics.clone();
        // Without PRE hooks every statement streams; with them the gate says (below).
        let streams_all = cfg.is_none();
        // Whether everything before the last frame checked was answered (see lexing).
        let settled = AtomicBool::new(true);
        let strings = || lock(lexing).strings(settled.load(Ordering::Relaxed));
        let check = |tag| {
            if wire::is_frontend_tag(tag) {
                if streams_all && matches!(tag, b'Q' | b'P') {
                    metrics.statement(Action::Streamed);
                }
                let mut f = lock(in_flight);
                settled.store(f.answered(), Ordering::Relaxed);
                f.sent(tag);
                Ok(())
            } else {
                Err(WireError::UnknownTag(tag))
            }
        };
        let inspect = |frame: &[u8]| {
            if frame[0] == b'p' {
                binding_refused = scram::client_expects_binding(frame);
                return Ok(binding_refused);
            }
            if !inspect_frontend && cfg.is_some() && matches!(frame[0], b'P' | b'B') {
                // Decoded (and checked) where the batch is gathered.
                return Ok(true);
            }
            let msg = wire::decode_frontend(frame)?;
            if let (true, Some(m)) = (inspect_frontend, &msg) {
                hook.frontend(m);
            }
            let Some(cfg) = &cfg else {
                return Ok(false);
            };
            // With PRE hooks, extended-protocol batches are gathered (see pre::unit).
            if unit::is_extended(frame[0]) || gathering {
                return Ok(true);
            }
            let gate = match &msg {
                Some(Frontend::Query(q)) => {
                    saw_query = true;
                    let gate = gate::query(cfg, strings(), &q.sql);
                    metrics.statement(gate.action());
                    gate
                }
                _ => Gate::Pass,
            };
            let stop = !matches!(gate, Gate::Pass);
            gated = Some(gate);
            Ok(stop)
        };
        let active = cfg.is_some();
        let whole = |t| {
            (check_binding && t == b'p')
                || (inspect_frontend && matches!(t, b'Q' | b'P' | b'B'))
                || (active && (t == b'Q' || unit::is_extended(t) || gathering))
        };
        let (n, stopped) = up.scanner.scan(&up.buf, check, whole, inspect)?;
        if saw_query {
            up.units.query_sent();
        }
        if binding_refused {
            return Err(Fatal {
                code: wire::PROTOCOL_VIOLATION,
                message: "SCRAM channel binding cannot pass through pgfire's proxy when it \
                          reaches the database over TLS: connect with channel_binding=disable, \
                          or to the proxy without TLS"
                    .into(),
            });
        }
        if n > 0 {
            send(uw, &up.buf[..n]).await?;
            up.buf.advance(n);
        }
        if stopped {
            let len = wire::frame_header(&up.buf)?.map_or(up.buf.len(), |(_, l)| l);
            if let (Some(cfg), Some(pre), true) = (&cfg, pre, unit::is_extended(up.buf[0])) {
                let unit = (&up.buf[..len], strings());
                let next = up.units.push(cfg, unit, &|| pre.next_statement(), &metrics);
                up.buf.advance(len);
                match next? {
                    Next::Gather => {}
                    Next::Forward(bytes, list) => {
                        note(list);
                        send(uw, &bytes).await?;
                    }
                    Next::Hold { batch, closes, how } => {
                        return Ok(Flow::Held {
                            bytes: batch,
                            closes,
                            how,
                        })
                    }
                }
                continue;
            }
            let frame = up.buf.split_to(len);
            if let (Some(cfg), Some(pre)) = (&cfg, pre) {
                if up.units.pending() {
                    // Another kind of message interrupts a batch before its Sync.
                    if let Next::Forward(bytes, list) =
                        up.units.end(false, &|| pre.next_statement())
                    {
                        note(list);
                        send(uw, &bytes).await?;
                    }
                    if let Some(Frontend::Query(q)) = wire::decode_frontend(&frame)? {
                        let gate = gate::query(cfg, strings(), &q.sql);
                        metrics.statement(gate.action());
                        gated = Some(gate);
                    }
                }
            }
            match gated {
                Some(Gate::Hold(how)) => {
                    up.units.query_sent();
                    return Ok(Flow::Held {
                        bytes: frame,
                        closes: BytesMut::new(),
                        how,
                    });
                }
                Some(Gate::Replace {
                    frame: instead,
                    rewrite,
                }) => {
                    note(rewrite.into_iter().collect());
                    send(uw, &instead).await?;
                }
                Some(Gate::Pass) | None => send(uw, &frame).await?,
            }
            if frame[0] == b'Q' {
                up.units.query_sent();
            }
            continue;
        }
        if up.buf.capacity() - up.buf.len() < READ_CHUNK / 4 {
            up.buf.reserve(READ_CHUNK);
        }
        if cr.read_buf(&mut up.buf).await.map_err(io_fatal)? == 0 {
            return Ok(Flow::Left);
        }
    }
}

/// Scan what the server sent: note every ReadyForQuery, rewrite the errors [`Rewrites`] names.
fn scan_down(
    down: &mut Downstream,
    (in_flight, lexing): Shared<'_>,
    rewrites: &Rewrites,
) -> Result<(), WireError> {
    loop {
        let pending = !rewrites
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty();
        let mut replacement = None;
        let notices = down.pre;
        let runs = &mut down.runs;
        let key = &mut down.key;
        let (n, stopped) = down.scanner.scan(
            &down.buf[down.ready..],
            |_| Ok(()),
            |t| {
                t == b'Z'
                    || t == b'R'
                    || t == b'S'
                    || ((pending || notices) && t == b'E')
                    || (notices && (t == b'N' || t == b'K'))
            },
            |frame| {
                if frame[0] == b'K' {
                    *key = Some(frame[5..].to_vec());
                    return Ok(false);
                }
                if frame[0] == b'S' {
                    lock(lexing).observe(frame);
                    return Ok(false);
                }
                if frame[0] == b'R' {
                    replacement = scram::without_channel_binding(frame);
                    return Ok(replacement.is_some());
                }
                match wire::decode_backend(frame)? {
                    Some(Backend::ReadyForQuery(s)) => lock(in_flight).ready(s),
                    Some(Backend::NoticeResponse(n))
                        if n.code == rows::RUN_CODE && n.message == rows::RUN_MESSAGE =>
                    {
                        match rows::decode_runs(n.detail) {
                            Ok(r) => runs.extend(r),
                            Err(err) => tracing::warn!(error = %err, "unreadable PRE run report"),
                        }
                        replacement = Some(BytesMut::new());
                        return Ok(true);
                    }
                    Some(Backend::ErrorResponse(e)) => {
                        let mut list = rewrites.lock().unwrap_or_else(|p| p.into_inner());
                        let hit = list.iter().position(|(marker, _)| {
                            e.message
                                .windows(marker.len())
                                .any(|w| w == marker.as_bytes())
                        });
                        if let Some(i) = hit {
                            replacement = Some(list.remove(i).1);
                            return Ok(true);
                        }
                        if let Some(clean) = hold::decided_block(frame) {
                            replacement = Some(BytesMut::from(&clean[..]));
                            return Ok(true);
                        }
                    }
                    _ => {}
                }
                Ok(false)
            },
        )?;
        down.ready += n;
        let Some(new) = replacement.filter(|_| stopped) else {
            return Ok(());
        };
        let start = down.ready;
        let len = wire::frame_header(&down.buf[start..])?.map_or(0, |(_, l)| l);
        let tail = down.buf.split_off(start + len);
        down.buf.truncate(start);
        down.buf.extend_from_slice(&new);
        down.buf.extend_from_slice(&tail);
        down.ready += new.len();
    }
}

async fn server_to_client(
    ur: &mut (impl AsyncRead + Unpin),
    cw: &mut (impl AsyncWrite + Unpin),
    down: &mut Downstream,
    (in_flight, lexing): Shared<'_>,
    rewrites: &Rewrites,
    drain: &CancellationToken,
    (config, pre): (&ProxyConfig, Option<&PreHooks>),
) -> Result<(), Fatal> {
    down.buf.reserve(READ_CHUNK);
    let mut deadline: Option<tokio::time::Instant> = None;
    let shutdown_error = || Fatal {
        code: wire::ADMIN_SHUTDOWN,
        message: "terminating connection due to administrator command".into(),
    };
    loop {
        scan_down(down, (in_flight, lexing), rewrites)?;
        if let (false, Some(pre)) = (down.runs.is_empty(), pre) {
            pre.record_reports(std::mem::take(&mut down.runs));
        }
        down.write_ready(cw).await.map_err(io_fatal)?;
        // Draining: close once nothing is in flight, no transaction is open and the client has
        // everything the server sent.
        if deadline.is_some() && down.buf.is_empty() && lock(in_flight).is_idle() {
            return Err(shutdown_error());
        }
        if down.buf.capacity() - down.buf.len() < READ_CHUNK / 4 {
            down.buf.reserve(READ_CHUNK);
        }
        tokio::select! {
            r = ur.read_buf(&mut down.buf) => {
                if r.map_err(io_fatal)? == 0 {
                    return Ok(()); // the server closed (it sent its own FATAL, if any)
                }
            }
            _ = drain.cancelled(), if deadline.is_none() => {
                deadline = Some(tokio::time::Instant::now() + config.shutdown_timeout);
            }
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                return Err(shutdown_error());
            }
        }
    }
}

/// The shared session state; a panic elsewhere while it was held cannot leave it half-updated
/// (its updates do not panic), so a poisoned lock is used as is.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn scanner_forwards_pass_through_bytes_early_and_holds_inspected_frames() {
        let mut s = Scanner::default();
        let mut stream = frame(b'd', &[7u8; 100]);
        stream.extend(frame(b'Q', b"SELECT 1\0"));
        let ok = |_| Ok(());
        let q = |t| t == b'Q';
        let mut seen = Vec::new();
        // Half a CopyData frame is forwardable at once.
        assert_eq!(s.scan(&stream[..50], ok, q, |_| Ok(false)).unwrap().0, 50);
        // Its rest plus a partial Query: only the CopyData rest.
        assert_eq!(
            s.scan(&stream[50..110], ok, q, |_| Ok(false)).unwrap().0,
            55
        );
        // The whole Query.
        assert_eq!(
            s.scan(&stream[105..], ok, q, |f| {
                seen.push(f.to_vec());
                Ok(false)
            })
            .unwrap()
            .0,
            stream.len() - 105
        );
        assert_eq!(seen, vec![frame(b'Q', b"SELECT 1\0")]);
    }

    #[test]
    fn scanner_rejects_bad_frames() {
        let mut s = Scanner::default();
        let check = |t| {
            if wire::is_frontend_tag(t) {
                Ok(())
            } else {
                Err(WireError::UnknownTag(t))
            }
        };
        assert!(matches!(
            s.scan(&frame(b'z', b""), check, |_| false, |_| Ok(false)),
            Err(WireError::UnknownTag(b'z'))
        ));
        let mut s = Scanner::default();
        assert!(s
            .scan(&[b'Q', 0, 0, 0, 1], check, |_| true, |_| Ok(false))
            .is_err());
        let mut s = Scanner::default();
        assert!(s
            .scan(
                &frame(b'Q', b"no terminator"),
                check,
                |_| true,
                |f| wire::decode_frontend(f).map(|_| false)
            )
            .is_err());
    }
}
