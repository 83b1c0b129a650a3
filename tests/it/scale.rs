//! Several nudge processes on one PostgreSQL database and one NATS server,
//! sharing the durable consumer: what #5 promises for a scaled-out shop.

use crate::helpers::{
    Backend, Daemon, ORDER_CHECK, TestDb, TestEnv, daemon_vars, event, eventually,
    publish_retrying, registered_at, sigterm, spawn_daemon,
};
use chrono::{DateTime, Duration as Span, Utc};
use nudge::domain::counters::{CounterKey, period_key};
use nudge::domain::event::ClientId;
use nudge::store::{Admin, AnyStore, History, Outbox, Staff, State, TaskFilter, Window};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::Duration;

const CLIENTS: usize = 3000;
const BUYERS: usize = 1000;
const ORDERS_EACH: usize = 3;

/// A moment 40 minutes ago, moved so that the next few minutes stay in one
/// month and one quarter (the counters under test are per period).
fn base() -> DateTime<Utc> {
    let mut t = Utc::now() - Span::minutes(40);
    let period = |t| period_key("month", t, chrono_tz::Tz::UTC).unwrap();
    while period(t) != period(t + Span::minutes(10)) {
        t -= Span::minutes(10);
    }
    t
}

/// Client `s{i}` registers; buyers (the first 1000) order three times:
/// every fourth buyer's first order is big (> 1000), every tenth came
/// through partner `acme`.
fn workload(base: DateTime<Utc>) -> (Vec<Value>, Vec<Value>) {
    let at = |ms: i64| (base + Span::milliseconds(ms)).to_rfc3339();
    let registrations = (0..CLIENTS)
        .map(|i| registered_at(&format!("r{i}"), &format!("s{i}"), &at(i as i64)))
        .collect();
    let mut orders = Vec::new();
    for b in 0..BUYERS {
        for k in 0..ORDERS_EACH {
            let total = if k == 0 && b % 4 == 0 { 1500.0 } else { 100.0 };
            let context = if b % 10 == 0 {
                json!({"partner_track_id": "acme"})
            } else {
                json!({})
            };
            orders.push(event(
                &format!("o{b}-{k}"),
                "order_placed",
                &format!("s{b}"),
                // A buyer's orders follow each other closely, so that
                // several instances hold orders of the same client at once.
                &at(600_000 + (b * ORDERS_EACH + k) as i64),
                json!({"order_id": format!("{b}-{k}"), "channel": "online", "total": total,
                       "currency": "EUR", "items": [{"product_id": "p1", "name": "Lamp",
                       "quantity": 1, "price": total}]}),
                context,
            ));
        }
    }
    (registrations, orders)
}

fn instance_vars(env: &TestEnv) -> Vec<(String, String)> {
    daemon_vars(
        env,
        &[
            ("NUDGE__TEAMS__SALES__EMAIL", "sales@shop.test"),
            ("NUDGE__RULES__SETTINGS__PARTNER_SHARES__ACME", "10"),
            ("NUDGE__DATABASE__MAX_CONNECTIONS", "4"),
            // Each instance its own port.
            ("NUDGE__HTTP__LISTEN", "127.0.0.1:0"),
        ],
    )
}

async fn open(db: &TestDb) -> AnyStore {
    AnyStore::connect(&db.url, 2).await.unwrap()
}

async fn wait_stored(store: &AnyStore, n: u64) {
    eventually(
        Duration::from_secs(180),
        &format!("{n} events stored"),
        || async { (store.count_events().await.ok()? >= n).then_some(()) },
    )
    .await
}

async fn wait_sent(store: &AnyStore, n: usize) {
    eventually(
        Duration::from_secs(180),
        &format!("{n} effects delivered"),
        || async {
            let rows = store.list_outbox(100_000).await.ok()?;
            (rows.len() >= n && rows.iter().all(|r| r.status == "sent")).then_some(())
        },
    )
    .await
}

fn stop_all(instances: Vec<Daemon>) {
    drop(instances);
}

/// Mails by Message-ID: how many copies of each arrived.
fn copies(env: &TestEnv) -> (Vec<crate::helpers::Mail>, HashMap<String, usize>) {
    let mails = env.mails();
    let mut by_id = HashMap::new();
    for m in &mails {
        *by_id.entry(m.message_id.clone()).or_insert(0usize) += 1;
    }
    (mails, by_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_one_killed_midway_on_postgres() {
    let env = TestEnv::new(Backend::Postgres).await;
    env.create_stream().await;
    let (registrations, orders) = workload(base());
    let vars = instance_vars(&env);
    let mut instances: Vec<Daemon> = (0..3).map(|_| spawn_daemon(&vars)).collect();
    let store = open(&env.db).await;

    // Half the registrations, then one instance dies without a goodbye.
    let (first, second) = registrations.split_at(CLIENTS / 2);
    for e in first {
        env.publish(e).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    instances[1].kill().unwrap(); // SIGKILL
    instances[1].wait().unwrap();
    for e in second {
        env.publish(e).await;
    }
    instances[1] = spawn_daemon(&vars);
    // Orders after their clients exist, so the welcome is the first thing
    // each client gets; then the orders race between the three instances.
    wait_stored(&store, CLIENTS as u64).await;
    for e in &orders {
        env.publish(e).await;
    }

    let buyers_with_partner = BUYERS / 10;
    let emitted = buyers_with_partner * ORDERS_EACH + 1; // commissions + the happy client
    let total_events = CLIENTS + BUYERS * ORDERS_EACH + emitted;
    wait_stored(&store, total_events as u64).await;
    // Welcome mails, the happy client's mail and the staff mails of 1001 tasks.
    let effects = CLIENTS + 1 + emitted + (BUYERS + 1);
    wait_sent(&store, effects).await;
    stop_all(instances);

    // No event lost, none applied twice: each buyer has exactly three orders.
    assert_eq!(store.count_events().await.unwrap(), total_events as u64);
    let ids: Vec<ClientId> = (0..BUYERS)
        .map(|b| ClientId::parse(format!("s{b}")).unwrap())
        .collect();
    let refs: Vec<&ClientId> = ids.iter().collect();
    let states = store.load_clients(&refs).await.unwrap();
    assert_eq!(states.len(), BUYERS);
    let wrong: Vec<_> = states
        .values()
        .filter(|s| s.stats.orders != ORDERS_EACH as u64)
        .map(|s| (s.client_id.to_string(), s.stats.orders))
        .collect();
    assert!(
        wrong.is_empty(),
        "buyers without exactly 3 orders: {wrong:?}"
    );

    // Shared counters exact despite three writers.
    let at = base() + Span::minutes(10);
    let key = |name: &str, period: &str| CounterKey {
        name: name.into(),
        period: period_key(period, at, chrono_tz::Tz::UTC).unwrap(),
    };
    let big = store
        .load_counter(&key("big_order_clients", "quarter"))
        .await
        .unwrap();
    assert_eq!(big.value, (BUYERS / 4) as f64, "distinct big-order clients");
    let commission = store
        .load_counter(&key("partner_commission:acme", "month"))
        .await
        .unwrap();
    // 50 partner buyers with 1500 + 100 + 100, 50 with 3 x 100; 10 %.
    assert_eq!(commission.value, 10_000.0);

    // One task per buyer's third order, one for the 99th big client.
    let tasks = store
        .list_tasks(&TaskFilter::default(), 10_000)
        .await
        .unwrap();
    assert_eq!(tasks.len(), BUYERS + 1);

    // Exposures and conversions exact despite three writers and a kill: each
    // client exposed once to the welcome (its first mail), each buyer
    // converted by their first order, whose total is the revenue.
    let report = nudge::tools::report::stored(&store, "welcome", None, None, None)
        .await
        .unwrap();
    let own = &report.experiments[0].variants[0];
    assert_eq!(
        (own.exposed, own.mailed, own.converted),
        (CLIENTS as u64, CLIENTS as u64, BUYERS as u64),
        "{report:?}"
    );
    // Which order converts a buyer follows the order their orders were
    // applied in: the first, unless a batch gave up waiting for an earlier
    // one held by a slow instance (see `Pipeline::process_in_order`), so
    // the revenue is bounded, not fixed, here.
    let all_first = (BUYERS / 4) as f64 * 1500.0 + (BUYERS - BUYERS / 4) as f64 * 100.0;
    println!(
        "scale-out: welcome revenue {} of {all_first} if every buyer's first order converted",
        own.revenue
    );
    assert!(
        own.revenue <= all_first && own.revenue >= BUYERS as f64 * 100.0,
        "{}",
        own.revenue
    );

    // Every welcome mail went out; a copy only for mails in flight at the kill.
    let (mails, by_id) = copies(&env);
    let welcomes: HashMap<&str, usize> = mails
        .iter()
        .filter(|m| m.header("X-Nudge-Template").as_deref() == Some("welcome"))
        .fold(HashMap::new(), |mut acc, m| {
            *acc.entry(m.message_id.as_str()).or_insert(0) += 1;
            acc
        });
    let mut recipients: Vec<_> = mails
        .iter()
        .filter(|m| m.header("X-Nudge-Template").as_deref() == Some("welcome"))
        .map(|m| m.to.clone())
        .collect();
    recipients.sort();
    recipients.dedup();
    let duplicates = mails.len() - by_id.len();
    let concurrency = 4;
    println!(
        "scale-out: 3 instances, 1 SIGKILL, {} events, {} clients, {} mails received, \
         {} distinct, {duplicates} duplicates (allowed {concurrency}), {} tasks",
        total_events,
        CLIENTS,
        mails.len(),
        by_id.len(),
        tasks.len()
    );
    assert_eq!(welcomes.len(), CLIENTS, "one welcome Message-ID per client");
    assert_eq!(recipients.len(), CLIENTS, "every client welcomed");
    let mails_expected = CLIENTS + 1 + (BUYERS + 1);
    assert_eq!(by_id.len(), mails_expected, "every mail by Message-ID");
    assert!(
        duplicates <= concurrency,
        "only mails in flight may be doubled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_with_sigterm_loses_and_doubles_nothing_on_postgres() {
    let env = TestEnv::new(Backend::Postgres).await;
    env.create_stream().await;
    let (registrations, _) = workload(base());
    let vars = instance_vars(&env);
    let mut instances: Vec<Daemon> = (0..3).map(|_| spawn_daemon(&vars)).collect();
    let store = open(&env.db).await;

    // Restart each instance in turn while the events stream in.
    let chunk = CLIENTS / 4;
    for (i, part) in registrations.chunks(chunk).enumerate() {
        for e in part {
            env.publish(e).await;
        }
        if i < instances.len() {
            sigterm(&instances[i]);
            let status = instances[i].wait().unwrap();
            assert!(status.success(), "a clean exit on SIGTERM: {status}");
            instances[i] = spawn_daemon(&vars);
        }
    }
    wait_stored(&store, CLIENTS as u64).await;
    wait_sent(&store, CLIENTS).await;
    for c in &instances {
        sigterm(c);
    }
    for mut c in instances {
        assert!(c.wait().unwrap().success());
    }

    assert_eq!(store.count_events().await.unwrap(), CLIENTS as u64);
    let (mails, by_id) = copies(&env);
    println!(
        "rolling restart: 3 instances restarted with SIGTERM, {CLIENTS} events, {} mails, {} distinct",
        mails.len(),
        by_id.len()
    );
    assert_eq!(by_id.len(), CLIENTS, "every welcome mail");
    assert_eq!(mails.len(), CLIENTS, "and not one twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_nats_cluster_loses_a_node_and_nothing_else_on_postgres() {
    let mut nodes = nudge_kit::nats::NatsServer::cluster(3).unwrap_or_else(|e| panic!("{e}"));
    let urls: Vec<String> = nodes.iter().map(|n| n.url()).collect();
    let mut env = TestEnv::with_env(
        Backend::Postgres,
        &[
            ("NUDGE__NATS__URL", &urls.join(",")),
            ("NUDGE__NATS__REPLICAS", "3"),
        ],
    )
    .await;
    // The test publishes like the shop would: through the last node, which
    // stays up.
    let shop = async_nats::connect(urls[2].as_str()).await.unwrap();
    env.js = async_nats::jetstream::new(shop);
    let app = env.start().await;
    let stream = app
        .js
        .get_stream(&app.config.nats.stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(stream.config.num_replicas, 3, "a replicated stream");

    let (registrations, _) = workload(base());
    let n = 300;
    for e in &registrations[..n / 2] {
        app.publish(e).await;
    }
    // The first node goes away; nudge may well have been connected to it.
    drop(nodes.remove(0));
    for e in &registrations[n / 2..n] {
        publish_retrying(&app, e).await;
    }
    // The cluster elects new leaders for the stream and the consumer
    // (a Raft election each) and the client reconnects with backoff:
    // seconds each, more on a loaded machine.
    app.wait_events_within(n as u64, Duration::from_secs(60))
        .await;
    let mails = app.wait_mails(n).await;
    app.wait_outbox_settled().await;
    let mut ids: Vec<_> = mails.iter().map(|m| m.message_id.clone()).collect();
    ids.sort();
    ids.dedup();
    println!(
        "nats cluster: 3 nodes, 1 stopped midway, {n} events, {} mails, {} distinct",
        mails.len(),
        ids.len()
    );
    assert_eq!(app.store.count_events().await.unwrap(), n as u64);
    assert_eq!(mails.len(), n, "every welcome once");
    assert_eq!(ids.len(), n);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_apply_each_clients_events_in_order_on_postgres() {
    events_apply_in_client_order(Backend::Postgres, 3, "1").await;
}

backend_tests!(one_instance_with_batches_in_flight_applies_each_clients_events_in_order);

/// Batches decided and committed at once inside one instance are kept in
/// order by the same window as batches of several instances.
async fn one_instance_with_batches_in_flight_applies_each_clients_events_in_order(
    backend: Backend,
) {
    events_apply_in_client_order(backend, 1, "4").await;
}

async fn events_apply_in_client_order(backend: Backend, instances: usize, in_flight: &str) {
    let env = TestEnv::new(backend).await;
    std::fs::write(env.rules_dir().join("order_check.rhai"), ORDER_CHECK).unwrap();
    env.create_stream().await;
    let vars = daemon_vars(
        &env,
        &[
            ("NUDGE__HTTP__LISTEN", "127.0.0.1:0"),
            ("NUDGE__NATS__BATCH_SIZE", "20"),
            ("NUDGE__NATS__BATCHES_IN_FLIGHT", in_flight),
            // The production default: order is kept for up to 15 s of
            // waiting, ample even on a loaded test machine.
            ("NUDGE__NATS__ACK_WAIT_SECS", "30"),
        ],
    );
    let instances: Vec<Daemon> = (0..instances).map(|_| spawn_daemon(&vars)).collect();
    let store = open(&env.db).await;
    let t0 = base();
    let (clients, each) = (100, 30);
    let mut published = 0u64;
    // Each client's events back to back, so that batches of different
    // instances hold events of the same client.
    for c in 0..clients {
        for n in 1..=each {
            let at = t0 + Span::milliseconds((c * each + n) as i64);
            env.publish(&event(
                &format!("v{c}-{n}"),
                "page_viewed",
                &format!("o{c}"),
                &at.to_rfc3339(),
                json!({"url": "/", "n": n}),
                json!({"session_id": format!("s{c}")}),
            ))
            .await;
            published += 1;
        }
    }
    wait_stored(&store, published).await;
    let n = instances.len();
    stop_all(instances);
    let violations = store
        .load_counter(&CounterKey {
            name: "order_violations".into(),
            period: period_key("year", t0, chrono_tz::Tz::UTC).unwrap(),
        })
        .await
        .unwrap();
    println!(
        "order: {n} instance(s), {in_flight} batches in flight each, {clients} clients x {each} events, {} applied out of order",
        violations.value
    );
    assert_eq!(
        violations.value, 0.0,
        "events applied out of their client's order"
    );
}

/// Each pulled message is a row of the consumer's window, inserted and
/// deleted within moments: nudge vacuums that table itself, so the batches'
/// look at it stays fast even where the server's autovacuum is off (as on
/// the test machines) or too slow for the churn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_window_is_vacuumed_on_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(Backend::Postgres, dir.path(), "vacuum").await;
    let store = open(&db).await;
    store.migrate().await.unwrap();
    let items: Vec<(u64, Option<String>)> = (1..=2000)
        .map(|s| (s, Some(format!("c{}", s % 50))))
        .collect();
    store
        .window_register("vacuum-test", &items, Utc::now() + Span::seconds(60))
        .await
        .unwrap();
    store.window_trim(2000).await.unwrap();
    let sql = db.sql().await;
    assert_eq!(sql.scalar("SELECT COUNT(*) FROM inflight").await, 0);
    // A vacuum of the table that began after the rows died.
    let died = sql.rows("SELECT CAST(clock_timestamp() AS TEXT)").await[0][0]
        .clone()
        .unwrap();
    let vacuumed = format!(
        "SELECT COUNT(*) FROM pg_stat_user_tables \
         WHERE relname = 'inflight' AND last_vacuum > '{died}'"
    );
    eventually(Duration::from_secs(30), "the window vacuumed", || async {
        (sql.scalar(&vacuumed).await > 0).then_some(())
    })
    .await;
}

/// Registrations of clients `c{i}`, one for each `i`.
async fn register(env: &TestEnv, clients: std::ops::Range<u32>) {
    for i in clients {
        let client = format!("c{i}");
        env.publish(&crate::helpers::registered(
            &format!("r{i}"),
            &client,
            "web",
            "Ann",
        ))
        .await;
    }
}

/// One process at a time consumes into a SQLite database (its consumer
/// window is in memory): a second instance on the same file stands by, and
/// takes over once the first stops, as in a restart that starts the new
/// process before the old one has finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_a_second_instance_stands_by_and_takes_over() {
    let app = crate::helpers::TestApp::spawn(Backend::Sqlite).await;
    let peer = app.start_peer().await;
    let db_file = app
        .config
        .database
        .url
        .expose()
        .strip_prefix("sqlite://")
        .expect("a sqlite url")
        .to_string();
    let lock_free = || {
        nudge::store::window::ConsumerLock::try_take(std::path::Path::new(&db_file))
            .unwrap()
            .is_some()
    };
    register(&app, 0..20).await;
    app.wait_events(20).await;
    assert!(!lock_free(), "an instance holds the consumer lock");
    // The one standing by says so, and is still healthy: it serves the API.
    let health = format!("http://{}/health", peer.http);
    let said: Value = eventually(Duration::from_secs(10), "the peer to stand by", || async {
        let r = reqwest::get(&health).await.ok()?;
        let ok = r.status().is_success();
        let body: Value = r.json().await.ok()?;
        (ok && body["ingest"].as_str()?.starts_with("standby")).then_some(body)
    })
    .await;
    assert_eq!(said["status"], "ready", "{said}");
    let metrics = reqwest::get(format!("http://{}/metrics", peer.http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("nudge_consumer_standby 1"), "{metrics}");

    let env = app.stop().await;
    register(&env, 20..40).await;
    let store = AnyStore::open(&env.config.database).await.unwrap();
    eventually(Duration::from_secs(20), "the peer to consume", || async {
        (store.count_events().await.ok()? == 40).then_some(())
    })
    .await;
    let said: Value = reqwest::get(&health).await.unwrap().json().await.unwrap();
    assert_eq!(said["ingest"], "ok", "{said}");
    peer.stop().await;
    assert!(lock_free(), "the lock is free once both stopped");
}
