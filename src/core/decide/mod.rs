//! The decision core, free of I/O: given a client's history, a trigger (an
//! event, a timer coming due, a sweep) and the rules in force, it folds the
//! trigger into the history and returns the effects and the process-log
//! lines. The daemon, and every tool that must decide as the daemon would,
//! call this one core. Shared counters are the one thing it reads from
//! outside, through [`Counters`], which the caller fills from where it keeps them.

use crate::core::rules::{
    Inputs, Reads, Request, Rule, RuleEngine, RulesConfig, RunContext, loader::RuleSet, values,
};
use crate::core::templates::{MailKind, TemplateSet};
use crate::domain::counters::Counters;
use crate::domain::effects::{Effect, EffectKind, effect_key};
use crate::domain::event::{Envelope, EventId};
use crate::domain::experiments::ExposureRow;
use crate::domain::history::{ClientState, HistoryLimits, RECENT_MAILS, SentMail, Timer};
use crate::domain::log::{Level, LogEntry};
use crate::domain::settings::HistoryConfig;
use chrono::{DateTime, Duration, Utc};
use rhai::Dynamic;
use serde_json::{Value, json};
use std::collections::BTreeMap;

mod channels;
mod goals;
mod mail;
mod views;

pub use channels::{ChannelSettings, FORWARD_RULE, HAPPENINGS, forward_key};
use mail::describe;
pub use views::{client_view, event_view, mail_defaults};

/// What one trigger led to.
#[derive(Debug, Default)]
pub struct Decision {
    pub effects: Vec<Effect>,
    pub log: Vec<LogEntry>,
    /// Rules that ran, with whether they succeeded: for metrics and reports.
    pub runs: Vec<(String, bool)>,
    /// Secondary events the rules emitted (already decided): stored with the batch.
    pub events: Vec<Envelope>,
    /// A counter could not be read: the batch must not be committed.
    pub counter_failure: Option<String>,
    /// Exposures made or changed, as they are after the change, oldest
    /// change first (a later one of the same exposure supersedes it).
    pub exposures: Vec<ExposureRow>,
}

impl Decision {
    fn extend(&mut self, other: Decision) {
        self.effects.extend(other.effects);
        self.exposures.extend(other.exposures);
        self.log.extend(other.log);
        self.runs.extend(other.runs);
        self.events.extend(other.events);
        if self.counter_failure.is_none() {
            self.counter_failure = other.counter_failure;
        }
    }
}

/// What started a rule run.
struct Trigger {
    /// Unique per client and trigger: seeds effect keys and `unique_code`.
    cause: String,
    /// The trigger's time: the rule's `now`.
    at: DateTime<Utc>,
    /// The originating event, when there is one (for the process log).
    event_id: Option<EventId>,
    /// How many emits deep this trigger is (0 for the shop's events).
    depth: u32,
}

/// Settings that shape decisions, read once from the configuration.
#[derive(Debug, Clone)]
pub struct CoreSettings {
    /// Silence that ends a session when the producer sends no session id.
    pub session_gap: Duration,
    /// What a client's state keeps at most.
    pub history_limits: HistoryLimits,
    /// How deep secondary events may cause further ones.
    pub max_emit_depth: u32,
    /// Team name -> the address its tasks are mailed to.
    pub teams: BTreeMap<String, String>,
    /// `rules.settings` from the configuration, visible to rules as `settings`.
    pub rule_settings: Value,
    /// `rule_settings` as rules see it, converted once.
    settings_view: Dynamic,
    /// Base URL of links to nudge in mails (staff links to a client).
    pub public_url: String,
    /// Marketing mails per client per day and per week (0: no cap).
    pub max_marketing_per_day: u32,
    pub max_marketing_per_week: u32,
    /// `mail.global_control_percent`: the share of clients (0-100) held out
    /// of all marketing mail, to measure what marketing achieves.
    pub global_control_percent: f64,
    /// Configured webhooks and what is forwarded to them (`channels`).
    pub channels: ChannelSettings,
    /// `history.bought_together_days`: a client's orders this close pair
    /// their products in the product rankings.
    pub bought_together: Duration,
}

impl CoreSettings {
    /// Built from the configuration's sections by `CoreSettings::from_config`,
    /// which lives with the configuration: the core does not read it.
    pub fn new(
        history: &HistoryConfig,
        rules: &RulesConfig,
        teams: BTreeMap<String, String>,
        public_url: &str,
        max_marketing_per_day: u32,
        max_marketing_per_week: u32,
    ) -> Self {
        Self {
            session_gap: history.session_gap(),
            history_limits: history.limits(),
            max_emit_depth: rules.max_emit_depth,
            teams,
            rule_settings: serde_json::to_value(&rules.settings).unwrap_or(Value::Null),
            settings_view: values::from_json_map(&rules.settings),
            public_url: public_url.trim_end_matches('/').to_string(),
            max_marketing_per_day,
            max_marketing_per_week,
            global_control_percent: 0.0,
            channels: ChannelSettings::default(),
            bought_together: history.bought_together(),
        }
    }

    /// With `percent` of clients (0-100) in the global control group.
    pub fn with_global_control(mut self, percent: f64) -> Self {
        self.global_control_percent = percent;
        self
    }
}

/// The rules in force and the settings that shape history.
pub struct Core<'a> {
    pub engine: &'a RuleEngine,
    pub rules: &'a RuleSet,
    pub templates: &'a TemplateSet,
    pub settings: &'a CoreSettings,
}

impl Core<'_> {
    /// Fires the client's timers due by the event's time, folds the event into
    /// the history, then runs every rule whose triggers match. Rules see the
    /// client *after* the event; `now` is the event's time. Secondary events
    /// the rules emit are decided right after, for the same client.
    pub fn on_event(
        &self,
        state: &mut ClientState,
        event: &Envelope,
        counters: &mut Counters,
    ) -> Decision {
        let depth = event
            .context
            .get("nudge_depth")
            .and_then(Value::as_u64)
            .unwrap_or(0) as u32;
        let mut decision = self.advance(state, event.occurred_at, counters);
        state.apply_limited(
            event,
            self.settings.session_gap,
            &self.settings.history_limits,
        );
        let ty = event.event_type.as_str();
        if let Err(e) = self.count_engagement(state, event, counters) {
            decision.counter_failure = Some(e);
        }
        // Product rankings count every view, cart add and order, rule or not.
        if let Err(e) = crate::domain::products::count_event(
            counters,
            event,
            &mut state.stats.recent_buys,
            self.settings.bought_together,
        ) {
            decision.counter_failure.get_or_insert(e);
        }
        self.credit(state, event, &mut decision);
        self.forward_event(event, &mut decision);
        let mut matching = self.rules.matching(ty).peekable();
        if matching.peek().is_none() {
            return decision;
        }
        let trigger = Trigger {
            cause: event.id.as_str().to_string(),
            at: event.occurred_at,
            event_id: Some(event.id.clone()),
            depth,
        };
        let reads = self.rules.reads(ty);
        let mut inputs = self.inputs(
            values::event(event, &reads.event),
            state,
            &reads,
            trigger.at,
        );
        let mut emitted = Vec::new();
        for rule in matching {
            let (d, e) = self.run_rule(rule, &trigger, &mut inputs, state, counters);
            decision.extend(d);
            emitted.extend(e);
        }
        self.follow(emitted, state, counters, &mut decision);
        decision
    }

    /// Fires, in due order, every timer of this client due by `until`. Each
    /// runs the rule that set it with `now` at the timer's due time.
    pub fn advance(
        &self,
        state: &mut ClientState,
        until: DateTime<Utc>,
        counters: &mut Counters,
    ) -> Decision {
        let mut decision = Decision::default();
        while let Some(timer) = state.pop_due(until) {
            let cause = format!(
                "timer:{}:{}:{}:{}",
                timer.rule,
                timer.name,
                timer.due.timestamp(),
                state.client_id
            );
            let Some(rule) = self.rules.get(&timer.rule) else {
                decision.log.push(LogEntry {
                    client_id: state.client_id.clone(),
                    at: timer.due,
                    level: Level::Warning,
                    rule: Some(timer.rule.clone()),
                    event_id: None,
                    message: format!("timer `{}` dropped: its rule no longer exists", timer.name),
                });
                continue;
            };
            let mut data = timer.data.clone();
            data.insert("name".into(), json!(timer.name));
            let view = json!({
                "id": cause,
                "type": "timer",
                "client_id": state.client_id.as_str(),
                "occurred_at": timer.due.timestamp(),
                "data": data,
                "context": {},
            });
            let trigger = Trigger {
                cause,
                at: timer.due,
                event_id: None,
                depth: 0,
            };
            let mut inputs = self.inputs(values::from_json(&view), state, &rule.reads, trigger.at);
            let (d, emitted) = self.run_rule(rule, &trigger, &mut inputs, state, counters);
            decision.extend(d);
            self.follow(emitted, state, counters, &mut decision);
        }
        decision
    }

    /// Runs a scheduled rule for one client, as of the schedule's `slot`.
    pub fn sweep(
        &self,
        state: &mut ClientState,
        rule: &Rule,
        slot: DateTime<Utc>,
        counters: &mut Counters,
    ) -> Decision {
        let mut decision = self.advance(state, slot, counters);
        let cause = format!(
            "sweep:{}:{}:{}",
            rule.name,
            slot.timestamp(),
            state.client_id
        );
        let view = json!({
            "id": cause,
            "type": "sweep",
            "client_id": state.client_id.as_str(),
            "occurred_at": slot.timestamp(),
            "data": {"rule": rule.name},
            "context": {},
        });
        let trigger = Trigger {
            cause,
            at: slot,
            event_id: None,
            depth: 0,
        };
        let mut inputs = self.inputs(values::from_json(&view), state, &rule.reads, trigger.at);
        let (d, emitted) = self.run_rule(rule, &trigger, &mut inputs, state, counters);
        decision.extend(d);
        self.follow(emitted, state, counters, &mut decision);
        decision
    }

    /// What the rules of one trigger see: `event`, the client as it is now,
    /// `settings` and `now` (the trigger's time).
    fn inputs(
        &self,
        event: Dynamic,
        state: &ClientState,
        reads: &Reads,
        at: DateTime<Utc>,
    ) -> Inputs {
        Inputs::new(
            event,
            values::client(state, &reads.client),
            // Small, and read whole when read at all.
            match reads.settings {
                values::Needs::Nothing => Dynamic::UNIT,
                _ => self.settings.settings_view.clone(),
            },
            at.timestamp(),
        )
    }

    /// Decides the secondary events a trigger emitted, and keeps them to store.
    fn follow(
        &self,
        emitted: Vec<Envelope>,
        state: &mut ClientState,
        counters: &mut Counters,
        decision: &mut Decision,
    ) {
        for env in emitted {
            decision.events.push(env.clone());
            let d = self.on_event(state, &env, counters);
            decision.extend(d);
        }
    }

    /// Runs one rule and applies what it asked for to the state and the
    /// decision; returns the secondary events it emitted, still to decide.
    fn run_rule(
        &self,
        rule: &Rule,
        trigger: &Trigger,
        inputs: &mut Inputs,
        state: &mut ClientState,
        counters: &mut Counters,
    ) -> (Decision, Vec<Envelope>) {
        let mut decision = Decision::default();
        let mut emitted = Vec::new();
        let client_id = state.client_id.clone();
        let log = |level, message: String| LogEntry {
            client_id: client_id.clone(),
            at: trigger.at,
            level,
            rule: Some(rule.name.clone()),
            event_id: trigger.event_id.clone(),
            message,
        };
        let mut ctx = RunContext::new(&rule.name, state.client_id.as_str(), &trigger.cause);
        ctx.now = trigger.at;
        ctx.facts = state.facts.get(&rule.name).cloned().unwrap_or_default();
        ctx.timers = state
            .timers
            .iter()
            .filter(|t| t.rule == rule.name)
            .map(|t| t.name.clone())
            .collect();
        ctx.variants = state.exposures.variants.clone();
        ctx.client_counters = std::mem::take(&mut state.counters);
        ctx.counters = std::mem::take(counters);
        let (ctx, result) = self.engine.run(rule, inputs, ctx);
        let ctx = match result {
            Ok(()) => ctx,
            Err(e) => {
                let mut ctx = ctx;
                // What the failed run changed is dropped, but the lent state comes back.
                state.counters = ctx.client_counters;
                *counters = std::mem::take(&mut ctx.counters);
                decision.counter_failure = ctx.counter_failure;
                tracing::warn!(rule = %rule.name, cause = %trigger.cause, line = e.line, "rule failed: {}", e.message);
                decision.log.push(log(
                    Level::Error,
                    format!("{e} (trigger {})", trigger.cause),
                ));
                for note in ctx.notes {
                    decision.log.push(log(Level::Warning, note));
                }
                decision.runs.push((rule.name.clone(), false));
                return (decision, emitted);
            }
        };
        let RunContext {
            requests,
            facts,
            client_counters,
            counters: lent,
            counter_failure,
            notes,
            variants,
            exposed,
            ..
        } = ctx;
        // Caps the run reached (rules.max_*): its excess was dropped.
        for note in notes {
            decision.log.push(log(Level::Warning, note));
        }
        state.counters = client_counters;
        *counters = lent;
        decision.counter_failure = counter_failure;
        decision.runs.push((rule.name.clone(), true));
        if !exposed.is_empty() {
            state.exposures.keep_variants(variants);
            self.expose(rule, trigger, state, exposed, &mut decision);
        }
        if facts.is_empty() {
            state.facts.remove(&rule.name);
        } else {
            state.facts.insert(rule.name.clone(), facts);
        }
        let mut ordinal = 0;
        let mut next_key = || {
            ordinal += 1;
            effect_key(&rule.name, &trigger.cause, ordinal - 1)
        };
        let effect = |key: String, kind: EffectKind, decision: &mut Decision| {
            decision.log.push(log(Level::Notice, describe(&kind)));
            decision.effects.push(Effect {
                key: key.clone(),
                rule: rule.name.clone(),
                client_id: client_id.clone(),
                cause: trigger.cause.clone(),
                at: trigger.at,
                kind,
            });
        };
        // An emit stopped at the depth limit makes the run count as failed
        // (in /metrics, /api/rules and toward quarantine): a cycle is a bug.
        let mut stopped = false;
        for req in requests {
            match req {
                Request::Mail { template, vars } => {
                    match self.mail(&template, vars, state, trigger.at) {
                        Ok(_)
                            if self.templates.kind(&template) == Some(MailKind::Marketing)
                                && self.held_out(state) =>
                        {
                            decision.log.push(log(
                                Level::Notice,
                                format!(
                                    "marketing mail `{template}` held out: the client is in the \
                                     global control group (mail.global_control_percent)"
                                ),
                            ));
                            self.hold_out(rule, trigger, state, &mut decision);
                        }
                        Ok(kind) => {
                            let key = next_key();
                            let st = &mut state.stats;
                            st.mails += 1;
                            st.mailed_at.insert(template.clone(), trigger.at);
                            if self.templates.kind(&template) == Some(MailKind::Marketing) {
                                st.marketing_sent
                                    .retain(|t| trigger.at - *t < Duration::days(7));
                                st.marketing_sent.push(trigger.at);
                            }
                            st.recent_mails.push(SentMail {
                                key: key.clone(),
                                rule: rule.name.clone(),
                                template,
                                at: trigger.at,
                            });
                            let excess = st.recent_mails.len().saturating_sub(RECENT_MAILS);
                            st.recent_mails.drain(..excess);
                            self.mailed(rule, trigger, state, &mut decision);
                            effect(key, kind, &mut decision);
                        }
                        Err((level, why)) => decision.log.push(log(level, why)),
                    }
                }
                Request::After {
                    delay_secs,
                    name,
                    data,
                } => {
                    // `after()` bounds the delay; checked again here because
                    // chrono panics past its range.
                    let Some(due) = Duration::try_seconds(delay_secs)
                        .and_then(|d| trigger.at.checked_add_signed(d))
                    else {
                        decision.log.push(log(
                            Level::Error,
                            format!("timer `{name}` not set: a delay of {delay_secs} seconds is out of range"),
                        ));
                        continue;
                    };
                    state.set_timer(Timer {
                        rule: rule.name.clone(),
                        name,
                        due,
                        data,
                    })
                }
                Request::Cancel { name } => state.cancel_timer(&rule.name, &name),
                Request::Emit { event_type, data } => {
                    if trigger.depth >= self.settings.max_emit_depth {
                        stopped = true;
                        decision.log.push(log(
                            Level::Error,
                            format!(
                                "emit of `{event_type}` stopped: {} secondary events deep \
                                 (limit rules.max_emit_depth; a rule emitting in a cycle?)",
                                trigger.depth
                            ),
                        ));
                        continue;
                    }
                    let key = next_key();
                    match self.secondary(&rule.name, trigger, &client_id, &event_type, data, &key) {
                        Ok(env) => {
                            let event = serde_json::to_value(&env).unwrap_or(Value::Null);
                            effect(key, EffectKind::Emit { event_type, event }, &mut decision);
                            emitted.push(env);
                        }
                        Err(why) => decision.log.push(log(Level::Warning, why)),
                    }
                }
                Request::Webhook { name, payload } => {
                    match self.webhook(&rule.name, name, payload, trigger.at) {
                        Ok(kind) => effect(next_key(), kind, &mut decision),
                        Err((level, why)) => decision.log.push(log(level, why)),
                    }
                }
                Request::Sms { template, vars } => {
                    match self.sms(&template, vars, state, trigger.at) {
                        Ok(kind) => effect(next_key(), kind, &mut decision),
                        Err((level, why)) => decision.log.push(log(level, why)),
                    }
                }
                Request::Task { team, title, data } => match self.settings.teams.get(&team) {
                    Some(to) => {
                        effect(
                            next_key(),
                            EffectKind::Task {
                                team,
                                title,
                                to: to.clone(),
                                data,
                            },
                            &mut decision,
                        );
                    }
                    None => decision.log.push(log(
                        Level::Warning,
                        format!("task for team `{team}` not made: no such team in `teams`"),
                    )),
                },
            }
        }
        if stopped && let Some(run) = decision.runs.last_mut() {
            run.1 = false;
        }
        self.forward_tasks(&mut decision);
        (decision, emitted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::rules::loader::RuleLoader;
    use crate::core::templates::TemplateLoader;
    use crate::domain::event::ClientId;
    use std::sync::Arc;

    fn fixture(rule: &str) -> (Arc<RuleEngine>, RuleSet, TemplateSet, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let rules = dir.path().join("rules");
        let tpl = dir.path().join("templates");
        std::fs::create_dir_all(&rules).unwrap();
        std::fs::create_dir_all(&tpl).unwrap();
        std::fs::write(rules.join("r.rhai"), rule).unwrap();
        std::fs::write(
            tpl.join("t.txt"),
            "---\nsubject: Hi\nkind: service\n---\nHi {{ first_name }}",
        )
        .unwrap();
        std::fs::write(tpl.join("t.html"), "<p>Hi</p>").unwrap();
        std::fs::write(
            tpl.join("m.txt"),
            "---\nsubject: Offer\nkind: marketing\n---\nBuy",
        )
        .unwrap();
        std::fs::write(tpl.join("m.html"), "<p>Buy</p>").unwrap();
        let engine = Arc::new(RuleEngine::new(&RulesConfig::default()));
        let set = RuleLoader::new(engine.clone(), rules).load();
        assert!(set.errors.is_empty(), "{:?}", set.errors);
        let templates = TemplateLoader::new(tpl).load();
        (engine, set, templates, dir)
    }

    fn core<'a>(
        engine: &'a RuleEngine,
        rules: &'a RuleSet,
        templates: &'a TemplateSet,
    ) -> Core<'a> {
        Core {
            engine,
            rules,
            templates,
            settings: Box::leak(Box::new(CoreSettings::default())),
        }
    }

    fn registered(id: &str) -> Envelope {
        Envelope::from_value(
            json!({"id": id, "type": "client_registered", "client_id": "c1",
            "occurred_at": "2026-11-01T10:00:00Z",
            "data": {"email": "ana@example.com", "first_name": "Ana"}}),
        )
        .unwrap()
    }

    #[test]
    fn a_rule_sees_the_updated_client_and_queues_a_keyed_mail() {
        let (engine, rules, templates, _d) = fixture(
            "const ON = [\"client_registered\"];\n\
             if client.first_name == \"Ana\" && now == event.occurred_at { mail(\"t\", #{ extra: 1 }); }",
        );
        let mut state = ClientState::new(ClientId::parse("c1").unwrap());
        let d = core(&engine, &rules, &templates).on_event(
            &mut state,
            &registered("e1"),
            &mut Counters::default(),
        );
        assert_eq!(d.effects.len(), 1);
        let e = &d.effects[0];
        assert_eq!(e.key, effect_key("r", "e1", 0));
        let EffectKind::Mail { template, to, vars } = &e.kind else {
            panic!("a mail")
        };
        assert_eq!((template.as_str(), to.as_str()), ("t", "ana@example.com"));
        assert_eq!(vars["first_name"], "Ana");
        assert_eq!(vars["extra"], 1);
        assert_eq!(d.runs, vec![("r".to_string(), true)]);
    }

    #[test]
    fn failures_are_logged_not_raised() {
        let (engine, rules, templates, _d) =
            fixture("const ON = [\"client_registered\"];\nmail(\"missing\");\nthrow \"boom\";");
        let mut state = ClientState::new(ClientId::parse("c1").unwrap());
        let d = core(&engine, &rules, &templates).on_event(
            &mut state,
            &registered("e1"),
            &mut Counters::default(),
        );
        assert!(d.effects.is_empty());
        assert_eq!(d.runs, vec![("r".to_string(), false)]);
        assert!(d.log[0].message.contains("boom"), "{:?}", d.log);
        assert_eq!(
            state.stats.events["client_registered"], 1,
            "history still applied"
        );
    }

    fn at(id: &str, ty: &str, t: &str) -> Envelope {
        Envelope::from_value(
            json!({"id": id, "type": ty, "client_id": "c1", "occurred_at": t,
            "data": {"email": "ana@example.com"}}),
        )
        .unwrap()
    }

    #[test]
    fn timers_fire_in_event_time_before_later_events_and_can_be_cancelled() {
        let (engine, rules, templates, _d) = fixture(
            "const ON = [\"page_viewed\", \"cart_item_added\", \"client_registered\"];\n\
             if event.type == \"page_viewed\" { after(minutes(15), \"check\", #{ page: 1 }); }\n\
             if event.type == \"cart_item_added\" { cancel(\"check\"); }\n\
             if event.type == \"timer\" && event.data.name == \"check\" && event.data.page == 1 {\n\
                 if now != event.occurred_at { throw \"now is the due time\"; }\n\
                 mail(\"t\");\n\
             }",
        );
        let core = core(&engine, &rules, &templates);
        let mut state = ClientState::new(ClientId::parse("c1").unwrap());
        core.on_event(
            &mut state,
            &at("r", "client_registered", "2026-11-01T09:00:00Z"),
            &mut Counters::default(),
        );
        core.on_event(
            &mut state,
            &at("p1", "page_viewed", "2026-11-01T10:00:00Z"),
            &mut Counters::default(),
        );
        assert_eq!(
            state.next_due().unwrap().to_rfc3339(),
            "2026-11-01T10:15:00+00:00"
        );
        // An event after the due time fires the timer first, at its due time.
        let d = core.on_event(
            &mut state,
            &at("x", "login_succeeded", "2026-11-01T11:00:00Z"),
            &mut Counters::default(),
        );
        assert_eq!(d.effects.len(), 1, "{:?}", d.log);
        assert_eq!(d.effects[0].at.to_rfc3339(), "2026-11-01T10:15:00+00:00");
        assert!(d.effects[0].cause.starts_with("timer:r:check:"));
        assert!(state.timers.is_empty());

        // Cancelled by a cart add: nothing fires.
        core.on_event(
            &mut state,
            &at("p2", "page_viewed", "2026-11-02T10:00:00Z"),
            &mut Counters::default(),
        );
        core.on_event(
            &mut state,
            &at("c", "cart_item_added", "2026-11-02T10:05:00Z"),
            &mut Counters::default(),
        );
        let d = core.advance(
            &mut state,
            "2026-11-03T00:00:00Z".parse().unwrap(),
            &mut Counters::default(),
        );
        assert!(d.effects.is_empty());
        assert_eq!(
            state.stats.mailed_at["t"].to_rfc3339(),
            "2026-11-01T10:15:00+00:00"
        );
    }

    #[test]
    fn marketing_mail_needs_consent_and_no_unsubscribe() {
        let (engine, rules, templates, _d) =
            fixture("const ON = [\"client_registered\", \"login_succeeded\"];\nmail(\"m\");");
        let core = core(&engine, &rules, &templates);
        let mut state = ClientState::new(ClientId::parse("c1").unwrap());
        let d = core.on_event(&mut state, &registered("e1"), &mut Counters::default());
        assert!(d.effects.is_empty());
        assert_eq!(d.log[0].level, Level::Notice);
        assert!(
            d.log[0].message.contains("marketing consent"),
            "{:?}",
            d.log
        );

        let consent = Envelope::from_value(json!({"id": "e2", "type": "client_updated",
            "client_id": "c1", "occurred_at": "2026-11-01T11:00:00Z",
            "data": {"marketing_consent": true}}))
        .unwrap();
        core.on_event(&mut state, &consent, &mut Counters::default());
        let d = core.on_event(
            &mut state,
            &at("e3", "login_succeeded", "2026-11-01T12:00:00Z"),
            &mut Counters::default(),
        );
        assert_eq!(d.effects.len(), 1);

        core.on_event(
            &mut state,
            &at("e4", "unsubscribed", "2026-11-01T13:00:00Z"),
            &mut Counters::default(),
        );
        let d = core.on_event(
            &mut state,
            &at("e5", "login_succeeded", "2026-11-01T14:00:00Z"),
            &mut Counters::default(),
        );
        assert!(d.effects.is_empty());
        assert!(d.log[0].message.contains("unsubscribed"), "{:?}", d.log);
    }

    #[test]
    fn an_emit_cycle_is_stopped_at_the_depth_limit_and_reported() {
        let (engine, rules, templates, _d) =
            fixture("const ON = [\"ping\"];\nemit(\"ping\", #{ n: 1 });");
        let core = core(&engine, &rules, &templates);
        let mut state = ClientState::new(ClientId::parse("c1").unwrap());
        let d = core.on_event(
            &mut state,
            &at("p", "ping", "2026-11-01T10:00:00Z"),
            &mut Counters::default(),
        );
        let limit = CoreSettings::default().max_emit_depth as usize;
        assert_eq!(d.events.len(), limit);
        assert_eq!(d.effects.len(), limit);
        let e = &d.events[0];
        assert!(e.id.as_str().starts_with("nudge-"));
        assert_eq!(e.data["caused_by"], "p");
        assert_eq!(d.events[1].data["caused_by"], e.id.as_str());
        let stop = d
            .log
            .iter()
            .find(|l| l.level == Level::Error)
            .expect("reported");
        assert!(stop.message.contains("secondary events deep"), "{stop:?}");
        assert_eq!(
            d.runs.iter().filter(|(_, ok)| !ok).count(),
            1,
            "the stopped run counts as failed: {:?}",
            d.runs
        );
        // Deterministic: the same event gives the same secondary ids.
        let mut again = ClientState::new(ClientId::parse("c1").unwrap());
        let d2 = core.on_event(
            &mut again,
            &at("p", "ping", "2026-11-01T10:00:00Z"),
            &mut Counters::default(),
        );
        assert_eq!(d2.events[0].id, e.id);
    }

    #[test]
    fn shared_counters_are_read_and_changed_through_the_batch() {
        use crate::domain::counters::{CounterKey, MemorySource, Stored};
        let (engine, rules, templates, _d) = fixture(
            "const ON = [\"order_placed\"];\n\
             if add_distinct(\"big\", \"quarter\", client.id) && distinct(\"big\", \"quarter\") == 3 {\n\
                 mail(\"t\");\n\
             }\n\
             add(\"spend\", \"all\", 10);\n\
             if client_add(\"orders\", \"month\", 1) == 2.0 { mail(\"t\"); }",
        );
        let core = core(&engine, &rules, &templates);
        let key = CounterKey {
            name: "big".into(),
            period: "2026-Q4".into(),
        };
        let mut src = MemorySource::default();
        src.values.insert(
            key.clone(),
            Stored {
                value: 2.0,
                version: 5,
            },
        );
        src.members.insert((key.clone(), "other".into()));
        let mut counters = Counters::new(Box::new(src), chrono_tz::Tz::UTC);
        let mut state = ClientState::new(ClientId::parse("c1").unwrap());
        state.profile.email = Some("ana@example.com".into());
        let d = core.on_event(
            &mut state,
            &at("o1", "order_placed", "2026-11-01T10:00:00Z"),
            &mut counters,
        );
        assert_eq!(d.effects.len(), 1, "third distinct client: {:?}", d.log);
        let d = core.on_event(
            &mut state,
            &at("o2", "order_placed", "2026-11-02T10:00:00Z"),
            &mut counters,
        );
        assert_eq!(
            d.effects.len(),
            1,
            "second order this month, not a new distinct client"
        );
        let (writes, members) = counters.writes();
        let big = writes.iter().find(|w| w.key == key).unwrap();
        assert_eq!((big.value, big.version), (3.0, 5));
        assert_eq!(
            writes.iter().find(|w| w.key.name == "spend").unwrap().value,
            20.0
        );
        assert_eq!(members.len(), 1);
        assert_eq!(state.counters["orders/2026-11"], 2.0);
    }

    #[test]
    fn opens_and_clicks_are_tied_to_their_mail_and_counted_per_rule_and_template() {
        use crate::domain::counters::{CounterKey, MemorySource};
        let (engine, rules, templates, _d) =
            fixture("const ON = [\"client_registered\"];\nmail(\"t\");");
        let core = core(&engine, &rules, &templates);
        let mut counters = Counters::new(Box::new(MemorySource::default()), chrono_tz::Tz::UTC);
        let mut state = ClientState::new(ClientId::parse("c1").unwrap());
        let d = core.on_event(&mut state, &registered("e1"), &mut counters);
        let key = d.effects[0].key.clone();
        let opened = |id: &str, mid: String| {
            Envelope::from_value(json!({"id": id, "type": "email_opened", "client_id": "c1",
                "occurred_at": "2026-11-01T12:00:00Z", "data": {"message_id": mid}}))
            .unwrap()
        };
        core.on_event(
            &mut state,
            &opened("o1", format!("<{key}.nudge@shop.test>")),
            &mut counters,
        );
        core.on_event(
            &mut state,
            &opened("o2", format!("{key}.nudge@shop.test")),
            &mut counters,
        );
        core.on_event(
            &mut state,
            &opened("o3", "<someone-else@elsewhere>".into()),
            &mut counters,
        );
        assert_eq!(state.stats.opens, 2);
        let k = CounterKey {
            name: "mail_opened:r:t".into(),
            period: "all".into(),
        };
        assert_eq!(counters.get(&k).unwrap(), 2.0);
    }

    #[test]
    fn rule_mistakes_fail_the_run_and_caps_are_logged_never_a_panic() {
        let (engine, rules, templates, _d) = fixture(
            "const ON = [\"client_registered\", \"login_succeeded\"];\n\
             if event.type == \"client_registered\" { after(days(200000000), \"x\"); }\n\
             else { for i in 0..50 { mail(\"t\"); } }",
        );
        let core = core(&engine, &rules, &templates);
        let mut state = ClientState::new(ClientId::parse("c1").unwrap());
        let d = core.on_event(&mut state, &registered("e1"), &mut Counters::default());
        assert_eq!(d.runs, vec![("r".to_string(), false)]);
        assert!(d.log[0].message.contains("max_delay_days"), "{:?}", d.log);
        assert!(state.timers.is_empty());
        let d = core.on_event(
            &mut state,
            &at("e2", "login_succeeded", "2026-11-01T11:00:00Z"),
            &mut Counters::default(),
        );
        let cap = RulesConfig::default().max_mails_per_run.get();
        assert_eq!(d.effects.len(), cap);
        let note = d
            .log
            .iter()
            .find(|l| l.level == Level::Warning)
            .expect("noted");
        assert!(note.message.contains("max_mails_per_run"), "{note:?}");
        assert_eq!(d.runs, vec![("r".to_string(), true)]);
    }

    #[test]
    fn variants_stick_exposures_are_recorded_and_goals_convert_in_event_time() {
        let (engine, rules, templates, _d) = fixture(
            "const ON = [\"client_registered\", \"login_succeeded\"];\n\
             const GOAL = #{ event: \"order_placed\", within_days: 7, min_total: 10 };\n\
             let v = variant(\"t\", if event.type == \"client_registered\" \
                 { #{mail: 50, control: 50} } else { #{control: 1} });\n\
             if v == \"mail\" { mail(\"t\"); }",
        );
        assert_eq!(
            rules.get("r").unwrap().goal.as_ref().unwrap().within_days,
            7
        );
        let core = core(&engine, &rules, &templates);
        let (mut mailed, mut control) = (0, 0);
        for i in 0..200 {
            let id = format!("c{i}");
            let mut state = ClientState::new(ClientId::parse(&id).unwrap());
            let ev = |eid: &str, ty: &str, t: &str, data: Value| {
                Envelope::from_value(json!({"id": format!("{eid}-{i}"), "type": ty,
                    "client_id": id, "occurred_at": t, "data": data}))
                .unwrap()
            };
            let mut counters = Counters::default();
            let d = core.on_event(
                &mut state,
                &ev(
                    "r",
                    "client_registered",
                    "2026-11-01T10:00:00Z",
                    json!({"email": "a@example.com"}),
                ),
                &mut counters,
            );
            let want = crate::domain::experiments::choose(
                &[("control".into(), 50.0), ("mail".into(), 50.0)],
                crate::domain::experiments::bucket("t", &id),
            )
            .unwrap()
            .to_string();
            assert_eq!(d.exposures.last().unwrap().exposure.variant, want);
            assert_eq!(d.effects.len(), usize::from(want == "mail"));
            if want == "mail" {
                mailed += 1
            } else {
                control += 1
            }
            // Weights changed to control only: the variant stays.
            core.on_event(
                &mut state,
                &ev("l", "login_succeeded", "2026-11-02T10:00:00Z", json!({})),
                &mut counters,
            );
            assert_eq!(state.exposures.variants["t"], want);
            assert_eq!(state.exposures.rows.len(), 1);
            // Too small, then in the window, then a second: one conversion.
            for (eid, t, total) in [
                ("o1", "2026-11-03T10:00:00Z", 5.0),
                ("o2", "2026-11-04T10:00:00Z", 25.0),
                ("o3", "2026-11-05T10:00:00Z", 40.0),
            ] {
                core.on_event(
                    &mut state,
                    &ev(
                        eid,
                        "order_placed",
                        t,
                        json!({"total": total, "currency": "EUR"}),
                    ),
                    &mut counters,
                );
            }
            let row = &state.exposures.rows[0];
            assert_eq!(row.converted.as_ref().unwrap().revenue, 25.0);
            // The login ran the rule again: still `mail`, so a second mail.
            assert_eq!(row.mails, 2 * u32::from(want == "mail"));
        }
        assert!(mailed > 70 && control > 70, "{mailed} {control}");
    }

    #[test]
    fn the_global_control_group_gets_no_marketing_mail_and_is_reported() {
        let (engine, rules, templates, _d) =
            fixture("const ON = [\"client_updated\"];\nmail(\"m\");");
        let settings = Box::leak(Box::new(CoreSettings::default().with_global_control(30.0)));
        let core = Core {
            engine: &engine,
            rules: &rules,
            templates: &templates,
            settings,
        };
        let mut held = 0;
        for i in 0..300 {
            let id = format!("c{i}");
            let mut state = ClientState::new(ClientId::parse(&id).unwrap());
            let consent = Envelope::from_value(json!({"id": format!("u{i}"),
                "type": "client_updated", "client_id": id, "occurred_at": "2026-11-01T11:00:00Z",
                "data": {"email": "a@example.com", "marketing_consent": true}}))
            .unwrap();
            let d = core.on_event(&mut state, &consent, &mut Counters::default());
            let out = crate::domain::experiments::in_global_control(&id, 30.0);
            assert_eq!(d.effects.is_empty(), out);
            let row = &d.exposures[0].exposure;
            assert_eq!((row.held_out, row.mails), (out, u32::from(!out)));
            if out {
                held += 1;
                assert!(
                    d.log.iter().any(|l| l.message.contains("global control")),
                    "{:?}",
                    d.log
                );
            }
        }
        assert!((60..120).contains(&held), "{held}");
    }
}
