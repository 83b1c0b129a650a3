//! The channels beyond mail, decided: a rule's `webhook()` checked against
//! the configured webhooks, a rule's `sms()` against the template, the
//! number and the same consent and caps as marketing mail; and nudge's own
//! happenings decided here (tasks made, unsubscriptions) forwarded to the
//! webhooks configured for them. Quiet hours are kept by the sender, as
//! for mail: a text is deferred, not dropped.

use super::{Core, Decision, views::mail_defaults};
use crate::core::texts::TextKind;
use crate::domain::effects::{Effect, EffectKind, effect_key};
use crate::domain::event::{ClientId, Envelope};
use crate::domain::history::ClientState;
use crate::domain::log::{Level, LogEntry};
use chrono::{DateTime, Duration, Utc};
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, BTreeSet};

/// nudge's own happenings a webhook can be sent (`webhooks.<name>.events`).
/// The core decides `task_made` and `unsubscribed`; the sender forwards
/// `mail_sent` and `mail_failed` (a mail refused for good: a bounce).
pub const HAPPENINGS: &[&str] = &["mail_sent", "mail_failed", "unsubscribed", "task_made"];

/// The rule name forwarded happenings that no rule made are keyed and
/// logged under.
pub const FORWARD_RULE: &str = "nudge";

/// What the core knows of the configured channels.
#[derive(Debug, Clone, Default)]
pub struct ChannelSettings {
    /// Names of the configured webhooks (`webhooks.<name>`).
    pub webhooks: BTreeSet<String>,
    /// Happening -> the webhooks it is forwarded to.
    pub forward: BTreeMap<String, Vec<String>>,
}

/// The key of a happening forwarded to a webhook: derived from what it is
/// about (an effect key or an event id), so it is the same wherever and
/// however often the happening is seen, and the outbox keeps one.
pub fn forward_key(webhook: &str, happening: &str, about: &str) -> String {
    effect_key(&format!("forward:{webhook}:{happening}"), about, 0)
}

pub(super) fn describe(kind: &EffectKind) -> String {
    match kind {
        EffectKind::Webhook {
            name, event_type, ..
        } => format!("webhook `{name}` queued ({event_type})"),
        EffectKind::Sms { template, to, .. } => format!("text `{template}` queued to {to}"),
        _ => String::new(),
    }
}

impl Core<'_> {
    /// A rule's `webhook(name, payload)`: only to a configured webhook.
    pub(super) fn webhook(
        &self,
        rule: &str,
        name: String,
        payload: Value,
        at: DateTime<Utc>,
    ) -> Result<EffectKind, (Level, String)> {
        if !self.settings.channels.webhooks.contains(&name) {
            return Err((
                Level::Warning,
                format!("webhook `{name}` not queued: no such webhook in `webhooks`"),
            ));
        }
        Ok(EffectKind::Webhook {
            name,
            event_type: format!("rule.{rule}"),
            at,
            payload,
        })
    }

    /// A rule's `sms(template, vars)`, checked as a mail is: the template
    /// exists, the client has a number and consented to texts (a reply
    /// STOP withdraws it), and for a marketing text, has not unsubscribed
    /// and is under the marketing caps, which mails and texts share.
    pub(super) fn sms(
        &self,
        template: &str,
        vars: Map<String, Value>,
        state: &mut ClientState,
        at: DateTime<Utc>,
    ) -> Result<EffectKind, (Level, String)> {
        let Some(kind) = self.templates.texts.kind(template) else {
            return Err((
                Level::Warning,
                format!(
                    "text `{template}` not queued: no such template (templates/{template}.sms)"
                ),
            ));
        };
        let p = &state.profile;
        let skip = |why: String| Err((Level::Notice, format!("text `{template}` skipped: {why}")));
        if !p.sms_consent {
            return skip("the client has not given consent to texts (sms_consent)".into());
        }
        if kind == TextKind::Marketing && p.unsubscribed {
            return skip("the client unsubscribed".into());
        }
        let Some(to) = p.phone.clone() else {
            return Err((
                Level::Warning,
                format!("text `{template}` not queued: the client has no phone number"),
            ));
        };
        if kind == TextKind::Marketing {
            if let Some((cap, period)) = self.marketing_cap_reached(state, at) {
                return skip(format!(
                    "the cap of {cap} marketing messages per {period} is reached"
                ));
            }
            let st = &mut state.stats;
            st.marketing_sent.retain(|t| at - *t < Duration::days(7));
            st.marketing_sent.push(at);
        }
        let mut all = mail_defaults(state);
        all.insert("phone".into(), json!(to.as_str()));
        all.extend(vars);
        Ok(EffectKind::Sms {
            template: template.to_string(),
            to,
            vars: all,
        })
    }

    /// Webhook effects for a happening, one per webhook it is forwarded to;
    /// `origin` is the rule, the cause and the time they are recorded under.
    fn forwards(
        &self,
        happening: &str,
        about: &str,
        data: Value,
        client_id: &ClientId,
        (rule, cause, at): (&str, &str, DateTime<Utc>),
    ) -> Vec<Effect> {
        let Some(hooks) = self.settings.channels.forward.get(happening) else {
            return Vec::new();
        };
        hooks
            .iter()
            .map(|name| Effect {
                key: forward_key(name, happening, about),
                rule: rule.to_string(),
                client_id: client_id.clone(),
                cause: cause.to_string(),
                at,
                kind: EffectKind::Webhook {
                    name: name.clone(),
                    event_type: happening.replacen('_', ".", 1),
                    at,
                    payload: data.clone(),
                },
            })
            .collect()
    }

    /// Forwards the tasks a run made (`task_made`), after its effects.
    pub(super) fn forward_tasks(&self, decision: &mut Decision) {
        let mut more = Vec::new();
        for e in &decision.effects {
            if let EffectKind::Task {
                team, title, data, ..
            } = &e.kind
            {
                let payload = json!({"team": team, "title": title, "data": data,
                    "client_id": e.client_id.as_str(), "task_key": e.key});
                let origin = (e.rule.as_str(), e.cause.as_str(), e.at);
                more.extend(self.forwards("task_made", &e.key, payload, &e.client_id, origin));
            }
        }
        self.queue_forwards(more, decision);
    }

    /// Forwards an `unsubscribed` event, whoever published it.
    pub(super) fn forward_event(&self, event: &Envelope, decision: &mut Decision) {
        if event.event_type.as_str() != "unsubscribed" {
            return;
        }
        let payload = json!({"client_id": event.client_id.as_str(), "event_id": event.id.as_str(),
            "scope": event.data.get("scope").cloned().unwrap_or(json!("marketing"))});
        let id = event.id.as_str();
        let origin = (FORWARD_RULE, id, event.occurred_at);
        let more = self.forwards("unsubscribed", id, payload, &event.client_id, origin);
        self.queue_forwards(more, decision);
    }

    fn queue_forwards(&self, effects: Vec<Effect>, decision: &mut Decision) {
        for e in effects {
            decision.log.push(LogEntry {
                client_id: e.client_id.clone(),
                at: e.at,
                level: Level::Notice,
                rule: Some(e.rule.clone()),
                event_id: None,
                message: describe(&e.kind),
            });
            decision.effects.push(e);
        }
    }
}
