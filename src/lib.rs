//! pgfire: a Postgres-native trigger service.
//!
//! Layers, data flowing one way: `wire` (codec) → `replication` / `proxy` (IO) → `events` (domain)
//! → `dispatch` → `functions` (kinds). `catalog` holds the SQL configuration snapshot, `install`
//! the migrations, `service` wires everything for `pgfire run`, `embedded` runs a private
//! PostgreSQL for `pgfire dev` and the tests.

pub mod admin;
pub mod catalog;
pub mod cli;
pub mod db;
pub mod dispatch;
pub mod embedded;
pub mod events;
pub mod executions;
pub mod functions;
pub mod fuzz;
pub mod install;
pub mod ops;
pub mod proxy;
pub mod replication;
pub mod service;
pub mod wire;
