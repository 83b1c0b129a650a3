//! Batches of one instance decided ahead of their predecessor's commit.
//!
//! One batch at a time leaves a core idle: while a batch's transaction is
//! written, nothing is decided, and while it is decided, nothing is written.
//! So the next batch is loaded and decided while the one before it commits,
//! on top of what that one decided: the client states and shared counters a
//! batch wrote are kept here as *pending* until its commit, and a later batch
//! reads them instead of the database's older rows.
//!
//! What a batch decided on pending values holds only if they were committed
//! as they were decided. Batches commit in the order they were pulled (each
//! waits for its predecessor's [`Turn`]), and a batch whose pending values
//! did not commit as decided (a conflict with another writer, held-back
//! events, an error) withdraws them and moves the [`Chain`]'s generation on:
//! every batch that read while that generation held decides again from the
//! database. Versions in the database only ever grow, so a state read from
//! the database is checked by the commit's compare-and-swap as before; only
//! pending values, whose version numbers a different commit could take,
//! need the generation.

use crate::domain::counters::{CounterKey, Stored};
use crate::domain::event::ClientId;
use crate::domain::history::ClientState;
use crate::store::BatchWrite;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// The pending values of the batches in flight, shared by one instance's
/// ingest.
#[derive(Default)]
pub struct Chain {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Moves on whenever pending values are withdrawn.
    generation: u64,
    /// Client states as their batch (by [`Turn`] ordinal) will commit
    /// them, with the version the database will hold (the state itself
    /// carries the one it was loaded at).
    states: HashMap<ClientId, (u64, i64, Arc<ClientState>)>,
    counters: HashMap<CounterKey, (u64, Stored)>,
    members: HashMap<(CounterKey, String), u64>,
    /// The consumer-window owners of the batches in flight, by ordinal.
    owners: std::collections::BTreeMap<u64, String>,
    /// Where the last turn handed out lets the next one go on.
    last_turn: Option<(oneshot::Receiver<Seen>, oneshot::Receiver<()>)>,
    /// The last turn's ordinal.
    ordinal: u64,
}

/// What a batch saw of the chain when it began to read: its values hold if
/// the generation has not moved when its turn comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    generation: u64,
}

/// Pending client states, to lay over states loaded from the database.
#[derive(Debug, Default)]
pub struct Pending(HashMap<ClientId, ClientState>);

impl Pending {
    /// Replaces each loaded state by its pending one where that is newer.
    /// Clients the database does not know yet come back as pending too.
    pub fn apply(self, states: &mut HashMap<ClientId, ClientState>) {
        for (id, pending) in self.0 {
            let newer = states
                .get(&id)
                .is_none_or(|loaded| loaded.version < pending.version);
            if newer {
                states.insert(id, pending);
            }
        }
    }
}

/// A batch's pending values: withdrawn when dropped unless committed.
pub struct Published<'a> {
    chain: &'a Chain,
    batch: u64,
    committed: bool,
}

impl Chain {
    /// The next batch's turn: every batch of the instance (ingest's, and
    /// the scheduler's timers and sweeps) takes one, so none of them decides
    /// on values another of them is about to change.
    pub fn next_turn(&self) -> Turn {
        let mut inner = self.lock();
        let (decided, next_decided) = oneshot::channel();
        let (done, next_done) = oneshot::channel();
        let (after_decided, after_done) =
            inner.last_turn.replace((next_decided, next_done)).unzip();
        inner.ordinal += 1;
        Turn {
            ordinal: inner.ordinal,
            after_decided,
            after_done,
            decided: Some(decided),
            done: Some(done),
        }
    }

    /// Marks the start of a batch's reads.
    pub fn seen(&self) -> Seen {
        Seen {
            generation: self.lock().generation,
        }
    }

    /// True if nothing read since `seen` was withdrawn.
    pub fn holds(&self, seen: Seen) -> bool {
        self.lock().generation == seen.generation
    }

    /// The pending states of these clients, taken before the database is
    /// read: a batch that commits in between has retired its values by the
    /// time the database shows them, so nothing falls between the two.
    /// Only batches before `turn` count: a later one may have decided
    /// without this batch's values, and its own are checked when it commits.
    pub fn pending(&self, ids: &[&ClientId], turn: &Turn) -> Pending {
        let inner = self.lock();
        if inner.states.is_empty() {
            return Pending::default();
        }
        Pending(
            ids.iter()
                .filter_map(|id| inner.states.get(*id))
                .filter(|(b, ..)| *b < turn.ordinal)
                .map(|(_, version, s)| {
                    let mut s = ClientState::clone(s);
                    s.version = *version;
                    (s.client_id.clone(), s)
                })
                .collect(),
        )
    }

    /// The pending value of a shared counter, if a batch in flight before
    /// the `turn`-th wrote it.
    pub fn counter(&self, key: &CounterKey, turn: u64) -> Option<Stored> {
        let inner = self.lock();
        let (b, s) = inner.counters.get(key)?;
        (*b < turn).then_some(*s)
    }

    /// The pending rows of the counter family `name` that batches in flight
    /// before the `turn`-th wrote, as `(period, stored)`.
    pub fn family(&self, name: &str, turn: u64) -> Vec<(String, Stored)> {
        self.lock()
            .counters
            .iter()
            .filter(|(k, (b, _))| k.name == name && *b < turn)
            .map(|(k, (_, s))| (k.period.clone(), *s))
            .collect()
    }

    /// True if a batch in flight before the `turn`-th added `member` to the
    /// distinct counter.
    pub fn is_member(&self, key: &CounterKey, member: &str, turn: u64) -> bool {
        self.lock()
            .members
            .get(&(key.clone(), member.to_string()))
            .is_some_and(|b| *b < turn)
    }

    /// Makes what a decided batch will write visible to the batches after it.
    pub fn publish(&self, turn: &Turn, write: &BatchWrite) -> Published<'_> {
        let batch = turn.ordinal;
        let mut inner = self.lock();
        for c in &write.clients {
            inner
                .states
                .insert(c.client_id.clone(), (batch, c.version + 1, c.clone()));
        }
        for c in &write.counters {
            let stored = Stored {
                value: c.value,
                version: c.version + 1,
            };
            inner.counters.insert(c.key.clone(), (batch, stored));
        }
        for m in &write.members {
            inner.members.insert(m.clone(), batch);
        }
        Published {
            chain: self,
            batch,
            committed: false,
        }
    }

    /// Records the window owner of a batch in flight until the returned
    /// guard is dropped.
    pub fn enter(&self, turn: &Turn, owner: &str) -> Entered<'_> {
        self.lock().owners.insert(turn.ordinal, owner.to_string());
        Entered {
            chain: self,
            ordinal: turn.ordinal,
            committed: false,
        }
    }

    /// The window owners of the batches in flight before `turn`: their
    /// messages hold nothing of it back, since it commits after them (or,
    /// if one gives up, decides again).
    pub fn owners_before(&self, turn: &Turn) -> Vec<String> {
        self.lock()
            .owners
            .range(..turn.ordinal)
            .map(|(_, o)| o.clone())
            .collect()
    }

    /// The window owners of the batches in flight after `turn`: they commit
    /// after it, so it cannot wait for their messages (a message redelivered
    /// to this instance is pulled, and chained, after the batches waiting
    /// for it).
    pub fn owners_after(&self, turn: &Turn) -> Vec<String> {
        self.lock()
            .owners
            .range(turn.ordinal + 1..)
            .map(|(_, o)| o.clone())
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain maps behind: usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets a batch's values (a later batch's values for the same keys
    /// stay); moves the generation on when they did not commit.
    fn retire(&self, batch: u64, committed: bool) {
        let mut inner = self.lock();
        inner.states.retain(|_, (b, ..)| *b != batch);
        inner.counters.retain(|_, (b, _)| *b != batch);
        inner.members.retain(|_, b| *b != batch);
        if !committed {
            inner.generation += 1;
        }
    }
}

impl Published<'_> {
    /// The batch committed what it published: the database holds it now.
    pub fn committed(mut self) {
        self.committed = true;
    }
}

impl Drop for Published<'_> {
    fn drop(&mut self) {
        self.chain.retire(self.batch, self.committed);
    }
}

/// A batch in flight, known by its window owner until dropped. The
/// batches after it do not wait for its messages in the window, so if it
/// gives up without committing them all, the generation moves on and they
/// decide again, waiting as they should.
pub struct Entered<'a> {
    chain: &'a Chain,
    ordinal: u64,
    committed: bool,
}

impl Entered<'_> {
    /// Every event of the batch is committed.
    pub fn committed(mut self) {
        self.committed = true;
    }
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        let mut inner = self.chain.lock();
        inner.owners.remove(&self.ordinal);
        if !self.committed {
            inner.generation += 1;
        }
    }
}

/// A batch's place in its instance's order: it may decide once the batch
/// before it has decided (so that it reads that one's values), and commit
/// once that one has committed; it says so to the next batch at each step,
/// or when dropped (given up).
#[derive(Debug, Default)]
pub struct Turn {
    /// The batch's place in its chain's sequence, from 1 (0: none).
    ordinal: u64,
    after_decided: Option<oneshot::Receiver<Seen>>,
    after_done: Option<oneshot::Receiver<()>>,
    decided: Option<oneshot::Sender<Seen>>,
    done: Option<oneshot::Sender<()>>,
}

impl Turn {
    /// True for a batch in a sequence (the only kind that may decide ahead).
    pub fn is_chained(&self) -> bool {
        self.done.is_some()
    }

    pub fn ordinal(&self) -> u64 {
        self.ordinal
    }

    /// Waits until the batch before has decided (or committed, or given
    /// up). Returns what it saw of the chain when it let this one go on:
    /// should its values be withdrawn later, even before this batch reads,
    /// the generation will have moved past it.
    pub async fn wait_decided(&mut self) -> Option<Seen> {
        // A dropped sender is a predecessor that gave up: go on.
        self.after_decided.take()?.await.ok()
    }

    /// Waits until the batch before has committed or given up.
    pub async fn wait(&mut self) {
        self.wait_decided().await;
        if let Some(after) = self.after_done.take() {
            let _ = after.await;
        }
    }

    /// Lets the next batch decide on top of this one's published values,
    /// as they stand at `seen`.
    pub fn decided(&mut self, seen: Seen) {
        if let Some(decided) = self.decided.take() {
            let _ = decided.send(seen);
        }
    }

    /// Lets the next batch decide and commit.
    pub fn finish(&mut self) {
        // Dropped: the next batch reads the chain as it finds it.
        self.decided = None;
        self.after_decided = None;
        self.after_done = None;
        if let Some(done) = self.done.take() {
            let _ = done.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::counters::CounterWrite;

    fn client(id: &str, version: i64) -> ClientState {
        let mut s = ClientState::new(ClientId::parse(id).unwrap());
        s.version = version;
        s
    }

    fn key() -> CounterKey {
        CounterKey {
            name: "big".into(),
            period: "2026-Q4".into(),
        }
    }

    #[test]
    fn pending_states_and_counters_are_seen_until_committed() {
        let chain = Chain::default();
        let write = BatchWrite {
            clients: vec![client("a", 3).into()],
            counters: vec![CounterWrite {
                key: key(),
                version: 7,
                value: 12.0,
            }],
            members: vec![(key(), "a".into())],
            ..Default::default()
        };
        let (first, second) = (chain.next_turn(), chain.next_turn());
        let seen = chain.seen();
        let published = chain.publish(&first, &write);
        let a = ClientId::parse("a").unwrap();
        let b = ClientId::parse("b").unwrap();
        let mut states = HashMap::from([(a.clone(), client("a", 3)), (b.clone(), client("b", 1))]);
        let mut own = states.clone();
        chain.pending(&[&a, &b], &first).apply(&mut own);
        assert_eq!(own[&a].version, 3, "a batch does not read its own values");
        chain.pending(&[&a, &b], &second).apply(&mut states);
        assert_eq!(
            states[&a].version, 4,
            "the pending state, at its next version"
        );
        assert_eq!(states[&b].version, 1);
        let stored = Stored {
            value: 12.0,
            version: 8,
        };
        assert_eq!(chain.counter(&key(), second.ordinal()), Some(stored));
        assert_eq!(chain.counter(&key(), first.ordinal()), None);
        assert!(chain.is_member(&key(), "a", second.ordinal()));
        published.committed();
        assert!(chain.holds(seen), "committed as decided");
        assert_eq!(
            chain.counter(&key(), second.ordinal()),
            None,
            "the database has it now"
        );
        assert!(!chain.is_member(&key(), "a", second.ordinal()));
    }

    #[test]
    fn a_loaded_state_newer_than_the_pending_one_wins() {
        let chain = Chain::default();
        let (first, second) = (chain.next_turn(), chain.next_turn());
        let _published = chain.publish(
            &first,
            &BatchWrite {
                clients: vec![client("a", 3).into()],
                ..Default::default()
            },
        );
        let a = ClientId::parse("a").unwrap();
        let mut states = HashMap::from([(a.clone(), client("a", 9))]);
        chain.pending(&[&a], &second).apply(&mut states);
        assert_eq!(states[&a].version, 9);
    }

    #[test]
    fn withdrawn_values_move_the_generation_on() {
        let chain = Chain::default();
        let (one, two, three) = (chain.next_turn(), chain.next_turn(), chain.next_turn());
        let seen = chain.seen();
        let first = chain.publish(
            &one,
            &BatchWrite {
                clients: vec![client("a", 3).into()],
                ..Default::default()
            },
        );
        let second = chain.publish(
            &two,
            &BatchWrite {
                clients: vec![client("b", 1).into()],
                ..Default::default()
            },
        );
        drop(first);
        assert!(!chain.holds(seen));
        let b = ClientId::parse("b").unwrap();
        let mut states = HashMap::new();
        chain.pending(&[&b], &three).apply(&mut states);
        assert_eq!(states[&b].version, 2, "a later batch's values stay");
        let a = ClientId::parse("a").unwrap();
        let mut states = HashMap::new();
        chain.pending(&[&a], &three).apply(&mut states);
        assert!(states.is_empty());
        second.committed();
    }

    #[test]
    fn a_batch_in_flight_that_gives_up_moves_the_generation_on() {
        let chain = Chain::default();
        let (one, two, three) = (chain.next_turn(), chain.next_turn(), chain.next_turn());
        let first = chain.enter(&one, "o1");
        let second = chain.enter(&two, "o2");
        assert_eq!(chain.owners_before(&three), vec!["o1", "o2"]);
        assert_eq!(chain.owners_before(&two), vec!["o1"]);
        assert_eq!(chain.owners_after(&one), vec!["o2"]);
        assert!(chain.owners_after(&two).is_empty());
        let seen = chain.seen();
        first.committed();
        assert!(chain.holds(seen));
        assert_eq!(chain.owners_before(&three), vec!["o2"]);
        drop(second);
        assert!(!chain.holds(seen), "its messages were passed over");
        assert!(chain.owners_before(&three).is_empty());
    }

    #[tokio::test]
    async fn turns_follow_one_another() {
        let chain = Chain::default();
        let next = || chain.next_turn();
        let mut first = next();
        let mut second = next();
        assert!(first.is_chained());
        first.wait().await;
        let (tx, mut decided) = tokio::sync::mpsc::unbounded_channel();
        let waiting = tokio::spawn(async move {
            tx.send(second.wait_decided().await).unwrap();
            second.wait().await;
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(
            decided.try_recv().is_err(),
            "the second waits for the first to decide"
        );
        let seen = Chain::default().seen();
        first.decided(seen);
        assert_eq!(decided.recv().await.unwrap(), Some(seen));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "and to commit");
        first.finish();
        waiting.await.unwrap();
        // A batch that gives up (dropped) lets the next go on too.
        let third = next();
        let mut fourth = next();
        drop(third);
        assert_eq!(fourth.wait_decided().await, None);
        fourth.wait().await;
    }
}
