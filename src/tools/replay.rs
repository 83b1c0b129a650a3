//! Walking the stored history again through the decision core: the shop's
//! events in the order of the stream, the order the daemon decided them in
//! (event-time order for a shop that publishes in time order; a late event
//! where it arrived), with the sweeps that ran at their times.
//!
//! `nudge replay` uses it to rebuild the derived history (clients, sessions,
//! timers, counters) after a fix, with effects suppressed; `nudge backtest`
//! runs a set of rules over it on a scratch copy and reports what they would
//! have done. Nothing is sent and, for a backtest, nothing is written.

use crate::core::decide::{Core, Decision};
use crate::core::rules::Rule;
use crate::domain::counters::{CounterKey, CounterSource, Counters, Stored};
use crate::domain::event::{ClientId, Envelope};
use crate::domain::history::ClientState;
use crate::store::{Derived, History, LogCursor, StoreError};
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

/// Events read from the log at a time.
pub const PAGE: u32 = 10_000;

/// Clients and counters as the walk builds them, all in memory.
///
/// Clients are split into shards by a hash of their id, and each stretch of
/// the walk (a page of the log) is decided by one thread per shard: a
/// client's decisions read only its own history, so shards need not wait for
/// each other, except over the counters shared by all clients. Those are used
/// in the walk's order exactly as one thread would: every step of the walk
/// (an event, a sweep of one client, the last timers of one client) has a
/// number, and a step may touch a shared counter only once every other shard
/// is past it ([`Turns`]). Decisions are handed on in step order, so the walk
/// decides and reports the same as one thread going through the log.
pub struct Replay<'a> {
    core: Core<'a>,
    tz: Tz,
    /// Each shard's clients.
    shards: Vec<HashMap<ClientId, ClientState>>,
    /// Every client met so far: the ones a sweep runs for.
    known: HashSet<ClientId>,
    turns: Arc<Turns>,
    /// The number of the next step.
    step: u64,
    /// Decisions of the last plan run, in step order, not yet handed on.
    decided: Vec<(u64, DateTime<Utc>, Decision)>,
}

/// What one step of the walk does, for one client.
enum Work<'p, 'a> {
    Event(&'p Envelope),
    Sweep(&'a Rule, ClientId),
    Advance(ClientId),
}

/// A step, numbered in walk order, with the time it happens at.
struct Job<'p, 'a> {
    step: u64,
    at: DateTime<Utc>,
    work: Work<'p, 'a>,
}

/// The steps of one stretch of the walk, per shard.
struct Plan<'p, 'a> {
    jobs: Vec<Vec<Job<'p, 'a>>>,
}

impl<'a> Replay<'a> {
    pub fn new(core: Core<'a>, tz: Tz) -> Self {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
        Self::with_shards(core, tz, n)
    }

    /// With `n` shards (threads) rather than one per core.
    pub fn with_shards(core: Core<'a>, tz: Tz, n: usize) -> Self {
        let n = n.max(1);
        Self {
            core,
            tz,
            shards: (0..n).map(|_| HashMap::new()).collect(),
            known: HashSet::new(),
            turns: Arc::new(Turns::new(n)),
            step: 0,
            decided: Vec::new(),
        }
    }

    fn shard_of(&self, client: &ClientId) -> usize {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        client.hash(&mut h);
        (h.finish() % self.shards.len() as u64) as usize
    }

    fn plan<'p>(&self) -> Plan<'p, 'a> {
        Plan {
            jobs: (0..self.shards.len()).map(|_| Vec::new()).collect(),
        }
    }

    fn push<'p>(
        &mut self,
        plan: &mut Plan<'p, 'a>,
        client: &ClientId,
        at: DateTime<Utc>,
        work: Work<'p, 'a>,
    ) {
        let shard = self.shard_of(client);
        plan.jobs[shard].push(Job {
            step: self.step,
            at,
            work,
        });
        self.step += 1;
    }

    fn plan_event<'p>(&mut self, plan: &mut Plan<'p, 'a>, event: &'p Envelope) {
        if !self.known.contains(&event.client_id) {
            self.known.insert(event.client_id.clone());
        }
        self.push(
            plan,
            &event.client_id,
            event.occurred_at,
            Work::Event(event),
        );
    }

    /// Every client known by now, in id order, as live.
    fn known_sorted(&self) -> Vec<ClientId> {
        let mut ids: Vec<ClientId> = self.known.iter().cloned().collect();
        ids.sort();
        ids
    }

    /// A sweep of `rule` at `slot` for every client known at its time.
    fn plan_sweep(&mut self, plan: &mut Plan<'_, 'a>, rule: &str, slot: DateTime<Utc>) {
        let rules: &'a crate::core::rules::loader::RuleSet = self.core.rules;
        let Some(rule) = rules.get(rule) else {
            return;
        };
        for id in self.known_sorted() {
            self.push(plan, &id.clone(), slot, Work::Sweep(rule, id));
        }
    }

    /// Every timer due by `until`, client by client.
    fn plan_advance(&mut self, plan: &mut Plan<'_, 'a>, until: DateTime<Utc>) {
        for id in self.known_sorted() {
            self.push(plan, &id.clone(), until, Work::Advance(id));
        }
    }

    /// Decides the plan's steps, a thread per shard. Meanwhile this thread
    /// hands on the decisions of the plan before (in step order), so that
    /// work overlaps the deciding; this plan's are kept for the next call.
    fn run(&mut self, plan: Plan<'_, 'a>, on_decision: &mut impl FnMut(DateTime<Utc>, Decision)) {
        let end = self.step;
        let core = &self.core;
        let (tz, turns) = (self.tz, &self.turns);
        let before = std::mem::take(&mut self.decided);
        let results: Vec<Vec<(u64, DateTime<Utc>, Decision)>> = std::thread::scope(|s| {
            let shards: Vec<_> = self
                .shards
                .iter_mut()
                .zip(plan.jobs)
                .enumerate()
                .map(|(k, (states, jobs))| {
                    s.spawn(move || decide_shard(core, tz, turns, k, states, jobs, end))
                })
                .collect();
            for (_, at, d) in before {
                on_decision(at, d);
            }
            shards
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        });
        let mut decided: Vec<(u64, DateTime<Utc>, Decision)> =
            results.into_iter().flatten().collect();
        decided.sort_unstable_by_key(|(step, _, _)| *step);
        self.decided = decided;
    }

    /// Hands on the decisions [`Replay::run`] still holds.
    fn flush(&mut self, on_decision: &mut impl FnMut(DateTime<Utc>, Decision)) {
        for (_, at, d) in std::mem::take(&mut self.decided) {
            on_decision(at, d);
        }
    }

    /// The derived history the walk built.
    pub fn into_derived(self) -> Derived {
        let mut clients: Vec<ClientState> = self
            .shards
            .into_iter()
            .flat_map(|s| s.into_values())
            .collect();
        clients.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        let shared = self.turns.shared();
        // As one walk's counters would write them: those that changed from nothing.
        let mut counters: Vec<(CounterKey, f64)> = shared
            .values
            .iter()
            .filter(|(_, v)| **v != 0.0)
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        counters.sort_by(|a, b| a.0.cmp(&b.0));
        Derived {
            clients,
            counters,
            members: shared.added.clone(),
        }
    }
}

/// One shard's part of a plan: its steps in order, each with counters that
/// wait for its turn.
fn decide_shard<'a>(
    core: &Core<'a>,
    tz: Tz,
    turns: &Arc<Turns>,
    shard: usize,
    states: &mut HashMap<ClientId, ClientState>,
    jobs: Vec<Job<'_, 'a>>,
    end: u64,
) -> Vec<(u64, DateTime<Utc>, Decision)> {
    // Past the plan once done, or if a rule panics: nobody waits for a
    // shard that has stopped.
    let _done = Done { turns, shard, end };
    let mut out = Vec::with_capacity(jobs.len());
    for job in jobs {
        turns.reach(shard, job.step);
        let mut counters = Counters::new(
            Box::new(Turn {
                turns: turns.clone(),
                shard,
                step: job.step,
            }),
            tz,
        );
        let d = match job.work {
            Work::Event(event) => {
                if !states.contains_key(&event.client_id) {
                    let id = event.client_id.clone();
                    states.insert(id.clone(), ClientState::new(id));
                }
                let state = states.get_mut(&event.client_id).expect("inserted above");
                core.on_event(state, event, &mut counters)
            }
            Work::Sweep(rule, id) => match states.get_mut(&id) {
                Some(state) => core.sweep(state, rule, job.at, &mut counters),
                None => continue,
            },
            Work::Advance(id) => match states.get_mut(&id) {
                Some(state) => core.advance(state, job.at, &mut counters),
                None => continue,
            },
        };
        turns.publish(&counters);
        out.push((job.step, job.at, d));
    }
    out
}

/// Where each shard is in the walk, and the shared counters, used in turn.
struct Turns {
    /// Per shard: every step below this one is decided (and its counters
    /// published).
    reached: Vec<AtomicU64>,
    /// Shards waiting for their turn.
    waiting: AtomicUsize,
    shared: Mutex<Shared>,
    turn: Condvar,
}

/// The counters shared by all clients, as the walk so far left them.
#[derive(Default)]
struct Shared {
    values: HashMap<CounterKey, f64>,
    members: HashSet<(CounterKey, String)>,
    /// Members in the order they were added.
    added: Vec<(CounterKey, String)>,
}

impl Turns {
    fn new(shards: usize) -> Self {
        Self {
            reached: (0..shards).map(|_| AtomicU64::new(0)).collect(),
            waiting: AtomicUsize::new(0),
            shared: Mutex::new(Shared::default()),
            turn: Condvar::new(),
        }
    }

    fn shared(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `shard` is at `step`: everything before it is decided.
    fn reach(&self, shard: usize, step: u64) {
        self.reached[shard].store(step, SeqCst);
        // SeqCst on both sides: a shard that is about to wait either sees
        // this step, or is counted here and woken (see `wait_turn`).
        if self.waiting.load(SeqCst) > 0 {
            let _held = self.shared();
            self.turn.notify_all();
        }
    }

    /// The shared counters, once every other shard is past `step`.
    fn wait_turn(&self, shard: usize, step: u64) -> MutexGuard<'_, Shared> {
        let others_past = || {
            self.reached
                .iter()
                .enumerate()
                .all(|(k, r)| k == shard || r.load(SeqCst) >= step)
        };
        let mut shared = self.shared();
        if others_past() {
            return shared;
        }
        self.waiting.fetch_add(1, SeqCst);
        while !others_past() {
            shared = self
                .turn
                .wait(shared)
                .unwrap_or_else(PoisonError::into_inner);
        }
        self.waiting.fetch_sub(1, SeqCst);
        shared
    }

    /// What one step changed in the shared counters, before the shard moves on.
    fn publish(&self, counters: &Counters) {
        let (writes, added) = counters.writes();
        if writes.is_empty() && added.is_empty() {
            return;
        }
        let mut shared = self.shared();
        for w in writes {
            shared.values.insert(w.key, w.value);
        }
        for m in added {
            shared.members.insert(m.clone());
            shared.added.push(m);
        }
    }
}

/// Marks a shard past its plan when it finishes or stops.
struct Done<'t> {
    turns: &'t Turns,
    shard: usize,
    end: u64,
}

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.turns.reach(self.shard, self.end);
    }
}

/// The shared counters as one step sees them: read once its turn has come.
struct Turn {
    turns: Arc<Turns>,
    shard: usize,
    step: u64,
}

impl CounterSource for Turn {
    fn load(&mut self, key: &CounterKey) -> Result<Stored, String> {
        let shared = self.turns.wait_turn(self.shard, self.step);
        Ok(Stored {
            value: shared.values.get(key).copied().unwrap_or_default(),
            version: 0,
        })
    }

    fn is_member(&mut self, key: &CounterKey, member: &str) -> Result<bool, String> {
        let shared = self.turns.wait_turn(self.shard, self.step);
        Ok(shared.members.contains(&(key.clone(), member.to_string())))
    }

    fn list(&mut self, name: &str) -> Result<Vec<(String, f64)>, String> {
        let shared = self.turns.wait_turn(self.shard, self.step);
        Ok(shared
            .values
            .iter()
            .filter(|(k, _)| k.name == name)
            .map(|(k, v)| (k.period.clone(), *v))
            .take(crate::domain::counters::MAX_FAMILY_ROWS)
            .collect())
    }
}

/// How far a walk got.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub events: u64,
    pub sweeps: u64,
}

/// Feeds the stored events up to `until` (and the sweeps logged before it)
/// to `replay` in stream order; `on_decision` sees each decision with the
/// time of its trigger, in that order. The next page of the log is read
/// (and decoded) while this one is decided.
pub async fn walk<S: History + Clone + Send + Sync + 'static>(
    store: &S,
    replay: &mut Replay<'_>,
    until: Option<DateTime<Utc>>,
    mut on_decision: impl FnMut(DateTime<Utc>, Decision),
    mut on_progress: impl FnMut(Progress),
) -> Result<Progress, StoreError> {
    let mut sweeps = store.sweep_log().await?.into_iter().peekable();
    // Erased clients stay erased: their events are not replayed.
    let erased = store.erased().await?;
    let mut progress = Progress::default();
    let read = |after: Option<LogCursor>| {
        let store = store.clone();
        tokio::spawn(async move { store.events_page(after.as_ref(), PAGE).await })
    };
    let mut next = Some(read(None));
    while let Some(reading) = next.take() {
        let page = match reading.await {
            Ok(page) => page?,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        if page.len() == PAGE as usize
            && let Some((_, last)) = page.last()
        {
            next = Some(read(Some(last.clone())));
        }
        let mut plan = replay.plan();
        for (event, _) in &page {
            // The log is in stream order: a late event (an earlier event
            // time) may still follow one past `until`, so read on.
            if until.is_some_and(|u| event.occurred_at > u) {
                continue;
            }
            if !erased.is_empty() && erased.contains(&crate::store::erasure_hash(&event.client_id))
            {
                continue;
            }
            while let Some((rule, slot)) = sweeps.next_if(|(_, slot)| *slot <= event.occurred_at) {
                replay.plan_sweep(&mut plan, &rule, slot);
                progress.sweeps += 1;
            }
            replay.plan_event(&mut plan, event);
            progress.events += 1;
        }
        replay.run(plan, &mut on_decision);
        on_progress(progress);
    }
    let mut plan = replay.plan();
    for (rule, slot) in sweeps {
        if until.is_some_and(|u| slot > u) {
            break;
        }
        replay.plan_sweep(&mut plan, &rule, slot);
        progress.sweeps += 1;
    }
    // Timers due by the end fire, as they did (or will) live.
    let end = until.unwrap_or_else(Utc::now);
    replay.plan_advance(&mut plan, end);
    replay.run(plan, &mut on_decision);
    replay.flush(&mut on_decision);
    Ok(progress)
}
