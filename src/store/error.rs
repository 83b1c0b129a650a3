//! What can go wrong in the store, and which failures are the database
//! being away rather than the data being at fault.

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error while {context}: {source}")]
    Db {
        context: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is corrupt ({context}): {message}")]
    Corrupt {
        context: &'static str,
        message: String,
    },
    #[error("unsupported database url {0:?}")]
    Url(String),
}

impl StoreError {
    /// The database as a whole cannot serve this right now: unreachable,
    /// refusing connections, locked by another writer past the busy timeout,
    /// out of space, read-only, or shutting down. Nothing about the data is to
    /// blame, so the same work is to be retried as it is, never set aside.
    pub fn is_outage(&self) -> bool {
        match self {
            StoreError::Db { source, .. } => sqlx_outage(source),
            StoreError::Migrate(sqlx::migrate::MigrateError::Execute(e)) => sqlx_outage(e),
            _ => false,
        }
    }
}

fn sqlx_outage(e: &sqlx::Error) -> bool {
    use sqlx::Error as E;
    match e {
        E::Io(_)
        | E::Tls(_)
        | E::Protocol(_)
        | E::PoolTimedOut
        | E::PoolClosed
        | E::WorkerCrashed => true,
        E::Database(d) => {
            let code = d.code().unwrap_or_default();
            if d.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                // Primary result codes: BUSY, LOCKED, NOMEM, READONLY,
                // INTERRUPT, IOERR, CORRUPT, FULL, CANTOPEN, PROTOCOL, NOTADB.
                code.parse::<i32>()
                    .is_ok_and(|c| [5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 26].contains(&(c & 0xff)))
            } else {
                // SQLSTATE classes: connection exception, insufficient
                // resources (disk full, out of memory, too many connections),
                // operator intervention (shutdown, terminated, cannot connect
                // now), system error; a read-only transaction; a database
                // not accepting connections.
                ["08", "53", "57", "58"].iter().any(|c| code.starts_with(c))
                    || code == "25006"
                    || code == "55000"
            }
        }
        _ => false,
    }
}

pub(crate) fn db(context: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Db { context, source }
}
