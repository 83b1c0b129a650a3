//! Integration tests: one binary, a module per feature. Each test starts its
//! own nats-server, SMTP server and database, and runs once per backend,
//! SQLite and PostgreSQL (see `helpers`).

#[macro_use]
mod helpers;

mod access;
mod bench;
mod boards;
mod campaigns;
mod chain;
mod check;
mod cli;
mod experiments;
mod export;
mod faults;
mod ingest;
mod layers;
mod ordering;
mod products;

mod rejects;
mod reload;
mod scale;
mod sms;
mod spam;
mod staff;
mod store_contract;
mod timers;
mod tools;
mod trust;
mod webhooks;
mod welcome;
