//! What the analytics export (`nudge export`, `tools::export`) reads: one
//! read-only snapshot of the database, from which it streams rows of any
//! query, decoded to plain [`Cell`]s by the column types the caller names.
//! Everything a run reads goes through the one [`Snapshot`], so a run sees
//! the database as of one moment while the daemon goes on writing: on
//! SQLite a read transaction (WAL keeps its snapshot), on PostgreSQL a
//! `REPEATABLE READ READ ONLY` transaction. Rows are streamed, never
//! collected, so memory does not grow with the tables.

use crate::store::dialect::Dialect;
use crate::store::{AnyStore, Db, Pools, StoreError, db};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use sqlx::{ConnectOptions, PgConnection, Row, SqliteConnection};
use std::collections::HashSet;

/// Rows streamed between two yields to the runtime.
const YIELD_EVERY: u64 = 1024;

/// How a query's column is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColType {
    Text,
    Int,
    Float,
    Bool,
    Time,
    /// JSON text: the query selects it `CAST(... AS TEXT)`.
    Json,
}

/// One value of an exported row; SQL NULL is [`Cell::Null`].
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Text(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Time(DateTime<Utc>),
}

/// A statement in each backend's words (most are the same text; JSON
/// access differs).
#[derive(Debug, Clone, Copy)]
pub struct Sql {
    pub sqlite: &'static str,
    pub postgres: &'static str,
}

impl Sql {
    /// A statement both databases run as it is.
    pub const fn same(text: &'static str) -> Sql {
        Sql {
            sqlite: text,
            postgres: text,
        }
    }
}

/// A consistent, read-only view of the whole database for one export run.
pub struct Snapshot(Tx);

/// A connection inside its read transaction.
enum Tx {
    Sqlite(SqliteConnection),
    Postgres(PgConnection),
}

/// Runs `$body` with `$tx` bound to the snapshot's transaction, `$D`
/// naming its dialect (as [`crate::store::shared`] does for the store) and
/// `$sql` picking a [`Sql`]'s text for it.
macro_rules! on_tx {
    ($snap:expr, |$tx:ident, $D:ident, $sql:ident| $body:expr) => {
        match &mut $snap.0 {
            Tx::Sqlite($tx) => {
                #[allow(unused)]
                type $D = sqlx::Sqlite;
                #[allow(unused)]
                let $sql = |s: &Sql| s.sqlite;
                $body
            }
            Tx::Postgres($tx) => {
                #[allow(unused)]
                type $D = sqlx::Postgres;
                #[allow(unused)]
                let $sql = |s: &Sql| s.postgres;
                $body
            }
        }
    };
}

impl AnyStore {
    /// Opens a snapshot for an export, on a connection of its own (with the
    /// pool's settings) that logs no statement: the export's one long
    /// statement is long by design, not a slow query to warn about. The
    /// daemon's writes go on meanwhile (on SQLite the WAL file grows until
    /// the snapshot ends, as with any long reader). Dropping the snapshot
    /// closes the connection, which ends the transaction.
    pub async fn export_snapshot(&self) -> Result<Snapshot, StoreError> {
        let opening = db("opening the export's read");
        let tx = match &self.0 {
            Db::Sqlite(s) => {
                let mut conn = quiet(s.reader()).connect().await.map_err(opening)?;
                // A deferred transaction takes its snapshot at the first
                // read: take it now, before anything else is asked.
                for sql in ["BEGIN", "SELECT count(*) FROM meta"] {
                    sqlx::query(sql)
                        .execute(&mut conn)
                        .await
                        .map_err(db("starting the export's read"))?;
                }
                Tx::Sqlite(conn)
            }
            Db::Postgres(s) => {
                let mut conn = quiet(s.reader()).connect().await.map_err(opening)?;
                sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    .execute(&mut conn)
                    .await
                    .map_err(db("starting the export's read"))?;
                Tx::Postgres(conn)
            }
        };
        Ok(Snapshot(tx))
    }
}

/// The pool's connection settings, without statement logging.
fn quiet<D: sqlx::Database>(pool: &sqlx::Pool<D>) -> <D::Connection as sqlx::Connection>::Options {
    (*pool.connect_options())
        .clone()
        .disable_statement_logging()
}

impl Snapshot {
    /// The highest stream sequence stored (0 for none).
    pub async fn last_seq(&mut self) -> Result<i64, StoreError> {
        let n: Option<i64> = on_tx!(self, |tx, D, text_of| sqlx::query_scalar(
            "SELECT MAX(stream_seq) FROM events"
        )
        .fetch_one(&mut *tx)
        .await
        .map_err(db("reading the last stream sequence"))?);
        Ok(n.unwrap_or(0))
    }

    /// The sequence just before the first stored event that occurred at or
    /// after `t` (`--since T`), or the last sequence when there is none.
    pub async fn seq_before(&mut self, t: DateTime<Utc>) -> Result<i64, StoreError> {
        let first: Option<i64> = on_tx!(self, |tx, D, text_of| sqlx::query_scalar(
            "SELECT MIN(stream_seq) FROM events WHERE occurred_at >= $1"
        )
        .bind(D::time(t))
        .fetch_one(&mut *tx)
        .await
        .map_err(db("finding the first event since a time"))?);
        match first {
            Some(seq) => Ok(seq - 1),
            None => self.last_seq().await,
        }
    }

    /// Hashes ([`crate::store::erasure_hash`]) of the erased clients.
    pub async fn erased(&mut self) -> Result<HashSet<String>, StoreError> {
        let rows: Vec<String> = on_tx!(self, |tx, D, text_of| sqlx::query_scalar(
            "SELECT client_id FROM erasures"
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(db("reading erasures"))?);
        Ok(rows.into_iter().collect())
    }

    /// Streams the rows of `sql` (its `$1`, `$2`... bound to `params`),
    /// each decoded by `types` (one per selected column), into `sink`; the
    /// first error of the sink ends the walk and is returned. Returns the
    /// number of rows read.
    pub async fn stream<E>(
        &mut self,
        sql: &Sql,
        params: &[i64],
        types: &[ColType],
        sink: &mut (dyn FnMut(Vec<Cell>) -> Result<(), E> + Send),
    ) -> Result<u64, StreamError<E>> {
        let mut n = 0u64;
        on_tx!(self, |tx, D, text_of| {
            let mut q = sqlx::query(text_of(sql));
            for p in params {
                q = q.bind(*p);
            }
            let mut rows = q.fetch(&mut *tx);
            while let Some(row) = rows
                .try_next()
                .await
                .map_err(|e| StreamError::Store(db("reading rows to export")(e)))?
            {
                let mut cells = Vec::with_capacity(types.len());
                for (i, ty) in types.iter().enumerate() {
                    cells.push(cell::<D>(&row, i, *ty).map_err(StreamError::Store)?);
                }
                n += 1;
                sink(cells).map_err(StreamError::Sink)?;
                // Rows are often ready without waiting: give the runtime's
                // other tasks (the daemon's, when it exports on schedule)
                // their turn now and then.
                if n.is_multiple_of(YIELD_EVERY) {
                    tokio::task::yield_now().await;
                }
            }
        });
        Ok(n)
    }
}

/// Why [`Snapshot::stream`] stopped.
#[derive(Debug)]
pub enum StreamError<E> {
    Store(StoreError),
    Sink(E),
}

/// Column `i` of `row` as `ty` says.
fn cell<D>(row: &D::Row, i: usize, ty: ColType) -> Result<Cell, StoreError>
where
    D: Dialect,
    for<'r> i64: sqlx::Decode<'r, D> + sqlx::Type<D>,
    for<'r> f64: sqlx::Decode<'r, D> + sqlx::Type<D>,
    for<'r> bool: sqlx::Decode<'r, D> + sqlx::Type<D>,
    for<'r> String: sqlx::Decode<'r, D> + sqlx::Type<D>,
    usize: sqlx::ColumnIndex<D::Row>,
{
    let bad = crate::store::dialect::corrupt_column;
    Ok(match ty {
        ColType::Text | ColType::Json => row
            .try_get::<Option<String>, _>(i)
            .map_err(bad)?
            .map_or(Cell::Null, Cell::Text),
        ColType::Int => row
            .try_get::<Option<i64>, _>(i)
            .map_err(bad)?
            .map_or(Cell::Null, Cell::Int),
        ColType::Float => row
            .try_get::<Option<f64>, _>(i)
            .map_err(bad)?
            .map_or(Cell::Null, Cell::Float),
        ColType::Bool => row
            .try_get::<Option<bool>, _>(i)
            .map_err(bad)?
            .map_or(Cell::Null, Cell::Bool),
        ColType::Time => D::read_time_opt(row, i)?.map_or(Cell::Null, Cell::Time),
    })
}
