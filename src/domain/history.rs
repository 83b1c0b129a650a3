//! A client's denormalised behaviour history: the profile and the counters that
//! rules read without scanning the event log. Pure: [`ClientState::apply`]
//! folds one event into the state, so the live daemon, tests and replays all
//! derive the same history from the same events.

pub use crate::domain::bounds::{MAX_KEY_BYTES, MAX_MONEY_SUM, money_add, truncated};
use crate::domain::bounds::{make_room, value_as_key};
use crate::domain::event::{ClientId, Envelope};
use crate::domain::experiments::Exposures;
pub use crate::domain::settings::HistoryLimits;
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Everything nudge keeps about one client besides the raw event log.
///
/// Decoding it never fails on its content (see [`ClientState::decode`]): a
/// state nudge cannot read would set every later event of the client aside
/// and take its 360 view down, so what cannot be read starts fresh instead.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClientState {
    pub client_id: ClientId,
    /// Optimistic-concurrency version: 0 for a client the store has never seen.
    #[serde(skip)]
    pub version: i64,
    pub profile: Profile,
    pub stats: Stats,
    #[serde(default)]
    pub sessions: Sessions,
    /// Pending follow-ups set by rules, soonest first.
    #[serde(default)]
    pub timers: Vec<Timer>,
    /// What each rule chose to remember about this client (`remember`/`recall`).
    #[serde(default)]
    pub facts: BTreeMap<String, Map<String, Value>>,
    /// The client's own counters (`client_add`), by `name/period-key`.
    #[serde(default)]
    pub counters: BTreeMap<String, f64>,
    /// Experiments' variants and rules' exposures, for reports.
    #[serde(default, skip_serializing_if = "Exposures::is_empty")]
    pub exposures: Exposures,
}

/// [`ClientState`] as stored, decoded strictly: the fast path.
#[derive(Deserialize)]
struct StoredState {
    client_id: ClientId,
    profile: Profile,
    stats: Stats,
    #[serde(default)]
    sessions: Sessions,
    #[serde(default)]
    timers: Vec<Timer>,
    #[serde(default)]
    facts: BTreeMap<String, Map<String, Value>>,
    #[serde(default, deserialize_with = "lenient_f64_map")]
    counters: BTreeMap<String, f64>,
    #[serde(default)]
    exposures: Exposures,
}

impl From<StoredState> for ClientState {
    fn from(s: StoredState) -> Self {
        Self {
            client_id: s.client_id,
            version: 0,
            profile: s.profile,
            stats: s.stats,
            sessions: s.sessions,
            timers: s.timers,
            facts: s.facts,
            counters: s.counters,
            exposures: s.exposures,
        }
    }
}

impl<'de> Deserialize<'de> for ClientState {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Kept raw first (a scan, no tree), so the strict decode below can
        // fall back to a part-by-part one when it fails.
        let raw = Box::<serde_json::value::RawValue>::deserialize(d)?;
        ClientState::decode(raw.get()).map_err(serde::de::Error::custom)
    }
}

impl ClientState {
    /// Decodes a stored state. A part that cannot be read (a type changed by
    /// hand, a bug of an older version) starts fresh and the rest is kept,
    /// with a warning naming the part; only a state whose `client_id` cannot
    /// be read, or text that is not JSON at all, is an error. Numbers that
    /// are `null` where a number belongs (how JSON writes infinity) read as 0.
    pub fn decode(text: &str) -> Result<Self, String> {
        let strict = match serde_json::from_str::<StoredState>(text) {
            Ok(s) => return Ok(s.into()),
            Err(e) => e,
        };
        let Value::Object(mut parts) =
            serde_json::from_str::<Value>(text).map_err(|e| e.to_string())?
        else {
            return Err(format!("a client state must be an object: {strict}"));
        };
        let client_id: ClientId =
            serde_json::from_value(parts.remove("client_id").unwrap_or_default())
                .map_err(|e| format!("client_id: {e}"))?;
        let mut state = ClientState::new(client_id);
        fn part<T: serde::de::DeserializeOwned + Default>(
            parts: &mut Map<String, Value>,
            name: &str,
            client: &ClientId,
        ) -> T {
            let Some(v) = parts.remove(name) else {
                return T::default();
            };
            serde_json::from_value(v).unwrap_or_else(|e| {
                tracing::warn!(client = %client, part = name, "stored client state: `{name}` could not be read and starts fresh: {e}");
                T::default()
            })
        }
        let id = state.client_id.clone();
        state.profile = part(&mut parts, "profile", &id);
        state.stats = part(&mut parts, "stats", &id);
        state.sessions = part(&mut parts, "sessions", &id);
        state.timers = part(&mut parts, "timers", &id);
        state.facts = part(&mut parts, "facts", &id);
        let counters: LenientCounters = part(&mut parts, "counters", &id);
        state.counters = counters.0;
        state.exposures = part(&mut parts, "exposures", &id);
        tracing::warn!(client = %id, "stored client state read in parts after: {strict}");
        Ok(state)
    }
}

/// The client's counters, read leniently (a `null` is 0).
#[derive(Default, Deserialize)]
#[serde(transparent)]
struct LenientCounters(#[serde(deserialize_with = "lenient_f64_map")] BTreeMap<String, f64>);

/// A number that may be stored as `null` (serde_json writes a non-finite
/// float so): read as 0, so such a state stays readable.
fn lenient_f64<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let v = Option::<f64>::deserialize(d)?;
    Ok(v.filter(|x| x.is_finite()).unwrap_or(0.0))
}

fn lenient_f64_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, f64>, D::Error> {
    let m = BTreeMap::<String, Option<f64>>::deserialize(d)?;
    Ok(m.into_iter()
        .map(|(k, v)| (k, v.filter(|x| x.is_finite()).unwrap_or(0.0)))
        .collect())
}

/// Longest text kept of one error's page, message or code, in bytes.
pub const MAX_ERROR_TEXT: usize = 1024;

/// Longest product name kept with a purchase, in bytes.
pub const MAX_NAME_TEXT: usize = 256;

/// A visit: the producer's `context.session_id`, or derived from a gap in activity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    pub id: String,
    /// True when nudge derived the session from an inactivity gap.
    pub derived: bool,
    pub start: DateTime<Utc>,
    /// Time of the last event of the session (or of its `session_ended`).
    pub end: DateTime<Utc>,
    /// A `session_ended` event closed it.
    pub ended: bool,
    pub events: u64,
    pub page_views: u64,
    pub product_views: u64,
    pub cart_adds: u64,
    pub orders: u64,
    pub channel: Option<String>,
}

/// The current session and the ones before it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sessions {
    pub current: Option<Session>,
    /// Earlier sessions, newest first, at most [`RECENT_SESSIONS`].
    pub recent: Vec<Session>,
}

/// How many past sessions are kept per client.
pub const RECENT_SESSIONS: usize = 10;

/// A follow-up a rule asked for: it runs that rule again at `due`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timer {
    pub rule: String,
    pub name: String,
    pub due: DateTime<Utc>,
    #[serde(default)]
    pub data: Map<String, Value>,
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
    /// Where texts go (`data.phone`, E.164, checked at the edge).
    #[serde(default)]
    pub phone: Option<crate::domain::phone::Phone>,
    /// Consent to texts (`data.sms_consent`, default false); a reply STOP
    /// to a text withdraws it (an `client_updated` nudge publishes).
    #[serde(default)]
    pub sms_consent: bool,
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
    /// Product views, by product id: the [`MAX_PRODUCT_VIEWS`] most viewed.
    pub product_views: BTreeMap<String, u64>,
    pub cart_adds: u64,
    pub orders: u64,
    pub orders_cancelled: u64,
    /// Sum of `order_placed.total`, in the shop's currency (saturating at
    /// ±[`MAX_MONEY_SUM`]).
    #[serde(deserialize_with = "lenient_f64")]
    pub spend: f64,
    /// Orders by `order_placed.channel` (`online`, `instore`, ...).
    #[serde(default)]
    pub orders_by_channel: BTreeMap<String, ChannelOrders>,
    /// Products bought, by product id: the `history.max_purchases` most bought.
    #[serde(default)]
    pub purchases: BTreeMap<String, Purchase>,
    /// The client's latest products bought, oldest first, for product
    /// rankings' bought-together ([`crate::domain::products`]): at most
    /// [`crate::domain::products::MAX_RECENT_BUYS`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent_buys: Vec<crate::domain::products::RecentBuy>,
    /// The last errors the client met (`error_occurred`), newest last.
    #[serde(default)]
    pub recent_errors: Vec<ErrorSeen>,
    /// Mails queued for this client.
    pub mails: u64,
    /// When each template was last queued for this client.
    #[serde(default)]
    pub mailed_at: BTreeMap<String, DateTime<Utc>>,
    /// Times of the marketing mails of the last week, for frequency caps.
    #[serde(default)]
    pub marketing_sent: Vec<DateTime<Utc>>,
    /// The client's recent mails by effect key, so opens and clicks (which
    /// name the mail's Message-ID) can be tied to their rule and template.
    #[serde(default)]
    pub recent_mails: Vec<SentMail>,
    /// Opens and clicks of nudge's mails.
    #[serde(default)]
    pub opens: u64,
    #[serde(default)]
    pub clicks: u64,
}

/// Orders through one channel.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChannelOrders {
    pub count: u64,
    /// Items (sum of quantities) over these orders.
    pub items: u64,
    #[serde(deserialize_with = "lenient_f64")]
    pub total: f64,
}

/// How much of one product a client bought.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Purchase {
    pub name: Option<String>,
    pub quantity: u64,
}

/// An error the client met in the shop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorSeen {
    pub page: Option<String>,
    pub message: Option<String>,
    pub code: Option<String>,
    pub at: DateTime<Utc>,
}

/// How many recent errors are kept per client.
pub const RECENT_ERRORS: usize = 10;

/// A mail nudge queued for this client, remembered for opens and clicks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SentMail {
    pub key: String,
    pub rule: String,
    pub template: String,
    pub at: DateTime<Utc>,
}

/// Distinct products whose views are kept per client. Rules get them with
/// every event of the client, so without a bound each event of a client who
/// viewed many products (a crawler) would cost more than the one before.
pub const MAX_PRODUCT_VIEWS: usize = 200;

/// How many recent mails are remembered per client.
pub const RECENT_MAILS: usize = 50;

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
            sessions: Sessions::default(),
            timers: Vec::new(),
            facts: BTreeMap::new(),
            counters: BTreeMap::new(),
            exposures: Exposures::default(),
        }
    }

    /// The soonest pending timer, which the scheduler indexes.
    pub fn next_due(&self) -> Option<DateTime<Utc>> {
        self.timers.iter().map(|t| t.due).min()
    }

    /// Sets a timer, replacing one of the same rule and name.
    pub fn set_timer(&mut self, timer: Timer) {
        self.cancel_timer(&timer.rule, &timer.name);
        let at = self.timers.partition_point(|t| t.due <= timer.due);
        self.timers.insert(at, timer);
    }

    pub fn cancel_timer(&mut self, rule: &str, name: &str) {
        self.timers.retain(|t| !(t.rule == rule && t.name == name));
    }

    /// Removes and returns the soonest timer due at or before `until`.
    pub fn pop_due(&mut self, until: DateTime<Utc>) -> Option<Timer> {
        (self.timers.first()?.due <= until).then(|| self.timers.remove(0))
    }

    /// Folds one event into the history with the default limits.
    pub fn apply(&mut self, event: &Envelope, session_gap: Duration) {
        self.apply_limited(event, session_gap, &HistoryLimits::default());
    }

    /// Folds one event into the history, keeping within `limits`.
    /// Order-insensitive where it can be: first and last seen are a min and
    /// a max of event time.
    pub fn apply_limited(
        &mut self,
        event: &Envelope,
        session_gap: Duration,
        limits: &HistoryLimits,
    ) {
        let at = event.occurred_at;
        self.track_session(event, session_gap);
        let p = &mut self.profile;
        p.first_seen = Some(p.first_seen.map_or(at, |t| t.min(at)));
        p.last_seen = Some(p.last_seen.map_or(at, |t| t.max(at)));

        let ty = event.event_type.as_str();
        // A producer inventing a new type per event would grow these maps
        // without end: past the cap a new type is not counted here (it still
        // runs rules, is stored and counts in sessions).
        if self.stats.events.contains_key(ty) || self.stats.events.len() < limits.max_event_types {
            *self.stats.events.entry(ty.to_string()).or_default() += 1;
            let last = self.stats.last_at.entry(ty.to_string()).or_insert(at);
            *last = (*last).max(at);
        }

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
                // Checked at the edge: a stored event always parses.
                if let Some(phone) = data
                    .get("phone")
                    .and_then(Value::as_str)
                    .and_then(|s| crate::domain::phone::Phone::parse(s).ok())
                {
                    p.phone = Some(phone);
                }
                if let Some(b) = data.get("sms_consent").and_then(Value::as_bool) {
                    p.sms_consent = b;
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
                    let views = &mut self.stats.product_views;
                    make_room(views, &pid, MAX_PRODUCT_VIEWS, |n| *n);
                    *views.entry(pid).or_default() += 1;
                }
            }
            "cart_item_added" => self.stats.cart_adds += 1,
            "order_placed" => {
                let total = data.get("total").and_then(Value::as_f64).unwrap_or(0.0);
                self.stats.orders += 1;
                self.stats.spend = money_add(self.stats.spend, total);
                let channel = truncated(
                    data.get("channel")
                        .and_then(Value::as_str)
                        .unwrap_or("online"),
                    MAX_KEY_BYTES,
                );
                let mut items: u64 = 0;
                for item in data
                    .get("items")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let quantity = item.get("quantity").and_then(Value::as_u64).unwrap_or(1);
                    items = items.saturating_add(quantity);
                    if let Some(pid) = item.get("product_id").and_then(value_as_key) {
                        let purchases = &mut self.stats.purchases;
                        make_room(purchases, &pid, limits.max_purchases, |p| p.quantity);
                        let p = purchases.entry(pid).or_default();
                        p.quantity = p.quantity.saturating_add(quantity);
                        if let Some(name) = item.get("name").and_then(Value::as_str) {
                            p.name = Some(truncated(name, MAX_NAME_TEXT));
                        }
                    }
                }
                let channels = &mut self.stats.orders_by_channel;
                make_room(channels, &channel, limits.max_order_channels, |c| c.count);
                let c = channels.entry(channel).or_default();
                c.count += 1;
                c.items = c.items.saturating_add(items);
                c.total = money_add(c.total, total);
            }
            "error_occurred" => {
                let text = |k: &str| {
                    data.get(k).map(|v| {
                        let s = v.as_str().map_or_else(|| v.to_string(), str::to_string);
                        truncated(&s, MAX_ERROR_TEXT)
                    })
                };
                self.stats.recent_errors.push(ErrorSeen {
                    page: text("page"),
                    message: text("message"),
                    code: text("code"),
                    at,
                });
                let excess = self.stats.recent_errors.len().saturating_sub(RECENT_ERRORS);
                self.stats.recent_errors.drain(..excess);
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

impl ClientState {
    /// Puts the event in a session: the producer's `session_id` when given,
    /// else the current session unless `session_gap` passed since its last event.
    fn track_session(&mut self, event: &Envelope, gap: Duration) {
        let at = event.occurred_at;
        // Kept as sent up to a length; a longer id is compared by its start.
        let sid = event.session_id().map(|s| truncated(s, MAX_KEY_BYTES));
        let sid = sid.as_deref();
        let same = match (&self.sessions.current, sid) {
            (None, _) => false,
            (Some(cur), Some(sid)) => cur.id == sid,
            (Some(cur), None) => !cur.ended && at - cur.end <= gap && at >= cur.start,
        };
        if !same {
            if let Some(old) = self.sessions.current.take() {
                self.sessions.recent.insert(0, old);
                self.sessions.recent.truncate(RECENT_SESSIONS);
            }
            self.sessions.current = Some(Session {
                id: sid.map_or_else(
                    || format!("{}:{}", self.client_id, at.timestamp()),
                    str::to_string,
                ),
                derived: sid.is_none(),
                start: at,
                end: at,
                ended: false,
                events: 0,
                page_views: 0,
                product_views: 0,
                cart_adds: 0,
                orders: 0,
                channel: event
                    .context
                    .get("channel")
                    .and_then(Value::as_str)
                    .map(str::to_string),
            });
        }
        let cur = self.sessions.current.as_mut().expect("set above");
        cur.events += 1;
        cur.start = cur.start.min(at);
        cur.end = cur.end.max(at);
        match event.event_type.as_str() {
            "page_viewed" => cur.page_views += 1,
            "product_viewed" => cur.product_views += 1,
            "cart_item_added" => cur.cart_adds += 1,
            "order_placed" => cur.orders += 1,
            "session_ended" => cur.ended = true,
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

#[cfg(test)]
mod tests {
    #[test]
    fn product_views_keep_the_most_viewed() {
        let mut s = ClientState::new(ClientId::parse("c").unwrap());
        let view = |i: usize, pid: &str| {
            Envelope::from_value(serde_json::json!({
                "id": format!("e{i}"), "type": "product_viewed", "client_id": "c",
                "occurred_at": "2026-01-01T00:00:00Z", "data": {"product_id": pid},
            }))
            .unwrap()
        };
        let gap = Duration::minutes(30);
        s.apply(&view(0, "fav"), gap);
        s.apply(&view(1, "fav"), gap);
        for i in 0..1000 {
            s.apply(&view(i + 2, &format!("p{i}")), gap);
        }
        let v = &s.stats.product_views;
        assert_eq!(v.len(), MAX_PRODUCT_VIEWS);
        assert_eq!(v["fav"], 2, "the most viewed stays");
        assert!(v.contains_key("p999"), "the latest is in");
    }

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
        let gap = Duration::minutes(30);
        s.apply(
            &ev(
                "1",
                "client_registered",
                "2026-11-01T10:00:00Z",
                json!({"email": "a@b.co", "first_name": " Ana ", "acquisition_channel": "promo",
                   "marketing_consent": true}),
            ),
            gap,
        );
        s.apply(
            &ev(
                "2",
                "product_viewed",
                "2026-11-01T09:00:00Z",
                json!({"product_id": 7}),
            ),
            gap,
        );
        s.apply(
            &ev(
                "3",
                "product_viewed",
                "2026-11-02T09:00:00Z",
                json!({"product_id": "7"}),
            ),
            gap,
        );
        s.apply(
            &ev(
                "4",
                "order_placed",
                "2026-11-03T09:00:00Z",
                json!({"total": 120.5}),
            ),
            gap,
        );
        s.apply(
            &ev("5", "unsubscribed", "2026-11-04T09:00:00Z", json!({})),
            gap,
        );

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
        assert_eq!(s.stats.orders_by_channel["online"].count, 1);
        assert_eq!(s.stats.events["product_viewed"], 2);
    }

    #[test]
    fn sums_stay_finite_and_a_client_keeps_bounded_maps() {
        let mut s = ClientState::new(ClientId::parse("c1").unwrap());
        let gap = Duration::minutes(30);
        let limits = HistoryLimits::default();
        // Built past the edge's bounds on purpose: history holds on its own.
        let order = |i: usize, total: f64, pids: std::ops::Range<usize>| {
            let items: Vec<Value> = pids
                .map(|p| json!({"product_id": format!("p{p}"), "name": "n".repeat(1000), "quantity": u64::MAX}))
                .collect();
            let mut e = ev(
                &format!("o{i}"),
                "order_placed",
                "2026-11-03T09:00:00Z",
                json!({}),
            );
            e.data = json!({"total": total, "items": items, "channel": format!("ch{i}")})
                .as_object()
                .unwrap()
                .clone();
            e
        };
        for i in 0..40 {
            s.apply_limited(&order(i, 1e308, i * 1100..(i + 1) * 1100), gap, &limits);
        }
        assert_eq!(s.stats.spend, MAX_MONEY_SUM);
        assert_eq!(s.stats.purchases.len(), limits.max_purchases);
        assert!(
            s.stats
                .purchases
                .values()
                .all(|p| p.name.as_ref().unwrap().len() <= MAX_NAME_TEXT)
        );
        assert_eq!(s.stats.orders_by_channel.len(), limits.max_order_channels);
        assert!(
            s.stats
                .orders_by_channel
                .values()
                .all(|c| c.total.is_finite())
        );
        for i in 0..1000 {
            s.apply_limited(
                &ev(
                    &format!("t{i}"),
                    &format!("type_{i}"),
                    "2026-11-03T10:00:00Z",
                    json!({}),
                ),
                gap,
                &limits,
            );
        }
        assert_eq!(s.stats.events.len(), limits.max_event_types);
        assert_eq!(s.stats.last_at.len(), limits.max_event_types);
        assert_eq!(s.stats.orders, 40, "known types still count");
        let bytes = serde_json::to_vec(&s).unwrap().len();
        assert!(bytes < 200_000, "state of {bytes} bytes");
        // And it reads back as it was.
        let back: ClientState = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn a_stored_state_always_decodes() {
        let mut s = ClientState::new(ClientId::parse("c1").unwrap());
        s.apply(
            &ev(
                "1",
                "order_placed",
                "2026-11-03T09:00:00Z",
                json!({"total": 10.0}),
            ),
            Duration::minutes(30),
        );
        s.counters.insert("x/all".into(), 2.0);
        s.facts
            .insert("r".into(), json!({"k": 1}).as_object().unwrap().clone());
        let mut v = serde_json::to_value(&s).unwrap();
        // Infinity as serde_json writes it: null where a number belongs.
        v["stats"]["spend"] = Value::Null;
        v["stats"]["orders_by_channel"]["online"]["total"] = Value::Null;
        v["counters"]["x/all"] = Value::Null;
        let back: ClientState = serde_json::from_str(&v.to_string()).unwrap();
        assert_eq!(back.stats.spend, 0.0);
        assert_eq!(back.counters["x/all"], 0.0);
        assert_eq!(back.stats.orders, 1, "the rest kept");
        // A part of the wrong shape starts fresh; the others are kept.
        v["stats"] = json!("garbage");
        v["timers"] = json!({"not": "a list"});
        let back: ClientState = serde_json::from_str(&v.to_string()).unwrap();
        assert_eq!(back.stats, Stats::default());
        assert!(back.timers.is_empty());
        assert_eq!(back.facts, s.facts);
        assert_eq!(back.client_id.as_str(), "c1");
        // Without a client id there is nothing to start from.
        assert!(serde_json::from_str::<ClientState>(r#"{"stats": {}}"#).is_err());
        assert!(ClientState::decode("[1]").is_err());
    }

    #[test]
    fn long_session_ids_are_kept_short_and_still_group_events() {
        let mut s = ClientState::new(ClientId::parse("c1").unwrap());
        let gap = Duration::minutes(30);
        let sid = "s".repeat(60_000);
        s.apply(
            &sev("1", "page_viewed", "2026-11-01T10:00:00Z", Some(&sid)),
            gap,
        );
        s.apply(
            &sev("2", "page_viewed", "2026-11-01T12:00:00Z", Some(&sid)),
            gap,
        );
        let cur = s.sessions.current.as_ref().unwrap();
        assert_eq!(cur.id.len(), MAX_KEY_BYTES);
        assert_eq!(cur.events, 2);
    }

    fn sev(id: &str, ty: &str, at: &str, sid: Option<&str>) -> Envelope {
        let mut v = json!({"id": id, "type": ty, "client_id": "c1", "occurred_at": at});
        if let Some(sid) = sid {
            v["context"] = json!({"session_id": sid});
        }
        Envelope::from_value(v).unwrap()
    }

    #[test]
    fn sessions_follow_the_producer_id_or_an_inactivity_gap() {
        let mut s = ClientState::new(ClientId::parse("c1").unwrap());
        let gap = Duration::minutes(30);
        s.apply(&sev("1", "page_viewed", "2026-11-01T10:00:00Z", None), gap);
        s.apply(
            &sev("2", "product_viewed", "2026-11-01T10:20:00Z", None),
            gap,
        );
        let cur = s.sessions.current.clone().unwrap();
        assert!(cur.derived);
        assert_eq!((cur.page_views, cur.product_views, cur.events), (1, 1, 2));
        // 31 minutes of silence: a new derived session.
        s.apply(&sev("3", "page_viewed", "2026-11-01T10:51:00Z", None), gap);
        assert_eq!(s.sessions.recent.len(), 1);
        assert_eq!(s.sessions.current.as_ref().unwrap().page_views, 1);
        // The producer's session id wins over the gap.
        s.apply(
            &sev("4", "session_started", "2026-11-01T10:52:00Z", Some("A")),
            gap,
        );
        s.apply(
            &sev("5", "cart_item_added", "2026-11-01T12:00:00Z", Some("A")),
            gap,
        );
        s.apply(
            &sev("6", "session_ended", "2026-11-01T12:01:00Z", Some("A")),
            gap,
        );
        let a = s.sessions.current.clone().unwrap();
        assert_eq!(a.id, "A");
        assert!(a.ended && !a.derived);
        assert_eq!(a.cart_adds, 1);
        assert_eq!((a.end - a.start).num_minutes(), 69);
        assert_eq!(s.sessions.recent.len(), 2);
    }

    #[test]
    fn timers_are_replaced_by_name_and_pop_in_due_order() {
        let mut s = ClientState::new(ClientId::parse("c1").unwrap());
        let t = |name: &str, at: &str| Timer {
            rule: "r".into(),
            name: name.into(),
            due: at.parse().unwrap(),
            data: Map::new(),
        };
        s.set_timer(t("b", "2026-11-01T12:00:00Z"));
        s.set_timer(t("a", "2026-11-01T11:00:00Z"));
        s.set_timer(t("b", "2026-11-01T10:00:00Z"));
        assert_eq!(s.timers.len(), 2);
        assert_eq!(
            s.next_due().unwrap().to_rfc3339(),
            "2026-11-01T10:00:00+00:00"
        );
        let until = "2026-11-01T11:00:00Z".parse().unwrap();
        assert_eq!(s.pop_due(until).unwrap().name, "b");
        assert_eq!(s.pop_due(until).unwrap().name, "a");
        assert!(s.pop_due(until).is_none());
    }
}
