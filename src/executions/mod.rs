//! The execution history and what the slot may confirm: every run of a function becomes a row of
//! `pgfire.executions`, written in batches with COPY by a task of its own, off the delivery path;
//! a checkpoint is settled only once the records that must survive about it are stored.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::SinkExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::events::{EventId, Lsn};
use crate::metrics::{Metrics, Phase};

mod copy;

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
    /// A PRE run that refused the write.
    Blocked,
    /// A PRE run that rewrote the write.
    Modified,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Error => "error",
            Status::Timeout => "timeout",
            Status::Dead => "dead",
            Status::Blocked => "blocked",
            Status::Modified => "modified",
        }
    }
}

/// How far the slot may go, shared by dispatch, the history writer and the consumer.
///
/// A checkpoint is *settled* (the slot may confirm it) once every event before it has run and
/// every run record that must survive about those events (any run that did not end `ok`: an
/// error, a timeout, a `dead` run) is stored in `pgfire.executions`. Records of successful runs
/// may lag behind the slot; the writer retries them until they are stored and never drops one.
#[derive(Debug, Default)]
pub struct Progress {
    /// What the slot may confirm.
    pub settled: Arc<AtomicU64>,
    /// Every run record before this checkpoint is stored (successful runs included).
    pub stored: AtomicU64,
    /// Sequence number of the last batch stored.
    stored_seq: AtomicU64,
    /// Why the last write of the history failed, while it is being retried.
    pub error: std::sync::Mutex<Option<String>>,
}

impl Progress {
    pub fn new(settled: Arc<AtomicU64>) -> Progress {
        Progress {
            settled,
            ..Progress::default()
        }
    }

    fn settle(&self, lsn: Lsn) {
        self.settled.fetch_max(lsn.0, Ordering::SeqCst);
    }

    fn set_error(&self, err: Option<String>) {
        if let Ok(mut e) = self.error.lock() {
            *e = err;
        }
    }
}

/// A dispatch batch's runs on their way to the writer, with the last checkpoint dispatch passed
/// before sending them (every run of an event before it is in this batch or an earlier one).
#[derive(Debug)]
struct Batch {
    seq: u64,
    runs: Vec<Execution>,
    checkpoint: Option<Lsn>,
    /// Some run here did not end `ok`: the checkpoint is settled only once this batch is stored.
    must_store: bool,
}

/// Where dispatch sends executions, a batch at a time (one wake-up of the writer per batch, not
/// per run), and settles checkpoints.
pub struct Recorder {
    tx: mpsc::Sender<Batch>,
    progress: Arc<Progress>,
    next_seq: u64,
    /// The last batch sent with a record that must be stored before its checkpoint settles.
    last_must_store: u64,
    /// The last checkpoint sent to the writer.
    sent_checkpoint: Option<Lsn>,
    /// Where the runs are counted for `/metrics`, and as which phase.
    metrics: Option<(Arc<Metrics>, Phase)>,
}

impl Recorder {
    /// Count every run recorded from now on in `metrics`, as runs of `phase`.
    pub fn counting(mut self, metrics: Arc<Metrics>, phase: Phase) -> Recorder {
        self.metrics = Some((metrics, phase));
        self
    }

    /// Dispatch passed `checkpoint`, with every run before it recorded: settle it now unless a
    /// record that must be stored first is still on its way (`unsent_must_store`: among the runs
    /// not yet handed to [`Recorder::record`]). A checkpoint not settled here is settled by the
    /// writer once that record is stored, or at the next checkpoint.
    pub fn settle(&self, checkpoint: Lsn, unsent_must_store: bool) {
        if !unsent_must_store
            && self.last_must_store <= self.progress.stored_seq.load(Ordering::SeqCst)
        {
            self.progress.settle(checkpoint);
        }
    }

    /// Queue a batch of records with the last checkpoint dispatch passed. Waits only when the
    /// writer is far behind: the queue holds [`QUEUE_BATCHES`] batches (about 46 MB at
    /// dispatch's batch size of 1024 runs of 88 bytes), enough to take the burst of runs of a
    /// 500 000-row transaction while the writer catches up. While the writer cannot write (the
    /// database is down), the queue fills and dispatch waits here: the backlog stays in
    /// PostgreSQL, nothing is dropped.
    pub async fn record(&mut self, runs: Vec<Execution>, checkpoint: Option<Lsn>) {
        let new_checkpoint = checkpoint.is_some() && checkpoint != self.sent_checkpoint;
        if runs.is_empty() && !new_checkpoint {
            return;
        }
        if let Some((metrics, phase)) = &self.metrics {
            metrics.runs(*phase, &runs);
        }
        self.next_seq += 1;
        let must_store = runs.iter().any(|r| r.status != Status::Ok);
        if must_store {
            self.last_must_store = self.next_seq;
        }
        self.sent_checkpoint = checkpoint.or(self.sent_checkpoint);
        let batch = Batch {
            seq: self.next_seq,
            runs,
            checkpoint,
            must_store,
        };
        let batch = match self.tx.try_send(batch) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(batch)) => batch,
            Err(mpsc::error::TrySendError::Closed(b)) => {
                tracing::error!(
                    runs = b.runs.len(),
                    "execution history writer stopped; these runs are not settled"
                );
                return;
            }
        };
        let waiting = std::time::Instant::now();
        if let Err(mpsc::error::SendError(b)) = self.tx.send(batch).await {
            tracing::error!(
                runs = b.runs.len(),
                "execution history writer stopped; these runs are not settled"
            );
        }
        tracing::debug!(waited = ?waiting.elapsed(), "history queue full: dispatch waited for the writer");
    }
}

/// Batches of runs the history queue holds.
const QUEUE_BATCHES: usize = 512;

/// Start the writer. It runs until every [`Recorder`] is gone (dispatch stopped), then writes
/// what it holds, retrying until it is stored or `abandon` is cancelled.
pub fn start(
    database_url: String,
    progress: Arc<Progress>,
    abandon: CancellationToken,
) -> (Recorder, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(QUEUE_BATCHES);
    let task = tokio::spawn(writer(database_url, rx, progress.clone(), abandon));
    let recorder = Recorder {
        tx,
        progress,
        next_seq: 0,
        last_must_store: 0,
        sent_checkpoint: None,
        metrics: None,
    };
    (recorder, task)
}

/// Rows per COPY at most.
const COPY_ROWS: usize = 8192;

/// What the writer holds between two COPYs.
#[derive(Default)]
struct Pending {
    runs: Vec<Execution>,
    last_seq: u64,
    checkpoint: Option<Lsn>,
    must_store: bool,
}

impl Pending {
    /// Take a batch in. A checkpoint with nothing before it that must be stored is settled at
    /// once (only successful runs lag behind it).
    fn take(&mut self, b: Batch, progress: &Progress) {
        self.must_store |= b.must_store;
        if let Some(cp) = b.checkpoint {
            if !self.must_store {
                progress.settle(cp);
            }
            self.checkpoint = Some(cp);
        }
        self.last_seq = b.seq;
        // Into the buffer kept from COPY to COPY (a big one taken over or grown anew each time
        // is fresh memory, faulted in page by page).
        if self.runs.capacity() < b.runs.len() {
            self.runs.reserve(COPY_ROWS.max(b.runs.len()));
        }
        self.runs.extend(b.runs);
    }

    /// Everything held is stored.
    fn stored(&mut self, progress: &Progress) {
        if let Some(cp) = self.checkpoint.take() {
            progress.stored.fetch_max(cp.0, Ordering::SeqCst);
            progress.settle(cp);
        }
        progress
            .stored_seq
            .fetch_max(self.last_seq, Ordering::SeqCst);
        self.runs.clear();
        self.must_store = false;
    }
}

async fn writer(
    url: String,
    mut rx: mpsc::Receiver<Batch>,
    progress: Arc<Progress>,
    abandon: CancellationToken,
) {
    let mut held = Pending {
        runs: Vec::with_capacity(COPY_ROWS),
        ..Pending::default()
    };
    let mut client: Option<tokio_postgres::Client> = None;
    loop {
        let open = match rx.recv().await {
            Some(b) => {
                held.take(b, &progress);
                true
            }
            None => false,
        };
        // Take what is already queued, and gather a little more when there was little, so a busy
        // stream makes few, large COPYs.
        while held.runs.len() < COPY_ROWS {
            match rx.try_recv() {
                Ok(b) => held.take(b, &progress),
                Err(_) => break,
            }
        }
        if open && !held.runs.is_empty() && held.runs.len() < 512 && !held.must_store {
            let _ = tokio::time::timeout(Duration::from_millis(50), async {
                while held.runs.len() < COPY_ROWS && !held.must_store {
                    match rx.recv().await {
                        Some(b) => held.take(b, &progress),
                        None => break,
                    }
                }
            })
            .await;
        }
        let mut delay = Duration::from_millis(100);
        loop {
            if held.runs.is_empty() {
                held.stored(&progress);
                break;
            }
            match write(&url, &mut client, &held.runs).await {
                Ok(()) => {
                    held.stored(&progress);
                    progress.set_error(None);
                    break;
                }
                Err(err) => {
                    client = None;
                    tracing::warn!(error = %err, rows = held.runs.len(), retry_in = ?delay, "cannot write execution history; retrying (nothing is dropped, delivery waits)");
                    progress.set_error(Some(format!("cannot write pgfire.executions: {err}")));
                    tokio::select! {
                        _ = abandon.cancelled() => {
                            tracing::error!(rows = held.runs.len(), "stopping with execution history not written; the slot was not confirmed past runs that did not succeed, they run again after the restart");
                            return;
                        }
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
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
        let (mut config, tls) = crate::db::config(url).map_err(|e| e.to_string())?;
        config.application_name("pgfire history");
        let (c, conn) = config
            .connect(tls)
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
    sink.send(copy::copy_rows(batch))
        .await
        .map_err(|e| crate::db::describe(&e))?;
    sink.finish().await.map_err(|e| crate::db::describe(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(status: Status) -> Execution {
        Execution {
            event_id: EventId {
                commit_lsn: Lsn(1),
                position: 0,
                sub: 0,
            },
            event_type: Arc::from("E"),
            function_name: Arc::from("f"),
            error: None,
            started_at_us: 0,
            duration_us: 0,
            attempt: 1,
            status,
        }
    }

    /// A recorder wired to a queue the test reads in place of the writer.
    fn recorder() -> (Recorder, mpsc::Receiver<Batch>, Arc<Progress>) {
        let (tx, rx) = mpsc::channel(16);
        let progress = Arc::new(Progress::new(Arc::new(AtomicU64::new(0))));
        let r = Recorder {
            tx,
            progress: progress.clone(),
            next_seq: 0,
            last_must_store: 0,
            sent_checkpoint: None,
            metrics: None,
        };
        (r, rx, progress)
    }

    #[test]
    fn a_run_record_stays_small() {
        assert!(std::mem::size_of::<Execution>() <= 88);
    }

    fn settled(p: &Progress) -> u64 {
        p.settled.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn successful_runs_settle_at_once_failed_ones_once_stored() {
        let (mut r, mut rx, p) = recorder();
        // Only successful runs before the checkpoint: settled without waiting for the writer.
        r.settle(Lsn(10), false);
        r.record(vec![run(Status::Ok)], Some(Lsn(10))).await;
        assert_eq!(settled(&p), 10);
        // A run that failed is not yet sent: its checkpoint waits.
        r.settle(Lsn(20), true);
        assert_eq!(settled(&p), 10);
        r.record(vec![run(Status::Dead)], Some(Lsn(20))).await;
        // Sent but not stored: later checkpoints wait too.
        r.settle(Lsn(30), false);
        r.record(vec![run(Status::Ok)], Some(Lsn(30))).await;
        assert_eq!(settled(&p), 10);
        // The writer takes the batches in: the first (ok only) changes nothing new...
        let mut held = Pending::default();
        held.take(rx.recv().await.unwrap(), &p);
        held.stored(&p);
        assert_eq!(settled(&p), 10);
        // ...the one with the dead run settles only when stored.
        held.take(rx.recv().await.unwrap(), &p);
        held.take(rx.recv().await.unwrap(), &p);
        assert_eq!(settled(&p), 10, "not before the dead run is stored");
        held.stored(&p);
        assert_eq!(settled(&p), 30);
        assert_eq!(p.stored.load(Ordering::SeqCst), 30);
        // Nothing outstanding: dispatch settles directly again.
        r.settle(Lsn(40), false);
        assert_eq!(settled(&p), 40);
    }

    #[tokio::test]
    async fn a_checkpoint_alone_is_sent_once() {
        let (mut r, mut rx, _p) = recorder();
        r.record(Vec::new(), Some(Lsn(5))).await;
        r.record(Vec::new(), Some(Lsn(5))).await;
        r.record(Vec::new(), None).await;
        assert!(rx.try_recv().is_ok());
        assert!(rx.try_recv().is_err());
    }
}
