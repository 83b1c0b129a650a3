//! The functions a rule can call. They do nothing themselves: each records a
//! [`Request`] that the decision core turns into an effect with its key.
//!
//! Requests are gathered in a thread-local because Rhai native functions have
//! no per-call state of ours to write into; [`collect`] scopes it to exactly
//! one rule run on the current thread.

use crate::counters::{CounterKey, Counters};
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
}

/// The state of one rule run: what the rule may read and what it asked for.
#[derive(Debug, Default)]
pub struct RunContext {
    /// Requests in the order made.
    pub requests: Vec<Request>,
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

fn with_ctx<T>(f: impl FnOnce(&mut RunContext) -> T) -> Result<T, Box<EvalAltResult>> {
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
    let p = crate::counters::period_key(period, now, chrono_tz::Tz::UTC)?;
    Ok(format!("{name}/{p}"))
}

fn push(req: Request) -> Result<(), Box<EvalAltResult>> {
    with_ctx(|ctx| ctx.requests.push(req))
}

fn to_json(v: Dynamic) -> Result<Value, Box<EvalAltResult>> {
    rhai::serde::from_dynamic(&v)
}

fn to_json_map(vars: RhaiMap) -> Result<Map<String, Value>, Box<EvalAltResult>> {
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
    engine.register_fn("mail", |template: &str| {
        push(Request::Mail {
            template: template.to_string(),
            vars: Map::new(),
        })
    });
    engine.register_fn("mail", |template: &str, vars: RhaiMap| {
        push(Request::Mail {
            template: template.to_string(),
            vars: to_json_map(vars)?,
        })
    });
    engine.register_fn("after", |delay: i64, name: &str| {
        push(Request::After {
            delay_secs: delay.max(0),
            name: name.to_string(),
            data: Map::new(),
        })
    });
    engine.register_fn("after", |delay: i64, name: &str, data: RhaiMap| {
        push(Request::After {
            delay_secs: delay.max(0),
            name: name.to_string(),
            data: to_json_map(data)?,
        })
    });
    engine.register_fn("cancel", |name: &str| {
        push(Request::Cancel {
            name: name.to_string(),
        })
    });
    engine.register_fn("pending", |name: &str| {
        with_ctx(|ctx| {
            // The latest request wins: a timer set or cancelled in this run counts.
            for r in ctx.requests.iter().rev() {
                match r {
                    Request::After { name: n, .. } if n == name => return true,
                    Request::Cancel { name: n } if n == name => return false,
                    _ => {}
                }
            }
            ctx.timers.iter().any(|t| t == name)
        })
    });
    engine.register_fn("remember", |key: &str, value: Dynamic| {
        let value = to_json(value)?;
        with_ctx(|ctx| {
            ctx.facts.insert(key.to_string(), value);
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
        push(Request::Emit {
            event_type: event_type.to_string(),
            data: to_json_map(data)?,
        })
    });
    engine.register_fn("task", |team: &str, title: &str| {
        push(Request::Task {
            team: team.to_string(),
            title: title.to_string(),
            data: Map::new(),
        })
    });
    engine.register_fn("task", |team: &str, title: &str, data: RhaiMap| {
        push(Request::Task {
            team: team.to_string(),
            title: title.to_string(),
            data: to_json_map(data)?,
        })
    });
    // Shared counters: `add` returns the new total, `total` reads it;
    // `add_distinct` is true when the member was new, `distinct` counts members.
    engine.register_fn("add", |name: &str, period: &str, amount: f64| {
        with_counter(name, period, |c, k| c.add(k, amount))
    });
    engine.register_fn("add", |name: &str, period: &str, amount: i64| {
        with_counter(name, period, |c, k| c.add(k, amount as f64))
    });
    engine.register_fn("total", |name: &str, period: &str| {
        with_counter(name, period, |c, k| c.get(k))
    });
    engine.register_fn("add_distinct", |name: &str, period: &str, member: &str| {
        with_counter(name, period, |c, k| c.add_distinct(k, member))
    });
    engine.register_fn("distinct", |name: &str, period: &str| {
        with_counter(name, period, |c, k| c.get(k).map(|v| v as i64))
    });
    // The client's own counters.
    engine.register_fn("client_add", |name: &str, period: &str, amount: f64| {
        let now = with_ctx(|ctx| ctx.now)?;
        let key = client_counter_key(name, period, now)?;
        with_ctx(|ctx| {
            let v = ctx.client_counters.entry(key).or_default();
            *v += amount;
            *v
        })
    });
    engine.register_fn("client_add", |name: &str, period: &str, amount: i64| {
        let now = with_ctx(|ctx| ctx.now)?;
        let key = client_counter_key(name, period, now)?;
        with_ctx(|ctx| {
            let v = ctx.client_counters.entry(key).or_default();
            *v += amount as f64;
            *v
        })
    });
    engine.register_fn("client_total", |name: &str, period: &str| {
        let now = with_ctx(|ctx| ctx.now)?;
        let key = client_counter_key(name, period, now)?;
        with_ctx(|ctx| ctx.client_counters.get(&key).copied().unwrap_or(0.0))
    });
    // Durations in seconds, to compare with `now` and the times in `client`.
    engine.register_fn("seconds", |n: i64| n);
    engine.register_fn("minutes", |n: i64| n * 60);
    engine.register_fn("hours", |n: i64| n * 3600);
    engine.register_fn("days", |n: i64| n * 86_400);
}

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
}
