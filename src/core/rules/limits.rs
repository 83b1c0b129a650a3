//! What one rule run may ask for, and the checks its arguments pass: a
//! rule's mistake fails its run with a clear message, never the batch.

use super::api::with_ctx;
use rhai::EvalAltResult;
use serde_json::{Map, Value};

/// What one rule run may ask for and keep ([`super::RulesConfig`]).
/// Arguments out of range fail the run; volume beyond a cap is dropped with
/// a note in the client's process log, so a rule at a cap keeps working.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunLimits {
    /// Longest `after()` delay, in seconds.
    pub max_delay_secs: i64,
    /// Largest `remember` value and timer data, in JSON bytes: kept with the client.
    pub max_value_bytes: usize,
    /// Largest data of a mail, emit or task, in JSON bytes: kept once, in
    /// the outbox (`rules.max_string_bytes`).
    pub max_effect_bytes: usize,
    pub max_facts_per_rule: usize,
    pub max_timers_per_rule: usize,
    /// `print`/`debug` bytes per run.
    pub max_log_bytes: usize,
    pub max_mails: usize,
    pub max_tasks: usize,
    pub max_emits: usize,
}

impl RunLimits {
    pub fn from_config(c: &super::RulesConfig) -> Self {
        Self {
            max_delay_secs: i64::from(c.max_delay_days.get()) * 86_400,
            max_value_bytes: c.max_value_bytes.get(),
            max_effect_bytes: c.max_string_bytes.get(),
            max_facts_per_rule: c.max_facts_per_rule.get(),
            max_timers_per_rule: c.max_timers_per_rule.get(),
            max_log_bytes: c.max_log_bytes_per_run.get(),
            max_mails: c.max_mails_per_run.get(),
            max_tasks: c.max_tasks_per_run.get(),
            max_emits: c.max_emits_per_run.get(),
        }
    }
}

impl Default for RunLimits {
    fn default() -> Self {
        Self::from_config(&super::RulesConfig::default())
    }
}

/// Largest amount `add` and `client_add` take in one call, either way: the
/// bound on money at the edge ([`crate::domain::event::MAX_MONEY`]), so no counter
/// can be driven to infinity (stored as `null`, then unreadable).
pub const MAX_ADD_AMOUNT: f64 = crate::domain::event::MAX_MONEY;

/// Longest name of a timer, counter, template, team, `remember` key or
/// emitted type's argument, in bytes: names are keys kept with the client.
pub const MAX_NAME_BYTES: usize = 512;

/// Fails the run with `message` (shown with the rule's name and line).
pub(super) fn refuse<T>(message: String) -> Result<T, Box<EvalAltResult>> {
    Err(message.into())
}

/// A name the rule gives (timer, counter, template, key): 1 to
/// [`MAX_NAME_BYTES`] bytes.
pub(super) fn check_name(what: &str, name: &str) -> Result<(), Box<EvalAltResult>> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return refuse(format!(
            "{what} must be 1 to {MAX_NAME_BYTES} bytes long, got {}",
            name.len()
        ));
    }
    Ok(())
}

/// An amount for a counter: finite and within ±[`MAX_ADD_AMOUNT`].
pub(super) fn check_amount(f: &str, amount: f64) -> Result<f64, Box<EvalAltResult>> {
    if amount.is_finite() && amount.abs() <= MAX_ADD_AMOUNT {
        Ok(amount)
    } else {
        refuse(format!(
            "{f}(): the amount must be a finite number within ±{MAX_ADD_AMOUNT:e}, got {amount}"
        ))
    }
}

/// A delay for `after()`: at most `rules.max_delay_days`. A negative delay
/// means "now" (a due time already past fires at once), as before.
pub(super) fn check_delay(delay: i64) -> Result<i64, Box<EvalAltResult>> {
    let max = with_ctx(|ctx| ctx.limits.max_delay_secs)?;
    if delay > max {
        return refuse(format!(
            "after(): a delay of {delay} seconds is beyond the limit of {max} \
             (rules.max_delay_days)"
        ));
    }
    Ok(delay.max(0))
}

/// JSON bytes of `v`, for the size caps.
pub(super) fn json_bytes(v: &Value) -> usize {
    serde_json::to_vec(v).map_or(usize::MAX, |b| b.len())
}

/// Data a request carries: a timer's at most `rules.max_value_bytes` of
/// JSON (it is kept with the client), a mail's, emit's or task's at most
/// `rules.max_string_bytes` (kept once, in the outbox); else the run fails.
pub(super) fn check_data(
    f: &str,
    data: Map<String, Value>,
) -> Result<Map<String, Value>, Box<EvalAltResult>> {
    let (max, key) = with_ctx(|ctx| match f {
        "after" => (ctx.limits.max_value_bytes, "rules.max_value_bytes"),
        _ => (ctx.limits.max_effect_bytes, "rules.max_string_bytes"),
    })?;
    if data.is_empty() {
        return Ok(data);
    }
    let data = Value::Object(data);
    let n = json_bytes(&data);
    if n > max {
        return refuse(format!(
            "{f}(): its data is {n} bytes of JSON, over the limit of {max} ({key})"
        ));
    }
    let Value::Object(m) = data else {
        unreachable!("built as an object above")
    };
    Ok(m)
}

/// `seconds(n)` .. `days(n)`: `n * unit`, failing the run on overflow.
pub(super) fn duration(f: &str, n: i64, unit: i64) -> Result<i64, Box<EvalAltResult>> {
    n.checked_mul(unit)
        .map_or_else(|| refuse(format!("{f}({n}): too large a duration")), Ok)
}
