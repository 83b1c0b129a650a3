//! The consumer window of a database only one process consumes into (SQLite):
//! kept in memory, with the same answers the shared `inflight` table gives on
//! PostgreSQL. One consuming process per SQLite database is what
//! [`ConsumerLock`](super::lock::ConsumerLock) enforces; within it, batches in flight still need the
//! window to apply each client's events in stream order.
//!
//! Held in memory, the window costs no statement at all: on SQLite its
//! table took an insert, an update and a delete per message and the
//! blockers' queries, 17 % of the writer's SQL time, all on the one
//! connection every write waits for.

use crate::store::WindowBlockers;
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

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
    /// See [`crate::store::Window::window_register`].
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

    /// See [`crate::store::Window::window_renew`].
    pub fn renew(&self, seqs: &[u64], lease_until: DateTime<Utc>) {
        let mut slots = self.slots.lock().expect("window lock");
        for seq in seqs {
            if let Some(slot) = slots.get_mut(seq)
                && !slot.done
            {
                slot.lease_until = slot.lease_until.max(lease_until);
            }
        }
    }

    /// See [`crate::store::Window::window_blockers`].
    pub fn blockers(
        &self,
        owners: &[&str],
        mine: &[u64],
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
        let mut stale = false;
        if below > floor + 1 {
            let others = slots.range(floor + 1..below).filter(|(seq, slot)| {
                !slot.done && !owners.contains(&slot.owner.as_str()) && !mine.contains(seq)
            });
            for (seq, slot) in others {
                let expired = slot.lease_until <= now;
                if first_pending == u64::MAX {
                    // In order: the first is the first pending.
                    first_pending = *seq;
                    stale |= expired;
                }
                if let Some(client) = slot.client.as_deref()
                    && clients.contains(client)
                {
                    pending.push((client.to_string(), *seq));
                    stale |= expired;
                }
            }
        }
        WindowBlockers {
            first_gap,
            pending,
            first_pending,
            stale,
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

    /// See [`crate::store::Window::window_trim`].
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
        assert_eq!(w.blockers(&["a"], &[], 10, 20, &[], now).first_gap, 12);
        assert_eq!(w.blockers(&["a"], &[], 12, 20, &[], now).first_gap, 14);
        assert_eq!(w.blockers(&["a"], &[], 10, 12, &[], now).first_gap, 12);
        // Everything from the floor up to the limit is known: no gap.
        assert_eq!(
            w.blockers(&["a"], &[], 10, 11, &[], now).first_gap,
            u64::MAX
        );
        assert_eq!(w.blockers(&["a"], &[], 9, 10, &[], now).first_gap, 10);
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
        // A lease that ran out still holds back, and says it is stale.
        let b = w.blockers(&["c"], &[], 0, 10, &["x"], now);
        assert_eq!(
            b.pending,
            vec![
                ("x".to_string(), 1),
                ("x".to_string(), 3),
                ("x".to_string(), 5)
            ]
        );
        assert!(b.stale);
        assert!(!w.blockers(&["c"], &[], 0, 5, &["x"], now).stale);
        // Renewed, it is live again; a renewal never shortens a lease.
        w.renew(&[5], later);
        w.renew(&[1], now);
        assert!(!w.blockers(&["c"], &[], 0, 10, &["x"], now).stale);
        // Another client's stale message is stale only when it is the first
        // pending (which shared steps wait for).
        w.register("gone", &items(&[(6, "w")]), now);
        assert!(!w.blockers(&["c"], &[], 0, 10, &["x"], now).stale);
        assert!(
            w.blockers(&["a", "b", "dead"], &[], 0, 10, &["x"], now)
                .stale
        );
        // A copy of the batch's own message held by another batch (it was
        // redelivered there meanwhile) holds nothing back, shared steps
        // included.
        let b = w.blockers(&["b", "dead", "gone"], &[1], 0, 10, &["x"], now);
        assert!(b.pending.is_empty(), "{b:?}");
        assert_eq!(b.first_pending, 2, "{b:?}");
        // Its own messages, and those of the batches it commits after, do not.
        let b = w.blockers(&["b", "a", "dead"], &[], 0, 10, &["x", "z"], now);
        assert!(b.pending.is_empty(), "{b:?}");
        // Settled messages no longer hold back; a redelivery does not revive them.
        w.settle(&[1], None);
        w.register("c", &items(&[(1, "x")]), later);
        let b = w.blockers(&["b", "dead"], &[], 0, 10, &["x"], now);
        assert!(b.pending.is_empty(), "{b:?}");
        // Below the limit only.
        let b = w.blockers(&["a"], &[], 0, 3, &["x"], now);
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
}
