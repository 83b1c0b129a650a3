//! Rules that act on time: the shipped idle_reminder, browse_discount and
//! quick_leave rules, with back-dated events instead of waiting.

use crate::helpers::{Backend, TestApp, TestEnv, ago, event, eventually, registered_at};
use serde_json::{Value, json};
use std::time::Duration;

/// The templates of the mails `to` got, sorted: mails sent at once may
/// arrive in any order.
fn templates_to(app: &TestApp, to: &str) -> Vec<String> {
    let mut t: Vec<String> = app
        .mails()
        .into_iter()
        .filter(|m| m.to == to)
        .map(|m| m.header("X-Nudge-Template").unwrap())
        .collect();
    t.sort();
    t
}

const DAY: i64 = 86_400;

async fn idle_reminder_once_per_idle_period_and_run_on_demand(backend: Backend) {
    // No catch-up of this morning's sweep at start: it could run after the
    // registrations below and leave nothing for the run on demand.
    let app = TestEnv::with_env(backend, &[("NUDGE__SCHEDULER__CATCH_UP_HOURS", "0")])
        .await
        .start()
        .await;
    app.publish(&registered_at("i-1", "idle", &ago(40 * DAY)))
        .await;
    app.publish(&registered_at("i-2", "active", &ago(2 * DAY)))
        .await;
    app.wait_mails(2).await; // the two welcome mails

    let r: Value = app
        .post("/api/rules/idle_reminder/run")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(r["sweep"]["clients"], 2, "{r}");
    assert_eq!(r["sweep"]["effects"], 1, "{r}");
    app.wait_mails(3).await;
    assert_eq!(
        templates_to(&app, "idle@example.com"),
        ["idle_reminder", "welcome"]
    );
    assert_eq!(templates_to(&app, "active@example.com"), ["welcome"]);
    let reminder = app
        .mails()
        .into_iter()
        .find(|m| m.subject.contains("missed"))
        .unwrap();
    assert!(reminder.text.contains("40 days"), "{}", reminder.text);

    // The same idle period: no second reminder.
    tokio::time::sleep(Duration::from_millis(1100)).await; // a new sweep slot
    let r: Value = app
        .post("/api/rules/idle_reminder/run")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(r["sweep"]["effects"], 0, "{r}");

    // Seen again 20 days ago, idle since: a new period, a new reminder.
    let seen = event(
        "i-3",
        "login_succeeded",
        "idle",
        &ago(20 * DAY),
        json!({}),
        json!({}),
    );
    app.publish(&seen).await;
    app.wait_events(3).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r: Value = app
        .post("/api/rules/idle_reminder/run")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(r["sweep"]["effects"], 1, "{r}");
    app.wait_mails(4).await;
    assert_eq!(
        templates_to(&app, "idle@example.com"),
        ["idle_reminder", "idle_reminder", "welcome"]
    );

    // Unknown or unscheduled rules are refused clearly.
    assert_eq!(app.post("/api/rules/nope/run").await.status(), 404);
    assert_eq!(app.post("/api/rules/welcome/run").await.status(), 400);
    app.stop().await;
}

fn view(id: &str, client: &str, secs_ago: i64, session: &str) -> Value {
    event(
        id,
        "product_viewed",
        client,
        &ago(secs_ago),
        json!({"product_id": "p1", "name": "Lamp", "price": 40}),
        json!({"session_id": session}),
    )
}

async fn browse_discount_for_long_browsing_without_cart_and_not_twice_a_week(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for c in ["bea", "carl", "dan"] {
        app.publish(&registered_at(&format!("reg-{c}"), c, &ago(3 * DAY)))
            .await;
    }
    // bea browses 16 minutes: discount.
    app.publish(&view("b1", "bea", 3600, "sb")).await;
    app.publish(&view("b2", "bea", 3000, "sb")).await;
    app.publish(&view("b3", "bea", 3600 - 16 * 60, "sb")).await;
    // carl browses as long but adds to cart.
    app.publish(&view("c1", "carl", 3600, "sc")).await;
    let cart = event(
        "c2",
        "cart_item_added",
        "carl",
        &ago(3300),
        json!({"product_id": "p1", "quantity": 1, "price": 40}),
        json!({"session_id": "sc"}),
    );
    app.publish(&cart).await;
    app.publish(&view("c3", "carl", 3600 - 16 * 60, "sc")).await;
    // dan browses 10 minutes only.
    app.publish(&view("d1", "dan", 3600, "sd")).await;
    app.publish(&view("d2", "dan", 3000, "sd")).await;
    app.wait_events(11).await;
    // bea again, a new long session two hours later than the first: within the cooldown.
    app.publish(&view("b4", "bea", 1800, "sb2")).await;
    app.publish(&view("b5", "bea", 1800 - 20 * 60, "sb2")).await;
    app.wait_events(13).await;

    let mails = app.wait_mails(4).await;
    let discount: Vec<_> = mails
        .iter()
        .filter(|m| m.header("X-Nudge-Template").as_deref() == Some("browse_discount"))
        .collect();
    assert_eq!(discount.len(), 1, "{mails:#?}");
    assert_eq!(discount[0].to, "bea@example.com");
    let code = discount[0]
        .text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("BROWSE-"))
        .expect("a code in the mail");
    assert_eq!(code.len(), "BROWSE-".len() + 10);
    assert!(discount[0].html.contains(code));
    app.wait_outbox_settled().await;
    assert_eq!(app.mails().len(), 4);
    app.stop().await;
}

async fn quick_leave_after_one_page_and_a_fast_exit(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for c in ["eli", "finn", "gia"] {
        app.publish(&registered_at(&format!("reg-{c}"), c, &ago(3 * DAY)))
            .await;
    }
    let ctx = |s: &str| json!({"session_id": s});
    let page = |id: &str, c: &str, t: i64, s: &str| {
        event(id, "page_viewed", c, &ago(t), json!({"url": "/"}), ctx(s))
    };
    // eli: one page, leaves after 10 s.
    app.publish(&event(
        "e0",
        "session_started",
        "eli",
        &ago(600),
        json!({}),
        ctx("se"),
    ))
    .await;
    app.publish(&page("e1", "eli", 600, "se")).await;
    app.publish(&event(
        "e2",
        "session_ended",
        "eli",
        &ago(590),
        json!({}),
        ctx("se"),
    ))
    .await;
    // finn: two pages.
    app.publish(&page("f1", "finn", 600, "sf")).await;
    app.publish(&page("f2", "finn", 590, "sf")).await;
    app.publish(&event(
        "f3",
        "session_ended",
        "finn",
        &ago(585),
        json!({}),
        ctx("sf"),
    ))
    .await;
    // gia: no session ids; one page two hours ago and silence since: the
    // timer, already due, fires at once.
    app.publish(&event(
        "g1",
        "page_viewed",
        "gia",
        &ago(7200),
        json!({"url": "/"}),
        json!({}),
    ))
    .await;

    let mails = app.wait_mails(5).await;
    app.wait_outbox_settled().await;
    let mut leavers: Vec<_> = app
        .mails()
        .into_iter()
        .filter(|m| m.header("X-Nudge-Template").as_deref() == Some("quick_leave"))
        .map(|m| m.to)
        .collect();
    leavers.sort();
    assert_eq!(
        leavers,
        ["eli@example.com", "gia@example.com"],
        "{mails:#?}"
    );
    // Not more than once a month: eli leaves quickly again.
    app.publish(&page("e3", "eli", 300, "se2")).await;
    app.publish(&event(
        "e4",
        "session_ended",
        "eli",
        &ago(295),
        json!({}),
        ctx("se2"),
    ))
    .await;
    app.wait_events(12).await;
    app.wait_outbox_settled().await;
    assert_eq!(
        templates_to(&app, "eli@example.com"),
        ["quick_leave", "welcome"]
    );
    app.stop().await;
}

async fn a_pending_timer_survives_a_restart(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    // The marketer's knob: wait 3 s of silence instead of 30 minutes.
    let file = app.rules_dir().join("quick_leave.rhai");
    let src = std::fs::read_to_string(&file)
        .unwrap()
        .replace("const WAIT_SECONDS = 1800;", "const WAIT_SECONDS = 3;");
    std::fs::write(&file, src).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    app.publish(&registered_at("reg-h", "hana", &ago(DAY)))
        .await;
    app.publish(&event(
        "h1",
        "page_viewed",
        "hana",
        &ago(0),
        json!({"url": "/"}),
        json!({}),
    ))
    .await;
    app.wait_events(2).await;
    app.wait_mails(1).await;

    // Down before the timer is due, back after.
    let env = app.stop().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(env.mails().len(), 1, "nothing while down");
    let app = env.start().await;
    let mails = eventually(Duration::from_secs(15), "the quick_leave mail", || async {
        let t = templates_to(&app, "hana@example.com");
        (t.len() == 2).then_some(t)
    })
    .await;
    assert_eq!(mails, ["quick_leave", "welcome"]);
    app.stop().await;
}

backend_tests!(
    idle_reminder_once_per_idle_period_and_run_on_demand,
    browse_discount_for_long_browsing_without_cart_and_not_twice_a_week,
    quick_leave_after_one_page_and_a_fast_exit,
    a_pending_timer_survives_a_restart,
);
