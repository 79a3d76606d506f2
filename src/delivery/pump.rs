//! The pump: runs of events in memory started when their lane lets them, their ends taken (done,
//! retried briefly in memory, or parked with what waits behind them once those retries are spent).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, FutureExt};

use super::parked::{Op, Park};
use super::retry::retry_delay;
use super::{clean, Ended, Job, State, Task, WallClock, MEMORY_WAIT_MAX};
use crate::catalog::FunctionDef;
use crate::executions::Status;
use crate::functions::{ErrorKind, FunctionError, Kinds};

impl State {
    /// Start what may start in `function`'s lane; park what must wait behind a parked run or a
    /// pause.
    pub(super) fn pump(&mut self, function: &Arc<str>) {
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
            if paused || lane.head_blocked(&key) {
                to_park.extend(lane.take_for_parking(&key));
                continue;
            }
            match lane.start(&key) {
                Some(task) => to_start.push(task),
                None => {
                    if lane.queues.get(&key).is_some_and(VecDeque::is_empty) {
                        lane.queues.remove(&key);
                    }
                }
            }
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
    pub(super) fn park(
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
            key: task.job.key().clone(),
            event_id: task.job.event.id.to_string(),
            event_type: task.job.event.event_type.clone(),
            envelope: task.job.envelope(),
            dead,
            attempt,
            delay,
            error,
        }));
    }

    /// Start `job`'s run of `def`, which its lane lets start at once ([`Lane::free_for`]). A
    /// kind that never waits (a `log` line) runs here; a run that ends well so is settled at once
    /// and never takes its lane's room (the next event of the batch finds the lane free again:
    /// no task, queue, key or pump). Any other takes the room as a start through the queue does.
    ///
    /// [`Lane::free_for`]: super::lane::Lane::free_for
    pub(super) fn start_free(&mut self, job: &Arc<Job>, def: &Arc<FunctionDef>) {
        let t0 = Instant::now();
        let at_once = {
            let d = job.delivery();
            let r = self.kinds.post_at_once(def, &d);
            if let (Some(_), Some(e)) = (&r, d.built_envelope()) {
                let _ = job.envelope.set(e);
            }
            r
        };
        let task = match at_once {
            Some(Ok(())) => {
                let started_us = self.clock.micros_at(t0);
                self.record_run(
                    &job.event,
                    &def.name,
                    1,
                    Status::Ok,
                    None,
                    started_us,
                    t0.elapsed(),
                );
                self.marks.done(job.seq);
                return;
            }
            Some(Err(e)) => {
                let task = Task {
                    job: job.clone(),
                    def: def.clone(),
                    attempt: 1,
                };
                self.lane(&def.name).occupy(job);
                self.ended_now.push_back(Ended::Run {
                    task,
                    result: Err(e),
                    started_us: self.clock.micros_at(t0),
                    duration: t0.elapsed(),
                });
                return;
            }
            None => Task {
                job: job.clone(),
                def: def.clone(),
                attempt: 1,
            },
        };
        self.lane(&def.name).occupy(job);
        self.spawn(run(self.kinds.clone(), task, Duration::ZERO, self.clock));
    }

    /// Start a run: one that finishes at once (a `log` line) ends here, without a trip through
    /// the engine's loop; the others run with the rest.
    pub(super) fn spawn(&mut self, mut fut: BoxFuture<'static, Ended>) {
        match (&mut fut).now_or_never() {
            Some(ended) => self.ended_now.push_back(ended),
            None => self.runs.push(fut),
        }
    }

    /// Handle a run that ended, and every run that ended at once because of it.
    pub(super) fn on_ended(&mut self, ended: Ended) {
        self.on_ended_one(ended);
        self.drain_ended();
    }

    pub(super) fn drain_ended(&mut self) {
        while let Some(e) = self.ended_now.pop_front() {
            self.on_ended_one(e);
        }
    }

    pub(super) fn on_ended_one(&mut self, ended: Ended) {
        match ended {
            Ended::Run {
                task,
                result,
                started_us,
                duration,
            } => self.run_ended(task, result, started_us, duration),
            Ended::Retry(ended) => self.retry_ended(ended),
        }
    }

    pub(super) fn run_ended(
        &mut self,
        mut task: Task,
        result: Result<(), FunctionError>,
        started_us: i64,
        duration: Duration,
    ) {
        let name = task.def.name.clone();
        let key = task.job.key().clone();
        let err = match result {
            Ok(()) => {
                self.record(&task, Status::Ok, None, started_us, duration);
                self.marks.done(task.job.seq);
                self.lane(&name).ended(&task);
                self.pump(&name);
                return;
            }
            Err(e) => e,
        };
        self.stats.failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(function = %name, event_id = %task.job.event.id, attempt = task.attempt, error = %err.for_logs(), "function failed");
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
            self.lane(&name).ended(&task);
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
        // (An event that changed its row's key is parked under its new key: the old key's later
        // events go on.)
        let lane = self.lane(&name);
        lane.running -= 1;
        lane.busy.remove(&key);
        if let Some(prior) = &task.job.prior {
            lane.release(prior);
        }
        let behind = lane.take_for_parking(&key);
        lane.blocked.entry(key.clone()).or_default().1 += 1;
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
}

/// A run of `task` after `delay`.
pub(super) fn run(
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
