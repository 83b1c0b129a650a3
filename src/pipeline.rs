//! Batches of work in, one committed transaction out. Work is events from the
//! broker, timers coming due, or a page of a sweep; each becomes a step on one
//! client's history, decided by the pure core, and the batch's events, client
//! states, effects, log lines and rejections are committed together. Knows
//! nothing of NATS, so the daemon, the scheduler, tests and benchmarks all
//! drive the same code.

use crate::catalog::Catalog;
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
}

/// Shared counters read from the store on first use in a batch. The core
/// runs on a blocking thread, so waiting for the query there is fine.
struct StoreCounters {
    store: AnyStore,
    runtime: tokio::runtime::Handle,
}

impl CounterSource for StoreCounters {
    fn load(&mut self, key: &CounterKey) -> Result<Stored, String> {
        self.runtime
            .block_on(self.store.load_counter(key))
            .map_err(|e| e.to_string())
    }
    fn is_member(&mut self, key: &CounterKey, member: &str) -> Result<bool, String> {
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

    pub fn store(&self) -> &AnyStore {
        &self.store
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Processes and commits one batch of messages. On `Ok` every message is
    /// safe to ack: it was stored, rejected and kept, or had taken effect before.
    pub async fn process(&self, batch: &[Incoming]) -> Result<BatchReport, StoreError> {
        let received_at = Utc::now();
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
                        continue;
                    }
                    events.push(StoredEvent {
                        envelope,
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
        // Each client's events in event time; the sort is stable, so ties keep
        // stream order.
        events.sort_by(|a, b| {
            (&a.envelope.client_id, a.envelope.occurred_at)
                .cmp(&(&b.envelope.client_id, b.envelope.occurred_at))
        });
        let steps: Vec<Step> = events.into_iter().map(Step::Event).collect();
        let mut report = self.commit_steps(steps, rejected, log, None).await?;
        report.duplicates += duplicates;
        let now = Utc::now();
        for published in batch.iter().filter_map(|m| m.published) {
            self.metrics
                .observe_latency((now - published).to_std().unwrap_or_default());
        }
        Ok(report)
    }

    /// Keeps a message that cannot be committed (with the error of one more
    /// try) as rejected, once the database is known to answer and the error
    /// is not an outage of the whole database (full, read-only, locked); so
    /// a poison message is recorded, not redelivered forever, and a good one
    /// is never set aside for the database's fault.
    pub async fn quarantine_poison(&self, m: &Incoming) -> Result<BatchReport, StoreError> {
        let error = match self.process(std::slice::from_ref(m)).await {
            Ok(report) => return Ok(report),
            // Full, read-only, locked or away: no message is to blame.
            Err(e) if e.is_outage() => return Err(e),
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
        self.commit_steps(steps, Vec::new(), Vec::new(), None).await
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
        self.commit_steps(steps, Vec::new(), Vec::new(), Some(progress))
            .await
    }

    async fn commit_steps(
        &self,
        steps: Vec<Step>,
        rejected: Vec<Rejected>,
        log: Vec<LogEntry>,
        sweep: Option<SweepProgress>,
    ) -> Result<BatchReport, StoreError> {
        for _ in 0..MAX_CONFLICT_RETRIES {
            let ids: Vec<&EventId> = steps
                .iter()
                .filter_map(|s| match s {
                    Step::Event(e) => Some(&e.envelope.id),
                    _ => None,
                })
                .collect();
            let known = if ids.is_empty() {
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
            let mut client_ids: Vec<&ClientId> = fresh.iter().map(Step::client).collect();
            client_ids.sort();
            client_ids.dedup();
            let states = self.store.load_clients(&client_ids).await?;
            let mut write = self.decide_all(fresh, states).await?;
            if self.suppress_effects {
                write.effects.clear();
                write.log.clear();
            }
            write.rejected = rejected.clone();
            write.log.extend(log.iter().cloned());
            write.sweep = sweep.clone();
            let report = BatchReport {
                accepted: write.events.len(),
                duplicates: known.len(),
                rejected: write.rejected.len(),
                effects: write.effects.len(),
            };
            match self.store.commit_batch(&write).await? {
                CommitOutcome::Committed => {
                    self.metrics.batch_committed(&report, &write);
                    self.announce(&write);
                    return Ok(report);
                }
                CommitOutcome::Conflict => {
                    tracing::debug!("batch conflicted with another writer; retrying");
                }
            }
        }
        Err(StoreError::Corrupt {
            context: "batch commit",
            message: format!("still conflicting after {MAX_CONFLICT_RETRIES} attempts"),
        })
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
    ) -> Result<BatchWrite, StoreError> {
        let rules = self.catalog.rules();
        let templates = self.catalog.templates();
        let engine = self.catalog.engine.clone();
        let metrics = self.metrics.clone();
        let catalog = self.catalog.clone();
        let settings = self.settings.clone();
        let source = StoreCounters {
            store: self.store.clone(),
            runtime: tokio::runtime::Handle::current(),
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
                for (rule, ok) in &d.runs {
                    metrics.rule_run(rule, *ok);
                }
                catalog.record_runs(&d.runs);
                write.effects.extend(d.effects);
                write.log.extend(d.log);
                if let Step::Event(e) = step {
                    write.events.push(e);
                }
                write
                    .events
                    .extend(d.events.into_iter().map(|envelope| StoredEvent {
                        envelope,
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
                .map(|(_, s)| s)
                .collect();
            (write, failure)
        };
        match tokio::task::spawn_blocking(run).await {
            // A counter that could not be read means a rule decided on
            // nothing: retry the batch rather than commit that.
            Ok((_, Some(failure))) => Err(StoreError::Counters(failure)),
            Ok((w, None)) => Ok(w),
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
