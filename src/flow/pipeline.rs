//! Batches of work in, one committed transaction out. Work is events from the
//! broker, timers coming due, or a page of a sweep; each becomes a step on one
//! client's history, decided by the pure core, and the batch's events, client
//! states, effects, log lines and rejections are committed together. Knows
//! nothing of NATS, so the daemon, the scheduler, tests and benchmarks all
//! drive the same code.

use crate::config::Config;
use crate::core::decide::{Core, CoreSettings};
use crate::domain::counters::{CounterKey, CounterSource, Counters, Stored};
use crate::domain::event::{ClientId, Envelope, EventId};
use crate::domain::history::ClientState;
use crate::domain::log::{Level, LogEntry};
use crate::flow::catalog::Catalog;
use crate::flow::chain::{Chain, Turn};
use crate::http::live::{Live, LiveItem};
use crate::metrics::Metrics;
use crate::store::{
    Admin, AnyStore, BatchWrite, Batches, CommitOutcome, Rejected, State, StoreError, StoredEvent,
    SweepProgress, Window as _,
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
        ordered_steps(self.events.clone())
    }
}

/// The events in the order of the stream: the one order every decision
/// follows, live, in replay and in backtest, whatever the batches. Each
/// client's own events are applied in it, and so are the steps that use the
/// counters shared by all clients, across clients (a shop that publishes in
/// time order makes it event-time order, ties broken by stream sequence).
/// Events that came without a sequence (driven directly, not from the
/// stream) keep the order they were given in; the sort is stable.
fn ordered_steps(mut events: Vec<StoredEvent>) -> Vec<Step> {
    events.sort_by_key(|e| e.stream_seq);
    events.into_iter().map(Step::Event).collect()
}

/// The events before stream sequence `at`, and the ones from it on.
fn split_before(events: Vec<StoredEvent>, at: u64) -> (Vec<StoredEvent>, Vec<StoredEvent>) {
    events
        .into_iter()
        .partition(|e| e.stream_seq.is_none_or(|s| s < at))
}

/// The first stream sequence below which every message is settled as far as
/// this batch knows: none unannounced (a gap), none pending in another
/// instance's batch, and none of this batch still held back. A step that
/// used shared counters may commit only below it, so that every step before
/// it in the stream has been decided first.
fn shared_cut(blockers: &crate::store::WindowBlockers, held: &[StoredEvent]) -> u64 {
    let own = held.iter().filter_map(|e| e.stream_seq).min();
    blockers
        .first_gap
        .min(blockers.first_pending)
        .min(own.unwrap_or(u64::MAX))
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
#[derive(Default)]
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
    /// Rules that ran, whether they succeeded, and for which client.
    runs: Runs,
    report: BatchReport,
    /// Stream sequences of the steps that used shared counters, ascending.
    shared_seqs: Vec<u64>,
}

/// What became of work offered for commit with an order cut.
enum Outcome {
    Committed(BatchReport),
    /// A step at this sequence used shared counters at or past the cut: the
    /// steps from it on must wait for the messages before them.
    HeldFrom(u64),
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

    /// What names this step when it must be set aside: the event, the
    /// client's first due timer (as the step begins), or the sweep.
    fn key(&self, state: &ClientState) -> String {
        match self {
            Step::Event(e) => format!("event:{}", e.envelope.id),
            Step::Advance(c, _) => match state.timers.first() {
                Some(t) => format!("timer:{}:{}:{}:{c}", t.rule, t.name, t.due.timestamp()),
                None => format!("advance:{c}"),
            },
            Step::Sweep(c, rule, slot) => format!("sweep:{rule}:{}:{c}", slot.timestamp()),
        }
    }

    /// What a step set aside does instead of deciding: an event is stored
    /// but not applied, the timer whose firing broke off is dropped, a sweep
    /// skips the client; each says so in the client's process log.
    fn set_aside(&self, state: &mut ClientState, why: &str) -> crate::core::decide::Decision {
        let (at, event_id, message) = match self {
            Step::Event(e) => (
                e.envelope.occurred_at,
                Some(e.envelope.id.clone()),
                format!(
                    "event set aside: deciding it broke off ({why}); it is stored, not applied, \
                     and no rule ran for it"
                ),
            ),
            Step::Advance(_, until) => {
                let message = match state.pop_due(*until) {
                    Some(t) => format!(
                        "timer `{}` of rule `{}` dropped: firing it broke off ({why})",
                        t.name, t.rule
                    ),
                    None => format!("due timers not fired: firing them broke off ({why})"),
                };
                (*until, None, message)
            }
            Step::Sweep(_, rule, slot) => (
                *slot,
                None,
                format!("sweep of `{rule}` skipped for this client: it broke off ({why})"),
            ),
        };
        crate::core::decide::Decision {
            log: vec![LogEntry {
                client_id: state.client_id.clone(),
                at,
                level: Level::Error,
                rule: None,
                event_id,
                message,
            }],
            ..Default::default()
        }
    }
}

/// Steps whose decision panicked, by [`Step::key`], with the panic's
/// message: set aside whenever a batch holding them is decided, here and on
/// every later attempt, so that one event, timer or sweep that breaks the
/// core fails alone and the batch goes on. Bounded: the oldest are forgotten
/// (a step forgotten and met again panics again and is set aside again).
#[derive(Default)]
struct Poisoned {
    /// The keys in the order they were set aside (the oldest go first), and
    /// the map the batches read, replaced whole on each insert: inserts are
    /// rare (a panic), reads are every batch's once there was one.
    keys: std::sync::Mutex<SetAside>,
}

/// The map the batches read, and the keys in the order they came.
type SetAside = (
    Arc<HashMap<String, String>>,
    std::collections::VecDeque<String>,
);

/// Steps remembered as set aside at most.
const MAX_POISONED: usize = 10_000;

impl Poisoned {
    fn insert(&self, key: String, message: String) {
        let mut guard = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let (shared, order) = &mut *guard;
        let mut map = HashMap::clone(shared);
        if map.insert(key.clone(), message).is_none() {
            order.push_back(key);
        }
        while order.len() > MAX_POISONED {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
        *shared = Arc::new(map);
    }

    /// The steps set aside, to decide a batch with; `None` (the usual case)
    /// when there are none.
    fn snapshot(&self) -> Option<Arc<HashMap<String, String>>> {
        let guard = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        (!guard.0.is_empty()).then(|| guard.0.clone())
    }
}

/// Rules that ran in a batch, whether each succeeded, and for which client.
type Runs = Vec<(String, bool, ClientId)>;

/// A batch's steps decided: what to write, the rule runs, and the stream
/// sequences of the steps that used shared counters.
type DecidedSteps = (BatchWrite, Runs, Vec<u64>);

/// A step whose decision panicked: the batch's steps given back, with the
/// step's key and the panic's message.
type Panicked = (Vec<Step>, String, String);

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
    /// Steps set aside because deciding them panicked.
    poisoned: Poisoned,
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
            poisoned: Poisoned::default(),
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
        let work = Work {
            rejected: p.rejected,
            log: p.log,
            sweep: None,
            settled: batch.iter().filter_map(|m| m.stream_seq).collect(),
        };
        let steps = ordered_steps(p.events);
        let mut report = self.commit_all(steps, work, &mut Turn::default()).await?;
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
    /// Parts of the batch commit as they become free. Waiting is bounded by
    /// `max_wait` (half the lease): a message held that long by nobody alive
    /// (an instance that died holding or pulling it) stops holding the rest,
    /// which is logged and counted; the message is then decided when it is
    /// redelivered, as a late event.
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

        let deadline = tokio::time::Instant::now() + lease / 2;
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
        let mut last_blockers: Option<(u64, crate::store::WindowBlockers)> = None;
        // A step at this sequence used shared counters and waits for every
        // message before it: the events from it on are not decided again
        // until the cut has passed it.
        let mut shared_wait: Option<u64> = None;
        while !waiting.is_empty() || !rejected.is_empty() || !settled_free.is_empty() {
            let (mut ready, held, cut) = if tokio::time::Instant::now() >= deadline {
                self.give_up_waiting(&waiting, last_blockers.as_ref());
                (std::mem::take(&mut waiting), Vec::new(), None)
            } else {
                let floor = floor.floor().await.map_err(StoreError::AckFloor)?;
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
                let blockers = self
                    .store
                    .window_blockers(&[&owner], floor, below, &clients, Utc::now())
                    .await?;
                let (ready, held) = split_free(std::mem::take(&mut waiting), &blockers);
                let cut = shared_cut(&blockers, &held);
                last_blockers = Some((floor, blockers));
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

    /// Says why held events are applied without waiting longer, and counts it.
    fn give_up_waiting(
        &self,
        waiting: &[StoredEvent],
        last: Option<&(u64, crate::store::WindowBlockers)>,
    ) {
        let first_held = waiting.iter().filter_map(|e| e.stream_seq).min();
        let gap = last.is_some_and(|(_, b)| {
            first_held.is_some_and(|h| b.first_gap <= h)
                && b.first_gap < b.first_pending
                && b.pending.is_empty()
        });
        if gap {
            tracing::warn!(
                held = waiting.len(),
                ?first_held,
                blockers = ?last,
                "gave up waiting for an earlier message nobody announced (an instance died \
                 holding it?): applying the held events now; that message is decided when \
                 it is redelivered, after them"
            );
            self.metrics.order_gap_expired();
        } else {
            tracing::warn!(
                held = waiting.len(),
                ?first_held,
                blockers = ?last,
                "gave up waiting for earlier messages held by another batch whose lease runs on: \
                 applying the held events now, in stream order among themselves"
            );
            self.metrics.order_wait_expired();
        }
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
    async fn free_floor(
        &self,
        owners: &[String],
        events: &[StoredEvent],
        shared: Option<u64>,
        floor: &dyn AckFloor,
    ) -> Result<Option<u64>, StoreError> {
        let floor = floor.floor().await.map_err(StoreError::AckFloor)?;
        let Some(below) = events.iter().filter_map(|e| e.stream_seq).max() else {
            return Ok(Some(floor));
        };
        let owners: Vec<&str> = owners.iter().map(String::as_str).collect();
        let clients = clients_of(events);
        let blockers = self
            .store
            .window_blockers(&owners, floor, below + 1, &clients, Utc::now())
            .await?;
        let shared_free = shared.is_none_or(|s| s < shared_cut(&blockers, &[]));
        Ok((shared_free && held_from(events, &blockers).is_empty()).then_some(floor))
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
            // Settled in the window: the attempts announced it.
            settled: m.stream_seq.into_iter().collect(),
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
        self.commit_all(steps, Work::default(), &mut turn).await
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
        let work = Work {
            sweep: Some(SweepProgress {
                rule: rule.to_string(),
                slot,
                cursor: clients.last().cloned().or(after),
                done,
            }),
            ..Default::default()
        };
        let steps = clients
            .into_iter()
            .map(|c| Step::Sweep(c, rule.to_string(), slot))
            .collect();
        let mut turn = self.chain.next_turn();
        self.commit_all(steps, work, &mut turn).await
    }

    /// Commits work that no order cut holds back.
    async fn commit_all(
        &self,
        steps: Vec<Step>,
        work: Work,
        turn: &mut Turn,
    ) -> Result<BatchReport, StoreError> {
        match self.commit_steps(steps, &work, None, turn).await? {
            Outcome::Committed(report) => Ok(report),
            Outcome::HeldFrom(_) => unreachable!("only a cut holds steps back"),
        }
    }

    /// Decides and commits the steps with the rest of the work, deciding
    /// again after a conflict with another writer. With a `cut`, a step at
    /// or past it that used shared counters holds back the steps from it on
    /// (nothing is committed then).
    async fn commit_steps(
        &self,
        steps: Vec<Step>,
        work: &Work,
        cut: Option<u64>,
        turn: &mut Turn,
    ) -> Result<Outcome, StoreError> {
        if turn.is_chained()
            && let Some(report) = self.commit_ahead(steps.clone(), work, turn, None).await?
        {
            return Ok(Outcome::Committed(report));
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
            let decided = self.decide(fresh, work, known.len(), None).await?;
            if let Some(cut) = cut
                && let Some(at) = decided.shared_seqs.iter().find(|s| **s >= cut)
            {
                return Ok(Outcome::HeldFrom(*at));
            }
            if self.commit(&decided).await? {
                turn.finish();
                return Ok(Outcome::Committed(decided.report));
            }
            tracing::debug!("batch conflicted with another writer; retrying");
        }
        Err(StoreError::Contended(MAX_CONFLICT_RETRIES))
    }

    /// Loads the clients of the steps and decides them, with the rest of
    /// the work; `duplicates` were left out as known. A batch deciding
    /// ahead in a sequence (`ahead`) reads the pending values of the
    /// batches before it. A step whose decision panicked is set aside (see
    /// [`Poisoned`]) and the batch decided again without it, from freshly
    /// loaded states, since the panic may have left its client half-changed.
    async fn decide(
        &self,
        mut fresh: Vec<Step>,
        work: &Work,
        duplicates: usize,
        ahead: Option<&Turn>,
    ) -> Result<Decided, StoreError> {
        let mut client_ids: Vec<ClientId> = fresh.iter().map(Step::client).cloned().collect();
        client_ids.sort();
        client_ids.dedup();
        let client_refs: Vec<&ClientId> = client_ids.iter().collect();
        let (mut write, runs, shared_seqs) = loop {
            let pending = ahead.map(|turn| self.chain.pending(&client_refs, turn));
            let mut states = self.store.load_clients(&client_refs).await?;
            if let Some(pending) = pending {
                pending.apply(&mut states);
            }
            match self
                .decide_all(fresh, states, ahead.map(Turn::ordinal))
                .await?
            {
                Ok(decided) => break decided,
                Err((steps, key, message)) => {
                    tracing::error!(step = %key, %message, "deciding a step panicked; it is set aside and the batch decided again without it");
                    self.metrics.step_panicked();
                    self.poisoned.insert(key, message);
                    fresh = steps;
                }
            }
        };
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
            shared_seqs,
        })
    }

    /// Commits a decided batch; false if another writer changed its clients
    /// or counters since they were read.
    async fn commit(&self, decided: &Decided) -> Result<bool, StoreError> {
        let Decided {
            write,
            runs,
            report,
            ..
        } = decided;
        match self.store.commit_batch(write).await? {
            CommitOutcome::Committed => {
                // Counted once decided for good: a batch decided again
                // after a conflict does not run its rules twice over.
                for (rule, ok, _) in runs {
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
            if crate::http::live::NOTABLE.contains(&env.event_type.as_str()) {
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
            if let crate::domain::effects::EffectKind::Task { team, title, .. } = &e.kind {
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

    /// Runs the decision core for every step, in the order given, off the
    /// async workers: rules are CPU work and must not stall I/O. Notes the
    /// stream sequences of the steps that used shared counters. A step that
    /// panics stops the run: `Err` gives the steps back with the panicking
    /// step's key and message, for the caller to set it aside and decide
    /// again (the states may be half-changed by then).
    async fn decide_all(
        &self,
        steps: Vec<Step>,
        mut states: HashMap<ClientId, ClientState>,
        ahead: Option<u64>,
    ) -> Result<Result<DecidedSteps, Panicked>, StoreError> {
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
        let poisoned = self.poisoned.snapshot();
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
            let mut runs: Runs = Vec::new();
            let mut shared_seqs = Vec::new();
            let mut touched: HashSet<ClientId> = HashSet::new();
            for (i, step) in steps.iter().enumerate() {
                let id = step.client().clone();
                let state = states
                    .entry(id.clone())
                    .or_insert_with(|| ClientState::new(id.clone()));
                let uses = counters.uses();
                // A timer's key names the first due one, as the step begins.
                let advance_key = matches!(step, Step::Advance(..)).then(|| step.key(state));
                let set_aside = poisoned.as_ref().and_then(|p| {
                    let key = advance_key.clone().unwrap_or_else(|| step.key(state));
                    p.get(&key).cloned()
                });
                let d = match set_aside {
                    Some(why) => step.set_aside(state, &why),
                    None => {
                        let decided =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match step {
                                Step::Event(e) => core.on_event(state, &e.envelope, &mut counters),
                                Step::Advance(_, until) => {
                                    core.advance(state, *until, &mut counters)
                                }
                                Step::Sweep(_, rule, slot) => match rules.get(rule) {
                                    Some(r) => core.sweep(state, r, *slot, &mut counters),
                                    None => Default::default(),
                                },
                            }));
                        match decided {
                            Ok(d) => d,
                            Err(panic) => {
                                let message =
                                    crate::core::rules::api::panic_message(panic.as_ref());
                                let key = advance_key.unwrap_or_else(|| steps[i].key(state));
                                return Err((steps, key, message));
                            }
                        }
                    }
                };
                if failure.is_none() {
                    failure = d.counter_failure.clone();
                }
                if counters.uses() != uses
                    && let Step::Event(e) = step
                    && let Some(seq) = e.stream_seq
                {
                    shared_seqs.push(seq);
                }
                // A state is written only if something changed it: a due
                // timer fired, a sweep found work, or an event arrived.
                let changed =
                    matches!(step, Step::Event(_)) || !d.runs.is_empty() || !d.log.is_empty();
                runs.extend(d.runs.into_iter().map(|(rule, ok)| (rule, ok, id.clone())));
                if changed {
                    touched.insert(id);
                }

                write.effects.extend(d.effects);
                write.log.extend(d.log);
                if let Step::Event(e) = step {
                    write.events.push(e.clone());
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
            Ok((write, runs, shared_seqs, failure))
        };
        match tokio::task::spawn_blocking(run).await {
            Ok(Err(panicked)) => Ok(Err(panicked)),
            // A counter that could not be read means a rule decided on
            // nothing: retry the batch rather than commit that.
            Ok(Ok((_, _, _, Some(failure)))) => Err(StoreError::Counters(failure)),
            Ok(Ok((w, runs, shared, None))) => Ok(Ok((w, runs, shared))),
            // Every step runs under catch_unwind: what is left is a bug in
            // this function itself.
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
            first_pending: 289,
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
        };
        assert_eq!(shared_cut(&blockers, &[]), 300);
        assert_eq!(shared_cut(&blockers, &[stored("h", "c", 250)]), 250);
        let free = WindowBlockers {
            first_gap: u64::MAX,
            pending: Vec::new(),
            first_pending: u64::MAX,
        };
        assert_eq!(shared_cut(&free, &[]), u64::MAX);
    }
}
