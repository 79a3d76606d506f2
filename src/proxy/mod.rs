//! The PostgreSQL wire-protocol proxy: clients connect here, every client session is relayed to
//! one upstream session on the database (TLS on each leg as configured). Authentication, cancel
//! keys and everything else pass through unchanged, but for SCRAM channel binding, which is not
//! offered ([`scram`]); pgfire looks only at Query, Parse and Bind (for PRE hooks) and at the
//! server's ReadyForQuery.

pub mod classify;
mod in_flight;
mod lexing;
pub mod pre;
mod relay;
mod scram;
mod session;
mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use session::{Hook, NoHook};
pub use upstream::{Upstream, UpstreamError, UpstreamTls};

/// Proxy flags for `pgfire run` and `pgfire dev`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProxyArgs {
    /// Address the proxy listens on.
    #[arg(long, default_value = "127.0.0.1:6432", env = "PGFIRE_LISTEN")]
    pub listen: SocketAddr,
    /// Do not start the proxy.
    #[arg(long)]
    pub no_proxy: bool,
    /// PEM certificate chain for TLS with clients (with --tls-key); without it SSL is declined.
    #[arg(long, env = "PGFIRE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "PGFIRE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Most client connections at once; more get "too many connections" (SQLSTATE 53300).
    #[arg(long, default_value_t = 1000)]
    pub max_client_connections: usize,
    /// Seconds a client has to finish its startup packet.
    #[arg(long, default_value_t = 10)]
    pub startup_timeout: u64,
    /// Seconds running transactions get to finish when pgfire stops.
    #[arg(long, default_value_t = 30)]
    pub shutdown_timeout: u64,
}

/// Everything the proxy needs to run.
#[derive(Clone)]
pub struct ProxyConfig {
    pub upstream: Upstream,
    /// TLS to the database (`sslmode`, `sslrootcert`), for sessions and cancel requests.
    pub upstream_tls: UpstreamTls,
    /// TLS with clients (`--tls-cert`); without it their SSL requests are declined.
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    pub max_clients: usize,
    pub startup_timeout: Duration,
    pub shutdown_timeout: Duration,
    /// PRE hooks: statements that may write a table with PRE subscriptions are held and run
    /// through them. None: everything is relayed as is.
    pub pre: Option<Arc<pre::PreHooks>>,
    /// Client sessions open now (for the admin endpoint).
    pub connections: Arc<std::sync::atomic::AtomicU64>,
    /// Where statements are counted (streamed, held, refused).
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl ProxyConfig {
    /// The proxy's configuration from its flags; the upstream is the database URL's first host,
    /// reached with TLS as the URL says.
    pub fn from_args(args: &ProxyArgs, database_url: &str) -> anyhow::Result<ProxyConfig> {
        let mut config = ProxyConfig::for_database(database_url)?;
        if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
            config.tls = Some(Arc::new(tls_config(cert, key)?));
        }
        config.max_clients = args.max_client_connections.max(1);
        config.startup_timeout = Duration::from_secs(args.startup_timeout.max(1));
        config.shutdown_timeout = Duration::from_secs(args.shutdown_timeout);
        Ok(config)
    }

    /// Default limits, no TLS with clients, the database of a `postgres://` URL or `key=value`
    /// string with TLS as its `sslmode` and `sslrootcert` (or `PGSSLMODE`, `PGSSLROOTCERT`) say.
    pub fn for_database(database_url: &str) -> Result<ProxyConfig, UpstreamError> {
        let (upstream, tls) = Upstream::from_url(database_url)?;
        Ok(ProxyConfig {
            upstream_tls: tls,
            ..ProxyConfig::new(upstream)
        })
    }

    /// A configuration for tests and embedding: no TLS on either leg, default limits.
    pub fn new(upstream: Upstream) -> ProxyConfig {
        ProxyConfig {
            upstream,
            upstream_tls: UpstreamTls::disabled(),
            tls: None,
            max_clients: 1000,
            startup_timeout: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(30),
            pre: None,
            connections: Default::default(),
            metrics: Default::default(),
        }
    }
}

/// A rustls server configuration from PEM files.
pub fn tls_config(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<tokio_rustls::rustls::ServerConfig> {
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(cert)
            .with_context(|| format!("cannot read TLS certificate {}", cert.display()))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .with_context(|| format!("invalid PEM certificate {}", cert.display()))?;
    anyhow::ensure!(!certs.is_empty(), "no certificate in {}", cert.display());
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(key)
            .with_context(|| format!("cannot read TLS key {}", key.display()))?,
    ))
    .with_context(|| format!("invalid PEM key {}", key.display()))?
    .with_context(|| format!("no private key in {}", key.display()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("TLS certificate and key do not match")
}

/// Serve clients accepted on `listener` until `shutdown` is cancelled; then stop accepting, let
/// sessions finish their transactions (up to the shutdown timeout) and return.
pub async fn serve(
    config: ProxyConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    serve_with_hook(config, listener, shutdown, Arc::new(NoHook)).await
}

/// [`serve`] with a hook that sees every Query, Parse and Bind (the PRE hooks' seam).
pub async fn serve_with_hook(
    config: ProxyConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
    hook: Arc<dyn Hook>,
) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let permits = Arc::new(Semaphore::new(config.max_clients));
    let tracker = TaskTracker::new();
    let drain = CancellationToken::new();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => {
                let (socket, peer) = match accepted {
                    Ok(a) => a,
                    Err(err) => {
                        // Out of file descriptors and the like: wait a moment, keep serving.
                        tracing::warn!(error = %err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = socket.set_nodelay(true);
                let permit = permits.clone().try_acquire_owned().ok();
                let (config, hook, drain) = (config.clone(), hook.clone(), drain.clone());
                tracker.spawn(async move {
                    use std::sync::atomic::Ordering;
                    let open = config.connections.clone();
                    open.fetch_add(1, Ordering::Relaxed);
                    session::run(socket, peer, config, hook, permit, drain).await;
                    open.fetch_sub(1, Ordering::Relaxed);
                });
            }
        }
    }
    drop(listener);
    tracker.close();
    drain.cancel();
    if tokio::time::timeout(
        config.shutdown_timeout + Duration::from_secs(2),
        tracker.wait(),
    )
    .await
    .is_err()
    {
        tracing::warn!("proxy sessions still open after the shutdown timeout");
    }
    Ok(())
}
