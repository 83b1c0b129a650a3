//! Product rankings: the products most viewed, added to carts and bought
//! per day, week and month, and for each product the products bought with
//! it (in the same order) per month, in the business timezone.
//!
//! They are shared counters, like boards ([`super::boards`]), fed by the
//! decision core on every `product_viewed`, `cart_item_added` and
//! `order_placed`, so they are exact like any counter (once per event, in
//! stream order) and replay and backtest rebuild them with the counters.
//!
//! One ranking is one counter family, one row per product:
//! `products:<viewed|carted|bought>:<day|week|month>:<period key>` and
//! `products:with:month:<period key>:<product id>` (its rows: the products
//! bought with it).
//!
//! **Bought with.** Each pair of distinct products of one order counts once
//! for each other; and each product of an order counts once with each
//! product the same client bought in an earlier order within
//! `history.bought_together_days` (and not in this order) - by the client's
//! [`MAX_RECENT_BUYS`] latest products bought, kept in their state. Both go
//! to the month of the later order.
//!
//! **Bound.** A family admits at most [`TOP_K`] products ([`WITH_K`] for a
//! product's bought-with): a product is admitted the first time it is
//! counted in the period while the family has room; once the family is
//! full, products first counted later in that period are not counted there
//! at all. Admission follows stream order, so live, replay and backtest
//! admit the same products. The counts of admitted products are exact; a
//! ranking is *approximate* only for a period with more distinct products
//! than the bound, where a late newcomer can be missing. The admitted
//! products are a distinct counter (`<family>#`), whose members are the
//! family's rows: storage per period is at most `2 × TOP_K + 1` rows per
//! ranking (counters and members) and `2 × WITH_K + 1` per product bought.
//! Memory is one batch's touched rows, and a ranking read lists at most
//! [`TOP_K`] rows.
//!
//! Reading a ranking (`popular()`, `bought_with()`) is exact within one
//! instance: steps that use counters are decided in stream order, on the
//! pending values of the batches before them. Across instances the read
//! itself takes no part in the compare-and-swap (only the counting does),
//! so a rule may decide on a ranking that misses another instance's
//! concurrent change.

use super::bounds::value_as_key;
use super::counters::{CounterKey, Counters, period_key};
use super::event::Envelope;
use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The rankings of popularity, with the event each counts.
pub const KINDS: &[(&str, &str)] = &[
    ("viewed", "product_viewed"),
    ("carted", "cart_item_added"),
    ("bought", "order_placed"),
];
/// The periods popularity is kept per.
pub const PERIODS: &[&str] = &["day", "week", "month"];
/// The period bought-with is kept per.
pub const WITH_PERIOD: &str = "month";
/// Most products one popularity ranking (kind and period) admits.
pub const TOP_K: usize = 1000;
/// Most products one product's bought-with (per month) admits.
pub const WITH_K: usize = 50;
/// Most distinct products of one order counted (the first ones, in item
/// order): an order pairs each with every other, so this bounds the work
/// of one event to `MAX_ORDER_PRODUCTS²` counter changes. Each change can
/// be a database read when a batch first meets its row, and steps on shared
/// counters hold back the ones after them: a client sending huge orders
/// must not hold everyone else back (`faults::hostile_data`).
pub const MAX_ORDER_PRODUCTS: usize = 10;
/// Most of a client's latest products bought kept for bought-together
/// across orders: an order pairs each of its products with each of them,
/// both ways (at most `2 × MAX_ORDER_PRODUCTS × MAX_RECENT_BUYS` changes).
pub const MAX_RECENT_BUYS: usize = 10;
/// Most entries one answer lists (rules and the API).
pub const MAX_LIMIT: usize = 100;

/// A product a client bought, and when (their latest order of it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecentBuy {
    pub product: String,
    pub at: DateTime<Utc>,
}

/// The ranking `kind` (`viewed`, `carted`, `bought`), checked.
pub fn check_kind(kind: &str) -> Result<(), String> {
    if KINDS.iter().any(|(k, _)| *k == kind) {
        Ok(())
    } else {
        Err(format!(
            "unknown ranking {kind:?}: use one of viewed, carted, bought"
        ))
    }
}

/// The period `period` (`day`, `week`, `month`), checked.
pub fn check_period(period: &str) -> Result<(), String> {
    if PERIODS.contains(&period) {
        Ok(())
    } else {
        Err(format!(
            "unknown period {period:?}: use one of {}",
            PERIODS.join(", ")
        ))
    }
}

/// A limit of entries, checked: 1 to [`MAX_LIMIT`].
pub fn check_limit(n: i64) -> Result<usize, String> {
    usize::try_from(n)
        .ok()
        .filter(|n| (1..=MAX_LIMIT).contains(n))
        .ok_or_else(|| format!("a limit must be 1 to {MAX_LIMIT}, got {n}"))
}

/// The family of the `kind` ranking for the period whose key is `key`.
pub fn popular_family(kind: &str, period: &str, key: &str) -> String {
    format!("products:{kind}:{period}:{key}")
}

/// The family of what was bought with `product` in the month `key`.
pub fn with_family(product: &str, key: &str) -> String {
    format!("products:with:{WITH_PERIOD}:{key}:{product}")
}

/// The distinct counter of the products a family admitted.
fn admitted(family: &str) -> CounterKey {
    CounterKey {
        name: format!("{family}#"),
        period: "admitted".into(),
    }
}

/// The products an event counts for, each once, in the event's order: the
/// `product_id` of a view or cart add, the items' of an order (at most
/// [`MAX_ORDER_PRODUCTS`]). Ids that are no key (empty, over 128 bytes, not
/// a string or number) are left out.
pub fn event_products(event: &Envelope) -> Vec<String> {
    let data = &event.data;
    let ids: Vec<String> = match event.event_type.as_str() {
        "product_viewed" | "cart_item_added" => data
            .get("product_id")
            .and_then(value_as_key)
            .into_iter()
            .collect(),
        "order_placed" => data
            .get("items")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|item| item.get("product_id").and_then(value_as_key))
            .collect(),
        _ => Vec::new(),
    };
    let mut out: Vec<String> = Vec::new();
    for id in ids {
        if !id.is_empty() && !out.contains(&id) {
            out.push(id);
            if out.len() == MAX_ORDER_PRODUCTS {
                break;
            }
        }
    }
    out
}

/// Adds `amount` to `product` in `family` if the family has admitted it or
/// still has room for it (at most `k` products); true if counted.
pub fn bump(
    counters: &mut Counters,
    family: &str,
    product: &str,
    amount: f64,
    k: usize,
) -> Result<bool, String> {
    let admitted = admitted(family);
    if !counters.has_member(&admitted, product)? {
        if counters.get(&admitted)? >= k as f64 {
            return Ok(false);
        }
        counters.add_distinct(&admitted, product)?;
    }
    let key = CounterKey {
        name: family.to_string(),
        period: product.to_string(),
    };
    counters.add(&key, amount)?;
    Ok(true)
}

/// Counts an event into the rankings: each of its products in the kind's
/// ranking for the day, week and month of its time; for an order, each
/// pair of its products in each other's bought-with, and each of its
/// products with the client's `recent` buys within `window` before it
/// (`recent` then notes this order's products).
pub fn count_event(
    counters: &mut Counters,
    event: &Envelope,
    recent: &mut Vec<RecentBuy>,
    window: Duration,
) -> Result<(), String> {
    let ty = event.event_type.as_str();
    let Some((kind, _)) = KINDS.iter().find(|(_, t)| *t == ty) else {
        return Ok(());
    };
    let products = event_products(event);
    if products.is_empty() {
        return Ok(());
    }
    let (at, tz) = (event.occurred_at, counters.tz());
    for period in PERIODS {
        let family = popular_family(kind, period, &period_key(period, at, tz)?);
        for p in &products {
            bump(counters, &family, p, 1.0, TOP_K)?;
        }
    }
    if *kind != "bought" {
        return Ok(());
    }
    let month = period_key(WITH_PERIOD, at, tz)?;
    let pair = |counters: &mut Counters, a: &str, b: &str| {
        bump(counters, &with_family(a, &month), b, 1.0, WITH_K).map(|_| ())
    };
    for p in &products {
        for other in products.iter().filter(|o| *o != p) {
            pair(counters, p, other)?;
        }
    }
    if window > Duration::zero() {
        // Earlier orders within the window (an order that arrives late is
        // paired with those after it as well).
        let earlier: Vec<String> = recent
            .iter()
            .filter(|b| (at - b.at).abs() <= window && !products.contains(&b.product))
            .map(|b| b.product.clone())
            .collect();
        for p in &products {
            for q in &earlier {
                pair(counters, p, q)?;
                pair(counters, q, p)?;
            }
        }
    }
    // This order's products become the newest; the oldest go beyond the bound.
    recent.retain(|b| !products.contains(&b.product));
    recent.extend(products.iter().map(|p| RecentBuy {
        product: p.clone(),
        at,
    }));
    let over = recent.len().saturating_sub(MAX_RECENT_BUYS);
    recent.drain(..over);
    Ok(())
}

/// The top `n` of a family's rows: highest count first, ties by product id.
pub fn top(mut rows: Vec<(String, f64)>, n: usize) -> Vec<(String, f64)> {
    rows.retain(|(_, v)| *v > 0.0);
    rows.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    rows.truncate(n);
    rows
}

/// The top `n` of the `kind` ranking for the `period` containing `at`, as
/// the batch sees it.
pub fn popular(
    counters: &mut Counters,
    kind: &str,
    period: &str,
    at: DateTime<Utc>,
    n: usize,
) -> Result<Vec<(String, f64)>, String> {
    check_kind(kind)?;
    check_period(period)?;
    let family = popular_family(kind, period, &period_key(period, at, counters.tz())?);
    Ok(top(counters.list(&family)?, n))
}

/// The `n` products most bought with `product` in the month containing `at`.
pub fn bought_with(
    counters: &mut Counters,
    product: &str,
    at: DateTime<Utc>,
    n: usize,
) -> Result<Vec<(String, f64)>, String> {
    let family = with_family(product, &period_key(WITH_PERIOD, at, counters.tz())?);
    Ok(top(counters.list(&family)?, n))
}

/// The month key bought-with uses for `at` in `tz`.
pub fn with_key(at: DateTime<Utc>, tz: Tz) -> String {
    period_key(WITH_PERIOD, at, tz).expect("month is a period")
}

#[cfg(test)]
#[path = "products_tests.rs"]
mod tests;
