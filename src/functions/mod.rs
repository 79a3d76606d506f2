//! Function kinds: what running a subscribed function means for each kind.
//!
//! Contract of [`Kind::post`]: deliver one POST event envelope; `Ok` means the function accepted
//! it (delivery is settled), an error means it may be retried ([`FunctionError::kind`] says
//! whether retrying can help, and [`FunctionError::retry_after`] when the function asked for a
//! pause). Delivery is at least once, so a function may see the same event id twice. Runs of one
//! event start in priority order; events of one row (see `delivery::key`) reach each function one
//! at a time in commit order, events of different rows may run concurrently (up to the
//! function's `concurrency`), so a kind's implementation must allow concurrent calls.

pub mod log;
pub mod nats;
pub mod sql;
pub mod webhook;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::catalog::{FunctionDef, FunctionKind};
use crate::events::Event;

#[derive(Debug, thiserror::Error)]
pub enum FunctionError {
    #[error("timed out after {0} ms")]
    Timeout(u128),
    #[error("{0}")]
    Failed(String),
    /// The function asked to be called again later (429 or 503 with `Retry-After`).
    #[error("{message}")]
    Busy {
        message: String,
        retry_after: Duration,
    },
    /// Retrying cannot help (the event itself is refused, say): the run is dead at once.
    #[error("{0}")]
    Rejected(String),
}

/// What retrying a failed run can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// It may work next time.
    Transient,
    /// It will fail the same way: no retry.
    Permanent,
}

impl FunctionError {
    /// The error as a log line may carry it: never a row value or anything the endpoint
    /// answered. A database error keeps only its SQLSTATE (its message and detail may quote the
    /// row: `Key (email)=(...) already exists`, a `RAISE` with the value); a webhook's answer
    /// keeps only its status. The whole error is in `pgfire.executions`.
    pub fn for_logs(&self) -> String {
        let text = self.to_string();
        if let Some(i) = text.find("(SQLSTATE ") {
            let code: String = text[i + 10..].chars().take(5).collect();
            return format!("database error, SQLSTATE {code} (the error is in pgfire.executions)");
        }
        if let Some(i) = text.find(" answered ") {
            let end = text[i + 10..]
                .find([':', ','])
                .map_or(text.len(), |j| i + 10 + j);
            return format!("{} (the answer is in pgfire.executions)", &text[..end]);
        }
        text
    }

    /// The `pgfire.executions.status` this error is recorded as.
    pub fn status(&self) -> crate::executions::Status {
        match self {
            FunctionError::Timeout(_) => crate::executions::Status::Timeout,
            _ => crate::executions::Status::Error,
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            FunctionError::Rejected(_) => ErrorKind::Permanent,
            _ => ErrorKind::Transient,
        }
    }

    /// How long the function asked to be left alone, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            FunctionError::Busy { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

/// One event on its way to functions; the JSON envelope is built once, when first needed (or
/// given, shared by every run of the event).
pub struct Delivery<'a> {
    pub event: &'a Event,
    envelope: OnceLock<Arc<[u8]>>,
}

impl<'a> Delivery<'a> {
    pub fn new(event: &'a Event) -> Self {
        Delivery {
            event,
            envelope: OnceLock::new(),
        }
    }

    /// A delivery whose envelope is already built (a parked run's, as stored).
    pub fn with_envelope(event: &'a Event, envelope: Arc<[u8]>) -> Self {
        Delivery {
            event,
            envelope: OnceLock::from(envelope),
        }
    }

    /// The envelope, if it was built (or given) already.
    pub fn built_envelope(&self) -> Option<Arc<[u8]>> {
        self.envelope.get().cloned()
    }

    pub fn envelope(&self) -> &[u8] {
        self.shared_envelope()
    }

    fn shared_envelope(&self) -> &Arc<[u8]> {
        self.envelope
            .get_or_init(|| Arc::from(self.event.envelope()))
    }
}

/// A function kind's implementation.
pub trait Kind: Send + Sync {
    fn post<'a>(
        &'a self,
        def: &'a FunctionDef,
        delivery: &'a Delivery<'a>,
    ) -> BoxFuture<'a, Result<(), FunctionError>>;
}

/// The implementations of every kind, sharing their clients (HTTP, database pool).
pub struct Kinds {
    pub webhook: webhook::Webhook,
    pub sql: sql::Sql,
    pub log: log::Log,
    pub nats: nats::Nats,
}

impl Kinds {
    pub fn new(database_url: &str) -> anyhow::Result<Kinds> {
        Ok(Kinds {
            webhook: webhook::Webhook::new()?,
            sql: sql::Sql::new(database_url)?,
            log: log::Log,
            nats: nats::Nats::new(),
        })
    }

    /// The configuration in force changed: kinds that read settings follow it.
    pub fn configure(&self, catalog: &crate::catalog::Catalog) {
        self.nats.configure(nats::NatsConfig::from_catalog(catalog));
    }

    /// Run `def` for `delivery` here and now when its kind never waits (a `log` line): the
    /// run's result, or `None` for kinds that do (use [`Kinds::post`]). Same contract as `post`.
    pub fn post_at_once(
        &self,
        def: &FunctionDef,
        delivery: &Delivery<'_>,
    ) -> Option<Result<(), FunctionError>> {
        match def.kind {
            FunctionKind::Log => Some(self.log.write(def, delivery)),
            FunctionKind::Webhook | FunctionKind::Sql | FunctionKind::Nats => None,
        }
    }

    /// Run `def` for `delivery`, bounded by the function's timeout (a `sql` run may take up to a
    /// second more to end one that ignores its cancel).
    pub async fn post(
        &self,
        def: &FunctionDef,
        delivery: &Delivery<'_>,
    ) -> Result<(), FunctionError> {
        let kind: &dyn Kind = match def.kind {
            FunctionKind::Webhook => &self.webhook,
            // A sql run bounds itself: at its timeout it cancels, then ends a run that ignores
            // the cancel, before its session can be reused.
            FunctionKind::Sql => return self.sql.post(def, delivery).await,
            // A log line cannot hang: no timer needed.
            FunctionKind::Log => return self.log.post(def, delivery).await,
            FunctionKind::Nats => &self.nats,
        };
        match tokio::time::timeout(def.timeout, kind.post(def, delivery)).await {
            Ok(r) => r,
            Err(_) => Err(FunctionError::Timeout(def.timeout.as_millis())),
        }
    }
}
