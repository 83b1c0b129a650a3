//! Integration tests: one binary, a module per feature. Each test starts its
//! own nats-server, SMTP server and SQLite database (see `helpers`).

mod helpers;

mod browser;
mod campaigns;
mod cli;
mod faults;

mod rejects;
mod reload;
mod staff;
mod timers;
mod tools;
mod trust;
mod welcome;
