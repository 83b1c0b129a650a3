//! nudge: a marketing-automation rules engine daemon.
//!
//! Data flows one way, and the modules follow it:
//!
//! - [`domain`]: the types every layer speaks (events, client history,
//!   counters, effects, process-log entries); imports nothing else of nudge.
//! - [`core`]: the pure decision: rules ([`core::rules`]), templates and
//!   [`core::decide`], which turns an event and a client's history into
//!   effects; imports only the domain.
//! - [`flow`]: the daemon's stages: [`flow::ingest`] pulls from NATS
//!   JetStream, [`flow::pipeline`] decides a batch in stream order and
//!   commits it, [`flow::chain`] feeds secondary events back,
//!   [`flow::scheduler`] runs timers and cron rules.
//! - [`store`]: the history, outbox and consumer window in SQLite or
//!   PostgreSQL.
//! - [`delivery`]: sends what the outbox holds (mail, tasks, events).
//! - [`http`]: the staff API, the 360 view and the live feed.
//! - [`tools`]: what marketers and operators run by hand: replay, backtest,
//!   rule tests, checks and previews.

pub mod app;
pub mod config;
pub mod core;
pub mod delivery;
pub mod domain;
pub mod flow;
pub mod http;
pub mod metrics;
pub mod store;
pub mod telemetry;
pub mod tools;
