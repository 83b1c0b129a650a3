//! Marketers' rules: one Rhai file per rule in `rules/`, sandboxed, compiled
//! once and run for every event whose type the rule declares in `const ON`.
//!
//! A rule file is a plain script. Its top level runs once per matching event
//! with `event`, `client` and `now` in scope, and asks for effects through
//! the functions in [`api`]. Constants at the top are the knobs a marketer
//! changes.

pub mod api;
pub mod boards;
mod channels;
mod experiments;
pub mod limits;
pub mod loader;
pub mod products;
pub mod settings;
pub mod values;

use crate::domain::experiments::Goal;
use rhai::{AST, Dynamic, Engine, EvalAltResult, Scope};
pub use settings::RulesConfig;
use std::path::PathBuf;
use std::sync::Arc;

pub use api::{Request, RunContext};
pub use limits::RunLimits;

/// A compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// The file stem: `rules/welcome.rhai` is the rule `welcome`.
    pub name: String,
    pub path: PathBuf,
    /// Event types that run this rule (`"*"` for all).
    pub triggers: Vec<String>,
    /// `const SCHEDULE`: when the rule sweeps all clients (cron syntax, UTC).
    pub schedule: Option<Schedule>,
    /// `const GOAL`: what the rule is for, measured in its reports.
    pub goal: Option<Goal>,
    pub ast: Arc<AST>,
    /// What the script reads of its inputs: only that is built for it.
    pub reads: Reads,
}

/// What rules read of `event`, `client` and `settings` ([`values::Needs`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reads {
    pub event: values::Needs,
    pub client: values::Needs,
    pub settings: values::Needs,
}

impl Reads {
    fn of(ast: &AST) -> Self {
        Self {
            event: values::Needs::of(ast, INPUTS[0]),
            client: values::Needs::of(ast, INPUTS[1]),
            settings: values::Needs::of(ast, INPUTS[2]),
        }
    }

    /// What any of `rules` reads.
    pub fn any<'a>(rules: impl IntoIterator<Item = &'a Rule>) -> Self {
        let mut all = Reads::default();
        for r in rules {
            all.event.merge(r.reads.event.clone());
            all.client.merge(r.reads.client.clone());
            all.settings.merge(r.reads.settings.clone());
        }
        all
    }
}

/// A parsed `const SCHEDULE`, with its source text for display.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub text: String,
    pub cron: cron::Schedule,
}

impl Rule {
    pub fn matches(&self, event_type: &str) -> bool {
        self.triggers.iter().any(|t| t == event_type || t == "*")
    }
}

/// A rule file that could not be compiled, with where and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CompileError {
    pub file: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl std::fmt::Display for CompileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "{}:{l}:{c}: {}", self.file, self.message),
            (Some(l), None) => write!(f, "{}:{l}: {}", self.file, self.message),
            _ => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// A rule run that failed: a script error or a limit reached.
#[derive(Debug, Clone, thiserror::Error)]
#[error("rule `{rule}` failed at line {line}: {message}")]
pub struct RuleError {
    pub rule: String,
    pub line: usize,
    pub message: String,
}

/// The sandboxed Rhai engine every rule runs in.
pub struct RuleEngine {
    engine: Engine,
    /// What each run may ask for and keep, handed to every run's context.
    limits: RunLimits,
}

impl RuleEngine {
    pub fn new(limits: &RulesConfig) -> Self {
        let mut engine = Engine::new();
        // No way out of the sandbox: modules are compiled out (`no_module`),
        // `eval` is refused, and nothing touching files, network or processes
        // is registered.
        engine.disable_symbol("eval");
        engine.set_max_operations(limits.max_operations.get());
        engine.set_max_call_levels(limits.max_call_depth.get());
        engine.set_max_expr_depths(64, 64);
        engine.set_max_string_size(limits.max_string_bytes.get());
        engine.set_max_array_size(limits.max_array_len.get());
        engine.set_max_map_size(limits.max_map_len.get());
        engine.set_fail_on_invalid_map_property(false);
        // Output counts against the run's budget (rules.max_log_bytes_per_run):
        // a rule printing in a loop would otherwise fill the disk.
        engine.on_print(|s| {
            if let Some(s) = api::log_line(s) {
                tracing::info!(target: "nudge::rule", "{s}")
            }
        });
        engine.on_debug(|s, src, pos| {
            if let Some(s) = api::log_line(s) {
                tracing::debug!(target: "nudge::rule", source = src, line = pos.line(), "{s}")
            }
        });
        api::register(&mut engine);
        boards::register(&mut engine);
        products::register(&mut engine);
        Self {
            engine,
            limits: RunLimits::from_config(limits),
        }
    }

    /// Every function a rule can call (the rule API and Rhai's standard
    /// library), by name, with the numbers of arguments it takes.
    pub fn functions(
        &self,
    ) -> std::collections::HashMap<String, std::collections::BTreeSet<usize>> {
        let mut out: std::collections::HashMap<String, std::collections::BTreeSet<usize>> =
            Default::default();
        for (name, n) in self.engine.collect_fn_metadata(
            None,
            |f| Some((f.metadata.name.to_string(), f.metadata.num_params)),
            true,
        ) {
            out.entry(name).or_default().insert(n);
        }
        out
    }

    /// Compiles one rule file; its triggers come from `const ON = [...]`.
    pub fn compile(&self, name: &str, path: PathBuf, source: &str) -> Result<Rule, CompileError> {
        let file = path.display().to_string();
        let ast = self.engine.compile(source).map_err(|e| {
            let pos = e.position();
            CompileError {
                file: file.clone(),
                line: pos.line(),
                column: pos.position(),
                message: e.err_type().to_string(),
            }
        })?;
        let consts: std::collections::HashMap<&str, Dynamic> = ast
            .iter_literal_variables(true, false)
            .map(|(n, _, v)| (n, v))
            .collect();
        let refuse = |message: String| CompileError {
            file: file.clone(),
            line: None,
            column: None,
            message,
        };
        let triggers = match consts.get("ON").cloned() {
            None => vec![],
            Some(v) if v.is_string() => vec![v.into_string().unwrap_or_default()],
            Some(v) if v.is_array() => v
                .into_array()
                .unwrap_or_default()
                .into_iter()
                .map(|t| t.into_string())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| refuse("`const ON` must list event types as strings".into()))?,
            Some(_) => return Err(refuse("`const ON` must be a list of event types".into())),
        };
        let schedule = match consts.get("SCHEDULE").cloned() {
            None => None,
            Some(v) => {
                let text = v
                    .into_string()
                    .map_err(|_| refuse("`const SCHEDULE` must be a string".into()))?;
                let cron = text.parse::<cron::Schedule>().map_err(|e| {
                    refuse(format!(
                        "`const SCHEDULE = {text:?}` is not a cron schedule \
                         (sec min hour day-of-month month day-of-week): {e}"
                    ))
                })?;
                Some(Schedule { text, cron })
            }
        };
        let goal = match consts.get("GOAL").cloned() {
            None => None,
            Some(v) => Some(parse_goal(v).map_err(refuse)?),
        };
        if triggers.is_empty() && schedule.is_none() {
            return Err(refuse(
                "the rule declares no triggers: add `const ON = [\"event_type\"];` \
                 or `const SCHEDULE = \"0 0 9 * * *\";`"
                    .into(),
            ));
        }
        Ok(Rule {
            name: name.to_string(),
            path,
            triggers,
            schedule,
            goal,
            reads: Reads::of(&ast),
            ast: Arc::new(ast),
        })
    }

    /// Runs one rule for one trigger. Pure: what it asks for is returned in
    /// the context, not done.
    /// The context always comes back, with what it had been lent, whether
    /// the run succeeded or not.
    pub fn run(
        &self,
        rule: &Rule,
        inputs: &mut Inputs,
        mut ctx: RunContext,
    ) -> (RunContext, Result<(), RuleError>) {
        ctx.limits = self.limits;
        let scope = &mut inputs.scope;
        let (result, ctx) = api::collect(ctx, || self.engine.run_ast_with_scope(scope, &rule.ast));
        inputs.reset();
        let result = match result {
            Ok(result) => result.map_err(|e| RuleError {
                rule: rule.name.clone(),
                line: e.position().line().unwrap_or(0),
                message: describe(&e),
            }),
            Err(panic) => Err(RuleError {
                rule: rule.name.clone(),
                line: 0,
                message: format!("the run broke off: internal error: {panic}"),
            }),
        };
        (ctx, result)
    }
}

/// `const GOAL = #{ event: "order_placed", within_days: 7, min_total: 20 }`.
fn parse_goal(v: Dynamic) -> Result<Goal, String> {
    const SHAPE: &str = "`const GOAL` must be a map like #{ event: \"order_placed\", \
                         within_days: 7 } (min_total optional)";
    let Some(map) = v.try_cast::<rhai::Map>() else {
        return Err(SHAPE.into());
    };
    let mut event = None;
    let mut within_days = None;
    let mut min_total = None;
    for (k, v) in map {
        match k.as_str() {
            "event" => event = v.into_string().ok(),
            "within_days" => within_days = Some(
                v.as_int()
                    .ok()
                    .filter(|d| {
                        (1..=i64::from(crate::domain::experiments::MAX_GOAL_DAYS)).contains(d)
                    })
                    .ok_or_else(|| {
                        format!(
                            "`const GOAL`: within_days must be a whole number of days from 1 to {}",
                            crate::domain::experiments::MAX_GOAL_DAYS
                        )
                    })? as u32,
            ),
            "min_total" => {
                let t = v
                    .as_float()
                    .ok()
                    .or_else(|| v.as_int().ok().map(|i| i as f64));
                min_total = Some(
                    t.filter(|t| t.is_finite())
                        .ok_or_else(|| "`const GOAL`: min_total must be a number".to_string())?,
                )
            }
            other => return Err(format!("`const GOAL`: unknown key `{other}`; {SHAPE}")),
        }
    }
    let event = event
        .filter(|e| crate::domain::event::EventType::parse(e.as_str()).is_ok())
        .ok_or_else(|| format!("`const GOAL`: `event` must name an event type; {SHAPE}"))?;
    Ok(Goal {
        event,
        within_days: within_days
            .ok_or_else(|| format!("`const GOAL`: within_days missing; {SHAPE}"))?,
        min_total,
    })
}

/// What the rules of one trigger see: `event`, `client`, `settings` and
/// `now`, as constants. Built once per trigger and lent to each rule in turn
/// rather than copied for each, since the client view is the largest value a
/// rule run handles. Constants cannot be changed by a script (assignments
/// and non-pure methods on them fail), so every rule sees the same values.
pub struct Inputs {
    scope: Scope<'static>,
}

/// The variables every rule run starts with.
const INPUTS: [&str; 4] = ["event", "client", "settings", "now"];

impl Inputs {
    pub fn new(event: Dynamic, client: Dynamic, settings: Dynamic, now: i64) -> Self {
        let mut scope = Scope::with_capacity(16);
        scope.push_constant_dynamic(INPUTS[0], event);
        scope.push_constant_dynamic(INPUTS[1], client);
        scope.push_constant_dynamic(INPUTS[2], settings);
        scope.push_constant(INPUTS[3], now);
        Self { scope }
    }

    /// Drops what the last run declared. A closure that captured an input
    /// turned it into a shared value; it goes back to a plain copy, so no
    /// later rule can reach it through a reference the last one kept.
    fn reset(&mut self) {
        self.scope.rewind(INPUTS.len());
        let shared = self.scope.iter_raw().any(|(_, _, v)| v.is_shared());
        if shared {
            let values: Vec<(String, Dynamic)> = self
                .scope
                .iter_raw()
                .map(|(name, _, v)| (name.to_string(), v.clone().flatten()))
                .collect();
            self.scope.clear();
            // Listed newest first: push them back in their first order.
            for (name, value) in values.into_iter().rev() {
                self.scope.push_constant_dynamic(name, value);
            }
        }
    }
}

fn describe(e: &EvalAltResult) -> String {
    match e {
        EvalAltResult::ErrorTooManyOperations(_) => {
            "stopped: too many operations (an endless loop?)".into()
        }
        EvalAltResult::ErrorStackOverflow(_) => "stopped: calls nested too deep".into(),
        EvalAltResult::ErrorDataTooLarge(what, _) => format!("stopped: {what} too large"),
        EvalAltResult::ErrorInFunctionCall(f, _, inner, _) => {
            format!("in {f}(): {}", describe(inner))
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine() -> RuleEngine {
        RuleEngine::new(&RulesConfig::default())
    }

    fn unit_inputs() -> Inputs {
        Inputs::new(Dynamic::UNIT, Dynamic::UNIT, Dynamic::UNIT, 0)
    }

    #[test]
    fn triggers_come_from_const_on() {
        let e = engine();
        let r = e
            .compile("w", "w.rhai".into(), r#"const ON = ["a", "b"]; mail("t");"#)
            .unwrap();
        assert_eq!(r.triggers, vec!["a", "b"]);
        assert!(r.matches("b") && !r.matches("c"));
        let err = e.compile("w", "w.rhai".into(), "mail(\"t\");").unwrap_err();
        assert!(err.message.contains("const ON"), "{err}");
        let r = e
            .compile("s", "s.rhai".into(), "const SCHEDULE = \"0 0 9 * * *\";")
            .unwrap();
        assert!(r.triggers.is_empty() && r.schedule.is_some());
        let err = e
            .compile("s", "s.rhai".into(), "const SCHEDULE = \"every day\";")
            .unwrap_err();
        assert!(err.message.contains("not a cron schedule"), "{err}");
    }

    #[test]
    fn syntax_errors_carry_file_and_line() {
        let err = engine()
            .compile(
                "w",
                "rules/w.rhai".into(),
                "const ON = [\"a\"];\nlet x = ;\n",
            )
            .unwrap_err();
        assert_eq!(err.line, Some(2));
        assert!(err.to_string().starts_with("rules/w.rhai:2:"), "{err}");
    }

    #[test]
    fn runaway_rules_are_stopped() {
        let e = engine();
        let r = e
            .compile("loop", "l.rhai".into(), "const ON = [\"a\"];\nloop { }")
            .unwrap();
        let err = e
            .run(&r, &mut unit_inputs(), RunContext::default())
            .1
            .unwrap_err();
        assert!(err.message.contains("too many operations"), "{err}");

        let r = e
            .compile(
                "rec",
                "r.rhai".into(),
                "const ON = [\"a\"];\nfn f(n) { f(n + 1) }\nf(0);",
            )
            .unwrap();
        let err = e
            .run(&r, &mut unit_inputs(), RunContext::default())
            .1
            .unwrap_err();
        assert!(err.message.contains("too deep"), "{err}");

        let r = e
            .compile(
                "big",
                "b.rhai".into(),
                "const ON = [\"a\"];\nlet s = \"x\"; loop { s += s; }",
            )
            .unwrap();
        let err = e
            .run(&r, &mut unit_inputs(), RunContext::default())
            .1
            .unwrap_err();
        assert!(err.message.contains("too large"), "{err}");
    }

    #[test]
    fn each_rule_of_a_trigger_sees_the_inputs_as_they_were_built() {
        let e = engine();
        let mut client = rhai::Map::new();
        client.insert("name".into(), Dynamic::from("Ana"));
        client.insert(
            "tags".into(),
            Dynamic::from_array(vec![Dynamic::from(1_i64)]),
        );
        let mut inputs = Inputs::new(Dynamic::UNIT, Dynamic::from_map(client), Dynamic::UNIT, 7);
        let scripts = [
            // Fails: constants cannot change, in place or through a closure.
            "client.name = \"Bob\";",
            "client.tags.push(2);",
            "let f = || { client.tags.push(3); }; f.call();",
            // Succeed, changing only their own copies.
            "let keep = || client; let c = keep.call(); c.name = \"Eve\"; let x = 1;",
            "let c = client; c.tags.push(4);",
        ];
        for (i, src) in scripts.iter().enumerate() {
            let r = e
                .compile(
                    &format!("r{i}"),
                    "r.rhai".into(),
                    &format!("const ON = [\"a\"];\n{src}"),
                )
                .unwrap();
            let (_, result) = e.run(&r, &mut inputs, RunContext::default());
            assert_eq!(result.is_err(), i < 3, "{src}: {result:?}");
        }
        let check = e
            .compile(
                "check",
                "c.rhai".into(),
                "const ON = [\"a\"];\n\
                 if is_def_var(\"x\") || is_def_var(\"c\") { throw \"a variable of an earlier rule\"; }\n\
                 if client.name != \"Ana\" || client.tags != [1] || now != 7 { throw `changed: ${client}`; }",
            )
            .unwrap();
        let (_, result) = e.run(&check, &mut inputs, RunContext::default());
        result.unwrap();
    }

    #[test]
    fn eval_is_refused() {
        let err = engine()
            .compile("e", "e.rhai".into(), "const ON = [\"a\"];\neval(\"1\");")
            .unwrap_err();
        assert_eq!(err.line, Some(2), "{err}");
    }
}
