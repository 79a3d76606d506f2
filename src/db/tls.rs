//! TLS to the database as libpq reads it from the connection string: `sslmode` (`disable`,
//! `allow`, `prefer`, `require`, `verify-ca`, `verify-full`) and `sslrootcert`, also from
//! `PGSSLMODE` / `PGSSLROOTCERT`, done with rustls for every connection pgfire makes (pools,
//! the history writer, the replication connection).
//!
//! As in libpq: `prefer` (the default) uses TLS when the server offers it; `require` insists on
//! it; neither checks the certificate unless a root certificate is given (`sslrootcert`, or
//! `~/.postgresql/root.crt` if present), in which case the chain is verified as for
//! `verify-ca`; `verify-full` also checks that the certificate names the host.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// How TLS is used, as libpq's `sslmode` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Result<SslMode, TlsError> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => return Err(TlsError::Mode(other.to_string())),
        })
    }

    /// The mode as `sslmode` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether a server without TLS is refused.
    pub fn requires_tls(self) -> bool {
        matches!(
            self,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "invalid sslmode {0:?}: use disable, allow, prefer, require, verify-ca or verify-full"
    )]
    Mode(String),
    #[error("cannot read sslrootcert {path}: {error}")]
    RootCert { path: String, error: String },
    #[error("sslrootcert {0} holds no certificate")]
    NoCertificate(String),
    #[error("sslmode={0} needs a root certificate: give sslrootcert=/path/to/ca.pem (or put it in ~/.postgresql/root.crt)")]
    NeedsRoot(&'static str),
    #[error(
        "{0} is not supported yet (client certificates); remove it from the connection string"
    )]
    Unsupported(&'static str),
    #[error("invalid connection string: {0}")]
    Config(String),
}

/// The TLS settings of a connection string, and the string without them (for tokio-postgres,
/// which knows only `disable`, `prefer` and `require`).
#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub mode: SslMode,
    pub root_cert: Option<PathBuf>,
    /// The connection string with `sslmode` as tokio-postgres reads it and `sslrootcert` removed.
    pub stripped: String,
}

/// Read `sslmode` and `sslrootcert` from a `postgres://` URL or a `key=value` string (the
/// environment as fallback, as libpq does).
pub fn settings(conn: &str) -> Result<TlsSettings, TlsError> {
    let mut mode = None;
    let mut root = None;
    let mut kept = Vec::new();
    // A URL keeps its base and joins parameters with `&`; a key=value string with spaces.
    let url = conn.starts_with("postgres://") || conn.starts_with("postgresql://");
    let base = if url {
        let (base, query) = conn.split_once('?').unwrap_or((conn, ""));
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "sslmode" => mode = Some(percent_decode(v)),
                "sslrootcert" => root = Some(percent_decode(v)),
                "sslcert" | "sslkey" => return Err(TlsError::Unsupported("sslcert/sslkey")),
                _ => kept.push(pair.to_string()),
            }
        }
        Some(base)
    } else {
        for (k, v) in key_values(conn)? {
            match k.as_str() {
                "sslmode" => mode = Some(v),
                "sslrootcert" => root = Some(v),
                "sslcert" | "sslkey" => return Err(TlsError::Unsupported("sslcert/sslkey")),
                _ => kept.push(format!(
                    "{k}='{}'",
                    v.replace('\\', "\\\\").replace('\'', "\\'")
                )),
            }
        }
        None
    };
    let mode = match mode.or_else(|| std::env::var("PGSSLMODE").ok()) {
        Some(m) => SslMode::parse(&m)?,
        None => SslMode::Prefer,
    };
    kept.push(format!("sslmode={}", tokio_postgres_mode(mode)));
    let stripped = match base {
        Some(base) => format!("{base}?{}", kept.join("&")),
        None => kept.join(" "),
    };
    let root_cert = root
        .or_else(|| std::env::var("PGSSLROOTCERT").ok())
        .map(PathBuf::from)
        .or_else(|| {
            let default = Path::new(&std::env::var("HOME").ok()?).join(".postgresql/root.crt");
            default.exists().then_some(default)
        });
    Ok(TlsSettings {
        mode,
        root_cert,
        stripped,
    })
}

fn tokio_postgres_mode(m: SslMode) -> &'static str {
    match m {
        SslMode::Disable => "disable",
        SslMode::Allow | SslMode::Prefer => "prefer",
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => "require",
    }
}

impl TlsSettings {
    /// The rustls configuration for these settings; `None` with `sslmode=disable`.
    pub fn client_config(&self) -> Result<Option<Arc<ClientConfig>>, TlsError> {
        match self.mode {
            SslMode::Disable => Ok(None),
            _ => self.connector_config().map(Some),
        }
    }

    /// The rustls configuration a connector holds whatever the mode (with `sslmode=disable`
    /// nothing asks it for TLS, and it is the unverified one).
    pub fn connector_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = match &self.root_cert {
            Some(path) if self.mode != SslMode::Disable => Some(load_roots(path)?),
            _ => None,
        };
        let verifier: Arc<dyn ServerCertVerifier> = match (self.mode, roots) {
            (SslMode::VerifyFull, Some(roots)) => webpki(roots, &provider)?,
            (SslMode::VerifyFull, None) => return Err(TlsError::NeedsRoot("verify-full")),
            (SslMode::VerifyCa, None) => return Err(TlsError::NeedsRoot("verify-ca")),
            // With a root certificate, the chain is checked as libpq does.
            (_, Some(roots)) => Arc::new(ChainOnly(webpki(roots, &provider)?)),
            (_, None) => Arc::new(Unverified(provider.clone())),
        };
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(Arc::new(config))
    }
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let err = |e: String| TlsError::RootCert {
        path: path.display().to_string(),
        error: e,
    };
    let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let mut roots = RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        let cert = cert.map_err(|e| err(e.to_string()))?;
        roots.add(cert).map_err(|e| err(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(TlsError::NoCertificate(path.display().to_string()));
    }
    Ok(roots)
}

fn webpki(
    roots: RootCertStore,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, TlsError> {
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))
}

/// `verify-ca` (and `require` with a root certificate): the chain must lead to the root; the
/// host name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer` and `require` without a root certificate: encrypted, the certificate not checked
/// (libpq's behaviour); the handshake's signatures still are.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (b[i], b.get(i + 1..i + 3)) {
            (b'%', Some(hex)) => match std::str::from_utf8(hex)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                Some(v) => {
                    out.push(v);
                    i += 3;
                    continue;
                }
                None => out.push(b'%'),
            },
            (c, _) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `key=value` pairs of a libpq connection string (values optionally single-quoted, with
/// backslash escapes).
fn key_values(s: &str) -> Result<Vec<(String, String)>, TlsError> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(TlsError::Config(format!("missing = after {key:?}")));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => return Err(TlsError::Config("unterminated quoted value".into())),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                if c == '\\' {
                    chars.next();
                    value.extend(chars.next());
                    continue;
                }
                value.push(c);
                chars.next();
            }
        }
        out.push((key, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_root_certificates_come_out_of_the_connection_string() {
        let s = settings("postgres://u@db.example.com:5432/app?sslmode=verify-full&sslrootcert=%2Ftmp%2Fca.pem&application_name=x").unwrap();
        assert_eq!(s.mode, SslMode::VerifyFull);
        assert_eq!(s.root_cert.as_deref(), Some(Path::new("/tmp/ca.pem")));
        assert_eq!(
            s.stripped,
            "postgres://u@db.example.com:5432/app?application_name=x&sslmode=require"
        );
        let s = settings("host=db port=5433 sslmode=verify-ca sslrootcert='/a b/ca.pem' user=u")
            .unwrap();
        assert_eq!(s.mode, SslMode::VerifyCa);
        assert_eq!(s.root_cert.as_deref(), Some(Path::new("/a b/ca.pem")));
        assert_eq!(s.stripped, "host='db' port='5433' user='u' sslmode=require");
        let s = settings("postgres://u@h/app").unwrap();
        assert_eq!(s.mode, SslMode::Prefer);
        assert_eq!(s.stripped, "postgres://u@h/app?sslmode=prefer");
        let s = settings("postgres://u@h/app?sslmode=disable").unwrap();
        assert!(s.client_config().unwrap().is_none());
        assert!(s.stripped.parse::<tokio_postgres::Config>().is_ok());
    }

    #[test]
    fn bad_settings_are_clear_errors() {
        let e = settings("postgres://u@h/app?sslmode=verify").unwrap_err();
        assert!(e.to_string().contains("use disable, allow"), "{e}");
        let e = settings("postgres://u@h/app?sslcert=/c.pem").unwrap_err();
        assert!(e.to_string().contains("not supported yet"), "{e}");
        let e = settings("postgres://u@h/app?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem")
            .unwrap()
            .client_config()
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("cannot read sslrootcert /nonexistent/ca.pem"),
            "{e}"
        );
        let e = settings("host=h sslmode='unterminated").unwrap_err();
        assert!(e.to_string().contains("unterminated"), "{e}");
    }
}
