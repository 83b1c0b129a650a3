//! The consumer window of a database only one process consumes into (SQLite):
//! kept in memory, with the same answers the shared `inflight` table gives on
//! PostgreSQL. One consuming process per SQLite database is what
//! [`ConsumerLock`] enforces; within it, batches in flight still need the
//! window to apply each client's events in stream order.
//!
//! Held in memory, the window costs no statement at all: on SQLite its
//! table took an insert, an update and a delete per message and the
//! blockers' queries, 17 % of the writer's SQL time, all on the one
//! connection every write waits for.

use super::{StoreError, WindowBlockers};
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug)]
struct Slot {
    client: Option<String>,
    owner: String,
    lease_until: DateTime<Utc>,
    done: bool,
}

/// Messages pulled and not yet passed by the ack floor, by stream sequence.
#[derive(Debug, Default)]
pub struct MemoryWindow {
    slots: Mutex<BTreeMap<u64, Slot>>,
}

impl MemoryWindow {
    /// See [`super::Store::window_register`].
    pub fn register(
        &self,
        owner: &str,
        items: &[(u64, Option<String>)],
        lease_until: DateTime<Utc>,
    ) {
        let mut slots = self.slots.lock().expect("window lock");
        for (seq, client) in items {
            match slots.get_mut(seq) {
                // A redelivered message changes hands; one already settled stays so.
                Some(slot) => {
                    if !slot.done {
                        slot.owner = owner.to_string();
                        slot.lease_until = lease_until;
                    }
                }
                None => {
                    slots.insert(
                        *seq,
                        Slot {
                            client: client.clone(),
                            owner: owner.to_string(),
                            lease_until,
                            done: false,
                        },
                    );
                }
            }
        }
    }

    /// See [`super::Store::window_blockers`].
    pub fn blockers(
        &self,
        owners: &[&str],
        floor: u64,
        below: u64,
        clients: &[&str],
        now: DateTime<Utc>,
    ) -> WindowBlockers {
        let slots = self.slots.lock().expect("window lock");
        // The first sequence above the floor nobody registered, if below `below`.
        let mut first_gap = u64::MAX;
        let mut s = floor;
        loop {
            if !slots.contains_key(&(s + 1)) {
                first_gap = s + 1;
                break;
            }
            s += 1;
            if s >= below {
                break;
            }
        }
        let clients: HashSet<&str> = clients.iter().copied().collect();
        let mut first_pending = u64::MAX;
        let mut pending = Vec::new();
        if below > floor + 1 {
            let others = slots.range(floor + 1..below).filter(|(_, slot)| {
                !slot.done && slot.lease_until > now && !owners.contains(&slot.owner.as_str())
            });
            for (seq, slot) in others {
                first_pending = first_pending.min(*seq);
                if let Some(client) = slot.client.as_deref()
                    && clients.contains(client)
                {
                    pending.push((client.to_string(), *seq));
                }
            }
        }
        WindowBlockers {
            first_gap,
            pending,
            first_pending,
        }
    }

    /// Marks messages of a committed batch as settled, then forgets those at
    /// or below `floor` (as the batch transaction does with the table).
    pub fn settle(&self, settled: &[u64], floor: Option<u64>) {
        let mut slots = self.slots.lock().expect("window lock");
        for seq in settled {
            if let Some(slot) = slots.get_mut(seq) {
                slot.done = true;
            }
        }
        if let Some(floor) = floor {
            trim(&mut slots, floor);
        }
    }

    /// See [`super::Store::window_trim`].
    pub fn trim(&self, floor: u64) {
        trim(&mut self.slots.lock().expect("window lock"), floor);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots.lock().expect("window lock").len()
    }
}

fn trim(slots: &mut BTreeMap<u64, Slot>, floor: u64) {
    *slots = slots.split_off(&(floor.saturating_add(1)));
}

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

    fn items(seqs: &[(u64, &str)]) -> Vec<(u64, Option<String>)> {
        seqs.iter()
            .map(|(s, c)| (*s, Some(c.to_string())))
            .collect()
    }

    #[test]
    fn the_first_gap_is_the_first_unknown_sequence_below_the_limit() {
        let w = MemoryWindow::default();
        let later = Utc::now() + chrono::Duration::seconds(30);
        w.register("a", &items(&[(11, "x"), (13, "y")]), later);
        let now = Utc::now();
        assert_eq!(w.blockers(&["a"], 10, 20, &[], now).first_gap, 12);
        assert_eq!(w.blockers(&["a"], 12, 20, &[], now).first_gap, 14);
        assert_eq!(w.blockers(&["a"], 10, 12, &[], now).first_gap, 12);
        // Everything from the floor up to the limit is known: no gap.
        assert_eq!(w.blockers(&["a"], 10, 11, &[], now).first_gap, u64::MAX);
        assert_eq!(w.blockers(&["a"], 9, 10, &[], now).first_gap, 10);
    }

    #[test]
    fn only_other_batches_pending_messages_of_these_clients_hold_back() {
        let w = MemoryWindow::default();
        let now = Utc::now();
        let later = now + chrono::Duration::seconds(30);
        w.register("a", &items(&[(1, "x"), (2, "y")]), later);
        w.register("b", &items(&[(3, "x"), (4, "z")]), later);
        w.register(
            "dead",
            &items(&[(5, "x")]),
            now - chrono::Duration::seconds(1),
        );
        let b = w.blockers(&["c"], 0, 10, &["x"], now);
        assert_eq!(b.pending, vec![("x".to_string(), 1), ("x".to_string(), 3)]);
        // Its own messages, and those of the batches it commits after, do not.
        let b = w.blockers(&["b", "a"], 0, 10, &["x", "z"], now);
        assert!(b.pending.is_empty(), "{b:?}");
        // Settled messages no longer hold back; a redelivery does not revive them.
        w.settle(&[1], None);
        w.register("c", &items(&[(1, "x")]), later);
        let b = w.blockers(&["b"], 0, 10, &["x"], now);
        assert!(b.pending.is_empty(), "{b:?}");
        // Below the limit only.
        let b = w.blockers(&["a"], 0, 3, &["x"], now);
        assert!(b.pending.is_empty(), "{b:?}");
    }

    #[test]
    fn the_floor_forgets_what_it_passed() {
        let w = MemoryWindow::default();
        let later = Utc::now() + chrono::Duration::seconds(30);
        w.register("a", &items(&[(1, "x"), (2, "y"), (3, "z")]), later);
        w.settle(&[1, 2], Some(2));
        assert_eq!(w.len(), 1);
        w.trim(3);
        assert_eq!(w.len(), 0);
    }

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
