//! Per function, one lane: the tasks waiting and running by row key (one at a time per key, in
//! commit order; keys at once up to the function's `concurrency`), the keys blocked behind parked
//! runs, the pause.

use std::collections::VecDeque;
use std::sync::Arc;

use super::fasthash::{FastMap, FastSet};
use super::{State, Task};

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
