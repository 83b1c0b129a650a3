//! Batches of work in, one committed transaction out. Work is events from the
//! broker, timers coming due, or a page of a sweep; each becomes a step on one
//! client's history, decided by the pure core, and the batch's events, client
//! states, effects, log lines and rejections are committed together. Knows
//! nothing of NATS, so the daemon, the scheduler, tests and benchmarks all
//! drive the same code.

use crate::config::Config;
use crate::core::decide::CoreSettings;
use crate::domain::event::{ClientId, Envelope, EventId};
use crate::domain::log::{Level, LogEntry};
use crate::flow::catalog::Catalog;
use crate::flow::chain::{Chain, Turn};
use crate::flow::error::BatchError;
use crate::flow::live::{Live, LiveItem};
use crate::metrics::Metrics;
use crate::store::{
    Admin, AnyStore, BatchWrite, Batches, CommitOutcome, Rejected, State, StoredEvent,
    SweepProgress,
};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use std::collections::HashSet;
use std::sync::Arc;

mod order;
mod steps;

pub use order::AckFloor;
use steps::{Poisoned, Runs, Step, ordered_steps};

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

impl BatchReport {
    pub fn add(&mut self, other: &BatchReport) {
        self.accepted += other.accepted;
        self.duplicates += other.duplicates;
        self.rejected += other.rejected;
        self.effects += other.effects;
    }
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

/// What a batch commits besides what it decides.
#[derive(Default)]
struct Work {
    rejected: Vec<Rejected>,
    log: Vec<LogEntry>,
    sweep: Option<SweepProgress>,
    settled: Vec<u64>,
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
            max_event_bytes: config.nats.max_event_bytes.get(),
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
    pub async fn process(&self, batch: &[Incoming]) -> Result<BatchReport, BatchError> {
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

    /// Keeps a message the database refused (poison) as rejected, with the
    /// error, once the database is known to answer: so it is recorded, not
    /// redelivered for ever.
    async fn reject_poison(
        &self,
        m: &Incoming,
        error: &BatchError,
    ) -> Result<BatchReport, BatchError> {
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
    ) -> Result<BatchReport, BatchError> {
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
    ) -> Result<BatchReport, BatchError> {
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
    ) -> Result<BatchReport, BatchError> {
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
    ) -> Result<Outcome, BatchError> {
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
        Err(BatchError::Conflict(MAX_CONFLICT_RETRIES))
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
    ) -> Result<Decided, BatchError> {
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
    async fn commit(&self, decided: &Decided) -> Result<bool, BatchError> {
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
                self.metrics.batch_committed(write, report.duplicates);
                self.announce(write);
                Ok(true)
            }
            CommitOutcome::Conflict => Ok(false),
        }
    }

    /// Tells the live feed about notable events, then the tasks they led
    /// to, then the board scores they moved.
    fn announce(&self, write: &BatchWrite) {
        for e in &write.events {
            let env = &e.envelope;
            if crate::flow::live::NOTABLE.contains(&env.event_type.as_str()) {
                self.live.send(LiveItem {
                    kind: "event",
                    client_id: env.client_id.to_string(),
                    at: env.occurred_at,
                    text: env.event_type.to_string(),
                    id: None,
                    team: None,
                    board: None,
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
                    board: None,
                });
            }
        }
        for item in crate::flow::live::board_items(&write.counters, chrono::Utc::now()) {
            self.live.send(item);
        }
    }
}

/// The client id of an envelope that failed validation, if it has a usable one.
fn loose_client_id(payload: &[u8]) -> Option<ClientId> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    ClientId::parse(v.get("client_id")?.as_str()?).ok()
}
