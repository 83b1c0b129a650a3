//! nudge's data as the Rhai values rules see: the event, the client and the
//! settings. They are built straight from the Rust types. Going through
//! `serde_json::Value` and `rhai::serde` builds everything twice, and for
//! the client view that cost more than running the rules did.
//!
//! The values are the ones `rhai::serde::to_dynamic` gives for the JSON
//! views in [`crate::decide`] (`event_view`, `client_view`). Those stay
//! what previews and the API show. The tests below check that both ways
//! give the same value.

use crate::event::Envelope;
use crate::history::{ClientState, Session};
use chrono::{DateTime, Utc};
use rhai::{Array, Dynamic, INT, Map};
use serde_json::Value;
use std::collections::BTreeMap;

/// A JSON value as `rhai::serde::to_dynamic` converts it: null is `()`,
/// integers are `INT` (or `FLOAT` past its range), other numbers `FLOAT`.
pub fn from_json(v: &Value) -> Dynamic {
    match v {
        Value::Null => Dynamic::UNIT,
        Value::Bool(b) => Dynamic::from_bool(*b),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                unsigned(u)
            } else if let Some(i) = n.as_i64() {
                Dynamic::from_int(i)
            } else {
                Dynamic::from_float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::String(s) => Dynamic::from(s.clone()),
        Value::Array(a) => Dynamic::from_array(a.iter().map(from_json).collect()),
        Value::Object(m) => from_json_map(m),
    }
}

/// A JSON object as a Rhai object map.
pub fn from_json_map(m: &serde_json::Map<String, Value>) -> Dynamic {
    Dynamic::from_map(
        m.iter()
            .map(|(k, v)| (k.as_str().into(), from_json(v)))
            .collect(),
    )
}

/// An unsigned count as `to_dynamic` has it: `INT`, or `FLOAT` if too large.
fn unsigned(u: u64) -> Dynamic {
    match INT::try_from(u) {
        Ok(i) => Dynamic::from_int(i),
        Err(_) => Dynamic::from_float(u as f64),
    }
}

fn text(s: &Option<String>) -> Dynamic {
    s.as_ref()
        .map_or(Dynamic::UNIT, |s| Dynamic::from(s.clone()))
}

fn secs(t: Option<DateTime<Utc>>) -> Dynamic {
    t.map_or(Dynamic::UNIT, |t| Dynamic::from_int(t.timestamp()))
}

fn counts(m: &BTreeMap<String, u64>) -> Dynamic {
    Dynamic::from_map(
        m.iter()
            .map(|(k, v)| (k.as_str().into(), unsigned(*v)))
            .collect(),
    )
}

fn times(m: &BTreeMap<String, DateTime<Utc>>) -> Dynamic {
    Dynamic::from_map(
        m.iter()
            .map(|(k, v)| (k.as_str().into(), Dynamic::from_int(v.timestamp())))
            .collect(),
    )
}

/// The event as rules see it (`decide::event_view`).
pub fn event(e: &Envelope) -> Dynamic {
    let mut m = Map::new();
    m.insert("id".into(), Dynamic::from(e.id.as_str().to_string()));
    m.insert(
        "type".into(),
        Dynamic::from(e.event_type.as_str().to_string()),
    );
    m.insert(
        "client_id".into(),
        Dynamic::from(e.client_id.as_str().to_string()),
    );
    m.insert(
        "occurred_at".into(),
        Dynamic::from_int(e.occurred_at.timestamp()),
    );
    m.insert("data".into(), from_json_map(&e.data));
    m.insert("context".into(), from_json_map(&e.context));
    Dynamic::from_map(m)
}

/// The client as rules see it (`decide::client_view`).
pub fn client(s: &ClientState) -> Dynamic {
    let p = &s.profile;
    let st = &s.stats;
    let mut stats = Map::new();
    stats.insert("mailed_at".into(), times(&st.mailed_at));
    stats.insert("events".into(), counts(&st.events));
    stats.insert("last_at".into(), times(&st.last_at));
    stats.insert("product_views".into(), counts(&st.product_views));
    stats.insert("cart_adds".into(), unsigned(st.cart_adds));
    stats.insert("orders".into(), unsigned(st.orders));
    stats.insert("orders_cancelled".into(), unsigned(st.orders_cancelled));
    stats.insert("spend".into(), Dynamic::from_float(st.spend));
    stats.insert("mails".into(), unsigned(st.mails));

    let mut m = Map::new();
    m.insert("id".into(), Dynamic::from(s.client_id.as_str().to_string()));
    m.insert("email".into(), text(&p.email));
    m.insert("first_name".into(), text(&p.first_name));
    m.insert("last_name".into(), text(&p.last_name));
    m.insert("acquisition_channel".into(), text(&p.acquisition_channel));
    m.insert("promo_code".into(), text(&p.promo_code));
    m.insert("partner_id".into(), text(&p.partner_id));
    m.insert("locale".into(), text(&p.locale));
    m.insert("timezone".into(), text(&p.timezone));
    m.insert(
        "marketing_consent".into(),
        Dynamic::from_bool(p.marketing_consent),
    );
    m.insert("unsubscribed".into(), Dynamic::from_bool(p.unsubscribed));
    m.insert("registered_at".into(), secs(p.registered_at));
    m.insert("first_seen".into(), secs(p.first_seen));
    m.insert("last_seen".into(), secs(p.last_seen));
    m.insert("session".into(), session(s.sessions.current.as_ref()));
    m.insert("last_session".into(), session(s.sessions.recent.first()));
    m.insert(
        "sessions".into(),
        Dynamic::from_array(
            s.sessions
                .recent
                .iter()
                .map(|x| session(Some(x)))
                .collect::<Array>(),
        ),
    );
    m.insert("stats".into(), Dynamic::from_map(stats));
    Dynamic::from_map(m)
}

fn session(s: Option<&Session>) -> Dynamic {
    let Some(s) = s else {
        return Dynamic::UNIT;
    };
    let mut m = Map::new();
    m.insert("id".into(), Dynamic::from(s.id.clone()));
    m.insert("derived".into(), Dynamic::from_bool(s.derived));
    m.insert("start".into(), Dynamic::from_int(s.start.timestamp()));
    m.insert("end".into(), Dynamic::from_int(s.end.timestamp()));
    m.insert(
        "duration".into(),
        Dynamic::from_int((s.end - s.start).num_seconds()),
    );
    m.insert("ended".into(), Dynamic::from_bool(s.ended));
    m.insert("events".into(), unsigned(s.events));
    m.insert("page_views".into(), unsigned(s.page_views));
    m.insert("product_views".into(), unsigned(s.product_views));
    m.insert("cart_adds".into(), unsigned(s.cart_adds));
    m.insert("orders".into(), unsigned(s.orders));
    m.insert("channel".into(), text(&s.channel));
    Dynamic::from_map(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::{client_view, event_view};
    use crate::event::ClientId;
    use serde_json::json;

    /// The same value, compared in full: type tags included (`1` and `1.0`
    /// differ), which JSON round trips would hide.
    fn same(a: &Dynamic, b: &Dynamic) -> bool {
        if a.type_id() != b.type_id() {
            return false;
        }
        if let (Some(x), Some(y)) = (a.read_lock::<Map>(), b.read_lock::<Map>()) {
            return x.len() == y.len()
                && x.iter()
                    .zip(y.iter())
                    .all(|((ka, va), (kb, vb))| ka == kb && same(va, vb));
        }
        if let (Some(x), Some(y)) = (a.read_lock::<Array>(), b.read_lock::<Array>()) {
            return x.len() == y.len() && x.iter().zip(y.iter()).all(|(p, q)| same(p, q));
        }
        if a.is_float() {
            return a.as_float().ok().map(f64::to_bits) == b.as_float().ok().map(f64::to_bits);
        }
        a.to_string() == b.to_string()
    }

    fn via_serde(v: Value) -> Dynamic {
        rhai::serde::to_dynamic(v).unwrap()
    }

    fn ev(v: Value) -> Envelope {
        Envelope::from_value(v).unwrap()
    }

    #[test]
    fn json_values_convert_as_rhai_serde_does() {
        for v in [
            json!(null),
            json!(true),
            json!(0),
            json!(-7),
            json!(u64::MAX),
            json!(1.5),
            json!(2.0),
            json!("text"),
            json!([1, "a", null, [2.5], {"k": false}]),
            json!({"a": {"b": {"c": [1, 2, {"d": -1}]}}, "": 0, "é": "ü"}),
        ] {
            assert!(same(&from_json(&v), &via_serde(v.clone())), "{v}");
        }
    }

    #[test]
    fn the_event_and_the_client_are_the_json_views_exactly() {
        let gap = chrono::Duration::minutes(30);
        let mut s = ClientState::new(ClientId::parse("c1").unwrap());
        // A new client: nearly everything is absent.
        assert!(same(&client(&s), &via_serde(client_view(&s))));
        let events = [
            ev(
                json!({"id": "1", "type": "client_registered", "client_id": "c1",
                "occurred_at": "2026-11-01T10:00:00.123456Z",
                "data": {"email": "a@b.co", "first_name": "Ana", "promo_code": "X",
                         "partner_id": "acme", "marketing_consent": true},
                "context": {"session_id": "s1", "channel": "web", "timezone": "Europe/Paris"}}),
            ),
            ev(
                json!({"id": "2", "type": "product_viewed", "client_id": "c1",
                "occurred_at": "2026-11-01T10:05:00Z",
                "data": {"product_id": 7, "price": 12.5}, "context": {"session_id": "s1"}}),
            ),
            ev(json!({"id": "3", "type": "order_placed", "client_id": "c1",
                "occurred_at": "2026-11-01T12:00:00Z",
                "data": {"total": 100, "items": [{"product_id": "7", "quantity": 2}]}})),
            ev(json!({"id": "4", "type": "page_viewed", "client_id": "c1",
                "occurred_at": "2026-11-02T12:00:00Z", "data": {}})),
            ev(
                json!({"id": "5", "type": "session_ended", "client_id": "c1",
                "occurred_at": "2026-11-02T12:10:00Z", "data": {}}),
            ),
        ];
        for e in &events {
            s.apply(e, gap);
            assert!(same(&event(e), &via_serde(event_view(e))), "{}", e.id);
            assert!(
                same(&client(&s), &via_serde(client_view(&s))),
                "after {}",
                e.id
            );
        }
        s.stats.mails = 3;
        s.stats
            .mailed_at
            .insert("welcome".into(), events[0].occurred_at);
        s.stats.spend = 0.0;
        assert!(same(&client(&s), &via_serde(client_view(&s))));
    }
}
