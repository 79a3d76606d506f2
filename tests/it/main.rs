//! pgfire's integration tests: one binary, a real PostgreSQL started by the tests, a fresh database
//! per test.

mod capture;
mod support;

mod auth;
mod cli;
mod consumer;
mod custom;
mod dashboard;
mod datahub;
mod delivery;
mod delivery_faults;
mod delivery_nats;
mod dev;
mod docker;
mod embedded;
mod events;
mod functions;
mod install;
mod logs;
mod metrics;
mod pre;
mod pre_commits;
mod pre_copy;
mod pre_extended;
mod pre_forms;
mod pre_lexing;
mod pre_nats;
mod pre_split;
mod pre_tamper;
mod proxy;
mod proxy_tls;
mod resilience;
mod sources;
mod standby;
mod tls;
