//! What a trigger's mails and secondary events become: a mail request
//! checked against consent, unsubscription, caps and the address; the
//! envelope of an emitted event; opens and clicks tied to their mail.

use super::{Core, Trigger, views::mail_defaults};
use crate::core::templates::MailKind;
use crate::domain::counters::Counters;
use crate::domain::effects::EffectKind;
use crate::domain::event::{ClientId, Envelope, EventId, EventType};
use crate::domain::history::{ClientState, SentMail};
use crate::domain::log::Level;
use chrono::{DateTime, Duration, Utc};
use serde_json::{Map, Value, json};

pub(super) fn describe(kind: &EffectKind) -> String {
    match kind {
        EffectKind::Mail { template, to, .. } => format!("mail `{template}` queued to {to}"),
        EffectKind::Emit { event_type, .. } => format!("event `{event_type}` emitted"),
        EffectKind::Task { team, title, .. } => format!("task for {team}: {title}"),
        other => super::channels::describe(other),
    }
}

impl Core<'_> {
    /// Ties `email_opened` / `email_clicked` to the mail they name (by its
    /// Message-ID) and counts them per rule and template, for everyone.
    pub(super) fn count_engagement(
        &self,
        state: &mut ClientState,
        event: &Envelope,
        counters: &mut Counters,
    ) -> Result<(), String> {
        let Some((mail, clicked)) = engaged_mail(state, event) else {
            return Ok(());
        };
        let what = if clicked {
            state.stats.clicks += 1;
            "clicked"
        } else {
            state.stats.opens += 1;
            "opened"
        };
        let key = counters.key(
            &format!("mail_{what}:{}:{}", mail.rule, mail.template),
            "all",
            event.occurred_at,
        )?;
        counters.add(&key, 1.0).map(|_| ())
    }

    /// The envelope of a secondary event: its id derives from the rule, the
    /// cause and the position, so a replay emits the very same event.
    pub(super) fn secondary(
        &self,
        rule: &str,
        trigger: &Trigger,
        client_id: &ClientId,
        event_type: &str,
        mut data: Map<String, Value>,
        key: &str,
    ) -> Result<Envelope, String> {
        let ty = EventType::parse(event_type).map_err(|e| format!("emit refused: {e}"))?;
        let id = format!("nudge-{key}");
        data.insert("caused_by".into(), json!(trigger.cause));
        let mut context = Map::new();
        context.insert("source".into(), json!("nudge"));
        context.insert("rule".into(), json!(rule));
        context.insert("nudge_depth".into(), json!(trigger.depth + 1));
        Ok(Envelope {
            id: EventId::parse(id).map_err(|e| e.to_string())?,
            event_type: ty,
            client_id: client_id.clone(),
            occurred_at: trigger.at,
            data,
            context,
        })
    }

    /// The marketing cap (`mail.max_marketing_per_day` / `_per_week`) the
    /// client has reached at `at`, if any: mail and texts count together.
    pub(super) fn marketing_cap_reached(
        &self,
        state: &ClientState,
        at: DateTime<Utc>,
    ) -> Option<(u32, &'static str)> {
        let sent = &state.stats.marketing_sent;
        let within = |d: Duration| sent.iter().filter(|t| at - **t < d).count() as u32;
        let s = self.settings;
        [
            (s.max_marketing_per_day, "day", within(Duration::days(1))),
            (s.max_marketing_per_week, "week", within(Duration::days(7))),
        ]
        .into_iter()
        .find(|(cap, _, n)| *cap > 0 && n >= cap)
        .map(|(cap, period, _)| (cap, period))
    }

    /// Checks a mail request against what it needs now, so a mistake shows in
    /// the process log at decision time instead of as a failed send later.
    pub(super) fn mail(
        &self,
        template: &str,
        vars: Map<String, Value>,
        state: &ClientState,
        at: DateTime<Utc>,
    ) -> Result<EffectKind, (Level, String)> {
        let Some(kind) = self.templates.kind(template) else {
            return Err((
                Level::Warning,
                format!("mail `{template}` not queued: no such template"),
            ));
        };
        let p = &state.profile;
        if kind == MailKind::Marketing && (p.unsubscribed || !p.marketing_consent) {
            let why = if p.unsubscribed {
                "the client unsubscribed"
            } else {
                "the client has not given marketing consent"
            };
            return Err((
                Level::Notice,
                format!("marketing mail `{template}` skipped: {why}"),
            ));
        }
        if kind == MailKind::Marketing
            && let Some((cap, period)) = self.marketing_cap_reached(state, at)
        {
            return Err((
                Level::Notice,
                format!(
                    "marketing mail `{template}` skipped: the cap of {cap} per {period} is reached"
                ),
            ));
        }
        let Some(to) = p.email.clone() else {
            return Err((
                Level::Warning,
                format!("mail `{template}` not queued: the client has no e-mail address"),
            ));
        };
        let mut all = mail_defaults(state);
        all.extend(vars);
        Ok(EffectKind::Mail {
            template: template.to_string(),
            to,
            vars: all,
        })
    }
}

/// The mail an `email_opened` / `email_clicked` names (by its Message-ID),
/// among the client's recent ones, and whether it was a click.
pub(super) fn engaged_mail(state: &ClientState, event: &Envelope) -> Option<(SentMail, bool)> {
    let clicked = match event.event_type.as_str() {
        "email_opened" => false,
        "email_clicked" => true,
        _ => return None,
    };
    let key = event
        .data
        .get("message_id")
        .and_then(Value::as_str)
        .and_then(crate::domain::effects::key_of_message_id)?;
    let mail = state.stats.recent_mails.iter().find(|m| m.key == key)?;
    Some((mail.clone(), clicked))
}
