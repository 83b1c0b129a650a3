//! The event and the client as rules and templates see them, as JSON: the
//! reference the rules' own typed views (`rules::values`) are checked
//! against, and the variables every mail gets by default.

use crate::domain::event::Envelope;
use crate::domain::history::{ClientState, Session};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

/// Variables every mail template can use, before the rule's own.
pub fn mail_defaults(state: &ClientState) -> Map<String, Value> {
    let p = &state.profile;
    let mut m = Map::new();
    m.insert("client_id".into(), json!(state.client_id.as_str()));
    m.insert("email".into(), json!(p.email));
    m.insert("first_name".into(), json!(p.first_name));
    m.insert("last_name".into(), json!(p.last_name));
    m.insert("acquisition_channel".into(), json!(p.acquisition_channel));
    m.insert("promo_code".into(), json!(p.promo_code));
    // The sender keeps quiet hours in the client's own timezone.
    m.insert("timezone".into(), json!(p.timezone));
    m
}

pub(crate) fn secs(t: Option<DateTime<Utc>>) -> Value {
    t.map_or(Value::Null, |t| json!(t.timestamp()))
}

/// The event as rules see it: times in Unix seconds, like `now`.
pub fn event_view(e: &Envelope) -> Value {
    json!({
        "id": e.id.as_str(),
        "type": e.event_type.as_str(),
        "client_id": e.client_id.as_str(),
        "occurred_at": e.occurred_at.timestamp(),
        "data": e.data,
        "context": e.context,
    })
}

/// The client as rules see it: the profile flat, counters under `stats`,
/// times in Unix seconds (absent ones are `()`).
pub fn client_view(s: &ClientState) -> Value {
    let p = &s.profile;
    let st = &s.stats;
    let last_at: Map<String, Value> = st
        .last_at
        .iter()
        .map(|(k, v)| (k.clone(), json!(v.timestamp())))
        .collect();
    json!({
        "id": s.client_id.as_str(),
        "email": p.email,
        "first_name": p.first_name,
        "last_name": p.last_name,
        "acquisition_channel": p.acquisition_channel,
        "promo_code": p.promo_code,
        "partner_id": p.partner_id,
        "locale": p.locale,
        "timezone": p.timezone,
        "marketing_consent": p.marketing_consent,
        "unsubscribed": p.unsubscribed,
        "registered_at": secs(p.registered_at),
        "first_seen": secs(p.first_seen),
        "last_seen": secs(p.last_seen),
        "session": p_session(s.sessions.current.as_ref()),
        "last_session": p_session(s.sessions.recent.first()),
        "sessions": s.sessions.recent.iter().map(|x| p_session(Some(x))).collect::<Vec<_>>(),
        "stats": {
            "mailed_at": st.mailed_at.iter().map(|(k, v)| (k.clone(), json!(v.timestamp()))).collect::<Map<String, Value>>(),
            "events": st.events,
            "last_at": last_at,
            "product_views": st.product_views,
            "cart_adds": st.cart_adds,
            "orders": st.orders,
            "orders_cancelled": st.orders_cancelled,
            "spend": st.spend,
            "mails": st.mails,
        },
    })
}

pub(crate) fn p_session(s: Option<&Session>) -> Value {
    let Some(s) = s else { return Value::Null };
    json!({
        "id": s.id,
        "derived": s.derived,
        "start": s.start.timestamp(),
        "end": s.end.timestamp(),
        "duration": (s.end - s.start).num_seconds(),
        "ended": s.ended,
        "events": s.events,
        "page_views": s.page_views,
        "product_views": s.product_views,
        "cart_adds": s.cart_adds,
        "orders": s.orders,
        "channel": s.channel,
    })
}
