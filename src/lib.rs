//! pgfire: a Postgres-native trigger service.
//!
//! Layers, data flowing one way: `wire` (codec) → `replication` / `proxy` (IO) → `events` (domain)
//! → `intake` (items to events, configuration as of commit) → `delivery` (scheduling, retries,
//! the slot's low-water mark) → `functions` (kinds). `catalog` holds the SQL configuration snapshot, `install`
//! the migrations, `service` wires everything for `pgfire run`, `admin` serves the dashboard over `ops`
//! (operator actions on the SQL tables, shared with the CLI), `embedded` runs a private
//! PostgreSQL for `pgfire dev` and the tests.

pub mod admin;
pub mod catalog;
pub mod cli;
pub mod db;
pub mod delivery;
pub mod embedded;
pub mod events;
pub mod executions;
pub mod fasthash;
pub mod functions;
pub mod fuzz;
pub mod install;
pub mod intake;
pub mod metrics;
pub mod ops;
pub mod proxy;
pub mod replication;
pub mod service;
pub mod wire;
