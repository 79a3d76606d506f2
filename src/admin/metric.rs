//! Every metric `/metrics` serves, in one place: name, type, labels and what it means (the
//! README's metrics table says the same).

/// One metric family.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    pub name: &'static str,
    /// `counter`, `gauge` or `histogram`.
    pub kind: &'static str,
    pub help: &'static str,
}

const fn counter(name: &'static str, help: &'static str) -> Family {
    Family {
        name,
        kind: "counter",
        help,
    }
}

const fn gauge(name: &'static str, help: &'static str) -> Family {
    Family {
        name,
        kind: "gauge",
        help,
    }
}

/// Labels: `type`.
pub const EVENTS: Family = counter(
    "pgfire_events_total",
    "Events built from the replication stream, by event type (only types with a subscription are built; anything else would count as type other)",
);
/// Labels: `function`, `phase` (post, pre), `status` (ok, error, timeout, dead; pre: blocked, modified).
pub const RUNS: Family = counter(
    "pgfire_function_runs_total",
    "Function runs by function, phase and status, as recorded in pgfire.executions",
);
/// Labels: `function`, `phase`.
pub const RUN_DURATION: Family = Family {
    name: "pgfire_function_run_duration_seconds",
    kind: "histogram",
    help: "Duration of function runs by function and phase, in seconds",
};
pub const FAILURES: Family = counter(
    "pgfire_function_failures_total",
    "POST runs that failed (error or timeout; retried, parked or dead)",
);
pub const PARKED: Family = counter(
    "pgfire_runs_parked_total",
    "POST runs parked in pgfire.parked for a retry since start",
);
pub const DEAD: Family = counter(
    "pgfire_runs_dead_total",
    "POST runs given up (dead) since start",
);
/// Labels: `function`.
pub const PARKED_NOW: Family = gauge(
    "pgfire_parked_runs",
    "Runs waiting in pgfire.parked for a retry now, by function",
);
/// Labels: `function`.
pub const DEAD_NOW: Family = gauge(
    "pgfire_dead_runs",
    "Dead runs in pgfire.parked now (until redelivered or pruned), by function",
);
pub const IN_FLIGHT: Family = gauge(
    "pgfire_events_in_flight",
    "Events held in memory by delivery, not settled yet",
);
/// Labels: `function`, `outcome` (allowed, blocked, modified, error, timeout), `shadow`.
pub const PRE_DECISIONS: Family = counter(
    "pgfire_pre_decisions_total",
    "PRE function decisions by function and outcome; shadow=true ones were not applied",
);
/// Labels: `action` (streamed, held, refused).
pub const PROXY_STATEMENTS: Family = counter(
    "pgfire_proxy_statements_total",
    "Statements (Query and Parse messages) the proxy streamed as they came, held for PRE hooks, or refused",
);
pub const PROXY_CONNECTIONS: Family = gauge(
    "pgfire_proxy_connections",
    "Client sessions the proxy holds",
);
pub const CONNECTED: Family = gauge(
    "pgfire_replication_connected",
    "1 while the consumer streams from the slot",
);
pub const STANDBY: Family = gauge(
    "pgfire_replication_standby",
    "1 while another consumer holds the slot and this one stands by",
);
pub const RECEIVED_LSN: Family = gauge(
    "pgfire_received_lsn",
    "Last WAL position received from the server",
);
pub const CONFIRMED_LSN: Family = gauge(
    "pgfire_confirmed_lsn",
    "Last WAL position confirmed to the server",
);
pub const SETTLED_LSN: Family = gauge(
    "pgfire_settled_lsn",
    "WAL position up to which every event is settled (confirmed at the next status update)",
);
pub const RECONNECTS: Family = counter(
    "pgfire_replication_reconnects_total",
    "Times the consumer lost the stream and connected again",
);
pub const STREAMED_BYTES: Family = gauge(
    "pgfire_streamed_transaction_bytes",
    "Bytes of in-progress streamed transactions held in memory",
);
pub const SPILLED_BYTES: Family = counter(
    "pgfire_spilled_transaction_bytes_total",
    "Bytes of streamed transactions written to spill files",
);
pub const LAG_SECONDS: Family = gauge(
    "pgfire_slot_lag_seconds",
    "Seconds since the commit of the oldest transaction received and not settled yet (0 when everything received is settled)",
);
pub const LAG_BYTES: Family = gauge(
    "pgfire_slot_lag_bytes",
    "WAL bytes the slot holds: the server's current WAL position minus the slot's confirmed_flush_lsn",
);
pub const DATABASE_UP: Family = gauge(
    "pgfire_metrics_database_up",
    "1 when the last read of the database gauges (parked and dead runs, slot lag bytes) worked",
);
