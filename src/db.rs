//! Ordinary (non-replication) connections to the served database, and how their errors read.

use tokio_postgres::{Client, NoTls};

/// Connect with a `postgres://` URL or `key=value` string; the connection runs on its own task.
pub async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
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
