//! The embedded default backend: SQLite in WAL mode. One writer at a time is
//! SQLite's nature, so write transactions start `IMMEDIATE` (they queue on
//! the busy timeout instead of failing half-way) and each batch is written
//! with multi-row statements.

use super::window::{ConsumerLock, MemoryWindow};
use super::{
    AuditEntry, BatchWrite, ClientSummary, CommitOutcome, Delivery, Derived, EventRow, LogCursor,
    LogEntry, MailRow, OutboxItem, OutboxRow, Rejected, STATEMENT_CACHE, Store, StoreError,
    SweepClaim, TaskFilter, TaskRow, Upkeep, WindowBlockers, db, parse_ts, spawn_upkeep,
    statement_chunks, ts,
};
use crate::domain::counters::{CounterKey, Stored};
use crate::domain::effects::EffectKind;
use crate::domain::event::Envelope;
use crate::domain::event::{ClientId, EventId};
use crate::domain::history::{ClientState, Profile};
use chrono::{DateTime, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// SQLite allows 32766 bound parameters per statement; stay well below.
const MAX_PARAMS: usize = 30_000;

#[derive(Clone)]
pub struct SqliteStore {
    /// Connections for reading, many at once (WAL readers never wait).
    pool: SqlitePool,
    /// The one connection every write of this process goes through. SQLite
    /// takes one writer at a time anyway; queueing here rather than on the
    /// database lock hands it over at once (the busy handler polls with
    /// sleeps), and a connection that alone writes keeps its page cache,
    /// which SQLite drops whenever another connection wrote since.
    writer: SqlitePool,
    /// The background checkpointer, stopped when the last copy is dropped.
    _checkpointer: Upkeep,
    /// The consumer window: in memory, as one process at a time consumes
    /// into a SQLite database (see [`super::window`]).
    window: Arc<MemoryWindow>,
    /// The database file; `None` for an in-memory database.
    file: Option<PathBuf>,
}

/// Page cache of the writer, KiB: the pages a batch touches (its clients,
/// the index leaves of its events) stay cached from one batch to the next.
const WRITER_CACHE_KIB: u32 = 32 * 1024;
/// WAL pages after which a commit checkpoints them into the database itself:
/// only a backstop. Checkpoints are the background checkpointer's work
/// ([`CHECKPOINT_EVERY`]); a commit that had to copy thousands of pages into
/// the database would make the events of its batch wait (the default of
/// 1,000 pages cost a checkpoint every busy batch; 8,000 made p99
/// publish-to-commit latency three times p50).
const WAL_CHECKPOINT_PAGES: u32 = 8_000;
/// How often a reader connection copies the WAL into the database
/// (a passive checkpoint: it never waits for, nor holds up, the writer).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

impl SqliteStore {
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        Self::connect_capped(url, max_connections, None).await
    }

    /// Opens the database; with `max_size_mb`, every connection refuses to
    /// grow the file past that size (`PRAGMA max_page_count`), so writes
    /// beyond it fail with SQLITE_FULL, the way they do on a full disk.
    pub async fn connect_capped(
        url: &str,
        max_connections: u32,
        max_size_mb: Option<u64>,
    ) -> Result<Self, StoreError> {
        let opts = SqliteConnectOptions::from_str(url)
            .map_err(db("parsing the sqlite url"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true)
            .statement_cache_capacity(STATEMENT_CACHE)
            // REGEXP, for searches that ignore case beyond ASCII (SQLite's
            // own lower() and LIKE fold only A-Z).
            .with_regexp()
            // Deleted and overwritten content is zeroed, so an erased
            // client's data does not linger in free pages of the file.
            .pragma("secure_delete", "ON");
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let file = (!in_memory).then(|| opts.get_filename().to_path_buf());
        if let Some(dir) = opts.get_filename().parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Db {
                context: "creating the database directory",
                source: sqlx::Error::Io(e),
            })?;
        }
        let writer = capped(SqlitePoolOptions::new().max_connections(1), max_size_mb)
            .connect_with(
                opts.clone()
                    .pragma("cache_size", format!("-{WRITER_CACHE_KIB}"))
                    .pragma("temp_store", "memory")
                    .pragma("wal_autocheckpoint", WAL_CHECKPOINT_PAGES.to_string()),
            )
            .await
            .map_err(db("opening the sqlite database"))?;
        let pool = capped(
            SqlitePoolOptions::new().max_connections(max_connections),
            max_size_mb,
        )
        .connect_with(opts)
        .await
        .map_err(db("opening the sqlite database"))?;
        // Should one fail, the writer's own checkpoints are the backstop.
        let checkpointer = spawn_upkeep(
            pool.clone(),
            "PRAGMA wal_checkpoint(PASSIVE)",
            CHECKPOINT_EVERY,
        );
        Ok(Self {
            pool,
            writer,
            _checkpointer: checkpointer,
            window: Arc::default(),
            file,
        })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Waits until no other process consumes into this database, and holds
    /// the lock that says this one does (`None`: cancelled while waiting).
    /// An in-memory database is this process's alone.
    pub async fn consumer_lock(
        &self,
        cancel: &CancellationToken,
        standing_by: &(dyn Fn(bool) + Sync),
    ) -> Option<ConsumerLock> {
        match &self.file {
            None => Some(ConsumerLock::shared()),
            Some(file) => ConsumerLock::take(file, cancel, standing_by).await,
        }
    }
}

/// With `max_size_mb`, each connection of the pool refuses to grow the file
/// past that size.
fn capped(pool: SqlitePoolOptions, max_size_mb: Option<u64>) -> SqlitePoolOptions {
    let Some(mb) = max_size_mb else {
        return pool;
    };
    let bytes = mb.saturating_mul(1024 * 1024);
    pool.after_connect(move |conn, _| {
        Box::pin(async move {
            // The page size is the file's own (4096 unless it was made otherwise).
            let page: i64 = sqlx::query_scalar("PRAGMA page_size")
                .fetch_one(&mut *conn)
                .await?;
            let pages = (bytes / page.max(512) as u64).max(1);
            sqlx::query(&format!("PRAGMA max_page_count = {pages}"))
                .execute(&mut *conn)
                .await?;
            Ok(())
        })
    })
}

/// `s` as a regular expression that matches it literally.
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn chunk_rows(columns: usize) -> usize {
    (MAX_PARAMS / columns).max(1)
}

fn json(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).expect("plain data serialises")
}

/// Appends lines to the clients' process logs.
async fn insert_log(
    conn: &mut sqlx::SqliteConnection,
    entries: &[&LogEntry],
) -> Result<(), sqlx::Error> {
    for chunk in statement_chunks(entries, chunk_rows(6)) {
        let mut q = QueryBuilder::<Sqlite>::new(
            "INSERT INTO client_log (client_id, at, level, rule, event_id, message) ",
        );
        q.push_values(chunk, |mut b, e| {
            b.push_bind(e.client_id.as_str().to_string())
                .push_bind(ts(e.at))
                .push_bind(e.level.as_str())
                .push_bind(e.rule.clone())
                .push_bind(e.event_id.as_ref().map(|i| i.as_str().to_string()))
                .push_bind(e.message.clone());
        });
        q.build().execute(&mut *conn).await?;
    }
    Ok(())
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
    for chunk in statement_chunks(&new, chunk_rows(14)) {
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
    for chunk in statement_chunks(&known, chunk_rows(12)) {
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
        for chunk in statement_chunks(&known, chunk_rows(2)) {
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
    for chunk in statement_chunks(&batch.events, chunk_rows(11)) {
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

    for chunk in statement_chunks(&batch.effects, chunk_rows(9)) {
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
    for chunk in statement_chunks(&batch.members, chunk_rows(3)) {
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
    for chunk in statement_chunks(&tasks, chunk_rows(10)) {
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
    insert_log(&mut tx, &log)
        .await
        .map_err(db("writing the process log"))?;

    for chunk in statement_chunks(&batch.rejected, chunk_rows(5)) {
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

impl Store for SqliteStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("./migrations/sqlite")
            .run(&self.writer)
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
        let mut known = HashSet::new();
        for chunk in statement_chunks(ids, chunk_rows(1)) {
            let mut q = QueryBuilder::<Sqlite>::new("SELECT id FROM events WHERE id IN (");
            let mut sep = q.separated(", ");
            for id in chunk {
                sep.push_bind(id.as_str());
            }
            q.push(")");
            let rows = q
                .build()
                .fetch_all(&self.pool)
                .await
                .map_err(db("looking up known event ids"))?;
            for row in rows {
                known.insert(row.get::<String, _>(0));
            }
        }
        Ok(known)
    }

    async fn load_clients(
        &self,
        ids: &[&ClientId],
    ) -> Result<HashMap<ClientId, ClientState>, StoreError> {
        let mut out = HashMap::with_capacity(ids.len());
        for chunk in statement_chunks(ids, chunk_rows(1)) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "SELECT version, state, client_id FROM clients WHERE client_id IN (",
            );
            let mut sep = q.separated(", ");
            for id in chunk {
                sep.push_bind(id.as_str());
            }
            q.push(")");
            let rows = q
                .build()
                .fetch_all(&self.pool)
                .await
                .map_err(db("loading client states"))?;
            for row in rows {
                let state = super::state_from_row(row.get(2), row.get(0), row.get(1))?;
                out.insert(state.client_id.clone(), state);
            }
        }
        Ok(out)
    }

    async fn commit_batch(&self, batch: &BatchWrite) -> Result<CommitOutcome, StoreError> {
        let mut conn = self
            .writer
            .acquire()
            .await
            .map_err(db("starting the batch transaction"))?;
        let outcome = write_batch(&mut conn, batch).await;
        if let Ok(CommitOutcome::Committed) = outcome {
            self.window.settle(&batch.settled, batch.window_floor);
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
             WHERE id < ? ORDER BY id DESC LIMIT ?",
        )
        .bind(before.unwrap_or(i64::MAX))
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing rejected events"))?;
        rows.into_iter()
            .map(|r| {
                Ok((
                    r.get(5),
                    Rejected {
                        received_at: parse_ts(r.get(0))?,
                        subject: r.get(1),
                        stream_seq: r.get::<Option<i64>, _>(2).map(|s| s as u64),
                        reason: r.get(3),
                        payload: r.get(4),
                    },
                ))
            })
            .collect()
    }

    async fn client_log(&self, client: &ClientId, limit: u32) -> Result<Vec<LogEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT at, level, rule, event_id, message FROM client_log WHERE client_id = ? \
             ORDER BY id DESC LIMIT ?",
        )
        .bind(client.as_str())
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(db("reading the process log"))?;
        rows.into_iter()
            .map(|r| {
                let level = match r.get::<&str, _>(1) {
                    "error" => super::Level::Error,
                    "warning" => super::Level::Warning,
                    _ => super::Level::Notice,
                };
                Ok(LogEntry {
                    client_id: client.clone(),
                    at: parse_ts(r.get(0))?,
                    level,
                    rule: r.get(2),
                    event_id: r
                        .get::<Option<String>, _>(3)
                        .and_then(|s| EventId::parse(s).ok()),
                    message: r.get(4),
                })
            })
            .collect()
    }

    async fn list_outbox(&self, limit: u32) -> Result<Vec<OutboxRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT key, kind, rule, client_id, cause, status, attempts, last_error, message_id \
             FROM outbox ORDER BY created_at DESC, key LIMIT ?",
        )
        .bind(limit)
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
        let row = sqlx::query("SELECT value, version FROM counters WHERE name = ? AND period = ?")
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
        let found: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM counter_members WHERE name = ? AND period = ? AND member = ?",
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
        let mut q = QueryBuilder::<Sqlite>::new(
            "SELECT id, team, title, client_id, rule, data, status, at, created_at, done_at \
             FROM tasks WHERE 1 = 1",
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
                .push_bind(ts(*t))
                .push(" OR (created_at = ")
                .push_bind(ts(*t))
                .push(" AND id > ")
                .push_bind(id.clone())
                .push("))");
        }
        q.push(" ORDER BY created_at DESC, id LIMIT ")
            .push_bind(limit);
        let rows = q
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(db("listing tasks"))?;
        rows.into_iter()
            .map(|r| {
                Ok(TaskRow {
                    id: r.get(0),
                    team: r.get(1),
                    title: r.get(2),
                    client_id: r.get(3),
                    rule: r.get(4),
                    data: serde_json::from_str(r.get::<&str, _>(5)).unwrap_or_default(),
                    status: r.get(6),
                    at: parse_ts(r.get(7))?,
                    created_at: parse_ts(r.get(8))?,
                    done_at: r.get::<Option<&str>, _>(9).map(parse_ts).transpose()?,
                })
            })
            .collect()
    }

    async fn close_task(&self, id: &str, at: DateTime<Utc>) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE tasks SET status = 'done', done_at = ? WHERE id = ? AND status = 'open'",
        )
        .bind(ts(at))
        .bind(id)
        .execute(&self.writer)
        .await
        .map_err(db("closing a task"))?;
        Ok(done.rows_affected() == 1)
    }

    async fn export_client(
        &self,
        client: &ClientId,
    ) -> Result<Option<serde_json::Value>, StoreError> {
        let id = client.as_str();
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM clients WHERE client_id = ?")
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(db("exporting a client"))?;
        let Some(state) = state else {
            return Ok(None);
        };
        let parse = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap_or_default();
        let events: Vec<serde_json::Value> = sqlx::query(
            "SELECT id, type, occurred_at, data, context FROM events WHERE client_id = ? \
             ORDER BY occurred_at, id",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .map_err(db("exporting events"))?
        .iter()
        .map(|r| {
            serde_json::json!({"id": r.get::<&str, _>(0), "type": r.get::<&str, _>(1),
                "occurred_at": r.get::<&str, _>(2), "data": parse(r.get(3)), "context": parse(r.get(4))})
        })
        .collect();
        let mails: Vec<serde_json::Value> = sqlx::query(
            "SELECT key, kind, rule, status, payload, created_at, sent_at, message_id FROM outbox \
             WHERE client_id = ? ORDER BY created_at, key",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .map_err(db("exporting mails"))?
        .iter()
        .map(|r| {
            serde_json::json!({"key": r.get::<&str, _>(0), "kind": r.get::<&str, _>(1),
                "rule": r.get::<&str, _>(2), "status": r.get::<&str, _>(3),
                "payload": parse(r.get(4)), "created_at": r.get::<&str, _>(5),
                "sent_at": r.get::<Option<&str>, _>(6), "message_id": r.get::<Option<&str>, _>(7)})
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
            "history": parse(&state),
            "events": events,
            "mails": mails,
            "tasks": tasks,
            "log": log,
        })))
    }

    async fn erase_client(&self, client: &ClientId, at: DateTime<Utc>) -> Result<bool, StoreError> {
        let id = client.as_str();
        let hash = super::erasure_hash(client);
        let mut tx = self
            .writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db("starting an erasure"))?;
        // What names the client in raw text (rejected envelopes, errors).
        let profile: Option<(Option<String>, Option<String>, Option<String>)> =
            sqlx::query_as("SELECT email, first_name, last_name FROM clients WHERE client_id = ?")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db("reading a client to erase"))?;
        let known = profile.is_some();
        let (email, first, last) = profile.unwrap_or_default();
        let needles = super::erasure_needles(id, email, first, last);
        sqlx::query("DELETE FROM clients WHERE client_id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db("erasing a client"))?;
        let statements: [(&str, &str); 4] = [
            (
                "UPDATE events SET data = '{}', context = '{}' WHERE client_id = ?",
                "erasing event payloads",
            ),
            (
                "DELETE FROM client_log WHERE client_id = ?",
                "erasing the process log",
            ),
            (
                // A failed mail's error often quotes the address ("550
                // <ana@...>: no such user"): errors go too, not just payloads.
                "UPDATE outbox SET payload = '{}', \
                 last_error = CASE WHEN status IN ('pending', 'sending') THEN 'client erased' \
                 WHEN last_error IS NULL THEN NULL ELSE '(erased)' END, \
                 status = CASE WHEN status IN ('pending', 'sending') THEN 'failed' ELSE status END \
                 WHERE client_id = ?",
                "erasing mails",
            ),
            (
                "UPDATE tasks SET title = '(erased)', data = '{}' WHERE client_id = ?",
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
        for needle in &needles {
            sqlx::query(
                "DELETE FROM rejected WHERE instr(payload, ?1) > 0 OR instr(reason, ?1) > 0",
            )
            .bind(needle)
            .execute(&mut *tx)
            .await
            .map_err(db("erasing rejected envelopes"))?;
        }
        // Distinct counts keep their numbers, not who was counted.
        sqlx::query("UPDATE counter_members SET member = 'erased:' || ? WHERE member = ?")
            .bind(&hash)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db("anonymising counters"))?;
        sqlx::query("INSERT INTO erasures (client_id, at) VALUES (?, ?) ON CONFLICT DO NOTHING")
            .bind(&hash)
            .bind(ts(at))
            .execute(&mut *tx)
            .await
            .map_err(db("recording an erasure"))?;
        tx.commit().await.map_err(db("committing an erasure"))?;
        // The pages as they were before the erasure stay in the WAL until a
        // checkpoint copies the new ones over and the log is cut: do it now
        // rather than at the next automatic checkpoint. A reader holding an
        // old snapshot can keep it from finishing; the next one completes it.
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&self.writer)
            .await
        {
            tracing::warn!(error = %e, "checkpoint after an erasure failed");
        }
        Ok(known)
    }

    async fn record_audit(&self, e: &AuditEntry) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO audit (at, actor, role, action, target, outcome) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(ts(e.at))
        .bind(&e.actor)
        .bind(&e.role)
        .bind(&e.action)
        .bind(&e.target)
        .bind(&e.outcome)
        .execute(&self.writer)
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
             WHERE ?1 IS NULL OR target = ?1 ORDER BY id DESC LIMIT ?2",
        )
        .bind(target)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(db("reading the audit log"))?;
        rows.into_iter()
            .map(|r| {
                Ok(AuditEntry {
                    at: parse_ts(r.get(0))?,
                    actor: r.get(1),
                    role: r.get(2),
                    action: r.get(3),
                    target: r.get(4),
                    outcome: r.get(5),
                })
            })
            .collect()
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
        let mut q = QueryBuilder::<Sqlite>::new(
            "SELECT id, type, occurred_at, data, context FROM events WHERE client_id = ",
        );
        q.push_bind(client.as_str().to_string());
        if let Some(t) = event_type {
            q.push(" AND type = ").push_bind(t.to_string());
        }
        if let Some((at, id)) = before {
            q.push(" AND (occurred_at, id) < (")
                .push_bind(ts(at))
                .push(", ")
                .push_bind(id)
                .push(")");
        }
        q.push(" ORDER BY occurred_at DESC, id DESC LIMIT ")
            .push_bind(limit);
        let rows = q
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(db("reading a client's events"))?;
        rows.into_iter()
            .map(|r| {
                Ok(EventRow {
                    id: r.get(0),
                    event_type: r.get(1),
                    occurred_at: parse_ts(r.get(2))?,
                    data: serde_json::from_str(r.get::<&str, _>(3)).unwrap_or_default(),
                    context: serde_json::from_str(r.get::<&str, _>(4)).unwrap_or_default(),
                })
            })
            .collect()
    }

    async fn search_clients(
        &self,
        q: &str,
        offset: u32,
        limit: u32,
    ) -> Result<Vec<ClientSummary>, StoreError> {
        // Case-insensitive in every script, as on PostgreSQL: `Émile` is
        // found by `émile`.
        let pattern = format!("(?i){}", regex_escape(q));
        let rows = sqlx::query(
            "SELECT client_id, email, first_name, last_name, last_seen FROM clients \
             WHERE client_id REGEXP ?1 OR coalesce(email, '') REGEXP ?1 \
                OR (coalesce(first_name, '') || ' ' || coalesce(last_name, '')) REGEXP ?1 \
             ORDER BY (lower(client_id) = ?2) DESC, last_seen DESC, client_id \
             LIMIT ?3 OFFSET ?4",
        )
        .bind(pattern)
        .bind(q.to_lowercase())
        .bind(limit)
        .bind(offset)
        .fetch_all(&self.pool)
        .await
        .map_err(db("searching clients"))?;
        rows.into_iter()
            .map(|r| {
                Ok(ClientSummary {
                    client_id: r.get(0),
                    email: r.get(1),
                    first_name: r.get(2),
                    last_name: r.get(3),
                    last_seen: r.get::<Option<&str>, _>(4).map(parse_ts).transpose()?,
                })
            })
            .collect()
    }

    async fn client_mails(
        &self,
        client: &ClientId,
        limit: u32,
    ) -> Result<Vec<MailRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT rule, kind, json_extract(payload, '$.template'), status, created_at, sent_at, \
             last_error, message_id, json_extract(payload, '$.vars') FROM outbox \
             WHERE client_id = ? ORDER BY created_at DESC, key LIMIT ?",
        )
        .bind(client.as_str())
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(db("reading a client's mails"))?;
        rows.into_iter()
            .map(|r| {
                Ok(MailRow {
                    message_id: r.get(7),
                    vars: r
                        .get::<Option<&str>, _>(8)
                        .and_then(|v| serde_json::from_str(v).ok())
                        .unwrap_or_default(),
                    rule: r.get(0),
                    kind: r.get(1),
                    template: r.get(2),
                    status: r.get(3),
                    at: parse_ts(r.get(4))?,
                    sent_at: r.get::<Option<&str>, _>(5).map(parse_ts).transpose()?,
                    last_error: r.get(6),
                })
            })
            .collect()
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
        sqlx::query("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT DO NOTHING")
            .bind(key)
            .bind(init)
            .execute(&self.writer)
            .await
            .map_err(db("initialising a setting"))?;
        sqlx::query_scalar("SELECT value FROM meta WHERE key = ?")
            .bind(key)
            .fetch_one(&self.writer)
            .await
            .map_err(db("reading a setting"))
    }

    async fn events_page(
        &self,
        after: Option<&LogCursor>,
        limit: u32,
    ) -> Result<Vec<(Envelope, LogCursor)>, StoreError> {
        let (seq, id) = after.map_or((i64::MIN, String::new()), |c| (c.seq, c.id.clone()));
        let rows = sqlx::query(
            "SELECT id, client_id, type, occurred_at, data, context, stream_seq FROM events \
             WHERE stream_seq IS NOT NULL AND (stream_seq, id) > (?, ?) \
             ORDER BY stream_seq, id LIMIT ?",
        )
        .bind(seq)
        .bind(id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(db("reading the event log"))?;
        rows.into_iter()
            .map(|r| {
                let corrupt = |message: String| StoreError::Corrupt {
                    context: "events",
                    message,
                };
                let occurred_at = parse_ts(r.get(3))?;
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
        rows.into_iter()
            .map(|r| Ok((r.get(0), parse_ts(r.get(1))?)))
            .collect()
    }

    async fn replace_derived(&self, derived: &Derived) -> Result<(), StoreError> {
        let mut tx = self
            .writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db("starting the replay transaction"))?;
        for table in ["clients", "counters", "counter_members"] {
            sqlx::query(&format!("DELETE FROM {table}"))
                .execute(&mut *tx)
                .await
                .map_err(db("wiping derived history"))?;
        }
        for chunk in statement_chunks(&derived.clients, chunk_rows(14)) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "INSERT INTO clients (client_id, version, email, first_name, last_name, \
                 acquisition_channel, marketing_consent, unsubscribed, locale, timezone, \
                 first_seen, last_seen, next_due, state) ",
            );
            q.push_values(chunk, |mut b, c| {
                let p = &c.profile;
                b.push_bind(c.client_id.as_str().to_string())
                    .push_bind(1i64)
                    .push_bind(p.email.clone());
                bind_profile(&mut b, p);
                b.push_bind(c.next_due().map(ts)).push_bind(json(c));
            });
            q.build()
                .execute(&mut *tx)
                .await
                .map_err(db("writing replayed clients"))?;
        }
        for chunk in statement_chunks(&derived.counters, chunk_rows(4)) {
            let mut q =
                QueryBuilder::<Sqlite>::new("INSERT INTO counters (name, period, value, version) ");
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
            let mut q =
                QueryBuilder::<Sqlite>::new("INSERT INTO counter_members (name, period, member) ");
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
            "SELECT client_id FROM clients WHERE next_due IS NOT NULL AND next_due <= ? \
             ORDER BY next_due LIMIT ?",
        )
        .bind(ts(now))
        .bind(limit)
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
            "SELECT client_id FROM clients WHERE client_id > ? ORDER BY client_id LIMIT ?",
        )
        .bind(after.map_or("", |c| c.as_str()))
        .bind(limit)
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
        // same unfinished slot is taken over, with its cursor, once its lease ran out.
        let row = sqlx::query(
            "INSERT INTO schedules (rule, slot, cursor, done, lease_until) VALUES (?1, ?2, NULL, 0, ?3) \
             ON CONFLICT(rule) DO UPDATE SET \
                 cursor = CASE WHEN schedules.slot = excluded.slot THEN schedules.cursor ELSE NULL END, \
                 slot = excluded.slot, done = 0, lease_until = excluded.lease_until \
             WHERE (schedules.slot < excluded.slot AND (schedules.done = 1 OR schedules.lease_until <= ?4)) \
                OR (schedules.slot = excluded.slot AND schedules.done = 0 AND schedules.lease_until <= ?4) \
             RETURNING slot, cursor",
        )
        .bind(rule)
        .bind(ts(slot))
        .bind(ts(lease_until))
        .bind(ts(now))
        .fetch_optional(&self.writer)
        .await
        .map_err(db("claiming a sweep"))?;
        if row.is_some() {
            sqlx::query("INSERT INTO sweep_log (rule, slot) VALUES (?, ?) ON CONFLICT DO NOTHING")
                .bind(rule)
                .bind(ts(slot))
                .execute(&self.writer)
                .await
                .map_err(db("logging a sweep"))?;
        }
        row.map(|r| {
            Ok(SweepClaim {
                slot: parse_ts(r.get(0))?,
                cursor: r
                    .get::<Option<String>, _>(1)
                    .map(stored_client_id)
                    .transpose()?,
            })
        })
        .transpose()
    }

    async fn claim_due(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<OutboxItem>, StoreError> {
        // One statement: the claim is atomic, so two senders never take the
        // same mail; an expired lease (a sender that died) is claimable again.
        // Each kind is read apart, in `outbox_due` order, and stops at the
        // limit: with one `OR` SQLite sorted every due mail at each claim,
        // which under a backlog of thousands took the writer up to 100 ms.
        let rows = sqlx::query(
            "UPDATE outbox SET status = 'sending', lease_until = ?1, attempts = attempts + 1 \
             WHERE key IN (SELECT key FROM ( \
                 SELECT key, due_at FROM (SELECT key, due_at FROM outbox \
                     WHERE status = 'pending' AND due_at <= ?2 ORDER BY due_at LIMIT ?3) \
                 UNION ALL \
                 SELECT key, due_at FROM (SELECT key, due_at FROM outbox \
                     WHERE status = 'sending' AND lease_until <= ?2 ORDER BY due_at LIMIT ?3)) \
                 ORDER BY due_at LIMIT ?3) \
             RETURNING key, rule, client_id, cause, payload, attempts",
        )
        .bind(ts(lease_until))
        .bind(ts(now))
        .bind(limit)
        .fetch_all(&self.writer)
        .await
        .map_err(db("claiming due mails"))?;
        rows.into_iter()
            .map(|r| {
                Ok(OutboxItem {
                    key: r.get(0),
                    rule: r.get(1),
                    client_id: r.get(2),
                    cause: r.get(3),
                    payload: serde_json::from_str(r.get::<&str, _>(4)).map_err(|e| {
                        StoreError::Corrupt {
                            context: "outbox.payload",
                            message: e.to_string(),
                        }
                    })?,
                    attempts: r.get::<i64, _>(5) as u32,
                })
            })
            .collect()
    }

    async fn record_deliveries(&self, outcomes: &[Delivery]) -> Result<(), StoreError> {
        if outcomes.is_empty() {
            return Ok(());
        }
        let mut tx = self
            .writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db("starting to record deliveries"))?;
        let mut log = Vec::new();
        // Mails sent, most of a round, in a few statements rather than one each.
        let sent: Vec<_> = outcomes
            .iter()
            .filter_map(|o| match o {
                Delivery::Sent {
                    key,
                    message_id,
                    at,
                    log: entry,
                } => Some((key, message_id, at, entry)),
                _ => None,
            })
            .collect();
        for chunk in statement_chunks(&sent, chunk_rows(3)) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "UPDATE outbox SET status = 'sent', sent_at = v.column2, message_id = v.column3, \
                 lease_until = NULL, last_error = NULL FROM (",
            );
            q.push_values(chunk, |mut b, (key, message_id, at, _)| {
                b.push_bind(key.as_str())
                    .push_bind(ts(**at))
                    .push_bind(message_id.as_str());
            });
            q.push(") AS v WHERE outbox.key = v.column1");
            q.build()
                .execute(&mut *tx)
                .await
                .map_err(db("recording sent mails"))?;
        }
        log.extend(sent.iter().map(|(.., entry)| *entry));
        for outcome in outcomes {
            let q = match outcome {
                Delivery::Sent { .. } => continue,
                Delivery::Retry { key, due_at, error } => sqlx::query(
                    "UPDATE outbox SET status = 'pending', due_at = ?, lease_until = NULL, \
                     last_error = ? WHERE key = ?",
                )
                .bind(ts(*due_at))
                .bind(error)
                .bind(key),
                Delivery::Failed {
                    key,
                    error,
                    log: entry,
                } => {
                    log.push(entry);
                    sqlx::query(
                        "UPDATE outbox SET status = 'failed', lease_until = NULL, last_error = ? \
                         WHERE key = ?",
                    )
                    .bind(error)
                    .bind(key)
                }
                Delivery::Deferred { key, due_at, why } => sqlx::query(
                    "UPDATE outbox SET status = 'pending', due_at = ?, lease_until = NULL, \
                     attempts = MAX(attempts - 1, 0), last_error = ? WHERE key = ?",
                )
                .bind(ts(*due_at))
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
        self.window.register(owner, items, lease_until);
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
        Ok(self.window.blockers(owners, floor, below, clients, now))
    }

    async fn window_trim(&self, floor: u64) -> Result<(), StoreError> {
        self.window.trim(floor);
        Ok(())
    }
}

fn stored_client_id(s: String) -> Result<ClientId, StoreError> {
    ClientId::parse(s).map_err(|e| StoreError::Corrupt {
        context: "client_id",
        message: e.to_string(),
    })
}
