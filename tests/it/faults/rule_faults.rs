//! Rules that run away, in a running daemon: two rules emitting each other's
//! events forever are stopped at `rules.max_emit_depth`; a rule building a
//! huge string or a huge array is stopped at its limit. Each is reported
//! with the rule and the event, counted in /metrics and /api/rules, and the
//! other rules go on. (An endless loop: `reload.rs`; quarantine: `faults.rs`.)

use crate::helpers::{Backend, TestEnv, ago, event, eventually, registered_at};
use nudge::domain::event::ClientId;
use nudge::store::{History, Outbox, Staff};
use serde_json::{Value, json};
use std::time::Duration;

fn metric(text: &str, name: &str, rule: &str) -> u64 {
    let prefix = format!("{name}{{rule=\"{rule}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("{name} of {rule} in /metrics"))
        .parse()
        .unwrap()
}

async fn runaway_rules_are_stopped_reported_and_counted_and_the_others_go_on(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let rules = env.rules_dir();
    std::fs::write(
        rules.join("ping.rhai"),
        "const ON = [\"ping\"];\nemit(\"pong\", #{ n: 1 });\n",
    )
    .unwrap();
    std::fs::write(
        rules.join("pong.rhai"),
        "const ON = [\"pong\"];\nemit(\"ping\", #{ n: 1 });\n",
    )
    .unwrap();
    std::fs::write(
        rules.join("huge_string.rhai"),
        "const ON = [\"client_registered\"];\nlet s = \"x\";\nloop { s += s; }\n",
    )
    .unwrap();
    std::fs::write(
        rules.join("huge_array.rhai"),
        "const ON = [\"client_registered\"];\nlet a = [];\nloop { a.push(a.len()); }\n",
    )
    .unwrap();
    let depth = env.config.rules.max_emit_depth as u64;
    let app = env.start().await;

    app.publish(&event("p1", "ping", "cy", &ago(600), json!({}), json!({})))
        .await;
    app.publish(&registered_at("r1", "ana", &ago(500))).await;
    // The shop's two events and the secondary events of the cycle.
    app.wait_events(2 + depth).await;
    let mails = app.wait_mails(1).await;
    assert_eq!(mails[0].to, "ana@example.com", "the welcome rule went on");

    // The cycle: stopped at the limit, in the client's log with rule and event.
    let log = app
        .store
        .client_log(&ClientId::parse("cy").unwrap(), 50)
        .await
        .unwrap();
    let stop = log
        .iter()
        .find(|l| l.message.contains("secondary events deep"))
        .unwrap_or_else(|| panic!("the stop reported: {log:?}"));
    let stopped_rule = stop.rule.clone().unwrap();
    assert!(
        ["ping", "pong"].contains(&stopped_rule.as_str()),
        "{stop:?}"
    );
    let trigger = stop.event_id.as_ref().unwrap().as_str().to_string();
    assert!(
        trigger.starts_with("nudge-"),
        "the secondary event it ran for: {stop:?}"
    );
    assert!(stop.message.contains("max_emit_depth"), "{stop:?}");
    // The secondary events were published on NATS, once each.
    eventually(Duration::from_secs(20), "the emits delivered", || async {
        let rows = app.store.list_outbox(100).await.ok()?;
        let emits: Vec<_> = rows.iter().filter(|r| r.kind == "emit").collect();
        (emits.len() as u64 == depth && emits.iter().all(|r| r.status == "sent")).then_some(())
    })
    .await;
    assert_eq!(app.store.count_events().await.unwrap(), 2 + depth);

    // The huge string and array: stopped at their limits, with rule and event.
    let log = app
        .store
        .client_log(&ClientId::parse("ana").unwrap(), 50)
        .await
        .unwrap();
    for (rule, what) in [("huge_string", "string"), ("huge_array", "array")] {
        let err = log
            .iter()
            .find(|l| l.rule.as_deref() == Some(rule))
            .unwrap_or_else(|| panic!("{rule} reported: {log:?}"));
        assert_eq!(err.event_id.as_ref().unwrap().as_str(), "r1", "{err:?}");
        assert!(
            err.message.contains(&format!("rule `{rule}` failed")),
            "{err:?}"
        );
        assert!(err.message.to_lowercase().contains(what), "{err:?}");
    }

    // Counted, by rule, in /metrics and /api/rules; the others had no error.
    let m = app.get("/metrics").await.text().await.unwrap();
    let r: Value = app.get("/api/rules").await.json().await.unwrap();
    let api_errors = |name: &str| {
        r["rules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == name)
            .map(|x| x["errors"].as_u64().unwrap())
            .unwrap()
    };
    for rule in [stopped_rule.as_str(), "huge_string", "huge_array"] {
        assert_eq!(
            metric(&m, "nudge_rule_errors_total", rule),
            1,
            "{rule}: {m}"
        );
        assert_eq!(api_errors(rule), 1, "{rule}: {r}");
    }
    assert_eq!(metric(&m, "nudge_rule_errors_total", "welcome"), 0);
    assert_eq!(metric(&m, "nudge_rule_runs_total", "welcome"), 1);
    let other = if stopped_rule == "ping" {
        "pong"
    } else {
        "ping"
    };
    assert_eq!(metric(&m, "nudge_rule_errors_total", other), 0, "{m}");

    // Nothing is wedged: the next registration is welcomed too.
    app.publish(&registered_at("r2", "ben", &ago(100))).await;
    let mails = app.wait_mails(2).await;
    assert!(mails.iter().any(|m| m.to == "ben@example.com"));
    println!(
        "fault suite ({backend:?}): an emit cycle stopped after {depth} secondary events \
         (reported for `{stopped_rule}` on {trigger}), a string and an array stopped at \
         rules.max_string_bytes and max_array_len (reported on r1), 1 error each in /metrics \
         and /api/rules, the welcome mails sent"
    );
    app.stop().await;
}

backend_tests!(runaway_rules_are_stopped_reported_and_counted_and_the_others_go_on,);
