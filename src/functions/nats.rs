//! `nats` functions: a JetStream publish of the envelope to `<target>.<event_type>`, done once
//! the server acknowledges it (stored in the stream).
//!
//! The server is setting `nats.url` (default `nats://127.0.0.1:4222`), with the credentials file
//! named by `nats.credentials` if any (a `.creds` file: the secret stays on disk, out of the
//! configuration that travels in the replication stream). The stream is `nats.stream` (default
//! `PGFIRE`); pgfire creates it when missing and adds `<target>.>` to its subjects for each
//! target it publishes to. Each message carries `Nats-Msg-Id: <event id>:<function>`, so a run
//! delivered again (after a restart, or a retry whose ack was lost) is de-duplicated by
//! JetStream, while two functions publishing one event to one stream are not taken for each
//! other; header `Pgfire-Event-Id` carries the event id alone.
//!
//! PRE events go by core NATS request/reply instead: a request to `<target>.<event_type>` with
//! the envelope, answered by a subscriber with the PRE answer (`{"allow": ...}`), within the
//! function's timeout. A subject that a JetStream stream takes (a target that also publishes POST
//! events, say) would store the request and answer it with the stream's acknowledgement, so such
//! a request is refused with an error that says so, before anything is sent.

use std::collections::HashSet;
use std::sync::RwLock;
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use futures_util::future::BoxFuture;

use super::{Delivery, FunctionError, Kind};
use crate::catalog::{Catalog, FunctionDef};

/// Where and how to publish, from `pgfire.settings`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsConfig {
    pub url: String,
    pub credentials: Option<String>,
    pub stream: String,
}

impl NatsConfig {
    pub fn from_catalog(catalog: &Catalog) -> NatsConfig {
        let get = |k: &str| {
            catalog
                .settings
                .all
                .get(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        NatsConfig {
            url: get("nats.url").unwrap_or_else(|| "nats://127.0.0.1:4222".into()),
            credentials: get("nats.credentials"),
            stream: get("nats.stream").unwrap_or_else(|| "PGFIRE".into()),
        }
    }
}

/// Why a publish failed.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("cannot read the NATS credentials file {path}: {reason}")]
    Credentials { path: String, reason: String },
    #[error("cannot create or update JetStream stream {stream} for subjects {subject}: {reason}")]
    Stream {
        stream: String,
        subject: String,
        reason: String,
    },
    #[error("JetStream publish to {subject} failed: {reason}")]
    Publish { subject: String, reason: String },
}

impl NatsError {
    pub fn kind(&self) -> super::ErrorKind {
        super::ErrorKind::Transient
    }
}

impl From<NatsError> for FunctionError {
    fn from(e: NatsError) -> FunctionError {
        FunctionError::Failed(e.to_string())
    }
}

struct Conn {
    config: NatsConfig,
    client: async_nats::Client,
    js: jetstream::Context,
    /// Targets whose subjects the stream is known to take.
    ensured: HashSet<String>,
    /// PRE subjects no stream took when last asked (asked again once a stream changes here).
    free: HashSet<String>,
}

pub struct Nats {
    config: RwLock<Option<NatsConfig>>,
    conn: tokio::sync::Mutex<Option<Conn>>,
}

impl Default for Nats {
    fn default() -> Self {
        Nats::new()
    }
}

impl Nats {
    pub fn new() -> Nats {
        Nats {
            config: RwLock::new(None),
            conn: tokio::sync::Mutex::new(None),
        }
    }

    /// The configuration in force changed (the connection follows at the next publish).
    pub fn configure(&self, config: NatsConfig) {
        if let Ok(mut c) = self.config.write() {
            *c = Some(config);
        }
    }

    /// The connection for the current configuration (made, or made again, as needed), locked.
    async fn connection(
        &self,
        timeout: Duration,
    ) -> Result<tokio::sync::MappedMutexGuard<'_, Conn>, NatsError> {
        let config = self
            .config
            .read()
            .ok()
            .and_then(|c| c.clone())
            .unwrap_or_else(|| NatsConfig::from_catalog(&Catalog::default()));
        let mut guard = self.conn.lock().await;
        if guard.as_ref().is_none_or(|c| c.config != config) {
            *guard = Some(connect(&config, timeout).await?);
        }
        tokio::sync::MutexGuard::try_map(guard, Option::as_mut).map_err(|_| NatsError::Connect {
            url: config.url.clone(),
            reason: "no connection".into(),
        })
    }

    /// A JetStream context for `target`, connected with the current configuration, its stream
    /// taking `<target>.>`.
    async fn context(
        &self,
        target: &str,
        timeout: Duration,
    ) -> Result<jetstream::Context, NatsError> {
        let mut conn = self.connection(timeout).await?;
        if !conn.ensured.contains(target) {
            ensure_stream(&conn.js, &conn.config.stream, target).await?;
            conn.ensured.insert(target.to_string());
            conn.free.clear();
        }
        Ok(conn.js.clone())
    }

    /// A PRE run: a request of `body` (the envelope of event `id`) to `<target>.<event_type>`;
    /// the answer is the reply's payload, bounded by the function's timeout.
    pub async fn pre(
        &self,
        def: &FunctionDef,
        event_type: &str,
        id: &str,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, FunctionError> {
        let target = def.target.as_deref().unwrap_or_default();
        let subject = format!("{target}.{event_type}");
        let exchange = async {
            let client = {
                let mut conn = self.connection(def.timeout).await?;
                if !conn.free.contains(&subject) {
                    // Without JetStream on the server nothing can take the subject.
                    if let Ok(stream) = conn.js.stream_by_subject(subject.as_str()).await {
                        return Err(FunctionError::Failed(format!(
                            "NATS subject {subject} is taken by JetStream stream {stream}: a PRE \
                             request there would be stored, not answered; give the PRE function \
                             a subject prefix of its own"
                        )));
                    }
                    conn.free.insert(subject.clone());
                }
                conn.client.clone()
            };
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Pgfire-Event-Id", id);
            let request = async_nats::Request::new()
                .payload(Bytes::from(body))
                .headers(headers)
                .timeout(Some(def.timeout));
            match client.send_request(subject.clone(), request).await {
                Ok(reply) => Ok(reply.payload.to_vec()),
                Err(e) => Err(match e.kind() {
                    async_nats::client::RequestErrorKind::TimedOut => {
                        FunctionError::Timeout(def.timeout.as_millis())
                    }
                    async_nats::client::RequestErrorKind::NoResponders => FunctionError::Failed(
                        format!("no NATS subscriber answers requests on {subject}"),
                    ),
                    async_nats::client::RequestErrorKind::Other => {
                        FunctionError::Failed(format!("NATS request to {subject} failed: {e}"))
                    }
                }),
            }
        };
        tokio::time::timeout(def.timeout, exchange)
            .await
            .unwrap_or(Err(FunctionError::Timeout(def.timeout.as_millis())))
    }
}

async fn connect(config: &NatsConfig, timeout: Duration) -> Result<Conn, NatsError> {
    let mut opts = async_nats::ConnectOptions::new()
        .name("pgfire")
        .connection_timeout(timeout);
    if let Some(path) = &config.credentials {
        opts = opts
            .credentials_file(path)
            .await
            .map_err(|e| NatsError::Credentials {
                path: path.clone(),
                reason: e.to_string(),
            })?;
    }
    let client = tokio::time::timeout(timeout, opts.connect(config.url.as_str()))
        .await
        .map_err(|_| NatsError::Connect {
            url: config.url.clone(),
            reason: format!("no answer within {} ms", timeout.as_millis()),
        })?
        .map_err(|e| NatsError::Connect {
            url: config.url.clone(),
            reason: e.to_string(),
        })?;
    Ok(Conn {
        config: config.clone(),
        js: jetstream::new(client.clone()),
        client,
        ensured: HashSet::new(),
        free: HashSet::new(),
    })
}

/// The stream exists and takes `<target>.>`.
async fn ensure_stream(js: &jetstream::Context, name: &str, target: &str) -> Result<(), NatsError> {
    let subject = format!("{target}.>");
    let err = |reason: String| NatsError::Stream {
        stream: name.to_string(),
        subject: subject.clone(),
        reason,
    };
    let mut stream = js
        .get_or_create_stream(jetstream::stream::Config {
            name: name.to_string(),
            subjects: vec![subject.clone()],
            ..Default::default()
        })
        .await
        .map_err(|e| err(e.to_string()))?;
    let info = stream.info().await.map_err(|e| err(e.to_string()))?;
    if !info.config.subjects.iter().any(|s| s == &subject) {
        let mut config = info.config.clone();
        config.subjects.push(subject.clone());
        js.update_stream(&config)
            .await
            .map_err(|e| err(e.to_string()))?;
    }
    Ok(())
}

impl Kind for Nats {
    fn post<'a>(
        &'a self,
        def: &'a FunctionDef,
        d: &'a Delivery<'a>,
    ) -> BoxFuture<'a, Result<(), FunctionError>> {
        Box::pin(async move {
            let target = def.target.as_deref().unwrap_or_default();
            let js = self.context(target, def.timeout).await?;
            let subject = format!("{target}.{}", d.event.event_type);
            let failed = |reason: String| NatsError::Publish {
                subject: subject.clone(),
                reason,
            };
            let id = d.event.id.to_string();
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Pgfire-Event-Id", id.as_str());
            let publish = jetstream::context::Publish::build()
                .payload(Bytes::copy_from_slice(d.envelope()))
                .headers(headers)
                .message_id(format!("{id}:{}", def.name));
            let ack = js
                .send_publish(subject.clone(), publish)
                .await
                .map_err(|e| failed(e.to_string()))?;
            ack.await.map_err(|e| failed(e.to_string()))?;
            Ok(())
        })
    }
}
