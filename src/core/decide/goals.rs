//! Knowing what works, as the decisions happen: exposures recorded when a
//! rule gives a client a variant or first mails them, marketing mail held
//! out for the global control group, opens, clicks and conversions (the
//! first goal event within the window) credited to the exposures they
//! follow. Every change is handed to the store with the batch, in the same
//! transaction as the events that caused it.

use super::{Core, Decision, Trigger, mail::engaged_mail};
use crate::core::rules::Rule;
use crate::domain::event::Envelope;
use crate::domain::experiments::{Exposure, ExposureRow, in_global_control};
use crate::domain::history::ClientState;
use crate::domain::log::{Level, LogEntry};
use serde_json::Value;

impl Core<'_> {
    /// Credits an event to the client's exposures: an open or click of a
    /// rule's mail, a goal event converting the exposures it meets.
    pub(super) fn credit(&self, state: &mut ClientState, event: &Envelope, d: &mut Decision) {
        if state.exposures.rows.is_empty() {
            return;
        }
        if let Some((mail, clicked)) = engaged_mail(state, event) {
            let changed = state.exposures.engaged(&mail.rule, clicked);
            push_rows(d, state, changed);
        }
        let total = event.data.get("total").and_then(Value::as_f64);
        let converted = state.exposures.goal_event(
            event.event_type.as_str(),
            total,
            event.occurred_at,
            event.id.as_str(),
        );
        for e in &converted {
            let variant = match e.group() {
                "" => String::new(),
                g => format!(" (variant `{g}` of `{}`)", e.experiment),
            };
            d.log.push(LogEntry {
                client_id: state.client_id.clone(),
                at: event.occurred_at,
                level: Level::Notice,
                rule: Some(e.rule.clone()),
                event_id: Some(event.id.clone()),
                message: format!(
                    "converted: `{}` within {} days of the rule's exposure{variant}, revenue {:.2}",
                    event.event_type.as_str(),
                    e.goal.as_ref().map_or(0, |g| g.within_days),
                    e.converted.as_ref().map_or(0.0, |c| c.revenue),
                ),
            });
        }
        push_rows(d, state, converted);
    }

    /// The exposures a successful run made: a variant given in an
    /// experiment the rule had not exposed the client to yet.
    pub(super) fn expose(
        &self,
        rule: &Rule,
        trigger: &Trigger,
        state: &mut ClientState,
        exposed: Vec<(String, String)>,
        d: &mut Decision,
    ) {
        let mut rows = Vec::new();
        for (experiment, variant) in exposed {
            let new = Exposure::new(
                &rule.name,
                &experiment,
                &variant,
                false,
                trigger.at,
                rule.goal.as_ref(),
            );
            rows.extend(state.exposures.expose(new).cloned());
        }
        push_rows(d, state, rows);
    }

    /// Whether the client is in the global control group, held out of all
    /// marketing mail.
    pub(super) fn held_out(&self, state: &ClientState) -> bool {
        in_global_control(
            state.client_id.as_str(),
            self.settings.global_control_percent,
        )
    }

    /// A marketing mail held out for the global control group: the client
    /// counts in the rule's reports as `global_control`, in whichever
    /// variant they were given. Clients of the global control group whose
    /// variant sends nothing stay in that variant: membership is
    /// independent of the variant, so every group remains a random sample.
    pub(super) fn hold_out(
        &self,
        rule: &Rule,
        trigger: &Trigger,
        state: &mut ClientState,
        d: &mut Decision,
    ) {
        let changed = state
            .exposures
            .held_out(&rule.name, trigger.at, rule.goal.as_ref());
        push_rows(d, state, changed);
    }

    /// A mail of the rule queued: counted on its exposures.
    pub(super) fn mailed(
        &self,
        rule: &Rule,
        trigger: &Trigger,
        state: &mut ClientState,
        d: &mut Decision,
    ) {
        let changed = state
            .exposures
            .mailed(&rule.name, trigger.at, rule.goal.as_ref());
        push_rows(d, state, changed);
    }
}

fn push_rows(d: &mut Decision, state: &ClientState, rows: Vec<Exposure>) {
    d.exposures
        .extend(rows.into_iter().map(|exposure| ExposureRow {
            client_id: state.client_id.as_str().to_string(),
            exposure,
        }));
}
