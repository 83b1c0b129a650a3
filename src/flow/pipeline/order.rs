//! Deciding a batch of the stream in the stream's order, whatever other
//! batches and instances hold: the consumer's window says which earlier
//! messages are still pending, and a batch commits the part of it that
//! none of them holds back.

use super::steps::{Step, ordered_steps, split_before};
use super::{BatchReport, Incoming, Outcome, Pipeline, Work};
use crate::flow::chain::Turn;
use crate::flow::error::{BatchError, Cause};
use crate::store::{StoredEvent, Window as _, WindowBlockers};
use chrono::Utc;
use std::collections::{HashMap, HashSet};

/// The first stream sequence below which every message is settled as far as
/// this batch knows: none unannounced (a gap), none pending in another
/// instance's batch, and none of this batch still held back. A step that
/// used shared counters may commit only below it, so that every step before
/// it in the stream has been decided first.
pub(super) fn shared_cut(blockers: &WindowBlockers, held: &[StoredEvent]) -> u64 {
    let own = held.iter().filter_map(|e| e.stream_seq).min();
    blockers
        .first_gap
        .min(blockers.first_pending)
        .min(own.unwrap_or(u64::MAX))
}

/// Splits events into those free to apply now and those held back by an
/// earlier message: one nobody has announced yet (`first_gap`), or one of
/// the same client pending in another batch.
pub(super) fn split_free(
    events: Vec<StoredEvent>,
    blockers: &WindowBlockers,
) -> (Vec<StoredEvent>, Vec<StoredEvent>) {
    let held_from = held_from(&events, blockers);
    events.into_iter().partition(|e| {
        held_from
            .get(e.envelope.client_id.as_str())
            .is_none_or(|h| e.stream_seq.unwrap_or_default() < *h)
    })
}

/// The stream sequence from which each client's events are held back.
pub(super) fn held_from(events: &[StoredEvent], blockers: &WindowBlockers) -> HashMap<String, u64> {
    // A message of this batch that another batch holds too (redelivered
    // to it while this one had it) is no earlier message: whichever
    // commits it first, the other finds it known.
    let own: HashSet<u64> = events.iter().filter_map(|e| e.stream_seq).collect();
    let mut first_pending: HashMap<&str, u64> = HashMap::new();
    for (client, seq) in blockers.pending.iter().filter(|(_, s)| !own.contains(s)) {
        let e = first_pending.entry(client.as_str()).or_insert(*seq);
        *e = (*e).min(*seq);
    }
    let limit = |e: &StoredEvent| {
        let pending = first_pending
            .get(e.envelope.client_id.as_str())
            .copied()
            .unwrap_or(u64::MAX);
        pending.min(blockers.first_gap)
    };
    // A client's events go together up to the first one held back, so a
    // later event never overtakes an earlier one of the same batch.
    let mut held_from: HashMap<String, u64> = HashMap::new();
    for e in events {
        let seq = e.stream_seq.unwrap_or_default();
        if seq >= limit(e) {
            let h = held_from
                .entry(e.envelope.client_id.as_str().to_string())
                .or_insert(seq);
            *h = (*h).min(seq);
        }
    }
    held_from
}

/// The distinct clients of these events.
pub(super) fn clients_of(events: &[StoredEvent]) -> Vec<&str> {
    let mut clients: Vec<&str> = events
        .iter()
        .map(|e| e.envelope.client_id.as_str())
        .collect();
    clients.sort_unstable();
    clients.dedup();
    clients
}

/// The stream's ack floor: every message at or below it is settled.
pub trait AckFloor: Send + Sync {
    fn floor(&self) -> futures::future::BoxFuture<'_, Result<u64, String>>;
}

/// A window owner per batch, unique across instances and restarts.
pub(super) fn next_owner() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static INSTANCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let instance = INSTANCE.get_or_init(|| {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).expect("the OS has randomness");
        hex::encode(b)
    });
    format!("{instance}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// How long a batch waits for earlier messages. A live holder renews its
/// lease, so waiting for it is waiting for progress: unbounded but for a
/// last resort of [`Patience::MAX_LEASES`] leases (a holder alive but stuck
/// that long, in an outage say). What nobody alive holds is *stale*: a gap
/// (a message pulled and never announced: its instance died first, or it
/// waits in a busy instance's queue) or a lease that ran out. The broker
/// hands such a message to another instance after its ack wait (the
/// lease), which announces it again, so a claim that ran out is waited for
/// a little longer; but a gap may also be a message redelivered to this
/// very instance behind its own waiting batches, which only giving up
/// frees. So a stale wait that has seen no change (of the floor or of what
/// holds it back) for half a lease is given up, as every wait was before
/// holders renewed their claims.
pub(super) struct Patience {
    lease: std::time::Duration,
    started: tokio::time::Instant,
    /// The floor and blockers last seen.
    seen: Option<(u64, WindowBlockers)>,
    stale_since: Option<tokio::time::Instant>,
}

impl Patience {
    /// Leases a batch waits at most, even for a holder that renews.
    pub(super) const MAX_LEASES: u32 = 10;

    pub(super) fn new(lease: std::time::Duration) -> Self {
        Self {
            lease,
            started: tokio::time::Instant::now(),
            seen: None,
            stale_since: None,
        }
    }

    /// Whether to stop waiting, given what holds back the events below
    /// `below` now, and why.
    pub(super) fn exhausted(
        &mut self,
        floor: u64,
        b: &WindowBlockers,
        below: u64,
    ) -> Option<GaveUp> {
        let now = tokio::time::Instant::now();
        let stale = b.stale || b.first_gap < below;
        let changed = self
            .seen
            .as_ref()
            .is_none_or(|(f, seen)| *f != floor || seen != b);
        if !stale {
            self.stale_since = None;
        } else if changed || self.stale_since.is_none() {
            self.stale_since = Some(now);
        }
        if changed {
            self.seen = Some((floor, b.clone()));
        }
        if self
            .stale_since
            .is_some_and(|since| now - since >= self.lease / 2)
        {
            Some(GaveUp::Stale)
        } else if now - self.started >= self.lease * Self::MAX_LEASES {
            Some(GaveUp::LastResort)
        } else {
            None
        }
    }
}

/// Why a batch stopped waiting for earlier messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum GaveUp {
    /// Held back by what nobody alive holds, unchanged, for half a lease.
    Stale,
    /// Held back for [`Patience::MAX_LEASES`] leases, whoever holds it.
    LastResort,
}

/// Where a batch of the stream stands in the consumer's window.
pub(super) struct Window<'a> {
    owner: &'a str,
    events: &'a [StoredEvent],
    floor: &'a dyn AckFloor,
}

impl Pipeline {
    /// Renews this instance's claim on messages its batch still works on
    /// (deciding, waiting for earlier ones, or retrying), so that batches
    /// waiting for them know their holder is alive.
    pub async fn renew_claims(
        &self,
        seqs: &[u64],
        lease: std::time::Duration,
    ) -> Result<(), BatchError> {
        let until = Utc::now() + chrono::Duration::from_std(lease).unwrap_or_default();
        Ok(self.store.window_renew(seqs, until).await?)
    }

    /// Commits the messages one at a time, each in the stream's order like
    /// any batch (through the consumer's window: an earlier message of the
    /// same client in another batch still goes first). A message that alone
    /// is refused as poison is kept as rejected, so the stream goes on; any
    /// other failure (an outage, the ack floor unknown, contention, a fault
    /// an operator must fix) rejects nothing and comes back, for the batch
    /// to be retried as it is.
    pub async fn isolate(
        &self,
        incoming: &[Incoming],
        floor: &dyn AckFloor,
        lease: std::time::Duration,
    ) -> Result<BatchReport, BatchError> {
        let mut total = BatchReport::default();
        for m in incoming {
            let one = std::slice::from_ref(m);
            let report = match self
                .process_in_order(one, floor, lease, &mut Turn::default())
                .await
            {
                Ok(report) => report,
                Err(e) if e.is_poison() => self.reject_poison(m, &e).await?,
                Err(e) => return Err(e),
            };
            total.add(&report);
        }
        Ok(total)
    }

    /// Like [`Pipeline::process`], but decides in the order of the stream
    /// even when other instances hold earlier messages: the batch is
    /// announced in the shared window, and
    /// - an event is committed only once every earlier message of the
    ///   stream is known and none of its client is pending in another batch
    ///   (each client's events in stream order);
    /// - an event whose decision used the counters shared by all clients is
    ///   committed only once every earlier message of the stream, of any
    ///   client, is settled, and on the counters as they left (shared state
    ///   in stream order; the commit's compare-and-swap checks the values).
    ///
    /// Parts of the batch commit as they become free. A batch waits for a
    /// live holder as long as it takes (up to a last resort): holders renew
    /// their claim while they work (see `flow::ingest`), and the earliest
    /// message is always free, so the wait ends. What nobody alive holds
    /// ([`Patience`]: a message never announced, or whose claim ran out)
    /// and that held things back unchanged for half a lease stops holding
    /// the rest, which is logged and counted; the message is then decided
    /// when it is redelivered, as a late event.
    ///
    /// A batch with a chained [`Turn`] commits only after the batch before
    /// it in its sequence, and is decided while that one commits, on top of
    /// what it decided (see [`crate::flow::chain`]); when what it read did not
    /// hold, or part of it has to wait, it is decided again as above. The
    /// turn is finished once the batch is committed; after an error it is
    /// left to the caller, who retries with it (the batches after wait) or
    /// drops it (they go on).
    pub async fn process_in_order(
        &self,
        batch: &[Incoming],
        floor: &dyn AckFloor,
        lease: std::time::Duration,
        turn: &mut Turn,
    ) -> Result<BatchReport, BatchError> {
        if batch.iter().any(|m| m.stream_seq.is_none()) {
            turn.wait().await;
            return self.process(batch).await;
        }
        let owner = next_owner();
        let p = self.prepare(batch);
        let mut items: Vec<(u64, Option<String>)> = p
            .events
            .iter()
            .map(|e| {
                (
                    e.stream_seq.unwrap_or_default(),
                    Some(e.envelope.client_id.as_str().to_string()),
                )
            })
            .collect();
        items.extend(p.unclaimed.iter().map(|s| (*s, None)));
        // A message redelivered while its first copy still waited for a
        // batch is in this batch twice: announced once.
        items.sort_by_key(|(seq, client)| (*seq, client.is_none()));
        items.dedup_by_key(|(seq, _)| *seq);
        let lease_until = Utc::now() + chrono::Duration::from_std(lease).unwrap_or_default();
        self.store
            .window_register(&owner, &items, lease_until)
            .await?;

        let entered = turn.is_chained().then(|| self.chain.enter(turn, &owner));
        if turn.is_chained() {
            let work = Work {
                rejected: p.rejected.clone(),
                log: p.log.clone(),
                sweep: None,
                settled: items.iter().map(|(seq, _)| *seq).collect(),
            };
            let window = Window {
                owner: &owner,
                events: &p.events,
                floor,
            };
            if let Some(mut report) = self
                .commit_ahead(p.steps(), &work, turn, Some(window))
                .await?
            {
                if let Some(entered) = entered {
                    entered.committed();
                }
                report.duplicates += p.duplicates;
                self.observe_latency(batch);
                return Ok(report);
            }
        }
        // The rest as one batch at a time; the next batch waits for this
        // one, so that batches still commit in the order they were pulled.
        turn.wait().await;

        let mut patience = Patience::new(lease);
        let mine: Vec<u64> = items.iter().map(|(seq, _)| *seq).collect();
        let mut pause = std::time::Duration::from_millis(1);
        let mut waiting = p.events;
        let mut rejected = p.rejected;
        let mut log = p.log;
        let mut settled_free: Vec<u64> = p.unclaimed;
        let mut report = BatchReport {
            duplicates: p.duplicates,
            ..Default::default()
        };
        let mut trimmed = false;
        // A step at this sequence used shared counters and waits for every
        // message before it: the events from it on are not decided again
        // until the cut has passed it.
        let mut shared_wait: Option<u64> = None;
        while !waiting.is_empty() || !rejected.is_empty() || !settled_free.is_empty() {
            let floor = floor
                .floor()
                .await
                .map_err(|e| BatchError::Transient(Cause::AckFloor(e)))?;
            if !trimmed {
                self.store.window_trim(floor).await?;
                trimmed = true;
            }
            let below = waiting
                .iter()
                .filter_map(|e| e.stream_seq)
                .max()
                .map_or(0, |s| s + 1);
            let clients = clients_of(&waiting);
            // Its own messages, and those of the batches chained after it,
            // which can only commit after it, hold nothing back.
            let after = self.chain.owners_after(turn);
            let owners: Vec<&str> = std::iter::once(owner.as_str())
                .chain(after.iter().map(String::as_str))
                .collect();
            let blockers = self
                .store
                .window_blockers(&owners, &mine, floor, below, &clients, Utc::now())
                .await?;
            let (mut ready, held, cut) =
                if let Some(why) = patience.exhausted(floor, &blockers, below) {
                    self.give_up_waiting(why, &waiting, &(floor, blockers));
                    (std::mem::take(&mut waiting), Vec::new(), None)
                } else {
                    let (ready, held) = split_free(std::mem::take(&mut waiting), &blockers);
                    let cut = shared_cut(&blockers, &held);
                    (ready, held, Some(cut))
                };
            waiting = held;
            // Still short of the step that waits for the messages before it.
            if let (Some(cut), Some(at)) = (cut, shared_wait) {
                if cut <= at {
                    let (now, later) = split_before(ready, at);
                    waiting.extend(later);
                    ready = now;
                } else {
                    shared_wait = None;
                }
            }
            if ready.is_empty() && rejected.is_empty() && settled_free.is_empty() {
                waiting.sort_by_key(|e| e.stream_seq);
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_millis(20));
                continue;
            }
            pause = std::time::Duration::from_millis(1);
            let mut work = Work {
                rejected: std::mem::take(&mut rejected),
                log: std::mem::take(&mut log),
                sweep: None,
                settled: ready.iter().filter_map(|e| e.stream_seq).collect(),
            };
            work.settled.append(&mut settled_free);
            let part = loop {
                let steps = ordered_steps(ready.clone());
                // This batch's turn came before the loop.
                match self
                    .commit_steps(steps, &work, cut, &mut Turn::default())
                    .await?
                {
                    Outcome::Committed(part) => break part,
                    Outcome::HeldFrom(at) => {
                        // The steps before it decide the same without it:
                        // each depends only on the ones before it.
                        shared_wait = Some(at);
                        let (now, later) = split_before(ready, at);
                        let later_seqs: HashSet<u64> =
                            later.iter().filter_map(|e| e.stream_seq).collect();
                        work.settled.retain(|s| !later_seqs.contains(s));
                        waiting.extend(later);
                        ready = now;
                    }
                }
            };
            waiting.sort_by_key(|e| e.stream_seq);
            report.add(&part);
        }
        if let Some(entered) = entered {
            entered.committed();
        }
        turn.finish();
        self.observe_latency(batch);
        Ok(report)
    }

    /// Says why held events are applied without waiting longer, and counts it.
    pub(super) fn give_up_waiting(
        &self,
        why: GaveUp,
        waiting: &[StoredEvent],
        last: &(u64, WindowBlockers),
    ) {
        let first_held = waiting.iter().filter_map(|e| e.stream_seq).min();
        let blockers = &last.1;
        let gap = first_held.is_some_and(|h| blockers.first_gap <= h);
        match why {
            GaveUp::Stale if gap => {
                tracing::warn!(
                    held = waiting.len(),
                    ?first_held,
                    ?last,
                    "gave up waiting for an earlier message nobody announced for half \
                     nats.ack_wait_secs (an instance died holding it?): applying the held events \
                     now; that message is decided when it is redelivered, after them"
                );
                self.metrics.order_gap_expired();
            }
            GaveUp::Stale => {
                tracing::warn!(
                    held = waiting.len(),
                    ?first_held,
                    ?last,
                    "gave up waiting for earlier messages whose holder stopped renewing its claim \
                     half nats.ack_wait_secs ago: applying the held events now, in \
                     stream order among themselves"
                );
                self.metrics.order_wait_expired();
            }
            GaveUp::LastResort => {
                tracing::warn!(
                    held = waiting.len(),
                    ?first_held,
                    ?last,
                    "gave up waiting for earlier messages still held after ten nats.ack_wait_secs \
                     (their holder renews its claim but does not commit): applying the held \
                     events now, in stream order among themselves"
                );
                self.metrics.order_wait_expired();
            }
        }
    }

    /// Decides the work on top of what the batches before `turn` decided,
    /// and commits it right after them if that held and, for a batch of the
    /// stream, no earlier message in the `window` holds it back. `None`:
    /// it was not committed, and is to be decided again once the batch
    /// before has committed (this waited for it).
    pub(super) async fn commit_ahead(
        &self,
        steps: Vec<Step>,
        work: &Work,
        turn: &mut Turn,
        window: Option<Window<'_>>,
    ) -> Result<Option<BatchReport>, BatchError> {
        let handed = turn.wait_decided().await;
        let seen = handed.unwrap_or_else(|| self.chain.seen());
        let mut decided = self.decide(steps, work, 0, Some(turn)).await?;
        let published = self.chain.publish(turn, &decided.write);
        // While the batches before commit: their messages will be settled
        // by then, so only the others' can hold this one back.
        let free = match &window {
            None => true,
            Some(w) => {
                let mut owners = self.chain.owners_before(turn);
                owners.push(w.owner.to_string());
                let shared = decided.shared_seqs.last().copied();
                decided.write.window_floor =
                    self.free_floor(&owners, w.events, shared, w.floor).await?;
                decided.write.window_floor.is_some()
            }
        };
        turn.wait().await;
        let holds = self.chain.holds(seen);
        if holds && free {
            // Only now: a batch that read values about to be withdrawn
            // would be decided again, and so would the one after it.
            turn.decided(self.chain.seen());
            if self.commit(&decided).await? {
                published.committed();
                turn.finish();
                return Ok(Some(decided.report));
            }
        }
        // Withdrawn before the next batch may go on: it must see that what
        // it read of this one did not hold.
        drop(published);
        tracing::debug!(
            turn = turn.ordinal(),
            read_held = holds,
            free,
            "a batch decided ahead is decided again"
        );
        self.metrics.decided_again();
        Ok(None)
    }

    /// The ack floor if no earlier message holds back any of these events:
    /// every message below them is known, none of their clients is pending
    /// in a batch of other `owners`, and, when a step at `shared` used the
    /// shared counters, no message of any client before it is pending either.
    pub(super) async fn free_floor(
        &self,
        owners: &[String],
        events: &[StoredEvent],
        shared: Option<u64>,
        floor: &dyn AckFloor,
    ) -> Result<Option<u64>, BatchError> {
        let floor = floor
            .floor()
            .await
            .map_err(|e| BatchError::Transient(Cause::AckFloor(e)))?;
        let Some(below) = events.iter().filter_map(|e| e.stream_seq).max() else {
            return Ok(Some(floor));
        };
        let owners: Vec<&str> = owners.iter().map(String::as_str).collect();
        let clients = clients_of(events);
        let mine: Vec<u64> = events.iter().filter_map(|e| e.stream_seq).collect();
        let blockers = self
            .store
            .window_blockers(&owners, &mine, floor, below + 1, &clients, Utc::now())
            .await?;
        let shared_free = shared.is_none_or(|s| s < shared_cut(&blockers, &[]));
        Ok((shared_free && held_from(events, &blockers).is_empty()).then_some(floor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::event::Envelope;

    fn stored(id: &str, client: &str, seq: u64) -> StoredEvent {
        let json = format!(
            r#"{{"id":"{id}","type":"page_viewed","client_id":"{client}","occurred_at":"2026-06-01T10:00:00Z","data":{{}},"context":{{}}}}"#
        );
        StoredEvent {
            envelope: Envelope::parse(json.as_bytes(), 65536).unwrap().into(),
            received_at: Utc::now(),
            stream_seq: Some(seq),
        }
    }

    #[test]
    fn an_earlier_message_of_the_client_holds_back_the_rest_of_its_events() {
        let events = vec![
            stored("a", "c", 290),
            stored("b", "c", 291),
            stored("d", "d", 292),
        ];
        let blockers = WindowBlockers {
            first_gap: u64::MAX,
            pending: vec![("c".into(), 289)],
            first_pending: 289,
            stale: false,
        };
        let (free, held) = split_free(events, &blockers);
        assert_eq!(free.len(), 1);
        assert_eq!(held.len(), 2);
    }

    #[test]
    fn a_copy_of_the_batchs_own_message_in_another_batch_holds_nothing_back() {
        // Redelivered to another batch while this one had it.
        let events = vec![stored("a", "c", 290), stored("b", "c", 291)];
        let blockers = WindowBlockers {
            first_gap: u64::MAX,
            pending: vec![("c".into(), 290), ("c".into(), 291)],
            first_pending: 290,
            stale: false,
        };
        assert!(held_from(&events, &blockers).is_empty());
    }

    #[test]
    fn steps_follow_the_stream_across_clients() {
        // Stored in the batch out of order, as a redelivery can leave them.
        let events = vec![
            stored("z", "zed", 12),
            stored("a", "ana", 11),
            stored("b", "bob", 10),
        ];
        let order: Vec<u64> = ordered_steps(events)
            .iter()
            .map(|s| match s {
                Step::Event(e) => e.stream_seq.unwrap(),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(order, vec![10, 11, 12], "not by client id");
    }

    #[test]
    fn shared_steps_wait_for_any_earlier_message_and_for_their_own_held_ones() {
        let blockers = WindowBlockers {
            first_gap: 500,
            pending: Vec::new(),
            first_pending: 300,
            stale: false,
        };
        assert_eq!(shared_cut(&blockers, &[]), 300);
        assert_eq!(shared_cut(&blockers, &[stored("h", "c", 250)]), 250);
        let free = WindowBlockers {
            first_gap: u64::MAX,
            pending: Vec::new(),
            first_pending: u64::MAX,
            stale: false,
        };
        assert_eq!(shared_cut(&free, &[]), u64::MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn patience_outlasts_live_holders_and_gives_up_on_stale_ones() {
        use std::time::Duration;
        let lease = Duration::from_secs(10);
        let step = |s| tokio::time::advance(Duration::from_secs(s));
        let live = WindowBlockers {
            first_gap: u64::MAX,
            pending: vec![("c".into(), 5)],
            first_pending: 5,
            stale: false,
        };
        let stale = WindowBlockers {
            stale: true,
            ..live.clone()
        };

        // A holder that renews is waited for, past any stale bound...
        let mut p = Patience::new(lease);
        assert_eq!(p.exhausted(0, &live, 9), None);
        step(60).await;
        assert_eq!(p.exhausted(0, &live, 9), None);
        // ...but not for ever.
        step(40).await;
        assert_eq!(p.exhausted(0, &live, 9), Some(GaveUp::LastResort));

        // Stale and unchanged: half a lease from when it went stale.
        let mut p = Patience::new(lease);
        step(20).await;
        assert_eq!(p.exhausted(0, &live, 9), None);
        assert_eq!(p.exhausted(0, &stale, 9), None);
        step(4).await;
        assert_eq!(p.exhausted(0, &stale, 9), None);
        step(1).await;
        assert_eq!(p.exhausted(0, &stale, 9), Some(GaveUp::Stale));

        // The floor moving, or what holds it back changing, starts the
        // count again.
        let mut p = Patience::new(lease);
        assert_eq!(p.exhausted(0, &stale, 9), None);
        step(4).await;
        assert_eq!(p.exhausted(1, &stale, 9), None);
        step(4).await;
        let other = WindowBlockers {
            pending: vec![("c".into(), 6)],
            first_pending: 6,
            ..stale.clone()
        };
        assert_eq!(p.exhausted(1, &other, 9), None);
        step(4).await;
        assert_eq!(p.exhausted(1, &other, 9), None);
        step(1).await;
        assert_eq!(p.exhausted(1, &other, 9), Some(GaveUp::Stale));

        // A gap below the held events is stale: nobody announced it.
        let gap = WindowBlockers {
            first_gap: 7,
            ..live.clone()
        };
        let mut p = Patience::new(lease);
        assert_eq!(p.exhausted(0, &gap, 9), None);
        step(5).await;
        assert_eq!(p.exhausted(0, &gap, 9), Some(GaveUp::Stale));
        // Above them, it holds nothing back.
        let mut p = Patience::new(lease);
        assert_eq!(p.exhausted(0, &gap, 7), None);
        step(5).await;
        assert_eq!(p.exhausted(0, &gap, 7), None);
    }
}
