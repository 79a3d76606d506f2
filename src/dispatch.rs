//! Dispatch: committed changes in, subscribed functions run, settled positions out.
//!
//! Items arrive in commit order. For each event, the subscribed functions run in priority order
//! (lower first), one at a time; a failing run is retried with backoff and recorded as `dead`
//! after the last attempt. A checkpoint is settled once everything before it has run, which is
//! what lets the replication slot advance: nothing unsettled is ever confirmed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::task::Poll;

use chrono::{DateTime, TimeDelta, Utc};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::catalog::{self, Catalog, Subscription};
use crate::events::{self, row as row_events};
use crate::events::{Event, Lsn};
use crate::executions::{Execution, Recorder, Status};
use crate::functions::{Delivery, FunctionError, Kinds};
use crate::replication::decode::Item;

pub use crate::catalog::CONFIG_MESSAGE_PREFIX;

/// Counters shared with the admin endpoint.
#[derive(Debug, Default)]
pub struct DispatchStats {
    pub events: AtomicU64,
    pub runs: AtomicU64,
    pub failures: AtomicU64,
    /// Why dispatch stopped by itself (the consumer then stops too), if it did.
    pub stopped: std::sync::Mutex<Option<String>>,
}

pub struct Dispatcher {
    pub catalog: Arc<Catalog>,
    pub database_url: String,
    /// The slot read (configuration snapshots older than its position are pruned).
    pub slot: String,
    /// Sources already warned about for lacking REPLICA IDENTITY FULL.
    pub warned_identity: std::collections::HashSet<u32>,
    /// Turns decoded items into events.
    pub builder: events::Builder,
    pub kinds: Kinds,
    pub recorder: Recorder,
    /// Runs not yet handed to the history writer (sent once per batch of items).
    pub pending: Vec<Execution>,
    /// Some run in `pending` did not end `ok` (its record must be stored before the slot moves).
    pub pending_must_store: bool,
    /// The last checkpoint passed: every event before it has run.
    pub checkpoint: Option<Lsn>,
    pub stats: Arc<DispatchStats>,
}

impl Dispatcher {
    /// Run until the channel closes or `shutdown` is cancelled (then the current event is left
    /// unsettled, to be delivered again after a restart).
    pub async fn run(mut self, mut rx: mpsc::Receiver<Vec<Item>>, shutdown: CancellationToken) {
        'batches: loop {
            let batch = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                b = rx.recv() => match b { Some(b) => b, None => break },
            };
            let clock = WallClock::now();
            for item in batch {
                if !self.handle(item, &clock, &shutdown).await {
                    break 'batches;
                }
            }
            self.flush_history().await;
        }
        self.flush_history().await;
    }

    /// Hand the runs recorded so far to the history writer.
    async fn flush_history(&mut self) {
        let next = Vec::with_capacity(self.pending.len());
        let batch = std::mem::replace(&mut self.pending, next);
        self.pending_must_store = false;
        self.recorder.record(batch, self.checkpoint).await;
    }

    /// Handle one item; false when shutdown interrupted it.
    async fn handle(
        &mut self,
        item: Item,
        clock: &WallClock,
        shutdown: &CancellationToken,
    ) -> bool {
        match item {
            Item::Row(ref change) => {
                if self.catalog.sources.contains_key(&change.relation.oid)
                    && row_events::lacks_old_values(change)
                    && self.warned_identity.insert(change.relation.oid)
                {
                    let rel = &change.relation;
                    tracing::warn!(
                        source = %format_args!("{}.{}", rel.schema, rel.name),
                        "source lacks REPLICA IDENTITY FULL: old values are missing from its events (named in old_missing); run ALTER TABLE ... REPLICA IDENTITY FULL, or SELECT pgfire.full_identity('table') for a partitioned one"
                    );
                }
                self.deliver_item(item, clock, shutdown).await
            }
            Item::Message {
                prefix,
                content,
                lsn,
                commit,
                ..
            } if prefix == CONFIG_MESSAGE_PREFIX => {
                let at = commit.map(|c| c.lsn).unwrap_or(lsn);
                self.apply_config(&content, at, shutdown).await
            }
            Item::Message { .. } | Item::Truncate { .. } => {
                self.deliver_item(item, clock, shutdown).await
            }
            Item::Checkpoint(lsn) => {
                self.checkpoint = Some(lsn);
                self.recorder.settle(lsn, self.pending_must_store);
                true
            }
        }
    }

    /// Deliver the events of one item, as of the configuration in force.
    async fn deliver_item(
        &mut self,
        item: Item,
        clock: &WallClock,
        shutdown: &CancellationToken,
    ) -> bool {
        // The snapshot in use for these events, even if a reload swaps it meanwhile.
        let catalog = self.catalog.clone();
        let mut events = Vec::new();
        self.builder.push(item, &catalog, &mut events);
        for event in &events {
            let subs = catalog.subscribers(&event.event_type);
            if !self.deliver(event, subs, &catalog, clock, shutdown).await {
                return false;
            }
        }
        true
    }

    /// Apply the configuration a change committed at `at` carries, and record it in
    /// `pgfire.config_applied` before going on, so a restart resumes with it once the slot has
    /// moved past. False when shutdown came first or the snapshot cannot be applied: then
    /// nothing after the change is settled.
    async fn apply_config(
        &mut self,
        content: &[u8],
        at: Lsn,
        shutdown: &CancellationToken,
    ) -> bool {
        let snapshot = match std::str::from_utf8(content) {
            Ok(text) if text.trim_start().starts_with('{') => text,
            // A change written by a pgfire before 0.1.1 names only the table: read today's.
            _ => match self
                .retry(shutdown, "read the configuration", |url| async move {
                    let c = crate::db::connect(&url).await.map_err(|e| e.to_string())?;
                    catalog::current_snapshot(&c)
                        .await
                        .map_err(|e| e.to_string())
                })
                .await
            {
                Some(text) => return self.install_config(&text, at, shutdown).await,
                None => return false,
            },
        };
        let snapshot = snapshot.to_string();
        self.install_config(&snapshot, at, shutdown).await
    }

    async fn install_config(
        &mut self,
        snapshot: &str,
        at: Lsn,
        shutdown: &CancellationToken,
    ) -> bool {
        let stop = |stats: &DispatchStats, err: catalog::CatalogError| {
            // Not something retrying fixes, and nothing after it may be settled: stop.
            tracing::error!(error = %err, lsn = %at, "cannot apply a configuration change; dispatch stops");
            if let Ok(mut e) = stats.stopped.lock() {
                *e = Some(format!(
                    "cannot apply the configuration change at {at}: {err}"
                ));
            }
        };
        // Checked before anything is written for it.
        if let Err(err) = Catalog::from_snapshot(snapshot, &Default::default()) {
            stop(&self.stats, err);
            return false;
        }
        let slot = self.slot.clone();
        let text = snapshot.to_string();
        let secrets = self
            .retry(shutdown, "record the applied configuration", |url| {
                let (slot, text) = (slot.clone(), text.clone());
                async move {
                    let c = crate::db::connect(&url).await.map_err(|e| e.to_string())?;
                    catalog::record_applied(&c, &slot, at, &text)
                        .await
                        .map_err(|e| e.to_string())?;
                    catalog::secrets(&c).await.map_err(|e| e.to_string())
                }
            })
            .await;
        let Some(secrets) = secrets else {
            return false;
        };
        let catalog = match Catalog::from_snapshot(snapshot, &secrets) {
            Ok(c) => c,
            Err(err) => {
                stop(&self.stats, err);
                return false;
            }
        };
        self.catalog = Arc::new(catalog);
        tracing::info!(lsn = %at, "configuration applied");
        true
    }

    /// Run `op` until it succeeds, with backoff; `None` when shutdown came first.
    async fn retry<T, F, Fut>(&self, shutdown: &CancellationToken, what: &str, op: F) -> Option<T>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Result<T, String>>,
    {
        let mut delay = Duration::from_millis(100);
        loop {
            match op(self.database_url.clone()).await {
                Ok(v) => return Some(v),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot {what}; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Run every subscription for `event`.
    async fn deliver(
        &mut self,
        event: &Event,
        subs: &[Subscription],
        catalog: &Catalog,
        clock: &WallClock,
        shutdown: &CancellationToken,
    ) -> bool {
        self.stats.events.fetch_add(1, Ordering::Relaxed);
        let delivery = Delivery::new(event);
        let settings = &catalog.settings;
        // The envelope is event_data and less than 4 kB around it (names are at most 63 bytes):
        // build it to check the limit only when it may be too big.
        let too_big = if event.data.json().len() + 4096 < settings.payload_limit {
            None
        } else {
            let size = delivery.envelope().len();
            (size > settings.payload_limit).then(|| {
                format!("event payload of {size} bytes exceeds the limit of {} bytes (setting limits.payload_bytes)", settings.payload_limit)
            })
        };
        for sub in subs {
            let def = &sub.function;
            let mut attempt = 1;
            loop {
                let t0 = Instant::now();
                let started_at = clock.at(t0);
                let result = match &too_big {
                    Some(msg) => Err(FunctionError::Failed(msg.clone())),
                    None if shutdown.is_cancelled() => return false,
                    None => {
                        // A run that finishes at once (a log line) needs no cancellation point.
                        let run = self.kinds.post(def, &delivery);
                        tokio::pin!(run);
                        match futures_util::poll!(&mut run) {
                            Poll::Ready(r) => r,
                            Poll::Pending => tokio::select! {
                                biased;
                                _ = shutdown.cancelled() => return false,
                                r = &mut run => r,
                            },
                        }
                    }
                };
                self.stats.runs.fetch_add(1, Ordering::Relaxed);
                let duration = t0.elapsed();
                let last = too_big.is_some() || attempt >= settings.max_attempts;
                let (status, error) = match &result {
                    Ok(()) => (Status::Ok, None),
                    Err(e) => {
                        self.stats.failures.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(function = %def.name, event_id = %event.id, attempt, error = %e, "function failed");
                        let status = if last { Status::Dead } else { e.status() };
                        self.pending_must_store = true;
                        (status, Some(e.to_string().into_boxed_str()))
                    }
                };
                self.pending.push(Execution {
                    event_id: event.id,
                    event_type: event.event_type.clone(),
                    function_name: def.name.clone(),
                    error,
                    started_at_us: started_at.timestamp_micros(),
                    duration_us: duration.as_micros().min(u64::MAX as u128) as u64,
                    attempt,
                    status,
                });
                if result.is_ok() || last {
                    break;
                }
                // A failing function's attempts show in the history while it waits.
                self.flush_history().await;
                let delay = backoff(settings.retry_base, settings.retry_max, attempt);
                tokio::select! {
                    _ = shutdown.cancelled() => return false,
                    _ = tokio::time::sleep(delay) => {}
                }
                attempt += 1;
            }
        }
        true
    }
}

/// Wall-clock times from the monotonic clock: one wall-clock reading per batch, not per run.
struct WallClock {
    wall: DateTime<Utc>,
    at: Instant,
}

impl WallClock {
    fn now() -> WallClock {
        WallClock {
            wall: Utc::now(),
            at: Instant::now(),
        }
    }

    fn at(&self, t: Instant) -> DateTime<Utc> {
        self.wall + TimeDelta::from_std(t.saturating_duration_since(self.at)).unwrap_or_default()
    }
}

/// Delay before retry number `attempt` (1-based): base doubling, capped.
pub fn backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
        .min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let b = Duration::from_millis(100);
        let m = Duration::from_secs(1);
        assert_eq!(backoff(b, m, 1), Duration::from_millis(100));
        assert_eq!(backoff(b, m, 2), Duration::from_millis(200));
        assert_eq!(backoff(b, m, 4), Duration::from_millis(800));
        assert_eq!(backoff(b, m, 5), m);
        assert_eq!(backoff(b, m, 100), m);
    }
}
