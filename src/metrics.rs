//! The labelled counters and histograms pgfire's stages keep for `/metrics`: events by type, runs
//! by function, phase and status with their durations, PRE decisions, proxy statements. Plain
//! atomics, updated a batch at a time (a label is looked up once per batch, under a read lock);
//! the admin endpoint names and renders them (`admin::metric`, `admin::metrics`).
//!
//! Label values are configuration, never row data: event type names (events are built only for
//! types with a subscription) and function names (rows of `pgfire.functions`). Each family keeps
//! at most [`MAX_LABEL_VALUES`] of them; past that, new ones are counted under [`OTHER`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::executions::{Execution, Status};

/// Label values one family keeps at most.
pub const MAX_LABEL_VALUES: usize = 1000;
/// The label value everything past [`MAX_LABEL_VALUES`] (or outside the bounded set) is counted
/// under.
pub const OTHER: &str = "other";

/// Upper bounds of the run duration buckets, in microseconds (rendered in seconds); `+Inf` is
/// implied. Handler timeouts are at most 10 s by default and 300 s at the limit.
pub const DURATION_BUCKETS_US: [u64; 15] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000, 30_000_000,
];

/// Where a run happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Delivery of a committed event.
    Post = 0,
    /// A PRE hook, in the proxy, before the write runs.
    Pre = 1,
}

impl Phase {
    pub const ALL: [Phase; 2] = [Phase::Post, Phase::Pre];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Post => "post",
            Phase::Pre => "pre",
        }
    }
}

/// The run statuses, in the order [`RunStats::by_status`] counts them.
pub const STATUSES: [Status; 6] = [
    Status::Ok,
    Status::Error,
    Status::Timeout,
    Status::Dead,
    Status::Blocked,
    Status::Modified,
];

fn status_index(s: Status) -> usize {
    match s {
        Status::Ok => 0,
        Status::Error => 1,
        Status::Timeout => 2,
        Status::Dead => 3,
        Status::Blocked => 4,
        Status::Modified => 5,
    }
}

/// What a PRE function's run came to, for `pgfire_pre_decisions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed = 0,
    Blocked = 1,
    Modified = 2,
    Error = 3,
    Timeout = 4,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Outcome::Allowed,
        Outcome::Blocked,
        Outcome::Modified,
        Outcome::Error,
        Outcome::Timeout,
    ];

    pub fn of(status: Status) -> Outcome {
        match status {
            Status::Ok => Outcome::Allowed,
            Status::Blocked => Outcome::Blocked,
            Status::Modified => Outcome::Modified,
            Status::Timeout => Outcome::Timeout,
            Status::Error | Status::Dead => Outcome::Error,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Blocked => "blocked",
            Outcome::Modified => "modified",
            Outcome::Error => "error",
            Outcome::Timeout => "timeout",
        }
    }
}

/// What the proxy did with a statement (a Query message, or a Parse).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Forwarded as it came (no PRE hook can see it change a watched table).
    Streamed = 0,
    /// Held for the PRE hooks.
    Held = 1,
    /// Refused with an error (a form of write PRE hooks cannot see, TRUNCATE, tampering).
    Refused = 2,
}

impl Action {
    pub const ALL: [Action; 3] = [Action::Streamed, Action::Held, Action::Refused];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Streamed => "streamed",
            Action::Held => "held",
            Action::Refused => "refused",
        }
    }
}

/// Values of one family by label value. Lookups take a read lock; a value is added once.
pub struct Family<T> {
    values: RwLock<HashMap<Arc<str>, Arc<T>>>,
}

impl<T> Default for Family<T> {
    fn default() -> Self {
        Family {
            values: RwLock::default(),
        }
    }
}

impl<T: Default> Family<T> {
    /// The value of `label`, added if new (under [`OTHER`] once the family is full).
    pub fn get(&self, label: &str) -> Arc<T> {
        if let Some(v) = self
            .values
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(label)
        {
            return v.clone();
        }
        let mut all = self.values.write().unwrap_or_else(|p| p.into_inner());
        let label = if all.len() >= MAX_LABEL_VALUES && !all.contains_key(label) {
            OTHER
        } else {
            label
        };
        all.entry(Arc::from(label)).or_default().clone()
    }

    /// Every label value with its value, sorted by label.
    pub fn snapshot(&self) -> Vec<(Arc<str>, Arc<T>)> {
        let mut v: Vec<_> = self
            .values
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// A plain counter.
#[derive(Debug, Default)]
pub struct Counter(pub AtomicU64);

impl Counter {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The runs of one function in one phase: counts by status, and the duration histogram.
#[derive(Debug, Default)]
pub struct RunStats {
    pub by_status: [AtomicU64; STATUSES.len()],
    /// Per bucket (not cumulative; the renderer adds them up), the last one is `+Inf`.
    pub buckets: [AtomicU64; DURATION_BUCKETS_US.len() + 1],
    pub sum_us: AtomicU64,
}

/// One batch's runs of one function, added up before they touch the shared atomics.
#[derive(Default)]
struct RunTally {
    by_status: [u64; STATUSES.len()],
    buckets: [u64; DURATION_BUCKETS_US.len() + 1],
    sum_us: u64,
}

impl RunTally {
    fn add(&mut self, run: &Execution) {
        self.by_status[status_index(run.status)] += 1;
        // A run recorded dead without being sent (payload too big, a broken filter) took no time.
        if run.status == Status::Dead && run.duration_us == 0 {
            return;
        }
        let bucket = DURATION_BUCKETS_US
            .iter()
            .position(|&b| run.duration_us <= b)
            .unwrap_or(DURATION_BUCKETS_US.len());
        self.buckets[bucket] += 1;
        self.sum_us = self.sum_us.saturating_add(run.duration_us);
    }

    fn flush(&self, into: &RunStats) {
        let add = |a: &AtomicU64, n: u64| {
            if n > 0 {
                a.fetch_add(n, Ordering::Relaxed);
            }
        };
        for (a, &n) in into.by_status.iter().zip(&self.by_status) {
            add(a, n);
        }
        for (a, &n) in into.buckets.iter().zip(&self.buckets) {
            add(a, n);
        }
        add(&into.sum_us, self.sum_us);
    }
}

/// PRE decisions of one function: by outcome, applied (`[0]`) or in shadow mode (`[1]`).
#[derive(Debug, Default)]
pub struct PreStats {
    pub by_outcome: [[AtomicU64; 2]; Outcome::ALL.len()],
}

/// Everything this module counts; one per service, shared by its parts.
#[derive(Default)]
pub struct Metrics {
    /// Events built, by type.
    pub events: Family<Counter>,
    /// Runs by function, per [`Phase`].
    pub runs: [Family<RunStats>; 2],
    /// PRE decisions by function.
    pub pre: Family<PreStats>,
    /// Proxy statements by [`Action`].
    pub statements: [AtomicU64; 3],
}

impl Metrics {
    /// Count a batch of events by type. `bounded(type)` says whether the type may be a label
    /// value of its own (otherwise it counts under [`OTHER`]).
    pub fn events<'a>(
        &self,
        types: impl IntoIterator<Item = &'a str>,
        bounded: impl Fn(&str) -> bool,
    ) {
        let mut tally: Vec<(&str, u64)> = Vec::new();
        for t in types {
            match tally.iter_mut().find(|(k, _)| *k == t) {
                Some((_, n)) => *n += 1,
                None => tally.push((t, 1)),
            }
        }
        for (t, n) in tally {
            let label = if bounded(t) { t } else { OTHER };
            self.events.get(label).0.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Count a batch of run records of `phase`.
    pub fn runs(&self, phase: Phase, runs: &[Execution]) {
        let mut tally: Vec<(&Arc<str>, RunTally)> = Vec::new();
        for run in runs {
            let i = match tally
                .iter()
                .position(|(f, _)| Arc::ptr_eq(f, &run.function_name) || ***f == *run.function_name)
            {
                Some(i) => i,
                None => {
                    tally.push((&run.function_name, RunTally::default()));
                    tally.len() - 1
                }
            };
            tally[i].1.add(run);
        }
        let family = &self.runs[phase as usize];
        for (function, t) in tally {
            t.flush(&family.get(function));
        }
    }

    /// Count a PRE function's decision.
    pub fn pre_decision(&self, function: &str, status: Status, shadow: bool) {
        self.pre.get(function).by_outcome[Outcome::of(status) as usize][shadow as usize]
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Count a statement the proxy streamed, held or refused.
    pub fn statement(&self, action: Action) {
        self.statements[action as usize].fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{EventId, Lsn};

    fn run(function: &Arc<str>, status: Status, duration_us: u64) -> Execution {
        Execution {
            event_id: EventId {
                commit_lsn: Lsn(1),
                position: 0,
                sub: 0,
            },
            event_type: Arc::from("POST_USER_CREATE"),
            function_name: function.clone(),
            error: None,
            started_at_us: 0,
            duration_us,
            attempt: 1,
            status,
        }
    }

    fn observed(s: &RunStats) -> u64 {
        s.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    #[test]
    fn runs_are_counted_by_function_status_and_bucket() {
        let m = Metrics::default();
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        m.runs(
            Phase::Post,
            &[
                run(&a, Status::Ok, 400),
                run(&a, Status::Error, 3_000),
                run(&b, Status::Ok, 60_000_000),
                run(&Arc::from("a"), Status::Ok, 1_000),
                run(&b, Status::Dead, 0),
            ],
        );
        let s = m.runs[0].get("a");
        assert_eq!(s.by_status[0].load(Ordering::Relaxed), 2);
        assert_eq!(s.by_status[1].load(Ordering::Relaxed), 1);
        assert_eq!(observed(&s), 3);
        assert_eq!(s.sum_us.load(Ordering::Relaxed), 4_400);
        // 400 µs and 1 ms in the first two buckets (bounds inclusive), 3 ms in the 5 ms one.
        assert_eq!(s.buckets[0].load(Ordering::Relaxed), 1);
        assert_eq!(s.buckets[1].load(Ordering::Relaxed), 1);
        assert_eq!(s.buckets[3].load(Ordering::Relaxed), 1);
        let s = m.runs[0].get("b");
        // The dead run never sent takes no bucket; 60 s is past the last bound.
        assert_eq!(s.by_status[3].load(Ordering::Relaxed), 1);
        assert_eq!(observed(&s), 1);
        assert_eq!(
            s.buckets[DURATION_BUCKETS_US.len()].load(Ordering::Relaxed),
            1
        );
        assert!(m.runs[1].snapshot().is_empty());
    }

    #[test]
    fn a_full_family_counts_new_labels_under_other() {
        let m = Metrics::default();
        let names: Vec<String> = (0..MAX_LABEL_VALUES + 5).map(|i| format!("t{i}")).collect();
        m.events(names.iter().map(String::as_str), |_| true);
        m.events(["t0", "unbounded"], |t| t != "unbounded");
        let all = m.events.snapshot();
        assert_eq!(all.len(), MAX_LABEL_VALUES + 1);
        let get = |k: &str| all.iter().find(|(l, _)| &**l == k).map(|(_, c)| c.get());
        assert_eq!(get("t0"), Some(2));
        assert_eq!(get(OTHER), Some(6));
    }
}
