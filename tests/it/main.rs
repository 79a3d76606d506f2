//! pgfire's integration tests: one binary, a real PostgreSQL started by the tests, a fresh database
//! per test.

mod support;

mod consumer;
mod delivery;
mod delivery_faults;
mod delivery_nats;
mod dev;
mod embedded;
mod events;
mod functions;
mod install;
mod proxy;
mod resilience;
mod sources;
