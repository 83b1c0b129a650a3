//! Time-driven work: timers coming due and scheduled rules (sweeps). Both go
//! through the pipeline like events, so they are decided by the same core and
//! committed with the same compare-and-swap on client versions: two instances
//! that fire the same timer conflict, and only one commit stands. A sweep is
//! claimed per occurrence with a lease and records its cursor with each page,
//! so a sweep cut short is resumed, not restarted.

use crate::config::SchedulerConfig;
use crate::domain::event::ClientId;
use crate::flow::catalog::Catalog;
use crate::flow::error::BatchError;
use crate::flow::pipeline::Pipeline;
use crate::store::{Schedules, StoreError};
use chrono::{DateTime, Duration, DurationRound, Utc};
use serde::Serialize;
use std::sync::Arc;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub struct Scheduler {
    pipeline: Arc<Pipeline>,
    catalog: Arc<Catalog>,
    cfg: SchedulerConfig,
    /// Woken when effects were queued, so the sender goes at once.
    outbox: Arc<Notify>,
}

/// What one sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SweepReport {
    pub rule: String,
    pub slot: DateTime<Utc>,
    pub clients: usize,
    pub effects: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum TriggerError {
    #[error("no rule named `{0}`")]
    UnknownRule(String),
    #[error("rule `{0}` has no `const SCHEDULE`: it runs on events, not on a schedule")]
    NotScheduled(String),
    #[error("a sweep of rule `{0}` is already running")]
    Busy(String),
    #[error(transparent)]
    Batch(#[from] BatchError),
}

impl From<StoreError> for TriggerError {
    fn from(e: StoreError) -> Self {
        TriggerError::Batch(e.into())
    }
}

impl Scheduler {
    pub fn new(
        pipeline: Arc<Pipeline>,
        catalog: Arc<Catalog>,
        cfg: SchedulerConfig,
        outbox: Arc<Notify>,
    ) -> Self {
        Self {
            pipeline,
            catalog,
            cfg,
            outbox,
        }
    }

    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut tick =
            tokio::time::interval(std::time::Duration::from_millis(self.cfg.tick_ms.get()));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.tick(Utc::now()).await {
                tracing::error!(error = %e, "scheduler tick failed; will retry");
            }
        }
    }

    /// Fires due timers, then runs any schedule whose occurrence has come.
    pub async fn tick(&self, now: DateTime<Utc>) -> Result<(), BatchError> {
        self.fire_timers(now).await?;
        let rules = self.catalog.rules();
        for rule in rules.rules.iter().filter(|r| r.schedule.is_some()) {
            let Some(slot) = self.latest_slot(rule, now) else {
                continue;
            };
            if let Some(report) = self.sweep(&rule.name, slot, now).await? {
                tracing::info!(?report, "scheduled sweep done");
            }
        }
        Ok(())
    }

    /// Fires every timer due by `now`, a page of clients per transaction.
    pub async fn fire_timers(&self, now: DateTime<Utc>) -> Result<usize, BatchError> {
        let mut fired = 0;
        loop {
            let due = self
                .pipeline
                .store()
                .due_clients(now, self.cfg.page_size.get())
                .await?;
            if due.is_empty() {
                return Ok(fired);
            }
            let n = due.len();
            let (effects, refused) = match self.pipeline.advance(due.clone(), now).await {
                Ok(report) => (report.effects, 0),
                // One client's timers that the database refuses must not
                // hold back everyone's: the page again, client by client.
                Err(e) if e.is_poison() => self.fire_one_by_one(due, now).await?,
                Err(e) => return Err(e),
            };
            fired += n - refused;
            if effects > 0 {
                self.outbox.notify_one();
            }
            // A refused client is still due: the same page would come back.
            if refused > 0 || n < self.cfg.page_size.get() as usize {
                return Ok(fired);
            }
        }
    }

    /// Fires each client's due timers alone; a client the database refuses
    /// is left due (tried again next tick) and said in the log. The effects
    /// queued, and how many clients were refused.
    async fn fire_one_by_one(
        &self,
        clients: Vec<ClientId>,
        now: DateTime<Utc>,
    ) -> Result<(usize, usize), BatchError> {
        let (mut effects, mut refused) = (0, 0);
        for client in clients {
            match self.pipeline.advance(vec![client.clone()], now).await {
                Ok(report) => effects += report.effects,
                Err(e) if e.is_poison() => {
                    tracing::error!(%client, error = %e, "the database refuses what this client's due timers decide; left due, the other clients' timers go on");
                    refused += 1;
                }
                Err(e) => return Err(e),
            }
        }
        Ok((effects, refused))
    }

    /// The latest occurrence of the rule's schedule that is not older than
    /// the catch-up window.
    fn latest_slot(
        &self,
        rule: &crate::core::rules::Rule,
        now: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        let schedule = rule.schedule.as_ref()?;
        let from = now - Duration::hours(self.cfg.catch_up_hours as i64);
        schedule.cron.after(&from).take_while(|t| *t <= now).last()
    }

    /// Runs the schedule of `rule` now, for a marketer who does not want to wait.
    pub async fn trigger(&self, rule: &str) -> Result<SweepReport, TriggerError> {
        let rules = self.catalog.rules();
        let r = rules
            .get(rule)
            .ok_or_else(|| TriggerError::UnknownRule(rule.to_string()))?;
        if r.schedule.is_none() {
            return Err(TriggerError::NotScheduled(rule.to_string()));
        }
        let now = Utc::now();
        let slot = now.duration_trunc(Duration::seconds(1)).unwrap_or(now);
        self.sweep(rule, slot, now)
            .await?
            .ok_or_else(|| TriggerError::Busy(rule.to_string()))
    }

    /// Claims the sweep of `rule` at `slot` and runs it to the end, a page of
    /// clients per transaction. `None` when it is done or held elsewhere.
    pub async fn sweep(
        &self,
        rule: &str,
        slot: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Option<SweepReport>, BatchError> {
        let store = self.pipeline.store();
        let lease = now + Duration::seconds(self.cfg.lease_secs.get() as i64);
        let Some(claim) = store.claim_sweep(rule, slot, now, lease).await? else {
            return Ok(None);
        };
        let mut report = SweepReport {
            rule: rule.to_string(),
            slot,
            ..Default::default()
        };
        let mut cursor: Option<ClientId> = claim.cursor;
        loop {
            let page = store
                .client_page(cursor.as_ref(), self.cfg.page_size.get())
                .await?;
            let done = page.len() < self.cfg.page_size.get() as usize;
            let n = page.len();
            let next = page.last().cloned().or(cursor.clone());
            let r = match self
                .pipeline
                .sweep_page(rule, slot, cursor.clone(), page.clone(), done)
                .await
            {
                Ok(r) => r,
                // One client the database refuses must not stop the sweep
                // for everyone: the page again, client by client.
                Err(e) if e.is_poison() => {
                    self.sweep_one_by_one(rule, slot, cursor.clone(), page, done)
                        .await?
                }
                Err(e) => return Err(e),
            };
            report.clients += n;
            report.effects += r.effects;
            if r.effects > 0 {
                self.outbox.notify_one();
            }
            if done {
                return Ok(Some(report));
            }
            cursor = next;
        }
    }

    /// Runs a page of a sweep one client at a time, each with the sweep's
    /// progress. A client whose run the database refuses is passed over
    /// (the progress moves past it, said in the log), so the sweep goes on.
    async fn sweep_one_by_one(
        &self,
        rule: &str,
        slot: DateTime<Utc>,
        mut after: Option<ClientId>,
        page: Vec<ClientId>,
        done: bool,
    ) -> Result<crate::flow::pipeline::BatchReport, BatchError> {
        let mut total = crate::flow::pipeline::BatchReport::default();
        let last = page.len().saturating_sub(1);
        for (i, client) in page.into_iter().enumerate() {
            let done = done && i == last;
            match self
                .pipeline
                .sweep_page(rule, slot, after.clone(), vec![client.clone()], done)
                .await
            {
                Ok(r) => total.add(&r),
                Err(e) if e.is_poison() => {
                    tracing::error!(%client, rule, error = %e, "the database refuses what this client's sweep decides; passed over, the sweep goes on");
                    self.pipeline
                        .sweep_page(rule, slot, Some(client.clone()), Vec::new(), done)
                        .await?;
                }
                Err(e) => return Err(e),
            }
            after = Some(client);
        }
        Ok(total)
    }
}
