//! `nudge report` and `/api/reports/{rule}`: a rule's report from the
//! exposures the store keeps; and the backtest's, from the exposures a
//! backtest's decisions made.

use crate::core::report::{Report, ReportBuilder};
use crate::domain::experiments::{Exposure, ExposureRow, Goal};
use crate::store::{AnyStore, Reports};
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, HashMap};

/// The report of `rule` over exposures made in `[since, until)`, measured
/// against the goals they were made under; `goal` is the rule's goal now,
/// shown with it.
pub async fn stored(
    store: &AnyStore,
    rule: &str,
    goal: Option<Goal>,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
) -> anyhow::Result<Report> {
    let mut builder = ReportBuilder::default();
    store
        .each_exposure(rule, since, until, &mut |e| builder.add(&e))
        .await?;
    let mut report = builder.finish(rule, goal);
    report.since = since;
    report.until = until;
    Ok(report)
}

/// Exposures as a backtest's decisions leave them: the last change of each.
#[derive(Debug, Default)]
pub struct Collected {
    latest: HashMap<(String, String, String), Exposure>,
}

impl Collected {
    pub fn add(&mut self, rows: Vec<ExposureRow>) {
        for r in rows {
            let key = (
                r.exposure.rule.clone(),
                r.exposure.experiment.clone(),
                r.client_id,
            );
            self.latest.insert(key, r.exposure);
        }
    }

    /// A report per rule with exposures in `[since, until)`, labelled as a
    /// baseline: nothing was sent when these clients did what they did.
    pub fn reports(
        self,
        goals: impl Fn(&str) -> Option<Goal>,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
    ) -> BTreeMap<String, Report> {
        let mut builders: BTreeMap<String, ReportBuilder> = BTreeMap::new();
        // In the store's order (rule, experiment, client): float sums then
        // agree with a stored report's to the last bit.
        let mut all: Vec<_> = self.latest.into_iter().collect();
        all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (_, e) in all {
            if since.is_some_and(|s| e.at < s) || until.is_some_and(|u| e.at >= u) {
                continue;
            }
            builders.entry(e.rule.clone()).or_default().add(&e);
        }
        builders
            .into_iter()
            .map(|(rule, b)| {
                let mut r = b.finish(&rule, goals(&rule));
                r.since = since;
                r.until = until;
                r.baseline_only = true;
                (rule, r)
            })
            .collect()
    }
}
