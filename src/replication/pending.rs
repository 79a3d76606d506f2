//! The commits handed to dispatch and not yet settled, for the slot lag in seconds: a batch at a
//! time, its first commit's time and the end of its last commit; the oldest one left once the
//! settled position passes the others is the oldest event not yet delivered (or parked).

use std::collections::VecDeque;
use std::sync::Mutex;

use super::decode::Item;
use super::position::Lsn;

/// Batches remembered at most; past that the newest one grows to cover what comes (the age
/// stays that of the oldest, at worst a little too old, never too young).
const MAX_BATCHES: usize = 4096;

#[derive(Debug, Default)]
pub struct PendingCommits {
    /// (just past the LSN of the batch's last commit record, commit time of its first in µs
    /// since the epoch).
    batches: Mutex<VecDeque<(u64, i64)>>,
}

impl PendingCommits {
    /// A batch of `items` was handed over while `settled` was settled.
    pub fn handed(&self, items: &[Item], settled: Lsn) {
        let first = items.iter().find_map(commit_of);
        let last = items.iter().rev().find_map(commit_of);
        let (Some(first), Some(last)) = (first, last) else {
            return;
        };
        // Settled positions are transaction ends: past a commit record's LSN means past the
        // commit (`end_lsn` is known only for streamed transactions).
        let (time, end) = (first.time.timestamp_micros(), last.lsn.0 + 1);
        let mut q = self.batches.lock().unwrap_or_else(|p| p.into_inner());
        prune(&mut q, settled);
        if q.len() >= MAX_BATCHES {
            if let Some(back) = q.back_mut() {
                back.0 = back.0.max(end);
            }
            return;
        }
        q.push_back((end, time));
    }

    /// Commit time (µs since the epoch) of the oldest commit handed over and not settled at
    /// `settled`; `None` when everything handed over is settled.
    pub fn oldest(&self, settled: Lsn) -> Option<i64> {
        let mut q = self.batches.lock().unwrap_or_else(|p| p.into_inner());
        prune(&mut q, settled);
        q.front().map(|&(_, time)| time)
    }
}

fn prune(q: &mut VecDeque<(u64, i64)>, settled: Lsn) {
    while q.front().is_some_and(|&(end, _)| end <= settled.0) {
        q.pop_front();
    }
}

fn commit_of(item: &Item) -> Option<&super::position::Commit> {
    match item {
        Item::Row(r) => Some(&r.commit),
        Item::Truncate { commit, .. } => Some(commit),
        Item::Message { commit, .. } => commit.as_deref(),
        Item::Checkpoint(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use chrono::{TimeZone, Utc};

    use super::*;
    use crate::replication::position::Commit;

    fn message(end: u64, secs: i64) -> Item {
        Item::Message {
            prefix: "x".into(),
            content: Bytes::new(),
            lsn: Lsn(end - 1),
            commit: Some(Arc::new(Commit {
                lsn: Lsn(end - 1),
                end_lsn: Lsn(0),
                time: Utc.timestamp_opt(secs, 0).unwrap(),
                xid: 1,
            })),
            position: 0,
        }
    }

    #[test]
    fn the_oldest_unsettled_commit_goes_once_settled() {
        let p = PendingCommits::default();
        p.handed(
            &[
                message(10, 100),
                message(20, 110),
                Item::Checkpoint(Lsn(20)),
            ],
            Lsn(0),
        );
        p.handed(&[Item::Checkpoint(Lsn(25))], Lsn(0));
        p.handed(&[message(30, 120)], Lsn(0));
        assert_eq!(p.oldest(Lsn(0)), Some(100_000_000));
        // The first batch is settled only once its last commit is.
        assert_eq!(p.oldest(Lsn(10)), Some(100_000_000));
        assert_eq!(p.oldest(Lsn(20)), Some(120_000_000));
        assert_eq!(p.oldest(Lsn(30)), None);
    }

    #[test]
    fn a_full_queue_keeps_the_oldest_age() {
        let p = PendingCommits::default();
        for i in 0..MAX_BATCHES as u64 + 10 {
            p.handed(&[message(10 + i, 100 + i as i64)], Lsn(0));
        }
        assert_eq!(p.oldest(Lsn(0)), Some(100_000_000));
        // The last batch covers everything past the cap: not settled before its end.
        let last_kept = 10 + MAX_BATCHES as u64 - 2;
        assert!(p.oldest(Lsn(last_kept)).is_some());
        assert_eq!(p.oldest(Lsn(10 + MAX_BATCHES as u64 + 9)), None);
    }
}
