//! The effects a rule asks for, and the idempotency keys that make each one
//! happen once. A key depends only on the rule, the event that caused the
//! effect and the effect's position in that rule's run, so redelivery, restart
//! and replay all produce the same key, and the outbox refuses the second copy.

use crate::domain::event::ClientId;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// One thing a rule decided to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Effect {
    /// Unique and deterministic: see [`effect_key`].
    pub key: String,
    /// The rule that asked for it.
    pub rule: String,
    pub client_id: ClientId,
    /// What caused it: an event id, or a timer's or a sweep's id.
    pub cause: String,
    /// Event time of the cause: effects are scheduled on event time.
    pub at: DateTime<Utc>,
    pub kind: EffectKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EffectKind {
    /// A mail to one recipient from a template.
    Mail {
        template: String,
        to: String,
        vars: Map<String, Value>,
    },
    /// A secondary event to publish on `<emit_prefix>.<type>`.
    Emit { event_type: String, event: Value },
    /// A task for a team of staff: stored, and mailed to the team's address.
    Task {
        team: String,
        title: String,
        to: String,
        data: Map<String, Value>,
    },
    /// A JSON post to the configured webhook `name` (`webhooks.<name>`),
    /// signed when sent; the URL and secret are read then, never stored.
    Webhook {
        name: String,
        /// What the receiver finds under `type` (`rule.<rule>` for a rule's
        /// `webhook()`, `mail.sent` and the like for nudge's own happenings).
        event_type: String,
        /// When it happened (event time): the body's `timestamp`.
        at: DateTime<Utc>,
        payload: Value,
    },
    /// A text message to one number from `templates/NAME.sms`.
    Sms {
        template: String,
        to: crate::domain::phone::Phone,
        vars: Map<String, Value>,
    },
}

impl EffectKind {
    pub fn name(&self) -> &'static str {
        match self {
            EffectKind::Mail { .. } => "mail",
            EffectKind::Emit { .. } => "emit",
            EffectKind::Task { .. } => "task",
            EffectKind::Webhook { .. } => "webhook",
            EffectKind::Sms { .. } => "sms",
        }
    }
}

/// `sha256(rule, cause, ordinal)` in hex, cut to 32 characters (128 bits).
pub fn effect_key(rule: &str, cause: &str, ordinal: usize) -> String {
    let mut h = Sha256::new();
    h.update(rule.as_bytes());
    h.update([0]);
    h.update(cause.as_bytes());
    h.update([0]);
    h.update(ordinal.to_le_bytes());
    let mut s = hex::encode(h.finalize());
    s.truncate(32);
    s
}

/// What separates the effect key from the domain in the Message-ID of each
/// mail nudge sends (`<KEY.nudge@domain>`), so an open, a click or a bounce
/// that quotes the Message-ID names the effect it is about.
pub const MESSAGE_ID_MARK: &str = ".nudge@";

/// The effect key inside one of our Message-IDs (with or without the `<>`).
pub fn key_of_message_id(id: &str) -> Option<&str> {
    let id = id.trim().trim_start_matches('<').trim_end_matches('>');
    let (key, _) = id.split_once(MESSAGE_ID_MARK)?;
    (!key.is_empty()).then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_deterministic_and_distinct() {
        let e = "e1";
        assert_eq!(effect_key("welcome", e, 0), effect_key("welcome", e, 0));
        assert_ne!(effect_key("welcome", e, 0), effect_key("welcome", e, 1));
        assert_ne!(effect_key("welcome", e, 0), effect_key("other", e, 0));
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(effect_key("a", "bc", 0), effect_key("ab", "c", 0));
        assert_eq!(effect_key("a", e, 0).len(), 32);
    }
}
