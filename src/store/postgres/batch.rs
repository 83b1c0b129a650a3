//! PostgreSQL's batch write path: one transaction whose writes are
//! compare-and-swaps (an event id not yet stored, a client still at the
//! version read, a counter still at its version), rows written in key order
//! so that two batches lock in the same order; a lost race, reported as a
//! deadlock or serialization failure or seen in the rows affected, is
//! [`CommitOutcome::Conflict`] and the pipeline decides again.

use super::PgDb;
use crate::domain::effects::EffectKind;
use crate::domain::history::ClientState;
use crate::domain::log::LogEntry;
use crate::store::dialect::{chunk_rows, insert_log, json, statement_chunks, upsert_exposures};
use crate::store::{BatchWrite, CommitOutcome, StoreError};
use chrono::Utc;
use sqlx::{Postgres, QueryBuilder};

/// Commits a batch; a lost race with another instance is a conflict.
pub(crate) async fn commit(store: &PgDb, batch: &BatchWrite) -> Result<CommitOutcome, StoreError> {
    match try_commit(store, batch).await {
        Ok(outcome) => Ok(outcome),
        Err(e) if is_race(&e) => {
            tracing::debug!(error = %e, "batch lost a race with another instance");
            Ok(CommitOutcome::Conflict)
        }
        Err(e) => Err(StoreError::Db {
            context: "committing a batch",
            source: e,
        }),
    }
}

/// A lost race between instances that PostgreSQL reports as an error:
/// deadlock detected or serialization failure. Retried as a conflict.
fn is_race(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if matches!(d.code().as_deref(), Some("40P01" | "40001")))
}

async fn try_commit(store: &PgDb, batch: &BatchWrite) -> Result<CommitOutcome, sqlx::Error> {
    let mut tx = store.pool.begin().await?;

    let mut events: Vec<_> = batch.events.iter().collect();
    events.sort_by(|a, b| a.envelope.id.as_str().cmp(b.envelope.id.as_str()));
    for chunk in statement_chunks(&events, chunk_rows::<Postgres>(11)) {
        let mut q = QueryBuilder::<Postgres>::new(
            "INSERT INTO events (id, client_id, type, occurred_at, year, month, day, \
             data, context, received_at, stream_seq) ",
        );
        q.push_values(chunk, |mut b, e| {
            let env = &e.envelope;
            let (y, m, d) = env.date_parts();
            b.push_bind(env.id.as_str().to_string())
                .push_bind(env.client_id.as_str().to_string())
                .push_bind(env.event_type.as_str().to_string())
                .push_bind(env.occurred_at)
                .push_bind(y)
                .push_bind(m as i32)
                .push_bind(d as i32)
                .push_bind(json(&env.data))
                .push_unseparated("::jsonb")
                .push_bind(json(&env.context))
                .push_unseparated("::jsonb")
                .push_bind(e.received_at)
                .push_bind(e.stream_seq.map(|s| s as i64));
        });
        q.push(" ON CONFLICT (id) DO NOTHING");
        let done = q.build().execute(&mut *tx).await?;
        if done.rows_affected() != chunk.len() as u64 {
            return Ok(CommitOutcome::Conflict);
        }
    }

    let mut clients: Vec<&ClientState> = batch.clients.iter().map(|c| &**c).collect();
    clients.sort_by(|a, b| a.client_id.cmp(&b.client_id));
    for chunk in statement_chunks(&clients, chunk_rows::<Postgres>(14)) {
        let mut q = QueryBuilder::<Postgres>::new(
            "INSERT INTO clients (client_id, version, email, first_name, last_name, \
             acquisition_channel, marketing_consent, unsubscribed, locale, timezone, \
             first_seen, last_seen, next_due, state) ",
        );
        q.push_values(chunk, |mut b, c| {
            let p = &c.profile;
            b.push_bind(c.client_id.as_str().to_string())
                .push_bind(c.version + 1)
                .push_bind(p.email.clone())
                .push_bind(p.first_name.clone())
                .push_bind(p.last_name.clone())
                .push_bind(p.acquisition_channel.clone())
                .push_bind(p.marketing_consent)
                .push_bind(p.unsubscribed)
                .push_bind(p.locale.clone())
                .push_bind(p.timezone.clone())
                .push_bind(p.first_seen)
                .push_bind(p.last_seen)
                .push_bind(c.next_due())
                .push_bind(json(*c))
                .push_unseparated("::json");
        });
        // The WHERE makes this a compare-and-swap on the version loaded;
        // under READ COMMITTED a concurrent writer's row is re-checked
        // after its commit, so the loser updates nothing.
        q.push(
            " ON CONFLICT (client_id) DO UPDATE SET version = excluded.version, \
             email = excluded.email, first_name = excluded.first_name, \
             last_name = excluded.last_name, acquisition_channel = excluded.acquisition_channel, \
             marketing_consent = excluded.marketing_consent, unsubscribed = excluded.unsubscribed, \
             locale = excluded.locale, timezone = excluded.timezone, \
             first_seen = excluded.first_seen, last_seen = excluded.last_seen, \
             next_due = excluded.next_due, state = excluded.state \
             WHERE clients.version = excluded.version - 1",
        );
        let done = q.build().execute(&mut *tx).await?;
        if done.rows_affected() != chunk.len() as u64 {
            return Ok(CommitOutcome::Conflict);
        }
    }

    let now = Utc::now();
    let mut effects: Vec<_> = batch.effects.iter().collect();
    effects.sort_by(|a, b| a.key.cmp(&b.key));
    for chunk in statement_chunks(&effects, chunk_rows::<Postgres>(9)) {
        let mut q = QueryBuilder::<Postgres>::new(
            "INSERT INTO outbox (key, kind, rule, client_id, cause, payload, status, \
             due_at, created_at) ",
        );
        q.push_values(chunk, |mut b, e| {
            b.push_bind(e.key.clone())
                .push_bind(e.kind.name())
                .push_bind(e.rule.clone())
                .push_bind(e.client_id.as_str().to_string())
                .push_bind(e.cause.clone())
                .push_bind(json(&e.kind))
                .push_unseparated("::jsonb")
                .push_bind("pending")
                .push_bind(now)
                .push_bind(now);
        });
        // A key already present is the same effect decided before: keep the first.
        q.push(" ON CONFLICT (key) DO NOTHING");
        q.build().execute(&mut *tx).await?;
    }

    let mut counters: Vec<_> = batch.counters.iter().collect();
    counters.sort_by(|a, b| (&a.key.name, &a.key.period).cmp(&(&b.key.name, &b.key.period)));
    for c in counters {
        let done = if c.version == 0 {
            sqlx::query(
                "INSERT INTO counters (name, period, value, version) VALUES ($1, $2, $3, 1) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(&c.key.name)
            .bind(&c.key.period)
            .bind(c.value)
            .execute(&mut *tx)
            .await?
        } else {
            sqlx::query(
                "UPDATE counters SET value = $1, version = version + 1 \
                 WHERE name = $2 AND period = $3 AND version = $4",
            )
            .bind(c.value)
            .bind(&c.key.name)
            .bind(&c.key.period)
            .bind(c.version)
            .execute(&mut *tx)
            .await?
        };
        if done.rows_affected() != 1 {
            return Ok(CommitOutcome::Conflict);
        }
    }
    let mut members: Vec<_> = batch.members.iter().collect();
    members.sort();
    for chunk in statement_chunks(&members, chunk_rows::<Postgres>(3)) {
        let mut q =
            QueryBuilder::<Postgres>::new("INSERT INTO counter_members (name, period, member) ");
        q.push_values(chunk, |mut b, (k, m)| {
            b.push_bind(k.name.clone())
                .push_bind(k.period.clone())
                .push_bind(m.clone());
        });
        q.push(" ON CONFLICT DO NOTHING");
        let done = q.build().execute(&mut *tx).await?;
        if done.rows_affected() != chunk.len() as u64 {
            return Ok(CommitOutcome::Conflict);
        }
    }

    let tasks: Vec<_> = effects
        .iter()
        .filter_map(|e| match &e.kind {
            EffectKind::Task {
                team, title, data, ..
            } => Some((*e, team, title, data)),
            _ => None,
        })
        .collect();
    for chunk in statement_chunks(&tasks, chunk_rows::<Postgres>(10)) {
        let mut q = QueryBuilder::<Postgres>::new(
            "INSERT INTO tasks (id, team, title, client_id, rule, cause, data, status, at, \
             created_at) ",
        );
        q.push_values(chunk, |mut b, (e, team, title, data)| {
            b.push_bind(e.key.clone())
                .push_bind((*team).clone())
                .push_bind((*title).clone())
                .push_bind(e.client_id.as_str().to_string())
                .push_bind(e.rule.clone())
                .push_bind(e.cause.clone())
                .push_bind(json(data))
                .push_unseparated("::jsonb")
                .push_bind("open")
                .push_bind(e.at)
                .push_bind(now);
        });
        q.push(" ON CONFLICT (id) DO NOTHING");
        q.build().execute(&mut *tx).await?;
    }

    let log: Vec<&LogEntry> = batch.log.iter().collect();
    upsert_exposures!(Postgres, tx, &batch.exposures).await?;
    insert_log!(Postgres, tx, &log).await?;

    for chunk in statement_chunks(&batch.rejected, chunk_rows::<Postgres>(5)) {
        let mut q = QueryBuilder::<Postgres>::new(
            "INSERT INTO rejected (received_at, subject, stream_seq, reason, payload) ",
        );
        q.push_values(chunk, |mut b, r| {
            b.push_bind(r.received_at)
                .push_bind(r.subject.clone())
                .push_bind(r.stream_seq.map(|s| s as i64))
                .push_bind(r.reason.clone())
                .push_bind(r.payload.clone());
        });
        q.push(" ON CONFLICT DO NOTHING");
        q.build().execute(&mut *tx).await?;
    }

    if !batch.settled.is_empty() {
        let seqs: Vec<i64> = batch.settled.iter().map(|s| *s as i64).collect();
        sqlx::query("UPDATE inflight SET done = TRUE WHERE seq = ANY($1)")
            .bind(&seqs)
            .execute(&mut *tx)
            .await?;
    }

    if let Some(floor) = batch.window_floor {
        sqlx::query("DELETE FROM inflight WHERE seq <= $1")
            .bind(floor as i64)
            .execute(&mut *tx)
            .await?;
    }

    if let Some(sw) = &batch.sweep {
        sqlx::query("UPDATE schedules SET cursor = $1, done = $2 WHERE rule = $3 AND slot = $4")
            .bind(sw.cursor.as_ref().map(|c| c.as_str().to_string()))
            .bind(sw.done)
            .bind(&sw.rule)
            .bind(sw.slot)
            .execute(&mut *tx)
            .await?;
    }

    tx.commit().await?;
    Ok(CommitOutcome::Committed)
}
