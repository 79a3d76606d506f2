//! The execution history: every run of a function becomes a row of `pgfire.executions`, written
//! in batches with COPY by a task of its own, off the delivery path.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::SinkExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::event::EventId;

/// One run of a function, as compact as it reasonably gets (88 bytes): the history queue holds
/// hundreds of thousands of them when a big transaction's runs outpace the writer.
#[derive(Debug, Clone)]
pub struct Execution {
    pub event_id: EventId,
    pub event_type: Arc<str>,
    pub function_name: Arc<str>,
    pub error: Option<Box<str>>,
    /// Start of the run, microseconds since the Unix epoch.
    pub started_at_us: i64,
    pub duration_us: u64,
    pub attempt: u32,
    pub status: Status,
}

/// How a run ended (`pgfire.executions.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    Error,
    Timeout,
    Dead,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Error => "error",
            Status::Timeout => "timeout",
            Status::Dead => "dead",
        }
    }
}

/// Where dispatch sends executions, a batch at a time (one wake-up of the writer per batch,
/// not per run); cloning is cheap.
#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Vec<Execution>>,
}

impl Recorder {
    /// Queue a batch of records. Waits only when the writer is far behind: the queue holds
    /// [`QUEUE_BATCHES`] batches (about 46 MB at dispatch's batch size of 1024 runs of 88 bytes),
    /// enough to take the burst of runs of a 500 000-row transaction while the writer catches up.
    pub async fn record(&self, batch: Vec<Execution>) {
        if batch.is_empty() {
            return;
        }
        let batch = match self.tx.try_send(batch) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(batch)) => batch,
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::warn!("execution history writer stopped; records were not kept");
                return;
            }
        };
        let waiting = std::time::Instant::now();
        if self.tx.send(batch).await.is_err() {
            tracing::warn!("execution history writer stopped; records were not kept");
        }
        tracing::debug!(waited = ?waiting.elapsed(), "history queue full: dispatch waited for the writer");
    }
}

/// Batches of runs the history queue holds.
const QUEUE_BATCHES: usize = 512;

/// Start the writer; it runs until `shutdown` and then flushes what it holds.
pub fn start(
    database_url: String,
    shutdown: CancellationToken,
) -> (Recorder, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(QUEUE_BATCHES);
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
            "COPY pgfire.executions (event_id, event_type, function_name, attempt, status, started_at, duration_ms, error) FROM STDIN (FORMAT binary)",
        )
        .await
        .map_err(|e| crate::db::describe(&e))?;
    futures_util::pin_mut!(sink);
    sink.send(copy_rows(batch))
        .await
        .map_err(|e| crate::db::describe(&e))?;
    sink.finish().await.map_err(|e| crate::db::describe(&e))?;
    Ok(())
}

/// Microseconds from the Unix epoch to the PostgreSQL epoch (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// The rows in COPY's binary format (cheaper than text to write here and to parse in the server).
fn copy_rows(batch: &[Execution]) -> Bytes {
    let mut buf = BytesMut::with_capacity(19 + batch.len() * 128 + 2);
    buf.put_slice(b"PGCOPY\n\xff\r\n\0");
    buf.put_i32(0); // flags
    buf.put_i32(0); // header extension
    let mut id = [0u8; 32];
    for e in batch {
        buf.put_i16(8);
        copy_text(&mut buf, event_id(e.event_id, &mut id));
        copy_text(&mut buf, &e.event_type);
        copy_text(&mut buf, &e.function_name);
        buf.put_i32(4);
        buf.put_i32(e.attempt.min(i32::MAX as u32) as i32);
        copy_text(&mut buf, e.status.as_str());
        buf.put_i32(8);
        buf.put_i64(e.started_at_us.saturating_sub(PG_EPOCH_OFFSET_MICROS));
        buf.put_i32(8);
        buf.put_f64(e.duration_us as f64 / 1000.0);
        match &e.error {
            Some(err) if err.contains('\0') => copy_text(&mut buf, &err.replace('\0', "")),
            Some(err) => copy_text(&mut buf, err),
            None => buf.put_i32(-1),
        }
    }
    buf.put_i16(-1);
    buf.freeze()
}

/// A text field: its length and UTF-8 bytes (text cannot hold NUL; callers remove it).
fn copy_text(buf: &mut BytesMut, s: &str) {
    buf.put_i32(s.len().min(i32::MAX as usize) as i32);
    buf.put_slice(s.as_bytes());
}

/// The event id as [`EventId`]'s `Display` writes it (hex LSN, position), without the
/// formatting machinery.
fn event_id(id: EventId, out: &mut [u8; 32]) -> &str {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let lsn = id.commit_lsn.0;
    for (i, b) in out[..16].iter_mut().enumerate() {
        *b = HEX[((lsn >> (60 - 4 * i)) & 0xf) as usize];
    }
    out[16] = b'-';
    let mut digits = [0u8; 10];
    let mut n = id.position;
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        n /= 10;
        len += 1;
        if n == 0 {
            break;
        }
    }
    let width = len.max(6);
    for i in 0..width {
        out[17 + i] = if i < width - len {
            b'0'
        } else {
            digits[width - 1 - i]
        };
    }
    std::str::from_utf8(&out[..17 + width]).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Lsn;

    #[test]
    fn event_ids_are_written_as_displayed() {
        let mut buf = [0u8; 32];
        for (lsn, position) in [
            (0x16B3748, 2),
            (0, 0),
            (u64::MAX, u32::MAX),
            (1, 999_999),
            (1, 1_000_000),
        ] {
            let id = EventId {
                commit_lsn: Lsn(lsn),
                position,
            };
            assert_eq!(event_id(id, &mut buf), id.to_string());
        }
    }

    #[test]
    fn a_run_record_stays_small() {
        assert!(std::mem::size_of::<Execution>() <= 88);
    }

    #[test]
    fn binary_copy_rows() {
        let e = Execution {
            event_id: EventId {
                commit_lsn: Lsn(0x10),
                position: 1,
            },
            event_type: Arc::from("T"),
            function_name: Arc::from("f"),
            attempt: 2,
            status: Status::Ok,
            started_at_us: PG_EPOCH_OFFSET_MICROS + 5,
            duration_us: 1500,
            error: Some("a\0b".into()),
        };
        let b = copy_rows(&[e]);
        let mut want = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0\0\x08".to_vec();
        let text = |w: &mut Vec<u8>, s: &str| {
            w.extend((s.len() as i32).to_be_bytes());
            w.extend(s.as_bytes());
        };
        text(&mut want, "0000000000000010-000001");
        text(&mut want, "T");
        text(&mut want, "f");
        want.extend(4i32.to_be_bytes());
        want.extend(2i32.to_be_bytes());
        text(&mut want, "ok");
        want.extend(8i32.to_be_bytes());
        want.extend(5i64.to_be_bytes());
        want.extend(8i32.to_be_bytes());
        want.extend(1.5f64.to_be_bytes());
        text(&mut want, "ab");
        want.extend((-1i16).to_be_bytes());
        assert_eq!(&b[..], &want[..]);
    }
}
