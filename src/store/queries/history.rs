//! The event log walked again in stream order, by replay and backtest, and
//! the derived history a replay rebuilds.

use crate::domain::event::Envelope;
use crate::domain::experiments::ExposureRow;
use crate::store::dialect::{Dialect, chunk_rows, json, statement_chunks, upsert_exposures};
use crate::store::{AnyStore, Derived, LogCursor, Pools, StoreError, db, shared};
use chrono::{DateTime, Utc};
use sqlx::{QueryBuilder, Row};
use std::collections::HashSet;
use std::future::Future;

/// For replay and backtest.
pub trait History {
    /// The shop's events (not nudge's own) in stream order, `(stream_seq,
    /// id)`, after `after`.
    fn events_page(
        &self,
        after: Option<&LogCursor>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<(Envelope, LogCursor)>, StoreError>> + Send;
    /// Every sweep that ran, in slot order.
    fn sweep_log(
        &self,
    ) -> impl Future<Output = Result<Vec<(String, DateTime<Utc>)>, StoreError>> + Send;
    /// Hashes ([`crate::store::erasure_hash`]) of the erased clients.
    fn erased(&self) -> impl Future<Output = Result<HashSet<String>, StoreError>> + Send;
    /// Replaces clients and shared counters in one transaction.
    fn replace_derived(
        &self,
        derived: &Derived,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    fn count_events(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

impl History for AnyStore {
    async fn events_page(
        &self,
        after: Option<&LogCursor>,
        limit: u32,
    ) -> Result<Vec<(Envelope, LogCursor)>, StoreError> {
        shared!(self, |s, D| {
            let mut q = QueryBuilder::<D>::new(
                "SELECT id, client_id, type, occurred_at, CAST(data AS TEXT), \
                 CAST(context AS TEXT), stream_seq FROM events WHERE stream_seq IS NOT NULL",
            );
            if let Some(c) = after {
                q.push(" AND (stream_seq, id) > (")
                    .push_bind(c.seq)
                    .push(", ")
                    .push_bind(c.id.clone())
                    .push(")");
            }
            q.push(" ORDER BY stream_seq, id LIMIT ")
                .push_bind(i64::from(limit));
            let rows = q
                .build()
                .fetch_all(s.reader())
                .await
                .map_err(db("reading the event log"))?;
            rows.into_iter()
                .map(|r| {
                    let corrupt = |message: String| StoreError::Corrupt {
                        context: "events",
                        message,
                    };
                    let occurred_at = D::read_time(&r, 3)?;
                    let map = |i: usize| {
                        serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(r.get(i))
                            .map_err(|e| corrupt(e.to_string()))
                    };
                    let env = Envelope::from_stored(
                        r.get(0),
                        r.get(2),
                        r.get(1),
                        occurred_at,
                        map(4)?,
                        map(5)?,
                    )
                    .map_err(|e| corrupt(e.to_string()))?;
                    let cursor = LogCursor {
                        seq: r.get(6),
                        id: env.id.as_str().to_string(),
                    };
                    Ok((env, cursor))
                })
                .collect()
        })
    }

    async fn sweep_log(&self) -> Result<Vec<(String, DateTime<Utc>)>, StoreError> {
        shared!(self, |s, D| {
            let rows = sqlx::query("SELECT rule, slot FROM sweep_log ORDER BY slot, rule")
                .fetch_all(s.reader())
                .await
                .map_err(db("reading the sweep log"))?;
            rows.into_iter()
                .map(|r| Ok((r.get(0), D::read_time(&r, 1)?)))
                .collect()
        })
    }

    async fn erased(&self) -> Result<HashSet<String>, StoreError> {
        let rows: Vec<String> = shared!(self, |s, D| sqlx::query_scalar(
            "SELECT client_id FROM erasures"
        )
        .fetch_all(s.reader())
        .await
        .map_err(db("reading erasures"))?);
        Ok(rows.into_iter().collect())
    }

    async fn replace_derived(&self, derived: &Derived) -> Result<(), StoreError> {
        shared!(self, |s, D| {
            let mut tx = s
                .begin_write()
                .await
                .map_err(db("starting the replay transaction"))?;
            for wipe in D::WIPE_DERIVED {
                sqlx::query(wipe)
                    .execute(&mut *tx)
                    .await
                    .map_err(db("wiping derived history"))?;
            }
            for chunk in statement_chunks(&derived.clients, chunk_rows::<D>(14)) {
                let mut q = QueryBuilder::<D>::new(
                    "INSERT INTO clients (client_id, version, email, first_name, last_name, \
                     acquisition_channel, marketing_consent, unsubscribed, locale, timezone, \
                     first_seen, last_seen, next_due, state) ",
                );
                q.push_values(chunk, |mut b, c| {
                    let p = &c.profile;
                    b.push_bind(c.client_id.as_str().to_string())
                        .push_bind(1i64)
                        .push_bind(p.email.clone())
                        .push_bind(p.first_name.clone())
                        .push_bind(p.last_name.clone())
                        .push_bind(p.acquisition_channel.clone())
                        .push_bind(p.marketing_consent)
                        .push_bind(p.unsubscribed)
                        .push_bind(p.locale.clone())
                        .push_bind(p.timezone.clone())
                        .push_bind(p.first_seen.map(D::time))
                        .push_bind(p.last_seen.map(D::time))
                        .push_bind(c.next_due().map(D::time))
                        .push_bind(json(c))
                        .push_unseparated(D::JSON);
                });
                q.build()
                    .execute(&mut *tx)
                    .await
                    .map_err(db("writing replayed clients"))?;
            }
            for chunk in statement_chunks(&derived.counters, chunk_rows::<D>(4)) {
                let mut q =
                    QueryBuilder::<D>::new("INSERT INTO counters (name, period, value, version) ");
                q.push_values(chunk, |mut b, (k, v)| {
                    b.push_bind(k.name.clone())
                        .push_bind(k.period.clone())
                        .push_bind(*v)
                        .push_bind(1i64);
                });
                q.build()
                    .execute(&mut *tx)
                    .await
                    .map_err(db("writing replayed counters"))?;
            }
            for chunk in statement_chunks(&derived.members, chunk_rows::<D>(3)) {
                let mut q =
                    QueryBuilder::<D>::new("INSERT INTO counter_members (name, period, member) ");
                q.push_values(chunk, |mut b, (k, m)| {
                    b.push_bind(k.name.clone())
                        .push_bind(k.period.clone())
                        .push_bind(m.clone());
                });
                q.build()
                    .execute(&mut *tx)
                    .await
                    .map_err(db("writing replayed counter members"))?;
            }
            let exposures: Vec<ExposureRow> = derived
                .clients
                .iter()
                .flat_map(|c| {
                    c.exposures.rows.iter().map(|e| ExposureRow {
                        client_id: c.client_id.as_str().to_string(),
                        exposure: e.clone(),
                    })
                })
                .collect();
            upsert_exposures!(D, tx, &exposures)
                .await
                .map_err(db("writing replayed exposures"))?;
            tx.commit().await.map_err(db("committing the replay"))
        })
    }

    async fn count_events(&self) -> Result<u64, StoreError> {
        let n: i64 = shared!(self, |s, D| sqlx::query_scalar(
            "SELECT COUNT(*) FROM events"
        )
        .fetch_one(s.reader())
        .await
        .map_err(db("counting events"))?);
        Ok(n as u64)
    }
}
