//! Bad input is kept as rejected with its reason and never blocks the stream.

use crate::helpers::{Backend, TestApp, registered};
use nudge::store::{History, Staff};
use serde_json::{Value, json};

async fn malformed_wrong_typed_and_oversize_events_are_kept_and_the_stream_goes_on(
    backend: Backend,
) {
    let app = TestApp::spawn(backend).await;
    app.publish_raw("client_registered", "bad-1", b"{not json".to_vec())
        .await;
    let mut wrong = registered("bad-2", "hal", "organic", "Hal");
    wrong["occurred_at"] = json!(1234);
    app.publish(&wrong).await;
    let mut huge = registered("bad-3", "ivy", "organic", "Ivy");
    huge["data"]["notes"] = json!("x".repeat(8000));
    app.publish(&huge).await;
    app.publish(&registered("good-1", "jo", "organic", "Jo"))
        .await;

    let mails = app.wait_mails(1).await;
    assert_eq!(mails[0].to, "jo@example.com");

    let rejected = app.store.list_rejected(10).await.unwrap();
    assert_eq!(rejected.len(), 3, "{rejected:?}");
    let reasons: Vec<&str> = rejected.iter().map(|r| r.reason.as_str()).collect();
    assert!(
        reasons.iter().any(|r| r.contains("not a JSON object")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("occurred_at")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("over the limit")),
        "{reasons:?}"
    );

    // Listable over HTTP.
    let body: Value = app.get("/api/rejected").await.json().await.unwrap();
    assert_eq!(body["rejected"].as_array().unwrap().len(), 3, "{body}");
    assert_eq!(app.store.count_events().await.unwrap(), 1);
    app.stop().await;
}

backend_tests!(malformed_wrong_typed_and_oversize_events_are_kept_and_the_stream_goes_on,);
