//! The PostgreSQL wire-protocol proxy: clients connect here, every session is relayed to one
//! upstream session on the database. (Being built under issue 3.)

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Proxy flags for `pgfire run` and `pgfire dev`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProxyArgs {
    /// Address the proxy listens on.
    #[arg(long, default_value = "127.0.0.1:6432", env = "PGFIRE_LISTEN")]
    pub listen: SocketAddr,
    /// Do not start the proxy.
    #[arg(long)]
    pub no_proxy: bool,
}

/// Everything the proxy needs to run.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Upstream database address, host:port (TCP).
    pub upstream: String,
    pub shutdown_timeout: Duration,
}

impl ProxyConfig {
    /// Stub until the proxy lands (issue 3).
    pub fn from_args(_args: &ProxyArgs, database_url: &str) -> anyhow::Result<ProxyConfig> {
        Ok(ProxyConfig {
            upstream: database_url.to_string(),
            shutdown_timeout: Duration::from_secs(10),
        })
    }
}

/// Serve clients accepted on `listener` until `shutdown` is cancelled.
pub async fn serve(
    _config: ProxyConfig,
    _listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    shutdown.cancelled().await;
    Ok(())
}
