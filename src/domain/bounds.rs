//! The bounds a client's history keeps to: sums that stay finite, texts
//! and keys of a bounded length, maps of a bounded size that drop their
//! least-used entries the same way in every run.

use serde_json::Value;
use std::collections::BTreeMap;

/// Largest `spend` or channel total a client's history holds, either way.
/// The edge bounds one order at [`crate::domain::event::MAX_MONEY`]; sums saturate
/// here so that no run of orders makes them infinite (stored as `null`).
pub const MAX_MONEY_SUM: f64 = 1e15;

/// `a + b`, kept finite and within ±[`MAX_MONEY_SUM`].
pub fn money_add(a: f64, b: f64) -> f64 {
    let b = if b.is_finite() { b } else { 0.0 };
    let a = if a.is_finite() { a } else { 0.0 };
    (a + b).clamp(-MAX_MONEY_SUM, MAX_MONEY_SUM)
}

/// Makes room for `key` in a map kept to `cap` entries: when it is new and
/// the map is full, the entries with the least weight go (the first of them
/// by key, so a replay decides the same).
pub(crate) fn make_room<V>(
    map: &mut BTreeMap<String, V>,
    key: &str,
    cap: usize,
    weight: impl Fn(&V) -> u64,
) {
    if map.contains_key(key) {
        return;
    }
    while map.len() >= cap.max(1) {
        let least = map
            .iter()
            .min_by_key(|(_, v)| weight(v))
            .map(|(k, _)| k.clone());
        match least {
            Some(k) => map.remove(&k),
            None => break,
        };
    }
}

/// At most `max` bytes of `s`, cut at a character boundary.
pub fn truncated(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Longest product id, order channel or session id a state keeps, in bytes:
/// these become keys of maps kept per client.
pub const MAX_KEY_BYTES: usize = 128;

/// Product ids arrive as strings or numbers; both name the same product.
/// An id longer than [`MAX_KEY_BYTES`] is not a product id nudge keeps.
pub(crate) fn value_as_key(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if s.len() <= MAX_KEY_BYTES => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}
