//! Retries of parked runs: fetched from `pgfire.parked` when due, run under the function's
//! current configuration, resolved (done, again later, dead); the parked store's answers; the
//! backoff with jitter.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chrono::Utc;

use super::parked::{self, Due, Op, Reply, Resolution};
use super::{clean, revive, Ended, RetryEnded, State, RETRY_SLOTS};
use crate::catalog::Settings;
use crate::events::{EventId, Lsn};
use crate::executions::{Execution, Status};
use crate::functions::{Delivery, ErrorKind, FunctionError};

impl State {
    pub(super) fn retry_ended(&mut self, ended: RetryEnded) {
        let RetryEnded {
            due,
            def,
            event_id,
            result,
            started_us,
            duration,
        } = ended;
        self.retrying.remove(&due.id);
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

    pub(super) fn on_reply(&mut self, reply: Reply) {
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
                self.lane(&function).parked_now(&key, remaining, false);
                self.fetch_soon = true;
            }
            Reply::Due(rows) => {
                self.fetching = false;
                // Fetched before the stream went down: they wait in the table.
                if !self.held {
                    return;
                }
                for due in rows {
                    self.start_retry(due);
                }
            }
            Reply::Loaded(_) => {}
            Reply::Counted {
                function,
                key,
                parked,
            } => {
                self.lane(&function).parked_now(&key, parked, true);
                self.fetch_soon = true;
            }
            Reply::Pruned(n) => {
                if n >= parked::PRUNE_BATCH as u64 {
                    self.outbox.push_back(Op::Prune {
                        retention: self.current.settings.retention,
                    });
                }
            }
        }
    }

    pub(super) fn fetch(&mut self) {
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
    pub(super) fn start_retry(&mut self, due: Due) {
        if !self.retrying.insert(due.id) {
            return;
        }
        let def = self.current.functions.get(&due.function).cloned();
        if def.is_none() && due.function_live {
            // The configuration this pgfire has reached in the stream is older than the run
            // (parked by a pgfire further on, before a takeover): it waits until the stream
            // gets there, rather than going dead for a function that exists.
            self.retrying.remove(&due.id);
            return;
        }
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
            Ended::Retry(RetryEnded {
                due,
                def,
                event_id,
                result,
                started_us,
                duration: t0.elapsed(),
            })
        }));
    }
}

/// The wait before retry number `attempt + 1`: what the function asked for (`Retry-After`), or
/// the backoff with jitter.
pub(super) fn retry_delay(
    settings: &Settings,
    attempt: u32,
    err: &FunctionError,
    id: &EventId,
) -> Duration {
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
    use std::collections::HashSet;

    use super::*;

    #[test]
    pub(super) fn backoff_doubles_and_caps() {
        let b = Duration::from_millis(100);
        let m = Duration::from_secs(1);
        assert_eq!(backoff(b, m, 1), Duration::from_millis(100));
        assert_eq!(backoff(b, m, 2), Duration::from_millis(200));
        assert_eq!(backoff(b, m, 4), Duration::from_millis(800));
        assert_eq!(backoff(b, m, 5), m);
        assert_eq!(backoff(b, m, 100), m);
    }

    #[test]
    pub(super) fn jitter_stays_within_half_and_whole() {
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
