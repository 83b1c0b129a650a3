//! nudge: a marketing-automation rules engine daemon.
//!
//! Data flows one way: [`ingest`] pulls events from NATS JetStream, the
//! [`pipeline`] validates them ([`event`]), folds them into each client's
//! [`history`], runs the [`rules`] through the pure [`decide`] core, and
//! commits events, states and [`effects`] in one transaction to the
//! [`store`]; [`delivery`] sends what the outbox holds.

pub mod api;
pub mod app;
pub mod bench;
pub mod catalog;
pub mod chain;
pub mod config;
pub mod counters;
pub mod decide;
pub mod delivery;
pub mod effects;
pub mod event;
pub mod history;
pub mod ingest;
pub mod live;
pub mod metrics;
pub mod pipeline;
pub mod publish;
pub mod replay;
pub mod rules;
pub mod ruletest;
pub mod scheduler;
pub mod store;
pub mod telemetry;
pub mod templates;
pub mod tools;
pub mod unsubscribe;
pub mod view;
