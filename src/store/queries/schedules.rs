//! Timers coming due and scheduled sweeps, as the scheduler finds and
//! claims them.

use crate::domain::event::ClientId;
use crate::store::dialect::{Dialect, stored_client_id};
use crate::store::{AnyStore, Pools, StoreError, SweepClaim, db, shared};
use chrono::{DateTime, Utc};
use sqlx::Row;
use std::future::Future;

/// For the scheduler (and the backtest, which claims sweeps as live does).
pub trait Schedules {
    /// Clients with a timer due by `now`, soonest first.
    fn due_clients(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<ClientId>, StoreError>> + Send;
    /// Client ids in id order after `after`: the pages of a sweep.
    fn client_page(
        &self,
        after: Option<&ClientId>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<ClientId>, StoreError>> + Send;
    /// Claims the sweep of `rule` at `slot` until `lease_until`, unless that
    /// slot (or a later one) is done or another instance holds a live lease.
    fn claim_sweep(
        &self,
        rule: &str,
        slot: DateTime<Utc>,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> impl Future<Output = Result<Option<SweepClaim>, StoreError>> + Send;
}

impl Schedules for AnyStore {
    async fn due_clients(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<ClientId>, StoreError> {
        let ids: Vec<String> = shared!(self, |s, D| sqlx::query_scalar(
            "SELECT client_id FROM clients WHERE next_due IS NOT NULL AND next_due <= $1 \
             ORDER BY next_due LIMIT $2",
        )
        .bind(D::time(now))
        .bind(i64::from(limit))
        .fetch_all(s.reader())
        .await
        .map_err(db("finding due timers"))?);
        ids.into_iter().map(stored_client_id).collect()
    }

    async fn client_page(
        &self,
        after: Option<&ClientId>,
        limit: u32,
    ) -> Result<Vec<ClientId>, StoreError> {
        let ids: Vec<String> = shared!(self, |s, D| sqlx::query_scalar(
            "SELECT client_id FROM clients WHERE client_id > $1 ORDER BY client_id LIMIT $2",
        )
        .bind(after.map_or("", |c| c.as_str()))
        .bind(i64::from(limit))
        .fetch_all(s.reader())
        .await
        .map_err(db("paging clients"))?);
        ids.into_iter().map(stored_client_id).collect()
    }

    async fn claim_sweep(
        &self,
        rule: &str,
        slot: DateTime<Utc>,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> Result<Option<SweepClaim>, StoreError> {
        shared!(self, |s, D| {
            // One statement: a new slot replaces a finished (or abandoned)
            // one; the same unfinished slot is taken over, with its cursor,
            // once its lease ran out. On PostgreSQL the row lock makes two
            // instances' claims queue, and the loser's WHERE fails on the
            // winner's row; on SQLite there is one writer.
            let row = sqlx::query(
                "INSERT INTO schedules (rule, slot, cursor, done, lease_until) \
                 VALUES ($1, $2, NULL, FALSE, $3) \
                 ON CONFLICT (rule) DO UPDATE SET \
                     cursor = CASE WHEN schedules.slot = excluded.slot THEN schedules.cursor ELSE NULL END, \
                     slot = excluded.slot, done = FALSE, lease_until = excluded.lease_until \
                 WHERE (schedules.slot < excluded.slot AND (schedules.done OR schedules.lease_until <= $4)) \
                    OR (schedules.slot = excluded.slot AND NOT schedules.done AND schedules.lease_until <= $4) \
                 RETURNING slot, cursor",
            )
            .bind(rule)
            .bind(D::time(slot))
            .bind(D::time(lease_until))
            .bind(D::time(now))
            .fetch_optional(s.writer())
            .await
            .map_err(db("claiming a sweep"))?;
            let Some(row) = row else {
                return Ok(None);
            };
            sqlx::query(
                "INSERT INTO sweep_log (rule, slot) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            )
            .bind(rule)
            .bind(D::time(slot))
            .execute(s.writer())
            .await
            .map_err(db("logging a sweep"))?;
            Ok(Some(SweepClaim {
                slot: D::read_time(&row, 0)?,
                cursor: row
                    .get::<Option<String>, _>(1)
                    .map(stored_client_id)
                    .transpose()?,
            }))
        })
    }
}
