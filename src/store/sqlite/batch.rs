//! SQLite's batch write path: one `IMMEDIATE` transaction on the writer
//! connection, multi-row `OR IGNORE` statements whose rows affected tell a
//! conflict, and client rows updated so that unchanged indexed columns are
//! not rewritten.

use super::SqliteDb;
use crate::domain::effects::EffectKind;
use crate::domain::history::{ClientState, Profile};
use crate::domain::log::LogEntry;
use crate::store::dialect::{chunk_rows, insert_log, json, statement_chunks, ts, upsert_exposures};
use crate::store::{BatchWrite, CommitOutcome, StoreError, db};
use chrono::Utc;
use sqlx::{QueryBuilder, Sqlite};

/// Commits a batch on the writer connection, then settles its messages in
/// the consumer's window.
pub(crate) async fn commit(
    store: &SqliteDb,
    batch: &BatchWrite,
) -> Result<CommitOutcome, StoreError> {
    let mut conn = store
        .writer
        .acquire()
        .await
        .map_err(db("starting the batch transaction"))?;
    let outcome = write_batch(&mut conn, batch).await;
    if let Ok(CommitOutcome::Committed) = outcome {
        store.window.settle(&batch.settled, batch.window_floor);
    }
    if outcome.is_err() {
        // After some failures (a full disk, an I/O error) SQLite has
        // already rolled the transaction back; sqlx's ROLLBACK then
        // fails and it would count the transaction open for good, so
        // that every later batch failed to begin. A new connection
        // starts clean.
        conn.close_on_drop();
    }
    outcome
}

/// The profile columns both writes of a client row set, from `first_name`
/// to `last_seen`, in the order of the tables' columns.
fn bind_profile(b: &mut sqlx::query_builder::Separated<'_, '_, Sqlite, &'static str>, p: &Profile) {
    b.push_bind(p.first_name.clone())
        .push_bind(p.last_name.clone())
        .push_bind(p.acquisition_channel.clone())
        .push_bind(p.marketing_consent)
        .push_bind(p.unsubscribed)
        .push_bind(p.locale.clone())
        .push_bind(p.timezone.clone())
        .push_bind(p.first_seen.map(ts))
        .push_bind(p.last_seen.map(ts));
}

/// Runs one chunk's statement of a batch; false, logged with the reason a
/// row was left out, unless it wrote every one of `rows` (the batch then
/// conflicts with another writer and is decided again).
async fn write_every_row(
    q: &mut QueryBuilder<'_, Sqlite>,
    conn: &mut sqlx::SqliteConnection,
    rows: usize,
    context: &'static str,
    conflict: &str,
) -> Result<bool, StoreError> {
    let done = q.build().execute(&mut *conn).await.map_err(db(context))?;
    let all = done.rows_affected() == rows as u64;
    if !all {
        tracing::debug!("batch conflict: {conflict}");
    }
    Ok(all)
}

/// Writes client states as a compare-and-swap on the version each was
/// loaded at; false if any of them changed meanwhile (or a new one was
/// created by another writer). Existing clients get an `UPDATE` that leaves
/// the indexed `email` and `next_due` alone, and each of those is set in a
/// second statement only where it changed: setting an indexed column
/// rewrites its index entry even to the same value, and most writes change
/// neither.
async fn write_clients(
    tx: &mut sqlx::SqliteConnection,
    clients: &[std::sync::Arc<ClientState>],
) -> Result<bool, StoreError> {
    let (new, known): (Vec<&ClientState>, Vec<&ClientState>) =
        clients.iter().map(|c| &**c).partition(|c| c.version == 0);
    for chunk in statement_chunks(&new, chunk_rows::<Sqlite>(14)) {
        let mut q = QueryBuilder::<Sqlite>::new(
            "INSERT OR IGNORE INTO clients (client_id, version, email, first_name, last_name, \
             acquisition_channel, marketing_consent, unsubscribed, locale, timezone, \
             first_seen, last_seen, next_due, state) ",
        );
        q.push_values(chunk, |mut b, c| {
            let p = &c.profile;
            b.push_bind(c.client_id.as_str().to_string())
                .push_bind(c.version + 1)
                .push_bind(p.email.clone());
            bind_profile(&mut b, p);
            b.push_bind(c.next_due().map(ts)).push_bind(json(*c));
        });
        if !write_every_row(
            &mut q,
            tx,
            chunk.len(),
            "writing new clients",
            "a new client was created by another writer",
        )
        .await?
        {
            return Ok(false);
        }
    }
    for chunk in statement_chunks(&known, chunk_rows::<Sqlite>(12)) {
        let mut q = QueryBuilder::<Sqlite>::new(
            "UPDATE OR IGNORE clients SET version = v.column2, first_name = v.column3, \
             last_name = v.column4, acquisition_channel = v.column5, \
             marketing_consent = v.column6, unsubscribed = v.column7, locale = v.column8, \
             timezone = v.column9, first_seen = v.column10, last_seen = v.column11, \
             state = v.column12 FROM (",
        );
        q.push_values(chunk, |mut b, c| {
            let p = &c.profile;
            b.push_bind(c.client_id.as_str().to_string())
                .push_bind(c.version + 1);
            bind_profile(&mut b, p);
            b.push_bind(json(*c));
        });
        // The version condition makes this a compare-and-swap.
        q.push(") AS v WHERE clients.client_id = v.column1 AND clients.version = v.column2 - 1");
        if !write_every_row(
            &mut q,
            tx,
            chunk.len(),
            "writing client states",
            "a client's version changed",
        )
        .await?
        {
            return Ok(false);
        }
    }
    for (column, value) in [
        (
            "email",
            (|c: &ClientState| c.profile.email.clone()) as fn(&ClientState) -> Option<String>,
        ),
        ("next_due", |c: &ClientState| c.next_due().map(ts)),
    ] {
        for chunk in statement_chunks(&known, chunk_rows::<Sqlite>(2)) {
            let mut q = QueryBuilder::<Sqlite>::new(format!(
                "UPDATE OR IGNORE clients SET {column} = v.column2 FROM ("
            ));
            q.push_values(chunk, |mut b, c| {
                b.push_bind(c.client_id.as_str().to_string())
                    .push_bind(value(c));
            });
            q.push(format!(
                ") AS v WHERE clients.client_id = v.column1 AND clients.{column} IS NOT v.column2"
            ));
            q.build()
                .execute(&mut *tx)
                .await
                .map_err(db("writing client states"))?;
        }
    }
    Ok(true)
}

/// Writes a batch in one transaction on the writer connection.
async fn write_batch(
    conn: &mut sqlx::SqliteConnection,
    batch: &BatchWrite,
) -> Result<CommitOutcome, StoreError> {
    let mut tx = sqlx::Connection::begin_with(conn, "BEGIN IMMEDIATE")
        .await
        .map_err(db("starting the batch transaction"))?;

    // The batch's multi-row writes are `OR IGNORE`: a statement that
    // could fail halfway makes SQLite copy every page it touches into a
    // statement journal first (6 % of the writer's time). A row left
    // out shows in the rows affected, which is how conflicts are told.
    for chunk in statement_chunks(&batch.events, chunk_rows::<Sqlite>(11)) {
        let mut q = QueryBuilder::<Sqlite>::new(
            "INSERT OR IGNORE INTO events (id, client_id, type, occurred_at, year, month, day, \
             data, context, received_at, stream_seq) ",
        );
        q.push_values(chunk, |mut b, e| {
            let env = &e.envelope;
            let (y, m, d) = env.date_parts();
            b.push_bind(env.id.as_str().to_string())
                .push_bind(env.client_id.as_str().to_string())
                .push_bind(env.event_type.as_str().to_string())
                .push_bind(ts(env.occurred_at))
                .push_bind(y)
                .push_bind(m)
                .push_bind(d)
                .push_bind(json(&env.data))
                .push_bind(json(&env.context))
                .push_bind(ts(e.received_at))
                .push_bind(e.stream_seq.map(|s| s as i64));
        });
        if !write_every_row(
            &mut q,
            &mut tx,
            chunk.len(),
            "writing events",
            "an event id is known already",
        )
        .await?
        {
            return Ok(CommitOutcome::Conflict);
        }
    }

    if !write_clients(&mut tx, &batch.clients).await? {
        return Ok(CommitOutcome::Conflict);
    }

    for chunk in statement_chunks(&batch.effects, chunk_rows::<Sqlite>(9)) {
        let mut q = QueryBuilder::<Sqlite>::new(
            "INSERT OR IGNORE INTO outbox (key, kind, rule, client_id, cause, payload, status, \
             due_at, created_at) ",
        );
        let now = ts(Utc::now());
        q.push_values(chunk, |mut b, e| {
            b.push_bind(e.key.clone())
                .push_bind(e.kind.name())
                .push_bind(e.rule.clone())
                .push_bind(e.client_id.as_str().to_string())
                .push_bind(e.cause.clone())
                .push_bind(json(&e.kind))
                .push_bind("pending")
                .push_bind(now.clone())
                .push_bind(now.clone());
        });
        // A key already present is the same effect decided before: keep the first.
        q.build()
            .execute(&mut *tx)
            .await
            .map_err(db("writing the outbox"))?;
    }

    // Shared counters: compare-and-swap on the version read.
    for c in &batch.counters {
        let done = if c.version == 0 {
            sqlx::query(
                "INSERT INTO counters (name, period, value, version) VALUES (?, ?, ?, 1) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(&c.key.name)
            .bind(&c.key.period)
            .bind(c.value)
            .execute(&mut *tx)
            .await
        } else {
            sqlx::query(
                "UPDATE counters SET value = ?, version = version + 1 \
                 WHERE name = ? AND period = ? AND version = ?",
            )
            .bind(c.value)
            .bind(&c.key.name)
            .bind(&c.key.period)
            .bind(c.version)
            .execute(&mut *tx)
            .await
        }
        .map_err(db("writing counters"))?;
        if done.rows_affected() != 1 {
            tracing::debug!("batch conflict: a shared counter's version changed");
            return Ok(CommitOutcome::Conflict);
        }
    }
    for chunk in statement_chunks(&batch.members, chunk_rows::<Sqlite>(3)) {
        let mut q =
            QueryBuilder::<Sqlite>::new("INSERT INTO counter_members (name, period, member) ");
        q.push_values(chunk, |mut b, (k, m)| {
            b.push_bind(k.name.clone())
                .push_bind(k.period.clone())
                .push_bind(m.clone());
        });
        q.push(" ON CONFLICT DO NOTHING");
        if !write_every_row(
            &mut q,
            &mut tx,
            chunk.len(),
            "writing counter members",
            "a distinct counter's member was added by another writer",
        )
        .await?
        {
            return Ok(CommitOutcome::Conflict);
        }
    }

    let tasks: Vec<_> = batch
        .effects
        .iter()
        .filter_map(|e| match &e.kind {
            EffectKind::Task {
                team, title, data, ..
            } => Some((e, team, title, data)),
            _ => None,
        })
        .collect();
    for chunk in statement_chunks(&tasks, chunk_rows::<Sqlite>(10)) {
        let mut q = QueryBuilder::<Sqlite>::new(
            "INSERT INTO tasks (id, team, title, client_id, rule, cause, data, status, at, \
             created_at) ",
        );
        let now = ts(Utc::now());
        q.push_values(chunk, |mut b, (e, team, title, data)| {
            b.push_bind(e.key.clone())
                .push_bind((*team).clone())
                .push_bind((*title).clone())
                .push_bind(e.client_id.as_str().to_string())
                .push_bind(e.rule.clone())
                .push_bind(e.cause.clone())
                .push_bind(json(data))
                .push_bind("open")
                .push_bind(ts(e.at))
                .push_bind(now.clone());
        });
        q.push(" ON CONFLICT(id) DO NOTHING");
        q.build()
            .execute(&mut *tx)
            .await
            .map_err(db("writing tasks"))?;
    }

    let log: Vec<&LogEntry> = batch.log.iter().collect();
    upsert_exposures!(Sqlite, tx, &batch.exposures)
        .await
        .map_err(db("writing exposures"))?;
    insert_log!(Sqlite, tx, &log)
        .await
        .map_err(db("writing the process log"))?;

    for chunk in statement_chunks(&batch.rejected, chunk_rows::<Sqlite>(5)) {
        let mut q = QueryBuilder::<Sqlite>::new(
            "INSERT INTO rejected (received_at, subject, stream_seq, reason, payload) ",
        );
        q.push_values(chunk, |mut b, r| {
            b.push_bind(ts(r.received_at))
                .push_bind(r.subject.clone())
                .push_bind(r.stream_seq.map(|s| s as i64))
                .push_bind(r.reason.clone())
                .push_bind(r.payload.clone());
        });
        q.push(" ON CONFLICT DO NOTHING");
        q.build()
            .execute(&mut *tx)
            .await
            .map_err(db("writing rejected events"))?;
    }

    if let Some(sw) = &batch.sweep {
        sqlx::query("UPDATE schedules SET cursor = ?, done = ? WHERE rule = ? AND slot = ?")
            .bind(sw.cursor.as_ref().map(|c| c.as_str().to_string()))
            .bind(sw.done)
            .bind(&sw.rule)
            .bind(ts(sw.slot))
            .execute(&mut *tx)
            .await
            .map_err(db("recording sweep progress"))?;
    }

    tx.commit().await.map_err(db("committing the batch"))?;
    Ok(CommitOutcome::Committed)
}
