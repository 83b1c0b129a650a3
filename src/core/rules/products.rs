//! `popular(kind, period, n)` and `bought_with(product_id, n)`: rules read
//! the product rankings ([`crate::domain::products`]) through the batch's
//! shared counters, so a rule decides on the same ranking live, in replay
//! and in a backtest. Each returns an array of `#{product_id, count}`,
//! highest count first, ties by product id.

use super::api::{RunContext, with_ctx};
use super::limits::refuse;
use crate::domain::products::{self, check_limit};
use rhai::{Array, Dynamic, Engine, EvalAltResult, Map as RhaiMap};

pub fn register(engine: &mut Engine) {
    engine.register_fn("popular", |kind: &str, period: &str, n: i64| {
        let n = check_limit(n).or_else(|e| refuse(format!("popular(): {e}")))?;
        products::check_kind(kind).or_else(|e| refuse(format!("popular(): {e}")))?;
        products::check_period(period).or_else(|e| refuse(format!("popular(): {e}")))?;
        read(|ctx| products::popular(&mut ctx.counters, kind, period, ctx.now, n))
    });
    engine.register_fn("bought_with", |product: &str, n: i64| {
        bought_with(product.to_string(), n)
    });
    engine.register_fn("bought_with", |product: i64, n: i64| {
        bought_with(product.to_string(), n)
    });
}

fn bought_with(product: String, n: i64) -> Result<Array, Box<EvalAltResult>> {
    let n = check_limit(n).or_else(|e| refuse(format!("bought_with(): {e}")))?;
    if product.is_empty() || product.len() > crate::domain::bounds::MAX_KEY_BYTES {
        return refuse(format!(
            "bought_with(): a product id is 1 to {} bytes",
            crate::domain::bounds::MAX_KEY_BYTES
        ));
    }
    read(|ctx| products::bought_with(&mut ctx.counters, &product, ctx.now, n))
}

/// Runs a ranking read on the run's counters. A failed read is the
/// counters' failure (the batch is retried), not the rule's.
fn read(
    f: impl FnOnce(&mut RunContext) -> Result<Vec<(String, f64)>, String>,
) -> Result<Array, Box<EvalAltResult>> {
    with_ctx(|ctx| {
        f(ctx).inspect_err(|e| {
            ctx.counter_failure.get_or_insert_with(|| e.clone());
        })
    })?
    .map(|rows| {
        rows.into_iter()
            .map(|(product, count)| {
                let mut m = RhaiMap::new();
                m.insert("product_id".into(), product.into());
                m.insert("count".into(), Dynamic::from_float(count));
                Dynamic::from_map(m)
            })
            .collect()
    })
    .map_err(|e: String| e.into())
}
