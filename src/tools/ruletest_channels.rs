//! What `nudge test` expects of webhooks and texts (`expect: webhooks:` and
//! `expect: texts:`), and how it shows the ones a rule made. Nothing is
//! posted or texted in a test: the effects are compared, as mails are.

use crate::core::templates::TemplateSet;
use crate::domain::effects::EffectKind;
use serde::Deserialize;
use serde_json::Value;

/// `{webhook: crm, type: rule.order_flow, payload: {order: 7}}`: the
/// payload given must be a part of the one posted.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WebhookExpect {
    webhook: String,
    #[serde(default, rename = "type")]
    event_type: Option<String>,
    #[serde(default)]
    payload: Option<Value>,
    #[serde(default)]
    client: Option<String>,
}

/// `{template: reminder, to: "+447700900123", text_contains: "STOP"}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TextExpect {
    template: String,
    #[serde(default)]
    to: Option<String>,
    #[serde(default)]
    text_contains: Option<String>,
    #[serde(default)]
    client: Option<String>,
}

/// A webhook or a text as a test sees it.
#[derive(Debug, Clone)]
pub(super) enum Seen {
    Webhook {
        rule: String,
        name: String,
        event_type: String,
        payload: Value,
        client: String,
    },
    Text {
        rule: String,
        template: String,
        to: String,
        text: String,
        client: String,
    },
}

impl std::fmt::Display for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Seen::Webhook {
                rule,
                name,
                event_type,
                payload,
                client,
            } => write!(
                f,
                "webhook {name} ({event_type}) for {client} (rule {rule}), payload {payload}"
            ),
            Seen::Text {
                rule,
                template,
                to,
                text,
                ..
            } => write!(f, "text {template} to {to} (rule {rule}): {text:?}"),
        }
    }
}

/// The test's view of a webhook or text effect; `None` for other kinds.
pub(super) fn describe(
    templates: &TemplateSet,
    rule: &str,
    client: &str,
    kind: EffectKind,
) -> Option<Seen> {
    match kind {
        EffectKind::Webhook {
            name,
            event_type,
            payload,
            ..
        } => Some(Seen::Webhook {
            rule: rule.into(),
            name,
            event_type,
            payload,
            client: client.into(),
        }),
        EffectKind::Sms { template, to, vars } => Some(Seen::Text {
            rule: rule.into(),
            text: templates
                .texts
                .render(&template, &vars)
                .unwrap_or_else(|e| format!("<render failed: {e}>")),
            template,
            to: to.to_string(),
            client: client.into(),
        }),
        _ => None,
    }
}

/// Whether `part` is `whole`, or an object whose every field is (in turn)
/// a part of the same field of `whole`.
fn part_of(part: &Value, whole: &Value) -> bool {
    match (part, whole) {
        (Value::Object(p), Value::Object(w)) => p
            .iter()
            .all(|(k, v)| w.get(k).is_some_and(|x| part_of(v, x))),
        _ => part == whole,
    }
}

impl WebhookExpect {
    pub(super) fn label(&self) -> String {
        let mut label = format!("webhook {}", self.webhook);
        if let Some(t) = &self.event_type {
            label.push_str(&format!(" ({t})"));
        }
        if let Some(p) = &self.payload {
            label.push_str(&format!(", payload with {p}"));
        }
        label
    }

    pub(super) fn matches(&self, got: &Seen) -> bool {
        let Seen::Webhook {
            name,
            event_type,
            payload,
            client,
            ..
        } = got
        else {
            return false;
        };
        self.webhook == *name
            && self.event_type.as_ref().is_none_or(|t| t == event_type)
            && self.payload.as_ref().is_none_or(|p| part_of(p, payload))
            && self.client.as_ref().is_none_or(|c| c == client)
    }
}

impl TextExpect {
    pub(super) fn label(&self) -> String {
        let mut label = format!("text {}", self.template);
        if let Some(t) = &self.to {
            label.push_str(&format!(" to {t}"));
        }
        if let Some(s) = &self.text_contains {
            label.push_str(&format!(", text containing {s:?}"));
        }
        label
    }

    pub(super) fn matches(&self, got: &Seen) -> bool {
        let Seen::Text {
            template,
            to,
            text,
            client,
            ..
        } = got
        else {
            return false;
        };
        self.template == *template
            && self.to.as_ref().is_none_or(|t| t == to)
            && self
                .text_contains
                .as_ref()
                .is_none_or(|s| text.contains(s.as_str()))
            && self.client.as_ref().is_none_or(|c| c == client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_payload_expected_is_a_part_of_the_one_posted() {
        let got = Seen::Webhook {
            rule: "r".into(),
            name: "crm".into(),
            event_type: "rule.r".into(),
            payload: json!({"order": {"id": 7, "total": 10}, "vip": true}),
            client: "ana".into(),
        };
        let want = |v: Value| WebhookExpect {
            webhook: "crm".into(),
            event_type: None,
            payload: Some(v),
            client: None,
        };
        assert!(want(json!({"order": {"id": 7}})).matches(&got));
        assert!(want(json!({})).matches(&got));
        assert!(!want(json!({"order": {"id": 8}})).matches(&got));
        assert!(!want(json!({"missing": 1})).matches(&got));
    }
}
