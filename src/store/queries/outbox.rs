//! The outbox as the senders see it: due mails claimed with a lease, and
//! what became of each.

use crate::domain::log::LogEntry;
use crate::store::dialect::{Dialect, insert_log};
use crate::store::{AnyStore, Delivery, OutboxItem, OutboxRow, Pools, StoreError, db, shared};
use chrono::{DateTime, Utc};
use sqlx::Row;
use std::future::Future;

/// For the delivery loop (and the listings of the outbox).
pub trait Outbox {
    /// Reserves up to `limit` due mails for this sender until `lease_until`.
    fn claim_due(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<OutboxItem>, StoreError>> + Send;
    /// Records what became of claimed outbox items, all in one transaction.
    fn record_deliveries(
        &self,
        outcomes: &[Delivery],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Effects waiting to be delivered (pending or in flight).
    fn outbox_depth(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// The newest entries first.
    fn list_outbox(
        &self,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<OutboxRow>, StoreError>> + Send;
}

/// The claim of due mails, with `$lock` after each inner select (row locks
/// where senders of several processes claim at once). One statement: the
/// claim is atomic, so two senders never take the same mail; an expired
/// lease (a sender that died) is claimable again. Each kind is read apart,
/// in `outbox_due` order, and stops at the limit: with one `OR` SQLite
/// sorted every due mail at each claim, which under a backlog of thousands
/// took the writer up to 100 ms.
macro_rules! claim_due_sql {
    ($lock:literal) => {
        concat!(
            "UPDATE outbox SET status = 'sending', lease_until = $1, attempts = attempts + 1 \
             WHERE key IN (SELECT key FROM ( \
                 SELECT key, due_at FROM (SELECT key, due_at FROM outbox \
                     WHERE status = 'pending' AND due_at <= $2 \
                     ORDER BY due_at LIMIT $3",
            $lock,
            ") AS pending \
                 UNION ALL \
                 SELECT key, due_at FROM (SELECT key, due_at FROM outbox \
                     WHERE status = 'sending' AND lease_until <= $2 \
                     ORDER BY due_at LIMIT $3",
            $lock,
            ") AS expired) AS due \
                 ORDER BY due_at LIMIT $3) \
             RETURNING key, rule, client_id, cause, payload, attempts"
        )
    };
}
pub(crate) use claim_due_sql;

impl Outbox for AnyStore {
    async fn claim_due(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<OutboxItem>, StoreError> {
        shared!(self, |s, D| {
            let rows = sqlx::query(D::CLAIM_DUE)
                .bind(D::time(lease_until))
                .bind(D::time(now))
                .bind(i64::from(limit))
                .fetch_all(s.writer())
                .await
                .map_err(db("claiming due mails"))?;
            rows.into_iter()
                .map(|r| {
                    Ok(OutboxItem {
                        key: r.get(0),
                        rule: r.get(1),
                        client_id: r.get(2),
                        cause: r.get(3),
                        payload: D::read_json(&r, 4).map_err(|message| StoreError::Corrupt {
                            context: "outbox.payload",
                            message,
                        })?,
                        attempts: r.get::<i64, _>(5) as u32,
                    })
                })
                .collect()
        })
    }

    async fn record_deliveries(&self, outcomes: &[Delivery]) -> Result<(), StoreError> {
        if outcomes.is_empty() {
            return Ok(());
        }
        let mut log: Vec<&LogEntry> = Vec::new();
        // Mails sent, most of a round, in a few statements rather than one each.
        let mut sent = Vec::new();
        for outcome in outcomes {
            if let Delivery::Sent {
                key,
                message_id,
                at,
                log: entry,
            } = outcome
            {
                sent.push((key.as_str(), *at, message_id.as_str()));
                log.push(entry);
            }
        }
        shared!(self, |s, D| {
            let mut tx = s
                .begin_write()
                .await
                .map_err(db("starting to record deliveries"))?;
            if !sent.is_empty() {
                D::mark_sent(&mut tx, &sent)
                    .await
                    .map_err(db("recording sent mails"))?;
            }
            for outcome in outcomes {
                let q = match outcome {
                    Delivery::Sent { .. } => continue,
                    Delivery::Retry { key, due_at, error } => sqlx::query(
                        "UPDATE outbox SET status = 'pending', due_at = $1, lease_until = NULL, \
                         last_error = $2 WHERE key = $3",
                    )
                    .bind(D::time(*due_at))
                    .bind(error)
                    .bind(key),
                    Delivery::Failed {
                        key,
                        error,
                        log: entry,
                    } => {
                        log.push(entry);
                        sqlx::query(
                            "UPDATE outbox SET status = 'failed', lease_until = NULL, \
                             last_error = $1 WHERE key = $2",
                        )
                        .bind(error)
                        .bind(key)
                    }
                    // The attempt is given back: a deferral is not a failure.
                    Delivery::Deferred { key, due_at, why } => sqlx::query(
                        "UPDATE outbox SET status = 'pending', due_at = $1, lease_until = NULL, \
                         attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END, \
                         last_error = $2 WHERE key = $3",
                    )
                    .bind(D::time(*due_at))
                    .bind(why)
                    .bind(key),
                };
                q.execute(&mut *tx)
                    .await
                    .map_err(db("recording a delivery"))?;
            }
            insert_log!(D, tx, &log)
                .await
                .map_err(db("logging deliveries"))?;
            tx.commit().await.map_err(db("committing the deliveries"))
        })
    }

    async fn outbox_depth(&self) -> Result<u64, StoreError> {
        let n: i64 = shared!(self, |s, D| sqlx::query_scalar(
            "SELECT COUNT(*) FROM outbox WHERE status IN ('pending', 'sending')",
        )
        .fetch_one(s.reader())
        .await
        .map_err(db("measuring the outbox"))?);
        Ok(n as u64)
    }

    async fn list_outbox(&self, limit: u32) -> Result<Vec<OutboxRow>, StoreError> {
        shared!(self, |s, D| {
            let rows = sqlx::query(
                "SELECT key, kind, rule, client_id, cause, status, attempts, last_error, \
                 message_id FROM outbox ORDER BY created_at DESC, key LIMIT $1",
            )
            .bind(i64::from(limit))
            .fetch_all(s.reader())
            .await
            .map_err(db("listing the outbox"))?;
            Ok(rows
                .into_iter()
                .map(|r| OutboxRow {
                    key: r.get(0),
                    kind: r.get(1),
                    rule: r.get(2),
                    client_id: r.get(3),
                    cause: r.get(4),
                    status: r.get(5),
                    attempts: r.get::<i64, _>(6) as u32,
                    last_error: r.get(7),
                    message_id: r.get(8),
                })
                .collect())
        })
    }
}
