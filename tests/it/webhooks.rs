//! Signed outbound webhooks: a receiver that fails each delivery twice
//! before it accepts gets each effect once, every attempt signed so that
//! the real Standard Webhooks verifier (the Python `standardwebhooks`
//! package) accepts it; a 4xx fails for good at once; nudge's own
//! happenings (a task made, its mail sent) reach the webhook configured
//! for them.

use crate::helpers::{Backend, TestEnv, ago, event, eventually};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use nudge::store::Outbox;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A secret as operators make one: `whsec_` and base64 of 32 bytes.
pub const SECRET: &str = "whsec_C2FtcGxlLXNlY3JldC1mb3ItbnVkZ2Utd2ViaG9va3M=";

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: BTreeMap<String, String>,
    pub body: String,
    pub answered: u16,
}

#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<Received>>>,
}

/// Starts the receiver: `/hook` answers 503 to the first two attempts of
/// each `webhook-id`, then 200; `/gone` always answers 410.
async fn start_receiver() -> (String, Arc<Mutex<Vec<Received>>>) {
    let r = Receiver::default();
    let got = r.got.clone();
    async fn handle(
        State(r): State<Receiver>,
        uri: axum::http::Uri,
        headers: HeaderMap,
        body: String,
    ) -> StatusCode {
        let mut got = r.got.lock().unwrap();
        let id = headers
            .get("webhook-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let status = if uri.path() == "/gone" {
            StatusCode::GONE
        } else if got
            .iter()
            .filter(|g| g.headers.get("webhook-id") == Some(&id))
            .count()
            < 2
        {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        };
        got.push(Received {
            path: uri.path().to_string(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_string()))
                .collect(),
            body,
            answered: status.as_u16(),
        });
        status
    }
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(handle))
        .route("/gone", axum::routing::post(handle))
        .with_state(r);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), got)
}

/// Verifies every request with the Python `standardwebhooks` package, the
/// specification's reference verifier; fails the test when it is missing.
pub fn verify_with_standardwebhooks(secret: &str, requests: &[Received]) {
    let python = std::env::var("NUDGE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("requests.json");
    let list: Vec<Value> = requests
        .iter()
        .map(|r| json!({"headers": r.headers, "body": r.body}))
        .collect();
    std::fs::write(&input, serde_json::to_vec(&list).unwrap()).unwrap();
    let script = r#"
import json, sys
try:
    from standardwebhooks.webhooks import Webhook
except ImportError as e:
    sys.exit("the Python package standardwebhooks is missing (pip install standardwebhooks): %s" % e)
wh = Webhook(sys.argv[1])
for r in json.load(open(sys.argv[2])):
    wh.verify(r["body"], r["headers"])
print("verified", len(json.load(open(sys.argv[2]))))
"#;
    let out = std::process::Command::new(&python)
        .args(["-c", script, secret, input.to_str().unwrap()])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python} to verify the signatures: {e}"));
    assert!(
        out.status.success(),
        "standardwebhooks refused a signature or is missing: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // A tampered body must be refused, or the check above proves nothing.
    let mut bad = requests[0].clone();
    bad.body = bad.body.replacen('{', "{\"x\":1,", 1);
    std::fs::write(
        &input,
        serde_json::to_vec(&json!([{"headers": bad.headers, "body": bad.body}])).unwrap(),
    )
    .unwrap();
    let out = std::process::Command::new(&python)
        .args(["-c", script, secret, input.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a tampered body passed verification");
}

const RULE: &str = r#"
const ON = ["invoice_paid"];
webhook("crm", #{ invoice: event.data.invoice, total: event.data.total });
webhook("gone", #{ invoice: event.data.invoice });
if event.data.invoice == "i1" { task("sales", "Thank for invoice i1"); }
"#;

async fn a_failing_receiver_gets_each_signed_webhook_once_and_4xx_fails_for_good(backend: Backend) {
    let (base, got) = start_receiver().await;
    let hook = format!("{base}/hook");
    let gone = format!("{base}/gone");
    let env = TestEnv::with_env(
        backend,
        &[
            ("NUDGE__WEBHOOKS__CRM__URL", hook.as_str()),
            ("NUDGE__WEBHOOKS__CRM__SECRET", SECRET),
            ("NUDGE__WEBHOOKS__CRM__EVENTS", "task_made, mail_sent"),
            ("NUDGE__WEBHOOKS__GONE__URL", gone.as_str()),
            ("NUDGE__WEBHOOKS__GONE__SECRET", SECRET),
        ],
    )
    .await;
    std::fs::write(env.rules_dir().join("invoices.rhai"), RULE).unwrap();
    let app = env.start().await;
    let paid = |id: &str, invoice: &str, total: f64| {
        event(
            id,
            "invoice_paid",
            "vera",
            &ago(60),
            json!({"invoice": invoice, "total": total}),
            json!({}),
        )
    };
    app.publish(&paid("p1", "i1", 120.0)).await;
    app.publish(&paid("p2", "i2", 80.5)).await;
    // The same event again: it takes effect once.
    app.publish(&paid("p1", "i1", 120.0)).await;

    // Two rule webhooks, the task made and its mail sent: four effects
    // for `crm`, each accepted at its third attempt.
    let accepted = eventually(Duration::from_secs(60), "4 webhooks accepted", || {
        let got = got.clone();
        async move {
            let got = got.lock().unwrap();
            let ok: Vec<Received> = got.iter().filter(|r| r.answered == 200).cloned().collect();
            (ok.len() >= 4).then_some(ok)
        }
    })
    .await;
    app.wait_outbox_settled().await;
    let all = got.lock().unwrap().clone();
    let hook_requests: Vec<&Received> = all.iter().filter(|r| r.path == "/hook").collect();
    let mut by_id: BTreeMap<String, Vec<&Received>> = BTreeMap::new();
    for r in &hook_requests {
        by_id
            .entry(r.headers["webhook-id"].clone())
            .or_default()
            .push(r);
    }
    assert_eq!(by_id.len(), 4, "{by_id:#?}");
    for (id, attempts) in &by_id {
        let codes: Vec<u16> = attempts.iter().map(|r| r.answered).collect();
        assert_eq!(codes, [503, 503, 200], "webhook {id}: each effect once");
        // Every attempt carries the same body: the effect, not the attempt.
        assert!(attempts.iter().all(|a| a.body == attempts[0].body));
    }
    assert_eq!(accepted.len(), 4, "nothing accepted twice");
    let bodies: Vec<Value> = accepted
        .iter()
        .map(|r| serde_json::from_str(&r.body).unwrap())
        .collect();
    let of_type = |t: &str| bodies.iter().filter(|b| b["type"] == t).collect::<Vec<_>>();
    let rule = of_type("rule.invoices");
    assert_eq!(rule.len(), 2, "{bodies:#?}");
    let mut invoices: Vec<&str> = rule
        .iter()
        .map(|b| b["data"]["invoice"].as_str().unwrap())
        .collect();
    invoices.sort();
    assert_eq!(invoices, ["i1", "i2"]);
    assert!(rule.iter().all(|b| b["client_id"] == "vera"));
    let task = of_type("task.made");
    assert_eq!(task.len(), 1, "{bodies:#?}");
    assert_eq!(task[0]["data"]["team"], "sales");
    let sent = of_type("mail.sent");
    assert_eq!(sent.len(), 1, "{bodies:#?}");
    assert_eq!(sent[0]["data"]["to"], "sales@shop.test");
    assert_eq!(sent[0]["data"]["template"], "staff_task");

    // The webhook id is the effect key, as the outbox has it.
    let rows = app.store.list_outbox(1000).await.unwrap();
    for id in by_id.keys() {
        let row = rows.iter().find(|r| &r.key == id).expect("an outbox row");
        assert_eq!(
            (row.kind.as_str(), row.status.as_str()),
            ("webhook", "sent")
        );
    }
    // 410 fails for good at the first attempt: one request per effect.
    let gone: Vec<&Received> = all.iter().filter(|r| r.path == "/gone").collect();
    assert_eq!(gone.len(), 2, "{gone:#?}");
    let failed: Vec<_> = rows
        .iter()
        .filter(|r| r.kind == "webhook" && r.status == "failed")
        .collect();
    assert_eq!(failed.len(), 2, "{rows:#?}");
    assert!(failed.iter().all(|r| r.attempts == 1
        && r.last_error.as_deref().unwrap_or_default().contains("410")));

    // Every attempt, the refused ones too, verifies with the reference library.
    let signed: Vec<Received> = all.clone();
    verify_with_standardwebhooks(SECRET, &signed);

    let metrics = app.get("/metrics").await.text().await.unwrap();
    for line in [
        "nudge_webhooks_sent_total 4",
        "nudge_webhooks_retried_total 8",
        "nudge_webhooks_failed_total 2",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
    let log: Value = app.get("/api/clients/vera/log").await.json().await.unwrap();
    let text = log.to_string();
    assert!(
        text.contains("webhook `crm` queued (rule.invoices)"),
        "{text}"
    );
    assert!(
        text.contains("webhook `crm` (rule.invoices) sent"),
        "{text}"
    );
    assert!(
        text.contains("webhook `gone` (rule.invoices) failed"),
        "{text}"
    );
}

backend_tests!(a_failing_receiver_gets_each_signed_webhook_once_and_4xx_fails_for_good);
