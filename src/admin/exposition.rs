//! `/metrics` in Prometheus' text exposition format (0.0.4): HELP and TYPE before every family,
//! from the service's atomics and its registry ([`crate::metrics`]), plus gauges read from the
//! database (runs parked and dead now, the slot's WAL lag) at most once per [`DB_TTL`], however
//! often it is scraped.
//!
//! Hand-rolled rather than a client crate: every value already lives in an atomic the stages
//! update lock-free (the registry crates would want their own types there, or a global recorder
//! that one process running several services, as the tests do, cannot have), and the format is
//! this small.

use std::fmt::{Display, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::metric::{self, Family};
use super::Dashboard;
use crate::executions::Status;
use crate::metrics::{Action, Outcome, Phase, DURATION_BUCKETS_US, STATUSES};

/// How long gauges read from the database are served before they are read again.
pub const DB_TTL: Duration = Duration::from_secs(5);
/// How long reading them may take.
const DB_TIMEOUT: Duration = Duration::from_secs(2);

/// Gauges read from the database, with when they were read.
#[derive(Default)]
pub struct DbGauges(tokio::sync::Mutex<Option<(Instant, Option<DbSample>)>>);

#[derive(Debug, Clone, Default)]
struct DbSample {
    /// (function, parked, dead).
    runs: Vec<(String, i64, i64)>,
    lag_bytes: Option<i64>,
}

/// The text of `/metrics`.
pub async fn render(d: &Dashboard) -> String {
    let db = db_sample(d).await;
    let s = &d.state;
    let mut t = Text::default();
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);

    t.family(metric::EVENTS);
    for (ty, n) in s.metrics.events.snapshot() {
        t.sample(metric::EVENTS.name, &[("type", &ty)], n.get());
    }
    runs(&mut t, s);
    t.family(metric::FAILURES);
    t.sample(metric::FAILURES.name, &[], load(&s.dispatch.failures));
    t.family(metric::PARKED);
    t.sample(metric::PARKED.name, &[], load(&s.dispatch.parked));
    t.family(metric::DEAD);
    t.sample(metric::DEAD.name, &[], load(&s.dispatch.dead));
    t.family(metric::IN_FLIGHT);
    t.sample(metric::IN_FLIGHT.name, &[], load(&s.dispatch.in_flight));
    if let Some(db) = &db {
        t.family(metric::PARKED_NOW);
        for (f, parked, _) in &db.runs {
            t.sample(metric::PARKED_NOW.name, &[("function", f)], parked);
        }
        t.family(metric::DEAD_NOW);
        for (f, _, dead) in &db.runs {
            t.sample(metric::DEAD_NOW.name, &[("function", f)], dead);
        }
    }
    pre_decisions(&mut t, s);
    if let Some(open) = &s.proxy_connections {
        t.family(metric::PROXY_STATEMENTS);
        for a in Action::ALL {
            let n = load(&s.metrics.statements[a as usize]);
            t.sample(metric::PROXY_STATEMENTS.name, &[("action", a.as_str())], n);
        }
        t.family(metric::PROXY_CONNECTIONS);
        t.sample(metric::PROXY_CONNECTIONS.name, &[], load(open));
    }
    if let Some(c) = &s.consumer {
        let gauges = [
            (
                metric::CONNECTED,
                c.connected.load(Ordering::Relaxed) as u64,
            ),
            (metric::STANDBY, c.standby.load(Ordering::Relaxed) as u64),
            (metric::RECEIVED_LSN, load(&c.received_lsn)),
            (metric::CONFIRMED_LSN, load(&c.confirmed_lsn)),
            (metric::SETTLED_LSN, load(&c.settled_lsn)),
            (metric::RECONNECTS, load(&c.reconnects)),
            (metric::STREAMED_BYTES, load(&c.streamed_bytes)),
            (metric::SPILLED_BYTES, load(&c.spilled_bytes)),
        ];
        for (f, v) in gauges {
            t.family(f);
            t.sample(f.name, &[], v);
        }
        t.family(metric::LAG_SECONDS);
        let lag = c.lag_seconds(chrono::Utc::now());
        t.sample(metric::LAG_SECONDS.name, &[], lag);
        if let Some(bytes) = db.as_ref().and_then(|db| db.lag_bytes) {
            t.family(metric::LAG_BYTES);
            t.sample(metric::LAG_BYTES.name, &[], bytes);
        }
    }
    t.family(metric::DATABASE_UP);
    t.sample(metric::DATABASE_UP.name, &[], db.is_some() as u8);
    t.out
}

/// The statuses a run of `phase` can end with.
fn statuses(phase: Phase) -> impl Iterator<Item = (usize, Status)> {
    STATUSES.into_iter().enumerate().filter(move |(_, s)| {
        let pre_only = matches!(s, Status::Blocked | Status::Modified);
        match phase {
            Phase::Post => !pre_only,
            Phase::Pre => *s != Status::Dead,
        }
    })
}

fn runs(t: &mut Text, s: &super::AdminState) {
    let families: Vec<_> = Phase::ALL
        .into_iter()
        .map(|p| (p, s.metrics.runs[p as usize].snapshot()))
        .collect();
    t.family(metric::RUNS);
    for (phase, runs) in &families {
        for (function, r) in runs {
            for (i, status) in statuses(*phase) {
                let labels = [
                    ("function", &**function),
                    ("phase", phase.as_str()),
                    ("status", status.as_str()),
                ];
                t.sample(
                    metric::RUNS.name,
                    &labels,
                    r.by_status[i].load(Ordering::Relaxed),
                );
            }
        }
    }
    t.family(metric::RUN_DURATION);
    let (bucket, sum, count) = (
        format!("{}_bucket", metric::RUN_DURATION.name),
        format!("{}_sum", metric::RUN_DURATION.name),
        format!("{}_count", metric::RUN_DURATION.name),
    );
    for (phase, runs) in &families {
        for (function, r) in runs {
            let labels = [("function", &**function), ("phase", phase.as_str())];
            let mut seen = 0;
            for (i, n) in r.buckets.iter().enumerate() {
                seen += n.load(Ordering::Relaxed);
                let le = match DURATION_BUCKETS_US.get(i) {
                    Some(us) => (*us as f64 / 1e6).to_string(),
                    None => "+Inf".to_string(),
                };
                let labels = [labels[0], labels[1], ("le", &le)];
                t.sample(&bucket, &labels, seen);
            }
            let seconds = r.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
            t.sample(&sum, &labels, seconds);
            t.sample(&count, &labels, seen);
        }
    }
}

fn pre_decisions(t: &mut Text, s: &super::AdminState) {
    let pre = s.metrics.pre.snapshot();
    if pre.is_empty() && s.proxy_connections.is_none() {
        return;
    }
    t.family(metric::PRE_DECISIONS);
    for (function, p) in pre {
        for o in Outcome::ALL {
            for (shadow, n) in p.by_outcome[o as usize].iter().enumerate() {
                let n = n.load(Ordering::Relaxed);
                // Shadow-mode series appear once a shadow subscription decided something.
                if shadow == 1 && n == 0 {
                    continue;
                }
                let labels = [
                    ("function", &*function),
                    ("outcome", o.as_str()),
                    ("shadow", if shadow == 1 { "true" } else { "false" }),
                ];
                t.sample(metric::PRE_DECISIONS.name, &labels, n);
            }
        }
    }
}

/// The database gauges, read again when older than [`DB_TTL`]; `None` when they cannot be read.
async fn db_sample(d: &Dashboard) -> Option<DbSample> {
    let mut cached = d.gauges.0.lock().await;
    if let Some((at, sample)) = cached.as_ref() {
        if at.elapsed() < DB_TTL {
            return sample.clone();
        }
    }
    let sample = match tokio::time::timeout(DB_TIMEOUT, read_db(d)).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(err)) => {
            tracing::debug!(error = %err, "cannot read the database gauges for /metrics");
            None
        }
        Err(_) => {
            tracing::debug!("reading the database gauges for /metrics timed out");
            None
        }
    };
    *cached = Some((Instant::now(), sample.clone()));
    sample
}

async fn read_db(d: &Dashboard) -> Result<DbSample, String> {
    let c = d.db.get().await.map_err(|e| e.to_string())?;
    // Counted over the table's partial indexes (one on parked runs, one on dead ones); every
    // function is listed, so one with nothing parked reads 0.
    let mut runs: Vec<(String, i64, i64)> = c
        .query("SELECT name FROM pgfire.functions ORDER BY name", &[])
        .await
        .map_err(|e| e.to_string())?
        .iter()
        .map(|r| (r.get(0), 0, 0))
        .collect();
    let counts = c
        .query(
            "SELECT function_name, false, count(*) FROM pgfire.parked WHERE status = 'parked' GROUP BY 1
             UNION ALL
             SELECT function_name, true, count(*) FROM pgfire.parked WHERE status = 'dead' GROUP BY 1",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    for r in counts {
        let (function, dead, n): (String, bool, i64) = (r.get(0), r.get(1), r.get(2));
        let i = match runs.binary_search_by(|(f, _, _)| f.as_str().cmp(&function)) {
            Ok(i) => i,
            // A function deleted since its runs were parked.
            Err(i) => {
                runs.insert(i, (function, 0, 0));
                i
            }
        };
        match dead {
            true => runs[i].2 = n,
            false => runs[i].1 = n,
        }
    }
    let lag_bytes = match &d.state.slot {
        None => None,
        Some(slot) => c
            .query_opt(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8
                   FROM pg_replication_slots WHERE slot_name = $1",
                &[slot],
            )
            .await
            .map_err(|e| e.to_string())?
            .and_then(|r| r.get(0)),
    };
    Ok(DbSample { runs, lag_bytes })
}

/// The exposition text being written.
#[derive(Default)]
struct Text {
    out: String,
}

impl Text {
    fn family(&mut self, f: Family) {
        let _ = writeln!(self.out, "# HELP {} {}", f.name, escape_help(f.help));
        let _ = writeln!(self.out, "# TYPE {} {}", f.name, f.kind);
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// A label value as the format wants it: backslash, double quote and newline escaped.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped() {
        let mut t = Text::default();
        t.sample("m", &[("function", "a\"b\\c\nd"), ("phase", "post")], 1);
        assert_eq!(t.out, "m{function=\"a\\\"b\\\\c\\nd\",phase=\"post\"} 1\n");
    }

    #[test]
    fn bucket_bounds_read_as_seconds() {
        let le: Vec<String> = DURATION_BUCKETS_US
            .iter()
            .map(|us| (*us as f64 / 1e6).to_string())
            .collect();
        assert_eq!(le[0], "0.0005");
        assert_eq!(le[2], "0.0025");
        assert_eq!(le[10], "1");
        assert_eq!(le[14], "30");
    }
}
