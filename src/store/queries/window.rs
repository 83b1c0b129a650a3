//! The consumer window: which pulled messages are pending in which batch,
//! so that batches in flight at once apply each client's events in stream
//! order. On SQLite it lives in the consuming process's memory (one
//! process consumes into a database at a time, [`ConsumerLock`]); on
//! PostgreSQL in a table every instance shares.

use crate::store::sqlite::lock::ConsumerLock;
use crate::store::{AnyStore, Db, StoreError, WindowBlockers, postgres};
use chrono::{DateTime, Utc};
use std::future::Future;
use tokio_util::sync::CancellationToken;

/// For the pipeline (and `app`, which takes the consumer lock).
pub trait Window {
    /// Waits until this process may consume the stream into the database,
    /// and returns what it holds while it does: at once on PostgreSQL, whose
    /// instances share the consumer window in the database; on SQLite once
    /// no other process consumes (its window is in this process's memory).
    /// `None`: cancelled while waiting. `standing_by` is told when a wait
    /// begins and ends.
    fn consumer_lock(
        &self,
        cancel: &CancellationToken,
        standing_by: &(dyn Fn(bool) + Sync),
    ) -> impl Future<Output = Option<ConsumerLock>> + Send;
    /// Announces pulled messages `(stream seq, client)` in the consumer's
    /// window, owned by `owner` (one batch) until `lease_until`.
    fn window_register(
        &self,
        owner: &str,
        items: &[(u64, Option<String>)],
        lease_until: DateTime<Utc>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Extends the lease on these messages to `lease_until` (never
    /// shortens it), unless settled: their batch is still at work on them.
    fn window_renew(
        &self,
        seqs: &[u64],
        lease_until: DateTime<Utc>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// What holds back this batch's events of `clients` below `below`, given
    /// the stream's ack `floor`: every earlier message not settled, whoever
    /// holds it, but those of `owners` (the batch itself, and the batches it
    /// commits after) and the batch's own messages `mine` (a copy of one
    /// redelivered to another batch meanwhile is no earlier message); a
    /// lease that ran out is reported as `stale`.
    fn window_blockers(
        &self,
        owners: &[&str],
        mine: &[u64],
        floor: u64,
        below: u64,
        clients: &[&str],
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<WindowBlockers, StoreError>> + Send;
    /// Forgets the window's messages at or below the ack floor.
    fn window_trim(&self, floor: u64) -> impl Future<Output = Result<(), StoreError>> + Send;
}

impl Window for AnyStore {
    async fn consumer_lock(
        &self,
        cancel: &CancellationToken,
        standing_by: &(dyn Fn(bool) + Sync),
    ) -> Option<ConsumerLock> {
        match &self.0 {
            Db::Sqlite(s) => s.consumer_lock(cancel, standing_by).await,
            Db::Postgres(_) => Some(ConsumerLock::shared()),
        }
    }

    async fn window_register(
        &self,
        owner: &str,
        items: &[(u64, Option<String>)],
        lease_until: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        match &self.0 {
            Db::Sqlite(s) => {
                s.window.register(owner, items, lease_until);
                Ok(())
            }
            Db::Postgres(s) => postgres::window::register(s, owner, items, lease_until).await,
        }
    }

    async fn window_renew(
        &self,
        seqs: &[u64],
        lease_until: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        match &self.0 {
            Db::Sqlite(s) => {
                s.window.renew(seqs, lease_until);
                Ok(())
            }
            Db::Postgres(s) => postgres::window::renew(s, seqs, lease_until).await,
        }
    }

    async fn window_blockers(
        &self,
        owners: &[&str],
        mine: &[u64],
        floor: u64,
        below: u64,
        clients: &[&str],
        now: DateTime<Utc>,
    ) -> Result<WindowBlockers, StoreError> {
        match &self.0 {
            Db::Sqlite(s) => Ok(s.window.blockers(owners, mine, floor, below, clients, now)),
            Db::Postgres(s) => {
                postgres::window::blockers(s, owners, mine, floor, below, clients, now).await
            }
        }
    }

    async fn window_trim(&self, floor: u64) -> Result<(), StoreError> {
        match &self.0 {
            Db::Sqlite(s) => {
                s.window.trim(floor);
                Ok(())
            }
            Db::Postgres(s) => postgres::window::trim(s, floor).await,
        }
    }
}
