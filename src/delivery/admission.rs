//! Admission: a batch of events in, each with its runs in priority order (the loop guard, the
//! filters and the payload limit decide which run), and the in-flight bounds that stop reading.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::parked::Op;
use super::{filter, key, Job, State, Task, WallClock};
use crate::executions::Status;
use crate::intake::Batch;

impl State {
    /// Whether more events may come in: events and bytes in flight are under their bounds, and
    /// the parked store keeps up (otherwise the backlog waits in the WAL).
    pub(super) fn has_room(&self) -> bool {
        let (events, bytes) = self.marks.in_flight();
        let settings = &self.current.settings;
        events < settings.max_in_flight
            && bytes < settings.max_in_flight_bytes
            && self.outbox.len() < 4 * settings.max_in_flight
    }

    /// Take a batch of events in: each gets its runs, in priority order.
    pub(super) fn admit(&mut self, batch: Batch) {
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
        // Dead runs sent again hold their keys from here on, as any parked run: blocked until
        // the parked store says how many of the key's runs are parked now. (Events of the batch
        // committed before the revival wait too: they came after the revived run anyway.)
        for (function, key) in batch.revived {
            self.lane(&function)
                .blocked
                .entry(key.clone())
                .or_default()
                .1 += 1;
            self.outbox.push_back(Op::Count { function, key });
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
            let job = Arc::new(Job {
                key: Default::default(),
                prior: key::prior(&event).map(Arc::from),
                event,
                envelope,
                seq,
            });
            for (sub, refused) in subs {
                if let Some(reason) = too_big.as_ref().or(refused.as_ref()) {
                    // Recorded, never sent; nothing to retry.
                    let error = Some(reason.clone());
                    let (event, name) = (&job.event, &sub.function.name);
                    self.record_run(event, name, 1, Status::Dead, error, 0, Duration::ZERO);
                    self.stats.dead.fetch_add(1, Ordering::Relaxed);
                    self.marks.done(seq);
                    continue;
                }
                let lane = self.lane(&sub.function.name);
                lane.concurrency = sub.function.concurrency.max(1);
                if lane.free_for(&job) {
                    self.start_free(&job, &sub.function);
                } else {
                    lane.enqueue(Task {
                        job: job.clone(),
                        def: sub.function.clone(),
                        attempt: 1,
                    });
                    self.pump(&sub.function.name);
                }
            }
        }
        if let Some(lsn) = batch.checkpoint {
            self.marks.checkpoint(lsn);
        }
    }

    /// A subscription's filter, parsed once per distinct text.
    pub(super) fn filter(
        &mut self,
        text: &Arc<str>,
    ) -> Result<Arc<filter::Filter>, filter::FilterError> {
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
}
