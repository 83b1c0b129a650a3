//! The embedded default backend: SQLite in WAL mode. One writer at a time is
//! SQLite's nature, so write transactions start `IMMEDIATE` (they queue on
//! the busy timeout instead of failing half-way), every write of this
//! process goes through one connection, and each batch is written with
//! multi-row statements (`batch.rs`). One process consumes into a database
//! at a time (`lock.rs`), so the consumer window is kept in its memory
//! (`window.rs`). This file: connecting, upkeep, and the dialect.

pub(crate) mod batch;
pub(crate) mod lock;
pub(crate) mod window;

use super::dialect::{Dialect, STATEMENT_CACHE, chunk_rows, parse_ts, statement_chunks, ts};
use super::queries::{outbox::claim_due_sql, staff::search_sql};
use super::upkeep::{UpkeepTask, spawn_upkeep};
use super::{Pools, StoreError, db};
use chrono::{DateTime, Utc};
use lock::ConsumerLock;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use window::MemoryWindow;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

#[derive(Clone)]
pub(crate) struct SqliteDb {
    /// Connections for reading, many at once (WAL readers never wait).
    pool: SqlitePool,
    /// The one connection every write of this process goes through. SQLite
    /// takes one writer at a time anyway; queueing here rather than on the
    /// database lock hands it over at once (the busy handler polls with
    /// sleeps), and a connection that alone writes keeps its page cache,
    /// which SQLite drops whenever another connection wrote since.
    writer: SqlitePool,
    /// The background checkpointer, stopped when the last copy is dropped.
    _checkpointer: UpkeepTask,
    /// The consumer window: in memory, as one process at a time consumes
    /// into a SQLite database (see [`window`]).
    pub(crate) window: Arc<MemoryWindow>,
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

impl SqliteDb {
    /// Opens the database; with `max_size_mb`, every connection refuses to
    /// grow the file past that size (`PRAGMA max_page_count`), so writes
    /// beyond it fail with SQLITE_FULL, the way they do on a full disk.
    pub(crate) async fn connect(
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

    /// Waits until no other process consumes into this database, and holds
    /// the lock that says this one does (`None`: cancelled while waiting).
    /// An in-memory database is this process's alone.
    pub(crate) async fn consumer_lock(
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

impl Pools for SqliteDb {
    type D = Sqlite;
    fn reader(&self) -> &SqlitePool {
        &self.pool
    }
    fn writer(&self) -> &SqlitePool {
        &self.writer
    }
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, Sqlite>, sqlx::Error> {
        self.writer.begin_with("BEGIN IMMEDIATE").await
    }
    async fn after_erasure(&self) {
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

impl Dialect for Sqlite {
    type Time = String;
    /// SQLite allows 32766 bound parameters per statement; stay well below.
    const MAX_PARAMS: usize = 30_000;
    const JSON: &'static str = "";
    const BYTE_ORDER: &'static str = "";
    const WIPE_DERIVED: &'static [&'static str] = &[
        "DELETE FROM clients",
        "DELETE FROM counters",
        "DELETE FROM counter_members",
        "DELETE FROM exposures",
    ];
    // Without row locks: the one writer connection makes claims atomic.
    const CLAIM_DUE: &'static str = claim_due_sql!("");
    // Case-insensitive in every script, as on PostgreSQL: `Émile` is
    // found by `émile`.
    const SEARCH: &'static str = search_sql!(
        "client_id REGEXP $1 OR coalesce(email, '') REGEXP $1 \
         OR (coalesce(first_name, '') || ' ' || coalesce(last_name, '')) REGEXP $1"
    );

    fn time(t: DateTime<Utc>) -> String {
        ts(t)
    }
    fn read_time(row: &Self::Row, i: usize) -> Result<DateTime<Utc>, StoreError> {
        parse_ts(row.try_get(i).map_err(super::dialect::corrupt_column)?)
    }
    fn read_time_opt(row: &Self::Row, i: usize) -> Result<Option<DateTime<Utc>>, StoreError> {
        let text: Option<&str> = row.try_get(i).map_err(super::dialect::corrupt_column)?;
        text.map(parse_ts).transpose()
    }
    fn read_json(row: &Self::Row, i: usize) -> Result<serde_json::Value, String> {
        match row
            .try_get::<Option<&str>, _>(i)
            .map_err(|e| e.to_string())?
        {
            Some(text) => serde_json::from_str(text).map_err(|e| e.to_string()),
            None => Ok(serde_json::Value::Null),
        }
    }
    fn search_pattern(q: &str) -> String {
        format!("(?i){}", regex_escape(q))
    }
    fn push_in<'a>(q: &mut QueryBuilder<'a, Self>, ids: &'a [&'a str]) {
        q.push(" IN (");
        let mut sep = q.separated(", ");
        for id in ids {
            sep.push_bind(*id);
        }
        q.push(")");
    }
    fn id_chunks<T>(ids: &[T]) -> impl Iterator<Item = &[T]> {
        statement_chunks(ids, chunk_rows::<Self>(1))
    }
    fn migrator() -> &'static sqlx::migrate::Migrator {
        &MIGRATOR
    }
    async fn mark_sent<'c>(
        conn: &'c mut sqlx::SqliteConnection,
        sent: &'c [(&'c str, DateTime<Utc>, &'c str)],
    ) -> Result<(), sqlx::Error> {
        for chunk in statement_chunks(sent, chunk_rows::<Self>(3)) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "UPDATE outbox SET status = 'sent', sent_at = v.column2, message_id = v.column3, \
                 lease_until = NULL, last_error = NULL FROM (",
            );
            q.push_values(chunk, |mut b, (key, at, message_id)| {
                b.push_bind(*key).push_bind(ts(*at)).push_bind(*message_id);
            });
            q.push(") AS v WHERE outbox.key = v.column1");
            q.build().execute(&mut *conn).await?;
        }
        Ok(())
    }
    async fn delete_rejected_naming<'c>(
        conn: &'c mut sqlx::SqliteConnection,
        needles: &'c [String],
    ) -> Result<(), sqlx::Error> {
        for needle in needles {
            sqlx::query(
                "DELETE FROM rejected WHERE instr(payload, $1) > 0 OR instr(reason, $1) > 0",
            )
            .bind(needle)
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }
}
