//! The low-water mark: what the slot may confirm. Every event admitted gets a sequence number and
//! a count of runs still unsettled; a checkpoint (an LSN the consumer passed, with every event
//! before it admitted) is settled once no event admitted before it is unsettled. Runs settle out
//! of order; the mark only moves forward. Pure: no IO, no clock.

use std::collections::VecDeque;

use crate::events::Lsn;

#[derive(Debug, Default)]
pub struct Watermark {
    next: u64,
    /// Events from sequence number `base` on: (runs unsettled, bytes held); settled ones at the
    /// front are dropped as the mark moves.
    open: VecDeque<(u32, usize)>,
    base: u64,
    /// Events with runs unsettled.
    unsettled: usize,
    /// Checkpoints not yet settled: (events before it have sequence numbers below this, LSN).
    checkpoints: VecDeque<(u64, Lsn)>,
    bytes: usize,
}

impl Watermark {
    /// Admit an event with `runs` runs to settle, holding `bytes` while unsettled.
    pub fn admit(&mut self, runs: u32, bytes: usize) -> u64 {
        let seq = self.next;
        self.next += 1;
        if self.open.is_empty() {
            self.base = seq;
        }
        if runs > 0 {
            self.open.push_back((runs, bytes));
            self.bytes += bytes;
            self.unsettled += 1;
        } else if !self.open.is_empty() {
            self.open.push_back((0, 0));
        } else {
            self.base = self.next;
        }
        seq
    }

    /// One run of event `seq` is settled (ran ok, or is durably parked or dead).
    pub fn done(&mut self, seq: u64) {
        let Some(i) = seq.checked_sub(self.base) else {
            return;
        };
        if let Some((runs, bytes)) = self.open.get_mut(i as usize) {
            if *runs == 0 {
                return;
            }
            *runs -= 1;
            if *runs == 0 {
                self.bytes -= *bytes;
                *bytes = 0;
                self.unsettled -= 1;
            }
        }
        while let Some((0, _)) = self.open.front() {
            self.open.pop_front();
            self.base += 1;
        }
    }

    /// Every event before `lsn` is admitted.
    pub fn checkpoint(&mut self, lsn: Lsn) {
        match self.checkpoints.back_mut() {
            // Nothing admitted since the last one: it moves.
            Some((pos, last)) if *pos == self.next => *last = (*last).max(lsn),
            _ => self.checkpoints.push_back((self.next, lsn)),
        }
    }

    /// The furthest checkpoint now settled, if one newly is.
    pub fn settled(&mut self) -> Option<Lsn> {
        let low = if self.open.is_empty() {
            self.next
        } else {
            self.base
        };
        let mut last = None;
        while let Some(&(pos, lsn)) = self.checkpoints.front() {
            if pos > low {
                break;
            }
            last = Some(lsn);
            self.checkpoints.pop_front();
        }
        last
    }

    /// Events unsettled, and the bytes they hold.
    pub fn in_flight(&self) -> (usize, usize) {
        (self.unsettled, self.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mark_waits_for_the_oldest_unsettled_event() {
        let mut w = Watermark::default();
        let a = w.admit(2, 10);
        let b = w.admit(1, 5);
        w.checkpoint(Lsn(100));
        let c = w.admit(1, 1);
        w.checkpoint(Lsn(200));
        assert_eq!(w.in_flight(), (3, 16));
        w.done(b);
        w.done(c);
        assert_eq!(w.settled(), None, "a is still running");
        w.done(a);
        assert_eq!(w.settled(), None, "a has a second run");
        w.done(a);
        assert_eq!(w.settled(), Some(Lsn(200)));
        assert_eq!(w.in_flight(), (0, 0));
        assert_eq!(w.settled(), None);
    }

    #[test]
    fn events_without_runs_and_idle_checkpoints_settle_at_once() {
        let mut w = Watermark::default();
        w.admit(0, 100);
        w.checkpoint(Lsn(5));
        w.checkpoint(Lsn(6));
        assert_eq!(w.settled(), Some(Lsn(6)));
        let a = w.admit(1, 1);
        w.checkpoint(Lsn(7));
        assert_eq!(w.settled(), None);
        w.done(a);
        w.done(a); // a second report changes nothing
        assert_eq!(w.settled(), Some(Lsn(7)));
    }
}
