//! The numbers texts went to, so that a reply (STOP) that names only the
//! number reaches the client it was sent for; and effects the sender queues
//! itself (nudge's own happenings forwarded to webhooks).

use crate::domain::effects::Effect;
use crate::domain::phone::Phone;
use crate::store::dialect::{Dialect, json};
use crate::store::{AnyStore, Pools, StoreError, db, shared};
use chrono::Utc;
use std::future::Future;

/// For the text sender and the inbound STOP endpoint.
pub trait Texts {
    /// Notes that `phone` is texted for `client_id` (the latest one wins).
    fn note_text_number(
        &self,
        phone: &Phone,
        client_id: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// The client last texted at `phone`.
    fn client_of_number(
        &self,
        phone: &Phone,
    ) -> impl Future<Output = Result<Option<String>, StoreError>> + Send;
    /// Writes effects to the outbox, each once: a key already there is kept.
    fn queue_effects(
        &self,
        effects: &[Effect],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

impl Texts for AnyStore {
    async fn note_text_number(&self, phone: &Phone, client_id: &str) -> Result<(), StoreError> {
        shared!(self, |s, D| {
            sqlx::query(
                "INSERT INTO text_numbers (phone, client_id) VALUES ($1, $2) \
                 ON CONFLICT (phone) DO UPDATE SET client_id = excluded.client_id",
            )
            .bind(phone.as_str())
            .bind(client_id)
            .execute(s.writer())
            .await
            .map_err(db("noting a texted number"))?;
            Ok(())
        })
    }

    async fn client_of_number(&self, phone: &Phone) -> Result<Option<String>, StoreError> {
        shared!(self, |s, D| {
            sqlx::query_scalar("SELECT client_id FROM text_numbers WHERE phone = $1")
                .bind(phone.as_str())
                .fetch_optional(s.reader())
                .await
                .map_err(db("finding a texted number"))
        })
    }

    async fn queue_effects(&self, effects: &[Effect]) -> Result<(), StoreError> {
        if effects.is_empty() {
            return Ok(());
        }
        shared!(self, |s, D| {
            let sql = format!(
                "INSERT INTO outbox (key, kind, rule, client_id, cause, payload, status, \
                 due_at, created_at) VALUES ($1, $2, $3, $4, $5, $6{}, 'pending', $7, $7) \
                 ON CONFLICT (key) DO NOTHING",
                D::JSON
            );
            let now = Utc::now();
            let mut tx = s
                .begin_write()
                .await
                .map_err(db("starting to queue effects"))?;
            for e in effects {
                sqlx::query(&sql)
                    .bind(&e.key)
                    .bind(e.kind.name())
                    .bind(&e.rule)
                    .bind(e.client_id.as_str())
                    .bind(&e.cause)
                    .bind(json(&e.kind))
                    .bind(D::time(now))
                    .execute(&mut *tx)
                    .await
                    .map_err(db("queueing an effect"))?;
            }
            tx.commit().await.map_err(db("committing queued effects"))
        })
    }
}
