//! The replication consumer: reads slot `pgfire` with pgoutput (protocol v2, streaming of large
//! in-progress transactions, logical messages), hands committed changes to dispatch through a
//! bounded channel, answers keepalives, confirms only settled positions, and reconnects with
//! backoff when PostgreSQL goes away.

pub mod conn;
pub mod decode;
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

    let mut received = start;
    let mut confirmed = Lsn(0);
    let mut batch: Vec<Item> = Vec::with_capacity(BATCH);
    let mut ticker = tokio::time::interval(config.status_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Hand over what we hold before waiting on the network, and whenever a batch is full.
        if !batch.is_empty() && (batch.len() >= BATCH || !conn.has_buffered_message()) {
            let items = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
            let permit = loop {
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => {
                        conn.send_status(received, Lsn(settled.load(Ordering::SeqCst)), false).await.ok();
                        conn.close().await;
                        return Ok(());
                    }
                    p = tx.reserve() => break p,
                    // While dispatch pushes back, keep the server from timing us out.
                    _ = ticker.tick() => {
                        confirmed = Lsn(settled.load(Ordering::SeqCst));
                        conn.send_status(received, confirmed, false).await?;
                        health.confirmed_lsn.store(confirmed.0, Ordering::Relaxed);
                    }
                }
            };
            match permit {
                Ok(p) => p.send(items),
                Err(_) => return Ok(()), // dispatch is gone: shutting down
            }
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                // Final position: only what dispatch settled.
                conn.send_status(received, Lsn(settled.load(Ordering::SeqCst)), false).await.ok();
                conn.close().await;
                return Ok(());
            }
            _ = ticker.tick() => {
                let now = Lsn(settled.load(Ordering::SeqCst));
                conn.send_status(received, now, false).await?;
                if now != confirmed {
                    tracing::debug!(lsn = %now, "confirmed");
                }
                confirmed = now;
                health.confirmed_lsn.store(confirmed.0, Ordering::Relaxed);
            }
            msg = conn.next_message() => match msg? {
                ReplicationMessage::XLogData { wal_start, data, .. } => {
                    received = received.max(wal_start);
                    decoder.decode(data, &mut batch).map_err(|e| ConnError::Protocol(e.to_string()))?;
                    // A committed streamed transaction is handed over a batch at a time.
                    while decoder.replaying() {
                        let room = BATCH.saturating_sub(batch.len());
                        decoder.drain(&mut batch, room).map_err(|e| ConnError::Protocol(e.to_string()))?;
                        if batch.len() >= BATCH {
                            let items = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                            tokio::select! {
                                biased;
                                _ = shutdown.cancelled() => { conn.close().await; return Ok(()); }
                                r = tx.send(items) => if r.is_err() { return Ok(()); },
                            }
                        }
                    }
                    health.received_lsn.store(received.0, Ordering::Relaxed);
                    health.streamed_bytes.store(decoder.streamed_bytes as u64, Ordering::Relaxed);
                }
                ReplicationMessage::Keepalive { wal_end, reply } => {
                    received = received.max(wal_end);
                    health.received_lsn.store(received.0, Ordering::Relaxed);
                    // Between transactions, everything up to the server's position is handed over.
                    if !decoder.in_transaction() {
                        batch.push(Item::Checkpoint(wal_end));
                    }
                    if reply {
                        confirmed = Lsn(settled.load(Ordering::SeqCst));
                        conn.send_status(received, confirmed, false).await?;
                    }
                }
            }
        }
    }
}
