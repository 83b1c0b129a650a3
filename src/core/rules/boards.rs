//! `rank(board, member, amount)` and `rank(board, member, amount, #{group,
//! label})`: a rule adds to a member's score on a board, for the day, the
//! week and the month of the trigger in the business timezone. The scores
//! are shared counters ([`crate::domain::boards`]), so a board is exact like
//! any counter: once per event, in stream order, across instances.

use super::api::with_ctx;
use super::limits::{check_amount, refuse};
use crate::domain::boards::{self, BOARD_PERIODS, Entry};
use rhai::{Engine, EvalAltResult, Map as RhaiMap};

pub fn register(engine: &mut Engine) {
    engine.register_fn("rank", |board: &str, member: &str, amount: f64| {
        rank(board, member, amount, RhaiMap::new())
    });
    engine.register_fn("rank", |board: &str, member: &str, amount: i64| {
        rank(board, member, amount as f64, RhaiMap::new())
    });
    engine.register_fn(
        "rank",
        |board: &str, member: &str, amount: f64, opts: RhaiMap| rank(board, member, amount, opts),
    );
    engine.register_fn(
        "rank",
        |board: &str, member: &str, amount: i64, opts: RhaiMap| {
            rank(board, member, amount as f64, opts)
        },
    );
}

/// An option of `rank`: a string, or `()` for none.
fn option(opts: &RhaiMap, name: &str) -> Result<Option<String>, Box<EvalAltResult>> {
    match opts.get(name) {
        None => Ok(None),
        Some(v) if v.is_unit() => Ok(None),
        Some(v) if v.is_string() => Ok(Some(v.clone().into_string()?)),
        Some(v) => refuse(format!(
            "rank(): `{name}` must be a string, got {}",
            v.type_name()
        )),
    }
}

/// Adds `amount` to the member's day, week and month scores; returns the
/// new day score. Arguments are checked before any counter is touched: an
/// error from the counters themselves means one could not be read, and the
/// batch is retried rather than committed.
fn rank(board: &str, member: &str, amount: f64, opts: RhaiMap) -> Result<f64, Box<EvalAltResult>> {
    boards::check_board(board).or_else(refuse)?;
    boards::check_part("rank(): a member", member, false).or_else(refuse)?;
    if let Some(unknown) = opts
        .keys()
        .find(|k| !matches!(k.as_str(), "group" | "label"))
    {
        return refuse(format!(
            "rank(): unknown option `{unknown}`: use `group` and `label`"
        ));
    }
    let group = option(&opts, "group")?.unwrap_or_default();
    let label = option(&opts, "label")?.unwrap_or_else(|| member.to_string());
    boards::check_part("rank(): a group", &group, true).or_else(refuse)?;
    boards::check_part("rank(): a label", &label, true).or_else(refuse)?;
    let amount = check_amount("rank", amount)?;
    let entry = Entry {
        group,
        member: member.to_string(),
        label,
    };
    with_ctx(|ctx| {
        let (now, tz) = (ctx.now, ctx.counters.tz());
        let mut day = 0.0;
        for kind in BOARD_PERIODS {
            let added = boards::counter_key(board, kind, now, tz, &entry)
                .and_then(|key| ctx.counters.add(&key, amount));
            match added {
                Ok(v) if *kind == "day" => day = v,
                Ok(_) => {}
                Err(e) => {
                    ctx.counter_failure.get_or_insert_with(|| e.clone());
                    return Err(e);
                }
            }
        }
        Ok(day)
    })?
    .map_err(|e: String| e.into())
}
