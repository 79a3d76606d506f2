//! The replication consumer: reads slot `pgfire` with pgoutput (protocol v2, streaming of large
//! in-progress transactions, logical messages), hands committed changes to dispatch through a
//! bounded channel, answers keepalives, confirms only settled positions, and reconnects with
//! backoff when PostgreSQL goes away.

pub mod conn;
pub mod decode;
mod pending;
pub mod position;
mod row;
pub mod spill;
mod streamed;
pub mod values;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use postgres_protocol::escape::{escape_identifier, escape_literal};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_util::sync::CancellationToken;

use self::conn::{ConnError, ReplicationConn, ReplicationMessage};
use self::decode::{DecodeError, Decoder, Item};
pub use self::pending::PendingCommits;
use crate::replication::position::Lsn;

/// Items per batch handed to dispatch.
const BATCH: usize = 1024;
/// The first retry after losing a stream that was working; later ones double up to `MAX_RETRY`.
const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(10);
/// How often a standby (the slot held by another consumer) tries to take the slot over.
const STANDBY_POLL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub database_url: String,
    pub slot: String,
    pub publication: String,
    pub status_interval: Duration,
    pub connect_timeout: Duration,
    /// When nothing arrives from the server for this long, pgfire asks it for a reply; when
    /// nothing arrives for as long again, the connection is dead and pgfire reconnects.
    pub server_timeout: Duration,
    /// Cancelled when pgfire stops dispatch on purpose (its graceful stop): dispatch gone is
    /// then no failure, the consumer waits for its own shutdown to confirm what was settled.
    pub dispatch_stopping: CancellationToken,
    /// Where streamed transactions beyond their memory budget are written; `None` keeps them
    /// in memory whatever their size.
    pub spill: Option<spill::SpillConfig>,
}

/// Why a replication session ended.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error(transparent)]
    Conn(#[from] ConnError),
    #[error("cannot decode the replication stream: {0}")]
    Decode(#[from] DecodeError),
    #[error("the server sent nothing for {0:?} and did not answer a ping within as long again: connection considered dead")]
    Silent(Duration),
    #[error("the database is shutting down (SQLSTATE {code}: {message})")]
    ServerShutdown { code: String, message: String },
    #[error("dispatch stopped: nothing takes the stream's events any more")]
    DispatchGone,
    #[error("cannot read the configuration in force at the slot after taking it over: {0}")]
    Resync(String),
}

impl ConsumerError {
    /// Whether retrying cannot help: the consumer stops instead of looping.
    pub fn is_fatal(&self) -> bool {
        match self {
            ConsumerError::Conn(e) => !e.is_transient(),
            // Disk trouble may pass (space freed): the transaction is received again.
            ConsumerError::Decode(DecodeError::Spill { .. }) => false,
            ConsumerError::Decode(_) | ConsumerError::DispatchGone => true,
            ConsumerError::Silent(_)
            | ConsumerError::ServerShutdown { .. }
            | ConsumerError::Resync(_) => false,
        }
    }

    /// The slot is active for another consumer (SQLSTATE 55006 at START_REPLICATION).
    pub fn slot_in_use(&self) -> bool {
        matches!(self, ConsumerError::Conn(e) if e.code() == Some(SqlState::OBJECT_IN_USE.code()))
    }

    /// What to do about it, when pgfire knows.
    fn hint(&self) -> &'static str {
        match self {
            ConsumerError::Conn(e) if e.code() == Some(SqlState::UNDEFINED_OBJECT.code()) => {
                " (run pgfire install)"
            }
            _ => "",
        }
    }
}

/// The consumer's state, for `/healthz` and `/metrics`.
#[derive(Debug, Default)]
pub struct ConsumerHealth {
    pub connected: AtomicBool,
    pub received_lsn: AtomicU64,
    pub confirmed_lsn: AtomicU64,
    /// What dispatch has settled (the slot is confirmed up to here at the next status update).
    pub settled_lsn: Arc<AtomicU64>,
    pub reconnects: AtomicU64,
    pub streamed_bytes: AtomicU64,
    /// The slot is held by another consumer (another pgfire): this one stands by and takes it
    /// over once it is released.
    pub standby: AtomicBool,
    /// Bytes of streamed transactions written to spill files so far.
    pub spilled_bytes: AtomicU64,
    /// Commits handed to dispatch and not settled yet (the slot lag in seconds).
    pub pending: PendingCommits,
    pub last_error: Mutex<Option<String>>,
    /// Cancelled when the consumer stopped for good on an error retrying cannot fix (the
    /// reason is in `last_error`); `pgfire run` exits non-zero on it.
    pub stopped: CancellationToken,
}

impl ConsumerHealth {
    fn set_error(&self, err: Option<String>) {
        if let Ok(mut e) = self.last_error.lock() {
            *e = err;
        }
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    /// Seconds since the commit of the oldest transaction handed to dispatch and not settled
    /// (delivered, or parked, everywhere it goes); 0 when everything received is settled.
    pub fn lag_seconds(&self, now: chrono::DateTime<chrono::Utc>) -> f64 {
        let settled = Lsn(self.settled_lsn.load(Ordering::SeqCst));
        match self.pending.oldest(settled) {
            Some(us) => ((now.timestamp_micros() - us).max(0) as f64) / 1e6,
            None => 0.0,
        }
    }

    /// One line for people: `streaming`, `connecting`, `reconnecting: <why>` or `stopped: <why>`.
    pub fn state(&self) -> String {
        let err = self.last_error();
        if self.stopped.is_cancelled() {
            format!("stopped: {}", err.unwrap_or_default())
        } else if self.connected.load(Ordering::SeqCst) {
            "streaming".into()
        } else if self.standby.load(Ordering::SeqCst) {
            format!("standby: {}", err.unwrap_or_default())
        } else if let Some(err) = err {
            format!("reconnecting: {err}")
        } else {
            "connecting".into()
        }
    }
}

/// Run the consumer until `shutdown`; reconnects with exponential backoff after a failure that
/// retrying may fix, stops (and cancels `health.stopped`) after one it cannot.
pub async fn run(
    config: ConsumerConfig,
    tx: mpsc::Sender<Vec<Item>>,
    settled: Arc<AtomicU64>,
    health: Arc<ConsumerHealth>,
    shutdown: CancellationToken,
) {
    let mut decoder = match &config.spill {
        None => Decoder::new(),
        Some(c) => match spill::SpillDir::open(&c.dir, &config.slot) {
            Ok(dir) => Decoder::with_spill(dir, c.budget),
            Err(e) => {
                let reason = format!(
                    "cannot use {} for spill files: {e} (give a writable directory with --data-dir)",
                    c.dir.display()
                );
                tracing::error!(error = %reason, "replication consumer stopped: retrying cannot fix this");
                health.set_error(Some(reason));
                health.stopped.cancel();
                return;
            }
        },
    };
    let mut delay = FIRST_RETRY;
    // The last checkpoint handed to dispatch: after a reconnect the server resends from the
    // slot's confirmed position, and what dispatch already has is not handed over twice (nor
    // routed again by a configuration applied after it).
    let mut handed = Lsn(0);
    while !shutdown.is_cancelled() {
        let result = session(
            &config,
            &mut decoder,
            &tx,
            &settled,
            &health,
            &shutdown,
            &mut handed,
        )
        .await;
        let was_streaming = health.connected.swap(false, Ordering::SeqCst);
        let err = match result {
            Ok(()) => return,
            Err(err) => err,
        };
        let reason = format!("{err}{}", err.hint());
        health.set_error(Some(reason.clone()));
        if err.is_fatal() {
            tracing::error!(error = %reason, "replication consumer stopped: retrying cannot fix this");
            health.stopped.cancel();
            return;
        }
        decoder.reset();
        // The slot is active for another consumer: stand by, and try again every second so the
        // slot is taken over soon after the other lets go of it (or dies: PostgreSQL frees the
        // slot as soon as its walsender sees the connection closed).
        if err.slot_in_use() {
            if !health.standby.swap(true, Ordering::SeqCst) {
                tracing::info!(slot = %config.slot, error = %reason, "standing by: another consumer holds the slot; taking it over once it is free");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(STANDBY_POLL) => {}
            }
            continue;
        }
        health.reconnects.fetch_add(1, Ordering::Relaxed);
        if was_streaming {
            delay = FIRST_RETRY;
        }
        tracing::warn!(error = %reason, retry_in = ?delay, "replication stream lost");
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(MAX_RETRY);
    }
}

/// The prefix of the message that opens the stream after this pgfire took the slot over from
/// another consumer: the configuration in force where the slot stands (delivery applies it
/// before the items after it, and drops what it was handed before losing the slot).
pub const TAKEOVER_MESSAGE_PREFIX: &str = "pgfire.takeover";

/// The configuration in force where a stream started at `from` starts (the slot's position, or
/// `from` when it is further on), as the message that opens a takeover.
async fn configuration_at_slot(config: &ConsumerConfig, from: Lsn) -> Result<Item, ConsumerError> {
    let client = crate::db::connect(&config.database_url)
        .await
        .map_err(|e| ConsumerError::Resync(e.to_string()))?;
    let (snapshot, at) = crate::catalog::snapshot_as_of_slot(&client, &config.slot, from)
        .await
        .map_err(|e| ConsumerError::Resync(e.to_string()))?;
    Ok(Item::Message {
        prefix: TAKEOVER_MESSAGE_PREFIX.to_string(),
        content: bytes::Bytes::from(snapshot),
        lsn: at,
        commit: None,
        position: 0,
    })
}

/// Resolves when the server says it is shutting down. In a fast shutdown PostgreSQL ends the
/// ordinary backends (FATAL 57P01) first and tells walsenders to stop only after its shutdown
/// checkpoint; a logical walsender then waits until the client confirms all it sent, which
/// pgfire does not while events are unsettled. So an idle ordinary connection watches, and the
/// consumer lets go of the stream as soon as it ends with 57P01 (or new connections are refused
/// with 57P03). Any other end of the watch just opens it again.
fn shutdown_watch(url: &str) -> Pin<Box<dyn Future<Output = ConsumerError> + Send>> {
    let config = crate::db::config(url);
    Box::pin(async move {
        let (mut config, tls) = match config {
            Ok(c) => c,
            Err(err) => {
                tracing::warn!(error = %err, "no shutdown watch");
                return std::future::pending().await;
            }
        };
        config.application_name("pgfire watch");
        let shutdown = |e: &tokio_postgres::Error| {
            e.as_db_error().and_then(|db| {
                let code = db.code();
                (*code == SqlState::ADMIN_SHUTDOWN || *code == SqlState::CANNOT_CONNECT_NOW).then(
                    || ConsumerError::ServerShutdown {
                        code: code.code().to_string(),
                        message: db.message().to_string(),
                    },
                )
            })
        };
        loop {
            let end = match config.connect(tls.clone()).await {
                Ok((client, connection)) => {
                    let end = connection.await;
                    drop(client);
                    end
                }
                Err(err) => Err(err),
            };
            match end {
                Err(err) => match shutdown(&err) {
                    Some(signal) => return signal,
                    None => tracing::debug!(error = %err, "shutdown watch lost; opening it again"),
                },
                Ok(()) => tracing::debug!("shutdown watch closed; opening it again"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}

/// One connection's life: connect, start streaming, relay until error or shutdown.
async fn session(
    config: &ConsumerConfig,
    decoder: &mut Decoder,
    tx: &mpsc::Sender<Vec<Item>>,
    settled: &AtomicU64,
    health: &ConsumerHealth,
    shutdown: &CancellationToken,
    handed: &mut Lsn,
) -> Result<(), ConsumerError> {
    let mut conn = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        c = ReplicationConn::connect(&config.database_url, config.connect_timeout) => c?,
    };
    if conn.server_version != 0 && conn.server_version < 14 {
        return Err(ConnError::Server {
            code: SqlState::FEATURE_NOT_SUPPORTED.code().into(),
            message: format!(
                "PostgreSQL {} is too old: pgfire needs 14 or newer",
                conn.server_version
            ),
            hint: None,
        }
        .into());
    }
    let start = Lsn(settled.load(Ordering::SeqCst));
    let options = format!(
        "proto_version '2', publication_names {}, messages 'true', streaming 'on'",
        escape_literal(&escape_identifier(&config.publication))
    );
    conn.start_replication(&config.slot, start, &options)
        .await?;
    let took_over = health.standby.load(Ordering::SeqCst);
    // After standing by, delivery starts afresh (it stopped when the slot was lost, so what it
    // was handed before is gone): everything from where the slot stands is handed again, under
    // the configuration in force there, which goes first and marks the takeover.
    let resync = match took_over {
        true => {
            *handed = Lsn(0);
            Some(configuration_at_slot(config, start).await?)
        }
        false => None,
    };
    health.standby.store(false, Ordering::SeqCst);
    health.connected.store(true, Ordering::SeqCst);
    health.set_error(None);
    match took_over {
        true => tracing::info!(slot = %config.slot, "took the slot over; replication started"),
        false => tracing::info!(slot = %config.slot, from = %start, "replication started"),
    }

    let mut s = Stream {
        conn,
        tx,
        settled,
        health,
        shutdown,
        dispatch_stopping: &config.dispatch_stopping,
        handed,
        server_down: shutdown_watch(&config.database_url),
        received: start,
        ticker: tokio::time::interval(config.status_interval),
        silence: Silence::new(config.server_timeout),
    };
    s.ticker
        .set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch: Vec<Item> = Vec::with_capacity(BATCH);
    batch.extend(resync);
    loop {
        // Hand over what we hold before waiting on the network, and whenever a batch is full.
        if !batch.is_empty() && (batch.len() >= BATCH || !s.conn.has_buffered_message()) {
            let items = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
            if !s.hand_over(items).await? {
                return s.finish().await;
            }
        }
        tokio::select! {
            biased;
            // 1. pgfire stops: confirm what is settled, close politely.
            _ = s.shutdown.cancelled() => return s.finish().await,
            // 2. the server stops: let go of the stream at once (see `shutdown_watch`).
            err = &mut s.server_down => return Err(s.abandon(err).await),
            // 3. status updates, and the check for a silent server.
            _ = s.ticker.tick() => s.tick().await?,
            // 4. the stream.
            msg = s.conn.next_message() => {
                s.silence.heard();
                match msg? {
                ReplicationMessage::XLogData { wal_start, data, .. } => {
                    s.received = s.received.max(wal_start);
                    decoder.decode(data, &mut batch)?;
                    s.conn.batch_reads(decoder.in_burst());
                    s.health.received_lsn.store(s.received.0, Ordering::Relaxed);
                    // A committed streamed transaction is handed over a batch at a time.
                    while decoder.replaying() {
                        let room = BATCH.saturating_sub(batch.len());
                        decoder.drain(&mut batch, room)?;
                        if batch.len() >= BATCH {
                            let items = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                            if !s.hand_over(items).await? {
                                return s.finish().await;
                            }
                        }
                    }
                    s.health.streamed_bytes.store(decoder.streamed_bytes as u64, Ordering::Relaxed);
                    s.health.spilled_bytes.store(decoder.spilled_bytes, Ordering::Relaxed);
                }
                ReplicationMessage::Keepalive { wal_end, reply } => {
                    s.received = s.received.max(wal_end);
                    s.health.received_lsn.store(s.received.0, Ordering::Relaxed);
                    // Between transactions, everything up to the server's position is handed over.
                    if !decoder.in_transaction() {
                        batch.push(Item::Checkpoint(wal_end));
                    }
                    if reply {
                        s.status(false).await?;
                    }
                }
            }}
        }
    }
}

/// How long the server has been silent, checked at each status tick (so a message costs a
/// counter increment, not a clock read).
struct Silence {
    timeout: Duration,
    messages: u64,
    seen: u64,
    since: Instant,
    pinged: Option<Instant>,
}

/// What a tick found out about the server's silence.
#[derive(Debug, PartialEq)]
enum Heard {
    Recently,
    /// Silent for the timeout: ask for a reply.
    Ping,
    /// A ping unanswered for the timeout: the connection is dead.
    Dead,
}

impl Silence {
    fn new(timeout: Duration) -> Silence {
        Silence {
            timeout,
            messages: 0,
            seen: 0,
            since: Instant::now(),
            pinged: None,
        }
    }

    fn heard(&mut self) {
        self.messages = self.messages.wrapping_add(1);
    }

    /// Start counting again (after a time pgfire was not reading).
    fn restart(&mut self, now: Instant) {
        self.seen = self.messages;
        self.since = now;
        self.pinged = None;
    }

    fn check(&mut self, now: Instant) -> Heard {
        if self.messages != self.seen {
            self.restart(now);
        }
        match self.pinged {
            Some(at) if now.duration_since(at) >= self.timeout => Heard::Dead,
            Some(_) => Heard::Recently,
            None if now.duration_since(self.since) >= self.timeout => {
                self.pinged = Some(now);
                Heard::Ping
            }
            None => Heard::Recently,
        }
    }
}

/// One streaming connection and what it reports back.
struct Stream<'a> {
    conn: ReplicationConn,
    tx: &'a mpsc::Sender<Vec<Item>>,
    settled: &'a AtomicU64,
    health: &'a ConsumerHealth,
    shutdown: &'a CancellationToken,
    dispatch_stopping: &'a CancellationToken,
    handed: &'a mut Lsn,
    server_down: Pin<Box<dyn Future<Output = ConsumerError> + Send>>,
    received: Lsn,
    ticker: tokio::time::Interval,
    silence: Silence,
}

impl Stream<'_> {
    /// Tell the server what is received and what is settled (the slot may confirm that);
    /// `reply` asks the server to answer at once.
    async fn status(&mut self, reply: bool) -> Result<(), ConnError> {
        let settled = Lsn(self.settled.load(Ordering::SeqCst));
        self.conn.send_status(self.received, settled, reply).await?;
        self.health
            .confirmed_lsn
            .store(settled.0, Ordering::Relaxed);
        Ok(())
    }

    /// A status update, with a reply requested when the server has been silent too long; an
    /// error when it stayed silent after that.
    async fn tick(&mut self) -> Result<(), ConsumerError> {
        match self.silence.check(Instant::now()) {
            Heard::Recently => Ok(self.status(false).await?),
            Heard::Ping => {
                tracing::debug!(silent_for = ?self.silence.timeout, "server silent; asking for a reply");
                Ok(self.status(true).await?)
            }
            Heard::Dead => Err(ConsumerError::Silent(self.silence.timeout)),
        }
    }

    /// Give a batch to dispatch, waiting while it pushes back but still sending status updates
    /// so the server does not time us out. False when shutting down.
    async fn hand_over(&mut self, mut items: Vec<Item>) -> Result<bool, ConsumerError> {
        let before = *self.handed;
        items.retain(|i| !i.handed_before(before));
        let last = items.iter().rev().find_map(|i| match i {
            Item::Checkpoint(lsn) => Some(*lsn),
            _ => None,
        });
        if items.is_empty() {
            return Ok(true);
        }
        let settled = Lsn(self.settled.load(Ordering::Relaxed));
        self.health.pending.handed(&items, settled);
        let handed = loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Ok(false),
                err = &mut self.server_down => return Err(self.abandon(err).await),
                permit = self.tx.reserve() => match permit {
                    Ok(p) => { p.send(items); break true }
                    Err(_) if self.shutdown.is_cancelled() => break false,
                    Err(_) if self.dispatch_stopping.is_cancelled() => {
                        // The history is being flushed; the final status follows it.
                        loop {
                            tokio::select! {
                                biased;
                                _ = self.shutdown.cancelled() => return Ok(false),
                                err = &mut self.server_down => return Err(self.abandon(err).await),
                                _ = self.ticker.tick() => self.status(false).await?,
                            }
                        }
                    }
                    Err(_) => return Err(ConsumerError::DispatchGone),
                },
                _ = self.ticker.tick() => self.status(false).await?,
            }
        };
        if let (true, Some(lsn)) = (handed, last) {
            *self.handed = (*self.handed).max(lsn);
        }
        // pgfire was not reading meanwhile: the server's silence counts from now.
        self.silence.restart(Instant::now());
        Ok(handed)
    }

    /// Final status (only what dispatch settled) and a polite close.
    async fn finish(mut self) -> Result<(), ConsumerError> {
        self.status(false).await.ok();
        self.conn.close().await;
        Ok(())
    }

    /// Let go of the stream at once: the server is stopping and must not wait for us. What is
    /// not settled comes again after it restarts.
    async fn abandon(&mut self, why: ConsumerError) -> ConsumerError {
        tracing::info!(reason = %why, "letting go of the replication stream");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.status(false)).await;
        why
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_pings_then_gives_up() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut silence = Silence::new(s);
        silence.restart(t0);
        assert_eq!(silence.check(t0 + s / 2), Heard::Recently);
        assert_eq!(silence.check(t0 + s), Heard::Ping);
        assert_eq!(silence.check(t0 + s + s / 2), Heard::Recently);
        // An answer resets everything.
        silence.heard();
        assert_eq!(silence.check(t0 + s + s / 2), Heard::Recently);
        assert_eq!(silence.check(t0 + s * 2), Heard::Recently);
        assert_eq!(silence.check(t0 + s * 5 / 2), Heard::Ping);
        assert_eq!(silence.check(t0 + s * 7 / 2), Heard::Dead);
    }

    #[test]
    fn what_stops_the_consumer() {
        assert!(ConsumerError::DispatchGone.is_fatal());
        assert!(ConsumerError::Decode(DecodeError::UnknownRelation(1)).is_fatal());
        assert!(!ConsumerError::Silent(Duration::from_secs(1)).is_fatal());
        assert!(!ConsumerError::Conn(ConnError::Ended).is_fatal());
        let missing = ConsumerError::Conn(ConnError::Server {
            code: "42704".into(),
            message: "replication slot \"x\" does not exist".into(),
            hint: None,
        });
        assert!(missing.is_fatal());
        assert_eq!(missing.hint(), " (run pgfire install)");
    }
}
