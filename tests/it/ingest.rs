//! HTTP and Segment-compatible ingest (issue 26): events posted to
//! `POST /api/events` and sent by Segment's own Python library to `/v1/*`
//! make the same mails as the same events published to NATS; a broker
//! that is away answers 503 and nothing the caller was told is accepted is
//! lost; invalid items get 400 with reasons; oversize bodies are refused;
//! an id sent twice counts once.

use crate::helpers::{Backend, TestApp, TestEnv, ago, event, eventually};
use nudge::store::History as _;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;

const WEB_TOKEN: &str = "token-of-the-web-shop";
const DESK_TOKEN: &str = "token-of-the-service-desk";
const WRITE_KEY: &str = "segment-write-key-of-the-site";

async fn spawn(backend: Backend) -> TestApp {
    TestEnv::with_env(
        backend,
        &[
            ("NUDGE__HTTP__TOKENS__WEB__ROLE", "ingest"),
            ("NUDGE__HTTP__TOKENS__WEB__TOKEN", WEB_TOKEN),
            ("NUDGE__HTTP__TOKENS__DESK__ROLE", "staff"),
            ("NUDGE__HTTP__TOKENS__DESK__TOKEN", DESK_TOKEN),
            ("NUDGE__INGEST__SEGMENT__SITE__WRITE_KEY", WRITE_KEY),
            ("NUDGE__INGEST__SEGMENT__SITE__TOKEN", "web"),
            ("NUDGE__INGEST__MAX_ITEMS", "20"),
            ("NUDGE__INGEST__MAX_BODY_BYTES", "65536"),
        ],
    )
    .await
    .start()
    .await
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// `POST /api/events` with the ingest token; `gzip` compresses the body.
async fn post_raw(app: &TestApp, body: Vec<u8>, gzipped: bool) -> (StatusCode, Value, bool) {
    let mut r = reqwest::Client::new()
        .post(format!("http://{}/api/events", app.http))
        .bearer_auth(WEB_TOKEN)
        .header("content-type", "application/json");
    let body = if gzipped {
        r = r.header("content-encoding", "gzip");
        gzip(&body)
    } else {
        body
    };
    let res = r.body(body).send().await.expect("http request");
    let status = res.status();
    let retry_after = res.headers().contains_key("retry-after");
    (status, res.json().await.unwrap_or(Value::Null), retry_after)
}

async fn post_events(app: &TestApp, body: &Value) -> (StatusCode, Value) {
    let (s, v, _) = post_raw(app, serde_json::to_vec(body).unwrap(), false).await;
    (s, v)
}

/// A Segment endpoint, called as Segment's HTTP API documents it.
async fn segment(app: &TestApp, path: &str, body: &Value, key: &str) -> (StatusCode, Value) {
    let res = reqwest::Client::new()
        .post(format!("http://{}{path}", app.http))
        .basic_auth(key, Some(""))
        .json(body)
        .send()
        .await
        .expect("http request");
    let status = res.status();
    (status, res.json().await.unwrap_or(Value::Null))
}

/// Sends `calls` with Segment's Python library (`tests/segment/send.py`).
async fn send_with_segment_library(app: &TestApp, calls: &Value) {
    let python = std::env::var("NUDGE_TEST_PYTHON").unwrap_or("python3".into());
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/segment/send.py");
    let mut child = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(format!("http://{}", app.http))
        .arg(WRITE_KEY)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{python} must run (see .ci/run): {e}"));
    use tokio::io::AsyncWriteExt;
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(&serde_json::to_vec(calls).unwrap())
        .await
        .unwrap();
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the Segment library finishes within a minute")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "segment-analytics-python must be installed for {python} (pip install \
         segment-analytics-python; .ci/run does it) and nudge must take its batches: {stderr}"
    );
}

/// What one client does, as contract events: registers through a promo,
/// views a page, updates the profile, then looks at a lamp for 19 minutes
/// (the registration gets `welcome_promo`, the browsing `browse_discount`).
fn story(client: &str) -> Vec<Value> {
    let lamp = json!({"product_id": "p1", "name": "Lamp", "price": 30.0, "category": "home"});
    vec![
        event(
            &format!("{client}-1"),
            "client_registered",
            client,
            &ago(1500),
            json!({"email": format!("{client}@example.com"), "first_name": "Ada",
                   "acquisition_channel": "promo", "promo_code": "WELCOME10",
                   "marketing_consent": true}),
            json!({}),
        ),
        event(
            &format!("{client}-2"),
            "page_viewed",
            client,
            &ago(1450),
            json!({"url": "https://shop.test/", "title": "Shop"}),
            json!({}),
        ),
        event(
            &format!("{client}-3"),
            "client_updated",
            client,
            &ago(1400),
            json!({"last_name": "Lovelace"}),
            json!({}),
        ),
        event(
            &format!("{client}-4"),
            "product_viewed",
            client,
            &ago(1200),
            lamp.clone(),
            json!({}),
        ),
        event(
            &format!("{client}-5"),
            "product_viewed",
            client,
            &ago(60),
            lamp,
            json!({}),
        ),
    ]
}

/// The same story as Segment calls: (endpoint, message), in order.
fn segment_story(client: &str) -> Vec<(&'static str, Value)> {
    let e = story(client);
    let at = |i: usize| e[i]["occurred_at"].clone();
    let lamp = e[3]["data"].clone();
    vec![
        (
            "track",
            json!({"userId": client, "event": "Signed Up", "messageId": e[0]["id"],
                   "timestamp": at(0), "properties": e[0]["data"]}),
        ),
        (
            "page",
            json!({"userId": client, "name": "Home", "messageId": e[1]["id"], "timestamp": at(1),
                   "properties": {"url": "https://shop.test/", "title": "Shop"}}),
        ),
        (
            "identify",
            json!({"userId": client, "messageId": e[2]["id"], "timestamp": at(2),
                   "traits": {"lastName": "Lovelace"}}),
        ),
        (
            "track",
            json!({"userId": client, "event": "Product Viewed", "messageId": e[3]["id"],
                   "timestamp": at(3), "properties": lamp}),
        ),
        (
            "track",
            json!({"userId": client, "event": "Product Viewed", "messageId": e[4]["id"],
                   "timestamp": at(4), "properties": lamp}),
        ),
    ]
}

/// The Python library's calls for the same story.
fn library_calls(client: &str) -> Value {
    let calls: Vec<Value> = segment_story(client)
        .into_iter()
        .map(|(call, m)| {
            let mut args = json!({"user_id": m["userId"], "message_id": m["messageId"],
                                  "timestamp": m["timestamp"]});
            match call {
                "track" => {
                    args["event"] = m["event"].clone();
                    args["properties"] = m["properties"].clone();
                }
                "page" => {
                    args["name"] = m["name"].clone();
                    args["properties"] = m["properties"].clone();
                }
                _ => args["traits"] = m["traits"].clone(),
            }
            json!({"call": call, "args": args})
        })
        .collect();
    Value::Array(calls)
}

/// Each recipient's mails as (template, subject), sorted.
fn mails_by_client(app: &TestApp) -> BTreeMap<String, Vec<(String, String)>> {
    let mut out: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for m in app.mails() {
        let template = m.header("X-Nudge-Template").unwrap_or_default();
        out.entry(m.to.clone())
            .or_default()
            .push((template, m.subject.clone()));
    }
    for v in out.values_mut() {
        v.sort();
    }
    out
}

/// A client's stored timeline as (type, data) in time order, with the
/// keys every path shares (Segment's own context aside).
async fn timeline(app: &TestApp, client: &str) -> Vec<(String, Value)> {
    let res = reqwest::Client::new()
        .get(format!("http://{}/api/clients/{client}/events", app.http))
        .bearer_auth(DESK_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{client}");
    let body: Value = res.json().await.unwrap();
    let mut events: Vec<(String, Value)> = body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["type"].as_str().unwrap().to_string(), e["data"].clone()))
        .collect();
    events.reverse();
    events
}

async fn http_and_segment_events_make_the_same_mails_as_nats(backend: Backend) {
    let app = spawn(backend).await;
    // Over NATS, as the shop publishes.
    for e in story("nats") {
        app.publish(&e).await;
    }
    // Over HTTP: the whole story in one array, gzip-compressed.
    let body = serde_json::to_vec(&story("http")).unwrap();
    let (status, res, _) = post_raw(&app, body, true).await;
    assert_eq!(status, 202, "{res}");
    assert_eq!(res["accepted"], 5, "{res}");
    assert!(
        res["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["status"] == "accepted" && r["seq"].as_u64().is_some()),
        "{res}"
    );
    // With Segment's Python library (batched, gzip, basic auth).
    send_with_segment_library(&app, &library_calls("segment")).await;
    // With the single-call endpoints, one message each.
    for (call, msg) in segment_story("direct") {
        let (status, res) = segment(&app, &format!("/v1/{call}"), &msg, WRITE_KEY).await;
        assert_eq!(status, 200, "/v1/{call}: {res}");
        assert_eq!(res["success"], true, "{res}");
    }

    app.wait_events(20).await;
    app.wait_mails(8).await;
    app.wait_outbox_settled().await;
    let mails = mails_by_client(&app);
    let nats = &mails["nats@example.com"];
    let templates: Vec<&str> = nats.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(templates, ["browse_discount", "welcome_promo"], "{mails:?}");
    for client in ["http", "segment", "direct"] {
        assert_eq!(
            &mails[&format!("{client}@example.com")],
            nats,
            "{client}: {mails:?}"
        );
    }
    assert_eq!(mails.len(), 4, "{mails:?}");
    // What each path stored is the same history: same types, same data
    // (Segment's traits and properties in the contract's names).
    let want = timeline(&app, "nats").await;
    assert_eq!(want.len(), 5);
    for client in ["http", "segment", "direct"] {
        let mut got = timeline(&app, client).await;
        for (ty, data) in &mut got {
            if ty == "client_registered" {
                data["email"] = json!("nats@example.com");
            }
            if ty == "page_viewed" {
                // Segment's page call also names the page.
                data.as_object_mut().unwrap().remove("name");
            }
        }
        assert_eq!(got, want, "{client}");
    }
    app.stop().await;
}

async fn the_broker_down_answers_503_and_loses_nothing(backend: Backend) {
    let mut app = spawn(backend).await;
    let before = story("before");
    let (status, res) = post_events(&app, &before[0]).await;
    assert_eq!(status, 202, "{res}");

    app.env.nats.stop();
    let during = story("during");
    let seg = json!({"batch": [{"type": "track", "userId": "segdown", "event": "Signed Up",
        "messageId": "segdown-1", "timestamp": ago(30),
        "properties": {"email": "segdown@example.com", "first_name": "Ada"}}]});
    let (status, res, retry_after) =
        post_raw(&app, serde_json::to_vec(&during[0]).unwrap(), false).await;
    assert_eq!(status, 503, "{res}");
    assert!(retry_after, "a 503 says when to retry");
    assert!(
        res["error"].as_str().unwrap().contains("send it again"),
        "{res}"
    );
    let (status, res) = segment(&app, "/v1/batch", &seg, WRITE_KEY).await;
    assert_eq!(status, 503, "{res}");

    // The broker comes back; the callers send the same requests again, as told.
    app.env.nats.restart().expect("nats-server restarts");
    eventually(Duration::from_secs(30), "the retry accepted", || async {
        let (status, _) = post_events(&app, &during[0]).await;
        (status == 202).then_some(())
    })
    .await;
    eventually(
        Duration::from_secs(30),
        "the Segment retry accepted",
        || async {
            let (status, _) = segment(&app, "/v1/batch", &seg, WRITE_KEY).await;
            (status == 200).then_some(())
        },
    )
    .await;

    // Everything accepted was decided, once: a welcome each.
    app.wait_events(3).await;
    app.wait_mails(3).await;
    app.wait_outbox_settled().await;
    let mails = mails_by_client(&app);
    let got: Vec<(&str, usize)> = mails.iter().map(|(to, m)| (to.as_str(), m.len())).collect();
    assert_eq!(
        got,
        [
            ("before@example.com", 1),
            ("during@example.com", 1),
            ("segdown@example.com", 1)
        ],
        "{mails:?}"
    );
    assert_eq!(app.store.count_events().await.unwrap(), 3);
    app.stop().await;
}

async fn invalid_items_get_400_with_reasons_and_oversize_bodies_are_refused(backend: Backend) {
    use nudge::store::Staff as _;
    let app = spawn(backend).await;
    let valid = story("valid")[0].clone();
    let no_client = json!({"id": "bad-1", "type": "page_viewed", "occurred_at": ago(10)});
    let bad_type = event("bad-2", "Page Viewed", "c", &ago(10), json!({}), json!({}));
    let too_big = event(
        "bad-3",
        "page_viewed",
        "c",
        &ago(10),
        json!({"blob": "x".repeat(5000)}),
        json!({}),
    );
    let (status, res) = post_events(&app, &json!([valid, no_client, bad_type, too_big])).await;
    assert_eq!(status, 400, "{res}");
    assert!(
        res["error"]
            .as_str()
            .unwrap()
            .contains("nothing was published"),
        "{res}"
    );
    let r = &res["results"];
    assert_eq!(
        (&r[0]["status"], &r[0]["id"]),
        (&json!("valid"), &json!("valid-1"))
    );
    assert_eq!(r[1]["status"], "invalid");
    assert!(
        r[1]["reason"].as_str().unwrap().contains("client_id"),
        "{res}"
    );
    assert_eq!(r[2]["id"], "bad-2");
    assert!(r[2]["reason"].as_str().unwrap().contains("type"), "{res}");
    // Held to nats.max_event_bytes (4096 in the tests), as on the stream.
    assert!(
        r[3]["reason"].as_str().unwrap().contains("over the limit"),
        "{res}"
    );

    // Not JSON; too many items; a body over the limit, as sent or expanded.
    let (status, res, _) = post_raw(&app, b"{not json".to_vec(), false).await;
    assert_eq!(status, 400, "{res}");
    let many: Vec<Value> = (0..21)
        .map(|i| story(&format!("m{i}"))[1].clone())
        .collect();
    let (status, res) = post_events(&app, &json!(many)).await;
    assert_eq!(status, 413, "{res}");
    assert!(
        res["error"].as_str().unwrap().contains("ingest.max_items"),
        "{res}"
    );
    let (status, res, _) = post_raw(&app, vec![b' '; 65_537], false).await;
    assert_eq!(status, 413, "{res}");
    let (status, res, _) = post_raw(&app, vec![b' '; 200_000], true).await;
    assert_eq!(status, 413, "{res}");
    assert!(res["error"].as_str().unwrap().contains("gzip"), "{res}");
    // No token: 401.
    let res = reqwest::Client::new()
        .post(format!("http://{}/api/events", app.http))
        .json(&valid)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);

    // Segment: an unknown write key; a message over 32 KB; a batch with
    // one good and one bad message takes the good one.
    let signup = |id: &str, user: Value| {
        json!({"type": "track", "event": "Signed Up", "userId": user, "messageId": id,
               "timestamp": ago(20), "properties": {"email": "seg@example.com"}})
    };
    let (status, res) = segment(&app, "/v1/track", &signup("s0", json!("seg")), "wrong-key").await;
    assert_eq!(status, 401, "{res}");
    assert!(
        res["message"].as_str().unwrap().contains("write key"),
        "{res}"
    );
    let mut huge = signup("s0", json!("seg"));
    huge["properties"]["blob"] = json!("x".repeat(40_000));
    let (status, res) = segment(&app, "/v1/track", &huge, WRITE_KEY).await;
    assert_eq!(status, 400, "{res}");
    let batch = json!({"batch": [signup("s1", json!("seg")), signup("s2", Value::Null),
                                 {"type": "alias", "userId": "seg", "previousId": "old"}]});
    let (status, res) = segment(&app, "/v1/batch", &batch, WRITE_KEY).await;
    assert_eq!(status, 400, "{res}");
    assert_eq!(res["code"], "invalid_message", "{res}");
    let r = &res["results"];
    assert_eq!(r[0]["status"], "accepted", "{res}");
    assert_eq!(r[1]["status"], "invalid", "{res}");
    assert!(r[1]["reason"].as_str().unwrap().contains("userId"), "{res}");
    assert_eq!(r[2]["status"], "ignored", "{res}");
    // The refused message is in the rejected list, with its reason.
    let rejected = app.store.rejected_page(None, 10).await.unwrap();
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert!(rejected[0].1.reason.contains("userId"), "{rejected:?}");
    assert!(rejected[0].1.payload.contains("s2"), "{rejected:?}");

    // The write key may come in the body (`writeKey`, which the libraries
    // send too) instead of the header; with neither, 401.
    let identify = json!({"userId": "seg", "messageId": "s3", "traits": {"firstName": "Sam"}});
    let send = |body: Value| {
        reqwest::Client::new()
            .post(format!("http://{}/v1/identify", app.http))
            .json(&body)
            .send()
    };
    assert_eq!(send(identify.clone()).await.unwrap().status(), 401);
    let mut keyed = identify;
    keyed["writeKey"] = json!(WRITE_KEY);
    assert_eq!(send(keyed).await.unwrap().status(), 200);

    // Nothing of the refused request was published: the valid event sent
    // alone now, and the two Segment ones, are the only events.
    let (status, res) = post_events(&app, &valid).await;
    assert_eq!(status, 202, "{res}");
    assert_eq!(res["results"][0]["status"], "accepted", "{res}");
    app.wait_mails(2).await;
    app.wait_outbox_settled().await;
    let stream = app.js.get_stream(&app.config.nats.stream).await.unwrap();
    assert_eq!(
        stream.cached_info().state.messages,
        3,
        "the stream holds only what was accepted"
    );
    app.wait_events(3).await;
    assert_eq!(app.store.count_events().await.unwrap(), 3);
    app.stop().await;
}

async fn a_duplicate_id_counts_once(backend: Backend) {
    let app = spawn(backend).await;
    let reg = story("dup")[0].clone();
    let (status, res) = post_events(&app, &reg).await;
    assert_eq!(status, 202, "{res}");
    assert_eq!(res["results"][0]["status"], "accepted", "{res}");
    // Again within the broker's dedupe window: stored once, said so.
    let (status, res) = post_events(&app, &json!([reg, reg])).await;
    assert_eq!(status, 202, "{res}");
    assert_eq!(res["duplicates"], 2, "{res}");
    assert_eq!(res["results"][1]["status"], "duplicate", "{res}");
    // The same messageId twice from a Segment library.
    let msg = json!({"userId": "segdup", "event": "Signed Up", "messageId": "segdup-1",
                     "timestamp": ago(30), "properties": {"email": "segdup@example.com"}});
    for expected in ["accepted", "duplicate"] {
        let (status, res) = segment(&app, "/v1/track", &msg, WRITE_KEY).await;
        assert_eq!(status, 200, "{res}");
        assert_eq!(res["results"][0]["status"], expected, "{res}");
    }
    // Past the broker's dedupe (no Nats-Msg-Id): nudge's own log takes the id once.
    app.publish_raw("client_registered", "", serde_json::to_vec(&reg).unwrap())
        .await;
    eventually(
        Duration::from_secs(20),
        "every message consumed",
        || async {
            let info = app.consumer_info().await;
            (info.num_pending == 0
                && info.num_ack_pending == 0
                && info.delivered.stream_sequence == 3)
                .then_some(())
        },
    )
    .await;
    app.wait_mails(2).await;
    app.wait_outbox_settled().await;
    assert_eq!(app.store.count_events().await.unwrap(), 2);
    let mails = mails_by_client(&app);
    assert_eq!(mails["dup@example.com"].len(), 1, "{mails:?}");
    assert_eq!(mails["segdup@example.com"].len(), 1, "{mails:?}");
    app.stop().await;
}

backend_tests!(
    http_and_segment_events_make_the_same_mails_as_nats,
    the_broker_down_answers_503_and_loses_nothing,
    invalid_items_get_400_with_reasons_and_oversize_bodies_are_refused,
    a_duplicate_id_counts_once,
);
