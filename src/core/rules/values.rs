//! nudge's data as the Rhai values rules see: the event, the client and the
//! settings. They are built straight from the Rust types. Going through
//! `serde_json::Value` and `rhai::serde` builds everything twice, and for
//! the client view that cost more than running the rules did.
//!
//! The values are the ones `rhai::serde::to_dynamic` gives for the JSON
//! views in [`crate::core::decide`] (`event_view`, `client_view`). Those stay
//! what previews and the API show. The tests below check that both ways
//! give the same value.
//!
//! And only what the rules of a trigger can read is built: each rule's
//! script is looked through once, when it is compiled, for how it uses
//! `event` and `client` ([`Needs`]). A rule that reads `client.session` and
//! `client.stats.mailed_at` gets a `client` with those two, not the ten
//! past sessions and every counter; a rule that passes `client` whole
//! anywhere (to a function, to `print`, into a closure, indexed with `[]`)
//! gets all of it. The part a script cannot reach cannot change what it does.

use crate::domain::event::Envelope;
use crate::domain::history::{ClientState, Session};
use chrono::{DateTime, Utc};
use rhai::{AST, ASTNode, Array, Dynamic, Expr, INT, Map};
use serde_json::Value;
use std::collections::BTreeMap;

/// Which part of a value rules can read.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Needs {
    /// Not read at all.
    #[default]
    Nothing,
    /// Read as a whole, or in ways not worth following.
    All,
    /// Only these properties, each with what of it is read.
    Some(BTreeMap<String, Needs>),
}

/// How deep property chains are followed: `client.stats.mailed_at` makes
/// `stats` hold only `mailed_at`, whole.
const DEPTH: usize = 2;

impl Needs {
    /// What a script reads of the variable `var`: every place it appears,
    /// in the top level and in functions, merged.
    pub fn of(ast: &AST, var: &str) -> Needs {
        let mut needs = Needs::Nothing;
        ast.walk(&mut |path: &[ASTNode]| {
            if let Some(ASTNode::Expr(node @ Expr::Variable(v, ..))) = path.last()
                && v.1.as_str() == var
            {
                let used = match path.len().checked_sub(2).map(|i| &path[i]) {
                    // `var.something`: follow the chain.
                    Some(ASTNode::Expr(Expr::Dot(x, ..))) if std::ptr::eq(&x.lhs, *node) => {
                        chain(&x.rhs, 1)
                    }
                    // Anything else: the value as a whole.
                    _ => Needs::All,
                };
                needs.merge(used);
            }
            true
        });
        needs
    }

    /// Both needs together.
    pub fn merge(&mut self, other: Needs) {
        match (&mut *self, other) {
            (Needs::All, _) | (_, Needs::Nothing) => {}
            (Needs::Nothing, other) => *self = other,
            (_, Needs::All) => *self = Needs::All,
            (Needs::Some(mine), Needs::Some(theirs)) => {
                for (key, need) in theirs {
                    mine.entry(key).or_default().merge(need);
                }
            }
        }
    }

    /// What is needed of property `key`, if anything.
    fn get(&self, key: &str) -> Option<&Needs> {
        match self {
            Needs::Nothing => None,
            Needs::All => Some(&Needs::All),
            Needs::Some(keys) => keys.get(key),
        }
    }

    fn one(key: &str, need: Needs) -> Needs {
        Needs::Some(BTreeMap::from([(key.to_string(), need)]))
    }
}

/// What a property chain reads of the value it starts from; `rhs` is what
/// follows the dot, `depth` how many properties deep that is.
fn chain(rhs: &Expr, depth: usize) -> Needs {
    let property = |e: &Expr| match e {
        Expr::Property(p, _) => Some(p.2.to_string()),
        _ => None,
    };
    match rhs {
        // `.key`
        Expr::Property(..) => Needs::one(&property(rhs).expect("a property"), Needs::All),
        // `.key.more` (or `.key.method()`: the key whole)
        Expr::Dot(x, ..) => match property(&x.lhs) {
            Some(key) if depth < DEPTH => Needs::one(&key, chain(&x.rhs, depth + 1)),
            Some(key) => Needs::one(&key, Needs::All),
            None => Needs::All,
        },
        // `.key[index]`: the key whole.
        Expr::Index(x, ..) => match property(&x.lhs) {
            Some(key) => Needs::one(&key, Needs::All),
            None => Needs::All,
        },
        // A method called on the value itself, or anything unforeseen.
        _ => Needs::All,
    }
}

/// A map holding the properties of `needs`, each made by `make` with what
/// is needed of it.
struct Partial<'a> {
    needs: &'a Needs,
    map: Map,
}

impl<'a> Partial<'a> {
    fn new(needs: &'a Needs) -> Self {
        Self {
            needs,
            map: Map::new(),
        }
    }
    fn put(&mut self, key: &str, make: impl FnOnce(&Needs) -> Dynamic) -> &mut Self {
        if let Some(need) = self.needs.get(key) {
            self.map.insert(key.into(), make(need));
        }
        self
    }
    fn done(&mut self) -> Dynamic {
        Dynamic::from_map(std::mem::take(&mut self.map))
    }
}

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
    from_json_map_with(m, &Needs::All)
}

fn from_json_map_with(m: &serde_json::Map<String, Value>, needs: &Needs) -> Dynamic {
    match needs {
        Needs::Some(keys) => Dynamic::from_map(
            keys.keys()
                .filter_map(|k| Some((k.as_str().into(), from_json(m.get(k)?))))
                .collect(),
        ),
        _ => Dynamic::from_map(
            m.iter()
                .map(|(k, v)| (k.as_str().into(), from_json(v)))
                .collect(),
        ),
    }
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

/// The event as rules see it (`decide::event_view`), as far as `needs`.
pub fn event(e: &Envelope, needs: &Needs) -> Dynamic {
    if *needs == Needs::Nothing {
        return Dynamic::UNIT;
    }
    Partial::new(needs)
        .put("id", |_| Dynamic::from(e.id.as_str().to_string()))
        .put("type", |_| Dynamic::from(e.event_type.as_str().to_string()))
        .put("client_id", |_| {
            Dynamic::from(e.client_id.as_str().to_string())
        })
        .put("occurred_at", |_| {
            Dynamic::from_int(e.occurred_at.timestamp())
        })
        .put("data", |n| from_json_map_with(&e.data, n))
        .put("context", |n| from_json_map_with(&e.context, n))
        .done()
}

/// The client as rules see it (`decide::client_view`), as far as `needs`.
pub fn client(s: &ClientState, needs: &Needs) -> Dynamic {
    if *needs == Needs::Nothing {
        return Dynamic::UNIT;
    }
    let p = &s.profile;
    let st = &s.stats;
    Partial::new(needs)
        .put("id", |_| Dynamic::from(s.client_id.as_str().to_string()))
        .put("email", |_| text(&p.email))
        .put("first_name", |_| text(&p.first_name))
        .put("last_name", |_| text(&p.last_name))
        .put("acquisition_channel", |_| text(&p.acquisition_channel))
        .put("promo_code", |_| text(&p.promo_code))
        .put("partner_id", |_| text(&p.partner_id))
        .put("locale", |_| text(&p.locale))
        .put("timezone", |_| text(&p.timezone))
        .put("marketing_consent", |_| {
            Dynamic::from_bool(p.marketing_consent)
        })
        .put("unsubscribed", |_| Dynamic::from_bool(p.unsubscribed))
        .put("registered_at", |_| secs(p.registered_at))
        .put("first_seen", |_| secs(p.first_seen))
        .put("last_seen", |_| secs(p.last_seen))
        .put("session", |n| session(s.sessions.current.as_ref(), n))
        .put("last_session", |n| session(s.sessions.recent.first(), n))
        .put("sessions", |_| {
            Dynamic::from_array(
                s.sessions
                    .recent
                    .iter()
                    .map(|x| session(Some(x), &Needs::All))
                    .collect::<Array>(),
            )
        })
        .put("stats", |n| {
            Partial::new(n)
                .put("mailed_at", |_| times(&st.mailed_at))
                .put("events", |_| counts(&st.events))
                .put("last_at", |_| times(&st.last_at))
                .put("product_views", |_| counts(&st.product_views))
                .put("cart_adds", |_| unsigned(st.cart_adds))
                .put("orders", |_| unsigned(st.orders))
                .put("orders_cancelled", |_| unsigned(st.orders_cancelled))
                .put("spend", |_| Dynamic::from_float(st.spend))
                .put("mails", |_| unsigned(st.mails))
                .done()
        })
        .done()
}

fn session(s: Option<&Session>, needs: &Needs) -> Dynamic {
    let Some(s) = s else {
        return Dynamic::UNIT;
    };
    Partial::new(needs)
        .put("id", |_| Dynamic::from(s.id.clone()))
        .put("derived", |_| Dynamic::from_bool(s.derived))
        .put("start", |_| Dynamic::from_int(s.start.timestamp()))
        .put("end", |_| Dynamic::from_int(s.end.timestamp()))
        .put("duration", |_| {
            Dynamic::from_int((s.end - s.start).num_seconds())
        })
        .put("ended", |_| Dynamic::from_bool(s.ended))
        .put("events", |_| unsigned(s.events))
        .put("page_views", |_| unsigned(s.page_views))
        .put("product_views", |_| unsigned(s.product_views))
        .put("cart_adds", |_| unsigned(s.cart_adds))
        .put("orders", |_| unsigned(s.orders))
        .put("channel", |_| text(&s.channel))
        .done()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::decide::{client_view, event_view};
    use crate::domain::event::ClientId;
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
        assert!(same(&client(&s, &Needs::All), &via_serde(client_view(&s))));
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
            assert!(
                same(&event(e, &Needs::All), &via_serde(event_view(e))),
                "{}",
                e.id
            );
            assert!(
                same(&client(&s, &Needs::All), &via_serde(client_view(&s))),
                "after {}",
                e.id
            );
        }
        s.stats.mails = 3;
        s.stats
            .mailed_at
            .insert("welcome".into(), events[0].occurred_at);
        s.stats.spend = 0.0;
        assert!(same(&client(&s, &Needs::All), &via_serde(client_view(&s))));
    }
}

#[cfg(test)]
mod needs_tests {
    use super::*;
    use crate::core::rules::RulesConfig;
    use crate::core::rules::{Inputs, RuleEngine, RunContext};
    use crate::domain::event::ClientId;
    use serde_json::json;

    fn reads(src: &str) -> (Needs, Needs) {
        let ast = rhai::Engine::new().compile(src).unwrap();
        (Needs::of(&ast, "event"), Needs::of(&ast, "client"))
    }

    fn some(pairs: &[(&str, Needs)]) -> Needs {
        Needs::Some(
            pairs
                .iter()
                .map(|(k, n)| (k.to_string(), n.clone()))
                .collect(),
        )
    }

    #[test]
    fn property_chains_are_followed_two_deep_anything_else_is_all() {
        use Needs::{All, Nothing};
        let client = |src: &str| reads(src).1;
        assert_eq!(client("1 + 1"), Nothing);
        assert_eq!(client("client.first_name"), some(&[("first_name", All)]));
        assert_eq!(
            client("client?.first_name ?? 1"),
            some(&[("first_name", All)])
        );
        assert_eq!(
            client("client.stats.mailed_at.browse_discount"),
            some(&[("stats", some(&[("mailed_at", All)]))])
        );
        assert_eq!(
            client("client.session.id == 1 && client.session.start > 0 && client.id != ()"),
            some(&[
                ("id", All),
                ("session", some(&[("id", All), ("start", All)]))
            ])
        );
        assert_eq!(
            client("let s = client.session; s.cart_adds"),
            some(&[("session", All)])
        );
        assert_eq!(client("client.sessions[0].id"), some(&[("sessions", All)]));
        assert_eq!(client("client.sessions.len()"), some(&[("sessions", All)]));
        assert_eq!(
            client("`hi ${client.first_name}`"),
            some(&[("first_name", All)])
        );
        // Whole, or in ways not followed.
        for src in [
            "print(client)",
            "client.keys()",
            "client[\"email\"]",
            "let c = client; c.email",
            "let f = || client.first_name; f.call()",
            "fn f(c) { c.email } f(client)",
            "client.first_name + client.stats.events.x; client.to_json()",
            "for k in client.keys() {}",
            "if \"email\" in client {}",
        ] {
            assert_eq!(client(src), All, "{src}");
        }
        // Inside functions too.
        assert_eq!(
            client("fn f(client) { client.email } f(1)"),
            some(&[("email", All)])
        );
        assert_eq!(
            reads("if event.type == \"x\" { event.data.total } else { event.context.page }").0,
            some(&[
                ("context", some(&[("page", All)])),
                ("data", some(&[("total", All)])),
                ("type", All)
            ])
        );
    }

    #[test]
    fn merged_needs_cover_both() {
        use Needs::{All, Nothing};
        let mut n = Nothing;
        n.merge(some(&[("a", some(&[("x", All)]))]));
        n.merge(some(&[("a", some(&[("y", All)])), ("b", All)]));
        assert_eq!(
            n,
            some(&[("a", some(&[("x", All), ("y", All)])), ("b", All)])
        );
        n.merge(some(&[("a", All)]));
        assert_eq!(n, some(&[("a", All), ("b", All)]));
        n.merge(All);
        assert_eq!(n, All);
        n.merge(Nothing);
        assert_eq!(n, All);
    }

    /// Every shipped rule, and scripts that read in odd ways, do the same with
    /// the inputs built for what they read as with the whole inputs.
    #[test]
    fn rules_decide_the_same_on_what_they_read_as_on_everything() {
        let engine = RuleEngine::new(&RulesConfig::default());
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
        let mut scripts: Vec<(String, String)> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| {
                let p = e.ok()?.path();
                (p.extension()? == "rhai").then(|| {
                    (
                        p.display().to_string(),
                        std::fs::read_to_string(&p).unwrap(),
                    )
                })
            })
            .collect();
        assert!(scripts.len() >= 7, "the shipped rules are found");
        for src in [
            "remember(\"k\", `${client.stats.mailed_at} ${client.session}`);",
            "remember(\"k\", client.stats.events.keys().len() + client.sessions.len());",
            "remember(\"k\", event.data.total ?? event.context.partner_track_id);",
            "remember(\"k\", client.session?.id);",
            "remember(\"k\", client.last_session.duration ?? client.stats.nothing);",
        ] {
            scripts.push((src.to_string(), format!("const ON = [\"*\"];\n{src}")));
        }

        let gap = chrono::Duration::minutes(30);
        let events: Vec<Envelope> = [
            json!({"id": "1", "type": "client_registered", "client_id": "c1",
                "occurred_at": "2026-11-01T10:00:00Z",
                "data": {"email": "a@b.co", "first_name": "Ana", "marketing_consent": true},
                "context": {"partner_track_id": "acme"}}),
            json!({"id": "2", "type": "product_viewed", "client_id": "c1",
                "occurred_at": "2026-11-01T10:01:00Z", "data": {"product_id": "p1"}}),
            json!({"id": "3", "type": "page_viewed", "client_id": "c1",
                "occurred_at": "2026-11-01T10:20:00Z", "data": {}}),
            json!({"id": "4", "type": "product_viewed", "client_id": "c1",
                "occurred_at": "2026-11-01T10:30:00Z", "data": {"product_id": "p2"}}),
            json!({"id": "5", "type": "order_placed", "client_id": "c1",
                "occurred_at": "2026-11-02T10:00:00Z",
                "data": {"total": 1500.0, "order_id": "o1", "currency": "EUR"}}),
        ]
        .into_iter()
        .map(|v| Envelope::from_value(v).unwrap())
        .collect();
        let settings = from_json(&json!({"partner_shares": {"acme": 10}}));
        for (name, src) in &scripts {
            let rule = engine
                .compile("r", name.into(), src)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let mut state = ClientState::new(ClientId::parse("c1").unwrap());
            let mut facts = serde_json::Map::new();
            for e in &events {
                state.apply(e, gap);
                let run = |event: Dynamic, client: Dynamic| {
                    let mut inputs =
                        Inputs::new(event, client, settings.clone(), e.occurred_at.timestamp());
                    let mut ctx = RunContext::new("r", "c1", e.id.as_str());
                    ctx.facts = facts.clone();
                    let (ctx, result) = engine.run(&rule, &mut inputs, ctx);
                    (
                        result.map_err(|e| e.message),
                        format!("{:?}", ctx.requests),
                        ctx.facts,
                    )
                };
                let whole = run(event(e, &Needs::All), client(&state, &Needs::All));
                let part = run(
                    event(e, &rule.reads.event),
                    client(&state, &rule.reads.client),
                );
                assert_eq!(whole, part, "{name} on event {}", e.id);
                facts = whole.2;
            }
        }
    }
}
