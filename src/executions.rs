//! The execution history: every run of a function becomes a row of `pgfire.executions`, written
//! in batches with COPY by a task of its own, off the delivery path.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::SinkExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::event::EventId;

/// One run of a function.
#[derive(Debug, Clone)]
pub struct Execution {
    pub event_id: EventId,
    pub event_type: Arc<str>,
    pub function_name: Arc<str>,
    pub attempt: u32,
    pub status: &'static str,
    pub started_at: DateTime<Utc>,
    pub duration: Duration,
    pub error: Option<String>,
}

/// Where dispatch sends executions, a batch at a time (one wake-up of the writer per batch,
/// not per run); cloning is cheap.
#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Vec<Execution>>,
}

impl Recorder {
    /// Queue a batch of records. Waits only when the writer is far behind (the queue holds 256
    /// batches, about 25 MB at dispatch's batch size).
    pub async fn record(&self, batch: Vec<Execution>) {
        if batch.is_empty() {
            return;
        }
        if self.tx.send(batch).await.is_err() {
            tracing::warn!("execution history writer stopped; records were not kept");
        }
    }
}

/// Start the writer; it runs until `shutdown` and then flushes what it holds.
pub fn start(
    database_url: String,
    shutdown: CancellationToken,
) -> (Recorder, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(256);
    let task = tokio::spawn(writer(database_url, rx, shutdown));
    (Recorder { tx }, task)
}

/// Rows per COPY at most.
const COPY_ROWS: usize = 8192;

async fn writer(url: String, mut rx: mpsc::Receiver<Vec<Execution>>, shutdown: CancellationToken) {
    let mut batch: Vec<Execution> = Vec::with_capacity(COPY_ROWS);
    let mut client: Option<tokio_postgres::Client> = None;
    loop {
        let open = tokio::select! {
            biased;
            b = rx.recv() => match b {
                Some(b) => { batch.extend(b); true }
                None => false,
            },
            _ = shutdown.cancelled() => {
                while let Ok(b) = rx.try_recv() { batch.extend(b); }
                false
            }
        };
        // Take what is already queued, and gather a little more when there was little, so a busy
        // stream makes few, large COPYs.
        while batch.len() < COPY_ROWS {
            match rx.try_recv() {
                Ok(b) => batch.extend(b),
                Err(_) => break,
            }
        }
        if open && batch.len() < 512 {
            let _ = tokio::time::timeout(Duration::from_millis(50), async {
                while batch.len() < COPY_ROWS {
                    match rx.recv().await {
                        Some(b) => batch.extend(b),
                        None => break,
                    }
                }
            })
            .await;
        }
        let mut tries = 0;
        while !batch.is_empty() {
            match write(&url, &mut client, &batch).await {
                Ok(()) => batch.clear(),
                Err(err) => {
                    client = None;
                    tries += 1;
                    tracing::warn!(error = %err, rows = batch.len(), "cannot write execution history; retrying");
                    if tries >= 5 || shutdown.is_cancelled() {
                        tracing::error!(rows = batch.len(), "execution history rows dropped");
                        batch.clear();
                    } else {
                        tokio::time::sleep(Duration::from_millis(200 << tries)).await;
                    }
                }
            }
        }
        if !open {
            return;
        }
    }
}

async fn write(
    url: &str,
    client: &mut Option<tokio_postgres::Client>,
    batch: &[Execution],
) -> Result<(), String> {
    if client.is_none() {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e: tokio_postgres::Error| e.to_string())?;
        config.application_name("pgfire history");
        let (c, conn) = config
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| crate::db::describe(&e))?;
        tokio::spawn(conn);
        *client = Some(c);
    }
    let c = client.as_ref().ok_or("no connection")?;
    let sink = c
        .copy_in::<_, Bytes>(
            "COPY pgfire.executions (event_id, event_type, function_name, attempt, status, started_at, duration_ms, error) FROM STDIN",
        )
        .await
        .map_err(|e| crate::db::describe(&e))?;
    let mut buf = String::with_capacity(batch.len() * 128);
    for e in batch {
        let _ = write!(buf, "{}", e.event_id);
        buf.push('\t');
        copy_field(&mut buf, &e.event_type);
        buf.push('\t');
        copy_field(&mut buf, &e.function_name);
        let _ = write!(
            buf,
            "\t{}\t{}\t{}+00\t{:.3}\t",
            e.attempt,
            e.status,
            e.started_at.naive_utc(),
            e.duration.as_secs_f64() * 1000.0
        );
        match &e.error {
            Some(err) => copy_field(&mut buf, err),
            None => buf.push_str("\\N"),
        }
        buf.push('\n');
    }
    futures_util::pin_mut!(sink);
    sink.send(Bytes::from(buf))
        .await
        .map_err(|e| crate::db::describe(&e))?;
    sink.finish().await.map_err(|e| crate::db::describe(&e))?;
    Ok(())
}

/// Escape a value for COPY's text format.
fn copy_field(buf: &mut String, s: &str) {
    for ch in s.chars() {
        match ch {
            '\\' => buf.push_str("\\\\"),
            '\t' => buf.push_str("\\t"),
            '\n' => buf.push_str("\\n"),
            '\r' => buf.push_str("\\r"),
            '\0' => {}
            c => buf.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn copy_escaping() {
        let mut s = String::new();
        super::copy_field(&mut s, "a\tb\\c\nd\0");
        assert_eq!(s, "a\\tb\\\\c\\nd");
    }
}
