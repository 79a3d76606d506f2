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

mod fasthash;
pub mod filter;
pub mod key;
pub mod parked;
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
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use self::fasthash::{FastMap, FastSet};
use self::parked::{Due, Op, Park, Reply, Resolution};
use self::watermark::Watermark;
use crate::catalog::{Catalog, FunctionDef, Settings};
use crate::events::{Event, EventId, Lsn};
use crate::executions::{Execution, Recorder, Status};
use crate::functions::{Delivery, ErrorKind, FunctionError, Kinds};
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
    pub events: AtomicU64,
    pub runs: AtomicU64,
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
    key: Arc<str>,
    seq: u64,
}

impl Job {
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
    Retry {
        due: Due,
        def: Arc<FunctionDef>,
        event_id: EventId,
        result: Result<(), FunctionError>,
        started_us: i64,
        duration: Duration,
    },
}

/// Per function: what waits and what runs, by key.
#[derive(Default)]
struct Lane {
    /// Tasks waiting, per key; a key is here while it has a task waiting or running.
    queues: FastMap<Arc<str>, VecDeque<Task>>,
    /// Keys with a task running (or waiting in memory for its retry).
    busy: FastSet<Arc<str>>,
    /// Keys with tasks waiting and none running, in the order they became so.
    ready: VecDeque<Arc<str>>,
    running: usize,
    concurrency: usize,
    /// Keys with runs parked: (rows known stored, parks sent and not yet confirmed). Their later
    /// events are parked behind them.
    blocked: FastMap<Arc<str>, (i64, u64)>,
    /// The function is paused (as the configuration in force says).
    paused: bool,
}

impl Lane {
    fn is_blocked(&self, key: &str) -> bool {
        self.blocked
            .get(key)
            .is_some_and(|(db, sent)| *db + *sent as i64 > 0)
    }

    /// The key's running task ended: its next one (if any) may start.
    fn release(&mut self, key: &Arc<str>) {
        self.busy.remove(key);
        match self.queues.get(key) {
            Some(q) if !q.is_empty() => self.ready.push_back(key.clone()),
            _ => {
                self.queues.remove(key);
            }
        }
    }
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

impl Engine {
    /// Run until the intake channel closes or `shutdown` is cancelled. Runs in progress then are
    /// left unsettled (delivered again after a restart); what is settled stays settled.
    pub async fn run(self, mut rx: mpsc::Receiver<Batch>, shutdown: CancellationToken) {
        let parked_abandon = shutdown.child_token();
        let (ops, mut replies, parker) =
            parked::start(self.database_url.clone(), parked_abandon.clone());
        self.kinds.configure(&self.catalog);
        let mut s = State {
            current: self.catalog,
            kinds: self.kinds,
            stats: self.stats,
            lanes: FastMap::default(),
            clock: WallClock::now(),
            marks: Watermark::default(),
            runs: FuturesUnordered::new(),
            ended_now: VecDeque::new(),
            outbox: VecDeque::new(),
            retrying: HashSet::new(),
            fetching: false,
            fetch_soon: true,
            pending: Vec::new(),
            pending_must_store: false,
            checkpoint: None,
            recorder: self.recorder,
            loop_guard: None,
            filters: HashMap::new(),
        };
        // The keys parked before this start: their later events wait behind them.
        if ops.send(Op::Load).await.is_err() {
            return;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = replies.recv() => match r {
                Some(Reply::Loaded(keys)) => {
                    for (function, key, n) in keys {
                        s.lane(&function).blocked.insert(key, (n, 0));
                    }
                }
                _ => return,
            },
        }
        let mut retry_tick = tokio::time::interval(RETRY_POLL);
        // One timer, reset when it fires (not a new one per step of the loop).
        let prune = tokio::time::sleep(Duration::from_secs(5));
        tokio::pin!(prune);
        let mut flush_tick = tokio::time::interval(Duration::from_millis(10));
        let mut stats_tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            let (events, bytes) = s.marks.in_flight();
            let settings = &s.current.settings;
            let room = events < settings.max_in_flight
                && bytes < settings.max_in_flight_bytes
                && s.outbox.len() < 4 * settings.max_in_flight;
            tokio::select! {
                biased;
                // 1. pgfire stops.
                _ = shutdown.cancelled() => break,
                // 2. the parked store answers (settles runs, unblocks keys).
                r = replies.recv() => match r {
                    Some(r) => s.on_reply(r),
                    None => break,
                },
                // 3. runs end.
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
                // 4. operations for the parked store.
                permit = ops.reserve(), if !s.outbox.is_empty() => match permit {
                    Ok(p) => { if let Some(op) = s.outbox.pop_front() { p.send(op) } }
                    Err(_) => break,
                },
                // 5. new events, while there is room.
                b = rx.recv(), if room => match b {
                    Some(batch) => {
                        s.admit(batch);
                        s.drain_ended();
                    }
                    None => break,
                },
                // 6. timers.
                _ = retry_tick.tick() => s.fetch_soon = true,
                _ = &mut prune => {
                    s.outbox.push_back(Op::Prune { retention: s.current.settings.retention });
                    prune.as_mut().reset(tokio::time::Instant::now() + PRUNE_EVERY);
                }
                _ = flush_tick.tick() => s.flush_history().await,
                _ = stats_tick.tick() => s.publish_stats(),
            }
            s.settle();
            if s.fetch_soon && !s.fetching && s.retrying.len() < RETRY_SLOTS {
                s.fetch();
            }
            if s.pending.len() >= HISTORY_BATCH {
                s.flush_history().await;
            }
        }
        s.runs = FuturesUnordered::new();
        s.settle();
        s.flush_history().await;
        drop(ops);
        parked_abandon.cancel();
        let _ = parker.await;
    }
}

impl State {
    fn lane(&mut self, function: &Arc<str>) -> &mut Lane {
        let current = &self.current;
        self.lanes.entry(function.clone()).or_insert_with(|| Lane {
            paused: current.functions.get(function).is_some_and(|f| f.paused),
            ..Lane::default()
        })
    }

    /// Take a batch of events in: each gets its runs, in priority order.
    fn admit(&mut self, batch: Batch) {
        if !Arc::ptr_eq(&self.current, &batch.catalog) {
            self.kinds.configure(&batch.catalog);
            for (name, lane) in self.lanes.iter_mut() {
                lane.paused = batch.catalog.functions.get(name).is_some_and(|f| f.paused);
            }
        }
        self.current = batch.catalog.clone();
        self.clock = WallClock::now();
        for (lsn, function) in batch.loops {
            match &mut self.loop_guard {
                Some((l, fs)) if *l == lsn => {
                    fs.insert(function);
                }
                guard => *guard = Some((lsn, HashSet::from([function]))),
            }
        }
        for event in batch.events {
            let all = batch.catalog.subscribers(&event.event_type);
            let guarded = match &self.loop_guard {
                Some((lsn, fs)) if *lsn == event.id.commit_lsn => Some(fs.clone()),
                _ => None,
            };
            let mut data = None;
            let mut subs = Vec::with_capacity(all.len());
            for sub in all {
                if guarded
                    .as_ref()
                    .is_some_and(|fs| fs.contains(&sub.function.name))
                {
                    continue;
                }
                // A filter that does not parse (the database checked it, so a pgfire older than
                // the database's) makes the run dead with the reason, never silently skipped.
                let refused = match &sub.filter {
                    None => None,
                    Some(text) => match self.filter(text) {
                        Ok(f) => {
                            let d = data.get_or_insert_with(|| event.data.to_value());
                            if !f.matches(d) {
                                continue;
                            }
                            None
                        }
                        Err(e) => Some(e.to_string()),
                    },
                };
                subs.push((sub, refused));
            }
            // The envelope is event_data and less than 4 kB around it (names are at most 63
            // bytes): built now only when it may be over the limit.
            let limit = batch.catalog.settings.payload_limit;
            let envelope = std::sync::OnceLock::new();
            let mut too_big = None;
            if event.data.json().len() + 4096 >= limit {
                let e: Arc<[u8]> = Arc::from(event.envelope());
                if e.len() > limit {
                    too_big = Some(format!(
                        "event payload of {} bytes exceeds the limit of {limit} bytes (setting limits.payload_bytes): not sent",
                        e.len()
                    ));
                }
                let _ = envelope.set(e);
            }
            let seq = self
                .marks
                .admit(subs.len() as u32, 2 * event.data.json().len() + 512);
            self.stats.events.fetch_add(1, Ordering::Relaxed);
            let job = Arc::new(Job {
                key: Arc::from(key::of(&event)),
                event,
                envelope,
                seq,
            });
            for (sub, refused) in subs {
                let task = Task {
                    job: job.clone(),
                    def: sub.function.clone(),
                    attempt: 1,
                };
                if let Some(reason) = too_big.as_ref().or(refused.as_ref()) {
                    // Recorded, never sent; nothing to retry.
                    self.record(&task, Status::Dead, Some(reason.clone()), 0, Duration::ZERO);
                    self.stats.dead.fetch_add(1, Ordering::Relaxed);
                    self.marks.done(seq);
                    continue;
                }
                let name = sub.function.name.clone();
                let lane = self.lane(&name);
                lane.concurrency = sub.function.concurrency.max(1);
                let key = job.key.clone();
                let queue = lane.queues.entry(key.clone()).or_default();
                queue.push_back(task);
                if queue.len() == 1 && !lane.busy.contains(&key) {
                    lane.ready.push_back(key);
                }
                self.pump(&name);
            }
        }
        if let Some(lsn) = batch.checkpoint {
            self.marks.checkpoint(lsn);
        }
    }

    /// A subscription's filter, parsed once per distinct text.
    fn filter(&mut self, text: &Arc<str>) -> Result<Arc<filter::Filter>, filter::FilterError> {
        if let Some(f) = self.filters.get(text) {
            return f.clone();
        }
        if self.filters.len() > 10_000 {
            self.filters.clear();
        }
        let f = filter::Filter::parse(text).map(Arc::new);
        self.filters.insert(text.clone(), f.clone());
        f
    }

    /// Start what may start in `function`'s lane; park what must wait behind a parked run or a
    /// pause.
    fn pump(&mut self, function: &Arc<str>) {
        let Some(lane) = self.lanes.get_mut(function) else {
            return;
        };
        let paused = lane.paused;
        let mut to_park = Vec::new();
        let mut to_start = Vec::new();
        while paused || lane.running < lane.concurrency {
            let Some(key) = lane.ready.pop_front() else {
                break;
            };
            if paused || lane.is_blocked(&key) {
                if let Some(q) = lane.queues.remove(&key) {
                    lane.blocked.entry(key.clone()).or_default().1 += q.len() as u64;
                    to_park.extend(q);
                }
                continue;
            }
            let Some(task) = lane.queues.get_mut(&key).and_then(VecDeque::pop_front) else {
                lane.queues.remove(&key);
                continue;
            };
            lane.busy.insert(key);
            lane.running += 1;
            to_start.push(task);
        }
        for task in to_start {
            self.spawn(run(self.kinds.clone(), task, Duration::ZERO, self.clock));
        }
        let why = if paused {
            "function is paused"
        } else {
            "waiting behind a parked run of the same row"
        };
        for task in to_park {
            self.park(task, 0, Duration::ZERO, Some(why.to_string()), false);
        }
    }

    /// Queue the parking of `task` (its lane's count of unconfirmed parks is already raised for
    /// a run that is not dead).
    fn park(
        &mut self,
        task: Task,
        attempt: u32,
        delay: Duration,
        error: Option<String>,
        dead: bool,
    ) {
        if dead {
            self.stats.dead.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.parked.fetch_add(1, Ordering::Relaxed);
        }
        self.outbox.push_back(Op::Park(Park {
            seq: task.job.seq,
            function: task.def.name.clone(),
            key: task.job.key.clone(),
            event_id: task.job.event.id.to_string(),
            event_type: task.job.event.event_type.clone(),
            envelope: task.job.envelope(),
            dead,
            attempt,
            delay,
            error,
        }));
    }

    /// Start a run: one that finishes at once (a `log` line) ends here, without a trip through
    /// the engine's loop; the others run with the rest.
    fn spawn(&mut self, mut fut: BoxFuture<'static, Ended>) {
        match (&mut fut).now_or_never() {
            Some(ended) => self.ended_now.push_back(ended),
            None => self.runs.push(fut),
        }
    }

    /// Handle a run that ended, and every run that ended at once because of it.
    fn on_ended(&mut self, ended: Ended) {
        self.on_ended_one(ended);
        self.drain_ended();
    }

    fn drain_ended(&mut self) {
        while let Some(e) = self.ended_now.pop_front() {
            self.on_ended_one(e);
        }
    }

    fn on_ended_one(&mut self, ended: Ended) {
        match ended {
            Ended::Run {
                task,
                result,
                started_us,
                duration,
            } => self.run_ended(task, result, started_us, duration),
            Ended::Retry {
                due,
                def,
                event_id,
                result,
                started_us,
                duration,
            } => self.retry_ended(due, def, event_id, result, started_us, duration),
        }
    }

    fn run_ended(
        &mut self,
        mut task: Task,
        result: Result<(), FunctionError>,
        started_us: i64,
        duration: Duration,
    ) {
        self.stats.runs.fetch_add(1, Ordering::Relaxed);
        let name = task.def.name.clone();
        let key = task.job.key.clone();
        let err = match result {
            Ok(()) => {
                self.record(&task, Status::Ok, None, started_us, duration);
                self.marks.done(task.job.seq);
                let lane = self.lane(&name);
                lane.running -= 1;
                lane.release(&key);
                self.pump(&name);
                return;
            }
            Err(e) => e,
        };
        self.stats.failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(function = %name, event_id = %task.job.event.id, attempt = task.attempt, error = %err, "function failed");
        // Retries run under the function's current configuration; one deleted meanwhile (or
        // made inactive) is not run again.
        let settings = self.current.settings.clone();
        let current = self.current.functions.get(&name).cloned();
        let attempt = task.attempt;
        let message = clean(err.to_string());
        let gone = current.is_none();
        let max = current
            .as_ref()
            .map_or(attempt, |d| d.max_attempts(&settings));
        let dead = gone || err.kind() == ErrorKind::Permanent || attempt >= max;
        let delay = retry_delay(&settings, attempt, &err, &task.job.event.id);
        if dead {
            let message = if gone {
                format!("{message} (function {name} is deleted or inactive now: not retried)")
            } else {
                message
            };
            self.record(
                &task,
                Status::Dead,
                Some(message.clone()),
                started_us,
                duration,
            );
            let lane = self.lane(&name);
            lane.running -= 1;
            lane.release(&key);
            self.park(task, attempt, Duration::ZERO, Some(message), true);
            self.pump(&name);
            return;
        }
        self.record(
            &task,
            err.status(),
            Some(message.clone()),
            started_us,
            duration,
        );
        let in_memory = attempt < settings.memory_attempts && delay <= MEMORY_WAIT_MAX;
        if let (true, Some(def)) = (in_memory, current) {
            task.attempt += 1;
            task.def = def;
            // The key stays busy while its run waits for the retry.
            self.spawn(run(self.kinds.clone(), task, delay, self.clock));
            return;
        }
        // Parked: it and everything of its key waiting behind it.
        let lane = self.lane(&name);
        lane.running -= 1;
        lane.busy.remove(&key);
        let behind = lane.queues.remove(&key).unwrap_or_default();
        lane.ready.retain(|k| k != &key);
        lane.blocked.entry(key.clone()).or_default().1 += 1 + behind.len() as u64;
        self.park(task, attempt, delay, Some(message), false);
        for t in behind {
            self.park(
                t,
                0,
                Duration::ZERO,
                Some("waiting behind a parked run of the same row".into()),
                false,
            );
        }
        self.pump(&name);
    }

    fn retry_ended(
        &mut self,
        due: Due,
        def: Arc<FunctionDef>,
        event_id: EventId,
        result: Result<(), FunctionError>,
        started_us: i64,
        duration: Duration,
    ) {
        self.retrying.remove(&due.id);
        self.stats.runs.fetch_add(1, Ordering::Relaxed);
        self.fetch_soon = true;
        let attempt = due.attempt + 1;
        let record = |s: &mut State, status, error| {
            s.pending_must_store |= status != Status::Ok;
            s.pending.push(Execution {
                event_id,
                event_type: due.event_type.clone(),
                function_name: def.name.clone(),
                error,
                started_at_us: started_us,
                duration_us: duration.as_micros().min(u64::MAX as u128) as u64,
                attempt,
                status,
            });
        };
        let resolution = match result {
            Ok(()) => {
                record(self, Status::Ok, None);
                Resolution::Done
            }
            Err(err) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                let settings = self.current.settings.clone();
                let current = self.current.functions.get(&def.name).cloned();
                let max = current
                    .as_ref()
                    .map_or(attempt, |d| d.max_attempts(&settings));
                let max_age = current
                    .as_ref()
                    .map_or(Duration::ZERO, |d| d.max_age(&settings));
                let age = (Utc::now() - due.parked_at).to_std().unwrap_or_default();
                let message = clean(err.to_string());
                if current.is_none()
                    || err.kind() == ErrorKind::Permanent
                    || attempt >= max
                    || age >= max_age
                {
                    let why = if age >= max_age && attempt < max {
                        format!(
                            "{message} (parked for longer than max_age {}s)",
                            max_age.as_secs()
                        )
                    } else {
                        message
                    };
                    record(self, Status::Dead, Some(why.clone().into_boxed_str()));
                    self.stats.dead.fetch_add(1, Ordering::Relaxed);
                    Resolution::Dead {
                        attempt,
                        error: why,
                    }
                } else {
                    record(self, err.status(), Some(message.clone().into_boxed_str()));
                    Resolution::Retry {
                        attempt,
                        delay: retry_delay(&settings, attempt, &err, &event_id),
                        error: message,
                    }
                }
            }
        };
        self.outbox.push_back(Op::Resolve {
            id: due.id,
            function: due.function.clone(),
            key: due.key.clone(),
            resolution,
        });
    }

    fn on_reply(&mut self, reply: Reply) {
        match reply {
            Reply::Parked {
                seq,
                function,
                key,
                dead,
            } => {
                self.marks.done(seq);
                if !dead {
                    let lane = self.lane(&function);
                    if let Some(b) = lane.blocked.get_mut(&key) {
                        b.0 += 1;
                        b.1 = b.1.saturating_sub(1);
                    }
                }
            }
            Reply::Resolved {
                function,
                key,
                remaining,
            } => {
                let lane = self.lane(&function);
                let b = lane.blocked.entry(key.clone()).or_default();
                b.0 = remaining;
                if b.0 <= 0 && b.1 == 0 {
                    lane.blocked.remove(&key);
                }
                self.fetch_soon = true;
            }
            Reply::Due(rows) => {
                self.fetching = false;
                for due in rows {
                    self.start_retry(due);
                }
            }
            Reply::Loaded(_) => {}
            Reply::Pruned(n) => {
                if n >= parked::PRUNE_BATCH as u64 {
                    self.outbox.push_back(Op::Prune {
                        retention: self.current.settings.retention,
                    });
                }
            }
        }
    }

    fn fetch(&mut self) {
        self.fetching = true;
        self.fetch_soon = false;
        let paused = self
            .current
            .functions
            .values()
            .filter(|f| f.paused)
            .map(|f| f.name.to_string())
            .collect();
        self.outbox.push_back(Op::Fetch {
            running: self.retrying.iter().copied().collect(),
            paused,
            limit: (RETRY_SLOTS - self.retrying.len()) as i64,
        });
    }

    /// Retry a parked run with its function's current configuration.
    fn start_retry(&mut self, due: Due) {
        if !self.retrying.insert(due.id) {
            return;
        }
        let def = self.current.functions.get(&due.function).cloned();
        let event = revive::event(&due.envelope);
        let event_id = revive::event_id(&due.event_id);
        let (def, event, event_id) = match (def, event, event_id) {
            (Some(d), Ok(e), Some(id)) => (d, e, id),
            (def, event, event_id) => {
                // Not retryable: dead, recorded with why.
                let error = match (&def, &event) {
                    (None, _) => format!(
                        "function {} is deleted or inactive now: not retried",
                        due.function
                    ),
                    (_, Err(e)) => format!("the parked envelope cannot be read: {e}"),
                    _ => format!("invalid event id {:?}", due.event_id),
                };
                self.retrying.remove(&due.id);
                self.pending_must_store = true;
                self.pending.push(Execution {
                    event_id: event_id.unwrap_or(EventId {
                        commit_lsn: Lsn(0),
                        position: 0,
                        sub: 0,
                    }),
                    event_type: due.event_type.clone(),
                    function_name: due.function.clone(),
                    error: Some(error.clone().into_boxed_str()),
                    started_at_us: Utc::now().timestamp_micros(),
                    duration_us: 0,
                    attempt: due.attempt + 1,
                    status: Status::Dead,
                });
                self.stats.dead.fetch_add(1, Ordering::Relaxed);
                self.outbox.push_back(Op::Resolve {
                    id: due.id,
                    function: due.function.clone(),
                    key: due.key.clone(),
                    resolution: Resolution::Dead {
                        attempt: due.attempt,
                        error,
                    },
                });
                return;
            }
        };
        let kinds = self.kinds.clone();
        self.spawn(Box::pin(async move {
            let t0 = Instant::now();
            let started_us = Utc::now().timestamp_micros();
            let result = {
                let d = Delivery::with_envelope(&event, due.envelope.clone());
                kinds.post(&def, &d).await
            };
            Ended::Retry {
                due,
                def,
                event_id,
                result,
                started_us,
                duration: t0.elapsed(),
            }
        }));
    }

    fn record(
        &mut self,
        task: &Task,
        status: Status,
        error: Option<String>,
        started_us: i64,
        duration: Duration,
    ) {
        self.pending_must_store |= status != Status::Ok;
        self.pending.push(Execution {
            event_id: task.job.event.id,
            event_type: task.job.event.event_type.clone(),
            function_name: task.def.name.clone(),
            error: error.map(String::into_boxed_str),
            started_at_us: if started_us == 0 {
                Utc::now().timestamp_micros()
            } else {
                started_us
            },
            duration_us: duration.as_micros().min(u64::MAX as u128) as u64,
            attempt: task.attempt,
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
        let batch = std::mem::take(&mut self.pending);
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

/// A run of `task` after `delay`.
fn run(
    kinds: Arc<Kinds>,
    task: Task,
    delay: Duration,
    mut clock: WallClock,
) -> BoxFuture<'static, Ended> {
    Box::pin(async move {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
            clock = WallClock::now();
        }
        let t0 = Instant::now();
        let started_us = clock.micros_at(t0);
        let result = {
            let d = task.job.delivery();
            let r = kinds.post(&task.def, &d).await;
            if let Some(e) = d.built_envelope() {
                let _ = task.job.envelope.set(e);
            }
            r
        };
        Ended::Run {
            task,
            result,
            started_us,
            duration: t0.elapsed(),
        }
    })
}

/// The wait before retry number `attempt + 1`: what the function asked for (`Retry-After`), or
/// the backoff with jitter.
fn retry_delay(settings: &Settings, attempt: u32, err: &FunctionError, id: &EventId) -> Duration {
    if let Some(d) = err.retry_after() {
        return d;
    }
    let seed = id.commit_lsn.0 ^ ((id.position as u64) << 32) ^ attempt as u64;
    jitter(
        backoff(settings.retry_base, settings.retry_max, attempt),
        seed,
    )
}

/// Delay before retry number `attempt` (1-based): base doubling, capped.
pub fn backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
        .min(max)
}

/// "Equal jitter": half the delay, plus a pseudo-random part of the other half (so retries of
/// many runs that failed together spread out).
pub fn jitter(d: Duration, seed: u64) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos() as u64)
        .unwrap_or(0);
    // splitmix64
    let mut z = seed.wrapping_add(nanos).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let half = d / 2;
    half + half.mul_f64((z >> 11) as f64 / (1u64 << 53) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_lose_their_nul_bytes() {
        assert_eq!(clean("a\0b".into()), "a\u{FFFD}b");
        assert_eq!(clean("ab".into()), "ab");
    }

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

    #[test]
    fn jitter_stays_within_half_and_whole() {
        let d = Duration::from_millis(1000);
        let mut seen = HashSet::new();
        for seed in 0..200 {
            let j = jitter(d, seed);
            assert!(j >= d / 2 && j <= d, "{j:?}");
            seen.insert(j.as_millis());
        }
        assert!(seen.len() > 20, "spread out: {}", seen.len());
    }
}
