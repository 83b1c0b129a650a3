//! Cross-client campaigns: shared counters, secondary events, staff tasks.

use crate::helpers::{Backend, TestApp, ago, event, eventually, registered_at};
use futures::StreamExt;
use nudge::domain::counters::CounterKey;
use nudge::store::State;
use serde_json::{Value, json};
use std::time::Duration;

const DAY: i64 = 86_400;

fn order(id: &str, client: &str, total: f64, extra: Value) -> Value {
    let mut data = json!({"order_id": format!("o-{id}"), "channel": "online", "total": total,
                          "currency": "EUR", "items": []});
    if let Value::Object(m) = extra {
        data.as_object_mut().unwrap().extend(m);
    }
    event(id, "order_placed", client, &ago(3600), data, json!({}))
}

fn quarter_key() -> CounterKey {
    let now = chrono::Utc::now() - chrono::Duration::seconds(3600);
    CounterKey {
        name: "big_order_clients".into(),
        period: nudge::domain::counters::period_key("quarter", now, chrono_tz::Tz::UTC).unwrap(),
    }
}

/// 120 big orders (and small ones, and a redelivered one) from 120 clients.
async fn publish_campaign(app: &TestApp) {
    for i in 1..=120 {
        let c = format!("c{i:03}");
        app.publish(&registered_at(&format!("reg-{c}"), &c, &ago(2 * DAY)))
            .await;
    }
    for i in 1..=120 {
        let c = format!("c{i:03}");
        app.publish(&order(&format!("small-{c}"), &c, 20.0, json!({})))
            .await;
        let big = order(&format!("big-{c}"), &c, 1500.0, json!({}));
        app.publish(&big).await;
        if i == 50 {
            // Redelivered with another broker id: must not count twice.
            app.publish_raw("order_placed", "again", serde_json::to_vec(&big).unwrap())
                .await;
        }
    }
}

async fn happy_mails(app: &TestApp) -> Vec<crate::helpers::Mail> {
    app.mails()
        .into_iter()
        .filter(|m| m.header("X-Nudge-Template").as_deref() == Some("happy_client"))
        .collect()
}

async fn the_99th_big_client_gets_one_letter_one_event_and_one_task(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let nats = async_nats::connect(app.config.nats.url.expose())
        .await
        .unwrap();
    let mut emitted = nats.subscribe("nudge.events.>").await.unwrap();
    nats.flush().await.unwrap();

    publish_campaign(&app).await;
    app.wait_events(120 * 3 + 1).await; // + the secondary happy_client event
    app.wait_outbox_settled().await;

    let happy = happy_mails(&app).await;
    assert_eq!(happy.len(), 1, "{happy:#?}");
    // One consumer reads in stream order: the 99th big order is c099's.
    assert_eq!(happy[0].to, "c099@example.com");

    let msg = tokio::time::timeout(Duration::from_secs(10), emitted.next())
        .await
        .expect("a secondary event")
        .unwrap();
    assert_eq!(msg.subject.as_str(), "nudge.events.happy_client");
    let ev: Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(ev["client_id"], "c099");
    assert_eq!(ev["data"]["caused_by"], "big-c099");
    assert_eq!(ev["data"]["rank"], 99);
    assert_eq!(
        msg.headers
            .as_ref()
            .unwrap()
            .get("Nats-Msg-Id")
            .unwrap()
            .as_str(),
        ev["id"].as_str().unwrap()
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(500), emitted.next())
            .await
            .is_err(),
        "exactly one secondary event"
    );

    let tasks: Value = app.get("/api/tasks").await.json().await.unwrap();
    let tasks = tasks["tasks"].as_array().unwrap().clone();
    assert_eq!(tasks.len(), 1, "{tasks:#?}");
    assert_eq!(tasks[0]["team"], "sales");
    assert_eq!(tasks[0]["client_id"], "c099");
    let task_mail = app
        .mails()
        .into_iter()
        .find(|m| m.to == "sales@shop.test")
        .expect("the task is mailed to the team");
    assert!(
        task_mail.subject.contains("Happy client"),
        "{}",
        task_mail.subject
    );
    assert!(task_mail.text.contains("c099"), "{}", task_mail.text);

    // Closed over HTTP; closing twice is a 404.
    let id = tasks[0]["id"].as_str().unwrap();
    assert_eq!(
        app.post(&format!("/api/tasks/{id}/done")).await.status(),
        200
    );
    assert_eq!(
        app.post(&format!("/api/tasks/{id}/done")).await.status(),
        404
    );
    let open: Value = app.get("/api/tasks").await.json().await.unwrap();
    assert!(open["tasks"].as_array().unwrap().is_empty());

    let counter = app.store.load_counter(&quarter_key()).await.unwrap();
    assert_eq!(counter.value, 120.0, "each big client counted once");

    // The client's process log tells support what happened.
    let log: Value = app.get("/api/clients/c099/log").await.json().await.unwrap();
    let lines: Vec<&str> = log["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["message"].as_str().unwrap())
        .collect();
    assert!(
        lines.iter().any(|l| l.contains("task for sales")),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("happy_client") && l.contains("sent")),
        "{lines:#?}"
    );
    app.stop().await;
}

/// On SQLite the second instance stands by for the stream (one consumer per
/// database file) while it runs timers and sends mail alongside.
async fn counters_stay_exact_with_two_instances_consuming_at_once(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let peer = app.start_peer().await;
    publish_campaign(&app).await;
    app.wait_events(120 * 3 + 1).await;
    app.wait_outbox_settled().await;
    let happy = happy_mails(&app).await;
    assert_eq!(happy.len(), 1, "exactly one 99th client: {happy:#?}");
    let counter = app.store.load_counter(&quarter_key()).await.unwrap();
    assert_eq!(counter.value, 120.0);
    let tasks: Value = app.get("/api/tasks").await.json().await.unwrap();
    assert_eq!(tasks["tasks"].as_array().unwrap().len(), 1);
    peer.stop().await;
    app.stop().await;
}

async fn partner_commission_and_vip_callback(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let nats = async_nats::connect(app.config.nats.url.expose())
        .await
        .unwrap();
    let mut commissions = nats
        .subscribe("nudge.events.partner_commission")
        .await
        .unwrap();
    nats.flush().await.unwrap();

    app.publish(&registered_at("reg-p", "pia", &ago(5 * DAY)))
        .await;
    // First visit through a partner link; the orders later carry no track id.
    let visit = event(
        "v1",
        "page_viewed",
        "pia",
        &ago(4 * DAY),
        json!({"url": "/"}),
        json!({"partner_track_id": "acme", "session_id": "s1"}),
    );
    app.publish(&visit).await;
    for i in 1..=3 {
        app.publish(&order(&format!("po{i}"), "pia", 200.0, json!({})))
            .await;
    }
    app.wait_events(5).await;

    let mut got = Vec::new();
    for _ in 0..3 {
        let m = tokio::time::timeout(Duration::from_secs(10), commissions.next())
            .await
            .unwrap()
            .unwrap();
        got.push(serde_json::from_slice::<Value>(&m.payload).unwrap());
    }
    for c in &got {
        assert_eq!(c["data"]["partner"], "acme");
        assert_eq!(c["data"]["amount"], 20.0, "10% of 200: {c}");
    }
    let month = nudge::domain::counters::period_key(
        "month",
        chrono::Utc::now() - chrono::Duration::seconds(3600),
        chrono_tz::Tz::UTC,
    )
    .unwrap();
    let key = CounterKey {
        name: "partner_commission:acme".into(),
        period: month,
    };
    assert_eq!(app.store.load_counter(&key).await.unwrap().value, 60.0);

    // The third order this month: a callback task for sales.
    let tasks = eventually(Duration::from_secs(10), "the vip task", || async {
        let t: Value = app.get("/api/tasks?team=sales").await.json().await.ok()?;
        let t = t["tasks"].as_array()?.clone();
        (!t.is_empty()).then_some(t)
    })
    .await;
    assert_eq!(tasks.len(), 1);
    assert!(
        tasks[0]["title"]
            .as_str()
            .unwrap()
            .starts_with("Call to thank PIA"),
        "{tasks:?}"
    );
    app.stop().await;
}

backend_tests!(
    the_99th_big_client_gets_one_letter_one_event_and_one_task,
    counters_stay_exact_with_two_instances_consuming_at_once,
    partner_commission_and_vip_callback,
);
