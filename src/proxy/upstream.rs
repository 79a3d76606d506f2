//! The proxy's connection to the database, for client sessions and the cancel requests it
//! forwards alike: where the database is (the URL's first host, TCP or Unix socket) and, over
//! TCP, TLS as the URL's `sslmode` and `sslrootcert` say ([`crate::db::tls`]): an SSLRequest,
//! then rustls; `prefer` goes on in plain when the server declines. As in libpq, a Unix socket
//! never uses TLS.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{CertificateError, ClientConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::session::Conn;
use crate::db::tls::{self, SslMode};

/// Where the database is.
#[derive(Debug, Clone)]
pub enum Upstream {
    Tcp(String, u16),
    Unix(PathBuf),
}

impl Upstream {
    /// The database's address and TLS settings from a `postgres://` URL or `key=value` string.
    pub fn from_url(database_url: &str) -> Result<(Upstream, UpstreamTls), UpstreamError> {
        let settings = tls::settings(database_url)?;
        let config: tokio_postgres::Config = settings
            .stripped
            .parse()
            .map_err(|e: tokio_postgres::Error| UpstreamError::Url(e.to_string()))?;
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let upstream = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => Upstream::Tcp(h.clone(), port),
            Some(tokio_postgres::config::Host::Unix(dir)) => {
                Upstream::Unix(dir.join(format!(".s.PGSQL.{port}")))
            }
            None => Upstream::Unix(PathBuf::from(format!(
                "/var/run/postgresql/.s.PGSQL.{port}"
            ))),
        };
        Ok((upstream, UpstreamTls::new(&settings)?))
    }

    pub(super) fn describe(&self) -> String {
        match self {
            Upstream::Tcp(host, port) => format!("{host}:{port}"),
            Upstream::Unix(path) => path.display().to_string(),
        }
    }
}

/// TLS on the proxy's upstream leg.
#[derive(Clone)]
pub struct UpstreamTls {
    mode: SslMode,
    /// `None` with `sslmode=disable`.
    client: Option<Arc<ClientConfig>>,
}

impl UpstreamTls {
    /// Plain connections, never an SSLRequest (`sslmode=disable`).
    pub fn disabled() -> UpstreamTls {
        UpstreamTls {
            mode: SslMode::Disable,
            client: None,
        }
    }

    /// As the connection string's settings say; a root certificate that cannot be read is an
    /// error now, not at the first client.
    pub fn new(settings: &tls::TlsSettings) -> Result<UpstreamTls, tls::TlsError> {
        Ok(UpstreamTls {
            mode: settings.mode,
            client: settings.client_config()?,
        })
    }

    pub fn mode(&self) -> SslMode {
        self.mode
    }
}

/// Why the database could not be reached; shown to the client and logged, so it names the cause
/// and never a password.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("{0}")]
    Settings(#[from] tls::TlsError),
    #[error("invalid database URL: {0}")]
    Url(String),
    #[error("cannot connect to {addr}: {error}")]
    Io { addr: String, error: std::io::Error },
    #[error(
        "the database at {addr} does not accept TLS connections, and sslmode={mode} requires TLS"
    )]
    TlsRefused { addr: String, mode: &'static str },
    #[error("the database at {addr} answered {answer:#04x} to the SSL request")]
    Protocol { addr: String, answer: u8 },
    #[error("TLS with the database at {addr} failed: {cause}")]
    Tls { addr: String, cause: String },
}

/// Connect to the database: the socket, then TLS as the settings say.
pub(super) async fn connect(upstream: &Upstream, tls: &UpstreamTls) -> Result<Conn, UpstreamError> {
    let addr = upstream.describe();
    let io = |error| UpstreamError::Io {
        addr: addr.clone(),
        error,
    };
    let (host, mut socket) = match upstream {
        Upstream::Unix(path) => {
            return Ok(Conn::Unix(
                tokio::net::UnixStream::connect(path).await.map_err(io)?,
            ))
        }
        Upstream::Tcp(host, port) => {
            let s = tokio::net::TcpStream::connect((host.as_str(), *port))
                .await
                .map_err(io)?;
            s.set_nodelay(true).map_err(io)?;
            (host, s)
        }
    };
    let Some(client) = &tls.client else {
        return Ok(Conn::Tcp(socket));
    };
    let mut request = [0u8; 8];
    request[..4].copy_from_slice(&8i32.to_be_bytes());
    request[4..].copy_from_slice(&crate::wire::SSL_REQUEST.to_be_bytes());
    socket.write_all(&request).await.map_err(io)?;
    let mut answer = [0u8; 1];
    socket.read_exact(&mut answer).await.map_err(io)?;
    match answer[0] {
        b'S' => {}
        b'N' if !tls.mode.requires_tls() => return Ok(Conn::Tcp(socket)),
        b'N' => {
            return Err(UpstreamError::TlsRefused {
                addr,
                mode: tls.mode.as_str(),
            })
        }
        other => {
            return Err(UpstreamError::Protocol {
                addr,
                answer: other,
            })
        }
    }
    let name = ServerName::try_from(host.clone()).map_err(|e| UpstreamError::Tls {
        addr: addr.clone(),
        cause: format!("host name {host:?}: {e}"),
    })?;
    match tokio_rustls::TlsConnector::from(client.clone())
        .connect(name, socket)
        .await
    {
        Ok(stream) => Ok(Conn::DbTls(Box::new(stream))),
        Err(e) => Err(UpstreamError::Tls {
            cause: handshake_cause(&e, host, tls.mode),
            addr,
        }),
    }
}

/// What went wrong in the handshake, in words (with rustls' own name of it for searches).
fn handshake_cause(e: &std::io::Error, host: &str, mode: SslMode) -> String {
    let rustls_error = e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>());
    match rustls_error {
        Some(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)) => {
            "the server's certificate is not signed by a certificate authority of sslrootcert \
             (UnknownIssuer)"
                .into()
        }
        Some(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        )) => format!(
            "the server's certificate does not name the host {host:?}, which sslmode={} \
             checks (NotValidForName)",
            mode.as_str()
        ),
        Some(rustls::Error::InvalidCertificate(c)) => {
            format!("the server's certificate is not valid: {c:?}")
        }
        Some(other) => other.to_string(),
        None => e.to_string(),
    }
}
