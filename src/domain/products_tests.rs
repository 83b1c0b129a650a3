//! Unit tests of product rankings: counted as a reference says, bounded.

use super::*;
use crate::domain::counters::{Counters, MemorySource};
use serde_json::json;
use std::collections::BTreeMap;

fn event(id: usize, ty: &str, at: &str, data: Value) -> Envelope {
    Envelope::from_value(
        json!({"id": format!("e{id}"), "type": ty, "client_id": "c1",
        "occurred_at": at, "data": data}),
    )
    .unwrap()
}

fn view(id: usize, product: &str) -> Envelope {
    event(
        id,
        "product_viewed",
        "2026-12-06T10:00:00Z",
        json!({ "product_id": product }),
    )
}

fn at() -> DateTime<Utc> {
    "2026-12-06T12:00:00Z".parse().unwrap()
}

#[test]
fn rankings_equal_a_reference_count() {
    let mut c = Counters::new(Box::new(MemorySource::default()), Tz::UTC);
    let mut views: BTreeMap<String, f64> = BTreeMap::new();
    let mut bought: BTreeMap<String, f64> = BTreeMap::new();
    let mut with: BTreeMap<(String, String), f64> = BTreeMap::new();
    let mut next = 0;
    for i in 0..300usize {
        let p = format!("p{}", (i * i + 7) % 23);
        next += 1;
        count_event(&mut c, &view(next, &p), &mut Vec::new(), Duration::zero()).unwrap();
        *views.entry(p).or_default() += 1.0;
        if i % 5 == 0 {
            // An order of 1 to 4 products, one repeated (counted once).
            let items: Vec<String> = (0..=(i % 4))
                .map(|j| format!("p{}", (i + j * 3) % 11))
                .collect();
            let mut lines: Vec<Value> = items
                .iter()
                .map(|p| json!({"product_id": p, "quantity": 2}))
                .collect();
            lines.push(json!({"product_id": items[0]}));
            next += 1;
            let order = event(
                next,
                "order_placed",
                "2026-12-06T11:00:00Z",
                json!({"items": lines}),
            );
            count_event(&mut c, &order, &mut Vec::new(), Duration::zero()).unwrap();
            for a in &items {
                *bought.entry(a.clone()).or_default() += 1.0;
                for b in items.iter().filter(|b| *b != a) {
                    *with.entry((a.clone(), b.clone())).or_default() += 1.0;
                }
            }
        }
    }
    let expect = |m: Vec<(String, f64)>, n| top(m, n);
    for period in PERIODS {
        assert_eq!(
            popular(&mut c, "viewed", period, at(), 10).unwrap(),
            expect(views.clone().into_iter().collect(), 10)
        );
        assert_eq!(
            popular(&mut c, "bought", period, at(), 100).unwrap(),
            expect(bought.clone().into_iter().collect(), 100)
        );
        assert!(
            popular(&mut c, "carted", period, at(), 5)
                .unwrap()
                .is_empty()
        );
    }
    for p in bought.keys() {
        let reference: Vec<(String, f64)> = with
            .iter()
            .filter(|((a, _), _)| a == p)
            .map(|((_, b), n)| (b.clone(), *n))
            .collect();
        assert_eq!(
            bought_with(&mut c, p, at(), 100).unwrap(),
            top(reference, 100)
        );
    }
    // Another day is another ranking; the month holds both.
    let next_day: DateTime<Utc> = "2026-12-07T12:00:00Z".parse().unwrap();
    assert!(
        popular(&mut c, "viewed", "day", next_day, 5)
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        popular(&mut c, "viewed", "month", next_day, 1)
            .unwrap()
            .len(),
        1
    );
    assert!(popular(&mut c, "liked", "day", at(), 5).is_err());
    assert!(popular(&mut c, "viewed", "year", at(), 5).is_err());
    assert!(check_limit(0).is_err() && check_limit(101).is_err());
}

#[test]
fn storage_stays_within_the_bound_for_100000_products() {
    let mut c = Counters::new(Box::new(MemorySource::default()), Tz::UTC);
    // Every product viewed once, then the last ones (admitted nowhere) again:
    // the first TOP_K are admitted, in stream order.
    for i in 0..100_000usize {
        count_event(
            &mut c,
            &view(i, &format!("p{i:06}")),
            &mut Vec::new(),
            Duration::zero(),
        )
        .unwrap();
    }
    for i in 99_990..100_000usize {
        count_event(
            &mut c,
            &view(200_000 + i, &format!("p{i:06}")),
            &mut Vec::new(),
            Duration::zero(),
        )
        .unwrap();
    }
    count_event(
        &mut c,
        &view(300_000, "p000001"),
        &mut Vec::new(),
        Duration::zero(),
    )
    .unwrap();
    // One product bought with 100,000 others, two at a time.
    for i in 0..50_000usize {
        let items = json!([{"product_id": "hub"}, {"product_id": format!("q{:06}", 2 * i)},
            {"product_id": format!("q{:06}", 2 * i + 1)}]);
        let order = event(
            400_000 + i,
            "order_placed",
            "2026-12-06T11:00:00Z",
            json!({"items": items}),
        );
        count_event(&mut c, &order, &mut Vec::new(), Duration::zero()).unwrap();
    }
    let (writes, members) = c.writes();
    let mut rows: BTreeMap<&str, usize> = BTreeMap::new();
    for w in &writes {
        *rows.entry(w.key.name.as_str()).or_default() += 1;
    }
    let day = popular_family("viewed", "day", "2026-12-06");
    assert_eq!(rows[day.as_str()], TOP_K);
    assert_eq!(rows[with_family("hub", "2026-12").as_str()], WITH_K);
    // Every ranking within its bound, every product's bought-with too.
    for (name, n) in &rows {
        let bound = if name.starts_with("products:with:") {
            WITH_K
        } else {
            TOP_K
        };
        assert!(*n <= bound, "{name} has {n} rows");
    }
    let most_members = members
        .iter()
        .fold(BTreeMap::<&str, usize>::new(), |mut m, (k, _)| {
            *m.entry(k.name.as_str()).or_default() += 1;
            m
        });
    assert!(most_members.values().all(|n| *n <= TOP_K));
    let total_rows = writes.len() + members.len();
    // 3 kinds' day/week/month rankings (viewed, bought) + 100,001 bought-with
    // families, each with its admitted set: the documented bound.
    let bound = 2 * (2 * 3 * (TOP_K + 1)) + 2 * 100_001 * (WITH_K + 1);
    assert!(total_rows <= bound, "{total_rows} rows over {bound}");
    // The first admitted counts exactly; a late newcomer is left out.
    let top2 = popular(&mut c, "viewed", "day", at(), 2).unwrap();
    assert_eq!(top2, vec![("p000001".into(), 2.0), ("p000000".into(), 1.0)]);
    let hub = bought_with(&mut c, "hub", at(), 100).unwrap();
    assert_eq!(hub.len(), WITH_K);
    assert_eq!(hub[0], ("q000000".to_string(), 1.0));
}

#[test]
fn a_clients_orders_within_the_window_are_bought_together_and_their_memory_is_bounded() {
    let mut c = Counters::new(Box::new(MemorySource::default()), Tz::UTC);
    let mut recent = Vec::new();
    let window = Duration::days(30);
    let order = |id: usize, at: &str, items: &[&str]| {
        let lines: Vec<Value> = items.iter().map(|p| json!({"product_id": p})).collect();
        event(id, "order_placed", at, json!({"items": lines}))
    };
    let mut buy = |c: &mut Counters, id, at, items: &[&str]| {
        count_event(c, &order(id, at, items), &mut recent, window).unwrap();
    };
    buy(&mut c, 1, "2026-12-01T10:00:00Z", &["a"]);
    buy(&mut c, 2, "2026-12-05T10:00:00Z", &["b", "c"]);
    // 40 days later: nothing recent enough.
    buy(&mut c, 3, "2027-01-14T10:00:00Z", &["d"]);
    buy(&mut c, 4, "2027-01-15T10:00:00Z", &["a", "d"]);
    let with =
        |c: &mut Counters, p: &str, at: &str| bought_with(c, p, at.parse().unwrap(), 10).unwrap();
    let n = |v: &[(&str, f64)]| -> Vec<(String, f64)> {
        v.iter().map(|(p, n)| (p.to_string(), *n)).collect()
    };
    assert_eq!(
        with(&mut c, "a", "2026-12-31T00:00:00Z"),
        n(&[("b", 1.0), ("c", 1.0)])
    );
    assert_eq!(
        with(&mut c, "b", "2026-12-31T00:00:00Z"),
        n(&[("a", 1.0), ("c", 1.0)])
    );
    // In January: a and d in one order (d also bought the day before, so
    // not paired again across orders).
    assert_eq!(with(&mut c, "a", "2027-01-20T00:00:00Z"), n(&[("d", 1.0)]));
    assert_eq!(with(&mut c, "d", "2027-01-20T00:00:00Z"), n(&[("a", 1.0)]));
    // The memory keeps the latest MAX_RECENT_BUYS products, oldest first.
    for i in 0..30 {
        let p = format!("x{i:02}");
        buy(&mut c, 10 + i, "2027-01-16T10:00:00Z", &[p.as_str()]);
    }
    assert_eq!(recent.len(), MAX_RECENT_BUYS);
    assert_eq!(recent[0].product, format!("x{:02}", 30 - MAX_RECENT_BUYS));
    assert_eq!(recent[MAX_RECENT_BUYS - 1].product, "x29");
}
