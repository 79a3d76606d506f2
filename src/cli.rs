//! Command-line interface: bootstrap configuration from flags and the environment, one
//! subcommand per verb of DESIGN section 4.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::proxy::ProxyArgs;

#[derive(Debug, Parser)]
#[command(name = "pgfire", version, about = "A Postgres-native trigger service")]
pub struct Cli {
    /// Log lines for people (`human`, the default) or one JSON object per line (`json`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human, env = "PGFIRE_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// Where the database is.
#[derive(Debug, Clone, clap::Args)]
pub struct DbArgs {
    /// Connection string of the database pgfire serves.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub database_url: String,
}

/// Flags of the running service (`run` and `dev`).
#[derive(Debug, Clone, clap::Args)]
pub struct ServiceArgs {
    /// Address of the admin HTTP endpoint (the dashboard, /healthz, /metrics). Off loopback it
    /// needs --admin-token.
    #[arg(long, default_value = "127.0.0.1:9187", env = "PGFIRE_ADMIN_LISTEN")]
    pub admin_listen: SocketAddr,
    /// Token every admin request must carry (Authorization: Bearer, or open the dashboard once
    /// with ?token=...); required when --admin-listen is not a loopback address.
    #[arg(long, env = "PGFIRE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Do not start the replication consumer.
    #[arg(long)]
    pub no_consumer: bool,
    /// Replication slot to read (default: the one `pgfire install` chose).
    #[arg(long)]
    pub slot: Option<String>,
    /// Seconds of silence from the replication server after which pgfire asks it for a reply;
    /// with no answer within as many seconds again, the connection is dead and pgfire reconnects.
    #[arg(long, default_value_t = 30, env = "PGFIRE_REPLICATION_TIMEOUT")]
    pub replication_timeout: u64,
    /// Memory the streamed transactions not yet committed may hold together (e.g. 256MiB, 1GiB);
    /// beyond it their changes are written to files under --spill-dir and read back at commit.
    #[arg(long, default_value = crate::replication::spill::DEFAULT_BUDGET,
          value_parser = crate::replication::spill::parse_size, env = "PGFIRE_MAX_TRANSACTION_MEMORY")]
    pub max_transaction_memory: usize,
    /// Directory of the spill files of large transactions (default: `pgfire` in the system's
    /// temp directory). Files are deleted once their transaction is delivered or aborted.
    #[arg(long, env = "PGFIRE_SPILL_DIR")]
    pub spill_dir: Option<PathBuf>,
    #[command(flatten)]
    pub proxy: ProxyArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Install or upgrade pgfire in the database: schema, publication, replication slot.
    Install {
        #[command(flatten)]
        db: DbArgs,
        /// Name of the replication slot (slot names are per cluster: one per database).
        /// (default: the one chosen at the first install, else "pgfire")
        #[arg(long)]
        slot: Option<String>,
    },
    /// Remove everything pgfire installed: schema, publication, slot.
    Uninstall {
        #[command(flatten)]
        db: DbArgs,
        /// Confirm: the configuration and execution history are dropped.
        #[arg(long)]
        yes: bool,
    },
    /// Run the service: replication consumer, dispatcher, proxy and admin endpoint.
    Run {
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        service: ServiceArgs,
    },
    /// Start a private PostgreSQL, install pgfire with a demo, and run everything.
    Dev {
        /// Data directory of the private PostgreSQL (reused by the next `pgfire dev`).
        #[arg(long, default_value = ".pgfire-dev")]
        data_dir: PathBuf,
        /// Port of the private PostgreSQL.
        #[arg(long, default_value_t = 54329)]
        pg_port: u16,
        #[command(flatten)]
        service: ServiceArgs,
    },
    /// List every event type with its description and subscriber count.
    Events {
        #[command(flatten)]
        db: DbArgs,
        /// JSON for scripts instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Subscribe a function to an event type (or set the priority of a subscription and
    /// activate it).
    Subscribe(crate::ops::cli::SubscribeArgs),
    /// Remove a function's subscription to an event type (its execution history stays).
    Unsubscribe(crate::ops::cli::UnsubscribeArgs),
    /// List every function with its kind, target, timeout and subscriptions.
    Functions {
        #[command(flatten)]
        db: DbArgs,
        /// JSON for scripts instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show the execution history, newest first.
    Executions(crate::ops::cli::ExecutionsArgs),
    /// Send dead runs again (one execution, every dead run of a function, or those of a time
    /// range).
    Redeliver(crate::ops::cli::RedeliverArgs),
    /// Show slot lag, backlog and recent failures.
    Status {
        #[command(flatten)]
        db: DbArgs,
        /// The admin endpoint of the running `pgfire run`, asked for the consumer's own state
        /// (why it is reconnecting or stopped).
        #[arg(
            long,
            default_value = "http://127.0.0.1:9187",
            env = "PGFIRE_ADMIN_URL"
        )]
        admin_url: String,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("pgfire: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("pgfire: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr, filtered by `PGFIRE_LOG` (or `RUST_LOG`; default `info`). pgfire's own
/// lines never carry row values or secrets; tokio-postgres (statement parameters) and
/// pg_walstream (decoded messages) print row data at debug level, so they stay at info unless
/// `PGFIRE_LOG` names them.
fn init_tracing(format: LogFormat) {
    let directives = std::env::var("PGFIRE_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    // Libraries that print row data at debug level stay at info unless named.
    let mut directives = directives;
    for quiet in ["tokio_postgres", "pg_walstream"] {
        if !directives.contains(quiet) {
            directives.push_str(&format!(",{quiet}=info"));
        }
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => fmt.init(),
        LogFormat::Json => fmt.json().flatten_event(true).init(),
    }
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Install { db, slot } => {
            crate::install::install_cmd(&db.database_url, slot.as_deref()).await
        }
        Command::Uninstall { db, yes } => {
            crate::install::uninstall_cmd(&db.database_url, yes).await
        }
        Command::Run { db, service } => crate::service::run_cmd(&db.database_url, service).await,
        Command::Dev {
            data_dir,
            pg_port,
            service,
        } => crate::service::dev_cmd(data_dir, pg_port, service).await,
        Command::Events { db, json: false } => crate::catalog::events_cmd(&db.database_url).await,
        Command::Events { db, json: true } => crate::ops::cli::events_json(&db.database_url).await,
        Command::Subscribe(a) => a.run().await,
        Command::Unsubscribe(a) => a.run().await,
        Command::Functions { db, json } => {
            crate::ops::cli::functions_cmd(&db.database_url, json).await
        }
        Command::Executions(a) => a.run().await,
        Command::Redeliver(a) => a.run().await,
        Command::Status { db, admin_url } => {
            crate::service::status_cmd(&db.database_url, &admin_url).await
        }
    }
}
