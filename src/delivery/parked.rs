//! The durable retry queue, `pgfire.parked`: a task of its own with one connection, taking
//! operations in order and answering them in the same order (so a run parked behind another of
//! its row gets a later id, and a count of the rows still parked for a key reflects every
//! operation sent before it). An operation that fails for a lost connection is sent again on a
//! new one until it is stored: parking is idempotent (one row per function and event), resolving
//! too, so nothing is lost and nothing doubled.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio_postgres::types::Type;
use tokio_util::sync::CancellationToken;

/// Operations queued at most (delivery waits past it).
const QUEUE: usize = 4096;

/// A run to store as parked (to retry) or dead.
#[derive(Debug, Clone)]
pub struct Park {
    /// The event's sequence number in delivery (answered back, to settle it).
    pub seq: u64,
    pub function: Arc<str>,
    pub key: Arc<str>,
    pub event_id: String,
    pub event_type: Arc<str>,
    pub envelope: Arc<[u8]>,
    pub dead: bool,
    pub attempt: u32,
    pub delay: Duration,
    pub error: Option<String>,
}

/// What became of a parked run after a retry.
#[derive(Debug, Clone)]
pub enum Resolution {
    /// Delivered: the row goes.
    Done,
    /// Failed again: next try after `delay`.
    Retry {
        attempt: u32,
        delay: Duration,
        error: String,
    },
    /// Given up: kept as dead, with its envelope.
    Dead { attempt: u32, error: String },
}

/// A parked run due for a retry: the head of its key.
#[derive(Debug, Clone)]
pub struct Due {
    pub id: i64,
    pub function: Arc<str>,
    pub key: Arc<str>,
    pub event_id: String,
    pub event_type: Arc<str>,
    pub envelope: Arc<[u8]>,
    pub attempt: u32,
    pub parked_at: DateTime<Utc>,
    /// Its function exists and is active in `pgfire.functions` now.
    pub function_live: bool,
}

#[derive(Debug)]
pub enum Op {
    Park(Park),
    Resolve {
        id: i64,
        function: Arc<str>,
        key: Arc<str>,
        resolution: Resolution,
    },
    /// Heads of keys due now, not among `running`, not of `paused` functions.
    Fetch {
        running: Vec<i64>,
        paused: Vec<String>,
        limit: i64,
    },
    /// Keys with parked runs, per function, and how many.
    Load,
    /// How many runs of one key are parked.
    Count {
        function: Arc<str>,
        key: Arc<str>,
    },
    /// Prune history and dead runs older than `retention`, a small batch at a time.
    Prune {
        retention: Duration,
    },
}

#[derive(Debug)]
pub enum Reply {
    Parked {
        seq: u64,
        function: Arc<str>,
        key: Arc<str>,
        dead: bool,
    },
    /// `remaining`: runs of this key still parked (not dead) once the resolution is stored.
    Resolved {
        function: Arc<str>,
        key: Arc<str>,
        remaining: i64,
    },
    Due(Vec<Due>),
    Loaded(Vec<(Arc<str>, Arc<str>, i64)>),
    Counted {
        function: Arc<str>,
        key: Arc<str>,
        parked: i64,
    },
    /// Rows pruned (a full batch: there may be more).
    Pruned(u64),
}

#[derive(Debug, thiserror::Error)]
pub enum ParkedError {
    #[error("{}", crate::db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("invalid database URL: {0}")]
    Url(String),
}

impl ParkedError {
    /// Every failure here is retried (a bad URL fails earlier, at start).
    pub fn kind(&self) -> crate::functions::ErrorKind {
        crate::functions::ErrorKind::Transient
    }
}

/// Rows pruned per statement.
pub const PRUNE_BATCH: i64 = 1000;

/// Start the task; it ends when the sender is dropped (after the queued operations) or at
/// `abandon`.
pub fn start(
    database_url: String,
    abandon: CancellationToken,
) -> (
    mpsc::Sender<Op>,
    mpsc::Receiver<Reply>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let (reply_tx, reply_rx) = mpsc::channel(QUEUE);
    let task = tokio::spawn(run(database_url, rx, reply_tx, abandon));
    (tx, reply_rx, task)
}

async fn run(
    url: String,
    mut rx: mpsc::Receiver<Op>,
    tx: mpsc::Sender<Reply>,
    abandon: CancellationToken,
) {
    let mut client: Option<tokio_postgres::Client> = None;
    let mut batch = Vec::with_capacity(256);
    loop {
        if rx.recv_many(&mut batch, 256).await == 0 {
            return;
        }
        let mut delay = Duration::from_millis(100);
        let replies = loop {
            match apply(&url, &mut client, &batch).await {
                Ok(r) => break r,
                Err(err) => {
                    client = None;
                    tracing::warn!(error = %err, retry_in = ?delay, "cannot write pgfire.parked; retrying (the runs stay unsettled meanwhile)");
                    tokio::select! {
                        _ = abandon.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        };
        batch.clear();
        for r in replies {
            if tx.send(r).await.is_err() {
                return;
            }
        }
    }
}

const PARK: &str = "INSERT INTO pgfire.parked (function_name, key, event_id, event_type, envelope, status, attempt, next_try, last_error)
     VALUES ($1, $2, $3, $4, $5::text::json, $6, $7, now() + $8::int8 * interval '1 millisecond', $9)
     ON CONFLICT (function_name, event_id) DO NOTHING";
const DONE: &str = "WITH d AS (DELETE FROM pgfire.parked WHERE id = $1)
     SELECT count(*) FROM pgfire.parked WHERE function_name = $2 AND key = $3 AND status = 'parked' AND id <> $1";
const RETRY: &str = "WITH u AS (UPDATE pgfire.parked SET attempt = $4, next_try = now() + $5::int8 * interval '1 millisecond', last_error = $6 WHERE id = $1)
     SELECT count(*) FROM pgfire.parked WHERE function_name = $2 AND key = $3 AND status = 'parked'";
const DEAD: &str = "WITH u AS (UPDATE pgfire.parked SET status = 'dead', attempt = $4, last_error = $5 WHERE id = $1)
     SELECT count(*) FROM pgfire.parked WHERE function_name = $2 AND key = $3 AND status = 'parked' AND id <> $1";
const FETCH: &str =
    "SELECT id, function_name, key, event_id, event_type, envelope::text, attempt, parked_at,
            EXISTS (SELECT 1 FROM pgfire.functions f WHERE f.name = heads.function_name AND f.active) FROM (
         SELECT DISTINCT ON (function_name, key) * FROM pgfire.parked
          WHERE status = 'parked' AND function_name <> ALL($2::text[])
          ORDER BY function_name, key, id) heads
      WHERE next_try <= now() AND id <> ALL($1::int8[])
      ORDER BY next_try LIMIT $3";
const COUNT: &str =
    "SELECT count(*) FROM pgfire.parked WHERE function_name = $1 AND key = $2 AND status = 'parked'";
const LOAD: &str =
    "SELECT function_name, key, count(*) FROM pgfire.parked WHERE status = 'parked' GROUP BY 1, 2";
const PRUNE: &str = "WITH e AS (DELETE FROM pgfire.executions WHERE id IN (
             SELECT id FROM pgfire.executions WHERE started_at < now() - $1::int8 * interval '1 second' ORDER BY id LIMIT $2)
             RETURNING 1),
      p AS (DELETE FROM pgfire.parked WHERE id IN (
             SELECT id FROM pgfire.parked WHERE status = 'dead' AND parked_at < now() - $1::int8 * interval '1 second' LIMIT $2)
             RETURNING 1)
     SELECT (SELECT count(*) FROM e) + (SELECT count(*) FROM p)";

fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

/// Apply a batch of operations, pipelined on one connection (sent in order, executed in order).
async fn apply(
    url: &str,
    client: &mut Option<tokio_postgres::Client>,
    ops: &[Op],
) -> Result<Vec<Reply>, ParkedError> {
    if client.is_none() {
        let (mut config, tls) =
            crate::db::config(url).map_err(|e| ParkedError::Url(e.to_string()))?;
        config.application_name("pgfire parked");
        let (c, conn) = config.connect(tls).await?;
        tokio::spawn(conn);
        *client = Some(c);
    }
    let Some(c) = client.as_ref() else {
        return Ok(Vec::new());
    };
    let futures = ops.iter().map(|op| one(c, op));
    let results = futures_util::future::join_all(futures).await;
    results.into_iter().collect()
}

async fn one(c: &tokio_postgres::Client, op: &Op) -> Result<Reply, ParkedError> {
    use Type as T;
    Ok(match op {
        Op::Park(p) => {
            let envelope = String::from_utf8_lossy(&p.envelope);
            let status = if p.dead { "dead" } else { "parked" };
            let attempt = p.attempt as i32;
            let delay = ms(p.delay);
            c.execute_typed(
                PARK,
                &[
                    (&&*p.function, T::TEXT),
                    (&&*p.key, T::TEXT),
                    (&p.event_id, T::TEXT),
                    (&&*p.event_type, T::TEXT),
                    (&&*envelope, T::TEXT),
                    (&status, T::TEXT),
                    (&attempt, T::INT4),
                    (&delay, T::INT8),
                    (&p.error, T::TEXT),
                ],
            )
            .await?;
            Reply::Parked {
                seq: p.seq,
                function: p.function.clone(),
                key: p.key.clone(),
                dead: p.dead,
            }
        }
        Op::Resolve {
            id,
            function,
            key,
            resolution,
        } => {
            let (f, k) = (&**function, &**key);
            let row = match resolution {
                Resolution::Done => {
                    c.query_typed(DONE, &[(id, T::INT8), (&f, T::TEXT), (&k, T::TEXT)])
                        .await?
                }
                Resolution::Retry {
                    attempt,
                    delay,
                    error,
                } => {
                    let (a, d) = (*attempt as i32, ms(*delay));
                    c.query_typed(
                        RETRY,
                        &[
                            (id, T::INT8),
                            (&f, T::TEXT),
                            (&k, T::TEXT),
                            (&a, T::INT4),
                            (&d, T::INT8),
                            (error, T::TEXT),
                        ],
                    )
                    .await?
                }
                Resolution::Dead { attempt, error } => {
                    let a = *attempt as i32;
                    c.query_typed(
                        DEAD,
                        &[
                            (id, T::INT8),
                            (&f, T::TEXT),
                            (&k, T::TEXT),
                            (&a, T::INT4),
                            (error, T::TEXT),
                        ],
                    )
                    .await?
                }
            };
            Reply::Resolved {
                function: function.clone(),
                key: key.clone(),
                remaining: row.first().map(|r| r.get(0)).unwrap_or(0),
            }
        }
        Op::Fetch {
            running,
            paused,
            limit,
        } => {
            let rows = c
                .query_typed(
                    FETCH,
                    &[
                        (running, T::INT8_ARRAY),
                        (paused, T::TEXT_ARRAY),
                        (limit, T::INT8),
                    ],
                )
                .await?;
            Reply::Due(
                rows.iter()
                    .map(|r| Due {
                        id: r.get(0),
                        function: Arc::from(r.get::<_, &str>(1)),
                        key: Arc::from(r.get::<_, &str>(2)),
                        event_id: r.get(3),
                        event_type: Arc::from(r.get::<_, &str>(4)),
                        envelope: Arc::from(r.get::<_, &str>(5).as_bytes()),
                        attempt: r.get::<_, i32>(6).max(0) as u32,
                        parked_at: r.get(7),
                        function_live: r.get(8),
                    })
                    .collect(),
            )
        }
        Op::Load => {
            let rows = c.query_typed(LOAD, &[]).await?;
            Reply::Loaded(
                rows.iter()
                    .map(|r| {
                        (
                            Arc::from(r.get::<_, &str>(0)),
                            Arc::from(r.get::<_, &str>(1)),
                            r.get::<_, i64>(2),
                        )
                    })
                    .collect(),
            )
        }
        Op::Count { function, key } => {
            let (f, k) = (&**function, &**key);
            let row = c
                .query_typed(COUNT, &[(&f, T::TEXT), (&k, T::TEXT)])
                .await?;
            Reply::Counted {
                function: function.clone(),
                key: key.clone(),
                parked: row.first().map(|r| r.get(0)).unwrap_or(0),
            }
        }
        Op::Prune { retention } => {
            let secs = retention.as_secs().min(i64::MAX as u64) as i64;
            let row = c
                .query_typed(PRUNE, &[(&secs, T::INT8), (&PRUNE_BATCH, T::INT8)])
                .await?;
            Reply::Pruned(row.first().map(|r| r.get::<_, i64>(0)).unwrap_or(0) as u64)
        }
    })
}
