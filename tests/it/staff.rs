//! The customer 360 API and the live feed, against a history built from real
//! events over NATS.

use crate::helpers::{Backend, TestApp, TestEnv, ago, event, eventually, registered_at};
use futures::StreamExt;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const TOKEN: &str = "a-test-token-of-some-length";

async fn get(app: &TestApp, path: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(format!("http://{}{path}", app.http))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
}

async fn spawn(backend: Backend) -> TestApp {
    TestEnv::with_env(backend, &[("NUDGE__HTTP__TOKEN", TOKEN)])
        .await
        .start()
        .await
}

fn order(id: &str, client: &str, secs_ago: i64, channel: &str, items: Value, total: f64) -> Value {
    event(
        id,
        "order_placed",
        client,
        &ago(secs_ago),
        json!({"order_id": id, "channel": channel, "total": total, "currency": "EUR", "items": items}),
        json!({}),
    )
}

async fn the_360_view_is_complete_and_real_time(backend: Backend) {
    let app = spawn(backend).await;
    let mut reg = registered_at("r-ada", "ada", &ago(10 * 86_400));
    reg["data"]["last_name"] = json!("Lovelace");
    app.publish(&reg).await;
    app.publish(&order("o1", "ada", 5 * 86_400, "online",
        json!([{"product_id": "lamp", "name": "Lamp", "quantity": 2, "price": 10}, {"product_id": "vase", "name": "Vase", "quantity": 1, "price": 30}]), 50.0)).await;
    app.publish(&order(
        "o2",
        "ada",
        4 * 86_400,
        "instore",
        json!([{"product_id": "lamp", "name": "Lamp", "quantity": 1, "price": 10}]),
        10.0,
    ))
    .await;
    app.publish(&event(
        "e1",
        "error_occurred",
        "ada",
        &ago(3 * 86_400),
        json!({"page": "/checkout", "message": "card declined", "code": "402"}),
        json!({}),
    ))
    .await;
    app.publish(&event(
        "l1",
        "login_succeeded",
        "ada",
        &ago(2 * 86_400),
        json!({}),
        json!({"session_id": "s9", "channel": "app"}),
    ))
    .await;
    app.publish(&event(
        "sc",
        "support_contacted",
        "ada",
        &ago(86_400),
        json!({"channel": "phone", "topic": "refund"}),
        json!({}),
    ))
    .await;
    app.wait_events(6).await;
    app.wait_outbox_settled().await;

    let c: Value = get(&app, "/api/clients/ada").await.json().await.unwrap();
    assert_eq!(c["client_id"], "ada");
    assert_eq!(c["email"], "ada@example.com");
    assert_eq!(c["last_name"], "Lovelace");
    assert_eq!(c["acquisition_channel"], "organic");
    assert_eq!(c["marketing_consent"], true);
    assert_eq!(c["orders"]["online"]["count"], 1);
    assert_eq!(c["orders"]["online"]["items"], 3);
    assert_eq!(c["orders"]["online"]["items_per_order"], 3.0);
    assert_eq!(c["orders"]["instore"]["total"], 10.0);
    assert_eq!(c["total_spent"], 60.0);
    assert_eq!(c["top_products"][0]["product_id"], "lamp");
    assert_eq!(c["top_products"][0]["purchases"], 3);
    assert!(c["last_activity"]["order"].is_string() && c["last_activity"]["login"].is_string());
    assert!(c["last_activity"]["support_contact"].is_string());
    assert!(
        c["last_activity"]["email_sent"].is_string(),
        "the welcome mail: {c}"
    );
    assert_eq!(c["recent_errors"][0]["message"], "card declined");
    assert_eq!(c["mails"][0]["template"], "welcome");
    assert_eq!(c["mails"][0]["status"], "sent");
    assert!(!c["sessions"].as_array().unwrap().is_empty());

    // Real time: published now, visible in well under a second.
    let started = Instant::now();
    app.publish(&order(
        "o3",
        "ada",
        0,
        "online",
        json!([{"product_id": "vase", "name": "Vase", "quantity": 1}]),
        30.0,
    ))
    .await;
    eventually(
        Duration::from_secs(5),
        "the new order in the 360 view",
        || async {
            let c: Value = get(&app, "/api/clients/ada").await.json().await.ok()?;
            (c["orders"]["online"]["count"] == 2).then_some(())
        },
    )
    .await;
    let took = started.elapsed();
    println!("360 view updated {took:?} after publishing");
    assert!(took < Duration::from_secs(1), "took {took:?}");

    // The third order this month made a task: open in the view.
    let c: Value = get(&app, "/api/clients/ada").await.json().await.unwrap();
    assert_eq!(c["tasks"][0]["team"], "sales", "{c}");
    app.stop().await;
}

async fn search_paging_unknown_clients_and_tokens(backend: Backend) {
    let app = spawn(backend).await;
    let mut reg = registered_at("r-bo", "bo-42", &ago(86_400));
    reg["data"]["first_name"] = json!("Bo");
    reg["data"]["last_name"] = json!("Diddley");
    app.publish(&reg).await;
    for i in 0..25 {
        app.publish(&event(
            &format!("pv{i:02}"),
            "page_viewed",
            "bo-42",
            &ago(3600 - i * 10),
            json!({"url": format!("/p{i}")}),
            json!({"session_id": "s"}),
        ))
        .await;
    }
    app.wait_events(26).await;

    for q in ["bo-4", "DIDDLEY", "bo-42@example", "Bo Did"] {
        let r: Value = get(&app, &format!("/api/clients?q={}", q.replace(' ', "%20")))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(r["clients"][0]["client_id"], "bo-42", "query {q}: {r}");
    }
    let r: Value = get(&app, "/api/clients?q=nobody")
        .await
        .json()
        .await
        .unwrap();
    assert!(r["clients"].as_array().unwrap().is_empty());

    // The timeline in pages of 10, newest first, filtered by type.
    let mut seen = Vec::new();
    let mut before = String::new();
    loop {
        let path = format!(
            "/api/clients/bo-42/events?type=page_viewed&limit=10&before={}",
            urlencode(&before)
        );
        let page: Value = get(&app, &path).await.json().await.unwrap();
        for e in page["events"].as_array().unwrap() {
            assert_eq!(e["type"], "page_viewed");
            seen.push(e["id"].as_str().unwrap().to_string());
        }
        match page["next"].as_str() {
            Some(n) => before = n.to_string(),
            None => break,
        }
    }
    let expected: Vec<String> = (0..25).rev().map(|i| format!("pv{i:02}")).collect();
    assert_eq!(seen, expected, "every event once, newest first");

    let r = get(&app, "/api/clients/nobody").await;
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("nobody"));

    // No token, a wrong token: 401 with a JSON error; health and metrics stay open.
    assert_eq!(app.get("/api/clients/bo-42").await.status(), 401);
    let wrong = reqwest::Client::new()
        .get(format!("http://{}/api/tasks", app.http))
        .bearer_auth("not-the-token-at-all")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert!(wrong.json::<Value>().await.unwrap()["error"].is_string());
    assert_eq!(app.get("/health").await.status(), 200);
    let metrics = app.get("/metrics").await.text().await.unwrap();
    for m in [
        "nudge_event_latency_seconds_bucket",
        "nudge_outbox_depth",
        "nudge_consumer_lag 0",
        "nudge_events_consumed_total 26",
    ] {
        assert!(metrics.contains(m), "{m} in {metrics}");
    }
    app.stop().await;
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn the_live_feed_streams_tasks_as_they_are_made(backend: Backend) {
    let app = spawn(backend).await;
    // Listen in the background, as the staff page does, while events come in.
    // EventSource cannot send headers: the page asks for a ticket first.
    let ticket: Value = reqwest::Client::new()
        .post(format!("http://{}/api/live/ticket", app.http))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let url = format!("http://{}{}", app.http, ticket["url"].as_str().unwrap());
    let listener = tokio::spawn(async move {
        let resp = reqwest::get(url).await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.bytes_stream();
        let mut text = String::new();
        while let Some(chunk) = body.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            if text.contains("event: task") {
                break;
            }
        }
        text
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.publish(&registered_at("r-vi", "vi", &ago(86_400)))
        .await;
    for i in 0..3 {
        app.publish(&order(
            &format!("ov{i}"),
            "vi",
            3600 - i,
            "online",
            json!([]),
            5.0,
        ))
        .await;
    }
    let text = tokio::time::timeout(Duration::from_secs(20), listener)
        .await
        .expect("a task on the live feed within 20 s")
        .unwrap();
    let found: Result<bool, ()> = Ok(text.contains("event: task"));
    assert_eq!(found, Ok(true), "{text}");
    assert!(text.contains("Call to thank"), "{text}");
    assert!(
        text.contains("event: event") && text.contains("order_placed"),
        "{text}"
    );
    app.stop().await;
}

/// Follows `next` from `first` to the end; every page's items, in order.
async fn all_pages(app: &TestApp, first: &str, key: &str) -> (Vec<Value>, usize) {
    let (mut items, mut pages, mut path) = (Vec::new(), 0, first.to_string());
    loop {
        let r = get(app, &path).await;
        assert_eq!(r.status(), 200, "{path}");
        let body: Value = r.json().await.unwrap();
        items.extend(body[key].as_array().unwrap().iter().cloned());
        pages += 1;
        match body["next"].as_str() {
            Some(next) => {
                let sep = if first.contains('?') { '&' } else { '?' };
                path = format!("{first}{sep}cursor={}", urlencode(next));
            }
            None => return (items, pages),
        }
        assert!(pages < 100, "paging never ends");
    }
}

async fn every_list_route_pages_past_its_limit_with_a_cursor(backend: Backend) {
    let app = spawn(backend).await;
    // 1,205 tasks, three at a time created in the same instant (a batch
    // writes its tasks with one time): the cursor must break the ties.
    let base = chrono::Utc::now();
    let rows: Vec<String> = (0..1205)
        .map(|i| {
            let at = nudge::store::ts(base - chrono::Duration::seconds(i / 3));
            format!(
                "('task-{i:05}', 'sales', 'Call {i}', 'c{}', 'vip_callback', 'cause-{i}', '{{}}', \
                 'open', '{at}', '{at}')",
                i % 7
            )
        })
        .collect();
    let sql = app.db.sql().await;
    sql.execute(&format!(
        "INSERT INTO tasks (id, team, title, client_id, rule, cause, data, status, at, created_at) \
         VALUES {}",
        rows.join(", ")
    ))
    .await;
    sql.close().await;

    // At most 1,000 a page, even when more are asked for; then `next`.
    let body: Value = get(&app, "/api/tasks?limit=5000")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["tasks"].as_array().unwrap().len(), 1000);
    assert!(body["next"].is_string());
    let (all, pages) = all_pages(&app, "/api/tasks?limit=1000", "tasks").await;
    assert_eq!(pages, 2);
    let ids: Vec<&str> = all.iter().map(|t| t["id"].as_str().unwrap()).collect();
    let expected: Vec<String> = (0..1205).map(|i| format!("task-{i:05}")).collect();
    assert_eq!(ids, expected, "every task once, newest first, ties by id");
    // Smaller pages give the same sequence; filters page too.
    let (small, pages) = all_pages(&app, "/api/tasks?limit=250", "tasks").await;
    assert_eq!(pages, 5);
    assert_eq!(small, all);
    let (c3, _) = all_pages(&app, "/api/tasks?client=c3&limit=50", "tasks").await;
    assert_eq!(c3.len(), (0..1205).filter(|i| i % 7 == 3).count());
    // The default page is 100; a damaged cursor is refused, saying so.
    let body: Value = get(&app, "/api/tasks").await.json().await.unwrap();
    assert_eq!(body["tasks"].as_array().unwrap().len(), 100);
    for route in ["/api/tasks", "/api/rejected", "/api/clients?q=x"] {
        let sep = if route.contains('?') { '&' } else { '?' };
        let r = get(&app, &format!("{route}{sep}cursor=nonsense")).await;
        assert_eq!(r.status(), 400, "{route}");
        assert!(
            r.json::<Value>().await.unwrap()["error"]
                .as_str()
                .unwrap()
                .contains("cursor")
        );
    }

    // Rejected envelopes and client search page the same way.
    for i in 0..7 {
        app.publish_raw(
            "order_placed",
            &format!("junk-{i}"),
            format!("junk {i}").into_bytes(),
        )
        .await;
    }
    for i in 0..25 {
        app.publish(&registered_at(
            &format!("r-pg{i}"),
            &format!("pager{i:02}"),
            &ago(86_400),
        ))
        .await;
    }
    app.wait_events(25).await;
    eventually(Duration::from_secs(20), "7 rejected envelopes", || async {
        let n = get(&app, "/api/rejected")
            .await
            .json::<Value>()
            .await
            .ok()?["rejected"]
            .as_array()?
            .len();
        (n == 7).then_some(())
    })
    .await;
    let (rejected, pages) = all_pages(&app, "/api/rejected?limit=3", "rejected").await;
    assert_eq!((rejected.len(), pages), (7, 3));
    let mut payloads: Vec<&str> = rejected
        .iter()
        .map(|r| r["payload"].as_str().unwrap())
        .collect();
    assert_eq!(payloads[0], "junk 6", "newest first");
    payloads.sort();
    payloads.dedup();
    assert_eq!(payloads.len(), 7);
    let (found, pages) = all_pages(&app, "/api/clients?q=pager&limit=10", "clients").await;
    assert_eq!(pages, 3);
    let mut ids: Vec<&str> = found
        .iter()
        .map(|c| c["client_id"].as_str().unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 25, "every client once: {ids:?}");
    app.stop().await;
}

backend_tests!(
    every_list_route_pages_past_its_limit_with_a_cursor,
    the_360_view_is_complete_and_real_time,
    search_paging_unknown_clients_and_tokens,
    the_live_feed_streams_tasks_as_they_are_made,
);
