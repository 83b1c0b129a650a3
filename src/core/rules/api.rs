//! The functions a rule can call. They do nothing themselves: each records a
//! [`Request`] that the decision core turns into an effect with its key.
//!
//! Requests are gathered in a thread-local because Rhai native functions have
//! no per-call state of ours to write into; [`collect`] scopes it to exactly
//! one rule run on the current thread.

use super::limits::*;
use crate::domain::counters::{CounterKey, Counters};
use chrono::{DateTime, Utc};
use rhai::{Dynamic, Engine, EvalAltResult, Map as RhaiMap, Position};
use serde_json::{Map, Value};
use std::cell::RefCell;
use std::collections::BTreeMap;

/// What a rule asked for, before it becomes an effect or a change of state.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// `mail(template)` / `mail(template, vars)`: mail the client.
    Mail {
        template: String,
        vars: Map<String, Value>,
    },
    /// `after(seconds, name)` / `after(seconds, name, data)`: run this rule
    /// again for this client later; replaces a pending timer of that name.
    After {
        delay_secs: i64,
        name: String,
        data: Map<String, Value>,
    },
    /// `cancel(name)`: drop a pending timer.
    Cancel { name: String },
    /// `emit(type, data)`: a secondary event, published and decided like any other.
    Emit {
        event_type: String,
        data: Map<String, Value>,
    },
    /// `task(team, title)` / `task(team, title, data)`: work for staff.
    Task {
        team: String,
        title: String,
        data: Map<String, Value>,
    },
    /// `webhook(name, payload)`: post `payload` to `webhooks.<name>` (see `channels`).
    Webhook { name: String, payload: Value },
    /// `sms(template)` / `sms(template, vars)`: text the client (see `channels`).
    Sms {
        template: String,
        vars: Map<String, Value>,
    },
}

/// The state of one rule run: what the rule may read and what it asked for.
#[derive(Debug, Default)]
pub struct RunContext {
    /// Requests in the order made.
    pub requests: Vec<Request>,
    /// Caps reached in this run, each said once, for the client's process log.
    pub notes: Vec<String>,
    /// What this run may ask for; set by the engine from the configuration.
    pub limits: RunLimits,
    /// `print`/`debug` bytes written so far.
    logged: usize,
    /// This rule's memory about this client, changed in place by `remember`.
    pub facts: Map<String, Value>,
    /// Names of this rule's pending timers for this client.
    pub timers: Vec<String>,
    /// Id of what started the run (event id, timer or sweep): seeds `unique_code`.
    pub cause: String,
    pub rule: String,
    pub client_id: String,
    /// The trigger's time: counters count in its period.
    pub now: DateTime<Utc>,
    /// Counters shared by all clients, lent to this run by the batch.
    pub counters: Counters,
    /// This client's own counters, by `name/period-key`.
    pub client_counters: BTreeMap<String, f64>,
    /// A counter could not be read: the batch must be retried, not committed.
    pub counter_failure: Option<String>,
    /// `unique_code` calls so far, so two codes in one run differ.
    codes: u32,
    /// The client's variant by experiment: lent by the state, kept only if
    /// the run succeeds.
    pub variants: BTreeMap<String, String>,
    /// Experiments this run gave the client a variant in for the first time
    /// (in this rule), with the variant: each becomes an exposure.
    pub exposed: Vec<(String, String)>,
}

impl RunContext {
    pub fn new(rule: &str, client_id: &str, cause: &str) -> Self {
        Self {
            rule: rule.to_string(),
            client_id: client_id.to_string(),
            cause: cause.to_string(),
            ..Default::default()
        }
    }
}

thread_local! {
    static CONTEXT: RefCell<Option<RunContext>> = const { RefCell::new(None) };
}

/// Runs `f` with `ctx` installed and returns its result with the context as the run left it.
/// A panic in `f` (a bug in a rule function or in the engine) comes back as
/// `Err` with its message, and the context comes back all the same: what it
/// had been lent (the batch's shared counters, the client's own) is never
/// lost with the run, so one run's panic fails that run, nothing more.
pub fn collect<T>(ctx: RunContext, f: impl FnOnce() -> T) -> (Result<T, String>, RunContext) {
    let previous = CONTEXT.with(|c| c.borrow_mut().replace(ctx));
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .map_err(|panic| panic_message(panic.as_ref()));
    let ctx = CONTEXT.with(|c| std::mem::replace(&mut *c.borrow_mut(), previous));
    (out, ctx.expect("installed above"))
}

/// The message a panic was raised with.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

pub(super) fn with_ctx<T>(f: impl FnOnce(&mut RunContext) -> T) -> Result<T, Box<EvalAltResult>> {
    CONTEXT.with(|c| match c.borrow_mut().as_mut() {
        Some(ctx) => Ok(f(ctx)),
        // Only reachable if a function is called outside a rule run: refuse
        // rather than lose what it asked for.
        None => Err("this function can only be called while a rule runs".into()),
    })
}

/// Runs `f` on the batch's shared counters for the counter `name` in the
/// trigger's `period`.
fn with_counter<T>(
    name: &str,
    period: &str,
    f: impl FnOnce(&mut Counters, &CounterKey) -> Result<T, String>,
) -> Result<T, Box<EvalAltResult>> {
    with_ctx(|ctx| {
        let now = ctx.now;
        let key = ctx.counters.key(name, period, now)?;
        f(&mut ctx.counters, &key).inspect_err(|e| {
            ctx.counter_failure.get_or_insert_with(|| e.clone());
        })
    })?
    .map_err(|e| e.into())
}

fn client_counter_key(
    name: &str,
    period: &str,
    now: DateTime<Utc>,
) -> Result<String, Box<EvalAltResult>> {
    // The client's own counters use UTC periods: they are about one person.
    let p = crate::domain::counters::period_key(period, now, chrono_tz::Tz::UTC)?;
    Ok(format!("{name}/{p}"))
}

/// Queues a request, or drops it with a note (once per kind and run) when
/// the run already asked for as many of its kind as it may.
pub(super) fn push(req: Request) -> Result<(), Box<EvalAltResult>> {
    with_ctx(|ctx| {
        let (cap, what, key) = match &req {
            Request::Mail { .. } => (ctx.limits.max_mails, "mails", "rules.max_mails_per_run"),
            Request::Task { .. } => (ctx.limits.max_tasks, "tasks", "rules.max_tasks_per_run"),
            Request::Emit { .. } => (ctx.limits.max_emits, "emits", "rules.max_emits_per_run"),
            // Texts are messages to the client like mails, webhooks are
            // messages to other systems like emits: each kind has its own
            // count, under the same cap as its kin.
            Request::Sms { .. } => (ctx.limits.max_mails, "texts", "rules.max_mails_per_run"),
            Request::Webhook { .. } => {
                (ctx.limits.max_emits, "webhooks", "rules.max_emits_per_run")
            }
            Request::After { name, .. } => {
                let cap = ctx.limits.max_timers_per_rule;
                if ctx.is_pending(name) || ctx.pending_names() < cap {
                    ctx.requests.push(req);
                } else {
                    ctx.note(format!(
                        "a new timer not set: the rule already has {cap} pending for this client \
                         (rules.max_timers_per_rule)"
                    ));
                }
                return;
            }
            Request::Cancel { .. } => {
                ctx.requests.push(req);
                return;
            }
        };
        let same = |r: &Request| std::mem::discriminant(r) == std::mem::discriminant(&req);
        if ctx.requests.iter().filter(|r| same(r)).count() < cap {
            ctx.requests.push(req);
        } else {
            ctx.note(format!(
                "more than {cap} {what} asked for in one run: the rest dropped ({key})"
            ));
        }
    })
}

impl RunContext {
    /// Whether the timer `name` is pending: the latest request of this run
    /// wins over what was pending before it.
    fn is_pending(&self, name: &str) -> bool {
        for r in self.requests.iter().rev() {
            match r {
                Request::After { name: n, .. } if n == name => return true,
                Request::Cancel { name: n } if n == name => return false,
                _ => {}
            }
        }
        self.timers.iter().any(|t| t == name)
    }

    /// How many of this rule's timers are pending for the client, this run's
    /// requests included.
    fn pending_names(&self) -> usize {
        let mut names: std::collections::BTreeSet<&str> =
            self.timers.iter().map(String::as_str).collect();
        for r in &self.requests {
            match r {
                Request::After { name, .. } => {
                    names.insert(name);
                }
                Request::Cancel { name } => {
                    names.remove(name.as_str());
                }
                _ => {}
            }
        }
        names.len()
    }

    /// Records that a cap was reached, once per message and run.
    pub fn note(&mut self, message: String) {
        if !self.notes.contains(&message) {
            self.notes.push(message);
        }
    }
}

/// Sends `print`/`debug` output to the log within the run's byte budget;
/// the first line over it is cut and the rest dropped, with a note. Outside
/// a run (never, in practice) the line goes out as it is.
pub(crate) fn log_line(s: &str) -> Option<String> {
    CONTEXT.with(|c| {
        let mut c = c.borrow_mut();
        let Some(ctx) = c.as_mut() else {
            return Some(s.to_string());
        };
        let left = ctx.limits.max_log_bytes.saturating_sub(ctx.logged);
        if left == 0 {
            return None;
        }
        if s.len() <= left {
            ctx.logged += s.len();
            return Some(s.to_string());
        }
        ctx.logged = ctx.limits.max_log_bytes;
        let max = ctx.limits.max_log_bytes;
        ctx.note(format!(
            "print/debug output over {max} bytes in one run: cut (rules.max_log_bytes_per_run)"
        ));
        Some(format!(
            "{}... (cut: over {max} bytes of output in this run)",
            crate::domain::history::truncated(s, left)
        ))
    })
}

pub(super) fn to_json(v: Dynamic) -> Result<Value, Box<EvalAltResult>> {
    rhai::serde::from_dynamic(&v)
}

pub(super) fn to_json_map(vars: RhaiMap) -> Result<Map<String, Value>, Box<EvalAltResult>> {
    match to_json(Dynamic::from_map(vars))? {
        Value::Object(m) => Ok(m),
        _ => {
            Err(
                EvalAltResult::ErrorMismatchDataType("map".into(), "other".into(), Position::NONE)
                    .into(),
            )
        }
    }
}

/// A code unique to this client, rule and cause, the same on every replay:
/// `PREFIX-` and 10 characters of Crockford base32 from a hash.
fn unique_code(prefix: &str) -> Result<String, Box<EvalAltResult>> {
    use sha2::{Digest, Sha256};
    with_ctx(|ctx| {
        ctx.codes += 1;
        let mut h = Sha256::new();
        for part in [&ctx.rule, &ctx.client_id, &ctx.cause] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        h.update(ctx.codes.to_le_bytes());
        let digest = h.finalize();
        const ALPHABET: &[u8] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
        let mut bits: u64 = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
        let mut code = String::with_capacity(prefix.len() + 11);
        code.push_str(prefix);
        if !prefix.is_empty() {
            code.push('-');
        }
        for _ in 0..10 {
            code.push(ALPHABET[(bits & 31) as usize] as char);
            bits >>= 5;
        }
        code
    })
}

pub fn register(engine: &mut Engine) {
    super::experiments::register(engine);
    engine.register_fn("mail", |template: &str| {
        check_name("a template name", template)?;
        push(Request::Mail {
            template: template.to_string(),
            vars: Map::new(),
        })
    });
    engine.register_fn("mail", |template: &str, vars: RhaiMap| {
        check_name("a template name", template)?;
        push(Request::Mail {
            template: template.to_string(),
            vars: check_data("mail", to_json_map(vars)?)?,
        })
    });
    engine.register_fn("after", |delay: i64, name: &str| {
        check_name("a timer name", name)?;
        push(Request::After {
            delay_secs: check_delay(delay)?,
            name: name.to_string(),
            data: Map::new(),
        })
    });
    engine.register_fn("after", |delay: i64, name: &str, data: RhaiMap| {
        check_name("a timer name", name)?;
        push(Request::After {
            delay_secs: check_delay(delay)?,
            name: name.to_string(),
            data: check_data("after", to_json_map(data)?)?,
        })
    });
    engine.register_fn("cancel", |name: &str| {
        push(Request::Cancel {
            name: name.to_string(),
        })
    });
    engine.register_fn("pending", |name: &str| with_ctx(|ctx| ctx.is_pending(name)));
    // What a rule remembers is loaded and saved with every event of the
    // client: past its caps a value is not kept (noted), the run goes on.
    engine.register_fn("remember", |key: &str, value: Dynamic| {
        check_name("a remember() key", key)?;
        let value = to_json(value)?;
        let n = json_bytes(&value);
        with_ctx(|ctx| {
            let l = ctx.limits;
            if n > l.max_value_bytes {
                ctx.note(format!(
                    "remember(): a value over {} bytes of JSON not kept (rules.max_value_bytes)",
                    l.max_value_bytes
                ));
            } else if !ctx.facts.contains_key(key) && ctx.facts.len() >= l.max_facts_per_rule {
                ctx.note(format!(
                    "remember(): a new key not kept: the rule already keeps {} keys for this client (rules.max_facts_per_rule)",
                    l.max_facts_per_rule
                ));
            } else {
                ctx.facts.insert(key.to_string(), value);
            }
        })
    });
    engine.register_fn("recall", |key: &str| {
        with_ctx(|ctx| ctx.facts.get(key).cloned())
            .and_then(|v| v.map_or(Ok(Dynamic::UNIT), rhai::serde::to_dynamic))
    });
    engine.register_fn("forget", |key: &str| {
        with_ctx(|ctx| {
            ctx.facts.remove(key);
        })
    });
    engine.register_fn("unique_code", unique_code);
    engine.register_fn("emit", |event_type: &str, data: RhaiMap| {
        if crate::domain::event::RESERVED_TYPES.contains(&event_type) {
            return refuse(format!(
                "emit(\"{event_type}\"): the type is reserved for nudge's timers and sweeps"
            ));
        }
        push(Request::Emit {
            event_type: event_type.to_string(),
            data: check_data("emit", to_json_map(data)?)?,
        })
    });
    engine.register_fn("task", |team: &str, title: &str| {
        check_name("a team name", team)?;
        push(Request::Task {
            team: team.to_string(),
            title: title.to_string(),
            data: Map::new(),
        })
    });
    engine.register_fn("task", |team: &str, title: &str, data: RhaiMap| {
        check_name("a team name", team)?;
        push(Request::Task {
            team: team.to_string(),
            title: title.to_string(),
            data: check_data("task", to_json_map(data)?)?,
        })
    });
    // Shared counters: `add` returns the new total, `total` reads it;
    // `add_distinct` is true when the member was new, `distinct` counts members.
    // Arguments are checked before the counter is touched: an error inside
    // `with_counter` means "the counter could not be read" and retries the batch.
    engine.register_fn("add", |name: &str, period: &str, amount: f64| {
        check_name("a counter name", name)?;
        let amount = check_amount("add", amount)?;
        with_counter(name, period, |c, k| c.add(k, amount))
    });
    engine.register_fn("add", |name: &str, period: &str, amount: i64| {
        check_name("a counter name", name)?;
        let amount = check_amount("add", amount as f64)?;
        with_counter(name, period, |c, k| c.add(k, amount))
    });
    engine.register_fn("total", |name: &str, period: &str| {
        with_counter(name, period, |c, k| c.get(k))
    });
    engine.register_fn("add_distinct", |name: &str, period: &str, member: &str| {
        check_name("a counter name", name)?;
        check_name("a distinct member", member)?;
        with_counter(name, period, |c, k| c.add_distinct(k, member))
    });
    engine.register_fn("distinct", |name: &str, period: &str| {
        with_counter(name, period, |c, k| c.get(k).map(|v| v as i64))
    });
    // The client's own counters.
    engine.register_fn("client_add", |name: &str, period: &str, amount: f64| {
        client_add(name, period, amount)
    });
    engine.register_fn("client_add", |name: &str, period: &str, amount: i64| {
        client_add(name, period, amount as f64)
    });
    engine.register_fn("client_total", |name: &str, period: &str| {
        let now = with_ctx(|ctx| ctx.now)?;
        let key = client_counter_key(name, period, now)?;
        with_ctx(|ctx| ctx.client_counters.get(&key).copied().unwrap_or(0.0))
    });
    // Durations in seconds, to compare with `now` and the times in `client`.
    engine.register_fn("seconds", |n: i64| n);
    engine.register_fn("minutes", |n: i64| duration("minutes", n, 60));
    engine.register_fn("hours", |n: i64| duration("hours", n, 3600));
    engine.register_fn("days", |n: i64| duration("days", n, 86_400));
    super::channels::register(engine);
}

/// Adds to the client's own counter. The total saturates within
/// ±[`crate::domain::history::MAX_MONEY_SUM`] so it always stays storable.
fn client_add(name: &str, period: &str, amount: f64) -> Result<f64, Box<EvalAltResult>> {
    check_name("a counter name", name)?;
    let amount = check_amount("client_add", amount)?;
    let now = with_ctx(|ctx| ctx.now)?;
    let key = client_counter_key(name, period, now)?;
    with_ctx(|ctx| {
        let counters = &mut ctx.client_counters;
        if !counters.contains_key(&key) && counters.len() >= MAX_CLIENT_COUNTERS {
            // Period keys sort in time, so the first of this counter's keys
            // is its oldest period: it goes, and the counter keeps counting.
            let prefix = format!("{name}/");
            let oldest = counters
                .range(prefix.clone()..)
                .next()
                .map(|(k, _)| k.clone())
                .filter(|k| k.starts_with(&prefix));
            match oldest {
                Some(k) => {
                    counters.remove(&k);
                }
                None => {
                    ctx.note(format!(
                        "client_add(): a new counter not counted: the client already has {MAX_CLIENT_COUNTERS} counters"
                    ));
                    return 0.0;
                }
            }
        }
        let v = counters.entry(key).or_default();
        *v = crate::domain::history::money_add(*v, amount);
        *v
    })
}

/// Counter periods (`name/period-key`) one client keeps: with a new name or
/// day each event, they would grow without end. At the cap a counter's
/// oldest period makes room for its new one.
pub const MAX_CLIENT_COUNTERS: usize = 200;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collect_scopes_requests_to_one_run() {
        let mut engine = Engine::new();
        register(&mut engine);
        let (res, ctx) = collect(RunContext::new("r", "c", "e"), || {
            engine.run(r#"mail("a"); mail("b", #{ x: 1, y: [true] });"#)
        });
        res.unwrap().unwrap();
        let reqs = ctx.requests;
        assert_eq!(reqs.len(), 2);
        assert_eq!(
            reqs[1],
            Request::Mail {
                template: "b".into(),
                vars: serde_json::json!({"x": 1, "y": [true]})
                    .as_object()
                    .unwrap()
                    .clone()
            }
        );
        let (res, ctx) = collect(RunContext::new("r", "c", "e"), || engine.run("1 + 1;"));
        res.unwrap().unwrap();
        assert!(ctx.requests.is_empty());
        assert!(engine.run(r#"mail("outside");"#).is_err());
    }

    #[test]
    fn a_panic_in_a_run_fails_the_run_and_gives_the_context_back() {
        let mut engine = Engine::new();
        register(&mut engine);
        engine.register_fn("explode", |_: i64| -> i64 { panic!("out of bounds") });
        let mut ctx = RunContext::new("r", "c", "e");
        ctx.facts.insert("kept".into(), Value::from(1));
        let (res, ctx) = collect(ctx, || engine.run(r#"mail("a"); explode(1);"#));
        assert_eq!(res.unwrap_err(), "out of bounds");
        assert_eq!(ctx.facts["kept"], 1, "what was lent comes back");
        assert_eq!(ctx.requests.len(), 1);
        // The context is no longer installed: the next run starts clean.
        let (res, ctx) = collect(RunContext::new("r", "c", "e2"), || engine.run("1;"));
        res.unwrap().unwrap();
        assert!(ctx.requests.is_empty());
    }

    #[test]
    fn memory_timers_and_codes() {
        let mut engine = Engine::new();
        register(&mut engine);
        let mut ctx = RunContext::new("r", "c1", "e1");
        ctx.facts.insert("seen".into(), Value::from(2));
        ctx.timers.push("old".into());
        let script = r#"
            remember("seen", recall("seen") + 1);
            if recall("nothing") != () { throw "unset keys are ()"; }
            after(minutes(15), "check", #{ n: 1 });
            cancel("old");
            if !pending("check") || pending("old") { throw "pending() sees this run"; }
            let a = unique_code("BROWSE");
            let b = unique_code("BROWSE");
            if a == b || a.len != 17 { throw `bad codes ${a} ${b}`; }
            remember("code", a);
        "#;
        let (res, ctx) = collect(ctx, || engine.run(script));
        res.unwrap().unwrap();
        assert_eq!(ctx.facts["seen"], 3);
        assert_eq!(ctx.requests.len(), 2);
        assert!(
            matches!(&ctx.requests[0], Request::After { delay_secs: 900, name, .. } if name == "check")
        );
        // Same rule, client and cause: the same code on a replay.
        let (_, again) = collect(RunContext::new("r", "c1", "e1"), || {
            engine.run(r#"remember("code", unique_code("BROWSE"));"#)
        });
        assert_eq!(again.facts["code"], ctx.facts["code"]);
    }

    /// Runs `script` in a fresh context with default limits; returns the
    /// error text (if the run failed) and the context.
    fn run(script: &str) -> (Option<String>, RunContext) {
        let mut engine = Engine::new();
        register(&mut engine);
        let mut ctx = RunContext::new("r", "c1", "e1");
        ctx.now = "2026-11-01T10:00:00Z".parse().unwrap();
        ctx.counters = crate::domain::counters::Counters::new(
            Box::new(crate::domain::counters::MemorySource::default()),
            chrono_tz::Tz::UTC,
        );
        let (res, ctx) = collect(ctx, || engine.run(script));
        (res.unwrap().err().map(|e| e.to_string()), ctx)
    }

    #[test]
    fn after_refuses_delays_beyond_the_limit_and_durations_that_overflow() {
        for script in [
            r#"after(9223372036854775807, "x");"#,
            r#"after(days(200000000), "x");"#,
            r#"after(days(3651), "x");"#,
        ] {
            let (err, ctx) = run(script);
            let err = err.unwrap_or_else(|| panic!("{script} must fail"));
            assert!(err.contains("rules.max_delay_days"), "{script}: {err}");
            assert!(ctx.requests.is_empty());
        }
        let (err, _) = run("days(9223372036854775807);");
        assert!(err.unwrap().contains("too large a duration"));
        let (err, _) = run("minutes(-9223372036854775807);");
        assert!(err.unwrap().contains("too large a duration"));
        // Zero, the limit itself and a negative delay (fires at once) are fine.
        let (err, ctx) = run(r#"after(0, "a"); after(days(3650), "b"); after(-5, "c");"#);
        assert_eq!(err, None);
        let delays: Vec<i64> = ctx
            .requests
            .iter()
            .map(|r| match r {
                Request::After { delay_secs, .. } => *delay_secs,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(delays, vec![0, 3650 * 86_400, 0]);
        let (err, _) = run(&format!(
            r#"after(1, "{}");"#,
            "n".repeat(MAX_NAME_BYTES + 1)
        ));
        assert!(err.unwrap().contains("timer name"));
        let (err, _) = run(r#"after(1, "");"#);
        assert!(err.unwrap().contains("timer name"));
    }

    #[test]
    fn counter_amounts_must_be_finite_and_bounded_without_failing_the_batch() {
        for script in [
            r#"add("x", "all", 1e308 * 10.0);"#,
            r#"add("x", "all", 0.0 / 0.0);"#,
            r#"add("x", "all", 1e13);"#,
            r#"client_add("x", "month", 1e308 * 10.0);"#,
            r#"client_add("x", "month", -2e12);"#,
        ] {
            let (err, ctx) = run(script);
            let err = err.unwrap_or_else(|| panic!("{script} must fail"));
            assert!(err.contains("finite number within"), "{script}: {err}");
            // A bad argument is the rule's fault, not an unreadable counter:
            // the batch must not be retried for it.
            assert_eq!(ctx.counter_failure, None, "{script}");
        }
        let (err, _) = run(r#"add("x", "fortnight", 1);"#);
        assert!(err.unwrap().contains("unknown period"));
        let (err, ctx) = run(r#"add("x", "all", 1e12); client_add("y", "month", 1e12);"#);
        assert_eq!(err, None);
        assert_eq!(ctx.client_counters["y/2026-11"], 1e12);
    }

    #[test]
    fn a_clients_counters_stay_finite_and_bounded_in_number() {
        let (err, ctx) = run(r#"for i in 0..2000 { client_add("big", "all", 1e12); }
               for i in 0..300 { client_add(`c${i}`, "all", 1); }"#);
        assert_eq!(err, None);
        assert!(ctx.client_counters["big/all"].is_finite());
        assert!(ctx.client_counters["big/all"] <= crate::domain::history::MAX_MONEY_SUM);
        assert_eq!(ctx.client_counters.len(), MAX_CLIENT_COUNTERS);
        assert_eq!(ctx.notes.len(), 1, "{:?}", ctx.notes);
    }

    #[test]
    fn effects_per_run_are_capped_with_one_note_each() {
        let (err, ctx) = run(
            r#"for i in 0..1000 { mail("t"); task("sales", "call"); emit("x", #{}); after(60, `t${i}`); }"#,
        );
        assert_eq!(err, None);
        let count = |f: fn(&Request) -> bool| ctx.requests.iter().filter(|r| f(r)).count();
        let l = RunLimits::default();
        assert_eq!(count(|r| matches!(r, Request::Mail { .. })), l.max_mails);
        assert_eq!(count(|r| matches!(r, Request::Task { .. })), l.max_tasks);
        assert_eq!(count(|r| matches!(r, Request::Emit { .. })), l.max_emits);
        assert_eq!(
            count(|r| matches!(r, Request::After { .. })),
            l.max_timers_per_rule
        );
        assert_eq!(ctx.notes.len(), 4, "{:?}", ctx.notes);
        assert!(
            ctx.notes
                .iter()
                .any(|n| n.contains("rules.max_mails_per_run"))
        );
        // Setting a pending timer again replaces it, at the cap too.
        let mut engine = Engine::new();
        register(&mut engine);
        let mut full = RunContext::new("r", "c1", "e1");
        full.timers = (0..l.max_timers_per_rule)
            .map(|i| format!("t{i}"))
            .collect();
        let (res, full) = collect(full, || engine.run(r#"after(5, "t3"); after(5, "new");"#));
        res.unwrap().unwrap();
        assert_eq!(full.requests.len(), 1);
        assert_eq!(full.notes.len(), 1);
    }

    #[test]
    fn remember_keeps_values_and_keys_within_their_caps() {
        let l = RunLimits::default();
        let (err, ctx) = run(&format!(
            r#"remember("big", "{}"); remember("ok", 1);
               for i in 0..500 {{ remember(`k${{i}}`, i); }}"#,
            "x".repeat(l.max_value_bytes)
        ));
        assert_eq!(err, None);
        assert!(!ctx.facts.contains_key("big"), "over max_value_bytes");
        assert_eq!(ctx.facts.len(), l.max_facts_per_rule);
        assert_eq!(ctx.notes.len(), 2, "{:?}", ctx.notes);
        // Data of a request over the size limit fails the run.
        let (err, _) = run(&format!(
            r#"after(1, "t", #{{ x: "{}" }});"#,
            "x".repeat(l.max_value_bytes)
        ));
        assert!(err.unwrap().contains("rules.max_value_bytes"));
        let (err, _) = run(&format!(
            r#"mail("t", #{{ x: "{}", y: "{}" }});"#,
            "x".repeat(l.max_effect_bytes / 2),
            "y".repeat(l.max_effect_bytes / 2)
        ));
        assert!(err.unwrap().contains("rules.max_string_bytes"));
        let (err, _) = run(r#"emit("timer", #{});"#);
        assert!(err.unwrap().contains("reserved"));
    }

    #[test]
    fn print_output_is_cut_at_the_runs_budget() {
        let mut engine = Engine::new();
        register(&mut engine);
        let printed = std::sync::Arc::new(std::sync::Mutex::new(0usize));
        let p = printed.clone();
        engine.on_print(move |s| {
            if let Some(s) = log_line(s) {
                *p.lock().unwrap() += s.len();
            }
        });
        let script = r#"let s = "x"; for i in 0..16 { s += s; } for i in 0..1000 { print(s); }"#;
        let (res, ctx) = collect(RunContext::new("r", "c", "e"), || engine.run(script));
        res.unwrap().unwrap();
        let max = RunLimits::default().max_log_bytes;
        let n = *printed.lock().unwrap();
        assert!(n <= max + 100, "{n} bytes printed");
        assert_eq!(ctx.notes.len(), 1, "{:?}", ctx.notes);
        assert!(ctx.notes[0].contains("rules.max_log_bytes_per_run"));
    }
}
