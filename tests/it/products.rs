//! Product rankings: a generated history of views, cart adds and orders
//! over NATS must give the popular products and the bought-with lists a
//! reference computation here gives, per day, week and month; redelivered
//! events count once; a rule reading `popular()` and `bought_with()`
//! decides the same live, in a backtest and as the reference says; a
//! replay rebuilds the rankings exactly. (The storage bound for 100,000
//! products is a unit test, `domain::products::tests`: through NATS it
//! would take far too long.)

use crate::helpers::{Backend, Sql, TestApp, TestEnv, event, eventually};
use nudge::domain::counters::period_key;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// A rule that reads the rankings as each view is decided: it emits when
/// the viewed product leads the day's views, and when the product most
/// bought with it this month sorts before it.
const PICK_RULE: &str = r#"const ON = ["product_viewed"];
let pid = event.data.product_id;
let top = popular("viewed", "day", 1);
if top.len() == 1 && top[0].product_id == pid {
    emit("day_leader", #{ product_id: pid, views: top[0].count });
}
let partner = bought_with(pid, 1);
if partner.len() == 1 && partner[0].product_id < pid {
    emit("paired_before", #{ product_id: pid, partner: partner[0].product_id });
}
"#;

/// The history: `(event, kind, time, products)` in time (and publishing) order.
struct Generated {
    events: Vec<Value>,
    /// Per event: its ranking kind, time, products (distinct, in order) and client.
    facts: Vec<(
        &'static str,
        chrono::DateTime<chrono::Utc>,
        Vec<String>,
        String,
    )>,
}

fn generate() -> Generated {
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = |n: u64| {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (seed >> 33) % n
    };
    let base: chrono::DateTime<chrono::Utc> = "2026-11-09T08:00:00Z".parse().unwrap();
    let late: chrono::DateTime<chrono::Utc> = "2026-11-30T20:00:00Z".parse().unwrap();
    let (mut events, mut facts) = (Vec::new(), Vec::new());
    for i in 0..520u64 {
        // Three days of one week, then a night from November into December
        // (another week and month).
        let at = if i < 440 {
            base + chrono::Duration::minutes(7 * i as i64)
        } else {
            late + chrono::Duration::minutes(10 * (i - 440) as i64)
        };
        // Skewed popularity: the smaller of two draws.
        let product = |next: &mut dyn FnMut(u64) -> u64| format!("p{:02}", next(25).min(next(25)));
        let client = format!("k{:02}", next(30));
        let id = format!("ev{i}");
        let when = at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let roll = next(100);
        let (kind, ty, data, products) = if roll < 55 {
            let p = product(&mut next);
            (
                "viewed",
                "product_viewed",
                json!({"product_id": p, "price": 10}),
                vec![p],
            )
        } else if roll < 80 {
            let p = product(&mut next);
            (
                "carted",
                "cart_item_added",
                json!({"product_id": p, "quantity": 1, "price": 10}),
                vec![p],
            )
        } else {
            let n = 1 + next(4);
            let items: Vec<String> = (0..n).map(|_| product(&mut next)).collect();
            let lines: Vec<Value> = items
                .iter()
                .map(|p| json!({"product_id": p, "quantity": 1 + next(3), "price": 10}))
                .collect();
            let mut distinct: Vec<String> = Vec::new();
            for p in items {
                if !distinct.contains(&p) {
                    distinct.push(p);
                }
            }
            (
                "bought",
                "order_placed",
                json!({"order_id": id, "channel": "online", "total": 10 * n, "currency": "EUR", "items": lines}),
                distinct,
            )
        };
        events.push(event(&id, ty, &client, &when, data, json!({})));
        facts.push((kind, at, products, client));
    }
    Generated { events, facts }
}

/// Counts per ranking family and product, computed here in stream order,
/// and the emits the pick rule must make (`(type, event id)`).
struct Reference {
    counts: BTreeMap<String, BTreeMap<String, f64>>,
    emits: BTreeSet<(String, String)>,
}

fn reference(g: &Generated) -> Reference {
    let tz = chrono_tz::Tz::UTC;
    let mut counts: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    let mut emits = BTreeSet::new();
    let leader = |m: &BTreeMap<String, f64>| -> Option<String> {
        m.iter()
            .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(a.0)))
            .map(|(p, _)| p.clone())
    };
    // Per client, the latest products bought (oldest first, at most MAX_RECENT_BUYS):
    // an order's products are bought together with those within 30 days
    // (`history.bought_together_days`) that it does not hold.
    let mut recent: BTreeMap<&str, Vec<(String, chrono::DateTime<chrono::Utc>)>> = BTreeMap::new();
    for (i, (kind, at, products, client)) in g.facts.iter().enumerate() {
        for period in ["day", "week", "month"] {
            let family = format!("{kind}/{period}/{}", period_key(period, *at, tz).unwrap());
            for p in products {
                *counts
                    .entry(family.clone())
                    .or_default()
                    .entry(p.clone())
                    .or_default() += 1.0;
            }
        }
        let month = period_key("month", *at, tz).unwrap();
        if *kind == "bought" {
            let mine = recent.entry(client.as_str()).or_default();
            let earlier: Vec<String> = mine
                .iter()
                .filter(|(p, t)| {
                    (*at - *t).abs() <= chrono::Duration::days(30) && !products.contains(p)
                })
                .map(|(p, _)| p.clone())
                .collect();
            let mut pairs: Vec<(&String, &String)> = Vec::new();
            for a in products {
                pairs.extend(products.iter().filter(|b| *b != a).map(|b| (a, b)));
                for b in &earlier {
                    pairs.push((a, b));
                    pairs.push((b, a));
                }
            }
            for (a, b) in pairs {
                *counts
                    .entry(format!("with/{month}/{a}"))
                    .or_default()
                    .entry(b.clone())
                    .or_default() += 1.0;
            }
            mine.retain(|(p, _)| !products.contains(p));
            mine.extend(products.iter().map(|p| (p.clone(), *at)));
            let over = mine
                .len()
                .saturating_sub(nudge::domain::products::MAX_RECENT_BUYS);
            mine.drain(..over);
        }
        if *kind == "viewed" {
            let id = format!("ev{i}");
            let p = &products[0];
            let day = format!("viewed/day/{}", period_key("day", *at, tz).unwrap());
            if leader(&counts[&day]).as_ref() == Some(p) {
                emits.insert(("day_leader".to_string(), id.clone()));
            }
            if let Some(w) = counts.get(&format!("with/{month}/{p}")).and_then(leader)
                && &w < p
            {
                emits.insert(("paired_before".to_string(), id));
            }
        }
    }
    Reference { counts, emits }
}

/// A family's reference lines as the API gives them.
fn lines(counts: Option<&BTreeMap<String, f64>>, limit: usize) -> Value {
    let mut rows: Vec<(&String, f64)> =
        counts.into_iter().flatten().map(|(p, n)| (p, *n)).collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
    let mut out: Vec<Value> = Vec::new();
    for (i, (p, n)) in rows.into_iter().take(limit).enumerate() {
        let rank = match out.last() {
            Some(prev) if prev["count"].as_f64() == Some(n) => prev["rank"].as_u64().unwrap(),
            _ => i as u64 + 1,
        };
        out.push(json!({"rank": rank, "product_id": p, "count": n}));
    }
    json!(out)
}

async fn get(app: &TestApp, path: &str) -> Value {
    let r = app.get(path).await;
    assert_eq!(r.status(), 200, "{path}");
    r.json().await.unwrap()
}

/// Every ranking row and admitted product, as stored.
async fn ranking_rows(url: &str) -> Vec<Vec<Option<String>>> {
    let sql = Sql::connect(url).await;
    let mut rows = sql
        .rows(
            "SELECT name, period, CAST(value AS TEXT) FROM counters \
             WHERE substr(name, 1, 9) = 'products:' ORDER BY name, period",
        )
        .await;
    rows.extend(
        sql.rows(
            "SELECT name, period, member FROM counter_members \
             WHERE substr(name, 1, 9) = 'products:' ORDER BY name, period, member",
        )
        .await,
    );
    sql.close().await;
    rows
}

async fn product_rankings_equal_the_reference_live_in_backtest_and_replay(backend: Backend) {
    let env = TestEnv::new(backend).await;
    // Sweeps run at wall-clock times the back-dated history does not follow.
    std::fs::remove_file(env.rules_dir().join("idle_reminder.rhai")).unwrap();
    std::fs::write(env.rules_dir().join("product_pick.rhai"), PICK_RULE).unwrap();
    let app = env.start().await;
    let g = generate();
    let want = reference(&g);
    assert!(
        want.emits.iter().any(|e| e.0 == "day_leader")
            && want.emits.iter().any(|e| e.0 == "paired_before"),
        "the history makes both picks: {:?}",
        want.emits
    );
    let (early, late) = g.events.split_at(g.events.len() / 2);
    for e in early {
        app.publish(e).await;
    }
    // Sent twice by the shop (other broker ids): they must count once.
    for e in early.iter().step_by(9) {
        let id = format!("again-{}", e["id"].as_str().unwrap());
        let ty = e["type"].as_str().unwrap();
        app.publish_raw(ty, &id, serde_json::to_vec(e).unwrap())
            .await;
    }
    for e in late {
        app.publish(e).await;
    }
    // The rule's emits are stored too: wait for the last event itself
    // (batches commit in stream order).
    let last = nudge::domain::event::EventId::parse("ev519".to_string()).unwrap();
    eventually(Duration::from_secs(60), "the last event stored", || async {
        use nudge::store::Batches;
        let known = app.store.known_events(&[&last]).await.ok()?;
        (!known.is_empty()).then_some(())
    })
    .await;

    for at in [
        "2026-11-09",
        "2026-11-10",
        "2026-11-11",
        "2026-11-30",
        "2026-12-01",
    ] {
        let date: chrono::NaiveDate = at.parse().unwrap();
        let noon = date.and_hms_opt(12, 0, 0).unwrap().and_utc();
        for kind in ["viewed", "carted", "bought"] {
            for period in ["day", "week", "month"] {
                let key = period_key(period, noon, chrono_tz::Tz::UTC).unwrap();
                let got = get(
                    &app,
                    &format!("/api/products/popular?kind={kind}&period={period}&at={at}&limit=100"),
                )
                .await;
                assert_eq!(
                    (got["kind"].as_str(), got["key"].as_str()),
                    (Some(kind), Some(key.as_str()))
                );
                assert_eq!(
                    got["products"],
                    lines(want.counts.get(&format!("{kind}/{period}/{key}")), 100),
                    "{kind} {period} {at}"
                );
            }
        }
        let month = period_key("month", noon, chrono_tz::Tz::UTC).unwrap();
        for p in 0..25 {
            let p = format!("p{p:02}");
            let got = get(
                &app,
                &format!("/api/products/{p}/bought-with?at={at}&limit=100"),
            )
            .await;
            assert_eq!(got["key"], month.as_str());
            assert_eq!(
                got["products"],
                lines(want.counts.get(&format!("with/{month}/{p}")), 100),
                "bought with {p} in {month}"
            );
        }
    }
    let top3 = get(
        &app,
        "/api/products/popular?kind=viewed&period=month&at=2026-11-10&limit=3",
    )
    .await;
    assert_eq!(
        top3["products"],
        lines(want.counts.get("viewed/month/2026-11"), 3)
    );
    assert_eq!(top3["products"].as_array().unwrap().len(), 3);
    for bad in [
        "kind=liked",
        "period=year",
        "limit=0",
        "limit=101",
        "at=10/11/2026",
    ] {
        let r = app.get(&format!("/api/products/popular?{bad}")).await;
        assert_eq!(r.status(), 400, "{bad}");
        let body: Value = r.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().len() > 10, "{bad}: {body}");
    }
    assert_eq!(
        app.get("/api/products/p01/bought-with?limit=x")
            .await
            .status(),
        400
    );

    // The pick rule decided on the rankings as the reference says, live and
    // in a backtest of the stored history.
    use nudge::store::Outbox;
    let outbox = app.store.list_outbox(1_000_000).await.unwrap();
    let picks = |causes: Vec<String>| -> BTreeMap<String, usize> {
        causes.into_iter().fold(BTreeMap::new(), |mut m, c| {
            *m.entry(c).or_default() += 1;
            m
        })
    };
    let live_keys: BTreeSet<String> = outbox
        .iter()
        .filter(|r| r.rule == "product_pick")
        .map(|r| r.key.clone())
        .collect();
    let (live, reference) = (
        picks(
            outbox
                .iter()
                .filter(|r| r.rule == "product_pick")
                .map(|r| r.cause.clone())
                .collect(),
        ),
        picks(want.emits.iter().map(|e| e.1.clone()).collect()),
    );
    let differ: Vec<_> = live
        .iter()
        .chain(&reference)
        .filter(|(k, _)| live.get(*k) != reference.get(*k))
        .map(|(k, _)| (k, live.get(k), reference.get(k)))
        .collect();
    assert!(
        differ.is_empty(),
        "live picks against the reference: (event, live, reference): {differ:?}"
    );
    let env = app.stop().await;
    let store = nudge::app::open_store(&env.config).await.unwrap();
    let bt = nudge::tools::backtest(&env.config, &store, &env.rules_dir(), None, None)
        .await
        .unwrap();
    let bt_picks: Vec<&nudge::tools::FoundEffect> = bt
        .effects
        .iter()
        .filter(|e| e.rule == "product_pick")
        .collect();
    assert_eq!(
        bt_picks
            .iter()
            .map(|e| (e.template.clone(), e.cause.clone()))
            .collect::<BTreeSet<_>>(),
        want.emits,
        "backtest picks against the reference"
    );
    assert_eq!(
        bt_picks
            .iter()
            .map(|e| e.key.clone())
            .collect::<BTreeSet<_>>(),
        live_keys,
        "the backtest picks what live picked, effect by effect"
    );

    // A replay rebuilds the rankings exactly.
    let url = env.config.database.url.expose().to_string();
    let before = ranking_rows(&url).await;
    assert!(before.len() > 200, "{}", before.len());
    nudge::tools::replay(&env.config, &store, |_| {})
        .await
        .unwrap();
    assert_eq!(
        ranking_rows(&url).await,
        before,
        "replay rebuilds the rankings"
    );
}

/// Over NATS: orders by others, then a client browsing long enough for the
/// shipped `browse_discount`: the mail lists what others bought with the
/// products the client viewed most, not the viewed ones themselves.
async fn the_browse_discount_shows_what_others_bought_with_the_viewed_products(backend: Backend) {
    use crate::helpers::{ago, registered_at};
    let app = TestApp::spawn(backend).await;
    app.publish(&registered_at("reg-bea", "bea", &ago(3 * 86_400)))
        .await;
    let order = |id: &str, client: &str, items: &[&str]| {
        let lines: Vec<Value> = items
            .iter()
            .map(|p| json!({"product_id": p, "quantity": 1, "price": 10}))
            .collect();
        event(
            id,
            "order_placed",
            client,
            &ago(3700),
            json!({"order_id": id, "channel": "online", "total": 10, "currency": "EUR", "items": lines}),
            json!({}),
        )
    };
    app.publish(&order("o1", "cy", &["chair-1", "lamp-9"]))
        .await;
    app.publish(&order(
        "o2",
        "di",
        &["chair-1", "lamp-9", "desk-2", "vase-4"],
    ))
    .await;
    app.publish(&order("o3", "ed", &["rug-7", "mug-3"])).await;
    let view = |id: &str, secs: i64, product: &str| {
        event(
            id,
            "product_viewed",
            "bea",
            &ago(secs),
            json!({"product_id": product, "price": 10}),
            json!({"session_id": "s1"}),
        )
    };
    app.publish(&view("v1", 3600, "chair-1")).await;
    app.publish(&view("v2", 3300, "desk-2")).await;
    app.publish(&view("v3", 3600 - 16 * 60, "chair-1")).await;
    let mails = app.wait_mails(2).await; // the welcome and the discount
    let discount = mails
        .iter()
        .find(|m| m.header("X-Nudge-Template").as_deref() == Some("browse_discount"))
        .unwrap_or_else(|| panic!("a browse_discount mail: {mails:#?}"));
    assert_eq!(discount.to, "bea@example.com");
    // Mail lines end in CRLF on the wire.
    let text = discount.text.replace("\r\n", "\n");
    assert!(
        text.contains("also bought:\n  - lamp-9\n  - vase-4\n"),
        "{text}"
    );
    assert!(
        discount.html.contains("<li>lamp-9</li><li>vase-4</li>"),
        "{}",
        discount.html
    );
    assert!(!discount.text.contains("rug-7"), "{}", discount.text);
    app.stop().await;
}

/// Three `nudge run` processes share the stream (on SQLite one consumes and
/// the others stand by): the rankings are as exact as with one.
async fn three_instances_count_the_rankings_exactly(backend: Backend) {
    use crate::helpers::{daemon_vars, spawn_daemon};
    use nudge::store::{Batches, Products};
    let env = TestEnv::new(backend).await;
    std::fs::remove_file(env.rules_dir().join("idle_reminder.rhai")).unwrap();
    env.create_stream().await;
    let vars = daemon_vars(
        &env,
        &[
            ("NUDGE__HTTP__LISTEN", "127.0.0.1:0"),
            // Small batches, several in flight: instances race for the
            // same ranking rows all the time.
            ("NUDGE__NATS__BATCH_SIZE", "10"),
            ("NUDGE__DATABASE__MAX_CONNECTIONS", "4"),
        ],
    );
    let _daemons: Vec<_> = (0..3).map(|_| spawn_daemon(&vars)).collect();
    let g = generate();
    let want = reference(&g);
    for e in &g.events {
        env.publish(e).await;
    }
    let store = nudge::app::open_store(&env.config).await.unwrap();
    let ids: Vec<nudge::domain::event::EventId> = g
        .events
        .iter()
        .map(|e| {
            nudge::domain::event::EventId::parse(e["id"].as_str().unwrap().to_string()).unwrap()
        })
        .collect();
    let refs: Vec<&nudge::domain::event::EventId> = ids.iter().collect();
    eventually(Duration::from_secs(120), "every event stored", || async {
        (store.known_events(&refs).await.ok()?.len() == refs.len()).then_some(())
    })
    .await;
    // Each batch writes its ranking rows with its events, in one transaction.
    for (family, counts) in &want.counts {
        let parts: Vec<&str> = family.split('/').collect();
        let name = match parts[..] {
            ["with", month, p] => nudge::domain::products::with_family(p, month),
            [kind, period, key] => nudge::domain::products::popular_family(kind, period, key),
            _ => unreachable!("{family}"),
        };
        let mut rows = store.counter_family(&name).await.unwrap();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        let expected: Vec<(String, f64)> = counts.iter().map(|(p, n)| (p.clone(), *n)).collect();
        assert_eq!(rows, expected, "{family}");
    }
}

backend_tests!(
    product_rankings_equal_the_reference_live_in_backtest_and_replay,
    the_browse_discount_shows_what_others_bought_with_the_viewed_products,
    three_instances_count_the_rankings_exactly,
);
