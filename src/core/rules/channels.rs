//! The rule functions of the channels beyond mail: `webhook(name, payload)`
//! posts to another system, `sms(template)` texts the client. Like every
//! rule function they only record a [`Request`]; the decision core checks
//! it (a configured webhook, consent, a number) and makes the effect.

use super::api::{Request, push, to_json, to_json_map};
use super::limits::{check_data, check_name, json_bytes, refuse};
use rhai::{Dynamic, Engine, Map as RhaiMap};
use serde_json::Map;

pub(super) fn register(engine: &mut Engine) {
    engine.register_fn("webhook", |name: &str, payload: Dynamic| {
        check_name("a webhook name", name)?;
        let payload = to_json(payload)?;
        // Kept once, in the outbox, like a mail's data.
        let max = super::api::with_ctx(|ctx| ctx.limits.max_effect_bytes)?;
        let n = json_bytes(&payload);
        if n > max {
            return refuse(format!(
                "webhook(): its payload is {n} bytes of JSON, over the limit of {max} \
                 (rules.max_string_bytes)"
            ));
        }
        push(Request::Webhook {
            name: name.to_string(),
            payload,
        })
    });
    engine.register_fn("sms", |template: &str| {
        check_name("a template name", template)?;
        push(Request::Sms {
            template: template.to_string(),
            vars: Map::new(),
        })
    });
    engine.register_fn("sms", |template: &str, vars: RhaiMap| {
        check_name("a template name", template)?;
        push(Request::Sms {
            template: template.to_string(),
            vars: check_data("sms", to_json_map(vars)?)?,
        })
    });
}

#[cfg(test)]
mod tests {
    use super::super::api::{RunContext, collect, register as register_all};
    use super::*;

    #[test]
    fn webhook_and_sms_record_requests_within_their_caps() {
        let mut engine = Engine::new();
        register_all(&mut engine);
        let (res, ctx) = collect(RunContext::new("r", "c", "e"), || {
            engine.run(
                r#"webhook("crm", #{ order: 7, tags: ["vip"] });
                   sms("reminder", #{ code: "X" });
                   for i in 0..100 { webhook("crm", i); sms("reminder"); }"#,
            )
        });
        res.unwrap().unwrap();
        assert_eq!(
            ctx.requests[0],
            Request::Webhook {
                name: "crm".into(),
                payload: serde_json::json!({"order": 7, "tags": ["vip"]}),
            }
        );
        let l = super::super::RunLimits::default();
        let count = |f: fn(&Request) -> bool| ctx.requests.iter().filter(|r| f(r)).count();
        assert_eq!(count(|r| matches!(r, Request::Webhook { .. })), l.max_emits);
        assert_eq!(count(|r| matches!(r, Request::Sms { .. })), l.max_mails);
        assert_eq!(ctx.notes.len(), 2, "{:?}", ctx.notes);
        let (res, _) = collect(RunContext::new("r", "c", "e"), || {
            engine.run(r#"webhook("", #{});"#)
        });
        assert!(
            res.unwrap()
                .unwrap_err()
                .to_string()
                .contains("webhook name")
        );
    }
}
