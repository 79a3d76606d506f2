//! Ordinary (non-replication) connections to the served database, with TLS as the connection
//! string asks (`tls`), and how their errors read.

pub mod tls;

use tokio_postgres::Client;
pub use tokio_postgres_rustls::MakeRustlsConnect as MakeTls;

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
    #[error("{}", describe(.0))]
    Db(#[from] tokio_postgres::Error),
}

impl ConnectError {
    /// The database's own error, when it is one.
    pub fn as_db(&self) -> Option<&tokio_postgres::Error> {
        match self {
            ConnectError::Db(e) => Some(e),
            ConnectError::Tls(_) => None,
        }
    }
}

/// What tokio-postgres connects with for a `postgres://` URL or `key=value` string: its
/// configuration and the TLS connector `sslmode` and `sslrootcert` ask for.
pub fn config(url: &str) -> Result<(tokio_postgres::Config, MakeTls), ConnectError> {
    let settings = tls::settings(url)?;
    let client = settings.connector_config()?;
    let config = settings.stripped.parse()?;
    Ok((config, MakeTls::new((*client).clone())))
}

/// Connect with a `postgres://` URL or `key=value` string; the connection runs on its own task.
pub async fn connect(url: &str) -> Result<Client, ConnectError> {
    let (config, tls) = config(url)?;
    let (client, conn) = config.connect(tls).await?;
    tokio::spawn(async move {
        if let Err(err) = conn.await {
            tracing::debug!(error = %err, "database connection closed");
        }
    });
    Ok(client)
}

/// A one-line description of a database error: message, SQLSTATE, detail and hint.
pub fn describe(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => {
            let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(d) = db.detail() {
                s.push_str(&format!("; detail: {d}"));
            }
            if let Some(h) = db.hint() {
                s.push_str(&format!("; hint: {h}"));
            }
            s
        }
        None => match std::error::Error::source(err) {
            Some(src) => format!("{err}: {src}"),
            None => err.to_string(),
        },
    }
}
