//! A `replication=database` connection: startup, authentication (trust, cleartext, md5,
//! SCRAM-SHA-256), `START_REPLICATION`, and the CopyBoth stream of XLogData and keepalives with
//! standby status updates. tokio-postgres has no CopyBoth, so this speaks the protocol itself
//! with postgres-protocol's codec.

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::escape::escape_identifier;
use postgres_protocol::message::backend::{ErrorFields, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_postgres::config::Host;
use tokio_postgres::error::SqlState;

use crate::replication::position::Lsn;

/// Microseconds from the Unix epoch to the PostgreSQL epoch (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// TCP keepalive on the replication socket: probes after this much idle time, then every
/// `KEEPALIVE_INTERVAL`, so the kernel notices a peer that vanished without a reset.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("cannot reach the database: {0}")]
    Io(#[from] std::io::Error),
    #[error("{message} (SQLSTATE {code})")]
    Server {
        code: String,
        message: String,
        hint: Option<String>,
    },
    #[error("authentication: {0}")]
    Auth(String),
    #[error("replication protocol: {0}")]
    Protocol(String),
    #[error("connection closed by the server")]
    Closed,
    /// The walsender finished the stream (CopyDone or CommandComplete): the server is stopping
    /// or the walsender was told to stop.
    #[error("the server ended the replication stream (is the database shutting down?)")]
    Ended,
    #[error("invalid connection string: {0}")]
    Config(String),
    #[error("TLS with the database: {0}")]
    Tls(String),
}

impl ConnError {
    /// Whether retrying later may help (network, server restart, slot busy) or not (bad
    /// password, no slot or publication, server too old, a stream pgfire cannot read).
    pub fn is_transient(&self) -> bool {
        match self {
            ConnError::Io(_) | ConnError::Closed | ConnError::Ended => true,
            ConnError::Server { code, .. } => server_error_is_transient(code),
            ConnError::Protocol(_)
            | ConnError::Auth(_)
            | ConnError::Config(_)
            | ConnError::Tls(_) => false,
        }
    }

    /// The SQLSTATE of a server error.
    pub fn code(&self) -> Option<&str> {
        match self {
            ConnError::Server { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The SQLSTATE, message and hint of an ErrorResponse.
    fn server(mut fields: ErrorFields<'_>) -> ConnError {
        let (mut code, mut message, mut hint) = (String::from("XX000"), String::new(), None);
        while let Ok(Some(f)) = fallible_iterator::FallibleIterator::next(&mut fields) {
            match f.type_() {
                b'C' => code = String::from_utf8_lossy(f.value_bytes()).into_owned(),
                b'M' => message = String::from_utf8_lossy(f.value_bytes()).into_owned(),
                b'H' => hint = Some(String::from_utf8_lossy(f.value_bytes()).into_owned()),
                _ => {}
            }
        }
        ConnError::Server {
            code,
            message,
            hint,
        }
    }
}

/// Connection exceptions (08), operator intervention such as shutdown (57), insufficient
/// resources (53), a slot in use by another process (55006), and transaction rollbacks (40):
/// later may work. Everything else (authentication, a missing slot or publication, an unsupported
/// server, wrong data) fails the same way on every try.
fn server_error_is_transient(code: &str) -> bool {
    ["08", "57", "53", "40"].iter().any(|c| code.starts_with(c))
        || code == SqlState::OBJECT_IN_USE.code()
}

/// Ask the server for TLS (SSLRequest): true when it agreed; plain when it declined and the
/// mode allows that, else an error.
async fn start_tls(
    s: &mut tokio::net::TcpStream,
    mode: crate::db::tls::SslMode,
) -> Result<bool, ConnError> {
    let mut req = [0u8; 8];
    req[..4].copy_from_slice(&8i32.to_be_bytes());
    req[4..].copy_from_slice(&crate::wire::SSL_REQUEST.to_be_bytes());
    s.write_all(&req).await?;
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => Ok(true),
        b'N' if !mode.requires_tls() => Ok(false),
        b'N' => Err(ConnError::Tls(
            "the server does not accept TLS connections, and sslmode requires TLS".into(),
        )),
        other => Err(ConnError::Protocol(format!(
            "unexpected answer {other:#x} to SSLRequest"
        ))),
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// One message of the replication stream.
#[derive(Debug)]
pub enum ReplicationMessage {
    /// WAL data: a pgoutput message starting at `wal_start`.
    XLogData {
        wal_start: Lsn,
        wal_end: Lsn,
        data: Bytes,
    },
    /// The server's position; `reply` asks for a status update now.
    Keepalive { wal_end: Lsn, reply: bool },
}

pub struct ReplicationConn {
    stream: Box<dyn Stream>,
    read: BytesMut,
    write: BytesMut,
    pub server_version: u32,
    /// The TCP socket under the stream (with TLS or without; it lives as long as `stream`).
    tcp: Option<RawFd>,
    /// Reads wait for [`SEGMENT_LOWAT`] bytes (see [`ReplicationConn::batch_reads`]).
    batching: bool,
}

/// While reads are batched, the kernel wakes pgfire once this many bytes have come, not per
/// change the walsender sends...
const SEGMENT_LOWAT: i32 = 16 * 1024;
/// ...and a read waits at most this long for them (the last bytes of a burst).
const SEGMENT_WAIT: Duration = Duration::from_millis(5);

/// SO_RCVLOWAT: poll and epoll report the socket readable once `bytes` are queued (a
/// non-blocking read still returns what is there). Lowering it wakes a waiting reader when
/// enough is queued already (Linux's `tcp_set_rcvlowat`).
#[allow(unsafe_code)]
fn set_rcvlowat(fd: RawFd, bytes: i32) -> std::io::Result<()> {
    let value: libc::c_int = bytes;
    // SAFETY: `fd` is the open socket of this connection's stream, and the option's value is
    // a c_int whose size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl ReplicationConn {
    /// Connect and authenticate as a logical replication connection to the URL's database.
    pub async fn connect(url: &str, timeout: Duration) -> Result<ReplicationConn, ConnError> {
        let tls = crate::db::tls::settings(url).map_err(|e| ConnError::Config(e.to_string()))?;
        let config: tokio_postgres::Config = tls
            .stripped
            .parse()
            .map_err(|e: tokio_postgres::Error| ConnError::Config(e.to_string()))?;
        tokio::time::timeout(timeout, Self::connect_config(&config, &tls))
            .await
            .map_err(|_| {
                ConnError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connect timed out",
                ))
            })?
    }

    async fn connect_config(
        config: &tokio_postgres::Config,
        tls: &crate::db::tls::TlsSettings,
    ) -> Result<ReplicationConn, ConnError> {
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let mut tcp = None;
        let stream: Box<dyn Stream> = match config.get_hosts().first() {
            Some(Host::Tcp(host)) => {
                let mut s = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                s.set_nodelay(true)?;
                tcp = Some(s.as_raw_fd());
                let keepalive = socket2::TcpKeepalive::new()
                    .with_time(KEEPALIVE_IDLE)
                    .with_interval(KEEPALIVE_INTERVAL);
                socket2::SockRef::from(&s).set_tcp_keepalive(&keepalive)?;
                match tls
                    .client_config()
                    .map_err(|e| ConnError::Config(e.to_string()))?
                {
                    Some(client) => match start_tls(&mut s, tls.mode).await? {
                        true => {
                            let name = rustls::pki_types::ServerName::try_from(host.clone())
                                .map_err(|e| ConnError::Config(format!("host {host:?}: {e}")))?;
                            let stream = tokio_rustls::TlsConnector::from(client)
                                .connect(name, s)
                                .await
                                .map_err(|e| ConnError::Tls(e.to_string()))?;
                            Box::new(stream)
                        }
                        false => Box::new(s),
                    },
                    None => Box::new(s),
                }
            }
            Some(Host::Unix(dir)) => Box::new(
                tokio::net::UnixStream::connect(dir.join(format!(".s.PGSQL.{port}"))).await?,
            ),
            None => Box::new(
                tokio::net::UnixStream::connect(format!("/var/run/postgresql/.s.PGSQL.{port}"))
                    .await?,
            ),
        };
        let user = config
            .get_user()
            .map(str::to_string)
            .or_else(|| std::env::var("USER").ok())
            .ok_or_else(|| ConnError::Config("no user name".into()))?;
        let dbname = config.get_dbname().unwrap_or(&user).to_string();
        let mut conn = ReplicationConn {
            stream,
            read: BytesMut::with_capacity(256 * 1024),
            write: BytesMut::with_capacity(1024),
            server_version: 0,
            tcp,
            batching: false,
        };
        let params = [
            ("user", user.as_str()),
            ("database", dbname.as_str()),
            ("replication", "database"),
            ("application_name", "pgfire"),
            // pgoutput sends names and text values in the client encoding: always UTF-8.
            ("client_encoding", "UTF8"),
            // Value rendering relies on these: ISO dates in UTC, ISO 8601 intervals, exact floats.
            ("DateStyle", "ISO, YMD"),
            ("TimeZone", "UTC"),
            ("IntervalStyle", "iso_8601"),
            ("extra_float_digits", "3"),
        ];
        frontend::startup_message(params.iter().copied(), &mut conn.write)?;
        conn.flush().await?;
        conn.authenticate(&user, config.get_password()).await?;
        loop {
            match conn.next_backend().await? {
                Message::ReadyForQuery(_) => break,
                Message::ParameterStatus(p) if p.name()? == "server_version" => {
                    conn.server_version = parse_server_version(p.value()?);
                }
                Message::ErrorResponse(e) => return Err(ConnError::server(e.fields())),
                _ => {}
            }
        }
        Ok(conn)
    }

    async fn authenticate(&mut self, user: &str, password: Option<&[u8]>) -> Result<(), ConnError> {
        let need_password = || {
            ConnError::Auth(
                "the server asks for a password and the connection string has none".into(),
            )
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            match self.next_backend().await? {
                Message::AuthenticationOk => return Ok(()),
                Message::AuthenticationCleartextPassword => {
                    frontend::password_message(
                        password.ok_or_else(need_password)?,
                        &mut self.write,
                    )?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let hash = postgres_protocol::authentication::md5_hash(
                        user.as_bytes(),
                        password.ok_or_else(need_password)?,
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.write)?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut mechs = body.mechanisms();
                    let mut has_scram = false;
                    while let Some(m) = fallible_iterator::FallibleIterator::next(&mut mechs)? {
                        has_scram |= m == SCRAM_SHA_256;
                    }
                    if !has_scram {
                        return Err(ConnError::Auth(
                            "the server offers no SASL mechanism pgfire supports".into(),
                        ));
                    }
                    let s = ScramSha256::new(
                        password.ok_or_else(need_password)?,
                        ChannelBinding::unsupported(),
                    );
                    frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut self.write)?;
                    scram = Some(s);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| ConnError::Protocol("unexpected SASL continue".into()))?;
                    s.update(body.data())
                        .map_err(|e| ConnError::Auth(e.to_string()))?;
                    frontend::sasl_response(s.message(), &mut self.write)?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| ConnError::Protocol("unexpected SASL final".into()))?;
                    s.finish(body.data())
                        .map_err(|e| ConnError::Auth(e.to_string()))?;
                    continue;
                }
                Message::ErrorResponse(e) => return Err(ConnError::server(e.fields())),
                _ => return Err(ConnError::Auth("unsupported authentication method".into())),
            }
            self.flush().await?;
        }
    }

    /// Run a replication command with the simple query protocol and return its rows as text.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, ConnError> {
        frontend::query(sql, &mut self.write)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.next_backend().await? {
                Message::DataRow(row) => {
                    let buf = row.buffer();
                    let mut ranges = row.ranges();
                    let mut values = Vec::new();
                    while let Some(r) = fallible_iterator::FallibleIterator::next(&mut ranges)? {
                        values.push(r.map(|r| String::from_utf8_lossy(&buf[r]).into_owned()));
                    }
                    rows.push(values);
                }
                Message::ErrorResponse(e) => error = Some(ConnError::server(e.fields())),
                Message::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    /// Start logical replication from `slot` at `start` (0/0: where the slot left off).
    pub async fn start_replication(
        &mut self,
        slot: &str,
        start: Lsn,
        options: &str,
    ) -> Result<(), ConnError> {
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {start} ({options})",
            escape_identifier(slot)
        );
        frontend::query(&sql, &mut self.write)?;
        self.flush().await?;
        loop {
            // postgres-protocol does not know CopyBothResponse ('W'): recognise it by its header.
            self.fill_frame().await?;
            if self.read[0] == b'W' {
                let len = postgres_protocol::message::backend::Header::parse(&self.read)?
                    .map(|h| h.len() as usize + 1)
                    .unwrap_or(self.read.len());
                self.read.advance(len);
                return Ok(());
            }
            match self.next_backend().await? {
                Message::ErrorResponse(e) => return Err(ConnError::server(e.fields())),
                Message::NoticeResponse(_) => {}
                other => {
                    return Err(ConnError::Protocol(format!(
                        "unexpected reply to START_REPLICATION: {}",
                        tag_name(&other)
                    )))
                }
            }
        }
    }

    /// The next XLogData or keepalive of the stream.
    pub async fn next_message(&mut self) -> Result<ReplicationMessage, ConnError> {
        loop {
            match self.next_backend().await? {
                Message::CopyData(body) => {
                    let mut data = body.into_bytes();
                    if data.is_empty() {
                        return Err(ConnError::Protocol("empty CopyData".into()));
                    }
                    match data[0] {
                        b'w' if data.len() >= 25 => {
                            data.advance(1);
                            let wal_start = Lsn(data.get_u64());
                            let wal_end = Lsn(data.get_u64());
                            data.advance(8); // send time
                            return Ok(ReplicationMessage::XLogData {
                                wal_start,
                                wal_end,
                                data,
                            });
                        }
                        b'k' if data.len() >= 18 => {
                            let wal_end = Lsn(u64::from_be_bytes(
                                data[1..9].try_into().unwrap_or_default(),
                            ));
                            return Ok(ReplicationMessage::Keepalive {
                                wal_end,
                                reply: data[17] != 0,
                            });
                        }
                        t => {
                            return Err(ConnError::Protocol(format!(
                                "unknown CopyData message {:?} of {} bytes",
                                t as char,
                                data.len()
                            )))
                        }
                    }
                }
                Message::ErrorResponse(e) => return Err(ConnError::server(e.fields())),
                // A walsender that finishes (server shutdown) ends the copy with CommandComplete,
                // a client-initiated end with CopyDone; either way the stream is over.
                Message::CopyDone | Message::CommandComplete(_) | Message::ReadyForQuery(_) => {
                    return Err(ConnError::Ended)
                }
                Message::NoticeResponse(_) | Message::ParameterStatus(_) => {}
                other => {
                    return Err(ConnError::Protocol(format!(
                        "unexpected message in replication stream: {}",
                        tag_name(&other)
                    )))
                }
            }
        }
    }

    /// Send a standby status update: everything up to `written` received, up to `flushed` settled.
    pub async fn send_status(
        &mut self,
        written: Lsn,
        flushed: Lsn,
        reply: bool,
    ) -> Result<(), ConnError> {
        let mut msg = BytesMut::with_capacity(34);
        msg.put_u8(b'r');
        msg.put_u64(written.0);
        msg.put_u64(flushed.0);
        msg.put_u64(flushed.0);
        msg.put_i64(pg_now_micros());
        msg.put_u8(reply as u8);
        frontend::CopyData::new(msg.freeze())?.write(&mut self.write);
        self.flush().await
    }

    async fn flush(&mut self) -> Result<(), ConnError> {
        if !self.write.is_empty() {
            self.stream.write_all(&self.write).await?;
            self.write.clear();
            self.stream.flush().await?;
        }
        Ok(())
    }

    /// Batch reads (`on`) while a burst of changes comes in (a streamed transaction's segment,
    /// none of whose changes can be delivered before its commit, or a large transaction),
    /// sent by the walsender one system call each. Woken per change, pgfire spent more CPU in
    /// the kernel than on the changes, and every wake-up cost the walsender too. A read then
    /// waits for
    /// [`SEGMENT_LOWAT`] bytes, or [`SEGMENT_WAIT`], whichever comes first. TCP only (a Unix
    /// socket's readiness ignores the mark).
    pub fn batch_reads(&mut self, on: bool) {
        if on == self.batching {
            return;
        }
        if let Some(fd) = self.tcp {
            match set_rcvlowat(fd, if on { SEGMENT_LOWAT } else { 1 }) {
                Ok(()) => self.batching = on,
                Err(err) => tracing::debug!(error = %err, "SO_RCVLOWAT not set"),
            }
        }
    }

    /// Whether a whole message is already buffered (reading it will not wait on the network).
    pub fn has_buffered_message(&self) -> bool {
        match postgres_protocol::message::backend::Header::parse(&self.read) {
            Ok(Some(h)) => self.read.len() > h.len() as usize,
            _ => false,
        }
    }

    /// Read until one whole message is buffered.
    async fn fill_frame(&mut self) -> Result<(), ConnError> {
        while !self.has_buffered_message() {
            self.read.reserve(64 * 1024);
            if self.stream.read_buf(&mut self.read).await? == 0 {
                return Err(ConnError::Closed);
            }
        }
        Ok(())
    }

    async fn next_backend(&mut self) -> Result<Message, ConnError> {
        loop {
            if let Some(msg) = Message::parse(&mut self.read)? {
                return Ok(msg);
            }
            if self.read.capacity() - self.read.len() < 64 * 1024 {
                self.read.reserve(256 * 1024);
            }
            let read = if self.batching {
                match tokio::time::timeout(SEGMENT_WAIT, self.stream.read_buf(&mut self.read)).await
                {
                    Ok(read) => read?,
                    Err(_) => {
                        // Fewer bytes than the mark: lowering it signals what is queued.
                        self.batch_reads(false);
                        continue;
                    }
                }
            } else {
                self.stream.read_buf(&mut self.read).await?
            };
            if read == 0 {
                return Err(ConnError::Closed);
            }
        }
    }

    /// Close the stream politely (CopyDone + Terminate); errors are ignored.
    pub async fn close(mut self) {
        frontend::copy_done(&mut self.write);
        frontend::terminate(&mut self.write);
        let _ = self.flush().await;
    }
}

fn pg_now_micros() -> i64 {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    unix - PG_EPOCH_OFFSET_MICROS
}

fn parse_server_version(v: &str) -> u32 {
    // server_version looks like "15.19 (Debian 15.19-0+deb12u1)"; keep the major number.
    let major: u32 = v
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if major >= 1000 {
        major / 10000
    } else {
        major
    }
}

fn tag_name(msg: &Message) -> &'static str {
    match msg {
        Message::RowDescription(_) => "RowDescription",
        Message::DataRow(_) => "DataRow",
        Message::CommandComplete(_) => "CommandComplete",
        Message::ReadyForQuery(_) => "ReadyForQuery",
        Message::CopyOutResponse(_) => "CopyOutResponse",
        Message::CopyInResponse(_) => "CopyInResponse",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions() {
        assert_eq!(parse_server_version("15.19 (Debian 15.19-0+deb12u1)"), 15);
        assert_eq!(parse_server_version("17devel"), 17);
        assert_eq!(parse_server_version("150019"), 15);
        assert_eq!(parse_server_version("garbage"), 0);
    }

    /// What a walsender sends when it finishes in a shutdown (CommandComplete "COPY 0") ends the
    /// stream as `Ended`, not as an unexpected message.
    #[tokio::test]
    async fn the_walsender_finishing_ends_the_stream() {
        let (ours, mut server) = tokio::io::duplex(1024);
        let mut conn = ReplicationConn {
            stream: Box::new(ours),
            read: BytesMut::new(),
            write: BytesMut::new(),
            server_version: 15,
            tcp: None,
            batching: false,
        };
        let mut frame = BytesMut::new();
        frame.put_u8(b'C');
        frame.put_i32(4 + 7);
        frame.put_slice(b"COPY 0\0");
        server.write_all(&frame).await.unwrap();
        assert!(matches!(conn.next_message().await, Err(ConnError::Ended)));
        server.write_all(&[b'c', 0, 0, 0, 4]).await.unwrap();
        assert!(matches!(conn.next_message().await, Err(ConnError::Ended)));
        drop(server);
        assert!(matches!(conn.next_message().await, Err(ConnError::Closed)));
    }

    /// An XLogData frame of `n` bytes of data.
    fn xlog(n: usize) -> BytesMut {
        let mut frame = BytesMut::new();
        frame.put_u8(b'd');
        frame.put_i32((4 + 25 + n) as i32);
        frame.put_u8(b'w');
        frame.put_u64(1);
        frame.put_u64(2);
        frame.put_u64(0);
        frame.put_bytes(b'x', n);
        frame
    }

    #[tokio::test]
    async fn batched_reads_wait_for_the_mark_but_never_hold_the_last_bytes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ours = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let mut conn = ReplicationConn {
            tcp: Some(ours.as_raw_fd()),
            stream: Box::new(ours),
            read: BytesMut::new(),
            write: BytesMut::new(),
            server_version: 15,
            batching: false,
        };
        conn.batch_reads(true);
        assert!(conn.batching, "SO_RCVLOWAT is set on a TCP socket");
        // A burst larger than the mark arrives whole.
        let burst: Vec<u8> = (0..40).flat_map(|_| xlog(1000).to_vec()).collect();
        server.write_all(&burst).await.unwrap();
        for _ in 0..40 {
            let m = conn.next_message().await.unwrap();
            assert!(
                matches!(m, ReplicationMessage::XLogData { ref data, .. } if data.len() == 1000)
            );
        }
        // The last bytes of a burst, far below the mark, then silence: read after the wait,
        // not held until more comes.
        conn.batch_reads(true);
        server.write_all(&xlog(10)).await.unwrap();
        let m = tokio::time::timeout(Duration::from_secs(5), conn.next_message())
            .await
            .expect("the bytes below the mark are read")
            .unwrap();
        assert!(matches!(m, ReplicationMessage::XLogData { ref data, .. } if data.len() == 10));
        assert!(!conn.batching, "the mark is lowered once the wait is over");
        // Unbatched, a small message is read as it comes.
        server.write_all(&xlog(3)).await.unwrap();
        let m = conn.next_message().await.unwrap();
        assert!(matches!(m, ReplicationMessage::XLogData { ref data, .. } if data.len() == 3));
        // A socket that is not TCP: nothing to set, reads as before.
        let (duplex, _peer) = tokio::io::duplex(64);
        let mut other = ReplicationConn {
            stream: Box::new(duplex),
            read: BytesMut::new(),
            write: BytesMut::new(),
            server_version: 15,
            tcp: None,
            batching: false,
        };
        other.batch_reads(true);
        assert!(!other.batching);
    }

    #[test]
    fn retryable_errors() {
        let server = |code: &str| ConnError::Server {
            code: code.into(),
            message: String::new(),
            hint: None,
        };
        for code in ["57P01", "57P03", "08006", "53300", "55006"] {
            assert!(server(code).is_transient(), "{code}");
        }
        // No slot or publication, bad password, no such database, server too old.
        for code in ["42704", "28P01", "3D000", "0A000", "55000"] {
            assert!(!server(code).is_transient(), "{code}");
        }
        assert!(ConnError::Ended.is_transient());
        assert!(!ConnError::Protocol("x".into()).is_transient());
    }
}
