//! The steps of a batch and how they are decided: one step per event,
//! due timer or sweep of a client, run through the pure core in stream
//! order off the async workers, with panics caught and the step set aside.

use super::Pipeline;
use crate::core::decide::Core;
use crate::domain::counters::{CounterKey, CounterSource, Counters, Stored};
use crate::domain::event::ClientId;
use crate::domain::history::ClientState;
use crate::domain::log::{Level, LogEntry};
use crate::flow::chain::Chain;
use crate::flow::error::{BatchError, Cause};
use crate::store::StoreError;
use crate::store::{AnyStore, BatchWrite, State, StoredEvent};
use chrono::{DateTime, Utc};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// The events in the order of the stream: the one order every decision
/// follows, live, in replay and in backtest, whatever the batches. Each
/// client's own events are applied in it, and so are the steps that use the
/// counters shared by all clients, across clients (a shop that publishes in
/// time order makes it event-time order, ties broken by stream sequence).
/// Events that came without a sequence (driven directly, not from the
/// stream) keep the order they were given in; the sort is stable.
pub(super) fn ordered_steps(mut events: Vec<StoredEvent>) -> Vec<Step> {
    events.sort_by_key(|e| e.stream_seq);
    events.into_iter().map(Step::Event).collect()
}

/// The events before stream sequence `at`, and the ones from it on.
pub(super) fn split_before(
    events: Vec<StoredEvent>,
    at: u64,
) -> (Vec<StoredEvent>, Vec<StoredEvent>) {
    events
        .into_iter()
        .partition(|e| e.stream_seq.is_none_or(|s| s < at))
}

/// One unit of work on one client's history.
#[derive(Debug, Clone)]
pub(super) enum Step {
    Event(StoredEvent),
    /// Fire the client's timers due by this time.
    Advance(ClientId, DateTime<Utc>),
    /// Run a scheduled rule for the client at the sweep's slot.
    Sweep(ClientId, String, DateTime<Utc>),
}

impl Step {
    pub(super) fn client(&self) -> &ClientId {
        match self {
            Step::Event(e) => &e.envelope.client_id,
            Step::Advance(c, _) | Step::Sweep(c, ..) => c,
        }
    }

    /// What names this step when it must be set aside: the event, the
    /// client's first due timer (as the step begins), or the sweep.
    pub(super) fn key(&self, state: &ClientState) -> String {
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
    pub(super) fn set_aside(
        &self,
        state: &mut ClientState,
        why: &str,
    ) -> crate::core::decide::Decision {
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
pub(super) struct Poisoned {
    /// The keys in the order they were set aside (the oldest go first), and
    /// the map the batches read, replaced whole on each insert: inserts are
    /// rare (a panic), reads are every batch's once there was one.
    keys: std::sync::Mutex<SetAside>,
}

/// The map the batches read, and the keys in the order they came.
pub(super) type SetAside = (
    Arc<HashMap<String, String>>,
    std::collections::VecDeque<String>,
);

/// Steps remembered as set aside at most.
pub(super) const MAX_POISONED: usize = 10_000;

impl Poisoned {
    pub(super) fn insert(&self, key: String, message: String) {
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
    pub(super) fn snapshot(&self) -> Option<Arc<HashMap<String, String>>> {
        let guard = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        (!guard.0.is_empty()).then(|| guard.0.clone())
    }
}

/// Rules that ran in a batch, whether each succeeded, and for which client.
pub(super) type Runs = Vec<(String, bool, ClientId)>;

/// A batch's steps decided: what to write, the rule runs, and the stream
/// sequences of the steps that used shared counters.
pub(super) type DecidedSteps = (BatchWrite, Runs, Vec<u64>);

/// A step whose decision panicked: the batch's steps given back, with the
/// step's key and the panic's message.
pub(super) type Panicked = (Vec<Step>, String, String);

/// Shared counters read from the store on first use in a batch. The core
/// runs on a blocking thread, so waiting for the query there is fine.
pub(super) struct StoreCounters {
    store: AnyStore,
    runtime: tokio::runtime::Handle,
    /// Deciding ahead as the batch of this turn: the pending values of the
    /// batches before it come first.
    ahead: Option<(Arc<Chain>, u64)>,
    /// The first error a read met, kept typed: the core sees only that a
    /// counter could not be read, the batch's error says why.
    failed: Arc<std::sync::Mutex<Option<StoreError>>>,
}

impl StoreCounters {
    fn keep<T>(&self, result: Result<T, StoreError>) -> Result<T, String> {
        result.map_err(|e| {
            let message = e.to_string();
            let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            failed.get_or_insert(e);
            message
        })
    }
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
        self.keep(self.runtime.block_on(self.store.load_counter(key)))
    }
    fn is_member(&mut self, key: &CounterKey, member: &str) -> Result<bool, String> {
        if let Some((chain, turn)) = &self.ahead
            && chain.is_member(key, member, *turn)
        {
            return Ok(true);
        }
        self.keep(self.runtime.block_on(self.store.is_member(key, member)))
    }
    fn list(&mut self, name: &str) -> Result<Vec<(String, f64)>, String> {
        use crate::store::Products;
        // The pending rows first, then the database, as `load` does: a
        // batch that commits in between has retired its rows by the time
        // the database shows them, so none falls between the two reads.
        let pending = match &self.ahead {
            Some((chain, turn)) => chain.family(name, *turn),
            None => Vec::new(),
        };
        let mut rows: std::collections::BTreeMap<String, f64> = self
            .keep(self.runtime.block_on(self.store.counter_family(name)))?
            .into_iter()
            .collect();
        for (period, stored) in pending {
            rows.insert(period, stored.value);
        }
        Ok(rows.into_iter().collect())
    }
}

impl Pipeline {
    /// Runs the decision core for every step, in the order given, off the
    /// async workers: rules are CPU work and must not stall I/O. Notes the
    /// stream sequences of the steps that used shared counters. A step that
    /// panics stops the run: `Err` gives the steps back with the panicking
    /// step's key and message, for the caller to set it aside and decide
    /// again (the states may be half-changed by then).
    pub(super) async fn decide_all(
        &self,
        steps: Vec<Step>,
        mut states: HashMap<ClientId, ClientState>,
        ahead: Option<u64>,
    ) -> Result<Result<DecidedSteps, Panicked>, BatchError> {
        let rules = self.catalog.rules();
        let templates = self.catalog.templates();
        let engine = self.catalog.engine.clone();
        let settings = self.settings.clone();
        let source = StoreCounters {
            store: self.store.clone(),
            runtime: tokio::runtime::Handle::current(),
            ahead: ahead.map(|turn| (self.chain.clone(), turn)),
            failed: Default::default(),
        };
        let failed = source.failed.clone();
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
                write.exposures.extend(d.exposures);
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
            Ok(Ok((_, _, _, Some(failure)))) => {
                let kept = failed.lock().unwrap_or_else(|p| p.into_inner()).take();
                Err(match kept {
                    Some(e) => e.into(),
                    None => BatchError::Transient(Cause::Counters(failure)),
                })
            }
            Ok(Ok((w, runs, shared, None))) => Ok(Ok((w, runs, shared))),
            // Every step runs under catch_unwind: what is left is a bug in
            // this function itself.
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}
