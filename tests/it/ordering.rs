//! Live decisions equal replay, backtest and a plain reference computation,
//! whatever the batches: a generated shop history (clients registering, then
//! months of orders with many ties on event time and totals around the
//! threshold) goes through the live daemon with several batch sizes, lingers
//! and batches in flight (and, on PostgreSQL, three instances at once), and
//! every effect is compared with `nudge backtest`, `nudge replay` and what
//! the test itself computes in stream order. The campaigns decided by shared
//! counters are the ones under test: the 99th big client of a quarter
//! (`happy_client`, `add_distinct`), every 40th order of a month (`add`'s
//! running total) and a decision on a counter only read (`total`).

use crate::helpers::{Backend, TestDb, TestEnv, daemon_vars, event, registered_at, spawn_daemon};
use chrono::{DateTime, Duration as Span, Utc};
use nudge::domain::counters::period_key;
use nudge::flow::pipeline::{Incoming, Pipeline};
use nudge::store::{Admin, Batches, Outbox, Staff, State, Window};
// The kit's deterministic generator (the bench's), so a failing history can
// be made again from its seed.
use nudge_kit::workload::Rng;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

/// Decisions on counters shared by all clients: every 40th order of a month
/// makes a task (the value `add` returns), and a small order while exactly
/// ten big ones were counted this month makes another (a counter only read).
const MONTHLY: &str = r#"
const ON = ["order_placed"];
let total = event.data.total ?? 0.0;
if type_of(total) == "i64" { total = total.to_float(); }
let n = add("orders_seen", "month", 1).to_int();
if n % 40 == 0 {
    task("sales", `Order ${n} of the month`, #{ order_id: event.data.order_id });
}
if total > 1000.0 {
    add("big_orders", "month", 1);
} else if total("big_orders", "month") == 10.0 {
    task("sales", "A small order after ten big ones", #{ order_id: event.data.order_id });
}
"#;

/// One order of the history, as the reference sees it.
struct Order {
    id: String,
    client: String,
    at: DateTime<Utc>,
    total: f64,
}

/// The history in the order it is published (the stream's order), and the
/// orders among it.
fn shop_history(seed: u64, clients: usize, orders: usize) -> (Vec<Value>, Vec<Order>) {
    let mut rng = Rng::new(seed);
    let t0: DateTime<Utc> = "2026-01-05T08:00:00Z".parse().unwrap();
    // Client ids whose alphabetical order has nothing to do with time.
    let ids: Vec<String> = (0..clients)
        .map(|i| format!("{:08x}-{i}", rng.next_u64() as u32))
        .collect();
    let mut events = Vec::new();
    for (i, c) in ids.iter().enumerate() {
        // Ten registrations a minute: ties on event time.
        let at = t0 + Span::minutes(i as i64 / 10);
        events.push((at, registered_at(&format!("r-{c}"), c, &at.to_rfc3339())));
    }
    let mut list = Vec::new();
    let start = t0 + Span::days(1);
    for k in 0..orders {
        let c = &ids[rng.below(clients as u64) as usize];
        // Six months on an hourly grid: many orders share their time.
        let at = start + Span::hours(rng.below(24 * 182) as i64);
        // Around the threshold, whole and fractional, some exactly on it.
        let total = match rng.below(10) {
            0 => 1000.0,
            1 => 1000.5,
            _ => 900.0 + rng.below(20_000) as f64 / 100.0,
        };
        let id = format!("o-{k}");
        events.push((
            at,
            event(
                &id,
                "order_placed",
                c,
                &at.to_rfc3339(),
                json!({"order_id": id, "total": total, "currency": "EUR",
                       "items": [{"product_id": "p1", "quantity": 1, "price": total}]}),
                json!({"channel": "web"}),
            ),
        ));
        list.push(Order {
            id,
            client: c.clone(),
            at,
            total,
        });
    }
    // Published in event-time order; ties in the generator's order.
    let mut order: Vec<usize> = (0..events.len()).collect();
    order.sort_by_key(|i| events[*i].0);
    let published: Vec<Value> = order.iter().map(|i| events[*i].1.clone()).collect();
    let pos: HashMap<String, usize> = published
        .iter()
        .enumerate()
        .map(|(n, e)| (e["id"].as_str().unwrap().to_string(), n))
        .collect();
    list.sort_by_key(|o| pos[&o.id]);
    (published, list)
}

/// What the counter campaigns must decide, computed plainly in stream
/// order: `(rule, kind, cause)` of each effect.
fn reference(orders: &[Order]) -> BTreeSet<(String, String, String)> {
    let tz = chrono_tz::Tz::UTC;
    let mut out = BTreeSet::new();
    let mut put = |rule: &str, kind: &str, cause: &str| {
        out.insert((rule.to_string(), kind.to_string(), cause.to_string()));
    };
    let mut big_clients: HashMap<String, HashSet<String>> = HashMap::new();
    let mut seen: HashMap<String, i64> = HashMap::new();
    let mut big: HashMap<String, i64> = HashMap::new();
    for o in orders {
        let quarter = period_key("quarter", o.at, tz).unwrap();
        let month = period_key("month", o.at, tz).unwrap();
        if o.total > 1000.0 {
            let set = big_clients.entry(quarter).or_default();
            if set.insert(o.client.clone()) && set.len() == 99 {
                for kind in ["mail", "emit", "task"] {
                    put("happy_client", kind, &o.id);
                }
            }
        }
        let n = seen.entry(month.clone()).or_default();
        *n += 1;
        if *n % 40 == 0 {
            put("monthly", "task", &o.id);
        }
        let b = big.entry(month).or_default();
        if o.total > 1000.0 {
            *b += 1;
        } else if *b == 10 {
            put("monthly", "task", &o.id);
        }
    }
    out
}

/// The effects of the counter campaigns among `(rule, kind, cause)`.
fn campaigns(all: &BTreeSet<(String, String, String)>) -> BTreeSet<(String, String, String)> {
    all.iter()
        .filter(|(rule, ..)| rule == "happy_client" || rule == "monthly")
        .cloned()
        .collect()
}

/// Waits until the consumer `name` has acked the whole stream.
async fn wait_consumed(env: &TestEnv, name: &str, what: &str) {
    let stream = env
        .js
        .get_stream(&env.config.nats.stream)
        .await
        .expect("the stream exists");
    let last = stream.cached_info().state.last_sequence;
    // A stall fails, a slow machine does not: what is bounded is the time
    // without progress (one-event batches on a loaded machine take minutes).
    let stall = Duration::from_secs(60);
    let mut floor = 0;
    let mut moved = tokio::time::Instant::now();
    loop {
        let now = async {
            let mut consumer: async_nats::jetstream::consumer::PullConsumer =
                stream.get_consumer(name).await.ok()?;
            Some(consumer.info().await.ok()?.ack_floor.stream_sequence)
        }
        .await;
        if let Some(now) = now {
            if now >= last {
                return;
            }
            if now > floor {
                floor = now;
                moved = tokio::time::Instant::now();
            }
        }
        assert!(
            moved.elapsed() < stall,
            "{what}: no progress for {stall:?} (acked up to {floor} of {last})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every effect in a database's outbox: `(rule, kind, cause)` and the keys.
async fn outbox_of(
    store: &nudge::store::AnyStore,
) -> (BTreeSet<(String, String, String)>, Vec<String>) {
    let rows = store.list_outbox(1_000_000).await.unwrap();
    let mut keys: Vec<String> = rows.iter().map(|r| r.key.clone()).collect();
    keys.sort();
    let set = rows
        .into_iter()
        .map(|r| (r.rule, r.kind, r.cause))
        .collect();
    (set, keys)
}

/// One live run on a database of its own, with its own durable consumer on
/// the shared stream: its outbox once the whole stream is consumed.
async fn live_run(
    env: &TestEnv,
    backend: Backend,
    name: &str,
    batch: usize,
    linger_ms: u64,
    in_flight: usize,
) -> (nudge::store::AnyStore, TestDb) {
    let db = TestDb::create(backend, env.dir.path(), name).await;
    let mut config = env.config.clone();
    config.database.url = db.url.clone().into();
    config.nats.consumer = name.to_string();
    config.nats.batch_size = batch.try_into().unwrap();
    config.nats.batch_linger_ms = linger_ms;
    config.nats.batches_in_flight = in_flight.try_into().unwrap();
    let app = nudge::app::Application::build(config)
        .await
        .expect("app builds");
    let store = app.store().clone();
    let cancel = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(app.run_until_stopped(cancel.clone()));
    wait_consumed(env, name, &format!("{name} consumes the stream")).await;
    cancel.cancel();
    task.await.unwrap().unwrap();
    (store, db)
}

async fn setup(backend: Backend, seed: u64) -> (TestEnv, Vec<Value>, Vec<Order>) {
    let env = TestEnv::new(backend).await;
    // Sweeps run at wall-clock times that a back-dated history does not
    // respect: the campaigns under test are event-driven.
    std::fs::remove_file(env.rules_dir().join("idle_reminder.rhai")).unwrap();
    std::fs::write(env.rules_dir().join("monthly.rhai"), MONTHLY).unwrap();
    env.create_stream().await;
    let (events, orders) = shop_history(seed, 1_500, 4_000);
    (env, events, orders)
}

async fn publish_all(env: &TestEnv, events: &[Value]) {
    for e in events {
        env.publish(e).await;
    }
}

backend_tests!(live_decisions_equal_backtest_replay_and_a_reference_whatever_the_batches);

async fn live_decisions_equal_backtest_replay_and_a_reference_whatever_the_batches(
    backend: Backend,
) {
    let seed = 0x5EED_0019;
    let (env, events, orders) = setup(backend, seed).await;
    let expected = reference(&orders);
    assert!(
        expected.iter().filter(|e| e.0 == "happy_client").count() >= 3,
        "the history reaches the 99th big client in at least one quarter: {expected:?}"
    );

    // The first run consumes while the shop publishes (small batches as
    // events trickle in); the others find the whole history waiting (full
    // batches holding hundreds of clients each).
    let db = TestDb::create(backend, env.dir.path(), "live0").await;
    let mut config = env.config.clone();
    config.database.url = db.url.clone().into();
    config.nats.consumer = "live0".into();
    let app = nudge::app::Application::build(config.clone())
        .await
        .expect("app builds");
    let first = app.store().clone();
    let cancel = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(app.run_until_stopped(cancel.clone()));
    publish_all(&env, &events).await;
    wait_consumed(&env, "live0", "the first run consumes the stream").await;
    cancel.cancel();
    task.await.unwrap().unwrap();
    let (live, live_keys) = outbox_of(&first).await;
    assert_eq!(
        campaigns(&live),
        expected,
        "live (consuming while published) against the reference"
    );

    let mut rng = Rng::new(seed);
    let runs = [(2000, 5, 3), (1, 0, 1), (37, 0, 4)]
        .into_iter()
        .chain((0..2).map(|_| {
            (
                1 + rng.below(700) as usize,
                rng.below(20),
                1 + rng.below(4) as usize,
            )
        }))
        .collect::<Vec<_>>();
    for (i, (batch, linger, in_flight)) in runs.into_iter().enumerate() {
        let name = format!("live{}", i + 1);
        let (store, _db) = live_run(&env, backend, &name, batch, linger, in_flight).await;
        let (effects, keys) = outbox_of(&store).await;
        println!(
            "ordering: {name}: batch {batch}, linger {linger} ms, {in_flight} in flight: {} effects",
            keys.len()
        );
        assert_eq!(
            campaigns(&effects),
            expected,
            "{name} (batch {batch}, linger {linger}, {in_flight} in flight) against the reference"
        );
        assert_eq!(
            keys, live_keys,
            "{name}: every effect, not only the campaigns"
        );
    }

    // The backtest of the same rules over the first run's log.
    let bt = nudge::tools::backtest(&config, &first, &env.rules_dir(), None, None)
        .await
        .unwrap();
    let mut bt_keys: Vec<String> = bt.effects.iter().map(|e| e.key.clone()).collect();
    bt_keys.sort();
    let bt_set: BTreeSet<(String, String, String)> = bt
        .effects
        .iter()
        .map(|e| (e.rule.clone(), e.kind.clone(), e.cause.clone()))
        .collect();
    assert_eq!(
        campaigns(&bt_set),
        expected,
        "backtest against the reference"
    );
    assert_eq!(
        bt_keys, live_keys,
        "backtest against live, effect by effect"
    );

    // A replay rebuilds the same counters.
    let orders = &orders;
    let counters = |store: nudge::store::AnyStore| async move {
        let mut out = BTreeMap::new();
        for e in orders {
            for (name, period) in [
                ("big_order_clients", "quarter"),
                ("orders_seen", "month"),
                ("big_orders", "month"),
            ] {
                let key = nudge::domain::counters::CounterKey {
                    name: name.into(),
                    period: period_key(period, e.at, chrono_tz::Tz::UTC).unwrap(),
                };
                let v = store.load_counter(&key).await.unwrap().value;
                out.insert(format!("{}/{}", key.name, key.period), v);
            }
        }
        out
    };
    let before = counters(first.clone()).await;
    nudge::tools::replay(&config, &first, |_| {}).await.unwrap();
    let after = counters(first.clone()).await;
    assert_eq!(before, after, "replay rebuilds the same shared counters");
    drop(db);
}

/// Three instances on one PostgreSQL database take the same history at
/// once in small batches: the campaigns pick exactly what the reference
/// picks, in event-time order, not in the order the instances commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_decide_shared_counters_in_stream_order_on_postgres() {
    let seed = 0x5EED_0003;
    let (env, events, orders) = setup(Backend::Postgres, seed).await;
    let expected = reference(&orders);
    publish_all(&env, &events).await;
    let vars = daemon_vars(
        &env,
        &[
            ("NUDGE__NATS__BATCH_SIZE", "25"),
            ("NUDGE__NATS__BATCHES_IN_FLIGHT", "2"),
            ("NUDGE__NATS__ACK_WAIT_SECS", "30"),
            ("NUDGE__TEAMS__SALES__EMAIL", "sales@shop.test"),
        ],
    );
    let instances: Vec<_> = (0..3).map(|_| spawn_daemon(&vars)).collect();
    wait_consumed(
        &env,
        &env.config.nats.consumer,
        "three instances consume the stream",
    )
    .await;
    drop(instances);
    let store = nudge::app::open_store(&env.config).await.unwrap();
    let (effects, keys) = outbox_of(&store).await;
    assert_eq!(
        campaigns(&effects),
        expected,
        "three instances against the reference"
    );
    let bt = nudge::tools::backtest(&env.config, &store, &env.rules_dir(), None, None)
        .await
        .unwrap();
    let mut bt_keys: Vec<String> = bt.effects.iter().map(|e| e.key.clone()).collect();
    bt_keys.sort();
    assert_eq!(
        bt_keys, keys,
        "backtest against three live instances, effect by effect"
    );
}

/// A broker that never acks: the window keeps every message it was told of.
struct NoAcks;

impl nudge::flow::pipeline::AckFloor for NoAcks {
    fn floor(&self) -> futures::future::BoxFuture<'_, Result<u64, String>> {
        Box::pin(async { Ok(0) })
    }
}

/// A configuration with these folders and database (migrated), and a
/// `sales` team, with the store it opens.
async fn config_and_store(
    rules: &std::path::Path,
    templates: &std::path::Path,
    database_url: &str,
) -> (nudge::config::Config, nudge::store::AnyStore) {
    let vars: Vec<(String, String)> = [
        ("NUDGE__RULES__DIR", rules.display().to_string()),
        ("NUDGE__TEMPLATES__DIR", templates.display().to_string()),
        ("NUDGE__DATABASE__URL", database_url.to_string()),
        ("NUDGE__TEAMS__SALES__EMAIL", "sales@shop.test".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let config = nudge::config::Config::load_with_env(None, vars).unwrap();
    let store = nudge::app::open_store(&config).await.unwrap();
    store.migrate().await.unwrap();
    (config, store)
}

/// The pipeline of one instance on a SQLite database of its own.
async fn pipeline_on(dir: &std::path::Path, name: &str) -> Arc<Pipeline> {
    let rules = dir.join("rules");
    let templates = dir.join("templates");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::create_dir_all(&templates).unwrap();
    std::fs::write(rules.join("monthly.rhai"), MONTHLY).unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::copy(
        root.join("rules/happy_client.rhai"),
        rules.join("happy_client.rhai"),
    )
    .unwrap();
    for f in ["happy_client.txt", "happy_client.html"] {
        std::fs::copy(root.join("templates").join(f), templates.join(f)).unwrap();
    }
    let url = format!("sqlite://{}", dir.join(format!("{name}.db")).display());
    let (config, store) = config_and_store(&rules, &templates, &url).await;
    let catalog = Arc::new(nudge::flow::catalog::Catalog::load(&config));
    Arc::new(Pipeline::new(
        store,
        catalog,
        Arc::new(nudge::metrics::Metrics::default()),
        &config,
    ))
}

/// The decision core, as the pipeline drives it, decides the same however
/// the stream is cut into batches: one batch, one event a batch, random
/// cuts committed one after another, or random cuts with up to four
/// batches in flight at once (each decided on top of the one before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_split_of_the_stream_into_batches_decides_the_same() {
    let (events, orders) = shop_history(0x5EED_5E11, 300, 1_500);
    let incoming: Vec<Incoming> = events
        .iter()
        .enumerate()
        .map(|(i, e)| Incoming {
            subject: format!("shop.events.{}", e["type"].as_str().unwrap()),
            payload: serde_json::to_vec(e).unwrap().into(),
            stream_seq: Some(i as u64 + 1),
            published: None,
        })
        .collect();
    let expected: BTreeSet<_> = reference(&orders)
        .into_iter()
        .filter(|(rule, ..)| rule == "monthly")
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(0x5EED_5E12);
    let mut first: Option<Vec<String>> = None;
    for case in 0..12 {
        // Cut points: everything in one batch, one event a batch, or random.
        let cuts: Vec<usize> = match case {
            0 => vec![incoming.len()],
            1 => (1..=incoming.len()).collect(),
            _ => {
                let mut at = 0;
                let mut cuts = Vec::new();
                while at < incoming.len() {
                    let longest = 1 + rng.below(400);
                    at = (at + 1 + rng.below(longest) as usize).min(incoming.len());
                    cuts.push(at);
                }
                cuts
            }
        };
        let in_flight = if case < 2 {
            1
        } else {
            1 + rng.below(4) as usize
        };
        let pipeline = pipeline_on(dir.path(), &format!("split{case}")).await;
        let mut from = 0;
        let limit = Arc::new(tokio::sync::Semaphore::new(in_flight));
        let mut tasks = Vec::new();
        for to in &cuts {
            let batch = incoming[from..*to].to_vec();
            from = *to;
            let permit = limit.clone().acquire_owned().await.unwrap();
            let p = pipeline.clone();
            let mut turn = p.turn();
            tasks.push(tokio::spawn(async move {
                let r = p
                    .process_in_order(&batch, &NoAcks, Duration::from_secs(30), &mut turn)
                    .await;
                drop(permit);
                r
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let (effects, keys) = outbox_of(pipeline.store()).await;
        let monthly: BTreeSet<_> = effects
            .iter()
            .filter(|(rule, ..)| rule == "monthly")
            .cloned()
            .collect();
        assert_eq!(
            monthly,
            expected,
            "case {case}: {} batches, {in_flight} in flight",
            cuts.len()
        );
        match &first {
            None => first = Some(keys),
            Some(first) => assert_eq!(
                &keys,
                first,
                "case {case}: {} batches, {in_flight} in flight: every effect as with one batch",
                cuts.len()
            ),
        }
    }
}

/// A broker whose ack floor stays at 0, that holds the first look at it
/// until `open` is notified: an instance that pulled a batch and is slow to
/// go on with it.
struct Gate {
    open: Arc<tokio::sync::Notify>,
    passed: std::sync::atomic::AtomicBool,
}

impl nudge::flow::pipeline::AckFloor for Gate {
    fn floor(&self) -> futures::future::BoxFuture<'_, Result<u64, String>> {
        Box::pin(async {
            if !self.passed.swap(true, std::sync::atomic::Ordering::SeqCst) {
                self.open.notified().await;
            }
            Ok(0)
        })
    }
}

/// The first order of the month makes a task: a decision on a counter
/// shared by all clients, taken by whichever order counts first.
const FIRST: &str = r#"
const ON = ["order_placed"];
if add("orders", "month", 1) == 1.0 { task("sales", "First order of the month"); }
"#;

fn order_message(seq: u64) -> Incoming {
    let id = format!("o{seq}");
    let e = event(
        &id,
        "order_placed",
        &format!("client-{seq}"),
        "2026-06-01T10:00:00Z",
        json!({"order_id": id, "total": 10, "currency": "EUR", "items": []}),
        json!({}),
    );
    Incoming {
        subject: "shop.events.order_placed".into(),
        payload: serde_json::to_vec(&e).unwrap().into(),
        stream_seq: Some(seq),
        published: None,
    }
}

/// Two instances' pipelines on a database of their own with the `FIRST`
/// rule, and the store (and database, dropped with the test).
async fn two_instances_on(
    backend: Backend,
    name: &str,
) -> (
    Arc<Pipeline>,
    Arc<Pipeline>,
    nudge::store::AnyStore,
    (TestDb, tempfile::TempDir),
) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend, dir.path(), name).await;
    let rules = dir.path().join("rules");
    let templates = dir.path().join("templates");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::create_dir_all(&templates).unwrap();
    std::fs::write(rules.join("first.rhai"), FIRST).unwrap();
    let (config, store) = config_and_store(&rules, &templates, &db.url).await;
    let instance = || {
        Arc::new(Pipeline::new(
            store.clone(),
            Arc::new(nudge::flow::catalog::Catalog::load(&config)),
            Arc::new(nudge::metrics::Metrics::default()),
            &config,
        ))
    };
    (instance(), instance(), store, (db, dir))
}

/// `batch` taken by an instance that announced it and then waits at a gate
/// (a slow instance): its task, and what opens the gate.
async fn held_at_the_gate(
    instance: Arc<Pipeline>,
    batch: Vec<Incoming>,
    store: &nudge::store::AnyStore,
) -> (
    tokio::task::JoinHandle<
        Result<nudge::flow::pipeline::BatchReport, nudge::flow::error::BatchError>,
    >,
    Arc<tokio::sync::Notify>,
) {
    let first = batch.iter().filter_map(|m| m.stream_seq).min().unwrap();
    let below = batch.iter().filter_map(|m| m.stream_seq).max().unwrap() + 1;
    let open = Arc::new(tokio::sync::Notify::new());
    let gate = Gate {
        open: open.clone(),
        passed: false.into(),
    };
    let task = tokio::spawn(async move {
        instance
            .process_in_order(
                &batch,
                &gate,
                Duration::from_secs(60),
                &mut Default::default(),
            )
            .await
    });
    crate::helpers::eventually(Duration::from_secs(10), "the held batch announced", || {
        let store = store.clone();
        async move {
            let b = store
                .window_blockers(&["nobody"], &[], 0, below, &[], chrono::Utc::now())
                .await
                .ok()?;
            (b.first_pending == first).then_some(())
        }
    })
    .await;
    (task, open)
}

backend_tests!(
    a_later_batch_of_another_instance_waits_for_the_earlier_one_before_using_shared_counters
);

/// Two instances on one database: one pulled messages 1-10 and is slow,
/// the other pulled 11-20 (other clients) and is quick. Their events are
/// free as far as each client's order goes, but the counter shared by all
/// clients must see message 1 before message 11: the quick instance waits.
async fn a_later_batch_of_another_instance_waits_for_the_earlier_one_before_using_shared_counters(
    backend: Backend,
) {
    let (slow, quick, store, _db) = two_instances_on(backend, "two").await;
    let first: Vec<Incoming> = (1..=10).map(order_message).collect();
    let second: Vec<Incoming> = (11..=20).map(order_message).collect();
    let (slow_task, open) = held_at_the_gate(slow, first, &store).await;
    let quick_task = tokio::spawn(async move {
        quick
            .process_in_order(
                &second,
                &NoAcks,
                Duration::from_secs(30),
                &mut Default::default(),
            )
            .await
    });
    // Long enough for the quick one to commit, were it allowed to.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !quick_task.is_finished(),
        "the later batch waits for the earlier one"
    );
    open.notify_one();
    slow_task.await.unwrap().unwrap();
    quick_task.await.unwrap().unwrap();
    let (effects, _) = outbox_of(&store).await;
    let tasks: Vec<_> = effects
        .iter()
        .filter(|(_, kind, _)| kind == "task")
        .collect();
    assert_eq!(
        tasks,
        vec![&("first".to_string(), "task".to_string(), "o1".to_string())],
        "the first order of the month in stream order, not the first committed"
    );
}

backend_tests!(
    a_batch_waits_past_the_ack_wait_for_a_holder_that_renews_its_claim,
    a_holder_that_stops_renewing_its_claim_is_given_up_on
);

/// The earlier batch's instance is slower than the ack wait (2 s here) but
/// alive: it renews its claim, as a batch in hand does every third of the
/// ack wait. The later batch waits for it however long it takes, so the
/// counter shared by all clients still sees message 1 first. (It used to
/// give up after half the ack wait, whoever held the message.)
async fn a_batch_waits_past_the_ack_wait_for_a_holder_that_renews_its_claim(backend: Backend) {
    let (slow, quick, store, _db) = two_instances_on(backend, "renewing").await;
    let lease = Duration::from_secs(2);
    let first: Vec<Incoming> = (1..=10).map(order_message).collect();
    let second: Vec<Incoming> = (11..=20).map(order_message).collect();
    let (slow_task, open) = held_at_the_gate(slow.clone(), first, &store).await;
    // Its claim runs out in a second (announced a second ago with the 2 s
    // ack wait as its lease), unless renewed.
    let seqs: Vec<u64> = (1..=10).collect();
    expire_claims(
        &store,
        &seqs,
        chrono::Utc::now() + chrono::Duration::seconds(1),
    )
    .await;
    let renewing = tokio::spawn(async move {
        loop {
            slow.renew_claims(&seqs, lease).await.unwrap();
            tokio::time::sleep(lease / 3).await;
        }
    });
    let quick_task = tokio::spawn(async move {
        quick
            .process_in_order(&second, &NoAcks, lease, &mut Default::default())
            .await
    });
    // Twice the ack wait, four times the old patience.
    tokio::time::sleep(2 * lease).await;
    assert!(
        !quick_task.is_finished(),
        "the later batch waits for a live holder"
    );
    open.notify_one();
    slow_task.await.unwrap().unwrap();
    quick_task.await.unwrap().unwrap();
    renewing.abort();
    let (effects, _) = outbox_of(&store).await;
    let tasks: Vec<_> = effects
        .iter()
        .filter(|(_, kind, _)| kind == "task")
        .collect();
    assert_eq!(
        tasks,
        vec![&("first".to_string(), "task".to_string(), "o1".to_string())],
        "the first order of the month in stream order"
    );
}

/// The other side of the bound: a holder that stops renewing (it died) holds
/// the later batch back only until its claim has run out and half an ack
/// wait more has passed with nothing changing; then the stream goes on.
async fn a_holder_that_stops_renewing_its_claim_is_given_up_on(backend: Backend) {
    let (slow, quick, store, _db) = two_instances_on(backend, "stopped").await;
    let first: Vec<Incoming> = (1..=10).map(order_message).collect();
    let second: Vec<Incoming> = (11..=20).map(order_message).collect();
    // Announced with a 60 s lease, taken down to a moment ago: a holder
    // that died after announcing.
    let (slow_task, _open) = held_at_the_gate(slow, first, &store).await;
    slow_task.abort();
    let seqs: Vec<u64> = (1..=10).collect();
    let past = chrono::Utc::now() - chrono::Duration::seconds(1);
    expire_claims(&store, &seqs, past).await;
    let lease = Duration::from_secs(2);
    let started = std::time::Instant::now();
    let report = tokio::time::timeout(
        Duration::from_secs(30),
        quick.process_in_order(&second, &NoAcks, lease, &mut Default::default()),
    )
    .await
    .expect("the later batch goes on")
    .unwrap();
    assert_eq!(report.accepted, 10);
    assert!(
        started.elapsed() >= lease / 2,
        "it waited half an ack wait first: {:?}",
        started.elapsed()
    );
}

/// Sets the claims on `seqs` to run out at `at`, as if their holder had
/// stopped renewing them then.
async fn expire_claims(
    store: &nudge::store::AnyStore,
    seqs: &[u64],
    at: chrono::DateTime<chrono::Utc>,
) {
    // A fresh registration under a dead owner replaces the live one.
    let items: Vec<(u64, Option<String>)> = seqs
        .iter()
        .map(|s| (*s, Some(format!("client-{s}"))))
        .collect();
    store
        .window_register("dead-owner", &items, at)
        .await
        .unwrap();
}

/// A broker whose ack floor cannot be read for the first `failing` looks,
/// and is 0 after.
struct FlakyFloor {
    failing: std::sync::atomic::AtomicUsize,
}

impl nudge::flow::pipeline::AckFloor for FlakyFloor {
    fn floor(&self) -> futures::future::BoxFuture<'_, Result<u64, String>> {
        Box::pin(async {
            let left = self.failing.load(std::sync::atomic::Ordering::SeqCst);
            if left > 0 {
                self.failing
                    .store(left - 1, std::sync::atomic::Ordering::SeqCst);
                return Err("no answer from the broker".to_string());
            }
            Ok(0)
        })
    }
}

backend_tests!(a_batch_taken_apart_still_waits_for_an_earlier_message_of_its_client);

/// Issue #22's suspicion: when the ack floor cannot be read, attempts
/// fail; after three, the consumer takes the batch apart (`isolate`). Before
/// the failures were typed, that committed each message through a path that
/// skipped the consumer's window, so a client's later order could be decided
/// before its earlier one, still pending in another instance's batch. Now an
/// unreadable floor is transient: taking the batch apart rejects nothing,
/// commits nothing, and once the floor answers the later order still waits
/// for the earlier one.
async fn a_batch_taken_apart_still_waits_for_an_earlier_message_of_its_client(backend: Backend) {
    let (holder, apart, store, _db) = two_instances_on(backend, "apart").await;
    // One client's two orders: the first pulled by an instance that is slow
    // to go on, the second by this one.
    let order = |seq: u64| {
        let mut m = order_message(seq);
        let e = event(
            &format!("o{seq}"),
            "order_placed",
            "client-same",
            "2026-06-01T10:00:00Z",
            json!({"order_id": format!("o{seq}"), "total": 10, "currency": "EUR", "items": []}),
            json!({}),
        );
        m.payload = serde_json::to_vec(&e).unwrap().into();
        m
    };
    let (holding, open) = held_at_the_gate(holder, vec![order(1)], &store).await;

    let second = vec![order(2)];
    let flaky = FlakyFloor {
        failing: 100.into(),
    };
    // The attempts the consumer makes while the floor is unreadable, taken
    // apart as after three failures: each fails as transient, and neither
    // commits nor rejects the order.
    for attempt in 0..4 {
        let e = apart
            .isolate(&second, &flaky, Duration::from_secs(60))
            .await
            .expect_err("the floor is unreadable");
        assert_eq!(e.class(), "transient", "attempt {attempt}: {e}");
    }
    let o2 = nudge::domain::event::EventId::parse("o2").unwrap();
    assert!(store.known_events(&[&o2]).await.unwrap().is_empty());
    assert!(store.list_rejected(10).await.unwrap().is_empty());

    // The floor answers: the second order still waits for the first.
    flaky.failing.store(0, std::sync::atomic::Ordering::SeqCst);
    let apart_task = tokio::spawn(async move {
        apart
            .isolate(&second, &flaky, Duration::from_secs(60))
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !apart_task.is_finished(),
        "the later order waits for the earlier one of its client"
    );
    open.notify_one();
    holding.await.unwrap().unwrap();
    let report = apart_task.await.unwrap().unwrap();
    assert_eq!((report.accepted, report.rejected), (1, 0));
    let (effects, _) = outbox_of(&store).await;
    assert_eq!(
        effects.into_iter().collect::<Vec<_>>(),
        vec![("first".to_string(), "task".to_string(), "o1".to_string())],
        "the client's first order decided first"
    );
    assert!(store.list_rejected(10).await.unwrap().is_empty());
}
