//! Hostile data and rule mistakes in a running daemon (issue 20): numbers
//! that would sum to infinity, orders of a thousand products, a new event
//! type per event, nudge's own types sent by the shop, rules asking for
//! timers centuries away, printing megabytes, mailing a thousand times,
//! remembering without end, and a stored client state nudge cannot read.
//! Each is refused with a reason or capped with a note; the good events
//! around them get their mails within seconds, the odd client's later
//! events are still accepted, its 360 view answers, and its state stays small.

use crate::helpers::{Backend, TestApp, TestEnv, ago, event, eventually, registered_at};
use nudge::domain::event::ClientId;
use nudge::store::Staff;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// A rule that does every hostile thing a marketer's mistake can, by `data.mode`.
const HOSTILE_RULE: &str = r#"
const ON = ["page_viewed", "order_placed"];
if event.type == "order_placed" {
    add("revenue", "month", event.data.total ?? 0);
    client_add("spent", "month", event.data.total ?? 0);
    return;
}
switch event.data.mode {
    "after_max" => after(9223372036854775807, "x"),
    "after_days" => after(days(200000000), "x"),
    "infinite" => add("revenue", "month", 1e308 * 10.0),
    "prints" => { let s = "x"; for i in 0..16 { s += s; } s.truncate(60000); for i in 0..1000 { print(s); } }
    "mails" => { for i in 0..1000 { mail("welcome"); } }
    "remember" => { let v = "v"; for i in 0..12 { v += v; } for i in 0..1000 { remember(`k${i}`, v); } }
    "timers" => { for i in 0..1000 { after(60, `t${i}`); } }
}
"#;

fn odd(id: &str, ty: &str, data: Value) -> Value {
    event(id, ty, "odd", &ago(3000), data, json!({}))
}

/// Bytes of a client's stored state.
async fn state_bytes(app: &TestApp, client: &str, backend: Backend) -> i64 {
    let sql = app.db.sql().await;
    let q = match backend {
        Backend::Sqlite => {
            format!("SELECT length(state) FROM clients WHERE client_id = '{client}'")
        }
        Backend::Postgres => {
            format!(
                "SELECT octet_length(state::text)::bigint FROM clients WHERE client_id = '{client}'"
            )
        }
    };
    sql.scalar(&q).await
}

async fn hostile_numbers_sizes_and_rule_mistakes_never_stop_the_stream(backend: Backend) {
    let env = TestEnv::with_env(backend, &[("NUDGE__NATS__MAX_EVENT_BYTES", "65536")]).await;
    std::fs::write(env.rules_dir().join("hostile.rhai"), HOSTILE_RULE).unwrap();
    let app = env.start().await;
    let started = Instant::now();

    app.publish(&registered_at("g0", "good0", &ago(4000))).await;
    app.publish(&registered_at("r-odd", "odd", &ago(3990)))
        .await;
    // Refused at the edge, with a reason.
    app.publish(&odd("big1", "order_placed", json!({"total": 1e308})))
        .await;
    app.publish(&odd("big2", "order_placed", json!({"total": 1e308})))
        .await;
    app.publish(&odd("tm", "timer", json!({"name": "x"}))).await;
    app.publish(&odd("sw", "sweep", json!({}))).await;
    // Accepted: an escaped backslash before u0000 is no NUL.
    app.publish(&odd("bs", "page_viewed", json!({"note": "\\u0000"})))
        .await;
    // 40 orders of 1,100 products each, at the money bound.
    for i in 0..40 {
        let items: Vec<Value> = (0..1100)
            .map(|p| json!({"product_id": format!("p{}", i * 1100 + p), "quantity": 1}))
            .collect();
        app.publish(&odd(
            &format!("o{i}"),
            "order_placed",
            json!({"total": 1e12, "items": items}),
        ))
        .await;
    }
    // A new event type per event.
    for i in 0..300 {
        app.publish(&odd(&format!("ty{i}"), &format!("made_up_{i}"), json!({})))
            .await;
    }
    app.publish(&registered_at("g1", "good1", &ago(2000))).await;
    for mode in [
        "after_max",
        "after_days",
        "infinite",
        "prints",
        "mails",
        "remember",
        "timers",
    ] {
        app.publish(&odd(
            &format!("m-{mode}"),
            "page_viewed",
            json!({"mode": mode}),
        ))
        .await;
    }
    app.publish(&odd("later", "login_succeeded", json!({})))
        .await;
    app.publish(&registered_at("g2", "good2", &ago(1000))).await;

    // The good clients' welcome mails come through, and soon.
    let deadline = Duration::from_secs(30);
    eventually(deadline, "the good clients' welcome mails", || async {
        let mails = app.mails();
        ["good0", "good1", "good2"]
            .iter()
            .all(|c| mails.iter().any(|m| m.to == format!("{c}@example.com")))
            .then_some(())
    })
    .await;
    let mail_secs = started.elapsed().as_secs_f64();

    // What the edge refused, with its reason.
    let sql = app.db.sql().await;
    let reasons: Vec<String> = sql
        .rows("SELECT reason FROM rejected")
        .await
        .into_iter()
        .filter_map(|r| r[0].clone())
        .collect();
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    assert_eq!(
        reasons
            .iter()
            .filter(|r| r.contains("beyond the bound"))
            .count(),
        2,
        "{reasons:?}"
    );
    assert_eq!(
        reasons
            .iter()
            .filter(|r| r.contains("reserved for nudge"))
            .count(),
        2,
        "{reasons:?}"
    );

    // Every other event of the odd client was accepted, the last one too.
    eventually(
        Duration::from_secs(20),
        "the odd client's events stored",
        || async {
            let n = sql
                .scalar("SELECT COUNT(*) FROM events WHERE client_id = 'odd'")
                .await;
            // Registration, the escaped backslash, 40 orders, 300 types, 7 modes, the later one.
            (n == 1 + 1 + 40 + 300 + 7 + 1).then_some(())
        },
    )
    .await;
    assert_eq!(
        sql.scalar("SELECT COUNT(*) FROM events WHERE id = 'later'")
            .await,
        1
    );

    // The 360 view answers, with finite numbers.
    let resp = app.get("/api/clients/odd").await;
    assert_eq!(resp.status(), 200);
    let view: Value = resp.json().await.unwrap();
    let text = view.to_string();
    assert!(
        !text.contains("Infinity") && !text.contains("NaN"),
        "{text:.300}"
    );

    // Mistakes failed their run; caps were noted in the client's log.
    let log = app
        .store
        .client_log(&ClientId::parse("odd").unwrap(), 500)
        .await
        .unwrap();
    let has = |s: &str| log.iter().any(|l| l.message.contains(s));
    for expected in [
        "rules.max_delay_days",
        "finite number within",
        "rules.max_log_bytes_per_run",
        "rules.max_mails_per_run",
        "rules.max_facts_per_rule",
        "rules.max_timers_per_rule",
    ] {
        assert!(has(expected), "`{expected}` in the client's log: {log:#?}");
    }
    // At most max_mails_per_run of the thousand welcome mails were queued.
    app.wait_outbox_settled().await;
    let odd_mails = app
        .mails()
        .iter()
        .filter(|m| m.to == "odd@example.com")
        .count();
    let cap = app.config.rules.max_mails_per_run.get();
    assert!(odd_mails <= cap + 1, "{odd_mails} mails to the odd client");

    // The state stays small: 44,000 products bought, 300 types, 50 facts.
    let bytes = state_bytes(&app, "odd", backend).await;
    assert!(bytes < 600_000, "the odd client's state is {bytes} bytes");
    // And the daemon goes on: one more good client.
    app.publish(&registered_at("g3", "good3", &ago(10))).await;
    eventually(Duration::from_secs(20), "a later welcome mail", || async {
        app.mails()
            .iter()
            .any(|m| m.to == "good3@example.com")
            .then_some(())
    })
    .await;
    println!(
        "hostile data ({backend:?}): 4 refused at the edge with their reason, {} events of the odd \
         client accepted, its state {bytes} bytes, {odd_mails} mails to it; good mails within {mail_secs:.1} s",
        sql.scalar("SELECT COUNT(*) FROM events WHERE client_id = 'odd'")
            .await
    );
}

async fn a_stored_state_nudge_cannot_read_starts_fresh_and_the_client_goes_on(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.start().await;
    app.publish(&registered_at("r1", "ana", &ago(600))).await;
    app.publish(&registered_at("r0", "cleo", &ago(650))).await;
    app.publish(&event(
        "o1",
        "order_placed",
        "ana",
        &ago(500),
        json!({"total": 10}),
        json!({}),
    ))
    .await;
    app.wait_events(3).await;
    app.wait_mails(2).await;
    let env = app.stop().await;
    // What a state written before these fixes could hold: an infinite spend
    // (written as null) and a part of the wrong shape.
    let sql = env.db.sql().await;
    sql.execute(match backend {
        Backend::Sqlite => {
            "UPDATE clients SET state = json_set(state, '$.stats.spend', json('null'), \
             '$.counters', json('{\"spent/all\": null}'), '$.timers', json('{\"not\": \"a list\"}')) \
             WHERE client_id = 'ana'"
        }
        Backend::Postgres => {
            "UPDATE clients SET state = jsonb_set(jsonb_set(jsonb_set(state::jsonb, '{stats,spend}', 'null'), \
             '{counters}', '{\"spent/all\": null}'), '{timers}', '{\"not\": \"a list\"}')::json \
             WHERE client_id = 'ana'"
        }
    })
    .await;
    // And a state with nothing of a client in it: no readable id at all.
    sql.execute("UPDATE clients SET state = '{\"nonsense\": true}' WHERE client_id = 'cleo'")
        .await;
    let app = env.start().await;
    let resp = app.get("/api/clients/cleo").await;
    assert_eq!(resp.status(), 200, "the 360 view of an unreadable state");
    let resp = app.get("/api/clients/ana").await;
    assert_eq!(resp.status(), 200, "the 360 view of a damaged state");
    app.publish(&event(
        "o2",
        "order_placed",
        "ana",
        &ago(100),
        json!({"total": 5}),
        json!({}),
    ))
    .await;
    app.publish(&registered_at("r2", "bob", &ago(50))).await;
    app.publish(&event(
        "o3",
        "order_placed",
        "cleo",
        &ago(40),
        json!({"total": 7}),
        json!({}),
    ))
    .await;
    app.wait_events(6).await;
    eventually(Duration::from_secs(20), "bob's welcome mail", || async {
        app.mails()
            .iter()
            .any(|m| m.to == "bob@example.com")
            .then_some(())
    })
    .await;
    let sql = app.db.sql().await;
    assert_eq!(sql.scalar("SELECT COUNT(*) FROM rejected").await, 0);
    let view: Value = app.get("/api/clients/ana").await.json().await.unwrap();
    assert_eq!(
        view.pointer("/orders/online/count"),
        Some(&json!(2)),
        "the readable parts kept and the new order counted: {view:#}"
    );
    assert_eq!(
        view["total_spent"],
        json!(5.0),
        "the spend stored as null read as 0, then the new order: {view:#}"
    );
    let view: Value = app.get("/api/clients/cleo").await.json().await.unwrap();
    assert_eq!(
        view["total_spent"],
        json!(7.0),
        "an unreadable state starts fresh, and the client goes on: {view:#}"
    );
}

backend_tests!(
    hostile_numbers_sizes_and_rule_mistakes_never_stop_the_stream,
    a_stored_state_nudge_cannot_read_starts_fresh_and_the_client_goes_on,
);
