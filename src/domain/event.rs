//! The event envelope of the contract (`shared/contract/EVENTS.md`) and its
//! domain types. Bytes from the wire become an [`Envelope`] here or a
//! [`Rejection`] with a reason; nothing downstream ever sees an unchecked event.

use chrono::{DateTime, Datelike, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt;

/// Why an envelope was refused. Kept with the raw bytes in the rejected table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("envelope is {size} bytes, over the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("envelope is not valid UTF-8")]
    NotUtf8,
    #[error("envelope is not a JSON object: {0}")]
    NotJson(String),
    #[error("field `{field}` is missing")]
    Missing { field: &'static str },
    #[error("field `{field}` is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("`{what}` is reserved for nudge itself: {why}")]
    Reserved { what: String, why: &'static str },
}

/// Largest amount of money one event may carry (`total`, `price`), either
/// way. Money beyond it is a producer's bug, and sums of such amounts run
/// to infinity, which JSON cannot store.
pub const MAX_MONEY: f64 = 1e12;

/// Largest quantity one event may carry (`quantity`), either way.
pub const MAX_QUANTITY: f64 = 1e6;

/// Event types nudge makes itself: a rule sees them as `event.type` for a
/// timer coming due and a scheduled sweep, so a producer's event of that
/// type would pass for one.
pub const RESERVED_TYPES: &[&str] = &["timer", "sweep"];

/// Ids nudge gives its own secondary events start so: a producer's event
/// with such an id could take the place of one.
pub const RESERVED_ID_PREFIX: &str = "nudge-";

/// `context` keys nudge sets on its own secondary events (`nudge_depth`
/// stops emit cycles): a producer may not set them.
pub const RESERVED_CONTEXT: &[&str] = &["nudge_depth"];

macro_rules! bounded_id {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Accepts 1..=128 characters with no control characters.
            pub fn parse(s: impl Into<String>) -> Result<Self, Rejection> {
                let s = s.into();
                let n = s.chars().count();
                if n == 0 || n > 128 {
                    return Err(Rejection::Invalid {
                        field: $field,
                        reason: format!("must be 1 to 128 characters, got {n}"),
                    });
                }
                if s.chars().any(char::is_control) {
                    return Err(Rejection::Invalid {
                        field: $field,
                        reason: "must not contain control characters".into(),
                    });
                }
                Ok(Self(s))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = Rejection;
            fn try_from(s: String) -> Result<Self, Rejection> {
                Self::parse(s)
            }
        }
        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

bounded_id!(
    /// The producer's unique id of an event: the key of "takes effect once".
    EventId,
    "id"
);
bounded_id!(
    /// The shop's id of a client (a person).
    ClientId,
    "client_id"
);

/// What happened: `^[a-z][a-z0-9_]{0,63}$`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EventType(String);

impl EventType {
    pub fn parse(s: impl Into<String>) -> Result<Self, Rejection> {
        let s = s.into();
        let mut chars = s.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase());
        let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if first_ok && rest_ok && s.len() <= 64 {
            Ok(Self(s))
        } else {
            Err(Rejection::Invalid {
                field: "type",
                reason: format!("{s:?} does not match ^[a-z][a-z0-9_]{{0,63}}$"),
            })
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl TryFrom<String> for EventType {
    type Error = Rejection;
    fn try_from(s: String) -> Result<Self, Rejection> {
        Self::parse(s)
    }
}
impl From<EventType> for String {
    fn from(v: EventType) -> String {
        v.0
    }
}
impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An e-mail address, checked for shape and for header injection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Email(String);

impl Email {
    pub fn parse(s: impl Into<String>) -> Result<Self, Rejection> {
        let s = s.into().trim().to_string();
        let invalid = |reason: &str| Rejection::Invalid {
            field: "data.email",
            reason: reason.to_string(),
        };
        if s.len() > 254 {
            return Err(invalid("longer than 254 characters"));
        }
        if s.chars()
            .any(|c| c.is_control() || c.is_whitespace() || "<>,;\"".contains(c))
        {
            return Err(invalid(
                "contains whitespace, control or separator characters",
            ));
        }
        match s.rsplit_once('@') {
            Some((local, domain)) if !local.is_empty() && domain.contains('.') => {
                if domain.starts_with('.') || domain.ends_with('.') {
                    Err(invalid("domain is malformed"))
                } else {
                    Ok(Self(s))
                }
            }
            _ => Err(invalid("must look like name@domain.tld")),
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl TryFrom<String> for Email {
    type Error = Rejection;
    fn try_from(s: String) -> Result<Self, Rejection> {
        Self::parse(s)
    }
}
impl From<Email> for String {
    fn from(v: Email) -> String {
        v.0
    }
}

/// A validated event. `data` and `context` keep every field the producer sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub id: EventId,
    #[serde(rename = "type")]
    pub event_type: EventType,
    pub client_id: ClientId,
    pub occurred_at: DateTime<Utc>,
    #[serde(default)]
    pub data: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub context: Map<String, Value>,
}

/// Fields of `data` that carry a built-in meaning and must have the right type.
const TYPED_DATA: &[(&str, &str, Kind)] = &[
    ("client_registered", "email", Kind::String),
    ("client_registered", "marketing_consent", Kind::Bool),
    ("client_updated", "email", Kind::String),
    ("client_updated", "marketing_consent", Kind::Bool),
    ("client_registered", "sms_consent", Kind::Bool),
    ("client_updated", "sms_consent", Kind::Bool),
    ("order_placed", "total", Kind::Number),
    ("order_placed", "items", Kind::Array),
    ("product_viewed", "price", Kind::Number),
    ("cart_item_added", "quantity", Kind::Number),
    ("cart_item_added", "price", Kind::Number),
];

#[derive(Clone, Copy)]
enum Kind {
    String,
    Bool,
    Number,
    Array,
}

impl Envelope {
    /// Parses and validates raw bytes from the broker.
    pub fn parse(bytes: &[u8], max_bytes: usize) -> Result<Self, Rejection> {
        if bytes.len() > max_bytes {
            return Err(Rejection::TooLarge {
                size: bytes.len(),
                limit: max_bytes,
            });
        }
        let text = std::str::from_utf8(bytes).map_err(|_| Rejection::NotUtf8)?;
        // NUL is valid JSON but no database keeps it in text: refuse it here,
        // with a reason, rather than fail to store the batch later.
        if has_nul_escape(text) {
            return Err(Rejection::Invalid {
                field: "envelope",
                reason: "contains a NUL character (\\u0000)".into(),
            });
        }
        // Straight into the envelope's fields: a map of the top level
        // would be built only to be taken apart (a tenth of parsing).
        // Serde reads a struct from an array too; an envelope is an object.
        if !text.trim_start().starts_with('{') {
            return match serde_json::from_str::<serde::de::IgnoredAny>(text) {
                Err(e) => Err(Rejection::NotJson(e.to_string())),
                Ok(_) => Err(Rejection::NotJson("top level is not an object".into())),
            };
        }
        let wire: Wire =
            serde_json::from_str(text).map_err(|e| Rejection::NotJson(e.to_string()))?;
        Self::validate(wire)
    }

    /// Validates an already-decoded JSON value (used by `nudge publish` too).
    pub fn from_value(value: Value) -> Result<Self, Rejection> {
        let Value::Object(mut obj) = value else {
            return Err(Rejection::NotJson("top level is not an object".into()));
        };
        // The text check of `parse` cannot see a decoded value: walk it.
        if obj
            .iter()
            .any(|(k, v)| k.contains('\0') || value_has_nul(v))
        {
            return Err(Rejection::Invalid {
                field: "envelope",
                reason: "contains a NUL character (\\u0000)".into(),
            });
        }
        let mut take = |field: &str| obj.remove(field).unwrap_or(Value::Null);
        Self::validate(Wire {
            id: take("id"),
            event_type: take("type"),
            client_id: take("client_id"),
            occurred_at: take("occurred_at"),
            data: take("data"),
            context: take("context"),
        })
    }

    fn validate(wire: Wire) -> Result<Self, Rejection> {
        let id = EventId::parse(string(wire.id, "id")?)?;
        let event_type = EventType::parse(string(wire.event_type, "type")?)?;
        let client_id = ClientId::parse(string(wire.client_id, "client_id")?)?;
        let occurred_raw = string(wire.occurred_at, "occurred_at")?;
        let occurred_at = DateTime::parse_from_rfc3339(&occurred_raw)
            .map_err(|e| Rejection::Invalid {
                field: "occurred_at",
                reason: format!("{occurred_raw:?} is not an RFC 3339 timestamp: {e}"),
            })?
            .with_timezone(&Utc)
            // Microseconds are what the databases keep: deciding on the
            // same precision live and in a replay gives the same history.
            .trunc_subsecs(6);
        if RESERVED_TYPES.contains(&event_type.as_str()) {
            return Err(Rejection::Reserved {
                what: format!("type {:?}", event_type.as_str()),
                why: "nudge gives it to timers and sweeps",
            });
        }
        if id.as_str().starts_with(RESERVED_ID_PREFIX) {
            return Err(Rejection::Reserved {
                what: format!("id prefix {RESERVED_ID_PREFIX:?}"),
                why: "nudge's own secondary events have such ids",
            });
        }
        let data = object(wire.data, "data")?;
        let context = object(wire.context, "context")?;
        if let Some(key) = RESERVED_CONTEXT.iter().find(|k| context.contains_key(**k)) {
            return Err(Rejection::Reserved {
                what: format!("context.{key}"),
                why: "nudge sets it on its own secondary events",
            });
        }
        check_numbers(event_type.as_str(), &data)?;

        for (ty, field, kind) in TYPED_DATA {
            if *ty != event_type.as_str() {
                continue;
            }
            check_kind(&data, field, *kind)?;
        }
        if matches!(event_type.as_str(), "client_registered" | "client_updated")
            && let Some(phone) = data.get("phone")
        {
            // Texts go to E.164 numbers only: a number in any other form is
            // the producer's mistake, refused here with its reason.
            match phone {
                Value::String(s) => {
                    crate::domain::phone::Phone::parse(s.clone()).map_err(|e| {
                        Rejection::Invalid {
                            field: "data.phone",
                            reason: e.to_string(),
                        }
                    })?;
                }
                _ => {
                    return Err(Rejection::Invalid {
                        field: "data.phone",
                        reason: "must be a string in E.164 form, e.g. +447700900123".into(),
                    });
                }
            }
        }
        if event_type.as_str() == "client_registered" {
            match data.get("email") {
                Some(Value::String(s)) => {
                    Email::parse(s.clone())?;
                }
                _ => {
                    return Err(Rejection::Missing {
                        field: "data.email",
                    });
                }
            }
        }
        if let Some(Value::String(s)) = data.get("email") {
            Email::parse(s.clone())?;
        }
        for key in ["session_id", "channel", "timezone", "locale"] {
            if let Some(v) = context.get(key)
                && !v.is_string()
                && !v.is_null()
            {
                return Err(Rejection::Invalid {
                    field: "context",
                    reason: format!("`context.{key}` must be a string"),
                });
            }
        }
        Ok(Envelope {
            id,
            event_type,
            client_id,
            occurred_at,
            data,
            context,
        })
    }

    /// An event from the store's own log. It was validated when it came in;
    /// only its identity is checked again, because an erasure (GDPR) empties
    /// `data` and `context` on purpose.
    pub fn from_stored(
        id: &str,
        event_type: &str,
        client_id: &str,
        occurred_at: DateTime<Utc>,
        data: Map<String, Value>,
        context: Map<String, Value>,
    ) -> Result<Self, Rejection> {
        Ok(Envelope {
            id: EventId::parse(id)?,
            event_type: EventType::parse(event_type)?,
            client_id: ClientId::parse(client_id)?,
            occurred_at,
            data,
            context,
        })
    }

    /// The session named by the producer, if any.
    pub fn session_id(&self) -> Option<&str> {
        self.context.get("session_id").and_then(Value::as_str)
    }

    /// (year, month, day) of `occurred_at` in UTC, kept split for reporting.
    pub fn date_parts(&self) -> (i32, u32, u32) {
        let d = self.occurred_at.date_naive();
        (d.year(), d.month(), d.day())
    }
}

/// The envelope's top level as it comes off the wire. Fields stay JSON
/// values so that [`Envelope::validate`] gives the contract's reasons
/// (missing, of the wrong type); other fields are skipped unbuilt.
#[derive(Deserialize)]
struct Wire {
    #[serde(default)]
    id: Value,
    #[serde(default, rename = "type")]
    event_type: Value,
    #[serde(default)]
    client_id: Value,
    #[serde(default)]
    occurred_at: Value,
    #[serde(default)]
    data: Value,
    #[serde(default)]
    context: Value,
}

fn string(v: Value, field: &'static str) -> Result<String, Rejection> {
    match v {
        Value::Null => Err(Rejection::Missing { field }),
        Value::String(s) => Ok(s),
        other => Err(Rejection::Invalid {
            field,
            reason: format!("must be a string, got {}", kind_name(&other)),
        }),
    }
}

fn object(v: Value, field: &'static str) -> Result<Map<String, Value>, Rejection> {
    match v {
        Value::Null => Ok(Map::new()),
        Value::Object(m) => Ok(m),
        other => Err(Rejection::Invalid {
            field,
            reason: format!("must be an object, got {}", kind_name(&other)),
        }),
    }
}

fn check_kind(data: &Map<String, Value>, field: &str, kind: Kind) -> Result<(), Rejection> {
    let Some(v) = data.get(field) else {
        return Ok(());
    };
    let ok = v.is_null()
        || match kind {
            Kind::String => v.is_string(),
            Kind::Bool => v.is_boolean(),
            Kind::Number => v.is_number(),
            Kind::Array => v.is_array(),
        };
    if ok {
        Ok(())
    } else {
        let want = match kind {
            Kind::String => "a string",
            Kind::Bool => "a boolean",
            Kind::Number => "a number",
            Kind::Array => "an array",
        };
        Err(Rejection::Invalid {
            field: "data",
            reason: format!("`data.{field}` must be {want}, got {}", kind_name(v)),
        })
    }
}

/// Whether JSON text holds an escaped NUL (`\u0000`). The six characters
/// count only where the backslash starts an escape: in `"\\u0000"` the
/// backslash is itself escaped and the text is a backslash and `u0000`.
fn has_nul_escape(text: &str) -> bool {
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(i) = text[from..].find("\\u0000").map(|i| i + from) {
        // Backslashes in a row before this one: an even count leaves this
        // one starting an escape.
        let run = bytes[..i].iter().rev().take_while(|b| **b == b'\\').count();
        if run % 2 == 0 {
            return true;
        }
        from = i + 1;
    }
    false
}

fn value_has_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(value_has_nul),
        Value::Object(m) => m.iter().any(|(k, v)| k.contains('\0') || value_has_nul(v)),
        _ => false,
    }
}

/// Numbers with a built-in meaning stay within [`MAX_MONEY`] and
/// [`MAX_QUANTITY`]: history sums them, rules count them, and a sum that
/// reaches infinity cannot be stored.
fn check_numbers(event_type: &str, data: &Map<String, Value>) -> Result<(), Rejection> {
    fn bounded(v: Option<&Value>, path: &str, max: f64) -> Result<(), Rejection> {
        let Some(x) = v.and_then(Value::as_f64) else {
            return Ok(());
        };
        if x.is_finite() && x.abs() <= max {
            return Ok(());
        }
        Err(Rejection::Invalid {
            field: "data",
            reason: format!("`data.{path}` is {x}, beyond the bound of ±{max:e}"),
        })
    }
    match event_type {
        "order_placed" => {
            bounded(data.get("total"), "total", MAX_MONEY)?;
            if let Some(Value::Array(items)) = data.get("items") {
                for (i, item) in items.iter().enumerate() {
                    bounded(item.get("price"), &format!("items[{i}].price"), MAX_MONEY)?;
                    bounded(
                        item.get("quantity"),
                        &format!("items[{i}].quantity"),
                        MAX_QUANTITY,
                    )?;
                }
            }
        }
        "product_viewed" | "cart_item_added" => {
            bounded(data.get("price"), "price", MAX_MONEY)?;
            bounded(data.get("quantity"), "quantity", MAX_QUANTITY)?;
        }
        _ => {}
    }
    Ok(())
}

fn kind_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<Envelope, Rejection> {
        Envelope::parse(v.to_string().as_bytes(), 65536)
    }

    fn good() -> Value {
        json!({"id": "e1", "type": "client_registered", "client_id": "c1",
               "occurred_at": "2026-11-01T10:00:00+01:00",
               "data": {"email": "ana@example.com", "extra": [1, 2]},
               "context": {"session_id": "s1", "utm_source": "x"}})
    }

    #[test]
    fn parses_a_good_envelope_and_keeps_unknown_fields() {
        let e = parse(good()).unwrap();
        assert_eq!(e.id.as_str(), "e1");
        assert_eq!(e.occurred_at.to_rfc3339(), "2026-11-01T09:00:00+00:00");
        assert_eq!(e.data["extra"], json!([1, 2]));
        assert_eq!(e.session_id(), Some("s1"));
        assert_eq!(e.date_parts(), (2026, 11, 1));
    }

    #[test]
    fn rejects_with_the_reason() {
        let mut v = good();
        v.as_object_mut().unwrap().remove("client_id");
        assert_eq!(
            parse(v).unwrap_err(),
            Rejection::Missing { field: "client_id" }
        );

        let mut v = good();
        v["occurred_at"] = json!(12);
        assert!(parse(v).unwrap_err().to_string().contains("occurred_at"));

        let mut v = good();
        v["type"] = json!("Order-Placed");
        assert!(parse(v).unwrap_err().to_string().contains("type"));

        let mut v = good();
        v["data"]["email"] = json!("not an email");
        assert!(parse(v).unwrap_err().to_string().contains("data.email"));

        let v = json!({"id": "e2", "type": "order_placed", "client_id": "c1",
                       "occurred_at": "2026-11-01T10:00:00Z", "data": {"total": "12"}});
        assert!(parse(v).unwrap_err().to_string().contains("data.total"));

        assert!(matches!(
            Envelope::parse(b"{nope", 100),
            Err(Rejection::NotJson(_))
        ));
        assert!(matches!(
            Envelope::parse(&[0xff, 0xfe], 100),
            Err(Rejection::NotUtf8)
        ));
        assert!(matches!(
            Envelope::parse(&[b' '; 101], 100),
            Err(Rejection::TooLarge { .. })
        ));
        assert!(matches!(
            Envelope::parse(b"[1]", 100),
            Err(Rejection::NotJson(_))
        ));
        let mut v = good();
        v["data"]["first_name"] = json!("A\u{0}na");
        assert!(parse(v).unwrap_err().to_string().contains("NUL"));
    }

    #[test]
    fn amounts_and_quantities_stay_within_their_bounds() {
        let order = |data: Value| {
            parse(json!({"id": "o", "type": "order_placed", "client_id": "c1",
                "occurred_at": "2026-11-01T10:00:00Z", "data": data}))
        };
        assert!(
            order(json!({"total": 1e12, "items": [{"price": -1e12, "quantity": 1e6}]})).is_ok()
        );
        for bad in [
            json!({"total": 1e308}),
            json!({"total": -1.000001e12}),
            json!({"items": [{"price": 1e13}]}),
            json!({"items": [{"quantity": 2e6}]}),
        ] {
            let err = order(bad.clone()).unwrap_err().to_string();
            assert!(err.contains("beyond the bound"), "{bad}: {err}");
        }
        let cart = parse(
            json!({"id": "a", "type": "cart_item_added", "client_id": "c1",
            "occurred_at": "2026-11-01T10:00:00Z", "data": {"quantity": 1e7}}),
        );
        assert!(cart.unwrap_err().to_string().contains("data.quantity"));
        // Other events' numbers mean nothing to nudge: kept as sent.
        assert!(
            parse(json!({"id": "x", "type": "page_viewed", "client_id": "c1",
            "occurred_at": "2026-11-01T10:00:00Z", "data": {"total": 1e308}}))
            .is_ok()
        );
        // Out of f64's range is not JSON nudge can read.
        let text = br#"{"id":"o","type":"order_placed","client_id":"c","occurred_at":"2026-11-01T10:00:00Z","data":{"total":1e999}}"#;
        assert!(Envelope::parse(text, 65536).is_err());
    }

    #[test]
    fn types_ids_and_context_keys_of_nudge_are_refused() {
        for (field, value) in [
            ("type", json!("timer")),
            ("type", json!("sweep")),
            ("id", json!("nudge-abc")),
        ] {
            let mut v = good();
            v[field] = value;
            let err = parse(v).unwrap_err();
            assert!(matches!(err, Rejection::Reserved { .. }), "{field}: {err}");
            assert!(err.to_string().contains("reserved for nudge"), "{err}");
        }
        let mut v = good();
        v["context"]["nudge_depth"] = json!(99);
        assert!(parse(v).unwrap_err().to_string().contains("nudge_depth"));
        // Alike, but not nudge's.
        let mut v = good();
        v["type"] = json!("timers");
        v["id"] = json!("nudgeabc");
        assert!(parse(v).is_ok());
    }

    #[test]
    fn an_escaped_backslash_before_u0000_is_not_a_nul() {
        // The JSON text "\\u0000" is a backslash then `u0000`: no NUL.
        let mut v = good();
        v["data"]["note"] = json!("\\u0000 and \\\\u0000");
        let text = v.to_string();
        assert!(text.contains(r"\\u0000"));
        let e = Envelope::parse(text.as_bytes(), 65536).unwrap();
        assert_eq!(e.data["note"], "\\u0000 and \\\\u0000");
        // An escaped backslash then a real escaped NUL is still refused.
        let text = text.replace(r"\\u0000 and", r"\\\u0000 and");
        assert!(
            Envelope::parse(text.as_bytes(), 65536)
                .unwrap_err()
                .to_string()
                .contains("NUL")
        );
        // A NUL reaching `from_value` already decoded is refused too.
        let mut v = good();
        v["context"]["page"] = json!("a\u{0}b");
        assert!(
            Envelope::from_value(v)
                .unwrap_err()
                .to_string()
                .contains("NUL")
        );
    }

    #[test]
    fn ids_are_bounded() {
        assert!(EventId::parse("").is_err());
        assert!(EventId::parse("x".repeat(129)).is_err());
        assert!(EventId::parse("é".repeat(128)).is_ok());
        assert!(ClientId::parse("a\nb").is_err());
    }

    #[test]
    fn emails_refuse_header_injection() {
        assert!(Email::parse("a@b.co").is_ok());
        assert!(Email::parse("a@b.co\r\nBcc: x@y.z").is_err());
        assert!(Email::parse("a@b").is_err());
        assert!(Email::parse("@b.co").is_err());
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn json_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<f64>()
                    .prop_filter("finite", |f| f.is_finite())
                    .prop_map(Value::from),
                ".{0,40}".prop_map(Value::from),
            ];
            leaf.prop_recursive(6, 64, 8, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..8).prop_map(Value::from),
                    prop::collection::btree_map(".{0,12}", inner, 0..8)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn order_totals_are_accepted_exactly_within_the_bound(total in any::<f64>().prop_filter("finite", |f| f.is_finite())) {
                let v = serde_json::json!({"id": "o", "type": "order_placed", "client_id": "c",
                    "occurred_at": "2026-11-01T10:00:00Z", "data": {"total": total}});
                let r = Envelope::parse(&serde_json::to_vec(&v).unwrap(), 65536);
                prop_assert_eq!(r.is_ok(), total.abs() <= MAX_MONEY, "{} -> {:?}", total, r);
            }

            #[test]
            fn strings_with_backslashes_are_refused_only_for_a_real_nul(
                s in prop::collection::vec(prop_oneof![Just("\\"), Just("u0000"), Just("\0"), Just("a")], 0..12)
            ) {
                let s: String = s.concat();
                let v = serde_json::json!({"id": "e", "type": "page_viewed", "client_id": "c",
                    "occurred_at": "2026-11-01T10:00:00Z", "data": {"note": s}});
                let r = Envelope::parse(&serde_json::to_vec(&v).unwrap(), 65536);
                prop_assert_eq!(r.is_err(), s.contains('\0'), "{:?} -> {:?}", s, r);
            }

            #[test]
            fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
                let _ = Envelope::parse(&bytes, 1024);
            }

            #[test]
            fn arbitrary_json_is_accepted_or_refused_with_a_reason(
                id in prop_oneof![Just(Value::Null), ".{0,140}".prop_map(Value::from), json_value()],
                ty in prop_oneof![".{0,70}".prop_map(Value::from), "[a-z][a-z0-9_]{0,70}".prop_map(Value::from), json_value()],
                client in prop_oneof![".{0,140}".prop_map(Value::from), json_value()],
                at in prop_oneof![Just(Value::from("2026-11-01T10:00:00Z")), ".{0,30}".prop_map(Value::from), json_value()],
                data in json_value(),
                context in json_value(),
            ) {
                let v = serde_json::json!({"id": id, "type": ty, "client_id": client,
                    "occurred_at": at, "data": data, "context": context});
                let bytes = serde_json::to_vec(&v).unwrap();
                match Envelope::parse(&bytes, 1 << 20) {
                    Ok(e) => {
                        prop_assert!(!e.id.as_str().is_empty() && e.id.as_str().chars().count() <= 128);
                        prop_assert!(EventType::parse(e.event_type.as_str()).is_ok());
                        // A parsed envelope survives the trip to the store and back.
                        let again = Envelope::parse(&serde_json::to_vec(&e).unwrap(), 1 << 20);
                        prop_assert_eq!(again.ok(), Some(e));
                    }
                    Err(r) => prop_assert!(!r.to_string().is_empty()),
                }
            }
        }
    }
}
