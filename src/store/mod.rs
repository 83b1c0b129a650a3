//! Persistence, split by who asks: each caller imports the trait it uses.
//!
//! | trait | caller | what |
//! |---|---|---|
//! | [`Admin`] | `app`, health checks, unsubscribe keys | migrations, ping, settings kept in the database |
//! | [`State`] | pipeline, delivery, 360 view, tools | client states and shared counters as committed |
//! | [`Batches`] | pipeline, bench | a batch of decisions, written in one transaction |
//! | [`Window`] | pipeline, `app` | the consumer window: messages pulled and not yet settled |
//! | [`Outbox`] | delivery | claiming due mails with a lease, recording what became of them |
//! | [`Schedules`] | scheduler | due timers, pages of a sweep, claiming a sweep |
//! | [`History`] | replay, backtest | the event log in stream order, rebuilding derived history |
//! | [`Staff`] | HTTP API, CLI | rejected events, process log, tasks, 360 view, erasure, audit |
//!
//! There is one store type, [`AnyStore`], whatever the database. A query
//! both databases run alike is written once (`queries/`) and compiled for
//! each backend by [`shared!`], the few differences looked up in its
//! [`Dialect`](dialect::Dialect); only what truly differs is written per
//! backend, split along the same seams in `sqlite/` and `postgres/`: the
//! batch write path (`batch.rs`), the consumer window (`window.rs`), and
//! connecting and upkeep (`mod.rs`). A batch is committed in one
//! transaction: events, client states, outbox and process log together, so
//! an effect exists only if its cause does.

mod dialect;
mod error;
mod postgres;
mod queries;
mod sqlite;
mod types;
mod upkeep;

pub use dialect::{parse_ts, state_from_row, ts};
pub use error::StoreError;
pub(crate) use error::db;
pub use queries::admin::Admin;
pub use queries::batches::{Batches, State};
pub use queries::boards::Boards;
pub use queries::export::{Cell, ColType, Snapshot, Sql, StreamError};
pub use queries::history::History;
pub use queries::outbox::Outbox;
pub use queries::products::Products;
pub use queries::reports::Reports;
pub use queries::schedules::Schedules;
pub use queries::staff::{Staff, erasure_hash};
pub use queries::texts::Texts;
pub use queries::window::Window;
pub use types::*;

/// The consumer window's lock on a SQLite database.
pub mod window {
    pub use super::sqlite::lock::ConsumerLock;
}

/// The configured database. One type for both backends, so that each
/// trait's method is declared once and implemented once (for both, see
/// [`shared!`]); the enum is matched in each method, never boxed.
#[derive(Clone)]
pub struct AnyStore(Db);

#[derive(Clone)]
enum Db {
    Sqlite(sqlite::SqliteDb),
    Postgres(postgres::PgDb),
}

/// What the shared queries need of a backend besides its dialect.
pub(crate) trait Pools {
    type D: dialect::Dialect;
    /// Connections for reading.
    fn reader(&self) -> &sqlx::Pool<Self::D>;
    /// Where writes go (on SQLite one connection, on PostgreSQL the pool).
    fn writer(&self) -> &sqlx::Pool<Self::D>;
    /// A write transaction (on SQLite `BEGIN IMMEDIATE`: it queues for the
    /// lock at its start rather than failing half-way).
    fn begin_write(
        &self,
    ) -> impl Future<Output = Result<sqlx::Transaction<'static, Self::D>, sqlx::Error>> + Send;
    /// Makes an erasure's old content unreadable in the files (a WAL
    /// checkpoint, a vacuum); a failure is only logged.
    fn after_erasure(&self) -> impl Future<Output = ()> + Send;
}

use std::future::Future;

/// Runs `$body` with `$db` bound to the backend and `$D` naming its
/// dialect: written once, compiled for each backend (like a generic
/// function, without restating sqlx's bounds for every type bound).
macro_rules! shared {
    ($store:expr, |$db:ident, $D:ident| $body:expr) => {
        match &$store.0 {
            $crate::store::Db::Sqlite($db) => {
                #[allow(unused)]
                type $D = sqlx::Sqlite;
                $body
            }
            $crate::store::Db::Postgres($db) => {
                #[allow(unused)]
                type $D = sqlx::Postgres;
                $body
            }
        }
    };
}
pub(crate) use shared;

impl AnyStore {
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        Self::open(&crate::config::DatabaseConfig {
            url: url.into(),
            max_connections: max_connections
                .try_into()
                .unwrap_or(std::num::NonZeroU32::MIN),
            max_size_mb: None,
        })
        .await
    }

    /// Opens the database as configured (`database.*`).
    pub async fn open(cfg: &crate::config::DatabaseConfig) -> Result<Self, StoreError> {
        let (url, max_connections) = (cfg.url.expose(), cfg.max_connections.get());
        if url.starts_with("sqlite:") {
            Ok(AnyStore(Db::Sqlite(
                sqlite::SqliteDb::connect(url, max_connections, cfg.max_size_mb.map(|n| n.get()))
                    .await?,
            )))
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Ok(AnyStore(Db::Postgres(
                postgres::PgDb::connect(url, max_connections).await?,
            )))
        } else {
            Err(StoreError::Url(format!(
                "{} (expected sqlite:// or postgres://)",
                crate::config::redact(url)
            )))
        }
    }
}
