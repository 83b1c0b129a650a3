//! Mail people trust: consent, one-click unsubscribe, caps, quiet hours, a
//! sender that survives its SMTP server, and GDPR export and erasure.

use crate::helpers::{Backend, TestApp, TestEnv, ago, event, eventually, registered_at};
use nudge::domain::event::ClientId;
use nudge::store::{Outbox, Staff, State};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

const DAY: i64 = 86_400;

fn view(id: &str, client: &str, secs_ago: i64, session: &str) -> Value {
    event(
        id,
        "product_viewed",
        client,
        &ago(secs_ago),
        json!({"product_id": "p1"}),
        json!({"session_id": session}),
    )
}

/// A browse long enough for a discount mail (marketing), in its own session.
async fn browse(app: &TestApp, client: &str, session: &str, secs_ago: i64) {
    app.publish(&view(&format!("{session}-a"), client, secs_ago, session))
        .await;
    app.publish(&view(
        &format!("{session}-b"),
        client,
        secs_ago - 16 * 60,
        session,
    ))
    .await;
}

/// The templates mailed to `to`, sorted (the Maildir's order is not the sending order).
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

async fn log_lines(app: &TestApp, client: &str) -> Vec<String> {
    let id = ClientId::parse(client).unwrap();
    app.store
        .client_log(&id, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.message)
        .collect()
}

async fn no_marketing_without_consent_and_none_after_a_one_click_unsubscribe(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut no_consent = registered_at("r-nc", "nico", &ago(20 * DAY));
    no_consent["data"]["marketing_consent"] = json!(false);
    app.publish(&no_consent).await;
    app.publish(&registered_at("r-ul", "ula", &ago(20 * DAY)))
        .await;
    browse(&app, "nico", "sn1", 10 * DAY).await;
    browse(&app, "ula", "su1", 10 * DAY).await;
    app.wait_events(6).await;
    app.wait_mails(3).await;
    app.wait_outbox_settled().await;
    assert_eq!(templates_to(&app, "nico@example.com"), ["welcome"]);
    assert!(
        log_lines(&app, "nico")
            .await
            .iter()
            .any(|l| l.contains("skipped: the client has not given marketing consent")),
        "the skip is in the process log"
    );

    // The marketing mail carries the RFC 8058 headers and a signed link.
    let offer = app
        .mails()
        .into_iter()
        .find(|m| m.to == "ula@example.com" && m.subject.contains("caught your eye"))
        .unwrap();
    assert_eq!(
        offer.header("List-Unsubscribe-Post").as_deref(),
        Some("List-Unsubscribe=One-Click")
    );
    let header = offer.header("List-Unsubscribe").unwrap();
    let url = header.trim_start_matches('<').trim_end_matches('>');
    let path = &url[url.find("/unsubscribe/").unwrap()..];
    assert!(offer.text.contains(url), "the link is in the mail too");
    // Welcome mail is service mail: no unsubscribe headers.
    let welcome = app
        .mails()
        .into_iter()
        .find(|m| m.to == "ula@example.com" && m.subject.contains("Welcome"))
        .unwrap();
    assert!(welcome.header("List-Unsubscribe").is_none());

    // A tampered link is refused; the real one shows a page, then one click.
    let client = reqwest::Client::new();
    let base = format!("http://{}", app.http);
    // The last character of the signature changed (to one it is not).
    let swap = if path.ends_with('0') { '1' } else { '0' };
    let tampered = format!("{base}{}{swap}", &path[..path.len() - 1]);
    let r = client
        .post(&tampered)
        .body("List-Unsubscribe=One-Click")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = client.get(format!("{base}{path}")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("<form method=\"post\">"));
    let r = client
        .post(format!("{base}{path}"))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("List-Unsubscribe=One-Click")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    app.wait_events(7).await; // the unsubscribed event, through the stream

    // Another long browse eight days later: no mail.
    browse(&app, "ula", "su2", 2 * DAY).await;
    app.wait_events(9).await;
    app.wait_outbox_settled().await;
    assert_eq!(
        templates_to(&app, "ula@example.com"),
        ["browse_discount", "welcome"]
    );
    assert!(
        log_lines(&app, "ula")
            .await
            .iter()
            .any(|l| l.contains("the client unsubscribed"))
    );
    app.stop().await;
}

async fn the_daily_cap_stops_a_second_marketing_mail(backend: Backend) {
    let env = TestEnv::with_env(backend, &[("NUDGE__MAIL__MAX_MARKETING_PER_DAY", "1")]).await;
    let app = env.start().await;
    app.publish(&registered_at("r-ca", "cap", &ago(3 * DAY)))
        .await;
    browse(&app, "cap", "sc1", 2 * DAY).await;
    // The same day: a quick leave (one page, gone) would be a second marketing mail.
    let ctx = json!({"session_id": "sc2"});
    app.publish(&event(
        "ql1",
        "page_viewed",
        "cap",
        &ago(2 * DAY - 3600),
        json!({"url": "/"}),
        ctx.clone(),
    ))
    .await;
    app.publish(&event(
        "ql2",
        "session_ended",
        "cap",
        &ago(2 * DAY - 3610),
        json!({}),
        ctx,
    ))
    .await;
    app.wait_events(5).await;
    app.wait_outbox_settled().await;
    assert_eq!(
        templates_to(&app, "cap@example.com"),
        ["browse_discount", "welcome"]
    );
    assert!(
        log_lines(&app, "cap")
            .await
            .iter()
            .any(|l| l.contains("the cap of 1 per day is reached")),
        "{:?}",
        log_lines(&app, "cap").await
    );
    app.stop().await;
}

async fn a_marketing_mail_in_quiet_hours_waits_for_the_morning(backend: Backend) {
    let env = TestEnv::with_env(
        backend,
        &[
            ("NUDGE__MAIL__QUIET_HOURS__START", "21:00"),
            ("NUDGE__MAIL__QUIET_HOURS__END", "08:00"),
        ],
    )
    .await;
    // The sender's clock: 22:30 UTC tomorrow, night in Paris where the
    // client lives (23:30, or 00:30 in summer time). Ahead of the real
    // clock, so the mails queued now are due by it.
    let tomorrow = chrono::Utc::now().date_naive() + chrono::Days::new(1);
    let night = tomorrow
        .and_hms_opt(22, 30, 0)
        .unwrap()
        .and_utc()
        .timestamp();
    let clock_secs = Arc::new(AtomicI64::new(night));
    let c = clock_secs.clone();
    let clock: nudge::delivery::Clock =
        Arc::new(move || chrono::DateTime::from_timestamp(c.load(Ordering::SeqCst), 0).unwrap());
    let app = env.start_with_clock(clock).await;
    let mut reg = registered_at("r-q", "quinn", &ago(3 * DAY));
    reg["data"]["timezone"] = json!("Europe/Paris");
    app.publish(&reg).await;
    browse(&app, "quinn", "sq", DAY).await;
    app.wait_events(3).await;
    // The welcome (service) mail goes at once; the offer waits.
    app.wait_mails(1).await;
    let deferred = eventually(Duration::from_secs(10), "the deferred offer", || async {
        let rows = app.store.list_outbox(10).await.ok()?;
        rows.into_iter().find(|r| {
            r.rule == "browse_discount"
                && r.status == "pending"
                && r.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("quiet hours"))
        })
    })
    .await;
    assert_eq!(deferred.attempts, 0, "a deferral is not a failed attempt");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(templates_to(&app, "quinn@example.com"), ["welcome"]);

    // 07:01 UTC the day after: 08:01 in Paris (09:01 in summer), it goes.
    let morning = night + (8 * 60 + 31) * 60;
    clock_secs.store(morning, Ordering::SeqCst);
    eventually(
        Duration::from_secs(10),
        "the offer after the night",
        || async {
            (templates_to(&app, "quinn@example.com") == ["browse_discount", "welcome"])
                .then_some(())
        },
    )
    .await;
    app.stop().await;
}

async fn smtp_down_for_a_while_then_back_every_mail_arrives_once_and_a_550_fails(backend: Backend) {
    let mut env = TestEnv::new(backend).await;
    env.smtp.stop();
    let app = env.start().await;
    for c in ["sam", "sia", "sol"] {
        app.publish(&registered_at(&format!("r-{c}"), c, &ago(DAY)))
            .await;
    }
    let mut rejected = registered_at("r-rej", "rejectme", &ago(DAY));
    rejected["data"]["email"] = json!("reject-me@example.com");
    app.publish(&rejected).await;
    // The server is down: attempts fail and are retried.
    eventually(Duration::from_secs(15), "failed attempts", || async {
        let rows = app.store.list_outbox(10).await.ok()?;
        (rows.len() == 4
            && rows
                .iter()
                .all(|r| r.status == "pending" && r.attempts >= 1 && r.last_error.is_some()))
        .then_some(())
    })
    .await;
    let mut env = app.stop().await;
    env.smtp.restart().expect("the SMTP sink restarts");
    let app = env.start().await;
    app.wait_outbox_settled().await;
    let mails = app.mails();
    let mut to: Vec<_> = mails.iter().map(|m| m.to.clone()).collect();
    to.sort();
    assert_eq!(
        to,
        ["sam@example.com", "sia@example.com", "sol@example.com"]
    );
    let rows = app.store.list_outbox(10).await.unwrap();
    let failed: Vec<_> = rows.iter().filter(|r| r.status == "failed").collect();
    assert_eq!(failed.len(), 1, "{rows:?}");
    assert!(
        failed[0].last_error.as_deref().unwrap().contains("550"),
        "{failed:?}"
    );
    assert_eq!(failed[0].client_id, "rejectme");
    app.stop().await;
}

async fn export_erase_and_a_replay_after_erase(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.publish(&registered_at("r-g", "gdpr", &ago(3 * DAY)))
        .await;
    app.publish(&registered_at("r-k", "keep", &ago(3 * DAY)))
        .await;
    app.publish(&event(
        "o-g",
        "order_placed",
        "gdpr",
        &ago(DAY),
        json!({"order_id": "o1", "total": 50, "items": []}),
        json!({}),
    ))
    .await;
    app.wait_events(3).await;
    app.wait_mails(2).await;
    app.wait_outbox_settled().await;

    let export: Value = app
        .get("/api/clients/gdpr/export")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(export["history"]["profile"]["email"], "gdpr@example.com");
    assert_eq!(export["events"].as_array().unwrap().len(), 2);
    assert_eq!(export["mails"].as_array().unwrap().len(), 1);
    assert!(!export["log"].as_array().unwrap().is_empty());
    assert_eq!(app.get("/api/clients/nobody/export").await.status(), 404);

    let r = reqwest::Client::new()
        .delete(format!("http://{}/api/clients/gdpr", app.http))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(app.get("/api/clients/gdpr/export").await.status(), 404);

    let env = app.stop().await;
    let sql = env.db.sql().await;
    let leaks = sql
        .scalar(
            "SELECT (SELECT COUNT(*) FROM events WHERE CAST(data AS TEXT) LIKE '%gdpr@%' \
                     OR CAST(context AS TEXT) LIKE '%gdpr@%') \
                  + (SELECT COUNT(*) FROM outbox WHERE CAST(payload AS TEXT) LIKE '%gdpr@%') \
                  + (SELECT COUNT(*) FROM clients WHERE client_id = 'gdpr')",
        )
        .await;
    assert_eq!(leaks, 0, "no personal data left");
    let events = sql
        .scalar("SELECT COUNT(*) FROM events WHERE client_id = 'gdpr'")
        .await;
    assert_eq!(events, 2, "the events stay, emptied, for the aggregates");
    sql.close().await;

    // A replay does not bring them back; the other client is rebuilt.
    let store = nudge::app::open_store(&env.config).await.unwrap();
    nudge::tools::replay(&env.config, &store, |_| {})
        .await
        .unwrap();
    let states = store
        .load_clients(&[
            &ClientId::parse("gdpr").unwrap(),
            &ClientId::parse("keep").unwrap(),
        ])
        .await
        .unwrap();
    assert_eq!(states.len(), 1);
    assert!(states.contains_key(&ClientId::parse("keep").unwrap()));
}

/// Every form in which a client id could show in a URL.
fn id_forms(id: &str) -> Vec<String> {
    vec![
        id.to_string(),
        nudge::delivery::mailer::percent_encode(id),
        hex::encode(id),
        base64(id.as_bytes(), b"+/"),
        base64(id.as_bytes(), b"-_"),
    ]
}

/// Base64 without padding, with the two last letters of the alphabet given.
fn base64(bytes: &[u8], last: &[u8; 2]) -> String {
    let mut abc: Vec<u8> = (b'A'..=b'Z')
        .chain(b'a'..=b'z')
        .chain(b'0'..=b'9')
        .collect();
    abc.extend_from_slice(last);
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(abc[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

async fn mail_headers_list_id_auto_submitted_encoded_links_title_lang_and_opaque_tokens(
    backend: Backend,
) {
    let app = TestApp::spawn(backend).await;
    // A client id with `&` and spaces, and a German locale.
    let vip = "vip & co 7";
    let mut reg = registered_at("r-vip", vip, &ago(20 * DAY));
    reg["data"]["locale"] = json!("de_DE");
    reg["data"]["email"] = json!("vip@example.com");
    app.publish(&reg).await;
    app.publish(&registered_at("r-plain", "plain", &ago(20 * DAY)))
        .await;
    browse(&app, vip, "sv1", 10 * DAY).await;
    // A client without consent browses too: the offer is skipped, counted.
    let mut nico = registered_at("r-nico", "nico", &ago(20 * DAY));
    nico["data"]["marketing_consent"] = json!(false);
    app.publish(&nico).await;
    browse(&app, "nico", "sn1", 10 * DAY).await;
    // Three orders this month: vip_callback hands sales a task, mailed.
    for i in 0..3 {
        app.publish(&event(
            &format!("o-vip-{i}"),
            "order_placed",
            vip,
            &ago(600 - 60 * i),
            // Through a partner: each order also emits `partner_commission`.
            json!({"order_id": format!("o{i}"), "channel": "online", "total": 20.0,
                   "currency": "EUR", "items": [], "partner_track_id": "acme"}),
            json!({}),
        ))
        .await;
    }
    app.wait_events(10).await;
    let mails = app.wait_mails(5).await;
    app.wait_outbox_settled().await;
    let find = |to: &str, template: &str| {
        mails
            .iter()
            .find(|m| m.to == to && m.header("X-Nudge-Template").as_deref() == Some(template))
            .unwrap_or_else(|| panic!("a {template} mail to {to} in {mails:#?}"))
            .clone()
    };

    // Marketing mail: a List-Id naming rule and template under the sender's
    // domain, with a display name; no auto-reply markers (a person may answer).
    let offer = find("vip@example.com", "browse_discount");
    assert_eq!(
        offer
            .header("List-Id")
            .map(|v| v.replace("\r\n", "").replace('\n', ""))
            .as_deref(),
        Some(
            "\"browse_discount (browse_discount)\" <browse_discount.browse_discount.nudge.shop.test>"
        )
    );
    assert!(offer.header("Auto-Submitted").is_none());
    // The HTML part has the subject as its title and the client's language.
    assert!(
        offer.html.contains("<html lang=\"de-DE\">"),
        "{}",
        offer.html
    );
    let title = format!("<title>{}</title>", offer.subject.replace('&', "&amp;"));
    assert!(offer.html.contains(&title), "{title} in {}", offer.html);

    // The unsubscribe link names no client, in any encoding; it still works.
    let header = offer.header("List-Unsubscribe").unwrap();
    let url = header.trim_start_matches('<').trim_end_matches('>');
    let token = &url[url.find("/unsubscribe/").unwrap() + "/unsubscribe/".len()..];
    for form in id_forms(vip) {
        assert!(!token.contains(&form), "{form:?} shows in {token}");
    }
    for form in id_forms("vip") {
        assert!(
            !token.to_lowercase().contains(&form.to_lowercase()),
            "{form:?} shows in {token}"
        );
    }
    let r = app.get(&format!("/unsubscribe/{token}")).await;
    assert_eq!(r.status(), 200, "the opaque link opens its page");

    // Service mail: no List-Id; a client without a locale gets lang="en".
    let welcome = find("plain@example.com", "welcome");
    assert!(welcome.header("List-Id").is_none());
    assert!(
        welcome.html.contains("<html lang=\"en\">"),
        "{}",
        welcome.html
    );
    assert!(
        welcome
            .html
            .contains(&format!("<title>{}</title>", welcome.subject))
    );

    // Staff mail: marked automatic, and its link opens this very client.
    let task = find("sales@shop.test", "staff_task");
    assert_eq!(
        task.header("Auto-Submitted").as_deref(),
        Some("auto-generated")
    );
    assert_eq!(
        task.header("X-Auto-Response-Suppress").as_deref(),
        Some("All")
    );
    assert!(task.header("List-Id").is_none());
    let link = format!(
        "{}/#client=vip%20%26%20co%207",
        app.config.http.public_url.trim_end_matches('/')
    );
    assert!(task.text.contains(&link), "{link} in {}", task.text);
    // The HTML part escapes `/` in attributes; the href is the same link.
    let html = task.html.replace("&#x2f;", "/");
    assert!(
        html.contains(&format!("href=\"{link}\"")),
        "{link} in {html}"
    );
    assert!(task.html.contains("<html lang=\"en\">"));

    // Metrics count mails apart from emits, and skips by reason.
    let metrics = app.get("/metrics").await.text().await.unwrap();
    for line in [
        format!("nudge_mails_sent_total {}", mails.len()),
        "nudge_emits_published_total 3".into(),
        "nudge_mails_skipped_total{reason=\"no_consent\"} 1".into(),
        "nudge_mails_deferred_total 0".into(),
        "nudge_rules_quarantined 0".into(),
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in {metrics}");
    }
}

backend_tests!(
    mail_headers_list_id_auto_submitted_encoded_links_title_lang_and_opaque_tokens,
    no_marketing_without_consent_and_none_after_a_one_click_unsubscribe,
    the_daily_cap_stops_a_second_marketing_mail,
    a_marketing_mail_in_quiet_hours_waits_for_the_morning,
    smtp_down_for_a_while_then_back_every_mail_arrives_once_and_a_550_fails,
    export_erase_and_a_replay_after_erase,
);
