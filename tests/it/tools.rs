//! Replay, backtest and preview over a history built by the live daemon.

use crate::helpers::{Backend, Sql, TestApp, TestDb, TestEnv, ago, event, registered_at};
use nudge::store::{History, Outbox, State};
use serde_json::{Value, json};
use std::collections::BTreeMap;

const DAY: i64 = 86_400;

/// Registrations, browsing, a quick leave (a timer), orders and a partner.
async fn build_history(app: &TestApp) -> u64 {
    let mut n = 0;
    for (i, c) in ["ana", "ben", "cleo", "dan"].iter().enumerate() {
        let mut r = registered_at(&format!("r-{c}"), c, &ago(3 * DAY - i as i64 * 60));
        r["data"]["acquisition_channel"] = json!(["promo", "trial", "ads", "promo"][i]);
        app.publish(&r).await;
        n += 1;
    }
    for (i, c) in ["ana", "ben"].iter().enumerate() {
        for k in 0..3 {
            let e = event(
                &format!("v-{c}-{k}"),
                "product_viewed",
                c,
                &ago(2 * DAY - k * 600 + i as i64),
                json!({"product_id": format!("p{k}"), "price": 10}),
                json!({"session_id": format!("s-{c}"), "partner_track_id": "acme"}),
            );
            app.publish(&e).await;
            n += 1;
        }
    }
    // cleo: one page without a session id, then silence: the timer fires.
    app.publish(&event(
        "pv-cleo",
        "page_viewed",
        "cleo",
        &ago(DAY),
        json!({"url": "/"}),
        json!({}),
    ))
    .await;
    n += 1;
    for k in 0..3 {
        let o = event(
            &format!("o-ana-{k}"),
            "order_placed",
            "ana",
            &ago(DAY / 2 - k * 60),
            json!({"order_id": format!("o{k}"), "total": 300, "currency": "EUR", "items": []}),
            json!({}),
        );
        app.publish(&o).await;
        n += 1;
    }
    n
}

/// The derived tables, as text, in a stable order.
async fn dump(url: &str) -> BTreeMap<String, String> {
    let sql = Sql::connect(url).await;
    let mut out = BTreeMap::new();
    let queries = [
        (
            "client",
            "SELECT client_id, CAST(state AS TEXT), CAST(next_due AS TEXT), email, \
             CAST(last_seen AS TEXT) FROM clients",
        ),
        (
            "counter",
            "SELECT name, period, CAST(value AS TEXT) FROM counters",
        ),
        ("member", "SELECT name, period, member FROM counter_members"),
    ];
    for (table, query) in queries {
        for row in sql.rows(query).await {
            out.insert(
                format!("{table} {:?}", &row[..row.len().min(2)]),
                format!("{row:?}"),
            );
        }
    }
    sql.close().await;
    out
}

async fn replay_rebuilds_the_same_history_and_backtest_finds_the_same_effects(backend: Backend) {
    let env = TestEnv::new(backend).await;
    // No scheduled rule: its sweeps would run at wall-clock times that the
    // back-dated events of this test do not respect.
    std::fs::remove_file(env.rules_dir().join("idle_reminder.rhai")).unwrap();
    let app = env.start().await;
    let n = build_history(&app).await;
    app.wait_events(n + 3).await; // + three partner_commission events
    // The quick leave mail comes from cleo's timer.
    crate::helpers::eventually(
        std::time::Duration::from_secs(20),
        "cleo's quick-leave mail",
        || async {
            app.mails()
                .iter()
                .any(|m| m.to == "cleo@example.com" && m.subject.contains("looking for"))
                .then_some(())
        },
    )
    .await;
    app.wait_outbox_settled().await;
    let outbox = app.store.list_outbox(1000).await.unwrap();
    let mails_before = app.mails().len();

    // The preview over HTTP renders with the client's real history.
    let p: Value = app
        .get("/api/templates/welcome_promo/preview?client=ana")
        .await
        .json()
        .await
        .unwrap();
    assert!(p["subject"].as_str().unwrap().contains("ANA"), "{p}");
    assert!(p["html"].as_str().unwrap().contains("WELCOME10"), "{p}");
    assert_eq!(
        app.get("/api/templates/welcome/preview?client=nobody")
            .await
            .status(),
        404
    );

    let env = app.stop().await;
    let url = env.config.database.url.expose().to_string();
    let live = dump(&url).await;
    assert!(live.len() > 4, "{live:#?}");

    let store = nudge::app::open_store(&env.config).await.unwrap();
    let progress = nudge::tools::replay(&env.config, &store, |_| {})
        .await
        .unwrap();
    assert_eq!(progress.events, n);
    let replayed = dump(&url).await;
    assert_eq!(
        live, replayed,
        "replay must rebuild the derived tables exactly"
    );

    // Nothing was sent or queued again.
    assert_eq!(store.list_outbox(1000).await.unwrap().len(), outbox.len());
    assert_eq!(env.mails().len(), mails_before);

    // A backtest of the same rules finds what the live daemon did.
    let report = nudge::tools::backtest(&env.config, &store, &env.rules_dir(), None, None)
        .await
        .unwrap();
    let mut found: Vec<(String, String, String)> = report
        .effects
        .iter()
        .map(|e| (e.rule.clone(), e.kind.clone(), e.client_id.clone()))
        .collect();
    let mut live_effects: Vec<(String, String, String)> = outbox
        .iter()
        .map(|r| (r.rule.clone(), r.kind.clone(), r.client_id.clone()))
        .collect();
    found.sort();
    live_effects.sort();
    assert_eq!(found, live_effects);
    assert_eq!(report.rules["welcome"].mails["welcome_promo"], 2);

    // A changed rule is tried on the past without touching anything.
    let trial = tempfile::tempdir().unwrap();
    std::fs::write(
        trial.path().join("big_spender.rhai"),
        "const ON = [\"order_placed\"];\nif client.stats.spend >= 600.0 { mail(\"welcome\"); }\n",
    )
    .unwrap();
    let report = nudge::tools::backtest(&env.config, &store, trial.path(), None, None)
        .await
        .unwrap();
    assert_eq!(
        report.effects.len(),
        2,
        "the second and third orders of ana: {:?}",
        report.effects
    );
    assert!(report.effects.iter().all(|e| e.client_id == "ana"));
    assert_eq!(dump(&url).await, live, "a backtest changes nothing");
    assert_eq!(store.list_outbox(1000).await.unwrap().len(), outbox.len());

    // A fresh database rebuilt from the stream: the same clients, nothing queued.
    let mut fresh = env.config.clone();
    let fresh_db = TestDb::create(backend, env.dir.path(), "fresh").await;
    fresh.database.url = fresh_db.url.clone().into();
    let fresh_store = nudge::app::open_store(&fresh).await.unwrap();
    let read = nudge::tools::replay_from_stream(
        &fresh,
        &fresh_store,
        nudge::tools::StreamStart::All,
        |_, _| {},
    )
    .await
    .unwrap();
    assert_eq!(read, n);
    assert_eq!(
        fresh_store.count_events().await.unwrap(),
        n + 3,
        "with the secondary events decided again"
    );
    assert!(
        fresh_store.list_outbox(100).await.unwrap().is_empty(),
        "nothing queued"
    );
    let ids: Vec<nudge::domain::event::ClientId> = ["ana", "ben", "cleo", "dan"]
        .iter()
        .map(|c| nudge::domain::event::ClientId::parse(*c).unwrap())
        .collect();
    let refs: Vec<&nudge::domain::event::ClientId> = ids.iter().collect();
    let rebuilt = fresh_store.load_clients(&refs).await.unwrap();
    assert_eq!(rebuilt.len(), 4);
    assert_eq!(rebuilt[&ids[0]].stats.orders, 3);
    assert_eq!(env.mails().len(), mails_before, "nothing sent");
}

backend_tests!(replay_rebuilds_the_same_history_and_backtest_finds_the_same_effects,);
