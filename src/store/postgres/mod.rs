//! The scale-out backend: PostgreSQL, shared by several nudge instances.
//!
//! Same behaviour as the SQLite backend (the contract suite and every
//! integration test run on both); what differs is how writers that run at
//! the same time are kept apart:
//! - a batch is one transaction of compare-and-swaps (`batch.rs`);
//! - the consumer window is a table every instance shares (`window.rs`);
//! - mails are claimed with `FOR UPDATE SKIP LOCKED`, sweeps with a lease.
//!
//! This file: connecting, upkeep, and the dialect.

pub(crate) mod batch;
pub(crate) mod window;

use super::dialect::{Dialect, STATEMENT_CACHE};
use super::queries::{outbox::claim_due_sql, staff::search_sql};
use super::upkeep::{UpkeepTask, spawn_upkeep};
use super::{Pools, StoreError, db};
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, QueryBuilder, Row};
use std::str::FromStr;
use std::time::Duration;

// sqlx takes an advisory lock: instances starting together migrate once.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// How often the consumer's window is vacuumed. Every pulled message is
/// inserted there and deleted moments later, so the table is all dead rows
/// within minutes, and each batch's look at it (the first gap, the clients
/// pending elsewhere) would read through them: measured with autovacuum
/// off, 420,000 dead rows for 4,000 live ones and batches taking 300 ms at
/// 1,000 events/s. A server's autovacuum, where it is on, visits the table
/// far too rarely for that churn. A small table, so a vacuum takes
/// milliseconds; `SKIP_LOCKED` lets instances not queue up behind each
/// other's.
const VACUUM_WINDOW_EVERY: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub(crate) struct PgDb {
    pool: PgPool,
    /// The window's vacuumer, stopped when the last clone of the store goes.
    _vacuumer: UpkeepTask,
}

impl PgDb {
    pub(crate) async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let opts = PgConnectOptions::from_str(url)
            .map_err(db("parsing the postgres url"))?
            .statement_cache_capacity(STATEMENT_CACHE);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts)
            .await
            .map_err(db("connecting to postgres"))?;
        // Before the first migration there is no table yet: the vacuum
        // fails until there is.
        let vacuumer = spawn_upkeep(
            pool.clone(),
            "VACUUM (ANALYZE, SKIP_LOCKED) inflight",
            VACUUM_WINDOW_EVERY,
        );
        Ok(Self {
            pool,
            _vacuumer: vacuumer,
        })
    }
}

impl Pools for PgDb {
    type D = Postgres;
    fn reader(&self) -> &PgPool {
        &self.pool
    }
    fn writer(&self) -> &PgPool {
        &self.pool
    }
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, Postgres>, sqlx::Error> {
        self.pool.begin().await
    }
    async fn after_erasure(&self) {
        // The old row versions stay in the tables' pages until a vacuum
        // removes them; do it now, off the request (it scans the indexes of
        // each table, which takes a while on a large event log).
        let pool = self.pool.clone();
        tokio::spawn(async move {
            let vacuum =
                "VACUUM clients, events, outbox, tasks, rejected, client_log, counter_members";
            if let Err(e) = sqlx::query(vacuum).execute(&pool).await {
                tracing::warn!(error = %e, "vacuum after an erasure failed");
            }
        });
    }
}

impl Dialect for Postgres {
    type Time = DateTime<Utc>;
    /// PostgreSQL allows 65535 bound parameters per statement; stay below.
    const MAX_PARAMS: usize = 60_000;
    const JSON: &'static str = "::json";
    const BYTE_ORDER: &'static str = " COLLATE \"C\"";
    const WIPE_DERIVED: &'static [&'static str] =
        &["TRUNCATE clients, counters, counter_members, exposures"];
    // SKIP LOCKED: senders of several instances take disjoint mails
    // without waiting on each other; a row locked here but left out by the
    // last limit is free again when the statement ends.
    const CLAIM_DUE: &'static str = claim_due_sql!(" FOR UPDATE SKIP LOCKED");
    const SEARCH: &'static str = search_sql!(
        "lower(client_id) LIKE $1 ESCAPE '\\' OR lower(email) LIKE $1 ESCAPE '\\' \
         OR lower(coalesce(first_name, '') || ' ' || coalesce(last_name, '')) LIKE $1 ESCAPE '\\'"
    );

    fn time(t: DateTime<Utc>) -> DateTime<Utc> {
        t
    }
    fn read_time(row: &Self::Row, i: usize) -> Result<DateTime<Utc>, StoreError> {
        row.try_get(i).map_err(super::dialect::corrupt_column)
    }
    fn read_time_opt(row: &Self::Row, i: usize) -> Result<Option<DateTime<Utc>>, StoreError> {
        row.try_get(i).map_err(super::dialect::corrupt_column)
    }
    fn read_json(row: &Self::Row, i: usize) -> Result<serde_json::Value, String> {
        row.try_get::<Option<serde_json::Value>, _>(i)
            .map(Option::unwrap_or_default)
            .map_err(|e| e.to_string())
    }
    fn search_pattern(q: &str) -> String {
        format!(
            "%{}%",
            q.to_lowercase()
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        )
    }
    fn push_in<'a>(q: &mut QueryBuilder<'a, Self>, ids: &'a [&'a str]) {
        q.push(" = ANY(").push_bind(ids).push(")");
    }
    fn id_chunks<T>(ids: &[T]) -> impl Iterator<Item = &[T]> {
        // One array parameter, however many ids: one statement.
        std::iter::once(ids)
    }
    fn migrator() -> &'static sqlx::migrate::Migrator {
        &MIGRATOR
    }
    async fn mark_sent<'c>(
        conn: &'c mut sqlx::PgConnection,
        sent: &'c [(&'c str, DateTime<Utc>, &'c str)],
    ) -> Result<(), sqlx::Error> {
        let keys: Vec<&str> = sent.iter().map(|s| s.0).collect();
        let ats: Vec<DateTime<Utc>> = sent.iter().map(|s| s.1).collect();
        let message_ids: Vec<&str> = sent.iter().map(|s| s.2).collect();
        sqlx::query(
            "UPDATE outbox SET status = 'sent', sent_at = v.at, message_id = v.message_id, \
             lease_until = NULL, last_error = NULL \
             FROM UNNEST($1::text[], $2::timestamptz[], $3::text[]) AS v(key, at, message_id) \
             WHERE outbox.key = v.key",
        )
        .bind(&keys)
        .bind(&ats)
        .bind(&message_ids)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
    async fn delete_rejected_naming<'c>(
        conn: &'c mut sqlx::PgConnection,
        needles: &'c [String],
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "DELETE FROM rejected WHERE EXISTS (SELECT 1 FROM unnest($1::text[]) AS n(s) \
             WHERE strpos(payload, n.s) > 0 OR strpos(reason, n.s) > 0)",
        )
        .bind(needles)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}
