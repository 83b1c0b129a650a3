//! What the pipeline reads to decide a batch, and the batch's commit.

use crate::domain::counters::{CounterKey, Stored};
use crate::domain::event::{ClientId, EventId};
use crate::domain::history::ClientState;
use crate::store::dialect::{Dialect, state_from_row};
use crate::store::{
    AnyStore, BatchWrite, CommitOutcome, Db, Pools, StoreError, db, postgres, shared, sqlite,
};
use sqlx::{QueryBuilder, Row};
use std::collections::{HashMap, HashSet};
use std::future::Future;

/// Client states and shared counters as committed: what a decision starts
/// from (the pipeline), and what the 360 view, delivery and tools read.
pub trait State {
    /// Current states of these clients; absent ones are not in the map.
    fn load_clients(
        &self,
        ids: &[&ClientId],
    ) -> impl Future<Output = Result<HashMap<ClientId, ClientState>, StoreError>> + Send;
    fn load_counter(
        &self,
        key: &CounterKey,
    ) -> impl Future<Output = Result<Stored, StoreError>> + Send;
    fn is_member(
        &self,
        key: &CounterKey,
        member: &str,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
}

/// The pipeline's writes: a batch of decisions in one transaction.
pub trait Batches {
    /// Which of these event ids are already in the log.
    fn known_events(
        &self,
        ids: &[&EventId],
    ) -> impl Future<Output = Result<HashSet<String>, StoreError>> + Send;
    /// Writes events, client states (a compare-and-swap on their versions),
    /// outbox, tasks, shared counters (compare-and-swap), process log,
    /// rejected envelopes, sweep progress and the window's settled messages,
    /// all or nothing; [`CommitOutcome::Conflict`] when another writer got
    /// there first, with nothing written.
    fn commit_batch(
        &self,
        batch: &BatchWrite,
    ) -> impl Future<Output = Result<CommitOutcome, StoreError>> + Send;
}

impl State for AnyStore {
    async fn load_clients(
        &self,
        ids: &[&ClientId],
    ) -> Result<HashMap<ClientId, ClientState>, StoreError> {
        let ids: Vec<&str> = ids.iter().map(|i| i.as_str()).collect();
        let mut out = HashMap::with_capacity(ids.len());
        shared!(self, |s, D| {
            for chunk in D::id_chunks(&ids) {
                let mut q = QueryBuilder::<D>::new(
                    "SELECT version, CAST(state AS TEXT), client_id FROM clients WHERE client_id",
                );
                D::push_in(&mut q, chunk);
                let rows = q
                    .build()
                    .fetch_all(s.reader())
                    .await
                    .map_err(db("loading client states"))?;
                for row in rows {
                    let state = state_from_row(row.get(2), row.get(0), row.get(1))?;
                    out.insert(state.client_id.clone(), state);
                }
            }
        });
        Ok(out)
    }

    async fn load_counter(&self, key: &CounterKey) -> Result<Stored, StoreError> {
        let row = shared!(self, |s, D| sqlx::query(
            "SELECT value, version FROM counters WHERE name = $1 AND period = $2"
        )
        .bind(&key.name)
        .bind(&key.period)
        .fetch_optional(s.reader())
        .await
        .map_err(db("reading a counter"))?
        .map(|r| Stored {
            value: r.get(0),
            version: r.get(1),
        }));
        Ok(row.unwrap_or_default())
    }

    async fn is_member(&self, key: &CounterKey, member: &str) -> Result<bool, StoreError> {
        let found = shared!(self, |s, D| sqlx::query(
            "SELECT 1 FROM counter_members WHERE name = $1 AND period = $2 AND member = $3",
        )
        .bind(&key.name)
        .bind(&key.period)
        .bind(member)
        .fetch_optional(s.reader())
        .await
        .map_err(db("reading a distinct counter"))?
        .is_some());
        Ok(found)
    }
}

impl Batches for AnyStore {
    async fn known_events(&self, ids: &[&EventId]) -> Result<HashSet<String>, StoreError> {
        let ids: Vec<&str> = ids.iter().map(|i| i.as_str()).collect();
        let mut known = HashSet::new();
        shared!(self, |s, D| {
            for chunk in D::id_chunks(&ids) {
                let mut q = QueryBuilder::<D>::new("SELECT id FROM events WHERE id");
                D::push_in(&mut q, chunk);
                let rows = q
                    .build()
                    .fetch_all(s.reader())
                    .await
                    .map_err(db("looking up known event ids"))?;
                known.extend(rows.into_iter().map(|row| row.get::<String, _>(0)));
            }
        });
        Ok(known)
    }

    async fn commit_batch(&self, batch: &BatchWrite) -> Result<CommitOutcome, StoreError> {
        match &self.0 {
            Db::Sqlite(s) => sqlite::batch::commit(s, batch).await,
            Db::Postgres(s) => postgres::batch::commit(s, batch).await,
        }
    }
}
