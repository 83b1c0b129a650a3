//! Batches decided ahead: each batch of an instance is decided while the one
//! before it commits, on top of what that one decided, and commits after it.
//! Driven through the pipeline directly, so that the tests choose what
//! overlaps and when another writer gets in between.

use crate::helpers::*;
use chrono::{Duration as Span, Utc};
use futures::future::BoxFuture;
use nudge::config::Config;
use nudge::domain::counters::{CounterKey, period_key};
use nudge::domain::event::ClientId;
use nudge::flow::catalog::Catalog;
use nudge::flow::pipeline::{AckFloor, Incoming, Pipeline};
use nudge::metrics::Metrics;
use nudge::store::{Admin, AnyStore, State};
use serde_json::json;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

/// When the tests' events happen: any fixed time will do.
fn start() -> chrono::DateTime<Utc> {
    "2026-06-01T10:00:00Z".parse().unwrap()
}

fn instance(store: &AnyStore, dir: &Path) -> Pipeline {
    let rules = dir.join("rules");
    let templates = dir.join("templates");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::create_dir_all(&templates).unwrap();
    std::fs::write(rules.join("order_check.rhai"), ORDER_CHECK).unwrap();
    let mut config = Config::default();
    config.rules.dir = rules;
    config.templates.dir = templates;
    let catalog = Arc::new(Catalog::load(&config));
    Pipeline::new(
        store.clone(),
        catalog,
        Arc::new(Metrics::default()),
        &config,
    )
}

fn page_view(id: &str, client: &str, n: u64, seq: Option<u64>) -> Incoming {
    let at = start() + Span::seconds(seq.unwrap_or(1000) as i64);
    let payload = event(
        id,
        "page_viewed",
        client,
        &at.to_rfc3339(),
        json!({"url": "/", "n": n}),
        json!({"session_id": format!("s-{client}")}),
    );
    Incoming {
        subject: "shop.page_viewed".into(),
        payload: serde_json::to_vec(&payload).unwrap().into(),
        stream_seq: seq,
        published: Some(Utc::now()),
    }
}

/// A broker whose ack floor stays at 0 (nothing acked yet), that first
/// lets `before` run: another writer getting in between a batch's
/// decision and its commit.
struct Floor {
    before: tokio::sync::Mutex<Option<BoxFuture<'static, ()>>>,
}

impl Floor {
    fn still() -> Self {
        Self {
            before: tokio::sync::Mutex::new(None),
        }
    }
    fn after(f: BoxFuture<'static, ()>) -> Self {
        Self {
            before: tokio::sync::Mutex::new(Some(f)),
        }
    }
}

impl AckFloor for Floor {
    fn floor(&self) -> BoxFuture<'_, Result<u64, String>> {
        Box::pin(async move {
            if let Some(f) = self.before.lock().await.take() {
                f.await;
            }
            Ok(0)
        })
    }
}

async fn counter(store: &AnyStore, name: &str) -> f64 {
    let key = CounterKey {
        name: name.into(),
        period: period_key("year", start(), chrono_tz::Tz::UTC).unwrap(),
    };
    store.load_counter(&key).await.unwrap().value
}

async fn store(backend: Backend, dir: &Path) -> (TestDb, AnyStore) {
    let db = TestDb::create(backend, dir, "chain").await;
    let store = AnyStore::connect(&db.url, 4).await.unwrap();
    store.migrate().await.unwrap();
    (db, store)
}

backend_tests!(batches_decided_ahead_commit_on_top_of_the_ones_before);

/// Four batches that share every client, all in flight at once: each is
/// decided on what the ones before it decided, so every event is applied
/// once and in order, the shared counter is exact, and no decision had to
/// be taken again.
async fn batches_decided_ahead_commit_on_top_of_the_ones_before(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (_db, store) = store(backend, dir.path()).await;
    let pipeline = instance(&store, dir.path());
    let (clients, batches, each) = (10u64, 4u64, 50u64);
    let mut seq = 0;
    let mut n = vec![0u64; clients as usize];
    let batches: Vec<Vec<Incoming>> = (0..batches)
        .map(|b| {
            (0..each)
                .map(|i| {
                    seq += 1;
                    let c = (i % clients) as usize;
                    n[c] += 1;
                    page_view(&format!("e{b}-{i}"), &format!("c{c}"), n[c], Some(seq))
                })
                .collect()
        })
        .collect();
    let floor = Floor::still();
    let lease = Duration::from_secs(30);
    let runs = batches.iter().map(|b| {
        let mut turn = pipeline.turn();
        let (pipeline, floor) = (&pipeline, &floor);
        async move { pipeline.process_in_order(b, floor, lease, &mut turn).await }
    });
    for report in futures::future::join_all(runs).await {
        assert_eq!(report.unwrap().accepted, each as usize);
    }
    assert_eq!(counter(&store, "applied").await, seq as f64);
    assert_eq!(counter(&store, "order_violations").await, 0.0);
    assert_eq!(
        pipeline.metrics().decided_again.load(Relaxed),
        0,
        "every batch committed as it was decided ahead"
    );
    let ids: Vec<ClientId> = (0..clients)
        .map(|c| ClientId::parse(format!("c{c}")).unwrap())
        .collect();
    let states = store
        .load_clients(&ids.iter().collect::<Vec<_>>())
        .await
        .unwrap();
    for (id, state) in &states {
        assert_eq!(
            state.stats.events.get("page_viewed"),
            Some(&(batches.len() as u64 * each / clients)),
            "{id}: each event applied once"
        );
    }
}

backend_tests!(a_batch_decided_on_one_that_conflicted_is_decided_again);

/// Another writer changes a client between the decision of a batch and its
/// commit, while the next batch has already been decided on top of it: the
/// first is decided again on the other writer's state, the second on the
/// first's, and nothing is lost or applied twice.
async fn a_batch_decided_on_one_that_conflicted_is_decided_again(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (_db, store) = store(backend, dir.path()).await;
    let pipeline = instance(&store, dir.path());
    // Another instance on the same database.
    let other = Arc::new(instance(&store, dir.path()));
    let first = vec![
        page_view("a1", "x", 1, Some(1)),
        page_view("b1", "y", 1, Some(2)),
    ];
    let second = vec![page_view("a2", "x", 2, Some(3))];
    let login = {
        let payload = event(
            "l1",
            "login_succeeded",
            "x",
            &(start() + Span::seconds(2)).to_rfc3339(),
            json!({}),
            json!({}),
        );
        Incoming {
            subject: "shop.login_succeeded".into(),
            payload: serde_json::to_vec(&payload).unwrap().into(),
            stream_seq: None,
            published: None,
        }
    };
    // Runs when the first batch, decided, looks at the window before its
    // commit; the pause leaves the second batch time to decide on top of it.
    let cut_in = Box::pin(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        other.process(&[login]).await.unwrap();
    });
    let (first_floor, second_floor) = (Floor::after(cut_in), Floor::still());
    let (mut one, mut two) = (pipeline.turn(), pipeline.turn());
    let lease = Duration::from_secs(30);
    let (a, b) = tokio::join!(
        pipeline.process_in_order(&first, &first_floor, lease, &mut one),
        pipeline.process_in_order(&second, &second_floor, lease, &mut two),
    );
    assert_eq!(a.unwrap().accepted, 2);
    assert_eq!(b.unwrap().accepted, 1);
    assert!(
        pipeline.metrics().decided_again.load(Relaxed) >= 1,
        "the first batch's decision did not hold"
    );
    let x = ClientId::parse("x").unwrap();
    let states = store.load_clients(&[&x]).await.unwrap();
    let events = &states[&x].stats.events;
    assert_eq!(events.get("page_viewed"), Some(&2), "{events:?}");
    assert_eq!(events.get("login_succeeded"), Some(&1), "{events:?}");
    assert_eq!(counter(&store, "applied").await, 3.0);
    assert_eq!(counter(&store, "order_violations").await, 0.0);
}
