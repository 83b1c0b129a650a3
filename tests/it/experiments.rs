//! Knowing what works (issue 24): an experiment in a rule, a goal, the
//! global control group, and the report, checked against a reference
//! computation written here from the documented assignment formula, live,
//! after a replay and in a backtest.

use crate::helpers::{Backend, TestEnv, eventually};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

const CLIENTS: usize = 2000;
const GLOBAL_CONTROL_PERCENT: f64 = 10.0;

/// The rule under test: half the clients get a marketing welcome offer,
/// half nothing; the goal is an order within 7 days.
const RULE: &str = r#"
const ON = ["client_registered"];
const GOAL = #{ event: "order_placed", within_days: 7 };
if variant("welcome_test", #{mail: 50, control: 50}) == "mail" {
    mail("welcome_offer", #{ first_name: client.first_name ?? "there" });
}
"#;

/// A second rule reading the same experiment with other weights, for
/// logins: a client's variant must not change.
const STICKY: &str = r#"
const ON = ["login_succeeded"];
variant("welcome_test", #{mail: 1, control: 99});
"#;

/// The documented assignment: SHA-256 of `salt`, a zero byte and the client
/// id; the first 8 bytes big-endian, top 53 bits, over 2^53.
fn bucket(salt: &str, client: &str) -> f64 {
    let mut h = Sha256::new();
    h.update(salt.as_bytes());
    h.update([0]);
    h.update(client.as_bytes());
    let d = h.finalize();
    let first = u64::from_be_bytes(d[..8].try_into().unwrap());
    (first >> 11) as f64 / (1u64 << 53) as f64
}

/// Variants in name order: control (50), then mail (50).
fn reference_variant(client: &str) -> &'static str {
    if bucket("welcome_test", client) < 0.5 {
        "control"
    } else {
        "mail"
    }
}

fn in_global_control(client: &str) -> bool {
    bucket("global_control", client) * 100.0 < GLOBAL_CONTROL_PERCENT
}

/// What a client does: the orders they place, in seconds after registering,
/// with their totals.
fn orders_of(i: usize) -> Vec<(i64, f64)> {
    let total = 10.0 + (i % 50) as f64;
    match i % 6 {
        // Within the week: converts, the first order's total counts.
        0 => vec![(2 * 86_400, total), (3 * 86_400, 999.0)],
        // After the week: no conversion.
        1 => vec![(8 * 86_400, total)],
        // On the last second of the week: converts.
        2 if i.is_multiple_of(4) => vec![(7 * 86_400, total)],
        _ => vec![],
    }
}

/// The report a correct nudge gives, per group: exposed, mailed, converted, revenue.
fn reference() -> BTreeMap<&'static str, (u64, u64, u64, f64)> {
    let mut out: BTreeMap<&'static str, (u64, u64, u64, f64)> = BTreeMap::new();
    for i in 0..CLIENTS {
        let id = format!("x{i}");
        let variant = reference_variant(&id);
        let group = if variant == "mail" && in_global_control(&id) {
            "global_control"
        } else {
            variant
        };
        let g = out.entry(group).or_default();
        g.0 += 1;
        g.1 += u64::from(group == "mail");
        if let Some((_, total)) = orders_of(i)
            .into_iter()
            .find(|(after, _)| *after <= 7 * 86_400)
        {
            g.2 += 1;
            g.3 += total;
        }
    }
    out
}

fn at(base: i64, secs: i64) -> String {
    chrono::DateTime::from_timestamp(base + secs, 0)
        .unwrap()
        .to_rfc3339()
}

/// The groups of an experiment in a report, as the reference has them.
fn groups(report: &Value, experiment: &str) -> BTreeMap<String, (u64, u64, u64, f64)> {
    let e = report["experiments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["experiment"] == experiment)
        .unwrap_or_else(|| panic!("no experiment {experiment} in {report}"));
    e["variants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            let n = |k: &str| v[k].as_u64().unwrap();
            // Sums of whole cents: rounding only hides float noise.
            let revenue = (v["revenue"].as_f64().unwrap() * 100.0).round() / 100.0;
            (
                v["variant"].as_str().unwrap().to_string(),
                (n("exposed"), n("mailed"), n("converted"), revenue),
            )
        })
        .collect()
}

async fn an_experiment_is_reported_as_a_reference_computes_it_live_in_replay_and_backtest(
    backend: Backend,
) {
    let env = TestEnv::with_env(backend, &[("NUDGE__MAIL__GLOBAL_CONTROL_PERCENT", "10")]).await;
    let rules = env.rules_dir();
    for f in std::fs::read_dir(&rules).unwrap().flatten() {
        if f.path().is_file() {
            std::fs::remove_file(f.path()).unwrap();
        }
    }
    std::fs::write(rules.join("welcome.rhai"), RULE).unwrap();
    std::fs::write(rules.join("sticky.rhai"), STICKY).unwrap();
    let templates = env.dir.path().join("templates");
    std::fs::write(
        templates.join("welcome_offer.txt"),
        "---\nsubject: A welcome offer\nkind: marketing\n---\nHello {{ first_name }}: 10 % off.\n\
         Unsubscribe: {{ unsubscribe_url }}\n",
    )
    .unwrap();
    std::fs::write(
        templates.join("welcome_offer.html"),
        "<p>Hello {{ first_name }}: 10 % off.</p><a href=\"{{ unsubscribe_url }}\">Unsubscribe</a>",
    )
    .unwrap();
    let app = env.start().await;

    let base = chrono::Utc::now().timestamp() - 30 * 86_400;
    let mut n = 0u64;
    for i in 0..CLIENTS {
        let id = format!("x{i}");
        app.publish(&json!({"id": format!("r-{i}"), "type": "client_registered",
            "client_id": id, "occurred_at": at(base, i as i64),
            "data": {"email": format!("{id}@example.com"), "first_name": "X",
                     "marketing_consent": true}}))
            .await;
        n += 1;
    }
    for i in 0..CLIENTS {
        for (k, (after, total)) in orders_of(i).into_iter().enumerate() {
            app.publish(&json!({"id": format!("o-{i}-{k}"), "type": "order_placed",
                "client_id": format!("x{i}"), "occurred_at": at(base, i as i64 + after),
                "data": {"order_id": format!("o-{i}-{k}"), "total": total, "currency": "EUR",
                         "items": [{"product_id": "p1", "quantity": 1, "price": total}]}}))
                .await;
            n += 1;
        }
    }
    // Every other client logs in later: the sticky rule reads the same
    // experiment with other weights.
    for i in (0..CLIENTS).step_by(2) {
        app.publish(&json!({"id": format!("l-{i}"), "type": "login_succeeded",
            "client_id": format!("x{i}"), "occurred_at": at(base, 20 * 86_400 + i as i64),
            "data": {}}))
            .await;
        n += 1;
    }
    app.wait_events_within(n, Duration::from_secs(60)).await;

    let want = reference();
    let mailed: BTreeSet<String> = (0..CLIENTS)
        .map(|i| format!("x{i}"))
        .filter(|id| reference_variant(id) == "mail" && !in_global_control(id))
        .map(|id| format!("{id}@example.com"))
        .collect();
    let mails = app.wait_mails(mailed.len()).await;
    app.wait_outbox_settled().await;
    let got: BTreeSet<String> = app.mails().into_iter().map(|m| m.to).collect();
    assert_eq!(
        app.mails().len(),
        mails.len().max(mailed.len()),
        "one mail each"
    );
    assert_eq!(
        got, mailed,
        "the mail variant outside the global control, and no one else"
    );

    // The split is within binomial bounds: 4 standard deviations.
    let in_mail = (0..CLIENTS)
        .filter(|i| reference_variant(&format!("x{i}")) == "mail")
        .count() as f64;
    let sd = (CLIENTS as f64 * 0.25).sqrt();
    assert!(
        (in_mail - CLIENTS as f64 / 2.0).abs() < 4.0 * sd,
        "{in_mail}"
    );

    let live: Value = eventually(Duration::from_secs(20), "the report", || async {
        let r: Value = app.get("/api/reports/welcome").await.json().await.ok()?;
        let g = groups(&r, "welcome_test");
        (g.get("mail").map(|m| m.1) == Some(mailed.len() as u64)).then_some(r)
    })
    .await;
    let expected: BTreeMap<String, (u64, u64, u64, f64)> = want
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                (v.0, v.1, v.2, (v.3 * 100.0).round() / 100.0),
            )
        })
        .collect();
    assert_eq!(groups(&live, "welcome_test"), expected, "{live:#}");
    assert_eq!(live["goal"]["within_days"], 7);
    let experiment = &live["experiments"][0];
    assert_eq!(experiment["baseline"], "control");
    let mail = experiment["variants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["variant"] == "mail")
        .unwrap();
    let lift = &mail["lift"];
    assert_eq!(lift["against"], "control");
    assert_eq!(lift["status"], "ok", "{lift}");
    let c = &lift["conversion"];
    let p = c["p_value"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&p), "{c}");
    let ci = c["absolute_ci"].as_array().unwrap();
    assert!(ci[0].as_f64().unwrap() <= c["absolute"].as_f64().unwrap());

    // A client's variant never changes: the logins ran `variant` again with
    // other weights, and each client kept the one given at registration.
    let sticky: Value = app.get("/api/reports/sticky").await.json().await.unwrap();
    let mut want_sticky: BTreeMap<String, u64> = BTreeMap::new();
    for i in (0..CLIENTS).step_by(2) {
        *want_sticky
            .entry(reference_variant(&format!("x{i}")).to_string())
            .or_default() += 1;
    }
    let got_sticky: BTreeMap<String, u64> = groups(&sticky, "welcome_test")
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect();
    assert_eq!(got_sticky, want_sticky, "{sticky:#}");

    // The CLI gives the same report.
    let env = app.stop().await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nudge"))
        .args(["report", "welcome", "--json"])
        .envs(crate::helpers::daemon_vars(&env, &[]))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cli, live);
    let text = std::process::Command::new(env!("CARGO_BIN_EXE_nudge"))
        .args(["report", "welcome"])
        .envs(crate::helpers::daemon_vars(&env, &[]))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("mail against control: conversion"), "{text}");

    // A replay rebuilds the same exposures; a backtest finds the same.
    let store = nudge::app::open_store(&env.config).await.unwrap();
    nudge::tools::replay(&env.config, &store, |_| {})
        .await
        .unwrap();
    let replayed = nudge::tools::report::stored(&store, "welcome", None, None, None)
        .await
        .unwrap();
    let replayed = serde_json::to_value(&replayed).unwrap();
    assert_eq!(replayed["experiments"], live["experiments"]);
    let backtest = nudge::tools::backtest(&env.config, &store, &rules, None, None)
        .await
        .unwrap();
    let b = serde_json::to_value(&backtest.reports["welcome"]).unwrap();
    assert_eq!(b["baseline_only"], true);
    assert_eq!(groups(&b, "welcome_test"), expected);
    assert_eq!(b["experiments"], live["experiments"]);
}

backend_tests!(an_experiment_is_reported_as_a_reference_computes_it_live_in_replay_and_backtest,);
