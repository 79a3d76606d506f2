//! The translation step between the consumer and delivery: decoded items in, domain events and
//! checkpoints out. It applies each configuration change where it sits in the stream (recorded in
//! `pgfire.config_applied` before anything after it is turned into events), so every event is
//! built and routed under the configuration of its own commit; delivery never sees a decoder item.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::catalog::{self, Catalog};
use crate::events::{self, row as row_events, Event, Lsn};
use crate::functions::sql::ORIGIN_MESSAGE_PREFIX;
use crate::metrics::Metrics;
use crate::replication::decode::Item;
use crate::replication::TAKEOVER_MESSAGE_PREFIX;

pub use crate::catalog::CONFIG_MESSAGE_PREFIX;

/// The prefix of the message `pgfire.redeliver(...)` writes with the (function, key) pairs it
/// revived.
pub const REVIVED_MESSAGE_PREFIX: &str = "pgfire.revived";

/// Events built under one configuration, then optionally a checkpoint: every event before it
/// is in this batch or an earlier one.
#[derive(Debug)]
pub struct Batch {
    pub catalog: Arc<Catalog>,
    pub events: Vec<Event>,
    /// Transactions written by a `sql` function (commit LSN, function): that function is not
    /// run for their events (no loops). Each comes before the events it is about.
    pub loops: Vec<(Lsn, Arc<str>)>,
    pub checkpoint: Option<Lsn>,
    /// Dead runs sent again (`pgfire.redeliver`), as (function, key): later events of the key
    /// wait behind them. Each comes before the events committed after it.
    pub revived: Vec<(Arc<str>, Arc<str>)>,
    /// The first batch after this pgfire took the slot over from another consumer: what
    /// delivery was handed before is stale (the stream starts again where the slot stands).
    pub takeover: bool,
}

impl Batch {
    /// Nothing for delivery but perhaps a checkpoint.
    fn is_empty(&self) -> bool {
        self.events.is_empty() && self.loops.is_empty() && self.revived.is_empty() && !self.takeover
    }
}

/// Why intake stopped by itself.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("cannot apply the configuration change at {at}: {source}")]
    Config {
        at: Lsn,
        #[source]
        source: catalog::CatalogError,
    },
}

pub struct Intake {
    pub catalog: Arc<Catalog>,
    pub database_url: String,
    /// The slot read (configuration snapshots older than its position are pruned).
    pub slot: String,
    /// Sources already warned about for lacking REPLICA IDENTITY FULL.
    pub warned_identity: std::collections::HashSet<u32>,
    pub builder: events::Builder,
    /// Where intake says why it stopped (delivery then stops, and the consumer with it).
    pub stats: Arc<crate::delivery::DeliveryStats>,
    /// Where events are counted by type.
    pub metrics: Arc<Metrics>,
}

impl Intake {
    /// Run until the consumer's channel closes, delivery is gone or `shutdown` is cancelled.
    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<Vec<Item>>,
        tx: mpsc::Sender<Batch>,
        shutdown: CancellationToken,
    ) {
        loop {
            let items = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                b = rx.recv() => match b { Some(b) => b, None => return },
            };
            let mut out = Batch {
                catalog: self.catalog.clone(),
                events: Vec::with_capacity(items.len()),
                loops: Vec::new(),
                checkpoint: None,
                revived: Vec::new(),
                takeover: false,
            };
            for item in items {
                match item {
                    Item::Message {
                        prefix,
                        content,
                        lsn,
                        commit,
                        ..
                    } if prefix == CONFIG_MESSAGE_PREFIX || prefix == TAKEOVER_MESSAGE_PREFIX => {
                        let at = commit.map(|c| c.lsn).unwrap_or(lsn);
                        let takeover = prefix == TAKEOVER_MESSAGE_PREFIX;
                        if takeover {
                            // A new stream: nothing of a transaction before it goes on.
                            self.builder = Default::default();
                        }
                        // The events before it go out under the configuration they were built with.
                        if !out.is_empty()
                            && !send(&tx, &mut out, &self.catalog, &self.metrics).await
                        {
                            return;
                        }
                        match self.apply_config(&content, at, &shutdown).await {
                            Ok(true) => {
                                out.catalog = self.catalog.clone();
                                out.takeover |= takeover;
                            }
                            Ok(false) => return,
                            Err(err) => {
                                tracing::error!(error = %err, "cannot apply a configuration change; delivery stops");
                                if let Ok(mut s) = self.stats.stopped.lock() {
                                    *s = Some(err.to_string());
                                }
                                return;
                            }
                        }
                    }
                    Item::Message {
                        prefix,
                        content,
                        commit: Some(commit),
                        ..
                    } if prefix == ORIGIN_MESSAGE_PREFIX => {
                        let function = String::from_utf8_lossy(&content);
                        out.loops.push((commit.lsn, Arc::from(function.as_ref())));
                    }
                    Item::Message {
                        prefix,
                        content,
                        commit: Some(_),
                        ..
                    } if prefix == REVIVED_MESSAGE_PREFIX => {
                        match serde_json::from_slice::<Vec<(String, String)>>(&content) {
                            Ok(pairs) => out.revived.extend(
                                pairs.into_iter().map(|(f, k)| (Arc::from(f), Arc::from(k))),
                            ),
                            // Written by pgfire's own SQL; should it not read, the revived runs
                            // still run (their rows are just not held behind them).
                            Err(err) => {
                                tracing::warn!(error = %err, "unreadable pgfire.revived message")
                            }
                        }
                    }
                    Item::Checkpoint(lsn) => {
                        out.checkpoint = Some(lsn);
                        if !send(&tx, &mut out, &self.catalog, &self.metrics).await {
                            return;
                        }
                    }
                    item => {
                        if let Item::Row(change) = &item {
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
                        }
                        self.builder.push(item, &self.catalog, &mut out.events);
                    }
                }
            }
            if !out.is_empty() && !send(&tx, &mut out, &self.catalog, &self.metrics).await {
                return;
            }
        }
    }

    /// Apply the configuration a change committed at `at` carries, and record it in
    /// `pgfire.config_applied` before going on, so a restart resumes with it once the slot has
    /// moved past. `Ok(false)` when shutdown came first.
    async fn apply_config(
        &mut self,
        content: &[u8],
        at: Lsn,
        shutdown: &CancellationToken,
    ) -> Result<bool, IntakeError> {
        let snapshot = match std::str::from_utf8(content) {
            Ok(text) if text.trim_start().starts_with('{') => text.to_string(),
            // A change written by a pgfire before 0.1.1 names only the table: read today's.
            _ => match retry(
                &self.database_url,
                shutdown,
                "read the configuration",
                |url| async move {
                    let c = crate::db::connect(&url).await.map_err(|e| e.to_string())?;
                    catalog::current_snapshot(&c)
                        .await
                        .map_err(|e| e.to_string())
                },
            )
            .await
            {
                Some(text) => text,
                None => return Ok(false),
            },
        };
        let config = |source| IntakeError::Config { at, source };
        // Checked before anything is written for it.
        Catalog::from_snapshot(&snapshot, &Default::default()).map_err(config)?;
        let slot = self.slot.clone();
        let text = snapshot.clone();
        let secrets = retry(
            &self.database_url,
            shutdown,
            "record the applied configuration",
            |url| {
                let (slot, text) = (slot.clone(), text.clone());
                async move {
                    let c = crate::db::connect(&url).await.map_err(|e| e.to_string())?;
                    catalog::record_applied(&c, &slot, at, &text)
                        .await
                        .map_err(|e| e.to_string())?;
                    catalog::secrets(&c).await.map_err(|e| e.to_string())
                }
            },
        )
        .await;
        let Some(secrets) = secrets else {
            return Ok(false);
        };
        self.catalog = Arc::new(Catalog::from_snapshot(&snapshot, &secrets).map_err(config)?);
        tracing::info!(lsn = %at, "configuration applied");
        Ok(true)
    }
}

/// Hand `out` to delivery and start a new batch under `catalog`; false when delivery is gone.
/// Its events are counted by type: events are built only for types with a subscription, so the
/// label values are bounded by `pgfire.subscriptions` (anything else counts as `other`).
async fn send(
    tx: &mpsc::Sender<Batch>,
    out: &mut Batch,
    catalog: &Arc<Catalog>,
    metrics: &Metrics,
) -> bool {
    if !out.events.is_empty() {
        let subscribed = &out.catalog.subscriptions;
        metrics.events(out.events.iter().map(|e| &*e.event_type), |t| {
            subscribed.contains_key(t)
        });
    }
    let next = Batch {
        catalog: catalog.clone(),
        events: Vec::new(),
        loops: Vec::new(),
        checkpoint: None,
        revived: Vec::new(),
        takeover: false,
    };
    tx.send(std::mem::replace(out, next)).await.is_ok()
}

/// Run `op` until it succeeds, with backoff; `None` when shutdown came first.
async fn retry<T, F, Fut>(
    database_url: &str,
    shutdown: &CancellationToken,
    what: &str,
    op: F,
) -> Option<T>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let mut delay = Duration::from_millis(100);
    loop {
        match op(database_url.to_string()).await {
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
