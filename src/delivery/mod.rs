//! The delivery engine: events and checkpoints in (from `intake`), function runs out, and the one
//! word on what the slot may confirm.
//!
//! Per function, events are keyed by row ([`key`]); one key runs one event at a time, in commit
//! order, and different keys run concurrently up to the function's `concurrency`. Within one
//! event, functions start in priority order. A failed run is retried briefly in memory, then
//! parked durably in `pgfire.parked` ([`parked`]), which settles it for the slot; later events of
//! its key for that function are parked behind it, everything else flows. Parked runs are retried
//! from the table with backoff and jitter (`Retry-After` honoured) under the function's current
//! configuration, until `max_attempts` or `max_age` make them `dead`. The slot may confirm the
//! low-water mark of unsettled events ([`watermark`]); work in memory is bounded in events and
//! bytes, and past the bound delivery stops reading, so the backlog waits in the WAL.

mod admission;
pub mod filter;
pub mod key;
mod lane;
pub mod parked;
mod pump;
mod retry;
mod revive;
pub mod status;
mod watermark;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures_util::future::{BoxFuture, FutureExt};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use self::lane::Lane;
use self::parked::{Due, Op, Reply};
use self::watermark::Watermark;
use crate::catalog::{Catalog, FunctionDef};
use crate::events::{Event, EventId, Lsn};
use crate::executions::{Execution, Recorder, Status};
use crate::fasthash::FastMap;
use crate::functions::{Delivery, FunctionError, Kinds};
use crate::intake::Batch;

/// Parked runs retried at once, at most.
const RETRY_SLOTS: usize = 64;
/// How often due parked runs are looked for (and at once after a parked run is resolved).
const RETRY_POLL: Duration = Duration::from_millis(250);
/// How often history older than the retention is pruned (a small batch, again soon while a
/// batch comes back full).
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// A `Retry-After` longer than this parks the run at once instead of waiting in memory.
const MEMORY_WAIT_MAX: Duration = Duration::from_secs(1);
/// Run records handed to the history writer at once.
const HISTORY_BATCH: usize = 1024;

/// Counters shared with the admin endpoint and `pgfire status`.
#[derive(Debug, Default)]
pub struct DeliveryStats {
    pub failures: AtomicU64,
    pub parked: AtomicU64,
    pub dead: AtomicU64,
    /// Events held in memory, unsettled.
    pub in_flight: AtomicU64,
    /// Runs in progress, per function (refreshed about every second).
    pub running: std::sync::Mutex<HashMap<String, u64>>,
    /// Why delivery stopped by itself (the consumer then stops too), if it did.
    pub stopped: std::sync::Mutex<Option<String>>,
}

/// The engine as started by the service.
pub struct Engine {
    /// The configuration in force for retries (the latest applied).
    pub catalog: Arc<Catalog>,
    pub kinds: Arc<Kinds>,
    pub recorder: Recorder,
    pub database_url: String,
    pub stats: Arc<DeliveryStats>,
}

/// One event in memory: built once, shared by its runs.
struct Job {
    event: Event,
    /// Built when a run or a park first needs it (a `log` function with its log level off never
    /// does).
    envelope: std::sync::OnceLock<Arc<[u8]>>,
    /// Worked out when a lane first needs it (a run that ends as it starts, in a lane with
    /// nothing waiting, running or parked, never does).
    key: std::sync::OnceLock<Arc<str>>,
    /// The row's key before this event, when it changed it (an update of the primary key): the
    /// event holds both keys.
    prior: Option<Arc<str>>,
    seq: u64,
}

impl Job {
    /// The job's other key, seen from one of its keys.
    fn other_key(&self, key: &str) -> Option<&Arc<str>> {
        let prior = self.prior.as_ref()?;
        Some(if &**prior == key { self.key() } else { prior })
    }

    /// The row key the job is ordered by.
    fn key(&self) -> &Arc<str> {
        self.key.get_or_init(|| Arc::from(key::of(&self.event)))
    }

    fn envelope(&self) -> Arc<[u8]> {
        self.envelope
            .get_or_init(|| Arc::from(self.event.envelope()))
            .clone()
    }

    /// A delivery of this job's event, sharing its envelope once built.
    fn delivery(&self) -> Delivery<'_> {
        match self.envelope.get() {
            Some(e) => Delivery::with_envelope(&self.event, e.clone()),
            None => Delivery::new(&self.event),
        }
    }
}

/// One function's run of a job.
#[derive(Clone)]
struct Task {
    job: Arc<Job>,
    def: Arc<FunctionDef>,
    attempt: u32,
}

/// A run that ended.
enum Ended {
    /// A run of an event in memory.
    Run {
        task: Task,
        result: Result<(), FunctionError>,
        started_us: i64,
        duration: Duration,
    },
    /// A retry of a parked run.
    Retry(RetryEnded),
}

/// A retry of a parked run that ended: the run, its function as configured when it started, and
/// how it went.
struct RetryEnded {
    due: Due,
    def: Arc<FunctionDef>,
    event_id: EventId,
    result: Result<(), FunctionError>,
    started_us: i64,
    duration: Duration,
}

struct State {
    current: Arc<Catalog>,
    kinds: Arc<Kinds>,
    stats: Arc<DeliveryStats>,
    lanes: FastMap<Arc<str>, Lane>,
    /// Wall-clock time of the runs' start, from the monotonic clock (read once per step).
    clock: WallClock,
    marks: Watermark,
    runs: FuturesUnordered<BoxFuture<'static, Ended>>,
    /// Runs that ended as they started, to handle once the current step is done.
    ended_now: VecDeque<Ended>,
    /// Operations for the parked store not yet taken by its queue.
    outbox: VecDeque<Op>,
    /// Parked runs being retried, by id.
    retrying: HashSet<i64>,
    fetching: bool,
    fetch_soon: bool,
    /// This pgfire streams from the slot: parked runs may be retried and history pruned.
    held: bool,
    pending: Vec<Execution>,
    pending_must_store: bool,
    checkpoint: Option<Lsn>,
    recorder: Recorder,
    /// The last transaction written by `sql` functions, and which: they do not run for its
    /// events.
    loop_guard: Option<(Lsn, HashSet<Arc<str>>)>,
    /// Subscription filters by their text.
    filters: HashMap<Arc<str>, Result<Arc<filter::Filter>, filter::FilterError>>,
}

/// What the consumer says of the replication slot, as delivery needs it: only the pgfire holding
/// the slot delivers (another one holding it retries the same parked runs otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// This pgfire streams from it.
    Held,
    /// The stream is down and may come back here: runs in memory go on, parked runs wait (another
    /// pgfire may be taking the slot).
    Unsure,
    /// Another consumer holds it: delivery stops, and starts afresh when this pgfire takes the
    /// slot over (the stream then starts again where the slot stands).
    Lost,
}

/// Why a tenure (delivery while this pgfire holds the slot) ended.
enum TenureEnd {
    /// pgfire stops, or intake is gone.
    Stop,
    /// The slot is held by another consumer.
    Lost,
    /// This batch opens a takeover: everything before it is stale.
    Takeover(Batch),
}

impl Engine {
    /// Run until the intake channel closes or `shutdown` is cancelled, delivering only while
    /// `slot` says this pgfire holds the slot: when another consumer has it, runs in memory are
    /// dropped and parked runs left alone, until a takeover starts delivery again. Runs in
    /// progress at a stop are left unsettled (delivered again after a restart, or by the
    /// consumer that took the slot); what is settled stays settled.
    pub async fn run(
        self,
        mut rx: mpsc::Receiver<Batch>,
        mut slot: watch::Receiver<Slot>,
        shutdown: CancellationToken,
    ) {
        let Engine {
            mut catalog,
            kinds,
            mut recorder,
            database_url,
            stats,
        } = self;
        let mut first = None;
        // Another consumer held the slot: what comes before the takeover is stale (the stream
        // then starts again where the slot stands, under the configuration in force there).
        let mut lost = false;
        loop {
            if lost && first.is_none() {
                first = loop {
                    let batch = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        b = rx.recv() => match b { Some(b) => b, None => return },
                    };
                    if batch.takeover {
                        break Some(batch);
                    }
                };
            }
            let held = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = slot.wait_for(|s| {
                    lost |= *s == Slot::Lost;
                    *s == Slot::Held
                }) => r.is_ok(),
            };
            if !held {
                return;
            }
            if lost && first.is_none() {
                // Stood by before ever holding it: the takeover comes first.
                continue;
            }
            lost = false;
            let mut s = State::new(catalog, kinds.clone(), stats.clone(), recorder);
            let end = s
                .tenure(&database_url, &mut rx, first.take(), &mut slot, &shutdown)
                .await;
            (catalog, recorder) = (s.current, s.recorder);
            match end {
                TenureEnd::Stop => return,
                TenureEnd::Takeover(batch) => first = Some(batch),
                TenureEnd::Lost => {
                    tracing::info!("another consumer holds the slot: delivery stops until this pgfire takes it over");
                    lost = true;
                }
            }
        }
    }
}

impl State {
    fn new(
        catalog: Arc<Catalog>,
        kinds: Arc<Kinds>,
        stats: Arc<DeliveryStats>,
        recorder: Recorder,
    ) -> State {
        kinds.configure(&catalog);
        State {
            current: catalog,
            kinds,
            stats,
            lanes: FastMap::default(),
            clock: WallClock::now(),
            marks: Watermark::default(),
            runs: FuturesUnordered::new(),
            ended_now: VecDeque::new(),
            outbox: VecDeque::new(),
            retrying: HashSet::new(),
            fetching: false,
            fetch_soon: true,
            held: true,
            pending: Vec::new(),
            pending_must_store: false,
            checkpoint: None,
            recorder,
            loop_guard: None,
            filters: HashMap::new(),
        }
    }

    /// Deliver while this pgfire holds the slot, starting with `first`.
    async fn tenure(
        &mut self,
        database_url: &str,
        rx: &mut mpsc::Receiver<Batch>,
        first: Option<Batch>,
        slot: &mut watch::Receiver<Slot>,
        shutdown: &CancellationToken,
    ) -> TenureEnd {
        let s = self;
        let parked_abandon = shutdown.child_token();
        let (ops, mut replies, parker) =
            parked::start(database_url.to_string(), parked_abandon.clone());
        // The keys parked before this start: their later events wait behind them.
        if ops.send(Op::Load).await.is_err() {
            return TenureEnd::Stop;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return TenureEnd::Stop,
            r = replies.recv() => match r {
                Some(Reply::Loaded(keys)) => {
                    for (function, key, n) in keys {
                        s.lane(&function).blocked.insert(key, (n, 0));
                    }
                }
                _ => return TenureEnd::Stop,
            },
        }
        let mut admitted = first.is_some();
        if let Some(batch) = first {
            s.admit(batch);
            s.drain_ended();
        }
        let mut retry_tick = tokio::time::interval(RETRY_POLL);
        // One timer, reset when it fires (not a new one per step of the loop).
        let prune = tokio::time::sleep(Duration::from_secs(5));
        tokio::pin!(prune);
        let mut flush_tick = tokio::time::interval(Duration::from_millis(10));
        let mut stats_tick = tokio::time::interval(Duration::from_secs(1));
        let end = loop {
            let room = s.has_room();
            tokio::select! {
                biased;
                // 1. pgfire stops.
                _ = shutdown.cancelled() => break TenureEnd::Stop,
                // 2. the slot is lost, or comes back.
                r = slot.changed() => {
                    let now = match r {
                        Ok(()) => *slot.borrow_and_update(),
                        Err(_) => break TenureEnd::Stop,
                    };
                    if now == Slot::Lost {
                        break TenureEnd::Lost;
                    }
                    s.held = now == Slot::Held;
                }
                // 3. the parked store answers (settles runs, unblocks keys).
                r = replies.recv() => match r {
                    Some(r) => s.on_reply(r),
                    None => break TenureEnd::Stop,
                },
                // 4. runs end.
                Some(ended) = s.runs.next(), if !s.runs.is_empty() => {
                    s.on_ended(ended);
                    // Take every other run that ended meanwhile in the same step.
                    for _ in 0..256 {
                        match s.runs.next().now_or_never() {
                            Some(Some(e)) => s.on_ended(e),
                            _ => break,
                        }
                    }
                }
                // 5. operations for the parked store.
                permit = ops.reserve(), if !s.outbox.is_empty() => match permit {
                    Ok(p) => { if let Some(op) = s.outbox.pop_front() { p.send(op) } }
                    Err(_) => break TenureEnd::Stop,
                },
                // 6. new events, while there is room.
                b = rx.recv(), if room => match b {
                    Some(batch) if batch.takeover && admitted => break TenureEnd::Takeover(batch),
                    Some(batch) => {
                        admitted = true;
                        s.admit(batch);
                        s.drain_ended();
                    }
                    None => break TenureEnd::Stop,
                },
                // 7. timers.
                _ = retry_tick.tick() => s.fetch_soon = true,
                _ = &mut prune => {
                    // Pruning, like retries, is the work of the pgfire holding the slot.
                    if s.held {
                        s.outbox.push_back(Op::Prune { retention: s.current.settings.retention });
                    }
                    prune.as_mut().reset(tokio::time::Instant::now() + PRUNE_EVERY);
                }
                _ = flush_tick.tick() => s.flush_history().await,
                _ = stats_tick.tick() => s.publish_stats(),
            }
            s.settle();
            if s.held && s.fetch_soon && !s.fetching && s.retrying.len() < RETRY_SLOTS {
                s.fetch();
            }
            if s.pending.len() >= HISTORY_BATCH {
                s.flush_history().await;
            }
        };
        s.runs = FuturesUnordered::new();
        s.settle();
        s.flush_history().await;
        drop(ops);
        parked_abandon.cancel();
        let _ = parker.await;
        end
    }
}

impl State {
    fn record(
        &mut self,
        task: &Task,
        status: Status,
        error: Option<String>,
        started_us: i64,
        duration: Duration,
    ) {
        let (event, name) = (&task.job.event, &task.def.name);
        self.record_run(
            event,
            name,
            task.attempt,
            status,
            error,
            started_us,
            duration,
        );
    }

    /// Record a run of `function` for `event` (`started_us` 0: now).
    #[allow(clippy::too_many_arguments)]
    fn record_run(
        &mut self,
        event: &Event,
        function: &Arc<str>,
        attempt: u32,
        status: Status,
        error: Option<String>,
        started_us: i64,
        duration: Duration,
    ) {
        self.pending_must_store |= status != Status::Ok;
        self.pending.push(Execution {
            event_id: event.id,
            event_type: event.event_type.clone(),
            function_name: function.clone(),
            error: error.map(String::into_boxed_str),
            started_at_us: if started_us == 0 {
                Utc::now().timestamp_micros()
            } else {
                started_us
            },
            duration_us: duration.as_micros().min(u64::MAX as u128) as u64,
            attempt,
            status,
        });
    }

    /// Settle what the low-water mark passed.
    fn settle(&mut self) {
        if let Some(cp) = self.marks.settled() {
            self.checkpoint = Some(cp);
            self.recorder.settle(cp, self.pending_must_store);
        }
        self.stats
            .in_flight
            .store(self.marks.in_flight().0 as u64, Ordering::Relaxed);
    }

    /// Hand the runs recorded so far to the history writer, with the last settled checkpoint.
    async fn flush_history(&mut self) {
        // The next batch gets the room this one needed (no growing from empty on a busy stream).
        let room = self.pending.len();
        let batch = std::mem::replace(&mut self.pending, Vec::with_capacity(room));
        self.pending_must_store = false;
        self.recorder.record(batch, self.checkpoint).await;
    }

    fn publish_stats(&self) {
        let running = self
            .lanes
            .iter()
            .filter(|(_, l)| l.running > 0)
            .map(|(f, l)| (f.to_string(), l.running as u64))
            .collect();
        if let Ok(mut r) = self.stats.running.lock() {
            *r = running;
        }
    }
}

/// An error message fit for a text column: PostgreSQL text cannot hold NUL (a handler may
/// answer one), so it becomes U+FFFD.
fn clean(message: String) -> String {
    if message.contains('\0') {
        message.replace('\0', "\u{FFFD}")
    } else {
        message
    }
}

/// Wall-clock times from the monotonic clock: one wall-clock reading per step, not per run.
#[derive(Debug, Clone, Copy)]
struct WallClock {
    wall_us: i64,
    at: Instant,
}

impl WallClock {
    fn now() -> WallClock {
        WallClock {
            wall_us: Utc::now().timestamp_micros(),
            at: Instant::now(),
        }
    }

    fn micros_at(&self, t: Instant) -> i64 {
        self.wall_us + t.saturating_duration_since(self.at).as_micros() as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_lose_their_nul_bytes() {
        assert_eq!(clean("a\0b".into()), "a\u{FFFD}b");
        assert_eq!(clean("ab".into()), "ab");
    }
}
