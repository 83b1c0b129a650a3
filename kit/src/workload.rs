//! A shop for the bench and the tests: a deterministic stream of contract
//! events (EVENTS.md envelopes, as JSON) from a fixed set of clients, shaped
//! like a busy shop's traffic. Clients register, then
//! come back in sessions of page and product views; some sessions add to the
//! cart and a few end in an order. Events are kept as small [`Spec`]s and
//! become JSON only when published, so a large workload costs little memory
//! and does not blur the memory figure.

use chrono::{DateTime, Duration, SecondsFormat, Utc};
use serde_json::{Value, json};

/// What happened, in the shop's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Registered,
    Login,
    PageView,
    ProductView,
    CartAdd,
    Order,
}

impl Kind {
    pub fn type_name(self) -> &'static str {
        match self {
            Kind::Registered => "client_registered",
            Kind::Login => "login_succeeded",
            Kind::PageView => "page_viewed",
            Kind::ProductView => "product_viewed",
            Kind::CartAdd => "cart_item_added",
            Kind::Order => "order_placed",
        }
    }
}

/// One event before it is rendered: everything its JSON is derived from.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub at: DateTime<Utc>,
    pub client: u32,
    pub kind: Kind,
    /// The client's session number, for `context.session_id`.
    pub session: u32,
    /// Varies the content (product, page, amounts) deterministically.
    pub seed: u64,
}

/// Which events a workload is made of.
pub struct Shape {
    pub clients: u32,
    /// Whether each client's first session starts with `client_registered`.
    pub register: bool,
    /// Distinguishes the session ids of one workload from another's.
    pub tag: &'static str,
}

/// A small, fast, deterministic generator (SplitMix64): the same seed gives
/// the same shop, so two runs measure the same work.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// `n` events in time order, spread over `span` ending at `end`.
pub fn generate(
    n: usize,
    shape: &Shape,
    seed: u64,
    end: DateTime<Utc>,
    span: Duration,
) -> Vec<Spec> {
    let mut rng = Rng::new(seed);
    let clients = shape.clients.max(1);
    let span_secs = span.num_seconds().max(1) as u64;
    let start = end - span;
    // Everyone registers in the first half of the span, so every client has
    // a profile (and an e-mail address) before most of their visits.
    let joined: Vec<DateTime<Utc>> = (0..clients)
        .map(|_| start + Duration::seconds(rng.below(span_secs / 2 + 1) as i64))
        .collect();
    let mut sessions_of = vec![0u32; clients as usize];
    let mut out = Vec::with_capacity(n + 64);
    if shape.register {
        for c in 0..clients {
            session(&mut out, &mut rng, c, 0, joined[c as usize], true);
            sessions_of[c as usize] = 1;
        }
    }
    while out.len() < n {
        let c = rng.below(clients as u64) as u32;
        let from = joined[c as usize];
        let room = (end - from).num_seconds().max(1) as u64;
        let at = from + Duration::seconds(rng.below(room) as i64);
        let k = sessions_of[c as usize];
        sessions_of[c as usize] += 1;
        session(&mut out, &mut rng, c, k, at, false);
    }
    // Stable: a session's events keep their order when times tie.
    out.sort_by_key(|s| s.at);
    out.truncate(n);
    out
}

/// One visit: optional registration or login, page and product views mixed,
/// sometimes cart adds, sometimes an order; 5 to 90 seconds between events.
fn session(
    out: &mut Vec<Spec>,
    rng: &mut Rng,
    client: u32,
    k: u32,
    at: DateTime<Utc>,
    first: bool,
) {
    let mut kinds = Vec::with_capacity(16);
    if first {
        kinds.push(Kind::Registered);
    } else if rng.chance(20) {
        kinds.push(Kind::Login);
    }
    let pages = 1 + rng.below(7);
    let products = rng.below(7);
    for i in 0..pages.max(products) {
        if i < pages {
            kinds.push(Kind::PageView);
        }
        if i < products {
            kinds.push(Kind::ProductView);
        }
    }
    if !first && rng.chance(30) {
        for _ in 0..1 + rng.below(3) {
            kinds.push(Kind::CartAdd);
        }
        if rng.chance(35) {
            kinds.push(Kind::Order);
        }
    }
    let mut t = at;
    for kind in kinds {
        out.push(Spec {
            at: t,
            client,
            kind,
            session: k,
            seed: rng.next_u64(),
        });
        t += Duration::seconds(5 + rng.below(86) as i64);
    }
}

const CATEGORIES: &[&str] = &["shoes", "shirts", "bags", "watches", "garden", "books"];
const CHANNELS: &[(&str, u64)] = &[
    ("organic", 50),
    ("promo", 20),
    ("trial", 10),
    ("ads", 15),
    ("partner", 5),
];
const USER_AGENT: &str = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) \
                          Chrome/126.0 Safari/537.36";

pub fn client_id(c: u32) -> String {
    format!("client-{c:06}")
}

/// Whether this client came through a partner link (and which partner).
fn partner_of(c: u32) -> Option<&'static str> {
    match c % 40 {
        0 => Some("acme"),
        1 => Some("globex"),
        _ => None,
    }
}

/// The contract envelope of `spec`, with id `id`; `at` overrides its time
/// (the latency phase stamps events as they are sent).
pub fn render(spec: &Spec, id: &str, tag: &str, at: Option<DateTime<Utc>>) -> Value {
    let c = spec.client;
    let mut rng = Rng::new(spec.seed);
    let category = CATEGORIES[rng.below(CATEGORIES.len() as u64) as usize];
    let product = rng.below(5000);
    let price = 5.0 + rng.below(20_000) as f64 / 100.0;
    let mut context = json!({
        "channel": "web",
        "page": format!("/{category}/p{product}"),
        "ip": format!("203.0.113.{}", c % 250),
        "user_agent": USER_AGENT,
        "locale": "en-GB",
    });
    // Seven clients in ten come through the web shop with its session ids;
    // the rest (the app) send none, so nudge derives their sessions.
    if c % 10 < 7 {
        context["session_id"] = json!(format!("{tag}{c}-{}", spec.session));
    }
    if let Some(p) = partner_of(c)
        && spec.session == 0
    {
        context["partner_track_id"] = json!(p);
    }
    let data = match spec.kind {
        Kind::Registered => {
            let mut pick = rng.below(100);
            let channel = CHANNELS
                .iter()
                .find(|(_, w)| {
                    let hit = pick < *w;
                    pick = pick.saturating_sub(*w);
                    hit
                })
                .map_or("organic", |(name, _)| *name);
            let channel = if partner_of(c).is_some() {
                "partner"
            } else {
                channel
            };
            json!({
                "email": format!("{}@bench.example", client_id(c)),
                "first_name": format!("Client{c}"),
                "last_name": "Bench",
                "acquisition_channel": channel,
                "promo_code": if channel == "promo" { json!("WELCOME10") } else { Value::Null },
                "partner_id": partner_of(c),
                "marketing_consent": c.is_multiple_of(2),
                "locale": "en-GB",
            })
        }
        Kind::Login => json!({}),
        Kind::PageView => json!({
            "url": format!("https://shop.example/{category}?page={}", 1 + product % 5),
            "title": format!("{category} page {}", 1 + product % 5),
        }),
        Kind::ProductView => json!({
            "product_id": format!("p{product}"),
            "name": format!("{category} item {product}"),
            "price": price,
            "category": category,
        }),
        Kind::CartAdd => json!({
            "product_id": format!("p{product}"),
            "name": format!("{category} item {product}"),
            "quantity": 1 + rng.below(3),
            "price": price,
        }),
        Kind::Order => {
            // One order in twenty is a big one (happy_client counts those).
            let total = if rng.chance(5) {
                1000.0 + rng.below(300_000) as f64 / 100.0
            } else {
                price * (1 + rng.below(3)) as f64
            };
            json!({
                "order_id": format!("o-{id}"),
                "channel": "online",
                "total": total,
                "currency": "EUR",
                "items": [{"product_id": format!("p{product}"), "name": format!("{category} item {product}"), "quantity": 1, "price": price}],
            })
        }
    };
    envelope(
        id,
        spec.kind.type_name(),
        &client_id(c),
        &at.unwrap_or(spec.at)
            .to_rfc3339_opts(SecondsFormat::Micros, true),
        data,
        context,
    )
}

/// A contract envelope (EVENTS.md): what the shop publishes, one per event.
pub fn envelope(
    id: &str,
    ty: &str,
    client: &str,
    occurred_at: &str,
    data: Value,
    context: Value,
) -> Value {
    json!({
        "id": id,
        "type": ty,
        "client_id": client,
        "occurred_at": occurred_at,
        "data": data,
        "context": context,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> Shape {
        Shape {
            clients: 50,
            register: true,
            tag: "s",
        }
    }

    #[test]
    fn exactly_n_events_in_time_order() {
        let end = Utc::now();
        let specs = generate(1000, &shape(), 7, end, Duration::days(7));
        assert_eq!(specs.len(), 1000);
        assert!(specs.windows(2).all(|w| w[0].at <= w[1].at));
    }

    #[test]
    fn every_event_has_the_envelope_fields() {
        // That each is valid as nudge parses it is checked on nudge's side
        // (tests/it/bench.rs): the kit does not depend on nudge.
        let specs = generate(2000, &shape(), 7, Utc::now(), Duration::days(7));
        for (i, s) in specs.iter().enumerate() {
            let v = render(s, &format!("ev-{i}"), "s", None);
            for field in ["id", "type", "client_id", "occurred_at"] {
                assert!(v[field].is_string(), "{field} in {v}");
            }
            assert!(v["data"].is_object() && v["context"].is_object(), "{v}");
        }
    }

    #[test]
    fn the_mix_is_mostly_views() {
        let specs = generate(20_000, &shape(), 7, Utc::now(), Duration::days(7));
        let share = |k| specs.iter().filter(|s| s.kind == k).count() * 100 / specs.len();
        assert!(share(Kind::PageView) + share(Kind::ProductView) > 75);
        assert!(share(Kind::CartAdd) >= 3);
        assert!(specs.iter().any(|s| s.kind == Kind::Order));
    }
}
