//! The replication consumer: reads slot `pgfire` with pgoutput (protocol v2, streaming of large
//! in-progress transactions, logical messages), hands committed changes to dispatch through a
//! bounded channel, answers keepalives, confirms only settled positions, and reconnects with
//! backoff when PostgreSQL goes away.

pub mod conn;
pub mod decode;
mod row;
mod streamed;
pub mod values;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use self::conn::{ConnError, ReplicationConn, ReplicationMessage};
use self::decode::{Decoder, Item};
use crate::event::Lsn;

/// Items per batch handed to dispatch.
const BATCH: usize = 1024;

#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub database_url: String,
    pub slot: String,
    pub publication: String,
    pub status_interval: Duration,
    pub connect_timeout: Duration,
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
    pub last_error: Mutex<Option<String>>,
}

impl ConsumerHealth {
    fn set_error(&self, err: Option<String>) {
        if let Ok(mut e) = self.last_error.lock() {
            *e = err;
        }
    }
}

/// Run the consumer until `shutdown`; reconnects with exponential backoff on any failure.
pub async fn run(
    config: ConsumerConfig,
    tx: mpsc::Sender<Vec<Item>>,
    settled: Arc<AtomicU64>,
    health: Arc<ConsumerHealth>,
    shutdown: CancellationToken,
) {
    let mut decoder = Decoder::new();
    let mut delay = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        match session(&config, &mut decoder, &tx, &settled, &health, &shutdown).await {
            Ok(()) => return,
            Err(err) => {
                health.connected.store(false, Ordering::SeqCst);
                health.reconnects.fetch_add(1, Ordering::Relaxed);
                let hint = match &err {
                    ConnError::Server { code, .. } if code == "42704" => " (run pgfire install)",
                    _ => "",
                };
                tracing::warn!(error = %err, retry_in = ?delay, "replication stream lost{hint}");
                health.set_error(Some(format!("{err}{hint}")));
                if !err.is_transient() {
                    delay = Duration::from_secs(10);
                }
            }
        }
        decoder.reset();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// One connection's life: connect, start streaming, relay until error or shutdown.
async fn session(
    config: &ConsumerConfig,
    decoder: &mut Decoder,
    tx: &mpsc::Sender<Vec<Item>>,
    settled: &AtomicU64,
    health: &ConsumerHealth,
    shutdown: &CancellationToken,
) -> Result<(), ConnError> {
    let mut conn = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        c = ReplicationConn::connect(&config.database_url, config.connect_timeout) => c?,
    };
    if conn.server_version != 0 && conn.server_version < 14 {
        return Err(ConnError::Server {
            code: "0A000".into(),
            message: format!(
                "PostgreSQL {} is too old: pgfire needs 14 or newer",
                conn.server_version
            ),
            hint: None,
        });
    }
    let start = Lsn(settled.load(Ordering::SeqCst));
    let options = format!(
        "proto_version '2', publication_names {}, messages 'true', streaming 'on'",
        conn::quote_literal(&conn::quote_ident(&config.publication))
    );
    conn.start_replication(&config.slot, start, &options)
        .await?;
    health.connected.store(true, Ordering::SeqCst);
    health.set_error(None);
    tracing::info!(slot = %config.slot, from = %start, "replication started");

    let mut s = Stream {
        conn,
        tx,
        settled,
        health,
        shutdown,
        received: start,
        ticker: tokio::time::interval(config.status_interval),
    };
    s.ticker
        .set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch: Vec<Item> = Vec::with_capacity(BATCH);
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
            _ = s.shutdown.cancelled() => return s.finish().await,
            _ = s.ticker.tick() => s.status().await?,
            msg = s.conn.next_message() => match msg? {
                ReplicationMessage::XLogData { wal_start, data, .. } => {
                    s.received = s.received.max(wal_start);
                    decoder.decode(data, &mut batch).map_err(|e| ConnError::Protocol(e.to_string()))?;
                    // A committed streamed transaction is handed over a batch at a time.
                    while decoder.replaying() {
                        let room = BATCH.saturating_sub(batch.len());
                        decoder.drain(&mut batch, room).map_err(|e| ConnError::Protocol(e.to_string()))?;
                        if batch.len() >= BATCH {
                            let items = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                            if !s.hand_over(items).await? {
                                return s.finish().await;
                            }
                        }
                    }
                    s.health.received_lsn.store(s.received.0, Ordering::Relaxed);
                    s.health.streamed_bytes.store(decoder.streamed_bytes as u64, Ordering::Relaxed);
                }
                ReplicationMessage::Keepalive { wal_end, reply } => {
                    s.received = s.received.max(wal_end);
                    s.health.received_lsn.store(s.received.0, Ordering::Relaxed);
                    // Between transactions, everything up to the server's position is handed over.
                    if !decoder.in_transaction() {
                        batch.push(Item::Checkpoint(wal_end));
                    }
                    if reply {
                        s.status().await?;
                    }
                }
            }
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
    received: Lsn,
    ticker: tokio::time::Interval,
}

impl Stream<'_> {
    /// Tell the server what is received and what is settled (the slot may confirm that).
    async fn status(&mut self) -> Result<(), ConnError> {
        let settled = Lsn(self.settled.load(Ordering::SeqCst));
        self.conn.send_status(self.received, settled, false).await?;
        self.health
            .confirmed_lsn
            .store(settled.0, Ordering::Relaxed);
        Ok(())
    }

    /// Give a batch to dispatch, waiting while it pushes back but still sending status updates
    /// so the server does not time us out. False when shutting down.
    async fn hand_over(&mut self, items: Vec<Item>) -> Result<bool, ConnError> {
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Ok(false),
                permit = self.tx.reserve() => {
                    return Ok(match permit {
                        Ok(p) => { p.send(items); true }
                        Err(_) => false, // dispatch is gone: shutting down
                    });
                }
                _ = self.ticker.tick() => self.status().await?,
            }
        }
    }

    /// Final status (only what dispatch settled) and a polite close.
    async fn finish(mut self) -> Result<(), ConnError> {
        self.status().await.ok();
        self.conn.close().await;
        Ok(())
    }
}
