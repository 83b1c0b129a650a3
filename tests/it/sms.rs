//! Text messages through a Twilio-shaped gateway (an axum server here that
//! records what it received): consent, a number in E.164, quiet hours in
//! the client's timezone, and a reply STOP that ends the texts.

use crate::helpers::{Backend, TestApp, TestEnv, ago, event, eventually, registered_at};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use nudge::store::{Outbox, State as _};
use serde_json::{Value, json};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const ACCOUNT: &str = "AC0123456789";
const TOKEN: &str = "gateway-auth-token";
const FROM: &str = "+15550001111";
const DAY: i64 = 86_400;

/// One text the gateway took: its form fields and the Authorization header.
#[derive(Debug, Clone)]
struct Text {
    fields: Vec<(String, String)>,
    authorization: String,
    idempotency: String,
}

impl Text {
    fn field(&self, name: &str) -> &str {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v)
    }
}

type Texts = Arc<Mutex<Vec<Text>>>;

async fn start_gateway() -> (String, Texts) {
    let texts = Texts::default();
    async fn messages(
        State(texts): State<Texts>,
        headers: HeaderMap,
        axum::Form(fields): axum::Form<Vec<(String, String)>>,
    ) -> (StatusCode, axum::Json<Value>) {
        let mut t = texts.lock().unwrap();
        let header = |n: &str| {
            headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        t.push(Text {
            fields,
            authorization: header("authorization"),
            idempotency: header("i-twilio-idempotency-token"),
        });
        let sid = format!("SM{:032}", t.len());
        (
            StatusCode::CREATED,
            axum::Json(json!({"sid": sid, "status": "queued"})),
        )
    }
    let app = axum::Router::new()
        .route(
            &format!("/2010-04-01/Accounts/{ACCOUNT}/Messages.json"),
            axum::routing::post(messages),
        )
        .with_state(texts.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (
        format!("http://{addr}/2010-04-01/Accounts/{ACCOUNT}/Messages.json"),
        texts,
    )
}

/// A reply posted as Twilio posts it, signed as Twilio signs it: HMAC-SHA1
/// under the token of the URL and the fields sorted by name.
async fn reply(app: &TestApp, from: &str, body: &str, sid: &str, sign: bool) -> StatusCode {
    let url = format!(
        "{}/sms/inbound",
        app.config.http.public_url.trim_end_matches('/')
    );
    let mut fields = vec![
        ("Body".to_string(), body.to_string()),
        ("From".to_string(), from.to_string()),
        ("MessageSid".to_string(), sid.to_string()),
        ("To".to_string(), FROM.to_string()),
        ("AccountSid".to_string(), ACCOUNT.to_string()),
    ];
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(TOKEN.as_bytes()).unwrap();
    mac.update(url.as_bytes());
    fields.sort();
    for (k, v) in &fields {
        mac.update(k.as_bytes());
        mac.update(v.as_bytes());
    }
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let mut req = reqwest::Client::new()
        .post(format!("http://{}/sms/inbound", app.http))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(serde_urlencoded::to_string(&fields).unwrap());
    if sign {
        req = req.header("x-twilio-signature", signature);
    }
    StatusCode::from_u16(req.send().await.unwrap().status().as_u16()).unwrap()
}

async fn log_text(app: &TestApp, client: &str) -> String {
    app.get(&format!("/api/clients/{client}/log"))
        .await
        .text()
        .await
        .unwrap()
}

fn person(id: &str, client: &str, phone: Option<&str>, consent: bool, tz: &str) -> Value {
    let mut e = registered_at(id, client, &ago(3 * DAY));
    let data = e["data"].as_object_mut().unwrap();
    if let Some(p) = phone {
        data.insert("phone".into(), json!(p));
    }
    data.insert("sms_consent".into(), json!(consent));
    data.insert("timezone".into(), json!(tz));
    e
}

async fn texts_respect_consent_and_quiet_hours_and_stop_ends_them(backend: Backend) {
    let (gateway, texts) = start_gateway().await;
    let env = TestEnv::with_env(
        backend,
        &[
            ("NUDGE__SMS__URL", gateway.as_str()),
            ("NUDGE__SMS__ACCOUNT", ACCOUNT),
            ("NUDGE__SMS__TOKEN", TOKEN),
            ("NUDGE__SMS__FROM", FROM),
            ("NUDGE__MAIL__QUIET_HOURS__START", "21:00"),
            ("NUDGE__MAIL__QUIET_HOURS__END", "08:00"),
        ],
    )
    .await;
    std::fs::write(
        env.rules_dir().join("deals.rhai"),
        "const ON = [\"deal_published\"];\nsms(\"deal\", #{ deal: event.data.deal });\n",
    )
    .unwrap();
    std::fs::write(
        env.dir.path().join("templates/deal.sms"),
        "---\nkind: marketing\n---\nHi {{ first_name }}: today {{ deal }} is 20% off. Reply STOP to stop.\n",
    )
    .unwrap();
    // The sender's clock: 22:30 UTC tomorrow, evening in New York (not
    // quiet), night in Paris (quiet until 08:00 there).
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

    let ana = "+12025550101";
    let cara = "+33612345678";
    for e in [
        person("r-ana", "ana", Some(ana), true, "America/New_York"),
        person(
            "r-bob",
            "bob",
            Some("+12025550102"),
            false,
            "America/New_York",
        ),
        person("r-cara", "cara", Some(cara), true, "Europe/Paris"),
        person("r-dan", "dan", None, true, "America/New_York"),
        // Not E.164: refused at the edge with its reason.
        person("r-eve", "eve", Some("0612 345678"), true, "Europe/Paris"),
    ] {
        app.publish(&e).await;
    }
    let deal = |id: &str, client: &str| {
        event(
            id,
            "deal_published",
            client,
            &ago(DAY),
            json!({"deal": "DEAL42"}),
            json!({}),
        )
    };
    for c in ["ana", "bob", "cara", "dan"] {
        app.publish(&deal(&format!("d-{c}"), c)).await;
    }
    app.wait_events(8).await;
    let rejected = app.get("/api/rejected").await.text().await.unwrap();
    assert!(
        rejected.contains("data.phone") && rejected.contains("E.164"),
        "{rejected}"
    );

    // Ana's text goes at once, in the gateway's shape.
    let first = eventually(Duration::from_secs(20), "ana's text", || async {
        texts.lock().unwrap().first().cloned()
    })
    .await;
    assert_eq!(first.field("To"), ana);
    assert_eq!(first.field("From"), FROM);
    assert_eq!(
        first.field("Body"),
        "Hi ANA: today DEAL42 is 20% off. Reply STOP to stop."
    );
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{ACCOUNT}:{TOKEN}"));
    assert_eq!(first.authorization, format!("Basic {basic}"));
    assert_eq!(first.idempotency.len(), 32, "the effect key");

    // Cara's waits for the morning in Paris; bob gave no consent, dan has no number.
    let deferred = eventually(Duration::from_secs(10), "cara's deferred text", || async {
        let rows = app.store.list_outbox(100).await.ok()?;
        rows.into_iter().find(|r| {
            r.kind == "sms"
                && r.client_id == "cara"
                && r.status == "pending"
                && r.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("quiet hours"))
        })
    })
    .await;
    assert_eq!(deferred.attempts, 0);
    assert!(
        log_text(&app, "bob")
            .await
            .contains("has not given consent to texts")
    );
    assert!(log_text(&app, "dan").await.contains("has no phone number"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        texts.lock().unwrap().len(),
        1,
        "nothing for cara, bob or dan yet"
    );

    // 07:01 UTC the day after: 08:01 in Paris (09:01 in summer).
    clock_secs.store(night + (8 * 60 + 31) * 60, Ordering::SeqCst);
    let to_cara = eventually(
        Duration::from_secs(10),
        "cara's text in the morning",
        || async {
            let t = texts.lock().unwrap();
            t.iter().find(|t| t.field("To") == cara).cloned()
        },
    )
    .await;
    assert!(to_cara.field("Body").starts_with("Hi CARA"));
    app.wait_outbox_settled().await;
    assert_eq!(texts.lock().unwrap().len(), 2);

    // A reply STOP: unsigned refused, signed taken (twice: one event).
    assert_eq!(
        reply(&app, ana, "STOP", "SMstop1", false).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        reply(&app, ana, " stop ", "SMstop1", true).await,
        StatusCode::OK
    );
    assert_eq!(
        reply(&app, ana, " stop ", "SMstop1", true).await,
        StatusCode::OK
    );
    assert_eq!(
        reply(&app, ana, "thanks!", "SMother", true).await,
        StatusCode::OK
    );
    let id = nudge::domain::event::ClientId::parse("ana").unwrap();
    eventually(
        Duration::from_secs(10),
        "ana's consent withdrawn",
        || async {
            let states = app.store.load_clients(&[&id]).await.ok()?;
            (!states.get(&id)?.profile.sms_consent).then_some(())
        },
    )
    .await;
    app.wait_events(9).await;
    app.publish(&deal("d-ana-2", "ana")).await;
    app.wait_events(10).await;
    eventually(Duration::from_secs(10), "the skip in ana's log", || async {
        let log = log_text(&app, "ana").await;
        log.contains("text `deal` skipped: the client has not given consent to texts")
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(texts.lock().unwrap().len(), 2, "no text after STOP");
    let stops = app
        .db
        .sql()
        .await
        .scalar("SELECT COUNT(*) FROM events WHERE id = 'sms-stop-SMstop1'")
        .await;
    assert_eq!(stops, 1, "a repeated STOP is one event");

    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.lines().any(|l| l == "nudge_texts_sent_total 2"),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("nudge_texts_deferred_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
    app.stop().await;
}

backend_tests!(texts_respect_consent_and_quiet_hours_and_stop_ends_them);

/// `nudge test` knows webhooks and texts: `expect` names them, a missing
/// or unexpected one fails the test with what was expected and got, and
/// nothing is posted or texted (no gateway, no receiver exists here).
#[test]
fn rule_tests_expect_webhooks_and_texts() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    for sub in ["rules/tests", "templates"] {
        std::fs::create_dir_all(p.join(sub)).unwrap();
    }
    std::fs::write(
        p.join("rules/deals.rhai"),
        "const ON = [\"deal_published\"];\n\
         webhook(\"crm\", #{ deal: event.data.deal, client: client.id });\n\
         sms(\"deal\", #{ deal: event.data.deal });\n",
    )
    .unwrap();
    std::fs::write(
        p.join("templates/deal.sms"),
        "Hi {{ first_name }}: {{ deal }} today. Reply STOP to stop.",
    )
    .unwrap();
    std::fs::write(
        p.join("nudge.yaml"),
        format!(
            "webhooks:\n  crm:\n    url: http://127.0.0.1:9/hook\n    secret: {}\nsms:\n  url: http://127.0.0.1:9/sms\n  account: AC1\n  token: t\n  from: \"+15550001111\"\n",
            crate::webhooks::SECRET
        ),
    )
    .unwrap();
    let case = |name: &str, expect: &str| {
        format!(
            "  - name: {name}\n    now: 2026-11-20T10:00:00Z\n    events:\n      - type: client_registered\n        client: ana\n        data: {{email: ana@example.com, first_name: Ana, phone: \"+447700900123\", sms_consent: true}}\n      - type: deal_published\n        client: ana\n        at: +1m\n        data: {{deal: DEAL42}}\n    expect:\n{expect}"
        )
    };
    std::fs::write(
        p.join("rules/tests/deals.yaml"),
        format!(
            "tests:\n{}\n{}\n",
            case(
                "the deal is posted and texted",
                "      webhooks:\n        - {webhook: crm, type: rule.deals, payload: {deal: DEAL42, client: ana}}\n      texts:\n        - {template: deal, to: \"+447700900123\", text_contains: \"Hi Ana: DEAL42\"}\n"
            ),
            case(
                "a text expected to the wrong number",
                "      webhooks:\n        - {webhook: crm}\n      texts:\n        - {template: deal, to: \"+15550000000\"}\n"
            ),
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nudge"))
        .args(["test", "rules/tests/deals.yaml"])
        .current_dir(p)
        .env_remove("NUDGE_CONFIG")
        .env_remove("RUST_LOG")
        .output()
        .expect("nudge runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("1 passed, 1 failed"), "{text}");
    assert!(
        text.contains("- expected text deal to +15550000000"),
        "{text}"
    );
    assert!(
        text.contains("+ got text deal to +447700900123 (rule deals): \"Hi Ana: DEAL42 today. Reply STOP to stop.\""),
        "{text}"
    );
}
