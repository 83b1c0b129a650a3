//! The configuration of the channels beyond mail: `webhooks.<name>` (where
//! a signed post goes, its secret, which of nudge's own happenings it is
//! sent) and `sms` (the Twilio-shaped gateway texts go through). Secrets
//! never print; URLs and numbers are parsed at load.

use super::secret::Secret;
use super::{Config, ConfigError, key_err};
use crate::core::decide::{ChannelSettings, HAPPENINGS};
use crate::domain::phone::Phone;
use base64::Engine as _;
use serde::{Deserialize, Serialize, Serializer};
use std::collections::BTreeMap;
use std::num::NonZeroU64;

/// One webhook: `webhooks.<name>`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where the JSON is posted: an `http://` or `https://` URL.
    pub url: HttpUrl,
    /// The Standard Webhooks secret, `whsec_` and the base64 of 24 to 64
    /// random bytes (`whsec_$(head -c 32 /dev/urandom | base64)`).
    pub secret: WebhookSecret,
    /// nudge's own happenings posted here too: `mail_sent`, `mail_failed`,
    /// `unsubscribed`, `task_made`. A YAML list or one comma-separated string.
    #[serde(default, deserialize_with = "super::http::list_or_commas")]
    pub events: Vec<String>,
    /// Timeout of one post, connecting included, in seconds.
    #[serde(default = "default_timeout")]
    pub timeout_secs: NonZeroU64,
}

fn default_timeout() -> NonZeroU64 {
    NonZeroU64::new(10).expect("non-zero")
}

/// The text-message gateway: Twilio's Messages API or one of its copies.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmsConfig {
    /// The gateway's Messages endpoint, e.g.
    /// `https://api.twilio.com/2010-04-01/Accounts/AC.../Messages.json`;
    /// unset: no texts are sent (they wait in the outbox).
    pub url: Option<HttpUrl>,
    /// The basic-auth user (Twilio's Account SID).
    pub account: Option<String>,
    /// The basic-auth password (Twilio's Auth Token); also the key of the
    /// inbound webhook's `X-Twilio-Signature`.
    pub token: Option<Secret>,
    /// The sender number (`From`), E.164.
    #[serde(deserialize_with = "phone_in_yaml")]
    pub from: Option<Phone>,
    /// Timeout of one request to the gateway, in seconds.
    pub timeout_secs: Option<NonZeroU64>,
}

/// A number in E.164, which YAML (and so an environment override) reads
/// as an integer when it is unquoted: `+15550001111` is 15550001111, and
/// the `+` every E.164 number has is given back.
fn phone_in_yaml<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Phone>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Text(String),
        Number(u64),
    }
    let text = match Option::<Either>::deserialize(d)? {
        None => return Ok(None),
        Some(Either::Text(s)) => s,
        Some(Either::Number(n)) => format!("+{n}"),
    };
    Phone::parse(text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

impl SmsConfig {
    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.timeout_secs.map_or(10, NonZeroU64::get))
    }
}

/// An `http://` or `https://` URL with a host.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct HttpUrl(String);

impl HttpUrl {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for HttpUrl {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let uri: hyper::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
        match (uri.scheme_str(), uri.host()) {
            (Some("http" | "https"), Some(h)) if !h.is_empty() => Ok(Self(s)),
            _ => Err(format!(
                "{s:?} must be an http:// or https:// URL with a host"
            )),
        }
    }
}

impl From<HttpUrl> for String {
    fn from(u: HttpUrl) -> String {
        u.0
    }
}

/// A Standard Webhooks secret, kept decoded; prints as `***`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct WebhookSecret(Vec<u8>);

impl WebhookSecret {
    /// The HMAC key.
    pub fn key(&self) -> &[u8] {
        &self.0
    }
}

impl TryFrom<String> for WebhookSecret {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let Some(b64) = s.strip_prefix("whsec_") else {
            return Err("must start with `whsec_` (Standard Webhooks)".into());
        };
        let key = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| "after `whsec_` must come base64".to_string())?;
        if !(24..=64).contains(&key.len()) {
            return Err(format!(
                "must hold 24 to 64 bytes (base64 after `whsec_`), holds {}",
                key.len()
            ));
        }
        Ok(Self(key))
    }
}

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl Serialize for WebhookSecret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

/// The core's view of the webhooks: their names, and who gets which happening.
pub fn channel_settings(webhooks: &BTreeMap<String, WebhookConfig>) -> ChannelSettings {
    let mut forward: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, hook) in webhooks {
        for happening in &hook.events {
            forward
                .entry(happening.clone())
                .or_default()
                .push(name.clone());
        }
    }
    ChannelSettings {
        webhooks: webhooks.keys().cloned().collect(),
        forward,
    }
}

impl Config {
    /// Webhook names and happenings, and an SMS gateway complete or absent.
    pub(super) fn validate_channels(&self) -> Result<(), ConfigError> {
        for (name, hook) in &self.webhooks {
            let key = format!("webhooks.{name}");
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(key_err(
                    &key,
                    "a webhook's name takes letters, digits, '_' and '-'",
                ));
            }
            for e in &hook.events {
                if !HAPPENINGS.contains(&e.as_str()) {
                    return Err(key_err(
                        &format!("{key}.events"),
                        format!("unknown happening {e:?}; known: {}", HAPPENINGS.join(", ")),
                    ));
                }
            }
        }
        let sms = &self.sms;
        if sms.url.is_some() && (sms.account.is_none() || sms.token.is_none() || sms.from.is_none())
        {
            return Err(key_err(
                "sms",
                "with `sms.url` set, `sms.account`, `sms.token` and `sms.from` are needed too",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(pairs: &[(&str, &str)]) -> Result<Config, String> {
        Config::load_with_env(
            None,
            pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())),
        )
        .map_err(|e| e.to_string())
    }

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    #[test]
    fn webhooks_and_the_gateway_are_parsed_and_checked_at_load() {
        let c = load(&[
            ("NUDGE__WEBHOOKS__CRM__URL", "https://crm.example/hooks"),
            ("NUDGE__WEBHOOKS__CRM__SECRET", SECRET),
            ("NUDGE__WEBHOOKS__CRM__EVENTS", "mail_sent, task_made"),
        ])
        .unwrap();
        let crm = &c.webhooks["crm"];
        assert_eq!(crm.secret.key().len(), 24);
        assert_eq!(crm.timeout_secs.get(), 10);
        let shown = format!("{c:?} {}", serde_json::to_string(&c).unwrap());
        assert!(!shown.contains("MfKQ9r8G"), "{shown}");
        let s = channel_settings(&c.webhooks);
        assert_eq!(s.forward["task_made"], ["crm"]);

        for (pairs, key) in [
            (
                vec![
                    ("NUDGE__WEBHOOKS__CRM__URL", "ftp://x"),
                    ("NUDGE__WEBHOOKS__CRM__SECRET", SECRET),
                ],
                "webhooks.crm.url",
            ),
            (
                vec![
                    ("NUDGE__WEBHOOKS__CRM__URL", "http://x"),
                    ("NUDGE__WEBHOOKS__CRM__SECRET", "whsec_c2hvcnQ="),
                ],
                "webhooks.crm.secret",
            ),
            (
                vec![
                    ("NUDGE__WEBHOOKS__CRM__URL", "http://x"),
                    ("NUDGE__WEBHOOKS__CRM__SECRET", SECRET),
                    ("NUDGE__WEBHOOKS__CRM__EVENTS", "mail_opened"),
                ],
                "webhooks.crm.events",
            ),
            (vec![("NUDGE__SMS__FROM", "0044 7700")], "sms.from"),
            (vec![("NUDGE__SMS__URL", "http://gw")], "sms"),
        ] {
            let e = load(&pairs).unwrap_err();
            assert!(e.contains(key), "{key}: {e}");
            assert!(!e.contains("MfKQ9r8G"), "{e}");
        }
    }
}
