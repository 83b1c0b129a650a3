//! One consuming process per SQLite database: its consumer window lives in
//! that process's memory ([`super::window`]).

use crate::store::StoreError;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Held while this process consumes the stream. Into a SQLite file: an
/// advisory lock on a file beside the database, released when dropped or
/// when the process ends, however it ends. Where instances share the window
/// in the database (PostgreSQL), or nobody else can open it (in memory):
/// nothing to hold.
#[derive(Debug)]
pub struct ConsumerLock {
    _file: Option<std::fs::File>,
}

impl ConsumerLock {
    /// For a database any number of processes may consume into.
    pub fn shared() -> Self {
        Self { _file: None }
    }

    /// The lock file of the database at `db`: beside the file itself, so
    /// that every path to it (relative, through a link) finds the same lock.
    pub fn path_for(db: &Path) -> PathBuf {
        let db = std::fs::canonicalize(db).unwrap_or_else(|_| db.to_path_buf());
        let mut name = db.into_os_string();
        name.push("-consumer.lock");
        PathBuf::from(name)
    }

    /// Takes the lock if no other process holds it; `None` if one does.
    pub fn try_take(db: &Path) -> Result<Option<Self>, StoreError> {
        let path = Self::path_for(db);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| StoreError::Db {
                context: "opening the consumer lock file",
                source: sqlx::Error::Io(e),
            })?;
        match file.try_lock() {
            Ok(()) => Ok(Some(Self { _file: Some(file) })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(StoreError::Db {
                context: "locking the consumer lock file",
                source: sqlx::Error::Io(e),
            }),
        }
    }

    /// Takes the lock, waiting as long as another process holds it (a
    /// standby instance, or the next one of a restart while the last one
    /// still finishes its batches). `None` once `cancel` is cancelled.
    /// `standing_by` is told when the wait begins (true) and ends (false).
    pub async fn take(
        db: &Path,
        cancel: &CancellationToken,
        standing_by: &(dyn Fn(bool) + Sync),
    ) -> Option<Self> {
        let (mut told, mut failing) = (false, false);
        loop {
            match Self::try_take(db) {
                Ok(Some(lock)) => {
                    if told {
                        tracing::info!(lock = %Self::path_for(db).display(), "the other instance stopped: consuming now");
                        standing_by(false);
                    }
                    return Some(lock);
                }
                Ok(None) if !told => {
                    tracing::warn!(
                        lock = %Self::path_for(db).display(),
                        "another nudge process consumes into this SQLite database; \
                         standing by until it stops (run several instances on PostgreSQL)"
                    );
                    told = true;
                    standing_by(true);
                }
                Ok(None) => {}
                // A directory not writable yet (a volume still mounting):
                // retried like a broker that is not up yet.
                Err(e) if !failing => {
                    tracing::warn!(error = %e, "cannot take the consumer lock; retrying");
                    failing = true;
                }
                Err(_) => {}
            }
            tokio::select! {
                _ = cancel.cancelled() => return None,
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_process_at_a_time_holds_the_consumer_lock() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("nudge.db");
        let first = ConsumerLock::try_take(&db).unwrap().expect("free at first");
        assert!(ConsumerLock::try_take(&db).unwrap().is_none());
        drop(first);
        assert!(ConsumerLock::try_take(&db).unwrap().is_some());
    }

    #[cfg(unix)]
    #[test]
    fn a_link_to_the_database_finds_the_same_lock() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("nudge.db");
        std::fs::write(&db, b"").unwrap();
        let link = dir.path().join("link.db");
        std::os::unix::fs::symlink(&db, &link).unwrap();
        let _held = ConsumerLock::try_take(&db).unwrap().expect("free at first");
        assert!(ConsumerLock::try_take(&link).unwrap().is_none());
    }
}
