//! Stalls: the pull loop keeps pulling while messages are pending, however
//! small the batches, and a stop is bounded whatever the broker is doing.

use crate::helpers::{
    Backend, Daemon, TestEnv, ago, daemon_vars, event, free_port, sigterm, spawn_daemon,
};
use nudge::store::History;
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

/// The documented bound is `app::STOP_GRACE` (10 s) for the work in hand
/// plus 2 s for the broker's last answer (and a forced exit 5 s later).
/// Here nothing may wait for the grace itself: a batch in hand that cannot
/// commit is left unacked at once, a broker that is away is not waited for.
const STOP_BOUND: Duration = Duration::from_secs(8);

/// Sends SIGTERM and returns how long the process took to exit, asserting
/// a clean exit (status 0) within [`STOP_BOUND`].
fn stop_within_bound(daemon: &mut Daemon, what: &str) -> Duration {
    sigterm(daemon);
    let asked = Instant::now();
    loop {
        if let Some(status) = daemon.try_wait().unwrap() {
            let took = asked.elapsed();
            assert!(status.success(), "{what}: exit status {status}");
            println!("{what}: exited {took:?} after SIGTERM");
            return took;
        }
        assert!(
            asked.elapsed() < STOP_BOUND,
            "{what}: still running {STOP_BOUND:?} after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the daemon's HTTP side answers (ready or not).
async fn wait_http(port: &str) {
    crate::helpers::eventually(Duration::from_secs(20), "nudge's HTTP", || async {
        reqwest::get(format!("http://{port}/health"))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
}

async fn sigterm_stops_within_a_bound_with_nats_down_or_gone(backend: Backend) {
    let mut env = TestEnv::new(backend).await;
    // Never reachable: nudge retries connecting in the background.
    let listen = format!("127.0.0.1:{}", free_port());
    let unreachable = format!("nats://127.0.0.1:{}", free_port());
    let vars = daemon_vars(
        &env,
        &[
            ("NUDGE__NATS__URL", unreachable.as_str()),
            ("NUDGE__HTTP__LISTEN", listen.as_str()),
        ],
    );
    let mut daemon = spawn_daemon(&vars);
    wait_http(&listen).await;
    // Let it sit in its connect retries and its stream setup retries.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_within_bound(&mut daemon, "NATS never reachable");

    // Consuming, then the broker goes away mid-run with events in hand.
    let listen = format!("127.0.0.1:{}", free_port());
    let vars = daemon_vars(&env, &[("NUDGE__HTTP__LISTEN", listen.as_str())]);
    let mut daemon = spawn_daemon(&vars);
    wait_http(&listen).await;
    crate::helpers::eventually(Duration::from_secs(20), "the stream", || async {
        env.js.get_stream(&env.config.nats.stream).await.ok()
    })
    .await;
    publish_many(&env, 300).await;
    env.nats.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_within_bound(&mut daemon, "NATS stopped mid-run");
}

backend_tests!(
    one_event_batches_are_pulled_without_pauses,
    sigterm_stops_within_a_bound_with_nats_down_or_gone,
);
