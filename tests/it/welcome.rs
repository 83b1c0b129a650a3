//! The first rule end to end: registrations over NATS, mail over SMTP.

use crate::helpers::{Backend, Mail, TestApp, TestEnv, registered};
use nudge::store::{History, Outbox};
use std::time::{Duration, Instant};

async fn each_acquisition_channel_gets_its_welcome_mail(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.publish(&registered("e-1", "ana", "promo", "Ana")).await;
    app.publish(&registered("e-2", "ben", "trial", "Ben")).await;
    app.publish(&registered("e-3", "cleo", "organic", "Cleo"))
        .await;

    let mut mails = app.wait_mails(3).await;
    mails.sort_by(|a, b| a.to.cmp(&b.to));
    let got: Vec<(&str, String)> = mails
        .iter()
        .map(|m| (m.to.as_str(), m.header("X-Nudge-Template").unwrap()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("ana@example.com", "welcome_promo".to_string()),
            ("ben@example.com", "welcome_trial".to_string()),
            ("cleo@example.com", "welcome".to_string()),
        ]
    );
    for m in &mails {
        assert_eq!(m.header("X-Nudge-Rule").as_deref(), Some("welcome"));
        assert!(
            !m.text.is_empty() && !m.html.is_empty(),
            "both parts: {m:?}"
        );
        assert!(m.raw.contains("multipart/alternative"), "{}", m.raw);
        assert!(
            m.message_id.ends_with("nudge@shop.test"),
            "{}",
            m.message_id
        );
    }
    let ana = &mails[0];
    assert_eq!(ana.subject, "Welcome, Ana: your promo code is waiting");
    assert!(ana.text.contains("Hello Ana,"), "{}", ana.text);
    assert!(ana.text.contains("WELCOME10"), "{}", ana.text);
    assert!(
        ana.html.contains("<strong>WELCOME10</strong>"),
        "{}",
        ana.html
    );
    assert!(mails[1].subject.contains("trial"));
    assert_eq!(mails[2].subject, "Welcome, Cleo!");

    let ids: std::collections::HashSet<_> = mails.iter().map(|m| &m.message_id).collect();
    assert_eq!(ids.len(), 3, "Message-IDs are unique");
    app.wait_outbox_settled().await;
    let outbox = app.store.list_outbox(10).await.unwrap();
    assert!(outbox.iter().all(|r| r.status == "sent"), "{outbox:?}");
    app.stop().await;
}

async fn the_same_event_id_twice_gives_one_mail(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let event = registered("e-dup", "dora", "organic", "Dora");
    app.publish(&event).await;
    app.wait_mails(1).await;
    // Published again with a different Nats-Msg-Id, so the broker's own
    // dedupe window cannot hide it: nudge itself must refuse the second one.
    app.publish_raw(
        "client_registered",
        "other-msg-id",
        serde_json::to_vec(&event).unwrap(),
    )
    .await;
    app.publish(&registered("e-next", "eve", "organic", "Eve"))
        .await;
    let mails = app.wait_mails(2).await;
    app.wait_outbox_settled().await;
    let mails_now = app.mails();
    assert_eq!(mails_now.len(), 2, "{mails:?}");
    let to: Vec<_> = mails_now.iter().map(|m| m.to.as_str()).collect();
    assert!(to.contains(&"dora@example.com") && to.contains(&"eve@example.com"));
    assert_eq!(app.store.count_events().await.unwrap(), 2);
    app.stop().await;
}

/// Waits up to 20 s for welcome mails to `to`, all of them; on timeout
/// says what the broker holds for nudge's consumer (a message delivered to
/// a stopped instance shows as pending an ack).
async fn wait_welcomes(app: &TestApp, to: &[&str]) -> Vec<Mail> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // The sweep of `idle_reminder` may mail the same clients: only the
        // welcome mails count here.
        let welcomes: Vec<Mail> = app
            .mails()
            .into_iter()
            .filter(|m| m.header("X-Nudge-Rule").as_deref() == Some("welcome"))
            .collect();
        if to.iter().all(|t| welcomes.iter().any(|m| m.to == *t)) {
            return welcomes;
        }
        if Instant::now() > deadline {
            panic!(
                "no welcome mail to each of {to:?} within 20 s: {welcomes:?}; broker: {:?}",
                app.consumer_info().await
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn events_published_before_start_or_while_down_are_all_processed(backend: Backend) {
    let env = TestEnv::new(backend).await;
    // The shop published before nudge ever ran.
    env.create_stream().await;
    env.publish(&registered("r-1", "fay", "trial", "Fay")).await;
    let app = env.start().await;
    wait_welcomes(&app, &["fay@example.com"]).await;
    app.wait_outbox_settled().await;

    // nudge is down; the shop goes on publishing.
    let env = app.stop().await;
    env.publish(&registered("r-2", "gus", "promo", "Gus")).await;
    env.publish(&registered("r-1", "fay", "trial", "Fay")).await;
    let app = env.start().await;
    wait_welcomes(&app, &["fay@example.com", "gus@example.com"]).await;
    app.wait_events(2).await;
    app.wait_outbox_settled().await;
    let mut to: Vec<_> = wait_welcomes(&app, &[])
        .await
        .iter()
        .map(|m| m.to.clone())
        .collect();
    to.sort();
    assert_eq!(
        to,
        vec!["fay@example.com", "gus@example.com"],
        "one welcome each"
    );
    app.stop().await;
}

async fn an_over_long_name_still_gets_its_mail_with_a_shortened_subject(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    // A name no header can hold on one line, without a space to fold at.
    let name = "Z".repeat(1500);
    app.publish(&registered("e-long", "zed", "organic", &name))
        .await;
    app.publish(&registered("e-ok", "amy", "organic", "Amy"))
        .await;
    let mails = wait_welcomes(&app, &["zed@example.com", "amy@example.com"]).await;
    let zed = mails.iter().find(|m| m.to == "zed@example.com").unwrap();
    assert!(zed.subject.starts_with("Welcome, ZZZ"), "{}", zed.subject);
    assert!(zed.subject.ends_with('…'), "{}", zed.subject);
    assert_eq!(
        zed.subject.chars().count(),
        nudge::core::templates::MAX_SUBJECT_CHARS
    );
    // The body still has the whole name; no line of the message is over
    // SMTP's limit.
    assert!(zed.text.contains(&name));
    for line in zed.raw.lines() {
        assert!(line.len() <= 998, "a {}-octet line", line.len());
    }
    app.wait_outbox_settled().await;
    let outbox = app.store.list_outbox(10).await.unwrap();
    assert!(outbox.iter().all(|r| r.status == "sent"), "{outbox:?}");
    app.stop().await;
}

backend_tests!(
    an_over_long_name_still_gets_its_mail_with_a_shortened_subject,
    each_acquisition_channel_gets_its_welcome_mail,
    the_same_event_id_twice_gives_one_mail,
    events_published_before_start_or_while_down_are_all_processed,
);
