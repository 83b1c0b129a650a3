//! Segment's messages as contract envelopes: a pure function of the
//! message, the `ingest` configuration and the time it was received, so the
//! mapping documented in README is tested here without a server.

use crate::config::IngestConfig;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

/// Segment's own event names (its e-commerce and lifecycle specs) and the
/// contract types they mean. `ingest.track` adds to and overrides these.
pub const TRACK: &[(&str, &str)] = &[
    ("Signed Up", "client_registered"),
    ("Signed In", "login_succeeded"),
    ("Product Viewed", "product_viewed"),
    ("Product Added", "cart_item_added"),
    ("Product Removed", "cart_item_removed"),
    ("Order Completed", "order_placed"),
    ("Order Cancelled", "order_cancelled"),
    ("Email Opened", "email_opened"),
    ("Email Link Clicked", "email_clicked"),
    ("Unsubscribed", "unsubscribed"),
];

/// Which call a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Track,
    Identify,
    Page,
    /// `/v1/batch`: each message says its own `type`.
    Batch,
}

/// What became of one message.
#[derive(Debug)]
pub enum Mapped {
    /// A contract envelope, as JSON.
    Event(Value),
    /// A call that says nothing a client did (`alias`, `group`): not kept.
    Ignored(String),
}

/// The contract type of a `track` event name: `ingest.track`, then the
/// built-in table, then the name in snake_case (`Coupon Applied` ->
/// `coupon_applied`).
pub fn track_type(name: &str, table: &IngestConfig) -> String {
    table
        .track
        .get(name)
        .cloned()
        .or_else(|| {
            TRACK
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, t)| t.to_string())
        })
        .unwrap_or_else(|| snake_case(name))
}

/// `firstName` -> `first_name`, `Order Completed` -> `order_completed`.
pub fn snake_case(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    let mut prev_lower = false;
    for c in s.chars() {
        if c.is_ascii_alphanumeric() {
            if c.is_ascii_uppercase() && prev_lower && !out.ends_with('_') {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
            prev_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
        } else {
            if !out.is_empty() && !out.ends_with('_') {
                out.push('_');
            }
            prev_lower = false;
        }
    }
    out.trim_end_matches('_').to_string()
}

/// An id given as a string or a number (Segment accepts both).
fn id_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

pub(super) fn object(v: Option<&Value>) -> Map<String, Value> {
    match v {
        Some(Value::Object(m)) => m.clone(),
        _ => Map::new(),
    }
}

fn snake_keys(m: Map<String, Value>) -> Map<String, Value> {
    m.into_iter().map(|(k, v)| (snake_case(&k), v)).collect()
}

/// The contract's `context` from Segment's: the fields the contract names
/// (`ip`, `user_agent`, `locale`, `timezone`, `page`, `session_id`,
/// `utm_*`), and everything else of the message's context under
/// `context.segment`, with the call's own `type`, `event`/`name` and, when
/// `userId` named the client, the `anonymousId`.
fn context(msg: &Map<String, Value>, kind: &str) -> Map<String, Value> {
    let mut rest = object(msg.get("context"));
    let mut out = Map::new();
    let mut take = |from: &str, to: &str, rest: &mut Map<String, Value>| {
        if let Some(v @ Value::String(_)) = rest.remove(from) {
            out.insert(to.into(), v);
        }
    };
    take("ip", "ip", &mut rest);
    take("userAgent", "user_agent", &mut rest);
    take("locale", "locale", &mut rest);
    take("timezone", "timezone", &mut rest);
    for key in ["sessionId", "session_id"] {
        if let Some(id) = id_text(rest.get(key)) {
            rest.remove(key);
            out.insert("session_id".into(), Value::String(id));
        }
    }
    if let Some(Value::String(url)) = rest.get("page").and_then(|p| p.get("url")) {
        out.insert("page".into(), Value::String(url.clone()));
    }
    if let Some(Value::Object(c)) = rest.remove("campaign") {
        for (from, to) in [
            ("source", "utm_source"),
            ("medium", "utm_medium"),
            ("name", "utm_campaign"),
        ] {
            if let Some(v @ Value::String(_)) = c.get(from) {
                out.insert(to.into(), v.clone());
            }
        }
    }
    rest.insert("type".into(), Value::String(kind.into()));
    for key in ["event", "name", "category"] {
        if let Some(v @ Value::String(_)) = msg.get(key) {
            rest.insert(key.into(), v.clone());
        }
    }
    if id_text(msg.get("userId")).is_some()
        && let Some(anon) = id_text(msg.get("anonymousId"))
    {
        rest.insert("anonymousId".into(), Value::String(anon));
    }
    out.insert("segment".into(), Value::Object(rest));
    out
}

/// One Segment message as a contract envelope (see the mapping in README):
/// `messageId` -> `id` (when missing, a hash of the message, so that a
/// library's retry keeps it), `userId` else `anonymousId` -> `client_id`,
/// `timestamp` -> `occurred_at` (else `originalTimestamp`, else
/// `received`), `properties`/`traits` -> `data`, the context as
/// [`context`] says. The envelope is checked afterwards by
/// [`Envelope::parse`], as every event is.
pub fn to_envelope(
    msg: &Map<String, Value>,
    call: Call,
    cfg: &IngestConfig,
    received: DateTime<Utc>,
) -> Result<Mapped, String> {
    let kind = match call {
        Call::Track => "track".to_string(),
        Call::Identify => "identify".to_string(),
        Call::Page => "page".to_string(),
        Call::Batch => match msg.get("type") {
            Some(Value::String(t)) => t.clone(),
            _ => return Err("`type` is missing (track, identify, page, screen)".into()),
        },
    };
    let (event_type, data) = match kind.as_str() {
        "track" => {
            let Some(Value::String(name)) = msg.get("event") else {
                return Err("a track call needs `event`, the event's name".into());
            };
            let ty = track_type(name, cfg);
            let mut data = object(msg.get("properties"));
            if matches!(ty.as_str(), "client_registered" | "client_updated") {
                // The user's traits, which the libraries put in the context,
                // under what the event itself says.
                let mut traits =
                    snake_keys(object(msg.get("context").and_then(|c| c.get("traits"))));
                traits.extend(data);
                data = traits;
            }
            if ty == "order_placed" && !data.contains_key("items") {
                // Segment calls an order's lines `products`.
                if let Some(products) = data.get("products").cloned() {
                    data.insert("items".into(), products);
                }
            }
            (ty, data)
        }
        "identify" => (
            "client_updated".to_string(),
            snake_keys(object(msg.get("traits"))),
        ),
        "page" | "screen" => {
            let mut data = object(msg.get("properties"));
            for key in ["name", "category"] {
                if let Some(v @ Value::String(_)) = msg.get(key) {
                    data.entry(key).or_insert_with(|| v.clone());
                }
            }
            let page = msg.get("context").and_then(|c| c.get("page"));
            for key in ["url", "title"] {
                if let Some(v @ Value::String(_)) = page.and_then(|p| p.get(key)) {
                    data.entry(key).or_insert_with(|| v.clone());
                }
            }
            ("page_viewed".to_string(), data)
        }
        "alias" | "group" => {
            return Ok(Mapped::Ignored(format!(
                "a {kind} call says nothing a client did; nudge does not keep it"
            )));
        }
        other => return Err(format!("unknown call type {other:?}")),
    };
    let client_id = id_text(msg.get("userId"))
        .or_else(|| id_text(msg.get("anonymousId")))
        .ok_or("a message needs `userId` or `anonymousId`")?;
    let id = match id_text(msg.get("messageId")) {
        Some(id) => id,
        None => {
            use sha2::{Digest, Sha256};
            let bytes = serde_json::to_vec(msg).unwrap_or_default();
            format!("seg-{}", &hex::encode(Sha256::digest(&bytes))[..32])
        }
    };
    let occurred_at = ["timestamp", "originalTimestamp"]
        .iter()
        .find_map(|k| msg.get(*k).and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| received.to_rfc3339());
    Ok(Mapped::Event(json!({
        "id": id,
        "type": event_type,
        "client_id": client_id,
        "occurred_at": occurred_at,
        "data": data,
        "context": context(msg, &kind),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::event::Envelope;

    fn map(msg: Value, call: Call) -> Result<Mapped, String> {
        let cfg = IngestConfig {
            track: [("Trial Started".to_string(), "client_registered".to_string())].into(),
            ..Default::default()
        };
        let received = "2026-12-01T10:00:00Z".parse().unwrap();
        to_envelope(msg.as_object().unwrap(), call, &cfg, received)
    }

    fn event(msg: Value, call: Call) -> Value {
        match map(msg, call).unwrap() {
            Mapped::Event(v) => v,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn names_become_snake_case() {
        assert_eq!(snake_case("firstName"), "first_name");
        assert_eq!(snake_case("Order Completed"), "order_completed");
        assert_eq!(snake_case("first_name"), "first_name");
        assert_eq!(snake_case("  Coupon -- Applied! "), "coupon_applied");
        assert_eq!(snake_case("utm2Source"), "utm2_source");
    }

    #[test]
    fn track_names_go_by_configuration_then_table_then_snake_case() {
        let cfg = IngestConfig {
            track: [("Order Completed".to_string(), "big_order".to_string())].into(),
            ..Default::default()
        };
        assert_eq!(track_type("Order Completed", &cfg), "big_order");
        assert_eq!(track_type("Product Added", &cfg), "cart_item_added");
        assert_eq!(track_type("Wishlist Shared", &cfg), "wishlist_shared");
    }

    #[test]
    fn a_track_call_maps_ids_time_properties_and_context() {
        let e = event(
            json!({
                "type": "track", "event": "Order Completed", "userId": 42, "anonymousId": "a-1",
                "messageId": "m-1", "timestamp": "2026-11-30T09:00:00.000Z",
                "properties": {"order_id": "o1", "total": 30.5, "currency": "EUR",
                               "products": [{"product_id": "p1", "quantity": 1, "price": 30.5}]},
                "context": {"ip": "10.0.0.1", "userAgent": "UA", "sessionId": 77,
                            "campaign": {"source": "news", "medium": "email", "name": "xmas"},
                            "page": {"url": "https://shop/x"}, "library": {"name": "analytics-python"}},
                "integrations": {"All": true}
            }),
            Call::Batch,
        );
        assert_eq!(e["id"], "m-1");
        assert_eq!(e["type"], "order_placed");
        assert_eq!(e["client_id"], "42");
        assert_eq!(e["occurred_at"], "2026-11-30T09:00:00.000Z");
        assert_eq!(e["data"]["items"][0]["product_id"], "p1");
        assert_eq!(e["data"]["total"], 30.5);
        let c = &e["context"];
        assert_eq!(
            (&c["ip"], &c["user_agent"], &c["session_id"], &c["page"]),
            (
                &json!("10.0.0.1"),
                &json!("UA"),
                &json!("77"),
                &json!("https://shop/x")
            )
        );
        assert_eq!(
            (&c["utm_source"], &c["utm_campaign"]),
            (&json!("news"), &json!("xmas"))
        );
        assert_eq!(c["segment"]["library"]["name"], "analytics-python");
        assert_eq!(c["segment"]["event"], "Order Completed");
        assert_eq!(c["segment"]["anonymousId"], "a-1");
        // What the stream consumer will see is a valid contract event.
        Envelope::parse(&serde_json::to_vec(&e).unwrap(), 65536).unwrap();
    }

    #[test]
    fn identify_page_and_sign_up_map_to_contract_types() {
        let e = event(
            json!({"anonymousId": "anon", "messageId": "m2",
                   "traits": {"email": "ada@example.com", "firstName": "Ada", "marketingConsent": true}}),
            Call::Identify,
        );
        assert_eq!(
            (&e["type"], &e["client_id"]),
            (&json!("client_updated"), &json!("anon"))
        );
        assert_eq!(e["data"]["first_name"], "Ada");
        assert_eq!(e["data"]["marketing_consent"], true);
        // No timestamp: the time it was received.
        assert_eq!(e["occurred_at"], "2026-12-01T10:00:00+00:00");

        let e = event(
            json!({"userId": "u1", "messageId": "m3", "name": "Home",
                   "properties": {"path": "/"}, "context": {"page": {"url": "https://shop/", "title": "Shop"}}}),
            Call::Page,
        );
        assert_eq!(e["type"], "page_viewed");
        assert_eq!(
            (&e["data"]["url"], &e["data"]["title"]),
            (&json!("https://shop/"), &json!("Shop"))
        );
        assert_eq!(e["data"]["name"], "Home");

        let e = event(
            json!({"userId": "u1", "messageId": "m4", "event": "Trial Started",
                   "properties": {"acquisition_channel": "trial"},
                   "context": {"traits": {"email": "u1@example.com", "firstName": "U"}}}),
            Call::Track,
        );
        assert_eq!(e["type"], "client_registered");
        assert_eq!(e["data"]["email"], "u1@example.com");
        assert_eq!(e["data"]["first_name"], "U");
        assert_eq!(e["data"]["acquisition_channel"], "trial");
    }

    #[test]
    fn messages_without_what_is_needed_are_refused_and_alias_is_ignored() {
        let e = map(json!({"event": "X", "messageId": "m"}), Call::Track).unwrap_err();
        assert!(e.contains("userId"), "{e}");
        let e = map(json!({"userId": "u"}), Call::Track).unwrap_err();
        assert!(e.contains("event"), "{e}");
        let e = map(json!({"userId": "u", "type": "launch"}), Call::Batch).unwrap_err();
        assert!(e.contains("launch"), "{e}");
        assert!(matches!(
            map(
                json!({"userId": "u", "type": "alias", "previousId": "p"}),
                Call::Batch
            ),
            Ok(Mapped::Ignored(_))
        ));
        // No messageId: the same message gets the same id, so a retry is one event.
        let msg = json!({"userId": "u", "event": "Signed In", "timestamp": "2026-11-30T09:00:00Z"});
        let (a, b) = (event(msg.clone(), Call::Track), event(msg, Call::Track));
        assert_eq!(a["id"], b["id"]);
        assert!(a["id"].as_str().unwrap().starts_with("seg-"));
    }
}
