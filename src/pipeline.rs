//! Batches of work in, one committed transaction out. Work is events from the
//! broker, timers coming due, or a page of a sweep; each becomes a step on one
//! client's history, decided by the pure core, and the batch's events, client
//! states, effects, log lines and rejections are committed together. Knows
//! nothing of NATS, so the daemon, the scheduler, tests and benchmarks all
//! drive the same code.

use crate::catalog::Catalog;
use crate::chain::{Chain, Turn};
use crate::config::Config;
use crate::counters::{CounterKey, CounterSource, Counters, Stored};
use crate::decide::{Core, CoreSettings};
use crate::event::{ClientId, Envelope, EventId};
use crate::history::ClientState;
use crate::live::{Live, LiveItem};
use crate::metrics::Metrics;
use crate::store::{
    AnyStore, BatchWrite, CommitOutcome, Level, LogEntry, Rejected, Store, StoreError, StoredEvent,
    SweepProgress,
};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// A message as it came off the broker.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub subject: String,
    pub payload: Bytes,
    pub stream_seq: Option<u64>,
    /// When the broker took it from the producer: latency is measured from here.
    pub published: Option<DateTime<Utc>>,
}

/// What a committed batch held.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchReport {
    pub accepted: usize,
    pub duplicates: usize,
    pub rejected: usize,
    pub effects: usize,
}

/// A parsed batch, before deciding.
struct Prepared {
    events: Vec<StoredEvent>,
    rejected: Vec<Rejected>,
    log: Vec<LogEntry>,
    duplicates: usize,
    /// Sequences of messages that name no event to apply (rejected, or a
    /// duplicate inside the batch): settled with the batch, blocking nothing.
    unclaimed: Vec<u64>,
}

impl Prepared {
    fn steps(&self) -> Vec<Step> {
        sorted_steps(self.events.clone())
    }
}

/// Each client's events in event time; the sort is stable, so ties keep
/// stream order.
fn sorted_steps(mut events: Vec<StoredEvent>) -> Vec<Step> {
    events.sort_by(|a, b| {
        (&a.envelope.client_id, a.envelope.occurred_at)
            .cmp(&(&b.envelope.client_id, b.envelope.occurred_at))
    });
    events.into_iter().map(Step::Event).collect()
}

/// Splits events into those free to apply now and those held back by an
/// earlier message: one nobody has announced yet (`first_gap`), or one of
/// the same client pending in another batch.
fn split_free(
    events: Vec<StoredEvent>,
    blockers: &crate::store::WindowBlockers,
) -> (Vec<StoredEvent>, Vec<StoredEvent>) {
    let held_from = held_from(&events, blockers);
    events.into_iter().partition(|e| {
        held_from
            .get(e.envelope.client_id.as_str())
            .is_none_or(|h| e.stream_seq.unwrap_or_default() < *h)
    })
}

/// The stream sequence from which each client's events are held back.
fn held_from(
    events: &[StoredEvent],
    blockers: &crate::store::WindowBlockers,
) -> HashMap<String, u64> {
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
fn clients_of(events: &[StoredEvent]) -> Vec<&str> {
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
fn next_owner() -> String {
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

/// What a batch commits besides what it decides.
struct Work {
    rejected: Vec<Rejected>,
    log: Vec<LogEntry>,
    sweep: Option<SweepProgress>,
    settled: Vec<u64>,
}

/// Where a batch of the stream stands in the consumer's window.
struct Window<'a> {
    owner: &'a str,
    events: &'a [StoredEvent],
    floor: &'a dyn AckFloor,
}

/// A batch decided, ready to commit.
struct Decided {
    write: BatchWrite,
    runs: Vec<(String, bool)>,
    report: BatchReport,
}

/// One unit of work on one client's history.
#[derive(Debug, Clone)]
enum Step {
    Event(StoredEvent),
    /// Fire the client's timers due by this time.
    Advance(ClientId, DateTime<Utc>),
    /// Run a scheduled rule for the client at the sweep's slot.
    Sweep(ClientId, String, DateTime<Utc>),
}

impl Step {
    fn client(&self) -> &ClientId {
        match self {
            Step::Event(e) => &e.envelope.client_id,
            Step::Advance(c, _) | Step::Sweep(c, ..) => c,
        }
    }
}

/// How often a batch is retried when another writer changed the same clients.
const MAX_CONFLICT_RETRIES: usize = 8;

pub struct Pipeline {
    store: AnyStore,
    catalog: Arc<Catalog>,
    metrics: Arc<Metrics>,
    live: Live,
    /// Replaying into a fresh database: rebuild history, queue nothing.
    suppress_effects: bool,
    max_event_bytes: usize,
    settings: Arc<CoreSettings>,
    business_tz: Tz,
    /// The pending values of this instance's batches in flight.
    chain: Arc<Chain>,
}

/// Shared counters read from the store on first use in a batch. The core
/// runs on a blocking thread, so waiting for the query there is fine.
struct StoreCounters {
    store: AnyStore,
    runtime: tokio::runtime::Handle,
    /// Deciding ahead as the batch of this turn: the pending values of the
    /// batches before it come first.
    ahead: Option<(Arc<Chain>, u64)>,
}

impl CounterSource for StoreCounters {
    fn load(&mut self, key: &CounterKey) -> Result<Stored, String> {
        if let Some(pending) = self
            .ahead
            .as_ref()
            .and_then(|(chain, turn)| chain.counter(key, *turn))
        {
            return Ok(pending);
        }
        self.runtime
            .block_on(self.store.load_counter(key))
            .map_err(|e| e.to_string())
    }
    fn is_member(&mut self, key: &CounterKey, member: &str) -> Result<bool, String> {
        if let Some((chain, turn)) = &self.ahead
            && chain.is_member(key, member, *turn)
        {
            return Ok(true);
        }
        self.runtime
            .block_on(self.store.is_member(key, member))
            .map_err(|e| e.to_string())
    }
}

impl Pipeline {
    pub fn new(
        store: AnyStore,
        catalog: Arc<Catalog>,
        metrics: Arc<Metrics>,
        config: &Config,
    ) -> Self {
        Self {
            store,
            catalog,
            metrics,
            live: Live::default(),
            suppress_effects: false,
            max_event_bytes: config.nats.max_event_bytes,
            settings: Arc::new(CoreSettings::from_config(config)),
            business_tz: config.history.business_tz(),
            chain: Arc::new(Chain::default()),
        }
    }

    /// Decides and stores as usual but queues no effects and logs nothing:
    /// for rebuilding a database from the stream.
    pub fn suppressing_effects(mut self) -> Self {
        self.suppress_effects = true;
        self
    }

    /// Sends tasks and notable events to this live feed after each commit.
    pub fn with_live(mut self, live: Live) -> Self {
        self.live = live;
        self
    }

    /// The next batch's place in this pipeline's order of commits.
    pub fn turn(&self) -> Turn {
        self.chain.next_turn()
    }

    pub fn store(&self) -> &AnyStore {
        &self.store
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Processes and commits one batch of messages. On `Ok` every message is
    /// safe to ack: it was stored, rejected and kept, or had taken effect before.
    pub async fn process(&self, batch: &[Incoming]) -> Result<BatchReport, StoreError> {
        let p = self.prepare(batch);
        // Settled in the window too, should an ordered attempt have announced them.
        let settled = batch.iter().filter_map(|m| m.stream_seq).collect();
        let mut report = self
            .commit_steps(
                p.steps(),
                p.rejected,
                p.log,
                None,
                settled,
                &mut Turn::default(),
            )
            .await?;
        report.duplicates += p.duplicates;
        self.observe_latency(batch);
        Ok(report)
    }

    fn observe_latency(&self, batch: &[Incoming]) {
        let now = Utc::now();
        for published in batch.iter().filter_map(|m| m.published) {
            self.metrics
                .observe_latency((now - published).to_std().unwrap_or_default());
        }
    }

    /// Like [`Pipeline::process`], but applies each client's events in the
    /// order of the stream even when other instances hold events of the same
    /// clients: the batch is announced in the shared window, and an event is
    /// committed only once every earlier message of the stream is known and
    /// none of its client is pending in another batch. Parts of the batch
    /// commit as they become free; waiting is bounded by `max_wait`, after
    /// which the rest commits anyway (an instance that died holding earlier
    /// events must not stop the others).
    ///
    /// A batch with a chained [`Turn`] commits only after the batch before
    /// it in its sequence, and is decided while that one commits, on top of
    /// what it decided (see [`crate::chain`]); when what it read did not
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
    ) -> Result<BatchReport, StoreError> {
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

        let started = tokio::time::Instant::now();
        let deadline = started + lease / 2;
        // Another instance announces what it pulled within milliseconds.
        let gaps_until = started + (lease / 10).min(std::time::Duration::from_secs(2));
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
        let mut last_blockers = None;
        while !waiting.is_empty() || !rejected.is_empty() || !settled_free.is_empty() {
            let (ready, held) = if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    held = waiting.len(),
                    first_held = ?waiting.iter().filter_map(|e| e.stream_seq).min(),
                    blockers = ?last_blockers,
                    "gave up waiting for earlier events of the same clients; applying in arrival order"
                );
                self.metrics.order_wait_expired();
                (std::mem::take(&mut waiting), Vec::new())
            } else {
                let floor = floor
                    .floor()
                    .await
                    .map_err(|e| StoreError::Counters(format!("reading the ack floor: {e}")))?;
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
                let mut blockers = self
                    .store
                    .window_blockers(&[&owner], floor, below, &clients, Utc::now())
                    .await?;
                if tokio::time::Instant::now() >= gaps_until {
                    // A message pulled but never announced: an instance that
                    // died right after pulling, or a broker that forgot acks.
                    // Only what is known to be pending still holds back.
                    blockers.first_gap = u64::MAX;
                }
                let split = split_free(std::mem::take(&mut waiting), &blockers);
                last_blockers = Some((floor, blockers));
                split
            };
            waiting = held;
            if ready.is_empty() && rejected.is_empty() && settled_free.is_empty() {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_millis(20));
                continue;
            }
            pause = std::time::Duration::from_millis(1);
            let mut settled: Vec<u64> = ready.iter().filter_map(|e| e.stream_seq).collect();
            settled.append(&mut settled_free);
            let steps = sorted_steps(ready);
            let part = self
                .commit_steps(
                    steps,
                    std::mem::take(&mut rejected),
                    std::mem::take(&mut log),
                    None,
                    settled,
                    // This batch's turn came before the loop.
                    &mut Turn::default(),
                )
                .await?;
            report.accepted += part.accepted;
            report.duplicates += part.duplicates;
            report.rejected += part.rejected;
            report.effects += part.effects;
        }
        if let Some(entered) = entered {
            entered.committed();
        }
        turn.finish();
        self.observe_latency(batch);
        Ok(report)
    }

    /// Decides the work on top of what the batches before `turn` decided,
    /// and commits it right after them if that held and, for a batch of the
    /// stream, no earlier message in the `window` holds it back. `None`:
    /// it was not committed, and is to be decided again once the batch
    /// before has committed (this waited for it).
    async fn commit_ahead(
        &self,
        steps: Vec<Step>,
        work: &Work,
        turn: &mut Turn,
        window: Option<Window<'_>>,
    ) -> Result<Option<BatchReport>, StoreError> {
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
                decided.write.window_floor = self.free_floor(&owners, w.events, w.floor).await?;
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
    /// every message below them is known, and none of their clients is
    /// pending in a batch of other `owners`.
    async fn free_floor(
        &self,
        owners: &[String],
        events: &[StoredEvent],
        floor: &dyn AckFloor,
    ) -> Result<Option<u64>, StoreError> {
        let floor = floor
            .floor()
            .await
            .map_err(|e| StoreError::Counters(format!("reading the ack floor: {e}")))?;
        let Some(below) = events.iter().filter_map(|e| e.stream_seq).max() else {
            return Ok(Some(floor));
        };
        let owners: Vec<&str> = owners.iter().map(String::as_str).collect();
        let clients = clients_of(events);
        let blockers = self
            .store
            .window_blockers(&owners, floor, below + 1, &clients, Utc::now())
            .await?;
        Ok(held_from(events, &blockers).is_empty().then_some(floor))
    }

    /// Parses a batch: valid events (first of each id), rejections with
    /// their log lines, and the sequences of in-batch duplicates.
    fn prepare(&self, batch: &[Incoming]) -> Prepared {
        let received_at = Utc::now();
        let mut unclaimed = Vec::new();
        let mut rejected = Vec::new();
        let mut log = Vec::new();
        let mut events: Vec<StoredEvent> = Vec::with_capacity(batch.len());
        let mut seen_ids: HashSet<EventId> = HashSet::with_capacity(batch.len());
        let mut duplicates = 0;
        for m in batch {
            match Envelope::parse(&m.payload, self.max_event_bytes) {
                Ok(envelope) => {
                    if !seen_ids.insert(envelope.id.clone()) {
                        duplicates += 1;
                        unclaimed.extend(m.stream_seq);
                        continue;
                    }
                    events.push(StoredEvent {
                        envelope: envelope.into(),
                        received_at,
                        stream_seq: m.stream_seq,
                    });
                }
                Err(reason) => {
                    tracing::warn!(subject = %m.subject, seq = ?m.stream_seq, %reason, "event rejected");
                    let shown = &m.payload[..m.payload.len().min(self.max_event_bytes)];
                    // Where the envelope still names a client, their log says so.
                    if let Some(client_id) = loose_client_id(shown) {
                        log.push(LogEntry {
                            client_id,
                            at: received_at,
                            level: Level::Error,
                            rule: None,
                            event_id: None,
                            message: format!("event rejected: {reason}"),
                        });
                    }
                    unclaimed.extend(m.stream_seq);
                    rejected.push(Rejected {
                        received_at,
                        subject: m.subject.clone(),
                        stream_seq: m.stream_seq,
                        reason: reason.to_string(),
                        payload: String::from_utf8_lossy(shown).into_owned(),
                    });
                }
            }
        }
        Prepared {
            events,
            rejected,
            log,
            duplicates,
            unclaimed,
        }
    }

    /// Keeps a message that cannot be committed (with the error of one more
    /// try) as rejected, once the database is known to answer and the error
    /// is not an outage of the whole database (full, read-only, locked); so
    /// a poison message is recorded, not redelivered forever, and a good one
    /// is never set aside for the database's fault.
    pub async fn quarantine_poison(&self, m: &Incoming) -> Result<BatchReport, StoreError> {
        let error = match self.process(std::slice::from_ref(m)).await {
            Ok(report) => return Ok(report),
            // Busy, full, read-only, locked or away: no message is to blame.
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => e,
        };
        self.store.ping().await?;
        tracing::error!(subject = %m.subject, seq = ?m.stream_seq, %error, "poison message kept as rejected");
        let shown = &m.payload[..m.payload.len().min(self.max_event_bytes)];
        let write = BatchWrite {
            rejected: vec![Rejected {
                received_at: Utc::now(),
                subject: m.subject.clone(),
                stream_seq: m.stream_seq,
                reason: format!("could not be stored: {error}"),
                payload: String::from_utf8_lossy(shown).into_owned(),
            }],
            ..Default::default()
        };
        self.store.commit_batch(&write).await?;
        Ok(BatchReport {
            rejected: 1,
            ..Default::default()
        })
    }

    /// Fires the timers of these clients that are due by `now`.
    pub async fn advance(
        &self,
        clients: Vec<ClientId>,
        now: DateTime<Utc>,
    ) -> Result<BatchReport, StoreError> {
        let steps = clients.into_iter().map(|c| Step::Advance(c, now)).collect();
        let mut turn = self.chain.next_turn();
        self.commit_steps(steps, Vec::new(), Vec::new(), None, Vec::new(), &mut turn)
            .await
    }

    /// Runs scheduled rule `rule` at `slot` for a page of clients, recording
    /// the sweep's progress in the same transaction.
    pub async fn sweep_page(
        &self,
        rule: &str,
        slot: DateTime<Utc>,
        after: Option<ClientId>,
        clients: Vec<ClientId>,
        done: bool,
    ) -> Result<BatchReport, StoreError> {
        let progress = SweepProgress {
            rule: rule.to_string(),
            slot,
            cursor: clients.last().cloned().or(after),
            done,
        };
        let steps = clients
            .into_iter()
            .map(|c| Step::Sweep(c, rule.to_string(), slot))
            .collect();
        let mut turn = self.chain.next_turn();
        self.commit_steps(
            steps,
            Vec::new(),
            Vec::new(),
            Some(progress),
            Vec::new(),
            &mut turn,
        )
        .await
    }

    async fn commit_steps(
        &self,
        steps: Vec<Step>,
        rejected: Vec<Rejected>,
        log: Vec<LogEntry>,
        sweep: Option<SweepProgress>,
        settled: Vec<u64>,
        turn: &mut Turn,
    ) -> Result<BatchReport, StoreError> {
        let work = Work {
            rejected,
            log,
            sweep,
            settled,
        };
        if turn.is_chained()
            && let Some(report) = self.commit_ahead(steps.clone(), &work, turn, None).await?
        {
            return Ok(report);
        }
        turn.wait().await;
        for attempt in 0..MAX_CONFLICT_RETRIES {
            if attempt > 1 {
                // The first retry may only be leaving out known ids; after
                // that, another writer keeps winning: back off, jittered and
                // growing, so that writers do not collide again in lockstep.
                let mut b = [0u8; 1];
                getrandom::fill(&mut b).unwrap_or_default();
                let ms = (1u64 << attempt.min(6)) + u64::from(b[0] % 8);
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            }
            let ids: Vec<&EventId> = steps
                .iter()
                .filter_map(|s| match s {
                    Step::Event(e) => Some(&e.envelope.id),
                    _ => None,
                })
                .collect();
            // Ids seen before are rare (a redelivery after a crash), and the
            // commit refuses them anyway (a conflict): the first attempt
            // does not look them up, a retry does and leaves them out.
            let known = if ids.is_empty() || attempt == 0 {
                HashSet::new()
            } else {
                self.store.known_events(&ids).await?
            };
            let fresh: Vec<Step> = steps
                .iter()
                .filter(|s| match s {
                    Step::Event(e) => !known.contains(e.envelope.id.as_str()),
                    _ => true,
                })
                .cloned()
                .collect();
            let decided = self.decide(fresh, &work, known.len(), None).await?;
            if self.commit(&decided).await? {
                turn.finish();
                return Ok(decided.report);
            }
            tracing::debug!("batch conflicted with another writer; retrying");
        }
        Err(StoreError::Contended(MAX_CONFLICT_RETRIES))
    }

    /// Loads the clients of the steps and decides them, with the rest of
    /// the work; `duplicates` were left out as known. A batch deciding
    /// ahead in a sequence (`ahead`) reads the pending values of the
    /// batches before it.
    async fn decide(
        &self,
        fresh: Vec<Step>,
        work: &Work,
        duplicates: usize,
        ahead: Option<&Turn>,
    ) -> Result<Decided, StoreError> {
        let mut client_ids: Vec<&ClientId> = fresh.iter().map(Step::client).collect();
        client_ids.sort();
        client_ids.dedup();
        let pending = ahead.map(|turn| self.chain.pending(&client_ids, turn));
        let mut states = self.store.load_clients(&client_ids).await?;
        if let Some(pending) = pending {
            pending.apply(&mut states);
        }
        let (mut write, runs) = self
            .decide_all(fresh, states, ahead.map(Turn::ordinal))
            .await?;
        if self.suppress_effects {
            write.effects.clear();
            write.log.clear();
        }
        write.rejected = work.rejected.clone();
        write.log.extend(work.log.iter().cloned());
        write.sweep = work.sweep.clone();
        write.settled = work.settled.clone();
        let report = BatchReport {
            accepted: write.events.len(),
            duplicates,
            rejected: write.rejected.len(),
            effects: write.effects.len(),
        };
        Ok(Decided {
            write,
            runs,
            report,
        })
    }

    /// Commits a decided batch; false if another writer changed its clients
    /// or counters since they were read.
    async fn commit(&self, decided: &Decided) -> Result<bool, StoreError> {
        let Decided {
            write,
            runs,
            report,
        } = decided;
        match self.store.commit_batch(write).await? {
            CommitOutcome::Committed => {
                // Counted once decided for good: a batch decided again
                // after a conflict does not run its rules twice over.
                for (rule, ok) in runs {
                    self.metrics.rule_run(rule, *ok);
                }
                self.catalog.record_runs(runs);
                self.metrics.batch_committed(report, write);
                self.announce(write);
                Ok(true)
            }
            CommitOutcome::Conflict => Ok(false),
        }
    }

    /// Tells the live feed about notable events, then the tasks they led to.
    fn announce(&self, write: &BatchWrite) {
        for e in &write.events {
            let env = &e.envelope;
            if crate::live::NOTABLE.contains(&env.event_type.as_str()) {
                self.live.send(LiveItem {
                    kind: "event",
                    client_id: env.client_id.to_string(),
                    at: env.occurred_at,
                    text: env.event_type.to_string(),
                    id: None,
                    team: None,
                });
            }
        }
        for e in &write.effects {
            if let crate::effects::EffectKind::Task { team, title, .. } = &e.kind {
                self.live.send(LiveItem {
                    kind: "task",
                    client_id: e.client_id.to_string(),
                    at: e.at,
                    text: title.clone(),
                    id: Some(e.key.clone()),
                    team: Some(team.clone()),
                });
            }
        }
    }

    /// Runs the decision core for every step, off the async workers: rules
    /// are CPU work and must not stall I/O.
    async fn decide_all(
        &self,
        steps: Vec<Step>,
        mut states: HashMap<ClientId, ClientState>,
        ahead: Option<u64>,
    ) -> Result<(BatchWrite, Vec<(String, bool)>), StoreError> {
        let rules = self.catalog.rules();
        let templates = self.catalog.templates();
        let engine = self.catalog.engine.clone();
        let settings = self.settings.clone();
        let source = StoreCounters {
            store: self.store.clone(),
            runtime: tokio::runtime::Handle::current(),
            ahead: ahead.map(|turn| (self.chain.clone(), turn)),
        };
        let tz = self.business_tz;
        let run = move || {
            let core = Core {
                engine: &engine,
                rules: &rules,
                templates: &templates,
                settings: &settings,
            };
            let mut counters = Counters::new(Box::new(source), tz);
            let mut failure = None;
            let received_at = Utc::now();
            let mut write = BatchWrite::default();
            let mut runs: Vec<(String, bool)> = Vec::new();
            let mut touched: HashSet<ClientId> = HashSet::new();
            for step in steps {
                let id = step.client().clone();
                let state = states
                    .entry(id.clone())
                    .or_insert_with(|| ClientState::new(id.clone()));
                let d = match &step {
                    Step::Event(e) => core.on_event(state, &e.envelope, &mut counters),
                    Step::Advance(_, until) => core.advance(state, *until, &mut counters),
                    Step::Sweep(_, rule, slot) => match rules.get(rule) {
                        Some(r) => core.sweep(state, r, *slot, &mut counters),
                        None => Default::default(),
                    },
                };
                if failure.is_none() {
                    failure = d.counter_failure.clone();
                }
                // A state is written only if something changed it: a due
                // timer fired, a sweep found work, or an event arrived.
                let changed =
                    matches!(step, Step::Event(_)) || !d.runs.is_empty() || !d.log.is_empty();
                if changed {
                    touched.insert(id);
                }
                runs.extend(d.runs);
                write.effects.extend(d.effects);
                write.log.extend(d.log);
                if let Step::Event(e) = step {
                    write.events.push(e);
                }
                write
                    .events
                    .extend(d.events.into_iter().map(|envelope| StoredEvent {
                        envelope: envelope.into(),
                        received_at,
                        stream_seq: None,
                    }));
            }
            let (counter_writes, members) = counters.writes();
            write.counters = counter_writes;
            write.members = members;
            write.clients = states
                .into_iter()
                .filter(|(id, _)| touched.contains(id))
                .map(|(_, s)| Arc::new(s))
                .collect();
            (write, runs, failure)
        };
        match tokio::task::spawn_blocking(run).await {
            // A counter that could not be read means a rule decided on
            // nothing: retry the batch rather than commit that.
            Ok((_, _, Some(failure))) => Err(StoreError::Counters(failure)),
            Ok((w, runs, None)) => Ok((w, runs)),
            // A panic in the core is a bug; surface it rather than ack silently.
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

/// The client id of an envelope that failed validation, if it has a usable one.
fn loose_client_id(payload: &[u8]) -> Option<ClientId> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    ClientId::parse(v.get("client_id")?.as_str()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::WindowBlockers;

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
        };
        assert!(held_from(&events, &blockers).is_empty());
    }
}
