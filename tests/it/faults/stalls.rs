//! Stalls: the pull loop keeps pulling while messages are pending, however
//! small the batches, and a stop is bounded whatever the broker is doing.

use crate::helpers::{Backend, TestEnv, ago, event};
use nudge::store::Store;
use serde_json::json;
use std::time::{Duration, Instant};

/// Publishes `n` page views without waiting for each ack in turn (the
/// acks are awaited in chunks): a few thousand events in a second or two.
async fn publish_many(env: &TestEnv, n: usize) {
    let subject = format!("{}.page_viewed", env.config.nats.subject_prefix);
    for chunk in (0..n).collect::<Vec<_>>().chunks(200) {
        let mut acks = Vec::with_capacity(chunk.len());
        for i in chunk {
            let e = event(
                &format!("pv-{i}"),
                "page_viewed",
                &format!("c{}", i % 50),
                &ago(3600),
                json!({"url": format!("/p/{i}")}),
                json!({"session_id": "s"}),
            );
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("pv-{i}").as_str());
            let ack = env
                .js
                .publish_with_headers(
                    subject.clone(),
                    headers,
                    serde_json::to_vec(&e).unwrap().into(),
                )
                .await
                .expect("publish");
            acks.push(ack);
        }
        for ack in acks {
            ack.await.expect("stream ack");
        }
    }
}

async fn one_event_batches_are_pulled_without_pauses(backend: Backend) {
    let env = TestEnv::with_env(
        backend,
        &[
            ("NUDGE__NATS__BATCH_SIZE", "1"),
            ("NUDGE__NATS__BATCHES_IN_FLIGHT", "3"),
        ],
    )
    .await;
    let app = env.start().await;
    let total = 3000u64;
    let started = Instant::now();
    publish_many(&app, total as usize).await;
    // The longest stretch without one more event committed: the bug this
    // guards against paused consumption for a pull expiry (30 s) at a time
    // with messages pending; one-event commits take milliseconds.
    let mut longest = Duration::ZERO;
    let mut last = (0u64, Instant::now());
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let n = app.store.count_events().await.unwrap();
        if n > last.0 {
            last = (n, Instant::now());
        }
        longest = longest.max(last.1.elapsed());
        if n >= total {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{n} of {total} committed after 180 s"
        );
        assert!(
            longest < Duration::from_secs(8),
            "consumption paused {longest:?} with {} of {total} committed",
            n
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "{total} one-event batches committed in {:?}; longest pause {longest:?}",
        started.elapsed()
    );
    app.stop().await;
}

backend_tests!(one_event_batches_are_pulled_without_pauses,);
