//! One client session: the startup phase (SSL/GSS negotiation, cancel requests, the startup
//! packet, marked `pgfire.proxied` when PRE hooks watch its database), the connection to the
//! database, then the relay ([`super::relay`]). Error and notice frames are relayed as the bytes
//! they are: in the client's encoding, which need not be UTF-8.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::relay::relay;
use super::upstream;
use super::ProxyConfig;
use crate::wire::{self, Startup, WireError};

/// The PRE hooks' seam: sees every Query, Parse and Bind a client sends, before it is forwarded.
pub trait Hook: Send + Sync {
    /// Whether this hook looks at Query/Parse/Bind at all; when not, they stream through
    /// undecoded like every other message.
    fn wants_frontend(&self) -> bool {
        true
    }
    fn frontend(&self, _msg: &wire::Frontend<'_>) {}
}

/// The hook of a proxy without PRE functions.
pub struct NoHook;
impl Hook for NoHook {
    fn wants_frontend(&self) -> bool {
        false
    }
}

/// A connection end: the client's (plain or TLS) or the database's (TCP, TLS or Unix socket).
pub(super) enum Conn {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
    /// The client's TLS, terminated here.
    ClientTls(Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>),
    /// TLS to the database.
    DbTls(Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>),
    /// A placeholder while the real stream is moved.
    Gone,
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr, $gone:expr) => {
        match $self.get_mut() {
            Conn::Tcp($s) => {
                let $s = std::pin::Pin::new($s);
                $e
            }
            Conn::Unix($s) => {
                let $s = std::pin::Pin::new($s);
                $e
            }
            Conn::ClientTls($s) => {
                let $s = std::pin::Pin::new($s.as_mut());
                $e
            }
            Conn::DbTls($s) => {
                let $s = std::pin::Pin::new($s.as_mut());
                $e
            }
            Conn::Gone => $gone,
        }
    };
}

impl AsyncRead for Conn {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf), std::task::Poll::Ready(Ok(())))
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf), std::task::Poll::Ready(Ok(buf.len())))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx), std::task::Poll::Ready(Ok(())))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx), std::task::Poll::Ready(Ok(())))
    }
}

pub(super) const READ_CHUNK: usize = 64 * 1024;

/// Why a session ended early, as the client is told.
pub(super) struct Fatal {
    pub(super) code: &'static str,
    pub(super) message: String,
}

impl From<WireError> for Fatal {
    fn from(e: WireError) -> Self {
        Fatal {
            code: wire::PROTOCOL_VIOLATION,
            message: e.to_string(),
        }
    }
}

pub(super) async fn run(
    socket: tokio::net::TcpStream,
    peer: SocketAddr,
    config: Arc<ProxyConfig>,
    hook: Arc<dyn Hook>,
    permit: Option<OwnedSemaphorePermit>,
    drain: CancellationToken,
) {
    let mut client = Conn::Tcp(socket);
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let startup = tokio::time::timeout(
        config.startup_timeout,
        startup(&mut client, &mut buf, &config),
    )
    .await;
    let (upstream, packet) = match startup {
        Err(_) => {
            let msg = format!(
                "startup packet not received within {} s",
                config.startup_timeout.as_secs()
            );
            return fatal(&mut client, wire::PROTOCOL_VIOLATION, &msg).await;
        }
        Ok(Err(f)) => return fatal(&mut client, f.code, &f.message).await,
        Ok(Ok(None)) => return, // cancel request handled, or the client left
        Ok(Ok(Some((c, packet)))) => {
            client = c;
            let Some(_) = &permit else {
                return fatal(
                    &mut client,
                    wire::TOO_MANY_CONNECTIONS,
                    "sorry, too many clients already",
                )
                .await;
            };
            match connect(&config).await {
                Ok(u) => (u, packet),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot reach the database");
                    let msg = format!("pgfire cannot reach the database: {err}");
                    return fatal(&mut client, wire::CONNECTION_FAILURE, &msg).await;
                }
            }
        }
    };
    let mut upstream = upstream;
    // PRE hooks for sessions on the database they watch.
    let pre = match (&config.pre, wire::startup_packet(&packet)) {
        (Some(pre), Ok(Some((Startup::Startup { params, .. }, _)))) if pre.serves(&params) => {
            Some(pre.clone())
        }
        _ => None,
    };
    let packet = match &pre {
        Some(_) => mark_proxied(packet),
        None => packet,
    };
    if upstream.write_all(&packet).await.is_err() || upstream.flush().await.is_err() {
        return fatal(
            &mut client,
            wire::CONNECTION_FAILURE,
            "the database closed the connection",
        )
        .await;
    }
    tracing::debug!(%peer, "session started");
    relay(
        client,
        upstream,
        buf,
        &config,
        pre.as_deref(),
        hook.as_ref(),
        &drain,
    )
    .await;
    drop(permit);
}

/// The startup phase: returns the (possibly TLS) client stream and the startup packet to send
/// upstream, or `None` when the connection is done (a cancel request, a client that left).
async fn startup(
    client: &mut Conn,
    buf: &mut BytesMut,
    config: &ProxyConfig,
) -> Result<Option<(Conn, BytesMut)>, Fatal> {
    let mut tls_done = false;
    loop {
        let (packet, len) = loop {
            if let Some(p) = wire::startup_packet(buf)? {
                break p;
            }
            if client.read_buf(buf).await.unwrap_or(0) == 0 {
                return Ok(None);
            }
        };
        match packet {
            Startup::Ssl if !tls_done => {
                buf.advance(len);
                if !buf.is_empty() {
                    // Bytes sent before the TLS handshake could be injected by a third party.
                    return Err(Fatal {
                        code: wire::PROTOCOL_VIOLATION,
                        message: "unencrypted data after SSL request".into(),
                    });
                }
                match &config.tls {
                    Some(tls) => {
                        client.write_all(b"S").await.map_err(io_fatal)?;
                        let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
                        let Conn::Tcp(plain) = std::mem::replace(client, Conn::Gone) else {
                            return Err(Fatal {
                                code: wire::PROTOCOL_VIOLATION,
                                message: "encryption requested twice".into(),
                            });
                        };
                        let stream = acceptor.accept(plain).await.map_err(|e| Fatal {
                            code: wire::PROTOCOL_VIOLATION,
                            message: format!("TLS handshake failed: {e}"),
                        })?;
                        *client = Conn::ClientTls(Box::new(stream));
                        tls_done = true;
                    }
                    None => client.write_all(b"N").await.map_err(io_fatal)?,
                }
            }
            Startup::GssEnc if !tls_done => {
                buf.advance(len);
                client.write_all(b"N").await.map_err(io_fatal)?;
            }
            Startup::Ssl | Startup::GssEnc => {
                return Err(Fatal {
                    code: wire::PROTOCOL_VIOLATION,
                    message: "encryption requested twice".into(),
                });
            }
            Startup::Cancel { .. } => {
                // Backend keys pass through unchanged, so the request goes to the database as is,
                // over the transport a session would use (TLS as `sslmode` says).
                let packet = buf.split_to(len);
                forward_cancel(config, &packet).await;
                return Ok(None);
            }
            Startup::Startup { .. } => {
                let packet = buf.split_to(len);
                let stream = std::mem::replace(client, Conn::Gone);
                return Ok(Some((stream, packet)));
            }
        }
    }
}

/// The startup packet with `pgfire.proxied=on` (and no `pgfire.*` parameter of the client's):
/// pgfire's PRE trigger refuses a write to a watched table through the proxy that the proxy did
/// not hold. Parameters of the packet override `options`, so the client cannot unset it there.
fn mark_proxied(packet: BytesMut) -> BytesMut {
    let Ok(Some((Startup::Startup { version, params }, _))) = wire::startup_packet(&packet) else {
        return packet;
    };
    let mut body = BytesMut::new();
    body.extend_from_slice(&version.to_be_bytes());
    for (k, v) in params.iter().filter(|(k, _)| !k.starts_with("pgfire.")) {
        body.extend_from_slice(k.as_bytes());
        body.extend_from_slice(&[0]);
        body.extend_from_slice(v.as_bytes());
        body.extend_from_slice(&[0]);
    }
    body.extend_from_slice(b"pgfire.proxied\0on\0\0");
    let mut out = BytesMut::with_capacity(body.len() + 4);
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

pub(super) fn io_fatal(e: std::io::Error) -> Fatal {
    Fatal {
        code: wire::CONNECTION_FAILURE,
        message: e.to_string(),
    }
}

/// The connection to the database, TLS included, within the startup timeout.
async fn connect(config: &ProxyConfig) -> Result<Conn, upstream::UpstreamError> {
    let connect = upstream::connect(&config.upstream, &config.upstream_tls);
    match tokio::time::timeout(config.startup_timeout, connect).await {
        Ok(r) => r,
        Err(_) => Err(upstream::UpstreamError::Io {
            addr: config.upstream.describe(),
            error: std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {} s", config.startup_timeout.as_secs()),
            ),
        }),
    }
}

/// Send a CancelRequest `packet` to the database over the transport a session would use (TLS
/// as `sslmode` says), and wait until the server closes that connection (it answers nothing),
/// at most 5 s: once it has, the server has signalled the backend.
async fn forward_cancel(config: &ProxyConfig, packet: &[u8]) {
    match connect(config).await {
        Err(err) => tracing::warn!(error = %err, "cannot forward a cancel request"),
        Ok(mut up) => {
            let _ = up.write_all(packet).await;
            let _ = up.flush().await;
            let mut sink = [0u8; 16];
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(5), up.read(&mut sink)).await;
        }
    }
}

/// Cancel what the backend whose BackendKeyData body (process id and secret key) is `key` is
/// running: the proxy's own CancelRequest, for a PRE run that outlived its functions' timeouts.
pub(super) async fn cancel_backend(config: &ProxyConfig, key: &[u8]) {
    let mut packet = Vec::with_capacity(8 + key.len());
    packet.extend_from_slice(&((8 + key.len()) as i32).to_be_bytes());
    packet.extend_from_slice(&wire::CANCEL_REQUEST.to_be_bytes());
    packet.extend_from_slice(key);
    forward_cancel(config, &packet).await;
}

/// Send a FATAL ErrorResponse and close.
async fn fatal(client: &mut Conn, code: &str, message: &str) {
    let mut b = BytesMut::new();
    wire::error_response(&mut b, "FATAL", code, message);
    let _ = client.write_all(&b).await;
    let _ = client.flush().await;
    let _ = client.shutdown().await;
}
