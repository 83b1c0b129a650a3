//! The functions a rule can call. They do nothing themselves: each records a
//! [`Request`] that the decision core turns into an effect with its key.
//!
//! Requests are gathered in a thread-local because Rhai native functions have
//! no per-call state of ours to write into; [`collect`] scopes it to exactly
//! one rule run on the current thread.

use rhai::{Dynamic, Engine, EvalAltResult, Map as RhaiMap, Position};
use serde_json::{Map, Value};
use std::cell::RefCell;

/// What a rule asked for, before it becomes an effect.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// `mail(template)` / `mail(template, vars)`: mail the client.
    Mail {
        template: String,
        vars: Map<String, Value>,
    },
}

thread_local! {
    static REQUESTS: RefCell<Option<Vec<Request>>> = const { RefCell::new(None) };
}

/// Runs `f` with a fresh request buffer and returns its result with what it asked for.
pub fn collect<T>(f: impl FnOnce() -> T) -> (T, Vec<Request>) {
    let previous = REQUESTS.with(|r| r.borrow_mut().replace(Vec::new()));
    let out = f();
    let requests = REQUESTS.with(|r| std::mem::replace(&mut *r.borrow_mut(), previous));
    (out, requests.unwrap_or_default())
}

fn push(req: Request) -> Result<(), Box<EvalAltResult>> {
    REQUESTS.with(|r| match r.borrow_mut().as_mut() {
        Some(v) => {
            v.push(req);
            Ok(())
        }
        // Only reachable if a function is called outside a rule run (e.g.
        // from `nudge check`'s compile step): refuse rather than lose it.
        None => Err("effects can only be requested while a rule runs".into()),
    })
}

fn to_json_map(vars: RhaiMap) -> Result<Map<String, Value>, Box<EvalAltResult>> {
    let value: Value = rhai::serde::from_dynamic(&Dynamic::from_map(vars))?;
    match value {
        Value::Object(m) => Ok(m),
        _ => {
            Err(
                EvalAltResult::ErrorMismatchDataType("map".into(), "other".into(), Position::NONE)
                    .into(),
            )
        }
    }
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
        let (res, reqs) = collect(|| engine.run(r#"mail("a"); mail("b", #{ x: 1, y: [true] });"#));
        res.unwrap();
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
        let (res, reqs) = collect(|| engine.run("1 + 1;"));
        res.unwrap();
        assert!(reqs.is_empty());
        assert!(engine.run(r#"mail("outside");"#).is_err());
    }
}
