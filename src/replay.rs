//! Walking the stored history again through the decision core: the shop's
//! events in event-time order, with the sweeps that ran at their times.
//!
//! `nudge replay` uses it to rebuild the derived history (clients, sessions,
//! timers, counters) after a fix, with effects suppressed; `nudge backtest`
//! runs a set of rules over it on a scratch copy and reports what they would
//! have done. Nothing is sent and, for a backtest, nothing is written.

use crate::counters::{Counters, MemorySource};
use crate::decide::{Core, Decision};
use crate::event::{ClientId, Envelope};
use crate::history::ClientState;
use crate::store::{Derived, LogCursor, Store, StoreError};
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use std::collections::HashMap;

/// Clients and counters as the walk builds them, all in memory.
pub struct Replay<'a> {
    core: Core<'a>,
    states: HashMap<ClientId, ClientState>,
    counters: Counters,
}

impl<'a> Replay<'a> {
    pub fn new(core: Core<'a>, tz: Tz) -> Self {
        Self {
            core,
            states: HashMap::new(),
            counters: Counters::new(Box::new(MemorySource::default()), tz),
        }
    }

    pub fn event(&mut self, event: &Envelope) -> Decision {
        let state = self
            .states
            .entry(event.client_id.clone())
            .or_insert_with(|| ClientState::new(event.client_id.clone()));
        self.core.on_event(state, event, &mut self.counters)
    }

    /// Runs a sweep for every client known at its time, in id order as live.
    pub fn sweep(&mut self, rule: &str, slot: DateTime<Utc>) -> Vec<Decision> {
        let Some(rule) = self.core.rules.get(rule) else {
            return Vec::new();
        };
        let mut ids: Vec<ClientId> = self.states.keys().cloned().collect();
        ids.sort();
        ids.into_iter()
            .filter_map(|id| {
                let state = self.states.get_mut(&id)?;
                Some(self.core.sweep(state, rule, slot, &mut self.counters))
            })
            .collect()
    }

    /// Fires every timer due by `until`, client by client.
    pub fn advance_all(&mut self, until: DateTime<Utc>) -> Vec<Decision> {
        let mut ids: Vec<ClientId> = self.states.keys().cloned().collect();
        ids.sort();
        ids.into_iter()
            .filter_map(|id| {
                let state = self.states.get_mut(&id)?;
                Some(self.core.advance(state, until, &mut self.counters))
            })
            .collect()
    }

    /// The derived history the walk built.
    pub fn into_derived(self) -> Derived {
        let (writes, members) = self.counters.writes();
        let mut clients: Vec<ClientState> = self.states.into_values().collect();
        clients.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        Derived {
            clients,
            counters: writes.into_iter().map(|w| (w.key, w.value)).collect(),
            members,
        }
    }
}

/// How far a walk got.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub events: u64,
    pub sweeps: u64,
}

/// Events read from the log at a time.
pub const PAGE: u32 = 10_000;

/// Feeds the stored events up to `until` (and the sweeps logged before it)
/// to `replay` in time order; `on_decision` sees each decision with the
/// time of its trigger. The next page of the log is read (and decoded) while
/// this one is decided.
pub async fn walk<S: Store + Clone>(
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
        for (event, _) in page {
            if until.is_some_and(|u| event.occurred_at > u) {
                next = None;
                break;
            }
            if !erased.is_empty() && erased.contains(&crate::store::erasure_hash(&event.client_id))
            {
                continue;
            }
            while let Some((rule, slot)) = sweeps.next_if(|(_, slot)| *slot <= event.occurred_at) {
                for d in replay.sweep(&rule, slot) {
                    on_decision(slot, d);
                }
                progress.sweeps += 1;
            }
            let d = replay.event(&event);
            on_decision(event.occurred_at, d);
            progress.events += 1;
        }
        on_progress(progress);
    }
    for (rule, slot) in sweeps {
        if until.is_some_and(|u| slot > u) {
            break;
        }
        for d in replay.sweep(&rule, slot) {
            on_decision(slot, d);
        }
        progress.sweeps += 1;
    }
    // Timers due by the end fire, as they did (or will) live.
    let end = until.unwrap_or_else(Utc::now);
    for d in replay.advance_all(end) {
        on_decision(end, d);
    }
    Ok(progress)
}
