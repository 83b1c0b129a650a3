//! Why a batch was not committed, classed once, where the error arises, so
//! that whoever retries the batch (the consumer, the scheduler, a tool)
//! decides on the class and never on wording.

use crate::store::StoreError;

/// A batch that could not be committed, and what that says about it.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The database or the broker cannot serve right now (unreachable,
    /// busy, full, read-only, the ack floor unknown): nothing about the batch
    /// is to blame. Retried as it is.
    #[error("{0}")]
    Transient(#[source] Cause),
    /// Other writers kept changing the same clients or counters through
    /// every attempt. Retried as it is.
    #[error("still conflicting with other writers after {0} attempts")]
    Conflict(usize),
    /// The database works but refused something of this batch (a value it
    /// cannot hold, a row over its limits): one message may be to blame.
    /// After a few attempts the batch is taken apart and a message that
    /// alone is refused is kept as rejected, so the stream goes on.
    #[error("{0}")]
    Poison(#[source] StoreError),
    /// Nothing will commit until an operator acts (a schema that does not
    /// match the statements, an unusable database url): no
    /// message is to blame, so none is set aside. Retried as it is.
    #[error("{0}")]
    Fatal(#[source] StoreError),
}

/// What a transient failure came from.
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    #[error("{0}")]
    Store(#[source] StoreError),
    /// The broker did not say how far the consumer is acked: the order of
    /// the stream cannot be checked, so the batch waits.
    #[error("the broker's ack floor could not be read: {0}")]
    AckFloor(String),
    /// A shared counter could not be read, for a reason not kept.
    #[error("shared counters could not be read: {0}")]
    Counters(String),
}

impl BatchError {
    /// The class as a metric label.
    pub fn class(&self) -> &'static str {
        match self {
            BatchError::Transient(_) => "transient",
            BatchError::Conflict(_) => "conflict",
            BatchError::Poison(_) => "poison",
            BatchError::Fatal(_) => "fatal",
        }
    }

    /// Whether a message of the batch may be to blame.
    pub fn is_poison(&self) -> bool {
        matches!(self, BatchError::Poison(_))
    }
}

impl From<StoreError> for BatchError {
    fn from(e: StoreError) -> Self {
        if e.is_outage() {
            return BatchError::Transient(Cause::Store(e));
        }
        match &e {
            StoreError::Db { source, .. } => match refused(source) {
                Refusal::Data => BatchError::Poison(e),
                Refusal::Schema => BatchError::Fatal(e),
                Refusal::Passing => BatchError::Transient(Cause::Store(e)),
            },
            // A stored row that cannot be read belongs to a client the
            // batch touches: taken apart, only that client's messages stop.
            StoreError::Corrupt { .. } => BatchError::Poison(e),
            StoreError::Migrate(_) | StoreError::Url(_) => BatchError::Fatal(e),
        }
    }
}

/// What a database error that is not an outage says about the statement.
#[derive(Debug, PartialEq)]
enum Refusal {
    /// A value or a row of the batch: the data is to blame.
    Data,
    /// The statement itself, the schema or the driver: nothing in the data.
    Schema,
    /// Of the moment (a serialization failure, a deadlock, a schema change
    /// under a prepared statement): the same statement may pass next time.
    Passing,
}

fn refused(e: &sqlx::Error) -> Refusal {
    use sqlx::Error as E;
    match e {
        E::Database(d) => {
            let code = d.code().unwrap_or_default();
            if d.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                // Primary result codes: SCHEMA (17) passes on a retry;
                // ERROR (1: no such table or column, a syntax error), MISUSE
                // (21) and AUTH (23) are about the statement; the rest
                // (CONSTRAINT, a trigger's RAISE, TOOBIG, MISMATCH...)
                // about what the batch holds.
                match code.parse::<i32>().map(|c| c & 0xff) {
                    Ok(17) => Refusal::Passing,
                    Ok(1 | 21 | 23) => Refusal::Schema,
                    _ => Refusal::Data,
                }
            } else {
                // SQLSTATE classes: 40 transaction rollback (serialization
                // failure, deadlock) passes; 42 (undefined table or column,
                // a syntax error, no privilege), 0A (not supported), 28
                // (authorization), 3D/3F (no such database or schema) and
                // XX (internal) are the statement's or the server's; the
                // rest (22 data exception such as a NUL byte, 23 integrity,
                // 54 a row too large, P0 a trigger's RAISE...) about what
                // the batch holds.
                match code.get(..2) {
                    Some("40") => Refusal::Passing,
                    Some("42" | "0A" | "28" | "3D" | "3F" | "XX") => Refusal::Schema,
                    _ => Refusal::Data,
                }
            }
        }
        E::Encode(_) | E::Decode(_) | E::ColumnDecode { .. } => Refusal::Data,
        _ => Refusal::Schema,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(source: sqlx::Error) -> StoreError {
        StoreError::Db {
            context: "testing",
            source,
        }
    }

    #[test]
    fn classes_follow_what_the_database_said() {
        let outage = db(sqlx::Error::PoolTimedOut);
        assert_eq!(BatchError::from(outage).class(), "transient");
        let decode = db(sqlx::Error::Decode("not a number".into()));
        assert!(BatchError::from(decode).is_poison());
        let missing = db(sqlx::Error::ColumnNotFound("stream_seq".into()));
        assert_eq!(BatchError::from(missing).class(), "fatal");
        let corrupt = StoreError::Corrupt {
            context: "testing",
            message: "unreadable".into(),
        };
        assert!(BatchError::from(corrupt).is_poison());
        let url = StoreError::Url("mysql://".into());
        assert_eq!(BatchError::from(url).class(), "fatal");
    }

    /// What SQLite itself answers, classed.
    #[tokio::test]
    async fn sqlite_refusals_are_classed_by_their_result_code() {
        use sqlx::Executor;
        let pool = sqlx::SqlitePool::connect("sqlite::memory:").await.unwrap();
        pool.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER NOT NULL CHECK (n >= 0))")
            .await
            .unwrap();
        let violates = pool
            .execute("INSERT INTO t (n) VALUES (-1)")
            .await
            .unwrap_err();
        assert!(BatchError::from(db(violates)).is_poison());
        let missing = pool.execute("SELECT * FROM nowhere").await.unwrap_err();
        assert_eq!(BatchError::from(db(missing)).class(), "fatal");
    }
}
