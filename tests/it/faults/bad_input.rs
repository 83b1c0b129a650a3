//! Hostile input over the real broker: envelopes at and over the size
//! limit, nesting far past the JSON parser's depth limit, unicode that
//! stresses every layer (mail headers, the 360 API, search), nulls and
//! wrong types, bytes that are not UTF-8, and one client sending 10,000
//! events. Each message is stored or rejected with a reason, none stops the
//! stream, and what comes after is decided as usual.

use crate::helpers::{Backend, TestApp, TestEnv, ago, event, eventually, registered};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// What should become of one message.
#[derive(Debug, Clone)]
enum Expect {
    Stored,
    Rejected(&'static str),
}

/// Publishes messages in order and remembers what each should become, by
/// stream sequence.
struct Plan<'a> {
    app: &'a TestApp,
    seq: u64,
    expect: BTreeMap<u64, (String, Expect)>,
}

impl Plan<'_> {
    async fn raw(&mut self, what: &str, ty: &str, payload: Vec<u8>, expect: Expect) {
        self.app.publish_raw(ty, "", payload).await;
        self.seq += 1;
        self.expect.insert(self.seq, (what.to_string(), expect));
    }

    async fn json(&mut self, what: &str, e: &Value, expect: Expect) {
        let ty = e["type"].as_str().unwrap_or("unknown").to_string();
        self.raw(what, &ty, serde_json::to_vec(e).unwrap(), expect)
            .await;
    }
}

/// `depth` nested arrays, as JSON text (built as text: no deep recursion here).
fn nested_arrays(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

fn nested_objects(depth: usize) -> String {
    format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth))
}

/// A page view whose `data` is `data_json`, as raw JSON text.
fn page_view_text(id: &str, client: &str, data_json: &str) -> Vec<u8> {
    format!(
        "{{\"id\":\"{id}\",\"type\":\"page_viewed\",\"client_id\":\"{client}\",\
         \"occurred_at\":\"{}\",\"data\":{{\"tree\":{data_json}}}}}",
        ago(5000)
    )
    .into_bytes()
}

fn metric_sum(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn path_segment(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

async fn hostile_input_is_stored_or_rejected_with_a_reason_and_never_blocks(backend: Backend) {
    let limit = 65536usize;
    let env = TestEnv::with_env(backend, &[("NUDGE__NATS__MAX_EVENT_BYTES", "65536")]).await;
    let app = env.start().await;
    let mut plan = Plan {
        app: &app,
        seq: 0,
        expect: BTreeMap::new(),
    };

    // Sizes: exactly at the limit is taken, one byte over is not.
    let mut at_limit = registered("big-1", "big", "organic", "Big");
    at_limit["data"]["notes"] = json!("");
    let len = serde_json::to_vec(&at_limit).unwrap().len();
    at_limit["data"]["notes"] = json!("x".repeat(limit - len));
    assert_eq!(serde_json::to_vec(&at_limit).unwrap().len(), limit);
    plan.json("at the size limit", &at_limit, Expect::Stored)
        .await;
    let mut over = at_limit.clone();
    over["id"] = json!("big-2");
    over["data"]["notes"] = json!("x".repeat(limit - len + 1));
    plan.json("one byte over", &over, Expect::Rejected("over the limit"))
        .await;
    // A long name of many-byte characters, in a mail subject and body.
    let long_name = "Ünïcødé😀".repeat(1000);
    plan.json(
        "a 16 KB name",
        &registered("long-1", "long", "organic", &long_name),
        Expect::Stored,
    )
    .await;
    // An array longer than a rule may build (rules.max_array_len), handed to
    // every rule that runs for every event.
    let mut wide = registered("wide-1", "wide", "organic", "Wide");
    wide["data"]["list"] = json!(vec![0; 20_000]);
    plan.json("a 20,000-element array", &wide, Expect::Stored)
        .await;

    // Nesting: far past serde_json's limit of 128 levels is refused with a
    // reason; well inside it is stored and shown.
    plan.raw(
        "2,000 nested arrays",
        "page_viewed",
        page_view_text("deep-1", "deep", &nested_arrays(2000)),
        Expect::Rejected("recursion limit"),
    )
    .await;
    plan.raw(
        "2,000 nested objects",
        "page_viewed",
        page_view_text("deep-2", "deep", &nested_objects(2000)),
        Expect::Rejected("recursion limit"),
    )
    .await;
    plan.raw(
        "100 nested objects",
        "page_viewed",
        page_view_text("deep-3", "deep", &nested_objects(100)),
        Expect::Stored,
    )
    .await;

    // Unicode everywhere: emoji (with joiners), right-to-left scripts and a
    // right-to-left override, combining marks, a zero-width space; in the
    // client id too.
    let uni_id = "zoë-😀-זואי";
    let first = "Zoë 👩‍👩‍👧‍👦 Z̸̢̛o̵͎ë̷\u{200B}";
    let last = "בת-שבע زوي \u{202E}emaN";
    let mut uni = registered("uni-1", uni_id, "organic", first);
    uni["data"]["email"] = json!("zoe@example.com");
    uni["data"]["last_name"] = json!(last);
    plan.json("unicode names and id", &uni, Expect::Stored)
        .await;
    let mut emile = registered("uni-2", "emile", "organic", "Émile");
    emile["data"]["last_name"] = json!("Øyvindsson");
    plan.json("accented capitals", &emile, Expect::Stored).await;

    // Nulls and wrong types.
    let mut odd = registered("odd-1", "odd", "organic", "x");
    odd["data"]["first_name"] = json!(42);
    odd["data"]["last_name"] = Value::Null;
    odd["data"]["acquisition_channel"] = json!(["promo"]);
    plan.json("names of the wrong type", &odd, Expect::Stored)
        .await;
    let mut v = event(
        "null-1",
        "page_viewed",
        "nul",
        &ago(4000),
        json!({}),
        json!({}),
    );
    v["data"] = Value::Null;
    v["context"] = Value::Null;
    plan.json("null data and context", &v, Expect::Stored).await;
    let mut v = registered("null-2", "nul", "organic", "N");
    v["data"] = Value::Null;
    plan.json(
        "a registration without data",
        &v,
        Expect::Rejected("data.email"),
    )
    .await;
    let mut v = registered("null-3", "nul", "organic", "N");
    v["id"] = Value::Null;
    plan.json("a null id", &v, Expect::Rejected("`id`")).await;
    let mut v = registered("null-4", "nul", "organic", "N");
    v["client_id"] = json!(42);
    plan.json("a numeric client id", &v, Expect::Rejected("client_id"))
        .await;
    let mut v = registered("null-5", "nul", "organic", "N");
    v["occurred_at"] = Value::Null;
    plan.json("a null time", &v, Expect::Rejected("occurred_at"))
        .await;
    let mut v = registered("null-6", "nul", "organic", "N");
    v["data"]["marketing_consent"] = json!("yes");
    plan.json(
        "consent as a string",
        &v,
        Expect::Rejected("marketing_consent"),
    )
    .await;
    let v = event(
        "null-7",
        "order_placed",
        "nul",
        &ago(4000),
        json!({"total": "12.50", "items": []}),
        json!({}),
    );
    plan.json("a total as a string", &v, Expect::Rejected("total"))
        .await;
    let v = event(
        "null-8",
        "page_viewed",
        "nul",
        &ago(4000),
        json!({}),
        json!({"session_id": 5}),
    );
    plan.json("a numeric session id", &v, Expect::Rejected("session_id"))
        .await;
    for (what, text, why) in [
        ("a JSON array", "[1,2,3]", "not an object"),
        ("JSON null", "null", "not an object"),
        ("a JSON string", "\"hello\"", "not an object"),
        ("nothing at all", "", "not a JSON object"),
        (
            "a lone surrogate",
            "{\"id\":\"s-1\",\"type\":\"page_viewed\",\"client_id\":\"\\ud800\"}",
            "hex escape",
        ),
        (
            "a NUL character",
            "{\"id\":\"n-1\",\"type\":\"page_viewed\",\"client_id\":\"a\\u0000b\"}",
            "NUL",
        ),
    ] {
        plan.raw(
            what,
            "page_viewed",
            text.as_bytes().to_vec(),
            Expect::Rejected(why),
        )
        .await;
    }
    // Not UTF-8.
    let mut bytes = b"{\"id\":\"bin-1\",\"type\":\"page_viewed\",\"client_id\":\"b".to_vec();
    bytes.extend_from_slice(&[0xff, 0xfe, 0xc3, 0x28]);
    bytes.extend_from_slice(b"\",\"occurred_at\":\"2026-01-01T00:00:00Z\"}");
    plan.raw(
        "bytes that are not UTF-8",
        "page_viewed",
        bytes,
        Expect::Rejected("UTF-8"),
    )
    .await;

    // One client, 10,000 events: views of 10,000 different products, pages,
    // cart adds and orders, over a few days.
    let heavy = 10_000usize;
    plan.json(
        "the heavy client's registration",
        &registered("h-reg", "heavy", "organic", "Heavy"),
        Expect::Stored,
    )
    .await;
    let start = Instant::now();
    // Acks are awaited by the chunk: the client allows only so many in flight.
    let mut acks = Vec::with_capacity(500);
    for i in 0..heavy {
        let at = ago(400_000 - 30 * i as i64);
        let session = json!({"session_id": format!("hs{}", i / 200)});
        let e = match i % 100 {
            0 => event(
                &format!("h{i}"),
                "order_placed",
                "heavy",
                &at,
                json!({"total": 20.0, "items": [{"product_id": format!("p{i}"), "quantity": 1}]}),
                session,
            ),
            1..=4 => event(
                &format!("h{i}"),
                "cart_item_added",
                "heavy",
                &at,
                json!({"product_id": format!("p{i}"), "quantity": 1, "price": 20.0}),
                session,
            ),
            5..=49 => event(
                &format!("h{i}"),
                "product_viewed",
                "heavy",
                &at,
                json!({"product_id": format!("p{i}"), "price": 20.0}),
                session,
            ),
            _ => event(
                &format!("h{i}"),
                "page_viewed",
                "heavy",
                &at,
                json!({"url": format!("/page/{i}")}),
                session,
            ),
        };
        let ty = e["type"].as_str().unwrap().to_string();
        acks.push(
            app.js
                .publish(
                    format!("{}.{ty}", app.config.nats.subject_prefix),
                    serde_json::to_vec(&e).unwrap().into(),
                )
                .await
                .unwrap(),
        );
        plan.seq += 1;
        plan.expect
            .insert(plan.seq, (format!("heavy event {i}"), Expect::Stored));
        if acks.len() == 500 {
            for a in acks.drain(..) {
                a.await.expect("stream ack");
            }
        }
    }
    for a in acks {
        a.await.expect("stream ack");
    }
    // And after all that, an ordinary registration.
    plan.json(
        "an ordinary registration after it all",
        &registered("after-1", "after", "organic", "After"),
        Expect::Stored,
    )
    .await;
    let total = plan.seq;
    let expect = plan.expect;

    let after = eventually(
        Duration::from_secs(300),
        "the registration after it all mailed",
        || async {
            app.mails()
                .into_iter()
                .find(|m| m.to == "after@example.com")
        },
    )
    .await;
    let took = start.elapsed();
    assert_eq!(after.subject, "Welcome, After!");
    // Another client's mail does not mean every earlier batch committed
    // (batches of different clients commit independently): the ack floor does.
    eventually(Duration::from_secs(120), "every message acked", || async {
        (app.consumer_info().await.ack_floor.stream_sequence >= total).then_some(())
    })
    .await;

    // Every message is exactly one of: a stored event, a kept rejection.
    let sql = app.db.sql().await;
    let stored: Vec<u64> = sql
        .rows("SELECT CAST(stream_seq AS TEXT) FROM events WHERE stream_seq IS NOT NULL ORDER BY stream_seq")
        .await
        .into_iter()
        .map(|r| r[0].as_deref().unwrap().parse().unwrap())
        .collect();
    let rejected: BTreeMap<u64, String> = sql
        .rows("SELECT CAST(stream_seq AS TEXT), reason FROM rejected")
        .await
        .into_iter()
        .map(|r| {
            (
                r[0].as_deref().unwrap().parse().unwrap(),
                r[1].clone().unwrap_or_default(),
            )
        })
        .collect();
    sql.close().await;
    let stored_set: std::collections::BTreeSet<u64> = stored.iter().copied().collect();
    assert_eq!(stored.len(), stored_set.len(), "no event stored twice");
    let mut n_stored = 0;
    let mut n_rejected = 0;
    for (seq, (what, expect)) in &expect {
        let is_stored = stored_set.contains(seq);
        let reason = rejected.get(seq);
        match expect {
            Expect::Stored => {
                assert!(
                    is_stored && reason.is_none(),
                    "{what} (#{seq}) stored: {reason:?}"
                );
                n_stored += 1;
            }
            Expect::Rejected(why) => {
                assert!(!is_stored, "{what} (#{seq}) not stored");
                let reason = reason.unwrap_or_else(|| panic!("{what} (#{seq}) kept as rejected"));
                assert!(
                    reason.contains(why),
                    "{what} (#{seq}): {reason:?} should say {why:?}"
                );
                n_rejected += 1;
            }
        }
    }
    assert_eq!(
        stored_set.len() + rejected.len(),
        total as usize,
        "nothing else"
    );

    // No rule failed over any of it.
    let metrics = app.get("/metrics").await.text().await.unwrap();
    let rule_errors = metric_sum(&metrics, "nudge_rule_errors_total{");
    assert_eq!(rule_errors, 0, "{metrics}");
    assert_eq!(
        metric_sum(&metrics, "nudge_events_rejected_total "),
        n_rejected
    );

    // The unicode client: in their mail as sent, in the 360 view, found by search.
    let zoe = app.wait_mails(1).await;
    let zoe = zoe
        .iter()
        .find(|m| m.to == "zoe@example.com")
        .expect("Zoë's mail");
    assert_eq!(zoe.subject, format!("Welcome, {first}!"));
    assert!(
        zoe.text.contains(&format!("Hello {first},")),
        "{}",
        zoe.text
    );
    let view: Value = app
        .get(&format!("/api/clients/{}", path_segment(uni_id)))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(view["client_id"], uni_id, "{view}");
    assert_eq!(view["first_name"], first, "{view}");
    assert_eq!(view["last_name"], last, "{view}");
    for (q, who) in [
        ("זואי", uni_id),
        ("👩‍👩‍👧‍👦", uni_id),
        ("émile", "emile"),
        ("øyvind", "emile"),
    ] {
        let found: Value = app
            .get(&format!("/api/clients?q={}", path_segment(q)))
            .await
            .json()
            .await
            .unwrap();
        assert!(
            found["clients"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["client_id"] == who),
            "search {q:?} finds {who}: {found}"
        );
    }
    // The long name went out, its subject cut at 200 characters (on a
    // character boundary, with an ellipsis); the wrong-typed names fell back.
    let mails = app.mails();
    let long = mails
        .iter()
        .find(|m| m.to == "long@example.com")
        .expect("the long name's mail");
    let whole = format!("Welcome, {long_name}!");
    let kept: String = whole.chars().take(199).collect();
    assert_eq!(long.subject, format!("{kept}…"));
    let odd = mails
        .iter()
        .find(|m| m.to == "odd@example.com")
        .expect("odd's mail");
    assert_eq!(odd.subject, "Welcome, there!");
    // The nested event is shown as it came.
    let events: Value = app
        .get("/api/clients/deep/events")
        .await
        .json()
        .await
        .unwrap();
    let tree = &events["events"][0]["data"]["tree"];
    let mut depth = 0;
    let mut t = tree;
    while let Some(inner) = t.get("a") {
        depth += 1;
        t = inner;
    }
    assert_eq!(depth, 100, "{events}");
    // The heavy client, whole.
    let view: Value = app.get("/api/clients/heavy").await.json().await.unwrap();
    assert_eq!(view["orders"]["online"]["count"], 100, "{}", view["orders"]);

    println!(
        "fault suite ({backend:?}): {total} hostile or heavy messages: {n_stored} stored, \
         {n_rejected} rejected with their reason, none both, none lost; one client's 10,000 \
         events and the registration after them decided in {:.1} s; 0 rule errors",
        took.as_secs_f64()
    );
    app.stop().await;
}

backend_tests!(hostile_input_is_stored_or_rejected_with_a_reason_and_never_blocks,);
