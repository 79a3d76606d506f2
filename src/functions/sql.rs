//! `sql` functions: `SELECT fn($1::jsonb)` on a pooled session to the served database.
//!
//! Every run starts from a clean session: the call is pipelined with a reset (what `DISCARD ALL`
//! does, cached plans aside; one round trip), and a session goes back to the pool only once that
//! succeeded. A run is bounded by the
//! function's timeout: then its query is cancelled, and if it has not ended within a short grace
//! (it caught the cancel, say) its backend is terminated and its session dropped, never reused.
//! A run never waits for a session another run holds: the pool opens a new one when none is idle.
//!
//! No loops: the call's transaction first writes a transactional logical message
//! ([`ORIGIN_MESSAGE_PREFIX`], the function's name), so the consumer knows which function wrote
//! the changes of that transaction and does not run that function for them again (other
//! functions still get them). PostgreSQL's replication origins would say the same, but on
//! PostgreSQL 15 one origin can be set up by one session at a time, which would serialise a
//! function's runs.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::time::Instant;
use tokio_postgres::types::Type;

use super::{Delivery, FunctionError, Kind};
use crate::catalog::FunctionDef;

/// Sessions open at most (runs and the sessions that terminate runaway ones).
const MAX_SESSIONS: usize = 32;
/// How long a cancelled run may take to end before its backend is terminated.
const CANCEL_GRACE: Duration = Duration::from_secs(1);
/// Resets everything a function can leave in its session: cursors, session authorization and
/// role, every setting (`search_path` included), prepared statements, LISTEN, advisory locks,
/// temporary tables and sequence state. This is `DISCARD ALL` without its `DISCARD PLANS`: cached
/// plans are no session state a function can observe (PostgreSQL replans when the search_path or
/// role a plan depends on changes), and keeping them makes a run of a PL/pgSQL function about a
/// third cheaper (measured: ≈370 µs against ≈510 µs for a one-INSERT function). Any failure of it
/// drops the session instead of returning it to the pool.
const RESET: &str = "CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; DEALLOCATE ALL; \
                     UNLISTEN *; SELECT pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES";

/// The prefix of the logical message naming the `sql` function that wrote a transaction.
pub const ORIGIN_MESSAGE_PREFIX: &str = "pgfire.origin";

pub struct Sql {
    sessions: Arc<Sessions>,
    /// TLS for cancel requests, as for the sessions.
    tls: crate::db::MakeTls,
}

impl Sql {
    pub fn new(database_url: &str) -> anyhow::Result<Sql> {
        let (mut config, tls) = crate::db::config(database_url)?;
        config.application_name("pgfire function");
        let pool = deadpool::managed::Pool::builder(Connector {
            config,
            tls: tls.clone(),
        })
        .max_size(MAX_SESSIONS)
        .runtime(deadpool::Runtime::Tokio1)
        .build()?;
        Ok(Sql {
            sessions: Arc::new(Sessions { pool }),
            tls,
        })
    }

    /// One run of `callable` with `envelope`, bounded by `timeout` (plus the cancel grace).
    async fn run(
        &self,
        function: &str,
        callable: &str,
        envelope: &str,
        timeout: Duration,
    ) -> Result<(), FunctionError> {
        let deadline = Instant::now() + timeout;
        let timed_out = || FunctionError::Timeout(timeout.as_millis());
        let session = match tokio::time::timeout_at(deadline, self.sessions.get()).await {
            Err(_) => return Err(timed_out()),
            Ok(Err(e)) => {
                return Err(FunctionError::Failed(format!(
                    "no database connection: {e}"
                )))
            }
            Ok(Ok(s)) => s,
        };
        // If this future is dropped mid-run, the guard ends the backend: its session is gone.
        let mut guard = TerminateOnDrop {
            pid: Some(session.pid),
            sessions: self.sessions.clone(),
        };
        // The marker is written first (a MATERIALIZED CTE runs before the call), so it precedes
        // every change of the transaction in the stream.
        let sql = format!(
            "WITH origin AS MATERIALIZED (SELECT pg_logical_emit_message(true, '{ORIGIN_MESSAGE_PREFIX}', $2::text)) \
             SELECT {callable}($1::text::jsonb)::text FROM origin"
        );
        let outcome = {
            let client = &session.client;
            // Both go out together; the reset runs after the call's implicit transaction, whether
            // the call succeeded or failed.
            let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 2] =
                [(&envelope, Type::TEXT), (&function, Type::TEXT)];
            let call = futures_util::future::join(
                client.query_typed(&sql, &params),
                client.batch_execute(RESET),
            );
            tokio::pin!(call);
            match tokio::time::timeout_at(deadline, &mut call).await {
                Ok((result, reset)) => Outcome::Ended(
                    result
                        .map(|_| ())
                        .map_err(|e| FunctionError::Failed(crate::db::describe(&e))),
                    reset.is_ok(),
                ),
                Err(_) => {
                    // The cancel is delivered before anything else is sent on this session; a
                    // run that ends within the grace leaves a clean session for the pool.
                    let token = client.cancel_token();
                    let ended = tokio::time::timeout(timeout.min(CANCEL_GRACE), async {
                        let _ = token.cancel_query(self.tls.clone()).await;
                        (&mut call).await
                    })
                    .await;
                    match ended {
                        // A call that completed as the timer fired did its work: it is ok.
                        Ok((result, reset)) => Outcome::Ended(
                            result.map(|_| ()).map_err(|_| timed_out()),
                            reset.is_ok(),
                        ),
                        Err(_) => Outcome::Stuck,
                    }
                }
            }
        };
        match outcome {
            Outcome::Ended(result, clean) => {
                guard.pid = None;
                if clean {
                    self.sessions.put(session);
                }
                result
            }
            Outcome::Stuck => {
                guard.pid = None;
                let pid = session.pid;
                tracing::warn!(
                    pid,
                    timeout_ms = timeout.as_millis() as u64,
                    "sql function ignored its cancel; terminating its backend"
                );
                // Dropped, not returned: the session is taken out of the pool, never reused.
                drop(session);
                terminate(&self.sessions, pid).await;
                Err(timed_out())
            }
        }
    }
}

enum Outcome {
    /// The call ended: its result, and whether the session is clean again.
    Ended(Result<(), FunctionError>, bool),
    /// The call is still running after the cancel and the grace.
    Stuck,
}

impl Kind for Sql {
    fn post<'a>(
        &'a self,
        def: &'a FunctionDef,
        d: &'a Delivery<'a>,
    ) -> BoxFuture<'a, Result<(), FunctionError>> {
        Box::pin(async move {
            let callable = def.sql_callable.as_deref().ok_or_else(|| {
                FunctionError::Failed(format!(
                    "SQL function {}(jsonb) does not exist",
                    def.target.as_deref().unwrap_or("")
                ))
            })?;
            let envelope = std::str::from_utf8(d.envelope())
                .map_err(|e| FunctionError::Failed(e.to_string()))?;
            self.run(&def.name, callable, envelope, def.timeout).await
        })
    }
}

/// A session of the pool: a connection and its backend's process id.
struct Session {
    client: tokio_postgres::Client,
    pid: i32,
}

/// Opens sessions for deadpool's managed pool, remembering each backend's pid (to terminate a
/// runaway run from another session); a closed session is not recycled.
struct Connector {
    config: tokio_postgres::Config,
    tls: crate::db::MakeTls,
}

impl deadpool::managed::Manager for Connector {
    type Type = Session;
    type Error = tokio_postgres::Error;

    async fn create(&self) -> Result<Session, tokio_postgres::Error> {
        let (client, conn) = self.config.connect(self.tls.clone()).await?;
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                tracing::debug!(error = %err, "function session closed");
            }
        });
        let pid = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await?
            .get(0);
        Ok(Session { client, pid })
    }

    async fn recycle(
        &self,
        session: &mut Session,
        _: &deadpool::managed::Metrics,
    ) -> deadpool::managed::RecycleResult<tokio_postgres::Error> {
        match session.client.is_closed() {
            true => Err(deadpool::managed::RecycleError::message("session closed")),
            false => Ok(()),
        }
    }
}

/// The pool: clean sessions, up to [`MAX_SESSIONS`] at once (far more than runs overlap today,
/// so a run does not wait for a session another run holds).
struct Sessions {
    pool: deadpool::managed::Pool<Connector>,
}

type Pooled = deadpool::managed::Object<Connector>;

impl Sessions {
    /// A clean session; the error says why none could be had.
    async fn get(&self) -> Result<Lease, String> {
        match self.pool.get().await {
            Ok(s) => Ok(Lease(Some(s))),
            Err(deadpool::managed::PoolError::Backend(e)) => Err(crate::db::describe(&e)),
            Err(other) => Err(other.to_string()),
        }
    }

    /// Return a clean session to the pool.
    fn put(&self, mut session: Lease) {
        drop(session.0.take());
    }
}

/// A session taken from the pool. It goes back only through [`Sessions::put`] (once known to be
/// clean); dropped any other way (a failed reset, a runaway run, a run abandoned midway) it is
/// taken out of the pool and closed, never reused.
struct Lease(Option<Pooled>);

impl std::ops::Deref for Lease {
    type Target = Session;
    fn deref(&self) -> &Session {
        // Some until put or dropped.
        self.0
            .as_deref()
            .expect("a lease holds its session until released")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            drop(Pooled::take(s));
        }
    }
}

/// End the backend `pid` from another session (the role that connected may signal its own
/// backends), waiting at most the cancel grace for a session to do it with.
async fn terminate(sessions: &Sessions, pid: i32) {
    let helper = match tokio::time::timeout(CANCEL_GRACE, sessions.get()).await {
        Ok(Ok(s)) => s,
        Ok(Err(error)) => {
            tracing::warn!(pid, %error, "cannot terminate a runaway sql function: no database connection");
            return;
        }
        Err(_) => {
            tracing::warn!(
                pid,
                "cannot terminate a runaway sql function: no database connection in time"
            );
            return;
        }
    };
    match helper
        .client
        .query_typed("SELECT pg_terminate_backend($1)", &[(&pid, Type::INT4)])
        .await
    {
        Ok(rows) => {
            if !rows.first().is_some_and(|r| r.get::<_, bool>(0)) {
                tracing::warn!(
                    pid,
                    "pg_terminate_backend did not signal the runaway sql function"
                );
            }
            // Nothing here changed the helper's session: it is still clean.
            sessions.put(helper);
        }
        Err(e) => {
            let error = crate::db::describe(&e);
            tracing::warn!(pid, %error, "cannot terminate a runaway sql function");
        }
    }
}

/// Ends the backend of a run whose future was dropped before it settled its session (the
/// session itself is dropped with the future, so it never goes back to the pool).
struct TerminateOnDrop {
    pid: Option<i32>,
    sessions: Arc<Sessions>,
}

impl Drop for TerminateOnDrop {
    fn drop(&mut self) {
        let Some(pid) = self.pid.take() else { return };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let sessions = self.sessions.clone();
        rt.spawn(async move { terminate(&sessions, pid).await });
    }
}
