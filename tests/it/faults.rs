//! Faults: broken rules, poison messages, a killed daemon, a restarted broker;
//! the database, its disk and the mail server failing (`outages`); hostile
//! input (`bad_input`); hostile data and rule mistakes (`hostile_data`); rules
//! that run away (`rule_faults`). The numbers each
//! proves are printed (`cargo test -- --nocapture` shows them).

mod bad_input;
mod hostile_data;
mod outages;
mod rule_faults;
mod stalls;

use crate::helpers::{
    Backend, TestApp, TestEnv, ago, daemon_vars, event, eventually, publish_retrying,
    registered_at, spawn_daemon,
};
use nudge::store::{History, Outbox, Staff};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::Duration;

async fn a_rule_failing_again_and_again_is_quarantined_until_its_file_changes(backend: Backend) {
    let env = TestEnv::with_env(
        backend,
        &[
            ("NUDGE__RULES__QUARANTINE_AFTER", "3"),
            ("NUDGE__RULES__QUARANTINE_WINDOW", "5"),
        ],
    )
    .await;
    std::fs::write(
        env.rules_dir().join("broken.rhai"),
        "const ON = [\"page_viewed\"];\nlet x = event.data.missing.deeper;\n",
    )
    .unwrap();
    let app = env.start().await;
    // Broken for everyone: five runs for five clients, all failed.
    for i in 0..5 {
        app.publish(&event(
            &format!("p{i}"),
            "page_viewed",
            &format!("qa{i}"),
            &ago(100 - i),
            json!({"url": "/"}),
            json!({"session_id": "s"}),
        ))
        .await;
    }
    app.wait_events(5).await;
    let rules: Value = app.get("/api/rules").await.json().await.unwrap();
    let q = rules["quarantined"].as_array().unwrap();
    assert_eq!(q.len(), 1, "{rules}");
    assert_eq!(q[0]["rule"], "broken");
    assert!(
        !rules["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "broken")
    );
    // Once out of service it runs no more; the other rules go on.
    let count = |m: &str, metric: &str, rule: &str| -> u64 {
        let prefix = format!("{metric}{{rule=\"{rule}\"}} ");
        m.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .unwrap()
            .parse()
            .unwrap()
    };
    let before = app.get("/metrics").await.text().await.unwrap();
    assert!(
        count(&before, "nudge_rule_errors_total", "broken") >= 3,
        "{before}"
    );
    for i in 5..8 {
        app.publish(&event(
            &format!("p{i}"),
            "page_viewed",
            "qa",
            &ago(100 - i),
            json!({"url": "/"}),
            json!({"session_id": "s"}),
        ))
        .await;
    }
    app.wait_events(8).await;
    let after = app.get("/metrics").await.text().await.unwrap();
    assert_eq!(
        count(&after, "nudge_rule_errors_total", "broken"),
        count(&before, "nudge_rule_errors_total", "broken"),
        "{after}"
    );
    assert_eq!(
        count(&after, "nudge_rule_runs_total", "quick_leave"),
        8,
        "{after}"
    );

    // Saving a fixed version brings it back.
    std::fs::write(
        app.rules_dir().join("broken.rhai"),
        "const ON = [\"page_viewed\"];\nlet x = 1;\n",
    )
    .unwrap();
    eventually(Duration::from_secs(5), "the quarantine lifted", || async {
        let r: Value = app.get("/api/rules").await.json().await.ok()?;
        (r["quarantined"].as_array()?.is_empty()
            && r["rules"].as_array()?.iter().any(|x| x["name"] == "broken"))
        .then_some(())
    })
    .await;
    app.stop().await;
}

async fn a_poison_message_is_recorded_and_the_stream_goes_on(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    // An event the database refuses to store, whatever the batch around it.
    let sql = app.db.sql().await;
    sql.execute(match backend {
        Backend::Sqlite => {
            "CREATE TRIGGER poison BEFORE INSERT ON events WHEN NEW.id = 'poison' \
             BEGIN SELECT RAISE(ABORT, 'this row is poison'); END"
        }
        Backend::Postgres => {
            "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             IF NEW.id = 'poison' THEN RAISE EXCEPTION 'this row is poison'; END IF; \
             RETURN NEW; END $$; \
             CREATE TRIGGER poison BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION poison()"
        }
    })
    .await;
    sql.close().await;
    app.publish(&registered_at("before", "pa", &ago(60))).await;
    app.publish(&registered_at("poison", "pb", &ago(50))).await;
    app.publish(&registered_at("after", "pc", &ago(40))).await;
    app.wait_events(2).await;
    let rejected = eventually(
        Duration::from_secs(30),
        "the poison kept as rejected",
        || async {
            let r = app.store.list_rejected(10).await.ok()?;
            (!r.is_empty()).then_some(r)
        },
    )
    .await;
    assert!(
        rejected[0].reason.contains("this row is poison"),
        "{rejected:?}"
    );
    let mails = app.wait_mails(2).await;
    let mut to: Vec<_> = mails.iter().map(|m| m.to.clone()).collect();
    to.sort();
    assert_eq!(to, ["pa@example.com", "pc@example.com"]);
    app.stop().await;
}

/// Makes the database refuse any task of `client` (a trigger raising an
/// error), as it would refuse a value it cannot hold.
async fn refuse_tasks_of(app: &TestApp, backend: Backend, client: &str) {
    let sql = app.db.sql().await;
    sql.execute(&match backend {
        Backend::Sqlite => format!(
            "CREATE TRIGGER poison_task BEFORE INSERT ON tasks WHEN NEW.client_id = '{client}' \
             BEGIN SELECT RAISE(ABORT, 'this task is poison'); END"
        ),
        Backend::Postgres => format!(
            "CREATE FUNCTION poison_task() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             IF NEW.client_id = '{client}' THEN RAISE EXCEPTION 'this task is poison'; END IF; \
             RETURN NEW; END $$; \
             CREATE TRIGGER poison_task BEFORE INSERT ON tasks FOR EACH ROW EXECUTE FUNCTION poison_task()"
        ),
    })
    .await;
    sql.close().await;
}

/// The clients among `clients` that have a task.
async fn with_tasks(app: &TestApp, clients: &[&str]) -> Vec<String> {
    let mut with = Vec::new();
    for c in clients {
        let filter = nudge::store::TaskFilter {
            client_id: Some(c.to_string()),
            ..Default::default()
        };
        if !app.store.list_tasks(&filter, 10).await.unwrap().is_empty() {
            with.push(c.to_string());
        }
    }
    with
}

/// A sweep runs a page of clients per transaction; one client the database
/// refuses used to fail the page on every attempt, so the rule ran for
/// nobody. Now the page is run client by client and that client passed over.
async fn a_sweep_the_database_refuses_for_one_client_goes_on_for_the_others(backend: Backend) {
    let app = TestEnv::with_env(backend, &[("NUDGE__SCHEDULER__CATCH_UP_HOURS", "0")])
        .await
        .start()
        .await;
    std::fs::write(
        app.rules_dir().join("call_all.rhai"),
        "const SCHEDULE = \"0 0 9 * * *\";\ntask(\"sales\", \"Call\", #{});\n",
    )
    .unwrap();
    refuse_tasks_of(&app, backend, "sp-poison").await;
    let clients = ["sp-a", "sp-poison", "sp-b"];
    for (i, c) in clients.iter().enumerate() {
        app.publish(&registered_at(&format!("sp-{i}"), c, &ago(60)))
            .await;
    }
    app.wait_events(3).await;
    let r: Value = eventually(
        Duration::from_secs(10),
        "the rule loaded and run",
        || async {
            let r = app.post("/api/rules/call_all/run").await;
            if !r.status().is_success() {
                return None;
            }
            r.json().await.ok()
        },
    )
    .await;
    assert_eq!(r["sweep"]["clients"], 3, "{r}");
    assert_eq!(with_tasks(&app, &clients).await, ["sp-a", "sp-b"]);
    app.stop().await;
}

/// Timers fire a page of clients per transaction. One client's timer whose
/// decision the database refuses (here a task it makes) used to fail the
/// whole page on every tick, so nobody's timers fired; now the page is
/// fired client by client and only that client's timer waits.
async fn a_timer_the_database_refuses_holds_back_no_one_elses(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    std::fs::write(
        app.rules_dir().join("callback.rhai"),
        "const ON = [\"page_viewed\"];\n\
         if event.type == \"page_viewed\" { after(seconds(2), \"call\", #{}); return; }\n\
         if event.type == \"timer\" { task(\"sales\", \"Call back\", #{}); }\n",
    )
    .unwrap();
    refuse_tasks_of(&app, backend, "tp-poison").await;
    // The catalog picks the new rule up.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let clients = ["tp-a", "tp-poison", "tp-b", "tp-c"];
    for (i, c) in clients.iter().enumerate() {
        app.publish(&event(
            &format!("tp-view-{i}"),
            "page_viewed",
            c,
            &ago(0),
            json!({"url": "/"}),
            json!({}),
        ))
        .await;
    }
    let tasks = eventually(
        Duration::from_secs(30),
        "the other clients' timers fired",
        || async {
            let with = with_tasks(&app, &clients).await;
            (with.len() == 3).then_some(with)
        },
    )
    .await;
    assert_eq!(tasks, ["tp-a", "tp-b", "tp-c"]);
    app.stop().await;
}

/// How many kills; `NUDGE_FAULT_LONG=1` runs the long variant.
fn kills() -> usize {
    if std::env::var("NUDGE_FAULT_LONG").is_ok() {
        10
    } else {
        3
    }
}

async fn sigkill_while_events_stream_in_loses_nothing_and_doubles_only_mails_in_flight(
    backend: Backend,
) {
    let env = TestEnv::new(backend).await;
    let vars = daemon_vars(&env, &[]);
    env.create_stream().await;

    let total = 5000usize;
    let registrations = 1000usize;
    let events: Vec<Value> = (0..total)
        .map(|i| {
            if i % 5 == 0 {
                registered_at(&format!("k{i}"), &format!("c{}", i / 5), &ago(3600))
            } else {
                event(
                    &format!("k{i}"),
                    "page_viewed",
                    &format!("c{}", i / 5),
                    &ago(3000),
                    json!({"url": "/"}),
                    json!({"session_id": "s"}),
                )
            }
        })
        .collect();

    let mut daemon = spawn_daemon(&vars);
    let kills = kills();
    let chunk = total / (kills + 1);
    let mut published = 0;
    for k in 0..=kills {
        let end = if k == kills { total } else { published + chunk };
        for e in &events[published..end] {
            env.publish(e).await;
        }
        published = end;
        if k < kills {
            // A random moment: somewhere in the middle of batches and sends.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos();
            tokio::time::sleep(Duration::from_millis(50 + (nanos % 400) as u64)).await;
            daemon.kill().unwrap(); // SIGKILL
            daemon.wait().unwrap();
            daemon = spawn_daemon(&vars);
        }
    }

    let store = nudge::store::AnyStore::connect(&env.db.url, 2)
        .await
        .unwrap();
    eventually(Duration::from_secs(120), "every event stored", || async {
        (store.count_events().await.ok()? == total as u64).then_some(())
    })
    .await;
    eventually(Duration::from_secs(120), "every mail sent", || async {
        let rows = store.list_outbox(100_000).await.ok()?;
        (rows.len() == registrations && rows.iter().all(|r| r.status == "sent")).then_some(())
    })
    .await;
    daemon.kill().unwrap();
    daemon.wait().unwrap();

    let mails = env.mails();
    let mut by_id: HashMap<String, usize> = HashMap::new();
    for m in &mails {
        *by_id.entry(m.message_id.clone()).or_default() += 1;
    }
    let distinct = by_id.len();
    let duplicates = mails.len() - distinct;
    let concurrency = 4;
    println!(
        "fault suite: {total} events, {kills} SIGKILLs, {registrations} welcome mails expected, \
         {} received, {distinct} distinct, {duplicates} duplicates (allowed: {})",
        mails.len(),
        kills * concurrency
    );
    assert_eq!(distinct, registrations, "every welcome mail arrived");
    assert!(
        duplicates <= kills * concurrency,
        "only mails in flight at a kill may be doubled"
    );
    let mut recipients: Vec<_> = mails.iter().map(|m| m.to.clone()).collect();
    recipients.sort();
    recipients.dedup();
    assert_eq!(
        recipients.len(),
        registrations,
        "one welcome per client, duplicates share the Message-ID"
    );
}

async fn nats_down_at_start_then_up_and_restarted_under_load(backend: Backend) {
    // No broker yet: nudge starts, says not ready, and waits.
    let mut env = TestEnv::new(backend).await;
    env.nats.stop();
    let mut app = env.start_unready().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let health = app.get("/health").await;
    assert_eq!(health.status(), 503);
    let body: Value = health.json().await.unwrap();
    assert_eq!(body["nats"], "unavailable", "{body}");
    assert_eq!(body["database"], "ok", "{body}");

    // The broker comes up: nudge connects by itself and consumes.
    app.env.nats.restart().expect("nats-server restarts");
    app.wait_healthy().await;
    let total = 600;
    for i in 0..total {
        if i == total / 2 {
            // Restarted under load; JetStream keeps its data.
            app.env.nats.restart().expect("nats-server restarts");
        }
        let e = if i % 3 == 0 {
            registered_at(&format!("n{i}"), &format!("c{i}"), &ago(600))
        } else {
            event(
                &format!("n{i}"),
                "login_succeeded",
                &format!("c{}", i - i % 3),
                &ago(500),
                json!({}),
                json!({}),
            )
        };
        publish_retrying(&app, &e).await;
    }
    eventually(
        Duration::from_secs(60),
        "every event after the restart",
        || async { (app.store.count_events().await.ok()? == total as u64).then_some(()) },
    )
    .await;
    app.wait_outbox_settled().await;
    let mails = app.mails();
    assert_eq!(mails.len(), total / 3, "one welcome per registration");
    println!(
        "fault suite: {total} events across a NATS restart, {} mails, none lost",
        mails.len()
    );
    app.stop().await;
}

backend_tests!(
    a_rule_failing_again_and_again_is_quarantined_until_its_file_changes,
    a_poison_message_is_recorded_and_the_stream_goes_on,
    a_timer_the_database_refuses_holds_back_no_one_elses,
    a_sweep_the_database_refuses_for_one_client_goes_on_for_the_others,
    sigkill_while_events_stream_in_loses_nothing_and_doubles_only_mails_in_flight,
    nats_down_at_start_then_up_and_restarted_under_load,
);
