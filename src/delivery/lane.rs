//! Per function, one lane: the tasks waiting and running by row key (one at a time per key, in
//! commit order; keys at once up to the function's `concurrency`), the keys blocked behind parked
//! runs, the pause.

use std::collections::VecDeque;
use std::sync::Arc;

use super::{Job, State, Task};
use crate::fasthash::{FastMap, FastSet};

/// Per function: what waits and what runs, by key.
#[derive(Default)]
pub(super) struct Lane {
    /// Tasks waiting, per key; a key is here while it has a task waiting or running.
    pub(super) queues: FastMap<Arc<str>, VecDeque<Task>>,
    /// Keys with a task running (or waiting in memory for its retry).
    pub(super) busy: FastSet<Arc<str>>,
    /// Keys with tasks waiting and none running, in the order they became so.
    pub(super) ready: VecDeque<Arc<str>>,
    pub(super) running: usize,
    pub(super) concurrency: usize,
    /// Keys with runs parked: (rows known stored, parks sent and not yet confirmed). Their later
    /// events are parked behind them.
    pub(super) blocked: FastMap<Arc<str>, (i64, u64)>,
    /// The function is paused (as the configuration in force says).
    pub(super) paused: bool,
}

impl Lane {
    pub(super) fn is_blocked(&self, key: &str) -> bool {
        self.blocked
            .get(key)
            .is_some_and(|(db, sent)| *db + *sent as i64 > 0)
    }

    /// The parked store says `parked` runs of `key` are parked (and, with `counted`, answers a
    /// count asked for with a placeholder among the unconfirmed parks).
    pub(super) fn parked_now(&mut self, key: &Arc<str>, parked: i64, counted: bool) {
        let b = self.blocked.entry(key.clone()).or_default();
        b.0 = parked;
        if counted {
            b.1 = b.1.saturating_sub(1);
        }
        if b.0 <= 0 && b.1 == 0 {
            self.blocked.remove(key);
        }
    }

    /// Queue `task` behind its key's earlier tasks (behind both keys' for an event that changed
    /// its row's key).
    pub(super) fn enqueue(&mut self, task: Task) {
        if let Some(prior) = task.job.prior.clone() {
            self.push(prior, task.clone());
        }
        let key = task.job.key().clone();
        self.push(key, task);
    }

    /// Whether `task` may start at once (the usual case: nothing of its row waits or runs, the
    /// lane has room and no key ready before it, no park or pause holds it). In a lane with
    /// nothing waiting, running or parked the row key is not even needed.
    pub(super) fn free_for(&self, job: &Job) -> bool {
        if self.paused
            || job.prior.is_some()
            || self.running >= self.concurrency
            || !self.ready.is_empty()
        {
            return false;
        }
        if self.queues.is_empty() && self.busy.is_empty() && self.blocked.is_empty() {
            return true;
        }
        let key = job.key();
        !(self.queues.contains_key(key) || self.busy.contains(key) || self.is_blocked(key))
    }

    /// Take the room of a task that [`Lane::free_for`] let start, with the bookkeeping of a
    /// start through the queue.
    pub(super) fn occupy(&mut self, job: &Job) {
        let key = job.key();
        // The key stays in `queues` (empty) while its task runs, as after `start`.
        self.queues.insert(key.clone(), VecDeque::new());
        self.busy.insert(key.clone());
        self.running += 1;
    }

    fn push(&mut self, key: Arc<str>, task: Task) {
        let queue = self.queues.entry(key.clone()).or_default();
        queue.push_back(task);
        if queue.len() == 1 && !self.busy.contains(&key) {
            self.ready.push_back(key);
        }
    }

    /// The next task of ready `key`, taken to run, if it may start now: an event holding two
    /// keys starts once it heads both and neither is busy (the other key, when it gets there,
    /// starts it).
    pub(super) fn start(&mut self, key: &Arc<str>) -> Option<Task> {
        if self.busy.contains(key) {
            return None;
        }
        let task = self.queues.get(key)?.front()?;
        let other = task.job.other_key(key).cloned();
        if let Some(other) = &other {
            let seq = task.job.seq;
            let heads_other = self
                .queues
                .get(other)
                .and_then(VecDeque::front)
                .is_some_and(|t| t.job.seq == seq);
            if !heads_other || self.busy.contains(other) {
                return None;
            }
            self.queues.get_mut(other).and_then(VecDeque::pop_front);
            self.busy.insert(other.clone());
        }
        let task = self.queues.get_mut(key).and_then(VecDeque::pop_front)?;
        self.busy.insert(key.clone());
        self.running += 1;
        Some(task)
    }

    /// Whether the task heading ready `key` must be parked: a key of it is blocked.
    pub(super) fn head_blocked(&self, key: &Arc<str>) -> bool {
        self.is_blocked(key)
            || self
                .queues
                .get(key)
                .and_then(VecDeque::front)
                .and_then(|t| t.job.other_key(key))
                .is_some_and(|o| self.is_blocked(o))
    }

    /// Take every task waiting on `key` to park it (an event holding two keys leaves the other's
    /// queue too), each counted as a park not yet confirmed for its own key.
    pub(super) fn take_for_parking(&mut self, key: &Arc<str>) -> VecDeque<Task> {
        self.ready.retain(|k| k != key);
        let tasks = self.queues.remove(key).unwrap_or_default();
        for t in &tasks {
            self.blocked.entry(t.job.key().clone()).or_default().1 += 1;
            let Some(other) = t.job.other_key(key).cloned() else {
                continue;
            };
            if let Some(q) = self.queues.get_mut(&other) {
                q.retain(|o| o.job.seq != t.job.seq);
            }
            // Its other key may go on with what waits behind it.
            if !self.busy.contains(&other) {
                match self.queues.get(&other) {
                    Some(q) if !q.is_empty() => {
                        if !self.ready.contains(&other) {
                            self.ready.push_back(other);
                        }
                    }
                    _ => {
                        self.queues.remove(&other);
                    }
                }
            }
        }
        tasks
    }

    /// `task`'s run ended: its keys' next tasks may start.
    pub(super) fn ended(&mut self, task: &Task) {
        self.running -= 1;
        if let Some(prior) = &task.job.prior {
            self.release(prior);
        }
        self.release(task.job.key());
    }

    /// The key's running task ended: its next one (if any) may start.
    pub(super) fn release(&mut self, key: &Arc<str>) {
        self.busy.remove(key);
        match self.queues.get(key) {
            Some(q) if !q.is_empty() => self.ready.push_back(key.clone()),
            _ => {
                self.queues.remove(key);
            }
        }
    }
}

impl State {
    pub(super) fn lane(&mut self, function: &Arc<str>) -> &mut Lane {
        let current = &self.current;
        self.lanes.entry(function.clone()).or_insert_with(|| Lane {
            paused: current.functions.get(function).is_some_and(|f| f.paused),
            ..Lane::default()
        })
    }
}
