//! A client's denormalised behaviour history: the profile and the counters that
//! rules read without scanning the event log. Pure: [`ClientState::apply`]
//! folds one event into the state, so the live daemon, tests and replays all
//! derive the same history from the same events.

use crate::event::{ClientId, Envelope};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// Everything nudge keeps about one client besides the raw event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientState {
    pub client_id: ClientId,
    /// Optimistic-concurrency version: 0 for a client the store has never seen.
    #[serde(skip)]
    pub version: i64,
    pub profile: Profile,
    pub stats: Stats,
}

/// Contact details and preferences, from `client_registered` / `client_updated`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub email: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub acquisition_channel: Option<String>,
    pub promo_code: Option<String>,
    pub partner_id: Option<String>,
    pub locale: Option<String>,
    pub timezone: Option<String>,
    pub marketing_consent: bool,
    /// Set by an `unsubscribed` event; marketing mail is never sent after it.
    pub unsubscribed: bool,
    pub registered_at: Option<DateTime<Utc>>,
    pub first_seen: Option<DateTime<Utc>>,
    pub last_seen: Option<DateTime<Utc>>,
}

/// Counters kept per client, updated with every event.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Events seen, by type.
    pub events: BTreeMap<String, u64>,
    /// The time of the last event of each type.
    pub last_at: BTreeMap<String, DateTime<Utc>>,
    /// Product views, by product id.
    pub product_views: BTreeMap<String, u64>,
    pub cart_adds: u64,
    pub orders: u64,
    pub orders_cancelled: u64,
    /// Sum of `order_placed.total`, in the shop's currency.
    pub spend: f64,
    pub mails: u64,
}

/// Profile fields that `client_registered` and `client_updated` may set.
const PROFILE_STRINGS: &[&str] = &[
    "email",
    "first_name",
    "last_name",
    "acquisition_channel",
    "promo_code",
    "partner_id",
    "locale",
    "timezone",
];

impl ClientState {
    pub fn new(client_id: ClientId) -> Self {
        Self {
            client_id,
            version: 0,
            profile: Profile::default(),
            stats: Stats::default(),
        }
    }

    /// Folds one event into the history. Order-insensitive where it can be:
    /// first and last seen are a min and a max of event time.
    pub fn apply(&mut self, event: &Envelope) {
        let at = event.occurred_at;
        let p = &mut self.profile;
        p.first_seen = Some(p.first_seen.map_or(at, |t| t.min(at)));
        p.last_seen = Some(p.last_seen.map_or(at, |t| t.max(at)));

        let ty = event.event_type.as_str();
        *self.stats.events.entry(ty.to_string()).or_default() += 1;
        let last = self.stats.last_at.entry(ty.to_string()).or_insert(at);
        *last = (*last).max(at);

        let data = &event.data;
        match ty {
            "client_registered" | "client_updated" => {
                for field in PROFILE_STRINGS {
                    if let Some(v) = data.get(*field).and_then(Value::as_str) {
                        set_profile_string(p, field, v);
                    }
                }
                if let Some(b) = data.get("marketing_consent").and_then(Value::as_bool) {
                    p.marketing_consent = b;
                } else if ty == "client_registered" && p.registered_at.is_none() {
                    p.marketing_consent = false;
                }
                if ty == "client_registered" {
                    p.registered_at = Some(p.registered_at.map_or(at, |t| t.min(at)));
                }
                for field in ["locale", "timezone"] {
                    if let Some(v) = event.context.get(field).and_then(Value::as_str)
                        && get_profile_string(p, field).is_none()
                    {
                        set_profile_string(p, field, v);
                    }
                }
            }
            "product_viewed" => {
                if let Some(pid) = data.get("product_id").and_then(value_as_key) {
                    *self.stats.product_views.entry(pid).or_default() += 1;
                }
            }
            "cart_item_added" => self.stats.cart_adds += 1,
            "order_placed" => {
                self.stats.orders += 1;
                self.stats.spend += data.get("total").and_then(Value::as_f64).unwrap_or(0.0);
            }
            "order_cancelled" => self.stats.orders_cancelled += 1,
            "unsubscribed" => {
                p.unsubscribed = true;
                p.marketing_consent = false;
            }
            _ => {}
        }
    }
}

fn set_profile_string(p: &mut Profile, field: &str, v: &str) {
    let slot = match field {
        "email" => &mut p.email,
        "first_name" => &mut p.first_name,
        "last_name" => &mut p.last_name,
        "acquisition_channel" => &mut p.acquisition_channel,
        "promo_code" => &mut p.promo_code,
        "partner_id" => &mut p.partner_id,
        "locale" => &mut p.locale,
        "timezone" => &mut p.timezone,
        _ => return,
    };
    *slot = Some(v.trim().to_string());
}

fn get_profile_string<'a>(p: &'a Profile, field: &str) -> Option<&'a str> {
    match field {
        "locale" => p.locale.as_deref(),
        "timezone" => p.timezone.as_deref(),
        _ => None,
    }
}

/// Product ids arrive as strings or numbers; both name the same product.
fn value_as_key(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(id: &str, ty: &str, at: &str, data: Value) -> Envelope {
        Envelope::from_value(json!({"id": id, "type": ty, "client_id": "c1",
            "occurred_at": at, "data": data, "context": {"timezone": "Europe/Paris"}}))
        .unwrap()
    }

    #[test]
    fn registration_then_activity_builds_the_profile_and_counters() {
        let mut s = ClientState::new(ClientId::parse("c1").unwrap());
        s.apply(&ev(
            "1",
            "client_registered",
            "2026-11-01T10:00:00Z",
            json!({"email": "a@b.co", "first_name": " Ana ", "acquisition_channel": "promo",
                   "marketing_consent": true}),
        ));
        s.apply(&ev(
            "2",
            "product_viewed",
            "2026-11-01T09:00:00Z",
            json!({"product_id": 7}),
        ));
        s.apply(&ev(
            "3",
            "product_viewed",
            "2026-11-02T09:00:00Z",
            json!({"product_id": "7"}),
        ));
        s.apply(&ev(
            "4",
            "order_placed",
            "2026-11-03T09:00:00Z",
            json!({"total": 120.5}),
        ));
        s.apply(&ev("5", "unsubscribed", "2026-11-04T09:00:00Z", json!({})));

        let p = &s.profile;
        assert_eq!(p.first_name.as_deref(), Some("Ana"));
        assert_eq!(p.acquisition_channel.as_deref(), Some("promo"));
        assert_eq!(p.timezone.as_deref(), Some("Europe/Paris"));
        assert!(p.unsubscribed && !p.marketing_consent);
        assert_eq!(
            p.first_seen.unwrap().to_rfc3339(),
            "2026-11-01T09:00:00+00:00"
        );
        assert_eq!(
            p.last_seen.unwrap().to_rfc3339(),
            "2026-11-04T09:00:00+00:00"
        );
        assert_eq!(s.stats.product_views["7"], 2);
        assert_eq!(s.stats.orders, 1);
        assert_eq!(s.stats.spend, 120.5);
        assert_eq!(s.stats.events["product_viewed"], 2);
    }
}
