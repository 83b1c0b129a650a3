//! The scale-out backend: PostgreSQL, shared by several nudge instances.
//!
//! Same behaviour as the SQLite backend (the test suite runs on both); what
//! differs is how writers that run at the same time are kept apart:
//! - a batch is one transaction whose writes are compare-and-swaps (an event
//!   id not yet stored, a client still at the version read, a counter still
//!   at its version); a lost race comes back as [`CommitOutcome::Conflict`]
//!   and the pipeline decides again on fresh state;
//! - rows are written in key order, so two batches lock in the same order,
//!   and a deadlock or serialization failure that happens anyway is a
//!   conflict to retry, not an error;
//! - mails are claimed with `FOR UPDATE SKIP LOCKED`, sweeps with a lease.

use super::{
    AuditEntry, BatchWrite, ClientSummary, CommitOutcome, Delivery, Derived, EventRow, LogCursor,
    LogEntry, MailRow, OutboxItem, OutboxRow, Rejected, STATEMENT_CACHE, Store, StoreError,
    SweepClaim, TaskFilter, TaskRow, Upkeep, WindowBlockers, db, spawn_upkeep, statement_chunks,
    ts,
};
use crate::domain::counters::{CounterKey, Stored};
use crate::domain::effects::EffectKind;
use crate::domain::event::{ClientId, Envelope, EventId};
use crate::domain::history::ClientState;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, QueryBuilder, Row};
use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

/// PostgreSQL allows 65535 bound parameters per statement; stay below.
const MAX_PARAMS: usize = 60_000;

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
pub struct PgStore {
    pool: PgPool,
    /// The window's vacuumer, stopped when the last clone of the store goes.
    _vacuumer: Upkeep,
}

impl PgStore {
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
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

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn try_commit(&self, batch: &BatchWrite) -> Result<CommitOutcome, sqlx::Error> {
        let mut tx = self.pool.begin().await?;

        let mut events: Vec<_> = batch.events.iter().collect();
        events.sort_by(|a, b| a.envelope.id.as_str().cmp(b.envelope.id.as_str()));
        for chunk in statement_chunks(&events, chunk_rows(11)) {
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
        for chunk in statement_chunks(&clients, chunk_rows(14)) {
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
        for chunk in statement_chunks(&effects, chunk_rows(9)) {
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
        for chunk in statement_chunks(&members, chunk_rows(3)) {
            let mut q = QueryBuilder::<Postgres>::new(
                "INSERT INTO counter_members (name, period, member) ",
            );
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
        for chunk in statement_chunks(&tasks, chunk_rows(10)) {
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
        insert_log(&mut tx, &log).await?;

        for chunk in statement_chunks(&batch.rejected, chunk_rows(5)) {
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
            sqlx::query(
                "UPDATE schedules SET cursor = $1, done = $2 WHERE rule = $3 AND slot = $4",
            )
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
}

fn chunk_rows(columns: usize) -> usize {
    (MAX_PARAMS / columns).max(1)
}

fn json(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).expect("plain data serialises")
}

/// A lost race between instances that PostgreSQL reports as an error:
/// deadlock detected or serialization failure. Retried as a conflict.
fn is_race(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if matches!(d.code().as_deref(), Some("40P01" | "40001")))
}

/// Appends lines to the clients' process logs.
async fn insert_log(
    conn: &mut sqlx::PgConnection,
    entries: &[&LogEntry],
) -> Result<(), sqlx::Error> {
    for chunk in statement_chunks(entries, chunk_rows(6)) {
        let mut q = QueryBuilder::<Postgres>::new(
            "INSERT INTO client_log (client_id, at, level, rule, event_id, message) ",
        );
        q.push_values(chunk, |mut b, e| {
            b.push_bind(e.client_id.as_str().to_string())
                .push_bind(e.at)
                .push_bind(e.level.as_str())
                .push_bind(e.rule.clone())
                .push_bind(e.event_id.as_ref().map(|i| i.as_str().to_string()))
                .push_bind(e.message.clone());
        });
        q.build().execute(&mut *conn).await?;
    }
    Ok(())
}

fn stored_client_id(s: String) -> Result<ClientId, StoreError> {
    ClientId::parse(s).map_err(|e| StoreError::Corrupt {
        context: "client_id",
        message: e.to_string(),
    })
}

impl Store for PgStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        // sqlx takes an advisory lock: instances starting together migrate once.
        sqlx::migrate!("./migrations/postgres")
            .run(&self.pool)
            .await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(db("pinging the database"))?;
        Ok(())
    }

    async fn known_events(&self, ids: &[&EventId]) -> Result<HashSet<String>, StoreError> {
        let ids: Vec<&str> = ids.iter().map(|i| i.as_str()).collect();
        let rows: Vec<String> = sqlx::query_scalar("SELECT id FROM events WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_all(&self.pool)
            .await
            .map_err(db("looking up known event ids"))?;
        Ok(rows.into_iter().collect())
    }

    async fn load_clients(
        &self,
        ids: &[&ClientId],
    ) -> Result<HashMap<ClientId, ClientState>, StoreError> {
        let ids: Vec<&str> = ids.iter().map(|i| i.as_str()).collect();
        let rows = sqlx::query(
            "SELECT version, state::text, client_id FROM clients WHERE client_id = ANY($1)",
        )
        .bind(&ids)
        .fetch_all(&self.pool)
        .await
        .map_err(db("loading client states"))?;
        let mut out = HashMap::with_capacity(rows.len());
        for row in rows {
            let state = super::state_from_row(row.get(2), row.get(0), row.get(1))?;
            out.insert(state.client_id.clone(), state);
        }
        Ok(out)
    }

    async fn commit_batch(&self, batch: &BatchWrite) -> Result<CommitOutcome, StoreError> {
        match self.try_commit(batch).await {
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

    async fn list_rejected(&self, limit: u32) -> Result<Vec<Rejected>, StoreError> {
        let page = self.rejected_page(None, limit).await?;
        Ok(page.into_iter().map(|(_, r)| r).collect())
    }

    async fn rejected_page(
        &self,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<(i64, Rejected)>, StoreError> {
        let rows = sqlx::query(
            "SELECT received_at, subject, stream_seq, reason, payload, id FROM rejected \
             WHERE id < $1 ORDER BY id DESC LIMIT $2",
        )
        .bind(before.unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing rejected events"))?;
        Ok(rows
            .into_iter()
            .map(|r| {
                (
                    r.get(5),
                    Rejected {
                        received_at: r.get(0),
                        subject: r.get(1),
                        stream_seq: r.get::<Option<i64>, _>(2).map(|s| s as u64),
                        reason: r.get(3),
                        payload: r.get(4),
                    },
                )
            })
            .collect())
    }

    async fn client_log(&self, client: &ClientId, limit: u32) -> Result<Vec<LogEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT at, level, rule, event_id, message FROM client_log WHERE client_id = $1 \
             ORDER BY id DESC LIMIT $2",
        )
        .bind(client.as_str())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db("reading the process log"))?;
        Ok(rows
            .into_iter()
            .map(|r| LogEntry {
                client_id: client.clone(),
                at: r.get(0),
                level: match r.get::<&str, _>(1) {
                    "error" => super::Level::Error,
                    "warning" => super::Level::Warning,
                    _ => super::Level::Notice,
                },
                rule: r.get(2),
                event_id: r
                    .get::<Option<String>, _>(3)
                    .and_then(|s| EventId::parse(s).ok()),
                message: r.get(4),
            })
            .collect())
    }

    async fn list_outbox(&self, limit: u32) -> Result<Vec<OutboxRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT key, kind, rule, client_id, cause, status, attempts, last_error, message_id \
             FROM outbox ORDER BY created_at DESC, key LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
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
    }

    async fn count_events(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM events")
            .fetch_one(&self.pool)
            .await
            .map_err(db("counting events"))?;
        Ok(n as u64)
    }

    async fn load_counter(&self, key: &CounterKey) -> Result<Stored, StoreError> {
        let row =
            sqlx::query("SELECT value, version FROM counters WHERE name = $1 AND period = $2")
                .bind(&key.name)
                .bind(&key.period)
                .fetch_optional(&self.pool)
                .await
                .map_err(db("reading a counter"))?;
        Ok(row.map_or_else(Stored::default, |r| Stored {
            value: r.get(0),
            version: r.get(1),
        }))
    }

    async fn is_member(&self, key: &CounterKey, member: &str) -> Result<bool, StoreError> {
        let found: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM counter_members WHERE name = $1 AND period = $2 AND member = $3",
        )
        .bind(&key.name)
        .bind(&key.period)
        .bind(member)
        .fetch_optional(&self.pool)
        .await
        .map_err(db("reading a distinct counter"))?;
        Ok(found.is_some())
    }

    async fn list_tasks(
        &self,
        filter: &TaskFilter,
        limit: u32,
    ) -> Result<Vec<TaskRow>, StoreError> {
        let mut q = QueryBuilder::<Postgres>::new(
            "SELECT id, team, title, client_id, rule, data, status, at, created_at, done_at \
             FROM tasks WHERE TRUE",
        );
        if let Some(s) = &filter.status {
            q.push(" AND status = ").push_bind(s.clone());
        }
        if let Some(t) = &filter.team {
            q.push(" AND team = ").push_bind(t.clone());
        }
        if let Some(c) = &filter.client_id {
            q.push(" AND client_id = ").push_bind(c.clone());
        }
        if let Some((t, id)) = &filter.after {
            q.push(" AND (created_at < ")
                .push_bind(*t)
                .push(" OR (created_at = ")
                .push_bind(*t)
                .push(" AND id > ")
                .push_bind(id.clone())
                .push("))");
        }
        q.push(" ORDER BY created_at DESC, id LIMIT ")
            .push_bind(i64::from(limit));
        let rows = q
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(db("listing tasks"))?;
        Ok(rows
            .into_iter()
            .map(|r| TaskRow {
                id: r.get(0),
                team: r.get(1),
                title: r.get(2),
                client_id: r.get(3),
                rule: r.get(4),
                data: r.get(5),
                status: r.get(6),
                at: r.get(7),
                created_at: r.get(8),
                done_at: r.get(9),
            })
            .collect())
    }

    async fn close_task(&self, id: &str, at: DateTime<Utc>) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE tasks SET status = 'done', done_at = $1 WHERE id = $2 AND status = 'open'",
        )
        .bind(at)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(db("closing a task"))?;
        Ok(done.rows_affected() == 1)
    }

    async fn export_client(
        &self,
        client: &ClientId,
    ) -> Result<Option<serde_json::Value>, StoreError> {
        let id = client.as_str();
        let state: Option<serde_json::Value> =
            sqlx::query_scalar("SELECT state FROM clients WHERE client_id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(db("exporting a client"))?;
        let Some(state) = state else {
            return Ok(None);
        };
        let events: Vec<serde_json::Value> = sqlx::query(
            "SELECT id, type, occurred_at, data, context FROM events WHERE client_id = $1 \
             ORDER BY occurred_at, id",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .map_err(db("exporting events"))?
        .iter()
        .map(|r| {
            serde_json::json!({"id": r.get::<&str, _>(0), "type": r.get::<&str, _>(1),
                "occurred_at": ts(r.get(2)), "data": r.get::<serde_json::Value, _>(3),
                "context": r.get::<serde_json::Value, _>(4)})
        })
        .collect();
        let mails: Vec<serde_json::Value> = sqlx::query(
            "SELECT key, kind, rule, status, payload, created_at, sent_at, message_id FROM outbox \
             WHERE client_id = $1 ORDER BY created_at, key",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .map_err(db("exporting mails"))?
        .iter()
        .map(|r| {
            serde_json::json!({"key": r.get::<&str, _>(0), "kind": r.get::<&str, _>(1),
                "rule": r.get::<&str, _>(2), "status": r.get::<&str, _>(3),
                "payload": r.get::<serde_json::Value, _>(4), "created_at": ts(r.get(5)),
                "sent_at": r.get::<Option<DateTime<Utc>>, _>(6).map(ts),
                "message_id": r.get::<Option<&str>, _>(7)})
        })
        .collect();
        let filter = TaskFilter {
            client_id: Some(id.to_string()),
            ..Default::default()
        };
        let tasks = self.list_tasks(&filter, 10_000).await?;
        let log = self.client_log(client, 10_000).await?;
        Ok(Some(serde_json::json!({
            "client_id": id,
            "history": state,
            "events": events,
            "mails": mails,
            "tasks": tasks,
            "log": log,
        })))
    }

    async fn erase_client(&self, client: &ClientId, at: DateTime<Utc>) -> Result<bool, StoreError> {
        let id = client.as_str();
        let hash = super::erasure_hash(client);
        let mut tx = self.pool.begin().await.map_err(db("starting an erasure"))?;
        // What names the client in raw text (rejected envelopes, errors).
        let profile: Option<(Option<String>, Option<String>, Option<String>)> =
            sqlx::query_as("SELECT email, first_name, last_name FROM clients WHERE client_id = $1")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db("reading a client to erase"))?;
        let known = profile.is_some();
        let (email, first, last) = profile.unwrap_or_default();
        let needles = super::erasure_needles(id, email, first, last);
        sqlx::query("DELETE FROM clients WHERE client_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db("erasing a client"))?;
        let statements: [(&str, &str); 4] = [
            (
                "UPDATE events SET data = '{}', context = '{}' WHERE client_id = $1",
                "erasing event payloads",
            ),
            (
                "DELETE FROM client_log WHERE client_id = $1",
                "erasing the process log",
            ),
            (
                // A failed mail's error often quotes the address ("550
                // <ana@...>: no such user"): errors go too, not just payloads.
                "UPDATE outbox SET payload = '{}', \
                 last_error = CASE WHEN status IN ('pending', 'sending') THEN 'client erased' \
                 WHEN last_error IS NULL THEN NULL ELSE '(erased)' END, \
                 status = CASE WHEN status IN ('pending', 'sending') THEN 'failed' ELSE status END \
                 WHERE client_id = $1",
                "erasing mails",
            ),
            (
                "UPDATE tasks SET title = '(erased)', data = '{}' WHERE client_id = $1",
                "erasing tasks",
            ),
        ];
        for (sql, what) in statements {
            sqlx::query(sql)
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(db(what))?;
        }
        // Rejected envelopes are raw text, often not JSON (cut at the size
        // limit, broken): any that holds the id, e-mail or a name goes.
        sqlx::query(
            "DELETE FROM rejected WHERE EXISTS (SELECT 1 FROM unnest($1::text[]) AS n(s) \
             WHERE strpos(payload, n.s) > 0 OR strpos(reason, n.s) > 0)",
        )
        .bind(&needles)
        .execute(&mut *tx)
        .await
        .map_err(db("erasing rejected envelopes"))?;
        // Distinct counts keep their numbers, not who was counted.
        sqlx::query("UPDATE counter_members SET member = 'erased:' || $1 WHERE member = $2")
            .bind(&hash)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db("anonymising counters"))?;
        sqlx::query("INSERT INTO erasures (client_id, at) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(&hash)
            .bind(at)
            .execute(&mut *tx)
            .await
            .map_err(db("recording an erasure"))?;
        tx.commit().await.map_err(db("committing an erasure"))?;
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
        Ok(known)
    }

    async fn record_audit(&self, e: &AuditEntry) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO audit (at, actor, role, action, target, outcome) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(e.at)
        .bind(&e.actor)
        .bind(&e.role)
        .bind(&e.action)
        .bind(&e.target)
        .bind(&e.outcome)
        .execute(&self.pool)
        .await
        .map_err(db("recording an audit entry"))?;
        Ok(())
    }

    async fn list_audit(
        &self,
        target: Option<&str>,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT at, actor, role, action, target, outcome FROM audit \
             WHERE $1::text IS NULL OR target = $1 ORDER BY id DESC LIMIT $2",
        )
        .bind(target)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db("reading the audit log"))?;
        Ok(rows
            .into_iter()
            .map(|r| AuditEntry {
                at: r.get(0),
                actor: r.get(1),
                role: r.get(2),
                action: r.get(3),
                target: r.get(4),
                outcome: r.get(5),
            })
            .collect())
    }

    async fn erased(&self) -> Result<HashSet<String>, StoreError> {
        let rows: Vec<String> = sqlx::query_scalar("SELECT client_id FROM erasures")
            .fetch_all(&self.pool)
            .await
            .map_err(db("reading erasures"))?;
        Ok(rows.into_iter().collect())
    }

    async fn client_events(
        &self,
        client: &ClientId,
        event_type: Option<&str>,
        before: Option<(DateTime<Utc>, String)>,
        limit: u32,
    ) -> Result<Vec<EventRow>, StoreError> {
        let mut q = QueryBuilder::<Postgres>::new(
            "SELECT id, type, occurred_at, data, context FROM events WHERE client_id = ",
        );
        q.push_bind(client.as_str().to_string());
        if let Some(t) = event_type {
            q.push(" AND type = ").push_bind(t.to_string());
        }
        if let Some((at, id)) = before {
            q.push(" AND (occurred_at, id) < (")
                .push_bind(at)
                .push(", ")
                .push_bind(id)
                .push(")");
        }
        q.push(" ORDER BY occurred_at DESC, id DESC LIMIT ")
            .push_bind(i64::from(limit));
        let rows = q
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(db("reading a client's events"))?;
        Ok(rows
            .into_iter()
            .map(|r| EventRow {
                id: r.get(0),
                event_type: r.get(1),
                occurred_at: r.get(2),
                data: r.get(3),
                context: r.get(4),
            })
            .collect())
    }

    async fn search_clients(
        &self,
        q: &str,
        offset: u32,
        limit: u32,
    ) -> Result<Vec<ClientSummary>, StoreError> {
        let like = format!(
            "%{}%",
            q.to_lowercase()
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        );
        let rows = sqlx::query(
            "SELECT client_id, email, first_name, last_name, last_seen FROM clients \
             WHERE lower(client_id) LIKE $1 ESCAPE '\\' OR lower(email) LIKE $1 ESCAPE '\\' \
                OR lower(coalesce(first_name, '') || ' ' || coalesce(last_name, '')) LIKE $1 ESCAPE '\\' \
             ORDER BY (lower(client_id) = $2) DESC, last_seen DESC NULLS LAST, client_id \
             LIMIT $3 OFFSET $4",
        )
        .bind(like)
        .bind(q.to_lowercase())
        .bind(i64::from(limit))
        .bind(i64::from(offset))
        .fetch_all(&self.pool)
        .await
        .map_err(db("searching clients"))?;
        Ok(rows
            .into_iter()
            .map(|r| ClientSummary {
                client_id: r.get(0),
                email: r.get(1),
                first_name: r.get(2),
                last_name: r.get(3),
                last_seen: r.get(4),
            })
            .collect())
    }

    async fn client_mails(
        &self,
        client: &ClientId,
        limit: u32,
    ) -> Result<Vec<MailRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT rule, kind, payload->>'template', status, created_at, sent_at, last_error, \
             message_id, payload->'vars' FROM outbox WHERE client_id = $1 \
             ORDER BY created_at DESC, key LIMIT $2",
        )
        .bind(client.as_str())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db("reading a client's mails"))?;
        Ok(rows
            .into_iter()
            .map(|r| MailRow {
                message_id: r.get(7),
                vars: r.get::<Option<serde_json::Value>, _>(8).unwrap_or_default(),
                rule: r.get(0),
                kind: r.get(1),
                template: r.get(2),
                status: r.get(3),
                at: r.get(4),
                sent_at: r.get(5),
                last_error: r.get(6),
            })
            .collect())
    }

    async fn outbox_depth(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM outbox WHERE status IN ('pending', 'sending')",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(db("measuring the outbox"))?;
        Ok(n as u64)
    }

    async fn meta_get_or_init(&self, key: &str, init: &str) -> Result<String, StoreError> {
        sqlx::query("INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(key)
            .bind(init)
            .execute(&self.pool)
            .await
            .map_err(db("initialising a setting"))?;
        sqlx::query_scalar("SELECT value FROM meta WHERE key = $1")
            .bind(key)
            .fetch_one(&self.pool)
            .await
            .map_err(db("reading a setting"))
    }

    async fn events_page(
        &self,
        after: Option<&LogCursor>,
        limit: u32,
    ) -> Result<Vec<(Envelope, LogCursor)>, StoreError> {
        let mut q = QueryBuilder::<Postgres>::new(
            "SELECT id, client_id, type, occurred_at, data::text, context::text, stream_seq \
             FROM events WHERE stream_seq IS NOT NULL",
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
            .fetch_all(&self.pool)
            .await
            .map_err(db("reading the event log"))?;
        rows.into_iter()
            .map(|r| {
                let corrupt = |message: String| StoreError::Corrupt {
                    context: "events",
                    message,
                };
                let occurred_at: DateTime<Utc> = r.get(3);
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
    }

    async fn sweep_log(&self) -> Result<Vec<(String, DateTime<Utc>)>, StoreError> {
        let rows = sqlx::query("SELECT rule, slot FROM sweep_log ORDER BY slot, rule")
            .fetch_all(&self.pool)
            .await
            .map_err(db("reading the sweep log"))?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn replace_derived(&self, derived: &Derived) -> Result<(), StoreError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(db("starting the replay transaction"))?;
        sqlx::query("TRUNCATE clients, counters, counter_members")
            .execute(&mut *tx)
            .await
            .map_err(db("wiping derived history"))?;
        for chunk in statement_chunks(&derived.clients, chunk_rows(14)) {
            let mut q = QueryBuilder::<Postgres>::new(
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
                    .push_bind(p.first_seen)
                    .push_bind(p.last_seen)
                    .push_bind(c.next_due())
                    .push_bind(json(c))
                    .push_unseparated("::json");
            });
            q.build()
                .execute(&mut *tx)
                .await
                .map_err(db("writing replayed clients"))?;
        }
        for chunk in statement_chunks(&derived.counters, chunk_rows(4)) {
            let mut q = QueryBuilder::<Postgres>::new(
                "INSERT INTO counters (name, period, value, version) ",
            );
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
        for chunk in statement_chunks(&derived.members, chunk_rows(3)) {
            let mut q = QueryBuilder::<Postgres>::new(
                "INSERT INTO counter_members (name, period, member) ",
            );
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
        tx.commit().await.map_err(db("committing the replay"))?;
        Ok(())
    }

    async fn due_clients(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<ClientId>, StoreError> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT client_id FROM clients WHERE next_due IS NOT NULL AND next_due <= $1 \
             ORDER BY next_due LIMIT $2",
        )
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db("finding due timers"))?;
        ids.into_iter().map(stored_client_id).collect()
    }

    async fn client_page(
        &self,
        after: Option<&ClientId>,
        limit: u32,
    ) -> Result<Vec<ClientId>, StoreError> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT client_id FROM clients WHERE client_id > $1 ORDER BY client_id LIMIT $2",
        )
        .bind(after.map_or("", |c| c.as_str()))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db("paging clients"))?;
        ids.into_iter().map(stored_client_id).collect()
    }

    async fn claim_sweep(
        &self,
        rule: &str,
        slot: DateTime<Utc>,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> Result<Option<SweepClaim>, StoreError> {
        // One statement: a new slot replaces a finished (or abandoned) one; the
        // same unfinished slot is taken over, with its cursor, once its lease
        // ran out. The row lock makes two instances' claims queue, and the
        // loser's WHERE fails on the winner's row.
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
        .bind(slot)
        .bind(lease_until)
        .bind(now)
        .fetch_optional(&self.pool)
        .await
        .map_err(db("claiming a sweep"))?;
        let Some(row) = row else {
            return Ok(None);
        };
        sqlx::query("INSERT INTO sweep_log (rule, slot) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(rule)
            .bind(slot)
            .execute(&self.pool)
            .await
            .map_err(db("logging a sweep"))?;
        Ok(Some(SweepClaim {
            slot: row.get(0),
            cursor: row
                .get::<Option<String>, _>(1)
                .map(stored_client_id)
                .transpose()?,
        }))
    }

    async fn claim_due(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<OutboxItem>, StoreError> {
        // SKIP LOCKED: senders of several instances take disjoint mails
        // without waiting on each other; an expired lease (a sender that
        // died) is claimable again. Each kind is read apart, in `outbox_due`
        // order, and stops at the limit, rather than sorting every due mail
        // at each claim; a row locked here but left out by the last limit
        // is free again when the statement ends.
        let rows = sqlx::query(
            "UPDATE outbox SET status = 'sending', lease_until = $1, attempts = attempts + 1 \
             WHERE key IN (SELECT key FROM ( \
                 SELECT key, due_at FROM (SELECT key, due_at FROM outbox \
                     WHERE status = 'pending' AND due_at <= $2 \
                     ORDER BY due_at LIMIT $3 FOR UPDATE SKIP LOCKED) AS pending \
                 UNION ALL \
                 SELECT key, due_at FROM (SELECT key, due_at FROM outbox \
                     WHERE status = 'sending' AND lease_until <= $2 \
                     ORDER BY due_at LIMIT $3 FOR UPDATE SKIP LOCKED) AS expired) AS due \
                 ORDER BY due_at LIMIT $3) \
             RETURNING key, rule, client_id, cause, payload, attempts",
        )
        .bind(lease_until)
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db("claiming due mails"))?;
        Ok(rows
            .into_iter()
            .map(|r| OutboxItem {
                key: r.get(0),
                rule: r.get(1),
                client_id: r.get(2),
                cause: r.get(3),
                payload: r.get(4),
                attempts: r.get::<i64, _>(5) as u32,
            })
            .collect())
    }

    async fn record_deliveries(&self, outcomes: &[Delivery]) -> Result<(), StoreError> {
        if outcomes.is_empty() {
            return Ok(());
        }
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(db("starting to record deliveries"))?;
        let mut log = Vec::new();
        // Mails sent, most of a round, in one statement rather than one each.
        let mut keys = Vec::new();
        let mut ats = Vec::new();
        let mut message_ids = Vec::new();
        for outcome in outcomes {
            if let Delivery::Sent {
                key,
                message_id,
                at,
                log: entry,
            } = outcome
            {
                keys.push(key.as_str());
                ats.push(*at);
                message_ids.push(message_id.as_str());
                log.push(entry);
            }
        }
        if !keys.is_empty() {
            sqlx::query(
                "UPDATE outbox SET status = 'sent', sent_at = v.at, message_id = v.message_id, \
                 lease_until = NULL, last_error = NULL \
                 FROM UNNEST($1::text[], $2::timestamptz[], $3::text[]) AS v(key, at, message_id) \
                 WHERE outbox.key = v.key",
            )
            .bind(&keys)
            .bind(&ats)
            .bind(&message_ids)
            .execute(&mut *tx)
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
                .bind(*due_at)
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
                Delivery::Deferred { key, due_at, why } => sqlx::query(
                    "UPDATE outbox SET status = 'pending', due_at = $1, lease_until = NULL, \
                     attempts = GREATEST(attempts - 1, 0), last_error = $2 WHERE key = $3",
                )
                .bind(*due_at)
                .bind(why)
                .bind(key),
            };
            q.execute(&mut *tx)
                .await
                .map_err(db("recording a delivery"))?;
        }
        insert_log(&mut tx, &log)
            .await
            .map_err(db("logging deliveries"))?;
        tx.commit().await.map_err(db("committing the deliveries"))?;
        Ok(())
    }

    async fn window_register(
        &self,
        owner: &str,
        items: &[(u64, Option<String>)],
        lease_until: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let seqs: Vec<i64> = items.iter().map(|(s, _)| *s as i64).collect();
        let clients: Vec<Option<&str>> = items.iter().map(|(_, c)| c.as_deref()).collect();
        let mut tx = self.advisory_tx().await?;
        // A redelivered message changes hands; one already settled stays so.
        sqlx::query(
            "INSERT INTO inflight (seq, client_id, owner, lease_until) \
             SELECT s, c, $3, $4 FROM UNNEST($1::bigint[], $2::text[]) AS t(s, c) \
             ON CONFLICT (seq) DO UPDATE SET owner = excluded.owner, \
             lease_until = excluded.lease_until WHERE NOT inflight.done",
        )
        .bind(&seqs)
        .bind(&clients)
        .bind(owner)
        .bind(lease_until)
        .execute(&mut *tx)
        .await
        .map_err(db("registering pulled messages"))?;
        tx.commit()
            .await
            .map_err(db("registering pulled messages"))?;
        Ok(())
    }

    async fn window_blockers(
        &self,
        owners: &[&str],
        floor: u64,
        below: u64,
        clients: &[&str],
        now: DateTime<Utc>,
    ) -> Result<WindowBlockers, StoreError> {
        // NULL: every sequence from the floor to `below` is known.
        let first_gap: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(s + 1) FROM (SELECT $1::bigint AS s UNION ALL \
             SELECT seq FROM inflight WHERE seq > $1 AND seq < $2) AS known \
             WHERE NOT EXISTS (SELECT 1 FROM inflight i WHERE i.seq = known.s + 1)",
        )
        .bind(floor as i64)
        .bind(below as i64)
        .fetch_one(&self.pool)
        .await
        .map_err(db("reading the window"))?;
        let rows = sqlx::query(
            "SELECT client_id, seq FROM inflight WHERE NOT done AND owner <> ALL($1) \
             AND lease_until > $2 AND seq < $3 AND client_id = ANY($4) AND seq > $5",
        )
        .bind(owners)
        .bind(now)
        .bind(below as i64)
        .bind(clients)
        .bind(floor as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(db("reading the window"))?;
        // Any client's: steps that use shared counters wait for every
        // earlier message, not only their clients' own.
        let first_pending: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(seq) FROM inflight WHERE NOT done AND owner <> ALL($1) \
             AND lease_until > $2 AND seq < $3 AND seq > $4",
        )
        .bind(owners)
        .bind(now)
        .bind(below as i64)
        .bind(floor as i64)
        .fetch_one(&self.pool)
        .await
        .map_err(db("reading the window"))?;
        Ok(WindowBlockers {
            first_gap: first_gap.map_or(u64::MAX, |g| g as u64),
            pending: rows
                .into_iter()
                .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1) as u64))
                .collect(),
            first_pending: first_pending.map_or(u64::MAX, |s| s as u64),
        })
    }

    async fn window_trim(&self, floor: u64) -> Result<(), StoreError> {
        let mut tx = self.advisory_tx().await?;
        sqlx::query("DELETE FROM inflight WHERE seq <= $1")
            .bind(floor as i64)
            .execute(&mut *tx)
            .await
            .map_err(db("trimming the window"))?;
        tx.commit().await.map_err(db("trimming the window"))?;
        Ok(())
    }
}

impl PgStore {
    /// A transaction whose commit does not wait for the WAL to reach the
    /// disk: for the consumer window's announcements and trims, which come
    /// before each batch and are advisory. One lost in a server crash (the
    /// only way it can be lost) is announced again when its batch is
    /// retried, and until then it shows as a gap that holds later events
    /// back. Each would wait for a disk flush, several per batch.
    async fn advisory_tx(&self) -> Result<sqlx::Transaction<'_, sqlx::Postgres>, StoreError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(db("starting a window transaction"))?;
        sqlx::query("SET LOCAL synchronous_commit TO OFF")
            .execute(&mut *tx)
            .await
            .map_err(db("starting a window transaction"))?;
        Ok(tx)
    }
}
