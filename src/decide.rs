//! The decision core, free of I/O: given a client's history, an event and the
//! rules in force, it folds the event into the history and returns the effects
//! and the process-log lines. The daemon, and every tool that must decide as
//! the daemon would, call this one function.

use crate::effects::{Effect, EffectKind, effect_key};
use crate::event::Envelope;
use crate::history::ClientState;
use crate::rules::{Request, RuleEngine, loader::RuleSet};
use crate::store::{Level, LogEntry};
use crate::templates::TemplateSet;
use chrono::{DateTime, Utc};
use rhai::Dynamic;
use serde_json::{Map, Value, json};

/// What one event led to.
#[derive(Debug, Default)]
pub struct Decision {
    pub effects: Vec<Effect>,
    pub log: Vec<LogEntry>,
    /// Rules that ran, with whether they failed: for metrics and reports.
    pub runs: Vec<(String, bool)>,
}

/// Folds `event` into `state`, then runs every rule whose triggers match.
/// Rules see the client *after* the event; `now` is the event's time.
pub fn decide(
    engine: &RuleEngine,
    rules: &RuleSet,
    templates: &TemplateSet,
    state: &mut ClientState,
    event: &Envelope,
) -> Decision {
    state.apply(event);
    let mut decision = Decision::default();
    let ty = event.event_type.as_str();
    let mut matching = rules.matching(ty).peekable();
    if matching.peek().is_none() {
        return decision;
    }
    let event_view = rhai_value(event_view(event));
    let client_view = rhai_value(client_view(state));
    let now = event.occurred_at.timestamp();

    for rule in matching {
        let log = |level, message: String| LogEntry {
            client_id: state.client_id.clone(),
            at: event.occurred_at,
            level,
            rule: Some(rule.name.clone()),
            event_id: Some(event.id.clone()),
            message,
        };
        match engine.run(rule, event_view.clone(), client_view.clone(), now) {
            Err(e) => {
                tracing::warn!(rule = %rule.name, event_id = %event.id, line = e.line, "rule failed: {}", e.message);
                decision.log.push(log(Level::Error, e.to_string()));
                decision.runs.push((rule.name.clone(), false));
            }
            Ok(requests) => {
                decision.runs.push((rule.name.clone(), true));
                for (ordinal, req) in requests.into_iter().enumerate() {
                    match to_effect(req, state, templates) {
                        Ok(kind) => {
                            decision.log.push(log(Level::Notice, describe(&kind)));
                            decision.effects.push(Effect {
                                key: effect_key(&rule.name, &event.id, ordinal),
                                rule: rule.name.clone(),
                                client_id: state.client_id.clone(),
                                event_id: event.id.clone(),
                                at: event.occurred_at,
                                kind,
                            });
                        }
                        Err(why) => decision.log.push(log(Level::Warning, why)),
                    }
                }
            }
        }
    }
    decision
}

fn describe(kind: &EffectKind) -> String {
    match kind {
        EffectKind::Mail { template, to, .. } => format!("mail `{template}` queued to {to}"),
    }
}

/// Checks a request against what it needs now, so a mistake shows in the
/// process log at decision time instead of as a failed send later.
fn to_effect(
    req: Request,
    state: &ClientState,
    templates: &TemplateSet,
) -> Result<EffectKind, String> {
    match req {
        Request::Mail { template, vars } => {
            if !templates.contains(&template) {
                return Err(format!("mail `{template}` not queued: no such template"));
            }
            let Some(to) = state.profile.email.clone() else {
                return Err(format!(
                    "mail `{template}` not queued: the client has no e-mail address"
                ));
            };
            let mut all = mail_defaults(state);
            all.extend(vars);
            Ok(EffectKind::Mail {
                template,
                to,
                vars: all,
            })
        }
    }
}

/// Variables every mail template can use, before the rule's own.
fn mail_defaults(state: &ClientState) -> Map<String, Value> {
    let p = &state.profile;
    let mut m = Map::new();
    m.insert("client_id".into(), json!(state.client_id.as_str()));
    m.insert("email".into(), json!(p.email));
    m.insert("first_name".into(), json!(p.first_name));
    m.insert("last_name".into(), json!(p.last_name));
    m.insert("acquisition_channel".into(), json!(p.acquisition_channel));
    m.insert("promo_code".into(), json!(p.promo_code));
    m
}

fn secs(t: Option<DateTime<Utc>>) -> Value {
    t.map_or(Value::Null, |t| json!(t.timestamp()))
}

/// The event as rules see it: times in Unix seconds, like `now`.
pub fn event_view(e: &Envelope) -> Value {
    json!({
        "id": e.id.as_str(),
        "type": e.event_type.as_str(),
        "client_id": e.client_id.as_str(),
        "occurred_at": e.occurred_at.timestamp(),
        "data": e.data,
        "context": e.context,
    })
}

/// The client as rules see it: the profile flat, counters under `stats`,
/// times in Unix seconds (absent ones are `()`).
pub fn client_view(s: &ClientState) -> Value {
    let p = &s.profile;
    let st = &s.stats;
    let last_at: Map<String, Value> = st
        .last_at
        .iter()
        .map(|(k, v)| (k.clone(), json!(v.timestamp())))
        .collect();
    json!({
        "id": s.client_id.as_str(),
        "email": p.email,
        "first_name": p.first_name,
        "last_name": p.last_name,
        "acquisition_channel": p.acquisition_channel,
        "promo_code": p.promo_code,
        "partner_id": p.partner_id,
        "locale": p.locale,
        "timezone": p.timezone,
        "marketing_consent": p.marketing_consent,
        "unsubscribed": p.unsubscribed,
        "registered_at": secs(p.registered_at),
        "first_seen": secs(p.first_seen),
        "last_seen": secs(p.last_seen),
        "stats": {
            "events": st.events,
            "last_at": last_at,
            "product_views": st.product_views,
            "cart_adds": st.cart_adds,
            "orders": st.orders,
            "orders_cancelled": st.orders_cancelled,
            "spend": st.spend,
            "mails": st.mails,
        },
    })
}

fn rhai_value(v: Value) -> Dynamic {
    // Plain JSON always converts; a failure would be a bug in the views above.
    rhai::serde::to_dynamic(v).unwrap_or(Dynamic::UNIT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RulesConfig;
    use crate::event::ClientId;
    use crate::rules::loader::RuleLoader;
    use crate::templates::TemplateLoader;
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
            "---\nsubject: Hi\n---\nHi {{ first_name }}",
        )
        .unwrap();
        std::fs::write(tpl.join("t.html"), "<p>Hi</p>").unwrap();
        let engine = Arc::new(RuleEngine::new(&RulesConfig::default()));
        let set = RuleLoader::new(engine.clone(), rules).load();
        assert!(set.errors.is_empty(), "{:?}", set.errors);
        let templates = TemplateLoader::new(tpl).load();
        (engine, set, templates, dir)
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
        let d = decide(&engine, &rules, &templates, &mut state, &registered("e1"));
        assert_eq!(d.effects.len(), 1);
        let e = &d.effects[0];
        assert_eq!(e.key, effect_key("r", &registered("e1").id, 0));
        let EffectKind::Mail { template, to, vars } = &e.kind;
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
        let d = decide(&engine, &rules, &templates, &mut state, &registered("e1"));
        assert!(d.effects.is_empty());
        assert_eq!(d.runs, vec![("r".to_string(), false)]);
        assert!(d.log[0].message.contains("boom"), "{:?}", d.log);
        assert_eq!(
            state.stats.events["client_registered"], 1,
            "history still applied"
        );
    }
}
